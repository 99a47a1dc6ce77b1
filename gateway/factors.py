"""The second factor: checking codes and recovery codes, lockouts, enrolment and 2FA sessions.

This joins the pure parts (``totp``, ``crypto``) to the store. It answers questions ("is this
code good for this user?") with a :class:`Reason`; what to do with the answer is
``decision.py``'s business.

Caches. The hot paths (a request with a 2FA session; a request from a locked-out user) are
answered from small in-process caches whose entries live at most ``store.cache_ttl``
seconds (≤ 1 s). So a session revoked, a user reset or unlocked on another worker or replica
takes effect within that bound; on this worker it takes effect at once. Anything that
*grants* on the strength of a code (code checks, recovery codes, enrolment) always reads the
store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway import totp
from gateway.config import Config
from gateway.crypto import SecretBox
from gateway.errors import DecryptError, Reason
from gateway.store import Store

log = logging.getLogger("gateway.audit")

_CACHE_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class Outcome:
    reason: Reason
    retry_after: int | None = None
    step: int | None = None


def hash_session_id(session_id: str) -> str:
    """The store keeps only a hash of each session id, so a copy of the store opens no session."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).hexdigest()


class _TtlCache:
    """A dict whose entries are trusted for ``ttl`` seconds; bounded by clearing when full."""

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.clock = clock
        self.data: dict[str, tuple[float, object]] = {}

    def get(self, key: str) -> tuple[bool, object]:
        hit = self.data.get(key)
        if hit is None:
            return False, None
        if hit[0] <= self.clock():
            self.data.pop(key, None)
            return False, None
        return True, hit[1]

    def put(self, key: str, value: object, until: float | None = None) -> None:
        if self.ttl <= 0:
            return
        if len(self.data) >= _CACHE_SIZE:
            self.data.clear()
        limit = self.clock() + self.ttl
        self.data[key] = (limit if until is None else min(until, limit), value)

    def drop(self, key: str) -> None:
        self.data.pop(key, None)

    def drop_value(self, value: object) -> None:
        for key in [k for k, (_, v) in self.data.items() if v == value]:
            del self.data[key]


