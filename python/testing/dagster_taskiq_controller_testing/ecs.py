"""An ECS test bed: moto in this process plus a local "agent" that really runs the tasks.

moto accepts RunTask but never runs a task, and its tasks report exit code 0. Here, moto
runs in-process (``ThreadedMotoServer``, so its backend can be reached directly) and an agent
thread does what the ECS agent would: for every new task it starts the task's overridden
command as a local process with the overridden environment, and when the process ends it
marks the task STOPPED in moto's backend with the real exit code and the stop code ECS
would give (``EssentialContainerExited``, ``UserInitiated`` after StopTask, or
``OutOfMemoryError`` for a SIGKILL nobody asked for). It also records every RunTask call
(``run_task_requests``, with the image of the task definition each names) and counts the
tasks started per step attempt, can make RunTask throttle, can make a task fail to start, and
can interrupt a running task as Fargate Spot does (``interrupt_spot``: SIGTERM, SIGKILL after
the stop timeout, stop code ``SpotInterruption``).

Nothing here is used in production. Only ``dagster`` and ``python`` (this interpreter's) may
be a task's command, so nothing in a message chooses an executable here either.
"""

from __future__ import annotations

import collections
import datetime
import inspect
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from dagster_taskiq_controller.ecs_entrypoint import signal_group
from dagster_taskiq_controller_testing.stack import REGION, aws_env, free_port

logger = logging.getLogger("dagster_taskiq_controller_testing.ecs")

ACCOUNT_ID = "123456789012"
CLUSTER = "dagster-steps"
TASK_FAMILY = "dagster-step"
CONTAINER = "dagster"
LOG_GROUP = "/ecs/dagster-steps"
BUCKET = "dagster-step-args"
ALLOWED_COMMANDS = ("dagster", "python")
# Like ECS's stopTimeout: SIGKILL this long after the SIGTERM of a StopTask.
STOP_TIMEOUT = 5.0
OOM_REASON = "OutOfMemoryError: Container killed due to memory usage"
SPOT_REASON = "Your Spot Task was interrupted."


@dataclass
class AgentTask:
    """One task the agent runs (or refused to run)."""

    arn: str
    step_key: str
    attempt: int
    run_id: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    sigterm_at: float | None = None
    exit_code: int | None = None
    stop_code: str | None = None
    stopped_reason: str | None = None
    log_path: Path | None = None


@dataclass(frozen=True)
class RunTaskRequest:
    """One RunTask call as moto received it (before any throttling the harness injects)."""

    run_id: str
    step_key: str
    attempt: int
    task_definition: str
    overrides: dict[str, Any]
    network_configuration: dict[str, Any] | None
    # The step container's image in the task definition the call names.
    image: str = ""


