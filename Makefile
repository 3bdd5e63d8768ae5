# Quick start: `make demo` runs a real Dagster job through the controller on a local moto
# server; `make test` sets everything up and runs every test. Both work on a fresh machine
# with the Rust toolchain and Python 3.11.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The demo, bench and chaos run the release build; `make test` runs the debug build that
# `cargo test` already made, so the AWS SDKs are not compiled a third time.
BIN := target/release/dagster-taskiq-controller
DEBUG_BIN := target/debug/dagster-taskiq-controller
# Every Python test, the demo, bench and chaos take the controller from this variable.
BINARY_ENV := DAGSTER_TASKIQ_CONTROLLER_BINARY
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
# pytest-xdist workers of `make test-python` (see the Development section of README.md): 4 on
# 2 cores, as the outage tests hold a worker for minutes while they mostly wait.
PYTEST_WORKERS ?= 4
RUFF_PATHS := bench examples

.PHONY: setup versions build build-debug browser a11y postgresql demo test test-rust test-python test-deploy lint lint-rust lint-python fmt bench bench-e2e chaos fuzz clean

setup: $(STAMP)

# The product package with its test extra, and the test beds (python/testing) beside it. uv
# (pinned in the test extra) resolves and installs them: pip takes minutes for the same set.
# Bytecode is compiled at install (as pip does): where PYTHONDONTWRITEBYTECODE is set, as on
# the CI machines, Python would otherwise compile Dagster from source in every process.
UV_INSTALL = $(VENV)/bin/uv pip install --quiet --compile-bytecode
UV_VERSION := $(shell sed -n 's/^ *"uv\(.*\)",$$/uv\1/p' python/pyproject.toml)
$(STAMP): python/pyproject.toml python/testing/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check '$(UV_VERSION)'
	$(UV_INSTALL) --python $(PY) -e 'python[test]' -e python/testing
	touch $(STAMP)

# One virtualenv per older Dagster minor (a pin in python/versions/) for
# python/tests/test_versions.py: the package editable with its postgres extra (the resolver must
# pair a dagster-postgres with the pin) and pytest, the test beds without their dependencies.
# uv (from the test extra) builds one in seconds from its cache; pip takes a minute. A venv is
# rebuilt when its pin or the package's dependencies change.
VERSION_PINS := $(wildcard python/versions/*.txt)
VERSION_VENVS := $(patsubst python/versions/%.txt,.venv-versions/%/.installed,$(VERSION_PINS))
versions: $(VERSION_VENVS)

.venv-versions/%/.installed: python/versions/%.txt python/pyproject.toml python/testing/pyproject.toml $(STAMP)
	rm -rf .venv-versions/$*
	$(VENV)/bin/uv venv --quiet --python $(PY) .venv-versions/$*
	$(UV_INSTALL) --python .venv-versions/$*/bin/python -r $< -e 'python[postgres]' pytest
	$(UV_INSTALL) --python .venv-versions/$*/bin/python --no-deps -e python/testing
	touch $@

build:
	cargo build --release --locked

# The debug build of every target (the binary the Python suite runs, the tests, the benches)
# with clippy's lints on our crate, -D warnings: clippy-driver compiles as rustc does and lints
# on the way (what `cargo clippy` runs in check mode), so `make test` compiles the dependencies
# once instead of once to check and once to build. test-rust builds with the same wrapper, so
# nothing is compiled again.
CLIPPY_DRIVER = $(or $(shell rustup which clippy-driver 2>/dev/null),$(shell command -v clippy-driver),$(error clippy-driver not found: rustup component add clippy))
LINTED_BUILD = RUSTC_WORKSPACE_WRAPPER=$(CLIPPY_DRIVER) CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
build-debug:
	cargo fmt --check
	$(LINTED_BUILD) cargo test --locked --no-run --all-targets

# Headless Chromium for the dashboard's browser test (Debian package; needs root and apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null; }; }
	@chromium --version

# The dashboard's accessibility check: axe-core run in the system Chromium by playwright-core
# (npm registry; no browser download), in .venv-a11y (beside .venv, which make test creates at
# the same time). Node.js and npm come from Debian where they are missing.
A11Y_DIR := .venv-a11y
A11Y_STAMP := $(A11Y_DIR)/.installed-4.14.1-1.65.2
a11y: $(A11Y_STAMP)
$(A11Y_STAMP):
	@command -v npm >/dev/null 2>&1 || { \
		apt-get install -y --no-install-recommends nodejs npm >/dev/null 2>&1 || \
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends nodejs npm >/dev/null; }; }
	npm install --no-audit --no-fund --silent --prefix $(A11Y_DIR) axe-core@4.14.1 playwright-core@1.65.2
	touch $@

