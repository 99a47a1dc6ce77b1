"""gateway/serve.py: the one entry point that builds the app and serves it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config as config_module
from gateway import serve as serve_module
from gateway.config import Config
from gateway.serve import APP_FACTORY, app_factory, uvicorn_config
from gateway.server import LimitedHttpToolsProtocol
from gateway.server_websocket import LimitedWebSocketProtocol
from gateway.shutdown import GoingAwayWebSocketProtocol
from tests.support.servers import ROOT, fresh_keys


def test_the_production_path_never_loads_the_demo() -> None:
    """The demo's password-less login lives in gateway.demo only: serving a config (gateway run)
    imports none of it, so no route of the served app can reach it."""
    probe = (
        "import sys, gateway.serve, gateway.app\n"
        "print(sorted(m for m in sys.modules if m.startswith('gateway.demo')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_worker_processes_load_the_config_the_parent_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/gateway.db"\n\n[server]\nworkers = 2\n')
    for name, value in fresh_keys().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(config_module.ENV_CONFIG, str(path))
    logged: list[Config] = []  # the process-wide logging setup is a worker's, not this test run's
    monkeypatch.setattr(serve_module, "configure_logging_for", logged.append)
    assert callable(app_factory())
    assert [c.server.workers for c in logged] == [2]  # each worker sets up its own logging
    built = uvicorn_config(config_module.load(path), APP_FACTORY)
    assert built.factory and built.workers == 2 and built.http is LimitedHttpToolsProtocol
    assert built.proxy_headers is False  # the gateway judges X-Forwarded-For itself


def test_the_shutdown_keys_reach_uvicorn(tmp_path: Path) -> None:
    """server.shutdown_grace is uvicorn's timeout_graceful_shutdown; shutdown_delay is read by
    gateway.shutdown.DrainingServer; WebSockets are closed by a protocol that says 1001."""
    path = tmp_path / "gateway.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/gateway.db"\n\n[server]\nshutdown_delay = 5\n')
    built = uvicorn_config(config_module.load(path, env=fresh_keys()), APP_FACTORY)
    assert built.timeout_graceful_shutdown == 30.0  # the default grace
    assert built.shutdown_delay == 5.0
    # The 1001 protocol, with send_timeout for a client that stops reading (gateway/server.py).
    assert built.ws is LimitedWebSocketProtocol and issubclass(built.ws, GoingAwayWebSocketProtocol)
