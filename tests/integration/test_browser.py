"""A person in a real browser: headless Debian Chromium driven by Playwright, through ``gateway demo``.

Never ``playwright install``: browsers cannot be downloaded here; the system Chromium is used.
Each page is saved as a screenshot in ``test-artifacts/browser/`` (repository root).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest

from tests.conftest import need_binary
from tests.support.servers import ROOT, free_port, wait_for_port

pytestmark = pytest.mark.integration

ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox",  # Chromium refuses to run as root with its sandbox
    "--disable-gpu",
    "--disable-background-networking",  # the test network is closed: no update or telemetry calls
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``gateway demo`` as a real process: (base URL, what it printed)."""
    port = free_port()
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--dir", str(tmp_path / "state")],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_for_port(port)
            yield f"http://127.0.0.1:{port}", out.read_text()
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_a_newcomer_enrols_in_chromium_and_reaches_the_protected_page(demo: tuple[str, str], tmp_path: Path) -> None:
    chromium = need_binary("chromium")
    from playwright.sync_api import expect, sync_playwright

    base, banner = demo
    assert "DEMO ONLY" in banner and f"Open {base}/ in your browser" in banner
    state = tmp_path / "state"
    assert all((state / name).stat().st_mode & 0o777 == 0o600 for name in ("encryption.key", "jwt.secret"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 1000})
        page.set_default_timeout(15_000)
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        failed: list[str] = []  # issue 12 §2.7: no page asks for what is not there (/favicon.ico was a 404)
        page.on("response", lambda response: failed.append(response.url) if response.status == 404 else None)
        refused: list[str] = []  # CSP violations ("Refused to apply inline style ...") are logged here
        page.on("console", lambda message: refused.append(message.text) if "Refused to" in message.text else None)

        def shot(name: str) -> None:
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

        try:
            # The demo's first factor: any name.
            page.goto(base + "/")
            shot("01-demo-login")
            page.get_by_label("Your name").fill("alice")
            page.get_by_role("button", name="Log in (demo)").click()

            # The protected page sent the browser to setup, with the way back.
            expect(page).to_have_url(re.compile(r"/setup-2fa\?next=/protected$"))
            expect(page.get_by_role("heading", level=1)).to_have_text("Set up two-factor authentication")
            # The stylesheet applied: its CSP hash matches.
            expect(page.locator("header")).to_have_css("background-color", "rgb(31, 41, 55)")
            shot("02-setup-start")
            page.get_by_role("button", name="Show my QR code").click()

            expect(page.get_by_role("img", name=re.compile("QR code"))).to_be_visible()
            secret = page.locator("#secret").inner_text().replace(" ", "")
            assert re.fullmatch(r"[A-Z2-7]{32}", secret)
            shot("03-setup-qr")

            page.get_by_label("6-digit code").fill("000000")
            page.get_by_role("button", name="Turn on two-factor authentication").click()
            expect(page.get_by_role("alert")).to_contain_text("wrong or expired")
            assert page.locator("#secret").inner_text().replace(" ", "") == secret  # the same QR code again
            shot("04-setup-wrong-code")

            page.get_by_label("6-digit code").fill(pyotp.TOTP(secret).now())
            page.get_by_role("button", name="Turn on two-factor authentication").click()
            codes = page.locator("#recovery-codes li").all_inner_texts()
            assert len(codes) == 10
            # Copy and download (gateway/static/codes.js) ran under the CSP: the buttons show,
            # and the download is the codes, made in the browser (issue 12 §2.4).
            expect(page.get_by_role("button", name="Copy codes")).to_be_visible()
            with page.expect_download() as download:
                page.get_by_role("button", name="Download as a text file").click()
            assert Path(download.value.path()).read_text().split() == codes
            shot("05-recovery-codes")

            page.get_by_role("link", name="I have saved them, continue").click()
            expect(page).to_have_url(base + "/protected")
            expect(page.locator("body")).to_contain_text("You are in: the protected demo page, user alice")
            shot("06-protected")

            # End the 2FA session (a same-origin form in the app), then come back with a recovery code.
            page.get_by_role("button", name="End the 2FA session").click()
            expect(page.get_by_role("status")).to_contain_text("two-factor session has ended")
            shot("07-signed-out")
            page.get_by_role("link", name="Continue").click()

            expect(page).to_have_url(re.compile(r"/verify-2fa\?next=/protected$"))
            shot("08-verify")
            page.get_by_text("Use a recovery code instead").click()
            # A wrong recovery code is called one, and its form stays open (issue 12 §2.4).
            page.get_by_label("Recovery code").fill("AAAAA-BBBBB")
            page.get_by_role("button", name="Use recovery code").click()
            expect(page.get_by_role("alert")).to_contain_text("recovery code is wrong")
            expect(page.get_by_label("Recovery code")).to_be_visible()
            page.get_by_label("Recovery code").fill(codes[0])
            page.get_by_role("button", name="Use recovery code").click()
            expect(page.get_by_role("status")).to_contain_text("You have 9 recovery codes left")
            shot("09-recovery-code-used")
            page.get_by_role("link", name="Continue").click()
            expect(page).to_have_url(base + "/protected")
            expect(page.locator("body")).to_contain_text("user alice")
        finally:
            browser.close()

    assert not refused, refused
    assert not failed, failed
    # No page asked for anything outside the gateway: no CDN, no fonts, no scripts.
    assert requests and all(url.startswith(base) or url.startswith("data:") for url in requests), requests
