"""The differential test of tests/test_differential.py through real nginx and Caddy, started
from the files in config/: Hypothesis conversations on one keep-alive client connection to the
front, the first factor HTTP Basic, a raw recording app behind (tests/support/recorder.py).

Forward-auth mode (nginx ``auth_request``, Caddy ``forward_auth``): the front sends the app the
raw target, so what must hold is that the app receives exactly one request per answer it
gave, a ``Remote-User`` only for a user who proved both factors, and for no user only a path
the gateway excludes (and that arrived canonical, as the exclusion requires); never a code
header, an upgrade, a routing override or an ambiguous framing. Proxy mode behind nginx
(``proxy_pass.conf``) is checked the same way, and the app must see the Host the client sent
nginx, once, in ``Host`` and ``X-Forwarded-Host`` (``upstream.pass_host``); a hostile Host is
refused by nginx or by the gateway and reaches nothing.

``GATEWAY_FUZZ_EXAMPLES`` scales the number of conversations (a third of it per front,
default 100).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.errors import AmbiguousPath
from gateway.http import split_host
from gateway.paths import canonical_path, encode_path
from tests.conftest import need_binary
from tests.support.conversations import AMBIGUOUS, NEVER_UPSTREAM, USERS, Spec, excluded, requests, same_name
from tests.support.fronts import CaddyFront, NginxFront, basic_auth, raw_request, totp_now
from tests.support.recorder import RawClient, Received, Recorder
from tests.support.servers import GatewayServer, enrol, make_config
from tests.test_hosts import HOSTILE_HOSTS

pytestmark = pytest.mark.integration

EXAMPLES = max(10, int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "300")) // 3)
PASSWORD = "first-factor"
EXAMPLE_HASH = "$2a$14$1bc0Yf8WIEjgFeiwVmnb1eDexb5nunQFlGiuP/jMPnIObPgzNjmeG"
# Go's reverse proxy keeps "TE: trailers" (RFC 9110 §10.1.4 allows it end to end).
NEVER_FROM_A_FRONT = NEVER_UPSTREAM - {"te"}


def identity(user: str) -> tuple[str, str]:
    return "Authorization", basic_auth(user, PASSWORD)


@dataclass
class Front:
    name: str
    port: int
    cookies: dict[str, str]


def _open_sessions(port: int, secrets: dict[str, str]) -> dict[str, str]:
    cookies = {}
    for user, secret in secrets.items():
        status, headers, _ = raw_request(port, "/open", {**dict([identity(user)]), "X-2FA-Code": totp_now(secret)})
        assert status == 200, (user, status)
        cookies[user] = headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]
    return cookies


def _nginx(site: str, gateway: GatewayServer, app: Recorder | None) -> NginxFront:
    replacements = {"server 127.0.0.1:8080;": f"server 127.0.0.1:{gateway.port};"}
    if app is not None:
        replacements["server 127.0.0.1:3000;"] = f"server 127.0.0.1:{app.port};"
    front = NginxFront(need_binary("nginx"), site, replacements)
    front.replacements["/etc/nginx/gateway.htpasswd"] = front.htpasswd({u: PASSWORD for u in (*USERS, "mallory")})
    return front.start()


def _caddy(gateway: GatewayServer, app: Recorder) -> CaddyFront:
    binary = need_binary("caddy")
    hasher = CaddyFront(binary, {})
    try:
        hashed = hasher.hash_password(PASSWORD)
    finally:
        hasher.stop()
    accounts = "\n\t\t".join(f"{user} {hashed}" for user in (*USERS, "mallory"))
    return CaddyFront(
        binary,
        {
            "admin localhost:2019": "admin off",
            "127.0.0.1:8080": f"127.0.0.1:{gateway.port}",
            "127.0.0.1:3000": f"127.0.0.1:{app.port}",
            f"alice {EXAMPLE_HASH}": accounts,
        },
    ).start()


@pytest.fixture(scope="module")
def app() -> Iterator[Recorder]:
    server = Recorder().start()
    yield server
    server.stop()


@contextlib.contextmanager
def _front(name: str, app: Recorder, tmp: Path) -> Iterator[Front]:
    proxy_mode = name == "nginx proxy_pass"
    config = make_config(tmp, upstream=app.url if proxy_mode else None)
    secrets = {user: enrol(config, user) for user in USERS}
    gateway = GatewayServer(config).start()
    server: NginxFront | CaddyFront | None = None
    try:
        if name == "nginx auth_request":
            server = _nginx("auth_request.conf", gateway, app)
        elif name == "caddy forward_auth":
            server = _caddy(gateway, app)
        else:
            server = _nginx("proxy_pass.conf", gateway, None)
        yield Front(name, server.port, _open_sessions(server.port, secrets))
    finally:
        if server is not None:
            server.stop()
        gateway.stop()


@pytest.fixture(scope="module")
def nginx_auth_request(app: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    with _front("nginx auth_request", app, tmp_path_factory.mktemp("fronts")) as front:
        yield front


@pytest.fixture(scope="module")
def caddy_forward_auth(app: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    with _front("caddy forward_auth", app, tmp_path_factory.mktemp("fronts")) as front:
        yield front


@pytest.fixture(scope="module")
def nginx_proxy_pass(app: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    with _front("nginx proxy_pass", app, tmp_path_factory.mktemp("fronts")) as front:
        yield front


def _canonical(path: str) -> str | None:
    try:
        return encode_path(canonical_path(path))
    except AmbiguousPath:
        return None


# Go's HTTP server (Caddy) takes Transfer-Encoding over Content-Length (RFC 9112 §6.3 allows
# it) and removes the Content-Length before any handler sees it: the app gets one chunked
# framing with exactly the client's body. No Caddyfile matcher can see the two any more.
REFRAMED = {"caddy forward_auth": frozenset({"both"})}


def check(spec: Spec, received: Received, front: str = "", host: str = "") -> None:
    ambiguous = AMBIGUOUS - REFRAMED.get(front, frozenset())
    if front == "nginx proxy_pass":
        # nginx sets Host and X-Forwarded-Host to $http_host; the gateway passes them on.
        assert received.header("host") == [host] and received.header("x-forwarded-host") == [host]
        assert received.header("x-forwarded-proto") == ["http"]
    assert spec.framing not in ambiguous, "a request with ambiguous framing reached the app"
    assert received.method == spec.method
    path = received.target.split("?", 1)[0]
    assert "#" not in received.target
    names = [same_name(k) for k, _ in received.headers]
    assert not NEVER_FROM_A_FRONT & set(names), names
    users = received.header("remote-user")
    assert names.count("remote-user") == len(users) <= 1, "a look-alike or second user header reached the app"
    if users:
        [user] = users
        assert set(spec.users) == {user} and set(spec.sessions) == {user}, "a user who did not prove both factors"
    else:
        # No user: only a path the gateway excludes, and it arrived as the canonical form.
        assert _canonical(path) == path and excluded(spec.method, path), f"{path} reached the app without a user"
    lengths, codings = received.header("content-length"), received.header("transfer-encoding")
    assert not (lengths and codings) and len(lengths) <= 1 and codings in ([], ["chunked"])
    assert received.body == spec.body


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # one test, three fronts: an example saved for one is no replay for another
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(data=st.data())
def test_nginx_auth_request(nginx_auth_request: Front, app: Recorder, data: st.DataObject) -> None:
    converse(nginx_auth_request, app, data)


@FUZZ
@given(data=st.data())
def test_caddy_forward_auth(caddy_forward_auth: Front, app: Recorder, data: st.DataObject) -> None:
    converse(caddy_forward_auth, app, data)


@FUZZ
@given(data=st.data())
def test_nginx_proxy_pass(nginx_proxy_pass: Front, app: Recorder, data: st.DataObject) -> None:
    converse(nginx_proxy_pass, app, data)


def converse(front: Front, app: Recorder, data: st.DataObject) -> None:
    """One conversation on one client connection to the front; then the differential check."""
    extra = [("Remote-User", "alice"), ("X-Forwarded-Uri", "/public/x"), ("X-Original-URI", "/healthz")]
    strategy = requests(front.cookies, identity, extra)
    specs = data.draw(st.lists(strategy, min_size=1, max_size=4), label="conversation")
    before, errors_before = (len(x) for x in app.snapshot())
    answers = []
    with RawClient(front.port, timeout=5) as client:
        for spec in specs:
            answer = client.ask(spec.encode(host=f"127.0.0.1:{front.port}"))
            if answer is None:
                break
            answers.append((spec, answer))
    seen, errors = app.snapshot()
    assert errors[errors_before:] == [], "the app could not parse what it received"
    got = {r.seq: r for r in seen[before:]}
    claimed = [(spec, answer.upstream_seq) for spec, answer in answers if answer.upstream_seq is not None]
    event(f"{len(claimed)} of {len(specs)} reached the app")
    assert sorted(seq for _, seq in claimed) == sorted(got)
    for spec, seq in claimed:
        check(spec, got[seq], front.name, f"127.0.0.1:{front.port}")


@pytest.mark.parametrize("host", [*HOSTILE_HOSTS, "App.Example:8080", "[::1]:1"])
def test_nginx_proxy_pass_hostile_host(nginx_proxy_pass: Front, app: Recorder, host: str) -> None:
    before = len(app.snapshot()[0])
    auth = ": ".join(identity("alice"))
    data = f"GET /public/x HTTP/1.1\r\nHost: {host}\r\n{auth}\r\nConnection: close\r\n\r\n".encode()
    with RawClient(nginx_proxy_pass.port, timeout=5) as client:
        answer = client.ask(data)
    got = app.snapshot()[0][before:]
    if split_host(host.strip()) is None:
        assert answer is None or answer.status == 400, answer
        assert got == []
    else:
        assert answer is not None and answer.status == 200
        # RFC 9110 §5.5: the whitespace around a field value is not part of it; the host goes on
        # in the spelling the gateway judged (gateway/hosts.py: lower case).
        sent = host.strip().lower()
        assert [(r.header("host"), r.header("x-forwarded-host")) for r in got] == [([sent], [sent])]
