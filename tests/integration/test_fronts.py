"""Forward-auth mode behind real nginx (config/nginx/auth_request.conf) and real Caddy
(config/caddy/Caddyfile): each case is written once and runs against both fronts, with a real
gateway and the test upstream behind them (issue 11, item 8).

nginx and Caddy match their locations on a decoded, normalised path but send the raw target
to the gateway and to the app: every bypass shape is sent as raw bytes and must be denied,
never reach the app's protected content. What only one front does lives in its own file
(``test_nginx.py``: the proxy_pass site).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import RedisServer, need_binary
from tests.support import fronts
from tests.support.fronts import BYPASSES, CaddyFront, NginxFront, basic_auth, raw_request, start_forward_auth, totp_now
from tests.support.servers import GatewayServer, UpstreamProcess, enrol, make_config

pytestmark = pytest.mark.integration

PASSWORD = "first-factor"  # one password for all: Caddy's bcrypt is slow on purpose, hash it once
USERS = ("alice", "bob", "carol", "dave", "erin")
ALICE = {"Authorization": basic_auth("alice", PASSWORD)}  # enrolled
BOB = {"Authorization": basic_auth("bob", PASSWORD)}  # has a password, not enrolled
CAROL = {"Authorization": basic_auth("carol", PASSWORD)}  # enrolled by the test that uses her
DAVE = {"Authorization": basic_auth("dave", PASSWORD)}  # enrolled by the WebSocket tests
ERIN = {"Authorization": basic_auth("erin", PASSWORD)}  # enrolled, then locked out
HTML = {"Accept": "text/html,application/xhtml+xml"}
JSON = {"Accept": "application/json"}
FRONTS = ["nginx", "caddy"]


@dataclass
class Site:
    """One front (nginx or Caddy) in front of the app, asking one gateway."""

    kind: str
    front: NginxFront | CaddyFront
    gateway: GatewayServer
    alice: str  # alice's TOTP secret

    @property
    def port(self) -> int:
        return self.front.port


@pytest.fixture(scope="module")
def caddy_hash() -> str:
    hasher = CaddyFront(need_binary("caddy"), {})
    try:
        return hasher.hash_password(PASSWORD)
    finally:
        hasher.stop()


def start(
    kind: str, request: pytest.FixtureRequest, gateway: GatewayServer, upstream: UpstreamProcess
) -> NginxFront | CaddyFront:
    hashed = request.getfixturevalue("caddy_hash") if kind == "caddy" else None
    return start_forward_auth(kind, gateway.port, upstream.port, {u: PASSWORD for u in USERS}, hashed)


@pytest.fixture(scope="module", params=FRONTS)
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess
) -> Iterator[Site]:
    config = make_config(tmp_path_factory.mktemp(f"{request.param}-fa"))
    alice = enrol(config, "alice")
    gateway = GatewayServer(config).start()
    try:
        front = start(request.param, request, gateway, upstream)
        yield Site(request.param, front, gateway, alice)
        front.stop()
    finally:
        gateway.stop()


def echoed(body: bytes) -> dict[str, object]:
    """What the upstream saw (its /echo answer), with headers as a dict."""
    data = json.loads(body)
    data["headers"] = dict(data["headers"])
    return data  # type: ignore[no-any-return]


def assert_denied(status: int, body: bytes, what: object) -> None:
    assert not 200 <= status < 300, f"{what}: {status}"
    assert b"raw_path" not in body, f"{what}: the upstream answered"


def gateway_answer(headers: dict[str, str], body: bytes) -> dict[str, object]:
    """The gateway's JSON denial, as the front handed it on."""
    assert headers["content-type"].startswith("application/json"), headers
    answer = json.loads(body)
    assert isinstance(answer, dict) and set(answer) >= {"error", "detail"}, answer
    return answer


# -- who may pass ----------------------------------------------------------------------------


def test_no_identity_is_the_fronts_basic_challenge(site: Site) -> None:
    status, headers, body = raw_request(site.port, "/echo/x", {**HTML, "Remote-User": "alice"})
    assert status == 401
    assert headers["www-authenticate"].startswith('Basic realm="')
    assert b"raw_path" not in body
    wrong = {"Authorization": basic_auth("alice", "wrong"), "Remote-User": "alice"}
    assert raw_request(site.port, "/echo/x", wrong)[0] == 401


