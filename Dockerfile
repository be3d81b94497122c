# syntax=docker/dockerfile:1
#
# The exocom broker, and the example todo application in /app/examples.
#
#   docker build -t exocom .
#   docker run -p 4100:4100 -v exocom-state:/var/lib/exocom exocom
#
# Routing configuration, in this order: `--config FILE` (mount it, e.g.
#   -v ./routes.yml:/etc/exocom/routes.yml:ro ... exocom serve --config /etc/exocom/routes.yml),
# else the SERVICE_DATA environment variable (JSON, as for the Go broker),
# else the embedded default (config/todo-app.yml). See docs/OPERATING.md.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exocom/ exocom/
COPY config/ config/
# The exocom wheel and the wheels of everything it needs, so that the runtime
# stage installs offline and carries no build tools.
# With the cluster extra (coredis): the same image runs one broker or a cluster (config/cluster-compose.yml).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[cluster]"

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE}
# No EXOCOM_PORT here: it would win over PORT, which the Go broker's users
# set (`docker run -e PORT=...`). The default port is 4100 either way.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EXOCOM_STATE_DIR=/var/lib/exocom
RUN groupadd --system --gid 10001 exocom \
    && useradd --system --uid 10001 --gid exocom --home-dir /var/lib/exocom --no-create-home \
               --shell /usr/sbin/nologin exocom \
    && mkdir -p /var/lib/exocom /etc/exocom \
    && chown exocom:exocom /var/lib/exocom
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "exocom[cluster]"
WORKDIR /app
# The example services (docker compose: config/docker-compose.yml) and the
# routing files, e.g. `--config /app/config/todo-app.yml`.
COPY examples/ /app/examples/
COPY config/ /app/config/
USER exocom
VOLUME ["/var/lib/exocom"]
EXPOSE 4100
STOPSIGNAL SIGTERM
# No curl in the slim image: exocom.cli.probe (urllib). It finds the port as
# `exocom serve` does (EXOCOM_PORT, else PORT, else 4100), speaks https:// when
# EXOCOM_TLS_CERT is set (TLS on; EXOCOM_TLS_CA, EXOCOM_TLS_CLIENT_CERT/KEY for
# verification and client certificates) and ignores any HTTP proxy of the
# environment. (Containers of this image that run an example service instead
# of the broker turn it off: config/docker-compose.yml.)
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-m", "exocom.cli.probe", "/healthz"]
ENTRYPOINT ["exocom"]
CMD ["serve"]
