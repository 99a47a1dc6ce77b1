"""Limits on what a client may send (gateway/server.py), attacked with raw sockets against the
real ``gateway run`` process: huge heads, many headers, heads that never end, idle connections,
bodies that stop or crawl (and hold upstream connections while they do)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyotp
import pytest
from websockets.sync.client import connect

from tests.support.servers import UpstreamProcess, free_port, fresh_keys, gateway_process

HEAD_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
MIN_BODY_RATE = 16 * 1024  # a legitimate upload below sends about 10 times as fast
BODY_RATE_GRACE = 1.0
BOUND = 20.0  # "closed within a generous bound": far above the configured 1 s, never a timing claim


class Gateway:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=BOUND)
        return sock

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    path = tmp / "gateway.toml"
    path.write_text(
        f"""
[server]
port = {port}
log_level = "warning"
head_timeout = {HEAD_TIMEOUT}
keepalive_timeout = {KEEPALIVE_TIMEOUT}
body_timeout = {BODY_TIMEOUT}
min_body_rate = {MIN_BODY_RATE}
body_rate_grace = {BODY_RATE_GRACE}

[upstream]
url = "{upstream.url}"

[store]
url = "sqlite:///{tmp}/gateway.db"

[paths]
exclude = ["/public/*"]
"""
    )
    with gateway_process(path, port, fresh_keys()) as proc:
        yield Gateway(proc, port)


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the server will read; it may close before the end (that is the point)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def trickle_until_closed(sock: socket.socket, gap: float) -> tuple[bool, bytes]:
    """Send one byte every ``gap`` seconds until the server closes the connection (True) or
    BOUND passes (False); also returns what the server answered meanwhile."""
    started = time.monotonic()
    answer = b""
    sock.settimeout(gap)
    while time.monotonic() - started < BOUND:
        try:
            sock.sendall(b"X")
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True, answer
        if chunk == b"":
            return True, answer
        answer += chunk
    return False, answer


def refused_or_closed(answer: bytes) -> bool:
    return answer == b"" or answer.startswith(b"HTTP/1.1 431 ")


def test_a_huge_unfinished_header_is_refused_and_costs_no_memory(gateway: Gateway) -> None:
    big = b"a" * (4 * 1024 * 1024)
    before = gateway.rss()
    socks = [gateway.connect() for _ in range(8)]
    for sock in socks:
        send_quietly(sock, b"GET /public/echo HTTP/1.1\r\nHost: x\r\nX-Big: " + big)  # never finished
    grown = gateway.rss() - before
    answers = [read_all(sock) for sock in socks]
    for sock in socks:
        sock.close()
    assert all(refused_or_closed(a) for a in answers), [a[:40] for a in answers]
    assert any(a.startswith(b"HTTP/1.1 431 ") for a in answers)
    # 8 x 4 MiB were sent; what the process may keep of them is bounded by the head limit.
    assert grown < 16 * 1024 * 1024, grown


def test_a_complete_oversized_header_is_refused(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        send_quietly(sock, b"GET /public/echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 200_000 + b"\r\n\r\n")
        answer = read_all(sock)
    assert refused_or_closed(answer)
    assert b"request_header_fields_too_large" in answer or answer == b""


def test_a_thousand_headers_are_refused(gateway: Gateway) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(1000))
    with gateway.connect() as sock:
        sock.sendall(b"GET /public/echo HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:60]
    assert b'"error":"request_header_fields_too_large"' in answer


def test_a_head_within_the_limits_passes_and_a_large_body_is_not_a_head(gateway: Gateway) -> None:
    body = os.urandom(1024 * 1024)
    headers = {f"X-F{i}": "v" * 200 for i in range(60)}  # 60 fields, about 13 KiB
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.port}", timeout=BOUND) as client:
        for _ in range(3):  # keep-alive: each request on the same connection gets a fresh count
            r = client.post("/public/echo", content=body, headers=headers)
            assert r.status_code == 200
            assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_pipelined_requests_still_work(gateway: Gateway) -> None:
    request = b"GET /public/echo HTTP/1.1\r\nHost: x\r\n\r\n"
    with gateway.connect() as sock:
        sock.sendall(request * 3 + b"GET /public/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    assert answer.count(b"HTTP/1.1 200 ") == 4


def test_a_head_that_never_ends_is_closed_by_the_deadline(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"GET /public/echo HTTP/1.1\r\nHost: x\r\n")
        assert read_all(sock) == b""


def test_a_trickled_head_is_closed_by_the_deadline(gateway: Gateway) -> None:
    """Slowloris: a byte now and then does not extend the deadline."""
    with gateway.connect() as sock:
        sock.sendall(b"GET /public/echo HTTP/1.1\r\nHost: x\r\n")
        closed, _ = trickle_until_closed(sock, 0.2)
    assert closed


def test_a_connection_that_sends_nothing_is_closed(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        assert read_all(sock) == b""


def test_an_idle_keep_alive_connection_is_closed(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"GET /public/echo HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(
            next(
                v
                for k, _, v in (line.partition(b": ") for line in head.split(b"\r\n"))
                if k.lower() == b"content-length"
            )
        )
        while len(rest) < length:
            rest += sock.recv(65536)
        assert read_all(sock) == b""  # closed by the server, not by us


def test_a_websocket_handshake_still_works(gateway: Gateway) -> None:
    with connect(f"ws://127.0.0.1:{gateway.port}/public/ws", open_timeout=BOUND) as ws:
        assert ws.recv(timeout=BOUND) == "hello "
        ws.send("ping")
        assert ws.recv(timeout=BOUND) == "echo ping"


def test_gateway_run_and_demo_build_the_same_limited_server(tmp_path: Path) -> None:
    """`gateway demo` serves through serve.serve too: its uvicorn config carries the limits."""
    from gateway.demo.state import demo_config, prepare_state
    from gateway.serve import APP_FACTORY, uvicorn_config
    from gateway.server import LimitedHttpToolsProtocol
    from gateway.server_limits import ClientLimits

    prepare_state(tmp_path / "demo")
    config = demo_config(tmp_path / "demo", "127.0.0.1", 8080, 9999)
    built = uvicorn_config(config, APP_FACTORY)
    assert built.http is LimitedHttpToolsProtocol
    assert built.limits == ClientLimits(64 * 1024, 100, 30.0, 30.0, 1024, 5.0, 60.0)
    assert built.timeout_keep_alive == config.server.keepalive_timeout


def test_a_websocket_handshake_over_the_limits_is_refused(gateway: Gateway) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(200))
    handshake = (
        b"GET /public/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    with gateway.connect() as sock:
        sock.sendall(handshake + fields + b"\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 431 ")


# -- request bodies ------------------------------------------------------------------------------


def test_a_body_that_stops_is_answered_408_and_closed(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"POST /public/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        answer = read_all(sock)  # and nothing more from us
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:60]
    assert b'"error":"request_timeout"' in answer


def test_a_body_that_never_starts_is_answered_408_and_closed(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"POST /public/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:60]


def test_a_trickled_body_below_the_minimum_rate_is_closed(gateway: Gateway) -> None:
    """A byte every 0.1 s never leaves the body idle for body_timeout: only the rate cuts it."""
    with gateway.connect() as sock:
        sock.sendall(b"POST /public/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nA")
        closed, answer = trickle_until_closed(sock, 0.1)
    assert closed
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:60]


def test_a_trickled_chunked_body_is_closed(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"POST /public/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < BOUND:
            try:
                sock.sendall(b"1\r\nA\r\n")
            except OSError:
                closed = True
            time.sleep(0.1)
    assert closed


def test_a_trickled_body_after_a_denial_is_closed(gateway: Gateway) -> None:
    """The 401 is sent at once; the connection must not stay open for the rest of the body."""
    with gateway.connect() as sock:
        sock.sendall(
            b"POST /private HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\nContent-Length: 1000000000\r\n\r\nA"
        )
        closed, answer = trickle_until_closed(sock, 0.1)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:60]
    assert closed


def test_a_slow_upload_above_the_minimum_rate_succeeds(gateway: Gateway) -> None:
    """320 KiB at about 10 times the minimum rate, in pieces 50 ms apart for 2 s: a slow real upload."""
    body = os.urandom(320 * 1024)
    piece = 8 * 1024
    with gateway.connect() as sock:
        sock.sendall(
            b"POST /public/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for i in range(0, len(body), piece):
            sock.sendall(body[i : i + piece])
            time.sleep(0.05)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:60]
    assert hashlib.sha256(body).hexdigest().encode() in answer


POOL = 4


@pytest.fixture(scope="module")
def small_pool_gateway(upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Four upstream connections, and only the idle body timeout (no minimum rate)."""
    tmp = tmp_path_factory.mktemp("pool")
    port = free_port()
    path = tmp / "gateway.toml"
    path.write_text(
        f"""
[server]
port = {port}
log_level = "warning"
body_timeout = {BODY_TIMEOUT}
min_body_rate = 0

[upstream]
url = "{upstream.url}"
max_connections = {POOL}
pool_timeout = {BOUND}

[store]
url = "sqlite:///{tmp}/gateway.db"

[session]
secure = false

[paths]
exclude = ["/public/*"]
"""
    )
    with gateway_process(path, port, fresh_keys()) as proc:
        yield Gateway(proc, port)


