"""gateway.sessions: 2FA sessions kept as hashes, and this worker's cache of them.

A real SQLite store in a temporary file and a frozen clock. Two ``Sessions`` on one store are
two workers.
"""

from __future__ import annotations

from gateway.sessions import MAX_SESSION_ID, NewSession, Sessions, hash_session_id
from gateway.store import Store
from tests.support.clock import Clock

TTL = 3600.0
CACHE_TTL = 1.0


async def opened(sessions: Sessions, user: str = "alice") -> NewSession:
    new = await sessions.create(user)
    assert new is not None
    sessions.remember(new)
    return new


async def test_the_store_holds_only_the_hash(store: Store) -> None:
    clock = Clock()
    new = await opened(Sessions(store, TTL, CACHE_TTL, clock))
    assert new.key == hash_session_id(new.session_id) != new.session_id
    assert new.expires == clock.now + TTL
    assert await store.get_session(new.key, clock.now) == "alice"
    assert await store.get_session(new.session_id, clock.now) is None  # a copy of the store opens nothing


async def test_a_session_ends_with_its_ttl(store: Store) -> None:
    clock = Clock()
    sessions = Sessions(store, TTL, CACHE_TTL, clock)
    new = await opened(sessions)
    clock.now += TTL - 0.5
    assert await sessions.user(new.session_id) == "alice"
    clock.now += 0.5 + CACHE_TTL  # past its end, and past the cache's copy of it
    assert await sessions.user(new.session_id) is None


async def test_no_id_or_an_overlong_one_is_no_session(store: Store) -> None:
    sessions = Sessions(store, TTL, CACHE_TTL, Clock())
    assert await sessions.user(None) is None
    assert await sessions.user("") is None
    assert await sessions.user("x" * (MAX_SESSION_ID + 1)) is None
    assert await sessions.live_user("x" * (MAX_SESSION_ID + 1)) is None


async def test_a_revocation_elsewhere_is_seen_within_cache_ttl_and_at_once_by_live_user(store: Store) -> None:
    clock = Clock()
    here, elsewhere = Sessions(store, TTL, CACHE_TTL, clock), Sessions(store, TTL, CACHE_TTL, clock)
    new = await opened(here)
    await elsewhere.revoke(new.session_id)  # `gateway users logout`, or the logout of another worker
    assert await here.user(new.session_id) == "alice"  # this worker's cache, at most CACHE_TTL old
    assert await here.live_user(new.session_id) is None  # the store itself: what WebSockets poll
    assert await here.user(new.session_id) is None  # ...and live_user refreshed the cache


async def test_a_miss_is_cached_too(store: Store) -> None:
    """A flood of requests with a made-up cookie costs one store read per cache_ttl."""
    clock = Clock()
    sessions = Sessions(store, TTL, CACHE_TTL, clock)
    made_up = "made-up-session-id"
    assert await sessions.user(made_up) is None
    await store.create_session(hash_session_id(made_up), "alice", clock.now + TTL)  # now it exists
    assert await sessions.user(made_up) is None
    clock.now += CACHE_TTL
    assert await sessions.user(made_up) == "alice"


async def test_revoke_user_ends_every_session_of_the_user_here_at_once(store: Store) -> None:
    sessions = Sessions(store, TTL, CACHE_TTL, Clock())
    alice = [await opened(sessions) for _ in range(3)]
    bob = await opened(sessions, "bob")
    assert await sessions.revoke_user("alice") == 3
    for new in alice:
        assert await sessions.user(new.session_id) is None
    assert await sessions.user(bob.session_id) == "bob"


async def test_a_discarded_session_was_never_handed_out(store: Store) -> None:
    clock = Clock()
    sessions = Sessions(store, TTL, CACHE_TTL, clock)
    new = await sessions.create("alice")
    assert new is not None
    await sessions.discard(new)
    assert await store.get_session(new.key, clock.now) is None
    assert await sessions.user(new.session_id) is None
