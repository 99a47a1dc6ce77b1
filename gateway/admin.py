"""Store administration: what ``gateway users ...`` and ``gateway keys rotate`` do.

Each command opens the configured store, does its work, closes the store, and returns what the
command line prints; it never returns or raises a secret. A failure the operator can act on is
an :class:`AdminError`; the store's own failures stay StoreError, translated at the store.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from gateway import totp
from gateway.audit import audit, use_context
from gateway.config import Config
from gateway.crypto import SecretBox, decrypt_legacy
from gateway.errors import DecryptError, GatewayError
from gateway.factors import SecondFactor, address_scope
from gateway.identity import valid_user
from gateway.store import Store, UserState, open_store_from_url

T = TypeVar("T")

USER_COMMANDS = ("list", "show", "reset", "logout", "unlock")
# A header row of the two_fast_auth export, skipped when it is the first line.
_HEADER_NAMES = ("user_id", "user", "username")


class AdminError(GatewayError):
    """A command failed in a way the operator can act on; the message is printed as is."""


def _run_with_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    async def run() -> T:
        use_context("cli")  # every audit event of the command says mode "cli", and one id
        store = open_store_from_url(config.store.url, config.store.prefix, config.store.max_connections)
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


# -- users -----------------------------------------------------------------------------------


def _format_lock(ts: float | None) -> str:
    return "no" if ts is None else time.strftime("until %Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _describe(user: str, state: UserState) -> str:
    return "\n".join(
        [
            f"user: {user}",
            f"enrolled: {'yes' if state.enrolled else 'no'}" + (" (enrolment pending)" if state.pending else ""),
            f"locked: {_format_lock(state.locked_until)}",
            f"recent failures: {state.failures}",
            f"recovery codes left: {state.recovery_codes_left}",
            f"sessions: {state.sessions}",
        ]
    )


async def _known_user(store: Store, user: str) -> UserState:
    """The user's state; AdminError when the store holds nothing of theirs."""
    state = await store.user_state(user, time.time())
    if not (state.enrolled or state.pending or state.sessions or state.locked_until or state.failures):
        raise AdminError(f"no such user: {user}")
    return state


async def _user_command(config: Config, store: Store, command: str, user: str | None, address: str | None) -> str:
    factors = SecondFactor(config, store)
    if command == "list":
        users = await store.list_users()
        return "\n".join(users) if users else "(no users)"
    if command == "unlock" and address:
        # A per-address lock (limits.ip_*) holds everyone behind that address (a NAT, a VPN).
        await store.clear_failures(address_scope(address))
        audit("lockout.lifted", client=address, scope="address")
        return f"unlocked address {address}"
    if user is None:
        raise AdminError("name a USER (or, for unlock, --address ADDR)")
    if not valid_user(user):
        raise AdminError("not a valid user id")
    state = await _known_user(store, user)
    if command == "show":
        return _describe(user, state)
    if command == "reset":
        await factors.reset_user(user)
        audit("user.reset", user)
        return f"reset {user}: secret, sessions and recovery codes removed; the user must enrol again"
    if command == "logout":
        ended = await factors.revoke_user_sessions(user)
        audit("user.logout", user, sessions_ended=ended)
        return f"ended {ended} 2FA session(s) of {user}; the next request needs a code"
    await factors.unlock(user)
    audit("lockout.lifted", user, scope="user")
    return f"unlocked {user}"


def user_command(config: Config, command: str, user: str | None = None, address: str | None = None) -> str:
    """One of :data:`USER_COMMANDS` on ``user`` (``unlock`` may name an ``address`` instead)."""
    if command not in USER_COMMANDS:
        raise AdminError(f"unknown users command: {command}")
    return _run_with_store(config, lambda store: _user_command(config, store, command, user, address))


# -- users import ----------------------------------------------------------------------------


@dataclass
class ImportReport:
    """What an import did: counts, and one line per row it skipped (never a secret)."""

    imported: int = 0
    unchanged: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        head = f"imported {self.imported}, unchanged {self.unchanged}, skipped {len(self.problems)}"
        return [head] + [f"  {p}" for p in self.problems]


