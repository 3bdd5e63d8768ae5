"""`make demo`: a real Dagster job through SQS and the controller, cold and with the warm pool.

Everything runs locally: a moto server, a Dagster instance in a work directory, and the
controller, twice: once with the cold launcher (a fresh `dagster api execute_step` per step)
and once with the warm pool (steps forked from a zygote that preloaded the job file). Prints
progress, a summary of each run and the two side by side, and stops everything it started
(also on Ctrl-C).

Needs the `dagster-taskiq-controller` and `dagster-taskiq-controller-testing` packages (the
latter brings moto) and a controller binary: `--binary` or `DAGSTER_TASKIQ_CONTROLLER_BINARY`.
The job is `demo_jobs.py` next to this file."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from dagster_taskiq_controller_testing.stack import (
    BINARY_ENV,
    Controller,
    MotoServer,
    aws_env,
    create_queues,
    metric_value,
    wait_for,
)

JOBS_FILE = Path(__file__).resolve().parent / "demo_jobs.py"
JOB_NAME = "fan_out_fan_in"
PROGRESS_EVENTS = {
    "STEP_START": "started",
    "STEP_SUCCESS": "succeeded",
    "STEP_FAILURE": "FAILED",
    "STEP_UP_FOR_RETRY": "up for retry",
}
# Dagster reads this from DAGSTER_HOME; without it Dagster warns about the missing file and
# prints its telemetry banner in the middle of the demo's output.
DAGSTER_YAML = "telemetry:\n  enabled: false\n"


@dataclass
class Outcome:
    """One run of the job under one launcher."""

    label: str
    success: bool = False
    run_id: str | None = None
    seconds: float = 0.0
    spawn_ms: list[float] = field(default_factory=list)
    ack_ms: list[float] = field(default_factory=list)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--binary",
        type=Path,
        default=os.environ.get(BINARY_ENV),
        help=f"the controller binary (default: ${BINARY_ENV})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the Dagster instance and controller logs go (default: a new temp dir)",
    )
    options = parser.parse_args()
    if options.binary is None or not Path(options.binary).is_file():
        parser.error(f"no controller binary: pass --binary or set {BINARY_ENV}")
    workdir = (options.workdir or Path(tempfile.mkdtemp(prefix="dagster-taskiq-demo-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dagster_home = Path(tempfile.mkdtemp(prefix="dagster-home-", dir=workdir))
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)

    started = time.monotonic()
    outcomes: list[Outcome] = []
    with MotoServer() as moto:
        print(f"moto server (SQS) on {moto.url}")
        env = {**aws_env(moto.url), "DAGSTER_HOME": str(dagster_home)}
        os.environ.update(env)
        queues = create_queues(moto.url, "dagster-steps")
        os.environ["DAGSTER_TASKIQ_SQS_QUEUE_URL"] = queues.queue_url
        print(f"work queue {queues.queue_url}\ndead-letter queue {queues.dlq_url}")
        launchers = [
            ("cold", "cold launcher", ()),
            ("warm", "warm pool", ("--warm-pool", "--warm-preload", str(JOBS_FILE))),
        ]
        for name, label, args in launchers:
            log_path = workdir / f"controller-{name}.log"
            log_path.unlink(missing_ok=True)
            controller = Controller(
                queue_url=queues.queue_url,
                env=env,
                binary=Path(options.binary),
                args=args,
                log_path=log_path,
            )
            with controller:
                print(f"\n== {label}: controller on {controller.dashboard_url}/ (log: {log_path})")
                if "--warm-pool" in args:
                    wait_for(
                        lambda c=controller: zygote_ready(c.dashboard_url),
                        120,
                        "the warm pool's zygote",
                    )
                    print("warm pool ready (zygote preloaded the job file)")
                outcomes.append(run_job(label, started, controller.dashboard_url))
    print_comparison(outcomes)
    print(f"demo wall time {time.monotonic() - started:.1f}s; everything stopped")
    return 0 if all(o.success for o in outcomes) else 1


def zygote_ready(dashboard_url: str) -> bool:
    with urllib.request.urlopen(f"{dashboard_url}/metrics", timeout=2) as response:
        return metric_value(response.read().decode(), "warm_pool_zygote_pid") > 0


def run_job(label: str, started: float, dashboard_url: str) -> Outcome:
    from dagster import DagsterInstance, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableJob

    instance = DagsterInstance.get()
    outcome = Outcome(label)
    known_runs = {r.run_id for r in instance.get_runs()}

    def execute() -> None:
        # Quiet Dagster's console logger: the demo prints its own progress lines.
        run_config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
        # By file, so each step process loads the job from this directory.
        job = ReconstructableJob.for_file(str(JOBS_FILE), JOB_NAME)
        with execute_job(job, instance, run_config=run_config) as result:
            outcome.success = result.success
            outcome.run_id = result.run_id

    job_started = time.monotonic()
    worker = threading.Thread(target=execute, daemon=True)
    worker.start()
    print(f"running job {JOB_NAME}")
    seen = 0
    while True:
        alive = worker.is_alive()
        seen = print_progress(instance, known_runs, started, seen)
        if not alive:
            break
        worker.join(0.2)
    outcome.seconds = time.monotonic() - job_started
    if outcome.run_id is None:
        print("the job did not start")
        return outcome
    print_summary(instance, outcome, dashboard_url)
    print(
        f"run {outcome.run_id}: {'SUCCESS' if outcome.success else 'FAILURE'} "
        f"in {outcome.seconds:.1f}s"
    )
    return outcome


def print_progress(instance: Any, known_runs: set[str], started: float, seen: int) -> int:
    runs = [r for r in instance.get_runs(limit=1) if r.run_id not in known_runs]
    if not runs:
        return seen
    records = instance.all_logs(runs[0].run_id)
    for entry in records[seen:]:
        event = entry.dagster_event
        if event is None or event.event_type_value not in PROGRESS_EVENTS:
            continue
        print(
            f"[{time.monotonic() - started:6.1f}s] {entry.step_key:<18} "
            f"{PROGRESS_EVENTS[event.event_type_value]}"
        )
    return len(records)


def _overhead_ms(history: list[dict[str, str]], start: str, end: str) -> float | None:
    """Milliseconds between two states of a step's history in the controller's API."""
    times = {entry["state"]: datetime.fromisoformat(entry["at"]) for entry in history}
    if start not in times or end not in times:
        return None
    return (times[end] - times[start]).total_seconds() * 1000


def print_summary(instance: Any, outcome: Outcome, dashboard_url: str) -> None:
    records: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        with urllib.request.urlopen(f"{dashboard_url}/api/v1/steps", timeout=2) as response:
            for record in json.load(response):
                if record["run_id"] == outcome.run_id:
                    records[(record["step_key"], record["attempt"])] = record
    except OSError:
        pass
    print(
        f"\n{'step':<18} {'attempts':>8} {'seconds':>8}  {'outcome':<10} "
        f"{'process':<11} {'recv->spawn':>11} {'exit->ack':>9}"
    )
    stats_of_run = instance.get_run_step_stats(outcome.run_id)
    for stats in sorted(stats_of_run, key=lambda s: s.start_time or 0):
        seconds = (stats.end_time or 0) - (stats.start_time or 0)
        attempts = stats.attempts or 1
        record = records.get((stats.step_key, attempts - 1), {})
        history = record.get("history", [])
        to_spawn = _overhead_ms(history, "received", "running")
        to_ack = _overhead_ms(history, "exited", "acked")
        outcome.spawn_ms += [to_spawn] if to_spawn is not None else []
        outcome.ack_ms += [to_ack] if to_ack is not None else []
        status = stats.status.value if stats.status else "?"
        print(
            f"{stats.step_key:<18} {attempts:>8} {seconds:>8.2f}  {status:<10} "
            f"{record.get('locator') or '-':<11} "
            f"{'-' if to_spawn is None else f'{to_spawn:.0f} ms':>11} "
            f"{'-' if to_ack is None else f'{to_ack:.0f} ms':>9}"
        )
    print()


def _median_ms(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ms" if values else "-"


def print_comparison(outcomes: list[Outcome]) -> None:
    """The runs side by side: wall time and the controller's median overhead per step."""
    if not outcomes:
        return
    width = max(16, *(len(o.label) + 2 for o in outcomes))
    print("\n" + f"{'':<34}" + "".join(f"{o.label:>{width}}" for o in outcomes))
    rows = [
        ("result", [("SUCCESS" if o.success else "FAILURE") for o in outcomes]),
        ("job wall time", [f"{o.seconds:.1f} s" for o in outcomes]),
        ("received -> spawned (median/step)", [_median_ms(o.spawn_ms) for o in outcomes]),
        ("exited -> deleted (median/step)", [_median_ms(o.ack_ms) for o in outcomes]),
    ]
    for name, values in rows:
        print(f"{name:<34}" + "".join(f"{v:>{width}}" for v in values))
    print()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped")
        sys.exit(130)
