from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import AmbiguousPath
from gateway.paths import ExcludeRule, Exclusions, _canonicalise, canonical_path, encode_path, parse_rule

# RFC 3986 §5.4.1 and §5.4.2, base "http://a/b/c/d;p?q": the merged path of each reference
# (§5.2.3) and the path §5.2.4 turns it into. The abnormal "../../../g" and "/../g", which the
# RFC clamps to "/g", are refused here instead (see test_refused).
RFC3986_DOT_SEGMENTS = [
    ("/b/c/g", "/b/c/g"),
    ("/b/c/./g", "/b/c/g"),
    ("/b/c/g/", "/b/c/g/"),
    ("/b/c/.", "/b/c/"),
    ("/b/c/./", "/b/c/"),
    ("/b/c/..", "/b/"),
    ("/b/c/../", "/b/"),
    ("/b/c/../g", "/b/g"),
    ("/b/c/../..", "/"),
    ("/b/c/../../", "/"),
    ("/b/c/../../g", "/g"),
    ("/./g", "/g"),
    ("/b/c/g.", "/b/c/g."),
    ("/b/c/.g", "/b/c/.g"),
    ("/b/c/g..", "/b/c/g.."),
    ("/b/c/..g", "/b/c/..g"),
    ("/b/c/./../g", "/b/g"),
    ("/b/c/./g/.", "/b/c/g/"),
    ("/b/c/g/./h", "/b/c/g/h"),
    ("/b/c/g/../h", "/b/c/h"),
    # §5.2.4's own walk-through
    ("/a/b/c/./../../g", "/a/g"),
]


@pytest.mark.parametrize(("merged", "expected"), RFC3986_DOT_SEGMENTS)
def test_rfc3986_dot_segments(merged: str, expected: str) -> None:
    assert canonical_path(merged) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/api/v1/users/42", "/api/v1/users/42"),
        ("/static/app.min.css", "/static/app.min.css"),
        ("/.well-known/acme-challenge/x", "/.well-known/acme-challenge/x"),
        ("/a/.../b", "/a/.../b"),
        ("//a///b//", "/a/b/"),
        ("/a/%2e/b", "/a/b"),
        ("/a/%2E%2e/b", "/b"),
        ("/%61%62c", "/abc"),
        ("/Case/Kept", "/Case/Kept"),
        ("/caf%C3%A9/%E2%82%AC", "/café/€"),
        ("/a%20b", "/a b"),
        ("/a%E2%80%A5", "/a\u2025"),  # NFKC "a..", which is not a dot segment
        ("/a%2Bb", "/a+b"),
        ("/a%40b:c", "/a@b:c"),
        ('/a"b|c', '/a"b|c'),  # not pchar, but not ambiguous either
        ("/a/b?x=1/../..", "/a/b"),  # a leftover query is split off
        ("/a/b?", "/a/b"),
    ],
)
def test_canonical(raw: str, expected: str) -> None:
    assert canonical_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "a/b",
        "*",
        "http://evil/x",
        "?/a",
        "/..",
        "/../g",
        "/b/c/../../../g",
        "/a/%2e%2e/%2e%2e",
        "/a/%2F/b",
        "/a%2fb",
        "/a%5Cb",
        "/a%5cb",
        "/a\\b",
        "/a;b",
        "/a%3Bb",
        "/a%3bb",
        "/a%00b",
        "/a\x00b",
        "/a%0ab",
        "/a%0D%0Ab",
        "/a\r\nb",
        "/a%09b",
        "/a\tb",
        "/a%7fb",
        "/a\x7fb",
        "/a%1fb",
        "/a b",
        "/a%252e",
        "/a%25",
        "/a%zz",
        "/a%4",
        "/a%",
        "/a%g0",
        "/a#b",
        "/a%23b",
        "/a%3Fb",
        "/caf\xc3\xa9",  # raw UTF-8 bytes, as latin-1 decoding of raw_path yields them
        "/café",
        "/a%C3",  # truncated UTF-8
        "/a%c0%ae",  # overlong '.'
        "/a%ed%a0%80",  # encoded surrogate
        "/a%C2%85b",  # U+0085 NEL, a C1 control
        "/a/%EF%BC%8E%EF%BC%8E/b",  # U+FF0E FULLWIDTH FULL STOP twice, NFKC ".."
        "/a%EF%BC%8Fb",  # fullwidth solidus
        "/a%EF%BC%BCb",  # fullwidth reverse solidus
        "/a/%E2%80%A5/b",  # U+2025 TWO DOT LEADER, NFKC ".."
        "/a/%E2%80%A4/b",  # U+2024 ONE DOT LEADER, NFKC "."
        "/a//../b",
        "/admin//../public/x",
    ],
)
def test_refused(raw: str) -> None:
    with pytest.raises(AmbiguousPath) as info:
        canonical_path(raw)
    # The message is generic: it must never echo what the client sent.
    if len(raw) > 3:
        assert raw not in str(info.value)


