"""Run SECURITY.md's deployment checklist: every fenced block opened with ```` ```sh check: ID ````.

Each block runs in its own ``bash`` (``-e -u -o pipefail``), with this process's environment
(``GATEWAY_PUBLIC_URL``, ``GATEWAY_APP_URL``, ``GATEWAY_DIRECT_URL``, ``GATEWAY_CONFIG``, the
gateway's keys); exit 0 means the item holds. Prints ``PASS id`` or ``FAIL id`` and the block's
output per item; exits 1 if any item failed.

    python config/checks/security_checklist.py [SECURITY.md] [--only ID ...]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

BLOCK = re.compile(r"^```sh check: ([a-z0-9-]+)\n(.*?)^```$", re.M | re.S)
DEFAULT = Path(__file__).resolve().parents[2] / "SECURITY.md"
TIMEOUT = 60


def checks(text: str) -> dict[str, str]:
    """``{id: script}`` in the document's order; an id given twice is an error."""
    found: dict[str, str] = {}
    for match in BLOCK.finditer(text):
        if match.group(1) in found:
            raise ValueError(f"check {match.group(1)!r} is given twice")
        found[match.group(1)] = match.group(2)
    return found


def run(script: str) -> tuple[bool, str]:
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return False, f"no answer within {TIMEOUT} s"
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("document", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--only", nargs="*", default=None, help="run only these check ids")
    args = parser.parse_args(argv)
    failed = 0
    for name, script in checks(args.document.read_text("utf-8")).items():
        if args.only is not None and name not in args.only:
            continue
        ok, output = run(script)
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}")
        for line in output.splitlines():
            print(f"    {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
