"""The rows of the table, one function per group (issue 6). Each adds its rows to the bench;
ratios are against rows measured earlier in the same run."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyotp

from bench import seed, wrk
from bench.harness import (
    FORWARD_AUTH_HEADERS,
    USER_HEADER,
    Bench,
    Gateway,
    python_of,
    ratio,
    read_rss_kib,
    reset_peak_rss,
    row_from,
)
from bench.procs import ROOT, free_port, progress, uvicorn_argv
from bench.report import NAIVE_PROXY_RPS, Row

ORIGINAL_VENV = ROOT / "bench" / ".venv-original"
# two-fast-auth imports cryptography's Fernet without declaring it.
ORIGINAL_PACKAGES = ("fastapi", "two-fast-auth", "uvicorn[standard]", "cryptography")


def _redis_per_request(bench: Bench, result: wrk.WrkResult, row: Row) -> None:
    if result.requests and bench.redis_delta is not None:
        row.notes.append(f"{bench.redis_delta / result.requests:.1f} Redis cmds/req")


# -- A, B: baselines ---------------------------------------------------------------------------


def baseline_a(bench: Bench) -> None:
    port = free_port()
    proc = bench.procs.start("hello", uvicorn_argv(sys.executable, "bench.apps:hello", port), ports=[port])
    try:
        result = bench.wrk(f"http://127.0.0.1:{port}/")
    finally:
        bench.procs.stop(proc)
    bench.add(row_from("A", "A. baseline: Starlette hello on uvicorn", result))


def baseline_b(bench: Bench) -> None:
    url = f"http://127.0.0.1:{bench.front['proxy']}/app"
    for connections in (32, 1, 64):
        key = "B" if connections == 32 else f"B-c{connections}"
        label = "B. baseline: nginx proxy_pass → upstream" + ("" if connections == 32 else f", c{connections}")
        row = bench.add(row_from(key, label, bench.wrk(url, connections)))
        if connections == 32:
            row.notes.append('upstream: nginx `return 200 "hello"`, 1 worker (for B and every gateway row)')


# -- 1, 2, 3: the decision -----------------------------------------------------------------------


def decision_session(bench: Bench) -> None:
    gateway = bench.auth_gateway()
    headers = {USER_HEADER: "alice", "Cookie": gateway.cookie(), **FORWARD_AUTH_HEADERS}
    result = bench.wrk(f"{gateway.url}/auth", headers=headers)
    row = bench.add(row_from("1", "1. gateway /auth, 2FA session (Redis store)", result))
    _redis_per_request(bench, result, row)
    ratio(row, bench.rows.get("A"), "A")


def _flood(bench: Bench, gateway: Gateway, users: list[str]) -> wrk.WrkResult:
    script = wrk.random_code_script(
        bench.workdir / f"flood-{gateway.name}.lua",
        FORWARD_AUTH_HEADERS,
        gateway.config.totp.header,
        users,
        USER_HEADER,
    )
    return bench.wrk(f"{gateway.url}/auth", script=script)


def _flood_row(bench: Bench, key: str, label: str, result: wrk.WrkResult) -> Row:
    row = bench.add(row_from(key, label, result, expect_ok=False))
    row.notes.append(f"{result.non_2xx:,} of {result.requests:,} denied")
    _redis_per_request(bench, result, row)
    ratio(row, bench.rows.get("A"), "A")
    return row


def _lockouts(gateway: Gateway, scopes: list[str]) -> int:
    """How many of ``scopes`` are locked now, asked through the store (its key layout is its own)."""
    import asyncio

    from gateway.store import open_store_from_url

    async def count() -> int:
        store = open_store_from_url(gateway.config.store.url, gateway.config.store.prefix)
        await store.open()
        try:
            now = time.time()
            return sum([await store.locked_until(scope, now) is not None for scope in scopes])
        finally:
            await store.close()

    return asyncio.run(count())


def decision_flood(bench: Bench) -> None:
    # As deployed: one attacked user, default limits. After 5 failures the user (and after 50
    # the address) is locked, and every further denial is answered from the lockout cache.
    gateway = bench.start_gateway("flood")
    seed.enrol(gateway.config, ["mallory"])
    try:
        result = _flood(bench, gateway, ["mallory"])
    finally:
        bench.stop_gateway(gateway)
    row = _flood_row(bench, "2-lockout", "2. gateway /auth, flood of invalid codes, default lockout", result)
    row.notes.append("one user; locked after 5 failures, so most denials are lockout-cache hits")

    # Every request does the full check: 1,000 users, limits at the configuration's maximum
    # (max_failures 1000, ip_max_failures 1,000,000), so no one is locked during the run.
    gateway = bench.start_gateway("floodfull", limits={"max_failures": 1000, "ip_max_failures": 1_000_000})
    users = [f"flood-{i:04d}" for i in range(1000)]
    seed.enrol(gateway.config, users)
    try:
        result = _flood(bench, gateway, users)
        locked = _lockouts(gateway, [f"user:{u}" for u in users] + ["ip:127.0.0.1"])
    finally:
        bench.stop_gateway(gateway)
    row = _flood_row(bench, "2-full", "2. gateway /auth, flood of invalid codes, full check", result)
    row.notes.append(f"1,000 users at random, max_failures 1000; {locked} lockouts during the run")


def verification_cost(bench: Bench) -> None:
    """Row 3: ``SecondFactor.check_code`` in-process against the real Redis store, one valid code
    per call; a fake clock moves one period per call so the replay guard never refuses."""
    import uvloop

    from gateway.factors import Refused, SecondFactor
    from gateway.store import open_store_from_url

    path = bench.workdir / "verify.toml"
    config = seed.write_config(path, bench.env, seed.gateway_tables(0, bench.redis_port, "bench-verify"))
    secret = seed.enrol(config, ["verifier"])["verifier"]
    totp = pyotp.TOTP(secret, digits=config.totp.digits, interval=config.totp.period)
    warmup, n = 20, bench.settings.verifications

    async def measure() -> list[float]:
        store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
        await store.open()
        now = [time.time()]
        factors = SecondFactor(config, store, clock=lambda: now[0])
        timings: list[float] = []
        try:
            for i in range(warmup + n):
                now[0] += config.totp.period
                code = totp.at(now[0])
                started = time.perf_counter()
                outcome = await factors.check_code("verifier", code, "127.0.0.1")
                elapsed = time.perf_counter() - started
                if isinstance(outcome, Refused):
                    raise RuntimeError(f"a valid code was refused: {outcome.reason}")
                if i >= warmup:
                    timings.append(elapsed * 1000)
        finally:
            await store.close()
        return timings

    before = bench.redis_commands()
    timings = uvloop.run(measure())
    commands = (bench.redis_commands() - before) / (warmup + n)
    timings.sort()
    row = bench.add(
        Row(
            "3",
            "3. one valid code verification (in-process check_code, Redis)",
            micro=True,
            p50_ms=statistics.median(timings),
            p99_ms=timings[min(len(timings) - 1, int(0.99 * n))],
        )
    )
    row.target = "— (a cost, not a rate)"
    row.notes.append(f"{n} sequential verifications; {commands:.1f} Redis cmds each")


# -- 4, 5: auth_request and proxy mode -----------------------------------------------------------


def auth_request(bench: Bench) -> None:
    gateway = bench.auth_gateway()
    url = f"http://127.0.0.1:{bench.front['auth']}/app"
    headers = {USER_HEADER: "alice", "Cookie": gateway.cookie()}
    result = bench.wrk(url, headers=headers)
    row = bench.add(row_from("4", "4. nginx auth_request → gateway /auth → upstream", result))
    _redis_per_request(bench, result, row)
    ratio(row, bench.rows.get("B"), "B")
    # The same with nginx caching /auth's 200s for 1 s (one session here: the best case).
    url = f"http://127.0.0.1:{bench.front['auth-cached']}/app"
    row = bench.add(
        row_from(
            "4-cache", "4. the same, nginx caching 2xx /auth answers 1 s (variant)", bench.wrk(url, headers=headers)
        )
    )
    row.notes.append("one session, so nearly every check is a cache hit; revocation bound becomes 1 s + cache_ttl")
    ratio(row, bench.rows.get("B"), "B")


def proxy_mode(bench: Bench) -> None:
    gateway = bench.with_session(bench.start_gateway("proxy", upstream_url=bench.upstream_url))
    try:
        for connections in (1, 32, 64):
            _proxy_row(
                bench, gateway, connections, f"5-c{connections}", f"5. gateway proxy mode, session, c{connections}"
            )
    finally:
        bench.stop_gateway(gateway)


def _proxy_row(bench: Bench, gateway: Gateway, connections: int, key: str, label: str) -> Row:
    headers = {USER_HEADER: "alice", "Cookie": gateway.cookie()}
    row = bench.add(row_from(key, label, bench.wrk(f"{gateway.url}/app", connections, headers)))
    baseline = "B" if connections == 32 else f"B-c{connections}"
    ratio(row, bench.rows.get(baseline), baseline)
    if row.rps is not None:
        row.notes.append(f"{row.rps / NAIVE_PROXY_RPS:.1f}x the naive proxy (0.42k)")
    return row


# -- 6: streaming --------------------------------------------------------------------------------


class _RssSampler:
    """Peak RSS of one process: VmHWM after a reset, and VmRSS sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.hwm_reset = reset_peak_rss(pid)
        self.start_kib = read_rss_kib(pid)
        self.peak_kib = self.start_kib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak_kib = max(self.peak_kib, read_rss_kib(self.pid))
            except (OSError, RuntimeError):
                return

    def growth_mib(self) -> float:
        self._stop.set()
        self._thread.join()
        peak = self.peak_kib
        if self.hwm_reset:
            peak = max(peak, read_rss_kib(self.pid, "VmHWM"))
        return (peak - self.start_kib) / 1024


