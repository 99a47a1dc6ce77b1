"""Config loading: the example is valid, and every mistake is named by its key."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from gateway import config, config_keys, config_warnings
from gateway.errors import ConfigError
from gateway.tables import declared
from gateway.totp import TotpParams

ROOT = Path(__file__).resolve().parents[1]
KEY = Fernet.generate_key().decode()
PEPPER = Fernet.generate_key().decode()
ENV = {config.ENV_KEYS: KEY, config.ENV_PEPPER: PEPPER}


def problems(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(data, env=ENV if env is None else env)
    return info.value.problems


def test_example_file_is_valid_and_documents_defaults() -> None:
    cfg = config.load(ROOT / "gateway.example.toml", env=ENV)
    assert cfg.upstream.url == "http://127.0.0.1:8000"
    assert cfg.totp.digits == 6 and cfg.totp.period == 30 and cfg.totp.window == 1
    assert cfg.limits.max_failures == 5 and cfg.limits.lockout == 900
    assert cfg.server.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    assert cfg.session.secure is True
    # every dataclass default is what the example says
    assert cfg.store == config.StoreConfig()
    assert cfg.server == config.ServerConfig()
    assert cfg.routes == config.RoutesConfig(auth="")  # proxy mode: no /auth unless set
    assert cfg.session == config.SessionConfig()


def test_check_config_command(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", **ENV}
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(ROOT / "gateway.example.toml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: ")
    assert KEY not in ok.stdout and PEPPER not in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nport = "eighty"\nbogus = 1\n[upstream]\nurl = "http://[::1"\n[store]\nurl = "mysql://x"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 1
    assert "server.port: expected an integer, got str" in out.stderr
    assert "server.bogus: unknown key" in out.stderr
    assert "store.url: unknown store URL scheme mysql://" in out.stderr
    assert "upstream.url: " in out.stderr
    assert "Traceback" not in out.stderr


def test_minimal_config_has_safe_defaults() -> None:
    cfg = config.parse({}, env=ENV)
    # Issue 9.5: request heads are limited with no configuration at all.
    assert cfg.server.max_head_bytes <= 64 * 1024 and cfg.server.max_headers <= 100
    assert cfg.server.head_timeout <= 30 and cfg.server.keepalive_timeout <= 30
    # ...and so are request bodies: one that stops, or trickles, loses its connection.
    assert cfg.server.body_timeout <= 60
    assert cfg.server.min_body_rate > 0 and cfg.server.body_rate_grace <= 10
    # ...and a client that stops reading its response loses its connection too.
    assert cfg.server.send_timeout <= 60
    assert cfg.upstream.url is None  # forward-auth only until told otherwise
    assert cfg.identity.mode == "header"
    assert cfg.paths.exclude == ()  # nothing is open by default


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"server": {"port": True}}, "server.port: expected an integer, got a boolean"),
        ({"server": {"port": 70000}}, "server.port: 70000 is outside 0..65535"),
        ({"server": {"trusted_proxies": ["10.0.0.1/8"]}}, "server.trusted_proxies[0]:"),
        ({"server": {"trusted_proxies": ["not-an-ip"]}}, "server.trusted_proxies[0]:"),
        ({"upstream": {"url": "ftp://x"}}, "upstream.url:"),
        ({"upstream": {"url": "http://"}}, "upstream.url:"),
        ({"upstream": {"url": "http://x:99999"}}, "upstream.url:"),
        ({"upstream": {"user_header": "Bad Header"}}, "upstream.user_header:"),
        ({"store": {"url": "sqlite://relative.db"}}, "store.url:"),
        ({"store": {"cache_ttl": 5}}, "store.cache_ttl: 5.0 is outside 0..1"),
        ({"upstream": {"url": "http://[::1"}}, "upstream.url:"),
        ({"server": {"public_url": "https://[::1"}}, "server.public_url:"),
        # Attack (issue 12 review): a password in public_url went into every redirect and link.
        ({"server": {"public_url": "https://admin:hunter2@gw.example"}}, 'server.public_url: "https://admin:***@'),
        ({"server": {"public_url": "https://gw@gw.example"}}, 'server.public_url: "https://gw@gw.example" must not'),
        # A header key naming a framing or connection header would unframe what goes upstream.
        ({"upstream": {"user_header": "Content-Length"}}, 'upstream.user_header: "Content-Length" frames'),
        ({"upstream": {"user_header": "Transfer-Encoding"}}, "upstream.user_header:"),
        ({"upstream": {"user_header": "host"}}, "upstream.user_header:"),
        ({"identity": {"header": "Cookie"}}, "identity.header:"),
        ({"totp": {"header": "Connection"}}, "totp.header:"),
        # The third attack: "Remote_User" stripped, while the app read the client's "Remote-User".
        ({"upstream": {"user_header": "Remote_User"}}, 'upstream.user_header: "Remote_User" has'),
        ({"identity": {"header": "X.User"}}, "identity.header:"),
        ({"server": {"public_url": "https://evil.example\\app.example.com"}}, "server.public_url:"),
        ({"server": {"public_url": "https://app.example.com%40evil"}}, "server.public_url:"),
        ({"identity": {"login_url": "https://[::1/login?next={next}"}}, "identity.login_url:"),
        ({"store": {"url": "redis://[::1:6379/0"}}, "store.url:"),
        ({"store": {"url": "redis://h:99999/0"}}, "store.url:"),
        ({"store": {"url": "sqlite:///:memory:"}}, "store.url: needs a file path"),
        ({"store": {"url": "sqlite:///"}}, "store.url: needs a file path"),
        ({"store": {"prefix": "gw{1}"}}, "store.prefix:"),
        ({"store": {"prefix": ""}}, "store.prefix:"),
        ({"routes": {"verify": ""}}, "routes.verify:"),
        ({"identity": {"mode": "magic"}}, 'identity.mode: "magic" is not one of header, jwt'),
        ({"totp": {"digits": 10}}, "totp.digits:"),
        ({"totp": {"algorithm": "MD5"}}, "totp.algorithm:"),
        ({"totp": {"issuer": "a:b"}}, "totp.issuer:"),
        ({"paths": {"exclude": ["GET/api"]}}, "paths.exclude[0]:"),
        ({"paths": {"exclude": ["/ok", 3]}}, "paths.exclude[1]: expected a string"),
        ({"paths": {"exclude": [3, "GET/api"]}}, "paths.exclude[1]: "),
        ({"server": {"trusted_proxies": [1, "10.0.0.1/8"]}}, "server.trusted_proxies[1]: "),
        ({"routes": {"verify": "relative"}}, "routes.verify:"),
        ({"routes": {"verify": "/auth"}}, "routes: two routes share one path"),
        ({"limits": {"max_failures": 0}}, "limits.max_failures:"),
        ({"nonsense": {}}, "nonsense: unknown table or key"),
        ({"session": {"secure": "yes"}}, "session.secure: expected a boolean, got str"),
        ({"server": {"max_head_bytes": 10 * 1024 * 1024}}, "server.max_head_bytes: 10485760 is outside 1024..1048576"),
        ({"server": {"max_head_bytes": "64k"}}, "server.max_head_bytes: expected an integer, got str"),
        ({"server": {"max_headers": 5000}}, "server.max_headers: 5000 is outside 10..1000"),
        ({"server": {"head_timeout": 0}}, "server.head_timeout: 0.0 is outside 0.1..300"),
        ({"server": {"head_timeout": True}}, "server.head_timeout: expected an integer or a number, got a boolean"),
        ({"server": {"keepalive_timeout": 7200}}, "server.keepalive_timeout: 7200.0 is outside 0.1..3600"),
        ({"server": {"body_timeout": 0}}, "server.body_timeout: 0.0 is outside 0.1..3600"),
        ({"server": {"min_body_rate": -1}}, "server.min_body_rate: -1 is outside 0..1073741824"),
        ({"server": {"min_body_rate": 1.5}}, "server.min_body_rate: expected an integer, got float"),
        ({"server": {"body_rate_grace": 7200}}, "server.body_rate_grace: 7200.0 is outside 0..3600"),
        ({"server": {"send_timeout": 0}}, "server.send_timeout: 0.0 is outside 0.1..3600"),
    ],
)
def test_bad_values_are_named_by_key(data: dict[str, Any], expected: str) -> None:
    found = problems(data)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"server": {"port": "x", "host": 1}, "totp": {"digits": 3}})
    assert len(found) == 3


def test_keys_are_required_and_validated_without_echoing_them() -> None:
    assert any("no encryption key" in p for p in problems({}, env={config.ENV_PEPPER: PEPPER}))
    found = problems({}, env={config.ENV_KEYS: "not-a-key-at-all", config.ENV_PEPPER: PEPPER})
    assert any(p.startswith("encryption.keys: key 1") for p in found)
    assert not any("not-a-key-at-all" in p for p in found)
    assert any(p.startswith("encryption.recovery_pepper: missing") for p in problems({}, env={config.ENV_KEYS: KEY}))
    short = problems({}, env={config.ENV_KEYS: KEY, config.ENV_PEPPER: "short"})
    assert any("at least 32" in p for p in short)


def test_secrets_from_files_and_conflicts(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    new = Fernet.generate_key().decode()
    keys.write_text(f"# newest first\n{new}\n{KEY}\n")
    pepper = tmp_path / "pepper"
    pepper.write_text(PEPPER + "\n")
    cfg = config.parse({"encryption": {"keys_file": str(keys), "recovery_pepper_file": str(pepper)}}, env={})
    assert cfg.encryption.keys == (new, KEY)
    assert cfg.encryption.recovery_pepper == PEPPER.encode()
    assert KEY not in repr(cfg)
    both = problems({"encryption": {"keys_file": str(keys)}})
    assert any("given more than once" in p for p in both)
    missing = problems({"encryption": {"keys_file": str(tmp_path / "nope")}}, env={config.ENV_PEPPER: PEPPER})
    assert any(p.startswith("encryption.keys_file: cannot read") for p in missing)


def test_jwt_settings() -> None:
    env = {**ENV, config.ENV_JWT_SECRET: "s" * 40}
    cfg = config.parse(
        {"identity": {"mode": "jwt", "jwt": {"audience": "fastapi-users:auth", "cookie": "auth"}}}, env=env
    )
    assert cfg.identity.jwt is not None
    assert cfg.identity.jwt.audience == ("fastapi-users:auth",)
    mixed = problems({"identity": {"mode": "jwt", "jwt": {"algorithms": ["HS256", "RS256"]}}}, env=env)
    assert any("do not mix" in p for p in mixed)
    none = problems({"identity": {"mode": "jwt", "jwt": {"algorithms": ["none"]}}}, env=env)
    assert any("not a supported algorithm" in p for p in none)
    no_secret = problems({"identity": {"mode": "jwt"}})
    assert any(p.startswith("identity.jwt.secret:") for p in no_secret)
    stray = problems({"identity": {"jwt": {}}})
    assert any(p.startswith("identity.jwt: only used with") for p in stray)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"store": {"url": "redis://:hunter2@[::1:6379/0"}}, "store.url:"),
        ({"store": {"url": "redis://:hunter2@h:99999/0"}}, "store.url:"),
        ({"store": {"url": "redis://:hunter2/x@h:port/0"}}, "store.url:"),  # "/" unencoded
        ({"store": {"url": "unix://[::1/sock?password=hunter2"}}, "store.url:"),
        ({"upstream": {"url": "http://user:hunter2@[::1"}}, "upstream.url:"),
        ({"upstream": {"url": "ftp://user:hunter2@host"}}, "upstream.url:"),
    ],
)
def test_url_problems_never_show_the_password(data: dict[str, Any], key: str) -> None:
    found = problems(data)
    assert any(p.startswith(key) for p in found), found
    assert not any("hunter2" in p for p in found), found


def test_store_url_from_file_or_environment_and_redacted(tmp_path: Path) -> None:
    url = "redis://:hunter2@redis.example:6379/0"
    cfg = config.parse({}, env={**ENV, config.ENV_STORE_URL: url})
    assert cfg.store.url == url
    assert "store=redis://:***@redis.example:6379/0;" in cfg.summary()
    secret = tmp_path / "store_url"
    secret.write_text(url + "\n")
    assert config.parse({"store": {"url_file": str(secret)}}, env=ENV).store.url == url
    both = problems({"store": {"url": "sqlite:///a.db"}}, env={**ENV, config.ENV_STORE_URL: url})
    assert any(p.startswith("store.url: given more than once") for p in both)
    proxy = config.parse({"upstream": {"url": "http://user:hunter2@app:8000"}}, env=ENV)
    assert "proxy to http://user:***@app:8000;" in proxy.summary() and "hunter2" not in proxy.summary()


def test_jwt_public_key_is_parsed_at_load(tmp_path: Path) -> None:
    pem = tmp_path / "jwt.pem"
    private = ec.generate_private_key(ec.SECP256R1())
    pem.write_bytes(private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    jwt = {"algorithms": ["ES256"], "public_key_file": str(pem)}
    cfg = config.parse({"identity": {"mode": "jwt", "jwt": jwt}}, env=ENV)
    assert cfg.identity.jwt is not None and cfg.identity.jwt.public_key == pem.read_text().strip()
    wrong_type = problems({"identity": {"mode": "jwt", "jwt": {**jwt, "algorithms": ["RS256"]}}})
    assert "identity.jwt.public_key_file: RS256 needs an RSA public key" in wrong_type
    pem.write_bytes(private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    not_public = problems({"identity": {"mode": "jwt", "jwt": jwt}})
    assert any(p.startswith("identity.jwt.public_key_file: not a PEM public key") for p in not_public)
    pem.write_text("hello")
    garbage = problems({"identity": {"mode": "jwt", "jwt": jwt}})
    assert any(p.startswith("identity.jwt.public_key_file: not a PEM public key") for p in garbage)


def test_auth_route_only_by_default_in_forward_auth_mode() -> None:
    proxy = {"upstream": {"url": "http://127.0.0.1:8000"}}
    assert config.parse({}, env=ENV).routes.auth == "/auth"
    assert config.parse(proxy, env=ENV).routes.auth == ""
    assert config.parse({**proxy, "routes": {"auth": "/auth"}}, env=ENV).routes.auth == "/auth"
    off = config.parse({"routes": {"auth": "", "metrics": ""}}, env=ENV).routes
    assert off.auth == "" and off.metrics == ""


def test_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "missing.toml", env=ENV)
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(broken, env=ENV)


def test_pass_host_and_allowed_hosts() -> None:
    cfg = config.parse({}, env=ENV)
    assert cfg.upstream.pass_host is True and cfg.server.allowed_hosts == ()
    given = {"server": {"allowed_hosts": ["App.Example.com", "app:8080", "[::1]:443", "10.0.0.1"]}}
    cfg = config.parse({**given, "upstream": {"pass_host": False}}, env=ENV)
    assert cfg.upstream.pass_host is False
    assert cfg.server.allowed_hosts == ("app.example.com", "app:8080", "[::1]:443", "10.0.0.1")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"upstream": {"pass_host": "no"}}, "upstream.pass_host: expected a boolean, got str"),
        ({"server": {"allowed_hosts": "app"}}, "server.allowed_hosts: expected a list, got str"),
        ({"server": {"allowed_hosts": ["ok", 3]}}, "server.allowed_hosts[1]: expected a string"),
        ({"server": {"allowed_hosts": ["::1"]}}, 'server.allowed_hosts[0]: "::1" is not a host or host:port'),
        ({"server": {"allowed_hosts": ["a", "[::1"]}}, "server.allowed_hosts[1]:"),
        ({"server": {"allowed_hosts": ["[fe80::1%eth0]"]}}, "server.allowed_hosts[0]:"),
        ({"server": {"allowed_hosts": ["app:99999"]}}, "server.allowed_hosts[0]:"),
        ({"server": {"allowed_hosts": ["app:"]}}, "server.allowed_hosts[0]:"),
        ({"server": {"allowed_hosts": ["a b"]}}, "server.allowed_hosts[0]:"),
        ({"server": {"allowed_hosts": ["app/x"]}}, "server.allowed_hosts[0]:"),
        ({"server": {"allowed_hosts": ["user@app"]}}, "server.allowed_hosts[0]:"),
        ({"server": {"allowed_hosts": [""]}}, "server.allowed_hosts[0]:"),
    ],
)
def test_pass_host_and_allowed_hosts_are_validated(data: dict[str, Any], expected: str) -> None:
    found = problems(data)
    assert any(p.startswith(expected) for p in found), found


def test_unknown_key_suggests_the_closest_known_one() -> None:
    assert 'server.trusted_proxy: unknown key (did you mean "trusted_proxies"?)' in problems(
        {"server": {"trusted_proxy": ["10.0.0.0/8"]}}
    )
    assert 'servr: unknown table or key (did you mean "server"?)' in problems({"servr": {}})
    assert 'store.url_fil: unknown key (did you mean "url_file"?)' in problems({"store": {"url_fil": "x"}})
    assert "server.bogus: unknown key" in problems({"server": {"bogus": 1}})  # nothing close: no guess


SAFE = {"upstream": {"url": "http://127.0.0.1:8000"}, "server": {"public_url": "https://app.example.com"}}


def warned(data: dict[str, Any]) -> list[str]:
    return config_warnings.warnings(config.parse(data, env=ENV))


def test_a_safe_config_has_no_warnings() -> None:
    assert warned(SAFE) == []
    assert warned({"server": {"allowed_hosts": ["app.example.com"]}}) == []  # forward-auth, hosts named
    jwt = {"mode": "jwt", "jwt": {"secret": "s" * 40}}
    assert (
        warned(
            {**SAFE, "identity": jwt, "server": {**SAFE["server"], "trusted_proxies": ["0.0.0.0/0"], "host": "0.0.0.0"}}
        )
        == []
    )
    local_login = {"login_url": "/login?next={next}"}
    assert warned({**SAFE, "identity": local_login}) == []
    same_host = {"login_url": "https://app.example.com/login?next={next}"}
    assert warned({**SAFE, "identity": same_host}) == []
    assert warned({**SAFE, "paths": {"exclude": ["/static/*", "GET /_gateway/healthz"]}}) == []
    narrow = {"host": "0.0.0.0", "trusted_proxies": ["10.1.2.0/24", "fd00::/64"], "public_url": "https://a.example"}
    assert warned({**SAFE, "server": narrow}) == []


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"server": {**SAFE["server"], "trusted_proxies": ["0.0.0.0/0"]}}, 'server.trusted_proxies[0]: "0.0.0.0/0"'),
        ({"server": {**SAFE["server"], "trusted_proxies": ["127.0.0.1/32", "::/0"]}}, "server.trusted_proxies[1]:"),
        (
            {"server": {**SAFE["server"], "host": "0.0.0.0", "trusted_proxies": ["10.0.0.0/8"]}},
            'server.host: "0.0.0.0"',
        ),
        ({"server": {**SAFE["server"], "host": "::", "trusted_proxies": ["fd00::/48"]}}, 'server.host: "::"'),
        ({"server": {"public_url": "http://app.example.com"}}, "session.secure: true while server.public_url is http"),
        ({**SAFE, "session": {"secure": False}}, "session.secure: false while server.public_url is https"),
        ({**SAFE, "paths": {"exclude": ["/*"]}}, 'paths.exclude[0]: "/*" covers routes.setup ("/setup-2fa")'),
        ({**SAFE, "paths": {"exclude": ["/ok", "POST /verify-2fa"]}}, 'paths.exclude[1]: "POST /verify-2fa" covers'),
        ({**SAFE, "paths": {"exclude": ["/_gateway/*"]}}, "paths.exclude[0]:"),
        ({**SAFE, "identity": {"login_url": "https://evil.example/login?next={next}"}}, "identity.login_url: another"),
        ({"identity": {"login_url": "https://login.example/?next={next}"}}, "identity.login_url: an absolute URL"),
        ({"upstream": {"url": "http://127.0.0.1:8000"}}, "server.allowed_hosts: empty and server.public_url unset"),
        ({}, "server.allowed_hosts: empty and server.public_url unset: /auth accepts any forwarded host"),
    ],
)
def test_dangerous_settings_warn_naming_the_key(data: dict[str, Any], expected: str) -> None:
    found = warned(data)
    assert any(w.startswith(expected) for w in found), found


def test_absolute_login_url_may_carry_a_query() -> None:
    # "{next}" goes in the query of an absolute login URL as much as of a local one.
    url = "https://login.example.com/login?next={next}"
    assert config.parse({"identity": {"login_url": url}}, env=ENV).identity.login_url == url
    assert problems({"identity": {"login_url": "javascript:alert(1)?{next}"}}) == [
        'identity.login_url: must be a local path like "/login?next={next}" or an http(s) URL'
    ]


def test_example_file_is_written_from_the_declarations() -> None:
    # Each key is declared once (gateway/config_keys.py); the example is made from it.
    written = (ROOT / "gateway.example.toml").read_text(encoding="utf-8")
    assert written == config.example(), "run: python -m gateway.config --example > gateway.example.toml"


def test_example_shows_every_declared_key_with_its_default_and_no_other() -> None:
    text = config.example()
    data = tomllib.loads(text)
    assert set(data) == set(config.SECTIONS)
    tables = list(config_keys.TABLES)
    for name, cls in tables:
        keys = declared(cls)
        tables += [(f"{name}.{key_name}", k.table) for key_name, _, k in keys if k.table is not None]
        section = re.split(rf"^(?:# )?\[{re.escape(name)}\]\n", text, flags=re.M)[1]
        section = re.split(r"^(?:# )?\[", section, flags=re.M)[0]
        for key_name, _, k in keys:
            if k.table is not None:
                continue
            # set, or shown commented out (a sample, or a secret's *_file form)
            assert re.search(rf"^(# )?{key_name}(_file)? = ", section, re.M), f"{name}.{key_name} not shown"
            if k.doc:
                assert all(f"# {line}".rstrip() in section for line in k.doc.splitlines()), f"{name}.{key_name}"
        if "." not in name:
            assert set(data[name]) <= {key_name for key_name, _, _ in keys}, f"[{name}] has an undeclared key"
    # What the example sets is the declared default, except where a key declares a value to show.
    shown: dict[str, dict[str, Any]] = {}
    for name, cls in config_keys.TABLES:
        for key_name, _, k in declared(cls):
            if k.shown is not dataclasses.MISSING and not k.commented:
                shown.setdefault(name, {})[key_name] = k.shown
    assert shown == {"upstream": {"url": "http://127.0.0.1:8000"}, "paths": {"exclude": ("/healthz", "/static/*")}}
    as_written = config.parse(data, env=ENV)
    defaults = config.parse(
        {t: {k: list(v) if isinstance(v, tuple) else v for k, v in kv.items()} for t, kv in shown.items()}, env=ENV
    )
    assert dataclasses.replace(as_written, source="") == dataclasses.replace(defaults, source="")


def test_a_key_declared_with_a_range_is_read_with_it_and_shows_it() -> None:
    assert "port = 8080                 # 0..65535" in config.example()
    assert problems({"server": {"port": 65536}}) == ["server.port: 65536 is outside 0..65535"]
    assert 'log_level = "info"          # critical, error, warning, info, debug' in config.example()


def test_secrets_stay_out_of_repr_and_the_example() -> None:
    env = {**ENV, config.ENV_STORE_URL: "redis://:hunter2@h:6379/0", config.ENV_JWT_SECRET: "s" * 40}
    cfg = config.parse({"identity": {"mode": "jwt"}}, env=env)
    assert not any(s in repr(cfg) for s in (KEY, PEPPER, "hunter2", "s" * 40))
    assert "keys_file = " in config.example() and "\nkeys = " not in config.example()


def test_example_command_prints_the_example() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.config", "--example"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0 and out.stdout == config.example(), out.stderr


def test_totp_params_come_from_the_totp_table() -> None:
    data = {"totp": {"digits": 8, "period": 60, "algorithm": "SHA256", "window": 2}}
    params = config.parse(data, env=ENV).totp.params
    assert params == TotpParams(digits=8, period=60, algorithm="SHA256", window=2)
    assert config.parse({}, env=ENV).totp.params == TotpParams()
