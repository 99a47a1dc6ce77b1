"""The gateway's pages as one ASGI app: a body limit (``inputs.BodyLimit``), the CSRF guard
(``csrf.py``), Starlette's ``Router``, and the exception handlers that turn every error into a
denial from the one table in ``errors.py``: JSON ``{"error", "detail"}`` for programs, a small
page for browsers, never a traceback.

    HTTPException 405      method_not_allowed, with ``Allow: GET, HEAD, POST``
    PageDenial             its reason (no identity: identity_required, ...)
    BadInput               invalid_input, the message naming the field (never its value)
    ClientDisconnect       invalid_input
    StoreError             store_unavailable (503)
    PagesUnavailable       pages_unavailable (503): the templates are missing
    anything else          internal_error (500), logged with its traceback
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.audit import audit
from gateway.csrf import CrossOriginGuard
from gateway.errors import DecryptError, Reason, StoreError
from gateway.http import wants_html
from gateway.inputs import BadInput, BodyLimit
from gateway.pages import PagesUnavailable
from gateway.responses import denial_response

log = logging.getLogger("gateway.enrol")


class PageDenial(Exception):
    """A request a page refuses before its route runs (no identity), with the reason."""

    def __init__(self, reason: Reason) -> None:
        self.reason = reason


def page_app(routes: Sequence[BaseRoute], public_url: str | None, client: Callable[[Scope], str | None]) -> ASGIApp:
    """``routes`` behind the body limit and the CSRF guard, errors answered as denials.
    ``client`` names the client's address for the CSRF audit line."""
    guarded = CrossOriginGuard(BodyLimit(Router(list(routes))), public_url, client)
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: _http_error,
        PageDenial: _denied,
        BadInput: _bad_input,
        ClientDisconnect: _bad_input,
        StoreError: _store_error,
        PagesUnavailable: _pages_unavailable,
        Exception: _unexpected,
    }
    return _App(ExceptionMiddleware(guarded, handlers=handlers))


class _App:
    """Marks the scope as served by a Starlette app, so the router raises its 405 for the
    handlers above instead of answering in plain text (``Route.handle``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        await self.app(scope, receive, send)


def _accept(request: Request) -> str | None:
    return "text/html" if wants_html(request.headers.get("accept")) else None


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # Starlette's Allow is a set's order: say it the same way every time.
        allow = ", ".join(sorted(m.strip() for m in (exc.headers or {}).get("Allow", "").split(",")))
        return denial_response(Reason.METHOD_NOT_ALLOWED, _accept(request), headers=[(b"allow", allow.encode())])
    return denial_response(Reason.NOT_FOUND, _accept(request))


async def _denied(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageDenial)
    return denial_response(exc.reason, _accept(request))


async def _bad_input(request: Request, exc: Exception) -> Response:
    log.info("refused a malformed body on %s: %s", request.url.path, exc)
    # BadInput's message names the field and what was wrong (never its value).
    detail = str(exc) if isinstance(exc, BadInput) else "the client went away"
    return denial_response(Reason.INVALID_INPUT, _accept(request), detail=detail)


async def _store_error(request: Request, exc: Exception) -> Response:
    audit("store.error", detail=f"store unavailable on {request.url.path}: {exc}")
    return denial_response(Reason.STORE_UNAVAILABLE, _accept(request))


async def _pages_unavailable(request: Request, exc: Exception) -> Response:
    # Logged once at start-up (pages.py); the page says it, a program gets the JSON.
    return denial_response(Reason.PAGES_UNAVAILABLE, _accept(request))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # DecryptError is logged where it happens (factors); anything else is a bug. Either way
    # the client gets a generic 500, never a traceback.
    if not isinstance(exc, DecryptError):
        log.exception("unexpected error on %s", request.url.path)
    return denial_response(Reason.INTERNAL, _accept(request))
