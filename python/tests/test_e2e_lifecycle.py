"""Run lifecycle end to end: cancellation, step timeouts and graceful shutdown, with real
Dagster, a real SQS API (moto), real child processes and real signals. Cancellation and the
warm timeout also run on a PostgreSQL-backed Dagster instance (BOTH_STORAGES)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import jobs
import pytest
from conftest import BOTH_STORAGES, only_run, start_run_worker, terminate_run, wait_for
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, execute_job
from test_e2e_process import WARM_ARGS, Stack, events_of, start_stack

from dagster_taskiq_controller import contract
from dagster_taskiq_controller_testing.stack import Controller

pytestmark = pytest.mark.controller

# A run-status poll interval longer than any test: what stops steps must be the bridge's push.
NO_POLL = ("--run-status-interval", "600")


def records(stack: Stack | Controller, run_id: str | None = None) -> list[dict[str, Any]]:
    controller = stack.controller if isinstance(stack, Stack) else stack
    import json
    import urllib.request

    with urllib.request.urlopen(f"{controller.dashboard_url}/api/v1/steps", timeout=5) as r:
        found = json.load(r)
    return [r for r in found if run_id is None or r["run_id"] == run_id]


def pid_of(record: dict[str, Any]) -> int:
    return int(record["locator"].removeprefix("pid "))


def process_group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def visible_messages(queue_url: str) -> int:
    attributes = boto3.client("sqs").get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack()


@pytest.fixture
def launcher_args() -> tuple[str, ...]:
    """Cold steps, unless a test parametrizes this with WARM_ARGS."""
    return ()


@pytest.fixture
def capped_stack(make_stack: Callable[..., Stack], launcher_args: tuple[str, ...]) -> Stack:
    # No prefetch: the steps beyond the cap stay queued in SQS, not held here. No run-status
    # poll within the test either: the bridge's pushes must do it.
    return make_stack("--max-concurrent", "3", "--prefetch", "0", *NO_POLL, *launcher_args)


@pytest.fixture
def warm_stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack(*WARM_ARGS)


# PostgreSQL: the bridge watches runs through Dagster's own event-log watch there, not its
# SQLite shard watcher; with both launchers (a forked step must be stopped as surely).
@pytest.mark.parametrize(
    ("dagster_storage", "launcher_args"),
    [("sqlite", ()), ("postgres", ()), ("postgres", WARM_ARGS)],
    ids=["sqlite-cold", "postgres-cold", "postgres-warm"],
)
def test_terminating_a_run_stops_its_steps_and_skips_the_queued_ones(
    capped_stack: Stack, tmp_path: Path
) -> None:
    stack = capped_stack
    worker = start_run_worker("wide", tmp_path)
    try:
        run = wait_for(lambda: only_run(stack.instance), 60, "the run to start")

        def three_running_five_queued() -> list[dict[str, Any]] | None:
            running = [r for r in records(stack, run.run_id) if r["state"] == "running"]
            queued = visible_messages(stack.queues.queue_url)
            return running if len(running) == 3 and queued == 5 else None

        running = wait_for(three_running_five_queued, 90, "3 steps running and 5 queued")
        pids = [pid_of(r) for r in running]
        canceled_at = time.monotonic()
        terminate_run(stack.instance, run.run_id, worker)
        wait_for(lambda: all(process_group_gone(p) for p in pids), 5, "steps to be stopped")
        stopped_within = time.monotonic() - canceled_at
        assert stopped_within < 5
        # Told by the bridge's watch (the run-status poll is off).
        assert stack.metric('bridge_pushes_total{kind="run_ended"}') >= 1

        wait_for(
            lambda: stack.queue_empty(),
            30,
            "the queued messages to be acknowledged",
        )
        # A record settles a moment after its message's delete: wait until none is active.
        seen = wait_for(
            lambda: (s := records(stack, run.run_id)) and not any(r["active"] for r in s) and s,
            30,
            "every step record to settle",
        )
        skipped = [r for r in seen if r["state"] == "skipped"]
        assert len(skipped) == 5, seen
        assert all(r["locator"] is None for r in skipped), "a queued step was spawned"
        assert worker.wait(60) is not None
        final = wait_for(
            lambda: (
                stack.instance.get_run_by_id(run.run_id).status
                in (DagsterRunStatus.CANCELED, DagsterRunStatus.FAILURE)
                and stack.instance.get_run_by_id(run.run_id).status
            ),
            30,
            "the run to end",
        )
        assert final == DagsterRunStatus.CANCELED
        # The stopped steps were settled (not fenced, not left running), and no process of
        # any step of the run is left.
        stopped = {r["step_key"]: r["state"] for r in seen if r["locator"] is not None}
        assert stopped == {r["step_key"]: "acked" for r in running}, stopped
        assert all(process_group_gone(pid_of(r)) for r in seen if r["locator"])
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_an_interrupted_run_worker_terminates_its_steps_through_the_executor(
    make_stack: Callable[..., Stack], instance: DagsterInstance, tmp_path: Path
) -> None:
    """SIGINT to a run worker whose run is not canceling: Dagster's executor calls
    terminate_step for each running step, and the controller stops each one at once."""
    stack = make_stack(*NO_POLL)
    worker = start_run_worker("wide", tmp_path)
    try:
        run = wait_for(lambda: only_run(instance), 60, "the run to start")
        running = wait_for(
            lambda: (
                found
                if len(found := [r for r in records(stack, run.run_id) if r["state"] == "running"])
                == 8
                else None
            ),
            90,
            "8 steps running",
        )
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED
        interrupted_at = time.monotonic()
        worker.send_signal(signal.SIGINT)
        wait_for(
            lambda: all(process_group_gone(pid_of(r)) for r in running), 5, "steps to be stopped"
        )
        assert time.monotonic() - interrupted_at < 5
        wait_for(lambda: worker.poll() is not None, 60, "the run worker to exit")
        wait_for(stack.queue_empty, 30, "the messages to be acknowledged")
        seen = records(stack, run.run_id)
        assert {r["state"] for r in seen} == {"acked"}, seen
        assert all(r["stop_reason"] == {"kind": "executor"} for r in seen), seen
        assert stack.metric('bridge_pushes_total{kind="terminate_step"}') >= 8
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def check_timed_out_and_retried(stack: Stack, job_name: str, limit: float) -> None:
    with execute_job(jobs.recon(job_name), stack.instance) as result:
        assert result.success
        run_id = result.run_id
    verdicts = [
        e.dagster_event.event_specific_data.metadata
        for e in events_of(stack.instance, run_id, DagsterEventType.ENGINE_EVENT)
        if contract.META_VERDICT in e.dagster_event.event_specific_data.metadata
    ]
    assert len(verdicts) == 1
    assert f"timed out after {limit:.1f}s" in verdicts[0][contract.META_VERDICT].value
    (first,) = [r for r in records(stack, run_id) if r["attempt"] == 0]
    history = {entry["state"]: entry["at"] for entry in first["history"]}
    ran = datetime.fromisoformat(history["exited"]) - datetime.fromisoformat(history["running"])
    assert limit - 0.1 <= ran.total_seconds() < limit + 6, ran
    (stats,) = stack.instance.get_run_step_stats(run_id)
    assert stats.attempts == 2


# SQLite only: on PostgreSQL the warm variant below covers the timeout's verdict and retry (the
# launcher does not change what the storage sees), without 10 more serial seconds.
@pytest.mark.serial  # a wall-clock budget on step work: run alone (see conftest)
def test_a_step_past_its_timeout_is_killed_and_retried_by_its_policy(stack: Stack) -> None:
    # Cold: Dagster's own start-up is inside the timeout, so 10 s (jobs.hangs_first_time).
    check_timed_out_and_retried(stack, "timeout_retry", 10.0)


@pytest.mark.serial  # a wall-clock budget on step work: run alone (see conftest)
@BOTH_STORAGES
def test_a_warm_step_past_a_3s_timeout_is_killed_and_retried_by_its_policy(
    warm_stack: Stack,
) -> None:
    check_timed_out_and_retried(warm_stack, "timeout_retry_3s", 3.0)


@pytest.mark.serial  # a wall-clock budget on step work: run alone (see conftest)
def test_sigterm_drains_then_hands_the_unfinished_step_to_another_controller(
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    first = start_stack(
        aws_env,
        dagster_home,
        instance,
        monkeypatch,
        tmp_path,
        args=("--shutdown-grace", "10", "--log-format", "json"),
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        with execute_job(jobs.recon("shutdown_mix"), instance) as result:
            outcome["success"] = result.success
            outcome["run_id"] = result.run_id

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    second = None
    try:
        wait_for(
            lambda: len([r for r in records(first) if r["state"] == "running"]) == 3,
            60,
            "three steps running",
        )
        first.controller.signal(signal.SIGTERM)
        assert first.controller.process is not None
        assert first.controller.process.wait(30) == 0
        by_step = {r["step_key"]: r for r in records_from_log(first)}
        assert by_step["quick_a"]["state"] == "acked", by_step
        assert by_step["quick_b"]["state"] == "acked", by_step
        assert by_step["lengthy"]["state"] == "released", by_step

        second = Controller(
            queue_url=first.queues.queue_url,
            env={**aws_env, "DAGSTER_HOME": str(dagster_home)},
            args=("--receive-wait", "1"),
            log_path=tmp_path / "second.log",
        ).start()
        runner.join(90)
        assert outcome.get("success") is True
        # The run ends when Dagster has the step's success; the controller acks just after.
        wait_for(
            lambda: (
                [(r["receive_count"], r["state"]) for r in lengthy_records(second)]
                == [(2, "acked")]
            ),
            30,
            "the relaunched step to be acknowledged",
        )
        starts = events_of(instance, outcome["run_id"], DagsterEventType.STEP_START)
        assert sorted(e.step_key for e in starts) == ["lengthy", "lengthy", "quick_a", "quick_b"]
    finally:
        first.controller.stop()
        if second is not None:
            assert second.stop() == 0


def lengthy_records(controller: Controller) -> list[dict[str, Any]]:
    return [r for r in records(controller) if r["step_key"] == "lengthy"]


def records_from_log(stack: Stack) -> list[dict[str, Any]]:
    """What a stopped controller did with each step: its "message settled" log lines."""
    import json

    states: dict[str, dict[str, Any]] = {}
    assert stack.controller.log_path is not None
    for line in stack.controller.log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == "message settled":
            states[entry["span"]["step_key"]] = {"state": entry["state"]}
    return [{"step_key": k, **v} for k, v in states.items()]


@pytest.mark.serial  # a wall-clock budget on step work: run alone (see conftest)
def test_sigterm_releases_held_messages_to_another_controller_at_once(
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    first = start_stack(
        aws_env,
        dagster_home,
        instance,
        monkeypatch,
        tmp_path,
        args=("--launch-rate", "1", "--launch-burst", "1", "--shutdown-grace", "1"),
    )
    worker = start_run_worker("wide", tmp_path)
    second = None
    try:
        run = wait_for(lambda: only_run(instance), 60, "the run to start")

        def admitted_not_started() -> list[dict[str, Any]] | None:
            seen = records(first, run.run_id)
            admitted = [r for r in seen if r["state"] == "admitted"]
            return admitted if len(seen) == 8 and len(admitted) >= 3 else None

        # The launch rate (1/s) keeps most of them waiting to start.
        held = wait_for(admitted_not_started, 60, "all 8 messages held, 3 or more not started")
        second = Controller(
            queue_url=first.queues.queue_url,
            env={**aws_env, "DAGSTER_HOME": str(dagster_home)},
            # A long poll is waiting when the messages come back, as in production; 2 s, not
            # 20: its drain at the end waits for the poll in flight.
            args=("--receive-wait", "2"),
            log_path=tmp_path / "second.log",
        ).start()
        released_at = time.monotonic()
        first.controller.signal(signal.SIGTERM)
        held_keys = {r["step_key"] for r in held}
        # Moto re-checks a long poll for messages made visible by ChangeMessageVisibility
        # only once a second (it wakes pollers only on new messages), and the first
        # controller's last long poll may catch them and give them back once more: up to two
        # such ticks here, where real SQS answers at once.
        wait_for(
            lambda: held_keys <= {r["step_key"] for r in records(second, run.run_id)},
            3,
            "the second controller to receive the released messages",
        )
        assert time.monotonic() - released_at < 3
        terminate_run(instance, run.run_id, worker)
        wait_for(lambda: worker.poll() is not None, 60, "the run worker to exit")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        first.controller.stop()
        if second is not None:
            assert second.stop() == 0
