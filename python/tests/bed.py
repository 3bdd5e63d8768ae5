"""The reliability and hostile-message test bed: queues, a ledger, controllers started against
them, and the moves tests make on a run's step messages."""

from __future__ import annotations

import json
import os
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import boto3
import jobs
import pytest
from dagster import DagsterInstance, execute_job
from ledger import executions

from dagster_taskiq_controller_testing.stack import Controller, Queues, create_queues, wait_for


class Bed:
    """Queues, a ledger and a way to start controllers against them."""

    def __init__(
        self,
        aws_env: dict[str, str],
        dagster_home: Path,
        instance: DagsterInstance,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        visibility_timeout: int = 5,
    ) -> None:
        self.aws_env = aws_env
        self.dagster_home = dagster_home
        self.instance = instance
        self.tmp_path = tmp_path
        self.visibility_timeout = visibility_timeout
        self.queues: Queues = create_queues(
            aws_env["AWS_ENDPOINT_URL"],
            f"steps-{uuid.uuid4().hex[:10]}",
            visibility_timeout=visibility_timeout,
            max_receive_count=20,
        )
        monkeypatch.setenv("DAGSTER_TASKIQ_SQS_QUEUE_URL", self.queues.queue_url)
        self.ledger = tmp_path / "ledger.jsonl"
        self.controllers: list[Controller] = []

    def controller(
        self, *args: str, endpoint: str | None = None, env: dict[str, str] | None = None
    ) -> Controller:
        env = {
            **self.aws_env,
            "DAGSTER_HOME": str(self.dagster_home),
            jobs.LEDGER_ENV: str(self.ledger),
            **(env or {}),
        }
        if endpoint:
            env["AWS_ENDPOINT_URL"] = endpoint
        c = Controller(
            queue_url=self.queues.queue_url,
            env=env,
            args=(
                "--receive-wait",
                "1",
                "--visibility-timeout",
                str(self.visibility_timeout),
                "--backoff-base",
                "0.5",
                "--backoff-cap",
                "3",
                *args,
            ),
            log_path=self.tmp_path / f"controller-{len(self.controllers)}.log",
        )
        self.controllers.append(c)
        return c.start()

    def queue_empty(self, url: str | None = None) -> bool:
        attributes = boto3.client("sqs").get_queue_attributes(
            QueueUrl=url or self.queues.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return all(v == "0" for v in attributes.values())

    def stop_all(self) -> None:
        for c in self.controllers:
            c.stop()


def api(controller: Controller, path: str) -> Any:
    with urllib.request.urlopen(f"{controller.dashboard_url}{path}", timeout=5) as r:
        return json.load(r)


def metrics(controller: Controller) -> str:
    with urllib.request.urlopen(f"{controller.dashboard_url}/metrics", timeout=5) as r:
        return r.read().decode()


def run_in_background(instance: DagsterInstance, job_name: str) -> tuple[threading.Thread, dict]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        with execute_job(jobs.recon(job_name), instance) as result:
            outcome["success"] = result.success
            outcome["run_id"] = result.run_id

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def running_pids(controller: Controller) -> list[int]:
    return [
        int(r["locator"].removeprefix("pid "))
        for r in api(controller, "/api/v1/steps")
        if r["state"] == "running"
    ]


def settled_records(controller: Controller) -> list[dict[str, Any]] | None:
    """The controller's step records once none is still being worked on, else None."""
    records = api(controller, "/api/v1/steps")
    return None if any(r["active"] for r in records) else records


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def take_messages(bed: Bed, count: int) -> list[dict[str, Any]]:
    """Takes `count` step messages of the run off the queue (deleted), to put back changed."""
    sqs = boto3.client("sqs")
    url = bed.queues.queue_url
    taken: list[dict[str, Any]] = []

    def enough() -> bool:
        got = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=count - len(taken),
            WaitTimeSeconds=1,
            VisibilityTimeout=120,
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        for m in got:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        taken.extend(got)
        return len(taken) >= count

    wait_for(enough, 60, f"{count} step messages of the run")
    return taken


def put_back(bed: Bed, message: dict[str, Any], body: str | None = None, copies: int = 1) -> None:
    extra = (
        {"MessageAttributes": message["MessageAttributes"]}
        if "MessageAttributes" in message
        else {}
    )
    for _ in range(copies):
        boto3.client("sqs").send_message(
            QueueUrl=bed.queues.queue_url, MessageBody=body or message["Body"], **extra
        )


def duplicate_the_first_message(bed: Bed) -> None:
    """Two copies of the run's first step message instead of one, as an SQS duplicate
    delivery (or a requeue whose delete failed) leaves them."""
    (message,) = take_messages(bed, 1)
    put_back(bed, message, copies=2)


def lead_executions(bed: Bed) -> dict[int, tuple[float, float]]:
    runs = [spans for key, spans in executions(bed.ledger).items() if key[1] == "lead"]
    assert len(runs) == 1, runs
    return runs[0]
