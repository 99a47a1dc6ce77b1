"""The store's contract: what the gateway keeps per user, and the atomic operations on it.

Two implementations honour it, ``sqlite.py`` (embedded default) and ``redis.py``; the same
contract tests run against both (``tests/test_store.py``). Every method raises
:class:`gateway.errors.StoreError` when the backend cannot answer; callers deny.

Values are opaque to the store: secrets arrive already encrypted (``crypto.py``), recovery
codes and session ids arrive already hashed. The store never sees a plaintext secret.
Times are Unix seconds (float) from ``time.time()``; ``now`` is passed in where tests need
a frozen clock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# A key prefix namespaces every Redis key (``redis.py``'s key layout): none of the characters
# that layout escapes in user names ("%", "{", "}") and no whitespace. Config checks it at
# load and RedisStore again at construction, with this one rule.
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:-]+")


def is_key_prefix(prefix: str) -> bool:
    """``prefix`` is a non-empty run of letters, digits and ``_.:-``."""
    return _KEY_PREFIX.fullmatch(prefix) is not None


@dataclass(frozen=True)
class UserState:
    """What ``gateway users show`` prints: never a secret."""

    user: str
    enrolled: bool
    pending: bool
    locked_until: float | None
    failures: int
    recovery_codes_left: int
    sessions: int


@dataclass(frozen=True, slots=True)
class Quota:
    """At most ``limit`` attempts on ``scope`` in a window that lasts ``window`` seconds after
    the last attempt taken; reaching the limit locks the scope for that window."""

    scope: str
    limit: int
    window: float


@dataclass(frozen=True, slots=True)
class Attempt:
    """What :meth:`Store.take_attempt` answers. ``locks`` holds (scope, locked_until) pairs:
    when refused, the quotas that were full; when allowed, those this attempt has just filled
    (locked unless a success resets them)."""

    allowed: bool
    locks: tuple[tuple[str, float], ...] = ()

    @property
    def locked_until(self) -> float | None:
        return max((until for _, until in self.locks), default=None)


class Store(Protocol):
    async def open(self) -> None:
        """Connect, create tables; raise StoreError when unreachable (start-up fails fast)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError unless the backend answers AND takes a write (readiness). A store
        that only reads (Redis out of memory with noeviction, a READONLY replica, a read-only or
        full disk) cannot take a code's attempt or used step, so every code is denied there:
        readiness says so instead of sending traffic to a gateway that can only refuse it."""

    # -- secrets ---------------------------------------------------------------------------
    async def get_secret(self, user: str) -> bytes | None:
        """The active encrypted secret, or None when the user is not enrolled."""

    async def set_secret(self, user: str, ciphertext: bytes) -> None:
        """Make ``ciphertext`` the active secret, dropping any pending one (enrolment done)."""

    async def get_pending(self, user: str, now: float) -> bytes | None:
        """The pending (enrolment) secret if it has not expired."""

    async def set_pending(self, user: str, ciphertext: bytes, expires_at: float) -> None: ...

    async def activate_secret(self, user: str, expected: bytes | None, new: bytes) -> bool:
        """Finish an enrolment, atomically: make ``new`` the active secret and drop the pending
        one and every recovery code (they belonged to the old authenticator), only if the active
        secret is still ``expected`` (None: the user had none). False, changing nothing, if it
        was replaced or removed meanwhile: an enrolment started without proof of an
        authenticator must never replace one that appeared since."""

    async def replace_secret(self, user: str, old: bytes, new: bytes) -> bool:
        """Compare-and-set for key rotation: store ``new`` only if the active one is still ``old``."""

    # -- replay guard (RFC 6238 §5.2) ---------------------------------------------------------
    async def advance_step(self, user: str, step: int) -> bool:
        """Atomically record ``step`` as the last accepted time step if it is greater than the
        one recorded; True if it was recorded, False if ``step`` was already used or older."""

    # -- attempts and lockouts (scope is e.g. "user:alice" or "ip:192.0.2.1") -----------------
    async def take_attempt(self, quotas: Sequence[Quota], now: float) -> Attempt:
        """Take one attempt from every quota *before* a code is judged, each atomically.

        A quota with room counts the attempt and restarts its window (``now + window``); the
        attempt that uses its last room locks the scope until then. A full quota refuses and
        changes nothing. The attempt is allowed only if every quota had room; a quota that had
        room still counts it when another refused (so counts never fall short of what was
        judged). Each quota is one single-key atomic step, so on Redis Cluster each stays in
        its own slot; several quotas still cost one round trip (SQLite: one transaction)."""

    async def release_attempt(self, scope: str) -> None:
        """Give one attempt back to ``scope`` (a success from that address), lifting its lock."""

    async def locked_until(self, scope: str, now: float) -> float | None:
        """When the lock on ``scope`` ends, or None if it is not locked at ``now``."""

    async def clear_failures(self, scope: str) -> None:
        """Forget the attempts and any lock of ``scope`` (after a success, or `users unlock`)."""

    # -- recovery codes (already hashed) ---------------------------------------------------
    async def set_recovery_codes(self, user: str, hashes: list[str]) -> None:
        """Replace the whole set: the old codes stop working at once."""

    async def consume_recovery_code(self, user: str, code_hash: str) -> bool:
        """Atomically remove ``code_hash`` from the user's set; True if it was there."""

    # -- 2FA sessions (ids arrive hashed) --------------------------------------------------
    async def create_session(self, session_hash: str, user: str, expires_at: float) -> bool:
        """Open a session. False if a revocation of the user's sessions (``revoke_user_sessions``,
        ``delete_user``) ran while it was being opened: it is then not open."""

    async def get_session(self, session_hash: str, now: float) -> str | None:
        """The session's user, or None if unknown, revoked or expired."""

    async def revoke_session(self, session_hash: str) -> None: ...

    async def revoke_user_sessions(self, user: str) -> int:
        """End every session of ``user`` (a new authenticator replaced the old one); how many."""

    # -- users -----------------------------------------------------------------------------
    async def delete_user(self, user: str) -> None:
        """Remove secret, pending secret, last step, failures, lock, recovery codes and every
        session of the user (``gateway users reset``)."""

    async def list_users(self) -> list[str]:
        """Every user with an active or pending secret, sorted."""

    async def user_state(self, user: str, now: float) -> UserState: ...

    async def iter_secrets(self) -> list[tuple[str, bytes]]:
        """Every (user, active ciphertext) pair, for key rotation."""

    async def sample_secrets(self, limit: int) -> list[tuple[str, bytes]]:
        """Up to ``limit`` (user, active ciphertext) pairs, any of them: the start-up key check
        (gateway/serve.py) reads a few, never the whole store."""
