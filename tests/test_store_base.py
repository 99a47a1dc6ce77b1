"""gateway/store/base.py in-process: rules every store caller shares."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from gateway.config import ENV_KEYS, ENV_PEPPER, parse
from gateway.errors import ConfigError
from gateway.store.base import is_key_prefix
from gateway.store.redis import RedisStore

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
