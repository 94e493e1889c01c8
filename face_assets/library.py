"""``FaceRecognitionLibrary``: the API a client team imports (spec 2.2), a facade over a few services.

The DuckDB catalog is the source of truth; the faiss index is derived from it and persisted beside
it. Every image is committed to the catalog before its faces enter the index, and the index is
saved every ``storage.index_save_every`` images and on ``save()``/``close()``. When the library
opens, it reconciles the index with the catalog (adds faces the index misses, drops ids the catalog
no longer has, rebuilds a missing or corrupt index), so a crash at any point loses nothing that
was reported as indexed and duplicates nothing.

What the library does itself is what needs the catalog and the index together: ingest, search,
compare, remove and clear, and a hot-swap (switch the model, re-embed, rebuild the index). The rest
it hands to one service each, sharing its lock:

- :class:`~face_assets.running_model.RunningModel`: the model version it runs (file, embedding
  tag, match threshold, models loaded on first use) and the registry calls around it;
- :class:`~face_assets.search_index.SearchIndex`: the faiss index, its repair from the catalog,
  its saves (journal or whole) and its refresh from what other processes published;
- :class:`~face_assets.feedback_session.FeedbackSession`: searches people vote on, the recent
  queries, the votes' checks and the feedback store;
- :class:`~face_assets.persons.PersonClusters`: the person clusters (through :attr:`persons`).

Locking: the library's lock guards the index and the running model. Person calls do not take it
(the person store takes turns itself); a search holds it for the index search only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .audit import ACTOR
from .config import Settings, load_settings
from .errors import EmbeddingError, TrainingError
from .feedback import FeedbackStore
from .feedback_session import FeedbackSession
from .index import FaceIndex
from .ingest import ImageOutcome, IngestSummary, ProgressCallback, ingest_paths, iter_image_files
from .process import apply_process_settings
from .running_model import RunningModel
from .schemas import ClusterInfo, ClusterRun, Comparison, ExportReport, FeedbackQuery, IndexedImage, SearchResult, Vote
from .search_index import SearchIndex
from .store import Catalog

if TYPE_CHECKING:
    from .clustering import ReclusterDecision
    from .filtering import FaceFilter
    from .persons import PersonClusters

__all__ = ["Comparison", "FaceRecognitionLibrary", "FeedbackQuery", "IndexedImage", "SearchResult"]

logger = logging.getLogger(__name__)


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
        self.catalog: Catalog | None = None
        self._model = RunningModel(self.settings, self._lock)
        self._search_index = SearchIndex(self.settings, self._lock, self._model)
        self._feedback = FeedbackSession(self.settings, self._lock, self._model, self.search_embedding)
        self.load()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def filter(self) -> FaceFilter:
        """Detector, recognizer (the active version) and cartoon classifier, loaded on first use.

        Reading tables, listing, clustering and index upkeep never load a model.
        """
        return self._model.filter

    @property
    def model_version(self) -> str:
        """Version tag of the embeddings this library produces and searches."""
        return self._model.model_version

    @property
    def active_model(self) -> str:
        """Registry name of the model version this library runs (``base``, ``ft-...``; see :mod:`face_assets.registry`)."""
        return self._model.version

    @property
    def embedding_dim(self) -> int:
        """Length of the embeddings of the active recognizer (read from its file, no model loaded)."""
        return self._model.embedding_dim

    @property
    def index_path(self) -> Path:
        """File of the persisted faiss index."""
        return self._search_index.index_path

    def load(self) -> None:
        """(Re)open the catalog and the index, repairing the index from the catalog if they disagree."""
        with self._lock:
            self._close_stores()
            self.catalog = Catalog.open(self.settings.storage)
            from .persons import ClusterStore  # clustering imports scipy: only for libraries that open a catalog

            self._clusters = ClusterStore(self.catalog, self.settings.layout.former_audit_log,
                                          self.settings.layout.cluster_means)
            self._model.select(self.catalog)
            self._search_index.open(self.catalog)
            self._feedback.open(self.catalog, self._clusters)

    @property
    def index(self) -> FaceIndex:
        """The faiss index of the active model version, read on first use and repaired from the
        catalog if they disagree."""
        return self._search_index.index

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
        return self._search_index.refresh(wait)

    def save(self) -> Path:
        """Write the index atomically next to the catalog and publish the catalog; returns the index path."""
        with self._lock:
            self._search_index.save_index()
            self.catalog.checkpoint()
            return self.index_path

    def published_ids(self) -> np.ndarray | None:
        """The face ids the published index holds with its journal applied (sorted), read without
        loading the index; None when it cannot be told that way (no index, an older file)."""
        return self._search_index.published_ids()

    def publish_index(self) -> dict:
        """Bring the published index up to date with the catalog, as the pipeline does after a merge.

        The faces the index misses are appended to its journal, the removed ones recorded there,
        without loading the index: the cost follows the batch. Without a usable saved index (none
        yet, another model version's) or once the journal has grown to a share of the index, the
        index is loaded, repaired and saved whole. Returns what was done (``mode``: ``journal`` or
        ``whole``), faces added and removed, and the index size.
        """
        return self._search_index.publish()

    def close(self) -> None:
        """Save the index if this library changed it, publish the catalog and release the stores."""
        with self._lock:
            if self.catalog is None:
                return
            try:
                if self._search_index.unsaved:
                    self._search_index.save_index()
            finally:
                self._close_stores()

    def _close_stores(self) -> None:
        self._feedback.close()
        if self.catalog is not None:
            self.catalog.close()
            self.catalog = None

    def __enter__(self) -> "FaceRecognitionLibrary":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
                    self._search_index.add(np.array([fid for fid, _ in valid], np.int64),
                                           np.stack([f.normed_embedding for _, f in valid]))
                if self._search_index.count_image() >= every:
                    self.save()
            if on_image is not None:
                on_image(outcome)

        with self._lock:
            self.index  # noqa: B018 - read (and repaired) before new faces are stored, which then add only theirs
            summary = ingest_paths(paths, self.filter, self.catalog, on_progress=on_progress, on_image=add_to_index,
                                   image_ids=image_ids, metadata=metadata)
            if self._search_index.unsaved:
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
                self._search_index.add(ids, vectors)
                self._search_index.save_index()
            return report | {"catalog_seconds": round(t1 - t0, 3),
                             "index_seconds": round(time.perf_counter() - t1, 3), "index_size": len(self.index)}

    def get_embedding(self, image: Any) -> np.ndarray:
        """Normalized embedding (float32, 512-d for buffalo models) of the main face, without indexing.

        The main face is the deciding face of ``filter_image``: the valid face of best quality,
        else the largest face. Raises NoFaceDetectedError / ImageLoadError.
        """
        return self._model.main_face(image)[0]

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
                self._search_index.remove(np.array(face_ids, np.int64))
                self.save()
            return len(face_ids)

    def clear(self) -> None:
        """Delete every image, face and the index."""
        with self._lock:
            with self.catalog.transaction():
                self.catalog.clear()
                self.persons.store.clear()
            self._search_index.reset()
            self.save()

    def stats(self) -> dict:
        """Counts per status and reason, faces, index size and type, model version."""
        with self._lock:
            s = self.catalog.stats() | {"persons": self.persons.store.count()}
            size, kind = self._search_index.size_and_type()  # of the published index when not loaded
            return s | {"index_size": size, "index_type": kind,
                        "model_version": self.model_version, "index_dir": str(self.index_dir)}

    # -- feedback (the feedback session) ---------------------------------------------------------
    @property
    def feedback(self) -> FeedbackStore:
        """The feedback store of ``feedback.backend`` (its own DuckDB file by default), opened on first use."""
        return self._feedback.store

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
        return self._feedback.search(image, face_id=face_id, top_k=top_k, session_id=session_id, filename=filename,
                                     face_index=face_index)

    def query_searcher(self, query_id: str) -> str | None:
        """The ``session_id`` a recorded query was made with (the web app: the searcher's token id).

        Raises:
            UnknownQueryError: no such query.
        """
        return self._feedback.query(str(query_id)).get("session_id")

    def more_results(self, query_id: str, offset: int, limit: int) -> list[SearchResult]:
        """Results ``offset`` to ``offset + limit`` of a recorded query (its own face left out).

        They become results of the query that people can vote on.

        Raises:
            UnknownQueryError: no such query.
            FeedbackError: the query was embedded by another model version than the one running.
        """
        return self._feedback.more_results(query_id, offset, limit)

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
        return self._feedback.vote(query_id, result_id, vote, voter, session_id)

    def clear_feedback(self, query_id: str, result_id: int, voter: str) -> bool:
        """Withdraw ``voter``'s vote on one result of a query (undo); returns whether there was one."""
        return self.feedback.delete_vote(str(query_id), int(result_id), voter)

    def export_feedback(self, out_dir: str | os.PathLike) -> ExportReport:
        """Write the votes as training ``pairs.parquet`` and ``triplets.parquet`` (see ``docs/feedback.md``).

        Returns the report of what was written and what was dropped and why (also ``report.json``).
        """
        return self._feedback.export(out_dir)

    def feedback_stats(self) -> dict:
        """Counts of feedback queries, votes up/down, voters and votes per model version."""
        return self.feedback.stats()

    # -- model versions: fine-tuning, registry, hot-swap (the running model) -----------------------
    @property
    def match_threshold(self) -> float:
        """Cosine at or above which two faces are the same person, for the running model version.

        Calibrated when the version was trained (see :func:`face_assets.registry.match_threshold`);
        ``compare``, ``search`` (``SearchResult.is_match``) and the web app's match marking use it.
        """
        return self._model.match_threshold

    def list_models(self) -> list[dict]:
        """Registered recognizer versions, oldest first, each with ``active`` and its ``match_threshold``."""
        with self._lock:
            return self._model.list(self.catalog)

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
            if not self._model.switch(self.catalog, version):
                return None
            self._search_index.reset()
            self._search_index.reconcile()
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
            self._model.register(self.catalog, result)
        return result

    def promote(self, version: str, force: bool = False) -> IngestSummary | None:
        """Make ``version`` the promoted model and hot-swap to it (re-embedding the catalog).

        A version the gate rejected needs ``force=True``. Returns what :meth:`use_model` returns.
        """
        with self._lock:
            self._model.promote(self.catalog, version, force)
            return self.use_model(version)

    def rollback(self, version: str | None = None) -> str:
        """Go back to ``version``, by default the one the promoted model replaced; hot-swaps. Returns the version."""
        with self._lock:
            target = self._model.roll_back(self.catalog, version)
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

    def update_clusters(self, full: bool = False, log: Callable[[str], None] | None = None) -> "ClusterRun":
        """What a pipeline calls after indexing: a full run (:meth:`cluster`, with ``log``) when
        :meth:`recluster_policy` says so or ``full`` asks for one, else :meth:`assign_new`.

        A full run's ``reasons`` say why it ran.
        """
        policy = self.recluster_policy()
        if not (full or policy.recluster):
            return self.assign_new()
        run = self.cluster(log)
        run.reasons = policy.reasons if policy.recluster else ["asked for by the run"]
        return run

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

