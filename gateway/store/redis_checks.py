"""Start-up checks of the Redis a store opens: settings of the server that no command of the
store can see going wrong once it serves.

An evicting ``maxmemory-policy`` (``allkeys-*``, the common cache setting, or ``volatile-*``,
which evicts the keys with a TTL) lets Redis delete the gateway's keys when memory fills,
silently: an evicted secret reads as "not enrolled" and re-opens enrolment to anyone with the
first factor, an evicted used time step re-opens a replay (RFC 6238 §5.2), an evicted attempt
counter lifts a lockout. Only ``noeviction`` keeps every key; writes then fail (a 503), which
fails closed (issue 14, attacker B).
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from gateway.errors import StoreError
from gateway.store.redis_clients import Client

SAFE_POLICY = "noeviction"

log = logging.getLogger("gateway.store")
_warned: set[str] = set()  # the warning below once per process: serve's check, then the app's open


def _policies(reply: Any) -> list[str]:
    """The policies in a CONFIG GET reply: one server's ``{name: value}``, or a Cluster's
    ``{node: {name: value}}`` from every primary. Empty when the server hid the setting."""
    if not isinstance(reply, dict):
        return []
    found = []
    for key, value in reply.items():
        if isinstance(value, dict):
            found.extend(_policies(value))
        elif _text(key) == "maxmemory-policy":
            found.append(_text(value))
    return found


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def check_eviction_policy(client: Client) -> None:
    """Raise StoreError naming the policy unless every primary ``client`` writes to (the
    server, the Sentinel primary, each Cluster primary) runs ``maxmemory-policy noeviction``.
    A server that refuses CONFIG (managed Redis often renames it, or an ACL denies it) cannot
    be checked: log a WARNING saying so and what it must be, and go on."""
    try:
        if isinstance(client, RedisCluster):
            reply = await client.config_get("maxmemory-policy", target_nodes=RedisCluster.PRIMARIES)
        else:
            reply = await client.config_get("maxmemory-policy")
    except ResponseError:  # an unknown (renamed) command, or NOPERM: the server's refusal
        reply = None
    policies = _policies(reply)
    if not policies:
        if "policy" in _warned:
            return
        _warned.add("policy")
        log.warning(
            "store: could not check Redis's maxmemory-policy (CONFIG GET refused or renamed);"
            " it must be %s, or Redis may evict the gateway's keys (enrolments, used codes, lockouts)",
            SAFE_POLICY,
        )
        return
    unsafe = sorted({p for p in policies if p != SAFE_POLICY})
    if unsafe:
        raise StoreError(
            f"redis store: maxmemory-policy is {', '.join(unsafe)}: Redis may evict the gateway's keys"
            f" (an evicted secret reads as not enrolled); set maxmemory-policy {SAFE_POLICY}"
            f" (redis.conf, or CONFIG SET maxmemory-policy {SAFE_POLICY})"
        )
