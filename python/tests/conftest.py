"""Shared fixtures: a real moto server, AWS environment pointing at it, temp Dagster instances,
and the controller binary the end-to-end tests run.

The binary is `DAGSTER_TASKIQ_CONTROLLER_BINARY`, else the debug build of this checkout (what
`cargo test` builds). Tests marked `controller` need it: they are skipped when it is missing,
unless `DAGSTER_TASKIQ_REQUIRE_BINARY=1` (as `make test` sets), which makes that an error.

One moto server serves the whole run: under pytest-xdist the controller process starts it and
the workers find its URL in `DAGSTER_TASKIQ_TEST_MOTO_URL` (also a way to bring your own).

Dagster instances use SQLite files in the test's DAGSTER_HOME, or a PostgreSQL database where a
test is parametrized with `dagster_storage="postgres"` (`BOTH_STORAGES`): one throwaway server
per test session (per xdist worker) started on first use, one database per test. No PostgreSQL
on the machine is an error, never a skip."""

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from bed import Bed
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef

from dagster_taskiq_controller_testing.postgres import (
    PostgresServer,
    create_dagster_template,
    write_dagster_yaml,
)
from dagster_taskiq_controller_testing.stack import BINARY_ENV, MotoServer

# The one condition poller, re-exported for the test modules (`from conftest import wait_for`).
from dagster_taskiq_controller_testing.stack import wait_for as wait_for


def take_dead_letters(
    dlq_url: str,
    count: int,
    timeout: float = 60,
    keep: Callable[[dict[str, str]], bool] = lambda _: True,
) -> list[dict[str, str]]:
    """Takes dead letters off the DLQ (deleted) until ``count`` of them pass ``keep``; returns
    those: each message's attributes as strings, and its body under ``body``."""
    sqs = boto3.client("sqs")
    kept: list[dict[str, str]] = []

    def enough() -> bool:
        response = sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            MessageAttributeNames=["All"],
        )
        for m in response.get("Messages", []):
            dead = {k: v["StringValue"] for k, v in m["MessageAttributes"].items()}
            dead["body"] = m["Body"]
            if keep(dead):
                kept.append(dead)
            sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=m["ReceiptHandle"])
        return len(kept) >= count

    wait_for(enough, timeout, f"{count} dead letter(s)", interval=0)
    return kept


TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parents[1]
VECTORS_DIR = REPO_ROOT / "tests" / "vectors"
AWS_REGION = "us-east-1"
REQUIRE_BINARY_ENV = "DAGSTER_TASKIQ_REQUIRE_BINARY"
MOTO_URL_ENV = "DAGSTER_TASKIQ_TEST_MOTO_URL"

if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# Set before any test runs so Controller() and child processes (chaos, subprocess tests) agree.
os.environ.setdefault(BINARY_ENV, str(REPO_ROOT / "target" / "debug" / "dagster-taskiq-controller"))
BINARY = Path(os.environ[BINARY_ENV])

