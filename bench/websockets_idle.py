"""What watching open WebSockets for revocation costs: ``python -m bench.websockets_idle``.

Starts the test upstream, Redis (for ``--store redis``) and one gateway process (uvicorn, the
bench's flags, ``bench.apps:gateway``), then measures the gateway's CPU (user + system, from
/proc) over ``--seconds`` idle with no socket, then idle with ``--sockets`` open WebSockets,
each admitted by a 2FA session: one session per socket (``--sessions distinct``, the worst
case: one store read per socket per interval) or one for all (``--sessions one``). On Redis it
also counts the store's session reads per second (GET calls, ``INFO commandstats``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from bench.procs import UVICORN_FLAGS
from gateway import config as config_module
from gateway.factors import SecondFactor
from gateway.store import open_store_from_url
from tests.conftest import RedisServer
from tests.support.servers import ROOT, UpstreamProcess, free_port, fresh_keys, make_config, wait_for_port

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (proc(5))


def redis_gets(url: str) -> int:
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(["redis-cli", "-p", port, "info", "commandstats"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("cmdstat_get:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def measure(pid: int, seconds: float, redis_url: str | None) -> tuple[float, float | None]:
    """(CPU % of one core, store GETs per second) over ``seconds``."""
    gets = redis_gets(redis_url) if redis_url else 0
    cpu, start = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - start
    used = cpu_seconds(pid) - cpu
    rate = (redis_gets(redis_url) - gets) / elapsed if redis_url else None
    return 100 * used / elapsed, rate


async def run(args: argparse.Namespace) -> None:
    upstream = UpstreamProcess()
    upstream.start()
    redis = None
    if args.store == "redis":
        redis = RedisServer("redis-server")
        redis.start()
    work = Path(tempfile.mkdtemp(prefix="gw-ws-idle-"))
    store_url = redis.url if redis else f"sqlite:///{work}/gateway.db"
    prefix = f"b{uuid.uuid4().hex[:8]}"
    port = free_port()
    (work / "gateway.toml").write_text(
        f'[server]\nport = {port}\n[upstream]\nurl = "{upstream.url}"\n'
        f'[store]\nurl = "{store_url}"\nprefix = "{prefix}"\ncache_ttl = {args.cache_ttl}\n'
        "[session]\nsecure = false\n"
    )
    env = {**os.environ, **fresh_keys(), config_module.ENV_CONFIG: str(work / "gateway.toml")}
    gateway = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.apps:gateway", "--factory", "--port", str(port), *UVICORN_FLAGS],
        env=env,
        cwd=ROOT,
    )
    sockets: list[ClientConnection] = []
    try:
        wait_for_port(port)
        config = make_config(work, upstream=upstream.url, store={"url": store_url, "prefix": prefix})
        store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
        await store.open()
        factors = SecondFactor(config, store)
        users = [f"idle{i}" for i in range(args.sockets)]
        if args.sessions == "one":
            one = await factors.open_session("idle")
            users, sessions = ["idle"] * args.sockets, [one] * args.sockets
        else:
            sessions = [await factors.open_session(u) for u in users]
        await store.close()

        idle_none = await measure(gateway.pid, args.seconds, redis.url if redis else None)
        for user, session in zip(users, sessions, strict=True):
            headers = {"Remote-User": user, "Cookie": f"{config.session.cookie}={session}"}
            ws = await connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers, ping_interval=None)
            await ws.recv()  # the upstream's hello: the socket is relayed end to end
            sockets.append(ws)
        await asyncio.sleep(2)  # the opening burst is over
        idle_open = await measure(gateway.pid, args.seconds, redis.url if redis else None)
        print(
            f"store={args.store} cache_ttl={args.cache_ttl} sockets={len(sockets)} sessions={args.sessions} "
            f"seconds={args.seconds}\n"
            f"  idle, no socket:      CPU {idle_none[0]:.2f} %  store GETs/s {idle_none[1]}\n"
            f"  idle, {len(sockets)} sockets:  CPU {idle_open[0]:.2f} %  store GETs/s {idle_open[1]}"
        )
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        gateway.terminate()
        gateway.wait(timeout=15)
        upstream.stop()
        if redis:
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.websockets_idle", description=__doc__)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--sessions", choices=["distinct", "one"], default="distinct")
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--cache-ttl", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
