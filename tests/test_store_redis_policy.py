"""gateway/store/redis_checks.py: a Redis that may evict the gateway's keys is refused at start-up.

Against real redis-servers and a real ``gateway run``: an evicting ``maxmemory-policy``
(``allkeys-lru``, ``volatile-lru``) refuses to start with one line naming the policy and what to
set, writing nothing to Redis; ``noeviction`` starts; a server that renamed CONFIG (managed
Redis) starts with a WARNING that the policy could not be checked. A Cluster is checked on
every primary (issue 14, attacker B: an evicted secret read as "not enrolled").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from gateway.errors import StoreError
from gateway.store.redis_checks import check_eviction_policy
from gateway.store.redis_clients import build_client, close_client
from gateway.store.redis_topology import parse_redis_url
from tests.conftest import RedisServer, need_binary
from tests.support.redis_topologies import Cluster
from tests.support.servers import ROOT, free_port, fresh_keys, gateway_process

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_with(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A redis-server of its own started with the test's extra arguments."""
    server = RedisServer(need_binary("redis-server"), *request.param)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


def _config(tmp_path: Path, store_url: str) -> tuple[Path, int, dict[str, str]]:
    port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
port = {port}
log_level = "warning"

[upstream]
url = "http://127.0.0.1:{free_port()}"

[store]
url = "{store_url}"

[session]
secure = false
"""
    )
    return path, port, fresh_keys()


def _run_refused(tmp_path: Path, store_url: str) -> subprocess.CompletedProcess[str]:
    path, _, keys = _config(tmp_path, store_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(path)],
        env={**env, **keys},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("redis_with", "policy"),
    [(("--maxmemory-policy", "allkeys-lru"), "allkeys-lru"), (("--maxmemory-policy", "volatile-lru"), "volatile-lru")],
    indirect=["redis_with"],
)
def test_an_evicting_policy_refuses_to_start(redis_with: RedisServer, policy: str, tmp_path: Path) -> None:
    done = _run_refused(tmp_path, redis_with.url)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if "maxmemory-policy" in line]
    assert len(lines) == 1, done.stderr
    assert f"maxmemory-policy is {policy}:" in lines[0]
    assert "set maxmemory-policy noeviction" in lines[0]
    assert lines[0].startswith("gateway: the store at redis://127.0.0.1:")
    # Refused before anything was written: not even the store's identity.
    assert redis.Redis(port=redis_with.port).dbsize() == 0


@pytest.mark.parametrize("redis_with", [("--maxmemory-policy", "noeviction")], indirect=True)
def test_noeviction_starts(redis_with: RedisServer, tmp_path: Path) -> None:
    path, port, keys = _config(tmp_path, redis_with.url)
    log = tmp_path / "gateway.log"
    with gateway_process(path, port, keys, output=log) as proc:
        assert proc.poll() is None
        assert httpx.get(f"http://127.0.0.1:{port}/_gateway/ready", timeout=10).status_code == 200
    assert "maxmemory-policy" not in log.read_text()


@pytest.mark.parametrize("redis_with", [("--rename-command", "CONFIG", "")], indirect=True)
def test_a_renamed_config_command_warns_and_starts(redis_with: RedisServer, tmp_path: Path) -> None:
    path, port, keys = _config(tmp_path, redis_with.url)
    log = tmp_path / "gateway.log"
    with gateway_process(path, port, keys, output=log) as proc:
        assert proc.poll() is None
        assert httpx.get(f"http://127.0.0.1:{port}/_gateway/ready", timeout=10).status_code == 200
    warnings = [line for line in log.read_text().splitlines() if "could not check Redis's maxmemory-policy" in line]
    assert len(warnings) == 1, log.read_text()
    assert "WARNING" in warnings[0] and "it must be noeviction" in warnings[0]


async def test_a_cluster_is_checked_on_every_primary(redis_cluster: Cluster) -> None:
    """One primary of three evicting is enough to refuse (the keys of its slots)."""
    nodes = [node.client() for node in redis_cluster.nodes]
    primaries = [c for c in nodes if c.info("replication")["role"] == "master"]
    assert len(primaries) == 3
    last = primaries[-1]
    client = build_client(parse_redis_url(redis_cluster.url), 4, 5.0, 5.0)
    try:
        await check_eviction_policy(client)  # every primary noeviction: no error
        last.config_set("maxmemory-policy", "volatile-ttl")
        try:
            with pytest.raises(
                StoreError, match=r"maxmemory-policy is volatile-ttl: .* set maxmemory-policy noeviction"
            ):
                await check_eviction_policy(client)
        finally:
            last.config_set("maxmemory-policy", "noeviction")
    finally:
        await close_client(client)
