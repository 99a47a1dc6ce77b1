"""Who is the user: the first factor, established in front of the gateway.

Two modes (``[identity] mode``):

* ``header``: a header (default ``Remote-User``) set by whatever authenticated the user
  (nginx ``auth_basic``, an SSO proxy). It is believed only when the TCP peer is one of
  ``server.trusted_proxies``; from anyone else it is ignored, as if absent.
* ``jwt``: a JWT from ``Authorization: Bearer`` or a named cookie, verified with PyJWT
  (signature, ``exp`` required, ``aud``/``iss`` when configured, RFC 7519 §4.1).

A user id is 1..256 characters with no control characters; anything else is refused
rather than passed on to the store or upstream in a header.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.config import IdentityConfig
from gateway.errors import Reason

MAX_USER_LENGTH = 256
_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    label: str


def valid_user(user: object) -> bool:
    return isinstance(user, str) and 0 < len(user) <= MAX_USER_LENGTH and user.isprintable() and user == user.strip()


def read_cookie(cookie_header: str | None, name: str) -> str | None:
    """One cookie's value from a ``Cookie`` header (RFC 6265 §5.4), or None."""
    if not cookie_header or name not in cookie_header:
        return None
    for part in cookie_header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"') or None
    return None


class IdentityReader:
    """Reads the identity of one request; built once from the config."""

    def __init__(self, config: IdentityConfig) -> None:
        self.mode = config.mode
        self.header = config.header.lower()
        self.jwt = config.jwt
        # Verified tokens, remembered until they expire: a hit costs one dict lookup instead of
        # a signature check. Bounded; a token is only ever cached after full verification.
        self._cache: dict[str, tuple[Identity, float]] = {}

    def read(self, headers: Any, peer_trusted: bool) -> tuple[Identity | None, Reason]:
        """``(identity, Reason.EXCLUDED)`` on success (the reason is unused then), else
        ``(None, IDENTITY_REQUIRED or INVALID_IDENTITY)``. ``headers`` is a case-insensitive
        mapping (Starlette ``Headers``)."""
        if self.mode == "header":
            if not peer_trusted:
                return None, Reason.IDENTITY_REQUIRED
            user = headers.get(self.header)
            if user is None or user == "":
                return None, Reason.IDENTITY_REQUIRED
            # Header values arrive as bytes read as Latin-1 (RFC 9110 §5.5); nginx and SSO
            # proxies send a non-ASCII user name as UTF-8. Read it so, and refuse what is not.
            if not user.isascii():
                try:
                    user = user.encode("latin-1").decode("utf-8")
                except UnicodeError:
                    return None, Reason.INVALID_IDENTITY
            if not valid_user(user):
                return None, Reason.INVALID_IDENTITY
            return Identity(user, user), Reason.EXCLUDED
        return self._read_jwt(headers)

    def _read_jwt(self, headers: Any) -> tuple[Identity | None, Reason]:
        assert self.jwt is not None
        token = None
        auth = headers.get("authorization")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        if token is None and self.jwt.cookie:
            token = read_cookie(headers.get("cookie"), self.jwt.cookie)
        if token is None:
            return None, Reason.IDENTITY_REQUIRED
        if len(token) > 8192:
            return None, Reason.INVALID_IDENTITY
        now = time.time()
        hit = self._cache.get(token)
        if hit is not None:
            if hit[1] > now:
                return hit[0], Reason.EXCLUDED
            del self._cache[token]
        identity, expires = self._verify(token)
        if identity is None:
            return None, Reason.INVALID_IDENTITY
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[token] = (identity, expires)
        return identity, Reason.EXCLUDED

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
