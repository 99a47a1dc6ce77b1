"""Upstream faults against a real ``gateway run`` process in proxy mode (issue 14 §1 "Upstream
faults"): a client with a valid 2FA session asks for paths that make the upstream
(tests/support/faulty_upstream.py, a raw TCP server) refuse, hang, dawdle, reset, or answer with
bytes that are not HTTP.

For each fault, ``REPEAT`` requests at once (so a leak of one per request shows):
* before the response started, the right status: 502 (unreachable, reset, malformed) or 504 (no
  answer within ``upstream.read_timeout``), a JSON ``{"error", "detail"}`` with none of the
  upstream's bytes in it, within the timeout + 2 s; never a 500;
* once the response started, an aborted stream: the client reads a status and part of the body
  and then the connection ends (a short read against Content-Length, a chunked body without its
  last chunk), never a truncated body that looks whole;
* nothing leaks: the gateway's file descriptors (``/proc/PID/fd``) and event-loop tasks
  (``gateway_event_loop_tasks``, gateway/metrics.py) and the upstream's open connections (its
  own view: the gateway must close a connection it gave up on, not pool it) come back to their
  count before the faults, and no request arrives on a connection after its fault;
* the next ordinary request works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.faulty_upstream import BODY_SENT, FaultyUpstream
from tests.support.leaks import SessionGateway, session_gateway
from tests.support.load import SESSION_COOKIE

REPEAT = 20
UNREAD_REPEAT = 5  # POSTs of UNREAD_SIZE bytes at once
UNREAD_SIZE = 32 * 2**20  # more than the socket buffers between the gateway and the upstream hold
READ_TIMEOUT = 1.0
KEEPALIVE = 1.0  # server.keepalive_timeout
CONNECT_TIMEOUT = 1.0
# How long the faults may take to settle (connections closed, tasks ended) before counting: the
# slow faults' upstream threads hold their socket for faulty_upstream.SLOW.
SETTLE = 6.0
# Bytes of the upstream's that must never reach the client in a denial.
UPSTREAM_SECRETS = (b"secret", b"garbage", b"upstream-detail")


def ok(gateway: SessionGateway, name: str) -> bool:
    answer = httpx.get(f"{gateway.url}/ok/{name}", headers=gateway.headers, timeout=10)
    return (answer.status_code, answer.content) == (200, b"ok")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    with FaultyUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: FaultyUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionGateway]:
    base = tmp_path_factory.mktemp("upstream-faults")
    with session_gateway(
        base,
        upstream.url,
        server=f"keepalive_timeout = {KEEPALIVE}",
        upstream=f"read_timeout = {READ_TIMEOUT}\nconnect_timeout = {CONNECT_TIMEOUT}\nwrite_timeout = {READ_TIMEOUT}",
    ) as gateway:
        yield gateway
    log = gateway.log.read_text()
    # An upstream's failure is a warning line, not a stack trace (nor a 500). The one ERROR line
    # left is uvicorn's, for each response the gateway cut off on purpose (an aborted stream).
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert all("ASGI callable returned without completing response" in line for line in errors), errors


@contextlib.contextmanager
def no_leak(gateway: SessionGateway, upstream: FaultyUpstream) -> Iterator[None]:
    """Nothing the block did is left open once settled, nothing was sent on a connection after
    its fault, and an ordinary request through the same gateway works afterwards."""
    reused = upstream.reused
    with gateway.no_leak(upstream.open_connections, lambda name: ok(gateway, name), SETTLE):
        yield
    assert upstream.reused == reused, "a request came on a connection the upstream had broken"


@dataclass
class Outcome:
    status: int
    kind: str  # "denied" (a whole JSON denial), "aborted" (cut off after the head), "complete"
    body: bytes
    elapsed: float


async def _one(client: httpx.AsyncClient, method: str, path: str) -> Outcome:
    start = time.monotonic()
    async with client.stream(method, path) as response:
        body = bytearray()
        kind = "complete"
        try:
            async for chunk in response.aiter_raw():
                body += chunk
        except (httpx.RemoteProtocolError, httpx.ReadError):
            kind = "aborted"
    elapsed = time.monotonic() - start
    if kind == "complete" and response.headers.get("content-type") == "application/json":
        kind = "denied"
    return Outcome(response.status_code, kind, bytes(body), elapsed)


async def _many(gateway: SessionGateway, method: str, fault: str) -> list[Outcome]:
    async with httpx.AsyncClient(base_url=gateway.url, headers=gateway.headers, timeout=15) as client:
        return await asyncio.gather(*(_one(client, method, f"/{fault}/{i}") for i in range(REPEAT)))


def fire(gateway: SessionGateway, fault: str, method: str = "GET") -> list[Outcome]:
    return asyncio.run(_many(gateway, method, fault))


def assert_denied(outcomes: list[Outcome], status: int, error: str, within: float) -> None:
    """Every answer the whole JSON denial, in time, with nothing of the upstream's in it."""
    for outcome in outcomes:
        assert (outcome.status, outcome.kind) == (status, "denied"), outcome
        denial = json.loads(outcome.body)
        assert sorted(denial) == ["detail", "error"] and denial["error"] == error, denial
        assert not any(secret in outcome.body.lower() for secret in UPSTREAM_SECRETS), outcome
        assert outcome.elapsed < within, outcome


