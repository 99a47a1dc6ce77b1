"""The upstream client: an httpx transport backed by aiohttp.

httpx stays the API the forwarder codes against (``httpx.Request`` in, ``httpx.Response``
out, httpx's exceptions); aiohttp's pool and C parser do the HTTP/1.1 underneath. The
``httpx-aiohttp`` package was evaluated and not used: it keeps aiohttp's cookie jar and
automatic headers, re-quotes the URL, has no pool timeout and maps a reset to a timeout.

aiohttp is driven one level below ``ClientSession``, with its public ``ClientRequest``,
``TCPConnector.connect``, ``ClientRequest.send`` and ``ClientResponse.start`` (``_exchange``):
what ``ClientSession._request`` does per request, without its cookie jar, redirects, netrc,
environment proxies, tracing, middlewares and total deadline, which cost ~25 µs of CPU per
request on the bench machine, a sixth of the client's (``python -m bench.transport_micro``).
What is left, ~115 µs against ~48 µs for the hand-written client this replaced, is aiohttp's
own per-request objects (request, writer, response, parser, stream, timers). What this client
does, and why:

* No cookie jar at all (there is no session): one jar would carry one user's ``Set-Cookie`` to
  the next.
* No header the client did not send: ``_Request`` adds none of ``Accept``, ``Accept-Encoding``,
  ``User-Agent`` and ``Content-Type`` (aiohttp adds them otherwise). The one exception is framing:
  a body-less request whose method defines a body gets ``Content-Length: 0`` (RFC 9110 §8.6).
* No decompression, no redirects, no environment proxies or ``.netrc`` (nothing here reads them).
* The request-target is the ``target`` extension, forwarded byte for byte: it is built into
  an already-encoded ``yarl.URL`` and checked to come back out unchanged.
* Framing, from the body actually sent (RFC 9112 §6): a ``Content-Length`` from the caller
  frames a streamed body of that length; ``Transfer-Encoding`` from the caller means a body of
  unknown length, which aiohttp chunks itself; neither means no body. Never both.
* Response heads are capped (``MAX_RESPONSE_HEADERS`` fields of at most ``MAX_FIELD_SIZE``
  bytes); a larger head is a 502, not memory.
* Only safe methods (RFC 9110 §9.2.1) are retried when a pooled connection turns out dead;
  anything else is sent once (RFC 9110 §9.2.2, RFC 9112 §9.3.1) and a dead connection is a 502.
* A body delimited by the close of the connection (RFC 9112 §6.3 item 8) is whole only if the
  connection ended cleanly; after a reset it is a ``ReadError`` (the client's stream is cut off).
* ``max_connections`` requests at once; one more waits at most the ``pool`` timeout.
* aiohttp's exceptions become httpx's at one boundary, ``map_aiohttp_exceptions``:
  refused → ``ConnectError``, reset or early close → ``ReadError``, malformed answer →
  ``RemoteProtocolError``, timeouts → ``ConnectTimeout`` / ``ReadTimeout`` / ``WriteTimeout``
  / ``PoolTimeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import aiohttp
import httpx
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from yarl import URL

_ORIGIN_FORM = re.compile(rb"/[\x21\x22\x24-\x7e]*")
MAX_RESPONSE_HEADERS = 128
MAX_FIELD_SIZE = 8190  # bytes in one response header line, as nginx's default 8k buffer
# What aiohttp would add to a request unless told not to (its update_auto_headers, and a body's
# Content-Type); the client's own, if any, pass untouched.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_READ_BUFSIZE = 2**16  # aiohttp's default: reading pauses past this much unread body
# RFC 9110 §9.2.1: safe methods may be resent on a fresh connection when a pooled one was dead.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class _Request(aiohttp.ClientRequest):
    """aiohttp's request, adding no header of its own. ``update_auto_headers`` is where aiohttp
    adds ``Accept``, ``Accept-Encoding`` and ``User-Agent``; the skip set (which it also reads
    before adding a ``Content-Type`` to a body) names the one it would add otherwise. Both are
    fixed here once instead of being rebuilt from a skip list on every request."""

    _skip_auto_headers = CIMultiDict((name, None) for name in _AUTO_HEADERS)

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        return None


class _Protocol(ResponseHandler):
    """aiohttp's connection protocol, remembering why the connection ended. aiohttp (3.14) ends
    a body that runs to the close of the connection (RFC 9112 §6.3 item 8) the same way on a
    clean close (FIN) and on a reset: ``connection_lost`` feeds the parser its EOF either way,
    and only the ``exc`` it is called with tells them apart (None for a FIN)."""

    lost: BaseException | None = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc  # before aiohttp ends the body, so a reader woken by that end sees it
        super().connection_lost(exc)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, but a pooled connection on which bytes arrived while it was idle is
    closed, not reused. aiohttp (3.14) parses such bytes into a response queued on the idle
    connection and hands it to the next request that takes it: one user's planted ``302`` with
    ``Set-Cookie`` would answer another user's request. ``should_close`` is True for such a
    connection (anything queued, an error, an unfinished body); aiohttp checks it only when
    the connection is released, so it is checked again here, when it is taken."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # aiohttp's own factory, with the protocol that remembers how the connection ended.
        self._factory = cast("functools.partial[ResponseHandler]", functools.partial(_Protocol, loop=self._loop))
        self.pooled: weakref.WeakSet[Connection] = weakref.WeakSet()  # taken from the pool

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while (conn := await super()._get(key, traces)) is not None:
            protocol = conn.protocol
            if protocol is not None and not protocol.should_close:
                self.pooled.add(conn)
                return conn
            conn.close()
        return None


class map_aiohttp_exceptions:  # lower case: used as a function would be, ``with map_aiohttp_exceptions():``
    """aiohttp's errors as httpx's. An error from the request body's own stream (the client went
    away) is re-raised as it was, not as an upstream failure. A class rather than a
    ``contextlib.contextmanager``: entered twice per request, a generator costs a microsecond."""

    __slots__ = ("upload",)

    def __init__(self, upload: _Upload | None = None) -> None:
        self.upload = upload

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or not isinstance(exc, Exception):
            return
        upload = self.upload
        if upload is not None and upload.error is not None:
            raise upload.error from None
        mapped = _mapped(exc, upload)
        if mapped is not None:
            raise mapped from exc


def _mapped(exc: Exception, upload: _Upload | None) -> httpx.TransportError | None:
    # Order matters: aiohttp's timeouts subclass its connection errors, and
    # ClientConnectorError subclasses ClientOSError.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout("connecting to the upstream timed out")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout("the upstream did not answer in time")
    if isinstance(exc, TimeoutError):
        # Not aiohttp's: the only other deadline is the upload's, armed while a chunk is written.
        if upload is not None:
            return httpx.WriteTimeout("the upstream stopped reading the request body")
        return httpx.ReadTimeout("the upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(f"cannot connect to the upstream: {type(exc.os_error).__name__}")
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(f"malformed or incomplete response from the upstream: {type(exc).__name__}")
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return httpx.ReadError("the upstream closed or reset the connection")
    if isinstance(exc, aiohttp.ClientError):
        return httpx.RemoteProtocolError(f"upstream error: {type(exc).__name__}")
    if isinstance(exc, ValueError):
        # aiohttp refuses a control character in a header or the target (RFC 9110 §5.5).
        return httpx.LocalProtocolError("a header field or the target cannot be sent as given")
    return None


class _Upload:
    """The request body as aiohttp pulls it, with a write deadline that runs only while aiohttp
    writes a chunk (not while the client is slow to send the next one)."""

    def __init__(self, stream: httpx.AsyncByteStream, timeout: float | None) -> None:
        self.stream = stream
        self.timeout = timeout
        self.deadline: asyncio.Timeout | None = None
        self.writing = False
        self.error: BaseException | None = None

    def _arm(self, on: bool) -> None:
        self.writing = on
        deadline = self.deadline
        if deadline is not None and self.timeout is not None and not deadline.expired():
            with contextlib.suppress(RuntimeError):  # the answer came first; the deadline is gone
                deadline.reschedule(asyncio.get_running_loop().time() + self.timeout if on else None)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.stream:
                if chunk:
                    self._arm(True)
                    yield chunk
                    self._arm(False)
        except Exception as exc:
            self.error = exc
            raise
        finally:
            self._arm(False)


class _ResponseStream(httpx.AsyncByteStream):
    """The response body. ``until_close`` is the connection's protocol when the body is
    delimited by the close of the connection (RFC 9112 §6.3 item 8), None when it is framed."""

    def __init__(self, response: aiohttp.ClientResponse, release: _Slot, until_close: _Protocol | None) -> None:
        self.response = response
        self.release = release
        self.until_close = until_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self.response.content
        with map_aiohttp_exceptions():
            while chunk := await content.readany():  # b"" only at the end of the body
                yield chunk
        # Such a body is whole only if the connection ended cleanly: after a reset (or any
        # other error) the end is unknown, and relaying it as complete would pass a cut body
        # off as whole; the stream is aborted instead, as a short read against a length is.
        if self.until_close is not None and self.until_close.lost is not None:
            raise httpx.ReadError("the upstream reset the connection in a body delimited by its close")

    async def aclose(self) -> None:
        # A body read to its end has already returned the connection to the pool (``closed``);
        # otherwise it is closed here (aiohttp never reuses a connection with unread or
        # unexpected bytes).
        if not self.response.closed:
            self.response.release()
        self.release()


class _Slot:
    """One of ``max_connections``, given back once."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self.semaphore: asyncio.Semaphore | None = semaphore

    def __call__(self) -> None:
        if self.semaphore is not None:
            self.semaphore.release()
            self.semaphore = None


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        max_connections: int = 256,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.ssl_context = ssl_context
        self._connector: _Connector | None = None
        self._slots = asyncio.Semaphore(max_connections)
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}

    def _open(self) -> _Connector:
        # The pool is limited by self._slots, so aiohttp's connector never waits (its wait
        # would be indistinguishable from a connect timeout); idle connections are at most
        # the requests that ran at once.
        self._connector = _Connector(
            limit=0,
            keepalive_timeout=self.keepalive_expiry,
            ssl=self.ssl_context if self.ssl_context is not None else True,
        )
        return self._connector

    def _client_timeout(self, timeout: dict[str, float | None]) -> aiohttp.ClientTimeout:
        key = (timeout.get("connect"), timeout.get("read"))
        found = self._timeouts.get(key)
        if found is None:
            found = self._timeouts[key] = aiohttp.ClientTimeout(total=None, sock_connect=key[0], sock_read=key[1])
        return found

    async def _acquire(self, timeout: float | None) -> _Slot:
        if self._slots.locked():
            try:
                async with asyncio.timeout(timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no free upstream connection") from None
        else:
            await self._slots.acquire()
        return _Slot(self._slots)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        connector = self._connector or self._open()
        timeout: dict[str, float | None] = request.extensions.get("timeout", {})
        url = _target_url(request)
        headers, upload = _framing(request, timeout.get("write"))
        release = await self._acquire(timeout.get("pool"))
        try:
            with map_aiohttp_exceptions(upload):
                exchange = _exchange(connector, request.method, url, headers, upload, self._client_timeout(timeout))
                if upload is None:
                    response, protocol = await exchange
                else:
                    async with asyncio.timeout(None) as upload.deadline:
                        response, protocol = await exchange
                    upload.deadline = None
            if 100 <= response.status < 200:
                # RFC 9110 §15.2: interim answers are consumed below us; a 101 to a request
                # that asked for no upgrade (Upgrade is hop-by-hop, never forwarded) is refused.
                response.close()
                raise httpx.RemoteProtocolError("unexpected protocol upgrade from the upstream")
        except BaseException:
            release()
            raise
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, release, protocol if _until_close(request.method, response) else None),
            extensions={"http_version": b"HTTP/1.1"},
            request=request,
        )

    async def aclose(self) -> None:
        if self._connector is not None:
            await self._connector.close()
            self._connector = None


