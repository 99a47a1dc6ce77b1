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

Formats (``server.log_format``): ``text``, one readable line per record, and ``json``, one
object per line (``timestamp`` in RFC 3339 UTC, ``level``, ``logger``, ``message``, then
``request_id`` inside a request, an audit event's fields (``gateway.audit``), and ``exception``).
The filter runs before either formatter, so both print the same redacted text; an audit event's
string fields go through it too.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable

from gateway.audit import current_request_id
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
        fields = getattr(record, "audit", None)
        if isinstance(fields, dict):
            record.audit = {k: self.redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (``gateway.audit``'s context) on every record logged while
    the request is served, whoever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


# What a client-controlled string could break or disguise a line with, in either format:
# - C0 controls and DEL (a newline starts a forged line; ESC starts an ANSI sequence that
#   rewrites what a terminal shows: CWE-117, CWE-150);
# - C1 controls, U+0080..U+009F (U+0085 NEL is a line break to Python's ``str.splitlines``
#   and to many log shippers; U+009B is CSI, an 8-bit ANSI escape to a terminal);
# - U+2028 and U+2029, the Unicode line and paragraph separators (line breaks to
#   ``splitlines``, to JavaScript before ES2019 and to editors; legal unescaped in JSON,
#   RFC 8259 §7, which is why ``json.dumps`` leaves them);
# - the bidirectional embeddings, overrides and isolates (U+202A..U+202E, U+2066..U+2069):
#   they reorder what a reader sees, so a line can show a user or an address it does not hold
#   (CVE-2021-42574, "Trojan Source").
# A path or a header reaches a message decoded (a percent-encoded U+2028, a latin-1 byte 0x85),
# so every one is written as an escape: one record is one line, and shows what it holds.
_UNSAFE = (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_CONTROLS = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _UNSAFE} | {
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
}
# In JSON the same characters as JSON escapes (json.dumps has already escaped C0 and the quote).
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _UNSAFE if c >= 0x7F}


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, and ``request_id=...`` at the end of a request's lines
    (an audit event's message already names it). A newline or other character of ``_UNSAFE``
    (above) in the message is escaped, so a message quoting what a client sent (a header, a decoded path) cannot
    start a forged line (CWE-117; uvicorn's access line already quotes its path, not every
    library does). A traceback keeps its lines, after the message."""

    def __init__(self) -> None:
        super().__init__(_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_CONTROLS)
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        if request_id and not hasattr(record, "audit"):
            line = f"{line} request_id={request_id}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``json.dumps`` escapes C0 controls, and the
    characters it leaves (``_UNSAFE`` above: C1, U+2028/U+2029, bidi controls) are escaped after."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, object] = {
            "timestamp": f"{created}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        fields = getattr(record, "audit", None)
        if isinstance(fields, dict):
            line.update((k, v) for k, v in fields.items() if k not in ("timestamp", "level", "logger", "message"))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        # Only inside strings can these characters occur (the rest of the line is ASCII), and
        # there a \\uXXXX escape means the same character: the object is unchanged.
        return json.dumps(line, default=str, ensure_ascii=False).translate(_JSON_ESCAPES)


FORMATTERS: dict[str, type[logging.Formatter]] = {"text": TextFormatter, "json": JsonFormatter}


class _GatewayHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` added, and so may format."""


def configure_logging(
    level: str, headers: Iterable[str] = (), cookies: Iterable[str] = (), log_format: str = "text"
) -> None:
    """Log at ``level`` to stderr in ``log_format`` (``text`` or ``json``) through the redacting
    filter; ``headers`` and ``cookies`` are the configured names whose values are secret (the
    code header, the session and JWT cookies)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_GatewayHandler(sys.stderr))
    root.setLevel(level.upper())
    redacting = RedactingFilter(Redactor(headers, cookies))
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, (RedactingFilter, RequestIdFilter))]:
            handler.removeFilter(old)
        handler.addFilter(redacting)
        handler.addFilter(RequestIdFilter())
        if isinstance(handler, _GatewayHandler):  # not a handler someone else set up (pytest's)
            handler.setFormatter(FORMATTERS[log_format]())
