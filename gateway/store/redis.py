"""The shared store on Redis (>= 7.0), for several gateway instances behind one balancer.

Key layout, ``P`` being the prefix and ``{u}`` the escaped user in a Redis Cluster hash tag,
so every key of one user lives in one slot and the Lua scripts stay cluster-safe::

    P:{u}:secret      string  active ciphertext
    P:{u}:pending     string  packed (expires_at, ciphertext), expires at expires_at
    P:{u}:step        string  last accepted TOTP time step
    P:{u}:recovery    set     recovery-code hashes
    P:{u}:sessions    set     session hashes of the user (found again by delete_user)
    P:{scope}:attempts hash   n, reset_at, locked_until: the attempts taken in the window
                              ending at reset_at, when the key also expires (scope escaped
                              like a user: "user%3Aalice"); locked_until while n is at its limit
    P:s:<hash>        string  packed (expires_at, user), expires at expires_at

Inside the braces ``%``, ``{``, ``}`` and ``:`` are percent-encoded, so no user name can
close the hash tag early or spell another user's key. Expiring values carry their expiry
alongside the payload: Redis deletes them in real time, and reads also compare with ``now``
so a frozen clock in tests sees the same answers as the SQLite store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import StoreError
from gateway.store.base import Attempt, Quota, UserState, is_key_prefix

P = ParamSpec("P")
T = TypeVar("T")

SOCKET_TIMEOUT = 2.0
_EXPIRY = struct.Struct(">d")
_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D", ":": "%3A"})

# KEYS: step. ARGV: step. Compare-and-set so one time step is accepted once (RFC 6238 §5.2).
_ADVANCE_STEP_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# KEYS: secret. ARGV: old, new.
_COMPARE_AND_SET_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS: secret, pending, recovery. ARGV: "1" and the expected secret, or "0" (no secret
# expected); new.
_ACTIVATE_LUA = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
elseif cur then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""

# KEYS: attempts. ARGV: now, limit, until (= now + window), until in ms, k. Takes up to k
# attempts (k callers of one event-loop turn on the same scope, RedisStore._flush), as many as
# there is room for. Returns {taken, until or ""} (until: they used the last room, the scope is
# now locked), or {0, locked_until} when the quota was already full. Times travel as Python
# reprs and come back unchanged: Lua would truncate a returned float. The common case (room
# left, no stale lock) is HMGET, HSET, PEXPIREAT.
_TAKE_ATTEMPT_LUA = """
local h = redis.call('HMGET', KEYS[1], 'n', 'reset_at', 'locked_until')
local limit = tonumber(ARGV[2])
local n = 0
if h[1] and tonumber(h[2]) > tonumber(ARGV[1]) then n = tonumber(h[1]) end
if n >= limit then return {0, h[2]} end
local k = math.min(tonumber(ARGV[5]), limit - n)
n = n + k
if n >= limit then
  redis.call('HSET', KEYS[1], 'n', n, 'reset_at', ARGV[3], 'locked_until', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'n', n, 'reset_at', ARGV[3])
  if h[3] then redis.call('HDEL', KEYS[1], 'locked_until') end
end
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
if n >= limit then return {k, ARGV[3]} end
return {k, ''}
"""

# KEYS: attempts. One attempt given back; the count is then below its limit, so no lock.
_RELEASE_ATTEMPT_LUA = """
local n = tonumber(redis.call('HGET', KEYS[1], 'n'))
if not n then return 0 end
if n > 0 then redis.call('HSET', KEYS[1], 'n', n - 1) end
redis.call('HDEL', KEYS[1], 'locked_until')
return 1
"""

# KEYS: sessions. ARGV: session hash, expires_at in ms. The index lives as long as its
# longest session (PEXPIRETIME is -1 on a fresh key, so the first session always sets it).
_INDEX_SESSION_LUA = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PEXPIRETIME', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return 1
"""

# KEYS: secret, pending, step, recovery, sessions. Returns the session hashes it dropped.
# Take the whole session index at once: a session opened after this is a new one, kept.
_TAKE_SESSIONS_LUA = """
local sessions = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return sessions
"""

