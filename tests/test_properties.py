"""Properties of the pure parsers, checked by Hypothesis against reference models written here
(issue 14 §2). tests/test_paths.py holds the example-based cases and the round trip of
generated canonical paths; this file reads *wire* paths the way a textbook server would and
holds the gateway to it."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.targets import rfc3986_reading
from gateway import config as config_module
from gateway.config import JwtConfig
from gateway.config_keys import TABLES
from gateway.errors import AmbiguousPath, ConfigError
from gateway.inputs import safe_target
from gateway.paths import ExcludeRule, Exclusions, canonical_path, encode_path, parse_rule
from gateway.tables import declared
from gateway.totp import parse_code

FAST = settings(max_examples=300, deadline=None)

# -- paths ------------------------------------------------------------------------------------------

# Pieces of wire paths: the spellings of dots, slashes and delimiters that servers disagree on,
# and plain and non-ASCII segments, raw and encoded.
PIECES = st.sampled_from(
    [
        "/", "//", ".", "..", "%2e", "%2E%2e", ".%2e", "a", "B", "~x", "%41", "%C3%A9", "%EF%BC%8E",
        "%2f", "%5C", "%00", "%25", "%252e", ";", "%3B", "?", "#", "\\", "é", " ", "%c0%ae", "%", "%zz",
        "*", "@", ":", "!",
    ]
)  # fmt: skip
WIRE = st.lists(PIECES, max_size=12).map(lambda pieces: "/" + "".join(pieces))


def _accepted(raw: str) -> str | None:
    try:
        return canonical_path(raw)
    except AmbiguousPath:
        return None


@FAST
@given(WIRE)
def test_canonical_form_is_what_a_textbook_server_reads(raw: str) -> None:
    path = _accepted(raw)
    if path is None:
        return
    assert path == rfc3986_reading(raw, merge_slashes=True)
    assert "//" not in path
    assert all(segment not in (".", "..") for segment in path.split("/"))


@FAST
@given(WIRE)
def test_canonicalisation_is_idempotent(raw: str) -> None:
    path = _accepted(raw)
    if path is None:
        return
    # The canonical form is itself a wire path when it is ASCII; else its encoding is.
    assert canonical_path(path if path.isascii() else encode_path(path)) == path
    assert canonical_path(encode_path(path)) == path
    # What the upstream is sent reads back, by the textbook, as exactly what was checked.
    assert rfc3986_reading(encode_path(path), merge_slashes=False) == path


@FAST
@given(st.lists(PIECES, max_size=10))
def test_an_accepted_path_leaves_the_checked_directory_only_by_climbing(pieces: list[str]) -> None:
    raw = "/public/" + "".join(pieces)
    path = _accepted(raw)
    if path is None or path.startswith("/public/"):
        return
    # Outside /public/: only a ".." segment (raw or encoded) can have taken it there.
    decoded = unquote_to_bytes(raw.partition("?")[0]).decode("utf-8")
    assert ".." in decoded.split("/"), f"{raw!r} became {path!r}"


@FAST
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=24).map(lambda s: "/" + s))
def test_any_latin1_path_is_canonical_or_refused(raw: str) -> None:
    path = _accepted(raw)  # AmbiguousPath is the only refusal: anything else fails here
    if path is not None:
        assert path == rfc3986_reading(raw, merge_slashes=True)


# -- return targets ---------------------------------------------------------------------------------

# Visible ASCII, with the characters encode_path writes as %XX ('"', '<', '}', '|', '^' ...), in
# runs long enough that re-encoding can take a target past the 2,048-character bound.
RETURN_TARGETS = st.tuples(
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=6), st.integers(1, 700)
).map(lambda piece: ("/" + piece[0] * piece[1])[:2048])


@FAST
@given(st.one_of(RETURN_TARGETS, st.text(max_size=40)))
def test_safe_target_is_a_fixed_point(raw: str) -> None:
    # The verify page hands its target on (a form field, a login_url's {next}) and reads it back
    # with safe_target: what it answered once must pass again unchanged, or the user lands on "/".
    target = safe_target(raw)
    assert len(target) <= 2048
    assert safe_target(target) == target


def test_a_target_that_grows_past_the_bound_when_encoded_is_refused() -> None:
    raw = "/" + "}" * 1000  # 1,001 characters; encoded, "%7D" each: 3,001
    assert safe_target(raw) == "/"


# -- exclusion rules --------------------------------------------------------------------------------

SEGMENT = st.sampled_from(["a", "b", "ab", "é"])
RULE_PATH = st.lists(SEGMENT, max_size=3).map(lambda s: "/" + "/".join(s))
METHOD = st.sampled_from([None, "GET", "HEAD", "POST"])


@st.composite
def rules(draw: st.DrawFn) -> str:
    """A rule in paths.py's grammar: ``[METHOD ]/path`` or ``[METHOD ]/path/*``."""
    path = draw(RULE_PATH)
    if draw(st.booleans()):
        path = path.rstrip("/") + "/*"
    method = draw(METHOD)
    return path if method is None else f"{method} {path}"


