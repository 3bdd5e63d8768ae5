"""Example jobs for the tests. Every job runs its steps through the controller.

Load them so a step process can find them again, e.g.
``ReconstructableJob.for_file(jobs.__file__, "diamond")`` (see :func:`recon`) or
``dagster job execute -f python/tests/jobs.py -j diamond``. The executor needs the queue URL in
``DAGSTER_TASKIQ_SQS_QUEUE_URL`` (or executor config ``queue_url``).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster
from dagster import (
    Config,
    Definitions,
    DynamicOut,
    DynamicOutput,
    Field,
    FilesystemIOManager,
    JobDefinition,
    OpDefinition,
    OpExecutionContext,
    Output,
    RetryPolicy,
    graph,
    job,
    op,
)
from dagster._core.definitions.reconstruct import ReconstructableJob

from dagster_taskiq_controller import taskiq_controller_executor

RESOURCES = {"io_manager": FilesystemIOManager()}


def _out(value: int) -> Output[int]:
    metadata = {"pid": os.getpid(), "value": value, "dagster_version": dagster.__version__}
    return Output(value, metadata=metadata)


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


# --- dynamic: a fan-out over dynamic outputs inside a graph -----------------------------------


@op(out=DynamicOut(int))
def split() -> Iterator[DynamicOutput[int]]:
    for item in (1, 2, 3):
        yield DynamicOutput(item, mapping_key=f"item_{item}", metadata={"pid": os.getpid()})


# Tags on the mapped op: the controller checks them against the run's stored plan, where
# this step is kept unresolved (`stage.process_item[?]`).
@op(tags={"team": "data", "dagster/priority": "3"})
def process_item(item: int) -> Output[int]:
    return _out(item * 10)


@op
def sum_items(values: list[int]) -> Output[int]:
    return _out(sum(values))


@graph
def stage() -> Any:
    return sum_items(split().map(process_item).collect())


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def dynamic_fan() -> None:
    """A graph `stage`: split -> process_item per item (3, mapped) -> sum_items = 60."""
    stage()


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


# --- loud: one unbounded output line on stdout and one on stderr ------------------------------


class LoudConfig(Config):
    mebibytes: int = 64


@op
def loud_op(config: LoudConfig) -> Output[int]:
    """Prints ``mebibytes`` MiB with no newline to stdout, then as much to stderr."""
    chunk = "x" * (1 << 20)
    for stream in (sys.stdout, sys.stderr):
        for _ in range(config.mebibytes):
            stream.write(chunk)
        stream.flush()
    return _out(config.mebibytes)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def loud() -> None:
    """loud_op prints one line of ``ops.loud_op.config.mebibytes`` (default 64) MiB on each of
    stdout and stderr."""
    loud_op()


# --- diamond_retry: the diamond, its middle op SIGKILLed once ----------------------------------


@op(retry_policy=RetryPolicy(max_retries=1))
def double_or_die(context: OpExecutionContext, x: int) -> Output[int]:
    if context.retry_number == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return _out(x * 2)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def diamond_retry() -> None:
    """The diamond with double_or_die for double: it dies by SIGKILL on attempt 0, and only the
    controller's verdict (no Dagster event from the step) lets the RetryPolicy retry it. Every
    output's metadata names the step's Dagster version. Final value 50, as the diamond's."""
    value = emit()
    report(join(add_one(value), double_or_die(value), square(value)))


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


# --- lifecycle: cancel, timeout, shutdown ------------------------------------------------------


def _sleeper(name: str, default_seconds: float) -> OpDefinition:
    @op(name=name, config_schema={"seconds": Field(float, default_value=default_seconds)})
    def _sleep(context: OpExecutionContext) -> Output[int]:
        deadline = time.monotonic() + context.op_config["seconds"]
        while time.monotonic() < deadline:
            time.sleep(0.1)
        return _out(0)

    return _sleep


WIDE_OPS = [_sleeper(f"sleep_{i}", 60.0) for i in range(8)]


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def wide() -> None:
    """Eight independent ops sleeping 60 s each: all enqueued at once."""
    for sleeper in WIDE_OPS:
        sleeper()


