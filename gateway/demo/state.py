"""The demo's state directory and its configuration. DEMO ONLY.

State lives in ``state_dir`` (default ``./.gateway-demo``): the SQLite store and the generated
encryption key, recovery pepper and JWT secret, each made once, so enrolments survive a
restart. The directory is 0700 and every file in it 0600, the database included (its secrets
are encrypted, but sessions, recovery-code hashes and lockouts are not anyone else's to read).
Delete the directory to start over.

Sessions are not ``Secure`` so that plain ``http://127.0.0.1`` works; that, and the login that
believes any name (``login_app``), are why this must never face a real network.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import config as config_module
from gateway.config import Config
from gateway.crypto import new_key
from gateway.demo.login_app import AUDIENCE, COOKIE, ISSUER
from gateway.errors import ConfigError
from gateway.store import init_store

DEFAULT_DIR = ".gateway-demo"
DATABASE = "gateway.db"
# SQLite's companions of the database in WAL mode: they hold the same rows for a while.
_DATABASE_COMPANIONS = ("-wal", "-shm")
# For `gateway users --demo`, which opens the store only: no upstream is contacted.
_NO_UPSTREAM_PORT = 9


def state_path(state_dir: str | None) -> Path:
    """The absolute state directory, ``./.gateway-demo`` by default."""
    return Path(state_dir or DEFAULT_DIR).resolve()


def secret_file(path: Path, make: Callable[[], str]) -> Path:
    """``path``, created with ``make()`` once, readable by its owner only."""
    if not path.exists():
        # O_EXCL: two demos started at once cannot both write (and disagree on) the secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(make() + "\n")
    os.chmod(path, 0o600)
    return path


def _private_database(path: Path) -> None:
    """The database file exists, mode 0600, before SQLite opens it: SQLite makes a new file
    0644 (under the usual umask), and gives its -wal and -shm files the database's mode. An
    empty file is a valid empty database. A database from an older demo is made private too."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb"):
        pass
    for candidate in (path, *(path.with_name(path.name + suffix) for suffix in _DATABASE_COMPANIONS)):
        if candidate.exists():
            os.chmod(candidate, 0o600)


def prepare_state(state: Path) -> None:
    """The state directory (0700) with its three secrets, each generated on first use, and the
    private database file."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    secret_file(state / "encryption.key", new_key)
    secret_file(state / "recovery.pepper", new_key)
    secret_file(state / "jwt.secret", lambda: secrets.token_urlsafe(32))
    _private_database(state / DATABASE)
    # The demo's own store, in its own directory: made here, deliberately, as `gateway store
    # init` would (a `gateway run` never makes one by default: gateway/store/sqlite.py).
    asyncio.run(init_store(store_url(state), "gw"))


def store_url(state: Path) -> str:
    return f"sqlite:///{state / DATABASE}"


def demo_config(state: Path, host: str, port: int, upstream_port: int) -> Config:
    """The demo's configuration, validated like any ``gateway.toml``; after prepare_state.

    It reads no environment variable: the demo's keys are its own files."""
    keys, pepper, jwt_secret = state / "encryption.key", state / "recovery.pepper", state / "jwt.secret"
    data: dict[str, Any] = {
        "server": {"host": host, "port": port},
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        "store": {"url": store_url(state)},
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


def existing_demo_config(state_dir: str | None) -> Config:
    """The demo's configuration for managing its users (``gateway users --demo``): its store
    and keys. Raises ConfigError when no demo has run with this state directory."""
    state = state_path(state_dir)
    if not (state / "encryption.key").is_file():
        raise ConfigError([f"no demo state in {state}: start `gateway demo` first (or give its --dir)"])
    _private_database(state / DATABASE)
    return demo_config(state, "127.0.0.1", 8080, _NO_UPSTREAM_PORT)
