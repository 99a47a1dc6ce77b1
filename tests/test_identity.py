"""The first factor: trusted header and verified JWT."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pyotp
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.datastructures import Headers

from gateway import config as config_module
from gateway import identity as identity_module
from gateway.config import IdentityConfig, JwtConfig
from gateway.errors import DENIALS, Reason
from gateway.identity import Denied, Identity, IdentityReader, cookie_values, valid_user, without_cookie
from tests.support.servers import GatewayServer, UpstreamProcess, enrol, free_port, make_config

SECRET = "s3cret-" * 6
AUD = "fastapi-users:auth"


def hs_reader(**kw: Any) -> IdentityReader:
    cfg = JwtConfig(secret=SECRET, algorithms=("HS256",), audience=(AUD,), cookie="auth", label_claim="email", **kw)
    return IdentityReader(IdentityConfig(mode="jwt", jwt=cfg))


def token(claims: dict[str, Any], key: str = SECRET, alg: str = "HS256") -> str:
    base = {"sub": "user-1", "aud": AUD, "exp": int(time.time()) + 60, "email": "ann@example.com"}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, key, algorithm=alg)


def pair(result: Identity | Denied) -> tuple[Any, Reason | None]:
    """``(identity, None)`` or ``(None, why)``: one shape for the assertions below."""
    return (None, result.reason) if isinstance(result, Denied) else (result, None)


def read(reader: IdentityReader, headers: dict[str, str], trusted: bool = True) -> tuple[Any, Reason | None]:
    return pair(reader.read(Headers(headers), trusted))


def test_read_answers_an_identity_or_a_denial() -> None:
    """Each step has its own result type (issue 11): an Identity on success, never a Reason."""
    reader = IdentityReader(IdentityConfig(mode="header", header="Remote-User"))
    assert reader.read(Headers({"Remote-User": "alice"}), True) == Identity("alice", "alice")
    assert reader.read(Headers({}), True) == Denied(Reason.IDENTITY_REQUIRED)
    assert hs_reader().read(Headers({"Authorization": "Bearer a.b.c"}), True) == Denied(Reason.INVALID_IDENTITY)


def test_a_verified_token_is_remembered_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JWT cache (gateway.cache.TtlCache) serves a verified token with no second signature
    check until the token's own exp plus leeway, on the reader's clock; then it is verified again."""
    now = [time.time()]
    cfg = JwtConfig(secret=SECRET, algorithms=("HS256",), audience=(AUD,), leeway=5)
    reader = IdentityReader(IdentityConfig(mode="jwt", jwt=cfg), clock=lambda: now[0])
    exp = int(now[0]) + 30
    bearer = Headers({"Authorization": f"Bearer {token({'exp': exp})}"})
    assert reader.read(bearer, True) == Identity("user-1", "user-1")
    verified: list[str] = []

    def verify_again(raw: str) -> tuple[Identity | None, float]:
        verified.append(raw)
        return None, 0.0  # as PyJWT would answer once the token has expired

    monkeypatch.setattr(reader, "_verify", verify_again)
    now[0] = exp + 5 - 0.001  # within exp + leeway: still the cached identity
    assert reader.read(bearer, True) == Identity("user-1", "user-1") and verified == []
    now[0] = exp + 5
    assert reader.read(bearer, True) == Denied(Reason.INVALID_IDENTITY) and len(verified) == 1


def test_header_mode_believes_only_trusted_peers() -> None:
    reader = IdentityReader(IdentityConfig())
    identity, _ = read(reader, {"Remote-User": "alice"})
    assert identity is not None and identity.user == "alice"
    assert read(reader, {"Remote-User": "alice"}, trusted=False) == (None, Reason.IDENTITY_REQUIRED)
    assert read(reader, {}) == (None, Reason.IDENTITY_REQUIRED)
    assert read(reader, {"Remote-User": " padded"})[1] is Reason.INVALID_IDENTITY
    assert read(reader, {"Remote-User": "x" * 300})[1] is Reason.INVALID_IDENTITY


def test_header_mode_reads_utf8_user_names() -> None:
    """A proxy sends "José" as UTF-8 bytes; ASGI hands them over read as Latin-1."""
    reader = IdentityReader(IdentityConfig())
    raw = "José".encode().decode("latin-1")
    identity, _ = read(reader, {"Remote-User": raw})
    assert identity is not None and identity.user == "José"
    assert read(reader, {"Remote-User": "\xff\xfe"})[1] is Reason.INVALID_IDENTITY  # not UTF-8


