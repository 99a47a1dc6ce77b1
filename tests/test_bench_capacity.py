"""bench/capacity.py's quick version: one user enrolled through a real ``gateway run`` on a real
redis-server; the figures in README "Capacity" are ``python -m bench.capacity`` (3 rounds)."""

from __future__ import annotations

from bench.capacity import measure


def test_capacity_figures_of_one_user() -> None:
    m = measure(rounds=1)
    # The keys one enrolled user makes (short-lived attempt counters may be there too), and the
    # one key of a session.
    kinds = {k.split()[0] for k in m["user_keys"]}  # type: ignore[attr-defined]
    assert {"recovery", "secret", "sessions", "step"} <= kinds
    assert [k.split()[0] for k in m["session_keys"]] == ["s:<hash>"]  # type: ignore[attr-defined]
    assert isinstance(m["bytes_user"], int) and m["bytes_user"] > 0
    assert isinstance(m["bytes_session"], int) and m["bytes_session"] > 0
    # A warm session costs no Redis command, a cold one at least one; a code more than a session.
    assert m["session_warm"] == 0
    assert isinstance(m["session_cold"], int) and m["session_cold"] >= 1
    assert isinstance(m["code"], int) and m["code"] > m["session_cold"]
