"""Real Caddy, started from config/caddy/Caddyfile, with a real gateway (forward-auth mode)
and the test upstream behind it. Every bypass shape is sent as raw bytes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import RedisServer, need_binary
from tests.support import fronts
from tests.support.fronts import CaddyFront, basic_auth, raw_request, totp_now
from tests.support.servers import GatewayServer, UpstreamProcess, enrol, make_config

pytestmark = pytest.mark.integration

EXAMPLE_HASH = "$2a$14$1bc0Yf8WIEjgFeiwVmnb1eDexb5nunQFlGiuP/jMPnIObPgzNjmeG"
PASSWORD = "first-factor"  # one password for all: bcrypt is slow on purpose, hash it once
ALICE = {"Authorization": basic_auth("alice", PASSWORD)}  # enrolled
BOB = {"Authorization": basic_auth("bob", PASSWORD)}  # has a password, not enrolled
CAROL = {"Authorization": basic_auth("carol", PASSWORD)}  # enrolled by the test that uses her
DAVE = {"Authorization": basic_auth("dave", PASSWORD)}  # enrolled by the WebSocket test
HTML = {"Accept": "text/html,application/xhtml+xml"}
BYPASSES = [
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "//admin",
    "//public/../admin",
    "/public/..;/admin",
    "/admin?x=/public",
    "/admin#/public",
    "/public/%2e%2e%2fadmin",
    "/public/..%2fadmin",
    "/public/..%5cadmin",
    "/public/%252e%252e/admin",
    "/public/%ef%bc%8e%ef%bc%8e/admin",
    "/admin/%2e%2e/public/x",
    "/Public/x",
    "/public/../../admin",
]


@pytest.fixture(scope="module")
def caddy_binary() -> str:
    return need_binary("caddy")


@pytest.fixture(scope="module")
def users(caddy_binary: str) -> str:
    """The basicauth accounts, as lines for the Caddyfile."""
    hasher = CaddyFront(caddy_binary, {})
    try:
        hashed = hasher.hash_password(PASSWORD)
    finally:
        hasher.stop()
    return "\n\t\t".join(f"{user} {hashed}" for user in ("alice", "bob", "carol", "dave"))


def start_caddy(binary: str, users: str, gateway: GatewayServer, upstream: UpstreamProcess) -> CaddyFront:
    front = CaddyFront(
        binary,
        {
            "admin localhost:2019": "admin off",
            "127.0.0.1:8080": f"127.0.0.1:{gateway.port}",
            "127.0.0.1:3000": f"127.0.0.1:{upstream.port}",
            f"alice {EXAMPLE_HASH}": users,
        },
    )
    try:
        return front.start()
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{front.output()}") from None


def echoed(body: bytes) -> dict[str, object]:
    data = json.loads(body)
    data["headers"] = dict(data["headers"])
    return data  # type: ignore[no-any-return]


def assert_denied(status: int, body: bytes, what: object) -> None:
    assert not 200 <= status < 300, f"{what}: {status}"
    assert b"raw_path" not in body, f"{what}: the upstream answered"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayServer, str]]:
    config = make_config(tmp_path_factory.mktemp("caddy-fa"))
    secret = enrol(config, "alice")
    server = GatewayServer(config).start()
    yield server, secret
    server.stop()


@pytest.fixture(scope="module")
def caddy(
    caddy_binary: str, users: str, gateway: tuple[GatewayServer, str], upstream: UpstreamProcess
) -> Iterator[CaddyFront]:
    front = start_caddy(caddy_binary, users, gateway[0], upstream)
    yield front
    front.stop()


def test_no_identity_is_a_basic_challenge(caddy: CaddyFront) -> None:
    status, headers, body = raw_request(caddy.port, "/echo/x", {**HTML, "Remote-User": "alice"})
    assert status == 401
    assert headers["www-authenticate"].startswith("Basic ")
    assert b"raw_path" not in body


def test_browser_without_code_is_redirected_to_verify(caddy: CaddyFront) -> None:
    status, headers, body = raw_request(caddy.port, "/echo/x?a=1", {**ALICE, **HTML})
    assert status == 302
    location = urlsplit(headers["location"])
    assert location.netloc == f"127.0.0.1:{caddy.port}"
    assert location.path == "/verify-2fa"
    assert parse_qs(location.query) == {"next": ["/echo/x?a=1"]}
    assert b"raw_path" not in body


def test_api_client_gets_the_gateway_answer(caddy: CaddyFront) -> None:
    status, headers, body = raw_request(caddy.port, "/echo/x", {**ALICE, "Accept": "application/json"})
    assert status == 401
    assert json.loads(body)["error"] == "2fa_required"
    assert "location" not in headers
    status, _, body = raw_request(caddy.port, "/echo/x", BOB)
    assert status == 403
    assert json.loads(body)["error"] == "2fa_not_enrolled"
    status, headers, _ = raw_request(caddy.port, "/echo/x", {**BOB, **HTML})
    assert status == 302
    assert urlsplit(headers["location"]).path == "/setup-2fa"


def test_valid_code_reaches_the_app_and_opens_a_session(caddy: CaddyFront, gateway: tuple[GatewayServer, str]) -> None:
    code = totp_now(gateway[1])
    status, headers, body = raw_request(
        caddy.port, "/echo/x?q=1", {**ALICE, "X-2FA-Code": code, "Remote-User": "mallory"}
    )
    assert status == 200
    seen = echoed(body)
    assert seen["raw_path"] == "/echo/x" and seen["query"] == "q=1"
    assert seen["headers"]["remote-user"] == "alice"  # type: ignore[index]
    assert "x-2fa-code" not in seen["headers"]  # type: ignore[operator]
    # The session the code opened reaches the client (see the Caddyfile: forward_auth's
    # shortcut would drop it).
    cookie = headers["set-cookie"]
    assert cookie.startswith("gateway_session=") and "HttpOnly" in cookie
    session = {"Cookie": cookie.split(";", 1)[0]}

    status, headers, body = raw_request(caddy.port, "/echo/y", {**ALICE, **session}, method="POST")
    assert status == 200
    assert echoed(body)["headers"]["remote-user"] == "alice"  # type: ignore[index]
    assert "set-cookie" not in headers

    status, _, body = raw_request(caddy.port, "/echo/x", {**ALICE, "X-2FA-Code": code})
    assert_denied(status, body, "replayed code")
    assert json.loads(body)["error"] == "2fa_replayed"
    status, _, body = raw_request(caddy.port, "/echo/x", {**BOB, **session})
    assert_denied(status, body, "bob with alice's session")


def test_excluded_paths_pass_without_code_and_without_a_user(caddy: CaddyFront) -> None:
    status, headers, body = raw_request(
        caddy.port, "/public/x", {**ALICE, "Remote-User": "mallory", "Remote_User": "mallory", "Remote.User": "m"}
    )
    assert status == 200
    seen = echoed(body)
    assert seen["raw_path"] == "/public/x"
    # Neither the client's Remote-User nor Caddy 2.6's literal placeholder reaches the app,
    # nor the look-alikes a CGI-style app would read as Remote-User.
    for name in ("remote-user", "remote_user", "remote.user"):
        assert name not in seen["headers"]  # type: ignore[operator]
    assert "set-cookie" not in headers
    assert raw_request(caddy.port, "/api/public/x", ALICE)[0] == 200
    status, _, body = raw_request(caddy.port, "/api/public/x", ALICE, method="POST")
    assert_denied(status, body, "POST to a GET-only exclusion")


def test_bypass_shapes_are_denied(caddy: CaddyFront) -> None:
    for target in [*BYPASSES, f"http://127.0.0.1:{caddy.port}/admin"]:
        for who in (ALICE, BOB):
            status, _, body = raw_request(caddy.port, target, {**who, **HTML})
            assert_denied(status, body, target)


def test_client_cannot_describe_another_request(caddy: CaddyFront) -> None:
    # Caddy passes the client's headers to /auth: an X-Original-URI of an excluded path next
    # to the X-Forwarded-Uri Caddy sets must not make the gateway judge the wrong request.
    for spoof in (
        {"X-Original-URI": "/public/x"},
        {"X-Original-URL": "http://x/public/x"},
        {"X-Original-Method": "GET", "X-Original-URI": "/api/public/x"},
    ):
        status, _, body = raw_request(caddy.port, "/echo/secret", {**ALICE, **spoof})
        assert_denied(status, body, spoof)
    status, _, body = raw_request(caddy.port, "/api/public/x", {**ALICE, "X-Original-Method": "GET"}, method="POST")
    assert_denied(status, body, "a POST claiming to be a GET")


def test_gateway_pages_are_reachable(caddy: CaddyFront) -> None:
    status, headers, body = raw_request(caddy.port, "/verify-2fa?next=/echo/x", {**ALICE, **HTML})
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"raw_path" not in body
    assert raw_request(caddy.port, "/verify-2fa", HTML)[0] == 401


def test_browser_verify_flow(caddy: CaddyFront, gateway: tuple[GatewayServer, str]) -> None:
    """The redirect, the verify form posted back through the proxy, then the page with the session."""
    front = caddy
    carol = enrol(gateway[0].config, "carol")
    status, headers, _ = raw_request(front.port, "/echo/page?a=1", {**CAROL, **HTML})
    assert status == 302
    verify = urlsplit(headers["location"])
    form = urlencode({"code": totp_now(carol), "next": parse_qs(verify.query)["next"][0]})
    # An older browser: Origin but no Sec-Fetch-Site, so the gateway compares Origin with Host.
    status, headers, body = raw_request(
        front.port,
        f"{verify.path}?{verify.query}",
        {
            **CAROL,
            **HTML,
            "Origin": f"http://127.0.0.1:{front.port}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Content-Length": str(len(form)),
        },
        method="POST",
        body=form.encode(),
    )
    assert status == 303, body[:300]
    assert headers["location"] == "/echo/page?a=1"
    session = {"Cookie": headers["set-cookie"].split(";", 1)[0]}
    status, _, body = raw_request(front.port, "/echo/page?a=1", {**CAROL, **HTML, **session})
    assert status == 200
    assert echoed(body)["headers"]["remote-user"] == "carol"  # type: ignore[index]


def test_redis_stopped_denies(tmp_path: Path, caddy_binary: str, users: str, upstream: UpstreamProcess) -> None:
    redis = RedisServer(need_binary("redis-server"))
    redis.start()
    gateway = front = None
    try:
        config = make_config(tmp_path, store={"url": redis.url, "prefix": "caddy", "cache_ttl": 0})
        secret = enrol(config, "alice")
        gateway = GatewayServer(config).start()
        front = start_caddy(caddy_binary, users, gateway, upstream)
        status, headers, _ = raw_request(front.port, "/echo/x", {**ALICE, "X-2FA-Code": totp_now(secret)})
        assert status == 200
        session = {"Cookie": headers["set-cookie"].split(";", 1)[0]}

        redis.stop()
        for extra in (session, {"X-2FA-Code": "123456"}, {}):
            status, _, body = raw_request(front.port, "/echo/x", {**ALICE, **extra})
            assert status == 503, extra  # Caddy passes the gateway's answer on
            assert json.loads(body)["error"] == "store_unavailable"
        status, _, body = raw_request(front.port, "/echo/x", {**ALICE, **session, **HTML})
        assert_denied(status, body, "a browser while the store is down")
    finally:
        if front is not None:
            front.stop()
        if gateway is not None:
            gateway.stop()
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)


# -- issue 9: a raw "#", routing overrides, h2c headers ---------------------------------------------

OVERRIDES = fronts.OVERRIDES | {"X_2FA_Code": "000000"}


@pytest.mark.parametrize("target", ["/healthz#/../admin", "/public/x#", "/admin#/public"])
def test_a_raw_fragment_is_400(caddy: CaddyFront, target: str) -> None:
    status, _, body = raw_request(caddy.port, target, ALICE)
    assert status == 400, target
    assert b"raw_path" not in body


def test_routing_overrides_and_h2c_never_reach_the_app(caddy: CaddyFront) -> None:
    status, _, body = raw_request(caddy.port, "/public/echo", {**ALICE, **OVERRIDES})
    assert status == 200
    seen = echoed(body)
    assert seen["method"] == "GET" and seen["raw_path"] == "/public/echo"
    assert fronts.reached_the_app(seen["headers"]) == set()


def test_two_authorization_headers_are_refused(caddy: CaddyFront) -> None:
    # basicauth checks the first; an app that reads Authorization might take the second.
    status = raw_request(
        caddy.port, "/public/echo", [("Authorization", ALICE["Authorization"]), ("Authorization", BOB["Authorization"])]
    )[0]
    assert status == 400


# -- WebSocket through forward auth -----------------------------------------------------------------


def test_websocket_with_a_session_reaches_the_app(caddy: CaddyFront, gateway: tuple[GatewayServer, str]) -> None:
    # The question to /auth must be a plain GET: with the client's Upgrade and Connection Caddy
    # opened it as a WebSocket, the gateway refused that (403), and no handshake ever passed.
    dave = enrol(gateway[0].config, "dave")
    status, headers, _ = raw_request(caddy.port, "/echo/x", {**DAVE, "X-2FA-Code": totp_now(dave)})
    assert status == 200
    session = {**DAVE, "Cookie": headers["set-cookie"].split(";", 1)[0], "Remote-User": "mallory"}
    with connect(f"ws://127.0.0.1:{caddy.port}/ws/chat", additional_headers=session, proxy=None) as ws:
        assert ws.recv(timeout=10) == "hello dave"
        ws.send("hi")
        assert ws.recv(timeout=10) == "echo hi"


@pytest.mark.parametrize("who", [ALICE, BOB, {}], ids=["no session", "not enrolled", "no first factor"])
def test_websocket_without_a_session_is_refused(caddy: CaddyFront, who: dict[str, str]) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{caddy.port}/ws/chat", additional_headers=who, proxy=None, open_timeout=10)
    assert refused.value.response.status_code in (401, 403)
    assert b"raw_path" not in refused.value.response.body
