"""``taskiq_controller_executor``: a step-delegating executor that enqueues one SQS message per
step attempt for the dagster-taskiq-controller to launch (docs/protocol.md, section 1).

The run worker never launches anything itself. It publishes the step, then follows the step
through the event log like every step-delegating executor. The controller reports a step that
died without a terminal Dagster event as a *verdict* engine event; ``check_step_health`` turns
that verdict into "unhealthy" so Dagster applies the op's RetryPolicy. For what no controller
can report (none running, the message deleted or purged), a start watchdog does the same for a
published attempt that nobody picked up within ``step_start_timeout_seconds``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    Field,
    IntSource,
    Noneable,
    Shape,
    StringSource,
    executor,
)
from dagster import (
    _check as check,
)
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster._core.definitions.metadata import MetadataValue
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.event_api import EventLogCursor
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.execution.tags import get_tag_concurrency_limits_config
from dagster._core.executor.base import Executor
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating import (
    CheckStepHealthResult,
    StepDelegatingExecutor,
    StepHandler,
    StepHandlerContext,
)
from dagster._utils.hosted_user_process import recon_job_from_origin

from dagster_taskiq_controller import compat, contract

logger = logging.getLogger("dagster_taskiq_controller")

QUEUE_URL_ENV = "DAGSTER_TASKIQ_SQS_QUEUE_URL"
DEFAULT_STEP_START_TIMEOUT_SECONDS = 1800.0

# Events that show a step attempt was picked up: its step worker started, or the step did.
PICKUP_EVENT_TYPES = frozenset(
    {
        DagsterEventType.STEP_WORKER_STARTED,
        DagsterEventType.STEP_START,
        DagsterEventType.STEP_RESTARTED,
    }
)
# Each attempt of a step ends in exactly one of these: attempt n ends with the (n+1)-th.
TERMINAL_EVENT_TYPES = frozenset(
    {
        DagsterEventType.STEP_SUCCESS,
        DagsterEventType.STEP_FAILURE,
        DagsterEventType.STEP_UP_FOR_RETRY,
    }
)
# What the health check reads of a run's event log, incrementally.
WATCHED_EVENT_TYPES = {DagsterEventType.ENGINE_EVENT, *PICKUP_EVENT_TYPES, *TERMINAL_EVENT_TYPES}


WAKE_CHECK_SECONDS = 0.005
"""How often the executor looks at a SQLite event log's files while it waits between polls."""


def _monotonic() -> float:
    return time.monotonic()


class EventLogWake:
    """Waits, between two polls of a run's event log, until the log changed or the poll
    interval is over, whichever comes first.

    On a SQLite instance an event written to the run's shard changes the size or the
    modification time of its database or write-ahead log file: looking at them costs a
    ``stat`` where a poll costs an SQL query, so the wait can look every
    ``WAKE_CHECK_SECONDS`` and a step's success is acted on within milliseconds instead of
    half a poll interval on average. Other storages (PostgreSQL) have no file to look at: the
    wait is the plain poll interval.
    """

    def __init__(self, paths: list[str]) -> None:
        self._paths = paths
        self._seen = self._signature()

    @classmethod
    def for_run(cls, instance: Any, run_id: str) -> EventLogWake | None:
        from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
            SqliteEventLogStorage,
        )

        storage = getattr(instance, "event_log_storage", None)
        if not isinstance(storage, SqliteEventLogStorage):
            return None
        path = storage.path_for_shard(run_id)
        return cls([path, f"{path}-wal"])

    def _signature(self) -> tuple[tuple[int, int] | None, ...]:
        signature = []
        for path in self._paths:
            try:
                stat = os.stat(path)
            except OSError:
                signature.append(None)
            else:
                signature.append((stat.st_mtime_ns, stat.st_size))
        return tuple(signature)

    def wait(self, seconds: float) -> None:
        """Returns once the log differs from what it was when the previous wait returned (so
        nothing written during the poll in between is missed), or after ``seconds``."""
        deadline = _monotonic() + seconds
        while True:
            now = self._signature()
            if now != self._seen:
                break
            left = deadline - _monotonic()
            if left <= 0:
                break
            time.sleep(min(WAKE_CHECK_SECONDS, left))
        self._seen = now


