"""What frames a request for the upstream, and which request headers are the gateway's to
drop or set rather than the client's to pass on: the header sets and rules the forwarder
(gateway/proxy.py) and the WebSocket relay apply.

RFC 9112 §6.1 and §6.3 (message framing; request smuggling), RFC 9110 §7.6.1 (hop-by-hop
headers and ``Connection``).
"""

from __future__ import annotations

import re

from starlette.types import Scope

from gateway.errors import BadRequest

# RFC 9110 §7.6.1 (and RFC 2616 §13.5.1 for the older names still seen in the wild).
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
        # RFC 9113 §3.2.1: connection-specific, meaningful only with "Upgrade: h2c".
        b"http2-settings",
    }
)
# Set by the gateway from the body it sends (request_framing), never copied from the client.
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
# Headers that ask a framework to route to another path or method than the request line's
# (Symfony, Zend/Laminas, IIS URL Rewrite, Spring, Rails/Rack, Express method-override ...).
ROUTING_OVERRIDE_HEADERS = frozenset(
    {
        b"x-original-url",
        b"x-rewrite-url",
        b"x-forwarded-prefix",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
    }
)
# RFC 9110 §9.3: methods whose content has a meaning; a bodiless one says "Content-Length: 0"
# (RFC 9110 §8.6: a user agent SHOULD send it when the method defines a meaning for content).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# What an SSO proxy says about its user, which apps take as the truth (Grafana's auth proxy
# reads X-WEBAUTH-USER, apps behind oauth2-proxy X-Forwarded-User or X-Auth-Request-User):
# dropped from every client, trusted proxies too, since a front proxy relays a client's own
# copies unless told not to. The one user the app hears of is the gateway's, in
# upstream.user_header (set that to the header your app reads).
IDENTITY_HEADERS = frozenset(
    {
        b"x-forwarded-user",
        b"x-forwarded-email",
        b"x-forwarded-preferred-username",
        b"x-forwarded-groups",
        b"x-auth-request-user",
        b"x-auth-request-email",
        b"x-auth-request-preferred-username",
        b"x-auth-request-groups",
        b"x-remote-user",
        b"x-webauth-user",
    }
)
# What a front proxy says about the client's request (address, host, scheme, port, original
# target). The gateway tells the app itself: X-Forwarded-For (a trusted front's list, appended
# to), X-Forwarded-Host and -Proto (from the host and scheme it checked, gateway/hosts.py). Every
# other one is dropped from every client, trusted fronts too: a front relays a client's own
# copies unless told not to, and an app that builds links from ``Forwarded: host=evil`` or
# ``X-Forwarded-Port`` would use a host nobody checked.
FORWARDING_HEADERS = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"x-real-ip",
        b"x-forwarded-port",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"front-end-https",
        b"x-url-scheme",
        b"x-original-uri",
        b"x-forwarded-uri",
        b"x-forwarded-path",
        b"x-forwarded-method",
        b"x-original-method",
        b"x-original-host",
        b"x-host",
        # Read by one framework or another for the scheme (Tornado/Jupyter xheaders: X-Scheme;
        # gunicorn: X-Forwarded-Protocol; IIS ARR: X-Arr-Ssl) or the client's address (Rails:
        # Client-IP; CDNs: True-Client-IP, CF-Connecting-IP, Fastly-Client-IP ...).
        b"x-scheme",
        b"x-forwarded-protocol",
        b"x-original-proto",
        b"x-arr-ssl",
        b"x-forwarded-by",
        b"x-forwarded",
        b"forwarded-for",
        b"x-original-forwarded-for",
        b"client-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-cluster-client-ip",
        b"x-proxyuser-ip",
    }
)
_DIGITS = re.compile(rb"[0-9]{1,18}")


class AmbiguousFraming(BadRequest):
    """The client's Content-Length / Transfer-Encoding could be read two ways; refused."""


def request_framing(scope: Scope) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """How the body goes upstream: ``(framing headers, length)``, the length ``None`` for a
    chunked stream and 0 for no body. The one place that frames what the upstream receives.

    The ASGI server has already de-framed the client's body; it passes the client's framing
    headers on unchanged, and each server tolerates different ambiguities (httptools lets
    ``Transfer-Encoding: gzip, chunked`` through, h11 ``Transfer-Encoding`` next to
    ``Content-Length``). Anything but one plain framing raises ``AmbiguousFraming``: RFC 9112
    §6.3 says a server MAY treat these as errors; a proxy that re-frames them is how
    smuggling starts. So is a body after an upgrade request.
    """
    lengths: list[bytes] = []
    codings: list[bytes] = []
    upgrade = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
        elif name == b"upgrade":
            upgrade = True
    # An upgrade request (Upgrade, and "upgrade" in Connection) other than a WebSocket
    # handshake: uvicorn's httptools parser stops at its head, so a body after it is never
    # read, and the bytes are left for the connection to misread. Refused when it has a body.
    body = bool(codings) or any(value.strip(b"0") for value in lengths)
    if upgrade and body and b"upgrade" in connection_tokens(scope["headers"]):
        raise AmbiguousFraming
    if codings:
        # RFC 9112 §6.1: chunked must be the final coding; the gateway decodes no other, so
        # exactly one "chunked" (case-insensitive) and nothing else. HTTP/1.0 has no chunked:
        # "MUST treat the message as if the framing is faulty".
        if lengths or len(codings) > 1 or codings[0].strip().lower() != b"chunked":
            raise AmbiguousFraming
        if scope.get("http_version") == "1.0":
            raise AmbiguousFraming
        return [(b"transfer-encoding", b"chunked")], None
    if lengths:
        # RFC 9110 §8.6: 1*DIGIT. A list ("3, 3") or a repeated header is refused, as nginx does.
        if len(lengths) > 1 or not _DIGITS.fullmatch(lengths[0]):
            raise AmbiguousFraming
        length = int(lengths[0])
        if length:
            return [(b"content-length", str(length).encode())], length
    if scope["method"] in BODY_METHODS:
        return [(b"content-length", b"0")], 0
    return [], 0


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names listed in ``Connection``: hop-by-hop too (RFC 9110 §7.6.1)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)
