"""Who may do what in the web app, and the guards around every request.

- :class:`Guard`: the principal of a request (``Authorization: Bearer <token>``, else the page's
  signed session cookie naming a live server-side session), its role check, per-token rate limits
  and limits on failed authentications per client address and per token id (``limits``).
- :class:`SecurityHeaders`: CSP with ``frame-ancestors 'none'``, nosniff, Referrer-Policy on every
  response, the framework's own errors included (it wraps the whole app, early 413s too).
- :func:`is_loopback`: whether a bind address reaches only this machine.

Host checking (starlette ``TrustedHostMiddleware``), CSRF (``starlette-csrf``), sessions
(starlette ``SessionMiddleware``) and body limits (FastAPI ``max_body_size``) are the frameworks'
own middleware, wired in :func:`face_assets.web.app.create_app`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import secrets
import time
from pathlib import Path

from fastapi import HTTPException, Request
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import Principal, SessionStore, TokenStore, token_id_of
from ..config import WebSettings
from ..errors import ConfigError

SESSION_KEY = "token_id"
SESSION_ID = "sid"
LOCAL = Principal("local", "local", "admin")
"""Who every request is with ``web.auth: none`` (loopback only)."""

CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "x-frame-options": "DENY",
           "referrer-policy": "no-referrer", "cross-origin-opener-policy": "same-origin",
           "cross-origin-resource-policy": "same-origin"}


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def session_secret(path: Path) -> str:
    """The key signing session and CSRF cookies, made once and kept (mode 0600) so logins survive a restart."""
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(key)
    return key


class Guard:
    """Authentication, roles and rate limits, as FastAPI dependencies (``Depends(guard.role("reviewer"))``)."""

    def __init__(self, settings: WebSettings, tokens: TokenStore, sessions: SessionStore):
        self.settings = settings
        self.tokens = tokens
        self.sessions = sessions
        try:
            self.rate = parse(settings.rate_limit)
            self.search_rate = parse(settings.search_rate_limit)
            self.failure_rate = parse(settings.auth_failure_limit)
        except ValueError as exc:
            raise ConfigError(f"web.rate_limit / search_rate_limit / auth_failure_limit: {exc}") from None
        self.limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    def principal(self, request: Request) -> Principal | None:
        """Who sends ``request``, or None when unauthenticated (a bad token or an ended session counts as none)."""
        if self.settings.auth == "none":
            return LOCAL
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            return self.tokens.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        token_id, sid = request.session.get(SESSION_KEY), request.session.get(SESSION_ID)
        if isinstance(token_id, str) and isinstance(sid, str) and self.sessions.valid(sid, token_id):
            return self.tokens.principal(token_id)
        return None

    def _failure_keys(self, request: Request) -> list[str]:
        """The failure counters a request with credentials hits: its client address, and the token id it names."""
        keys = [f"fail:{request.client.host if request.client else '-'}"]
        named = token_id_of(request.headers.get("authorization", "").partition(" ")[2].strip())
        if named is not None:
            keys.append(f"fail-token:{named}")
        return keys

    def authenticate(self, request: Request) -> Principal:
        """The principal of ``request`` (401 without one); 429 while its address or token id has too many failures.

        A failure is a request that brings credentials (a bearer token, a session cookie) that do
        not authenticate: guessing tokens from one address, or one token's secret from many, is slowed.
        """
        keys = self._failure_keys(request)
        for key in keys:
            if not self.limiter.test(self.failure_rate, key):
                self._limit(self.failure_rate, key)  # raises 429 with Retry-After
        who = self.principal(request)
        if who is None:
            if "authorization" in request.headers or request.session:
                for key in keys:
                    self.limiter.hit(self.failure_rate, key)
            raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
        return who

    def login_failed(self, request: Request) -> None:
        """Count a refused page login against the client address's failures."""
        self.limiter.hit(self.failure_rate, self._failure_keys(request)[0])

    def _limit(self, item, key: str) -> None:
        if not self.limiter.hit(item, key):
            reset = self.limiter.get_window_stats(item, key).reset_time
            raise HTTPException(429, "too many requests: slow down",
                                headers={"Retry-After": str(max(1, math.ceil(reset - time.time())))})

    def role(self, role: str, limited: bool = True):
        """A dependency: the principal when its role includes ``role`` (401/403 otherwise), rate-limited."""

        def dependency(request: Request) -> Principal:
            who = self.authenticate(request)
            if limited:
                self._limit(self.rate, who.token_id)
            if not who.can(role):
                raise HTTPException(403, f"this needs the {role} role")
            return who

        return dependency

    def login_attempt(self, request: Request) -> None:
        """Count a login attempt against the client address's rate, and refuse it while the address
        has too many failures (429 beyond either)."""
        self._limit(self.search_rate, f"login:{request.client.host if request.client else '-'}")
        key = self._failure_keys(request)[0]
        if not self.limiter.test(self.failure_rate, key):
            self._limit(self.failure_rate, key)

    def search_slot(self, who: Principal) -> None:
        """Count a search against the principal's search rate (429 beyond)."""
        self._limit(self.search_rate, who.token_id)


class SecurityHeaders:
    """Pure ASGI middleware adding :data:`HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
