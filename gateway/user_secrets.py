"""Each user's TOTP secrets, decrypted: the active one, and the pending one of an enrolment.

The store holds only ciphertexts (``crypto.SecretBox``, each bound to its user). Two caches
keep a flood of codes for one user from costing a store read and a decryption per code:

* the active secret (or None: not enrolled) by user, for ``store.cache_ttl`` seconds. Fine to
  refuse on; before anything is *granted* the code is judged again against the store's copy
  (:meth:`Secrets.active_fresh`), so a secret reset or replaced on another worker or by the
  CLI never grants from a stale copy;
* the plaintext by (user, ciphertext), for a minute: once the entry above expires the store is
  read again, but a ciphertext that has not changed is not decrypted again (Fernet was ~5 % of
  the CPU of a flood of wrong codes for 1,000 users, bench row 2, issue 10). Process memory
  holds the keys anyway.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway import totp
from gateway.cache import MISS, TtlCache
from gateway.config import ENV_KEYS
from gateway.crypto import SecretBox
from gateway.errors import DecryptError
from gateway.store import Store

log = logging.getLogger("gateway.audit")

_CACHE_SIZE = 100_000
# How long a decrypted secret is kept by its ciphertext (Secrets._decrypt).
_PLAIN_TTL = 60.0


def proof_of(secret: str) -> str:
    """Which secret a code was judged against, as an accepted code carries it: a digest, never
    the secret itself."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _log_undecryptable(user: str, outcome: str) -> None:
    """One line an operator can act on: whose record, which setting; never a key or a secret."""
    log.error(
        "secret of user=%r does not decrypt with any key in %s (the key that encrypted it is missing, "
        "or the record is bound to another user); %s, the stored record is left as it is",
        user,
        ENV_KEYS,
        outcome,
    )


@dataclass(frozen=True, slots=True)
class PendingSecret:
    """An enrolment not yet confirmed by a code: the new secret, and the active ciphertext it
    may replace (None: it may only become the user's first secret)."""

    secret: str
    replaces: bytes | None


class Secrets:
    def __init__(
        self, store: Store, box: SecretBox, pending_ttl: float, cache_ttl: float, clock: Callable[[], float]
    ) -> None:
        self.store = store
        self.box = box
        self.pending_ttl = pending_ttl
        self.clock = clock
        self._active: TtlCache[str, str | None] = TtlCache(cache_ttl, _CACHE_SIZE, clock)
        self._plain: TtlCache[str, str] = TtlCache(_PLAIN_TTL, _CACHE_SIZE, clock)

    def _decrypt(self, user: str, token: bytes) -> str:
        """``box.decrypt``, remembered for an unchanged ciphertext (decryption is deterministic)."""
        key = user + "\x00" + token.decode("latin-1")
        plain = self._plain.get(key)
        if plain is not MISS:
            return plain
        plain = self.box.decrypt(user, token)
        self._plain.put(key, plain)
        return plain

    async def active(self, user: str) -> str | None:
        """The active secret, or None (not enrolled), as this worker saw it within
        ``store.cache_ttl``: fine to refuse on, never to grant on (:meth:`active_fresh`)."""
        cached = self._active.get(user)
        if cached is not MISS:
            return cached
        return await self.active_fresh(user)

    async def active_fresh(self, user: str) -> str | None:
        """The active secret read from the store now (and cached for :meth:`active`). Raises
        :class:`DecryptError` when it does not decrypt: the user is denied, never let through."""
        token = await self.store.get_secret(user)
        secret = None
        if token is not None:
            try:
                secret = self._decrypt(user, token)
            except DecryptError:
                # The record is left untouched and the user denied, never taken for "not
                # enrolled": enrolment would then let the first factor alone replace the
                # victim's authenticator. A key may just be missing from this replica's config.
                _log_undecryptable(user, "denied")
                raise
        self._active.put(user, secret)
        return secret

    async def pending(self, user: str) -> PendingSecret | None:
        """The unexpired pending secret, as :meth:`begin` recorded it."""
        token = await self.store.get_pending(user, self.clock())
        if token is None:
            return None
        try:
            record = self._decrypt(user, token)
        except DecryptError:
            _log_undecryptable(user, "pending enrolment ignored")
            # A pending secret grants nothing: one made under a key removed since is treated
            # as absent, so the user starts setup again instead of meeting an error page.
            return None
        secret, _, replaces = record.partition("\n")
        return PendingSecret(secret, replaces.encode("ascii") if replaces else None)

    async def begin(self, user: str, proof: str | None) -> str | None:
        """A new pending secret (never replacing the active one until verified), or None when
        the active secret is not the one ``proof`` was proven against: without a proof, when
        the user has any active secret.

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

    async def activate(self, user: str, pending: PendingSecret) -> bool:
        """Make the pending secret the active one, atomically, if the active one is still the
        one it may replace; False when the user's authenticator changed since enrolment began."""
        if not await self.store.activate_secret(user, pending.replaces, self.box.encrypt(user, pending.secret)):
            return False
        self._active.drop(user)
        return True

    def forget(self, user: str) -> None:
        """Drop this worker's copy of the user's active secret (the user was reset)."""
        self._active.drop(user)
