"""The app driven in-process through ``httpx.ASGITransport``: no socket, so a failure points at
a module. The store is the real SQLite store (a tmp file), opened by the app's own lifespan; in
proxy mode the upstream is ``tests/support/upstream_app.py`` behind another ASGITransport."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import httpx
from starlette.types import ASGIApp, Message

from gateway.app import create_app
from gateway.config import Config
from gateway.crypto import SecretBox
from gateway.store import Store, open_store_from_url
from gateway.totp import new_secret
from tests.support import upstream_app

UPSTREAM = "http://upstream.test"
# The peer: loopback, one of make_config's trusted proxies, so Remote-User is believed.
PEER = ("127.0.0.1", 40000)


class UpstreamTransport(httpx.ASGITransport):
    """The in-process upstream, reached as the forwarder reaches a real one: the request line's
    target is the ``target`` extension (proxy.py), the URL only names the origin."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        target = request.extensions.get("target")
        if target:
            request.url = request.url.copy_with(raw_path=target)
        return await super().handle_async_request(request)


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's lifespan around the block, in this event loop."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outgoing: asyncio.Queue[Message] = asyncio.Queue()
    incoming.put_nowait({"type": "lifespan.startup"})
    task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}}, incoming.get, outgoing.put))
    started = await asyncio.wait_for(outgoing.get(), 10)
    assert started["type"] == "lifespan.startup.complete", started
    try:
        yield
    finally:
        incoming.put_nowait({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 10)


@dataclass
class InProcess:
    config: Config
    app: ASGIApp
    client: httpx.AsyncClient
    store: Store

    async def enrol(self, user: str) -> str:
        """Give ``user`` an active secret directly in the store; returns the base32 secret."""
        secret = new_secret()
        await self.store.set_secret(user, SecretBox(self.config.encryption.keys).encrypt(user, secret))
        return secret


@asynccontextmanager
async def in_process(
    config: Config, clock: Callable[[], float] = time.time, peer: tuple[str, int] = PEER
) -> AsyncIterator[InProcess]:
    """``create_app(config)`` with its lifespan running and a client on it (base URL
    ``http://gw.test``). Give ``config`` the upstream :data:`UPSTREAM` for proxy mode."""
    store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
    upstream = UpstreamTransport(app=cast(Any, upstream_app.app)) if config.upstream.url else None
    app = create_app(config, store=store, transport=upstream, clock=clock)
    transport = httpx.ASGITransport(app=app, client=peer)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
        yield InProcess(config, app, client, store)
