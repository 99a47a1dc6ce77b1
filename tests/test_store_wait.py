"""store.replicas_ack: WAIT after the writes a failover must not lose (issue 13 §5), on a real
Sentinel set (one master, one replica), one Redis without replicas, and a Cluster (refused).
What WAIT guarantees and what it does not is gateway/store/redis_layout.py's docstring."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.store import redis as redis_module
from gateway.store.redis import RedisStore
from gateway.store.redis_layout import session_key, user_key
from tests.conftest import RedisServer
from tests.support.redis_topologies import PASSWORD, Cluster, SentinelSet


async def _replica_online(sentinel: SentinelSet) -> None:
    """Until the replica has finished its first sync (a fresh set's takes a moment): before that
    no WAIT can be acknowledged, which is the other test's case, not these."""
    for _ in range(200):
        for node in (sentinel.master, sentinel.replica):
            client = aioredis.Redis(port=node.port, password=PASSWORD, decode_responses=True)
            info = await client.info("replication")
            await client.aclose()
            if info.get("role") == "master" and "state=online" in str(info.get("slave0", "")):
                return
            if isinstance(info.get("slave0"), dict) and info["slave0"].get("state") == "online":
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the Sentinel set's replica never came online")


@pytest.fixture
async def sentinel_store(redis_sentinel: SentinelSet, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RedisStore]:
    await _replica_online(redis_sentinel)
    # 100 ms is the production bound; on a loaded 2-core test machine a replica's ack can take
    # longer, and these tests are about where the write is when the call returns.
    monkeypatch.setattr(redis_module, "WAIT_MS", 5000)
    store = RedisStore(redis_sentinel.url, prefix=f"w{uuid.uuid4().hex[:8]}", replicas_ack=1, create=True)
    await store.open()
    yield store
    await store.close()


async def _on_every_data_node(sentinel: SentinelSet, key: str) -> list[bytes | str | None]:
    """``key`` as each data node (master and replica, whichever is which now) holds it."""
    values: list[bytes | str | None] = []
    for node in (sentinel.master, sentinel.replica):
        client = aioredis.Redis(port=node.port, password=PASSWORD)
        values.append(await client.get(key))
        await client.aclose()
    return values


async def test_a_used_step_is_on_the_replica_when_the_check_returns(
    sentinel_store: RedisStore, redis_sentinel: SentinelSet, caplog: pytest.LogCaptureFixture
) -> None:
    assert await sentinel_store.advance_step("alice", 100)
    assert await _on_every_data_node(redis_sentinel, user_key(sentinel_store.prefix, "alice", "step")) == [b"100"] * 2
    assert not await sentinel_store.advance_step("alice", 100)  # the replay guard is unchanged
    assert "replicas" not in caplog.text  # the replica acknowledged in time


async def test_revocations_are_on_the_replica_when_they_return(
    sentinel_store: RedisStore, redis_sentinel: SentinelSet, caplog: pytest.LogCaptureFixture
) -> None:
    store = sentinel_store
    assert await store.create_session("h1", "bob", 1e12) and await store.create_session("h2", "bob", 1e12)
    assert await store.create_session("h3", "carol", 1e12)
    await store.revoke_session("h1")  # logout
    assert await store.revoke_user_sessions("bob") == 1  # re-enrol, users logout
    await store.delete_user("carol")  # users reset
    for h in ("h1", "h2", "h3"):
        assert await _on_every_data_node(redis_sentinel, session_key(store.prefix, h)) == [None, None]
    assert await store.activate_secret("dave", None, b"new")  # an enrolment
    assert await _on_every_data_node(redis_sentinel, user_key(store.prefix, "dave", "secret")) == [b"new"] * 2
    assert "replicas" not in caplog.text


async def test_too_few_replicas_is_logged_and_the_write_stands(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(redis_server.url, prefix=f"w{uuid.uuid4().hex[:8]}", replicas_ack=1, create=True)  # it has none
    await store.open()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.store"):
            assert await store.advance_step("erin", 7)  # recorded on the master: the code is judged
        assert "a used code step acknowledged by 0 of 1 replicas within 100 ms" in caplog.text
        assert "erin" not in caplog.text
        assert not await store.advance_step("erin", 7)  # and the master refuses its replay
    finally:
        await store.close()


def test_replicas_ack_is_refused_on_a_cluster(redis_cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="replicas_ack is for one server or Sentinel"):
        RedisStore(redis_cluster.url, replicas_ack=1, create=True)
