"""gateway.metrics: the counters, their fixed label set, and the exposition served over ASGI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import httpx
import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from gateway import totp
from gateway.errors import ConfigError, Reason, StoreError
from gateway.metrics import MULTIPROC_ENV, MeasuredTransport, Metrics, measured_store, multiprocess_registry, version
from gateway.metrics_export import multiprocess_dir, start_listener
from gateway.store import Store
from tests.support.clock import Clock
from tests.support.inprocess import UPSTREAM, in_process
from tests.support.servers import (
    ROOT,
    GatewayServer,
    UpstreamProcess,
    free_port,
    fresh_keys,
    gateway_process,
    make_config,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(metrics: Metrics) -> Samples:
    """Every sample served, by name and labels, read back with Prometheus' own parser."""
    transport = httpx.ASGITransport(app=metrics.serve)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return samples_of(await client.get("/metrics"))


def samples_of(response: httpx.Response) -> Samples:
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST  # the text format Prometheus scrapes
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def decisions(mode: str, reason: Reason) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("gateway_decisions_total", (("mode", mode), ("reason", reason.value)))


async def test_a_decision_is_counted_by_mode_and_reason() -> None:
    metrics = Metrics()
    metrics.count("proxy", Reason.SESSION)
    metrics.count("proxy", Reason.SESSION)
    metrics.count("auth", Reason.LOCKED)
    samples = await scrape(metrics)
    assert samples[decisions("proxy", Reason.SESSION)] == 2
    assert samples[decisions("auth", Reason.LOCKED)] == 1
    assert samples[decisions("auth", Reason.SESSION)] == 0


async def test_the_series_are_fixed_before_any_request() -> None:
    """Every (mode, reason) pair exists from the start, and no label holds anything a request
    sent (a user, a path, a code): the series count cannot grow with traffic."""
    samples = await scrape(Metrics())
    counted = {labels for name, labels in samples if name == "gateway_decisions_total"}
    assert len(counted) == 2 * len(Reason)
    assert {key for labels in counted for key, _ in labels} == {"mode", "reason"}


async def test_readiness_is_a_gauge() -> None:
    metrics = Metrics()
    metrics.ready.set(1)
    assert (await scrape(metrics))[("gateway_store_up", ())] == 1


def test_an_unknown_mode_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        Metrics().count("other", Reason.SESSION)


async def test_two_apps_in_one_process_count_apart() -> None:
    first, second = Metrics(), Metrics()
    first.count("proxy", Reason.CODE)
    assert (await scrape(second))[decisions("proxy", Reason.CODE)] == 0


# -- the families an operator reads, fed by what the gateway does --------------------------------


