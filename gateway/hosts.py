"""Which host a request addressed, and whether the gateway answers for it.

Threat model. In proxy mode the app behind the gateway sees the client's ``Host`` (the default,
``upstream.pass_host``: what Caddy, Traefik's ``passHostHeader`` and oauth2-proxy's
``pass_host_header`` do), because apps that compare ``Origin`` with ``Host`` (Jupyter, Django's
CSRF check) refuse browsers otherwise. An app also builds absolute links, password-reset mails
and redirects from ``Host``; a client that names another site there (Host header injection)
would make the app write links to it. So:

* a ``Host`` is taken only when it is exactly one valid RFC 3986 ``host [":" port]`` (RFC 9112
  §3.2: a request with none on HTTP/1.1, or with several, or with an invalid one, MUST be
  answered 400); the reg-name is held to the unreserved characters (RFC 3986 §2.3), stricter
  than the RFC's sub-delims and percent escapes, which no browser sends and which would split a
  ``Forwarded`` list (``,`` ``;``) or be decoded twice (``%``);
* when ``server.public_url`` or ``server.allowed_hosts`` is set, a host outside them is refused
  with 421 Misdirected Request (RFC 9110 §15.5.20: "not able to produce a response for the
  combination of scheme and authority"), never forwarded, never rewritten;
* from a trusted front proxy, the ``X-Forwarded-Host`` it sets is the host the client addressed
  (the front may have rewritten ``Host``), and it is held to the same rules.

The policy is built from config once (``HostPolicy.from_config``) and applied by the dispatch in
``app.py`` and again by the forwarder itself (``proxy.py``, ``websocket.py``), so no code path
sends the upstream a host outside it.

The other direction: an app that knows its own address (``upstream.url``) writes it into
``Location``, ``Content-Location`` and ``Refresh``; ``rewrite_origin`` turns exactly that origin
into the public one and leaves every other value as the app sent it, so a hostile value
(``http://up@evil/``, ``//evil``, a backslash) is never made into something else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.config import Config
from gateway.errors import BadRequest
from gateway.http import split_host

# RFC 9110 §4.2.1-4.2.2: the port a URI of this scheme implies when it names none.
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class MalformedHost(BadRequest):
    """``Host`` (or a trusted ``X-Forwarded-Host``) is missing, repeated or not a host[:port]."""


class MisdirectedHost(BadRequest):
    """The request names a host the gateway does not answer for (421)."""


@dataclass(frozen=True)
class Addressed:
    """The host a client addressed, validated and in its normal form (``host[:port]``, lower
    case, the port as a number), and the scheme it used.
    ``host`` is None only for an HTTP/1.0 request without ``Host`` (RFC 9112 §3.2 allows it)."""

    host: str | None
    scheme: str


def addressed(
    headers: Iterable[tuple[bytes, bytes]], scheme: str, trusted: bool, http_version: str = "1.1"
) -> Addressed:
    """Which host and scheme the request addressed: ``Host`` (RFC 9110 §7.2), or from a
    ``trusted`` front proxy its ``X-Forwarded-Host`` and ``X-Forwarded-Proto``. Raises
    ``MalformedHost`` for a missing (HTTP/1.1), repeated or invalid host; a front that tells a
    header twice tells two stories and is refused too."""
    hosts: list[bytes] = []
    forwarded: list[bytes] = []
    protos: list[bytes] = []
    for name, value in headers:
        if name == b"host":
            hosts.append(value)
        elif trusted and name == b"x-forwarded-host":
            forwarded.append(value)
        elif trusted and name == b"x-forwarded-proto":
            protos.append(value)
    if len(hosts) > 1 or len(forwarded) > 1 or len(set(protos)) > 1:
        raise MalformedHost
    if not hosts and http_version not in ("1.0", "0.9"):
        raise MalformedHost
    chosen = forwarded[0] if forwarded else hosts[0] if hosts else None
    origin_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    if protos:
        proto = protos[0].decode("latin-1").strip().lower()
        if proto not in ("http", "https"):
            raise MalformedHost
        origin_scheme = proto
    if chosen is None:
        return Addressed(None, origin_scheme)
    parsed = split_host(chosen.decode("latin-1"))
    if parsed is None:
        raise MalformedHost
    # The host as checked is the host passed on, in one spelling (RFC 3986 §6.2.2: lower case;
    # the port as a number, RFC 5952 for IPv6), so the app compares and writes links with what
    # the policy judged, not "App:0443". A port given stays given: the policy judged it.
    host, port = parsed
    return Addressed(host if port is None else f"{host}:{port}", origin_scheme)


def target_agrees_with_host(target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """An absolute-form request-target (``http://host/path``) names the same authority as the
    one ``Host`` (RFC 9112 §3.2.2: a server MUST use the target's and ignore ``Host``; a proxy
    MUST make ``Host`` the target's). The ASGI server keeps only the path, so every check after
    it goes by ``Host``: a target that says otherwise, or holds userinfo, does not agree."""
    try:
        url = urlsplit(target.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    if url.scheme.lower() not in ("http", "https") or "@" in url.netloc:
        return False
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) != 1:
        return False
    named, sent = split_host(url.netloc), split_host(hosts[0].decode("latin-1"))
    if named is None or sent is None:
        return False
    default = DEFAULT_PORTS[url.scheme.lower()]
    return named[0] == sent[0] and (named[1] or default) == (sent[1] or default)


class HostPolicy:
    """The hosts the gateway answers for: ``server.public_url``'s and ``server.allowed_hosts``
    (host or host:port, compared case-insensitively; the scheme's default port may be given or
    left out). With neither set, every valid host is allowed (``check-config`` warns)."""

    def __init__(self, public_url: str | None = None, allowed_hosts: Iterable[str] = ()) -> None:
        # (host, port or None for "the default port of the request's scheme")
        self._allowed: set[tuple[str, int | None]] = set()
        if public_url:
            url = urlsplit(public_url)
            parsed = split_host(url.netloc.rpartition("@")[2])
            if parsed is not None:
                host, port = parsed
                default = DEFAULT_PORTS.get(url.scheme)
                self._allowed.add((host, port))
                if port is None and default is not None:
                    self._allowed.add((host, default))
                elif port == default:
                    self._allowed.add((host, None))
        self._named: set[tuple[str, int | None]] = set()
        for entry in allowed_hosts:
            parsed = split_host(entry)
            if parsed is not None:
                self._named.add(parsed)
        self.open = not public_url and not self._named

    @classmethod
    def from_config(cls, config: Config) -> HostPolicy:
        return cls(config.server.public_url, config.server.allowed_hosts)

    def allows(self, host: str | None, scheme: str = "http") -> bool:
        """``host`` (as received: host or host:port) is one the gateway answers for on
        ``scheme``. A missing host (HTTP/1.0) is allowed: the public host is sent for it."""
        if self.open or host is None:
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        if (name, port) in self._allowed:
            return True
        default = DEFAULT_PORTS.get(scheme)
        if port is None:
            return (name, None) in self._named or (name, default) in self._named
        return (name, port) in self._named or (port == default and (name, None) in self._named)


# -- absolute URLs in answers ---------------------------------------------------------------

# HTML Living Standard, "shared declarative refresh steps": a number, then ";" or ",", then an
# optional "url=" and the URL, optionally quoted.
_REFRESH = re.compile(rb"(\s*[0-9.]+\s*[;,]\s*(?:url\s*=\s*)?[\"']?)(.*?)([\"']?\s*)", re.IGNORECASE | re.DOTALL)


def origin_spellings(scheme: str, raw_host: bytes, port: int | None) -> tuple[bytes, ...]:
    """``scheme://host[:port]`` of a URL, lower-cased, with and without its scheme's default
    port: an app may write either (RFC 9110 §4.2.3 makes them equivalent). Longest first."""
    scheme = scheme.lower()
    host = raw_host.decode("ascii").lower()
    if ":" in host:
        host = f"[{host}]"
    port = port or DEFAULT_PORTS.get(scheme)
    spellings = {f"{scheme}://{host}:{port}"}
    if port == DEFAULT_PORTS.get(scheme):
        spellings.add(f"{scheme}://{host}")
    return tuple(sorted((s.encode("ascii") for s in spellings), key=len, reverse=True))


def rewrite_origin(value: bytes, origins: tuple[bytes, ...], public: bytes) -> bytes:
    """``value`` with a leading upstream origin (one of ``origins``, compared case-insensitively)
    replaced by ``public`` (``b""``: a relative reference). The origin must end where the URL's
    authority ends (RFC 3986 §3.2: at "/", "?", "#" or the end), so ``http://up@evil/``,
    ``http://up.evil/``, ``http://up:80\\evil`` and ``//up/`` are left as they are, never
    made to point somewhere else by the gateway."""
    head = value[: max(len(o) for o in origins) + 1].lower()
    for origin in origins:
        if head.startswith(origin):
            rest = value[len(origin) :]
            if rest[:1] in (b"", b"/", b"?", b"#"):
                # Made relative, "http://up//evil/" would be "//evil/" (another host, RFC 3986
                # §4.2), and so would "/\\evil" or "/<TAB>/evil" in a browser (WHATWG URL drops
                # tabs and newlines, reads "\\" as "/"): such a value stays as the app sent it.
                if not public and rest.translate(None, b"\t\n\r")[:2] in (b"//", b"/\\"):
                    return value
                return public + rest or b"/"
            return value
    return value


def rewrite_refresh(value: bytes, origins: tuple[bytes, ...], public: bytes) -> bytes:
    """A ``Refresh`` value (``5; url=http://up/x``) with its URL rewritten by ``rewrite_origin``;
    one without a URL (``5``) or of another shape is left as it is."""
    match = _REFRESH.fullmatch(value)
    if match is None or not match.group(2):
        return value
    return match.group(1) + rewrite_origin(match.group(2), origins, public) + match.group(3)
