"""Gateway replicas on one Redis store, and a steady load through them that records every answer.

* ``Replica``: ``gateway run`` as a real process in proxy mode on a Redis ``store_url``; replicas
  built with the same ``keys`` share encryption keys and pepper, as a deployment's copies do.
* ``Load``: a few concurrent clients, each sending one kind of request in a loop (a valid
  session, a fresh code, a wrong code, no factor, an excluded path) and recording what came
  back: status, error code, the upstream's ``X-Upstream-Seq`` (tests/support/recorder.py) when
  the answer came from the upstream, and when the request started and ended. The tests compare
  that with what the recorder saw (differential: what the gateway let through vs what arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pyotp

from tests.support.recorder import SEQ_HEADER
from tests.support.servers import ROOT, free_port, gateway_process, gateway_users

SESSION_COOKIE = "gateway_session"
# The store's per-worker caches (store.cache_ttl): a revocation reaches every replica within it.
CACHE_TTL = 1.0
MAX_FAILURES = 4
KINDS = ("session", "code", "bad_code", "no_factor", "excluded")


class Replica:
    """One gateway process on ``store_url``; enter to start, leave to stop."""

    def __init__(
        self, base: Path, name: str, store_url: str, upstream: str, keys: dict[str, str], prefix: str = "gw"
    ) -> None:
        self.port = free_port()
        self.keys = keys
        base.mkdir(parents=True, exist_ok=True)
        self.output = base / f"{name}.log"
        self.config_path = base / f"{name}.toml"
        self.config_path.write_text(
            f"""
[server]
port = {self.port}
log_level = "warning"

[upstream]
url = "{upstream}"

[store]
url = "{store_url}"
prefix = "{prefix}"
cache_ttl = {CACHE_TTL}

[session]
secure = false
cookie = "{SESSION_COOKIE}"

[limits]
max_failures = {MAX_FAILURES}
# Every client of the tests is 127.0.0.1: the per-address lockout would end the load's codes.
ip_max_failures = 1000000

[paths]
exclude = ["/public/*"]
"""
        )
        self._stack = contextlib.ExitStack()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Replica:
        self._stack.enter_context(gateway_process(self.config_path, self.port, self.keys, self.output))
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stack.close()

    def users(self, *args: str) -> str:
        """``gateway users ARGS`` against this replica's store, as an operator runs it."""
        return gateway_users(self.config_path, self.keys, *args)


@contextlib.contextmanager
def replicas(base: Path, store_url: str, upstream: str, keys: dict[str, str], n: int = 2) -> Iterator[list[Replica]]:
    """``n`` gateways sharing one store, under a key prefix of their own: a Redis of the test
    session holds other tests' secrets under other keys, which the start-up check would read."""
    prefix = f"r{uuid.uuid4().hex[:12]}"
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(Replica(base, f"gw{i}", store_url, upstream, keys, prefix)) for i in range(n)]


def who(user: str) -> dict[str, str]:
    return {"Remote-User": user, "Accept": "application/json"}


async def fetch(method: str, url: str, headers: dict[str, str], **kwargs: Any) -> httpx.Response:
    """One request from a client that keeps nothing: no cookie from an earlier answer is sent."""
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.request(method, url, headers=headers, **kwargs)


async def enrol_user(url: str, user: str) -> tuple[str, str]:
    """Enrol ``user`` at the gateway ``url`` as a program does (setup, then a code);
    (secret, session id)."""
    r = await fetch("POST", url + "/setup-2fa", who(user))
    assert r.status_code == 200, r.text
    secret = pyotp.parse_uri(r.json()["otpauth_uri"]).secret
    r = await fetch("POST", url + "/verify-2fa", who(user), json={"code": pyotp.TOTP(secret).now()})
    assert r.status_code == 200, r.text
    session = r.cookies[SESSION_COOKIE]
    assert session
    return secret, session


def wrong_code(secret: str) -> str:
    """A code that is none of those the window accepts now."""
    totp = pyotp.TOTP(secret)
    now = time.time()
    near = {totp.at(now + d * totp.interval) for d in (-2, -1, 0, 1, 2)}
    return next(c for c in (f"{n:06d}" for n in range(1_000_000)) if c not in near)


