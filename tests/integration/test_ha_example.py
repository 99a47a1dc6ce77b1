"""The high-availability example in config/ha/, started from its files (ports substituted): three
sentinels over a Redis master and replica (tests/support/redis_topologies.py), two ``gateway
run`` from config/ha/gateway-a.toml and gateway-b.toml on ``redis+sentinel://``, nginx from
config/ha/nginx.conf balancing them, the test upstream behind. A user enrols through nginx; then
one replica is killed (SIGKILL) and another is stopped (SIGTERM, drained): every request through
nginx still passes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyotp
import pytest

from tests.conftest import need_binary
from tests.support.fronts import CONFIG, NginxFront, basic_auth, substitute
from tests.support.redis_topologies import SentinelSet
from tests.support.servers import UpstreamProcess, free_port, fresh_keys, gateway_process

pytestmark = pytest.mark.integration

HA = CONFIG / "ha"
STORE_URL = "redis+sentinel://:sentinel-password@10.0.0.11:26379,10.0.0.12:26379,10.0.0.13:26379/gateway/0"
ALICE = {"Authorization": basic_auth("alice", "alice-pw"), "Accept": "application/json"}


@dataclass
class Deployment:
    nginx: NginxFront
    configs: dict[str, Path]  # replica name -> its gateway.toml
    ports: dict[str, int]
    keys: dict[str, str]


@contextlib.contextmanager
def replica(deployment: Deployment, name: str) -> Iterator[subprocess.Popen[bytes]]:
    port = deployment.ports[name]
    with gateway_process(
        deployment.configs[name], port, deployment.keys, deployment.configs[name].with_suffix(".log")
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("ha")
    topology = SentinelSet(need_binary("redis-server"))
    try:
        topology.start()
        ports = {"a": free_port(), "b": free_port()}
        front = NginxFront(
            need_binary("nginx"),
            "proxy_pass.conf",
            {f"server 127.0.0.1:{p}": f"server 127.0.0.1:{ports[n]}" for n, p in (("a", 8081), ("b", 8082))},
        )
        configs = {}
        for name, example_port in (("a", 8081), ("b", 8082)):
            source = HA / f"gateway-{name}.toml"
            text = substitute(
                source.read_text(),
                {
                    f"port = {example_port}": f"port = {ports[name]}",
                    '"http://127.0.0.1:3000"': f'"{upstream.url}"',
                    f'"{STORE_URL}"': f'"{topology.url}"',
                    # The test speaks plain HTTP to nginx; the example's cookie is Secure.
                    "secure = true": "secure = false",
                    '"https://app.example.com"': f'"{front.url}"',
                },
                str(source),
            )
            configs[name] = base / f"gateway-{name}.toml"
            configs[name].write_text(text)
        front.source = HA / "nginx.conf"
        front.replacements["/etc/nginx/gateway.htpasswd"] = front.htpasswd({"alice": "alice-pw"})
        yield Deployment(front, configs, ports, fresh_keys())
    finally:
        topology.stop()


async def enrol(url: str) -> dict[str, str]:
    """Enrol alice through nginx (setup, then a code); the session cookie as headers."""
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(url + "/setup-2fa", headers=ALICE)
        assert r.status_code == 200, r.text
        secret = pyotp.parse_uri(r.json()["otpauth_uri"]).secret
        r = await client.post(url + "/verify-2fa", headers=ALICE, json={"code": pyotp.TOTP(secret).now()})
        assert r.status_code == 200, r.text
        ((name, value),) = r.cookies.items()
    return {**ALICE, "Cookie": f"{name}={value}"}


async def load(url: str, headers: dict[str, str], stop: asyncio.Event, clients: int = 4) -> list[int]:
    """``clients`` loops of GET /echo through nginx until ``stop``; every status (0: no answer)."""
    statuses: list[int] = []

    async def loop(n: int) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            i = 0
            while not stop.is_set():
                try:
                    r = await client.get(f"{url}/echo/ha/{n}/{i}", headers=headers)
                    statuses.append(r.status_code)
                except httpx.HTTPError:
                    statuses.append(0)
                i += 1
                await asyncio.sleep(0.01)

    await asyncio.gather(*(loop(n) for n in range(clients)))
    return statuses


async def test_one_replica_killed_then_one_drained(deployment: Deployment) -> None:
    d = deployment
    with replica(d, "a") as a, replica(d, "b") as b:
        d.nginx.start()
        try:
            headers = await enrol(d.nginx.url)
            async with httpx.AsyncClient(timeout=10) as client:
                # The session opened through nginx is good on each replica directly (one store).
                for port in d.ports.values():
                    # As nginx sends it: the user, and the Host of server.public_url.
                    direct = {**headers, "Remote-User": "alice", "Host": f"127.0.0.1:{d.nginx.port}"}
                    r = await client.get(f"http://127.0.0.1:{port}/echo/direct", headers=direct)
                    assert r.status_code == 200, r.text

            # 1. SIGKILL a under load: nginx's next connection to it is refused and retried on b.
            stop = asyncio.Event()
            running = asyncio.create_task(load(d.nginx.url, headers, stop))
            await asyncio.sleep(0.5)
            a.kill()
            a.wait()
            await asyncio.sleep(1.5)
            stop.set()
            statuses = await running
            print(f"\nkill: {len(statuses)} requests, statuses {sorted(set(statuses))}")
            assert len(statuses) > 20
            assert set(statuses) == {200}

            # 2. a back; SIGTERM b under load: readiness turns 503 while b still serves, then b
            # closes its listener; no request through nginx fails.
            with replica(d, "a"):
                stop = asyncio.Event()
                running = asyncio.create_task(load(d.nginx.url, headers, stop))
                await asyncio.sleep(0.5)
                b.send_signal(signal.SIGTERM)
                # Readiness turns 503 within shutdown_delay (2 s), while b still listens.
                async with httpx.AsyncClient(timeout=5) as client, asyncio.timeout(2):
                    while (await client.get(f"http://127.0.0.1:{d.ports['b']}/_gateway/ready")).status_code != 503:
                        await asyncio.sleep(0.02)
                await asyncio.to_thread(b.wait, 15)
                await asyncio.sleep(1.0)
                stop.set()
                statuses = await running
                print(f"drain: {len(statuses)} requests, statuses {sorted(set(statuses))}")
                assert len(statuses) > 20
                assert set(statuses) == {200}
                # Stopped by its SIGTERM, not killed on timeout (uvicorn re-raises the signal
                # once it has drained, hence -SIGTERM).
                assert b.returncode in (0, -signal.SIGTERM)
        finally:
            d.nginx.stop()
            print(d.nginx.error_log()[-2000:])


def test_the_ha_site_clears_what_the_single_site_clears() -> None:
    """config/ha/nginx.conf repeats config/nginx/proxy_pass.conf's server block (nginx has no
    include of half a file that both could share): every header line of the single-gateway
    example, which tests/integration/test_nginx.py and test_fronts.py hold to the gateway's
    blocklist, is in the HA one too."""
    single = (CONFIG / "nginx" / "proxy_pass.conf").read_text()
    ha = (HA / "nginx.conf").read_text()
    wanted = [line.strip() for line in single.splitlines() if line.strip().startswith(("proxy_", "if ", "return "))]
    assert len(wanted) > 40
    assert [line for line in wanted if line not in {h.strip() for h in ha.splitlines()}] == []
