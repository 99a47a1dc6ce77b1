"""gateway/shutdown.py, in process: how the server finds the app's drain, and what readiness says.

The real SIGTERM (a 200 MiB download, 1001 for WebSockets, the grace's bound, two workers) is
in tests/integration/test_shutdown.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx

from gateway.app import create_app
from gateway.shutdown import DRAIN_STATE_KEY, Drain
from gateway.store import open_store_from_url
from tests.support.servers import make_config


async def test_readiness_answers_503_once_the_server_begins_to_drain(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    app = create_app(
        config,
        store=open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing"),
    )
    state: dict[str, Any] = {}  # what uvicorn's LifespanOn hands the app, and keeps
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outgoing: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
    incoming.put_nowait({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    task = asyncio.ensure_future(app(scope, incoming.get, outgoing.put))
    assert (await asyncio.wait_for(outgoing.get(), 10))["type"] == "lifespan.startup.complete"
    try:
        drain = state[DRAIN_STATE_KEY]  # where gateway.shutdown.DrainingServer looks for it
        assert isinstance(drain, Drain) and not drain.draining
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
            assert (await client.get(config.routes.ready)).status_code == 200
            drain.begin()  # what SIGTERM does first
            r = await client.get(config.routes.ready)
            assert r.status_code == 503
            assert r.json()["status"] == "stopping"
            # Liveness is not readiness: the process is fine, only leaving.
            assert (await client.get(config.routes.health)).status_code == 200
    finally:
        incoming.put_nowait({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 10)
