"""Real nginx and Caddy in front of the gateway, started from the example files in ``config/``.

The examples are written for a real host (``listen 80``, the gateway on ``127.0.0.1:8080``,
the app on ``127.0.0.1:3000``, ``/etc/nginx/gateway.htpasswd`` ...). A test replaces exactly
those literals with its free ports and temporary files; every replacement must match at least
once, so an example that drifts away from what the tests expect fails loudly instead of
being tested half-way.
"""

from __future__ import annotations

import base64
import grp
import http.client
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import need_binary
from tests.support.servers import ROOT, free_port, wait_for_port

# Requests that try to reach /admin through a front while only /public/* is excluded: each must be
# decided as /admin (denied), however the front or the gateway could read it.
BYPASSES = [
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "//admin",
    "//public/../admin",
    "/public/..;/admin",
    "/admin?x=/public",
    "/admin#/public",
    "/public/%2e%2e%2fadmin",
    "/public/..%2fadmin",
    "/public/..%5cadmin",
    "/public/%252e%252e/admin",
    "/public/%ef%bc%8e%ef%bc%8e/admin",
    "/admin/%2e%2e/public/x",
    "/Public/x",
    "/public/../../admin",
    "http://127.0.0.1/admin",
]

CONFIG = ROOT / "config"


def substitute(text: str, replacements: dict[str, str], source: str) -> str:
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"{source}: the example no longer contains {old!r}")
        text = text.replace(old, new)
    return text


def basic_auth(user: str, password: str) -> str:
    """The ``Authorization`` value for HTTP Basic (RFC 7617)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _world_readable_dir(prefix: str) -> Path:
    # nginx started as root runs its workers as nobody: they must read the site's files.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class NginxFront:
    """nginx serving one site file from config/nginx/, on a free port, in the foreground."""

    def __init__(self, binary: str, site: str, replacements: dict[str, str]) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = _world_readable_dir("gw-nginx-")
        self.source = CONFIG / "nginx" / site
        self.replacements = {"listen 80;": f"listen 127.0.0.1:{self.port};", **replacements}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def htpasswd(self, users: dict[str, str]) -> str:
        """Write an htpasswd file (APR1-MD5 hashes, as ``openssl passwd -apr1`` makes them)."""
        lines = []
        for user, password in users.items():
            hashed = (
                subprocess.run(
                    ["openssl", "passwd", "-apr1", "-stdin"],
                    input=password.encode(),
                    capture_output=True,
                    check=True,
                )
                .stdout.decode()
                .strip()
            )
            lines.append(f"{user}:{hashed}\n")
        path = self.dir / "htpasswd"
        path.write_text("".join(lines))
        path.chmod(0o644)
        return str(path)

    def start(self) -> NginxFront:
        site = substitute(self.source.read_text(), self.replacements, str(self.source))
        (self.dir / "site.conf").write_text(site)
        user = ""
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};\n"
        d = self.dir
        (d / "nginx.conf").write_text(
            f"{user}daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n"
            f"error_log {d}/error.log warn;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"    access_log {d}/access.log;\n"
            f"    client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n"
            f"    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n"
            f"    include {d}/site.conf;\n"
            "}\n"
        )
        command = [self.binary, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused {self.source}:\n{check.stderr}")
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port)
        except RuntimeError:
            self.stop()
            raise
        return self

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)  # nginx: fast shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class CaddyFront:
    """Caddy serving config/caddy/Caddyfile on a free port, with its state in a temp dir."""

    def __init__(self, binary: str, replacements: dict[str, str]) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-caddy-"))
        self.source = CONFIG / "caddy" / "Caddyfile"
        self.replacements = {"app.example.com {": f"http://127.0.0.1:{self.port} {{", **replacements}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hash_password(self, password: str) -> str:
        return subprocess.run(
            [self.binary, "hash-password", "--plaintext", password],
            capture_output=True,
            text=True,
            check=True,
            env=self._env(),
        ).stdout.strip()

    def _env(self) -> dict[str, str]:
        # Caddy keeps certificates and autosaved config under $HOME / XDG dirs: keep them here.
        return {
            **os.environ,
            "HOME": str(self.dir),
            "XDG_DATA_HOME": str(self.dir / "data"),
            "XDG_CONFIG_HOME": str(self.dir / "config"),
        }

    def start(self) -> CaddyFront:
        text = substitute(self.source.read_text(), self.replacements, str(self.source))
        path = self.dir / "Caddyfile"
        path.write_text(text)
        self.log = (self.dir / "caddy.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, "run", "--config", str(path), "--adapter", "caddyfile"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self._env(),
            cwd=self.dir,
        )
        try:
            wait_for_port(self.port)
        except RuntimeError:
            self.stop()
            raise
        return self

    def output(self) -> str:
        path = self.dir / "caddy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# The Caddyfile's example account ("alice", hash of "change-me"), replaced by the test's users.
CADDY_EXAMPLE_USER = "alice $2a$14$1bc0Yf8WIEjgFeiwVmnb1eDexb5nunQFlGiuP/jMPnIObPgzNjmeG"


def start_forward_auth(
    kind: str, gateway_port: int, app_port: int, passwords: dict[str, str], caddy_hash: str | None = None
) -> NginxFront | CaddyFront:
    """nginx (config/nginx/auth_request.conf) or Caddy (config/caddy/Caddyfile) in front of the
    app on ``app_port``, asking the gateway on ``gateway_port``; ``passwords``: the first factor's
    users. Caddy's users all share the password ``caddy_hash`` was made from (bcrypt is slow)."""
    if kind == "nginx":
        nginx = NginxFront(
            need_binary("nginx"),
            "auth_request.conf",
            {
                "server 127.0.0.1:8080;": f"server 127.0.0.1:{gateway_port};",
                "server 127.0.0.1:3000;": f"server 127.0.0.1:{app_port};",
            },
        )
        nginx.replacements["/etc/nginx/gateway.htpasswd"] = nginx.htpasswd(passwords)
        return nginx.start()
    assert kind == "caddy" and caddy_hash is not None, kind
    caddy = CaddyFront(
        need_binary("caddy"),
        {
            "admin localhost:2019": "admin off",
            "127.0.0.1:8080": f"127.0.0.1:{gateway_port}",
            "127.0.0.1:3000": f"127.0.0.1:{app_port}",
            CADDY_EXAMPLE_USER: "\n\t\t".join(f"{user} {caddy_hash}" for user in passwords),
        },
    )
    try:
        return caddy.start()
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{caddy.output()}") from None


