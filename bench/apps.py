"""The ASGI applications the benchmark serves with uvicorn (always with the same flags).

* ``hello``: baseline A, a bare Starlette app answering ``hello``: the framework ceiling.
* ``sink``: the upload target; reads the request body, discards it, answers its size.
  (nginx cannot easily consume a streamed body without buffering it, and hashing it, as
  tests/support/upstream_app.py does, would make the upstream the bottleneck.)
* ``gateway``: the gateway exactly as ``gateway run`` builds it: the TOML file named by
  ``$GATEWAY_CONFIG``, read once with ``gateway.config.load``, then ``create_app``.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


hello = Starlette(routes=[Route("/", _hello)])


async def sink(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            done = message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete" if done else "lifespan.startup.complete"})
            if done:
                return
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def gateway() -> Any:
    """uvicorn ``--factory`` target: what ``gateway run`` serves, minus its CLI."""
    from gateway.app import create_app
    from gateway.config import ENV_CONFIG, load
    from gateway.logs import configure_logging

    config = load(os.environ[ENV_CONFIG])
    configure_logging(config.server.log_level)
    return create_app(config)
