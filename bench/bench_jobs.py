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