class SecondFactor:
    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.box = SecretBox(config.encryption.keys)
        self.pepper = config.encryption.recovery_pepper
        self.params = totp.TotpParams(
            digits=config.totp.digits,
            period=config.totp.period,
            algorithm=config.totp.algorithm,
            window=config.totp.window,
        )
        self.issuer = config.totp.issuer
        self.pending_ttl = config.totp.pending_ttl
        self.limits = config.limits
        self.session_ttl = config.session.ttl
        self.clock = clock
        self._sessions = _TtlCache(config.store.cache_ttl, clock)
        self._locks = _TtlCache(config.store.cache_ttl, clock)
        # Decrypted active secrets (or None: not enrolled), so a flood of codes for one user
        # costs no store read and no decryption. Process memory holds the keys anyway.
        self._secrets = _TtlCache(config.store.cache_ttl, clock)

    # -- lockouts ------------------------------------------------------------------------------

    async def locked(self, user: str, client: str | None, cached: bool = True) -> Outcome | None:
        """A LOCKED outcome if the user or the client address is locked out, else None;
        ``cached=False`` reads the store itself (before anything is granted on a code)."""
        outcome, _ = await self.gate(user, client, None, cached)
        return outcome

    async def gate(
        self, user: str, client: str | None, session_id: str | None, cached: bool = True
    ) -> tuple[Outcome | None, str | None]:
        """The lockout and the user of ``session_id`` (as :meth:`session_user`), read together:
        from the caches first (the locks only when ``cached``), and whatever they miss from the
        store concurrently, so a cold decision waits for one store round trip instead of three."""
        now = self.clock()
        scopes = [f"user:{user}", f"ip:{client}"] if client else [f"user:{user}"]
        untils: dict[str, object] = {}
        reads: dict[str, Awaitable[object]] = {}
        for scope in scopes:
            hit, until = self._locks.get(scope) if cached else (False, None)
            if hit:
                untils[scope] = until
            else:
                reads[scope] = self.store.locked_until(scope, now)
        key = None
        session: object = None
        if session_id and len(session_id) <= 128:
            key = hash_session_id(session_id)
            hit, session = self._sessions.get(key)
            if not hit:
                reads[key] = self.store.get_session(key, now)
        if reads:
            if len(reads) == 1:
                [(name, read)] = reads.items()
                results = {name: await read}
            else:
                values = await asyncio.gather(*reads.values(), return_exceptions=True)
                for value in values:
                    if isinstance(value, BaseException):
                        raise value  # a store error denies, after every read has finished
                results = dict(zip(reads, values, strict=True))
            for name, value in results.items():
                if name == key:
                    session = value
                    self._sessions.put(name, value)
                else:
                    untils[name] = value
                    self._locks.put(name, value, value if isinstance(value, float) else None)
        for scope in scopes:
            until = untils.get(scope)
            if isinstance(until, float) and until > now:
                return Outcome(Reason.LOCKED, retry_after=max(1, int(until - now + 0.999))), None
        return None, session if isinstance(session, str) else None

    async def _fail(self, user: str, client: str | None, reason: Reason) -> Outcome:
        """Count a failure against the user and the client address (atomically, in the store)."""
        now = self.clock()
        limits = self.limits
        counts = [self.store.record_failure(f"user:{user}", limits.max_failures, limits.lockout, now)]
        if client:
            counts.append(self.store.record_failure(f"ip:{client}", limits.ip_max_failures, limits.ip_lockout, now))
        results = await asyncio.gather(*counts)
        if results[0] is not None:
            self._locks.put(f"user:{user}", results[0], results[0])
            log.warning("lockout user=%r for %ss", user, limits.lockout)
        if client and results[1] is not None:
            self._locks.put(f"ip:{client}", results[1], results[1])
            log.warning("lockout client=%s for %ss", client, limits.ip_lockout)
        return Outcome(reason)

    async def unlock(self, user: str) -> None:
        await self.store.clear_failures(f"user:{user}")
        self._locks.drop(f"user:{user}")

    # -- codes ---------------------------------------------------------------------------------

    async def _secret(self, user: str, pending: bool = False) -> str | None:
        if not pending:
            hit, cached = self._secrets.get(user)
            if hit:
                return cached if isinstance(cached, str) else None
        token = await self.store.get_pending(user, self.clock()) if pending else await self.store.get_secret(user)
        secret = None
        if token is not None:
            try:
                secret = self.box.decrypt(user, token)
            except DecryptError:
                # The record is left untouched: a key may just be missing from this replica's config.
                log.error("secret of user=%r does not decrypt (wrong key or record bound to another user)", user)
                if not pending:
                    raise
                # A pending secret grants nothing: one made under a key removed since is treated
                # as absent, so the user starts setup again instead of meeting an error page.
                return None
        if not pending:
            self._secrets.put(user, secret)
        return secret

    async def check_code(self, user: str, raw_code: str | None, client: str | None) -> Outcome:
        """Check a TOTP code for an enrolled user: format, lockout, match, replay (RFC 6238 §5.2)."""
        # A lock known to this worker denies at once, cheaply: what an attacker's flood meets.
        locked = await self.locked(user, client)
        if locked:
            return locked
        code = totp.parse_code(raw_code, self.params.digits)
        secret = await self._secret(user)
        if secret is None:
            return Outcome(Reason.NOT_ENROLLED)
        if code is None:
            return await self._fail(user, client, Reason.INVALID_CODE)
        step = totp.matching_step(secret, code, self.clock(), self.params)
        if step is None:
            return await self._fail(user, client, Reason.INVALID_CODE)
        # Only a matching code can grant, so only then is the lock read from the store itself:
        # another worker may have locked the user within the last cache_ttl.
        locked = await self.locked(user, client, cached=False)
        if locked:
            return locked
        # RFC 6238 §5.2: a code may be accepted once; advance_step is atomic in the store, so
        # of many concurrent requests carrying one code exactly one wins.
        if not await self.store.advance_step(user, step):
            return await self._fail(user, client, Reason.REPLAYED_CODE)
        await self.store.clear_failures(f"user:{user}")
        return Outcome(Reason.CODE, step=step)

    async def check_recovery(self, user: str, raw_code: str | None, client: str | None) -> Outcome:
        """Consume one recovery code; each works once."""
        locked = await self.locked(user, client, cached=False)
        if locked:
            return locked
        if await self.store.get_secret(user) is None:
            return Outcome(Reason.NOT_ENROLLED)
        code = totp.normalize_recovery_code(raw_code)
        if code is None:
            return await self._fail(user, client, Reason.INVALID_CODE)
        if not await self.store.consume_recovery_code(user, totp.hash_recovery_code(self.pepper, user, code)):
            return await self._fail(user, client, Reason.INVALID_CODE)
        await self.store.clear_failures(f"user:{user}")
        log.warning("recovery code used user=%r", user)
        return Outcome(Reason.CODE)

    async def is_enrolled(self, user: str) -> bool:
        return await self._secret(user) is not None

    # -- enrolment -----------------------------------------------------------------------------

    async def begin_enrolment(self, user: str) -> str:
        """A new pending secret (never replacing the active one until verified)."""
        secret = totp.new_secret()
        now = self.clock()
        await self.store.set_pending(user, self.box.encrypt(user, secret), now + self.pending_ttl)
        return secret

    async def finish_enrolment(
        self, user: str, raw_code: str | None, client: str | None, count_failure: bool = True
    ) -> Outcome:
        """Activate the pending secret if ``raw_code`` matches it; the code's step is consumed.

        ``count_failure=False`` is for a re-enrolling user whose code is checked against the
        active secret next: that check counts the failure, so one wrong code counts once.
        """
        locked = await self.locked(user, client, cached=False)
        if locked:
            return locked
        secret = await self._secret(user, pending=True)
        if secret is None:
            return Outcome(Reason.NOT_ENROLLED)
        code = totp.parse_code(raw_code, self.params.digits)
        step = None if code is None else totp.matching_step(secret, code, self.clock(), self.params)
        if step is None:
            if not count_failure:
                return Outcome(Reason.INVALID_CODE)
            return await self._fail(user, client, Reason.INVALID_CODE)
        # RFC 6238 §5.2, as for any code: the step is consumed atomically first, so of several
        # concurrent requests carrying the first code exactly one activates the secret (and
        # issues recovery codes). The step is time, not secret: the replay history carries
        # over, so a re-enrolling user whose old code used this step waits for the next one.
        if not await self.store.advance_step(user, step):
            return await self._fail(user, client, Reason.REPLAYED_CODE)
        await self.store.set_secret(user, self.box.encrypt(user, secret))
        self._secrets.drop(user)
        # A new authenticator replaces the old one (a lost or stolen phone): every 2FA session
        # opened with the old one ends. The caller opens a fresh session for this request.
        ended = await self.revoke_user_sessions(user)
        if ended:
            log.warning("new authenticator for user=%r: %d earlier 2FA session(s) ended", user, ended)
        await self.store.clear_failures(f"user:{user}")
        return Outcome(Reason.CODE, step=step)

    async def pending_secret(self, user: str) -> str | None:
        """The unexpired pending secret, to show its QR code again after a mistyped first code."""
        return await self._secret(user, pending=True)

    def provisioning_uri(self, secret: str, label: str) -> str:
        return totp.provisioning_uri(secret, label.replace(":", "_"), self.issuer, self.params)

    async def new_recovery_codes(self, user: str) -> list[str]:
        codes = totp.new_recovery_codes()
        hashes = [totp.hash_recovery_code(self.pepper, user, totp.normalize_recovery_code(c) or c) for c in codes]
        await self.store.set_recovery_codes(user, hashes)
        return codes

    # -- sessions ------------------------------------------------------------------------------

    async def open_session(self, user: str) -> str:
        session_id = secrets.token_urlsafe(32)
        expires = self.clock() + self.session_ttl
        key = hash_session_id(session_id)
        await self.store.create_session(key, user, expires)
        self._sessions.put(key, user, expires)
        return session_id

    async def session_user(self, session_id: str | None) -> str | None:
        if not session_id or len(session_id) > 128:
            return None
        key = hash_session_id(session_id)
        hit, user = self._sessions.get(key)
        if hit:
            return user if isinstance(user, str) else None
        found = await self.store.get_session(key, self.clock())
        self._sessions.put(key, found)
        return found

    async def revoke_session(self, session_id: str) -> None:
        key = hash_session_id(session_id)
        await self.store.revoke_session(key)
        self._sessions.drop(key)

    async def revoke_user_sessions(self, user: str) -> int:
        ended = await self.store.revoke_user_sessions(user)
        self._sessions.drop_value(user)
        return ended

    async def reset_user(self, user: str) -> None:
        await self.store.delete_user(user)
        self._secrets.drop(user)
        self._sessions.drop_value(user)
        self._locks.drop(f"user:{user}")