_shared_moto = pytest.StashKey[MotoServer]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "controller: runs the controller binary")
    # On 2 cores, parallel workers slow step start-up past these tests' fixed budgets (a
    # shutdown grace, a step timeout that includes Dagster's start-up, a nap the replacement
    # controller must beat). `make test-python` runs them in a serial pass after the rest.
    config.addinivalue_line(
        "markers", "serial: a wall-clock budget on step work; run without parallel workers"
    )
    config.addinivalue_line(
        "markers",
        "starts_first: runs for minutes; collected first so that the parallel pass does not "
        "wait for it at its end",
    )
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller process did the checks below
    if os.environ.get(REQUIRE_BINARY_ENV) == "1" and not BINARY.is_file():
        raise pytest.UsageError(
            f"controller binary {BINARY} not found ({BINARY_ENV}); build it with `cargo build`"
        )
    # Workers start after this hook and inherit the environment: one server for all of them.
    if getattr(config.option, "numprocesses", None) and not os.environ.get(MOTO_URL_ENV):
        server = MotoServer().start()
        config.stash[_shared_moto] = server
        os.environ[MOTO_URL_ENV] = server.url


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(_shared_moto, None)
    if server is not None:
        server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Stable: the rest keep their order. (xdist's worksteal gives the first worker the start of
    # the list; the others take its later tests from it.)
    items.sort(key=lambda item: item.get_closest_marker("starts_first") is None)
    if BINARY.is_file():
        return
    skip = pytest.mark.skip(reason=f"controller binary {BINARY} not built ({BINARY_ENV})")
    for item in items:
        if item.get_closest_marker("controller"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """The run's moto server (shared by every xdist worker); yields its endpoint URL."""
    shared = os.environ.get(MOTO_URL_ENV)
    if shared:
        yield shared
        return
    with MotoServer() as server:
        yield server.url


@pytest.fixture
def aws_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """AWS environment variables that point boto3 (and child processes) at the moto server."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": AWS_REGION,
        "AWS_REGION": AWS_REGION,
        "AWS_ENDPOINT_URL": moto_server,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


@pytest.fixture
def sqs_queue(aws_env: dict[str, str]) -> str:
    """A fresh standard SQS queue on the moto server; yields its URL."""
    sqs = boto3.client("sqs")
    name = f"steps-{uuid.uuid4().hex[:12]}"
    return str(sqs.create_queue(QueueName=name)["QueueUrl"])


def make_dagster_home(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """This session's PostgreSQL server, with a template database holding Dagster's schema."""
    server = PostgresServer().start()
    try:
        server.template = create_dagster_template(server)
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database with Dagster's schema, dropped after the test; yields its URL."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


STORAGES = ("sqlite", "postgres")
# Runs a test once on each storage of the test's Dagster instance (`dagster_home`).
BOTH_STORAGES = pytest.mark.parametrize("dagster_storage", STORAGES)


@pytest.fixture
def dagster_storage() -> str:
    """The storage of the test's Dagster instance; tests parametrize it (BOTH_STORAGES)."""
    return "sqlite"


@pytest.fixture
def dagster_home(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dagster_storage: str,
    request: pytest.FixtureRequest,
) -> Path:
    """An empty DAGSTER_HOME (set in the environment) for one test: SQLite files in it, or a
    fresh PostgreSQL database (`dagster_storage`)."""
    path = tmp_path / "dagster_home"
    if dagster_storage == "postgres":
        home = write_dagster_yaml(path, request.getfixturevalue("postgres_url"))
    else:
        assert dagster_storage == "sqlite", dagster_storage
        home = make_dagster_home(path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(dagster_home: Path) -> Iterator[DagsterInstance]:
    """A persistent sqlite DagsterInstance in the test's DAGSTER_HOME."""
    with DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as inst:
        yield inst


def child_env(**extra: str) -> dict[str, str]:
    """The current environment plus ``extra``, for subprocesses."""
    env = dict(os.environ)
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_run_worker(
    job_name: str, tmp_path: Path, run_config: dict[str, Any] | None = None
) -> "subprocess.Popen[bytes]":
    """`dagster job execute` of a job in tests/jobs.py as its own process, like a launched run
    worker (a process that a test can interrupt)."""
    command = [sys.executable, "-m", "dagster", "job", "execute"]
    command += ["-f", str(TESTS_DIR / "jobs.py"), "-j", job_name]
    if run_config is not None:
        config_path = tmp_path / f"run-config-{job_name}.json"
        config_path.write_text(json.dumps(run_config))
        command += ["-c", str(config_path)]
    log = open(tmp_path / f"run-worker-{job_name}.log", "wb")
    return subprocess.Popen(command, env=child_env(), stdout=log, stderr=subprocess.STDOUT)


def only_run(instance: DagsterInstance) -> Any:
    runs = instance.get_runs()
    return runs[0] if len(runs) == 1 else None


def terminate_run(instance: DagsterInstance, run_id: str, run_worker: "subprocess.Popen") -> None:
    """What Dagster's terminate does for a run in a local process: mark it CANCELING, then
    interrupt the run worker."""
    run = instance.get_run_by_id(run_id)
    assert run is not None
    instance.report_run_canceling(run)
    run_worker.send_signal(signal.SIGINT)


@pytest.fixture
def make_stack(
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Callable[..., Any]]:
    """Starts a stack (test_e2e_process.Stack: queues, controller, instance) with these
    controller args and queue visibility timeout; each must stop with exit code 0 at the end."""
    from test_e2e_process import start_stack

    started: list[Any] = []

    def make(*args: str, visibility_timeout: int = 30) -> Any:
        s = start_stack(
            aws_env, dagster_home, instance, monkeypatch, tmp_path, args, visibility_timeout
        )
        started.append(s)
        return s

    yield make
    for s in started:
        assert s.controller.stop() == 0, (tmp_path / "controller.log").read_text()[-4000:]


@pytest.fixture
def bed(
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Bed]:
    """Queues and a ledger for controllers a test starts (python/tests/bed.py)."""
    b = Bed(aws_env, dagster_home, instance, tmp_path, monkeypatch)
    try:
        yield b
    finally:
        b.stop_all()
