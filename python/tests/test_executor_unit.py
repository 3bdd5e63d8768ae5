"""The SQS step handler against a real moto server and a real Dagster instance."""

import base64
import json
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import jobs
import pytest
from conftest import TESTS_DIR, child_env, wait_for
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.context_creation_job import scoped_job_context
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.step_delegating import StepHandlerContext
from dagster._core.storage.dagster_run import DagsterRun
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value

from dagster_taskiq_controller import compat, contract, executor, taskiq_controller_executor
from dagster_taskiq_controller.bridge import Bridge
from dagster_taskiq_controller.executor import SqsStepHandler


def receive_all(queue_url: str, expected: int, timeout: float = 20) -> list[dict[str, Any]]:
    sqs = boto3.client("sqs")
    got: list[dict[str, Any]] = []

    def poll() -> bool:
        response = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        for message in response.get("Messages", []):
            got.append(message)
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        return len(got) >= expected

    wait_for(poll, timeout=timeout, what=f"{expected} SQS messages", interval=0)
    return got


@contextmanager
def handler_context(
    instance: DagsterInstance, job_name: str, step_key: str, attempt: int
) -> Iterator[tuple[StepHandlerContext, DagsterRun]]:
    recon_job = jobs.recon(job_name)
    plan = create_execution_plan(recon_job)
    run = instance.create_run_for_job(
        job_def=recon_job.get_definition(), execution_plan=plan, job_code_origin=None
    )
    with scoped_job_context(plan, recon_job, {}, run, instance) as plan_context:
        step = plan.get_step_by_key(step_key)
        args = ExecuteStepArgs(
            job_origin=recon_job.get_python_origin(),
            run_id=run.run_id,
            step_keys_to_execute=[step_key],
            instance_ref=instance.get_ref(),
            retry_mode=RetryMode.DEFERRED,
            known_state=KnownExecutionState(previous_retry_attempts={step_key: attempt}),
        )
        yield StepHandlerContext(instance, plan_context, [step], args, run), run


def test_executor_definition() -> None:
    assert taskiq_controller_executor.name == "taskiq_controller"
    fields = taskiq_controller_executor.config_schema.as_field().config_type.fields
    assert {
        "queue_url",
        "region_name",
        "endpoint_url",
        "retries",
        "max_concurrent",
        "tag_concurrency_limits",
        "step_health_check_interval_seconds",
        "poll_interval_seconds",
        "step_start_timeout_seconds",
    } <= set(fields)
    assert fields["step_start_timeout_seconds"].default_value == 1800


def test_launch_step_sends_the_contract_message(instance: DagsterInstance, sqs_queue: str) -> None:
    handler = SqsStepHandler(queue_url=sqs_queue)
    with handler_context(instance, "tagged", "tagged_op", attempt=2) as (ctx, run):
        events = list(handler.launch_step(ctx))
        assert len(events) == 1 and events[0].event_type == DagsterEventType.ENGINE_EVENT
        (message,) = receive_all(sqs_queue, 1)
        client = handler._client
        list(handler.launch_step(ctx))  # the SQS client is made once per handler
        assert handler._client is client
        receive_all(sqs_queue, 1)

    body = message["Body"]
    decoded = contract.decode_step_message(body)
    assert decoded.run_id == run.run_id
    assert decoded.step_key == "tagged_op"
    assert decoded.attempt == 2
    assert decoded.task_id == contract.step_task_id(run.run_id, "tagged_op", 2)
    assert decoded.job_name == "tagged"
    assert (decoded.launcher, decoded.priority, decoded.timeout_seconds) == ("process", 5, 30.0)
    assert decoded.tags == contract.label_tags(jobs.tagged_op.tags)

    payload = json.loads(body)
    labels = (*contract.ALL_LABELS, contract.LABEL_SENT_AT)
    assert payload["labels_types"] == {name: 3 for name in labels}
    # The send time, for the controller's schedule-to-start latency.
    assert abs(float(payload["labels"][contract.LABEL_SENT_AT]) - time.time()) < 60
    packed = payload["kwargs"]["execute_step_args_packed"]
    args = deserialize_value(json.dumps(packed), ExecuteStepArgs)
    # The args as Dagster made them, with its own step verification turned on.
    assert args.should_verify_step is True
    assert args == compat.replace_step_args(ctx.execute_step_args, should_verify_step=True)
    assert payload["kwargs"]["executable_dict"] == jobs.recon("tagged").to_dict()

    metadata = events[0].engine_event_data.metadata
    assert metadata["task_id"].value == decoded.task_id
    assert metadata["sqs_message_id"].value == message["MessageId"]
    enqueued = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
    assert any("Step enqueued" in (r.event_log_entry.message or "") for r in enqueued.records)


def _write_verdict(instance: DagsterInstance, run: DagsterRun, step_key: str, attempt: int) -> None:
    instance.report_engine_event(
        f"verdict for attempt {attempt}",
        run,
        EngineEventData(
            metadata=contract.verdict_metadata(
                verdict=f"process killed by signal 9 (SIGKILL) on attempt {attempt}",
                attempt=attempt,
                task_id=contract.step_task_id(run.run_id, step_key, attempt),
                exit="signal 9",
                stderr_tail="",
            )
        ),
        step_key=step_key,
    )


