"""The soak's load generator, in a process of its own (``python -m soak.load PLAN OUT``): reads
the plan (where the gateway is, its users and sessions), measures capacity in a closed loop
unless a rate is given, drives half of it in an open loop, and writes what happened as JSON.

Every request has an expected answer (status, and a body or header where one is checkable);
anything else, a transport error included, is an unexpected error, counted by kind with one
sample (never a code, a cookie or a secret: status, error field and exception type only).
HTTP is aiohttp, WebSockets the ``websockets`` library.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pyotp
from websockets.asyncio.client import connect

from soak.stats import KINDS, cycle, schedule

_HOLD_TIMEOUT = 30.0  # seconds a request may take before it counts as an error (a hang)
_WS_MESSAGES = 3


class Unexpected(Exception):
    """An answer that is not the expected one: ``kind`` names it, the message is the sample."""

    def __init__(self, kind: str, sample: str) -> None:
        super().__init__(sample)
        self.kind = kind


@dataclass
class Users:
    """The code users: one request in flight per user at a time (so the gateway's failure count
    for each is known exactly), one accepted code per user per step (RFC 6238 §5.2: a step is
    accepted once), and at most ``max_failures - 1`` wrong codes before a right one resets the
    count (a lockout is the ``locked`` kind's business, not this one's)."""

    secrets: dict[str, str]
    max_failures: int
    totp: Callable[[str], pyotp.TOTP]
    free: deque[str] = field(default_factory=deque)
    last_step: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free.extend(self.secrets)

    def take(self, wants: Callable[[str], bool]) -> str | None:
        for _ in range(len(self.free)):
            user = self.free.popleft()
            if wants(user):
                return user
            self.free.append(user)
        return None

    def give_back(self, user: str) -> None:
        self.free.append(user)


class Driver:
    def __init__(self, plan: dict[str, Any], session: aiohttp.ClientSession) -> None:
        self.plan = plan
        self.http = session
        self.url: str = plan["url"]
        self.user_header: str = plan["user_header"]
        self.code_header: str = plan["code_header"]
        self.cookie_name: str = plan["cookie"]
        self.period: int = plan["period"]
        self.sessions: list[tuple[str, str]] = [(user, session) for user, session in plan["sessions"]]
        self.locked: list[str] = plan["locked"]
        self.users = Users(plan["code_users"], plan["max_failures"], self._totp)
        self.download_digest = bytes.fromhex(plan["download_sha256"])
        self.turn = 0
        self.skipped: dict[str, int] = {}

    def _totp(self, user: str) -> pyotp.TOTP:
        return pyotp.TOTP(self.plan["code_users"][user], digits=self.plan["digits"], interval=self.period)

    def _next(self, pool: list[Any]) -> Any:
        self.turn += 1
        return pool[self.turn % len(pool)]

    def _session_headers(self) -> dict[str, str]:
        user, session = self._next(self.sessions)
        return {self.user_header: user, "Cookie": f"{self.cookie_name}={session}"}

    async def run(self, kind: str) -> bool:
        """One request of ``kind``; False when it could not be made (no code user free)."""
        return await getattr(self, "_" + kind)()  # type: ignore[no-any-return]

    async def _get(self, path: str, headers: dict[str, str], status: int) -> tuple[aiohttp.ClientResponse, bytes]:
        response = await self.http.get(self.url + path, headers=headers, allow_redirects=False)
        body = await response.read()
        if response.status != status:
            raise Unexpected(
                f"status {response.status}", f"{path.split('?')[0]} -> {response.status} {_error_of(body)}"
            )
        return response, body

    async def _session(self) -> bool:
        headers = self._session_headers()
        _, body = await self._get("/echo/app?soak=1", headers, 200)
        echoed = json.loads(body)
        if echoed.get("method") != "GET" or [headers[self.user_header]] != [
            v for k, v in echoed["headers"] if k.lower() == self.user_header.lower()
        ]:
            raise Unexpected("wrong body", "the upstream did not see exactly the session's user")
        return True

    async def _auth(self) -> bool:
        headers = {**self._session_headers(), "X-Original-URI": "/app/page?x=1", "X-Original-Method": "GET"}
        await self._get("/auth", headers, 200)
        return True

    async def _excluded(self) -> bool:
        _, body = await self._get("/public/echo", {}, 200)
        if json.loads(body).get("method") != "GET":
            raise Unexpected("wrong body", "the excluded path's echo is not the request's")
        return True

    async def _code(self) -> bool:
        step = int(time.time() // self.period)
        user = self.users.take(lambda u: self.users.last_step.get(u, -1) < step)
        if user is None:
            return False
        try:
            self.users.last_step[user] = step
            code = self._totp(user).at(step * self.period)
            response, _ = await self._get("/echo/app", {self.user_header: user, self.code_header: code}, 200)
            self.users.failures[user] = 0  # a right code starts the count again
            if self.cookie_name not in response.cookies:
                raise Unexpected("no session cookie", "an accepted code set no session cookie")
        finally:
            self.users.give_back(user)
        return True

    async def _wrong(self) -> bool:
        user = self.users.take(lambda u: self.users.failures.get(u, 0) < self.users.max_failures - 1)
        if user is None:
            return False
        try:
            now, digits = time.time(), self.plan["digits"]
            valid = {self._totp(user).at(now + k * self.period) for k in range(-2, 3)}  # window 1, and margin
            wrong = next(c for c in ("0" * digits, "1" * digits, "2" * digits) if c not in valid)
            self.users.failures[user] = self.users.failures.get(user, 0) + 1
            _, body = await self._get("/echo/app", {self.user_header: user, self.code_header: wrong}, 401)
            if _error_of(body) != "2fa_invalid":
                raise Unexpected("wrong body", f"401 {_error_of(body)}")
        finally:
            self.users.give_back(user)
        return True

    async def _locked(self) -> bool:
        user = self._next(self.locked)
        response, _ = await self._get(
            "/echo/app", {self.user_header: user, self.code_header: "0" * self.plan["digits"]}, 429
        )
        retry_after = response.headers.get("Retry-After", "")
        if not retry_after.isdigit() or int(retry_after) <= 0:
            raise Unexpected("no Retry-After", f"429 with Retry-After {retry_after!r}")
        return True

    async def _download(self) -> bool:
        headers = self._session_headers()
        async with self.http.get(f"{self.url}/bytes/{self.plan['download_bytes']}", headers=headers) as response:
            if response.status != 200:
                raise Unexpected(f"status {response.status}", f"/bytes -> {response.status}")
            digest = hashlib.sha256()
            async for chunk in response.content.iter_chunked(1 << 16):
                digest.update(chunk)
        if digest.digest() != self.download_digest:
            raise Unexpected("wrong body", "the download's bytes differ from the upstream's")
        return True

    async def _websocket(self) -> bool:
        headers = self._session_headers()
        user = headers[self.user_header]
        async with connect(self.plan["ws_url"] + "/ws", additional_headers=headers, open_timeout=_HOLD_TIMEOUT) as ws:
            if await ws.recv() != f"hello {user}":
                raise Unexpected("wrong body", "the WebSocket greeting is not for the session's user")
            for i in range(_WS_MESSAGES):
                await ws.send(f"m{i}")
                if await ws.recv() != f"echo m{i}":
                    raise Unexpected("wrong body", "a WebSocket echo differs")
        return True


def _error_of(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return "(not JSON)"
    return str(error)


@dataclass
class Outcome:
    records: list[tuple[int, float, float]] = field(default_factory=list)  # (kind index, start, latency)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str, what: str, sample: str) -> None:
        entry = self.errors.setdefault(f"{kind}: {what}", {"count": 0, "sample": sample})
        entry["count"] += 1


async def _timed(driver: Driver, kind: str, start: float, origin: float, outcome: Outcome) -> None:
    """One request, its latency from its scheduled start (``origin + start``), its verdict."""
    try:
        made = await asyncio.wait_for(driver.run(kind), _HOLD_TIMEOUT)
    except Unexpected as exc:
        outcome.error(kind, exc.kind, str(exc))
        return
    except TimeoutError:
        outcome.error(kind, "hang", f"no answer in {_HOLD_TIMEOUT:.0f} s")
        return
    except Exception as exc:  # transport errors, protocol errors: all unexpected
        outcome.error(kind, type(exc).__name__, type(exc).__name__)
        return
    if made:
        outcome.records.append((KINDS.index(kind), start, time.monotonic() - origin - start))
    else:
        outcome.skipped[kind] = outcome.skipped.get(kind, 0) + 1


async def closed_loop(driver: Driver, seconds: float, concurrency: int, outcome: Outcome) -> float:
    """Capacity: ``concurrency`` clients, each sending the mix back to back; requests per second."""
    kinds = cycle(driver.plan["mix"])
    origin = time.monotonic()
    deadline = origin + seconds

    async def client(offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            await _timed(driver, kinds[i % len(kinds)], time.monotonic() - origin, origin, outcome)
            i += 1

    await asyncio.gather(*(client(k * 7) for k in range(concurrency)))
    return len(outcome.records) / (time.monotonic() - origin)


async def open_loop(driver: Driver, rate: float, seconds: float, outcome: Outcome) -> float:
    """The schedule at ``rate``; the wall-clock time it started."""
    started = time.time()
    origin = time.monotonic()
    pending: set[asyncio.Task[None]] = set()
    for start, kind in schedule(rate, seconds, driver.plan["mix"]):
        delay = origin + start - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_timed(driver, kind, start, origin, outcome))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending)
    return started


def _client(plan: dict[str, Any]) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=plan["connections"])
    timeout = aiohttp.ClientTimeout(total=_HOLD_TIMEOUT)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar())


async def main_async(plan: dict[str, Any], out: Path, announce: Callable[[str], Awaitable[None]]) -> None:
    """Warm-up (the capacity run, or ``bucket`` seconds at the given rate), a pause with every
    client connection closed (the gateway's idle fds and tasks after warm-up), the run itself."""
    warmup = Outcome()
    capacity = None
    rate = plan["rate"]
    async with _client(plan) as http:
        driver = Driver(plan, http)
        if rate is None:
            capacity = await closed_loop(driver, plan["capacity_seconds"], plan["concurrency"], warmup)
            rate = capacity / 2
            await announce(f"capacity as measured by this run: {capacity:.0f} requests/s; driving {rate:.0f}/s")
        else:
            await open_loop(driver, rate, plan["warmup_seconds"], warmup)
    idle_before = time.time()
    await asyncio.sleep(plan["idle_seconds"])
    outcome = Outcome()
    async with _client(plan) as http:
        driver.http = http
        started = await open_loop(driver, rate, plan["seconds"], outcome)
    errors = {**{f"warm-up, {what}": entry for what, entry in warmup.errors.items()}, **outcome.errors}
    result = {
        "capacity": capacity,
        "rate": rate,
        "started": started,
        "seconds": plan["seconds"],
        "idle_before": [idle_before, idle_before + plan["idle_seconds"]],
        "kinds": list(KINDS),
        "records": outcome.records,
        "errors": errors,
        "skipped": outcome.skipped,
    }
    out.write_text(json.dumps(result))


async def _say(line: str) -> None:
    print(f"[soak] {line}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    plan = json.loads(Path(argv[0]).read_text())
    asyncio.run(main_async(plan, Path(argv[1]), _say))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
