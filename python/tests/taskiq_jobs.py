"""Jobs for the dagster-taskiq compatibility test, with an executor shaped like dagster-taskiq's.

The executor publishes each step with the real ``taskiq`` and ``taskiq-aio-sqs`` packages: an
``execute_plan`` task kicked with ``execute_step_args_packed`` (Dagster's packed
``ExecuteStepArgs``, ``print_serialized_events`` set) and ``executable_dict``
(``ReconstructableJob.to_dict()``), exactly what taskiq-aio-sqs puts on SQS, extended (S3)
bodies included. It follows each step through the event log, and through its taskiq result: an
error result makes the step unhealthy, which fails it.

Nothing here runs a task: no taskiq worker exists in these tests; the controller is the worker.
Settings come from the environment of the process that runs the job (see ``configure``).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from dagster import FilesystemIOManager, In, Out, executor, job, op
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster._core.definitions.reconstruct import ReconstructableJob
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
from taskiq import AsyncTaskiqDecoratedTask
from taskiq_aio_sqs import S3Backend, SQSBroker

from dagster_taskiq_controller.compat import replace_step_args
from dagster_taskiq_controller.executor import SqsStepHandler

T = TypeVar("T")

QUEUE_NAME_ENV = "TASKIQ_COMPAT_QUEUE_NAME"
RESULT_BUCKET_ENV = "TASKIQ_COMPAT_RESULT_BUCKET"
PAYLOAD_BUCKET_ENV = "TASKIQ_COMPAT_PAYLOAD_BUCKET"

# (run_id, step_key) -> task_id of every step this process published.
SENT: dict[tuple[str, str], str] = {}
# Bytes of padding added to ``executable_dict`` (which the controller does not read), to push a
# message over SQS's 1 MiB so that taskiq-aio-sqs sends it through S3.
PAD_BYTES = 0


class Taskiq:
    """A taskiq-aio-sqs broker (with its S3 result backend) on an event loop thread, for the
    synchronous Dagster executor and the test."""

    _lock = threading.Lock()
    _current: Taskiq | None = None

    def __init__(self) -> None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION", "us-east-1")
        keys = {
            "aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID"),
            "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
        }
        self.backend: S3Backend[Any] = S3Backend(
            os.environ[RESULT_BUCKET_ENV], endpoint_url=endpoint, region_name=region, **keys
        )
        self.broker = SQSBroker(
            os.environ[QUEUE_NAME_ENV],
            endpoint_url=endpoint,
            region_name=region,
            s3_extended_bucket_name=os.environ.get(PAYLOAD_BUCKET_ENV),
            **keys,
        ).with_result_backend(self.backend)
        # The signature of dagster-taskiq's task; its body never runs here.
        self.execute_plan: AsyncTaskiqDecoratedTask[Any, list[str]] = self.broker.register_task(
            _execute_plan, task_name="execute_plan"
        )
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.run(self.broker.startup())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    @classmethod
    def get(cls) -> Taskiq:
        with cls._lock:
            if cls._current is None:
                cls._current = Taskiq()
            return cls._current

    @classmethod
    def close(cls) -> None:
        with cls._lock:
            current, cls._current = cls._current, None
        if current is not None:
            current.run(current.broker.shutdown())
            current.loop.call_soon_threadsafe(current.loop.stop)


def _execute_plan(execute_step_args_packed: dict[str, Any], executable_dict: Any) -> list[str]:
    raise RuntimeError("the controller runs this task, not a taskiq worker")


class TaskiqStepHandler(StepHandler):
    @property
    def name(self) -> str:
        return "TaskiqStepHandler"

    @staticmethod
    def _key(ctx: StepHandlerContext) -> tuple[str, str]:
        return ctx.execute_step_args.run_id, ctx.execute_step_args.step_keys_to_execute[0]

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        args = replace_step_args(
            step_handler_context.execute_step_args, print_serialized_events=True
        )
        executable = dict(SqsStepHandler._executable_dict(step_handler_context))
        if PAD_BYTES:
            executable["padding"] = "x" * PAD_BYTES
        taskiq = Taskiq.get()
        task = taskiq.run(
            taskiq.execute_plan.kiq(
                execute_step_args_packed=json.loads(serialize_value(args)),
                executable_dict=executable,
            )
        )
        SENT[self._key(step_handler_context)] = task.task_id
        yield from ()

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        task_id = SENT.get(self._key(step_handler_context))
        if task_id is None:
            return CheckStepHealthResult.healthy()
        taskiq = Taskiq.get()
        if not taskiq.run(taskiq.backend.is_result_ready(task_id)):
            return CheckStepHealthResult.healthy()
        result = taskiq.run(taskiq.backend.get_result(task_id))
        if result.is_err:
            return CheckStepHealthResult.unhealthy(f"taskiq task {task_id}: {result.error}")
        return CheckStepHealthResult.healthy()

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        yield from ()


@executor(name="taskiq_compat", requirements=multiple_process_executor_requirements())
def taskiq_compat_executor(init_context: InitExecutorContext) -> Executor:
    return StepDelegatingExecutor(
        TaskiqStepHandler(),
        retries=RetryMode.DISABLED,
        sleep_seconds=0.1,
        check_step_health_interval_seconds=1,
    )


RESOURCES = {"io_manager": FilesystemIOManager()}


@op(out=Out(int))
def start() -> int:
    print("a line of user output: not an event")
    return 2


@op(ins={"x": In(int)}, out=Out(int))
def triple(x: int) -> int:
    return x * 3


@op(ins={"x": In(int)}, out=Out(int))
def plus_one(x: int) -> int:
    return x + 1


@job(executor_def=taskiq_compat_executor, resource_defs=RESOURCES)
def three_ops() -> None:
    plus_one(triple(start()))


@op(ins={"x": In(int)})
def crash(x: int) -> None:
    # Dies without a word to Dagster: no terminal event, only the controller can tell.
    os._exit(3)


@job(executor_def=taskiq_compat_executor, resource_defs=RESOURCES)
def crashing() -> None:
    crash(start())


@op(ins={"x": In(int)}, out=Out(int))
def nap(x: int) -> int:
    # Long enough that the other branches wait for the one slot past --waiting-limit.
    time.sleep(1.5)
    return x


@job(executor_def=taskiq_compat_executor, resource_defs=RESOURCES)
def fan_out() -> None:
    first = start()
    for i in range(4):
        nap.alias(f"nap_{i}")(first)


JOBS = {"three_ops": three_ops, "crashing": crashing, "fan_out": fan_out}


def recon(name: str) -> ReconstructableJob:
    return ReconstructableJob.for_file(os.path.abspath(__file__), name)
