"""Real nginx, started from config/nginx/auth_request.conf and config/nginx/proxy_pass.conf,
with a real gateway and the test upstream behind it.

nginx matches locations on the decoded, normalised ``$uri`` but passes ``$request_uri`` (raw)
to the gateway and the raw target to the app: every bypass shape is sent as raw bytes and must
be denied, never reach the app's protected content.
"""

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
from tests.support.fronts import NginxFront, basic_auth, raw_request, totp_now
from tests.support.servers import GatewayServer, UpstreamProcess, enrol, make_config

pytestmark = pytest.mark.integration

ALICE = {"Authorization": basic_auth("alice", "alice-pw")}  # enrolled
BOB = {"Authorization": basic_auth("bob", "bob-pw")}  # has a password, not enrolled
CAROL = {"Authorization": basic_auth("carol", "carol-pw")}  # enrolled by the test that uses her
DAVE = {"Authorization": basic_auth("dave", "dave-pw")}  # enrolled by the WebSocket tests
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
    "http://127.0.0.1/admin",
]


def start_nginx(site: str, gateway: GatewayServer, upstream: UpstreamProcess | None) -> NginxFront:
    replacements = {"server 127.0.0.1:8080;": f"server 127.0.0.1:{gateway.port};"}
    if upstream is not None:
        replacements["server 127.0.0.1:3000;"] = f"server 127.0.0.1:{upstream.port};"
    front = NginxFront(need_binary("nginx"), site, replacements)
    front.replacements["/etc/nginx/gateway.htpasswd"] = front.htpasswd(
        {user: f"{user}-pw" for user in ("alice", "bob", "carol", "dave")}
    )
    return front.start()


def echoed(body: bytes) -> dict[str, object]:
    """What the upstream saw (its /echo answer), with headers as a dict."""
    data = json.loads(body)
    data["headers"] = dict(data["headers"])
    return data  # type: ignore[no-any-return]


def assert_denied(status: int, body: bytes, what: object) -> None:
    assert not 200 <= status < 300, f"{what}: {status}"
    assert b"raw_path" not in body, f"{what}: the upstream answered"


# -- auth_request: nginx proxies, the gateway decides -----------------------------------------------


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayServer, str]]:
    config = make_config(tmp_path_factory.mktemp("nginx-fa"))
    value = enrol(config, "alice")
    gateway = GatewayServer(config).start()
    yield gateway, value
    gateway.stop()


@pytest.fixture(scope="module")
def nginx(secret: tuple[GatewayServer, str], upstream: UpstreamProcess) -> Iterator[NginxFront]:
    front = start_nginx("auth_request.conf", secret[0], upstream)
    yield front
    front.stop()


def test_no_identity_is_nginx_basic_challenge(nginx: NginxFront) -> None:
    status, headers, body = raw_request(nginx.port, "/echo/x", HTML)
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="app"'
    assert b"raw_path" not in body
    wrong = {"Authorization": basic_auth("alice", "wrong"), "Remote-User": "alice"}
    assert raw_request(nginx.port, "/echo/x", wrong)[0] == 401


def test_browser_without_code_is_redirected_to_verify(nginx: NginxFront) -> None:
    status, headers, body = raw_request(nginx.port, "/echo/x?a=1", {**ALICE, **HTML})
    assert status == 302
    location = urlsplit(headers["location"])
    assert location.netloc == f"127.0.0.1:{nginx.port}"  # the public origin, from X-Forwarded-Host
    assert location.path == "/verify-2fa"
    assert parse_qs(location.query) == {"next": ["/echo/x?a=1"]}
    assert "set-cookie" not in headers
    assert b"raw_path" not in body


def test_api_client_without_code_gets_401(nginx: NginxFront) -> None:
    status, headers, body = raw_request(nginx.port, "/echo/x", {**ALICE, "Accept": "application/json"})
    assert status == 401
    assert "location" not in headers and "www-authenticate" not in headers
    assert b"raw_path" not in body


def test_not_enrolled_browser_is_sent_to_setup(nginx: NginxFront) -> None:
    status, headers, _ = raw_request(nginx.port, "/echo/x", {**BOB, **HTML})
    assert status == 302
    assert urlsplit(headers["location"]).path == "/setup-2fa"
    assert raw_request(nginx.port, "/echo/x", BOB)[0] == 403


