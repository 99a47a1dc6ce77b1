"""WebSocket upgrades through the gateway: checked like any request, then relayed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pyotp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

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
    async with connect(ws_url(gw, "/ws?x=1"), additional_headers=headers, subprotocols=["chat.v2", "chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v2"
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


async def test_excluded_websocket_path_needs_no_code(gw: GatewayServer) -> None:
    async with connect(ws_url(gw, "/public/ws")) as ws:
        assert await ws.recv() == "hello "  # no user for an excluded path
