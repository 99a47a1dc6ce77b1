"""Who is the user: the first factor, established in front of the gateway.

Two modes (``[identity] mode``):

* ``header``: a header (default ``Remote-User``) set by whatever authenticated the user
  (nginx ``auth_basic``, an SSO proxy). It is believed only when the TCP peer is one of
  ``server.trusted_proxies``; from anyone else it is ignored, as if absent.
* ``jwt``: a JWT from ``Authorization: Bearer`` or a named cookie, verified with PyJWT
  (signature, ``exp`` required, ``aud``/``iss`` when configured, RFC 7519 §4.1).

A user id is 1..256 characters with no control characters; anything else is refused
rather than passed on to the store or upstream in a header.

One request, one identity (issue 10). Frameworks disagree on which of several candidates
counts: Starlette reads only the first ``Cookie`` header and, within it, the *last* cookie of a
name; this module once read the Bearer token first, else the *first* cookie. A request whose
candidates disagree would then be judged as one user and served as another. So every
candidate is read (every ``Authorization`` and ``Cookie`` header, every cookie of the name,
``Starlette Headers.getlist``, never ``get``, which returns the first of duplicates) and a
request carrying two different values is refused ``ambiguous_identity``, never guessed:

* JWT mode: a Bearer token and a cookie of the configured name that differ; two cookies of
  that name that differ (in one ``Cookie`` header or in several); two ``Authorization``
  headers;
* header mode: two trusted headers, or one whose value holds a comma (how a proxy joins
  duplicates, RFC 9110 §5.3);
* the 2FA session cookie, likewise (``read_one_cookie``).

An ``Authorization`` value is read as the laxest framework reads it: the scheme ends at any
whitespace (DRF and flask-jwt-extended ``split()``, so ``Bearer<TAB>token`` is a Bearer token).
In JWT mode, a value the gateway cannot read as exactly one ``Bearer`` token but which holds
something shaped like a JWT (``Basic x, Bearer token``, a ``JWT`` scheme) is ambiguous too: an
app might find a token in it that the gateway never verified.

Equal duplicates are one candidate: they cannot make two readers disagree.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
from starlette.datastructures import Headers

from gateway.audit import audit
from gateway.cache import MISS, TtlCache
from gateway.config import IdentityConfig
from gateway.errors import Reason

MAX_USER_LENGTH = 256
# RFC 7519 §3 / RFC 7515 §7.1: a compact JWS is three base64url parts joined by dots.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    label: str


@dataclass(frozen=True, slots=True)
class Denied:
    """No identity the gateway can use: ``reason`` is IDENTITY_REQUIRED (none was sent, or not
    by a trusted proxy), INVALID_IDENTITY or AMBIGUOUS_IDENTITY."""

    reason: Reason


_REQUIRED = Denied(Reason.IDENTITY_REQUIRED)
_INVALID = Denied(Reason.INVALID_IDENTITY)
_AMBIGUOUS = Denied(Reason.AMBIGUOUS_IDENTITY)


def valid_user(user: object) -> bool:
    return isinstance(user, str) and 0 < len(user) <= MAX_USER_LENGTH and user.isprintable() and user == user.strip()


def _cookie_name(part: str) -> str | None:
    """The name of one ``;``-separated part of a ``Cookie`` header, or None if it has no ``=``.

    The one rule for "is this part cookie X", used both to read cookies and to strip the
    session cookie before the upstream. Trimmed with ``str.strip()``, as Starlette's
    ``cookie_parser`` does, which trims more than RFC 6265 §5.2's SP and HTAB (``\xa0``,
    ``\x0b`` ...): whatever a lenient app would read as cookie X is cookie X here too.
    """
    key, sep, _ = part.partition("=")
    return key.strip() if sep else None


def cookie_values(cookie_headers: list[str], name: str) -> list[str]:
    """Every value of cookie ``name`` in every ``Cookie`` header (RFC 6265 §5.4; HTTP/2 may
    split one header into several, RFC 9113 §8.2.3), in order; empty values count."""
    values = []
    for header in cookie_headers:
        if name not in header:
            continue
        for part in header.split(";"):
            if _cookie_name(part) == name:
                values.append(part.partition("=")[2].strip().strip('"'))
    return values


def without_cookie(cookie_header: str, name: str) -> str:
    """A ``Cookie`` header without any part named ``name`` (by the same rule as
    :func:`cookie_values`); the kept parts are left byte for byte as they came."""
    if name not in cookie_header:
        return cookie_header
    kept = [part for part in cookie_header.split(";") if _cookie_name(part) != name]
    return ";".join(kept).strip()


def read_one_cookie(headers: Headers, name: str) -> tuple[str | None, bool]:
    """``(value, ambiguous)`` of cookie ``name`` across every ``Cookie`` header: ambiguous when
    two different values are present."""
    values = set(cookie_values(headers.getlist("cookie"), name))
    if len(values) > 1:
        return None, True
    value = values.pop() if values else None
    return value or None, False


class IdentityReader:
    """Reads the identity of one request; built once from the config."""

    def __init__(self, config: IdentityConfig, clock: Callable[[], float] = time.time) -> None:
        self.mode = config.mode
        self.header = config.header.lower()
        self.jwt = config.jwt
        # Verified tokens, remembered until they expire (no shorter ttl: a token's claims do not
        # change): a hit costs one dict lookup instead of a signature check. A token is only
        # ever cached after full verification.
        self._verified: TtlCache[str, Identity] = TtlCache(math.inf, _CACHE_SIZE, clock)

    def read(self, headers: Headers, peer_trusted: bool) -> Identity | Denied:
        """The request's one identity, or why it has none."""
        found = self._read(headers, peer_trusted)
        if found is _AMBIGUOUS:  # one audit event wherever an identity is read: doors and pages
            audit("identity.ambiguous", reason="identity")
        return found

    def _read(self, headers: Headers, peer_trusted: bool) -> Identity | Denied:
        if self.mode == "header":
            if not peer_trusted:
                return _REQUIRED
            found = headers.getlist(self.header)
            if len(found) > 1 or (found and "," in found[0]):
                return _AMBIGUOUS
            user = found[0] if found else None
            if user is None or user == "":
                return _REQUIRED
            # Header values arrive as bytes read as Latin-1 (RFC 9110 §5.5); nginx and SSO
            # proxies send a non-ASCII user name as UTF-8. Read it so, and refuse what is not.
            if not user.isascii():
                try:
                    user = user.encode("latin-1").decode("utf-8")
                except UnicodeError:
                    return _INVALID
            if not valid_user(user):
                return _INVALID
            return Identity(user, user)
        return self._read_jwt(headers)

    def _read_jwt(self, headers: Headers) -> Identity | Denied:
        assert self.jwt is not None
        candidates = set()
        auths = headers.getlist("authorization")
        if len(auths) > 1:
            return _AMBIGUOUS
        if auths:
            parts = auths[0].split()
            if len(parts) == 2 and parts[0].lower() == "bearer" and "," not in parts[1]:
                candidates.add(parts[1])
            elif _JWT_SHAPE.search(auths[0]):
                return _AMBIGUOUS
        if self.jwt.cookie:
            candidates.update(v for v in cookie_values(headers.getlist("cookie"), self.jwt.cookie) if v)
        if len(candidates) > 1:
            return _AMBIGUOUS
        if not candidates:
            return _REQUIRED
        token = candidates.pop()
        if len(token) > 8192:
            return _INVALID
        cached = self._verified.get(token)
        if cached is not MISS:
            return cached
        identity, expires = self._verify(token)
        if identity is None:
            return _INVALID
        self._verified.put(token, identity, until=expires)
        return identity

    def _verify(self, token: str) -> tuple[Identity | None, float]:
        cfg = self.jwt
        assert cfg is not None
        key = cfg.secret if cfg.secret is not None else cfg.public_key
        try:
            claims = jwt.decode(
                token,
                key=key or "",
                algorithms=list(cfg.algorithms),
                audience=list(cfg.audience) or None,
                issuer=cfg.issuer,
                leeway=cfg.leeway,
                options={"require": ["exp"], "verify_aud": bool(cfg.audience)},
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            return None, 0.0
        user = claims.get(cfg.user_claim)
        if isinstance(user, int) and not isinstance(user, bool):
            user = str(user)
        if not valid_user(user):
            return None, 0.0
        label = claims.get(cfg.label_claim) if cfg.label_claim else None
        if not valid_user(label):
            label = user
        return Identity(str(user), str(label)), float(claims["exp"]) + cfg.leeway
