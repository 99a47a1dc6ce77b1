"""The app's own routes: health, readiness, metrics, and forward-auth-only mode."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.servers import GatewayServer, UpstreamProcess, make_config


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