_DELETE_USER_LUA = """
local sessions = redis.call('SMEMBERS', KEYS[5])
redis.call('DEL', unpack(KEYS))
return sessions
"""


def _escape(name: str) -> str:
    return name.translate(_ESCAPES)


def _ms(t: float) -> int:
    return int(t * 1000)


def _pack(expires_at: float, payload: bytes) -> bytes:
    return _EXPIRY.pack(expires_at) + payload


def _unpack(value: bytes | str | None, now: float) -> bytes | None:
    """The payload of a packed value, or None when absent or expired at ``now``."""
    if not isinstance(value, bytes) or len(value) < _EXPIRY.size:
        return None
    (expires_at,) = _EXPIRY.unpack_from(value)
    return value[_EXPIRY.size :] if expires_at > now else None


def _pool(url: str, max_connections: int, read_timeout: float | None) -> aioredis.BlockingConnectionPool:
    # A blocking pool: at most max_connections, and a burst beyond that waits (up to
    # SOCKET_TIMEOUT) for a free one; redis-py's default pool fails the request at once ("Too
    # many connections"), which would deny good requests under load.
    return aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        socket_timeout=read_timeout,
        health_check_interval=0,
        # One immediate retry on a fresh connection hides a pooled connection that the server
        # or a balancer closed while idle; more would turn an outage into a hang. Timeouts are
        # not retried: a silent server already cost SOCKET_TIMEOUT.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


def _hand_out(waiters: list[tuple[float, asyncio.Future[tuple[bool, bytes]]]], reply: Any) -> None:
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


def _translate_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
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
        except (RedisError, UnicodeError) as exc:
            raise StoreError(f"redis store: {name} failed ({type(exc).__name__})") from exc

    return wrapper


