"""The ``gateway`` command, run as a real subprocess with a config file and keys in the environment."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pyotp
import pytest
from cryptography.fernet import Fernet

from gateway import cli as cli_module
from gateway import config as config_module
from gateway.config import Config
from gateway.demo.state import demo_config, prepare_state
from gateway.factors import Accepted, SecondFactor
from gateway.store import Quota, Store, open_store_from_url
from tests.conftest import RedisServer, need_binary
from tests.support.servers import ROOT, GatewayServer, UpstreamProcess, enrol, free_port, init_store_of, wait_for_port


def encrypt_secret(secret: str, encryption_key: str) -> str:
    """What two_fast_auth 1.1.0 stored (``TwoFactorAuth.encrypt_secret`` in ``core.py``, as
    published on PyPI): ``Fernet(key).encrypt(secret.encode()).decode()``, no user binding."""
    return Fernet(encryption_key.encode()).encrypt(secret.encode()).decode()


class Cli:
    """One gateway installation: a config file in tmp_path, its keys in the environment."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "gateway.toml"
        self.path.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/gateway.db"\n\n[session]\nsecure = false\n')
        self.env = {
            config_module.ENV_KEYS: Fernet.generate_key().decode(),
            config_module.ENV_PEPPER: Fernet.generate_key().decode(),
        }
        init_store_of(self.path, self.env)  # `gateway store init`, as the README's steps

    @property
    def config(self) -> Config:
        return config_module.load(self.path, env=self.env)

    def __call__(self, *args: str, config: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "gateway", *args] + (["--config", str(self.path)] if config else [])
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | self.env
        return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


T = TypeVar("T")


def with_store(config: Config, work: Callable[[Store, SecondFactor], Awaitable[T]], at: float | None = None) -> T:
    """Run ``work(store, factors)`` against ``config``'s store, opened and closed around it."""

    async def run() -> T:
        store = open_store_from_url(config.store.url, config.store.prefix, create=config.store.create == "if_missing")
        await store.open()
        try:
            clock = time.time if at is None else (lambda: at)
            return await work(store, SecondFactor(config, store, clock=clock))
        finally:
            await store.close()

    return asyncio.run(run())


def login_works(config: Config, user: str, secret: str, at: float | None = None) -> bool:
    """A code for ``secret`` opens ``user``'s second factor under ``config``'s keys."""
    at = time.time() if at is None else at

    async def check(store: Store, factors: SecondFactor) -> bool:
        outcome = await factors.check_code(user, pyotp.TOTP(secret).at(at), None)
        return isinstance(outcome, Accepted)

    return with_store(config, check, at)


def seed(config: Config) -> None:
    """alice: enrolled, 10 recovery codes, locked out, 2 sessions; bob: enrolment pending;
    198.51.100.7: locked out."""

    async def work(store: Store, factors: SecondFactor) -> None:
        await factors.new_recovery_codes("alice")
        for _ in range(config.limits.max_failures):
            await store.take_attempt([Quota("user:alice", config.limits.max_failures, 900)], time.time())
        await factors.begin_enrolment("bob")
        await factors.open_session("alice")
        await factors.open_session("alice")
        for _ in range(config.limits.ip_max_failures):
            await store.take_attempt([Quota("ip:198.51.100.7", config.limits.ip_max_failures, 900)], time.time())

    enrol(config, "alice")
    with_store(config, work)


def seed_sessions_and_codes(config: Config, user: str) -> None:
    async def work(store: Store, factors: SecondFactor) -> None:
        await factors.new_recovery_codes(user)
        await factors.open_session(user)

    with_store(config, work)


def address_locked(config: Config, address: str) -> bool:
    async def check(store: Store, factors: SecondFactor) -> bool:
        return await store.locked_until(f"ip:{address}", time.time()) is not None

    return with_store(config, check)


# -- keygen and check-config -------------------------------------------------------------------


def test_keygen_prints_a_new_fernet_key(cli: Cli) -> None:
    first, second = cli("keygen", config=False), cli("keygen", config=False)
    assert first.returncode == 0 and first.stdout.strip() != second.stdout.strip()
    Fernet(first.stdout.strip().encode())  # a valid key


