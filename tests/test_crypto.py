"""gateway/crypto.py: user binding, key rotation, and DecryptError as the only failure."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.fernet import Fernet

from gateway.crypto import SecretBox, decrypt_legacy, new_key
from gateway.errors import DecryptError

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def test_round_trip() -> None:
    box = SecretBox([new_key()])
    token = box.encrypt("alice", SECRET)
    assert isinstance(token, bytes) and SECRET.encode() not in token
    assert box.decrypt("alice", token) == SECRET
    assert box.encrypt("alice", SECRET) != token  # random IV
    assert box.decrypt("ünï cödé@example.com", box.encrypt("ünï cödé@example.com", SECRET)) == SECRET


def test_token_is_bound_to_its_user() -> None:
    box = SecretBox([new_key()])
    token = box.encrypt("alice", SECRET)
    for other in ("bob", "alic", "alice ", "Alice", "alice\u200b"):
        with pytest.raises(DecryptError) as caught:
            box.decrypt(other, token)
        assert SECRET not in str(caught.value)
    with pytest.raises(DecryptError):
        box.rotate("bob", token)


def test_plaintext_without_binding_is_refused() -> None:
    key = new_key()
    box = SecretBox([key])
    fernet = Fernet(key)
    for plaintext in [
        SECRET.encode(),
        b"gw1\x00alice",
        b"gw1\x00alice\x00",
        b"gw2\x00alice\x00" + SECRET.encode(),
        b"gw1\x00alice\x00\xff\xfe",
    ]:
        with pytest.raises(DecryptError):
            box.decrypt("alice", fernet.encrypt(plaintext))


def test_rotation() -> None:
    old, new = new_key(), new_key()
    token = SecretBox([old]).encrypt("alice", SECRET)
    both = SecretBox([new, old])
    assert both.decrypt("alice", token) == SECRET
    assert both.needs_rotation(token)
    rotated = both.rotate("alice", token)
    assert not both.needs_rotation(rotated)
    assert SecretBox([new]).decrypt("alice", rotated) == SECRET
    with pytest.raises(DecryptError):
        SecretBox([old]).decrypt("alice", rotated)
    # New secrets are encrypted under the first key only.
    assert SecretBox([new]).decrypt("bob", both.encrypt("bob", SECRET)) == SECRET
    with pytest.raises(DecryptError):
        both.needs_rotation(SecretBox([new_key()]).encrypt("alice", SECRET))


def test_unknown_key() -> None:
    token = SecretBox([new_key()]).encrypt("alice", SECRET)
    with pytest.raises(DecryptError):
        SecretBox([new_key(), new_key()]).decrypt("alice", token)


def test_corrupt_tokens_raise_decrypt_error_only() -> None:
    box = SecretBox([new_key()])
    token = box.encrypt("alice", SECRET)
    flipped = bytearray(base64.urlsafe_b64decode(token))
    flipped[-40] ^= 1
    garbage: list[Any] = [
        base64.urlsafe_b64encode(bytes(flipped)),
        token[:-4],
        token[:20],
        token[:50] + b"A" + token[50:],
        b"",
        b"=",
        b"not base64 at all!!",
        b"\x00\xff\x80",
        b"gAAAAA",
        "gAAAAAé".encode(),
        "ünïcode",
        None,
        42,
        bytearray(token),
    ]
    for bad in garbage:
        for call in (
            lambda t: box.decrypt("alice", t),
            lambda t: box.rotate("alice", t),
            lambda t: box.needs_rotation(t),
        ):
            with pytest.raises(DecryptError) as caught:
                call(bad)
            assert caught.value.__cause__ is None and caught.value.__suppress_context__
            assert SECRET not in str(caught.value)


def test_bad_keys_are_named_by_position_only() -> None:
    good = new_key()
    for bad in [
        "",
        "short",
        good[:-2],
        good.rstrip("=") + "AAAA",
        "!" * 44,
        base64.urlsafe_b64encode(b"x" * 31).decode(),
    ]:
        with pytest.raises(ValueError, match=r"^key 2 is not a valid Fernet key") as caught:
            SecretBox([good, bad])
        if bad:
            assert bad not in str(caught.value)
        assert good not in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(ValueError, match=r"^key 1 is not"):
        SecretBox([None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^no encryption key$"):
        SecretBox([])
    with pytest.raises(ValueError, match="not a single string"):
        SecretBox(good)
    with pytest.raises(ValueError, match=r"^key 3 is the same key as key 1$"):
        SecretBox([good, new_key(), good])


def test_repr_shows_no_key() -> None:
    key = new_key()
    assert key not in repr(SecretBox([key])) and repr(SecretBox([key])) == "<SecretBox keys=1>"


def test_bad_user_or_secret_on_encrypt() -> None:
    box = SecretBox([new_key()])
    for user in ("", "a\x00b", "\ud800"):
        with pytest.raises(ValueError):
            box.encrypt(user, SECRET)
        with pytest.raises(ValueError):
            box.decrypt(user, b"")
    with pytest.raises(ValueError):
        box.encrypt("alice", "")


def test_decrypt_legacy() -> None:
    key = new_key()
    assert decrypt_legacy(Fernet(key).encrypt(b"JBSWY3DPEHPK3PXP"), key) == "JBSWY3DPEHPK3PXP"
    assert decrypt_legacy(Fernet(key).encrypt(b" jbswy3dpehpk3pxp====\n"), key) == "JBSWY3DPEHPK3PXP"
    for bad in [
        Fernet(new_key()).encrypt(b"JBSWY3DPEHPK3PXP"),
        Fernet(key).encrypt(b"not-base32!"),
        Fernet(key).encrypt(b""),
        Fernet(key).encrypt(b"\xff\xfe"),
        Fernet(key).encrypt(b"A"),
        b"garbage",
        b"",
    ]:
        with pytest.raises(DecryptError) as caught:
            decrypt_legacy(bad, key)
        assert "JBSWY3DPEHPK3PXP" not in str(caught.value)
    with pytest.raises(ValueError, match="legacy key") as bad_key:
        decrypt_legacy(Fernet(key).encrypt(b"JBSWY3DPEHPK3PXP"), "secret-key-text")
    assert "secret-key-text" not in str(bad_key.value)


def test_new_key() -> None:
    key = new_key()
    assert len(base64.urlsafe_b64decode(key)) == 32 and key != new_key()
    Fernet(key)
