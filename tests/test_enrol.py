"""gateway/enrol.py against a real gateway (uvicorn) in front of a real upstream process.

Codes come from an independent generator, ``oathtool``; the QR PNG is read back by ``zbarimg``.
The gateway's clock is a test clock, so pending expiry and time steps need no sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import subprocess
import time
from collections.abc import Iterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pyotp
import pytest

from gateway.errors import StoreError
from gateway.http import negotiate
from gateway.store.sqlite import SqliteStore
from tests.conftest import need_binary
from tests.support.clock import Clock
from tests.support.inprocess import UPSTREAM, InProcess, in_process
from tests.support.servers import GatewayServer, UpstreamProcess, enrol, make_config

USER = "alice"


@pytest.fixture
def clock() -> Clock:
    return Clock(float(int(time.time()) // 30 * 30 + 5))  # early in a step: no step turns over mid-test


@pytest.fixture
def gateway(tmp_path: Path, upstream: UpstreamProcess, clock: Clock) -> Iterator[GatewayServer]:
    server = GatewayServer(make_config(tmp_path, upstream=upstream.url), clock=clock).start()
    yield server
    server.stop()


def client(server: GatewayServer, user: str | None = USER, **kwargs: Any) -> httpx.Client:
    """A client that keeps no cookies: each test says which session cookie a request carries."""
    kwargs.setdefault("headers", {"Remote-User": user} if user else {})
    no_jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.Client(base_url=server.url, timeout=10, cookies=no_jar, **kwargs)


def cookie(session: str) -> dict[str, str]:
    return {"Cookie": f"gateway_session={session}"}


def oathtool(secret: str, at: float) -> str:
    """The code at time ``at`` from OATH Toolkit: an implementation independent of pyotp."""
    binary = need_binary("oathtool")
    return subprocess.check_output([binary, "--totp", "-b", secret, "--now", f"@{int(at)}"], text=True).strip()


def secret_of(uri: str) -> str:
    return parse_qs(urlsplit(uri).query)["secret"][0]


def start_setup(c: httpx.Client) -> dict[str, Any]:
    r = c.post("/setup-2fa", headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def enrol_by_api(c: httpx.Client, clock: Clock) -> tuple[str, list[str], str]:
    """Setup then verify: (secret, recovery codes, session id)."""
    secret = secret_of(start_setup(c)["otpauth_uri"])
    r = c.post("/verify-2fa", json={"code": oathtool(secret, clock.now)})
    assert r.status_code == 200, r.text
    return secret, r.json()["recovery_codes"], r.cookies["gateway_session"]


def decode_qr(png: bytes, tmp_path: Path) -> str:
    path = tmp_path / "qr.png"
    path.write_bytes(png)
    out = subprocess.run([need_binary("zbarimg"), "--raw", "-q", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# -- the API-only flow -------------------------------------------------------------------------


def test_api_flow_setup_oathtool_verify_then_protected_request(
    gateway: GatewayServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[httpx.Response] = []
    with client(gateway, event_hooks={"response": [seen.append]}) as c:
        assert c.get("/echo/private").json()["error"] == "2fa_not_enrolled"

        setup = start_setup(c)
        uri = setup["otpauth_uri"]
        assert set(setup) == {"otpauth_uri", "qr_png", "expires_in"}
        assert setup["expires_in"] == 600
        assert re.fullmatch(r"otpauth://totp/Gateway:alice\?secret=[A-Z2-7]{32}&issuer=Gateway", uri)
        secret = secret_of(uri)

        code = oathtool(secret, clock.now)
        r = c.post("/verify-2fa", json={"code": code})
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "enrolled"
        codes = body["recovery_codes"]
        assert len(codes) == 10 and len(set(codes)) == 10
        assert all(re.fullmatch(r"([0-9A-Z]{4}-){5}[0-9A-Z]{4}", code) for code in codes)  # 24 x 5 bits
        assert r.headers["cache-control"] == "no-store"
        session = r.cookies["gateway_session"]

        r = c.get("/echo/private", headers=cookie(session))
        assert r.status_code == 200
        echoed = dict((k.lower(), v) for k, v in r.json()["headers"])
        assert echoed["remote-user"] == USER
        assert "gateway_session" not in echoed.get("cookie", "")

        # The code was used: the same one again is a replay, on any route.
        assert c.post("/verify-2fa", json={"code": code}).json()["error"] == "2fa_replayed"

    for response in seen:  # never a secret, URI or recovery code in a header
        headers = " ".join(f"{k}: {v}" for k, v in response.headers.multi_items())
        assert secret not in headers and "otpauth" not in headers
        assert not any(rc in headers for rc in codes)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gateway"))
    for sensitive in (secret, code, *codes, session):
        assert sensitive not in logged
    assert "enrolment.confirmed user='alice'" in logged  # the audit event (gateway/audit.py)


def test_png_decodes_to_the_same_uri_as_the_json(gateway: GatewayServer, clock: Clock, tmp_path: Path) -> None:
    with client(gateway) as c:
        setup = start_setup(c)
        prefix = "data:image/png;base64,"
        assert setup["qr_png"].startswith(prefix)
        assert decode_qr(base64.b64decode(setup["qr_png"][len(prefix) :]), tmp_path) == setup["otpauth_uri"]

        r = c.post("/setup-2fa", headers={"Accept": "image/png"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/png" and r.headers["cache-control"] == "no-store"
        uri = decode_qr(r.content, tmp_path)
        assert uri.startswith("otpauth://totp/Gateway:alice?secret=") and uri != setup["otpauth_uri"]
        # The newest pending secret is the one that counts.
        r = c.post("/verify-2fa", json={"code": oathtool(secret_of(uri), clock.now)})
        assert r.json()["status"] == "enrolled"


# -- recovery codes ----------------------------------------------------------------------------


def test_recovery_code_works_once_and_dies_on_regeneration(gateway: GatewayServer, clock: Clock) -> None:
    with client(gateway) as c:
        secret, codes, _ = enrol_by_api(c, clock)

        r = c.post("/verify-2fa", json={"recovery_code": codes[0].lower()})  # case and dashes are forgiven
        assert r.status_code == 200
        assert r.json() == {"status": "verified", "expires_in": 43200, "recovery_codes_left": 9}
        assert c.get("/echo/x", headers=cookie(r.cookies["gateway_session"])).status_code == 200
        assert c.post("/verify-2fa", json={"recovery_code": codes[0]}).status_code == 401

        assert c.post("/recovery-codes", json={}).status_code == 400
        assert c.post("/recovery-codes", json={"code": "000000"}).status_code == 401
        clock.advance(30)
        r = c.post("/recovery-codes", json={"code": oathtool(secret, clock.now)})
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        assert r.json()["status"] == "regenerated"
        fresh = r.json()["recovery_codes"]
        assert len(fresh) == 10 and not set(fresh) & set(codes)

        assert c.post("/verify-2fa", json={"recovery_code": codes[1]}).json()["error"] == "2fa_invalid"
        assert c.post("/verify-2fa", json={"recovery_code": fresh[0]}).json()["status"] == "verified"


# -- re-enrolment and pending secrets ----------------------------------------------------------


def test_reenrolment_needs_a_code_and_never_replaces_the_active_secret_early(
    gateway: GatewayServer, clock: Clock
) -> None:
    old = enrol(gateway.config, USER)
    with client(gateway) as c:
        r = c.post("/setup-2fa", headers={"Accept": "application/json"})
        assert r.status_code == 403 and r.json()["error"] == "2fa_already_enrolled"
        assert c.post("/setup-2fa", json={"code": "123456"}).status_code == 403

        r = c.post("/setup-2fa", json={"code": oathtool(old, clock.now)})
        assert r.status_code == 200
        new = secret_of(r.json()["otpauth_uri"])

        # Until the new secret is verified, the old one is the active one.
        clock.advance(30)
        assert c.get("/echo/x", headers={"X-2FA-Code": oathtool(old, clock.now)}).status_code == 200
        clock.advance(30)
        r = c.post("/verify-2fa", json={"code": oathtool(new, clock.now)})
        assert r.json()["status"] == "enrolled"
        clock.advance(30)
        assert c.get("/echo/x", headers={"X-2FA-Code": oathtool(old, clock.now)}).status_code == 401
        assert c.get("/echo/x", headers={"X-2FA-Code": oathtool(new, clock.now)}).status_code == 200


def test_concurrent_first_codes_enrol_once(gateway: GatewayServer, clock: Clock) -> None:
    """RFC 6238 §5.2 holds for the first code too: of four simultaneous verifications with one
    code, exactly one activates the secret, issues recovery codes and opens a session."""
    from concurrent.futures import ThreadPoolExecutor

    with client(gateway) as c:
        secret = secret_of(start_setup(c)["otpauth_uri"])
    code = oathtool(secret, clock.now)

    def verify(_: int) -> httpx.Response:
        with client(gateway) as c:
            return c.post("/verify-2fa", json={"code": code})

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(verify, range(4)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 401, 401, 401], [r.text for r in answers]
    [won] = [r for r in answers if r.status_code == 200]
    assert {r.json()["error"] for r in answers if r is not won} <= {"2fa_replayed", "2fa_invalid"}
    # The one set of recovery codes shown is the one that works.
    with client(gateway) as c:
        r = c.post("/verify-2fa", json={"recovery_code": won.json()["recovery_codes"][0]})
        assert r.status_code == 200 and r.json()["status"] == "verified"


def test_a_new_authenticator_ends_every_earlier_session(gateway: GatewayServer, clock: Clock) -> None:
    with client(gateway) as c:
        old, codes, first = enrol_by_api(c, clock)
        clock.advance(30)
        second = c.get("/echo/x", headers={"X-2FA-Code": oathtool(old, clock.now)}).cookies["gateway_session"]
        for session in (first, second):
            assert c.get("/echo/x", headers=cookie(session)).status_code == 200
        # Replacing a lost phone: re-enrol with a recovery code, verify the new secret.
        r = c.post("/setup-2fa", json={"recovery_code": codes[0]}, headers={"Accept": "application/json"})
        new = secret_of(r.json()["otpauth_uri"])
        clock.advance(30)
        r = c.post("/verify-2fa", json={"code": oathtool(new, clock.now)}, headers=cookie(first))
        assert r.json()["status"] == "enrolled"
        third = r.cookies["gateway_session"]
        for session in (first, second):
            assert c.get("/echo/x", headers=cookie(session)).json()["error"] == "2fa_required"
        assert c.get("/echo/x", headers=cookie(third)).status_code == 200


def test_reenrolment_with_a_recovery_code(gateway: GatewayServer, clock: Clock) -> None:
    with client(gateway) as c:
        _, codes, _ = enrol_by_api(c, clock)
        r = c.post("/setup-2fa", data={"recovery_code": codes[3]}, headers={"Accept": "application/json"})
        assert r.status_code == 200 and "otpauth_uri" in r.json()
        assert c.post("/setup-2fa", json={"recovery_code": codes[3]}).status_code == 403  # used up


def test_pending_enrolment_expires(gateway: GatewayServer, clock: Clock) -> None:
    with client(gateway) as c:
        secret = secret_of(start_setup(c)["otpauth_uri"])
        clock.advance(601)
        r = c.post("/verify-2fa", json={"code": oathtool(secret, clock.now)})
        assert r.status_code == 403
        assert r.json()["error"] == "2fa_not_enrolled" and r.json()["setup"] == "/setup-2fa"


def test_a_wrong_first_code_shows_the_same_qr_code_again(gateway: GatewayServer, clock: Clock) -> None:
    with client(gateway, headers={"Remote-User": USER, "Accept": "text/html"}) as c:
        page = c.post("/setup-2fa", data={"next": "/echo/back"}).text
        secret = re.search(r'id="secret"[^>]*>([A-Z2-7 ]+)<', page)
        assert secret is not None
        again = c.post("/verify-2fa", data={"code": "000000", "next": "/echo/back"})
        assert again.status_code == 401 and 'role="alert"' in again.text
        assert secret.group(1) in again.text
        r = c.post("/verify-2fa", data={"code": oathtool(secret.group(1).replace(" ", ""), clock.now)})
        assert r.status_code == 200 and "recovery-codes" in r.text


# -- lockout, identity, bodies, store ----------------------------------------------------------


def test_five_wrong_codes_lock_the_user_out(gateway: GatewayServer, clock: Clock) -> None:
    secret = enrol(gateway.config, USER)
    with client(gateway) as c:
        for _ in range(4):
            assert c.post("/verify-2fa", json={"code": "000000"}).status_code == 401
        # The fifth wrong code uses the last attempt: its answer says locked, not "wrong" (issue 10).
        fifth = c.post("/verify-2fa", json={"code": "000000"})
        assert fifth.status_code == 429 and fifth.json()["error"] == "2fa_locked" and "retry-after" in fifth.headers
        r = c.post("/verify-2fa", json={"code": oathtool(secret, clock.now)})
        assert r.status_code == 429 and r.json()["error"] == "2fa_locked"
        assert 0 < int(r.headers["retry-after"]) <= 900
        assert c.post("/recovery-codes", json={"code": oathtool(secret, clock.now)}).status_code == 429
        clock.advance(901)
        assert c.post("/verify-2fa", json={"code": oathtool(secret, clock.now)}).status_code == 200


@pytest.mark.parametrize("route", ["/setup-2fa", "/verify-2fa", "/recovery-codes", "/logout-2fa"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_every_route_needs_an_identity(gateway: GatewayServer, route: str, method: str) -> None:
    with client(gateway, user=None) as c:
        r = c.request(method, route, json={"code": "123456"} if method == "POST" else None)
        assert r.status_code == 401 and r.json()["error"] == "identity_required"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"[1, 2]"),
        ("application/json", b"{not json"),
        ("application/json", b'{"code": 123456}'),
        ("application/json", b"[" * 5000 + b"]" * 5000),
        ("text/plain", b"code=123456"),
        ("application/x-www-form-urlencoded", b"code=%ff%fe"),
        ("multipart/form-data; boundary=x", b"--x\r\nnot a part"),
        ("application/json", b'{"code": "' + b"1" * 20000 + b'"}'),
        # A field given twice: which one would another reader of the request have taken?
        ("application/json", b'{"code": "123456", "code": "654321"}'),
        ("application/x-www-form-urlencoded", b"code=123456&code=654321"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="code"\r\n\r\n1\r\n'
            b'--x\r\nContent-Disposition: form-data; name="code"\r\n\r\n2\r\n--x--\r\n',
        ),
        ("application/x-www-form-urlencoded", b"&".join(b"f%d=v" % i for i in range(21))),
    ],
)
def test_malformed_bodies_are_400(gateway: GatewayServer, content_type: str, body: bytes) -> None:
    with client(gateway) as c:
        r = c.post("/verify-2fa", content=body, headers={"Content-Type": content_type})
        assert r.status_code == 400 and r.json()["error"] == "invalid_input"


@pytest.mark.parametrize("query", ["&".join(f"q{i}=1" for i in range(21)), "next=/a&next=/b"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_too_many_or_duplicated_query_parameters_are_400(gateway: GatewayServer, query: str, method: str) -> None:
    """Issue 10.5: 21 parameters were a 500 and a traceback."""
    with client(gateway) as c:
        r = c.request(method, f"/verify-2fa?{query}", json={})
        assert r.status_code == 400 and r.json()["error"] == "invalid_input"


def test_forms_urlencoded_and_multipart(gateway: GatewayServer, clock: Clock) -> None:
    secret = enrol(gateway.config, USER)
    with client(gateway) as c:
        assert c.post("/verify-2fa", data={"code": oathtool(secret, clock.now)}).status_code == 200
        clock.advance(30)
        r = c.post("/verify-2fa", files={"code": (None, oathtool(secret, clock.now))})
        assert r.status_code == 200 and r.json()["status"] == "verified"


class FlakyStore(SqliteStore):
    broken = False

    async def get_secret(self, user: str) -> bytes | None:
        if self.broken:
            raise StoreError("the disk is gone")
        return await super().get_secret(user)


def test_store_outage_is_503_never_500(tmp_path: Path, upstream: UpstreamProcess) -> None:
    store = FlakyStore(str(tmp_path / "flaky.db"), create=True)  # a new store: the gateway may make it
    server = GatewayServer(make_config(tmp_path, upstream=upstream.url), store=store).start()
    try:
        store.broken = True
        with client(server) as c:
            for route in ("/setup-2fa", "/verify-2fa", "/recovery-codes"):
                r = c.post(route, json={"code": "123456"})
                assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
            assert c.get("/setup-2fa", headers={"Accept": "text/html"}).status_code == 503
    finally:
        server.stop()


def test_other_methods_are_405(gateway: GatewayServer) -> None:
    with client(gateway) as c:
        r = c.put("/verify-2fa", json={})
        assert r.status_code == 405 and "POST" in r.headers["allow"]


# -- sessions ------------------------------------------------------------------------------------


def test_logout_revokes_the_session_and_clears_the_cookie(gateway: GatewayServer, clock: Clock) -> None:
    with client(gateway) as c:
        _, _, session = enrol_by_api(c, clock)
        jar = cookie(session)
        assert c.get("/echo/x", headers=jar).status_code == 200
        r = c.post("/logout-2fa", json={}, headers=jar)
        assert r.status_code == 200 and r.json() == {"status": "signed_out"}
        assert "Max-Age=0" in r.headers["set-cookie"]
        assert c.get("/echo/x", headers=jar).status_code == 401


def test_a_new_session_revokes_the_one_the_browser_held(gateway: GatewayServer, clock: Clock) -> None:
    with client(gateway) as c:
        secret, _, first = enrol_by_api(c, clock)
        clock.advance(30)
        r = c.post("/verify-2fa", json={"code": oathtool(secret, clock.now)}, headers=cookie(first))
        assert r.cookies["gateway_session"] != first
        assert c.get("/echo/x", headers=cookie(first)).status_code == 401


# -- browsers ----------------------------------------------------------------------------------


def test_browser_flow_with_plain_forms(gateway: GatewayServer, clock: Clock) -> None:
    """What Chromium does in tests/integration, as plain HTTP: redirects, forms, cookie."""
    html = {"Remote-User": USER, "Accept": "text/html"}
    with client(gateway, headers=html) as c:
        r = c.get("/echo/deep?q=1")
        assert r.status_code == 302 and r.headers["location"] == "/setup-2fa?next=/echo/deep%3Fq%3D1"
        page = c.get(r.headers["location"])
        assert page.status_code == 200 and 'name="next" value="/echo/deep?q=1"' in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
        assert "http://" not in page.text and "https://" not in page.text  # no external assets

        qr = c.post("/setup-2fa", data={"next": "/echo/deep?q=1"})
        match = re.search(r'id="secret"[^>]*>([A-Z2-7 ]+)<', qr.text)
        assert qr.status_code == 200 and match and 'src="data:image/png;base64,' in qr.text
        secret = match.group(1).replace(" ", "")
        done = c.post("/verify-2fa", data={"code": oathtool(secret, clock.now), "next": "/echo/deep?q=1"})
        assert done.status_code == 200 and done.text.count("<li><code>") == 10
        assert 'href="/echo/deep?q=1"' in done.text
        jar = {**html, **cookie(done.cookies["gateway_session"])}
        assert c.get("/echo/deep?q=1", headers=jar).json()["query"] == "q=1"

        clock.advance(30)
        assert c.get("/verify-2fa?next=//evil.example").status_code == 200
        r = c.post("/verify-2fa", data={"code": oathtool(secret, clock.now), "next": "//evil.example"})
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert "gateway_session=" in r.headers["set-cookie"]


def test_reenrolment_pages(gateway: GatewayServer, clock: Clock) -> None:
    secret = enrol(gateway.config, USER)
    with client(gateway, headers={"Remote-User": USER, "Accept": "text/html"}) as c:
        page = c.get("/setup-2fa")
        assert page.status_code == 200 and "already on" in page.text and 'name="recovery_code"' in page.text
        refused = c.post("/setup-2fa", data={"code": "000000"})
        assert refused.status_code == 403 and 'role="alert"' in refused.text and 'id="secret"' not in refused.text
        allowed = c.post("/setup-2fa", data={"code": oathtool(secret, clock.now)})
        assert allowed.status_code == 200 and 'id="secret"' in allowed.text


def test_verify_page_sends_an_unenrolled_user_to_setup(gateway: GatewayServer) -> None:
    with client(gateway, headers={"Remote-User": USER, "Accept": "text/html"}) as c:
        r = c.get("/verify-2fa?next=/a/b")
        assert r.status_code == 303 and r.headers["location"] == "/setup-2fa?next=/a/b"


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"Origin": "http://evil.example"}, False),
        ({"Origin": "null"}, False),
        ({"Sec-Fetch-Site": "cross-site"}, False),
        ({"Sec-Fetch-Site": "same-site"}, False),
        ({"Sec-Fetch-Site": "cross-site", "Origin": "{self}"}, False),
        ({"Sec-Fetch-Site": "same-origin", "Origin": "{self}"}, True),
        ({"Sec-Fetch-Site": "none"}, True),
        ({"Origin": "{self}"}, True),
        ({}, True),  # not a browser: curl, scripts
    ],
)
def test_cross_origin_posts_are_refused(gateway: GatewayServer, headers: dict[str, str], allowed: bool) -> None:
    headers = {k: v.replace("{self}", gateway.url) for k, v in headers.items()}
    with client(gateway) as c:
        for route in ("/setup-2fa", "/verify-2fa", "/recovery-codes", "/logout-2fa"):
            r = c.post(route, data={"code": "123456"}, headers=headers)
            assert (r.status_code != 403 or r.json()["error"] != "csrf_failed") is allowed, (route, r.text)


def test_public_url_origin_is_accepted(tmp_path: Path, upstream: UpstreamProcess) -> None:
    config = make_config(tmp_path, upstream=upstream.url, server={"public_url": "https://2fa.example.org"})
    server = GatewayServer(config).start()
    try:
        # As behind a front proxy (trusted): Host is the gateway's address, the public host is
        # X-Forwarded-Host, which the host policy (hosts.py) checks against public_url.
        front = {"Remote-User": USER, "X-Forwarded-Host": "2fa.example.org", "X-Forwarded-Proto": "https"}
        with client(server, headers=front) as c:
            r = c.post("/logout-2fa", json={}, headers={"Origin": "https://2fa.example.org"})
            assert r.status_code == 200
            r = c.post("/logout-2fa", json={}, headers={"Origin": "https://evil.example.org"})
            assert r.status_code == 403 and r.json()["error"] == "csrf_failed"
    finally:
        server.stop()


# -- content negotiation for setup (gateway/http.py) ---------------------------------------------


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("image/png", "image/png"),
        ("image/*", "image/png"),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8", "text/html"),
        ("application/json, text/html;q=0.5", "application/json"),
        ("text/html;q=0.1, image/png;q=0.2", "image/png"),
        ("text/plain", "application/json"),
        ("image/png;q=nan, text/html;q=2", "application/json"),
    ],
)
def test_negotiate(accept: str | None, chosen: str) -> None:
    assert negotiate(accept, ("application/json", "image/png", "text/html")) == chosen


# -- in-process (httpx.ASGITransport, the real SQLite store) ---------------------------------------

BROWSER = {"Remote-User": USER, "Accept": "text/html"}


async def enrol_in_process(gw: InProcess) -> tuple[pyotp.TOTP, list[str]]:
    """Setup then verify through the app: (the authenticator, the recovery codes)."""
    r = await gw.client.post("/setup-2fa", headers={"Remote-User": USER, "Accept": "application/json"})
    totp = pyotp.TOTP(secret_of(r.json()["otpauth_uri"]))
    r = await gw.client.post("/verify-2fa", json={"code": totp.now()}, headers={"Remote-User": USER})
    assert r.status_code == 200, r.text
    gw.client.cookies.clear()
    return totp, r.json()["recovery_codes"]


async def test_a_wrong_recovery_code_is_named_and_its_form_stays_open(tmp_path: Path) -> None:
    """Issue 12 §2.4: it was reported as a wrong 6-digit code, with the recovery form closed."""
    async with in_process(make_config(tmp_path, upstream=UPSTREAM)) as gw:
        await enrol_in_process(gw)
        r = await gw.client.post("/verify-2fa", data={"recovery_code": "AAAAA-BBBBB"}, headers=BROWSER)
        assert r.status_code == 401
        assert "recovery code is wrong" in r.text and "6-digit code is wrong" not in r.text
        assert re.search(r"<details open>\s*<summary>Use a recovery code instead", r.text)
        # A wrong 6-digit code still says so, with the recovery form closed.
        r = await gw.client.post("/verify-2fa", data={"code": "000000"}, headers=BROWSER)
        assert r.status_code == 401 and "code is wrong or expired" in r.text and "<details open>" not in r.text
        # Re-enrolment with a recovery code says the same (setup_start.html).
        r = await gw.client.post("/setup-2fa", data={"recovery_code": "AAAAA-BBBBB"}, headers=BROWSER)
        assert r.status_code == 403 and "recovery code is wrong" in r.text
        assert re.search(r"<details open>\s*<summary>I no longer have my authenticator", r.text)
        # Programs get the same JSON as before.
        r = await gw.client.post("/verify-2fa", json={"recovery_code": "AAAAA-BBBBB"}, headers={"Remote-User": USER})
        assert r.status_code == 401 and r.json()["error"] == "2fa_invalid"


async def test_a_recovery_code_login_says_how_many_are_left(tmp_path: Path) -> None:
    """Issue 12 §2.4: the JSON said it, the page redirected without a word."""
    async with in_process(make_config(tmp_path, upstream=UPSTREAM)) as gw:
        _, codes = await enrol_in_process(gw)
        r = await gw.client.post("/verify-2fa", data={"recovery_code": codes[0], "next": "/app/x?y=1"}, headers=BROWSER)
        assert r.status_code == 200
        assert re.search(r'id="codes-left">9</strong> recovery codes left', r.text)
        assert 'id="continue" href="/app/x?y=1"' in r.text
        assert "gateway_session=" in r.headers["set-cookie"]
        for used in codes[1:8]:
            r = await gw.client.post("/verify-2fa", data={"recovery_code": used}, headers=BROWSER)
        assert re.search(r'id="codes-left">2</strong> recovery codes left', r.text)
        assert 'href="/recovery-codes?next=/"' in r.text  # running low: make a new set


async def test_the_codes_page_offers_copy_and_download_allowed_by_the_csp(tmp_path: Path) -> None:
    async with in_process(make_config(tmp_path, upstream=UPSTREAM)) as gw:
        r = await gw.client.post("/setup-2fa", headers=BROWSER)
        secret = re.search(r'id="secret"[^>]*>([A-Z2-7 ]+)<', r.text)
        assert secret
        r = await gw.client.post(
            "/verify-2fa", data={"code": pyotp.TOTP(secret.group(1).replace(" ", "")).now()}, headers=BROWSER
        )
        assert r.status_code == 200 and r.text.count("<li><code>") == 10
        assert 'id="copy-codes"' in r.text and 'id="download-codes"' in r.text
        script = re.search(r"<script>(.*?)</script>", r.text, re.S)
        assert script and "navigator.clipboard" in script.group(1) and "new Blob" in script.group(1)
        digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
        assert f"script-src 'sha256-{digest}'" in r.headers["content-security-policy"]
        assert not re.search(r"\son[a-z]+=", r.text)  # no inline handler: the CSP would block it


async def test_pages_in_process_keep_their_http_contract(tmp_path: Path) -> None:
    """What the Starlette router must answer as the hand-written one did."""
    async with in_process(make_config(tmp_path, upstream=UPSTREAM)) as gw:
        c = gw.client
        r = await c.put("/verify-2fa", json={}, headers={"Remote-User": USER})
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
        assert r.json()["error"] == "method_not_allowed"
        r = await c.head("/setup-2fa", headers=BROWSER)
        assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8" and r.content == b""
        r = await c.post(
            "/verify-2fa",
            content=b"x" * (16 * 1024 + 1),
            headers={"Remote-User": USER, "Content-Type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"] == "invalid_input"
        r = await c.post("/logout-2fa", json={}, headers={"Remote-User": USER, "Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"] == "csrf_failed"
        r = await c.post("/logout-2fa", json={}, headers={"Remote-User": USER, "Origin": "http://gw.test"})
        assert r.status_code == 200 and r.json() == {"status": "signed_out"}
        r = await c.get("/logout-2fa", headers={"Accept": "text/html"})
        assert r.status_code == 401 and "identity required" in r.text
        r = await c.post("/verify-2fa", json={}, headers={"Remote-User": USER})
        assert r.status_code == 400 and r.json() == {
            "error": "invalid_input",
            "detail": "code: expected 6 digits (or a recovery_code)",
        }
        r = await c.post("/verify-2fa", files={"code": (None, "123456")}, headers={"Remote-User": USER})
        assert r.status_code == 403 and r.json()["error"] == "2fa_not_enrolled"  # the multipart code was read