@dataclass
class Answer:
    kind: str
    gateway: int  # which replica answered
    start: float  # time.monotonic()
    end: float
    status: int  # 0: no HTTP answer at all (connection error or client timeout)
    error: str = ""  # the JSON "error" of a denial, or the exception's class
    seq: int | None = None  # the upstream request that produced the answer, if any

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class Load:
    """Clients of each kind in ``KINDS`` against ``urls`` (round robin), until ``stop()``.

    ``sessions``: valid session cookies; ``secrets``: enrolled users for fresh codes (each sent
    at most once per TOTP step: replay protection refuses a second code of the same step);
    ``bad_secrets``: other enrolled users, who are sent wrong codes (they lock out quickly,
    which is one more denial).
    """

    urls: Sequence[str]
    sessions: Sequence[tuple[str, str]]  # (user, session id)
    secrets: Sequence[tuple[str, str]]  # (user, secret)
    bad_secrets: Sequence[tuple[str, str]]  # (user, secret)
    timeout: float = 10.0
    pause: float = 0.02
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._used: dict[str, int] = {}  # user -> last TOTP step whose code was sent
        self._gateways = itertools.cycle(range(len(self.urls)))

    def start(self) -> None:
        for kind in KINDS:
            self._tasks.append(asyncio.create_task(self._client(kind)))

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    def _request(self, kind: str, n: int) -> tuple[str, dict[str, str]] | None:
        if kind == "excluded":
            return f"/public/load/{n}", {}
        if kind == "session":
            user, session = self.sessions[n % len(self.sessions)]
            return f"/load/session/{n}", {**who(user), "Cookie": f"{SESSION_COOKIE}={session}"}
        if kind == "no_factor":
            user, _ = self.sessions[n % len(self.sessions)]
            return f"/load/none/{n}", who(user)
        if kind == "bad_code":
            user, secret = self.bad_secrets[n % len(self.bad_secrets)]
            return f"/load/bad/{n}", {**who(user), "X-2FA-Code": wrong_code(secret)}
        # A fresh code: the next step's (the window accepts it; the enrolment used this step's),
        # of a user who has not been sent that step's code yet.
        step = int(time.time()) // 30 + 1
        for user, secret in self.secrets:
            if self._used.get(user, -1) < step:
                self._used[user] = step
                return f"/load/code/{n}", {**who(user), "X-2FA-Code": pyotp.TOTP(secret).at(step * 30)}
        return None

    async def _client(self, kind: str) -> None:
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            for n in itertools.count():
                if self._stopping.is_set():
                    return
                request = self._request(kind, n)
                if request is None:
                    await asyncio.sleep(0.2)
                    continue
                path, headers = request
                gateway = next(self._gateways)
                start = time.monotonic()
                try:
                    r = await client.get(self.urls[gateway] + path, headers=headers)
                    client.cookies.clear()  # each request carries only the factor of its kind
                except httpx.HTTPError as exc:
                    self.answers.append(Answer(kind, gateway, start, time.monotonic(), 0, type(exc).__name__))
                else:
                    seq = r.headers.get(SEQ_HEADER)
                    error = ""
                    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
                        error = str(r.json().get("error", ""))
                    answer = Answer(
                        kind, gateway, start, time.monotonic(), r.status_code, error, int(seq) if seq else None
                    )
                    self.answers.append(answer)
                # Codes are few (one per user and step): spend them slowly.
                await asyncio.sleep(self.pause * 10 if kind == "code" else self.pause)


def fresh_user(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


PROTECTED = ("session", "code", "bad_code", "no_factor")


@dataclass
class Verdict:
    """What the load saw around an outage of the store (times: time.monotonic())."""

    in_gap: list[Answer]  # started once the caches had expired (down + CACHE_TTL), ended before restoring
    max_gap_latency: float  # the slowest answer to a request started in [down, back)
    gap_latency_by_kind: dict[str, float]  # the same, per kind of request
    resumed_after: float | None  # back -> the end of the first session request allowed after it
    upstream_unmatched: int  # upstream requests no gateway answer came from (0: the load saw all)
    leaked: list[str]  # upstream requests that carried no valid factor (bad code, none)
    counts: dict[str, int]  # answers by kind and status, e.g. "session 200"


def judge(load: Load, recorded: Sequence[tuple[int, str]], down: float, restoring: float, back: float) -> Verdict:
    """``recorded``: (seq, target) of every request the upstream received; the store went down
    at ``down``, was being brought back from ``restoring``, and answered again at ``back``."""
    answered = {a.seq for a in load.answers if a.seq is not None}
    unmatched = sum(1 for seq, _ in recorded if seq not in answered)
    leaked = [target for _, target in recorded if target.startswith(("/load/bad/", "/load/none/"))]
    during = [a for a in load.answers if down <= a.start < back]
    after = sorted(
        (a for a in load.answers if a.kind == "session" and a.start >= back and a.status == 200), key=lambda a: a.end
    )
    counts: dict[str, int] = {}
    for a in load.answers:
        name = f"{a.kind} {a.status}{' ' + a.error if a.error else ''}"
        counts[name] = counts.get(name, 0) + 1
    return Verdict(
        in_gap=[a for a in during if a.start >= down + CACHE_TTL and a.end < restoring],
        max_gap_latency=max((a.latency for a in during), default=0.0),
        gap_latency_by_kind={k: round(max((a.latency for a in during if a.kind == k), default=0.0), 3) for k in KINDS},
        resumed_after=after[0].end - back if after else None,
        upstream_unmatched=unmatched,
        leaked=leaked,
        counts=counts,
    )


# (start, end, status) of each code check, for a judge of what overlapped what.
Checked = list[tuple[float, float, int]]


async def check_codes(url: str, work: Sequence[tuple[str, Callable[[], str]]], done: Checked, clients: int) -> None:
    """Each (user, code) of ``work`` through the gateway at ``url`` in that order, ``clients``
    at a time, the code made when it is sent; appends (start, end, status) to ``done``."""
    queue = list(reversed(work))

    async def client() -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            while queue:
                user, code = queue.pop()
                start = time.monotonic()
                r = await http.get(f"{url}/rotating", headers={**who(user), "X-2FA-Code": code()})
                http.cookies.clear()
                done.append((start, time.monotonic(), r.status_code))

    await asyncio.gather(*(client() for _ in range(clients)))


async def keys_rotate(config_path: Path, keys: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """``gateway keys rotate`` as an operator runs it while gateways serve (no GATEWAY_* of the
    test's own environment, ``keys`` instead): its exit status, stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    rotation = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "keys", "rotate", "--config", str(config_path),
        env={**env, **keys}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(rotation.communicate(), timeout)
    assert rotation.returncode is not None
    return rotation.returncode, out.decode(), err.decode()
