"""bench/rotate_scale.py's quick version: 10,000 users seeded with ``redis-cli --pipe``, rotated by
``gateway.admin.rotate_keys`` and rotated again (a few seconds; the 1,000,000-user figure in the
README is ``python -m bench.rotate_scale``)."""

from __future__ import annotations

import io
from pathlib import Path

from bench.rotate_scale import measure
from tests.conftest import need_binary


def test_rotating_ten_thousand_users_then_rerunning(tmp_path: Path) -> None:
    need_binary("redis-cli")
    figures = measure(10_000, tmp_path, progress=io.StringIO())
    assert figures.summary.startswith("rotated 10000, already current 0")
    assert figures.rerun_summary.startswith("rotated 0, already current 10000")  # a rerun rewrites nothing
