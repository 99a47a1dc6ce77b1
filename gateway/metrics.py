"""Prometheus metrics: the families, what feeds them, and the exposition served over ASGI.

Served at ``routes.metrics`` to trusted, unrelayed peers only (traffic patterns are nobody else's
business), and on ``[metrics] listen`` when set (``metrics_export.py``). No label ever carries a
user id, a path, an address or a code: the series count is fixed by the code, not by traffic.

What feeds them, each fact counted where it is already stated once:

* decisions: ``app.counted`` around the one decision;
* code checks, lockouts, enrolments, recovery-code uses, TOTP clock skew: the audit events
  (``gateway/audit.py``), through :meth:`Metrics.observe`, so a metric and its log line can
  never disagree;
* the store: :class:`MeasuredStore`, a wrapper the composition root puts around it;
* the upstream: :class:`MeasuredTransport`, around the httpx transport the forwarder uses;
* open WebSockets: :meth:`Metrics.websocket_open` around each WebSocket connection.

With ``server.workers > 1`` every worker writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, set up by
``metrics_export.prepare_multiprocess_dir`` before the workers start) and a scrape of any
worker adds them up (``MultiProcessCollector``). Gauges say how: open WebSockets are summed
over the live workers, readiness is the most recent check, build info the same on all.

The process itself, for a soak or a 3 a.m. page (is it leaking?): prometheus-client's
``ProcessCollector`` (``process_resident_memory_bytes``, ``process_open_fds``, CPU seconds, ...)
and ``gateway_event_loop_tasks``, the asyncio tasks of the serving loop, counted at each scrape.
Both are read live from this process, so with ``server.workers > 1`` they are left out: the
multiprocess files hold only what was written to them, and prometheus-client does not support
process metrics there (a per-worker series would be a pid label that changes on every restart).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.metadata
import inspect
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import Receive, Scope, Send

from gateway.errors import Reason, StoreError
from gateway.responses import send_response
from gateway.store import Store

# prometheus-client's own switch (read by the library when it is first imported): set only by
# the serving code for workers > 1, never by the operator's config.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# A refused code's reason, as the code-check result it counts under.
_REFUSED_RESULTS = {
    Reason.INVALID_CODE.value: "invalid",
    Reason.REPLAYED_CODE.value: "replayed",
    Reason.LOCKED.value: "locked",
    Reason.NOT_ENROLLED.value: "not_enrolled",
    Reason.ALREADY_ENROLLED.value: "already_enrolled",
}
CODE_RESULTS = ("accepted", *_REFUSED_RESULTS.values())
LOCKOUT_SCOPES = ("user", "address")
STORE_ERROR_KINDS = ("timeout", "connection", "error")
UPSTREAM_ERROR_KINDS = ("timeout", "pool_timeout", "connect", "error")
# Seconds. A store call is a round trip on a LAN (~0.2-2 ms); the upstream is an app.
_STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds a scrape from another thread (the metrics listener) waits for the loop to count its
# tasks; a loop that cannot answer in this time is blocked, and the sample is left out.
_TASKS_WAIT = 1.0


def version() -> str:
    try:
        return importlib.metadata.version("gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        # One registry per app: tests start several gateways in one process.
        self.registry = r = CollectorRegistry()
        decisions = Counter(
            "gateway_decisions", "Access decisions, by mode and reason.", ["mode", "reason"], registry=r
        )
        # Children resolved once: counting a request is one dict lookup and one add.
        self.decisions = {
            (mode, reason): decisions.labels(mode, reason.value) for mode in ("proxy", "auth") for reason in Reason
        }
        checks = Counter("gateway_code_checks", "Codes and recovery codes judged, by result.", ["result"], registry=r)
        self.code_checks = {result: checks.labels(result) for result in CODE_RESULTS}
        lockouts = Counter("gateway_lockouts", "Lockouts started, by scope (user or address).", ["scope"], registry=r)
        self.lockouts = {scope: lockouts.labels(scope) for scope in LOCKOUT_SCOPES}
        self.enrolments = Counter("gateway_enrolments", "Enrolments confirmed (a new authenticator).", registry=r)
        self.recovery_codes_used = Counter("gateway_recovery_codes_used", "Recovery codes accepted.", registry=r)
        # RFC 6238 §5.2 / §6: a code is accepted within ±window steps; which step it came from
        # shows a phone (or this server) whose clock drifts.
        window_offset = Counter(
            "gateway_totp_window_offset",
            "Accepted TOTP codes by the time step they were for, relative to the server's (-1, 0, +1).",
            ["offset"],
            registry=r,
        )
        self._window_offset = window_offset  # totp.window may be wider than ±1: its labels are made on use
        self.window_offsets = {offset: window_offset.labels(str(offset)) for offset in (-1, 0, 1)}
        self.store_latency = Histogram(
            "gateway_store_latency_seconds",
            "Store calls, by operation.",
            ["operation"],
            buckets=_STORE_BUCKETS,
            registry=r,
        )
        store_errors = Counter("gateway_store_errors", "Store calls that failed, by kind.", ["kind"], registry=r)
        self.store_errors = {kind: store_errors.labels(kind) for kind in STORE_ERROR_KINDS}
        self.upstream_latency = Histogram(
            "gateway_upstream_latency_seconds",
            "Time from sending a request upstream to its response head.",
            buckets=_UPSTREAM_BUCKETS,
            registry=r,
        )
        upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream requests that got no response, by kind.", ["kind"], registry=r
        )
        self.upstream_errors = {kind: upstream_errors.labels(kind) for kind in UPSTREAM_ERROR_KINDS}
        self.websockets = Gauge(
            "gateway_websockets_open",
            "WebSocket connections being served (handshake to close).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.ready = Gauge(
            "gateway_store_up",
            "1 when the store answered when opened and at the last readiness check, else 0.",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        build = Gauge(
            "gateway_build_info",
            "The gateway's version; always 1.",
            ["version"],
            multiprocess_mode="livemax",
            registry=r,
        )
        build.labels(version()).set(1)
        self.event_loop = EventLoopCollector()
        if self.multiprocess_dir is None:  # live values of this process: see the module docstring
            ProcessCollector(registry=r)
            r.register(self.event_loop)
        self._scraped = self.registry if self.multiprocess_dir is None else multiprocess_registry(self.multiprocess_dir)

    def count(self, mode: str, reason: Reason) -> None:
        self.decisions[(mode, reason)].inc()

    def observe(self, event: str, fields: Mapping[str, Any]) -> None:
        """Count one audit event (``gateway.audit.audit``): the events are the one statement of
        what happened to a code, a lockout or an enrolment."""
        if event == "code.accepted":
            self.code_checks["accepted"].inc()
            offset = fields.get("window_offset")
            if isinstance(offset, int):
                counter = self.window_offsets.get(offset) or self._window_offset.labels(str(offset))
                counter.inc()
        elif event == "recovery_code.used":
            self.code_checks["accepted"].inc()
            self.recovery_codes_used.inc()
        elif event == "code.replayed":
            self.code_checks["replayed"].inc()
        elif event == "code.rejected":
            self.code_checks[_REFUSED_RESULTS.get(str(fields.get("reason")), "invalid")].inc()
        elif event == "lockout.started":
            scope = fields.get("scope")
            self.lockouts["address" if scope == "address" else "user"].inc()
        elif event == "enrolment.confirmed":
            self.enrolments.inc()

    def watch_event_loop(self) -> None:
        """Count the tasks of the running loop from now on (called once it serves: the lifespan)."""
        self.event_loop.loop = asyncio.get_running_loop()

    @contextmanager
    def websocket_open(self) -> Iterator[None]:
        self.websockets.inc()
        try:
            yield
        finally:
            self.websockets.dec()

    def scrape_registry(self) -> CollectorRegistry:
        """What a scrape reads: this process's registry, or every worker's files."""
        return self._scraped

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.scrape_registry())
        await send_response(send, 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], body)


class EventLoopCollector(Collector):
    """``gateway_event_loop_tasks``: the asyncio tasks of the serving loop at scrape time (each
    request, WebSocket relay and background job is one; a number that only grows is a leak).
    Left out until a loop is watched, after it closes, and when it is too busy to answer."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def collect(self) -> Iterable[Metric]:
        loop = self.loop
        count = None if loop is None or loop.is_closed() else _count_tasks(loop)
        if count is None:
            return []
        return [GaugeMetricFamily("gateway_event_loop_tasks", "asyncio tasks of the serving event loop.", count)]


