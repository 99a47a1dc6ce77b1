"""gateway.cache.TtlCache: deadlines on an injected clock, the one eviction policy, MISS vs None."""

from __future__ import annotations

import math

from gateway.cache import MISS, TtlCache
from tests.support.clock import Clock


def test_an_entry_lives_ttl_seconds_on_the_injected_clock() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(1.0, 10, clock)
    cache.put("a", 1)
    clock.now += 0.999
    assert cache.get("a") == 1
    clock.now += 0.001  # the deadline itself is past: an entry is trusted strictly before it
    assert cache.get("a") is MISS
    assert len(cache) == 0  # an expired entry read is gone


def test_until_shortens_an_entry_but_never_lengthens_it() -> None:
    clock = Clock()
    cache: TtlCache[str, str] = TtlCache(10.0, 10, clock)
    cache.put("lock", "x", until=clock.now + 2)  # a lock that ends in 2 s is not kept 10 s
    cache.put("long", "y", until=clock.now + 60)  # ...nor is anything kept past ttl
    clock.now += 2
    assert cache.get("lock") is MISS and cache.get("long") == "y"
    clock.now += 8
    assert cache.get("long") is MISS


def test_none_is_a_value_and_a_miss_is_miss() -> None:
    """ "Not enrolled" and "no such session" are cached as None; only MISS means "ask the store"."""
    cache: TtlCache[str, str | None] = TtlCache(1.0, 10, Clock())
    assert cache.get("alice") is MISS
    cache.put("alice", None)
    assert cache.get("alice") is None


def test_a_full_cache_starts_again_empty() -> None:
    cache: TtlCache[int, int] = TtlCache(60.0, 3, Clock())
    for i in range(3):
        cache.put(i, i)
    assert len(cache) == 3
    cache.put(3, 3)  # the fourth entry empties the cache first: memory stays bounded
    assert len(cache) == 1 and cache.get(3) == 3 and cache.get(0) is MISS


def test_a_ttl_of_zero_keeps_nothing() -> None:
    """``store.cache_ttl = 0``: every read goes to the store."""
    cache: TtlCache[str, int] = TtlCache(0.0, 10, Clock())
    cache.put("a", 1)
    assert len(cache) == 0 and cache.get("a") is MISS


def test_an_infinite_ttl_keeps_an_entry_until_its_own_deadline() -> None:
    """The JWT cache: a verified token is kept until its exp, however far that is."""
    clock = Clock()
    cache: TtlCache[str, str] = TtlCache(math.inf, 10, clock)
    cache.put("token", "alice", until=clock.now + 86_400)
    clock.now += 86_399
    assert cache.get("token") == "alice"
    clock.now += 1
    assert cache.get("token") is MISS


def test_drop_and_drop_value() -> None:
    cache: TtlCache[str, str] = TtlCache(60.0, 10, Clock())
    for key, user in (("s1", "alice"), ("s2", "bob"), ("s3", "alice")):
        cache.put(key, user)
    cache.drop("s2")
    cache.drop("absent")  # dropping what is not there is no error
    assert cache.get("s2") is MISS
    cache.drop_value("alice")  # every session of alice, at once
    assert len(cache) == 0


def test_expired_entries_are_swept_out_not_kept_until_the_cache_is_full() -> None:
    # A soak found RSS growing: each session opened by a code left a dead entry behind until
    # its key came back or 100,000 had piled up. Entries one second apart, each living 10 s:
    # however many are put, only about the live ones (and at most twice the sweep size) stay.
    clock = Clock()
    cache: TtlCache[int, str] = TtlCache(10.0, 100_000, clock)
    for i in range(20_000):
        cache.put(i, "session")
        clock.now += 1.0
    assert len(cache) <= 2 * 1024
    assert cache.get(19_999) == "session"  # a live entry survives every sweep
    assert cache.get(19_990) is MISS


def test_a_sweep_keeps_every_live_entry() -> None:
    clock = Clock()
    cache: TtlCache[int, int] = TtlCache(math.inf, 100_000, clock)
    for i in range(5_000):
        cache.put(i, i)
    assert len(cache) == 5_000
    assert all(cache.get(i) == i for i in range(5_000))
