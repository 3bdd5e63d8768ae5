"""The controller as a drop-in worker for dagster-taskiq: messages sent by the real ``taskiq`` and
``taskiq-aio-sqs`` packages (see ``taskiq_jobs``), real Dagster jobs, the controller binary on a
moto server (SQS and S3), and results read back with taskiq-aio-sqs's own S3 result backend."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import taskiq_jobs
from conftest import wait_for
from dagster import DagsterEvent, DagsterEventType, DagsterInstance, DagsterRunStatus, execute_job
from dagster._serdes import deserialize_value
from relay import Relay
from taskiq_jobs import Taskiq

from dagster_taskiq_controller import contract
from dagster_taskiq_controller_testing.stack import Controller, create_queues

pytestmark = pytest.mark.controller


class Bed:
    def __init__(
        self, controller: Controller, queue_url: str, dlq_url: str, payload_bucket: str
    ) -> None:
        self.controller = controller
        self.queue_url = queue_url
        self.dlq_url = dlq_url
        self.payload_bucket = payload_bucket

    def queue_empty(self) -> bool:
        attributes = boto3.client("sqs").get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return all(v == "0" for v in attributes.values())

    def requeued(self) -> float:
        """Messages this controller requeued after the waiting limit (its metrics)."""
        url = f"{self.controller.dashboard_url}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        series = 'dagster_taskiq_messages_acked_total{outcome="requeued"} '
        return sum(
            float(line[len(series) :]) for line in text.splitlines() if line.startswith(series)
        )

    def result(self, task_id: str) -> Any:
        """The task's result, once written: the run may end (its last step's event is in the
        event log) a moment before the controller has written that step's result."""
        taskiq = Taskiq.get()
        wait_for(
            lambda: taskiq.run(taskiq.backend.is_result_ready(task_id)),
            30,
            f"the result of {task_id}",
            interval=0.2,
        )
        return taskiq.run(taskiq.backend.get_result(task_id))


def start_bed(
    aws_env: dict[str, str],
    dagster_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    controller_args: tuple[str, ...] = (),
) -> Bed:
    name = f"taskiq-{uuid.uuid4().hex[:10]}"
    queues = create_queues(aws_env["AWS_ENDPOINT_URL"], name)
    s3 = boto3.client("s3")
    result_bucket, payload_bucket = f"{name}-results", f"{name}-payloads"
    for bucket in (result_bucket, payload_bucket):
        s3.create_bucket(Bucket=bucket)
    monkeypatch.setenv(taskiq_jobs.QUEUE_NAME_ENV, name)
    monkeypatch.setenv(taskiq_jobs.RESULT_BUCKET_ENV, result_bucket)
    monkeypatch.setenv(taskiq_jobs.PAYLOAD_BUCKET_ENV, payload_bucket)
    controller = Controller(
        queue_url=queues.queue_url,
        # The variables a dagster-taskiq deployment already has.
        env={
            **aws_env,
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_TASKIQ_S3_BUCKET_NAME": result_bucket,
            "DAGSTER_TASKIQ_S3_ENDPOINT_URL": aws_env["AWS_ENDPOINT_URL"],
            # Extended payloads are read from this bucket only.
            "DAGSTER_TASKIQ_PAYLOAD_BUCKET": payload_bucket,
        },
        args=("--receive-wait", "1", "--shutdown-grace", "10", *controller_args),
        log_path=tmp_path / "controller.log",
    ).start()
    return Bed(controller, queues.queue_url, queues.dlq_url, payload_bucket)


def stop_bed(bed: Bed, tmp_path: Path) -> None:
    Taskiq.close()
    taskiq_jobs.SENT.clear()
    assert bed.controller.stop() == 0, (tmp_path / "controller.log").read_text()[-4000:]


@pytest.fixture
def bed(
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Bed]:
    started = start_bed(aws_env, dagster_home, monkeypatch, tmp_path)
    try:
        yield started
    finally:
        stop_bed(started, tmp_path)


def sent_for(run_id: str) -> dict[str, str]:
    """step key -> task id of the run's steps."""
    return {step: task for (run, step), task in taskiq_jobs.SENT.items() if run == run_id}


def test_a_three_op_job_runs_and_its_results_read_back_as_dagster_events(
    bed: Bed, instance: DagsterInstance
) -> None:
    with execute_job(taskiq_jobs.recon("three_ops"), instance) as result:
        assert result.success
        assert result.output_for_node("plus_one") == 2 * 3 + 1
        run_id = result.run_id
    sent = sent_for(run_id)
    assert set(sent) == {"start", "triple", "plus_one"}
    wait_for(bed.queue_empty, 30, "every message deleted")
    for step_key, task_id in sent.items():
        taskiq_result = bed.result(task_id).raise_for_error()
        assert not taskiq_result.is_err
        assert taskiq_result.execution_time > 0
        events = [deserialize_value(line, DagsterEvent) for line in taskiq_result.return_value]
        # The step's own events (and run-level ones such as the step worker's start).
        assert {e.step_key for e in events} - {None} == {step_key}
        types = [e.event_type for e in events if e.step_key == step_key]
        assert DagsterEventType.STEP_START in types
        assert types[-1] == DagsterEventType.STEP_SUCCESS
        # The same events Dagster's event log holds for the step.
        logged = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_SUCCESS).records
        assert step_key in {r.event_log_entry.step_key for r in logged}


