"""``gateway demo``: the gateway in front of a bundled demo app, on the embedded store. DEMO ONLY.

One command, no other server: the demo app (``demo_app.py``) runs on a free loopback port in a
background thread, and the gateway serves ``host:port`` in front of it in ``jwt`` identity
mode, the demo app's password-less login issuing the JWT. State lives in ``state_dir``
(default ``./.gateway-demo``): the SQLite store and the generated encryption key, recovery
pepper and JWT secret, each made once, in a file only its owner can read (0600), so
enrolments survive a restart. Delete the directory to start over.

Sessions are not ``Secure`` so that plain ``http://127.0.0.1`` works; that, and the login
that believes any name, are why this must never face a real network.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from gateway import config as config_module
from gateway.config import Config
from gateway.crypto import new_key
from gateway.demo_app import AUDIENCE, COOKIE, ISSUER, DemoApp
from gateway.errors import ConfigError

DEFAULT_DIR = ".gateway-demo"

_BANNER = """
==========================================================================
  DEMO ONLY - NOT FOR PRODUCTION
  The demo login accepts any name without a password, and cookies are
  sent over plain HTTP. Never expose this to a network you do not trust.
==========================================================================

  Open {url} in your browser.

  1. Log in with any name (the demo's first factor).
  2. Scan the QR code with an authenticator app and type the code.
  3. Save your recovery codes, then you are on the protected page.

  State (keys and users): {state}   (delete it to start over)
  Stop with Ctrl-C.
"""


def secret_file(path: Path, make: Callable[[], str]) -> Path:
    """``path``, created with ``make()`` once, readable by its owner only."""
    if not path.exists():
        # O_EXCL: two demos started at once cannot both write (and disagree on) the secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(make() + "\n")
    os.chmod(path, 0o600)
    return path


def prepare_state(state: Path) -> None:
    """The state directory (0700) with its three secrets, each generated on first use."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    secret_file(state / "encryption.key", new_key)
    secret_file(state / "recovery.pepper", new_key)
    secret_file(state / "jwt.secret", lambda: secrets.token_urlsafe(32))


def demo_config(state: Path, host: str, port: int, upstream_port: int) -> Config:
    """The demo's configuration, validated like any ``gateway.toml``; after prepare_state."""
    keys, pepper, jwt_secret = state / "encryption.key", state / "recovery.pepper", state / "jwt.secret"
    data = {
        "server": {"host": host, "port": port},
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        "store": {"url": f"sqlite:///{state / 'gateway.db'}"},
        "encryption": {"keys_file": str(keys), "recovery_pepper_file": str(pepper)},
        "identity": {
            "mode": "jwt",
            "jwt": {"secret_file": str(jwt_secret), "cookie": COOKIE, "audience": AUDIENCE, "issuer": ISSUER},
            # A browser that has not logged in yet is sent to the demo's login page.
            "login_url": "/",
        },
        "totp": {"issuer": "Gateway demo"},
        "session": {"secure": False},
        # The demo's login must be reachable before anyone has a second factor.
        "paths": {"exclude": ["/", "/demo/*", "GET /favicon.ico"]},
    }
    return config_module.parse(data, env={}, source="gateway demo")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _start_demo_app(secret: str) -> tuple[uvicorn.Server, threading.Thread, int]:
    # Bound here, handed to uvicorn: no window in which another process could take the port.
    sock = _listen("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(
            DemoApp(secret),
            log_level="warning",
            access_log=False,
            lifespan="on",
            log_config=None,
            # The gateway adds its own; two Date headers would reach the browser.
            server_header=False,
            date_header=False,
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="demo-app", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the demo app did not start")
        time.sleep(0.01)
    return server, thread, port


def run_demo(host: str = "127.0.0.1", port: int = 8080, state_dir: str | None = None) -> int:
    from gateway.cli import serve

    state = Path(state_dir or DEFAULT_DIR).resolve()
    try:
        _listen(host, port).close()  # a clear message now beats a traceback after the banner
    except OSError as exc:
        print(f"gateway demo: cannot listen on {host}:{port}: {exc.strerror or exc}; try --port", file=sys.stderr)
        return 1
    try:
        prepare_state(state)
        app_server, thread, upstream_port = _start_demo_app((state / "jwt.secret").read_text("utf-8").strip())
    except (OSError, RuntimeError) as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 1
    try:
        config = demo_config(state, host, port, upstream_port)
    except ConfigError as exc:  # a state file edited by hand
        app_server.should_exit = True
        print(f"gateway demo: {exc} (delete {state} to start over)", file=sys.stderr)
        return 1
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - a comparison
    if ":" in shown:
        shown = f"[{shown}]"
    print(_BANNER.format(url=f"http://{shown}:{port}/", state=state), flush=True)
    try:
        return serve(config)
    finally:
        app_server.should_exit = True
        thread.join(timeout=5)
