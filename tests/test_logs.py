"""Secrets stay out of every line the process writes (gateway/logs.py), at debug level too."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyotp
import pytest
from websockets.sync.client import connect

from gateway import config as config_module
from gateway.audit import audit, use_context
from gateway.logs import JsonFormatter, RedactingFilter, Redactor, RequestIdFilter, TextFormatter
from tests.support.servers import ROOT, UpstreamProcess, enrol, free_port, fresh_keys, gateway_process

# -- the rules, one line each ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("> Cookie: gateway_session=S3SS; other=1", "S3SS"),
        ("< X-2FA-Code: 123456", "123456"),
        ("< x-my-code:  654321", "654321"),  # a configured code header
        ("headers=[(b'authorization', b'Basic dXNlcjpwYXNz'), (b'host', b'h')]", "dXNlcjpwYXNz"),
        ("[('cookie', 'jwt=abc.def.ghi')]", "abc.def.ghi"),
        ('127.0.0.1:5 - "GET /verify-2fa?code=123456 HTTP/1.1" 200', "123456"),
        ('HTTP Request: GET http://up/p?token=T0KEN "HTTP/1.1 200 OK"', "T0KEN"),
        ("uri=otpauth://totp/Gw:alice?secret=JBSWY3DPEHPK3PXP&issuer=Gw", "JBSWY3DPEHPK3PXP"),
        ("sent Authorization: Bearer eyJ0.eyJ1.c2ln", "eyJ0.eyJ1.c2ln"),
        ("retrying with Bearer eyJ0.eyJ1.c2ln", "eyJ0.eyJ1.c2ln"),
        ("Set-Cookie: gateway_session=S3SS; HttpOnly", "S3SS"),
        ("a jwt=abc.def.ghi in a sentence", "abc.def.ghi"),
        ("> TEXT 'my password is hunter2' [22 bytes]", "hunter2"),
        ("cannot reach redis://gw:hunter2@10.0.0.5:6379/0 now", "hunter2"),
    ],
)
def test_each_rule_hides_the_value(line: str, secret: str) -> None:
    redacted = Redactor(headers=("X-My-Code",), cookies=("jwt",))(line)
    assert secret not in redacted
    assert "***" in redacted


def test_names_and_ordinary_text_stay() -> None:
    redact = Redactor()
    assert redact("> Cookie: a=b") == "> Cookie: ***"
    assert redact("> Host: example.com") == "> Host: example.com"
    assert redact("forwarding failed: upstream refused") == "forwarding failed: upstream refused"


def test_the_filter_rewrites_arguments_and_tracebacks() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "header %s: %s", ("Cookie", "gateway_session=S"), None)
    try:
        raise ValueError("Authorization: Basic c2VjcmV0")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert RedactingFilter(Redactor()).filter(record)
    text = logging.Formatter().format(record)
    assert "gateway_session=S" not in text and "c2VjcmV0" not in text
    assert "Cookie: ***" in text and "Authorization: ***" in text


# -- the formats ----------------------------------------------------------------------------------


def _emit(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """What a handler with the redacting and request-id filters writes for ``record``."""
    assert RedactingFilter(Redactor()).filter(record) and RequestIdFilter().filter(record)
    return formatter.format(record)


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    record = logging.LogRecord("gateway.proxy", logging.WARNING, __file__, 1, msg, args, None)
    if exc:
        try:
            raise ValueError("Authorization: Basic c2VjcmV0\nsecond line")
        except ValueError:
            record.exc_info = sys.exc_info()
    return record


def test_json_is_one_object_per_line_with_the_standard_fields() -> None:
    line = _emit(JsonFormatter(), _record("upstream said %s\nthen %s", "no", "Cookie: gateway_session=S3SS", exc=True))
    assert "\n" not in line
    obj = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["timestamp"])
    assert (obj["level"], obj["logger"]) == ("WARNING", "gateway.proxy")
    assert obj["message"] == "upstream said no\nthen Cookie: ***"
    assert "Authorization: ***" in obj["exception"] and "c2VjcmV0" not in line
    assert "request_id" not in obj  # outside a request


def test_an_audit_event_and_the_request_id_become_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    token = use_context("proxy", "req-9")
    try:
        audit("session.opened", "alice", client="10.0.0.7")
        logging.getLogger("gateway.audit").info("free text, Bearer eyJ0.eyJ1.c2ln")
        event, free = (json.loads(_emit(JsonFormatter(), r)) for r in caplog.records)
    finally:
        token.var.reset(token)
    assert {k: event[k] for k in ("event", "user", "client", "request_id", "mode")} == {
        "event": "session.opened",
        "user": "alice",
        "client": "10.0.0.7",
        "request_id": "req-9",
        "mode": "proxy",
    }
    assert free["request_id"] == "req-9" and "eyJ1" not in free["message"]


def test_text_lines_end_with_the_request_id() -> None:
    record = _record("upstream timeout on %s", "GET")
    record.request_id = "req-9"
    assert _emit(TextFormatter(), record).endswith("gateway.proxy: upstream timeout on GET request_id=req-9")


def test_a_text_message_is_one_line_whatever_it_quotes() -> None:
    """A message quoting client input (here a decoded path) must not become a second, forged
    line; a traceback still has its lines."""
    forged = "127.0.0.1:5 - \"GET /x\n2026-11-30 INFO gateway.audit: code.accepted user='admin'\x1b[2K HTTP/1.1\" 404"
    line = _emit(TextFormatter(), _record("%s", forged))
    assert line.count("\n") == 0 and "\x1b" not in line
    assert line.endswith("gateway.proxy: " + forged.replace("\n", "\\n").replace("\x1b", "\\x1b"))
    assert _emit(TextFormatter(), _record("failed", exc=True)).count("\n") >= 2


# What could split or disguise a line (gateway/logs.py _UNSAFE), each as a client can send it:
# ESC (ANSI), NEL and CSI (C1), the Unicode line and paragraph separators, a bidi override.
_UNSAFE = ["\x1b[2K", "\x85", "\x9b", "\u2028", "\u2029", "\u202e", "\x7f"]


@pytest.mark.parametrize("unsafe", _UNSAFE)
def test_no_character_that_breaks_a_line_is_written_raw(unsafe: str) -> None:
    message = f"GET /a{unsafe}b INFO gateway.audit: code.accepted user='admin'"
    text = _emit(TextFormatter(), _record("%s", message))
    obj = _emit(JsonFormatter(), _record("%s", message))
    for line in (text, obj):
        assert len(line.splitlines()) == 1 and unsafe[0] not in line and line.isascii()
    assert json.loads(obj)["message"] == message  # escaped, not lost: the JSON means the same text
    assert "user='admin'" in text and ("\\x" in text or "\\u" in text)


def _unsafe_in(text: str) -> list[str]:
    return sorted({f"U+{ord(c):04X}" for c in text if c in {u[0] for u in _UNSAFE}})


def test_a_real_gateway_writes_no_client_character_that_breaks_a_line(
    debug_gateway: tuple[str, Path, dict[str, str], Path],
) -> None:
    """Hostile bytes where a client can put them (a header value the websockets library logs at
    debug, a path, X-Original-URI, the user header): every line of the output stays one line
    and no raw control character reaches it, in both formats."""
    address, _, _, output = debug_gateway
    host, port = address.split(":")
    raw = "\x1b[2K\x85\x9b\u2028\u2029\u202e".encode("utf-8") + b"\x85\x9b"  # + latin-1 C1 bytes
    encoded = b"%1B%5B2K%C2%85%C2%9B%E2%80%A8%E2%80%A9%E2%80%AE"
    requests = [
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"User-Agent: w" + raw.replace(b"\x1b", b"") + b"\r\nRemote-User: bob" + raw[-2:] + b"\r\n\r\n",
        b"GET /public/" + encoded[3:] + b" HTTP/1.1\r\nHost: a\r\nUser-Agent: u" + raw[-2:] + b"\r\n"
        b"Connection: close\r\n\r\n",
        b"GET /x" + encoded + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"GET /auth HTTP/1.1\r\nHost: a\r\nX-Original-URI: /y" + encoded + b"\r\nX-Original-Method: GET\r\n"
        b"Remote-User: bob\r\nConnection: close\r\n\r\n",
    ]
    heads = []
    for request in requests:
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(request)
            heads.append(conn.recv(64).split(b"\r\n")[0])
    # (A path holding a control character is refused: gateway/inputs.py, gateway/paths.py.)
    assert heads == [b"HTTP/1.1 403 Forbidden", b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 400 Bad Request",
                     b"HTTP/1.1 403 Forbidden"]  # fmt: skip
    deadline = time.monotonic() + 10
    while "user-agent" not in output.read_text("utf-8").lower() and time.monotonic() < deadline:
        time.sleep(0.05)  # the lines reach the file (not a timing assertion)
    text = output.read_text("utf-8")
    assert "user-agent: w" in text.lower()  # the websockets library logged the header: the test saw it
    assert _unsafe_in(text) == []
    assert text.splitlines() == text.split("\n")[:-1]  # only "\n" ends a line
    if text.startswith("{"):
        assert all(json.loads(line)["message"] is not None for line in text.splitlines())


# -- the real process, every secret it handles -------------------------------------------------


@pytest.fixture(params=["text", "json"])
def debug_gateway(
    upstream: UpstreamProcess, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[str, Path, dict[str, str], Path]]:
    """``gateway run`` at debug level with the access log on, in each log format; all its
    output goes to a file."""
    port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
port = {port}
log_level = "debug"
access_log = true
log_format = "{request.param}"

[upstream]
url = "{upstream.url}"

[store]
url = "sqlite:///{tmp_path}/gateway.db"

[session]
secure = false
"""
    )
    keys = fresh_keys()
    output = tmp_path / "output.log"
    with gateway_process(path, port, keys, output):
        yield f"127.0.0.1:{port}", path, keys, output


