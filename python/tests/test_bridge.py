"""The bridge sidecar as the controller sees it: a real subprocess speaking JSON lines."""

import json
import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import dagster
import pytest
import sqlalchemy
from conftest import child_env, make_dagster_home, wait_for
from dagster import (
    DagsterEventType,
    DagsterInstance,
    OpExecutionContext,
    RetryPolicy,
    in_process_executor,
    job,
    op,
)
from dagster._core.definitions.metadata import UrlMetadataValue
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.events.log import EventLogEntry
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._serdes import deserialize_value, pack_value

from dagster_taskiq_controller import contract
from dagster_taskiq_controller.bridge import ShardWatcher
from dagster_taskiq_controller_testing.postgres import (
    PostgresServer,
    TcpRelay,
    write_dagster_yaml,
)

DEADLINE = 30.0


@op(retry_policy=RetryPolicy(max_retries=1))
def first(context: OpExecutionContext) -> int:
    if context.retry_number == 0:
        raise RuntimeError("first attempt fails")
    return 1


@op
def second(x: int) -> int:
    return x + 1


@job(executor_def=in_process_executor)
def tiny() -> None:
    second(first())


class BridgeProcess:
    """The bridge subprocess with a reader thread, so every read has a deadline."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dagster_taskiq_controller.bridge"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._lines: queue.Queue[bytes] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()
        self._next_id = 0

    def _pump(self, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):
            self._lines.put(line)

    def _drain(self, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):
            self.stderr.append(line.decode(errors="replace"))

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"no bridge response; stderr: {''.join(self.stderr)}") from None
        return json.loads(line)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        request_id = self._next_id
        self.write(json.dumps({"id": request_id, "method": method, "params": params}).encode())
        self.write(b"\n")
        response = self.read()
        assert response["id"] == request_id
        return response

    def result(self, method: str, **params: Any) -> dict[str, Any]:
        response = self.call(method, **params)
        assert response["ok"], response
        return response["result"]

    def close(self) -> int:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


class World:
    """A Dagster home with one finished run of ``tiny`` and one run that never started."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
        result = tiny.execute_in_process(instance=self.instance, raise_on_error=False)
        assert result.success
        self.done_run_id = result.run_id
        pending = self.instance.create_run_for_job(job_def=tiny)
        self.pending_run_id = pending.run_id
        self.ref = pack_value(self.instance.get_ref())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    home = make_dagster_home(tmp_path_factory.mktemp("bridge") / "dagster_home")
    w = World(home)
    yield w
    w.instance.dispose()


def _start(world: World) -> Iterator[BridgeProcess]:
    proc = BridgeProcess(child_env(DAGSTER_HOME=str(world.home)))
    yield proc
    if proc.proc.poll() is None:
        proc.close()


@pytest.fixture(scope="module")
def bridge(world: World) -> Iterator[BridgeProcess]:
    """One bridge shared by the module's tests, as the controller shares one."""
    yield from _start(world)


@pytest.fixture
def own_bridge(world: World) -> Iterator[BridgeProcess]:
    """A bridge for a test that ends it."""
    yield from _start(world)


def _engine_events(world: World, run_id: str, step_key: str) -> list[Any]:
    conn = world.instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT)
    return [
        r.event_log_entry.dagster_event
        for r in conn.records
        if r.event_log_entry.dagster_event and r.event_log_entry.dagster_event.step_key == step_key
    ]


def test_ping_describes_the_pinned_instance(bridge: BridgeProcess, world: World) -> None:
    assert "instance_ref" not in bridge.result("ping"), "a plain ping opens nothing"
    result = bridge.result("ping", describe=True)
    assert result["dagster_version"] == dagster.__version__
    assert result["pid"] == bridge.proc.pid
    # The steps get this ref in their args: the instance of the bridge's DAGSTER_HOME.
    ref = deserialize_value(json.dumps(result["instance_ref"]), InstanceRef)
    assert ref == world.instance.get_ref()
    assert result["storages"]["run_storage_data"] == "dagster.core.storage.runs.SqliteRunStorage"


def hostile_ref(world: World, marker: Path) -> dict[str, Any]:
    """The world's instance ref with a logging handler that runs a command when built."""
    ref = json.loads(json.dumps(world.ref))
    handler = {"()": "os.system", "command": f"touch {marker}"}
    ref["settings"] = {"python_logs": {"dagster_handler_config": {"handlers": {"x": handler}}}}
    ref["run_storage_data"]["config_yaml"] = "base_dir: /tmp/somewhere-else\n"
    return ref