def assert_aborted(outcomes: list[Outcome], most: int) -> None:
    """Every answer started (200) and was cut off: fewer than ``most`` body bytes, no clean end."""
    for outcome in outcomes:
        assert (outcome.status, outcome.kind) == (200, "aborted"), outcome
        assert len(outcome.body) < most, outcome


def test_refused_connections_are_502_and_service_resumes(gateway: SessionGateway, upstream: FaultyUpstream) -> None:
    with no_leak(gateway, upstream), upstream.refusing():
        assert_denied(fire(gateway, "ok"), 502, "upstream_unreachable", CONNECT_TIMEOUT + 2)


def test_connect_that_hangs_is_504_after_connect_timeout(gateway: SessionGateway, upstream: FaultyUpstream) -> None:
    with no_leak(gateway, upstream), upstream.blackholing():
        outcomes = fire(gateway, "ok")
        assert_denied(outcomes, 504, "upstream_timeout", CONNECT_TIMEOUT + 2)
        assert all(o.elapsed >= CONNECT_TIMEOUT for o in outcomes), outcomes


def test_upstream_restart_costs_no_request(gateway: SessionGateway, upstream: FaultyUpstream) -> None:
    # The upstream closes every idle keep-alive connection (a restart, or its own idle timeout):
    # the gateway's pool must notice, not send a POST (never resent, RFC 9110 §9.2.2) on a dead one.
    # (Not under no_leak: REPEAT answers at once leave up to REPEAT idle pooled connections.)
    assert all(o.status == 200 for o in fire(gateway, "ok"))  # REPEAT pooled connections
    assert upstream.open_connections() > 1
    with upstream.refusing():
        pass
    time.sleep(0.1)  # the FINs have arrived (a FIN racing a request is another matter)
    for method in ("POST", "GET"):
        outcomes = fire(gateway, "ok", method)
        assert [(o.status, o.body) for o in outcomes] == [(200, b"ok")] * REPEAT, outcomes


def test_upstream_that_never_answers_is_504(gateway: SessionGateway, upstream: FaultyUpstream) -> None:
    with no_leak(gateway, upstream):
        outcomes = fire(gateway, "hang")
        assert_denied(outcomes, 504, "upstream_timeout", READ_TIMEOUT + 2)
        assert all(o.elapsed >= READ_TIMEOUT for o in outcomes), outcomes


def test_answer_slower_than_read_timeout_is_504(gateway: SessionGateway, upstream: FaultyUpstream) -> None:
    with no_leak(gateway, upstream):
        assert_denied(fire(gateway, "slow-head"), 504, "upstream_timeout", READ_TIMEOUT + 2)


def test_body_stalled_past_read_timeout_is_an_aborted_stream(gateway: SessionGateway, upstream: FaultyUpstream) -> None:
    with no_leak(gateway, upstream):
        outcomes = fire(gateway, "slow-body")
        assert_aborted(outcomes, BODY_SENT + 1)
        assert all(o.elapsed < READ_TIMEOUT + 2 for o in outcomes), outcomes


