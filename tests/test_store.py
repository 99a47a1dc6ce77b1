"""The store contract (gateway/store/base.py), run against SQLite and a real Redis server.

Every test takes the ``store`` fixture and so runs once per backend. Times are ``now`` values
near the real clock (Redis expires keys in real time, so they must not lie in the past).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

import gateway.store.redis as redis_module
import gateway.store.redis_batch as redis_batch_module
import gateway.store.sqlite as sqlite_module
from gateway.errors import StoreError
from gateway.store import Attempt, Quota, Store, UserState, init_store, open_store_from_url
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SqliteStore
from tests.conftest import RedisServer
from tests.support.redis_topologies import PASSWORD, Cluster, SentinelSet
from tests.support.servers import free_port

# Names that would collide or break the hash tag if the Redis key escaping were wrong.
AWKWARD_USERS = ["alice", "alice}", "{alice}", "alice:secret", "alice%7D", "alice%", "a:b", "a%3Ab"]
AWKWARD_USERS += ["user:alice", "}:{", "zoë smith", ""]


# Redis three ways: one server, a Sentinel set (1 master, 1 replica, 3 sentinels) and a
# Cluster of 3 masters and 3 replicas, each a session fixture of tests/conftest.py.
_REDIS_FIXTURES = {"redis": "redis_server", "sentinel": "redis_sentinel", "cluster": "redis_cluster"}


@pytest.fixture(params=["sqlite", "redis", "sentinel", "cluster"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "sqlite":
        s = SqliteStore(str(tmp_path / "gateway.db"), create=True)
    else:
        server: RedisServer | SentinelSet | Cluster = request.getfixturevalue(_REDIS_FIXTURES[request.param])
        s = RedisStore(server.url, prefix=f"t{uuid.uuid4().hex}", create=True)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def now() -> float:
    return time.time()


# -- secrets ---------------------------------------------------------------------------------
async def test_secret_set_get_overwrite(store: Store) -> None:
    assert await store.get_secret("alice") is None
    await store.set_secret("alice", b"c1\x00\xff")
    assert await store.get_secret("alice") == b"c1\x00\xff"
    await store.set_secret("alice", b"c2")
    assert await store.get_secret("alice") == b"c2"
    assert await store.get_secret("bob") is None


async def test_pending_expires_at_now_and_set_secret_drops_it(store: Store, now: float) -> None:
    await store.set_pending("alice", b"p", now + 300)
    assert await store.get_pending("alice", now) == b"p"
    assert await store.get_pending("alice", now + 299.5) == b"p"
    assert await store.get_pending("alice", now + 300) is None
    assert await store.get_pending("alice", now + 301) is None
    assert await store.get_secret("alice") is None  # pending is not active
    await store.set_pending("alice", b"p2", now + 600)  # a new enrolment attempt replaces it
    assert await store.get_pending("alice", now + 301) == b"p2"
    await store.set_secret("alice", b"p2")  # enrolment done: the pending secret goes
    assert await store.get_pending("alice", now) is None
    assert await store.get_secret("alice") == b"p2"


async def test_replace_secret_is_compare_and_set(store: Store) -> None:
    await store.set_secret("alice", b"old")
    assert await store.replace_secret("alice", b"old", b"new") is True
    assert await store.get_secret("alice") == b"new"
    assert await store.replace_secret("alice", b"old", b"other") is False
    assert await store.get_secret("alice") == b"new"
    assert await store.replace_secret("nobody", b"old", b"new") is False
    assert await store.get_secret("nobody") is None


async def test_activate_secret_replaces_only_what_was_expected(store: Store) -> None:
    now = time.time()
    await store.set_pending("alice", b"first", now + 60)
    assert await store.activate_secret("alice", None, b"first") is True
    # The recovery codes of the authenticator it replaces end with it, in the same step.
    await store.set_recovery_codes("alice", ["h1", "h2"])
    assert await store.get_secret("alice") == b"first"
    assert await store.get_pending("alice", now) is None
    # Started while alice had no secret: it must not replace the one she has now.
    await store.set_pending("alice", b"late", now + 60)
    assert await store.activate_secret("alice", None, b"late") is False
    assert await store.get_secret("alice") == b"first"
    assert await store.get_pending("alice", now) == b"late"
    # A re-enrolment proven against "first" replaces it; one against another secret does not.
    assert await store.activate_secret("alice", b"other", b"second") is False
    assert await store.activate_secret("alice", b"first", b"second") is True
    assert await store.get_secret("alice") == b"second"
    assert await store.consume_recovery_code("alice", "h1") is False
    # Expected a secret, but the user was reset meanwhile.
    await store.delete_user("alice")
    assert await store.activate_secret("alice", b"second", b"third") is False
    assert await store.get_secret("alice") is None


# -- replay guard ----------------------------------------------------------------------------
async def test_advance_step_is_monotonic(store: Store) -> None:
    assert await store.advance_step("alice", 1000) is True
    assert await store.advance_step("alice", 1000) is False
    assert await store.advance_step("alice", 999) is False
    assert await store.advance_step("alice", 1001) is True
    assert await store.advance_step("bob", 5) is True  # per user
    assert await store.advance_step("alice", 1001) is False


async def test_advance_step_concurrent_has_one_winner(store: Store) -> None:
    for step in (56_000_000, 56_000_001, 56_000_005):
        results = await asyncio.gather(*(store.advance_step("alice", step) for _ in range(20)))
        assert results.count(True) == 1


async def test_advance_step_two_sqlite_processes_one_winner(tmp_path: Path) -> None:
    # Two stores on one file, each with its own connection and thread, like two workers.
    path = str(tmp_path / "shared.db")
    a, b = SqliteStore(path, create=True), SqliteStore(path, create=True)
    await a.open()
    await b.open()
    try:
        for step in range(100, 110):
            calls = [s.advance_step("alice", step) for _ in range(10) for s in (a, b)]
            results = await asyncio.gather(*calls)
            assert results.count(True) == 1
        codes = [f"h{i}" for i in range(5)]
        await a.set_recovery_codes("alice", codes)
        results = await asyncio.gather(*(s.consume_recovery_code("alice", "h3") for s in (a, b) * 10))
        assert results.count(True) == 1
    finally:
        await a.close()
        await b.close()


# -- attempts and lockouts ------------------------------------------------------------------
def _quota(scope: str, limit: int = 3, window: float = 60) -> Quota:
    return Quota(scope, limit, window)


async def test_take_attempt_locks_when_the_last_one_is_taken(store: Store, now: float) -> None:
    user = _quota("user:alice")
    assert await store.take_attempt([user], now) == Attempt(True)
    assert await store.take_attempt([user], now + 1) == Attempt(True)
    assert await store.locked_until("user:alice", now + 1) is None
    # The third uses the last room: still allowed (its code is judged), and it locks.
    third = await store.take_attempt([user], now + 2)
    assert third.allowed and third.locks == (("user:alice", now + 62),)  # exact float back
    assert await store.locked_until("user:alice", now + 3) == now + 62
    # A full quota refuses, says until when, and does not move the window.
    assert await store.take_attempt([user], now + 30) == Attempt(False, (("user:alice", now + 62),))
    assert await store.locked_until("user:alice", now + 61.9) == now + 62
    assert await store.locked_until("user:alice", now + 62) is None
    assert await store.locked_until("ip:192.0.2.1", now + 3) is None  # scopes are separate
    # The window is over: a fresh count.
    assert await store.take_attempt([user], now + 63) == Attempt(True)
    assert (await store.take_attempt([_quota("user:bob", 1, 30)], now)).locked_until == now + 30


async def test_attempt_window_restarts_with_each_attempt(store: Store, now: float) -> None:
    ip = _quota("ip:192.0.2.1")
    assert (await store.take_attempt([ip], now)).allowed
    assert (await store.take_attempt([ip], now + 1)).allowed
    # 60 s without attempts: the two above are forgotten.
    assert (await store.take_attempt([ip], now + 61)).locks == ()
    assert (await store.take_attempt([ip], now + 62)).locks == ()
    assert (await store.take_attempt([ip], now + 63)).locks == (("ip:192.0.2.1", now + 123),)


async def test_take_attempt_needs_room_in_every_quota(store: Store, now: float) -> None:
    user, ip = _quota("user:alice", 5), _quota("ip:192.0.2.1", 2)
    assert (await store.take_attempt([user, ip], now)).allowed
    assert (await store.take_attempt([user, ip], now)).locks == (("ip:192.0.2.1", now + 60),)
    refused = await store.take_attempt([_quota("user:bob", 5), ip], now)
    assert refused == Attempt(False, (("ip:192.0.2.1", now + 60),))
    # The quota with room still counted the refused attempt: counts never fall short.
    assert (await store.user_state("bob", now)).failures == 1
    assert (await store.user_state("alice", now)).failures == 2


async def test_release_attempt_gives_one_back_and_lifts_the_lock(store: Store, now: float) -> None:
    ip = _quota("ip:192.0.2.1", 2)
    await store.take_attempt([ip], now)
    await store.take_attempt([ip], now)
    assert await store.locked_until("ip:192.0.2.1", now) is not None
    await store.release_attempt("ip:192.0.2.1")
    assert await store.locked_until("ip:192.0.2.1", now) is None
    assert (await store.take_attempt([ip], now)).locks == (("ip:192.0.2.1", now + 60),)
    assert not (await store.take_attempt([ip], now)).allowed
    await store.release_attempt("ip:never-tried")  # no error, and no count below zero
    assert (await store.take_attempt([_quota("ip:never-tried", 1)], now)).locked_until == now + 60


@pytest.mark.parametrize("burst", [200, 400])
async def test_concurrent_attempts_never_exceed_the_limit(store: Store, now: float, burst: int) -> None:
    """Issue 10: the limit holds under a burst, for the user and for the address alike."""
    user, ip = _quota("user:alice", 5, 900), _quota("ip:192.0.2.1", 50, 900)
    answers = await asyncio.gather(*(store.take_attempt([user, ip], now) for _ in range(burst)))
    assert sum(a.allowed for a in answers) == 5
    assert sum(bool(a.locks) for a in answers if a.allowed) == 1  # exactly one took the last
    many = [_quota(f"user:u{i}", 5, 900) for i in range(burst)]
    answers = await asyncio.gather(*(store.take_attempt([q, _quota("ip:198.51.100.1", 50, 900)], now) for q in many))
    assert sum(a.allowed for a in answers) == 50


async def test_a_burst_on_one_quota_hears_who_took_the_last_room(store: Store, now: float) -> None:
    """Attempts asked together on one scope (the Redis store takes them in one script call)
    are answered one by one: the first ones allowed, the one that filled the quota told it
    locked, every later one refused until that lock ends."""
    ip = _quota("ip:192.0.2.9", 5, 900)
    answers = await asyncio.gather(*(store.take_attempt([ip], now) for _ in range(8)))
    lock = (("ip:192.0.2.9", now + 900),)
    assert [a.allowed for a in answers].count(True) == 5
    assert [a.locks for a in answers if a.allowed].count(lock) == 1
    assert [a for a in answers if not a.allowed] == [Attempt(False, lock)] * 3
    # A lock left from an earlier window is gone once a new window counts again.
    assert (await store.take_attempt([ip], now + 901)).locks == ()
    assert await store.locked_until("ip:192.0.2.9", now + 901) is None
    assert (await store.user_state("x", now + 901)).locked_until is None


async def test_take_attempt_from_two_connections_at_once(store: Store, now: float, tmp_path: Path) -> None:
    """Two worker processes share the store: their attempts count together."""
    other: Store
    if isinstance(store, SqliteStore):
        other = SqliteStore(store.path, create=True)
    else:
        assert isinstance(store, RedisStore)
        other = RedisStore(store.url, prefix=store.prefix, create=True)
    await other.open()
    try:
        quota = [_quota("user:alice", 5, 900)]
        answers = await asyncio.gather(*(s.take_attempt(quota, now) for _ in range(100) for s in (store, other)))
        assert sum(a.allowed for a in answers) == 5
    finally:
        await other.close()


async def test_clear_failures_forgets_count_and_lock(store: Store, now: float) -> None:
    user = _quota("user:alice")
    await store.take_attempt([user], now)
    await store.take_attempt([user], now)
    await store.clear_failures("user:alice")
    assert (await store.take_attempt([user], now)).locks == ()
    assert (await store.take_attempt([user], now)).locks == ()
    assert (await store.take_attempt([user], now)).locks != ()
    assert await store.locked_until("user:alice", now) is not None
    await store.clear_failures("user:alice")
    assert await store.locked_until("user:alice", now) is None
    await store.clear_failures("user:never-failed")  # no error


# -- recovery codes --------------------------------------------------------------------------
async def test_recovery_codes_consume_once_and_replace(store: Store) -> None:
    await store.set_recovery_codes("alice", ["h1", "h2", "h3"])
    assert await store.consume_recovery_code("alice", "h1") is True
    assert await store.consume_recovery_code("alice", "h1") is False
    assert await store.consume_recovery_code("alice", "nope") is False
    assert await store.consume_recovery_code("bob", "h2") is False
    await store.set_recovery_codes("alice", ["h4"])
    assert await store.consume_recovery_code("alice", "h2") is False  # old set is dead
    assert await store.consume_recovery_code("alice", "h4") is True
    await store.set_recovery_codes("alice", ["h5"])
    await store.set_recovery_codes("alice", [])
    assert await store.consume_recovery_code("alice", "h5") is False


async def test_recovery_code_concurrent_consume_has_one_winner(store: Store) -> None:
    await store.set_recovery_codes("alice", ["h1", "h2"])
    results = await asyncio.gather(*(store.consume_recovery_code("alice", "h1") for _ in range(20)))
    assert results.count(True) == 1
    assert await store.consume_recovery_code("alice", "h2") is True


# -- sessions --------------------------------------------------------------------------------
async def test_sessions_create_get_expire_revoke(store: Store, now: float) -> None:
    await store.create_session("s1", "alice", now + 300)
    await store.create_session("s2", "alice", now + 600)
    assert await store.get_session("s1", now) == "alice"
    assert await store.get_session("s1", now + 300) is None
    assert await store.get_session("s2", now + 300) == "alice"
    assert await store.get_session("unknown", now) is None
    await store.revoke_session("s2")
    assert await store.get_session("s2", now) is None
    assert await store.get_session("s1", now) == "alice"
    await store.revoke_session("s2")  # twice: no error
    await store.revoke_session("never")


# -- users -----------------------------------------------------------------------------------
async def _populate(store: Store, user: str, now: float) -> None:
    await store.set_secret(user, f"secret-{user}".encode())
    await store.set_pending(user, b"pending", now + 300)
    await store.advance_step(user, 100)
    await store.set_recovery_codes(user, ["h1", "h2"])
    await store.create_session(f"{user}-s1", user, now + 300)
    await store.create_session(f"{user}-s2", user, now + 600)
    await store.take_attempt([Quota(f"user:{user}", 2, 60)], now)
    await store.take_attempt([Quota(f"user:{user}", 2, 60)], now)  # locked


async def test_revoke_user_sessions_ends_only_that_users_sessions(store: Store, now: float) -> None:
    await store.create_session("a1", "alice", now + 300)
    await store.create_session("a2", "alice", now + 600)
    await store.create_session("b1", "bob", now + 300)
    assert await store.revoke_user_sessions("alice") == 2
    assert await store.get_session("a1", now) is None
    assert await store.get_session("a2", now) is None
    assert await store.get_session("b1", now) == "bob"
    assert await store.revoke_user_sessions("alice") == 0
    await store.create_session("a3", "alice", now + 300)  # a session opened afterwards is kept
    assert await store.get_session("a3", now) == "alice"
    assert (await store.user_state("alice", now)).sessions == 1


async def test_delete_user_removes_everything(store: Store, now: float) -> None:
    await _populate(store, "alice", now)
    await _populate(store, "bob", now)
    await store.take_attempt([Quota("ip:192.0.2.1", 1, 60)], now)
    await store.delete_user("alice")
    assert await store.get_secret("alice") is None
    assert await store.get_pending("alice", now) is None
    assert await store.advance_step("alice", 100) is True  # the last step was forgotten
    assert await store.consume_recovery_code("alice", "h1") is False
    assert await store.get_session("alice-s1", now) is None
    assert await store.get_session("alice-s2", now) is None
    assert await store.locked_until("user:alice", now) is None
    assert await store.list_users() == ["bob"]
    # Nobody else is touched, and an IP lock is not the user's.
    assert await store.get_secret("bob") == b"secret-bob"
    assert await store.get_session("bob-s1", now) == "bob"
    assert await store.locked_until("user:bob", now) is not None
    assert await store.locked_until("ip:192.0.2.1", now) is not None
    await store.delete_user("nobody")  # no error


async def test_list_users_secret_or_live_pending(store: Store, now: float) -> None:
    assert await store.list_users() == []
    await store.set_secret("carol", b"c")
    await store.set_pending("alice", b"p", now + 300)
    await store.set_secret("bob", b"b")
    await store.set_pending("bob", b"p", now + 300)
    await store.set_pending("expired", b"p", now - 10)
    await store.create_session("s", "dave", now + 300)  # a session alone is not a user
    assert await store.list_users() == ["alice", "bob", "carol"]


async def test_user_state(store: Store, now: float) -> None:
    assert await store.user_state("alice", now) == UserState("alice", False, False, None, 0, 0, 0)
    await _populate(store, "alice", now)
    await store.create_session("old", "alice", now + 10)
    state = await store.user_state("alice", now + 20)
    assert state == UserState(
        user="alice",
        enrolled=True,
        pending=True,
        locked_until=now + 60,  # exact: the store hands back the float it was given
        failures=2,
        recovery_codes_left=2,
        sessions=2,
    )
    later = await store.user_state("alice", now + 400)
    assert (later.pending, later.locked_until, later.failures, later.sessions) == (False, None, 0, 1)
    # A frozen clock far ahead must not lose track of live sessions (delete_user needs them).
    await store.user_state("alice", now + 10_000)
    assert (await store.user_state("alice", now)).sessions == 3


async def test_iter_secrets(store: Store, now: float) -> None:
    assert await store.iter_secrets() == []
    await store.set_secret("bob", b"b")
    await store.set_secret("alice", b"a")
    await store.set_pending("carol", b"c", now + 300)
    assert sorted(await store.iter_secrets()) == [("alice", b"a"), ("bob", b"b")]


async def test_sample_secrets(store: Store, now: float) -> None:
    # The start-up key check (gateway/serve.py) reads at most `limit` active secrets.
    assert await store.sample_secrets(2) == []
    for user in ("alice", "bob", "carol"):
        await store.set_secret(user, user.encode())
    await store.set_pending("dave", b"d", now + 300)
    sample = await store.sample_secrets(2)
    assert len(sample) == 2 and all(token == user.encode() for user, token in sample)
    assert sorted(await store.sample_secrets(10)) == [("alice", b"alice"), ("bob", b"bob"), ("carol", b"carol")]


async def test_awkward_user_names_do_not_collide(store: Store, now: float) -> None:
    for i, user in enumerate(AWKWARD_USERS):
        await store.set_secret(user, f"c{i}".encode())
        await store.set_recovery_codes(user, [f"h{i}"])
        assert await store.advance_step(user, 10) is True
    for i, user in enumerate(AWKWARD_USERS):
        assert await store.get_secret(user) == f"c{i}".encode()
    assert await store.list_users() == sorted(AWKWARD_USERS)
    assert sorted(await store.iter_secrets()) == sorted((u, f"c{i}".encode()) for i, u in enumerate(AWKWARD_USERS))
    await store.delete_user("alice")
    remaining = [u for u in AWKWARD_USERS if u != "alice"]
    assert await store.list_users() == sorted(remaining)
    for i, user in enumerate(AWKWARD_USERS):
        if user != "alice":
            assert await store.consume_recovery_code(user, f"h{i}") is True
            assert await store.advance_step(user, 10) is False


async def test_redis_keys_of_one_user_share_a_cluster_slot(redis_server: RedisServer, now: float) -> None:
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex}", create=True)
    await store.open()
    try:
        for user in ("a{b}:c", "}x{"):
            await _populate(store, user, now)
            raw = store._r
            keys = [k async for k in raw.scan_iter(match=f"{store.prefix}:*")]
            own = [k for k in keys if b":s:" not in k and b"user%3A" not in k and not k.endswith(b":store-id")]
            assert len(own) == 5  # secret, pending, step, recovery, sessions
            assert len({key_slot(k) for k in own}) == 1
            await store.delete_user(user)
            left = [k async for k in raw.scan_iter(match=f"{store.prefix}:*")]
            assert left == [f"{store.prefix}:store-id".encode()]  # the store's own key, no user's
    finally:
        await store.close()


# -- life cycle and failing closed -----------------------------------------------------------
async def test_ping_and_idempotent_open_close(store: Store) -> None:
    await store.ping()
    await store.open()
    await store.ping()
    await store.close()
    with pytest.raises(StoreError):
        await store.ping()
    with pytest.raises(StoreError):
        await store.get_secret("alice")
    with pytest.raises(StoreError):
        await store.advance_step("alice", 1)
    await store.close()
    await store.open()  # a closed store can be opened again
    await store.set_secret("alice", b"x")
    assert await store.get_secret("alice") == b"x"


async def test_unencodable_user_name_fails_closed(store: Store) -> None:
    # A JSON claim may carry a lone surrogate; it cannot be stored, so the store refuses.
    with pytest.raises(StoreError) as caught:
        await store.set_secret("eve\ud800", b"x")
    assert "eve" not in str(caught.value)
    with pytest.raises(StoreError):
        await store.get_secret("eve\ud800")


async def test_sqlite_persists_across_reopen(tmp_path: Path, now: float) -> None:
    path = str(tmp_path / "gateway.db")
    first = SqliteStore(path, create=True)
    await first.open()
    await _populate(first, "alice", now)
    await first.close()
    second = SqliteStore(path, create=True)
    await second.open()
    try:
        assert await second.get_secret("alice") == b"secret-alice"
        assert await second.advance_step("alice", 100) is False
        assert await second.get_session("alice-s2", now) == "alice"
        state = await second.user_state("alice", now)
        assert (state.pending, state.recovery_codes_left, state.sessions) == (True, 2, 2)
        assert state.locked_until is not None
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await second.close()


async def test_sqlite_purges_expired_rows_lazily(tmp_path: Path, now: float) -> None:
    path = str(tmp_path / "gateway.db")
    store = SqliteStore(path, create=True)
    await store.open()
    try:
        await store.create_session("gone", "alice", now - 10)
        await store.set_pending("alice", b"p", now - 10)
        await store.take_attempt([Quota("ip:192.0.2.1", 5, 1)], now - 10)
        await store.create_session("live", "alice", now + 300)
        with sqlite3.connect(path) as raw:
            assert raw.execute("SELECT count(*) FROM sessions").fetchone()[0] == 2  # not yet: once a minute
        store._last_purge -= 60
        await store.create_session("live2", "alice", now + 300)
        with sqlite3.connect(path) as raw:
            tables = ("sessions", "pending", "failures")
            counts = [raw.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables]  # noqa: S608
        assert counts == [2, 0, 0]
    finally:
        await store.close()


async def test_sqlite_unwritable_path_raises_store_error(tmp_path: Path) -> None:
    for path in (tmp_path / "missing-dir" / "gateway.db", tmp_path):
        store = SqliteStore(str(path), create=True)
        with pytest.raises(StoreError, match="sqlite store"):
            await store.open()
        with pytest.raises(StoreError):
            await store.get_secret("alice")


async def test_sqlite_error_becomes_store_error_without_values(tmp_path: Path) -> None:
    path = str(tmp_path / "gateway.db")
    store = SqliteStore(path, create=True)
    await store.open()
    try:
        with sqlite3.connect(path) as raw:
            raw.execute("DROP TABLE secrets")
        with pytest.raises(StoreError) as caught:
            await store.set_secret("alice-private-name", b"ciphertext-private")
        assert "private" not in str(caught.value)
        await store.advance_step("alice", 1)  # the connection is not left in a transaction
    finally:
        await store.close()


async def test_redis_nothing_listening_fails_fast() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", create=True)
    started = time.monotonic()
    with pytest.raises(StoreError, match="redis store: open failed"):
        await store.open()
    with pytest.raises(StoreError):
        await store.get_secret("alice")
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("topology", ["redis_server", "redis_sentinel", "redis_cluster"])
async def test_redis_burst_beyond_the_pool_waits_instead_of_failing(
    request: pytest.FixtureRequest, topology: str, now: float
) -> None:
    """More reads in flight than max_connections: they queue for a connection (redis-py's default
    pool would fail them with "Too many connections", denying good requests under load). On
    Sentinel too (its pool is redis-py's Sentinel pool with the blocking pool's wait)."""
    server: RedisServer | SentinelSet = request.getfixturevalue(topology)
    store = RedisStore(server.url, prefix=f"burst{uuid.uuid4().hex}", max_connections=2, create=True)
    await store.open()
    try:
        await store.create_session("s", "alice", now + 60)
        found = await asyncio.gather(*(store.get_session("s", now) for _ in range(50)))
        assert found == ["alice"] * 50
    finally:
        await store.close()


async def test_redis_outage_after_open_raises_store_error(redis_server: RedisServer) -> None:
    server = RedisServer(redis_server.binary)
    server.start()
    store = RedisStore(server.url, prefix="outage", create=True)
    try:
        await store.open()
        await store.set_secret("alice", b"x")
        server.stop()
        started = time.monotonic()
        for call in (store.get_secret("alice"), store.advance_step("alice", 1), store.ping()):
            with pytest.raises(StoreError) as caught:
                await call
            assert "alice" not in str(caught.value)
        assert time.monotonic() - started < 2
    finally:
        await store.close()
        server.stop()


async def test_redis_silent_server_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Accepts TCP connections (the kernel backlog does) but never answers.
    monkeypatch.setattr(redis_module, "SOCKET_TIMEOUT", 0.3)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        store = RedisStore(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", create=True)
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.open()
        assert time.monotonic() - started < 1.5


class _Relay:
    """A TCP relay to Redis that can go silent mid-session (a hung server or network)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.silent = False
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [writer, up_writer]

        async def relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                while self.silent:
                    await asyncio.sleep(0.05)
                dst.write(data)
                await dst.drain()

        await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer), return_exceptions=True)

    async def stop(self) -> None:
        self.silent = False
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True)
        await self.server.wait_closed()


