"""Real servers for the tests: the upstream app and the gateway, each on a free loopback port.

The gateway runs in-process under a real uvicorn server in a thread (real TCP, real ASGI
server, real store), so tests can build its config as data and seed its store directly.
``gateway_process`` runs it as the real ``gateway run`` command instead, for CLI-level tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
from cryptography.fernet import Fernet

from gateway import config as config_module
from gateway.app import create_app
from gateway.config import Config
from gateway.crypto import SecretBox
from gateway.errors import ConfigError, StoreError
from gateway.server import LimitedConfig
from gateway.server_limits import client_limits
from gateway.store import init_store, open_store_from_url
from gateway.totp import new_secret

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


class UpstreamProcess:
    """tests/support/upstream_app.py under uvicorn, in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.support.upstream_app:app",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def fresh_keys() -> dict[str, str]:
    """Fresh secrets for one gateway, as the environment would give them."""
    return {
        config_module.ENV_KEYS: Fernet.generate_key().decode(),
        config_module.ENV_PEPPER: Fernet.generate_key().decode(),
    }


def make_config(tmp_path: Path, upstream: str | dict[str, Any] | None = None, **tables: dict[str, Any]) -> Config:
    """A valid config for tests: sqlite store in tmp_path, plain-http sessions, overrides merged.
    ``upstream`` is the upstream URL, or the whole ``[upstream]`` table."""
    data: dict[str, dict[str, Any]] = {
        # A test's store is new: the gateway may make it (production's default never does).
        "store": {"url": f"sqlite:///{tmp_path}/gateway.db", "create": "if_missing"},
        "session": {"secure": False},
        "paths": {"exclude": ["/public/*", "/healthz", "GET /api/public/*"]},
    }
    if upstream:
        data["upstream"] = {"url": upstream} if isinstance(upstream, str) else dict(upstream)
    env = fresh_keys()
    for name, table in tables.items():
        if name == "env":
            env.update(table)
            continue
        data.setdefault(name, {}).update(table)
    return config_module.parse(data, env=env, source="test")


class GatewayServer:
    """create_app(config) under a real uvicorn server in a background thread."""

    def __init__(self, config: Config, **app_kwargs: Any) -> None:
        self.config = config
        self.port = free_port()
        self.app = create_app(config, **app_kwargs)
        self.server = uvicorn.Server(
            # The production protocol and its head limits (gateway/server.py), as `gateway run`.
            LimitedConfig(
                self.app,
                limits=client_limits(config.server),
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on",
                proxy_headers=False,
                access_log=False,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def enrol(config: Config, user: str, secret: str | None = None) -> str:
    """Give ``user`` an active secret directly in the store; returns the base32 secret."""
    secret = secret or new_secret()

    async def work() -> None:
        # A test's store: made here if the test has not started a gateway on it yet.
        store = open_store_from_url(config.store.url, config.store.prefix, create=True)
        await store.open()
        try:
            await store.set_secret(user, SecretBox(config.encryption.keys).encrypt(user, secret))
        finally:
            await store.close()

    run(work())
    return secret


@contextlib.contextmanager
def gateway_process(
    config_path: Path,
    port: int,
    keys: dict[str, str],
    output: Path | None = None,
    wrap: Sequence[str] = (),
    init: bool = True,
) -> Iterator[subprocess.Popen[bytes]]:
    """``gateway run --config PATH`` as a real process, with ``keys`` as its only ``GATEWAY_*``
    environment (none inherited from the caller's) and its output in ``output`` if given;
    yields once it listens on ``port``, and stops it afterwards. ``wrap``: a command that
    execs the rest (``unshare ... sh -c '...; exec "$@"'``), so the process is still the gateway.
    ``init``: first give the store its identity, as ``gateway store init`` (README), in-process
    (no second interpreter start); False for a test of a store that lost its data."""
    if init:
        init_store_of(config_path, keys)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(keys)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(output.open("wb")) if output is not None else None
        proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "gateway", "run", "--config", str(config_path)],
            env=env,
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT if sink is not None else None,
        )
        try:
            wait_for_port(port)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def init_store_of(config_path: Path, keys: dict[str, str]) -> None:
    """What ``gateway store init --config PATH`` does, in-process; a config or store that fails
    is left for the gateway to report as it starts (what such a test asserts)."""
    with contextlib.suppress(ConfigError, StoreError, OSError):
        config = config_module.load(config_path, env=keys)
        # On a thread of its own: gateway_process is entered from async tests too.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(run, init_store(config.store.url, config.store.prefix)).result()


def gateway_users(config_path: Path, keys: dict[str, str], *args: str) -> str:
    """``gateway users ARGS`` against the store of the config at ``config_path``, as an operator
    runs it (no GATEWAY_* of the test's own environment, ``keys`` instead); its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "users", *args, "--config", str(config_path)],
        env={**env, **keys},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
