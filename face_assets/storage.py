"""DuckDB files that several processes share: short sessions under a lock, and a published snapshot.

DuckDB lets one process open a file read-write, or several open it read-only, never both; a second
open fails at once. A deployment runs the search service, the Dagster daemon's runs, CLI commands
and analysts' SQL on one data folder, so no process here keeps a store file open:

- The **master** file of a store (``<data_dir>/store/<name>.duckdb``) is opened only for the length
  of one session: a write session (one transaction) under an exclusive inter-process lock, or a
  read session under a shared one. The lock is a ``flock`` on ``<master>.lock``; a process waits
  for it with backoff up to ``storage.lock_timeout_seconds`` and then raises
  :class:`~face_assets.errors.StoreBusyError`; a waiting writer holds a gate that new readers pass
  (``<master>.lock.gate``), so readers cannot starve it. Threads of one process take turns (DuckDB
  keeps one database instance per file and process).
- After a write session the master's committed state is **published** for readers who must never
  wait for a writer (analysts, BI tools, the service's search path), as **segments** (the
  tables a store declares with :class:`Table`): each published table is a set of immutable Parquet
  files under ``<data_dir>/published/<name>/``, a base and the deltas written since, and the
  published file (``<data_dir>/face_assets.duckdb``, ``<data_dir>/feedback.duckdb``) is a small
  DuckDB file of views over them, written in a storage version every DuckDB 1.x reads, after the
  session and outside the master's lock. Stores log
  what a write changes (:func:`log_changes`, :func:`log_appends`, :func:`log_all`) in the same
  transaction, so a publication exports only the changed rows: its cost follows the change, not
  the store. A delta also lists the keys it supersedes; a view keeps a row unless a later segment
  lists its key. Many deltas are folded together from the Parquet files themselves
  (:meth:`DuckDBFile.compact`), never under the master's lock; files no view names any more are
  deleted after ``retention`` seconds, so a reader that keeps the views it opened keeps reading.

  A reader sees a whole committed state (a batch merged in one transaction is all
  there or not at all). Publication is rate-limited to one per ``storage.publish_interval_seconds``
  per process; a pending publication is made by a timer thread, by the next session, or on
  :meth:`DuckDBFile.close`. The change log lives in the master, so changes a process committed
  but did not publish (it died) are published by the next publication of any process.
- :meth:`DuckDBFile.submit` runs small writes of many threads in one transaction (group commit):
  the web service acknowledges each vote only after the transaction holding it committed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import MigrationRequiredError, StoreBusyError
from .process import raise_to_normal_priority, set_thread_nice

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LOCK_MESSAGES = ("Could not set lock", "Conflicting lock")
"""DuckDB's words when another process holds the file (an outside reader opened the master)."""


def utc_now() -> datetime:
    """Now, in UTC: the time every store writes in its ``TIMESTAMPTZ`` columns."""
    return datetime.now(timezone.utc)


def is_lock_error(exc: BaseException) -> bool:
    """Whether ``exc`` is DuckDB refusing a file another process holds."""
    return isinstance(exc, duckdb.IOException) and any(m in str(exc) for m in _LOCK_MESSAGES)


class _FileLock:
    """One process's side of a file's inter-process lock: a thread lock around a ``flock``.

    One instance per lock file and process (see :func:`_file_lock`): two descriptors of one
    process would lock each other out.

    Writers are not starved by readers: a session passes a gate (``<lock>.gate``) first, which a
    writer holds while it waits for the readers in session to finish, so no new reader starts
    before it. Without it, readers in back-to-back sessions (a re-clustering reading 2M faces in
    chunks, the service's pages) kept the shared lock taken and a writer waited until they stopped.
    """

    def __init__(self, path: Path | None):
        self.path = path  # None: a store only this process sees, threads take turns and no flock is needed
        self.gate = None if path is None else path.with_name(path.name + ".gate")
        self.thread_lock = threading.RLock()
        self._fd: int | None = None
        self._gate_fd: int | None = None
        self._mode: int | None = None
        self._depth = 0

    @contextmanager
    def hold(self, exclusive: bool, timeout: float) -> Iterator[None]:
        """Hold the lock (shared or exclusive) for the block; nested holds of one thread reuse it.

        The holding thread runs at normal CPU priority meanwhile: a store's lock makes every other
        process wait for its holder, so its cost must be its own, short (see
        :func:`~face_assets.process.raise_to_normal_priority`).
        """
        deadline = time.monotonic() + timeout
        if not self.thread_lock.acquire(timeout=max(timeout, 0.001)):
            raise StoreBusyError(self.path, timeout)
        lowered: int | None = None
        try:
            if self._depth == 0:
                lowered = raise_to_normal_priority() if self.path is not None else None
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
            if lowered is not None:
                set_thread_nice(lowered)
            self.thread_lock.release()

    def _acquire(self, mode: int, deadline: float, timeout: float) -> None:
        if self.path is None:
            self._mode = mode
            return
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._gate_fd = os.open(self.gate, os.O_RDWR | os.O_CREAT, 0o644)
        assert self._gate_fd is not None
        self._wait(self._gate_fd, mode, deadline, timeout)  # shared for readers: they pass unless a writer waits
        try:
            self._wait(self._fd, mode, deadline, timeout)
            self._mode = mode
        finally:
            fcntl.flock(self._gate_fd, fcntl.LOCK_UN)

    def _wait(self, fd: int, mode: int, deadline: float, timeout: float) -> None:
        """Take ``flock(fd, mode)``, retrying with backoff until ``deadline``."""
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
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


