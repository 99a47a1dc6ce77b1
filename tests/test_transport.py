"""gateway/transport.py's request head: framing read from the headers, and field lines that
could split refused (RFC 9112 §5). The transport itself runs under every proxy test."""

from __future__ import annotations

import httpx
import pytest

from gateway.transport import _CHUNKED, _LENGTH, _request_head

Fields = list[tuple[bytes, bytes]]


def head(headers: Fields, target: bytes = b"/a?b=c") -> tuple[bytes, str | None]:
    request = httpx.Request("GET", "http://up.test", headers=headers, extensions={"target": target})
    return _request_head(request)


def test_head_is_the_request_line_and_fields_as_given() -> None:
    data, framing = head([(b"host", b"up.test"), (b"X-Mixed", b"Value: with colon")])
    assert data == b"GET /a?b=c HTTP/1.1\r\nhost: up.test\r\nX-Mixed: Value: with colon\r\n\r\n"
    assert framing is None


@pytest.mark.parametrize(
    ("headers", "framing"),
    [
        ([(b"content-length", b"0")], None),
        ([(b"Content-Length", b"12")], _LENGTH),
        ([(b"transfer-encoding", b"chunked")], _CHUNKED),
        ([(b"Transfer-Encoding", b"gzip")], _LENGTH),
        ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], _CHUNKED),
    ],
)
def test_framing(headers: Fields, framing: str | None) -> None:
    assert head(headers)[1] == framing


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        ([(b"x-a", b"one\r\nX-Injected: yes")], b"/"),
        ([(b"x-a", b"bare\nlf")], b"/"),
        ([(b"x-a", b"bare\rcr")], b"/"),
        ([(b"x-a: b", b"c")], b"/"),
        ([(b"x-a", b"b")], b"/ HTTP/1.1\r\nX-Injected: yes\r\nX: "),
    ],
)
def test_a_field_or_target_that_would_split_a_line_is_refused(headers: Fields, target: bytes) -> None:
    with pytest.raises(httpx.LocalProtocolError):
        head(headers, target=target)
