"""The in-process comparison of the end-to-end benchmark, built from the real ``taskiq`` and
``taskiq-aio-sqs`` packages: an SQS broker (on the benchmark's moto server), an ``execute_plan``
task that runs the step inside the worker process, as dagster-taskiq's worker does, and a
step-delegating executor that publishes each step to it with ``kiq``.

Worker: ``python -m taskiq worker taskiq_app:broker --workers 1`` with this directory on the
path, and the environment variables below.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from dagster import executor
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster._core.events import DagsterEvent
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.base import Executor
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating import (
    CheckStepHealthResult,
    StepDelegatingExecutor,
    StepHandler,
    StepHandlerContext,
)
from dagster._serdes import serialize_value
from taskiq_aio_sqs import SQSBroker

from dagster_taskiq_controller.executor import SqsStepHandler

QUEUE_NAME_ENV = "BENCH_TASKIQ_QUEUE"
START_LOG_ENV = "BENCH_TASKIQ_START_LOG"
"""File the worker appends ``run_id step_key received_at`` lines to (start latency)."""

broker = SQSBroker(
    os.environ.get(QUEUE_NAME_ENV, "bench-taskiq"),
    endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
    region_name=os.environ.get("AWS_REGION", "us-east-1"),
    aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
    aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
    wait_time_seconds=20,
    max_number_of_messages=10,
)


@broker.task(task_name="execute_plan")
def execute_plan(execute_step_args_packed: dict[str, Any], executable_dict: Any) -> list[str]:
    """Runs one step in this (the worker's) process, with the body of ``dagster api
    execute_step``; returns the serialized events like dagster-taskiq's worker."""
    from dagster import DagsterInstance
    from dagster._cli.api import _execute_step_command_body
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import deserialize_value

    received = time.time()
    args = deserialize_value(json.dumps(execute_step_args_packed), ExecuteStepArgs)
    log_path = os.environ.get(START_LOG_ENV)
    if log_path:
        step_key = (args.step_keys_to_execute or ["?"])[0]
        with open(log_path, "a") as log:
            log.write(f"{args.run_id} {step_key} {received}\n")
    assert args.instance_ref is not None
    with DagsterInstance.from_ref(args.instance_ref) as instance:
        run = instance.get_run_by_id(args.run_id)
        assert run is not None
        return [serialize_value(e) for e in _execute_step_command_body(args, instance, run)]


class _Loop:
    """An event loop on a thread, for the async broker client inside Dagster's sync executor."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, coro: Any) -> Any:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True).start()
                asyncio.run_coroutine_threadsafe(broker.startup(), loop).result()
                cls._loop = loop
        return asyncio.run_coroutine_threadsafe(coro, cls._loop).result()


class TaskiqStepHandler(StepHandler):
    """Publishes each step with ``execute_plan.kiq``; follows it through the event log."""

    @property
    def name(self) -> str:
        return "TaskiqStepHandler"

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        args = step_handler_context.execute_step_args
        packed = json.loads(serialize_value(args))
        # The same payload dagster-taskiq sends (our executor builds it the same way).
        executable = SqsStepHandler._executable_dict(step_handler_context)
        _Loop.run(execute_plan.kiq(execute_step_args_packed=packed, executable_dict=executable))
        yield from ()

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        return CheckStepHealthResult.healthy()

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        yield from ()


@executor(name="taskiq_bench", requirements=multiple_process_executor_requirements())
def taskiq_bench_executor(init_context: InitExecutorContext) -> Executor:
    # The same event-log poll interval as the controller's executor. Dagster's plain loop, as
    # dagster-taskiq's: it does not also wake when the run's event log changes, as the
    # controller's executor does on SQLite (EventLogWake).
    return StepDelegatingExecutor(
        TaskiqStepHandler(),
        retries=RetryMode.DISABLED,
        sleep_seconds=0.1,
        check_step_health_interval_seconds=1,
    )
