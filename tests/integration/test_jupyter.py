"""Jupyter Server behind proxy mode, configured as its users configure it: no ``allow_origin``,
XSRF checks on, and the gateway as the only gate (issue 12, §1).

Jupyter refuses an API request or a kernel WebSocket whose ``Origin`` names another host than
its ``Host`` (404 and 403, "Blocking Cross Origin API request"). A browser's ``Origin`` is the
gateway's, so this works only when the gateway passes the client's ``Host`` upstream
(``upstream.pass_host``, the default). Every request here carries what a browser that loaded
JupyterLab from the gateway would send: its ``Origin``, the 2FA session cookie, Jupyter's
``_xsrf`` cookie echoed in ``X-XSRFToken``; and the first factor (``Remote-User``) as the
trusted front proxy adds it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from gateway.websocket import SESSION_ENDED
from tests.support.apps import CACHE_TTL, SESSION_COOKIE, JupyterServer, ProxyGateway, running

pytestmark = pytest.mark.integration

# How long past cache_ttl an ended session's kernel socket may stay open: the gateway polls
# sessions about every cache_ttl; the rest is scheduling on a loaded CI machine.
REVOCATION_BOUND = 10.0
KERNEL_TIMEOUT = 60.0  # a kernel's first start imports IPython: seconds on a busy machine


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    with running(JupyterServer(tmp_path_factory.mktemp("jupyter"))) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(jupyter: JupyterServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyGateway]:
    with ProxyGateway(tmp_path_factory.mktemp("gw-jupyter"), jupyter.url) as gw:
        yield gw


class Browser:
    """What JupyterLab's page sends from a browser that reached it through the gateway."""

    def __init__(self, gateway: ProxyGateway, user: str, session: str | None) -> None:
        self.gateway = gateway
        self.user = user
        self.client = httpx.Client(
            base_url=gateway.url,
            headers={"Remote-User": user, "Origin": gateway.origin},
            timeout=KERNEL_TIMEOUT,
        )
        if session is not None:
            self.client.cookies.set(SESSION_COOKIE, session)

    def open_lab(self) -> None:
        """Load the page that gives the browser Jupyter's ``_xsrf`` cookie."""
        r = self.client.get("/lab", headers={"Accept": "text/html"})
        assert r.status_code == 200, r.text[:500]
        assert self.client.cookies.get("_xsrf"), r.headers

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An API call as JupyterLab makes it: the ``_xsrf`` cookie echoed in ``X-XSRFToken``."""
        headers = {"X-XSRFToken": self.client.cookies.get("_xsrf") or "", **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def cookie_header(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.client.cookies.items())

    def kernel_socket(self, kernel_id: str) -> Any:
        url = self.gateway.url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
        return connect(
            url,
            origin=Origin(self.gateway.origin),
            additional_headers={"Remote-User": self.user, "Cookie": self.cookie_header()},
            open_timeout=KERNEL_TIMEOUT,
        )

    def close(self) -> None:
        self.client.close()


@pytest.fixture(scope="module")
def alice(gateway: ProxyGateway) -> Iterator[Browser]:
    browser = Browser(gateway, "alice", gateway.enrol_session("alice"))
    browser.open_lab()
    yield browser
    browser.close()


def start_kernel(browser: Browser) -> str:
    r = browser.api("POST", "/api/kernels", json={"name": "python3"})
    assert r.status_code == 201, r.text
    kernel_id: str = r.json()["id"]
    return kernel_id


async def execute(ws: ClientConnection, code: str) -> str:
    """Jupyter's messaging protocol (v5.3) over the kernel socket's JSON framing: an
    ``execute_request`` on the shell channel, then iopub until its ``execute_result``."""
    msg_id = uuid.uuid4().hex
    await ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "alice",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                    "date": "",
                },
                "parent_header": {},
                "metadata": {},
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), KERNEL_TIMEOUT))
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if message["msg_type"] == "execute_result":
            result: str = message["content"]["data"]["text/plain"]
            return result
        assert message["msg_type"] != "error", message["content"]


async def handshake_status(browser: Browser, kernel_id: str) -> int:
    """The HTTP status of a refused kernel-socket handshake."""
    with pytest.raises(InvalidStatus) as refused:
        async with browser.kernel_socket(kernel_id):
            pass
    return refused.value.response.status_code


def test_the_contents_api_answers_a_browser(alice: Browser, jupyter: JupyterServer) -> None:
    (jupyter.root / "existing.txt").write_text("here before\n")
    r = alice.api("GET", "/api/contents")
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["type"] == "directory"
    assert "existing.txt" in {entry["name"] for entry in listing["content"]}


def test_a_file_is_created_and_saved_with_jupyters_xsrf_convention(alice: Browser, jupyter: JupyterServer) -> None:
    # Jupyter's own checks are on: the same POST without the echoed token is refused by Jupyter.
    r = alice.client.post("/api/contents", json={"type": "file", "ext": ".txt"})
    assert r.status_code == 403, r.text
    # POST: a new untitled file, as "New > Text File" does.
    r = alice.api("POST", "/api/contents", json={"type": "file", "ext": ".txt"})
    assert r.status_code == 201, r.text
    created = r.json()["path"]
    assert (jupyter.root / created).exists()
    # PUT: save a named file with content, as the editor's "Save" does.
    r = alice.api("PUT", "/api/contents/hello.txt", json={"type": "file", "format": "text", "content": "1+1\n"})
    assert r.status_code in (200, 201), r.text
    assert (jupyter.root / "hello.txt").read_text() == "1+1\n"
    r = alice.api("GET", "/api/contents/hello.txt", params={"content": "1"})
    assert r.status_code == 200, r.text
    assert r.json()["content"] == "1+1\n"


async def test_a_kernel_starts_and_its_websocket_runs_1_plus_1(alice: Browser, jupyter: JupyterServer) -> None:
    kernel_id = await asyncio.to_thread(start_kernel, alice)
    try:
        async with alice.kernel_socket(kernel_id) as ws:
            assert await execute(ws, "1+1") == "2"
    finally:
        await asyncio.to_thread(alice.api, "DELETE", f"/api/kernels/{kernel_id}")
    # What the new user saw before pass_host (issue 12): Jupyter blocking the gateway's Origin.
    assert "Blocking Cross Origin" not in jupyter.log_text()


@pytest.mark.parametrize("how", ["logout route", "users reset"])
async def test_ending_the_2fa_session_closes_the_kernel_socket(gateway: ProxyGateway, how: str) -> None:
    """The WebSocket revocation rule against a real app: the browser's logout (in the gateway's
    process) or an operator's ``gateway users reset`` (another process, through the store) ends
    the open kernel socket with 4401 (SESSION_ENDED) within cache_ttl and a bound, and the
    cookie opens nothing again."""
    user = "bob-logout" if how == "logout route" else "bob-reset"
    bob = Browser(gateway, user, await asyncio.to_thread(gateway.enrol_session, user))
    try:
        await asyncio.to_thread(bob.open_lab)
        # The kernel is left to Jupyter's shutdown: bob's session, which could delete it, is gone by design.
        kernel_id = await asyncio.to_thread(start_kernel, bob)
        async with bob.kernel_socket(kernel_id) as ws:
            assert await execute(ws, "1+1") == "2"
            if how == "logout route":
                r = await asyncio.to_thread(bob.client.post, "/logout-2fa", headers={"Accept": "application/json"})
                assert r.status_code == 200, r.text
            else:
                await asyncio.to_thread(gateway.users, "reset", user)
            ended = time.monotonic()
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(CACHE_TTL + REVOCATION_BOUND):  # for the whole, not each message
                    while True:  # iopub status messages still in flight, then the close
                        await ws.recv()
            print(f"kernel socket closed {time.monotonic() - ended:.2f} s after {how}")
        assert ws.close_code == SESSION_ENDED
        # The ended session opens no new socket.
        assert await handshake_status(bob, kernel_id) in (401, 403)
    finally:
        bob.close()


def test_a_request_without_a_session_never_reaches_jupyter(
    gateway: ProxyGateway, jupyter: JupyterServer, alice: Browser
) -> None:
    """Differential: each denied request names a path of its own; Jupyter logs every request
    (debug level), and after a control request that got through is in its log, none of the
    denied paths is."""
    denied = [f"denied-{uuid.uuid4().hex}" for _ in range(5)]
    no_session = Browser(gateway, "alice", None)
    stranger = httpx.Client(base_url=gateway.url, headers={"Origin": gateway.origin}, timeout=30)
    try:
        for response in (
            no_session.api("GET", f"/api/contents/{denied[0]}"),
            no_session.api("PUT", f"/api/contents/{denied[1]}", json={"type": "file", "format": "text", "content": ""}),
            stranger.get(f"/api/contents/{denied[2]}"),
            # A session cookie that is not a session.
            stranger.get(
                f"/api/contents/{denied[3]}", headers={"Remote-User": "alice", "Cookie": f"{SESSION_COOKIE}=forged"}
            ),
        ):
            assert response.status_code in (401, 403), response.text
            assert response.json()["error"], response.text
        # A kernel socket's handshake (a kernel id of its own, for the log).
        assert asyncio.run(handshake_status(no_session, denied[4])) in (401, 403)
    finally:
        no_session.close()
        stranger.close()
    control = f"/api/contents/control-{uuid.uuid4().hex}"
    assert alice.api("GET", control).status_code == 404  # Jupyter's own answer: no such file
    deadline = time.monotonic() + 30
    while control not in jupyter.log_text():
        assert time.monotonic() < deadline, "the control request is not in Jupyter's log"
        time.sleep(0.05)
    log = jupyter.log_text()
    assert not [marker for marker in denied if marker in log]
