"""What the soak found, from the load generator's results and the gauges scraped meanwhile: the
verdict (no unexpected answer; RSS, fds and tasks grown ≤ 10 % after warm-up) and the markdown
table. Pure: ``tests/test_soak.py`` feeds it made-up results."""

from __future__ import annotations

from typing import Any

from soak.stats import Growth, buckets, growth, percentile, window_median

Gauges = list[tuple[float, dict[str, float]]]  # (wall time, {"rss", "fds", "tasks"})

GROWTH_PERCENT = 10.0
# Absolute slack on top of the 10 % for the counts, a few units: the upstream connection pool
# keeps a varying number of idle keep-alive connections (and their fds) for a few seconds.
SLACK = {"rss": 0.0, "fds": 5.0, "tasks": 2.0}
_WINDOW = 10.0  # seconds of samples whose median is "the value" after warm-up and at the end
_SETTLE = 1.5  # seconds for the closed client connections to be closed on the gateway's side too


def verdicts(gauges: Gauges, results: dict[str, Any], bucket: float) -> list[Growth]:
    """RSS: its median over a window just after the first bucket of the run against its median
    over the same width at the end, both under load. Fds and tasks: their medians while no
    client connection is open, after warm-up and after the run (under load they count the
    requests in flight: a burst of slow answers is not a leak). The fds judged leave out the
    connections to the store and the upstream (``pools``, when the scrape counted them): each is
    a pool that keeps idle connections up to a configured bound (``store.max_connections``,
    ``upstream.max_connections``), as many as the busiest moment needed, for the upstream's 30 s
    keep-alive and for good on Redis, so their count follows the peak concurrency, not time. A
    connection leaked from a pool exhausts it (503s: unexpected answers), and the fault tests
    (tests/faults) count them per fault."""
    started, seconds = results["started"], results["seconds"]
    width = min(_WINDOW, bucket / 3)
    found = []
    for name, slack in SLACK.items():
        series = [(t, values[name]) for t, values in gauges if name in values]
        if name == "rss":
            warm = window_median(series, started + bucket, started + bucket + width)
            end = window_median(series, started + seconds - width, started + seconds)
        else:
            if name == "fds":  # the store's and the upstream's pools are bounded by the config
                series = [(t, values[name] - values.get("pools", 0.0)) for t, values in gauges if name in values]
            before, after = results["idle_before"], results["idle_after"]
            warm = window_median(series, before[0] + _SETTLE, before[1])
            end = window_median(series, after[0] + _SETTLE, after[1])
        found.append(growth(name, warm, end, GROWTH_PERCENT, slack))
    return found


