"""Jobs of the end-to-end benchmark (bench/e2e.py): a 4-op diamond and an 11-op fan-out, each
built for every executor compared. Every op records when its code started running, so the
benchmark can measure step start latency."""

from __future__ import annotations

import os
import time

from dagster import (
    Definitions,
    FilesystemIOManager,
    GraphDefinition,
    JobDefinition,
    Output,
    graph,
    in_process_executor,
    multiprocess_executor,
    op,
)

from dagster_taskiq_controller import taskiq_controller_executor

RESOURCES = {"io_manager": FilesystemIOManager()}


def _out(value: int, started: float) -> Output[int]:
    return Output(value, metadata={"pid": os.getpid(), "started": started})


@op
def source() -> Output[int]:
    started = time.time()
    return _out(1, started)


@op
def branch(x: int) -> Output[int]:
    started = time.time()
    return _out(x + 1, started)


@op
def join_two(a: int, b: int) -> Output[int]:
    started = time.time()
    return _out(a + b, started)


@op
def join_all(values: list[int]) -> Output[int]:
    started = time.time()
    return _out(sum(values), started)


@graph
def diamond4() -> None:
    """source -> (left, right) -> join_two: 4 steps."""
    value = source()
    join_two(branch.alias("left")(value), branch.alias("right")(value))


@graph
def fanout11() -> None:
    """source -> 9 branches -> join_all: 11 steps."""
    value = source()
    join_all([branch.alias(f"branch_{i}")(value) for i in range(9)])


GRAPHS: dict[str, GraphDefinition] = {"diamond4": diamond4, "fanout11": fanout11}


def _executors() -> dict[str, object]:
    executors: dict[str, object] = {
        "controller": taskiq_controller_executor,
        "multiprocess": multiprocess_executor,
        "in_process": in_process_executor,
    }
    try:
        from taskiq_app import taskiq_bench_executor
    except ImportError:  # the bench extra is not installed: no taskiq jobs
        return executors
    executors["taskiq"] = taskiq_bench_executor
    return executors


JOBS: dict[str, JobDefinition] = {
    f"{graph_name}_{executor_name}": graph_def.to_job(
        name=f"{graph_name}_{executor_name}",
        executor_def=executor,  # type: ignore[arg-type]
        resource_defs=RESOURCES,
    )
    for graph_name, graph_def in GRAPHS.items()
    for executor_name, executor in _executors().items()
}

# Step processes load a job by its attribute name in this file.
globals().update(JOBS)

defs = Definitions(jobs=list(JOBS.values()))


# --- scale (bench/e2e.py, "Scale"): one source and N trivial leaves ----------------------------

SCALE_LEAVES = (100, 1000)
SCALE_EXECUTORS = ("controller", "inprocess")
_scale_jobs: dict[str, JobDefinition] = {}


def scale_job_name(leaves: int, executor_name: str) -> str:
    return f"scale{leaves}_{executor_name}"


def scale_job(leaves: int, executor_name: str) -> JobDefinition:
    """source -> N leaves (N + 1 steps), on the controller or Dagster's in_process_executor.
    Built on first use, not at import: every step process imports this file."""
    name = scale_job_name(leaves, executor_name)
    if name not in _scale_jobs:
        executor = taskiq_controller_executor if executor_name == "controller" else None

        @graph(name=f"scale{leaves}")
        def fan_out() -> None:
            value = source()
            for i in range(leaves):
                branch.alias(f"leaf_{i}")(value)

        _scale_jobs[name] = fan_out.to_job(
            name=name,
            executor_def=executor or in_process_executor,  # type: ignore[arg-type]
            resource_defs=RESOURCES,
        )
    return _scale_jobs[name]


def __getattr__(name: str) -> JobDefinition:
    """Step processes load a scale job by its attribute name, as the others."""
    for leaves in SCALE_LEAVES:
        for executor_name in SCALE_EXECUTORS:
            if name == scale_job_name(leaves, executor_name):
                return scale_job(leaves, executor_name)
    raise AttributeError(name)
