"""End to end: a step cannot find the controller's secrets (docs/security.md, "Step
environments"). The controller runs with an admin token (from its environment, or from
--admin-token-file), a secret named by --step-env-deny and additions from --step-env and
--step-env-file; a real step (cold, and forked from the warm pool's zygote) reports what it
can read of its own environment and of its ancestors' up to the controller's.

The controller runs without CAP_SYS_PTRACE (`without_inspection_capabilities`), as in a default
container: with it, a same-uid process may read any process's environment, and what is
tested here is what a step running as the controller's uid can read."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jobs
import pytest
from conftest import wait_for
from dagster import DagsterInstance, execute_job
from test_e2e_process import WARM_ARGS, Stack

from dagster_taskiq_controller_testing.stack import (
    Controller,
    create_queues,
    without_inspection_capabilities,
)

pytestmark = pytest.mark.controller

DENIED = "STEP_ENV_TEST_SECRET"
DENIED_BY_PREFIX = "STEP_ENV_TEST_PREFIXED_KEY"


def read_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    return dict(entry.split("=", 1) for entry in raw.split("\0") if "=" in entry)


def secrets_in(environ: dict[str, str], secrets: list[str]) -> list[str]:
    """Names of the variables that hold one of ``secrets``, or are the controller's own."""
    return sorted(
        name
        for name, value in environ.items()
        if name.startswith("DAGSTER_TASKIQ_") or any(s in value for s in secrets)
    )


def admin_status(stack: Stack, token: str) -> int:
    request = urllib.request.Request(
        f"{stack.controller.dashboard_url}/api/v1/steps/no-such-task/cancel",
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# Each launcher once, each with one of the admin token's sources: the token source does not
# change what a step inherits, the launcher does.
@pytest.mark.parametrize(
    ("launcher_args", "token_source"),
    [((), "env"), (WARM_ARGS, "file")],
    ids=["cold-env", "warm-file"],
)
def test_a_step_finds_no_controller_secret(
    launcher_args: tuple[str, ...],
    token_source: str,
    aws_env: dict[str, str],
    dagster_home: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    token = f"admin-token-{uuid.uuid4().hex}"
    secret = f"denied-{uuid.uuid4().hex}"
    monkeypatch.setenv(DENIED, secret)
    monkeypatch.setenv(DENIED_BY_PREFIX, secret)
    env_file = tmp_path / "steps.env"
    env_file.write_text('# for every step\nFROM_FILE="two words"\n')
    args = [
        "--receive-wait",
        "1",
        *launcher_args,
        "--step-env-deny",
        DENIED,
        "--step-env-deny",
        "STEP_ENV_TEST_PREFIXED_*",
        "--step-env",
        "ADDED=1",
        "--step-env-file",
        str(env_file),
    ]
    if token_source == "env":
        monkeypatch.setenv("DAGSTER_TASKIQ_ADMIN_TOKEN", token)
    else:
        monkeypatch.delenv("DAGSTER_TASKIQ_ADMIN_TOKEN", raising=False)
        token_file = tmp_path / "admin-token"
        token_file.write_text(f"{token}\n")
        args += ["--admin-token-file", str(token_file)]
    queues = create_queues(
        aws_env["AWS_ENDPOINT_URL"], f"steps-{uuid.uuid4().hex[:10]}", visibility_timeout=30
    )
    # The run worker (this process) needs the queue; the controller gets it as a flag.
    monkeypatch.setenv("DAGSTER_TASKIQ_SQS_QUEUE_URL", queues.queue_url)
    controller = Controller(
        queue_url=queues.queue_url,
        env={**aws_env, "DAGSTER_HOME": str(dagster_home)},
        args=args,
        command_prefix=without_inspection_capabilities(),
        log_path=tmp_path / "controller.log",
    ).start()
    stack = Stack(queues=queues, controller=controller, instance=instance)
    try:
        assert controller.process is not None
        controller_pid = controller.process.pid
        if launcher_args:
            wait_for(stack.zygote_pid, 60, "the warm zygote to be ready")
        report_path = tmp_path / "probe.json"
        run_config = {
            "ops": {
                "probe_env": {
                    "config": {
                        "report_path": str(report_path),
                        "controller_pid": controller_pid,
                    }
                }
            }
        }
        with execute_job(jobs.recon("env_probe"), instance, run_config=run_config) as result:
            assert result.success
        report = json.loads(report_path.read_text())
        secrets = [token, secret]

        # The step's own environment: no controller variable, no denied one, the additions.
        environ = report["environ"]
        assert secrets_in(environ, secrets) == []
        assert DENIED not in environ and DENIED_BY_PREFIX not in environ
        assert environ["ADDED"] == "1"
        assert environ["FROM_FILE"] == "two words"
        assert environ["DAGSTER_HOME"] == str(dagster_home)
        assert environ["AWS_ENDPOINT_URL"] == aws_env["AWS_ENDPOINT_URL"]

        # Its ancestors: the controller's environment cannot be read; a warm step's zygote's
        # can, and holds no more than the step's.
        ancestors = report["ancestors"]
        assert report["controller"] == "PermissionError"
        assert ancestors[str(controller_pid)] == "PermissionError"
        between = {pid: env for pid, env in ancestors.items() if pid != str(controller_pid)}
        if launcher_args:
            assert set(between) == {str(stack.zygote_pid())}, ancestors
        else:
            assert between == {}, ancestors
        for zygote_environ in between.values():
            assert isinstance(zygote_environ, dict), ancestors
            assert secrets_in(zygote_environ, secrets) == []
            assert zygote_environ["ADDED"] == "1"

        # The bridge (same uid, dumpable: this process reads it as a step could).
        bridge_pid = stack.api("/readyz")["checks"]["bridge"]["pid"]
        bridge_environ = read_environ(bridge_pid)
        assert secrets_in(bridge_environ, secrets) == []
        assert bridge_environ["DAGSTER_HOME"] == str(dagster_home)

        # The token still guards the admin API, wherever it came from.
        assert admin_status(stack, token) == 404
        assert admin_status(stack, "x" * 32) == 401
    finally:
        assert controller.stop() == 0, (tmp_path / "controller.log").read_text()[-4000:]
