"""TOTP codes (RFC 6238 on RFC 4226 HOTP, computed by pyotp), provisioning URIs, recovery codes.

Pure functions: the clock is a parameter (``now``) and nothing here touches the store. The
replay guard of RFC 6238 §5.2 ("the verifier MUST NOT accept the second attempt of the same
OTP") lives in the store: after :func:`matching_step` returns a step, the caller must record
it with ``Store.advance_step(user, step)`` and deny when that returns False.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import pyotp

DIGESTS: dict[str, Callable[..., Any]] = {
    "SHA1": hashlib.sha1,
    "SHA256": hashlib.sha256,
    "SHA512": hashlib.sha512,
}

# Inputs longer than this are rejected before any other work, so huge inputs cost nothing.
_MAX_CODE_INPUT = 64
_CODE_PATTERNS = {digits: re.compile(f"[0-9]{{{digits}}}", re.ASCII) for digits in range(6, 9)}
_ASCII_SPACE = " \t\r\n"
# NIST SP 800-63B §5.1.4.1 and pyotp's floor; RFC 4226 §4 R6 asks 128 and recommends 160.
MIN_SECRET_BITS = 112
# Prepared HOTPs kept (least recently used dropped first): more than the users one worker
# sees codes for within a few seconds. The decrypted secrets are in process memory anyway
# (factors.py caches them).
_PREPARED = 4096


@dataclass(frozen=True, slots=True)
class TotpParams:
    """How codes are made and how far the clock may drift.

    ``digits`` is 6 to 8: RFC 4226 §5.3 reduces the truncated value modulo 10^Digit with 6 to
    8 digits, and the Key-Uri-Format (and pyotp.parse_uri) accepts no more. ``period`` is the
    time step X of RFC 6238 §4 (30 s recommended in §5.2). ``window`` is how many steps before
    and after the current one are accepted, for clock drift and typing time (RFC 6238 §5.2
    and §6 recommend at most one step back).
    """

    digits: int = 6
    period: int = 30
    algorithm: str = "SHA1"
    window: int = 1

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Each invalid field as ``"field: reason"``; empty when all are valid."""
        found = []
        if not _is_int(self.digits) or not 6 <= self.digits <= 8:
            found.append(f"digits: must be 6, 7 or 8, not {self.digits!r}")
        if not _is_int(self.period) or not 15 <= self.period <= 120:
            found.append(f"period: must be 15 to 120 seconds, not {self.period!r}")
        if self.algorithm not in DIGESTS:
            found.append(f"algorithm: must be one of {', '.join(DIGESTS)}, not {self.algorithm!r}")
        if not _is_int(self.window) or not 0 <= self.window <= 3:
            found.append(f"window: must be 0 to 3 steps, not {self.window!r}")
        return found


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def new_secret() -> str:
    """A new shared secret: 160 random bits (RFC 4226 §4 R6 recommends 160), base32, no padding."""
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii")


class _DecodedHOTP(pyotp.HOTP):
    """pyotp's HOTP with the key decoded from base32 once, not once per code (pyotp decodes it
    in every ``generate_otp``). The codes are still pyotp's: only ``byte_secret`` is cached."""

    def __init__(self, secret: str, digits: int, digest: Callable[..., Any]) -> None:
        self._key = b""
        super().__init__(secret, digits=digits, digest=digest)  # validates the base32
        self._key = super().byte_secret()

    def byte_secret(self) -> bytes:
        return self._key or super().byte_secret()

    @staticmethod
    def int_to_bytestring(i: int, padding: int = 8) -> bytes:
        # RFC 4226 §5.2: the counter as 8 bytes, big-endian; pyotp builds them byte by byte.
        return i.to_bytes(padding, "big")


def _hotp(secret: str, params: TotpParams) -> pyotp.HOTP:
    """pyotp's HOTP for ``secret``; ValueError if the secret is not base32 or under 112 bits.

    pyotp >= 2.10 checks the length itself; checking here too keeps older versions as strict.
    """
    return _prepared(secret, params.digits, params.algorithm)


@functools.lru_cache(maxsize=_PREPARED)
def _prepared(secret: str, digits: int, algorithm: str) -> pyotp.HOTP:
    # Cached: a flood of codes for many users would otherwise build and validate an HOTP and
    # decode its base32 key four times per code (a tenth of the CPU of bench row 2, issue 10).
    # A ValueError is not cached, so a bad secret fails every time.
    hotp = _DecodedHOTP(secret, digits, DIGESTS[algorithm])
    if len(hotp.byte_secret()) * 8 < MIN_SECRET_BITS:
        raise ValueError(f"the secret is shorter than {MIN_SECRET_BITS} bits")
    return hotp


