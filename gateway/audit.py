"""Audit events and request ids: one shape for every security-relevant action.

Each event is one record on the ``gateway.audit`` logger, written by :func:`audit` and nowhere
else, so every event carries the same fields: ``event`` (a dotted name from the table in the
README, "Logs and audit events"), ``user``, ``client`` (the address resolved through
``server.trusted_proxies``, as the decision's ``Facts.client``), ``request_id`` and ``mode``
(``proxy``, ``auth``, ``page`` or ``cli``), plus the event's own fields (a reason, a count).
In JSON they are keys of the line's object; in text, the message reads
``code.rejected user='alice' client=10.0.0.7 mode=proxy reason=invalid_code``.

The request's part (its id, mode and client) lives in a context variable that
:class:`RequestContext` sets for each request, so lower modules (``factors``, ``lockouts``)
emit an event without being handed the request; ``logs.RequestIdFilter`` puts the same id on
every other line the request logs (uvicorn's access line included).

Request ids: ``X-Request-Id`` is believed only from a trusted peer (``server.trusted_proxies``,
the front that made it) and only when it is a short token of visible ASCII; any other value, and
any value from anyone else, is replaced by a fresh one (a client must not choose what goes into
the logs: CWE-117, log injection). The id goes upstream in ``X-Request-Id`` (the client's header
is replaced, never passed on) and back on the answer, where nginx's ``auth_request_set`` can
read it from ``/auth``'s.

An event never carries a secret: no code, session id, recovery code, key or cookie is a field.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import re
import secrets
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

AUDIT_LOGGER = "gateway.audit"
REQUEST_ID_HEADER = b"x-request-id"
MODES = ("proxy", "auth", "page", "cli")
# What an operator watching for attacks or outages wants to see at server.log_level = "warning".
WARNING_EVENTS = frozenset(
    {"code.replayed", "lockout.started", "recovery_code.used", "identity.ambiguous", "store.error", "csrf.refused"}
)

# At most 128 visible ASCII characters (RFC 5234 VCHAR, no space): what nginx's $request_id,
# Envoy's and Traefik's ids and a UUID all are; nothing a log line could be broken with.
_VALID_ID = re.compile(rb"[\x21-\x7e]{1,128}")

log = logging.getLogger(AUDIT_LOGGER)


class Context:
    """One request's part of every event; ``client`` is resolved only when an event needs it.
    (A plain slotted class: a frozen dataclass costs 3x to build, on every request.)"""

    __slots__ = ("mode", "observe", "request_id", "resolve_client", "scope")

    def __init__(
        self,
        request_id: str,
        mode: str,
        scope: Scope | None = None,
        resolve_client: Callable[[Scope], str | None] | None = None,
        observe: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.request_id = request_id
        self.mode = mode
        self.scope = scope
        self.resolve_client = resolve_client
        # The app's counter of events (metrics.Metrics.observe): each event is counted where it is logged.
        self.observe = observe

    @property
    def client(self) -> str | None:
        if self.scope is None or self.resolve_client is None:
            return None
        try:
            return self.resolve_client(self.scope)
        except Exception:  # an audit line must never turn a denial into an error
            return None


_current: contextvars.ContextVar[Context | None] = contextvars.ContextVar("gateway_request", default=None)


def current() -> Context | None:
    return _current.get()


def current_request_id() -> str | None:
    context = _current.get()
    return None if context is None else context.request_id


class _Ids:
    """Fresh ids: 16 random hex digits per process, then a 16-digit counter: unique across
    workers and replicas like a uuid4, without reading the OS's random source per request
    (6 us under load). Ids name requests; they grant nothing, so need not be unguessable."""

    def __init__(self) -> None:
        self._reseed()
        # A forked worker must not repeat its parent's ids: the fork itself says so, rather
        # than a process id compared on every request.
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self.prefix, self.counter = secrets.token_hex(8), itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _Ids()


def accepted_request_id(value: bytes | None, trusted: bool) -> str:
    """The id a request goes on with: ``value`` when a trusted peer sent a valid one, else new."""
    if trusted and value is not None and _VALID_ID.fullmatch(value):
        return value.decode("ascii")
    return new_request_id()


def use_context(mode: str, request_id: str | None = None) -> contextvars.Token[Context | None]:
    """Set the context outside a request (the CLI: mode "cli", a fresh id per command)."""
    return _current.set(Context(request_id or new_request_id(), mode))


def _shown(name: str, value: Any) -> str:
    """A field in the text line: quoted when it is the user, or could break or blur the line (a
    newline or a space in a detail, a path): one event is one line (CWE-117)."""
    if name == "user" or (isinstance(value, str) and (not value.isprintable() or " " in value or "=" in value)):
        return repr(value)
    return str(value)


def audit(event: str, user: str | None = None, *, client: str | None = None, **fields: Any) -> None:
    """Log one audit event; the request id, mode and client come from the request's context
    unless given. ``fields`` are plain values (a reason, a count), never a secret."""
    context = _current.get()
    if client is None and context is not None:
        client = context.client
    record: dict[str, Any] = {
        "event": event,
        "user": user,
        "client": client,
        "request_id": context.request_id if context else None,
        "mode": context.mode if context else None,
        **fields,
    }
    shown = " ".join(f"{k}={_shown(k, v)}" for k, v in record.items() if k != "event")
    level = logging.WARNING if event in WARNING_EVENTS else logging.INFO
    log.log(level, "%s %s", event, shown, extra={"audit": record})
    if context is not None and context.observe is not None:
        context.observe(event, record)


class RequestContext:
    """ASGI middleware around the whole gateway: each HTTP request and WebSocket handshake gets
    its request id (see the module docstring) and its mode, from ``mode_of(path)``."""

    def __init__(
        self,
        app: ASGIApp,
        trusts: Callable[[str | None], bool],
        resolve_client: Callable[[Scope], str | None],
        mode_of: Callable[[str], str],
        observe: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.app = app
        self.observe = observe
        self.trusts = trusts
        self.resolve_client = resolve_client
        self.mode_of = mode_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        sent: bytes | None = None
        kept: list[tuple[bytes, bytes]] = []
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                # Two ids are no id: a fresh one (never one of two stories picked).
                sent = value if sent is None else b"\x00"
            else:
                kept.append((name, value))
        client = scope.get("client")
        request_id = accepted_request_id(sent, sent is not None and self.trusts(client[0] if client else None))
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        kept.append(header)
        scope = {**scope, "headers": kept}
        token = _current.set(Context(request_id, self.mode_of(scope["path"]), scope, self.resolve_client, self.observe))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id if scope["type"] == "http" else send)
        finally:
            _current.reset(token)
