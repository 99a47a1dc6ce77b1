"""redis-py's clients for a :class:`gateway.store.redis_topology.RedisTarget`: a pool on one
server, ``Sentinel.master_for`` on a Sentinel set, ``RedisCluster`` on a Cluster. Nothing here
speaks the protocol: each is the library's own client, given the gateway's timeouts.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.store.redis_topology import RedisTarget

# Either client: the store calls only what both offer (commands, pipelines, scripts, scan_iter).
Client = aioredis.Redis | RedisCluster


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool (it asks the sentinels for the master before each new connection) with
    the blocking pool's wait for a free connection, as on one server."""


def _retry() -> Retry:
    # One immediate retry on a fresh connection hides a pooled connection that the server or a
    # balancer closed while idle (and, with Sentinel, reaches a new master after a failover);
    # more would turn an outage into a hang. Timeouts are not retried: a silent server already
    # cost the socket timeout.
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def build_client(target: RedisTarget, max_connections: int, timeout: float, read_timeout: float | None) -> Client:
    """A client for ``target`` with at most ``max_connections`` connections (per node on a
    Cluster), connections made within ``timeout`` and replies read within ``read_timeout``
    (None: no limit per reply). No connection is made before the first command. Raises
    ValueError on a malformed single-server URL."""
    common: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": read_timeout,
        "health_check_interval": 0,
        "retry": _retry(),
    }
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "sentinel":
        # The sentinels get the same password (gateway.store.redis_topology) and bounded waits.
        sentinel_kwargs: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            "ssl": target.tls,
            # No retry on one sentinel: the next sentinel is the retry. redis-py's default (3
            # retries, backing off up to 10 s) made a wrong password take 22 s to fail.
            "retry": Retry(NoBackoff(), 0),
            **auth,
        }
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        client: Client = sentinel.master_for(
            target.service,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=max_connections,
            timeout=timeout,
            db=target.db,
            ssl=target.tls,
            **auth,
            **common,
        )
        return client
    if target.kind == "cluster":
        # RedisCluster retries a command itself on a moved slot or a lost node, refreshing
        # its map of the slots; its pools fail (MaxConnectionsError) rather than wait.
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            max_connections=max_connections,
            ssl=target.tls,
            **auth,
            **common,
        )
    # A blocking pool: at most max_connections, and a burst beyond that waits (up to timeout)
    # for a free one; redis-py's default pool fails the request at once ("Too many
    # connections"), which would deny good requests under load.
    pool = aioredis.BlockingConnectionPool.from_url(
        target.url, max_connections=max_connections, timeout=timeout, **common
    )
    return aioredis.Redis.from_pool(pool)  # closes the pool when it is closed


async def close_client(client: Client) -> None:
    """Close ``client`` and, for Sentinel, the clients it holds on the sentinels."""
    await client.aclose()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        # master_for's client does not own its pool: aclose leaves the pool's sockets open.
        await pool.disconnect()
        manager: Sentinel = pool.sentinel_manager
        for sentinel in manager.sentinels:
            await sentinel.aclose()
