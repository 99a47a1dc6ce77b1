"""The process's logging: one handler on the root logger, and one filter on it that keeps
secrets out of every line, at every level.

Every logger propagates to that handler: the gateway's own, uvicorn's (``uvicorn.error``, and
``uvicorn.access`` when ``server.access_log`` is on), the websockets library's and httpx's. At
``debug`` those libraries print what crossed the wire: the websockets library logs each
handshake header (``> Cookie: ...``, ``< X-2FA-Code: ...``) and each frame's payload, on
``websockets.client`` and, inside uvicorn, on ``uvicorn.error``; the access log and httpx print
request targets with their query. A filter on each library's logger would miss the next
library; a filter on the handler sees every record once, after it is formatted, whoever logged it.

What the filter hides (values only; names stay, so a line still says what happened):
- the values of credential headers: ``Authorization``, ``Proxy-Authorization``, ``Cookie``,
  ``Set-Cookie``, the code header (``totp.header``), written ``Name: value`` or as a raw
  ``(b'name', b'value')`` pair;
- ``Basic``/``Bearer``/``Digest`` credentials and ``name=value`` of the session and JWT cookies,
  wherever they appear;
- the password of any URL (``redis://:pw@host``), by ``tables.redact_url``, the one function
  every message of the gateway uses for that; every query string (a code or token typed into a
  URL); ``otpauth://`` URIs whole (they carry the TOTP secret);
- WebSocket frame payloads in the websockets library's debug lines (application data the
  gateway cannot judge).

The gateway itself never logs a code, a session id, a recovery code or a key: this filter is
the net under the libraries, not a licence.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable

from gateway.tables import redact_url

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-2fa-code")
SECRET_COOKIES = ("gateway_session",)

_MASK = "***"
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s\"'<>]+")
_QUERY = re.compile(r"\?[^\s\"'<>]+")
_OTPAUTH = re.compile(r"(?i)otpauth://[^\s\"'<>]*")
_SCHEME_CREDENTIALS = re.compile(r"(?i)\b(Basic|Bearer|Digest)\s+[^\s\"',]+")
_FRAME = re.compile(r"(?m)^([<>] (?:TEXT|BINARY|CONT)) .*?((?: \[[^\]\n]*\])?)$")


class Redactor:
    """The rules above as one function from text to text; the header and cookie names are
    the built-in ones plus the configured ones."""

    def __init__(self, headers: Iterable[str] = (), cookies: Iterable[str] = ()) -> None:
        names = "|".join(sorted({re.escape(h.lower()) for h in (*SECRET_HEADERS, *headers)}, key=len, reverse=True))
        jar = "|".join(sorted({re.escape(c) for c in (*SECRET_COOKIES, *cookies)}, key=len, reverse=True))
        # "Name: value" up to the end of the line (a header as the websockets library logs it).
        self._header_line = re.compile(rf"(?im)((?<![\w-])(?:{names})[ \t]*:[ \t]*)[^\r\n]*")
        # ('name', 'value') or (b'name', b'value'): a header pair in a repr.
        self._header_pair = re.compile(rf"(?i)(b?(['\"])(?:{names})\2\s*,\s*b?)(['\"])(?:\\.|(?!\3).)*\3")
        self._cookie = re.compile(rf"((?<![\w-])(?:{jar})=)[^;\s,\"']*")

    def __call__(self, text: str) -> str:
        text = _OTPAUTH.sub("otpauth://" + _MASK, text)
        text = _URL.sub(lambda m: redact_url(m.group()), text)
        text = self._header_pair.sub(rf"\g<1>\g<3>{_MASK}\g<3>", text)
        text = self._header_line.sub(rf"\g<1>{_MASK}", text)
        text = _SCHEME_CREDENTIALS.sub(rf"\g<1> {_MASK}", text)
        text = self._cookie.sub(rf"\g<1>{_MASK}", text)
        text = _FRAME.sub(rf"\g<1> {_MASK}\g<2>", text)
        return _QUERY.sub("?" + _MASK, text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and traceback text) through a :class:`Redactor`."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: say so rather than show the arguments
            message = f"{record.msg!s} (unformattable arguments)"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def configure_logging(level: str, headers: Iterable[str] = (), cookies: Iterable[str] = ()) -> None:
    """Log at ``level`` to stderr through the redacting filter; ``headers`` and ``cookies`` are
    the configured names whose values are secret (the code header, the session and JWT cookies)."""
    root = logging.getLogger()
    if not root.handlers:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(stderr)
    root.setLevel(level.upper())
    redacting = RedactingFilter(Redactor(headers, cookies))
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
            handler.removeFilter(old)
        handler.addFilter(redacting)
