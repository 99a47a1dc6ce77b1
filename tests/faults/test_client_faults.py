"""Client faults against a real ``gateway run`` process in proxy mode (issue 14 §1 "Client
faults"): a client with a valid 2FA session goes away in the middle of an upload, a download or
a WebSocket relay, or stops reading its download. The upstream must see its request aborted
(never a completed request whose body was cut short), the gateway must let go of the upstream
connection (not pool it half read), and nothing may leak: the gateway's file descriptors
(``/proc/PID/fd``) and the upstream's open connections (its own view) come back to where they
were once the faults settle. Each fault is repeated ``REPEAT`` times so a per-request leak shows.

The upstream is uvicorn in a thread, running a small ASGI app that records, per request, that
it started and how it ended: ``complete`` (the whole body read, or the whole answer sent) or
``aborted`` (uvicorn reported the connection gone first) with the bytes seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect

from tests.support.leaks import SessionGateway, session_gateway
from tests.support.load import SESSION_COOKIE
from tests.support.servers import free_port, wait_for_port

REPEAT = 20
SEND_TIMEOUT = 1.0
# How long the faults may take to settle (connections closed, tasks ended) before counting.
SETTLE = 5.0
CHUNK = b"d" * 65536
# The gateway's upstream WebSocket's close_timeout (gateway/websocket.py; the library's default
# of 10 s held each stalled socket's upstream connection that long).
WS_CLOSE_TIMEOUT = 2.0
# What a WebSocket floods with: random, so no compression could shrink it to nothing.
NOISE = os.urandom(65536)
# How long the upstream's /slow thinks: well under the gateway's read_timeout (60 s), well over
# the time it should take the gateway to notice its client left.
SLOW = 8.0
DOWNLOAD_CHUNKS = 1024  # 64 MiB: more than every socket buffer between upstream and client


@dataclass
class Seen:
    started: float
    outcome: str = ""  # "complete" or "aborted"
    size: int = 0
    ended: float = 0.0


@dataclass
class Observer:
    """What the upstream saw, by request path."""

    requests: dict[str, Seen] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, path: str) -> Seen:
        seen = Seen(time.monotonic())
        with self.lock:
            self.requests[path] = seen
        return seen

    def end(self, seen: Seen, outcome: str) -> None:
        seen.ended = time.monotonic()
        seen.outcome = outcome

    def wait(self, path: str, ended: bool, timeout: float = SETTLE) -> Seen:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.requests.get(path)
            if seen is not None and (not ended or seen.outcome):
                return seen
            time.sleep(0.005)
        raise AssertionError(f"{path}: the upstream saw {'no end of' if ended else 'no'} request in {timeout} s")


def upstream_app(observer: Observer) -> Any:
    async def watch(receive: Any, gone: asyncio.Event) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    async def upload(path: str, receive: Any, send: Any) -> None:
        seen = observer.start(path)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return observer.end(seen, "aborted")
            seen.size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        observer.end(seen, "complete")
        body = str(seen.size).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    async def download(path: str, receive: Any, send: Any) -> None:
        seen = observer.start(path)
        gone = asyncio.Event()
        watcher = asyncio.create_task(watch(receive, gone))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for _ in range(DOWNLOAD_CHUNKS):
                await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
                await asyncio.sleep(0)  # uvicorn's send after a disconnect returns at once: let watch run
                if gone.is_set():
                    return observer.end(seen, "aborted")
                seen.size += len(CHUNK)
            await send({"type": "http.response.body", "body": b""})
            observer.end(seen, "complete")
        finally:
            watcher.cancel()

    async def slow(path: str, receive: Any, send: Any) -> None:
        # Thinks for up to SLOW seconds before answering; stops as soon as its client is gone.
        seen = observer.start(path)
        gone = asyncio.Event()
        watcher = asyncio.create_task(watch(receive, gone))
        try:
            await asyncio.wait_for(gone.wait(), SLOW)
        except TimeoutError:
            observer.end(seen, "complete")
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
        else:
            observer.end(seen, "aborted")
        finally:
            watcher.cancel()

    async def flood(path: str, receive: Any, send: Any) -> None:
        # Sends until the client is gone (a feed, a log tail): what a stalled reader is sent.
        seen = observer.start(path)
        gone = asyncio.Event()

        async def watch_ws() -> None:
            while (await receive())["type"] != "websocket.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch_ws())
        try:
            while not gone.is_set():
                sending = asyncio.ensure_future(send({"type": "websocket.send", "bytes": NOISE}))
                await asyncio.wait([sending, watcher], return_when=asyncio.FIRST_COMPLETED)
                if not sending.done():
                    sending.cancel()
                    break
                if sending.exception() is not None:
                    break
                seen.size += 1
        finally:
            watcher.cancel()
        observer.end(seen, "aborted")

    async def echo(path: str, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        if path.startswith("/wsflood"):
            return await flood(path, receive, send)
        seen = observer.start(path)
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return observer.end(seen, "aborted")
            seen.size += 1
            await send({"type": "websocket.send", "text": message.get("text") or ""})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        if scope["type"] == "websocket":
            return await echo(path, receive, send)
        if path.startswith("/upload"):
            return await upload(path, receive, send)
        if path.startswith("/download"):
            return await download(path, receive, send)
        if path.startswith("/slow"):
            return await slow(path, receive, send)
        body = b"ok"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": body})

    return app


class Upstream:
    def __init__(self) -> None:
        self.observer = Observer()
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                upstream_app(self.observer), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connections(self) -> int:
        """Connections open at the upstream, as it sees them."""
        return len(self.server.server_state.connections)

    def __enter__(self) -> Upstream:
        self.thread.start()
        wait_for_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Gateway(SessionGateway):
    """The gateway, spoken to over raw sockets: a client that can go away at any byte."""

    def head(self, method: str, path: str, extra: str = "") -> bytes:
        return (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nRemote-User: alice\r\n"
            f"Cookie: {SESSION_COOKIE}={self.session}\r\n{extra}\r\n"
        ).encode()

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket()
        if rcvbuf is not None:  # before connect, so the window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def get(self, path: str) -> bytes:
        """A whole small answer on a fresh connection."""
        with self.connect() as sock:
            sock.sendall(self.head("GET", path, "Connection: close\r\n"))
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("client-faults")
    with session_gateway(base, upstream.url, server=f"send_timeout = {SEND_TIMEOUT}") as running:
        yield Gateway(running.port, running.pid, running.session, running.log)
    log = running.log.read_text()
    assert "Traceback" not in log, log


@contextlib.contextmanager
def no_leak(gateway: Gateway, upstream: Upstream, settle: float = SETTLE) -> Iterator[None]:
    """The gateway's fds and tasks and the upstream's connections after the block are no more
    than before it, once settled; and an ordinary request through the same gateway works."""
    with gateway.no_leak(upstream.connections, lambda name: gateway.get(f"/{name}").endswith(b"ok"), settle):
        yield


def _upload_and_vanish(gateway: Gateway, upstream: Upstream, path: str, extra: str, body: bytes) -> Seen:
    sock = gateway.connect()
    try:
        sock.sendall(gateway.head("POST", path, extra) + body)
        upstream.observer.wait(path, ended=False)  # the request is upstream, its body under way
    finally:
        sock.close()
    return upstream.observer.wait(path, ended=True)


def test_upload_cut_short_with_content_length_is_aborted_upstream(gateway: Gateway, upstream: Upstream) -> None:
    with no_leak(gateway, upstream):
        for i in range(REPEAT):
            seen = _upload_and_vanish(
                gateway, upstream, f"/upload/cl-{i}", "Content-Length: 1000000\r\n", b"u" * 300_000
            )
            assert (seen.outcome, seen.size < 1_000_000) == ("aborted", True), seen


def test_chunked_upload_cut_short_is_aborted_upstream_not_completed(gateway: Gateway, upstream: Upstream) -> None:
    # The gateway frames the body upstream itself (chunked): a client gone mid-body must not
    # become a last chunk, which would hand the upstream a whole request with a truncated body.
    chunks = b"".join(b"1000\r\n" + b"c" * 4096 + b"\r\n" for _ in range(40))
    with no_leak(gateway, upstream):
        for i in range(REPEAT):
            seen = _upload_and_vanish(gateway, upstream, f"/upload/te-{i}", "Transfer-Encoding: chunked\r\n", chunks)
            assert seen.outcome == "aborted", seen


def test_download_abandoned_closes_the_upstream_connection(gateway: Gateway, upstream: Upstream) -> None:
    with no_leak(gateway, upstream):
        for i in range(REPEAT):
            path = f"/download/read-{i}"
            with gateway.connect() as sock:
                sock.sendall(gateway.head("GET", path))
                got = 0
                while got < 200_000:
                    got += len(sock.recv(65536))
            seen = upstream.observer.wait(path, ended=True)
            assert seen.outcome == "aborted", seen


def test_client_that_stops_reading_is_dropped_after_send_timeout(gateway: Gateway, upstream: Upstream) -> None:
    with no_leak(gateway, upstream):
        socks = [gateway.connect(rcvbuf=4096) for _ in range(REPEAT)]
        try:
            paths = [f"/download/stalled-{i}" for i in range(REPEAT)]
            for sock, path in zip(socks, paths, strict=True):
                sock.sendall(gateway.head("GET", path))
            started = [upstream.observer.wait(path, ended=False) for path in paths]
            # Nothing is read: the gateway's writes pause, and send_timeout later it drops them.
            ended = [upstream.observer.wait(path, ended=True, timeout=SEND_TIMEOUT + SETTLE) for path in paths]
        finally:
            for sock in socks:
                sock.close()
    assert all(seen.outcome == "aborted" for seen in ended), ended
    waited = [seen.ended - start.started for seen, start in zip(ended, started, strict=True)]
    assert all(SEND_TIMEOUT <= w < SEND_TIMEOUT + SETTLE for w in waited), waited


async def _relay_and_vanish(gateway: Gateway, path: str) -> None:
    url = f"ws://127.0.0.1:{gateway.port}{path}"
    headers = {"Remote-User": "alice", "Cookie": f"{SESSION_COOKIE}={gateway.session}"}
    ws = await connect(url, additional_headers=headers, open_timeout=5)
    await ws.send("ping")
    assert await asyncio.wait_for(ws.recv(), 5) == "ping"
    ws.transport.abort()  # gone without a close frame, as a client whose network dropped
    with contextlib.suppress(Exception):
        await ws.wait_closed()


def test_websocket_client_gone_closes_the_upstream_websocket(gateway: Gateway, upstream: Upstream) -> None:
    with no_leak(gateway, upstream):
        for i in range(REPEAT):
            path = f"/ws/{i}"
            asyncio.run(_relay_and_vanish(gateway, path))
            seen = upstream.observer.wait(path, ended=True)
            assert (seen.outcome, seen.size) == ("aborted", 1), seen


def test_client_gone_before_the_answer_cancels_the_upstream_request(gateway: Gateway, upstream: Upstream) -> None:
    # The client gives up while the upstream is still thinking (no response head yet): the
    # upstream request is cancelled then, as nginx's does (proxy_ignore_client_abort off), not
    # left to run to its end, holding an upstream connection for nobody.
    with no_leak(gateway, upstream):
        for i in range(REPEAT):
            path = f"/slow/{i}"
            with gateway.connect() as sock:
                sock.sendall(gateway.head("GET", path))
                started = upstream.observer.wait(path, ended=False)
            seen = upstream.observer.wait(path, ended=True, timeout=SLOW + SETTLE)
            assert (seen.outcome, seen.ended - started.started < SLOW / 2) == ("aborted", True), seen


async def _stall(gateway: Gateway, path: str) -> Any:
    """A WebSocket through the gateway whose client reads nothing (the library's queue of one
    message fills, then it stops reading the socket) but keeps the connection open."""
    url = f"ws://127.0.0.1:{gateway.port}{path}"
    headers = {"Remote-User": "alice", "Cookie": f"{SESSION_COOKIE}={gateway.session}"}
    # No permessage-deflate: the buffers fill with the flood itself, not after minutes of
    # compressing it.
    return await connect(url, additional_headers=headers, open_timeout=5, max_queue=1, compression=None)


def test_websocket_client_that_stops_reading_is_dropped_after_send_timeout(
    gateway: Gateway, upstream: Upstream
) -> None:
    paths = [f"/wsflood/{i}" for i in range(REPEAT)]

    async def stall_all() -> list[Seen]:
        clients = [await _stall(gateway, path) for path in paths]
        try:
            return [
                await asyncio.to_thread(upstream.observer.wait, path, True, SEND_TIMEOUT + SETTLE) for path in paths
            ]
        finally:
            for ws in clients:
                ws.transport.abort()

    # Closing the upstream WebSocket waits for its close frame, which is behind the flood the
    # gateway stopped reading: the gateway gives up after its close_timeout, and lets go.
    with no_leak(gateway, upstream, settle=WS_CLOSE_TIMEOUT + 1.0):
        ended = asyncio.run(stall_all())
    assert all(seen.outcome == "aborted" for seen in ended), ended
    waited = [seen.ended - seen.started for seen in ended]
    assert all(w < SEND_TIMEOUT + SETTLE for w in waited), waited
