"""gateway/responses.py: the one boundary where a denial becomes status, headers and body, for
the raw ASGI hot paths and the pages' router alike."""

from __future__ import annotations

import json

import pytest
from starlette.types import Message

from gateway.errors import DENIALS, Reason
from gateway.responses import denial, denial_response, json_response, raw_response, send_denial


def test_a_program_gets_json_and_a_browser_a_page() -> None:
    status, headers, body = denial(Reason.CODE_REQUIRED)
    assert status == 401
    assert json.loads(body) == {"error": "2fa_required", "detail": DENIALS[Reason.CODE_REQUIRED][1]}
    assert (b"content-type", b"application/json") in headers and (b"cache-control", b"no-store") in headers
    # RFC 9110 §11.6.1: a 401 carries a challenge.
    assert (b"www-authenticate", b'X-2FA-Code realm="gateway"') in headers
    status, headers, body = denial(Reason.CODE_REQUIRED, "text/html,*/*;q=0.8")
    assert status == 401 and body.startswith(b"<!doctype html>") and b"2fa required" in body
    assert (b"content-type", b"text/html; charset=utf-8") in headers


def test_fields_retry_after_and_extra_headers() -> None:
    status, headers, body = denial(Reason.LOCKED, None, [(b"x-a", b"1")], retry_after=90, setup="/s")
    assert status == 429 and json.loads(body) == {
        "error": "2fa_locked",
        "detail": DENIALS[Reason.LOCKED][1],
        "setup": "/s",
    }
    assert (b"retry-after", b"90") in headers and (b"x-a", b"1") in headers
    assert not any(name == b"www-authenticate" for name, _ in headers)


@pytest.mark.parametrize("reason", [r for r in Reason if r in DENIALS])
def test_every_denial_has_its_table_status(reason: Reason) -> None:
    assert denial(reason)[0] == DENIALS[reason][0]
    assert denial_response(reason).status_code == DENIALS[reason][0]


async def test_the_raw_send_and_the_router_response_send_the_same_bytes() -> None:
    raw: list[Message] = []
    routed: list[Message] = []

    async def to_raw(message: Message) -> None:
        raw.append(message)

    async def to_routed(message: Message) -> None:
        routed.append(message)

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    await send_denial(to_raw, Reason.INVALID_CODE, None, retry_after=3)
    await denial_response(Reason.INVALID_CODE, None, retry_after=3)({"type": "http"}, receive, to_routed)
    assert raw[0]["status"] == routed[0]["status"] == 401
    assert sorted(raw[0]["headers"]) == sorted(routed[0]["headers"])
    assert b"".join(m.get("body", b"") for m in raw[1:]) == b"".join(m.get("body", b"") for m in routed[1:])


def test_raw_response_keeps_repeated_headers() -> None:
    response = raw_response(200, [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")], b"ok")
    assert [v for k, v in response.raw_headers if k == b"set-cookie"] == [b"a=1", b"b=2"]
    assert (b"content-length", b"2") in response.raw_headers
    assert not any(k == b"content-type" for k, _ in response.raw_headers)


def test_json_response() -> None:
    response = json_response(200, {"status": "ok"}, [(b"x-a", b"1")])
    assert response.body == b'{"status":"ok"}'
    assert (b"cache-control", b"no-store") in response.raw_headers and (b"x-a", b"1") in response.raw_headers
