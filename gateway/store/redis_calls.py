"""Each call to Redis, bounded and translated: the one store timeout (``SOCKET_TIMEOUT``) over a
whole call, the Cluster gate on calls in flight, and the one boundary where redis and socket
errors become StoreError. The store itself (``gateway.store.redis``) wears these on every method.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import StoreError


class Gated(Protocol):
    """A store with a gate on its calls in flight (None: no gate, redis-py's pools wait)."""

    _gate: asyncio.Semaphore | None


P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", bound=Gated)

SOCKET_TIMEOUT = 2.0


def translate_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """The one boundary where redis and socket errors become StoreError.

    Only connection-level messages (host, port, errno) are kept; a server reply could in
    principle echo arguments, so for those only the exception's class is named.
    """
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreError(f"redis store: {name} failed: {exc}") from exc
        except (RedisError, RedisClusterException, UnicodeError) as exc:
            raise StoreError(f"redis store: {name} failed ({type(exc).__name__})") from exc

    return wrapper


def bounded(
    fn: Callable[Concatenate[S, P], Awaitable[T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """One store timeout (SOCKET_TIMEOUT) for the whole call, queueing included: a socket
    timeout bounds each read, not a call, and redis-py's cluster client retries and re-reads the
    slot map under one lock, so with a master frozen the reads of every caller queued behind it
    added up (the fourth attack: answers after 4, 8 ... 34 s). On a Cluster, also at most
    max_connections unbatched calls in flight, the rest waiting within that timeout: redis-py's
    cluster pools fail a call that finds no free connection, where the others wait."""

    @functools.wraps(fn)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        async with asyncio.timeout(SOCKET_TIMEOUT):
            if self._gate is None:
                return await fn(self, *args, **kwargs)
            async with self._gate:
                return await fn(self, *args, **kwargs)

    return wrapper


def gated(
    fn: Callable[Concatenate[S, P], Awaitable[T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """The Cluster gate of ``bounded`` without its deadline, for the administration commands'
    scans over every user (a million users take longer than one store timeout)."""

    @functools.wraps(fn)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self._gate is None:
            return await fn(self, *args, **kwargs)
        async with asyncio.timeout(SOCKET_TIMEOUT):
            await self._gate.acquire()
        try:
            return await fn(self, *args, **kwargs)
        finally:
            self._gate.release()

    return wrapper
