"""JupyterLab in a real browser through proxy mode: headless Debian Chromium driven by
Playwright (as tests/integration/test_browser.py; never ``playwright install``), a 2FA session,
a notebook opened, its kernel connected over the gateway's WebSocket relay, a cell run.

JupyterLab's page makes every request a real browser makes: its own ``Origin``, Jupyter's
``_xsrf`` cookie echoed in ``X-XSRFToken``, the kernel WebSocket with the page's cookies.
Screenshots go to ``test-artifacts/browser/`` (repository root).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.conftest import need_binary
from tests.integration.test_browser import ARTIFACTS, CHROMIUM_ARGS
from tests.support.apps import SESSION_COOKIE, JupyterServer, ProxyGateway, running

pytestmark = pytest.mark.integration

NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "one-plus-one",
            "metadata": {},
            "outputs": [],
            "source": "1+1",
        }
    ],
    "metadata": {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    with running(JupyterServer(tmp_path_factory.mktemp("jupyter-browser"))) as server:
        (server.root / "sum.ipynb").write_text(json.dumps(NOTEBOOK))
        yield server


@pytest.fixture(scope="module")
def gateway(jupyter: JupyterServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyGateway]:
    with ProxyGateway(tmp_path_factory.mktemp("gw-jupyter-browser"), jupyter.url) as gw:
        yield gw


def test_jupyterlab_runs_a_cell_in_chromium_through_the_gateway(gateway: ProxyGateway, jupyter: JupyterServer) -> None:
    chromium = need_binary("chromium")
    from playwright.sync_api import expect, sync_playwright

    session = gateway.enrol_session("erin")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        # The first factor as the trusted front proxy would add it, on every request and handshake.
        context = browser.new_context(
            viewport={"width": 1200, "height": 900}, extra_http_headers={"Remote-User": "erin"}
        )
        context.add_cookies([{"name": SESSION_COOKIE, "value": session, "url": gateway.url}])
        page = context.new_page()
        page.set_default_timeout(60_000)
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        refused: list[int] = []
        page.on(
            "response", lambda r: refused.append(r.status) if r.status in (401, 403, 404) and "/api/" in r.url else None
        )
        try:
            page.goto(gateway.url + "/lab/tree/sum.ipynb")
            # The kernel connected over the gateway's WebSocket relay: the status bar names it, idle.
            expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=90_000)
            page.locator(".jp-Cell .jp-InputArea-editor").first.click()
            page.keyboard.press("Shift+Enter")
            result = page.locator(".jp-OutputArea-executeResult .jp-RenderedText")
            expect(result.first).to_have_text("2", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "jupyterlab-1-plus-1.png"))
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "jupyterlab-failure.png"))
            raise
        finally:
            context.close()
            browser.close()

    ws_base = gateway.url.replace("http://", "ws://")
    assert any(url.startswith(ws_base + "/api/kernels/") for url in sockets), sockets
    assert not refused, refused
    assert "Blocking Cross Origin" not in jupyter.log_text()
