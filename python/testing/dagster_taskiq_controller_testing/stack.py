"""A local stack for the tests, the benchmarks and the demo: a moto server on 127.0.0.1, a work
queue with its dead-letter queue, and a controller process. Nothing here is used in production.

The controller binary comes from `DAGSTER_TASKIQ_CONTROLLER_BINARY` (or `Controller(binary=...)`):
this package does not know where a source checkout keeps its build output."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import boto3

REGION = "us-east-1"
BINARY_ENV = "DAGSTER_TASKIQ_CONTROLLER_BINARY"

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.25,
) -> T:
    """Polls `condition` until it returns a truthy value; after `timeout` seconds raises an
    AssertionError (a condition a test waits for did not hold).

    The pause between polls starts at 20 ms and grows by half each time up to `interval`: a
    condition that holds soon is seen soon, and a long wait does not spend the suite's CPU on
    polls (each one is an SQS, HTTP or database call somewhere)."""
    deadline = time.monotonic() + timeout
    pause = min(0.02, interval)
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 1.5, interval)


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """The controller's metric ``dagster_taskiq_<name>`` in a Prometheus text exposition:
    the sum of its samples that carry ``labels`` (all of them when none are given), 0 when
    there are none. The warm pool's metrics are per Python environment, for one."""
    total = 0.0
    pattern = rf"^dagster_taskiq_{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$"
    for sample_labels, value in re.findall(pattern, exposition, re.MULTILINE):
        carried = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', sample_labels))
        if all(carried.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def controller_binary() -> Path:
    """The controller binary named by `DAGSTER_TASKIQ_CONTROLLER_BINARY`; it must exist."""
    value = os.environ.get(BINARY_ENV)
    if not value:
        raise RuntimeError(f"set {BINARY_ENV} to the dagster-taskiq-controller binary to run")
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{BINARY_ENV}={value}: no such file (build it with cargo)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def aws_env(endpoint_url: str) -> dict[str, str]:
    """The standard AWS variables that point every client (boto3 and the Rust SDK) at moto."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return 200 <= response.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except OSError:
        return False


@dataclass
class MotoServer:
    """`moto_server` on 127.0.0.1 with a free port."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        executable = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        command = ([executable] if executable else [sys.executable, "-m", "moto.server"]) + [
            "-H",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: _http_ok(f"{self.url}/moto-api/"), 30, "moto server to answer")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Queues:
    queue_url: str
    dlq_url: str


def create_queues(
    endpoint_url: str,
    name: str,
    visibility_timeout: int = 30,
    max_receive_count: int = 10,
) -> Queues:
    """A work queue and its dead-letter queue, tied by a RedrivePolicy. A name ending in
    ``.fifo`` makes both FIFO queues (SQS requires a FIFO queue's DLQ to be FIFO)."""
    sqs = boto3.client("sqs", endpoint_url=endpoint_url, region_name=REGION)
    base = name.removesuffix(".fifo")
    fifo = base != name
    # Without content-based deduplication: every send must carry its deduplication id.
    kind = {"FifoQueue": "true"} if fifo else {}
    dlq_name = f"{base}-dlq.fifo" if fifo else f"{name}-dlq"
    dlq_url = sqs.create_queue(QueueName=dlq_name, Attributes=kind)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = f'{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max_receive_count}"}}'
    queue_url = sqs.create_queue(
        QueueName=name,
        Attributes={
            **kind,
            "VisibilityTimeout": str(visibility_timeout),
            "RedrivePolicy": redrive,
        },
    )["QueueUrl"]
    return Queues(queue_url=queue_url, dlq_url=dlq_url)


# capability(7) numbers and names of the capabilities that let a process read another's
# environment although that one is not dumpable: CAP_SYS_PTRACE, and for reads (not for
# ptrace attach) CAP_SYS_ADMIN and CAP_PERFMON, as measured on the test machine's kernel.
INSPECTION_CAPABILITIES = {19: "sys_ptrace", 21: "sys_admin", 38: "perfmon"}


def holds_capability(number: int) -> bool:
    """True when this process's effective capability set has capability ``number``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> number & 1)
    raise RuntimeError("/proc/self/status has no CapEff line")


def without_inspection_capabilities() -> list[str]:
    """A `Controller.command_prefix` that starts the controller, and so every step, without
    `INSPECTION_CAPABILITIES`, as in a default container (Docker grants none of them): a
    process holding one (root in this test sandbox) reads any process's environment,
    non-dumpable or not. Empty when this process holds none either."""
    held = [name for number, name in INSPECTION_CAPABILITIES.items() if holds_capability(number)]
    if not held:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise FileNotFoundError(f"setpriv (util-linux) is needed to drop {held}")
    return [setpriv, "--bounding-set", ",".join(f"-{name}" for name in held), "--"]


@dataclass
class Controller:
    """A controller process started with the given flags."""

    queue_url: str
    env: Mapping[str, str]
    # None: the binary named by DAGSTER_TASKIQ_CONTROLLER_BINARY.
    binary: Path | None = None
    args: Sequence[str] = ()
    # Runs the controller under this command (which must exec it: the pid stays the same).
    command_prefix: Sequence[str] = ()
    log_path: Path | None = None
    # The `--python` of steps and the bridge; None: this interpreter.
    python: Path | None = None
    dashboard_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, wait_ready: bool = True) -> Controller:
        binary = self.binary if self.binary is not None else controller_binary()
        if not binary.is_file():
            raise FileNotFoundError(f"controller binary {binary} not found (build it with cargo)")
        command = [
            *self.command_prefix,
            str(binary),
            "run",
            "--queue-url",
            self.queue_url,
            "--python",
            str(self.python or sys.executable),
            "--dashboard-addr",
            f"127.0.0.1:{self.dashboard_port}",
            *self.args,
        ]
        env = {**os.environ, **self.env}
        env.setdefault("RUST_LOG", "info")
        stdout: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")
            stdout = self._log
        self.process = subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT)
        if wait_ready:
            wait_for(self._ready, 180, "controller to be ready")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"controller exited with {self.process.returncode}; log: {self.log_path}"
            )
        return _http_ok(f"{self.dashboard_url}/readyz")

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
