"""gateway/session_cookie.py: the 2FA session cookie, set and cleared with the same attributes."""

from __future__ import annotations

from gateway.config import SessionConfig
from gateway.session_cookie import SessionCookie


def test_set_and_clear() -> None:
    cookie = SessionCookie(SessionConfig(cookie="gw", ttl=600, secure=True))
    assert cookie.name == "gw"
    assert cookie.set("abc") == (b"set-cookie", b"gw=abc; Path=/; Max-Age=600; HttpOnly; SameSite=Lax; Secure")
    # RFC 6265 §3.1: same name, path and attributes, Max-Age=0.
    assert cookie.clear() == (b"set-cookie", b"gw=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax; Secure")


def test_plain_http_sessions_are_not_marked_secure() -> None:
    cookie = SessionCookie(SessionConfig(secure=False))
    assert b"Secure" not in cookie.set("abc")[1] and b"Secure" not in cookie.clear()[1]
    assert cookie.set("abc")[1].startswith(b"gateway_session=abc; Path=/; Max-Age=43200; HttpOnly; SameSite=Lax")