def test_check_step_health_reads_verdicts(instance: DagsterInstance, sqs_queue: str) -> None:
    handler = SqsStepHandler(queue_url=sqs_queue)
    with handler_context(instance, "flaky", "flaky_op", attempt=1) as (ctx, run):
        assert handler.check_step_health(ctx).is_healthy
        # a verdict for another attempt or another step does not concern this attempt
        _write_verdict(instance, run, "flaky_op", 0)
        _write_verdict(instance, run, "other_step", 1)
        instance.report_engine_event("unrelated", run, EngineEventData(), step_key="flaky_op")
        assert handler.check_step_health(ctx).is_healthy
        _write_verdict(instance, run, "flaky_op", 1)
        result = handler.check_step_health(ctx)
        assert not result.is_healthy
        assert result.unhealthy_reason == "process killed by signal 9 (SIGKILL) on attempt 1"
        assert not handler.check_step_health(ctx).is_healthy  # stays unhealthy (cached)

        terminate_events = handler.terminate_step(ctx)
        assert iter(terminate_events) is terminate_events  # a generator
        assert len(list(terminate_events)) == 1

    with handler_context(instance, "flaky", "flaky_op", attempt=2) as (ctx2, _):
        assert handler.check_step_health(ctx2).is_healthy


def _write_step_event(
    instance: DagsterInstance, run: DagsterRun, step_key: str, event_type: DagsterEventType
) -> None:
    data = EngineEventData() if event_type == DagsterEventType.STEP_WORKER_STARTED else None
    instance.report_dagster_event(
        DagsterEvent(
            event_type.value, job_name=run.job_name, step_key=step_key, event_specific_data=data
        ),
        run_id=run.run_id,
    )