async def _exchange(
    connector: _Connector,
    method: str,
    url: URL,
    headers: list[tuple[str, str]],
    upload: _Upload | None,
    timeout: aiohttp.ClientTimeout,
) -> tuple[aiohttp.ClientResponse, _Protocol]:
    """One request, its response head and the connection's protocol, through aiohttp's public
    request, connector and response classes: what ``ClientSession._request`` does, without what
    this client must not do (cookie jar, redirects, netrc and environment proxies, automatic
    headers) and without what it does not use (tracing, middlewares, a total deadline), which
    cost more per request than the exchange itself.

    RFC 9110 §9.2.1: a safe request without a body is sent again, once, on a fresh connection
    when the pooled one turns out dead (aiohttp's own retry also resends after a fresh one
    failed); anything else is sent once (RFC 9110 §9.2.2, RFC 9112 §9.3.1) and a dead
    connection is an error.
    """
    safe = upload is None and method in _SAFE_METHODS
    while True:
        request = _Request(
            method,
            url,
            headers=headers,
            data=upload.chunks() if upload is not None else None,
            loop=asyncio.get_running_loop(),
        )
        try:
            conn = await connector.connect(request, traces=[], timeout=timeout)
        except TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(f"connecting to {url.host} timed out") from exc
        # Only a pooled connection may have died while idle; a fresh one that fails is the
        # upstream's answer (issue 14: a resetting upstream got every GET twice).
        retry = safe and conn in connector.pooled
        protocol = conn.protocol
        assert isinstance(protocol, _Protocol)
        protocol.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=True,
            auto_decompress=False,
            read_timeout=timeout.sock_read,
            read_bufsize=_READ_BUFSIZE,
            max_line_size=MAX_FIELD_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_RESPONSE_HEADERS,
        )
        try:
            response = await request.send(conn)
            try:
                await response.start(conn)
            except BaseException:
                response.close()
                raise
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            conn.close()
            if not retry:
                raise
            safe = False
            continue
        except BaseException:
            conn.close()
            raise
        return response, protocol


