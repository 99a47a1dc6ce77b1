"""A real Redis Sentinel set and a real Redis Cluster on loopback, from Debian's redis-server
(``redis-server --sentinel``, ``redis-cli --cluster create``), each node on a free port and in
a temporary directory. tests/conftest.py turns them into session fixtures (``redis_sentinel``,
``redis_cluster``); the binaries are found there, with need_binary.

Sentinel: one master, one replica, three sentinels (quorum 2), every node with the password
``PASSWORD`` (sentinels too: the store URL's one password goes to both, see
gateway/store/redis_topology.py). Cluster: three masters, no password, one replica each in
the fixture.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.support.servers import free_port, wait_for_port

PASSWORD = "topology-test-pw"
SERVICE = "gwmaster"
_READY_TIMEOUT = 20.0


class _Node:
    """One redis-server process (data node or sentinel) with its own directory."""

    def __init__(self, binary: str, base: Path, name: str, args: list[str], config: str | None = None) -> None:
        self.port = free_port()
        self.dir = base / name
        self.dir.mkdir()
        command = [binary]
        if config is not None:  # a sentinel rewrites its config file: it must be its own
            path = self.dir / "sentinel.conf"
            path.write_text(config.replace("$PORT", str(self.port)).replace("$DIR", str(self.dir)))
            command += [str(path), "--sentinel"]
        command += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self, password: str | None = None) -> redis.Redis:
        return redis.Redis(port=self.port, password=password, socket_timeout=2, socket_connect_timeout=2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait(self) -> None:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _stop_all(nodes: list[_Node], base: Path) -> None:
    # All at once: a master told to stop waits a while for its replicas to catch up.
    for node in nodes:
        node.stop()
    for node in nodes:
        node.wait()
    shutil.rmtree(base, ignore_errors=True)


def _until(check: object, what: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {_READY_TIMEOUT}s")


_DATA = ["--save", "", "--appendonly", "no"]


class SentinelSet:
    """One master, one replica, three sentinels. ``url`` is the store URL for it."""

    def __init__(self, server: str) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="gw-sentinel-"))
        self.nodes: list[_Node] = []
        auth = ["--requirepass", PASSWORD, "--masterauth", PASSWORD]
        # No wait for more replicas before the first sync (redis' default is 5 s).
        self.master = self._add(server, "master", [*_DATA, *auth, "--repl-diskless-sync-delay", "0"])
        self.replica = self._add(server, "replica", [*_DATA, *auth, "--replicaof", "127.0.0.1", str(self.master.port)])
        config = "\n".join(
            [
                "port $PORT",
                "dir $DIR",
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2",
                f"sentinel auth-pass {SERVICE} {PASSWORD}",
                f"sentinel down-after-milliseconds {SERVICE} 1000",
                f"sentinel failover-timeout {SERVICE} 5000",
                f"requirepass {PASSWORD}",
                f"sentinel sentinel-pass {PASSWORD}",
                "",
            ]
        )
        self.sentinels = [self._add(server, f"sentinel{i}", [], config) for i in range(3)]

    def _add(self, binary: str, name: str, args: list[str], config: str | None = None) -> _Node:
        node = _Node(binary, self.base, name, args, config)
        self.nodes.append(node)
        return node

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://:{PASSWORD}@{hosts}/{SERVICE}/0"

    def start(self) -> None:
        for node in self.nodes:
            wait_for_port(node.port)
        replica = self.replica.client(PASSWORD)
        _until(lambda: replica.info("replication").get("master_link_status") == "up", "the replica")
        want = (b"127.0.0.1", self.master.port)
        for sentinel in self.sentinels:
            client = sentinel.client(PASSWORD)
            _until(lambda c=client: c.sentinel_get_master_addr_by_name(SERVICE) == want, "a sentinel")

    def wait_for_quorum(self) -> None:
        """Until every sentinel knows the two others and the replica (a failover needs it)."""
        for sentinel in self.sentinels:
            client = sentinel.client(PASSWORD)

            def known(c: redis.Redis = client) -> bool:
                state = c.sentinel_master(SERVICE)
                assert isinstance(state, dict)
                return int(state["num-other-sentinels"]) == 2 and int(state["num-slaves"]) == 1

            _until(known, "the sentinels' quorum")

    def stop(self) -> None:
        _stop_all(self.nodes, self.base)


class Cluster:
    """Three masters sharing the 16384 slots, each with ``replicas`` replicas. ``url`` is the
    store URL for it (the masters' addresses; the client learns the replicas from them)."""

    def __init__(self, server: str, cli: str, replicas: int = 0) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="gw-cluster-"))
        self.cli = cli
        self.replicas = replicas
        self.nodes: list[_Node] = []
        for i in range(3 * (1 + replicas)):
            bus = free_port()  # the default bus port (port + 10000) may be taken or out of range
            args = [*_DATA, "--cluster-enabled", "yes", "--cluster-port", str(bus), "--cluster-node-timeout", "2000"]
            self.nodes.append(_Node(server, self.base, f"node{i}", args))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self) -> None:
        for node in self.nodes:
            wait_for_port(node.port)
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=_READY_TIMEOUT,
        )
        for node in self.nodes:
            client = node.client()

            def ok(c: redis.Redis = client) -> bool:
                info = c.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                text = info.decode() if isinstance(info, bytes) else str(info)
                return "cluster_state:ok" in text and f"cluster_known_nodes:{len(self.nodes)}" in text

            _until(ok, "the cluster")

    def stop(self) -> None:
        _stop_all(self.nodes, self.base)
