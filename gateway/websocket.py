"""WebSocket upgrades: decided like any request, then relayed to the upstream.

The handshake is checked by the same decision as every HTTP request (a session cookie, a
code header, an excluded path). A denied handshake is closed before it is accepted, which
the ASGI server answers with HTTP 403 (RFC 6455 §4.2.2 lets the server refuse with any 4xx).
After the upstream accepts, messages are relayed both ways unchanged; the subprotocol the
upstream chose is passed on, and so are close codes and reasons (RFC 6455 §7.4), except the
codes that only report a closure and may never be sent, which are translated. Whatever ends the
relay, the upstream connection is closed. An upstream that cannot be reached or does not complete
the handshake is refused as an HTTP request would be: 502, or 504 past ``connect_timeout``.

A socket lives only as long as the 2FA session that admitted it (``revocation.py``): when that
session ends, the client is closed with :data:`SESSION_ENDED` (4401) and the upstream with 1001
("going away"). A socket opened with a code is bound to the session that code opened (its
cookie is sent with the accept); one on an excluded path carries no session and is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import EXTERNAL_CLOSE_CODES, CloseCode
from websockets.http11 import Request

from gateway.decision import Decision, Facts
from gateway.errors import Reason
from gateway.hosts import MalformedHost, MisdirectedHost
from gateway.paths import encode_path
from gateway.proxy import Forwarder
from gateway.responses import denial_body
from gateway.revocation import SessionWatch, admitting_session

log = logging.getLogger("gateway.websocket")
# How long closing the upstream WebSocket waits for its close frame before dropping the TCP
# connection (RFC 6455 §7.1.1 lets the closing side do that). The library's default is 10 s, and
# a client that stopped reading leaves the upstream's close frame behind data nobody reads: each
# such socket held an upstream connection, two tasks and their fds for the full 10 s.
_CLOSE_TIMEOUT = 2.0

# Set by the client library itself for the upstream handshake (RFC 6455 §4.1).
_HANDSHAKE = frozenset(
    {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol"}
)
_POLICY_VIOLATION = 1008
# The 2FA session that admitted the socket has ended. RFC 6455 §7.4.2 leaves 4000-4999 to
# applications; 4401 echoes HTTP 401, and unlike 1008 (which an upstream may send too, and is
# relayed unchanged) it comes only from the gateway: get a new session, then reconnect.
SESSION_ENDED = 4401
_SESSION_ENDED_REASON = "2fa session ended"
# RFC 3986 §3.4: the bytes a query may hold as they are, besides "%" (kept so that an escape is
# passed on as sent, never encoded twice). Other printable ASCII ("|", "{", '"' ...) is outside the
# grammar too, but servers take it and an HTTP proxy passes it on unchanged, so we do as well; only
# "#" must go, since it would start a fragment.
_QUERY_AS_IS = frozenset(range(0x21, 0x7F)) - {ord("#")}


def encode_query(query: bytes) -> str:
    """The query for the upstream URL: the bytes as they came, except those that cannot appear in a
    request target (non-ASCII, controls, space, "#"), which are percent-encoded (RFC 3986 §2.1)."""
    return "".join(chr(b) if b in _QUERY_AS_IS else f"%{b:02X}" for b in query)


def sendable_close_code(code: int | None, *, abnormal: int) -> int:
    """A code that may be sent in a close frame, standing for ``code`` as received.

    RFC 6455 §7.4.1: 1005 (no status), 1006 (closed without a close frame) and 1015 (TLS failure)
    only report how a connection ended and MUST NOT be sent. No status is a normal closure
    (§7.1.5); a lost connection becomes ``abnormal``, as does any code outside the ranges that
    may be sent (§7.4.2).
    """
    if code == CloseCode.NO_STATUS_RCVD:
        return int(CloseCode.NORMAL_CLOSURE)
    if code is None or not (code in EXTERNAL_CLOSE_CODES or 3000 <= code < 5000):
        return int(abnormal)
    return code


Admit = Callable[[Scope], Awaitable[tuple[Facts, Decision]]]
SetCookie = Callable[[str], tuple[bytes, bytes]]


async def proxy_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    admit: Admit,
    forwarder: Forwarder | None,
    sessions: SessionWatch,
    cookie: str,
    set_cookie: SetCookie,
) -> None:
    """One WebSocket request in proxy mode. ``admit`` builds the facts of the handshake (as a
    GET) and runs the counted decision; ``cookie`` is the session cookie's name and
    ``set_cookie`` makes the ``Set-Cookie`` field for a session a code opened."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    facts, decision = await admit({**scope, "method": "GET"})
    session = admitting_session(decision, facts.headers, cookie)
    if not decision.allowed or forwarder is None or decision.path is None:
        log.info("websocket handshake denied: %s", decision.reason.value)
        await send({"type": "websocket.close", "code": _POLICY_VIOLATION})
        return
    if decision.reason is not Reason.EXCLUDED and (session is None or decision.user is None):
        # Fail closed: a socket that could not be ended with its session is not opened.
        log.warning("websocket handshake denied: the admitting 2FA session is not unambiguous")
        await send({"type": "websocket.close", "code": _POLICY_VIOLATION})
        return

    user = decision.forwarded_user
    try:
        # The host policy, checked again here (gateway/hosts.py): the dispatch may not have.
        where = forwarder.addressed(scope, facts.peer_trusted)
    except MalformedHost:
        return await refuse_handshake(scope, send, Reason.MALFORMED_REQUEST)
    except MisdirectedHost:
        return await refuse_handshake(scope, send, Reason.MISDIRECTED)
    fields = forwarder.request_headers({**scope, "method": "GET"}, user, facts.peer_trusted, where)
    host = fields[0][1].decode("latin-1")  # request_headers puts Host first
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in fields[1:] if k not in _HANDSHAKE]
    # All ASCII, so websockets sends it as it is (a non-ASCII URL it would quote, "%" included).
    url = forwarder.websocket_url(encode_path(decision.path), encode_query(scope.get("query_string", b"")))
    try:
        upstream = await connect(
            url,
            subprotocols=scope.get("subprotocols") or None,
            additional_headers=headers,
            user_agent_header=None,
            compression=None,
            proxy=None,
            open_timeout=forwarder.connect_timeout,
            max_size=None,
            ping_interval=None,
            close_timeout=_CLOSE_TIMEOUT,
            create_connection=_with_host(host),
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        log.warning("upstream refused the websocket handshake: %s", status)
        if 400 <= status < 500:  # the app's own refusal of this client (RFC 6455 §4.2.2)
            await send({"type": "websocket.close", "code": _POLICY_VIOLATION})
        else:  # not an answer to a handshake (a 200 from a plain HTTP app, a 5xx): bad gateway
            await refuse_handshake(scope, send, Reason.UPSTREAM_UNREACHABLE)
        return
    except TimeoutError:
        # Issue 14: an upstream that accepts the connection and never completes the handshake is
        # a 504, as an HTTP request's would be (the handshake is bounded by connect_timeout).
        log.warning("upstream websocket handshake timed out")
        await refuse_handshake(scope, send, Reason.UPSTREAM_TIMEOUT)
        return
    except (OSError, InvalidHandshake) as exc:
        log.warning("upstream websocket unreachable: %s", type(exc).__name__)
        await refuse_handshake(scope, send, Reason.UPSTREAM_UNREACHABLE)
        return

    accept: dict[str, Any] = {"type": "websocket.accept", "subprotocol": upstream.subprotocol}
    if decision.new_session:
        accept["headers"] = [set_cookie(decision.new_session)]
    await send(accept)
    if session is None or decision.user is None:  # an excluded path: no session to end with
        await _relay(upstream, receive, send, None)
        return
    with sessions.watching(session, decision.user) as ended:
        await _relay(upstream, receive, send, ended)


async def refuse_handshake(scope: Scope, send: Send, reason: Reason) -> None:
    """Refuse the handshake with the denial's status and JSON body (the ASGI "WebSocket Denial
    Response" extension), or, from a server without it, by closing it (HTTP 403)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": _POLICY_VIOLATION})
        return
    status, headers, body = denial_body(reason, html_page=False)
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


def _with_host(host: str) -> type[ClientConnection]:
    """websockets' client connection, sending ``host`` as the handshake's ``Host`` (once, first)
    instead of the URL's: ``connect`` builds the request from the URL it dials, and extra
    headers are added to it, never replace (RFC 6455 §4.1: the Host is the server's name as the
    client knows it, which is the public one)."""

    class HostConnection(ClientConnection):
        def __init__(self, protocol: ClientProtocol, *args: Any, **kwargs: Any) -> None:
            super().__init__(protocol, *args, **kwargs)
            build = protocol.connect

            def connect_with_host() -> Request:
                request = build()
                headers = Headers(Host=host)
                for name, value in request.headers.raw_items():
                    if name.lower() != "host":
                        headers[name] = value
                request.headers = headers
                return request

            protocol.connect = connect_with_host  # type: ignore[method-assign]

    return HostConnection


async def _relay(
    upstream: ClientConnection, receive: Receive, send: Send, session_ended: asyncio.Future[None] | None
) -> None:
    async def client_to_upstream() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                # A client that is gone without a word is "going away" (RFC 6455 §7.4.1: 1001).
                code = sendable_close_code(message.get("code"), abnormal=CloseCode.GOING_AWAY)
                await upstream.close(code, message.get("reason") or "")
                return
            if message.get("text") is not None:
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send(message["bytes"])

    async def upstream_to_client() -> None:
        try:
            async for data in upstream:
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                else:
                    await send({"type": "websocket.send", "bytes": data})
        except ConnectionClosed:
            pass
        # An upstream that is gone without a close frame has failed us (RFC 6455 §7.4.1: 1011).
        code = sendable_close_code(upstream.close_code, abnormal=CloseCode.INTERNAL_ERROR)
        with contextlib.suppress(OSError, RuntimeError):
            await send({"type": "websocket.close", "code": code, "reason": upstream.close_reason or ""})

    tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())]
    revoked = False
    try:
        waits: list[asyncio.Future[Any]] = [*tasks] if session_ended is None else [*tasks, session_ended]
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        revoked = session_ended in done and not any(task in done for task in tasks)
    finally:
        try:
            for task in tasks:
                task.cancel()
            # The relay ends here whatever happened in it: a failed side is logged, never raised.
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, ConnectionClosed | OSError):
                    log.debug("websocket relay ended: %r", outcome)
                elif isinstance(outcome, Exception):
                    log.error("websocket relay failed", exc_info=outcome)
        finally:
            if revoked:
                with contextlib.suppress(OSError, RuntimeError):
                    await send({"type": "websocket.close", "code": SESSION_ENDED, "reason": _SESSION_ENDED_REASON})
                await upstream.close(CloseCode.GOING_AWAY, _SESSION_ENDED_REASON)
            else:
                await upstream.close()
