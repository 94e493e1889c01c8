"""Append-only audit log of who changed what: one JSON object per line (``web.audit_file``).

Each entry holds ``at`` (UTC ISO time), ``actor`` (the user name of the token), ``action`` and the
action's details. Lines are appended with ``O_APPEND`` and flushed to disk before the call returns,
so an entry is never half-written by two writers and survives a crash once acknowledged.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


class AuditLog:
    """The audit file: :meth:`append` an entry, :meth:`tail` the latest ones."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, actor: str, action: str, **details: Any) -> dict[str, Any]:
        """Write one entry and return it."""
        entry = {"at": datetime.now(timezone.utc).isoformat(), "actor": actor, "action": action} | details
        line = (json.dumps(entry, default=str, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry

    def tail(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest ``limit`` entries, newest first."""
        try:
            with open(self.path, encoding="utf-8") as f:
                last = deque(f, maxlen=limit)
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in reversed(last)]