def test_stalled_bodies_release_the_upstream_pool(small_pool_gateway: Gateway) -> None:
    """Issue 9.5: bodies that stop, to an excluded path, held every pooled upstream connection
    for good; now the body timeout aborts them and a signed-in user's request gets through."""
    base = f"http://127.0.0.1:{small_pool_gateway.port}"
    alice = {"Remote-User": "alice", "Accept": "application/json"}
    with httpx.Client(base_url=base, timeout=BOUND * 2) as client:
        secret = pyotp.parse_uri(client.post("/setup-2fa", headers=alice).json()["otpauth_uri"]).secret
        r = client.post("/verify-2fa", headers=alice, json={"code": pyotp.TOTP(secret).now()})
        assert r.status_code == 200, r.text
        attackers = [small_pool_gateway.connect() for _ in range(POOL * 2)]
        try:
            for sock in attackers:
                sock.sendall(b"POST /public/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nA")
            r = client.get("/private", headers=alice)  # waits for a pooled connection
            assert r.status_code == 200, r.text
            assert all(read_all(sock).startswith(b"HTTP/1.1 408 ") for sock in attackers)
        finally:
            for sock in attackers:
                sock.close()


@contextlib.contextmanager
def pool_held(gateway: Gateway) -> Iterator[list[socket.socket]]:
    """POOL requests to an excluded path whose bodies have begun: they hold every pooled
    upstream connection until they stall or are cut."""
    attackers = [gateway.connect() for _ in range(POOL)]
    try:
        for sock in attackers:
            sock.sendall(b"POST /public/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nA")
        time.sleep(0.5)  # not a timing claim: lets the attackers take the pool first
        yield attackers
    finally:
        for sock in attackers:
            sock.close()