def _curl(argv: list[str], expected: int, timeout: float) -> float:
    """Run curl; return MB/s (10^6 bytes/s) over the whole transfer."""
    done = subprocess.run(
        ["curl", "-sS", "--fail", *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"curl failed ({done.returncode}): {done.stderr.strip()}")
    status, size, seconds = done.stdout.split()
    if status != "200" or int(float(size)) != expected:
        raise RuntimeError(f"transfer incomplete: HTTP {status}, {size} of {expected} bytes")
    return expected / float(seconds) / 1e6


def _transfer(bench: Bench, direction: str, url: str, headers: dict[str, str]) -> float:
    size = bench.settings.stream_bytes
    flags = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    timeout = 600.0
    if direction == "down":
        return _curl(
            [*flags, "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", url], size, timeout
        )
    answer = bench.workdir / "upload-answer.txt"
    speed = _curl(
        [
            *flags,
            "-H",
            "Expect:",
            "-X",
            "POST",
            "-T",
            str(bench.big_file),
            "-o",
            str(answer),
            "-w",
            "%{http_code} %{size_upload} %{time_total}",
            url,
        ],
        size,
        timeout,
    )
    if answer.read_text().strip() != str(size):
        raise RuntimeError(f"the sink received {answer.read_text().strip()} bytes, not {size}")
    return speed


def streaming(bench: Bench) -> None:
    mib = bench.settings.stream_bytes >> 20
    size_text = f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"
    rounds = 3  # alternating nginx and gateway; one transfer is about a second, so take medians
    for direction, upstream, path in (("down", bench.upstream_url, "/big.bin"), ("up", bench.sink(), "/upload")):
        _ = bench.upstream_port  # the sparse file is made with the upstream
        # A fresh gateway for each direction, so RSS growth is the transfers' alone.
        gateway = bench.with_session(bench.start_gateway(f"stream-{direction}", upstream_url=upstream))
        headers = {USER_HEADER: "alice", "Cookie": gateway.cookie()}
        nginx_speeds: list[float] = []
        gateway_speeds: list[float] = []
        try:
            sampler = _RssSampler(gateway.proc.pid)
            for _ in range(rounds):
                nginx_speeds.append(_transfer(bench, direction, f"http://127.0.0.1:{bench.front['proxy']}{path}", {}))
                gateway_speeds.append(_transfer(bench, direction, f"{gateway.url}{path}", headers))
            growth = sampler.growth_mib()
        finally:
            bench.stop_gateway(gateway)
        speed, nginx = statistics.median(gateway_speeds), statistics.median(nginx_speeds)
        label = f"6. gateway proxy, streaming {size_text} {'download' if direction == 'down' else 'upload'}"
        row = bench.add(Row(f"6-{direction}", label, throughput=f"{speed:,.0f} MB/s", rss_mib=growth))
        row.ratio, row.baseline = speed / nginx, "nginx"
        row.notes += [
            f"nginx proxy_pass: {nginx:,.0f} MB/s",
            f"median of {rounds}",
            f"gateway peak RSS +{growth:.1f} MiB",
        ]
        if direction == "up":
            row.notes.append("upstream: bench.apps:sink (reads and discards)")
        else:
            row.notes.append("upstream: nginx serving a sparse file")


# -- 7: the original middleware ------------------------------------------------------------------


def _original_python() -> tuple[str | None, str]:
    """The original app's interpreter, installing its venv on first use; (None, why) if not."""
    python = python_of(ORIGINAL_VENV)
    marker = ORIGINAL_VENV / ".installed"
    if not marker.exists() or marker.read_text().split() != list(ORIGINAL_PACKAGES):
        progress(f"creating {ORIGINAL_VENV} with {', '.join(ORIGINAL_PACKAGES)} (first use only)")
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", "--clear", str(ORIGINAL_VENV)],
                check=True,
                capture_output=True,
                timeout=300,
            )
            subprocess.run(
                [python, "-m", "pip", "install", "--quiet", *ORIGINAL_PACKAGES],
                check=True,
                capture_output=True,
                text=True,
                timeout=900,
            )
        except subprocess.CalledProcessError as exc:
            return None, f"cannot install {' '.join(ORIGINAL_PACKAGES)}: {(exc.stderr or '')[-300:]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"cannot install {' '.join(ORIGINAL_PACKAGES)}: {exc}"
        marker.write_text(" ".join(ORIGINAL_PACKAGES) + "\n")
    return python, ""


