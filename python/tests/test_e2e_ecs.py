"""End to end with the ECS launcher: real Dagster jobs through the controller binary, every step
an "ECS task" of the harness (moto in-process plus a local agent that runs each task's
overridden command and reports its real exit code; see dagster_taskiq_controller_testing.ecs).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import threading
import urllib.request
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import jobs
import pytest
from conftest import (
    make_dagster_home,
    only_run,
    start_run_worker,
    take_dead_letters,
    terminate_run,
    wait_for,
)
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, execute_job
from dagster._core.definitions.metadata import UrlMetadataValue
from dagster._core.execution.plan.objects import ErrorSource
from dagster._core.instance.ref import InstanceRef

from dagster_taskiq_controller import contract
from dagster_taskiq_controller_testing.ecs import BUCKET, CONTAINER, EcsHarness
from dagster_taskiq_controller_testing.stack import Controller, Queues, create_queues

pytestmark = [
    pytest.mark.controller,
    # moto has no ECS error shape for ThrottlingException; it still sends the right code.
    pytest.mark.filterwarnings("ignore:Exception\\(ECSException\\) with code ThrottlingException"),
]

DIAMOND_STEPS = {"emit", "add_one", "double", "square", "join", "report"}
# Every task's command: the shim, which runs the step with SIGTERM guarded.
SHIM = ["python", "-m", "dagster_taskiq_controller.ecs_entrypoint"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EcsHarness]:
    with EcsHarness(tmp_path_factory.mktemp("ecs-agent")) as h:
        yield h


@dataclass
class Stack:
    harness: EcsHarness
    queues: Queues
    instance: DagsterInstance
    controller: Controller
    dagster_home: Path
    tmp_path: Path

    def start_controller(self, name: str, *extra: str) -> Controller:
        controller = Controller(
            queue_url=self.queues.queue_url,
            env={**self.harness.env, "DAGSTER_HOME": str(self.dagster_home)},
            args=(
                "--receive-wait",
                "1",
                "--shutdown-grace",
                "10",
                "--visibility-timeout",
                "4",
                "--backoff-base",
                "0.5",
                "--controller-id",
                name,
                *self.harness.controller_args(),
                *extra,
            ),
            log_path=self.tmp_path / f"{name}.log",
        )
        return controller.start()

    def log(self, name: str = "controller-a") -> str:
        return (self.tmp_path / f"{name}.log").read_text()

    def metrics(self, controller: Controller | None = None) -> str:
        url = f"{(controller or self.controller).dashboard_url}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.controller.dashboard_url}{path}", timeout=5) as r:
            return json.load(r)

    def queue_empty(self) -> bool:
        attributes = boto3.client("sqs").get_queue_attributes(
            QueueUrl=self.queues.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return all(v == "0" for v in attributes.values())

    def finished(self, run_id: str, count: int) -> list[Any]:
        """The run's stopped tasks, once there are `count` of them."""

        def stopped() -> list[Any] | None:
            tasks = [t for t in self.harness.finished_tasks() if t.run_id == run_id]
            return tasks if len(tasks) >= count else None

        return wait_for(stopped, 30, f"{count} tasks of the run to stop")

    def launches(self, run_id: str) -> dict[tuple[str, int], int]:
        return {
            (step, attempt): n
            for (run, step, attempt), n in self.harness.launches().items()
            if run == run_id
        }


