"""The step's SIGTERM guard (dagster_taskiq_controller.stop_guard): Dagster's interrupt context
managers leave its handler alone, it asks the instance whether Dagster wants the attempt
stopped, and an infrastructure stop ends the step's whole group with exit code 143. The end to
end proofs are in test_e2e_process.py and test_e2e_ecs.py (outside SIGTERM, Spot interruption)."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import jobs
import pytest
from conftest import wait_for
from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.events import EngineEventData
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._core.storage.dagster_run import DagsterRun
from dagster._grpc.types import ExecuteStepArgs

from dagster_taskiq_controller import contract, stop_guard


def _python(code: str, sigint_ignored: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # As when the controller was started in the background by a shell without job control.
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if sigint_ignored
        else None,
    )


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_dagsters_interrupt_handling_leaves_sigterm_to_the_guard(sigint_ignored: bool) -> None:
    # Its own process: install() patches Dagster for the rest of the process's life. A step
    # that inherited an ignored SIGINT gets Dagster's interrupt back.
    result = _python(
        "import signal\n"
        "from dagster._utils.interrupts import capture_interrupts, raise_interrupts_as\n"
        "from dagster_taskiq_controller import stop_guard\n"
        "stop_guard.install()\n"
        "with capture_interrupts():\n"
        "    with raise_interrupts_as(KeyboardInterrupt):\n"
        "        assert signal.getsignal(signal.SIGTERM) is stop_guard._on_sigterm\n"
        "    assert signal.getsignal(signal.SIGTERM) is stop_guard._on_sigterm\n"
        "assert signal.getsignal(signal.SIGTERM) is stop_guard._on_sigterm\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "print('ok')\n",
        sigint_ignored,
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_an_infrastructure_stop_ends_the_whole_group_with_143() -> None:
    step = (
        "import subprocess, sys, time\n"
        "from dagster_taskiq_controller import stop_guard\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(g.pid, flush=True)\n"
        "stop_guard.stop_now('the test stops it')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", step],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # leads its group, as a step does
    )
    assert proc.stdout is not None and proc.stderr is not None
    grandchild = int(proc.stdout.readline())
    assert proc.wait(30) == stop_guard.EXIT_STOPPED_FROM_OUTSIDE == 143
    assert "stop_guard: the test stops it" in proc.stderr.read()
    wait_for(lambda: not _alive(grandchild), 10, "the grandchild to be killed")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _env(instance: DagsterInstance, run_id: str, step_key: str, attempt: int) -> dict[str, str]:
    args = ExecuteStepArgs(
        job_origin=jobs.recon("slow").get_python_origin(),
        run_id=run_id,
        step_keys_to_execute=[step_key],
        instance_ref=instance.get_ref(),
        retry_mode=RetryMode.ENABLED,
        known_state=KnownExecutionState(previous_retry_attempts={step_key: attempt}),
    )
    return {e["name"]: e["value"] for e in args.get_command_env()}


def test_only_a_stop_dagster_asked_for_counts_as_requested(instance: DagsterInstance) -> None:
    run = instance.add_run(
        DagsterRun(job_name="slow", run_id=str(uuid.uuid4()), status=DagsterRunStatus.STARTED)
    )
    attempt_0 = _env(instance, run.run_id, "sleep_op", 0)
    attempt_1 = _env(instance, run.run_id, "sleep_op", 1)
    assert stop_guard.stop_requested_by_dagster(attempt_0) is None

    # The executor's terminate_step for attempt 1 asks for that attempt only.
    task_id = contract.step_task_id(run.run_id, "sleep_op", 1)
    instance.report_engine_event(
        "terminate",
        run,
        EngineEventData(metadata=contract.terminate_metadata(task_id=task_id, attempt=1)),
        step_key="sleep_op",
    )
    assert stop_guard.stop_requested_by_dagster(attempt_0) is None
    assert "terminate attempt 1" in (stop_guard.stop_requested_by_dagster(attempt_1) or "")

    instance.report_run_canceling(run)
    assert stop_guard.stop_requested_by_dagster(attempt_0) == "the run is CANCELING"

    gone = _env(instance, str(uuid.uuid4()), "sleep_op", 0)
    assert "is gone" in (stop_guard.stop_requested_by_dagster(gone) or "")


def test_a_sigterm_during_a_requested_stop_is_dagsters_interrupt() -> None:
    # The guard's own decision thread (not the instance check): with a stop Dagster asked for,
    # SIGTERM becomes the SIGINT Dagster interrupts on.
    result = _python(
        "import os, signal, time\n"
        "from dagster_taskiq_controller import stop_guard\n"
        "stop_guard.stop_requested_by_dagster = lambda env: 'the run is CANCELING'\n"
        "stop_guard.install()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n"
    )
    assert result.stdout.strip() == "interrupted", result.stderr
    assert "the run is CANCELING: interrupting the step" in result.stderr


def test_a_stop_whose_cancel_this_read_does_not_show_yet_is_still_dagsters() -> None:
    # The first look trails the write the stop followed (the run's CANCELING); a later look
    # shows it, and the stop is Dagster's interrupt, not one from outside.
    result = _python(
        "import os, signal, time\n"
        "from dagster_taskiq_controller import stop_guard\n"
        "answers = [None, None, 'the run is CANCELING']\n"
        "stop_guard.stop_requested_by_dagster = lambda env: answers.pop(0)\n"
        "stop_guard.install()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', len(answers))\n"
    )
    assert result.stdout.strip() == "interrupted 0", result.stderr
    assert "did not ask for" not in result.stderr
