"""The approximate-nearest-neighbour index of face embeddings: a small faiss-style surface.

:class:`FaceIndex` stores unit-normalised float32 embeddings under int64 face ids and finds the
most similar faces by inner product, which on unit vectors is the cosine similarity.

``factory`` is a faiss index-factory string, or ``"auto"``: ``IDMap2,Flat`` (exact) below
``exact_threshold`` vectors (50,000), above it ``IVF{nlist},PQ{dim/2}x4fs,Refine(SQ8)``: an inverted
file with ~256 vectors per list (spherical two-level k-means, at most 8192 lists) whose lists hold
4-bit fast-scan product-quantizer codes (2 dimensions per sub-quantizer), scanned with SIMD; the
``k * refine_factor`` best candidates are re-scored with 8-bit scalar-quantised vectors (cosines
exact to ~1e-3). A factory ending in ``,Refine(<codec>)`` gets that re-ranking stage, which is ours:
faiss' ``IndexRefine`` takes neither ids nor removals. Its codes live in a small IVF with a
hash-table direct map, read back by id.

At 2M synthetic faces calibrated on real embeddings (2 shared cores, top-10, one query per call):
p50 3.5 ms, 270x faster than exact, recall@10 vs exact 0.970 / 0.955 (queries drawn like the
library / uniform over people), peak 5.9 GiB with the 3.8 GiB dataset. A plain ``IVF,SQ8`` (less
code, native removal) is as precise but scans ~1.6x slower: at 1M it needed 4.9 ms for 0.967 /
0.949 where this type needed 2.1 ms for 0.971 / 0.956. Evidence: ``docs/index.md``.

Auto mode changes type by itself: crossing ``exact_threshold`` trains the IVF on a sample of what
is stored; growing to 4x the size it was trained for rebuilds it with more lists. :meth:`rebuild`
builds from scratch at the type its size calls for. Approximate indexes never go back to exact
when shrinking (a rebuild does).

Persistence: :meth:`save` writes one self-describing file (magic, JSON header, faiss payloads,
SHA-256 over header and payloads) atomically, plus a ``<file>.json`` sidecar with the same metadata
for tools and a ``<file>.ids.npy`` of its ids. :meth:`load` verifies everything and raises
:class:`IndexNotFoundError` / :class:`IndexCorruptError`.

Between two saves, changes go to the **journal** ``<file>.journal`` (:class:`IndexJournal`):
records of added vectors and removed ids appended to the saved file, each checksummed, the file
tied to the saved index by that index's checksum. Publishing a batch appends its faces (a cost
that follows the batch, not the index); a reader that loaded the index applies only the records
written since (:meth:`FaceIndex.apply`). When the journal has grown to a share of the index, the
writer saves the whole index again and starts an empty journal. An index never mixes embedding models: it records ``model_version``
and refuses vectors (and queries, and loads) that declare another one.

Not thread-safe for writers; concurrent searches on an unchanging index are fine (faiss).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EmbeddingError, FaceRecognitionError, IndexCorruptError, IndexNotFoundError
from .process import faiss  # loaded on first use, after the process settings (OpenMP's wait policy)

__all__ = [
    "FaceIndex",
    "FaceIndexError",
    "IndexInputError",
    "IndexDimensionError",
    "EmbeddingError",
    "ModelVersionMismatchError",
    "IndexNotFoundError",
    "IndexCorruptError",
    "IndexJournal",
    "saved_ids",
    "EXACT_THRESHOLD",
]


# -- errors (IndexNotFoundError, IndexCorruptError and EmbeddingError live in errors.py) -----------


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


# -- tuning constants (evidence: docs/index.md) ----------------------------------------------------

#: Below this many vectors "auto" keeps an exact flat index.
EXACT_THRESHOLD = 50_000
_VECTORS_PER_LIST = 256  # target list size of auto IVF indexes
# A flat coarse quantizer over 8192 x 512 float32 (16 MB) costs ~0.5 ms per query; more lists
# fall out of cache.
_MIN_NLIST, _MAX_NLIST = 16, 8192
# Default nprobe: nlist // 12, but at least 64 lists (small indexes: cheap, and 1/12 finds less).
_NPROBE_DIVISOR, _MIN_NPROBE = 12, 64
_REFINE_FACTOR = 10  # default candidates re-ranked per result
_REGROW_FACTOR = 4  # an auto IVF is rebuilt with more lists at this many times its training size
# k-means sees up to 40 points per list (faiss asks for >= 39), codecs at most 65,536 points.
_COARSE_TRAIN_PER_LIST = 40
_CODEC_TRAIN_MAX = 65_536
_CHUNK = 65_536  # rows converted at a time by add/rebuild (64k x 512 x 4 B = 128 MB)
_SEED = 1234  # the same content always trains the same index

_MAGIC = b"FACEIDX\x01"
_FORMAT_VERSION = 2  # version 1 files (older codes) load as corrupt, so the library rebuilds them
_REFINE_RE = re.compile(r"^(?P<base>.+?),\s*Refine\((?P<codec>[^()]+)\)\s*$")


def _auto_factory(dim: int, n: int, exact_threshold: int) -> str:
    """The factory string "auto" resolves to for ``n`` vectors."""
    if n < exact_threshold:
        return "IDMap2,Flat"
    nlist = 2 ** round(math.log2(max(n / _VECTORS_PER_LIST, 1.0)))  # power of two nearest n / 256
    codec = f"PQ{dim // 2}x4fs" if dim % 2 == 0 else "SQ8"
    return f"IVF{min(max(nlist, _MIN_NLIST), _MAX_NLIST)},{codec},Refine(SQ8)"


class FaceIndex:
    """Nearest-face search over unit-normalised embeddings; inner product = cosine similarity.

    Args:
        dim: embedding dimension.
        factory: a faiss index-factory string (``"IDMap2,Flat"``, ``"IVF1024,SQ8"``, ``"HNSW32"``,
            ``"IVF4096,PQ256x4fs,Refine(SQ8)"`` ...) or ``"auto"`` (exact below ``exact_threshold``
            vectors, IVF fast-scan PQ with re-ranking above; see the module doc). Non-IVF indexes
            get an ``IDMap2`` wrapper so they take our ids.
        nprobe: IVF lists probed per query; ``None`` = nlist // 12, at least 64 (tuned defaults).
        ef_search: HNSW search depth, for HNSW factories; ``None`` = faiss default.
        model_version: the embedding model the vectors come from; ``""`` = not yet known (the
            first :meth:`add` declaring one records it while the index is empty).
        exact_threshold: size at which "auto" switches from exact to approximate.
        refine_factor: with a re-ranking stage, ``k * refine_factor`` candidates are re-scored.
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
        self.dim = int(dim)
        self.factory = factory.strip()
        self.model_version = str(model_version or "")
        self.exact_threshold = int(exact_threshold)
        self._refine_factor = _positive("refine_factor", refine_factor)
        self._nprobe = _positive("nprobe", nprobe)
        self._ef_search = _positive("ef_search", ef_search)
        # Sorted ids present: duplicate checks, ids(), len() without walking faiss structures.
        self._ids = np.zeros(0, dtype=np.int64)
        self._trained_for = 0
        self._resolved = _auto_factory(self.dim, 0, self.exact_threshold) if self.is_auto else self.factory
        self._base = self._build_empty(self._resolved)

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
        ivf = _ivf(self._base)
        return None if ivf is None else int(ivf.nlist)

    @property
    def nprobe(self) -> int | None:
        """IVF lists probed per query (None for non-IVF); assignable."""
        ivf = _ivf(self._base)
        return None if ivf is None else int(ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        self._nprobe = _positive("nprobe", value)
        self._apply_search_params(self._base)

    @property
    def ef_search(self) -> int | None:
        """HNSW search depth (None for non-HNSW); assignable."""
        h = _find_hnsw(self._base)
        return None if h is None else int(h.hnsw.efSearch)

    @ef_search.setter
    def ef_search(self, value: int | None) -> None:
        self._ef_search = _positive("ef_search", value)
        self._apply_search_params(self._base)

    @property
    def refine_factor(self) -> int:
        """Candidates re-scored per result (``k * refine_factor``) by a re-ranking stage; assignable."""
        return self._refine_factor

    @refine_factor.setter
    def refine_factor(self, value: int) -> None:
        self._refine_factor = _positive("refine_factor", value)
        self._apply_search_params(self._base)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, face_id: object) -> bool:
        try:
            return bool(self._present(np.array([int(face_id)], dtype=np.int64))[0])  # type: ignore[call-overload]
        except (TypeError, ValueError, OverflowError):
            return False

    def __repr__(self) -> str:
        mv = f", model_version={self.model_version!r}" if self.model_version else ""
        return f"FaceIndex(dim={self.dim}, {self._resolved!r}, n={len(self)}{mv})"

    def ids(self) -> np.ndarray:
        """All face ids present, sorted ascending (int64 copy)."""
        return self._ids.copy()

    # -- building ----------------------------------------------------------------------------

    def _build_empty(self, factory: str) -> Any:
        """An empty (untrained) faiss index for ``factory`` that takes our ids."""
        m = _REFINE_RE.match(factory)
        try:
            if m:
                faiss.index_factory(self.dim, f"IVF1,{m['codec']}")  # validate the codec now
                return _Refine(self._build_empty(m["base"]), m["codec"], self.refine_factor)
            base = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise IndexInputError(f"invalid faiss factory string {factory!r}: {_faiss_msg(e)}") from None
        # (index_factory returns the concrete class; faiss.downcast_index would return a
        # non-owning proxy, freed under our feet once the original proxy is collected.)
        ivf = faiss.try_extract_index_ivf(base)
        if ivf is None and not isinstance(base, faiss.IndexIDMap):
            base = faiss.IndexIDMap2(base)  # only IVF indexes store ids natively
        elif ivf is not None and not isinstance(base, faiss.IndexIVFFastScan):  # (block lists: no map)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # read back and remove by id
        self._apply_search_params(base)
        return base

    def _apply_search_params(self, base: Any) -> None:
        if isinstance(base, _Refine):
            base.factor = self.refine_factor
        ivf = _ivf(base)
        if ivf is not None:
            ivf.nprobe = min(self._nprobe or max(ivf.nlist // _NPROBE_DIVISOR, _MIN_NPROBE), ivf.nlist)
        h = _find_hnsw(base)
        if h is not None and self._ef_search is not None:
            h.hnsw.efSearch = self._ef_search

    def _train(self, base: Any, rows: Callable[[np.ndarray], np.ndarray], n: int) -> None:
        """Train an empty index on a sample of the ``n`` unit rows ``rows(sorted positions)``."""
        ivf = _ivf(base)
        size = _CODEC_TRAIN_MAX if ivf is None else max(_COARSE_TRAIN_PER_LIST * ivf.nlist, _CODEC_TRAIN_MAX)
        sample = rows(np.sort(_rng().choice(n, min(n, size), replace=False)))
        if ivf is not None:
            if len(sample) < ivf.nlist:
                raise FaceIndexError(
                    f"{self._resolved!r} needs at least nlist={ivf.nlist} vectors to train, got "
                    f"{len(sample)}; add more at once, call rebuild(), or use factory='auto'"
                )
            ivf.quantizer.add(_train_centroids(sample, ivf.nlist))
            ivf.quantizer.is_trained = True  # with nlist centroids present faiss trains only the codec
        if not base.is_trained:
            base.train(sample[np.sort(_rng().choice(len(sample), min(len(sample), _CODEC_TRAIN_MAX), replace=False))])

    def _replace(self, ids: np.ndarray, rows: Callable[[np.ndarray], np.ndarray], factory: str) -> None:
        """Build a fresh ``factory`` index of ``ids`` (unit vectors ``rows(positions)``); swap it in when complete."""
        old = self._resolved
        self._resolved = factory  # error messages of _train name the index being built
        try:
            base = self._build_empty(factory)
            if not base.is_trained:
                self._train(base, rows, len(ids))
            for s in range(0, len(ids), _CHUNK):
                base.add_with_ids(rows(np.arange(s, min(s + _CHUNK, len(ids)))), ids[s : s + _CHUNK])
        except BaseException:
            self._resolved = old
            raise
        self._base, self._ids, self._trained_for = base, np.sort(ids), len(ids)

    def rebuild(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray, model_version: str | None = None) -> None:
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
        self._replace(np.ascontiguousarray(ids_arr), lambda r: _normalized(x, norms, r), factory)
        if model_version is not None:
            self.model_version = str(model_version)

    # -- adding and removing -----------------------------------------------------------------

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
        ids_arr = np.ascontiguousarray(self._check_ids(ids))
        x, norms = self._check_vectors(vectors, len(ids_arr))
        self._check_model_version(model_version, adopt=True)
        if len(np.unique(ids_arr)) != len(ids_arr):
            raise IndexInputError("duplicate ids within the batch")
        present = self._present(ids_arr)
        if present.any():
            raise IndexInputError(f"ids already in the index (remove them first): {ids_arr[present][:5].tolist()}")
        if len(ids_arr):
            n_old, n_after = len(self), len(self) + len(ids_arr)
            target = _auto_factory(self.dim, n_after, self.exact_threshold) if self.is_auto else None
            if target is not None and self._needs_rebuild(target, n_after):
                old_ids = self._ids.copy()  # rebuild with everything: what is stored, then the batch

                def rows(r: np.ndarray) -> np.ndarray:
                    old, new = r[r < n_old], r[r >= n_old] - n_old
                    return np.concatenate([self._reconstruct(old_ids[old]), _normalized(x, norms, new)])

                self._replace(np.concatenate([old_ids, ids_arr]), rows, target)
            else:
                if not self._base.is_trained:  # an explicit IVF factory trains on its first batch
                    self._train(self._base, lambda r: _normalized(x, norms, r), len(ids_arr))
                    self._trained_for = len(ids_arr)
                for s in range(0, len(ids_arr), _CHUNK):
                    r = np.arange(s, min(s + _CHUNK, len(ids_arr)))
                    self._base.add_with_ids(_normalized(x, norms, r), ids_arr[r])
                self._ids = np.insert(self._ids, np.searchsorted(self._ids, np.sort(ids_arr)), np.sort(ids_arr))
        if model_version is not None and not self.model_version:
            self.model_version = str(model_version)

    def _needs_rebuild(self, target: str, n_after: int) -> bool:
        if self.is_exact:
            return target.replace(" ", "") != self._resolved.replace(" ", "")
        # Approximate: regrow only when much larger than trained for and more lists are due.
        m = re.match(r"IVF(\d+)", target)
        return m is not None and int(m.group(1)) > (self.nlist or 0) and n_after >= _REGROW_FACTOR * self._trained_for

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored unit vectors of present ids (SQ8 round trips are renormalised)."""
        x = self._base.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        faiss.normalize_L2(x)
        return x

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
            removed = _remove(self._base, ids_arr)
        except RuntimeError as e:
            raise FaceIndexError(f"{self._resolved!r} does not support removal: {_faiss_msg(e)}") from None
        self._ids = self._ids[~np.isin(self._ids, ids_arr, assume_unique=True)]
        if removed != len(ids_arr):  # would mean our id bookkeeping and faiss disagree
            raise FaceIndexError(f"removed {removed} of {len(ids_arr)} present ids; index inconsistent")
        return removed

    # -- searching ---------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int = 10, model_version: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored faces of each query.

        Args:
            vectors: [nq, dim] queries (or one [dim] vector); normalised here.
            k: results per query.
            model_version: model of the queries; checked against the index's when given.

        Returns:
            ``(scores, ids)``, float32 and int64 [nq, k], best first. Scores are cosine
            similarities (to ~1e-3 with SQ8 codes). Missing results (fewer than ``k`` faces, or
            none in the probed lists) have id ``-1`` and score ``-inf``.
        """
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise IndexInputError(f"k must be an integer >= 1, got {k!r}") from None
        if k < 1:
            raise IndexInputError(f"k must be >= 1, got {k}")
        x = np.asarray(vectors)
        x, norms = self._check_vectors(x.reshape(1, -1) if x.ndim == 1 else x, None)
        self._check_model_version(model_version, adopt=False)
        if len(self) == 0:
            return np.full((len(x), k), -np.inf, dtype=np.float32), np.full((len(x), k), -1, dtype=np.int64)
        scores, found = self._base.search(_normalized(x, norms, np.arange(len(x))), k)
        scores = np.asarray(scores, dtype=np.float32)
        found = np.asarray(found, dtype=np.int64)
        scores[found < 0] = -np.inf
        return scores, found

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
            "trained_for": self._trained_for,
            "refine_factor": self.refine_factor,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically, and the ``<path>.json`` sidecar.

        Each file is written to a temporary file in the same folder, fsynced, then moved over the
        destination with ``os.replace``: a crash or error leaves the previous files intact. The
        index file alone is authoritative (it carries its own checksum); the sidecar repeats the
        metadata (dim, factory, count, model_version, checksum) for tools.
        """
        path = Path(path)
        sections = _serialize(self._base)
        meta = dict(self._metadata(), sections=[len(b) for b in sections])
        head = json.dumps(meta, sort_keys=True).encode()
        digest = hashlib.sha256(head)
        for b in sections:
            digest.update(memoryview(b))
        checksum = digest.hexdigest()

        def write_index(f: Any) -> None:
            f.write(_MAGIC + struct.pack("<I", len(head)) + head)
            for b in sections:
                f.write(memoryview(b))
            f.write(bytes.fromhex(checksum))

        _atomic_write(path, write_index)
        side = json.dumps(dict(meta, checksum_sha256=checksum, index_file=path.name), indent=2, sort_keys=True)
        _atomic_write(path.with_name(path.name + ".json"), lambda f: f.write(side.encode()))
        _atomic_write(path.with_name(path.name + ".ids.npy"),
                      lambda f: np.save(f, np.concatenate([np.frombuffer(bytes.fromhex(checksum), np.int64),
                                                           self._ids])))
        IndexJournal(path).reset(bytes.fromhex(checksum))

    def apply(self, records: list[tuple[int, np.ndarray, np.ndarray | None]]) -> int:
        """Apply journal records (see :class:`IndexJournal`) in order: adds of ids not present,
        removals of ids present. Returns the number of vectors added or removed."""
        changed = 0
        for op, ids, vectors in records:
            if op == IndexJournal.ADD:
                new = ~self._present(ids)
                if new.any():
                    self.add(ids[new], vectors[new])
                    changed += int(new.sum())
            else:
                changed += self.remove(ids)
        return changed

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
        meta, sections = _parse(path, np.fromfile(path, dtype=np.uint8))
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
            idx._resolved, count = str(meta["resolved_factory"]), int(meta["count"])
            idx._trained_for = int(meta.get("trained_for", 0))
            base = _deserialize(sections, idx._resolved, idx.refine_factor)
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(path, f"bad header: {e}") from None
        except RuntimeError as e:
            raise _corrupt(path, f"faiss cannot read the payload: {_faiss_msg(e)}") from None
        if base.d != idx.dim:
            raise _corrupt(path, f"payload dimension {base.d} differs from header {idx.dim}")
        idx._base, idx._ids = base, np.sort(_all_ids(base))
        if len(idx._ids) != count:
            raise _corrupt(path, f"holds {len(idx._ids)} vectors, header says {count}")
        idx._apply_search_params(base)
        if model_version is not None and str(model_version) != idx.model_version:
            raise ModelVersionMismatchError(idx.model_version, str(model_version))
        return idx


class IndexJournal:
    """The changes made to a saved index since it was written: ``<index file>.journal``.

    Layout: ``FACEJRN1``, then the 32-byte checksum of the index file it follows (the last 32
    bytes of that file), then records: ``FJR1``, op (1 add, 2 remove), count and dimension
    (uint32 each), the int64 ids, for an add the float32 vectors, and the first 8 bytes of the
    SHA-256 of everything before it in the record. Records are only appended; a record cut short
    by a crash, and anything after it, is ignored by readers and cut off by the next writer.
    Appending is for one process at a time (the library holds the catalog's lock).
    """

    ADD, REMOVE = 1, 2
    _HEAD = b"FACEJRN1"
    _REC = b"FJR1"

    def __init__(self, index_path: str | os.PathLike[str]):
        self.index_path = Path(index_path)
        self.path = self.index_path.with_name(self.index_path.name + ".journal")

    def index_checksum(self) -> bytes | None:
        """The checksum that ends the saved index file (None when there is none)."""
        try:
            with open(self.index_path, "rb") as f:
                f.seek(-32, os.SEEK_END)
                return f.read(32)
        except (FileNotFoundError, OSError):
            return None

    def size(self) -> int:
        """Bytes in the journal file (0 when there is none)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def reset(self, checksum: bytes) -> None:
        """Start an empty journal for the index whose checksum is ``checksum`` (after a save)."""
        _atomic_write(self.path, lambda f: f.write(self._HEAD + checksum))

    def read(self, checksum: bytes | None, offset: int = 0) -> tuple[list[tuple[int, np.ndarray, np.ndarray | None]], int]:
        """Records from byte ``offset`` on (0: all), if the journal follows the index of
        ``checksum``; returns them and the offset after the last whole record."""
        start = len(self._HEAD) + 32
        try:
            with open(self.path, "rb") as f:
                head = f.read(start)
                if checksum is None or head != self._HEAD + checksum:
                    return [], start  # no journal, or one of another saved index
                f.seek(max(offset, start))
                data = f.read()
        except FileNotFoundError:
            return [], start
        records, pos = [], 0
        while pos + 16 <= len(data) and data[pos:pos + 4] == self._REC:
            op, n, dim = struct.unpack("<III", data[pos + 4:pos + 16])
            body = 16 + 8 * n + (4 * n * dim if op == self.ADD else 0)
            end = pos + body + 8
            if end > len(data) or hashlib.sha256(data[pos:pos + body]).digest()[:8] != data[pos + body:end]:
                break
            ids = np.frombuffer(data, np.int64, n, pos + 16).copy()
            vectors = (np.frombuffer(data, np.float32, n * dim, pos + 16 + 8 * n).reshape(n, dim).copy()
                       if op == self.ADD else None)
            records.append((op, ids, vectors))
            pos = end
        return records, max(offset, start) + pos

    def _follows(self, checksum: bytes) -> bool:
        try:
            with open(self.path, "rb") as f:
                return f.read(len(self._HEAD) + 32) == self._HEAD + checksum
        except FileNotFoundError:
            return False

    def append(self, checksum: bytes, records: list[tuple[int, np.ndarray, np.ndarray | None]],
               offset: int = 0) -> int:
        """Append records to the journal of the index of ``checksum`` (started anew if missing or
        of another index; a torn record after ``offset``, a position known whole, is cut off),
        durably; returns the journal's size after them."""
        if not self._follows(checksum):
            self.reset(checksum)
        _, end = self.read(checksum, offset)
        with open(self.path, "r+b") as f:
            f.truncate(end)
            f.seek(end)
            for op, ids, vectors in records:
                ids = np.ascontiguousarray(ids, np.int64)
                dim = 0 if vectors is None else vectors.shape[1]
                body = self._REC + struct.pack("<III", op, len(ids), dim) + ids.tobytes()
                if op == self.ADD:
                    body += np.ascontiguousarray(vectors, np.float32).tobytes()
                f.write(body + hashlib.sha256(body).digest()[:8])
            f.flush()
            os.fsync(f.fileno())
            return f.tell()


def saved_ids(index_path: str | os.PathLike[str]) -> np.ndarray | None:
    """The ids of the saved index (sorted), from its ``.ids.npy`` sidecar (led by the index's
    checksum), without loading the index; None when the sidecar is missing or of another save."""
    path = Path(index_path)
    try:
        data = np.load(path.with_name(path.name + ".ids.npy"))
    except (FileNotFoundError, ValueError, OSError):
        return None
    checksum = IndexJournal(path).index_checksum()
    if checksum is None or len(data) < 4 or data[:4].tobytes() != checksum:
        return None
    return data[4:]


def sorted_member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` are in ``sorted_ids`` (sorted, unique), by a binary search each: the big
    array is neither copied nor sorted again, as the set routines of numpy would."""
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


# -- helpers ---------------------------------------------------------------------------------------


def _positive(name: str, value: Any) -> Any:
    if value is not None and int(value) < 1:
        raise IndexInputError(f"{name} must be >= 1, got {value}")
    return None if value is None else int(value)


def _faiss_msg(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _rng() -> np.random.Generator:
    return np.random.default_rng(_SEED)


class _Refine:
    """Candidates of ``base`` re-scored with ``codec`` codes read back by id.

    The codes live in an IVF with a hash-table direct map (64 lists when trained on enough
    vectors, so that no single code array doubles its capacity at once: +1 GB transient at 2M).
    """

    def __init__(self, base: Any, codec: str, factor: int, store: Any = None):
        self.base, self.codec, self.factor, self.store, self.d = base, codec, factor, store, base.d

    @property
    def is_trained(self) -> bool:
        return bool(self.base.is_trained and self.store is not None)

    def train(self, x: np.ndarray) -> None:
        if not self.base.is_trained:
            self.base.train(x)
        lists = 64 if len(x) >= 64 * 256 else 1
        self.store = faiss.index_factory(self.d, f"IVF{lists},{self.codec}", faiss.METRIC_INNER_PRODUCT)
        self.store.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.store.train(x)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        self.base.add_with_ids(x, ids)
        self.store.add_with_ids(x, ids)

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        return self.store.reconstruct_batch(ids)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(q) > 256:  # bounds the vectors read back to 256 * k * factor at a time
            parts = [self.search(q[s : s + 256], k) for s in range(0, len(q), 256)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        cand = self.base.search(q, k * self.factor)[1]
        scores = np.full(cand.shape, -np.inf, dtype=np.float32)
        rows, cols = np.nonzero(cand >= 0)
        if len(rows):
            vecs = self.store.reconstruct_batch(np.ascontiguousarray(cand[rows, cols]))
            scores[rows, cols] = np.einsum("ij,ij->i", vecs, q[rows])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, 1), np.take_along_axis(cand, top, 1)


def _ivf(index: Any) -> Any:
    return faiss.try_extract_index_ivf(index.base if isinstance(index, _Refine) else index)


def _remove(index: Any, ids: np.ndarray) -> int:
    """Remove ``ids`` (all present); returns how many the (base) index removed."""
    if isinstance(index, _Refine):
        _remove(index.store, ids)
        return _remove(index.base, ids)
    ivf = faiss.try_extract_index_ivf(index)
    # A hash-table direct map only removes by an explicit id array (O(removed)); the others scan
    # everything and test membership, which a batch selector (hash set) makes O(1).
    direct = ivf is not None and ivf.direct_map.type == faiss.DirectMap.Hashtable
    return int(index.remove_ids((faiss.IDSelectorArray if direct else faiss.IDSelectorBatch)(ids)))


def _serialize(index: Any) -> list[np.ndarray]:
    parts = [index.base, index.store] if isinstance(index, _Refine) else [index]
    return [faiss.serialize_index(i) for i in parts]


def _deserialize(sections: list[np.ndarray], resolved: str, factor: int) -> Any:
    parts = [faiss.deserialize_index(s) for s in sections]
    m = _REFINE_RE.match(resolved)
    if (m is not None) != (len(parts) == 2) or not 1 <= len(parts) <= 2:
        raise ValueError(f"{len(parts)} payloads for {resolved!r}")
    return _Refine(parts[0], m["codec"], factor, parts[1]) if m else parts[0]


def _find_hnsw(index: Any) -> Any:
    idx = faiss.downcast_index(index.base if isinstance(index, _Refine) else index)
    if isinstance(idx, faiss.IndexIDMap):
        idx = faiss.downcast_index(idx.index)
    return idx if isinstance(idx, faiss.IndexHNSW) else None


def _normalized(x: np.ndarray, norms: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A new C-contiguous float32 array of unit rows ``rows`` (sorted) of ``x``."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:  # a contiguous range: slice, no gather
        out = np.array(x[rows[0] : rows[-1] + 1], dtype=np.float32, order="C", copy=True)
    else:
        out = np.array(x[rows], dtype=np.float32, order="C")
    out /= norms[rows][:, None]
    return out


def _train_centroids(x: np.ndarray, nlist: int) -> np.ndarray:
    """Spherical k-means centroids for an IVF over unit vectors.

    Above 256 lists, two-level k-means (sqrt(nlist) groups, then each group split in proportion
    to its size): on 2 cores minutes instead of an hour for thousands of lists, for a few % fewer
    true neighbours found at equal nprobe.
    """
    d = x.shape[1]

    def kmeans(data: np.ndarray, k: int, seed: int, per_centroid: int) -> np.ndarray:
        km = faiss.Kmeans(d, k, niter=20, spherical=True, seed=seed, max_points_per_centroid=per_centroid)
        km.train(data)
        return km.centroids

    if nlist <= 256:
        return kmeans(x, nlist, _SEED, 256)
    nc1 = int(round(math.sqrt(nlist)))
    top = faiss.IndexFlatIP(d)
    top.add(kmeans(x, nc1, _SEED, 2048))
    assign = top.search(x, 1)[1].ravel()
    sizes = np.bincount(assign, minlength=nc1)
    # Split nlist over the groups in proportion to their sizes, never more than a group's size.
    alloc = np.minimum(np.floor(sizes * (nlist / max(sizes.sum(), 1))).astype(np.int64), sizes)
    while alloc.sum() < nlist:  # the remainder goes to the groups with most points per centroid
        room = sizes - alloc
        if room.max() <= 0:
            raise FaceIndexError(f"cannot train {nlist} lists on {sizes.sum()} vectors")
        alloc[int(np.argmax(np.where(room > 0, sizes / (alloc + 1), -1.0)))] += 1
    parts = []
    for g in np.flatnonzero(alloc):
        sub = x[assign == g]
        parts.append(sub if alloc[g] == len(sub) else kmeans(sub, int(alloc[g]), _SEED + 1 + int(g), 256))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _all_ids(base: Any) -> np.ndarray:
    """Every id stored in a faiss index (IVF lists, or the IDMap)."""
    if isinstance(base, faiss.IndexIDMap):
        return faiss.vector_to_array(base.id_map).astype(np.int64)
    ivf = _ivf(base)
    if ivf is None:
        raise FaceIndexError(f"cannot list the ids of a {type(base).__name__}")
    inv, parts = ivf.invlists, [np.zeros(0, dtype=np.int64)]
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n:
            ptr = inv.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, n).copy())
            inv.release_ids(lst, ptr)
    return np.concatenate(parts)


def _atomic_write(path: Path, write: Callable[[Any], object]) -> None:
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
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform/filesystem
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _parse(path: Path, data: np.ndarray) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Split and verify a saved file: (metadata, faiss payloads)."""
    m = len(_MAGIC)
    if len(data) < m + 4 or bytes(data[:m]) != _MAGIC:
        raise _corrupt(path, "not a face index file (bad magic)")
    h0, h1 = m + 4, m + 4 + struct.unpack("<I", bytes(data[m : m + 4]))[0]
    if h1 + 32 > len(data):
        raise _corrupt(path, "truncated header")
    try:
        meta = json.loads(bytes(data[h0:h1]))
        sizes = [int(n) for n in meta["sections"]]
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(path, f"unreadable header: {e}") from None
    if meta.get("format_version") != _FORMAT_VERSION:
        raise _corrupt(path, f"unsupported format version {meta.get('format_version')!r}")
    if len(data) != h1 + sum(sizes) + 32:
        raise _corrupt(path, f"truncated or padded: {len(data)} bytes, expected {h1 + sum(sizes) + 32}")
    digest = hashlib.sha256(memoryview(data[h0:h1]))
    digest.update(memoryview(data[h1:-32]))
    if digest.digest() != bytes(data[-32:]):
        raise _corrupt(path, "checksum mismatch")
    ends = np.cumsum([h1, *sizes])
    return meta, [data[a:b] for a, b in zip(ends[:-1], ends[1:])]
