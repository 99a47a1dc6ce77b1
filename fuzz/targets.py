"""The fuzz targets: each takes the fuzzer's bytes, drives one of the gateway's parsers, and
checks what must hold of its answer. A target raises ``AssertionError`` when an invariant
breaks; any exception that is not one of the gateway's own (``GatewayError``, ``BadInput``) is
a crash too. ``tests/test_fuzz_cases.py`` replays the seed corpus and every saved crash input
through these same functions, without atheris.

Inputs are split into fields on ``\\n`` (``_fields``), so a seed file is readable: one header
value, path or body per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import jwt
from cryptography.fernet import Fernet
from jwt import api_jws as jws
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Message, Scope

from gateway import config as config_module
from gateway.decision import Decider, Decision, Facts, client_address, is_trusted
from gateway.errors import AmbiguousPath, GatewayError, Reason
from gateway.factors import Refused, SecondFactor
from gateway.forward_auth import ForwardAuth, split_target
from gateway.hosts import HostPolicy, addressed
from gateway.http import is_token, negotiate, request_origin, split_host, wants_html
from gateway.identity import Identity, IdentityReader, cookie_values, read_one_cookie, valid_user, without_cookie
from gateway.inputs import _FIELDS, _MAX_FIELD, BadInput, read_fields, read_query, safe_target
from gateway.paths import Exclusions, _canonicalise, canonical_path, encode_path, parse_rule
from gateway.redirects import LoginRedirects
from gateway.request_facts import RequestFacts, TrustPolicy
from gateway.session_cookie import SessionCookie
from gateway.totp import parse_code

Target = Callable[[bytes], None]

EXCLUDE = ("/public/*", "/healthz", "GET /api/public/*", "POST /hook", "/")
_RULES = tuple(parse_rule(text) for text in EXCLUDE)
_EXCLUSIONS = Exclusions(_RULES)
_METHODS = ("GET", "HEAD", "POST", "PUT", "get", "X-UNKNOWN-METHOD")
_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))
_OFFERS = ("application/json", "text/html")

JWT_SECRET = "fuzz-secret-0123456789-0123456789-0123456789"  # noqa: S105 - a fixed key: only tokens made with it verify
JWT_COOKIE = "jwt"


def _fields(data: bytes, n: int) -> list[str]:
    """``n`` fields of ``data`` split on newlines, read as Latin-1 (how ASGI hands over header
    values and raw paths); missing fields are empty."""
    parts = data.decode("latin-1").split("\n", n - 1)
    return parts + [""] * (n - len(parts))


def rfc3986_reading(raw: str, merge_slashes: bool) -> str:
    """How a textbook server reads a wire path: the query cut off (RFC 3986 §3.4), decoded once
    as UTF-8 (§2.1), runs of ``/`` merged or not (nginx ``merge_slashes``; most upstreams do
    not), dot segments removed (§5.2.4). The oracle the gateway's canonical form is held to."""
    path = unquote_to_bytes(raw.partition("?")[0]).decode("utf-8")
    segments = path.split("/")[1:]
    if merge_slashes:
        segments = [s for s in segments if s]
        if segments and path.endswith("/"):
            segments.append("")
    out: list[str] = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment in (".", ".."):
            if segment == ".." and out:
                out.pop()
            if last:
                out.append("")  # "/a/b/.." is "/a/": the path still names a directory
        else:
            out.append(segment)
    return "/" + "/".join(out)


# -- paths ------------------------------------------------------------------------------------------