def test_valid_code_reaches_the_app_with_the_user_and_a_session(
    nginx: NginxFront, secret: tuple[GatewayServer, str]
) -> None:
    code = totp_now(secret[1])
    status, headers, body = raw_request(
        nginx.port, "/echo/x?q=1", {**ALICE, "X-2FA-Code": code, "Remote-User": "mallory"}
    )
    assert status == 200
    seen = echoed(body)
    assert seen["raw_path"] == "/echo/x" and seen["query"] == "q=1"
    assert seen["headers"]["remote-user"] == "alice"  # type: ignore[index]
    assert "x-2fa-code" not in seen["headers"]  # type: ignore[operator]
    # The session the code opened reaches the client (auth_request_set + add_header).
    cookie = headers["set-cookie"]
    assert cookie.startswith("gateway_session=") and "HttpOnly" in cookie
    session = {"Cookie": cookie.split(";", 1)[0]}

    status, _, body = raw_request(nginx.port, "/echo/y", {**ALICE, **session}, method="POST")
    assert status == 200
    assert echoed(body)["headers"]["remote-user"] == "alice"  # type: ignore[index]
    # Replayed: the same code again, without the session.
    status, _, body = raw_request(nginx.port, "/echo/x", {**ALICE, "X-2FA-Code": code})
    assert_denied(status, body, "replayed code")
    assert status == 401
    # Someone else's session cookie is no session.
    status, _, body = raw_request(nginx.port, "/echo/x", {**BOB, **session})
    assert_denied(status, body, "bob with alice's session")


def test_excluded_paths_pass_without_code(nginx: NginxFront) -> None:
    status, _, body = raw_request(nginx.port, "/public/x", {**ALICE, "Remote-User": "mallory"})
    assert status == 200
    seen = echoed(body)
    assert seen["raw_path"] == "/public/x"
    assert "remote-user" not in seen["headers"]  # type: ignore[operator]  # nobody is vouched for
    assert raw_request(nginx.port, "/api/public/x", ALICE)[0] == 200
    status, _, body = raw_request(nginx.port, "/api/public/x", ALICE, method="POST")  # "GET /api/public/*"
    assert_denied(status, body, "POST to a GET-only exclusion")


def test_bypass_shapes_are_denied(nginx: NginxFront) -> None:
    for target in BYPASSES:
        for who in (ALICE, BOB):
            status, _, body = raw_request(nginx.port, target, {**who, **HTML})
            assert_denied(status, body, target)


def test_client_cannot_describe_another_request(nginx: NginxFront) -> None:
    # nginx replaces X-Original-URI; a client's X-Forwarded-Uri of an excluded path then
    # disagrees with it, and the gateway refuses the pair.
    for spoof in (
        {"X-Forwarded-Uri": "/public/x"},
        {"X-Original-URL": "http://x/public/x"},
        {"X-Original-URI": "/public/x", "X-Original-Method": "GET"},
    ):
        status, _, body = raw_request(nginx.port, "/echo/secret", {**ALICE, **spoof})
        assert_denied(status, body, spoof)


def test_gateway_pages_are_reachable(nginx: NginxFront) -> None:
    status, headers, body = raw_request(nginx.port, "/verify-2fa?next=/echo/x", {**ALICE, **HTML})
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"raw_path" not in body  # the gateway answered, not the app
    assert raw_request(nginx.port, "/verify-2fa", HTML)[0] == 401  # still behind the first factor


def test_browser_verify_flow(nginx: NginxFront, secret: tuple[GatewayServer, str]) -> None:
    """The redirect, the verify form posted back through the proxy, then the page with the session."""
    front = nginx
    carol = enrol(secret[0].config, "carol")
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


# -- proxy_pass: nginx forwards, the gateway proxies ------------------------------------------------


@pytest.fixture(scope="module")
def proxied(
    tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess
) -> Iterator[tuple[NginxFront, str, GatewayServer]]:
    config = make_config(tmp_path_factory.mktemp("nginx-proxy"), upstream=upstream.url)
    value = enrol(config, "alice")
    gateway = GatewayServer(config).start()
    front = start_nginx("proxy_pass.conf", gateway, None)
    yield front, value, gateway
    front.stop()
    gateway.stop()


def test_proxy_pass_site(proxied: tuple[NginxFront, str, GatewayServer]) -> None:
    front, value, _ = proxied
    assert raw_request(front.port, "/echo/x", HTML)[0] == 401
    status, headers, _ = raw_request(front.port, "/echo/x", {**ALICE, **HTML})
    assert status == 302
    assert urlsplit(headers["location"]).path == "/verify-2fa"
    assert raw_request(front.port, "/echo/x", BOB)[0] == 403

    code = totp_now(value)
    status, headers, body = raw_request(front.port, "/echo/x?q=%2F", {**ALICE, "X-2FA-Code": code})
    assert status == 200
    seen = echoed(body)
    assert seen["headers"]["remote-user"] == "alice"  # type: ignore[index]
    # The client as nginx saw it, then nginx as the gateway saw it.
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1, 127.0.0.1"  # type: ignore[index]
    assert seen["query"] == "q=%2F"
    assert headers["set-cookie"].startswith("gateway_session=")
    status, _, body = raw_request(front.port, "/echo/x", {**ALICE, "X-2FA-Code": code})
    assert_denied(status, body, "replayed code")

    status, _, body = raw_request(front.port, "/public/x", ALICE)
    assert status == 200
    assert "remote-user" not in echoed(body)["headers"]  # type: ignore[operator]
    for target in BYPASSES:
        status, _, body = raw_request(front.port, target, ALICE)
        assert_denied(status, body, target)