def code_checks(result: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("gateway_code_checks_total", (("result", result),))


async def test_code_checks_lockouts_and_skew_are_counted_from_a_real_flow(tmp_path: Path) -> None:
    """Through the app: a code from the previous step (offset -1), its replay, wrong codes up to
    a lockout, then a refusal while locked; each counted once under its result."""
    clock = Clock()
    config = make_config(tmp_path, upstream=UPSTREAM, limits={"max_failures": 2})
    async with in_process(config, clock=clock) as gw:
        secret = await gw.enrol("alice")
        params = config.totp.params
        previous = totp.code_at(secret, totp.current_step(clock(), params) - 1, params)

        async def send(code: str) -> int:
            gw.client.cookies.clear()  # the code alone, never the session the first one opened
            r = await gw.client.get("/x", headers={"Remote-User": "alice", "X-2FA-Code": code})
            return r.status_code

        assert await send(previous) == 200
        assert await send(previous) == 401  # RFC 6238 §5.2: a code is accepted once
        wrong = "000000" if previous != "000000" else "111111"
        assert await send(wrong) == 429  # the second miss starts the lockout
        assert await send(previous) == 429  # locked: even a right code is refused
        samples = samples_of(await gw.client.get("/_gateway/metrics"))
    assert samples[code_checks("accepted")] == 1
    assert samples[code_checks("replayed")] == 1
    assert samples[code_checks("locked")] == 2  # the miss that started it, and the refusal after
    assert samples[code_checks("invalid")] == 0
    assert samples[("gateway_lockouts_total", (("scope", "user"),))] == 1
    assert samples[("gateway_totp_window_offset_total", (("offset", "-1"),))] == 1
    assert samples[("gateway_totp_window_offset_total", (("offset", "0"),))] == 0


def test_audit_events_map_to_their_families() -> None:
    metrics = Metrics()
    metrics.observe("code.rejected", {"reason": Reason.INVALID_CODE.value})
    metrics.observe("recovery_code.used", {})
    metrics.observe("enrolment.confirmed", {"sessions_ended": 0})
    metrics.observe("lockout.started", {"scope": "address", "seconds": 900})
    metrics.observe("session.opened", {})  # not a metric of its own: ignored
    assert metrics.code_checks["invalid"]._value.get() == 1
    assert metrics.code_checks["accepted"]._value.get() == 1
    assert metrics.recovery_codes_used._value.get() == 1
    assert metrics.enrolments._value.get() == 1
    assert metrics.lockouts["address"]._value.get() == 1


class FailingStore:
    def __init__(self, cause: BaseException) -> None:
        self.cause = cause

    async def ping(self) -> None:
        raise StoreError("down") from self.cause

    async def get_session(self, session_hash: str, now: float) -> str | None:
        return None


async def test_the_store_is_timed_by_operation_and_its_errors_counted_by_kind() -> None:
    metrics = Metrics()
    store = measured_store(cast(Store, FailingStore(TimeoutError())), metrics)
    assert await store.get_session("h", 0.0) is None
    with pytest.raises(StoreError):
        await store.ping()
    samples = await scrape(metrics)
    count = "gateway_store_latency_seconds_count"
    assert samples[(count, (("operation", "get_session"),))] == 1
    assert samples[(count, (("operation", "ping"),))] == 1
    assert samples[("gateway_store_errors_total", (("kind", "timeout"),))] == 1
    assert samples[("gateway_store_errors_total", (("kind", "connection"),))] == 0
    assert samples[("gateway_store_up", ())] == 0
    connection = measured_store(cast(Store, FailingStore(ConnectionRefusedError())), metrics)
    with pytest.raises(StoreError):
        await connection.ping()
    assert (await scrape(metrics))[("gateway_store_errors_total", (("kind", "connection"),))] == 1


class Refusing(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if request.url.path == "/refused":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(204)


async def test_the_upstream_is_timed_and_its_errors_counted_by_kind() -> None:
    metrics = Metrics()
    transport = MeasuredTransport(Refusing(), metrics)
    async with httpx.AsyncClient(transport=transport, base_url="http://up") as client:
        assert (await client.get("/ok")).status_code == 204
        for path, error in (("/timeout", httpx.ReadTimeout), ("/refused", httpx.ConnectError)):
            with pytest.raises(error):
                await client.get(path)
    samples = await scrape(metrics)
    assert samples[("gateway_upstream_latency_seconds_count", ())] == 1
    assert samples[("gateway_upstream_errors_total", (("kind", "timeout"),))] == 1
    assert samples[("gateway_upstream_errors_total", (("kind", "connect"),))] == 1


async def test_open_websockets_and_build_info() -> None:
    metrics = Metrics()
    with metrics.websocket_open(), metrics.websocket_open():
        assert (await scrape(metrics))[("gateway_websockets_open", ())] == 2
    samples = await scrape(metrics)
    assert samples[("gateway_websockets_open", ())] == 0
    assert samples[("gateway_build_info", (("version", version()),))] == 1


# -- the separate listener -------------------------------------------------------------------------


def test_the_listener_serves_the_registry_on_its_own_port() -> None:
    metrics = Metrics()
    metrics.count("auth", Reason.EXCLUDED)
    port = free_port()
    server = start_listener(f"127.0.0.1:{port}", metrics.registry)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert r.status_code == 200
    assert 'gateway_decisions_total{mode="auth",reason="excluded"} 1.0' in r.text


@pytest.mark.parametrize("listen", ["127.0.0.1", "nohost:", "http://127.0.0.1:9100", "[::1:9100"])
def test_a_listen_address_without_host_and_port_is_refused_at_load(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen: "):
        make_config(tmp_path, metrics={"listen": listen})


# -- what config/ ships ------------------------------------------------------------------------------

DASHBOARD = ROOT / "config" / "grafana" / "gateway-dashboard.json"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
_NAME = re.compile(r"\b(?:gateway|process)_[a-z0-9_]+")


def used_names() -> set[str]:
    """Every gateway_* series the dashboard's queries and the alert rules' expressions name."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load(ALERTS.read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert exprs
    return {name for expr in exprs for name in _NAME.findall(expr)}


def test_the_dashboard_and_the_alerts_use_only_series_a_real_gateway_serves(tmp_path: Path) -> None:
    server = GatewayServer(make_config(tmp_path, upstream="http://127.0.0.1:9")).start()
    try:
        r = httpx.get(server.url + "/_gateway/metrics", timeout=5)
    finally:
        server.stop()
    assert r.status_code == 200
    served = {sample.name for family in text_string_to_metric_families(r.text) for sample in family.samples}
    used = used_names()
    assert {"gateway_decisions_total", "gateway_store_latency_seconds_bucket", "gateway_store_up"} <= used
    assert used - served == set()


def test_every_family_is_on_the_dashboard() -> None:
    """Nothing measured goes unseen: each family the gateway serves is on a panel."""
    exposition = generate_latest(Metrics().registry).decode()
    # (each counter's _created timestamp is a family of its own to the parser: not one to graph)
    families = {f.name for f in text_string_to_metric_families(exposition) if not f.name.endswith("_created")}
    used = used_names()
    shown = {f for f in families if any(name == f or name.startswith(f + "_") for name in used)}
    assert families - shown == set()


# -- workers: prometheus-client's multiprocess mode ---------------------------------------------------

# A worker: the gateway's metrics in multiprocess mode (the variable is set before the library is
# imported, as for a spawned worker), one decision and one open WebSocket; it exits without
# closing it (a crash) unless told to wait.
_WORKER = """
import sys
from gateway.errors import Reason
from gateway.metrics import Metrics
metrics = Metrics()
metrics.count("proxy", Reason.SESSION)
metrics.websockets.inc()
print("counted", flush=True)
if sys.argv[1] == "wait":
    sys.stdin.read()
"""


def test_a_scrape_adds_up_the_workers_and_forgets_the_open_websockets_of_dead_ones(tmp_path: Path) -> None:
    with multiprocess_dir() as path:
        assert os.environ[MULTIPROC_ENV] == path
        env = {**os.environ}
        dead = subprocess.run([sys.executable, "-c", _WORKER, "exit"], env=env, capture_output=True, check=True)
        assert dead.stdout == b"counted\n"
        alive = subprocess.Popen(
            [sys.executable, "-c", _WORKER, "wait"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert alive.stdout is not None and alive.stdout.readline() == b"counted\n"
            text = generate_latest(multiprocess_registry(path)).decode()
        finally:
            alive.communicate(b"")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[decisions("proxy", Reason.SESSION)] == 2  # a counter keeps a dead worker's count
    assert samples[("gateway_websockets_open", ())] == 1  # only the live worker's connection
    assert not os.path.exists(path)  # removed when the gateway stops
    assert MULTIPROC_ENV not in os.environ


async def test_a_real_websocket_is_open_while_it_is_served(tmp_path: Path, upstream: UpstreamProcess) -> None:
    server = GatewayServer(make_config(tmp_path, upstream=upstream.url)).start()

    async def open_websockets() -> float:
        async with httpx.AsyncClient() as client:
            return samples_of(await client.get(server.url + "/_gateway/metrics"))[("gateway_websockets_open", ())]

    try:
        async with connect(f"ws://127.0.0.1:{server.port}/public/ws") as ws:
            assert await ws.recv() == "hello "
            assert await open_websockets() == 1
        for _ in range(200):  # the gateway's side ends just after the client's close
            if await open_websockets() == 0:
                break
            await asyncio.sleep(0.02)
        assert await open_websockets() == 0
    finally:
        server.stop()


# -- the process and its event loop ------------------------------------------------------------------

PROCESS_FAMILIES = {"process_resident_memory_bytes", "process_open_fds", "gateway_event_loop_tasks"}


@pytest.fixture(scope="module")
def gateway_and_listener(
    tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess
) -> Iterator[tuple[str, str]]:
    """``gateway run`` in a process of its own (its fds and tasks are its own), with a metrics
    listener; yields the URLs of its metrics route and of the listener."""
    tmp = tmp_path_factory.mktemp("metrics-process")
    port, listen = free_port(), free_port()
    path = tmp / "gateway.toml"
    path.write_text(
        f'[server]\nport = {port}\n\n[upstream]\nurl = "{upstream.url}"\n\n'
        f'[store]\nurl = "sqlite:///{tmp}/gateway.db"\n\n[session]\nsecure = false\n\n'
        f'[paths]\nexclude = ["/public/*"]\n\n[metrics]\nlisten = "127.0.0.1:{listen}"\n'
    )
    with gateway_process(path, port, fresh_keys(), tmp / "output.log"):
        yield f"http://127.0.0.1:{port}/_gateway/metrics", f"http://127.0.0.1:{listen}/metrics"


def _scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=5)
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _until(read: Callable[[], float], done: Callable[[float], bool], seconds: float = 5.0) -> float:
    """``read()`` until ``done`` holds of it or ``seconds`` pass; the last value."""
    deadline = time.monotonic() + seconds
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


@pytest.mark.parametrize("where", ["route", "listener"])
def test_the_process_and_its_event_loop_are_measured(gateway_and_listener: tuple[str, str], where: str) -> None:
    """Both scrapes see the serving process: the route runs on the loop, the listener on a
    thread of its own (it asks the loop to count its tasks)."""
    url = gateway_and_listener[0 if where == "route" else 1]
    samples = _scrape(url)
    assert samples[("process_resident_memory_bytes", ())] > 10 * 2**20  # a Python process with its imports
    assert samples[("process_open_fds", ())] >= 4  # stdio and the listening socket at least
    # The server's own tasks (uvicorn's main loop, the session watch, this scrape's request on
    # the route): a few, not none and not thousands.
    assert 1 <= samples[("gateway_event_loop_tasks", ())] < 100


def test_open_connections_show_as_open_fds(gateway_and_listener: tuple[str, str]) -> None:
    route, listener = gateway_and_listener
    before = _scrape(listener)[("process_open_fds", ())]
    port = int(route.split(":")[2].split("/")[0])
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
    try:
        during = _until(lambda: _scrape(listener)[("process_open_fds", ())], lambda fds: fds >= before + 5)
    finally:
        for sock in held:
            sock.close()
    assert during >= before + 5
    after = _until(lambda: _scrape(listener)[("process_open_fds", ())], lambda fds: fds <= before)
    assert after <= before  # each connection's fd is closed with it


def test_requests_in_flight_show_as_event_loop_tasks(
    gateway_and_listener: tuple[str, str], upstream: UpstreamProcess
) -> None:
    route, listener = gateway_and_listener
    base = route.removesuffix("/_gateway/metrics")
    tasks = ("gateway_event_loop_tasks", ())
    before = _scrape(listener)[tasks]
    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(httpx.get, base + "/public/slow?s=2", timeout=10) for _ in range(4)]
        during = _until(lambda: _scrape(listener)[tasks], lambda n: n >= before + 4)
        assert [f.result().status_code for f in slow] == [200] * 4
    assert during >= before + 4  # one task per request being served
    after = _until(lambda: _scrape(listener)[tasks], lambda n: n <= before)
    assert after <= before


def test_workers_leave_the_live_process_series_out() -> None:
    """With workers the scrape adds up files; process values would be one worker's: left out."""
    with multiprocess_dir():
        served = generate_latest(Metrics().registry).decode()
    single = generate_latest(Metrics().registry).decode()
    assert "process_open_fds" in single
    assert "process_open_fds" not in served
    assert "gateway_event_loop_tasks" not in served


async def test_the_loop_is_counted_on_itself_and_from_another_thread() -> None:
    metrics = Metrics()
    assert ("gateway_event_loop_tasks", ()) not in await scrape(metrics)  # no loop watched yet
    metrics.watch_event_loop()
    idle = [asyncio.create_task(asyncio.sleep(5)) for _ in range(3)]
    try:
        on_loop = (await scrape(metrics))[("gateway_event_loop_tasks", ())]
        from_thread = await asyncio.to_thread(generate_latest, metrics.registry)
    finally:
        for task in idle:
            task.cancel()
    assert on_loop >= 4  # the three sleeping and this test's own
    counted = [
        s.value
        for f in text_string_to_metric_families(from_thread.decode())
        for s in f.samples
        if s.name == "gateway_event_loop_tasks"
    ]
    assert len(counted) == 1 and counted[0] >= 4
