"""Two gateway replicas (two ``gateway run`` processes) on one redis-server, in proxy mode in
front of tests/support/upstream_app.py: what one replica learns, the other knows (issue 13 §1,
"two replicas, one store"). Each request names the replica it goes to; nothing is shared
between them but the store and the keys."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import pyotp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.websocket import SESSION_ENDED
from tests.conftest import RedisServer
from tests.support.load import (
    CACHE_TTL,
    MAX_FAILURES,
    SESSION_COOKIE,
    Replica,
    enrol_user,
    fetch,
    replicas,
    who,
    wrong_code,
)
from tests.support.servers import UpstreamProcess, fresh_keys

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(
    redis_server: RedisServer, upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Replica]]:
    with replicas(tmp_path_factory.mktemp("replicas"), redis_server.url, upstream.url, fresh_keys()) as both:
        yield both


def user_name(tag: str) -> str:
    return f"rep-{tag}-{uuid.uuid4().hex[:8]}"


async def test_enrol_on_a_verify_on_b(pair: list[Replica]) -> None:
    a, b = pair
    user = user_name("enrol")
    r = await fetch("POST", a.url + "/setup-2fa", who(user))
    assert r.status_code == 200, r.text
    secret = pyotp.parse_uri(r.json()["otpauth_uri"]).secret
    r = await fetch("POST", b.url + "/verify-2fa", who(user), json={"code": pyotp.TOTP(secret).now()})
    assert r.status_code == 200, r.text
    session = r.cookies[SESSION_COOKIE]
    # B's session lets the user through A.
    r = await fetch("GET", a.url + "/echo", {**who(user), "Cookie": f"{SESSION_COOKIE}={session}"})
    assert r.status_code == 200
    assert ["remote-user", user] in r.json()["headers"]


def next_code(secret: str) -> str:
    """The next step's code: the enrolment used this step's (replay protection), and the
    window (1 step) accepts the next."""
    totp = pyotp.TOTP(secret)
    return totp.at(time.time() + totp.interval)


async def test_a_code_accepted_by_a_is_refused_by_b(pair: list[Replica]) -> None:
    a, b = pair
    user = user_name("replay")
    secret, _ = await enrol_user(a.url, user)
    code = next_code(secret)
    r = await fetch("GET", a.url + "/echo", {**who(user), "X-2FA-Code": code})
    assert r.status_code == 200, r.text
    r = await fetch("GET", b.url + "/echo", {**who(user), "X-2FA-Code": code})
    assert (r.status_code, r.json().get("error")) == (401, "2fa_replayed"), r.text


@pytest.mark.parametrize(("on_a", "on_b"), [(2, 2), (1, 3), (3, 1)])
async def test_failures_on_a_and_b_add_up_to_one_lockout(pair: list[Replica], on_a: int, on_b: int) -> None:
    assert on_a + on_b == MAX_FAILURES
    a, b = pair
    locked, control = user_name("lock"), user_name("ctl")
    secrets = {u: (await enrol_user(a.url, u))[0] for u in (locked, control)}

    async def fail(user: str, replica: Replica, times: int) -> list[str]:
        errors = []
        for _ in range(times):
            r = await fetch("GET", replica.url + "/echo", {**who(user), "X-2FA-Code": wrong_code(secrets[user])})
            errors.append(r.json().get("error"))
        return errors

    # One failure short of the limit, spread over both: a good code still opens.
    assert await fail(control, a, on_a) + await fail(control, b, on_b - 1) == ["2fa_invalid"] * (MAX_FAILURES - 1)
    r = await fetch("GET", b.url + "/echo", {**who(control), "X-2FA-Code": next_code(secrets[control])})
    assert r.status_code == 200, r.text
    # The limit, spread over both: locked on both, even with a good code.
    # The failure that reaches the limit is itself answered "locked".
    errors = await fail(locked, a, on_a) + await fail(locked, b, on_b)
    assert errors == ["2fa_invalid"] * (MAX_FAILURES - 1) + ["2fa_locked"]
    for replica in (a, b):
        r = await fetch("GET", replica.url + "/echo", {**who(locked), "X-2FA-Code": next_code(secrets[locked])})
        assert (r.status_code, r.json().get("error")) == (429, "2fa_locked"), r.text


async def test_a_session_opened_on_a_is_valid_on_b(pair: list[Replica]) -> None:
    a, b = pair
    user = user_name("session")
    _, session = await enrol_user(a.url, user)
    r = await fetch("GET", b.url + "/echo", {**who(user), "Cookie": f"{SESSION_COOKIE}={session}"})
    assert r.status_code == 200, r.text
    # It is the user's session: another enrolled user presenting it is refused on B.
    other = user_name("other")
    await enrol_user(a.url, other)
    r = await fetch("GET", b.url + "/echo", {**who(other), "Cookie": f"{SESSION_COOKIE}={session}"})
    assert (r.status_code, r.json().get("error")) == (401, "2fa_required"), r.text


async def test_users_reset_ends_sessions_and_sockets_on_both(pair: list[Replica], upstream: UpstreamProcess) -> None:
    """``gateway users reset`` (another process, through the store): within cache_ttl + 1 s of
    its return, both replicas refuse the session and both open WebSockets are closed with
    SESSION_ENDED, though each replica had the session in its cache."""
    a, b = pair
    user = user_name("reset")
    _, session = await enrol_user(a.url, user)
    headers = {**who(user), "Cookie": f"{SESSION_COOKIE}={session}"}
    async with httpx.AsyncClient() as client:
        for replica in pair:  # each replica now has the session in its cache
            assert (await client.get(replica.url + "/echo", headers=headers)).status_code == 200
        query = f"n={uuid.uuid4().hex}"
        async with (
            connect(a.url.replace("http", "ws", 1) + f"/ws?{query}", additional_headers=headers) as ws_a,
            connect(b.url.replace("http", "ws", 1) + f"/ws?{query}", additional_headers=headers) as ws_b,
        ):
            for ws in (ws_a, ws_b):
                assert await ws.recv() == f"hello {user}"
            await asyncio.to_thread(a.users, "reset", user)
            reset = time.monotonic()
            bound = CACHE_TTL + 1

            async def refused(replica: Replica) -> float:
                while (await client.get(replica.url + "/echo", headers=headers)).status_code == 200:
                    await asyncio.sleep(0.05)
                return time.monotonic() - reset

            async def closed(ws: ClientConnection) -> float:
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.recv()
                assert ws.close_code == SESSION_ENDED
                return time.monotonic() - reset

            async with asyncio.timeout(bound):
                took = await asyncio.gather(refused(a), refused(b), closed(ws_a), closed(ws_b))
    print(f"users reset -> refused on A, B; sockets closed on A, B after {[round(t, 3) for t in took]} s")
