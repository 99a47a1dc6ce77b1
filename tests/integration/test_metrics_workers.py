"""Metrics with ``server.workers = 2``: the real ``gateway run``, requests of known kinds spread
over both workers, and every scrape (of either worker, and of the ``[metrics] listen`` listener
in the supervising process) adds them up exactly (gateway/metrics.py, metrics_export.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyotp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import config as config_module
from tests.support.servers import ROOT, UpstreamProcess, enrol, free_port, fresh_keys, gateway_process

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Requests of each kind, and what the decision says of them.
EXCLUDED = 24  # /public/*: allowed without identity, forwarded
NO_IDENTITY = 16  # no Remote-User: identity_required
NOT_ENROLLED = 8  # a user without a secret: 2fa_not_enrolled
WRONG_CODES = 3  # alice, a wrong code each (under limits.max_failures): 2fa_invalid
SCRAPES = 8


def samples_of(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def decisions(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("gateway_decisions_total", (("mode", "proxy"), ("reason", reason)))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess) -> Iterator[tuple[str, str, str]]:
    """``gateway run`` with 2 workers and a metrics listener; yields its URL, the listener's
    URL and alice's secret."""
    tmp = tmp_path_factory.mktemp("metrics-workers")
    port, listen = free_port(), free_port()
    path = tmp / "gateway.toml"
    path.write_text(
        f'[server]\nport = {port}\nworkers = 2\n\n[upstream]\nurl = "{upstream.url}"\n\n'
        f'[store]\nurl = "sqlite:///{tmp}/gateway.db"\n\n[session]\nsecure = false\n\n'
        f'[paths]\nexclude = ["/public/*"]\n\n[metrics]\nlisten = "127.0.0.1:{listen}"\n'
    )
    keys = fresh_keys()
    secret = enrol(config_module.load(path, env=keys), "alice")
    with gateway_process(path, port, keys, tmp / "output.log"):
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{listen}", secret


def _get(url: str, headers: dict[str, str]) -> int:
    # A client of its own, so a connection of its own: the kernel hands each to either worker.
    return httpx.get(url, headers=headers, timeout=10).status_code


def test_two_workers_count_every_request_once(two_workers: tuple[str, str, str]) -> None:
    url, listener, secret = two_workers
    wrong = "000000" if pyotp.TOTP(secret).now() != "000000" else "111111"
    calls: list[tuple[str, dict[str, str]]] = (
        [(url + "/public/x", {})] * EXCLUDED
        + [(url + "/app", {})] * NO_IDENTITY
        + [(url + "/app", {"Remote-User": "bob"})] * NOT_ENROLLED
        + [(url + "/app", {"Remote-User": "alice", "X-2FA-Code": wrong})] * WRONG_CODES
    )
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda call: _get(*call), calls))
    assert statuses.count(200) == EXCLUDED
    assert _get(url + "/app", {"Remote-User": "alice", "X-2FA-Code": pyotp.TOTP(secret).now()}) == 200

    scrapes = [httpx.get(url + "/_gateway/metrics", timeout=10).text for _ in range(SCRAPES)]
    scrapes.append(httpx.get(listener + "/metrics", timeout=10).text)
    for text in scrapes:
        samples = samples_of(text)
        # Each worker opened the store once: both workers' samples are in every scrape.
        assert samples[("gateway_store_latency_seconds_count", (("operation", "open"),))] == 2
        assert samples[decisions("excluded")] == EXCLUDED
        assert samples[decisions("identity_required")] == NO_IDENTITY
        assert samples[decisions("2fa_not_enrolled")] == NOT_ENROLLED
        assert samples[decisions("2fa_invalid")] == WRONG_CODES
        assert samples[decisions("code")] == 1
        assert samples[("gateway_code_checks_total", (("result", "invalid"),))] == WRONG_CODES
        assert samples[("gateway_code_checks_total", (("result", "accepted"),))] == 1
        assert samples[("gateway_upstream_latency_seconds_count", ())] == EXCLUDED + 1
        assert samples[("gateway_websockets_open", ())] == 0
        assert samples[("gateway_store_up", ())] == 1
        build = [value for (name, _), value in samples.items() if name == "gateway_build_info"]
        assert build == [1]  # one series, not one per worker


def _config(tmp: Path, port: int, upstream: str, listen: int) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(
        f'[server]\nport = {port}\n\n[upstream]\nurl = "{upstream}"\n\n'
        f'[store]\nurl = "sqlite:///{tmp}/gateway.db"\ncreate = "if_missing"\n\n'
        f'[paths]\nexclude = ["/public/*"]\n\n[metrics]\nlisten = "127.0.0.1:{listen}"\n'
    )
    return path


def test_one_worker_serves_its_own_registry_on_the_listener(tmp_path: Path, upstream: UpstreamProcess) -> None:
    port, listen = free_port(), free_port()
    with gateway_process(_config(tmp_path, port, upstream.url, listen), port, fresh_keys(), tmp_path / "out.log"):
        assert httpx.get(f"http://127.0.0.1:{port}/public/x", timeout=10).status_code == 200
        samples = samples_of(httpx.get(f"http://127.0.0.1:{listen}/metrics", timeout=10).text)
    assert samples[decisions("excluded")] == 1
    # The listener needs no trusted peer, so it is a listener of its own, not the app's route.
    assert samples[("gateway_store_latency_seconds_count", (("operation", "open"),))] == 1


def test_a_listener_address_in_use_stops_the_start_with_one_line(tmp_path: Path, upstream: UpstreamProcess) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = _config(tmp_path, free_port(), upstream.url, taken.getsockname()[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | fresh_keys()
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "--config", str(path)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert b"gateway: metrics.listen 127.0.0.1:" in done.stderr
    assert b"Address already in use" in done.stderr
    assert b"Traceback" not in done.stderr
