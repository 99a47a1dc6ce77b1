"""Fixtures that start real servers on free loopback ports and stop them afterwards.

A server binary that is missing skips the tests that need it, except when
``GATEWAY_TEST_REQUIRE_ALL=1`` (set by ``.ci/run``): then it fails, so CI can never pass
by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.store.sqlite import SqliteStore
from tests.support.redis_topologies import Cluster, SentinelSet
from tests.support.servers import UpstreamProcess, free_port, wait_for_port

REQUIRE_ALL = os.environ.get("GATEWAY_TEST_REQUIRE_ALL") == "1"


def need_binary(name: str) -> str:
    """The path of a server binary, or skip (fail under GATEWAY_TEST_REQUIRE_ALL)."""
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        message = f"{name} is not installed"
        if REQUIRE_ALL:
            pytest.fail(message + " (GATEWAY_TEST_REQUIRE_ALL=1)")
        pytest.skip(message)
    return path


class RedisServer:
    def __init__(self, binary: str, *extra: str) -> None:
        """``extra``: more redis-server arguments (``--requirepass PW``)."""
        self.binary = binary
        self.extra = extra
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="gw-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(need_binary("redis-server"))
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelSet]:
    """A Sentinel set: 1 master, 1 replica, 3 sentinels (tests/support/redis_topologies.py)."""
    topology = SentinelSet(need_binary("redis-server"))
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """A Redis Cluster of 3 masters, each with a replica (tests/support/redis_topologies.py)."""
    topology = Cluster(need_binary("redis-server"), need_binary("redis-cli"), replicas=1)
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamProcess]:
    server = UpstreamProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A real SQLite store in a fresh file (tests/test_store.py runs the contract on every backend)."""
    sqlite = SqliteStore(str(tmp_path / "gateway.db"), create=True)
    await sqlite.open()
    yield sqlite
    await sqlite.close()