def test_browser_without_code_is_redirected_to_verify(site: Site) -> None:
    status, headers, body = raw_request(site.port, "/echo/x?a=1", {**ALICE, **HTML})
    assert status == 302
    location = urlsplit(headers["location"])
    assert location.netloc == f"127.0.0.1:{site.port}"  # the public origin, from X-Forwarded-Host
    assert location.path == "/verify-2fa"
    assert parse_qs(location.query) == {"next": ["/echo/x?a=1"]}
    assert "set-cookie" not in headers
    assert b"raw_path" not in body


def test_api_client_gets_the_gateways_answer(site: Site) -> None:
    # Issue 12 §2.3: behind nginx, programs used to get nginx's generic HTML 401/403 page.
    status, headers, body = raw_request(site.port, "/echo/x", {**ALICE, **JSON})
    assert status == 401
    assert gateway_answer(headers, body)["error"] == "2fa_required"
    assert "location" not in headers
    assert "x-gateway-denial" not in headers  # nginx's copy of the body: the body is enough
    assert headers["cache-control"] == "no-store"
    status, headers, body = raw_request(site.port, "/echo/x", {**ALICE, **JSON, "X-2FA-Code": "000000"})
    assert status == 401
    assert gateway_answer(headers, body)["error"] == "2fa_invalid"
    # Not enrolled: the setup route, as in proxy mode; a browser is sent there.
    status, headers, body = raw_request(site.port, "/echo/x", BOB)
    assert status == 403
    assert gateway_answer(headers, body) == {
        "error": "2fa_not_enrolled",
        "detail": "Two-factor authentication is not set up for this user: enrol first.",
        "setup": "/setup-2fa",
    }
    status, headers, _ = raw_request(site.port, "/echo/x", {**BOB, **HTML})
    assert status == 302
    assert urlsplit(headers["location"]).path == "/setup-2fa"


def test_a_locked_out_program_gets_2fa_locked_and_retry_after(site: Site) -> None:
    # Every wrong code is asked of the gateway once: a front that asked twice would spend two
    # of the user's five attempts per request, and lock erin out on her third code, not her fifth.
    erin = enrol(site.gateway.config, "erin")
    seen = []
    for _ in range(5):
        status, headers, body = raw_request(site.port, "/echo/x", {**ERIN, "X-2FA-Code": "000000"})
        assert_denied(status, body, "a wrong code")
        seen.append((status, gateway_answer(headers, body)["error"]))
    assert seen == [(401, "2fa_invalid")] * 4 + [(403, "2fa_locked")]
    # Locked: even a right code is refused without being judged, with the time to wait.
    status, headers, body = raw_request(site.port, "/echo/x", {**ERIN, **JSON, "X-2FA-Code": totp_now(erin)})
    assert status == 403
    assert gateway_answer(headers, body)["error"] == "2fa_locked"
    assert 0 < int(headers["retry-after"]) <= 900


def test_valid_code_reaches_the_app_with_the_user_and_a_session(site: Site) -> None:
    code = totp_now(site.alice)
    status, headers, body = raw_request(
        site.port, "/echo/x?q=1", {**ALICE, "X-2FA-Code": code, "Remote-User": "mallory"}
    )
    assert status == 200
    seen = echoed(body)
    assert seen["raw_path"] == "/echo/x" and seen["query"] == "q=1"
    assert seen["headers"]["remote-user"] == "alice"  # type: ignore[index]
    assert "x-2fa-code" not in seen["headers"]  # type: ignore[operator]
    # The session the code opened reaches the client (nginx: auth_request_set + add_header;
    # Caddy: its handle_response, as forward_auth's shortcut would drop it).
    cookie = headers["set-cookie"]
    assert cookie.startswith("gateway_session=") and "HttpOnly" in cookie
    session = {"Cookie": cookie.split(";", 1)[0]}

    status, headers, body = raw_request(site.port, "/echo/y", {**ALICE, **session}, method="POST")
    assert status == 200
    assert echoed(body)["headers"]["remote-user"] == "alice"  # type: ignore[index]
    assert "set-cookie" not in headers
    # Replayed: the same code again, without the session.
    status, headers, body = raw_request(site.port, "/echo/x", {**ALICE, "X-2FA-Code": code})
    assert_denied(status, body, "replayed code")
    assert status == 401
    assert gateway_answer(headers, body)["error"] == "2fa_replayed"
    # Someone else's session cookie is no session.
    status, _, body = raw_request(site.port, "/echo/x", {**BOB, **session})
    assert_denied(status, body, "bob with alice's session")