EXCLUSIONS = Exclusions(parse_rule(rule) for rule in ["/public/*", "/healthz", "GET /api/public/*"])

BYPASS_CORPUS = [
    ("GET", "/public/../admin"),
    ("GET", "/public/%2e%2e/admin"),
    ("GET", "/public/%2E%2E/admin"),
    ("GET", "/public/.%2e/admin"),
    ("GET", "/public/%2e./admin"),
    ("GET", "//admin"),
    ("GET", "/public/..;/admin"),
    ("GET", "/public;/../admin"),
    ("GET", "/public/%2e%2e%2fadmin"),
    ("GET", "/public/..%2fadmin"),
    ("GET", "/public/..%5cadmin"),
    ("GET", "/public\\..\\admin"),
    ("GET", "/public/%252e%252e/admin"),
    ("GET", "/public/%c0%ae%c0%ae/admin"),
    ("GET", "/public/..%00/admin"),
    ("GET", "/public%00/x"),
    ("GET", "/Public/x"),
    ("GET", "/PUBLIC/a.css"),
    ("GET", "/healthz/"),
    ("GET", "/Healthz"),
    ("GET", "/healthz/../admin"),
    ("GET", "/healthz;/x"),
    ("GET", "/public"),
    ("GET", "/public-admin"),
    ("GET", "/publicx/y"),
    ("POST", "/api/public/x"),
    ("get", "/api/public/x"),
    ("GET", "/api/public"),
    ("GET", "/./public/../admin"),
    ("GET", "/public/./../admin"),
    ("GET", "/public/%2e/%2e%2e/admin"),
    ("GET", "/public/x/../../admin"),
    ("GET", "/%2fadmin"),
    ("GET", "/admin%23/public"),
    ("GET", "/admin%3f/public"),
    ("GET", "/admin%3F/../public/x"),
    ("GET", "/admin//../public/x"),
    ("GET", "/public/%EF%BC%8E%EF%BC%8E/admin"),
    ("GET", "/admin/..%2fpublic/x"),
    ("GET", "/%70ublic"),
    ("GET", "/public%2f"),
]


@pytest.mark.parametrize(("method", "raw"), BYPASS_CORPUS)
def test_bypass_corpus_is_not_excluded(method: str, raw: str) -> None:
    try:
        path = canonical_path(raw)
    except AmbiguousPath:
        return
    assert not EXCLUSIONS.matches(method, path), path


@pytest.mark.parametrize(
    ("method", "raw", "canonical"),
    [
        ("GET", "/public/a.css", "/public/a.css"),
        ("POST", "/public/a.css", "/public/a.css"),
        ("GET", "/public/", "/public/"),
        ("GET", "/public//a.css", "/public/a.css"),
        ("GET", "/public/./a.css", "/public/a.css"),
        ("GET", "/public/x/../a.css", "/public/a.css"),
        ("GET", "/public/%61.css", "/public/a.css"),
        ("GET", "/public/deep/er/x", "/public/deep/er/x"),
        ("GET", "/healthz", "/healthz"),
        ("DELETE", "/healthz", "/healthz"),
        ("GET", "/api/public/x", "/api/public/x"),
        ("HEAD", "/api/public/x", "/api/public/x"),
        ("GET", "/api/public/", "/api/public/"),
        ("GET", "/%70ublic/a", "/public/a"),
    ],
)
def test_excluded(method: str, raw: str, canonical: str) -> None:
    path = canonical_path(raw)
    assert path == canonical
    assert EXCLUSIONS.matches(method, path)


def test_head_rule_does_not_cover_get() -> None:
    exclusions = Exclusions([parse_rule("HEAD /x")])
    assert exclusions.matches("HEAD", "/x")
    assert not exclusions.matches("GET", "/x")


def test_rules_on_the_same_path_combine() -> None:
    exclusions = Exclusions([parse_rule("POST /x/*"), parse_rule("PUT /x/*"), parse_rule("GET /y")])
    assert exclusions.matches("POST", "/x/a")
    assert exclusions.matches("PUT", "/x/")
    assert not exclusions.matches("GET", "/x/a")
    assert not exclusions.matches("POST", "/y")


def test_root_prefix_excludes_everything() -> None:
    exclusions = Exclusions([parse_rule("OPTIONS /*")])
    assert exclusions.matches("OPTIONS", "/")
    assert exclusions.matches("OPTIONS", "/a/b/c")
    assert not exclusions.matches("GET", "/a")