class Clock:
    """The watchdog's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_start_watchdog_fails_an_attempt_nobody_picked_up(
    instance: DagsterInstance, sqs_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(executor, "_monotonic", clock)
    handler = SqsStepHandler(queue_url=sqs_queue, step_start_timeout_seconds=10)
    with handler_context(instance, "flaky", "flaky_op", attempt=1) as (ctx, run):
        list(handler.launch_step(ctx))
        clock.now += 9
        assert handler.check_step_health(ctx).is_healthy
        # Attempt 0 started and ended: that is not attempt 1 picked up.
        _write_step_event(instance, run, "flaky_op", DagsterEventType.STEP_START)
        _write_step_event(instance, run, "flaky_op", DagsterEventType.STEP_UP_FOR_RETRY)
        _write_step_event(instance, run, "other_op", DagsterEventType.STEP_RESTARTED)
        clock.now += 1
        result = handler.check_step_health(ctx)
        assert not result.is_healthy
        reason = result.unhealthy_reason or ""
        task_id = contract.step_task_id(run.run_id, "flaky_op", 1)
        for said in ("attempt 1 of flaky_op", task_id, sqs_queue, "purged", "dead-letter"):
            assert said in reason, reason
        # Its step worker started: picked up, however long it then takes.
        _write_step_event(instance, run, "flaky_op", DagsterEventType.STEP_WORKER_STARTED)
        clock.now += 3600
        assert handler.check_step_health(ctx).is_healthy

    # A controller's note about the attempt (a relaunch) is a pickup too.
    with handler_context(instance, "flaky", "flaky_op", attempt=0) as (ctx, run):
        list(handler.launch_step(ctx))
        instance.report_engine_event(
            "relaunching",
            run,
            EngineEventData(
                metadata={
                    contract.META_ATTEMPT: "0",
                    contract.META_TASK_ID: contract.step_task_id(run.run_id, "flaky_op", 0),
                }
            ),
            step_key="flaky_op",
        )
        clock.now += 3600
        assert handler.check_step_health(ctx).is_healthy

    # A step in flight when this process took the run over is timed from its first check;
    # 0 disables the watchdog.
    with handler_context(instance, "flaky", "flaky_op", attempt=0) as (ctx, _):
        adopted = SqsStepHandler(queue_url=sqs_queue, step_start_timeout_seconds=10)
        assert adopted.check_step_health(ctx).is_healthy
        clock.now += 10
        assert not adopted.check_step_health(ctx).is_healthy
        disabled = SqsStepHandler(queue_url=sqs_queue, step_start_timeout_seconds=0)
        list(disabled.launch_step(ctx))
        clock.now += 10**6
        assert disabled.check_step_health(ctx).is_healthy
    receive_all(sqs_queue, 3)


def _execute_step(packed: dict[str, Any], job_name: str, step_key: str) -> int:
    """Run one step the way the controller does: no shell, args in the environment."""
    compressed = base64.b64encode(zlib.compress(json.dumps(packed).encode())).decode()
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "api", "execute_step"],
        env=child_env(
            DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS=compressed,
            DAGSTER_RUN_JOB_NAME=job_name,
            DAGSTER_RUN_STEP_KEY=step_key,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    return proc.returncode


@pytest.mark.parametrize("how", ["cli", "execute_job"])
def test_round_trip_with_a_fake_controller(
    instance: DagsterInstance, sqs_queue: str, how: str, tmp_path: Path
) -> None:
    """``dagster job execute`` / ``execute_job`` of self_kill with this test as controller.

    Attempt 0 SIGKILLs itself, the verdict makes Dagster retry, attempt 1 succeeds.
    """
    env = child_env(DAGSTER_TASKIQ_SQS_QUEUE_URL=sqs_queue)
    log_path = tmp_path / "run.log"
    log = log_path.open("wb")  # a file, not a pipe: the run logs a lot
    if how == "cli":
        run_proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
                "job",
                "execute",
                "-f",
                str(TESTS_DIR / "jobs.py"),
                "-j",
                "self_kill",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    else:
        script = (
            "import sys; sys.path.insert(0, sys.argv[1]); import jobs; "
            "from dagster import DagsterInstance, execute_job; "
            "r = execute_job(jobs.recon('self_kill'), DagsterInstance.get()); "
            "sys.exit(0 if r.success else 1)"
        )
        run_proc = subprocess.Popen(
            [sys.executable, "-c", script, str(TESTS_DIR)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    bridge = Bridge()

    def run_log() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    def receive_one() -> dict[str, Any]:
        try:
            (message,) = receive_all(sqs_queue, 1, timeout=60)
        except AssertionError:
            raise AssertionError(f"no step message; run log:\n{run_log()}") from None
        return message

    try:
        first = receive_one()
        step = contract.decode_step_message(first["Body"])
        assert (step.step_key, step.attempt, step.job_name) == ("kill_self", 0, "self_kill")
        packed = json.loads(first["Body"])["kwargs"]["execute_step_args_packed"]
        assert _execute_step(packed, "self_kill", "kill_self") == -9
        state = bridge.step_state(
            {
                "instance_ref": step.instance_ref,
                "run_id": step.run_id,
                "step_key": "kill_self",
                "attempt": 0,
            }
        )
        assert state["attempt_finished"] is False
        written = bridge.report_verdict(
            {
                "instance_ref": step.instance_ref,
                "run_id": step.run_id,
                "step_key": "kill_self",
                "attempt": 0,
                "task_id": step.task_id,
                "verdict": "process killed by signal 9 (SIGKILL)",
                "exit": "signal 9",
                "stderr_tail": "",
            }
        )
        assert written == {"written": True, "attempt_finished": False}

        second = receive_one()
        retry = contract.decode_step_message(second["Body"])
        assert (retry.run_id, retry.step_key, retry.attempt) == (step.run_id, "kill_self", 1)
        packed = json.loads(second["Body"])["kwargs"]["execute_step_args_packed"]
        assert _execute_step(packed, "self_kill", "kill_self") == 0

        assert run_proc.wait(timeout=60) == 0, run_log()
        run = instance.get_run_by_id(step.run_id)
        assert run is not None and run.status == DagsterRunStatus.SUCCESS
        assert (
            bridge.step_state(
                {"instance_ref": None, "run_id": step.run_id, "step_key": "kill_self", "attempt": 1}
            )["last_terminal"]
            == "STEP_SUCCESS"
        )
    finally:
        if run_proc.poll() is None:
            run_proc.kill()
            run_proc.wait()
        log.close()


def test_the_executor_wakes_as_soon_as_the_runs_event_log_changes(
    instance: DagsterInstance,
) -> None:
    """Between two polls the executor waits on the run's SQLite event log: a quiet log keeps it
    waiting the whole poll interval, an event written meanwhile ends the wait at once."""
    recon_job = jobs.recon("self_kill")
    run = instance.create_run_for_job(
        job_def=recon_job.get_definition(),
        execution_plan=create_execution_plan(recon_job),
        job_code_origin=None,
    )
    instance.report_engine_event("the shard exists", run)
    wake = executor.EventLogWake.for_run(instance, run.run_id)
    assert wake is not None
    wake.wait(0)  # what was written before the executor's first poll is read by that poll

    started = time.monotonic()
    wake.wait(0.3)
    assert time.monotonic() - started >= 0.3

    writer = threading.Timer(0.2, lambda: instance.report_engine_event("a step ended", run))
    started = time.monotonic()
    writer.start()
    try:
        wake.wait(30)
    finally:
        writer.join()
    # Woken by the write, long before the interval (generous for a loaded machine).
    assert time.monotonic() - started < 10
    # The wake may come mid-write (the log's size and time change more than once per commit);
    # what the rest of the write changed is seen now, as the executor's next poll would read it.
    wake.wait(0)

    # Dagster's loop reads the pause from the executor: the wait, then 0.
    made = executor.WakingStepDelegatingExecutor(
        SqsStepHandler(queue_url="q"), retries=RetryMode.DISABLED, sleep_seconds=0.25
    )
    assert made._sleep_seconds == 0.25  # no run yet: the plain interval
    made._wake = wake
    started = time.monotonic()
    assert made._sleep_seconds == 0
    assert 0.25 <= time.monotonic() - started < 10
