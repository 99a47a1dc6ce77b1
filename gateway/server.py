"""How the gateway listens: uvicorn's httptools protocol with limits on what a client sends.

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
  ``client_header_timeout`` does.
- **A body that never ends.** A proxied request holds one of ``upstream.max_connections``
  pooled connections until its body is sent, and neither the upstream client's write timeout
  (it runs only while a chunk is being written) nor its read timeout (it starts once the body
  is sent) sees a client that stops sending: 256 connections sending one byte every 20 s to an
  excluded path held every slot, so every other request waited for the pool and got 503. So
  while a request body is awaited (proxied, denied, or read by a gateway page), the connection
  closes when no body byte arrived for ``server.body_timeout`` seconds (nginx's
  ``client_body_timeout``), or when, after ``server.body_rate_grace`` seconds, the body has
  averaged fewer than ``server.min_body_rate`` bytes a second since it began (Kestrel's
  ``MinRequestBodyDataRate``). If no response has started, the answer is 408 first (RFC 9110
  §15.5.9). Closing the connection disconnects the ASGI request, which aborts the upstream
  request and frees its pooled connection. Time in which the server itself does not read (its
  buffer is full because the app or upstream is slow, or ``Expect: 100-continue`` is not yet
  answered) is not the client's: the clocks stop. A minimum rate does not stop a determined
  attacker, it prices the attack: at 1100 bytes/s per connection (2.3 Mbit/s for 256) every
  upstream connection stayed held; at 900 bytes/s each was cut after the grace period. Large
  unauthenticated uploads belong behind a buffering front proxy, or out of ``paths.exclude``.
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
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from gateway.config import ServerConfig

log = logging.getLogger("gateway.server")


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What a client may send: the ``server.*`` limits, carried to every connection."""

    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    head_timeout: float = 30.0
    body_timeout: float = 30.0
    min_body_rate: int = 1024  # bytes a second, averaged from the body's start; 0: no minimum
    body_rate_grace: float = 5.0


def client_limits(server: ServerConfig) -> ClientLimits:
    return ClientLimits(
        max_head_bytes=server.max_head_bytes,
        max_headers=server.max_headers,
        head_timeout=server.head_timeout,
        body_timeout=server.body_timeout,
        min_body_rate=server.min_body_rate,
        body_rate_grace=server.body_rate_grace,
    )


