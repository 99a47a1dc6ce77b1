"""The one decision: order, fail-closed paths, replay under concurrency, cache bounds."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from cryptography.fernet import Fernet
from starlette.datastructures import Headers

from gateway import config as config_module
from gateway.config import Config
from gateway.crypto import SecretBox
from gateway.decision import Decider, Facts, client_address
from gateway.errors import Reason
from gateway.factors import Accepted, Outcome, Refused, SecondFactor, address_scope, proof_of
from gateway.store import open_store_from_url
from gateway.store.redis import RedisStore
from gateway.totp import new_secret
from tests.conftest import RedisServer, need_binary
from tests.support.clock import Clock
from tests.support.servers import GatewayServer, UpstreamProcess, enrol, make_config


def facts(
    path: str = "/admin",
    user: str | None = "alice",
    code: str | None = None,
    cookie: str | None = None,
    method: str = "GET",
    trusted: bool = True,
) -> Facts:
    raw: list[tuple[bytes, bytes]] = []
    if user is not None:
        raw.append((b"remote-user", user.encode()))
    if code is not None:
        raw.append((b"x-2fa-code", code.encode()))
    if cookie is not None:
        raw.append((b"cookie", cookie.encode()))
    return Facts(method=method, path=path, client="192.0.2.10", peer_trusted=trusted, headers=Headers(raw=raw))


async def setup(tmp_path: Path, clock: Clock, **tables: Any) -> tuple[Config, Decider, SecondFactor]:
    cfg = make_config(tmp_path, **tables)
    store = open_store_from_url(cfg.store.url, cfg.store.prefix, create=cfg.store.create == "if_missing")
    await store.open()
    factors = SecondFactor(cfg, store, clock)
    return cfg, Decider(cfg, factors), factors


def activated(outcome: Outcome) -> bool:
    return isinstance(outcome, Accepted) and outcome.activated


async def enrol_direct(cfg: Config, factors: SecondFactor, user: str) -> str:
    secret = new_secret()
    await factors.store.set_secret(user, SecretBox(cfg.encryption.keys).encrypt(user, secret))
    return secret


async def test_order_of_the_decision(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, decider, factors = await setup(tmp_path, clock)
    assert (await decider.decide(facts("/public/../admin", user=None))).reason is Reason.IDENTITY_REQUIRED
    assert (await decider.decide(facts("/a/..;/b"))).reason is Reason.BAD_REQUEST
    assert (await decider.decide(facts("/public/x", user=None))).reason is Reason.EXCLUDED
    assert (await decider.decide(facts("/admin", trusted=False))).reason is Reason.IDENTITY_REQUIRED
    assert (await decider.decide(facts("/admin"))).reason is Reason.NOT_ENROLLED
    secret = await enrol_direct(cfg, factors, "alice")
    clock.now += cfg.store.cache_ttl  # enrolled behind this worker's back: seen within cache_ttl
    assert (await decider.decide(facts("/admin"))).reason is Reason.CODE_REQUIRED
    assert (await decider.decide(facts("/admin", code="000000"))).reason is Reason.INVALID_CODE
    ok = await decider.decide(facts("/admin", code=pyotp.TOTP(secret).at(clock.now)))
    assert ok.allowed and ok.reason is Reason.CODE and ok.user == "alice" and ok.new_session
    assert (await decider.decide(facts("/admin", code=pyotp.TOTP(secret).at(clock.now)))).reason is Reason.REPLAYED_CODE
    with_session = await decider.decide(facts("/admin", cookie=f"{cfg.session.cookie}={ok.new_session}"))
    assert with_session.reason is Reason.SESSION
    assert (await decider.decide(facts("/admin", method="G E T"))).reason is Reason.BAD_REQUEST
    # methods are case-sensitive: "get" is not the GET of "GET /api/public/*"
    assert (await decider.decide(facts("/api/public/x", user=None, method="get"))).reason is Reason.IDENTITY_REQUIRED
    await factors.store.close()


async def test_only_a_request_let_in_by_its_second_factor_names_a_user_to_forward(tmp_path: Path) -> None:
    """``Decision.forwarded_user``: the one rule for "which user does the upstream hear of", so
    the proxy, /auth and the WebSocket handshake need not test ``reason is not EXCLUDED``."""
    clock = Clock(time.time())
    cfg, decider, factors = await setup(tmp_path, clock)
    excluded = await decider.decide(facts("/public/x"))  # a Remote-User is sent, and not read
    assert excluded.allowed and excluded.user is None and excluded.forwarded_user is None
    denied = await decider.decide(facts("/admin"))
    assert denied.user == "alice" and denied.forwarded_user is None
    secret = await enrol_direct(cfg, factors, "alice")
    clock.now += cfg.store.cache_ttl
    by_code = await decider.decide(facts("/admin", code=pyotp.TOTP(secret).at(clock.now)))
    assert by_code.reason is Reason.CODE and by_code.forwarded_user == "alice"
    by_session = await decider.decide(facts("/admin", cookie=f"{cfg.session.cookie}={by_code.new_session}"))
    assert by_session.reason is Reason.SESSION and by_session.forwarded_user == "alice"
    await factors.store.close()


async def test_concurrent_requests_with_one_code_give_exactly_one_success(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, decider, factors = await setup(tmp_path, clock)
    secret = await enrol_direct(cfg, factors, "alice")
    code = pyotp.TOTP(secret).at(clock.now)
    results = await asyncio.gather(*(decider.decide(facts(code=code)) for _ in range(20)))
    assert sum(d.allowed for d in results) == 1
    # Each takes an attempt before it is judged: past the limit the rest are refused unjudged.
    assert {d.reason for d in results if not d.allowed} <= {Reason.REPLAYED_CODE, Reason.LOCKED}
    await factors.store.close()


async def test_lockout_refuses_even_a_correct_code(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, decider, factors = await setup(tmp_path, clock, limits={"max_failures": 3, "lockout": 60})
    secret = await enrol_direct(cfg, factors, "alice")
    for _ in range(3):
        await decider.decide(facts(code="000000"))
    locked = await decider.decide(facts(code=pyotp.TOTP(secret).at(clock.now)))
    assert locked.reason is Reason.LOCKED and locked.retry_after is not None and 0 < locked.retry_after <= 60
    clock.now += 61
    assert (await decider.decide(facts(code=pyotp.TOTP(secret).at(clock.now)))).allowed
    await factors.store.close()


async def test_client_address_lockout(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, decider, factors = await setup(tmp_path, clock, limits={"ip_max_failures": 4, "max_failures": 100})
    for user in ("u1", "u2", "u3", "u4", "u5"):
        await enrol_direct(cfg, factors, user)
    for user in ("u1", "u2", "u3", "u4"):
        await decider.decide(facts(user=user, code="000000"))
    assert (await decider.decide(facts(user="u5", code="000000"))).reason is Reason.LOCKED
    await factors.store.close()


async def test_a_key_rotated_away_denies_and_leaves_the_record(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, _, factors = await setup(tmp_path, clock)
    secret = await enrol_direct(cfg, factors, "alice")
    before = await factors.store.get_secret("alice")
    other = make_config(tmp_path, env={config_module.ENV_KEYS: Fernet.generate_key().decode()})
    stranger = Decider(other, SecondFactor(other, factors.store, clock))
    result = await stranger.decide(facts(code=pyotp.TOTP(secret).at(clock.now)))
    assert not result.allowed and result.reason is Reason.INTERNAL
    assert await factors.store.get_secret("alice") == before
    await factors.store.close()


async def test_a_secret_copied_to_another_user_does_not_work(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, decider, factors = await setup(tmp_path, clock)
    secret = await enrol_direct(cfg, factors, "alice")
    token = await factors.store.get_secret("alice")
    assert token is not None
    await factors.store.set_secret("mallory", token)
    result = await decider.decide(facts(user="mallory", code=pyotp.TOTP(secret).at(clock.now)))
    assert not result.allowed
    await factors.store.close()


class ExplodingStore:
    """A store whose every call raises something unexpected."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        async def boom(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("unexpected")

        return boom