def _hangs_first_time(name: str, timeout: str) -> OpDefinition:
    """Sleeps 60 s on its first attempt (killed by the timeout tag), 0.1 s on the retry."""

    @op(
        name=name,
        tags={"dagster-taskiq/timeout": timeout},
        retry_policy=RetryPolicy(max_retries=1),
    )
    def _hang(context: OpExecutionContext) -> Output[int]:
        time.sleep(60 if context.retry_number == 0 else 0.1)
        return _out(context.retry_number)

    return _hang


# The timeout covers the whole step process, Dagster's own start-up included (about 2 s idle,
# over 6 s on a heavily loaded 2-core machine), so it is 10 s here; with the warm pool a step
# starts in well under a second, so timeout_retry_3s uses the 3 s.
hangs_first_time = _hangs_first_time("hangs_first_time", "10")
hangs_first_time_3s = _hangs_first_time("hangs_first_time_3s", "3")


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def timeout_retry() -> None:
    hangs_first_time()


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def timeout_retry_3s() -> None:
    hangs_first_time_3s()


@op
def lengthy(context: OpExecutionContext) -> Output[int]:
    """Outlasts a shutdown grace (20 s) the first time it runs in a run; the relaunch of the
    same attempt (after a drain handed it over) needs no such wait, so it takes 0.5 s. The first
    run leaves a marker named after the run in the temporary directory."""
    marker = Path(tempfile.gettempdir()) / f"dagster-taskiq-tests-lengthy-{context.run_id}"
    first = not marker.exists()
    marker.touch()
    deadline = time.monotonic() + (20.0 if first else 0.5)
    while time.monotonic() < deadline:
        time.sleep(0.1)
    return _out(0)


SHUTDOWN_OPS = [_sleeper("quick_a", 3.0), _sleeper("quick_b", 3.0), lengthy]


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def shutdown_mix() -> None:
    """Two ops that finish within a shutdown grace and one that does not."""
    for sleeper in SHUTDOWN_OPS:
        sleeper()


# --- ledgered: ops that record when they run, to prove no attempt ever overlaps itself --------

# Not DAGSTER_TASKIQ_*: the controller keeps those from steps (docs/security.md).
LEDGER_ENV = "DTC_TEST_LEDGER"


def _ledgered(
    name: str, default_seconds: float, retries: int = 0, tags: dict[str, str] | None = None
) -> OpDefinition:
    @op(
        name=name,
        config_schema={"seconds": Field(float, default_value=default_seconds)},
        retry_policy=RetryPolicy(max_retries=retries) if retries else None,
        tags=tags,
    )
    def _work(context: OpExecutionContext) -> Output[int]:
        path = os.environ.get(LEDGER_ENV)

        def note(event: str) -> None:
            if path:
                line = json.dumps(
                    {
                        "run_id": context.run_id,
                        "step": context.op_handle.name,
                        "attempt": context.retry_number,
                        "pid": os.getpid(),
                        "event": event,
                        "t": time.time(),
                    }
                )
                with open(path, "a") as ledger:  # one small O_APPEND write per line
                    ledger.write(line + "\n")

        note("start")
        deadline = time.monotonic() + context.op_config["seconds"]
        while time.monotonic() < deadline:
            time.sleep(0.2)
            note("beat")
        note("end")
        return _out(0)

    return _work


LEDGER_OPS = [_ledgered(f"work_{i}", 4.0) for i in range(6)]


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def ledger_fan() -> None:
    """Six independent ops of 4 s that write start/beat/end lines to the ledger."""
    for work in LEDGER_OPS:
        work()


LEAD = _ledgered("lead", 6.0)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def ledger_pair() -> None:
    """A ledgered op of 6 s, then one step after it: the first message is the one duplicated."""
    add_one(LEAD())


