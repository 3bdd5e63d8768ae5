"""The controller's Dagster bridge: a JSON-lines sidecar (docs/protocol.md, section 2).

Run as ``python -m dagster_taskiq_controller.bridge``. One JSON request per line on stdin, one
JSON response per line on stdout, flushed after each; logs go to stderr. Requests are handled in
order. A bad line gets an error response and the loop goes on; EOF on stdin ends the process
with status 0.

Between responses the bridge may also write *push* lines (``{"push": ...}``, no id): the runs of
the latest ``run_status`` call with ``"watch": true`` are watched, and a run that starts canceling
or fails, or a ``terminate_step`` request of our executor, reaches the controller within a
fraction of a second instead of at its next poll. SQLite shards are watched by ``ShardWatcher``
(a stat per run and tick, a filtered read only when the shard changed), PostgreSQL by
``pg_watch.PostgresRunWatcher`` (LISTEN/NOTIFY, a filtered read of a notified run); other
storages through Dagster's own event-log watch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import dagster
from dagster import DagsterEventType, DagsterInstance
from dagster._core.event_api import EventLogCursor, EventLogRecord
from dagster._core.events import EngineEventData
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._serdes import serialize_value

from dagster_taskiq_controller import contract
from dagster_taskiq_controller.claims import AttemptClaims, ClaimsUnsupported, claim_key
from dagster_taskiq_controller.executor import read_terminate_request, read_verdict
from dagster_taskiq_controller.pg_watch import PostgresRunWatcher, is_postgres
from dagster_taskiq_controller.step_events import StepEvents, records_of

logger = logging.getLogger("dagster_taskiq_controller.bridge")

TERMINAL_EVENT_TYPES: frozenset[DagsterEventType] = frozenset(
    {
        DagsterEventType.STEP_SUCCESS,
        DagsterEventType.STEP_FAILURE,
        DagsterEventType.STEP_UP_FOR_RETRY,
    }
)

# Run events pushed to the controller, with the run status each one means.
RUN_ENDING_EVENTS: dict[DagsterEventType, str] = {
    DagsterEventType.RUN_CANCELING: "CANCELING",
    DagsterEventType.RUN_CANCELED: "CANCELED",
    DagsterEventType.RUN_FAILURE: "FAILURE",
}

# What a watch reads: the only event types that can become pushes.
WATCHED_EVENT_TYPES: frozenset[DagsterEventType] = frozenset(
    {*RUN_ENDING_EVENTS, DagsterEventType.ENGINE_EVENT}
)
SHARD_CHECK_SECONDS = 0.05
"""How often ``ShardWatcher`` looks at the shard files of the watched runs."""
SHARD_REREAD_SECONDS = 2.0
"""A watched shard is read at least this often even when its files look unchanged (a write
within the file system's timestamp granularity that left the size equal)."""

STDERR_TAIL_MAX_CHARS = 8192
"""Longer ``stderr_tail`` values are cut to their last this-many characters."""

PROTOCOL = 2
"""The bridge protocol's version, in every ``ping`` answer (docs/protocol.md, section 2):
2 added ``step_states``."""

MAX_STEP_STATES = 100
"""Entries of one ``step_states`` request, at most (a receive brings up to 10)."""

MAX_FAILURE_CLASSES = 8
"""Errors of a failure's chain that ``step_state``'s ``failure_classes`` names, at most."""

MAX_CLASS_NAME = 200
"""Characters of one name in ``failure_classes``, at most."""

PLAN_CACHE_SIZE = 64
"""Execution plan snapshots whose step tags the bridge keeps (one per recent run shape)."""


class BridgeError(Exception):
    """An error answered to the controller; ``kind`` is bad_request, not_found or internal."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _bad_request(message: str) -> BridgeError:
    return BridgeError("bad_request", message)


def _param(params: dict[str, Any], name: str, kind: type) -> Any:
    if name not in params:
        raise _bad_request(f"missing param {name}")
    value = params[name]
    # JSON true/false arrive as bool, which Python also counts as int: refuse them.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _bad_request(f"param {name} must be a {kind.__name__}")
    return value


def _location_name(run: DagsterRun) -> str | None:
    """The code location the run was launched from; ``None`` for a run launched without a
    workspace (``execute_job``)."""
    origin = run.remote_job_origin
    return origin.location_name if origin is not None else None


def _str_param(params: dict[str, Any], name: str) -> str:
    return _param(params, name, str)


def _links_param(params: dict[str, Any]) -> dict[str, Any]:
    """The optional ``links`` param (``{kind: url}``) as url metadata entries."""
    links = params.get("links") or {}
    if not isinstance(links, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in links.items()
    ):
        raise _bad_request("links must be an object of strings")
    try:
        return contract.link_metadata(links)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None


def _attempt_param(params: dict[str, Any]) -> int:
    attempt = _param(params, "attempt", int)
    if attempt < 0:
        raise _bad_request("param attempt must be >= 0")
    return attempt


class LineWriter:
    """Writes whole JSON lines to the controller; responses and pushes come from different
    threads, so each line is written and flushed under a lock."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def write(self, message: dict[str, Any]) -> None:
        try:
            text = json.dumps(message)
        except (TypeError, ValueError) as exc:
            text = json.dumps(
                _error_response(message.get("id"), BridgeError("internal", f"encode: {exc}"))
            )
        with self._lock:
            self._out.write(text + "\n")
            self._out.flush()


Push = Callable[[dict[str, Any]], None]


def _cursor_of(record: EventLogRecord) -> str:
    """The event-log cursor just after ``record``."""
    return EventLogCursor.from_storage_id(record.storage_id).to_string()


@dataclass
class _Shard:
    cursor: str | None
    signature: tuple[tuple[int, int] | None, ...] | None = None
    read_at: float = 0.0


class ShardWatcher:
    """Watches the per-run SQLite shards of a ``SqliteEventLogStorage`` for events that become
    pushes.

    Dagster's own watch for this storage reads every new event of a run each time inotify sees
    its shard change, several times per event written: with a dozen steps writing, that was a
    tenth of the machine's CPU in the bridge. This thread instead stats each watched shard (and
    its write-ahead log) every ``SHARD_CHECK_SECONDS`` and, only when it changed, reads the new
    events of the types that can become pushes.
    """

    def __init__(
        self,
        instance: DagsterInstance,
        storage: SqliteEventLogStorage,
        deliver: Callable[[str, EventLogEntry], None],
    ) -> None:
        self._instance = instance
        self._storage = storage
        self._deliver = deliver
        self._shards: dict[str, _Shard] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_runs(self, run_ids: set[str], first_cursor: Callable[[str], str | None]) -> None:
        """Watches exactly these runs; one not watched yet from ``first_cursor(run_id)``."""
        with self._lock:
            known = set(self._shards)
        added = {run_id: _Shard(first_cursor(run_id)) for run_id in run_ids - known}
        with self._lock:
            for run_id in self._shards.keys() - run_ids:
                del self._shards[run_id]
            self._shards.update(added)
        if run_ids and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="shard-watcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(SHARD_CHECK_SECONDS):
            with self._lock:
                shards = list(self._shards.items())
            for run_id, shard in shards:
                try:
                    self._check(run_id, shard)
                except Exception:  # a locked or vanished shard: try again next tick
                    logger.exception("watching the event log of run %s failed", run_id)

    def _signature(self, run_id: str) -> tuple[tuple[int, int] | None, ...]:
        path = self._storage.path_for_shard(run_id)
        signature = []
        for name in (path, f"{path}-wal"):
            try:
                stat = os.stat(name)
                signature.append((stat.st_mtime_ns, stat.st_size))
            except FileNotFoundError:
                signature.append(None)
        return tuple(signature)

    def _check(self, run_id: str, shard: _Shard) -> None:
        signature = self._signature(run_id)
        now = time.monotonic()
        if signature == shard.signature and now - shard.read_at < SHARD_REREAD_SECONDS:
            return
        shard.signature, shard.read_at = signature, now
        for record in records_of(self._instance, run_id, set(WATCHED_EVENT_TYPES), shard.cursor):
            with self._lock:
                if run_id not in self._shards:  # no longer watched
                    return
            self._deliver(run_id, record.event_log_entry)
            shard.cursor = _cursor_of(record)


class RunWatches:
    """Event-log watches on one instance's runs, kept equal to the set the controller holds.

    Watches only write push lines. When the storage cannot watch (in-memory storage, no inotify
    watches left), the controller's run-status poll still stops the steps, a poll interval
    later.
    """

    def __init__(self, instance: DagsterInstance, push: Push) -> None:
        self._instance = instance
        self._write = push
        self._callbacks: dict[str, Callable[[EventLogEntry, str], None]] = {}
        self._unsupported = False
        storage = instance.event_log_storage
        self._shards: ShardWatcher | PostgresRunWatcher | None = None
        if isinstance(storage, SqliteEventLogStorage):
            self._shards = ShardWatcher(instance, storage, self._on_event)
        elif is_postgres(storage):
            self._shards = PostgresRunWatcher(
                instance, storage, self._on_event, WATCHED_EVENT_TYPES
            )

    def set_runs(self, run_ids: set[str]) -> None:
        if self._shards is not None:
            self._shards.set_runs(run_ids, self._latest_cursor)
            return
        storage = self._instance.event_log_storage
        for run_id in list(self._callbacks.keys() - run_ids):
            storage.end_watch(run_id, self._callbacks.pop(run_id))
        if self._unsupported:
            return
        for run_id in sorted(run_ids - self._callbacks.keys()):
            callback = self._callback(run_id)
            try:
                storage.watch(run_id, self._latest_cursor(run_id), callback)
            except Exception as exc:  # NotImplementedError, OSError (inotify limits), ...
                logger.warning("cannot watch the event log (%s); relying on polling", exc)
                self._unsupported = True
                return
            self._callbacks[run_id] = callback

    def close(self) -> None:
        self.set_runs(set())
        if self._shards is not None:
            self._shards.close()

    def _push(self, message: dict[str, Any]) -> None:
        try:
            self._write(message)
        except (OSError, ValueError) as exc:  # the controller went away (closed pipe)
            logger.debug("push %s not delivered: %s", message.get("push"), exc)

    def _latest_cursor(self, run_id: str) -> str | None:
        # Watch from now on: older events were seen by the controller's polls already.
        records = self._instance.get_records_for_run(run_id, limit=1, ascending=False).records
        return _cursor_of(records[0]) if records else None

    def _callback(self, run_id: str) -> Callable[[EventLogEntry, str], None]:
        def on_event(entry: EventLogEntry, _cursor: str) -> None:
            self._on_event(run_id, entry)

        return on_event

    def _on_event(self, run_id: str, entry: EventLogEntry) -> None:
        event = entry.dagster_event
        if event is None:
            return
        status = RUN_ENDING_EVENTS.get(event.event_type)
        if status is not None:
            self._push({"push": "run_ended", "run_id": run_id, "status": status})
            return
        request = read_terminate_request(event)
        if request is not None:
            step_key, attempt, task_id = request
            self._push(
                {
                    "push": "terminate_step",
                    "run_id": run_id,
                    "step_key": step_key,
                    "attempt": attempt,
                    "task_id": task_id,
                }
            )


class Bridge:
    """Answers bridge requests against the controller's own Dagster instance (its
    ``DAGSTER_HOME``), whatever instance a request names: an ``InstanceRef`` is configuration
    that imports and runs code, so a queue message must not choose it (docs/security.md)."""

    def __init__(self, push: Push | None = None) -> None:
        self._instance: DagsterInstance | None = None
        self._push = push
        self._watches: RunWatches | None = None
        self._claims: AttemptClaims | None = None
        self._events: StepEvents | None = None
        # Op tags per step key of each execution plan snapshot read, oldest first.
        self._plan_tags: dict[str, dict[str, dict[str, str]]] = {}
        self._methods: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "ping": self.ping,
            "run_status": self.run_status,
            "step_state": self.step_state,
            "step_states": self.step_states,
            "report_verdict": self.report_verdict,
            "report_event": self.report_event,
            "claim_attempt": self.claim_attempt,
            "renew_claims": self.renew_claims,
            "release_claim": self.release_claim,
        }

    # --- plumbing ------------------------------------------------------------------------------

    def instance(self) -> DagsterInstance:
        """The pinned instance; a request's ``instance_ref`` is ignored."""
        if self._instance is None:
            self._instance = DagsterInstance.get()
            logger.info(
                "opened the Dagster instance of DAGSTER_HOME (%s)", self._instance.root_directory
            )
        return self._instance

    def handle_line(self, line: bytes | str) -> dict[str, Any] | None:
        """The response to one request line, or None for a blank line."""
        try:
            text = line.decode("utf-8") if isinstance(line, bytes) else line
        except UnicodeDecodeError:
            return _error_response(None, _bad_request("request is not UTF-8"))
        if not text.strip():
            return None
        try:
            request = json.loads(text)
        except ValueError as exc:
            return _error_response(None, _bad_request(f"request is not JSON: {exc}"))
        if not isinstance(request, dict):
            return _error_response(None, _bad_request("request is not a JSON object"))
        return self.handle(request)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        request_id = request.get("id")
        try:
            method_name = request.get("method")
            if not isinstance(method_name, str):
                raise _bad_request("missing method")
            method = self._methods.get(method_name)
            if method is None:
                raise _bad_request(f"unknown method {method_name!r}")
            params = request.get("params", {})
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise _bad_request("params must be an object")
            result = method(params)
        except BridgeError as exc:
            return _error_response(request_id, exc)
        except Exception as exc:
            logger.exception("request %r failed", request_id)
            return _error_response(
                request_id, BridgeError("internal", f"{type(exc).__name__}: {exc}")
            )
        return {"id": request_id, "ok": True, "result": result}

    # --- reading the event log -----------------------------------------------------------------

    def _step_events(self, instance: DagsterInstance) -> StepEvents:
        if self._events is None:
            self._events = StepEvents(instance)
            if not self._events.indexed:
                logger.warning(
                    "the event log storage %s is not SQL-backed: each step check reads the "
                    "run's events of every step",
                    type(instance.event_log_storage).__name__,
                )
        return self._events

    def _terminal_events(self, instance: DagsterInstance, run_id: str, step_key: str) -> list[str]:
        """The types of the step's terminal events, oldest first (one per ended attempt)."""
        events = self._step_events(instance)
        return events.types(run_id, [step_key], TERMINAL_EVENT_TYPES)[step_key]

    def _step_state(
        self, instance: DagsterInstance, run: DagsterRun | None, step_key: str, attempt: int
    ) -> dict[str, Any]:
        if run is None:
            return _state_of(None, [], attempt)
        return _state_of(run, self._terminal_events(instance, run.run_id, step_key), attempt)

    def _run_step_states(
        self, instance: DagsterInstance, run_id: str, entries: list[tuple[int, str, int]]
    ) -> dict[int, dict[str, Any]]:
        """The ``step_states`` answers of the entries ``(index, step_key, attempt)`` of one
        run: the run and the terminal events of all its asked steps read once."""
        try:
            run = instance.get_run_by_id(run_id)
            terminal = (
                self._step_events(instance).types(
                    run_id, {step_key for _, step_key, _ in entries}, TERMINAL_EVENT_TYPES
                )
                if run is not None
                else {}
            )
        except Exception as exc:
            logger.exception("step_states of run %s failed", run_id)
            failed = _entry_error(BridgeError("internal", f"{type(exc).__name__}: {exc}"))
            return {index: failed for index, _, _ in entries}
        answers: dict[int, dict[str, Any]] = {}
        for index, step_key, attempt in entries:
            state = _state_of(run, terminal.get(step_key, []), attempt)
            if run is not None:
                try:
                    state["stored_step"] = self._stored_step(instance, run, step_key)
                except Exception as exc:
                    logger.exception("stored step %s of run %s failed", step_key, run_id)
                    error = BridgeError("internal", f"{type(exc).__name__}: {exc}")
                    answers[index] = _entry_error(error)
                    continue
            answers[index] = {"ok": True, "result": state}
        return answers

    def _run(self, instance: DagsterInstance, run_id: str) -> DagsterRun:
        run = instance.get_run_by_id(run_id)
        if run is None:
            raise BridgeError("not_found", f"no run {run_id}")
        return run

    # --- methods -------------------------------------------------------------------------------

    def ping(self, params: dict[str, Any]) -> dict[str, Any]:
        """The bridge answers. With ``describe``, it opens its instance and describes it (the
        controller's start-up: the steps run against this same instance, and the controller
        puts its ref in their args). With ``instance_ref`` (any value: the instance is the
        pinned one), the storage answers too: its latest run and, with ``run_id``, that run's
        latest event are read. The controller asks this after Dagster raised for a request, to
        tell an outage of the storage from an error of that request."""
        result: dict[str, Any] = {
            "dagster_version": dagster.__version__,
            "pid": os.getpid(),
            "protocol": PROTOCOL,
        }
        if params.get("describe"):
            instance = self.instance()
            packed_ref = json.loads(serialize_value(instance.get_ref()))
            result["instance_ref"] = packed_ref
            result["storages"] = _storage_classes(packed_ref)
            result["root_directory"] = instance.root_directory
            result["packages"] = _package_versions()
            records = instance.get_run_records(limit=1)
            result["latest_run"] = (
                {
                    "run_id": records[0].dagster_run.run_id,
                    "status": records[0].dagster_run.status.value,
                    "created": records[0].create_timestamp.timestamp(),
                }
                if records
                else None
            )
        if "instance_ref" in params:
            run_id = params.get("run_id")
            if run_id is not None and not isinstance(run_id, str):
                raise _bad_request("run_id must be a string or null")
            instance = self.instance()
            instance.get_runs(limit=1)
            if run_id is not None:
                instance.get_records_for_run(run_id, limit=1, ascending=False)
            result["storage"] = "ok"
        return result

    def run_status(self, params: dict[str, Any]) -> dict[str, Any]:
        run_ids = _param(params, "run_ids", list)
        if not all(isinstance(run_id, str) for run_id in run_ids):
            raise _bad_request("run_ids must be strings")
        watch = params.get("watch", False)
        if not isinstance(watch, bool):
            raise _bad_request("param watch must be a bool")
        instance = self.instance()
        statuses: dict[str, str | None] = {}
        for run_id in run_ids:
            run = instance.get_run_by_id(run_id)
            statuses[run_id] = run.status.value if run is not None else None
        if watch and self._push is not None:
            if self._watches is None:
                self._watches = RunWatches(instance, self._push)
            watches = self._watches
            # Only runs that exist and can still change are worth a watch.
            watches.set_runs({run_id for run_id, status in statuses.items() if status})
        return {"statuses": statuses}

    def close(self) -> None:
        if self._watches is not None:
            self._watches.close()
        if self._instance is not None:
            self._instance.dispose()

    def step_state(self, params: dict[str, Any]) -> dict[str, Any]:
        run_id = _str_param(params, "run_id")
        step_key = _str_param(params, "step_key")
        attempt = _attempt_param(params)
        instance = self.instance()
        run = instance.get_run_by_id(run_id)
        if run is None:
            return _state_of(None, [], attempt)
        terminal = self._terminal_events(instance, run_id, step_key)
        state = _state_of(run, terminal, attempt)
        state["stored_step"] = self._stored_step(instance, run, step_key)
        if len(terminal) > attempt:
            # Its failure's errors are read only when it failed: a success reads nothing more.
            failed = terminal[attempt] != DagsterEventType.STEP_SUCCESS.value
            state["failure_classes"] = (
                self._failure_classes(instance, run_id, step_key, attempt) if failed else []
            )
        return state

    def _failure_classes(
        self, instance: DagsterInstance, run_id: str, step_key: str, attempt: int
    ) -> list[str]:
        """The class names of the error chain of the attempt's failure (its STEP_FAILURE or
        STEP_UP_FOR_RETRY: the attempt-th terminal event of the step), outermost first; empty
        when it succeeded. Read only for an attempt that ended, after its process exited: the
        controller names a memory limit from it (a ``MemoryError`` under the address-space
        rlimit), whatever the step's stderr showed (Dagster mirrors a step's stderr through a
        ``tail`` process that may not flush its last lines before it is killed)."""
        entries = self._step_events(instance).entries(run_id, step_key, TERMINAL_EVENT_TYPES)
        if len(entries) <= attempt:
            return []
        event = entries[attempt].dagster_event
        data = event.event_specific_data if event is not None else None
        error = getattr(data, "error", None)
        names: list[str] = []
        while error is not None and len(names) < MAX_FAILURE_CLASSES:
            names.append(str(error.cls_name or "")[:MAX_CLASS_NAME])
            error = error.cause or error.context
        return names

    def step_states(self, params: dict[str, Any]) -> dict[str, Any]:
        """``step_state`` of several attempts in one request (the messages of one receive):
        one answer per entry, in order, each ``{"ok": true, "result": ...}`` or
        ``{"ok": false, "error": ...}``, so a bad entry fails alone. The entries of one run
        share one read of the run and one of its steps' terminal events."""
        steps = _param(params, "steps", list)
        if len(steps) > MAX_STEP_STATES:
            raise _bad_request(f"at most {MAX_STEP_STATES} steps per request, not {len(steps)}")
        answers: dict[int, dict[str, Any]] = {}
        by_run: dict[str, list[tuple[int, str, int]]] = {}
        for index, entry in enumerate(steps):
            try:
                if not isinstance(entry, dict):
                    raise _bad_request("each step must be an object")
                run_id = _str_param(entry, "run_id")
                key = (index, _str_param(entry, "step_key"), _attempt_param(entry))
            except BridgeError as exc:
                answers[index] = _entry_error(exc)
                continue
            by_run.setdefault(run_id, []).append(key)
        if by_run:
            instance = self.instance()
            for run_id, entries in by_run.items():
                answers.update(self._run_step_states(instance, run_id, entries))
        return {"states": [answers[index] for index in range(len(steps))]}

    def _stored_step(
        self, instance: DagsterInstance, run: DagsterRun, step_key: str
    ) -> dict[str, Any] | None:
        """The step as its run stored it: its op tags (as the executor puts them in the
        message's ``dagster_tags`` label), the job's name and the run's code location. They
        decide how and where the step is launched, so the controller launches a message only
        when it carries these same ones, and runs it in its location's Python environment
        (docs/security.md). ``None``: the run stored no execution plan."""
        snapshot_id = run.execution_plan_snapshot_id
        if snapshot_id is None:
            return None
        steps = self._plan_tags.get(snapshot_id)
        if steps is None:
            snapshot = instance.get_execution_plan_snapshot(snapshot_id)
            steps = {step.key: contract.label_tags(step.tags or {}) for step in snapshot.steps}
            # Snapshot ids are content hashes: an entry never goes stale, only old.
            if len(self._plan_tags) >= PLAN_CACHE_SIZE:
                self._plan_tags.pop(next(iter(self._plan_tags)))
            self._plan_tags[snapshot_id] = steps
        tags = steps.get(step_key)
        if tags is None and step_key.endswith("]"):
            # A step of a dynamic output: the plan stores it unresolved, as `op[?]`.
            tags = steps.get(step_key.split("[", 1)[0] + "[?]")
        return {
            "found": tags is not None,
            "tags": tags or {},
            "job_name": run.job_name,
            "location": _location_name(run),
            "ecs": _stored_ecs(run),
        }

    def report_verdict(self, params: dict[str, Any]) -> dict[str, Any]:
        run_id = _str_param(params, "run_id")
        step_key = _str_param(params, "step_key")
        attempt = _attempt_param(params)
        task_id = _str_param(params, "task_id")
        verdict = _str_param(params, "verdict")
        exit_text = params.get("exit") or ""
        stderr_tail = params.get("stderr_tail") or ""
        if not isinstance(exit_text, str) or not isinstance(stderr_tail, str):
            raise _bad_request("exit and stderr_tail must be strings")
        if not verdict:
            raise _bad_request("verdict must not be empty")
        links = _links_param(params)
        instance = self.instance()
        run = self._run(instance, run_id)

        state = self._step_state(instance, run, step_key, attempt)
        if state["attempt_finished"]:
            logger.info("verdict for %s/%s attempt %d refused: finished", run_id, step_key, attempt)
            return {"written": False, "attempt_finished": True}
        if self._has_verdict(instance, run_id, step_key, attempt, task_id):
            return {"written": False, "attempt_finished": False}

        instance.report_engine_event(
            f"dagster-taskiq-controller: step attempt {attempt} of {step_key} failed: {verdict}",
            run,
            EngineEventData(
                metadata={
                    **contract.verdict_metadata(
                        verdict=verdict,
                        attempt=attempt,
                        task_id=task_id,
                        exit=exit_text,
                        stderr_tail=stderr_tail[-STDERR_TAIL_MAX_CHARS:],
                    ),
                    **links,
                }
            ),
            step_key=step_key,
        )
        logger.info("verdict for %s/%s attempt %d: %s", run_id, step_key, attempt, verdict)
        return {"written": True, "attempt_finished": False}

    def _has_verdict(
        self, instance: DagsterInstance, run_id: str, step_key: str, attempt: int, task_id: str
    ) -> bool:
        entries = self._step_events(instance).entries(
            run_id, step_key, [DagsterEventType.ENGINE_EVENT]
        )
        for entry in entries:
            event = entry.dagster_event
            found = read_verdict(event)
            if found is None or found[0] != step_key or found[1] != attempt:
                continue
            metadata = event.engine_event_data.metadata  # type: ignore[union-attr]
            written_task_id = getattr(metadata.get(contract.META_TASK_ID), "value", None)
            if written_task_id == task_id:
                return True
        return False

    def report_event(self, params: dict[str, Any]) -> dict[str, Any]:
        run_id = _str_param(params, "run_id")
        step_key = params.get("step_key")
        if step_key is not None and not isinstance(step_key, str):
            raise _bad_request("step_key must be a string or null")
        message = _str_param(params, "message")
        metadata = params.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise _bad_request("metadata must be an object of strings")
        links = _links_param(params)
        instance = self.instance()
        run = self._run(instance, run_id)
        instance.report_engine_event(
            message,
            run,
            EngineEventData(metadata={**metadata, **links}),
            step_key=step_key or None,
        )
        return {"written": True}

    # --- claims (docs/guarantees.md, "Claims") ---------------------------------------------------

    def _attempt_claims(self) -> AttemptClaims:
        if self._claims is None:
            try:
                self._claims = AttemptClaims(self.instance())
            except ClaimsUnsupported as exc:
                raise BridgeError("unsupported", str(exc)) from None
        return self._claims

    @staticmethod
    def _claim_key(params: dict[str, Any]) -> str:
        return claim_key(
            _str_param(params, "run_id"), _str_param(params, "step_key"), _attempt_param(params)
        )

    def claim_attempt(self, params: dict[str, Any]) -> dict[str, Any]:
        replace_token = params.get("replace_token")
        if replace_token is not None and not isinstance(replace_token, str):
            raise _bad_request("replace_token must be a string or null")
        answer = self._attempt_claims().take(
            self._claim_key(params),
            holder=_str_param(params, "holder"),
            token=_str_param(params, "token"),
            message_id=_str_param(params, "message_id"),
            replace_token=replace_token,
        )
        if answer["claimed"]:
            # Read after the claim is taken: a holder writes its outcome before it lets go,
            # so a claim won just after that holder finished sees the finished attempt.
            instance = self.instance()
            run_id, step_key = params["run_id"], params["step_key"]
            answer["state"] = self._step_state(
                instance, instance.get_run_by_id(run_id), step_key, params["attempt"]
            )
        return answer

    def renew_claims(self, params: dict[str, Any]) -> dict[str, Any]:
        claims = _param(params, "claims", list)
        keyed = []
        for claim in claims:
            if not isinstance(claim, dict):
                raise _bad_request("claims must be objects")
            keyed.append(
                {
                    "key": self._claim_key(claim),
                    "token": _str_param(claim, "token"),
                    "message_id": _str_param(claim, "message_id"),
                }
            )
        return {"alive": self._attempt_claims().renew(keyed)}

    def release_claim(self, params: dict[str, Any]) -> dict[str, Any]:
        ended = params.get("ended")
        if ended is not None and not isinstance(ended, str):
            raise _bad_request("ended must be a string or null")
        released = self._attempt_claims().release(
            self._claim_key(params), _str_param(params, "token"), ended
        )
        return {"released": released}


