"""One fuzz target under atheris, in a process of its own: ``python -m fuzz.run TARGET
[libFuzzer flags] CORPUS_DIR...``. ``python -m fuzz`` builds this command line; run it by hand
only to pass libFuzzer something the wrapper does not."""

from __future__ import annotations

import logging
import os
import sys

import atheris

# Instrumented for coverage: the gateway and the libraries whose parsing it relies on. They
# must be imported for the first time inside this block.
with atheris.instrument_imports(include=["gateway", "fuzz", "jwt", "starlette", "python_multipart"]):
    from fuzz.targets import TARGETS, run_one


def main() -> None:
    name = sys.argv[1]
    target = TARGETS[name]

    def test_one_input(data: bytes) -> None:
        run_one(target, data)

    # The audit trail and the decision's "denying" log would print a line per input. A logged
    # unexpected error still shows: each target checks the answer it leads to (a 5xx, a denial).
    logging.disable(logging.CRITICAL)
    # argv[0] is what libFuzzer runs again for -jobs/-fork: python -m fuzz's launcher script.
    argv0 = os.environ.get("GATEWAY_FUZZ_LAUNCHER", sys.argv[0])
    atheris.Setup([argv0, *sys.argv[2:]], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
