"""soak/: the schedule, percentiles, buckets and the growth verdict on made-up numbers, and one
short real run of ``python -m soak`` (every process it starts, stopped)."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from soak.report import Gauges, markdown, summarise, verdicts
from soak.run import main
from soak.stats import KINDS, MIX, buckets, cycle, growth, percentile, schedule, window_median


def test_a_cycle_holds_each_kind_as_often_as_its_weight_and_spreads_it() -> None:
    assert Counter(cycle(MIX)) == MIX
    assert cycle({"a": 1, "b": 3}) == ["b", "a", "b", "b"]  # not "a b b b": spread, not a run
    sessions = [i for i, kind in enumerate(cycle(MIX)) if kind == "session"]
    assert max(b - a for a, b in itertools.pairwise(sessions)) <= 5


def test_the_schedule_is_open_loop_at_the_rate() -> None:
    planned = schedule(4, 1.0, {"a": 1, "b": 1})
    assert planned == [(0.0, "a"), (0.25, "b"), (0.5, "a"), (0.75, "b")]
    assert len(schedule(150, 60)) == 9000
    with pytest.raises(ValueError):
        schedule(0, 10)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7
    assert math.isnan(percentile([], 50))


def test_buckets_are_by_start_time_and_keep_a_gap() -> None:
    found = buckets([(0.1, 1.0), (29.9, 3.0), (65.0, 2.0), (0.2, 2.0)], 30)
    assert [(b.start, b.count) for b in found] == [(0, 3), (30, 0), (60, 1)]
    assert (found[0].p50, found[0].p99) == (2.0, 3.0)
    assert math.isnan(found[1].p50)  # a stall shows as an empty bucket, not a missing one


def test_growth_is_ten_percent_plus_the_slack() -> None:
    assert growth("rss", 100, 110).ok
    assert not growth("rss", 100, 110.5).ok
    assert growth("fds", 40, 54, slack=10).ok  # 40 * 1.1 + 10 = 54
    assert not growth("fds", 40, 55, slack=10).ok
    assert growth("rss", 100, 80).percent == -20


def gauges(rss: list[float], fds: list[float] | None = None) -> Gauges:
    """One sample a second from t = 1000, the run itself from 1010 (see ``results``)."""
    fds = fds or [50.0] * len(rss)
    return [(1000.0 + i, {"rss": r, "fds": f, "tasks": 5.0}) for i, (r, f) in enumerate(zip(rss, fds, strict=True))]


def results(errors: dict[str, Any] | None = None, skipped: dict[str, int] | None = None) -> dict[str, Any]:
    """A 60 s run from t = 1010, idle 1004-1008 before it and 1072-1076 after it."""
    return {
        "capacity": 400.0,
        "rate": 200.0,
        "started": 1010.0,
        "seconds": 60,
        "idle_before": [1004.0, 1008.0],
        "idle_after": [1072.0, 1076.0],
        "kinds": list(KINDS),
        "records": [[i % len(KINDS), i * 0.01, 0.005] for i in range(6000)],
        "errors": errors or {},
        "skipped": skipped or {},
    }


def test_rss_is_compared_under_load_by_medians_after_warm_up_and_at_the_end() -> None:
    steady = [100.0] * 80
    steady[0:10] = [200.0] * 10  # warm-up above the rest: not growth
    steady[10 + 55] = 500.0  # one spike in the end window: the median ignores it
    assert all(g.ok for g in verdicts(gauges(steady), results(), 30))
    leaking = [100.0 + i for i in range(80)]  # one unit a second: +14 % from 30-40 s to 50-60 s of the run
    rss = next(g for g in verdicts(gauges(leaking), results(), 30) if g.name == "rss")
    assert (rss.warm, rss.end, rss.ok) == (144.5, 164.5, False)
    with pytest.raises(ValueError):
        window_median([(1.0, 1.0)], 2, 3)


def test_fds_are_compared_at_idle_not_under_load() -> None:
    busy = [40.0] * 10 + [300.0] * 62 + [40.0] * 8  # connections open only while the load runs
    assert next(g for g in verdicts(gauges([100.0] * 80, busy), results(), 30) if g.name == "fds").ok
    leaked = [40.0] * 10 + [300.0] * 62 + [60.0] * 8  # 20 left open after the run
    fds = next(g for g in verdicts(gauges([100.0] * 80, leaked), results(), 30) if g.name == "fds")
    assert (fds.warm, fds.end, fds.ok) == (40.0, 60.0, False)


def test_the_bounded_pools_are_left_out_of_the_fds_judged() -> None:
    # 40 fds at idle before, 70 after: 30 more pooled connections to the store and the upstream
    # (kept because the busiest moment needed them) pass; 30 more of anything else do not.
    samples = gauges([100.0] * 80, [40.0] * 10 + [300.0] * 62 + [70.0] * 8)
    pooled = [(t, {**v, "pools": 10.0 if t < 1010 else 40.0}) for t, v in samples]
    fds = next(g for g in verdicts(pooled, results(), 30) if g.name == "fds")
    assert (fds.warm, fds.end, fds.ok) == (30.0, 30.0, True)
    unpooled = [(t, {**v, "pools": 10.0}) for t, v in samples]
    fds = next(g for g in verdicts(unpooled, results(), 30) if g.name == "fds")
    assert (fds.warm, fds.end, fds.ok) == (30.0, 60.0, False)


def test_a_clean_run_passes_and_any_unexpected_answer_fails_it() -> None:
    flat = gauges([100.0] * 80)
    clean = summarise(results(), flat, 30)
    assert clean["passed"] and clean["unexpected"] == 0
    assert clean["counts"]["websocket"] == 6000 // len(KINDS)
    assert [b["count"] for b in clean["buckets"]] == [3000, 3000]
    assert "## Soak: PASSED" in markdown(clean)

    error = {"session: status 503": {"count": 2, "sample": "/echo/app -> 503 store_unavailable"}}
    failed = summarise(results(errors=error), flat, 30)
    assert not failed["passed"] and failed["unexpected"] == 2
    assert "/echo/app -> 503 store_unavailable" in markdown(failed)

    short = summarise(results(skipped={"code": 3}), flat, 30)
    assert not short["passed"] and short["unexpected"] == 3

    unmeasured = summarise(results(), [], 30)  # no gauge at all: no verdict, no pass
    assert not unmeasured["passed"] and unmeasured["growth_problem"]

    grown = gauges([100.0] * 50 + [150.0] * 30)  # RSS +50 % between warm-up and the end
    assert not summarise(results(), grown, 30)["passed"]
    shown = summarise(results(), grown, 30, judge_growth=False)  # --verdict errors
    assert shown["passed"] and not shown["growth"][0]["ok"]
    assert not summarise(results(errors=error), grown, 30, judge_growth=False)["passed"]


def test_a_short_real_soak_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "soak.json"
    # Growth is judged by the unit tests above; 5 s is all warm-up (RSS still climbs), so here it
    # is measured and shown, and every answer is judged.
    argv = ["--seconds", "5", "--rate", "40", "--bucket", "2", "--code-users", "100", "--download-bytes", "65536"]
    argv += ["--verdict", "errors"]
    status = main([*argv, "--out", str(out)])
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["errors"] == {}, printed
    assert status == 0, printed
    assert summary["requests"] == 200  # 40/s for 5 s, every one answered as expected
    assert set(summary["counts"]) == set(KINDS) and all(summary["counts"].values())
    assert {g["gauge"] for g in summary["growth"]} == {"rss", "fds", "tasks"}
    assert all(g["warm"] > 0 and g["end"] > 0 for g in summary["growth"])  # each gauge was scraped
    assert "## Soak: PASSED" in printed
