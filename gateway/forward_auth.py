"""Forward-auth mode: ``GET /auth`` answers nginx ``auth_request``, Caddy ``forward_auth`` and
Traefik ``forwardAuth`` with the same decision as proxy mode.

The original request is described by headers, believed only from ``server.trusted_proxies``
(from anyone else the endpoint denies: it must not become a way to probe paths or spoof
them):

* nginx: ``X-Original-URI`` (``$request_uri``: raw path and query) or ``X-Original-URL``
  (a full URL), and ``X-Original-Method``;
* Traefik and Caddy: ``X-Forwarded-Uri``, ``X-Forwarded-Method``, ``X-Forwarded-Host``,
  ``X-Forwarded-Proto``, ``X-Forwarded-For``.

Answers: 200 allow (with ``Remote-User`` for the proxy to copy upstream); 401 when the user
or the code is missing or wrong, with ``Location`` pointing at the verify (or setup) page;
403 when the user may not pass (not enrolled, locked out, an ambiguous path); 503 when the
store is down. Never a 3xx: nginx turns those into a 500.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from gateway.decision import Decision
from gateway.errors import DENIALS, FORWARD_AUTH_STATUS, Reason
from gateway.paths import encode_path
from gateway.responses import denial_body, send_response, wants_html

if TYPE_CHECKING:
    from gateway.app import Gateway

_URI_HEADERS = ("x-original-uri", "x-forwarded-uri", "x-original-url")
_METHOD_HEADERS = ("x-original-method", "x-forwarded-method")
_LOCATION_REASONS = frozenset({Reason.CODE_REQUIRED, Reason.INVALID_CODE, Reason.REPLAYED_CODE, Reason.NOT_ENROLLED})


def split_target(target: str) -> tuple[str, str]:
    """``(path, query)`` of a request target or absolute URL; a fragment is dropped."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        query_mark = rest.find("?")
        if slash == -1 or (query_mark != -1 and query_mark < slash):
            target = "/" + (rest[query_mark:] if query_mark != -1 else "")
        else:
            target = rest[slash:]
    target = target.split("#", 1)[0]
    path, _, query = target.partition("?")
    return path, query


class ForwardAuth:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.user_header = gateway.config.upstream.user_header.lower().encode()
        self.public_url = gateway.config.server.public_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        headers = Headers(scope=scope)
        client = scope.get("client")
        peer = client[0] if client else None
        if not gw.peer_trusted(peer):
            await self._deny(send, Decision(Reason.UNTRUSTED_PEER), headers, "")
            return
        target = next((headers[h] for h in _URI_HEADERS if h in headers), None)
        method = next((headers[h] for h in _METHOD_HEADERS if h in headers), None) or scope["method"]
        if target is None:
            await self._deny(send, Decision(Reason.BAD_REQUEST), headers, "")
            return
        path, query = split_target(target)
        facts, _ = gw.facts(scope, method=method.upper(), path=path)
        decision = await gw.decider.decide(facts)
        if decision.allowed:
            out: list[tuple[bytes, bytes]] = [(b"cache-control", b"no-store")]
            if decision.user is not None and decision.reason is not Reason.EXCLUDED:
                out.append((self.user_header, decision.user.encode()))
            if decision.new_session:
                out.append(gw.session_cookie(decision.new_session))
            await send_response(send, 200, out, b"")
            return
        await self._deny(send, decision, headers, path + ("?" + query if query else ""))

    def _origin(self, headers: Headers) -> str:
        if self.public_url:
            return self.public_url
        host = headers.get("x-forwarded-host") or headers.get("host")
        proto = headers.get("x-forwarded-proto") or "http"
        if not host or proto not in ("http", "https") or any(c in host for c in "/\\@ \t"):
            return ""
        return f"{proto}://{host}"

    async def _deny(self, send: Send, decision: Decision, headers: Headers, target: str) -> None:
        reason = decision.reason
        status = FORWARD_AUTH_STATUS.get(reason, DENIALS[reason][0])
        _, base, body = denial_body(reason, wants_html(headers.get("accept")))
        out = list(base)
        if decision.retry_after is not None:
            out.append((b"retry-after", str(decision.retry_after).encode()))
        if reason in _LOCATION_REASONS and decision.path is not None:
            local = encode_path(decision.path) + (target[target.find("?"):] if "?" in target else "")
            location = self._origin(headers) + self.gateway.login_location(reason, local)
            out.append((b"location", location.encode()))
        await send_response(send, status, out, body)