def original_versions() -> str | None:
    python = python_of(ORIGINAL_VENV)
    if not Path(python).exists():
        return None
    code = (
        "import importlib.metadata as m, platform; print('Python', platform.python_version() + ':', "
        "', '.join(p + ' ' + m.version(p) for p in ('two-fast-auth', 'fastapi', 'starlette', 'uvicorn', "
        "'uvloop', 'httptools', 'pyotp', 'cryptography')))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return done.stdout.strip() or None


def original(bench: Bench) -> None:
    label = "7. original two_fast_auth middleware on FastAPI, valid code, c32"
    python, why = _original_python()
    if python is None:
        bench.add(Row("7", label, notes=[why]))  # reported, not a failure of the run
        return
    from cryptography.fernet import Fernet

    secret = pyotp.random_base32()
    port = free_port()
    env = {"BENCH_ORIGINAL_SECRET": secret, "BENCH_ORIGINAL_KEY": Fernet.generate_key().decode()}
    proc = bench.procs.start("original", uvicorn_argv(python, "bench.original_app:app", port), ports=[port], env=env)
    try:
        # The original accepts only the current step (no window): the whole run, warm-up
        # included, must fall inside one 30 s step.
        totp = pyotp.TOTP(secret)
        needed = bench.settings.warmup + bench.settings.duration + 3
        left = totp.interval - time.time() % totp.interval
        if left < needed:
            progress(f"waiting {left:.0f}s for a fresh TOTP step")
            time.sleep(left + 0.2)
        headers = {USER_HEADER: "alice", "X-2FA-Code": totp.now()}
        result = bench.wrk(f"http://127.0.0.1:{port}/app", headers=headers)
    finally:
        bench.procs.stop(proc)
    row = bench.add(row_from("7", label, result))
    row.notes.append("no replay guard, secret from a dict (no store), no proxy hop; answers 500 to a bad code")
    gateway = bench.rows.get("5-c32")
    if gateway is not None and not gateway.failed and gateway.rps and row.rps:
        row.ratio, row.baseline = gateway.rps / row.rps, "(5 / 7)"


# -- 8: flat in the number of users --------------------------------------------------------------


def users_scale(bench: Bench) -> None:
    """The decision with 1,000 vs N enrolled users; store.cache_ttl = 0, so every request reads
    Redis (the lookups that could depend on N), for sessions drawn at random among 1,000 users."""
    gateway = bench.start_gateway("scale", store={"cache_ttl": 0.0})
    try:
        users = [f"active-{i:04d}" for i in range(1000)]
        seed.enrol(gateway.config, users)
        sessions = seed.open_sessions(gateway.config, users)
        script = wrk.random_session_script(
            bench.workdir / "scale.lua", FORWARD_AUTH_HEADERS, sessions, USER_HEADER, gateway.config.session.cookie
        )
        small = bench.add(_scale_row(bench, gateway, script, "8-small", "8. /auth decision, 1,000 users"))
        small_in = bench.add(_decision_cost(gateway, sessions, "8-small-in", "8. one decision in-process, 1,000 users"))
        extra = bench.settings.scale_users - len(users)
        progress(f"seeding {extra:,} more users (secret + live session each) with redis-cli --pipe")
        seconds = seed.bulk_seed(bench.redis_port, gateway.config, extra)
        large = bench.add(
            _scale_row(bench, gateway, script, "8-large", f"8. /auth decision, {bench.settings.scale_users:,} users")
        )
        large.notes.append(f"seeded in {seconds:.0f}s")
        if small.p50_ms and large.p50_ms is not None and not small.failed:
            large.ratio, large.baseline = large.p50_ms / small.p50_ms, "(p50 vs 1k)"
        large_in = bench.add(
            _decision_cost(
                gateway, sessions, "8-large-in", f"8. one decision in-process, {bench.settings.scale_users:,} users"
            )
        )
        if small_in.p50_ms and large_in.p50_ms is not None:
            large_in.ratio, large_in.baseline = large_in.p50_ms / small_in.p50_ms, "(p50 vs 1k)"
    finally:
        bench.stop_gateway(gateway)


def _decision_cost(gateway: Gateway, sessions: list[tuple[str, str]], key: str, label: str, n: int = 2000) -> Row:
    """``Decider.decide`` in this process against the same Redis, one call at a time, for random
    sessions: the per-decision cost without wrk's queueing, which dominates the HTTP rows' p50."""
    import random

    import uvloop
    from starlette.datastructures import Headers

    from gateway.decision import Decider, Facts
    from gateway.factors import SecondFactor
    from gateway.store import open_store_from_url

    config = gateway.config
    rng = random.Random(8)
    picks = [sessions[rng.randrange(len(sessions))] for _ in range(n + 200)]

    async def measure() -> list[float]:
        store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
        await store.open()
        decider = Decider(config, SecondFactor(config, store))
        timings: list[float] = []
        try:
            for i, (user, session) in enumerate(picks):
                raw = [(b"remote-user", user.encode()), (b"cookie", f"{config.session.cookie}={session}".encode())]
                facts = Facts("GET", "/app", "127.0.0.1", True, Headers(raw=raw))
                started = time.perf_counter()
                decision = await decider.decide(facts)
                elapsed = time.perf_counter() - started
                if not decision.allowed:
                    raise RuntimeError(f"a live session was refused: {decision.reason}")
                if i >= 200:
                    timings.append(elapsed * 1000)
        finally:
            await store.close()
        return timings

    timings = sorted(uvloop.run(measure()))
    row = Row(key, label, micro=True, p50_ms=statistics.median(timings), p99_ms=timings[int(0.99 * (len(timings) - 1))])
    row.target = "—"
    row.notes.append(f"{n} sequential decisions, random session among 1,000, cache_ttl 0 (every one reads Redis)")
    return row


def _scale_row(bench: Bench, gateway: Gateway, script: Path, key: str, label: str) -> Row:
    result = bench.wrk(f"{gateway.url}/auth", script=script)
    row = row_from(key, label, result)
    _redis_per_request(bench, result, row)
    row.notes.append("cache_ttl 0: every decision reads Redis; random session among 1,000")
    return row


GROUPS: dict[str, Callable[[Bench], Any]] = {
    "A": baseline_a,
    "B": baseline_b,
    "1": decision_session,
    "2": decision_flood,
    "3": verification_cost,
    "4": auth_request,
    "5": proxy_mode,
    "6": streaming,
    "7": original,
    "8": users_scale,
}
