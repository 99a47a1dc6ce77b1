"""README.md says what to type; these tests hold it to that.

* The quick start's run command and its test command use different venvs, and ``.ci/run``
  runs the README's test command verbatim (issue 12 §2.1: the checks reinstalled the package
  into the venv a running demo used, and every page of the demo answered 500).
* The curl walk-through runs as written, with bash, against a real ``gateway demo`` (§2.2).
* The errors table lists every ``error`` code the gateway can send, and nothing else (§2.2).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import DENIALS
from tests.conftest import need_binary
from tests.support.servers import ROOT, free_port, wait_for_port

README = (ROOT / "README.md").read_text("utf-8")
CI_RUN = (ROOT / ".ci" / "run").read_text("utf-8")


def section(title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert match is not None, f"README.md has no '## {title}' section"
    return match.group(1)


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)


def _venv(command: str) -> str:
    """The venv directory a command runs from (``.venv/bin/x`` -> ``.venv``)."""
    match = re.match(r"(\S+?)/bin/", command)
    assert match is not None, command
    return match.group(1)


# -- the quick start ---------------------------------------------------------------------------


def quick_start() -> tuple[str, str]:
    """``(run command, test command)`` as the quick start gives them."""
    text = section("Quick start (a fresh Debian/Ubuntu machine with Python ≥ 3.11)")
    [run] = [b.strip() for b in shell_blocks(text) if "gateway demo" in b]
    tests = re.search(r"the test command\s+`([^`]+)`", text)
    assert tests is not None, "the quick start names no test command"
    return run, tests.group(1)


def test_the_checks_never_use_the_run_commands_venv() -> None:
    run, tests = quick_start()
    made = re.search(r"python3 -m venv (\S+)", run)
    assert made is not None, run
    run_venv = made.group(1)
    assert f"{run_venv}/bin/gateway demo" in run
    test_venv = _venv(tests)
    assert test_venv != run_venv
    # .ci/run makes and uses the test venv, and never names the run venv outside a comment.
    code = [line for line in CI_RUN.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(rf"(?<![\w-]){re.escape(run_venv)}(?![\w-])", line)]
    assert any(re.search(rf"VENV={re.escape(test_venv)}$", line) for line in code)
    # Neither is committed, and neither is linted, typed or collected as the project's code.
    ignored = (ROOT / ".gitignore").read_text("utf-8").split()
    assert f"{run_venv}/" in ignored and f"{test_venv}/" in ignored


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    _, tests = quick_start()
    code = [line.strip() for line in CI_RUN.splitlines() if not line.lstrip().startswith("#")]
    assert code[-1] == tests  # the last thing CI does, exactly as a reader would type it
    assert "bash .ci/run" in section("Quick start (a fresh Debian/Ubuntu machine with Python ≥ 3.11)")


def test_debian_needs_python3_venv_and_ci_installs_it() -> None:
    assert "python3-venv" in section("Quick start (a fresh Debian/Ubuntu machine with Python ≥ 3.11)")
    packages = re.search(r"^PACKAGES=\((.*)\)$", CI_RUN, re.M)
    assert packages is not None and "python3-venv" in packages.group(1).split()


# -- the errors table ----------------------------------------------------------------------------


def readme_errors() -> dict[str, str]:
    """``{error code: status cell}`` from the README's errors table."""
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \| [^|]+ \|$", section("Errors"), re.M)
    codes: dict[str, str] = {}
    for status, cell in rows:
        if status.strip() in ("status", "---"):
            continue
        for code in re.findall(r"`([^`]+)`", cell):
            assert code not in codes, f"{code} is listed twice"
            codes[code] = status.strip()
    return codes


# Where an {"error": ...} is written: the denial table (gateway/errors.py, through
# gateway/responses.py), and the server's own answers before any ASGI app runs. A new place
# must be added here, so its codes are collected too.
_EMITTERS = {"responses.py", "enrol.py", "server.py", "server_limits.py"}
_LITERAL_ERROR = re.compile(r"""_(?:send_error|refuse)\(\s*\d{3},\s*["']([a-z0-9_]+)["']""")