def _model_excluded(rules: list[ExcludeRule], method: str, path: str) -> bool:
    """The documented grammar, read literally: an exact rule is that path, a prefix rule is its
    path and everything below it; a method-less rule is every method, GET also covers HEAD."""
    for rule in rules:
        method_ok = rule.method in (None, method) or (rule.method == "GET" and method == "HEAD")
        path_ok = path.startswith(rule.path) if rule.prefix else path == rule.path
        if method_ok and path_ok:
            return True
    return False


@FAST
@given(
    st.lists(rules(), max_size=6),
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "get"]),
    st.tuples(RULE_PATH, st.booleans()).map(lambda p: p[0] + ("/" if p[1] and p[0] != "/" else "")),
)
def test_exclusions_agree_with_the_reference_model(texts: list[str], method: str, path: str) -> None:
    parsed = [parse_rule(text) for text in texts]
    assert Exclusions(parsed).matches(method, path) == _model_excluded(parsed, method, path)


# -- codes ------------------------------------------------------------------------------------------

CODE_TEXT = st.text(
    alphabet=st.sampled_from(
        [*"0123456789 \t\r\n\x0b\x0c+-.a", "\u0663", "\uff13", "\u00a0", "\u2003", "\U0001d7d7", "\u00b2"]
    ),
    max_size=12,
)


@FAST
@given(st.sampled_from([6, 8]), st.one_of(CODE_TEXT, st.text(max_size=70)))
def test_parse_code_accepts_exactly_the_configured_ascii_digits(digits: int, raw: str) -> None:
    # totp.parse_code's documented rule: surrounding ASCII whitespace (space, tab, CR, LF) is
    # dropped; what is left must be exactly `digits` ASCII digits.
    stripped = raw.strip(" \t\r\n")
    expected = stripped if len(raw) <= 64 and re.fullmatch(rf"[0-9]{{{digits}}}", stripped, re.ASCII) else None
    assert parse_code(raw, digits) == expected


@FAST
@given(st.sampled_from([6, 8]), st.data())
def test_parse_code_accepts_every_padded_code(digits: int, data: st.DataObject) -> None:
    code = data.draw(st.from_regex(rf"\A[0-9]{{{digits}}}\Z", fullmatch=True))
    pad = st.text(alphabet=" \t\r\n", max_size=3)
    raw = data.draw(pad) + code + data.draw(pad)
    assert parse_code(raw, digits) == code


@pytest.mark.parametrize(
    "raw",
    [
        "\u0661\u0662\u0663\u0664\u0665\u0666",
        "\uff11\uff12\uff13\uff14\uff15\uff16",
        "12345\u0666",
        "12345\uff16",
        "123 456",
        "+123456",
        "1234567",
    ],
)
def test_parse_code_refuses_look_alikes(raw: str) -> None:
    assert parse_code(raw, 6) is None


# -- config -----------------------------------------------------------------------------------------

_KEY_NAMES = {
    name: sorted({k for k, _, _ in declared(cls)} | {f"{k}_file" for k, _, _ in declared(cls)} | {"jwt", "unknown"})
    for name, cls in TABLES
}
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["", ".", "/", "/dev/null", "/etc", "\x00", "127.0.0.1/33", "redis://:pw@h:0/x", "GET /a/*", "HS256"]
    ),
    st.datetimes(),
    st.dates(),
    st.times(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)


