"""`make demo`: a real Dagster job through SQS and the controller, on a local moto server
and a local Dagster instance. Starts everything, prints progress and a summary, and stops
everything it started (also on Ctrl-C)."""

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
from pathlib import Path

from dagster_taskiq_controller.localstack import (
    DEFAULT_BINARY,
    REPO_ROOT,
    Controller,
    MotoServer,
    aws_env,
    create_queues,
)

PROGRESS_EVENTS = {
    "STEP_START": "started",
    "STEP_SUCCESS": "succeeded",
    "STEP_FAILURE": "FAILED",
    "STEP_UP_FOR_RETRY": "up for retry",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary", type=Path, default=DEFAULT_BINARY)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "target" / "demo")
    options = parser.parse_args()
    options.workdir.mkdir(parents=True, exist_ok=True)
    dagster_home = Path(tempfile.mkdtemp(prefix="dagster-home-", dir=options.workdir))
    log_path = options.workdir / "controller.log"
    log_path.unlink(missing_ok=True)

    started = time.monotonic()
    with MotoServer() as moto:
        print(f"moto server (SQS) on {moto.url}")
        env = aws_env(moto.url)
        os.environ.update(env)
        os.environ["DAGSTER_HOME"] = str(dagster_home)
        queues = create_queues(moto.url, "dagster-steps")
        os.environ["DAGSTER_TASKIQ_SQS_QUEUE_URL"] = queues.queue_url
        print(f"work queue {queues.queue_url}\ndead-letter queue {queues.dlq_url}")
        controller = Controller(
            queue_url=queues.queue_url,
            env={**env, "DAGSTER_HOME": str(dagster_home)},
            binary=options.binary,
            log_path=log_path,
        )
        with controller:
            print(f"controller running; dashboard {controller.dashboard_url}/ (log: {log_path})")
            ok = run_job(started, controller.dashboard_url)
    print(f"demo wall time {time.monotonic() - started:.1f}s; everything stopped")
    return 0 if ok else 1


def run_job(started: float, dashboard_url: str) -> bool:
    from dagster import DagsterInstance, execute_job, reconstructable

    from dagster_taskiq_controller.demo_jobs import fan_out_fan_in

    instance = DagsterInstance.get()
    outcome: dict[str, object] = {}

    def execute() -> None:
        # Quiet Dagster's console logger: the demo prints its own progress lines.
        run_config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
        with execute_job(
            reconstructable(fan_out_fan_in), instance, run_config=run_config
        ) as result:
            outcome["success"] = result.success
            outcome["run_id"] = result.run_id

    job_started = time.monotonic()
    worker = threading.Thread(target=execute, daemon=True)
    worker.start()
    print(f"running job fan_out_fan_in ({len(fan_out_fan_in.nodes)} ops)")
    seen = 0
    while True:
        alive = worker.is_alive()
        seen = print_progress(instance, started, seen)
        if not alive:
            break
        time.sleep(0.2)
    job_seconds = time.monotonic() - job_started
    run_id = outcome.get("run_id")
    if not isinstance(run_id, str):
        print("the job did not start")
        return False
    print_summary(instance, run_id, dashboard_url)
    success = bool(outcome.get("success"))
    print(f"run {run_id}: {'SUCCESS' if success else 'FAILURE'} in {job_seconds:.1f}s")
    return success


def print_progress(instance: object, started: float, seen: int) -> int:
    from dagster import DagsterInstance

    assert isinstance(instance, DagsterInstance)
    runs = instance.get_runs(limit=1)
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
    from datetime import datetime

    times = {entry["state"]: datetime.fromisoformat(entry["at"]) for entry in history}
    if start not in times or end not in times:
        return None
    return (times[end] - times[start]).total_seconds() * 1000


def print_summary(instance: object, run_id: str, dashboard_url: str) -> None:
    from dagster import DagsterInstance

    assert isinstance(instance, DagsterInstance)
    records: dict[tuple[str, int], dict] = {}
    try:
        with urllib.request.urlopen(f"{dashboard_url}/api/v1/steps", timeout=2) as response:
            for record in json.load(response):
                if record["run_id"] == run_id:
                    records[(record["step_key"], record["attempt"])] = record
    except OSError:
        pass
    print(
        f"\n{'step':<18} {'attempts':>8} {'seconds':>8}  {'outcome':<10} "
        f"{'process':<11} {'recv->spawn':>11} {'exit->ack':>9}"
    )
    spawn_ms: list[float] = []
    ack_ms: list[float] = []
    for stats in sorted(instance.get_run_step_stats(run_id), key=lambda s: s.start_time or 0):
        seconds = (stats.end_time or 0) - (stats.start_time or 0)
        attempts = stats.attempts or 1
        record = records.get((stats.step_key, attempts - 1), {})
        history = record.get("history", [])
        to_spawn = _overhead_ms(history, "received", "running")
        to_ack = _overhead_ms(history, "exited", "acked")
        spawn_ms += [to_spawn] if to_spawn is not None else []
        ack_ms += [to_ack] if to_ack is not None else []
        status = stats.status.value if stats.status else "?"
        print(
            f"{stats.step_key:<18} {attempts:>8} {seconds:>8.2f}  {status:<10} "
            f"{record.get('locator') or '-':<11} "
            f"{'-' if to_spawn is None else f'{to_spawn:.0f} ms':>11} "
            f"{'-' if to_ack is None else f'{to_ack:.0f} ms':>9}"
        )
    if spawn_ms and ack_ms:
        print(
            f"controller overhead per step (median): received -> spawned "
            f"{statistics.median(spawn_ms):.0f} ms, exited -> deleted "
            f"{statistics.median(ack_ms):.0f} ms"
        )
    print()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped")
        sys.exit(130)