def _until_close(method: str, response: aiohttp.ClientResponse) -> bool:
    """Whether the body runs to the close of the connection (RFC 9112 §6.3): it has one (not a
    HEAD, 204 or 304 answer, §6.3 item 1) and neither a Content-Length nor a final chunked
    coding frames it (items 4 and 8)."""
    if method == "HEAD" or response.status in (204, 304):
        return False
    headers = response.headers
    if "Transfer-Encoding" in headers:
        codings = ",".join(headers.getall("Transfer-Encoding")).rsplit(",", 1)[-1]
        return codings.strip().lower() != "chunked"
    return "Content-Length" not in headers


def _target_url(request: httpx.Request) -> URL:
    """The upstream origin with the request-target exactly as given (no re-quoting)."""
    origin = request.url
    target: bytes = request.extensions.get("target") or origin.raw_path
    # RFC 9112 §3.2 origin-form: visible ASCII, no whitespace (which would split the request
    # line) and no "#" (a fragment is never sent, RFC 9110 §4.2.4).
    if not _ORIGIN_FORM.fullmatch(target):
        raise httpx.LocalProtocolError("request-target is not in origin-form")
    text = target.decode("ascii")
    try:
        url = URL(f"{origin.scheme}://{origin.netloc.decode('ascii')}{text}", encoded=True)
    except ValueError:
        raise httpx.LocalProtocolError("request-target is not a valid URL") from None
    # What goes on the request line is what was checked, or nothing is sent.
    if url.raw_path_qs != text:
        raise httpx.LocalProtocolError("request-target does not round-trip")
    return url


