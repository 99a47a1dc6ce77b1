"""``python -m soak``: start an upstream, a store and one gateway in proxy mode (with ``/auth``)
on free loopback ports, enrol users and open sessions up front, lock some users out, then run
the load generator (``soak/load.py``, a process of its own) while this process scrapes the
gateway's metrics for its RSS, open fds and asyncio tasks. Prints a markdown report; the exit
status is 0 only when there was no unexpected answer and nothing grew after warm-up.

Pinning: with two or more CPUs the gateway gets the first to itself and the processes it talks
to (load generator, upstream, Redis) share the others, so the load generator does not steal
the gateway's core. This process (a scrape every 2 s) is left where it is.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import seed
from bench.procs import ROOT, Processes, free_port, start_redis, uvicorn_argv
from gateway import config as config_module
from gateway.config import Config
from soak.report import Gauges, markdown, summarise
from soak.stats import MIX
from tests.support.upstream_app import pattern

GAUGES = {
    "rss": "process_resident_memory_bytes",
    "fds": "process_open_fds",
    "tasks": "gateway_event_loop_tasks",
}
SESSION_USERS = 200
LOCKED_USERS = 20
MAX_FAILURES = 5
# Seconds with no client connection open, after warm-up and after the run: fds and tasks are
# compared there (under load they follow the requests in flight, not leaks).
IDLE_SECONDS = 4.0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the open-loop run (default 600)")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--rate", type=float, help="requests per second; default: half the measured capacity")
    parser.add_argument("--capacity-seconds", type=float, default=10.0, help="closed-loop capacity run (default 10)")
    parser.add_argument("--bucket", type=float, default=30.0, help="seconds per latency bucket (default 30)")
    parser.add_argument("--download-bytes", type=int, default=1 << 20)
    parser.add_argument(
        "--code-users", type=int, default=6000, help="users sending codes: one per step each, enough up to 2,000 req/s"
    )
    parser.add_argument(
        "--verdict",
        choices=("all", "errors"),
        default="all",
        help="what fails the run: unexpected answers and growth (default), or unexpected answers only",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    # JSON's strings, numbers, booleans and lists of them are TOML's too.
    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()) + "\n"
        for name, values in tables.items()
    )


def _gateway_config(workdir: Path, port: int, store_url: str, upstream: str, env: dict[str, str]) -> Path:
    path = workdir / "gateway.toml"
    tables: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "store": {"url": store_url},
        "upstream": {"url": upstream},
        "session": {"secure": False},
        "paths": {"exclude": ["/public/*"]},
        "routes": {"auth": "/auth"},
        # Every request comes from 127.0.0.1: the per-address quota (limits.ip_max_failures)
        # would lock the load generator itself out; the per-user one is what the mix exercises.
        # The locked users stay locked for the whole run.
        "limits": {"max_failures": MAX_FAILURES, "lockout": 86400, "ip_max_failures": 1_000_000},
    }
    path.write_text(_toml(tables))
    config_module.load(path, env=env)  # the same check `gateway run` makes, here with a clear error
    return path


def _lock_out(url: str, config: Config, users: list[str]) -> None:
    """``max_failures`` wrong codes each: the last answer must be the lockout."""
    wrong = "0" * config.totp.digits
    with httpx.Client(base_url=url, timeout=10) as client:
        for user in users:
            statuses = [
                client.get("/echo/app", headers={config.identity.header: user, config.totp.header: wrong}).status_code
                for _ in range(MAX_FAILURES)
            ]
            if statuses[-1] != 429:
                raise RuntimeError(f"locking a user out: statuses {statuses}")


def _pin(pid: int, cpus: set[int]) -> None:
    with contextlib.suppress(OSError, AttributeError):
        for task in os.listdir(f"/proc/{pid}/task"):  # every thread, not just the main one
            os.sched_setaffinity(int(task), cpus)


def fds_by_peer(pid: int, peers: dict[int, str]) -> dict[str, int]:
    """The process's open fds by what they are (Linux /proc): a socket by the port of its peer
    (``peers`` names them), a listening socket, anything else. Says where a grown count went."""
    inodes: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                port = int(fields[2].rsplit(":", 1)[1], 16)
                inodes[fields[9]] = "listening" if fields[3] == "0A" else peers.get(port, "client")
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                kind = inodes.get(target[8:-1], "other socket") if target.startswith("socket:[") else "other"
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url, timeout=5).text
    values = {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}
    return {short: values[name] for short, name in GAUGES.items() if name in values}


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    procs = Processes(workdir)
    try:
        return _run(args, workdir, procs)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, workdir: Path, procs: Processes) -> int:
    env = seed.key_env()
    peers: dict[int, str] = {}
    if args.store == "redis":
        redis_port = start_redis(procs)
        peers[redis_port] = "store"
        store_url = f"redis://127.0.0.1:{redis_port}/0"
    else:
        store_url = f"sqlite:///{workdir}/gateway.db"
    upstream_port, port = free_port(), free_port()
    peers[upstream_port] = "upstream"
    procs.start(
        "upstream", uvicorn_argv(sys.executable, "tests.support.upstream_app:app", upstream_port), [upstream_port]
    )
    path = _gateway_config(workdir, port, store_url, f"http://127.0.0.1:{upstream_port}", env)
    config = config_module.load(path, env=env)

    session_users = [f"s{i}" for i in range(SESSION_USERS)]
    code_users = [f"c{i}" for i in range(args.code_users)]
    locked_users = [f"l{i}" for i in range(LOCKED_USERS)]
    secrets = seed.enrol(config, session_users + code_users + locked_users)
    sessions = seed.open_sessions(config, session_users)

    gateway = procs.start("gateway", [sys.executable, "-m", "gateway", "run", "--config", str(path)], [port], env=env)
    url = f"http://127.0.0.1:{port}"
    _lock_out(url, config, locked_users)

    plan = {
        "url": url,
        "ws_url": f"ws://127.0.0.1:{port}",
        "user_header": config.identity.header,
        "code_header": config.totp.header,
        "cookie": config.session.cookie,
        "digits": config.totp.digits,
        "period": config.totp.period,
        "max_failures": MAX_FAILURES,
        "sessions": sessions,
        "code_users": {user: secrets[user] for user in code_users},
        "locked": locked_users,
        "download_bytes": args.download_bytes,
        "download_sha256": hashlib.sha256(pattern(args.download_bytes)).hexdigest(),
        "mix": MIX,
        "rate": args.rate,
        "seconds": args.seconds,
        "capacity_seconds": args.capacity_seconds,
        "warmup_seconds": min(args.bucket, 10.0),
        "idle_seconds": IDLE_SECONDS,
        "concurrency": 32,
        "connections": 256,
    }
    plan_path, results_path = workdir / "plan.json", workdir / "results.json"
    plan_path.write_text(json.dumps(plan))
    load = procs.start("load", [sys.executable, "-m", "soak.load", str(plan_path), str(results_path)], cwd=ROOT)

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) >= 2:
        _pin(gateway.pid, {cpus[0]})
        for _, proc in procs.running:
            if proc is not gateway:
                _pin(proc.pid, set(cpus[1:]))

    metrics_url = url + config.routes.metrics
    interval = min(1.0, args.bucket / 6)
    gauges: Gauges = []
    last_progress = time.monotonic()

    def sample() -> None:
        values = scrape(metrics_url)
        by_peer = fds_by_peer(gateway.pid, peers)
        values["pools"] = float(by_peer.get("store", 0) + by_peer.get("upstream", 0))
        gauges.append((time.time(), values))

    while load.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            sample()
        if time.monotonic() - last_progress >= args.bucket:
            last_progress = time.monotonic()
            seen = ", ".join(f"{k} {v:.0f}" for k, v in gauges[-1][1].items()) if gauges else "no scrape yet"
            print(f"[soak] gateway: {seen}", file=sys.stderr, flush=True)
        time.sleep(interval)
    if load.returncode != 0 or not results_path.exists():
        print(f"soak: the load generator failed ({load.returncode}):\n{procs.tail('load')}", file=sys.stderr)
        return 1
    idle_after = time.time()
    while time.time() < idle_after + IDLE_SECONDS:
        sample()
        time.sleep(interval)
    results = json.loads(results_path.read_text())
    results["idle_after"] = [idle_after, idle_after + IDLE_SECONDS]
    results["fds_after"] = fds_by_peer(gateway.pid, peers)
    summary = summarise(results, gauges, args.bucket, judge_growth=args.verdict == "all")
    summary["store"] = args.store
    summary["gauges"] = gauges  # every scrape: (wall time, values), to plot
    summary["cpus"] = len(cpus)
    print(markdown(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
