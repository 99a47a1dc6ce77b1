"""``GET /auth`` (gateway/forward_auth.py) asked directly, as nginx, Caddy and Traefik ask it,
against a real gateway under uvicorn. The same cases through real nginx and Caddy are in
tests/integration/."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pyotp
import pytest

from tests.conftest import RedisServer, need_binary
from tests.support.inprocess import in_process
from tests.support.servers import GatewayServer, enrol, make_config

HTML = {"Accept": "text/html,application/xhtml+xml"}
NGINX_STYLE = "X-Original-URI"
BYPASSES = [
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "/public/.%2e/admin",
    "//admin",
    "//public/../admin",
    "/public/..;/admin",
    "/public;/../admin",
    "/admin?x=/public",
    "/admin#/public",
    "/public/%2e%2e%2fadmin",
    "/public/..%2fadmin",
    "/public/..%5cadmin",
    "/public\\..\\admin",
    "/public/%252e%252e/admin",
    "/public/%c0%ae%c0%ae/admin",
    "/public/%ef%bc%8e%ef%bc%8e/admin",
    "/public/../../admin",
    "/Public/x",
    "/public",
    "/admin/..%00/public/x",
    "/admin/%2e%2e/public/x",
    "http://127.0.0.1/admin",
    "admin",
    "*",
]


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[GatewayServer]:
    server = GatewayServer(make_config(tmp_path)).start()
    yield server
    server.stop()


@pytest.fixture
def secret(gw: GatewayServer) -> str:
    return enrol(gw.config, "alice")


def ask(
    gw: GatewayServer,
    target: str | None = None,
    method: str | None = None,
    user: str | None = None,
    code: str | None = None,
    style: str = NGINX_STYLE,
    **headers: str,
) -> httpx.Response:
    """One /auth subrequest, without a cookie jar: each call carries exactly these headers."""
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if target is not None:
        sent["X-Original-URI" if style == NGINX_STYLE else "X-Forwarded-Uri"] = target
    if method is not None:
        sent["X-Original-Method" if style == NGINX_STYLE else "X-Forwarded-Method"] = method
    if user is not None:
        sent["Remote-User"] = user
    if code is not None:
        sent["X-2FA-Code"] = code
    return httpx.get(gw.url + "/auth", headers=sent)


def oathtool(secret: str) -> str:
    """A code from an independent implementation (RFC 6238), when oathtool is installed."""
    if shutil.which("oathtool") is None:
        return pyotp.TOTP(secret).now()
    return subprocess.run(
        ["oathtool", "--totp", "-b", secret], capture_output=True, text=True, check=True
    ).stdout.strip()


# -- the answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("style", [NGINX_STYLE, "X-Forwarded-Uri"])
def test_no_identity_is_401_without_location(gw: GatewayServer, style: str) -> None:
    r = ask(gw, "/admin", "GET", style=style, **HTML)
    assert r.status_code == 401
    assert "location" not in r.headers
    assert "remote-user" not in r.headers


def test_no_code_sends_a_browser_to_the_verify_page(gw: GatewayServer, secret: str) -> None:
    r = ask(gw, "/admin/a%20b?x=1&y=/z", "GET", user="alice", **HTML)
    assert r.status_code == 401
    location = urlsplit(r.headers["location"])
    assert location.path == "/verify-2fa"
    assert parse_qs(location.query) == {"next": ["/admin/a%20b?x=1&y=/z"]}
    assert r.headers["cache-control"] == "no-store"
    assert "remote-user" not in r.headers and "set-cookie" not in r.headers


def test_location_uses_the_forwarded_origin(gw: GatewayServer, secret: str) -> None:
    r = ask(
        gw,
        "/admin",
        "GET",
        user="alice",
        style="X-Forwarded-Uri",
        X_Forwarded_Host="app.example.com",
        X_Forwarded_Proto="https",
        **HTML,
    )
    assert r.status_code == 401
    assert r.headers["location"] == "https://app.example.com/verify-2fa?next=/admin"
    assert 'href="https://app.example.com/verify-2fa?next=/admin"' in r.text  # Traefik shows this page
    # A forwarded host that is not a host gives a local Location, not a broken absolute one.
    for bad in ("evil.example?x", "a/b", "user@evil.example", "x#y"):
        r = ask(gw, "/admin", "GET", user="alice", X_Forwarded_Host=bad, **HTML)
        assert r.headers["location"] == "/verify-2fa?next=/admin", bad


def test_api_client_gets_a_plain_401(gw: GatewayServer, secret: str) -> None:
    r = ask(gw, "/admin", "GET", user="alice", Accept="application/json")
    assert r.status_code == 401
    assert r.json()["error"] == "2fa_required"
    assert "location" not in r.headers
    # A browser's form POST is not a navigation to redirect either (proxy mode agrees).
    assert "location" not in ask(gw, "/admin", "POST", user="alice", **HTML).headers


@pytest.mark.parametrize("style", [NGINX_STYLE, "X-Forwarded-Uri"])
def test_valid_code_allows_names_the_user_and_opens_a_session(gw: GatewayServer, secret: str, style: str) -> None:
    r = ask(gw, "/admin", "GET", user="alice", code=oathtool(secret), style=style)
    assert r.status_code == 200
    assert r.headers["remote-user"] == "alice"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("gateway_session=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    session = cookie.split(";", 1)[0]

    again = ask(gw, "/admin/other", "POST", user="alice", style=style, Cookie=session)
    assert again.status_code == 200
    assert again.headers["remote-user"] == "alice"
    assert "set-cookie" not in again.headers
    # A session belongs to the user who opened it.
    assert ask(gw, "/admin", "GET", user="bob", style=style, Cookie=session).status_code in (401, 403)


def test_replayed_code_is_denied(gw: GatewayServer, secret: str) -> None:
    code = pyotp.TOTP(secret).now()
    assert ask(gw, "/admin", "GET", user="alice", code=code).status_code == 200
    r = ask(gw, "/admin", "GET", user="alice", code=code)
    assert r.status_code == 401
    assert r.json()["error"] == "2fa_replayed"
    assert "remote-user" not in r.headers and "set-cookie" not in r.headers


def test_wrong_code_is_denied(gw: GatewayServer, secret: str) -> None:
    r = ask(gw, "/admin", "GET", user="alice", code="000000" if pyotp.TOTP(secret).now() != "000000" else "111111")
    assert r.status_code == 401
    assert r.json()["error"] == "2fa_invalid"


def test_not_enrolled_is_403_pointing_at_setup(gw: GatewayServer) -> None:
    r = ask(gw, "/admin", "GET", user="carol", **HTML)
    assert r.status_code == 403
    assert urlsplit(r.headers["location"]).path == "/setup-2fa"
    assert parse_qs(urlsplit(r.headers["location"]).query) == {"next": ["/admin"]}
    api = ask(gw, "/admin", "GET", user="carol", Accept="application/json")
    assert api.status_code == 403
    assert api.json()["error"] == "2fa_not_enrolled"
    # Not even a code-shaped header lets an un-enrolled user through.
    assert ask(gw, "/admin", "GET", user="carol", code="123456").status_code in (401, 403)


@pytest.mark.parametrize("style", [NGINX_STYLE, "X-Forwarded-Uri"])
def test_excluded_path_passes_without_identity_or_code(gw: GatewayServer, style: str) -> None:
    for target in ("/public/x", "/public/", "/healthz", "/public/x?y=1"):
        r = ask(gw, target, "GET", style=style)
        assert r.status_code == 200, target
        assert "remote-user" not in r.headers  # the gateway vouches for no one here


def test_method_qualified_exclusion_uses_the_original_method(gw: GatewayServer) -> None:
    assert ask(gw, "/api/public/x", "GET").status_code == 200
    assert ask(gw, "/api/public/x", "HEAD").status_code == 200
    for method in ("POST", "DELETE", "get", "G ET", ""):
        r = ask(gw, "/api/public/x", method)
        assert r.status_code in (401, 403), method
    assert ask(gw, "/api/public/x", "POST", style="X-Forwarded-Uri").status_code == 401


def test_without_a_method_header_only_rules_for_every_method_apply(gw: GatewayServer) -> None:
    # nginx's auth subrequest is a GET whatever the client sent: without X-Original-Method
    # the gateway must not take the subrequest's own method for the original one.
    assert ask(gw, "/api/public/x").status_code == 401
    assert ask(gw, "/public/x").status_code == 200


@pytest.mark.parametrize("style", [NGINX_STYLE, "X-Forwarded-Uri"])
def test_bypass_shapes_never_pass_without_a_code(gw: GatewayServer, secret: str, style: str) -> None:
    passed = []
    for target in BYPASSES:
        for user in (None, "alice"):
            r = ask(gw, target, "GET", user=user, style=style)
            if r.status_code not in (400, 401, 403) or "remote-user" in r.headers:
                passed.append((target, user, r.status_code))
    assert passed == []


@pytest.mark.parametrize("header", ["X-Original-URI", "X-Forwarded-Uri", "X-Original-URL"])
@pytest.mark.parametrize(
    "target", ["/healthz#/../admin", "/public/x#", "/admin#/public", "/healthz?a#b", "http://app/healthz#/../admin"]
)
def test_a_raw_fragment_in_the_original_target_is_400(gw: GatewayServer, secret: str, header: str, target: str) -> None:
    # nginx relays "/healthz#/../admin" byte for byte in $request_uri and to the app: judging
    # the part before "#" would judge another path than the one the app may resolve.
    r = httpx.get(gw.url + "/auth", headers={header: target, "X-Original-Method": "GET", "Accept": "text/html"})
    assert r.status_code == 400
    assert "remote-user" not in r.headers and "location" not in r.headers
    r = httpx.get(gw.url + "/auth", headers={header: target, "Remote-User": "alice"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_request"
    assert "remote-user" not in r.headers


def test_no_original_uri_is_refused(gw: GatewayServer) -> None:
    r = httpx.get(gw.url + "/auth")
    assert r.status_code == 403
    assert r.json()["error"] == "bad_request"


def test_disagreeing_descriptions_are_refused(gw: GatewayServer, secret: str) -> None:
    # Caddy and Traefik pass the client's headers to /auth: a client adds an X-Original-URI of
    # an excluded path next to the X-Forwarded-Uri the proxy set for the real one.
    for extra in ({"X-Original-URI": "/public/x"}, {"X-Original-URL": "http://app/public/x"}):
        r = ask(gw, "/admin", "GET", style="X-Forwarded-Uri", **{k.replace("-", "_"): v for k, v in extra.items()})
        assert r.status_code == 403, extra
    r = ask(gw, "/api/public/x", "POST", style="X-Forwarded-Uri", X_Original_Method="GET")
    assert r.status_code == 403
    # Two copies of one header that disagree are the same story told twice.
    two = httpx.get(gw.url + "/auth", headers=[("X-Original-URI", "/public/x"), ("X-Original-URI", "/admin")])
    assert two.status_code == 403
    # Agreeing descriptions are fine.
    assert ask(gw, "/public/x", "GET", style="X-Forwarded-Uri", X_Original_URI="/public/x").status_code == 200


def test_absolute_original_url(gw: GatewayServer) -> None:
    assert (
        httpx.get(gw.url + "/auth", headers={"X-Original-URL": "https://app.example.com/public/x?y"}).status_code == 200
    )
    assert httpx.get(gw.url + "/auth", headers={"X-Original-URL": "https://app.example.com/admin"}).status_code == 401


def test_untrusted_peer_is_refused_even_for_an_excluded_path(tmp_path: Path) -> None:
    config = make_config(tmp_path, server={"trusted_proxies": ["10.255.255.1/32"]})
    secret = enrol(config, "alice")
    server = GatewayServer(config).start()
    try:
        for headers in (
            {"X-Original-URI": "/public/x", "X-Original-Method": "GET"},
            {"X-Forwarded-Uri": "/healthz", "X-Forwarded-Method": "GET"},
            {"X-Original-URI": "/admin", "Remote-User": "alice", "X-2FA-Code": pyotp.TOTP(secret).now()},
        ):
            r = httpx.get(server.url + "/auth", headers=headers)
            assert r.status_code == 403, headers
            assert r.json()["error"] == "untrusted_peer"
            assert "remote-user" not in r.headers and "set-cookie" not in r.headers
    finally:
        server.stop()


def test_store_down_is_503_never_200(tmp_path: Path) -> None:
    redis = RedisServer(need_binary("redis-server"))
    redis.start()
    server = None
    try:
        # cache_ttl = 0: no in-process cache may answer for the store, so the outage shows at once.
        config = make_config(tmp_path, store={"url": redis.url, "prefix": "fa", "cache_ttl": 0})
        secret = enrol(config, "alice")
        server = GatewayServer(config).start()
        totp = pyotp.TOTP(secret)
        opened = ask(server, "/admin", "GET", user="alice", code=totp.now())
        assert opened.status_code == 200
        session = opened.headers["set-cookie"].split(";", 1)[0]

        redis.stop()
        for kwargs in ({"code": totp.at(time.time() + 30)}, {"Cookie": session}, {}):
            r = ask(server, "/admin", "GET", user="alice", **kwargs)
            assert r.status_code == 503, kwargs
            assert r.json()["error"] == "store_unavailable"
            assert "remote-user" not in r.headers
        # Excluded paths need no store and still pass.
        assert ask(server, "/public/x", "GET").status_code == 200
    finally:
        if server is not None:
            server.stop()
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)


# -- in-process (httpx.ASGITransport, the real SQLite store) ---------------------------------------


async def test_forward_auth_in_process(tmp_path: Path) -> None:
    async with in_process(make_config(tmp_path)) as gw:
        c = gw.client
        secret = await gw.enrol("alice")
        target = {"X-Original-URI": "/admin?x=1", "X-Original-Method": "GET", "Remote-User": "alice"}
        r = await c.get("/auth", headers={**target, **HTML})
        assert r.status_code == 401 and r.headers["location"] == "http://gw.test/verify-2fa?next=/admin%3Fx%3D1"
        r = await c.get("/auth", headers=target)
        assert r.status_code == 401 and "location" not in r.headers and r.json()["error"] == "2fa_required"
        r = await c.get("/auth", headers={**target, "X-2FA-Code": pyotp.TOTP(secret).now()})
        assert r.status_code == 200 and r.headers["remote-user"] == "alice"
        assert r.headers["set-cookie"].startswith("gateway_session=") and "HttpOnly" in r.headers["set-cookie"]
        session = r.headers["set-cookie"].split(";")[0]
        r = await c.get("/auth", headers={**target, "Cookie": session})
        assert r.status_code == 200 and "set-cookie" not in r.headers
        r = await c.get("/auth", headers={**target, "X-Original-URI": "/a#b"})
        assert r.status_code == 400
        metrics = (await c.get("/_gateway/metrics")).text
        assert 'gateway_decisions_total{mode="auth",reason="session"} 1.0' in metrics
        assert 'gateway_decisions_total{mode="auth",reason="code"} 1.0' in metrics


async def test_forward_auth_in_process_refuses_an_untrusted_peer(tmp_path: Path) -> None:
    async with in_process(make_config(tmp_path), peer=("203.0.113.9", 5000)) as gw:
        r = await gw.client.get("/auth", headers={"X-Original-URI": "/public/x", "X-Original-Method": "GET"})
        assert r.status_code == 403 and r.json()["error"] == "untrusted_peer"


async def test_a_host_outside_allowed_hosts_is_refused_even_on_an_excluded_path(tmp_path: Path) -> None:
    # Attacks (issue 12 review): with allowed_hosts set and no public_url, nginx relayed
    # "Host: evil.example" as X-Forwarded-Host; /auth wrote it into the verify redirect, and
    # passed an excluded path (a password-reset page) to the app with that Host.
    config = make_config(tmp_path, server={"allowed_hosts": ["app.example.com"]})
    async with in_process(config) as gw:
        await gw.enrol("alice")
        target = {"X-Original-URI": "/admin", "X-Original-Method": "GET", "Remote-User": "alice", **HTML}
        r = await gw.client.get("/auth", headers={**target, "X-Forwarded-Host": "evil.example"})
        assert r.status_code == 403 and "location" not in r.headers
        public = {"X-Original-URI": "/public/reset", "X-Original-Method": "GET"}
        r = await gw.client.get("/auth", headers={**public, "X-Forwarded-Host": "evil.example", "Accept": "x/y"})
        assert r.status_code == 403 and r.json()["error"] == "misdirected_request"
        r = await gw.client.get("/auth", headers={**public, "X-Forwarded-Host": "app.example.com:8o"})
        assert r.status_code == 400 and r.json()["error"] == "malformed_request"
        assert (
            await gw.client.get("/auth", headers={**public, "X-Forwarded-Host": "app.example.com"})
        ).status_code == 200
        r = await gw.client.get("/auth", headers={**target, "X-Forwarded-Host": "app.example.com"})
        assert r.status_code == 401 and r.headers["location"] == "http://app.example.com/verify-2fa?next=/admin"