def fuzz_paths(data: bytes) -> None:
    """The canonicaliser and the exclusion match: a path it accepts is canonical (no ``//``, no
    dot segment, a fixed point through ``encode_path``), the fast path agrees with the slow one,
    the upstream reads exactly what was checked, and the raw and canonical forms get the same
    exclusion decision."""
    raw = data.decode("latin-1")
    try:
        path: str | None = canonical_path(raw)
    except AmbiguousPath:
        path = None
    try:
        slow: str | None = _canonicalise(raw)
    except AmbiguousPath:
        slow = None
    assert path == slow, "the fast path and the slow path disagree"
    if path is None:
        return
    assert path.startswith("/"), "not absolute"
    assert "//" not in path, "an empty segment survived"
    assert all(segment not in (".", "..") for segment in path.split("/")), "a dot segment survived"
    wire = encode_path(path)
    assert wire.isascii(), "encode_path left non-ASCII"
    assert canonical_path(wire) == path, "canonical_path(encode_path(p)) != p"
    assert rfc3986_reading(raw, merge_slashes=True) == path, "the canonical form is not the textbook reading"
    assert rfc3986_reading(wire, merge_slashes=False) == path, "the upstream would read another path than was checked"
    for method in _METHODS:
        decision = _EXCLUSIONS.matches(method, path)
        assert _EXCLUSIONS.matches(method, canonical_path(wire)) == decision, "raw and canonical disagree"


# -- headers ----------------------------------------------------------------------------------------


def fuzz_headers(data: bytes) -> None:
    """The header readers: content negotiation, tokens, Host, the origin a client addressed,
    X-Forwarded-For, the trusted user header and the code header. Only the gateway's own
    errors may come out, and each answer must be one of the forms it promises."""
    accept, host, forwarded_host, proto, xff, peer, user, code = _fields(data, 8)
    best = negotiate(accept, _OFFERS)
    assert best in _OFFERS
    assert wants_html(accept) == (bool(accept) and best == "text/html")
    assert is_token(accept) == (
        accept != "" and all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~") for c in accept)
    )

    split = split_host(host)
    if split is not None:
        name, port = split
        assert name == name.lower()
        assert port is None or 0 < port <= 65535
        again = split_host(name if port is None else f"{name}:{port}")
        assert again == split, "split_host is not a fixed point"

    raw_headers = [(b"host", host.encode("latin-1"))]
    if forwarded_host:
        raw_headers.append((b"x-forwarded-host", forwarded_host.encode("latin-1")))
    if proto:
        raw_headers.append((b"x-forwarded-proto", proto.encode("latin-1")))
    for trusted in (False, True):
        origin = request_origin(raw_headers, "http", trusted)
        if origin:
            scheme, _, rest = origin.partition("://")
            assert scheme in ("http", "https")
            assert split_host(rest) is not None
        try:
            where = addressed(raw_headers, "http", trusted=trusted)
        except GatewayError:
            pass
        else:
            assert where.host is None or split_host(where.host) is not None, "addressed() let a malformed host through"

    client = client_address(peer, xff, _NETWORKS)
    if client != peer:
        assert client is not None and client in [hop.strip() for hop in xff.split(",")]
        ipaddress.ip_address(client)

    headers = Headers(raw=[(b"remote-user", user.encode("latin-1")), (b"x-2fa-code", code.encode("latin-1"))])
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "raw_path": b"/",
        "headers": [(b"x-forwarded-for", xff.encode("latin-1")), *headers.raw],
        "client": (peer, 1234),
    }
    facts = RequestFacts(TrustPolicy(_NETWORKS))(scope)
    assert facts.peer_trusted == is_trusted(peer, _NETWORKS)
    assert facts.client == (client if facts.peer_trusted else peer), "an untrusted peer chose its address"
    reader = IdentityReader(_config().identity)
    for trusted in (False, True):
        found = reader.read(headers, trusted)
        if isinstance(found, Identity):
            assert trusted and valid_user(found.user)
    for digits in (6, 8):
        parsed = parse_code(code, digits)
        assert parsed is None or (len(parsed) == digits and parsed.isascii() and parsed.isdigit())


# -- x_original_uri ---------------------------------------------------------------------------------


class _NoSecondFactor:
    """Enough of SecondFactor for the decision to run: no session, everyone enrolled, every
    code wrong (forward-auth's parsing is what is fuzzed, not TOTP)."""

    async def session_user(self, session_id: str) -> str | None:
        return None

    async def is_enrolled(self, user: str) -> bool:
        return True

    async def check_code(self, user: str, raw_code: str | None, client: str | None) -> Refused:
        return Refused(Reason.INVALID_CODE)


