"""The 2FA session cookie: how it is set and how it is cleared, written once."""

from __future__ import annotations

from gateway.config import SessionConfig


class SessionCookie:
    def __init__(self, config: SessionConfig) -> None:
        self.name = config.cookie
        self.ttl = config.ttl
        # RFC 6265 §4.1.2: HttpOnly keeps it from scripts, SameSite=Lax from cross-site POSTs.
        self._attributes = "; Path=/; Max-Age={}; HttpOnly; SameSite=Lax" + ("; Secure" if config.secure else "")

    def set(self, session_id: str) -> tuple[bytes, bytes]:
        """The ``Set-Cookie`` header that hands ``session_id`` to the browser."""
        return b"set-cookie", (f"{self.name}={session_id}" + self._attributes.format(self.ttl)).encode()

    def clear(self) -> tuple[bytes, bytes]:
        """RFC 6265 §3.1: the same name, path and attributes with Max-Age=0 remove the cookie."""
        return b"set-cookie", (f"{self.name}=" + self._attributes.format(0)).encode()