def test_reset_in_the_head_is_502(gateway: SessionGateway, upstream: FaultyUpstream) -> None:
    with no_leak(gateway, upstream):
        with upstream.refusing():
            pass  # no pooled connection left: each GET below gets a fresh one
        time.sleep(0.1)
        sent = upstream.faults.get("reset-head", 0)
        assert_denied(fire(gateway, "reset-head"), 502, "upstream_unreachable", 2)
        # A fresh connection that fails is the upstream's answer, not a dead pooled one: each GET
        # reached it once (RFC 9110 §9.2.1 allows a retry; there was nothing to retry).
        assert upstream.faults["reset-head"] - sent == REPEAT
        # POST too: never resent (RFC 9110 §9.2.2), a 502 all the same.
        assert_denied(fire(gateway, "reset-head", "POST"), 502, "upstream_unreachable", 2)


@pytest.mark.parametrize("fault", ["reset-body-length", "reset-body-chunked"])
def test_reset_in_the_body_is_an_aborted_stream(gateway: SessionGateway, upstream: FaultyUpstream, fault: str) -> None:
    with no_leak(gateway, upstream):
        assert_aborted(fire(gateway, fault), BODY_SENT + 1)


def test_reset_in_a_close_delimited_body_is_an_aborted_stream(
    gateway: SessionGateway, upstream: FaultyUpstream
) -> None:
    # A body without Content-Length or chunked ends where the connection does (RFC 9112 §6.3
    # item 8): only a clean close ends it; after a reset it must not look whole (attacker B,
    # finding 5: it was relayed chunked, with a clean last chunk).
    with no_leak(gateway, upstream):
        assert_aborted(fire(gateway, "reset-body-eof"), BODY_SENT + 1)


def test_close_delimited_body_ended_by_a_clean_close_is_complete(
    gateway: SessionGateway, upstream: FaultyUpstream
) -> None:
    with no_leak(gateway, upstream):
        for outcome in fire(gateway, "close-body-eof"):
            assert (outcome.status, outcome.kind, outcome.body) == (200, "complete", b"e" * BODY_SENT), outcome


@pytest.mark.parametrize("fault", ["bad-status", "bad-status-line"])
def test_malformed_status_line_is_502(gateway: SessionGateway, upstream: FaultyUpstream, fault: str) -> None:
    with no_leak(gateway, upstream):
        assert_denied(fire(gateway, fault), 502, "upstream_unreachable", 2)


@pytest.mark.parametrize("fault", ["bad-chunk-size", "chunk-missing-crlf", "chunk-size-overflow", "chunk-overrun"])
def test_invalid_chunked_encoding_is_never_relayed_as_whole(
    gateway: SessionGateway, upstream: FaultyUpstream, fault: str
) -> None:
    # The head was valid, so the answer may have started (then it is cut off after the first,
    # valid 16-byte chunk, or in the overrun one) or the parser may have refused the lot first (then a 502).
    with no_leak(gateway, upstream):
        for outcome in fire(gateway, fault):
            if outcome.kind == "denied":
                assert_denied([outcome], 502, "upstream_unreachable", 2)
            else:
                assert_aborted([outcome], 33)


def _expect_continue(gateway: SessionGateway, path: str) -> bytes:
    """A POST with ``Expect: 100-continue``: the body is sent once the gateway says 100 (or not
    at all if it answers first); everything the gateway sent, to the end of the connection."""
    body = b"b" * 1000
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        cookie = f"{SESSION_COOKIE}={gateway.session}"
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\nRemote-User: alice\r\n"
            f"Cookie: {cookie}\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = sock.recv(65536)
        if answer.startswith(b"HTTP/1.1 100 "):
            with contextlib.suppress(OSError):
                sock.sendall(body)
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_upstream_closing_after_100_continue_is_502(gateway: SessionGateway, upstream: FaultyUpstream) -> None:
    with no_leak(gateway, upstream):
        for i in range(REPEAT):
            answer = _expect_continue(gateway, f"/continue-close/{i}")
            final = answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
            head, _, body = final.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 502 "), answer
            assert json.loads(body)["error"] == "upstream_unreachable", answer


