"""The second factor: checking codes and recovery codes, lockouts, enrolment and 2FA sessions.

This joins the pure parts (``totp``, ``crypto``) to the store. It answers questions ("is this
code good for this user?") with a :class:`Reason`; what to do with the answer is
``decision.py``'s business.

Attempts (issue 10). Every code, recovery code and enrolment code takes an attempt from the
user's and the address's quota *before* it is judged, in one atomic store operation
(``Store.take_attempt``), so no burst gets more than ``limits.max_failures`` codes judged for
one user (``limits.ip_max_failures`` for one address) in a lockout window. A right code resets
the user's count and gives the address its attempt back. A lockout stops attempts only: a
live 2FA session of the user still passes (``decision.py``).

Caches. The hot paths (a request with a 2FA session; a code from a locked-out user or
address) are answered from small in-process caches whose entries live at most
``store.cache_ttl`` seconds (≤ 1 s). So a session revoked, a user reset or unlocked on another
worker or replica takes effect within that bound; on this worker it takes effect at once. A
cached lock only refuses: anything that *grants* on the strength of a code has taken its
attempt in the store.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway import totp
from gateway.config import Config
from gateway.crypto import SecretBox
from gateway.errors import DecryptError, Reason
from gateway.store import Attempt, Quota, Store

log = logging.getLogger("gateway.audit")

_CACHE_SIZE = 100_000
# How long a decrypted secret is kept by its ciphertext (SecondFactor._decrypt).
_PLAIN_TTL = 60.0


@dataclass(frozen=True, slots=True)
class Outcome:
    reason: Reason
    retry_after: int | None = None
    step: int | None = None
    activated: bool = False  # the code finished an enrolment (a new secret is active)
    # Which secret the code was judged against (a digest, never the secret): a session opened
    # on this outcome is kept only if that secret is still the active one (open_session).
    proof: str | None = None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@functools.lru_cache(maxsize=4096)
def address_scope(client: str) -> str:
    """The lockout scope of a client address. An IPv6 client is counted by its /64: one
    subscriber or host is routinely given a whole /64 (RFC 6177, RFC 7934), so counting per
    /128 would hand it 2^64 fresh quotas. An IPv4-mapped address, or one translated by NAT64
    with the well-known prefix (RFC 6052 §2.1: 64:ff9b::/96), counts as its IPv4 address: a
    NAT64 front would otherwise put every IPv4 client in one /64."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return f"ip:{client}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ip:{ip.ipv4_mapped}"
        if ip in _NAT64:
            return f"ip:{ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)}"
        return f"ip:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"ip:{ip}"


