"""How a denial is said: the one boundary where a :class:`Reason` becomes status, headers and
body. JSON ``{"error", "detail"}`` for programs, a small HTML page for browsers.

On the hot paths (proxy, ``/auth``) responses are sent as raw ASGI messages: the gateway
answers many denials under attack and they should cost as little as an allow. The pages'
router gets the same bytes as Starlette responses (``*_response``).
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Iterable
from typing import Any

from starlette.responses import Response
from starlette.types import Send

from gateway.errors import DENIALS, Reason
from gateway.http import wants_html

_NO_STORE: list[tuple[bytes, bytes]] = [(b"cache-control", b"no-store")]
_JSON: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
_HTML: list[tuple[bytes, bytes]] = [(b"content-type", b"text/html; charset=utf-8")]

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title><style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36rem;margin:3rem auto;
padding:0 1rem;color:#1b1b1b}}h1{{font-size:1.4rem}}code{{background:#eee;padding:.1rem .3rem}}</style>
</head><body><main><h1>{title}</h1><p>{detail}</p>{extra}</main></body></html>
"""


def denial_body(
    reason: Reason, html_page: bool, extra_html: str = "", **fields: object
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    status, detail = DENIALS[reason]
    if html_page:
        title = f"{status} — {reason.value.replace('_', ' ')}"
        page = _PAGE.format(title=html.escape(title), detail=html.escape(detail), extra=extra_html)
        return status, _HTML + _NO_STORE, page.encode()
    if not fields:
        return status, _JSON + _NO_STORE, _plain_json_denial(reason)
    body: dict[str, object] = {"error": reason.value, "detail": detail}
    body.update(fields)
    return status, _JSON + _NO_STORE, json.dumps(body, separators=(",", ":")).encode()


@functools.cache
def _plain_json_denial(reason: Reason) -> bytes:
    # Made once per reason: a flood of bad codes is answered without serialising anything.
    return json.dumps({"error": reason.value, "detail": DENIALS[reason][1]}, separators=(",", ":")).encode()


async def send_response(send: Send, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> None:
    hdrs = list(headers)
    hdrs.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def denial(
    reason: Reason,
    accept: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    retry_after: int | None = None,
    extra_html: str = "",
    **fields: object,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``(status, headers, body)`` of a denial, as :func:`send_denial` and
    :func:`denial_response` send it."""
    status, base, body = denial_body(reason, wants_html(accept), extra_html, **fields)
    out = base + list(headers)
    if retry_after is not None:
        # RFC 9110 §10.2.3
        out.append((b"retry-after", str(retry_after).encode()))
    if status == 401:
        # RFC 9110 §11.6.1: a 401 carries a challenge. The scheme is ours; it names the header.
        out.append((b"www-authenticate", b'X-2FA-Code realm="gateway"'))
    return status, out, body


async def send_denial(
    send: Send,
    reason: Reason,
    accept: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    retry_after: int | None = None,
    extra_html: str = "",
    **fields: object,
) -> None:
    status, out, body = denial(reason, accept, headers, retry_after, extra_html, **fields)
    await send_response(send, status, out, body)


def raw_response(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> Response:
    """A Starlette response with exactly these headers (repeats kept: two ``Set-Cookie``), plus
    ``Content-Length``: what :func:`send_response` sends, for the pages' router."""
    response = Response(body, status_code=status)
    response.raw_headers.extend(headers)
    return response


def denial_response(reason: Reason, accept: str | None = None, **kwargs: Any) -> Response:
    """:func:`send_denial` as a Starlette response."""
    return raw_response(*denial(reason, accept, **kwargs))


async def send_json(send: Send, status: int, data: object, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    await send_response(send, status, *_json(data, headers))


def json_response(status: int, data: object, headers: Iterable[tuple[bytes, bytes]] = ()) -> Response:
    """:func:`send_json` as a Starlette response."""
    return raw_response(status, *_json(data, headers))


def _json(data: object, headers: Iterable[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bytes]:
    return _JSON + _NO_STORE + list(headers), json.dumps(data, separators=(",", ":")).encode()
