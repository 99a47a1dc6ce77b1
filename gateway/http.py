"""HTTP rules the gateway reads in more than one place, written once: what a token is,
which media type a client prefers, what a host[:port] is, and the origin a client addressed.

Pure functions with no gateway imports, so the lowest layers (``paths``, ``tables``) can use
them without pointing upward.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable

# RFC 9110 §5.6.2: token = 1*tchar. Methods (§9.1), field names (§5.1) and cookie names
# (RFC 6265 §4.1.1) are tokens.
TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# RFC 3986 §3.2.2 reg-name, restricted to unreserved (§2.3); at most 253 characters (RFC 1035
# §2.3.4 for a DNS name, with its dots), so a Host cannot be made a memory or log amplifier.
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~]{1,253}")
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_PORT = re.compile(r"[0-9]{1,5}")
_ORIGIN_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}

_JSON = "application/json"
_HTML = "text/html"
_MAX_RANGES = 32  # an Accept with more is not a browser's, and parsing it costs
# Denials are answered under attack and should cost about what a substring test did: browsers
# and programs send a handful of distinct Accept values, so the answers to short ones are
# kept (at most 64 x 256 bytes); a longer one is parsed every time.
_CACHED_ACCEPT = 256


def is_token(value: str) -> bool:
    """``value`` is an RFC 9110 token: one or more ``tchar``."""
    return bool(value) and all(c in TCHARS for c in value)


def negotiate(accept: str | None, offers: tuple[str, ...]) -> str:
    """The offer the client prefers (RFC 9110 §12.5.1: most specific range, then ``q``); the
    first offer when there is no ``Accept``, on a tie, or when nothing matches."""
    if not accept:
        return offers[0]
    ranges: list[tuple[str, float]] = []
    for item in accept.split(",")[:_MAX_RANGES]:
        media, *params = item.split(";")
        q = 1.0
        for param in params:
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = q if 0.0 <= q <= 1.0 else 0.0  # also drops nan
        ranges.append((media.strip().lower(), q))
    best, best_q = offers[0], 0.0
    for offer in offers:
        kind = offer.split("/")[0]
        specific = [
            (3 if m == offer else 2 if m == f"{kind}/*" else 1, q)
            for m, q in ranges
            if m in (offer, f"{kind}/*", "*/*")
        ]
        q = max(specific)[1] if specific else 0.0
        if q > best_q:
            best, best_q = offer, q
    return best


def wants_html(accept: str | None) -> bool:
    """The client prefers an HTML page to JSON (RFC 9110 §12.5.1, by ``q``). JSON wins a tie,
    so ``*/*`` and a missing ``Accept`` (programs) get JSON; ``text/html;q=0`` is a refusal."""
    if not accept:
        return False
    if len(accept) <= _CACHED_ACCEPT:
        return _prefers_html(accept)
    return negotiate(accept, (_JSON, _HTML)) == _HTML


@functools.lru_cache(maxsize=64)
def _prefers_html(accept: str) -> bool:
    return negotiate(accept, (_JSON, _HTML)) == _HTML


def request_origin(headers: Iterable[tuple[bytes, bytes]], scheme: str, trusted: bool) -> str:
    """``scheme://host`` as the client addressed this request, for an absolute ``Location``;
    ``""`` when that cannot be told safely (the caller then writes a relative one).

    ``headers`` are the raw ASGI headers and ``scheme`` the ASGI scope's. The host is ``Host``
    (RFC 9110 §7.2). Only from a ``trusted`` peer, ``X-Forwarded-Host`` and ``X-Forwarded-Proto``
    take its place: a proxy that tells either twice, differently, tells two stories and neither
    is picked. The scheme must be http or https and the host must not hold a character that
    would move the URL's authority or path (``/\\@?#,``, space, tab).
    """
    host = forwarded_host = proto = None
    for name, value in headers:
        if name == b"host":
            host = value if host is None else host
        elif trusted and name == b"x-forwarded-host":
            if forwarded_host not in (None, value):
                return ""
            forwarded_host = value
        elif trusted and name == b"x-forwarded-proto":
            if proto not in (None, value):
                return ""
            proto = value
    chosen = (forwarded_host or host or b"").decode("latin-1")
    origin_scheme = proto.decode("latin-1") if proto else _ORIGIN_SCHEMES.get(scheme, "")
    if origin_scheme not in ("http", "https") or split_host(chosen) is None:
        return ""
    return f"{origin_scheme}://{chosen}"


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of an RFC 3986 ``host [":" port]``, the host lower-cased (RFC 3986
    §3.2.2: case-insensitive) and an IPv6 address in its brackets, in RFC 5952 form; None when ``value`` is
    anything else (a port of 0 or past 65535, an empty port, userinfo, a path, spaces ...)."""
    port: str | None
    if value.startswith("["):
        inside, close, rest = value[1:].partition("]")
        if not close or "%" in inside:  # RFC 6874 zone ids are not for Host
            return None
        try:
            address = ipaddress.IPv6Address(inside)
        except ValueError:
            return None
        if rest and not rest.startswith(":"):
            return None
        # RFC 5952 §4: one text form per address ("[0::1]" is "[::1]").
        host, port = f"[{address.compressed}]", rest[1:] if rest else None
    else:
        host, colon, after = value.partition(":")
        port = after if colon else None
        if _IPV4.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return None
        elif not _REG_NAME.fullmatch(host) or host.strip(".") == "":
            return None
        host = host.lower()
    if port is None:
        return host, None
    if not _PORT.fullmatch(port) or not 0 < int(port) <= 65535:
        return None
    return host, int(port)
