"""``gateway demo``: the toy app and the gateway in front of it, from one command. DEMO ONLY.

One command, no other server: the toy app (``login_app``) runs on a free loopback port in a
background thread, and the gateway serves ``host:port`` in front of it in ``jwt`` identity mode,
the toy app's password-less login issuing the JWT. The gateway is served exactly as by
``gateway run`` (``gateway.serve``); the state and configuration are ``state``'s.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

import uvicorn

from gateway.demo.login_app import DemoApp
from gateway.demo.state import demo_config, prepare_state, state_path, store_url
from gateway.errors import ConfigError
from gateway.serve import serve

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
  Store: {store}
  Its users: gateway users list --demo --dir {state}
             (also show, reset, logout, unlock)
  Stop with Ctrl-C.
"""


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
    """Serve the demo until stopped; the exit status."""
    state = state_path(state_dir)
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
    banner = _BANNER.format(url=f"http://{shown}:{port}/", state=state, store=store_url(state))
    print(banner, flush=True)
    try:
        return serve(config)
    finally:
        app_server.should_exit = True
        thread.join(timeout=5)