def test_non_ascii_user_reaches_the_upstream_byte_exact(upstream: UpstreamProcess, tmp_path: Path) -> None:
    config = make_config(tmp_path, upstream=upstream.url)
    server = GatewayServer(config).start()
    try:
        secret = enrol(config, "José")
        code = pyotp.TOTP(secret).now()
        # The raw UTF-8 bytes, as a proxy sends them.
        r = httpx.get(server.url + "/echo", headers={b"Remote-User": "José".encode(), b"X-2FA-Code": code.encode()})
        assert r.status_code == 200, r.text
        seen = dict(r.json()["headers"])
        assert seen["remote-user"].encode("latin-1") == "José".encode()
    finally:
        server.stop()


def test_jwt_bearer_and_cookie() -> None:
    reader = hs_reader()
    identity, _ = read(reader, {"Authorization": f"Bearer {token({})}"})
    assert identity is not None and identity.user == "user-1" and identity.label == "ann@example.com"
    identity, _ = read(reader, {"Cookie": f"other=1; auth={token({'sub': 'user-2'})}"})
    assert identity is not None and identity.user == "user-2"
    # a cached token is still rejected once expired
    assert read(reader, {"Authorization": f"Bearer {token({'exp': int(time.time()) - 1})}"})[0] is None


@pytest.mark.parametrize(
    "bad",
    [
        {"exp": None},  # exp is required
        {"exp": 1},  # expired
        {"aud": "someone-else"},
        {"sub": None},
        {"sub": "bad\nuser"},
    ],
)
def test_jwt_rejections(bad: dict[str, Any]) -> None:
    assert read(hs_reader(), {"Authorization": f"Bearer {token(bad)}"}) == (None, Reason.INVALID_IDENTITY)


def test_jwt_wrong_key_alg_none_and_garbage() -> None:
    reader = hs_reader()
    assert read(reader, {"Authorization": f"Bearer {token({}, key='other-key-' * 4)}"})[0] is None
    unsigned = jwt.encode({"sub": "x", "aud": AUD, "exp": int(time.time()) + 60}, "", algorithm="none")
    assert read(reader, {"Authorization": f"Bearer {unsigned}"})[0] is None
    assert read(reader, {"Authorization": "Bearer not.a.jwt"})[1] is Reason.INVALID_IDENTITY
    assert read(reader, {"Authorization": "Basic dXNlcjpwdw=="})[1] is Reason.IDENTITY_REQUIRED


def test_jwt_public_key() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    reader = IdentityReader(
        IdentityConfig(mode="jwt", jwt=JwtConfig(public_key=public.decode(), algorithms=("ES256",)))
    )
    good = jwt.encode({"sub": "es-user", "exp": int(time.time()) + 60}, private, algorithm="ES256")
    assert read(reader, {"Authorization": f"Bearer {good}"})[0].user == "es-user"
    # an HS256 token "signed" with the public key must not pass (algorithm confusion)
    forged = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, "k" * 40, algorithm="HS256")
    assert read(reader, {"Authorization": f"Bearer {forged}"})[0] is None


def test_helpers() -> None:
    assert cookie_values(["a=1; b=2"], "b") == ["2"]
    assert cookie_values(["ab=1", "b"], "b") == []
    assert cookie_values([], "b") == []


@pytest.mark.parametrize("spelling", ["s=1", " s=1", "s =1", "s\t= 1", "\xa0s=1", "\x0bs=1", 's="1"'])
def test_one_rule_reads_and_strips_a_cookie(spelling: str) -> None:
    """Whatever spelling is read as cookie ``s`` is also what ``without_cookie`` removes: the
    decision and the stripping before the app must never disagree (an attack found
    ``gateway_session =ID`` honoured by one and kept by the other)."""
    header = f"a=0; {spelling}; b=2"
    assert cookie_values([header], "s") == ["1"]
    assert cookie_values([without_cookie(header, "s")], "s") == []
    assert without_cookie(header, "s") == "a=0; b=2"
    assert without_cookie("as=1; sb=2", "s") == "as=1; sb=2"
    assert valid_user("alice@example.com")
    assert not valid_user("") and not valid_user("a\x00b") and not valid_user(3)


