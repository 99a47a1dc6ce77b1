"""Which Redis the store talks to, read from ``store.url``: one server, a Sentinel set or a
Cluster. ``gateway.store.redis_clients`` builds redis-py's clients from it.

    redis://[user:password@]host:port/db        one server (redis-py's own URL rules)
    rediss://...  unix:///run/redis.sock?db=0
    redis+sentinel://[[user]:password@]host:port,host:port/service_name[/db]
    redis+cluster://[[user]:password@]host:port,host:port
    rediss+sentinel://...  rediss+cluster://...  the same over TLS

The hosts of a Sentinel URL are the sentinels (port 26379 when left out); the password is the
master's and the replicas', and the sentinels are asked with the same one: one secret, as when
every node of the set runs ``requirepass`` with it (sentinels without a password answer AUTH
with an error, so open() fails and says so). The hosts of a Cluster URL are start-up nodes
(port 6379 when left out); the client learns the others from them. A Cluster has database 0
only. Neither takes query options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SINGLE_SCHEMES = ("redis", "rediss", "unix")
_DEFAULT_PORT = {"sentinel": 26379, "cluster": 6379}


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis store URL. ``url`` is the URL itself for one server (redis-py reads it)."""

    kind: Literal["single", "sentinel", "cluster"]
    url: str = field(repr=False)
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def _node(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:26379
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") or not rest else None
        if port_text is None:
            raise ValueError("a host in brackets must be followed by :port")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if not host:
        raise ValueError("one of the hosts is empty")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("a port of the hosts is not a number from 1 to 65535")
    return host, int(port_text)


def parse_redis_url(url: str) -> RedisTarget:
    """The target ``url`` names; raise ValueError naming the problem when it is not one of the
    forms above. The message never repeats the URL or a part of it but host names."""
    scheme = url.partition("://")[0].lower()
    if scheme in SINGLE_SCHEMES:
        return RedisTarget("single", url)
    if scheme not in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        raise ValueError(f"{scheme}:// is not a Redis URL scheme")
    kind: Literal["sentinel", "cluster"] = "sentinel" if scheme in SENTINEL_SCHEMES else "cluster"
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"a {scheme}:// URL takes no query options")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
    if not hosts:
        raise ValueError(f"a {scheme}:// URL needs host:port,host:port")
    nodes = tuple(_node(h, _DEFAULT_PORT[kind]) for h in hosts.split(","))
    path = [p for p in parts.path.split("/") if p]
    service, db = "", 0
    if kind == "sentinel":
        if not path or len(path) > 2:
            raise ValueError(f"a {scheme}:// URL needs /service_name or /service_name/db after the hosts")
        service = unquote(path[0])
        if len(path) == 2:
            if not path[1].isdigit():
                raise ValueError("the database after the service name must be a number")
            db = int(path[1])
    elif path:
        raise ValueError("a Redis Cluster has database 0 only: no path after the hosts")
    return RedisTarget(kind, url, nodes, service, db, scheme.startswith("rediss"), username, password)
