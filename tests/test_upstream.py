"""gateway/upstream.py: the client under httpx, against raw TCP upstreams written here that
record the bytes they receive and misbehave on purpose. Every transport is built by
``gateway.proxy.default_transport``, as the forwarder builds it.

T1..T5 are the defects a review found in the hand-written client this module replaced."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.proxy import default_transport
from tests.support.servers import free_port, make_config

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
TIMEOUT = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawUpstream:
    """An asyncio TCP server: ``handler(reader, writer, n)`` per connection (n counts from 0);
    every byte received on connection n is kept in ``received[n]``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[bytearray] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = len(self.received)
        self.received.append(bytearray())
        recording = _Recording(reader, self.received[n])
        try:
            await self.handler(recording, writer, n)  # type: ignore[arg-type]
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def count(self, request_line: bytes) -> int:
        return sum(bytes(r).count(request_line) for r in self.received)


class _Recording:
    """A StreamReader that records what it reads."""

    def __init__(self, reader: asyncio.StreamReader, into: bytearray) -> None:
        self.reader = reader
        self.into = into

    async def readuntil(self, sep: bytes = b"\n") -> bytes:
        data = await self.reader.readuntil(sep)
        self.into += data
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self.into += data
        return data

    async def read(self, n: int = -1) -> bytes:
        data = await self.reader.read(n)
        self.into += data
        return data


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def make_transport(tmp_path: Path, port: int, **upstream: object) -> httpx.AsyncBaseTransport:
    return default_transport(make_config(tmp_path, upstream={"url": f"http://127.0.0.1:{port}", **upstream}))


def request(
    port: int,
    method: str = "GET",
    target: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    stream: httpx.AsyncByteStream | None = None,
    timeout: dict[str, float] | None = None,
) -> httpx.Request:
    return httpx.Request(
        method,
        f"http://127.0.0.1:{port}",
        headers=[(b"host", b"up.test"), *(headers or [])],
        stream=stream if stream is not None else httpx.ByteStream(b""),
        extensions={"timeout": timeout or TIMEOUT, "target": target},
    )


async def send(transport: httpx.AsyncBaseTransport, req: httpx.Request) -> tuple[httpx.Response, bytes]:
    response = await transport.handle_async_request(req)
    try:
        assert isinstance(response.stream, httpx.AsyncByteStream)
        body = b"".join([chunk async for chunk in response.stream])
    finally:
        await response.aclose()
    return response, body


class Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error


# -- T1: bytes after a complete response never answer the next request ----------------------

PLANTED = b"HTTP/1.1 302 Found\r\nLocation: /evil\r\nSet-Cookie: gateway_session=planted\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("delay", [None, 0.05])
async def test_t1_bytes_after_a_response_never_reach_the_next_request(tmp_path: Path, delay: float | None) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_head(reader)
            if n == 0:
                # A complete answer, then a second one nobody asked for: in the same packet, or
                # a moment later while the connection sits in the pool.
                if delay is None:
                    writer.write(OK + PLANTED)
                else:
                    writer.write(OK)
                    await writer.drain()
                    await asyncio.sleep(delay)
                    writer.write(PLANTED)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
            await writer.drain()

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            first, body = await send(transport, request(up.port, target=b"/alice"))
            assert (first.status_code, body) == (200, b"ok")
            await asyncio.sleep(0.2)
            second, body = await send(transport, request(up.port, target=b"/bob"))
            assert second.status_code == 200
            assert "set-cookie" not in second.headers
            assert body == b"second"
        finally:
            await transport.aclose()


