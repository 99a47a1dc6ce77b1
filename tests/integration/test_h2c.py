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
import socket
import subprocess
import sys
from collections.abc import Iterator
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


def h2c_attack(port: int, headers: dict[str, str]) -> int:
    """Ask for an excluded path with an h2c upgrade; on a 101, ask for /admin/users over HTTP/2
    on the same connection. Returns the status of the HTTP/1.1 answer."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection()
    assert settings is not None  # the client side always has settings to send
    lines = [
        "GET /public/x HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
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


def assert_never_upgraded(app: HypercornApp, status: int) -> None:
    seen = app.seen()
    assert [r for r in seen if r["http_version"] != "1.1" or r["path"] == "/admin/users"] == []
    assert status == 200, f"the upgrade was relayed: {status}"
    assert [r["path"] for r in seen] == ["/public/x"]  # the allowed request itself did arrive


@pytest.fixture
def app() -> Iterator[HypercornApp]:
    server = HypercornApp()
    yield server
    server.stop()


@pytest.fixture
def forward_auth(tmp_path: Any) -> Iterator[GatewayServer]:
    server = GatewayServer(make_config(tmp_path)).start()
    yield server
    server.stop()


def test_caddy_forward_auth(app: HypercornApp, forward_auth: GatewayServer) -> None:
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
    try:
        status = h2c_attack(front.port, {"Authorization": basic_auth("alice", PASSWORD)})
    finally:
        front.stop()
    assert_never_upgraded(app, status)


def _nginx(site: str, gateway: GatewayServer, app: HypercornApp | None) -> NginxFront:
    replacements = {"server 127.0.0.1:8080;": f"server 127.0.0.1:{gateway.port};"}
    if app is not None:
        replacements["server 127.0.0.1:3000;"] = f"server 127.0.0.1:{app.port};"
    front = NginxFront(need_binary("nginx"), site, replacements)
    front.replacements["/etc/nginx/gateway.htpasswd"] = front.htpasswd({"alice": PASSWORD})
    return front.start()


def test_nginx_auth_request(app: HypercornApp, forward_auth: GatewayServer) -> None:
    front = _nginx("auth_request.conf", forward_auth, app)
    try:
        status = h2c_attack(front.port, {"Authorization": basic_auth("alice", PASSWORD)})
    finally:
        front.stop()
    assert_never_upgraded(app, status)


@pytest.mark.parametrize("front", ["none", "nginx proxy_pass"])
def test_proxy_mode(app: HypercornApp, tmp_path: Any, front: str) -> None:
    gateway = GatewayServer(make_config(tmp_path, upstream=f"http://127.0.0.1:{app.port}")).start()
    nginx = _nginx("proxy_pass.conf", gateway, None) if front != "none" else None
    try:
        port = nginx.port if nginx is not None else gateway.port
        status = h2c_attack(port, {"Authorization": basic_auth("alice", PASSWORD)})
    finally:
        if nginx is not None:
            nginx.stop()
        gateway.stop()
    assert_never_upgraded(app, status)