def assert_websockets(front: NginxFront, gateway: GatewayServer) -> None:
    """A WebSocket with a 2FA session reaches the app as the verified user; without a session,
    enrolment or first factor the handshake is refused before the app."""
    dave = enrol(gateway.config, "dave")
    status, headers, _ = raw_request(front.port, "/echo/x", {**DAVE, "X-2FA-Code": totp_now(dave)})
    assert status == 200
    session = {**DAVE, "Cookie": headers["set-cookie"].split(";", 1)[0], "Remote-User": "mallory"}
    with connect(f"ws://127.0.0.1:{front.port}/ws/chat", additional_headers=session, proxy=None) as ws:
        assert ws.recv(timeout=10) == "hello dave"
        ws.send("hi")
        assert ws.recv(timeout=10) == "echo hi"
    for who in (ALICE, BOB, {}):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{front.port}/ws/chat", additional_headers=who, proxy=None, open_timeout=10)
        assert refused.value.response.status_code in (401, 403), who
        assert b"raw_path" not in refused.value.response.body


def test_websocket_through_auth_request(nginx: NginxFront, secret: tuple[GatewayServer, str]) -> None:
    # auth_request.conf asks the gateway about the handshake as a plain GET, then relays an
    # Upgrade that is "websocket" (its map) to the app. It used to relay no Upgrade at all.
    assert_websockets(nginx, secret[0])


def test_websocket_through_proxy_pass(proxied: tuple[NginxFront, str, GatewayServer]) -> None:
    # proxy_pass.conf relays an Upgrade that is "websocket" (its map) to the gateway, which
    # checks the handshake like any request and relays it to the app.
    assert_websockets(proxied[0], proxied[2])


# -- the store goes away ------------------------------------------------------------------------------


def test_redis_stopped_denies(tmp_path: Path, upstream: UpstreamProcess) -> None:
    redis = RedisServer(need_binary("redis-server"))
    redis.start()
    gateway = front = None
    try:
        config = make_config(tmp_path, store={"url": redis.url, "prefix": "nginx", "cache_ttl": 0})
        value = enrol(config, "alice")
        gateway = GatewayServer(config).start()
        front = start_nginx("auth_request.conf", gateway, upstream)
        status, headers, _ = raw_request(front.port, "/echo/x", {**ALICE, "X-2FA-Code": totp_now(value)})
        assert status == 200
        session = {"Cookie": headers["set-cookie"].split(";", 1)[0]}

        redis.stop()
        for extra in (session, {"X-2FA-Code": "123456"}, HTML):
            status, _, body = raw_request(front.port, "/echo/x", {**ALICE, **extra})
            assert status == 500, extra  # the gateway's 503, which auth_request turns into a 500
            assert b"raw_path" not in body
    finally:
        if front is not None:
            front.stop()
        if gateway is not None:
            gateway.stop()
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)


# -- issue 9: a raw "#", routing overrides, h2c headers ---------------------------------------------

OVERRIDES = fronts.OVERRIDES | {"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings"}


def assert_no_overrides(seen: dict[str, object]) -> None:
    assert fronts.reached_the_app(seen["headers"]) == set()


@pytest.mark.parametrize("target", ["/healthz#/../admin", "/public/x#", "/admin#/public"])
def test_a_raw_fragment_is_400(nginx: NginxFront, proxied: tuple[NginxFront, str], target: str) -> None:
    for front in (nginx, proxied[0]):
        status, _, body = raw_request(front.port, target, ALICE)
        assert status == 400, (front.source.name, target)
        assert b"raw_path" not in body


def test_routing_overrides_and_h2c_never_reach_the_app(
    nginx: NginxFront, proxied: tuple[NginxFront, str, GatewayServer]
) -> None:
    for front in (nginx, proxied[0]):
        status, _, body = raw_request(front.port, "/public/echo", {**ALICE, **OVERRIDES})
        assert status == 200, front.source.name
        seen = echoed(body)
        assert seen["method"] == "GET" and seen["raw_path"] == "/public/echo"
        assert_no_overrides(seen)


def test_two_authorization_headers_are_refused(
    nginx: NginxFront, proxied: tuple[NginxFront, str, GatewayServer]
) -> None:
    # nginx's own rule (a duplicate Authorization is a 400); Caddy needs its Caddyfile for it.
    both = [("Authorization", ALICE["Authorization"]), ("Authorization", BOB["Authorization"])]
    for front in (nginx, proxied[0]):
        status, _, body = raw_request(front.port, "/public/echo", both)
        assert status == 400 and b"raw_path" not in body
