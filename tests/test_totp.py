"""gateway/totp.py against the RFC 4226 and RFC 6238 vectors, pyotp and the real oathtool."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest

from gateway.totp import (
    RECOVERY_ALPHABET,
    RECOVERY_LENGTH,
    TotpParams,
    code_at,
    current_step,
    hash_recovery_code,
    matching_step,
    new_recovery_codes,
    new_secret,
    normalize_recovery_code,
    parse_code,
    provisioning_uri,
)
from tests.conftest import need_binary


def b32(seed: bytes) -> str:
    return base64.b32encode(seed).decode("ascii").rstrip("=")


SEED_SHA1 = b32(b"12345678901234567890")
SEED_SHA256 = b32(b"12345678901234567890123456789012")
SEED_SHA512 = b32(b"1234567890123456789012345678901234567890123456789012345678901234")
SEEDS = {"SHA1": SEED_SHA1, "SHA256": SEED_SHA256, "SHA512": SEED_SHA512}

# RFC 6238 Appendix B: (time, algorithm, 8-digit TOTP), X = 30, T0 = 0.
RFC6238_VECTORS = [
    (59, "SHA1", "94287082"),
    (59, "SHA256", "46119246"),
    (59, "SHA512", "90693936"),
    (1111111109, "SHA1", "07081804"),
    (1111111109, "SHA256", "68084774"),
    (1111111109, "SHA512", "25091201"),
    (1111111111, "SHA1", "14050471"),
    (1111111111, "SHA256", "67062674"),
    (1111111111, "SHA512", "99943326"),
    (1234567890, "SHA1", "89005924"),
    (1234567890, "SHA256", "91819424"),
    (1234567890, "SHA512", "93441116"),
    (2000000000, "SHA1", "69279037"),
    (2000000000, "SHA256", "90698825"),
    (2000000000, "SHA512", "38618901"),
    (20000000000, "SHA1", "65353130"),
    (20000000000, "SHA256", "77737706"),
    (20000000000, "SHA512", "47863826"),
]

# RFC 4226 Appendix D: HOTP values for counters 0..9, secret "12345678901234567890".
RFC4226_VECTORS = [
    "755224",
    "287082",
    "359152",
    "969429",
    "338314",
    "254676",
    "287922",
    "162583",
    "399871",
    "520489",
]


@pytest.mark.parametrize(("now", "algorithm", "code"), RFC6238_VECTORS)
def test_rfc6238_vectors(now: int, algorithm: str, code: str) -> None:
    params = TotpParams(digits=8, algorithm=algorithm, window=0)
    assert matching_step(SEEDS[algorithm], code, now, params) == now // 30
    assert code_at(SEEDS[algorithm], now // 30, params) == code


@pytest.mark.parametrize(("counter", "code"), list(enumerate(RFC4226_VECTORS)))
def test_rfc4226_vectors(counter: int, code: str) -> None:
    assert code_at(SEED_SHA1, counter, TotpParams()) == code


def test_rfc6238_wrong_code_or_algorithm_does_not_match() -> None:
    assert matching_step(SEED_SHA1, "94287083", 59, TotpParams(digits=8, window=0)) is None
    # The SHA1 code under SHA256 parameters is another code.
    assert matching_step(SEED_SHA256, "94287082", 59, TotpParams(digits=8, algorithm="SHA256")) is None


def test_window_accepts_neighbouring_steps_and_returns_the_step() -> None:
    params = TotpParams(window=1)
    now = 1_700_000_015.5
    t = current_step(now, params)
    assert t == 1_700_000_015 // 30
    for offset in (-1, 0, 1):
        assert matching_step(SEED_SHA1, code_at(SEED_SHA1, t + offset, params), now, params) == t + offset
    for offset in (-3, -2, 2, 3):
        code = code_at(SEED_SHA1, t + offset, params)
        if code not in {code_at(SEED_SHA1, t + k, params) for k in (-1, 0, 1)}:
            assert matching_step(SEED_SHA1, code, now, params) is None


def test_window_zero_and_three() -> None:
    now = 1_700_000_000.0
    t = current_step(now, TotpParams())
    assert matching_step(SEED_SHA1, code_at(SEED_SHA1, t - 1, TotpParams()), now, TotpParams(window=0)) is None
    wide = TotpParams(window=3)
    assert matching_step(SEED_SHA1, code_at(SEED_SHA1, t - 3, wide), now, wide) == t - 3


def test_step_boundaries_and_period() -> None:
    params = TotpParams(period=60)
    assert current_step(59.999, params) == 0
    assert current_step(60, params) == 1
    # Near the epoch the window does not reach negative steps.
    assert matching_step(SEED_SHA1, code_at(SEED_SHA1, 0, params), 1.0, params) == 0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            current_step(bad, params)


def test_matches_pyotp_totp() -> None:
    secret = new_secret()
    for algorithm, digest in (("SHA1", hashlib.sha1), ("SHA512", hashlib.sha512)):
        params = TotpParams(digits=8, period=45, algorithm=algorithm)
        reference = pyotp.TOTP(secret, digits=8, digest=digest, interval=45)
        for now in (0, 44, 45, 1_234_567_890, 4_000_000_000):
            assert code_at(secret, current_step(now, params), params) == reference.at(now)


def test_bad_secret_raises_value_error() -> None:
    with pytest.raises(ValueError):
        matching_step("not base32!", "123456", 0, TotpParams())
    with pytest.raises(ValueError):
        matching_step(b32(b"short"), "123456", 0, TotpParams())  # under 112 bits


@pytest.mark.parametrize("algorithm", ["SHA1", "SHA256", "SHA512"])
@pytest.mark.parametrize(("digits", "period"), [(6, 30), (8, 60), (7, 15)])
def test_agrees_with_oathtool(algorithm: str, digits: int, period: int) -> None:
    oathtool = need_binary("oathtool")
    secret = new_secret()
    params = TotpParams(digits=digits, period=period, algorithm=algorithm)
    for now in (59, 1_111_111_109, 1_700_000_000, 2_000_000_000):
        result = subprocess.run(
            [
                oathtool,
                f"--totp={algorithm}",
                "-b",
                "-d",
                str(digits),
                "-s",
                f"{period}s",
                "-N",
                f"@{now}",
                secret,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        code = result.stdout.strip()
        assert code == code_at(secret, current_step(now, params), params)
        assert matching_step(secret, code, now, params) == now // period


def test_params_validation() -> None:
    assert TotpParams() == TotpParams(digits=6, period=30, algorithm="SHA1", window=1)
    assert TotpParams().problems() == []
    for kwargs, field in [
        ({"digits": 5}, "digits"),
        ({"digits": 9}, "digits"),
        ({"digits": True}, "digits"),
        ({"period": 10}, "period"),
        ({"period": 121}, "period"),
        ({"algorithm": "MD5"}, "algorithm"),
        ({"algorithm": "sha1"}, "algorithm"),
        ({"window": -1}, "window"),
        ({"window": 4}, "window"),
    ]:
        with pytest.raises(ValueError, match=rf"^{field}: "):
            TotpParams(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"digits: .*; window: "):
        TotpParams(digits=4, window=9)


def test_new_secret() -> None:
    secret = new_secret()
    assert len(secret) == 32 and "=" not in secret
    assert len(base64.b32decode(secret)) == 20  # 160 bits
    assert new_secret() != secret


@pytest.mark.parametrize(
    "raw",
    [
        "\uff11\uff12\uff13\uff14\uff15\uff16",
        "12345",
        "1234567",
        "12 3456",
        "123456\x00",
        "-12345",
        "+123456",
        "12345a",
        "\u0663\u0662\u0661\u0664\u0665\u0666",
        "",
        " ",
        "1" * 10_000,
        " " * 10_000 + "123456",
        None,
    ],
)
def test_parse_code_rejects(raw: str | None) -> None:
    assert parse_code(raw, 6) is None


def test_parse_code_accepts() -> None:
    assert parse_code("123456", 6) == "123456"
    assert parse_code(" 012345\n", 6) == "012345"
    assert parse_code("12345678", 8) == "12345678"
    assert parse_code("123456", 8) is None
    with pytest.raises(ValueError):
        parse_code("123456", 12)


def test_provisioning_uri_format_and_round_trip() -> None:
    secret = new_secret()
    uri = provisioning_uri(secret, "alice@example.com", "Example Co", TotpParams())
    assert uri == f"otpauth://totp/Example%20Co:alice%40example.com?secret={secret}&issuer=Example%20Co"
    # Same URI as pyotp's for default parameters.
    assert uri == pyotp.TOTP(secret).provisioning_uri(name="alice@example.com", issuer_name="Example Co")
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert (parsed.secret, parsed.name, parsed.issuer) == (secret, "alice@example.com", "Example Co")


def test_provisioning_uri_non_defaults_and_encoding() -> None:
    secret = new_secret()
    params = TotpParams(digits=8, period=60, algorithm="SHA256")
    uri = provisioning_uri(secret, "bob/ops & co?#", "Ex Ünïcode", params)
    parts = urlsplit(uri)
    assert parts.path.count("/") == 1 and "#" not in uri and "&" not in parts.path
    query = parse_qs(parts.query)
    assert query == {
        "secret": [secret],
        "issuer": ["Ex Ünïcode"],
        "algorithm": ["SHA256"],
        "digits": ["8"],
        "period": ["60"],
    }
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert (parsed.name, parsed.issuer, parsed.digits, parsed.interval) == (
        "bob/ops & co?#",
        "Ex Ünïcode",
        8,
        60,
    )
    assert parsed.at(1_700_000_000) == code_at(secret, current_step(1_700_000_000, params), params)


@pytest.mark.parametrize(("account", "issuer"), [("a:b", "Ex"), ("alice", "Ex:Co"), ("", "Ex"), ("alice", "")])
def test_provisioning_uri_rejects_colons_and_empty(account: str, issuer: str) -> None:
    with pytest.raises(ValueError):
        provisioning_uri(new_secret(), account, issuer, TotpParams())


def test_recovery_codes_shape_and_entropy() -> None:
    codes = new_recovery_codes()
    assert len(codes) == 10 and len(set(codes)) == 10
    assert len(RECOVERY_ALPHABET) == 32 and len(set(RECOVERY_ALPHABET)) == 32
    assert len(RECOVERY_ALPHABET) ** RECOVERY_LENGTH >= 2**112
    for code in codes:
        groups = code.split("-")
        assert [len(g) for g in groups] == [4] * 6
        assert set("".join(groups)) <= set(RECOVERY_ALPHABET)
        assert normalize_recovery_code(code) == code.replace("-", "")
    assert len(new_recovery_codes(3)) == 3
    for bad in (0, 101):
        with pytest.raises(ValueError):
            new_recovery_codes(bad)


def test_normalize_recovery_code() -> None:
    canonical = "0123456789ABCDEFGHJKMNPQ"
    assert normalize_recovery_code("0123-4567-89ab-cdef-ghjk-mnpq") == canonical
    assert normalize_recovery_code(" 0123 4567 89AB CDEF GHJK MNPQ ") == canonical
    assert normalize_recovery_code("o123-4567-89AB-CDEF-GHJK-MNPQ") == canonical
    assert normalize_recovery_code("OI23-4567-89AB-CDEF-GHJK-MNPQ") == "01" + canonical[2:]
    assert normalize_recovery_code("Ol23-4567-89AB-CDEF-GHJK-MNPQ") == "01" + canonical[2:]
    for bad in [
        None,
        "",
        "0123-4567-89AB-CDEF-GHJK-MNP",
        "0123-4567-89AB-CDEF-GHJK-MNPQR",
        "U123-4567-89AB-CDEF-GHJK-MNPQ",
        "0123_4567-89AB-CDEF-GHJK-MNPQ",
        "\uff10123-4567-89AB-CDEF-GHJK-MNPQ",
        "0123-4567-89AB-CDEF-GHJK-MNPQ\x00",
        "-" * 10_000 + canonical,
    ]:
        assert normalize_recovery_code(bad) is None


def test_hash_recovery_code_is_keyed_and_user_bound() -> None:
    pepper, other_pepper = b"p" * 32, b"q" * 32
    code = new_recovery_codes(1)[0]
    digest = hash_recovery_code(pepper, "alice", code)
    expected = hmac.new(pepper, b"alice\x00" + code.replace("-", "").encode(), hashlib.sha256).hexdigest()
    assert digest == expected and len(digest) == 64
    assert hash_recovery_code(pepper, "alice", code.lower().replace("-", " ")) == digest
    assert hash_recovery_code(other_pepper, "alice", code) != digest
    assert hash_recovery_code(pepper, "bob", code) != digest
    for args in [
        (b"short", "alice", code),
        (pepper, "", code),
        (pepper, "a\x00b", code),
        (pepper, "alice", "not a code"),
    ]:
        with pytest.raises(ValueError):
            hash_recovery_code(*args)


def test_one_secret_under_every_digits_and_algorithm() -> None:
    """Prepared HOTPs are kept per secret (issue 10: a flood of codes must not rebuild one per
    code); what is kept must still depend on digits and algorithm, and a bad secret is refused
    every time, never remembered as good."""
    secret = new_secret()
    for algorithm, digest in (("SHA1", hashlib.sha1), ("SHA256", hashlib.sha256), ("SHA512", hashlib.sha512)):
        for digits in (6, 7, 8):
            params = TotpParams(digits=digits, algorithm=algorithm)
            reference = pyotp.HOTP(secret, digits=digits, digest=digest)
            for step in (0, 1, 56_666_666):
                assert code_at(secret, step, params) == reference.at(step)
    for _ in range(2):
        with pytest.raises(ValueError):
            code_at(b32(b"short"), 1, TotpParams())
