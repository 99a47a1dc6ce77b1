"""gateway/store/redis_layout.py: key names and expiring values, without a Redis.

The layout in a real Redis (and in a cluster) is tests/test_store.py's."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from redis.crc import key_slot

from gateway.store.redis_layout import (
    escape_name,
    pack_expiring,
    session_key,
    to_ms,
    unescape_name,
    unpack_live,
    user_key,
)


@pytest.mark.parametrize("user", ["alice", "a}b", "x{y", "user:bob", "100%", "}:secret"])
def test_no_user_name_closes_the_hash_tag_early(user: str) -> None:
    key = user_key("gw", user, "secret")
    inside = key[len("gw:{") : -len("}:secret")]
    assert key.startswith("gw:{") and key.endswith("}:secret")
    assert not set("{}:") & set(inside)
    assert unquote(inside) == user  # and the name comes back whole (list_users)


def test_a_lockout_scope_is_escaped_like_a_user() -> None:
    assert user_key("gw", "user:alice", "attempts") == "gw:{user%3Aalice}:attempts"
    assert escape_name("%") == "%25"


def test_session_keys_sit_outside_any_user_slot() -> None:
    assert session_key("gw", "ab" * 32) == "gw:s:" + "ab" * 32


def test_a_packed_value_reads_back_until_it_expires() -> None:
    packed = pack_expiring(1000.5, b"payload")
    assert unpack_live(packed, 1000.0) == b"payload"
    assert unpack_live(packed, 1000.5) is None  # expired at its expiry, as in the SQLite store
    assert unpack_live(None, 0.0) is None and unpack_live(b"short", 0.0) is None
    assert to_ms(1000.5) == 1000500


@pytest.mark.parametrize("user", ["", "\x00", "%00", "alice"])
def test_every_name_has_a_hash_tag_that_holds_its_keys_in_one_slot(user: str) -> None:
    # "{}" is no hash tag: Redis would hash each whole key, scattering the empty name's keys
    # over several slots, and its scripts and transactions would fail on a Cluster (CROSSSLOT).
    keys = [user_key("gw", user, kind) for kind in ("secret", "pending", "step", "recovery", "sessions")]
    assert "{}" not in keys[0]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert unescape_name(escape_name(user)) == user


def test_the_empty_name_spells_no_other_name() -> None:
    escaped = {escape_name(u) for u in ("", "\x00", "%00", "%", "%2500")}
    assert len(escaped) == 5
