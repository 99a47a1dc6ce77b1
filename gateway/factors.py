"""The second factor: checking codes and recovery codes, enrolment, and the sessions they open.

:class:`SecondFactor` orchestrates three parts, each in its own module:

* ``lockouts``: attempts and lockouts per user and per address (issue 10);
* ``user_secrets``: the active and pending TOTP secrets, decrypted;
* ``sessions``: the 2FA sessions a right code opens.

It joins them to the pure parts (``totp``) and answers "is this code good for this user?" with
an :class:`Accepted` or a :class:`Refused` (its reason and, for a lockout, its retry-after);
what to do with the answer is ``decision.py``'s business.

Every code takes an attempt before it is judged (``lockouts``). Caches: the hot paths (a
request with a 2FA session; a code from a locked-out user or address) are answered from small
in-process caches (``gateway.cache``) whose entries live at most ``store.cache_ttl`` seconds
(≤ 1 s). So a session revoked, a user reset or unlocked on another worker or replica takes
effect within that bound; on this worker it takes effect at once. A cached lock only refuses:
anything that *grants* on the strength of a code has taken its attempt in the store, and has
been judged against the store's copy of the secret.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeAlias

from gateway import totp
from gateway.audit import audit
from gateway.config import Config
from gateway.crypto import SecretBox
from gateway.errors import Reason
from gateway.lockouts import Locked, Lockouts, address_scope
from gateway.sessions import Sessions, hash_session_id
from gateway.store import Attempt, Store
from gateway.user_secrets import PendingSecret, Secrets, proof_of

__all__ = [
    "Accepted",
    "Outcome",
    "Refused",
    "SecondFactor",
    "address_scope",
    "hash_session_id",
    "proof_of",
]


@dataclass(frozen=True, slots=True)
class Accepted:
    """A right code or recovery code, consumed (RFC 6238 §5.2: never accepted again)."""

    # Which secret the code was judged against (``proof_of``, a digest, never the secret): a
    # session opened on this code is kept only if that secret is still the active one
    # (open_session), and a re-enrolment may replace only that one (begin_enrolment).
    proof: str
    step: int | None = None  # the time step consumed; None for a recovery code
    activated: bool = False  # the code finished an enrolment (a new secret is active)


@dataclass(frozen=True, slots=True)
class Refused:
    """A code not accepted: ``reason`` is one of NOT_ENROLLED, INVALID_CODE, REPLAYED_CODE,
    LOCKED (with ``retry_after`` in seconds) and ALREADY_ENROLLED."""

    reason: Reason
    retry_after: int | None = None


Outcome: TypeAlias = Accepted | Refused


def _refused(locked: Locked) -> Refused:
    return Refused(Reason.LOCKED, locked.retry_after)


_Judge: TypeAlias = Callable[["SecondFactor", str, "str | None", "str | None"], Awaitable[Outcome]]
# A refused code's audit event: a replay is its own event (a stolen code used twice).
_REFUSED_EVENTS = {Reason.REPLAYED_CODE: "code.replayed"}


def _audited(accepted_event: str) -> Callable[[_Judge], _Judge]:
    """One audit event per judged code or recovery code (gateway/audit.py), whatever the
    path through the method: ``accepted_event``, code.rejected (with its reason) or
    code.replayed. Never the code itself."""

    def wrap(judge: _Judge) -> _Judge:
        @functools.wraps(judge)
        async def judged(self: SecondFactor, user: str, raw_code: str | None, client: str | None) -> Outcome:
            outcome = await judge(self, user, raw_code, client)
            if isinstance(outcome, Accepted):
                # RFC 6238 §6: which step of the window the code was for (-1, 0, +1): drifting
                # phones and servers show here (read a few ms after the match: at a step's edge
                # it may read one low).
                skew = {} if outcome.step is None else {"window_offset": outcome.step - self.current_step()}
                audit(accepted_event, user, client=client, **skew)
            else:
                event = _REFUSED_EVENTS.get(outcome.reason, "code.rejected")
                # retry_after: when a lockout ends (audit.py sums up the refusals until then).
                locked = {} if outcome.retry_after is None else {"retry_after": outcome.retry_after}
                audit(event, user, client=client, reason=outcome.reason.value, **locked)
            return outcome

        return judged

    return wrap


class SecondFactor:
    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.pepper = config.encryption.recovery_pepper
        self.params = config.totp.params
        self.issuer = config.totp.issuer
        self.clock = clock
        cache_ttl = config.store.cache_ttl
        self.lockouts = Lockouts(store, config.limits, cache_ttl, clock)
        self.secrets = Secrets(store, SecretBox(config.encryption.keys), config.totp.pending_ttl, cache_ttl, clock)
        self.sessions = Sessions(store, config.session.ttl, cache_ttl, clock)

    # -- codes ---------------------------------------------------------------------------------

    def current_step(self) -> int:
        return totp.current_step(self.clock(), self.params)

    def _missed(self, attempt: Attempt, reason: Reason) -> Refused:
        """A judged code was wrong: ``reason``, or LOCKED when it used the last attempt."""
        locked = self.lockouts.missed(attempt)
        return Refused(reason) if locked is None else _refused(locked)

    @_audited("code.accepted")
    async def check_code(self, user: str, raw_code: str | None, client: str | None) -> Outcome:
        """Check a TOTP code for an enrolled user: lockout, attempt, match, replay (RFC 6238 §5.2)."""
        return await self._check_code(user, raw_code, client)

    async def _check_code(self, user: str, raw_code: str | None, client: str | None) -> Outcome:
        known = self.lockouts.known(user, client)
        if known:
            return _refused(known)
        secret = await self.secrets.active(user)
        if secret is None:
            return Refused(Reason.NOT_ENROLLED)
        attempt = await self.lockouts.take(user, client)
        if isinstance(attempt, Locked):
            return _refused(attempt)
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
        fresh = await self.secrets.active_fresh(user)
        if fresh != secret:
            step_or_none = None if fresh is None else self._matching_step(fresh, raw_code)
            if fresh is None or step_or_none is None:
                return self._missed(attempt, Reason.INVALID_CODE)
            secret, step = fresh, step_or_none
        # RFC 6238 §5.2: a code may be accepted once; advance_step is atomic in the store, so
        # of many concurrent requests carrying one code exactly one wins.
        if not await self.store.advance_step(user, step):
            return self._missed(attempt, Reason.REPLAYED_CODE)
        await self.lockouts.succeeded(user, client)
        return Accepted(proof_of(secret), step=step)

    @_audited("recovery_code.used")
    async def check_recovery(self, user: str, raw_code: str | None, client: str | None) -> Outcome:
        """Consume one recovery code; each works once. It takes an attempt like a code."""
        known = self.lockouts.known(user, client)
        if known:
            return _refused(known)
        secret = await self.secrets.active_fresh(user)
        if secret is None:
            return Refused(Reason.NOT_ENROLLED)
        attempt = await self.lockouts.take(user, client)
        if isinstance(attempt, Locked):
            return _refused(attempt)
        code = totp.normalize_recovery_code(raw_code)
        if code is None:
            return self._missed(attempt, Reason.INVALID_CODE)
        if not await self.store.consume_recovery_code(user, totp.hash_recovery_code(self.pepper, user, code)):
            return self._missed(attempt, Reason.INVALID_CODE)
        await self.lockouts.succeeded(user, client)
        return Accepted(proof_of(secret))

    async def is_enrolled(self, user: str) -> bool:
        """Whether the user has an active secret, as this worker saw it within
        ``store.cache_ttl``: fine for what to show, not for what to grant."""
        return await self.secrets.active(user) is not None

    async def is_enrolled_fresh(self, user: str) -> bool:
        """Whether the user has an active secret, read from the store now."""
        return await self.secrets.active_fresh(user) is not None

    async def unlock(self, user: str) -> None:
        await self.lockouts.unlock(user)

    # -- enrolment -----------------------------------------------------------------------------

    async def begin_enrolment(self, user: str, proof: str | None = None) -> str | None:
        """A new pending secret, or None when the active secret is not the one ``proof`` (an
        :attr:`Accepted.proof`) was proven against: without a proof, when the user has any
        active secret (``user_secrets.Secrets.begin``)."""
        secret = await self.secrets.begin(user, proof)
        if secret is not None:
            audit("enrolment.started", user, reenrolment=proof is not None)
        return secret

    @_audited("code.accepted")
    async def finish_enrolment(self, user: str, raw_code: str | None, client: str | None) -> Outcome:
        """Activate the pending secret if ``raw_code`` matches it; the code's step is consumed.
        The code takes an attempt first, like any code."""
        known = self.lockouts.known(user, client)
        if known:
            return _refused(known)
        pending = await self.secrets.pending(user)
        if pending is None:
            return Refused(Reason.NOT_ENROLLED)
        attempt = await self.lockouts.take(user, client)
        if isinstance(attempt, Locked):
            return _refused(attempt)
        step = self._matching_step(pending.secret, raw_code)
        if step is None:
            return self._missed(attempt, Reason.INVALID_CODE)
        return await self._activate(user, client, attempt, pending, step)

    @_audited("code.accepted")
    async def verify_code(self, user: str, raw_code: str | None, client: str | None) -> Outcome:
        """A code typed on the verify page: it finishes a pending enrolment if it matches the
        pending secret, else it is checked against the active one. One attempt for both, so one
        wrong code counts once. ``Accepted.activated`` tells the two successes apart."""
        known = self.lockouts.known(user, client)
        if known:
            return _refused(known)
        pending = await self.secrets.pending(user)
        if pending is None:
            # Nothing pending, or a concurrent request has just activated it (a double-clicked
            # button): judged against the active secret, where that same code is a replay.
            return await self._check_code(user, raw_code, client)
        active = await self.secrets.active(user)
        attempt = await self.lockouts.take(user, client)
        if isinstance(attempt, Locked):
            return _refused(attempt)
        step = self._matching_step(pending.secret, raw_code)
        if step is not None:
            return await self._activate(user, client, attempt, pending, step)
        step = None if active is None else self._matching_step(active, raw_code)
        if step is None or active is None:
            return self._missed(attempt, Reason.INVALID_CODE)
        return await self._accept(user, client, attempt, step, active, raw_code)

    async def _activate(
        self, user: str, client: str | None, attempt: Attempt, pending: PendingSecret, step: int
    ) -> Outcome:
        # RFC 6238 §5.2, as for any code: the step is consumed atomically first, so of several
        # concurrent requests carrying the first code exactly one activates the secret (and
        # issues recovery codes). The step is time, not secret: the replay history carries
        # over, so a re-enrolling user whose old code used this step waits for the next one.
        if not await self.store.advance_step(user, step):
            return self._missed(attempt, Reason.REPLAYED_CODE)
        if not await self.secrets.activate(user, pending):
            audit("enrolment.refused", user, client=client, reason="authenticator_changed")
            return self._missed(attempt, Reason.ALREADY_ENROLLED)
        # A new authenticator replaces the old one (a lost or stolen phone): every 2FA session
        # opened with the old one ends. The caller opens a fresh session for this request.
        ended = await self.revoke_user_sessions(user)
        audit("enrolment.confirmed", user, client=client, sessions_ended=ended)
        await self.lockouts.succeeded(user, client)
        return Accepted(proof_of(pending.secret), step=step, activated=True)

    async def pending_secret(self, user: str) -> str | None:
        """The unexpired pending secret, to show its QR code again after a mistyped first code."""
        pending = await self.secrets.pending(user)
        return None if pending is None else pending.secret

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
        """A new 2FA session for ``user``. With the ``proof`` of an accepted code, the session
        is kept only if the secret the code was judged against is still the active one, read
        after the session exists: a reset or a new authenticator that lands while the code is
        being judged either finds the session and ends it, or is found here (None)."""
        new = await self.sessions.create(user)
        if new is None:
            return None
        if proof is not None:
            current = await self.secrets.active_fresh(user)
            if current is None or proof_of(current) != proof:
                await self.sessions.discard(new)
                audit("session.refused", user, reason="authenticator_changed")
                return None
        self.sessions.remember(new)
        audit("session.opened", user)
        return new.session_id

    async def session_user(self, session_id: str | None) -> str | None:
        """The user of a live 2FA session (this worker's view, at most ``store.cache_ttl`` old)."""
        return await self.sessions.user(session_id)

    async def live_session_user(self, session_id: str) -> str | None:
        """:meth:`session_user` read from the store itself, past the cache (which it refreshes):
        for watching open connections, so a revocation on another worker is seen within one poll."""
        return await self.sessions.live_user(session_id)

    async def revoke_session(self, session_id: str, user: str | None = None) -> None:
        """End one session (a logout); ``user`` is who asked, for the audit event."""
        await self.sessions.revoke(session_id)
        if user is not None:
            audit("session.ended", user, reason="logout")

    async def revoke_user_sessions(self, user: str) -> int:
        return await self.sessions.revoke_user(user)

    async def reset_user(self, user: str) -> None:
        await self.store.delete_user(user)
        self.secrets.forget(user)
        self.sessions.forget_user(user)
        self.lockouts.forget(user)
