"""The benchmark's smoke run: ``python -m bench --quick`` on three row groups, tiny durations.

It keeps the benchmark command working (servers start, wrk runs, the table is written); it
asserts on what the table says happened, never on how fast (speed is for ``python -m bench``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.support.servers import ROOT

pytestmark = pytest.mark.integration


def _cells(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        if line.startswith(f"| {label}"):
            return [cell.strip() for cell in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r} in:\n{table}")


def test_the_quick_benchmark_runs_and_writes_its_table(tmp_path: Path) -> None:
    for binary in ("wrk", "nginx", "redis-server", "redis-cli"):
        need_binary(binary)
    out = tmp_path / "latest.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--rows", "A,1,5", "--duration", "0.5", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    assert table.startswith("## Benchmark (")
    assert "python -m bench --quick --rows A,1,5" in table
    for label in ("A. baseline", "1. gateway /auth", "5. gateway proxy mode, session, c64 |"):
        cells = _cells(table, label)
        requests = cells[1].replace(",", "")
        assert re.fullmatch(r"\d+", requests) and int(requests) > 0, cells
    # Each gateway row is set against its baseline from the same run.
    assert re.fullmatch(r"\d+\.\d+x A", _cells(table, "1. gateway /auth")[4])
    # The machine it ran on is part of the record.
    assert "cores" in table.lower() or "cpu" in table.lower(), table[-800:]
