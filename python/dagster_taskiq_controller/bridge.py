"""The controller's Dagster bridge: a JSON-lines sidecar (docs/protocol.md, section 2).

Run as ``python -m dagster_taskiq_controller.bridge``. One JSON request per line on stdin, one
JSON response per line on stdout, flushed after each; logs go to stderr. Requests are handled in
order. A bad line gets an error response and the loop goes on; EOF on stdin ends the process
with status 0.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import IO, Any

import dagster
from dagster import DagsterEventType, DagsterInstance
from dagster._core.events import EngineEventData
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import DagsterRun
from dagster._serdes import deserialize_value

from dagster_taskiq_controller import contract
from dagster_taskiq_controller.executor import read_verdict

logger = logging.getLogger("dagster_taskiq_controller.bridge")

TERMINAL_EVENT_TYPES: frozenset[DagsterEventType] = frozenset(
    {
        DagsterEventType.STEP_SUCCESS,
        DagsterEventType.STEP_FAILURE,
        DagsterEventType.STEP_UP_FOR_RETRY,
    }
)

STDERR_TAIL_MAX_CHARS = 8192
"""Longer ``stderr_tail`` values are cut to their last this-many characters."""

PAGE_SIZE = 1000


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


def _str_param(params: dict[str, Any], name: str) -> str:
    return _param(params, name, str)


def _attempt_param(params: dict[str, Any]) -> int:
    attempt = _param(params, "attempt", int)
    if attempt < 0:
        raise _bad_request("param attempt must be >= 0")
    return attempt


class Bridge:
    """Answers bridge requests against Dagster instances, one cached per instance ref."""

    def __init__(self) -> None:
        self._instances: dict[str, DagsterInstance] = {}
        self._methods: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "ping": self.ping,
            "run_status": self.run_status,
            "step_state": self.step_state,
            "report_verdict": self.report_verdict,
            "report_event": self.report_event,
        }

    # --- plumbing ------------------------------------------------------------------------------

    def instance(self, params: dict[str, Any]) -> DagsterInstance:
        ref = params.get("instance_ref")
        if ref is not None and not isinstance(ref, dict):
            raise _bad_request("instance_ref must be an object or null")
        key = json.dumps(ref, sort_keys=True)
        cached = self._instances.get(key)
        if cached is not None:
            return cached
        if ref is None:
            instance = DagsterInstance.get()
        else:
            try:
                instance_ref = deserialize_value(json.dumps(ref), InstanceRef)
            except Exception as exc:
                raise _bad_request(f"instance_ref is not a packed InstanceRef: {exc}") from None
            instance = DagsterInstance.from_ref(instance_ref)
        self._instances[key] = instance
        logger.info(
            "opened Dagster instance %d (%s)", len(self._instances), instance.root_directory
        )
        return instance

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

    @staticmethod
    def _records(
        instance: DagsterInstance, run_id: str, of_type: DagsterEventType | set[DagsterEventType]
    ) -> Iterable[Any]:
        cursor: str | None = None
        while True:
            conn = instance.get_records_for_run(
                run_id, cursor=cursor, of_type=of_type, limit=PAGE_SIZE
            )
            yield from conn.records
            if not conn.has_more:
                return
            cursor = conn.cursor

    def _terminal_events(self, instance: DagsterInstance, run_id: str, step_key: str) -> list[str]:
        types: list[str] = []
        for record in self._records(instance, run_id, set(TERMINAL_EVENT_TYPES)):
            event = record.event_log_entry.dagster_event
            if event is not None and event.step_key == step_key:
                types.append(event.event_type_value)
        return types

    def _step_state(
        self, instance: DagsterInstance, run: DagsterRun | None, step_key: str, attempt: int
    ) -> dict[str, Any]:
        if run is None:
            return {
                "run_status": None,
                "terminal_events": 0,
                "attempt_finished": False,
                "last_terminal": None,
            }
        terminal = self._terminal_events(instance, run.run_id, step_key)
        return {
            "run_status": run.status.value,
            "terminal_events": len(terminal),
            "attempt_finished": len(terminal) > attempt,
            "last_terminal": terminal[-1] if terminal else None,
        }

    def _run(self, instance: DagsterInstance, run_id: str) -> DagsterRun:
        run = instance.get_run_by_id(run_id)
        if run is None:
            raise BridgeError("not_found", f"no run {run_id}")
        return run

    # --- methods -------------------------------------------------------------------------------

    def ping(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"dagster_version": dagster.__version__, "pid": os.getpid()}

    def run_status(self, params: dict[str, Any]) -> dict[str, Any]:
        run_ids = _param(params, "run_ids", list)
        if not all(isinstance(run_id, str) for run_id in run_ids):
            raise _bad_request("run_ids must be strings")
        instance = self.instance(params)
        statuses: dict[str, str | None] = {}
        for run_id in run_ids:
            run = instance.get_run_by_id(run_id)
            statuses[run_id] = run.status.value if run is not None else None
        return {"statuses": statuses}

    def step_state(self, params: dict[str, Any]) -> dict[str, Any]:
        run_id = _str_param(params, "run_id")
        step_key = _str_param(params, "step_key")
        attempt = _attempt_param(params)
        instance = self.instance(params)
        return self._step_state(instance, instance.get_run_by_id(run_id), step_key, attempt)

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
        instance = self.instance(params)
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
                metadata=contract.verdict_metadata(
                    verdict=verdict,
                    attempt=attempt,
                    task_id=task_id,
                    exit=exit_text,
                    stderr_tail=stderr_tail[-STDERR_TAIL_MAX_CHARS:],
                )
            ),
            step_key=step_key,
        )
        logger.info("verdict for %s/%s attempt %d: %s", run_id, step_key, attempt, verdict)
        return {"written": True, "attempt_finished": False}

    def _has_verdict(
        self, instance: DagsterInstance, run_id: str, step_key: str, attempt: int, task_id: str
    ) -> bool:
        for record in self._records(instance, run_id, DagsterEventType.ENGINE_EVENT):
            event = record.event_log_entry.dagster_event
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
        instance = self.instance(params)
        run = self._run(instance, run_id)
        instance.report_engine_event(
            message,
            run,
            EngineEventData(metadata=dict(metadata)),
            step_key=step_key or None,
        )
        return {"written": True}


def _error_response(request_id: Any, error: BridgeError) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"kind": error.kind, "message": error.message}}


def serve(bridge: Bridge, requests: IO[bytes], responses: IO[str]) -> None:
    """Answer requests until EOF. Never raises for a bad request."""
    for line in iter(requests.readline, b""):
        try:
            response = bridge.handle_line(line)
        except Exception as exc:  # defensive: handle_line already catches method errors
            logger.exception("unexpected bridge failure")
            response = _error_response(None, BridgeError("internal", str(exc)))
        if response is None:
            continue
        try:
            text = json.dumps(response)
        except (TypeError, ValueError) as exc:
            text = json.dumps(
                _error_response(response.get("id"), BridgeError("internal", f"encode: {exc}"))
            )
        responses.write(text + "\n")
        responses.flush()


def main() -> int:
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
    try:
        serve(Bridge(), sys.stdin.buffer, responses)
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    logger.info("stdin closed; bridge exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
