"""CSRF for the gateway's pages: no token; the cross-origin check of Go 1.25's
``net/http.CrossOriginProtection`` (F. Valsorda, "Cross-Site Request Forgery", 2025), done
before anything else on every POST:

1. ``Sec-Fetch-Site`` present (every browser since 2023): only ``same-origin`` or ``none``
   (typed by the user) pass;
2. else ``Origin`` present (every browser on every POST since 2020): its host must be the
   request's ``Host`` or ``server.public_url``'s; ``null`` never passes;
3. else the request is not from a browser: a program sends its credentials on purpose.

Refusals are 403 ``csrf_failed``. Without a token, an application behind the gateway can put
a plain ``<form method="post" action="/logout-2fa">`` on its own pages. The session cookie's
``SameSite=Lax`` is a second wall.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.audit import audit
from gateway.errors import Reason
from gateway.responses import send_denial


def cross_origin(headers: Headers, public_host: str | None) -> bool:
    """True when a browser sent this request from another origin (see the module docstring)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return True  # "null" and anything else that names no origin
    host = parts.netloc.lower()
    return host != (headers.get("host") or "").strip().lower() and host != public_host


class CrossOriginGuard:
    """Refuses a cross-origin POST before the router sees it; other methods pass (a GET
    changes nothing, and the router answers any other method with 405)."""

    def __init__(self, app: ASGIApp, public_url: str | None, client: Callable[[Scope], str | None]) -> None:
        self.app = app
        self.public_host = urlsplit(public_url).netloc.lower() if public_url else None
        self.client = client  # the client's address, for the audit line

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = Headers(scope=scope)
            if cross_origin(headers, self.public_host):
                audit("csrf.refused", client=self.client(scope), route=scope["path"])
                await send_denial(send, Reason.CSRF, headers.get("accept"))
                return
        await self.app(scope, receive, send)
