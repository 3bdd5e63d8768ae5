"""Never lose a step, never run one twice at once: controller crashes, SQS outages, injected
SQS faults, a hung bridge, a Dagster outage and bad input, end to end with real Dagster, moto
and real processes."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import jobs
import pytest
from bed import (
    Bed,
    alive,
    api,
    duplicate_the_first_message,
    lead_executions,
    metrics,
    run_in_background,
    running_pids,
    settled_records,
)
from conftest import VECTORS_DIR, only_run, start_run_worker, take_dead_letters, wait_for
from dagster import DagsterInstance, DagsterRunStatus, ReexecutionOptions, execute_job
from faultproxy import FaultProxy
from ledger import overlaps

from dagster_taskiq_controller_testing import faulty_bridge
from dagster_taskiq_controller_testing.postgres import PostgresServer
from dagster_taskiq_controller_testing.stack import Controller, MotoServer

pytestmark = pytest.mark.controller


def test_kill_9_of_the_controller_loses_nothing_and_never_overlaps_an_attempt(bed: Bed) -> None:
    first = bed.controller()
    thread, outcome = run_in_background(bed.instance, "ledger_fan")
    pids = wait_for(
        lambda: (p := running_pids(first)) and len(p) >= 3 and p, 90, "three steps running"
    )
    assert first.process is not None
    first.process.kill()  # SIGKILL: no drain, no release, no report
    first.process.wait(10)
    # Its children die with it (PR_SET_PDEATHSIG): nothing keeps running unleased.
    wait_for(lambda: not any(alive(p) for p in pids), 5, "the orphaned steps to die")

    second = bed.controller()
    thread.join(180)
    assert outcome.get("success") is True
    wait_for(bed.queue_empty, 60, "every message to be deleted")
    assert overlaps(bed.ledger) == []
    # The steps the crash killed were redelivered to the second controller and relaunched as
    # the same attempt (their first executions may have died before reaching the op code).
    seen = wait_for(lambda: settled_records(second), 30, "every step record to settle")
    relaunched = [r for r in seen if r["receive_count"] >= 2]
    assert len(relaunched) >= len(pids), relaunched
    assert all(r["state"] == "acked" for r in relaunched), relaunched


def test_one_copy_of_an_attempt_to_each_of_two_replicas_runs_it_once(bed: Bed) -> None:
    thread, outcome = run_in_background(bed.instance, "ledger_pair")
    duplicate_the_first_message(bed)
    # One message at a time each: the first takes one copy, the second the other.
    first = bed.controller("--max-concurrent", "1", "--prefetch", "0")
    wait_for(lambda: running_pids(first), 60, "the first copy to run")
    second = bed.controller("--max-concurrent", "1", "--prefetch", "0")
    thread.join(120)
    assert outcome.get("success") is True
    wait_for(bed.queue_empty, 60, "every message to be deleted")
    assert overlaps(bed.ledger) == []
    assert len(lead_executions(bed)) == 1, lead_executions(bed)
    # The second replica saw the first one's claim renewed and acknowledged its copy.
    assert 'dagster_taskiq_claims_total{result="duplicate"} 1' in metrics(second)
    assert bed.queue_empty(bed.queues.dlq_url), "nothing dead-lettered"


def test_both_copies_of_an_attempt_on_one_replica_run_it_once(bed: Bed) -> None:
    thread, outcome = run_in_background(bed.instance, "ledger_pair")
    duplicate_the_first_message(bed)
    bed.controller()
    thread.join(120)
    assert outcome.get("success") is True
    wait_for(bed.queue_empty, 60, "every message to be deleted")
    assert overlaps(bed.ledger) == []
    assert len(lead_executions(bed)) == 1, lead_executions(bed)


@pytest.fixture
def bed_with_own_moto(
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Bed, MotoServer]]:
    """A bed on a moto server of its own, for a test that freezes the server: the run's
    shared one serves the other xdist workers' tests."""
    with MotoServer() as moto:
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
        b = Bed(
            {**aws_env, "AWS_ENDPOINT_URL": moto.url}, dagster_home, instance, tmp_path, monkeypatch
        )
        try:
            yield b, moto
        finally:
            b.stop_all()


