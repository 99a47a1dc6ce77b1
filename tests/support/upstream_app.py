"""A real upstream for the tests, served by uvicorn in its own process.

Routes (anything else echoes; each also answers under /public and /api/public):
  /echo...          JSON of what arrived: method, raw path, query, headers (as a list), body sha256 and size
  /bytes/N          N bytes streamed in 64 KiB chunks, deterministic content, Content-Length set
  /stream/N         N bytes streamed chunked (no Content-Length)
  /drip/N           N bytes with Content-Length set, one byte every 0.2 s (a small, slow body)
  /gzip             a gzip-encoded body with Content-Encoding: gzip (must pass through raw)
  /cookies          several Set-Cookie headers
  /redirect         302 to this upstream's own absolute URL
  /hop              a response carrying hop-by-hop headers
  /slow?s=SECONDS   answers after a delay
  /status/N         that status
  /stats            how many streams are open / were cancelled (leak checks)
  /stats/websockets how many websockets are open, and the query and close code of each that ended

Websockets: the first message is "hello <Remote-User>", then text is echoed as "echo <text>",
bytes come back unchanged and "close" closes with 4000 "asked". Under /ws/scope the first
message is instead JSON of the raw path and query that arrived.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from typing import Any

STATE = {"open_streams": 0, "finished_streams": 0, "cancelled_streams": 0}
WEBSOCKETS: dict[str, Any] = {"open": 0, "ended": []}
GZIP_BODY = gzip.compress(b"hello compressed world\n" * 100, mtime=0)


def pattern(n: int) -> bytes:
    block = bytes(range(256)) * 256  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await websocket(scope, receive, send)
        return
    # Routes answer under excluded prefixes too ("/public/gzip" is "/gzip"), so tests can reach
    # them without a code.
    path: str = scope["path"]
    for prefix in ("/api/public", "/public"):
        if path.startswith(prefix + "/"):
            path = path[len(prefix) :]
            break
    if path.startswith(("/bytes/", "/stream/", "/drip/")):
        n = int(path.rsplit("/", 1)[1])
        drip = path.startswith("/drip/")
        headers = [(b"content-type", b"application/octet-stream")]
        if not path.startswith("/stream/"):
            headers.append((b"content-length", str(n).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        STATE["open_streams"] += 1
        block = pattern(65536)
        sent = 0
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            while sent < n:
                if gone.is_set():  # uvicorn drops sends to a closed connection silently
                    STATE["cancelled_streams"] += 1
                    return
                chunk = block[: 1 if drip else min(65536, n - sent)]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
                await asyncio.sleep(0.2 if drip else 0)
            await send({"type": "http.response.body", "body": b""})
            STATE["finished_streams"] += 1
        except (asyncio.CancelledError, OSError):
            STATE["cancelled_streams"] += 1
            raise
        finally:
            watcher.cancel()
            STATE["open_streams"] -= 1
        return
    if path == "/stats":
        return await respond(send, 200, json.dumps(STATE).encode())
    if path == "/stats/websockets":
        return await respond(send, 200, json.dumps(WEBSOCKETS).encode())
    if path == "/gzip":
        return await respond(send, 200, GZIP_BODY, [(b"content-encoding", b"gzip"), (b"content-type", b"text/plain")])
    if path == "/cookies":
        return await respond(send, 200, b"cookies", [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/")])
    if path == "/redirect":
        host = dict(scope["headers"]).get(b"host", b"")
        return await respond(send, 302, b"", [(b"location", b"http://" + host + b"/echo/after?x=1")])
    if path == "/hop":
        return await respond(
            send,
            200,
            b"hop",
            [
                (b"connection", b"x-private"),
                (b"x-private", b"secret-hop"),
                (b"keep-alive", b"timeout=5"),
                (b"x-kept", b"yes"),
            ],
        )
    if path == "/slow":
        seconds = float(scope["query_string"].decode().partition("=")[2] or "1")
        await asyncio.sleep(seconds)
        return await respond(send, 200, b"slow")
    if path.startswith("/status/"):
        return await respond(send, int(path.rsplit("/", 1)[1]), b"")
    digest = hashlib.sha256()
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        digest.update(chunk)
        size += len(chunk)
        if not message.get("more_body"):
            break
    body = {
        "method": scope["method"],
        "raw_path": scope.get("raw_path", b"").decode("latin-1"),
        "path": scope["path"],
        "query": scope["query_string"].decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body_sha256": digest.hexdigest(),
        "body_size": size,
    }
    await respond(send, 200, json.dumps(body).encode(), [(b"content-type", b"application/json")])


async def respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    out = list(headers or [])
    out.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    message = await receive()
    assert message["type"] == "websocket.connect"
    protocols = scope.get("subprotocols") or []
    user = dict(scope["headers"]).get(b"remote-user", b"").decode()
    await send({"type": "websocket.accept", "subprotocol": protocols[0] if protocols else None})
    query = scope["query_string"].decode("latin-1")
    WEBSOCKETS["open"] += 1
    try:
        if scope["path"].endswith("/ws/scope"):
            seen = {"raw_path": scope.get("raw_path", b"").decode("latin-1"), "query": query}
            await send({"type": "websocket.send", "text": json.dumps(seen)})
        else:
            await send({"type": "websocket.send", "text": f"hello {user}"})
        await _websocket_echo(receive, send, query)
    finally:
        WEBSOCKETS["open"] -= 1


async def _websocket_echo(receive: Any, send: Any, query: str) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            WEBSOCKETS["ended"].append({"query": query, "code": message.get("code")})
            return
        text = message.get("text")
        if text == "close":
            await send({"type": "websocket.close", "code": 4000, "reason": "asked"})
            return
        if text is not None:
            await send({"type": "websocket.send", "text": "echo " + text})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
