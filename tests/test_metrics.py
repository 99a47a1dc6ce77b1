"""gateway.metrics: the counters, their fixed label set, and the exposition served over ASGI."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import Reason
from gateway.metrics import Metrics


async def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample served, by name and labels, read back with Prometheus' own parser."""
    transport = httpx.ASGITransport(app=metrics.serve)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.get("/metrics")
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
