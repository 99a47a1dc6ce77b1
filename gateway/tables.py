"""Reading one TOML table with typed getters that collect problems under their full key
(``server.port: expected an integer, got str``), so ``config.py`` can report every mistake at
once and name each one. Unknown keys are problems too (``Table.finish``)."""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, urlsplit

from gateway.http import is_token

T = TypeVar("T")


class Table:
    """One TOML table being read: typed getters that record problems under their full key."""

    def __init__(self, name: str, data: Any, problems: list[str]) -> None:
        self.name = name
        self.problems = problems
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
            try:
                text = Path(path).read_text(encoding="utf-8").strip()
                if not text:
                    self.problem(f"{key}_file", "the file is empty")
                return text or None
            except OSError as exc:
                self.problem(f"{key}_file", f"cannot read {path}: {exc.strerror or exc}")
                return None
        return inline or from_env or None

    def finish(self) -> None:
        """Name every key no getter asked for: a typo must never switch a protection off."""
        for key in sorted(set(self.data) - self.seen):
            self.problem(key, unknown("key", key, self.seen))


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


def header_name(t: Table, key: str, default: str) -> str:
    value = t.get(key, str, default)
    # RFC 9110 §5.1: a field name is a token.
    if not is_token(value):
        t.problem(key, f'"{value}" is not a valid header name')
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


# RFC 3986 §3.2.2: reg-name = *( unreserved / pct-encoded / sub-delims ); an IPv4 address is one
# too. §3.2.3: port = *DIGIT (here 1 to 5 of them, at most 65535).
_REG_NAME = re.compile(r"(?:[a-z0-9\-._~!$&'()*+,;=]|%[0-9a-f]{2})+")
_PORT = re.compile(r"[0-9]{1,5}")


def host_port(t: Table, key: str, index: int, value: str) -> str | None:
    """``value`` lower-cased when it is an RFC 3986 ``host [":" port]`` (an IPv6 address in
    brackets, §3.2.2), else None after naming the problem as ``key[index]``."""
    text = value.lower()
    host, port = text, ""
    if text.startswith("["):
        inside, close, rest = text[1:].partition("]")
        try:
            ipaddress.IPv6Address(inside)
            ok = bool(close) and "%" not in inside  # no zone id: RFC 6874 is not for Host
        except ValueError:
            ok = False
        host, port = "", rest
    else:
        host, colon, port = text.rpartition(":") if ":" in text else (text, "", "")
        port = colon + port
        ok = _REG_NAME.fullmatch(host) is not None
    if ok and port:
        ok = port.startswith(":") and _PORT.fullmatch(port[1:]) is not None and int(port[1:]) <= 65535
    if not ok:
        t.problems.append(f'{t.key(key)}[{index}]: "{value}" is not a host or host:port (an IPv6 address goes in [])')
        return None
    return text


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
