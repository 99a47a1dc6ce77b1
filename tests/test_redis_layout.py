"""gateway/store/redis_layout.py: key names and expiring values, without a Redis.

The layout in a real Redis (and in a cluster) is tests/test_store.py's."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from gateway.store.redis_layout import escape_name, pack_expiring, session_key, to_ms, unpack_live, user_key


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
