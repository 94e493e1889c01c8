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
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import Settings, load_settings
from .errors import EmbeddingError, IndexCorruptError, IndexNotFoundError, NoFaceDetectedError
from .filtering import FaceFilter
from .index import FaceIndex
from .ingest import ImageOutcome, IngestSummary, ProgressCallback, ingest_paths, iter_image_files
from .schemas import FilterResult, ImageAnalysis
from .store import Catalog

if TYPE_CHECKING:
    from .clustering import ReclusterDecision
    from .persons import ClusterInfo, ClusterRun, PersonClusters

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """One match: which face, in which image, how similar (cosine, -1..1)."""

    face_id: int
    image_id: str
    path: str
    bbox: list[float]
    similarity: float
    metadata: dict | None = None
    cluster_id: int | None = None


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
        self.index_dir = Path(self.settings.storage.data_dir)
        self._lock = threading.RLock()
        self.filter = FaceFilter(self.settings)
        self.catalog: Catalog | None = None
        self.index: FaceIndex | None = None
        self._unsaved = 0
        self.load()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        """Version tag of the embeddings this library produces and searches."""
        return self.filter.analyzer.model_version

    @property
    def index_path(self) -> Path:
        """File of the persisted faiss index."""
        return self.index_dir / self.settings.storage.index_file

    def load(self) -> None:
        """(Re)open the catalog and the index, repairing the index from the catalog if they disagree."""
        with self._lock:
            if self.catalog is not None:
                self.catalog.close()
            self.catalog = Catalog(self.settings.storage.duckdb_path)
            try:
                index = FaceIndex.load(self.index_path)
                if index.model_version != self.model_version:
                    logger.warning("index holds %s embeddings, library uses %s: rebuilding",
                                   index.model_version, self.model_version)
                    index = None
            except IndexNotFoundError:
                index = None
            except IndexCorruptError as exc:
                logger.warning("index %s is corrupt (%s): rebuilding from the catalog", self.index_path, exc)
                index = None
            self.index = index if index is not None else self._new_index()
            self._reconcile()

    def save(self) -> Path:
        """Write the index atomically next to the catalog; returns its path."""
        with self._lock:
            self.catalog.checkpoint()
            self.index.save(self.index_path)
            self._unsaved = 0
            return self.index_path

    def close(self) -> None:
        """Save the index and close the catalog."""
        with self._lock:
            if self.catalog is None:
                return
            self.save()
            self.catalog.close()
            self.catalog = None

    def __enter__(self) -> "FaceRecognitionLibrary":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_index(self) -> FaceIndex:
        cfg = self.settings.storage
        return FaceIndex(dim=self.filter.analyzer.recognizer.embedding_dim, factory=cfg.index_factory,
                         model_version=self.model_version)

    def _reconcile(self) -> None:
        catalog_ids = set(self.catalog.valid_face_ids(self.model_version))
        index_ids = set(int(i) for i in self.index.ids())
        extra = index_ids - catalog_ids
        missing = catalog_ids - index_ids
        if extra:
            self.index.remove(np.fromiter(extra, np.int64))
        if missing:
            ids, vectors = self.catalog.embeddings(sorted(missing))
            self.index.add(ids, vectors)
        if extra or missing:
            logger.info("index repaired from catalog: %d added, %d removed", len(missing), len(extra))
            self.index.save(self.index_path)

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
                    self.index.add(np.array([fid for fid, _ in valid], np.int64),
                                   np.stack([f.normed_embedding for _, f in valid]))
                self._unsaved += 1
                if self._unsaved >= every:
                    self.save()
            if on_image is not None:
                on_image(outcome)

        with self._lock:
            summary = ingest_paths(paths, self.filter, self.catalog, on_progress=on_progress, on_image=add_to_index,
                                   image_ids=image_ids, metadata=metadata)
            if self._unsaved:
                self.save()
            return summary

    # -- search ----------------------------------------------------------------------------------
    def _main_face(self, image: Any) -> tuple[np.ndarray, FilterResult]:
        analysis: ImageAnalysis = self.filter.analyzer.analyze(image)
        result = self.filter.judge(analysis)
        if not analysis.faces:
            raise NoFaceDetectedError(image if isinstance(image, (str, os.PathLike)) else None)
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
        return self.search_embedding(self.get_embedding(image), top_k=top_k, threshold=threshold)

    def search_embedding(self, vector: Any, top_k: int = 10, threshold: float | None = None) -> list[SearchResult]:
        """Faces most similar to an embedding (normalized here), best first, at least ``threshold``.

        Raises:
            EmbeddingError: wrong dimension or non-finite values.
        """
        query = self._check_vector(vector)
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        with self._lock:
            if len(self.index) == 0:
                return []
            scores, ids = self.index.search(query[None, :], top_k)
            hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and (threshold is None or s >= threshold)]
            rows = self.catalog.faces_by_id([i for i, _ in hits])
        results = []
        for face_id, score in hits:
            row = rows.get(face_id)
            if row is None:
                continue  # removed from the catalog after the search began
            results.append(SearchResult(face_id=face_id, image_id=row["image_id"], path=row["path"], bbox=row["bbox"],
                                        similarity=round(score, 6), metadata=row["metadata"],
                                        cluster_id=row.get("cluster_id")))
        return results

    def _check_vector(self, vector: Any) -> np.ndarray:
        dim = self.filter.analyzer.recognizer.embedding_dim
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
        """1:1 verification of the main faces of two images against ``search.match_threshold``."""
        a, b = self.get_embedding(image1), self.get_embedding(image2)
        sim = float(np.dot(a, b))
        thr = self.settings.search.match_threshold
        return Comparison(similarity=round(sim, 6), is_match=sim >= thr, threshold=thr)

    # -- CRUD ------------------------------------------------------------------------------------
    def remove(self, id_: str | int) -> int:
        """Remove an image (by image id, a string) or one face (by face id, an int); returns faces removed."""
        with self._lock:
            face_ids = self.catalog.remove_image(id_) if isinstance(id_, str) else self.catalog.remove_face(int(id_))
            if face_ids:
                self.index.remove(np.array(face_ids, np.int64))
                self.save()
            return len(face_ids)

    def clear(self) -> None:
        """Delete every image, face and the index."""
        with self._lock:
            self.catalog.clear()
            self.index = self._new_index()
            self.save()

    def stats(self) -> dict:
        """Counts per status and reason, faces, index size and type, model version."""
        with self._lock:
            s = self.catalog.stats()
            return s | {"index_size": len(self.index), "index_type": self.index.resolved_factory,
                        "model_version": self.model_version, "index_dir": str(self.index_dir)}


    # -- person clusters (docs/clustering.md) -----------------------------------------------------
    @property
    def persons(self) -> "PersonClusters":
        """The person clusters of this library's catalog (see :mod:`face_assets.persons`)."""
        from .persons import PersonClusters

        return PersonClusters(self.catalog, self.settings.clustering, self.model_version)

    def cluster(self) -> "ClusterRun":
        """Cluster every valid face into persons (full run); cluster ids stay stable across runs.

        Honours the curation constraints and never puts two faces of one photo together unless a
        user merged or moved them so. Returns what the run did, with its quality metrics.
        """
        with self._lock:
            return self.persons.run()

    def assign_new(self) -> "ClusterRun":
        """Incremental: faces without a cluster join the nearest cluster if close enough, else new ones."""
        with self._lock:
            return self.persons.assign_new()

    def update_clusters(self) -> "ClusterRun":
        """What a pipeline calls after indexing: a full run when :meth:`recluster_policy` says so, else :meth:`assign_new`."""
        with self._lock:
            return self.cluster() if self.recluster_policy().recluster else self.assign_new()

    def recluster_policy(self) -> "ReclusterDecision":
        """Whether a full re-clustering is due (drift policy), and why."""
        with self._lock:
            return self.persons.decision()

    def merge(self, cluster_ids: Sequence[int]) -> "ClusterInfo":
        """Merge person clusters into the largest one; the decision survives re-clustering."""
        with self._lock:
            return self.persons.merge(list(cluster_ids))

    def split(self, cluster_id: int, face_ids: Sequence[int] | None = None, k: int | None = None) -> list["ClusterInfo"]:
        """Split a cluster: ``face_ids`` become a new person, or (none given) k-means into ``k`` parts."""
        with self._lock:
            return self.persons.split(cluster_id, list(face_ids) if face_ids else None, k)

    def move(self, face_id: int, cluster_id: int) -> "ClusterInfo":
        """Move a face to another person cluster; it stays there through re-clustering."""
        with self._lock:
            return self.persons.move(face_id, cluster_id)

    def rename(self, cluster_id: int, label: str | None) -> "ClusterInfo":
        """Name (label) a person cluster; ``None`` clears the name."""
        with self._lock:
            return self.persons.rename(cluster_id, label)

    def get_cluster(self, cluster_id: int) -> "ClusterInfo":
        """One person cluster with its face ids."""
        with self._lock:
            return self.persons.get(cluster_id)

    def list_clusters(self, min_size: int = 1, limit: int | None = None, offset: int = 0) -> list["ClusterInfo"]:
        """Person clusters of at least ``min_size`` faces, largest first."""
        with self._lock:
            return self.persons.list(min_size, limit, offset)
