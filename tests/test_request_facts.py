"""gateway/request_facts.py: who sent a request, and what the decision is told about it."""

from __future__ import annotations

import ipaddress

from starlette.types import Scope

from gateway.request_facts import RequestFacts, TrustPolicy

PROXIES = (ipaddress.ip_network("10.0.0.0/8"),)


def scope(peer: str | None, *headers: tuple[bytes, bytes]) -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": "/a b",
        "raw_path": b"/a%20b",
        "headers": list(headers),
        "client": (peer, 1) if peer else None,
    }


def test_only_a_trusted_peer_names_the_client() -> None:
    facts = RequestFacts(TrustPolicy(PROXIES))
    relayed = facts(scope("10.1.2.3", (b"x-forwarded-for", b"198.51.100.7, 10.9.9.9")))
    assert (relayed.client, relayed.peer_trusted) == ("198.51.100.7", True)
    direct = facts(scope("203.0.113.5", (b"x-forwarded-for", b"198.51.100.7")))
    assert (direct.client, direct.peer_trusted) == ("203.0.113.5", False)
    nobody = facts(scope(None))
    assert (nobody.client, nobody.peer_trusted) == (None, False)


def test_the_raw_path_is_what_is_decided_and_forward_auth_may_say_otherwise() -> None:
    facts = RequestFacts(TrustPolicy(PROXIES))
    assert (facts(scope("10.0.0.1")).method, facts(scope("10.0.0.1")).path) == ("POST", "/a%20b")
    told = facts(scope("10.0.0.1"), method="GET", path="/original")
    assert (told.method, told.path) == ("GET", "/original")


def test_the_trust_policy_remembers_a_bounded_number_of_peers() -> None:
    trust = TrustPolicy(PROXIES)
    assert trust.trusts("10.0.0.1") and not trust.trusts("192.0.2.1") and not trust.trusts(None)
    assert not trust.trusts("not an address")
    for i in range(20_000):  # a scan from many addresses: memory stays bounded
        trust.trusts(f"192.0.{i // 256 % 256}.{i % 256}")
    assert len(trust._known) <= 10_000
    assert trust.trusts("10.0.0.1")
