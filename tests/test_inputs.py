"""gateway/inputs.py: what the pages read from a request, judged strictly: the return target,
the body, the query and the body limit."""

from __future__ import annotations

import json

import pytest
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from gateway.inputs import MAX_BODY, BadInput, BodyLimit, read_fields, read_query, safe_target


def scope(content_type: str | None = None, query: bytes = b"") -> Scope:
    headers = [(b"content-type", content_type.encode())] if content_type else []
    return {"type": "http", "method": "POST", "path": "/verify-2fa", "headers": headers, "query_string": query}


def chunks(*parts: bytes) -> Receive:
    """The body in these chunks, then a disconnect (as a server reports a closed client)."""
    messages: list[Message] = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)
    ]
    messages.append({"type": "http.disconnect"})

    async def receive() -> Message:
        return messages.pop(0)

    return receive


async def fields(content_type: str | None, *body: bytes) -> dict[str, str]:
    return await read_fields(Request(scope(content_type), chunks(*body)))


async def test_json_form_and_multipart_give_the_same_fields() -> None:
    want = {"code": "123456", "next": "/a?b=1"}
    assert await fields("application/json", json.dumps({**want, "other": 1}).encode()) == want
    assert await fields("application/x-www-form-urlencoded", b"code=123456&next=%2Fa%3Fb%3D1&x=y") == want
    multipart = (
        b'--b\r\nContent-Disposition: form-data; name="code"\r\n\r\n123456\r\n'
        b'--b\r\nContent-Disposition: form-data; name="next"\r\n\r\n/a?b=1\r\n--b--\r\n'
    )
    assert await fields("multipart/form-data; boundary=b", multipart[:40], multipart[40:]) == want
    assert await fields(None, b"") == {}
    assert await fields("application/json", b'{"code": "   "}') == {}  # blank is absent


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"[]"),
        ("application/json", b'{"code": 1}'),
        ("application/json", b'{"code": "1", "code": "2"}'),
        ("application/x-www-form-urlencoded", b"code=%ff"),
        ("application/x-www-form-urlencoded", b"&".join(b"f%d=1" % i for i in range(21))),
        ("multipart/form-data; boundary=b", b"--b\r\nnot a part"),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="f"; filename="x"\r\n\r\n1\r\n--b--\r\n',
        ),
        ("text/plain", b"code=1"),
        ("application/json", b'{"code": "' + b"1" * 5000 + b'"}'),
    ],
)
async def test_anything_else_is_bad_input(content_type: str, body: bytes) -> None:
    with pytest.raises(BadInput):
        await fields(content_type, body)


def test_query_fields_are_bounded_and_ours_unique() -> None:
    assert read_query(scope(query=b"next=/x&a=1&a=2")) == {"next": "/x", "a": "2"}
    for query in (b"next=/a&next=/b", b"&".join(b"q%d=1" % i for i in range(21))):
        with pytest.raises(BadInput):
            read_query(scope(query=query))


async def run_limited(*body: bytes) -> bytes:
    got: list[bytes] = []

    async def app(s: Scope, receive: Receive, send: Send) -> None:
        got.append(await Request(s, receive).body())

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent")

    await BodyLimit(app)(scope("application/json"), chunks(*body), send)
    return got[0]


async def test_the_body_limit_refuses_as_soon_as_it_is_passed() -> None:
    assert await run_limited(b"x" * MAX_BODY) == b"x" * MAX_BODY
    assert await run_limited(b"x" * 1000, b"y" * (MAX_BODY - 1000)) == b"x" * 1000 + b"y" * (MAX_BODY - 1000)
    with pytest.raises(BadInput, match="too large"):
        await run_limited(b"x" * MAX_BODY, b"y")


async def test_a_client_gone_mid_body_is_bad_input() -> None:
    async def app(s: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await receive()  # the disconnect

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent")

    with pytest.raises(BadInput, match="went away"):
        await BodyLimit(app)(scope(), chunks(b"{"), send)


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        ("/", "/"),
        ("/admin", "/admin"),
        ("/admin/?tab=2&x=%2F", "/admin/?tab=2&x=%2F"),
        ("/a/./b/../c", "/a/c"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/a#frag", "/a"),
        (None, "/"),
        ("", "/"),
        ("//evil.com", "/"),
        ("///evil.com", "/"),
        ("/\\evil.com", "/"),
        ("\\\\evil.com", "/"),
        ("/%5Cevil.com", "/"),
        ("/%5cevil.com", "/"),
        ("/%2F%2Fevil.com", "/"),
        ("/%2f/evil.com", "/"),
        ("https://evil.com/", "/"),
        ("http:/evil.com", "/"),
        ("javascript:alert(1)", "/"),
        ("evil.com", "/"),
        (" /admin", "/"),
        ("/ad min", "/"),
        ("/admin\r\nSet-Cookie: x=1", "/"),
        ("/%0d%0aSet-Cookie:x=1", "/"),
        ("/%09/evil.com", "/"),
        ("/%20/evil.com", "/"),
        ("/x?next=%0a", "/"),
        ("/%00", "/"),
        ("/é", "/"),
        ("/..", "/"),
        ("/a/..;/b", "/"),
        ("/%252e%252e/", "/"),
        ("/" + "a" * 3000, "/"),
        ("/verify-2fa", "/"),
        ("/setup-2fa", "/"),
    ],
)
def test_safe_target(raw: str | None, target: str) -> None:
    assert safe_target(raw, {"/verify-2fa", "/setup-2fa"}) == target
