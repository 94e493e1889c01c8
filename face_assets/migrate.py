"""The one-time upgrade of a data folder written by an older release (``face-assets migrate``).

The stores' normal opens take only this release's layout; one of an older release makes them raise
:class:`~face_assets.errors.MigrationRequiredError`, which says to run this. Each store upgrades
itself, atomically, with its own SQL (:meth:`Catalog.migrate <face_assets.store.Catalog.migrate>`,
:meth:`FeedbackStore.migrate <face_assets.feedback.FeedbackStore.migrate>`,
:meth:`AuditLog.import_former_log <face_assets.audit.AuditLog.import_former_log>`); what each adds is
listed in docs/operations.md ("Upgrading a data folder"). Nothing is deleted: a former file is kept
beside the new one. A second run finds nothing to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from .audit import AuditLog
from .config import Settings
from .feedback import FeedbackStore
from .store import Catalog


def migrate_data_folder(settings: Settings, former_audit_log: str | os.PathLike | None = None) -> list[str]:
    """Upgrade the data folder of ``settings`` (and its PostgreSQL feedback store, when configured) in place.

    Steps, each atomic and each skipped when there is nothing to do: the catalog (a single-file catalog
    copied to its master, then the columns it lacks added in one transaction), the former JSON-lines
    curation log (``former_audit_log``, by default ``audit/people.jsonl`` in the data folder) taken into
    the audit table, then the feedback store's missing columns. Run it with no other process using the
    folder. Returns what was done, one line a step; an empty list when the folder was current.
    """
    done = Catalog.migrate(settings.storage)
    log = Path(former_audit_log) if former_audit_log is not None else settings.layout.former_audit_log
    if log.is_file():
        with Catalog.open(settings.storage) as catalog:
            added = AuditLog(catalog.db).import_former_log(log)
        done.append(f"{log.name}: {added} curation log entries taken into the catalog's audit table "
                    f"(the file renamed {log.name}.imported)")
    return done + FeedbackStore.migrate(settings)