class RedisStore:
    """:class:`gateway.store.base.Store` on Redis at ``url`` (redis://, rediss:// or unix://).

    ``prefix`` namespaces every key, so several gateways (or test runs) can share a database.
    """

    def __init__(self, url: str, prefix: str = "gw", max_connections: int = 64) -> None:
        if not is_key_prefix(prefix):
            raise ValueError(f"redis key prefix {prefix!r} may only use letters, digits and _.:-")
        self.url = url
        self.prefix = prefix
        try:
            # Builds the clients only: no connection is made before open().
            pool = _pool(url, max_connections, SOCKET_TIMEOUT)
            # The batches of _flush, one in flight at a time, on a pool of their own whose reads
            # have no timeout each: _flush bounds the whole round trip by SOCKET_TIMEOUT instead.
            # redis-py arms a timer per reply read, and under a flood of codes (one reply or two
            # per request) those timers were a tenth of the gateway's CPU (bench row 2).
            batch_pool = _pool(url, 2, None)
        except ValueError as exc:  # a malformed URL is a configuration error, found early
            raise ValueError(f"invalid redis URL: {exc}") from None
        self._client = aioredis.Redis.from_pool(pool)  # closes the pool when it is closed
        self._batch_client = aioredis.Redis.from_pool(batch_pool)
        self._open = False
        # EVALSHA with the script's digest, loading it once on NOSCRIPT (also after a restart).
        self._lua_advance_step = self._client.register_script(_ADVANCE_STEP_LUA)
        self._lua_replace_secret = self._client.register_script(_COMPARE_AND_SET_LUA)
        self._lua_activate = self._client.register_script(_ACTIVATE_LUA)
        self._lua_take_attempt = self._client.register_script(_TAKE_ATTEMPT_LUA)
        # What the next flush sends: plain commands, and attempts by (key, limit, window).
        self._queue: list[tuple[list[tuple[Any, ...]], asyncio.Future[list[Any]]]] = []
        self._takes: dict[tuple[bytes, int, float], list[tuple[float, asyncio.Future[tuple[bool, bytes]]]]] = {}
        self._flushes: set[asyncio.Task[None]] = set()
        self._flush_due = False
        self._lua_release_attempt = self._client.register_script(_RELEASE_ATTEMPT_LUA)
        self._lua_index_session = self._client.register_script(_INDEX_SESSION_LUA)
        self._lua_delete_user = self._client.register_script(_DELETE_USER_LUA)
        self._lua_take_sessions = self._client.register_script(_TAKE_SESSIONS_LUA)

    @property
    def _r(self) -> aioredis.Redis:
        if not self._open:
            raise StoreError("redis store is not open")
        return self._client

    def _key(self, name: str, kind: str) -> str:
        return f"{self.prefix}:{{{_escape(name)}}}:{kind}"

    def _session_key(self, session_hash: str) -> str:
        return f"{self.prefix}:s:{session_hash}"

    # -- lifecycle -------------------------------------------------------------------------
    @_translate_errors
    async def open(self) -> None:
        if self._open:
            return
        try:
            await self._client.ping()
        except BaseException:
            await self._client.aclose()
            raise
        self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(RedisError, OSError):  # closing anyway: nothing to report
                await self._client.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._batch_client.aclose()

    @_translate_errors
    async def ping(self) -> None:
        await self._r.ping()

    # -- secrets ---------------------------------------------------------------------------
    @_translate_errors
    async def get_secret(self, user: str) -> bytes | None:
        # Batched: a flood of codes for many users reads their secrets beside their attempts.
        [value] = await self._pipelined([("GET", self._key(user, "secret"))])
        return value if isinstance(value, bytes) else None

    @_translate_errors
    async def set_secret(self, user: str, ciphertext: bytes) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(self._key(user, "secret"), ciphertext)
            pipe.delete(self._key(user, "pending"))
            await pipe.execute()

    @_translate_errors
    async def get_pending(self, user: str, now: float) -> bytes | None:
        return _unpack(await self._r.get(self._key(user, "pending")), now)

    @_translate_errors
    async def set_pending(self, user: str, ciphertext: bytes, expires_at: float) -> None:
        await self._r.set(self._key(user, "pending"), _pack(expires_at, ciphertext), pxat=_ms(expires_at))

    @_translate_errors
    async def activate_secret(self, user: str, expected: bytes | None, new: bytes) -> bool:
        args = [b"0", b"", new] if expected is None else [b"1", expected, new]
        keys = [self._key(user, "secret"), self._key(user, "pending"), self._key(user, "recovery")]
        return bool(await self._lua_activate(client=self._r, keys=keys, args=args))

    @_translate_errors
    async def replace_secret(self, user: str, old: bytes, new: bytes) -> bool:
        return bool(await self._lua_replace_secret(client=self._r, keys=[self._key(user, "secret")], args=[old, new]))

    # -- replay guard ----------------------------------------------------------------------
    @_translate_errors
    async def advance_step(self, user: str, step: int) -> bool:
        return bool(await self._lua_advance_step(client=self._r, keys=[self._key(user, "step")], args=[step]))

    # -- failures and lockouts -------------------------------------------------------------
    @_translate_errors
    async def take_attempt(self, quotas: Sequence[Quota], now: float) -> Attempt:
        # One script per quota, each on its own key (its own cluster slot), so each is atomic
        # alone; all of them in the shared pipeline of this event-loop turn (_flush), where
        # the attempts of every caller on one scope (one address under a flood) are taken by
        # one script call.
        loop = asyncio.get_running_loop()
        waits = []
        for q in quotas:
            future: asyncio.Future[tuple[bool, bytes]] = loop.create_future()
            key = self._key(q.scope, "attempts").encode()
            self._takes.setdefault((key, q.limit, q.window), []).append((now, future))
            waits.append(future)
        self._schedule_flush()
        allowed, locks = True, []
        for q, wait in zip(quotas, waits, strict=True):
            took, until = await wait
            allowed = allowed and took
            if until:
                locks.append((q.scope, float(until)))
        if not allowed:
            return Attempt(False, tuple(lock for lock in locks if lock[1] > now))
        return Attempt(True, tuple(locks))

    async def _pipelined(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to ``commands``, sent in one pipeline with those of every other caller in
        the same event-loop turn: one round trip and one pool connection for them all. Under a
        flood of codes redis-py's per-call cost, not Redis, is the bottleneck, and batching
        shares it (issue 10, bench row 2). Nothing waits for a batch to fill: it leaves on the
        next turn of the loop, or when the batch in flight is answered (_schedule_flush). Only
        for commands that are safe to send twice on NOSCRIPT."""
        # Encoded here, so a name that cannot be encoded fails its own caller, not the batch.
        encoded = [tuple(a.encode() if isinstance(a, str) else a for a in command) for command in commands]
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((encoded, future))
        self._schedule_flush()
        replies = await future
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _schedule_flush(self) -> None:
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
            while self._queue or self._takes:
                await self._flush()
        finally:
            self._flush_due = False

    async def _flush(self) -> None:
        """Send every command and attempt queued so far in one pipeline and hand each caller
        its replies. The attempts on one quota are taken by one script call, in the order they
        were asked for: the first ones get the room left, the rest are refused."""
        batch, self._queue = self._queue, []
        takes, self._takes = self._takes, {}
        commands = [command for queued, _ in batch for command in queued]
        sha = self._lua_take_attempt.sha
        for (key, limit, window), waiters in takes.items():
            now = max(at for at, _ in waiters)
            until = now + window
            commands.append(("EVALSHA", sha, 1, key, repr(now), limit, repr(until), _ms(until), len(waiters)))
        try:
            if not self._open:
                raise StoreError("redis store is not open")
            for first in (True, False):
                # The batch pool's reads have no timeout of their own: this bounds the round
                # trip. On expiry redis-py drops the connection (a late reply cannot go astray).
                async with asyncio.timeout(SOCKET_TIMEOUT), self._batch_client.pipeline(transaction=False) as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = await pipe.execute(raise_on_error=False)
                # EVALSHA; on NOSCRIPT (a restarted server) no script of the batch ran: load it
                # once and send again. redis-py's pipeline scripts would ask SCRIPT EXISTS each time.
                if first and any(isinstance(r, NoScriptError) for r in replies):
                    await self._r.script_load(_TAKE_ATTEMPT_LUA)
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

    @_translate_errors
    async def release_attempt(self, scope: str) -> None:
        await self._lua_release_attempt(client=self._r, keys=[self._key(scope, "attempts")])

    @_translate_errors
    async def locked_until(self, scope: str, now: float) -> float | None:
        value = await self._r.hget(self._key(scope, "attempts"), "locked_until")
        if value is None:
            return None
        until = float(value)
        return until if until > now else None

    @_translate_errors
    async def clear_failures(self, scope: str) -> None:
        await self._r.delete(self._key(scope, "attempts"))

    # -- recovery codes --------------------------------------------------------------------
    @_translate_errors
    async def set_recovery_codes(self, user: str, hashes: list[str]) -> None:
        key = self._key(user, "recovery")
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if hashes:
                pipe.sadd(key, *hashes)
            await pipe.execute()

    @_translate_errors
    async def consume_recovery_code(self, user: str, code_hash: str) -> bool:
        return bool(await self._r.srem(self._key(user, "recovery"), code_hash))

    # -- sessions --------------------------------------------------------------------------
    @_translate_errors
    async def create_session(self, session_hash: str, user: str, expires_at: float) -> bool:
        # Index first: a session must never exist that delete_user cannot find. The index and
        # the session live in two slots, so this is two steps, and a revoke_user_sessions or a
        # delete_user may take the index between them and delete a key not yet written: if the
        # index no longer names the session once it is written, it was ended, and goes (found
        # by the second attack: 235 of 300 such sessions outlived `users reset`).
        index = self._key(user, "sessions")
        key = self._session_key(session_hash)
        await self._lua_index_session(client=self._r, keys=[index], args=[session_hash, _ms(expires_at)])
        await self._r.set(key, _pack(expires_at, user.encode()), pxat=_ms(expires_at))
        if not await self._r.sismember(index, session_hash):
            await self._r.delete(key)
            return False
        return True

    @_translate_errors
    async def get_session(self, session_hash: str, now: float) -> str | None:
        user = _unpack(await self._r.get(self._session_key(session_hash)), now)
        return None if user is None else user.decode()

    @_translate_errors
    async def revoke_session(self, session_hash: str) -> None:
        value = await self._r.getdel(self._session_key(session_hash))
        user = _unpack(value, float("-inf"))
        if user is not None:
            await self._r.srem(self._key(user.decode(), "sessions"), session_hash)

    @_translate_errors
    async def revoke_user_sessions(self, user: str) -> int:
        sessions = await self._lua_take_sessions(client=self._r, keys=[self._key(user, "sessions")])
        # One DEL per session: their keys live in other cluster slots.
        async with self._r.pipeline(transaction=False) as pipe:
            for session_hash in sessions:
                pipe.delete(self._session_key(session_hash.decode()))
            await pipe.execute()
        return len(sessions)

    # -- users -----------------------------------------------------------------------------
    @_translate_errors
    async def delete_user(self, user: str) -> None:
        # The user's own keys go in one script (one slot); sessions and the failure scope
        # live in other slots, so they follow in one pipeline.
        kinds = ("secret", "pending", "step", "recovery", "sessions")
        sessions = await self._lua_delete_user(client=self._r, keys=[self._key(user, k) for k in kinds])
        scope = f"user:{user}"
        async with self._r.pipeline(transaction=False) as pipe:
            for session_hash in sessions:
                pipe.delete(self._session_key(session_hash.decode()))
            pipe.delete(self._key(scope, "attempts"))
            await pipe.execute()

    @_translate_errors
    async def list_users(self) -> list[str]:
        users = {user async for user, _ in self._scan_users("secret")}
        users.update([user async for user, _ in self._scan_users("pending")])
        return sorted(users)

    async def _scan_users(self, kind: str) -> AsyncIterator[tuple[str, str]]:
        """Yield (user, key) for every key ``P:{user}:kind``; SCAN, so it never blocks Redis."""
        head, tail = f"{self.prefix}:{{", f"}}:{kind}"
        async for raw in self._r.scan_iter(match=f"{head}*{tail}", count=1000):
            key = raw.decode()
            escaped = key[len(head) : -len(tail)]
            if "}" not in escaped:  # a foreign key that merely matches the pattern
                yield unquote(escaped), key

    @_translate_errors
    async def user_state(self, user: str, now: float) -> UserState:
        scope = f"user:{user}"
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.exists(self._key(user, "secret"))
            pipe.get(self._key(user, "pending"))
            pipe.hmget(self._key(scope, "attempts"), ["n", "reset_at", "locked_until"])
            pipe.scard(self._key(user, "recovery"))
            pipe.smembers(self._key(user, "sessions"))
            enrolled, pending, (n, reset_at, lock), codes, hashes = await pipe.execute()
        live = 0
        if hashes:
            ordered = sorted(hashes)
            # One GET each, not MGET: session keys sit in different cluster slots.
            async with self._r.pipeline(transaction=False) as pipe:
                for session_hash in ordered:
                    pipe.get(self._session_key(session_hash.decode()))
                values = await pipe.execute()
            live = sum(_unpack(v, now) is not None for v in values)
            # Lazy purge of the index, only of sessions Redis itself has dropped: ``now`` may
            # be a caller's clock, and an index entry lost too early would hide a live session.
            gone = [h for h, v in zip(ordered, values, strict=True) if v is None]
            if gone:
                await self._r.srem(self._key(user, "sessions"), *gone)
        until = None if lock is None else float(lock)
        return UserState(
            user=user,
            enrolled=bool(enrolled),
            pending=_unpack(pending, now) is not None,
            locked_until=until if until is not None and until > now else None,
            failures=int(n) if n is not None and float(reset_at) > now else 0,
            recovery_codes_left=int(codes),
            sessions=live,
        )

    @_translate_errors
    async def iter_secrets(self) -> list[tuple[str, bytes]]:
        found = sorted([item async for item in self._scan_users("secret")])
        if not found:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for _, key in found:
                pipe.get(key)
            values = await pipe.execute()
        return [(user, v) for (user, _), v in zip(found, values, strict=True) if isinstance(v, bytes)]
