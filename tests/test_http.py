"""gateway/http.py in-process: the HTTP rules the gateway reads in more than one place."""

from __future__ import annotations

import string

import pytest
from cryptography.fernet import Fernet
from starlette.types import Message

from gateway.config import ENV_KEYS, ENV_PEPPER, parse
from gateway.errors import Reason
from gateway.hosts import MalformedHost
from gateway.http import TCHARS, is_token, negotiate, request_origin, wants_html
from gateway.proxy import Forwarder
from gateway.responses import send_denial

# Accept values a browser navigating sends (Firefox, Chrome, Safari) and a few a program sends.
_FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
_CHROME = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,"
    "*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (_FIREFOX, True),
        (_CHROME, True),
        ("text/html", True),
        ("TEXT/HTML", True),  # RFC 9110 §8.3.1: media types are case-insensitive
        ("text/*", True),
        # The disagreement issue 11 found: responses.wants_html (a substring test) said JSON,
        # inputs.negotiate (by q) said HTML. RFC 9110 §12.5.1: q decides.
        ("application/json;q=0.1, text/html", True),
        ("application/json;q=0.1, text/html" + ", a/b" * 60, True),  # too long to cache: parsed
        (None, False),
        ("", False),
        ("*/*", False),  # fetch() and curl: a tie, and JSON wins a tie
        ("application/json", False),
        ("text/html, application/json", False),  # a tie
        ("text/html;q=0.5, application/json", False),
        ("text/html;q=0", False),  # q=0 is "not acceptable" (§12.4.2), not a preference
        ("text/html;q=nan", False),
        ("application/xhtml+xml", False),
    ],
)
def test_wants_html(accept: str | None, html: bool) -> None:
    assert wants_html(accept) is html


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, "application/json"),
        ("image/png", "image/png"),
        ("image/*;q=0.5, text/html;q=0.4", "image/png"),
        ("text/html, image/*", "image/png"),  # a tie goes to the first offer in order
        ("image/png;q=0, */*", "application/json"),  # the specific range beats */*
        ("text/plain", "application/json"),  # nothing matches: the first offer
        ("," * 100 + "text/html", "application/json"),  # ranges past the 32nd are not read
    ],
)
def test_negotiate(accept: str | None, chosen: str) -> None:
    assert negotiate(accept, ("application/json", "image/png", "text/html")) == chosen


async def _denial(accept: str) -> tuple[int, dict[bytes, bytes]]:
    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    await send_denial(send, Reason.CODE_REQUIRED, accept)
    return messages[0]["status"], dict(messages[0]["headers"])


async def test_denial_follows_the_same_rule() -> None:
    # The denial page (proxy and forward-auth modes) and the enrolment pages read Accept alike.
    _, html = await _denial("application/json;q=0.1, text/html")
    assert html[b"content-type"].startswith(b"text/html")
    _, program = await _denial("text/html;q=0, application/json")
    assert program[b"content-type"] == b"application/json"


def test_tchars_are_rfc_9110() -> None:
    # RFC 9110 §5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
    # "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
    assert frozenset("!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters) == TCHARS
    assert [chr(i) for i in range(256) if is_token(chr(i))] == sorted(TCHARS)


@pytest.mark.parametrize(
    ("value", "token"),
    [("GET", True), ("X-2FA-Code", True), ("M-SEARCH", True), ("", False), ("GET ", False), ("a:b", False)]
    + [(f"a{c}b", False) for c in '"(),/:;<=>?@[\\]{}\x7f\x00é'],
)
def test_is_token(value: str, token: bool) -> None:
    assert is_token(value) is token


_H = [(b"host", b"gw.example")]


@pytest.mark.parametrize(
    ("headers", "scheme", "trusted", "origin"),
    [
        (_H, "http", False, "http://gw.example"),
        (_H, "wss", False, "https://gw.example"),
        (
            [*_H, (b"x-forwarded-host", b"app.example"), (b"x-forwarded-proto", b"https")],
            "http",
            True,
            "https://app.example",
        ),
        # From a peer that is not a trusted proxy, X-Forwarded-* are the client's own words.
        (
            [*_H, (b"x-forwarded-host", b"evil.example"), (b"x-forwarded-proto", b"https")],
            "http",
            False,
            "http://gw.example",
        ),
        ([*_H, (b"x-forwarded-host", b"")], "http", True, "http://gw.example"),
        # Where proxy.py and forward_auth.py disagreed before (proxy.py took any value, the
        # last of duplicates, and "localhost" without a Host; forward_auth.py validated and took
        # the first): now one rule, and what cannot be told safely is "" (a relative Location).
        ([], "http", False, ""),
        ([*_H, (b"x-forwarded-host", b"evil.example/"), (b"x-forwarded-host", b"x")], "http", True, ""),
        ([*_H, (b"x-forwarded-host", b"a.example"), (b"x-forwarded-host", b"b.example")], "http", True, ""),
        ([*_H, (b"x-forwarded-proto", b"https"), (b"x-forwarded-proto", b"http")], "http", True, ""),
        ([*_H, (b"x-forwarded-proto", b"javascript")], "http", True, ""),
        ([*_H, (b"x-forwarded-host", b"a.example, b.example")], "http", True, ""),
        ([(b"host", b"user@evil.example")], "http", False, ""),
        ([(b"host", b"evil.example\\@gw.example")], "http", False, ""),
        ([(b"host", b"evil.example#")], "http", False, ""),
        (_H, "ftp", False, ""),
        # Twice the same is one story.
        (
            [*_H, (b"x-forwarded-host", b"a.example"), (b"x-forwarded-host", b"a.example")],
            "http",
            True,
            "http://a.example",
        ),
    ],
)
def test_request_origin(headers: list[tuple[bytes, bytes]], scheme: str, trusted: bool, origin: str) -> None:
    assert request_origin(headers, scheme, trusted) == origin


async def test_proxy_rewrites_location_with_the_same_rule() -> None:
    # proxy.py used to write whatever a trusted proxy said into the Location it rewrites; now a
    # host that request_origin would not write is refused before anything is forwarded.
    env = {ENV_KEYS: Fernet.generate_key().decode(), ENV_PEPPER: Fernet.generate_key().decode()}
    forwarder = Forwarder(parse({"upstream": {"url": "http://127.0.0.1:1"}}, env=env))
    try:
        scope = {"type": "http", "scheme": "http"}
        bad = [*_H, (b"x-forwarded-host", b"evil.example/phish?")]
        assert request_origin(bad, "http", True) == ""
        with pytest.raises(MalformedHost):
            forwarder.addressed({**scope, "headers": bad}, trusted=True)
        with pytest.raises(MalformedHost):
            forwarder.addressed({**scope, "headers": []}, trusted=False)
        good = [*_H, (b"x-forwarded-proto", b"https")]
        where = forwarder.addressed({**scope, "headers": good}, trusted=True)
        assert forwarder.public_origin(where) == b"https://gw.example"
        assert forwarder.public_origin(where).decode() == request_origin(good, "http", True)
    finally:
        await forwarder.aclose()
