"""gateway/csrf.py: the cross-origin rule (Go 1.25's CrossOriginProtection) and its guard.
The same cases through a real server, on every page route, are in tests/test_enrol.py."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from gateway.csrf import CrossOriginGuard, cross_origin


@pytest.mark.parametrize(
    ("headers", "public_host", "refused"),
    [
        ({"sec-fetch-site": "same-origin", "origin": "http://evil.example"}, None, False),  # Sec-Fetch-Site first
        ({"sec-fetch-site": "none"}, None, False),
        ({"sec-fetch-site": "same-site"}, None, True),
        ({"sec-fetch-site": " Cross-Site "}, None, True),
        ({"origin": "http://gw.test"}, None, False),
        ({"origin": "http://GW.test"}, None, False),
        ({"origin": "http://gw.test:8080"}, None, True),
        ({"origin": "https://2fa.example.org"}, "2fa.example.org", False),
        ({"origin": "https://evil.example.org"}, "2fa.example.org", True),
        ({"origin": "null"}, None, True),
        ({"origin": "file://"}, None, True),
        ({}, None, False),  # not a browser
    ],
)
def test_cross_origin(headers: dict[str, str], public_host: str | None, refused: bool) -> None:
    assert cross_origin(Headers({"host": "gw.test", **headers}), public_host) is refused


async def run(method: str, headers: list[tuple[bytes, bytes]]) -> tuple[list[Message], bool]:
    reached = False

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal reached
        reached = True

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    guard = CrossOriginGuard(app, "https://2fa.example.org", lambda scope: "192.0.2.1")
    scope = {"type": "http", "method": method, "path": "/logout-2fa", "headers": [(b"host", b"gw.test"), *headers]}
    await guard(scope, receive, send)
    return sent, reached


async def test_the_guard_refuses_a_cross_origin_post_before_the_app() -> None:
    sent, reached = await run("POST", [(b"origin", b"http://evil.example"), (b"accept", b"application/json")])
    assert not reached and sent[0]["status"] == 403 and b"csrf_failed" in sent[1]["body"]
    sent, reached = await run("POST", [(b"origin", b"https://2fa.example.org")])
    assert reached and sent == []


async def test_the_guard_leaves_other_methods_to_the_router() -> None:
    # A GET changes nothing; a PUT is answered 405 by the router, as before the guard existed.
    for method in ("GET", "HEAD", "PUT"):
        sent, reached = await run(method, [(b"origin", b"http://evil.example")])
        assert reached and sent == []
