"""Canonical request paths, and the exclusion rules matched against them.

Every request path is reduced to one canonical form before anything is decided about it, and
the upstream is sent exactly that form (``encode_path``), so the gateway and the application
can never disagree about which resource was asked for.

The canonical form (``canonical_path``) is a ``str`` that:

* starts with ``/``; anything else (relative, ``*``, absolute-form) is refused;
* is percent-decoded exactly once, as UTF-8 (RFC 3986 §2.1, §2.5). Unreserved characters
  and ``%2e`` therefore compare equal to their decoded form (RFC 3986 §6.2.2.2);
* has its dot segments removed (RFC 3986 §5.2.4): ``/a/./b`` is ``/a/b``, ``/a/b/..`` is ``/a/``;
* has runs of ``/`` merged into one, as nginx does with ``merge_slashes on``;
* keeps case (RFC 3986 §6.2.2.1: the path is case-sensitive) and keeps a trailing ``/``.

Refused with ``AmbiguousPath`` (a generic message that never echoes the input), because some
server or framework behind a proxy is known to read each of these differently:

* ``..`` above the root. RFC 3986 §5.2.4 would clamp it; a client that sends it is probing.
* an encoded ``/`` or ``\\`` (``%2F``, ``%5C``), and a raw ``\\``: one side splits segments on
  it and the other does not (``/public/..%2fadmin``; IIS and Windows treat ``\\`` as ``/``);
* ``;`` raw or encoded: Tomcat and Spring strip path parameters, so ``/public/..;/admin`` is
  ``/admin`` to them (CVE-2020-1938 and many others) but a ``..;`` segment to everyone else;
* a ``%`` left after one decoding (``%252e``): double decoding by a later layer;
* a malformed escape (``%zz``, ``%4``), invalid or overlong UTF-8 (``%c0%ae`` was a ``.``
  for old decoders; Python's strict decoder rejects it);
* control characters raw or encoded (``%00`` truncates in C, ``%0d%0a`` splits headers),
  DEL, raw space, raw non-ASCII bytes (not allowed in a request-target, RFC 3986 §2 and
  RFC 9112 §3.2) and raw ``#`` (a fragment is never sent, RFC 9110 §7.1);
* a decoded ``?`` or ``#``: a layer that decodes before it parses ends the path there;
* a decoded non-ASCII segment whose Unicode compatibility form (NFKC) is a dot segment or
  holds one of ``/\\;%?#``: ``%EF%BC%8E%EF%BC%8E`` is two U+FF0E FULLWIDTH FULL STOP, which
  NFKC, and Windows best-fit code-page conversion ("WorstFit"), turn into ``..``;
* an empty segment followed later by ``..``: with merged slashes ``/admin//../public/x`` is
  ``/public/x``, without them (RFC 3986, most upstreams) it is ``/admin/public/x``.

A raw ``?`` starts the query (RFC 3986 §3.4): callers should split it off first, but if one
is left, the path ends there and the rest is dropped.

Exclusion rules (``parse_rule``) are ``"/path"`` (exactly that path), ``"/path/*"`` (the path
``/path/`` and everything below it, bounded by segment: not ``/path``, not ``/path-admin``),
each optionally preceded by one method: ``"GET /api/public/*"``. Matching is exact and
case-sensitive on the canonical path and on the method (RFC 9110 §9.1), so ``/Public/x`` and
``/healthz/`` are *not* excluded by ``/public/*`` and ``/healthz``: everything that is not
excluded is protected, so every mismatch fails closed. A ``GET`` rule also excludes ``HEAD``
(RFC 9110 §9.3.2: HEAD is GET without the body). A rule names one method; write
``"GET,HEAD /x"`` as two rules, or just ``"GET /x"``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote, unquote_to_bytes

from gateway.errors import AmbiguousPath
from gateway.http import is_token

# RFC 3986 §3.3 pchar without pct-encoded and ';', then no "." or ".." segment and no empty
# one: a path that matches is already canonical, which is what almost every request sends.
_SEGMENT = r"(?!\.\.?(?:/|\Z))[A-Za-z0-9\-._~!$&'()*+,=:@]+"
_CLEAN = re.compile(rf"/(?:{_SEGMENT}/)*(?:{_SEGMENT})?")

# Raw characters refused before decoding: controls, space, DEL and non-ASCII (everything
# outside 0x21-0x7E), the backslash, ';' and '#'.
_RAW_REFUSED = re.compile(r"[^\x21-\x7e]|[\\;#]")

# A '%' not followed by two hex digits, or an escape of a character refused after decoding:
# C0 controls, '#' (23), '%' (25), '/' (2F), ';' (3B), '?' (3F), '\' (5C) and DEL (7F).
_ESCAPE_REFUSED = re.compile(r"%(?![0-9A-Fa-f]{2})|%(?:[01][0-9A-Fa-f]|2[35Ff]|3[BbFf]|5[Cc]|7[Ff])")

# What a decoded non-ASCII segment must not become under NFKC: C1 controls are refused as is.
_COMPAT_REFUSED = re.compile(r"[/\\;%?#\x00-\x1f\x7f-\x9f]")

# RFC 3986 §3.3 pchar, less ';' (never in a canonical path), plus '/'. quote() always keeps
# the unreserved characters and encodes everything else, '%' included, as UTF-8.
_PATH_SAFE = "/!$&'()*+,=:@"

# Lets a rule in a UTF-8 config file write "/café" for the wire form "/caf%C3%A9".
_ASCII_VISIBLE = "".join(map(chr, range(0x21, 0x7F)))

_ANY_METHOD = ""  # never a token, so it cannot collide with a real method


def canonical_path(raw: str) -> str:
    """Return the one canonical form of a request path, or raise ``AmbiguousPath``.

    ``raw`` is the path as sent on the wire: ``scope["raw_path"]`` decoded as latin-1, or the
    path of nginx's ``X-Original-URI``. See the module docstring for the form and the refusals.
    """
    if _CLEAN.fullmatch(raw):
        return raw
    return _canonicalise(raw)


def _canonicalise(raw: str) -> str:
    raw = raw.partition("?")[0]  # RFC 3986 §3.4: the query starts at the first '?'
    if not raw.startswith("/"):
        raise AmbiguousPath("the request path is not absolute")
    if _RAW_REFUSED.search(raw):
        raise AmbiguousPath("the request path holds a character that is not allowed")
    if "%" in raw:
        if _ESCAPE_REFUSED.search(raw):
            raise AmbiguousPath("the request path holds a malformed or refused escape")
        try:
            path = unquote_to_bytes(raw).decode("utf-8")  # strict: no overlong forms
        except UnicodeDecodeError:
            raise AmbiguousPath("the request path is not valid UTF-8") from None
        check_compat = not path.isascii()
    else:
        path, check_compat = raw, False

    # RFC 3986 §5.2.4, with slashes merged and without clamping at the root.
    segments = path.split("/")
    out: list[str] = []
    seen_empty = False
    for segment in segments[1:]:
        if segment == "":
            seen_empty = True
        elif segment == "..":
            if not out or seen_empty:
                raise AmbiguousPath("the request path climbs out of the root or across '//'")
            out.pop()
        elif segment != ".":
            if check_compat and not segment.isascii():
                compat = unicodedata.normalize("NFKC", segment)
                if compat in (".", "..") or _COMPAT_REFUSED.search(compat):
                    raise AmbiguousPath("the request path holds a look-alike of a delimiter")
            out.append(segment)
    if not out:
        return "/"
    trailing = segments[-1] in ("", ".", "..")  # "/a/." and "/a/b/.." both end in "/"
    return "/" + "/".join(out) + ("/" if trailing else "")


def encode_path(path: str) -> str:
    """Percent-encode a canonical path for the upstream: ``canonical_path(encode_path(p)) == p``."""
    return quote(path, safe=_PATH_SAFE)


@dataclass(frozen=True, slots=True)
class ExcludeRule:
    """One ``paths.exclude`` entry. ``path`` is canonical; a ``prefix`` rule's path ends in ``/``
    and covers that path and everything below it. ``method`` None means every method."""

    method: str | None
    path: str
    prefix: bool

    def __str__(self) -> str:
        path = encode_path(self.path) + ("*" if self.prefix else "")
        return path if self.method is None else f"{self.method} {path}"


def parse_rule(text: str) -> ExcludeRule:
    """Parse ``"/path"``, ``"/path/*"`` or ``"METHOD /path[/*]"``; raise ``ValueError`` saying why not."""
    parts = text.split()
    if len(parts) == 1 and parts[0].startswith("/"):
        method, path = None, parts[0]
    elif len(parts) == 2 and parts[1].startswith("/"):
        method, path = parts
    else:
        raise ValueError(f'"{text}" is not "/path", "/path/*" or "METHOD /path"')
    if method is not None:
        if "," in method:
            raise ValueError(f'"{method}": one method per rule (a GET rule also covers HEAD)')
        if not is_token(method):
            raise ValueError(f'"{method}" is not an HTTP method token (RFC 9110 §9.1)')
        if method != method.upper():
            raise ValueError(f'"{method}": methods are case-sensitive (RFC 9110 §9.1), write "{method.upper()}"')
    prefix = path.endswith("/*")
    base = path[:-1] if prefix else path
    if "*" in base:
        raise ValueError(f'"{path}": "*" is only allowed as a final "/*" (write %2A for a literal one)')
    wire = quote(base, safe=_ASCII_VISIBLE)
    try:
        canonical = canonical_path(wire)
    except AmbiguousPath as exc:
        raise ValueError(f'"{path}" is refused as a request path: {exc}') from None
    if canonical != unquote(wire):
        raise ValueError(f'"{path}" is not canonical: it means "{canonical}"')
    return ExcludeRule(method, canonical, prefix)


class Exclusions:
    """The exclusion rules, indexed so that ``matches`` costs one lookup per path segment."""

    __slots__ = ("_exact", "_longest", "_prefixes")

    def __init__(self, rules: Iterable[ExcludeRule]) -> None:
        exact: dict[str, set[str]] = {}
        prefixes: dict[str, set[str]] = {}
        for rule in rules:
            methods = (prefixes if rule.prefix else exact).setdefault(rule.path, set())
            methods.add(_ANY_METHOD if rule.method is None else rule.method)
            if rule.method == "GET":
                methods.add("HEAD")  # RFC 9110 §9.3.2
        self._exact = {path: frozenset(m) for path, m in exact.items()}
        self._prefixes = {path: frozenset(m) for path, m in prefixes.items()}
        self._longest = max(map(len, prefixes), default=0)

    def matches(self, method: str, path: str) -> bool:
        """Whether ``method`` on ``path`` (a result of ``canonical_path``) is excluded from 2FA."""
        methods = self._exact.get(path)
        if methods is not None and (method in methods or _ANY_METHOD in methods):
            return True
        # Try each prefix of the path that ends at a '/', no longer than the longest rule.
        end = path.find("/")
        while 0 <= end < self._longest:
            methods = self._prefixes.get(path[: end + 1])
            if methods is not None and (method in methods or _ANY_METHOD in methods):
                return True
            end = path.find("/", end + 1)
        return False
