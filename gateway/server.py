"""How the gateway listens: uvicorn's httptools protocol with limits on request heads.

Threat model (what an unauthenticated client can do before any rule of the gateway runs):

- **A huge head.** llhttp (under httptools) buffers a header line of any length, and uvicorn
  keeps every header it is given: four connections each sending an unfinished 64 MiB header
  took the process from 65 to 321 MiB. Here the bytes of a head are counted as they arrive;
  past ``server.max_head_bytes`` the answer is 431 and the connection closes (RFC 6585 §5).
  Like nginx's ``large_client_header_buffers``, one read may overshoot before the count stops it.
- **Many headers.** Thousands of small fields cost a Python tuple each, and every one is
  scanned by the decision: past ``server.max_headers`` fields, 431.
- **A head that never ends (slowloris).** A connection holds its place in the server until
  its head is complete: past ``server.head_timeout`` seconds from the connection (or from the
  end of the previous request) the connection closes without an answer, as nginx's
  ``client_header_timeout`` does. A slow *body* is the upstream client's business
  (``upstream.write_timeout``), not this one's.
- **An idle keep-alive connection.** uvicorn's own ``timeout_keep_alive``, set from
  ``server.keepalive_timeout``.

Why a subclass of the httptools protocol and not uvicorn's h11 protocol with
``h11_max_incomplete_event_size``: h11 caps the head's size but neither the number of fields
nor the time it takes, so it would need the same additions, and it parses in Python at a
fraction of llhttp's speed (figures in the README's performance section). The subclass adds
counting and one timer; llhttp still does all the parsing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from gateway.config import ServerConfig

log = logging.getLogger("gateway.server")


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_bytes: int = 64 * 1024
    max_fields: int = 100
    timeout: float = 30.0


def head_limits(server: ServerConfig) -> HeadLimits:
    return HeadLimits(server.max_head_bytes, server.max_headers, server.head_timeout)


class LimitedConfig(uvicorn.Config):
    """uvicorn's Config carrying the head limits to every protocol instance (and, pickled,
    to every worker process)."""

    def __init__(self, app: Any, head_limits: HeadLimits, **kwargs: Any) -> None:
        super().__init__(app, http=LimitedHttpToolsProtocol, **kwargs)
        self.head_limits = head_limits


class _HeadTooLarge(Exception):
    """Raised from a parser callback; httptools hands it back as the context of its error."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that refuses heads over a size or field count and closes connections
    whose head does not arrive in time.

    The deadline costs no timer per request: a request only notes when its head began, and one
    timer per connection wakes every ``timeout`` seconds to close a connection whose head is
    overdue (arming and cancelling a timer per request cost more than the rest of this class)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.head_limits: HeadLimits = getattr(config, "head_limits", HeadLimits())
        self._awaiting_head = True  # between requests, or inside a head
        self._head_bytes = 0  # received since the head began (an upper bound on its size)
        self._head_since: float | None = None  # loop.time() when the awaited head began
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that sends nothing at all is waiting for a head too.
        self._head_since = self.loop.time()
        self._head_timer = self.loop.call_later(self.head_limits.timeout, self._check_head_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._cancel_head_timer()  # the connection now belongs to the WebSocket protocol
        super().handle_websocket_upgrade()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            if self._head_since is None:  # the first bytes after an idle keep-alive wait
                self._head_since = self.loop.time()
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse_head(str(exc.__context__))
                return
            self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._awaiting_head and self._head_bytes > self.head_limits.max_bytes:
            self._refuse_head(f"the request head exceeds {self.head_limits.max_bytes} bytes")

    # -- parser callbacks ------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_since = None
        # Exact now that the head is parsed (the count in data_received may include body bytes,
        # or miss the start of a pipelined head).
        # RFC 9110 §7.1: a fragment is never part of a request target. llhttp drops one
        # silently, so "/healthz#/../admin" would be judged (and forwarded) as "/healthz" while
        # the client wrote something else: a 400, as for a "#" in X-Original-URI (issue 9.4).
        if b"#" in self.url:
            raise ValueError("a raw # in the request target")
        headers = self.headers
        size = len(self.url) + len(b"".join(itertools.chain.from_iterable(headers))) + 4 * len(headers)
        if size > self.head_limits.max_bytes:
            raise _HeadTooLarge(f"the request head exceeds {self.head_limits.max_bytes} bytes")
        if len(headers) > self.head_limits.max_fields:
            raise _HeadTooLarge(f"more than {self.head_limits.max_fields} header fields")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The next bytes on this connection start a new head (and its deadline).
        self._awaiting_head = True
        self._head_bytes = 0

    # -- helpers ---------------------------------------------------------------------------

    def _check_head_deadline(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        now, timeout = self.loop.time(), self.head_limits.timeout
        if self._head_since is not None and now - self._head_since >= timeout:
            log.debug("closing a connection whose request head took over %g s", timeout)
            self.transport.close()
            return
        wait = timeout if self._head_since is None else self._head_since + timeout - now
        self._head_timer = self.loop.call_later(wait, self._check_head_deadline)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _bad_request(self) -> None:
        self.logger.warning("Invalid HTTP request received.")
        self._send_error(400, "bad_request", "the request is not valid HTTP/1.1")

    def _refuse_head(self, detail: str) -> None:
        self._send_error(431, "request_header_fields_too_large", detail)

    def _send_error(self, status: int, error: str, detail: str) -> None:
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        body = json.dumps({"error": error, "detail": detail}, separators=(",", ":")).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def serve_uvicorn(config: LimitedConfig) -> bool:
    """What ``uvicorn.run`` does with a ready Config: one server, or ``config.workers``
    processes sharing one socket. True once a single server has started and stopped."""
    server = uvicorn.Server(config=config)
    if config.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return True
    server.run()
    return server.started
