"""The forwarder and the proxy-mode decision, against a real upstream process and a real
uvicorn serving the gateway."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest

from tests.conftest import need_binary
from tests.support.recorder import RawClient, Received, Recorder, exchange
from tests.support.servers import GatewayServer, UpstreamProcess, enrol, free_port, make_config
from tests.support.upstream_app import GZIP_BODY, pattern

USER = {"Remote-User": "alice"}


@pytest.fixture(scope="module")
def gw(upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    tmp = tmp_path_factory.mktemp("proxy")
    # Each test enrols users of its own, so codes and lockouts never cross tests.
    server = GatewayServer(make_config(tmp, upstream={"url": upstream.url})).start()
    yield server
    server.stop()


_users = iter(range(1_000_000))


def new_user(gw: GatewayServer) -> tuple[str, str]:
    user = f"user{next(_users)}"
    return user, enrol(gw.config, user)


def session_for(gw: GatewayServer) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, cookies) of a fresh enrolled user with an open 2FA session."""
    user, secret = new_user(gw)
    r = httpx.get(gw.url + "/echo", headers={"Remote-User": user, "X-2FA-Code": pyotp.TOTP(secret).now()})
    assert r.status_code == 200, r.text
    return {"Remote-User": user}, {gw.config.session.cookie: r.cookies[gw.config.session.cookie]}


def raw_request(port: int, data: bytes) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side normalisation) and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, rest