class LimitedConfig(uvicorn.Config):
    """uvicorn's Config carrying the client limits to every protocol instance (and, pickled,
    to every worker process)."""

    def __init__(self, app: Any, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(app, http=LimitedHttpToolsProtocol, **kwargs)
        self.limits = limits


class _HeadTooLarge(Exception):
    """Raised from a parser callback; httptools hands it back as the context of its error."""


class _ClockedFlowControl(FlowControl):
    """uvicorn's read back-pressure, telling the protocol when it stops and starts reading: the
    time in between is the server's, not the client's."""

    def __init__(self, transport: asyncio.Transport, protocol: LimitedHttpToolsProtocol) -> None:
        super().__init__(transport)
        self._protocol = protocol

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self._transport.pause_reading()
            self._protocol.on_reading_paused()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()
            self._protocol.on_reading_resumed()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that refuses heads over a size or field count, and closes connections
    whose head does not arrive in time or whose body stops or crawls.

    The deadlines cost no timer per request: a request only notes timestamps and counts, and one
    timer per connection wakes at the earliest deadline (or every ``head_timeout`` seconds while
    nothing is awaited) to close a connection that is overdue; arming and cancelling a timer per
    request cost more than the rest of this class. Only a body that outlives the read which
    ended its head moves the timer earlier, once (about 1 µs)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits: ClientLimits = getattr(config, "limits", ClientLimits())
        self._awaiting_head = True  # between requests, or inside a head
        self._head_bytes = 0  # received since the head began (an upper bound on its size)
        self._head_since: float | None = None  # loop.time() when the awaited head began
        # Between the end of a head and the end of its body (llhttp ends a bodiless message
        # in the same feed that ends its head, so this is "a body is awaited"):
        self._body_pending = False
        self._body_armed = False  # the timer is due no later than this body's first deadline
        self._body_since = 0.0  # loop.time() when the body began, moved on by reading pauses
        self._body_last = 0.0  # loop.time() of the last body bytes, likewise
        self._body_bytes = 0
        self._paused_at: float | None = None  # loop.time() when the server stopped reading
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _ClockedFlowControl(transport, self)
        # A connection that sends nothing at all is waiting for a head too.
        self._head_since = self.loop.time()
        self._timer = self.loop.call_later(self.limits.head_timeout, self._check_deadlines)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._cancel_timer()  # the connection now belongs to the WebSocket protocol
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
        if self._awaiting_head and self._head_bytes > self.limits.max_head_bytes:
            self._refuse_head(f"the request head exceeds {self.limits.max_head_bytes} bytes")
        elif self._body_pending and not self._body_armed:
            # A body outlives the read that ended its head (most bodies end in it): from now on
            # it has deadlines, and the timer must not sleep past the first.
            self._body_armed = True
            self._arm_timer()

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
        if size > self.limits.max_head_bytes:
            raise _HeadTooLarge(f"the request head exceeds {self.limits.max_head_bytes} bytes")
        if len(headers) > self.limits.max_headers:
            raise _HeadTooLarge(f"more than {self.limits.max_headers} header fields")
        super().on_headers_complete()
        self._body_pending = True
        self._body_armed = False
        self._body_since = self._body_last = self.loop.time()
        self._body_bytes = 0
        if self.expect_100_continue and not self.flow.read_paused:
            # RFC 9110 §10.1.1: the client waits for "100 Continue", which uvicorn sends when
            # the app first reads the body; until then the silence is the server's.
            self.flow.pause_reading()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._body_last = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._body_pending = False
        # The next bytes on this connection start a new head (and its deadline).
        self._awaiting_head = True
        self._head_bytes = 0

    # -- deadlines -------------------------------------------------------------------------

    def on_reading_paused(self) -> None:
        self._paused_at = self.loop.time()

    def on_reading_resumed(self) -> None:
        if self._paused_at is not None:
            held = self.loop.time() - self._paused_at
            self._paused_at = None
            self._body_since += held
            self._body_last += held
            if self._body_pending:
                self._arm_timer()

    def _deadline(self) -> float | None:
        """When this connection is overdue: its body stalls or crawls, or its head is late.
        None while nothing is awaited from the client."""
        limits = self.limits
        if self._body_pending:
            if self._paused_at is not None:
                return None
            deadline = self._body_last + limits.body_timeout
            if limits.min_body_rate:
                # The average since the start falls below the minimum at this time, unless
                # more bytes come (Kestrel: MinRequestBodyDataRate, averaged, after a grace).
                rate_due = self._body_since + max(limits.body_rate_grace, self._body_bytes / limits.min_body_rate)
                deadline = min(deadline, rate_due)
            return deadline
        if self._head_since is not None:
            return self._head_since + limits.head_timeout
        return None

    def _arm_timer(self) -> None:
        """Make the timer due no later than the current deadline."""
        deadline = self._deadline()
        if deadline is None or (self._timer is not None and self._timer.when() <= deadline):
            return
        self._cancel_timer()
        self._timer = self.loop.call_at(deadline, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now, deadline = self.loop.time(), self._deadline()
        if deadline is None:  # nothing awaited: look again when a head could first be overdue
            self._timer = self.loop.call_later(self.limits.head_timeout, self._check_deadlines)
        elif now < deadline:
            self._timer = self.loop.call_at(deadline, self._check_deadlines)
        elif self._body_pending:
            self._body_overdue(now)
        else:
            log.debug("closing a connection whose request head took over %g s", self.limits.head_timeout)
            self.transport.close()

    def _body_overdue(self, now: float) -> None:
        stalled = now - self._body_last >= self.limits.body_timeout
        detail = (
            f"no request body data for {self.limits.body_timeout:g} s"
            if stalled
            else f"the request body arrives slower than {self.limits.min_body_rate} bytes/s"
        )
        log.info("closing a connection: %s", detail)
        cycle = self.cycle
        if cycle is None or not (cycle.response_started or cycle.response_complete):
            self._send_error(408, "request_timeout", detail)
        else:
            self._cancel_timer()
            self.transport.close()
        if cycle is not None and not cycle.response_complete:
            # What connection_lost will do, done now: the app's next receive() says the client
            # is gone (the upstream request is aborted, its pooled connection closed), and any
            # response it still sends goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- answers ---------------------------------------------------------------------------

    def _bad_request(self) -> None:
        self.logger.warning("Invalid HTTP request received.")
        self._send_error(400, "bad_request", "the request is not valid HTTP/1.1")

    def _refuse_head(self, detail: str) -> None:
        self._send_error(431, "request_header_fields_too_large", detail)

    def _send_error(self, status: int, error: str, detail: str) -> None:
        self._cancel_timer()
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
