"""The library's feedback session: searches people can vote on, the votes' checks, and the store.

One job: between a search and the votes on its results. It records each feedback search with its
results (:mod:`face_assets.feedback` stores it), keeps the recent queries in memory for the votes
that follow within seconds, and checks a vote before it is stored (the face was a result of the
query, both embedded by the same model version). Searching itself is the library's: the session is
given the library's ``search_embedding``.

Locking: the library's lock (shared here) guards the query cache and the store's opening; store
calls and catalog reads take no library lock.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import Settings
from .errors import FeedbackError, ImageLoadError, NotAResultError, UnknownFaceError, UnknownQueryError
from .feedback import VOTES, FeedbackStore, QueryRecord, export_feedback, save_query_image
from .imaging import content_hash
from .running_model import RunningModel
from .schemas import ExportReport, FeedbackQuery, SearchResult, Vote
from .store import Catalog

if TYPE_CHECKING:
    from .persons import ClusterStore

RECENT_QUERIES = 10_000
"""Feedback queries a library keeps in memory for the votes that follow them."""

Search = Callable[[np.ndarray, int], list[SearchResult]]
"""The library's search: an embedding and how many results, best first."""


class FeedbackSession:
    """Feedback searches, their recent queries, vote checks and the feedback store of one library."""

    def __init__(self, settings: Settings, lock: threading.RLock, model: RunningModel, search: Search):
        self.settings = settings
        self._lock = lock
        self.model = model
        self._search = search
        self.catalog: Catalog | None = None
        self._clusters: ClusterStore | None = None
        self._store: FeedbackStore | None = None
        self._queries: OrderedDict[str, dict] = OrderedDict()
        self._lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="catalog-lookup")

    def open(self, catalog: Catalog, clusters: ClusterStore) -> None:
        """Follow the library's (re)opened catalog and person store."""
        self.catalog, self._clusters = catalog, clusters

    @property
    def store(self) -> FeedbackStore:
        """The feedback store of ``feedback.backend``, opened on first use."""
        with self._lock:
            if self._store is None:
                self._store = FeedbackStore.open(self.settings)
            return self._store

    def close(self) -> None:
        """Close the feedback store if it was opened (it opens again on next use)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def search(self, image: bytes | str | os.PathLike | None = None, *, face_id: int | None = None,
               top_k: int | None = None, session_id: str | None = None,
               filename: str | None = None, face_index: int | None = None) -> FeedbackQuery:
        """Search an uploaded image's face or a catalog face, and record the query and its results."""
        if (image is None) == (face_id is None):
            raise ValueError("give either an image or a face_id")
        query_id = uuid.uuid4().hex
        saved: Path | None = None
        if face_id is not None:
            face = self.face_record(face_id)
            record = QueryRecord(query_id=query_id, model_version=face["model_version"], embedding=face["embedding"],
                                 image_path=face["path"], content_hash=face["content_hash"], bbox=face["bbox"],
                                 width=face["width"], height=face["height"], det_score=face["det_score"],
                                 query_face_id=face["face_id"], session_id=session_id, source="catalog")
        else:
            data = image if isinstance(image, (bytes, bytearray)) else _read_bytes(image)
            digest = content_hash(bytes(data))
            # Whether the photo is a catalog image is read from the catalog's master while the face is
            # detected and embedded: the read waits for the lock behind a batch's merge, the model does not.
            boxes = self._lookups.submit(self.catalog.face_boxes_of_content, digest)
            embedding, result = self.model.main_face(bytes(data), face_index)
            main = result["faces"][result["face_index"]]
            saved = save_query_image(bytes(data), self.settings.layout.query_images, query_id)
            record = QueryRecord(query_id=query_id, model_version=self.model.model_version, embedding=embedding,
                                 image_path=str(saved), content_hash=digest, bbox=main["bbox"],
                                 width=result["image_size"][0], height=result["image_size"][1],
                                 det_score=main["scores"]["det_score"],
                                 query_face_id=_catalog_face_of(boxes.result(), main["bbox"]), session_id=session_id,
                                 filename=filename, source="upload")
        hits = self._search(record.embedding, (top_k or self.settings.feedback.search_top_k) + 1)
        # The query face itself is no match to vote on: it would come first at similarity 1.
        results = [h for h in hits if h.face_id != record.query_face_id][: top_k or self.settings.feedback.search_top_k]
        record.result_face_ids = [r.face_id for r in results]
        try:
            self.store.add_query(record)
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
            while len(self._queries) > RECENT_QUERIES:
                self._queries.popitem(last=False)

    def query(self, query_id: str) -> dict:
        """A recorded query, from memory when recent, else from the store; :class:`UnknownQueryError` if none."""
        with self._lock:
            found = self._queries.get(query_id)
        if found is None:
            found = self.store.get_query(query_id)
        if found is None:
            raise UnknownQueryError(query_id)
        return found

    def more_results(self, query_id: str, offset: int, limit: int) -> list[SearchResult]:
        """Further results of a recorded query, added to those people can vote on."""
        query = self.query(str(query_id))
        if query["model_version"] != self.model.model_version:
            raise FeedbackError("the model changed since this search: search again")
        found = self._search(query["embedding"], offset + limit + 1)
        found = [r for r in found if r.face_id != query.get("query_face_id")][offset:offset + limit]
        shown = set(query.get("result_face_ids") or [])
        new = [r.face_id for r in found if r.face_id not in shown]
        if new:
            self.store.add_results(query["query_id"], new)
            with self._lock:
                if query["query_id"] in self._queries:
                    self._queries[query["query_id"]]["result_face_ids"] = [*shown, *new]
        return found

    def vote(self, query_id: str, result_id: int, vote: str, voter: str | None = None,
             session_id: str | None = None) -> Vote:
        """Check a vote against its query and the catalog, then store it (committed when returned)."""
        if vote not in VOTES:
            raise FeedbackError(f"vote must be 'up' or 'down', not {vote!r}")
        query = self.query(str(query_id))
        try:
            result_id = int(result_id)
        except (TypeError, ValueError):
            raise UnknownFaceError(result_id) from None
        if result_id not in (query.get("result_face_ids") or []):
            raise NotAResultError(query["query_id"], result_id)
        face = self.face_record(result_id)
        if face["model_version"] != query["model_version"]:
            raise FeedbackError(f"face {face['face_id']} is embedded by {face['model_version']}, the query by "
                                f"{query['model_version']}: search again")
        return self.store.upsert_vote(
            query_id=query["query_id"], result_face_id=face["face_id"], vote=vote,
            voter=voter or session_id or "anonymous", session_id=session_id, model_version=query["model_version"],
            similarity=float(np.dot(query["embedding"], face["embedding"])), query_embedding=query["embedding"],
            result_embedding=face["embedding"], result_image_id=face["image_id"], result_path=face["path"],
            result_bbox=face["bbox"], result_metadata=face["metadata"])

    def export(self, out_dir: str | os.PathLike) -> ExportReport:
        """The votes as training pairs and triplets (see :func:`face_assets.feedback.export_feedback`)."""
        return export_feedback(self.store, self.catalog, self._search, self.settings, self.model.model_version,
                               out_dir, match_threshold=self.model.match_threshold,
                               clusters_of=self._clusters.cluster_ids)

    def face_record(self, face_id: int) -> dict:
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


def _catalog_face_of(rows: list[tuple[int, float, float, float, float]], bbox: Sequence[float]) -> int | None:
    """The face among ``(face_id, x1, y1, x2, y2)`` rows (a catalog image's) at ``bbox``, if any."""
    from .detection import box_iou  # with the detector: only a search that has a photo needs it

    best = max(rows, key=lambda r: box_iou(bbox, r[1:]), default=None)
    return int(best[0]) if best is not None and box_iou(bbox, best[1:]) >= 0.5 else None


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageLoadError(path, exc.strerror or str(exc)) from exc
