"""gateway/admin.py in-process, on a real SQLite store: what ``gateway users`` and ``gateway keys``
do. The same commands as real subprocesses, exit codes and all, are tests/test_cli.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from gateway import admin
from gateway.config import Config
from gateway.errors import StoreError
from tests.support.servers import enrol, make_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, "http://127.0.0.1:9")


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
