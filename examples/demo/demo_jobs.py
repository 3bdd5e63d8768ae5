"""The demo's example job: a fan-out and fan-in whose ops pass data through Dagster's
filesystem IO manager, each op a step run by the controller in its own process."""

from __future__ import annotations

import os
import time

from dagster import In, Out, job, op

from dagster_taskiq_controller.executor import taskiq_controller_executor

REGIONS = ("north", "south", "east", "west")


@op(out=Out(list))
def extract() -> list[int]:
    return list(range(1, 101))


def _make_transform(region: str, factor: int):  # noqa: ANN202 - an op definition
    @op(name=f"transform_{region}", ins={"numbers": In(list)}, out=Out(dict))
    def transform(numbers: list[int]) -> dict:
        time.sleep(0.2)  # a little work, so the fan-out is visible on the dashboard
        return {"region": region, "total": sum(n * factor for n in numbers), "pid": os.getpid()}

    return transform


TRANSFORMS = [_make_transform(region, i + 1) for i, region in enumerate(REGIONS)]


@op(ins={name: In(dict) for name in REGIONS}, out=Out(dict))
def combine(**parts: dict) -> dict:
    return {
        "grand_total": sum(p["total"] for p in parts.values()),
        "pids": [p["pid"] for p in parts.values()],
    }


@op(ins={"summary": In(dict)})
def report(summary: dict) -> None:
    pids = set(summary["pids"])
    if len(pids) != len(REGIONS):
        raise AssertionError(f"transforms shared processes: {pids}")


@job(executor_def=taskiq_controller_executor)
def fan_out_fan_in() -> None:
    numbers = extract()
    parts = {region: t(numbers) for region, t in zip(REGIONS, TRANSFORMS, strict=True)}
    report(combine(**parts))
