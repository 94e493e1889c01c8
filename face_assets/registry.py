"""The model registry: recognizer versions, promotions, and how a version name resolves to its ONNX file.

Tables, in the catalog's DuckDB file (this module owns them and their SQL):

``model_versions``  ``version``, ``parent``, ``path`` (relative to the data folder; NULL for the
            pack's own recognizer, version ``base``), ``sha256``, ``status`` (``candidate`` /
            ``promoted`` / ``retired`` / ``rejected``), gate ``metrics`` (with the version's
            ``match_threshold``), ``created_at``.
``model_promotions``  every promotion and rollback: when, which version, which one it replaced.

The files are
under the data folder, ``<data_dir>/models/versions/<version>.onnx``, stored relative to ``data_dir``
so a data folder can move. Version ``base`` is the model pack's own recognizer. Nothing here needs
torch: listing, promoting and rolling back work without the training extra.

Each version carries its own match threshold (:func:`match_threshold`): the cosine at which two
faces are the same person, calibrated when the version was trained and kept in its row's
``metrics`` JSON under ``match_threshold``. Whatever version runs, its threshold runs with it, so a
rollback restores the previous threshold too.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import ModelVersionError
from .models import ModelPack
from .storage import Table, log_all, utc_now
from .store import Catalog

BASE = "base"
STATUSES = ("candidate", "promoted", "retired", "rejected")

SCHEMA = """
CREATE TABLE IF NOT EXISTS model_versions (
    version VARCHAR PRIMARY KEY,
    parent VARCHAR,
    path VARCHAR,
    sha256 VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    metrics JSON,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS model_promotions (
    promoted_at TIMESTAMPTZ NOT NULL,
    version VARCHAR NOT NULL,
    previous VARCHAR,
    action VARCHAR NOT NULL
);
"""


TABLES = [Table("model_versions", None), Table("model_promotions", None)]
"""Small tables: published whole when they change."""


def _ready(catalog: Catalog) -> Catalog:
    catalog.db.ensure(SCHEMA, "model_promotions")
    catalog.db.declare(TABLES)
    return catalog


def add_version(catalog: Catalog, version: str, parent: str | None, path: str | None, sha256: str, status: str,
                metrics: dict[str, Any] | None = None) -> None:
    """Register a recognizer version (idempotent: a version already known keeps its row)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    with _ready(catalog).transaction() as con:
        con.execute(
            """INSERT INTO model_versions (version, parent, path, sha256, status, metrics, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
            [version, parent, path, sha256, status, json.dumps(metrics) if metrics else None,
             utc_now()],
        )
        log_all(con, "model_versions")


def versions(catalog: Catalog) -> list[dict[str, Any]]:
    """Every registered recognizer version, oldest first."""
    rows = _ready(catalog).query("""SELECT version, parent, path, sha256, status, metrics, created_at
                                    FROM model_versions ORDER BY created_at, version""")
    return [{"version": r[0], "parent": r[1], "path": r[2], "sha256": r[3], "status": r[4],
             "metrics": json.loads(r[5]) if r[5] else None, "created_at": r[6]} for r in rows]


def promoted(catalog: Catalog) -> str | None:
    """The version with status ``promoted``, if any."""
    rows = _ready(catalog).query("SELECT version FROM model_versions WHERE status = 'promoted'")
    return rows[0][0] if rows else None


def promote(catalog: Catalog, version: str, action: str = "promote") -> str | None:
    """Make ``version`` the promoted one and retire the previous; logged. Returns the previous version."""
    with _ready(catalog).transaction() as con:
        row = con.execute("SELECT version FROM model_versions WHERE status = 'promoted'").fetchone()
        previous = row[0] if row else None
        con.execute("UPDATE model_versions SET status = 'retired' WHERE status = 'promoted'")
        con.execute("UPDATE model_versions SET status = 'promoted' WHERE version = ?", [version])
        con.execute("INSERT INTO model_promotions VALUES (?, ?, ?, ?)",
                    [utc_now(), version, previous, action])
        log_all(con, "model_versions")
        log_all(con, "model_promotions")
    return previous


def previous(catalog: Catalog, version: str) -> str | None:
    """The version that ``version`` replaced when it was last promoted."""
    rows = _ready(catalog).query(
        "SELECT previous FROM model_promotions WHERE version = ? ORDER BY promoted_at DESC LIMIT 1", [version])
    return rows[0][0] if rows else None


def new_version_name(sha256: str) -> str:
    """A sortable, unique version name: UTC time of creation and the start of the file hash."""
    return f"ft-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{sha256[:8]}"


def ensure_base(catalog: Catalog, pack: ModelPack) -> None:
    """Register the pack's own recognizer as version ``base`` (promoted when nothing else is).

    Writes only the first time, so opening a library for reading takes no write session.
    """
    if promoted(catalog) is not None and any(r["version"] == BASE for r in versions(catalog)):
        return
    add_version(catalog, BASE, None, None, pack.recognizer_sha256, "retired")
    if promoted(catalog) is None:
        promote(catalog, BASE, action="initial")


def version_row(catalog: Catalog, version: str) -> dict:
    """The registry row of ``version``; :class:`ModelVersionError` when unknown."""
    for row in versions(catalog):
        if row["version"] == version:
            return row
    known = ", ".join(r["version"] for r in versions(catalog)) or "none"
    raise ModelVersionError(f"unknown model version '{version}' (known: {known})")


def failed_gate(row: dict) -> bool:
    """Whether a registry row is a candidate the evaluation gate rejected (its status may have moved on since)."""
    return not ((row.get("metrics") or {}).get("gate") or {"passed": True})["passed"]


def match_threshold(row: dict | None, settings: Settings) -> float:
    """The match threshold of a registry row: the one calibrated at training, else ``search.match_threshold``.

    The pack's own recognizer (``base``) and versions registered before thresholds were calibrated
    have none of their own and run with the configured one.
    """
    value = ((row or {}).get("metrics") or {}).get("match_threshold")
    return float(value) if value is not None else settings.search.match_threshold


def model_file(catalog: Catalog, settings: Settings, pack: ModelPack, version: str) -> Path:
    """The ONNX file of ``version`` (the pack's recognizer for ``base``), checked to exist."""
    if version == BASE:
        return pack.recognizer
    row = version_row(catalog, version)
    path = settings.layout.root / row["path"]
    if not path.is_file():
        raise ModelVersionError(f"model version '{version}': file {path} is missing")
    return path


def active_version(catalog: Catalog, settings: Settings) -> str:
    """The version the library should run: ``training.active_model`` if set, else the promoted one."""
    return settings.training.active_model or promoted(catalog) or BASE


def active_model(catalog: Catalog | None, settings: Settings, pack: ModelPack) -> tuple[str, Path]:
    """The version the library runs (:func:`active_version`) and its ONNX file, checked to exist.

    ``catalog`` None: there is no catalog yet, so no registry, and only ``base`` can run.

    Raises:
        ModelVersionError: the version is unknown or its file is missing.
    """
    if catalog is None:
        version = settings.training.active_model or BASE
        if version != BASE:
            raise ModelVersionError(f"training.active_model is '{version}' but there is no catalog "
                                    f"(and so no registry) at {settings.layout.catalog_master}")
        return version, pack.recognizer
    version = active_version(catalog, settings)
    return version, model_file(catalog, settings, pack, version)
