"""gateway/pages.py: templates compiled at start-up, a missing install answered 503 without
touching the decision, and what every page carries (CSP by hash, a data: icon, a way back).

In-process through ``httpx.ASGITransport`` with the real SQLite store (tests/support/inprocess.py).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import shutil
from pathlib import Path

import pyotp
import pytest

import gateway.pages
from tests.support.inprocess import UPSTREAM, in_process
from tests.support.servers import make_config

HTML = {"Accept": "text/html", "Remote-User": "alice"}


def sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def csp_hashes(csp: str, directive: str) -> set[str]:
    found = re.search(rf"{directive} ([^;]*)", csp)
    assert found, csp
    return set(re.findall(r"'sha256-([^']+)'", found.group(1)))


def test_every_template_loads_and_the_csp_allows_exactly_the_inline_style_and_script(tmp_path: Path) -> None:
    pages = gateway.pages.Pages(make_config(tmp_path))
    assert pages.available
    csp = dict(pages.headers)[b"content-security-policy"].decode()
    assert csp_hashes(csp, "style-src") == {sha256((gateway.pages.DIRECTORY / "style.css").read_text().strip())}
    assert csp_hashes(csp, "script-src") == {sha256((gateway.pages.STATIC / "codes.js").read_text().strip())}
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    page = pages.render("codes.html", title="t", codes=["AAAAA-BBBBB"], lead="l", next="/x").decode()
    script = re.search(r"<script>(.*?)</script>", page, re.S)
    assert script and sha256(script.group(1)) in csp_hashes(csp, "script-src")


def test_templates_survive_their_files_going_away(tmp_path: Path) -> None:
    # Issue 12 §2.1: a reinstall into the running venv deleted the templates under a live process.
    copy = tmp_path / "templates"
    shutil.copytree(gateway.pages.DIRECTORY, copy)
    pages = gateway.pages.Pages(make_config(tmp_path), directory=copy)
    shutil.rmtree(copy)
    assert b"Enter your code" in pages.render("verify.html", title="Enter your code", next="/")


def test_missing_templates_are_logged_once_at_start_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.ERROR, logger="gateway.pages"):
        pages = gateway.pages.Pages(make_config(tmp_path), directory=empty)
    assert not pages.available
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [gateway.pages.MISSING]
    with pytest.raises(gateway.pages.PagesUnavailable):
        pages.render("verify.html", title="t")


async def test_a_page_without_templates_is_503_and_the_decision_is_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(gateway.pages, "DIRECTORY", empty)
    config = make_config(tmp_path, upstream=UPSTREAM, routes={"auth": "/auth"})
    with caplog.at_level(logging.ERROR):
        async with in_process(config) as gw:
            secret = await gw.enrol("alice")
            c = gw.client
            r = await c.get("/verify-2fa", headers={"Remote-User": "alice"})
            assert r.status_code == 503 and r.json()["error"] == "pages_unavailable"
            assert "reinstall" in r.json()["detail"]
            r = await c.get("/setup-2fa", headers=HTML)
            assert r.status_code == 503 and "reinstall" in r.text and "Traceback" not in r.text
            # The decision path renders nothing: excluded, denied and allowed answers as ever.
            assert (await c.get("/public/x")).status_code == 200
            assert (await c.get("/echo/x", headers={"Remote-User": "alice"})).json()["error"] == "2fa_required"
            r = await c.get("/echo/x", headers={"Remote-User": "alice", "X-2FA-Code": pyotp.TOTP(secret).now()})
            assert r.status_code == 200 and r.json()["path"] == "/echo/x"
            auth = {"X-Original-URI": "/public/x", "X-Original-Method": "GET"}
            assert (await c.get("/auth", headers=auth)).status_code == 200
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.levelno >= logging.ERROR] == [
        gateway.pages.MISSING
    ]


async def test_every_page_has_a_data_icon_and_a_way_back_to_the_app(tmp_path: Path) -> None:
    """Issue 12 §2.7: no page makes the browser ask for /favicon.ico (a 404), each links back."""
    config = make_config(tmp_path, upstream=UPSTREAM)
    async with in_process(config) as gw:
        c = gw.client
        seen = [await c.get("/setup-2fa?next=/app/x", headers=HTML)]
        seen.append(qr := await c.post("/setup-2fa", data={"next": "/app/x"}, headers=HTML))
        match = re.search(r'id="secret"[^>]*>([A-Z2-7 ]+)<', qr.text)
        assert match
        totp = pyotp.TOTP(match.group(1).replace(" ", ""))
        seen.append(await c.post("/verify-2fa", data={"code": totp.now(), "next": "/app/x"}, headers=HTML))
        for route in ("/verify-2fa", "/recovery-codes", "/logout-2fa"):
            seen.append(await c.get(route + "?next=/app/x", headers=HTML))
        seen.append(await c.post("/logout-2fa", data={"next": "/app/x"}, headers=HTML))
    for page in seen:
        assert page.status_code == 200, page.text
        assert '<link rel="icon" href="data:,">' in page.text, page.url
        assert 'href="/app/x"' in page.text, page.url
        # Nothing the browser would fetch from the gateway: no src= or href= to a path but links.
        assert not re.search(r'(?:src|rel="(?:icon|stylesheet)" href)="/', page.text), page.url


def test_template_names_are_the_files() -> None:
    assert sorted(gateway.pages.TEMPLATES) == sorted(
        p.name for p in gateway.pages.DIRECTORY.glob("*.html") if p.name != "base.html"
    )
