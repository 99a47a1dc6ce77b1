"""gateway/demo/state.py: the demo's state directory, private to its owner, database included.

The whole demo, as a process in front of a browser, is tests/integration/test_browser.py."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.demo.state import DATABASE, demo_config, existing_demo_config, prepare_state
from gateway.errors import ConfigError
from gateway.store import open_store_from_url
from tests.support.servers import enrol


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The umask most shells have, under which a file SQLite creates is 0644."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("usual_umask")
def test_the_demo_database_and_its_wal_files_are_mode_600(tmp_path: Path) -> None:
    """Issue 12 §2.7: the demo's gateway.db was 0644, readable by every local user."""
    state = tmp_path / "demo"
    prepare_state(state)
    assert mode(state) == 0o700  # the directory: nobody else may even list it
    assert mode(state / DATABASE) == 0o600
    config = demo_config(state, "127.0.0.1", 8080, 9999)

    async def use_the_store() -> dict[str, int]:
        store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
        await store.open()
        try:
            await store.create_session("h" * 64, "alice", 4e9)
            # While the store is open, SQLite keeps its WAL companions next to the database.
            return {p.name: mode(p) for p in state.glob(DATABASE + "*")}
        finally:
            await store.close()

    enrol(config, "alice")
    modes = asyncio.run(use_the_store())
    assert set(modes) >= {DATABASE, DATABASE + "-wal", DATABASE + "-shm"}
    assert modes == dict.fromkeys(modes, 0o600)


@pytest.mark.usefixtures("usual_umask")
def test_a_database_an_older_demo_left_readable_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    state.mkdir(mode=0o755)
    old = state / DATABASE
    old.write_bytes(b"")
    old.chmod(0o644)
    prepare_state(state)
    assert mode(state) == 0o700 and mode(old) == 0o600


def test_managing_users_needs_a_demo_that_ran(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="start `gateway demo` first"):
        existing_demo_config(str(tmp_path / "never-ran"))
    assert not (tmp_path / "never-ran").exists()  # and it creates nothing
    prepare_state(tmp_path / "ran")
    config = existing_demo_config(str(tmp_path / "ran"))
    assert config.store.url == f"sqlite:///{tmp_path / 'ran' / DATABASE}"
    assert config.identity.mode == "jwt" and not config.session.secure