@dataclass
class EcsHarness:
    """moto (SQS, ECS, S3, EC2) on a free port plus the agent. Use as a context manager."""

    work_dir: Path
    port: int = field(default_factory=free_port)
    poll_interval: float = 0.05
    # (run_id or "*", step_key, attempt) -> stoppedReason of a TaskFailedToStart, used once.
    fail_to_start: dict[tuple[str, str, int], str] = field(default_factory=dict)
    # The same, for every task of that step attempt: it never starts.
    never_start: dict[tuple[str, str, int], str] = field(default_factory=dict)
    tasks: dict[str, AgentTask] = field(default_factory=dict)
    run_task_calls: int = 0
    throttled_calls: int = 0
    subnet_id: str = ""
    security_group_id: str = ""
    _launches: collections.Counter[tuple[str, str, int]] = field(
        default_factory=collections.Counter
    )
    _requests: list[RunTaskRequest] = field(default_factory=list)
    _throttle: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _server: Any = None
    _agent: threading.Thread | None = None
    _patched: dict[str, Any] = field(default_factory=dict)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return aws_env(self.endpoint_url)

    @property
    def task_definition(self) -> str:
        return TASK_FAMILY

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> EcsHarness:
        from moto.moto_api import state_manager
        from moto.server import ThreadedMotoServer

        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Tasks stay RUNNING until the agent stops them (moto's default jumps to STOPPED).
        state_manager.set_transition(
            model_name="ecs::task", transition={"progression": "manual", "times": 10**9}
        )
        # One log line per API call would bury test output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self._provision()
        self._patch_backend()
        self._agent = threading.Thread(target=self._run_agent, name="ecs-agent", daemon=True)
        self._agent.start()
        return self

    def stop(self) -> None:
        from moto.moto_api import state_manager

        self._stop.set()
        if self._agent is not None:
            self._agent.join(10)
        for task in list(self.tasks.values()):
            if task.process is not None and task.process.poll() is None:
                signal_group(task.process.pid, signal.SIGKILL)
                task.process.wait()
        backend = self._backend()
        for name, original in self._patched.items():
            setattr(backend, name, original)
        if self._server is not None:
            self._server.stop()
        state_manager.unset_transition("ecs::task")

    def __enter__(self) -> EcsHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def _provision(self) -> None:
        ec2 = self._client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        # moto names a task's ENI only in a VPC with DNS hostnames (and fails without).
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
        self.subnet_id = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
        self.security_group_id = ec2.create_security_group(
            GroupName="dagster-steps", Description="steps", VpcId=vpc
        )["GroupId"]
        ecs = self._client("ecs")
        ecs.create_cluster(clusterName=CLUSTER)
        ecs.register_task_definition(
            family=TASK_FAMILY,
            networkMode="awsvpc",
            requiresCompatibilities=["FARGATE"],
            cpu="512",
            memory="1024",
            containerDefinitions=[
                {
                    "name": CONTAINER,
                    "image": "dagster-user-code:test",
                    "memory": 1024,
                    "essential": True,
                    "command": ["dagster", "api", "execute_step"],
                    # The controller links each step to its log stream from these.
                    "logConfiguration": {
                        "logDriver": "awslogs",
                        "options": {
                            "awslogs-group": LOG_GROUP,
                            "awslogs-region": REGION,
                            "awslogs-stream-prefix": "steps",
                        },
                    },
                }
            ],
        )
        self._client("s3").create_bucket(Bucket=BUCKET)

    def controller_args(self, *extra: str) -> tuple[str, ...]:
        """Controller flags that run every step as a task of this harness."""
        return (
            "--launcher",
            "ecs",
            "--ecs-cluster",
            CLUSTER,
            "--ecs-task-definition",
            TASK_FAMILY,
            "--ecs-subnets",
            self.subnet_id,
            "--ecs-security-groups",
            self.security_group_id,
            "--ecs-poll-interval",
            "0.2",
            "--offload-bucket",
            BUCKET,
            *extra,
        )

    # ---- moto backend -------------------------------------------------------------------------

    @staticmethod
    def _backend() -> Any:
        from moto.ecs.models import ecs_backends

        return ecs_backends[ACCOUNT_ID][REGION]

    def _patch_backend(self) -> None:
        backend = self._backend()
        original_run_task = backend.run_task
        original_stop_task = backend.stop_task

        run_task_signature = inspect.signature(original_run_task)

        def run_task(*args: Any, **kwargs: Any) -> Any:
            from moto.ecs.exceptions import ECSException, InvalidParameterException

            call = run_task_signature.bind(*args, **kwargs).arguments
            run_id, step_key, attempt = _identity_of_tags(call.get("tags") or [])
            request = RunTaskRequest(
                run_id=run_id,
                step_key=step_key,
                attempt=attempt,
                task_definition=call["task_definition_str"],
                overrides=call.get("overrides") or {},
                network_configuration=call.get("networking_configuration"),
                image=self._image_of(call["task_definition_str"]),
            )
            with self._lock:
                self._requests.append(request)
                self.run_task_calls += 1
                style = self._throttle.pop(0) if self._throttle else None
                if style is not None:
                    self.throttled_calls += 1
            if style == "ThrottlingException":
                raise ECSException("ThrottlingException", "Rate exceeded")
            if style == "RateExceeded":
                raise InvalidParameterException("Rate exceeded")
            tasks = original_run_task(*args, **kwargs)
            now = datetime.datetime.now(datetime.timezone.utc)
            with self._lock:
                for task in tasks:
                    # moto leaves createdAt unset; the controller orders an attempt's tasks by it.
                    task.created_at = now
                    self._launches[_identity(task)] += 1
            return tasks

        def stop_task(cluster_str: str, task_str: str, reason: str) -> Any:
            # ECS stops a task gradually: desired STOPPED now, last status STOPPED once the
            # container is gone (the agent does that part).
            task = self._find(task_str)
            if task is None:
                return original_stop_task(cluster_str, task_str, reason)
            task.desired_status = "STOPPED"
            task.stopped_reason = reason
            task.stop_code = "UserInitiated"
            return task

        backend.run_task = run_task
        backend.stop_task = stop_task
        self._patched = {"run_task": original_run_task, "stop_task": original_stop_task}

    def _image_of(self, task_definition: str) -> str:
        try:
            definition = self._backend().describe_task_definition(task_definition)
        except Exception:
            return ""
        for container in definition.container_definitions:
            if container.get("name") == CONTAINER:
                return str(container.get("image", ""))
        return ""

    def _find(self, task_str: str) -> Any:
        task_id = task_str.split("/")[-1]
        for task in self._all_tasks():
            if task.task_arn.endswith(task_id):
                return task
        return None

    def _all_tasks(self) -> Iterator[Any]:
        backend = self._backend()
        for cluster_tasks in list(backend.tasks.values()):
            yield from list(cluster_tasks.values())

    # ---- fault injection and counts -----------------------------------------------------------

    def throttle_next_run_tasks(self, count: int) -> None:
        """The next `count` RunTask calls fail, alternating ThrottlingException and
        InvalidParameterException "Rate exceeded"."""
        with self._lock:
            self._throttle.extend(
                "ThrottlingException" if i % 2 == 0 else "RateExceeded" for i in range(count)
            )

    def interrupt_spot(self, arn: str) -> None:
        """Takes a running task's capacity back as Fargate Spot does: the container gets SIGTERM
        (then SIGKILL after the stop timeout) and the task stops with ``SpotInterruption``."""
        task = self._find(arn)
        assert task is not None, f"no task {arn}"
        task.desired_status = "STOPPED"
        task.stopped_reason = SPOT_REASON
        task.stop_code = "SpotInterruption"

    def launches(self) -> dict[tuple[str, str, int], int]:
        """Tasks RunTask started, per (run id, step key, attempt)."""
        with self._lock:
            return dict(self._launches)

    def run_task_requests(self, run_id: str) -> list[RunTaskRequest]:
        """Every RunTask call for a step of the run, started or not."""
        with self._lock:
            return [r for r in self._requests if r.run_id == run_id]

    def running_tasks(self) -> list[AgentTask]:
        with self._lock:
            return [t for t in self.tasks.values() if t.process is not None and t.exit_code is None]

    def finished_tasks(self) -> list[AgentTask]:
        with self._lock:
            return [t for t in self.tasks.values() if t.stop_code is not None]

    # ---- the agent ----------------------------------------------------------------------------

    def _run_agent(self) -> None:
        while not self._stop.is_set():
            try:
                self._agent_round()
            except Exception:
                logger.exception("ecs agent round failed")
            self._stop.wait(self.poll_interval)

    def _agent_round(self) -> None:
        for task in self._all_tasks():
            arn = task.task_arn
            known = self.tasks.get(arn)
            if known is None:
                self._start(task)
                continue
            if known.stop_code is not None:
                continue
            process = known.process
            if process is None:
                continue
            if task.desired_status == "STOPPED" and known.sigterm_at is None:
                known.sigterm_at = time.monotonic()
                signal_group(process.pid, signal.SIGTERM)
            elif known.sigterm_at is not None:
                if time.monotonic() - known.sigterm_at > STOP_TIMEOUT:
                    signal_group(process.pid, signal.SIGKILL)
            returncode = process.poll()
            if returncode is not None:
                self._finish(task, known, returncode)

    def _start(self, task: Any) -> None:
        run_id, step_key, attempt = _identity(task)
        override = next(
            (
                o
                for o in (task.overrides or {}).get("containerOverrides", [])
                if o.get("name") == CONTAINER
            ),
            {},
        )
        command = list(override.get("command") or [])
        agent_task = AgentTask(
            arn=task.task_arn, step_key=step_key, attempt=attempt, run_id=run_id, command=command
        )
        with self._lock:
            self.tasks[task.task_arn] = agent_task
        # Each entry fails one task: the relaunch then starts.
        reason = self.fail_to_start.pop((run_id, step_key, attempt), None)
        reason = reason or self.fail_to_start.pop(("*", step_key, attempt), None)
        reason = reason or self.never_start.get((run_id, step_key, attempt))
        reason = reason or self.never_start.get(("*", step_key, attempt))
        if reason is not None:
            self._stop_in_moto(task, agent_task, "TaskFailedToStart", reason, None, reason)
            return
        if not command or command[0] not in ALLOWED_COMMANDS:
            message = f"CannotStartContainerError: the harness does not run {command[:1]}"
            self._stop_in_moto(task, agent_task, "TaskFailedToStart", message, None, message)
            return
        env = dict(os.environ)
        env.update({kv["name"]: kv["value"] for kv in override.get("environment", [])})
        env["PYTHONUNBUFFERED"] = "1"
        executable = str(Path(sys.executable).parent / command[0])
        log_path = self.work_dir / f"task-{task.task_arn.split('/')[-1]}.log"
        agent_task.log_path = log_path
        with open(log_path, "wb") as log:
            agent_task.process = subprocess.Popen(
                [executable, *command[1:]],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info("agent started %s (%s attempt %d)", task.task_arn, step_key, attempt)

    def _finish(self, task: Any, agent_task: AgentTask, returncode: int) -> None:
        exit_code = returncode if returncode >= 0 else 128 - returncode
        stop_requested = task.desired_status == "STOPPED"
        container_reason = None
        if stop_requested:
            # Set by StopTask (UserInitiated) or by interrupt_spot.
            stop_code = getattr(task, "stop_code", None) or "UserInitiated"
            stopped_reason = task.stopped_reason or "Task stopped by user"
        else:
            stop_code = "EssentialContainerExited"
            stopped_reason = "Essential container in task exited"
            if returncode == -signal.SIGKILL:
                # A SIGKILL nobody asked for is what the kernel's OOM killer does.
                container_reason = OOM_REASON
        self._stop_in_moto(task, agent_task, stop_code, stopped_reason, exit_code, container_reason)

    def _stop_in_moto(
        self,
        task: Any,
        agent_task: AgentTask,
        stop_code: str,
        stopped_reason: str,
        exit_code: int | None,
        container_reason: str | None,
    ) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        for container in task.containers:
            container.last_status = "STOPPED"
            container.exitCode = exit_code
            container.exit_code = exit_code
            container.reason = container_reason
        task.stop_code = stop_code
        task.stopped_reason = stopped_reason
        task.stopped_at = now
        task.desired_status = "STOPPED"
        task.last_status = "STOPPED"
        with self._lock:
            agent_task.exit_code = exit_code
            agent_task.stop_code = stop_code
            agent_task.stopped_reason = stopped_reason
        logger.info(
            "agent stopped %s: %s exit %s (%s)", task.task_arn, stop_code, exit_code, stopped_reason
        )


def _identity(task: Any) -> tuple[str, str, int]:
    return _identity_of_tags(task.tags or [])


def _identity_of_tags(task_tags: list[dict[str, str]]) -> tuple[str, str, int]:
    tags = {t["key"]: t["value"] for t in task_tags}
    attempt = tags.get("dagster/attempt", "-1")
    return (
        tags.get("dagster/run-id", ""),
        tags.get("dagster/step-key", ""),
        int(attempt) if attempt.lstrip("-").isdigit() else -1,
    )