def test_excluded_paths_pass_without_code_and_without_a_user(site: Site) -> None:
    status, headers, body = raw_request(
        site.port, "/public/x", {**ALICE, "Remote-User": "mallory", "Remote_User": "mallory", "Remote.User": "m"}
    )
    assert status == 200
    seen = echoed(body)
    assert seen["raw_path"] == "/public/x"
    # Nobody is vouched for: neither the client's Remote-User nor Caddy 2.6's literal
    # placeholder reaches the app, nor the look-alikes a CGI-style app would read as it.
    for name in ("remote-user", "remote_user", "remote.user"):
        assert name not in seen["headers"]  # type: ignore[operator]
    assert "set-cookie" not in headers
    assert raw_request(site.port, "/api/public/x", ALICE)[0] == 200
    status, _, body = raw_request(site.port, "/api/public/x", ALICE, method="POST")  # "GET /api/public/*"
    assert_denied(status, body, "POST to a GET-only exclusion")


def test_bypass_shapes_are_denied(site: Site) -> None:
    for target in [*BYPASSES, f"http://127.0.0.1:{site.port}/admin"]:
        for who in (ALICE, BOB):
            status, _, body = raw_request(site.port, target, {**who, **HTML})
            assert_denied(status, body, target)


def test_client_cannot_describe_another_request(site: Site) -> None:
    # nginx replaces X-Original-URI; Caddy passes the client's headers to /auth next to the
    # X-Forwarded-Uri it sets. Either way two stories disagree, and the gateway refuses them.
    for spoof in (
        {"X-Forwarded-Uri": "/public/x"},
        {"X-Original-URI": "/public/x"},
        {"X-Original-URL": "http://x/public/x"},
        {"X-Original-URI": "/public/x", "X-Original-Method": "GET"},
        {"X-Original-Method": "GET", "X-Original-URI": "/api/public/x"},
    ):
        status, _, body = raw_request(site.port, "/echo/secret", {**ALICE, **spoof})
        assert_denied(status, body, spoof)
    status, _, body = raw_request(site.port, "/api/public/x", {**ALICE, "X-Original-Method": "GET"}, method="POST")
    assert_denied(status, body, "a POST claiming to be a GET")


def test_gateway_pages_are_reachable(site: Site) -> None:
    status, headers, body = raw_request(site.port, "/verify-2fa?next=/echo/x", {**ALICE, **HTML})
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"raw_path" not in body  # the gateway answered, not the app
    assert raw_request(site.port, "/verify-2fa", HTML)[0] == 401  # still behind the first factor


def test_browser_verify_flow(site: Site) -> None:
    """The redirect, the verify form posted back through the proxy, then the page with the session."""
    carol = enrol(site.gateway.config, "carol")
    status, headers, _ = raw_request(site.port, "/echo/page?a=1", {**CAROL, **HTML})
    assert status == 302
    verify = urlsplit(headers["location"])
    form = urlencode({"code": totp_now(carol), "next": parse_qs(verify.query)["next"][0]})
    # An older browser: Origin but no Sec-Fetch-Site, so the gateway compares Origin with Host.
    status, headers, body = raw_request(
        site.port,
        f"{verify.path}?{verify.query}",
        {
            **CAROL,
            **HTML,
            "Origin": f"http://127.0.0.1:{site.port}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Content-Length": str(len(form)),
        },
        method="POST",
        body=form.encode(),
    )
    assert status == 303, body[:300]
    assert headers["location"] == "/echo/page?a=1"
    session = {"Cookie": headers["set-cookie"].split(";", 1)[0]}
    status, _, body = raw_request(site.port, "/echo/page?a=1", {**CAROL, **HTML, **session})
    assert status == 200
    assert echoed(body)["headers"]["remote-user"] == "carol"  # type: ignore[index]


