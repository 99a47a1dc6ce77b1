"""Declaring and reading the keys of one TOML table.

A key is declared once, as a dataclass field made by ``key()``: its default, its range or
choices, how it is read and checked, and the comment ``gateway.example.toml`` shows for it.
``read_table`` reads a table from those declarations, with typed getters that collect problems
under their full key (``server.port: expected an integer, got str``), so every mistake is
reported at once and named; an unknown key is a problem too (``Table.finish``).
``render_table`` writes the table's part of the example from the same declarations.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import SplitResult, urlsplit

from gateway.framing import FRAMING_HEADERS, HOP_BY_HOP_HEADERS
from gateway.http import is_token, split_host

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")


class SecretFileError(Exception):
    """A file holding a secret could not be read; the message never quotes its bytes."""


def read_secret_file(path: str) -> str:
    """The UTF-8 text of a file that holds a secret (a key, a pepper, a store URL). The one
    reader of such files, for the config and the CLI alike (issue 14: a NUL in the path and a
    file that is not UTF-8 raised ValueError past the loader, and a UnicodeDecodeError's text
    quotes the byte it failed on, a byte of the secret)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{path} is not UTF-8 text") from None
    except ValueError:  # os.fspath refuses an embedded NUL
        raise SecretFileError("the path holds a NUL character") from None


class Table:
    """One TOML table being read: typed getters that record problems under their full key."""

    def __init__(self, name: str, data: Any, problems: list[str], env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.problems = problems
        self.env: Mapping[str, str] = env or {}
        self.seen: set[str] = set()
        if not isinstance(data, dict):
            problems.append(f"{name}: must be a table")
            data = {}
        self.data: dict[str, Any] = data

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def problem(self, key: str, reason: str) -> None:
        self.problems.append(f"{self.key(key)}: {reason}")

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a port of `true` is a mistake, not 1.
        if isinstance(value, bool) and bool not in kinds:
            self.problem(key, f"expected {kind_name(kinds)}, got a boolean")
            return default
        if not isinstance(value, kinds):
            self.problem(key, f"expected {kind_name(kinds)}, got {type(value).__name__}")
            return default
        if float in kinds and isinstance(value, int):
            value = float(value)
        return value  # type: ignore[no-any-return]

    def opt_str(self, key: str) -> str | None:
        value: str | None = self.get(key, str, None)
        return value

    def number(self, key: str, default: T, low: float, high: float) -> T:
        kind: tuple[type, ...] = (int, float) if isinstance(default, float) else (int,)
        value = self.get(key, kind, default)
        if not low <= value <= high:  # type: ignore[operator]
            self.problem(key, f"{value} is outside {_number(low)}..{_number(high)}")
            return default
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(key, list, list(default))
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.problems.append(f"{self.key(key)}[{i}]: expected a string, got {type(item).__name__}")
            else:
                out.append(item)
        return tuple(out)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            self.problem(key, f'"{value}" is not one of {", ".join(choices)}')
            return default
        return value

    def secret(self, key: str, env: Mapping[str, str], env_name: str | None) -> str | None:
        """A secret given inline, as ``key_file``, or in the environment: exactly one of them."""
        inline = self.opt_str(key)
        path = self.opt_str(f"{key}_file")
        from_env = env.get(env_name) if env_name else None
        given = [n for n, v in ((key, inline), (f"{key}_file", path), (env_name, from_env)) if v]
        if len(given) > 1:
            self.problem(key, f"given more than once ({', '.join(str(g) for g in given)}); choose one")
            return None
        if path:
            text = self.read_file(f"{key}_file", path)
            if text is not None:
                text = text.strip()
                if not text:
                    self.problem(f"{key}_file", "the file is empty")
            return text or None
        return inline or from_env or None

    def read_file(self, key: str, path: str) -> str | None:
        """The UTF-8 text of the file ``key`` names, or None with the problem recorded. Every
        failure is a problem with the key, never an exception out of the loader."""
        try:
            return read_secret_file(path)
        except SecretFileError as exc:
            self.problem(key, str(exc))
        return None

    def finish(self) -> None:
        """Name every key no getter asked for: a typo must never switch a protection off."""
        for key in sorted(set(self.data) - self.seen):
            self.problem(key, unknown("key", key, self.seen))


# -- declaring keys ---------------------------------------------------------------------------

Reader = Callable[[Table, str, Any], Any]
"""How a key is read: ``(table, key, default) -> value``, naming any problem under the key."""

_KEY = "gateway.key"  # the dataclass field metadata entry holding a Key


@dataclass(frozen=True, slots=True)
class Key:
    """One key's declaration, beyond its field's name and default: see ``key()``."""

    read: Reader
    note: str
    doc: str
    limits: str
    shown: Any
    commented: bool
    env: tuple[str, str] | None
    file_sample: str | None
    table: type[DataclassInstance] | None


def key(
    default: Any,
    note: str = "",
    *,
    doc: str = "",
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] = (),
    read: Reader | None = None,
    shown: Any = dataclasses.MISSING,
    commented: bool | None = None,
    env: tuple[str, str] | None = None,
    file_sample: str | None = None,
    table: type[DataclassInstance] | None = None,
) -> Any:
    """A dataclass field declaring one config key, in one place.

    ``note`` is the comment after the value in ``gateway.example.toml`` (the range ``low..high``
    or the ``choices`` are added to it), ``doc`` the comment lines above it. ``read`` reads and
    checks it (default: by the default's type, ``low..high`` and ``choices``). The example shows
    ``shown`` instead of the default, as a comment when ``commented`` (default: when the default
    is None). A secret is also read from ``<key>_file`` and from the environment variable
    ``env`` = (name, what it holds); the example shows ``<key>_file = file_sample``, never the
    secret inline. ``table``: the class of a sub-table (read by the caller; the example shows it
    commented out).
    """
    if read is None:
        read = _typed_reader(default, low, high, choices)
    limits = f"{_number(low)}..{_number(high)}" if low is not None and high is not None else ""
    if choices:
        limits = ", ".join(choices)
    if commented is None:
        commented = default is None  # an optional key is shown as a commented-out sample
    declared = Key(read, note, doc, limits, shown, commented, env, file_sample, table)
    # A secret stays out of repr(), and so out of any log line or traceback that shows a config.
    hidden = env is not None or file_sample is not None
    return dataclasses.field(default=default, repr=not hidden, metadata={_KEY: declared})


