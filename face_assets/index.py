"""The approximate-nearest-neighbour index of face embeddings: a small faiss-style surface.

:class:`FaceIndex` stores unit-normalised float32 embeddings under int64 face ids and finds the
most similar faces by inner product, which on unit vectors is the cosine similarity.

Index types. ``factory`` is a faiss index-factory string, or ``"auto"``:

* below ``exact_threshold`` vectors (50,000): ``IDMap2,Flat``, exact brute force, fast enough there;
* above it: ``IVF{nlist},PQ{dim/4}x4fs,Refine(SQ8)``. An inverted file with ~128 vectors per list
  (flat coarse quantizer, at most 8192 lists) whose lists hold 4-bit fast-scan product-quantizer
  codes, scanned with SIMD about 3x faster per vector than SQ8 codes; each search takes
  ``k * refine_factor`` candidates from it and re-ranks them with SQ8 codes (exact to ~5e-4).
  Removal works on both parts. HNSW is not used: faiss cannot remove from it, and on our data it
  was slower than IVF at equal recall (see ``benchmarks/index_scale.py`` and the module notes).

The refine stage is our own rather than faiss' ``IndexRefine``, which supports neither
``add_with_ids`` nor ``remove_ids``: the SQ8 codes live in a one-list IVF with a hash-table direct
map, so re-ranking reads candidates by id and removal costs O(removed). Factory strings ending in
``,Refine(<codec>)`` or ``,RFlat`` get this stage with that codec.

Auto mode changes type by itself: crossing ``exact_threshold`` trains the IVF on a sample of what
is stored; growing to 4x the size it was trained for rebuilds it with more lists. :meth:`rebuild`
builds from scratch at the type its size calls for. Approximate indexes never go back to exact
when shrinking (a rebuild does).

Persistence: :meth:`save` writes one self-describing file (magic, JSON header, faiss payload,
SHA-256 over header and payload) atomically, plus a ``<file>.json`` sidecar with the same metadata
for tools that only need the model version or count. :meth:`load` verifies everything and raises
:class:`IndexNotFoundError` / :class:`IndexCorruptError`.

An index never mixes embedding models: it records ``model_version`` and refuses vectors (and
queries, and loads) that declare another one.

Not thread-safe for writers; concurrent searches on an unchanging index are fine (faiss).

Tuning evidence (``benchmarks/index_scale.py``: synthetic 512-d library, top-10, one query per
call, 2 shared cores; "match" = recall of exact neighbours with cosine >= 0.3, for queries of
uniformly drawn people, the hard case):

* 200k vectors: IVF1024,SQ8 at nprobe 64 found 77 % of matches in 0.78 ms; IVF1024 fast-scan PQ
  + re-rank of 100 at nprobe 256 found 94 % in 0.5 ms; HNSW32 (efSearch 256) 77 % in 2.0 ms.
* 2M vectors, auto = IVF8192,PQ128x4fs,Refine(SQ8), nprobe 1024: p50 4.8 ms, 133x faster than
  exact search, match recall 0.96 (faces drawn like the library) / 0.88 (people drawn
  uniformly), plain recall@10 0.80 / 0.43, build 188 s, peak RSS 5.8 GiB including the 4.1 GB
  dataset held by the benchmark. Plain recall@10 >= 0.95 is out of reach on this isotropic
  synthetic data at any few-ms budget: most exact neighbours of people with few photos are
  random faces at cosine ~0.2 that no partition or graph can single out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# faiss' OpenMP threads busy-wait between parallel regions by default. On a few shared cores
# that turns small parallel steps into a crawl: training an IVF-PQ on 6,000 vectors took 22 s
# spinning vs 0.2 s passive, measured on 2 loaded cores. Must be set before the OpenMP runtime
# loads (first faiss import); an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import faiss  # noqa: E402

from .errors import EmbeddingError, FaceRecognitionError, IndexCorruptError, IndexNotFoundError

__all__ = [
    "FaceIndex",
    "FaceIndexError",
    "IndexInputError",
    "IndexDimensionError",
    "EmbeddingError",
    "ModelVersionMismatchError",
    "IndexNotFoundError",
    "IndexCorruptError",
    "EXACT_THRESHOLD",
]


# -- errors ----------------------------------------------------------------------------------------
# IndexNotFoundError, IndexCorruptError and EmbeddingError live in errors.py (the library catches
# them); the classes below are new here, to move into errors.py.


class FaceIndexError(FaceRecognitionError):
    """An index operation cannot be done (removal unsupported by the type, too few vectors to train)."""


class IndexInputError(FaceIndexError, ValueError):
    """Ids or k given to the index are unusable (duplicate, negative, count mismatch, k < 1)."""


class IndexDimensionError(EmbeddingError):
    """Vectors have the wrong shape or dimension for this index."""

    def __init__(self, expected: int, got: object):
        self.expected = expected
        self.got = got
        super().__init__(f"expected vectors of dimension {expected}, got shape {got}")


class ModelVersionMismatchError(FaceIndexError, ValueError):
    """Embeddings of one model version were offered to an index holding another."""

    def __init__(self, index_version: str, offered: str):
        self.index_version = index_version
        self.offered = offered
        held = repr(index_version) if index_version else "vectors of an unrecorded model version"
        super().__init__(
            f"index holds {held}, refusing embeddings of model version {offered!r}: "
            "similarities across models are meaningless; rebuild the index with the new model"
        )


def _corrupt(path: object, reason: str) -> IndexCorruptError:
    return IndexCorruptError(f"corrupt face index {path}: {reason}")


# -- tuning constants (evidence: benchmarks/index_scale.py, numbers in its docstring) -----------

#: Below this many vectors "auto" keeps an exact flat index.
EXACT_THRESHOLD = 50_000
# Target vectors per inverted list. Small lists matter on face-like data: at 200k vectors and
# equal fraction scanned (IVF-SQ8), 49/list found 82 % of true matches vs 60 % at 195/list.
_VECTORS_PER_LIST = 128
_MIN_NLIST = 16
# A flat coarse quantizer over 8192 x 512 float32 (16 MB) costs ~0.5 ms per query; 16384 lists
# cost ~3 ms (out of cache) and HNSW over the centroids was no faster at the nprobe we need.
_MAX_NLIST = 8192
# Fraction of the lists probed by default (nprobe = nlist // _NPROBE_DIVISOR).
_NPROBE_DIVISOR = 8
# Candidates re-ranked per result (k * factor).
_REFINE_FACTOR = 10
# An auto IVF is rebuilt with more lists once it holds this many times what it was trained on.
_REGROW_FACTOR = 4
# Training sample sizes: k-means sees up to 40 points per list (faiss asks for >= 39; at 8192
# lists that is a 0.67 GB sample, which bounds the build's peak memory), codecs 65,536 points.
_COARSE_TRAIN_PER_LIST = 40
_CODEC_TRAIN_MAX = 65_536
# Rows processed at a time by add/rebuild, bounding temporary copies (64k x 512 x 4 B = 128 MB).
_CHUNK = 65_536
_SEED = 1234

_MAGIC = b"FACEIDX\x01"
_FORMAT_VERSION = 1
_REFINE_RE = re.compile(r"^(?P<base>.+?),\s*(?:RFlat|Refine\((?P<codec>[^()]+)\))\s*$")


def _auto_nlist(n: int) -> int:
    """Power of two near ``n / _VECTORS_PER_LIST`` within [_MIN_NLIST, _MAX_NLIST]."""
    target = max(n / _VECTORS_PER_LIST, 1.0)
    return int(min(max(2 ** int(math.floor(math.log2(target))), _MIN_NLIST), _MAX_NLIST))


def _auto_factory(dim: int, n: int, exact_threshold: int) -> str:
    """The factory string "auto" resolves to for ``n`` vectors."""
    if n < exact_threshold:
        return "IDMap2,Flat"
    codec = f"PQ{dim // 4}x4fs" if dim % 4 == 0 else "SQ8"
    return f"IVF{_auto_nlist(n)},{codec},Refine(SQ8)"


class FaceIndex:
    """Nearest-face search over unit-normalised embeddings; inner product = cosine similarity.

    Args:
        dim: embedding dimension.
        factory: a faiss index-factory string (``"IDMap2,Flat"``, ``"IVF4096,SQ8"``,
            ``"IVF8192,PQ128x4fs,Refine(SQ8)"``, ``"HNSW32"`` ...) or ``"auto"`` (exact below
            ``exact_threshold`` vectors, IVF fast-scan with re-ranking above; see module doc).
            Non-IVF indexes get an ``IDMap2`` wrapper so they take our ids.
        nprobe: IVF lists probed per query; ``None`` = nlist // 8 (the tuned default).
        ef_search: HNSW search depth, for HNSW factories; ``None`` = faiss default.
        model_version: the embedding model the vectors come from; ``""`` = not yet known (the
            first :meth:`add` declaring one records it while the index is empty).
        exact_threshold: size at which "auto" switches from exact to approximate.
        refine_factor: with a refine stage, ``k * refine_factor`` candidates are re-ranked.
    """

    def __init__(
        self,
        dim: int = 512,
        factory: str = "auto",
        nprobe: int | None = None,
        ef_search: int | None = None,
        model_version: str = "",
        *,
        exact_threshold: int = EXACT_THRESHOLD,
        refine_factor: int = _REFINE_FACTOR,
    ):
        if int(dim) < 1:
            raise IndexInputError(f"dim must be >= 1, got {dim}")
        if not isinstance(factory, str) or not factory.strip():
            raise IndexInputError(f"factory must be a faiss factory string or 'auto', got {factory!r}")
        if nprobe is not None and int(nprobe) < 1:
            raise IndexInputError(f"nprobe must be >= 1, got {nprobe}")
        if ef_search is not None and int(ef_search) < 1:
            raise IndexInputError(f"ef_search must be >= 1, got {ef_search}")
        if int(refine_factor) < 1:
            raise IndexInputError(f"refine_factor must be >= 1, got {refine_factor}")
        self.dim = int(dim)
        self.factory = factory.strip()
        self.model_version = str(model_version or "")
        self.exact_threshold = int(exact_threshold)
        self.refine_factor = int(refine_factor)
        self._nprobe = None if nprobe is None else int(nprobe)
        self._ef_search = None if ef_search is None else int(ef_search)
        # Sorted ids present: duplicate checks, ids(), len() without walking faiss structures.
        self._ids = np.zeros(0, dtype=np.int64)
        self._trained_for = 0
        self._base, self._store, self._resolved = self._build_empty(
            _auto_factory(self.dim, 0, self.exact_threshold) if self.is_auto else self.factory
        )

    # -- properties --------------------------------------------------------------------------

    @property
    def is_auto(self) -> bool:
        """Whether the index type follows the size ("auto" factory)."""
        return self.factory.lower() == "auto"

    @property
    def resolved_factory(self) -> str:
        """The concrete factory string of the current index, e.g. ``"IDMap2,Flat"``."""
        return self._resolved

    @property
    def is_exact(self) -> bool:
        """Whether searches are exact (flat index)."""
        return self._resolved.replace(" ", "") in ("IDMap2,Flat", "IDMap,Flat", "Flat")

    @property
    def nlist(self) -> int | None:
        """Number of IVF lists, or None for non-IVF indexes."""
        ivf = faiss.try_extract_index_ivf(self._base)
        return None if ivf is None else int(ivf.nlist)

    @property
    def nprobe(self) -> int | None:
        """IVF lists probed per query (None for non-IVF); assignable."""
        ivf = faiss.try_extract_index_ivf(self._base)
        return None if ivf is None else int(ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        if value is not None and int(value) < 1:
            raise IndexInputError(f"nprobe must be >= 1, got {value}")
        self._nprobe = None if value is None else int(value)
        self._apply_search_params()

    @property
    def ef_search(self) -> int | None:
        """HNSW search depth (None for non-HNSW); assignable."""
        h = _find_hnsw(self._base)
        return None if h is None else int(h.hnsw.efSearch)

    @ef_search.setter
    def ef_search(self, value: int | None) -> None:
        if value is not None and int(value) < 1:
            raise IndexInputError(f"ef_search must be >= 1, got {value}")
        self._ef_search = None if value is None else int(value)
        self._apply_search_params()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, face_id: object) -> bool:
        try:
            i = int(face_id)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False
        pos = np.searchsorted(self._ids, i)
        return bool(pos < len(self._ids) and self._ids[pos] == i)

    def __repr__(self) -> str:
        mv = f", model_version={self.model_version!r}" if self.model_version else ""
        return f"FaceIndex(dim={self.dim}, {self._resolved!r}, n={len(self)}{mv})"

    def ids(self) -> np.ndarray:
        """All face ids present, sorted ascending (int64 copy)."""
        return self._ids.copy()

    # -- building ----------------------------------------------------------------------------

    def _build_empty(self, factory: str, n_hint: int = 0) -> tuple[Any, Any, str]:
        """An empty (untrained) base index and optional refine store for ``factory``.

        ``n_hint`` is the number of vectors about to be added (sizes the refine store).
        """
        m = _REFINE_RE.match(factory)
        base_spec, store_codec = (m.group("base"), m.group("codec") or "Flat") if m else (factory, None)
        try:
            base = faiss.index_factory(self.dim, base_spec, faiss.METRIC_INNER_PRODUCT)
            store = None
            if store_codec is not None:
                # A small IVF is the cheapest faiss container that takes arbitrary ids, reads
                # vectors back by id (hash-table direct map) and removes in O(removed). Big ones
                # get 64 lists so no single code vector doubles its capacity (a transient +1 GB
                # at 2M vectors); which list a vector lands in does not matter here.
                lists = 64 if n_hint >= 100_000 else 1
                store = faiss.index_factory(self.dim, f"IVF{lists},{store_codec}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise IndexInputError(f"invalid faiss factory string {factory!r}: {_faiss_msg(e)}") from None
        # (index_factory already returns the concrete class; faiss.downcast_index would return a
        # non-owning proxy, freed under our feet once the original proxy is collected.)
        if faiss.try_extract_index_ivf(base) is None and not isinstance(base, faiss.IndexIDMap):
            # Only IVF indexes store ids natively; everything else needs the id map.
            base = faiss.IndexIDMap2(base)
        self._apply_search_params(base)
        return base, store, factory

    def _apply_search_params(self, base: Any = None) -> None:
        base = self._base if base is None else base
        ivf = faiss.try_extract_index_ivf(base)
        if ivf is not None:
            ivf.nprobe = min(self._nprobe or max(1, ivf.nlist // _NPROBE_DIVISOR), ivf.nlist)
        h = _find_hnsw(base)
        if h is not None and self._ef_search is not None:
            h.hnsw.efSearch = self._ef_search

    def _train(self, base: Any, store: Any, sample: np.ndarray) -> None:
        """Train an empty index on unit ``sample`` rows; the coarse quantizer gets 2-level k-means."""
        ivf = faiss.try_extract_index_ivf(base)
        if ivf is not None and not base.is_trained:
            if len(sample) < ivf.nlist:
                raise FaceIndexError(
                    f"{self._resolved!r} needs at least nlist={ivf.nlist} vectors to train, got "
                    f"{len(sample)}; add more at once, call rebuild(), or use factory='auto'"
                )
            centroids = _train_centroids(sample, ivf.nlist, seed=_SEED)
            q = ivf.quantizer
            q.reset()
            q.add(centroids)
            q.is_trained = True
            # With nlist centroids present, faiss trains only the codec (PQ/SQ) from here on.
        codec_sample = _subsample(sample, _CODEC_TRAIN_MAX)
        if not base.is_trained:
            base.train(codec_sample)
        if store is not None and not store.is_trained:
            store.train(codec_sample)
            store.set_direct_map_type(faiss.DirectMap.Hashtable)

    def rebuild(
        self,
        ids: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        model_version: str | None = None,
    ) -> None:
        """Replace the whole content by ``(ids, vectors)``, choosing the index type by size.

        With "auto" the type follows ``len(ids)``; with an explicit factory, that factory is
        retrained on these vectors. The old content is kept until the new index is complete.

        Args:
            ids: int64 face ids, unique, >= 0.
            vectors: [n, dim] embeddings (normalised here).
            model_version: model of the embeddings; replaces the index's recorded version.
        """
        ids_arr = self._check_ids(ids)
        x, norms = self._check_vectors(vectors, len(ids_arr))
        if len(np.unique(ids_arr)) != len(ids_arr):
            raise IndexInputError("duplicate ids in rebuild")
        factory = _auto_factory(self.dim, len(ids_arr), self.exact_threshold) if self.is_auto else self.factory
        self._replace(ids_arr, _normalized_chunks(x, norms), factory, x, norms)
        if model_version is not None:
            self.model_version = str(model_version)

    def _replace(
        self,
        ids: np.ndarray,
        chunks: Iterator[tuple[int, np.ndarray]],
        factory: str,
        sample_source: Any,
        sample_norms: np.ndarray | None,
    ) -> None:
        """Build a fresh index of type ``factory``; swap it in only when complete.

        ``chunks`` yields ``(first_row, unit_rows)`` for all of ``ids``; training samples are read
        from ``sample_source`` (an array with its row norms, or a :class:`_StoredPlusNew`).
        """
        n = len(ids)
        base, store, resolved = self._build_empty(factory, n)
        old = (self._base, self._store, self._resolved)
        self._resolved = resolved  # error messages of _train name the index being built
        try:
            if not (base.is_trained and (store is None or store.is_trained)):
                rows = np.sort(_rng().choice(n, min(n, _train_size(base)), replace=False))
                self._train(base, store, _gather_normalized(sample_source, sample_norms, rows))
            for start, chunk in chunks:
                _add_to(base, store, chunk, ids[start : start + len(chunk)])
        except BaseException:
            self._base, self._store, self._resolved = old
            raise
        self._base, self._store = base, store
        self._ids = np.sort(ids)
        self._trained_for = n
        self._apply_search_params()

    # -- adding ------------------------------------------------------------------------------

    def add(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray, model_version: str | None = None) -> None:
        """Add embeddings under new face ids.

        Vectors are validated (2-D, this dimension, finite, non-zero), converted to contiguous
        float32 and normalised to unit length; the caller's array is not modified. All checks
        run before anything is added, so a rejected batch leaves the index unchanged.

        Args:
            ids: int64 face ids, one per row; unique, >= 0 and not already present.
            vectors: [n, dim] embeddings.
            model_version: model of the embeddings; must equal the index's (recorded on the
                first add when the index is empty and has none).

        Raises:
            IndexDimensionError: wrong shape or dimension (an :class:`EmbeddingError`).
            EmbeddingError: non-finite or zero vectors.
            IndexInputError: bad, duplicate or already present ids.
            ModelVersionMismatchError: embeddings of another model.
        """
        ids_arr = self._check_ids(ids)
        x, norms = self._check_vectors(vectors, len(ids_arr))
        self._check_model_version(model_version, adopt=True)
        if len(np.unique(ids_arr)) != len(ids_arr):
            raise IndexInputError("duplicate ids within the batch")
        present = self._present(ids_arr)
        if present.any():
            dup = ids_arr[present][:5].tolist()
            raise IndexInputError(f"ids already in the index (remove them first): {dup}")
        if len(ids_arr) == 0:
            self._adopt_version(model_version)
            return
        n_after = len(self) + len(ids_arr)
        target = _auto_factory(self.dim, n_after, self.exact_threshold) if self.is_auto else None
        if target is not None and self._needs_rebuild(target, n_after):
            # Rebuild with everything: what is stored plus the new batch.
            old_ids, old_chunks = self._stored_vectors()
            all_ids = np.concatenate([old_ids, ids_arr])
            new_chunks = ((len(old_ids) + s, c) for s, c in _normalized_chunks(x, norms))
            self._replace(all_ids, _chain(old_chunks, new_chunks), target, _StoredPlusNew(self, old_ids, x, norms), None)
        else:
            if not self._base.is_trained:
                # An explicit IVF factory trains on its first batch (auto mode never gets here).
                n = len(ids_arr)
                rows = np.sort(_rng().choice(n, min(n, _train_size(self._base)), replace=False))
                self._train(self._base, self._store, _gather_normalized(x, norms, rows))
                self._trained_for = n
            for start, chunk in _normalized_chunks(x, norms):
                _add_to(self._base, self._store, chunk, ids_arr[start : start + len(chunk)])
            self._ids = _merge_sorted(self._ids, np.sort(ids_arr))
        self._adopt_version(model_version)

    def _needs_rebuild(self, target: str, n_after: int) -> bool:
        if self.is_exact:
            return not _same_factory(target, self._resolved)
        # Approximate: regrow only when much larger than trained for and more lists are due.
        new_nlist, cur_nlist = _nlist_of(target), self.nlist
        return (
            new_nlist is not None
            and cur_nlist is not None
            and new_nlist > cur_nlist
            and n_after >= _REGROW_FACTOR * max(self._trained_for, 1)
        )

    def _stored_vectors(self) -> tuple[np.ndarray, Iterator[tuple[int, np.ndarray]]]:
        """All stored (ids, unit vectors in chunks), read back from the index itself."""
        ids = self._ids.copy()

        def chunks() -> Iterator[tuple[int, np.ndarray]]:
            for s in range(0, len(ids), _CHUNK):
                yield s, self._reconstruct(ids[s : s + _CHUNK])

        return ids, chunks()

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of present ids (refine store if any: the base may be lossy PQ)."""
        src = self._store if self._store is not None else self._base
        x = src.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        # SQ8 round trips leave |x| within ~1e-3 of 1; renormalise so a rebuild stays unit-norm.
        faiss.normalize_L2(x)
        return x

    # -- removing ----------------------------------------------------------------------------

    def remove(self, ids: Sequence[int] | np.ndarray | int) -> int:
        """Remove faces by id; ids not present are ignored.

        Returns:
            The number of faces removed.
        """
        ids_arr = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        ids_arr = ids_arr[self._present(ids_arr)]
        if len(ids_arr) == 0:
            return 0
        try:
            removed = int(self._base.remove_ids(faiss.IDSelectorBatch(ids_arr)))
        except RuntimeError as e:
            raise FaceIndexError(f"{self._resolved!r} does not support removal: {_faiss_msg(e)}") from None
        if self._store is not None:
            # Hash-table direct maps only remove by explicit id array (O(removed)).
            self._store.remove_ids(faiss.IDSelectorArray(ids_arr))
        self._ids = self._ids[~np.isin(self._ids, ids_arr, assume_unique=True)]
        if removed != len(ids_arr):  # would mean our id bookkeeping and faiss disagree
            raise FaceIndexError(f"removed {removed} of {len(ids_arr)} present ids; index inconsistent")
        return removed

    # -- searching ---------------------------------------------------------------------------

    def search(
        self, vectors: np.ndarray, k: int = 10, model_version: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored faces of each query.

        Args:
            vectors: [nq, dim] queries (or one [dim] vector); normalised here.
            k: results per query.
            model_version: model of the queries; checked against the index's when given.

        Returns:
            ``(scores, ids)``, float32 and int64 [nq, k], best first. Scores are cosine
            similarities (approximate only in the 4th decimal with SQ8 codes). Missing results
            (fewer than ``k`` faces, or none in the probed lists) have id ``-1`` and score ``-inf``.
        """
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise IndexInputError(f"k must be an integer >= 1, got {k!r}") from None
        if k < 1:
            raise IndexInputError(f"k must be >= 1, got {k}")
        x = np.asarray(vectors)
        if x.ndim == 1:
            x = x.reshape(1, -1)
        x, norms = self._check_vectors(x, None)
        self._check_model_version(model_version, adopt=False)
        q = _normalized(x, norms)
        nq = len(q)
        if len(self) == 0:
            return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
        if self._store is None:
            scores, found = self._base.search(q, k)
        else:
            scores, found = self._refined_search(q, k)
        scores = np.asarray(scores, dtype=np.float32)
        found = np.asarray(found, dtype=np.int64)
        scores[found < 0] = -np.inf
        return scores, found

    def _refined_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kc = k * self.refine_factor
        _, cand = self._base.search(q, kc)
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        for s in range(0, len(q), 256):  # bounds the reconstructed block to 256 * kc rows
            c = cand[s : s + 256]
            valid = c >= 0
            rows, cols = np.nonzero(valid)
            sc = np.full(c.shape, -np.inf, dtype=np.float32)
            if len(rows):
                vecs = self._store.reconstruct_batch(np.ascontiguousarray(c[rows, cols]))
                sc[rows, cols] = np.einsum("ij,ij->i", vecs, q[s + rows])
            kk = min(k, c.shape[1])
            top = np.argsort(-sc, axis=1, kind="stable")[:, :kk]
            out_s[s : s + len(c), :kk] = np.take_along_axis(sc, top, axis=1)
            out_i[s : s + len(c), :kk] = np.where(
                np.isfinite(out_s[s : s + len(c), :kk]), np.take_along_axis(c, top, axis=1), -1
            )
        return out_s, out_i

    # -- validation --------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise IndexInputError(f"ids must be a 1-D sequence, got shape {arr.shape}")
        if len(arr) and not np.issubdtype(arr.dtype, np.integer):
            raise IndexInputError(f"ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        if len(arr) and arr.min() < 0:
            raise IndexInputError("ids must be >= 0 (-1 means 'no result' in searches)")
        return arr

    def _check_vectors(self, vectors: np.ndarray, n_expected: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Validate shape and values chunk by chunk; return ``(array, float32 row norms)``."""
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise IndexDimensionError(self.dim, x.shape)
        if n_expected is not None and len(x) != n_expected:
            raise IndexInputError(f"{n_expected} ids for {len(x)} vectors")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise EmbeddingError(f"vectors must be numeric, got dtype {x.dtype}")
        norms = np.empty(len(x), dtype=np.float32)
        for s in range(0, len(x), _CHUNK):
            c = np.asarray(x[s : s + _CHUNK], dtype=np.float32)
            # A NaN or inf anywhere makes the row norm non-finite: one cheap test per row.
            norms[s : s + len(c)] = np.sqrt(np.einsum("ij,ij->i", c, c))
        bad = ~np.isfinite(norms)
        if bad.any():
            raise EmbeddingError(f"non-finite values in vector rows {np.flatnonzero(bad)[:5].tolist()}")
        zero = norms <= 1e-12
        if zero.any():
            raise EmbeddingError(f"zero vectors (no direction) in rows {np.flatnonzero(zero)[:5].tolist()}")
        return x, norms

    def _check_model_version(self, offered: str | None, adopt: bool) -> None:
        if offered is None or str(offered) == self.model_version:
            return
        if adopt and not self.model_version and len(self) == 0:
            return  # an empty index takes the version of its first vectors
        raise ModelVersionMismatchError(self.model_version, str(offered))

    def _adopt_version(self, offered: str | None) -> None:
        if offered is not None and not self.model_version:
            self.model_version = str(offered)

    def _present(self, ids: np.ndarray) -> np.ndarray:
        if len(self._ids) == 0 or len(ids) == 0:
            return np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        return self._ids[pos] == ids

    # -- persistence -------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "dim": self.dim,
            "factory": self.factory,
            "resolved_factory": self._resolved,
            "count": len(self),
            "model_version": self.model_version,
            "nprobe": self._nprobe,
            "ef_search": self._ef_search,
            "exact_threshold": self.exact_threshold,
            "refine_factor": self.refine_factor,
            "trained_for": self._trained_for,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically, and the ``<path>.json`` sidecar.

        Each file is written to a temporary file in the same folder, fsynced, then moved over the
        destination with ``os.replace``: a crash or error leaves the previous files intact. The
        index file alone is authoritative (it carries its own checksum); the sidecar repeats the
        metadata (dim, factory, count, model_version, checksum) for tools.
        """
        path = Path(path)
        base_bytes = faiss.serialize_index(self._base)
        store_bytes = faiss.serialize_index(self._store) if self._store is not None else np.zeros(0, np.uint8)
        meta = self._metadata()
        meta["sections"] = [len(base_bytes), len(store_bytes)]
        head = json.dumps(meta, sort_keys=True).encode()
        digest = hashlib.sha256(head)
        digest.update(memoryview(base_bytes))
        digest.update(memoryview(store_bytes))
        checksum = digest.hexdigest()

        def write_index(f: Any) -> None:
            f.write(_MAGIC)
            f.write(struct.pack("<I", len(head)))
            f.write(head)
            f.write(memoryview(base_bytes))
            f.write(memoryview(store_bytes))
            f.write(bytes.fromhex(checksum))

        _atomic_write(path, write_index)
        side = dict(meta, checksum_sha256=checksum, index_file=path.name)
        _atomic_write(_sidecar(path), lambda f: f.write(json.dumps(side, indent=2, sort_keys=True).encode()))

    @classmethod
    def load(cls, path: str | os.PathLike[str], model_version: str | None = None) -> FaceIndex:
        """Read an index written by :meth:`save`.

        Args:
            path: the index file.
            model_version: when given, the index must hold embeddings of this model.

        Raises:
            IndexNotFoundError: no file at ``path``.
            IndexCorruptError: truncated, not an index, checksum mismatch or inconsistent content.
            ModelVersionMismatchError: the index holds another model's embeddings.
        """
        path = Path(path)
        if not path.is_file():
            raise IndexNotFoundError(f"no face index at {path}")
        data = np.fromfile(path, dtype=np.uint8)
        meta, base_bytes, store_bytes = _parse(path, data)
        try:
            base = faiss.deserialize_index(base_bytes)
            store = faiss.deserialize_index(store_bytes) if len(store_bytes) else None
        except RuntimeError as e:
            raise _corrupt(path, f"faiss cannot read the payload: {_faiss_msg(e)}") from None
        del data
        try:
            idx = cls(
                int(meta["dim"]),
                str(meta["factory"]),
                nprobe=meta.get("nprobe"),
                ef_search=meta.get("ef_search"),
                model_version=str(meta.get("model_version", "")),
                exact_threshold=int(meta.get("exact_threshold", EXACT_THRESHOLD)),
                refine_factor=int(meta.get("refine_factor", _REFINE_FACTOR)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(path, f"bad header: {e}") from None
        if base.d != idx.dim or (store is not None and store.d != idx.dim):
            raise _corrupt(path, f"payload dimension {base.d} differs from header {idx.dim}")
        idx._base, idx._store, idx._resolved = base, store, str(meta["resolved_factory"])
        idx._trained_for = int(meta.get("trained_for", 0))
        idx._ids = np.sort(_all_ids(base))
        count = int(meta["count"])
        if len(idx._ids) != count or (store is not None and store.ntotal != count):
            raise _corrupt(path, f"holds {len(idx._ids)} vectors, header says {count}")
        idx._apply_search_params()
        if model_version is not None and str(model_version) != idx.model_version:
            raise ModelVersionMismatchError(idx.model_version, str(model_version))
        return idx


# -- helpers ---------------------------------------------------------------------------------------


def _faiss_msg(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _rng() -> np.random.Generator:
    # Fixed seed: the same content always trains the same index (reproducible benchmarks).
    return np.random.default_rng(_SEED)


def _find_hnsw(index: Any) -> Any:
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap):
        idx = faiss.downcast_index(idx.index)
    return idx if isinstance(idx, faiss.IndexHNSW) else None


def _nlist_of(factory: str) -> int | None:
    m = re.match(r"^\s*IVF(\d+)", factory)
    return int(m.group(1)) if m else None


def _same_factory(a: str, b: str) -> bool:
    return a.replace(" ", "") == b.replace(" ", "")


def _train_size(base: Any) -> int:
    ivf = faiss.try_extract_index_ivf(base)
    if ivf is None:
        return _CODEC_TRAIN_MAX
    return max(_COARSE_TRAIN_PER_LIST * int(ivf.nlist), _CODEC_TRAIN_MAX)


def _subsample(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.sort(_rng().choice(len(x), n, replace=False))]


def _normalized(x: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """A new C-contiguous float32 array of ``x`` rows divided by ``norms``."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    out /= norms[:, None]
    return out


def _normalized_chunks(x: np.ndarray, norms: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for s in range(0, len(x), _CHUNK):
        yield s, _normalized(x[s : s + _CHUNK], norms[s : s + _CHUNK])


def _gather_normalized(source: Any, norms: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """Unit rows ``rows`` (sorted) of an array, or of a :class:`_StoredPlusNew` view."""
    if isinstance(source, _StoredPlusNew):
        return source.rows(rows)
    out = np.array(source[rows], dtype=np.float32, order="C")
    out /= norms[rows][:, None]
    return out


class _StoredPlusNew:
    """Row access to 'vectors already in the index' followed by 'the batch being added'."""

    def __init__(self, index: FaceIndex, stored_ids: np.ndarray, new: np.ndarray, new_norms: np.ndarray):
        self.index, self.stored_ids, self.new, self.new_norms = index, stored_ids, new, new_norms

    def rows(self, rows: np.ndarray) -> np.ndarray:
        n_old = len(self.stored_ids)
        old_rows, new_rows = rows[rows < n_old], rows[rows >= n_old] - n_old
        parts = []
        if len(old_rows):
            parts.append(self.index._reconstruct(self.stored_ids[old_rows]))
        if len(new_rows):
            parts.append(_gather_normalized(self.new, self.new_norms, new_rows))
        return np.concatenate(parts) if parts else np.zeros((0, self.index.dim), np.float32)


def _chain(*iters: Iterator[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
    for it in iters:
        yield from it


def _add_to(base: Any, store: Any, x: np.ndarray, ids: np.ndarray) -> None:
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    base.add_with_ids(x, ids)
    if store is not None:
        store.add_with_ids(x, ids)


def _merge_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge two sorted disjoint int64 arrays in O(len(a) + len(b))."""
    if len(a) == 0:
        return b.copy()
    return np.insert(a, np.searchsorted(a, b), b)


def _train_centroids(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids for an IVF over unit vectors.

    Above 256 lists, two-level k-means (sqrt(nlist) groups, then each group split in proportion
    to its size): at 8192 lists on 2 cores that is minutes instead of an hour for flat k-means,
    for ~4 % fewer true matches found at equal nprobe (measured at 200k vectors).
    """
    d = x.shape[1]
    if nlist <= 256:
        km = faiss.Kmeans(d, nlist, niter=20, spherical=True, seed=seed, max_points_per_centroid=256)
        km.train(x)
        return km.centroids
    nc1 = int(round(math.sqrt(nlist)))
    km = faiss.Kmeans(d, nc1, niter=20, spherical=True, seed=seed, max_points_per_centroid=2048)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign.ravel()
    sizes = np.bincount(assign, minlength=nc1)
    alloc = _allocate(sizes, nlist)
    order = np.argsort(assign, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for g in range(nc1):
        if alloc[g] == 0:
            continue
        sub = x[order[bounds[g] : bounds[g + 1]]]
        if alloc[g] == len(sub):
            parts.append(sub.copy())
            continue
        km2 = faiss.Kmeans(d, int(alloc[g]), niter=20, spherical=True, seed=seed + 1 + g, max_points_per_centroid=256)
        km2.train(sub)
        parts.append(km2.centroids)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` centroids over groups proportionally to ``sizes``, never more than a group's size."""
    alloc = np.floor(sizes * (total / max(sizes.sum(), 1))).astype(np.int64)
    alloc = np.minimum(alloc, sizes)
    while alloc.sum() < total:  # hand out the remainder to the groups with most points per centroid
        room = sizes - alloc
        if room.max() <= 0:
            raise FaceIndexError(f"cannot train {total} lists on {sizes.sum()} vectors")
        ratio = np.where(room > 0, sizes / (alloc + 1), -1.0)
        alloc[int(np.argmax(ratio))] += 1
    return alloc


def _all_ids(base: Any) -> np.ndarray:
    """Every id stored in a faiss index (IVF lists, or the IDMap)."""
    if isinstance(base, faiss.IndexIDMap):
        return faiss.vector_to_array(base.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(base)
    if ivf is None:
        raise FaceIndexError(f"cannot list the ids of a {type(base).__name__}")
    inv = ivf.invlists
    parts = []
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n:
            ptr = inv.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, n).copy())
            inv.release_ids(lst, ptr)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a same-folder temp file + fsync + os.replace; the old file survives any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform/filesystem
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _parse(path: Path, data: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Split and verify a saved file: (metadata, base payload, store payload)."""
    m = len(_MAGIC)
    if len(data) < m + 4 or bytes(data[:m]) != _MAGIC:
        raise _corrupt(path, "not a face index file (bad magic)")
    (hlen,) = struct.unpack("<I", bytes(data[m : m + 4]))
    h0, h1 = m + 4, m + 4 + hlen
    if h1 > len(data):
        raise _corrupt(path, "truncated header")
    try:
        meta = json.loads(bytes(data[h0:h1]))
        sizes = [int(s) for s in meta["sections"]]
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(path, f"unreadable header: {e}") from None
    if meta.get("format_version") != _FORMAT_VERSION:
        raise _corrupt(path, f"unsupported format version {meta.get('format_version')!r}")
    end = h1 + sum(sizes)
    if len(data) != end + 32:
        raise _corrupt(path, f"truncated or padded: {len(data)} bytes, expected {end + 32}")
    digest = hashlib.sha256(memoryview(data[h0:h1]))
    digest.update(memoryview(data[h1:end]))
    if digest.digest() != bytes(data[end:]):
        raise _corrupt(path, "checksum mismatch")
    return meta, data[h1 : h1 + sizes[0]], data[h1 + sizes[0] : end]