def get_raw(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    lines = [f"GET {target} HTTP/1.1", "Host: app.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


# -- the decision in proxy mode -----------------------------------------------------------------


def test_protected_path_needs_identity_then_code(gw: GatewayServer) -> None:
    r = httpx.get(gw.url + "/admin")
    assert r.status_code == 401
    assert r.json()["error"] == "identity_required"
    user, _ = new_user(gw)
    r = httpx.get(gw.url + "/admin", headers={"Remote-User": user})
    assert r.status_code == 401
    assert r.json() == {"error": "2fa_required", "detail": r.json()["detail"]}


def test_code_from_oathtool_passes_byte_identical_and_replay_is_refused(gw: GatewayServer) -> None:
    oathtool = need_binary("oathtool")
    user, secret = new_user(gw)
    code = subprocess.run([oathtool, "--totp", "-b", secret], capture_output=True, text=True, check=True).stdout.strip()
    direct = httpx.get(f"{gw.config.upstream.url}/bytes/100000")
    r = httpx.get(gw.url + "/bytes/100000", headers={"Remote-User": user, "X-2FA-Code": code})
    assert r.status_code == 200
    assert r.content == direct.content == pattern(100000)
    # the same code again, without the session cookie: single use per step (RFC 6238 §5.2)
    r = httpx.get(gw.url + "/bytes/10", headers={"Remote-User": user, "X-2FA-Code": code})
    assert r.status_code == 401
    assert r.json()["error"] == "2fa_replayed"


def test_session_cookie_opens_the_way_and_belongs_to_its_user(gw: GatewayServer) -> None:
    headers, cookies = session_for(gw)
    assert httpx.get(gw.url + "/echo", headers=headers, cookies=cookies).status_code == 200
    other, _ = new_user(gw)
    r = httpx.get(gw.url + "/echo", headers={"Remote-User": other}, cookies=cookies)
    assert r.status_code == 401


def test_session_cookie_attributes(gw: GatewayServer) -> None:
    user, secret = new_user(gw)
    r = httpx.get(gw.url + "/echo", headers={"Remote-User": user, "X-2FA-Code": pyotp.TOTP(secret).now()})
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # session.secure = false in the test config


def test_not_enrolled_is_denied_never_passed(gw: GatewayServer) -> None:
    r = httpx.get(gw.url + "/echo", headers={"Remote-User": "nobody-enrolled", "X-2FA-Code": "123456"})
    assert r.status_code == 403
    assert r.json()["error"] == "2fa_not_enrolled"
    assert r.json()["setup"] == "/setup-2fa"


def test_bad_codes_lock_out_with_retry_after(gw: GatewayServer) -> None:
    user, secret = new_user(gw)
    for _ in range(gw.config.limits.max_failures):
        r = httpx.get(gw.url + "/echo", headers={"Remote-User": user, "X-2FA-Code": "000000"})
        assert r.status_code in (401, 429)
    r = httpx.get(gw.url + "/echo", headers={"Remote-User": user, "X-2FA-Code": pyotp.TOTP(secret).now()})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) > 0


FULL_WIDTH = "\uff11\uff12\uff13\uff14\uff15\uff16"


@pytest.mark.parametrize("code", [FULL_WIDTH, "12345", "1234567", "12 456", "abcdef", "1" * 10000, "12345\x00"])
def test_malformed_codes_are_refused_not_500(gw: GatewayServer, code: str) -> None:
    user, _ = new_user(gw)
    status, _ = get_raw(gw.port, "/echo", {"Remote-User": user, "X-2FA-Code": code.encode().decode("latin-1")})
    assert status in (400, 401)


def test_excluded_paths_need_nothing(gw: GatewayServer) -> None:
    assert httpx.get(gw.url + "/public/a.css").status_code == 200
    assert httpx.get(gw.url + "/healthz").status_code == 200
    assert httpx.get(gw.url + "/api/public/x").status_code == 200
    assert httpx.post(gw.url + "/api/public/x").status_code == 401  # rule is GET only


def test_html_clients_are_sent_to_the_verify_page(gw: GatewayServer) -> None:
    user, _ = new_user(gw)
    r = httpx.get(gw.url + "/app/page?x=1", headers={"Remote-User": user, "Accept": "text/html"})
    assert r.status_code == 302
    assert r.headers["location"] == "/verify-2fa?next=/app/page%3Fx%3D1"
    r = httpx.get(gw.url + "/app/page", headers={"Remote-User": "not-enrolled-html", "Accept": "text/html"})
    assert r.headers["location"].startswith("/setup-2fa?next=")


BYPASS = [
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "//admin",
    "/public/..;/admin",
    "/public;/../admin",
    "/public/%2e%2e%2fadmin",
    "/public/..%2fadmin",
    "/public/..%5cadmin",
    "/public\\..\\admin",
    "/public/%252e%252e/admin",
    "/public/%c0%ae%c0%ae/admin",
    "/public/..%00/admin",
    "/Public/x",
    "/healthz/",
    "/healthz/../admin",
    "/public",
    "/public-admin",
    "/./public/../admin",
    "/public/./../admin",
    "/%2fadmin",
    "/admin%23/public",
    "/admin%3f/public",
    "/admin?x=/public",
    "/admin#/public",
    "/public/%61dmin/../../admin",
    "/PUBLIC/../admin",
    "/public/%2e%2e;/admin",
]


@pytest.mark.parametrize("target", BYPASS)
def test_bypass_corpus_never_reaches_a_protected_path(gw: GatewayServer, target: str) -> None:
    status, body = get_raw(gw.port, target)
    assert status in (400, 401), (target, status, body[:200])
    with_user = get_raw(gw.port, target, {"Remote-User": "alice"})[0]
    assert with_user in (400, 401, 403)


def test_forwarded_path_is_the_checked_one(gw: GatewayServer) -> None:
    # a non-canonical spelling of an excluded path is not excluded: it needs the second factor
    assert get_raw(gw.port, "/public/./sub//x%20y.css")[0] == 401
    headers, cookies = session_for(gw)
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
    status, body = get_raw(gw.port, "/public/./sub//x%20y.css?q=%2e%2e&x=1", {**headers, "Cookie": cookie})
    assert status == 200
    seen = json.loads(body)
    assert seen["raw_path"] == "/public/sub/x%20y.css"
    assert seen["query"] == "q=%2e%2e&x=1"  # the query string is byte-exact


# -- the forwarder ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
def test_all_methods_and_bodies(gw: GatewayServer, method: str) -> None:
    headers, cookies = session_for(gw)
    body = b"x" * 100_000 if method not in ("GET", "OPTIONS") else b""
    r = httpx.request(method, gw.url + "/echo/m?a=1&a=2&b=%ZZ", content=body, headers=headers, cookies=cookies)
    assert r.status_code == 200
    seen = r.json()
    assert seen["method"] == method
    assert seen["query"] == "a=1&a=2&b=%ZZ"
    assert seen["body_size"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_upload_is_streamed(gw: GatewayServer) -> None:
    headers, cookies = session_for(gw)

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"y" * 65536

    r = httpx.post(gw.url + "/echo", content=chunks(), headers=headers, cookies=cookies)
    assert r.json()["body_size"] == 64 * 65536


def test_head_request(gw: GatewayServer) -> None:
    r = httpx.head(gw.url + "/public/bytes")
    assert r.status_code == 200
    assert r.content == b""


def test_headers_stripped_and_set(gw: GatewayServer) -> None:
    headers, cookies = session_for(gw)
    cookie_header = f"a=1; {gw.config.session.cookie}={cookies[gw.config.session.cookie]}; b=2"
    status, body = get_raw(
        gw.port,
        "/echo",
        {
            **headers,
            "Cookie": cookie_header,
            "X-2FA-Code": "123456",
            "Connection": "keep-alive, X-Drop-Me, Host",
            "X-Drop-Me": "hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "X-Forwarded-For": "198.51.100.7",
            "X-Custom": "kept",
        },
    )
    assert status == 200
    seen = {k: v for k, v in json.loads(body)["headers"]}
    names = [k for k, _ in json.loads(body)["headers"]]
    assert seen["remote-user"] == headers["Remote-User"]
    assert names.count("remote-user") == 1
    assert seen["cookie"] == "a=1; b=2"  # the gateway's session cookie never reaches the app
    for gone in ("x-2fa-code", "x-drop-me", "keep-alive", "te", "proxy-authorization"):
        assert gone not in seen
    assert seen["x-custom"] == "kept"
    # 127.0.0.1 is a trusted proxy by default: its X-Forwarded-For is appended to.
    assert seen["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "app.test"
    # none of httpx's default headers are added
    assert "user-agent" not in seen and "accept-encoding" not in seen and "accept" not in seen


def test_untrusted_peer_cannot_forge_identity_or_forwarding(upstream: UpstreamProcess, tmp_path: Path) -> None:
    config = make_config(tmp_path, upstream=upstream.url, server={"trusted_proxies": ["192.0.2.1/32"]})
    server = GatewayServer(config).start()
    try:
        secret = enrol(config, "alice")
        r = httpx.get(server.url + "/echo", headers={"Remote-User": "alice", "X-2FA-Code": pyotp.TOTP(secret).now()})
        assert r.status_code == 401
        assert r.json()["error"] == "identity_required"
        _, body = get_raw(
            server.port,
            "/public/x",
            {
                "X-Forwarded-For": "203.0.113.9",
                "Remote-User": "alice",
                "X-Forwarded-Proto": "https",
                "Forwarded": "for=1.2.3.4",
                # Look-alikes: CGI, WSGI and PHP read these as Remote-User / X-Forwarded-For.
                "Remote_User": "admin",
                "remote.user": "admin",
                "X_Forwarded_For": "1.2.3.4",
                "X-2FA_Code": "123456",
                "X_Custom": "kept",
            },
        )
        seen = {k: v for k, v in json.loads(body)["headers"]}
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert "remote-user" not in seen and "forwarded" not in seen
        for gone in ("remote_user", "remote.user", "x_forwarded_for", "x-2fa_code"):
            assert gone not in seen
        assert seen["x_custom"] == "kept"
    finally:
        server.stop()


# Headers front proxies and SSO proxies set, which apps trust as the request's scheme, port,
# original target or user (Grafana's X-WEBAUTH-USER, oauth2-proxy's X-Auth-Request-User ...).
SPOOFABLE = (
    "X-Forwarded-Port",
    "X-Forwarded-Server",
    "X-Forwarded-Scheme",
    "X-Forwarded-Ssl",
    "Front-End-Https",
    "X-Url-Scheme",
    "X-Original-URI",
    "X-Forwarded-Uri",
    "X-Forwarded-Path",
    "X-Forwarded-Method",
    "X-Original-Method",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Preferred-Username",
    "X-Forwarded-Groups",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Preferred-Username",
    "X-Auth-Request-Groups",
    "X-Remote-User",
    "X-WEBAUTH-USER",
)


@pytest.mark.parametrize("trusted", [False, True])
def test_what_front_and_sso_proxies_set_never_comes_from_a_client(
    upstream: UpstreamProcess, tmp_path: Path, trusted: bool
) -> None:
    """From a client that is not a trusted proxy, none of the headers a front proxy or an SSO
    proxy would set reaches the app, nor their ``_`` look-alikes (found by an attack: they
    passed, and an app that trusts them takes the scheme, target or user they name). The
    user headers never pass even from a trusted proxy, which relays a client's own copies (found
    by the second attack through every example in config/): the app hears only the gateway's."""
    server_table = {} if trusted else {"trusted_proxies": ["192.0.2.1/32"]}
    config = make_config(tmp_path, upstream=upstream.url, server=server_table)
    server = GatewayServer(config).start()
    try:
        sent = {name: "forged" for name in SPOOFABLE} | {name.replace("-", "_"): "forged" for name in SPOOFABLE}
        status, body = get_raw(server.port, "/public/x", sent)
        assert status == 200
        forged = {k for k, v in json.loads(body)["headers"] if v == "forged"}
        if trusted:  # what a trusted front proxy says about the request itself is believed
            forged -= {name.lower() for name in SPOOFABLE[:11]}
        assert forged == set()
    finally:
        server.stop()


def test_response_headers_raw_bytes_and_cookies(gw: GatewayServer) -> None:
    r = httpx.get(gw.url + "/public/../public/x")  # warm-up through an excluded path
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", "/public/gzip", headers={"Accept-Encoding": "gzip"})
    resp = conn.getresponse()
    raw = resp.read()
    assert resp.getheader("content-encoding") == "gzip"
    assert int(resp.getheader("content-length") or 0) == len(GZIP_BODY)
    assert raw == GZIP_BODY  # relayed, never decoded
    assert gzip.decompress(raw).startswith(b"hello compressed")
    conn.request("GET", "/public/cookies")
    resp = conn.getresponse()
    resp.read()
    assert resp.headers.get_all("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    conn.request("GET", "/public/hop")
    resp = conn.getresponse()
    resp.read()
    assert resp.getheader("x-private") is None and resp.getheader("keep-alive") is None
    assert resp.getheader("x-kept") == "yes"
    conn.close()
    assert r.status_code in (400, 200)


def test_no_cookie_jar_between_users(gw: GatewayServer) -> None:
    assert httpx.get(gw.url + "/public/cookies").status_code == 200
    r = httpx.get(gw.url + "/public/echo")
    seen = {k: v for k, v in r.json()["headers"]}
    assert "cookie" not in seen


def test_redirects_are_not_followed_and_location_is_rewritten(gw: GatewayServer) -> None:
    status, _ = get_raw(gw.port, "/public/redirect")
    assert status == 302
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", "/public/redirect", headers={"Host": "app.example"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.getheader("location") == "http://app.example/echo/after?x=1"


def test_upstream_refused_is_502(tmp_path: Path) -> None:
    config = make_config(tmp_path, upstream={"url": f"http://127.0.0.1:{free_port()}"})
    server = GatewayServer(config).start()
    try:
        r = httpx.get(server.url + "/public/x")
        assert r.status_code == 502
        assert r.json()["error"] == "upstream_unreachable"
    finally:
        server.stop()


def test_upstream_timeout_is_504_and_pool_exhaustion_503(upstream: UpstreamProcess, tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        upstream={
            "url": upstream.url,
            "read_timeout": 0.5,
            "max_connections": 1,
            "pool_timeout": 0.2,
        },
    )
    server = GatewayServer(config).start()
    try:
        assert httpx.get(server.url + "/public/slow?s=2").status_code == 504
        results: dict[str, int] = {}

        def hold() -> None:
            results["slow"] = httpx.get(server.url + "/public/slow?s=0.45", timeout=10).status_code

        t = threading.Thread(target=hold)
        t.start()
        time.sleep(0.1)
        r = httpx.get(server.url + "/public/x")
        t.join()
        assert r.status_code == 503
        assert r.json()["error"] == "upstream_busy"
        assert results["slow"] == 200
    finally:
        server.stop()


def _stats(upstream: UpstreamProcess) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(upstream.url + "/stats").json()
    return stats


def test_client_disconnect_mid_stream_closes_the_upstream(gw: GatewayServer, upstream: UpstreamProcess) -> None:
    before = _stats(upstream)
    for path in ("/public/bytes/2000000000", "/public/stream/2000000000"):
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            got = 0
            while got < 1_000_000:
                got += len(s.recv(65536))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _stats(upstream)["open_streams"] > before["open_streams"]:
            time.sleep(0.05)
    after = _stats(upstream)
    assert after["open_streams"] == before["open_streams"]
    assert after["cancelled_streams"] >= before["cancelled_streams"] + 2
    # the pool is still healthy afterwards
    assert httpx.get(gw.url + "/public/x").status_code == 200


def test_a_large_body_passes_both_ways_with_flat_memory(gw: GatewayServer) -> None:
    """256 MiB down and up through the gateway (which runs in this process): the peak RSS may not
    grow by a quarter of that, so nothing is buffered whole. The bench measures 1 GiB."""
    import resource

    headers, cookies = session_for(gw)
    size = 256 << 20
    block = bytes(range(256)) * 256  # the upstream's 64 KiB pattern block

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    before = peak_mib()
    received = 0
    with httpx.stream("GET", gw.url + f"/bytes/{size}", headers=headers, cookies=cookies, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-length"] == str(size)
        for chunk in r.iter_raw():
            assert chunk == pattern_slice(received, len(chunk))
            received += len(chunk)
    assert received == size

    def chunks() -> Iterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    r = httpx.post(gw.url + "/echo", content=chunks(), headers=headers, cookies=cookies, timeout=120)
    assert r.json()["body_size"] == size
    growth = peak_mib() - before
    assert growth < 64, f"peak RSS grew by {growth:.0f} MiB for {size >> 20} MiB each way"


def pattern_slice(offset: int, length: int) -> bytes:
    block = bytes(range(256)) * 256
    start = offset % len(block)
    return (block[start:] + block * (length // len(block) + 1))[:length]


def test_large_streams_both_ways(gw: GatewayServer) -> None:
    headers, cookies = session_for(gw)
    size = 64 * 1024 * 1024
    digest = hashlib.sha256()
    with httpx.stream("GET", gw.url + f"/stream/{size}", headers=headers, cookies=cookies) as r:
        for chunk in r.iter_raw():
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()

    def chunks() -> Iterator[bytes]:
        block = pattern(1 << 20)
        for _ in range(size >> 20):
            yield block

    r = httpx.post(gw.url + "/echo", content=chunks(), headers=headers, cookies=cookies, timeout=60)
    assert r.json()["body_size"] == size


# -- what the upstream receives on the wire (issue 9: smuggling, h2c, routing overrides) ----------
# A raw TCP upstream (tests/support/recorder.py) records every request its bytes contain, so
# these hold whatever HTTP client sits under httpx.

SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: app\r\nRemote-User: admin\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    server = Recorder().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def wire(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    server = GatewayServer(make_config(tmp_path_factory.mktemp("wire"), upstream=recorder.url)).start()
    yield server
    server.stop()


def received_during(recorder: Recorder, action: Any) -> tuple[Any, list[Received]]:
    """What ``action()`` returns, and every request the upstream received meanwhile."""
    before = len(recorder.snapshot()[0])
    result = action()
    requests, errors = recorder.snapshot()
    assert errors == []
    return result, requests[before:]


def head(method: str, target: str, *headers: str) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: gw\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


@pytest.mark.parametrize(
    "connection",
    [
        "keep-alive, Content-Length",
        "Transfer-Encoding",
        "close, content-length, host, x-forwarded-for, remote-user, cookie, authorization",
        "Content-Length, Transfer-Encoding, Upgrade",
    ],
)
@pytest.mark.parametrize("chunked", [False, True])
def test_connection_cannot_unframe_the_body(
    wire: GatewayServer, recorder: Recorder, connection: str, chunked: bool
) -> None:
    # The attack: Connection names the framing header, the gateway dropped it and sent the
    # body after a bodiless head; the upstream read the body as a second, unchecked request.
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(SMUGGLED)}"
    body = f"{len(SMUGGLED):x}\r\n".encode() + SMUGGLED + b"\r\n0\r\n\r\n" if chunked else SMUGGLED
    data = head("POST", "/public/x", f"Connection: {connection}", framing, "Cookie: a=1", "Authorization: x") + body
    answer, got = received_during(recorder, lambda: exchange(wire.port, data))
    assert answer is not None and answer.status == 200
    assert [(r.method, r.target) for r in got] == [("POST", "/public/x")]
    [request] = got
    assert request.body == SMUGGLED
    assert request.header("content-length") + request.header("transfer-encoding") == (
        ["chunked"] if chunked else [str(len(SMUGGLED))]
    )
    assert request.header("cookie") == ["a=1"] and request.header("authorization") == ["x"]
    assert request.header("host") == ["gw"]  # upstream.pass_host (the default): the client's, once
    assert request.header("remote-user") == []


@pytest.mark.parametrize(
    "framing",
    [
        ["Transfer-Encoding: gzip, chunked"],
        ["Transfer-Encoding: chunked, identity"],
        ["Transfer-Encoding: chunked", "Content-Length: 5"],
        ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
        ["Content-Length: 5", "Content-Length: 6"],
        ["Content-Length: 5, 5"],
        ["Content-Length: +5"],
    ],
)
def test_ambiguous_framing_is_refused_never_reframed(
    wire: GatewayServer, recorder: Recorder, framing: list[str]
) -> None:
    # Whichever layer refuses it (the ASGI server's parser or the gateway), it is a 400 and
    # nothing reaches the upstream.
    body = b"5\r\nhello\r\n0\r\n\r\n" if "chunked" in " ".join(framing) else b"hello"
    answer, got = received_during(recorder, lambda: exchange(wire.port, head("POST", "/public/x", *framing) + body))
    assert answer is not None and answer.status == 400
    assert got == []


@pytest.mark.parametrize("framing", ["Content-Length: 5", "Transfer-Encoding: chunked"])
def test_a_body_after_an_upgrade_request_is_refused(wire: GatewayServer, recorder: Recorder, framing: str) -> None:
    # uvicorn's httptools parser stops at the head of an upgrade request it does not support:
    # the body is never read (found by the differential test), so it is refused, not sent on.
    body = b"hello" if "Length" in framing else b"5\r\nhello\r\n0\r\n\r\n"
    data = head("POST", "/public/x", "Upgrade: h2c", "Connection: Upgrade", framing) + body
    answer, got = received_during(recorder, lambda: exchange(wire.port, data))
    assert answer is not None and answer.status == 400
    assert got == []


def test_ambiguous_framing_answer_is_json(wire: GatewayServer, recorder: Recorder) -> None:
    # uvicorn's httptools parser lets "gzip, chunked" through (it de-chunks and ignores gzip).
    data = head("POST", "/public/x", "Transfer-Encoding: gzip, chunked", "Accept: application/json")

    def ask_twice() -> tuple[Any, Any]:
        with RawClient(wire.port) as client:
            return client.ask(data + b"5\r\nhello\r\n0\r\n\r\n"), client.ask(head("GET", "/public/x"))

    (answer, after), got = received_during(recorder, ask_twice)
    assert answer is not None and answer.status == 400
    assert json.loads(answer.body)["error"] == "malformed_request"
    # The connection's own framing is in doubt: it is closed, as nginx does after a 400.
    assert answer.headers.get("connection") == "close" and after is None
    assert got == []


@pytest.mark.parametrize(
    ("method", "framing", "body", "expected"),
    [
        ("GET", [], b"", []),
        ("GET", ["Content-Length: 0"], b"", []),
        # aiohttp says "Content-Length: 0" for a bodiless DELETE: no body either way.
        ("DELETE", [], b"", [("content-length", "0")]),
        ("POST", [], b"", [("content-length", "0")]),
        ("PUT", ["Content-Length: 0"], b"", [("content-length", "0")]),
        ("POST", ["Content-Length: 5"], b"hello", [("content-length", "5")]),
        ("PATCH", ["Content-Length: 005"], b"hello", [("content-length", "5")]),
        ("POST", ["Transfer-Encoding: Chunked"], b"5\r\nhello\r\n0\r\n\r\n", [("transfer-encoding", "chunked")]),
    ],
)
def test_framing_upstream_is_decided_from_the_body_sent(
    wire: GatewayServer,
    recorder: Recorder,
    method: str,
    framing: list[str],
    body: bytes,
    expected: list[tuple[str, str]],
) -> None:
    answer, got = received_during(recorder, lambda: exchange(wire.port, head(method, "/public/x", *framing) + body))
    assert answer is not None and answer.status == 200
    [request] = got
    framing_sent = [(k, v) for k, v in request.headers if k in ("content-length", "transfer-encoding")]
    assert framing_sent == expected or (method == "DELETE" and framing_sent == [])
    assert request.body == (b"hello" if b"hello" in body else b"")


@pytest.mark.parametrize("target", ["/healthz#/../admin", "/public/x#", "/public/x?a#b"])
def test_a_raw_fragment_in_the_request_target_is_400(wire: GatewayServer, recorder: Recorder, target: str) -> None:
    # The server's parser would drop "#..." silently; the client wrote another target.
    answer, got = received_during(recorder, lambda: exchange(wire.port, head("GET", target)))
    assert answer is not None and answer.status == 400
    assert json.loads(answer.body)["error"] == "bad_request"
    assert got == []


def test_h2c_upgrade_never_reaches_the_upstream(wire: GatewayServer, recorder: Recorder) -> None:
    data = head(
        "GET",
        "/public/x",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        "HTTP2_Settings: AAMAAABkAARAAAAAAAIAAAAA",
    )
    answer, got = received_during(recorder, lambda: exchange(wire.port, data))
    assert answer is not None and answer.status == 200
    [request] = got
    names = {k for k, _ in request.headers}
    assert not names & {"upgrade", "http2-settings", "http2_settings", "connection"}


ROUTING_OVERRIDES = [
    "X-Original-URL: /admin",
    "X-Rewrite-URL: /admin",
    "X-Forwarded-Prefix: /admin",
    "X-HTTP-Method-Override: DELETE",
    "X-HTTP-Method: DELETE",
    "X-Method-Override: DELETE",
    "X_Original_URL: /admin",
    "X.Rewrite.URL: /admin",
    "X_HTTP_Method_Override: DELETE",
]


@pytest.mark.parametrize("trusted", [True, False])
def test_routing_override_headers_never_reach_the_upstream(recorder: Recorder, tmp_path: Path, trusted: bool) -> None:
    server = {} if trusted else {"trusted_proxies": ["10.255.255.1/32"]}
    gw = GatewayServer(make_config(tmp_path, upstream=recorder.url, server=server)).start()
    try:
        data = head("GET", "/public/x", *ROUTING_OVERRIDES, "X-Kept: yes")
        answer, got = received_during(recorder, lambda: exchange(gw.port, data))
    finally:
        gw.stop()
    assert answer is not None and answer.status == 200
    [request] = got
    names = {k.replace("_", "-").replace(".", "-") for k, _ in request.headers}
    assert not names & {h.split(":")[0].lower().replace("_", "-").replace(".", "-") for h in ROUTING_OVERRIDES}
    assert request.header("x-kept") == ["yes"]


def test_keep_alive_sequence_reaches_the_upstream_request_by_request(wire: GatewayServer, recorder: Recorder) -> None:
    # One client connection; each allowed request is one upstream request, the denied one none.
    asks = [
        head("POST", "/public/a", "Connection: keep-alive, Content-Length", "Content-Length: 6") + b"GET /x",
        head("GET", "/admin", "Remote-User: admin"),
        head("GET", "/public/b", "Connection: Transfer-Encoding", "Transfer-Encoding: chunked") + b"0\r\n\r\n",
    ]

    def run_all() -> list[int | None]:
        with RawClient(wire.port) as client:
            return [None if (a := client.ask(data)) is None else a.status for data in asks]

    statuses, got = received_during(recorder, run_all)
    assert statuses == [200, 403, 200]  # admin is not enrolled
    assert [(r.method, r.target, r.body) for r in got] == [("POST", "/public/a", b"GET /x"), ("GET", "/public/b", b"")]


@pytest.mark.parametrize("spelling", ["{c} ={v}", "{c}\t={v}", " {c}= {v} ", "\xa0{c}={v}", '{c}="{v}"'])
def test_the_session_cookie_never_reaches_the_app_however_it_is_spelled(gw: GatewayServer, spelling: str) -> None:
    """The decision and the stripping read cookie names by one rule: a spelling that opens the
    session is also one that is removed (found by an attack: ``gateway_session =ID`` passed on
    the session and reached the app, since only the reader trimmed the name)."""
    headers, cookies = session_for(gw)
    [(name, value)] = cookies.items()
    cookie = "app=1; " + spelling.format(c=name, v=value) + "; other=2"
    status, body = get_raw(gw.port, "/echo", {**headers, "Cookie": cookie})
    assert status == 200, body
    received = json.loads(body)
    assert value not in json.dumps(received)
    cookies_seen = [v for k, v in received["headers"] if k.lower() == "cookie"]
    assert cookies_seen == ["app=1; other=2"]


class _NotModifiedUpstream(socketserver.ThreadingTCPServer):
    """Answers every request with ``HTTP/1.1 <status>`` and ``Content-Length: 1234`` but no
    content, on a kept-alive connection: RFC 9110 §8.6 lets a 304 carry the length of the
    representation it stands for (and apps send it); a 204 must not, but some do."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = self.rfile.readline()
                        if not line:
                            return
                        head += line
                    status = head.split(b" ", 2)[1].rsplit(b"/", 1)[-1]
                    self.wfile.write(b"HTTP/1.1 " + status + b' X\r\nContent-Length: 1234\r\nETag: "v1"\r\n\r\n')

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.mark.parametrize("status", [304, 204])
def test_a_bodiless_answer_with_a_content_length_keeps_the_connection_usable(tmp_path: Path, status: int) -> None:
    upstream = _NotModifiedUpstream()
    port = upstream.server_address[1]
    server = GatewayServer(make_config(tmp_path, upstream=f"http://127.0.0.1:{port}")).start()
    try:
        with RawClient(server.port) as client:
            for _ in range(3):
                answer = client.ask(head("GET", f"/public/{status}", 'If-None-Match: "v1"'))
                assert answer is not None, "the connection broke after a bodiless answer"
                assert answer.status == status
    finally:
        server.stop()
        upstream.shutdown()
        upstream.server_close()


def test_connect_is_refused_and_nothing_reaches_the_app(wire: GatewayServer, recorder: Recorder) -> None:
    # RFC 9110 §9.3.6: CONNECT asks a proxy for a tunnel; an app behind a gateway has none to
    # give, and a body after it was a smuggling attempt that used to end in a 500.
    data = head("CONNECT", "/public/a", f"Content-Length: {len(SMUGGLED)}") + SMUGGLED
    answer, requests = received_during(recorder, lambda: exchange(wire.port, data))
    assert requests == []
    assert answer is None or 400 <= answer.status < 500
