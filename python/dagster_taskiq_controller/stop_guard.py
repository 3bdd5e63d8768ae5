"""A step process that tells a stop Dagster asked for from an infrastructure stop.

Dagster maps SIGTERM to its interrupt (``dagster._utils.interrupts.setup_interrupt_handlers``):
the step writes a ``STEP_FAILURE`` with ``ErrorSource.INTERRUPT``, and such a failure skips the
op's RetryPolicy. That is right for a cancel, and wrong for a stop the op did not cause: a
Fargate Spot interruption, scale-in, a StopTask or ``kill`` by someone else, a host shutting
down. Those should end as the controller's verdict, which leaves the decision to the policy.

``python -m dagster_taskiq_controller.stop_guard`` runs ``dagster api execute_step`` in this
process (as ``python -m dagster api execute_step`` would) with SIGTERM kept from Dagster. The
controller runs it for a cold step, the ECS shim runs it in a task, and the warm pool's children
call :func:`install` before their step. On SIGTERM the guard asks the step's instance whether
Dagster wants this attempt stopped:

- yes (the run is CANCELING or over, or the executor's ``terminate_step`` asked for this
  attempt: what the controller stops a step for): SIGINT to itself, Dagster's own interrupt,
  so a cancel ends exactly as before;
- no (or the instance cannot say), at the first look and at each of ``RECHECK_PAUSES`` after
  it: it writes why to stderr, SIGKILLs the rest of its process group and exits with
  ``EXIT_STOPPED_FROM_OUTSIDE`` without writing anything to Dagster. The controller then finds
  no outcome for the attempt and writes its verdict (the ECS stop cause, or the outside
  SIGTERM).

The looks again are for a read that trails the write the stop follows: the controller stops a
run's steps as soon as its own read shows the run CANCELING, and this process's read may not
show it yet (a cancel reached only some steps' guards on CI's SQLite instance). An
infrastructure stop pays for them with under 2 s of its grace (ECS gives 30 s, Spot 2 min).
"""

from __future__ import annotations

import base64
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Mapping
from types import FrameType
from typing import Any, NoReturn

ARGS_ENV = "DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS"
# 128 + SIGTERM, as a shell reports a process SIGTERM ended. The controller's verdict for a
# local step names it (src/launcher/mod.rs, STOPPED_FROM_OUTSIDE_EXIT).
EXIT_STOPPED_FROM_OUTSIDE = 128 + signal.SIGTERM
PREFIX = "dagster_taskiq_controller.stop_guard"
# Seconds between the looks at the instance before a SIGTERM counts as from outside.
RECHECK_PAUSES = (0.2, 0.5, 1.0)

_lock = threading.Lock()
# None until the first SIGTERM; then "deciding", "dagster" (passed on) or "outside".
_verdict: dict[str, str | None] = {"state": None}
# The process's stderr as it was at install(): Dagster points fd 2 at its compute-log capture
# while the op runs, and the tail that copies that file back dies with the step's group.
_stderr_fd: list[int] = []


def log(message: str) -> None:
    """A line on the step's own stderr (the controller's log and verdict, the task's log)."""
    data = f"{PREFIX}: {message}\n".encode()
    try:
        os.write(_stderr_fd[0] if _stderr_fd else 2, data)
    except OSError:
        pass


def install() -> None:
    """Takes SIGTERM away from Dagster's interrupt mapping and handles it here. Call on the
    main thread, before Dagster's CLI runs."""
    _verdict["state"] = None
    if not _stderr_fd:
        _stderr_fd.append(os.dup(2))  # not inherited: no subprocess holds the pipe open
    # The handler first: importing Dagster takes a second, a SIGTERM may come meanwhile.
    signal.signal(signal.SIGTERM, _on_sigterm)
    # SIGINT is how Dagster interrupts a step (a cancel, a stop it asked for). A process
    # started with SIGINT ignored (a controller launched in the background by a shell without
    # job control, under nohup) would pass that on to every step, and cancels would not stop
    # them: Python installs its handler only when SIGINT is not ignored at start.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from dagster._utils import interrupts

    interrupts.setup_interrupt_handlers = _leave_sigterm_alone


