"""How the gateway listens: uvicorn's httptools protocol with limits on what a client sends.

The limits themselves, and the counting of heads and trailers, are in ``gateway.server_limits``;
``gateway.serve`` builds the uvicorn config around this protocol and runs it.

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
- **Trailers.** llhttp reports the trailer fields of a chunked body through the same callback
  as header fields, and uvicorn appends each to the request's header list, after every check
  above: a chunked body followed by 4 million ``a:b`` trailer lines grew the process by 460 MiB.
  The gateway forwards no request trailers (ASGI has no event for them, and the proxy copies
  the headers once, when the request starts), so they are dropped as they come; they count
  with the head against ``server.max_headers`` and ``server.max_head_bytes``, and so does an
  unfinished trailer line (httptools keeps it whole), counted as the bytes received since the
  last body byte. Past either, the connection closes (431 if no response has started).
- **A WebSocket handshake the WebSocket library refuses.** RFC 6455 §4.1: the opening
  handshake is a GET without a body. llhttp upgrades a request with ``Content-Length: 1`` or
  ``Transfer-Encoding: chunked`` anyway, the websockets library then refuses it without a
  word, and the connection stayed open, unanswered, for good. Such a handshake is answered 400
  here; any other that the WebSocket protocol has not answered ``server.head_timeout`` seconds
  after the upgrade (a field the library finds too long, say) is closed. Bytes a client sent
  after its handshake are handed to the WebSocket protocol (uvicorn dropped them).
- **A response the client does not read.** While the client does not read, the app's
  ``send`` waits on write back-pressure, and a proxied response holds its pooled upstream
  connection (the upstream client stops reading, and its read timeout with it): 4 sockets that
  never read held ``upstream.max_connections = 4`` for as long as they stayed open. When
  writing has stayed paused (the transport's buffer full) for ``server.send_timeout`` seconds,
  the connection is dropped (nginx's ``send_timeout``: the time between two successive writes),
  which disconnects the ASGI request and aborts the upstream one. A WebSocket whose client
  stops reading is dropped alike (``gateway.server_websocket``): otherwise it held its
  upstream WebSocket until the keep-alive ping timed out (about 40 s, issue 14's fault tests).
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
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.hosts import target_agrees_with_host
from gateway.server_limits import BadHandshake, ClientLimits, HeadTooLarge, TrailerCounter
from gateway.server_websocket import LimitedWebSocketProtocol

log = logging.getLogger("gateway.server")


class LimitedConfig(uvicorn.Config):
    """uvicorn's Config carrying the client limits to every protocol instance (and, pickled,
    to every worker process)."""

    def __init__(self, app: Any, limits: ClientLimits, shutdown_delay: float = 0.0, **kwargs: Any) -> None:
        # The WebSocket protocol named, not "auto": the handshake deadline reads its state
        # (uvicorn's websockets-sansio one, closing with 1001 on shutdown). No permessage-deflate
        # (RFC 7692) with clients, as none with the upstream (gateway/websocket.py): a relay gains
        # nothing from it, each connection's zlib state cost about 300 KiB of native memory until
        # the cycle holding it was collected (a soak with 35 WebSockets a second grew by 2 MiB/s,
        # 76 MiB flat without them), and compressing secrets beside attacker-chosen bytes is how
        # CRIME and BREACH read them.
        super().__init__(
            app, http=LimitedHttpToolsProtocol, ws=LimitedWebSocketProtocol, ws_per_message_deflate=False, **kwargs
        )
        self.limits = limits
        self.shutdown_delay = shutdown_delay  # read by gateway.shutdown.DrainingServer


def _close_unanswered_handshake(transport: asyncio.Transport, protocol: Any, timeout: float) -> None:
    """The handshake deadline: a WebSocket protocol that has neither accepted nor refused the
    handshake by now never will (the websockets library refuses some silently)."""
    if not transport.is_closing() and not getattr(protocol, "handshake_complete", True):
        log.info("closing a WebSocket handshake left unanswered for %g s", timeout)
        transport.abort()


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

    def pause_writing(self) -> None:
        if not self.write_paused:
            super().pause_writing()
            self._protocol.on_writing_paused()

    def resume_writing(self) -> None:
        if self.write_paused:
            super().resume_writing()
            self._protocol.on_writing_resumed()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that refuses heads (and trailers) over a size or field count, and
    closes connections whose head does not arrive in time, whose body stops or crawls, or which
    stop reading their response.

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
        self._write_paused_at: float | None = None  # loop.time() when the client stopped reading
        self._idle_bytes = 0  # received while a body is awaited, since the last body byte
        self._trailers = TrailerCounter(self.limits)
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

    def handle_websocket_upgrade(self, rest: bytes = b"") -> None:
        # The connection now belongs to the WebSocket protocol: this timer is no more, and the
        # handshake gets a deadline of its own (one timer per WebSocket connection).
        self._cancel_timer()
        super().handle_websocket_upgrade()
        protocol = self.transport.get_protocol()
        if rest:  # what the client sent after its head (uvicorn dropped it)
            protocol.data_received(rest)  # type: ignore[attr-defined]
        timeout = self.limits.head_timeout
        self.loop.call_later(timeout, _close_unanswered_handshake, self.transport, protocol, timeout)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            if self._head_since is None:  # the first bytes after an idle keep-alive wait
                self._head_since = self.loop.time()
            self._head_bytes += len(data)
        body_pending, body_bytes = self._body_pending, self._body_bytes
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            context = exc.__context__
            if isinstance(context, HeadTooLarge):
                self._refuse(431, "request_header_fields_too_large", str(context))
            elif isinstance(context, BadHandshake):
                self._send_error(400, "bad_request", str(context))
            else:
                self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade as exc:
            if self._should_upgrade():
                self.handle_websocket_upgrade(data[exc.args[0] :])
            else:
                self._unsupported_upgrade_warning()
            return
        if self._awaiting_head and self._head_bytes > self.limits.max_head_bytes:
            self._refuse_head(f"the request head exceeds {self.limits.max_head_bytes} bytes")
            return
        if body_pending and self._body_pending:
            # Bytes with no body byte among them are chunk framing or trailers, and httptools
            # keeps an unfinished trailer line whole: they count like a head.
            if self._body_bytes != body_bytes:
                self._idle_bytes = 0
            else:
                self._idle_bytes += len(data)
                if self._idle_bytes > self.limits.max_head_bytes:
                    detail = f"the request trailers exceed {self.limits.max_head_bytes} bytes"
                    self._refuse(431, "request_header_fields_too_large", detail)
                    return
        if self._body_pending and not self._body_armed:
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
        # RFC 9112 §3.2.2: llhttp keeps only the path of an absolute-form target, so what follows
        # would go by a Host the target may contradict (gateway/hosts.py).
        absolute = self.url[:1] not in (b"/", b"*") and self.parser.get_method() != b"CONNECT"
        if absolute and not target_agrees_with_host(self.url, self.headers):
            raise ValueError("an absolute-form target whose authority is not the Host")
        headers = self.headers
        size = len(self.url) + len(b"".join(itertools.chain.from_iterable(headers))) + 4 * len(headers)
        if size > self.limits.max_head_bytes:
            raise HeadTooLarge(f"the request head exceeds {self.limits.max_head_bytes} bytes")
        if len(headers) > self.limits.max_headers:
            raise HeadTooLarge(f"more than {self.limits.max_headers} header fields")
        upgrade = self.parser.should_upgrade() and self._should_upgrade()
        if upgrade:
            self._check_handshake()
        super().on_headers_complete()
        if not upgrade:  # the fields llhttp reports from now on are trailers (TrailerCounter)
            self._trailers.fields, self._trailers.bytes = len(headers), size
            self.headers = self._trailers  # type: ignore[assignment]
        self._body_pending = True
        self._idle_bytes = 0
        self._body_armed = False
        self._body_since = self._body_last = self.loop.time()
        self._body_bytes = 0
        if self.expect_100_continue and not self.flow.read_paused:
            # RFC 9110 §10.1.1: the client waits for "100 Continue", which uvicorn sends when
            # the app first reads the body; until then the silence is the server's.
            self.flow.pause_reading()

    def _check_handshake(self) -> None:
        """RFC 6455 §4.1: the opening handshake is a GET, and has no body (the websockets
        library refuses one without answering)."""
        if self.parser.get_method() != b"GET":
            raise BadHandshake("a WebSocket handshake must be a GET")
        for name, value in self.headers:
            if (name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding":
                raise BadHandshake("a WebSocket handshake has no body")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._body_last = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # A WebSocket upgrade has no cycle of its own (the first request of a connection: none at
        # all) and goes on as a WebSocket: uvicorn's own check, first, as in its method.
        upgrading = self.parser.should_upgrade() and self._should_upgrade()
        if (
            not upgrading
            and self.cycle.response_complete
            and self.timeout_keep_alive_task is None
            and not self.pipeline
        ):
            # Answered before its body was read (a denial, a 504): uvicorn reads the rest and drops
            # it, cancelling the keep-alive timer at each read, and arms it only when a response
            # completes, so such a connection was never closed (issue 14: held 40 s and more with
            # keepalive_timeout 5 s). It is idle from here: the timer starts now.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
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

    def on_writing_paused(self) -> None:
        self._write_paused_at = self.loop.time()
        self._arm_timer()

    def on_writing_resumed(self) -> None:
        self._write_paused_at = None

    def _deadline(self) -> float | None:
        """When this connection is overdue: it has not read its response for send_timeout, or
        its body stalls or crawls, or its head is late. None while nothing is awaited."""
        deadline = self._read_deadline()
        if self._write_paused_at is not None:
            send_due = self._write_paused_at + self.limits.send_timeout
            deadline = send_due if deadline is None else min(deadline, send_due)
        return deadline

    def _read_deadline(self) -> float | None:
        """When the client is late with what it sends: its body stalls or crawls, or its head
        is late. None while nothing is awaited from it."""
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
        now = self.loop.time()
        send_due = None if self._write_paused_at is None else self._write_paused_at + self.limits.send_timeout
        if self.transport.is_closing():
            # A closing transport waits to flush its buffer: for a client that never reads, forever.
            if send_due is None and self.transport.get_write_buffer_size():
                send_due = now + self.limits.send_timeout
            if send_due is not None:
                self._timer = self.loop.call_at(send_due, self._drop_unread)
            return
        deadline = self._deadline()
        if deadline is None:  # nothing awaited: look again when a head could first be overdue
            self._timer = self.loop.call_later(self.limits.head_timeout, self._check_deadlines)
        elif now < deadline:
            self._timer = self.loop.call_at(deadline, self._check_deadlines)
        elif send_due is not None and now >= send_due:
            self._drop_unread()
        elif self._body_pending:
            self._body_overdue(now)
        else:
            log.debug("closing a connection whose request head took over %g s", self.limits.head_timeout)
            self._close()

    def _body_overdue(self, now: float) -> None:
        stalled = now - self._body_last >= self.limits.body_timeout
        detail = (
            f"no request body data for {self.limits.body_timeout:g} s"
            if stalled
            else f"the request body arrives slower than {self.limits.min_body_rate} bytes/s"
        )
        log.info("closing a connection: %s", detail)
        self._refuse(408, "request_timeout", detail)

    def _refuse(self, status: int, error: str, detail: str) -> None:
        """Close a connection whose request broke a limit after its head: with an error if no
        response has started, and the ASGI request (and any upstream one) disconnected."""
        cycle = self.cycle
        if cycle is None or not (cycle.response_started or cycle.response_complete):
            self._send_error(status, error, detail)
        else:
            self._cancel_timer()
            self._close()
        self._disconnect()

    def _drop_unread(self) -> None:
        self._timer = None
        if self._write_paused_at is None and not (
            self.transport.is_closing() and self.transport.get_write_buffer_size()
        ):
            self._check_deadlines()  # it read in the meantime
            return
        log.info("dropping a connection that read none of its response for %g s", self.limits.send_timeout)
        self._cancel_timer()
        self.transport.abort()
        self._disconnect()

    def _close(self) -> None:
        """Close the connection; abort it if its buffer is full: close() would wait for the
        client to read it, which it may never do."""
        if self._write_paused_at is None:
            self.transport.close()
        else:
            self.transport.abort()

    def _disconnect(self) -> None:
        cycle = self.cycle
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
        self._close()