def trickle(socks: list[socket.socket], seconds: float) -> None:
    """A byte to each every 0.25 s for ``seconds``: the bodies are slow but not stalled."""
    for _ in range(int(seconds / 0.25)):
        for sock in socks:
            sock.sendall(b"A")
        time.sleep(0.25)


def test_a_body_the_gateway_is_not_reading_is_not_stalled(small_pool_gateway: Gateway) -> None:
    """A fast upload that waits for a pooled connection fills the gateway's buffer, and the
    gateway stops reading it: that wait, longer than body_timeout here, is the server's."""
    body = os.urandom(1024 * 1024)
    with (
        pool_held(small_pool_gateway) as attackers,
        httpx.Client(base_url=f"http://127.0.0.1:{small_pool_gateway.port}", timeout=BOUND * 2) as client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        upload = pool.submit(client.post, "/public/echo", content=body)
        trickle(attackers, BODY_TIMEOUT * 2)  # then they stall, and are cut
        r = upload.result()
        assert all(read_all(sock).startswith(b"HTTP/1.1 408 ") for sock in attackers)
    assert r.status_code == 200, r.text
    assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_a_body_awaiting_100_continue_is_not_stalled(small_pool_gateway: Gateway) -> None:
    """RFC 9110 §10.1.1: the client sends nothing until "100 Continue", which comes when the
    request has an upstream connection; that wait, longer than body_timeout here, is not a stall."""
    body = b"0123456789"
    with pool_held(small_pool_gateway) as attackers, small_pool_gateway.connect() as sock:
        sock.sendall(
            b"POST /public/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Expect: 100-continue\r\nContent-Length: 10\r\n\r\n"
        )
        trickle(attackers, BODY_TIMEOUT * 2)
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 "), interim[:60]
        sock.sendall(body)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:60]
    assert hashlib.sha256(body).hexdigest().encode() in answer