def test_every_request_uses_the_pinned_instance_whatever_it_names(
    bridge: BridgeProcess, world: World, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    run_ids = [world.done_run_id, world.pending_run_id, "no-such-run"]
    for ref in (None, world.ref, hostile_ref(world, marker), {"__class__": "Nope"}, "junk"):
        result = bridge.result("run_status", instance_ref=ref, run_ids=run_ids)
        assert result == {
            "statuses": {
                world.done_run_id: "SUCCESS",
                world.pending_run_id: "NOT_STARTED",
                "no-such-run": None,
            }
        }
    assert not marker.exists()


def test_ping_with_an_instance_reads_its_storage(bridge: BridgeProcess, world: World) -> None:
    result = bridge.result("ping", instance_ref=world.ref, run_id=world.done_run_id)
    assert result["storage"] == "ok"
    # null: the bridge's own DAGSTER_HOME instance, the same one here.
    assert bridge.result("ping", instance_ref=None)["storage"] == "ok"
    assert "storage" not in bridge.result("ping")
    response = bridge.call("ping", instance_ref=world.ref, run_id=7)
    assert response["error"]["kind"] == "bad_request", response


def test_ping_with_an_instance_whose_storage_fails_is_an_internal_error(tmp_path: Path) -> None:
    # The run database cannot be opened (a directory where the file should be): what the
    # controller sees of a database that is down.
    home = make_dagster_home(tmp_path / "broken_home")
    (home / "history" / "runs.db").mkdir(parents=True)
    proc = BridgeProcess(child_env(DAGSTER_HOME=str(home)))
    try:
        response = proc.call("ping", instance_ref=None)
        assert not response["ok"]
        assert response["error"]["kind"] == "internal"
        assert "unable to open database file" in response["error"]["message"]
        # The bridge itself goes on answering.
        assert proc.result("ping")["pid"] == proc.proc.pid
    finally:
        proc.close()


def test_step_state_counts_terminal_events(bridge: BridgeProcess, world: World) -> None:
    def state(step_key: str, attempt: int) -> dict[str, Any]:
        return bridge.result(
            "step_state",
            instance_ref=world.ref,
            run_id=world.done_run_id,
            step_key=step_key,
            attempt=attempt,
        )

    # first: STEP_UP_FOR_RETRY (attempt 0) then STEP_SUCCESS (attempt 1)
    first = state("first", 0)
    # The step as the run stored it: the launch settings a message must carry.
    # No code location: the run was launched without a workspace.
    # No image on the run's origin, no executor env_vars or secrets.
    no_ecs = {"image": None, "env_vars": [], "secrets": []}
    assert first.pop("stored_step") == {
        "found": True,
        "tags": {},
        "job_name": "tiny",
        "location": None,
        "ecs": no_ecs,
    }
    # The attempt's failure, as the controller reads it to name a memory limit.
    assert first.pop("failure_classes") == ["RetryRequestedFromPolicy", "RuntimeError"]
    assert first == {
        "run_status": "SUCCESS",
        "terminal_events": 2,
        "attempt_finished": True,
        "last_terminal": "STEP_SUCCESS",
    }
    assert state("first", 1)["failure_classes"] == []
    assert "failure_classes" not in state("first", 2)
    assert state("not_a_step", 0)["stored_step"] == {
        "found": False,
        "tags": {},
        "job_name": "tiny",
        "location": None,
        "ecs": no_ecs,
    }
    assert state("first", 1)["attempt_finished"] is True
    assert state("first", 2)["attempt_finished"] is False
    assert state("second", 0)["terminal_events"] == 1
    assert state("second", 1)["attempt_finished"] is False
    missing = bridge.result(
        "step_state", instance_ref=None, run_id="no-such-run", step_key="first", attempt=0
    )
    assert missing == {
        "run_status": None,
        "terminal_events": 0,
        "attempt_finished": False,
        "last_terminal": None,
    }

    # The same checks in one request, as the controller sends those of one receive: each
    # entry answered as its own step_state, a bad entry failing alone.
    asked = [("first", 0), ("second", 1), ("not_a_step", 0), ("first", 2)]
    entries: list[Any] = [
        {"run_id": world.done_run_id, "step_key": step_key, "attempt": attempt}
        for step_key, attempt in asked
    ]
    entries += [
        {"run_id": "no-such-run", "step_key": "first", "attempt": 0},
        {"run_id": world.done_run_id, "step_key": "first", "attempt": -1},
        "not an object",
    ]
    states = bridge.result("step_states", instance_ref=None, steps=entries)["states"]
    assert len(states) == len(entries)
    for (step_key, attempt), answer in zip(asked, states, strict=False):
        # Only step_state, the check after an attempt's exit, reads its failure.
        alone = state(step_key, attempt)
        alone.pop("failure_classes", None)
        assert answer == {"ok": True, "result": alone}
    assert states[4] == {"ok": True, "result": missing}
    assert states[5]["ok"] is False and states[5]["error"]["kind"] == "bad_request"
    assert states[6]["ok"] is False and states[6]["error"]["kind"] == "bad_request"
    too_many = bridge.call("step_states", steps=entries[:1] * 101)
    assert too_many["ok"] is False and too_many["error"]["kind"] == "bad_request"
    assert bridge.result("ping")["protocol"] == 2


def test_pipelined_requests(bridge: BridgeProcess, world: World) -> None:
    requests = [
        {"id": 100, "method": "ping", "params": {}},
        {"id": "b", "method": "run_status", "params": {"run_ids": [world.done_run_id]}},
        {
            "id": 102,
            "method": "step_state",
            "params": {"run_id": world.done_run_id, "step_key": "second", "attempt": 0},
        },
        {"id": 103, "method": "nope", "params": {}},
        {"id": 104, "method": "ping"},
    ]
    bridge.write(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
    responses = {}
    for _ in requests:
        response = bridge.read()
        responses[response["id"]] = response
    assert set(responses) == {100, "b", 102, 103, 104}
    assert responses["b"]["result"]["statuses"][world.done_run_id] == "SUCCESS"
    assert responses[102]["result"]["attempt_finished"] is True
    assert responses[103]["ok"] is False
    assert responses[103]["error"]["kind"] == "bad_request"
    assert responses[104]["ok"] is True


def test_bad_lines_get_errors_and_the_loop_goes_on(own_bridge: BridgeProcess) -> None:
    bridge = own_bridge
    bridge.write(b"this is not json\n")
    response = bridge.read()
    assert response["id"] is None and response["ok"] is False
    assert response["error"]["kind"] == "bad_request"
    bridge.write(b"[1, 2]\n\n\xff\xfe\n")
    assert bridge.read()["error"]["kind"] == "bad_request"
    assert bridge.read()["error"]["kind"] == "bad_request"  # not UTF-8; blank line ignored
    assert bridge.call("step_state", run_id="x")["error"]["kind"] == "bad_request"
    assert bridge.call("step_state", run_id="x", step_key="s", attempt=-1)["ok"] is False
    assert bridge.result("ping")["pid"] == bridge.proc.pid
    assert bridge.close() == 0


def test_unknown_run_is_not_found(bridge: BridgeProcess) -> None:
    response = bridge.call(
        "report_verdict",
        instance_ref=None,
        run_id="no-such-run",
        step_key="first",
        attempt=0,
        task_id="t",
        verdict="v",
        exit="signal 9",
        stderr_tail="",
    )
    assert response["ok"] is False and response["error"]["kind"] == "not_found"
    response = bridge.call(
        "report_event", run_id="no-such-run", step_key="first", message="m", metadata={}
    )
    assert response["error"]["kind"] == "not_found"


def test_report_verdict_is_idempotent(bridge: BridgeProcess, world: World) -> None:
    task_id = contract.step_task_id(world.pending_run_id, "first", 0)
    params = {
        "instance_ref": world.ref,
        "run_id": world.pending_run_id,
        "step_key": "first",
        "attempt": 0,
        "task_id": task_id,
        "verdict": "process killed by signal 9 (SIGKILL)",
        "exit": "signal 9",
        "stderr_tail": "line 1\nline 2\n",
    }
    assert bridge.result("report_verdict", **params) == {
        "written": True,
        "attempt_finished": False,
    }
    # the controller retries the same report: nothing new is written
    assert bridge.result("report_verdict", **params) == {
        "written": False,
        "attempt_finished": False,
    }
    events = [
        e
        for e in _engine_events(world, world.pending_run_id, "first")
        if contract.META_VERDICT in e.engine_event_data.metadata
    ]
    assert len(events) == 1
    metadata = {k: v.value for k, v in events[0].engine_event_data.metadata.items()}
    assert metadata == {
        contract.META_VERDICT: "process killed by signal 9 (SIGKILL)",
        contract.META_ATTEMPT: 0,
        contract.META_TASK_ID: task_id,
        contract.META_EXIT: "signal 9",
        contract.META_STDERR_TAIL: "line 1\nline 2\n",
    }
    assert events[0].message == (
        "dagster-taskiq-controller: step attempt 0 of first failed: "
        "process killed by signal 9 (SIGKILL)"
    )
    # the next attempt is a different verdict
    params.update(attempt=1, task_id=contract.step_task_id(world.pending_run_id, "first", 1))
    assert bridge.result("report_verdict", **params)["written"] is True


def test_report_verdict_refused_after_terminal_event(bridge: BridgeProcess, world: World) -> None:
    before = len(_engine_events(world, world.done_run_id, "second"))
    result = bridge.result(
        "report_verdict",
        instance_ref=world.ref,
        run_id=world.done_run_id,
        step_key="second",
        attempt=0,
        task_id=contract.step_task_id(world.done_run_id, "second", 0),
        verdict="exited 0 without a terminal event",
        exit="exit code 0",
        stderr_tail="",
    )
    assert result == {"written": False, "attempt_finished": True}
    assert len(_engine_events(world, world.done_run_id, "second")) == before


def test_report_event(bridge: BridgeProcess, world: World) -> None:
    result = bridge.result(
        "report_event",
        instance_ref=world.ref,
        run_id=world.pending_run_id,
        step_key="second",
        message="dagster-taskiq-controller: relaunching attempt 0 (lease lost)",
        metadata={"reason": "lease lost", "host": "controller-1"},
    )
    assert result == {"written": True}
    events = wait_for(
        lambda: [
            e
            for e in _engine_events(world, world.pending_run_id, "second")
            if "relaunching" in (e.message or "")
        ],
        timeout=5,
        what="informational engine event",
    )
    metadata = {k: v.value for k, v in events[0].engine_event_data.metadata.items()}
    assert metadata == {"reason": "lease lost", "host": "controller-1"}
    bad = bridge.call("report_event", run_id=world.pending_run_id, message="m", metadata=[1])
    assert bad["error"]["kind"] == "bad_request"


def test_links_become_url_metadata_and_only_http_links_are_taken(
    bridge: BridgeProcess, world: World
) -> None:
    task = "https://us-east-1.console.aws.amazon.com/ecs/v2/clusters/c/tasks/t1?region=us-east-1"
    logs = "https://us-east-1.console.aws.amazon.com/cloudwatch/home?region=us-east-1#logsV2:x"
    base = {
        "instance_ref": world.ref,
        "run_id": world.pending_run_id,
        "step_key": "second",
        "metadata": {},
    }
    result = bridge.result(
        "report_event",
        **base,
        message="dagster-taskiq-controller: attempt 0 of second runs as t1",
        links={"ecs_task": task, "cloudwatch_logs": logs},
    )
    assert result == {"written": True}
    (event,) = [
        e
        for e in _engine_events(world, world.pending_run_id, "second")
        if "runs as t1" in (e.message or "")
    ]
    metadata = event.engine_event_data.metadata
    for kind, url in (("ecs_task", task), ("cloudwatch_logs", logs)):
        value = metadata[contract.META_LINK_PREFIX + kind]
        assert isinstance(value, UrlMetadataValue) and value.value == url
    for links in (
        {"ecs_task": "javascript:alert(1)"},
        {"ecs_task": "data:text/html,x"},
        {"somewhere": task},
        {"ecs_task": 1},
        ["ecs_task"],
    ):
        bad = bridge.call("report_event", **base, message="m", links=links)
        assert bad["error"]["kind"] == "bad_request", links
    # A verdict carries them too.
    verdict = bridge.result(
        "report_verdict",
        instance_ref=world.ref,
        run_id=world.pending_run_id,
        step_key="second",
        attempt=0,
        task_id=contract.step_task_id(world.pending_run_id, "second", 0),
        verdict="ecs OutOfMemoryError",
        exit="ecs OutOfMemoryError exit code 137",
        stderr_tail="",
        links={"cloudwatch_logs": logs},
    )
    assert verdict["written"] is True
    (event,) = [
        e
        for e in _engine_events(world, world.pending_run_id, "second")
        if contract.META_VERDICT in e.engine_event_data.metadata
    ]
    assert event.engine_event_data.metadata[contract.META_LINK_PREFIX + "cloudwatch_logs"] == (
        UrlMetadataValue(logs)
    )


def test_exits_cleanly_on_eof(own_bridge: BridgeProcess) -> None:
    bridge = own_bridge
    assert bridge.result("ping")
    assert bridge.close() == 0
    wait_for(
        lambda: any("stdin closed" in line for line in bridge.stderr),
        timeout=5,
        what="the bridge's exit log line",
    )


def test_watched_runs_push_terminate_requests_and_cancellation(
    own_bridge: BridgeProcess, world: World
) -> None:
    bridge = own_bridge
    run = world.instance.create_run_for_job(job_def=tiny)
    result = bridge.result("run_status", instance_ref=world.ref, run_ids=[run.run_id], watch=True)
    assert result == {"statuses": {run.run_id: "NOT_STARTED"}}

    # What the executor's terminate_step writes.
    world.instance.report_engine_event(
        "terminate requested",
        run,
        EngineEventData(metadata=contract.terminate_metadata(task_id="t-9", attempt=2)),
        step_key="second",
    )
    assert bridge.read() == {
        "push": "terminate_step",
        "run_id": run.run_id,
        "step_key": "second",
        "attempt": 2,
        "task_id": "t-9",
    }
    world.instance.report_run_canceling(run)
    assert bridge.read() == {"push": "run_ended", "run_id": run.run_id, "status": "CANCELING"}
    # Requests are still answered in between.
    assert bridge.result("ping")["pid"] == bridge.proc.pid


# --- PostgreSQL: pushes through LISTEN/NOTIFY (pg_watch.PostgresRunWatcher) ------------------


@pytest.fixture
def pg_world(postgres_url: str, tmp_path: Path) -> Iterator[World]:
    w = World(write_dagster_yaml(tmp_path / "home", postgres_url))
    yield w
    w.instance.dispose()


def _watch(bridge: BridgeProcess, world: World, run_id: str) -> None:
    result = bridge.result("run_status", instance_ref=None, run_ids=[run_id], watch=True)
    assert result["statuses"][run_id] is not None


def _terminate_entry(run: Any, step_key: str, task_id: str) -> EventLogEntry:
    """What the executor's terminate_step writes, as an entry to store by hand."""
    event = DagsterEvent(
        DagsterEventType.ENGINE_EVENT.value,
        job_name=run.job_name,
        step_key=step_key,
        event_specific_data=EngineEventData(
            metadata=contract.terminate_metadata(task_id=task_id, attempt=0)
        ),
        message="terminate requested",
    )
    return EventLogEntry(
        error_info=None,
        level=logging.INFO,
        user_message="terminate requested",
        run_id=run.run_id,
        timestamp=time.time(),
        step_key=step_key,
        job_name=run.job_name,
        dagster_event=event,
    )


def test_postgres_pushes_arrive_at_once_after_a_quiet_spell(pg_world: World) -> None:
    """Dagster's own watch of a PostgreSQL event log polls, backing off to 16 s while a run is
    quiet: a cancel 4.5 s into a quiet spell reached the bridge about 3.5 s late."""
    world = pg_world
    run = world.instance.create_run_for_job(job_def=tiny)
    bridge = BridgeProcess(child_env(DAGSTER_HOME=str(world.home)))
    try:
        _watch(bridge, world, run.run_id)
        world.instance.report_engine_event(
            "terminate requested",
            run,
            EngineEventData(metadata=contract.terminate_metadata(task_id="t-1", attempt=0)),
            step_key="second",
        )
        assert bridge.read()["push"] == "terminate_step"
        # The scenario is time passing with nothing written (steps running), not a wait for
        # something to happen.
        time.sleep(4.5)
        written = time.monotonic()
        world.instance.report_run_canceling(run)
        push = bridge.read()
        latency = time.monotonic() - written
        assert push == {"push": "run_ended", "run_id": run.run_id, "status": "CANCELING"}
        assert latency < 1.5, latency
    finally:
        assert bridge.close() == 0


def test_postgres_pushes_an_event_committed_behind_one_already_read(pg_world: World) -> None:
    """PostgreSQL hands out event ids before commit: an event can become visible after a later
    one was read. Its notification names it, and it is pushed all the same."""
    world = pg_world
    run = world.instance.create_run_for_job(job_def=tiny)
    storage = world.instance.event_log_storage
    bridge = BridgeProcess(child_env(DAGSTER_HOME=str(world.home)))
    try:
        _watch(bridge, world, run.run_id)
        with storage.index_connection() as conn:  # a writer that took its id and stalled
            early = conn.execute(sqlalchemy.text("SELECT nextval('event_logs_id_seq')")).scalar()
        world.instance.report_engine_event(
            "terminate requested",
            run,
            EngineEventData(metadata=contract.terminate_metadata(task_id="t-2", attempt=0)),
            step_key="second",
        )
        assert bridge.read()["push"] == "terminate_step"
        # The stalled writer commits, then notifies, as dagster-postgres does.
        notify = sqlalchemy.text("SELECT pg_notify('run_events', :payload)")
        with storage.index_connection() as conn:
            late = _terminate_entry(run, "first", "late")
            conn.execute(storage.prepare_insert_event(late).values(id=early))
            conn.execute(notify, {"payload": f"{run.run_id}_{early}"})
        pushed = bridge.read()
        assert (pushed["push"], pushed["step_key"], pushed["task_id"]) == (
            "terminate_step",
            "first",
            "late",
        )
        # Its notification again (as when it arrives after a read that found the event).
        with storage.index_connection() as conn:
            conn.execute(notify, {"payload": f"{run.run_id}_{early}"})
        # Pushed once: the next push is the next event.
        world.instance.report_run_canceling(run)
        assert bridge.read() == {"push": "run_ended", "run_id": run.run_id, "status": "CANCELING"}
        assert bridge.result("ping")["pid"] == bridge.proc.pid
    finally:
        assert bridge.close() == 0


def test_postgres_watch_listens_again_after_its_connection_is_cut(
    pg_world: World, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """The bridge reaches the database through a relay that is cut: what was written meanwhile
    (no notification reached it) is pushed once it is connected again."""
    world = pg_world
    run = world.instance.create_run_for_job(job_def=tiny)
    database = world.instance.event_log_storage.postgres_url.rsplit("/", 1)[1]
    with TcpRelay(postgres_server.port) as relay:
        home = write_dagster_yaml(tmp_path / "relayed", postgres_server.url(database, relay.port))
        bridge = BridgeProcess(child_env(DAGSTER_HOME=str(home)))
        try:
            _watch(bridge, world, run.run_id)
            wait_for(relay.open_connections, 10, "the watch to listen through the relay")
            relay.cut()
            wait_for(
                lambda: any("watching the PostgreSQL event log failed" in x for x in bridge.stderr),
                10,
                "the watch to notice",
            )
            world.instance.report_run_canceling(run)
            relay.restore()
            push = bridge.read()
            assert push == {"push": "run_ended", "run_id": run.run_id, "status": "CANCELING"}
            assert any("listening to the PostgreSQL event log again" in x for x in bridge.stderr)
        finally:
            assert bridge.close() == 0


def test_watch_flag_must_be_a_bool(bridge: BridgeProcess, world: World) -> None:
    bad = bridge.call("run_status", instance_ref=world.ref, run_ids=[], watch="yes")
    assert bad["error"]["kind"] == "bad_request"


def test_shard_watcher_reads_a_busy_run_in_batches_and_only_what_can_be_pushed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance = world.instance
    run = instance.create_run_for_job(job_def=tiny)
    reads = 0
    read = instance.get_records_for_run

    def counting_read(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return read(*args, **kwargs)

    monkeypatch.setattr(instance, "get_records_for_run", counting_read)
    delivered: list[Any] = []
    storage = instance.event_log_storage
    assert isinstance(storage, SqliteEventLogStorage)
    watcher = ShardWatcher(instance, storage, lambda _run_id, entry: delivered.append(entry))
    watcher.set_runs({run.run_id}, lambda _run_id: None)
    try:
        # A busy run: many events written back to back, most of a type no push comes from.
        for i in range(100):
            instance.report_dagster_event(
                DagsterEvent(
                    DagsterEventType.STEP_WORKER_STARTING.value,
                    job_name=run.job_name,
                    event_specific_data=EngineEventData(),
                ),
                run_id=run.run_id,
            )
            if i % 10 == 0:
                instance.report_engine_event(f"busy {i}", run)
        instance.report_run_canceling(run)
        wait_for(
            lambda: any(
                e.dagster_event.event_type == DagsterEventType.RUN_CANCELING for e in delivered
            ),
            timeout=5,
            what="the RUN_CANCELING event",
        )
    finally:
        watcher.close()
    types = [e.dagster_event.event_type for e in delivered]
    assert types.count(DagsterEventType.ENGINE_EVENT) == 10
    assert set(types) == {DagsterEventType.ENGINE_EVENT, DagsterEventType.RUN_CANCELING}
    # Dagster's own watch reads once per file change (several per event): over 100 here.
    assert reads < 40, reads


# --- durable claims (docs/guarantees.md, "Claims") -------------------------------------------


def _claim_params(world: World, step_key: str, holder: str, token: str, **extra: Any) -> dict:
    return {
        "instance_ref": world.ref,
        "run_id": world.pending_run_id,
        "step_key": step_key,
        "attempt": 0,
        "holder": holder,
        "token": token,
        "message_id": f"message-of-{holder}",
        **extra,
    }


def _race(
    world: World,
    racers: dict[str, BridgeProcess],
    keys: list[str],
    replace: dict[str, str] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every racer (holder name: its bridge) claims every key, taking over the claim holding
    ``replace[key]`` if given. Every request is written before any answer is read, so the
    processes race on the same storage. Returns the answers by key and holder."""
    for holder, proc in racers.items():
        for n, key in enumerate(keys):
            extra = {"replace_token": replace[key]} if replace else {}
            params = _claim_params(world, key, holder, f"{holder}-{key}", **extra)
            line = json.dumps({"id": 1000 + n, "method": "claim_attempt", "params": params})
            proc.write(line.encode() + b"\n")
    answers: dict[str, dict[int, dict[str, Any]]] = {holder: {} for holder in racers}
    for holder, proc in racers.items():
        for _ in keys:
            response = proc.read()
            assert response["ok"], response
            answers[holder][response["id"]] = response["result"]
    return {key: {h: answers[h][1000 + n] for h in racers} for n, key in enumerate(keys)}


def _one_winner_each(world: World, results: dict[str, dict[str, dict[str, Any]]]) -> None:
    for key, by_holder in results.items():
        winners = [h for h, result in by_holder.items() if result["claimed"]]
        assert len(winners) == 1, (key, by_holder)
        for result in by_holder.values():
            assert result["current"]["token"] == f"{winners[0]}-{key}"
        won = by_holder[winners[0]]
        assert won["state"]["attempt_finished"] is False
        assert won["state"]["run_status"] == "NOT_STARTED"


def test_two_bridges_racing_for_the_same_attempts_each_get_one_winner(
    bridge: BridgeProcess, own_bridge: BridgeProcess, world: World
) -> None:
    keys = [f"race_{i}" for i in range(20)]
    _one_winner_each(world, _race(world, {"a": bridge, "b": own_bridge}, keys))


def test_bridges_racing_on_postgres_get_one_winner_per_claim_and_per_takeover(
    pg_world: World,
) -> None:
    """The same race on a PostgreSQL-backed instance, where the writers are concurrent
    transactions rather than SQLite's one writer at a time: one insert wins each key, then of
    two takeovers naming the winner's token one compare-and-set wins each key."""
    world = pg_world
    env = child_env(DAGSTER_HOME=str(world.home))
    racers = {holder: BridgeProcess(env) for holder in ("a", "b")}
    try:
        for proc in racers.values():  # each opens the instance first, so the claims overlap
            proc.result("run_status", instance_ref=world.ref, run_ids=[])
        keys = [f"race_{i}" for i in range(20)]
        claimed = _race(world, racers, keys)
        _one_winner_each(world, claimed)
        holding = {
            key: next(result["current"]["token"] for result in by.values() if result["claimed"])
            for key, by in claimed.items()
        }
        # Two new holders take over every claim, naming the token it holds (as a controller
        # that found the holder dead would): per key one compare-and-set matches the row.
        takeovers = {"c": racers["a"], "d": racers["b"]}
        _one_winner_each(world, _race(world, takeovers, keys, replace=holding))
    finally:
        for proc in racers.values():
            assert proc.close() == 0, "".join(proc.stderr)


def test_a_claim_is_renewed_taken_over_only_by_token_and_released(
    bridge: BridgeProcess, world: World
) -> None:
    mine = _claim_params(world, "lifecycle", "a", "tok-a")
    assert bridge.result("claim_attempt", **mine)["claimed"] is True
    held = {"run_id": world.pending_run_id, "step_key": "lifecycle", "attempt": 0}
    renew = {"instance_ref": world.ref, "claims": [{**held, "token": "tok-a", "message_id": "m2"}]}
    assert bridge.result("renew_claims", **renew) == {"alive": [True]}
    theirs = _claim_params(world, "lifecycle", "b", "tok-b")
    current = bridge.result("claim_attempt", **theirs)["current"]
    assert current == {"holder": "a", "token": "tok-a", "message_id": "m2", "beat": 1}
    # A takeover names the token it replaces: a stale view of the claim changes nothing.
    stale = bridge.result("claim_attempt", **theirs, replace_token="tok-old")
    assert stale["claimed"] is False
    took = bridge.result("claim_attempt", **theirs, replace_token="tok-a")
    assert took["claimed"] is True
    assert bridge.result("renew_claims", **renew) == {"alive": [False]}
    release = {"instance_ref": world.ref, **held}
    assert bridge.result("release_claim", **release, token="tok-a") == {"released": False}
    assert bridge.result("release_claim", **release, token="tok-b") == {"released": True}
    assert bridge.result("claim_attempt", **mine)["claimed"] is True


def test_a_claim_released_with_a_verdict_stays_as_its_record(
    bridge: BridgeProcess, world: World
) -> None:
    mine = _claim_params(world, "judged", "a", "tok-a")
    assert bridge.result("claim_attempt", **mine)["claimed"] is True
    held = {"instance_ref": world.ref, "run_id": world.pending_run_id, "step_key": "judged"}
    ended = bridge.result(
        "release_claim", **held, attempt=0, token="tok-a", ended="killed by signal 9"
    )
    assert ended == {"released": True}
    late = bridge.result("claim_attempt", **_claim_params(world, "judged", "b", "tok-b"))
    assert late["claimed"] is False
    assert late["current"]["ended"] == "killed by signal 9"


def test_a_claim_won_on_a_finished_attempt_says_so(bridge: BridgeProcess, world: World) -> None:
    params = {**_claim_params(world, "first", "a", "tok-first"), "run_id": world.done_run_id}
    won = bridge.result("claim_attempt", **params)
    assert won["claimed"] is True
    assert won["state"]["attempt_finished"] is True


# --- per-step reads (docs/architecture.md, "The bridge's reads") -----------------------------


class EventLogSelects:
    """Every SELECT on ``event_logs`` while active, with the rows it returns and, on SQLite,
    its query plan: counted by the database itself, on the statement's own connection."""

    def __init__(self) -> None:
        self.selects: list[tuple[int, str]] = []

    def __enter__(self) -> "EventLogSelects":
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", self._seen)
        return self

    def __exit__(self, *_: object) -> None:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "after_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not statement.lstrip().upper().startswith("SELECT") or "FROM event_logs" not in (
            statement
        ):
            return
        probe = cursor.connection.cursor()
        try:
            probe.execute(f"SELECT count(*) FROM ({statement}) AS counted", parameters)
            rows = probe.fetchone()[0]
            plan = ""
            if conn.dialect.name == "sqlite":
                probe.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
                plan = "; ".join(str(row[-1]) for row in probe.fetchall())
        finally:
            probe.close()
        self.selects.append((rows, plan))

    @property
    def rows(self) -> int:
        return sum(rows for rows, _ in self.selects)


def _step_event(run: Any, event_type: DagsterEventType, step_key: str, data: Any) -> DagsterEvent:
    return DagsterEvent(
        event_type.value, job_name=run.job_name, step_key=step_key, event_specific_data=data
    )


@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_a_step_check_reads_only_that_steps_events_however_many_the_run_has(
    storage: str, request: pytest.FixtureRequest
) -> None:
    """The step-state and verdict checks read the rows of their step alone: a check at the
    1,000th step of a run costs what it costs at the first (not O(N) per step)."""
    from dagster._core.execution.plan.objects import StepSuccessData

    from dagster_taskiq_controller.bridge import Bridge

    world: World = request.getfixturevalue("world" if storage == "sqlite" else "pg_world")
    instance = world.instance
    run = instance.create_run_for_job(job_def=tiny)
    others = 40
    for i in range(others):
        step_key = f"other_{i}"
        instance.report_engine_event(f"note {i}", run, EngineEventData(), step_key=step_key)
        instance.report_dagster_event(
            _step_event(run, DagsterEventType.STEP_SUCCESS, step_key, StepSuccessData(1.0)),
            run_id=run.run_id,
        )
    bridge = Bridge()
    bridge._instance = instance
    verdict = {
        "run_id": run.run_id,
        "step_key": "first",
        "attempt": 0,
        "task_id": "t0",
        "verdict": "killed",
    }
    try:
        assert bridge.report_verdict(verdict)["written"] is True
        params = {"run_id": run.run_id, "step_key": "first", "attempt": 0}
        with EventLogSelects() as reads:
            state = bridge.step_state(params)
        assert state["terminal_events"] == 0 and state["attempt_finished"] is False
        # Only "first"'s terminal events (none): the 40 other steps' successes are not read.
        assert reads.rows == 0, reads.selects
        with EventLogSelects() as reads:
            again = bridge.report_verdict(verdict)
        assert again == {"written": False, "attempt_finished": False}
        # Its terminal events (none) and its one engine event, the verdict.
        assert reads.rows == 1, reads.selects
        instance.report_dagster_event(
            _step_event(run, DagsterEventType.STEP_SUCCESS, "first", StepSuccessData(1.0)),
            run_id=run.run_id,
        )
        with EventLogSelects() as reads:
            state = bridge.step_state(params)
        assert state["attempt_finished"] is True and state["last_terminal"] == "STEP_SUCCESS"
        assert reads.rows == 1, reads.selects
        with EventLogSelects() as reads:
            steps = [{**params, "step_key": key} for key in ("first", "other_0", "other_1")]
            states = bridge.step_states({"steps": steps})["states"]
        assert [s["result"]["terminal_events"] for s in states] == [1, 1, 1]
        # One query per step, on one connection, reading their three terminal events alone.
        assert len(reads.selects) == 3 and reads.rows == 3, reads.selects
        if storage == "sqlite":
            # The shard's step-key index, not a scan of the run's events of that type.
            assert all("idx_step_key" in plan for _, plan in reads.selects), reads.selects
    finally:
        bridge._instance = None  # the world's instance is the fixture's to dispose
        bridge.close()


def test_the_scan_for_storages_without_sql_reads_what_the_index_reads(world: World) -> None:
    from dagster_taskiq_controller.step_events import StepEvents

    indexed, scanned = StepEvents(world.instance), StepEvents(world.instance)
    scanned._storage = None  # as for an event-log storage that is not SQL-backed
    assert indexed.indexed and not scanned.indexed
    run_id, steps = world.done_run_id, ["first", "second", "not_a_step"]
    types = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_UP_FOR_RETRY}
    found = indexed.types(run_id, steps, types)
    assert found == {
        "first": ["STEP_UP_FOR_RETRY", "STEP_SUCCESS"],
        "second": ["STEP_SUCCESS"],
        "not_a_step": [],
    }
    assert scanned.types(run_id, steps, types) == found
    outputs = [DagsterEventType.STEP_OUTPUT]
    assert (
        [e.dagster_event.step_key for e in scanned.entries(run_id, "first", outputs)]
        == [e.dagster_event.step_key for e in indexed.entries(run_id, "first", outputs)]
        == ["first"]
    )
