"""`make chaos`: 100 steps across 10 runs while controllers are SIGKILLed, steps are
SIGKILLed and SQS goes away once. Afterwards every run must be terminal and successful, the
queue and the DLQ empty, and no step attempt may have overlapped itself (ledger).

Outside `make test` because it runs for minutes. Prints a summary and exits non-zero on any
broken promise."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import boto3

TESTS_DIR = Path(__file__).resolve().parent
BINARY_NAME = "dagster-taskiq-controller"
sys.path.insert(0, str(TESTS_DIR))

import jobs  # noqa: E402
from ledger import executions, overlaps  # noqa: E402

from dagster_taskiq_controller_testing.stack import (  # noqa: E402
    BINARY_ENV,
    Controller,
    MotoServer,
    aws_env,
    create_queues,
    wait_for,
)


def api_steps(controller: Controller) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{controller.dashboard_url}/api/v1/steps", timeout=2) as r:
            return json.load(r)
    except OSError:
        return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--parallel-runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--binary",
        type=Path,
        default=os.environ.get(
            BINARY_ENV, TESTS_DIR.parents[1] / "target" / "release" / BINARY_NAME
        ),
        help=f"the controller to test (default: ${BINARY_ENV}, else this checkout's release build)",
    )
    options = parser.parse_args()
    rng = random.Random(options.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    home = work / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    ledger = work / "ledger.jsonl"
    print(f"chaos seed {options.seed}, workdir {work}")

    with MotoServer() as moto:
        env = {**aws_env(moto.url), "DAGSTER_HOME": str(home), jobs.LEDGER_ENV: str(ledger)}
        os.environ.update(env)
        queues = create_queues(moto.url, f"chaos-{uuid.uuid4().hex[:8]}", 5, 50)
        env["DAGSTER_TASKIQ_SQS_QUEUE_URL"] = queues.queue_url
        os.environ.update(env)
        from dagster import DagsterInstance

        # Create the sqlite schema once, before a dozen processes race to create it.
        DagsterInstance.get().get_runs(limit=1)

        def new_controller(n: int) -> Controller:
            return Controller(
                queue_url=queues.queue_url,
                env=env,
                binary=options.binary,
                args=(
                    "--visibility-timeout",
                    "5",
                    "--receive-wait",
                    "1",
                    "--max-concurrent",
                    "4",
                    "--backoff-base",
                    "0.5",
                    "--backoff-cap",
                    "5",
                    "--max-attempts",
                    "20",
                ),
                log_path=work / f"controller-{n}.log",
            ).start()

        controllers = [new_controller(0), new_controller(1)]
        started_controllers = 2
        pending = list(range(options.runs))
        workers: list[subprocess.Popen[bytes]] = []
        kills = {"controller": 0, "step": 0, "outage": 0}
        step_kills: Counter[tuple[str, str]] = Counter()
        outage_done = False
        began = time.monotonic()
        jobs_file = str(Path(jobs.__file__).resolve())
        while pending or any(w.poll() is None for w in workers):
            while pending and sum(w.poll() is None for w in workers) < options.parallel_runs:
                pending.pop()
                log = open(work / f"run-{len(workers)}.log", "wb")
                workers.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "dagster",
                            "job",
                            "execute",
                            "-f",
                            jobs_file,
                            "-j",
                            "chaos",
                        ],
                        env={**os.environ, **env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            time.sleep(rng.uniform(3, 7))
            action = rng.choice(["controller", "step", "step", "nothing"])
            if not outage_done and time.monotonic() - began > 30:
                action = "outage"
            if action == "controller":
                victim = rng.randrange(len(controllers))
                assert controllers[victim].process is not None
                controllers[victim].process.kill()
                controllers[victim].process.wait()
                controllers[victim] = new_controller(started_controllers)
                started_controllers += 1
                kills["controller"] += 1
            elif action == "step":
                # At most 3 kills per step: each costs one of its 5 Dagster retries, and
                # the run must be able to succeed.
                running = [
                    ((r["run_id"], r["step_key"]), int(r["locator"].removeprefix("pid ")))
                    for c in controllers
                    for r in api_steps(c)
                    if r["state"] == "running" and step_kills[(r["run_id"], r["step_key"])] < 3
                ]
                if running:
                    step, pid = rng.choice(running)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills["step"] += 1
                        step_kills[step] += 1
                    except ProcessLookupError:
                        pass
            elif action == "outage":
                assert moto.process is not None
                os.kill(moto.process.pid, signal.SIGSTOP)
                time.sleep(10)
                os.kill(moto.process.pid, signal.SIGCONT)
                outage_done = True
                kills["outage"] += 1
        elapsed = time.monotonic() - began

        from dagster import DagsterRunStatus

        instance = DagsterInstance.get()
        runs = instance.get_runs()
        statuses = [r.status for r in runs]
        sqs = boto3.client("sqs")

        def empty(url: str) -> bool:
            attributes = sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )["Attributes"]
            return all(v == "0" for v in attributes.values())

        queue_empty = bool(wait_for(lambda: empty(queues.queue_url), 60, "empty queue"))
        dlq_empty = empty(queues.dlq_url)
        found_overlaps = overlaps(ledger)
        attempts = executions(ledger)
        for c in controllers:
            c.stop()

    succeeded = sum(s == DagsterRunStatus.SUCCESS for s in statuses)
    print(
        f"runs {len(runs)} (succeeded {succeeded}), steps seen in ledger {len(attempts)}, "
        f"executions {sum(len(p) for p in attempts.values())}"
    )
    print(
        f"controller kills {kills['controller']}, step kills {kills['step']}, "
        f"SQS outages {kills['outage']}, controllers started {started_controllers}, "
        f"wall {elapsed:.0f}s"
    )
    print(f"queue empty {queue_empty}, DLQ empty {dlq_empty}, overlaps {len(found_overlaps)}")
    for line in found_overlaps:
        print("  OVERLAP", line)
    ok = (
        len(runs) == options.runs
        and succeeded == options.runs
        and queue_empty
        and dlq_empty
        and not found_overlaps
    )
    print("CHAOS OK" if ok else "CHAOS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
