"""Hostile step messages against the real binary, moto and real Dagster: a message names the
run and step to execute, and nothing else it says chooses what runs, where, or with which
configuration (docs/security.md). Each test checks that the hostile part did nothing and that
the controller recorded it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
from bed import Bed, metrics, run_in_background
from conftest import wait_for

from dagster_taskiq_controller_testing.hostile_import import MARKER_ENV

HOSTILE_MODULE = "dagster_taskiq_controller_testing.hostile_import"


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


def builds_and_acts(ref: dict[str, Any], marker: Path) -> bool:
    """Whether building a Dagster instance from `ref`, as the message asks, would touch
    `marker`: proves the hostile ref is live, so the controller's test below can fail."""
    code = (
        "import json, sys\n"
        "from dagster import DagsterInstance\n"
        "from dagster._serdes import deserialize_value\n"
        "ref = deserialize_value(json.dumps(json.loads(sys.argv[1])))\n"
        "try:\n"
        "    DagsterInstance.from_ref(ref)\n"
        "except Exception:\n"
        "    pass\n"
    )
    env = {**os.environ, MARKER_ENV: str(marker)}
    subprocess.run([sys.executable, "-c", code, json.dumps(ref)], env=env, timeout=60, check=False)
    acted = marker.exists()
    marker.unlink(missing_ok=True)
    return acted


def test_hostile_instance_refs_are_ignored_and_the_steps_run_on_the_controllers_instance(
    bed: Bed, tmp_path: Path
) -> None:
    """Four messages of one run each name a hostile Dagster instance: a logging handler that
    runs a command, an instance class from a module that acts on import, storages in another
    directory, and a run storage in another database. Each step runs against the controller's
    instance, and none of it happens."""
    handler_marker = tmp_path / "hostile-handler-ran"
    import_marker = tmp_path / "hostile-module-imported"
    elsewhere = tmp_path / "elsewhere"
    thread, outcome = run_in_background(bed.instance, "tagged_fan")
    messages = take_messages(bed, 5)
    bodies = [json.loads(m["Body"]) for m in messages]
    refs = [b["kwargs"]["execute_step_args_packed"]["instance_ref"] for b in bodies]

    handler = {"()": "os.system", "command": f"touch {handler_marker}"}
    refs[0]["settings"] = {"python_logs": {"dagster_handler_config": {"handlers": {"x": handler}}}}

    refs[1]["custom_instance_class_data"] = {
        "__class__": "ConfigurableClassData",
        "module_name": HOSTILE_MODULE,
        "class_name": "Instance",
        "config_yaml": "{}\n",
    }
    assert builds_and_acts(refs[1], import_marker), "the hostile instance class is not live"

    for storage in ("run_storage_data", "event_storage_data", "schedule_storage_data"):
        refs[2][storage]["config_yaml"] = f"base_dir: {elsewhere / storage}\n"

    refs[3]["run_storage_data"].update(
        module_name="dagster_postgres.run_storage",
        class_name="PostgresRunStorage",
        config_yaml="postgres_url: postgresql://attacker.invalid/db\n",
    )
    sqs = boto3.client("sqs")
    for message, body in zip(messages, bodies, strict=True):
        sqs.send_message(
            QueueUrl=bed.queues.queue_url,
            MessageBody=json.dumps(body),
            MessageAttributes=message.get("MessageAttributes", {}),
        )

    controller = bed.controller(env={MARKER_ENV: str(import_marker)})
    thread.join(120)
    assert outcome.get("success") is True, "every step ran against the controller's instance"
    assert not handler_marker.exists(), "the message's logging handler ran"
    assert not import_marker.exists(), "the message's instance class was imported"
    assert not elsewhere.exists(), "a storage of the message's instance was opened"
    # Another instance class and another run storage class are counted; another directory
    # is not (paths differ legitimately between hosts).
    counted = [line for line in metrics(controller).splitlines() if "foreign_instance" in line]
    assert "dagster_taskiq_foreign_instance_refs_total 2" in counted, counted
