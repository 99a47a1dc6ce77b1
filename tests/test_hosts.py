"""gateway/hosts.py and the Host the upstream receives (issue 12 §1).

The unit tests hold the host grammar and the policy; the rest start a real gateway (uvicorn,
proxy mode) in front of the raw recorder (tests/support/recorder.py), which sees the head the
upstream client wrote on the wire, HTTP and WebSocket handshake alike: what the gateway
decided against what the upstream received. Hostile values are sent as raw bytes.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.hosts import HostPolicy, MalformedHost, addressed, origin_spellings, rewrite_origin, rewrite_refresh
from gateway.http import split_host
from tests.support.recorder import Answer, Received, Recorder, exchange
from tests.support.servers import GatewayServer, free_port, make_config

# -- the grammar -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("app.example", ("app.example", None)),
        ("APP.Example:8080", ("app.example", 8080)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
        ("[::1]", ("[::1]", None)),
        ("[2001:DB8::1]:443", ("[2001:db8::1]", 443)),
        ("under_score.example", ("under_score.example", None)),
        ("[0:0::1]:08443", ("[::1]", 8443)),  # RFC 5952: one text form per address
    ],
)
def test_split_host_takes_rfc3986_hosts(value: str, parsed: tuple[str, int | None]) -> None:
    assert split_host(value) == parsed


HOSTILE_HOSTS = [
    "",
    " ",
    "a b",
    "app.example ",
    "user@app.example",
    "evil.example/app.example",
    "evil.example\\app.example",
    "evil.example#",
    "evil.example?",
    "%65vil.example",
    "ëvil.example",
    "a,b",
    "a;b",
    "host:0",
    "host:99999",
    "host:",
    "host:8o",
    "host:+80",
    "[::1",
    "::1",
    "[::1]x",
    "[fe80::1%25eth0]",
    "[v1.x]",
    "1.2.3.256",
    ".",
    "x" * 254,
]


@pytest.mark.parametrize("value", HOSTILE_HOSTS)
def test_split_host_refuses_anything_else(value: str) -> None:
    assert split_host(value) is None


# -- the policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "scheme", "allowed"),
    [
        ("gw.example", "https", True),
        ("GW.EXAMPLE:443", "https", True),  # the default port may be given
        ("gw.example:80", "https", False),  # ... but not another one
        ("gw.example:8443", "https", False),
        ("app.example", "http", True),
        ("app.example:80", "http", True),
        ("app.example:443", "https", True),
        ("app.example:443", "http", False),
        ("other.example:8080", "http", True),
        ("other.example", "http", False),
        ("[::1]:9000", "http", True),
        ("evil.example", "https", False),
        ("gw.example.evil.example", "https", False),
        ("user@gw.example", "https", False),
        (None, "http", True),  # HTTP/1.0 without Host: the public host is sent for it
    ],
)
def test_policy_allows_public_url_and_allowed_hosts(host: str | None, scheme: str, allowed: bool) -> None:
    policy = HostPolicy("https://gw.example", ["app.example", "other.example:8080", "[::1]:9000"])
    assert policy.allows(host, scheme) is allowed


def test_policy_without_public_url_or_allowed_hosts_is_open() -> None:
    policy = HostPolicy(None, ())
    assert policy.open and policy.allows("anything.example:1", "http")


def test_policy_of_a_public_url_with_its_port() -> None:
    policy = HostPolicy("http://127.0.0.1:28080/", ())
    assert policy.allows("127.0.0.1:28080") and not policy.allows("127.0.0.1") and not policy.allows("localhost:28080")


@pytest.mark.parametrize(
    ("headers", "trusted", "version", "host", "scheme"),
    [
        ([(b"host", b"a.example")], False, "1.1", "a.example", "http"),
        ([(b"host", b"a.example"), (b"x-forwarded-host", b"evil.example")], False, "1.1", "a.example", "http"),
        ([(b"host", b"a.example"), (b"x-forwarded-host", b"b.example")], True, "1.1", "b.example", "http"),
        ([(b"host", b"a.example"), (b"x-forwarded-proto", b"https")], True, "1.1", "a.example", "https"),
        ([(b"host", b"a.example"), (b"x-forwarded-proto", b"https")], False, "1.1", "a.example", "http"),
        ([], False, "1.0", None, "http"),
    ],
)
def test_addressed(
    headers: list[tuple[bytes, bytes]], trusted: bool, version: str, host: str | None, scheme: str
) -> None:
    where = addressed(headers, "http", trusted, version)
    assert (where.host, where.scheme) == (host, scheme)


@pytest.mark.parametrize(
    "headers",
    [
        [],  # HTTP/1.1 without Host (RFC 9112 §3.2: 400)
        [(b"host", b"a.example"), (b"host", b"a.example")],
        [(b"host", b"a.example"), (b"host", b"b.example")],
        [(b"host", b"a.example"), (b"x-forwarded-host", b"b.example"), (b"x-forwarded-host", b"c.example")],
        [(b"host", b"a.example"), (b"x-forwarded-host", b"b.example, c.example")],
        [(b"host", b"a.example"), (b"x-forwarded-host", b"evil.example/x")],
        [(b"host", b"a.example"), (b"x-forwarded-proto", b"javascript")],
        [(b"host", b"a.example"), (b"x-forwarded-proto", b"https"), (b"x-forwarded-proto", b"http")],
        *([(b"host", value.encode("utf-8"))] for value in HOSTILE_HOSTS),
    ],
)
def test_addressed_refuses_a_missing_repeated_or_invalid_host(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedHost):
        addressed(headers, "http", True, "1.1")


# -- absolute URLs in answers ----------------------------------------------------------------

UP = origin_spellings("http", b"127.0.0.1", 8888)
UP80 = origin_spellings("http", b"up.internal", None)
UP6 = origin_spellings("HTTPS", b"::1", 443)
PUBLIC = b"https://gw.example"


@pytest.mark.parametrize(
    ("value", "origins", "rewritten"),
    [
        (b"http://127.0.0.1:8888/x?y=1#z", UP, b"https://gw.example/x?y=1#z"),
        (b"http://127.0.0.1:8888", UP, b"https://gw.example"),
        (b"http://127.0.0.1:8888?q", UP, b"https://gw.example?q"),
        (b"HTTP://127.0.0.1:8888/x", UP, b"https://gw.example/x"),
        (b"http://up.internal/x", UP80, b"https://gw.example/x"),
        (b"http://up.internal:80/x", UP80, b"https://gw.example/x"),
        (b"http://UP.internal/x", UP80, b"https://gw.example/x"),
        # Not the upstream's origin: left exactly as the app sent it.
        (b"http://127.0.0.1:8888@evil.example/", UP, b"http://127.0.0.1:8888@evil.example/"),
        (b"http://up.internal@evil.example/", UP80, b"http://up.internal@evil.example/"),
        (b"http://up.internal.evil.example/", UP80, b"http://up.internal.evil.example/"),
        (b"http://up.internal:8080/", UP80, b"http://up.internal:8080/"),
        (b"http://127.0.0.1:88889/", UP, b"http://127.0.0.1:88889/"),
        (b"http://up.internal\\evil.example/", UP80, b"http://up.internal\\evil.example/"),
        (b"//up.internal/x", UP80, b"//up.internal/x"),
        (b"//evil.example/", UP80, b"//evil.example/"),
        (b"https://up.internal/x", UP80, b"https://up.internal/x"),
        (b"/relative?x", UP80, b"/relative?x"),
        ("http://up.internal/é".encode(), UP80, "https://gw.example/é".encode()),
        ("http://up.internalé/".encode(), UP80, "http://up.internalé/".encode()),
        (b"", UP80, b""),
        (b"https://[::1]/x", UP6, b"https://gw.example/x"),
        (b"https://[::1]:443/x", UP6, b"https://gw.example/x"),
        (b"https://[::1]:4430/x", UP6, b"https://[::1]:4430/x"),
    ],
)
def test_rewrite_origin(value: bytes, origins: tuple[bytes, ...], rewritten: bytes) -> None:
    assert rewrite_origin(value, origins, PUBLIC) == rewritten


def test_rewrite_origin_to_a_relative_reference() -> None:
    assert rewrite_origin(b"http://up.internal/x", UP80, b"") == b"/x"
    assert rewrite_origin(b"http://up.internal", UP80, b"") == b"/"


@pytest.mark.parametrize(
    "rest", [b"//evil.example/x", b"/\\evil.example/x", b"/\t/evil.example/x", b"/\n\\evil.example"]
)
def test_rewrite_origin_never_makes_a_relative_reference_to_another_host(rest: bytes) -> None:
    # Made relative, these would be network-path references ("//evil"), or read as one by a
    # browser (WHATWG URL: "\\" is "/", tabs and newlines dropped): left as the app sent them.
    assert rewrite_origin(b"http://up.internal" + rest, UP80, b"") == b"http://up.internal" + rest
    assert rewrite_origin(b"http://up.internal" + rest, UP80, PUBLIC) == PUBLIC + rest


@pytest.mark.parametrize(
    ("value", "rewritten"),
    [
        (b"5; url=http://up.internal/x", b"5; url=https://gw.example/x"),
        (b"0;URL='http://up.internal/x'", b"0;URL='https://gw.example/x'"),
        (b'3, url="http://up.internal/"', b'3, url="https://gw.example/"'),
        (b"1; http://up.internal/x", b"1; https://gw.example/x"),
        (b"5", b"5"),  # no URL: refresh this page
        (b"5;", b"5;"),
        (b"5; url=http://up.internal@evil.example/", b"5; url=http://up.internal@evil.example/"),
        (b"5; url=//evil.example/", b"5; url=//evil.example/"),
        (b"soon; url=http://up.internal/", b"soon; url=http://up.internal/"),
    ],
)
def test_rewrite_refresh(value: bytes, rewritten: bytes) -> None:
    assert rewrite_refresh(value, UP80, PUBLIC) == rewritten


# -- through a real gateway ------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    server = Recorder().start()
    yield server
    server.stop()


def _gateway(tmp: Path, recorder: Recorder, upstream: dict[str, Any], **server: Any) -> GatewayServer:
    return GatewayServer(make_config(tmp, upstream={"url": recorder.url, **upstream}, server=server)).start()


@pytest.fixture(scope="module")
def passing(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """The defaults: pass_host, no public_url, no allowed_hosts; 127.0.0.1 a trusted peer."""
    gw = _gateway(tmp_path_factory.mktemp("passing"), recorder, {})
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def not_passing(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    gw = _gateway(tmp_path_factory.mktemp("not_passing"), recorder, {"pass_host": False})
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def policed(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """public_url and allowed_hosts set; the client an untrusted peer."""
    gw = _gateway(
        tmp_path_factory.mktemp("policed"),
        recorder,
        {},
        public_url="https://gw.example",
        allowed_hosts=["app.example:8080"],
        trusted_proxies=["10.255.255.1/32"],
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def fronted(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """Behind a trusted front proxy (127.0.0.1), with a public_url."""
    gw = _gateway(tmp_path_factory.mktemp("fronted"), recorder, {}, public_url="https://gw.example")
    yield gw
    gw.stop()


def ask(recorder: Recorder, gw: GatewayServer, data: bytes) -> tuple[Answer | None, list[Received]]:
    before = len(recorder.snapshot()[0])
    answer = exchange(gw.port, data)
    return answer, recorder.snapshot()[0][before:]


def request(*lines: str, version: str = "1.1", target: str = "/public/x") -> bytes:
    return (f"GET {target} HTTP/{version}\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode()


def upstream_of(recorder: Recorder) -> str:
    return f"127.0.0.1:{recorder.port}"


def test_the_client_host_reaches_the_upstream_once(passing: GatewayServer, recorder: Recorder) -> None:
    answer, got = ask(recorder, passing, request("Host: App.Example:8080", "X-Forwarded-For: 6.6.6.6"))
    assert answer is not None and answer.status == 200
    [received] = got
    # As checked (RFC 3986 §6.2.2: lower case), exactly once, and first (RFC 9110 §7.2).
    assert received.headers[0] == ("host", "app.example:8080")
    assert received.header("host") == ["app.example:8080"]
    assert received.header("x-forwarded-host") == ["app.example:8080"]
    assert received.header("x-forwarded-proto") == ["http"]
    assert received.header("x-forwarded-for") == ["6.6.6.6, 127.0.0.1"]  # a trusted peer: appended


def test_pass_host_false_sends_the_upstream_host(not_passing: GatewayServer, recorder: Recorder) -> None:
    answer, got = ask(recorder, not_passing, request("Host: app.example"))
    assert answer is not None and answer.status == 200
    [received] = got
    assert received.header("host") == [upstream_of(recorder)]
    assert received.header("x-forwarded-host") == ["app.example"]


def test_http10_without_host_gets_a_host(passing: GatewayServer, fronted: GatewayServer, recorder: Recorder) -> None:
    _, got = ask(recorder, passing, request(version="1.0"))
    assert [r.header("host") for r in got] == [[upstream_of(recorder)]]
    assert got[0].header("x-forwarded-host") == []
    _, got = ask(recorder, fronted, request(version="1.0"))
    assert [r.header("host") for r in got] == [["gw.example"]]


def _denied(answer: Answer | None, status: int, error: str) -> None:
    assert answer is not None and answer.status == status, answer
    assert json.loads(answer.body)["error"] == error


@pytest.mark.parametrize(
    "lines",
    [
        ["Host: a.example", "Host: a.example"],
        ["Host: a.example", "Host: evil.example"],
        [],
        *([f"Host: {value}"] for value in HOSTILE_HOSTS if value.strip() == value),
    ],
)
def test_a_malformed_host_reaches_nothing(passing: GatewayServer, recorder: Recorder, lines: list[str]) -> None:
    answer, got = ask(recorder, passing, request(*lines))
    _denied(answer, 400, "malformed_request")
    assert got == []


def test_a_malformed_host_in_raw_bytes_reaches_nothing(passing: GatewayServer, recorder: Recorder) -> None:
    for host in [b"\xff.example", b"a\x00b", b"a\tb", "\u0430pp.example".encode()]:
        answer, got = ask(recorder, passing, b"GET /public/x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert answer is None or answer.status == 400, host
        assert got == [], host


@pytest.mark.parametrize(
    "host", ["evil.example", "gw.example:80", "gw.example.evil.example", "app.example", "app.example:8081"]
)
def test_a_host_outside_the_policy_is_misdirected(policed: GatewayServer, recorder: Recorder, host: str) -> None:
    answer, got = ask(recorder, policed, request(f"Host: {host}"))
    _denied(answer, 421, "misdirected_request")
    assert got == []


@pytest.mark.parametrize("host", ["gw.example", "GW.example:443", "app.example:8080"])
def test_a_host_inside_the_policy_passes(policed: GatewayServer, recorder: Recorder, host: str) -> None:
    # An untrusted peer: its X-Forwarded-* are dropped, not believed.
    answer, got = ask(recorder, policed, request(f"Host: {host}", "X-Forwarded-Host: evil.example"))
    assert answer is not None and answer.status == 200
    [received] = got
    assert received.header("host") == [host.lower()]  # in the spelling the policy judged
    assert received.header("x-forwarded-host") == [host.lower()]
    assert received.header("x-forwarded-proto") == ["https"]  # public_url's scheme
    assert received.header("x-forwarded-for") == ["127.0.0.1"]


def test_no_forwarding_header_the_gateway_did_not_check_reaches_the_app(
    fronted: GatewayServer, passing: GatewayServer, recorder: Recorder
) -> None:
    # Attack (issue 12 review): a client's "Forwarded: host=evil" relayed by a trusted front made
    # the app build a password-reset link to evil.example, past the 421 of the host policy.
    smuggled = [
        "Forwarded: for=6.6.6.6;host=evil.example;proto=https",
        "X-Forwarded-Port: 8443",
        "X-Forwarded-Server: evil.example",
        "X-Forwarded-Scheme: https",
        "X-Forwarded-Ssl: on",
        "X-Real-IP: 6.6.6.6",
        "X-Original-Host: evil.example",
        "X-Host: evil.example",
        "X_Forwarded_Server: evil.example",
        "X-Scheme: https",
        "X-Forwarded-Protocol: https",
        "Client-IP: 6.6.6.6",
        "True-Client-IP: 6.6.6.6",
        "CF-Connecting-IP: 6.6.6.6",
    ]
    for gw in (fronted, passing):  # both trust 127.0.0.1
        answer, got = ask(recorder, gw, request("Host: gw.example", *smuggled))
        assert answer is not None and answer.status == 200
        [received] = got
        names = {name for name, _ in received.headers}
        assert names.isdisjoint(
            {"forwarded", "x-forwarded-server", "x-forwarded-scheme", "x-forwarded-ssl"}
            | {"x-original-host", "x-host", "x_forwarded_server"}
            | {"x-scheme", "x-forwarded-protocol", "client-ip", "true-client-ip", "cf-connecting-ip"}
        ), received.headers
        # What the gateway says itself, from what it checked: the host, the port the client
        # addressed (the scheme's default), and the client's address as the decision resolved it
        # (the trusted peer's chain, never a client's own X-Real-IP).
        assert received.header("x-forwarded-host") == ["gw.example"]
        assert received.header("x-forwarded-port") == (["443"] if gw is fronted else ["80"])
        assert received.header("x-real-ip") == ["127.0.0.1"]


def test_a_trusted_fronts_client_address_reaches_the_app_as_x_real_ip(
    passing: GatewayServer, recorder: Recorder
) -> None:
    # The third attack: dropping a trusted front's X-Real-IP left apps that read it (or the last
    # X-Forwarded-For hop, Tornado) with the front's address for every client.
    answer, got = ask(recorder, passing, request("Host: gw.example", "X-Forwarded-For: 203.0.113.9"))
    assert answer is not None and answer.status == 200
    [received] = got
    assert received.header("x-real-ip") == ["203.0.113.9"]
    assert received.header("x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]


@pytest.mark.parametrize(
    ("sent", "passed"), [("gw.example:0443", "gw.example:443"), ("GW.Example:00443", "gw.example:443")]
)
def test_the_app_gets_the_host_in_the_spelling_the_policy_judged(
    policed: GatewayServer, recorder: Recorder, sent: str, passed: str
) -> None:
    answer, got = ask(recorder, policed, request(f"Host: {sent}"))
    assert answer is not None and answer.status == 200
    [received] = got
    assert (received.header("host"), received.header("x-forwarded-host")) == ([passed], [passed])


def test_a_trusted_fronts_forwarded_host_is_checked_and_passed(fronted: GatewayServer, recorder: Recorder) -> None:
    answer, got = ask(recorder, fronted, request("Host: 127.0.0.1", "X-Forwarded-Host: gw.example"))
    assert answer is not None and answer.status == 200
    assert [(r.header("host"), r.header("x-forwarded-host")) for r in got] == [(["gw.example"], ["gw.example"])]
    answer, got = ask(recorder, fronted, request("Host: gw.example", "X-Forwarded-Host: evil.example"))
    _denied(answer, 421, "misdirected_request")
    assert got == []


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("http://evil.example/public/x", "gw"),
        ("http://gw:8080/public/x", "gw"),
        ("http://gw@evil.example/public/x", "gw"),
        ("http://evil.example@gw/public/x", "gw"),
        ("ftp://gw/public/x", "gw"),
        ("http://gw/public/x", "gw:8080"),
        ("http://[::1]/public/x", "[::2]"),
    ],
)
def test_an_absolute_form_target_that_contradicts_host_is_refused(
    passing: GatewayServer, recorder: Recorder, target: str, host: str
) -> None:
    # RFC 9112 §3.2.2: the target's authority is the one that counts; the server keeps only
    # its path, so a Host that says otherwise would be checked and forwarded instead.
    answer, got = ask(recorder, passing, request(f"Host: {host}", target=target))
    assert answer is None or answer.status == 400
    assert got == []


@pytest.mark.parametrize(
    ("target", "host"),
    [("http://gw/public/x", "gw"), ("http://GW:80/public/x", "gw"), ("https://gw/public/x", "gw:443")],
)
def test_an_absolute_form_target_that_agrees_with_host_passes(
    passing: GatewayServer, recorder: Recorder, target: str, host: str
) -> None:
    answer, got = ask(recorder, passing, request(f"Host: {host}", target=target))
    assert answer is not None and answer.status == 200
    assert [(r.target, r.header("host")) for r in got] == [("/public/x", [host])]


# -- WebSocket handshakes --------------------------------------------------------------------

HANDSHAKE = (
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ("Sec-WebSocket-Version: 13"),
)


def test_the_client_host_reaches_the_upstream_handshake_once(passing: GatewayServer, recorder: Recorder) -> None:
    # The recorder answers 200, not an answer to a handshake: the client gets 502 (issue 14, the
    # upstream-fault tests), but the recorder has recorded the head the WebSocket client wrote.
    answer, got = ask(recorder, passing, request("Host: App.Example:8080", *HANDSHAKE, target="/public/ws"))
    assert answer is not None and answer.status == 502
    [received] = got
    assert received.headers[0] == ("host", "app.example:8080")
    assert received.header("host") == ["app.example:8080"]
    assert received.header("x-forwarded-host") == ["app.example:8080"]
    assert received.header("upgrade") == ["websocket"]


def test_pass_host_false_handshake(not_passing: GatewayServer, recorder: Recorder) -> None:
    _, got = ask(recorder, not_passing, request("Host: app.example", *HANDSHAKE, target="/public/ws"))
    assert [(r.header("host"), r.header("x-forwarded-host")) for r in got] == [
        ([upstream_of(recorder)], ["app.example"])
    ]


@pytest.mark.parametrize(
    ("lines", "status", "error"),
    [
        (["Host: evil.example"], 421, "misdirected_request"),
        (["Host: app.example:8080", "Host: evil.example"], 400, "malformed_request"),
        (["Host: app.example:8080@evil.example"], 400, "malformed_request"),
    ],
)
def test_a_refused_host_opens_no_upstream_websocket(
    policed: GatewayServer, recorder: Recorder, lines: list[str], status: int, error: str
) -> None:
    answer, got = ask(recorder, policed, request(*lines, *HANDSHAKE, target="/public/ws"))
    # The forwarder answers with the denial (the ASGI WebSocket Denial Response); a dispatch
    # that refuses first may close the handshake instead, which uvicorn answers with 403.
    assert answer is not None and answer.status in (status, 403)
    if answer.status != 403:
        assert json.loads(answer.body)["error"] == error
    assert got == []


@pytest.mark.parametrize(
    "lines", [["Host: a.example", "Host: b.example"], ["Host: a.example@evil.example"], ["Host: a.example:0"], []]
)
def test_the_forwarder_refuses_a_malformed_handshake_host(
    passing: GatewayServer, recorder: Recorder, lines: list[str]
) -> None:
    # An open policy: the dispatch checks nothing, the forwarder still does (and says why).
    answer, got = ask(recorder, passing, request(*lines, *HANDSHAKE, target="/public/ws"))
    _denied(answer, 400, "malformed_request")
    assert got == []


# -- Location, Content-Location and Refresh from a real upstream -----------------------------


async def _redirecting(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the response fields its query names, values as given (raw bytes)."""
    if scope["type"] != "http":
        return
    fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in parse_qsl(scope["query_string"].decode(), True)]
    fields = [(k, v.replace(b"UP", f"127.0.0.1:{scope['server'][1]}".encode())) for k, v in fields]
    await send({"type": "http.response.start", "status": 302, "headers": fields})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def redirecting() -> Iterator[int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_redirecting, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    yield port
    server.should_exit = True
    thread.join(timeout=15)


@pytest.fixture(scope="module")
def public(redirecting: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    config = make_config(
        tmp_path_factory.mktemp("public"),
        upstream=f"http://127.0.0.1:{redirecting}",
        server={"public_url": "https://gw.example"},
    )
    gw = GatewayServer(config).start()
    yield gw
    gw.stop()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("location=http://UP/next?a=1", [("location", "https://gw.example/next?a=1")]),
        ("content-location=http://UP/doc", [("content-location", "https://gw.example/doc")]),
        ("refresh=5; url=http://UP/later", [("refresh", "5; url=https://gw.example/later")]),
        ("refresh=5", [("refresh", "5")]),
        ("location=http://UP@evil.example/", [("location", "http://UP@evil.example/")]),
        ("location=//evil.example/", [("location", "//evil.example/")]),
        ("location=http://UP\\evil.example/", [("location", "http://UP\\evil.example/")]),
        (
            "location=http://UP/a&location=http://evil.example/",
            [("location", "https://gw.example/a"), ("location", "http://evil.example/")],
        ),
    ],
)
def test_absolute_urls_to_the_upstream_are_rewritten(
    public: GatewayServer, redirecting: int, query: str, expected: list[tuple[str, str]]
) -> None:
    encoded = "&".join(f"{k}={quote(v, safe='')}" for k, _, v in (p.partition("=") for p in query.split("&")))
    conn = http.client.HTTPConnection("127.0.0.1", public.port, timeout=5)
    try:
        conn.request("GET", f"/public/r?{encoded}", headers={"Host": "gw.example"})
        response = conn.getresponse()
        fields = response.getheaders()
    finally:
        conn.close()
    assert response.status == 302
    up = f"127.0.0.1:{redirecting}"
    wanted = [(k, v.replace("UP", up)) for k, v in expected]
    names = {k for k, _ in wanted}
    assert [(k.lower(), v) for k, v in fields if k.lower() in names] == wanted
