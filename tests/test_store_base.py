"""gateway/store/base.py in-process: rules every store caller shares."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from gateway.config import ENV_KEYS, ENV_PEPPER, parse
from gateway.errors import ConfigError
from gateway.store import open_store_from_url, parse_store_url
from gateway.store.base import is_key_prefix
from gateway.store.redis import RedisStore
from gateway.store.redis_topology import parse_redis_url

_ENV = {ENV_KEYS: Fernet.generate_key().decode(), ENV_PEPPER: Fernet.generate_key().decode()}
_PREFIXES = ["gw", "gw:prod", "a.b_c-d:1", "gw{1}", "", "gw x", "gw%", "gw\n", "gé", "gw}"]


@pytest.mark.parametrize("prefix", _PREFIXES)
def test_config_and_redis_store_agree_on_the_key_prefix(prefix: str) -> None:
    # One rule: config refuses at load exactly the prefixes RedisStore would refuse at start.
    try:
        parse({"store": {"prefix": prefix}}, env=_ENV)
        config_ok = True
    except ConfigError as e:
        assert "store.prefix:" in str(e)
        config_ok = False
    try:
        RedisStore("redis://127.0.0.1:1/0", prefix)
        store_ok = True
    except ValueError:
        store_ok = False
    assert config_ok is store_ok is is_key_prefix(prefix)


# -- Sentinel and Cluster URLs: one rule (parse_store_url) at load and at open ----------------
_GOOD_URLS = [
    ("redis+sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2:26380/mymaster", "sentinel"),
    ("rediss+sentinel://user:pw@[::1]:26379,s2.example/mymaster/3", "sentinel"),
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001,10.0.0.3", "cluster"),
    ("REDISS+CLUSTER://:pw@node.example:7000", "cluster"),
]


@pytest.mark.parametrize(("url", "kind"), _GOOD_URLS)
def test_sentinel_and_cluster_urls_are_read(url: str, kind: str) -> None:
    assert parse_store_url(url) == ("redis", url)
    target = parse_redis_url(url)
    assert target.kind == kind
    assert parse({"store": {"url": url}}, env=_ENV).store.url == url  # check-config and run agree
    assert isinstance(open_store_from_url(url, "gw"), RedisStore)  # built, not connected


def test_a_sentinel_url_names_its_parts() -> None:
    target = parse_redis_url("rediss+sentinel://:s%40cret@10.0.0.1,[::1]:26380/mymaster/3")
    assert (target.nodes, target.service, target.db, target.tls) == (
        (("10.0.0.1", 26379), ("::1", 26380)),
        "mymaster",
        3,
        True,
    )
    assert (target.username, target.password) == (None, "s@cret")
    assert "s@cret" not in repr(target) and "s%40cret" not in repr(target)
    cluster = parse_redis_url("redis+cluster://u:pw@a:7000,b")
    assert (cluster.nodes, cluster.username, cluster.password, cluster.tls) == (
        (("a", 7000), ("b", 6379)),
        "u",
        "pw",
        False,
    )


_PASSWORD = "Sup3rSecretPw"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"redis+sentinel://:{_PASSWORD}@10.0.0.1:26379", "needs /service_name"),
        (f"redis+sentinel://:{_PASSWORD}@10.0.0.1:26379/m/0/extra", "needs /service_name"),
        (f"redis+sentinel://:{_PASSWORD}@10.0.0.1:26379/m/zero", "database after the service name"),
        (f"redis+sentinel://:{_PASSWORD}@10.0.0.1:x{_PASSWORD}/m", "port of the hosts"),
        (f"redis+cluster://:{_PASSWORD}@10.0.0.1:70000", "port of the hosts"),
        (f"redis+cluster://:{_PASSWORD}@10.0.0.1:7000,,10.0.0.2:7000", "one of the hosts is empty"),
        (f"redis+cluster://:{_PASSWORD}@", "needs host:port,host:port"),
        (f"redis+cluster://:{_PASSWORD}@10.0.0.1:7000/1", "database 0 only"),
        (f"redis+cluster://:{_PASSWORD}@10.0.0.1:7000?password={_PASSWORD}", "no query options"),
        (f"redis+cluster://:{_PASSWORD}@[::1]x:7000", "followed by :port"),
        (f"redis+sentinal://:{_PASSWORD}@10.0.0.1/m", "unknown store URL scheme redis\\+sentinal://"),
    ],
)
def test_bad_sentinel_and_cluster_urls_fail_at_load_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_store_url(url)
    assert _PASSWORD not in str(caught.value)
    with pytest.raises(ValueError, match=message):
        open_store_from_url(url, "gw")
    with pytest.raises(ConfigError, match=message) as config_error:
        parse({"store": {"url": url}}, env=_ENV)
    assert _PASSWORD not in str(config_error.value)
