"""Forward-auth mode: ``GET /auth`` answers nginx ``auth_request``, Caddy ``forward_auth`` and
Traefik ``forwardAuth`` with the same decision as proxy mode.

The original request is described by headers, believed only from ``server.trusted_proxies``
(from anyone else the endpoint denies: it must not become a way to probe paths or spoof
them):

* nginx: ``X-Original-URI`` (``$request_uri``: raw path and query) or ``X-Original-URL``
  (a full URL), and ``X-Original-Method`` (send it: nginx's subrequest is always a GET, so
  without it the original method is unknown and method-qualified exclusions never match);
* Traefik and Caddy: ``X-Forwarded-Uri``, ``X-Forwarded-Method``, ``X-Forwarded-Host``,
  ``X-Forwarded-Proto``, ``X-Forwarded-For``.

A raw ``#`` in any of them is refused with 400: a fragment is never part of a request-target
(RFC 9110 §7.1, RFC 9112 §3.2), yet nginx relays ``/healthz#/../admin`` as it came, in
``$request_uri`` and to the app, which may resolve the dot segments after the ``#``.

When a proxy sends more than one of these headers, they must agree: Caddy and Traefik pass
the client's own headers to ``/auth``, so a client could add an ``X-Original-URI`` of an
excluded path next to the ``X-Forwarded-Uri`` Caddy sets. A disagreement is denied.

Answers: 200 allow (with ``Remote-User`` for the proxy to copy upstream); 401 when the user
or the code is missing or wrong; 403 when the user may not pass (not enrolled, locked out,
an ambiguous path); 503 when the store is down. A denial's JSON body is also sent in the
``X-Gateway-Denial`` header, since nginx's ``auth_request`` drops the body. Never a 3xx: nginx turns those into a 500.
A denial of a browser navigation (original ``GET``/``HEAD`` asking for ``text/html``) that
the user can fix on the gateway's pages carries a ``Location`` to the verify (or setup) page,
for the proxy to redirect to, as proxy mode would; an API client gets no ``Location``.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from gateway.decision import Decision, Facts
from gateway.errors import DENIALS, FORWARD_AUTH_STATUS, Reason
from gateway.hosts import HostPolicy, MalformedHost, addressed
from gateway.http import request_origin, wants_html
from gateway.paths import encode_path
from gateway.redirects import LoginRedirects
from gateway.request_facts import RequestFacts
from gateway.responses import denial_body, send_response
from gateway.session_cookie import SessionCookie

Decide = Callable[[Facts], Awaitable[Decision]]

_URI_HEADERS = frozenset({b"x-original-uri", b"x-forwarded-uri", b"x-original-url"})
_METHOD_HEADERS = frozenset({b"x-original-method", b"x-forwarded-method"})
_UNKNOWN_METHOD = "X-UNKNOWN-METHOD"  # a valid token that no method-qualified exclusion names


def split_target(target: str) -> tuple[str, str]:
    """``(path, query)`` of a request target or absolute URL (the caller refuses a ``#``)."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        query_mark = rest.find("?")
        if slash == -1 or (query_mark != -1 and query_mark < slash):
            target = "/" + (rest[query_mark:] if query_mark != -1 else "")
        else:
            target = rest[slash:]
    path, _, query = target.partition("?")
    return path, query


class ForwardAuth:
    """``/auth``, raw ASGI: it runs on every request the front proxy sees. ``decide`` is the
    one decision, counted as mode "auth"."""

    def __init__(
        self,
        facts: RequestFacts,
        decide: Decide,
        cookie: SessionCookie,
        redirects: LoginRedirects,
        user_header: str,
        public_url: str | None,
        hosts: HostPolicy,
    ) -> None:
        self.facts = facts
        self.decide = decide
        self.cookie = cookie
        self.redirects = redirects
        self.user_header = user_header.lower().encode()
        self.public_url = public_url
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        if not self.facts.trust.trusts_scope(scope):
            await self._deny(send, Decision(Reason.UNTRUSTED_PEER), headers, "")
            return
        if not self.hosts.open:
            # The host the client named (the front's X-Forwarded-Host, else Host) is held to
            # server.public_url and allowed_hosts here too: a front that relays any Host would
            # otherwise pass "Host: evil" to the app, which builds its links from it.
            try:
                where = addressed(scope["headers"], "http", trusted=True)
            except MalformedHost:
                await self._deny(send, Decision(Reason.MALFORMED_REQUEST), headers, "")
                return
            if where.host is None or not self.hosts.allows(where.host, where.scheme):
                await self._deny(send, Decision(Reason.MISDIRECTED), headers, "")
                return
        targets: set[tuple[str, str]] = set()
        methods: set[str] = set()
        for name, value in scope["headers"]:  # one pass: this runs on every request nginx sees
            if name in _URI_HEADERS:
                if b"#" in value:
                    await self._deny(send, Decision(Reason.MALFORMED_REQUEST), headers, "")
                    return
                targets.add(split_target(value.decode("latin-1")))
            elif name in _METHOD_HEADERS:
                methods.add(value.decode("latin-1"))
        # One original request, described once or consistently: never pick one of two stories.
        if len(targets) != 1 or len(methods) > 1:
            await self._deny(send, Decision(Reason.BAD_REQUEST), headers, "")
            return
        [(path, query)] = targets
        # Without a method header the original method is unknown: nginx's auth subrequest is a
        # GET whatever the client sent, so guessing from it would let a POST pass a "GET /x"
        # exclusion. Unknown matches only the rules for every method.
        method = methods.pop() if methods else _UNKNOWN_METHOD
        facts = self.facts(scope, method=method, path=path, headers=headers, trusted=True)
        decision = await self.decide(facts)
        if decision.allowed:
            out: list[tuple[bytes, bytes]] = [(b"cache-control", b"no-store")]
            if decision.forwarded_user is not None:
                out.append((self.user_header, decision.forwarded_user.encode()))
            if decision.new_session:
                out.append(self.cookie.set(decision.new_session))
            await send_response(send, 200, out, b"")
            return
        await self._deny(send, decision, headers, path + ("?" + query if query else ""), method)

    def _origin(self, headers: Headers) -> str:
        # The peer is a trusted proxy (checked first), so its X-Forwarded-* count; nginx talks
        # to /auth over plain HTTP, hence the default scheme.
        # A host outside the policy never gets here (refused first, in __call__).
        return self.public_url or request_origin(headers.raw, "http", trusted=True)

    async def _deny(self, send: Send, decision: Decision, headers: Headers, target: str, method: str = "") -> None:
        reason = decision.reason
        status = FORWARD_AUTH_STATUS.get(reason, DENIALS[reason][0])
        browser = wants_html(headers.get("accept"))
        location = None
        # As proxy mode does: only a browser navigation is sent to a page; a program gets the
        # status (and nginx's error_page, Caddy's handle_response redirect only on a Location).
        if browser and method in ("GET", "HEAD") and decision.path is not None:
            local = encode_path(decision.path) + (target[target.find("?") :] if "?" in target else "")
            page = self.redirects.location(reason, local)
            if page is not None:
                location = page if page.startswith(("http://", "https://")) else self._origin(headers) + page
        # Traefik shows the denial itself (a browser does not follow a 401's Location): link it.
        extra = f'<p><a href="{html.escape(location)}">Continue</a></p>' if location else ""
        fields = {"setup": self.redirects.setup_route} if reason is Reason.NOT_ENROLLED else {}
        _, base, body = denial_body(reason, browser, extra, **fields)
        out = list(base)
        # nginx's auth_request drops this answer's body: the JSON rides in a header too (one
        # line of ASCII: json.dumps escapes the rest), for the example's error_page to hand it
        # to the client as the answer (config/nginx/auth_request.conf).
        json_body = denial_body(reason, False, **fields)[2] if browser else body
        out.append((b"x-gateway-denial", json_body))
        if decision.retry_after is not None:
            out.append((b"retry-after", str(decision.retry_after).encode()))
        if location is not None:
            out.append((b"location", location.encode()))
        await send_response(send, status, out, body)
