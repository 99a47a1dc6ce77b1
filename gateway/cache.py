"""The one bounded, expiring in-process cache.

Each entry is trusted until its own deadline: ``ttl`` seconds after it was put, or sooner when
the caller knows the value goes stale earlier (a lock that ends, a session or a JWT that
expires). The clock is injected, so tests freeze it.

One eviction policy, on purpose the simplest: when ``capacity`` entries are held, the next
``put`` empties the cache. An attacker who floods it with fresh keys costs the gateway store
reads, never memory, and no entry ever outlives its deadline; a cache is only ever a hint in
front of the store or of a check that is repeated on a miss, so forgetting is always safe.

A cached value may itself be ``None`` ("not enrolled", "no such session"), so a miss is told
apart by the :data:`MISS` sentinel, not by ``None``.

Expired entries are swept out, not only skipped: each time the cache has doubled since the last
sweep, ``put`` drops every entry past its deadline (amortised O(1) per ``put``). Without it a
dead entry stayed until its key was asked for again or the cache filled: every session a code
opened left one behind (about 5 MiB per 19,000 sessions, a soak's RSS growing for an hour), and
a decrypted secret stayed in memory past its own deadline.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable
from typing import Final, Generic, Literal, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Miss(enum.Enum):
    """The type of :data:`MISS`: an enum member, so ``is MISS`` narrows under mypy."""

    MISS = enum.auto()


MISS: Final = Miss.MISS

# The size at which the first sweep of expired entries runs; then twice what a sweep kept.
_FIRST_SWEEP: Final = 1024


class TtlCache(Generic[K, V]):
    """A dict whose entries expire; at most ``capacity`` of them (then it starts again empty).

    ``ttl <= 0`` turns the cache off: nothing is kept (``store.cache_ttl = 0``).
    """

    __slots__ = ("_data", "_sweep_at", "capacity", "clock", "ttl")

    def __init__(self, ttl: float, capacity: int, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self.clock = clock
        self._data: dict[K, tuple[float, V]] = {}
        self._sweep_at = _FIRST_SWEEP

    def get(self, key: K) -> V | Literal[Miss.MISS]:
        """The value of ``key`` if it is still within its deadline, else :data:`MISS`."""
        hit = self._data.get(key)
        if hit is None:
            return MISS
        if hit[0] <= self.clock():
            self._data.pop(key, None)
            return MISS
        return hit[1]

    def put(self, key: K, value: V, until: float | None = None) -> None:
        """Keep ``value`` for ``ttl`` seconds, or only until ``until`` if that comes first."""
        if self.ttl <= 0:
            return
        now = self.clock()
        if len(self._data) >= self.capacity:
            self._data.clear()
        elif len(self._data) >= self._sweep_at:
            self._sweep(now)
        limit = now + self.ttl
        self._data[key] = (limit if until is None else min(until, limit), value)

    def _sweep(self, now: float) -> None:
        for key in [k for k, (deadline, _) in self._data.items() if deadline <= now]:
            del self._data[key]
        self._sweep_at = max(_FIRST_SWEEP, 2 * len(self._data))

    def drop(self, key: K) -> None:
        self._data.pop(key, None)

    def drop_value(self, value: V) -> None:
        """Forget every key that holds ``value`` (a user's sessions, when they all end)."""
        for key in [k for k, (_, v) in self._data.items() if v == value]:
            del self._data[key]

    def __len__(self) -> int:
        return len(self._data)