def test_no_rules_excludes_nothing() -> None:
    exclusions = Exclusions([])
    assert not exclusions.matches("GET", "/")
    assert not exclusions.matches("GET", "/public/a")


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("/healthz", ExcludeRule(None, "/healthz", False)),
        ("  /healthz  ", ExcludeRule(None, "/healthz", False)),
        ("/static/*", ExcludeRule(None, "/static/", True)),
        ("/*", ExcludeRule(None, "/", True)),
        ("/docs/", ExcludeRule(None, "/docs/", False)),
        ("GET /api/public/*", ExcludeRule("GET", "/api/public/", True)),
        ("GET\t/x", ExcludeRule("GET", "/x", False)),
        ("M-SEARCH /x", ExcludeRule("M-SEARCH", "/x", False)),
        ("/café/*", ExcludeRule(None, "/café/", True)),
        ("/caf%C3%A9", ExcludeRule(None, "/café", False)),
        ("/a%2Ab", ExcludeRule(None, "/a*b", False)),
    ],
)
def test_parse_rule(text: str, rule: ExcludeRule) -> None:
    assert parse_rule(text) == rule


def test_rule_str_round_trips() -> None:
    for text in ["/healthz", "/static/*", "GET /api/public/*", "/caf%C3%A9/*"]:
        assert str(parse_rule(text)) == text
        assert parse_rule(str(parse_rule(text))) == parse_rule(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", 'is not "/path"'),
        ("GET/api", 'is not "/path"'),
        ("healthz", 'is not "/path"'),
        ("GET", 'is not "/path"'),
        ("GET /a /b", 'is not "/path"'),
        ("GET,HEAD /x", "one method per rule"),
        ("G(T /x", "not an HTTP method token"),
        ("get /x", 'methods are case-sensitive (RFC 9110 §9.1), write "GET"'),
        ("/static*", '"*" is only allowed as a final "/*"'),
        ("/*/x", '"*" is only allowed as a final "/*"'),
        ("/a/**", '"*" is only allowed as a final "/*"'),
        ("/a/../b", 'is not canonical: it means "/b"'),
        ("/a//b/*", 'is not canonical: it means "/a/b/"'),
        ("/a/./b", 'is not canonical: it means "/a/b"'),
        ("/a?b", 'is not canonical: it means "/a"'),
        ("/..", "is refused as a request path"),
        ("/a;b", "is refused as a request path"),
        ("/a%2Fb", "is refused as a request path"),
        ("/a%zz", "is refused as a request path"),
        ("/a\\b", "is refused as a request path"),
    ],
)
def test_parse_rule_errors(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rule(text)
    assert reason in str(info.value)


def test_encode_path() -> None:
    assert encode_path("/api/v1/users/42") == "/api/v1/users/42"
    assert encode_path("/a b/café/100%/a?b#c") == "/a%20b/caf%C3%A9/100%25/a%3Fb%23c"
    assert encode_path("/a:b@c!$&'()*+,=-._~") == "/a:b@c!$&'()*+,=-._~"
    assert encode_path("/a;b") == "/a%3Bb"


def _is_safe_segment(segment: str) -> bool:
    if segment in (".", ".."):
        return False
    compat = unicodedata.normalize("NFKC", segment)
    if compat in (".", ".."):
        return False
    return not any(c in "/\\;%?#" or unicodedata.category(c) == "Cc" for c in segment + compat)


SEGMENTS = st.text(
    alphabet=st.characters(codec="utf-8"),  # no lone surrogates
    min_size=1,
    max_size=8,
).filter(_is_safe_segment)

CANONICAL_PATHS = st.builds(
    lambda segments, slash: "/" + "/".join(segments) + ("/" if slash and segments else ""),
    st.lists(SEGMENTS, max_size=6),
    st.booleans(),
)


@given(CANONICAL_PATHS)
def test_encode_path_round_trips(path: str) -> None:
    encoded = encode_path(path)
    assert encoded.isascii()
    assert canonical_path(encoded) == path


# Wire-like paths built from the characters that matter, to hunt for disagreements.
WIRE_PATHS = st.text(alphabet="/.%2eEfF5cC3bB;\\?#aé0", max_size=24).map(lambda s: "/" + s)


@given(WIRE_PATHS)
def test_canonical_is_a_fixed_point(raw: str) -> None:
    try:
        path = canonical_path(raw)
    except AmbiguousPath:
        return
    assert path.startswith("/")
    assert "//" not in path
    assert all(segment not in (".", "..") for segment in path.split("/"))
    assert canonical_path(encode_path(path)) == path


@given(st.from_regex(r"/(?:[A-Za-z0-9\-._~!$&'()*+,=:@]{1,6}/?){0,6}", fullmatch=True))
def test_fast_path_agrees_with_slow_path(raw: str) -> None:
    try:
        expected: str | None = _canonicalise(raw)
    except AmbiguousPath:
        expected = None
    try:
        actual: str | None = canonical_path(raw)
    except AmbiguousPath:
        actual = None
    assert actual == expected