def proof_of(secret: str) -> str:
    """What an ``Outcome.proof`` holds for a code judged against ``secret``: a digest, never the
    secret itself."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _locked(until: float, now: float) -> Outcome:
    # RFC 9110 §10.2.3: Retry-After in whole seconds, rounded up.
    return Outcome(Reason.LOCKED, retry_after=max(1, int(until - now + 0.999)))


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
        self.params = config.totp.params
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
        # The same by (user, ciphertext), kept longer: once the entry above expires the store
        # is read again, so a reset or a new secret elsewhere is seen within cache_ttl, but a
        # ciphertext that has not changed is not decrypted again (Fernet was ~5 % of the CPU
        # of a flood of wrong codes for 1,000 users, bench row 2, issue 10).
        self._plain = _TtlCache(_PLAIN_TTL, clock)

    # -- attempts and lockouts ---------------------------------------------------------------

    def _quotas(self, user: str, client: str | None) -> list[Quota]:
        limits = self.limits
        quotas = [Quota(f"user:{user}", limits.max_failures, limits.lockout)]
        if client:
            quotas.append(Quota(address_scope(client), limits.ip_max_failures, limits.ip_lockout))
        return quotas

    def _known_lock(self, user: str, client: str | None) -> Outcome | None:
        """A lock this worker saw within ``store.cache_ttl``: refused with no store round trip,
        which is what an attacker's flood meets. Only a hint: the store has the last word."""
        now = self.clock()
        for scope in (f"user:{user}", address_scope(client) if client else None):
            hit, until = self._locks.get(scope) if scope else (False, None)
            if hit and isinstance(until, float) and until > now:
                return _locked(until, now)
        return None

    async def _take_attempt(self, user: str, client: str | None) -> tuple[Attempt, Outcome | None]:
        """Take the attempt *before* the code is judged (NIST 800-63B §5.2.2, issue 10): one
        atomic store operation for the user's and the address's quota, so a burst of any size
        gets at most ``limits.max_failures`` codes judged per user (``ip_max_failures`` per
        address) per lockout window. The outcome is None when allowed, LOCKED when refused."""
        now = self.clock()
        attempt = await self.store.take_attempt(self._quotas(user, client), now)
        if attempt.allowed:
            return attempt, None
        for scope, until in attempt.locks:
            self._locks.put(scope, until, until)
        return attempt, _locked(attempt.locked_until or now, now)

    def _missed(self, attempt: Attempt, reason: Reason) -> Outcome:
        """A judged code was wrong. If its attempt was the last one left, the lock it set holds
        from now: the answer says so (429 with Retry-After), not "wrong or expired"."""
        if not attempt.locks:
            return Outcome(reason)
        for scope, until in attempt.locks:
            self._locks.put(scope, until, until)
            kind, _, name = scope.partition(":")
            log.warning("lockout %s=%r for %ds", "user" if kind == "user" else "client", name, until - self.clock())
        return _locked(max(until for _, until in attempt.locks), self.clock())

    async def _succeeded(self, user: str, client: str | None) -> None:
        """A right code: the user's count starts again (as before issue 10); the address gets
        its attempt back, so colleagues behind one NAT signing in never lock each other out."""
        self._locks.drop(f"user:{user}")
        done = [self.store.clear_failures(f"user:{user}")]
        if client:
            self._locks.drop(address_scope(client))
            done.append(self.store.release_attempt(address_scope(client)))
        await asyncio.gather(*done)

    async def unlock(self, user: str) -> None:
        await self.store.clear_failures(f"user:{user}")
        self._locks.drop(f"user:{user}")

    # -- codes ---------------------------------------------------------------------------------

    def _decrypt(self, user: str, token: bytes) -> str:
        """``box.decrypt``, remembered for an unchanged ciphertext (decryption is deterministic)."""
        key = user + "\x00" + token.decode("latin-1")
        hit, plain = self._plain.get(key)
        if hit and isinstance(plain, str):
            return plain
        plain = self.box.decrypt(user, token)
        self._plain.put(key, plain)
        return plain

    async def _secret(self, user: str, pending: bool = False, fresh: bool = False) -> str | None:
        """The decrypted active (or pending) secret. The active one comes from a cache that
        lives ``store.cache_ttl``: fine to refuse on, but a code that matches it is judged again
        against the store's (``fresh=True``) before anything is granted, so a secret reset or
        replaced on another worker or by the CLI never grants from a stale copy."""
        if not pending and not fresh:
            hit, cached = self._secrets.get(user)
            if hit:
                return cached if isinstance(cached, str) else None
        token = await self.store.get_pending(user, self.clock()) if pending else await self.store.get_secret(user)
        secret = None
        if token is not None:
            try:
                secret = self._decrypt(user, token)
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
        """Check a TOTP code for an enrolled user: lockout, attempt, match, replay (RFC 6238 §5.2)."""
        known = self._known_lock(user, client)
        if known:
            return known
        secret = await self._secret(user)
        if secret is None:
            return Outcome(Reason.NOT_ENROLLED)
        return await self._judge(user, client, raw_code, secret)

    async def _judge(self, user: str, client: str | None, raw_code: str | None, secret: str) -> Outcome:
        attempt, refused = await self._take_attempt(user, client)
        if refused:
            return refused
        step = self._matching_step(secret, raw_code)
        if step is None:
            return self._missed(attempt, Reason.INVALID_CODE)
        return await self._accept(user, client, attempt, step, secret, raw_code)

    def _matching_step(self, secret: str, raw_code: str | None) -> int | None:
        code = totp.parse_code(raw_code, self.params.digits)
        return None if code is None else totp.matching_step(secret, code, self.clock(), self.params)

    async def _accept(
        self, user: str, client: str | None, attempt: Attempt, step: int, secret: str, raw_code: str | None
    ) -> Outcome:
        # The code matched the cached secret: judged again against the store's before it grants
        # (a reset or a new authenticator elsewhere within the cache's life; found by attack).
        fresh = await self._secret(user, fresh=True)
        if fresh != secret:
            step_or_none = None if fresh is None else self._matching_step(fresh, raw_code)
            if fresh is None or step_or_none is None:
                return self._missed(attempt, Reason.INVALID_CODE)
            secret, step = fresh, step_or_none
        # RFC 6238 §5.2: a code may be accepted once; advance_step is atomic in the store, so
        # of many concurrent requests carrying one code exactly one wins.
        if not await self.store.advance_step(user, step):
            return self._missed(attempt, Reason.REPLAYED_CODE)
        await self._succeeded(user, client)
        return Outcome(Reason.CODE, step=step, proof=proof_of(secret))

    async def check_recovery(self, user: str, raw_code: str | None, client: str | None) -> Outcome:
        """Consume one recovery code; each works once. It takes an attempt like a code."""
        known = self._known_lock(user, client)
        if known:
            return known
        secret = await self._secret(user, fresh=True)
        if secret is None:
            return Outcome(Reason.NOT_ENROLLED)
        attempt, refused = await self._take_attempt(user, client)
        if refused:
            return refused
        code = totp.normalize_recovery_code(raw_code)
        if code is None:
            return self._missed(attempt, Reason.INVALID_CODE)
        if not await self.store.consume_recovery_code(user, totp.hash_recovery_code(self.pepper, user, code)):
            return self._missed(attempt, Reason.INVALID_CODE)
        await self._succeeded(user, client)
        log.warning("recovery code used user=%r", user)
        return Outcome(Reason.CODE, proof=proof_of(secret))

    async def is_enrolled(self, user: str, fresh: bool = False) -> bool:
        return await self._secret(user, fresh=fresh) is not None

    async def _pending(self, user: str) -> tuple[str, bytes | None] | None:
        """The pending secret and the active ciphertext it may replace (None: it may only
        become the first one), as ``begin_enrolment`` recorded them."""
        plain = await self._secret(user, pending=True)
        if plain is None:
            return None
        secret, _, expected = plain.partition("\n")
        return secret, expected.encode("ascii") if expected else None

    # -- enrolment -----------------------------------------------------------------------------

    async def begin_enrolment(self, user: str, proof: str | None = None) -> str | None:
        """A new pending secret (never replacing the active one until verified), or None when
        the active secret is not the one ``proof`` (a code's ``Outcome.proof``) was proven
        against: without a proof, when the user has any active secret.

        The pending record names the active ciphertext it may replace, read from the store
        now, and activation replaces exactly that one, atomically (``store.activate_secret``):
        an enrolment begun with the first factor alone can never overwrite an authenticator
        that appeared meanwhile (found by attack, through a worker's stale cache), nor one
        begun with a code overwrite another authenticator than the one the code came from
        (found by the second attack: a stolen phone's code raced its owner's re-enrolment)."""
        active = await self.store.get_secret(user)
        if active is not None:
            current = self._decrypt(user, active)
            if proof is None or proof_of(current) != proof:
                return None
        elif proof is not None:
            return None
        secret = totp.new_secret()
        now = self.clock()
        # Fernet tokens are URL-safe base64, so ASCII; a base32 secret holds no newline.
        record = secret + "\n" + (active.decode("ascii") if active is not None else "")
        await self.store.set_pending(user, self.box.encrypt(user, record), now + self.pending_ttl)
        return secret

    async def finish_enrolment(self, user: str, raw_code: str | None, client: str | None) -> Outcome:
        """Activate the pending secret if ``raw_code`` matches it; the code's step is consumed.
        The code takes an attempt first, like any code."""
        known = self._known_lock(user, client)
        if known:
            return known
        pending = await self._pending(user)
        if pending is None:
            return Outcome(Reason.NOT_ENROLLED)
        attempt, refused = await self._take_attempt(user, client)
        if refused:
            return refused
        step = self._matching_step(pending[0], raw_code)
        if step is None:
            return self._missed(attempt, Reason.INVALID_CODE)
        return await self._activate(user, client, attempt, pending, step)

    async def verify_code(self, user: str, raw_code: str | None, client: str | None) -> Outcome:
        """A code typed on the verify page: it finishes a pending enrolment if it matches the
        pending secret, else it is checked against the active one. One attempt for both, so one
        wrong code counts once. ``Outcome.activated`` tells the two successes apart."""
        known = self._known_lock(user, client)
        if known:
            return known
        pending = await self._pending(user)
        if pending is None:
            # Nothing pending, or a concurrent request has just activated it (a double-clicked
            # button): judged against the active secret, where that same code is a replay.
            return await self.check_code(user, raw_code, client)
        active = await self._secret(user)
        attempt, refused = await self._take_attempt(user, client)
        if refused:
            return refused
        step = self._matching_step(pending[0], raw_code)
        if step is not None:
            return await self._activate(user, client, attempt, pending, step)
        step = None if active is None else self._matching_step(active, raw_code)
        if step is None or active is None:
            return self._missed(attempt, Reason.INVALID_CODE)
        return await self._accept(user, client, attempt, step, active, raw_code)

    async def _activate(
        self, user: str, client: str | None, attempt: Attempt, pending: tuple[str, bytes | None], step: int
    ) -> Outcome:
        secret, expected = pending
        # RFC 6238 §5.2, as for any code: the step is consumed atomically first, so of several
        # concurrent requests carrying the first code exactly one activates the secret (and
        # issues recovery codes). The step is time, not secret: the replay history carries
        # over, so a re-enrolling user whose old code used this step waits for the next one.
        if not await self.store.advance_step(user, step):
            return self._missed(attempt, Reason.REPLAYED_CODE)
        if not await self.store.activate_secret(user, expected, self.box.encrypt(user, secret)):
            log.warning("enrolment of user=%r refused: the active authenticator changed since it began", user)
            return self._missed(attempt, Reason.ALREADY_ENROLLED)
        self._secrets.drop(user)
        # A new authenticator replaces the old one (a lost or stolen phone): every 2FA session
        # opened with the old one ends. The caller opens a fresh session for this request.
        ended = await self.revoke_user_sessions(user)
        if ended:
            log.warning("new authenticator for user=%r: %d earlier 2FA session(s) ended", user, ended)
        await self._succeeded(user, client)
        return Outcome(Reason.CODE, step=step, activated=True, proof=proof_of(secret))

    async def pending_secret(self, user: str) -> str | None:
        """The unexpired pending secret, to show its QR code again after a mistyped first code."""
        pending = await self._pending(user)
        return None if pending is None else pending[0]

    def provisioning_uri(self, secret: str, label: str) -> str:
        return totp.provisioning_uri(secret, label.replace(":", "_"), self.issuer, self.params)

    async def new_recovery_codes(self, user: str) -> list[str]:
        codes = totp.new_recovery_codes()
        hashes = [totp.hash_recovery_code(self.pepper, user, totp.normalize_recovery_code(c) or c) for c in codes]
        await self.store.set_recovery_codes(user, hashes)
        return codes

    async def recovery_codes_left(self, user: str) -> int:
        """How many unused recovery codes ``user`` holds (shown after one is used)."""
        return (await self.store.user_state(user, self.clock())).recovery_codes_left

    # -- sessions ------------------------------------------------------------------------------

    async def open_session(self, user: str, proof: str | None = None) -> str | None:
        """A new 2FA session for ``user``. With the ``proof`` of a code's outcome, the session
        is kept only if the secret the code was judged against is still the active one, read
        after the session exists: a reset or a new authenticator that lands while the code is
        being judged either finds the session and ends it, or is found here (None)."""
        session_id = secrets.token_urlsafe(32)
        expires = self.clock() + self.session_ttl
        key = hash_session_id(session_id)
        if not await self.store.create_session(key, user, expires):
            log.warning("session for user=%r not opened: the user's sessions were ended meanwhile", user)
            return None
        if proof is not None:
            current = await self._secret(user, fresh=True)
            if current is None or proof_of(current) != proof:
                await self.store.revoke_session(key)
                log.warning("session for user=%r not opened: the authenticator changed while the code was judged", user)
                return None
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

    async def live_session_user(self, session_id: str) -> str | None:
        """:meth:`session_user` read from the store itself, past the cache (which it refreshes):
        for watching open connections, so a revocation on another worker is seen within one poll."""
        if len(session_id) > 128:
            return None
        key = hash_session_id(session_id)
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
