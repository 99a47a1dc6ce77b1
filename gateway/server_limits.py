"""What a client may send before any rule of the gateway runs, and the counting of it.

The ``server.*`` limits as one value carried to every connection, the two refusals a parser
callback raises, and the counter that takes a request's trailers in place of its header list.
``gateway.server`` holds the protocol that enforces them, and its docstring the threat model
each limit answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gateway.config import ServerConfig


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What a client may send: the ``server.*`` limits, carried to every connection."""

    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    head_timeout: float = 30.0
    body_timeout: float = 30.0
    min_body_rate: int = 1024  # bytes a second, averaged from the body's start; 0: no minimum
    body_rate_grace: float = 5.0
    send_timeout: float = 60.0


def client_limits(server: ServerConfig) -> ClientLimits:
    """The limits of the ``[server]`` table."""
    return ClientLimits(
        max_head_bytes=server.max_head_bytes,
        max_headers=server.max_headers,
        head_timeout=server.head_timeout,
        body_timeout=server.body_timeout,
        min_body_rate=server.min_body_rate,
        body_rate_grace=server.body_rate_grace,
        send_timeout=server.send_timeout,
    )


class HeadTooLarge(Exception):
    """Raised from a parser callback; httptools hands it back as the context of its error."""


class BadHandshake(Exception):
    """Raised from a parser callback: a WebSocket handshake RFC 6455 §4.1 does not allow."""


class TrailerCounter:
    """What ``self.headers`` is while a body is read: uvicorn's ``on_header`` appends trailer
    fields to it. They are counted and dropped (the gateway forwards no request trailers);
    past the head's limits, the request is refused. One per connection, no cost per request."""

    __slots__ = ("bytes", "fields", "limits")

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self.fields = 0  # of the head, then of the head and its trailers
        self.bytes = 0

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        # uvicorn looks for an Upgrade field again at the end of a request with one: a
        # WebSocket handshake keeps its header list, so none is here.
        return iter(())

    def append(self, field: tuple[bytes, bytes]) -> None:
        self.fields += 1
        self.bytes += len(field[0]) + len(field[1]) + 4
        if self.fields > self.limits.max_headers:
            raise HeadTooLarge(f"more than {self.limits.max_headers} header and trailer fields")
        if self.bytes > self.limits.max_head_bytes:
            raise HeadTooLarge(f"the request head and trailers exceed {self.limits.max_head_bytes} bytes")
