"""Redis faults against a real ``gateway run`` and a real redis-server (issue 14 §1 "Store faults").

Each test breaks the store one way, checks a round of requests during the fault
(tests/support/store_faults.py: session and code 503 store_unavailable, nothing of them at the
upstream, readiness 503, the excluded path served, every answer within the store timeout + 2 s),
ends the fault without touching the gateway, and checks that service resumed.

Faults that only break writes (out of memory with noeviction, a READONLY replica) let a live
session pass (a read), and deny every code (a code takes an attempt and spends its time step:
writes), and readiness says not ready (store.ping writes). A redis-server restarted without its
data forgets every session and enrolment: the gateway cannot tell that from a new store, so
its users are denied as not enrolled and may enrol anew with their first factor alone; run
Redis with persistence (README "Security defaults"). The restart and freeze under load are in
tests/integration/test_failover.py.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from gateway.store.redis import IDENTITY_CHECK_INTERVAL
from gateway.store.redis_calls import SOCKET_TIMEOUT
from tests.conftest import RedisServer, need_binary
from tests.support.load import who
from tests.support.recorder import Recorder
from tests.support.servers import wait_for_port
from tests.support.store_faults import READY, FaultGateway, Prober, recording

pytestmark = pytest.mark.integration

SLEEP = SOCKET_TIMEOUT + 1.5  # DEBUG SLEEP: longer than a store call waits


@pytest.fixture(scope="module")
def durable_redis() -> Iterator[RedisServer]:
    """A redis-server of this module's own (it is killed), keeping every write in its
    append-only file, with DEBUG allowed (DEBUG SLEEP)."""
    server = RedisServer(
        need_binary("redis-server"), "--appendonly", "yes", "--appendfsync", "always", "--enable-debug-command", "yes"
    )
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)  # a test that failed while it was stopped
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    with recording() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    durable_redis: RedisServer, recorder: Recorder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultGateway]:
    with FaultGateway(tmp_path_factory.mktemp("redis-faults"), durable_redis.url, recorder.url) as gw:
        yield gw


@pytest.fixture
async def prober(gateway: FaultGateway, recorder: Recorder) -> Prober:
    probe = Prober(gateway, recorder, SOCKET_TIMEOUT)
    await probe.enrol()
    await probe.serving()  # the previous test left it serving
    return probe


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=10)


async def _restart(server: RedisServer) -> None:
    """The same port and directory: the append-only file brings the data back."""
    await asyncio.to_thread(server.start)
    await asyncio.to_thread(wait_for_port, server.port)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_redis_stopped_then_restarted_with_its_data(how: str, durable_redis: RedisServer, prober: Prober) -> None:
    proc = durable_redis.proc
    assert proc is not None
    proc.send_signal(getattr(signal, how))  # SIGTERM: Redis saves and exits; SIGKILL: a crash
    await asyncio.to_thread(proc.wait, 10)
    durable_redis.proc = None
    try:
        await prober.denied()
        await prober.denied()  # and again: nothing is cached or half-open that would let it pass
    finally:
        await _restart(durable_redis)
    # The session opened before the outage is still valid: serving() sends it.
    await prober.serving()


async def test_redis_paused_with_sigstop(durable_redis: RedisServer, prober: Prober) -> None:
    """SIGSTOP: connections stay open and nothing answers (a hung machine); every store call
    waits for the store timeout, and the denial comes then, not later. Then SIGCONT."""
    proc = durable_redis.proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        await prober.denied()
    finally:
        proc.send_signal(signal.SIGCONT)
    await prober.serving()


async def test_redis_busy_in_debug_sleep(durable_redis: RedisServer, prober: Prober) -> None:
    """DEBUG SLEEP: the server itself is busy (a slow Lua script, a KEYS on a big keyspace)."""

    def debug_sleep() -> None:
        with _client(durable_redis) as client:
            client.execute_command("DEBUG", "SLEEP", SLEEP)

    sleeping = threading.Thread(target=debug_sleep)
    sleeping.start()
    try:
        await asyncio.sleep(0.2)  # the DEBUG SLEEP is running
        started = time.monotonic()
        await prober.denied()
        assert time.monotonic() - started < SLEEP - 0.2, "the round ended after the sleep"
    finally:
        await asyncio.to_thread(sleeping.join, 30)
    await prober.serving()


async def test_redis_out_of_memory_with_noeviction(durable_redis: RedisServer, prober: Prober) -> None:
    client = _client(durable_redis)
    try:
        client.config_set("maxmemory-policy", "noeviction")
        for n in range(40):  # 2 MB of someone else's data
            client.set(f"f1:fill:{n}", b"x" * 50_000)
        # The limit 1 MB under what is in use: every write that may need memory is refused,
        # steadily (at the limit's edge, buffers freed between commands let small writes in).
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 1_000_000)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("f1:probe", b"1")
        await prober.denied(reads_work=True)
    finally:
        client.config_set("maxmemory", 0)
        for key in client.scan_iter(match="f1:fill:*"):
            client.delete(key)
        client.close()
    await prober.serving()


async def test_redis_turned_into_a_read_only_replica(durable_redis: RedisServer, prober: Prober) -> None:
    """A demoted master (a failover that the gateway was not told of): REPLICAOF another server
    that holds the same data, so every write answers READONLY and reads still work."""
    other = RedisServer(need_binary("redis-server"))
    other.start()
    ours, theirs = _client(durable_redis), _client(other)
    for client in (ours, theirs):
        client.config_set("repl-diskless-sync-delay", 0)  # default 5 s: a master waits for more replicas
    try:
        # `other` copies our data, becomes a master, and we become its replica.
        theirs.replicaof("127.0.0.1", durable_redis.port)
        await _until(lambda: theirs.info("replication")["master_link_status"] == "up", "other synced")
        theirs.replicaof("NO", "ONE")
        ours.replicaof("127.0.0.1", other.port)
        await _until(lambda: ours.info("replication")["master_link_status"] == "up", "ours synced")
        with pytest.raises(redis.exceptions.ReadOnlyError):
            ours.set("f1:probe", b"1")
        await prober.denied(reads_work=True)
    finally:
        ours.replicaof("NO", "ONE")
        ours.close()
        theirs.close()
        other.stop()
        shutil.rmtree(other.dir, ignore_errors=True)
    await prober.serving()


async def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def test_redis_restarted_without_its_data(recorder: Recorder, tmp_path: Path) -> None:
    """No persistence (RedisServer's default: no RDB, no AOF): after a restart every session and
    enrolment is gone, the store's identity too. The gateway must not take it as a new, empty
    store (every user "not enrolled", free to enrol again with the first factor alone: attacker
    B): it refuses it, 503 for everything and readiness, with one ERROR line saying what to do.
    (Before the store identity this test stated the 403 and the open enrolment.)"""
    server = RedisServer(need_binary("redis-server"))
    server.start()
    try:
        with FaultGateway(tmp_path, server.url, recorder.url) as gw:
            probe = Prober(gw, recorder, SOCKET_TIMEOUT)
            await probe.enrol(sessions=1, coders=1)
            await probe.serving()
            assert server.proc is not None
            server.proc.kill()
            server.proc.wait(10)
            await _restart(server)
            before = len(probe.recorded())
            user = probe.sessions[0][0]
            async with httpx.AsyncClient(timeout=10) as client:  # at once: enrolment checks every time
                r = await client.post(gw.url + "/setup-2fa", headers=who(user))
            assert (r.status_code, r.json()["error"]) == (503, "store_unavailable"), r.text
            await asyncio.sleep(IDENTITY_CHECK_INTERVAL + 0.1)  # the other calls check once a second
            reply = await probe.session()
            assert (reply.status, reply.error, reply.seq) == (503, "store_unavailable", None), reply
            assert probe.recorded()[before:] == []
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.post(gw.url + "/setup-2fa", headers=who(user))
                ready = await client.get(gw.url + READY)
            assert (r.status_code, r.json()["error"]) == (503, "store_unavailable"), r.text
            assert ready.status_code == 503
            refused = [line for line in gw.log().splitlines() if "ERROR" in line and "no store identity" in line]
            assert len(refused) == 1, gw.log()
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
