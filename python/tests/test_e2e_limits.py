"""End to end: per-step memory limits (op tag dagster-taskiq/memory) on process and warm steps,
through a real SQS API (moto server), the controller binary and real Dagster runs.

Both enforcements run here (docs/operations.md, "Step resource limits"): the address-space
rlimit (everywhere) and a cgroup per step, on whichever cgroup version the host has its memory
controller on (v1: a child of the test's own memory cgroup; v2: a cgroup2 file system mounted
for the test). The cgroup tests need root and fail, never skip, without it."""

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


def _v1_mount(controller: str) -> tuple[Path, str] | None:
    """The mount point and shown root of the cgroup v1 hierarchy with ``controller``."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        kind, _source, options = [*right.split(), "", "", ""][:3]
        if kind == "cgroup" and controller in options.split(","):
            fields = left.split()
            return Path(fields[4]), fields[3]
    return None


def _own_v1_dir(controller: str) -> Path | None:
    """This process's cgroup directory in the v1 hierarchy with ``controller``."""
    mount = _v1_mount(controller)
    if mount is None:
        return None
    point, root = mount
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return point / Path(path).relative_to(root)
    return None


@pytest.fixture
def step_cgroup(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A delegated cgroup for the steps, of whichever kind this host enforces memory with:
    where memory is still on cgroup v1, a child of this process's memory cgroup and the cpu
    hierarchy's directory at the same place (as an operator delegates both); else a child of
    a cgroup2 file system mounted for this test. Root is needed: fails loudly otherwise."""
    own_memory = _own_v1_dir("memory")
    name = f"dagster-taskiq-test-{uuid.uuid4().hex[:8]}"
    if own_memory is not None:
        memory = own_memory / name
        memory.mkdir()
        leaves = [memory]
        cpu_mount, memory_mount = _v1_mount("cpu"), _v1_mount("memory")
        if cpu_mount is not None and memory_mount is not None:
            cpu = cpu_mount[0] / memory.relative_to(memory_mount[0])
            # Its parents mirror this process's memory cgroup in the cpu hierarchy and are
            # shared by every test that runs here at the same time (the cold and warm variants
            # run on two workers at once): created when missing, never removed (empty cgroups).
            cpu.parent.mkdir(parents=True, exist_ok=True)
            cpu.mkdir()
            leaves.append(cpu)
        try:
            yield memory, "memory.limit_in_bytes"
        finally:
            for leaf in leaves:
                for child in leaf.glob("step-*/"):
                    child.rmdir()
                leaf.rmdir()
        return
    mount = tmp_path / "cgroup2"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "cgroup2", "none", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"no cgroup v1 memory hierarchy and cannot mount cgroup2 (the cgroup test needs "
            f"root): {mounted.stderr.strip()}"
        )
    steps = mount / name
    try:
        steps.mkdir()
        if "memory" not in (steps / "cgroup.controllers").read_text().split():
            pytest.fail(f"memory is on neither cgroup v1 nor cgroup v2 here: {steps}")
        yield steps, "memory.max"
    finally:
        for child in sorted(steps.glob("*/"), reverse=True):
            child.rmdir()
        steps.rmdir()
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("launcher", ["cold", "warm"])
def test_a_step_past_its_memory_limit_in_its_own_cgroup_is_killed_alone_and_retried(
    make_stack: Callable[..., Stack], step_cgroup: tuple[Path, str], launcher: str
) -> None:
    """cgroup mode, on whichever cgroup version this host has memory on: hog touches 512 MiB
    in its own 256 MiB cgroup and the kernel kills it there, alone; the verdict names the
    limit, the RetryPolicy retries it, the neighbour runs once and finishes, and the step
    cgroups are gone afterwards."""
    root, limit_file = step_cgroup
    stack = make_stack("--step-cgroup", str(root), *(WARM_ARGS if launcher == "warm" else ()))
    run_id = run_memory_hog(stack)
    (verdict,) = engine_metadata(stack, run_id, "hog", contract.META_VERDICT)
    assert verdict.startswith(f"{LIMIT} (the step's cgroup reached {limit_file}"), verdict
    assert "signal 9" in verdict, verdict
    assert stack.metric("steps_out_of_memory_total") == 1
    log = stack.controller.log_path.read_text()  # type: ignore[union-attr]
    version = "v1" if limit_file == "memory.limit_in_bytes" else "v2"
    assert f"step resource limits: a cgroup {version} per step" in log
    # Each step's cgroup went with it.
    wait_for(lambda: not list(root.glob("step-*")), 10, "the step cgroups to be removed")


def test_a_step_cgroup_root_that_is_no_cgroup_stops_the_start(
    tmp_path: Path, aws_env: dict[str, str]
) -> None:
    """--step-cgroup DIR must work, or the controller does not start (never runs steps
    unlimited when limits were asked for)."""
    not_a_cgroup = tmp_path / "plain"
    not_a_cgroup.mkdir()
    log_path = tmp_path / "refused.log"
    controller = Controller(
        queue_url="http://127.0.0.1:1/000000000000/unused",
        env={**aws_env, "DAGSTER_HOME": str(tmp_path)},
        args=("--step-cgroup", str(not_a_cgroup)),
        log_path=log_path,
    )
    with pytest.raises(RuntimeError, match="controller exited with"):
        controller.start()
    controller.stop()
    log = log_path.read_text()
    assert f"--step-cgroup: {not_a_cgroup} is neither a cgroup v2 directory" in log, log
