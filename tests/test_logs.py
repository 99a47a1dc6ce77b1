"""Secrets stay out of every line the process writes (gateway/logs.py), at debug level too."""

from __future__ import annotations

import base64
import logging
import re
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyotp
import pytest
from websockets.sync.client import connect

from gateway import config as config_module
from gateway.logs import RedactingFilter, Redactor
from tests.support.servers import UpstreamProcess, enrol, free_port, fresh_keys, gateway_process

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


# -- the real process, every secret it handles -------------------------------------------------


@pytest.fixture
def debug_gateway(upstream: UpstreamProcess, tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str], Path]]:
    """``gateway run`` at debug level with the access log on; all its output goes to a file."""
    port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
port = {port}
log_level = "debug"
access_log = true

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
        r = client.post("/logout-2fa", headers={**alice, **cookie})
        assert r.status_code == 200, r.text

    time.sleep(0.5)  # let the last lines reach the file (not a timing assertion)
    text = output.read_text(errors="replace")
    assert "GET /private" in text  # the access log was on: the test saw what it checks
    assert "DEBUG" in text
    # Positions only: the failure message must not print the secrets it found.
    leaked = [i for i, s in enumerate(used) if re.search(rf"(?<![0-9A-Za-z]){re.escape(s)}(?![0-9A-Za-z])", text)]
    assert leaked == [], f"secret values number {leaked} of {len(used)} appear in the output"