def test_no_secret_reaches_the_output_at_debug_level(
    debug_gateway: tuple[str, Path, dict[str, str], Path],
) -> None:
    address, path, keys, output = debug_gateway
    config = config_module.load(path, env=keys)
    used: list[str] = list(keys.values())
    basic = base64.b64encode(b"alice:" + secrets.token_hex(8).encode()).decode()
    bearer = "eyJ" + secrets.token_urlsafe(24)
    query_token = secrets.token_hex(12)
    used += [basic, base64.b64decode(basic).decode().partition(":")[2], bearer, query_token]
    json_ = {"Accept": "application/json"}

    with httpx.Client(base_url=f"http://{address}", timeout=30) as client:
        # Enrolment over HTTP: the otpauth URI, its secret, the code, the session, recovery codes.
        alice = {"Remote-User": "alice", **json_}
        r = client.post("/setup-2fa", headers=alice)
        assert r.status_code == 200, r.text
        uri = r.json()["otpauth_uri"]
        secret = pyotp.parse_uri(uri).secret
        code = pyotp.TOTP(secret).now()
        used += [uri, secret, code]
        r = client.post("/verify-2fa", headers=alice, json={"code": code})
        assert r.status_code == 200, r.text
        recovery = r.json()["recovery_codes"]
        session = r.cookies[config.session.cookie]
        used += [*recovery, session]
        client.cookies.clear()
        cookie = {"Cookie": f"{config.session.cookie}={session}"}

        # The session cookie and credentials the app reads, with a query, on a proxied request.
        r = client.get(
            f"/private?api_key={query_token}", headers={**alice, **cookie, "Authorization": f"Basic {basic}"}
        )
        assert r.status_code == 200, r.text
        r = client.get("/private", headers={**alice, **cookie, "Authorization": f"Bearer {bearer}"})
        assert r.status_code == 200, r.text

        # A recovery code opens a second session.
        r = client.post("/verify-2fa", headers=alice, json={"recovery_code": recovery[0]})
        assert r.status_code == 200, r.text
        used.append(r.cookies[config.session.cookie])
        client.cookies.clear()

        # A code in the header, for a user enrolled directly.
        bob_secret = enrol(config, "bob")
        bob_code = pyotp.TOTP(bob_secret).now()
        used += [bob_secret, bob_code]
        r = client.get("/private", headers={"Remote-User": "bob", "X-2FA-Code": bob_code, **json_})
        assert r.status_code == 200, r.text
        if config.session.cookie in r.cookies:
            used.append(r.cookies[config.session.cookie])
        client.cookies.clear()

    # WebSockets: with the session cookie (and credentials the app reads), and with a code.
    ws_headers = {"Remote-User": "alice", **cookie, "Authorization": f"Basic {basic}"}
    with connect(f"ws://{address}/ws?api_key={query_token}", additional_headers=ws_headers, open_timeout=30) as ws:
        assert ws.recv(timeout=30) == "hello alice"
        ws.send("ping")
        assert ws.recv(timeout=30) == "echo ping"
    carol_secret = enrol(config, "carol")
    carol_code = pyotp.TOTP(carol_secret).now()
    used += [carol_secret, carol_code]
    ws_headers = {"Remote-User": "carol", "X-2FA-Code": carol_code, "Authorization": f"Bearer {bearer}"}
    with connect(f"ws://{address}/ws", additional_headers=ws_headers, open_timeout=30) as ws:
        assert ws.recv(timeout=30) == "hello carol"

    with httpx.Client(base_url=f"http://{address}", timeout=30) as client:
        # A wrong code and a replayed one (their audit events name the user, never the code).
        wrong = f"{(int(bob_code) + 1) % 1_000_000:06d}"
        used.append(wrong)
        for attempt in (wrong, bob_code):
            r = client.get("/private", headers={"Remote-User": "bob", "X-2FA-Code": attempt, **json_})
            assert r.status_code == 401, r.text
        r = client.post("/logout-2fa", headers={**alice, **cookie})
        assert r.status_code == 200, r.text

    # An operator's reset (mode "cli"), its audit event logged by the command itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | keys
    reset = subprocess.run(
        [sys.executable, "-m", "gateway", "users", "--config", str(path), "reset", "alice"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reset.returncode == 0, reset.stderr

    time.sleep(0.5)  # let the last lines reach the file (not a timing assertion)
    text = output.read_text(errors="replace") + reset.stdout + reset.stderr
    assert "user.reset" in reset.stderr and "code.replayed" in text  # the audit events were on
    if 'log_format = "json"' in path.read_text():
        assert all(json.loads(line)["logger"] for line in text.splitlines() if line.startswith("{"))
        assert not [line for line in output.read_text().splitlines() if line and not line.startswith("{")]
    assert "GET /private" in text  # the access log was on: the test saw what it checks
    assert "DEBUG" in text
    # Positions only: the failure message must not print the secrets it found.
    leaked = [i for i, s in enumerate(used) if re.search(rf"(?<![0-9A-Za-z]){re.escape(s)}(?![0-9A-Za-z])", text)]
    assert leaked == [], f"secret values number {leaked} of {len(used)} appear in the output"