def test_a_crashing_step_yields_an_error_result_that_taskiq_raises(
    bed: Bed, instance: DagsterInstance
) -> None:
    with execute_job(taskiq_jobs.recon("crashing"), instance) as result:
        assert not result.success
        run_id = result.run_id
    sent = sent_for(run_id)
    assert bed.result(sent["start"]).is_err is False
    crashed = bed.result(sent["crash"])
    assert crashed.is_err
    assert crashed.return_value is None
    with pytest.raises(contract.StepExecutionError, match="exited with code 3"):
        crashed.raise_for_error()
    wait_for(bed.queue_empty, 30, "every message deleted")


def test_a_message_over_1_mib_goes_through_s3_and_runs(
    bed: Bed, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(taskiq_jobs, "PAD_BYTES", 1100 * 1024)
    with execute_job(taskiq_jobs.recon("three_ops"), instance) as result:
        assert result.success
        run_id = result.run_id
    sent = sent_for(run_id)
    # taskiq-aio-sqs put every body in the payload bucket and sent pointers.
    payloads = boto3.client("s3").list_objects_v2(Bucket=bed.payload_bucket)["Contents"]
    sizes = {o["Key"]: o["Size"] for o in payloads}
    for task_id in sent.values():
        assert sizes[f"{task_id}.json"] > 1024 * 1024
        assert not bed.result(task_id).is_err
    wait_for(bed.queue_empty, 30, "every message deleted")


def test_an_extended_payload_lost_in_flight_fails_its_run_with_the_reason(
    bed: Bed, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The S3 object behind the first step's pointer is gone when the controller reads it: the
    message is dead-lettered, and the taskiq error result (at the task id the pointer's key
    names) fails the run at once instead of leaving it waiting for ever."""
    monkeypatch.setattr(taskiq_jobs, "PAD_BYTES", 1100 * 1024)
    inbox = f"taskiq-{uuid.uuid4().hex[:10]}-inbox"
    inbox_url = boto3.client("sqs").create_queue(QueueName=inbox)["QueueUrl"]
    monkeypatch.setenv(taskiq_jobs.QUEUE_NAME_ENV, inbox)
    lost: list[str] = []

    def lose_payload(body: str, attributes: dict[str, str]) -> tuple[str, dict[str, str]]:
        pointer = json.loads(body)
        if not lost:
            boto3.client("s3").delete_object(Bucket=pointer["s3_bucket"], Key=pointer["s3_key"])
            lost.append(pointer["s3_key"])
        return body, attributes

    outcome: dict[str, Any] = {}

    def run() -> None:
        with execute_job(taskiq_jobs.recon("three_ops"), instance) as result:
            outcome["success"] = result.success
            outcome["run_id"] = result.run_id

    relay = Relay(inbox_url, bed.queue_url, lose_payload).start()
    try:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_for(lambda: lost, 60, "the first step message relayed without its payload")
        thread.join(60)
        assert not thread.is_alive(), "the run still waits for the step whose payload was lost"
    finally:
        relay.stop()
    assert outcome["success"] is False
    run_id = outcome["run_id"]
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == DagsterRunStatus.FAILURE
    task_id = sent_for(run_id)["start"]
    assert lost == [f"{task_id}.json"]
    failures = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records
    (failure,) = [r.event_log_entry.dagster_event.step_failure_data.error.message for r in failures]  # type: ignore[union-attr]
    assert "invalid_extended_payload" in failure and "does not exist" in failure, failure
    assert bed.result(task_id).is_err
    sqs = boto3.client("sqs")
    dead = wait_for(
        lambda: sqs.receive_message(
            QueueUrl=bed.dlq_url, MessageAttributeNames=["All"], WaitTimeSeconds=1
        ).get("Messages"),
        30,
        "the dead letter",
    )
    attributes = dead[0]["MessageAttributes"]
    assert attributes["dagster_taskiq_error"]["StringValue"] == "invalid_extended_payload"
    assert "no verdict possible" in attributes["dagster_taskiq_error_detail"]["StringValue"]
    wait_for(bed.queue_empty, 30, "every message deleted")


def test_a_requeued_step_gets_no_result_until_it_has_run(
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """One slot and a 1 s waiting limit: the fan-out's waiting branches are requeued, maybe
    several times. A requeue is not an end of the attempt: the executor, which reads the
    first result it finds, must get each step's real result, so the run succeeds."""
    bed = start_bed(
        aws_env,
        dagster_home,
        monkeypatch,
        tmp_path,
        ("--max-concurrent", "1", "--prefetch", "4", "--waiting-limit", "1"),
    )
    try:
        with execute_job(taskiq_jobs.recon("fan_out"), instance) as result:
            assert result.success
            run_id = result.run_id
        assert bed.requeued() >= 1, "no step waited past the limit: the test proves nothing"
        sent = sent_for(run_id)
        assert set(sent) == {"start", "nap_0", "nap_1", "nap_2", "nap_3"}
        for task_id in sent.values():
            assert not bed.result(task_id).is_err
        wait_for(bed.queue_empty, 30, "every message deleted")
    finally:
        stop_bed(bed, tmp_path)
