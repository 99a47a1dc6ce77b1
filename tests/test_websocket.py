"""WebSocket upgrades through the gateway: checked like any request, then relayed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from starlette.types import Message
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from gateway.app import Gateway, create_app
from gateway.config import Config
from gateway.factors import Accepted, SecondFactor, proof_of
from gateway.store import open_store_from_url
from gateway.websocket import SESSION_ENDED, encode_query, sendable_close_code
from tests.conftest import RedisServer
from tests.support.servers import GatewayServer, UpstreamProcess, enrol, make_config


@pytest.fixture(scope="module")
def gw(upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    server = GatewayServer(make_config(tmp_path_factory.mktemp("ws"), upstream=upstream.url)).start()
    yield server
    server.stop()


def ws_url(gw: GatewayServer, path: str) -> str:
    return f"ws://127.0.0.1:{gw.port}{path}"


async def test_handshake_without_second_factor_is_refused(gw: GatewayServer) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url(gw, "/ws"), additional_headers={"Remote-User": "alice"}):
            pass
    assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        async with connect(ws_url(gw, "/public/../ws")):
            pass


async def test_relay_with_code_subprotocol_and_close_code(gw: GatewayServer) -> None:
    secret = await asyncio.to_thread(enrol, gw.config, "wsuser")
    headers = {"Remote-User": "wsuser", "X-2FA-Code": pyotp.TOTP(secret).now()}
    offered = [Subprotocol("chat.v2"), Subprotocol("chat.v1")]
    async with connect(ws_url(gw, "/ws?x=1"), additional_headers=headers, subprotocols=offered) as ws:
        assert ws.subprotocol == "chat.v2"
        assert ws.response is not None
        assert ws.response.headers.get("set-cookie", "").startswith(gw.config.session.cookie + "=")
        assert await ws.recv() == "hello wsuser"  # the upstream saw the verified user
        await ws.send("ping")
        assert await ws.recv() == "echo ping"
        await ws.send(b"\x00\x01binary")
        assert await ws.recv() == b"\x00\x01binary"
        await ws.send("close")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 4000
    assert ws.close_reason == "asked"


async def test_permessage_deflate_is_never_negotiated_with_a_client(gw: GatewayServer) -> None:
    # The websockets client offers permessage-deflate (RFC 7692) by default; the gateway declines
    # it (gateway/server.py: ~300 KiB of zlib state per connection, and CRIME-style leaks).
    async with connect(ws_url(gw, "/public/ws")) as ws:
        assert ws.request is not None and "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
        assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
        assert await ws.recv() == "hello "


async def test_excluded_websocket_path_needs_no_code(gw: GatewayServer) -> None:
    async with connect(ws_url(gw, "/public/ws")) as ws:
        assert await ws.recv() == "hello "  # no user for an excluded path


async def open_raw(gw: GatewayServer, target: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An upgraded connection whose request target goes on the wire exactly as given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET " + target + b" HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (gw.port, key)
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
    except BaseException:
        await close_raw(writer)
        raise
    return reader, writer


async def close_raw(writer: asyncio.StreamWriter, abort: bool = False) -> None:
    if abort:
        # SO_LINGER 0: the socket is reset (TCP RST), no close frame is sent.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def read_text(reader: asyncio.StreamReader) -> str:
    """One unfragmented text frame from the server (unmasked, RFC 6455 §5.2)."""
    first, second = await asyncio.wait_for(reader.readexactly(2), 5)
    assert first == 0x81, hex(first)
    size = second & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    return (await reader.readexactly(size)).decode()


def websocket_stats(upstream: UpstreamProcess) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(upstream.url + "/stats/websockets").json()
    return stats


async def wait_until_ended(upstream: UpstreamProcess, query: str, within: float = 5) -> tuple[int, int]:
    """``(close code, websockets still open)`` once the upstream websocket opened with ``query`` ended."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        stats = await asyncio.to_thread(websocket_stats, upstream)
        for ended in stats["ended"]:
            if ended["query"] == query:
                return ended["code"], stats["open"]
        await asyncio.sleep(0.05)
    raise AssertionError(f"the upstream websocket ?{query} is still open")


