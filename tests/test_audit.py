"""Audit events and request ids (gateway/audit.py): one shape for every event; an id per request,
believed only from a trusted peer, passed upstream and onto every line the request logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from starlette.types import Receive, Scope, Send

from gateway import audit as audit_module
from gateway import config as config_module
from gateway.audit import RequestContext, accepted_request_id, audit, current, use_context
from gateway.errors import StoreError
from tests.support.inprocess import UPSTREAM, in_process
from tests.support.servers import (
    GatewayServer,
    UpstreamProcess,
    enrol,
    free_port,
    fresh_keys,
    gateway_process,
    make_config,
)

# -- the event's shape ------------------------------------------------------------------------


def test_an_event_has_every_field_and_a_readable_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    token = use_context("cli", "r-1")
    try:
        audit("code.rejected", "alice", client="10.0.0.7", reason="2fa_invalid")
        audit("keys.rotated", rotated=3)
    finally:
        audit_module._current.reset(token)
    first, second = caplog.records
    assert first.name == "gateway.audit" and first.levelno == logging.INFO
    assert first.audit == {  # type: ignore[attr-defined]
        "event": "code.rejected",
        "user": "alice",
        "client": "10.0.0.7",
        "request_id": "r-1",
        "mode": "cli",
        "reason": "2fa_invalid",
    }
    assert first.getMessage() == "code.rejected user='alice' client=10.0.0.7 request_id=r-1 mode=cli reason=2fa_invalid"
    assert second.audit["user"] is None and second.audit["rotated"] == 3  # type: ignore[attr-defined]


def test_warning_events_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    audit("lockout.started", "alice", scope="user", seconds=900)
    audit("code.replayed", "alice")
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]


# -- request ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"a b", b"a\nb", b"x" * 129, "\u00e9t\u00e9".encode(), b"", b"id\x00", b'{"forged": 1}\n{"level": "INFO"}'],
)
def test_a_malformed_id_is_replaced_even_from_a_trusted_peer(value: bytes) -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", accepted_request_id(value, trusted=True))


def test_a_valid_id_is_kept_only_from_a_trusted_peer() -> None:
    assert accepted_request_id(b"nginx-4f1c9e", trusted=True) == "nginx-4f1c9e"
    assert accepted_request_id(b"x" * 128, trusted=True) == "x" * 128
    assert accepted_request_id(b"nginx-4f1c9e", trusted=False) != "nginx-4f1c9e"
    assert accepted_request_id(None, trusted=True) != accepted_request_id(None, trusted=True)


def _context_app(trusted: bool) -> tuple[RequestContext, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        context = current()
        assert context is not None
        seen.append(
            {
                "ids": [v.decode() for k, v in scope["headers"] if k == b"x-request-id"],
                "context": context.request_id,
                "mode": context.mode,
                "client": context.client,
            }
        )
        await send({"type": "http.response.start", "status": 204, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b""})

    app = RequestContext(inner, lambda peer: trusted, lambda scope: "203.0.113.9", lambda path: "auth")
    return app, seen


async def _get(app: RequestContext, headers: list[tuple[str, str]]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.get("/auth", headers=headers)


async def test_an_untrusted_clients_id_is_replaced_never_passed() -> None:
    app, seen = _context_app(trusted=False)
    r = await _get(app, [("X-Request-Id", "attacker-chosen")])
    [inner] = seen
    assert inner["ids"] == [inner["context"]] == [r.headers["x-request-id"]]
    assert inner["context"] != "attacker-chosen"
    assert inner["mode"] == "auth" and inner["client"] == "203.0.113.9"
    assert r.headers["x-app"] == "1"
    assert current() is None  # the context ends with the request


async def test_a_trusted_fronts_id_goes_on() -> None:
    app, seen = _context_app(trusted=True)
    r = await _get(app, [("X-Request-Id", "nginx-4f1c9e")])
    assert seen[0]["ids"] == ["nginx-4f1c9e"] and r.headers.get_list("x-request-id") == ["nginx-4f1c9e"]
    # Two ids are no id: neither is picked.
    r = await _get(app, [("X-Request-Id", "a"), ("X-Request-Id", "b")])
    assert seen[1]["ids"] == [r.headers["x-request-id"]] and seen[1]["ids"][0] not in ("a", "b")


def test_an_untrusted_clients_id_never_reaches_the_upstream(upstream: UpstreamProcess, tmp_path: Path) -> None:
    """Log injection through the app's logs: a client off the trusted list (127.0.0.2 here)
    chose the X-Request-Id the upstream logged, on an excluded path no factor guards."""
    server = GatewayServer(make_config(tmp_path, upstream.url)).start()
    try:
        outsider = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=server.url, timeout=30, transport=outsider) as client:
            r = client.get("/public/echo", headers={"X-Request-Id": "forged-7"})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    assert _echoed_id(r) == [r.headers["x-request-id"]] != ["forged-7"]


# -- a real process logging JSON ------------------------------------------------------------------


@pytest.fixture
def json_gateway(upstream: UpstreamProcess, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
port = {port}
log_format = "json"
access_log = true

[upstream]
url = "{upstream.url}"

[store]
url = "sqlite:///{tmp_path}/gateway.db"

[session]
secure = false

[paths]
exclude = ["/public/*"]
"""
    )
    output = tmp_path / "output.log"
    with gateway_process(path, port, fresh_keys(), output):
        yield f"http://127.0.0.1:{port}", output