def test_jwt_mode_end_to_end(upstream: UpstreamProcess, tmp_path: Path) -> None:
    """An app whose own login issues JWTs (FastAPI Users style) behind the gateway."""
    cfg = make_config(
        tmp_path,
        upstream=upstream.url,
        identity={"mode": "jwt", "jwt": {"audience": AUD, "cookie": "auth"}},
        env={config_module.ENV_JWT_SECRET: SECRET},
    )
    server = GatewayServer(cfg).start()
    try:
        secret = enrol(cfg, "user-1")
        bearer = {"Authorization": f"Bearer {token({})}"}
        assert httpx.get(server.url + "/echo", headers=bearer).status_code == 401
        r = httpx.get(server.url + "/echo", headers={**bearer, "X-2FA-Code": pyotp.TOTP(secret).now()})
        assert r.status_code == 200
        seen = dict(r.json()["headers"])
        assert seen["remote-user"] == "user-1"
        assert seen["authorization"] == bearer["Authorization"]  # the app still gets its own token
    finally:
        server.stop()


# -- one request, one identity (issue 10) ---------------------------------------------------
def raw_read(reader: IdentityReader, raw: list[tuple[bytes, bytes]], trusted: bool = True) -> tuple[Any, Reason | None]:
    """Headers exactly as they came off the wire, duplicates and all."""
    return pair(reader.read(Headers(raw=raw), trusted))


def test_jwt_candidates_that_disagree_are_ambiguous() -> None:
    reader = hs_reader()
    alice, mallory = token({"sub": "alice"}), token({"sub": "mallory"})
    ambiguous = (None, Reason.AMBIGUOUS_IDENTITY)
    # Bearer (read first, before) and a cookie of the configured name (what the app reads).
    assert (
        raw_read(reader, [(b"authorization", f"Bearer {mallory}".encode()), (b"cookie", f"auth={alice}".encode())])
        == ambiguous
    )
    # Two cookies of the name in one header: this module read the first, Starlette the last.
    assert raw_read(reader, [(b"cookie", f"auth={mallory}; x=1; auth={alice}".encode())]) == ambiguous
    # ...or in two Cookie headers (Starlette reads only the first header).
    assert (
        raw_read(reader, [(b"cookie", f"auth={mallory}".encode()), (b"cookie", f"auth={alice}".encode())]) == ambiguous
    )
    # Two Authorization headers, even with one token each.
    assert (
        raw_read(
            reader, [(b"authorization", f"Bearer {mallory}".encode()), (b"authorization", f"Bearer {alice}".encode())]
        )
        == ambiguous
    )
    # An empty cookie of the name next to a token is no second candidate; equal copies are one.
    identity, _ = raw_read(reader, [(b"authorization", f"Bearer {alice}".encode()), (b"cookie", b"auth=")])
    assert identity is not None and identity.user == "alice"
    identity, _ = raw_read(
        reader, [(b"authorization", f"Bearer {alice}".encode()), (b"cookie", f"auth={alice}".encode())]
    )
    assert identity is not None and identity.user == "alice"


def test_header_mode_duplicates_or_a_joined_value_are_ambiguous() -> None:
    reader = IdentityReader(IdentityConfig())
    ambiguous = (None, Reason.AMBIGUOUS_IDENTITY)
    assert raw_read(reader, [(b"remote-user", b"mallory"), (b"remote-user", b"alice")]) == ambiguous
    assert raw_read(reader, [(b"remote-user", b"alice"), (b"remote-user", b"alice")]) == ambiguous
    assert raw_read(reader, [(b"remote-user", b"mallory, alice")]) == ambiguous
    # From an untrusted peer the header is ignored altogether, duplicates or not.
    assert (
        raw_read(reader, [(b"remote-user", b"a"), (b"remote-user", b"b")], trusted=False)[1] is Reason.IDENTITY_REQUIRED
    )


def test_read_one_cookie_across_headers() -> None:
    read_one_cookie = identity_module.read_one_cookie
    assert read_one_cookie(Headers(raw=[(b"cookie", b"s=1; t=2"), (b"cookie", b"s=1")]), "s") == ("1", False)
    assert read_one_cookie(Headers(raw=[(b"cookie", b"s=1"), (b"cookie", b"s=2")]), "s") == (None, True)
    assert read_one_cookie(Headers(raw=[(b"cookie", b"s=1; s=2")]), "s") == (None, True)
    assert read_one_cookie(Headers(raw=[(b"cookie", b"ss=1; xs=2")]), "s") == (None, False)
    assert read_one_cookie(Headers(raw=[]), "s") == (None, False)


def test_ambiguous_identity_is_a_401_with_the_json_error() -> None:
    status, detail = DENIALS[Reason.AMBIGUOUS_IDENTITY]
    assert status == 401 and detail and Reason.AMBIGUOUS_IDENTITY.value == "ambiguous_identity"


