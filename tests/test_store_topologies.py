"""A real gateway process (``gateway run``) on a Redis Sentinel set and on a Redis Cluster:
enrol, verify, and the 2FA session then lets requests through (issue 13 §1). The store
contract on both topologies is tests/test_store.py's; this is the whole path, from
``store.url`` through config, serve and the pages to the store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.load import SESSION_COOKIE, Replica, enrol_user, fetch, who, wrong_code
from tests.support.redis_topologies import Cluster, SentinelSet
from tests.support.servers import UpstreamProcess, fresh_keys


@pytest.fixture(params=["redis_sentinel", "redis_cluster"])
def gateway(request: pytest.FixtureRequest, upstream: UpstreamProcess, tmp_path: Path) -> Iterator[Replica]:
    topology: SentinelSet | Cluster = request.getfixturevalue(request.param)
    with Replica(tmp_path, "gw", topology.url, upstream.url, fresh_keys()) as replica:
        yield replica


async def test_enrol_verify_and_the_session_passes(gateway: Replica) -> None:
    user = f"topo-{uuid.uuid4().hex[:8]}"
    r = await fetch("GET", gateway.url + "/echo", who(user))
    assert (r.status_code, r.json()["error"]) == (403, "2fa_not_enrolled"), r.text  # no way through yet
    secret, session = await enrol_user(gateway.url, user)
    r = await fetch("GET", gateway.url + "/echo", {**who(user), "Cookie": f"{SESSION_COOKIE}={session}"})
    assert r.status_code == 200, r.text
    # A code is judged against the secret in the store: a wrong one is refused.
    r = await fetch("GET", gateway.url + "/echo", {**who(user), "X-2FA-Code": wrong_code(secret)})
    assert (r.status_code, r.json()["error"]) == (401, "2fa_invalid"), r.text
    r = await fetch("GET", gateway.url + "/_gateway/ready", {})
    assert r.status_code == 200, r.text  # readiness pings the store through the topology