def _lines(output: Path) -> list[dict[str, Any]]:
    text = output.read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _echoed_id(response: httpx.Response) -> list[str]:
    return [v for k, v in response.json()["headers"] if k.lower() == "x-request-id"]


def test_a_json_gateway_logs_one_event_per_action_with_the_request_id(json_gateway: tuple[str, Path]) -> None:
    url, output = json_gateway
    alice = {"Remote-User": "alice", "Accept": "application/json"}
    ids: dict[str, str] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/setup-2fa", headers=alice)
        assert r.status_code == 200, r.text
        ids["setup"] = r.headers["x-request-id"]
        totp = pyotp.TOTP(pyotp.parse_uri(r.json()["otpauth_uri"]).secret)
        code = totp.now()
        r = client.post("/verify-2fa", headers=alice, json={"code": code})
        assert r.status_code == 200, r.text
        ids["verify"] = r.headers["x-request-id"]
        recovery = r.json()["recovery_codes"]
        client.cookies.clear()
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        r = client.get("/echo/private", headers={**alice, "X-2FA-Code": wrong})
        assert r.status_code == 401
        ids["wrong"] = r.headers["x-request-id"]
        r = client.get("/echo/private", headers={**alice, "X-2FA-Code": code})
        assert r.status_code == 401
        ids["replay"] = r.headers["x-request-id"]
        r = client.post("/verify-2fa", headers=alice, json={"recovery_code": recovery[0]})
        assert r.status_code == 200, r.text
        ids["recovery"] = r.headers["x-request-id"]
        # A request the upstream sees: the id it got is the one the client and the log got.
        r = client.get("/echo/private", headers=alice)
        assert r.status_code == 200, r.text
        ids["proxied"] = r.headers["x-request-id"]
        assert _echoed_id(r) == [ids["proxied"]]
        # A trusted front's id goes on; the untrusted client's (from 127.0.0.2) is replaced.
        r = client.get("/echo/private", headers={**alice, "X-Request-Id": "front-7"})
        assert r.headers["x-request-id"] == "front-7" and _echoed_id(r) == ["front-7"]
        r = client.post("/logout-2fa", headers=alice)
        assert r.status_code == 200, r.text
        ids["logout"] = r.headers["x-request-id"]
    with httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as outsider:
        r = outsider.get("/public/echo", headers={"X-Request-Id": "injected-id"})
        assert r.status_code == 200, r.text
        assert _echoed_id(r) == [r.headers["x-request-id"]] and "injected" not in r.headers["x-request-id"]

    lines = _lines(output)  # every line parses: one object per line
    assert all({"timestamp", "level", "logger", "message"} <= set(line) for line in lines)
    events = [line for line in lines if line["logger"] == "gateway.audit"]

    def event(name: str, request: str) -> dict[str, Any]:
        found = [e for e in events if e["event"] == name and e["request_id"] == ids[request]]
        assert len(found) == 1, (name, request, [e["event"] for e in events])
        assert found[0]["user"] == "alice" and found[0]["client"] == "127.0.0.1"
        return found[0]

    assert event("enrolment.started", "setup")["mode"] == "page"
    for name in ("code.accepted", "enrolment.confirmed", "session.opened"):
        assert event(name, "verify")["mode"] == "page"
    rejected = event("code.rejected", "wrong")
    assert (rejected["mode"], rejected["reason"]) == ("proxy", "2fa_invalid")
    assert event("code.replayed", "replay")["mode"] == "proxy"
    assert event("recovery_code.used", "recovery")["level"] == "WARNING"
    event("session.opened", "recovery")
    assert event("session.ended", "logout")["reason"] == "logout"
    # The access line of a request carries its id too.
    access = [line for line in lines if line["logger"] == "uvicorn.access" and line.get("request_id") == ids["proxied"]]
    assert len(access) == 1 and "/echo/private" in access[0]["message"]