async def test_redis_server_going_silent_fails_every_call_in_time(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, now: float
) -> None:
    """Fail closed within SOCKET_TIMEOUT, also on the batched path (attempts, secrets), whose
    pool reads without a timeout of its own: the batch's round trip is bounded as a whole."""
    monkeypatch.setattr(redis_module, "SOCKET_TIMEOUT", 0.3)
    monkeypatch.setattr(redis_batch_module, "SOCKET_TIMEOUT", 0.3)  # the batched calls' bound
    relay = _Relay(redis_server.port)
    store = RedisStore(f"redis://127.0.0.1:{await relay.start()}/0", prefix=f"t{uuid.uuid4().hex}", create=True)
    await store.open()
    try:
        assert (await store.take_attempt([_quota("user:alice")], now)).allowed
        relay.silent = True
        for call in (store.take_attempt([_quota("user:alice")], now), store.get_secret("alice"), store.ping()):
            started = time.monotonic()
            with pytest.raises(StoreError):
                await asyncio.wait_for(call, 5)  # a hang fails the test, as TimeoutError
            assert time.monotonic() - started < 1.5
    finally:
        await store.close()
        await relay.stop()


async def test_sentinel_wrong_password_fails_closed_without_saying_it(redis_sentinel: SentinelSet) -> None:
    wrong = "Wr0ngPassw0rd"
    store = RedisStore(redis_sentinel.url.replace(PASSWORD, wrong), prefix="wrong", create=True)
    with pytest.raises(StoreError, match="redis store: open failed") as caught:
        await store.open()
    assert wrong not in str(caught.value) and PASSWORD not in str(caught.value)
    with pytest.raises(StoreError):
        await store.get_secret("alice")
    await store.close()


