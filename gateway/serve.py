"""Serving a checked config: logging, the store's first ping and key check, the app, uvicorn.

The entry point that serves the app, and so the only module (with tests and bench) that imports
``gateway.app``: ``gateway run`` and ``gateway demo`` both come through :func:`serve`, so both
listen with the same limited protocol (``gateway.server``) and the same uvicorn settings.
"""

from __future__ import annotations

import asyncio
import os
import sys

from prometheus_client import CollectorRegistry

from gateway import config as config_module
from gateway.app import create_app
from gateway.config import Config
from gateway.crypto import SecretBox
from gateway.errors import DecryptError, StoreError
from gateway.logs import configure_logging
from gateway.metrics import Metrics, multiprocess_registry
from gateway.metrics_export import multiprocess_dir, start_listener
from gateway.server import LimitedConfig
from gateway.server_limits import client_limits
from gateway.shutdown import DrainingServer, Workers
from gateway.store import open_store_from_url
from gateway.tables import redact_url

# What uvicorn imports in each worker process when server.workers > 1.
APP_FACTORY = "gateway.serve:app_factory"


def configure_logging_for(config: Config) -> None:
    """Logging as ``server.log_level`` says, with the config's secret-bearing header and cookies
    redacted from every line."""
    jwt_cookie = config.identity.jwt.cookie if config.identity.jwt else None
    configure_logging(
        config.server.log_level,
        headers=(config.totp.header,),
        cookies=tuple(c for c in (config.session.cookie, jwt_cookie) if c),
        log_format=config.server.log_format,
    )


def app_factory() -> object:
    """For uvicorn workers > 1: each worker process loads the config the parent checked (and,
    being a fresh process, sets up its own logging)."""
    config = config_module.load(config_module.default_path())
    configure_logging_for(config)
    return create_app(config)


def uvicorn_config(config: Config, app: object) -> LimitedConfig:
    """The one uvicorn configuration of ``gateway run`` and ``gateway demo`` (tests use it too)."""
    server = config.server
    return LimitedConfig(
        app,
        limits=client_limits(server),
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        access_log=server.access_log,
        timeout_keep_alive=server.keepalive_timeout,
        # SIGTERM: readiness 503 for shutdown_delay s, then the listener closes and requests in
        # flight get shutdown_grace s (gateway/shutdown.py).
        shutdown_delay=server.shutdown_delay,
        timeout_graceful_shutdown=server.shutdown_grace,
        # The gateway reads X-Forwarded-For itself, from trusted proxies only; uvicorn's
        # own rewriting of the client address would let it be spoofed.
        proxy_headers=False,
        server_header=False,
        lifespan="on",
        log_config=None,
        workers=server.workers,
        factory=isinstance(app, str),
    )


# How many stored secrets the start-up check tries to decrypt: enough that a store written
# under other keys shows, few enough to cost nothing on a store of millions.
KEY_CHECK_SAMPLE = 20


async def _check_store(config: Config) -> str | None:
    """Ping the store, then decrypt a few stored secrets; a message when none of them opens
    with the configured keys (None: fine, or nothing stored yet).

    A gateway started without the key that encrypted the store would deny every enrolled user;
    better to refuse to start, naming the setting. A store where only some do not open (a mix:
    records bound to another user, or a key dropped too early) starts, and those users are
    denied one by one with a log line each (user_secrets), their records left intact."""
    store = open_store_from_url(
        config.store.url,
        config.store.prefix,
        config.store.max_connections,
        config.store.replicas_ack,
        # The one place a store may be made on start-up, before any worker opens it (workers
        # then find it): only where the operator allowed it (store.create); else `store init`.
        create=config.store.create == "if_missing",
    )
    await store.open()
    try:
        await store.ping()
        sample = await store.sample_secrets(KEY_CHECK_SAMPLE)
    finally:
        await store.close()
    box = SecretBox(config.encryption.keys)
    opened = 0
    for user, token in sample:
        try:
            box.decrypt(user, token)
        except DecryptError:
            continue
        opened += 1
    if sample and not opened:
        return (
            f"none of {len(sample)} stored secrets decrypts with the keys in {config_module.ENV_KEYS} "
            f"(encryption.keys): the key that encrypted them is missing; configure it again "
            f"(after the new one, then run 'gateway keys rotate')"
        )
    return None


def serve_uvicorn(config: LimitedConfig) -> bool:
    """What ``uvicorn.run`` does with a ready Config: one server, or ``config.workers``
    processes sharing one socket, each stopping as ``gateway.shutdown`` says. True once a
    single server has started and stopped."""
    if config.workers > 1:
        Workers(config, sockets=[config.bind_socket()]).run()
        return True
    server = DrainingServer(config=config)
    server.run()
    return server.started


def serve(config: Config, config_path: str | None = None) -> int:
    """Serve until stopped; the exit status. A store that does not answer now is one clear
    line, not a traceback on the first request."""
    configure_logging_for(config)
    try:
        refused = asyncio.run(_check_store(config))
    except StoreError as exc:
        # StoreError's text names a store that is missing or not initialised, and what to do.
        print(
            f"gateway: the store at {redact_url(config.store.url)} is unreachable, not initialised or unsafe: {exc}",
            file=sys.stderr,
        )
        return 1
    if refused is not None:
        print(f"gateway: {refused}", file=sys.stderr)
        return 1
    if config.server.workers > 1:
        if config_path:
            # The one way to hand the checked config's path to the worker processes uvicorn
            # spawns: they import APP_FACTORY, which reads it back through config.default_path.
            os.environ[config_module.ENV_CONFIG] = os.path.abspath(config_path)
        # Each worker writes its metrics under a fresh directory; any scrape adds them up.
        with multiprocess_dir() as samples:
            if not _listen_for_metrics(config, multiprocess_registry(samples)):
                return 1
            started = serve_uvicorn(uvicorn_config(config, APP_FACTORY))
    else:
        metrics = Metrics()
        if not _listen_for_metrics(config, metrics.scrape_registry()):
            return 1
        started = serve_uvicorn(uvicorn_config(config, create_app(config, metrics=metrics)))
    return 0 if started else 1


def _listen_for_metrics(config: Config, registry: CollectorRegistry) -> bool:
    """The ``[metrics] listen`` server, when set; False (and one line) when it cannot listen."""
    if config.metrics.listen is None:
        return True
    try:
        start_listener(config.metrics.listen, registry)
    except OSError as exc:
        print(f"gateway: metrics.listen {config.metrics.listen}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True