def _post_unread(gateway: SessionGateway, path: str, size: int, session: bool) -> tuple[bytes, float]:
    """A POST whose body the gateway answers before reading it all; (the answer, the seconds from
    the answer to the end of the connection: the client sends nothing after its body)."""
    cookie = f"Cookie: {SESSION_COOKIE}={gateway.session}\r\n" if session else ""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=KEEPALIVE + 10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\nRemote-User: alice\r\n{cookie}"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        pump = threading.Thread(target=_send_quietly, args=(sock, b"x" * size), daemon=True)
        pump.start()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        answered = time.monotonic()
        with contextlib.suppress(TimeoutError):
            while sock.recv(65536):
                pass
        pump.join(timeout=10)
        return answer, time.monotonic() - answered


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


async def _posts_unread(gateway: SessionGateway, path: str, size: int, session: bool) -> list[tuple[bytes, float]]:
    return await asyncio.gather(
        *(asyncio.to_thread(_post_unread, gateway, f"{path}/{i}", size, session) for i in range(UNREAD_REPEAT))
    )


def test_upstream_that_never_reads_the_body_is_504_and_the_client_is_let_go(
    gateway: SessionGateway, upstream: FaultyUpstream
) -> None:
    # The upload stalls once every buffer between the gateway and the upstream is full: 504 after
    # write_timeout. uvicorn then reads and drops the rest of the client's body; the connection is
    # idle after it and must close after keepalive_timeout, not stay open for good.
    with no_leak(gateway, upstream):
        for answer, lingered in asyncio.run(_posts_unread(gateway, "/no-read", UNREAD_SIZE, session=True)):
            assert answer.startswith(b"HTTP/1.1 504 ") and b'"upstream_timeout"' in answer, answer
            assert lingered < KEEPALIVE + 2, lingered


def test_denied_post_with_a_body_is_let_go_after_keepalive_timeout(
    gateway: SessionGateway, upstream: FaultyUpstream
) -> None:
    # No upstream involved: a denial sent before the body is read leaves the connection in the
    # same state (a client could hold connections open that way, past keepalive_timeout).
    with no_leak(gateway, upstream):
        for answer, lingered in asyncio.run(_posts_unread(gateway, "/ok", 2**20, session=False)):
            assert answer.startswith(b"HTTP/1.1 401 "), answer
            assert lingered < KEEPALIVE + 2, lingered


async def _ws_refused(gateway: SessionGateway, path: str) -> tuple[int, bytes, float]:
    start = time.monotonic()
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"ws://127.0.0.1:{gateway.port}{path}", additional_headers=gateway.headers, open_timeout=10):
            pass
    return refused.value.response.status_code, bytes(refused.value.response.body or b""), time.monotonic() - start


async def _ws_many(gateway: SessionGateway, fault: str) -> list[tuple[int, bytes, float]]:
    return await asyncio.gather(*(_ws_refused(gateway, f"/{fault}/{i}") for i in range(REPEAT)))


@pytest.mark.parametrize(
    ("fault", "status", "error"),
    [("ws-hang", 504, "upstream_timeout"), ("ws-200", 502, "upstream_unreachable")],
)
def test_websocket_upstream_that_does_not_complete_the_handshake(
    gateway: SessionGateway, upstream: FaultyUpstream, fault: str, status: int, error: str
) -> None:
    with no_leak(gateway, upstream):
        for got, body, elapsed in asyncio.run(_ws_many(gateway, fault)):
            assert (got, json.loads(body)["error"]) == (status, error), body
            assert elapsed < CONNECT_TIMEOUT + 2, elapsed


async def _ws_upstream_dies(gateway: SessionGateway, path: str) -> int | None:
    """The close code the client gets when the upstream resets mid-relay (None: no close frame,
    the connection just ended)."""
    async with connect(f"ws://127.0.0.1:{gateway.port}{path}", additional_headers=gateway.headers) as ws:
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 5) == "ping"
        await ws.send("boom")  # the upstream resets on its second message
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd is not None else None


def test_websocket_upstream_reset_mid_relay_closes_the_client(
    gateway: SessionGateway, upstream: FaultyUpstream
) -> None:
    with no_leak(gateway, upstream):
        for i in range(REPEAT):
            code = asyncio.run(_ws_upstream_dies(gateway, f"/ws-echo-reset/{i}"))
            # RFC 6455 §7.4.1: the upstream went without a close frame, an internal error (1011).
            assert code == 1011, code
