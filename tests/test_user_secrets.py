"""gateway.user_secrets: active and pending secrets, their caches, and enrolment's compare-and-set.

A real SQLite store in a temporary file, real Fernet keys and a frozen clock.
"""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from gateway.crypto import SecretBox
from gateway.errors import DecryptError
from gateway.store import Store
from gateway.totp import new_secret
from gateway.user_secrets import PendingSecret, Secrets, proof_of
from tests.support.clock import Clock

KEYS = [Fernet.generate_key().decode()]
PENDING_TTL = 600.0
CACHE_TTL = 1.0


class CountingBox(SecretBox):
    """A SecretBox that counts decryptions."""

    decrypted = 0

    def decrypt(self, user: str, token: bytes) -> str:
        CountingBox.decrypted += 1
        return super().decrypt(user, token)


def secrets_of(store: Store, clock: Clock) -> Secrets:
    return Secrets(store, SecretBox(KEYS), PENDING_TTL, CACHE_TTL, clock)


def test_a_proof_is_a_digest_never_the_secret() -> None:
    secret = new_secret()
    proof = proof_of(secret)
    assert len(proof) == 64 and secret not in proof and proof == proof_of(secret) != proof_of(new_secret())


async def test_active_is_cached_for_cache_ttl_and_active_fresh_is_not(store: Store) -> None:
    clock = Clock()
    secrets = secrets_of(store, clock)
    assert await secrets.active("alice") is None  # "not enrolled" is cached too
    secret = new_secret()
    await store.set_secret("alice", SecretBox(KEYS).encrypt("alice", secret))
    assert await secrets.active("alice") is None  # fine to refuse on...
    assert await secrets.active_fresh("alice") == secret  # ...never to grant on
    await store.delete_user("alice")
    assert await secrets.active("alice") == secret  # active_fresh refreshed the cache
    clock.now += CACHE_TTL
    assert await secrets.active("alice") is None


async def test_an_unchanged_ciphertext_is_not_decrypted_again(store: Store) -> None:
    """A flood of codes for one user costs no decryption per code (issue 10, bench row 2)."""
    clock = Clock()
    secrets = Secrets(store, CountingBox(KEYS), PENDING_TTL, CACHE_TTL, clock)
    await store.set_secret("alice", SecretBox(KEYS).encrypt("alice", new_secret()))
    before = CountingBox.decrypted
    for _ in range(5):
        await secrets.active_fresh("alice")
        clock.now += CACHE_TTL
    assert CountingBox.decrypted == before + 1
    await store.set_secret("alice", SecretBox(KEYS).encrypt("alice", new_secret()))  # a new ciphertext
    await secrets.active_fresh("alice")
    assert CountingBox.decrypted == before + 2


async def test_a_secret_that_does_not_decrypt(store: Store) -> None:
    """Active: an error (the user is denied). Pending: absent (setup starts again)."""
    secrets = secrets_of(store, Clock())
    other = SecretBox([Fernet.generate_key().decode()])
    await store.set_secret("alice", other.encrypt("alice", new_secret()))
    with pytest.raises(DecryptError):
        await secrets.active("alice")
    await store.set_secret("bob", SecretBox(KEYS).encrypt("mallory", new_secret()))  # bound to another user
    with pytest.raises(DecryptError):
        await secrets.active_fresh("bob")
    await store.set_pending("carol", other.encrypt("carol", new_secret() + "\n"), Clock()() + PENDING_TTL)
    assert await secrets.pending("carol") is None


async def test_a_first_enrolment(store: Store) -> None:
    clock = Clock()
    secrets = secrets_of(store, clock)
    assert await secrets.begin("alice", proof_of(new_secret())) is None  # a proof of nothing
    secret = await secrets.begin("alice", None)
    assert secret is not None
    pending = await secrets.pending("alice")
    assert pending == PendingSecret(secret, None)
    assert await secrets.active("alice") is None  # pending is not active
    assert await secrets.activate("alice", pending)
    assert await secrets.active("alice") == secret  # activation dropped the cached "not enrolled"
    assert await secrets.pending("alice") is None
    assert await secrets.begin("alice", None) is None  # enrolled: a new one needs a proof


async def test_a_pending_secret_expires(store: Store) -> None:
    clock = Clock()
    secrets = secrets_of(store, clock)
    assert await secrets.begin("alice", None) is not None
    clock.now += PENDING_TTL
    assert await secrets.pending("alice") is None


async def test_a_re_enrolment_replaces_only_the_secret_it_proved(store: Store) -> None:
    secrets = secrets_of(store, Clock())
    old = new_secret()
    await store.set_secret("alice", SecretBox(KEYS).encrypt("alice", old))
    old_ciphertext = await store.get_secret("alice")
    assert await secrets.begin("alice", None) is None
    assert await secrets.begin("alice", proof_of(new_secret())) is None
    new = await secrets.begin("alice", proof_of(old))
    assert new is not None
    pending = await secrets.pending("alice")
    assert pending == PendingSecret(new, old_ciphertext)
    # Another authenticator lands before the code: the compare-and-set refuses.
    await store.set_secret("alice", SecretBox(KEYS).encrypt("alice", new_secret()))
    assert not await secrets.activate("alice", pending)
    assert await secrets.active_fresh("alice") not in (old, new)


async def test_forget_drops_the_cached_secret(store: Store) -> None:
    secrets = secrets_of(store, Clock())
    secret = new_secret()
    await store.set_secret("alice", SecretBox(KEYS).encrypt("alice", secret))
    assert await secrets.active("alice") == secret
    await store.delete_user("alice")
    secrets.forget("alice")
    assert await secrets.active("alice") is None
