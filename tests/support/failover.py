"""What the failover test needs beyond tests/support/redis_topologies.py's SentinelSet: which
data node the sentinels name as master, a kill without a word, and when the sentinels start
naming the promoted replica (``announcements()``), timed in a thread of its own so a busy
event loop does not delay the timestamps.

The failover test builds its own SentinelSet (it kills the master; the session fixture
``redis_sentinel`` is shared with the store contract suite).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import redis

from tests.support.redis_topologies import PASSWORD, SERVICE, SentinelSet

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


def master_port(topology: SentinelSet) -> int:
    """The port of the master the first sentinel names now."""
    with topology.sentinels[0].client(PASSWORD) as sentinel:
        _host, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
    return int(port)


def kill(topology: SentinelSet, port: int) -> None:
    """SIGKILL the data node on ``port``: it vanishes, as in a crash or a lost machine."""
    node = next(n for n in (topology.master, topology.replica) if n.port == port)
    node.proc.kill()
    node.proc.wait(timeout=10)


@contextlib.contextmanager
def announcements(topology: SentinelSet) -> Iterator[Announcements]:
    """Listen to every sentinel for NEW_MASTER_EVENTS while inside."""
    ports = [s.port for s in topology.sentinels]
    clients = [s.client(PASSWORD) for s in topology.sentinels]
    pubsubs = [c.pubsub(ignore_subscribe_messages=True) for c in clients]  # type: ignore[no-untyped-call]
    for pubsub in pubsubs:
        # Subscribed well before any kill: the load's users are enrolled first.
        pubsub.subscribe(*NEW_MASTER_EVENTS)
    seen = Announcements()
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            for port, pubsub in zip(ports, pubsubs, strict=True):
                try:
                    message = pubsub.get_message(timeout=0.005)
                except redis.RedisError:
                    continue
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
