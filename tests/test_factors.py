"""The second factor under attack: bursts of concurrent codes against the lockout (issue 10).

Every burst goes through the real ASGI app in-process (``httpx.ASGITransport``), once per store
backend (SQLite, and a real redis-server), and counts what was *judged*: a judged wrong code is
a 401 ``2fa_invalid``, or the one 429 of the attempt that used the last room; an attempt refused
unjudged is a 429 ``2fa_locked`` as well. So with a limit of N, exactly N - 1 answers may be 401.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyotp
import pytest

from gateway.app import create_app
from gateway.config import Config
from gateway.crypto import SecretBox
from gateway.errors import Reason
from gateway.factors import Accepted, Refused, SecondFactor
from gateway.store import Store, open_store_from_url
from gateway.totp import hash_recovery_code, new_recovery_codes, new_secret, normalize_recovery_code
from tests.conftest import RedisServer
from tests.support.servers import make_config

BURST = 200
LIMITS = {"max_failures": 5, "lockout": 900, "ip_max_failures": 20, "ip_lockout": 900}
TARGET = {"X-Original-URI": "/admin", "X-Original-Method": "GET"}


@dataclass
class Gateway:
    config: Config
    store: Store
    client: httpx.AsyncClient

    async def enrol(self, user: str) -> pyotp.TOTP:
        secret = new_secret()
        await self.store.set_secret(user, SecretBox(self.config.encryption.keys).encrypt(user, secret))
        return pyotp.TOTP(secret)

    async def auth(self, user: str, code: str, address: str = "203.0.113.7") -> httpx.Response:
        headers = {**TARGET, "Remote-User": user, "X-2FA-Code": code, "X-Forwarded-For": address}
        response = await self.client.get("/auth", headers=headers)
        self.client.cookies.clear()  # each call carries exactly these headers, no session
        return response


@pytest.fixture(params=["sqlite", "redis"])
async def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Gateway]:
    store_table = {}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        store_table = {"url": server.url, "prefix": f"t{uuid.uuid4().hex}"}
    config = make_config(tmp_path, limits=LIMITS, store=store_table)
    store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
    await store.open()
    app = create_app(config, store=store)
    # The peer is a trusted proxy (loopback), so Remote-User and X-Forwarded-For are believed.
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield Gateway(config, store, client)
    await store.close()


def wrong_code(totp: pyotp.TOTP, i: int) -> str:
    """A code that is never right at this moment (nor one step either side)."""
    right = {totp.at(time.time() + d * totp.interval) for d in (-2, -1, 0, 1, 2)}
    code = f"{(i * 7919) % 1_000_000:06d}"
    while code in right:
        code = f"{(int(code) + 1) % 1_000_000:06d}"
    return code


def errors(responses: list[httpx.Response]) -> list[str]:
    """The JSON error of each answer (``/auth`` says 2fa_locked with a 403, for nginx)."""
    return [r.json()["error"] if r.status_code != 200 else "allowed" for r in responses]


async def test_a_burst_of_wrong_codes_gets_at_most_max_failures_judged(gateway: Gateway) -> None:
    totp = await gateway.enrol("alice")
    answers = errors(await asyncio.gather(*(gateway.auth("alice", wrong_code(totp, i)) for i in range(BURST))))
    assert answers.count("2fa_invalid") == LIMITS["max_failures"] - 1
    assert answers.count("2fa_locked") == BURST - LIMITS["max_failures"] + 1
    state = await gateway.store.user_state("alice", time.time())
    assert state.locked_until is not None


async def test_the_right_code_inside_a_burst_after_the_limit_is_never_accepted(gateway: Gateway) -> None:
    totp = await gateway.enrol("alice")
    # The secret is cached by one answered request, so every request of the burst goes
    # straight to its attempt; the right code is sent last, after 200 wrong ones.
    assert (await gateway.auth("alice", wrong_code(totp, 0))).status_code == 401
    burst = [gateway.auth("alice", wrong_code(totp, i)) for i in range(1, BURST)]
    burst.append(gateway.auth("alice", totp.now()))
    answers = await asyncio.gather(*burst)
    assert answers[-1].json()["error"] == "2fa_locked" and "retry-after" in answers[-1].headers
    assert not any(r.status_code == 200 for r in answers)


async def test_a_burst_across_many_users_from_one_address(gateway: Gateway) -> None:
    users = [f"user{i}" for i in range(BURST)]
    totps = [await gateway.enrol(u) for u in users]
    burst = [
        gateway.auth(u, wrong_code(t, i), address="198.51.100.9")
        for i, (u, t) in enumerate(zip(users, totps, strict=True))
    ]
    answers = errors(await asyncio.gather(*burst))
    assert answers.count("2fa_invalid") == LIMITS["ip_max_failures"] - 1
    # The address is locked for every user now, also for a right code...
    right = await gateway.auth(users[-1], totps[-1].now(), address="198.51.100.9")
    assert right.json()["error"] == "2fa_locked"
    # ...but not for another address.
    assert (await gateway.auth(users[-1], totps[-1].now(), address="198.51.100.10")).status_code == 200


async def test_recovery_codes_count_against_the_same_limit(gateway: Gateway) -> None:
    await gateway.enrol("alice")
    config = gateway.config
    good = new_recovery_codes()[0]
    await gateway.store.set_recovery_codes(
        "alice", [hash_recovery_code(config.encryption.recovery_pepper, "alice", normalize_recovery_code(good) or "")]
    )

    async def verify(code: str) -> httpx.Response:
        headers = {"Remote-User": "alice", "X-Forwarded-For": "203.0.113.7"}
        return await gateway.client.post("/verify-2fa", json={"recovery_code": code}, headers=headers)

    burst = [verify(f"WRNG-{i:04d}-XXXX") for i in range(BURST)] + [verify(good)]
    answers = await asyncio.gather(*burst)
    assert [r.status_code for r in answers].count(401) == LIMITS["max_failures"] - 1
    assert answers[-1].status_code == 429  # the good one came after the limit: not judged, not used
    assert (await gateway.store.user_state("alice", time.time())).recovery_codes_left == 1


async def test_enrolment_codes_count_against_the_same_limit(gateway: Gateway) -> None:
    factors = SecondFactor(gateway.config, gateway.store)
    secret = await factors.begin_enrolment("bob")
    assert secret is not None
    totp = pyotp.TOTP(secret)

    async def verify(code: str) -> httpx.Response:
        headers = {"Remote-User": "bob", "X-Forwarded-For": "203.0.113.7"}
        return await gateway.client.post("/verify-2fa", json={"code": code}, headers=headers)

    answers = await asyncio.gather(*[verify(wrong_code(totp, i)) for i in range(BURST)], verify(totp.now()))
    assert [r.status_code for r in answers].count(401) == LIMITS["max_failures"] - 1
    assert answers[-1].status_code == 429
    assert await gateway.store.get_secret("bob") is None  # never activated


async def test_a_right_code_resets_the_user_and_gives_the_address_its_attempt_back(gateway: Gateway) -> None:
    totps = {u: await gateway.enrol(u) for u in ("alice", "bob")}
    for i in range(LIMITS["max_failures"] - 1):
        assert (await gateway.auth("alice", wrong_code(totps["alice"], i))).status_code == 401
    assert (await gateway.auth("alice", totps["alice"].now())).status_code == 200
    # The user's count started again: four more wrong codes are judged, not locked.
    for i in range(LIMITS["max_failures"] - 1):
        assert (await gateway.auth("alice", wrong_code(totps["alice"], i))).status_code == 401
    assert (await gateway.store.user_state("alice", time.time())).failures == LIMITS["max_failures"] - 1


async def test_colleagues_signing_in_from_one_address_never_lock_it(gateway: Gateway) -> None:
    """Each code takes an attempt from the address first; a right one gives it back."""
    users = [f"colleague{i}" for i in range(LIMITS["ip_max_failures"] * 2)]
    for user in users:
        totp = await gateway.enrol(user)
        assert (await gateway.auth(user, totp.now(), address="198.51.100.20")).status_code == 200


async def test_a_lockout_leaves_a_live_session_alone(gateway: Gateway) -> None:
    totp = await gateway.enrol("alice")
    ok = await gateway.auth("alice", totp.now())
    assert ok.status_code == 200
    cookie = ok.headers["set-cookie"].split(";", 1)[0]
    for i in range(LIMITS["max_failures"]):
        await gateway.auth("alice", wrong_code(totp, i))
    assert (await gateway.auth("alice", wrong_code(totp, 99))).json()["error"] == "2fa_locked"  # guessing stops
    with_session = {**TARGET, "Remote-User": "alice", "Cookie": cookie, "X-Forwarded-For": "203.0.113.7"}
    assert (await gateway.client.get("/auth", headers=with_session)).status_code == 200  # the person stays in
    # Someone else's session is no session, locked or not.
    mallory = {**with_session, "Remote-User": "mallory"}
    assert (await gateway.client.get("/auth", headers=mallory)).status_code != 200


async def test_the_lockout_page_says_how_long_and_links_back(gateway: Gateway) -> None:
    totp = await gateway.enrol("alice")
    headers = {"Remote-User": "alice", "X-Forwarded-For": "203.0.113.7", "Accept": "text/html"}
    answers = [
        await gateway.client.post("/verify-2fa", data={"code": wrong_code(totp, i), "next": "/app/x"}, headers=headers)
        for i in range(LIMITS["max_failures"])
    ]
    assert [r.status_code for r in answers] == [401] * (LIMITS["max_failures"] - 1) + [429]
    page = answers[-1]
    assert page.headers["content-type"].startswith("text/html") and page.headers["retry-after"] == "900"
    assert "Try again in 15 minutes" in page.text
    assert 'href="/verify-2fa?next=/app/x"' in page.text and 'href="/app/x"' in page.text
    assert "wrong or expired" not in page.text


async def test_the_proxy_mode_lockout_page_for_a_browser(tmp_path: Path) -> None:
    """A browser sending codes in the header (proxy mode) meets the same page, not a bare heading."""
    config = make_config(tmp_path, upstream="http://127.0.0.1:9", limits=LIMITS)  # never reached: all denied
    store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
    await store.open()
    secret = new_secret()
    await store.set_secret("alice", SecretBox(config.encryption.keys).encrypt("alice", secret))
    transport = httpx.ASGITransport(app=create_app(config, store=store), client=("127.0.0.1", 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            headers = {"Remote-User": "alice", "Accept": "text/html"}
            for i in range(LIMITS["max_failures"]):
                r = await client.get("/app/page", headers={**headers, "X-2FA-Code": wrong_code(pyotp.TOTP(secret), i)})
            assert r.status_code == 429 and r.headers["retry-after"] == "900"
            assert "Try again in 15 minutes" in r.text and 'href="/app/page"' in r.text
            assert 'href="/verify-2fa?next=/app/page"' in r.text
    finally:
        await store.close()


async def test_a_secret_replaced_elsewhere_is_judged_after_cache_ttl(tmp_path: Path) -> None:
    """Decrypted secrets are remembered by ciphertext (issue 10: a flood of codes must not
    decrypt per code), so a secret replaced by another worker or the CLI is the one judged
    once ``store.cache_ttl`` has passed: the old authenticator's code is refused."""
    config = make_config(tmp_path, limits=LIMITS)
    store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
    await store.open()
    clock = [1_700_000_000.0]
    factors = SecondFactor(config, store, clock=lambda: clock[0])
    box = SecretBox(config.encryption.keys)
    old, new = pyotp.TOTP(new_secret()), pyotp.TOTP(new_secret())
    try:
        await store.set_secret("alice", box.encrypt("alice", old.secret))
        assert await factors.check_code("alice", wrong_code(old, 1), None) == Refused(Reason.INVALID_CODE)
        await store.set_secret("alice", box.encrypt("alice", new.secret))
        clock[0] += config.store.cache_ttl + 0.5
        assert await factors.check_code("alice", old.at(clock[0]), None) == Refused(Reason.INVALID_CODE)
        assert isinstance(await factors.check_code("alice", new.at(clock[0]), None), Accepted)
    finally:
        await store.close()
