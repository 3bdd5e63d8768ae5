"""The step command of every ECS task the controller starts.

It runs the step as ``python -m dagster_taskiq_controller.stop_guard`` (``dagster api
execute_step`` with SIGTERM kept from Dagster): a Spot interruption, scale-in or a StopTask
nobody in Dagster asked for ends the step without an interrupt failure, so the controller's
verdict names the stop and the op's RetryPolicy decides; a cancel is still Dagster's interrupt.

ECS refuses RunTask overrides longer than 8192 characters. When a step's compressed
``ExecuteStepArgs`` would not fit, the controller puts them in S3 and starts the task with

    python -m dagster_taskiq_controller.ecs_entrypoint

and two variables: ``DAGSTER_TASKIQ_STEP_ARGS_S3_URI`` (``s3://bucket/key`` of an object that
holds exactly the value ``DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS`` would have had) and
``DAGSTER_TASKIQ_STEP_ARGS_SHA256`` (its sha256, hex). This shim fetches the object, checks it,
and replaces itself with the guarded step, the args in ``DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS``.
The task role needs ``s3:GetObject`` on the bucket. Without the pointer variables it just runs
the step (the args are already inline).

With ``DAGSTER_TASKIQ_STEP_TIMEOUT_SECONDS`` it runs the step as a child in its own process
group instead, SIGKILLs that group at the deadline and exits with 124. A StopTask would send
SIGTERM, which Dagster turns into an interrupt failure that skips the op's RetryPolicy; after a
SIGKILL the controller writes a "timed out" verdict and the policy decides. SIGTERM and SIGINT
are passed on to the step, whose guard tells a cancel from an infrastructure stop.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from types import FrameType

URI_ENV = "DAGSTER_TASKIQ_STEP_ARGS_S3_URI"
SHA256_ENV = "DAGSTER_TASKIQ_STEP_ARGS_SHA256"
ARGS_ENV = "DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS"
TIMEOUT_ENV = "DAGSTER_TASKIQ_STEP_TIMEOUT_SECONDS"

# Distinct exit codes so a verdict says which part failed.
EXIT_BAD_POINTER = 64
EXIT_FETCH_FAILED = 65
EXIT_CORRUPT = 66
EXIT_TIMED_OUT = 124


class ShimError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    if not uri.startswith("s3://"):
        raise ShimError(f"{URI_ENV}={uri!r} is not an s3:// URI", EXIT_BAD_POINTER)
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ShimError(f"{URI_ENV}={uri!r} has no bucket or key", EXIT_BAD_POINTER)
    return bucket, key


def fetch(uri: str) -> bytes:
    import boto3

    bucket, key = parse_s3_uri(uri)
    try:
        return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:
        raise ShimError(f"cannot read the step args from {uri}: {e}", EXIT_FETCH_FAILED) from e


def resolve_env(
    env: Mapping[str, str], fetcher: Callable[[str], bytes] | None = None
) -> dict[str, str]:
    """The step's environment: the offloaded args put back in ``ARGS_ENV``."""
    resolved = dict(env)
    uri = resolved.pop(URI_ENV, None)
    expected = resolved.pop(SHA256_ENV, None)
    if not uri:
        return resolved
    body = (fetcher or fetch)(uri)
    digest = hashlib.sha256(body).hexdigest()
    if expected and digest != expected:
        raise ShimError(
            f"the step args at {uri} have sha256 {digest}, expected {expected}", EXIT_CORRUPT
        )
    try:
        resolved[ARGS_ENV] = body.decode("ascii")
    except UnicodeDecodeError as e:
        raise ShimError(f"the step args at {uri} are not base64 text", EXIT_CORRUPT) from e
    return resolved


def parse_timeout(env: Mapping[str, str]) -> float | None:
    """The step's timeout in seconds, or None without one."""
    text = env.get(TIMEOUT_ENV)
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ShimError(f"{TIMEOUT_ENV}={text!r} is not a positive number", EXIT_BAD_POINTER)
    return seconds


def signal_group(pgid: int, sig: int) -> None:
    """Sends ``sig`` to a process group that may already be gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def run_with_timeout(argv: list[str], env: Mapping[str, str], seconds: float) -> int:
    """Runs the step in its own process group; SIGKILLs the group after ``seconds``. Returns
    the exit code for the container: the step's, 128 + its signal, or ``EXIT_TIMED_OUT``."""
    child = subprocess.Popen(argv, env=dict(env), start_new_session=True)

    def pass_on(signum: int, _frame: FrameType | None) -> None:
        signal_group(child.pid, signum)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    try:
        code = child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        print(
            f"dagster_taskiq_controller.ecs_entrypoint: the step timed out after {seconds:g}s; "
            "killing it",
            file=sys.stderr,
            flush=True,
        )
        signal_group(child.pid, signal.SIGKILL)
        child.wait()
        return EXIT_TIMED_OUT
    return code if code >= 0 else 128 - code


def main() -> None:
    try:
        env = resolve_env(os.environ)
        timeout = parse_timeout(env)
    except ShimError as e:
        print(f"dagster_taskiq_controller.ecs_entrypoint: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    env.pop(TIMEOUT_ENV, None)
    # Same interpreter, no shell; the controller chose this command, not the message.
    argv = [sys.executable, "-m", "dagster_taskiq_controller.stop_guard"]
    if timeout is not None:
        sys.exit(run_with_timeout(argv, env, timeout))
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
