"""gateway/server_limits.py: the limits as one value, and the counting of trailers against them.

The limits at work on real connections are tests/test_server.py."""

from __future__ import annotations

import pytest

from gateway.config import ServerConfig
from gateway.server_limits import ClientLimits, HeadTooLarge, TrailerCounter, client_limits


def test_the_server_tables_defaults_are_the_limits_defaults() -> None:
    assert client_limits(ServerConfig()) == ClientLimits()


def test_trailers_count_with_the_head_and_past_its_field_limit_are_refused() -> None:
    counter = TrailerCounter(ClientLimits(max_headers=3))
    counter.fields = 2  # the head's own fields
    counter.append((b"a", b"b"))
    assert list(counter) == []  # dropped: the gateway forwards no request trailers
    with pytest.raises(HeadTooLarge, match="more than 3 header and trailer fields"):
        counter.append((b"c", b"d"))


def test_trailers_past_the_heads_byte_limit_are_refused() -> None:
    counter = TrailerCounter(ClientLimits(max_head_bytes=100))
    counter.bytes = 90
    counter.append((b"a", b"bcd"))  # 1 + 3 + ": " + CRLF = 8 bytes: 98
    with pytest.raises(HeadTooLarge, match="exceed 100 bytes"):
        counter.append((b"e", b"f"))
