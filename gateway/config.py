"""The configuration: one TOML file (``gateway.example.toml`` documents every key), read once
at start-up into frozen dataclasses, one per table.

Secrets never have to live in the file: each secret key ``X`` also has an ``X_file`` form,
and the encryption keys, the recovery-code pepper, the JWT secret and the store URL (which
may carry a Redis password) can come from the environment (``GATEWAY_ENCRYPTION_KEYS``,
``GATEWAY_RECOVERY_PEPPER``, ``GATEWAY_JWT_SECRET``, ``GATEWAY_STORE_URL``). The environment is
read here, once, and nowhere else. No message or summary ever shows a URL's password.

Every problem is collected and reported with the key it concerns
(``server.port: 70000 is outside 0..65535``); an unknown key is an error, never silently
ignored, so a typo cannot turn a protection off.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.errors import ConfigError
from gateway.http import is_token
from gateway.paths import ExcludeRule, parse_rule
from gateway.store import is_key_prefix, parse_store_url
from gateway.tables import Table, header_name, host_port, http_url, redact_url, route_path, split_url, unknown
from gateway.totp import TotpParams

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ENV_KEYS = "GATEWAY_ENCRYPTION_KEYS"
ENV_PEPPER = "GATEWAY_RECOVERY_PEPPER"
ENV_JWT_SECRET = "GATEWAY_JWT_SECRET"  # noqa: S105 - a variable name, not a secret
ENV_STORE_URL = "GATEWAY_STORE_URL"
ENV_CONFIG = "GATEWAY_CONFIG"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    trusted_proxies: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    public_url: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    workers: int = 1
    log_level: str = "info"
    access_log: bool = False
    # Limits on what a client may send before any rule runs (gateway/server.py).
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    head_timeout: float = 30.0
    body_timeout: float = 30.0
    min_body_rate: int = 1024
    body_rate_grace: float = 5.0
    send_timeout: float = 60.0
    keepalive_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    write_timeout: float = 60.0
    pool_timeout: float = 5.0
    max_connections: int = 256
    user_header: str = "Remote-User"
    pass_host: bool = True


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "sqlite:///gateway.db"
    prefix: str = "gw"
    cache_ttl: float = 1.0
    max_connections: int = 64


@dataclass(frozen=True, slots=True)
class EncryptionConfig:
    keys: tuple[str, ...] = field(default=(), repr=False)
    recovery_pepper: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class JwtConfig:
    secret: str | None = field(default=None, repr=False)
    public_key: str | None = field(default=None, repr=False)
    algorithms: tuple[str, ...] = ("HS256",)
    audience: tuple[str, ...] = ()
    issuer: str | None = None
    cookie: str | None = None
    user_claim: str = "sub"
    label_claim: str | None = None
    leeway: float = 0.0


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    mode: str = "header"
    header: str = "Remote-User"
    jwt: JwtConfig | None = None
    login_url: str | None = None


@dataclass(frozen=True, slots=True)
class TotpConfig:
    issuer: str = "Gateway"
    digits: int = 6
    period: int = 30
    algorithm: str = "SHA1"
    window: int = 1
    header: str = "X-2FA-Code"
    pending_ttl: int = 600

    @property
    def params(self) -> TotpParams:
        """How codes are made and checked, built from this table in this one place."""
        return TotpParams(digits=self.digits, period=self.period, algorithm=self.algorithm, window=self.window)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    cookie: str = "gateway_session"
    ttl: int = 43200
    secure: bool = True


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_failures: int = 5
    lockout: int = 900
    ip_max_failures: int = 50
    ip_lockout: int = 900


@dataclass(frozen=True, slots=True)
class PathsConfig:
    exclude: tuple[ExcludeRule, ...] = ()


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    setup: str = "/setup-2fa"
    verify: str = "/verify-2fa"
    recovery: str = "/recovery-codes"
    logout: str = "/logout-2fa"
    auth: str = "/auth"  # "" in proxy mode unless set: see _routes
    health: str = "/_gateway/health"
    ready: str = "/_gateway/ready"
    metrics: str = "/_gateway/metrics"


@dataclass(frozen=True, slots=True)
class Config:
    encryption: EncryptionConfig
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    store: StoreConfig = StoreConfig()
    identity: IdentityConfig = IdentityConfig()
    totp: TotpConfig = TotpConfig()
    session: SessionConfig = SessionConfig()
    limits: LimitsConfig = LimitsConfig()
    paths: PathsConfig = PathsConfig()
    routes: RoutesConfig = RoutesConfig()
    source: str = "<defaults>"

    def summary(self) -> str:
        """One line for ``gateway check-config`` and the start-up log: no secrets."""
        mode = f"proxy to {redact_url(self.upstream.url)}" if self.upstream.url else "forward-auth only"
        return (
            f"{self.source}: {mode}; identity={self.identity.mode}; store={redact_url(self.store.url)}; "
            f"{len(self.encryption.keys)} encryption key(s); {len(self.paths.exclude)} excluded path rule(s); "
            f"listening on {self.server.host}:{self.server.port}"
        )


# -- reading ---------------------------------------------------------------------------------


def _server(data: Any, problems: list[str]) -> ServerConfig:
    t = Table("server", data, problems)
    d = ServerConfig()
    networks: list[IPNetwork] = []
    for i, text in enumerate(t.strings("trusted_proxies", tuple(str(n) for n in d.trusted_proxies))):
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            problems.append(f"server.trusted_proxies[{i}]: {exc}")
    public_url = http_url(t, "public_url", t.opt_str("public_url"))
    cfg = ServerConfig(
        host=t.get("host", str, d.host),
        port=t.number("port", d.port, 0, 65535),
        trusted_proxies=tuple(networks),
        public_url=public_url,
        allowed_hosts=tuple(
            h for i, v in enumerate(t.strings("allowed_hosts", ())) if (h := host_port(t, "allowed_hosts", i, v))
        ),
        workers=t.number("workers", d.workers, 1, 64),
        log_level=t.choice("log_level", d.log_level, ("critical", "error", "warning", "info", "debug")),
        access_log=t.get("access_log", bool, d.access_log),
        max_head_bytes=t.number("max_head_bytes", d.max_head_bytes, 1024, 1024 * 1024),
        max_headers=t.number("max_headers", d.max_headers, 10, 1000),
        head_timeout=t.number("head_timeout", d.head_timeout, 0.1, 300.0),
        body_timeout=t.number("body_timeout", d.body_timeout, 0.1, 3600.0),
        min_body_rate=t.number("min_body_rate", d.min_body_rate, 0, 1024 * 1024 * 1024),
        body_rate_grace=t.number("body_rate_grace", d.body_rate_grace, 0.0, 3600.0),
        send_timeout=t.number("send_timeout", d.send_timeout, 0.1, 3600.0),
        keepalive_timeout=t.number("keepalive_timeout", d.keepalive_timeout, 0.1, 3600.0),
    )
    t.finish()
    return cfg


def _upstream(data: Any, problems: list[str]) -> UpstreamConfig:
    t = Table("upstream", data, problems)
    d = UpstreamConfig()
    cfg = UpstreamConfig(
        url=http_url(t, "url", t.opt_str("url")),
        connect_timeout=t.number("connect_timeout", d.connect_timeout, 0.001, 3600),
        read_timeout=t.number("read_timeout", d.read_timeout, 0.001, 86400),
        write_timeout=t.number("write_timeout", d.write_timeout, 0.001, 86400),
        pool_timeout=t.number("pool_timeout", d.pool_timeout, 0.001, 3600),
        max_connections=t.number("max_connections", d.max_connections, 1, 100_000),
        user_header=header_name(t, "user_header", d.user_header),
        pass_host=t.get("pass_host", bool, d.pass_host),
    )
    t.finish()
    return cfg


def _store(data: Any, env: Mapping[str, str], problems: list[str]) -> StoreConfig:
    t = Table("store", data, problems)
    d = StoreConfig()
    url = t.secret("url", env, ENV_STORE_URL) or d.url
    if split_url(t, "url", url) is not None:
        try:
            parse_store_url(url)
        except ValueError as exc:
            t.problem("url", str(exc))
    prefix = t.get("prefix", str, d.prefix)
    # The rule RedisStore applies, checked here too so a bad prefix fails at load.
    if not is_key_prefix(prefix):
        t.problem("prefix", f'"{prefix}" may only use letters, digits and _.:- (and not be empty)')
    cfg = StoreConfig(
        url=url,
        prefix=prefix,
        cache_ttl=t.number("cache_ttl", d.cache_ttl, 0.0, 1.0),
        max_connections=t.number("max_connections", d.max_connections, 1, 10_000),
    )
    t.finish()
    return cfg


def _split_keys(text: str) -> list[str]:
    out: list[str] = []
    for line in text.replace(",", "\n").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _encryption(data: Any, env: Mapping[str, str], problems: list[str]) -> EncryptionConfig:
    from gateway.crypto import SecretBox

    t = Table("encryption", data, problems)
    inline = t.strings("keys", ())
    path = t.opt_str("keys_file")
    from_env = env.get(ENV_KEYS, "")
    given = [n for n, v in (("encryption.keys", inline), ("encryption.keys_file", path), (ENV_KEYS, from_env)) if v]
    keys: list[str] = []
    if len(given) > 1:
        t.problem("keys", f"given more than once ({', '.join(given)}); choose one")
    elif path:
        try:
            keys = _split_keys(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            t.problem("keys_file", f"cannot read {path}: {exc.strerror or exc}")
    elif inline:
        keys = list(inline)
    elif from_env:
        keys = _split_keys(from_env)
    if not keys and len(given) <= 1:
        t.problem("keys", f"no encryption key: set {ENV_KEYS} or encryption.keys_file (`gateway keygen` makes one)")
    elif keys:
        try:
            SecretBox(keys)
        except ValueError as exc:
            t.problem("keys", str(exc))
    pepper = t.secret("recovery_pepper", env, ENV_PEPPER)
    if pepper is not None and len(pepper) < 32:
        t.problem("recovery_pepper", "must be at least 32 characters (`gateway keygen` makes one)")
        pepper = None
    if pepper is None and not any(p.startswith("encryption.recovery_pepper") for p in problems):
        t.problem(
            "recovery_pepper",
            f"missing: set {ENV_PEPPER} or encryption.recovery_pepper_file (`gateway keygen` makes one)",
        )
    t.finish()
    return EncryptionConfig(keys=tuple(keys), recovery_pepper=(pepper or "").encode())


def _jwt(data: Any, env: Mapping[str, str], problems: list[str]) -> JwtConfig:
    t = Table("identity.jwt", data, problems)
    d = JwtConfig()
    secret = t.secret("secret", env, ENV_JWT_SECRET)
    public_key = t.secret("public_key", env, None)
    algorithms = t.strings("algorithms", d.algorithms)
    hmac_algs = {"HS256", "HS384", "HS512"}
    key_algs = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"}
    for i, alg in enumerate(algorithms):
        if alg not in hmac_algs | key_algs:
            problems.append(f'identity.jwt.algorithms[{i}]: "{alg}" is not a supported algorithm ("none" never is)')
    if not algorithms:
        t.problem("algorithms", "must name at least one algorithm")
    # Mixing HMAC and public-key algorithms lets a token signed with the public key as an
    # HMAC secret pass (the classic algorithm-confusion attack): refuse the mix.
    if set(algorithms) & hmac_algs and set(algorithms) & key_algs:
        t.problem("algorithms", "do not mix HMAC (HS*) and public-key algorithms")
    elif set(algorithms) & hmac_algs and not secret:
        t.problem("secret", f"HS* algorithms need secret, secret_file or {ENV_JWT_SECRET}")
    elif set(algorithms) & key_algs and not public_key:
        t.problem("public_key_file", "RS/ES/PS/EdDSA algorithms need public_key_file")
    elif public_key:
        problem = _public_key_problem(public_key, algorithms)
        if problem:
            t.problem("public_key_file" if t.data.get("public_key_file") else "public_key", problem)
    audience: list[str] | str = t.get("audience", (str, list), [])
    if isinstance(audience, str):
        audience = [audience]
    cfg = JwtConfig(
        secret=secret,
        public_key=public_key,
        algorithms=algorithms,
        audience=tuple(str(a) for a in audience),
        issuer=t.opt_str("issuer"),
        cookie=t.opt_str("cookie"),
        user_claim=t.get("user_claim", str, d.user_claim),
        label_claim=t.opt_str("label_claim"),
        leeway=t.number("leeway", d.leeway, 0.0, 300.0),
    )
    t.finish()
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
    t = Table("identity", data, problems)
    d = IdentityConfig()
    mode = t.choice("mode", d.mode, ("header", "jwt"))
    header = header_name(t, "header", d.header)
    jwt_data: dict[str, Any] | None = t.get("jwt", dict, None)
    jwt = None
    if mode == "jwt":
        jwt = _jwt(jwt_data if jwt_data is not None else {}, env, problems)
    elif jwt_data is not None:
        t.problem("jwt", 'only used with mode = "jwt"')
    login_url = t.opt_str("login_url")
    if login_url is not None and not _login_url_ok(t, login_url):
        t.problem("login_url", 'must be a local path like "/login?next={next}" or an http(s) URL')
        login_url = None
    t.finish()
    return IdentityConfig(mode=mode, header=header, jwt=jwt, login_url=login_url)


def _login_url_ok(t: Table, url: str) -> bool:
    """A local path (not "//host", which a browser reads as another host), or an absolute http(s)
    URL with a host; either may carry a query, where "{next}" usually goes."""
    if url.startswith("/"):
        return not url.startswith(("//", "/\\"))
    parts = split_url(t, "login_url", url.replace("{next}", ""))
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)


def _totp(data: Any, problems: list[str]) -> TotpConfig:
    t = Table("totp", data, problems)
    d = TotpConfig()
    issuer = t.get("issuer", str, d.issuer)
    if not issuer or ":" in issuer:
        t.problem("issuer", "must be non-empty and contain no colon (Key-Uri-Format)")
    cfg = TotpConfig(
        issuer=issuer,
        digits=t.number("digits", d.digits, 6, 8),
        period=t.number("period", d.period, 15, 120),
        algorithm=t.choice("algorithm", d.algorithm, ("SHA1", "SHA256", "SHA512")),
        window=t.number("window", d.window, 0, 2),
        header=header_name(t, "header", d.header),
        pending_ttl=t.number("pending_ttl", d.pending_ttl, 60, 86400),
    )
    t.finish()
    return cfg


def _session(data: Any, problems: list[str]) -> SessionConfig:
    t = Table("session", data, problems)
    d = SessionConfig()
    cookie = t.get("cookie", str, d.cookie)
    if not is_token(cookie):
        t.problem("cookie", f'"{cookie}" is not a valid cookie name')
    cfg = SessionConfig(
        cookie=cookie,
        ttl=t.number("ttl", d.ttl, 60, 30 * 86400),
        secure=t.get("secure", bool, d.secure),
    )
    t.finish()
    return cfg


def _limits(data: Any, problems: list[str]) -> LimitsConfig:
    t = Table("limits", data, problems)
    d = LimitsConfig()
    cfg = LimitsConfig(
        max_failures=t.number("max_failures", d.max_failures, 1, 1000),
        lockout=t.number("lockout", d.lockout, 1, 7 * 86400),
        ip_max_failures=t.number("ip_max_failures", d.ip_max_failures, 1, 1_000_000),
        ip_lockout=t.number("ip_lockout", d.ip_lockout, 1, 7 * 86400),
    )
    t.finish()
    return cfg


def _paths(data: Any, problems: list[str]) -> PathsConfig:
    t = Table("paths", data, problems)
    rules: list[ExcludeRule] = []
    for i, text in enumerate(t.strings("exclude", ())):
        try:
            rules.append(parse_rule(text))
        except ValueError as exc:
            problems.append(f"paths.exclude[{i}]: {exc}")
    t.finish()
    return PathsConfig(exclude=tuple(rules))


# Routes a deployment may switch off with "": the others are needed by the pages themselves.
_SWITCHABLE = frozenset({"auth", "metrics"})


def _routes(data: Any, upstream_url: str | None, problems: list[str]) -> RoutesConfig:
    t = Table("routes", data, problems)
    d = RoutesConfig()
    # Proxy mode: every client arrives through the front proxy, a trusted peer, so a /auth served
    # by default would let any client ask the decision about an X-Original-URI of its choosing.
    defaults = {name: getattr(d, name) for name in d.__dataclass_fields__}
    if upstream_url is not None:
        defaults["auth"] = ""
    cfg = RoutesConfig(**{name: route_path(t, name, value, name in _SWITCHABLE) for name, value in defaults.items()})
    values = [v for v in (getattr(cfg, n) for n in cfg.__dataclass_fields__) if v]
    if len(set(values)) != len(values):
        problems.append("routes: two routes share one path")
    t.finish()
    return cfg


SECTIONS = ("server", "upstream", "store", "encryption", "identity", "totp", "session", "limits", "paths", "routes")


def parse(data: Mapping[str, Any], env: Mapping[str, str] | None = None, source: str = "<string>") -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    for key in sorted(set(data) - set(SECTIONS)):
        problems.append(f"{key}: {unknown('table or key', key, SECTIONS)}")
    server = _server(data.get("server", {}), problems)
    upstream = _upstream(data.get("upstream", {}), problems)
    cfg = Config(
        server=server,
        upstream=upstream,
        store=_store(data.get("store", {}), env, problems),
        encryption=_encryption(data.get("encryption", {}), env, problems),
        identity=_identity(data.get("identity", {}), env, problems),
        totp=_totp(data.get("totp", {}), problems),
        session=_session(data.get("session", {}), problems),
        limits=_limits(data.get("limits", {}), problems),
        paths=_paths(data.get("paths", {}), problems),
        routes=_routes(data.get("routes", {}), upstream.url, problems),
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