# What a *_file key may name: nothing, a directory, a NUL, a binary file (the interpreter).
FILES = ["", "/nonexistent/x", "/etc", "\x00", "a\x00b", "/dev/null", sys.executable]
FILE_VALUES = st.sampled_from(FILES)


def _is_known(table: str, name: str) -> bool:
    try:
        config_module.parse({table: {name: "/nonexistent/x"}}, env={})
    except ConfigError as exc:
        return f"{table}.{name}: unknown key" not in "; ".join(exc.problems)
    return True


# The *_file keys the reader knows (the others are refused as unknown, whatever their value).
FILE_KEYS = [
    (table, name)
    for table, names in _KEY_NAMES.items()
    for name in names
    if name.endswith("_file") and _is_known(table, name)
] + [("identity.jwt", "secret_file"), ("identity.jwt", "public_key_file")]


@pytest.mark.parametrize(
    "value", FILES, ids=["empty", "missing", "directory", "nul", "inner-nul", "dev-null", "binary"]
)
@pytest.mark.parametrize(("table", "name"), FILE_KEYS, ids=[f"{t}.{n}" for t, n in FILE_KEYS])
def test_every_file_key_raises_only_config_error(table: str, name: str, value: str) -> None:
    # Every key also has a *_file spelling (or is told it has none): whatever file it names, a
    # NUL in the path or a file that is not UTF-8 text is a problem with that key, not a crash.
    document: dict[str, Any] = {table: {name: value}}
    if table == "identity.jwt":
        document = {"identity": {"mode": "jwt", "jwt": {name: value}}}
    with pytest.raises(ConfigError) as raised:
        config_module.parse(document, env={})
    assert raised.value.problems


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A parsed TOML document built from the real table and key names, with values of any type."""
    doc: dict[str, Any] = {}
    for table in draw(st.lists(st.sampled_from([*_KEY_NAMES, "nope"]), max_size=4, unique=True)):
        names = _KEY_NAMES.get(table, ["x"])
        if draw(st.booleans()):
            doc[table] = draw(VALUES)  # a table that is not one
            continue
        doc[table] = {
            name: draw(_value_for(name)) for name in draw(st.lists(st.sampled_from(names), max_size=4, unique=True))
        }
        if table == "identity" and draw(st.booleans()):
            doc[table]["mode"] = "jwt"
    return doc


def _value_for(name: str) -> st.SearchStrategy[Any]:
    if name == "jwt":
        jwt_names = st.sampled_from(sorted({k for k, _, _ in declared(JwtConfig)} | {"secret_file", "public_key_file"}))
        return st.dictionaries(jwt_names, st.one_of(VALUES, FILE_VALUES), max_size=4)
    return st.one_of(VALUES, FILE_VALUES) if name.endswith("_file") else VALUES


ENVIRONMENTS = st.fixed_dictionaries(
    {},
    optional={
        name: st.one_of(st.text(max_size=16), st.just(Fernet.generate_key().decode()))
        for name in (
            config_module.ENV_KEYS,
            config_module.ENV_PEPPER,
            config_module.ENV_JWT_SECRET,
            config_module.ENV_STORE_URL,
        )
    },
)


@settings(max_examples=400, deadline=None)
@given(documents(), ENVIRONMENTS)
def test_config_parse_raises_only_config_error(document: dict[str, Any], env: dict[str, str]) -> None:
    try:
        config_module.parse(document, env=env)
    except ConfigError as exc:
        assert exc.problems


TOML_TEXT = st.one_of(
    st.text(max_size=80),
    st.lists(
        st.sampled_from(
            ["[server]", "[identity.jwt]", "[[paths]]", "port = 0", "port = 1e9", "keys = ['x']", 'exclude = ["/a", 1]',
             "x = ", "a.b.c = 1", "trusted_proxies = '10.0.0.0/8'", "\x00", "url = \"sqlite:///\\u0000\""]
        ),
        max_size=6,
    ).map("\n".join),
)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(TOML_TEXT, st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_config_load_raises_only_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        config_module.load(path, env={})
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(problem, str) for problem in exc.problems)
