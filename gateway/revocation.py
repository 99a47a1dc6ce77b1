"""Revocation reaches open connections: a WebSocket lives only as long as its 2FA session.

A connection admitted on a 2FA session (a session cookie, or a code that opened a session for
it) is registered here under that session. One timer per worker asks, every ``interval``, whether
each *distinct* session still belongs to the user who opened the connection; when it does not
(logged out, ``gateway users logout`` or ``reset``, expired, or ended by a new authenticator),
every connection registered under it is told to close. So a thousand sockets of one browser cost
one session read per interval, and a worker with no open socket does no work at all.

Each pass reads the store itself, past the per-worker session cache (and refreshes it), so a
session ended on any worker or replica is seen within ``interval`` plus one pass; passes start
on a fixed cadence, so a slow pass does not push the next one later. ``interval`` is
``store.cache_ttl`` but never below :data:`MIN_INTERVAL`, so that a tiny or zero ``cache_ttl``
does not turn into a flood of store reads: with ``cache_ttl`` ≤ 1 s (the config's limit) the
bound is ``cache_ttl`` + 1 s whenever a pass takes under 0.5 s (1,000 distinct sessions on Redis:
about 0.2 s).

A store that does not answer ends nothing: the connections stay open and the next pass asks
again (the outage is logged). New requests are still refused while the store is down.

Streaming HTTP responses follow the same rule at no cost to the common request:
:class:`ReceiveUntilEnded` starts watching only when the forwarder listens to the client after
the request body is complete, which it does for a large or unbounded response (server-sent events,
long downloads), never for a small answer. (So an upload still being sent is not cut: its response
is.) When the session ends it reports the client gone
(``http.disconnect``), so the forwarder stops relaying and closes the upstream response; the
client's connection is closed mid-body (uvicorn logs "ASGI callable returned without completing
response"), so a download is never mistaken for complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from starlette.types import Message, Receive

from gateway.decision import Decision
from gateway.errors import Reason, StoreError
from gateway.identity import read_one_cookie

log = logging.getLogger("gateway.revocation")

# Poll no more often than this, whatever cache_ttl says (0 means "no cache", not "poll always").
MIN_INTERVAL = 0.5
# Sessions read at once in one pass: enough to hide the store's latency, few enough not to take
# every store connection from the requests being served meanwhile.
_CONCURRENT_READS = 32

SessionLookup = Callable[[str], Awaitable[str | None]]


def poll_interval(cache_ttl: float) -> float:
    return max(cache_ttl, MIN_INTERVAL)


def admitting_session(decision: Decision, headers: Any, cookie: str) -> str | None:
    """The id of the 2FA session that admitted a request: the one its code opened, or the one
    its cookie carried, read as the decision reads it; None for an excluded path (and for a
    cookie that is absent or ambiguous, which the decision refuses)."""
    if decision.reason is Reason.CODE:
        return decision.new_session
    if decision.reason is not Reason.SESSION:
        return None
    session_id, ambiguous = read_one_cookie(headers, cookie)
    return None if ambiguous else session_id


class SessionWatch:
    """Open connections grouped by the session that admitted them.

    ``lookup(session_id)`` is the user a session belongs to, or None once it has ended.
    """

    def __init__(self, lookup: SessionLookup, interval: float) -> None:
        self.lookup = lookup
        self.interval = interval
        # (session id, user) -> the futures of the connections it admitted
        self._sessions: dict[tuple[str, str], set[asyncio.Future[None]]] = {}
        self._timer: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        """How many connections are watched."""
        return sum(len(ends) for ends in self._sessions.values())

    @contextlib.contextmanager
    def watching(self, session_id: str, user: str) -> Iterator[asyncio.Future[None]]:
        """A future that completes when ``session_id`` no longer admits ``user``; the connection is
        watched until the block ends."""
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        key = (session_id, user)
        ends = self._sessions.setdefault(key, set())
        ends.add(ended)
        self._ensure_timer()
        try:
            yield ended
        finally:
            ends.discard(ended)
            if not ends and self._sessions.get(key) is ends:
                del self._sessions[key]

    async def check(self) -> int:
        """One pass: end the connections of every session that has ended; returns how many."""
        ended = 0
        items = list(self._sessions.items())
        for start in range(0, len(items), _CONCURRENT_READS):
            batch = items[start : start + _CONCURRENT_READS]
            owners = await asyncio.gather(*(self.lookup(key[0]) for key, _ in batch), return_exceptions=True)
            for (key, ends), owner in zip(batch, owners, strict=True):
                if isinstance(owner, BaseException):
                    if not isinstance(owner, StoreError):
                        raise owner
                    log.warning("store unavailable, open connections kept until it answers: %s", owner)
                    return ended
                if owner == key[1]:
                    continue
                for end in ends:
                    if not end.done():
                        end.set_result(None)
                        ended += 1
                if self._sessions.get(key) is ends:
                    del self._sessions[key]
        if ended:
            log.info("2fa session ended: %d open connection(s) closed", ended)
        return ended

    def _ensure_timer(self) -> None:
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._run(), name="gateway-session-watch")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval
        while self._sessions:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due += self.interval
            try:
                await self.check()
            except Exception:
                log.exception("session check failed; trying again in %ss", self.interval)
            due = max(due, loop.time())  # a pass longer than the interval: the next starts at once
        # Nothing left to watch: the timer stops; the next connection starts it again.

    async def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer


class ReceiveUntilEnded:
    """An ASGI ``receive`` for one HTTP request that reports the client gone once the session
    that admitted it ends; the session is watched from the first call after the request body is
    complete (what only a streaming relay asks for) until :meth:`close`."""

    def __init__(self, watch: SessionWatch, session_id: str, user: str, receive: Receive) -> None:
        self._watch = watch
        self._session = (session_id, user)
        self._receive = receive
        self._stack: contextlib.ExitStack | None = None
        self._ended: asyncio.Future[None] | None = None
        self._body_done = False

    async def __call__(self) -> Message:
        if not self._body_done:
            # The request body passes straight through: one call per chunk, nothing watched.
            message = await self._receive()
            self._body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message
        if self._ended is None:
            self._stack = contextlib.ExitStack()
            self._ended = self._stack.enter_context(self._watch.watching(*self._session))
        if not self._ended.done():
            received = asyncio.ensure_future(self._receive())
            waits: list[asyncio.Future[Any]] = [received, self._ended]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if received.done():
                return received.result()
            received.cancel()
        log.info("2fa session ended: open HTTP request closed")
        return {"type": "http.disconnect"}

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
