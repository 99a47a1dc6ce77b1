"""Hostile input at every route the gateway answers itself, through the real ``gateway run``:
oversized, malformed and duplicated queries and bodies, every method and content type. The
answer is never a 5xx, a refusal is JSON ``{"error", "detail"}``, and no traceback is logged."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest

from gateway import config as config_module
from tests.support.servers import enrol, free_port, fresh_keys, gateway_process

ROUTES = (
    "/setup-2fa",
    "/verify-2fa",
    "/recovery-codes",
    "/logout-2fa",
    "/auth",
    "/_gateway/health",
    "/_gateway/ready",
    "/_gateway/metrics",
)

MANY = "&".join(f"f{i}=v" for i in range(1000))
QUERIES = (
    "",
    "next=/x",
    "&".join(f"q{i}=1" for i in range(21)),  # one over the form parsers' max_num_fields
    MANY,
    "next=/a&next=/b&next=//evil.example",
    "code=123456&code=654321",
    "next=%ZZ%&%%%=&=&&",
    "next=" + "a" * 20_000,
    "next=%C3%28%FF%FE",
)

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
NESTED = "[" * 100_000 + "]" * 100_000
BODIES: tuple[tuple[str | None, bytes], ...] = (
    (JSON, b'{"code": "123456"}'),
    (JSON, b'{"code": "123456", "code": "654321"}'),
    (JSON, b'{"code": 123456}'),
    (JSON, b'{"code": {"$gt": ""}, "recovery_code": ["a"], "next": null}'),
    (JSON, b'{"code": "' + b"1" * 100_000 + b'"}'),
    (JSON, NESTED.encode()),
    (JSON, b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    (JSON, b"[1, 2, 3]"),
    (JSON, b"\xff\xfe\x00{"),
    (JSON, b'{"code": "\xc3\x28"}'),
    (JSON, json.dumps({f"k{i}": i for i in range(1000)}).encode()),
    (JSON, b"x" * (2 * 1024 * 1024)),
    (FORM, b"code=123456"),
    (FORM, b"code=1&code=2&recovery_code=a&recovery_code=b"),
    (FORM, MANY.encode()),
    (FORM, b"&".join(b"f%d=v" % i for i in range(21))),
    (FORM, b"code=%C3%28%FF"),
    (FORM, b"\xff\xfe=\x00"),
    (FORM, b"code=" + b"9" * 1_000_000),
    (FORM + "; charset=utf-16", "code=123456".encode("utf-16")),
    ("multipart/form-data", b"--x\r\n\r\n"),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n"),
    (
        "multipart/form-data; boundary=x",
        b"".join(b'--x\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i for i in range(1000))
        + b"--x--\r\n",
    ),
    (
        "multipart/form-data; boundary=x",
        b'--x\r\nContent-Disposition: form-data; name="code"; filename="a.txt"\r\n\r\n123456\r\n--x--\r\n',
    ),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="code"\r\n\r\n1'),
    ("text/plain", b"code=123456"),
    ("application/json; charset=latin-1", b'{"code": "\xe9"}'),
    ("application/xml", b"<code>1</code>"),
    (";;;", b"code=1"),
    (None, b"code=123456"),
    (JSON, b""),
)
IDENTITIES: tuple[dict[str, str], ...] = (
    {},
    {"Remote-User": "fuzz"},
    {"Remote-User": "fresh"},
)
ACCEPTS = ("application/json", "text/html", "image/png", "*/*;q=nan, text/html;q=2")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``gateway run`` in forward-auth mode (so ``/auth`` is on) with ``fuzz`` enrolled and a
    generous lockout, its output in a file."""
    tmp = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    path = tmp / "gateway.toml"
    path.write_text(
        f"""
[server]
port = {port}

[store]
url = "sqlite:///{tmp}/gateway.db"

[session]
secure = false

[limits]
max_failures = 1000
ip_max_failures = 100000
"""
    )
    keys = fresh_keys()
    enrol(config_module.load(path, env=keys), "fuzz", pyotp.random_base32())
    output = tmp / "output.log"
    with gateway_process(path, port, keys, output):
        yield f"http://127.0.0.1:{port}", output


def check(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{response.status_code} for {what}"
    kind = response.headers.get("content-type", "")
    if response.status_code >= 400 and kind.startswith("application/json") and response.request.method != "HEAD":
        body: Any = response.json()
        assert set(body) >= {"error", "detail"}, what


def test_no_input_makes_a_5xx_or_a_traceback(gateway: tuple[str, Path]) -> None:
    base, output = gateway
    seen: set[int] = set()
    with httpx.Client(base_url=base, timeout=60) as client:
        for route, query, identity, accept in itertools.product(ROUTES, QUERIES, IDENTITIES, ACCEPTS):
            for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
                url = route + ("?" + query if query else "")
                r = client.request(method, url, headers={**identity, "Accept": accept})
                check(r, f"{method} {route} query#{QUERIES.index(query)}")
                seen.add(r.status_code)
        for route, (kind, body), identity in itertools.product(ROUTES, BODIES, IDENTITIES):
            for query in ("", MANY):
                headers = {**identity, "Accept": "application/json"}
                if kind is not None:
                    headers["Content-Type"] = kind
                r = client.post(route + ("?" + query if query else ""), content=body, headers=headers)
                check(r, f"POST {route} body#{BODIES.index((kind, body))}")
                seen.add(r.status_code)
        # Duplicated identity and code headers; a user name that is not ASCII or not UTF-8.
        odd: list[list[tuple[bytes, bytes]]] = [
            [(b"Remote-User", b"fuzz"), (b"Remote-User", b"other"), (b"X-2FA-Code", b"1"), (b"X-2FA-Code", b"2")],
            [(b"Remote-User", b"a\xc3\xa9b")],
            [(b"Remote-User", b"\xff\xfe"), (b"X-2FA-Code", b"\xff")],
            [(b"Remote-User", b"fuzz,other")],
        ]
        for route, pairs in itertools.product(ROUTES, odd):
            for method in ("GET", "POST"):
                r = client.request(method, route, headers=pairs, json={"code": "123456"})
                check(r, f"{method} {route} odd headers")
    time.sleep(0.5)  # let the last lines reach the file (not a timing assertion)
    text = output.read_text(errors="replace")
    assert "Traceback" not in text
    assert "Exception in ASGI application" not in text
    assert " ERROR " not in text
    assert 400 in seen and 200 in seen  # the run exercised refusals and successes alike
