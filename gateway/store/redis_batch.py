"""The batching of one event-loop turn's Redis calls into one pipeline, for ``RedisStore``.

Under a flood of codes redis-py's per-call cost, not Redis, is the bottleneck (issue 10, bench
row 2): the secret reads and the attempts of every caller in the same turn of the loop leave in
one pipeline, and the attempts on one quota are taken by one script call, in the order they were
asked for (``TAKE_ATTEMPT_LUA`` in ``gateway.store.redis_layout``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from gateway.errors import StoreError
from gateway.store.redis_calls import SOCKET_TIMEOUT
from gateway.store.redis_clients import Client
from gateway.store.redis_layout import to_ms

Waiters = list[tuple[float, "asyncio.Future[tuple[bool, bytes]]"]]


def _hand_out(waiters: Waiters, reply: Any) -> None:
    """The reply of one take-attempt script to its callers: the first ``taken`` were allowed
    (the last of them gets the lock it set, if any), the rest refused until the lock ends."""
    if isinstance(reply, Exception):
        for _, future in waiters:
            if not future.done():
                future.set_exception(reply)
        return
    taken, until = int(reply[0]), reply[1] or b""
    for i, (_, future) in enumerate(waiters):
        if future.done():  # cancelled: its attempt was taken all the same (counts never fall short)
            continue
        if i < taken:
            future.set_result((True, until if i == taken - 1 else b""))
        else:
            future.set_result((False, until))


class Batcher:
    """The pipeline of the current event-loop turn: ``pipelined`` commands, and ``takes`` (the
    attempts asked for, by (key, limit, window)), sent by ``schedule``'s flush."""

    def __init__(
        self,
        client: Client,
        take_attempt_sha: str,
        load_script: Callable[[], Awaitable[object]],
        is_open: Callable[[], bool],
    ) -> None:
        self.client = client
        self._sha = take_attempt_sha  # EVALSHA; on NOSCRIPT load_script loads it once
        self._load_script = load_script
        self._is_open = is_open
        # What the next flush sends: plain commands, and attempts by (key, limit, window).
        self.queue: list[tuple[list[tuple[Any, ...]], asyncio.Future[list[Any]]]] = []
        self.takes: dict[tuple[bytes, int, float], Waiters] = {}
        self._flushes: set[asyncio.Task[None]] = set()
        self._flush_due = False

    async def pipelined(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to ``commands``, sent in one pipeline with those of every other caller in
        the same event-loop turn: one round trip and one pool connection for them all. Under a
        flood of codes redis-py's per-call cost, not Redis, is the bottleneck, and batching
        shares it (issue 10, bench row 2). Nothing waits for a batch to fill: it leaves on the
        next turn of the loop, or when the batch in flight is answered (schedule). Only
        for commands that are safe to send twice on NOSCRIPT."""
        # Encoded here, so a name that cannot be encoded fails its own caller, not the batch.
        # The command's name stays a str: RedisCluster looks its routing up by name.
        encoded = [(name, *(a.encode() if isinstance(a, str) else a for a in args)) for name, *args in commands]
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.queue.append((encoded, future))
        self.schedule()
        async with asyncio.timeout(SOCKET_TIMEOUT):  # one store timeout, queued or not (above)
            replies = await future
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def schedule(self) -> None:
        """The first caller of an event-loop turn starts a flush, unless one is on its way: what
        queues meanwhile leaves as one batch when its replies are in. So one pipeline is in
        flight at a time, and under load each carries what one round trip let pile up (a
        write to Redis costs a system call and a wake-up, and on a busy machine those, not
        Redis, dominated a flood of codes; bench row 2). Added latency: at most one round trip."""
        if not self._flush_due:
            self._flush_due = True
            flush = asyncio.create_task(self._drain())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)

    async def _drain(self) -> None:
        try:
            while self.queue or self.takes:
                await self._flush()
        finally:
            self._flush_due = False

    async def _flush(self) -> None:
        """Send every command and attempt queued so far in one pipeline and hand each caller
        its replies. The attempts on one quota are taken by one script call, in the order they
        were asked for: the first ones get the room left, the rest are refused."""
        batch, self.queue = self.queue, []
        takes, self.takes = self.takes, {}
        commands = [command for queued, _ in batch for command in queued]
        sha = self._sha
        for (key, limit, window), waiters in takes.items():
            now = max(at for at, _ in waiters)
            until = now + window
            commands.append(("EVALSHA", sha, 1, key, repr(now), limit, repr(until), to_ms(until), len(waiters)))
        try:
            if not self._is_open():
                raise StoreError("redis store is not open")
            for first in (True, False):
                # The batch pool's reads have no timeout of their own: this bounds the round
                # trip. On expiry redis-py drops the connection (a late reply cannot go astray).
                async with asyncio.timeout(SOCKET_TIMEOUT), self.client.pipeline(transaction=False) as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = await pipe.execute(raise_on_error=False)
                # EVALSHA; on NOSCRIPT (a restarted server) no script of the batch ran: load it
                # once and send again. redis-py's pipeline scripts would ask SCRIPT EXISTS each time.
                if first and any(isinstance(r, NoScriptError) for r in replies):
                    await self._load_script()
                    continue
                break
        except BaseException as exc:  # every caller gets the error (translated where it awaits)
            error = exc if isinstance(exc, Exception) else RedisConnectionError("cancelled")
            waiting = [f for _, f in batch] + [f for waiters in takes.values() for _, f in waiters]
            for future in waiting:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        at = 0
        for queued, future in batch:
            if not future.done():  # a caller that went away (cancelled) is skipped
                future.set_result(replies[at : at + len(queued)])
            at += len(queued)
        for waiters, reply in zip(takes.values(), replies[at:], strict=True):
            _hand_out(waiters, reply)