def raw_request(
    port: int,
    target: str,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    method: str = "GET",
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """Send ``target`` exactly as given (no client-side normalisation): ``(status, headers, body)``.
    Header names in the answer are lower case; repeated ones are joined with ``", "``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", f"127.0.0.1:{port}")
        pairs = headers.items() if isinstance(headers, dict) else headers or []
        for name, value in pairs:
            conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        body = response.read()
        got: dict[str, str] = {}
        for name, value in response.getheaders():
            got[name.lower()] = f"{got[name.lower()]}, {value}" if name.lower() in got else value
        return response.status, got, body
    finally:
        conn.close()


def totp_now(secret: str) -> str:
    """The current code from an independent implementation (oathtool, RFC 6238), or pyotp."""
    if shutil.which("oathtool") is None:
        import pyotp

        return str(pyotp.TOTP(secret).now())
    return subprocess.run(
        ["oathtool", "--totp", "-b", secret], capture_output=True, text=True, check=True
    ).stdout.strip()


# -- issue 9: headers no front in config/ may pass to the app -------------------------------------

# Routing overrides and their look-alikes, what an SSO proxy says about its user (found through
# every front by the second attack), and the h2c settings header; each front test adds its own.
OVERRIDES = {
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
    "X-Forwarded-Prefix": "/admin",
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "DELETE",
    "X_Original_URL": "/admin",
    "X.HTTP.Method.Override": "DELETE",
    "X-Forwarded-User": "admin",
    "X-Forwarded-Email": "admin@example.com",
    "X-Forwarded-Groups": "admins",
    "X-Forwarded-Preferred-Username": "admin",
    "X-Auth-Request-User": "admin",
    "X-Auth-Request-Email": "admin@example.com",
    "X-Remote-User": "admin",
    "X-WEBAUTH-USER": "admin",
    "X_Forwarded_User": "admin",
    "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
    # A host, port or scheme nobody checked (the issue 12 attack: a password-reset link to evil).
    "Forwarded": "for=6.6.6.6;host=evil.example;proto=https",
    "X-Forwarded-Port": "8443",
    "X-Forwarded-Server": "evil.example",
    "X-Forwarded-Scheme": "https",
    "X-Original-Host": "evil.example",
    "X-Host": "evil.example",
    # ... and what other frameworks read for the scheme or the client (the third attack).
    "X-Scheme": "https",
    "X-Forwarded-Protocol": "https",
    "Client-IP": "6.6.6.6",
    "True-Client-IP": "6.6.6.6",
    "X_Forwarded_Port": "1337",
    "X_Original_Host": "evil.example",
    # A request id of the client's choosing would tangle the audit trail (the fourth attack):
    # each front sets its own, or none.
    "X-Request-Id": "forged-by-client",
    "X_Request_Id": "forged-by-client",
}
NEVER_TO_THE_APP = {"x-original-url", "x-rewrite-url", "x-forwarded-prefix", "x-http-method-override"}
NEVER_TO_THE_APP |= {"x-forwarded-user", "x-forwarded-email", "x-forwarded-groups", "x-forwarded-preferred-username"}
NEVER_TO_THE_APP |= {"x-auth-request-user", "x-auth-request-email", "x-remote-user", "x-webauth-user"}
NEVER_TO_THE_APP |= {"x-http-method", "x-method-override", "upgrade", "http2-settings", "x-2fa-code"}
# (X-Forwarded-Port: the gateway sets its own in proxy mode; tests/test_hosts.py checks its value.)
NEVER_TO_THE_APP |= {"forwarded", "x-forwarded-server", "x-forwarded-scheme"}
NEVER_TO_THE_APP |= {"x-original-host", "x-host", "x-scheme", "x-forwarded-protocol", "client-ip", "true-client-ip"}


def reached_the_app(headers: object) -> set[str]:
    """Which of NEVER_TO_THE_APP the app saw (``headers``: the echo's dict of lower-case names),
    look-alikes spelled with "_" or "." included."""
    assert isinstance(headers, dict)
    names = {str(name).replace("_", "-").replace(".", "-") for name in headers}
    forged = {"x-request-id"} if OVERRIDES["X-Request-Id"] in map(str, headers.values()) else set()
    return (names & NEVER_TO_THE_APP) | forged
