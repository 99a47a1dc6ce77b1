"""``python -m bench [--quick] [--rows A,B,1,...]``: start everything, measure, print one table
and write it, with the machine it ran on, to bench/results/latest.md."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench.harness import Bench, Settings
from bench.procs import ROOT, UVICORN_FLAGS, progress
from bench.report import Row, evaluate, machine, table
from bench.rows import GROUPS, original_versions

RESULTS = ROOT / "bench" / "results" / "latest.md"
QUICK = Settings(duration=1.0, warmup=1.0, stream_bytes=64 << 20, scale_users=10_000, verifications=200)
FULL = Settings()
_PACKAGE_OF = {
    "wrk": "wrk",
    "nginx": "nginx",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "curl": "curl",
}
_REDIS = ("redis-server", "redis-cli")
_TOOLS_OF = {
    "A": ("wrk",),
    "B": ("wrk", "nginx"),
    "1": ("wrk", *_REDIS),
    "2": ("wrk", *_REDIS),
    "3": _REDIS,
    "4": ("wrk", "nginx", *_REDIS),
    "5": ("wrk", "nginx", *_REDIS),
    "6": ("curl", "nginx", *_REDIS),
    "7": ("wrk",),
    "8": ("wrk", *_REDIS),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 s per row, 64 MiB streams, 10k users")
    parser.add_argument(
        "--rows", default=",".join(GROUPS), help=f"comma-separated row groups, from {','.join(GROUPS)} (default: all)"
    )
    parser.add_argument("--duration", type=float, help="seconds per measured row (default 10, quick 1)")
    parser.add_argument("--stream-mib", type=int, help="size of the row 6 transfers (default 1024, quick 64)")
    parser.add_argument("--users", type=int, help="enrolled users in row 8's large case (default 1,000,000)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the table (default {RESULTS})")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    return Settings(
        duration=args.duration if args.duration is not None else base.duration,
        warmup=base.warmup,
        stream_bytes=(args.stream_mib << 20) if args.stream_mib else base.stream_bytes,
        scale_users=args.users if args.users else base.scale_users,
        verifications=base.verifications,
    )


def _missing_prerequisites(groups: list[str]) -> list[str]:
    tools = sorted({tool for group in groups for tool in _TOOLS_OF[group]})
    missing = [f"{tool} (apt-get install {_PACKAGE_OF[tool]})" for tool in tools if not shutil.which(tool)]
    missing += [
        f"the Python module {m} (pip install 'uvicorn[standard]')"
        for m in ("uvloop", "httptools")
        if importlib.util.find_spec(m) is None
    ]
    return missing


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    groups = [g.strip() for g in args.rows.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        print(
            f"bench: unknown row group(s) {', '.join(unknown) or '(none)'}; choose from {','.join(GROUPS)}",
            file=sys.stderr,
        )
        return 2
    missing = _missing_prerequisites(groups)
    if missing:
        print("bench: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    settings = _settings(args)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    workdir.chmod(0o755)  # nginx workers read the sparse file under it
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with it ignored
    bench = Bench(settings, workdir)
    errors: list[str] = []
    try:
        for group in sorted(groups, key=list(GROUPS).index):
            progress(f"row group {group}")
            try:
                GROUPS[group](bench)
            except Exception as exc:
                traceback.print_exc()
                errors.append(group)
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                note = lines[0] + (f" … {lines[-1].strip()}" if len(lines) > 1 else "")
                bench.add(Row(f"{group}-error", f"{group}. (failed)", notes=[note], failed=True))
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every server", file=sys.stderr)
        return 130
    finally:
        bench.procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if args.keep or errors:
            print(f"bench: work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = bench.rows
    evaluate(rows)
    text = table(list(rows.values()))
    print(text)
    _write(args.out, text, settings, started, args, "7" in groups)
    progress(f"written to {args.out}")
    if errors or any(row.failed for row in rows.values()):
        return 1
    return 0


def _write(
    out: Path, text: str, settings: Settings, started: str, args: argparse.Namespace, with_original: bool
) -> None:
    command = (
        "python -m bench"
        + (" --quick" if args.quick else "")
        + (f" --rows {args.rows}" if args.rows != ",".join(GROUPS) else "")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "\n".join(
            [
                f"## Benchmark ({started})",
                "",
                f"`{command}`: wrk 1 thread, 32 connections unless a row says otherwise, `--latency`, "
                f"{settings.duration:g} s per row after a {settings.warmup:g} s warm-up; every Python server is one "
                f"uvicorn worker with `{' '.join(UVICORN_FLAGS)}`; nginx one worker; all on loopback. "
                "Ratios are against rows of the same run.",
                "",
                text,
                "",
                *machine(original_versions() if with_original else None),
                "",
            ]
        )
    )
