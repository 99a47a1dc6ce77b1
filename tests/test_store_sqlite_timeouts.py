"""gateway/store/sqlite.py: a call whose caller was told "timed out" never commits.

Another process holds SQLite's write lock (a backup, the sqlite3 CLI, another worker). A call
answered StoreError at its deadline (a 503 to the client) must leave the database as it was,
whether it never got its turn on the store's thread or was still waiting for the lock when its
caller gave up (issue 14, attacker B: a recovery code consumed behind a 503).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

import gateway.store.sqlite as sqlite_module
from gateway.errors import StoreError
from gateway.store import Quota
from gateway.store.sqlite import SqliteStore

TIMEOUT_MS = 1000  # the store timeout in these tests: short, with room for a loaded machine


@pytest.fixture(autouse=True)
def short_store_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the ``store`` fixture (tests/conftest.py) opens it: autouse fixtures come first."""
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_MS", TIMEOUT_MS)


def _holder(path: str) -> sqlite3.Connection:
    """Another connection holding the write lock (SQLite shares locks across the connections
    of one process as across processes)."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


async def _codes_left(store: SqliteStore) -> int:
    return (await store.user_state("alice", time.time())).recovery_codes_left


async def test_a_call_still_waiting_for_the_lock_at_its_deadline_never_commits(store: SqliteStore) -> None:
    """The attacker's script: a code check holds the store's thread until its own deadline;
    the recovery code queued 0.2 s behind it starts in time, waits for the lock, is told
    "timed out" at its deadline, and the lock ends 0.4 s later: the code must still be there."""
    await store.set_recovery_codes("alice", ["h1", "h2"])
    timeout = TIMEOUT_MS / 1000
    holder = _holder(store.path)
    try:
        started = time.monotonic()
        first = asyncio.create_task(store.take_attempt([Quota("user:bob", 5, 60.0)], time.time()))
        await asyncio.sleep(0.2)
        # The lock ends after the recovery code's deadline (0.2 + timeout) but within its
        # busy wait, which began when the first call gave up (at timeout).
        asyncio.get_running_loop().call_later(timeout + 0.6 - (time.monotonic() - started), holder.rollback)
        with pytest.raises(StoreError, match="consume_recovery_code timed out"):
            await store.consume_recovery_code("alice", "h1")
        told = time.monotonic() - started
        with pytest.raises(StoreError, match="take_attempt timed out"):
            await first
        await asyncio.sleep(timeout + 0.6 - (time.monotonic() - started) + 0.1)
        assert not holder.in_transaction  # the lock has ended
        assert told < timeout + 0.2 + 2.0, told  # bounds a hang only
        # Behind the abandoned call on the store's thread: it has finished by now.
        assert await _codes_left(store) == 2
        # The store serves again, and the code it was told failed is still usable.
        assert await store.consume_recovery_code("alice", "h1") is True
        assert await _codes_left(store) == 1
    finally:
        holder.close()


async def test_a_call_whose_deadline_passed_in_the_queue_never_runs(store: SqliteStore) -> None:
    """A call that never got the store's thread before its deadline is dropped when its turn
    comes, not run late: with no lock held by then it would commit at once."""
    await store.set_recovery_codes("alice", ["h1", "h2"])
    timeout = TIMEOUT_MS / 1000
    executor = store._thread.executor
    assert executor is not None
    busy = executor.submit(time.sleep, timeout + 0.5)  # the store's one thread, held past the deadline
    with pytest.raises(StoreError, match="consume_recovery_code timed out"):
        await store.consume_recovery_code("alice", "h1")
    await asyncio.wrap_future(busy)
    assert await _codes_left(store) == 2
    assert await store.consume_recovery_code("alice", "h1") is True


async def test_a_write_that_gets_the_lock_in_time_commits(store: SqliteStore) -> None:
    """The other side: a lock that ends before the deadline costs nothing; the call commits
    and is answered as usual."""
    await store.set_recovery_codes("alice", ["h1", "h2"])
    holder = _holder(store.path)
    try:
        asyncio.get_running_loop().call_later(0.3, holder.rollback)
        assert await store.consume_recovery_code("alice", "h1") is True
    finally:
        holder.close()
    assert await _codes_left(store) == 1
    await store.set_secret("alice", b"ciphertext")
    assert await store.get_secret("alice") == b"ciphertext"