def emitted_errors() -> dict[str, int | None]:
    """Every ``error`` code the gateway can send: ``{code: status}`` (None: not fixed here)."""
    codes: dict[str, int | None] = {reason.value: status for reason, (status, _) in DENIALS.items()}
    writers = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        text = path.read_text("utf-8")
        if re.search(r"""["']error["']\s*:""", text):
            writers.add(path.name)
        for match in _LITERAL_ERROR.finditer(text):
            codes.setdefault(match.group(1), int(match.group(0).split("(")[1].split(",")[0]))
    assert writers <= _EMITTERS | {"pages.py"}, f"new writers of an error body: {writers - _EMITTERS}"
    return codes


def test_the_collector_finds_the_servers_own_codes() -> None:
    # The codes written outside the denial table, so the collector can miss something.
    assert {"request_timeout", "request_header_fields_too_large", "bad_request"} <= set(emitted_errors())


def test_the_errors_table_lists_every_code_and_no_other() -> None:
    listed, emitted = readme_errors(), emitted_errors()
    assert sorted(set(emitted) - set(listed)) == [], "missing from README's errors table"
    assert sorted(set(listed) - set(emitted)) == [], "listed in README but never sent"
    for code, status in emitted.items():
        if status is not None:
            assert str(status) in listed[code].split(" / "), f"{code}: README says {listed[code]}, the gateway {status}"


# -- the curl walk-through, run as written --------------------------------------------------------


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    """``gateway demo`` as the README runs it, on a free port, its state in ``tmp_path``."""
    port = free_port()
    log = (tmp_path / "demo.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--dir", str(tmp_path / "state")],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's gateway, from any cwd
    )
    try:
        try:
            wait_for_port(port)
        except RuntimeError:
            raise RuntimeError((tmp_path / "demo.log").read_text(errors="replace")) from None
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def walkthrough() -> list[str]:
    return shell_blocks(section("Enrolment from the command line (curl)"))


def test_the_walkthrough_names_the_gateway_once() -> None:
    blocks = walkthrough()
    assert blocks[0].startswith("GW=http://127.0.0.1:8080 ")
    # Every request goes to $GW: the one line to change for another gateway.
    for block in blocks:
        for url in re.findall(r"(?:localhost|127\.0\.0\.1):\d+", block):
            assert block.startswith(f"GW=http://{url}"), url
    assert sum(b.count('"$GW/') for b in blocks) >= 5


@pytest.mark.integration
def test_the_walkthrough_runs_as_written(demo: str, tmp_path: Path) -> None:
    need_binary("oathtool")
    need_binary("curl")
    blocks = walkthrough()
    # Only the URL changes: the demo listens on a free port here, not on 8080.
    script = "\n".join(blocks).replace("GW=http://127.0.0.1:8080 ", f"GW={demo} ", 1)
    # One shell, the blocks one after the other, as a reader pastes them; stop at the first error.
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # 2. the recovery codes, once; 3. and the last block: the demo app's protected page.
    enrolled = json.loads(lines[0])
    assert len(enrolled["recovery_codes"]) == 10
    pages = "\n".join(lines[1:])
    assert pages.count("carol") >= 2, pages[:500]  # the demo app greets the user, twice
    assert '"error"' not in pages


@pytest.mark.integration
def test_an_empty_code_names_the_field(demo: str, tmp_path: Path) -> None:
    # Run literally without oathtool, the walk-through sent {"code": ""}: valid JSON, and the
    # answer said "The request body is malformed". It names the field and what it wants now.
    jar = str(tmp_path / "jar")
    need_binary("curl")
    subprocess.run(["curl", "-s", "-c", jar, "-d", "name=carol", f"{demo}/demo/login", "-o", "/dev/null"], check=True)
    for route in ("/verify-2fa", "/recovery-codes"):
        out = subprocess.run(
            [
                "curl",
                "-s",
                "-b",
                jar,
                "-X",
                "POST",
                f"{demo}{route}",
                "-w",
                "\n%{http_code}",
                "-H",
                "Content-Type: application/json",
                "-d",
                '{"code": ""}',
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        body, status = out.rsplit("\n", 1)
        assert status == "400"
        answer = json.loads(body)
        assert answer["error"] == "invalid_input"
        assert answer["detail"].startswith("code: expected 6 digits"), answer