async def test_cluster_nothing_listening_fails_closed() -> None:
    store = RedisStore(f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}", prefix="gone", create=True)
    with pytest.raises(StoreError, match="redis store: open failed"):
        await store.open()
    with pytest.raises(StoreError):
        await store.get_secret("alice")
    await store.close()


def test_redis_prefix_is_validated() -> None:
    for bad in ("", "gw{x}", "g w", "gw*"):
        with pytest.raises(ValueError, match="prefix"):
            RedisStore("redis://127.0.0.1/0", prefix=bad, create=True)


# -- open_store_from_url ---------------------------------------------------------------------
def test_open_store_from_url_schemes() -> None:
    relative = open_store_from_url("sqlite:///data/gw.db", "gw")
    assert isinstance(relative, SqliteStore) and relative.path == "data/gw.db"
    absolute = open_store_from_url("sqlite:////var/lib/gw/gw.db", "gw")
    assert isinstance(absolute, SqliteStore) and absolute.path == "/var/lib/gw/gw.db"
    for url in ("redis://127.0.0.1:6379/0", "rediss://cache.example:6380/1", "unix:///run/redis.sock"):
        store = open_store_from_url(url, "pfx")
        assert isinstance(store, RedisStore) and (store.url, store.prefix) == (url, "pfx")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://db/gw", "unknown store URL scheme postgres://"),
        ("gateway.db", r"unknown store URL scheme \(none\)"),
        ("", "unknown store URL scheme"),
        ("sqlite://host/gw.db", "sqlite:///relative.db"),
        ("sqlite:///", "needs a file path"),
        ("sqlite:///:memory:", "needs a file path"),
        ("redis://127.0.0.1:port/0", "invalid redis URL"),
        ("redis://127.0.0.1/0?socket_timeout=soon", "invalid redis URL"),
    ],
)
def test_open_store_from_url_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store_from_url(url, "gw")


