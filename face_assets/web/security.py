"""Who may do what in the web app, and the guards around every request.

- :class:`Guard`: the principal of a request (``Authorization: Bearer <token>``, else the page's
  signed session cookie holding a token id), its role check and per-token rate limits (``limits``).
- :class:`SecurityHeaders`: CSP with ``frame-ancestors 'none'``, nosniff, Referrer-Policy on every
  response, the framework's own errors included.
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

from ..auth import Principal, TokenStore
from ..config import WebSettings
from ..errors import ConfigError

SESSION_KEY = "token_id"
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

    def __init__(self, settings: WebSettings, tokens: TokenStore):
        self.settings = settings
        self.tokens = tokens
        try:
            self.rate = parse(settings.rate_limit)
            self.search_rate = parse(settings.search_rate_limit)
        except ValueError as exc:
            raise ConfigError(f"web.rate_limit / web.search_rate_limit: {exc}") from None
        self.limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    def principal(self, request: Request) -> Principal | None:
        """Who sends ``request``, or None when unauthenticated (a bad token counts as none)."""
        if self.settings.auth == "none":
            return LOCAL
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            return self.tokens.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        token_id = request.session.get(SESSION_KEY)
        return self.tokens.principal(token_id) if isinstance(token_id, str) else None

    def _limit(self, item, key: str) -> None:
        if not self.limiter.hit(item, key):
            reset = self.limiter.get_window_stats(item, key).reset_time
            raise HTTPException(429, "too many requests: slow down",
                                headers={"Retry-After": str(max(1, math.ceil(reset - time.time())))})

    def role(self, role: str, limited: bool = True):
        """A dependency: the principal when its role includes ``role`` (401/403 otherwise), rate-limited."""

        def dependency(request: Request) -> Principal:
            who = self.principal(request)
            if who is None:
                raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
            if limited:
                self._limit(self.rate, who.token_id)
            if not who.can(role):
                raise HTTPException(403, f"this needs the {role} role")
            return who

        return dependency

    def login_attempt(self, request: Request) -> None:
        """Count a login attempt against the client address's rate (429 beyond)."""
        self._limit(self.search_rate, f"login:{request.client.host if request.client else '-'}")

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