async def test_unexpected_exceptions_deny(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    decider = Decider(cfg, SecondFactor(cfg, ExplodingStore(None)))
    result = await decider.decide(facts(code="123456"))
    assert result.reason is Reason.INTERNAL and not result.allowed


def test_store_outage_denies_with_503(upstream: UpstreamProcess, tmp_path: Path) -> None:
    redis = RedisServer(need_binary("redis-server"))
    redis.start()
    try:
        cfg = make_config(tmp_path, upstream=upstream.url, store={"url": redis.url})
        server = GatewayServer(cfg).start()
        try:
            secret = enrol(cfg, "alice")
            r = httpx.get(
                server.url + "/echo", headers={"Remote-User": "alice", "X-2FA-Code": pyotp.TOTP(secret).now()}
            )
            assert r.status_code == 200
            cookies = {cfg.session.cookie: r.cookies[cfg.session.cookie]}
            redis.stop()
            time.sleep(1.1)  # past store.cache_ttl: the session must be looked up again
            r = httpx.get(server.url + "/echo", headers={"Remote-User": "alice"}, cookies=cookies)
            assert r.status_code == 503
            assert r.json()["error"] == "store_unavailable"
            r = httpx.get(server.url + "/echo", headers={"Remote-User": "alice", "X-2FA-Code": "123456"})
            assert r.status_code == 503
            assert httpx.get(server.url + cfg.routes.ready).status_code == 503
            assert httpx.get(server.url + "/public/x").status_code == 200  # excluded paths need no store
        finally:
            server.stop()
    finally:
        redis.stop()


async def test_revocation_reaches_other_workers_within_cache_ttl(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, decider_a, factors_a = await setup(tmp_path, clock)
    store_b = open_store_from_url(cfg.store.url, cfg.store.prefix, create=cfg.store.create == "if_missing")
    await store_b.open()
    factors_b = SecondFactor(cfg, store_b, clock)
    decider_b = Decider(cfg, factors_b)
    await enrol_direct(cfg, factors_a, "alice")
    session = await factors_a.open_session("alice")
    assert session is not None
    cookie = f"{cfg.session.cookie}={session}"
    assert (await decider_b.decide(facts(cookie=cookie))).reason is Reason.SESSION  # b caches it now
    await factors_a.revoke_session(session)
    assert not (await decider_a.decide(facts(cookie=cookie))).allowed  # at once where it was revoked
    clock.now += cfg.store.cache_ttl + 0.001
    assert not (await decider_b.decide(facts(cookie=cookie))).allowed  # elsewhere within cache_ttl
    # a reset user: the same bound
    session = await factors_a.open_session("alice")
    cookie = f"{cfg.session.cookie}={session}"
    assert (await decider_b.decide(facts(cookie=cookie))).allowed
    await factors_a.reset_user("alice")
    clock.now += cfg.store.cache_ttl + 0.001
    assert (await decider_b.decide(facts(cookie=cookie))).reason is Reason.NOT_ENROLLED
    await factors_a.store.close()
    await store_b.close()


async def test_redis_replay_guard_under_concurrency(redis_server: RedisServer, tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg = make_config(tmp_path, store={"url": redis_server.url, "prefix": "decision-test"})
    store = RedisStore(redis_server.url, "decision-test", create=True)
    await store.open()
    factors = SecondFactor(cfg, store, clock)
    decider = Decider(cfg, factors)
    secret = await enrol_direct(cfg, factors, "zed")
    code = pyotp.TOTP(secret).at(clock.now)
    results = await asyncio.gather(*(decider.decide(facts(user="zed", code=code)) for _ in range(20)))
    assert sum(d.allowed for d in results) == 1
    await store.close()


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("127.0.0.1", "203.0.113.5", "203.0.113.5"),
        ("127.0.0.1", "198.51.100.1, 203.0.113.5", "203.0.113.5"),
        ("127.0.0.1", "203.0.113.5, 127.0.0.1", "203.0.113.5"),
        ("127.0.0.1", "garbage", "127.0.0.1"),
        ("198.51.100.9", "203.0.113.5", "198.51.100.9"),  # untrusted peer: XFF ignored
        ("127.0.0.1", None, "127.0.0.1"),
        # A zone id (RFC 6874) is any text after "%", and Python's parser takes it: such a hop
        # reached the app as X-Real-IP and the audit log verbatim (attacker A, issue 14).
        ("127.0.0.1", "fe80::1%<img src=x onerror=alert(1)>", "127.0.0.1"),
        ("127.0.0.1", "fe80::1%eth0", "127.0.0.1"),
        ("127.0.0.1", "203.0.113.5, fe80::1%25x", "127.0.0.1"),
    ],
)
def test_client_address(peer: str, xff: str | None, expected: str) -> None:
    cfg = make_config(Path("/tmp"))
    assert client_address(peer, xff, cfg.server.trusted_proxies) == expected


async def test_a_lock_set_by_another_worker_stops_a_correct_code_at_once(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, decider_a, factors_a = await setup(tmp_path, clock, limits={"max_failures": 3})
    store_b = open_store_from_url(cfg.store.url, cfg.store.prefix, create=cfg.store.create == "if_missing")
    await store_b.open()
    decider_b = Decider(cfg, SecondFactor(cfg, store_b, clock))
    secret = await enrol_direct(cfg, factors_a, "alice")
    clock.now += cfg.store.cache_ttl
    assert (await decider_b.decide(facts(code="000000"))).reason is Reason.INVALID_CODE  # b: "not locked", cached
    for _ in range(3):
        await decider_a.decide(facts(code="000000"))
    # b's cache still says "not locked", but a matching code is only granted after the store says so
    result = await decider_b.decide(facts(code=pyotp.TOTP(secret).at(clock.now)))
    assert result.reason is Reason.LOCKED
    await factors_a.store.close()
    await store_b.close()


async def test_a_pending_secret_under_a_removed_key_is_no_enrolment(tmp_path: Path) -> None:
    """``keys rotate`` rewrites active secrets only: a pending one made under a key removed since
    reads as absent (start setup again), never as an error or a grant."""
    clock = Clock(time.time())
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    _, _, factors = await setup(tmp_path, clock, env={"GATEWAY_ENCRYPTION_KEYS": old_key})
    secret = await factors.begin_enrolment("alice")
    assert secret is not None
    _, _, after = await setup(tmp_path, clock, env={"GATEWAY_ENCRYPTION_KEYS": new_key})
    assert await after.pending_secret("alice") is None
    outcome = await after.finish_enrolment("alice", pyotp.TOTP(secret).at(clock.now), None)
    assert outcome == Refused(Reason.NOT_ENROLLED)
    assert not await after.is_enrolled("alice")
    await factors.store.close()
    await after.store.close()


# -- issue 10: lockouts stop guessing, not sessions; one session per request ------------------
async def test_a_lockout_does_not_refuse_a_live_session_of_the_same_user(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, decider, factors = await setup(tmp_path, clock, limits={"max_failures": 3, "ip_max_failures": 3})
    secret = await enrol_direct(cfg, factors, "alice")
    opened = await decider.decide(facts(code=pyotp.TOTP(secret).at(clock.now)))
    assert opened.new_session is not None
    cookie = f"{cfg.session.cookie}={opened.new_session}"
    for _ in range(4):  # the user and the address are both locked out now
        await decider.decide(facts(code="000000"))
    assert (await decider.decide(facts(code="000000"))).reason is Reason.LOCKED
    assert (await decider.decide(facts(cookie=cookie))).reason is Reason.SESSION
    # The session is still Alice's alone.
    assert (await decider.decide(facts(user="bob", cookie=cookie))).reason is not Reason.SESSION
    await factors.store.close()


async def test_the_code_that_reaches_the_limit_says_locked(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, decider, factors = await setup(tmp_path, clock, limits={"max_failures": 3, "lockout": 60})
    await enrol_direct(cfg, factors, "alice")
    assert (await decider.decide(facts(code="000000"))).reason is Reason.INVALID_CODE
    assert (await decider.decide(facts(code="000000"))).reason is Reason.INVALID_CODE
    third = await decider.decide(facts(code="000000"))
    assert third.reason is Reason.LOCKED and third.retry_after == 60
    await factors.store.close()


async def test_two_different_session_cookies_are_ambiguous(tmp_path: Path) -> None:
    clock = Clock(time.time())
    cfg, decider, factors = await setup(tmp_path, clock)
    name = cfg.session.cookie
    await enrol_direct(cfg, factors, "alice")
    mine = await factors.open_session("alice")
    for cookie in (f"{name}=other; {name}={mine}", f"{name}={mine}; {name}=other"):
        assert (await decider.decide(facts(cookie=cookie))).reason is Reason.AMBIGUOUS_IDENTITY
    raw = [(b"remote-user", b"alice"), (b"cookie", f"{name}={mine}".encode()), (b"cookie", f"{name}=x".encode())]
    split = Facts(method="GET", path="/admin", client="192.0.2.10", peer_trusted=True, headers=Headers(raw=raw))
    assert (await decider.decide(split)).reason is Reason.AMBIGUOUS_IDENTITY
    assert (await decider.decide(facts(cookie=f"{name}={mine}; {name}={mine}"))).reason is Reason.SESSION
    await factors.store.close()


async def two_workers(tmp_path: Path, clock: Clock) -> tuple[Config, Decider, SecondFactor, Decider, SecondFactor]:
    """Two workers (or replicas) on one store, each with its own caches."""
    cfg, decider_a, factors_a = await setup(tmp_path, clock)
    store_b = open_store_from_url(cfg.store.url, cfg.store.prefix, create=cfg.store.create == "if_missing")
    await store_b.open()
    factors_b = SecondFactor(cfg, store_b, clock)
    return cfg, decider_a, factors_a, Decider(cfg, factors_b), factors_b


@pytest.mark.parametrize("how", ["reset", "re-enrol"])
async def test_a_stale_cached_secret_never_grants(tmp_path: Path, how: str) -> None:
    """Found by attack: a worker judged a code against its cached secret for up to cache_ttl
    after ``users reset`` (or a new authenticator on another worker) and opened a 12-hour
    session on the old authenticator. A code that matches a cached secret is judged again
    against the store's before anything is granted."""
    clock = Clock(time.time())
    cfg, _, factors_a, decider_b, factors_b = await two_workers(tmp_path, clock)
    old = await enrol_direct(cfg, factors_a, "alice")
    # The attack kept b's cache warm (GET /setup-2fa needs only the first factor); here its entry
    # simply outlives the test.
    factors_b.secrets._active.ttl = 3600.0
    assert await factors_b.is_enrolled("alice")  # b caches the old secret now
    if how == "reset":
        await factors_a.reset_user("alice")  # what `gateway users reset` does, elsewhere
    else:
        new = await factors_a.begin_enrolment("alice", proof_of(old))
        assert new is not None
        assert activated(await factors_a.finish_enrolment("alice", pyotp.TOTP(new).at(clock.now), None))
    # The old authenticator's next step (inside the accepted window), unused so far.
    decision = await decider_b.decide(facts(code=pyotp.TOTP(old).at(clock.now + cfg.totp.period)))
    assert not decision.allowed and decision.new_session is None
    assert (await factors_a.store.user_state("alice", clock.now)).sessions == 0
    await factors_a.store.close()
    await factors_b.store.close()


async def test_a_session_is_not_kept_when_the_secret_changed_while_its_code_was_judged(tmp_path: Path) -> None:
    """The code was right when judged, then a reset landed before the session was opened: the
    session is found and ended, and the request is denied."""
    clock = Clock(time.time())
    cfg, _, factors = await setup(tmp_path, clock)
    secret = await enrol_direct(cfg, factors, "alice")
    outcome = await factors.check_code("alice", pyotp.TOTP(secret).at(clock.now), None)
    assert isinstance(outcome, Accepted)
    await factors.store.delete_user("alice")  # the reset, between the judgement and the session
    assert await factors.open_session("alice", outcome.proof) is None
    assert (await factors.store.user_state("alice", clock.now)).sessions == 0
    await factors.store.close()


async def test_an_enrolment_begun_without_a_code_never_replaces_an_authenticator(tmp_path: Path) -> None:
    """Found by attack: with a worker's cache still saying "not enrolled", the first factor alone
    started an enrolment right after the victim's, and its activation overwrote her secret.
    An enrolment names the secret it may replace, read from the store, and activation is a
    compare-and-set on it."""
    clock = Clock(time.time())
    cfg, _, factors_a, _, factors_b = await two_workers(tmp_path, clock)
    factors_b.secrets._active.ttl = 3600.0
    assert not await factors_b.is_enrolled("alice")  # b caches "not enrolled"
    victim = await enrol_direct(cfg, factors_a, "alice")
    assert await factors_b.begin_enrolment("alice") is None  # the store, not the cache, decides
    # The race: b read "no secret" and wrote its pending record just after her activation
    # (which had cleared the pending slot): the record is in place, her secret is active.
    await factors_a.store.delete_user("alice")
    attacker = await factors_b.begin_enrolment("alice")
    assert attacker is not None
    record = await factors_a.store.get_pending("alice", clock.now)
    assert record is not None
    victim = await enrol_direct(cfg, factors_a, "alice")
    await factors_a.store.set_pending("alice", record, clock.now + 600)
    outcome = await factors_b.finish_enrolment("alice", pyotp.TOTP(attacker).at(clock.now), None)
    assert isinstance(outcome, Refused)
    token = await factors_a.store.get_secret("alice")
    assert token is not None and SecretBox(cfg.encryption.keys).decrypt("alice", token) == victim
    await factors_a.store.close()
    await factors_b.store.close()


async def test_an_ipv6_client_is_counted_by_its_slash_64(tmp_path: Path) -> None:
    """One host is routinely given a whole /64 (RFC 7934): counted per /128, a client would have
    2^64 fresh address quotas (noticed by attack B). Addresses in one /64 share one quota."""
    clock = Clock(time.time())
    cfg, _, factors = await setup(tmp_path, clock, limits={"ip_max_failures": 3, "max_failures": 1000})
    for user in ("u1", "u2", "u3", "u4"):
        await enrol_direct(cfg, factors, user)
    outcomes = [
        await factors.check_code(user, "000000", f"2001:db8:1:2::{n}")
        for n, user in enumerate(("u1", "u2", "u3", "u4"), start=1)
    ]
    assert outcomes[:2] == [Refused(Reason.INVALID_CODE), Refused(Reason.INVALID_CODE)]
    assert [type(o) for o in outcomes[2:]] == [Refused, Refused]
    assert {o.reason for o in outcomes[2:] if isinstance(o, Refused)} == {Reason.LOCKED}
    # another /64 is another client; an IPv4-mapped address is its IPv4 address
    assert await factors.check_code("u4", "000000", "2001:db8:1:3::1") == Refused(Reason.INVALID_CODE)
    assert address_scope("::ffff:192.0.2.1") == address_scope("192.0.2.1") == "ip:192.0.2.1"
    # NAT64's well-known prefix embeds the IPv4 client (RFC 6052): one scope per IPv4 client.
    assert address_scope("64:ff9b::192.0.2.1") == "ip:192.0.2.1"
    assert address_scope("64:ff9b::198.51.100.7") == "ip:198.51.100.7"
    await factors.store.close()


async def test_a_re_enrolment_binds_to_the_authenticator_its_code_came_from(tmp_path: Path) -> None:
    """Found by the second attack: a stolen phone's code, proven just as its owner re-enrolled,
    began an enrolment bound to her *new* authenticator (read after the code was judged), whose
    activation then replaced it. An enrolment is begun only against the secret the code proved."""
    clock = Clock(time.time())
    cfg, _, factors = await setup(tmp_path, clock)
    stolen = await enrol_direct(cfg, factors, "alice")
    proven = await factors.check_code("alice", pyotp.TOTP(stolen).at(clock.now - cfg.totp.period), None)
    assert isinstance(proven, Accepted) and proven.proof == proof_of(stolen)
    # Meanwhile she re-enrols to a new phone.
    new = await factors.begin_enrolment("alice", proof_of(stolen))
    assert new is not None
    assert activated(await factors.finish_enrolment("alice", pyotp.TOTP(new).at(clock.now), None))
    # The thief's request goes on with the proof of the stolen phone: nothing is begun.
    assert await factors.begin_enrolment("alice", proven.proof) is None
    assert await factors.begin_enrolment("alice") is None
    await factors.store.close()


async def test_a_new_authenticator_voids_the_old_recovery_codes_at_once(tmp_path: Path) -> None:
    """Found by the second attack: the old recovery codes outlived the activation of a new
    authenticator until the new set was written, and one used in between opened a session
    bound to the new secret. The activation voids them in the same store step."""
    clock = Clock(time.time())
    cfg, _, factors = await setup(tmp_path, clock)
    old = await enrol_direct(cfg, factors, "alice")
    [code, *_] = await factors.new_recovery_codes("alice")
    new = await factors.begin_enrolment("alice", proof_of(old))
    assert new is not None
    assert activated(await factors.finish_enrolment("alice", pyotp.TOTP(new).at(clock.now), None))
    assert await factors.check_recovery("alice", code, None) == Refused(Reason.INVALID_CODE)
    await factors.store.close()
