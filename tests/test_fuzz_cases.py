"""Every saved fuzz input replayed through its target (``fuzz/targets.py``), without atheris:
the seed corpora (``fuzz/corpus/<target>/``) and each crash input ``python -m fuzz`` saved
(``tests/fuzz_cases/<target>/crash-<sha1>``). A crash that was fixed stays fixed: the case
fails again if the gateway regresses, or if a target's invariant breaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.targets import TARGETS, run_one

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (ROOT / "fuzz" / "corpus", ROOT / "tests" / "fuzz_cases")
CASES = sorted(
    (target, path)
    for source in SOURCES
    for target in TARGETS
    for path in (source / target).glob("*")
    if path.is_file() and not path.name.startswith(".")
)


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.parent.parent.name}/{p.name}" for t, p in CASES])
def test_saved_input_passes_its_target(target: str, path: Path) -> None:
    run_one(TARGETS[target], path.read_bytes())


def test_every_target_has_a_seed_corpus() -> None:
    seeded = {target for target, path in CASES if path.is_relative_to(SOURCES[0])}
    assert seeded == set(TARGETS)


def test_saved_cases_belong_to_a_target() -> None:
    # A crash input left in a directory no target replays would be a regression test that never runs.
    for source in SOURCES:
        assert {p.name for p in source.iterdir() if p.is_dir()} <= set(TARGETS), source


def test_a_broken_invariant_fails_the_replay() -> None:
    # The replay must be able to fail: an input a target refuses is not swallowed by run_one.
    def target(data: bytes) -> None:
        assert data != b"boom", "invariant"

    with pytest.raises(AssertionError):
        run_one(target, b"boom")
