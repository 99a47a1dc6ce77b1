"""The ``gateway`` command: it parses arguments, calls one function, and prints its result.

    gateway run [--config PATH]            serve (gateway.serve)
    gateway check-config [--config PATH]   validate; exit 0 with a summary, 1 with every problem
    gateway keygen                         print a new Fernet key (also fine as a pepper)
    gateway demo                           the gateway in front of a demo app (gateway.demo)
    gateway users list|show|reset|logout|unlock|import   (gateway.admin; --demo: the demo's users)
    gateway keys rotate                    re-encrypt every secret under the newest key
    gateway store init                     give a new store its identity (gateway run never makes one)
    gateway --version

``--config`` defaults to ``$GATEWAY_CONFIG``, then ``./gateway.toml``. Every command prints
one clear result and exits non-zero on failure; none prints a secret. The gateway's own errors
(ConfigError, StoreError, DecryptError, AdminError) become a message and exit status 1 in
:func:`main`, and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from gateway import admin, config_warnings
from gateway import config as config_module
from gateway.config import Config, ServerConfig
from gateway.crypto import new_key
from gateway.demo.run import run_demo
from gateway.demo.state import DEFAULT_DIR, existing_demo_config
from gateway.errors import ConfigError, DecryptError, GatewayError, StoreError
from gateway.serve import configure_logging_for, serve

EXIT_OK, EXIT_FAILED = 0, 1
_SERVER_DEFAULTS = ServerConfig()

# What config.load reads from the environment, for every command that loads a config.
_CONFIG_ENVIRONMENT = f"""environment:
  {config_module.ENV_CONFIG:<25} the config file when --config is not given (then ./gateway.toml)
  {config_module.ENV_KEYS:<25} encryption keys, newest first (or encryption.keys_file)
  {config_module.ENV_PEPPER:<25} recovery-code pepper (or encryption.recovery_pepper_file)
  {config_module.ENV_JWT_SECRET:<25} identity.jwt.secret, for HS* JWTs (or secret_file)
  {config_module.ENV_STORE_URL:<25} store.url, which may hold a Redis password
Exit status: 0 on success, 1 on any failure (the message says which)."""

_NO_ENVIRONMENT = "environment: none is read.\nExit status: 0 on success, 1 on failure."

_DEMO_ENVIRONMENT = f"""environment: none is read: the demo's keys and store are files in --dir
(default ./{DEFAULT_DIR}), made on first use, private to their owner. Delete it to start over.
Exit status: 0 when stopped, 1 when it cannot start."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs keep their lines (each option's help states its own default)."""


def _version() -> str:
    try:
        return importlib.metadata.version("gateway")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _add(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str, epilog: str
) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, epilog=epilog, formatter_class=_Formatter)


def _with_config(p: argparse.ArgumentParser, leaf: bool = False) -> argparse.ArgumentParser:
    # On a sub-subcommand too (`gateway users list --config X`), where SUPPRESS keeps its
    # absent default from overwriting a --config given before the subcommand.
    default = argparse.SUPPRESS if leaf else None
    p.add_argument(
        "--config",
        "-c",
        default=default,
        help=f"TOML file (default: ${config_module.ENV_CONFIG}, then ./gateway.toml)",
    )
    return p


def _with_demo(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--demo",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the users of `gateway demo` (its store and keys in --dir; no environment variable is read)",
    )
    p.add_argument(
        "--dir",
        default=argparse.SUPPRESS,
        help=f"with --demo: the demo's state directory (default: ./{DEFAULT_DIR})",
    )
    return p