# -- T2: a request that is not safe is never sent twice -------------------------------------


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH", "PUT"])
async def test_t2_a_non_safe_request_is_never_resent_on_a_dead_pooled_connection(tmp_path: Path, method: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(OK)  # keep-alive: the connection goes back to the pool
        await writer.drain()
        await read_head(reader)  # the second request arrives ... and the connection dies unanswered
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        transport.abort()

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            await send(transport, request(up.port, target=b"/warm-up"))
            with pytest.raises(httpx.TransportError) as caught:
                await send(transport, request(up.port, method, b"/transfer", headers=[(b"content-length", b"0")]))
            assert not isinstance(caught.value, httpx.TimeoutException)
            assert up.count(f"{method} /transfer ".encode()) == 1
        finally:
            await transport.aclose()


async def test_a_safe_request_is_retried_once_on_a_fresh_connection(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_head(reader)
            if n == 0 and len(up.received[0].split(b"\r\n\r\n")) > 2:
                return  # the pooled connection dies under the second request
            writer.write(OK)
            await writer.drain()

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            await send(transport, request(up.port))
            response, body = await send(transport, request(up.port, target=b"/again"))
            assert (response.status_code, body) == (200, b"ok")
            assert up.count(b"GET /again ") == 2
        finally:
            await transport.aclose()


# -- T3: a close-delimited body arrives whole ------------------------------------------------


async def test_t3_a_close_delimited_body_is_delivered_completely(tmp_path: Path) -> None:
    parts = [bytes([65 + i]) * 50_000 for i in range(5)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")  # RFC 9112 §6.3 item 8
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            response, body = await send(transport, request(up.port))
            assert response.status_code == 200
            assert body == b"".join(parts)
        finally:
            await transport.aclose()


# -- T4: an early answer during an upload reaches the client ---------------------------------


async def test_t4_an_early_413_during_an_upload_is_relayed(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!")
        await writer.drain()
        # Read a little of the body, as a server does before it gives up, then close.
        await reader.read(256 * 1024)
        await asyncio.sleep(0.05)

    size = 64 * 1024 * 1024
    chunk = b"x" * 65536
    body = Chunks([chunk] * (size // len(chunk)))
    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            req = request(up.port, "POST", b"/upload", [(b"content-length", str(size).encode())], body)
            response, answer = await send(transport, req)
            assert (response.status_code, answer) == (413, b"too big!")
        finally:
            await transport.aclose()


# -- T5: response heads are capped -----------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"".join(b"X-H%d: v\r\n" % i for i in range(100_000)),
        b"X-Big: " + b"v" * (1024 * 1024) + b"\r\n",
    ],
    ids=["100k-headers", "1MiB-header"],
)
async def test_t5_a_huge_response_head_is_refused(tmp_path: Path, head: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            with pytest.raises(httpx.RemoteProtocolError):
                await send(transport, request(up.port))
        finally:
            await transport.aclose()


# -- what goes on the wire --------------------------------------------------------------------


async def _capture(tmp_path: Path, req: Callable[[int], httpx.Request]) -> bytes:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        head = await read_head(reader)
        if b"content-length: 5" in head.lower():
            await reader.readexactly(5)
        elif b"transfer-encoding" in head.lower():
            await reader.readuntil(b"0\r\n\r\n")
        writer.write(OK)
        await writer.drain()

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            async with asyncio.timeout(30):  # a hang is a failure, not a stuck run
                response, _ = await send(transport, req(up.port))
            assert response.status_code == 200
        finally:
            await transport.aclose()
        return bytes(up.received[0])


@pytest.mark.parametrize(
    "target",
    [
        b"/a%2Fb/%2e%2E/c",
        b"/caf%C3%A9/%E2%82%AC?q=%C3%A9&x=%zz&y=a+b",
        b"/p;jsessionid=1;x=y/q",
        b"/a//b/./c?&",
        b"/%25?a=%2526&b=[1]&c=|&d={}",
        b"/app?x=/..;/admin&e=%00",
    ],
)
async def test_the_target_goes_byte_for_byte(tmp_path: Path, target: bytes) -> None:
    wire = await _capture(tmp_path, lambda port: request(port, target=target))
    assert wire.startswith(b"GET " + target + b" HTTP/1.1\r\n")


async def test_nothing_is_added_to_a_get(tmp_path: Path) -> None:
    headers = [(b"x-a", b"1"), (b"Cookie", b"a=b")]
    wire = await _capture(tmp_path, lambda port: request(port, headers=headers))
    assert wire == b"GET / HTTP/1.1\r\nhost: up.test\r\nx-a: 1\r\nCookie: a=b\r\n\r\n"


async def test_a_set_cookie_from_the_upstream_is_never_sent_back(tmp_path: Path) -> None:
    # No cookie jar: one user's Set-Cookie must not ride along on the next user's request.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=alice; Path=/\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            first, _ = await send(transport, request(up.port, target=b"/alice"))
            assert first.headers["set-cookie"] == "sid=alice; Path=/"
            await send(transport, request(up.port, target=b"/bob"))
            wire = b"".join(up.received)
            assert wire.count(b"GET ") == 2
            assert b"cookie" not in wire.lower()
        finally:
            await transport.aclose()


async def test_utf8_header_bytes_go_unchanged(tmp_path: Path) -> None:
    headers = [(b"x-name", "Zoë €".encode())]
    wire = await _capture(tmp_path, lambda port: request(port, headers=headers))
    assert b"\r\nx-name: " + "Zoë €".encode() + b"\r\n" in wire


@pytest.mark.parametrize(
    ("method", "framing", "expected"),
    [
        ("POST", [(b"content-length", b"5")], b"content-length: 5\r\n\r\nabcde"),
        (
            "PUT",
            [(b"transfer-encoding", b"chunked")],
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        ),
        ("POST", [(b"content-length", b"0")], b"content-length: 0\r\n\r\n"),
        ("DELETE", [], b"Content-Length: 0\r\n\r\n"),
        ("GET", [], b"host: up.test\r\n\r\n"),
    ],
)
async def test_one_framing_matching_the_body(
    tmp_path: Path, method: str, framing: list[tuple[bytes, bytes]], expected: bytes
) -> None:
    wire = await _capture(tmp_path, lambda port: request(port, method, b"/", framing, Chunks([b"abc", b"de"])))
    assert wire.endswith(expected)
    lower = wire.lower()
    assert not (b"content-length" in lower and b"transfer-encoding" in lower)


async def test_an_expectation_is_not_forwarded(tmp_path: Path) -> None:
    headers = [(b"expect", b"100-continue"), (b"content-length", b"5")]
    wire = await _capture(tmp_path, lambda port: request(port, "POST", b"/", headers, Chunks([b"abc", b"de"])))
    assert wire == b"POST / HTTP/1.1\r\nhost: up.test\r\ncontent-length: 5\r\n\r\nabcde"


async def test_a_header_that_is_not_utf8_or_would_split_a_line_is_refused(tmp_path: Path) -> None:
    for value in (b"caf\xe9", b"one\r\nX-Injected: yes", b"bare\nlf"):
        with pytest.raises(httpx.LocalProtocolError):
            await _capture(tmp_path, lambda port, v=value: request(port, headers=[(b"x-a", v)]))  # type: ignore[misc]


async def test_a_target_that_would_not_round_trip_is_refused(tmp_path: Path) -> None:
    for target in (b"/a#frag", b"/a b", b"/a\r\nX: y", "/é".encode()):
        with pytest.raises(httpx.LocalProtocolError):
            await _capture(tmp_path, lambda port, t=target: request(port, target=t))  # type: ignore[misc]


# -- answers that have no body, or are not final -------------------------------------------


@pytest.mark.parametrize(
    ("method", "answer", "status"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", 200),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", 204),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n", 304),
        ("GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n" + OK, 200),
        ("GET", b"HTTP/1.1 200 OK\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\nok", 200),
    ],
)
async def test_bodiless_and_interim_answers_then_the_connection_is_reused(
    tmp_path: Path, method: str, answer: bytes, status: int
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(answer)
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
        await writer.drain()

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            response, body = await send(transport, request(up.port, method))
            assert response.status_code == status
            assert body == (b"ok" if status == 200 and method == "GET" else b"")
            response, body = await send(transport, request(up.port))
            assert (response.status_code, body) == (200, b"next")
        finally:
            await transport.aclose()


async def test_a_101_to_a_request_that_asked_no_upgrade_is_refused(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            with pytest.raises(httpx.RemoteProtocolError):
                await send(transport, request(up.port))
        finally:
            await transport.aclose()


# -- errors, each as httpx's ------------------------------------------------------------------


async def test_refused_is_a_connect_error(tmp_path: Path) -> None:
    port = free_port()
    transport = make_transport(tmp_path, port)
    try:
        with pytest.raises(httpx.ConnectError):
            await send(transport, request(port))
    finally:
        await transport.aclose()


async def test_a_connect_that_never_completes_is_a_connect_timeout(tmp_path: Path) -> None:
    # A listening socket whose accept queue is full: Linux drops further SYNs, so the connect
    # neither succeeds nor fails until the connect timeout.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers: list[socket.socket] = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            transport = make_transport(tmp_path, port)
            try:
                with pytest.raises(httpx.ConnectTimeout):
                    async with asyncio.timeout(10):
                        await send(transport, request(port, timeout={**TIMEOUT, "connect": 0.3}))
            finally:
                await transport.aclose()
        finally:
            for filler in fillers:
                filler.close()


async def test_a_reset_is_a_read_error_not_a_timeout(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            with pytest.raises(httpx.ReadError):
                await send(transport, request(up.port))
        finally:
            await transport.aclose()


async def test_a_body_cut_short_is_an_error(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            with pytest.raises(httpx.TransportError):
                await send(transport, request(up.port))
        finally:
            await transport.aclose()


async def test_timeouts_read_and_pool(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        await asyncio.sleep(1.0)
        writer.write(OK)
        await writer.drain()

    short = {**TIMEOUT, "read": 0.2, "pool": 0.1}
    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port, max_connections=1)
        try:
            with pytest.raises(httpx.ReadTimeout):
                await send(transport, request(up.port, timeout=short))
            held = asyncio.ensure_future(send(transport, request(up.port)))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await send(transport, request(up.port, timeout=short))
            response, _ = await held
            assert response.status_code == 200
        finally:
            await transport.aclose()


async def test_a_stalled_upload_is_a_write_timeout(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        await asyncio.sleep(3)  # never reads the body

    size = 256 * 1024 * 1024
    chunk = b"x" * 65536
    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            req = request(
                up.port,
                "POST",
                b"/",
                [(b"content-length", str(size).encode())],
                Chunks([chunk] * (size // len(chunk))),
                timeout={**TIMEOUT, "write": 0.3},
            )
            with pytest.raises(httpx.WriteTimeout):
                await send(transport, req)
        finally:
            await transport.aclose()


async def test_an_error_from_the_request_body_stream_comes_out_unchanged(tmp_path: Path) -> None:
    class Gone(Exception):
        pass

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        await reader.read()

    async with RawUpstream(handler) as up:
        transport = make_transport(tmp_path, up.port)
        try:
            req = request(up.port, "POST", b"/", [(b"content-length", b"10")], Chunks([b"abc"], Gone()))
            with pytest.raises(Gone):
                await send(transport, req)
        finally:
            await transport.aclose()


# -- TLS ----------------------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_an_https_upstream_is_verified_and_works(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_head(reader)
            writer.write(OK)
            await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    url = f"https://127.0.0.1:{port}"
    from gateway.upstream import AiohttpTransport  # here, so the other tests also run on older trees

    try:
        untrusting = default_transport(make_config(tmp_path, upstream={"url": url}))
        trusting = AiohttpTransport(ssl_context=ssl.create_default_context(cafile=str(cert)))
        try:
            with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused
                await send(untrusting, httpx.Request("GET", url, extensions={"timeout": TIMEOUT, "target": b"/"}))
            response, body = await send(
                trusting, httpx.Request("GET", url, extensions={"timeout": TIMEOUT, "target": b"/t?x=1"})
            )
            assert (response.status_code, body) == (200, b"ok")
        finally:
            await untrusting.aclose()
            await trusting.aclose()
    finally:
        server.close()