def _storage_classes(packed_ref: dict[str, Any]) -> dict[str, str]:
    """``module.Class`` of each storage and of the instance class of a packed instance ref,
    as serialized (the form a message carries), ``""`` for one it does not set, to tell a
    message's foreign ``instance_ref`` apart: paths legitimately differ between hosts,
    classes do not."""
    found: dict[str, str] = {}
    for name in (
        "run_storage_data",
        "event_storage_data",
        "schedule_storage_data",
        "storage_data",
        "custom_instance_class_data",
    ):
        data = packed_ref.get(name)
        found[name] = (
            f"{data.get('module_name')}.{data.get('class_name')}" if isinstance(data, dict) else ""
        )
    return found


def _package_versions() -> dict[str, str | None]:
    """Versions of the packages whose combination decides whether a PostgreSQL instance
    works (``None``: not installed), for ``doctor``."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("sqlalchemy", "dagster-postgres", "psycopg2-binary", "psycopg2"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _state_of(run: DagsterRun | None, terminal: list[str], attempt: int) -> dict[str, Any]:
    """A ``step_state`` answer from the run (``None``: unknown) and the types of the step's
    terminal events, oldest first."""
    return {
        "run_status": run.status.value if run is not None else None,
        "terminal_events": len(terminal),
        "attempt_finished": len(terminal) > attempt,
        "last_terminal": terminal[-1] if terminal else None,
    }


def _entry_error(error: BridgeError) -> dict[str, Any]:
    return {"ok": False, "error": {"kind": error.kind, "message": error.message}}


def _error_response(request_id: Any, error: BridgeError) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"kind": error.kind, "message": error.message}}


def serve(bridge: Bridge, requests: IO[bytes], writer: LineWriter) -> None:
    """Answer requests until EOF. Never raises for a bad request."""
    for line in iter(requests.readline, b""):
        try:
            response = bridge.handle_line(line)
        except Exception as exc:  # defensive: handle_line already catches method errors
            logger.exception("unexpected bridge failure")
            response = _error_response(None, BridgeError("internal", str(exc)))
        if response is not None:
            writer.write(response)


def _stored_ecs(run: DagsterRun) -> dict[str, Any]:
    """What the run says about its ECS tasks: the image of its code location
    (``job_code_origin.repository_origin.container_image``) and its executor config's
    ``env_vars`` and ``secrets``, as written (the controller checks them). Read from the
    stored run, so a queue message chooses none of them (docs/ecs.md)."""
    origin = run.job_code_origin
    image = origin.repository_origin.container_image if origin is not None else None
    config = _executor_config(run.run_config)
    env_vars = config.get("env_vars") or []
    secrets = config.get("secrets") or []
    return {
        "image": image if isinstance(image, str) else None,
        # Anything but strings and {name, valueFrom} maps was refused by the executor's
        # config schema when the run was made; passed on as text so the controller names it.
        "env_vars": [str(v) for v in env_vars] if isinstance(env_vars, list) else [],
        "secrets": [
            {"name": str(s.get("name", "")), "valueFrom": str(s.get("valueFrom", ""))}
            if isinstance(s, dict)
            else {"name": "", "valueFrom": str(s)}
            for s in (secrets if isinstance(secrets, list) else [])
        ],
    }


def _executor_config(run_config: Any) -> dict[str, Any]:
    """The executor's config in a run config: ``execution: {config: ...}``, or the older
    ``execution: {<executor name>: {config: ...}}``."""
    execution = run_config.get("execution") if isinstance(run_config, dict) else None
    if not isinstance(execution, dict):
        return {}
    config = execution.get("config")
    if config is None and len(execution) == 1:
        (named,) = execution.values()
        config = named.get("config") if isinstance(named, dict) else None
    return config if isinstance(config, dict) else {}


def main(bridge_class: type[Bridge] = Bridge) -> int:
    """Serves stdin until EOF with a ``bridge_class`` (a subclass: tests inject faults)."""
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("DAGSTER_TASKIQ_BRIDGE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Keep the protocol stream private: anything else written to fd 1 (a stray print in Dagster
    # or user code, a C library) goes to stderr instead.
    responses = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logger.info("bridge started: dagster %s, pid %d", dagster.__version__, os.getpid())
    writer = LineWriter(responses)
    bridge = bridge_class(push=writer.write)
    try:
        serve(bridge, sys.stdin.buffer, writer)
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    logger.info("stdin closed; bridge exiting")
    try:
        bridge.close()
    except Exception:
        logger.exception("closing the Dagster instances failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
