"""Gateway configurations and store contents for the benchmark.

Users are enrolled and sessions opened through the gateway's own code (``SecretBox``,
``Store``, ``SecondFactor``); a session for the HTTP rows comes from one real code check over
HTTP. Only the bulk seeding of row 8 (up to a million users) writes Redis directly, with
``redis-cli --pipe``, using the key names and value layout of ``gateway.store.redis_layout`` itself,
and reads a sample back through the store to prove the layout still matches.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pyotp
from cryptography.fernet import Fernet

from gateway import config as config_module
from gateway.config import Config
from gateway.crypto import SecretBox
from gateway.factors import SecondFactor, hash_session_id
from gateway.store import open_store_from_url
from gateway.totp import new_secret


def key_env() -> dict[str, str]:
    """Fresh secrets for the gateways of one run, as the environment would give them."""
    return {
        config_module.ENV_KEYS: Fernet.generate_key().decode(),
        config_module.ENV_PEPPER: Fernet.generate_key().decode(),
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"no TOML for {value!r}")


def write_config(path: Path, env: Mapping[str, str], tables: Mapping[str, Mapping[str, Any]]) -> Config:
    """Write a gateway TOML file and load it back exactly as ``gateway run`` would."""
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return config_module.load(path, env=env)


def gateway_tables(
    port: int, redis_port: int, prefix: str, upstream_url: str | None = None, **extra: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        # A bench's store is new (a prefix of its own): the gateway makes it on start.
        "store": {"url": f"redis://127.0.0.1:{redis_port}/0", "prefix": prefix, "create": "if_missing"},
        "session": {"secure": False},
    }
    if upstream_url:
        tables["upstream"] = {"url": upstream_url}
    for name, values in extra.items():
        tables.setdefault(name, {}).update(values)
    return tables


async def _with_store(config: Config, work: Any) -> Any:
    store = open_store_from_url(config.store.url, config.store.prefix, create=True)  # seeding makes the store
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


def enrol(config: Config, users: Sequence[str]) -> dict[str, str]:
    """Give each user an active secret, stored as the gateway stores it; returns the secrets."""
    box = SecretBox(config.encryption.keys)
    secrets = {user: new_secret() for user in users}

    async def work(store: Any) -> None:
        for user, secret in secrets.items():
            await store.set_secret(user, box.encrypt(user, secret))

    asyncio.run(_with_store(config, work))
    return secrets


def open_sessions(config: Config, users: Sequence[str]) -> list[tuple[str, str]]:
    """A 2FA session for each user, opened by the gateway's own ``SecondFactor``."""

    async def work(store: Any) -> list[tuple[str, str]]:
        factors = SecondFactor(config, store)
        opened = []
        for user in users:
            session = await factors.open_session(user)
            if session is None:  # only when the user's sessions are ended meanwhile: nothing here does that
                raise RuntimeError(f"no session opened for user {user!r}")
            opened.append((user, session))
        return opened

    result: list[tuple[str, str]] = asyncio.run(_with_store(config, work))
    return result


def session_by_code(url: str, headers: Mapping[str, str], config: Config, secret: str) -> str:
    """Do one real code verification over HTTP; return the session id the gateway set."""
    code = pyotp.TOTP(secret, digits=config.totp.digits, interval=config.totp.period).now()
    response = httpx.get(url, headers={**headers, config.totp.header: code}, timeout=10)
    cookie = response.cookies.get(config.session.cookie)
    if response.status_code != 200 or not cookie:
        raise RuntimeError(f"code verification at {url} failed: {response.status_code} {response.text[:200]}")
    return cookie


def bulk_seed(redis_port: int, config: Config, count: int, sessions: bool = True) -> float:
    """Add ``count`` filler users (one secret each, and a live session each when ``sessions``)
    in the key layout of ``gateway.store.redis_layout``; returns the seconds it took."""
    from gateway.store.redis import RedisStore
    from gateway.store.redis_layout import pack_expiring

    started = time.monotonic()
    store = RedisStore(config.store.url, config.store.prefix, create=True)
    ciphertext = SecretBox(config.encryption.keys).encrypt("filler", new_secret())
    expires = time.time() + 3600

    def commands() -> Iterator[bytes]:
        for i in range(count):
            user = f"filler-{i:07d}"
            yield _resp(b"SET", store._key(user, "secret").encode(), ciphertext)
            if sessions:
                yield _resp(
                    b"SET",
                    store._session_key(hash_session_id(f"filler-session-{i}")).encode(),
                    pack_expiring(expires, user.encode()),
                    b"PXAT",
                    str(int(expires * 1000)).encode(),
                )

    pipe_to_redis(redis_port, commands())
    _check_layout(config, count - 1, ciphertext, expires, sessions)
    return time.monotonic() - started


def pipe_to_redis(redis_port: int, commands: Iterable[bytes]) -> None:
    """Feed RESP ``commands`` to ``redis-cli --pipe`` (Redis's mass insertion), 10,000 at a
    time; raise if any failed."""
    with subprocess.Popen(
        ["redis-cli", "-p", str(redis_port), "--pipe"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        batch: list[bytes] = []
        for command in commands:
            batch.append(command)
            if len(batch) >= 10_000:
                proc.stdin.write(b"".join(batch))
                batch.clear()
        proc.stdin.write(b"".join(batch))
        proc.stdin.close()
        report = proc.stdout.read().decode(errors="replace")
        if proc.wait(timeout=600) != 0 or "errors: 0" not in report:
            raise RuntimeError(f"redis-cli --pipe failed: {report}")


def _check_layout(config: Config, i: int, ciphertext: bytes, expires: float, sessions: bool) -> None:
    async def work(store: Any) -> None:
        user = f"filler-{i:07d}"
        if await store.get_secret(user) != ciphertext:
            raise RuntimeError("bulk-seeded secrets do not read back through the store: the key layout changed")
        if sessions and await store.get_session(hash_session_id(f"filler-session-{i}"), expires - 60) != user:
            raise RuntimeError("bulk-seeded sessions do not read back through the store: the layout changed")

    asyncio.run(_with_store(config, work))


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)