def test_an_sqs_outage_of_15_seconds_mid_run_loses_nothing(
    bed_with_own_moto: tuple[Bed, MotoServer],
) -> None:
    bed, moto = bed_with_own_moto
    assert moto.process is not None
    bed.controller("--visibility-timeout", "30")
    thread, outcome = run_in_background(bed.instance, "ledger_fan")
    wait_for(
        lambda: any(r["state"] == "running" for r in api(bed.controllers[0], "/api/v1/steps")),
        90,
        "a step running",
    )
    moto.process.send_signal(signal.SIGSTOP)  # moto keeps its state, answers nothing
    try:
        stopped_at = threading.Event()
        stopped_at.wait(15)
    finally:
        moto.process.send_signal(signal.SIGCONT)
    thread.join(180)
    assert outcome.get("success") is True
    wait_for(bed.queue_empty, 60, "every message to be deleted")
    assert overlaps(bed.ledger) == []
    assert bed.controllers[0].process is not None
    assert bed.controllers[0].process.poll() is None, "the controller survived the outage"


def bad_bodies() -> list[tuple[str, str]]:
    """(expected reason, body): the shared invalid vectors plus bodies SQS can carry that
    the vectors do not cover (sizes, unicode, bogus instance refs)."""
    bodies = []
    for path in sorted((VECTORS_DIR / "invalid").glob("*.json")):
        vector = json.loads(path.read_text())
        bodies.append((vector["error"], vector["body"]))
    valid = json.loads((VECTORS_DIR / "valid" / "ours_all_labels.json").read_text())["body"]
    message = json.loads(valid)
    packed = message["kwargs"]["execute_step_args_packed"]

    def variant(**changes: Any) -> str:
        m = json.loads(valid)
        for path, value in changes.items():
            target = m
            keys = path.split("__")
            for key in keys[:-1]:
                target = target[key]
            target[keys[-1]] = value
        return json.dumps(m)

    def with_step_key(key: str) -> str:
        return variant(
            labels__dagster_step_key=key,
            kwargs__execute_step_args_packed__step_keys_to_execute=[key],
        )

    bodies += [
        ("invalid_json", "x" * 200_000),
        ("invalid_json", "é" * 1000),
        ("invalid_shape", json.dumps({"task_id": "a" * 32, "unicode": "ünïcödé ✓"})),
        ("invalid_step_key", with_step_key("../../etc/passwd")),
        ("invalid_step_key", with_step_key("$(reboot)")),
        ("invalid_step_key", with_step_key("a\u0007b")),
        ("wrong_task_name", variant(task_name="os.system")),
        ("invalid_task_id", variant(task_id="a b")),
        # The message's instance is ignored (the controller's own is pinned): what remains is
        # a run that does not exist there.
        (
            "unknown_run",
            variant(
                kwargs__execute_step_args_packed={
                    **packed,
                    "instance_ref": {"__class__": "NotAnInstanceRef"},
                }
            ),
        ),
    ]
    return bodies


def test_a_corpus_of_bad_messages_is_dead_lettered_with_reasons_and_never_spawns(
    bed: Bed,
) -> None:
    controller = bed.controller()
    sqs = boto3.client("sqs")
    sent: dict[str, str] = {}
    for reason, body in bad_bodies():
        try:
            message_id = sqs.send_message(QueueUrl=bed.queues.queue_url, MessageBody=body)[
                "MessageId"
            ]
        except sqs.exceptions.ClientError:
            continue  # a body SQS itself refuses never reaches the controller
        sent[message_id] = reason
    assert len(sent) >= 40

    dead = {
        d["dagster_taskiq_original_message_id"]: d
        for d in take_dead_letters(bed.queues.dlq_url, len(sent), 120)
    }
    for message_id, reason in sent.items():
        attributes = dead[message_id]
        assert attributes["dagster_taskiq_error"] == reason, message_id
        assert attributes["dagster_taskiq_error_detail"]
    text = metrics(controller)
    assert "dagster_taskiq_steps_launched_total" not in text, "a bad message was spawned"
    assert controller.process is not None and controller.process.poll() is None
    wait_for(bed.queue_empty, 60, "the work queue to be empty")


