"""What the decision is told about one request: who sent it, and which of its headers count.

The TCP peer is believed to be a proxy only when it is in ``server.trusted_proxies``; only then
does its ``X-Forwarded-For`` name the client (``decision.client_address``). Proxy mode, the
WebSocket handshake, forward-auth and the gateway's pages all build their facts here.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import Scope

from gateway.config import IPNetwork
from gateway.decision import Facts, client_address, is_trusted

# Distinct peers remembered (a proxy or two in production); a scan from more starts it over.
_MAX_PEERS = 10_000


class TrustPolicy:
    """Whether a TCP peer is one of ``server.trusted_proxies``, remembered per address."""

    def __init__(self, networks: tuple[IPNetwork, ...]) -> None:
        self.networks = networks
        # Whether an address is trusted cannot change while the config does not: no expiry, so
        # a plain dict (a TtlCache get costs 5x, on every request /auth answers). When full it
        # starts again empty, the one eviction policy of gateway/cache.py.
        self._known: dict[str, bool] = {}

    def trusts(self, peer: str | None) -> bool:
        if peer is None:
            return False
        trusted = self._known.get(peer)
        if trusted is None:
            trusted = is_trusted(peer, self.networks)
            if len(self._known) >= _MAX_PEERS:
                self._known.clear()
            self._known[peer] = trusted
        return trusted

    def trusts_scope(self, scope: Scope) -> bool:
        client = scope.get("client")
        return self.trusts(client[0] if client else None)


class RequestFacts:
    """Builds :class:`Facts` from an ASGI scope; forward-auth passes the original request's
    method and path, which it reads from the proxy's headers."""

    def __init__(self, trust: TrustPolicy) -> None:
        self.trust = trust

    def __call__(
        self,
        scope: Scope,
        method: str | None = None,
        path: str | None = None,
        headers: Headers | None = None,
        trusted: bool | None = None,
    ) -> Facts:
        """``trusted``: the caller has already asked the trust policy about this scope's peer."""
        if headers is None:
            headers = Headers(scope=scope)
        client = scope.get("client")
        peer = client[0] if client else None
        if trusted is None:
            trusted = self.trust.trusts(peer)
        raw_path = scope.get("raw_path")
        return Facts(
            method=method if method is not None else scope["method"],
            path=path if path is not None else (raw_path.decode("latin-1") if raw_path else scope["path"]),
            client=client_address(peer, headers.get("x-forwarded-for"), self.trust.networks) if trusted else peer,
            peer_trusted=trusted,
            headers=headers,
        )
