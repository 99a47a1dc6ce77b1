"""2FA sessions: the cookie a right code earns, so the next requests need no code.

The store keeps only a hash of each session id, so a copy of the store opens no session. A
request with a session is the hot path: its answer comes from an in-process cache whose
entries live at most ``store.cache_ttl`` seconds (≤ 1 s), so a session revoked on another
worker or replica ends within that bound; on this worker it ends at once.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from gateway.cache import MISS, TtlCache
from gateway.store import Store

log = logging.getLogger("gateway.audit")

_CACHE_SIZE = 100_000
# A session id is 43 characters (32 random bytes, base64url); anything much longer is not one
# of ours and is not hashed or looked up.
MAX_SESSION_ID = 128


def hash_session_id(session_id: str) -> str:
    """The store keeps only a hash of each session id, so a copy of the store opens no session."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class NewSession:
    """A session just created in the store, not yet handed to the client."""

    session_id: str  # for the cookie; never logged
    key: str  # its hash, as the store knows it
    user: str
    expires: float


class Sessions:
    def __init__(self, store: Store, ttl: float, cache_ttl: float, clock: Callable[[], float]) -> None:
        self.store = store
        self.ttl = ttl
        self.clock = clock
        # hashed session id -> its user, or None: no such session (a miss is cached too).
        self._users: TtlCache[str, str | None] = TtlCache(cache_ttl, _CACHE_SIZE, clock)

    async def create(self, user: str) -> NewSession | None:
        """A new session in the store; None when the user's sessions were ended meanwhile."""
        session_id = secrets.token_urlsafe(32)
        new = NewSession(session_id, hash_session_id(session_id), user, self.clock() + self.ttl)
        if not await self.store.create_session(new.key, user, new.expires):
            log.warning("session for user=%r not opened: the user's sessions were ended meanwhile", user)
            return None
        return new

    def remember(self, new: NewSession) -> None:
        """The session is handed out: this worker knows it without asking the store."""
        self._users.put(new.key, new.user, new.expires)

    async def discard(self, new: NewSession) -> None:
        """A session created but never handed out."""
        await self.store.revoke_session(new.key)

    async def user(self, session_id: str | None) -> str | None:
        """The user of a live session, from this worker's cache when it is fresh enough."""
        if not session_id or len(session_id) > MAX_SESSION_ID:
            return None
        key = hash_session_id(session_id)
        cached = self._users.get(key)
        if cached is not MISS:
            return cached
        return await self._read(key)

    async def live_user(self, session_id: str) -> str | None:
        """:meth:`user` read from the store itself, past the cache (which it refreshes): for
        watching open connections, so a revocation on another worker is seen within one poll."""
        if len(session_id) > MAX_SESSION_ID:
            return None
        return await self._read(hash_session_id(session_id))

    async def _read(self, key: str) -> str | None:
        found = await self.store.get_session(key, self.clock())
        self._users.put(key, found)
        return found

    async def revoke(self, session_id: str) -> None:
        key = hash_session_id(session_id)
        await self.store.revoke_session(key)
        self._users.drop(key)

    async def revoke_user(self, user: str) -> int:
        """End every session of ``user``; how many there were."""
        ended = await self.store.revoke_user_sessions(user)
        self.forget_user(user)
        return ended

    def forget_user(self, user: str) -> None:
        self._users.drop_value(user)