def _leave_sigterm_alone() -> None:
    """Stands in for Dagster's ``setup_interrupt_handlers``, which maps SIGTERM to SIGINT's
    handler each time Dagster replaces that handler (it sets nothing else on POSIX)."""


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    # Runs on the main thread between two bytecodes, maybe in the middle of an event-log
    # write: the check reads the instance, so it runs on a thread of its own.
    with _lock:
        state = _verdict["state"]
        if state is None:
            _verdict["state"] = "deciding"
    if state is None:
        threading.Thread(target=_decide, name="stop-guard", daemon=True).start()
    elif state == "dagster":
        os.kill(os.getpid(), signal.SIGINT)


def _ask() -> tuple[str | None, str]:
    """Why Dagster wants this attempt stopped (None: it does not), and a doubt to log when the
    instance could not say."""
    try:
        return stop_requested_by_dagster(os.environ), ""
    except Exception as exc:
        return None, f" (the instance could not say: {type(exc).__name__}: {exc})"


def _decide() -> None:
    why, doubt = _ask()
    for pause in RECHECK_PAUSES:
        if why is not None:
            break
        time.sleep(pause)
        why, doubt = _ask()
    if why is not None:
        with _lock:
            _verdict["state"] = "dagster"
        log(f"SIGTERM: {why}: interrupting the step as Dagster does")
        os.kill(os.getpid(), signal.SIGINT)
        return
    with _lock:
        _verdict["state"] = "outside"
    stop_now(
        "SIGTERM that Dagster did not ask for (an infrastructure stop: Spot interruption, "
        f"scale-in, host shutdown, or a kill from outside){doubt}: stopping the step without a "
        "Dagster failure, so the controller's verdict lets the op's RetryPolicy decide"
    )


def step_args(env: Mapping[str, str]) -> Any:
    """The ``ExecuteStepArgs`` the step runs with (the compressed form in ``ARGS_ENV``)."""
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import deserialize_value

    text = zlib.decompress(base64.b64decode(env[ARGS_ENV].encode())).decode()
    return deserialize_value(text, ExecuteStepArgs)


def stop_requested_by_dagster(env: Mapping[str, str]) -> str | None:
    """Why Dagster wants this step attempt stopped, or None when it does not."""
    from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

    from dagster_taskiq_controller import contract
    from dagster_taskiq_controller.executor import read_terminate_request

    args = step_args(env)
    (step_key,) = args.step_keys_to_execute
    attempt = contract.step_attempt(args, step_key)
    # Not disposed: the warm pool's children share one instance object with their step (see
    # zygote.share_instance), and this process ends soon either way.
    instance = (
        DagsterInstance.from_ref(args.instance_ref)
        if args.instance_ref is not None
        else DagsterInstance.get()
    )
    run = instance.get_run_by_id(args.run_id)
    if run is None:
        return f"run {args.run_id} is gone"
    if run.status == DagsterRunStatus.CANCELING or run.is_finished:
        return f"the run is {run.status.value}"
    cursor = None
    while True:
        conn = instance.get_records_for_run(
            args.run_id, cursor=cursor, of_type=DagsterEventType.ENGINE_EVENT, limit=1000
        )
        for record in conn.records:
            request = read_terminate_request(record.event_log_entry.dagster_event)
            if request is not None and request[:2] == (step_key, attempt):
                return f"the executor asked to terminate attempt {attempt} of {step_key}"
        if not conn.has_more:
            return None
        cursor = conn.cursor


def stop_now(reason: str) -> NoReturn:
    """Ends the step at once, writing nothing to Dagster: the rest of its process group is
    SIGKILLed (when this process leads it), then this process exits."""
    log(reason)
    kill_rest_of_group()
    os._exit(EXIT_STOPPED_FROM_OUTSIDE)


def kill_rest_of_group() -> None:
    """SIGKILLs every other process of this process's group, if it leads the group (a step
    does: the launchers give it its own), by reading ``/proc``; ``killpg`` would kill this
    process too, before it could exit with its code."""
    me = os.getpid()
    if os.getpgrp() != me or not os.path.isdir("/proc"):
        return
    # A member may fork while the scan runs: scan until a pass finds nobody.
    for _ in range(5):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) != me or fields[0] == "Z":
                    continue
                os.kill(int(entry), signal.SIGKILL)
                found = True
            except (OSError, IndexError, ValueError):
                continue
        if not found:
            return


def main() -> None:
    from dagster._cli import ENV_PREFIX, cli

    install()
    sys.argv = ["dagster", "api", "execute_step"]
    cli.main(args=["api", "execute_step"], prog_name="dagster", auto_envvar_prefix=ENV_PREFIX)


if __name__ == "__main__":
    main()
