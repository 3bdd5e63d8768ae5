# syntax=docker/dockerfile:1
#
# Images of dagster-taskiq-controller (see docs/operations.md and manifests/).
#
#   docker build -t dagster-taskiq-controller .                   # the controller (default target)
#   docker build --target step -t my-dagster-step .               # an image for ECS-launched steps
#
# The controller image holds the Rust binary, Python 3.11 with Dagster and this repo's Python
# package (the controller runs `python -m dagster_taskiq_controller.bridge` to talk to Dagster).
#
# Build args:
#   RUST_VERSION            tag of the rust:<v>-slim-bookworm builder (default: latest 1.x).
#   USER_CODE_DIR           a directory of the build context with your Dagster code, copied to
#                           /opt/dagster/code. If it holds a requirements.txt, it is installed;
#                           if it holds a pyproject.toml or setup.py, the project is installed.
#                           Needed when steps run as processes next to the controller
#                           (--launcher process, the default) and for the `step` target; leave
#                           the default (an empty placeholder) for a controller that only
#                           launches ECS tasks.
#   USER_CODE_REQUIREMENTS  extra pip requirement specifiers, space-separated, e.g.
#                           "dagster-aws==0.29.* pandas>=2" (default: none).
#   APP_UID                 id of the unprivileged user the processes run as (default 10001).
#
# Example with your code:
#   docker build --build-arg USER_CODE_DIR=examples/my_code \
#                --build-arg USER_CODE_REQUIREMENTS="dagster-postgres==0.29.* sqlalchemy<2.1" \
#                -t my-controller .
# (PostgreSQL needs the SQLAlchemy pin: docs/operations.md, "PostgreSQL".)

ARG RUST_VERSION=1
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# Rust builder: dependencies in their own layer, rebuilt only when Cargo.toml/Cargo.lock change.
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
# aws-lc-sys (TLS of the AWS SDK) compiles C code.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake g++ make pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
# A dummy crate with the same manifest: builds and caches every dependency.
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# COPY keeps the context's mtimes, which can be older than the dummy build: touch so cargo
# rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && cp target/release/dagster-taskiq-controller /usr/local/bin/dagster-taskiq-controller

# ---------------------------------------------------------------------------------------------
# Python environment: a virtualenv in /opt/venv, copied whole into the runtime stages.
FROM ${PYTHON_IMAGE} AS python-env
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY python/pyproject.toml /src/python/pyproject.toml
COPY python/dagster_taskiq_controller /src/python/dagster_taskiq_controller
RUN pip install /src/python
ARG USER_CODE_DIR=deploy/user-code-placeholder
ARG USER_CODE_REQUIREMENTS=
COPY ${USER_CODE_DIR} /opt/dagster/code
RUN set -eu; \
    if [ -f /opt/dagster/code/requirements.txt ]; then \
        pip install -r /opt/dagster/code/requirements.txt; \
    fi; \
    if [ -f /opt/dagster/code/pyproject.toml ] || [ -f /opt/dagster/code/setup.py ]; then \
        pip install /opt/dagster/code; \
    fi; \
    if [ -n "${USER_CODE_REQUIREMENTS}" ]; then \
        pip install ${USER_CODE_REQUIREMENTS}; \
    fi; \
    python -c "import dagster, dagster_taskiq_controller.bridge; print('dagster', dagster.__version__)"

# ---------------------------------------------------------------------------------------------
# Step image (`--target step`): what an ECS-launched step runs in. The controller overrides the
# command with `python -m dagster_taskiq_controller.ecs_entrypoint` (docs/ecs.md), so the
# entrypoint is only tini.
FROM ${PYTHON_IMAGE} AS step
ARG APP_UID=10001
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /opt/dagster \
    && groupadd --system --gid ${APP_UID} dagster \
    && useradd --system --uid ${APP_UID} --gid dagster --home-dir /opt/dagster/home \
        --create-home --shell /usr/sbin/nologin dagster
COPY --from=python-env /opt/venv /opt/venv
COPY --from=python-env /opt/dagster/code /opt/dagster/code
# DAGSTER_HOME: the controller's Dagster instance, the one every bridge call and every step
# uses whatever a message names (docs/protocol.md, section 2): mount or bake the deployment's
# dagster.yaml there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DAGSTER_HOME=/opt/dagster/home
WORKDIR /opt/dagster/code
USER ${APP_UID}
ENTRYPOINT ["tini", "--"]

# ---------------------------------------------------------------------------------------------
# The controller (default target).
FROM step AS controller
COPY --from=builder /usr/local/bin/dagster-taskiq-controller /usr/local/bin/dagster-taskiq-controller
# The dashboard binds 127.0.0.1 by default; in a container it must listen on all interfaces so
# probes and Prometheus reach it. The read API shows step stderr tails (tracebacks can carry
# secrets), so the default command below requires a read token; probes and /metrics stay open.
# The mutating endpoints (cancel, DLQ redrive) answer 403 unless DAGSTER_TASKIQ_ADMIN_TOKEN is
# set and then need it as a bearer token. Keep the port off the public internet all the same.
ENV DAGSTER_TASKIQ_DASHBOARD_ADDR=0.0.0.0:8080 \
    DAGSTER_TASKIQ_PYTHON=/opt/venv/bin/python \
    DAGSTER_TASKIQ_LOG_FORMAT=json
EXPOSE 8080
# Liveness: /healthz answers 503 when the intake loop or the lease keeper is stuck; urlopen
# raises on any non-2xx, so the check fails. (/readyz is for load balancers and is 503 while
# draining, which must not get the container killed.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
# tini is PID 1: it forwards SIGTERM to the controller (which drains: docs/operations.md) and
# reaps orphans. The controller puts each step in its own process group and kills them itself.
ENTRYPOINT ["tini", "--", "dagster-taskiq-controller"]
# The read token comes from a mounted secret (`docker run -v <file>:/run/secrets/...:ro`, a
# Kubernetes Secret volume, a Compose secret); without the file the controller refuses to start.
# A command that replaces this one must bring its own --read-token[-file] (CloudFormation passes
# DAGSTER_TASKIQ_READ_TOKEN from Secrets Manager), or the controller warns that the read API is
# open.
CMD ["run", "--read-token-file", "/run/secrets/dagster-taskiq-read-token"]