@pytest.fixture
def proxy(moto_server: str) -> Iterator[FaultProxy]:
    p = FaultProxy(upstream=moto_server).start()
    try:
        yield p
    finally:
        p.stop()


def test_throttling_and_server_errors_are_retried_and_nothing_is_lost(
    bed: Bed, proxy: FaultProxy
) -> None:
    controller = bed.controller(endpoint=proxy.url)
    proxy.arm("ReceiveMessage", "throttle", times=3)
    proxy.arm("ReceiveMessage", "server_error", times=3)
    proxy.arm("DeleteMessage", "throttle", times=2)
    proxy.arm("DeleteMessage", "server_error", times=2)
    proxy.arm("ChangeMessageVisibilityBatch", "server_error", times=2)
    with execute_job(jobs.recon("diamond"), bed.instance) as result:
        assert result.success
    wait_for(bed.queue_empty, 60, "every message to be deleted")
    assert proxy.hits.get("ReceiveMessage:throttle") == 3
    assert proxy.hits.get("DeleteMessage:server_error") == 2
    text = metrics(controller)
    assert 'operation="ReceiveMessage",kind="throttled"' in text
    assert 'operation="DeleteMessage",kind="unavailable"' in text


def test_a_lost_lease_fences_the_step_and_the_attempt_is_relaunched_once(
    bed: Bed, proxy: FaultProxy
) -> None:
    controller = bed.controller("--visibility-timeout", "3", endpoint=proxy.url)
    thread, outcome = run_in_background(bed.instance, "ledger_fan")
    wait_for(lambda: running_pids(controller), 90, "a step running")
    proxy.arm("ChangeMessageVisibilityBatch", "invalid_handle", times=1)
    wait_for(lambda: 'outcome="fenced"' in metrics(controller), 30, "a step to be fenced")
    thread.join(180)
    assert outcome.get("success") is True
    wait_for(bed.queue_empty, 60, "every message to be deleted")
    assert overlaps(bed.ledger) == []
    # The message is deleted a moment before the record says so.
    seen = wait_for(lambda: settled_records(controller), 30, "every step record to settle")
    fenced = {r["task_id"] for r in seen if r["state"] == "fenced"}
    # A redelivered attempt is relaunched, or acknowledged without running when the fenced
    # child had already written its terminal event before it was killed.
    settled = {
        r["task_id"] for r in seen if r["receive_count"] >= 2 and r["state"] in ("acked", "skipped")
    }
    assert fenced and fenced <= settled, seen
    assert any(r["receive_count"] >= 2 and r["state"] == "acked" for r in seen), seen