OUTAGE_OPS = [_ledgered(f"steady_{i}", 3.0, retries=1) for i in range(3)]


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def outage_mix() -> None:
    """flaky_op (fails twice, then succeeds under its RetryPolicy) beside three ledgered ops
    of 3 s with a RetryPolicy: steps end, and retries are published, while Dagster is down."""
    flaky_op()
    for work in OUTAGE_OPS:
        work()


TAGGED_LEDGER_OPS = [
    *(_ledgered(f"redshift_{i}", 1.0, tags={"database": "redshift"}) for i in range(2)),
    *(_ledgered(f"plain_{i}", 1.0, tags={"database": "postgres"}) for i in range(3)),
]


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def tagged_fan() -> None:
    """Five independent ledgered ops of 1 s, two of them tagged database=redshift."""
    for work in TAGGED_LEDGER_OPS:
        work()


CHAOS_OPS = [_ledgered(f"chaos_{i}", 1.5, retries=5) for i in range(10)]


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def chaos() -> None:
    """Ten independent ledgered ops of 1.5 s that survive a few step kills each."""
    for work in CHAOS_OPS:
        work()


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


# --- polluting: a step changes its process's global state; the next step must not see it ------

POLLUTION_ENV = "DTC_TEST_POLLUTED"
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


# --- stray_process: a step that prints and leaves a process behind in its group --------------

STRAY_GREETING = "hello from the stray_process step"


def _group_commands() -> list[str]:
    """Command lines of the other live processes in this process's group."""
    group, commands = os.getpgid(0), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getpgid(int(entry)) != group:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                commands.append(f.read().replace(b"\0", b" ").decode().strip())
        except (OSError, UnicodeDecodeError):
            continue  # gone meanwhile
    return commands


@op
def leave_stray() -> Output[int]:
    print(STRAY_GREETING, flush=True)
    stray = subprocess.Popen(["sleep", "300"])  # same process group, never waited for
    return Output(
        stray.pid,
        metadata={"pid": os.getpid(), "group": json.dumps(_group_commands())},
    )


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def stray_process() -> None:
    """leave_stray prints a line, lists its process group, and leaves ``sleep 300`` running in
    it; its output is the sleep's pid."""
    leave_stray()


# --- stopped_once: stopped from outside on its first attempt ------------------------------------


@op(retry_policy=RetryPolicy(max_retries=1))
def stopped_once(context: OpExecutionContext) -> Output[int]:
    """Waits (up to 120 s) on attempt 0 for the test to stop it from outside; returns at once on
    the retry."""
    if context.retry_number == 0:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.1)
        raise RuntimeError("nobody stopped attempt 0")
    return _out(context.retry_number)


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def outside_stop() -> None:
    """stopped_once waits on attempt 0 for a stop it did not ask for (a Spot interruption, an
    outside SIGTERM); the controller's verdict lets its RetryPolicy retry it."""
    stopped_once()


# --- ecs overrides: op tags that try to widen their ECS task (the controller refuses them) --------

# The role the ECS tests allow with --ecs-allow-role; any other is refused.
ECS_ALLOWED_ROLE = "arn:aws:iam::123456789012:role/dagster-step-extra"
ECS_ADMIN_ROLE = "arn:aws:iam::123456789012:role/admin"


