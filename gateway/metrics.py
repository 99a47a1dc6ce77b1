"""Prometheus metrics, served at ``routes.metrics`` to trusted proxies only (traffic patterns
are nobody else's business). No label ever carries a user id, a path or a code: only the
decision's reason and the mode, so the series count stays fixed."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from gateway.errors import Reason
from gateway.responses import send_response


class Metrics:
    def __init__(self) -> None:
        # One registry per app: tests start several gateways in one process.
        self.registry = CollectorRegistry()
        decisions = Counter(
            "gateway_decisions", "Access decisions, by mode and reason.", ["mode", "reason"], registry=self.registry
        )
        # Children resolved once: counting a request is one dict lookup and one add.
        self.decisions = {
            (mode, reason): decisions.labels(mode, reason.value) for mode in ("proxy", "auth") for reason in Reason
        }
        self.ready = Gauge(
            "gateway_store_up", "1 when the store answered the last readiness check.", registry=self.registry
        )

    def count(self, mode: str, reason: Reason) -> None:
        self.decisions[(mode, reason)].inc()

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.registry)
        await send_response(send, 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], body)
