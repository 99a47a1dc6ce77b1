"""The services of one benchmark run, started on first use and stopped at the end: Redis, the
upstream nginx, the front nginx (baseline B and ``auth_request``), the upload sink, and the
gateways (each a ``uvicorn`` process with its own TOML file and Redis key prefix)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import seed, wrk
from bench.procs import Processes, free_port, progress, start_nginx, start_redis, uvicorn_argv
from bench.report import Row
from gateway.config import ENV_CONFIG, Config

USER_HEADER = "Remote-User"
FORWARD_AUTH_HEADERS = {"X-Original-URI": "/app", "X-Original-Method": "GET"}


@dataclass(frozen=True)
class Settings:
    duration: float = 10.0
    warmup: float = 1.0
    stream_bytes: int = 1 << 30
    scale_users: int = 1_000_000
    verifications: int = 200


@dataclass
class Gateway:
    name: str
    port: int
    config: Config
    proc: subprocess.Popen[bytes]
    secrets: dict[str, str] = field(default_factory=dict)
    session: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cookie(self) -> str:
        assert self.session is not None
        return f"{self.config.session.cookie}={self.session}"


class Bench:
    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.env = seed.key_env()
        self.rows: dict[str, Row] = {}
        self.gateways: dict[str, Gateway] = {}
        self.big_file = workdir / "www" / "big.bin"
        # Known in advance: the front nginx's configuration names them.
        self.sink_port = free_port()
        self.auth_gateway_port = free_port()
        self._redis_port: int | None = None
        self._upstream_port: int | None = None
        self._front: dict[str, int] | None = None
        self._sink_started = False
        self.redis_delta: int | None = None

    # -- shared services -----------------------------------------------------------------------

    @property
    def redis_port(self) -> int:
        if self._redis_port is None:
            self._redis_port = start_redis(self.procs)
        return self._redis_port

    def redis_commands(self) -> int:
        """Redis's ``total_commands_processed``: commands per request = the delta / requests."""
        out = subprocess.run(
            ["redis-cli", "-p", str(self.redis_port), "info", "stats"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        for line in out.splitlines():
            if line.startswith("total_commands_processed:"):
                return int(line.split(":")[1])
        raise RuntimeError("redis INFO has no total_commands_processed")

    def redis_count(self, pattern: str) -> int:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.redis_port), "--scan", "--pattern", pattern],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        return len(out.split())

    @property
    def upstream_port(self) -> int:
        """nginx ``return 200 "hello"`` (one worker), plus the sparse file for downloads."""
        if self._upstream_port is None:
            self.big_file.parent.mkdir(exist_ok=True)
            with open(self.big_file, "wb") as f:
                f.truncate(self.settings.stream_bytes)
            with open(self.big_file, "rb") as f:  # into the page cache: no first-reader penalty
                while f.read(1 << 20):
                    pass
            port = free_port()
            start_nginx(
                self.procs,
                "nginx-upstream",
                f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello"; }}
        location = /big.bin {{ root {self.big_file.parent}; default_type application/octet-stream; }}
    }}""",
                [port],
            )
            self._upstream_port = port
        return self._upstream_port

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    def sink(self) -> str:
        if not self._sink_started:
            self.procs.start(
                "sink", uvicorn_argv(sys.executable, "bench.apps:sink", self.sink_port), ports=[self.sink_port]
            )
            self._sink_started = True
        return f"http://127.0.0.1:{self.sink_port}"

    @property
    def front(self) -> dict[str, int]:
        """nginx (one worker): ``proxy`` is baseline B; ``auth`` is auth_request to the gateway;
        ``auth-cached`` the same with nginx caching the gateway's 200s for 1 s."""
        if self._front is None:
            proxy, auth, cached = free_port(), free_port(), free_port()
            cache = self.workdir / "nginx-front" / "auth-cache"
            keep = 'proxy_http_version 1.1; proxy_set_header Connection "";'
            start_nginx(
                self.procs,
                "nginx-front",
                f"""
    upstream bench_upstream {{ server 127.0.0.1:{self.upstream_port}; keepalive 64; }}
    upstream bench_sink {{ server 127.0.0.1:{self.sink_port}; keepalive 8; }}
    upstream bench_gateway {{ server 127.0.0.1:{self.auth_gateway_port}; keepalive 64; }}
    proxy_cache_path {cache} levels=1:2 keys_zone=gw_auth:10m max_size=64m inactive=10s;
    server {{
        listen 127.0.0.1:{proxy};
        client_max_body_size 0;
        location / {{ proxy_pass http://bench_upstream; {keep} }}
        # Streaming (row 6), tuned for nginx's best: in-memory 64 KiB buffers, no temp files.
        location = /big.bin {{
            proxy_pass http://bench_upstream; {keep}
            proxy_max_temp_file_size 0; proxy_buffer_size 64k; proxy_buffers 8 64k;
        }}
        location = /upload {{
            proxy_pass http://bench_sink; {keep}
            proxy_request_buffering off; client_body_buffer_size 64k;
        }}
    }}
    server {{
        listen 127.0.0.1:{auth};
        location / {{ auth_request /_2fa; proxy_pass http://bench_upstream; {keep} }}
        location = /_2fa {{
            internal;
            proxy_pass http://bench_gateway/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            {keep}
        }}
    }}
    # A variant, not a recommendation yet: nginx keeps each 200 of /auth for 1 s, per method,
    # URI, user and session cookie; answers to a request carrying a code are never cached.
    server {{
        listen 127.0.0.1:{cached};
        location / {{ auth_request /_2fa; proxy_pass http://bench_upstream; {keep} }}
        location = /_2fa {{
            internal;
            proxy_pass http://bench_gateway/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            {keep}
            proxy_cache gw_auth;
            proxy_cache_key "$request_method $request_uri|$http_remote_user|$cookie_gateway_session";
            proxy_cache_valid 200 1s;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            proxy_no_cache $http_x_2fa_code;
            proxy_cache_bypass $http_x_2fa_code;
        }}
    }}""",
                [proxy, auth, cached],
            )
            self._front = {"proxy": proxy, "auth": auth, "auth-cached": cached}
        return self._front

    # -- gateways ------------------------------------------------------------------------------

    def start_gateway(
        self, name: str, upstream_url: str | None = None, port: int | None = None, **tables: dict[str, Any]
    ) -> Gateway:
        """A gateway process on its own Redis key prefix (so rows never share lockouts)."""
        port = port or free_port()
        path = self.workdir / f"{name}.toml"
        config = seed.write_config(
            path, self.env, seed.gateway_tables(port, self.redis_port, f"bench-{name}", upstream_url, **tables)
        )
        proc = self.procs.start(
            f"gateway-{name}",
            uvicorn_argv(sys.executable, "bench.apps:gateway", port, factory=True),
            ports=[port],
            env={**self.env, ENV_CONFIG: str(path)},
        )
        gateway = Gateway(name, port, config, proc)
        self.gateways[name] = gateway
        return gateway

    def stop_gateway(self, gateway: Gateway) -> None:
        self.procs.stop(gateway.proc)
        self.gateways.pop(gateway.name, None)

    def with_session(self, gateway: Gateway, user: str = "alice") -> Gateway:
        """Enrol ``user`` and open a session by one real code check over HTTP."""
        gateway.secrets.update(seed.enrol(gateway.config, [user]))
        headers = {USER_HEADER: user}
        if gateway.config.upstream.url:
            url = f"{gateway.url}/app"
        else:
            url = f"{gateway.url}/auth"
            headers.update(FORWARD_AUTH_HEADERS)
        gateway.session = seed.session_by_code(url, headers, gateway.config, gateway.secrets[user])
        return gateway

    def auth_gateway(self) -> Gateway:
        """The forward-auth gateway with a session for alice (rows 1 and 4 share it)."""
        gateway = self.gateways.get("auth")
        if gateway is None:
            gateway = self.with_session(self.start_gateway("auth", port=self.auth_gateway_port))
        return gateway

    # -- measuring -----------------------------------------------------------------------------

    def wrk(
        self, url: str, connections: int = 32, headers: dict[str, str] | None = None, script: Path | None = None
    ) -> wrk.WrkResult:
        """A warm-up run (discarded), then the measured run; ``redis_delta`` is the number of
        Redis commands (those run inside Lua scripts included) during the measured run."""
        progress(f"wrk -c{connections} {url} ({self.settings.warmup:g}s warm-up + {self.settings.duration:g}s)")
        if self.settings.warmup > 0:
            wrk.run(url, self.settings.warmup, connections, headers, script)
        before = self.redis_commands() if self._redis_port is not None else None
        result = wrk.run(url, self.settings.duration, connections, headers, script)
        self.redis_delta = None if before is None else self.redis_commands() - before
        return result

    def add(self, row: Row) -> Row:
        self.rows[row.key] = row
        return row


def row_from(key: str, label: str, result: wrk.WrkResult, expect_ok: bool = True) -> Row:
    row = Row(key, label, rps=result.rps, p50_ms=result.p50_ms, p99_ms=result.p99_ms)
    if expect_ok and result.non_2xx:
        row.notes.append(f"**{result.non_2xx} of {result.requests} responses not 2xx**")
        row.failed = True
    if result.socket_errors:
        row.notes.append(f"{result.socket_errors} socket errors")
    return row


def ratio(row: Row, baseline: Row | None, name: str) -> None:
    if baseline is not None and not baseline.failed and baseline.rps and row.rps is not None:
        row.ratio = row.rps / baseline.rps
        row.baseline = name


def read_rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} for pid {pid}")


def reset_peak_rss(pid: int) -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def python_of(venv: Path) -> str:
    return str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