def _ecs_tagged(name: str, tags: dict[str, str]) -> JobDefinition:
    """A one-op job whose op carries `tags`; the op itself only returns 1. Bind it to a module
    name equal to `name`: a step process loads the job by that name."""

    @op(name=f"{name}_op", tags=tags)
    def _tagged() -> Output[int]:
        return _out(1)

    @job(name=name, executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
    def _job() -> None:
        _tagged()

    return _job


ecs_role_override = _ecs_tagged(
    "ecs_role_override", {"ecs/task_overrides": json.dumps({"taskRoleArn": ECS_ADMIN_ROLE})}
)
ecs_network_override = _ecs_tagged(
    "ecs_network_override",
    {
        "ecs/run_task_kwargs": json.dumps(
            {
                "networkConfiguration": {
                    "awsvpcConfiguration": {
                        "subnets": ["subnet-attacker"],
                        "assignPublicIp": "ENABLED",
                    }
                }
            }
        )
    },
)
ecs_exec_command = _ecs_tagged(
    "ecs_exec_command", {"ecs/run_task_kwargs": json.dumps({"enableExecuteCommand": True})}
)
ecs_allowed_role = _ecs_tagged(
    "ecs_allowed_role", {"ecs/task_overrides": json.dumps({"taskRoleArn": ECS_ALLOWED_ROLE})}
)
# Runs of it are made with a code location image (tests set container_image on its origin).
ecs_location = _ecs_tagged("ecs_location", {})
# --- env_probe: what a step can read of the controller's environment ----------------------------


class EnvProbeConfig(Config):
    report_path: str
    controller_pid: int


def _read_environ(pid: int) -> dict[str, str] | str:
    """Process ``pid``'s environment from /proc, or the name of the error reading it."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError as exc:
        return type(exc).__name__
    entries = raw.decode(errors="replace").split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@op
def probe_env(config: EnvProbeConfig) -> Output[int]:
    """Writes what it can read to ``report_path``: its own environment, and each ancestor's
    (by /proc) up to the controller, whose pid the test passes."""
    ancestors: dict[str, dict[str, str] | str] = {}
    pid = os.getppid()
    while pid > 1:
        ancestors[str(pid)] = _read_environ(pid)
        if pid == config.controller_pid:
            break
        pid = _parent_pid(pid)
    report = {
        "environ": dict(os.environ),
        "ancestors": ancestors,
        "controller": _read_environ(config.controller_pid),
    }
    with open(config.report_path, "w") as f:
        json.dump(report, f)
    return _out(len(ancestors))


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def env_probe() -> None:
    """probe_env reports its environment and its ancestors' up to the controller's."""
    probe_env()


# --- memory_hog: one step allocates past its memory limit, its neighbour finishes ---------------

HOG_LIMIT_MIB = 256


@op(
    tags={"dagster-taskiq/memory": f"{HOG_LIMIT_MIB}Mi"},
    retry_policy=RetryPolicy(max_retries=1),
)
def hog(context: OpExecutionContext) -> Output[int]:
    if context.retry_number == 0:
        # Twice the limit, every page written: a cgroup's memory.max charges touched pages,
        # an address-space rlimit refuses the mapping itself.
        hoard = b"x" * (2 * HOG_LIMIT_MIB * 1024 * 1024)
        return _out(len(hoard))
    return _out(context.retry_number)


@op
def neighbour(config: SleepConfig) -> Output[int]:
    time.sleep(config.seconds)
    return _out(os.getpid())


@job(executor_def=taskiq_controller_executor, resource_defs=RESOURCES)
def memory_hog() -> None:
    """hog (limit 256 MiB) allocates 512 MiB on attempt 0 and is retried by its RetryPolicy;
    neighbour runs beside it, unlimited, and finishes."""
    hog()
    neighbour()


ALL_JOBS = [
    dynamic_fan,
    diamond,
    failing,
    flaky,
    self_kill,
    slow,
    slow_fanout,
    slow_timeout,
    tagged,
    wide,
    timeout_retry,
    timeout_retry_3s,
    shutdown_mix,
    ledger_fan,
    ledger_pair,
    outage_mix,
    tagged_fan,
    chaos,
    polluting,
    slow_then_more,
    stray_process,
    outside_stop,
    ecs_role_override,
    ecs_network_override,
    ecs_exec_command,
    ecs_allowed_role,
    ecs_location,
    env_probe,
    loud,
    diamond_retry,
    memory_hog,
]
JOB_NAMES = tuple(j.name for j in ALL_JOBS)

defs = Definitions(jobs=ALL_JOBS)


def recon(name: str) -> ReconstructableJob:
    """A reconstructable handle to one of these jobs that a step process can load by file."""
    if name not in JOB_NAMES:
        raise KeyError(name)
    return ReconstructableJob.for_file(os.path.abspath(__file__), name)
