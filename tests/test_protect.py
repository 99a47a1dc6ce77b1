"""gateway/protect.py: proxy mode's answers to a denial, in-process (httpx.ASGITransport, the
real SQLite store, the in-process upstream). Forwarding itself is tested in tests/test_proxy.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import gateway.pages
from tests.support.inprocess import UPSTREAM, InProcess, in_process
from tests.support.servers import make_config

BROWSER = {"Remote-User": "alice", "Accept": "text/html"}


async def lock_out(gw: InProcess) -> None:
    await gw.enrol("alice")
    for _ in range(5):
        await gw.client.get("/app/x", headers={"Remote-User": "alice", "X-2FA-Code": "000000"})


async def test_a_locked_out_browser_gets_the_lockout_page(tmp_path: Path) -> None:
    async with in_process(make_config(tmp_path, upstream=UPSTREAM)) as gw:
        await lock_out(gw)
        r = await gw.client.get("/app/x?y=1", headers={**BROWSER, "X-2FA-Code": "000000"})
        assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 900
        assert "Try again in 15 minutes" in r.text and 'href="/app/x"' in r.text
        assert "default-src 'none'" in r.headers["content-security-policy"]
        r = await gw.client.get("/app/x", headers={"Remote-User": "alice", "X-2FA-Code": "000000"})
        assert r.status_code == 429 and r.json()["error"] == "2fa_locked" and "retry-after" in r.headers


async def test_without_templates_the_lockout_is_still_a_429(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(gateway.pages, "DIRECTORY", empty)
    async with in_process(make_config(tmp_path, upstream=UPSTREAM)) as gw:
        await lock_out(gw)
        r = await gw.client.get("/app/x", headers={**BROWSER, "X-2FA-Code": "000000"})
        assert r.status_code == 429 and "retry-after" in r.headers and "2fa locked" in r.text


async def test_browser_denials_go_where_they_can_be_fixed_and_programs_get_json(tmp_path: Path) -> None:
    config = make_config(tmp_path, upstream=UPSTREAM, identity={"login_url": "/login?next={next}"})
    async with in_process(config) as gw:
        c = gw.client
        r = await c.get("/app/x?y=1", headers={"Accept": "text/html"})
        assert r.status_code == 302 and r.headers["location"] == "/login?next=/app/x%3Fy%3D1"
        r = await c.get("/app/x", headers=BROWSER)
        assert r.status_code == 302 and r.headers["location"] == "/setup-2fa?next=/app/x"
        r = await c.post("/app/x", headers=BROWSER)  # not a navigation: no redirect
        assert r.status_code == 403 and "2fa not enrolled" in r.text
        r = await c.get("/app/x", headers={"Remote-User": "alice"})
        assert r.status_code == 403 and r.json() == {
            "error": "2fa_not_enrolled",
            "detail": r.json()["detail"],
            "setup": "/setup-2fa",
        }
        await gw.enrol("bob")
        r = await c.get("/app/x", headers={**BROWSER, "Remote-User": "bob"})
        assert r.status_code == 302 and r.headers["location"] == "/verify-2fa?next=/app/x"