class WakingStepDelegatingExecutor(StepDelegatingExecutor):
    """Dagster's step-delegating executor, woken from its pause between event-log polls as
    soon as the run's event log changes (``EventLogWake``), not only at the poll interval.

    Dagster's loop pauses with ``time.sleep(self._sleep_seconds)`` after each poll; the wait
    happens when it reads that attribute, which then says 0. Nothing else of the loop
    changes: the poll interval stays the longest pause (interrupts, health checks).
    """

    _poll_interval: float
    _wake: EventLogWake | None = None

    @property  # type: ignore[override]
    def _sleep_seconds(self) -> float:
        if self._wake is None:
            return self._poll_interval
        self._wake.wait(self._poll_interval)
        return 0.0

    @_sleep_seconds.setter
    def _sleep_seconds(self, value: float) -> None:
        self._poll_interval = value

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[DagsterEvent]:
        self._wake = EventLogWake.for_run(plan_context.instance, plan_context.run_id)
        yield from super().execute(plan_context, execution_plan)


@dataclass
class _RunLog:
    """What the health check has read of one run's event log (append-only, so each check
    reads only the records after ``high``, plus the storage's re-read window)."""

    high: int = 0
    # Storage ids already counted within the re-read window, so none counts twice.
    counted: set[int] = field(default_factory=set)
    # (step key, attempt) -> the controller's verdict.
    verdicts: dict[tuple[str, int], str] = field(default_factory=dict)
    # step key -> terminal events so far: the attempt a start event belongs to.
    terminals: dict[str, int] = field(default_factory=dict)
    # (step key, attempt) that a controller picked up.
    picked_up: set[tuple[str, int]] = field(default_factory=set)

    def read(self, storage_id: int, event: DagsterEvent | None) -> None:
        self.high = max(self.high, storage_id)
        if storage_id in self.counted or event is None or not event.step_key:
            return
        self.counted.add(storage_id)
        step_key = event.step_key
        if event.event_type in TERMINAL_EVENT_TYPES:
            self.terminals[step_key] = self.terminals.get(step_key, 0) + 1
        elif event.event_type in PICKUP_EVENT_TYPES:
            self.picked_up.add((step_key, self.terminals.get(step_key, 0)))
        else:
            verdict = read_verdict(event)
            if verdict is not None:
                self.verdicts.setdefault(verdict[0:2], verdict[2])
            controller_attempt = read_controller_attempt(event)
            if controller_attempt is not None:
                self.picked_up.add(controller_attempt)

    def forget_before(self, storage_id: int) -> None:
        self.counted = {i for i in self.counted if i > storage_id}


TASKIQ_CONTROLLER_EXECUTOR_CONFIG: dict[str, Field] = {
    "queue_url": Field(
        Noneable(StringSource),
        is_required=False,
        default_value=None,
        description=f"SQS queue URL to publish steps to. Defaults to env {QUEUE_URL_ENV}.",
    ),
    "region_name": Field(
        Noneable(StringSource),
        is_required=False,
        default_value=None,
        description="AWS region of the queue. Defaults to the standard AWS environment.",
    ),
    "endpoint_url": Field(
        Noneable(StringSource),
        is_required=False,
        default_value=None,
        description="SQS endpoint URL. Defaults to the standard AWS environment "
        "(AWS_ENDPOINT_URL_SQS / AWS_ENDPOINT_URL).",
    ),
    "retries": get_retries_config(),
    "max_concurrent": Field(
        Noneable(IntSource),
        is_required=False,
        default_value=None,
        description="Steps of one run in flight at once (enqueued or running). Default: no limit.",
    ),
    "tag_concurrency_limits": get_tag_concurrency_limits_config(),
    "step_health_check_interval_seconds": Field(
        int,
        is_required=False,
        default_value=1,
        description="Seconds between checks for controller verdicts on running steps.",
    ),
    "poll_interval_seconds": Field(
        float,
        is_required=False,
        default_value=0.1,
        description="Longest pause between polls of the event log for step events. On a "
        "SQLite instance the executor also wakes as soon as the run's event log changes.",
    ),
    # Plain strings, not StringSource: the controller reads them from the stored run config,
    # where an {"env": ...} would still be unresolved (and resolving it on the controller's
    # host would hand steps the controller's environment).
    "env_vars": Field(
        [str],
        is_required=False,
        description="ECS steps: environment variables of the step container, each KEY=VALUE "
        "(a bare KEY is refused: the controller does not pass its own environment on).",
    ),
    "secrets": Field(
        [Shape({"name": str, "valueFrom": str})],
        is_required=False,
        description="ECS steps: container secrets, each {name, valueFrom} with a Secrets "
        "Manager secret or SSM parameter ARN; read by the task definition's execution role.",
    ),
    "step_start_timeout_seconds": Field(
        float,
        is_required=False,
        default_value=DEFAULT_STEP_START_TIMEOUT_SECONDS,
        description="Seconds a published step attempt may wait for a controller to pick it up "
        "(its step worker starts, or a controller writes about it) before the executor fails "
        "it, so that RetryPolicy applies. Covers what no controller can report: none running "
        "on the queue, the message deleted by hand or purged. Set it above the longest queue "
        "wait you expect. 0 disables.",
    ),
}