def readiness(controller: Controller) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{controller.dashboard_url}/readyz", timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def dead(pid: int) -> bool:
    """Gone, or a zombie whose parent died too (nobody may reap it here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def dlq_empty(bed: Bed) -> bool:
    return bed.queue_empty(bed.queues.dlq_url)


def test_a_hung_bridge_is_killed_and_replaced_and_the_run_succeeds(bed: Bed) -> None:
    bridge_timeout = 5
    hang_file = bed.tmp_path / "bridge-hang"
    controller = bed.controller(
        "--bridge-module",
        faulty_bridge.MODULE,
        "--bridge-timeout",
        str(bridge_timeout),
        env={faulty_bridge.HANG_FILE_ENV: str(hang_file)},
    )
    thread, outcome = run_in_background(bed.instance, "ledger_fan")
    wait_for(lambda: running_pids(controller), 90, "a step running")
    hang_file.touch()
    # The next request hangs (the run-status poll asks every second).
    marker = faulty_bridge.hung_marker(hang_file)
    wait_for(marker.exists, 30, "the bridge to hang")
    hung = json.loads(marker.read_text())
    hang_file.unlink()  # the replacement answers
    seen_reasons: set[str] = set()

    def ready() -> bool:
        status, body = readiness(controller)
        seen_reasons.update(body.get("reasons", []))
        return status == 200

    # Killed with its process group at the deadline, not left running beside the new one.
    wait_for(
        lambda: (ready() or True) and dead(hung["pid"]) and dead(hung["child"]),
        bridge_timeout + 10,
        "the hung bridge and its child to be killed",
    )
    killed_after = time.time() - hung["at"]
    assert killed_after < bridge_timeout + 2, killed_after

    def replaced() -> bool:
        return ready() and 'cause="timeout"} 1' in metrics(controller)

    wait_for(replaced, bridge_timeout + 60, "a new bridge to answer")
    replaced_after = time.time() - hung["at"]
    assert "bridge_restarting" in seen_reasons, seen_reasons
    print(f"hung bridge killed {killed_after:.1f}s, answering again {replaced_after:.1f}s after")
    thread.join(180)
    assert outcome.get("success") is True
    wait_for(bed.queue_empty, 60, "every message to be deleted")
    assert dlq_empty(bed)
    assert overlaps(bed.ledger) == []


def test_a_dagster_outage_of_a_minute_spends_no_attempts_and_the_run_succeeds(bed: Bed) -> None:
    fail_file = bed.tmp_path / "dagster-down"
    controller = bed.controller(
        "--bridge-module",
        faulty_bridge.MODULE,
        "--max-attempts",
        "2",
        env={faulty_bridge.FAIL_FILE_ENV: str(fail_file)},
    )
    thread, outcome = run_in_background(bed.instance, "outage_mix")
    wait_for(lambda: running_pids(controller), 90, "a step running")
    fail_file.touch()  # every bridge call that reads or writes the instance raises
    outage_began = time.monotonic()
    _, body = wait_for(
        lambda: (r := readiness(controller))[0] == 503 and r, 30, "/readyz to say not ready"
    )
    assert body["reasons"] == ["dagster_unreachable"], body
    assert body["checks"]["dagster_unreachable"][0]["cause"] == "storage", body
    text = wait_for(
        lambda: (
            (t := metrics(controller))
            and "dagster_taskiq_intake_paused 1" in t
            and re.search(r"^dagster_taskiq_bridge_calls_held [1-9]", t, re.M)
            and t
        ),
        30,
        "the intake to pause and a step to wait for Dagster",
    )
    assert 'dagster_taskiq_dagster_unreachable{cause="storage"} 1' in text
    # A minute of outage, far past --max-attempts 2 with a 3 s backoff cap: still not ready,
    # nothing dead-lettered, nothing given back.
    threading.Event().wait(max(0.0, 60 - (time.monotonic() - outage_began)))
    assert readiness(controller)[0] == 503
    assert dlq_empty(bed)
    text = metrics(controller)
    assert "messages_dead_lettered_total" not in text
    assert "messages_released_total" not in text
    fail_file.unlink()

    thread.join(180)
    assert outcome.get("success") is True
    wait_for(bed.queue_empty, 60, "every message to be deleted")
    assert dlq_empty(bed)
    assert readiness(controller)[0] == 200
    records = wait_for(lambda: settled_records(controller), 30, "every step record to settle")
    # The outage charged no delivery: every message was received once.
    assert {r["receive_count"] for r in records} == {1}, records
    assert overlaps(bed.ledger) == []


OUTAGE_SECONDS = 180
RUN_WORKER_LOST = "Detected run worker status WorkerStatus.FAILED. Marking run {run_id} as failed."


def acked(text: str, outcome: str) -> int:
    found = re.search(
        rf'^dagster_taskiq_messages_acked_total{{outcome="{outcome}"}} (\d+)', text, re.M
    )
    return int(found.group(1)) if found else 0


def steps_of(seconds: float) -> dict[str, Any]:
    """Run config of ledger_fan whose steps take ``seconds`` each."""
    return {"ops": {op.name: {"config": {"seconds": seconds}} for op in jobs.LEDGER_OPS}}


@pytest.mark.starts_first
@pytest.mark.parametrize("dagster_storage", ["postgres"])
def test_three_minutes_without_the_database_dead_letter_nothing_and_the_run_reexecutes(
    bed: Bed, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """The whole database stops for three minutes mid-run (a clean shutdown of the server, then
    a start on the same port and data): the run worker, the controller and its steps all lose
    it at once. The server is this session's (one per xdist worker, whose tests run one after
    another), so stopping it takes no other test's database away; it is started again whatever
    happens.

    The run worker is a process of its own (``dagster job execute``). dagster-postgres opens a
    connection per call and retries only the connect, five times over about 6 s, and the
    step-delegating executor reads the event log every second: a run worker dies of an outage
    that long (path "run worker died"). Dagster's run monitoring then marks the run failed (a
    launcher whose health check finds the worker gone: ``report_run_failed``, done here as the
    daemon does, the default launcher has no health check); the controller acknowledges the
    run's remaining messages unrun and a re-execution from failure succeeds. A run worker
    still alive after the outage (path "run worker survived") must finish the run."""
    controller = bed.controller("--max-attempts", "2", "--max-concurrent", "1")
    # Six steps of 3 s, one at a time: most are still queued when the database goes.
    run_worker = start_run_worker("ledger_fan", tmp_path, steps_of(3.0))
    try:
        run = wait_for(lambda: only_run(bed.instance), 60, "the run to be created")
        wait_for(lambda: running_pids(controller), 90, "a step running")
        postgres_server.stop()
        try:
            stopped_at = time.monotonic()
            _, body = wait_for(
                lambda: (r := readiness(controller))[0] == 503 and r, 60, "/readyz to say not ready"
            )
            assert "dagster_unreachable" in body["reasons"], body
            # Far past --max-attempts 2 with a 3 s backoff cap: nothing dead-lettered.
            threading.Event().wait(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped_at)))
            assert readiness(controller)[0] == 503
            assert dlq_empty(bed)
            assert "messages_dead_lettered_total" not in metrics(controller)
        finally:
            postgres_server.start()

        # Alive or not, the run worker ends: it finishes the run, or it fails of the outage.
        wait_for(lambda: run_worker.poll() is not None, 300, "the run worker to exit")
        worker_died = run_worker.returncode != 0
        lost = bed.instance.get_run_by_id(run.run_id)
        assert lost is not None
        print(f"path: run worker {'died' if worker_died else 'survived'}, run {lost.status}")
        if worker_died and lost.status == DagsterRunStatus.STARTED:
            # It died with the database down and could not say so: run monitoring's move.
            bed.instance.report_run_failed(lost, RUN_WORKER_LOST.format(run_id=run.run_id))
        wait_for(bed.queue_empty, 120, "every message to be deleted")
        assert dlq_empty(bed)
        wait_for(lambda: readiness(controller)[0] == 200, 30, "/readyz to say ready again")
        records = wait_for(lambda: settled_records(controller), 30, "every step record to settle")
        print("records:", sorted((r["state"], r["receive_count"]) for r in records))
        text = metrics(controller)
        print(
            "\n".join(x for x in text.splitlines() if "acked_total" in x or "finished_total" in x)
        )
        assert "messages_dead_lettered_total" not in text
        ended = bed.instance.get_run_by_id(run.run_id)
        assert ended is not None
        if worker_died:
            assert ended.status == DagsterRunStatus.FAILURE
            assert acked(text, "run_ended") + acked(text, "already_finished") >= 1, text
            options = ReexecutionOptions.from_failure(run.run_id, bed.instance)
            with execute_job(
                jobs.recon("ledger_fan"),
                bed.instance,
                run_config=steps_of(0.2),
                reexecution_options=options,
            ) as r:
                assert r.success
        else:
            assert ended.status == DagsterRunStatus.SUCCESS
        wait_for(bed.queue_empty, 60, "every message to be deleted")
        assert dlq_empty(bed)
        assert overlaps(bed.ledger) == []
    finally:
        if run_worker.poll() is None:
            run_worker.kill()
        run_worker.wait()
