"""The forwarder: streams an allowed request to the upstream and the answer back, as nginx's
``proxy_pass`` would.

httpx is the client API, used at the transport level (``AsyncBaseTransport``); under it,
aiohttp (``gateway/upstream.py``) with no cookie jar, no automatic headers, no redirect
following, no decompression and no environment proxies. The transport is a constructor
parameter, so tests can put another under httpx.

* Bodies are streamed both ways; nothing is buffered beyond one chunk.
* The framing of what goes upstream is decided in one place, ``framing.request_framing``, from the
  body the ASGI server de-framed: ``Content-Length: N`` or ``Transfer-Encoding: chunked``,
  never both, never neither with a body. A request whose own framing could be read two ways
  (both headers, several or malformed ``Content-Length``, a transfer coding other than
  ``chunked``) is refused with 400, never re-interpreted (RFC 9112 §6.1, §6.3: request
  smuggling).
* Hop-by-hop headers are removed both ways, including every header named in ``Connection``
  (RFC 9110 §7.6.1), except the headers that frame the message or that the gateway sets or
  checks: ``Connection: Content-Length`` must not unframe a body into a second request.
  ``Upgrade`` and ``HTTP2-Settings`` never go upstream from here (RFC 9113 §3.2 h2c would
  hand the client a connection the gateway no longer sees; WebSocket is gateway/websocket.py).
  ``Content-Encoding`` passes untouched: the bytes are relayed raw, never decoded.
* Routing-override headers (``X-Original-URL``, ``X-Rewrite-URL``, ``X-Forwarded-Prefix``,
  ``X-HTTP-Method-Override`` ...) are dropped: frameworks that honour them would route to a
  path or method the gateway never checked.
* ``Host`` (gateway/hosts.py): the host the client addressed, validated (one, an RFC 3986
  ``host[:port]``, else 400) and inside the host policy (else 421), is sent upstream when
  ``upstream.pass_host`` (the default), else the upstream URL's ``host[:port]``. The check is
  made here too, not only by the dispatch, so no caller can have a host outside the policy sent.
* ``X-Forwarded-For`` is appended to (RFC 7239 §5.2's de facto cousin); ``-Proto`` (public_url's
  scheme, else a trusted front's, else the connection's) and ``-Host`` (the host the client
  addressed, checked) are set. Every other forwarding header (``Forwarded``,
  ``X-Forwarded-Port``, ``-Server``, ``X-Real-IP`` ...) is dropped, a trusted front's too
  (framing.FORWARDING_HEADERS): the app hears of no host, port or scheme the gateway did not check.
* ``Location``, ``Content-Location`` and ``Refresh`` answers that point at the upstream's own
  origin are rewritten to the public one (``public_location``).
* The 2FA code header, the gateway's session cookie and any client-supplied user header are
  stripped, and so are look-alikes of these and of the forwarding headers spelled with ``_``
  or ``.`` (``Remote_User``: CGI-style apps read it as ``Remote-User``); the verified user
  goes upstream in ``upstream.user_header``.
* httpx's errors are translated here, once: refused/reset → 502, timeout → 504, no free
  pooled connection → 503; once the response has started, any of them ends the client's
  connection mid-body (an incomplete answer, never one that looks whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.types import Receive, Scope, Send

from gateway.config import Config
from gateway.decision import client_address
from gateway.errors import Reason
from gateway.framing import (
    FORWARDING_HEADERS,
    FRAMING_HEADERS,
    HOP_BY_HOP_HEADERS,
    IDENTITY_HEADERS,
    ROUTING_OVERRIDE_HEADERS,
    AmbiguousFraming,
    connection_tokens,
    request_framing,
)
from gateway.hosts import (
    DEFAULT_PORTS,
    Addressed,
    HostPolicy,
    MalformedHost,
    MisdirectedHost,
    addressed,
    origin_spellings,
    rewrite_origin,
    rewrite_refresh,
)
from gateway.identity import without_cookie
from gateway.responses import send_denial
from gateway.upstream import AiohttpTransport

log = logging.getLogger("gateway.proxy")

# A response at most this large (by Content-Length) is relayed without a disconnect watcher.
_SMALL_RESPONSE = 256 * 1024


class ClientDisconnected(Exception):
    """The client went away while its request body was being streamed upstream."""


def strip_cookie(value: bytes, name: bytes) -> bytes:
    """A ``Cookie`` header without the named cookie, by the rule the decision reads it with
    (``identity.without_cookie``): a session the gateway honoured never reaches the app."""
    if name not in value:
        return value
    return without_cookie(value.decode("latin-1"), name.decode("latin-1")).encode("latin-1")


def default_transport(config: Config) -> httpx.AsyncBaseTransport:
    """aiohttp under httpx (gateway/upstream.py), pooled to ``upstream.max_connections``."""
    return AiohttpTransport(max_connections=config.upstream.max_connections, keepalive_expiry=30.0)


class Forwarder:
    def __init__(
        self, config: Config, transport: httpx.AsyncBaseTransport | None = None, hosts: HostPolicy | None = None
    ) -> None:
        assert config.upstream.url is not None
        self.upstream = httpx.URL(config.upstream.url)
        self._upstream_origins = origin_spellings(self.upstream.scheme, self.upstream.raw_host, self.upstream.port)
        self.base_path = self.upstream.raw_path.rstrip(b"/")
        self.host = self.upstream.netloc
        public_url = config.server.public_url
        self.public_url = public_url.rstrip("/").encode() if public_url else None
        self.public_scheme = httpx.URL(public_url).scheme.encode() if public_url else None
        self.public_host = httpx.URL(public_url).netloc if public_url else None
        self.hosts = hosts if hosts is not None else HostPolicy.from_config(config)
        self.pass_host = config.upstream.pass_host
        self.transport = transport if transport is not None else default_transport(config)
        up = config.upstream
        self.timeout = {
            "connect": up.connect_timeout,
            "read": up.read_timeout,
            "write": up.write_timeout,
            "pool": up.pool_timeout,
        }
        self.networks = config.server.trusted_proxies
        self.user_header = config.upstream.user_header.lower().encode()
        # Headers a client must never get to the upstream: the code, and anything claiming
        # to name the user (the gateway sets that itself).
        self.stripped = frozenset(
            {config.totp.header.lower().encode(), self.user_header, config.identity.header.lower().encode()}
        )
        self.session_cookie = config.session.cookie.encode()
        # A trusted front's X-Forwarded-For is appended to; its -Host and -Proto were read by
        # hosts.addressed and are set again below; every other forwarding header is dropped.
        self._drop_untrusted = (
            HOP_BY_HOP_HEADERS
            | FRAMING_HEADERS
            | ROUTING_OVERRIDE_HEADERS
            | IDENTITY_HEADERS
            | FORWARDING_HEADERS
            | self.stripped
        )
        self._drop_trusted = self._drop_untrusted - {b"x-forwarded-for"}
        # Names the gateway controls. WSGI, CGI and PHP read "Remote_User" and "Remote-User" alike
        # (both become HTTP_REMOTE_USER), so a look-alike spelled with "_" or "." is dropped too.
        self._look_alikes = self._drop_untrusted
        # What Connection may never make hop-by-hop: the framing (the gateway sets it), Host
        # (RFC 9110 §7.2) and every header the gateway sets or checks.
        self._end_to_end = FRAMING_HEADERS | FORWARDING_HEADERS | self.stripped | {b"host", b"cookie", b"authorization"}

    async def aclose(self) -> None:
        await self.transport.aclose()

    @property
    def connect_timeout(self) -> float | None:
        return self.timeout["connect"]

    def addressed(self, scope: Scope, trusted: bool) -> Addressed:
        """The host and scheme the client addressed (gateway/hosts.py), inside the host policy:
        raises ``MalformedHost`` (400) or ``MisdirectedHost`` (421) otherwise."""
        where = addressed(scope["headers"], scope.get("scheme", "http"), trusted, scope.get("http_version", "1.1"))
        if not self.hosts.allows(where.host, where.scheme):
            raise MisdirectedHost
        return where

    def upstream_host(self, where: Addressed) -> bytes:
        """The ``Host`` the upstream receives: the client's with ``pass_host`` (the public host
        for an HTTP/1.0 request that named none), else the upstream URL's."""
        if not self.pass_host:
            return self.host
        if where.host is not None:
            return where.host.encode("latin-1")
        return self.public_host or self.host

    def request_headers(
        self, scope: Scope, user: str | None, trusted: bool, where: Addressed | None = None
    ) -> list[tuple[bytes, bytes]]:
        """The headers to send upstream, ``Host`` first, without framing (``request_framing``
        adds it). Names arrive lower-cased from the ASGI server. Raises ``MalformedHost`` or
        ``MisdirectedHost`` when ``where`` is not given and the request's host is refused."""
        if where is None:
            where = self.addressed(scope, trusted)
        incoming: list[tuple[bytes, bytes]] = scope["headers"]
        drop = self._drop_trusted if trusted else self._drop_untrusted
        out: list[tuple[bytes, bytes]] = [(b"host", self.upstream_host(where))]
        forwarded_for = None
        named = False
        for name, value in incoming:
            if name == b"host":
                continue
            if (b"_" in name or b"." in name) and name.replace(b"_", b"-").replace(b".", b"-") in self._look_alikes:
                continue
            if name in drop:
                named = named or name == b"connection"
                continue
            if name == b"cookie":
                value = strip_cookie(value, self.session_cookie)
                if not value:
                    continue
            elif name == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
                continue
            out.append((name, value))
        if named:
            # RFC 9110 §7.6.1: what Connection names is hop-by-hop too (rare: filtered again
            # only then), except what the gateway frames, sets or checks.
            hop = connection_tokens(incoming) - self._end_to_end
            if hop:
                out = [(k, v) for k, v in out if k not in hop]
        client = scope.get("client")
        peer = client[0].encode() if client else b"unknown"
        out.append((b"x-forwarded-for", forwarded_for + b", " + peer if forwarded_for else peer))
        # The client's address as the decision resolved it (a trusted front's chain, else the
        # peer), for apps that read X-Real-IP (nginx's convention) rather than the chain.
        chain = forwarded_for.decode("latin-1") if forwarded_for and trusted else None
        real = client_address(peer.decode("latin-1"), chain, self.networks) if client else None
        out.append((b"x-real-ip", real.encode("latin-1") if real else peer))
        scheme = self.public_scheme or where.scheme.encode()
        out.append((b"x-forwarded-proto", scheme))
        if where.host is not None:
            out.append((b"x-forwarded-host", where.host.encode("latin-1")))
            # The port the client addressed, for apps that build links from host, proto and port.
            port = where.host.rpartition(":")[2] if not where.host.endswith("]") and ":" in where.host else None
            out.append((b"x-forwarded-port", (port or str(DEFAULT_PORTS[scheme.decode()])).encode()))
        if user is not None:
            out.append((self.user_header, user.encode()))
        return out

    def public_origin(self, where: Addressed) -> bytes:
        """The origin the client addressed: ``server.public_url``, else the validated host the
        request named; ``b""`` (a relative URL) for an HTTP/1.0 request that named none."""
        if self.public_url:
            return self.public_url
        if where.host is None:
            return b""
        return f"{where.scheme}://{where.host}".encode("latin-1")

    def public_location(self, value: bytes, where: Addressed) -> bytes:
        """A ``Location`` or ``Content-Location`` value with the upstream's own origin replaced
        by the public one (RFC 9110 §10.2.2, §8.7); any other value is left as the app sent it."""
        return rewrite_origin(value, self._upstream_origins, self.public_origin(where))

    def websocket_url(self, path: str, query: str) -> str:
        """The upstream URL for a WebSocket handshake on the checked ``path`` (encoded)."""
        scheme = "wss" if self.upstream.scheme == "https" else "ws"
        target = self.base_path.decode("ascii") + path + ("?" + query if query else "")
        return f"{scheme}://{self.upstream.netloc.decode('ascii')}{target}"

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        user: str | None,
        trusted: bool,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Forward one allowed request; ``path`` is the encoded canonical path that was checked."""
        method: str = scope["method"]
        try:
            if method == "CONNECT":
                # RFC 9110 §9.3.6: CONNECT asks a proxy for a tunnel, with an authority-form
                # target; an app behind the gateway has none to give, and uvicorn reads what
                # follows the head as tunnel bytes, not as a body.
                raise AmbiguousFraming
            framing, length = request_framing(scope)
        except AmbiguousFraming:
            # The client connection's own framing is in doubt too: close it after the answer.
            return await send_denial(send, Reason.MALFORMED_REQUEST, _accept(scope), [(b"connection", b"close")])
        try:
            where = self.addressed(scope, trusted)
        except MalformedHost:
            return await send_denial(send, Reason.MALFORMED_REQUEST, _accept(scope))
        except MisdirectedHost:
            return await send_denial(send, Reason.MISDIRECTED, _accept(scope))
        headers = self.request_headers(scope, user, trusted, where)
        headers.extend(framing)
        query: bytes = scope.get("query_string", b"")
        target = self.base_path + path.encode("ascii") + (b"?" + query if query else b"")
        stream: httpx.AsyncByteStream = _NO_BODY if length == 0 else _RequestBody(receive, length)
        # The URL is the constant upstream origin; the request line's target goes in the
        # "target" extension (honoured by httpcore and by gateway.upstream), which spares
        # parsing a URL per request. ``stream=`` (not ``content=``) keeps httpx from adding
        # or rewriting framing headers: request_framing's are the only ones.
        request = httpx.Request(
            method,
            self.upstream,
            headers=headers,
            stream=stream,
            extensions={"timeout": self.timeout, "target": target},
        )
        # A client that leaves before the answer's head (a slow app) cancels the upstream
        # request then, as nginx does (proxy_ignore_client_abort off), instead of holding an
        # upstream connection for nobody until read_timeout. The watcher reads the client's
        # receive only once the body is all read: until then the body stream is its reader.
        # It starts only for an answer slower than _WATCH_AFTER: a timer costs ~1 us a
        # request, a task ~10 us.
        task = asyncio.current_task()
        assert task is not None
        watchers: list[asyncio.Future[None]] = []
        later = asyncio.get_running_loop().call_later(
            _WATCH_AFTER, lambda: watchers.append(asyncio.ensure_future(_cancel_when_gone(receive, task, stream)))
        )
        try:
            response = await self.transport.handle_async_request(request)
        except ClientDisconnected:
            return
        except asyncio.CancelledError:
            if not watchers or not watchers[0].done() or task.uncancel() > 0:
                raise
            log.info("client disconnected before the response; upstream request cancelled")
            return
        except httpx.PoolTimeout:
            log.warning("upstream pool exhausted")
            return await send_denial(send, Reason.UPSTREAM_BUSY, _accept(scope))
        except httpx.TimeoutException:
            log.warning("upstream timeout on %s", method)
            return await send_denial(send, Reason.UPSTREAM_TIMEOUT, _accept(scope))
        except (httpx.TransportError, OSError) as exc:
            log.warning("upstream unreachable: %s", type(exc).__name__)
            return await send_denial(send, Reason.UPSTREAM_UNREACHABLE, _accept(scope))
        except Exception:
            # Nothing has been sent yet: an answer the client can read, never a bare 500.
            log.exception("forwarding failed before the response")
            return await send_denial(send, Reason.UPSTREAM_UNREACHABLE, _accept(scope))
        finally:
            later.cancel()
            for watcher in watchers:
                watcher.cancel()

        try:
            await self._respond(scope, receive, send, response, where, extra_headers)
        except httpx.TransportError as exc:
            # The head has gone to the client: the one way left to say the answer is incomplete
            # is to end the connection before the body's end (RFC 9112 §8: a short read against
            # Content-Length, a chunked body without its last chunk). Returning mid-body makes
            # the ASGI server close it; an upstream's failure is a warning, not a stack trace.
            log.warning("upstream response cut off after its head: %s", type(exc).__name__)
        finally:
            await response.aclose()

    async def _respond(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        response: httpx.Response,
        where: Addressed,
        extra_headers: list[tuple[bytes, bytes]] | None,
    ) -> None:
        raw = response.headers.raw
        # The ASGI server adds its own Date; two would be a malformed response (RFC 9110 §6.6.1).
        drop = HOP_BY_HOP_HEADERS | connection_tokens(raw) | {b"date"}
        out: list[tuple[bytes, bytes]] = []
        length = -1
        # RFC 9110 §8.6: a 304 may carry the length of the representation it stands for, and a
        # 204 must not carry one; neither has content, which an ASGI server would wait for.
        if response.status_code in (204, 304):
            drop = drop | {b"content-length"}
        for name, value in raw:
            name = name.lower()
            if name in drop:
                continue
            if name in _URL_HEADERS:
                value = self.public_location(value, where)
            elif name == b"refresh":
                value = rewrite_refresh(value, self._upstream_origins, self.public_origin(where))
            elif name == b"content-length" and value.isdigit():
                length = int(value)
            out.append((name, value))
        if extra_headers:
            out.extend(extra_headers)
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})

        if scope["method"] == "HEAD" or response.status_code in (204, 304):
            await send({"type": "http.response.body", "body": b""})
            return
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        chunks = stream.__aiter__()
        if 0 <= length <= _SMALL_RESPONSE:
            # A small body nearly always arrives whole in its first chunk: relayed with no
            # watcher. One that does not (a slow app, a drip) goes on watched like a large one,
            # so a client that leaves, or a 2FA session that ends (revocation.py), stops it.
            first = await anext(chunks, b"")
            if first:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            if len(first) >= length:
                async for chunk in chunks:  # the end of the stream, already there
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
        await self._stream_watched(receive, send, chunks)

    async def _stream_watched(self, receive: Receive, send: Send, stream: AsyncIterator[bytes]) -> None:
        """Relay a large or unbounded body, stopping as soon as the client disconnects (the ASGI
        server may otherwise swallow sends to a closed connection while we drain the upstream)."""
        task = asyncio.current_task()
        assert task is not None

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    task.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except asyncio.CancelledError:
            if not watcher.done() or task.uncancel() > 0:
                raise
            log.info("client disconnected mid-response; upstream response closed")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


# How slow an upstream answer must be before the client is watched for leaving (seconds).
_WATCH_AFTER = 0.1


async def _cancel_when_gone(receive: Receive, task: asyncio.Task[None], body: httpx.AsyncByteStream) -> None:
    """Cancel ``task`` when the client disconnects, listening once ``body`` is all read."""
    if isinstance(body, _RequestBody):
        await body.read.wait()
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()


class _RequestBody(httpx.AsyncByteStream):
    """The client's request body, read from ASGI as the upstream connection takes it. With a
    ``length`` (the Content-Length sent upstream) it never yields more or fewer bytes: a body
    that disagrees with its framing is cut off, never relayed as the start of a next request."""

    def __init__(self, receive: Receive, length: int | None) -> None:
        self.receive = receive
        self.length = length
        self.read = asyncio.Event()  # set once the last of the body is read (_cancel_when_gone)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        left = self.length
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if left is not None:
                if len(chunk) > left:
                    raise ClientDisconnected
                left -= len(chunk)
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                if left:
                    raise ClientDisconnected
                self.read.set()
                return


_NO_BODY = httpx.ByteStream(b"")
# Response fields whose value is one URI reference (RFC 9110 §10.2.2 Location, §8.7
# Content-Location); Refresh (HTML's "5; url=...") is read apart.
_URL_HEADERS = frozenset({b"location", b"content-location"})


def _accept(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"accept":
            return str(value.decode("latin-1"))
    return None
