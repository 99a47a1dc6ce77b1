"""The servers the benchmark starts, each in its own process on a free loopback port, and the
one registry that stops them all however the run ends (normal exit, exception, Ctrl-C).

Every Python server runs under uvicorn with the same pinned flags (:data:`UVICORN_FLAGS`), so
baseline A and the gateway differ only in the application.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One worker, uvloop and httptools, no access log, no server header, no proxy-header
# rewriting (the gateway reads X-Forwarded-For itself): the same for every uvicorn server.
UVICORN_FLAGS = (
    "--host",
    "127.0.0.1",
    "--workers",
    "1",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--lifespan",
    "on",
    "--log-level",
    "warning",
    "--no-access-log",
    "--no-proxy-headers",
    "--no-server-header",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Processes:
    """Every process the bench started; :meth:`stop_all` ends them in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(
        self,
        name: str,
        argv: Sequence[str],
        ports: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        timeout: float = 30.0,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv``; return once something listens on each of ``ports``."""
        with open(self.log_path(name), "ab") as log:
            # A session of its own: Ctrl-C in the terminal reaches only the bench, which then
            # stops every server itself, in order.
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        self.running.append((name, proc))
        for port in ports:
            self._wait_for_port(name, proc, port, timeout)
        progress(f"started {name} (pid {proc.pid}, port {', '.join(map(str, ports)) or '-'})")
        return proc

    def _wait_for_port(self, name: str, proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before listening:\n{self.tail(name)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{name} does not listen on port {port} after {timeout}s:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        for i, (_, p) in enumerate(self.running):
            if p is proc:
                del self.running[i]
                break
        _terminate(proc)

    def stop_all(self) -> None:
        while self.running:
            _, proc = self.running.pop()
            _terminate(proc)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (nginx workers, uvicorn), then SIGKILL what is left."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
    # Children that outlived their leader (the group id is the leader's pid).
    _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def uvicorn_argv(python: str, app: str, port: int, factory: bool = False) -> list[str]:
    return [python, "-m", "uvicorn", app, "--port", str(port), *UVICORN_FLAGS, *(["--factory"] if factory else [])]


def start_redis(procs: Processes) -> int:
    port = free_port()
    procs.start(
        "redis",
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(procs.workdir),
            "--loglevel",
            "warning",
        ],
        ports=[port],
    )
    return port


def start_nginx(procs: Processes, name: str, http_block: str, ports: Sequence[int]) -> None:
    """nginx with one worker, ``-p`` its own directory and a generated configuration."""
    prefix = procs.workdir / name
    prefix.mkdir(exist_ok=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""  # the workers must read the bench's files
    conf = f"""{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type text/plain;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http_block}
}}
"""
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    procs.start(name, ["nginx", "-p", str(prefix), "-c", str(conf_path)], ports=ports)
