"""gateway/admin.py in-process, on a real SQLite store: what ``gateway users`` and ``gateway keys``
do. The same commands as real subprocesses, exit codes and all, are tests/test_cli.py's."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from gateway import admin
from gateway.config import ENV_KEYS, Config
from gateway.crypto import SecretBox
from gateway.errors import StoreError
from gateway.store import init_store, open_store_from_url
from gateway.totp import new_secret
from tests.support.servers import enrol, make_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    config = make_config(tmp_path, "http://127.0.0.1:9")
    asyncio.run(init_store(config.store.url, config.store.prefix))  # admin commands never make one
    return config


def test_users_list_on_an_empty_store(config: Config) -> None:
    assert admin.user_command(config, "list") == "(no users)"


def test_a_user_command_refuses_what_it_cannot_act_on(config: Config) -> None:
    with pytest.raises(admin.AdminError, match="name a USER"):
        admin.user_command(config, "show")
    with pytest.raises(admin.AdminError, match="not a valid user id"):
        admin.user_command(config, "reset", "bad\x00user")
    with pytest.raises(admin.AdminError, match="no such user: nobody"):
        admin.user_command(config, "logout", "nobody")
    with pytest.raises(admin.AdminError, match="unknown users command"):
        admin.user_command(config, "delete", "alice")


def test_show_never_prints_the_secret(config: Config) -> None:
    secret = enrol(config, "alice")
    shown = admin.user_command(config, "show", "alice")
    assert "enrolled: yes" in shown and secret not in shown


def test_an_import_report_lists_each_skipped_row(config: Config, tmp_path: Path) -> None:
    csv_path = tmp_path / "users.csv"
    csv_path.write_text("user_id,encrypted_secret\nonly-one-column\n")
    report = admin.import_users(config, str(csv_path), Fernet.generate_key().decode(), force=False)
    assert report.lines == [
        "imported 0, unchanged 0, skipped 1",
        "  line 2: expected 2 columns (user_id,encrypted_secret), got 1",
    ]
    with pytest.raises(admin.AdminError, match="not a valid Fernet key"):
        admin.import_users(config, str(csv_path), "not-a-key", force=False)


def test_rotation_with_keys_that_open_nothing_names_the_users_and_fails(config: Config, tmp_path: Path) -> None:
    secret = enrol(config, "alice")
    other = make_config(tmp_path, "http://127.0.0.1:9")  # the same store, other keys
    with pytest.raises(admin.AdminError) as failed:
        admin.rotate_keys(other)
    message = str(failed.value)
    assert "'alice' does not decrypt" in message and "FAILED 1: keep the old keys" in message
    assert secret not in message
    assert admin.rotate_keys(config).startswith("rotated 0, already current 1")


def test_a_store_that_cannot_open_is_a_store_error(tmp_path: Path) -> None:
    broken = make_config(tmp_path, "http://127.0.0.1:9", store={"url": f"sqlite:///{tmp_path}/no/dir/gw.db"})
    with pytest.raises(StoreError):
        admin.user_command(broken, "list")


# -- at scale: every topology, progress, stop and rerun (issue 13 §5) ---------------------------

_STORES = {"redis": "redis_server", "sentinel": "redis_sentinel", "cluster": "redis_cluster"}


@pytest.fixture(params=["sqlite", "redis", "sentinel", "cluster"])
def old_and_new(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Config, Config]:
    """Two configs on one fresh store: under the old key, and under a new key with the old kept."""
    store: dict[str, Any] = {"url": f"sqlite:///{tmp_path}/gw.db"}
    if request.param in _STORES:
        server = request.getfixturevalue(_STORES[request.param])
        store = {"url": server.url, "prefix": f"adm{uuid.uuid4().hex[:8]}"}
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    old = make_config(tmp_path, "http://127.0.0.1:9", store=store, env={ENV_KEYS: old_key})
    new = make_config(tmp_path, "http://127.0.0.1:9", store=store, env={ENV_KEYS: f"{new_key},{old_key}"})
    return old, new


def _enrol_many(config: Config, users: list[str]) -> None:
    box = SecretBox(config.encryption.keys)

    async def work() -> None:
        store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
        await store.open()
        try:
            await asyncio.gather(*(store.set_secret(u, box.encrypt(u, new_secret())) for u in users))
        finally:
            await store.close()

    asyncio.run(work())


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_list_and_rotate_see_every_user_on_every_topology(old_and_new: tuple[Config, Config]) -> None:
    old, new = old_and_new
    # Enough users that a Cluster spreads them over all three masters.
    users = sorted(f"user-{i:03d}" for i in range(300))
    _enrol_many(old, users)
    assert admin.user_command(new, "list").split("\n") == users
    log = _Stream(tty=False)
    assert admin.rotate_keys(new, progress=log).startswith("rotated 300, already current 0")
    assert log.getvalue().splitlines()[-1] == "keys rotate: 300/300"
    # Every secret is now under the newest key: the old key alone opens none of them.
    with pytest.raises(admin.AdminError, match="FAILED 300"):
        admin.rotate_keys(old, progress=io.StringIO())
    assert admin.rotate_keys(new, progress=io.StringIO()).startswith("rotated 0, already current 300")


@pytest.fixture
def line_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress writes a line at every step, so a test's stream can stop the command there."""
    init = admin.Progress.__init__

    def patched(self: admin.Progress, label: str, total: int, stream: Any = None, **_: Any) -> None:
        init(self, label, total, stream, every=1)

    monkeypatch.setattr(admin.Progress, "__init__", patched)


