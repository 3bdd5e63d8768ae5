"""End to end on FIFO queues: real Dagster jobs through the controller binary on a moto FIFO work
queue with a FIFO dead-letter queue.

Every send to a FIFO queue needs a MessageGroupId and (without content-based deduplication, as
here) a MessageDeduplicationId: the executor's (group and dedup id = the attempt's task id) and
the controller's (requeue copies, dead letters, redrives: group = task id, dedup id =
``<replaced message id>-<purpose>``). A FIFO receive hands out one in-flight message per group at
a time; with one group per step attempt that never serializes a run's steps.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import jobs
import pytest
from conftest import child_env, only_run, start_run_worker, wait_for
from dagster import DagsterInstance, DagsterRunStatus, execute_job
from test_e2e_process import Stack

from dagster_taskiq_controller_testing.stack import Controller, controller_binary, create_queues

pytestmark = pytest.mark.controller


@pytest.fixture
def fifo_stack(
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Callable[..., Stack]]:
    """Makes a stack on a new FIFO queue pair; the controller starts with these args, or not
    at all with ``start=False`` (``stack.controller.start()`` later)."""
    started: list[Stack] = []

    def make(*args: str, start: bool = True, max_receive_count: int = 10) -> Stack:
        queues = create_queues(
            aws_env["AWS_ENDPOINT_URL"],
            f"steps-{uuid.uuid4().hex[:10]}.fifo",
            visibility_timeout=30,
            max_receive_count=max_receive_count,
        )
        assert queues.queue_url.endswith(".fifo") and queues.dlq_url.endswith(".fifo")
        monkeypatch.setenv("DAGSTER_TASKIQ_SQS_QUEUE_URL", queues.queue_url)
        controller = Controller(
            queue_url=queues.queue_url,
            env={**aws_env, "DAGSTER_HOME": str(dagster_home)},
            args=("--receive-wait", "1", "--shutdown-grace", "10", *args),
            log_path=tmp_path / "controller.log",
        )
        s = Stack(queues=queues, controller=controller, instance=instance)
        started.append(s)
        if start:
            controller.start()
        return s

    yield make
    for s in started:
        assert s.controller.stop() == 0, (tmp_path / "controller.log").read_text()[-4000:]


def dlq_messages(url: str) -> list[dict[str, Any]]:
    """What the FIFO dead-letter queue holds, given back at once after the look."""
    sqs = boto3.client("sqs")
    got = sqs.receive_message(
        QueueUrl=url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=1,
        VisibilityTimeout=30,
        MessageAttributeNames=["All"],
        AttributeNames=["MessageGroupId", "MessageDeduplicationId"],
    ).get("Messages", [])
    for m in got:
        sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
        )
    return got


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(controller_binary()), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        check=False,
    )


def test_a_diamond_runs_on_fifo_queues(fifo_stack: Callable[..., Stack]) -> None:
    stack = fifo_stack()
    with execute_job(jobs.recon("diamond"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
        assert result.output_for_node("report") == 50
    wait_for(stack.queue_empty, 60, "every message to be deleted")
    records = wait_for(
        lambda: [
            r for r in stack.api("/api/v1/steps") if r["run_id"] == run_id and not r["active"]
        ],
        30,
        "the step records to settle",
    )
    assert len(records) == 6 and all(r["state"] == "acked" for r in records), records
    assert stack.queue_empty(stack.queues.dlq_url)


def test_a_fan_out_past_the_waiting_limit_is_requeued_on_fifo_queues(
    fifo_stack: Callable[..., Stack],
) -> None:
    # One slot and a 1 s waiting limit: two of the three naps wait for the slot past the limit
    # and go back to the queue as copies (same group, a new deduplication id each time).
    stack = fifo_stack("--max-concurrent", "1", "--prefetch", "4", "--waiting-limit", "1")
    run_config = {"ops": {n: {"config": {"seconds": 3.0}} for n in ("nap_a", "nap_b", "nap_c")}}
    with execute_job(jobs.recon("slow_fanout"), stack.instance, run_config=run_config) as result:
        assert result.success
        assert result.output_for_node("total") == 9
    requeued = stack.metrics()
    series = 'dagster_taskiq_messages_acked_total{outcome="requeued"} '
    count = sum(
        float(line[len(series) :]) for line in requeued.splitlines() if line.startswith(series)
    )
    assert count >= 2, requeued
    assert "requeued" in (Path(stack.controller.log_path or "").read_text())
    wait_for(stack.queue_empty, 60, "every message to be deleted")
    assert stack.queue_empty(stack.queues.dlq_url)


def test_a_poison_message_goes_to_the_fifo_dlq_with_its_reason(
    fifo_stack: Callable[..., Stack],
) -> None:
    stack = fifo_stack()
    body = '{"task_id": "x", "oops"'
    sent = boto3.client("sqs").send_message(
        QueueUrl=stack.queues.queue_url,
        MessageBody=body,
        MessageGroupId="poison",
        MessageDeduplicationId=uuid.uuid4().hex,
    )
    with execute_job(jobs.recon("flaky"), stack.instance) as result:
        assert result.success
    (message,) = wait_for(
        lambda: dlq_messages(stack.queues.dlq_url), 15, "the poison in the FIFO DLQ"
    )
    assert message["Body"] == body
    attributes = message["MessageAttributes"]
    assert attributes["dagster_taskiq_error"]["StringValue"] == "invalid_json"
    assert attributes["dagster_taskiq_original_message_id"]["StringValue"] == sent["MessageId"]
    # A body with no readable task id gets its own group: its message id.
    assert message["Attributes"]["MessageGroupId"] == sent["MessageId"]
    assert message["Attributes"]["MessageDeduplicationId"] == f"{sent['MessageId']}-dead-letter"
    metrics = stack.metrics()
    assert 'dagster_taskiq_messages_dead_lettered_total{reason="invalid_json"} 1' in metrics
    wait_for(stack.queue_empty, 60, "the work queue to be empty")


def test_a_dead_letter_redriven_from_the_fifo_dlq_runs(
    fifo_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    # SQS moves a message received twice without being deleted (a consumer that crashed twice
    # on it) to the DLQ; after the redrive the controller runs it and the run succeeds.
    stack = fifo_stack(start=False, max_receive_count=2)
    sqs = boto3.client("sqs")
    worker = start_run_worker("slow", tmp_path, {"ops": {"sleep_op": {"config": {"seconds": 0.1}}}})
    try:
        task_ids = set()
        for _ in range(2):
            got = wait_for(
                lambda: sqs.receive_message(
                    QueueUrl=stack.queues.queue_url, VisibilityTimeout=0, WaitTimeSeconds=1
                ).get("Messages"),
                60,
                "the step message",
            )
            task_ids.add(json.loads(got[0]["Body"])["task_id"])
        (task_id,) = task_ids
        # The next receive finds it at maxReceiveCount and moves it.
        assert not sqs.receive_message(
            QueueUrl=stack.queues.queue_url, VisibilityTimeout=0, WaitTimeSeconds=1
        ).get("Messages")
        listed = cli("dlq", "--queue-url", stack.queues.queue_url, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        (entry,) = [json.loads(line) for line in listed.stdout.splitlines()]
        assert entry["task_id"] == task_id and entry["reason"] is None, entry

        stack.controller.start()
        redriven = cli("dlq", "--queue-url", stack.queues.queue_url, "redrive", "--all")
        assert redriven.returncode == 0, redriven.stderr
        assert redriven.stdout.startswith("moved 1 of 1"), redriven.stdout
        assert worker.wait(90) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    run = only_run(stack.instance)
    assert run.status == DagsterRunStatus.SUCCESS
    wait_for(stack.queue_empty, 30, "the work queue to be empty")
    records = wait_for(
        lambda: [
            r for r in stack.api("/api/v1/steps") if r["run_id"] == run.run_id and not r["active"]
        ],
        30,
        "the step record to settle",
    )
    assert [(r["task_id"], r["step_key"], r["state"]) for r in records] == [
        (task_id, "sleep_op", "acked")
    ]
    assert stack.queue_empty(stack.queues.dlq_url)