def summarise(results: dict[str, Any], gauges: Gauges, bucket: float, judge_growth: bool = True) -> dict[str, Any]:
    """Everything the report shows; ``passed`` needs no unexpected answer and, when
    ``judge_growth``, no gauge over its limit (a short run shows growth without judging it)."""
    kinds: list[str] = results["kinds"]
    records: list[tuple[int, float, float]] = [(k, start, latency) for k, start, latency in results["records"]]
    overall = buckets([(start, latency) for _, start, latency in records], bucket)
    per_kind = {
        kind: buckets([(start, latency) for k, start, latency in records if k == i], bucket)
        for i, kind in enumerate(kinds)
    }
    latencies = {kind: [latency for k, _, latency in records if k == i] for i, kind in enumerate(kinds)}
    errors: dict[str, dict[str, Any]] = dict(results["errors"])
    for kind, count in results["skipped"].items():  # the open loop could not send it: the plan was short of users
        errors[f"{kind}: not sent (no user free)"] = {"count": count, "sample": "raise --code-users"}
    try:
        grown = verdicts(gauges, results, bucket)
        growth_problem = None
    except ValueError as exc:
        grown, growth_problem = [], str(exc)
    grew = growth_problem is not None or not all(g.ok for g in grown)
    passed = not errors and not (judge_growth and grew)
    return {
        "passed": passed,
        "capacity": results["capacity"],
        "rate": results["rate"],
        "seconds": results["seconds"],
        "bucket_seconds": bucket,
        "requests": len(records),
        "counts": {kind: len(values) for kind, values in latencies.items()},
        "unexpected": sum(entry["count"] for entry in errors.values()),
        "errors": errors,
        "latency": {
            kind: {"p50": percentile(values, 50), "p99": percentile(values, 99)} for kind, values in latencies.items()
        },
        "buckets": [vars(b) for b in overall],
        "buckets_by_kind": {kind: [vars(b) for b in found] for kind, found in per_kind.items()},
        "growth": [
            {"gauge": g.name, "warm": g.warm, "end": g.end, "limit": g.limit, "percent": g.percent, "ok": g.ok}
            for g in grown
        ],
        "growth_problem": growth_problem,
        "growth_judged": judge_growth,
        "fds_after": results.get("fds_after", {}),
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _value(name: str, value: float) -> str:
    return f"{value / 2**20:.1f} MiB" if name == "rss" else f"{value:.0f}"


def markdown(summary: dict[str, Any]) -> str:
    capacity = summary["capacity"]
    lines = [
        f"## Soak: {'PASSED' if summary['passed'] else 'FAILED'}",
        "",
        (f"Capacity as measured by this run: {capacity:.0f} requests/s; " if capacity else "")
        + f"driven at {summary['rate']:.0f} requests/s (open loop) for {summary['seconds']:.0f} s, "
        f"{summary['requests']} requests answered as expected, **{summary['unexpected']} unexpected**.",
        "",
        "| kind | requests | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for kind, count in summary["counts"].items():
        lat = summary["latency"][kind]
        lines.append(f"| {kind} | {count} | {_ms(lat['p50'])} | {_ms(lat['p99'])} |")
    if summary["errors"]:
        lines += ["", "| unexpected | count | sample |", "|---|---:|---|"]
        lines += [f"| {what} | {e['count']} | {e['sample']} |" for what, e in summary["errors"].items()]
    kinds = list(summary["counts"])
    lines += [
        "",
        f"p50 / p99 in ms per {summary['bucket_seconds']:.0f} s bucket (by scheduled start):",
        "",
        "| from s | requests | all | " + " | ".join(kinds) + " |",
        "|---:|---:|---:|" + "---:|" * len(kinds),
    ]
    for i, b in enumerate(summary["buckets"]):
        cells = []
        for kind in kinds:
            found = summary["buckets_by_kind"][kind]
            cells.append(f"{_ms(found[i]['p50'])} / {_ms(found[i]['p99'])}" if i < len(found) else "-")
        lines.append(
            f"| {b['start']:.0f} | {b['count']} | {_ms(b['p50'])} / {_ms(b['p99'])} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "RSS under load after the first bucket and at the end; fds and tasks with no client connection"
        " open, after warm-up and after the run (fds without the store's and the upstream's pools,"
        " which keep up to their configured bound: by peer below):",
        "",
        "| gauge | after warm-up | at the end | limit | growth | ok |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for g in summary["growth"]:
        name = g["gauge"]
        lines.append(
            f"| {name} | {_value(name, g['warm'])} | {_value(name, g['end'])} | {_value(name, g['limit'])} "
            f"| {g['percent']:+.1f} % | {'yes' if g['ok'] else 'NO'} |"
        )
    if not summary["growth_judged"]:
        lines.append("\nGrowth shown, not judged (--verdict errors): it needs the long run.")
    if summary["fds_after"]:
        by_peer = ", ".join(f"{kind} {count}" for kind, count in sorted(summary["fds_after"].items()))
        lines.append(f"\nThe gateway's fds at the end, by peer: {by_peer}")
    if summary["growth_problem"]:
        lines.append(f"\nno growth verdict: {summary['growth_problem']}")
    return "\n".join(lines)
