"""SQLite faults against a real ``gateway run`` (issue 14 §1 "Store faults").

Most run with the database on a 4 MB tmpfs of the gateway's own: the process runs in a private
mount namespace (``unshare --mount``), so a test can fill that file system without touching the
machine's; the test reaches the files through ``/proc/PID/root``. The read-only case runs on the
machine's disk: ``chattr +i`` makes the file and its WAL read-only under the running process,
even to root and through its open descriptors (a chmod binds neither, and a file system cannot
be remounted read-only under a writer: mount answers "busy").

What is right for each fault (README "Security defaults"):
* read-only files, full disk: reads work, so a live session passes; every code is
  denied (503): it takes an attempt and spends its time step, which are writes; readiness
  writes, so it says not ready.
* locked by another process (BEGIN EXCLUSIVE): in WAL mode readers are not blocked, so a
  session may pass; a code waits the store timeout (SQLite's busy timeout) and is denied; so is
  every request queued behind it on the store's one thread (a session too), each within that
  timeout, not one timeout after the other.
* the file deleted (with its -wal and -shm): SQLite would go on with the unlinked inode and lose
  every write at the next restart (every user unenrolled). The store notices within a second,
  logs it once and denies everything until the file is back, then serves again on its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store.sqlite import BUSY_TIMEOUT_MS, FILE_CHECK_INTERVAL
from tests.conftest import REQUIRE_ALL, need_binary
from tests.support.load import SESSION_COOKIE, enrol_user, fetch, who
from tests.support.recorder import SEQ_HEADER, Recorder
from tests.support.servers import ROOT, gateway_process
from tests.support.store_faults import READY, FaultGateway, Prober, recording

pytestmark = pytest.mark.integration

TIMEOUT = BUSY_TIMEOUT_MS / 1000

# Another process's connection: the write lock until its stdin closes.
HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
db.close()
"""
# SQLite's online backup of a live database, as an operator takes it.
BACKUP = "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))"


class Site:
    """The gateway, its data directory as the test sees it, and the namespace's mounts."""

    def __init__(self, gateway: FaultGateway, data: Path) -> None:
        self.gateway = gateway
        self.data = data  # the path inside the namespace
        self.seen = Path(f"/proc/{gateway.pid}/root{data}")  # the same directory, from outside

    @property
    def db(self) -> Path:
        return self.seen / "gateway.db"

    def inside(self, *command: str) -> list[str]:
        """``command`` run in the gateway's mount namespace. (SQLite resolves the symbolic link
        /proc/PID/root to "/" of the caller: opened from outside, the database would be another.)"""
        return [need_binary("nsenter"), "--target", str(self.gateway.pid), "--mount", *command]