class _StopAt(_Stream):
    """A log that sends ``signum`` to this process when the command reports ``at`` done."""

    def __init__(self, at: str, signum: int) -> None:
        super().__init__(tty=False)
        self._at, self._signum = at, signum

    def write(self, text: str) -> int:
        if f": {self._at}/" in text:
            os.kill(os.getpid(), self._signum)
        return super().write(text)


@pytest.mark.usefixtures("line_per_step")
def test_a_stopped_rotation_leaves_no_user_half_done_and_a_rerun_finishes(old_and_new: tuple[Config, Config]) -> None:
    old, new = old_and_new
    total = 3 * admin.ROTATE_BATCH
    _enrol_many(old, [f"stop-{i:03d}" for i in range(total)])
    with pytest.raises(admin.AdminError, match=r"run the command again") as stopped:
        admin.rotate_keys(new, progress=_StopAt(str(admin.ROTATE_BATCH), signal.SIGTERM))  # a service manager
    found = re.search(r"stopped: (\d+) rotated of (\d+) secrets", str(stopped.value))
    assert found is not None and int(found[2]) == total
    assert admin.ROTATE_BATCH <= int(found[1]) < total
    # The rerun skips what the first run did (counted current) and rotates the rest.
    done = re.match(r"rotated (\d+), already current (\d+):", admin.rotate_keys(new, progress=io.StringIO()))
    assert done is not None and int(done[1]) + int(done[2]) == total
    assert int(done[2]) >= admin.ROTATE_BATCH and int(done[1]) <= total - int(found[1])
    with pytest.raises(admin.AdminError, match=f"FAILED {total}"):  # none is left under the old key alone
        admin.rotate_keys(old, progress=io.StringIO())


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    tty, log = _Stream(tty=True), _Stream(tty=False)
    clock = iter(float(t) for t in range(100))
    bar = admin.Progress("keys rotate", 4, tty, clock=lambda: next(clock))
    lines = admin.Progress("keys rotate", 4, log, every=2, seconds=3600, clock=lambda: 0.0)
    for _ in range(4):
        bar.advance()
        lines.advance()
    bar.finish()
    lines.finish()
    assert tty.getvalue().endswith("\rkeys rotate [##############################] 4/4\n")
    assert log.getvalue() == "keys rotate: 2/4\nkeys rotate: 4/4\n"


@pytest.mark.usefixtures("line_per_step")
def test_a_stopped_import_resumes_without_overwriting(config: Config, tmp_path: Path) -> None:
    source_key = Fernet.generate_key().decode()
    rows = [(f"imp-{i}", new_secret()) for i in range(5)]
    csv_path = tmp_path / "users.csv"
    csv_path.write_text("".join(f"{u},{Fernet(source_key).encrypt(s.encode()).decode()}\n" for u, s in rows))
    with pytest.raises(admin.AdminError, match=r"run the command again") as stopped:
        admin.import_users(config, str(csv_path), source_key, force=False, progress=_StopAt("2", signal.SIGINT))
    found = re.search(r"stopped: (\d) of 5 rows read, (\d) imported", str(stopped.value))
    assert found is not None and 1 <= int(found[2]) < 5
    # The rerun finds those already there (same secret: unchanged, not rewritten) and adds the rest.
    report = admin.import_users(config, str(csv_path), source_key, force=False, progress=io.StringIO())
    assert (report.imported, report.unchanged, report.problems) == (5 - int(found[2]), int(found[2]), [])
    assert admin.user_command(config, "list").split("\n") == [u for u, _ in rows]


@pytest.mark.parametrize("content", [b"key\xe9\xff-not-utf8", b"\x80abc"])
def test_an_unreadable_source_key_file_is_named_and_no_byte_of_it_is_quoted(tmp_path: Path, content: bytes) -> None:
    # A UnicodeDecodeError's own text quotes the byte it failed on: a byte of the old app's key.
    key_file = tmp_path / "old.key"
    key_file.write_bytes(content)
    with pytest.raises(admin.AdminError) as caught:
        admin.read_source_key(None, str(key_file))
    message = str(caught.value)
    assert "--source-key-file" in message and "not UTF-8" in message, message
    assert not re.search(r"0x[0-9a-f]{2}|position", message), message
    with pytest.raises(admin.AdminError, match="NUL"):
        admin.read_source_key(None, "old\0.key")
