"""gateway.tables: typed getters that name every problem under its full key, key declarations,
and the URL helpers that must never print a password.

``test_config.py`` reads whole files; here each getter and helper is seen on its own.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.tables import (
    Table,
    declared,
    each,
    header_name,
    host_port,
    http_url,
    key,
    read_table,
    redact_url,
    render_table,
    route_path,
    split_url,
    toml_value,
    unknown,
)


def table(data: object, name: str = "server") -> tuple[Table, list[str]]:
    problems: list[str] = []
    return Table(name, data, problems), problems


def test_a_table_that_is_not_a_table() -> None:
    t, problems = table(["not", "a", "table"])
    assert problems == ["server: must be a table"] and t.data == {}


def test_get_checks_the_type_and_names_the_key() -> None:
    t, problems = table({"port": "8080", "host": "::1", "ratio": 2, "debug": True})
    assert t.get("port", int, 1) == 1
    assert t.get("host", str, "x") == "::1"
    ratio = t.get("ratio", (int, float), 0.5)  # TOML's 2 for a number key is 2.0
    assert ratio == 2.0 and isinstance(ratio, float)
    assert t.get("debug", int, 0) == 0  # bool is an int in Python; `true` is no port
    assert t.get("absent", str, "default") == "default"
    assert problems == ["server.port: expected an integer, got str", "server.debug: expected an integer, got a boolean"]


def test_number_choice_and_strings() -> None:
    t, problems = table({"port": 70000, "ttl": 0.5, "mode": "jwt2", "list": ["a", 3, "b"]})
    assert t.number("port", 8080, 1, 65535) == 8080
    assert t.number("ttl", 1.0, 0, 1) == 0.5
    assert t.choice("mode", "header", ("header", "jwt")) == "header"
    assert t.strings("list", ()) == ("a", "b")
    assert problems == [
        "server.port: 70000 is outside 1..65535",
        'server.mode: "jwt2" is not one of header, jwt',
        "server.list[1]: expected a string, got int",
    ]


def test_a_secret_is_given_once(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    t, problems = table({"password_file": str(key_file)})
    assert t.secret("password", {}, "GATEWAY_PW") == "from-file"
    t, problems = table({"password": "inline"})
    assert t.secret("password", {"GATEWAY_PW": "from-env"}, "GATEWAY_PW") is None
    assert problems == ["server.password: given more than once (password, GATEWAY_PW); choose one"]
    assert "inline" not in problems[0] and "from-env" not in problems[0]  # the names, never the values
    t, problems = table({"password_file": str(tmp_path / "absent")})
    assert t.secret("password", {}, None) is None
    assert problems and problems[0].startswith("server.password_file: cannot read")


def test_finish_names_every_unknown_key_with_the_closest_known_one() -> None:
    t, problems = table({"trusted_proxy": [], "port": 1, "zzz": 1})
    t.get("port", int, 0)
    t.get("trusted_proxies", list, [])
    t.finish()
    assert problems == [
        'server.trusted_proxy: unknown key (did you mean "trusted_proxies"?)',
        "server.zzz: unknown key",
    ]
    assert unknown("table", "sesion", ["session", "store"]) == 'unknown table (did you mean "session"?)'


@dataclass(frozen=True)
class Example:
    """An example table."""

    port: int = key(8080, "where it listens", low=1, high=65535)
    mode: str = key("header", choices=("header", "jwt"))
    names: tuple[str, ...] = key(("a",), doc="Some names.")
    login: str | None = key(None, shown="https://sso.example/login")
    upper: tuple[str, ...] = key((), read=each(str.upper))


def test_read_table_reads_by_the_declarations() -> None:
    assert [name for name, _, _ in declared(Example)] == ["port", "mode", "names", "login", "upper"]
    t, problems = table({"port": 0, "mode": "jwt", "upper": ["x", 1, "y"], "extra": 1}, "example")
    read = read_table(Example, t)
    assert read == Example(port=8080, mode="jwt", names=("a",), login=None, upper=("X", "Y"))
    assert problems == [
        "example.port: 0 is outside 1..65535",
        "example.upper[1]: expected a string, got int",
        "example.extra: unknown key",
    ]


def test_render_table_is_valid_toml_that_reads_back_as_the_defaults() -> None:
    text = "\n".join(render_table("example", Example))
    assert text.startswith("[example]\n# An example table.")
    assert "(1..65535)" in text and "header, jwt" in text and "# Some names." in text
    assert '# login = "https://sso.example/login"' in text  # an optional key: a commented sample
    data = tomllib.loads(text)["example"]
    t, problems = table(data, "example")
    assert read_table(Example, t) == Example() and problems == []


def test_toml_value() -> None:
    assert [toml_value(v) for v in (True, 3, 0.5, ("a", 1), 'q"\\')] == ["true", "3", "0.5", '["a", 1]', '"q\\"\\\\"']


def test_header_name_and_route_path() -> None:
    t, problems = table({"header": "X Bad", "verify": "/verify/", "metrics": "", "setup": "/setup-2fa"})
    assert header_name(t, "header", "X-2FA-Code") == "X-2FA-Code"  # RFC 9110 §5.1: a token
    assert route_path(t, "verify", "/verify-2fa") == "/verify-2fa"
    assert route_path(t, "metrics", "/metrics", switchable=True) == ""
    assert route_path(t, "setup", "/x") == "/setup-2fa"
    assert [p.partition(":")[0] for p in problems] == ["server.header", "server.verify"]


def test_host_port() -> None:
    assert host_port("Example.COM:8443") == "example.com:8443"
    assert host_port("[2001:DB8::1]:80") == "[2001:db8::1]:80"
    for bad in ("2001:db8::1", "host:99999", "a b", "host:"):
        with pytest.raises(ValueError):
            host_port(bad)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pa55@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("redis://user:p/a#s?s@host/0", "redis://user:***@host/0"),  # a generated password's "/#?"
        ("redis://user:p@ss@host/0", "redis://user:***@host/0"),  # ...or "@": the last "@" ends it
        ("unix:///run/redis.sock?password=pa55&db=0", "unix:///run/redis.sock?password=***&db=0"),
        ("sqlite:///var/lib/gateway.db", "sqlite:///var/lib/gateway.db"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_url_urllib_refuses_is_a_problem_without_its_password() -> None:
    t, problems = table({})
    assert split_url(t, "url", "redis://:s3cret@[::1:6379") is None
    assert split_url(t, "url", "redis://:s3cret@host:99999") is None
    assert len(problems) == 2 and not any("s3cret" in p for p in problems)


def test_http_url() -> None:
    t, problems = table({})
    assert http_url(t, "public_url", "https://gw.example/") == "https://gw.example"
    assert http_url(t, "public_url", None) is None
    assert http_url(t, "public_url", "ftp://gw.example") is None
    assert http_url(t, "public_url", "https://gw.example/?q=1") is None
    assert problems == [
        'server.public_url: "ftp://gw.example" is not an http:// or https:// URL with a host',
        "server.public_url: must not have a query or fragment",
    ]
