"""The operator subcommands against a real SQS API (moto): `doctor` and `dlq`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
from conftest import child_env
from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRun

from dagster_taskiq_controller_testing.stack import (
    Queues,
    controller_binary,
    create_queues,
    free_port,
)

pytestmark = pytest.mark.controller


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(controller_binary()), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env or child_env(),
        check=False,
    )


@pytest.fixture
def queues(moto_server: str, aws_env: dict[str, str]) -> Queues:
    return create_queues(moto_server, f"cli-{uuid.uuid4().hex[:8]}")


def doctor(queue_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(
        "doctor",
        "--queue-url",
        queue_url,
        "--python",
        sys.executable,
        "--dashboard-addr",
        f"127.0.0.1:{free_port()}",
        *extra,
    )


def check_line(output: str, name: str) -> str:
    """The report line of one check."""
    lines = [line for line in output.splitlines() if f"] {name}: " in line]
    assert len(lines) == 1, output
    return lines[0]


def test_doctor_passes_on_a_correct_setup(queues: Queues, dagster_home: Path) -> None:
    result = doctor(queues.queue_url)
    assert result.returncode == 0, result.stdout + result.stderr
    # The embedded SQLite instance works on one host, and it has no runs yet: two warnings.
    assert result.stdout.rstrip().endswith("all checks passed, 2 warning(s)"), result.stdout
    assert f"dead-letter queue: {queues.dlq_url} (maxReceiveCount 10" in result.stdout
    assert "runs the bridge with dagster 1." in check_line(result.stdout, "dagster bridge")
    assert check_line(result.stdout, "ECS cluster").startswith("[skip]")
    storage = check_line(result.stdout, "dagster storage")
    assert storage.startswith("[warn]") and f"SQLite files under {dagster_home}" in storage
    assert "no runs yet" in check_line(result.stdout, "dagster instance")


@pytest.mark.parametrize("dagster_storage", ["postgres"])
def test_doctor_reads_the_latest_run_of_a_postgres_instance(
    queues: Queues, instance: DagsterInstance
) -> None:
    """A controller on its own host: doctor proves its instance is the runs' one by reading
    the latest run, and a PostgreSQL storage with the pinned SQLAlchemy passes."""
    run = instance.add_run(DagsterRun(job_name="somebody_elses_job", run_id=str(uuid.uuid4())))
    result = doctor(queues.queue_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("all checks passed"), result.stdout
    line = check_line(result.stdout, "dagster instance")
    assert line.startswith("[ok  ]") and f"its latest run is {run.run_id}" in line, line
    line = check_line(result.stdout, "dagster storage")
    assert line.startswith("[ok  ]") and "PostgresRunStorage" in line, line


def test_doctor_names_a_missing_queue(moto_server: str, aws_env: dict[str, str]) -> None:
    missing = f"{moto_server}/123456789012/no-such-queue-{uuid.uuid4().hex[:6]}"
    result = doctor(missing)
    assert result.returncode == 1
    line = check_line(result.stdout, "work queue")
    assert line.startswith("[FAIL]") and "does not exist" in line, result.stdout
    assert check_line(result.stdout, "dead-letter queue").startswith("[skip]")


def test_doctor_names_a_missing_dead_letter_queue(
    moto_server: str, aws_env: dict[str, str]
) -> None:
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName=f"no-dlq-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    result = doctor(url)
    assert result.returncode == 1
    line = check_line(result.stdout, "dead-letter queue")
    assert line.startswith("[FAIL]") and "no RedrivePolicy" in line, result.stdout
    assert check_line(result.stdout, "work queue").startswith("[ok  ]")


def test_doctor_rejects_a_redrive_policy_that_would_beat_the_controller(
    moto_server: str, aws_env: dict[str, str]
) -> None:
    queues = create_queues(moto_server, f"low-{uuid.uuid4().hex[:8]}", max_receive_count=3)
    result = doctor(queues.queue_url)
    assert result.returncode == 1
    line = check_line(result.stdout, "dead-letter queue")
    assert "maxReceiveCount (3) is not above --max-attempts (5)" in line, result.stdout


def test_doctor_names_a_broken_python(queues: Queues, tmp_path: Path) -> None:
    result = doctor(queues.queue_url, "--python", str(tmp_path / "no-python"))
    assert result.returncode == 1
    line = check_line(result.stdout, "dagster bridge")
    assert line.startswith("[FAIL]") and "DAGSTER_TASKIQ_PYTHON" in line, result.stdout
    assert check_line(result.stdout, "work queue").startswith("[ok  ]")


def test_doctor_names_a_missing_ecs_cluster_and_task_definition(queues: Queues) -> None:
    result = doctor(
        queues.queue_url,
        "--launcher",
        "ecs",
        "--ecs-cluster",
        "no-such-cluster",
        "--ecs-task-definition",
        "no-such-family",
    )
    assert result.returncode == 1
    assert "does not exist" in check_line(result.stdout, "ECS cluster"), result.stdout
    assert "no-such-family" in check_line(result.stdout, "ECS task definition")


def dead_letter(queues: Queues, reason: str, run_id: str, step_key: str) -> str:
    """A dead letter as the controller writes it; returns its task id."""
    task_id = uuid.uuid4().hex
    body = {
        "task_id": task_id,
        "task_name": "execute_plan",
        "labels": {"dagster_run_id": run_id, "dagster_step_key": step_key},
        "args": [],
        "kwargs": {},
    }
    attributes = {
        "dagster_taskiq_error": reason,
        "dagster_taskiq_error_detail": f"detail of {reason}",
        "dagster_taskiq_dead_lettered_at": "2026-01-01T00:00:00+00:00",
        "dagster_taskiq_receive_count": "5",
    }
    boto3.client("sqs").send_message(
        QueueUrl=queues.dlq_url,
        MessageBody=json.dumps(body),
        MessageAttributes={
            k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()
        },
    )
    return task_id


def visible(url: str) -> int:
    attributes = boto3.client("sqs").get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


def test_dlq_list_shows_reason_run_step_and_age_and_keeps_the_messages(queues: Queues) -> None:
    poison = dead_letter(queues, "invalid_json", "run-a", "emit")
    exhausted = dead_letter(queues, "attempts_exhausted", "run-b", "join")
    result = cli("dlq", "--queue-url", queues.queue_url, "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["AGE", "REASON", "RUN", "STEP", "TASK", "DETAIL"]
    assert lines[-1] == "2 dead letter(s)"
    row = next(line for line in lines if poison in line).split()
    assert row[1:5] == ["invalid_json", "run-a", "emit", poison]
    assert row[0].endswith("h") and row[0][0].isdigit()  # months old: days and hours
    assert any(exhausted in line and "attempts_exhausted" in line for line in lines)

    as_json = cli("dlq", "--queue-url", queues.queue_url, "list", "--json")
    entries = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {e["task_id"]: e["reason"] for e in entries} == {
        poison: "invalid_json",
        exhausted: "attempts_exhausted",
    }
    assert all(e["original_receive_count"] == 5 for e in entries)
    # Listing gave the messages back at once.
    assert visible(queues.dlq_url) == 2


def test_dlq_redrive_moves_only_the_selected_dead_letters(queues: Queues) -> None:
    dead_letter(queues, "invalid_json", "run-a", "emit")
    chosen = dead_letter(queues, "attempts_exhausted", "run-b", "join")
    refused = cli("dlq", "--queue-url", queues.queue_url, "redrive")
    assert refused.returncode != 0 and "--all" in refused.stderr, refused.stderr
    result = cli(
        "dlq", "--queue-url", queues.queue_url, "redrive", "--reason", "attempts_exhausted"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("moved 1 of 2"), result.stdout
    moved = boto3.client("sqs").receive_message(
        QueueUrl=queues.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
    )["Messages"]
    assert [json.loads(m["Body"])["task_id"] for m in moved] == [chosen]
    left = cli("dlq", "--queue-url", queues.queue_url, "list", "--json")
    assert [json.loads(line)["reason"] for line in left.stdout.splitlines()] == ["invalid_json"]