def test_check_config_exit_codes(cli: Cli, tmp_path: Path) -> None:
    ok = cli("check-config")
    assert ok.returncode == 0 and ok.stdout.startswith("ok: ")
    assert cli.env[config_module.ENV_KEYS] not in ok.stdout + ok.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text('[store]\nurl = "mysql://x"\n[session]\nsecrue = false\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(bad)],
        env={**os.environ, **cli.env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "store.url" in result.stderr and "session.secrue: unknown key" in result.stderr

    missing = cli("check-config", "--config", str(tmp_path / "nope.toml"), config=False)
    assert missing.returncode == 1 and "no such file" in missing.stderr

    cli.env.pop(config_module.ENV_PEPPER)
    assert "encryption.recovery_pepper" in cli("check-config").stderr


# -- users -------------------------------------------------------------------------------------


def test_users_list_show_unlock_reset(cli: Cli) -> None:
    seed(cli.config)
    listed = cli("users", "list")
    assert listed.returncode == 0 and listed.stdout.split() == ["alice", "bob"]

    shown = cli("users", "show", "alice")
    assert shown.returncode == 0
    assert "enrolled: yes" in shown.stdout and "recovery codes left: 10" in shown.stdout
    assert "locked: until" in shown.stdout
    assert "enrolment pending" in cli("users", "show", "bob").stdout

    unlocked = cli("users", "unlock", "alice")
    assert unlocked.returncode == 0 and "unlocked alice" in unlocked.stdout
    assert "locked: no" in cli("users", "show", "alice").stdout

    assert "sessions: 2" in cli("users", "show", "alice").stdout
    logout = cli("users", "logout", "alice")
    assert logout.returncode == 0 and "ended 2 2FA session(s) of alice" in logout.stdout
    assert "sessions: 0" in cli("users", "show", "alice").stdout
    assert "enrolled: yes" in cli("users", "show", "alice").stdout  # the secret stays

    assert address_locked(cli.config, "198.51.100.7")
    by_address = cli("users", "unlock", "--address", "198.51.100.7")
    assert by_address.returncode == 0 and "unlocked address 198.51.100.7" in by_address.stdout
    assert not address_locked(cli.config, "198.51.100.7")
    neither = cli("users", "unlock")
    assert neither.returncode == 1 and "--address" in neither.stderr

    reset = cli("users", "reset", "alice")
    assert reset.returncode == 0 and "must enrol again" in reset.stdout
    assert cli("users", "list").stdout.split() == ["bob"]

    for command in ("show", "reset", "unlock", "logout"):
        nobody = cli("users", command, "nobody")
        assert nobody.returncode == 1 and "no such user: nobody" in nobody.stderr


def test_users_import_from_two_fast_auth(cli: Cli, tmp_path: Path) -> None:
    old_key = Fernet.generate_key().decode()
    alice, bob, carol = pyotp.random_base32(), pyotp.random_base32(), pyotp.random_base32()
    rows = [
        "user_id,encrypted_secret",
        f"alice,{encrypt_secret(alice, old_key)}",
        f"bob,{encrypt_secret(bob.lower(), old_key)}",  # the old library never normalised case
        f"mallory,{encrypt_secret(alice, Fernet.generate_key().decode())}",  # another key
        "trent,not-a-token",
        f"eve,{encrypt_secret('not base32!', old_key)}",
        f"walter,{encrypt_secret('JBSWY3DP', old_key)}",  # 40 bits: too short to keep
        "only-one-column",
        f",{encrypt_secret(carol, old_key)}",
        f'"carol",{encrypt_secret(carol, old_key)}',
    ]
    csv_path = tmp_path / "users.csv"
    csv_path.write_text("\n".join(rows) + "\n")

    first = cli("users", "import", str(csv_path), "--source-key", old_key)
    assert first.returncode == 1, first.stderr  # some rows were bad: a failure, with the rest imported
    assert first.stdout.splitlines()[0] == "imported 3, unchanged 0, skipped 6"
    for line in (4, 5, 6, 7, 8, 9):
        assert f"line {line}" in first.stdout
    assert old_key not in first.stdout + first.stderr
    assert alice not in first.stdout + first.stderr

    config = cli.config
    at = time.time()
    assert login_works(config, "alice", alice, at) and login_works(config, "bob", bob, at)
    assert login_works(config, "carol", carol, at)

    again = cli("users", "import", str(csv_path), "--source-key", old_key)
    assert again.stdout.splitlines()[0] == "imported 0, unchanged 3, skipped 6"

    # A user who enrolled with the gateway meanwhile keeps that secret unless --force.
    csv_path.write_text(f"alice,{encrypt_secret(pyotp.random_base32(), old_key)}\n")
    conflict = cli("users", "import", str(csv_path), "--source-key", old_key)
    assert conflict.returncode == 1 and "already enrolled with another secret" in conflict.stdout
    key_file = tmp_path / "old.key"
    key_file.write_text(old_key + "\n")
    seed_sessions_and_codes(config, "alice")
    forced = cli("users", "import", str(csv_path), "--source-key-file", str(key_file), "--force")
    assert forced.returncode == 0 and forced.stdout.startswith("imported 1,")
    # The replaced authenticator's sessions and recovery codes ended with it.
    shown = cli("users", "show", "alice").stdout
    assert "sessions: 0" in shown and "recovery codes left: 0" in shown

    bad_key = cli("users", "import", str(csv_path), "--source-key", "not-a-key")
    assert bad_key.returncode == 1 and "not a valid Fernet key" in bad_key.stderr
    missing = cli("users", "import", str(tmp_path / "nope.csv"), "--source-key", old_key)
    assert missing.returncode == 1 and "cannot read" in missing.stderr


# -- keys ----------------------------------------------------------------------------------------


def test_keys_rotate_keeps_every_user_able_to_log_in(cli: Cli, tmp_path: Path, upstream: UpstreamProcess) -> None:
    old_key = cli.env[config_module.ENV_KEYS]
    secrets = {user: enrol(cli.config, user) for user in ("alice", "bob", "carol")}

    new_key = Fernet.generate_key().decode()
    cli.env[config_module.ENV_KEYS] = f"{new_key},{old_key}"  # newest first
    rotated = cli("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "rotated 3, already current 0" in rotated.stdout
    assert "rotated 0, already current 3" in cli("keys", "rotate").stdout

    # The old key is gone: every user still logs in, through a real gateway.
    cli.env[config_module.ENV_KEYS] = new_key
    config = config_module.parse(
        {"store": {"url": cli.config.store.url}, "session": {"secure": False}, "upstream": {"url": upstream.url}},
        env=cli.env,
    )
    server = GatewayServer(config).start()
    try:
        for user, secret in secrets.items():
            r = httpx.get(f"{server.url}/echo/x", headers={"Remote-User": user, "X-2FA-Code": pyotp.TOTP(secret).now()})
            assert r.status_code == 200, (user, r.text)
    finally:
        server.stop()

    # Keys that open nothing: rotation fails loudly and changes nothing.
    cli.env[config_module.ENV_KEYS] = Fernet.generate_key().decode()
    failed = cli("keys", "rotate")
    assert failed.returncode == 1 and "FAILED 3" in failed.stderr


def test_store_errors_exit_1(cli: Cli, tmp_path: Path) -> None:
    cli.path.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/no/such/dir/gateway.db"\n')
    for args in (("users", "list"), ("keys", "rotate")):
        result = cli(*args)
        assert result.returncode == 1 and "store error" in result.stderr


# -- demo (the full run is tests/integration/test_browser.py) -----------------------------------


def test_demo_state_is_made_once_and_private(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    prepare_state(state)
    first = {name: (state / name).read_text() for name in ("encryption.key", "recovery.pepper", "jwt.secret")}
    prepare_state(state)
    assert {name: (state / name).read_text() for name in first} == first
    assert state.stat().st_mode & 0o777 == 0o700
    assert all((state / name).stat().st_mode & 0o777 == 0o600 for name in first)
    config = demo_config(state, "127.0.0.1", 8080, 9999)
    assert config.identity.mode == "jwt" and not config.session.secure
    assert config.upstream.url == "http://127.0.0.1:9999"


def test_demo_on_a_busy_port_says_so(cli: Cli, tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port()))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = cli("demo", "--port", port, "--dir", str(tmp_path / "demo"), config=False)
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_run_with_an_unreachable_redis_fails_fast(cli: Cli) -> None:
    cli.path.write_text(f'[store]\nurl = "redis://127.0.0.1:{free_port()}/0"\n')
    result = cli("run")  # the subprocess timeout is what catches a hang
    assert result.returncode == 1
    assert "is unreachable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "template",
    [
        "redis://:{pw}@127.0.0.1:{port}/0",
        "redis://gw:{pw}@127.0.0.1:{port}/0",
        "redis://:{pw}@x@127.0.0.1:{port}/0",  # an unencoded "@" inside the password
        "redis://127.0.0.1:{port}/0?password={pw}",
        "unix:///nonexistent/redis.sock?db=0&password={pw}",
    ],
)
def test_run_never_prints_the_store_password_when_the_store_is_down(cli: Cli, template: str) -> None:
    password = "pw" + secrets.token_hex(12)
    cli.path.write_text("")
    cli.env[config_module.ENV_STORE_URL] = template.format(pw=password, port=free_port())
    result = cli("run")
    leaked = password in result.stdout + result.stderr
    assert not leaked, "the password appears in the output"
    assert result.returncode == 1 and "is unreachable" in result.stderr
    assert "***" in result.stderr  # the URL is shown whole, with the password redacted


def test_run_never_prints_the_store_password_at_start_up(cli: Cli, tmp_path: Path) -> None:
    """A real Redis that requires the password: ``gateway run`` starts, serves, stops; nothing
    it printed on the way (at debug level, access log on) holds the password."""
    password = "pw" + secrets.token_hex(12)
    port = free_port()
    redis = RedisServer(need_binary("redis-server"), "--requirepass", password)
    redis_port = redis.port
    redis.start()
    try:
        cli.path.write_text(
            f'[server]\nport = {port}\nlog_level = "debug"\naccess_log = true\n[store]\ncreate = "if_missing"\n'
        )
        cli.env[config_module.ENV_STORE_URL] = f"redis://default:{password}@127.0.0.1:{redis_port}/0"
        argv = [sys.executable, "-m", "gateway", "run", "--config", str(cli.path)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | cli.env
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_port(port)
            ready = httpx.get(f"http://127.0.0.1:{port}/_gateway/ready", timeout=30)
        finally:
            proc.terminate()
            output, _ = proc.communicate(timeout=30)
    finally:
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)
    assert ready.status_code == 200  # it did reach Redis with the password
    assert "gateway ready" in output and "default:***@127.0.0.1" in output
    leaked = password in output
    assert not leaked, "the password appears in the output"


# -- the command line itself (issue 12 §2.6) ------------------------------------------------------


def test_version(cli: Cli) -> None:
    result = cli("--version", config=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"gateway {importlib.metadata.version('gateway')}"


CONFIG_ENVIRONMENT = (
    config_module.ENV_CONFIG,
    config_module.ENV_KEYS,
    config_module.ENV_PEPPER,
    config_module.ENV_JWT_SECRET,
    config_module.ENV_STORE_URL,
)


@pytest.mark.parametrize(
    "command",
    [
        ("run",),
        ("check-config",),
        ("users",),
        ("users", "list"),
        ("users", "show"),
        ("users", "reset"),
        ("users", "logout"),
        ("users", "unlock"),
        ("users", "import"),
        ("keys",),
        ("keys", "rotate"),
    ],
)
def test_help_of_a_command_that_loads_a_config_names_what_it_reads(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_module.main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--config" in out and "(default: $GATEWAY_CONFIG, then ./gateway.toml)" in " ".join(out.split())
    for name in CONFIG_ENVIRONMENT:
        assert name in out, (command, name)


@pytest.mark.parametrize(("command", "says"), [("keygen", "none is read"), ("demo", "none is read")])
def test_help_of_a_command_that_reads_no_environment_says_so(
    command: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli_module.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert says in out
    assert config_module.ENV_KEYS not in out
    if command == "demo":  # and its defaults
        assert "(default: 8080)" in out and "(default: 127.0.0.1)" in out and "./.gateway-demo" in out


def test_users_manage_the_demos_users(cli: Cli, tmp_path: Path) -> None:
    """`gateway users ... --demo --dir D` works on the store `gateway demo --dir D` made, with its
    keys, and no config file or GATEWAY_* variable at all."""
    state = tmp_path / "demo"
    nothing_yet = cli("users", "list", "--demo", "--dir", str(state), config=False)
    assert nothing_yet.returncode == 1 and "start `gateway demo` first" in nothing_yet.stderr
    prepare_state(state)
    config = demo_config(state, "127.0.0.1", 8080, 9999)
    secret = enrol(config, "alice")
    cli.env = {}  # the demo's keys are its own files
    listed = cli("users", "list", "--demo", "--dir", str(state), config=False)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["alice"]
    shown = cli("users", "show", "alice", "--demo", "--dir", str(state), config=False)
    assert "enrolled: yes" in shown.stdout and secret not in shown.stdout
    reset = cli("users", "reset", "alice", "--demo", "--dir", str(state), config=False)
    assert reset.returncode == 0 and "must enrol again" in reset.stdout
    assert cli("users", "list", "--demo", "--dir", str(state), config=False).stdout.strip() == "(no users)"


HOSTS = '[server]\nallowed_hosts = ["app.example.com"]\n'
DANGEROUS = 'trusted_proxies = ["0.0.0.0/0"]\n\n[identity]\nmode = "header"\n'


def test_check_config_warns_on_stderr_and_fails_only_when_strict(cli: Cli) -> None:
    """Issue 12 §2.5: a config that loads but lets anyone claim any user says so, naming the key."""
    cli.path.write_text(cli.path.read_text() + HOSTS)  # without, any forwarded Host is a warning too
    safe = cli("check-config", "--strict")
    assert safe.returncode == 0 and "warning" not in safe.stderr

    cli.path.write_text(cli.path.read_text() + DANGEROUS)
    lenient = cli("check-config")
    assert lenient.returncode == 0 and lenient.stdout.startswith("ok: ")
    assert "warning: server.trusted_proxies[0]" in lenient.stderr
    assert "trusted_proxies" not in lenient.stdout and lenient.stdout.rstrip().endswith("(1 warning(s))")
    strict = cli("check-config", "--strict")
    assert strict.returncode == 1 and "warning: server.trusted_proxies[0]" in strict.stderr
