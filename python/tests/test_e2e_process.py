"""End to end: real Dagster jobs through a real SQS API (moto server) and the controller binary,
each step a real `dagster api execute_step` child process: started cold, or forked from the warm
pool's zygote (every test runs with both launchers). The core ones also run on a
PostgreSQL-backed Dagster instance (BOTH_STORAGES)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import jobs
import pytest
from conftest import (
    BOTH_STORAGES,
    child_env,
    only_run,
    start_run_worker,
    take_dead_letters,
    wait_for,
)
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, execute_job

from dagster_taskiq_controller import contract
from dagster_taskiq_controller_testing.stack import Controller, Queues, create_queues, metric_value

pytestmark = pytest.mark.controller


@dataclass
class Stack:
    queues: Queues
    controller: Controller
    instance: DagsterInstance

    def queue_empty(self, url: str | None = None) -> bool:
        attributes = boto3.client("sqs").get_queue_attributes(
            QueueUrl=url or self.queues.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return all(v == "0" for v in attributes.values())

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.controller.dashboard_url}{path}", timeout=5) as r:
            return json.load(r)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.controller.dashboard_url}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        """The value of one metric, summed over its labels (0 when absent); the warm pool's
        are labelled by Python environment, of which these tests have one."""
        return metric_value(self.metrics(), name)

    def zygote_pid(self) -> int:
        return int(self.metric("warm_pool_zygote_pid"))


# Warm: the zygote preloads the tests' job file, as a deployment would preload its code location.
WARM_ARGS = ("--warm-pool", "--warm-preload", jobs.__file__)


@pytest.fixture(params=["cold", "warm"])
def launcher_args(request: pytest.FixtureRequest) -> tuple[str, ...]:
    return WARM_ARGS if request.param == "warm" else ()


def start_stack(
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: tuple[str, ...] = (),
    visibility_timeout: int = 30,
) -> Stack:
    queues = create_queues(
        aws_env["AWS_ENDPOINT_URL"],
        f"steps-{uuid.uuid4().hex[:10]}",
        visibility_timeout=visibility_timeout,
    )
    monkeypatch.setenv("DAGSTER_TASKIQ_SQS_QUEUE_URL", queues.queue_url)
    controller = Controller(
        queue_url=queues.queue_url,
        env={**aws_env, "DAGSTER_HOME": str(dagster_home)},
        args=("--receive-wait", "1", "--shutdown-grace", "10", *args),
        log_path=tmp_path / "controller.log",
    )
    controller.start()
    s = Stack(queues=queues, controller=controller, instance=instance)
    if "--warm-pool" in args and "--python-for-unmapped" not in args:
        # Steps should find it ready (a step launched before would run cold: still correct).
        # Only --python's zygote starts at once, and not when unmapped locations are refused.
        wait_for(s.zygote_pid, 60, "the warm zygote to be ready")
    return s


@pytest.fixture
def stack(make_stack: Callable[..., Stack], launcher_args: tuple[str, ...]) -> Stack:
    return make_stack(*launcher_args)


def events_of(instance: DagsterInstance, run_id: str, event_type: DagsterEventType) -> list[Any]:
    return [
        r.event_log_entry
        for r in instance.get_records_for_run(run_id, of_type=event_type, limit=10_000).records
    ]


def step_pids(instance: DagsterInstance, run_id: str) -> dict[str, int]:
    pids = {}
    for entry in events_of(instance, run_id, DagsterEventType.STEP_OUTPUT):
        metadata = entry.dagster_event.event_specific_data.metadata
        pids[entry.step_key] = metadata["pid"].value
    return pids


@BOTH_STORAGES
def test_diamond_runs_every_step_in_its_own_process(stack: Stack) -> None:
    with execute_job(jobs.recon("diamond"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
        # Values flowed between steps through the filesystem IO manager.
        assert result.output_for_node("report") == ((1 + 1) + (1 * 2) + (1 * 1)) * 10
    pids = step_pids(stack.instance, run_id)
    assert set(pids) == {"emit", "add_one", "double", "square", "join", "report"}
    assert len(set(pids.values())) == len(pids), f"steps shared a process: {pids}"
    wait_for(stack.queue_empty, 60, "every message to be deleted")
    # Deletion comes a moment before the record says "acked".
    records = wait_for(
        lambda: [
            r for r in stack.api("/api/v1/steps") if r["run_id"] == run_id and not r["active"]
        ],
        30,
        "the step records to settle",
    )
    assert sorted(r["step_key"] for r in records) == sorted(pids)
    assert all(r["state"] == "acked" for r in records), records


@BOTH_STORAGES
def test_a_dynamic_fan_out_in_a_graph_runs_each_mapped_step_in_its_own_process(
    stack: Stack,
) -> None:
    """Mapped steps (`stage.process_item[item_1]`) carry op tags the controller checks
    against the run's stored plan, which keeps them unresolved: each runs, none is refused."""
    with execute_job(jobs.recon("dynamic_fan"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
        assert result.output_for_node("stage") == 60
    pids = step_pids(stack.instance, run_id)
    mapped = {f"stage.process_item[item_{i}]" for i in (1, 2, 3)}
    assert mapped | {"stage.split", "stage.sum_items"} == set(pids), pids
    assert len(set(pids.values())) == len(pids), f"steps shared a process: {pids}"
    wait_for(stack.queue_empty, 60, "every message to be deleted")
    assert stack.queue_empty(stack.queues.dlq_url), "no step was refused"


@BOTH_STORAGES
def test_an_op_that_raises_fails_the_run_with_its_error(stack: Stack) -> None:
    with execute_job(jobs.recon("failing"), stack.instance) as result:
        assert not result.success
        run_id = result.run_id
    failures = events_of(stack.instance, run_id, DagsterEventType.STEP_FAILURE)
    assert [f.step_key for f in failures] == ["boom"]
    error = failures[0].dagster_event.step_failure_data.error
    assert "boom" in error.message
    wait_for(stack.queue_empty, 60, "every message to be deleted")


# The launcher is not the subject of the next three (a retry's message, the lease, the decoder):
# they run warm only, the cheaper launcher; the cold launcher's runs are the tests above.


def test_retry_policy_attempts_each_arrive_as_their_own_message(warm_stack: Stack) -> None:
    stack = warm_stack
    with execute_job(jobs.recon("flaky"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
    (stats,) = [s for s in stack.instance.get_run_step_stats(run_id) if s.step_key == "flaky_op"]
    assert stats.attempts == 3
    records = [
        r
        for r in stack.api("/api/v1/steps")
        if r["run_id"] == run_id and r["step_key"] == "flaky_op"
    ]
    assert sorted(r["attempt"] for r in records) == [0, 1, 2]
    assert len({r["task_id"] for r in records}) == 3
    assert len({r["message_id"] for r in records}) == 3
    wait_for(stack.queue_empty, 60, "every message to be deleted")


@BOTH_STORAGES
def test_a_step_killed_by_sigkill_gets_a_verdict_and_is_retried(stack: Stack) -> None:
    with execute_job(jobs.recon("self_kill"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
    verdicts = [
        e
        for e in events_of(stack.instance, run_id, DagsterEventType.ENGINE_EVENT)
        if e.step_key == "kill_self"
        and contract.META_VERDICT in e.dagster_event.event_specific_data.metadata
    ]
    assert len(verdicts) == 1
    metadata = verdicts[0].dagster_event.event_specific_data.metadata
    assert "signal 9" in metadata[contract.META_VERDICT].value
    assert metadata[contract.META_ATTEMPT].value == 0
    retries = events_of(stack.instance, run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    assert [r.step_key for r in retries] == ["kill_self"]
    wait_for(stack.queue_empty, 60, "every message to be deleted")


def test_an_outside_sigterm_to_a_step_is_a_verdict_and_the_retry_policy_applies(
    stack: Stack, tmp_path: Path
) -> None:
    """A SIGTERM to the step process that neither Dagster nor the controller asked for (a host
    shutting down, an operator's kill) is an infrastructure stop, not the op's failure."""
    worker = start_run_worker("outside_stop", tmp_path)
    try:
        run = wait_for(lambda: only_run(stack.instance), 60, "the run to start")
        # Once the op runs: a SIGTERM while the interpreter starts would prove nothing.
        wait_for(
            lambda: events_of(stack.instance, run.run_id, DagsterEventType.STEP_START),
            90,
            "stopped_once to start",
        )
        (record,) = [
            r
            for r in stack.api("/api/v1/steps")
            if r["run_id"] == run.run_id and r["state"] == "running"
        ]
        os.kill(int(record["locator"].removeprefix("pid ")), signal.SIGTERM)
        assert worker.wait(120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert stack.instance.get_run_by_id(run.run_id).status == DagsterRunStatus.SUCCESS
    # No interrupt failure of the op; the controller's verdict names the stop instead, and
    # the RetryPolicy retried the step.
    assert not events_of(stack.instance, run.run_id, DagsterEventType.STEP_FAILURE)
    (verdict,) = [
        e.dagster_event.event_specific_data.metadata
        for e in events_of(stack.instance, run.run_id, DagsterEventType.ENGINE_EVENT)
        if contract.META_VERDICT in e.dagster_event.event_specific_data.metadata
    ]
    assert "SIGTERM that neither Dagster nor the controller" in verdict[contract.META_VERDICT].value
    assert verdict[contract.META_EXIT].value == "exit code 143"
    assert "SIGTERM that Dagster did not ask for" in verdict[contract.META_STDERR_TAIL].value
    (retry,) = events_of(stack.instance, run.run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    assert "infrastructure stop" in retry.dagster_event.step_retry_data.error.message
    wait_for(stack.queue_empty, 60, "every message to be deleted")


def test_a_step_longer_than_the_visibility_timeout_is_not_redelivered(
    make_stack: Callable[..., Stack], instance: DagsterInstance
) -> None:
    s = make_stack("--visibility-timeout", "2", *WARM_ARGS, visibility_timeout=2)
    run_config = {"ops": {"sleep_op": {"config": {"seconds": 7.0}}}}
    with execute_job(jobs.recon("slow"), instance, run_config=run_config) as result:
        assert result.success
        run_id = result.run_id
    starts = events_of(instance, run_id, DagsterEventType.STEP_START)
    assert [e.step_key for e in starts] == ["sleep_op"]
    assert "dagster_taskiq_messages_received_total 1" in s.metrics()
    assert 'result="extended"' in s.metrics()
    wait_for(s.queue_empty, 60, "the message to be deleted")


def test_a_malformed_message_is_dead_lettered_and_the_next_one_runs(warm_stack: Stack) -> None:
    stack = warm_stack
    sqs = boto3.client("sqs")
    sqs.send_message(QueueUrl=stack.queues.queue_url, MessageBody='{"task_id": "x", "oops"')
    with execute_job(jobs.recon("flaky"), stack.instance) as result:
        assert result.success

    (dead,) = take_dead_letters(stack.queues.dlq_url, 1, 15)
    assert dead["body"] == '{"task_id": "x", "oops"'
    assert dead["dagster_taskiq_error"] == "invalid_json"
    assert "not valid JSON" in dead["dagster_taskiq_error_detail"]
    assert 'dagster_taskiq_messages_dead_lettered_total{reason="invalid_json"} 1' in stack.metrics()
    wait_for(stack.queue_empty, 60, "the work queue to be empty")


# --- warm pool only ----------------------------------------------------------------------------


@pytest.fixture
def warm_stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack(*WARM_ARGS)


def test_warm_steps_do_not_inherit_each_others_global_state(warm_stack: Stack) -> None:
    zygote = warm_stack.zygote_pid()
    for _ in range(2):
        # pollute runs in both runs: the second run's copy must see a clean process too.
        with execute_job(jobs.recon("polluting"), warm_stack.instance) as result:
            assert result.success, [
                e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"
            ]
            pids = step_pids(warm_stack.instance, result.run_id)
        assert set(pids) == {"pollute", "check_clean"}
        assert zygote not in pids.values()
    assert warm_stack.metric("warm_pool_forks_total") == 4
    assert "dagster_taskiq_warm_pool_fallbacks_total" not in warm_stack.metrics()
    assert warm_stack.zygote_pid() == zygote


def test_a_warm_step_that_sigkills_itself_leaves_the_zygote_serving(warm_stack: Stack) -> None:
    zygote = warm_stack.zygote_pid()
    with execute_job(jobs.recon("self_kill"), warm_stack.instance) as result:
        assert result.success
    # Both attempts forked from the same zygote: the SIGKILL took down only its own step.
    assert warm_stack.metric("warm_pool_forks_total") == 2
    assert warm_stack.metric("warm_pool_zygote_deaths_total") == 0
    assert warm_stack.zygote_pid() == zygote
    os.kill(zygote, 0)  # still alive
    with execute_job(jobs.recon("flaky"), warm_stack.instance) as result:
        assert result.success
    assert warm_stack.metric("warm_pool_forks_total") == 5


def test_a_zygote_killed_mid_run_is_replaced_and_the_run_succeeds(warm_stack: Stack) -> None:
    old = warm_stack.zygote_pid()
    outcome: dict[str, Any] = {}

    def run() -> None:
        run_config = {"ops": {"sleep_op": {"config": {"seconds": 3.0}}}}
        with execute_job(
            jobs.recon("slow_then_more"), warm_stack.instance, run_config=run_config
        ) as result:
            outcome["success"] = result.success
            outcome["pids"] = step_pids(warm_stack.instance, result.run_id)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        wait_for(
            lambda: any(
                r["step_key"] == "sleep_op" and r["state"] == "running"
                for r in warm_stack.api("/api/v1/steps")
            ),
            30,
            "sleep_op to be running",
        )
        os.kill(old, signal.SIGKILL)
        # The running step survives its zygote; a new zygote serves the next step.
        new = wait_for(
            lambda: (pid := warm_stack.zygote_pid()) not in (0, old) and pid, 60, "a new zygote"
        )
    finally:
        runner.join(120)
    assert not runner.is_alive()
    assert outcome["success"]
    assert set(outcome["pids"]) == {"sleep_op", "after_sleep"}
    assert warm_stack.metric("warm_pool_zygote_deaths_total") == 1
    assert warm_stack.metric("warm_pool_forks_total") == 2
    assert new != old
    wait_for(warm_stack.queue_empty, 10, "every message to be deleted")


def test_a_warm_step_leaves_no_process_behind_and_its_output_is_still_captured(
    warm_stack: Stack,
) -> None:
    with execute_job(jobs.recon("stray_process"), warm_stack.instance) as result:
        assert result.success
        stray = result.output_for_node("leave_stray")
        run_id = result.run_id
    (output,) = events_of(warm_stack.instance, run_id, DagsterEventType.STEP_OUTPUT)
    group = json.loads(output.dagster_event.event_specific_data.metadata["group"].value)
    # Dagster mirrors stdout and stderr with one tail each; the zygote stands in for the orphan
    # watcher interpreters Dagster would start next to them.
    assert sum(command.startswith("tail -F") for command in group) == 2, group
    assert not any("watch_orphans" in command for command in group), group
    # The sleep the step left in its group was killed when the step ended.
    wait_for(lambda: not _alive(stray), 10, "the stray process to be killed")
    manager = warm_stack.instance.compute_log_manager
    (captured,) = events_of(warm_stack.instance, run_id, DagsterEventType.LOGS_CAPTURED)
    file_key = captured.dagster_event.event_specific_data.file_key
    stdout = manager.get_log_data(manager.build_log_key_for_run(run_id, file_key)).stdout or b""
    assert jobs.STRAY_GREETING in stdout.decode()


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (PID 1 here may not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_warm_steps_and_the_zygote_die_with_the_controller(
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    s = start_stack(aws_env, dagster_home, instance, monkeypatch, tmp_path, WARM_ARGS)
    config = tmp_path / "run.yaml"
    config.write_text("ops:\n  sleep_op:\n    config:\n      seconds: 120\n")
    # The run worker in its own process: it waits for the step forever once the controller is
    # gone, so it is killed at the end.
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster",
            "job",
            "execute",
            "-f",
            jobs.__file__,
            "-j",
            "slow",
            "-c",
            str(config),
        ],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        zygote = s.zygote_pid()

        def step_pid() -> int | None:
            for r in s.api("/api/v1/steps"):
                if r["step_key"] == "sleep_op" and r["state"] == "running" and r["locator"]:
                    return int(r["locator"].split()[1])
            return None

        pid = wait_for(step_pid, 60, "sleep_op to be running")
        assert _alive(pid) and _alive(zygote)
        assert s.controller.process is not None
        s.controller.process.kill()
        s.controller.process.wait()
        wait_for(lambda: not _alive(pid), 10, "the step to die with the controller")
        wait_for(lambda: not _alive(zygote), 10, "the zygote to die with the controller")
    finally:
        run.kill()
        run.wait()
        s.controller.stop()
