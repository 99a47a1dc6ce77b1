"""Key faults against a real ``gateway run`` process (issue 14 §1 "Key faults").

* The gateway restarted without the key that encrypted the stored secrets: the users whose
  secret does not open are denied, each with one log line naming the user and the missing key
  (never the key, the secret or a code); they are never taken for "not enrolled" (that would
  let anyone holding the first factor enrol a new authenticator over the victim's); the stored
  ciphertext is left as it was; when the key returns the same users verify again.
* ``gateway keys rotate`` (the real command) while a load of code checks runs: no check fails,
  and afterwards the store holds only ciphertexts under the new key.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyotp
import pytest
from cryptography.fernet import Fernet, InvalidToken

from gateway.config import ENV_KEYS, ENV_PEPPER
from gateway.crypto import SecretBox
from gateway.totp import new_secret
from tests.support.load import Replica, check_codes, keys_rotate, who
from tests.support.recorder import Recorder
from tests.support.servers import ROOT


def _key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    upstream = Recorder().start()
    try:
        yield upstream
    finally:
        upstream.stop()


def _seed(db: Path, key: str, users: list[str]) -> dict[str, str]:
    """Active secrets for ``users`` under ``key``, written with sqlite3 (the store's schema is
    made by a gateway that ran first); the base32 secrets."""
    box = SecretBox([key])
    secrets = {user: new_secret() for user in users}
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO secrets (user, secret) VALUES (?, ?)",
            [(user, box.encrypt(user, secret)) for user, secret in secrets.items()],
        )
    return secrets


def _stored(db: Path) -> dict[str, bytes]:
    with sqlite3.connect(db) as conn:
        return {str(u): bytes(s) for u, s in conn.execute("SELECT user, secret FROM secrets")}


def _pending(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM pending").fetchone()[0])


def _code(secret: str, offset: int = 0) -> str:
    return pyotp.TOTP(secret).at(time.time() + offset * 30)


def _start_once(base: Path, db: Path, recorder: Recorder, keys: dict[str, str]) -> None:
    """A gateway started and stopped once, so the store's schema exists before seeding."""
    with Replica(base, "schema", f"sqlite:///{db}", recorder.url, keys):
        pass


def test_missing_key_denies_the_user_keeps_the_data_and_recovers(recorder: Recorder, tmp_path: Path) -> None:
    old_key, other_key = _key(), _key()
    pepper = _key()
    db = tmp_path / "gateway.db"
    store_url = f"sqlite:///{db}"
    _start_once(tmp_path, db, recorder, {ENV_KEYS: old_key, ENV_PEPPER: pepper})
    secrets = _seed(db, old_key, ["victim"])
    # A mix: the store also holds a secret under the key the gateway will have, so the start-up
    # check (none opens: refuse) lets it start, and the victim is denied on its own.
    secrets |= _seed(db, other_key, ["bystander"])
    before = _stored(db)
    seen_before = len(recorder.snapshot()[0])

    # Restarted with only a different key: the one that encrypted the secret is missing.
    wrong = {ENV_KEYS: other_key, ENV_PEPPER: pepper}
    with Replica(tmp_path, "wrong", store_url, recorder.url, wrong) as gw, httpx.Client(timeout=10) as http:
        no_code = http.get(gw.url + "/app", headers=who("victim"))
        with_code = http.get(gw.url + "/app", headers={**who("victim"), "X-2FA-Code": _code(secrets["victim"])})
        # The attack: first factor only, asking to enrol a new authenticator.
        setup = http.post(gw.url + "/setup-2fa", headers=who("victim"))
        verify = http.post(gw.url + "/verify-2fa", headers=who("victim"), json={"code": _code(secrets["victim"], 1)})
        # Users unaffected by the missing key: one verifies, one is told to enrol, as before.
        bystander = http.get(gw.url + "/app", headers={**who("bystander"), "X-2FA-Code": _code(secrets["bystander"])})
        stranger = http.get(gw.url + "/app", headers=who("stranger"))
    log = gw.output.read_text()

    for r in (no_code, with_code, verify):
        assert (r.status_code, r.json()["error"]) == (500, "internal_error"), r.text
    assert setup.status_code == 500 and "otpauth_uri" not in setup.text, setup.text
    assert (stranger.status_code, stranger.json()["error"]) == (403, "2fa_not_enrolled")
    assert bystander.status_code == 200, bystander.text
    reached = recorder.snapshot()[0][seen_before:]
    assert [r.header("remote-user") for r in reached] == [["bystander"]]  # the victim reached nothing
    assert _stored(db) == before  # the ciphertext is untouched
    assert _pending(db) == 0  # no enrolment was begun over it
    lines = [line for line in log.splitlines() if "does not decrypt" in line]
    assert len(lines) == 4 and all("user='victim'" in line and ENV_KEYS in line for line in lines), log
    assert all(s not in log for s in (old_key, other_key, pepper, secrets["victim"])), log
    assert "Traceback" not in log, log

    # The key returns (second in the list, as after a botched rotation): the same user verifies.
    right = {ENV_KEYS: f"{other_key},{old_key}", ENV_PEPPER: pepper}
    with Replica(tmp_path, "right", store_url, recorder.url, right) as gw, httpx.Client(timeout=10) as http:
        ok = http.get(gw.url + "/app", headers={**who("victim"), "X-2FA-Code": _code(secrets["victim"], 1)})
    assert ok.status_code == 200, ok.text
    assert _stored(db) == before