def test_auth_answers_carry_the_id_and_its_events_say_mode_auth(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Forward-auth: nginx's id comes back on /auth's answer (for auth_request_set to log), and
    the events of the subrequest carry it, the client nginx names, and mode "auth"."""
    caplog.set_level(logging.INFO, logger="gateway.audit")
    config = make_config(tmp_path, limits={"max_failures": 2})
    secret = enrol(config, "alice")
    server = GatewayServer(config).start()
    try:
        wrong = f"{(int(pyotp.TOTP(secret).now()) + 1) % 1_000_000:06d}"
        answers = [
            httpx.get(
                server.url + "/auth",
                headers={
                    "X-Original-URI": "/admin",
                    "X-Original-Method": "GET",
                    "X-Forwarded-For": "198.51.100.4",
                    "Remote-User": "alice",
                    "X-2FA-Code": wrong,
                    "X-Request-Id": f"nginx-{i}",
                },
            )
            for i in range(2)
        ]
    finally:
        server.stop()
    assert [(r.status_code, r.headers["x-request-id"]) for r in answers] == [(401, "nginx-0"), (403, "nginx-1")]
    events = [r.audit for r in caplog.records if hasattr(r, "audit")]
    assert [(e["event"], e["request_id"]) for e in events] == [
        ("code.rejected", "nginx-0"),
        ("lockout.started", "nginx-1"),
        ("code.rejected", "nginx-1"),
    ]
    assert all(e["mode"] == "auth" and e["client"] == "198.51.100.4" and e["user"] == "alice" for e in events)
    assert events[1]["scope"] == "user" and events[2]["reason"] == "2fa_locked"


async def test_a_store_error_is_an_event_of_the_request_it_denied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")

    async def down(*args: object) -> None:
        raise StoreError("connection refused")

    async with in_process(make_config(tmp_path, UPSTREAM)) as harness:
        monkeypatch.setattr(harness.store, "get_secret", down)
        r = await harness.client.get("/echo/x", headers={"Remote-User": "alice", "X-2FA-Code": "123456"})
    assert r.status_code == 503
    [event] = [r.audit for r in caplog.records if hasattr(r, "audit")]
    assert event["event"] == "store.error" and "connection refused" in event["detail"]
    assert (event["request_id"], event["mode"], event["client"]) == (r.headers["x-request-id"], "proxy", "127.0.0.1")
    assert caplog.records[0].levelno == logging.WARNING


def test_a_field_cannot_forge_a_second_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    audit("csrf.refused", "bob\n2026-01-01 INFO gateway.audit: code.accepted", route="/x\ncode.accepted user=x")
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line
    assert line == (
        "csrf.refused user='bob\\n2026-01-01 INFO gateway.audit: code.accepted' client=None request_id=None"
        " mode=None route='/x\\ncode.accepted user=x'"
    )


async def test_an_ambiguous_identity_is_an_event_at_every_door(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    two_users = [("Remote-User", "alice"), ("Remote-User", "mallory"), ("Accept", "application/json")]
    async with in_process(make_config(tmp_path, UPSTREAM)) as harness:
        answers = [await harness.client.get(path, headers=two_users) for path in ("/echo/x", "/setup-2fa")]
    assert [r.json()["error"] for r in answers] == ["ambiguous_identity"] * 2
    events = [r.audit for r in caplog.records if hasattr(r, "audit")]
    assert [(e["event"], e["mode"], e["request_id"], e["client"]) for e in events] == [
        ("identity.ambiguous", mode, r.headers["x-request-id"], "127.0.0.1")
        for mode, r in zip(("proxy", "page"), answers, strict=True)
    ]


# -- a brute-force flood is not a log flood -------------------------------------------------------


def _locked(user: str = "alice", client: str = "10.0.0.7", retry_after: int = 900) -> dict[str, Any]:
    return {"event": "code.rejected", "user": user, "client": client, "request_id": "r", "mode": "proxy",
            "reason": audit_module.LOCKED_REASON, "retry_after": retry_after}  # fmt: skip


def test_a_locked_users_refusals_are_one_line_then_one_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    now = [1000.0]
    refusals = audit_module.LockedRefusals(interval=60, clock=lambda: now[0])
    assert refusals.admit("alice", _locked()) is True  # the first refusal of the lock: a line
    assert [refusals.admit("alice", _locked(client=f"10.0.0.{i}")) for i in range(250)] == [False] * 250
    assert refusals.admit("bob", _locked("bob")) is True  # another user: his own line
    assert caplog.records == []
    now[0] += 60  # the interval passed: the next refusal says how many were held, and is a line
    assert refusals.admit("alice", _locked()) is True
    [summary] = [r.audit for r in caplog.records]  # type: ignore[attr-defined]
    assert summary == {"event": "code.rejected.suppressed", "user": "alice", "client": "10.0.0.249",
                       "request_id": "r", "mode": "proxy", "reason": "2fa_locked", "count": 250,
                       "clients": ",".join(f"10.0.0.{i}" for i in range(8)),
                       "other_client_refusals": 242}  # fmt: skip
    assert caplog.records[0].levelno == logging.WARNING
    # A lock shorter than the interval: its window ends with it.
    assert refusals.admit("carol", _locked("carol", retry_after=5)) is True
    assert refusals.admit("carol", _locked("carol", retry_after=4)) is False
    now[0] += 5
    assert refusals.admit("carol", _locked("carol", retry_after=900)) is True
    assert [r.audit["count"] for r in caplog.records[1:]] == [1]  # type: ignore[attr-defined]
    refusals.flush()  # alice's new window and bob's held nothing: no line; carol's held none yet
    assert len(caplog.records) == 2


def test_the_summary_names_every_address_that_hammered_the_lock(caplog: pytest.LogCaptureFixture) -> None:
    """Attacker B, finding 7: four addresses hammering a locked account; the summary named only
    the last one, so two of them never appeared in the log. Each address is named (up to
    SUMMARY_CLIENTS of them, in the order they came; beyond that, their refusals are counted),
    in the text line too."""
    caplog.set_level(logging.INFO, logger="gateway.audit")
    now = [0.0]
    refusals = audit_module.LockedRefusals(clock=lambda: now[0])
    hammering = ["203.0.113.7", "198.51.100.23", "192.0.2.99", "2001:db8::5"]
    for round_ in range(3):
        for i, client in enumerate(hammering):
            token = audit_module._current.set(audit_module.Context(f"r{round_}{i}", "proxy", refusals=refusals))
            try:
                audit("code.rejected", "victim", client=client, reason="2fa_locked", retry_after=30)
            finally:
                audit_module._current.reset(token)
    now[0] = 31.0
    refusals.flush()
    first, summary = caplog.records
    assert first.audit["client"] == "203.0.113.7"  # type: ignore[attr-defined]
    assert (summary.audit["count"], summary.audit["clients"], summary.audit["other_client_refusals"]) == (  # type: ignore[attr-defined]
        11,
        "198.51.100.23,192.0.2.99,2001:db8::5,203.0.113.7",
        0,
    )
    assert all(client in caplog.text for client in hammering)
    assert "clients=198.51.100.23,192.0.2.99,2001:db8::5,203.0.113.7 other_client_refusals=0" in summary.getMessage()

    # A botnet: the summary stays bounded, naming the first SUMMARY_CLIENTS and counting the rest.
    caplog.clear()
    assert refusals.admit("bob", _locked("bob", client="192.0.2.1")) is True
    bots = [f"198.51.100.{i}" for i in range(1, 21)]
    assert [refusals.admit("bob", _locked("bob", client=bot)) for bot in bots * 2] == [False] * 40
    refusals.flush()
    [summary] = caplog.records
    assert summary.audit["clients"] == ",".join(bots[: audit_module.SUMMARY_CLIENTS])  # type: ignore[attr-defined]
    assert summary.audit["other_client_refusals"] == 2 * (len(bots) - audit_module.SUMMARY_CLIENTS)  # type: ignore[attr-defined]
    assert summary.audit["count"] == 40  # type: ignore[attr-defined]


async def test_only_lock_refusals_are_held_and_a_timer_sums_them_up(caplog: pytest.LogCaptureFixture) -> None:
    """Within a request context: a wrong code, a lockout, an acceptance are lines whatever the
    tally; the held count comes out on the running loop when the window ends; metrics (observe)
    see every event."""
    caplog.set_level(logging.INFO, logger="gateway.audit")
    observed: list[str] = []
    refusals = audit_module.LockedRefusals(interval=0.2)
    context = audit_module.Context("r-1", "auth", observe=lambda event, _: observed.append(event), refusals=refusals)
    token = audit_module._current.set(context)
    try:
        audit("code.rejected", "alice", reason="2fa_invalid")
        audit("lockout.started", "alice", scope="user", seconds=900)
        for _ in range(100):
            audit("code.rejected", "alice", reason="2fa_locked", retry_after=900)
        audit("code.rejected", "alice", reason="2fa_invalid")
        audit("code.accepted", "alice")
        audit("enrolment.confirmed", "alice")
    finally:
        audit_module._current.reset(token)
    logged = [r.audit["event"] for r in caplog.records]  # type: ignore[attr-defined]
    assert logged == ["code.rejected", "lockout.started", "code.rejected", "code.rejected", "code.accepted",
                      "enrolment.confirmed"]  # fmt: skip
    assert observed.count("code.rejected") == 102
    await asyncio.sleep(0.5)  # the window (0.2 s) ends on the loop: its summary, unasked
    summary = caplog.records[-1].audit  # type: ignore[attr-defined]
    assert (summary["event"], summary["count"], summary["request_id"]) == ("code.rejected.suppressed", 99, "r-1")


def test_a_burst_of_wrong_codes_is_a_bounded_number_of_lines(upstream: UpstreamProcess, tmp_path: Path) -> None:
    """2,000 wrong codes against a real ``gateway run``: 4 refused as wrong, the 5th locks, the
    1,995 refused for the lock are held and summed up in one line (at shutdown at the latest);
    the metrics count all 2,000."""
    port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[server]\nport = {port}\nlog_format = "json"\n[upstream]\nurl = "{upstream.url}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/gateway.db"\n[session]\nsecure = false\n'
        "[limits]\nmax_failures = 5\nlockout = 900\n"
    )
    keys, output = fresh_keys(), tmp_path / "output.log"
    secret = enrol(config_module.load(path, env=keys), "alice")
    wrong = f"{(int(pyotp.TOTP(secret).now()) + 500_000) % 1_000_000:06d}"

    async def burst(url: str) -> list[int]:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one() -> int:
                async with limit:
                    r = await client.get("/private", headers={"Remote-User": "alice", "X-2FA-Code": wrong})
                    return r.status_code

            return await asyncio.gather(*(one() for _ in range(2000)))

    url = f"http://127.0.0.1:{port}"
    with gateway_process(path, port, keys, output):
        statuses = asyncio.run(burst(url))
        metrics = httpx.get(url + "/_gateway/metrics", timeout=30).text
    assert statuses.count(401) == 4 and statuses.count(429) == 1996, sorted(set(statuses))
    assert 'gateway_code_checks_total{result="invalid"} 4.0' in metrics
    assert 'gateway_code_checks_total{result="locked"} 1996.0' in metrics
    events = [line for line in _lines(output) if line["logger"] == "gateway.audit"]
    rejected = [e["reason"] for e in events if e["event"] == "code.rejected"]
    # (The 5th code's refusal and the first one refused for the lock race: whichever is logged first is the line.)
    assert sorted(rejected) == ["2fa_invalid"] * 4 + ["2fa_locked"]
    assert [e["event"] for e in events].count("lockout.started") == 1
    [summary] = [e for e in events if e["event"] == "code.rejected.suppressed"]
    assert (summary["user"], summary["count"], summary["client"]) == ("alice", 1995, "127.0.0.1")
    assert (summary["clients"], summary["other_client_refusals"]) == ("127.0.0.1", 0)


def test_events_any_client_repeats_are_a_burst_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    repeats = audit_module.RepeatedEvents(burst=3, interval=10.0, clock=lambda: clock[0])
    caplog.set_level(logging.INFO, logger=audit_module.AUDIT_LOGGER)
    token = audit_module._current.set(audit_module.Context("r1", "page", repeats=repeats))
    try:
        for i in range(50):
            audit("csrf.refused", client=f"198.51.100.{i % 12}", route="/setup-2fa")
        audit("identity.ambiguous", reason="identity")  # another key: its own burst
        audit("code.accepted", "alice")  # never held
        clock[0] = 10.0
        audit("csrf.refused", client="203.0.113.1", route="/setup-2fa")  # a new window: logged
    finally:
        audit_module._current.reset(token)
    events = [r.audit["event"] for r in caplog.records]  # type: ignore[attr-defined]
    assert events == ["csrf.refused"] * 3 + ["identity.ambiguous", "code.accepted", "audit.suppressed", "csrf.refused"]
    summary = caplog.records[5].audit  # type: ignore[attr-defined]
    assert (summary["suppressed_event"], summary["count"], summary["reason"]) == ("csrf.refused", 47, "None")
    assert summary["clients"] == ",".join(f"198.51.100.{i}" for i in (3, 4, 5, 6, 7, 8, 9, 10))
    assert summary["other_client_refusals"] == sum(1 for i in range(3, 50) if i % 12 not in range(3, 11)) == 15
    assert caplog.records[5].levelno == logging.WARNING


def test_a_flood_of_foreign_origin_posts_is_a_bounded_number_of_lines(json_gateway: tuple[str, Path]) -> None:
    # Attacker A (issue 14): each POST to a page with a foreign Origin was one WARNING line, from
    # anyone, before any identity or trust check.
    url, output = json_gateway

    async def flood() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            answers = await asyncio.gather(
                *(client.post("/setup-2fa", headers={"Origin": "https://evil.example"}) for _ in range(300))
            )
        return [r.status_code for r in answers]

    statuses = set(asyncio.run(flood()))
    assert statuses == {403}, statuses
    refused = [e for e in _lines(output) if e.get("event") == "csrf.refused"]
    assert len(refused) == audit_module.REPEAT_BURST, len(refused)
