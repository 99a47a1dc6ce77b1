"""The shared store on Redis (>= 7.0), for several gateway instances behind one balancer.

The client side: the connection pools; the batching of attempts into one round trip is
``gateway.store.redis_batch``. How
each call is bounded in time and where redis errors become StoreError is
``gateway.store.redis_calls``; what is kept under which key, and the Lua scripts,
``gateway.store.redis_layout``.

The store's identity (issue 14): a random id under ``{prefix}:store-id``, without TTL, written
once when the store is initialised (``gateway store init``, or a first start with
``store.create = "if_missing"``). A Redis restarted without its data, flushed, or evicted of
that key would otherwise look like a new, empty store: every user "not enrolled", enrolment open
to the first factor alone. ``open`` refuses a Redis without the id (unless ``create``), and the
running store compares it at most once per IDENTITY_CHECK_INTERVAL, from the calls every request
makes first (``get_secret``, ``get_session``) and readiness: a Redis without it, or with another
id, is refused (every call StoreError, 503) until the same id is back (a restart with its
persistence). On a Cluster the key lives on one node (its slot's): it covers a cluster flushed
or restarted empty, not one other node losing its data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from gateway.errors import StoreError
from gateway.store.base import Attempt, Quota, UserState, is_key_prefix
from gateway.store.redis_batch import Batcher
from gateway.store.redis_calls import SOCKET_TIMEOUT, bounded, gated, translate_errors
from gateway.store.redis_checks import check_eviction_policy
from gateway.store.redis_clients import Client, build_client, close_client
from gateway.store.redis_layout import (
    ACTIVATE_LUA,
    ADVANCE_STEP_LUA,
    COMPARE_AND_SET_LUA,
    DELETE_USER_LUA,
    INDEX_SESSION_LUA,
    RELEASE_ATTEMPT_LUA,
    TAKE_ATTEMPT_LUA,
    TAKE_SESSIONS_LUA,
    pack_expiring,
    session_key,
    to_ms,
    unescape_name,
    unpack_live,
    user_key,
)
from gateway.store.redis_topology import parse_redis_url
from gateway.store.sqlite import NOT_INITIALISED_HINT

# How long a write that must survive a failover waits for its replicas (store.replicas_ack).
WAIT_MS = 100

log = logging.getLogger("gateway.store")


# The readiness probe's key lives this long: it is rewritten by every probe, never read.
READY_PROBE_MS = 60_000
# How often the running store reads its identity back (one GET a second, never per request).
IDENTITY_CHECK_INTERVAL = 1.0


class RedisStore:
    """:class:`gateway.store.base.Store` on Redis at ``url``: one server, a Sentinel set or a
    Cluster (the forms of ``gateway.store.redis_topology``).

    ``prefix`` namespaces every key, so several gateways (or test runs) can share a database.
    """

    def __init__(
        self, url: str, prefix: str = "gw", max_connections: int = 64, replicas_ack: int = 0, create: bool = False
    ) -> None:
        if not is_key_prefix(prefix):
            raise ValueError(f"redis key prefix {prefix!r} may only use letters, digits and _.:-")
        self._replicas_ack = replicas_ack
        self.url = url
        self.prefix = prefix
        try:
            target = parse_redis_url(url)
            # Builds the clients only: no connection is made before open().
            self._client: Client = build_client(target, max_connections, SOCKET_TIMEOUT, SOCKET_TIMEOUT)
            # The batches (redis_batch), one in flight at a time, on a pool of their own whose
            # reads have no timeout each: the batcher bounds the whole round trip by
            # SOCKET_TIMEOUT instead. redis-py arms a timer per reply read, and under a flood of
            # codes (one reply or two per request) those timers were a tenth of the gateway's
            # CPU (bench row 2).
            batch_client: Client = build_client(target, 2, SOCKET_TIMEOUT, None)
            self._gate = asyncio.Semaphore(max_connections) if isinstance(self._client, RedisCluster) else None
            if replicas_ack and isinstance(self._client, RedisCluster):
                # WAIT counts the replicas of the node it is sent to; a Cluster pipeline would
                # send it to some node, not the one that took the write.
                raise ValueError("store.replicas_ack is for one server or Sentinel, not a Cluster")
        except ValueError as exc:  # a malformed URL is a configuration error, found early
            raise ValueError(f"invalid redis URL: {exc}") from None
        self._open = False
        self.create = create
        self.store_id: str | None = None  # the identity opened: a Redis without it is refused
        self._refused: str | None = None  # why (logged once per reason); every call fails meanwhile
        self._identity_checked_at = 0.0
        # EVALSHA with the script's digest, loading it once on NOSCRIPT (also after a restart).
        self._lua_advance_step = self._client.register_script(ADVANCE_STEP_LUA)
        self._lua_replace_secret = self._client.register_script(COMPARE_AND_SET_LUA)
        self._lua_activate = self._client.register_script(ACTIVATE_LUA)
        self._batch = Batcher(
            batch_client,
            self._client.register_script(TAKE_ATTEMPT_LUA).sha,
            lambda: self._r.script_load(TAKE_ATTEMPT_LUA),
            lambda: self._open and self._refused is None,
        )
        self._lua_release_attempt = self._client.register_script(RELEASE_ATTEMPT_LUA)
        self._lua_index_session = self._client.register_script(INDEX_SESSION_LUA)
        self._lua_delete_user = self._client.register_script(DELETE_USER_LUA)
        self._lua_take_sessions = self._client.register_script(TAKE_SESSIONS_LUA)

    @property
    def _r(self) -> Client:
        if not self._open:
            raise StoreError("redis store is not open")
        if self._refused is not None:
            raise StoreError(f"redis store: refused, {self._refused}")
        return self._client

    @property
    def _id_key(self) -> str:
        return f"{self.prefix}:store-id"

    async def _read_id(self) -> str | None:
        value = await self._client.get(self._id_key)
        if value is None:
            return None
        return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)

    async def _check_identity(self, always: bool = False) -> None:
        """At most once per IDENTITY_CHECK_INTERVAL (``always``: now): read the id back; refuse
        the store (and raise) unless it is the one opened, serve it again once it is."""
        if not self._open:
            raise StoreError("redis store is not open")
        now = time.monotonic()
        if not always and now < self._identity_checked_at + IDENTITY_CHECK_INTERVAL:
            if self._refused is not None:
                raise StoreError(f"redis store: refused, {self._refused}")
            return
        self._identity_checked_at = now
        found = await self._read_id()
        if found == self.store_id:
            if self._refused is not None:
                self._refused = None
                log.warning("store: the Redis store (prefix %s) has its identity back; serving again", self.prefix)
            return
        reason = (
            "it has no store identity (restarted without its data, flushed or evicted)"
            if found is None
            else "it is another store"
        )
        if self._refused != reason:
            self._refused = reason
            log.error(
                "store: the Redis store (prefix %s) is not the store this gateway opened: %s; refusing it,"
                " every request denied. Restore its data (the same store is served again), or accept an"
                " empty store deliberately with 'gateway store init' and a restart: that re-opens"
                " enrolment to the first factor for every user",
                self.prefix,
                reason,
            )
        raise StoreError(f"redis store: refused, {reason}")

    def _key(self, name: str, kind: str) -> str:
        return user_key(self.prefix, name, kind)

    def _session_key(self, session_hash: str) -> str:
        return session_key(self.prefix, session_hash)

    def _wait_for_replicas(self, pipe: Any) -> None:
        """Queue WAIT after the writes of ``pipe`` (one connection), when replicas_ack asks for it.
        WAIT waits for the master's replication offset at that point, so it covers every write
        the master took before, on any connection (redis_layout: "What a failover may lose")."""
        if self._replicas_ack:
            pipe.execute_command("WAIT", self._replicas_ack, WAIT_MS)

    def _check_acked(self, what: str, replies: list[Any]) -> list[Any]:
        """``replies`` without WAIT's; too few replicas in time is logged, never a denial: the
        write is on the master, which answers every request until a failover."""
        if not self._replicas_ack:
            return replies
        acked = int(replies[-1])
        if acked < self._replicas_ack:
            log.warning(
                "store: %s acknowledged by %d of %d replicas within %d ms; a failover now could lose it",
                what,
                acked,
                self._replicas_ack,
                WAIT_MS,
            )
        return replies[:-1]

    # -- lifecycle -------------------------------------------------------------------------
    @translate_errors
    @bounded
    async def open(self) -> None:
        if self._open:
            return
        try:
            await self._client.ping()
            await check_eviction_policy(self._client)  # an evicting Redis deletes keys silently
            if self.create:  # a first start may make the identity where there is none at all
                await self._client.set(self._id_key, secrets.token_hex(16), nx=True)
            found = await self._read_id()
        except BaseException:
            await close_client(self._client)
            raise
        if found is None or (self.store_id is not None and found != self.store_id):
            await close_client(self._client)
            what = "no initialised store" if found is None else "another store"
            raise StoreError(f"redis store: {what} under prefix {self.prefix}; {NOT_INITIALISED_HINT}")
        self.store_id = found
        self._identity_checked_at = time.monotonic()
        self._open = True

    @translate_errors
    @bounded
    async def initialise(self) -> bool:
        """``gateway store init``: open the store, giving it an identity if it has none (the
        keys already there are kept). True if it had none."""
        try:
            await self._client.ping()
            created = bool(await self._client.set(self._id_key, secrets.token_hex(16), nx=True))
            found = await self._read_id()
        except BaseException:
            await close_client(self._client)
            raise
        self.store_id = found
        self._open = True
        return created

    async def close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(RedisError, RedisClusterException, OSError):  # closing anyway
                await close_client(self._client)
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await close_client(self._batch.client)

    @translate_errors
    @bounded
    async def ping(self) -> None:
        # A write, not PING: Redis answers PING when out of memory (noeviction) and as a
        # READONLY replica, where every code check fails (issue 14: readiness must see it).
        await self._check_identity()
        await self._r.set(f"{self.prefix}:ready", b"1", px=READY_PROBE_MS)

    # -- secrets ---------------------------------------------------------------------------
    @translate_errors
    async def get_secret(self, user: str) -> bytes | None:
        # "Not enrolled" opens enrolment: never answer it from a store that lost its data.
        await self._check_identity()
        # Batched: a flood of codes for many users reads their secrets beside their attempts.
        [value] = await self._batch.pipelined([("GET", self._key(user, "secret"))])
        return value if isinstance(value, bytes) else None

    @translate_errors
    @bounded
    async def set_secret(self, user: str, ciphertext: bytes) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(self._key(user, "secret"), ciphertext)
            pipe.delete(self._key(user, "pending"))
            await pipe.execute()

    @translate_errors
    @bounded
    async def get_pending(self, user: str, now: float) -> bytes | None:
        return unpack_live(await self._r.get(self._key(user, "pending")), now)

    @translate_errors
    @bounded
    async def set_pending(self, user: str, ciphertext: bytes, expires_at: float) -> None:
        # Enrolment is rare: checked every time, so that none starts in the second after the
        # data was lost, before the periodic check sees it.
        await self._check_identity(always=True)
        await self._r.set(self._key(user, "pending"), pack_expiring(expires_at, ciphertext), pxat=to_ms(expires_at))

    @translate_errors
    @bounded
    async def activate_secret(self, user: str, expected: bytes | None, new: bytes) -> bool:
        await self._check_identity(always=True)  # as set_pending: no enrolment on a lost store
        args = [b"0", b"", new] if expected is None else [b"1", expected, new]
        keys = [self._key(user, "secret"), self._key(user, "pending"), self._key(user, "recovery")]
        if not self._replicas_ack:
            return bool(await self._lua_activate(client=self._r, keys=keys, args=args))
        # A lost re-enrolment would bring the old authenticator back.
        async with self._r.pipeline(transaction=False) as pipe:
            await self._lua_activate(client=cast(Any, pipe), keys=keys, args=args)  # queued: not a Cluster
            self._wait_for_replicas(pipe)
            (done,) = self._check_acked("an enrolment", await pipe.execute())
        return bool(done)

    @translate_errors
    @bounded
    async def replace_secret(self, user: str, old: bytes, new: bytes) -> bool:
        return bool(await self._lua_replace_secret(client=self._r, keys=[self._key(user, "secret")], args=[old, new]))

    # -- replay guard ----------------------------------------------------------------------
    @translate_errors
    @bounded
    async def advance_step(self, user: str, step: int) -> bool:
        keys, args = [self._key(user, "step")], [step]
        if not self._replicas_ack:
            return bool(await self._lua_advance_step(client=self._r, keys=keys, args=args))
        # A lost step would let the same code in again on the promoted replica (RFC 6238 §5.2).
        async with self._r.pipeline(transaction=False) as pipe:
            await self._lua_advance_step(client=cast(Any, pipe), keys=keys, args=args)  # queued: not a Cluster
            self._wait_for_replicas(pipe)
            (recorded,) = self._check_acked("a used code step", await pipe.execute())
        return bool(recorded)

    # -- failures and lockouts -------------------------------------------------------------
    @translate_errors
    async def take_attempt(self, quotas: Sequence[Quota], now: float) -> Attempt:
        # One script per quota, each on its own key (its own cluster slot), so each is atomic
        # alone; all of them in the shared pipeline of this event-loop turn (_flush), where
        # the attempts of every caller on one scope (one address under a flood) are taken by
        # one script call (gateway.store.redis_batch).
        loop = asyncio.get_running_loop()
        waits = []
        for q in quotas:
            future: asyncio.Future[tuple[bool, bytes]] = loop.create_future()
            key = self._key(q.scope, "attempts").encode()
            self._batch.takes.setdefault((key, q.limit, q.window), []).append((now, future))
            waits.append(future)
        self._batch.schedule()
        allowed, locks = True, []
        # One store timeout for the caller, however long it queued behind a batch in flight
        # (a frozen server cost two: tests/integration/test_failover.py). Cancelled, its
        # attempt may still be taken: counts never fall short.
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT):
                for q, wait in zip(quotas, waits, strict=True):
                    took, until = await wait
                    allowed = allowed and took
                    if until:
                        locks.append((q.scope, float(until)))
        finally:
            for wait in waits:  # those not awaited: no "exception never retrieved" later
                wait.cancel()
        if not allowed:
            return Attempt(False, tuple(lock for lock in locks if lock[1] > now))
        return Attempt(True, tuple(locks))

    @translate_errors
    @bounded
    async def release_attempt(self, scope: str) -> None:
        await self._lua_release_attempt(client=self._r, keys=[self._key(scope, "attempts")])

    @translate_errors
    @bounded
    async def locked_until(self, scope: str, now: float) -> float | None:
        value = await self._r.hget(self._key(scope, "attempts"), "locked_until")
        if value is None:
            return None
        until = float(value)
        return until if until > now else None

    @translate_errors
    @bounded
    async def clear_failures(self, scope: str) -> None:
        await self._r.delete(self._key(scope, "attempts"))

    # -- recovery codes --------------------------------------------------------------------
    @translate_errors
    @bounded
    async def set_recovery_codes(self, user: str, hashes: list[str]) -> None:
        key = self._key(user, "recovery")
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if hashes:
                pipe.sadd(key, *hashes)
            await pipe.execute()

    @translate_errors
    @bounded
    async def consume_recovery_code(self, user: str, code_hash: str) -> bool:
        return bool(await self._r.srem(self._key(user, "recovery"), code_hash))

    # -- sessions --------------------------------------------------------------------------
    @translate_errors
    @bounded
    async def create_session(self, session_hash: str, user: str, expires_at: float) -> bool:
        # Index first: a session must never exist that delete_user cannot find. The index and
        # the session live in two slots, so this is two steps, and a revoke_user_sessions or a
        # delete_user may take the index between them and delete a key not yet written: if the
        # index no longer names the session once it is written, it was ended, and goes (found
        # by the second attack: 235 of 300 such sessions outlived `users reset`).
        index = self._key(user, "sessions")
        key = self._session_key(session_hash)
        await self._lua_index_session(client=self._r, keys=[index], args=[session_hash, to_ms(expires_at)])
        await self._r.set(key, pack_expiring(expires_at, user.encode()), pxat=to_ms(expires_at))
        if not await self._r.sismember(index, session_hash):
            await self._r.delete(key)
            return False
        return True

    @translate_errors
    @bounded
    async def get_session(self, session_hash: str, now: float) -> str | None:
        await self._check_identity()  # at most once a second (the other door of every request)
        user = unpack_live(await self._r.get(self._session_key(session_hash)), now)
        return None if user is None else user.decode()

    @translate_errors
    @bounded
    async def revoke_session(self, session_hash: str) -> None:
        value = await self._r.getdel(self._session_key(session_hash))
        user = unpack_live(value, float("-inf"))
        if user is not None:
            # WAIT after the srem, on its connection, covers the getdel before it too.
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.srem(self._key(user.decode(), "sessions"), session_hash)
                self._wait_for_replicas(pipe)
                self._check_acked("a logout", await pipe.execute())

    @translate_errors
    @bounded
    async def revoke_user_sessions(self, user: str) -> int:
        sessions = await self._lua_take_sessions(client=self._r, keys=[self._key(user, "sessions")])
        # One DEL per session: their keys live in other cluster slots.
        async with self._r.pipeline(transaction=False) as pipe:
            for session_hash in sessions:
                pipe.delete(self._session_key(session_hash.decode()))
            if sessions:
                self._wait_for_replicas(pipe)
                self._check_acked("a revocation of sessions", await pipe.execute())
        return len(sessions)

    # -- users -----------------------------------------------------------------------------
    @translate_errors
    @bounded
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
            self._wait_for_replicas(pipe)
            self._check_acked("a reset of a user", await pipe.execute())

    @translate_errors
    @gated
    async def list_users(self) -> list[str]:
        users = {user async for user, _ in self._scan_users("secret")}
        users.update([user async for user, _ in self._scan_users("pending")])
        return sorted(users)

    async def _scan_users(self, kind: str) -> AsyncIterator[tuple[str, str]]:
        """Yield (user, key) for every key ``P:{user}:kind``; SCAN, so it never blocks Redis."""
        head, tail = f"{self.prefix}:{{", f"}}:{kind}"
        # On a Cluster each master holds its own slots: SCAN every one of them (redis-py's
        # default for SCAN too, said here so no change of default can drop a shard's users).
        nodes: dict[str, Any] = {"target_nodes": RedisCluster.PRIMARIES} if isinstance(self._r, RedisCluster) else {}
        async for raw in self._r.scan_iter(match=f"{head}*{tail}", count=1000, **nodes):
            key = raw.decode()
            escaped = key[len(head) : -len(tail)]
            if "}" not in escaped:  # a foreign key that merely matches the pattern
                yield unescape_name(escaped), key

    @translate_errors
    @bounded
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
            live = sum(unpack_live(v, now) is not None for v in values)
            # Lazy purge of the index, only of sessions Redis itself has dropped: ``now`` may
            # be a caller's clock, and an index entry lost too early would hide a live session.
            gone = [h for h, v in zip(ordered, values, strict=True) if v is None]
            if gone:
                await self._r.srem(self._key(user, "sessions"), *gone)
        until = None if lock is None else float(lock)
        return UserState(
            user=user,
            enrolled=bool(enrolled),
            pending=unpack_live(pending, now) is not None,
            locked_until=until if until is not None and until > now else None,
            failures=int(n) if n is not None and float(reset_at) > now else 0,
            recovery_codes_left=int(codes),
            sessions=live,
        )

    @translate_errors
    @gated
    async def iter_secrets(self) -> list[tuple[str, bytes]]:
        return await self._read_secrets(sorted([item async for item in self._scan_users("secret")]))

    @translate_errors
    @gated
    async def sample_secrets(self, limit: int) -> list[tuple[str, bytes]]:
        found: list[tuple[str, str]] = []
        async for item in self._scan_users("secret"):
            if len(found) >= limit:
                break
            found.append(item)
        return await self._read_secrets(found)

    async def _read_secrets(self, found: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
        """The ciphertexts at the (user, key) pairs of ``found``; a key deleted meanwhile is left out."""
        if not found:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for _, key in found:
                pipe.get(key)
            values = await pipe.execute()
        return [(user, v) for (user, _), v in zip(found, values, strict=True) if isinstance(v, bytes)]