def read_source_key(key: str | None, key_file: str | None) -> str:
    """The old app's Fernet key, given inline or in a file (which keeps it out of ``ps``)."""
    if key is not None:
        return key
    try:
        with open(str(key_file), encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminError(f"cannot read --source-key-file {key_file}: {exc}") from None


def _check_source_key(source_key: str) -> None:
    """A bad key is one error, not one per row."""
    try:
        decrypt_legacy(b"", source_key)
    except ValueError as exc:
        raise AdminError(f"--source-key: {exc}") from None
    except DecryptError:
        pass  # the key is valid; the empty token is not


def _read_rows(path: str) -> list[tuple[int, list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(enumerate(csv.reader(f), start=1))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AdminError(f"cannot read {path}: {exc}") from None


def _is_header(line: int, row: list[str]) -> bool:
    return line == 1 and row[0].strip().lower() in _HEADER_NAMES


def _decrypt_row(line: int, row: list[str], source_key: str, config: Config) -> tuple[str, str] | str:
    """(user, secret) from one CSV row, or the problem with it."""
    if len(row) != 2:
        return f"line {line}: expected 2 columns (user_id,encrypted_secret), got {len(row)}"
    user, token = row[0].strip(), row[1].strip()
    if not valid_user(user):
        return f"line {line}: invalid user id"
    try:
        secret = decrypt_legacy(token.encode(), source_key)
        totp.code_at(secret, 0, config.totp.params)
    except DecryptError:
        return f"line {line} ({user}): does not decrypt with the source key"
    except ValueError:
        return f"line {line} ({user}): the decrypted secret is not a usable TOTP secret"
    return user, secret


async def _store_imported(store: Store, box: SecretBox, user: str, secret: str, force: bool) -> str:
    """Write one user's secret: "imported", "unchanged", or "conflict" (another secret, no force)."""
    current = await store.get_secret(user)
    if current is not None:
        try:
            same = box.decrypt(user, current) == secret
        except DecryptError:
            same = False
        if same:
            return "unchanged"
        if not force:
            return "conflict"
    await store.set_secret(user, box.encrypt(user, secret))
    if current is not None:
        # A replaced authenticator: what the old one opened or came with ends with it.
        await store.revoke_user_sessions(user)
        await store.set_recovery_codes(user, [])
    return "imported"


async def _import_rows(
    config: Config, store: Store, rows: Iterable[tuple[int, list[str]]], source_key: str, force: bool
) -> ImportReport:
    box = SecretBox(config.encryption.keys)
    report = ImportReport()
    for line, row in rows:
        if not row or _is_header(line, row):
            continue
        decrypted = _decrypt_row(line, row, source_key, config)
        if isinstance(decrypted, str):
            report.problems.append(decrypted)
            continue
        user, secret = decrypted
        outcome = await _store_imported(store, box, user, secret, force)
        if outcome == "imported":
            report.imported += 1
        elif outcome == "unchanged":
            report.unchanged += 1
        else:
            report.problems.append(f"line {line} ({user}): already enrolled with another secret (--force replaces)")
    audit("users.imported", imported=report.imported, unchanged=report.unchanged, problems=len(report.problems))
    return report


def import_users(config: Config, path: str, source_key: str, force: bool) -> ImportReport:
    """Import ``user_id,encrypted_secret`` rows made by two_fast_auth's ``encrypt_secret``."""
    _check_source_key(source_key)
    rows = _read_rows(path)
    return _run_with_store(config, lambda store: _import_rows(config, store, rows, source_key, force))


# -- keys rotate -----------------------------------------------------------------------------


async def _rotate(config: Config, store: Store) -> str:
    box = SecretBox(config.encryption.keys)
    rotated = current = 0
    failed: list[str] = []
    for user, token in await store.iter_secrets():
        try:
            if not box.needs_rotation(token):
                current += 1
                continue
            new = box.rotate(user, token)
        except DecryptError:
            failed.append(user)
            continue
        # Compare-and-set: a user who re-enrolled meanwhile keeps the new secret.
        if await store.replace_secret(user, token, new):
            rotated += 1
        else:
            current += 1
    audit("keys.rotated", rotated=rotated, current=current, failed=len(failed))
    if failed:
        lines = [f"the secret of {user!r} does not decrypt with any configured key" for user in failed]
        lines.append(f"rotated {rotated}, already current {current}, FAILED {len(failed)}: keep the old keys")
        raise AdminError("\n".join(lines))
    # Pending enrolments are not rewritten: they live at most totp.pending_ttl and are
    # re-created by starting setup again, so the old key is needed only that long.
    return (
        f"rotated {rotated}, already current {current}: every active secret is under the newest key; "
        f"keep the old key {config.totp.pending_ttl} s more for enrolments pending now"
    )


def rotate_keys(config: Config) -> str:
    """Re-encrypt every active secret under the newest of ``encryption.keys``."""
    return _run_with_store(config, lambda store: _rotate(config, store))
