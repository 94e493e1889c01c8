"""The review web app (docs/web.md): :func:`create_app` builds it over a library, :func:`serve` runs it."""

from .app import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, check_bind, create_app, serve

__all__ = ["CSRF_COOKIE", "CSRF_HEADER", "SESSION_COOKIE", "check_bind", "create_app", "serve"]
