"""Real third-party apps for the integration tests, each on a free loopback port, and the
gateway in proxy mode in front of one of them.

* ``JupyterServer``: Jupyter Server (JupyterLab's extension loaded when installed) with no
  token, no password and no ``allow_origin``, so the gateway is the only gate and Jupyter's
  own Origin-vs-Host and XSRF checks run as they do for anyone who installs it. Its root and
  every ``JUPYTER_*``/``IPYTHONDIR``/``HOME`` directory are in the test's tmp directory.
* ``DjangoSite``: tests/support/django_site (the admin, CSRF on) under gunicorn, its sqlite
  database migrated and given a superuser.
* ``ProxyGateway``: ``gateway run`` as a real process in proxy mode (header identity from
  loopback), with ``enrol_session`` doing what a person does: setup, a code, a session cookie.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pyotp

from tests.support.servers import ROOT, free_port, fresh_keys, gateway_process, gateway_users, wait_for_port

ADMIN_USER = "admin"
# store.cache_ttl of every ProxyGateway (its default, written out): an ended 2FA session closes
# open WebSockets within about this long.
CACHE_TTL = 1.0
SESSION_COOKIE = "gateway_session"


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_until_listening(proc: subprocess.Popen[bytes], port: int, name: str, log: Path) -> None:
    """Wait for ``port`` to accept connections; if ``proc`` exits first or never listens, stop
    it and fail with the end of its log."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            wait_for_port(port, timeout=0.5)
            return
        except RuntimeError:
            continue
    _stop(proc)
    raise RuntimeError(f"{name} did not start:\n" + log.read_text(errors="replace")[-3000:])


def _isolated_env(home: Path) -> dict[str, str]:
    """The caller's environment with every per-user directory of Jupyter, IPython and the rest
    moved into ``home``: nothing is read from or written to the real $HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "JUPYTER", "IPYTHON"))}
    dirs = {
        "HOME": home,
        "XDG_CONFIG_HOME": home / ".config",
        "XDG_CACHE_HOME": home / ".cache",
        "XDG_DATA_HOME": home / ".local" / "share",
        "JUPYTER_CONFIG_DIR": home / "jupyter-config",
        "JUPYTER_DATA_DIR": home / "jupyter-data",
        "JUPYTER_RUNTIME_DIR": home / "jupyter-runtime",
        "JUPYTERLAB_SETTINGS_DIR": home / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": home / "lab-workspaces",
        "IPYTHONDIR": home / "ipython",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class JupyterServer:
    """``jupyter server`` in its own process; its log (at debug level: every request) in ``log``."""

    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.root = base / "root"
        self.root.mkdir(parents=True)
        self.home = base / "home"
        self.log = base / "jupyter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def start(self) -> JupyterServer:
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "jupyter_server",
                    "--no-browser",
                    "--ip=127.0.0.1",
                    f"--port={self.port}",
                    "--port-retries=0",
                    f"--ServerApp.root_dir={self.root}",
                    # No token and no password: the gateway is the only gate. Nothing else is
                    # relaxed: no allow_origin, XSRF checks on, remote access off.
                    "--IdentityProvider.token=",
                    "--ServerApp.password=",
                    "--ServerApp.log_level=DEBUG",
                    # Jupyter refuses root unless told; CI containers run as root.
                    *(["--allow-root"] if os.geteuid() == 0 else []),
                ],
                cwd=self.root,
                env=_isolated_env(self.home),
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        _wait_until_listening(self.proc, self.port, "Jupyter Server", self.log)
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


class DjangoSite:
    """tests/support/django_site under gunicorn, with a migrated sqlite database and a superuser."""

    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.base = base
        self.log = base / "gunicorn.log"
        self.password = secrets.token_urlsafe(16)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "DJANGO"))},
            "DJANGO_SETTINGS_MODULE": "tests.support.django_site.settings",
            "DJANGO_SITE_SECRET_KEY": secrets.token_urlsafe(50),
            "DJANGO_SITE_DB": str(base / "django.sqlite3"),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def _manage(self, *args: str, **env: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "django", *args],
            cwd=ROOT,
            env={**self.env, **env},
            check=True,
            capture_output=True,
        )

    def start(self) -> DjangoSite:
        self._manage("migrate", "--noinput")
        self._manage(
            "createsuperuser",
            "--noinput",
            f"--username={ADMIN_USER}",
            "--email=admin@example.invalid",
            DJANGO_SUPERUSER_PASSWORD=self.password,
        )
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    f"--bind=127.0.0.1:{self.port}",
                    "--workers=1",
                    "--access-logfile=-",
                    "tests.support.django_site.wsgi:application",
                ],
                cwd=ROOT,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        _wait_until_listening(self.proc, self.port, "gunicorn", self.log)
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


class ProxyGateway:
    """``gateway run`` in proxy mode in front of ``upstream``; ``upstream_table`` adds keys to
    ``[upstream]`` (e.g. ``pass_host = false``). Enter it to start, leave it to stop."""

    def __init__(self, base: Path, upstream: str, **upstream_table: Any) -> None:
        self.port = free_port()
        self.base = base
        self.keys = fresh_keys()
        self.output = base / "gateway.log"
        self.config_path = base / "gateway.toml"
        extra = "".join(f"{key} = {_toml(value)}\n" for key, value in upstream_table.items())
        self.config_path.write_text(
            f"""
[server]
port = {self.port}
log_level = "info"

[upstream]
url = "{upstream}"
{extra}
[store]
url = "sqlite:///{base}/gateway.db"
cache_ttl = {CACHE_TTL}

[session]
secure = false
cookie = "{SESSION_COOKIE}"
"""
        )
        self._stack = contextlib.ExitStack()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        """What a browser that loaded a page from the gateway sends as ``Origin``."""
        return self.url

    def __enter__(self) -> ProxyGateway:
        self._stack.enter_context(gateway_process(self.config_path, self.port, self.keys, self.output))
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stack.close()

    def enrol_session(self, user: str) -> str:
        """Enrol ``user`` over HTTP as a program does (setup, then a code) and return the 2FA
        session cookie's value."""
        who = {"Remote-User": user, "Accept": "application/json"}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            r = client.post("/setup-2fa", headers=who)
            assert r.status_code == 200, r.text
            secret = pyotp.parse_uri(r.json()["otpauth_uri"]).secret
            r = client.post("/verify-2fa", headers=who, json={"code": pyotp.TOTP(secret).now()})
            assert r.status_code == 200, r.text
            session = r.cookies[SESSION_COOKIE]
        assert session
        return session

    def users(self, *args: str) -> str:
        """``gateway users ARGS`` against this gateway's store, as an operator runs it; its output."""
        return gateway_users(self.config_path, self.keys, *args)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


@contextlib.contextmanager
def running(server: JupyterServer | DjangoSite) -> Iterator[Any]:
    """Start ``server``, yield it, stop it."""
    try:
        yield server.start()
    finally:
        server.stop()
