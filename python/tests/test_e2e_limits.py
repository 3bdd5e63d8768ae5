"""End to end: per-step memory limits (op tag dagster-taskiq/memory) on process and warm steps,
through a real SQS API (moto server), the controller binary and real Dagster runs.

Which enforcement runs depends on the host (docs/operations.md, "Step resource limits"): the
address-space rlimit runs everywhere and is tested cold and warm; the cgroup v2 path needs a
cgroup2 hierarchy with the memory controller. The cgroup test mounts a cgroup2 file system of
its own (root, and a kernel that allows it, are required: it fails otherwise) and, where the
memory controller is bound elsewhere (a host still on cgroup v1 for memory), checks the
controller refuses a step cgroup root without it rather than running steps unlimited."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jobs
import pytest
from conftest import wait_for
from dagster import DagsterEventType, execute_job
from test_e2e_process import WARM_ARGS, Stack, events_of

from dagster_taskiq_controller import contract
from dagster_taskiq_controller_testing.stack import Controller

pytestmark = pytest.mark.controller

OUT_OF_MEMORY_KEY = "dagster_taskiq_controller/out_of_memory"
LIMIT = f"out of memory: {jobs.HOG_LIMIT_MIB} MiB limit"
RUN_CONFIG = {"ops": {"neighbour": {"config": {"seconds": 1.0}}}}


def error_classes(error: Any) -> list[str]:
    """The class names of an error and its causes."""
    names = []
    while error is not None:
        names.append(error.cls_name)
        error = error.cause
    return names


def engine_metadata(stack: Stack, run_id: str, step_key: str, key: str) -> list[str]:
    """The values of `key` in the step's engine events."""
    values = []
    for e in events_of(stack.instance, run_id, DagsterEventType.ENGINE_EVENT):
        metadata = e.dagster_event.event_specific_data.metadata
        if e.step_key == step_key and key in metadata:
            values.append(metadata[key].value)
    return values


def run_memory_hog(stack: Stack) -> str:
    """Runs memory_hog: hog fails once for its limit and is retried, the neighbour finishes."""
    with execute_job(jobs.recon("memory_hog"), stack.instance, run_config=RUN_CONFIG) as result:
        assert result.success
        run_id = result.run_id
    retried = events_of(stack.instance, run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    assert [e.step_key for e in retried] == ["hog"]
    successes = events_of(stack.instance, run_id, DagsterEventType.STEP_SUCCESS)
    assert sorted(e.step_key for e in successes) == ["hog", "neighbour"]
    # The neighbour ran once, unharmed, beside the failing attempt; hog ran twice.
    started = events_of(stack.instance, run_id, DagsterEventType.STEP_START)
    assert sorted(e.step_key for e in started) == ["hog", "neighbour"]
    restarted = events_of(stack.instance, run_id, DagsterEventType.STEP_RESTARTED)
    assert [e.step_key for e in restarted] == ["hog"]
    return run_id


@pytest.mark.parametrize("launcher", ["cold", "warm"])
def test_a_step_past_its_memory_limit_fails_alone_and_is_retried(
    make_stack: Callable[..., Stack], launcher: str
) -> None:
    """Address-space rlimit mode (--step-cgroup off, as on a host with no delegated cgroup):
    hog's 512 MiB allocation fails under its 256 MiB limit, Dagster records the MemoryError and
    the RetryPolicy retries it; the controller adds an engine event naming the limit."""
    args = ("--step-cgroup", "off", *(WARM_ARGS if launcher == "warm" else ()))
    stack = make_stack(*args)
    run_id = run_memory_hog(stack)
    (retry,) = events_of(stack.instance, run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    assert "MemoryError" in error_classes(retry.dagster_event.event_specific_data.error)
    # Written when the controller concludes attempt 0, which may trail the retry's start.
    (note,) = wait_for(
        lambda: engine_metadata(stack, run_id, "hog", OUT_OF_MEMORY_KEY),
        30,
        "the out-of-memory engine event",
    )
    assert note.startswith(f"{LIMIT} (address-space rlimit"), note
    # No verdict: Dagster had the attempt's outcome.
    assert engine_metadata(stack, run_id, "hog", contract.META_VERDICT) == []
    log = stack.controller.log_path.read_text()  # type: ignore[union-attr]
    assert "step resource limits: address-space rlimit (RLIMIT_AS), --step-cgroup off" in log
    (record,) = [
        r
        for r in stack.api("/api/v1/steps")
        if r["run_id"] == run_id and r["step_key"] == "hog" and r["attempt"] == 0
    ]
    assert record["verdict"] == note
    assert stack.metric("steps_out_of_memory_total") == 1


@pytest.fixture
def cgroup2(tmp_path: Path) -> Iterator[Path]:
    """A cgroup2 file system mounted for this test, and a child cgroup of it for the steps."""
    mount = tmp_path / "cgroup2"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "cgroup2", "none", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"cannot mount cgroup2 (the cgroup test needs root and a kernel that allows it): "
            f"{mounted.stderr.strip()}"
        )
    steps = mount / f"dagster-taskiq-test-{uuid.uuid4().hex[:8]}"
    try:
        steps.mkdir()
        yield steps
    finally:
        for child in sorted(steps.glob("*/"), reverse=True):
            child.rmdir()
        steps.rmdir()
        subprocess.run(["umount", str(mount)], check=True)


def test_step_cgroups_under_a_delegated_cgroup2(
    make_stack: Callable[..., Stack], cgroup2: Path, tmp_path: Path, aws_env: dict[str, str]
) -> None:
    """With the memory controller: hog is OOM-killed in its own cgroup, alone; the verdict names
    the limit and the RetryPolicy retries it. Without it (this hierarchy's memory controller is
    bound to cgroup v1): --step-cgroup DIR refuses to start, naming why."""
    controllers = (cgroup2 / "cgroup.controllers").read_text().split()
    if "memory" in controllers:
        stack = make_stack("--step-cgroup", str(cgroup2))
        run_id = run_memory_hog(stack)
        (verdict,) = engine_metadata(stack, run_id, "hog", contract.META_VERDICT)
        assert verdict.startswith(f"{LIMIT} (the step's cgroup reached memory.max"), verdict
        assert stack.metric("steps_out_of_memory_total") == 1
        assert list(cgroup2.glob("step-*")) == []
        return
    log_path = tmp_path / "refused.log"
    controller = Controller(
        queue_url="http://127.0.0.1:1/000000000000/unused",
        env={**aws_env, "DAGSTER_HOME": str(tmp_path)},
        args=("--step-cgroup", str(cgroup2)),
        log_path=log_path,
    )
    with pytest.raises(RuntimeError, match="controller exited with"):
        controller.start()
    controller.stop()
    log = log_path.read_text()
    assert f"--step-cgroup: {cgroup2} has no memory controller" in log, log
    assert list(cgroup2.glob("step-*")) == []
