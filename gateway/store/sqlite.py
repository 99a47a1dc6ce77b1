"""The embedded store: one SQLite file, shared safely by several worker processes.

Every blocking sqlite3 call runs on one dedicated thread that owns the only connection of
this process, so the event loop never waits on disk and the connection is never shared
across threads. Each public method is exactly one hop to that thread.

Safety across processes comes from SQLite itself: WAL mode lets readers run beside the one
writer, ``busy_timeout`` makes a writer wait for the lock instead of failing, and every
read-modify-write is either a single conditional statement (atomic on its own) or wrapped in
``BEGIN IMMEDIATE`` (takes the write lock before reading, so two processes cannot both read
the old value).

Expired rows (pending secrets, sessions, attempt windows, locks) are ignored by comparing
with ``now`` and deleted lazily, at most once a minute, from ``create_session`` and
``take_attempt``. The ``failures`` table counts attempts (``count`` within the window that
ends at ``reset_at``); ``locked_until`` is set while the count is at its limit.

Faults (issue 14, tests/faults/test_sqlite_faults.py). The store timeout is BUSY_TIMEOUT_MS
over a whole call, waiting in the thread's queue included (``gateway.store.sqlite_thread``). A file deleted (or
replaced) under a running gateway is the other trap: SQLite keeps using the unlinked inode, so
the gateway would "work" and lose every write at the next restart, every user unenrolled and
free to enrol anew with only a password. The store checks, at most once per FILE_CHECK_INTERVAL
(a clock read per call, a stat per second), that its path still names the file it opened; if
not, it denies every call until the path names a database again, then reopens it, never
creating one in its place.

A store that lost its data must never look like a new, empty one (issue 14, attacker B): a
deleted file re-created empty by any command, a 0-byte file, or another store's file at the
path would each leave every user unenrolled, free to enrol a new authenticator with only the
first factor. So a store has an identity, a random id written once, in the ``meta`` table,
when it is initialised (``gateway store init``, or a first start with ``store.create =
"if_missing"`` when no file exists at all); ``open`` never initialises a file that exists, and
without ``create`` never makes one. The running store remembers the id it opened and checks it
with the file: a file with the same id (a restored backup) is served again; any other is
refused, every call a StoreError (503), until the data is restored or the operator accepts a
new store deliberately (``gateway store init``, then a restart).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from gateway.errors import StoreError
from gateway.store.base import Attempt, Quota, UserState
from gateway.store.sqlite_thread import StoreThread

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
PURGE_INTERVAL = 60.0
FILE_CHECK_INTERVAL = 1.0

log = logging.getLogger("gateway.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (user TEXT PRIMARY KEY, secret BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    user TEXT PRIMARY KEY, secret BLOB NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS steps (user TEXT PRIMARY KEY, step INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures (
    scope TEXT PRIMARY KEY, count INTEGER NOT NULL, reset_at REAL NOT NULL,
    locked_until REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS recovery (
    user TEXT NOT NULL, code_hash TEXT NOT NULL, PRIMARY KEY (user, code_hash)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    hash TEXT PRIMARY KEY, user TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user);
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""
_STORE_ID = "store_id"
NOT_INITIALISED_HINT = (
    "if it lost its data, restore it (a backup of it is served again); for a new store run"
    " 'gateway store init --config FILE' (on a store that lost its data, that re-opens enrolment"
    " to the first factor for every user)"
)


class NotInitialised(sqlite3.OperationalError):
    """The path names no initialised store: missing, 0 bytes, or a database without our id."""


class SqliteStore:
    """:class:`gateway.store.base.Store` on a SQLite file at ``path``. ``create``: a first
    start may make the file when none exists (never initialises one that does)."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        self.create = create
        self.store_id: str | None = None  # the identity opened: any file without it is refused
        self._refused: str | None = None  # why the path is refused now (logged once per reason)
        # The file refused, as stat saw it: not reopened per call until it changes.
        self._refused_stat: tuple[int, int, int, int] | None = None
        self._thread = StoreThread(lambda: self._conn, self._before_call)
        self._conn: sqlite3.Connection | None = None
        self._last_purge = 0.0
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._next_check = 0.0
        self._lost = False  # the path no longer names the file opened: deny until it does

    # -- the one boundary to sqlite3 ---------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the store's thread within the store timeout, queueing included;
        sqlite3, OS and encoding errors become StoreError.

        The message names the operation and SQLite's own text, which never includes bound
        parameters, so no secret, code or session id can leak into it.
        """
        return await self._thread.call(BUSY_TIMEOUT_MS / 1000, fn, *args)

    async def _run_long(self, fn: Callable[..., T], *args: object) -> T:
        """``_run`` without the deadline, for the administration commands' reads of every user
        (a million users take longer than one store timeout), as redis_calls.gated."""
        return await self._thread.call(None, fn, *args)

    def _before_call(self, now: float) -> None:
        """On the store's thread before each call: the file check, at most once a second."""
        if self._file is not None and (self._lost or now >= self._next_check):
            self._next_check = now + FILE_CHECK_INTERVAL
            self._check_file()

    def _check_file(self) -> None:
        """Raise unless the path still names the file opened; reopen it once it does again.
        (A file replaced at once, ``mv restored.db gateway.db``, is reopened at once.)"""
        if self._file is None:  # not opened yet: open() creates it
            return
        try:
            st = os.stat(self.path)
            found: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            found = None
        if self._lost and found is not None and _signature(st) == self._refused_stat:
            # The file refused, unchanged: refused again without reopening it per call.
            raise NotInitialised(f"the file {self._refused}")
        if found is not None and found == self._file and not self._lost:
            # The same inode can still get other contents (`cp other.db gateway.db`).
            self._check_id(self._db)
            return
        if found is None or found != self._file:
            if not self._lost:
                # One line per outage, naming the path (the operator's, no secret in it).
                log.error(
                    "store: the SQLite file %s was deleted or replaced under the running gateway;"
                    " denying every request until it is back (restore it; it is never re-created)",
                    self.path,
                )
                self._lost = True
                self._disconnect()
            if found is None:
                raise sqlite3.OperationalError("the database file was deleted")
        # A database at the path again (restored, or moved back): open it, never create one,
        # and serve it only if it is the store opened (its id), never a new or empty one.
        self._disconnect()
        self._connect(create=False)
        self._lost = False
        self._refused = None
        self._refused_stat = None
        log.warning("store: the SQLite file %s is back; serving again", self.path)

    def _check_id(self, db: sqlite3.Connection) -> None:
        """Raise unless ``db`` holds the id opened; refuse the file from now on if not."""
        found = _read_id(db)
        if self.store_id is None or found == self.store_id:
            return
        db.close()
        self._refuse("has no store identity (new, empty or 0 bytes)" if found is None else "is another store")

    def _refuse(self, reason: str) -> None:
        """Refuse the file at the path from now on (one ERROR line per reason), and raise."""
        self._lost = True
        self._disconnect()
        try:
            self._refused_stat = _signature(os.stat(self.path))
        except OSError:
            self._refused_stat = None
        if self._refused != reason:
            self._refused = reason
            # No secret here: the path is the operator's, the ids are not shown.
            log.error(
                "store: the SQLite file %s %s, not the store this gateway opened: refusing it,"
                " every request denied. Restore the data (a backup of this store is served again),"
                " or accept an empty store deliberately with 'gateway store init' and a restart:"
                " that re-opens enrolment to the first factor for every user",
                self.path,
                reason,
            )
        raise NotInitialised(f"the file {reason}")

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("connection is closed")
        return self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A transaction holding the write lock from its start (safe read-modify-write).

        It is committed by ``_checked`` when the whole call ends, and only if the caller still
        waits (a second ``_write`` in the same call joins the first); an error rolls it back."""
        db = self._db
        if not db.in_transaction:
            db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        if self._conn is not None:
            return
        self._thread.start()
        try:
            await self._run(self._connect, self.create)
        except StoreError as exc:
            await self.close()
            if isinstance(exc.__cause__, NotInitialised):
                raise StoreError(f"sqlite store: {exc.__cause__}: {self.path}; {NOT_INITIALISED_HINT}") from exc
            raise

    def _connect(self, create: bool = False, initialise: bool = False) -> bool:
        """Open the store at the path; True when this wrote its identity (a new store)."""
        # `timeout` is SQLite's busy_timeout: wait for another process's write lock rather than
        # fail. Made on the store's thread, used only there.
        # mode=rw fails on a missing file rather than start an empty store in its place (every
        # user unenrolled); only `create` (a first start, no file at all) or `initialise`
        # (`gateway store init`) may make one. A file that exists is initialised only by the
        # latter: a 0-byte file or a database without our id is data lost, not a new store.
        missing = not os.path.exists(self.path)
        if missing and not (create or initialise):
            raise NotInitialised("no store file at the path")
        mode = "rwc" if (create and missing) or initialise else "rw"
        target, uri = f"file:{_quote_path(self.path)}?mode={mode}", True
        # isolation_level="IMMEDIATE": every write, a single statement too, opens a transaction
        # that holds the write lock (sqlite3 begins it before INSERT/UPDATE/DELETE), so that
        # _checked decides when it commits: never after its caller was told "timed out".
        conn = sqlite3.connect(target, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level="IMMEDIATE", uri=uri)
        try:
            found = _read_id(conn)
            if found is None and not (initialise or (create and missing)):
                if self.store_id is not None:  # it had one when opened: emptied or replaced
                    self._refuse("has no store identity (new, empty or 0 bytes)")
                raise NotInitialised("the file has no store identity (not initialised, or emptied)")
            if found is not None and self.store_id is not None:
                self._check_id(conn)  # another store's file: raises, logs once
            conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL survives process crashes; a power cut may lose the last commits.
            conn.execute("PRAGMA synchronous = NORMAL")
            # OR IGNORE: two processes making it at once keep the first id.
            conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
            if found is None:
                new_id = secrets.token_hex(16)
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (_STORE_ID, new_id))
                if conn.in_transaction:
                    conn.commit()
            store_id = _read_id(conn)
            st = os.stat(self.path)
        except BaseException:
            conn.close()
            raise
        self.store_id = store_id
        self._conn = conn
        self._file = (st.st_dev, st.st_ino)
        self._next_check = time.monotonic() + FILE_CHECK_INTERVAL
        return found is None

    async def initialise(self) -> bool:
        """``gateway store init``: open the store at the path, giving it an identity if it has
        none (making the file if missing; the rows already there are kept). True if it had none.
        Only this accepts an existing file without an identity: a deliberate step."""
        self._thread.start()
        try:
            return await self._run(self._connect, False, True)
        except StoreError:
            await self.close()
            raise

    async def close(self) -> None:
        await self._thread.stop(self._disconnect if self._conn is not None else None)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def ping(self) -> None:
        await self._run(self._ping)

    def _ping(self) -> None:
        # A write, not a read (base.Store.ping): a read-only or full file, or another process
        # holding the lock, lets reads pass while every code check fails.
        self._check_file()
        self._db.execute(
            "INSERT INTO probe (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at", (time.time(),)
        )

    # -- secrets ---------------------------------------------------------------------------
    async def get_secret(self, user: str) -> bytes | None:
        return await self._run(self._get_secret, user)

    def _get_secret(self, user: str) -> bytes | None:
        row = self._db.execute("SELECT secret FROM secrets WHERE user = ?", (user,)).fetchone()
        return None if row is None else bytes(row[0])

    async def set_secret(self, user: str, ciphertext: bytes) -> None:
        await self._run(self._set_secret, user, ciphertext)

    def _set_secret(self, user: str, ciphertext: bytes) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO secrets (user, secret) VALUES (?, ?)"
                " ON CONFLICT (user) DO UPDATE SET secret = excluded.secret",
                (user, ciphertext),
            )
            db.execute("DELETE FROM pending WHERE user = ?", (user,))

    async def get_pending(self, user: str, now: float) -> bytes | None:
        return await self._run(self._get_pending, user, now)

    def _get_pending(self, user: str, now: float) -> bytes | None:
        row = self._db.execute("SELECT secret FROM pending WHERE user = ? AND expires_at > ?", (user, now)).fetchone()
        return None if row is None else bytes(row[0])

    async def set_pending(self, user: str, ciphertext: bytes, expires_at: float) -> None:
        await self._run(self._set_pending, user, ciphertext, expires_at)

    def _set_pending(self, user: str, ciphertext: bytes, expires_at: float) -> None:
        self._db.execute(
            "INSERT INTO pending (user, secret, expires_at) VALUES (?, ?, ?) ON CONFLICT (user)"
            " DO UPDATE SET secret = excluded.secret, expires_at = excluded.expires_at",
            (user, ciphertext, expires_at),
        )

    async def activate_secret(self, user: str, expected: bytes | None, new: bytes) -> bool:
        return await self._run(self._activate_secret, user, expected, new)

    def _activate_secret(self, user: str, expected: bytes | None, new: bytes) -> bool:
        with self._write() as db:
            row = db.execute("SELECT secret FROM secrets WHERE user = ?", (user,)).fetchone()
            if (None if row is None else bytes(row[0])) != expected:
                return False
            db.execute(
                "INSERT INTO secrets (user, secret) VALUES (?, ?)"
                " ON CONFLICT (user) DO UPDATE SET secret = excluded.secret",
                (user, new),
            )
            db.execute("DELETE FROM pending WHERE user = ?", (user,))
            db.execute("DELETE FROM recovery WHERE user = ?", (user,))
        return True

    async def replace_secret(self, user: str, old: bytes, new: bytes) -> bool:
        return await self._run(self._replace_secret, user, old, new)

    def _replace_secret(self, user: str, old: bytes, new: bytes) -> bool:
        cur = self._db.execute("UPDATE secrets SET secret = ? WHERE user = ? AND secret = ?", (new, user, old))
        return cur.rowcount == 1

    # -- replay guard ----------------------------------------------------------------------
    async def advance_step(self, user: str, step: int) -> bool:
        return await self._run(self._advance_step, user, step)

    def _advance_step(self, user: str, step: int) -> bool:
        # One conditional UPSERT: atomic without a transaction; no row changes when the step
        # was already used (RFC 6238 §5.2), so rowcount tells us who won.
        cur = self._db.execute(
            "INSERT INTO steps (user, step) VALUES (?, ?) ON CONFLICT (user)"
            " DO UPDATE SET step = excluded.step WHERE steps.step < excluded.step",
            (user, step),
        )
        return cur.rowcount == 1

    # -- failures and lockouts -------------------------------------------------------------
    async def take_attempt(self, quotas: Sequence[Quota], now: float) -> Attempt:
        return await self._run(self._take_attempt, quotas, now)

    def _take_attempt(self, quotas: Sequence[Quota], now: float) -> Attempt:
        self._maybe_purge(time.time())  # the wall clock: a caller's `now` may be a test's
        allowed, locks = True, []
        # One BEGIN IMMEDIATE for every quota: the write lock is held from the first read, so
        # no other worker process reads a count between our read and our write.
        with self._write() as db:
            for q in quotas:
                row = db.execute("SELECT count, reset_at FROM failures WHERE scope = ?", (q.scope,)).fetchone()
                count = 0 if row is None or row[1] <= now else int(row[0])
                if count >= q.limit:
                    allowed = False
                    locks.append((q.scope, float(row[1])))
                    continue
                count += 1
                until = now + q.window
                full = count >= q.limit
                if full:
                    locks.append((q.scope, until))
                db.execute(
                    "INSERT INTO failures (scope, count, reset_at, locked_until) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (scope) DO UPDATE SET count = excluded.count,"
                    " reset_at = excluded.reset_at, locked_until = excluded.locked_until",
                    (q.scope, count, until, until if full else None),
                )
        if allowed:
            return Attempt(True, tuple(locks))
        return Attempt(False, tuple(lock for lock in locks if lock[1] > now))

    async def release_attempt(self, scope: str) -> None:
        await self._run(self._release_attempt, scope)

    def _release_attempt(self, scope: str) -> None:
        # After one fewer the count is below any limit it had reached: no lock is left.
        self._db.execute("UPDATE failures SET count = max(count - 1, 0), locked_until = NULL WHERE scope = ?", (scope,))

    async def locked_until(self, scope: str, now: float) -> float | None:
        return await self._run(self._locked_until, scope, now)

    def _locked_until(self, scope: str, now: float) -> float | None:
        row = self._db.execute(
            "SELECT locked_until FROM failures WHERE scope = ? AND locked_until > ?", (scope, now)
        ).fetchone()
        return None if row is None else float(row[0])

    async def clear_failures(self, scope: str) -> None:
        await self._run(self._clear_failures, scope)

    def _clear_failures(self, scope: str) -> None:
        self._db.execute("DELETE FROM failures WHERE scope = ?", (scope,))

    # -- recovery codes --------------------------------------------------------------------
    async def set_recovery_codes(self, user: str, hashes: list[str]) -> None:
        await self._run(self._set_recovery_codes, user, hashes)

    def _set_recovery_codes(self, user: str, hashes: list[str]) -> None:
        with self._write() as db:
            db.execute("DELETE FROM recovery WHERE user = ?", (user,))
            db.executemany(
                "INSERT OR IGNORE INTO recovery (user, code_hash) VALUES (?, ?)", [(user, h) for h in hashes]
            )

    async def consume_recovery_code(self, user: str, code_hash: str) -> bool:
        return await self._run(self._consume_recovery_code, user, code_hash)

    def _consume_recovery_code(self, user: str, code_hash: str) -> bool:
        cur = self._db.execute("DELETE FROM recovery WHERE user = ? AND code_hash = ?", (user, code_hash))
        return cur.rowcount == 1

    # -- sessions --------------------------------------------------------------------------
    async def create_session(self, session_hash: str, user: str, expires_at: float) -> bool:
        await self._run(self._create_session, session_hash, user, expires_at)
        return True  # one statement: no revocation can fall between its parts

    def _create_session(self, session_hash: str, user: str, expires_at: float) -> None:
        self._maybe_purge(time.time())
        self._db.execute(
            "INSERT INTO sessions (hash, user, expires_at) VALUES (?, ?, ?) ON CONFLICT (hash)"
            " DO UPDATE SET user = excluded.user, expires_at = excluded.expires_at",
            (session_hash, user, expires_at),
        )

    async def get_session(self, session_hash: str, now: float) -> str | None:
        return await self._run(self._get_session, session_hash, now)

    def _get_session(self, session_hash: str, now: float) -> str | None:
        row = self._db.execute(
            "SELECT user FROM sessions WHERE hash = ? AND expires_at > ?", (session_hash, now)
        ).fetchone()
        return None if row is None else str(row[0])

    async def revoke_session(self, session_hash: str) -> None:
        await self._run(self._revoke_session, session_hash)

    def _revoke_session(self, session_hash: str) -> None:
        self._db.execute("DELETE FROM sessions WHERE hash = ?", (session_hash,))

    # -- users -----------------------------------------------------------------------------
    async def revoke_user_sessions(self, user: str) -> int:
        return await self._run(self._revoke_user_sessions, user)

    def _revoke_user_sessions(self, user: str) -> int:
        with self._write() as db:
            return int(db.execute("DELETE FROM sessions WHERE user = ?", (user,)).rowcount)

    async def delete_user(self, user: str) -> None:
        await self._run(self._delete_user, user)

    def _delete_user(self, user: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM secrets WHERE user = ?", (user,))
            db.execute("DELETE FROM pending WHERE user = ?", (user,))
            db.execute("DELETE FROM steps WHERE user = ?", (user,))
            db.execute("DELETE FROM recovery WHERE user = ?", (user,))
            db.execute("DELETE FROM sessions WHERE user = ?", (user,))
            db.execute("DELETE FROM failures WHERE scope = ?", (f"user:{user}",))

    async def list_users(self) -> list[str]:
        return await self._run_long(self._list_users)

    def _list_users(self) -> list[str]:
        rows = self._db.execute(
            "SELECT user FROM secrets UNION SELECT user FROM pending WHERE expires_at > ? ORDER BY user",
            (time.time(),),
        )
        return [str(r[0]) for r in rows]

    async def user_state(self, user: str, now: float) -> UserState:
        return await self._run(self._user_state, user, now)

    def _user_state(self, user: str, now: float) -> UserState:
        db = self._db
        row = db.execute(
            "SELECT"
            " EXISTS (SELECT 1 FROM secrets WHERE user = :u),"
            " EXISTS (SELECT 1 FROM pending WHERE user = :u AND expires_at > :now),"
            " (SELECT count FROM failures WHERE scope = :scope AND reset_at > :now),"
            " (SELECT locked_until FROM failures WHERE scope = :scope AND locked_until > :now),"
            " (SELECT count(*) FROM recovery WHERE user = :u),"
            " (SELECT count(*) FROM sessions WHERE user = :u AND expires_at > :now)",
            {"u": user, "now": now, "scope": f"user:{user}"},
        ).fetchone()
        return UserState(
            user=user,
            enrolled=bool(row[0]),
            pending=bool(row[1]),
            locked_until=None if row[3] is None else float(row[3]),
            failures=int(row[2] or 0),
            recovery_codes_left=int(row[4]),
            sessions=int(row[5]),
        )

    async def iter_secrets(self) -> list[tuple[str, bytes]]:
        return await self._run_long(self._iter_secrets)

    def _iter_secrets(self) -> list[tuple[str, bytes]]:
        rows = self._db.execute("SELECT user, secret FROM secrets ORDER BY user")
        return [(str(u), bytes(s)) for u, s in rows]

    async def sample_secrets(self, limit: int) -> list[tuple[str, bytes]]:
        return await self._run(self._sample_secrets, limit)

    def _sample_secrets(self, limit: int) -> list[tuple[str, bytes]]:
        rows = self._db.execute("SELECT user, secret FROM secrets LIMIT ?", (limit,))
        return [(str(u), bytes(s)) for u, s in rows]

    # -- housekeeping ----------------------------------------------------------------------
    def _maybe_purge(self, now: float) -> None:
        """Delete rows that can no longer matter; at most once per PURGE_INTERVAL."""
        if now - self._last_purge < PURGE_INTERVAL:
            return
        self._last_purge = now
        with self._write() as db:
            db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            db.execute("DELETE FROM pending WHERE expires_at <= ?", (now,))
            db.execute("DELETE FROM failures WHERE reset_at <= ? AND coalesce(locked_until, 0) <= ?", (now, now))


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file changed: another inode, or the same one written (size, mtime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_id(db: sqlite3.Connection) -> str | None:
    """The store's id in ``db``, or None (no meta table: not initialised, or a 0-byte file)."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (_STORE_ID,)).fetchone()
    except sqlite3.OperationalError:  # "no such table: meta"
        return None
    return None if row is None else str(row[0])


def _quote_path(path: str) -> str:
    """``path`` for a ``file:`` URI: ``?`` and ``#`` would start its query or fragment."""
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
