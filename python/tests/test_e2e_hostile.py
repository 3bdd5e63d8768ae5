"""Hostile step messages against the real binary, moto and real Dagster: a message names the
run and step to execute, and nothing else it says chooses what runs, where, or with which
configuration (docs/security.md). Each test checks that the hostile part did nothing and that
the controller recorded it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import jobs
from bed import Bed, api, metrics, put_back, run_in_background, take_messages
from conftest import take_dead_letters, wait_for
from dagster import DagsterEventType, execute_job

from dagster_taskiq_controller_testing.hostile_import import MARKER_ENV

HOSTILE_MODULE = "dagster_taskiq_controller_testing.hostile_import"


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
    instance, and none of it happens. The controller names its instance with --dagster-home,
    over a DAGSTER_HOME of its environment that points elsewhere: the flag wins for the bridge
    and for every step."""
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

    decoy_home = tmp_path / "decoy-home"
    decoy_home.mkdir()
    controller = bed.controller(
        "--dagster-home",
        str(bed.dagster_home),
        env={MARKER_ENV: str(import_marker), "DAGSTER_HOME": str(decoy_home)},
    )
    thread.join(120)
    assert outcome.get("success") is True, "every step ran against the controller's instance"
    assert not handler_marker.exists(), "the message's logging handler ran"
    assert not import_marker.exists(), "the message's instance class was imported"
    assert not elsewhere.exists(), "a storage of the message's instance was opened"
    assert list(decoy_home.iterdir()) == [], "the environment's DAGSTER_HOME was used"
    # Another instance class and another run storage class are counted; another directory
    # is not (paths differ legitimately between hosts).
    counted = [line for line in metrics(controller).splitlines() if "foreign_instance" in line]
    assert "dagster_taskiq_foreign_instance_refs_total 2" in counted, counted


def dead_letters(bed: Bed, count: int) -> dict[str, dict[str, str]]:
    """The next `count` dead letters (taken off the DLQ), by original message id."""
    dead = take_dead_letters(bed.queues.dlq_url, count, 120)
    return {d["dagster_taskiq_original_message_id"]: d for d in dead}


def test_op_tags_a_message_adds_to_its_step_are_refused_and_the_step_never_runs(
    bed: Bed,
) -> None:
    """A sender rewrites a live run's step message to launch it in an ECS task definition of
    its choosing: the tags are not the ones the run stored for the step, so the step is
    refused with a verdict (the run fails, as the message cannot be trusted) and never
    starts."""
    thread, outcome = run_in_background(bed.instance, "diamond")
    (message,) = take_messages(bed, 1)
    body = json.loads(message["Body"])
    tags = json.loads(body["labels"].get("dagster_tags", "{}"))
    tags["ecs/run_task_kwargs"] = json.dumps({"taskDefinition": "admin-tools"})
    body["labels"]["dagster_tags"] = json.dumps(tags, sort_keys=True)
    boto3.client("sqs").send_message(QueueUrl=bed.queues.queue_url, MessageBody=json.dumps(body))

    bed.controller()
    thread.join(120)
    assert outcome.get("success") is False
    run_id = outcome["run_id"]
    (dead,) = dead_letters(bed, 1).values()
    assert dead["dagster_taskiq_error"] == "tags_mismatch", dead
    detail = dead["dagster_taskiq_error_detail"]
    assert "ecs/run_task_kwargs differ" in detail and "verdict recorded" in detail, detail
    started = bed.instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_START).records
    assert started == [], "the refused step started"
    failure = bed.instance.get_records_for_run(
        run_id, of_type=DagsterEventType.STEP_FAILURE
    ).records
    assert [r.event_log_entry.step_key for r in failure] == ["emit"]