class SqsStepHandler(StepHandler):
    """Publishes each step to SQS and reads the controller's verdicts from the event log."""

    def __init__(
        self,
        queue_url: str,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        step_start_timeout_seconds: float = DEFAULT_STEP_START_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__()
        self._queue_url = check.str_param(queue_url, "queue_url")
        self._region_name = region_name
        self._endpoint_url = endpoint_url
        self._step_start_timeout = check.numeric_param(
            step_start_timeout_seconds, "step_start_timeout_seconds"
        )
        self._client: Any = None
        # Per run: what the health check has read of its event log.
        self._runs: dict[str, _RunLog] = {}
        # (run id, step key, attempt) -> when it was published (or first checked, for a step
        # in flight when this process took the run over), for the start watchdog.
        self._published: dict[tuple[str, str, int], float] = {}

    @property
    def name(self) -> str:
        return "SqsStepHandler"

    @property
    def queue_url(self) -> str:
        return self._queue_url

    def _sqs(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "sqs", region_name=self._region_name, endpoint_url=self._endpoint_url
            )
        return self._client

    @staticmethod
    def _step_key(step_handler_context: StepHandlerContext) -> str:
        step_keys = step_handler_context.execute_step_args.step_keys_to_execute or []
        check.invariant(len(step_keys) == 1, "Launching multiple steps is not supported")
        return step_keys[0]

    @staticmethod
    def _executable_dict(step_handler_context: StepHandlerContext) -> Mapping[str, Any]:
        plan_context = getattr(step_handler_context, "_plan_context", None)
        job = getattr(plan_context, "job", None)
        if isinstance(job, ReconstructableJob):
            return job.to_dict()
        origin = step_handler_context.execute_step_args.job_origin
        return recon_job_from_origin(origin).to_dict()

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        step_key = self._step_key(step_handler_context)
        # Dagster's own check that the attempt has not started before, in the step process:
        # a second line behind the controller's durable claims (docs/guarantees.md).
        args = compat.replace_step_args(
            step_handler_context.execute_step_args, should_verify_step=True
        )
        message = contract.build_step_message(
            args,
            self._executable_dict(step_handler_context),
            job_name=step_handler_context.dagster_run.job_name,
            step_tags=step_handler_context.step_tags[step_key],
            # The controller's schedule-to-start latency counts from here.
            sent_at=time.time(),
        )
        body = contract.encode_body(message)
        if len(body.encode()) > contract.MAX_BODY_BYTES:
            raise ValueError(
                f"Step message for {step_key} is {len(body.encode())} bytes; SQS takes at "
                f"most {contract.MAX_BODY_BYTES}"
            )
        task_id = message["task_id"]
        send_kwargs: dict[str, Any] = {"QueueUrl": self._queue_url, "MessageBody": body}
        if self._queue_url.endswith(".fifo"):
            # One group per step attempt: FIFO group locking must not serialize a run's steps.
            send_kwargs["MessageGroupId"] = task_id
            send_kwargs["MessageDeduplicationId"] = task_id
        response = self._sqs().send_message(**send_kwargs)
        message_id = str(response.get("MessageId", ""))
        attempt = contract.step_attempt(args, step_key)
        self._published[(args.run_id, step_key, attempt)] = _monotonic()
        logger.debug("enqueued %s attempt %d as %s (%s)", step_key, attempt, task_id, message_id)

        yield DagsterEvent.engine_event(
            step_handler_context.get_step_context(step_key),
            message=f"Step enqueued for dagster-taskiq-controller (attempt {attempt}).",
            event_specific_data=EngineEventData(
                metadata={
                    "task_id": MetadataValue.text(task_id),
                    "sqs_message_id": MetadataValue.text(message_id),
                    "attempt": MetadataValue.int(attempt),
                    "queue_url": MetadataValue.text(self._queue_url),
                }
            ),
        )

    def _refresh(self, step_handler_context: StepHandlerContext) -> _RunLog:
        """Reads the run's new verdicts, pickups and terminal events."""
        instance = step_handler_context.instance
        run_id = step_handler_context.execute_step_args.run_id
        log = self._runs.setdefault(run_id, _RunLog())
        # Storages whose ids may commit out of order (Postgres) ask tailers to re-read a window.
        offset = instance.event_log_storage.default_run_scoped_event_tailer_offset()
        start = max(0, log.high - offset)
        cursor = EventLogCursor.from_storage_id(start).to_string() if start else None
        while True:
            conn = instance.get_records_for_run(
                run_id, cursor=cursor, of_type=WATCHED_EVENT_TYPES, limit=1000
            )
            for record in conn.records:
                log.read(record.storage_id, record.event_log_entry.dagster_event)
            cursor = conn.cursor
            if not conn.has_more:
                break
        log.forget_before(log.high - offset)
        return log

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        step_key = self._step_key(step_handler_context)
        attempt = contract.step_attempt(step_handler_context.execute_step_args, step_key)
        run_id = step_handler_context.execute_step_args.run_id
        log = self._refresh(step_handler_context)
        verdict = log.verdicts.get((step_key, attempt))
        if verdict is not None:
            return CheckStepHealthResult.unhealthy(verdict)
        if self._step_start_timeout > 0 and (step_key, attempt) not in log.picked_up:
            published = self._published.setdefault((run_id, step_key, attempt), _monotonic())
            waited = _monotonic() - published
            if waited >= self._step_start_timeout:
                return CheckStepHealthResult.unhealthy(
                    self._not_picked_up(step_handler_context, step_key, attempt, waited)
                )
        return CheckStepHealthResult.healthy()

    def _not_picked_up(
        self, step_handler_context: StepHandlerContext, step_key: str, attempt: int, waited: float
    ) -> str:
        task_id = contract.step_task_id(
            step_handler_context.execute_step_args.run_id, step_key, attempt
        )
        return (
            f"no dagster-taskiq-controller picked up attempt {attempt} of {step_key} "
            f"(task id {task_id}) within {waited:.0f}s of its publication "
            f"(step_start_timeout_seconds={self._step_start_timeout:g}). Check that a "
            f"controller is running and receiving from queue {self._queue_url}, that the "
            "message was not deleted by hand or purged, and the queue's dead-letter queue."
        )

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        # The controller watches the event log of the runs it holds (the bridge pushes this
        # event to it), so the step is stopped now, not at its next run-status poll.
        step_key = self._step_key(step_handler_context)
        attempt = contract.step_attempt(step_handler_context.execute_step_args, step_key)
        task_id = contract.step_task_id(
            step_handler_context.execute_step_args.run_id, step_key, attempt
        )
        yield DagsterEvent.engine_event(
            step_handler_context.get_step_context(step_key),
            message=(
                f"Termination of step {step_key} (attempt {attempt}) requested from "
                "dagster-taskiq-controller."
            ),
            event_specific_data=EngineEventData(
                metadata=contract.terminate_metadata(task_id=task_id, attempt=attempt)
            ),
        )


def _step_engine_metadata(event: DagsterEvent | None) -> Mapping[str, Any] | None:
    """The metadata of a step's engine event; None for any other event."""
    if event is None or event.event_type != DagsterEventType.ENGINE_EVENT or not event.step_key:
        return None
    return event.engine_event_data.metadata or {}


def read_verdict(event: DagsterEvent | None) -> tuple[str, int, str] | None:
    """``(step_key, attempt, verdict)`` when the event is a controller verdict, else None."""
    metadata = _step_engine_metadata(event)
    if event is None or metadata is None:
        return None
    if contract.META_VERDICT not in metadata or contract.META_ATTEMPT not in metadata:
        return None
    verdict = getattr(metadata[contract.META_VERDICT], "value", None)
    attempt = getattr(metadata[contract.META_ATTEMPT], "value", None)
    if not isinstance(attempt, int) or isinstance(attempt, bool):
        try:
            attempt = int(str(attempt))
        except ValueError:
            return None
    return event.step_key, attempt, str(verdict)


def read_controller_attempt(event: DagsterEvent | None) -> tuple[str, int] | None:
    """``(step_key, attempt)`` when the event is the controller's about an attempt (a verdict,
    a relaunch note): it carries the attempt and its task id."""
    metadata = _step_engine_metadata(event)
    if event is None or metadata is None or contract.META_TASK_ID not in metadata:
        return None
    attempt = getattr(metadata.get(contract.META_ATTEMPT), "value", None)
    if isinstance(attempt, bool):
        return None
    try:
        return event.step_key, int(str(attempt))
    except ValueError:
        return None


def read_terminate_request(event: DagsterEvent | None) -> tuple[str, int, str] | None:
    """``(step_key, attempt, task_id)`` when the event is a ``terminate_step`` request."""
    metadata = _step_engine_metadata(event)
    if event is None or metadata is None:
        return None
    task_id = getattr(metadata.get(contract.META_TERMINATE), "value", None)
    attempt = getattr(metadata.get(contract.META_ATTEMPT), "value", None)
    if not isinstance(task_id, str) or not isinstance(attempt, int) or isinstance(attempt, bool):
        return None
    return event.step_key, attempt, task_id


def _resolve_queue_url(config: Mapping[str, Any]) -> str:
    queue_url = config.get("queue_url") or os.environ.get(QUEUE_URL_ENV)
    if not queue_url:
        check.failed(
            f"taskiq_controller executor needs a queue: set executor config queue_url or env "
            f"{QUEUE_URL_ENV}"
        )
    return queue_url


@executor(
    name="taskiq_controller",
    config_schema=TASKIQ_CONTROLLER_EXECUTOR_CONFIG,
    requirements=multiple_process_executor_requirements(),
)
def taskiq_controller_executor(init_context: InitExecutorContext) -> Executor:
    """Run each step through the dagster-taskiq-controller: one SQS message per step attempt.

    Select it with ``executor_def=taskiq_controller_executor`` or in run config:

    .. code-block:: yaml

        execution:
          config:
            queue_url: https://sqs.eu-west-1.amazonaws.com/123456789012/dagster-steps
            max_concurrent: 20

    Op tags steer the launch: ``dagster/priority`` (higher first), ``dagster-taskiq/timeout``
    (seconds), ``dagster-taskiq/launcher`` (``process`` or ``ecs``) and ``ecs/*``.
    """
    config = init_context.executor_config
    retries = RetryMode.from_config(check.dict_elem(config, "retries"))
    check.invariant(retries is not None, "retries config is required")
    assert retries is not None
    return WakingStepDelegatingExecutor(
        SqsStepHandler(
            queue_url=_resolve_queue_url(config),
            region_name=check.opt_str_elem(config, "region_name"),
            endpoint_url=check.opt_str_elem(config, "endpoint_url"),
            step_start_timeout_seconds=float(config["step_start_timeout_seconds"]),  # type: ignore[arg-type]
        ),
        retries=retries,
        sleep_seconds=float(config["poll_interval_seconds"]),  # type: ignore[arg-type]
        check_step_health_interval_seconds=check.int_elem(
            config, "step_health_check_interval_seconds"
        ),
        max_concurrent=check.opt_int_elem(config, "max_concurrent"),
        tag_concurrency_limits=check.opt_list_elem(config, "tag_concurrency_limits"),
    )