# PostgreSQL server binaries for the tests on a PostgreSQL-backed Dagster instance (each test
# session starts its own throwaway server; Debian package; needs root and apt).
PG_INITDB := /usr/lib/postgresql/*/bin/initdb
postgresql:
	@ls $(PG_INITDB) >/dev/null 2>&1 || { \
		apt-get install -y --no-install-recommends postgresql >/dev/null 2>&1 || \
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends postgresql >/dev/null; }; }
	@ls $(PG_INITDB)

demo: setup build
	$(BINARY_ENV)=$(BIN) $(PY) examples/demo/demo.py --workdir target/demo

lint: lint-rust lint-python

lint-rust:
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

lint-python: setup
	$(VENV)/bin/ruff check python
	$(VENV)/bin/ruff format --check python
	$(VENV)/bin/ruff check --config python/pyproject.toml $(RUFF_PATHS)
	$(VENV)/bin/ruff format --check --config python/pyproject.toml $(RUFF_PATHS)

test-rust: setup
	$(LINTED_BUILD) MOTO_SERVER=$(CURDIR)/$(VENV)/bin/moto_server cargo test --locked

# Against the debug binary `cargo test` built. First in parallel (pytest-xdist workers, one
# moto server for all), then the tests marked `serial` (fixed wall-clock budgets on step work)
# alone. A missing binary, browser or PostgreSQL is an error here, not a skip.
PYTEST_ENV := $(BINARY_ENV)=$(CURDIR)/$(DEBUG_BIN) DAGSTER_TASKIQ_REQUIRE_BINARY=1 \
	DAGSTER_TASKIQ_REQUIRE_BROWSER=1
PYTEST := $(PY) -m pytest python/tests -q -p no:cacheprovider
test-python: setup build-debug browser a11y postgresql versions
	$(PYTEST_ENV) $(PYTEST) -m 'not serial' -n $(PYTEST_WORKERS) --dist worksteal --durations=25
	$(PYTEST_ENV) $(PYTEST) -m serial --durations=10

# The Python environments (the package's venv, then the older Dagster versions') and the browser
# and PostgreSQL packages install in the background (mostly network and disk) while the linted
# Rust build (build-debug: rustfmt, clippy and the test build in one compilation) uses the CPU;
# the Python lint and the Rust tests (which need moto from the venv) follow, and test-python
# waits for the packages.
VERSIONS_LOG := .venv-versions/build.log
PACKAGES_LOG := .venv-versions/packages.log
test:
	@mkdir -p .venv-versions
	@{ $(MAKE) --no-print-directory setup && $(MAKE) --no-print-directory versions; } \
		> $(VERSIONS_LOG) 2>&1 & python=$$!; \
	$(MAKE) --no-print-directory browser a11y postgresql > $(PACKAGES_LOG) 2>&1 & packages=$$!; \
	$(MAKE) --no-print-directory build-debug; status=$$?; \
	if ! wait $$python; then echo "make setup versions failed:"; cat $(VERSIONS_LOG); exit 1; fi; \
	[ $$status -eq 0 ] || exit $$status; \
	$(MAKE) --no-print-directory lint-python test-rust || exit $$?; \
	if ! wait $$packages; then echo "make browser a11y postgresql failed:"; cat $(PACKAGES_LOG); exit 1; fi; \
	$(MAKE) --no-print-directory test-python

# The deployment files (Dockerfile, manifests/, cfn-lint) against the code; no Rust build.
# Also part of test-python.
test-deploy: setup
	$(PY) -m pytest python/tests/test_deploy.py -q -p no:cacheprovider

# Minutes of random controller kills, step kills and an SQS outage over 10 runs.
chaos: setup build
	$(BINARY_ENV)=$(BIN) $(PY) python/tests/chaos.py

# Fuzz the envelope decoder (cargo install cargo-fuzz); seeds are the shared test vectors.
# RUSTC_BOOTSTRAP lets cargo-fuzz's sanitizer flags run on the stable toolchain.
FUZZ_SECONDS ?= 600
fuzz: setup
	$(PY) -c "import json, glob, hashlib, pathlib; d = pathlib.Path('fuzz/corpus/envelope'); d.mkdir(parents=True, exist_ok=True); [(d / hashlib.sha1(b).hexdigest()).write_bytes(b) for b in (json.load(open(f))['body'].encode() for f in glob.glob('tests/vectors/*/*.json'))]"
	RUSTC_BOOTSTRAP=1 cargo fuzz run envelope -- -max_total_time=$(FUZZ_SECONDS)

fmt: setup
	cargo fmt
	$(VENV)/bin/ruff format python
	$(VENV)/bin/ruff check --fix python
	$(VENV)/bin/ruff format --config python/pyproject.toml $(RUFF_PATHS)
	$(VENV)/bin/ruff check --fix --config python/pyproject.toml $(RUFF_PATHS)

# Benchmarks: (a) controller overhead with fakes, (b)+(d) latency and SQS calls per step
# against moto, then (c) the end-to-end comparison. Tables on stdout and in target/bench/.
bench: $(BENCH_STAMP) build postgresql
	MOTO_SERVER=$(CURDIR)/$(VENV)/bin/moto_server cargo bench --locked --bench overhead --bench latency
	$(BINARY_ENV)=$(BIN) $(PY) bench/e2e.py --repeats 3
	cat target/bench/overhead.md target/bench/latency.md target/bench-e2e.md > target/bench/report.md
	@echo "report: target/bench/report.md"

# The taskiq packages of the in-process comparison (they pin boto3/botocore to aiobotocore's).
$(BENCH_STAMP): $(STAMP)
	$(UV_INSTALL) --python $(PY) -e 'python[test,bench]'
	touch $(BENCH_STAMP)

# Wall time of a diamond and a fan-out: controller cold and warm, Dagster's multiprocess
# executor, an in-process taskiq worker, Dagster's in_process_executor, and cold, warm and
# forkserver on a PostgreSQL-backed instance (a throwaway server); the step hop of each and its
# stages (bench/hop.py). Report: stdout and target/bench-e2e.md.
bench-e2e: $(BENCH_STAMP) build postgresql
	$(BINARY_ENV)=$(BIN) $(PY) bench/e2e.py

clean:
	cargo clean
	rm -rf $(VENV) .venv-versions $(A11Y_DIR)
