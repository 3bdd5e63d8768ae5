"""The ECS shim that resolves offloaded step args (dagster_taskiq_controller.ecs_entrypoint)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import wait_for

from dagster_taskiq_controller import ecs_entrypoint as shim

ARGS = b"eJyrVkrLz1eyUkpKLFKqBQAdegQ0"


def test_pointer_is_replaced_by_the_fetched_args() -> None:
    fetched: list[str] = []

    def fetch(uri: str) -> bytes:
        fetched.append(uri)
        return ARGS

    env = shim.resolve_env(
        {
            shim.URI_ENV: "s3://bucket/dagster-taskiq/step-args/abc",
            shim.SHA256_ENV: hashlib.sha256(ARGS).hexdigest(),
            "DAGSTER_RUN_STEP_KEY": "op_a",
        },
        fetch,
    )
    assert fetched == ["s3://bucket/dagster-taskiq/step-args/abc"]
    assert env == {shim.ARGS_ENV: ARGS.decode(), "DAGSTER_RUN_STEP_KEY": "op_a"}


def test_inline_args_pass_through_untouched() -> None:
    env = {shim.ARGS_ENV: "inline", "X": "1"}
    assert shim.resolve_env(env, lambda uri: pytest.fail("no fetch expected")) == env


def test_a_corrupt_object_is_refused() -> None:
    with pytest.raises(shim.ShimError) as e:
        shim.resolve_env({shim.URI_ENV: "s3://b/k", shim.SHA256_ENV: "0" * 64}, lambda u: ARGS)
    assert e.value.exit_code == shim.EXIT_CORRUPT


@pytest.mark.parametrize("uri", ["https://b/k", "s3://bucket", "s3:///key"])
def test_a_bad_pointer_is_refused(uri: str) -> None:
    with pytest.raises(shim.ShimError) as e:
        shim.parse_s3_uri(uri)
    assert e.value.exit_code == shim.EXIT_BAD_POINTER


@pytest.mark.parametrize("text", ["0", "-1", "soon", "nan", "inf"])
def test_a_bad_timeout_is_refused(text: str) -> None:
    with pytest.raises(shim.ShimError) as caught:
        shim.parse_timeout({shim.TIMEOUT_ENV: text})
    assert caught.value.exit_code == shim.EXIT_BAD_POINTER
    assert shim.parse_timeout({}) is None
    assert shim.parse_timeout({shim.TIMEOUT_ENV: "2.5"}) == 2.5


def _shim_running(step_code: str, seconds: float) -> subprocess.Popen[str]:
    """A process that runs ``python -c step_code`` through ``run_with_timeout``, as the shim
    runs the step in its container (its own process, so its signal handlers are its own)."""
    runner = (
        "import sys; from dagster_taskiq_controller.ecs_entrypoint import run_with_timeout; "
        f"sys.exit(run_with_timeout([sys.executable, '-c', {step_code!r}], {{}}, {seconds}))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", runner], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_the_step_keeps_its_exit_code_within_the_timeout() -> None:
    proc = _shim_running("import sys; sys.exit(3)", 30)
    assert proc.wait(30) == 3


def test_at_the_timeout_the_steps_whole_process_group_is_killed() -> None:
    # The step starts a grandchild; both must be gone, and nothing ran past the deadline.
    step = (
        "import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(g.pid, flush=True); time.sleep(60)"
    )
    started = time.monotonic()
    proc = _shim_running(step, 1.5)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    assert proc.wait(30) == shim.EXIT_TIMED_OUT
    assert 1.4 < time.monotonic() - started < 20
    assert "timed out after 1.5s" in (proc.stderr.read() if proc.stderr else "")
    wait_for(lambda: not _alive(grandchild), 5, "the grandchild to be killed")


def test_sigterm_is_passed_on_to_the_step() -> None:
    step = (
        "import signal, sys, time; "
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7)); "
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = _shim_running(step, 60)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 7


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for its reaper counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
