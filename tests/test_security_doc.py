"""SECURITY.md stays true: every test file it names exists, and its deployment checklist
(config/checks/security_checklist.py runs each ```sh check: ID``` block) passes against a real
deployment (app, gateway, nginx from config/nginx/proxy_pass.conf with TLS) and fails, item by
item, against deliberately broken ones: every item fails in one of them, so none can be emptied
or weakened into a check that always passes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer, need_binary
from tests.support.fronts import NginxFront
from tests.support.servers import ROOT, free_port, fresh_keys, gateway_process, wait_for_port

DOC = ROOT / "SECURITY.md"
TOOL = ROOT / "config" / "checks" / "security_checklist.py"
CHECKS = [
    "config-strict",
    "keys-outside-config",
    "trusted-proxies-narrow",
    "no-route-around",
    "gateway-not-exposed",
    "identity-header-not-believed",
    "protected-path-refused",
    "metrics-not-public",
    "tls",
    "redis-noeviction",
]
# What the broken deployment gets wrong, each caught by its item: the app and the gateway listen
# on every interface, every address is trusted, the keys are in the config file, the front has
# no login and passes the client's Remote-User on, and there is no TLS; and the Redis named by
# GATEWAY_STORE_URL (the checklist's; the gateway runs on SQLite) evicts keys (allkeys-lru).
BROKEN = {
    "config-strict",
    "keys-outside-config",
    "trusted-proxies-narrow",
    "no-route-around",
    "gateway-not-exposed",
    "identity-header-not-believed",
    "tls",
    "redis-noeviction",
}
# A second one, otherwise right: its front routes the protected path to the app around the gateway
# and without a login, and has a location for the metrics that relays no X-Forwarded-For (so the
# gateway sees its trusted front asking directly). The probe's Remote-User then reaches the app too.
LEAKY = {"protected-path-refused", "identity-header-not-believed", "metrics-not-public"}
FAILS = {"right": set(), "broken": BROKEN, "leaky": LEAKY}


def test_every_test_file_named_exists() -> None:
    named = sorted(set(re.findall(r"\btests/[\w/]+\.py\b", DOC.read_text("utf-8"))))
    assert len(named) >= 20
    assert [name for name in named if not (ROOT / name).is_file()] == []


def test_the_checklist_has_every_item_once() -> None:
    assert re.findall(r"^```sh check: ([a-z0-9-]+)$", DOC.read_text("utf-8"), re.M) == CHECKS


def test_every_item_fails_in_some_broken_deployment() -> None:
    # With the runs below (each deployment fails exactly its set), every item is shown able to
    # fail: an item emptied in SECURITY.md would pass where it must fail.
    assert set().union(*FAILS.values()) == set(CHECKS)


def _certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [need_binary("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    cert.chmod(0o644)
    key.chmod(0o644)  # nginx's master reads it; the directory is the test's own
    return cert, key


@contextlib.contextmanager
def _app(host: str) -> Iterator[int]:
    """The test upstream, listening on ``host``."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "tests.support.upstream_app:app", "--host", host, "--port", str(port)]
    proc = subprocess.Popen([*command, "--log-level", "warning"], cwd=ROOT)
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def _deployment(tmp_path: Path, kind: str) -> Iterator[dict[str, str]]:
    """App, gateway (proxy mode) and nginx in front; the checklist's environment. ``kind`` is
    "right", "broken" or "leaky" (see BROKEN and LEAKY)."""
    nginx = need_binary("nginx")
    need_binary("curl")
    keys = fresh_keys()
    port = free_port()
    broken = kind == "broken"
    with contextlib.ExitStack() as stack:
        app = stack.enter_context(_app("0.0.0.0" if broken else "127.0.0.1"))
        front = NginxFront(nginx, "proxy_pass.conf", {"server 127.0.0.1:8080;": f"server 127.0.0.1:{port};"})
        if kind == "leaky":
            front.replacements["    location / {"] = (
                f"    location /private {{ auth_basic off; proxy_pass http://127.0.0.1:{app}; }}\n"
                "    location = /_gateway/metrics { auth_basic off; proxy_pass http://gateway; }\n"
                "    location / {"
            )
        stack.callback(front.stop)
        cert, key = _certificate(front.dir)
        scheme = "http" if broken else "https"
        public = f"{scheme}://127.0.0.1:{front.port}"
        if broken:
            front.replacements.update(
                {
                    'auth_basic "app";': "",
                    "auth_basic_user_file /etc/nginx/gateway.htpasswd;": "",
                    "proxy_set_header Remote-User $remote_user;": "",
                }
            )
            keys_line = f'keys = ["{keys.pop("GATEWAY_ENCRYPTION_KEYS")}"]'
            server = 'host = "0.0.0.0"\ntrusted_proxies = ["0.0.0.0/0"]'
        else:
            tls = f"listen 127.0.0.1:{front.port} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};"
            front.replacements["listen 80;"] = tls
            front.replacements["/etc/nginx/gateway.htpasswd"] = front.htpasswd({"alice": "alice-pw"})
            keys_line = ""
            server = 'host = "127.0.0.1"\ntrusted_proxies = ["127.0.0.1/32"]'
        store_env: dict[str, str] = {}
        if broken:
            need_binary("redis-cli")
            evicting = RedisServer(need_binary("redis-server"), "--maxmemory-policy", "allkeys-lru")
            evicting.start()
            stack.callback(shutil.rmtree, evicting.dir, ignore_errors=True)
            stack.callback(evicting.stop)
            store_env["GATEWAY_STORE_URL"] = evicting.url
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[server]\nport = {port}\n{server}\npublic_url = "{public}"\n'
            f'[upstream]\nurl = "http://127.0.0.1:{app}"\n'
            f'[store]\nurl = "sqlite:///{tmp_path}/gateway.db"\n'
            f"[session]\nsecure = {'false' if broken else 'true'}\n"
            f"[encryption]\n{keys_line}\n"
        )
        stack.enter_context(gateway_process(config, port, keys, tmp_path / "gateway.log"))
        front.start()
        # 127.0.0.2 stands for "this host, from another machine": a listener on 127.0.0.1 only
        # does not answer there, one on every interface does.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        yield (
            env
            | keys
            | {
                "GATEWAY_PUBLIC_URL": public,
                "GATEWAY_APP_URL": f"http://127.0.0.2:{app}",
                "GATEWAY_DIRECT_URL": f"http://127.0.0.2:{port}",
                "GATEWAY_CONFIG": str(config),
                "GATEWAY_PROTECTED_PATH": "/private",
                "CURL_CA_BUNDLE": str(cert),  # the test's own certificate authority
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            }
            | store_env
        )


def _checklist(env: dict[str, str]) -> tuple[int, dict[str, str], str]:
    done = subprocess.run([sys.executable, str(TOOL)], env=env, capture_output=True, text=True, timeout=300)
    results = {line[5:]: line[:4] for line in done.stdout.splitlines() if line[:4] in ("PASS", "FAIL")}
    return done.returncode, results, done.stdout + done.stderr


@pytest.mark.parametrize("kind", sorted(FAILS))
def test_the_checklist_against_a_real_deployment(tmp_path: Path, kind: str) -> None:
    with _deployment(tmp_path, kind) as env:
        code, results, output = _checklist(env)
    failed = {name for name, result in results.items() if result == "FAIL"}
    assert sorted(results) == sorted(CHECKS), output
    assert failed == FAILS[kind], output
    assert code == (1 if failed else 0), output
