"""SessionWatch: open connections grouped by session, each distinct session read once per pass;
a streaming HTTP response ends with its session. (WebSockets: tests/test_websocket.py.)"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.errors import StoreError
from gateway.revocation import MIN_INTERVAL, ReceiveUntilEnded, SessionWatch, poll_interval
from tests.support.servers import GatewayServer, UpstreamProcess, make_config
from tests.test_websocket import session_for, with_factors


class Sessions:
    """A session table standing in for the store: id -> user, with every read counted."""

    def __init__(self, **owners: str) -> None:
        self.owners = dict(owners)
        self.reads: list[str] = []
        self.down = False

    async def lookup(self, session_id: str) -> str | None:
        self.reads.append(session_id)
        if self.down:
            raise StoreError("store unavailable")
        return self.owners.get(session_id)


def test_poll_interval_has_a_floor() -> None:
    assert poll_interval(1.0) == 1.0
    assert poll_interval(0.0) == MIN_INTERVAL  # cache_ttl 0 means "no cache", not "poll always"
    assert poll_interval(0.1) == MIN_INTERVAL


async def test_each_distinct_session_is_read_once_per_pass() -> None:
    sessions = Sessions(s1="alice", s2="bob")
    watch = SessionWatch(sessions.lookup, interval=3600)
    with ExitStack() as stack:
        alice = [stack.enter_context(watch.watching("s1", "alice")) for _ in range(1000)]
        bob = [stack.enter_context(watch.watching("s2", "bob")) for _ in range(3)]
        assert len(watch) == 1003
        assert await watch.check() == 0
        assert sorted(sessions.reads) == ["s1", "s2"]
        del sessions.owners["s1"]  # alice's session ends
        assert await watch.check() == 1000
        assert all(f.done() for f in alice) and not any(f.done() for f in bob)
        assert len(watch) == 3
    assert len(watch) == 0
    await watch.stop()


async def test_a_session_of_another_user_ends_the_connection() -> None:
    sessions = Sessions(s1="mallory")
    watch = SessionWatch(sessions.lookup, interval=3600)
    with watch.watching("s1", "alice") as ended:
        assert await watch.check() == 1
        assert ended.done()
    await watch.stop()


async def test_a_store_outage_ends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    sessions = Sessions(s1="alice")
    sessions.down = True
    watch = SessionWatch(sessions.lookup, interval=3600)
    with watch.watching("s1", "alice") as ended:
        assert await watch.check() == 0
        assert not ended.done()
        assert "store unavailable" in caplog.text
        sessions.down = False
        del sessions.owners["s1"]
        assert await watch.check() == 1
    await watch.stop()


async def test_the_timer_runs_only_while_something_is_watched() -> None:
    sessions = Sessions(s1="alice")
    watch = SessionWatch(sessions.lookup, interval=0.01)
    await asyncio.sleep(0.05)
    assert sessions.reads == []  # nothing watched: no reads at all
    with watch.watching("s1", "alice") as ended:
        while len(sessions.reads) < 2:
            await asyncio.sleep(0.01)
        del sessions.owners["s1"]
        await asyncio.wait_for(ended, 5)
    reads = len(sessions.reads)
    await asyncio.sleep(0.05)
    assert len(sessions.reads) == reads  # the timer stopped with the last connection
    await watch.stop()


async def test_a_request_is_watched_only_once_its_body_is_in() -> None:
    sessions = Sessions(s1="alice")
    watch = SessionWatch(sessions.lookup, interval=3600)
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for more in (True, False):
        incoming.put_nowait({"type": "http.request", "body": b"x", "more_body": more})
    receive = ReceiveUntilEnded(watch, "s1", "alice", incoming.get)
    try:
        assert (await receive())["more_body"] is True
        assert (await receive())["more_body"] is False
        assert len(watch) == 0  # a small request costs no watching at all
        waiting = asyncio.ensure_future(receive())  # what a streaming relay listens for
        while len(watch) == 0:
            await asyncio.sleep(0)
        del sessions.owners["s1"]
        assert await watch.check() == 1
        assert await asyncio.wait_for(waiting, 5) == {"type": "http.disconnect"}
    finally:
        receive.close()
    assert len(watch) == 0
    await watch.stop()


async def stream_stats(upstream: UpstreamProcess) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        stats: dict[str, Any] = (await client.get(upstream.url + "/stats")).json()
        return stats


@pytest.mark.parametrize("target", ["/stream/1000000000000", "/drip/200"])
async def test_ending_the_session_closes_a_streaming_response(
    upstream: UpstreamProcess, tmp_path: Path, target: str
) -> None:
    """An unbounded body (chunked, like server-sent events), and a small one with a
    Content-Length that arrives slowly (found by attack: a response of at most 256 KiB by its
    Content-Length was relayed unwatched, so it kept flowing for as long as the app sent it)."""
    config = make_config(tmp_path, upstream=upstream.url)
    gw = GatewayServer(config).start()
    try:
        user = f"rv-stream-{uuid.uuid4().hex[:8]}"
        session = await session_for(config, user)
        headers = {"Remote-User": user, "Cookie": f"{config.session.cookie}={session}"}
        cancelled = (await stream_stats(upstream))["cancelled_streams"]
        async with (
            httpx.AsyncClient(base_url=gw.url) as client,
            client.stream("GET", target, headers=headers) as response,
        ):
            assert response.status_code == 200
            body = response.aiter_raw()
            assert await anext(body)
            await with_factors(config, lambda f: f.revoke_user_sessions(user))
            # The upstream response is closed...
            deadline = time.monotonic() + 10
            while (await stream_stats(upstream))["cancelled_streams"] == cancelled:
                assert time.monotonic() < deadline, "the upstream stream is still open"
                await asyncio.sleep(0.1)
            # ... and so is the client's, mid-body: never mistaken for a complete download.
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in body:
                    pass
    finally:
        gw.stop()
