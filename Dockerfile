# The gateway as a container image: `docker build -t gateway .`
#
#   docker run -p 8080:8080 \
#     -v ./gateway.toml:/etc/gateway/gateway.toml:ro -v gateway-state:/var/lib/gateway \
#     -e GATEWAY_ENCRYPTION_KEYS=... -e GATEWAY_RECOVERY_PEPPER=... gateway
#
# The config is a mounted file (config/docker/gateway.toml is a starting point: it listens on
# 0.0.0.0:8080 and keeps the SQLite store in the /var/lib/gateway volume). Keys come from the
# environment or, better, from secret files named by encryption.keys_file and
# encryption.recovery_pepper_file (Docker/Kubernetes secrets under /run/secrets/).
# tests/integration/test_dockerfile.py lints this file with hadolint and runs its ENTRYPOINT,
# CMD and HEALTHCHECK command lines on the host.

# -- build: a virtualenv with the gateway and its dependencies (all wheels, no compiler) --------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m venv /opt/gateway \
    && /opt/gateway/bin/pip install --no-cache-dir . \
    && /opt/gateway/bin/pip uninstall --yes pip

# -- run: the same slim base, the virtualenv, a user without privileges ---------------------------
FROM python:3.11-slim

ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.toml \
    HEALTHCHECK_PORT=8080

RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --no-create-home \
       --shell /usr/sbin/nologin gateway \
    && mkdir -p /etc/gateway /var/lib/gateway \
    && chown gateway:gateway /var/lib/gateway \
    && chmod 0700 /var/lib/gateway

COPY --from=builder /opt/gateway /opt/gateway

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/gateway
VOLUME ["/var/lib/gateway"]
EXPOSE 8080

# Ready = listening and the store answers. The slim image has no curl: ask with Python.
# HEALTHCHECK_PORT must match server.port in the mounted config.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import http.client, os; c = http.client.HTTPConnection('127.0.0.1', int(os.environ['HEALTHCHECK_PORT']), timeout=4); c.request('GET', '/_gateway/ready'); raise SystemExit(c.getresponse().status != 200)"]

ENTRYPOINT ["gateway"]
CMD ["run"]
