"""Where the metrics are read from when the gateway runs more than one process, and the
separate listener (``[metrics] listen``) for deployments whose main port is public.

Workers: prometheus-client's multiprocess mode. :func:`prepare_multiprocess_dir` makes a fresh,
empty directory and names it in ``PROMETHEUS_MULTIPROC_DIR`` before the workers are spawned (the
library reads it when a worker first imports it); each worker then writes its samples to its own
files there, and a scrape of any worker, or of the listener in the supervising process, adds
them up (``metrics.WorkersCollector``). The directory is removed when the gateway stops.

The listener is prometheus-client's own HTTP server, on a thread of the serving process. It
answers anyone who can reach it, without the trusted-peer rule of ``routes.metrics``: bind it to
loopback or a private network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from gateway.http import split_host
from gateway.metrics import MULTIPROC_ENV


@contextmanager
def multiprocess_dir() -> Iterator[str]:
    """A fresh directory for the workers' samples, named in the environment the workers inherit,
    for as long as the block runs; then removed (with the previous value of the variable back)."""
    path = tempfile.mkdtemp(prefix="gateway-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def start_listener(listen: str, registry: CollectorRegistry) -> WSGIServer:
    """Serve ``registry`` at ``http://{listen}/metrics`` (any path, as prometheus-client does) on
    a daemon thread until the process ends or the server is shut down. Raises OSError when the
    address cannot be bound."""
    host, port = split_host(listen) or ("", None)
    if port is None:  # config_keys checked it at load
        raise ValueError(f"{listen!r} is not host:port")
    server, _ = start_http_server(port, addr=host.strip("[]"), registry=registry)
    return server