def _users_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = _with_demo(_with_config(_add(sub, "users", "manage the users in the store", _CONFIG_ENVIRONMENT)))
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="COMMAND")

    def leaf(name: str, text: str) -> argparse.ArgumentParser:
        return _with_demo(_with_config(_add(users_sub, name, text, _CONFIG_ENVIRONMENT), leaf=True))

    leaf("list", "print every enrolled or enrolling user, one a line")
    for name, text in (
        ("show", "print a user's state (never the secret)"),
        ("reset", "remove a user's secret, sessions and recovery codes: they must enrol again"),
        ("logout", "end every 2FA session of a user (the secret stays)"),
    ):
        leaf(name, text).add_argument("user")
    unlock = leaf("unlock", "lift a user's (or an address's) lockout")
    unlock.add_argument("user", nargs="?")
    unlock.add_argument("--address", help="lift the lockout of a client address instead (limits.ip_*)")
    imp = _with_config(
        _add(
            users_sub,
            "import",
            "import two_fast_auth users from a CSV of user_id,encrypted_secret; exit 1 if any row is skipped",
            _CONFIG_ENVIRONMENT,
        ),
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


def parser() -> argparse.ArgumentParser:
    """The whole command line (tests read every subcommand's help from it)."""
    top = argparse.ArgumentParser(
        prog="gateway",
        description="A two-factor authentication gateway.",
        epilog=_CONFIG_ENVIRONMENT,
        formatter_class=_Formatter,
    )
    top.add_argument("--version", action="version", version=f"gateway {_version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _with_config(
        _add(
            sub,
            "run",
            "serve the gateway as the config says, until stopped "
            f"(on server.host:server.port, default {_SERVER_DEFAULTS.host}:{_SERVER_DEFAULTS.port})",
            _CONFIG_ENVIRONMENT,
        )
    )
    check = _with_config(
        _add(
            sub,
            "check-config",
            "validate a config file: print a summary and exit 0, or every problem and exit 1; "
            "settings that load but are probably unsafe are warnings, on stderr, each naming its key",
            _CONFIG_ENVIRONMENT,
        )
    )
    check.add_argument(
        "--strict", action="store_true", help="exit 1 when there is any warning (default: exit 0 after printing them)"
    )
    _add(sub, "keygen", "print a new Fernet key (for encryption.keys, or as a recovery pepper)", _NO_ENVIRONMENT)
    demo = _add(
        sub,
        "demo",
        "run the gateway in front of a demo app on the embedded store; DEMO ONLY: its login takes any name",
        _DEMO_ENVIRONMENT,
    )
    demo.add_argument("--port", type=int, default=8080, help="where the gateway listens (default: %(default)s)")
    demo.add_argument("--host", default="127.0.0.1", help="the address it listens on (default: %(default)s)")
    demo.add_argument("--dir", default=None, help=f"where the demo keeps its state (default: ./{DEFAULT_DIR})")
    _users_parser(sub)
    keys = _with_config(_add(sub, "keys", "manage encryption keys", _CONFIG_ENVIRONMENT))
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    _with_config(
        _add(
            keys_sub,
            "rotate",
            "re-encrypt every secret under the newest key (the first of encryption.keys)",
            _CONFIG_ENVIRONMENT,
        ),
        leaf=True,
    )
    store = _with_config(_add(sub, "store", "set up the store", _CONFIG_ENVIRONMENT))
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    _with_config(
        _add(
            store_sub,
            "init",
            "give the configured store its identity, creating it if missing (keeps any data there); "
            "`gateway run` opens only a store that has one, so that a store that lost its data "
            "(deleted, emptied, a Redis restarted without it) never looks like a new, empty one",
            _CONFIG_ENVIRONMENT,
        ),
        leaf=True,
    )
    return top


def _print_config_error(exc: ConfigError, source: str) -> None:
    print(f"gateway: {len(exc.problems)} problem(s) in {source}:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _check_config(config: Config, strict: bool) -> int:
    found = config_warnings.warnings(config)
    for warning in found:
        print(f"gateway: warning: {warning}", file=sys.stderr)
    print(f"ok: {config.summary()}" + (f" ({len(found)} warning(s))" if found else ""))
    return EXIT_FAILED if strict and found else EXIT_OK


def _users(config: Config, args: argparse.Namespace) -> int:
    if args.users_command == "import":
        source_key = admin.read_source_key(args.source_key, args.source_key_file)
        report = admin.import_users(config, args.file, source_key, args.force)
        print("\n".join(report.lines))
        return EXIT_FAILED if report.problems else EXIT_OK
    user, address = getattr(args, "user", None), getattr(args, "address", None)
    print(admin.user_command(config, args.users_command, user, address))
    return EXIT_OK


def _uses_demo(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "demo", False))


def _config_source(args: argparse.Namespace) -> str:
    """Where the command's config comes from, as messages name it."""
    return "the demo's state" if _uses_demo(args) else (args.config or config_module.default_path())


def _load(args: argparse.Namespace) -> Config:
    if _uses_demo(args):
        return existing_demo_config(getattr(args, "dir", None))
    return config_module.load(args.config or config_module.default_path())


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        print(new_key())
        return EXIT_OK
    if args.command == "demo":
        return run_demo(host=args.host, port=args.port, state_dir=args.dir)
    config = _load(args)
    if args.command == "check-config":
        return _check_config(config, args.strict)
    if args.command == "run":
        return serve(config, args.config)
    configure_logging_for(config)  # users and keys: their audit events (mode "cli") go to stderr
    if args.command == "users":
        return _users(config, args)
    if args.command == "store":
        print(admin.initialise_store(config))
        return EXIT_OK
    print(admin.rotate_keys(config))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. The one boundary where the gateway's errors become a
    message on stderr."""
    args = parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        _print_config_error(exc, _config_source(args))
    except StoreError as exc:
        print(f"gateway: store error: {exc}", file=sys.stderr)
    except DecryptError as exc:
        print(f"gateway: a stored secret does not decrypt: {exc}", file=sys.stderr)
    except GatewayError as exc:  # AdminError: the message says what to do
        print(f"gateway: {exc}", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
