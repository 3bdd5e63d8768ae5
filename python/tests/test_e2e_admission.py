"""Admission caps against moto and real Dagster runs: the ops' ledger proves them."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from bed import Bed
from conftest import child_env, wait_for
from ledger import executions, overlaps

pytestmark = pytest.mark.controller

TESTS_DIR = Path(__file__).resolve().parent

# Concurrent runs in threads of one process deadlock in Dagster's logging: one process each.
RUN_JOB = """
import json, sys
from dagster import DagsterInstance, execute_job
import jobs
with execute_job(jobs.recon(sys.argv[1]), DagsterInstance.get()) as result:
    print(json.dumps({"run_id": result.run_id, "success": result.success}))
"""


def start_run(job_name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RUN_JOB, job_name],
        cwd=TESTS_DIR,
        env=child_env(PYTHONPATH=str(TESTS_DIR)),
        stdout=subprocess.PIPE,
        text=True,
    )


def finish_run(process: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """Most spans alive at one instant."""
    edges = sorted(
        itertools.chain.from_iterable(((start, 1), (end, -1)) for start, end in spans),
        # At equal times an end comes first: back-to-back spans do not overlap.
        key=lambda edge: (edge[0], edge[1]),
    )
    alive = peak = 0
    for _, change in edges:
        alive += change
        peak = max(peak, alive)
    return peak


def spans_where(path: Path, keep: Callable[[str, str], bool]) -> list[tuple[float, float]]:
    """Lifetimes of the executions whose (run id, step) ``keep`` accepts."""
    return [
        span
        for (run_id, step, _), by_pid in executions(path).items()
        if keep(run_id, step)
        for span in by_pid.values()
    ]


def test_three_runs_never_exceed_the_global_per_run_and_tag_caps(bed: Bed) -> None:
    controller = bed.controller(
        "--max-concurrent",
        "4",
        "--max-concurrent-per-run",
        "2",
        "--tag-limit",
        "database=redshift:1",
    )
    outcomes = [finish_run(p) for p in [start_run("tagged_fan") for _ in range(3)]]
    assert all(o["success"] is True for o in outcomes), outcomes
    wait_for(bed.queue_empty, 60, "every message to be deleted")
    assert overlaps(bed.ledger) == []
    run_ids = [str(o["run_id"]) for o in outcomes]
    every = spans_where(bed.ledger, lambda run, step: True)
    assert len(every) == 15, "every op of the three runs ran once"
    assert peak_overlap(every) <= 4
    for run_id in run_ids:
        of_run = spans_where(bed.ledger, lambda run, step, run_id=run_id: run == run_id)
        assert peak_overlap(of_run) <= 2
    redshift = spans_where(bed.ledger, lambda run, step: step.startswith("redshift"))
    assert len(redshift) == 6 and peak_overlap(redshift) == 1
    # The caps were not met by running one step at a time.
    assert peak_overlap(every) >= 2
    assert controller.process is not None and controller.process.poll() is None
