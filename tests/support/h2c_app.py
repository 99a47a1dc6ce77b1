"""An h2c-capable app for the tests: served by Hypercorn, which switches a plain HTTP/1.1
connection to HTTP/2 on ``Upgrade: h2c`` (RFC 7540 §3.2). Every request it serves is recorded
with its HTTP version, Remote-User and every Upgrade and HTTP2-Settings value it received
(a list each, in order); ``GET /_seen`` (asked directly, not through a front)
returns that list as JSON."""

from __future__ import annotations

import json
from typing import Any

SEEN: list[dict[str, Any]] = []


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/_seen":
        body = json.dumps(SEEN).encode()
    else:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        def every(name: bytes) -> list[str]:
            return [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name]

        SEEN.append(
            {
                "path": scope["path"],
                "http_version": scope["http_version"],
                "remote_user": headers.get("remote-user"),
                "upgrade": every(b"upgrade"),
                "http2_settings": every(b"http2-settings"),
            }
        )
        body = b"served " + scope["path"].encode()
    while (await receive()).get("more_body"):
        pass
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
