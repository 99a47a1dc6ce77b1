"""Where the gateway keeps its state, and the one function that opens it from a URL.

``store.url`` picks the backend by scheme:

    sqlite:///relative/path.db     a file relative to the working directory
    sqlite:////var/lib/gw/gw.db    an absolute path (four slashes, as in SQLAlchemy)
    redis://[user:password@]host:port/db
    rediss://...                   Redis over TLS
    unix:///run/redis.sock?db=0    Redis on a Unix socket

``prefix`` namespaces the Redis keys; the SQLite file is the gateway's alone and ignores it.
"""

from __future__ import annotations

from gateway.store.base import Attempt, Quota, Store, UserState, is_key_prefix

__all__ = ["Attempt", "Quota", "Store", "UserState", "is_key_prefix", "open_store_from_url"]

_SQLITE = "sqlite:///"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store_from_url(url: str, prefix: str, max_connections: int = 64) -> Store:
    """The store for ``url``, not yet opened (``await store.open()`` connects). A Redis store
    keeps at most ``max_connections`` connections; a request that finds none free waits.

    Raises ValueError naming the problem when the URL is not one of the forms above.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        if not url.startswith(_SQLITE):
            raise ValueError("a sqlite URL is sqlite:///relative.db or sqlite:////absolute/path.db")
        path = url[len(_SQLITE) :]
        if not path or path == ":memory:":
            raise ValueError("a sqlite URL needs a file path: sqlite:///relative.db or sqlite:////abs.db")
        # Imported here so a Redis deployment never loads sqlite3, and vice versa.
        from gateway.store.sqlite import SqliteStore

        return SqliteStore(path)
    if url.lower().startswith(_REDIS_SCHEMES):
        from gateway.store.redis import RedisStore

        return RedisStore(url, prefix, max_connections)
    shown = f"{scheme}://" if scheme else "(none)"
    raise ValueError(f"unknown store URL scheme {shown}: use sqlite:///, redis://, rediss:// or unix://")
