"""A raw TCP upstream that records what it received on the wire, for differential tests.

Whatever HTTP client the gateway uses underneath httpx, this sees the bytes it sent. Each
connection is parsed with h11 (strict RFC 9112), so every request the bytes contain is
counted, including one smuggled inside another's body; bytes h11 refuses are recorded as a
``protocol error`` on that connection instead of being guessed at. Every answer is 200 and
carries ``X-Upstream-Seq``, the number of the request it answers, so a client of the gateway
can tell which upstream request (if any) produced its response.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field

import h11
import httptools

from tests.support.servers import free_port

SEQ_HEADER = "x-upstream-seq"


@dataclass
class Received:
    seq: int
    connection: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class Recorder:
    """Start with ``start()``; ``requests``, ``errors`` and ``raw`` fill in as the upstream is used."""

    port: int = field(default_factory=free_port)
    requests: list[Received] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    raw: dict[int, bytearray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Recorder:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(timeout=10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()  # else its self-pipe is reported unclosed (ResourceWarning) at exit

    def snapshot(self) -> tuple[list[Received], list[str]]:
        with self._lock:
            return list(self.requests), list(self.errors)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._connections += 1
            number = self._connections
            self.raw[number] = bytearray()
        conn = h11.Connection(h11.SERVER)
        current: Received | None = None
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    with self._lock:
                        self.errors.append(f"connection {number}: protocol error: {exc}")
                    return
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    with self._lock:
                        self.raw[number] += data
                    conn.receive_data(data)
                    if not data and conn.their_state is h11.IDLE:
                        return
                    continue
                if event is h11.PAUSED:
                    # A declined upgrade (h11 pauses after a request with Upgrade): answered
                    # below as an ordinary request; anything after it on this connection is
                    # what a client would speak after a switch, so record it as an error.
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                        continue
                    leftover, _ = conn.trailing_data
                    if leftover:
                        with self._lock:
                            self.errors.append(f"connection {number}: bytes after an upgrade request")
                    return
                if isinstance(event, h11.Request):
                    with self._lock:
                        current = Received(
                            seq=len(self.requests) + 1,
                            connection=number,
                            method=event.method.decode("latin-1"),
                            target=event.target.decode("latin-1"),
                            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
                        )
                        self.requests.append(current)
                elif isinstance(event, h11.Data) and current is not None:
                    current.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage) and current is not None:
                    body = b"seen"
                    response = h11.Response(
                        status_code=200,
                        headers=[(SEQ_HEADER, str(current.seq)), ("content-length", str(len(body)))],
                    )
                    out = conn.send(response)
                    if current.method != "HEAD":  # RFC 9110 §9.3.2: the same head, no content
                        out += conn.send(h11.Data(data=body))
                    writer.write(out + conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    current = None
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                    elif conn.our_state is h11.MUST_CLOSE:
                        return
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except ConnectionError:
            pass  # the peer closed its end (a pooled connection retired): not a parse error
        except h11.LocalProtocolError as exc:
            with self._lock:
                self.errors.append(f"connection {number}: {type(exc).__name__}")
        finally:
            writer.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = b""

    @property
    def upstream_seq(self) -> int | None:
        seq = self.headers.get(SEQ_HEADER)
        return int(seq) if seq is not None else None


class _ResponseParser:
    """httptools callbacks collecting every response on one connection."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.head: Answer | None = None
        self._headers: dict[str, str] = {}
        self._body = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head = Answer(self.parser.get_status_code(), dict(self._headers))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.answers.append(Answer(self.parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = {}, b""


class RawClient:
    """One client connection to a server, speaking raw bytes: nothing is normalised on the way
    out. ``ask`` sends bytes and waits for the next complete response; ``None`` when the server
    closed the connection or sent nothing before ``timeout``."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.parser = _ResponseParser()
        self.closed = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def ask(self, data: bytes) -> Answer | None:
        if self.closed:
            return None
        if data.startswith(b"HEAD "):
            return self._ask_head(data)
        wanted = len(self.parser.answers) + 1
        try:
            self.sock.sendall(data)
            while len(self.parser.answers) < wanted:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.closed = True
                    break
                self.parser.parser.feed_data(chunk)
        except (OSError, httptools.HttpParserError):
            self.closed = True
        return self.parser.answers[wanted - 1] if len(self.parser.answers) >= wanted else None

    def _ask_head(self, data: bytes) -> Answer | None:
        # RFC 9110 §9.3.2: the answer to HEAD has the framing headers of a GET but no content,
        # which a response parser cannot know: parse its head alone.
        buffer = b""
        try:
            self.sock.sendall(data)
            while b"\r\n\r\n" not in buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.closed = True
                    return None
                buffer += chunk
        except OSError:
            self.closed = True
            return None
        parser = _ResponseParser()
        try:
            parser.parser.feed_data(buffer.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
        except httptools.HttpParserError:
            self.closed = True
        return parser.head


def exchange(port: int, data: bytes, timeout: float = 5.0) -> Answer | None:
    """One raw request on a fresh connection: its answer."""
    with RawClient(port, timeout) as client:
        return client.ask(data)