_CONFIG: list[config_module.Config] = []


def _fresh_keys() -> dict[str, str]:
    return {
        config_module.ENV_KEYS: Fernet.generate_key().decode(),
        config_module.ENV_PEPPER: Fernet.generate_key().decode(),
    }


def _config() -> config_module.Config:
    """Forward-auth's config: loopback is the front proxy; the store is never opened."""
    if not _CONFIG:
        env = _fresh_keys()
        data = {
            "server": {"trusted_proxies": ["127.0.0.0/8"]},
            "store": {"url": "sqlite:///unused.db"},
            "paths": {"exclude": list(EXCLUDE[:-1])},
        }
        _CONFIG.append(config_module.parse(data, env=env, source="fuzz"))
    return _CONFIG[0]


_LOOP: list[asyncio.AbstractEventLoop] = []


def _run(coroutine: Any) -> Any:
    if not _LOOP:
        _LOOP.append(asyncio.new_event_loop())
    return _LOOP[0].run_until_complete(coroutine)


def _forward_auth(decisions: list[tuple[Facts, Decision]]) -> ForwardAuth:
    config = _config()
    decider = Decider(config, cast(SecondFactor, _NoSecondFactor()))

    async def decide(facts: Facts) -> Decision:
        decision = await decider.decide(facts)
        decisions.append((facts, decision))
        return decision

    return ForwardAuth(
        RequestFacts(TrustPolicy(config.server.trusted_proxies)),
        decide,
        SessionCookie(config.session),
        LoginRedirects(config),
        config.upstream.user_header,
        None,
        HostPolicy(),
    )


def fuzz_x_original_uri(data: bytes) -> None:
    """``/auth`` with the front proxy's X-Original-URI / X-Forwarded-Uri / X-Original-URL and
    method headers (and a user, a code, a cookie): never a 5xx, and a 200 only for a path that
    is excluded as it came (no session is known and every code is wrong here)."""
    uri, forwarded_uri, url, method, accept, user, code, cookie = _fields(data, 8)
    path, query = split_target(uri)
    assert "?" not in path
    if uri.startswith("/"):
        assert path + ("?" + query if "?" in uri else "") == uri, "split_target lost part of the target"

    headers = [(b"accept", accept.encode("latin-1"))]
    for name, value in (
        (b"x-original-uri", uri),
        (b"x-forwarded-uri", forwarded_uri),
        (b"x-original-url", url),
        (b"remote-user", user),
        (b"x-2fa-code", code),
        (b"cookie", cookie),
    ):
        if value:
            headers.append((name, value.encode("latin-1")))
    if method:
        headers.append((b"x-original-method", method.encode("latin-1")))
    scope: Scope = {"type": "http", "method": "GET", "path": "/auth", "raw_path": b"/auth", "headers": headers}
    scope["client"] = ("127.0.0.1", 4000)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    decisions: list[tuple[Facts, Decision]] = []
    _run(_forward_auth(decisions)(scope, receive, send))
    status = sent[0]["status"]
    assert status in (200, 400, 401, 403), f"/auth answered {status}"
    if status == 200:
        [(facts, decision)] = decisions
        assert decision.reason is Reason.EXCLUDED, decision.reason
        checked = canonical_path(facts.path)
        assert _EXCLUSIONS.matches(facts.method, checked)
        assert facts.path in (checked, encode_path(checked)), "an exclusion passed a path that was not canonical"


# -- jwt_cookie -------------------------------------------------------------------------------------


