"""Real nginx in front of the gateway in proxy mode, started from config/nginx/proxy_pass.conf,
with the test upstream behind the gateway. (config/nginx/auth_request.conf, forward-auth mode,
is tested with Caddy's example by the same cases in ``test_fronts.py``.)

nginx matches locations on the decoded, normalised ``$uri`` but passes the raw target to the
gateway: every bypass shape is sent as raw bytes and must be denied, never reach the app.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import need_binary
from tests.support import fronts
from tests.support.fronts import BYPASSES, NginxFront, basic_auth, raw_request, totp_now
from tests.support.servers import GatewayServer, UpstreamProcess, enrol, make_config

pytestmark = pytest.mark.integration

ALICE = {"Authorization": basic_auth("alice", "alice-pw")}  # enrolled
BOB = {"Authorization": basic_auth("bob", "bob-pw")}  # has a password, not enrolled
DAVE = {"Authorization": basic_auth("dave", "dave-pw")}  # enrolled by the WebSocket test
HTML = {"Accept": "text/html,application/xhtml+xml"}


def start_nginx(site: str, gateway: GatewayServer, upstream: UpstreamProcess | None) -> NginxFront:
    replacements = {"server 127.0.0.1:8080;": f"server 127.0.0.1:{gateway.port};"}
    if upstream is not None:
        replacements["server 127.0.0.1:3000;"] = f"server 127.0.0.1:{upstream.port};"
    front = NginxFront(need_binary("nginx"), site, replacements)
    front.replacements["/etc/nginx/gateway.htpasswd"] = front.htpasswd(
        {user: f"{user}-pw" for user in ("alice", "bob", "dave")}
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


def test_websocket_through_proxy_pass(proxied: tuple[NginxFront, str, GatewayServer]) -> None:
    # proxy_pass.conf relays an Upgrade that is "websocket" (its map) to the gateway, which
    # checks the handshake like any request and relays it to the app.
    assert_websockets(proxied[0], proxied[2])


# -- issue 9: a raw "#", routing overrides, h2c headers ---------------------------------------------

OVERRIDES = fronts.OVERRIDES | {"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings"}


@pytest.mark.parametrize("target", ["/healthz#/../admin", "/public/x#", "/admin#/public"])
def test_a_raw_fragment_is_400(proxied: tuple[NginxFront, str, GatewayServer], target: str) -> None:
    status, _, body = raw_request(proxied[0].port, target, ALICE)
    assert status == 400, target
    assert b"raw_path" not in body


def test_routing_overrides_and_h2c_never_reach_the_app(proxied: tuple[NginxFront, str, GatewayServer]) -> None:
    status, _, body = raw_request(proxied[0].port, "/public/echo", {**ALICE, **OVERRIDES})
    assert status == 200
    seen = echoed(body)
    assert seen["method"] == "GET" and seen["raw_path"] == "/public/echo"
    assert fronts.reached_the_app(seen["headers"]) == set()


def test_two_authorization_headers_are_refused(proxied: tuple[NginxFront, str, GatewayServer]) -> None:
    # nginx's own rule (a duplicate Authorization is a 400); Caddy needs its Caddyfile for it.
    both = [("Authorization", ALICE["Authorization"]), ("Authorization", BOB["Authorization"])]
    status, _, body = raw_request(proxied[0].port, "/public/echo", both)
    assert status == 400 and b"raw_path" not in body
