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


# --- polluting: a step changes its process's global state; the next step must not see it ------

POLLUTION_ENV = "DAGSTER_TASKIQ_TEST_POLLUTED"
STATE: dict[str, int] = {}


def _polluted() -> list[str]:
    found = []
    if STATE:
        found.append(f"module global STATE = {STATE}")
    if POLLUTION_ENV in os.environ:
        found.append(f"env {POLLUTION_ENV} = {os.environ[POLLUTION_ENV]}")
    if getattr(signal.getsignal, "polluted", False):
        found.append("signal.getsignal is monkeypatched")
    return found


@op
def pollute() -> Output[int]:
    found = _polluted()
    if found:
        raise RuntimeError(f"inherited state from an earlier step: {found}")
    STATE["polluted_by"] = os.getpid()
    os.environ[POLLUTION_ENV] = str(os.getpid())
    original = signal.getsignal

    def patched(signalnum: int) -> object:
        return original(signalnum)

    patched.polluted = True  # type: ignore[attr-defined]
    signal.getsignal = patched
    return _out(1)


@op
def check_clean(x: int) -> Output[int]:
    found = _polluted()
    if found:
        raise RuntimeError(f"inherited state from an earlier step: {found}")
    return _out(x + 1)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def polluting() -> None:
    """pollute sets a module global, an environment variable and monkeypatches the stdlib;
    check_clean (a later step) and pollute in any later run fail if they see any of it."""
    check_clean(pollute())


# --- slow_then_more: a slow step, then a quick one -------------------------------------------


@op
def after_sleep(x: int) -> Output[int]:
    return _out(x + 1)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def slow_then_more() -> None:
    """sleep_op (``ops.sleep_op.config.seconds``), then after_sleep."""
    after_sleep(sleep_op())


JOB_NAMES = (
    "diamond",
    "failing",
    "flaky",
    "self_kill",
    "slow",
    "slow_timeout",
    "tagged",
    "polluting",
    "slow_then_more",
)

defs = Definitions(
    jobs=[diamond, failing, flaky, self_kill, slow, slow_timeout, tagged, polluting, slow_then_more]
)


def recon(name: str) -> ReconstructableJob:
    """A reconstructable handle to one of these jobs that a step process can load by file."""
    if name not in JOB_NAMES:
        raise KeyError(name)
    return ReconstructableJob.for_file(os.path.abspath(__file__), name)
