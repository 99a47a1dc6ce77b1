"""``python -m bench.rotate_scale [--users N]``: how long ``gateway keys rotate`` takes over N
users (default 1,000,000) on one local Redis, and how long a rerun takes once all are current.

The users are seeded as bench row 8 seeds its fillers (``redis-cli --pipe``, the key layout of
``gateway.store.redis_layout``), but each with a secret of its own encrypted for that user under
an old key, as a real store would hold; the rotation is ``gateway.admin.rotate_keys`` itself,
with the new key first and the old one kept. tests/test_bench_rotate.py runs a 10,000-user version.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography.fernet import Fernet

from bench.seed import _resp, pipe_to_redis
from gateway import admin
from gateway.config import ENV_KEYS, Config
from gateway.crypto import SecretBox
from gateway.store import init_store
from gateway.store.redis_layout import user_key
from gateway.totp import new_secret
from tests.conftest import RedisServer
from tests.support.servers import make_config


@dataclass(frozen=True)
class RotateFigures:
    users: int
    seed_s: float
    rotate_s: float
    rerun_s: float
    summary: str
    rerun_summary: str


def _seed(redis_port: int, config: Config, count: int) -> float:
    """``count`` users, each with its own secret under ``config``'s key; the seconds it took."""
    started = time.monotonic()
    box = SecretBox(config.encryption.keys)
    secret = new_secret()  # one secret, encrypted per user: the cost of the rotation is the same

    def commands() -> Iterator[bytes]:
        for i in range(count):
            user = f"rot-{i:07d}"
            yield _resp(b"SET", user_key(config.store.prefix, user, "secret").encode(), box.encrypt(user, secret))

    pipe_to_redis(redis_port, commands())
    return time.monotonic() - started


def measure(users: int, work: Path, progress: TextIO | None = None) -> RotateFigures:
    """Seed ``users`` on a fresh Redis, rotate them all, rotate again; the figures."""
    redis = RedisServer("redis-server")
    redis.start()
    try:
        old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
        store = {"url": redis.url, "prefix": f"rot{uuid.uuid4().hex[:6]}"}
        old = make_config(work, "http://127.0.0.1:9", store=store, env={ENV_KEYS: old_key})
        new = make_config(work, "http://127.0.0.1:9", store=store, env={ENV_KEYS: f"{new_key},{old_key}"})
        seed_s = _seed(redis.port, old, users)
        asyncio.run(init_store(redis.url, store["prefix"]))  # the seeded store is a store made on purpose
        started = time.monotonic()
        summary = admin.rotate_keys(new, progress=progress)
        rotate_s = time.monotonic() - started
        started = time.monotonic()
        rerun_summary = admin.rotate_keys(new, progress=progress)
        rerun_s = time.monotonic() - started
        return RotateFigures(users, seed_s, rotate_s, rerun_s, summary, rerun_summary)
    finally:
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rotate_scale", description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gw-rotate-"))
    figures = measure(args.users, work)
    print(
        f"keys rotate over {figures.users:,} users on one Redis: seeded in {figures.seed_s:.1f} s, "
        f"rotated in {figures.rotate_s:.1f} s ({figures.users / figures.rotate_s:,.0f} users/s), "
        f"a rerun (all current) in {figures.rerun_s:.1f} s\n{figures.summary}"
    )


if __name__ == "__main__":
    main()
