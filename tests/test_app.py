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


def test_forward_auth_only_mode_serves_no_upstream(tmp_path: Path) -> None:
    server = GatewayServer(make_config(tmp_path)).start()
    try:
        r = httpx.get(server.url + "/anything", headers={"Remote-User": "alice"})
        assert r.status_code == 404
        assert r.json()["error"] == "not_found"
    finally:
        server.stop()