# -- trailers ------------------------------------------------------------------------------------

CHUNKED_POST = b"POST /public/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_trailers_within_the_limits_pass_and_are_not_forwarded(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(CHUNKED_POST + b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:60]
    assert hashlib.sha256(b"abc").hexdigest().encode() in answer
    assert b"x-sum" not in answer.lower()  # the upstream echoes the headers it received


def test_trailers_count_against_max_headers(gateway: Gateway) -> None:
    """llhttp reports trailer fields like header fields, after the head's checks: 4 million
    of them grew the process by 460 MiB. Past max_headers (with the head's), 431."""
    with gateway.connect() as sock:
        send_quietly(sock, CHUNKED_POST + b"3\r\nabc\r\n0\r\n" + b"a:b\r\n" * 1000 + b"\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:60]
    assert b'"error":"request_header_fields_too_large"' in answer


def test_an_unfinished_trailer_line_counts_against_max_head_bytes(gateway: Gateway) -> None:
    """httptools keeps an unfinished field whole: 4 MiB of one trailer line, never ended, is
    refused as it arrives (not left to grow until the body times out)."""
    before = gateway.rss()
    with gateway.connect() as sock:
        send_quietly(sock, CHUNKED_POST + b"3\r\nabc\r\n0\r\nX-Big: ")
        for _ in range(64):
            send_quietly(sock, b"b" * 65536)
        grown = gateway.rss() - before
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:60]
    assert grown < 16 * 1024 * 1024, grown


def test_a_request_with_an_unsupported_upgrade_is_plain_http(gateway: Gateway) -> None:
    """Upgrade: h2c is ignored (RFC 9110 §7.8: the server may ignore it); uvicorn looks for the
    Upgrade field again once the message ends, so the trailer counting must not hide it."""
    with gateway.connect() as sock:
        sock.sendall(b"GET /public/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: h2c\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:60]


# -- WebSocket handshakes ------------------------------------------------------------------------

HANDSHAKE = (
    b"GET /public/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@pytest.mark.parametrize(
    "handshake",
    [
        HANDSHAKE + b"Content-Length: 1\r\n\r\nA",
        HANDSHAKE + b"Transfer-Encoding: chunked\r\n\r\n",
        HANDSHAKE.replace(b"GET ", b"POST ", 1) + b"Content-Length: 0\r\n\r\n",
    ],
    ids=["content-length", "chunked", "post"],
)
def test_a_websocket_handshake_with_a_body_is_refused(gateway: Gateway, handshake: bytes) -> None:
    """RFC 6455 §4.1: a GET without a body. The websockets library refused these without an
    answer, and the connection stayed open for good."""
    with gateway.connect() as sock:
        sock.sendall(handshake)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:60]
    assert b'"error":"bad_request"' in answer


