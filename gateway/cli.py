"""The ``gateway`` command.

    gateway run [--config PATH]            serve (uvicorn)
    gateway check-config [--config PATH]   validate; exit 0 with a summary, 1 with every problem
    gateway keygen                         print a new Fernet key (also fine as a pepper)
    gateway demo                           the gateway in front of a demo app, on the embedded store
    gateway users list|show|reset|logout|unlock|import
    gateway keys rotate                    re-encrypt every secret under the newest key

``--config`` defaults to ``$GATEWAY_CONFIG``, then ``./gateway.toml``. Every command prints
one clear result and exits non-zero on failure; none prints a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from gateway import config as config_module
from gateway.config import Config
from gateway.crypto import SecretBox, decrypt_legacy, new_key
from gateway.errors import ConfigError, DecryptError, StoreError
from gateway.logs import configure_logging
from gateway.server import LimitedConfig, client_limits, serve_uvicorn
from gateway.store import Store, open_store_from_url
from gateway.tables import redact_url

T = TypeVar("T")


class CommandError(Exception):
    """A command failed in a way the user can act on; the message is printed as is."""


def _load(path: str | None) -> Config:
    return config_module.load(path or config_module.default_path())


def _print_config_error(exc: ConfigError, path: str | None) -> None:
    print(f"gateway: {len(exc.problems)} problem(s) in {path or config_module.default_path()}:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


async def _with_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    store = open_store_from_url(config.store.url, config.store.prefix, config.store.max_connections)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


# -- run -------------------------------------------------------------------------------------


def _configure_logging(config: Config) -> None:
    jwt_cookie = config.identity.jwt.cookie if config.identity.jwt else None
    configure_logging(
        config.server.log_level,
        headers=(config.totp.header,),
        cookies=tuple(c for c in (config.session.cookie, jwt_cookie) if c),
    )


def _app_factory() -> object:
    """For uvicorn workers > 1: each worker process loads the config the parent checked (and,
    being a fresh process, sets up its own logging)."""
    from gateway.app import create_app

    config = _load(os.environ.get(config_module.ENV_CONFIG))
    _configure_logging(config)
    return create_app(config)


def uvicorn_config(config: Config, app: object) -> LimitedConfig:
    """The one uvicorn configuration of ``gateway run`` and ``gateway demo`` (tests use it too)."""
    server = config.server
    return LimitedConfig(
        app,
        limits=client_limits(server),
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        access_log=server.access_log,
        timeout_keep_alive=server.keepalive_timeout,
        # The gateway reads X-Forwarded-For itself, from trusted proxies only; uvicorn's
        # own rewriting of the client address would let it be spoofed.
        proxy_headers=False,
        server_header=False,
        lifespan="on",
        log_config=None,
        workers=server.workers,
        factory=isinstance(app, str),
    )


def serve(config: Config, config_path: str | None = None) -> int:
    from gateway.app import create_app

    _configure_logging(config)
    try:
        asyncio.run(_with_store(config, lambda store: store.ping()))
    except StoreError as exc:
        print(f"gateway: the store at {redact_url(config.store.url)} is unreachable: {exc}", file=sys.stderr)
        return 1
    if config.server.workers > 1:
        if config_path:
            os.environ[config_module.ENV_CONFIG] = os.path.abspath(config_path)
        started = serve_uvicorn(uvicorn_config(config, "gateway.cli:_app_factory"))
    else:
        started = serve_uvicorn(uvicorn_config(config, create_app(config)))
    return 0 if started else 1


# -- users -----------------------------------------------------------------------------------


def _fmt_time(ts: float | None) -> str:
    return "no" if ts is None else time.strftime("until %Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


async def _users(config: Config, args: argparse.Namespace) -> str:
    from gateway.factors import SecondFactor, address_scope

    async def work(store: Store) -> str:
        factors = SecondFactor(config, store)
        if args.users_command == "list":
            users = await store.list_users()
            return "\n".join(users) if users else "(no users)"
        if args.users_command == "unlock" and args.address:
            # A per-address lock (limits.ip_*) holds everyone behind that address (a NAT, a VPN).
            await store.clear_failures(address_scope(args.address))
            return f"unlocked address {args.address}"
        user: str | None = args.user
        if user is None:
            raise CommandError("name a USER (or, for unlock, --address ADDR)")
        state = await store.user_state(user, time.time())
        if not (state.enrolled or state.pending or state.sessions or state.locked_until or state.failures):
            raise CommandError(f"no such user: {user}")
        if args.users_command == "show":
            return "\n".join(
                [
                    f"user: {user}",
                    f"enrolled: {'yes' if state.enrolled else 'no'}"
                    + (" (enrolment pending)" if state.pending else ""),
                    f"locked: {_fmt_time(state.locked_until)}",
                    f"recent failures: {state.failures}",
                    f"recovery codes left: {state.recovery_codes_left}",
                    f"sessions: {state.sessions}",
                ]
            )
        if args.users_command == "reset":
            await factors.reset_user(user)
            return f"reset {user}: secret, sessions and recovery codes removed; the user must enrol again"
        if args.users_command == "logout":
            ended = await factors.revoke_user_sessions(user)
            return f"ended {ended} 2FA session(s) of {user}; the next request needs a code"
        await factors.unlock(user)
        return f"unlocked {user}"

    return await _with_store(config, work)


async def _import(config: Config, path: str, source_key: str, force: bool) -> tuple[str, int]:
    """Import ``user_id,encrypted_secret`` rows made by two_fast_auth's ``encrypt_secret``."""
    from gateway import totp

    box = SecretBox(config.encryption.keys)
    params = config.totp.params
    try:
        decrypt_legacy(b"", source_key)  # a bad key is one error, not one per row
    except ValueError as exc:
        raise CommandError(f"--source-key: {exc}") from None
    except DecryptError:
        pass  # the key is valid; the empty token is not
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(enumerate(csv.reader(f), start=1))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None

    async def work(store: Store) -> tuple[str, int]:
        imported = unchanged = 0
        problems: list[str] = []
        for line, row in rows:
            if not row or (line == 1 and row[0].strip().lower() in ("user_id", "user", "username")):
                continue
            if len(row) != 2:
                problems.append(f"line {line}: expected 2 columns (user_id,encrypted_secret), got {len(row)}")
                continue
            user, token = row[0].strip(), row[1].strip()
            from gateway.identity import valid_user

            if not valid_user(user):
                problems.append(f"line {line}: invalid user id")
                continue
            try:
                secret = decrypt_legacy(token.encode(), source_key)
                totp.code_at(secret, 0, params)
            except DecryptError:
                problems.append(f"line {line} ({user}): does not decrypt with the source key")
                continue
            except ValueError:
                problems.append(f"line {line} ({user}): the decrypted secret is not a usable TOTP secret")
                continue
            current = await store.get_secret(user)
            if current is not None:
                try:
                    same = box.decrypt(user, current) == secret
                except DecryptError:
                    same = False
                if same:
                    unchanged += 1
                    continue
                if not force:
                    problems.append(f"line {line} ({user}): already enrolled with another secret (--force replaces)")
                    continue
            await store.set_secret(user, box.encrypt(user, secret))
            if current is not None:
                # A replaced authenticator: what the old one opened or came with ends with it.
                await store.revoke_user_sessions(user)
                await store.set_recovery_codes(user, [])
            imported += 1
        lines = [f"imported {imported}, unchanged {unchanged}, skipped {len(problems)}"]
        lines += [f"  {p}" for p in problems]
        return "\n".join(lines), (1 if problems else 0)

    return await _with_store(config, work)


