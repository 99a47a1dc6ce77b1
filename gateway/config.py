"""The configuration: one TOML file, read once at start-up into frozen dataclasses, one per
table. Each key is declared once, in ``gateway/config_keys.py``, with its default, range and
documentation; ``gateway.example.toml`` is written from those declarations
(``python -m gateway.config --example``) and a test holds it to them.

Secrets never have to live in the file: each secret key ``X`` also has an ``X_file`` form,
and the encryption keys, the recovery-code pepper, the JWT secret and the store URL (which
may carry a Redis password) can come from the environment (``GATEWAY_ENCRYPTION_KEYS``,
``GATEWAY_RECOVERY_PEPPER``, ``GATEWAY_JWT_SECRET``, ``GATEWAY_STORE_URL``). The environment is
read here, once, and nowhere else. No message or summary ever shows a URL's password.

Every problem is collected and reported with the key it concerns
(``server.port: 70000 is outside 0..65535``); an unknown key is an error, never silently
ignored, so a typo cannot turn a protection off (``server.trusted_proxy: unknown key (did you
mean "trusted_proxies"?)``).
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.config_keys import (
    TABLES,
    Config,
    EncryptionConfig,
    IdentityConfig,
    JwtConfig,
    LimitsConfig,
    MetricsConfig,
    PathsConfig,
    RoutesConfig,
    ServerConfig,
    SessionConfig,
    StoreConfig,
    TotpConfig,
    UpstreamConfig,
)
from gateway.config_readers import (
    ENV_CONFIG,
    ENV_JWT_SECRET,
    ENV_KEYS,
    ENV_PEPPER,
    ENV_STORE_URL,
    HMAC_ALGORITHMS,
    KEY_ALGORITHMS,
    IPNetwork,
)
from gateway.errors import ConfigError
from gateway.tables import Table, declared, read_table, render_table, unknown

__all__ = [
    "ENV_CONFIG",
    "ENV_JWT_SECRET",
    "ENV_KEYS",
    "ENV_PEPPER",
    "ENV_STORE_URL",
    "SECTIONS",
    "Config",
    "EncryptionConfig",
    "IPNetwork",
    "IdentityConfig",
    "JwtConfig",
    "LimitsConfig",
    "MetricsConfig",
    "PathsConfig",
    "RoutesConfig",
    "ServerConfig",
    "SessionConfig",
    "StoreConfig",
    "TotpConfig",
    "UpstreamConfig",
    "default_path",
    "environment",
    "example",
    "load",
    "parse",
]

SECTIONS = tuple(name for name, _ in TABLES)


# -- checks across keys ---------------------------------------------------------------------------


def _jwt(data: Any, env: Mapping[str, str], problems: list[str]) -> JwtConfig:
    t = Table("identity.jwt", data, problems, env)
    cfg = read_table(JwtConfig, t)
    algorithms = set(cfg.algorithms)
    # Mixing HMAC and public-key algorithms lets a token signed with the public key as an
    # HMAC secret pass (the classic algorithm-confusion attack): refuse the mix.
    if algorithms & HMAC_ALGORITHMS and algorithms & KEY_ALGORITHMS:
        t.problem("algorithms", "do not mix HMAC (HS*) and public-key algorithms")
    elif algorithms & HMAC_ALGORITHMS and not cfg.secret:
        t.problem("secret", f"HS* algorithms need secret, secret_file or {ENV_JWT_SECRET}")
    elif algorithms & KEY_ALGORITHMS and not cfg.public_key:
        t.problem("public_key_file", "RS/ES/PS/EdDSA algorithms need public_key_file")
    elif cfg.public_key:
        problem = _public_key_problem(cfg.public_key, cfg.algorithms)
        if problem:
            t.problem("public_key_file" if t.data.get("public_key_file") else "public_key", problem)
    return cfg


# Which key type verifies which JWS algorithm (RFC 7518 §3.1, RFC 8037 §3.1).
_KEY_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    "RS": ("an RSA", (rsa.RSAPublicKey,)),
    "PS": ("an RSA", (rsa.RSAPublicKey,)),
    "ES": ("an EC", (ec.EllipticCurvePublicKey,)),
    "Ed": ("an Ed25519 or Ed448", (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)),
}


def _public_key_problem(pem: str, algorithms: tuple[str, ...]) -> str | None:
    """Why ``pem`` cannot verify tokens of ``algorithms``, or None: refused at load rather than
    failing every token at run time."""
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm):
        return 'not a PEM public key ("-----BEGIN PUBLIC KEY-----", not a private key or certificate)'
    for alg in algorithms:
        needed, kinds = _KEY_TYPES.get(alg[:2], ("", ()))
        if kinds and not isinstance(key, kinds):
            return f"{alg} needs {needed} public key"
    return None


def _identity(data: Any, env: Mapping[str, str], problems: list[str]) -> IdentityConfig:
    t = Table("identity", data, problems, env)
    jwt_data: dict[str, Any] | None = t.get("jwt", dict, None)
    cfg = read_table(IdentityConfig, t, jwt=None)
    if cfg.mode == "jwt":
        return replace(cfg, jwt=_jwt(jwt_data if jwt_data is not None else {}, env, problems))
    if jwt_data is not None:
        t.problem("jwt", 'only used with mode = "jwt"')
    return cfg


def _routes(data: Any, upstream_url: str | None, problems: list[str]) -> RoutesConfig:
    t = Table("routes", data, problems)
    # Proxy mode: every client arrives through the front proxy, a trusted peer, so a /auth served
    # by default would let any client ask the decision about an X-Original-URI of its choosing.
    cfg = read_table(RoutesConfig, t, defaults={"auth": ""} if upstream_url is not None else None)
    values = [v for v in (getattr(cfg, n) for n in cfg.__dataclass_fields__) if v]
    if len(set(values)) != len(values):
        problems.append("routes: two routes share one path")
    return cfg


# -- loading ----------------------------------------------------------------------------------------


def parse(data: Mapping[str, Any], env: Mapping[str, str] | None = None, source: str = "<string>") -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    for name in sorted(set(data) - set(SECTIONS)):
        problems.append(f"{name}: {unknown('table or key', name, SECTIONS)}")

    def table(name: str) -> Table:
        return Table(name, data.get(name, {}), problems, env)

    server = read_table(ServerConfig, table("server"))
    upstream = read_table(UpstreamConfig, table("upstream"))
    cfg = Config(
        server=server,
        upstream=upstream,
        store=read_table(StoreConfig, table("store")),
        encryption=read_table(EncryptionConfig, table("encryption")),
        identity=_identity(data.get("identity", {}), env, problems),
        totp=read_table(TotpConfig, table("totp")),
        session=read_table(SessionConfig, table("session")),
        limits=read_table(LimitsConfig, table("limits")),
        paths=read_table(PathsConfig, table("paths")),
        routes=_routes(data.get("routes", {}), upstream.url, problems),
        metrics=read_table(MetricsConfig, table("metrics")),
        source=source,
    )
    if problems:
        raise ConfigError(problems)
    return cfg


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML file; raise ConfigError (never another exception)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return parse(data, env, source=str(path))


def default_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get(ENV_CONFIG) or "gateway.toml"


# -- the example --------------------------------------------------------------------------------------


def environment() -> list[tuple[str, str, str]]:
    """``(variable, what it holds, the key it stands for)`` for each environment variable a key
    may come from, in file order: for ``--help`` texts and the example's head."""
    out: list[tuple[str, str, str]] = []
    for name, cls in TABLES:
        for key_name, _, k in declared(cls):
            if k.table is not None:
                out += [(e[0], e[1], f"{name}.{key_name}.{s}") for s, _, sub in declared(k.table) if (e := sub.env)]
            elif k.env is not None:
                out.append((k.env[0], k.env[1], f"{name}.{key_name}"))
    return out


_EXAMPLE_HEAD = """\
# gateway.example.toml — the documented reference: every key, its default, what it does.
# Written by `python -m gateway.config --example` from gateway/config_keys.py: change the
# declarations there, not this file. Copy it to gateway.toml and change what you need;
# `gateway check-config --config gateway.toml` validates it. Unknown keys are errors (a typo
# must never switch a protection off).
#
# Secrets do not belong in this file. Give them through the environment or *_file keys:
"""


def example() -> str:
    """The text of ``gateway.example.toml``, from the declarations."""
    lines = _EXAMPLE_HEAD.splitlines()
    lines += [f"#   {var:<25} {what:<44} (or {key}_file)" for var, what, key in environment()]
    lines.append("# `gateway keygen` prints a fresh key; it is fine as a pepper too.")
    for name, cls in TABLES:
        lines += ["", *render_table(name, cls)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--example"]:
        sys.exit("usage: python -m gateway.config --example   (prints gateway.example.toml)")
    sys.stdout.write(example())