def current_step(now: float, params: TotpParams) -> int:
    """RFC 6238 §4: T = floor((now - T0) / X), with T0 = 0 (the Unix epoch)."""
    if not math.isfinite(now) or now < 0:
        raise ValueError("now must be a finite, non-negative Unix time")
    return int(now // params.period)


def code_at(secret: str, step: int, params: TotpParams) -> str:
    """The code for time step ``step`` (an HOTP counter: RFC 4226 §5.3 dynamic truncation)."""
    return _hotp(secret, params).generate_otp(step)


def matching_step(secret: str, code: str, now: float, params: TotpParams) -> int | None:
    """The time step in [T - window, T + window] whose code equals ``code``, or None.

    ``code`` should come from :func:`parse_code`. Every candidate is computed and compared with
    ``hmac.compare_digest`` and the loop never exits early, so the time taken does not tell
    which step matched. The caller must then record the step (RFC 6238 §5.2, see module doc).
    Raises ValueError if ``secret`` is not valid base32 of at least 112 bits.
    """
    hotp = _hotp(secret, params)
    expected = code.encode("utf-8")
    step = current_step(now, params)
    matched: int | None = None
    for candidate in range(step - params.window, step + params.window + 1):
        if candidate < 0:
            continue  # before the epoch: no such step
        if hmac.compare_digest(hotp.generate_otp(candidate).encode("ascii"), expected):
            matched = candidate
    return matched


def parse_code(raw: str | None, digits: int) -> str | None:
    """The code in ``raw`` if it is exactly ``digits`` ASCII digits, else None.

    Surrounding ASCII whitespace is dropped; inner spaces, signs and non-ASCII digits (such as
    full-width digits U+FF10..U+FF19, which pyotp would accept after NFKC normalisation) are refused.
    """
    if raw is None or len(raw) > _MAX_CODE_INPUT:
        return None
    pattern = _CODE_PATTERNS.get(digits)
    if pattern is None:
        raise ValueError(f"digits must be 6, 7 or 8, not {digits!r}")
    code = raw.strip(_ASCII_SPACE)
    return code if pattern.fullmatch(code) else None


def provisioning_uri(secret: str, account: str, issuer: str, params: TotpParams) -> str:
    """The ``otpauth://totp/Issuer:account?secret=...&issuer=...`` URI for a QR code.

    Google's Key-Uri-Format: the label and every value are percent-encoded; algorithm, digits
    and period appear only when they differ from the defaults most apps assume (several apps
    ignore them, so non-defaults are best avoided). ``issuer`` and ``account`` must be non-empty
    and must not contain ':', which some apps split on even when encoded: ValueError.
    """
    for name, value in (("issuer", issuer), ("account", account)):
        if not value or ":" in value:
            raise ValueError(f"{name} must be non-empty and must not contain ':'")
    _hotp(secret, params)  # ValueError for a secret no app could use
    query: dict[str, str | int] = {"secret": secret, "issuer": issuer}
    if params.algorithm != "SHA1":
        query["algorithm"] = params.algorithm
    if params.digits != 6:
        query["digits"] = params.digits
    if params.period != 30:
        query["period"] = params.period
    label = quote(issuer, safe="") + ":" + quote(account, safe="")
    return f"otpauth://totp/{label}?{urlencode(query, quote_via=quote)}"


# -- recovery codes ----------------------------------------------------------------------------
# Crockford's base32 alphabet: no I, L, O (confusable with 1 and 0) and no U.
RECOVERY_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
RECOVERY_LENGTH = 24  # 24 symbols x 5 bits = 120 bits of entropy (>= 112, NIST SP 800-63B)
RECOVERY_GROUP = 4  # shown as 6 groups of 4: "7G3K-M2QX-..."
_RECOVERY_CONFUSABLES = str.maketrans({"O": "0", "I": "1", "L": "1"})
_RECOVERY_IGNORED = str.maketrans("", "", "- ")
_MAX_RECOVERY_INPUT = 64
_RECOVERY_PATTERN = re.compile(f"[{RECOVERY_ALPHABET}]{{{RECOVERY_LENGTH}}}", re.ASCII)


def new_recovery_codes(n: int = 10) -> list[str]:
    """``n`` distinct single-use recovery codes of 120 random bits each, grouped by dashes."""
    if not 1 <= n <= 100:
        raise ValueError("n must be 1 to 100")
    codes: dict[str, None] = {}  # insertion-ordered set
    while len(codes) < n:
        symbols = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_LENGTH))
        groups = (symbols[i : i + RECOVERY_GROUP] for i in range(0, RECOVERY_LENGTH, RECOVERY_GROUP))
        codes["-".join(groups)] = None
    return list(codes)


def normalize_recovery_code(raw: str | None) -> str | None:
    """The canonical form of a typed recovery code (24 symbols, upper case, no dashes), or None.

    Accepts lower case, dashes and spaces, and reads O as 0 and I or L as 1 (Crockford).
    """
    if raw is None or len(raw) > _MAX_RECOVERY_INPUT or not raw.isascii():
        return None
    code = raw.translate(_RECOVERY_IGNORED).upper().translate(_RECOVERY_CONFUSABLES)
    return code if _RECOVERY_PATTERN.fullmatch(code) else None


def hash_recovery_code(pepper: bytes, user: str, code: str) -> str:
    """HMAC-SHA256(pepper, user NUL normalized code) in hex: what the store keeps.

    Keyed by a server-side pepper (a stolen store alone cannot test guesses) and bound to the
    user (one user's hash is useless for another). ValueError if the code is malformed, the user
    id is empty or has a NUL, or the pepper is shorter than 16 bytes.
    """
    if len(pepper) < 16:
        raise ValueError("the recovery-code pepper must be at least 16 bytes")
    if not user or "\x00" in user:
        raise ValueError("user id must be a non-empty string without NUL")
    normalized = normalize_recovery_code(code)
    if normalized is None:
        raise ValueError("malformed recovery code")
    message = user.encode("utf-8") + b"\x00" + normalized.encode("ascii")
    return hmac.new(pepper, message, hashlib.sha256).hexdigest()