def _count_tasks(loop: asyncio.AbstractEventLoop) -> int | None:
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:  # a scrape of routes.metrics: on the loop itself
        return len(asyncio.all_tasks(loop))
    # Another thread (the metrics listener): asyncio's task set belongs to the loop's thread
    # (all_tasks from outside races the loop adding and removing tasks), so the loop counts.
    counted: concurrent.futures.Future[int] = concurrent.futures.Future()

    def count() -> None:
        if counted.set_running_or_notify_cancel():
            counted.set_result(len(asyncio.all_tasks(loop)))

    try:
        loop.call_soon_threadsafe(count)
    except RuntimeError:  # closed in the meantime
        return None
    try:
        return counted.result(timeout=_TASKS_WAIT)
    except concurrent.futures.TimeoutError:
        counted.cancel()
        return None


class WorkersCollector(Collector):
    """Every worker's samples, read from the files under ``path`` at each scrape; the live
    gauges of workers that are gone (a crash, a restart) are dropped first, so their open
    WebSockets no longer count. Counters and histograms keep what a gone worker counted."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.collector = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        _forget_dead_workers(self.path)
        metrics: Iterable[Metric] = self.collector.collect()  # type: ignore[no-untyped-call]
        return metrics


def multiprocess_registry(path: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(WorkersCollector(path))
    return registry


def _forget_dead_workers(path: str) -> None:
    for name in os.listdir(path):
        if name.startswith("gauge_live") and name.endswith(".db"):
            pid = name.rpartition("_")[2].removesuffix(".db")
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):  # another worker's scrape got there first
                    os.remove(os.path.join(path, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the store and the upstream, measured ------------------------------------------------------------


def _store_error_kind(exc: StoreError) -> str:
    cause = exc.__cause__
    if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
        return "timeout"
    if isinstance(cause, (ConnectionError, OSError)) or "Connection" in type(cause).__name__:
        return "connection"
    return "error"


class MeasuredStore:
    """A store whose every call is timed (``gateway_store_latency_seconds{operation}``) and
    whose failures are counted by kind (``gateway_store_errors_total``); it answers as the
    store it wraps, errors included."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if not inspect.iscoroutinefunction(method):
            return method
        latency = self._metrics.store_latency.labels(name)
        errors = self._metrics.store_errors
        # Opening the store and the readiness ping say whether it is up (from start-up on, so
        # the gauge means something before the first readiness probe).
        up = self._metrics.ready if name in ("open", "ping") else None

        async def measured(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = await method(*args, **kwargs)
            except StoreError as exc:
                errors[_store_error_kind(exc)].inc()
                if up is not None:
                    up.set(0)
                raise
            finally:
                latency.observe(time.perf_counter() - start)
            if up is not None:
                up.set(1)
            return result

        self.__dict__[name] = measured  # resolved once per operation
        return measured


def measured_store(store: Store, metrics: Metrics) -> Store:
    return cast(Store, MeasuredStore(store, metrics))


class MeasuredTransport(httpx.AsyncBaseTransport):
    """The forwarder's transport, timed to each response head; requests that got no response
    are counted by kind. The exceptions go on unchanged (``proxy.py`` translates them)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, metrics: Metrics) -> None:
        self.transport = transport
        self.latency = metrics.upstream_latency
        self.errors = metrics.upstream_errors

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        start = time.perf_counter()
        try:
            response = await self.transport.handle_async_request(request)
        except httpx.PoolTimeout:
            self.errors["pool_timeout"].inc()
            raise
        except httpx.TimeoutException:
            self.errors["timeout"].inc()
            raise
        except (httpx.ConnectError, ConnectionError):
            self.errors["connect"].inc()
            raise
        except (httpx.TransportError, OSError):
            self.errors["error"].inc()
            raise
        self.latency.observe(time.perf_counter() - start)
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()