async def _last_cookie_app(scope: Any, receive: Any, send: Any) -> None:
    """A Starlette app that, like FastAPI Users, reads its JWT from ``request.cookies`` (the first
    Cookie header, the last cookie of a name) and serves that user's private data."""
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

    request = Request(scope, receive)
    try:
        claims = jwt.decode(request.cookies.get("auth", ""), SECRET, algorithms=["HS256"], audience=AUD)
        response = PlainTextResponse(f"private data of {claims['sub']}")
    except jwt.PyJWTError:
        response = PlainTextResponse("who are you?", status_code=401)
    await response(scope, receive, send)


def test_differential_the_app_never_gets_another_users_cookie(tmp_path: Path) -> None:
    """Mallory's token and 2FA session, plus Alice's cookie: the gateway used to pass the request
    on Mallory's token while the app served Alice (issue 10). Now it never reaches the app."""
    app_server = uvicorn.Server(
        uvicorn.Config(_last_cookie_app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=app_server.run, daemon=True)
    thread.start()
    while not app_server.started:
        assert thread.is_alive()
        time.sleep(0.01)
    cfg = make_config(
        tmp_path,
        upstream=f"http://127.0.0.1:{app_server.config.port}",
        identity={"mode": "jwt", "jwt": {"audience": AUD, "cookie": "auth"}},
        env={config_module.ENV_JWT_SECRET: SECRET},
    )
    gateway = GatewayServer(cfg).start()
    try:
        alice, mallory = token({"sub": "alice"}), token({"sub": "mallory"})
        secret = enrol(cfg, "mallory")
        enrol(cfg, "alice")
        opened = httpx.get(
            gateway.url + "/", headers={"Cookie": f"auth={mallory}", "X-2FA-Code": pyotp.TOTP(secret).now()}
        )
        assert opened.status_code == 200 and opened.text == "private data of mallory"
        session = f"{cfg.session.cookie}={opened.cookies[cfg.session.cookie]}"
        attacks: list[list[tuple[str, str]]] = [
            [("Authorization", f"Bearer {mallory}"), ("Cookie", f"{session}; auth={alice}")],
            [("Cookie", f"auth={mallory}; {session}; auth={alice}")],
            [("Cookie", f"{session}; auth={mallory}"), ("Cookie", f"auth={alice}")],
            [("Cookie", f"auth={alice}; {session}"), ("Cookie", f"auth={mallory}")],
        ]
        for headers in attacks:
            r = httpx.get(gateway.url + "/", headers=headers)
            assert "alice" not in r.text
            assert r.status_code == 401 and r.json()["error"] == "ambiguous_identity", headers
        # Mallory alone still works; his cookie twice is still one identity.
        r = httpx.get(gateway.url + "/", headers=[("Cookie", f"auth={mallory}; {session}; auth={mallory}")])
        assert r.status_code == 200 and r.text == "private data of mallory"
    finally:
        gateway.stop()
        app_server.should_exit = True
        thread.join(timeout=15)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer\t{alice}",
        "bearer   {alice}",
        "Basic eDp5, Bearer {alice}",
        "JWT {alice}",
        "Token {alice}",
        "Bearer {alice}, Basic eDp5",
    ],
)
def test_an_authorization_value_an_app_could_read_a_token_from_is_a_candidate(authorization: str) -> None:
    """Found by the second attack: Mallory's own cookie and session, plus ``Bearer<TAB>alice``
    (or a list holding a Bearer token): the gateway split the scheme on one space only, saw no
    second candidate and forwarded the header, which DRF and flask-jwt-extended read as alice."""
    reader = hs_reader()
    alice, mallory = token({"sub": "alice"}), token({"sub": "mallory"})
    headers = [(b"authorization", authorization.format(alice=alice).encode()), (b"cookie", f"auth={mallory}".encode())]
    assert raw_read(reader, headers) == (None, Reason.AMBIGUOUS_IDENTITY)


def test_an_authorization_without_a_token_is_no_candidate() -> None:
    """Basic credentials for the app itself (no token in them) leave the cookie the identity."""
    reader = hs_reader()
    mallory = token({"sub": "mallory"})
    identity, _ = raw_read(reader, [(b"authorization", b"Basic eDp5"), (b"cookie", f"auth={mallory}".encode())])
    assert identity is not None and identity.user == "mallory"
    identity, _ = raw_read(reader, [(b"authorization", f"Bearer\t{mallory}".encode())])
    assert identity is not None and identity.user == "mallory"