def _source_key(args: argparse.Namespace) -> str:
    if args.source_key is not None:
        return str(args.source_key)
    try:
        with open(args.source_key_file, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read --source-key-file {args.source_key_file}: {exc}") from None


async def _rotate(config: Config) -> str:
    box = SecretBox(config.encryption.keys)

    async def work(store: Store) -> str:
        rotated = current = failed = 0
        for user, token in await store.iter_secrets():
            try:
                if not box.needs_rotation(token):
                    current += 1
                    continue
                new = box.rotate(user, token)
            except DecryptError:
                failed += 1
                print(f"gateway: the secret of {user!r} does not decrypt with any configured key", file=sys.stderr)
                continue
            # Compare-and-set: a user who re-enrolled meanwhile keeps the new secret.
            if await store.replace_secret(user, token, new):
                rotated += 1
            else:
                current += 1
        if failed:
            raise CommandError(f"rotated {rotated}, already current {current}, FAILED {failed}: keep the old keys")
        # Pending enrolments are not rewritten: they live at most totp.pending_ttl and are
        # re-created by starting setup again, so the old key is needed only that long.
        return (
            f"rotated {rotated}, already current {current}: every active secret is under the newest key; "
            f"keep the old key {config.totp.pending_ttl} s more for enrolments pending now"
        )

    return await _with_store(config, work)


# -- main ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="A two-factor authentication gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, leaf: bool = False) -> argparse.ArgumentParser:
        # On a sub-subcommand too (`gateway users list --config X`), where SUPPRESS keeps its
        # absent default from overwriting a --config given before the subcommand.
        default = argparse.SUPPRESS if leaf else None
        p.add_argument(
            "--config", "-c", default=default, help="TOML file (default: $GATEWAY_CONFIG, then ./gateway.toml)"
        )
        return p

    with_config(sub.add_parser("run", help="serve"))
    with_config(sub.add_parser("check-config", help="validate a config file"))
    sub.add_parser("keygen", help="print a new Fernet key")
    demo = sub.add_parser("demo", help="run the gateway in front of a demo app (embedded store)")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--dir", default=None, help="where the demo keeps its state (default: ./.gateway-demo)")

    users = with_config(sub.add_parser("users", help="manage users"))
    users_sub = users.add_subparsers(dest="users_command", required=True)
    with_config(users_sub.add_parser("list", help="every enrolled or enrolling user"), leaf=True)
    for name, text in (
        ("show", "a user's state (never the secret)"),
        ("reset", "remove a user's secret, sessions and recovery codes"),
        ("logout", "end every 2FA session of a user (the secret stays)"),
    ):
        with_config(users_sub.add_parser(name, help=text), leaf=True).add_argument("user")
    unlock = with_config(users_sub.add_parser("unlock", help="lift a user's (or an address's) lockout"), leaf=True)
    unlock.add_argument("user", nargs="?")
    unlock.add_argument("--address", help="lift the lockout of a client address instead (limits.ip_*)")
    imp = with_config(
        users_sub.add_parser("import", help="import two_fast_auth users from a CSV of user_id,encrypted_secret"),
        leaf=True,
    )
    imp.add_argument("file")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--source-key", help="the Fernet key the old app encrypted with")
    source.add_argument("--source-key-file", help="a file holding it (keeps the key out of `ps` and shell history)")
    imp.add_argument(
        "--force",
        action="store_true",
        help="replace a different secret a user already has (ends their sessions and recovery codes)",
    )

    keys = with_config(sub.add_parser("keys", help="manage encryption keys"))
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    with_config(keys_sub.add_parser("rotate", help="re-encrypt every secret under the newest key"), leaf=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keygen":
        print(new_key())
        return 0
    if args.command == "demo":
        from gateway.demo import run_demo

        return run_demo(host=args.host, port=args.port, state_dir=args.dir)
    path = args.config
    try:
        config = _load(path)
    except ConfigError as exc:
        _print_config_error(exc, path)
        return 1
    try:
        if args.command == "check-config":
            print(f"ok: {config.summary()}")
            return 0
        if args.command == "run":
            return serve(config, path)
        if args.command == "users":
            if args.users_command == "import":
                message, code = asyncio.run(_import(config, args.file, _source_key(args), args.force))
                print(message)
                return code
            print(asyncio.run(_users(config, args)))
            return 0
        if args.command == "keys":
            print(asyncio.run(_rotate(config)))
            return 0
    except StoreError as exc:
        print(f"gateway: store error: {exc}", file=sys.stderr)
        return 1
    except CommandError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