def test_a_websocket_handshake_left_unanswered_is_closed(gateway: Gateway) -> None:
    """A field longer than the websockets library reads (8 KiB) but within max_head_bytes: the
    library refuses the handshake without sending its answer; the handshake deadline closes it."""
    with gateway.connect() as sock:
        sock.sendall(HANDSHAKE + b"X-Long: " + b"l" * 10_000 + b"\r\n\r\n")
        answer = read_all(sock)  # a TimeoutError after BOUND if nothing closes it
    assert b"101 Switching Protocols" not in answer


def test_a_frame_sent_with_the_handshake_is_not_lost(gateway: Gateway) -> None:
    """Bytes after the head, in the same read, belong to the WebSocket protocol (uvicorn
    dropped them, and the client waited for an answer that never came)."""
    mask = b"\x01\x02\x03\x04"
    payload = bytes(c ^ mask[i % 4] for i, c in enumerate(b"ping"))
    frame = b"\x81\x84" + mask + payload  # a final, masked text frame "ping"
    with gateway.connect() as sock:
        sock.sendall(HANDSHAKE + b"\r\n" + frame)
        answer = b""
        while b"echo ping" not in answer:
            chunk = sock.recv(65536)  # a TimeoutError after BOUND if the frame was lost
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 101 "), answer[:60]


# -- responses the client does not read ----------------------------------------------------------

SEND_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def unread_gateway(upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Four upstream connections, and a short send timeout."""
    tmp = tmp_path_factory.mktemp("unread")
    port = free_port()
    path = tmp / "gateway.toml"
    path.write_text(
        f"""
[server]
port = {port}
log_level = "warning"
send_timeout = {SEND_TIMEOUT}

[upstream]
url = "{upstream.url}"
max_connections = {POOL}
pool_timeout = {BOUND}

[store]
url = "sqlite:///{tmp}/gateway.db"

[session]
secure = false

[paths]
exclude = ["/public/*"]
"""
    )
    with gateway_process(path, port, fresh_keys()) as proc:
        yield Gateway(proc, port)


def test_responses_never_read_release_the_upstream_pool(unread_gateway: Gateway, upstream: UpstreamProcess) -> None:
    """Clients that ask for large responses and never read them held every pooled upstream
    connection for as long as they stayed connected (the upstream client stops reading while
    the gateway's buffer to the client is full). After send_timeout they are dropped, the
    upstream requests aborted, and a signed-in user's request gets through."""
    base = f"http://127.0.0.1:{unread_gateway.port}"
    alice = {"Remote-User": "alice", "Accept": "application/json"}
    cancelled_before = httpx.get(f"{upstream.url}/stats", timeout=BOUND).json()["cancelled_streams"]
    with httpx.Client(base_url=base, timeout=BOUND * 2) as client:
        secret = pyotp.parse_uri(client.post("/setup-2fa", headers=alice).json()["otpauth_uri"]).secret
        r = client.post("/verify-2fa", headers=alice, json={"code": pyotp.TOTP(secret).now()})
        assert r.status_code == 200, r.text
        attackers = []
        try:
            for _ in range(POOL):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(BOUND)
                sock.connect(("127.0.0.1", unread_gateway.port))
                sock.sendall(b"GET /public/bytes/200000000 HTTP/1.1\r\nHost: x\r\n\r\n")  # never read
                attackers.append(sock)
            time.sleep(0.5)  # not a timing claim: lets the attackers take the pool first
            r = client.get("/private", headers=alice)  # waits for a pooled connection
            assert r.status_code == 200, r.text
        finally:
            for sock in attackers:
                sock.close()
    started = time.monotonic()  # the upstream notices its aborted streams soon, well before BOUND
    while time.monotonic() - started < BOUND:
        cancelled = httpx.get(f"{upstream.url}/stats", timeout=BOUND).json()["cancelled_streams"]
        if cancelled - cancelled_before >= POOL:
            break
        time.sleep(0.1)
    assert cancelled - cancelled_before >= POOL