# -- the store goes away ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FRONTS)
def test_redis_stopped_denies(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, upstream: UpstreamProcess
) -> None:
    redis = RedisServer(need_binary("redis-server"))
    redis.start()
    gateway = front = None
    try:
        config = make_config(tmp_path, store={"url": redis.url, "prefix": kind, "cache_ttl": 0})
        secret = enrol(config, "alice")
        gateway = GatewayServer(config).start()
        front = start(kind, request, gateway, upstream)
        status, headers, _ = raw_request(front.port, "/echo/x", {**ALICE, "X-2FA-Code": totp_now(secret)})
        assert status == 200
        session = {"Cookie": headers["set-cookie"].split(";", 1)[0]}

        redis.stop()
        for extra in (session, {"X-2FA-Code": "123456"}, HTML, {}):
            status, headers, body = raw_request(front.port, "/echo/x", {**ALICE, **extra})
            assert_denied(status, body, extra)
            if kind == "nginx":
                assert status == 500, extra  # the gateway's 503, which auth_request turns into a 500
            elif "text/html" not in extra.get("Accept", ""):
                assert status == 503, extra  # Caddy passes the gateway's answer on
                assert gateway_answer(headers, body)["error"] == "store_unavailable"
    finally:
        if front is not None:
            front.stop()
        if gateway is not None:
            gateway.stop()
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)


# -- issue 9: a raw "#", routing overrides, h2c headers -------------------------------------------

# Each front's own additions: an h2c upgrade (nginx's map), the code's "_" look-alike (Caddy).
OVERRIDES = fronts.OVERRIDES | {"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings", "X_2FA_Code": "000000"}


@pytest.mark.parametrize("target", ["/healthz#/../admin", "/public/x#", "/admin#/public"])
def test_a_raw_fragment_is_400(site: Site, target: str) -> None:
    status, _, body = raw_request(site.port, target, ALICE)
    assert status == 400, target
    assert b"raw_path" not in body


def test_routing_overrides_and_h2c_never_reach_the_app(site: Site) -> None:
    status, _, body = raw_request(site.port, "/public/echo", {**ALICE, **OVERRIDES})
    assert status == 200
    seen = echoed(body)
    assert seen["method"] == "GET" and seen["raw_path"] == "/public/echo"
    assert fronts.reached_the_app(seen["headers"]) == set()


def test_two_authorization_headers_are_refused(site: Site) -> None:
    # The first factor checks the first; an app that reads Authorization might take the second.
    # nginx refuses a duplicate itself, Caddy by its Caddyfile.
    both = [("Authorization", ALICE["Authorization"]), ("Authorization", BOB["Authorization"])]
    status, _, body = raw_request(site.port, "/public/echo", both)
    assert status == 400 and b"raw_path" not in body


# -- WebSocket through forward auth ---------------------------------------------------------------


def test_websocket_with_a_session_reaches_the_app(site: Site) -> None:
    # The question to /auth is a plain GET (Caddy: without the client's Upgrade it opened /auth
    # as a WebSocket, which the gateway refused; nginx: its map relays "websocket" only).
    dave = enrol(site.gateway.config, "dave")
    status, headers, _ = raw_request(site.port, "/echo/x", {**DAVE, "X-2FA-Code": totp_now(dave)})
    assert status == 200
    session = {**DAVE, "Cookie": headers["set-cookie"].split(";", 1)[0], "Remote-User": "mallory"}
    with connect(f"ws://127.0.0.1:{site.port}/ws/chat", additional_headers=session, proxy=None) as ws:
        assert ws.recv(timeout=10) == "hello dave"
        ws.send("hi")
        assert ws.recv(timeout=10) == "echo hi"


@pytest.mark.parametrize("who", [ALICE, BOB, {}], ids=["no session", "not enrolled", "no first factor"])
def test_websocket_without_a_session_is_refused(site: Site, who: dict[str, str]) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{site.port}/ws/chat", additional_headers=who, proxy=None, open_timeout=10)
    assert refused.value.response.status_code in (401, 403)
    assert b"raw_path" not in refused.value.response.body
