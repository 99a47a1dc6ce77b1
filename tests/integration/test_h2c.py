"""h2c upgrade smuggling (issue 9, item 2), against an h2c-capable app (Hypercorn).

The attack: an allowed request carries ``Upgrade: h2c`` and ``HTTP2-Settings``; if it reaches
the app, Hypercorn answers ``101 Switching Protocols`` and the client speaks HTTP/2 on that
connection, asking for paths the gateway never sees (here ``/admin/users`` as ``admin``).
It must fail through every example in config/ and in proxy mode: the upgrade never reaches the
app, so the client gets an ordinary HTTP/1.1 answer and no HTTP/2 request is ever served.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from tests.conftest import need_binary
from tests.support.fronts import CaddyFront, NginxFront, basic_auth
from tests.support.servers import ROOT, GatewayServer, free_port, make_config, wait_for_port

pytestmark = pytest.mark.integration

PASSWORD = "alice-pw"
EXAMPLE_HASH = "$2a$14$1bc0Yf8WIEjgFeiwVmnb1eDexb5nunQFlGiuP/jMPnIObPgzNjmeG"


class HypercornApp:
    """tests/support/h2c_app.py under Hypercorn, in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hypercorn", "tests.support.h2c_app:app", "--bind", f"127.0.0.1:{self.port}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def seen(self) -> list[dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/_seen")
            return json.loads(conn.getresponse().read())  # type: ignore[no-any-return]
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


UPGRADE = ("Connection", "Upgrade, HTTP2-Settings")
# The h2c upgrade alone and hidden next to a WebSocket: two Upgrade headers in either order,
# any case, or one list. None of them is exactly one "websocket", so none may reach the app
# with an Upgrade. (Caddy's `header Upgrade websocket` matched "h2c" + "websocket", and its
# reverse_proxy relayed the first: h2c.)
VARIANTS = {
    "h2c": [UPGRADE, ("Upgrade", "h2c")],
    "h2c then websocket": [UPGRADE, ("Upgrade", "h2c"), ("Upgrade", "websocket")],
    "websocket then h2c": [UPGRADE, ("Upgrade", "websocket"), ("Upgrade", "h2c")],
    "h2c then WebSocket": [UPGRADE, ("Upgrade", "h2c"), ("Upgrade", "WebSocket")],
    "WebSocket then h2c": [UPGRADE, ("Upgrade", "WebSocket"), ("Upgrade", "h2c")],
    "list h2c, websocket": [UPGRADE, ("Upgrade", "h2c, websocket")],
    "list websocket, h2c": [UPGRADE, ("Upgrade", "websocket, h2c")],
    "lower-case connection": [("Connection", "upgrade, HTTP2-Settings"), ("Upgrade", "websocket"), ("Upgrade", "h2c")],
    "two connection headers": [
        ("Connection", "Upgrade"),
        ("Connection", "HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("Upgrade", "websocket"),
    ],
}


def h2c_attack(port: int, headers: dict[str, str], upgrade: list[tuple[str, str]] = VARIANTS["h2c"]) -> int:
    """Ask for an excluded path with an h2c upgrade (``upgrade``: the Connection and Upgrade
    header lines, in order); on a 101, ask for /admin/users over HTTP/2 on the same
    connection. Returns the status of the HTTP/1.1 answer."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection()
    assert settings is not None  # the client side always has settings to send
    lines = [
        "GET /public/x HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        *(f"{k}: {v}" for k, v in upgrade),
        f"HTTP2-Settings: {settings.decode('ascii')}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        status = int(data.split(b" ", 2)[1])
        if status != 101:
            return status
        # Switched: the smuggled requests, which the gateway never sees.
        s.sendall(conn.data_to_send())
        stream = conn.get_next_available_stream_id()
        request = [(":method", "GET"), (":path", "/admin/users"), (":authority", "app"), (":scheme", "http")]
        conn.send_headers(stream, [*request, ("remote-user", "admin")], end_stream=True)
        s.sendall(conn.data_to_send())
        s.settimeout(3)
        ended = False
        rest = data.split(b"\r\n\r\n", 1)[1]
        while not ended:
            for event in conn.receive_data(rest):
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset) and event.stream_id == stream:
                    ended = True
            s.sendall(conn.data_to_send())
            if ended:
                break
            try:
                rest = s.recv(65536)
            except TimeoutError:
                break
            if not rest:
                break
        return status


def assert_never_upgraded(app: HypercornApp, before: int, status: int) -> None:
    """What the app served since ``before``: nothing over HTTP/2, never the smuggled path, no
    Upgrade or HTTP2-Settings at all, and at most the allowed request itself. The front either
    stripped the upgrade (200) or refused the request (4xx: the Caddyfile's and nginx's 400, the
    gateway's server 426 for an upgrade it will not make) before it reached the app."""
    seen = app.seen()[before:]
    assert [r for r in seen if r["http_version"] != "1.1" or r["path"] == "/admin/users"] == []
    assert [(r["upgrade"], r["http2_settings"]) for r in seen if r["upgrade"] or r["http2_settings"]] == []
    assert status == 200 or 400 <= status < 500, f"the upgrade was relayed: {status}"
    assert [r["path"] for r in seen] == (["/public/x"] if status == 200 else [])


ALICE = {"Authorization": basic_auth("alice", PASSWORD)}


@pytest.fixture(scope="module")
def app() -> Iterator[HypercornApp]:
    server = HypercornApp()
    yield server
    server.stop()


def _gateway(tmp: Path, upstream: str | None = None) -> GatewayServer:
    return GatewayServer(make_config(tmp, upstream=upstream)).start()


@pytest.fixture(scope="module")
def forward_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    server = _gateway(tmp_path_factory.mktemp("h2c-fa"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy_mode(app: HypercornApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    server = _gateway(tmp_path_factory.mktemp("h2c-proxy"), f"http://127.0.0.1:{app.port}")
    yield server
    server.stop()


def _nginx(site: str, gateway: GatewayServer, app: HypercornApp | None) -> NginxFront:
    replacements = {"server 127.0.0.1:8080;": f"server 127.0.0.1:{gateway.port};"}
    if app is not None:
        replacements["server 127.0.0.1:3000;"] = f"server 127.0.0.1:{app.port};"
    front = NginxFront(need_binary("nginx"), site, replacements)
    front.replacements["/etc/nginx/gateway.htpasswd"] = front.htpasswd({"alice": PASSWORD})
    return front.start()


@pytest.fixture(scope="module")
def caddy(app: HypercornApp, forward_auth: GatewayServer) -> Iterator[CaddyFront]:
    binary = need_binary("caddy")
    hasher = CaddyFront(binary, {})
    try:
        hashed = hasher.hash_password(PASSWORD)
    finally:
        hasher.stop()
    front = CaddyFront(
        binary,
        {
            "admin localhost:2019": "admin off",
            "127.0.0.1:8080": f"127.0.0.1:{forward_auth.port}",
            "127.0.0.1:3000": f"127.0.0.1:{app.port}",
            EXAMPLE_HASH: hashed,
        },
    ).start()
    yield front
    front.stop()


@pytest.fixture(scope="module")
def nginx_auth_request(app: HypercornApp, forward_auth: GatewayServer) -> Iterator[NginxFront]:
    front = _nginx("auth_request.conf", forward_auth, app)
    yield front
    front.stop()


@pytest.fixture(scope="module")
def nginx_proxy_pass(proxy_mode: GatewayServer) -> Iterator[NginxFront]:
    front = _nginx("proxy_pass.conf", proxy_mode, None)
    yield front
    front.stop()


def _attack(app: HypercornApp, port: int, variant: str) -> None:
    before = len(app.seen())
    status = h2c_attack(port, ALICE, VARIANTS[variant])
    assert_never_upgraded(app, before, status)


@pytest.mark.parametrize("variant", VARIANTS)
def test_caddy_forward_auth(app: HypercornApp, caddy: CaddyFront, variant: str) -> None:
    _attack(app, caddy.port, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nginx_auth_request(app: HypercornApp, nginx_auth_request: NginxFront, variant: str) -> None:
    _attack(app, nginx_auth_request.port, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_proxy_mode(app: HypercornApp, proxy_mode: GatewayServer, variant: str) -> None:
    _attack(app, proxy_mode.port, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_proxy_mode_behind_nginx(app: HypercornApp, nginx_proxy_pass: NginxFront, variant: str) -> None:
    _attack(app, nginx_proxy_pass.port, variant)


def test_traefik_websocket_router_takes_exactly_one_websocket_value() -> None:
    """Traefik is not installable here: its WebSocket router's rule (config/traefik/dynamic.yml)
    is evaluated as Traefik does. ``HeaderRegexp`` holds when ANY value of the header matches
    (its header matcher loops over the values), ``!`` negates it; the regexes are RE2, which
    agrees with Python's ``re`` on these ASCII patterns. Every request the rule does not take
    goes to the app router, whose ``no-upgrade`` middleware deletes every Upgrade header."""
    text = (ROOT / "config" / "traefik" / "dynamic.yml").read_text()
    rule = text[text.index("app-websocket:") :].split("entryPoints:", 1)[0]
    terms = re.findall(r"(!?)HeaderRegexp\(`Upgrade`, `([^`]*)`\)", rule)
    assert terms, "the WebSocket router no longer matches on Upgrade"

    def takes(values: list[str]) -> bool:
        return all(any(re.match(rx, v) for v in values) != bool(negated) for negated, rx in terms)

    for name, lines in VARIANTS.items():
        assert not takes([v for k, v in lines if k == "Upgrade"]), name
    for values in (["websocket", ""], ["", "websocket"], ["websockets"], ["h2c"]):
        assert not takes(values), values
    # Two "websocket" lines pass (a rule cannot count them), and are relayed as one: harmless.
    assert takes(["websocket", "WebSocket"])
    for value in ("websocket", "WebSocket", "WEBSOCKET"):
        assert takes([value]), value