def _framing(request: httpx.Request, write_timeout: float | None) -> tuple[list[tuple[str, str]], _Upload | None]:
    """The header fields as aiohttp wants them (text) and the body to stream, if any.

    aiohttp writes header text as UTF-8 and refuses control characters (RFC 9110 §5.5): a
    field is decoded as UTF-8, so what it writes back is the bytes that came in; bytes that
    are not UTF-8 cannot be written unchanged, and the request is refused.
    """
    headers: list[tuple[str, str]] = []
    length = chunked = False
    try:
        for name, value in request.headers.raw:
            lower = name.lower()
            if lower == b"transfer-encoding":
                chunked = True  # a body of unknown length: aiohttp writes the chunked framing
                continue
            if lower == b"content-length":
                length = value.strip() not in (b"0", b"")
            elif lower == b"expect":
                # RFC 9110 §10.1.1: the ASGI server already answered the client's 100-continue;
                # aiohttp would hold the body back until the upstream sent one, and an upstream
                # that waits for the body instead would never answer.
                continue
            headers.append((name.decode("ascii"), value.decode("utf-8")))
    except UnicodeDecodeError:
        raise httpx.LocalProtocolError("a header field is not UTF-8") from None
    if chunked:
        # RFC 9112 §6.3: Content-Length beside Transfer-Encoding would let the upstream frame
        # the body differently from us; only the chunked framing is sent.
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    if not (chunked or length):
        return headers, None
    stream = request.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    return headers, _Upload(stream, write_timeout)
