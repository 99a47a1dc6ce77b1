"""WebSocket requests: decided like any request; proxying them is not built yet, so every
WebSocket handshake is refused (fail closed) with close code 1008 (RFC 6455 §7.4.1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from gateway.app import Gateway


async def proxy_websocket(gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1008})
