"""Where the gateway keeps its state, and the one function that opens it from a URL.

``store.url`` picks the backend by scheme:

    sqlite:///relative/path.db     a file relative to the working directory
    sqlite:////var/lib/gw/gw.db    an absolute path (four slashes, as in SQLAlchemy)
    redis://[user:password@]host:port/db
    rediss://...                   Redis over TLS
    unix:///run/redis.sock?db=0    Redis on a Unix socket
    redis+sentinel://[[user]:password@]host:port,host:port/service_name[/db]
    redis+cluster://[[user]:password@]host:port,host:port
    rediss+sentinel://..., rediss+cluster://...   the same over TLS

(the Sentinel and Cluster forms, and which password goes where: ``redis_topology``).

``prefix`` namespaces the Redis keys; the SQLite file is the gateway's alone and ignores it.
"""

from __future__ import annotations

from gateway.store.base import Attempt, Quota, Store, UserState, is_key_prefix
from gateway.store.redis import RedisStore
from gateway.store.redis_topology import CLUSTER_SCHEMES, SENTINEL_SCHEMES, SINGLE_SCHEMES, parse_redis_url
from gateway.store.sqlite import SqliteStore

__all__ = [
    "Attempt",
    "Quota",
    "Store",
    "UserState",
    "init_store",
    "is_key_prefix",
    "is_multi_host_url",
    "open_store_from_url",
    "parse_store_url",
]

_SQLITE = "sqlite:///"
_REDIS_SCHEMES = SINGLE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES


def is_multi_host_url(url: str) -> bool:
    """``url`` is a Sentinel or Cluster URL, listing several host:port."""
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES + CLUSTER_SCHEMES


def parse_store_url(url: str) -> tuple[str, str]:
    """``("sqlite", path)`` or ``("redis", url)`` for ``url``; raise ValueError naming the problem
    when it is not one of the forms above. The message never repeats the URL (it may hold a
    password). ``store.url`` is checked with this at load, so a bad one fails before serving.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        if not url.startswith(_SQLITE):
            raise ValueError('must look like "sqlite:///relative.db" or "sqlite:////absolute/path.db"')
        path = url[len(_SQLITE) :]
        if not path or path == ":memory:":
            # Each worker, and each restart, would have its own empty store: sessions, lockouts
            # and enrolments gone.
            raise ValueError("needs a file path; an in-memory SQLite store is not shared or kept")
        return "sqlite", path
    if scheme in _REDIS_SCHEMES:
        parse_redis_url(url)  # the Sentinel and Cluster forms are checked here, at load
        return "redis", url
    shown = f"{scheme}://" if scheme else "(none)"
    raise ValueError(
        f"unknown store URL scheme {shown}: use sqlite:///, redis://, rediss://, unix://,"
        " redis+sentinel://, redis+cluster:// (or rediss+...)"
    )


def open_store_from_url(
    url: str, prefix: str, max_connections: int = 64, replicas_ack: int = 0, create: bool = False
) -> Store:
    """The store for ``url``, not yet opened (``await store.open()`` connects). A Redis store
    keeps at most ``max_connections`` connections; a request that finds none free waits; and
    waits for ``replicas_ack`` replicas after the writes a failover must keep (``redis_layout``).

    ``open()`` opens an initialised store only (one with its identity: a store that lost its
    data must never look like a new one, issue 14); ``create`` lets it make one where there is
    nothing at all (no file; a Redis with no identity key), as a first start with
    ``store.create = "if_missing"`` may. :func:`init_store` is the deliberate step.

    Raises ValueError naming the problem when the URL is not one of the forms above.
    """
    backend, where = parse_store_url(url)
    if backend == "sqlite":
        return SqliteStore(where, create=create)
    return RedisStore(where, prefix, max_connections, replicas_ack, create=create)


async def init_store(url: str, prefix: str) -> tuple[str, bool]:
    """``gateway store init``: give the store at ``url`` its identity if it has none, keeping
    any data there; (its id, True if it had none). Raises StoreError when unreachable."""
    backend, where = parse_store_url(url)
    store = SqliteStore(where) if backend == "sqlite" else RedisStore(where, prefix)
    try:
        created = await store.initialise()
        assert store.store_id is not None
        return store.store_id, created
    finally:
        await store.close()
