"""Encryption of TOTP secrets at rest: MultiFernet, with each ciphertext bound to its user.

A :class:`SecretBox` holds the configured Fernet keys, newest first. The first key encrypts;
every key decrypts, so keys can be rotated without a flag day (``gateway keys rotate``
re-encrypts every stored secret under the newest key, then the old key can be dropped).

The plaintext inside each Fernet token is versioned and names its user::

    b"gw1\\x00" + user (UTF-8) + b"\\x00" + secret (UTF-8)

Fernet authenticates the whole plaintext, so a ciphertext copied from one user's row to
another's (by a store bug or by someone with write access to the store) fails to decrypt
instead of silently granting the other user's secret.

Every exception from ``cryptography`` is translated into :class:`DecryptError` in exactly one
place, :func:`_decrypt_errors`. No message raised here carries a key, a token or a secret.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from gateway.errors import DecryptError

# Bump the version when the plaintext layout changes; decrypt() rejects unknown versions.
_FORMAT = b"gw1\x00"
_SEPARATOR = b"\x00"
_DECRYPT_FAILED = "the stored secret does not decrypt for this user"
_KEY_HINT = "32 url-safe base64-encoded bytes"
_BASE32 = re.compile(r"[A-Z2-7]+", re.ASCII)


def new_key() -> str:
    """A fresh Fernet key (urlsafe base64 text), for ``gateway keys new``."""
    return Fernet.generate_key().decode("ascii")


@contextmanager
def _decrypt_errors() -> Iterator[None]:
    """The one boundary where cryptography's exceptions become :class:`DecryptError`.

    InvalidToken covers a bad signature, an unknown key and a malformed token; ValueError
    and TypeError cover non-ASCII text, wrong types and undecodable plaintext. The original
    exception is dropped (``from None``) so no traceback can show token material.
    """
    try:
        yield
    except (InvalidToken, ValueError, TypeError):
        raise DecryptError(_DECRYPT_FAILED) from None


def _check_user(user: str) -> bytes:
    """The UTF-8 bytes of a user id; it must be non-empty and free of NUL (the separator)."""
    if not isinstance(user, str) or not user or "\x00" in user:
        raise ValueError("user id must be a non-empty string without NUL")
    try:
        return user.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        raise ValueError("user id is not valid Unicode") from None


class SecretBox:
    """Encrypts and decrypts TOTP secrets under a list of Fernet keys, newest first."""

    __slots__ = ("_all", "_count", "_primary")

    def __init__(self, keys: Sequence[str]) -> None:
        """Build from urlsafe-base64 Fernet keys, newest first.

        Raises ValueError naming a bad key by its 1-based position only, never by its text.
        """
        if isinstance(keys, (str, bytes)):
            raise ValueError("keys must be a list of keys, not a single string")
        if not keys:
            raise ValueError("no encryption key")
        fernets: list[Fernet] = []
        seen: dict[bytes, int] = {}
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key))
                raw = base64.urlsafe_b64decode(key)
            except (ValueError, TypeError, binascii.Error):
                raise ValueError(f"key {position} is not a valid Fernet key ({_KEY_HINT})") from None
            if raw in seen:
                raise ValueError(f"key {position} is the same key as key {seen[raw]}")
            seen[raw] = position
        self._primary = fernets[0]
        self._all = MultiFernet(fernets)
        self._count = len(fernets)

    def __repr__(self) -> str:
        return f"<SecretBox keys={self._count}>"

    def encrypt(self, user: str, secret: str) -> bytes:
        """Encrypt ``secret`` under the newest key, bound to ``user``."""
        user_bytes = _check_user(user)
        if not isinstance(secret, str) or not secret:
            raise ValueError("secret must be a non-empty string")
        return self._all.encrypt(_FORMAT + user_bytes + _SEPARATOR + secret.encode("utf-8"))

    def decrypt(self, user: str, token: bytes) -> str:
        """The secret in ``token``; DecryptError if it is corrupt, under no known key, or
        bound to a user other than ``user``."""
        user_bytes = _check_user(user)
        with _decrypt_errors():
            plaintext = self._all.decrypt(token)
            return _unbind(user_bytes, plaintext)

    def rotate(self, user: str, token: bytes) -> bytes:
        """Re-encrypt ``token`` under the newest key, after checking it belongs to ``user``.

        MultiFernet.rotate keeps the token's original timestamp.
        """
        self.decrypt(user, token)
        with _decrypt_errors():
            return self._all.rotate(token)

    def needs_rotation(self, token: bytes) -> bool:
        """True if ``token`` decrypts only under an older key; DecryptError if under none.

        Fernet tokens do not name their key, so this tries the newest key first. It costs one
        or two decryptions: fine for ``gateway keys rotate``, not meant for the request path.
        """
        with _decrypt_errors():
            try:
                self._primary.decrypt(token)
                return False
            except InvalidToken:
                pass
            self._all.decrypt(token)
            return True


def _unbind(user_bytes: bytes, plaintext: bytes) -> str:
    """The secret in a ``gw1`` plaintext if it names ``user_bytes``; else DecryptError.

    Runs inside :func:`_decrypt_errors`, so a UnicodeDecodeError also becomes DecryptError.
    """
    if not plaintext.startswith(_FORMAT):
        raise DecryptError(_DECRYPT_FAILED)
    bound_user, separator, secret = plaintext[len(_FORMAT) :].partition(_SEPARATOR)
    # User ids cannot contain NUL, so the first NUL after the prefix ends the user id.
    if not separator or not secret or not hmac.compare_digest(bound_user, user_bytes):
        raise DecryptError(_DECRYPT_FAILED)
    return secret.decode("utf-8")


def decrypt_legacy(token: bytes, key: str) -> str:
    """The base32 secret in a token made by the original ``two_fast_auth`` library.

    That library stored ``Fernet(key).encrypt(secret.encode())`` with no user binding; this is
    for ``gateway users import``, which re-encrypts each secret with :meth:`SecretBox.encrypt`.
    The secret is returned upper-case without ``=`` padding. Raises ValueError for a bad key and
    DecryptError when the token does not decrypt or does not hold a base32 secret.
    """
    try:
        fernet = Fernet(key)
    except (ValueError, TypeError, binascii.Error):
        raise ValueError(f"the legacy key is not a valid Fernet key ({_KEY_HINT})") from None
    with _decrypt_errors():
        secret = fernet.decrypt(token).decode("ascii").strip().replace(" ", "").upper().rstrip("=")
        if not _BASE32.fullmatch(secret):
            raise DecryptError(_DECRYPT_FAILED)
        base64.b32decode(secret + "=" * (-len(secret) % 8))  # binascii.Error -> DecryptError
        return secret