async def test_redis_take_attempt_survives_a_script_flush(redis_server: RedisServer, now: float) -> None:
    """A restarted Redis has no scripts: the pipeline loads them once and retries."""
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex}", create=True)
    await store.open()
    try:
        quota = [Quota("user:alice", 2, 60), Quota("ip:192.0.2.1", 2, 60)]
        assert (await store.take_attempt(quota, now)).allowed
        await store._r.script_flush()
        assert (await store.take_attempt(quota, now)).locked_until == now + 60
    finally:
        await store.close()


async def test_redis_batched_attempts_fail_closed_together(
    redis_server: RedisServer, now: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent attempts share one pipeline: when it fails, every caller gets a StoreError."""
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex}", create=True)
    await store.open()
    try:

        def broken(*args: object, **kwargs: object) -> object:
            raise RedisConnectionError("down")

        monkeypatch.setattr(store._batch.client, "pipeline", broken)
        quota = [Quota("user:alice", 5, 60)]
        results = await asyncio.gather(*(store.take_attempt(quota, now) for _ in range(10)), return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results)
        monkeypatch.undo()
        assert (await store.take_attempt(quota, now)).allowed  # nothing was counted, nothing is stuck
    finally:
        await store.close()


async def test_redis_a_bad_name_fails_only_its_own_caller_in_a_batch(redis_server: RedisServer, now: float) -> None:
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex}", create=True)
    await store.open()
    try:
        await store.set_secret("alice", b"a")
        results = await asyncio.gather(
            store.get_secret("alice"),
            store.get_secret("eve\ud800"),
            store.take_attempt([Quota("user:alice", 5, 60)], now),
            return_exceptions=True,
        )
        assert results[0] == b"a" and isinstance(results[1], StoreError) and results[2] == Attempt(True)
    finally:
        await store.close()


@pytest.mark.parametrize("revocation", ["revoke_user_sessions", "delete_user"])
async def test_redis_a_session_opened_across_a_revocation_is_not_left_open(
    redis_server: RedisServer, revocation: str
) -> None:
    """The session index and the session key are in two slots, so opening a session is two
    steps; a revocation that takes the index between them used to delete a key not yet written,
    leaving a session no reset could find (found by the second attack). The revocation runs
    from another connection, exactly between the two steps."""
    prefix = f"t{uuid.uuid4().hex}"
    store, other = (
        RedisStore(redis_server.url, prefix=prefix, create=True),
        RedisStore(redis_server.url, prefix=prefix, create=True),
    )
    await store.open()
    await other.open()
    now = time.time()
    index_session = store._lua_index_session

    async def index_then_revoke(*args: object, **kwargs: object) -> object:
        result = await index_session(*args, **kwargs)  # type: ignore[arg-type]
        await getattr(other, revocation)("alice")
        return result

    store._lua_index_session = index_then_revoke  # type: ignore[assignment]
    try:
        assert await store.create_session("racing", "alice", now + 300) is False
        assert await store.get_session("racing", now) is None
    finally:
        store._lua_index_session = index_session
        await store.close()
        await other.close()


async def test_create_session_reports_an_open_session(store: Store, now: float) -> None:
    assert await store.create_session("s1", "alice", now + 300) is True
    assert await store.get_session("s1", now) == "alice"


# -- SQLite faults (tests/faults/test_sqlite_faults.py has them against a real gateway) -------
async def test_a_deleted_sqlite_file_is_noticed_denied_and_never_created_again(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    store = SqliteStore(str(db), create=True)
    await store.open()
    try:
        await store.set_secret("alice", b"a")
        with sqlite3.connect(db) as source, sqlite3.connect(tmp_path / "backup.db") as copy:
            source.backup(copy)
        source.close()
        copy.close()
        for name in ("gateway.db", "gateway.db-wal", "gateway.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        with pytest.raises(StoreError, match="deleted"):
            await store.ping()  # readiness checks the file at once; requests within a second
        with pytest.raises(StoreError, match="deleted"):
            await store.get_secret("alice")  # and everything after, until it is back
        assert not db.exists()  # no empty store in its place: every user would be unenrolled
        shutil.copyfile(tmp_path / "backup.db", db)
        assert await store.get_secret("alice") == b"a"
        await store.ping()
    finally:
        await store.close()


async def test_sqlite_calls_queued_behind_a_lock_wait_one_store_timeout_in_all(
    tmp_path: Path, now: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call queued on the store's one thread behind a call that waits for another
    process's lock is answered within the store timeout, not one timeout after the other."""
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_MS", 400)
    store = SqliteStore(str(tmp_path / "gateway.db"), create=True)
    await store.open()
    holder = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        calls = [store.take_attempt([_quota(f"user:u{i}")], now) for i in range(4)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        elapsed = time.monotonic() - started
        assert all(isinstance(r, StoreError) for r in results), results
        assert elapsed < 1.0, elapsed  # the timeout and some slack bound a hang; before: 4 x 0.4 s
        holder.execute("ROLLBACK")
        assert (await store.take_attempt([_quota("user:u9")], now)).allowed
    finally:
        holder.close()
        await store.close()


# -- the store's identity: a store that lost its data is never a new one (issue 14, G1) --------
async def test_sqlite_open_never_makes_or_initialises_a_store(tmp_path: Path) -> None:
    """Without ``create`` no file is made; with or without it a file that exists but has no
    identity (0 bytes; a database of another program) is refused and left as it was."""
    db = tmp_path / "gateway.db"
    with pytest.raises(StoreError, match="gateway store init"):
        await SqliteStore(str(db)).open()
    assert not db.exists()
    db.write_bytes(b"")
    for create in (False, True):
        with pytest.raises(StoreError, match="no store identity"):
            await SqliteStore(str(db), create=create).open()
    assert db.stat().st_size == 0
    with sqlite3.connect(db) as raw:  # a store from before the store id (an upgrade)
        raw.execute("CREATE TABLE secrets (user TEXT PRIMARY KEY, secret BLOB NOT NULL) WITHOUT ROWID")
        raw.execute("INSERT INTO secrets VALUES ('alice', x'61')")
    raw.close()
    with pytest.raises(StoreError, match="no store identity"):
        await SqliteStore(str(db), create=True).open()
    _, created = await init_store(f"sqlite:///{db}", "gw")  # the deliberate step adopts it, rows kept
    store = SqliteStore(str(db))
    await store.open()
    try:
        assert created and await store.get_secret("alice") == b"a"
    finally:
        await store.close()


async def test_store_init_makes_an_identity_once_and_keeps_the_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/gateway.db"
    first_id, created = await init_store(url, "gw")
    assert created and len(first_id) == 32
    store = SqliteStore(str(tmp_path / "gateway.db"))
    await store.open()
    await store.set_secret("alice", b"a")
    await store.close()
    assert await init_store(url, "gw") == (first_id, False)
    store = SqliteStore(str(tmp_path / "gateway.db"))
    await store.open()
    try:
        assert store.store_id == first_id and await store.get_secret("alice") == b"a"
    finally:
        await store.close()


async def test_a_running_sqlite_store_refuses_an_empty_or_foreign_file_and_serves_its_backup(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    store = SqliteStore(str(db), create=True)
    await store.open()
    try:
        await store.set_secret("alice", b"a")
        with sqlite3.connect(db) as source, sqlite3.connect(tmp_path / "backup.db") as copy:
            source.backup(copy)
        source.close()
        copy.close()
        await init_store(f"sqlite:///{tmp_path}/other.db", "gw")
        for replace in (lambda: db.write_bytes(b""), lambda: shutil.move(tmp_path / "other.db", db)):
            for name in ("gateway.db", "gateway.db-wal", "gateway.db-shm"):
                (tmp_path / name).unlink(missing_ok=True)
            replace()
            with pytest.raises(StoreError):
                await store.ping()  # readiness checks at once
            with pytest.raises(StoreError):
                await store.get_secret("alice")  # never None ("not enrolled")
        assert db.stat().st_size > 0  # the foreign store is left as it is
        shutil.copyfile(tmp_path / "backup.db", tmp_path / "restoring.db")
        (tmp_path / "restoring.db").rename(db)
        assert await store.get_secret("alice") == b"a"
        await store.ping()
    finally:
        await store.close()


async def test_a_running_redis_store_refuses_a_flushed_server_until_its_id_is_back(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex}"
    with pytest.raises(StoreError, match="no initialised store"):
        await RedisStore(redis_server.url, prefix=prefix).open()
    store = RedisStore(redis_server.url, prefix=prefix, create=True)
    await store.open()
    try:
        await store.set_secret("alice", b"a")
        raw = store._client
        store_id = await raw.get(f"{prefix}:store-id")
        assert isinstance(store_id, bytes)
        await raw.delete(f"{prefix}:store-id", f"{prefix}:{{alice}}:secret")  # the data lost
        with pytest.raises(StoreError, match="refused"):
            await store.set_pending("alice", b"p", time.time() + 60)  # enrolment checks every time
        with pytest.raises(StoreError, match="refused"):
            await store.get_secret("alice")  # never None ("not enrolled")
        with pytest.raises(StoreError, match="refused"):
            await store.ping()
        await raw.set(f"{prefix}:store-id", store_id)  # the same store back (its persistence)
        store._identity_checked_at = 0.0  # no waiting out the once-a-second check
        assert await store.get_secret("alice") is None
        await store.ping()
    finally:
        await store.close()
