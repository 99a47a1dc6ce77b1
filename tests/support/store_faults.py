"""What every store fault test checks (issue 14 §1), against one real ``gateway run`` process in
proxy mode in front of the recorder (tests/support/recorder.py).

``FaultGateway`` writes the config (store.cache_ttl = 0: every request asks the store, the
worst case of an outage and the one the assertions need) and starts the process. ``Prober``
holds users enrolled through the gateway before the fault: ``sessions`` (a live 2FA session
each) and ``coders`` (one fresh TOTP code each: a code spends its user's time step, so each
code request takes the next user). ``Prober.round()`` sends, at once, a session request, a
code request, an excluded path and the readiness probe; ``denied`` and ``serving`` state what
a round during and after a fault must show.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyotp

from tests.support.load import SESSION_COOKIE, enrol_user, fresh_user, who
from tests.support.recorder import SEQ_HEADER, Recorder
from tests.support.servers import free_port, fresh_keys, gateway_process

READY = "/_gateway/ready"
RESUME_BOUND = 10.0  # the fault ended: the next session request is allowed within this


class FaultGateway:
    """``gateway run`` on ``store_url`` in front of ``upstream``; enter to start, leave to stop."""

    def __init__(self, base: Path, store_url: str, upstream: str, wrap: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.keys = fresh_keys()
        self.wrap = wrap
        base.mkdir(parents=True, exist_ok=True)
        self.output = base / f"gateway-{self.port}.log"
        self.config_path = base / f"gateway-{self.port}.toml"
        # A file system mounted in the gateway's own namespace (wrap) is out of reach of the
        # `store init` gateway_process runs from here: that gateway makes its store on start.
        create = 'create = "if_missing"' if wrap else ""
        self.config_path.write_text(
            f"""
[server]
port = {self.port}
log_level = "warning"

[upstream]
url = "{upstream}"

[store]
url = "{store_url}"
cache_ttl = 0
{create}

[session]
secure = false
cookie = "{SESSION_COOKIE}"

[limits]
# Every client of the tests is 127.0.0.1.
ip_max_failures = 1000000

