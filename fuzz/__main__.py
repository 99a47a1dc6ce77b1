"""``python -m fuzz TARGET|all --seconds N [--jobs J] [--corpus DIR] [-- libFuzzer flags]``.

Each target runs in its own process (``fuzz/run.py``) for ``--seconds`` (libFuzzer's
``-max_total_time``), from its seed corpus ``fuzz/corpus/<target>/`` (read, never written) and
a working corpus: a temporary directory, or ``--corpus DIR/<target>`` to keep what was found
for the next run. A crash input is written by libFuzzer's ``-artifact_prefix`` to
``tests/fuzz_cases/<target>/crash-<sha1>``, where ``tests/test_fuzz_cases.py`` replays it on
every test run. The exit status is 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "corpus"
CASES = ROOT / "tests" / "fuzz_cases"


def command(target: str, seconds: int, corpus: Path, extra: list[str]) -> list[str]:
    artifacts = CASES / target
    artifacts.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        "-m",
        "fuzz.run",
        target,
        f"-max_total_time={seconds}",
        f"-artifact_prefix={artifacts}/",
        "-timeout=10",  # one input taking 10 s is a hang: saved as timeout-<sha1>
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        *extra,
        str(corpus),
        str(SEEDS / target),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", help=f"one of {', '.join(TARGETS)}, or all")
    parser.add_argument("--list", action="store_true", help="list the targets and what each checks")
    parser.add_argument("--seconds", type=int, default=60, help="how long each target runs (default 60)")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at the same time with 'all' (default 1)")
    parser.add_argument("--corpus", type=Path, help="keep the working corpus here (DIR/<target>), not in a temp dir")
    parser.epilog = "Flags after -- go to libFuzzer as they are, e.g. -- -jobs=4 -workers=4 -max_len=4096."
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    if args.list:
        for name, function in TARGETS.items():
            print(f"{name:16} {(function.__doc__ or '').split(chr(10))[0]}")
        return 0
    if args.target not in (*TARGETS, "all"):
        parser.error(f"TARGET must be one of {', '.join(TARGETS)} or all")
    names = list(TARGETS) if args.target == "all" else [args.target]
    with tempfile.TemporaryDirectory(prefix="gateway-fuzz-") as scratch:
        failed = _run_all(names, args, Path(scratch), extra)
    for message in failed:
        print(f"fuzz: {message}")
    return 1 if failed else 0


def _run_all(names: list[str], args: argparse.Namespace, scratch: Path, extra: list[str]) -> list[str]:
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen[bytes], set[Path]]] = {}
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            name = pending.pop(0)
            corpus = (args.corpus or scratch) / name
            corpus.mkdir(parents=True, exist_ok=True)
            before = set((CASES / name).glob("*"))
            log = (scratch / f"{name}.log").open("wb")
            print(f"fuzz: {name} for {args.seconds} s", flush=True)
            # libFuzzer's -jobs writes fuzz-<n>.log into the working directory: the corpus's
            # parent, never the checkout. The checkout is on the path for `-m fuzz.run`.
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            # libFuzzer's -jobs/-fork start workers by running its argv[0] again: a script that
            # starts this interpreter on this target (fuzz/run.py hands it to libFuzzer).
            launcher = corpus.parent / f"run-{name}.sh"
            launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fuzz.run {name} "$@"\n')
            launcher.chmod(0o755)
            env["GATEWAY_FUZZ_LAUNCHER"] = str(launcher)
            process = subprocess.Popen(
                command(name, args.seconds, corpus, extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=corpus.parent,
                env=env,
            )
            log.close()
            running[name] = (process, before)
        time.sleep(0.2)
        for name, (process, before) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            output = (scratch / f"{name}.log").read_text("utf-8", "replace")
            stats = [
                line for line in output.splitlines() if line.startswith(("stat::number_of_executed_units", "Done "))
            ]
            new = sorted(set((CASES / name).glob("*")) - before)
            if process.returncode != 0 or new:
                print(output[-6000:], flush=True)
                if new:
                    saved = ", ".join(str(path.relative_to(ROOT)) for path in new)
                    failed.append(f"{name} FAILED: saved {saved} (tests/test_fuzz_cases.py replays it)")
                else:
                    failed.append(f"{name} FAILED: exit status {process.returncode}, no input saved (see above)")
            else:
                print(f"fuzz: {name} ok: {'; '.join(stats) or 'done'}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
