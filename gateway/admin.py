"""Store administration: what ``gateway users ...``, ``gateway keys rotate`` and
``gateway store init`` do.

Each command opens the configured store, does its work, closes the store, and returns what the
command line prints; it never returns or raises a secret. A failure the operator can act on is
an :class:`AdminError`; the store's own failures stay StoreError, translated at the store.

The long ones (``keys rotate`` and ``users import`` over a million users) report progress on
stderr (:class:`Progress`) and may be stopped (Ctrl-C, SIGTERM) and run again: each user is one
atomic store step (a compare-and-set for rotation), so a stop leaves no user half-written, and a
rerun skips cheaply what the last run finished (a secret already under the newest key, an
imported user whose secret is unchanged). They run while gateways serve: a gateway decrypts
with every configured key, so a secret is readable before and after its rewrite.

None of them makes a store: a missing or emptied one is an error (a store that lost its data
must never look like a new one, gateway/store/sqlite.py), except ``store init``, the deliberate
step that gives a new store its identity.
"""

from __future__ import annotations

import asyncio
import csv
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO, TypeVar

from gateway import totp
from gateway.audit import audit, use_context
from gateway.config import Config
from gateway.crypto import SecretBox, decrypt_legacy
from gateway.errors import DecryptError, GatewayError
from gateway.factors import SecondFactor, address_scope
from gateway.identity import valid_user
from gateway.store import Store, UserState, init_store, open_store_from_url
from gateway.tables import SecretFileError, read_secret_file, redact_url

T = TypeVar("T")

USER_COMMANDS = ("list", "show", "reset", "logout", "unlock")
# A header row of the two_fast_auth export, skipped when it is the first line.
_HEADER_NAMES = ("user_id", "user", "username")


class AdminError(GatewayError):
    """A command failed in a way the operator can act on; the message is printed as is."""


# Rotation keeps this many compare-and-set steps in flight: one round trip each, so a million
# users one at a time would spend most of their time waiting on the network.
ROTATE_BATCH = 256


class Progress:
    """How far a long command has got, on ``stream`` (stderr): a bar redrawn in place on a
    terminal, otherwise (a log, a pipe) one plain line every ``every`` items or ``seconds``."""

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO | None = None,
        every: int = 10_000,
        seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.done = label, total, 0
        self._stream = sys.stderr if stream is None else stream
        self._tty = self._stream.isatty()
        self._every, self._seconds, self._clock = every, seconds, clock
        self._last_count, self._last_time = 0, clock()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if self._tty:
            if now - self._last_time >= 0.1 or self.done == self.total:  # a redraw is cheap, not free
                self._last_time = now
                width = 30
                filled = width * self.done // max(self.total, 1)
                bar = "#" * filled + "-" * (width - filled)
                self._stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
                self._stream.flush()
            return
        if self.done - self._last_count >= self._every or now - self._last_time >= self._seconds:
            self._last_count, self._last_time = self.done, now
            self._stream.write(f"{self.label}: {self.done}/{self.total}\n")
            self._stream.flush()

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\n")
        elif self.done != self._last_count:
            self._stream.write(f"{self.label}: {self.done}/{self.total}\n")
        self._stream.flush()


def _run_with_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    async def run() -> T:
        use_context("cli")  # every audit event of the command says mode "cli", and one id
        # SIGTERM stops the command as Ctrl-C does (asyncio.run cancels the task on SIGINT): the
        # store step in flight ends, the store closes, and the command says how far it got.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        store = open_store_from_url(
            config.store.url, config.store.prefix, config.store.max_connections, config.store.replicas_ack
        )
        try:
            await store.open()
            try:
                return await work(store)
            finally:
                await store.close()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(run())


def _stopped(what: str) -> AdminError:
    return AdminError(f"stopped: {what}; nothing is half-written, run the command again to finish")


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
        return read_secret_file(str(key_file)).strip()
    except SecretFileError as exc:
        raise AdminError(f"--source-key-file: {exc}") from None


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
    config: Config,
    store: Store,
    rows: list[tuple[int, list[str]]],
    source_key: str,
    force: bool,
    progress: Progress,
) -> ImportReport:
    box = SecretBox(config.encryption.keys)
    report = ImportReport()
    try:
        for line, row in rows:
            progress.advance()
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
    except asyncio.CancelledError:
        audit("users.imported", imported=report.imported, unchanged=report.unchanged, stopped=True)
        raise _stopped(f"{progress.done} of {len(rows)} rows read, {report.imported} imported") from None
    finally:
        progress.finish()
    audit("users.imported", imported=report.imported, unchanged=report.unchanged, problems=len(report.problems))
    return report


def import_users(
    config: Config, path: str, source_key: str, force: bool, progress: TextIO | None = None
) -> ImportReport:
    """Import ``user_id,encrypted_secret`` rows made by two_fast_auth's ``encrypt_secret``;
    progress goes to ``progress`` (stderr when None)."""
    _check_source_key(source_key)
    rows = _read_rows(path)
    meter = Progress("users import", len(rows), progress)
    return _run_with_store(config, lambda store: _import_rows(config, store, rows, source_key, force, meter))


# -- keys rotate -----------------------------------------------------------------------------


@dataclass
class _Rotation:
    rotated: int = 0
    current: int = 0
    failed: list[str] = field(default_factory=list)


async def _rotate_one(store: Store, box: SecretBox, user: str, token: bytes, tally: _Rotation) -> None:
    try:
        if not box.needs_rotation(token):  # already under the newest key: a rerun skips it here
            tally.current += 1
            return
        new = box.rotate(user, token)
    except DecryptError:
        tally.failed.append(user)
        return
    # Compare-and-set: a user who re-enrolled meanwhile keeps the new secret.
    if await store.replace_secret(user, token, new):
        tally.rotated += 1
    else:
        tally.current += 1


async def _rotate(config: Config, store: Store, stream: TextIO | None) -> str:
    box = SecretBox(config.encryption.keys)
    tally = _Rotation()
    secrets = await store.iter_secrets()
    progress = Progress("keys rotate", len(secrets), stream)
    try:
        for start in range(0, len(secrets), ROTATE_BATCH):
            batch = secrets[start : start + ROTATE_BATCH]
            await asyncio.gather(*(_rotate_one(store, box, user, token, tally) for user, token in batch))
            progress.advance(len(batch))
    except asyncio.CancelledError:
        audit("keys.rotated", rotated=tally.rotated, current=tally.current, failed=len(tally.failed), stopped=True)
        raise _stopped(f"{tally.rotated} rotated of {len(secrets)} secrets") from None
    finally:
        progress.finish()
    rotated, current, failed = tally.rotated, tally.current, sorted(tally.failed)
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


def initialise_store(config: Config) -> str:
    """``gateway store init``: give the configured store its identity if it has none; what
    happened. On a store that lost its data this accepts it empty (every user must enrol again,
    with the first factor alone): the message says so, and running gateways keep refusing it
    until restarted."""
    store_id, created = asyncio.run(init_store(config.store.url, config.store.prefix))
    where = redact_url(config.store.url)
    if not created:
        return f"the store at {where} is already initialised (store id {store_id}); nothing changed"
    return (
        f"initialised the store at {where} (store id {store_id}). If it held a store that lost its"
        " data, every user there must enrol again, with the first factor alone; restart running"
        " gateways to serve it"
    )


def rotate_keys(config: Config, progress: TextIO | None = None) -> str:
    """Re-encrypt every active secret under the newest of ``encryption.keys``; progress goes to
    ``progress`` (stderr when None)."""
    return _run_with_store(config, lambda store: _rotate(config, store, progress))