def test_start_refused_when_no_stored_secret_opens_with_the_keys(recorder: Recorder, tmp_path: Path) -> None:
    old_key, other_key, pepper = _key(), _key(), _key()
    db = tmp_path / "gateway.db"
    _start_once(tmp_path, db, recorder, {ENV_KEYS: old_key, ENV_PEPPER: pepper})
    secrets = _seed(db, old_key, [f"user-{i}" for i in range(30)])
    before = _stored(db)
    gw = Replica(tmp_path, "refused", f"sqlite:///{db}", recorder.url, {ENV_KEYS: other_key, ENV_PEPPER: pepper})
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(gw.config_path)],
        env={**env, ENV_KEYS: other_key, ENV_PEPPER: pepper},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done.stderr
    assert f"none of 20 stored secrets decrypts with the keys in {ENV_KEYS}" in done.stderr, done.stderr
    output = done.stdout + done.stderr
    assert all(s not in output for s in (old_key, other_key, pepper, *secrets.values())), output
    assert "Traceback" not in output, output
    assert _stored(db) == before
    # With the key back (second, after the new one) it starts and the users verify.
    keys = {ENV_KEYS: f"{other_key},{old_key}", ENV_PEPPER: pepper}
    with Replica(tmp_path, "back", f"sqlite:///{db}", recorder.url, keys) as gw, httpx.Client(timeout=10) as http:
        ok = http.get(gw.url + "/app", headers={**who("user-7"), "X-2FA-Code": _code(secrets["user-7"])})
    assert ok.status_code == 200, ok.text


# -- rotation under load -------------------------------------------------------------------------

USERS = 600
# Each user is sent two codes: the current step's, then the next step's, each computed when it
# is sent. The window accepts both and the replay guard (RFC 6238 §5.2) each once, whenever the
# step changes; so every user is checked twice, and each check reads the store before it grants
# (factors._accept: active_fresh) and writes it (advance_step).
OFFSETS = (0, 1)


def _under(key: str, token: bytes) -> bool:
    try:
        Fernet(key).decrypt(token)
    except InvalidToken:
        return False
    return True


async def _watch_mix(db: Path, seeded: dict[str, bytes], mixes: list[int], stop: asyncio.Event) -> None:
    """How many stored secrets the rotation has rewritten, sampled while the checks run: a
    value strictly between 0 and USERS shows checks ran against a store half rotated."""
    while not stop.is_set():
        rows = await asyncio.to_thread(_stored, db)
        mixes.append(sum(rows[user] != token for user, token in seeded.items()))
        await asyncio.sleep(0.01)


async def test_rotation_while_codes_are_checked_fails_none(recorder: Recorder, tmp_path: Path) -> None:
    old_key, new_key, pepper = _key(), _key(), _key()
    db = tmp_path / "gateway.db"
    keys = {ENV_KEYS: f"{new_key},{old_key}", ENV_PEPPER: pepper}
    _start_once(tmp_path, db, recorder, keys)
    secrets = _seed(db, old_key, [f"rot-{i:04d}" for i in range(USERS)])
    seeded = _stored(db)
    with Replica(tmp_path, "gw", f"sqlite:///{db}", recorder.url, keys) as gateway:
        done: list[tuple[float, float, int]] = []
        mixes: list[int] = []
        stop = asyncio.Event()
        # Each user's current step's code, then the next step's, each made when it is sent.
        work = [
            (user, functools.partial(_code, secret, offset)) for offset in OFFSETS for user, secret in secrets.items()
        ]
        checks = asyncio.create_task(check_codes(gateway.url, work, done, clients=12))
        watch = asyncio.create_task(_watch_mix(db, seeded, mixes, stop))
        while len(done) < 30:  # the load is under way before the rotation starts
            await asyncio.sleep(0.02)
        started = time.monotonic()
        returncode, out, err = await keys_rotate(gateway.config_path, keys, 60)
        ended = time.monotonic()
        await asyncio.wait_for(checks, 60)
        stop.set()
        await watch
    assert returncode == 0, err
    assert out.startswith(f"rotated {USERS}, already current 0"), out
    during = [status for start, end, status in done if end > started and start < ended]
    failed = [status for _, _, status in done if status != 200]
    print(f"checks {len(done)}, during the rotation {len(during)}, failed {len(failed)}, mixes {sorted(set(mixes))}")
    assert (len(done), failed) == (USERS * len(OFFSETS), [])
    assert during, "no code check overlapped the rotation"
    stored = _stored(db)
    assert len(stored) == USERS
    assert all(_under(new_key, t) and not _under(old_key, t) for t in stored.values())
    assert any(0 < m < USERS for m in mixes), mixes
