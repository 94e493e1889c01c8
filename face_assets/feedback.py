"""Feedback on search results: the vote store and its export to training pairs and triplets.

Three tables, the same on DuckDB (the data folder's own feedback store file, the default) and on
PostgreSQL:

``feedback_queries``  one row per search that people can vote on: ``query_id``, ``created_at``, the
                      ``session_id`` that searched, ``model_version``, the query ``embedding``, the
                      stored query image (``image_path``, ``content_hash``, ``width``, ``height``,
                      ``filename`` as uploaded), the main face's ``bbox`` and ``det_score``, and
                      ``query_face_id`` when the query is a catalog face.
``feedback``          one row per (query, result face, voter): ``feedback_id``, ``vote`` (``up`` /
                      ``down``), ``voter``, ``session_id``, ``created_at``, ``updated_at``,
                      ``revisions`` (a repeated vote by the same voter updates the row and counts
                      here), ``model_version``, ``similarity``, ``query_embedding``,
                      ``result_embedding``, and the result image's ``result_image_id``,
                      ``result_path``, ``result_bbox``, ``result_metadata``.
``feedback_more_results``  the results a query showed later ("more results"): ``query_id``, ``face_id``.

On DuckDB the store publishes like the catalog (:mod:`.storage`): each write logs the rows it
changed (``query_seq``, ``feedback_id``, ``result_seq`` are the published keys), and a publication
exports those rows as Parquet segments with a views file at ``<data_dir>/feedback.duckdb``, so a vote
costs the vote, not the store.

The export (:func:`export_feedback`) turns votes into ``pairs.parquet`` and ``triplets.parquet``
for fine-tuning, after data-quality checks whose drops are reported with their reasons.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .config import FeedbackSettings, Settings
from .errors import ConfigError, FeedbackError, FeedbackStoreUnavailableError
from .schemas import ExportReport, Vote
from .storage import (COLUMNS_SQL, ColumnUpgrade, DuckDBFile, Table, log_changes, pending_upgrades, require_current,
                      utc_now)
from .store import Catalog

VOTES = ("up", "down")

# One text for both backends: every type and clause here means the same in DuckDB and PostgreSQL.
SCHEMA = [
    "CREATE SEQUENCE IF NOT EXISTS feedback_id_seq START 1",
    # Integer keys for publication as segments.
    "CREATE SEQUENCE IF NOT EXISTS feedback_query_seq START 1",
    "CREATE SEQUENCE IF NOT EXISTS feedback_result_seq START 1",
    """CREATE TABLE IF NOT EXISTS feedback_queries (
        query_id VARCHAR PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL,
        session_id VARCHAR,
        model_version VARCHAR NOT NULL,
        embedding REAL[] NOT NULL,
        image_path VARCHAR NOT NULL,
        content_hash VARCHAR NOT NULL,
        width INTEGER,
        height INTEGER,
        bbox REAL[] NOT NULL,
        det_score REAL,
        query_face_id BIGINT,
        source VARCHAR NOT NULL,
        filename VARCHAR,
        query_seq BIGINT DEFAULT nextval('feedback_query_seq'),
        result_face_ids BIGINT[]  -- the results a query showed: a vote is accepted only for one of them
    )""",
    "CREATE INDEX IF NOT EXISTS feedback_queries_time_idx ON feedback_queries (created_at)",
    # Results shown later ("more results"); a table of their own, as DuckDB cannot update a row that
    # votes reference.
    """CREATE TABLE IF NOT EXISTS feedback_more_results (
        query_id VARCHAR NOT NULL,
        face_id BIGINT NOT NULL,
        result_seq BIGINT DEFAULT nextval('feedback_result_seq'),
        PRIMARY KEY (query_id, face_id)
    )""",
    """CREATE TABLE IF NOT EXISTS feedback (
        feedback_id BIGINT PRIMARY KEY DEFAULT nextval('feedback_id_seq'),
        query_id VARCHAR NOT NULL REFERENCES feedback_queries (query_id),
        result_face_id BIGINT NOT NULL,
        vote VARCHAR NOT NULL CHECK (vote IN ('up', 'down')),
        voter VARCHAR NOT NULL,
        session_id VARCHAR,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        revisions INTEGER NOT NULL DEFAULT 0,
        model_version VARCHAR NOT NULL,
        similarity REAL NOT NULL,
        query_embedding REAL[] NOT NULL,
        result_embedding REAL[] NOT NULL,
        result_image_id VARCHAR NOT NULL,
        result_path VARCHAR NOT NULL,
        result_bbox REAL[] NOT NULL,
        result_metadata JSON,
        UNIQUE (query_id, result_face_id, voter)
    )""",
    # DuckDB cannot update indexed columns in an upsert: only never-updated columns are indexed.
    "CREATE INDEX IF NOT EXISTS feedback_query_idx ON feedback (query_id)",
    "CREATE INDEX IF NOT EXISTS feedback_result_idx ON feedback (result_face_id)",
    "CREATE INDEX IF NOT EXISTS feedback_time_idx ON feedback (created_at)",
    "CREATE INDEX IF NOT EXISTS feedback_model_idx ON feedback (model_version)",
]

UPGRADES = (
    ColumnUpgrade("feedback_queries", "query_seq", (
        "CREATE SEQUENCE IF NOT EXISTS feedback_query_seq START 1",
        "ALTER TABLE feedback_queries ADD COLUMN query_seq BIGINT DEFAULT nextval('feedback_query_seq')")),
    ColumnUpgrade("feedback_queries", "result_face_ids", ("ALTER TABLE feedback_queries ADD COLUMN result_face_ids BIGINT[]",)),
    ColumnUpgrade("feedback_more_results", "result_seq", (
        "CREATE SEQUENCE IF NOT EXISTS feedback_result_seq START 1",
        "ALTER TABLE feedback_more_results ADD COLUMN result_seq BIGINT DEFAULT nextval('feedback_result_seq')")),
)
"""Columns the feedback tables gained since the first release, on both backends (``face-assets migrate``
adds them; existing rows get their keys)."""

TABLES = [Table("feedback_queries", "query_seq", order="query_id"), Table("feedback", "feedback_id"),
          Table("feedback_more_results", "result_seq")]
"""The tables published as segments on DuckDB, by the integer key each write logs."""

_RETURNING = " RETURNING feedback_id, query_id, result_face_id, vote, voter, similarity, created_at, updated_at, revisions"
_REVOTE = """UPDATE feedback SET vote = ?, session_id = ?, updated_at = ?, revisions = revisions + 1
WHERE query_id = ? AND result_face_id = ? AND voter = ?""" + _RETURNING
_INSERT = """INSERT INTO feedback (query_id, result_face_id, vote, voter, session_id, created_at, updated_at,
    model_version, similarity, query_embedding, result_embedding, result_image_id, result_path, result_bbox,
    result_metadata)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, CAST(? AS JSON))"""
_ON_CONFLICT = """ ON CONFLICT (query_id, result_face_id, voter) DO UPDATE SET
    vote = excluded.vote, session_id = excluded.session_id, updated_at = excluded.updated_at,
    revisions = feedback.revisions + 1"""


class Rows(Protocol):
    """``rows(sql, params)``: one statement in the current transaction, rows as dicts; ``changed``
    records which rows of a published table the transaction wrote (a no-op where nothing is published)."""

    def __call__(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]: ...

    def changed(self, table: str, keys: Sequence[int]) -> None: ...


class _Backend(Protocol):
    name: str
    where: str  # the database, as errors name it (never a DSN: it may hold a password)
    # True when other processes may insert the same vote between our UPDATE and INSERT.
    concurrent_writers: bool

    def declare(self, tables: list[Table]) -> None: ...

    def transaction(self) -> Any: ...

    def run(self, fn: Callable[[Rows], Any]) -> Any: ...

    def read(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]: ...

    def vector(self, values: Any) -> Any: ...

    def close(self) -> None: ...


class _DuckDBRows:
    """:class:`Rows` over a DuckDB write or read session's connection."""

    def __init__(self, con: Any):
        self.con = con

    def __call__(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        cursor = self.con.execute(sql, params or [])
        if cursor.description is None:
            return []
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def changed(self, table: str, keys: Sequence[int]) -> None:
        log_changes(self.con, table, keys)


class _DuckDBBackend:
    """Votes in their own DuckDB store file (``<data_dir>/store/feedback.duckdb``), in short sessions.

    Votes of concurrent requests commit together (group commit, :meth:`DuckDBFile.submit`); the
    committed changes are published as segments with views at ``<data_dir>/feedback.duckdb``.
    """

    name = "duckdb"
    concurrent_writers = False  # every writer holds the store's exclusive lock for its whole transaction

    def __init__(self, db: DuckDBFile):
        self.db = db
        self.where = str(db.master)

    def declare(self, tables: list[Table]) -> None:
        """Publish these tables as segments (:meth:`DuckDBFile.declare`)."""
        self.db.declare(tables)

    @contextmanager
    def transaction(self) -> Iterator[Rows]:
        with self.db.write() as con:
            yield _DuckDBRows(con)

    def run(self, fn: Callable[[Rows], Any]) -> Any:
        """``fn(rows)`` in a write transaction, grouped with other threads' concurrent calls."""
        return self.db.submit(lambda con: fn(_DuckDBRows(con)))

    def read(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """One read statement in a read session."""
        with self.db.read() as con:
            return _DuckDBRows(con)(sql, params)

    def vector(self, values: Any) -> np.ndarray:
        """A ``REAL[]`` parameter: DuckDB binds a float32 array far faster than a list of floats."""
        return np.ascontiguousarray(values, np.float32).reshape(-1)

    def close(self) -> None:
        """Publish what is pending."""
        self.db.close()


class _PostgresRows:
    """:class:`Rows` on the server: readers query the server itself, so nothing is logged for publication."""

    def __init__(self, execute: Callable[..., list[dict[str, Any]]]):
        self._execute = execute

    def __call__(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        return self._execute(sql, params)

    def changed(self, table: str, keys: Sequence[int]) -> None:
        """Nothing to publish."""


class _PostgresBackend:
    """Votes on a PostgreSQL server; one connection, reopened when it breaks."""

    name = "postgresql"
    concurrent_writers = True

    where = "the PostgreSQL feedback store"

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._lock = threading.Lock()
        self.con = self._connect()

    def _connect(self):
        import psycopg
        from psycopg.rows import dict_row

        try:
            return psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row)
        except psycopg.Error as exc:
            raise FeedbackStoreUnavailableError(f"cannot connect to the PostgreSQL feedback store: {exc}") from exc

    def _rows(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        cursor = self.con.execute(sql.replace("?", "%s"), params or None)
        return cursor.fetchall() if cursor.description else []

    def declare(self, tables: list[Table]) -> None:
        """Nothing to publish: readers query the server itself."""

    @contextmanager
    def _alive(self) -> Iterator[None]:
        """Reconnect a broken connection; a connection lost mid-statement is the store being unavailable."""
        import psycopg

        with self._lock:
            try:
                if self.con.broken or self.con.closed:
                    self.con = self._connect()
                yield
            except psycopg.OperationalError as exc:  # the connection is marked broken: the next call reconnects
                raise FeedbackStoreUnavailableError(f"lost the PostgreSQL feedback store: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Rows]:
        with self._alive(), self.con.transaction():
            yield _PostgresRows(self._rows)

    def run(self, fn: Callable[[Rows], Any]) -> Any:
        """``fn(rows)`` in one transaction (the server serializes concurrent writers itself)."""
        with self.transaction() as rows:
            return fn(rows)

    def read(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """One read statement (autocommit: a statement is its own transaction)."""
        with self._alive():
            return self._rows(sql, params)

    def vector(self, values: Any) -> list[float]:
        """A ``REAL[]`` parameter, as the list psycopg adapts to an array."""
        return _floats(values)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self.con.close()


@dataclass
class QueryRecord:
    """A search that people can vote on: the query face, its image and the model that embedded it."""

    query_id: str
    model_version: str
    embedding: np.ndarray
    image_path: str
    content_hash: str
    bbox: list[float]
    width: int | None = None
    height: int | None = None
    det_score: float | None = None
    query_face_id: int | None = None
    session_id: str | None = None
    filename: str | None = None
    source: str = "upload"
    created_at: datetime = field(default_factory=utc_now)
    result_face_ids: list[int] | None = None


def _postgres(settings: Settings) -> "_PostgresBackend":
    """The PostgreSQL backend ``feedback.postgresql_dsn`` names."""
    if not settings.feedback.postgresql_dsn:
        raise ConfigError("feedback.backend is 'postgresql' but feedback.postgresql_dsn is empty")
    return _PostgresBackend(settings.feedback.postgresql_dsn)


def _columns(rows: "Rows") -> set[tuple[str, str]]:
    """The ``(table, column)`` pairs of the store's database, on either backend."""
    return {(r["table_name"], r["column_name"]) for r in rows(COLUMNS_SQL)}


class FeedbackStore:
    """Votes and the queries they belong to, on DuckDB or PostgreSQL (see the module docstring).

    Thread-safe: each backend runs one transaction at a time.
    """

    def __init__(self, backend: _Backend, create: bool = True):
        self._backend = backend
        if create:
            with backend.transaction() as rows:
                require_current(_columns(rows), UPGRADES, backend.where)
                for statement in SCHEMA:
                    rows(statement)
            backend.declare(TABLES)

    @classmethod
    def open(cls, settings: Settings, read_only: bool = False) -> "FeedbackStore":
        """The store ``feedback.backend`` names: the data folder's DuckDB feedback file, or ``postgresql_dsn``.

        ``read_only`` (DuckDB only) reads the published views, which never wait for a writer.

        Raises:
            MigrationRequiredError: the store's tables are those of an older release (see :meth:`migrate`).
        """
        if settings.feedback.backend == "postgresql":
            return cls(_postgres(settings))
        storage = settings.storage
        if read_only:
            return cls(_DuckDBBackend(DuckDBFile(storage.feedback_path, read_only=True)), create=False)
        db = DuckDBFile(storage.feedback_master_path, storage.feedback_path, lock_timeout=storage.lock_timeout_seconds,
                        publish_interval=storage.publish_interval_seconds,
                        retention=storage.segment_retention_seconds, max_deltas=storage.max_delta_segments,
                        upgrades=UPGRADES)
        return cls(_DuckDBBackend(db))

    @staticmethod
    def migrate(settings: Settings) -> list[str]:
        """Upgrade a feedback store written by an older release, in place (``face-assets migrate``): the columns
        of :data:`UPGRADES` it lacks are added in one transaction (existing rows get their keys). Returns what
        was done; nothing when the store is current or does not exist yet."""
        if settings.feedback.backend == "postgresql":
            backend = _postgres(settings)
            try:
                with backend.transaction() as rows:
                    pending = pending_upgrades(_columns(rows), UPGRADES)
                    for upgrade in pending:
                        for statement in upgrade.statements:
                            rows(statement)
            finally:
                backend.close()
            return [f"{backend.where}: column {u.column} added to table {u.table}" for u in pending]
        storage = settings.storage
        if not storage.feedback_master_path.is_file():
            return []
        return DuckDBFile(storage.feedback_master_path, lock_timeout=storage.lock_timeout_seconds,
                          upgrades=UPGRADES).migrate()

    @property
    def backend(self) -> str:
        """``duckdb`` or ``postgresql``."""
        return self._backend.name

    def close(self) -> None:
        """Release the backend connection (the DuckDB catalog stays open: the library owns it)."""
        self._backend.close()

    def add_query(self, q: QueryRecord) -> None:
        """Store a query; its id must be new."""
        def write(rows: Rows) -> None:
            added = rows(
                """INSERT INTO feedback_queries (query_id, created_at, session_id, model_version, embedding,
                   image_path, content_hash, width, height, bbox, det_score, query_face_id, source, filename,
                   result_face_ids)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING query_seq""",
                [q.query_id, q.created_at, q.session_id, q.model_version, self._backend.vector(q.embedding),
                 q.image_path, q.content_hash, q.width, q.height, self._backend.vector(q.bbox), q.det_score,
                 q.query_face_id, q.source, q.filename, [int(i) for i in q.result_face_ids or []]])
            rows.changed("feedback_queries", [r["query_seq"] for r in added])

        self._backend.run(write)

    def add_results(self, query_id: str, face_ids: Sequence[int]) -> None:
        """Record more results shown for a query (votes are accepted only on shown results)."""
        def write(rows: Rows) -> None:
            for face_id in face_ids:
                added = rows("INSERT INTO feedback_more_results (query_id, face_id) VALUES (?, ?) "
                             "ON CONFLICT DO NOTHING RETURNING result_seq", [query_id, int(face_id)])
                rows.changed("feedback_more_results", [r["result_seq"] for r in added])

        self._backend.run(write)

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run one SQL statement on the store (``?`` placeholders on both backends); rows as dicts."""
        return self._backend.read(sql, params)

    def get_query(self, query_id: str) -> dict[str, Any] | None:
        """The stored query (every column, ``embedding`` as float32 array), or None.

        ``result_face_ids`` lists every result it showed, the first ones and those shown later.
        """
        found = self._backend.read("SELECT * FROM feedback_queries WHERE query_id = ?", [query_id])
        if not found:
            return None
        q = found[0]
        q["embedding"] = np.asarray(q["embedding"], np.float32)
        more = self._backend.read("SELECT face_id FROM feedback_more_results WHERE query_id = ? ORDER BY face_id",
                                  [query_id])
        q["result_face_ids"] = [int(i) for i in q.get("result_face_ids") or []] + [int(r["face_id"]) for r in more]
        return q

    def upsert_vote(self, *, query_id: str, result_face_id: int, vote: str, voter: str, session_id: str | None,
                    model_version: str, similarity: float, query_embedding: Any, result_embedding: Any,
                    result_image_id: str, result_path: str, result_bbox: Sequence[float],
                    result_metadata: dict | None) -> Vote:
        """Insert a vote, or update the vote of the same voter on the same (query, result) pair.

        Raises:
            FeedbackError: ``vote`` is neither ``up`` nor ``down``.
        """
        if vote not in VOTES:
            raise FeedbackError(f"vote must be 'up' or 'down', not {vote!r}")
        now = utc_now()
        # Update first: a re-vote then skips binding the embeddings, and in DuckDB an UPDATE or a
        # plain INSERT costs a third of an INSERT ... ON CONFLICT.
        insert = _INSERT + (_ON_CONFLICT if self._backend.concurrent_writers else "") + _RETURNING

        def write(rows: Rows) -> list[dict[str, Any]]:
            found = rows(_REVOTE, [vote, session_id, now, query_id, int(result_face_id), voter]) or rows(
                insert, [query_id, int(result_face_id), vote, voter, session_id, now, now, model_version,
                         float(similarity), self._backend.vector(query_embedding),
                         self._backend.vector(result_embedding), result_image_id, result_path,
                         self._backend.vector(result_bbox),
                         json.dumps(result_metadata) if result_metadata is not None else None])
            rows.changed("feedback", [r["feedback_id"] for r in found])
            return found

        row = self._backend.run(write)[0]
        return Vote(feedback_id=int(row["feedback_id"]), query_id=row["query_id"], result_id=int(row["result_face_id"]),
                    vote=row["vote"], voter=row["voter"], similarity=float(row["similarity"]),
                    created_at=row["created_at"], updated_at=row["updated_at"], revisions=int(row["revisions"]))

    def delete_vote(self, query_id: str, result_face_id: int, voter: str) -> bool:
        """Delete the vote of ``voter`` on one (query, result) pair; returns whether a row was deleted."""
        with self._backend.transaction() as rows:
            found = rows("DELETE FROM feedback WHERE query_id = ? AND result_face_id = ? AND voter = ? "
                         "RETURNING feedback_id", [query_id, int(result_face_id), voter])
            rows.changed("feedback", [r["feedback_id"] for r in found])
        return bool(found)

    def votes(self, query_id: str | None = None, voter_prefix: str | None = None) -> list[dict[str, Any]]:
        """Stored votes without their embeddings, oldest first, optionally of one query or voters by prefix."""
        where, params = [], []
        if query_id is not None:
            where.append("query_id = ?")
            params.append(query_id)
        if voter_prefix is not None:
            where.append("voter LIKE ? ESCAPE '\\'")
            params.append(voter_prefix.replace("%", r"\%").replace("_", r"\_") + "%")
        sql = ("SELECT feedback_id, query_id, result_face_id, vote, voter, session_id, created_at, updated_at, "
               "revisions, model_version, similarity, result_image_id, result_path, result_bbox, result_metadata "
               "FROM feedback" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY feedback_id")
        found = self._backend.read(sql, params)
        for r in found:
            if isinstance(r["result_metadata"], str):
                r["result_metadata"] = json.loads(r["result_metadata"])
        return found

    def votes_since(self, since: datetime | None) -> tuple[int, datetime | None]:
        """How many votes were cast or changed after ``since`` (all when None), and the newest one's time."""
        row = self._backend.read("SELECT count(*) AS n, max(updated_at) AS last FROM feedback WHERE updated_at > ?",
                                 [since or datetime(1970, 1, 1, tzinfo=timezone.utc)])[0]
        return int(row["n"]), row["last"]

    def export_rows(self) -> list[dict[str, Any]]:
        """Every vote with its query's image, box and catalog face, for :func:`export_feedback`."""
        return self._backend.read(
            """SELECT f.feedback_id, f.query_id, f.result_face_id, f.vote, f.voter, f.model_version,
                      f.similarity, q.image_path, q.bbox AS query_bbox, q.query_face_id
               FROM feedback f JOIN feedback_queries q ON q.query_id = f.query_id
               ORDER BY f.feedback_id""")

    def query_embeddings(self, query_ids: Sequence[str]) -> dict[str, tuple[str, np.ndarray]]:
        """Query id -> (model version, embedding) of the given queries."""
        out = {}
        with self._backend.transaction() as rows:
            for qid in query_ids:
                for r in rows("SELECT model_version, embedding FROM feedback_queries WHERE query_id = ?", [qid]):
                    out[qid] = (r["model_version"], np.asarray(r["embedding"], np.float32))
        return out

    def stats(self) -> dict[str, Any]:
        """Counts of queries, votes (up/down), voters, votes per model version, and the last vote time."""
        with self._backend.transaction() as rows:
            queries = rows("SELECT count(*) AS n FROM feedback_queries")[0]["n"]
            total = rows(
                """SELECT count(*) AS votes, count(DISTINCT voter) AS voters, max(updated_at) AS last_vote_at,
                          coalesce(sum(CASE WHEN vote = 'up' THEN 1 ELSE 0 END), 0) AS up,
                          coalesce(sum(CASE WHEN vote = 'down' THEN 1 ELSE 0 END), 0) AS down
                   FROM feedback""")[0]
            by_model = rows("SELECT model_version, count(*) AS n FROM feedback GROUP BY model_version ORDER BY 1")
        last = total["last_vote_at"]
        return {"backend": self.backend, "queries": int(queries), "votes": int(total["votes"]),
                "up": int(total["up"]), "down": int(total["down"]), "voters": int(total["voters"]),
                "by_model_version": {r["model_version"]: int(r["n"]) for r in by_model},
                "last_vote_at": last.isoformat() if last else None}


def _floats(values: Any) -> list[float]:
    return [float(x) for x in np.asarray(values, np.float32).reshape(-1)]


_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
               "TIFF": "tif", "PPM": "ppm", "ICO": "ico", "TGA": "tga", "JPEG2000": "jp2", "AVIF": "avif"}


def save_query_image(data: bytes, folder: Path, query_id: str) -> Path:
    """Write an uploaded query image as ``folder/<query_id>.<ext>`` (extension from its content).

    Call it only with bytes that decoded; the file is written atomically.
    """
    with Image.open(io.BytesIO(data)) as img:
        ext = _EXTENSIONS.get(img.format or "", "img")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{query_id}.{ext}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path.resolve()


# ------------------------------------------------------------------------------------------------
# Export to training data
# ------------------------------------------------------------------------------------------------

# pyarrow, not polars: the stores already import it, and a process that never exports (the CLI's
# short commands, the service) does not pay polars' import.
_BBOX = pa.list_(pa.float32())
PAIRS_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("query_path", pa.string()), ("query_bbox", _BBOX), ("query_face_id", pa.int64()),
    ("result_face_id", pa.int64()), ("result_path", pa.string()), ("result_bbox", _BBOX), ("label", pa.int8()),
    ("similarity", pa.float32()), ("source", pa.string()), ("model_version", pa.string()),
])
TRIPLETS_SCHEMA = pa.schema([
    ("anchor_path", pa.string()), ("anchor_bbox", _BBOX), ("anchor_face_id", pa.int64()),
    ("positive_path", pa.string()), ("positive_bbox", _BBOX), ("positive_face_id", pa.int64()),
    ("negative_path", pa.string()), ("negative_bbox", _BBOX), ("negative_face_id", pa.int64()),
    ("negative_similarity", pa.float32()), ("source", pa.string()),
])

# Neighbours of an embedding: objects with face_id, similarity, path, bbox, cluster_id (SearchResult).
NeighbourSearch = Callable[[np.ndarray, int], Sequence[Any]]


def mine_negatives(candidates: Sequence[tuple[int, float, Any, float]], person_clusters: set, match_threshold: float,
                   k: int) -> list[tuple[int, float, str]]:
    """Hardest faces of other persons among a query's neighbours: ``[(face_id, similarity, method)]``.

    Args:
        candidates: ``(face_id, similarity to the query, cluster_id or None, highest similarity to
            the query's up-voted faces or -1)`` of faces not voted on for this query.
        person_clusters: cluster ids of the query's person (of its up-voted faces and of the query
            face itself); empty when unknown.
        match_threshold: below it two faces count as different persons when clusters cannot tell.
        k: how many to keep, most similar first.

    A candidate is a negative by ``cluster`` when both it and the query's person have clusters and
    they differ, else by ``threshold`` when it is below ``match_threshold`` to the query and to
    every up-voted face.
    """
    mined = []
    for face_id, sim, cluster_id, sim_to_positives in candidates:
        if person_clusters and cluster_id is not None:
            if cluster_id not in person_clusters:
                mined.append((face_id, sim, "cluster"))
        elif sim < match_threshold and sim_to_positives < match_threshold:
            mined.append((face_id, sim, "threshold"))
    mined.sort(key=lambda m: -m[1])
    return mined[:k]


class _Dropped:
    """Counts of dropped votes by reason, with a few examples of each."""

    def __init__(self, examples_per_reason: int = 5):
        self.counts: Counter = Counter()
        self.examples: list[dict[str, Any]] = []
        self._per_reason = examples_per_reason

    def add(self, reason: str, row: dict[str, Any], n: int = 1) -> None:
        if self.counts[reason] < self._per_reason:
            self.examples.append({"reason": reason, "query_id": row.get("query_id"),
                                  "result_face_id": row.get("result_face_id"), "voter": row.get("voter")})
        self.counts[reason] += n


def _bbox(values: Any) -> list[float]:
    return [float(x) for x in values]


def export_feedback(store: FeedbackStore, catalog: Catalog, neighbours: NeighbourSearch, settings: Settings,
                    model_version: str, out_dir: str | os.PathLike, *, match_threshold: float,
                    clusters_of: Callable[[list[int]], dict[int, int]]) -> ExportReport:
    """Write ``pairs.parquet``, ``triplets.parquet`` and ``report.json`` from the votes into ``out_dir``.

    Pairs hold one row per kept (query, result) pair: ``label`` 1 for a thumbs-up majority, 0 for a
    thumbs-down majority (``source`` ``vote_up`` / ``vote_down``), plus mined negatives
    (``mined_negative``): the query's nearest faces of other persons (see :func:`mine_negatives`),
    searched with ``neighbours`` for queries embedded by ``model_version``. Negatives are ordered
    hardest first: thumbs-down by similarity, then mined ones by similarity. Triplets pair each
    positive with the ``feedback.triplet_negatives_per_positive`` hardest negatives of its query.
    ``match_threshold`` is the running model version's; ``clusters_of`` maps face ids to their person
    clusters. Rerunning overwrites the files (written atomically).
    """
    cfg = settings.feedback
    threshold = match_threshold
    out = Path(out_dir)
    rows = store.export_rows()
    ids = sorted({int(r["result_face_id"]) for r in rows}
                 | {int(r["query_face_id"]) for r in rows if r["query_face_id"] is not None})
    faces = catalog.faces_by_id(ids)
    for face_id, cluster_id in clusters_of(ids).items():
        if face_id in faces:
            faces[face_id]["cluster_id"] = cluster_id
    dropped = _Dropped()

    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        fid = int(r["result_face_id"])
        if fid not in faces:
            dropped.add("deleted_face", r)
        elif not Path(r["image_path"]).is_file():
            dropped.add("missing_query_image", r)
        elif r["query_face_id"] == fid or r["similarity"] >= cfg.self_pair_similarity:
            dropped.add("self_pair", r)
        else:
            groups[(r["query_id"], fid)].append(r)

    pairs: list[dict[str, Any]] = []
    for (query_id, fid), votes in groups.items():
        ups = sum(v["vote"] == "up" for v in votes)
        majority = max(ups, len(votes) - ups)
        if majority / len(votes) < cfg.min_vote_agreement:
            dropped.add("conflicting_votes", votes[0], len(votes))
            continue
        label = 1 if ups == majority else 0
        if majority < len(votes):
            dropped.add("outvoted", next(v for v in votes if (v["vote"] == "up") != bool(label)), len(votes) - majority)
        v, face = votes[0], faces[fid]
        pairs.append({"query_id": query_id, "query_path": v["image_path"], "query_bbox": _bbox(v["query_bbox"]),
                      "query_face_id": v["query_face_id"], "result_face_id": fid, "result_path": face["path"],
                      "result_bbox": _bbox(face["bbox"]), "label": label, "similarity": float(v["similarity"]),
                      "source": "vote_up" if label else "vote_down", "model_version": v["model_version"]})

    mined, mining = _mine(pairs, faces, store, catalog, neighbours, cfg, threshold, model_version)
    positives = [p for p in pairs if p["label"] == 1]
    voted_negatives = sorted((p for p in pairs if p["label"] == 0), key=lambda p: -p["similarity"])
    mined.sort(key=lambda p: -p["similarity"])
    warnings = []
    cap = int(cfg.max_negatives_per_positive * len(positives))
    keep_mined = max(0, cap - len(voted_negatives))
    if len(mined) > keep_mined:
        dropped.add("class_balance", mined[keep_mined], len(mined) - keep_mined)
        for p in mined[keep_mined:]:
            mining[p.pop("_method")] -= 1
        mined = mined[:keep_mined]
    for p in mined:
        p.pop("_method", None)
    if not positives:
        warnings.append("no positive pairs: no triplets, and mined negatives are left out")
    elif len(voted_negatives) > cap:
        warnings.append(f"{len(voted_negatives)} thumbs-down pairs for {len(positives)} positives: above the "
                        f"{cfg.max_negatives_per_positive} negatives per positive of feedback.max_negatives_per_positive")

    negatives = voted_negatives + mined
    triplets = _triplets(positives, negatives, cfg.triplet_negatives_per_positive)
    all_pairs = positives + negatives
    out.mkdir(parents=True, exist_ok=True)
    files = {"pairs": _write(all_pairs, PAIRS_SCHEMA, out / "pairs.parquet"),
             "triplets": _write(triplets, TRIPLETS_SCHEMA, out / "triplets.parquet")}
    neg_counts = {"vote_down": len(voted_negatives), "mined_negative": len(mined)}
    report = ExportReport(
        out_dir=str(out), votes_read=len(rows), pairs=len(all_pairs), triplets=len(triplets),
        positives=len(positives), negatives=neg_counts,
        negatives_per_positive=round(len(negatives) / len(positives), 3) if positives else None,
        dropped=dict(dropped.counts), mining={k: v for k, v in mining.items() if v}, warnings=warnings,
        dropped_examples=dropped.examples, files=files | {"report": str(out / "report.json")})
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
    os.replace(tmp, out / "report.json")
    return report


def _mine(pairs: list[dict], faces: dict[int, dict], store: FeedbackStore, catalog: Catalog,
          neighbours: NeighbourSearch, cfg: FeedbackSettings, threshold: float,
          model_version: str) -> tuple[list[dict], Counter]:
    """Mined negative pairs (with a ``_method`` key) for every query that has pairs."""
    by_query: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        by_query[p["query_id"]].append(p)
    mined: list[dict] = []
    methods: Counter = Counter()
    if cfg.mined_negatives_per_query == 0:
        return mined, methods
    queries = store.query_embeddings(list(by_query))
    for query_id, qpairs in by_query.items():
        version, embedding = queries[query_id]
        if version != model_version:
            continue  # the index holds embeddings of another model: similarities would mean nothing
        first = qpairs[0]
        positives = [p["result_face_id"] for p in qpairs if p["label"] == 1]
        clusters = {faces[f].get("cluster_id") for f in positives}
        if first["query_face_id"] is not None and first["query_face_id"] in faces:
            clusters.add(faces[first["query_face_id"]].get("cluster_id"))
        clusters.discard(None)
        voted = {p["result_face_id"] for p in qpairs} | {first["query_face_id"]}
        hits = [h for h in neighbours(embedding, cfg.mining_candidates) if h.face_id not in voted]
        to_positives = np.full(len(hits), -1.0)
        if positives and hits:
            _, pos_vectors = catalog.embeddings(positives)
            ids, vectors = catalog.embeddings([h.face_id for h in hits])
            best = dict(zip(ids.tolist(), (vectors @ pos_vectors.T).max(axis=1).tolist()))
            to_positives = np.array([best.get(h.face_id, 1.0) for h in hits])
        candidates = [(h.face_id, h.similarity, h.cluster_id, float(s)) for h, s in zip(hits, to_positives)]
        by_id = {h.face_id: h for h in hits}
        for face_id, sim, method in mine_negatives(candidates, clusters, threshold, cfg.mined_negatives_per_query):
            hit = by_id[face_id]
            methods[method] += 1
            mined.append({"query_id": query_id, "query_path": first["query_path"], "query_bbox": first["query_bbox"],
                          "query_face_id": first["query_face_id"], "result_face_id": face_id, "result_path": hit.path,
                          "result_bbox": _bbox(hit.bbox), "label": 0, "similarity": sim,
                          "source": "mined_negative", "model_version": version, "_method": method})
    return mined, methods


def _triplets(positives: list[dict], negatives: list[dict], per_positive: int) -> list[dict]:
    """Each positive pair with the hardest negatives of the same query (``negatives`` is hardest first)."""
    by_query: dict[str, list[dict]] = defaultdict(list)
    for n in negatives:
        by_query[n["query_id"]].append(n)
    triplets = []
    for p in positives:
        for n in by_query[p["query_id"]][:per_positive]:
            triplets.append({"anchor_path": p["query_path"], "anchor_bbox": p["query_bbox"],
                             "anchor_face_id": p["query_face_id"], "positive_path": p["result_path"],
                             "positive_bbox": p["result_bbox"], "positive_face_id": p["result_face_id"],
                             "negative_path": n["result_path"], "negative_bbox": n["result_bbox"],
                             "negative_face_id": n["result_face_id"], "negative_similarity": n["similarity"],
                             "source": n["source"]})
    return triplets


def _write(rows: list[dict], schema: pa.Schema, path: Path) -> str:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)
    return str(path)
