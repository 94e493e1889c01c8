"""The curation audit log: who changed which persons, how, and what it takes to undo it.

One row per change in table ``audit_log`` of the catalog's DuckDB file, written in the same write
session as the change itself (:mod:`face_assets.persons` calls :meth:`AuditLog.append` inside its
transaction), so a change is never stored without its entry nor an entry without its change.
``audit_persons`` maps each entry to the persons it touched (indexed), so a person's history is a
lookup, not a scan of the log.

An entry holds ``id``, ``at`` (UTC), ``actor`` (the token's user name, or ``library`` / ``cli``),
``action`` (``rename``, ``merge``, ``split``, ``move``, ``undo``), ``cluster_ids`` (the persons
touched), the action's details, ``changes`` (the face moves and name changes it made, which undo
reverses), ``undoes`` (for an undo: the entry undone) and ``undone_by``.

A log of the former format (one JSON object per line, ``audit/people.jsonl`` in the data folder) is
taken in by ``face-assets migrate`` (:meth:`AuditLog.import_former_log`), then renamed ``*.imported``;
its entries hold no ``changes`` and cannot be undone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import MigrationRequiredError
from .storage import DuckDBFile, Table, log_all, log_changes, utc_now

AUDIT_SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS audit_seq START 1;
CREATE TABLE IF NOT EXISTS audit_log (
    entry_id BIGINT PRIMARY KEY DEFAULT nextval('audit_seq'),
    made_at TIMESTAMPTZ NOT NULL,
    actor VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    details JSON,
    undoes BIGINT,
    undone_by BIGINT
);
CREATE TABLE IF NOT EXISTS audit_persons (
    cluster_id BIGINT NOT NULL,
    entry_id BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_persons_cluster_idx ON audit_persons (cluster_id);
"""

TABLES = [Table("audit_log", "entry_id"), Table("audit_persons", "entry_id")]
"""Published for readers; an entry's rows in ``audit_persons`` share its key."""

ACTOR = "library"
"""Who a curation call is recorded as when its caller names nobody (the web app names the token's user)."""

_COLS = "entry_id, made_at, actor, action, details, undoes, undone_by"


def _entry(row: tuple, cluster_ids: list[int]) -> dict[str, Any]:
    entry_id, at, actor, action, details, undoes, undone_by = row
    return {"id": int(entry_id), "at": at.isoformat(), "actor": actor, "action": action,
            "cluster_ids": cluster_ids, "undoes": undoes, "undone_by": undone_by} | json.loads(details or "{}")


class AuditLog:
    """The audit tables on a store file: :meth:`append` inside a change's write session, :meth:`page` to read.

    Raises:
        MigrationRequiredError: ``former_log`` names a log of the former format not taken in yet.
    """

    def __init__(self, db: DuckDBFile, former_log: str | os.PathLike | None = None):
        if former_log is not None and Path(former_log).is_file():
            raise MigrationRequiredError(former_log, ["a curation log of the former JSON-lines format"])
        self.db = db
        db.ensure(AUDIT_SCHEMA, "audit_persons")
        db.declare(TABLES)

    def append(self, actor: str, action: str, persons: list[int], undoes: int | None = None,
               **details: Any) -> dict[str, Any]:
        """Record one change to ``persons`` (cluster ids) and return its entry; inside a write session
        of this thread, joins it."""
        persons = sorted({int(c) for c in persons})
        with self.db.write() as con:
            row = con.execute(f"INSERT INTO audit_log (made_at, actor, action, details, undoes) VALUES (?, ?, ?, ?, ?) "
                              f"RETURNING {_COLS}", [utc_now(), actor, action,
                                                     json.dumps(details, default=str), undoes]).fetchone()
            if persons:
                con.execute("INSERT INTO audit_persons SELECT unnest(?), ?", [persons, row[0]])
            if undoes is not None:
                con.execute("UPDATE audit_log SET undone_by = ? WHERE entry_id = ?", [row[0], undoes])
            log_changes(con, "audit_log", [row[0]] + ([undoes] if undoes is not None else []))
            log_changes(con, "audit_persons", [row[0]])
            # Every change names the persons it touched: their rows (a new name too) are republished.
            log_changes(con, "clusters", persons)
        return _entry(row, persons)

    def get(self, entry_id: int) -> dict[str, Any] | None:
        """One entry, or None."""
        found = self.page(limit=1, before=int(entry_id) + 1)
        return found[0] if found and found[0]["id"] == int(entry_id) else None

    def page(self, limit: int = 50, before: int | None = None, cluster_id: int | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` entries, newest first, with ids below ``before`` (keyset paging), of one person if given."""
        where, params = ["entry_id < ?"], [int(before) if before is not None else 2**62]
        if cluster_id is not None:
            where.append("entry_id IN (SELECT entry_id FROM audit_persons WHERE cluster_id = ?)")
            params.append(int(cluster_id))
        with self.db.read() as con:
            rows = con.execute(f"SELECT {_COLS} FROM audit_log WHERE {' AND '.join(where)} "
                               "ORDER BY entry_id DESC LIMIT ?", [*params, int(limit)]).fetchall()
            ids = [r[0] for r in rows]
            persons: dict[int, list[int]] = {}
            for entry_id, cid in con.execute("SELECT entry_id, cluster_id FROM audit_persons WHERE entry_id IN "
                                             "(SELECT unnest(?)) ORDER BY cluster_id", [ids]).fetchall():
                persons.setdefault(entry_id, []).append(cid)
        return [_entry(r, persons.get(r[0], [])) for r in rows]

    def import_former_log(self, path: Path) -> int:
        """Take in a log of the former JSON-lines format in one write session, then rename it ``*.imported``
        (``face-assets migrate``); returns how many entries were added. An entry already there (same time,
        actor and action: a run cut before the rename) is not added twice."""
        added = 0
        with open(path, encoding="utf-8") as f:
            entries = [json.loads(line) for line in f if line.strip()]
        with self.db.write() as con:
            for e in entries:
                at, actor, action = e.pop("at"), e.pop("actor"), e.pop("action")
                if con.execute("SELECT 1 FROM audit_log WHERE made_at = ? AND actor = ? AND action = ?",
                               [at, actor, action]).fetchall():
                    continue  # imported before (the file was not yet set aside): idempotent
                ids = [c for c in [e.get("cluster_id"), e.get("to"), e.get("kept"), *e.get("cluster_ids", []),
                                   *e.get("parts", [])] if isinstance(c, int)]
                entry_id = con.execute("INSERT INTO audit_log (made_at, actor, action, details) VALUES (?, ?, ?, ?) "
                                       "RETURNING entry_id", [at, actor, action, json.dumps(e)]).fetchone()[0]
                if ids:
                    con.execute("INSERT INTO audit_persons SELECT DISTINCT unnest(?), ?", [ids, entry_id])
                added += 1
            log_all(con, "audit_log")
            log_all(con, "audit_persons")
        path.rename(path.with_name(path.name + ".imported"))
        return added
