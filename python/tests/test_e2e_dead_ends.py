"""No dead ends: a step whose message is dead-lettered, or never picked up, ends its run's wait
with a failure that says why, end to end with real Dagster, moto and the controller binary.

(The dagster-taskiq flavour, an extended payload lost in flight, is in test_taskiq_compat.)"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import jobs
import pytest
from conftest import VECTORS_DIR, take_dead_letters, wait_for
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, execute_job
from dagster._serdes import serialize_value
from relay import Relay

from dagster_taskiq_controller_testing.stack import Controller, Queues, create_queues

pytestmark = pytest.mark.controller


class RunInBackground:
    """A job run by ``execute_job`` on a thread, like a run worker."""

    def __init__(
        self, instance: DagsterInstance, job_name: str, run_config: dict[str, Any] | None = None
    ) -> None:
        self.instance = instance
        self.success: bool | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                with execute_job(jobs.recon(job_name), instance, run_config=run_config) as r:
                    self.success = r.success
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def run_id(self) -> str:
        runs = self.instance.get_runs()
        return runs[0].run_id if runs else ""

    def status(self) -> DagsterRunStatus | None:
        run = self.instance.get_run_by_id(self.run_id()) if self.run_id() else None
        return run.status if run is not None else None

    def step_failures(self) -> list[str]:
        """The error message of every STEP_FAILURE in the run's event log."""
        records = self.instance.get_records_for_run(
            self.run_id(), of_type=DagsterEventType.STEP_FAILURE
        ).records
        return [
            r.event_log_entry.dagster_event.step_failure_data.error.message  # type: ignore[union-attr]
            for r in records
            if r.event_log_entry.dagster_event is not None
        ]


def queue_depth(url: str) -> int:
    attributes = boto3.client("sqs").get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(v) for v in attributes.values())


class Bed:
    def __init__(
        self, aws_env: dict[str, str], dagster_home: Path, tmp_path: Path, name: str
    ) -> None:
        self.aws_env = aws_env
        self.dagster_home = dagster_home
        self.tmp_path = tmp_path
        self.queues: Queues = create_queues(aws_env["AWS_ENDPOINT_URL"], name)
        self.controller: Controller | None = None

    def start_controller(self) -> Controller:
        self.controller = Controller(
            queue_url=self.queues.queue_url,
            env={**self.aws_env, "DAGSTER_HOME": str(self.dagster_home)},
            args=("--receive-wait", "1"),
            log_path=self.tmp_path / "controller.log",
        ).start()
        return self.controller

    def controller_log(self) -> str:
        return (self.tmp_path / "controller.log").read_text(errors="replace")[-4000:]


@pytest.fixture
def bed(aws_env: dict[str, str], dagster_home: Path, tmp_path: Path) -> Iterator[Bed]:
    b = Bed(aws_env, dagster_home, tmp_path, f"dead-ends-{uuid.uuid4().hex[:10]}")
    try:
        yield b
    finally:
        if b.controller is not None:
            assert b.controller.stop() == 0, b.controller_log()


def test_a_step_message_corrupted_in_flight_fails_its_run_with_the_reason(
    bed: Bed, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first step's message reaches the controller with a bad ``dagster_priority``: it is
    dead-lettered, and the run fails at once with the reason instead of waiting for ever."""
    inbox = boto3.client("sqs").create_queue(QueueName=f"{uuid.uuid4().hex[:12]}-inbox")
    monkeypatch.setenv("DAGSTER_TASKIQ_SQS_QUEUE_URL", inbox["QueueUrl"])
    corrupted_at: list[float] = []

    def corrupt(body: str, attributes: dict[str, str]) -> tuple[str, dict[str, str]]:
        message = json.loads(body)
        if not corrupted_at:
            message["labels"]["dagster_priority"] = "high"
            corrupted_at.append(time.monotonic())
        return json.dumps(message), attributes

    bed.start_controller()
    relay = Relay(inbox["QueueUrl"], bed.queues.queue_url, corrupt).start()
    try:
        run = RunInBackground(instance, "diamond")
        wait_for(lambda: corrupted_at, 60, "the first step message relayed")
        run.thread.join(60)
        ended_after = time.monotonic() - corrupted_at[0]
        assert not run.thread.is_alive(), (
            f"the run still waits {ended_after:.0f}s after its message was corrupted; "
            f"controller log:\n{bed.controller_log()}"
        )
    finally:
        relay.stop()
    assert run.error is None and run.success is False
    assert run.status() == DagsterRunStatus.FAILURE
    (failure,) = run.step_failures()
    assert "emit" in failure and "dagster_priority" in failure and "high" in failure, failure
    assert "dead-letter queue" in failure, failure
    (dead,) = take_dead_letters(bed.queues.dlq_url, 1)
    assert dead["dagster_taskiq_error"] == "invalid_label"
    assert dead["dagster_taskiq_error_detail"].endswith("verdict recorded in Dagster"), dead
    assert json.loads(dead["body"])["labels"]["dagster_step_key"] == "emit"
    print(f"run FAILURE {ended_after:.1f}s after the corrupted message was sent")


def test_a_message_for_a_run_the_instance_does_not_know_says_no_verdict_is_possible(
    bed: Bed, instance: DagsterInstance
) -> None:
    body = json.loads(
        json.loads((VECTORS_DIR / "valid" / "ours_all_labels.json").read_text())["body"]
    )
    run_id = str(uuid.uuid4())
    body["labels"]["dagster_run_id"] = run_id
    packed = body["kwargs"]["execute_step_args_packed"]
    packed["pipeline_run_id"] = run_id
    packed["instance_ref"] = json.loads(serialize_value(instance.get_ref()))
    bed.start_controller()
    boto3.client("sqs").send_message(QueueUrl=bed.queues.queue_url, MessageBody=json.dumps(body))
    (dead,) = take_dead_letters(bed.queues.dlq_url, 1)
    assert dead["dagster_taskiq_error"] == "unknown_run"
    detail = dead["dagster_taskiq_error_detail"]
    assert run_id in detail and "no verdict possible" in detail, detail


def test_the_start_watchdog_fails_a_step_whose_message_was_purged(
    bed: Bed, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No controller will ever see the message: the executor's watchdog fails the step after
    ``step_start_timeout_seconds`` and says what to check."""
    monkeypatch.setenv("DAGSTER_TASKIQ_SQS_QUEUE_URL", bed.queues.queue_url)
    config = {"execution": {"config": {"step_start_timeout_seconds": 10}}}
    run = RunInBackground(instance, "diamond", run_config=config)
    wait_for(lambda: queue_depth(bed.queues.queue_url) >= 1, 60, "the first step published")
    boto3.client("sqs").purge_queue(QueueUrl=bed.queues.queue_url)
    purged_at = time.monotonic()
    run.thread.join(60)
    assert not run.thread.is_alive(), "the run still waits for the purged step"
    ended_after = time.monotonic() - purged_at
    assert run.error is None and run.success is False
    assert run.status() == DagsterRunStatus.FAILURE
    (failure,) = run.step_failures()
    for said in ("no dagster-taskiq-controller picked up attempt 0 of emit", bed.queues.queue_url):
        assert said in failure, failure
    assert "purged" in failure and "dead-letter queue" in failure, failure
    assert ended_after <= 20, f"{ended_after:.1f}s after the purge, for a 10 s watchdog"
    print(f"run FAILURE {ended_after:.1f}s after the purge")