@pytest.fixture
def stack(harness: EcsHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    for key, value in harness.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    dagster_home = make_dagster_home(tmp_path / "dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    queues = create_queues(
        harness.endpoint_url, f"ecs-steps-{uuid.uuid4().hex[:10]}", visibility_timeout=4
    )
    monkeypatch.setenv("DAGSTER_TASKIQ_SQS_QUEUE_URL", queues.queue_url)
    with DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        s = Stack(harness, queues, instance, None, dagster_home, tmp_path)  # type: ignore[arg-type]
        s.controller = s.start_controller("controller-a")
        try:
            yield s
        finally:
            code = s.controller.stop()
            assert code in (0, -signal.SIGKILL), s.log()[-4000:]


def events_of(instance: DagsterInstance, run_id: str, event_type: DagsterEventType) -> list[Any]:
    return [
        r.event_log_entry
        for r in instance.get_records_for_run(run_id, of_type=event_type, limit=10_000).records
    ]


def verdicts_of(instance: DagsterInstance, run_id: str) -> list[Any]:
    return [
        e
        for e in events_of(instance, run_id, DagsterEventType.ENGINE_EVENT)
        if contract.META_VERDICT in (e.dagster_event.event_specific_data.metadata or {})
    ]


def test_diamond_runs_every_step_as_its_own_ecs_task(stack: Stack) -> None:
    with execute_job(jobs.recon("diamond"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
        assert result.output_for_node("report") == 50
    launches = stack.launches(run_id)
    assert launches == {(step, 0): 1 for step in DIAMOND_STEPS}
    # Dagster has the step's success before its process exits: wait for the agent.
    tasks = stack.finished(run_id, 6)
    assert {t.step_key for t in tasks} == DIAMOND_STEPS
    assert all(t.command == SHIM for t in tasks)
    assert all((t.stop_code, t.exit_code) == ("EssentialContainerExited", 0) for t in tasks)
    wait_for(stack.queue_empty, 60, "every message to be deleted")

    # The record turns acked just after the delete.
    def acked_records() -> list[Any] | None:
        records = [r for r in stack.api("/api/v1/steps") if r["run_id"] == run_id]
        return records if all(r["state"] == "acked" for r in records) else None

    records = wait_for(acked_records, 10, "every step record to be acked")
    assert len(records) == 6
    assert all(r["locator"].startswith("arn:aws:ecs:") for r in records), records
    # Each record links to its task and log stream; so does a launch event in Dagster.
    for record in records:
        task_id = record["locator"].rsplit("/", 1)[1]
        kinds = {link["kind"]: link["url"] for link in record["links"]}
        assert set(kinds) == {"ecs_task", "cloudwatch_logs"}, record
        assert kinds["cloudwatch_logs"].endswith(f"$252F{task_id}"), kinds
    launch_links = {
        e.step_key: e.dagster_event.event_specific_data.metadata[
            contract.META_LINK_PREFIX + "cloudwatch_logs"
        ].value
        for e in events_of(stack.instance, run_id, DagsterEventType.ENGINE_EVENT)
        if contract.META_LINK_PREFIX + "cloudwatch_logs"
        in (e.dagster_event.event_specific_data.metadata or {})
    }
    assert launch_links == {
        r["step_key"]: next(link["url"] for link in r["links"] if link["kind"] == "cloudwatch_logs")
        for r in records
    }
    metrics = stack.metrics()
    assert 'dagster_taskiq_steps_launched_total{launcher="ecs"} 6' in metrics
    assert 'operation="DescribeTasks",result="ok"' in metrics


def test_an_oom_killed_task_gets_a_verdict_and_the_retry_policy_applies(stack: Stack) -> None:
    # kill_self SIGKILLs itself on attempt 0: the harness reports that as ECS reports an OOM
    # kill (exit code 137, container reason OutOfMemoryError).
    with execute_job(jobs.recon("self_kill"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
    (verdict,) = verdicts_of(stack.instance, run_id)
    metadata = verdict.dagster_event.event_specific_data.metadata
    assert "ran out of memory" in metadata[contract.META_VERDICT].value
    # The verdict leads to the task and its log stream (url metadata in the Dagster UI).
    task_link = metadata[contract.META_LINK_PREFIX + "ecs_task"]
    logs_link = metadata[contract.META_LINK_PREFIX + "cloudwatch_logs"]
    assert isinstance(task_link, UrlMetadataValue) and isinstance(logs_link, UrlMetadataValue)
    task_id = task_link.value.split("/tasks/")[1].split("?")[0]
    assert re.fullmatch(r"[0-9a-zA-Z-]+", task_id), task_link.value
    assert task_link.value.startswith("https://us-east-1.console.aws.amazon.com/ecs/v2/clusters/")
    assert logs_link.value.endswith(
        f"#logsV2:log-groups/log-group/$252Fecs$252Fdagster-steps/log-events/"
        f"steps$252F{CONTAINER}$252F{task_id}"
    ), logs_link.value
    assert metadata[contract.META_EXIT].value == "ecs OutOfMemoryError exit code 137"
    assert "OutOfMemoryError: Container killed" in metadata[contract.META_STDERR_TAIL].value
    retries = events_of(stack.instance, run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    assert [r.step_key for r in retries] == ["kill_self"]
    assert stack.launches(run_id) == {("kill_self", 0): 1, ("kill_self", 1): 1}
    wait_for(stack.queue_empty, 60, "every message to be deleted")


@pytest.mark.serial  # a wall-clock budget on step work: run alone (see conftest)
def test_a_killed_controller_is_replaced_and_its_running_tasks_are_adopted(stack: Stack) -> None:
    run_config = {
        "ops": {name: {"config": {"seconds": 8.0}} for name in ("nap_a", "nap_b", "nap_c")}
    }
    replacement: list[Controller] = []

    def kill_and_replace() -> None:
        wait_for(
            lambda: len({t.step_key for t in stack.harness.running_tasks()}) >= 3,
            60,
            "three naps to run as tasks",
        )
        stack.controller.signal(signal.SIGKILL)
        stack.controller.process.wait()  # type: ignore[union-attr]
        replacement.append(stack.start_controller("controller-b"))

    killer = threading.Thread(target=kill_and_replace)
    killer.start()
    try:
        with execute_job(jobs.recon("slow_fanout"), stack.instance, run_config=run_config) as r:
            assert r.success
            run_id = r.run_id
            assert r.output_for_node("total") == 24
    finally:
        killer.join(90)
    assert replacement, "the controller was never replaced"
    first, stack.controller = stack.controller, replacement[0]
    assert first.process is not None and first.process.returncode == -signal.SIGKILL
    # Every step attempt ran as exactly one task: the naps were adopted, not relaunched.
    assert stack.launches(run_id) == {
        ("nap_a", 0): 1,
        ("nap_b", 0): 1,
        ("nap_c", 0): 1,
        ("total", 0): 1,
    }
    assert stack.log("controller-b").count("adopting the running ECS task") == 3
    # Each task's "runs as" event is written once, by the launch (an adopted task gets none
    # again; the first controller may have died before writing one).
    runs_as = Counter(
        e.step_key
        for e in events_of(stack.instance, run_id, DagsterEventType.ENGINE_EVENT)
        if " runs as arn:aws:ecs:" in (e.message or "")
    )
    assert runs_as["total"] == 1 and max(runs_as.values()) == 1, runs_as
    assert not verdicts_of(stack.instance, run_id)
    wait_for(stack.queue_empty, 15, "every message to be deleted")


def test_canceling_a_run_stops_its_ecs_tasks_with_a_reason(stack: Stack) -> None:
    naps = ("nap_a", "nap_b", "nap_c")
    run_config = {"ops": {name: {"config": {"seconds": 120.0}} for name in naps}}
    worker = start_run_worker("slow_fanout", stack.tmp_path, run_config)
    try:
        run = wait_for(lambda: only_run(stack.instance), 60, "the run to start")
        wait_for(
            lambda: (
                {t.step_key for t in stack.harness.running_tasks() if t.run_id == run.run_id}
                == set(naps)
            ),
            90,
            "three naps to run as tasks",
        )
        # Once the ops run: Dagster writes its interrupt failure only for a started step.
        wait_for(
            lambda: len(events_of(stack.instance, run.run_id, DagsterEventType.STEP_START)) == 3,
            90,
            "three naps to start",
        )
        terminate_run(stack.instance, run.run_id, worker)
        tasks = stack.finished(run.run_id, 3)
        assert all(t.stop_code == "UserInitiated" for t in tasks), tasks
        assert all(t.stopped_reason.startswith("dagster-taskiq-controller:") for t in tasks), [
            t.stopped_reason for t in tasks
        ]
        # The agent sends SIGTERM on StopTask; Dagster's interrupt handling then ends the step
        # long before the stop timeout would SIGKILL it.
        assert all(t.exit_code != 137 for t in tasks), tasks
        wait_for(lambda: worker.poll() is not None, 60, "the run worker to exit")
        status = stack.instance.get_run_by_id(run.run_id).status
        assert status == DagsterRunStatus.CANCELED
        # A stop Dagster asked for keeps Dagster's semantics: each step wrote its interrupt
        # failure (the guard passed the SIGTERM on), and no verdict was needed.
        failures = events_of(stack.instance, run.run_id, DagsterEventType.STEP_FAILURE)
        assert {f.step_key for f in failures} == set(naps), failures
        assert all(
            f.dagster_event.step_failure_data.error_source == ErrorSource.INTERRUPT
            for f in failures
        )
        assert not verdicts_of(stack.instance, run.run_id)
        wait_for(stack.queue_empty, 30, "every message to be deleted")
        assert stack.launches(run.run_id) == {(name, 0): 1 for name in naps}
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_spot_interruption_is_a_verdict_and_the_retry_policy_applies(stack: Stack) -> None:
    worker = start_run_worker("outside_stop", stack.tmp_path)
    try:
        run = wait_for(lambda: only_run(stack.instance), 60, "the run to start")
        # Once the op runs: a SIGTERM while the interpreter starts would prove nothing.
        wait_for(
            lambda: events_of(stack.instance, run.run_id, DagsterEventType.STEP_START),
            90,
            "stopped_once to start",
        )
        (task,) = [t for t in stack.harness.running_tasks() if t.run_id == run.run_id]
        stack.harness.interrupt_spot(task.arn)
        assert worker.wait(120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert stack.instance.get_run_by_id(run.run_id).status == DagsterRunStatus.SUCCESS
    # No interrupt failure of the op: the guard in the task ended the step without one ...
    assert not events_of(stack.instance, run.run_id, DagsterEventType.STEP_FAILURE)
    # ... and the controller's verdict names the interruption; the RetryPolicy retried it.
    (verdict,) = verdicts_of(stack.instance, run.run_id)
    metadata = verdict.dagster_event.event_specific_data.metadata
    assert "Fargate Spot interruption" in metadata[contract.META_VERDICT].value
    assert metadata[contract.META_EXIT].value == "ecs SpotInterruption exit code 143"
    (retry,) = events_of(stack.instance, run.run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    assert "Fargate Spot interruption" in retry.dagster_event.step_retry_data.error.message
    tasks = {t.attempt: t for t in stack.finished(run.run_id, 2)}
    assert (tasks[0].stop_code, tasks[0].exit_code) == ("SpotInterruption", 143)
    assert (tasks[1].stop_code, tasks[1].exit_code) == ("EssentialContainerExited", 0)
    assert tasks[0].log_path is not None
    assert "SIGTERM that Dagster did not ask for" in tasks[0].log_path.read_text()
    assert stack.launches(run.run_id) == {("stopped_once", 0): 1, ("stopped_once", 1): 1}
    wait_for(stack.queue_empty, 30, "every message to be deleted")


@pytest.mark.serial  # a wall-clock budget on step work: run alone (see conftest)
def test_an_ecs_step_past_its_timeout_is_stopped_and_retried_by_its_policy(stack: Stack) -> None:
    with execute_job(jobs.recon("timeout_retry"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
    assert stack.launches(run_id) == {("hangs_first_time", 0): 1, ("hangs_first_time", 1): 1}
    # The shim in the task SIGKILLed the step at 10 s and exited 124; no StopTask (its
    # SIGTERM would have made Dagster write an interrupt failure that skips the policy).
    tasks = {t.attempt: t for t in stack.finished(run_id, 2)}
    assert tasks[0].command == SHIM
    assert (tasks[0].stop_code, tasks[0].exit_code) == ("EssentialContainerExited", 124)
    assert (tasks[1].stop_code, tasks[1].exit_code) == ("EssentialContainerExited", 0)
    (verdict,) = verdicts_of(stack.instance, run_id)
    metadata = verdict.dagster_event.event_specific_data.metadata
    assert "timed out after 10.0s" in metadata[contract.META_VERDICT].value
    wait_for(stack.queue_empty, 30, "every message to be deleted")


def test_throttled_run_task_calls_are_retried_and_the_run_succeeds(stack: Stack) -> None:
    stack.harness.throttle_next_run_tasks(6)
    before = stack.harness.throttled_calls
    run_config = {"ops": {n: {"config": {"seconds": 0.1}} for n in ("nap_a", "nap_b", "nap_c")}}
    with execute_job(jobs.recon("slow_fanout"), stack.instance, run_config=run_config) as result:
        assert result.success
        run_id = result.run_id
    assert stack.harness.throttled_calls - before == 6
    assert stack.launches(run_id) == {(s, 0): 1 for s in ("nap_a", "nap_b", "nap_c", "total")}
    assert 'operation="RunTask",result="throttled"' in stack.metrics()
    wait_for(stack.queue_empty, 60, "every message to be deleted")


def test_a_task_that_fails_to_start_is_relaunched_without_a_verdict(stack: Stack) -> None:
    stack.harness.fail_to_start[("*", "flaky_op", 0)] = (
        "CannotPullContainerError: pull image manifest has been retried 5 time(s): not found"
    )
    with execute_job(jobs.recon("flaky"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
    # Attempt 0 got a second task after the first never started; no verdict, so the op's
    # RetryPolicy saw only its own two failures.
    assert stack.launches(run_id) == {("flaky_op", 0): 2, ("flaky_op", 1): 1, ("flaky_op", 2): 1}
    assert not verdicts_of(stack.instance, run_id)
    assert 'reason="never_started"' in stack.metrics()
    wait_for(stack.queue_empty, 60, "every message to be deleted")


def test_an_attempt_whose_task_never_starts_gives_up_with_a_verdict_and_the_run_goes_on(
    stack: Stack,
) -> None:
    # Every task of attempt 0 fails to start: its deliveries run out (--max-attempts 5).
    stack.harness.never_start[("*", "flaky_op", 0)] = "CannotPullContainerError: not found"
    with execute_job(jobs.recon("flaky"), stack.instance) as result:
        # The verdict failed attempt 0 and its RetryPolicy went on: attempt 1 fails as the op
        # does, attempt 2 succeeds.
        assert result.success
        run_id = result.run_id
    assert stack.launches(run_id)[("flaky_op", 0)] == 5
    (verdict,) = verdicts_of(stack.instance, run_id)
    assert "gave up" in verdict.message, verdict.message
    dead = boto3.client("sqs").receive_message(
        QueueUrl=stack.queues.dlq_url, MessageAttributeNames=["All"], WaitTimeSeconds=5
    )["Messages"]
    assert [m["MessageAttributes"]["dagster_taskiq_error"]["StringValue"] for m in dead] == [
        "attempts_exhausted"
    ]


def test_step_args_over_the_overrides_limit_are_offloaded_to_s3(stack: Stack) -> None:
    # The code location's container context travels in every step's ExecuteStepArgs; ~20 KB
    # of incompressible text there is far over ECS's 8192-character overrides limit.
    padding = os.urandom(10_000).hex()
    recon = jobs.recon("slow")
    recon = recon._replace(repository=recon.repository._replace(container_context={"pad": padding}))
    run_config = {"ops": {"sleep_op": {"config": {"seconds": 0.1}}}}
    with execute_job(recon, stack.instance, run_config=run_config) as result:
        assert result.success
        run_id = result.run_id
    (task,) = stack.finished(run_id, 1)
    assert task.command == SHIM
    assert (task.stop_code, task.exit_code) == ("EssentialContainerExited", 0)
    s3 = boto3.client("s3")
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
        if o["Key"].startswith("dagster-taskiq/step-args/")
    ]
    bodies = [s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys]
    # Keyed by the content's sha256, never by the message's task id.
    assert [k.rsplit("/", 1)[1] for k in keys] == [hashlib.sha256(b).hexdigest() for b in bodies]
    # The object is DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS: base64 of zlib of the args' JSON.
    args = [json.loads(zlib.decompress(base64.b64decode(b))) for b in bodies]
    (step_args,) = [a for a in args if a["pipeline_run_id"] == run_id]
    assert len(json.dumps(step_args)) > 20_000
    assert max(len(b) for b in bodies) > 8192
    assert "step args offloaded" in stack.log()
    wait_for(stack.queue_empty, 60, "every message to be deleted")


# Each job's op asks its task for more than the controller allows (jobs.py, "ecs overrides").
REFUSED_OVERRIDES = {
    "ecs_role_override": (
        f"ecs/task_overrides: taskRoleArn {jobs.ECS_ADMIN_ROLE} is not in --ecs-allow-role"
    ),
    "ecs_network_override": (
        "ecs/run_task_kwargs: networkConfiguration is the controller's (--ecs-subnets"
    ),
    "ecs_exec_command": "ecs/run_task_kwargs: enableExecuteCommand may not be turned on by a tag",
}


def dead_letters_of(dlq_url: str, run_id: str) -> list[dict[str, str]]:
    """The run's dead letters (taken off the DLQ)."""
    return take_dead_letters(
        dlq_url,
        1,
        30,
        keep=lambda dead: json.loads(dead["body"])["labels"]["dagster_run_id"] == run_id,
    )


@pytest.mark.parametrize("job_name", sorted(REFUSED_OVERRIDES))
def test_an_op_tag_that_widens_its_task_is_refused_with_a_verdict_and_nothing_runs(
    stack: Stack, job_name: str
) -> None:
    reason = REFUSED_OVERRIDES[job_name]
    step_key = f"{job_name}_op"
    with execute_job(jobs.recon(job_name), stack.instance) as result:
        assert not result.success
        run_id = result.run_id
    # Nothing ran: no RunTask call at all for the run, so no task and no op code.
    assert stack.harness.run_task_requests(run_id) == []
    assert stack.launches(run_id) == {}
    assert not events_of(stack.instance, run_id, DagsterEventType.STEP_START)
    # The verdict names the refused override, and the step failed with it.
    (verdict,) = verdicts_of(stack.instance, run_id)
    assert verdict.step_key == step_key
    metadata = verdict.dagster_event.event_specific_data.metadata
    assert reason in metadata[contract.META_VERDICT].value, metadata[contract.META_VERDICT]
    (failure,) = events_of(stack.instance, run_id, DagsterEventType.STEP_FAILURE)
    assert failure.step_key == step_key
    assert reason in failure.dagster_event.step_failure_data.error.message
    assert stack.instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
    # The message is in the DLQ with the reason, after Dagster was told.
    (dead,) = dead_letters_of(stack.queues.dlq_url, run_id)
    assert dead["dagster_taskiq_error"] == "launch_override_refused"
    assert dead["dagster_taskiq_error_class"] == "poison"
    assert reason in dead["dagster_taskiq_error_detail"], dead
    assert dead["dagster_taskiq_error_detail"].endswith("verdict recorded in Dagster"), dead
    assert 'dagster_taskiq_messages_dead_lettered_total{reason="launch_override_refused"}' in (
        stack.metrics()
    )
    wait_for(stack.queue_empty, 30, "the work queue to be empty")


def test_a_role_the_operator_allows_reaches_run_task_and_the_step_runs(stack: Stack) -> None:
    # The same tag as ecs_role_override, with the role this controller allows.
    assert stack.controller.stop() == 0, stack.log()[-4000:]
    stack.controller = stack.start_controller(
        "controller-b", "--ecs-allow-role", jobs.ECS_ALLOWED_ROLE
    )
    with execute_job(jobs.recon("ecs_allowed_role"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
    (request,) = stack.harness.run_task_requests(run_id)
    assert request.overrides["taskRoleArn"] == jobs.ECS_ALLOWED_ROLE
    # The network is the controller's.
    vpc = request.network_configuration["awsvpcConfiguration"]  # type: ignore[index]
    assert vpc["subnets"] == [stack.harness.subnet_id]
    (task,) = stack.finished(run_id, 1)
    assert (task.stop_code, task.exit_code) == ("EssentialContainerExited", 0)
    assert not verdicts_of(stack.instance, run_id)
    wait_for(stack.queue_empty, 30, "every message to be deleted")


# --- code location images, executor env_vars and secrets ---------------------------------------

IMAGE_B = "registry.example/team-b:7"
IMAGE_C = "registry.example/team-c@sha256:" + "c" * 64
# The prefix a plain string match would let through; the allow-list does not.
REFUSED_IMAGE = "registry.example/team-b-evil:7"
TOKEN_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:api-token-AbCdEf"


def in_image(job_name: str, image: str | None) -> Any:
    """The job as a code location serving it in `image` would hand it to Dagster: the run's
    job_code_origin then carries the image (what the controller reads from the stored run)."""
    recon = jobs.recon(job_name)
    return recon._replace(repository=recon.repository._replace(container_image=image))


def test_each_code_location_image_gets_its_own_task_definition_and_a_refused_one_a_verdict(
    stack: Stack,
) -> None:
    assert stack.controller.stop() == 0, stack.log()[-4000:]
    stack.controller = stack.start_controller(
        "controller-img",
        "--ecs-allow-image-prefix",
        "registry.example/team-b",
        "--ecs-allow-image-prefix",
        "registry.example/team-c",
    )
    secret_config = {
        "execution": {
            "config": {
                "env_vars": ["GREETING=hello"],
                "secrets": [{"name": "API_TOKEN", "valueFrom": TOKEN_ARN}],
            }
        }
    }
    requests = {}
    for name, image, run_config in [
        ("base", None, None),
        ("b", IMAGE_B, None),
        ("b_secret", IMAGE_B, secret_config),
        ("c", IMAGE_C, None),
        ("c_again", IMAGE_C, None),
    ]:
        with execute_job(in_image("ecs_location", image), stack.instance, run_config) as result:
            assert result.success, name
            (requests[name],) = stack.harness.run_task_requests(result.run_id)
    # The controller's own task definition for a run without an image; a copy per image (and
    # per set of secrets) otherwise, each running the run's image.
    assert requests["base"].task_definition == "dagster-step"
    assert requests["base"].image == "dagster-user-code:test"
    for name, image in [("b", IMAGE_B), ("b_secret", IMAGE_B), ("c", IMAGE_C)]:
        assert requests[name].image == image, name
        assert ":task-definition/dagster-step-" in requests[name].task_definition, name
    arns = {name: r.task_definition for name, r in requests.items()}
    assert len({arns["b"], arns["b_secret"], arns["c"]}) == 3, arns
    # Registered once, then reused.
    assert arns["c_again"] == arns["c"]
    ecs = boto3.client("ecs")
    family = arns["c"].rsplit("/", 1)[1].split(":")[0]
    assert len(ecs.list_task_definitions(familyPrefix=family)["taskDefinitionArns"]) == 1
    # The copy keeps the base's sizes and network mode; the secret is in its step container
    # (RunTask overrides cannot carry one), the env var in the overrides.
    copy = ecs.describe_task_definition(taskDefinition=arns["b_secret"])["taskDefinition"]
    assert (copy["cpu"], copy["memory"], copy["networkMode"]) == ("512", "1024", "awsvpc")
    (container,) = copy["containerDefinitions"]
    assert container["secrets"] == [{"name": "API_TOKEN", "valueFrom": TOKEN_ARN}]
    (step_override,) = requests["b_secret"].overrides["containerOverrides"]
    assert {"name": "GREETING", "value": "hello"} in step_override["environment"]
    assert (
        "secrets"
        not in ecs.describe_task_definition(taskDefinition=arns["b"])["taskDefinition"][
            "containerDefinitions"
        ][0]
    )
    metrics = stack.metrics()
    assert 'operation="RegisterTaskDefinition",result="ok"} 3' in metrics, metrics

    # An image outside the allow-list: a verdict, the DLQ, and no task.
    with execute_job(in_image("ecs_location", REFUSED_IMAGE), stack.instance) as result:
        assert not result.success
        run_id = result.run_id
    assert stack.harness.run_task_requests(run_id) == []
    (verdict,) = verdicts_of(stack.instance, run_id)
    text = verdict.dagster_event.event_specific_data.metadata[contract.META_VERDICT].value
    assert REFUSED_IMAGE in text and "--ecs-allow-image-prefix" in text, text
    (dead,) = dead_letters_of(stack.queues.dlq_url, run_id)
    assert dead["dagster_taskiq_error"] == "launch_override_refused"
    wait_for(stack.queue_empty, 30, "every message to be deleted")