# -- segment publication: what each store logs, and the files readers open --------------------------

PUBLICATION_SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS _change_seq START 1;
CREATE TABLE IF NOT EXISTS _published_tables (tbl VARCHAR PRIMARY KEY, key VARCHAR, exclude VARCHAR[] NOT NULL,
                                              ord VARCHAR);
CREATE TABLE IF NOT EXISTS _changes (
    tbl VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,  -- 'key': a row changed or was deleted; 'append': new keys lo..hi; 'all': the whole table
    lo BIGINT,
    hi BIGINT,
    seq BIGINT NOT NULL DEFAULT nextval('_change_seq')
);
CREATE TABLE IF NOT EXISTS _segments (
    tbl VARCHAR NOT NULL,
    seg BIGINT NOT NULL,
    data VARCHAR NOT NULL,
    keys VARCHAR,
    rows BIGINT NOT NULL,
    base BOOLEAN NOT NULL,
);
"""
"""The master's publication bookkeeping: declared tables, the change log since the last publication,
and the segment files the views name."""


@dataclass(frozen=True)
class ColumnUpgrade:
    """A column that a table written by an older release lacks, and the statements that add it (run once,
    by ``face-assets migrate``; the normal opens refuse a file that still lacks it).

    Args:
        table: the table.
        column: the column it gained.
        statements: what adds it (valid on every backend of the store), in one transaction with the rest.
    """

    table: str
    column: str
    statements: tuple[str, ...]


PUBLICATION_UPGRADES = (
    ColumnUpgrade("_published_tables", "ord", ("ALTER TABLE _published_tables ADD COLUMN ord VARCHAR",)),
)
"""Columns the publication bookkeeping gained since its first release."""

COLUMNS_SQL = ("SELECT table_name, column_name FROM information_schema.columns "
               "WHERE table_schema = current_schema()")
"""The ``(table, column)`` pairs of a database (DuckDB and PostgreSQL alike)."""


def table_columns(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str]]:
    """The ``(table, column)`` pairs of the file ``con`` has open (:data:`COLUMNS_SQL`)."""
    return {(t, c) for t, c in con.execute(COLUMNS_SQL).fetchall()}


def pending_upgrades(columns: set[tuple[str, str]], upgrades: Sequence[ColumnUpgrade]) -> list[ColumnUpgrade]:
    """The upgrades a database with these ``(table, column)`` pairs still needs: its table is there without
    the column (a missing table is created whole, in the current layout, by its store's schema)."""
    tables = {t for t, _ in columns}
    return [u for u in upgrades if u.table in tables and (u.table, u.column) not in columns]


def require_current(columns: set[tuple[str, str]], upgrades: Sequence[ColumnUpgrade], where: object) -> None:
    """Raise :class:`MigrationRequiredError` naming what ``where`` lacks when an upgrade is pending."""
    pending = pending_upgrades(columns, upgrades)
    if pending:
        raise MigrationRequiredError(where, [f"table {u.table} without column {u.column}" for u in pending])


VIEWS_STORAGE_VERSION = "v1.0.0"
"""Storage version of the published views file: the oldest DuckDB 1.x reads it (DuckDB 2 writes a
newer one by default, which the 1.x CLI and BI drivers refuse)."""


@dataclass(frozen=True)
class Table:
    """A table of a store that is published as Parquet segments.

    Args:
        name: the table.
        key: an integer column that identifies a row, or a group of rows exported together (the
            pairs of one face); writes log the keys they change, and a publication exports the
            current rows of those keys only. None: the table is small and exported whole whenever
            a write logs a change to it.
        exclude: columns readers do not get (internal state, such as cluster centroids).
        order: the column a base segment is sorted by, when lookups go by another column than
            the key (images by ``image_id``): the scan skips the row groups that cannot match.
    """

    name: str
    key: str | None
    exclude: tuple[str, ...] = ()
    order: str | None = None


def log_changes(con: duckdb.DuckDBPyConnection, table: str, keys: Any) -> None:
    """Record, in the write session's transaction, that the rows of ``table`` with these keys
    changed or were deleted: the next publication exports their current rows, and supersedes the
    published ones."""
    keys = [int(k) for k in keys]
    if keys:
        con.execute("INSERT INTO _changes (tbl, kind, lo, hi) SELECT ?, 'key', k, k FROM unnest(?) AS u(k)",
                    [table, keys])


def log_changes_where(con: duckdb.DuckDBPyConnection, table: str, key: str, where: str,
                      params: list[Any] | None = None) -> None:
    """:func:`log_changes` for the rows of ``table`` that ``where`` selects now (call it before an
    UPDATE or DELETE with the same condition)."""
    con.execute(f"INSERT INTO _changes (tbl, kind, lo, hi) SELECT ?, 'key', {key}, {key} FROM {table} WHERE {where}",
                [table, *(params or [])])


def log_appends(con: duckdb.DuckDBPyConnection, table: str, lo: int, hi: int) -> None:
    """Record that rows with the new keys ``lo..hi`` were added to ``table`` (keys never published
    before, such as fresh face ids): published without superseding anything."""
    if hi >= lo:
        con.execute("INSERT INTO _changes (tbl, kind, lo, hi) VALUES (?, 'append', ?, ?)", [table, int(lo), int(hi)])


def log_all(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """Record that ``table`` changed as a whole (a full re-clustering, a clear): the next
    publication exports it whole, as a new base."""
    con.execute("INSERT INTO _changes (tbl, kind) VALUES (?, 'all')", [table])


def _sql_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _write_parquet(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any], path: Path) -> int:
    """Stream a query's rows into a Parquet file written beside ``path`` and renamed into place
    (Arrow's writer: several times faster than DuckDB's COPY for lists of floats); returns the rows."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    reader = con.sql(sql, params=params or None).to_arrow_reader(65_536)
    rows = 0
    with pq.ParquetWriter(tmp, reader.schema) as writer:
        for batch in reader:
            # Row groups of 16k rows: a lookup of one face's embedding reads 32 MiB, not a whole batch.
            writer.write_batch(batch, row_group_size=16_384)
            rows += batch.num_rows
    tmp.replace(path)
    return rows


def _retire(paths: list[Path]) -> None:
    """Stamp files that no view names any more: :func:`_sweep` deletes them ``retention`` seconds later."""
    for path in paths:
        try:
            os.utime(path)
        except FileNotFoundError:
            pass


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
        publish_interval: at most one publication per this many seconds from this process; a write
            session exports its changes when one is due, and the views file is written after it
            returns, on a thread of its own. 0: every write session publishes before it returns.
        read_only: ``master`` is a published file: read sessions open it read-only with no lock
            (writers replace it, never change it in place), and write sessions are refused.
        retention: seconds a segment file no view names any more is kept for readers that still
            hold the views they opened.
        max_deltas: delta segments a table collects before they are folded together.
    """

    def __init__(self, master: str | os.PathLike, published: str | os.PathLike | None = None, *,
                 schema: str | None = None, lock_timeout: float = 120.0, publish_interval: float = 1.0,
                 read_only: bool = False, retention: float = 3600.0,
                 max_deltas: int = 16, upgrades: Sequence[ColumnUpgrade] = ()):
        self.read_only = read_only
        self.upgrades = (*PUBLICATION_UPGRADES, *upgrades)
        # ":memory:" is a private, throw-away store (a report's scratch catalog): one connection for its life.
        self._memory = duckdb.connect(":memory:") if str(master) == ":memory:" else None
        self.master = Path(master).absolute()
        self.published = Path(published).absolute() if published is not None else None
        self.lock_timeout = lock_timeout
        self.publish_interval = publish_interval
        self.retention = retention
        self.max_deltas = max_deltas
        # Every writable file keeps the change log (a run's staging file too, though it is not published).
        self.segments_dir = (self.published.parent / "published" / self.published.stem
                             if self.published is not None and not read_only else None)
        self._schema = None if read_only else PUBLICATION_SCHEMA + (schema or "")
        self._schema_done = False
        self._ensured: set[str] = set()
        self._declared: set[str] = set()
        self._known: tuple[set[tuple[str, str]], dict[str, tuple[str | None, tuple[str, ...], str | None]]] | None = None
        self._lock = _file_lock(None if self._memory is not None else self.master.with_name(self.master.name + ".lock"))
        self._local = threading.local()
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._leader = False
        self._dirty = False
        self._last_publish = 0.0
        self._timer: threading.Timer | None = None
        self._compactor: threading.Thread | None = None
        self._views: tuple[int, list[tuple]] | None = None  # (version, segment rows) exported, views not written
        self._views_lock = threading.Lock()
        self._snapshot: tuple[duckdb.DuckDBPyConnection, tuple[int, int]] | None = None
        self._snapshot_lock = threading.Lock()
        if self._schema is not None and not read_only and (self._memory is not None or not self.master.is_file()):
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
                con = duckdb.connect(str(self.master), read_only=read_only)
                con.execute("SET enable_progress_bar = false")  # a long export would draw on the caller's terminal
                return con
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
            raise PermissionError(f"{self.master} is a published file: open the store's master to write")
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
                    require_current(table_columns(con), self.upgrades, self.master)
                    con.execute(self._schema)
                    self._schema_done = True
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
                self._dirty = True
                # Segments are exported on this session's connection when due: no second open.
                if self.published is not None and self._publish_due() <= 0:
                    self._export(con)
                # Fold the log into the file: the next process opens it without replaying it.
                if self._memory is None:
                    con.execute("CHECKPOINT")
            finally:
                self._local.session = None
                self._release(con)
        if self.publish_interval <= 0 or (self.published is not None and not self.published.is_file()):
            self._write_pending_views()  # no rate limit, or the first publication: visible when this returns
        else:
            self._write_views_soon()
        self._publish_if_due()

    def _release(self, con: duckdb.DuckDBPyConnection) -> None:
        if con is not self._memory:
            con.close()

    def _shape(self) -> tuple[set[tuple[str, str]], dict[str, tuple[str | None, tuple[str, ...], str | None]]]:
        """The file's ``(table, column)`` pairs and its declared tables, read once per process in one
        session (every store checks its tables when it opens: one session instead of one each)."""
        if self._known is None:
            with self.read() as con:
                columns = table_columns(con)
                if not self.read_only:
                    require_current(columns, self.upgrades, self.master)
                declared = {r[0]: (r[1], tuple(r[2]), r[3]) for r in con.execute(
                    "SELECT tbl, key, exclude, ord FROM _published_tables").fetchall()} \
                    if ("_published_tables", "tbl") in columns else {}
            self._known = (columns, declared)
        return self._known

    def declare(self, tables: list[Table]) -> None:
        """Publish these tables as segments (see :class:`Table`); a table declared for the first
        time, or declared otherwise than before, is exported whole by the next publication.
        Checked once per table and process; on a read-only file nothing is done."""
        todo = [t for t in tables if t.name not in self._declared]
        if self.read_only or not todo:
            return
        known = self._shape()[1]
        changed = [t for t in todo if known.get(t.name) != (t.key, t.exclude, t.order)]
        if changed:
            with self.write() as con:
                for t in changed:
                    con.execute("INSERT OR REPLACE INTO _published_tables (tbl, key, exclude, ord) VALUES (?, ?, ?, ?)",
                                [t.name, t.key, list(t.exclude), t.order])
                    log_all(con, t.name)
                    known[t.name] = (t.key, t.exclude, t.order)
        elif self.published is not None and not self.published.is_file():
            self._dirty = True  # the views file is gone (or was never written): the next publication writes it
        self._declared.update(t.name for t in todo)

    def ensure(self, schema: str, table: str) -> None:
        """Create the tables of ``schema`` unless ``table`` exists: for a module that keeps its own
        tables in this file. Checked once per process; a read-only file is left as it is."""
        if self.read_only or table in self._ensured:
            return
        if not any(t == table for t, _ in self._shape()[0]):
            with self.write() as con:
                con.execute(schema)
            self._known = None  # tables were added: read the shape again when next asked
        self._ensured.add(table)

    def migrate(self) -> list[str]:
        """Bring a master written by an older release to this one's layout (``face-assets migrate``): the
        columns of :attr:`upgrades` it lacks are added in one transaction under the exclusive lock, and
        nothing else changes. Returns what was done: nothing for a current file, or none at all."""
        if self.read_only or self._memory is not None or not self.master.is_file():
            return []
        with self._lock.hold(exclusive=True, timeout=self.lock_timeout):
            con = self._connect(read_only=False)
            try:
                pending = pending_upgrades(table_columns(con), self.upgrades)
                if not pending:
                    return []
                con.execute("BEGIN TRANSACTION")
                try:
                    for upgrade in pending:
                        for statement in upgrade.statements:
                            con.execute(statement)
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
                con.execute("CHECKPOINT")
            finally:
                self._release(con)
        self._known = None
        return [f"{self.master.name}: column {u.column} added to table {u.table}" for u in pending]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's exclusive lock without opening it: for a file that changes together with
        the store (the faiss index beside the catalog), so no writer of the store interleaves."""
        if self.read_only:
            raise PermissionError(f"{self.master} is a published file: lock the store's master")
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
    def _publish_due(self) -> float:
        """Seconds until the next publication is allowed (<= 0: now)."""
        return self._last_publish + self.publish_interval - time.monotonic()

    def _publish_if_due(self) -> None:
        if self.published is None or not self._dirty:
            return
        wait = self._publish_due()
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
        """Publish the committed state now, if this process changed it since its last publication:
        the logged changes as segments (see the module doc), then the views file, before returning."""
        if self.published is None:
            return
        if self._dirty:
            with self._lock.hold(exclusive=True, timeout=self.lock_timeout):
                if self._dirty:
                    con = self._connect(read_only=False)
                    try:
                        self._export(con)
                        con.execute("CHECKPOINT")
                    finally:
                        self._release(con)
        self._write_pending_views()

    def _export(self, con: duckdb.DuckDBPyConnection) -> None:
        """Write the changes logged in the master as segments, in one transaction that also empties
        the log, and note the views to write (:meth:`_write_pending_views`, after the lock). Runs
        under the exclusive lock, on a session's connection."""
        assert self.segments_dir is not None and self.published is not None
        written: list[Path] = []
        retired: list[Path] = []
        crowded: list[str] = []
        con.execute("BEGIN TRANSACTION")
        try:
            top = con.execute("SELECT max(seq) FROM _changes").fetchone()[0]
            if top is not None:
                tables = {r[0]: Table(r[0], r[1], tuple(r[2]), r[3]) for r in
                          con.execute("SELECT tbl, key, exclude, ord FROM _published_tables").fetchall()}
                logged: dict[str, list[tuple[str, int | None, int | None]]] = {}
                for tbl, kind, lo, hi in con.execute(
                        "SELECT tbl, kind, lo, hi FROM _changes WHERE seq <= ? ORDER BY seq", [top]).fetchall():
                    logged.setdefault(tbl, []).append((kind, lo, hi))
                self.segments_dir.mkdir(parents=True, exist_ok=True)
                for name in sorted(logged):
                    if name in tables:
                        retired += self._export_table(con, tables[name], logged[name], int(top), written)
                con.execute("DELETE FROM _changes WHERE seq <= ?", [top])
                crowded = [r[0] for r in con.execute(
                    "SELECT tbl FROM _segments WHERE NOT base GROUP BY tbl HAVING count(*) >= ?",
                    [self.max_deltas]).fetchall()]
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            for path in written:
                path.unlink(missing_ok=True)
            raise
        _retire(retired)
        # What the views file names now, numbered from the master's sequence under its lock, so the
        # views of every process's exports are ordered; the file itself is written after the lock.
        version = con.execute("SELECT nextval('_change_seq')").fetchone()[0]
        rows = con.execute("""SELECT s.tbl, t.key, s.data, s.keys, s.seg FROM _segments s
                              JOIN _published_tables t USING (tbl) ORDER BY s.tbl, s.seg""").fetchall()
        self._views = (int(version), rows)
        self._dirty = False
        self._last_publish = time.monotonic()
        if crowded:
            self._start_compaction(crowded)

    def _export_table(self, con: duckdb.DuckDBPyConnection, table: Table, logged: list[tuple[str, Any, Any]],
                      seg: int, written: list[Path]) -> list[Path]:
        """One table's segment for the logged changes: a delta of the changed rows (and the keys it
        supersedes), or a new base when the table changed as a whole or the change is a large part
        of it. Returns the files the new base retires."""
        assert self.segments_dir is not None
        segs = con.execute("SELECT data, keys, rows, base FROM _segments WHERE tbl = ?", [table.name]).fetchall()
        base_rows = sum(r[2] for r in segs if r[3])
        points = sorted({int(lo) for kind, lo, _ in logged if kind == "key"})
        ranges = [(int(lo), int(hi)) for kind, lo, hi in logged if kind == "append"]
        changed = len(points) + sum(hi - lo + 1 for lo, hi in ranges)
        cols = f"* EXCLUDE ({', '.join(table.exclude)})" if table.exclude else "*"
        data = self.segments_dir / f"{table.name}.{seg}.parquet"
        whole = (table.key is None or not any(r[3] for r in segs) or any(kind == "all" for kind, _, _ in logged)
                 or changed * 4 > max(base_rows, 4096))
        if whole:
            # In table order, not sorted: rows are appended as their keys are drawn from a sequence, so
            # the file comes out in key order anyway, and a sort of millions of embeddings costs more
            # than the export.
            order = f" ORDER BY {table.order}" if table.order else ""
            rows = _write_parquet(con, f"SELECT {cols}, {seg}::BIGINT AS _seg FROM {table.name}{order}", [], data)
            written.append(data)
            con.execute("DELETE FROM _segments WHERE tbl = ?", [table.name])
            con.execute("INSERT INTO _segments VALUES (?, ?, ?, NULL, ?, true)", [table.name, seg, data.name, rows])
            return [self.segments_dir / r[0] for r in segs] + [self.segments_dir / r[1] for r in segs if r[1]]
        # Each part filters on its own, so row groups outside the changed keys are skipped.
        parts = [f"SELECT {cols}, {seg}::BIGINT AS _seg FROM {table.name} WHERE {table.key} BETWEEN {lo} AND {hi}"
                 for lo, hi in ranges]
        params: list[Any] = []
        if points:
            parts.append(f"SELECT {cols}, {seg}::BIGINT AS _seg FROM {table.name} WHERE {table.key} = ANY(?)")
            params.append(points)
        sql = f"SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY {table.key}"
        rows = _write_parquet(con, sql, params, data)
        written.append(data)
        keys_name = None
        if points:
            keys = self.segments_dir / f"{table.name}.{seg}.keys.parquet"
            ktmp = keys.with_name(f".{keys.name}.{os.getpid()}.partial")
            pq.write_table(pa.table({"_key": pa.array(points, pa.int64()),
                                     "_seg": pa.array([seg] * len(points), pa.int64())}), ktmp)
            ktmp.replace(keys)
            written.append(keys)
            keys_name = keys.name
        con.execute("INSERT INTO _segments VALUES (?, ?, ?, ?, ?, false)", [table.name, seg, data.name, keys_name, rows])
        return []

    def _view_sql(self, key: str | None, parts: list[tuple[str, str | None]], seg: int | None = None) -> str:
        """A query over segment files ``(data, keys)``: each row unless a later segment lists its
        key. ``seg``: keep a ``_seg`` column of that value (for a folded segment) instead of none."""
        assert self.segments_dir is not None
        files = ", ".join(_sql_path(self.segments_dir / d) for d, _ in parts)
        keys = ", ".join(_sql_path(self.segments_dir / k) for _, k in parts if k)
        out = f"d.* EXCLUDE (_seg), {seg}::BIGINT AS _seg" if seg is not None else "d.* EXCLUDE (_seg)"
        sql = f"SELECT {out} FROM read_parquet([{files}], union_by_name = true) d"
        if keys and key is not None:
            # A join on each key's latest listing, not a correlated NOT EXISTS: DuckDB planned that as
            # a join that read the rows before a reader's filter, and a search's lookup of 20 images
            # among 2M took 250 to 400 ms instead of 30.
            sql += (f" LEFT JOIN (SELECT _key, max(_seg) AS _seg FROM read_parquet([{keys}]) GROUP BY _key) k "
                    f"ON k._key = d.{key} AND k._seg > d._seg WHERE k._key IS NULL")
        return sql

    def _write_views_soon(self) -> None:
        """Write the pending views file on a thread of its own: the session that exported returns."""
        if self._views is not None:
            threading.Thread(target=self._write_pending_views, name="publish-views", daemon=True).start()

    def _write_pending_views(self) -> None:
        """Write the views file of this process's newest export, unless a process already wrote a
        newer one. Not under the master's lock (another process's session goes on meanwhile), but
        under the views' own lock, so two writers never interleave and an older file never
        replaces a newer one."""
        with self._views_lock:
            pending = self._views
            if pending is None:
                return
            version, rows = pending
            assert self.segments_dir is not None and self.published is not None
            self.segments_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.segments_dir / ".views.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                mark = self.segments_dir / ".views.version"
                try:
                    newest = int(mark.read_text())
                except (FileNotFoundError, ValueError):
                    newest = -1
                if version > newest or not self.published.is_file():
                    self._write_views(rows)
                    tmp = mark.with_name(f".views.version.{os.getpid()}.partial")
                    tmp.write_text(str(version))
                    tmp.replace(mark)
            finally:
                os.close(fd)  # closing the descriptor releases the flock
            if self._views is pending:
                self._views = None

    def _write_views(self, rows: list[tuple]) -> None:
        """Write the views file (one view per published table over the segments ``rows`` name)
        beside the published name and rename it over it; then delete segment files retired long enough."""
        assert self.segments_dir is not None and self.published is not None
        tables: dict[str, tuple[str | None, list[tuple[str, str | None]]]] = {}
        for tbl, key, data, keys, _ in rows:
            tables.setdefault(tbl, (key, []))[1].append((data, keys))
        top = max((r[4] for r in rows), default=0)
        partial = self.published.with_name(f".{self.published.name}.{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        views = duckdb.connect()
        try:
            views.execute(f"ATTACH {_sql_path(partial)} AS published (STORAGE_VERSION '{VIEWS_STORAGE_VERSION}')")
            for tbl, (key, parts) in tables.items():
                views.execute(f"CREATE VIEW published.{tbl} AS {self._view_sql(key, parts)}")
            views.execute(f"CREATE TABLE published._publication AS SELECT {int(top)}::BIGINT AS seg, "
                          "now() AS published_at")
            views.execute("DETACH published")
        finally:
            views.close()
        os.replace(partial, self.published)
        self._sweep({name for r in rows for name in (r[2], r[3]) if name})

    def _sweep(self, named: set[str]) -> None:
        """Delete segment files that no view names and that were retired (or left by a failed
        publication) more than ``retention`` seconds ago."""
        assert self.segments_dir is not None
        if not self.segments_dir.is_dir():
            return
        horizon = time.time() - self.retention
        for path in self.segments_dir.iterdir():
            if path.name in named or path.name.startswith((".compact", ".views")):
                continue
            try:
                if path.stat().st_mtime < horizon:
                    path.unlink()
            except FileNotFoundError:
                pass

    def _start_compaction(self, tables: list[str]) -> None:
        """Fold the delta segments of ``tables`` in a background thread (one at a time per process)."""
        if self._compactor is not None and self._compactor.is_alive():
            return

        def run() -> None:
            for name in tables:
                try:
                    self.compact(name)
                except Exception:  # noqa: BLE001 - a background thread: the next publication tries again
                    logger.exception("compacting %s of %s failed", name, self.published)

        self._compactor = threading.Thread(target=run, name="segment-compaction", daemon=True)
        self._compactor.start()

    def compact(self, table: str) -> bool:
        """Fold a table's delta segments into one, or into the base once they hold a quarter of its
        rows, reading the published Parquet files only: no lock on the master is held meanwhile, so
        writers go on. The folded segment replaces the parts in one short write session, unless a
        publication replaced them first. Returns whether it did."""
        if self.segments_dir is None:
            return False
        guard = self._lock_file(self.segments_dir / ".compact.lock")
        if guard is None:
            return False  # another process is compacting
        try:
            with self.read() as con:
                key = con.execute("SELECT key FROM _published_tables WHERE tbl = ?", [table]).fetchone()
                segs = con.execute("SELECT seg, data, keys, rows, base FROM _segments WHERE tbl = ? ORDER BY seg",
                                   [table]).fetchall()
            deltas = [s for s in segs if not s[4]]
            if key is None or key[0] is None or len(deltas) < 2:
                return False
            base = [s for s in segs if s[4]]
            into_base = sum(s[3] for s in deltas) * 4 >= sum(s[3] for s in base)
            parts = base + deltas if into_base else deltas
            top = max(s[0] for s in parts)
            stamp = f"{top}.c{time.time_ns()}"
            data = self.segments_dir / f"{table}.{stamp}.parquet"
            folded = self._view_sql(key[0], [(s[1], s[2]) for s in parts], seg=top)
            with duckdb.connect() as scratch:
                scratch.execute("SET enable_progress_bar = false")
                rows = _write_parquet(scratch, f"{folded} ORDER BY {key[0]}", [], data)
                keys_name = None
                key_files = [s[2] for s in parts if s[2]]
                if key_files and not into_base:
                    keys = self.segments_dir / f"{table}.{stamp}.keys.parquet"
                    ktmp = keys.with_name(f".{keys.name}.partial")
                    names = ", ".join(_sql_path(self.segments_dir / k) for k in key_files)
                    scratch.execute(f"COPY (SELECT DISTINCT _key, {top}::BIGINT AS _seg FROM read_parquet([{names}]) "
                                    f"ORDER BY _key) TO {_sql_path(ktmp)} (FORMAT parquet)")
                    ktmp.replace(keys)
                    keys_name = keys.name
            with self.write() as con:
                present = {r[0] for r in con.execute("SELECT seg FROM _segments WHERE tbl = ?", [table]).fetchall()}
                if not {s[0] for s in parts} <= present:
                    _retire([data] + ([self.segments_dir / keys_name] if keys_name else []))
                    return False
                con.execute("DELETE FROM _segments WHERE tbl = ? AND seg IN (SELECT unnest(?))",
                            [table, [s[0] for s in parts]])
                con.execute("INSERT INTO _segments VALUES (?, ?, ?, ?, ?, ?)",
                            [table, top, data.name, keys_name, rows, into_base])
            _retire([self.segments_dir / s[1] for s in parts] + [self.segments_dir / s[2] for s in parts if s[2]])
            self._dirty = True
            self.publish()
            return True
        finally:
            os.close(guard)

    @staticmethod
    def _lock_file(path: Path) -> int | None:
        """A non-blocking exclusive ``flock`` on ``path`` (its descriptor), or None when another holds it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def snapshot(self) -> duckdb.DuckDBPyConnection | None:
        """A read-only connection to the published file, reopened when a newer one was published.

        None before anything was published. Callers hold ``_snapshot_lock`` while they use it (one
        connection, many threads).
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

    def read_ids(self, sql: str, ids: list[Any]) -> list[tuple]:
        """Rows of ``sql`` for the keys ``ids`` from the published file, then from the master for the
        keys not published yet. ``sql`` names the keys as ``IN ({keys})`` (a list of constants, which
        lets the scan of a Parquet segment skip the row groups that cannot hold them, and the
        master use its index) and returns the key first.

        The service's search path reads here: it never waits for a writer while the ids it looks
        up are published. A process whose own changes are not published yet reads the master, so
        it always reads its own writes.
        """
        if not ids:
            return []
        ids = list(dict.fromkeys(ids))
        rows: list[tuple] = []
        with self._snapshot_lock:
            con = None if self.read_only or self._dirty or self._views is not None else self.snapshot()
            if con is not None:
                try:
                    rows = con.execute(sql.format(keys=", ".join("?" * len(ids))), ids).fetchall()
                except duckdb.CatalogException:
                    rows = []  # published before the table existed
        found = {r[0] for r in rows}
        missing = [i for i in ids if i not in found]
        if missing:
            with self.read() as con:
                rows += con.execute(sql.format(keys=", ".join("?" * len(missing))), missing).fetchall()
        return rows

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

    def remove_files(self) -> None:
        """Delete the master, DuckDB's write-ahead log beside it and the lock file, after :meth:`close`: for a
        scratch store that nothing publishes (a batch's staging catalog, once exported)."""
        for path in (self.master, self.master.with_name(self.master.name + ".wal"), self._lock.path, self._lock.gate):
            if path is not None:
                path.unlink(missing_ok=True)
