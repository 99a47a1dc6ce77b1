"""The store goes away under load and comes back (issue 13 §1): a single redis-server killed and
restarted on its port with its data (append-only file, fsync always); and a Sentinel master
killed, its replica promoted by the sentinels (tests/support/redis_topologies.py, failover.py).

A steady load (tests/support/load.py: valid sessions, fresh codes, wrong codes, no factor,
an excluded path) runs through two gateway replicas in front of the recorder
(tests/support/recorder.py), which counts what really reached the upstream. While the store is
down, once the replicas' caches (store.cache_ttl) have expired, every protected request is
denied with 503 store_unavailable, none reaches the upstream without a valid factor, none waits
past the store timeout; excluded paths keep working. Once the store is back, service resumes
without touching the gateways, and the sessions opened before the outage are still valid.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from gateway.store.redis_calls import SOCKET_TIMEOUT
from tests.conftest import RedisServer, need_binary
from tests.support.failover import announcements, kill, master_port
from tests.support.load import (
    CACHE_TTL,
    PROTECTED,
    Load,
    Replica,
    Verdict,
    enrol_user,
    fresh_user,
    judge,
    replicas,
)
from tests.support.recorder import Recorder
from tests.support.redis_topologies import SentinelSet
from tests.support.servers import fresh_keys, wait_for_port

pytestmark = pytest.mark.integration

# Generous bounds that state the requirement; the measured figures are printed (pytest -s).
RESUME_BOUND = 10.0  # issue 13: within 2 s of a restart, 5 s of a promotion (measured: see print)
PROMOTION_BOUND = 30.0  # down-after 1 s, an election, a failover-timeout of 5 s, and room to spare
# "None hangs past the store timeout": an answer within the store's timeout, and a second for a
# busy machine. (A frozen Redis once cost 2 timeouts: a call queued behind a hung batch.)
HANG_BOUND = SOCKET_TIMEOUT + 1.0
STEADY = 1.5  # seconds of load before the outage, and after recovery
GAP = 2.5  # seconds the store stays down
FROZEN = 2 * SOCKET_TIMEOUT + 1.5  # long enough for requests to time out inside the gap


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder().start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A redis-server of its own (it is killed), that keeps every write in its append-only file."""
    server = RedisServer(need_binary("redis-server"), "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


async def enrol_many(url: str, n: int, tag: str) -> list[tuple[str, str, str]]:
    """(user, secret, session) for ``n`` users enrolled at ``url``."""
    users = [fresh_user(tag) for _ in range(n)]
    enrolled = await asyncio.gather(*(enrol_user(url, u) for u in users))
    return [(u, secret, session) for u, (secret, session) in zip(users, enrolled, strict=True)]


async def run_outage(
    gateways: list[Replica],
    recorder: Recorder,
    kill: Callable[[], Awaitable[None]],
    restore: Callable[[], Awaitable[float]],
) -> tuple[Verdict, Load, float, float]:
    """Load through ``gateways``; ``await kill()`` takes the store away; ``await restore()``
    returns once the store answers again, with the earliest moment it may have (time.monotonic()):
    (verdict, load, down, back), ``back`` when restore() returned."""
    url = gateways[0].url
    holders = await enrol_many(url, 3, "fo-s")
    coders = await enrol_many(url, 30, "fo-c")
    guessers = await enrol_many(url, 3, "fo-g")
    load = Load(
        urls=[g.url for g in gateways],
        sessions=[(u, session) for u, _, session in holders],
        secrets=[(u, secret) for u, secret, _ in coders],
        bad_secrets=[(u, secret) for u, secret, _ in guessers],
        timeout=3 * HANG_BOUND,
    )
    load.start()
    try:
        await asyncio.sleep(STEADY)
        down = time.monotonic()
        await kill()
        restoring = await restore()
        back = time.monotonic()
        await asyncio.sleep(STEADY)
    finally:
        await load.stop()
    recorded, errors = recorder.snapshot()
    assert errors == []
    return judge(load, [(r.seq, r.target) for r in recorded], down, restoring, back), load, down, back


def check(verdict: Verdict, load: Load, down: float, back: float) -> None:
    """The requirements, in the order the issue states them."""
    print("\n", verdict.counts)
    print(
        f"gap answers: {len(verdict.in_gap)}; slowest answer in the gap: {verdict.max_gap_latency:.3f} s "
        f"{verdict.gap_latency_by_kind}; "
        f"resumed {verdict.resumed_after} s after the store was back"
    )
    assert verdict.in_gap, "no request was sent during the outage"
    # Every protected request is denied, with the store's denial; excluded paths still pass.
    for answer in verdict.in_gap:
        if answer.kind in PROTECTED:
            assert (answer.status, answer.error, answer.seq) == (503, "store_unavailable", None), answer
        else:
            assert answer.status == 200 and answer.seq is not None, answer
    # Differential: nothing reached the upstream that the gateway did not let through, and no
    # request without a valid factor reached it at all.
    assert verdict.upstream_unmatched == 0
    assert verdict.leaked == []
    # In the window the caches cover (down .. down + cache_ttl), only valid sessions pass.
    for answer in load.answers:
        if down <= answer.start < down + CACHE_TTL and answer.seq is not None:
            assert answer.kind in ("session", "excluded"), answer
    # No request waits past the store timeout; none fails without an answer, none is a 500.
    assert verdict.max_gap_latency < HANG_BOUND
    assert not [a for a in load.answers if a.status == 0 or (a.status >= 500 and a.error != "store_unavailable")]
    # Service resumes on its own, and the sessions opened before the outage are still valid.
    assert verdict.resumed_after is not None and verdict.resumed_after < RESUME_BOUND
    late = [a for a in load.answers if a.start >= back + verdict.resumed_after + CACHE_TTL]
    assert late
    expected = {"session": 200, "code": 200, "no_factor": 401, "excluded": 200}
    for answer in late:
        if answer.kind in expected:
            assert answer.status == expected[answer.kind], answer
        else:
            assert answer.status in (401, 429) and answer.seq is None, answer


async def test_a_redis_restart_under_load(durable_redis: RedisServer, recorder: Recorder, tmp_path: Path) -> None:
    started = time.monotonic()

    async def kill() -> None:
        assert durable_redis.proc is not None
        durable_redis.proc.kill()  # SIGKILL: no goodbye, as a crash
        await asyncio.to_thread(durable_redis.proc.wait, 10)
        durable_redis.proc = None

    async def restore() -> float:
        await asyncio.sleep(GAP)
        restoring = time.monotonic()
        # The same port and directory: its append-only file brings the data back.
        await asyncio.to_thread(durable_redis.start)
        await asyncio.to_thread(wait_for_port, durable_redis.port)
        return restoring

    with replicas(tmp_path, durable_redis.url, recorder.url, fresh_keys()) as gateways:
        verdict, load, down, back = await run_outage(gateways, recorder, kill, restore)
    check(verdict, load, down, back)
    print(f"test_a_redis_restart_under_load: {time.monotonic() - started:.1f} s")


async def test_a_frozen_redis_under_load(durable_redis: RedisServer, recorder: Recorder, tmp_path: Path) -> None:
    """SIGSTOP: the server keeps its connections open and answers nothing (a hung machine, a
    partition), which a refused connection does not show: here every store call waits for the
    store timeout, and the denial must come then, not later. Then SIGCONT."""
    started = time.monotonic()
    assert durable_redis.proc is not None
    proc = durable_redis.proc

    async def freeze() -> None:
        proc.send_signal(signal.SIGSTOP)

    async def thaw() -> float:
        await asyncio.sleep(FROZEN)
        restoring = time.monotonic()
        proc.send_signal(signal.SIGCONT)
        return restoring

    try:
        with replicas(tmp_path, durable_redis.url, recorder.url, fresh_keys()) as gateways:
            verdict, load, down, back = await run_outage(gateways, recorder, freeze, thaw)
    finally:
        proc.send_signal(signal.SIGCONT)
    check(verdict, load, down, back)
    print(f"test_a_frozen_redis_under_load: {time.monotonic() - started:.1f} s")


async def test_a_sentinel_failover_under_load(recorder: Recorder, tmp_path: Path) -> None:
    """SIGKILL the master; the sentinels promote the replica and the replicas, untouched, find
    it. The sessions opened before were replicated long before the kill, so they survive.
    Redis replicates asynchronously: a write the master acknowledged in the last instant before
    it died (a session just opened, a code's step just used, a failure just counted) may be
    missing on the promoted replica, unless the store waits for a replica's acknowledgement
    (WAIT 1 <ms>) before answering; this test does not open sessions in that instant."""
    started = time.monotonic()
    topology = SentinelSet(need_binary("redis-server"))  # its own: its master is killed
    killed: list[int] = []
    try:
        topology.start()
        topology.wait_for_quorum()
        with announcements(topology) as announced:

            async def kill_master() -> None:
                killed.append(master_port(topology))
                await asyncio.to_thread(kill, topology, killed[0])

            async def restore() -> float:
                # The first sentinel to give out the new address (the failover leader, from
                # +failover-state-reconf-slaves on) or to announce it (+switch-master).
                return await asyncio.to_thread(announced.wait, PROMOTION_BOUND)

            with replicas(tmp_path, topology.url, recorder.url, fresh_keys()) as gateways:
                verdict, load, down, back = await run_outage(gateways, recorder, kill_master, restore)
        print(f"\nsentinel events after the kill: {announced.since(down)}")
        assert master_port(topology) not in killed  # every sentinel has switched by now
    finally:
        topology.stop()
    check(verdict, load, down, back)
    print(f"test_a_sentinel_failover_under_load: {time.monotonic() - started:.1f} s")
