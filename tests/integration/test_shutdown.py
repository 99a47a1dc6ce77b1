"""gateway/shutdown.py: ``gateway run`` with several workers, and what SIGTERM does to it.

Each test runs the real command (``tests.support.servers.gateway_process``) against the real
upstream (``tests/support/upstream_app.py``); the store is SQLite or a real redis-server.
"""

from __future__ import annotations

import hashlib
import http.client
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pyotp
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import RedisServer
from tests.support.servers import UpstreamProcess, free_port, fresh_keys, gateway_process
from tests.support.upstream_app import pattern

MIB = 1024 * 1024
DOWNLOAD = 200 * MIB
DOWNLOAD_RATE = 50 * MIB  # bytes a second the client reads: the download takes about 4 s
DELAY = 1.0  # server.shutdown_delay here: readiness 503 while the listener is still open
COOKIE = "gateway_session"  # session.cookie's default
EXIT_BOUND = 10.0  # seconds past shutdown_delay + shutdown_grace a stopping process may take


@contextmanager
def _gateway(
    tmp_path: Path, upstream: str, store: str, **server: float
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``gateway run`` with ``[server]`` keys ``server``; yields the process and its port."""
    port = free_port()
    path = tmp_path / "gateway.toml"
    keys = "".join(f"{name} = {value!r}\n" for name, value in server.items())
    path.write_text(
        f'[server]\nport = {port}\n{keys}\n[upstream]\nurl = "{upstream}"\n\n[store]\nurl = "{store}"\n'
        # A prefix of its own: the test session's Redis holds other tests' secrets, under other keys.
        f'prefix = "w{secrets.token_hex(6)}"\n\n'
        '[session]\nsecure = false\n\n[paths]\nexclude = ["/public/*"]\n'
    )
    with gateway_process(path, port, fresh_keys(), tmp_path / "output.log") as proc:
        yield proc, port


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the workers of a supervisor)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _holder(workers: list[int], port: int, client_port: int) -> int | None:
    """The worker holding the server side of the connection from ``client_port``."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            if local == port and remote == client_port and fields[3] == "01":  # 01: established
                inode = fields[9]
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if fd.readlink().name == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_workers_share_enrolment_and_sessions(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, upstream: UpstreamProcess
) -> None:
    """workers = 2 on either store: enrol and verify over HTTP, then the one session is valid on
    connections served by each of the two workers."""
    if backend == "redis":
        store = request.getfixturevalue("redis_server")
        assert isinstance(store, RedisServer)
        url = store.url
    else:
        url = f"sqlite:///{tmp_path}/gateway.db"
    user = f"worker-{secrets.token_hex(4)}"
    with _gateway(tmp_path, upstream.url, url, workers=2) as (proc, port):
        base = f"http://127.0.0.1:{port}"
        identity = {"Remote-User": user, "Accept": "application/json"}
        fresh = httpx.Limits(max_keepalive_connections=0)  # every request on a new connection
        with httpx.Client(base_url=base, timeout=10, limits=fresh) as client:
            r = client.post("/setup-2fa", headers=identity)
            assert r.status_code == 200, r.text
            code = pyotp.TOTP(pyotp.parse_uri(r.json()["otpauth_uri"]).secret).now()
            r = client.post("/verify-2fa", headers=identity, json={"code": code})
            assert r.status_code == 200, r.text
            cookie = f"{COOKIE}={r.cookies[COOKIE]}"
            client.cookies.clear()
            # The code, spent on one worker, is refused on any (RFC 6238 §5.2).
            replay = client.get("/private", headers={**identity, "X-2FA-Code": code})
            assert replay.status_code in (401, 403), replay.text
            assert client.get("/private", headers=identity).status_code in (401, 403)

        workers = _children(proc.pid)
        served: dict[int, int] = {}
        held: list[http.client.HTTPConnection] = []  # kept open, so the kernel cannot reuse a port
        try:
            while len(served) < 2 and len(held) < 64:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                held.append(conn)
                conn.request("GET", "/private/worker", headers={**identity, "Cookie": cookie})
                response = conn.getresponse()
                assert response.status == 200, response.read()
                response.read()
                assert conn.sock is not None
                pid = _holder(workers, port, conn.sock.getsockname()[1])
                assert pid is not None
                served[pid] = served.get(pid, 0) + 1
        finally:
            for conn in held:
                conn.close()
        assert len(served) == 2, f"{len(held)} connections were all served by one worker"


def _expected_digest(size: int) -> str:
    digest = hashlib.sha256()
    block = pattern(65536)
    for _ in range(size // len(block)):
        digest.update(block)
    digest.update(block[: size % len(block)])
    return digest.hexdigest()


def _ready(port: int, retry: bool = True) -> int | None:
    """The status of ``GET /_gateway/ready`` on a new connection; None if the connection is refused.

    A connection that lands in the listen backlog in the instant the listener closes is reset
    by the kernel rather than refused: asked again, a closed listener refuses. A listener that
    stays open and resets every connection (the supervisor keeping its copy) resets both."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/_gateway/ready")
        return conn.getresponse().status
    except ConnectionRefusedError:
        return None
    except ConnectionResetError:
        if not retry:
            raise
        time.sleep(0.2)
        return _ready(port, retry=False)
    finally:
        conn.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_a_200_mib_download_finish(workers: int, tmp_path: Path, upstream: UpstreamProcess) -> None:
    """SIGTERM in the middle of a 200 MiB download: readiness turns 503 while the listener is
    open, then new connections are refused, and the download still completes byte-exact."""
    store = f"sqlite:///{tmp_path}/gateway.db"
    with _gateway(tmp_path, upstream.url, store, workers=workers, shutdown_delay=DELAY, shutdown_grace=60.0) as (
        proc,
        port,
    ):
        assert _ready(port) == 200
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"/public/bytes/{DOWNLOAD}")
        response = conn.getresponse()
        assert response.status == 200
        digest = hashlib.sha256()
        received = 0
        started = time.monotonic()

        def read(until: int) -> None:
            nonlocal received
            while received < until:
                chunk = response.read(min(MIB, until - received))
                if not chunk:
                    return
                digest.update(chunk)
                received += len(chunk)
                ahead = received / DOWNLOAD_RATE - (time.monotonic() - started)
                if ahead > 0:  # a steady rate: the download outlasts the drain delay
                    time.sleep(ahead)

        read(8 * MIB)
        proc.send_signal(signal.SIGTERM)
        downloading = threading.Thread(target=read, args=(DOWNLOAD,))
        downloading.start()
        statuses: list[int] = []
        refused_while_downloading = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = _ready(port)
            if status is None:
                refused_while_downloading = downloading.is_alive()
                break
            statuses.append(status)
            time.sleep(0.05)
        downloading.join(timeout=120)
        conn.close()

        assert 503 in statuses, statuses
        # "at once": once readiness said 503 it never said 200 again (it may say 200 in the
        # moment before the process notices the signal).
        assert 200 not in statuses[statuses.index(503) :], statuses
        assert refused_while_downloading, "a new connection was accepted until the download ended"
        assert received == DOWNLOAD
        assert digest.hexdigest() == _expected_digest(DOWNLOAD)
        proc.wait(timeout=EXIT_BOUND)
    assert b"Traceback" not in (tmp_path / "output.log").read_bytes()


def test_sigterm_closes_websockets_with_1001_and_cuts_requests_past_the_grace(
    tmp_path: Path, upstream: UpstreamProcess
) -> None:
    """An open WebSocket is closed with 1001 on both sides; a request still running when
    shutdown_grace runs out is cut, and the process is gone within the grace and a bound."""
    grace = 2.0
    store = f"sqlite:///{tmp_path}/gateway.db"
    tag = secrets.token_hex(4)
    with (
        _gateway(tmp_path, upstream.url, store, shutdown_delay=0.0, shutdown_grace=grace) as (proc, port),
        connect(f"ws://127.0.0.1:{port}/public/ws?{tag}", open_timeout=10) as socket_,
    ):
        assert socket_.recv(timeout=10) == "hello "
        # A response that would take 200 s (one byte every 0.2 s): in flight at SIGTERM.
        slow = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        slow.request("GET", "/public/drip/1000")
        response = slow.getresponse()
        assert response.status == 200

        proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            socket_.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        proc.wait(timeout=grace + EXIT_BOUND)
        with pytest.raises(http.client.IncompleteRead):
            response.read()
        slow.close()

    ended = httpx.get(f"{upstream.url}/stats/websockets", timeout=10).json()["ended"]
    assert {"query": tag, "code": 1001} in ended  # the upstream was told "going away" too
    output = (tmp_path / "output.log").read_text()
    assert "timeout graceful shutdown exceeded" in output
    assert "Application shutdown complete" in output  # the lifespan closed the store and pools
