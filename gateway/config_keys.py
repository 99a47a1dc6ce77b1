"""Every configuration key, declared once: its type and default (the dataclass field), its range
or choices, how it is read and checked, and its documentation. ``gateway/config.py`` reads a
TOML file by these declarations, and writes ``gateway.example.toml`` from them
(``python -m gateway.config --example``); a test holds the file to them.

One frozen dataclass per TOML table; a class's docstring is the table's comment in the example,
so it speaks to the operator. Checks that involve two keys (JWT algorithms against the key
given, unique routes) are in ``config.py``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.config_readers import (
    ENV_JWT_SECRET,
    ENV_KEYS,
    ENV_PEPPER,
    ENV_STORE_URL,
    IPNetwork,
    algorithms,
    audience,
    cookie_name,
    encryption_keys,
    issuer,
    key_prefix,
    listen,
    login_url,
    network,
    pepper,
    public_url,
    store_url,
    switchable_route,
    url,
)
from gateway.paths import ExcludeRule, parse_rule
from gateway.tables import (
    each,
    header_name,
    host_port,
    key,
    redact_url,
    route_path,
    secret_value,
)
from gateway.totp import TotpParams

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# -- the tables ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the gateway listens, whom it believes, and what a client may send it."""

    host: str = key("127.0.0.1", "address to listen on")
    port: int = key(8080, low=0, high=65535)
    trusted_proxies: tuple[IPNetwork, ...] = key(
        (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        doc="TCP peers whose Remote-User, X-Forwarded-* and X-Original-* headers are believed.\n"
        "Everyone else's are ignored (proxy mode) or refused (/auth). Keep it as narrow as you can.",
        read=each(network),
    )
    public_url: str | None = key(
        None,
        doc='The public origin users see, e.g. "https://app.example.com". Used to rewrite upstream\n'
        "Location headers and build redirects. Unset: taken from the request's Host header.",
        read=public_url,
        shown="https://app.example.com",
    )
    allowed_hosts: tuple[str, ...] = key(
        (),
        doc='The Host values (host or host:port, any case; an IPv6 address in brackets, "[::1]:8080") the\n'
        "gateway answers for; a request naming another host is refused (421). public_url's host is\n"
        "always allowed. Empty, with no public_url: any Host passes (and, in proxy mode, reaches the app).",
        read=each(host_port),
    )
    workers: int = key(1, "uvicorn worker processes", low=1, high=64)
    shutdown_delay: float = key(
        0.0,
        low=0.0,
        high=300.0,
        doc="On SIGTERM (gateway/shutdown.py): readiness (routes.ready) answers 503 at once, and for\n"
        "shutdown_delay seconds requests are still served, so a load balancer's health checks take the\n"
        "node out before its listener closes; then new connections are refused, open WebSockets are\n"
        "closed with 1001, and requests in flight (a long download too) get shutdown_grace seconds to\n"
        "finish before they are cut. Behind a load balancer, set shutdown_delay above its health-check\n"
        "interval times its unhealthy threshold (e.g. 5 s x 2: 11); 0 without one.",
    )
    shutdown_grace: float = key(30.0, low=0.0, high=3600.0)
    log_level: str = key("info", choices=("critical", "error", "warning", "info", "debug"))
    access_log: bool = key(False)
    log_format: str = key(
        "text",
        choices=("text", "json"),
        doc="text: one readable line per record; json: one object per line (timestamp, level, logger,\n"
        "message, request_id, and each audit event's fields). Secrets are redacted in both.",
    )
    # Limits on what a client may send before any rule runs (gateway/server.py).
    max_head_bytes: int = key(
        64 * 1024,
        "request line plus headers",
        low=1024,
        high=1024 * 1024,
        doc="Limits on a request head, enforced before any rule runs (a client's first bytes cost memory\n"
        "and a connection slot). Over max_head_bytes or max_headers fields: 431 and the connection\n"
        "closes. A head not complete within head_timeout seconds of the connection (or of the\n"
        "previous request) closes the connection (slowloris). An idle keep-alive connection closes\n"
        "after keepalive_timeout seconds.",
    )
    max_headers: int = key(100, low=10, high=1000)
    head_timeout: float = key(30.0, low=0.1, high=300.0)
    body_timeout: float = key(
        30.0,
        low=0.1,
        high=3600.0,
        doc="Limits on a request body (proxied, denied, or read by the gateway's own pages): a proxied\n"
        "body holds one of upstream.max_connections while it arrives. The connection closes, with 408\n"
        "if no response has started, when no body byte arrived for body_timeout seconds, or when,\n"
        "body_rate_grace seconds after the body began, it has averaged fewer than min_body_rate\n"
        "bytes a second (0: no minimum). Time in which the gateway itself is not reading (its buffer\n"
        "is full, or Expect: 100-continue is not yet answered) does not count. 1024 B/s cuts a\n"
        "trickle yet is below any real uplink (a 56k modem sends ~5 KB/s); holding all 256 upstream\n"
        "connections then costs an attacker 256 KiB/s, so for large unauthenticated uploads put a\n"
        "buffering front proxy (nginx proxy_request_buffering on) in front, or keep such paths out of\n"
        "paths.exclude. Keep upstream.pool_timeout above body_rate_grace: a request waiting for the\n"
        "pool gets the next connection a cut body frees.",
    )
    min_body_rate: int = key(1024, low=0, high=1024 * 1024 * 1024)
    body_rate_grace: float = key(5.0, low=0.0, high=3600.0)
    send_timeout: float = key(
        60.0,
        low=0.1,
        high=3600.0,
        doc="A client that stops reading its response holds the upstream connection serving it (the\n"
        "gateway stops reading the upstream while its buffer to the client is full). When the client\n"
        "has read nothing for send_timeout seconds while the gateway has something to write, the\n"
        "connection is dropped and the upstream request aborted (nginx's send_timeout).",
    )
    keepalive_timeout: float = key(5.0, "seconds an idle keep-alive connection stays open", low=0.1, high=3600.0)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """The application to protect. url unset: forward-auth only (nginx/Caddy/Traefik proxy, the
    gateway only answers /auth and serves its own pages)."""

    url: str | None = key(None, read=url, shown="http://127.0.0.1:8000", commented=False)
    connect_timeout: float = key(5.0, "seconds; exceeded -> 504", low=0.001, high=3600)
    read_timeout: float = key(60.0, "seconds between bytes from the upstream; exceeded -> 504", low=0.001, high=86400)
    write_timeout: float = key(60.0, low=0.001, high=86400)
    pool_timeout: float = key(5.0, "waiting for a free upstream connection; exceeded -> 503", low=0.001, high=3600)
    max_connections: int = key(
        256, "upstream requests at once (aiohttp under httpx); one more waits pool_timeout", low=1, high=100_000
    )
    user_header: str = key(
        "Remote-User", "the verified user, sent upstream (a client's own is always stripped)", read=header_name
    )
    pass_host: bool = key(
        True,
        doc="Send the client's Host header to the upstream (what an app building its own URLs expects);\n"
        "false: send the host[:port] of url above instead.",
    )


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where the gateway keeps its state: TOTP secrets (encrypted), 2FA sessions, lockouts."""

    url: str = key(
        "sqlite:///gateway.db",
        env=(ENV_STORE_URL, "store.url, when it carries a Redis password"),
        file_sample="/run/secrets/gateway_store_url",
        read=store_url,
        doc="sqlite:///relative/path.db or sqlite:////absolute/path.db (embedded; several workers on one\n"
        "host may share the file; never :memory:), or redis://[:password@]host:6379/0, rediss:// (TLS),\n"
        "unix:///path, redis+sentinel://[:password@]host:26379,host:26379/service_name[/db] (the\n"
        "password is the master's and the sentinels'), redis+cluster://[:password@]host:6379,host:6379,\n"
        "rediss+sentinel://, rediss+cluster:// (TLS).\n"
        f"A URL with a password belongs in {ENV_STORE_URL} or url_file, not here.\n"
        f"Give only one of url, url_file and {ENV_STORE_URL}. Messages show the password as ***.",
    )
    prefix: str = key("gw", "Redis key prefix: letters, digits and _.:-", read=key_prefix)
    create: str = key(
        "never",
        choices=("never", "if_missing"),
        doc='Whether `gateway run` may create the store. "never": a store must exist, made by\n'
        "`gateway store init`, or the gateway does not start (a store that lost its data, deleted,\n"
        "emptied, a Redis restarted without it, must not look like a new one: every user would be\n"
        'unenrolled, free to enrol with the first factor alone). "if_missing": a start makes it\n'
        "where there is nothing (no file; a Redis without the store's identity key): for tests and\n"
        "demos only, as a restart after the data was lost would then start on an empty store.\n"
        "Either way a running gateway refuses (503) a file or Redis without the identity it opened.",
    )
    cache_ttl: float = key(
        1.0,
        low=0.0,
        high=1.0,
        doc="How long (seconds) a worker may answer from its in-process caches of 2FA sessions and\n"
        "lockouts. A revoked session, a reset or unlocked user takes effect on every worker within\n"
        "this bound. 0 disables the caches.",
    )
    max_connections: int = key(
        64,
        low=1,
        high=10_000,
        doc="Redis connections per worker, at most. A request that finds none free waits up to 2 s for\n"
        "one, then is denied (503). Raise it with the number of requests in flight.",
    )
    replicas_ack: int = key(
        0,
        low=0,
        high=16,
        doc="Redis with replicas (one server or Sentinel): after a write a failover must not lose (a\n"
        "used code's time step, a revoked session, a reset or re-enrolled user), WAIT up to 100 ms\n"
        "for this many replicas to acknowledge it. 0: no WAIT. Too few in time is logged, not a\n"
        "denial: the write is on the master. Not for Redis Cluster, nor SQLite.",
    )


@dataclass(frozen=True, slots=True)
class EncryptionConfig:
    """Fernet keys, newest first: the first encrypts, all decrypt. Rotate: put a new key first,
    run `gateway keys rotate`, then drop the old key."""

    keys: tuple[str, ...] = key(
        (),
        "one key per line",
        env=(ENV_KEYS, "comma-separated Fernet keys, newest first"),
        file_sample="/run/secrets/gateway_keys",
        read=encryption_keys,
    )
    recovery_pepper: bytes = key(
        b"",
        "at least 32 characters",
        env=(ENV_PEPPER, "≥ 32 random characters"),
        file_sample="/run/secrets/gateway_pepper",
        read=pepper,
    )


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """Only with mode = "jwt"."""

    secret: str | None = key(
        None,
        "HS*",
        env=(ENV_JWT_SECRET, "the HS256 secret in jwt mode"),
        file_sample="/run/secrets/jwt_secret",
        read=secret_value(ENV_JWT_SECRET),
    )
    public_key: str | None = key(
        None, "RS*/ES*/PS*/EdDSA: a PEM public key", file_sample="/etc/gateway/jwt.pem", read=secret_value(None)
    )
    algorithms: tuple[str, ...] = key(
        ("HS256",), 'never mix HS* with RS*/ES*; "none" is never accepted', read=algorithms
    )
    audience: tuple[str, ...] = key(
        (), "required in the token when set", read=audience, shown=("fastapi-users:auth",), commented=True
    )
    issuer: str | None = key(None, shown="https://login.example.com")
    cookie: str | None = key(None, "also read the token from this cookie", shown="auth")
    user_claim: str = key("sub")
    label_claim: str | None = key(
        None, "the account name shown in authenticator apps (default: the user id)", shown="email"
    )
    leeway: float = key(0.0, "seconds of clock skew allowed on exp/nbf", low=0.0, high=300.0)


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """Who the user is (the first factor) comes from in front of the gateway:
    "header": the `header` below, believed only from server.trusted_proxies
    "jwt":    a JWT in `Authorization: Bearer` or a cookie, see [identity.jwt]"""

    mode: str = key("header", choices=("header", "jwt"))
    header: str = key("Remote-User", read=header_name)
    jwt: JwtConfig | None = key(None, table=JwtConfig)  # noqa: RUF009 - key() makes a field
    login_url: str | None = key(
        None,
        doc="Where a browser with no (or an expired) first factor is sent, e.g. your app's login page.\n"
        '"{next}" is replaced by the percent-encoded local path to return to. Unset: a 401 page.',
        read=login_url,
        shown="/login?next={next}",
    )


@dataclass(frozen=True, slots=True)
class TotpConfig:
    """The one-time codes (RFC 6238) that authenticator apps make."""

    issuer: str = key("Gateway", "shown in authenticator apps; no colon", read=issuer)
    digits: int = key(6, "apps support 6", low=6, high=8)
    period: int = key(30, "seconds per step", low=15, high=120)
    algorithm: str = key("SHA1", "SHA1 is what apps support", choices=("SHA1", "SHA256", "SHA512"))
    window: int = key(1, "steps of clock drift accepted either side", low=0, high=2)
    header: str = key("X-2FA-Code", "the request header carrying a code", read=header_name)
    pending_ttl: int = key(600, "seconds an unfinished enrolment stays valid", low=60, high=86400)

    @property
    def params(self) -> TotpParams:
        """How codes are made and checked, built from this table in this one place."""
        return TotpParams(digits=self.digits, period=self.period, algorithm=self.algorithm, window=self.window)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """A valid code opens a 2FA session: an opaque id in this cookie, stored server-side (revocable)."""

    cookie: str = key("gateway_session", read=cookie_name)
    ttl: int = key(43200, "seconds; 12 h", low=60, high=30 * 86400)
    secure: bool = key(True, "the Secure cookie flag; false only for plain-http development")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Guessing codes: lockouts per user and per client address."""

    max_failures: int = key(5, "consecutive bad codes per user before a lockout", low=1, high=1000)
    lockout: int = key(900, "seconds locked; even a correct code is refused meanwhile", low=1, high=7 * 86400)
    ip_max_failures: int = key(50, "bad codes per client address before it is locked", low=1, high=1_000_000)
    ip_lockout: int = key(900, low=1, high=7 * 86400)


@dataclass(frozen=True, slots=True)
class PathsConfig:
    """Paths that need no second factor (and no identity). Matched on the canonical path
    (decoded once, dot segments resolved, slashes merged); case-sensitive; exact unless the rule
    ends in "/*", which matches "/x/" and everything below, but not "/x" or "/x-y".
    "METHOD /path" limits a rule to one method (GET also covers HEAD): "GET /api/public/*"."""

    exclude: tuple[ExcludeRule, ...] = key((), read=each(parse_rule), shown=("/healthz", "/static/*"))


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    """The gateway's own routes. They shadow the same paths of the upstream."""

    setup: str = key("/setup-2fa", read=route_path)
    verify: str = key("/verify-2fa", read=route_path)
    recovery: str = key("/recovery-codes", read=route_path)
    logout: str = key("/logout-2fa", read=route_path)
    auth: str = key(
        "/auth",  # "" in proxy mode unless set: see config._routes
        doc='The forward-auth decision endpoint. Default: "/auth" when [upstream] url is unset\n'
        "(forward-auth mode); not served in proxy mode, where every client comes through the trusted\n"
        "front proxy and could ask it about a path of its choosing. Set it to serve it anyway;\n"
        '"" switches it off in any mode.',
        read=switchable_route,
        commented=True,
    )
    health: str = key("/_gateway/health", "liveness", read=route_path)
    ready: str = key("/_gateway/ready", "readiness: 503 while stopping or the store is down", read=route_path)
    metrics: str = key(
        "/_gateway/metrics",
        doc="Prometheus metrics. Answered only to a server.trusted_proxies peer asking directly: a request\n"
        "carrying X-Forwarded-For, Forwarded, X-Real-IP, X-Original-URI or X-Forwarded-Uri was relayed\n"
        'from a client by a proxy and is refused. "" switches it off.',
        read=switchable_route,
    )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics on a listener of their own, for when the main port is public."""

    listen: str | None = key(
        None,
        doc='host:port of a separate metrics listener, e.g. "127.0.0.1:9100" (any path answers). It\n'
        "answers everyone who reaches it, unlike routes.metrics: keep it on loopback or a private network.",
        read=listen,
        shown="127.0.0.1:9100",
    )


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
    metrics: MetricsConfig = MetricsConfig()
    source: str = "<defaults>"

    def summary(self) -> str:
        """One line for ``gateway check-config`` and the start-up log: no secrets."""
        mode = f"proxy to {redact_url(self.upstream.url)}" if self.upstream.url else "forward-auth only"
        return (
            f"{self.source}: {mode}; identity={self.identity.mode}; store={redact_url(self.store.url)}; "
            f"{len(self.encryption.keys)} encryption key(s); {len(self.paths.exclude)} excluded path rule(s); "
            f"listening on {self.server.host}:{self.server.port}"
        )


# The tables in file order, as [name] in TOML.
TABLES: tuple[tuple[str, type[DataclassInstance]], ...] = (
    ("server", ServerConfig),
    ("upstream", UpstreamConfig),
    ("store", StoreConfig),
    ("encryption", EncryptionConfig),
    ("identity", IdentityConfig),
    ("totp", TotpConfig),
    ("session", SessionConfig),
    ("limits", LimitsConfig),
    ("paths", PathsConfig),
    ("routes", RoutesConfig),
    ("metrics", MetricsConfig),
)
