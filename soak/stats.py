"""The pure parts of the soak: the request schedule, percentiles, 30 s buckets and the growth
verdict. No I/O here: ``tests/test_soak.py`` checks each on its own."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The mix, in requests per cycle of 20 (issue 14 §3): mostly sessions, as real traffic is.
MIX: dict[str, int] = {
    "session": 6,  # proxy mode, a 2FA session cookie
    "auth": 4,  # /auth (forward-auth) with a session cookie
    "excluded": 3,  # an excluded path, no identity
    "code": 2,  # a valid code (one per user per step: RFC 6238 §5.2 replay guard)
    "wrong": 2,  # a wrong code: 401
    "locked": 1,  # a locked-out user: 429 with Retry-After
    "download": 1,  # 1 MiB streamed, read fully and compared
    "websocket": 1,  # a WebSocket, three echoes
}
KINDS = tuple(MIX)


def cycle(mix: Mapping[str, int]) -> list[str]:
    """One cycle of the mix, each kind spread evenly through it (not in runs): the kind with
    weight w appears at positions (i + 0.5) / w of the cycle, ties broken by the mix's order."""
    slots = [
        ((i + 0.5) / weight, order, kind) for order, (kind, weight) in enumerate(mix.items()) for i in range(weight)
    ]
    return [kind for _, _, kind in sorted(slots)]


def schedule(rate: float, seconds: float, mix: Mapping[str, int] = MIX) -> list[tuple[float, str]]:
    """Open loop: request ``i`` starts at ``i / rate`` seconds whatever happened to the ones
    before, so a slow gateway shows up as latency, not as a lower rate."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    kinds = cycle(mix)
    count = math.floor(rate * seconds)
    return [(i / rate, kinds[i % len(kinds)]) for i in range(count)]


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile (the smallest value with at least p % of them at or below it)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Bucket:
    start: float
    count: int
    p50: float
    p99: float


def buckets(samples: Sequence[tuple[float, float]], width: float) -> list[Bucket]:
    """``(start offset, latency)`` pairs into consecutive ``width``-second buckets by start
    time, each with its p50 and p99 (empty buckets are kept: a stall is a gap, not nothing)."""
    if not samples:
        return []
    last = max(start for start, _ in samples)
    grouped: list[list[float]] = [[] for _ in range(int(last // width) + 1)]
    for start, latency in samples:
        grouped[int(start // width)].append(latency)
    return [
        Bucket(i * width, len(group), percentile(group, 50), percentile(group, 99)) for i, group in enumerate(grouped)
    ]


@dataclass(frozen=True)
class Growth:
    name: str
    warm: float
    end: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.end <= self.limit

    @property
    def percent(self) -> float:
        return 100 * (self.end - self.warm) / self.warm if self.warm else math.inf


def window_median(series: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """The median of the ``(time, value)`` samples with ``start <= time < end``."""
    values = [value for t, value in series if start <= t < end]
    if not values:
        raise ValueError(f"no sample between {start:.1f} s and {end:.1f} s")
    return statistics.median(values)


def growth(name: str, warm: float, end: float, percent: float = 10.0, slack: float = 0.0) -> Growth:
    """Growth after warm-up is at most ``percent`` % of the warm value, plus ``slack`` in
    absolute terms (a gauge of a few units moves by a few with the requests in flight)."""
    return Growth(name, warm, end, warm * (1 + percent / 100) + slack)