def need_root() -> None:
    """Mounting a tmpfs and chattr +i need root (CAP_SYS_ADMIN, CAP_LINUX_IMMUTABLE): skip
    without, as conftest.need_binary does for a missing binary (a failure in CI)."""
    if os.geteuid() != 0:
        message = "the SQLite fault tests mount a tmpfs and chattr files: they need root"
        if REQUIRE_ALL:
            pytest.fail(message + " (GATEWAY_TEST_REQUIRE_ALL=1)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    with recording() as server:
        yield server


@pytest.fixture(scope="module")
def site(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    need_root()
    unshare = need_binary("unshare")
    base = tmp_path_factory.mktemp("sqlite-faults")
    data = base / "data"
    data.mkdir()
    # unshare and sh exec the rest: the process stays the gateway (gateway_process stops it).
    wrap = [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"',
        str(data),
    ]
    with FaultGateway(base, f"sqlite:///{data}/gateway.db", recorder.url, wrap=wrap) as gw:
        yield Site(gw, data)


@pytest.fixture
async def prober(site: Site, recorder: Recorder) -> Prober:
    probe = Prober(site.gateway, recorder, TIMEOUT)
    await probe.enrol()
    await probe.serving()
    return probe


async def test_the_disk_full(site: Site, prober: Prober) -> None:
    filler = site.seen / "filler"
    with pytest.raises(OSError, match="No space left"), filler.open("wb") as f:
        for _ in range(10_000):
            f.write(b"\0" * 65536)
            f.flush()
    try:
        await prober.denied(reads_work=True)
    finally:
        filler.unlink()
    await prober.serving()


async def test_the_database_locked_by_another_process(site: Site, prober: Prober) -> None:
    holder = subprocess.Popen(
        site.inside(sys.executable, "-c", HOLD_LOCK, str(site.data / "gateway.db")),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        assert (await asyncio.to_thread(holder.stdout.readline)).strip() == "locked"
        # More codes at once: they queue on the store's one thread behind the first; each is
        # answered within the store timeout, not one timeout after the other.
        crowd = asyncio.gather(*(prober.code() for _ in range(3)))
        await prober.denied(reads_work=None)
        for reply in await crowd:
            assert (reply.status, reply.error, reply.seq) == (503, "store_unavailable", None), reply
            assert reply.latency < prober.bound, reply
    finally:
        if holder.stdin is not None:
            holder.stdin.close()  # the holder ends, and the lock with it
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    await prober.serving()


async def test_the_database_deleted_under_the_running_gateway(site: Site, prober: Prober) -> None:
    # What an operator restores from, with the sessions opened so far (SQLite's online backup).
    db = str(site.data / "gateway.db")
    subprocess.run(site.inside(sys.executable, "-c", BACKUP, db, str(site.data / "backup.db")), check=True)
    for name in ("gateway.db", "gateway.db-wal", "gateway.db-shm"):
        (site.seen / name).unlink(missing_ok=True)
    await asyncio.sleep(FILE_CHECK_INTERVAL + 0.2)  # the store checks its file once a second
    await prober.denied()
    await prober.denied()  # it stays denied: no empty database was created in the file's place
    assert not site.db.exists()
    lines = [line for line in site.gateway.log().splitlines() if "deleted or replaced" in line]
    assert len(lines) == 1, lines
    shutil.copyfile(site.seen / "backup.db", site.seen / "restoring.db")
    os.rename(site.seen / "restoring.db", site.db)  # whole, in one step
    await prober.serving()
    assert sum("is back; serving again" in line for line in site.gateway.log().splitlines()) == 1


@pytest.fixture
def disk_site(recorder: Recorder, tmp_path: Path) -> Iterator[Site]:
    """A gateway with its database on the machine's own disk (ext4: tmpfs has no chattr)."""
    with FaultGateway(tmp_path, f"sqlite:///{tmp_path}/gateway.db", recorder.url) as gw:
        yield Site(gw, tmp_path)


async def test_the_database_files_made_read_only(disk_site: Site, recorder: Recorder) -> None:
    """``chattr +i``: the file and its WAL become read-only under the running gateway, even to
    root and through the descriptors it has open (a chmod would bind neither; a file system
    cannot be remounted read-only under a writer: mount answers "busy")."""
    need_root()
    chattr = need_binary("chattr")
    site = disk_site
    prober = Prober(site.gateway, recorder, TIMEOUT)
    await prober.enrol(sessions=1, coders=3)
    await prober.serving()
    files = [str(site.data / name) for name in ("gateway.db", "gateway.db-wal")]
    subprocess.run([chattr, "+i", *files], check=True)
    try:
        await prober.denied(reads_work=True)
    finally:
        subprocess.run([chattr, "-i", *files], check=True)
    await prober.serving()


# -- a store that lost its data is never a new, empty one (attacker B, /tmp/atkB a3, a4, a_*) --
def _gateway(*args: str, keys: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``gateway ARGS`` as an operator runs it (no GATEWAY_* of the test's own but ``keys``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | keys
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _unlink_database(data: Path) -> None:
    for name in ("gateway.db", "gateway.db-wal", "gateway.db-shm"):
        (data / name).unlink(missing_ok=True)


async def test_a_deleted_store_stays_refused_by_admin_commands_and_restarts(recorder: Recorder, tmp_path: Path) -> None:
    """The file deleted under a running gateway: ``gateway users list`` must not make an empty
    one that the gateway then takes as "back" (every user unenrolled: the attacker, with the
    victim's first factor only, enrols their own authenticator), nor may a restart start on an
    empty store. The backup, restored, is served again, sessions and all."""
    gw = FaultGateway(tmp_path, f"sqlite:///{tmp_path}/gateway.db", recorder.url)
    db = tmp_path / "gateway.db"
    with gw:
        _, session = await enrol_user(gw.url, "victim")
        subprocess.run([sys.executable, "-c", BACKUP, str(db), str(tmp_path / "backup.db")], check=True)
        _unlink_database(tmp_path)
        await asyncio.sleep(FILE_CHECK_INTERVAL + 0.2)
        assert (await fetch("POST", gw.url + "/setup-2fa", who("victim"))).status_code == 503
        listed = _gateway("users", "list", "--config", str(gw.config_path), keys=gw.keys)
        assert listed.returncode == 1 and "gateway store init" in listed.stderr, listed
        assert not db.exists()  # the command made no empty store in its place
        await asyncio.sleep(FILE_CHECK_INTERVAL + 0.2)
        setup = await fetch("POST", gw.url + "/setup-2fa", who("victim"))
        assert (setup.status_code, setup.json()["error"]) == (503, "store_unavailable"), setup.text
    started = time.monotonic()
    run = _gateway("run", "--config", str(gw.config_path), keys=gw.keys)
    assert run.returncode == 1 and time.monotonic() - started < 15, run
    assert str(db) in run.stderr and "gateway store init" in run.stderr, run.stderr
    assert not db.exists()
    os.rename(tmp_path / "backup.db", db)  # the operator restores the data, then starts it
    with gateway_process(gw.config_path, gw.port, gw.keys, tmp_path / "restored.log", init=False):
        back = await fetch("GET", gw.url + "/app", {**who("victim"), "Cookie": f"{SESSION_COOKIE}={session}"})
        assert back.status_code == 200 and back.headers.get(SEQ_HEADER), back.text


async def test_an_empty_or_foreign_file_in_place_of_the_store_is_refused_until_it_is_back(
    recorder: Recorder, tmp_path: Path
) -> None:
    """A 0-byte file (``: > gateway.db``, an empty backup) or another store's file at the path
    under the running gateway: refused (503, readiness too), one ERROR line each, the file left
    as it is; the store's own backup, moved back, is served again."""
    gw = FaultGateway(tmp_path, f"sqlite:///{tmp_path}/gateway.db", recorder.url)
    db = tmp_path / "gateway.db"
    with gw:
        _, session = await enrol_user(gw.url, "victim")
        cookie = {**who("victim"), "Cookie": f"{SESSION_COOKIE}={session}"}
        subprocess.run([sys.executable, "-c", BACKUP, str(db), str(tmp_path / "backup.db")], check=True)
        for foreign, reason in ((False, "has no store identity"), (True, "is another store")):
            _unlink_database(tmp_path)
            if foreign:
                other = tmp_path / "other"
                other.mkdir()
                init = _gateway("store", "init", "--config", str(_config_at(other)), keys=gw.keys)
                assert init.returncode == 0 and "initialised the store" in init.stdout, init
                os.rename(other / "gateway.db", db)
            else:
                db.write_bytes(b"")
            await asyncio.sleep(FILE_CHECK_INTERVAL + 0.2)
            for method, path, headers in (("POST", "/setup-2fa", who("victim")), ("GET", "/app", cookie)):
                reply = await fetch(method, gw.url + path, headers)
                assert reply.status_code == 503 and not reply.headers.get(SEQ_HEADER), (reason, path, reply.text)
            assert (await fetch("GET", gw.url + READY, {})).status_code == 503
            assert [line for line in gw.log().splitlines() if reason in line and "ERROR" in line], gw.log()
        refusals = [line for line in gw.log().splitlines() if "refusing it" in line]
        assert len(refusals) == 2 and all("ERROR" in line for line in refusals), refusals  # one per fault
        os.rename(tmp_path / "backup.db", db)
        await asyncio.sleep(FILE_CHECK_INTERVAL + 0.2)
        assert (await fetch("GET", gw.url + "/app", cookie)).status_code == 200
        assert (await fetch("GET", gw.url + READY, {})).status_code == 200


def _config_at(base: Path) -> Path:
    path = base / "gateway.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{base}/gateway.db"\n[session]\nsecure = false\n')
    return path


async def test_run_refuses_a_0_byte_store_until_store_init(recorder: Recorder, tmp_path: Path) -> None:
    """``gateway run`` on a 0-byte file (or none: above) is a start-up error naming the path and
    the command; ``gateway store init`` makes the store (a second run changes nothing), then
    ``gateway run`` serves."""
    gw = FaultGateway(tmp_path, f"sqlite:///{tmp_path}/gateway.db", recorder.url)
    db = tmp_path / "gateway.db"
    db.write_bytes(b"")
    run = _gateway("run", "--config", str(gw.config_path), keys=gw.keys)
    assert run.returncode == 1 and str(db) in run.stderr and "gateway store init" in run.stderr, run
    assert db.stat().st_size == 0
    first = _gateway("store", "init", "--config", str(gw.config_path), keys=gw.keys)
    again = _gateway("store", "init", "--config", str(gw.config_path), keys=gw.keys)
    assert first.returncode == 0 and "initialised the store" in first.stdout, first
    assert again.returncode == 0 and "already initialised" in again.stdout, again
    with gateway_process(gw.config_path, gw.port, gw.keys, tmp_path / "run.log", init=False):
        assert (await fetch("GET", gw.url + READY, {})).status_code == 200
