"""gateway/framing.py: one plain framing for what goes upstream, or a refusal (RFC 9112 §6.1, §6.3).

The same ambiguities sent over a socket, through the whole gateway, are in tests/test_proxy.py."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.framing import AmbiguousFraming, connection_tokens, request_framing


def _scope(method: str, *headers: tuple[bytes, bytes], version: str = "1.1") -> dict[str, Any]:
    return {"type": "http", "method": method, "http_version": version, "headers": list(headers)}


@pytest.mark.parametrize(
    "headers",
    [
        # What one ASGI server or another passes on (uvicorn's httptools: "gzip, chunked";
        # h11: Transfer-Encoding next to Content-Length, "5, 5" merged): all refused here.
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")],
        [(b"transfer-encoding", b"gzip, chunked")],
        [(b"transfer-encoding", b"chunked, chunked")],
        [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
        [(b"transfer-encoding", b"identity")],
        [(b"transfer-encoding", b"")],
        [(b"content-length", b"5"), (b"content-length", b"5")],
        [(b"content-length", b"5, 5")],
        [(b"content-length", b"+5")],
        [(b"content-length", b" 5")],
        [(b"content-length", b"0x5")],
        [(b"content-length", b"")],
        [(b"content-length", "\u0665".encode())],  # ARABIC-INDIC DIGIT FIVE: str.isdigit() says yes
        [(b"content-length", b"9" * 19)],
    ],
)
def test_request_framing_refuses_every_ambiguity(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(AmbiguousFraming):
        request_framing(_scope("POST", *headers))


def test_request_framing_refuses_chunked_in_http_1_0() -> None:
    with pytest.raises(AmbiguousFraming):
        request_framing(_scope("POST", (b"transfer-encoding", b"chunked"), version="1.0"))


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", [], ([], 0)),
        ("GET", [(b"content-length", b"0")], ([], 0)),
        ("POST", [], ([(b"content-length", b"0")], 0)),
        ("PUT", [(b"content-length", b"000")], ([(b"content-length", b"0")], 0)),
        ("POST", [(b"content-length", b"007")], ([(b"content-length", b"7")], 7)),
        ("GET", [(b"content-length", b"3")], ([(b"content-length", b"3")], 3)),
        ("POST", [(b"transfer-encoding", b" Chunked ")], ([(b"transfer-encoding", b"chunked")], None)),
    ],
)
def test_request_framing_from_the_body(
    method: str, headers: list[tuple[bytes, bytes]], expected: tuple[list[tuple[bytes, bytes]], int | None]
) -> None:
    assert request_framing(_scope(method, *headers)) == expected


def test_connection_names_its_tokens_case_insensitively_across_headers() -> None:
    headers = [(b"connection", b"Keep-Alive, X-Foo"), (b"Connection", b" close ,"), (b"x-foo", b"1")]
    assert connection_tokens(headers) == frozenset({b"keep-alive", b"x-foo", b"close"})
