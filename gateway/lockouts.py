"""Attempts and lockouts: how many codes a user or an address may have judged (issue 10).

Every code, recovery code and enrolment code takes an attempt from the user's and the
address's quota *before* it is judged, in one atomic store operation (``Store.take_attempt``),
so no burst gets more than ``limits.max_failures`` codes judged for one user
(``limits.ip_max_failures`` for one address) in a lockout window. A right code resets the
user's count and gives the address its attempt back. A lockout stops attempts only: a live 2FA
session of the user still passes (``decision.py``).

A lock this worker saw is remembered for at most ``store.cache_ttl`` seconds, so a flood of
codes from a locked-out user or address is refused with no store round trip. That cache only
ever refuses: anything that grants has taken its attempt in the store.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from gateway.audit import audit
from gateway.cache import MISS, TtlCache
from gateway.config import LimitsConfig
from gateway.store import Attempt, Quota, Store

_CACHE_SIZE = 100_000
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True, slots=True)
class Locked:
    """An attempt refused, or the last one used up: come back in ``retry_after`` seconds."""

    retry_after: int


@functools.lru_cache(maxsize=4096)
def address_scope(client: str) -> str:
    """The lockout scope of a client address. An IPv6 client is counted by its /64: one
    subscriber or host is routinely given a whole /64 (RFC 6177, RFC 7934), so counting per
    /128 would hand it 2^64 fresh quotas. An IPv4-mapped address, or one translated by NAT64
    with the well-known prefix (RFC 6052 §2.1: 64:ff9b::/96), counts as its IPv4 address: a
    NAT64 front would otherwise put every IPv4 client in one /64."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return f"ip:{client}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ip:{ip.ipv4_mapped}"
        if ip in _NAT64:
            return f"ip:{ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)}"
        return f"ip:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"ip:{ip}"


def _locked(until: float, now: float) -> Locked:
    # RFC 9110 §10.2.3: Retry-After in whole seconds, rounded up.
    return Locked(max(1, int(until - now + 0.999)))


def _user_scope(user: str) -> str:
    return f"user:{user}"


class Lockouts:
    """The attempt quotas of users and addresses, kept in the store, with this worker's hint
    of the locks it has seen."""

    def __init__(self, store: Store, limits: LimitsConfig, cache_ttl: float, clock: Callable[[], float]) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        self._locks: TtlCache[str, float] = TtlCache(cache_ttl, _CACHE_SIZE, clock)

    def _quotas(self, user: str, client: str | None) -> list[Quota]:
        limits = self.limits
        quotas = [Quota(_user_scope(user), limits.max_failures, limits.lockout)]
        if client:
            quotas.append(Quota(address_scope(client), limits.ip_max_failures, limits.ip_lockout))
        return quotas

    def known(self, user: str, client: str | None) -> Locked | None:
        """A lock this worker saw within ``store.cache_ttl``: refused with no store round trip,
        which is what an attacker's flood meets. Only a hint: the store has the last word."""
        now = self.clock()
        for scope in (_user_scope(user), address_scope(client) if client else None):
            until = self._locks.get(scope) if scope else MISS
            if until is not MISS and until > now:
                return _locked(until, now)
        return None

    async def take(self, user: str, client: str | None) -> Attempt | Locked:
        """Take the attempt *before* the code is judged (NIST 800-63B §5.2.2, issue 10): one
        atomic store operation for the user's and the address's quota, so a burst of any size
        gets at most ``limits.max_failures`` codes judged per user (``ip_max_failures`` per
        address) per lockout window. The attempt when allowed, else how long the lock holds."""
        now = self.clock()
        attempt = await self.store.take_attempt(self._quotas(user, client), now)
        if attempt.allowed:
            return attempt
        self._remember(attempt)
        return _locked(attempt.locked_until or now, now)

    def missed(self, attempt: Attempt) -> Locked | None:
        """A judged code was wrong. If its attempt was the last one left, the lock it set holds
        from now, and the answer says so (429 with Retry-After), not "wrong or expired"."""
        if not attempt.locks:
            return None
        self._remember(attempt)
        for scope, until in attempt.locks:
            kind, _, name = scope.partition(":")
            seconds = round(until - self.clock())
            if kind == "user":
                audit("lockout.started", name, scope="user", seconds=seconds)
            else:  # the address scope names the client (or its /64), whoever the user was
                audit("lockout.started", client=name, scope="address", seconds=seconds)
        return _locked(max(until for _, until in attempt.locks), self.clock())

    def _remember(self, attempt: Attempt) -> None:
        for scope, until in attempt.locks:
            self._locks.put(scope, until, until)

    async def succeeded(self, user: str, client: str | None) -> None:
        """A right code: the user's count starts again (as before issue 10); the address gets
        its attempt back, so colleagues behind one NAT signing in never lock each other out."""
        self._locks.drop(_user_scope(user))
        done = [self.store.clear_failures(_user_scope(user))]
        if client:
            self._locks.drop(address_scope(client))
            done.append(self.store.release_attempt(address_scope(client)))
        await asyncio.gather(*done)

    async def unlock(self, user: str) -> None:
        await self.store.clear_failures(_user_scope(user))
        self._locks.drop(_user_scope(user))

    def forget(self, user: str) -> None:
        """Drop this worker's hint of the user's lock (the store's record went with the user)."""
        self._locks.drop(_user_scope(user))
