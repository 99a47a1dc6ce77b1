"""The app's own routes: health, readiness, metrics, and forward-auth-only mode."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.types import Message

from gateway.app import Gateway, create_app
from gateway.forward_auth import ForwardAuth
from gateway.protect import Protect
from tests.support.inprocess import UPSTREAM, in_process
from tests.support.servers import ROOT, GatewayServer, UpstreamProcess, make_config


def test_health_ready_and_metrics(upstream: UpstreamProcess, tmp_path: Path) -> None:
    server = GatewayServer(make_config(tmp_path, upstream=upstream.url)).start()
    try:
        assert httpx.get(server.url + "/_gateway/health").json() == {"status": "ok"}
        assert httpx.get(server.url + "/_gateway/ready").json() == {"status": "ready"}
        httpx.get(server.url + "/public/x")
        httpx.get(server.url + "/admin")
        metrics = httpx.get(server.url + "/_gateway/metrics").text
        assert 'gateway_decisions_total{mode="proxy",reason="excluded"} 1.0' in metrics
        assert 'gateway_decisions_total{mode="proxy",reason="identity_required"} 1.0' in metrics
        assert "gateway_store_up 1.0" in metrics
    finally:
        server.stop()


def test_metrics_only_for_trusted_peers(tmp_path: Path) -> None:
    server = GatewayServer(make_config(tmp_path, server={"trusted_proxies": ["192.0.2.0/24"]})).start()
    try:
        r = httpx.get(server.url + "/_gateway/metrics")
        assert r.status_code == 403
        assert r.json()["error"] == "untrusted_peer"
    finally:
        server.stop()


def test_metrics_refuse_a_request_relayed_by_a_proxy(tmp_path: Path) -> None:
    # Behind nginx proxy_pass every client is a trusted peer: only the relay headers tell.
    server = GatewayServer(make_config(tmp_path)).start()
    try:
        assert httpx.get(server.url + "/_gateway/metrics").status_code == 200
        for name, value in [
            ("X-Forwarded-For", "203.0.113.9"),
            ("Forwarded", "for=203.0.113.9"),
            ("X-Real-IP", "203.0.113.9"),
            ("X-Original-URI", "/_gateway/metrics"),
            ("X-Forwarded-Uri", "/_gateway/metrics"),
        ]:
            r = httpx.get(server.url + "/_gateway/metrics", headers={name: value})
            assert r.status_code == 403, name
            assert r.json()["error"] == "untrusted_peer"
    finally:
        server.stop()


def test_auth_is_not_served_in_proxy_mode_unless_set(upstream: UpstreamProcess, tmp_path: Path) -> None:
    # An excluded target: /auth would answer 200 to anyone who can reach it.
    probe = {"X-Original-URI": "/public/x", "X-Original-Method": "GET"}
    server = GatewayServer(make_config(tmp_path, upstream=upstream.url)).start()
    try:
        r = httpx.get(server.url + "/auth", headers=probe)
        assert r.status_code == 401  # an ordinary protected upstream path, decided as such
        assert r.json()["error"] == "identity_required"
    finally:
        server.stop()
    server = GatewayServer(make_config(tmp_path, upstream=upstream.url, routes={"auth": "/auth"})).start()
    try:
        assert httpx.get(server.url + "/auth", headers=probe).status_code == 200
    finally:
        server.stop()


def test_auth_and_metrics_switched_off(tmp_path: Path) -> None:
    server = GatewayServer(make_config(tmp_path, routes={"auth": "", "metrics": ""})).start()
    try:
        probe = {"X-Original-URI": "/public/x", "X-Original-Method": "GET"}
        assert httpx.get(server.url + "/auth", headers=probe).status_code == 404
        assert httpx.get(server.url + "/_gateway/metrics").status_code == 404
    finally:
        server.stop()


def test_forward_auth_only_mode_serves_no_upstream(tmp_path: Path) -> None:
    server = GatewayServer(make_config(tmp_path)).start()
    try:
        r = httpx.get(server.url + "/anything", headers={"Remote-User": "alice"})
        assert r.status_code == 404
        assert r.json()["error"] == "not_found"
    finally:
        server.stop()


def test_login_url_sends_browsers_without_identity_to_the_app_login(upstream: UpstreamProcess, tmp_path: Path) -> None:
    config = make_config(
        tmp_path, upstream=upstream.url, identity={"login_url": "/login?next={next}"}, routes={"auth": "/auth"}
    )
    server = GatewayServer(config).start()
    try:
        r = httpx.get(server.url + "/app/x?y=1", headers={"Accept": "text/html"})
        assert r.status_code == 302
        assert r.headers["location"] == "/login?next=/app/x%3Fy%3D1"
        # programs still get the JSON 401
        assert httpx.get(server.url + "/app/x").status_code == 401
        headers = {"Accept": "text/html", "X-Original-URI": "/app/x", "X-Original-Method": "GET"}
        r = httpx.get(server.url + "/auth", headers=headers)
        assert r.status_code == 401
        assert r.headers["location"].endswith("/login?next=/app/x")
    finally:
        server.stop()


# -- in-process (httpx.ASGITransport, the real SQLite store) ---------------------------------------


async def test_probes_and_proxy_mode_in_process(tmp_path: Path) -> None:
    async with in_process(make_config(tmp_path, upstream=UPSTREAM)) as gw:
        c = gw.client
        assert (await c.get("/_gateway/health")).json() == {"status": "ok"}
        assert (await c.get("/_gateway/ready")).json() == {"status": "ready"}
        r = await c.get("/public/echo?q=1")
        assert r.status_code == 200 and r.json()["raw_path"] == "/public/echo" and r.json()["query"] == "q=1"
        r = await c.get("/app/x")
        assert r.status_code == 401 and r.json()["error"] == "identity_required"
        r = await c.get("/app/x?y=1", headers={"Accept": "text/html", "Remote-User": "alice"})
        assert r.status_code == 302 and r.headers["location"] == "/setup-2fa?next=/app/x%3Fy%3D1"
        metrics = (await c.get("/_gateway/metrics")).text
        assert 'gateway_decisions_total{mode="proxy",reason="excluded"} 1.0' in metrics
        assert 'gateway_decisions_total{mode="proxy",reason="2fa_not_enrolled"} 1.0' in metrics


async def test_forward_auth_only_mode_in_process(tmp_path: Path) -> None:
    async with in_process(make_config(tmp_path)) as gw:
        r = await gw.client.get("/anything", headers={"Remote-User": "alice"})
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        probe = {"X-Original-URI": "/public/x", "X-Original-Method": "GET"}
        assert (await gw.client.get("/auth", headers=probe)).status_code == 200


@pytest.mark.parametrize("route", ["/app/x", "/public/x", "/setup-2fa", "/verify-2fa"])
async def test_proxy_mode_refuses_a_host_outside_the_policy_before_deciding(tmp_path: Path, route: str) -> None:
    """Issue 12 §1 (hosts.py, H4): wired at the top of the dispatch, for the pages too."""
    config = make_config(tmp_path, upstream=UPSTREAM, server={"public_url": "https://app.example.org"})
    async with in_process(config) as gw:
        c = gw.client
        user = {"Remote-User": "alice"}
        r = await c.get(route, headers={**user, "Host": "evil.example"})
        assert r.status_code == 421 and r.json()["error"] == "misdirected_request"
        # Refused before the decision: nothing was counted (nor judged, nor forwarded).
        assert decisions(await c.get("/_gateway/metrics")) == 0
        r = await c.get(route, headers={**user, "Host": "app.example.org"})
        assert r.status_code != 421
        # The gateway's pages are not decided; the other routes are, once each.
        assert decisions(await c.get("/_gateway/metrics")) == (0 if route.endswith("-2fa") else 1)


def decisions(metrics: httpx.Response) -> float:
    """How many decisions the metrics count, in every mode and for every reason."""
    lines = metrics.text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("gateway_decisions_total{"))


async def test_probes_answer_any_host_and_auth_the_host_the_front_forwards(tmp_path: Path) -> None:
    # Probes use IP addresses. /auth holds the host the front says the client named
    # (X-Forwarded-Host, else Host) to the policy: the third attack passed "Host: evil" to the
    # app through nginx on an excluded path.
    config = make_config(
        tmp_path, upstream=UPSTREAM, routes={"auth": "/auth"}, server={"public_url": "https://app.example.org"}
    )
    async with in_process(config) as gw:
        c = gw.client
        host = {"Host": "10.0.0.7:8080"}
        assert (await c.get("/_gateway/health", headers=host)).status_code == 200
        assert (await c.get("/_gateway/ready", headers=host)).status_code == 200
        assert (await c.get("/_gateway/metrics", headers=host)).status_code == 200
        probe = {**host, "X-Original-URI": "/public/x", "X-Original-Method": "GET"}
        assert (await c.get("/auth", headers=probe)).status_code == 403
        forwarded = {**probe, "X-Forwarded-Host": "app.example.org", "X-Forwarded-Proto": "https"}
        assert (await c.get("/auth", headers=forwarded)).status_code == 200


async def test_a_websocket_to_another_host_is_closed_before_it_is_accepted(tmp_path: Path) -> None:
    config = make_config(tmp_path, upstream=UPSTREAM, server={"public_url": "https://app.example.org"})
    async with in_process(config) as gw:
        sent: list[Message] = []
        incoming: asyncio.Queue[Message] = asyncio.Queue()
        incoming.put_nowait({"type": "websocket.connect"})
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "scheme": "ws",
            "path": "/public/ws",
            "raw_path": b"/public/ws",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"evil.example")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
            "subprotocols": [],
        }

        async def send(message: Message) -> None:
            sent.append(message)

        await asyncio.wait_for(gw.app(scope, incoming.get, send), 5)
        assert sent == [{"type": "websocket.close", "code": 1008}]


def test_create_app_hands_handlers_what_they_use(tmp_path: Path) -> None:
    """The composition root: no handler holds the app (issue 11 item 1)."""
    app = create_app(make_config(tmp_path, upstream=UPSTREAM, routes={"auth": "/auth"}))
    assert isinstance(app.routes["/auth"], ForwardAuth)
    assert not any(isinstance(value, Gateway) for value in vars(app.routes["/auth"]).values())
    assert isinstance(app.protect, Protect)
    assert not any(isinstance(value, Gateway) for value in vars(app.protect).values())


@pytest.mark.parametrize("module", ["jinja2", "qrcode", "python_multipart"])
def test_a_missing_dependency_fails_at_start_up(module: str) -> None:
    """Issue 11 item 1: an ImportError was swallowed and the pages fell through to the upstream."""
    script = f"import sys; sys.modules[{module!r}] = None; import gateway.app"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode != 0 and f"ModuleNotFoundError: import of {module} halted" in done.stderr