[paths]
exclude = ["/public/*"]
"""
        )
        self._stack = contextlib.ExitStack()
        self.pid = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultGateway:
        proc = self._stack.enter_context(
            gateway_process(self.config_path, self.port, self.keys, self.output, wrap=self.wrap)
        )
        self.pid = proc.pid
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def log(self) -> str:
        return self.output.read_text(errors="replace")


@dataclass
class Reply:
    status: int
    error: str  # the JSON "error" of a denial, or "status" of the readiness answer
    seq: int | None  # the upstream request that produced it (X-Upstream-Seq), if any
    latency: float


@dataclass
class Round:
    session: Reply
    code: Reply
    excluded: Reply
    ready: Reply

    def protected(self) -> dict[str, Reply]:
        return {"session": self.session, "code": self.code}


class Prober:
    def __init__(self, gateway: FaultGateway, recorder: Recorder, timeout: float) -> None:
        """``timeout``: the store's, as configured; the client gives up 2 s after the bound."""
        self.url = gateway.url
        self.recorder = recorder
        self.bound = timeout + 2.0
        self.sessions: list[tuple[str, str]] = []
        self.coders: list[tuple[str, str]] = []
        self.n = 0

    async def enrol(self, sessions: int = 2, coders: int = 6, tag: str = "f1") -> None:
        """Users enrolled at the gateway (setup, then a code), as a program does."""
        users = [fresh_user(tag) for _ in range(sessions + coders)]
        enrolled = await asyncio.gather(*(enrol_user(self.url, u) for u in users))
        pairs = list(zip(users, enrolled, strict=True))
        self.sessions += [(u, session) for u, (_, session) in pairs[:sessions]]
        self.coders += [(u, secret) for u, (secret, _) in pairs[sessions:]]

    async def _get(self, path: str, headers: dict[str, str]) -> Reply:
        start = time.monotonic()
        async with httpx.AsyncClient(timeout=self.bound + 2.0) as client:
            try:
                r = await client.get(self.url + path, headers=headers)
            except httpx.TimeoutException:
                return Reply(0, "client timeout", None, time.monotonic() - start)
        error = ""
        if r.headers.get("content-type", "").startswith("application/json"):
            body = r.json()
            error = str(body.get("error", body.get("status", "")))
        seq = r.headers.get(SEQ_HEADER)
        return Reply(r.status_code, error, int(seq) if seq else None, time.monotonic() - start)

    def _next(self) -> int:
        self.n += 1
        return self.n

    async def session(self) -> Reply:
        user, session = self.sessions[0]
        return await self._get(f"/f1/session/{self._next()}", {**who(user), "Cookie": f"{SESSION_COOKIE}={session}"})

    async def code(self) -> Reply:
        """A fresh code of a user not asked before: the next step's (the window takes it; the
        enrolment used this step's)."""
        user, secret = self.coders.pop()
        code = pyotp.TOTP(secret).at((int(time.time()) // 30 + 1) * 30)
        return await self._get(f"/f1/code/{self._next()}", {**who(user), "X-2FA-Code": code})

    async def excluded(self) -> Reply:
        return await self._get(f"/public/f1/{self._next()}", {})

    async def ready(self) -> Reply:
        return await self._get(READY, {})

    async def round(self) -> Round:
        session, code, excluded, ready = await asyncio.gather(
            self.session(), self.code(), self.excluded(), self.ready()
        )
        return Round(session, code, excluded, ready)

    def recorded(self) -> list[str]:
        return [r.target for r in self.recorder.snapshot()[0]]

    async def denied(self, reads_work: bool | None = False) -> Round:
        """One round during a fault: the protected requests denied with 503 store_unavailable and
        nothing of them at the upstream (with ``reads_work``: a fault that only breaks writes,
        where a live session, a read, may pass, but a code, which must take an attempt and
        spend its step, may not; None: a read may pass, or be denied when it queued behind a
        write that waited for a lock); readiness 503; the excluded path served; every answer within
        the store timeout + 2 s."""
        before = len(self.recorded())
        got = await self.round()
        for name, reply in {**got.protected(), "excluded": got.excluded, "ready": got.ready}.items():
            assert reply.status != 0, f"{name}: no answer within {self.bound + 2.0} s"
            assert reply.latency < self.bound, (name, reply)
        assert (got.code.status, got.code.error, got.code.seq) == (503, "store_unavailable", None), got.code
        passed = (got.session.status, got.session.error, got.session.seq is not None) == (200, "", True)
        if reads_work:
            assert passed, got.session
        elif reads_work is None and passed:
            pass
        else:
            assert (got.session.status, got.session.error, got.session.seq) == (503, "store_unavailable", None)
        assert (got.ready.status, got.ready.error) == (503, "unavailable"), got.ready
        assert got.excluded.status == 200 and got.excluded.seq is not None, got.excluded
        reached = self.recorded()[before:]
        assert not [t for t in reached if t.startswith("/f1/code/")], reached
        if not passed:
            assert [t for t in reached if not t.startswith("/public/")] == [], reached
        return got

    async def serving(self) -> Round:
        """The fault ended; with no restart, within RESUME_BOUND, the next session request is
        allowed; then a fresh code is allowed and reaches the upstream, and readiness says ready."""
        deadline = time.monotonic() + RESUME_BOUND
        while True:
            reply = await self.session()
            if reply.status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert reply.status == 200 and reply.seq is not None, f"not resumed within {RESUME_BOUND} s: {reply}"
        got = await self.round()
        assert got.session.status == 200 and got.session.seq is not None, got.session
        assert got.code.status == 200 and got.code.seq is not None, got.code
        assert got.excluded.status == 200, got.excluded
        assert (got.ready.status, got.ready.error) == (200, "ready"), got.ready
        return got


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    server = Recorder().start()
    try:
        yield server
    finally:
        server.stop()