def test_extended_payloads_from_a_foreign_bucket_or_over_the_limit_are_dead_lettered_unread(
    bed: Bed,
) -> None:
    """Two extended (S3) pointers carry a real step of a waiting run: one to a bucket outside
    --payload-bucket, one to an object over --max-payload-bytes. Neither runs; each is
    dead-lettered with its reason. The step's own message then runs it."""
    s3 = boto3.client("s3")
    suffix = uuid.uuid4().hex[:10]
    allowed, foreign = f"payloads-{suffix}", f"foreign-{suffix}"
    for bucket in (allowed, foreign):
        s3.create_bucket(Bucket=bucket)
    thread, outcome = run_in_background(bed.instance, "diamond")
    (message,) = take_messages(bed, 1)
    body = json.loads(message["Body"])
    key = f"{body['task_id']}.json"
    # As is, in the foreign bucket: fetched, it would run.
    s3.put_object(Bucket=foreign, Key=key, Body=message["Body"].encode())
    # Padded past the limit, in the allowed bucket.
    body["kwargs"]["executable_dict"]["padding"] = "x" * 300_000
    s3.put_object(Bucket=allowed, Key=key, Body=json.dumps(body).encode())
    sqs = boto3.client("sqs")
    extended = {"s3_extended_message": {"DataType": "String", "StringValue": "True"}}
    reasons = {}
    for bucket, reason in ((foreign, "extended_payload_refused"), (allowed, "too_large")):
        pointer = json.dumps({"s3_bucket": bucket, "s3_key": key})
        sent = sqs.send_message(
            QueueUrl=bed.queues.queue_url, MessageBody=pointer, MessageAttributes=extended
        )
        reasons[sent["MessageId"]] = reason

    controller = bed.controller("--payload-bucket", allowed, "--max-payload-bytes", "262144")
    dead = dead_letters(bed, 2)
    details = {}
    for message_id, reason in reasons.items():
        assert dead[message_id]["dagster_taskiq_error"] == reason, dead
        details[reason] = dead[message_id]["dagster_taskiq_error_detail"]
    refused = details["extended_payload_refused"]
    assert f'bucket "{foreign}" is not in --payload-bucket' in refused, refused
    too_large = details["too_large"]
    assert "over the --max-payload-bytes limit of 262144 bytes" in too_large, too_large
    assert "xxxxxxxx" not in too_large, "the detail quotes the payload"
    assert "dagster_taskiq_steps_launched_total" not in metrics(controller), "a pointer ran"

    put_back(bed, message)
    thread.join(180)
    assert outcome.get("success") is True, "the run completes from the step's own message"


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


LINE_BOUND = 8192
MIB = 1 << 20


def test_an_unbounded_output_line_is_cut_and_the_controllers_memory_stays_bounded(
    bed: Bed,
) -> None:
    """A step prints 64 MiB with no newline on stdout, then as much on stderr. It completes;
    each line reaches the log (and stderr the step's tail) cut at 8 KiB with a marker; the
    controller's peak RSS grows less than 32 MiB over its peak after a quiet run of the same
    job (a line held whole until its end takes 64 MiB, twice that while its buffer grows)."""
    controller = bed.controller(env={"RUST_LOG": "info,step::stdout=debug"})
    assert controller.process is not None and controller.log_path is not None
    pid = controller.process.pid

    def run(mebibytes: int) -> str:
        run_config = {"ops": {"loud_op": {"config": {"mebibytes": mebibytes}}}}
        with execute_job(jobs.recon("loud"), bed.instance, run_config=run_config) as result:
            assert result.success
            return result.run_id

    run(0)
    baseline = peak_rss_kib(pid)
    run_id = run(64)
    growth = peak_rss_kib(pid) - baseline
    assert growth < 32 * 1024, f"peak RSS grew {growth} KiB over {baseline} KiB"

    # Each line is logged as its first 8 KiB and a marker. (Dagster's compute-log capture
    # mirrors a step's output through a `tail` it stops at the step's end, so the controller
    # may see less than the op's 64 MiB: the marker counts what it saw.)
    # The run may end before the controller reads the ends of the step's pipes.
    log_path = controller.log_path

    def cut_lines() -> list[tuple[str, str]] | None:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        found = re.findall(
            rf"(step::std(?:out|err)): x{{{LINE_BOUND}}} …\[truncated (\d+) bytes\]$",
            re.sub(r"\x1b\[[0-9;]*m", "", text),
            re.MULTILINE,
        )
        return found if len(found) == 2 else None

    found = wait_for(cut_lines, 30, "both cut lines in the controller's log")
    assert sorted(stream for stream, _ in found) == ["step::stderr", "step::stdout"]
    assert all(int(n) > MIB for _, n in found), found

    def settled() -> list[dict[str, Any]]:
        records = api(controller, f"/api/v1/steps?run={run_id}")
        return [r for r in records if not r["active"]]

    (record,) = wait_for(settled, 30, "the step's record to settle")
    tail = record["stderr_tail"]
    (long_line,) = [line for line in tail if "…[truncated" in line]
    assert long_line.startswith("x" * LINE_BOUND), long_line[:100]
    assert max(len(line.encode()) for line in tail) < LINE_BOUND + 64