@pytest.fixture
def server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Warnings and errors from the gateway and from uvicorn (whose loggers may not propagate)."""
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            yield caplog
    finally:
        uvicorn_logger.removeHandler(caplog.handler)


@pytest.mark.parametrize(
    ("how", "relayed_codes"),
    [
        # A lost connection is reported as 1006 ("going away" upstream, RFC 6455 §7.4.1), or
        # as 1005 by uvicorn's default websockets implementation (a normal closure).
        ("abort", (1000, 1001)),
        ("close-without-status", (1000,)),  # 1005: a normal closure (RFC 6455 §7.1.5)
    ],
)
async def test_client_that_leaves_without_a_status_closes_the_upstream(
    gw: GatewayServer,
    upstream: UpstreamProcess,
    server_errors: pytest.LogCaptureFixture,
    how: str,
    relayed_codes: tuple[int, ...],
) -> None:
    before = (await asyncio.to_thread(websocket_stats, upstream))["open"]
    query = f"leave={how}&n={os.urandom(4).hex()}"
    reader, writer = await open_raw(gw, f"/public/ws?{query}".encode())
    try:
        assert await read_text(reader) == "hello "
        assert (await asyncio.to_thread(websocket_stats, upstream))["open"] == before + 1
        if how == "close-without-status":
            writer.write(b"\x88\x80" + os.urandom(4))  # a masked close frame with no payload
            assert (await asyncio.wait_for(reader.read(1), 5)) == b"\x88"  # the close is answered
    finally:
        await close_raw(writer, abort=how == "abort")
    code, still_open = await wait_until_ended(upstream, query)
    assert code in relayed_codes
    assert still_open == before
    await asyncio.sleep(0.2)  # the gateway's request has ended too: anything it logs is in by now
    assert [(r.name, r.getMessage()) for r in server_errors.records] == []


async def test_query_reaches_the_upstream_unchanged(gw: GatewayServer) -> None:
    query = b"x=%41&y=%ff&a=b&c&s=/?:@!$'()*+,;=&k=|^{}`~"
    reader, writer = await open_raw(gw, b"/public/ws/scope?" + query)
    try:
        seen = json.loads(await read_text(reader))
    finally:
        await close_raw(writer)
    assert seen == {"raw_path": "/public/ws/scope", "query": query.decode()}


@asynccontextmanager
async def started(app: Gateway) -> AsyncIterator[None]:
    """Run the app's lifespan around the block, in this event loop."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outgoing: asyncio.Queue[Message] = asyncio.Queue()
    incoming.put_nowait({"type": "lifespan.startup"})
    task = asyncio.ensure_future(app({"type": "lifespan"}, incoming.get, outgoing.put))
    assert (await asyncio.wait_for(outgoing.get(), 5))["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        incoming.put_nowait({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 5)


async def test_raw_query_bytes_and_a_lost_client_driven_through_asgi(
    upstream: UpstreamProcess, tmp_path: Path, server_errors: pytest.LogCaptureFixture
) -> None:
    # uvicorn refuses raw non-ASCII in a request line and reports a lost client as 1005, but other
    # ASGI servers pass raw query bytes on and report 1006: the app is driven directly for both.
    app = create_app(make_config(tmp_path, upstream=upstream.url))
    before = (await asyncio.to_thread(websocket_stats, upstream))["open"]
    nonce = os.urandom(4).hex()
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/public/ws/scope",
        "raw_path": b"/public/ws/scope",
        "query_string": b"q=\xff\xfe&r=%41&s=a b#c&n=" + nonce.encode(),
        "root_path": "",
        "headers": [(b"host", b"gateway.test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "subprotocols": [],
    }
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outgoing: asyncio.Queue[Message] = asyncio.Queue()
    incoming.put_nowait({"type": "websocket.connect"})
    async with started(app):
        task = asyncio.ensure_future(app(scope, incoming.get, outgoing.put))
        assert (await asyncio.wait_for(outgoing.get(), 5))["type"] == "websocket.accept"
        seen = json.loads((await asyncio.wait_for(outgoing.get(), 5))["text"])
        incoming.put_nowait({"type": "websocket.disconnect", "code": 1006})
        await asyncio.wait_for(task, 5)
    assert seen["query"] == f"q=%FF%FE&r=%41&s=a%20b%23c&n={nonce}"
    assert await wait_until_ended(upstream, seen["query"]) == (1001, before)  # "going away" (RFC 6455 §7.4.1)
    assert [(r.name, r.getMessage()) for r in server_errors.records] == []


@pytest.mark.parametrize(
    ("query", "encoded"),
    [
        (b"", ""),
        (b"a=%41%ff&b=c&d", "a=%41%ff&b=c&d"),
        (b"\xff\x00 \x7f#", "%FF%00%20%7F%23"),  # never raw in a request target; '#' starts a fragment
        (b'k=|^{}[]`"<>\\~', 'k=|^{}[]`"<>\\~'),  # printable ASCII is passed on as sent, as nginx does
    ],
)
def test_encode_query(query: bytes, encoded: str) -> None:
    assert encode_query(query) == encoded


@pytest.mark.parametrize(
    ("received", "abnormal", "sent"),
    [
        (1000, 1001, 1000),
        (4000, 1001, 4000),
        (1005, 1001, 1000),
        (1006, 1001, 1001),
        (1015, 1011, 1011),
        (None, 1011, 1011),
        (1004, 1001, 1001),
        (2000, 1001, 1001),
    ],
)
def test_sendable_close_code(received: int | None, abnormal: int, sent: int) -> None:
    assert sendable_close_code(received, abnormal=abnormal) == sent


# -- revocation reaches open sockets (revocation.py) ---------------------------------------------

# Generous: the bound is store.cache_ttl + 1 s (2 s with the default cache_ttl of 1 s).
_DEADLINE = 10


class Offset:
    """The gateway's clock: real time plus an offset a test can move forward (session expiry)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return time.time() + self.seconds


@pytest.fixture(scope="module")
def clock() -> Offset:
    return Offset()


@pytest.fixture(scope="module")
def rgw(upstream: UpstreamProcess, clock: Offset, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    config = make_config(tmp_path_factory.mktemp("ws-revoke"), upstream=upstream.url)
    server = GatewayServer(config, clock=clock).start()
    yield server
    server.stop()


async def with_factors(config: Config, work: Callable[[SecondFactor], Awaitable[Any]]) -> Any:
    """Run ``work`` on the gateway's store from outside it, as ``gateway users ...`` does."""
    store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
    await store.open()
    try:
        return await work(SecondFactor(config, store))
    finally:
        await store.close()


async def session_for(config: Config, user: str) -> str:
    """An enrolled ``user`` and a 2FA session of theirs (its id, the cookie value)."""
    await asyncio.to_thread(enrol, config, user)
    session: str = await with_factors(config, lambda f: f.open_session(user))
    return session


async def re_enrol(factors: SecondFactor, user: str) -> None:
    # A re-enrolment: the enrolment pages start one only after a code from the active secret.
    token = await factors.store.get_secret(user)
    assert token is not None
    secret = await factors.begin_enrolment(user, proof_of(factors.secrets.box.decrypt(user, token)))
    assert secret is not None
    outcome = await factors.finish_enrolment(user, pyotp.TOTP(secret).now(), None)
    assert isinstance(outcome, Accepted)


async def assert_closed_for_session(ws: Any, upstream: UpstreamProcess, query: str) -> None:
    """The client is closed with SESSION_ENDED and the upstream side of the socket is closed."""
    with pytest.raises(ConnectionClosed):
        while True:  # anything still in flight, then the close
            await asyncio.wait_for(ws.recv(), _DEADLINE)
    assert ws.close_code == SESSION_ENDED
    code, _ = await wait_until_ended(upstream, query, within=_DEADLINE)
    assert code == 1001  # "going away" (RFC 6455 §7.4.1)


@pytest.mark.parametrize("route", ["logout-2fa", "users-logout", "users-reset", "re-enrol", "expiry"])
async def test_ending_the_session_closes_its_open_socket(
    rgw: GatewayServer, upstream: UpstreamProcess, clock: Offset, route: str
) -> None:
    config = rgw.config
    user = f"rv-{route}-{uuid.uuid4().hex[:8]}"
    session = await session_for(config, user)
    cookie = f"{config.session.cookie}={session}"
    query = f"revoke={route}&n={uuid.uuid4().hex}"
    headers = {"Remote-User": user, "Cookie": cookie}
    async with connect(ws_url(rgw, f"/ws?{query}"), additional_headers=headers) as ws:
        assert await ws.recv() == f"hello {user}"
        await ws.send("2+2")
        assert await ws.recv() == "echo 2+2"
        try:
            if route == "logout-2fa":
                async with httpx.AsyncClient(base_url=rgw.url) as client:
                    r = await client.post("/logout-2fa", json={}, headers=headers)
                assert r.status_code == 200
            elif route == "users-logout":
                assert await with_factors(config, lambda f: f.revoke_user_sessions(user)) == 1
            elif route == "users-reset":
                await with_factors(config, lambda f: f.reset_user(user))
            elif route == "re-enrol":
                await with_factors(config, lambda f: re_enrol(f, user))
            else:
                clock.seconds = config.session.ttl + 1
            await assert_closed_for_session(ws, upstream, query)
        finally:
            clock.seconds = 0


async def test_socket_opened_with_a_code_ends_with_the_session_it_opened(
    rgw: GatewayServer, upstream: UpstreamProcess
) -> None:
    config = rgw.config
    user = f"rv-code-{uuid.uuid4().hex[:8]}"
    secret = await asyncio.to_thread(enrol, config, user)
    query = f"revoke=code&n={uuid.uuid4().hex}"
    headers = {"Remote-User": user, "X-2FA-Code": pyotp.TOTP(secret).now()}
    async with connect(ws_url(rgw, f"/ws?{query}"), additional_headers=headers) as ws:
        assert ws.response is not None
        assert ws.response.headers.get("set-cookie", "").startswith(config.session.cookie + "=")
        assert await ws.recv() == f"hello {user}"
        assert await with_factors(config, lambda f: f.revoke_user_sessions(user)) == 1
        await assert_closed_for_session(ws, upstream, query)


async def test_session_cookie_in_a_second_cookie_header_is_watched(
    rgw: GatewayServer, upstream: UpstreamProcess
) -> None:
    # HTTP/2 may split cookies over several Cookie headers (RFC 9113 §8.2.3): the session
    # that admitted the socket is found wherever it is.
    config = rgw.config
    user = f"rv-split-{uuid.uuid4().hex[:8]}"
    session = await session_for(config, user)
    headers = [("Remote-User", user), ("Cookie", "theme=dark"), ("Cookie", f"{config.session.cookie}={session}")]
    query = f"revoke=split&n={uuid.uuid4().hex}"
    async with connect(ws_url(rgw, f"/ws?{query}"), additional_headers=headers) as ws:
        assert await ws.recv() == f"hello {user}"
        await with_factors(config, lambda f: f.revoke_user_sessions(user))
        await assert_closed_for_session(ws, upstream, query)


async def test_socket_on_an_excluded_path_is_left_alone(rgw: GatewayServer, upstream: UpstreamProcess) -> None:
    config = rgw.config
    user = f"rv-excl-{uuid.uuid4().hex[:8]}"
    session = await session_for(config, user)
    headers = {"Remote-User": user, "Cookie": f"{config.session.cookie}={session}"}
    query = f"revoke=watched&n={uuid.uuid4().hex}"
    async with (
        connect(ws_url(rgw, "/public/ws"), additional_headers=headers) as public,
        connect(ws_url(rgw, f"/ws?{query}"), additional_headers=headers) as watched,
    ):
        assert await public.recv() == "hello "
        assert await watched.recv() == f"hello {user}"
        await with_factors(config, lambda f: f.revoke_user_sessions(user))
        await assert_closed_for_session(watched, upstream, query)
        # The pass that closed the watched socket has run; the excluded one carries no session.
        await public.send("still here")
        assert await asyncio.wait_for(public.recv(), 5) == "echo still here"


async def test_revoked_on_one_gateway_closes_the_socket_on_another(
    redis_server: RedisServer, upstream: UpstreamProcess, tmp_path: Path
) -> None:
    store = {"url": redis_server.url, "prefix": f"t{uuid.uuid4().hex}"}
    config = make_config(tmp_path, upstream=upstream.url, store=store)
    a, b = GatewayServer(config).start(), GatewayServer(config).start()
    try:
        user = f"rv-redis-{uuid.uuid4().hex[:8]}"
        session = await session_for(config, user)
        headers = {"Remote-User": user, "Cookie": f"{config.session.cookie}={session}"}
        query = f"revoke=replica&n={uuid.uuid4().hex}"
        async with connect(ws_url(b, f"/ws?{query}"), additional_headers=headers) as ws:
            assert await ws.recv() == f"hello {user}"
            await ws.send("2+2")
            assert await ws.recv() == "echo 2+2"
            async with httpx.AsyncClient(base_url=a.url) as client:
                assert (await client.post("/logout-2fa", json={}, headers=headers)).status_code == 200
            await assert_closed_for_session(ws, upstream, query)
    finally:
        a.stop()
        b.stop()
