"""Microbenchmark of the upstream client alone: µs per request, no gateway, no wrk.

Sequential GETs (``--concurrency 1``) or N concurrent loops against a local nginx answering
``return 200 "hello"``, under uvloop, each request built as the forwarder builds it (an
``httpx.Request`` on the upstream origin, the target in the ``target`` extension, the
forwarder's timeouts) and its body read to the end, then closed. Engines run interleaved,
``--rounds`` times each, so a noisy shared machine hits them alike; the table gives each
round's µs per request, wall time and the
client process's CPU time (steadier on a shared machine: the cost the client adds).

    python -m bench.transport_micro                          # gateway.upstream vs raw aiohttp
    python -m bench.transport_micro --engine old=/tmp/before/gateway/transport.py:HttpToolsTransport

``--engine NAME=FILE:CLASS`` adds any ``httpx.AsyncBaseTransport`` loaded from a file (e.g. an
earlier version, to compare). ``--profile FILE`` writes a cProfile of one engine's first round (``--profile-engine``).
Not part of the test suite, and no assertion on time anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop

from bench.procs import Processes, free_port, start_nginx
from gateway.upstream import AiohttpTransport

# What the forwarder sends for a GET with a session (gateway/proxy.py: request_headers).
_HEADERS = [
    (b"host", b"127.0.0.1"),
    (b"user-agent", b"wrk"),
    (b"accept", b"*/*"),
    (b"remote-user", b"alice"),
    (b"x-forwarded-for", b"127.0.0.1"),
    (b"x-forwarded-proto", b"http"),
    (b"x-forwarded-host", b"127.0.0.1"),
]
_TIMEOUT = {"connect": 5.0, "read": 60.0, "write": 60.0, "pool": 10.0}

Step = Callable[[], Awaitable[None]]


def _load(spec: str) -> tuple[str, Callable[[], httpx.AsyncBaseTransport]]:
    name, _, where = spec.partition("=")
    path, _, cls = where.rpartition(":")
    module_spec = importlib.util.spec_from_file_location(f"_bench_engine_{name}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    factory: Callable[[], httpx.AsyncBaseTransport] = getattr(module, cls)
    return name, factory


def _httpx_step(transport: httpx.AsyncBaseTransport, origin: httpx.URL) -> Step:
    async def step() -> None:
        request = httpx.Request(
            "GET",
            origin,
            headers=_HEADERS,
            stream=httpx.ByteStream(b""),
            extensions={"timeout": _TIMEOUT, "target": b"/"},
        )
        response = await transport.handle_async_request(request)
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        body = b""
        async for chunk in stream:
            body += chunk
        await stream.aclose()
        assert response.status_code == 200 and body == b"hello", (response.status_code, body)

    return step


def _aiohttp_step(session: aiohttp.ClientSession, url: str) -> Step:
    headers = [(k.decode(), v.decode()) for k, v in _HEADERS]

    async def step() -> None:
        async with session.request("GET", url, headers=headers, allow_redirects=False) as response:
            body = await response.read()
        assert response.status == 200 and body == b"hello"

    return step


async def _rate(step: Step, requests: int, concurrency: int) -> tuple[float, float]:
    """µs per request, wall time and this process's CPU time, for ``requests`` split over
    ``concurrency`` loops. CPU time is what the client costs; on a shared machine it is much
    steadier than wall time, which includes waiting for a core."""
    each = requests // concurrency

    async def loop() -> None:
        for _ in range(each):
            await step()

    for _ in range(200):  # warm: connections open, code paths hot
        await step()
    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    done = each * concurrency / 1e6
    return (time.perf_counter() - start) / done, (time.process_time() - cpu) / done


async def _measure(args: argparse.Namespace, port: int) -> dict[str, list[tuple[float, float]]]:
    origin = httpx.URL(f"http://127.0.0.1:{port}")
    engines: list[tuple[str, Callable[[], httpx.AsyncBaseTransport] | None]] = [
        ("upstream", AiohttpTransport),
        ("raw-aiohttp", None),
    ]
    engines += [_load(spec) for spec in args.engine]
    if args.only:
        engines = [engine for engine in engines if engine[0] in args.only]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in engines}
    for _ in range(args.rounds):
        for name, factory in engines:
            if factory is None:
                session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)
                async with session:
                    results[name].append(
                        await _rate(_aiohttp_step(session, str(origin)), args.requests, args.concurrency)
                    )
                continue
            transport = factory()
            try:
                step = _httpx_step(transport, origin)
                profile = args.profile and name == args.profile_engine and not results[name]
                profiler = cProfile.Profile() if profile else None
                if profiler is not None:
                    profiler.enable()
                results[name].append(await _rate(step, args.requests, args.concurrency))
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(args.profile)
            finally:
                await transport.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transport_micro", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--engine", action="append", default=[], metavar="NAME=FILE:CLASS")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only these engines")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the first round of --profile-engine")
    parser.add_argument("--profile-engine", default="upstream", metavar="NAME")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="transport-micro-") as workdir:
        procs = Processes(Path(workdir))
        try:
            port = free_port()
            start_nginx(
                procs,
                "nginx-upstream",
                f'server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello"; }} }}',
                [port],
            )
            results = uvloop.run(_measure(args, port))
        finally:
            procs.stop_all()
    print(
        f"\nµs per request (wall / CPU of this process), {args.requests} GETs per round,"
        f" concurrency {args.concurrency}\n"
    )
    print("| engine | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | median wall | median CPU |")
    print("| --- |" + " ---: |" * (args.rounds + 2))
    for name, values in results.items():
        cells = " | ".join(f"{wall:.0f} / {cpu:.0f}" for wall, cpu in values)
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"| {name} | {cells} | {wall:.0f} | {cpu:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
