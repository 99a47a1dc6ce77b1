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

A brute-force flood must not be a log flood (one line per refused code was ~11k lines/s per
worker). While a user is locked out, the refusal that locked it (or the first one this worker
saw) is logged; the next ones refused for the lock (``code.rejected`` with reason
``2fa_locked``) are counted, and one ``code.rejected.suppressed`` line per user says how many,
when the lock ends or ``SUMMARY_INTERVAL`` seconds have passed, whichever comes first (and at
the lifespan's shutdown). The line names the addresses the held refusals came from (the first
``SUMMARY_CLIENTS`` distinct ones in ``clients``, and how many refusals came from any other in
``other_client_refusals``): a lock hammered from several addresses must not hide all but the
last one (bounded, so a botnet's flood stays one short line). Each app's
:class:`RequestContext` keeps its own tally. Metrics still count every refusal (``observe`` sees
each event); no other event is held back: a wrong code before the lock, an accepted code, an
enrolment, a lockout are each a line.

Nor may the events any client causes at will, with no attempt taken and nothing to lock, be a
log flood (attacker A, issue 14: a foreign ``Origin`` on a page's POST, two ``Authorization``
headers, a locked user's setup-page codes, each one WARNING line per request, from anyone).
Those in ``REPEATED_EVENTS`` are logged ``REPEAT_BURST`` times per ``REPEAT_INTERVAL`` seconds
for each (event, reason); the rest of the window is counted, and one ``audit.suppressed`` line
says how many, naming the event, the reason and the addresses as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

AUDIT_LOGGER = "gateway.audit"
REQUEST_ID_HEADER = b"x-request-id"
MODES = ("proxy", "auth", "page", "cli")
# What an operator watching for attacks or outages wants to see at server.log_level = "warning".
WARNING_EVENTS = frozenset(
    {
        "code.replayed",
        "lockout.started",
        "recovery_code.used",
        "identity.ambiguous",
        "store.error",
        "csrf.refused",
        "code.rejected.suppressed",
        "audit.suppressed",
    }
)

# At most 128 visible ASCII characters (RFC 5234 VCHAR, no space): what nginx's $request_id,
# Envoy's and Traefik's ids and a UUID all are; nothing a log line could be broken with.
_VALID_ID = re.compile(rb"[\x21-\x7e]{1,128}")

log = logging.getLogger(AUDIT_LOGGER)


class Context:
    """One request's part of every event; ``client`` is resolved only when an event needs it.
    (A plain slotted class: a frozen dataclass costs 3x to build, on every request.)"""

    __slots__ = ("mode", "observe", "refusals", "repeats", "request_id", "resolve_client", "scope")

    def __init__(
        self,
        request_id: str,
        mode: str,
        scope: Scope | None = None,
        resolve_client: Callable[[Scope], str | None] | None = None,
        observe: Callable[[str, dict[str, Any]], None] | None = None,
        refusals: LockedRefusals | None = None,
        repeats: RepeatedEvents | None = None,
    ) -> None:
        self.request_id = request_id
        self.mode = mode
        self.scope = scope
        self.resolve_client = resolve_client
        # The app's counter of events (metrics.Metrics.observe): each event is counted where it is logged.
        self.observe = observe
        # The app's tally of refusals held back during a lockout (None: every one is a line).
        self.refusals = refusals
        # The app's tally of events any client repeats at will (None: every one is a line).
        self.repeats = repeats

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


# The reason of a refusal for a lock (errors.Reason.LOCKED's error code; audit sits below errors).
LOCKED_REASON = "2fa_locked"
SUMMARY_EVENT = "code.rejected.suppressed"
SUMMARY_INTERVAL = 60.0
SUMMARY_CLIENTS = 8  # distinct addresses a summary names; refusals from others are only counted


class _Flood:
    __slots__ = ("client", "clients", "count", "mode", "others", "request_id", "until")

    def __init__(self, until: float) -> None:
        self.until = until
        self.count = 0
        self.client: str | None = None
        self.request_id: str | None = None
        self.mode: str | None = None
        self.clients: dict[str, None] = {}  # the first SUMMARY_CLIENTS addresses, in order seen
        self.others = 0  # refusals from any address beyond those

    def hold(self, record: dict[str, Any]) -> None:
        self.count += 1
        self.client, self.request_id, self.mode = record["client"], record["request_id"], record["mode"]
        client = record["client"]
        if client is None or client in self.clients:
            return
        if len(self.clients) < SUMMARY_CLIENTS:
            self.clients[client] = None
        else:
            self.others += 1


class LockedRefusals:
    """The refusals of a locked-out user's codes, held back and summed up (module docstring).

    At most ``capacity`` users are tracked at once; beyond that a refusal is logged in full
    (a log line too many, never a refusal unseen). The clock is injected for the tests."""

    def __init__(
        self,
        interval: float = SUMMARY_INTERVAL,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.capacity = capacity
        self.clock = clock
        self._floods: dict[str, _Flood] = {}

    def admit(self, user: str, record: dict[str, Any]) -> bool:
        """True when this refusal is to be logged; False when it was counted instead."""
        now = self.clock()
        flood = self._floods.get(user)
        if flood is not None and now < flood.until:
            flood.hold(record)
            return False
        if flood is not None:  # the window ended and no timer said so (no running loop)
            self._summarise(user)
        if len(self._floods) >= self.capacity:
            return True
        # The window: until the lock ends (the refusal's retry_after), at most the interval.
        retry_after = record.get("retry_after")
        window = self.interval
        if isinstance(retry_after, (int, float)) and 0 < retry_after < window:
            window = float(retry_after)
        self._floods[user] = _Flood(now + window)
        with contextlib.suppress(RuntimeError):  # no loop: the next refusal or the shutdown says it
            asyncio.get_running_loop().call_later(window, self._summarise, user)
        return True

    def _summarise(self, user: str) -> None:
        flood = self._floods.pop(user, None)
        if flood is None or flood.count == 0:
            return
        record = {
            "event": SUMMARY_EVENT,
            "user": user,
            "client": flood.client,
            "request_id": flood.request_id,
            "mode": flood.mode,
            "reason": LOCKED_REASON,
            "count": flood.count,
            "clients": ",".join(flood.clients),
            "other_client_refusals": flood.others,
        }
        _log_event(record)

    def flush(self) -> None:
        """Say every count held (at shutdown: a count is never lost with the process)."""
        for user in list(self._floods):
            self._summarise(user)


# Events any client can cause at will, with no attempt taken (module docstring).
REPEATED_EVENTS = frozenset({"csrf.refused", "identity.ambiguous", "enrolment.refused"})
REPEAT_BURST = 10
REPEAT_INTERVAL = 10.0
REPEAT_SUMMARY_EVENT = "audit.suppressed"


class _Window:
    __slots__ = ("flood", "seen")

    def __init__(self, until: float) -> None:
        self.seen = 0
        self.flood = _Flood(until)


class RepeatedEvents:
    """``REPEAT_BURST`` lines per ``REPEAT_INTERVAL`` for each (event, reason) of
    ``REPEATED_EVENTS``, then a count (module docstring). The keys are the code's own event
    names and reasons: a bounded set, whatever clients send. The clock is injected for tests."""

    def __init__(
        self, burst: int = REPEAT_BURST, interval: float = REPEAT_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def admit(self, record: dict[str, Any]) -> bool:
        """True when this event is to be logged; False when it was counted instead."""
        key = (record["event"], str(record.get("reason")))
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now >= window.flood.until:  # ended, and no timer said so
            self._summarise(key)
            window = None
        if window is None:
            window = self._windows[key] = _Window(now + self.interval)
            with contextlib.suppress(RuntimeError):  # no loop: the next event or the shutdown says it
                asyncio.get_running_loop().call_later(self.interval, self._summarise, key)
        window.seen += 1
        if window.seen <= self.burst:
            return True
        window.flood.hold(record)
        return False

    def _summarise(self, key: tuple[str, str]) -> None:
        window = self._windows.pop(key, None)
        if window is None or window.flood.count == 0:
            return
        flood = window.flood
        _log_event(
            {
                "event": REPEAT_SUMMARY_EVENT,
                "user": None,
                "client": flood.client,
                "request_id": flood.request_id,
                "mode": flood.mode,
                "suppressed_event": key[0],
                "reason": key[1],
                "count": flood.count,
                "clients": ",".join(flood.clients),
                "other_client_refusals": flood.others,
            }
        )

    def flush(self) -> None:
        """Say every count held (at shutdown)."""
        for key in list(self._windows):
            self._summarise(key)


def _log_event(record: dict[str, Any]) -> None:
    event = record["event"]
    shown = " ".join(f"{k}={_shown(k, v)}" for k, v in record.items() if k != "event")
    level = logging.WARNING if event in WARNING_EVENTS else logging.INFO
    log.log(level, "%s %s", event, shown, extra={"audit": record})


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
    refusals = context.refusals if context is not None else None
    repeats = context.repeats if context is not None else None
    held = event == "code.rejected" and fields.get("reason") == LOCKED_REASON
    if held and refusals is not None and user is not None:
        if refusals.admit(user, record):
            _log_event(record)
    elif event in REPEATED_EVENTS and repeats is not None:
        if repeats.admit(record):
            _log_event(record)
    else:
        _log_event(record)
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
        self.refusals = LockedRefusals()
        self.repeats = RepeatedEvents()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._flushing(send))
            return
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
        mode = self.mode_of(scope["path"])
        token = _current.set(
            Context(request_id, mode, scope, self.resolve_client, self.observe, self.refusals, self.repeats)
        )

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id if scope["type"] == "http" else send)
        finally:
            _current.reset(token)

    def _flushing(self, send: Send) -> Send:
        """The lifespan's ``send``: the counts held are logged before the app says it stopped."""

        async def flushing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self.refusals.flush()
                self.repeats.flush()
            await send(message)

        return flushing
