"""Proxy mode, raw ASGI: every request that is not a gateway route is decided, then forwarded
to the upstream or denied.

A denial a person in a browser can fix (the first factor on the application's login page, the
second on the gateway's verify or setup page) is a 302 there, for a ``GET``/``HEAD``
navigation asking for HTML; a lockout is a page saying how long; everything else is the
denial table's answer (JSON for programs, a small page for browsers).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from gateway.decision import Decision, Facts
from gateway.errors import Reason
from gateway.http import wants_html
from gateway.pages import Pages, PagesUnavailable
from gateway.paths import encode_path
from gateway.proxy import Forwarder
from gateway.redirects import LoginRedirects
from gateway.request_facts import RequestFacts
from gateway.responses import send_denial, send_response
from gateway.revocation import ReceiveUntilEnded, SessionWatch, admitting_session
from gateway.session_cookie import SessionCookie

log = logging.getLogger("gateway")

Decide = Callable[[Facts], Awaitable[Decision]]


class Protect:
    def __init__(
        self,
        facts: RequestFacts,
        decide: Decide,
        forwarder: Forwarder,
        sessions: SessionWatch,
        cookie: SessionCookie,
        redirects: LoginRedirects,
        pages: Pages,
        setup_route: str,
    ) -> None:
        self.facts = facts
        self.decide = decide
        self.forwarder = forwarder
        self.sessions = sessions
        self.cookie = cookie
        self.redirects = redirects
        self.pages = pages
        self.setup_route = setup_route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        facts = self.facts(scope)
        decision = await self.decide(facts)
        if not decision.allowed:
            await self.deny(scope, send, decision, facts)
            return
        assert decision.path is not None
        extra = [self.cookie.set(decision.new_session)] if decision.new_session else None
        # A long response or upload ends with its 2FA session, as a WebSocket does.
        session = admitting_session(decision, facts.headers, self.cookie.name)
        watched = None
        if session is not None and decision.user is not None:
            receive = watched = ReceiveUntilEnded(self.sessions, session, decision.user, receive)
        try:
            await self.forwarder.forward(
                scope,
                receive,
                send,
                encode_path(decision.path),
                decision.forwarded_user,
                facts.peer_trusted,
                extra,
            )
        except Exception:
            # After the response has started there is nothing left to say but to close.
            log.exception("forwarding failed")
        finally:
            if watched is not None:
                watched.close()

    async def deny(self, scope: Scope, send: Send, decision: Decision, facts: Facts) -> None:
        accept = facts.headers.get("accept")
        if wants_html(accept) and scope["method"] in ("GET", "HEAD") and decision.path is not None:
            query = scope.get("query_string", b"")
            target = encode_path(decision.path) + ("?" + query.decode("latin-1") if query else "")
            location = self.redirects.location(decision.reason, target)
            if location is not None:
                headers_out = [(b"location", location.encode()), (b"cache-control", b"no-store")]
                await send_response(send, 302, headers_out, b"")
                return
        if decision.reason is Reason.LOCKED and wants_html(accept) and decision.retry_after is not None:
            # Issue 10: the lockout page says how long to wait and links back (templates/locked.html).
            minutes = (decision.retry_after + 59) // 60
            target = encode_path(decision.path or "/")
            try:
                body = self.pages.render("locked.html", title="Code entry locked", minutes=minutes, next=target)
            except PagesUnavailable:
                pass  # the denial table's page below says the same, without the minutes
            else:
                retry = [(b"retry-after", str(decision.retry_after).encode())]
                await send_response(send, 429, self.pages.headers + retry, body)
                return
        fields: dict[str, Any] = {}
        if decision.reason is Reason.NOT_ENROLLED:
            fields["setup"] = self.setup_route
        await send_denial(send, decision.reason, accept, retry_after=decision.retry_after, **fields)
