"""``gateway keys rotate`` as an operator runs it (a real process) while a real gateway serves
code checks on the same Redis: no check fails because its user's secret is being rewritten
(issue 13 §5). The gateway is deployed first with the new key list (new key first, old kept),
as the README's rotation steps say; the rotation then rewrites every secret under the new key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
from cryptography.fernet import Fernet

from gateway.config import ENV_KEYS, ENV_PEPPER
from gateway.crypto import SecretBox
from gateway.store import open_store_from_url
from gateway.totp import new_secret
from tests.conftest import RedisServer, need_binary
from tests.support.load import Replica, check_codes, keys_rotate
from tests.support.servers import UpstreamProcess

USERS = 3000


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test alone: the rotation reads every secret of the store's prefix."""
    server = RedisServer(need_binary("redis-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _seed(url: str, key: str, users: list[str]) -> dict[str, str]:
    box = SecretBox([key])
    secrets = {user: new_secret() for user in users}
    store = open_store_from_url(url, "gw", create=True)  # seeding makes the store
    await store.open()
    try:
        await asyncio.gather(*(store.set_secret(u, box.encrypt(u, s)) for u, s in secrets.items()))
    finally:
        await store.close()
    return secrets


async def test_no_code_check_fails_while_keys_rotate(
    own_redis: RedisServer, upstream: UpstreamProcess, tmp_path: Path
) -> None:
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    keys = {ENV_KEYS: f"{new_key},{old_key}", ENV_PEPPER: Fernet.generate_key().decode()}
    secrets = await _seed(own_redis.url, old_key, [f"rot-{i:05d}" for i in range(USERS)])
    with Replica(tmp_path, "gw", own_redis.url, upstream.url, keys) as gateway:
        done: list[tuple[float, float, int]] = []
        work = [(user, pyotp.TOTP(secret).now) for user, secret in secrets.items()]
        checks = asyncio.create_task(check_codes(gateway.url, work, done, clients=16))
        while len(done) < 50:  # the load is under way before the rotation starts
            await asyncio.sleep(0.05)
        started = time.monotonic()
        returncode, out, err = await keys_rotate(gateway.config_path, keys, 120)
        ended = time.monotonic()
        await asyncio.wait_for(checks, 120)
    assert returncode == 0, err
    assert out.startswith(f"rotated {USERS}, already current 0"), out
    assert "keys rotate: " in err  # progress lines: stderr is not a terminal here
    during = [status for start, end, status in done if end > started and start < ended]
    assert during, "no code check overlapped the rotation"
    failed = [status for _, _, status in done if status != 200]
    assert (len(done), failed) == (USERS, [])
