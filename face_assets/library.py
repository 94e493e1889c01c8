"""``FaceRecognitionLibrary``: the API a client team imports (spec 2.2).

The DuckDB catalog is the source of truth; the faiss index is derived from it and persisted beside
it. Every image is committed to the catalog before its faces enter the index, and the index is
saved every ``storage.index_save_every`` images and on ``save()``/``close()``. When the library
opens, it reconciles the index with the catalog (adds faces the index misses, drops ids the catalog
no longer has, rebuilds a missing or corrupt index), so a crash at any point loses nothing that
was reported as indexed and duplicates nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import registry
from .audit import ACTOR
from .config import Settings, load_settings
from .errors import (EmbeddingError, FeedbackError, ImageLoadError, IndexCorruptError, IndexNotFoundError,
                     ModelVersionError, NoFaceDetectedError, NotAResultError, TrainingError, UnknownFaceError, UnknownQueryError)
from .feedback import VOTES, ExportReport, FeedbackStore, QueryRecord, Vote, export_feedback, save_query_image
from .imaging import content_hash
from .index import FaceIndex, IndexJournal, saved_ids
from .ingest import ImageOutcome, IngestSummary, ProgressCallback, ingest_paths, iter_image_files
from .models import embedding_dim_of, resolve_pack
from .process import apply_process_settings
from .schemas import FilterResult, ImageAnalysis
from .storage import file_stamp
from .store import Catalog

if TYPE_CHECKING:
    from .clustering import ReclusterDecision
    from .filtering import FaceFilter
    from .persons import ClusterInfo, ClusterRun, PersonClusters

logger = logging.getLogger(__name__)

_RECENT_QUERIES = 10_000
"""Feedback queries a library keeps in memory for the votes that follow them."""


@dataclass
class SearchResult:
    """One match: which face, in which image, how similar (cosine, -1..1), and whether that is the same person.

    ``is_match``: the similarity reaches the running model version's match threshold.
    """

    face_id: int
    image_id: str
    path: str
    bbox: list[float]
    similarity: float
    metadata: dict | None = None
    cluster_id: int | None = None
    is_match: bool = False


@dataclass
class IndexedImage:
    """What ``index_image`` did: the image id, its status, the faces stored and those rejected."""

    image_id: str
    path: str
    status: str
    rejection_reason: str | None
    indexed: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    error: str | None = None


@dataclass
class FeedbackQuery:
    """A search people can vote on: its ``query_id``, the face searched, and the results.

    ``faces`` holds the boxes of every face found in an uploaded query image (the catalog face alone
    for a catalog query) and ``face_index`` the one searched, so that a page can offer the others.
    """

    query_id: str
    bbox: list[float]
    query_face_id: int | None
    results: list[SearchResult]
    faces: list[list[float]] = field(default_factory=list)
    face_index: int = 0


@dataclass
class Comparison:
    """1:1 verification: cosine similarity of the two main faces, the decision and its threshold."""

    similarity: float
    is_match: bool
    threshold: float


def _metadata_dict(metadata: Any) -> dict | None:
    """Metadata given as a dict, a dataclass, a pydantic model or any object with attributes."""
    if metadata is None or isinstance(metadata, dict):
        return metadata
    if dataclasses.is_dataclass(metadata) and not isinstance(metadata, type):
        return dataclasses.asdict(metadata)
    if hasattr(metadata, "model_dump"):
        return metadata.model_dump()
    if hasattr(metadata, "__dict__"):
        return {k: v for k, v in vars(metadata).items() if not k.startswith("_")}
    raise TypeError(f"metadata must be a dict or an object with attributes, not {type(metadata).__name__}")


class FaceRecognitionLibrary:
    """Index, search and compare faces; persist everything under ``index_dir``.

    Args:
        config_path: YAML/TOML config file (default: ``$FACE_ASSETS_CONFIG`` or built-in defaults).
        index_dir: folder of the catalog and index (default ``storage.data_dir``, i.e. ``data/``).
        model_name: model pack name or folder (default ``models.pack``, i.e. buffalo_s).

    Use as a context manager, or call :meth:`close` to save the index and release the catalog.
    """

    def __init__(self, config_path: str | os.PathLike | None = None, index_dir: str | os.PathLike | None = None,
                 model_name: str | None = None, *, settings: Settings | None = None):
        overrides: dict[str, Any] = {}
        if index_dir is not None:
            overrides["storage"] = {"data_dir": str(index_dir)}
        if model_name is not None:
            overrides["models"] = {"pack": model_name}
        self.settings = settings or load_settings(config_path, overrides=overrides or None)
        apply_process_settings(self.settings)  # the first entry point of the process wins
        self.index_dir = Path(self.settings.storage.data_dir)
        self._lock = threading.RLock()
        self._filter: FaceFilter | None = None
        self._pack = resolve_pack(self.settings.models)
        self._model_file = self._pack.recognizer
        self.catalog: Catalog | None = None
        self._index: FaceIndex | None = None
        self._index_sum: bytes | None = None  # checksum of the saved index ours was read from
        self._journal_end = 0  # bytes of its journal applied to ours
        self._pending: list[tuple[int, np.ndarray, np.ndarray | None]] = []  # our changes not saved yet
        self._full_save = False  # ours replaced the index as a whole: save it whole
        self._index_stamp: tuple[int, int] | None = None
        self._index_checked = 0.0
        self._index_loading = threading.Lock()  # held while a newer published index is read, off self._lock
        self._unsaved = 0
        self._feedback: FeedbackStore | None = None
        self._queries: OrderedDict[str, dict] = OrderedDict()
        self.load()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def filter(self) -> FaceFilter:
        """Detector, recognizer (the active version) and cartoon classifier, loaded on first use.

        Reading tables, listing, clustering and index upkeep never load a model.
        """
        from .filtering import FaceFilter  # the models' modules, imported with the first model

        with self._lock:
            if self._filter is None:
                face_filter = FaceFilter(self.settings)
                face_filter.analyzer.use_recognizer(self._model_file)
                self._filter = face_filter
            return self._filter

    @property
    def model_version(self) -> str:
        """Version tag of the embeddings this library produces and searches."""
        return dataclasses.replace(self._pack, recognizer=self._model_file).model_version

    @property
    def embedding_dim(self) -> int:
        """Length of the embeddings of the active recognizer (read from its file, no model loaded)."""
        return embedding_dim_of(str(self._model_file))

    @property
    def index_path(self) -> Path:
        """File of the persisted faiss index."""
        return self.settings.layout.index

    def load(self) -> None:
        """(Re)open the catalog and the index, repairing the index from the catalog if they disagree."""
        with self._lock:
            self._close_stores()
            self.catalog = Catalog.open(self.settings.storage)
            from .persons import ClusterStore  # clustering imports scipy: only for libraries that open a catalog

            self._clusters = ClusterStore(self.catalog, self.settings.layout.former_audit_log,
                                          self.settings.layout.cluster_means)
            self._select_model()
            self._index = None  # read on first use: stats, lists and curation never load it

    @property
    def index(self) -> FaceIndex:
        """The faiss index of the active model version, read on first use and repaired from the
        catalog if they disagree."""
        with self._lock:
            if self._index is None:
                self._index = self._read_index()
                if self._reconcile():
                    self._save_index()
            return self._index

    @index.setter
    def index(self, value: FaceIndex) -> None:
        """Replace the index as a whole (a clear, another model): the next save writes it whole."""
        self._index, self._pending, self._full_save = value, [], True

    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add faces to the index, and to the changes the next save appends to its journal."""
        ids = np.asarray(ids, np.int64)
        vectors = np.asarray(vectors, np.float32)
        self.index.add(ids, vectors)
        self._pending.append((IndexJournal.ADD, ids, vectors))

    def _remove(self, ids: np.ndarray) -> None:
        """Remove faces from the index, and record it for the journal."""
        ids = np.asarray(ids, np.int64)
        if self.index.remove(ids):
            self._pending.append((IndexJournal.REMOVE, ids, None))

    def _read_index(self) -> FaceIndex:
        """The saved index of the active model version, or a new empty one (missing, corrupt, other version)."""
        try:
            index = FaceIndex.load(self.index_path)
            stamp = self._stamp()
            if index.model_version != self.model_version:
                logger.warning("index holds %s embeddings, library uses %s: rebuilding",
                               index.model_version, self.model_version)
                index = None
        except IndexNotFoundError:
            index, stamp = None, None
        except IndexCorruptError as exc:
            logger.warning("index %s is corrupt (%s): rebuilding from the catalog", self.index_path, exc)
            index, stamp = None, None
        self._index_stamp = stamp
        self._index_checked = time.monotonic()
        self._pending, self._full_save = [], index is None
        if index is None:
            self._index_sum, self._journal_end = None, 0
            return self._new_index()
        journal = IndexJournal(self.index_path)
        self._index_sum = journal.index_checksum()
        records, self._journal_end = journal.read(self._index_sum)
        index.apply(records)
        return index

    def _stamp(self) -> tuple[int, int] | None:
        return file_stamp(self.index_path)

    def refresh(self, wait: bool = True) -> bool:
        """Load the index again if another process (the pipeline, a CLI command) published a newer one.

        A running service calls it before each search, at most every ``storage.index_refresh_seconds``,
        so newly indexed faces become searchable without a restart. Faces another process appended
        to the published index's journal are applied at once (a cost that follows them). A new index
        saved whole is read by one thread at a time, outside the library's lock: with ``wait=False``
        (what searches do) on a thread of its own, while searches go on with the index in memory, so
        no search waits for the read; the process then holds two indexes until the swap. An index of
        another model version (a promotion made elsewhere) switches this library to the registry's
        active version first. Returns whether this call changed the index.
        """
        with self._lock:
            if not wait and self._index_loading.locked():
                return False  # a newer index is being read: go on with this one
            if time.monotonic() - self._index_checked < self.settings.storage.index_refresh_seconds:
                return False
            self._index_checked = time.monotonic()
            if self._unsaved or self._index is None:
                return False
            if self._stamp() == self._index_stamp:
                # The same saved index: apply what other processes appended to its journal since.
                records, end = IndexJournal(self.index_path).read(self._index_sum, self._journal_end)
                if not records:
                    return False
                self._index.apply(records)
                self._journal_end = end
                logger.info("applied %d index changes published by another process", len(records))
                return True
            if not wait:
                threading.Thread(target=self._load_published, name="index-loader", daemon=True).start()
                return False
        return self._load_published()

    def _load_published(self) -> bool:
        """Read the published index outside the library's lock, one reader at a time, and swap it in;
        True when swapped."""
        with self._index_loading:
            with self._lock:
                if self._stamp() == self._index_stamp:
                    return False  # read by the thread before this one
            index = None
            try:
                index = FaceIndex.load(self.index_path)
            except (IndexNotFoundError, IndexCorruptError) as exc:
                logger.warning("published index %s not loaded: %s", self.index_path, exc)
            with self._lock:
                if index is None or self._unsaved:
                    return False
                if index.model_version != self.model_version:
                    self._select_model()
                    if index.model_version != self.model_version:
                        return False  # a half-finished switch elsewhere: keep searching the index we have
                    logger.info("now running model %s (%s), promoted by another process", self.active_model,
                                self.model_version)
                journal = IndexJournal(self.index_path)
                checksum = journal.index_checksum()
                records, end = journal.read(checksum)
                index.apply(records)
                self._index, self._index_stamp, self._index_sum, self._journal_end = index, self._stamp(), checksum, end
                self._pending, self._full_save = [], False
        logger.info("loaded the index published at %s: %d faces", self.index_path, len(index))
        return True

    def save(self) -> Path:
        """Write the index atomically next to the catalog and publish the catalog; returns the index path."""
        with self._lock:
            self._save_index()
            self.catalog.checkpoint()
            return self.index_path

    def _save_index(self) -> None:
        """Append our changes to the saved index's journal (a cost that follows the change), or save
        the index whole: after a replacement, or when the journal has grown to a share of the index."""
        # Under the catalog's write lock: two processes never interleave their index and catalog writes.
        with self.catalog.db.locked():
            journal = IndexJournal(self.index_path)
            checksum = journal.index_checksum()
            whole = self._full_save or checksum is None or checksum != self._index_sum
            if not whole:
                others, end = journal.read(checksum, self._journal_end)
                self.index.apply(others)  # what other processes appended since we read it
                size = journal.size() + sum(8 * len(i) + (0 if v is None else v.nbytes) for _, i, v in self._pending)
                whole = size > max(self.settings.storage.index_journal_min_bytes,
                                   self.settings.storage.index_journal_share * self.index_path.stat().st_size)
            if whole:
                if checksum is not None and checksum != self._index_sum and not self._full_save:
                    # Another process saved the index whole since this one read it: take in its faces
                    # (and drop what it removed) from the catalog, which holds both processes' commits.
                    self._reconcile()
                self.index.save(self.index_path)
                self._index_sum = journal.index_checksum()
                self._journal_end = journal.size()
            elif self._pending:
                self._journal_end = journal.append(checksum, self._pending, end)
            else:
                self._journal_end = end
        self._pending, self._full_save = [], False
        self._index_stamp = self._stamp()
        self._unsaved = 0

    def published_ids(self) -> np.ndarray | None:
        """The face ids the published index holds with its journal applied (sorted), read without
        loading the index; None when it cannot be told that way (no index, an older file)."""
        base = saved_ids(self.index_path)
        if base is None or _index_sidecar(self.index_path).get("model_version") != self.model_version:
            return None
        journal = IndexJournal(self.index_path)
        records, _ = journal.read(journal.index_checksum())
        if not records:
            return base
        # The journal's last word on each id decides (in arrays: Python sets of 2M ids cost seconds).
        ids = np.concatenate([r[1] for r in records])
        added = np.concatenate([np.full(len(r[1]), r[0] == IndexJournal.ADD) for r in records])
        last_ids, first_from_end = np.unique(ids[::-1], return_index=True)
        last_added = added[::-1][first_from_end]
        return np.union1d(np.setdiff1d(base, last_ids[~last_added], assume_unique=True), last_ids[last_added])

    def publish_index(self) -> dict:
        """Bring the published index up to date with the catalog, as the pipeline does after a merge.

        The faces the index misses are appended to its journal, the removed ones recorded there,
        without loading the index: the cost follows the batch. Without a usable saved index (none
        yet, another model version's) or once the journal has grown to a share of the index, the
        index is loaded, repaired and saved whole. Returns what was done (``mode``: ``journal`` or
        ``whole``), faces added and removed, and the index size.
        """
        with self._lock, self.catalog.db.locked():
            expected = self.catalog.valid_face_ids(self.model_version)
            held = self.published_ids()
            journal = IndexJournal(self.index_path)
            limit = max(self.settings.storage.index_journal_min_bytes,
                        self.settings.storage.index_journal_share * (self.index_path.stat().st_size
                                                                     if self.index_path.is_file() else 0))
            if held is None or self._unsaved or journal.size() > limit:
                before = held if held is not None else np.zeros(0, np.int64)
                self.index  # noqa: B018 - loaded and repaired from the catalog
                self._full_save = True
                self._save_index()
                return {"mode": "whole", "added": int(np.setdiff1d(expected, before).size),
                        "removed": int(np.setdiff1d(before, expected).size), "index_size": int(len(expected))}
            add = np.setdiff1d(expected, held, assume_unique=True)
            remove = np.setdiff1d(held, expected, assume_unique=True)
            records: list[tuple[int, np.ndarray, np.ndarray | None]] = []
            if len(remove):
                records.append((IndexJournal.REMOVE, remove, None))
            if len(add):
                ids, vectors = self.catalog.embeddings(add.tolist())
                records.append((IndexJournal.ADD, ids, vectors))
            if records:
                journal.append(journal.index_checksum(), records)
            return {"mode": "journal", "added": int(len(add)), "removed": int(len(remove)),
                    "index_size": int(len(expected)), "journal_bytes": journal.size()}

    def close(self) -> None:
        """Save the index if this library changed it, publish the catalog and release the stores."""
        with self._lock:
            if self.catalog is None:
                return
            try:
                if self._unsaved:
                    self._save_index()
            finally:
                self._close_stores()

    def _close_stores(self) -> None:
        if self._feedback is not None:
            self._feedback.close()
            self._feedback = None
        if self.catalog is not None:
            self.catalog.close()
            self.catalog = None

    def __enter__(self) -> "FaceRecognitionLibrary":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_index(self) -> FaceIndex:
        cfg = self.settings.storage
        return FaceIndex(dim=self.embedding_dim, factory=cfg.index_factory, model_version=self.model_version)

    def _reconcile(self) -> bool:
        """Add the catalog's searchable faces the index misses and drop ids it no longer has; True if changed."""
        catalog_ids = self.catalog.valid_face_ids(self.model_version)
        index_ids = np.unique(np.asarray(self.index.ids(), np.int64))
        extra = np.setdiff1d(index_ids, catalog_ids, assume_unique=True)
        missing = np.setdiff1d(catalog_ids, index_ids, assume_unique=True)
        if len(extra):
            self._remove(extra)
        if len(missing):
            ids, vectors = self.catalog.embeddings(missing.tolist())
            self._add(ids, vectors)
        if len(extra) or len(missing):
            logger.info("index repaired from catalog: %d added, %d removed", len(missing), len(extra))
        return bool(len(extra) or len(missing))

    # -- indexing ------------------------------------------------------------------------------
    def index_image(self, path: str | os.PathLike, image_id: str | None = None, metadata: Any = None) -> IndexedImage:
        """Filter, embed and store every valid face of one image file.

        Returns the faces indexed (ids, boxes, scores) and those rejected with their reasons. An
        unreadable file gives status ``unreadable`` and its reason in ``error``; an image already
        in the catalog gives status ``skipped``.
        """
        outcomes: list[ImageOutcome] = []
        self._ingest([Path(path)], None, outcomes.append, [image_id], [_metadata_dict(metadata)])
        o = outcomes[0]
        out = IndexedImage(o.image_id, o.path, o.status, o.rejection_reason, error=o.error)
        if o.result is not None:
            for face_id, face in zip(o.face_ids, o.result["faces"]):
                entry = {"face_id": face_id, "bbox": face["bbox"], "scores": face["scores"]}
                if face["is_valid"]:
                    out.indexed.append(entry)
                else:
                    out.rejected.append(entry | {"rejection_reason": face["rejection_reason"]})
        return out

    def index_batch(self, paths: Sequence[str | os.PathLike], on_progress: ProgressCallback | None = None) -> IngestSummary:
        """Index many files; a bad file is recorded with its reason and never stops the batch.

        Files whose content is already indexed are skipped, so an interrupted run resumes.
        """
        return self._ingest([Path(p) for p in paths], on_progress)

    def index_directory(self, path: str | os.PathLike, recursive: bool = True,
                        on_progress: ProgressCallback | None = None) -> IngestSummary:
        """Index every file under ``path`` (non-images are reported as unreadable)."""
        return self.index_batch(iter_image_files(path, recursive=recursive), on_progress)

    def _ingest(self, paths: list[Path], on_progress: ProgressCallback | None,
                on_image: Callable[[ImageOutcome], None] | None = None,
                image_ids: Sequence[str | None] | None = None, metadata: Sequence[dict | None] | None = None) -> IngestSummary:
        every = self.settings.storage.index_save_every

        def add_to_index(outcome: ImageOutcome) -> None:
            if outcome.result is not None:
                valid = [(fid, face) for fid, face, verdict in
                         zip(outcome.face_ids, outcome.analysis.faces, outcome.result["faces"]) if verdict["is_valid"]]
                if valid:
                    self._add(np.array([fid for fid, _ in valid], np.int64),
                              np.stack([f.normed_embedding for _, f in valid]))
                self._unsaved += 1
                if self._unsaved >= every:
                    self.save()
            if on_image is not None:
                on_image(outcome)

        with self._lock:
            self.index  # noqa: B018 - read (and repaired) before new faces are stored, which then add only theirs
            summary = ingest_paths(paths, self.filter, self.catalog, on_progress=on_progress, on_image=add_to_index,
                                   image_ids=image_ids, metadata=metadata)
            if self._unsaved:
                self.save()
            return summary

    # -- search ----------------------------------------------------------------------------------
    def import_faces(self, path: str | os.PathLike) -> dict:
        """Import precomputed faces from a Parquet file (one row per face: ``image_id``, ``path``,
        ``embedding`` of the running model's dimension; optional box, scores and metadata; see
        :meth:`Catalog.import_faces <face_assets.store.Catalog.import_faces>`) into the catalog in
        one transaction, then into the index. Images already in the catalog are skipped.

        Raises:
            FaceImportError: a missing or mistyped column, a wrong dimension, a face given twice;
                nothing was imported.
        """
        with self._lock:
            self.index  # noqa: B018 - read (and repaired) before the import, which then adds only its faces
            t0 = time.perf_counter()
            report = self.catalog.import_faces(path, self.model_version, self.embedding_dim)
            t1 = time.perf_counter()
            if report["faces"]:
                first, last = report["face_ids"]
                ids, vectors = self.catalog.embeddings(range(first, last + 1))
                self._add(ids, vectors)
                self._save_index()
            return report | {"catalog_seconds": round(t1 - t0, 3),
                             "index_seconds": round(time.perf_counter() - t1, 3), "index_size": len(self.index)}

    def _main_face(self, image: Any, face_index: int | None = None) -> tuple[np.ndarray, FilterResult]:
        """Embedding of the main face (or of face ``face_index``) and the filter result naming it in ``face_index``."""
        analysis: ImageAnalysis = self.filter.analyzer.analyze(image)
        result = self.filter.judge(analysis)
        source = image if isinstance(image, (str, os.PathLike)) else None
        if not analysis.faces:
            raise NoFaceDetectedError(source)
        if face_index is not None:
            if not 0 <= face_index < len(analysis.faces):
                raise NoFaceDetectedError(source, f"the image has {len(analysis.faces)} faces, no face {face_index}")
            result = result | {"face_index": face_index}
        return analysis.faces[result["face_index"]].normed_embedding, result

    def get_embedding(self, image: Any) -> np.ndarray:
        """Normalized embedding (float32, 512-d for buffalo models) of the main face, without indexing.

        The main face is the deciding face of ``filter_image``: the valid face of best quality,
        else the largest face. Raises NoFaceDetectedError / ImageLoadError.
        """
        return self._main_face(image)[0]

    def search(self, image: Any, top_k: int = 10, threshold: float | None = None) -> list[SearchResult]:
        """Faces most similar to the main face of ``image`` (see :meth:`get_embedding`), best first.

        For a query image with several faces only the main face is searched; call
        :meth:`search_embedding` with each face's embedding to search the others.
        """
        with self._lock:  # the query is embedded and searched by the same model version, even across a swap
            return self.search_embedding(self.get_embedding(image), top_k=top_k, threshold=threshold)

    def search_embedding(self, vector: Any, top_k: int = 10, threshold: float | None = None) -> list[SearchResult]:
        """Faces most similar to an embedding (normalized here), best first, at least ``threshold``.

        Raises:
            EmbeddingError: wrong dimension or non-finite values.
        """
        query = self._check_vector(vector)
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        self.refresh(wait=False)  # a newer index saved whole is read beside the searches, not by this one
        with self._lock:  # the index only: curation and pages wait for the lock, not for a search's reads
            if len(self.index) == 0:
                return []
            scores, ids = self.index.search(query[None, :], top_k)
            catalog, store, match = self.catalog, self._clusters, self.match_threshold
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and (threshold is None or s >= threshold)]
        rows = catalog.faces_by_id([i for i, _ in hits])
        clusters = store.cluster_ids([i for i, _ in hits])
        results = []
        for face_id, score in hits:
            row = rows.get(face_id)
            if row is None:
                continue  # removed from the catalog after the search began
            results.append(SearchResult(face_id=face_id, image_id=row["image_id"], path=row["path"], bbox=row["bbox"],
                                        similarity=round(score, 6), metadata=row["metadata"],
                                        cluster_id=clusters.get(face_id), is_match=score >= match))
        return results

    def _check_vector(self, vector: Any) -> np.ndarray:
        dim = self.embedding_dim
        try:
            v = np.asarray(vector, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise EmbeddingError(f"embedding must be a sequence of {dim} numbers: {exc}") from None
        if v.shape[0] != dim:
            raise EmbeddingError(f"embedding has {v.shape[0]} values, the model gives {dim}")
        if not np.isfinite(v).all():
            raise EmbeddingError("embedding contains NaN or infinite values")
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            raise EmbeddingError("embedding is all zeros")
        return v / norm

    def compare(self, image1: Any, image2: Any) -> Comparison:
        """1:1 verification of the main faces of two images against the running version's :attr:`match_threshold`."""
        with self._lock:  # both faces embedded by the same model version, even across a swap
            a, b = self.get_embedding(image1), self.get_embedding(image2)
            thr = self.match_threshold
        sim = float(np.dot(a, b))
        return Comparison(similarity=round(sim, 6), is_match=sim >= thr, threshold=thr)

    # -- CRUD ------------------------------------------------------------------------------------
    def remove(self, id_: str | int) -> int:
        """Remove an image (by image id, a string) or one face (by face id, an int); returns faces removed."""
        with self._lock:
            with self.catalog.transaction():  # the faces and their person memberships go together
                face_ids = self.catalog.remove_image(id_) if isinstance(id_, str) else self.catalog.remove_face(int(id_))
                self.persons.store.forget_faces(face_ids)
            if face_ids:
                self._remove(np.array(face_ids, np.int64))
                self.save()
            return len(face_ids)

    def clear(self) -> None:
        """Delete every image, face and the index."""
        with self._lock:
            with self.catalog.transaction():
                self.catalog.clear()
                self.persons.store.clear()
            self.index = self._new_index()
            self.save()

    def stats(self) -> dict:
        """Counts per status and reason, faces, index size and type, model version."""
        with self._lock:
            s = self.catalog.stats() | {"persons": self.persons.store.count()}
            if self._index is None:  # what the published index holds, from its sidecar: no load
                side = _index_sidecar(self.index_path)
                size, kind = side.get("count", 0), side.get("resolved_factory")
            else:
                size, kind = len(self._index), self._index.resolved_factory
            return s | {"index_size": size, "index_type": kind,
                        "model_version": self.model_version, "index_dir": str(self.index_dir)}

    # -- feedback --------------------------------------------------------------------------------
    @property
    def feedback(self) -> FeedbackStore:
        """The feedback store of ``feedback.backend`` (its own DuckDB file by default), opened on first use."""
        with self._lock:
            if self._feedback is None:
                self._feedback = FeedbackStore.open(self.settings)
            return self._feedback

    def feedback_search(self, image: bytes | str | os.PathLike | None = None, *, face_id: int | None = None,
                        top_k: int | None = None, session_id: str | None = None,
                        filename: str | None = None, face_index: int | None = None) -> FeedbackQuery:
        """Search like :meth:`search` and record the query so that people can vote on its results.

        Give either an encoded ``image`` (bytes or a path; it is kept under ``feedback.query_dir``
        so that training can crop the face again) or the ``face_id`` of a catalog face. ``top_k``
        defaults to ``feedback.search_top_k``. An uploaded copy of a catalog image gets the
        matching catalog face as ``query_face_id``. ``face_index`` picks another face of an uploaded
        image (an index into ``FeedbackQuery.faces``) instead of the main face.

        Raises:
            ImageLoadError / NoFaceDetectedError: the image cannot be decoded or shows no face.
            UnknownFaceError: ``face_id`` is not in the catalog.
        """
        if (image is None) == (face_id is None):
            raise ValueError("give either an image or a face_id")
        query_id = uuid.uuid4().hex
        saved: Path | None = None
        if face_id is not None:
            face = self._face_record(face_id)
            record = QueryRecord(query_id=query_id, model_version=face["model_version"], embedding=face["embedding"],
                                 image_path=face["path"], content_hash=face["content_hash"], bbox=face["bbox"],
                                 width=face["width"], height=face["height"], det_score=face["det_score"],
                                 query_face_id=face["face_id"], session_id=session_id, source="catalog")
        else:
            data = image if isinstance(image, (bytes, bytearray)) else _read_bytes(image)
            embedding, result = self._main_face(bytes(data), face_index)
            main = result["faces"][result["face_index"]]
            digest = content_hash(bytes(data))
            saved = save_query_image(bytes(data), self.settings.layout.query_images, query_id)
            record = QueryRecord(query_id=query_id, model_version=self.model_version, embedding=embedding,
                                 image_path=str(saved), content_hash=digest, bbox=main["bbox"],
                                 width=result["image_size"][0], height=result["image_size"][1],
                                 det_score=main["scores"]["det_score"],
                                 query_face_id=self._catalog_face_of(digest, main["bbox"]), session_id=session_id,
                                 filename=filename, source="upload")
        hits = self.search_embedding(record.embedding, top_k=(top_k or self.settings.feedback.search_top_k) + 1)
        # The query face itself is no match to vote on: it would come first at similarity 1.
        results = [h for h in hits if h.face_id != record.query_face_id][: top_k or self.settings.feedback.search_top_k]
        record.result_face_ids = [r.face_id for r in results]
        try:
            self.feedback.add_query(record)
        except BaseException:
            if saved is not None:
                saved.unlink(missing_ok=True)
            raise
        self._remember_query(record)
        faces = [[float(x) for x in record.bbox]] if face_id is not None else [f["bbox"] for f in result["faces"]]
        return FeedbackQuery(query_id=query_id, bbox=[float(x) for x in record.bbox],
                             query_face_id=record.query_face_id, results=results, faces=faces,
                             face_index=0 if face_id is not None else result["face_index"])

    def _remember_query(self, record: QueryRecord) -> None:
        # Votes follow their search within seconds: they find the query here, not in the store.
        with self._lock:
            self._queries[record.query_id] = {"query_id": record.query_id, "model_version": record.model_version,
                                              "embedding": np.asarray(record.embedding, np.float32),
                                              "query_face_id": record.query_face_id, "session_id": record.session_id,
                                              "result_face_ids": list(record.result_face_ids or [])}
            while len(self._queries) > _RECENT_QUERIES:
                self._queries.popitem(last=False)

    def _query(self, query_id: str) -> dict:
        with self._lock:
            found = self._queries.get(query_id)
        if found is None:
            found = self.feedback.get_query(query_id)
        if found is None:
            raise UnknownQueryError(query_id)
        return found

    def query_searcher(self, query_id: str) -> str | None:
        """The ``session_id`` a recorded query was made with (the web app: the searcher's token id).

        Raises:
            UnknownQueryError: no such query.
        """
        return self._query(str(query_id)).get("session_id")

    def more_results(self, query_id: str, offset: int, limit: int) -> list[SearchResult]:
        """Results ``offset`` to ``offset + limit`` of a recorded query (its own face left out).

        They become results of the query that people can vote on.

        Raises:
            UnknownQueryError: no such query.
            FeedbackError: the query was embedded by another model version than the one running.
        """
        query = self._query(str(query_id))
        if query["model_version"] != self.model_version:
            raise FeedbackError("the model changed since this search: search again")
        found = self.search_embedding(query["embedding"], top_k=offset + limit + 1)
        found = [r for r in found if r.face_id != query.get("query_face_id")][offset:offset + limit]
        shown = set(query.get("result_face_ids") or [])
        new = [r.face_id for r in found if r.face_id not in shown]
        if new:
            self.feedback.add_results(query["query_id"], new)
            with self._lock:
                if query["query_id"] in self._queries:
                    self._queries[query["query_id"]]["result_face_ids"] = [*shown, *new]
        return found

    def record_feedback(self, query_id: str, result_id: int, vote: str, voter: str | None = None,
                        session_id: str | None = None) -> Vote:
        """Store a thumbs ``up`` / ``down`` on one result of a query made by :meth:`feedback_search`.

        The vote keeps the query and result embeddings, their similarity, the model version and
        the result image's metadata. ``voter`` (default: ``session_id``, else ``anonymous``) names
        who voted: the same voter voting again on the same pair updates the vote. It is acknowledged
        (returned) only once committed.

        Raises:
            FeedbackError: ``vote`` is not ``up``/``down``, or the face was embedded by another model.
            NotAResultError: the face is not among the results the query showed.
            UnknownQueryError / UnknownFaceError: no such query, or no such face in the catalog.
        """
        if vote not in VOTES:
            raise FeedbackError(f"vote must be 'up' or 'down', not {vote!r}")
        query = self._query(str(query_id))
        try:
            result_id = int(result_id)
        except (TypeError, ValueError):
            raise UnknownFaceError(result_id) from None
        if result_id not in (query.get("result_face_ids") or []):
            raise NotAResultError(query["query_id"], result_id)
        face = self._face_record(result_id)
        if face["model_version"] != query["model_version"]:
            raise FeedbackError(f"face {face['face_id']} is embedded by {face['model_version']}, the query by "
                                f"{query['model_version']}: search again")
        return self.feedback.upsert_vote(
            query_id=query["query_id"], result_face_id=face["face_id"], vote=vote,
            voter=voter or session_id or "anonymous", session_id=session_id, model_version=query["model_version"],
            similarity=float(np.dot(query["embedding"], face["embedding"])), query_embedding=query["embedding"],
            result_embedding=face["embedding"], result_image_id=face["image_id"], result_path=face["path"],
            result_bbox=face["bbox"], result_metadata=face["metadata"])

    def clear_feedback(self, query_id: str, result_id: int, voter: str) -> bool:
        """Withdraw ``voter``'s vote on one result of a query (undo); returns whether there was one."""
        return self.feedback.delete_vote(str(query_id), int(result_id), voter)

    def export_feedback(self, out_dir: str | os.PathLike) -> ExportReport:
        """Write the votes as training ``pairs.parquet`` and ``triplets.parquet`` (see ``docs/feedback.md``).

        Returns the report of what was written and what was dropped and why (also ``report.json``).
        """
        return export_feedback(self.feedback, self.catalog, lambda v, k: self.search_embedding(v, top_k=k),
                               self.settings, self.model_version, out_dir, match_threshold=self.match_threshold,
                               clusters_of=self.persons.store.cluster_ids)

    def feedback_stats(self) -> dict:
        """Counts of feedback queries, votes up/down, voters and votes per model version."""
        return self.feedback.stats()

    def _face_record(self, face_id: int) -> dict:
        """One catalog face with its image: ids, path, box, scores, embedding, model version, metadata."""
        try:
            face_id = int(face_id)
        except (TypeError, ValueError):
            raise UnknownFaceError(face_id) from None
        rows = self.catalog.face_records([face_id])
        if not rows:
            raise UnknownFaceError(face_id)
        face = rows[0]
        face["embedding"] = np.asarray(face["embedding"], np.float32)
        face["metadata"] = json.loads(face["metadata"]) if face["metadata"] else None
        return face

    def _catalog_face_of(self, digest: str, bbox: Sequence[float]) -> int | None:
        """The catalog face at ``bbox`` in the catalog image of this content hash, if any."""
        from .detection import box_iou  # with the detector: only a search that has a photo needs it

        rows = self.catalog.face_boxes_of_content(digest)
        best = max(rows, key=lambda r: box_iou(bbox, r[1:]), default=None)
        return int(best[0]) if best is not None and box_iou(bbox, best[1:]) >= 0.5 else None


    # -- model versions: fine-tuning, registry, hot-swap ------------------------------------------
    def _select_model(self) -> None:
        """Choose the recognizer version of config or the registry (at open, before the index); loads no model."""
        registry.ensure_base(self.catalog, self._pack)
        version, path = registry.active_model(self.catalog, self.settings, self._pack)
        self._use_file(path)
        self._set_active(version)
        stale = len(self.catalog.image_sources(self.model_version))
        if stale:
            logger.warning("%d images were embedded by another model version and are not searchable until "
                           "re-embedded (call reembed())", stale)

    def _use_file(self, path: Path) -> bool:
        """Run the recognizer file ``path`` from now on (loaded models swap at once); False if it already runs."""
        if Path(path).resolve() == self._model_file.resolve():
            return False
        if self._filter is not None:
            self._filter.analyzer.use_recognizer(path)
        self._model_file = Path(path)
        return True

    def _set_active(self, version: str) -> None:
        """Record the running version and its match threshold (read once here, not per search)."""
        self.active_model = version
        self._match_threshold = registry.match_threshold(registry.version_row(self.catalog, version), self.settings)

    @property
    def match_threshold(self) -> float:
        """Cosine at or above which two faces are the same person, for the running model version.

        Calibrated when the version was trained (see :func:`face_assets.registry.match_threshold`);
        ``compare``, ``search`` (``SearchResult.is_match``) and the web app's match marking use it.
        """
        return self._match_threshold

    def list_models(self) -> list[dict]:
        """Registered recognizer versions, oldest first, each with ``active`` and its ``match_threshold``."""
        with self._lock:
            return [row | {"active": row["version"] == self.active_model,
                           "match_threshold": registry.match_threshold(row, self.settings)}
                    for row in registry.versions(self.catalog)]

    def reembed(self, on_progress: ProgressCallback | None = None) -> IngestSummary:
        """Process again every image embedded by another model version (same image ids and metadata)."""
        with self._lock:
            sources = self.catalog.image_sources(self.model_version)
            return self._ingest([Path(p) for _, p, _ in sources], on_progress,
                                image_ids=[i for i, _, _ in sources], metadata=[m for _, _, m in sources])

    def use_model(self, version: str, on_progress: ProgressCallback | None = None) -> IngestSummary | None:
        """Hot-swap the recognizer to a registered version, without restart, and re-embed the catalog.

        The library lock is held throughout: searches wait and then see only the new version's
        faces, never a mix. Returns the re-embedding summary, or None when ``version`` already runs.
        """
        with self._lock:
            path = registry.model_file(self.catalog, self.settings, self._pack, version)
            if not self._use_file(path):
                self._set_active(version)
                return None
            self._set_active(version)
            self.index = self._new_index()
            self._reconcile()
            summary = self.reembed(on_progress)
            self.save()
            logger.info("now running model %s (%s): %d images re-embedded", version, self.model_version, summary.total)
            return summary

    def train(self, pairs: str | os.PathLike | None = None, triplets: str | os.PathLike | None = None,
              persons: dict | None = None, on_epoch_end: Callable[[int, dict], None] | None = None):
        """Fine-tune the running recognizer on exported feedback; register the candidate (not promoted).

        ``pairs`` / ``triplets`` are the feedback export's Parquet files; ``persons`` maps a confirmed
        person to its faces (:class:`face_assets.training.FaceRef`). The candidate is registered as
        ``candidate`` when it passes the evaluation gate, else ``rejected``. Rerunning the same call
        resumes an interrupted run or returns the finished one. Needs the ``train`` extra (torch).

        Returns:
            :class:`face_assets.training.TrainResult` with ``version`` set.
        """
        try:
            from . import training
        except ImportError as exc:
            raise TrainingError(f"fine-tuning needs the train extra (pip install 'face_assets[train]'): {exc}") from None
        pairs = Path(pairs) if pairs is not None else None
        triplets = Path(triplets) if triplets is not None else None
        analyzer = self.filter.analyzer
        threshold = self.match_threshold
        run_id = training.run_id_for(self.settings, analyzer.pack.recognizer_sha256, pairs, triplets, persons, threshold)
        result = training.fine_tune(self.settings, analyzer, self.active_model, self.settings.layout.training_runs / run_id,
                                    pairs, triplets, persons, on_epoch_end, threshold=threshold)
        with self._lock:
            known = [r["version"] for r in registry.versions(self.catalog) if r["sha256"] == result.sha256]
            result.version = known[0] if known else registry.new_version_name(result.sha256)
            if not known:
                target = self.settings.layout.model_versions / f"{result.version}.onnx"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(result.model_path, target)
                registry.add_version(self.catalog, 
                    result.version, result.parent, str(target.relative_to(self.settings.layout.root)),
                    result.sha256, "candidate" if result.passed_gate else "rejected",
                    {"gate": {"passed": result.passed_gate, "reasons": result.gate_reasons, "failed": result.gate_failed}} | result.metrics
                    | {"run_id": result.run_id, "data": result.data, "seconds": result.seconds})
        return result

    def promote(self, version: str, force: bool = False) -> IngestSummary | None:
        """Make ``version`` the promoted model and hot-swap to it (re-embedding the catalog).

        A version the gate rejected needs ``force=True``. Returns what :meth:`use_model` returns.
        """
        with self._lock:
            row = registry.version_row(self.catalog, version)
            if registry.failed_gate(row) and not force:
                reasons = "; ".join(row["metrics"]["gate"]["reasons"])
                raise ModelVersionError(f"model version '{version}' failed the evaluation gate ({reasons}); "
                                        "use force to promote it anyway")
            if row["status"] != "promoted":
                registry.promote(self.catalog, version)
            return self.use_model(version)

    def rollback(self, version: str | None = None) -> str:
        """Go back to ``version``, by default the one the promoted model replaced; hot-swaps. Returns the version."""
        with self._lock:
            current = registry.promoted(self.catalog)
            target = version or (registry.previous(self.catalog, current) if current else None)
            if target is None:
                raise ModelVersionError(f"nothing to roll back to from '{current}'")
            if registry.failed_gate(registry.version_row(self.catalog, target)):
                raise ModelVersionError(f"model version '{target}' failed the evaluation gate; promote it with force")
            if target != current:
                registry.promote(self.catalog, target, action="rollback")
            self.use_model(target)
            return target

    # -- person clusters (docs/clustering.md) -----------------------------------------------------
    @property
    def persons(self) -> "PersonClusters":
        """The person clusters of this library's catalog (see :mod:`face_assets.persons`).

        The calls below go through it without holding the library's lock, which guards the index
        and the running model: a curation action waiting for the catalog's file lock (a merge of
        the pipeline's) must not hold up searches, nor a full re-clustering the process's searches.
        The person store takes turns between threads and processes itself.
        """
        from .persons import PersonClusters

        with self._lock:
            catalog, store, version = self.catalog, self._clusters, self.model_version
        return PersonClusters(catalog, self.settings.clustering, version, store=store)

    def cluster(self, log: Callable[[str], None] | None = None) -> "ClusterRun":
        """Cluster every valid face into persons (full run); cluster ids stay stable across runs.

        Honours the curation constraints and never puts two faces of one photo together unless a
        user merged or moved them so. Returns what the run did, with its quality metrics.
        ``log`` receives progress messages (at 2M faces a run takes tens of minutes).
        """
        return self.persons.run(log)

    def assign_new(self) -> "ClusterRun":
        """Incremental: faces without a cluster join the nearest cluster if close enough, else new ones."""
        return self.persons.assign_new()

    def update_clusters(self) -> "ClusterRun":
        """What a pipeline calls after indexing: a full run when :meth:`recluster_policy` says so, else :meth:`assign_new`."""
        return self.cluster() if self.recluster_policy().recluster else self.assign_new()

    def recluster_policy(self) -> "ReclusterDecision":
        """Whether a full re-clustering is due (drift policy), and why."""
        return self.persons.decision()

    def merge(self, cluster_ids: Sequence[int], actor: str = ACTOR) -> "ClusterInfo":
        """Merge person clusters into the largest one; the decision survives re-clustering.

        Every curation call is one write, recorded in the audit log as ``actor`` (:meth:`curation_log`).
        """
        return self.persons.merge(list(cluster_ids), actor=actor)

    def split(self, cluster_id: int, face_ids: Sequence[int] | None = None, k: int | None = None,
              actor: str = ACTOR) -> list["ClusterInfo"]:
        """Split a cluster: ``face_ids`` become a new person (the rest keep the id and name), or (none
        given) k-means into ``k`` parts (the largest keeps them). Returns the parts, the kept id first."""
        return self.persons.split(cluster_id, list(face_ids) if face_ids else None, k, actor=actor)

    def move(self, face_id: int, cluster_id: int, actor: str = ACTOR) -> "ClusterInfo":
        """Move a face to another person cluster; it stays there through re-clustering."""
        return self.move_faces([face_id], cluster_id, actor=actor)

    def move_faces(self, face_ids: Sequence[int], cluster_id: int, from_cluster: int | None = None,
                   actor: str = ACTOR) -> "ClusterInfo":
        """Move faces to another person cluster in one write; with ``from_cluster``, only if they all are its faces."""
        return self.persons.move_faces(face_ids, cluster_id, from_cluster, actor=actor)

    def rename(self, cluster_id: int, label: str | None, actor: str = ACTOR) -> "ClusterInfo":
        """Name (label) a person cluster; ``None`` or blank clears the name (normalised: see
        :func:`~face_assets.persons.normalize_label`)."""
        return self.persons.rename(cluster_id, label, actor=actor)

    def undo(self, change_id: int, actor: str = ACTOR) -> dict:
        """Undo a curation change of the audit log, as far as later changes left it; returns the undo's entry."""
        return self.persons.undo(change_id, actor=actor)

    def curation_log(self, limit: int = 50, before: int | None = None, cluster_id: int | None = None) -> list[dict]:
        """Curation changes, newest first: ``limit`` of them with ids below ``before``, of one person if given."""
        return self.persons.store.audit.page(limit, before, cluster_id)

    def get_cluster(self, cluster_id: int, limit: int | None = None, offset: int = 0) -> "ClusterInfo":
        """One person cluster with its face ids by id (``limit`` of them from ``offset`` when given)."""
        return self.persons.get(cluster_id, limit=limit, offset=offset)

    def list_clusters(self, min_size: int = 1, limit: int | None = None, offset: int = 0) -> list["ClusterInfo"]:
        """Person clusters of at least ``min_size`` faces, largest first."""
        return self.persons.list(min_size, limit, offset)

    def cluster_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sizes, cohesions)`` of every person cluster, largest first (NaN where no cohesion is
        known): the shape of the clustering without reading every person's row."""
        return self.persons.store.sizes()

    def find_persons(self, text: str = "", limit: int = 48, offset: int = 0) -> tuple[int, list["ClusterInfo"]]:
        """``(how many match, one page)`` of the persons whose name contains ``text`` (any case) or
        whose id it is (``12`` / ``#12``), largest first; every person when ``text`` is blank."""
        return self.persons.find(text, limit, offset)


def _index_sidecar(path: Path) -> dict:
    """The metadata sidecar of a saved index (count, type, model version); empty when there is none."""
    try:
        return json.loads(path.with_name(path.name + ".json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageLoadError(path, exc.strerror or str(exc)) from exc
