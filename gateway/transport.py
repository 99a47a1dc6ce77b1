"""A lean HTTP/1.1 transport under httpx, for the one upstream a gateway talks to.

httpx stays the API (``httpx.Request`` in, ``httpx.Response`` out, httpx's exceptions); this
replaces what sits underneath. httpcore's pool checks every pooled connection with a
``select()`` and takes anyio locks on each request (encode/httpx#3215): with 64 concurrent
clients a profile of the gateway showed 64 % of its time there. This transport keeps idle
connections in a LIFO list per origin, learns that one closed from the event loop
(``connection_lost``) instead of polling sockets, and parses responses with httptools (the
llhttp parser uvicorn uses), so a pooled request costs O(1).

Scope, on purpose: HTTP/1.1 only, no proxies, no cookies, no redirects, no decoding. Bodies
stream both ways with flow control (reading pauses past 256 KiB buffered). A response that is
not read to its end closes its connection rather than returning it to the pool.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import typing
from collections.abc import AsyncIterator

import httptools
import httpx

_HIGH_WATER = 256 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}

Key = tuple[str, str, int]


def _timeout(request: httpx.Request, name: str) -> float | None:
    value = request.extensions.get("timeout", {}).get(name)
    return float(value) if value is not None else None


async def _wait(future: asyncio.Future[None], timeout: float | None, error: type[Exception], what: str) -> None:
    """Await ``future`` for at most ``timeout`` s; cheaper than wait_for (no extra task)."""
    if future.done():
        return future.result()
    if timeout is None:
        return await future
    loop = future.get_loop()  # not get_running_loop(): on Python 3.11 that costs a getpid() call

    def expire() -> None:
        if not future.done():
            future.set_exception(error(what))

    handle = loop.call_later(timeout, expire)
    try:
        await future
    finally:
        handle.cancel()


class _Connection(asyncio.Protocol):
    """One upstream connection: writes a request, parses its response, reports closure."""

    def __init__(self, pool: HttpToolsTransport, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle = False
        self.idle_since = 0.0
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False
        self.keep_alive = True
        self.error: Exception | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.reading_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.drain: asyncio.Future[None] | None = None
        self.writing_paused = False
        self.head_only = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = typing.cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.done and self.error is None:
            self.error = (
                httpx.ReadError("the upstream closed the connection mid-response")
                if self.head_done
                else httpx.RemoteProtocolError("the upstream closed the connection without a response")
            )
        self._wake()
        if self.drain is not None and not self.drain.done():
            self.drain.set_exception(httpx.WriteError("the upstream closed the connection"))
        if self.idle:
            self.pool._forget_idle(self)

    def data_received(self, data: bytes) -> None:
        if self.idle or self.done:
            # Bytes nobody asked for: the connection cannot be trusted for another request.
            self.keep_alive = False
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.error = httpx.RemoteProtocolError("unexpected protocol upgrade from the upstream")
            self.close()
        except httptools.HttpParserError:
            self.error = httpx.RemoteProtocolError("malformed response from the upstream")
            self.close()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.headers = []  # RFC 9110 §15.2: interim responses are not forwarded here
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        if self.head_only:
            # RFC 9110 §9.3.2: no body follows a HEAD response, whatever Content-Length says.
            # llhttp cannot be told so; do not reuse the connection.
            self.done = True
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.head_done:
            self.done = True

    # -- used by the transport ---------------------------------------------------------------

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def start(self, head_only: bool) -> None:
        self._reset()
        self.head_only = head_only
        self.idle = False

    async def write(self, data: bytes, timeout: float | None) -> None:
        if self.closed or self.transport is None:
            raise httpx.WriteError("the upstream connection is closed")
        self.transport.write(data)
        if self.writing_paused:
            self.drain = self.loop.create_future()
            await _wait(self.drain, timeout, httpx.WriteTimeout, "writing to the upstream timed out")

    async def read_head(self, timeout: float | None) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            await _wait(self.waiter, timeout, httpx.ReadTimeout, "the upstream did not answer in time")

    async def read_body(self, timeout: float | None) -> bytes:
        while True:
            if self.body:
                data = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
                self.body.clear()
                self.buffered = 0
                if self.reading_paused and self.transport is not None:
                    self.reading_paused = False
                    self.transport.resume_reading()
                return data
            if self.done:
                return b""
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            await _wait(self.waiter, timeout, httpx.ReadTimeout, "the upstream stopped sending in time")


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, pool: HttpToolsTransport, conn: _Connection, timeout: float | None) -> None:
        self.pool = pool
        self.conn: _Connection | None = conn
        self.timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        if conn is None:
            return
        while True:
            chunk = await conn.read_body(self.timeout)
            if not chunk:
                break
            yield chunk
        await self.aclose()

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self.pool._release(conn, reuse=conn.done and conn.keep_alive and not conn.closed and not conn.body)


class HttpToolsTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        max_connections: int = 256,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.ssl_context = ssl_context
        self._idle: dict[Key, list[_Connection]] = {}
        self._count = 0
        self._waiters: collections.deque[tuple[Key, asyncio.Future[_Connection | None]]] = collections.deque()

    # -- the pool ----------------------------------------------------------------------------

    def _forget_idle(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            conn.idle = False
            self._count -= 1
            self._hand_over(None)

    def _hand_over(self, conn: _Connection | None) -> bool:
        """Give a waiting request this connection (same origin) or a free slot. False if nobody waits."""
        while self._waiters:
            key, future = self._waiters.popleft()
            if future.done():
                continue
            if conn is not None and conn.key == key:
                future.set_result(conn)
            else:
                if conn is not None:
                    conn.close()  # its slot passes to the waiter
                else:
                    self._count += 1
                future.set_result(None)
            return True
        return False

    def _release(self, conn: _Connection, reuse: bool) -> None:
        if reuse and not conn.closed:
            if self._hand_over(conn):
                return
            conn.idle = True
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, []).append(conn)
            return
        conn.close()
        self._count -= 1
        self._hand_over(None)

    async def _acquire(self, key: Key, request: httpx.Request) -> _Connection:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            conn.idle = False
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry:
                conn.reused = True
                return conn
            conn.close()
            self._count -= 1
        if self._count >= self.max_connections:
            future: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append((key, future))
            try:
                await _wait(future, _timeout(request, "pool"), httpx.PoolTimeout, "no free upstream connection")  # type: ignore[arg-type]
            except BaseException:
                if future.done() and not future.cancelled() and future.exception() is None:
                    given = future.result()
                    if given is not None:
                        self._release(given, reuse=True)
                    else:
                        self._count -= 1
                        self._hand_over(None)
                raise
            given = future.result()
            if given is not None:
                given.reused = True
                return given
        else:
            self._count += 1
        try:
            return await self._connect(key, request)
        except BaseException:
            self._count -= 1
            self._hand_over(None)
            raise

    async def _connect(self, key: Key, request: httpx.Request) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        ssl_context = None
        if scheme == "https":
            ssl_context = self.ssl_context or httpx.create_ssl_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, key),
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=host if ssl_context else None,
                ),
                _timeout(request, "connect"),
            )
        except TimeoutError:
            raise httpx.ConnectTimeout("connecting to the upstream timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to the upstream: {exc.strerror or type(exc).__name__}") from None
        return conn

    # -- httpx -------------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 80))
        head, framing = _request_head(request)
        while True:
            conn = await self._acquire(key, request)
            try:
                return await self._exchange(conn, request, head, framing is _CHUNKED)
            except (httpx.RemoteProtocolError, httpx.WriteError):
                self._release(conn, reuse=False)
                # A pooled connection the upstream closed just as we reused it: the request
                # never reached it. Retry once on a fresh one if there is no body to replay.
                if conn.reused and not conn.head_done and framing is None:
                    continue
                raise
            except BaseException:
                self._release(conn, reuse=False)
                raise

    async def _exchange(self, conn: _Connection, request: httpx.Request, head: bytes, chunked: bool) -> httpx.Response:
        conn.start(head_only=request.method == "HEAD")
        write_timeout = _timeout(request, "write")
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            body = b"".join(stream)
            await conn.write(head + (_chunk(body) + b"0\r\n\r\n" if chunked and body else body), write_timeout)
            if chunked and not body:
                await conn.write(b"0\r\n\r\n", write_timeout)
        else:
            await conn.write(head, write_timeout)
            assert isinstance(stream, httpx.AsyncByteStream)
            async for chunk in stream:
                if chunk:
                    await conn.write(_chunk(chunk) if chunked else chunk, write_timeout)
            if chunked:
                await conn.write(b"0\r\n\r\n", write_timeout)
        read_timeout = _timeout(request, "read")
        await conn.read_head(read_timeout)
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_ResponseStream(self, conn, read_timeout),
            extensions={"http_version": b"HTTP/1.1"},
            request=request,
        )

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.idle = False
                conn.close()
        self._idle.clear()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)  # RFC 9112 §7.1


_CHUNKED = "chunked"
_LENGTH = "length"
_FRAMING_INITIALS = frozenset(b"tTcC")


def _request_head(request: httpx.Request) -> tuple[bytes, str | None]:
    """The request line and header block, and how the body is framed (RFC 9112 §6): chunked,
    by a non-zero length, or None (no body). No header lookups by name: one pass, one join."""
    target = request.extensions.get("target") or request.url.raw_path  # path and query, as given
    raw = request.headers.raw
    framing = None
    parts = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in raw:
        parts += (name, b": ", value, b"\r\n")
        if name[0] in _FRAMING_INITIALS:
            lower = name.lower()
            if lower == b"transfer-encoding":
                framing = _CHUNKED if value.strip().lower() == b"chunked" else _LENGTH
            elif lower == b"content-length" and framing is None and value.strip() not in (b"0", b""):
                framing = _LENGTH
    parts.append(b"\r\n")
    head = b"".join(parts)
    # RFC 9112 §5: a field line is one line. Every CR and LF in the block must be one of the
    # line ends written above; one more means a name or value would split a line (or the
    # target would), so the request is refused rather than sent.
    lines = len(raw) + 2
    if head.count(b"\r") != lines or head.count(b"\n") != lines or any(b":" in name for name, _ in raw):
        raise httpx.LocalProtocolError("invalid header line")
    return head, framing
