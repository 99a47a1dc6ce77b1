"""The one thread of a SQLite store, and the hand-off of each call to it.

Every blocking sqlite3 call runs on this one thread, which owns the process's only connection,
so the event loop never waits on disk and the connection is never shared across threads.

The store timeout is over a whole call, waiting in the thread's queue included (issue 14,
tests/faults/test_sqlite_faults.py): one call stuck behind another process's lock must not make
every request queued behind it wait its whole timeout again, so a call whose deadline passed
before its turn is dropped, never run late; and a call that started in time but is still
waiting for the lock at its deadline is rolled back, never committed once its caller was told
"timed out" (a 503: a recovery code consumed, an authenticator swapped behind that answer would
surprise the user; tests/test_store_sqlite_timeouts.py). The only cost: a caller whose call's
COMMIT began just before its deadline waits for that COMMIT (it holds the lock already: no wait
for another process).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gateway.errors import StoreError

T = TypeVar("T")


# A call's states, moved under its lock by the event loop (_abandon) and the store's thread
# (_checked): the thread commits only after moving RUNNING -> COMMITTING, the loop reports
# "timed out" only after moving QUEUED/RUNNING -> ABANDONED, so a call reported failed never
# commits and a call that commits is never reported failed.
_QUEUED, _RUNNING, _COMMITTING, _ABANDONED, _DONE = range(5)


class _Call:
    """One call's hand-off between the event loop and the store's thread."""

    __slots__ = ("deadline", "lock", "state")

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.lock = threading.Lock()
        self.state = _QUEUED


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class StoreThread:
    """The thread; ``conn`` reads the store's connection (None while closed), ``before`` runs on
    the thread ahead of each call with the monotonic time."""

    def __init__(self, conn: Callable[[], sqlite3.Connection | None], before: Callable[[float], None]) -> None:
        self._conn = conn
        self._before = before
        self.executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gw-sqlite")

    async def stop(self, last: Callable[[], None] | None) -> None:
        """Run ``last`` (closing the connection) on the thread, then let the thread go."""
        executor, self.executor = self.executor, None
        if executor is None:
            return
        if last is not None:
            with contextlib.suppress(sqlite3.Error):  # closing anyway: nothing to report
                await asyncio.get_running_loop().run_in_executor(executor, last)
        executor.shutdown(wait=False)

    async def call(self, timeout: float | None, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the thread within ``timeout`` seconds, queueing included (None: no
        deadline); sqlite3, OS and encoding errors become StoreError. The message names the
        operation and SQLite's own text, which never includes bound parameters."""
        if self.executor is None:
            raise StoreError("sqlite store is not open")
        call = _Call(None if timeout is None else time.monotonic() + timeout)
        fut = asyncio.wrap_future(self.executor.submit(self._checked, call, fn, *args))
        fut.add_done_callback(_retrieve)  # an abandoned call's error is nobody's to report
        try:
            try:
                async with asyncio.timeout(timeout):
                    return await asyncio.shield(fut)  # a timeout must not stop us reading its fate
            except TimeoutError:
                if self._abandon(call):
                    raise
                return await fut  # its COMMIT had begun: that outcome, not "timed out", is the answer
        except TimeoutError as exc:  # an OSError too: named before it
            raise StoreError(f"sqlite store: {fn.__name__.lstrip('_')} timed out") from exc
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"sqlite store: {fn.__name__.lstrip('_')} failed: {exc}") from exc
        except UnicodeError as exc:  # a name with a lone surrogate; its text would quote it
            raise StoreError(f"sqlite store: {fn.__name__.lstrip('_')} failed ({type(exc).__name__})") from exc

    def _abandon(self, call: _Call) -> bool:
        """On the event loop, at the caller's deadline: mark ``call`` abandoned, so that it never
        commits, and interrupt its running statement; False when its COMMIT has already begun
        (the caller then waits for that COMMIT instead, which waits for no lock)."""
        with call.lock:
            if call.state == _COMMITTING:
                return False
            conn = self._conn()
            if call.state == _RUNNING and conn is not None:
                # sqlite3_interrupt is thread-safe and ends a long statement; it does not end a
                # wait for another process's lock (SQLite 3.40), which the check before COMMIT
                # covers. Under call.lock the thread cannot have moved on to another call.
                conn.interrupt()
            call.state = _ABANDONED
            return True

    def _checked(self, call: _Call, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the thread, unless its caller has given up waiting (``before`` runs
        first: the store's file check); its writes are committed here, at the end, only while its
        caller still waits."""
        now = time.monotonic()
        with call.lock:
            if call.state == _ABANDONED or (call.deadline is not None and now > call.deadline):
                # its caller was told "timed out": running it now would surprise it
                call.state = _ABANDONED
                raise sqlite3.OperationalError("timed out waiting for the store's thread")
            call.state = _RUNNING
        try:
            self._before(now)
            result = fn(*args)
            db = self._conn()
            if db is not None and db.in_transaction:
                with call.lock:
                    if call.state == _ABANDONED:
                        raise sqlite3.OperationalError("its caller was told it timed out: rolled back")
                    call.state = _COMMITTING
                db.execute("COMMIT")
            return result
        except BaseException:
            # Also after a failed COMMIT: never leave the one connection inside a transaction.
            db = self._conn()
            if db is not None and db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            with call.lock:
                call.state = _DONE
