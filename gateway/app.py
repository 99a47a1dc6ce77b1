"""``create_app(config)``: the pure ASGI application.

Every request is one of: a gateway route (enrolment pages, forward-auth ``/auth``, health,
metrics; ``/auth`` and metrics only when their path is set), or a request for the upstream,
which goes through the one decision and is then forwarded (proxy mode) or refused. The
lifespan owns the store and the upstream transport.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import httpx
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from gateway.config import Config
from gateway.decision import Decider, Decision, Facts, client_address, is_trusted
from gateway.errors import Reason, StoreError
from gateway.factors import SecondFactor
from gateway.http import wants_html
from gateway.metrics import Metrics
from gateway.pages import PAGE_HEADERS
from gateway.paths import encode_path
from gateway.proxy import Forwarder
from gateway.responses import send_denial, send_json, send_response
from gateway.revocation import ReceiveUntilEnded, SessionWatch, admitting_session, poll_interval
from gateway.store import Store, open_store_from_url

log = logging.getLogger("gateway")

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

# Denials a person in a browser can fix on the gateway's own pages: send them there.
_TO_VERIFY = frozenset({Reason.CODE_REQUIRED, Reason.INVALID_CODE, Reason.REPLAYED_CODE})
# ... and the first factor, on the application's own login page (identity.login_url).
_TO_LOGIN = frozenset({Reason.IDENTITY_REQUIRED, Reason.INVALID_IDENTITY})
# Headers a proxy adds when it relays a client's request (RFC 7239 Forwarded, the de facto
# X-Forwarded-For and X-Real-IP, the forward-auth target): a scraper asking directly sends none.
_RELAYED_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip", b"x-original-uri", b"x-forwarded-uri"})


class Gateway:
    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = (
            store
            if store is not None
            else open_store_from_url(config.store.url, config.store.prefix, config.store.max_connections)
        )
        self.factors = SecondFactor(config, self.store, clock)
        self.decider = Decider(config, self.factors)
        # Open WebSockets end with the 2FA session that admitted them (revocation.py).
        self.session_watch = SessionWatch(self.factors.live_session_user, poll_interval(config.store.cache_ttl))
        self.forwarder = Forwarder(config, transport) if config.upstream.url else None
        self.networks = config.server.trusted_proxies
        self._trust: dict[str, bool] = {}
        routes = config.routes
        self.metrics = Metrics()
        self.routes: dict[str, Handler] = {routes.health: self.health, routes.ready: self.ready}
        if routes.metrics:
            self.routes[routes.metrics] = self.serve_metrics
        from gateway.forward_auth import ForwardAuth

        self.forward_auth = ForwardAuth(self)
        if routes.auth:
            self.routes[routes.auth] = self.forward_auth
        try:
            from gateway.enrol import Enrolment
        except ImportError:  # pragma: no cover - enrolment lands in its own module
            pass
        else:
            self.enrolment = Enrolment(self)
            self.routes.update(self.enrolment.routes())

    # -- facts -------------------------------------------------------------------------------

    def peer_trusted(self, peer: str | None) -> bool:
        if peer is None:
            return False
        trusted = self._trust.get(peer)
        if trusted is None:
            trusted = is_trusted(peer, self.networks)
            if len(self._trust) < 10_000:
                self._trust[peer] = trusted
        return trusted

    def facts(
        self, scope: Scope, method: str | None = None, path: str | None = None, headers: Headers | None = None
    ) -> tuple[Facts, Headers]:
        if headers is None:
            headers = Headers(scope=scope)
        client = scope.get("client")
        peer = client[0] if client else None
        trusted = self.peer_trusted(peer)
        raw_path = scope.get("raw_path")
        facts = Facts(
            method=method if method is not None else scope["method"],
            path=path if path is not None else (raw_path.decode("latin-1") if raw_path else scope["path"]),
            client=client_address(peer, headers.get("x-forwarded-for"), self.networks) if trusted else peer,
            peer_trusted=trusted,
            headers=headers,
        )
        return facts, headers

    def session_cookie(self, session_id: str) -> tuple[bytes, bytes]:
        s = self.config.session
        # RFC 6265 §4.1.2: HttpOnly keeps it from scripts, SameSite=Lax from cross-site POSTs.
        value = f"{s.cookie}={session_id}; Path=/; Max-Age={s.ttl}; HttpOnly; SameSite=Lax"
        if s.secure:
            value += "; Secure"
        return b"set-cookie", value.encode()

    def login_location(self, reason: Reason, target: str) -> str | None:
        """Where a browser goes to fix a denial, with a local return target; None if nowhere."""
        if reason in _TO_LOGIN:
            login = self.config.identity.login_url
            return login.replace("{next}", quote(target, safe="/")) if login else None
        if reason not in _TO_VERIFY and reason is not Reason.NOT_ENROLLED:
            return None
        route = self.config.routes.setup if reason is Reason.NOT_ENROLLED else self.config.routes.verify
        return f"{route}?next={quote(target, safe='/')}"

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            handler = self.routes.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
            else:
                await self.protect(scope, receive, send)
        elif kind == "websocket":
            from gateway.websocket import proxy_websocket

            await proxy_websocket(self, scope, receive, send, self.session_watch)
        elif kind == "lifespan":
            await self.lifespan(receive, send)

    async def decide(self, facts: Facts, mode: str) -> Decision:
        """The one decision, counted for the metrics; ``mode`` is "proxy" or "auth"."""
        decision = await self.decider.decide(facts)
        self.metrics.count(mode, decision.reason)
        return decision

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.store.open()
                except StoreError as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"store unreachable: {exc}"})
                    return
                # Everything loaded so far lives as long as the process: keep it out of the
                # cyclic collector's full passes, which otherwise stall every request in flight.
                gc.freeze()
                log.info("gateway ready: %s", self.config.summary())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.session_watch.stop()
                if self.forwarder is not None:
                    await self.forwarder.aclose()
                await self.store.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def protect(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Proxy mode: decide, then forward or deny."""
        if self.forwarder is None:
            await send_denial(send, Reason.NOT_FOUND, _header(scope, b"accept"))
            return
        facts, headers = self.facts(scope)
        decision = await self.decide(facts, "proxy")
        if decision.allowed:
            assert decision.path is not None
            extra = [self.session_cookie(decision.new_session)] if decision.new_session else None
            # A long response or upload ends with its 2FA session, as a WebSocket does.
            session = admitting_session(decision, headers, self.config.session.cookie)
            watched = None
            if session is not None and decision.user is not None:
                receive = watched = ReceiveUntilEnded(self.session_watch, session, decision.user, receive)
            try:
                await self.forwarder.forward(
                    scope,
                    receive,
                    send,
                    encode_path(decision.path),
                    decision.user if decision.reason is not Reason.EXCLUDED else None,
                    facts.peer_trusted,
                    extra,
                )
            except Exception:
                # After the response has started there is nothing left to say but to close.
                log.exception("forwarding failed")
            finally:
                if watched is not None:
                    watched.close()
            return
        await self.deny(scope, send, decision, headers)

    async def deny(self, scope: Scope, send: Send, decision: Decision, headers: Headers) -> None:
        accept = headers.get("accept")
        if wants_html(accept) and scope["method"] in ("GET", "HEAD") and decision.path is not None:
            query = scope.get("query_string", b"")
            target = encode_path(decision.path) + ("?" + query.decode("latin-1") if query else "")
            location = self.login_location(decision.reason, target)
            if location is not None:
                headers_out = [(b"location", location.encode()), (b"cache-control", b"no-store")]
                await send_response(send, 302, headers_out, b"")
                return
        if decision.reason is Reason.LOCKED and wants_html(accept) and decision.retry_after is not None:
            # Issue 10: the lockout page says how long to wait and links back (gateway/templates/locked.html).
            minutes = (decision.retry_after + 59) // 60
            target = encode_path(decision.path or "/")
            body = self.enrolment.pages.render("locked.html", title="Code entry locked", minutes=minutes, next=target)
            retry = [(b"retry-after", str(decision.retry_after).encode())]
            await send_response(send, 429, PAGE_HEADERS + retry, body)
            return
        fields: dict[str, Any] = {}
        if decision.reason is Reason.NOT_ENROLLED:
            fields["setup"] = self.config.routes.setup
        await send_denial(send, decision.reason, accept, retry_after=decision.retry_after, **fields)

    # -- health ------------------------------------------------------------------------------

    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"})

    async def ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.store.ping()
        except StoreError:
            self.metrics.ready.set(0)
            await send_json(send, 503, {"status": "unavailable", "detail": "the store does not answer"})
            return
        self.metrics.ready.set(1)
        await send_json(send, 200, {"status": "ready"})

    async def serve_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Only for a trusted peer asking itself: behind a front proxy every client is a trusted
        peer, but its request arrives relayed."""
        client = scope.get("client")
        relayed = any(name in _RELAYED_HEADERS for name, _ in scope["headers"])
        if relayed or not self.peer_trusted(client[0] if client else None):
            await send_denial(send, Reason.UNTRUSTED_PEER, _header(scope, b"accept"))
            return
        await self.metrics.serve(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def create_app(
    config: Config,
    store: Store | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> Gateway:
    return Gateway(config, store=store, transport=transport, clock=clock)
