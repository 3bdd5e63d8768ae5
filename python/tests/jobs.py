"""Example jobs for the tests. Every job runs its steps through the controller.

Load them so a step process can find them again, e.g.
``ReconstructableJob.for_file(jobs.__file__, "diamond")`` (see :func:`recon`) or
``dagster job execute -f python/tests/jobs.py -j diamond``. The executor needs the queue URL in
``DAGSTER_TASKIQ_SQS_QUEUE_URL`` (or executor config ``queue_url``).
"""

import os
import signal
import time

from dagster import (
    Config,
    Definitions,
    FilesystemIOManager,
    OpExecutionContext,
    Output,
    RetryPolicy,
    job,
    op,
)
from dagster._core.definitions.reconstruct import ReconstructableJob

from dagster_taskiq_controller import taskiq_controller_executor

RESOURCES = {"io_manager": FilesystemIOManager()}


def _out(value: int) -> Output[int]:
    return Output(value, metadata={"pid": os.getpid(), "value": value})


# --- diamond: fan-out / fan-in, values through the filesystem IO manager -------------------


@op
def emit() -> Output[int]:
    return _out(1)


@op
def add_one(x: int) -> Output[int]:
    return _out(x + 1)


@op
def double(x: int) -> Output[int]:
    return _out(x * 2)


@op
def square(x: int) -> Output[int]:
    return _out(x * x)


@op
def join(a: int, b: int, c: int) -> Output[int]:
    return _out(a + b + c)


@op
def report(total: int) -> Output[int]:
    return _out(total * 10)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def diamond() -> None:
    """emit -> (add_one, double, square) -> join -> report. Final value: (2 + 2 + 1) * 10 = 50."""
    value = emit()
    report(join(add_one(value), double(value), square(value)))


# --- failing: one op raises ------------------------------------------------------------------


@op
def before_boom() -> Output[int]:
    return _out(1)


@op
def boom(x: int) -> int:
    raise ValueError("boom")


@op
def after_boom(x: int) -> Output[int]:
    return _out(x)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def failing() -> None:
    """before_boom succeeds, boom raises ValueError("boom"), after_boom is skipped."""
    after_boom(boom(before_boom()))


# --- flaky: fails twice, then succeeds under its RetryPolicy -----------------------------------


@op(retry_policy=RetryPolicy(max_retries=2))
def flaky_op(context: OpExecutionContext) -> Output[int]:
    if context.retry_number < 2:
        raise RuntimeError(f"flaky failure on attempt {context.retry_number}")
    return _out(context.retry_number)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def flaky() -> None:
    """flaky_op fails on attempts 0 and 1 and succeeds on attempt 2."""
    flaky_op()


# --- self_kill: the step process SIGKILLs itself on its first attempt --------------------------


@op(retry_policy=RetryPolicy(max_retries=1))
def kill_self(context: OpExecutionContext) -> Output[int]:
    if context.retry_number == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return _out(context.retry_number)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def self_kill() -> None:
    """kill_self dies by SIGKILL on attempt 0 (no Dagster event written), succeeds on attempt 1
    once the controller's verdict lets the RetryPolicy retry it."""
    kill_self()


# --- slow: sleeps a configurable time ----------------------------------------------------------


class SleepConfig(Config):
    seconds: float = 6.0


@op
def sleep_op(config: SleepConfig) -> Output[int]:
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    return _out(int(config.seconds))


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def slow() -> None:
    """sleep_op sleeps ``ops.sleep_op.config.seconds`` (default 6) seconds."""
    sleep_op()


@op(tags={"dagster-taskiq/timeout": "2"})
def sleep_with_timeout(config: SleepConfig) -> Output[int]:
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
    return _out(int(config.seconds))


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def slow_timeout() -> None:
    """sleep_with_timeout carries op tag dagster-taskiq/timeout=2 and sleeps 6 s by default, so
    the controller must stop it and report a timeout verdict."""
    sleep_with_timeout()


# --- slow_fanout: three sleeping steps side by side, then a join -------------------------------


@op
def nap(config: SleepConfig) -> Output[int]:
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    return _out(int(config.seconds))


@op
def total(a: int, b: int, c: int) -> Output[int]:
    return _out(a + b + c)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def slow_fanout() -> None:
    """nap_a, nap_b and nap_c sleep ``ops.nap_X.config.seconds`` each, side by side; total adds
    their seconds."""
    total(nap.alias("nap_a")(), nap.alias("nap_b")(), nap.alias("nap_c")())


# --- tagged: steering tags for the contract tests ----------------------------------------------


@op(
    tags={
        "dagster/priority": "5",
        "dagster-taskiq/timeout": "30",
        "dagster-taskiq/launcher": "process",
        "ecs/cpu": "256",
        "ecs/memory": "512",
        "team": "data",
    }
)
def tagged_op() -> Output[int]:
    return _out(7)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def tagged() -> None:
    """One op with every steering tag (and one tag that does not steer)."""
    tagged_op()


JOB_NAMES = (
    "diamond",
    "failing",
    "flaky",
    "self_kill",
    "slow",
    "slow_fanout",
    "slow_timeout",
    "tagged",
)

defs = Definitions(
    jobs=[diamond, failing, flaky, self_kill, slow, slow_fanout, slow_timeout, tagged]
)


def recon(name: str) -> ReconstructableJob:
    """A reconstructable handle to one of these jobs that a step process can load by file."""
    if name not in JOB_NAMES:
        raise KeyError(name)
    return ReconstructableJob.for_file(os.path.abspath(__file__), name)
