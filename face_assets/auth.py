"""API tokens of the review web app: roles, hashed storage in a small JSON file, lookup.

A token reads ``fa_<id>_<secret>``: ``id`` (12 hex digits) finds the record, and the SHA-256 of the
whole token is compared in constant time with the stored hash. The secret is 256 random bits, so a
fast hash is safe here (no password to brute-force), and the file never holds a usable token.

The file (``web.tokens_file`` under the data folder, mode 0600) is written only by
``face-assets token create|list|revoke`` through :class:`TokenStore`, atomically and under a lock
file; the running server reloads it when it changes, so a revoked token stops working at once.
Page logins are sessions of a token, kept by the server in :class:`SessionStore`.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .errors import ConfigError

ROLES = ("viewer", "reviewer", "admin")
"""Each role can do what the ones before it can: viewer searches and browses, reviewer also votes
and curates persons, admin also reads the audit log and the feedback statistics."""

_TOKEN = re.compile(r"fa_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class Principal:
    """Who makes a request: the token's id, the user name it was issued to, and its role."""

    token_id: str
    name: str
    role: str

    def can(self, role: str) -> bool:
        """Whether this principal's role includes ``role``."""
        return ROLES.index(self.role) >= ROLES.index(role)


@dataclass(frozen=True)
class TokenRecord:
    """A stored token: never the token itself, only its SHA-256."""

    id: str
    name: str
    role: str
    sha256: str
    created_at: str

    @property
    def principal(self) -> Principal:
        """The principal a request with this token acts as."""
        return Principal(self.id, self.name, self.role)


def token_id_of(token: str) -> str | None:
    """The id a token names (``fa_<id>_<secret>``), whether or not it is valid; None when it is not token-shaped."""
    match = _TOKEN.fullmatch(token)
    return match.group(1) if match else None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The token file: create, list and revoke (CLI), and authenticate (server, reloading on change)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._by_id: dict[str, TokenRecord] = {}

    # -- writing (CLI) ---------------------------------------------------------------------------
    @contextmanager
    def _exclusive(self) -> Iterator[list[TokenRecord]]:
        """The records under an exclusive lock; what the block leaves in the list is written back."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self._read()
            yield records
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump({"version": 1, "tokens": [asdict(r) for r in records]}, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)

    def create(self, name: str, role: str) -> tuple[TokenRecord, str]:
        """Issue a token for user ``name`` with ``role``; returns the record and the token (shown once).

        Raises:
            ConfigError: ``role`` is not a role, or ``name`` is not 1-64 letters, digits or ``._@-``.
        """
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not _NAME.fullmatch(name):
            raise ConfigError("a token's user name is 1-64 letters, digits or ._@- (starting with a letter or digit)")
        token_id = secrets.token_hex(6)
        token = f"fa_{token_id}_{secrets.token_urlsafe(32)}"
        record = TokenRecord(token_id, name, role, _digest(token), datetime.now(timezone.utc).isoformat())
        with self._exclusive() as records:
            records.append(record)
        return record, token

    def revoke(self, id_or_name: str) -> list[TokenRecord]:
        """Delete the token with this id, or every token of the user with this name; returns those deleted."""
        with self._exclusive() as records:
            gone = [r for r in records if id_or_name in (r.id, r.name)]
            records[:] = [r for r in records if r not in gone]
        return gone

    def list(self) -> list[TokenRecord]:
        """Every stored token record, oldest first."""
        return self._read()

    def _read(self) -> list[TokenRecord]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ConfigError(f"token file {self.path} is unreadable: {exc}") from exc
        return [TokenRecord(**r) for r in data.get("tokens", [])]

    # -- reading (server) ------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Reload the records when the file changed (a stat per call: revocation takes effect at once)."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._by_id = {r.id: r for r in self._read()}
            self._stamp = stamp

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a valid, unrevoked token, else None."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        with self._lock:
            self._refresh()
            record = self._by_id.get(match.group(1))
        if record is None or not hmac.compare_digest(record.sha256, _digest(token)):
            return None
        return record.principal

    def principal(self, token_id: str) -> Principal | None:
        """The principal of a token id that is still stored (a page session holds the id, not the token)."""
        with self._lock:
            self._refresh()
            record = self._by_id.get(token_id)
        return record.principal if record is not None else None


class SessionStore:
    """Page sessions kept by the server: a login adds one, a logout ends it, expired ones are dropped.

    The session cookie (signed) names a session id and its token id; a request with it is
    authenticated only while the session's row lives here, so a cookie copied before a logout is
    refused after it. Rows hold the SHA-256 of the session id, never the id itself. A small SQLite
    file (``sessions.sqlite`` beside the token file, mode 0600): one lookup by primary key per request.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("CREATE TABLE IF NOT EXISTS sessions (sid_sha256 TEXT PRIMARY KEY, token_id TEXT NOT NULL, "
                          "expires REAL NOT NULL)")

    def start(self, token_id: str, seconds: float) -> str:
        """A new session of ``token_id`` lasting ``seconds``; returns its id (for the signed cookie)."""
        sid = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._con.execute("DELETE FROM sessions WHERE expires < ?", [now])
            self._con.execute("INSERT INTO sessions VALUES (?, ?, ?)", [_digest(sid), token_id, now + seconds])
        return sid

    def valid(self, sid: str, token_id: str) -> bool:
        """Whether session ``sid`` of ``token_id`` is live (started, not ended, not expired)."""
        with self._lock:
            row = self._con.execute("SELECT token_id, expires FROM sessions WHERE sid_sha256 = ?",
                                    [_digest(sid)]).fetchone()
        return row is not None and row[0] == token_id and row[1] > time.time()

    def end(self, sid: str) -> None:
        """End session ``sid`` (a logout): its cookie is refused from now on, wherever it was copied."""
        with self._lock:
            self._con.execute("DELETE FROM sessions WHERE sid_sha256 = ?", [_digest(sid)])

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._con.close()
