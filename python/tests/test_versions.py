"""The older Dagster minors the package supports, one virtualenv each (python/versions/*.txt,
built by `make versions` in .venv-versions/<name>; this interpreter has the newest).

- The contract tests run on each: its executor writes byte for byte the messages of
  tests/vectors (which the Rust decoder is tested on), and its Dagster unpacks them.
- A diamond whose middle op is SIGKILLed once runs end to end the way a deployment mixes
  versions (docs/operations.md, "Dagster versions"): the run worker and every step on the old
  Dagster (the controller's --python), the bridge on this interpreter's newer one, against an
  instance this interpreter created. The kill makes the whole contract cross versions: the old
  executor publishes, the controller decodes, the new bridge reads the old step's events and
  writes the verdict, the old executor reads it and retries under the RetryPolicy, and the old
  step that retries checks the attempt against the event log (should_verify_step).

A missing virtualenv fails the test (run `make versions`); it is never skipped.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import dagster
import pytest
from conftest import REPO_ROOT, TESTS_DIR, child_env, only_run, wait_for
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from dagster_taskiq_controller.executor import read_verdict
from dagster_taskiq_controller_testing.stack import Controller, create_queues

PINS_DIR = REPO_ROOT / "python" / "versions"
VENVS_DIR = REPO_ROOT / ".venv-versions"
PINS = sorted(PINS_DIR.glob("*.txt"))
RUN_TIMEOUT = 240.0
RUN_WORKER_ARGS = ("-f", str(TESTS_DIR / "jobs.py"), "-j", "diamond_retry")
PYTEST_ARGS = ("-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning")


@dataclass(frozen=True)
class OldDagster:
    name: str
    version: str
    python: Path


def pinned_version(pin: Path) -> str:
    (line,) = [line for line in pin.read_text().splitlines() if line.startswith("dagster==")]
    return line.removeprefix("dagster==").strip()


def test_every_older_supported_minor_has_a_pin() -> None:
    minors = {".".join(pinned_version(pin).split(".")[:2]) for pin in PINS}
    assert minors == {"1.11", "1.12"}
    assert dagster.__version__.startswith("1.13."), dagster.__version__


@pytest.fixture(params=PINS, ids=lambda pin: pin.stem)
def old(request: pytest.FixtureRequest) -> OldDagster:
    pin: Path = request.param
    venv = VENVS_DIR / pin.stem
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        pytest.fail(f"{venv} is missing or half-built: run `make versions`")
    version = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; print(version('dagster'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == pinned_version(pin), f"{venv} has dagster {version}: run `make versions`"
    return OldDagster(pin.stem, version, python)


def test_contract_tests_pass_on_old_dagster(old: OldDagster) -> None:
    env = child_env()
    # Not this session's xdist worker: the child is a plain pytest run.
    for name in [name for name in env if name.startswith("PYTEST_")]:
        del env[name]
    result = subprocess.run(
        [str(old.python), "-m", "pytest", str(TESTS_DIR / "test_contract.py"), *PYTEST_ARGS],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def _python_dispatch(tmp_path: Path, bridge: str, steps: Path) -> Path:
    """The controller's --python: the bridge sidecar on ``bridge``, everything else (steps, a
    zygote) on ``steps``. The runs here come from `dagster job execute -f`, without a code
    location, so --python-for cannot reach them (test_e2e_locations.py maps locations)."""
    script = tmp_path / "python-dispatch"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "dagster_taskiq_controller.bridge" ]; then\n'
        f'  exec "{bridge}" "$@"\n'
        "fi\n"
        f'exec "{steps}" "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.fixture
def mixed_controller(
    old: OldDagster,
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Controller]:
    queues = create_queues(
        aws_env["AWS_ENDPOINT_URL"], f"steps-{uuid.uuid4().hex[:10]}", visibility_timeout=30
    )
    monkeypatch.setenv("DAGSTER_TASKIQ_SQS_QUEUE_URL", queues.queue_url)
    controller = Controller(
        queue_url=queues.queue_url,
        env={**aws_env, "DAGSTER_HOME": str(dagster_home)},
        args=("--receive-wait", "1", "--shutdown-grace", "10", "--log-format", "json"),
        log_path=tmp_path / "controller.log",
        python=_python_dispatch(tmp_path, sys.executable, old.python),
    )
    controller.start()
    try:
        yield controller
    finally:
        assert controller.stop() == 0, (tmp_path / "controller.log").read_text()[-4000:]


def _log_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a child's stderr line forwarded as is
    return records


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    return record.get("fields", record)


def _queue_empty(queue_url: str) -> bool:
    attributes = boto3.client("sqs").get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return all(value == "0" for value in attributes.values())


@pytest.mark.controller
def test_a_diamond_with_a_killed_step_runs_on_old_dagster_beside_a_newer_bridge(
    old: OldDagster,
    mixed_controller: Controller,
    instance: DagsterInstance,
    tmp_path: Path,
) -> None:
    # The run worker: `dagster job execute` of the old version, on the instance.
    log_path = tmp_path / "run-worker.log"
    with open(log_path, "wb") as log:
        run_worker = subprocess.Popen(
            [str(old.python), "-m", "dagster", "job", "execute", *RUN_WORKER_ARGS],
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            run_worker.wait(RUN_TIMEOUT)
        finally:
            if run_worker.poll() is None:
                run_worker.kill()
                run_worker.wait()
    worker_log = log_path.read_text()[-6000:]
    run = only_run(instance)
    assert run is not None and run.status == DagsterRunStatus.SUCCESS, worker_log
    assert run_worker.returncode == 0, worker_log

    records = instance.get_records_for_run(run.run_id, limit=10_000).records
    events = [
        r.event_log_entry.dagster_event for r in records if r.event_log_entry.is_dagster_event
    ]

    # Every step ran on the old Dagster, each in its own process; values flowed between them.
    outputs = {
        event.step_key: event.event_specific_data.metadata
        for event in events
        if event.event_type == DagsterEventType.STEP_OUTPUT
    }
    assert set(outputs) == {"emit", "add_one", "double_or_die", "square", "join", "report"}
    assert {m["dagster_version"].value for m in outputs.values()} == {old.version}
    assert len({m["pid"].value for m in outputs.values()}) == len(outputs)
    assert outputs["report"]["value"].value == ((1 + 1) + (1 * 2) + (1 * 1)) * 10

    # The kill left no Dagster event; the newer bridge's verdict did, and the old executor
    # retried on it.
    verdicts = [v for v in map(read_verdict, events) if v is not None]
    assert [(step, attempt) for step, attempt, _ in verdicts] == [("double_or_die", 0)]
    assert "signal 9" in verdicts[0][2]
    retries = [e.step_key for e in events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert retries == ["double_or_die"]
    enqueued = [
        e.engine_event_data.metadata["attempt"].value
        for e in events
        if e.event_type == DagsterEventType.ENGINE_EVENT
        and e.step_key == "double_or_die"
        and "task_id" in (e.engine_event_data.metadata or {})
        and "sqs_message_id" in (e.engine_event_data.metadata or {})
    ]
    assert enqueued == [0, 1]

    # The bridge ran this interpreter's Dagster.
    log = tmp_path / "controller.log"
    started = [
        _fields(r) for r in _log_records(log) if _fields(r).get("message") == "controller started"
    ]
    assert [s.get("dagster_version") for s in started] == [dagster.__version__], started
    queue_url = os.environ["DAGSTER_TASKIQ_SQS_QUEUE_URL"]
    wait_for(lambda: _queue_empty(queue_url), 60, "every message to be deleted")
