"""``create_app(config)``: the composition root, and the ASGI entry it returns.

``create_app`` builds each collaborator once (the store, the trust policy and request facts,
the session cookie format, login redirects, the decision, the forwarder, the session watch,
the metrics, the pages) and hands each handler only what it uses; no handler imports this
module, only the entry point that serves it (``gateway/serve.py``, ``gateway/cli.py``).

Every request is one of: a gateway route (the pages, forward-auth ``/auth``, health, ready,
metrics; ``/auth`` and metrics only when their path is set), or a request for the upstream,
which goes through the one decision and is then forwarded (proxy mode) or refused. The hot
paths (proxy, ``/auth``, WebSocket) are raw ASGI; the pages run on Starlette's router
(``enrol.py``). In proxy mode a request that names a host outside the host policy
(``hosts.py``) is refused first, before any decision, for the pages too; the probes and
``/auth`` are not held to it (probes use IP addresses; for ``/auth`` the front chose the host).
The lifespan owns the store and the upstream transport.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Awaitable, Callable

import httpx
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.audit import RequestContext
from gateway.config import Config
from gateway.decision import Decider, Decision, Facts
from gateway.enrol import Enrolment
from gateway.errors import Reason, StoreError
from gateway.factors import SecondFactor
from gateway.forward_auth import ForwardAuth
from gateway.hosts import HostPolicy, MalformedHost, addressed
from gateway.metrics import MeasuredTransport, Metrics, measured_store
from gateway.pages import Pages
from gateway.protect import Protect
from gateway.proxy import Forwarder, default_transport
from gateway.redirects import LoginRedirects
from gateway.request_facts import RequestFacts, TrustPolicy
from gateway.responses import send_denial, send_json
from gateway.revocation import SessionWatch, poll_interval
from gateway.session_cookie import SessionCookie
from gateway.shutdown import DRAIN_STATE_KEY, Drain
from gateway.store import Store, open_store_from_url
from gateway.websocket import proxy_websocket

log = logging.getLogger("gateway")

Decide = Callable[[Facts], Awaitable[Decision]]

# Headers a proxy adds when it relays a client's request (RFC 7239 Forwarded, the de facto
# X-Forwarded-For and X-Real-IP, the forward-auth target): a scraper asking directly sends none.
_RELAYED_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip", b"x-original-uri", b"x-forwarded-uri"})
_WS_POLICY_VIOLATION = 1008


def counted(decider: Decider, metrics: Metrics, mode: str) -> Decide:
    """The one decision, counted for the metrics under ``mode`` ("proxy" or "auth")."""

    async def decide(facts: Facts) -> Decision:
        decision = await decider.decide(facts)
        metrics.count(mode, decision.reason)
        return decision

    return decide


class Lifespan:
    """Opens the store at start-up (a store that does not answer stops it) and closes the
    store, the upstream transport and the session watch at shutdown. It hands the server its
    ``drain`` through the lifespan state (gateway/shutdown.py)."""

    def __init__(
        self,
        store: Store,
        forwarder: Forwarder | None,
        sessions: SessionWatch,
        summary: str,
        drain: Drain,
        metrics: Metrics,
    ) -> None:
        self.drain = drain
        self.metrics = metrics
        self.store = store
        self.forwarder = forwarder
        self.sessions = sessions
        self.summary = summary

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if "state" in scope:
                    scope["state"][DRAIN_STATE_KEY] = self.drain
                try:
                    await self.store.open()
                except StoreError as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"store unreachable: {exc}"})
                    return
                # Everything loaded so far lives as long as the process: keep it out of the
                # cyclic collector's full passes, which otherwise stall every request in flight.
                gc.freeze()
                self.metrics.watch_event_loop()
                log.info("gateway ready: %s", self.summary)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.sessions.stop()
                if self.forwarder is not None:
                    await self.forwarder.aclose()
                await self.store.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


class Probes:
    """Health, readiness and metrics."""

    def __init__(self, store: Store, metrics: Metrics, trust: TrustPolicy, drain: Drain) -> None:
        self.store = store
        self.metrics = metrics
        self.trust = trust
        self.drain = drain

    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"})

    async def ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.drain.draining:  # stopping: let the load balancer move traffic away
            self.metrics.ready.set(0)
            await send_json(send, 503, {"status": "stopping", "detail": "the gateway is shutting down"})
            return
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
        relayed = any(name in _RELAYED_HEADERS for name, _ in scope["headers"])
        if relayed or not self.trust.trusts_scope(scope):
            await send_denial(send, Reason.UNTRUSTED_PEER, Headers(scope=scope).get("accept"))
            return
        await self.metrics.serve(scope, receive, send)


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """Forward-auth-only mode: there is no upstream to protect."""
    await send_denial(send, Reason.NOT_FOUND, Headers(scope=scope).get("accept"))


class Gateway:
    """The ASGI entry: ``routes`` by exact path, else ``protect``; WebSockets to ``websocket``.
    ``hosts`` (proxy mode only) is checked first for every request but the ``unchecked`` routes."""

    def __init__(
        self,
        routes: dict[str, ASGIApp],
        protect: ASGIApp,
        websocket: ASGIApp,
        lifespan: ASGIApp,
        hosts: HostPolicy | None,
        trust: TrustPolicy,
        unchecked: frozenset[str],
        context: Callable[[ASGIApp], ASGIApp] | None = None,
    ) -> None:
        # context: audit.RequestContext around every request (its id, mode and client).
        self.serve: ASGIApp = self._dispatch if context is None else context(self._dispatch)
        self.routes = routes
        self.protect = protect
        self.websocket = websocket
        self.lifespan = lifespan
        # An open policy (neither public_url nor allowed_hosts) allows every valid host: skip it.
        self.hosts = hosts if hosts is not None and not hosts.open else None
        self.trust = trust
        self.unchecked = unchecked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The lifespan too goes through the context: at shutdown it logs the audit counts it holds.
        await self.serve(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            if self.hosts is not None and path not in self.unchecked and not await self._host_allowed(scope, send):
                return
            await self.routes.get(path, self.protect)(scope, receive, send)
        elif kind == "websocket":
            if self.hosts is not None and not await self._host_allowed(scope, send):
                return
            await self.websocket(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(scope, receive, send)

    async def _host_allowed(self, scope: Scope, send: Send) -> bool:
        """True when the request's host is one the gateway answers for; else it is refused
        here (400 for a malformed or repeated host, 421 for another site's; a WebSocket is
        closed before it is accepted, which the server answers with 403)."""
        assert self.hosts is not None
        trusted = self.trust.trusts_scope(scope)
        try:
            where = addressed(scope["headers"], scope.get("scheme", "http"), trusted, scope.get("http_version", "1.1"))
        except MalformedHost:
            reason = Reason.MALFORMED_REQUEST
        else:
            if self.hosts.allows(where.host, where.scheme):
                return True
            reason = Reason.MISDIRECTED
        if scope["type"] == "websocket":
            log.info("websocket handshake refused: %s", reason.value)
            await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION})
        else:
            await send_denial(send, reason, Headers(scope=scope).get("accept"))
        return False


def create_app(
    config: Config,
    store: Store | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
    metrics: Metrics | None = None,
) -> Gateway:
    """The gateway for ``config``; ``store``, ``transport`` and ``clock`` are for tests, ``metrics``
    for a listener of its own (``metrics_export``)."""
    if store is None:
        store = open_store_from_url(
            config.store.url,
            config.store.prefix,
            config.store.max_connections,
            config.store.replicas_ack,
            create=config.store.create == "if_missing",  # else a missing or emptied store is refused
        )
    metrics = metrics if metrics is not None else Metrics()
    store = measured_store(store, metrics)
    trust = TrustPolicy(config.server.trusted_proxies)
    facts = RequestFacts(trust)
    cookie = SessionCookie(config.session)
    redirects = LoginRedirects(config)
    factors = SecondFactor(config, store, clock)
    decider = Decider(config, factors)
    hosts = HostPolicy.from_config(config)
    if config.upstream.url:
        upstream = MeasuredTransport(transport if transport is not None else default_transport(config), metrics)
        forwarder: Forwarder | None = Forwarder(config, upstream, hosts)
    else:
        forwarder = None
    # Open WebSockets end with the 2FA session that admitted them (revocation.py).
    sessions = SessionWatch(factors.live_session_user, poll_interval(config.store.cache_ttl))
    pages = Pages(config)  # every template read now: a broken install is logged at start-up
    enrolment = Enrolment(config, factors, decider.identity, facts, cookie, redirects, pages)
    drain = Drain()
    probes = Probes(store, metrics, trust, drain)
    proxy_decide = counted(decider, metrics, "proxy")

    r = config.routes
    page_paths = frozenset((r.setup, r.verify, r.recovery, r.logout))

    def mode_of(path: str) -> str:
        """The audit events' mode of a request to ``path``."""
        return "auth" if path == r.auth else "page" if path in page_paths else "proxy"

    page_app = enrolment.app()
    routes: dict[str, ASGIApp] = {r.health: probes.health, r.ready: probes.ready}
    routes.update(dict.fromkeys((r.setup, r.verify, r.recovery, r.logout), page_app))
    if r.metrics:
        routes[r.metrics] = probes.serve_metrics
    if r.auth:
        routes[r.auth] = ForwardAuth(
            facts,
            counted(decider, metrics, "auth"),
            cookie,
            redirects,
            config.upstream.user_header,
            config.server.public_url,
            hosts,
        )

    async def admit(scope: Scope) -> tuple[Facts, Decision]:
        """A WebSocket handshake's facts (as a GET) and its counted decision."""
        handshake = facts(scope)
        return handshake, await proxy_decide(handshake)

    async def websocket(scope: Scope, receive: Receive, send: Send) -> None:
        with metrics.websocket_open():
            await proxy_websocket(
                scope,
                receive,
                send,
                admit=admit,
                forwarder=forwarder,
                sessions=sessions,
                cookie=cookie.name,
                set_cookie=cookie.set,
            )

    protect: ASGIApp = (
        Protect(facts, proxy_decide, forwarder, sessions, cookie, redirects, pages, r.setup) if forwarder else not_found
    )
    return Gateway(
        routes,
        protect,
        websocket,
        Lifespan(store, forwarder, sessions, config.summary(), drain, metrics),
        hosts if forwarder is not None else None,
        trust,
        unchecked=frozenset(p for p in (r.health, r.ready, r.metrics, r.auth) if p),
        context=lambda app: RequestContext(
            app, trust.trusts, lambda scope: facts(scope, method="GET").client, mode_of, metrics.observe
        ),
    )
