"""What a real gateway process and its upstream hold open, counted before and after a fault
(tests/faults): the gateway's file descriptors (``/proc/PID/fd``), its event-loop tasks (the
``gateway_event_loop_tasks`` gauge, gateway/metrics.py) and the upstream's open connections, as
the upstream itself sees them. Also the one way those tests start their gateway: proxy mode on
SQLite, with user ``alice`` enrolled and a 2FA session opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from gateway.config import ENV_KEYS, ENV_PEPPER
from tests.support.load import SESSION_COOKIE, enrol_user
from tests.support.servers import free_port, gateway_process


@dataclass(frozen=True)
class Counts:
    fds: int
    upstream_connections: int
    tasks: int

    def within(self, before: Counts) -> bool:
        return (
            self.fds <= before.fds
            and self.upstream_connections <= before.upstream_connections
            and self.tasks <= before.tasks
        )


@dataclass(frozen=True)
class SessionGateway:
    """A running ``gateway run`` with alice's session."""

    port: int
    pid: int
    session: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Remote-User": "alice", "Cookie": f"{SESSION_COOKIE}={self.session}"}

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def tasks(self) -> int:
        """``gateway_event_loop_tasks``, scraped as its trusted loopback peer (the scrape's own
        request is one of them)."""
        text = httpx.get(self.url + "/_gateway/metrics", headers=self.headers).text
        for line in text.splitlines():
            if line.startswith("gateway_event_loop_tasks "):
                return int(float(line.split()[1]))
        raise AssertionError("the gateway reports no gateway_event_loop_tasks")

    def counts(self, upstream_connections: Callable[[], int]) -> Counts:
        return Counts(self.fds(), upstream_connections(), self.tasks())

    def settled(self, upstream_connections: Callable[[], int], before: Counts, settle: float) -> Counts:
        """The counts once they are back to ``before`` (or ``settle`` has passed: then as they are)."""
        deadline = time.monotonic() + settle
        while True:
            now = self.counts(upstream_connections)
            if now.within(before) or time.monotonic() > deadline:
                return now
            time.sleep(0.05)

    @contextlib.contextmanager
    def no_leak(
        self, upstream_connections: Callable[[], int], ok: Callable[[str], bool], settle: float
    ) -> Iterator[None]:
        """Nothing the block opened is left open once settled, and an ordinary request through
        the same gateway works before and after it."""
        assert ok("warm")
        before = self.settled(upstream_connections, self.counts(upstream_connections), settle)
        yield
        after = self.settled(upstream_connections, before, settle)
        assert ok("after")
        print(f"before {before}, after {after}")
        assert after.within(before), (before, after)


@contextlib.contextmanager
def session_gateway(base: Path, upstream_url: str, server: str = "", upstream: str = "") -> Iterator[SessionGateway]:
    """``gateway run`` in proxy mode in front of ``upstream_url``; ``server`` and ``upstream`` are
    extra TOML lines of those tables. The log is left at ``base / "gateway.log"``."""
    port = free_port()
    config = base / "gateway.toml"
    config.write_text(
        f"""
[server]
port = {port}
log_level = "warning"
{server}

[upstream]
url = "{upstream_url}"
{upstream}

[store]
url = "sqlite:///{base}/gateway.db"

[session]
secure = false
cookie = "{SESSION_COOKIE}"
"""
    )
    keys = {ENV_KEYS: Fernet.generate_key().decode(), ENV_PEPPER: Fernet.generate_key().decode()}
    log = base / "gateway.log"
    with gateway_process(config, port, keys, log) as proc:
        _, session = asyncio.run(enrol_user(f"http://127.0.0.1:{port}", "alice"))
        yield SessionGateway(port, proc.pid, session, log)
