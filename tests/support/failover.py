"""A Redis Sentinel deployment on loopback for the failover test: one master, one replica and
three sentinels (quorum 2), each on a free port, from Debian's redis-server (``--sentinel``).

The sentinels are quick to act so the test is short: a master silent for 1 s is subjectively
down (``down-after-milliseconds 1000``), and a failover that stalls is retried after 3 s
(``failover-timeout 3000``). ``announcements()`` records when the sentinels start naming the
promoted replica as master (redis-py's Sentinel client asks ``SENTINEL
get-master-addr-by-name`` again when a connection to the old master fails).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from tests.support.servers import free_port, wait_for_port

SERVICE = "gwmaster"


# The leader of a failover gives out the promoted replica's address from
# +failover-state-reconf-slaves on (sentinel.c, sentinelGetCurrentMasterAddress); every
# sentinel announces +switch-master once it has switched.
NEW_MASTER_EVENTS = ("+failover-state-reconf-slaves", "+switch-master")


class Announcements:
    """(time.monotonic(), sentinel port, event) of each event in NEW_MASTER_EVENTS."""

    def __init__(self) -> None:
        self.events: list[tuple[float, int, str]] = []
        self._first = threading.Event()
        self._lock = threading.Lock()

    def add(self, at: float, port: int, event: str) -> None:
        with self._lock:
            self.events.append((at, port, event))
        self._first.set()

    def wait(self, timeout: float) -> float:
        """The time of the first event, once there is one."""
        if not self._first.wait(timeout):
            raise TimeoutError("no sentinel named a new master")
        with self._lock:
            return min(at for at, _, _ in self.events)

    def since(self, start: float) -> list[str]:
        with self._lock:
            return [f"{event} from :{port} at +{at - start:.3f} s" for at, port, event in sorted(self.events)]


class SentinelTopology:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="gw-sentinel-"))
        self.master_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The store URL of issue 13: every sentinel, then the service name."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def _redis(self, port: int, *extra: str) -> None:
        data = self.dir / str(port)
        data.mkdir()
        self.procs[port] = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port)

    def _sentinel(self, port: int) -> None:
        conf = self.dir / f"sentinel-{port}.conf"  # a sentinel rewrites its own config file
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 3000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.procs[port] = subprocess.Popen(
            [self.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(port)

    def start(self) -> SentinelTopology:
        self._redis(self.master_port)
        self._redis(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        for port in self.sentinel_ports:
            self._sentinel(port)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 20.0) -> None:
        """Until the replica is in sync and every sentinel knows the replica and the others."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with redis.Redis(port=self.replica_port) as replica:
                    ready = replica.info("replication").get("master_link_status") == "up"
                for port in self.sentinel_ports:
                    with redis.Redis(port=port) as sentinel:
                        master: dict[str, Any] = sentinel.sentinel_master(SERVICE)
                    ready = ready and master["num-slaves"] >= 1 and master["num-other-sentinels"] >= 2
            except redis.RedisError:
                ready = False
            if ready:
                return
            time.sleep(0.1)
        raise RuntimeError("the sentinel deployment did not settle")

    def master(self) -> int:
        """The port of the master the sentinels name now."""
        with redis.Redis(port=self.sentinel_ports[0]) as sentinel:
            _host, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def kill(self, port: int) -> None:
        """SIGKILL: the server vanishes without a word, as in a crash or a lost machine."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(timeout=10)

    @contextlib.contextmanager
    def announcements(self) -> Iterator[Announcements]:
        """Listen to every sentinel (in a thread, so a busy event loop does not delay the
        timestamps) for the events after which it names the new master; subscribed on entry."""
        clients = [redis.Redis(port=p) for p in self.sentinel_ports]
        pubsubs = [c.pubsub(ignore_subscribe_messages=True) for c in clients]  # type: ignore[no-untyped-call]
        for pubsub in pubsubs:
            # Subscribed well before any kill: the load's users are enrolled first.
            pubsub.subscribe(*NEW_MASTER_EVENTS)
        seen = Announcements()
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                for port, pubsub in zip(self.sentinel_ports, pubsubs, strict=True):
                    message = pubsub.get_message(timeout=0.005)
                    if message is not None and message["type"] == "message":
                        seen.add(time.monotonic(), port, message["channel"].decode())

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        try:
            yield seen
        finally:
            stop.set()
            thread.join(timeout=10)
            for pubsub, client in zip(pubsubs, clients, strict=True):
                pubsub.close()
                client.close()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
