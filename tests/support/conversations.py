"""Raw HTTP/1.1 conversations for the differential tests, written by Hypothesis: methods,
targets with encodings, dot segments, ``#`` and ``;``, duplicate and look-alike identity
headers, ``Connection`` naming anything, every framing variant, ``Upgrade``. A ``Spec`` is one
request and what it claims (its identities and 2FA sessions); ``encode()`` is its bytes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st

USERS = ("alice", "bob")
SESSION_COOKIE = "gateway_session"
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: app\r\nRemote-User: alice\r\nX-2FA-Code: 000000\r\n\r\n"
# Framing variants: the body bytes on the wire and the framing headers, from the logical body.
AMBIGUOUS = frozenset({"both", "cl_differ", "cl_list", "cl_sign", "te_gzip", "te_twice"})
# Names that must never reach the upstream (compared with "_" and "." read as "-").
NEVER_UPSTREAM = frozenset(
    {
        "x-2fa-code",
        "upgrade",
        "http2-settings",
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-prefix",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "proxy-connection",
        "keep-alive",
        "te",
    }
)


@dataclass
class Spec:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str
    users: list[str] = field(default_factory=list)  # the identities sent (Remote-User, Basic ...)
    sessions: list[str] = field(default_factory=list)  # whose 2FA session cookie was sent

    def encode(self, host: str = "gw") -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in self.headers)]
        body = self.body
        chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
        wire = body
        match self.framing:
            case "none":
                pass
            case "cl":
                lines.append(f"Content-Length: {len(body)}")
            case "chunked":
                lines.append("Transfer-Encoding: chunked")
                wire = chunked
            case "both":
                lines += ["Transfer-Encoding: chunked", f"Content-Length: {len(body)}"]
                wire = chunked
            case "cl_differ":
                lines += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 1}"]
            case "cl_list":
                lines.append(f"Content-Length: {len(body)}, {len(body)}")
            case "cl_sign":
                lines.append(f"Content-Length: +{len(body)}")
            case "te_gzip":
                lines.append("Transfer-Encoding: gzip, chunked")
                wire = chunked
            case "te_twice":
                lines += ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"]
                wire = chunked
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + wire


SEGMENTS = [
    "x",
    "admin",
    "public",
    "..",
    ".",
    "%2e%2e",
    "%2E",
    ".%2e",
    "%2f",
    "%2F..",
    "%5c",
    "a;b",
    "..;",
    ";",
    "%3b",
    "#",
    "%23",
    "a#/../admin",
    "",
    "%c0%ae",
    "%ef%bc%8e%ef%bc%8e",
    "%41",
    "~u",
    "%00",
    "%252e",
    "%25",
]
PLAIN_TARGETS = ["/public/x", "/healthz", "/admin/users", "/api/public/y", "/echo?a=1", "/public/a?b=/admin"]
PREFIXES = ["/public", "/healthz", "/admin", "/api/public", "/Public", "/", "//public", "/public/..", ""]


@st.composite
def targets(draw: st.DrawFn) -> str:
    target = draw(st.sampled_from(PREFIXES))
    for segment in draw(st.lists(st.sampled_from(SEGMENTS), max_size=4)):
        target += "/" + segment
    if not target.startswith("/"):
        target = "/" + target
    if draw(st.booleans()):
        target += draw(st.sampled_from(["?a=1", "?x=/public", "?%2e%2e", "?#", "#frag", "?a=1#b"]))
    return draw(st.sampled_from([target, target, target, "http://gw" + target, "*"]))


CONNECTION_TOKENS = [
    "keep-alive",
    "close",
    "Content-Length",
    "transfer-encoding",
    "Host",
    "Remote-User",
    "cookie",
    "authorization",
    "X-2FA-Code",
    "upgrade",
    "HTTP2-Settings",
    "X-Forwarded-For",
    "x-forwarded-host",
    "te",
    "x-kept",
]
EXTRA_HEADERS = [
    ("X_2FA_Code", "000000"),
    ("X.2FA.Code", "000000"),
    ("X-Original-URL", "/admin"),
    ("X_Original_URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X.Method.Override", "DELETE"),
    ("Upgrade", "h2c"),
    ("Upgrade", "HTTP/2.0"),
    ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Authorization", "Basic eDp5"),
    ("X-Kept", "yes"),
    ("Remote_User", "alice"),
    ("Remote.User", "bob"),
]


@st.composite
def requests(
    draw: st.DrawFn,
    cookies: dict[str, str],
    identity: Callable[[str], tuple[str, str]] = lambda user: ("Remote-User", user),
    extra: Sequence[tuple[str, str]] = (),
) -> Spec:
    method = draw(st.sampled_from(["GET", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"]))
    headers: list[tuple[str, str]] = []
    # Half the requests prove one user (so most of them pass); the rest mix users and sessions.
    proven = draw(st.sampled_from(USERS)) if draw(st.booleans()) else None
    users = [proven] if proven else draw(st.lists(st.sampled_from([*USERS, "mallory"]), max_size=2))
    headers += [identity(u) for u in users]
    sessions = [proven] if proven else draw(st.lists(st.sampled_from(USERS), max_size=2))
    if bool(sessions) or draw(st.booleans()):
        jar = [f"{SESSION_COOKIE}={cookies[u]}" for u in sessions] + ["theme=dark"]
        headers.append(("Cookie", "; ".join(draw(st.permutations(jar)))))
    headers += draw(st.lists(st.sampled_from([*EXTRA_HEADERS, *extra]), max_size=4, unique=True))
    tokens = draw(st.lists(st.sampled_from(CONNECTION_TOKENS), max_size=4, unique=True))
    if tokens:
        headers.append(("Connection", ", ".join(tokens)))
    headers = draw(st.permutations(headers))
    body = draw(st.sampled_from([b"", b"", b"hello", SMUGGLED, SMUGGLED + SMUGGLED]))
    variants = ["cl", "chunked"] * 8 + sorted(AMBIGUOUS) + (["none"] * 8 if not body else [])
    framing = draw(st.sampled_from(variants))
    target = draw(st.one_of(st.sampled_from(PLAIN_TARGETS), targets()))
    return Spec(method, target, list(headers), body, framing, users, sessions)


def same_name(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def excluded(method: str, path: str) -> bool:
    """The module's exclusions (tests/support/servers.make_config), written independently."""
    return (
        path.startswith("/public/")
        or path == "/healthz"
        or (method in ("GET", "HEAD") and path.startswith("/api/public/"))
    )
