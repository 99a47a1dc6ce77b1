"""What the gateway's own routes read from a request: the body's fields and the return
target after verification (the preferred media type is ``http.negotiate``).

Each is judged here once, strictly: a body that is not the JSON object or form expected is
refused whole (``BadInput``, a 400), and a return target that is not provably a path on this
site becomes ``"/"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from typing import Any
from urllib.parse import parse_qsl, unquote

# Request.form() imports it only when a multipart body arrives (starlette.formparsers): import it
# here, so an install without it fails at start-up rather than on the first multipart form.
import python_multipart  # noqa: F401
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import AmbiguousPath
from gateway.paths import canonical_path, encode_path

MAX_BODY = 16 * 1024
_MAX_FIELD = 4096
_MAX_FIELDS = 20  # a query or form with more is not one of our forms (and parsing it costs)
_FIELDS = ("code", "recovery_code", "next")
_TARGET_MAX = 2048
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


class BadInput(Exception):
    """The body cannot be read as the fields we expect (400 invalid_input). The message is the
    answer's ``detail``: it names the field and what is wrong, never a value the client sent."""


def safe_target(raw: str | None, refused: Collection[str] = ()) -> str:
    """``raw`` if it is a path on this site to return to after verification, else ``"/"``.

    A return target taken from a URL is an open redirect unless it is provably local. Only a
    single ``/`` followed by visible ASCII passes: ``//host`` and ``/\\host`` are other hosts to
    a browser (WHATWG URL reads ``\\`` as ``/``), schemes and whitespace are refused, and so is
    anything whose percent-decoded form holds a backslash, ``//`` at the start, whitespace or a
    control character. The path must be canonical-able (``paths.canonical_path``) and is
    returned re-encoded; the gateway's own ``refused`` routes fall back to ``"/"`` (no loops).
    """
    if not raw or len(raw) > _TARGET_MAX or not _VISIBLE_ASCII.fullmatch(raw) or "\\" in raw:
        return "/"
    if not raw.startswith("/") or raw.startswith("//"):
        return "/"
    decoded = unquote(raw)
    if "\\" in decoded or decoded.startswith("//") or any(c.isspace() or not c.isprintable() for c in decoded):
        return "/"
    path, sep, query = raw.split("#", 1)[0].partition("?")
    try:
        path = canonical_path(path)
    except AmbiguousPath:
        return "/"
    if path in refused:
        return "/"
    target = encode_path(path) + sep + query
    # The bound holds for what is answered too: re-encoding can triple a path ("}" is "%7D"),
    # and the verify page reads its own target back through this function (found by
    # `python -m fuzz forms`: a 1,100-character target became 2,051, then "/").
    return target if len(target) <= _TARGET_MAX else "/"


class BodyLimit:
    """Pure ASGI: a request body over :data:`MAX_BODY` is :class:`BadInput` as soon as it is
    known to be (our forms are a few hundred bytes), and a client that goes away mid-body is
    too; nothing larger is ever held in memory."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = 0

        async def limited() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadInput("the client went away")
            size += len(message.get("body", b""))
            if size > MAX_BODY:
                raise BadInput("the body is too large")
            return message

        await self.app(scope, limited if scope["type"] == "http" else receive, send)


def _unique(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """``pairs`` as a dict; BadInput when one of our fields comes twice: which one would the
    reader of a log, a proxy or another framework have taken?"""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data and key in _FIELDS:
            raise BadInput(f"{key} is given more than once")
        data[key] = value
    return data


def read_query(scope: Scope) -> dict[str, str]:
    """The query's fields: at most 20, ours at most once each; BadInput otherwise."""
    try:
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), max_num_fields=_MAX_FIELDS)
    except ValueError:
        raise BadInput("too many query parameters") from None
    return _unique(pairs)


async def read_fields(request: Request) -> dict[str, str]:
    """The known fields of a JSON or form body, each a string; BadInput otherwise. The body's
    size is bounded by :class:`BodyLimit` around the router."""
    body = await request.body()
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    data: Any
    if content_type == "application/json":
        try:
            data = json.loads(body, object_pairs_hook=_unique)
        except (ValueError, RecursionError):
            raise BadInput("not JSON") from None
        if not isinstance(data, dict):
            raise BadInput("not a JSON object")
    elif content_type == "application/x-www-form-urlencoded":
        # Not Request.form(): it reads %ff as Latin-1, and a code or target that is not UTF-8
        # is malformed, not a wrong code.
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=_MAX_FIELDS, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise BadInput("not a form") from None
        data = _unique(pairs)
    elif content_type == "multipart/form-data":
        data = await _multipart(request)
    elif not body.strip():
        data = {}
    else:
        raise BadInput("unsupported content type")
    fields: dict[str, str] = {}
    for name in _FIELDS:
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > _MAX_FIELD:
            raise BadInput(f"{name} is not a string")
        if value.strip():
            fields[name] = value
    return fields


async def _multipart(request: Request) -> dict[str, Any]:
    # The body is already read (Request.body() keeps it), so form() parses those bytes.
    try:
        form = await request.form(max_files=0, max_fields=_MAX_FIELDS)
    except Exception:  # python-multipart's and Starlette's parse errors: all one answer
        raise BadInput("not a multipart form") from None
    try:
        return _unique(form.multi_items())
    finally:
        await form.close()
