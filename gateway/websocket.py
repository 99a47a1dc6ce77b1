"""WebSocket upgrades: decided like any request, then relayed to the upstream.

The handshake is checked by the same decision as every HTTP request (a session cookie, a
code header, an excluded path). A denied handshake is closed before it is accepted, which
the ASGI server answers with HTTP 403 (RFC 6455 §4.2.2 lets the server refuse with any 4xx).
After the upstream accepts, messages are relayed both ways unchanged; the subprotocol the
upstream chose is passed on, and so are close codes and reasons (RFC 6455 §7.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import CloseCode

from gateway.errors import Reason
from gateway.paths import encode_path

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.websocket")

# Set by the client library itself for the upstream handshake (RFC 6455 §4.1).
_HANDSHAKE = frozenset(
    {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol"}
)
_POLICY_VIOLATION = 1008
_BAD_GATEWAY = 1014


async def proxy_websocket(gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    forwarder = gateway.forwarder
    facts, _ = gateway.facts({**scope, "method": "GET"})
    decision = await gateway.decide(facts, "proxy")
    if not decision.allowed or forwarder is None or decision.path is None:
        log.info("websocket handshake denied: %s", decision.reason.value)
        await send({"type": "websocket.close", "code": _POLICY_VIOLATION})
        return

    user = decision.user if decision.reason is not Reason.EXCLUDED else None
    headers = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in forwarder.request_headers({**scope, "method": "GET"}, user, facts.peer_trusted)
        if k not in _HANDSHAKE and k != b"host"
    ]
    query: bytes = scope.get("query_string", b"")
    scheme = "wss" if forwarder.upstream.scheme == "https" else "ws"
    target = forwarder.base_path.decode("ascii") + encode_path(decision.path)
    url = f"{scheme}://{forwarder.upstream.netloc.decode('ascii')}{target}" + (
        f"?{query.decode('latin-1')}" if query else ""
    )
    try:
        upstream = await connect(
            url,
            subprotocols=scope.get("subprotocols") or None,
            additional_headers=headers,
            user_agent_header=None,
            compression=None,
            proxy=None,
            open_timeout=forwarder.timeout["connect"],
            max_size=None,
            ping_interval=None,
        )
    except InvalidStatus as exc:
        log.warning("upstream refused the websocket handshake: %s", exc.response.status_code)
        await send({"type": "websocket.close", "code": _POLICY_VIOLATION})
        return
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        log.warning("upstream websocket unreachable: %s", type(exc).__name__)
        await send({"type": "websocket.close", "code": _BAD_GATEWAY})
        return

    accept: dict[str, Any] = {"type": "websocket.accept", "subprotocol": upstream.subprotocol}
    if decision.new_session:
        accept["headers"] = [gateway.session_cookie(decision.new_session)]
    await send(accept)
    await _relay(upstream, receive, send)


async def _relay(upstream: ClientConnection, receive: Receive, send: Send) -> None:
    async def client_to_upstream() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(message.get("code", CloseCode.NORMAL_CLOSURE), message.get("reason") or "")
                return
            if message.get("text") is not None:
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send(message["bytes"])

    async def upstream_to_client() -> None:
        try:
            async for data in upstream:
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                else:
                    await send({"type": "websocket.send", "bytes": data})
        except ConnectionClosed:
            pass
        code, reason = upstream.close_code, upstream.close_reason or ""
        # 1005, 1006 and 1015 may never be sent in a close frame (RFC 6455 §7.4.1).
        if code is None or code == CloseCode.ABNORMAL_CLOSURE:
            code = CloseCode.INTERNAL_ERROR
        elif code in (CloseCode.NO_STATUS_RCVD, CloseCode.TLS_HANDSHAKE):
            code = CloseCode.NORMAL_CLOSURE
        with contextlib.suppress(OSError, RuntimeError):
            await send({"type": "websocket.close", "code": int(code), "reason": reason})

    tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, OSError):
                await task
        await upstream.close()
