"""gateway.lockouts: attempts taken before a code is judged, locks, and this worker's hint of them.

A real SQLite store in a temporary file and a frozen clock. The bursts through the whole app
are in test_factors.py; here each rule is seen once, on its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import LimitsConfig
from gateway.errors import StoreError
from gateway.lockouts import Locked, Lockouts, address_scope
from gateway.store import Attempt, Store
from gateway.store.sqlite import SqliteStore
from tests.support.clock import Clock

LIMITS = LimitsConfig(max_failures=3, lockout=60, ip_max_failures=5, ip_lockout=120)
CLIENT = "203.0.113.7"


def allowed(result: Attempt | Locked) -> Attempt:
    assert isinstance(result, Attempt), result
    return result


async def miss(lockouts: Lockouts, user: str = "alice", client: str | None = CLIENT) -> Locked | None:
    """One wrong code: its attempt taken, then reported missed."""
    return lockouts.missed(allowed(await lockouts.take(user, client)))


def test_address_scope() -> None:
    assert address_scope("192.0.2.1") == "ip:192.0.2.1"
    # RFC 7934: one host may hold a whole /64, so it is one quota.
    assert address_scope("2001:db8:1:2::1") == address_scope("2001:db8:1:2:ffff::9") == "ip:2001:db8:1:2::/64"
    assert address_scope("2001:db8:1:3::1") != address_scope("2001:db8:1:2::1")
    assert address_scope("::ffff:192.0.2.1") == "ip:192.0.2.1"
    assert address_scope("64:ff9b::192.0.2.1") == "ip:192.0.2.1"  # RFC 6052 §2.1
    assert address_scope("unix-socket") == "ip:unix-socket"  # not an address: counted as sent


async def test_the_attempt_that_uses_the_last_room_locks_and_says_how_long(store: Store) -> None:
    clock = Clock()
    lockouts = Lockouts(store, LIMITS, 1.0, clock)
    assert await miss(lockouts) is None
    assert await miss(lockouts) is None
    assert await miss(lockouts) == Locked(60)  # the third wrong code: locked from now
    assert lockouts.known("alice", CLIENT) == Locked(60)
    clock.now += 30.2
    # Retry-After in whole seconds, rounded up (RFC 9110 §10.2.3).
    assert await lockouts.take("alice", CLIENT) == Locked(30)


async def test_a_known_lock_is_refused_without_the_store(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteStore(str(tmp_path / "gateway.db"), create=True)
    await store.open()
    lockouts = Lockouts(store, LIMITS, 1.0, clock)
    for _ in range(3):
        await miss(lockouts)
    await store.close()
    assert lockouts.known("alice", None) == Locked(60)  # the flood meets no store round trip
    with pytest.raises(StoreError):
        await lockouts.take("bob", None)  # (the store is really gone)


async def test_the_hint_lasts_cache_ttl_and_the_store_has_the_last_word(store: Store) -> None:
    clock = Clock()
    here, elsewhere = Lockouts(store, LIMITS, 1.0, clock), Lockouts(store, LIMITS, 1.0, clock)
    for _ in range(3):
        await miss(elsewhere)
    assert here.known("alice", CLIENT) is None  # another worker's lock: no hint here...
    assert await here.take("alice", CLIENT) == Locked(60)  # ...the store refuses
    assert here.known("alice", CLIENT) == Locked(60)  # and now this worker knows
    await elsewhere.unlock("alice")
    assert here.known("alice", CLIENT) == Locked(60)  # an unlock elsewhere is seen...
    clock.now += 1.0
    assert here.known("alice", CLIENT) is None  # ...within cache_ttl
    allowed(await here.take("alice", CLIENT))


async def test_a_cache_ttl_of_zero_keeps_no_hint(store: Store) -> None:
    lockouts = Lockouts(store, LIMITS, 0.0, Clock())
    for _ in range(3):
        await miss(lockouts)
    assert lockouts.known("alice", CLIENT) is None
    assert await lockouts.take("alice", CLIENT) == Locked(60)


async def test_an_address_is_locked_for_every_user(store: Store) -> None:
    lockouts = Lockouts(store, LIMITS, 1.0, Clock())
    results = [await miss(lockouts, user=f"user{i}") for i in range(5)]
    assert results == [None, None, None, None, Locked(120)]
    assert lockouts.known("someone-else", CLIENT) == Locked(120)
    assert lockouts.known("someone-else", "203.0.113.8") is None
    allowed(await lockouts.take("someone-else", "203.0.113.8"))


async def test_success_resets_the_user_and_gives_the_address_its_attempt_back(store: Store) -> None:
    lockouts = Lockouts(store, LIMITS, 1.0, Clock())
    for i in range(3):  # three users, one wrong code each: three of the address's five attempts
        await miss(lockouts, user=f"user{i}")
    await miss(lockouts, user="alice")  # the fourth
    allowed(await lockouts.take("alice", CLIENT))  # the fifth: it fills the address's quota...
    await lockouts.succeeded("alice", CLIENT)  # ...but it was a right code: given back
    assert (await store.user_state("alice", Clock()())).failures == 0
    # Carol's code is judged (``miss`` asserts its attempt was allowed): the room alice gave
    # back, and the last one, so her wrong code locks the address; dave's is not judged.
    assert await miss(lockouts, user="carol") == Locked(120)
    assert await lockouts.take("dave", CLIENT) == Locked(120)


async def test_a_success_forgets_the_hints_of_its_scopes(store: Store) -> None:
    """A lock seen by a concurrent request of the same user or address is not kept after a
    right code lifted it in the store."""
    lockouts = Lockouts(store, LIMITS, 60.0, Clock())
    for i in range(5):
        await miss(lockouts, user=f"user{i}" if i < 4 else "alice")
    for _ in range(2):
        await miss(lockouts, user="alice", client=None)
    assert lockouts.known("alice", None) == Locked(60) and lockouts.known("bob", CLIENT) == Locked(120)
    await lockouts.succeeded("alice", CLIENT)
    assert lockouts.known("alice", None) is None and lockouts.known("bob", CLIENT) is None


async def test_reset_forgets_the_hint(store: Store) -> None:
    lockouts = Lockouts(store, LIMITS, 60.0, Clock())
    for _ in range(3):
        await miss(lockouts, client=None)
    await store.delete_user("alice")  # what `gateway users reset` does in the store
    assert lockouts.known("alice", None) == Locked(60)
    lockouts.forget("alice")
    assert lockouts.known("alice", None) is None
