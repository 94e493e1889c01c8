"""DuckDB files that several processes share: short sessions under a lock, and a published snapshot.

DuckDB lets one process open a file read-write, or several open it read-only, never both; a second
open fails at once. A deployment runs the search service, the Dagster daemon's runs, CLI commands
and analysts' SQL on one data folder, so no process here keeps a store file open:

- The **master** file of a store (``<data_dir>/store/<name>.duckdb``) is opened only for the length
  of one session: a write session (one transaction) under an exclusive inter-process lock, or a
  read session under a shared one. The lock is a ``flock`` on ``<master>.lock``; a process waits
  for it with backoff up to ``storage.lock_timeout_seconds`` and then raises
  :class:`~face_assets.errors.StoreBusyError`. Threads of one process take turns (DuckDB keeps one
  database instance per file and process).
- After a write session the master is checkpointed and **published**: copied beside its public name
  (``<data_dir>/face_assets.duckdb`` for the catalog) and renamed over it, so a reader of the
  public file always sees a whole, committed state, and a reader that keeps its connection open
  keeps reading the state it opened while newer ones are published. Analysts, BI tools and the
  service's search path read the published file read-only and never block a writer.
  Publication is rate-limited to one per ``storage.publish_interval_seconds`` per process; a
  pending publication is made by a timer thread, by the next session, or on :meth:`DuckDBFile.close`.
- :meth:`DuckDBFile.submit` runs small writes of many threads in one transaction (group commit):
  the web service acknowledges each vote only after the transaction holding it committed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from .errors import StoreBusyError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LOCK_MESSAGES = ("Could not set lock", "Conflicting lock")
"""DuckDB's words when another process holds the file (an outside reader opened the master)."""


def is_lock_error(exc: BaseException) -> bool:
    """Whether ``exc`` is DuckDB refusing a file another process holds."""
    return isinstance(exc, duckdb.IOException) and any(m in str(exc) for m in _LOCK_MESSAGES)


class _FileLock:
    """One process's side of a file's inter-process lock: a thread lock around a ``flock``.

    One instance per lock file and process (see :func:`_file_lock`): two descriptors of one
    process would lock each other out.
    """

    def __init__(self, path: Path | None):
        self.path = path  # None: a store only this process sees, threads take turns and no flock is needed
        self.thread_lock = threading.RLock()
        self._fd: int | None = None
        self._mode: int | None = None
        self._depth = 0

    @contextmanager
    def hold(self, exclusive: bool, timeout: float) -> Iterator[None]:
        """Hold the lock (shared or exclusive) for the block; nested holds of one thread reuse it."""
        deadline = time.monotonic() + timeout
        if not self.thread_lock.acquire(timeout=max(timeout, 0.001)):
            raise StoreBusyError(self.path, timeout)
        try:
            if self._depth == 0:
                self._acquire(fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, deadline, timeout)
            elif exclusive and self._mode != fcntl.LOCK_EX:
                raise RuntimeError("a read session cannot open a write session inside it")
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    if self._fd is not None:
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
                    self._mode = None
        finally:
            self.thread_lock.release()

    def _acquire(self, mode: int, deadline: float, timeout: float) -> None:
        if self.path is None:
            self._mode = mode
            return
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        delay = 0.002
        while True:
            try:
                fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
                self._mode = mode
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreBusyError(self.path, timeout) from None
                # Jitter keeps waiting processes from retrying in step.
                time.sleep(min(delay * (0.5 + random.random()), max(deadline - time.monotonic(), 0.0)))
                delay = min(delay * 2, 0.1)


