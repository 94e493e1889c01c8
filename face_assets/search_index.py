"""The library's search index: the faiss index of the running model version, kept in step with the
catalog and with the index other processes publish.

One job: the index as the library holds it. It reads the saved index on first use and repairs it
from the catalog (faces it misses added, ids the catalog no longer has dropped, a missing, corrupt
or other version's index rebuilt); it records the library's changes and saves them by appending to
the index's journal, or whole; it applies what other processes published since (:meth:`refresh`);
and it publishes the catalog's faces without loading the index (:meth:`publish`). The file format
and the journal are :mod:`face_assets.index`'s.

Locking: the library's lock (shared here) guards the index; saving also takes the catalog's
inter-process write lock, so two processes never interleave their index and catalog writes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

from .config import Settings
from .errors import IndexCorruptError, IndexNotFoundError
from .index import FaceIndex, IndexJournal, saved_ids, sorted_member
from .process import raise_to_normal_priority
from .running_model import RunningModel
from .storage import file_stamp
from .store import Catalog

logger = logging.getLogger(__name__)


class SearchIndex:
    """The faiss index of a library's running model version, with its saved file and journal."""

    def __init__(self, settings: Settings, lock: threading.RLock, model: RunningModel):
        self.settings = settings
        self._lock = lock
        self.model = model
        self.catalog: Catalog | None = None
        self._index: FaceIndex | None = None
        self._index_sum: bytes | None = None  # checksum of the saved index ours was read from
        self._journal_end = 0  # bytes of its journal applied to ours
        self._pending: list[tuple[int, np.ndarray, np.ndarray | None]] = []  # our changes not saved yet
        self._full_save = False  # ours replaced the index as a whole: save it whole
        self._index_stamp: tuple[int, int] | None = None
        self._index_checked = 0.0
        self._loading = threading.Lock()  # held while a newer published index is read, off the lock
        self.unsaved = 0
        """Images whose faces changed the index since it was last saved."""

    @property
    def index_path(self) -> Path:
        """File of the persisted faiss index."""
        return self.settings.layout.index

    def open(self, catalog: Catalog) -> None:
        """Follow ``catalog`` (the library opened it again); the index is read again on first use."""
        self.catalog = catalog
        self._index = None  # read on first use: stats, lists and curation never load it

    @property
    def loaded(self) -> FaceIndex | None:
        """The index if it was read already, else None (nothing is read)."""
        return self._index

    @property
    def index(self) -> FaceIndex:
        """The index, read on first use and repaired from the catalog if they disagree."""
        with self._lock:
            if self._index is None:
                self._index = self._read_index()
                if self.reconcile():
                    self.save_index()
            return self._index

    def reset(self) -> None:
        """Replace the index with an empty one of the running version (a clear, another model): the
        next save writes it whole."""
        self._index, self._pending, self._full_save = self._new_index(), [], True

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add faces to the index, and to the changes the next save appends to its journal."""
        ids = np.asarray(ids, np.int64)
        vectors = np.asarray(vectors, np.float32)
        self.index.add(ids, vectors)
        self._pending.append((IndexJournal.ADD, ids, vectors))

    def remove(self, ids: np.ndarray) -> None:
        """Remove faces from the index, and record it for the journal."""
        ids = np.asarray(ids, np.int64)
        if self.index.remove(ids):
            self._pending.append((IndexJournal.REMOVE, ids, None))

    def count_image(self) -> int:
        """Count one more image whose faces changed the index; returns how many since the last save."""
        self.unsaved += 1
        return self.unsaved

    def _read_index(self) -> FaceIndex:
        """The saved index of the active model version, or a new empty one (missing, corrupt, other version)."""
        try:
            index = FaceIndex.load(self.index_path)
            stamp = self._stamp()
            if index.model_version != self.model.model_version:
                logger.warning("index holds %s embeddings, library uses %s: rebuilding",
                               index.model_version, self.model.model_version)
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
        """Apply what another process appended to the published index's journal, or read a newer
        index saved whole; at most every ``storage.index_refresh_seconds``. A whole index is read by
        one thread at a time, outside the lock: with ``wait=False`` on a thread of its own, while
        searches go on with the index in memory. Returns whether this call changed the index."""
        with self._lock:
            if not wait and self._loading.locked():
                return False  # a newer index is being read: go on with this one
            if time.monotonic() - self._index_checked < self.settings.storage.index_refresh_seconds:
                return False
            self._index_checked = time.monotonic()
            if self.unsaved or self._index is None:
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
                threading.Thread(target=self._load_published_soon, name="index-loader", daemon=True).start()
                return False
        return self._load_published()

    def _load_published_soon(self) -> None:
        """:meth:`_load_published` on the loader thread, at normal priority: the searches that start
        it run lower, and new faces are not searchable until it is done."""
        raise_to_normal_priority()
        self._load_published()

    def _load_published(self) -> bool:
        """Read the published index outside the lock, one reader at a time, and swap it in; True when swapped."""
        with self._loading:
            with self._lock:
                if self._stamp() == self._index_stamp:
                    return False  # read by the thread before this one
            index = None
            try:
                index = FaceIndex.load(self.index_path)
            except (IndexNotFoundError, IndexCorruptError) as exc:
                logger.warning("published index %s not loaded: %s", self.index_path, exc)
            with self._lock:
                if index is None or self.unsaved:
                    return False
                if index.model_version != self.model.model_version:
                    self.model.select(self.catalog)
                    if index.model_version != self.model.model_version:
                        return False  # a half-finished switch elsewhere: keep searching the index we have
                    logger.info("now running model %s (%s), promoted by another process", self.model.version,
                                self.model.model_version)
                journal = IndexJournal(self.index_path)
                checksum = journal.index_checksum()
                records, end = journal.read(checksum)
                index.apply(records)
                self._index, self._index_stamp, self._index_sum, self._journal_end = index, self._stamp(), checksum, end
                self._pending, self._full_save = [], False
        logger.info("loaded the index published at %s: %d faces", self.index_path, len(index))
        return True

    def save_index(self) -> None:
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
                    self.reconcile()
                self.index.save(self.index_path)
                self._index_sum = journal.index_checksum()
                self._journal_end = journal.size()
            elif self._pending:
                self._journal_end = journal.append(checksum, self._pending, end)
            else:
                self._journal_end = end
        self._pending, self._full_save = [], False
        self._index_stamp = self._stamp()
        self.unsaved = 0

    def published_ids(self) -> np.ndarray | None:
        """The face ids of the published index and its journal (sorted), without loading the index;
        None when it cannot be told that way."""
        base = saved_ids(self.index_path)
        if base is None or self.sidecar().get("model_version") != self.model.model_version:
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
        # Patched in place by binary searches: a set operation over the 2M saved ids (np.union1d
        # hashes or sorts them all) took 2 s, twice per index run.
        gone = last_ids[~last_added]
        base = np.delete(base, np.searchsorted(base, gone)[sorted_member(base, gone)])
        new = last_ids[last_added]
        new = new[~sorted_member(base, new)]
        return np.insert(base, np.searchsorted(base, new), new)

    def publish(self) -> dict:
        """Bring the published index up to date with the catalog: by the journal without loading the
        index, or whole; returns what was done."""
        with self._lock, self.catalog.db.locked():
            expected = self.catalog.valid_face_ids(self.model.model_version)
            held = self.published_ids()
            journal = IndexJournal(self.index_path)
            limit = max(self.settings.storage.index_journal_min_bytes,
                        self.settings.storage.index_journal_share * (self.index_path.stat().st_size
                                                                     if self.index_path.is_file() else 0))
            if held is None or self.unsaved or journal.size() > limit:
                before = held if held is not None else np.zeros(0, np.int64)
                self.index  # noqa: B018 - loaded and repaired from the catalog
                self._full_save = True
                self.save_index()
                return {"mode": "whole", "added": int(np.setdiff1d(expected, before).size),
                        "removed": int(np.setdiff1d(before, expected).size), "index_size": int(len(expected))}
            add = expected[~sorted_member(held, expected)]
            remove = held[~sorted_member(expected, held)]
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

    def size_and_type(self) -> tuple[int, str | None]:
        """Faces held and the resolved index type: of the loaded index, else from the published
        index's sidecar (no load)."""
        if self._index is None:
            side = self.sidecar()
            return side.get("count", 0), side.get("resolved_factory")
        return len(self._index), self._index.resolved_factory

    def sidecar(self) -> dict:
        """The metadata sidecar of the saved index (count, type, model version); empty when there is none."""
        path = self.index_path
        try:
            return json.loads(path.with_name(path.name + ".json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _new_index(self) -> FaceIndex:
        cfg = self.settings.storage
        return FaceIndex(dim=self.model.embedding_dim, factory=cfg.index_factory, model_version=self.model.model_version)

    def reconcile(self) -> bool:
        """Add the catalog's searchable faces the index misses and drop ids it no longer has; True if changed."""
        catalog_ids = self.catalog.valid_face_ids(self.model.model_version)
        index_ids = np.unique(np.asarray(self.index.ids(), np.int64))
        extra = np.setdiff1d(index_ids, catalog_ids, assume_unique=True)
        missing = np.setdiff1d(catalog_ids, index_ids, assume_unique=True)
        if len(extra):
            self.remove(extra)
        if len(missing):
            ids, vectors = self.catalog.embeddings(missing.tolist())
            self.add(ids, vectors)
        if len(extra) or len(missing):
            logger.info("index repaired from catalog: %d added, %d removed", len(missing), len(extra))
        return bool(len(extra) or len(missing))