def _typed_reader(default: Any, low: float | None, high: float | None, choices: tuple[str, ...]) -> Reader:
    if choices:
        return lambda t, name, d: t.choice(name, d, choices)
    if low is not None and high is not None:
        return lambda t, name, d: t.number(name, d, low, high)
    if isinstance(default, tuple):
        return lambda t, name, d: t.strings(name, d)
    if default is None:
        return lambda t, name, d: t.opt_str(name)
    kind = type(default)
    return lambda t, name, d: t.get(name, kind, d)


def declared(cls: type[DataclassInstance]) -> list[tuple[str, Any, Key]]:
    """``(name, default, Key)`` of every key ``cls`` declares, in order."""
    return [(f.name, f.default, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def read_table(cls: type[D], t: Table, defaults: Mapping[str, Any] | None = None, **given: Any) -> D:
    """An instance of ``cls`` read from ``t`` by its declarations; ``given`` fields are already
    read (by a caller that checks them with other keys), ``defaults`` replace declared ones.
    Then every key of ``t`` nobody asked for is named as unknown."""
    values = dict(given)
    for name, default, k in declared(cls):
        if name not in given:
            values[name] = k.read(t, name, (defaults or {}).get(name, default))
    t.finish()
    return cls(**values)


def each(parse: Callable[[str], Any]) -> Reader:
    """A reader for a list of strings, each made into a value by ``parse``, whose ValueError is
    named as ``key[i]``."""

    def read(t: Table, name: str, default: Any) -> Any:
        if name not in t.data:
            t.seen.add(name)
            return default
        out: list[Any] = []
        # Numbered as written: a non-string before a bad entry must not shift its index.
        for i, item in enumerate(t.get(name, list, [])):
            if not isinstance(item, str):
                t.problems.append(f"{t.key(name)}[{i}]: expected a string, got {type(item).__name__}")
                continue
            try:
                out.append(parse(item))
            except ValueError as exc:
                t.problems.append(f"{t.key(name)}[{i}]: {exc}")
        return tuple(out)

    return read


def secret_value(env_name: str | None) -> Reader:
    """A reader for a secret given inline, as ``<key>_file``, or in ``env_name``: one of them."""
    return lambda t, name, d: t.secret(name, t.env, env_name) or d


# -- the example ---------------------------------------------------------------------------------

_NOTE_COLUMN = 27


def render_table(name: str, cls: type[DataclassInstance], commented: bool = False) -> list[str]:
    """``[name]`` and its keys as ``gateway.example.toml`` shows them, from the declarations:
    the class docstring, then each key's doc, ``key = value`` and note."""
    mark = "# " if commented else ""
    lines = [f"{mark}[{name}]"]
    doc = cls.__dict__.get("__doc__")
    lines += _comment(inspect.cleandoc(doc) if doc else "")
    subtables: list[tuple[str, type[DataclassInstance]]] = []
    for key_name, default, k in declared(cls):
        if k.table is not None:
            subtables.append((key_name, k.table))
            continue
        lines += _comment(k.doc)
        value = default if k.shown is dataclasses.MISSING else k.shown
        note = f"{k.note} ({k.limits})" if k.note and k.limits else k.note or k.limits
        # A secret with no default is shown only in its *_file form: it does not belong inline.
        secret_key = k.env is not None or k.file_sample is not None
        if value is not None and not (secret_key and not value):
            prefix = "# " if (commented or k.commented) else ""
            lines.append(_with_note(f"{prefix}{key_name} = {toml_value(value)}", note))
            note = ""
        if k.file_sample is not None:
            note = "; ".join(n for n in (note, f"or {k.env[0]}" if k.env else "") if n)
            lines.append(_with_note(f"# {key_name}_file = {toml_value(k.file_sample)}", note))
    for key_name, sub in subtables:
        lines += ["", *render_table(f"{name}.{key_name}", sub, commented=True)]
    return lines


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()] if text else []


def _with_note(line: str, note: str) -> str:
    return f"{line:<{_NOTE_COLUMN}} # {note}" if note else line


def toml_value(value: Any) -> str:
    """``value`` as TOML: a bool, number, string or list of them; anything else as its str()."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    # A JSON string is a TOML basic string (TOML 1.0 §String: the same escapes).
    return json.dumps(value if isinstance(value, str) else str(value), ensure_ascii=False)


def unknown(what: str, name: str, known: Iterable[str]) -> str:
    """``unknown key``, with the closest known name when one is close enough to be the typo."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f'unknown {what} (did you mean "{close[0]}"?)' if close else f"unknown {what}"


def _number(x: float) -> str:
    """1048576 as written, not 1.04858e+06 (``:g`` keeps six digits)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def host_port(value: str) -> str:
    """``value`` lower-cased if it is an RFC 3986 ``host [":" port]`` by the one grammar the
    gateway applies to ``Host`` (``http.split_host``; an IPv6 address in brackets); ValueError
    otherwise."""
    if split_host(value) is None:
        raise ValueError(f'"{value}" is not a host or host:port (an IPv6 address goes in [])')
    return value.lower()


# Headers that frame a message or belong to one connection (RFC 9110 §7.6.1, RFC 9112 §6), and
# Host and Cookie, which the gateway reads or sets itself: a header key naming one of them would
# unframe what goes upstream or never reach the app. Refused at load, by name.
_RESERVED_HEADERS = frozenset(
    name.decode() for name in HOP_BY_HOP_HEADERS | FRAMING_HEADERS | {b"host", b"cookie", b"expect"}
)


def header_name(t: Table, key: str, default: str) -> str:
    value = t.get(key, str, default)
    # RFC 9110 §5.1: a field name is a token.
    if not is_token(value):
        t.problem(key, f'"{value}" is not a valid header name')
        return default
    if value.lower() in _RESERVED_HEADERS:
        t.problem(key, f'"{value}" frames the message or belongs to the connection; name another header')
        return default
    if "_" in value or "." in value:
        # CGI, WSGI and PHP read "Remote_User" as "Remote-User" (both HTTP_REMOTE_USER), and nginx
        # drops such names: the gateway would strip one spelling while the app read the other.
        t.problem(key, f'"{value}" has "_" or "."; use "-" (apps read the spellings alike)')
        return default
    return value


def route_path(t: Table, key: str, default: str, switchable: bool = False) -> str:
    """An absolute path; or ``""`` (the route is off) when ``switchable``."""
    value = t.get(key, str, default)
    if switchable and value == "":
        return value
    if not value.startswith("/") or "?" in value or "#" in value or "*" in value or value.endswith("/"):
        t.problem(key, f'"{value}" must be an absolute path like "/verify-2fa" with no trailing slash')
        return default
    return value


_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&]*")


def redact_url(url: str) -> str:
    """``url`` with any password shown as ``***``; never raises, even on a URL urllib refuses.

    Everything before the last "@" counts as userinfo: a generated password often holds an
    unencoded "/", "#" or "?", which urllib would take for the start of the path.
    """
    url = _QUERY_PASSWORD.sub(r"\1***", url)  # redis-py also reads ?password= (unix://)
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"


def split_url(t: Table, key: str, value: str) -> SplitResult | None:
    """``value`` split by urllib, or None after naming the problem: urllib raises on an unclosed
    IPv6 "[" or a port outside 0..65535, and the caller would print a traceback."""
    try:
        parts = urlsplit(value)
    except ValueError:
        t.problem(key, f'"{redact_url(value)}" is not a valid URL (check the [] around an IPv6 address)')
        return None
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        # Not urllib's message: it quotes the port text, which may be part of a password.
        t.problem(key, f'"{redact_url(value)}" has an invalid port (not a number in 0..65535)')
        return None
    return parts


def http_url(t: Table, key: str, value: str | None) -> str | None:
    if value is None:
        return None
    parts = split_url(t, key, value)
    if parts is None:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        t.problem(key, f'"{redact_url(value)}" is not an http:// or https:// URL with a host')
        return None
    if parts.query or parts.fragment:
        t.problem(key, "must not have a query or fragment")
        return None
    return value.rstrip("/")


def public_http_url(t: Table, key: str, value: str | None) -> str | None:
    """An http(s) URL the gateway writes into redirects and links: no user name or password,
    which every client would read."""
    url = http_url(t, key, value)
    if url is None:
        return None
    authority = url.partition("://")[2].partition("/")[0]
    if "@" in authority:
        t.problem(key, f'"{redact_url(url)}" must not hold a user name or password')
        return None
    if split_host(authority) is None:
        # urllib and a browser may read "https://evil.example\\app.example" differently.
        t.problem(key, f'"{url}" has no valid host[:port] (RFC 3986)')
        return None
    return url