def file_stamp(path: Path) -> tuple[int, int] | None:
    """Identity of a file version, (inode, mtime): a file replaced by rename gets a new one. None when absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _copy(src: Path, dst: Path) -> None:
    """Copy a file, with ``copy_file_range`` where the kernel offers it: on XFS and Btrfs that shares
    the blocks (a reflink) instead of copying them, so publishing a large catalog costs no I/O."""
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            left = os.fstat(fin.fileno()).st_size
            while left > 0:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), left)
                if n == 0:
                    break
                left -= n
            if left == 0:
                return
    except OSError:
        pass  # not offered here (e.g. across file systems): copy the bytes
    shutil.copyfile(src, dst)


_LOCKS: dict[Path | None, _FileLock] = {}
_LOCKS_GUARD = threading.Lock()


def _file_lock(path: Path | None) -> _FileLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(path)
        if lock is None:
            lock = _LOCKS[path] = _FileLock(path)
        return lock


@dataclass
class _Pending:
    fn: Callable[[duckdb.DuckDBPyConnection], Any]
    wake: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    lead: bool = False
    result: Any = None
    error: BaseException | None = None


class DuckDBFile:
    """A DuckDB store file shared by processes: sessions, group commit and publication.

    Args:
        master: the file sessions open; nothing else should open it.
        published: where the committed state is published for readers (None: never published,
            e.g. a run's private staging file).
        schema: SQL run in the first write session of this process (``CREATE ... IF NOT EXISTS``).
        lock_timeout: seconds a session waits for another process before :class:`StoreBusyError`.
        publish_interval: at most one publication per this many seconds from this process.
        read_only: ``master`` is a published file: read sessions open it read-only with no lock
            (writers replace it, never change it in place), and write sessions are refused.
    """

    def __init__(self, master: str | os.PathLike, published: str | os.PathLike | None = None, *,
                 schema: str | None = None, lock_timeout: float = 120.0, publish_interval: float = 1.0,
                 read_only: bool = False):
        self.read_only = read_only
        # ":memory:" is a private, throw-away store (a report's scratch catalog): one connection for its life.
        self._memory = duckdb.connect(":memory:") if str(master) == ":memory:" else None
        self.master = Path(master).absolute()
        self.published = Path(published).absolute() if published is not None else None
        self.lock_timeout = lock_timeout
        self.publish_interval = publish_interval
        self._schema = schema
        self._schema_done = False
        self._ensured: set[str] = set()
        self._lock = _file_lock(None if self._memory is not None else self.master.with_name(self.master.name + ".lock"))
        self._local = threading.local()
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._leader = False
        self._dirty = False
        self._last_publish = 0.0
        self._timer: threading.Timer | None = None
        self._snapshot: tuple[duckdb.DuckDBPyConnection, tuple[int, int]] | None = None
        self._snapshot_lock = threading.Lock()
        if schema is not None and not read_only and (self._memory is not None or not self.master.is_file()):
            with self.write():
                pass  # creates the file with its schema, and publishes it

    # -- sessions -------------------------------------------------------------------------------
    @property
    def _current(self) -> tuple[duckdb.DuckDBPyConnection, bool] | None:
        return getattr(self._local, "session", None)

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Open the master, retrying while an outside process (one that takes no lock) holds it."""
        if self._memory is not None:
            return self._memory
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.01
        while True:
            try:
                return duckdb.connect(str(self.master), read_only=read_only)
            except duckdb.IOException as exc:
                if not is_lock_error(exc) or time.monotonic() >= deadline:
                    if is_lock_error(exc):
                        raise StoreBusyError(self.master, self.lock_timeout) from exc
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection to read the master's latest committed state; inside a write session, its connection."""
        current = self._current
        if current is not None:
            yield current[0]
            return
        if self.read_only:
            con = duckdb.connect(str(self.master), read_only=True)
            try:
                yield con
            finally:
                con.close()
            return
        if self._memory is None and not self.master.is_file():
            with self.write() as con:  # nothing to read yet: create the file (and schema) first
                yield con
            return
        with self._lock.hold(exclusive=False, timeout=self.lock_timeout):
            con = self._connect(read_only=True)
            self._local.session = (con, False)
            try:
                yield con
            finally:
                self._local.session = None
                self._release(con)

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One transaction on the master under the exclusive lock; committed, checkpointed and published.

        Nested write sessions of one thread join the outer transaction.
        """
        if self.read_only:
            raise PermissionError(f"{self.master} is a published copy: open the store's master to write")
        current = self._current
        if current is not None:
            if not current[1]:
                raise RuntimeError("a read session cannot open a write session inside it")
            yield current[0]
            return
        with self._lock.hold(exclusive=True, timeout=self.lock_timeout):
            self.master.parent.mkdir(parents=True, exist_ok=True)
            con = self._connect(read_only=False)
            self._local.session = (con, True)
            try:
                if self._schema is not None and not self._schema_done:
                    con.execute(self._schema)
                    self._schema_done = True
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
                # Fold the log into the file: the next process opens it without replaying it, and
                # the published copy is the whole committed state.
                if self._memory is None:
                    con.execute("CHECKPOINT")
            finally:
                self._local.session = None
                self._release(con)
            self._dirty = True
            self._publish_if_due()

    def _release(self, con: duckdb.DuckDBPyConnection) -> None:
        if con is not self._memory:
            con.close()

    def ensure(self, schema: str, table: str) -> None:
        """Create the tables of ``schema`` unless ``table`` exists: for a module that keeps its own
        tables in this file. Checked once per process; a read-only file is left as it is."""
        if self.read_only or table in self._ensured:
            return
        with self.read() as con:
            found = con.execute("SELECT 1 FROM information_schema.tables WHERE table_name = ?", [table]).fetchall()
        if not found:
            with self.write() as con:
                con.execute(schema)
        self._ensured.add(table)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's exclusive lock without opening it: for a file that changes together with
        the store (the faiss index beside the catalog), so no writer of the store interleaves."""
        if self.read_only:
            raise PermissionError(f"{self.master} is a published copy: lock the store's master")
        with self._lock.hold(exclusive=True, timeout=self.lock_timeout):
            yield

    def submit(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``fn(connection)`` in a write transaction, grouped with other threads' concurrent calls.

        Returns once the transaction holding it committed. When one call of a group raises, the
        group is rolled back and each call runs again alone, so one bad call fails only itself.
        """
        if self._current is not None:
            return self._run_alone(fn)
        item = _Pending(fn)
        with self._queue_lock:
            self._queue.append(item)
            if not self._leader:
                self._leader = item.lead = True
        while not item.lead:
            item.wake.wait()
            item.wake.clear()
            if item.done:
                if item.error is not None:
                    raise item.error
                return item.result
        self._lead(item)
        if item.error is not None:
            raise item.error
        return item.result

    def _lead(self, own: _Pending) -> None:
        """Commit queued calls, in groups, until ``own`` is done; then hand the lead to a waiting call."""
        while not own.done:
            with self._queue_lock:
                group, self._queue = self._queue, []
            try:
                with self.write() as con:
                    for item in group:
                        item.result = item.fn(con)
            except BaseException:
                for item in group:
                    try:
                        item.result = self._run_alone(item.fn)
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                        item.error = exc
            for item in group:
                item.done = True
                item.wake.set()
        with self._queue_lock:
            if self._queue:
                self._queue[0].lead = True
                self._queue[0].wake.set()
            else:
                self._leader = False

    def _run_alone(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        with self.write() as con:
            return fn(con)

    # -- publication ----------------------------------------------------------------------------
    def _publish_if_due(self) -> None:
        if self.published is None:
            return
        wait = self._last_publish + self.publish_interval - time.monotonic()
        if wait <= 0:
            self.publish()
        elif self._timer is None:
            self._timer = threading.Timer(wait, self._publish_pending)
            self._timer.daemon = True
            self._timer.start()

    def _publish_pending(self) -> None:
        self._timer = None
        try:
            self.publish()
        except Exception:  # noqa: BLE001 - a timer thread has no caller; the next session publishes again
            logger.exception("publishing %s failed", self.published)

    def publish(self) -> None:
        """Copy the master to its published name atomically, if this process changed it since the last copy."""
        if self.published is None or not self._dirty:
            return
        with self._lock.hold(exclusive=True, timeout=self.lock_timeout):
            if not self._dirty:
                return
            partial = self.published.with_name(f".{self.published.name}.{os.getpid()}.partial")
            self.published.parent.mkdir(parents=True, exist_ok=True)
            _copy(self.master, partial)
            os.replace(partial, self.published)
            self._dirty = False
            self._last_publish = time.monotonic()

    def snapshot(self) -> duckdb.DuckDBPyConnection | None:
        """A read-only connection to the published file, reopened when a newer one was published.

        None before anything was published. Share it only under :attr:`snapshot_lock`.
        """
        key = None if self.published is None else file_stamp(self.published)
        if key is None:
            return None
        if self._snapshot is not None and self._snapshot[1] == key:
            return self._snapshot[0]
        if self._snapshot is not None:
            self._snapshot[0].close()
        self._snapshot = (duckdb.connect(str(self.published), read_only=True), key)
        return self._snapshot[0]

    def read_ids(self, sql: str, ids: list[int]) -> list[tuple]:
        """Rows of ``sql`` (one parameter: a list of ids; first column: the id) from the published file,
        then from the master for the ids not published yet.

        The service's search path reads here: it never waits for a writer while the ids it looks
        up are published. A process whose own changes are not published yet reads the master, so
        it always reads its own writes.
        """
        if not ids:
            return []
        rows: list[tuple] = []
        with self._snapshot_lock:
            con = None if self.read_only or self._dirty else self.snapshot()
            if con is not None:
                try:
                    rows = con.execute(sql, [ids]).fetchall()
                except duckdb.CatalogException:
                    rows = []  # published before the table existed
        missing = sorted(set(ids) - {r[0] for r in rows})
        if missing:
            with self.read() as con:
                rows += con.execute(sql, [missing]).fetchall()
        return rows

    @property
    def snapshot_lock(self) -> threading.Lock:
        """Serializes the threads that use :meth:`snapshot`'s connection."""
        return self._snapshot_lock

    def close(self) -> None:
        """Publish what is pending and close the snapshot connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.publish()
        with self._snapshot_lock:
            if self._snapshot is not None:
                self._snapshot[0].close()
                self._snapshot = None