def fuzz_jwt_cookie(data: bytes) -> None:
    """Bearer and cookie extraction and PyJWT verification with a fixed key: an identity only
    from exactly one candidate token that verifies with that key, with that token's subject (a
    string, or an integer read as one); the cookie readers agree with each other. A fourth
    field is a payload the target signs with the key (as a third cookie), so the fuzzer also
    reaches the claims the gateway reads after the signature (exp, sub, label)."""
    authorization, cookie, cookie2, payload = _fields(data, 4)
    raw = []
    if authorization:
        raw.append((b"authorization", authorization.encode("latin-1")))
    signed = jws.encode(payload.encode("latin-1"), JWT_SECRET, algorithm="HS256") if payload else ""
    for value in (cookie, cookie2, f"{JWT_COOKIE}={signed}" if signed else ""):
        if value:
            raw.append((b"cookie", value.encode("latin-1")))
    headers = Headers(raw=raw)
    found = _jwt_reader().read(headers, peer_trusted=False)
    if isinstance(found, Identity):
        parts = authorization.split()
        candidates = set(cookie_values(headers.getlist("cookie"), JWT_COOKIE)) - {""}
        if len(parts) == 2 and parts[0].lower() == "bearer":
            candidates.add(parts[1])
        assert len(candidates) == 1, "an identity from more than one candidate"
        claims = jwt.decode(candidates.pop(), JWT_SECRET, algorithms=["HS256"], options={"require": ["exp"]})
        sub = claims["sub"]
        assert isinstance(sub, str) or (isinstance(sub, int) and not isinstance(sub, bool)), "a subject of another type"
        assert str(sub) == found.user and valid_user(found.user)
        assert isinstance(claims["exp"], int | float) and not isinstance(claims["exp"], bool), "no numeric exp"

    for header in (cookie, cookie2):
        stripped = without_cookie(header, JWT_COOKIE)
        assert cookie_values([stripped], JWT_COOKIE) == [], "without_cookie left the cookie"
    one, ambiguous = read_one_cookie(headers, JWT_COOKIE)
    distinct = set(cookie_values(headers.getlist("cookie"), JWT_COOKIE))
    assert ambiguous == (len(distinct) > 1)
    assert one is None or one in distinct


_JWT_READER: list[IdentityReader] = []


def _jwt_reader() -> IdentityReader:
    if not _JWT_READER:
        identity = config_module.parse(
            {
                "store": {"url": "sqlite:///unused.db"},
                "identity": {
                    "mode": "jwt",
                    "jwt": {"secret": JWT_SECRET, "algorithms": ["HS256"], "cookie": JWT_COOKIE},
                },
            },
            env=_fresh_keys(),
        ).identity
        _JWT_READER.append(IdentityReader(identity))
    return _JWT_READER[0]


# -- forms ------------------------------------------------------------------------------------------


def fuzz_forms(data: bytes) -> None:
    """The readers of the gateway's routes: a JSON, form or multipart body (through a Starlette
    Request), the query, and the return target. Either ``BadInput`` or fields that are ours,
    strings of at most 4096 characters; a return target is always a local path."""
    head, _, body = data.partition(b"\n")
    content_type, _, query = head.decode("latin-1").partition("\t")
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/verify",
        "headers": [(b"content-type", content_type.encode("latin-1"))],
        "query_string": query.encode("latin-1"),
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        fields = _run(read_fields(Request(scope, receive)))
    except BadInput:
        pass
    else:
        assert set(fields) <= set(_FIELDS)
        assert all(isinstance(v, str) and v.strip() and len(v) <= _MAX_FIELD for v in fields.values())
    with contextlib.suppress(BadInput):
        read_query(scope)
    for raw in (query, body.decode("latin-1")):
        target = safe_target(raw, refused=("/verify",))
        assert target == "/" or (target.startswith("/") and not target.startswith("//")), "not a local path"
        assert "\\" not in target and target.isascii() and target.isprintable()
        assert safe_target(target) == target, "safe_target is not a fixed point"
        if target != "/":
            json.dumps(target)  # a string a page can embed


def run_one(target: Target, data: bytes) -> None:
    """One input through ``target``: the gateway's own refusals are answers, not crashes."""
    with contextlib.suppress(GatewayError, BadInput):
        target(data)


TARGETS: dict[str, Target] = {
    "paths": fuzz_paths,
    "headers": fuzz_headers,
    "x_original_uri": fuzz_x_original_uri,
    "jwt_cookie": fuzz_jwt_cookie,
    "forms": fuzz_forms,
}
