"""Code locations in their own Python environments (docs/operations.md, "Code locations").

Two code locations, each a module importable only in its own virtualenv: ``loc_a_jobs`` in an
environment on the Dagster 1.12 of ``.venv-versions`` (built by `make versions`), ``loc_b_jobs``
in one on this interpreter's newer Dagster. Each environment is a small venv made by the test
whose ``.pth`` files add its Dagster's site-packages and its location's module directory, and
nothing else: the controller's ``--python`` (this interpreter) can import neither module. Each
run is created with a ``remote_job_origin`` naming its location, as a workspace launch does, and
its run worker runs in its location's environment. The controller maps the two locations with
``--python-for`` and refuses the rest (``--python-for-unmapped refuse``): each step must run in
its location's interpreter (cold, then forked from that environment's own zygote), and a run
whose location is not mapped gets a verdict naming it and its message goes to the DLQ.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import dagster
import pytest
from conftest import REPO_ROOT, child_env, take_dead_letters, wait_for
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from test_e2e_process import Stack, events_of

from dagster_taskiq_controller.executor import read_verdict
from dagster_taskiq_controller_testing.stack import metric_value

OLD_VENV = REPO_ROOT / ".venv-versions" / "dagster-1.12"
RUN_TIMEOUT = 90.0

JOBS = """
import os
import sys

import dagster
from dagster import Output, job, op

from dagster_taskiq_controller import taskiq_controller_executor


@op
def where() -> Output[str]:
    metadata = {
        "python": sys.executable,
        "dagster_version": dagster.__version__,
        "pid": os.getpid(),
    }
    return Output(sys.executable, metadata=metadata)


@job(executor_def=taskiq_controller_executor)
def located():
    where()
"""

# Creates the run with a remote_job_origin naming its code location (what a launch from a
# workspace stores), then runs it in this process, as a run worker does.
RUN_WORKER = """
import sys

from dagster import DagsterInstance
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.execution.api import execute_run
from dagster._core.remote_origin import (
    InProcessCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

module, location = sys.argv[1], sys.argv[2]
recon = ReconstructableJob.for_module(module, "located")
code_location = InProcessCodeLocationOrigin(
    loadable_target_origin=LoadableTargetOrigin(executable_path=sys.executable, module_name=module),
    location_name=location,
)
origin = RemoteJobOrigin(
    repository_origin=RemoteRepositoryOrigin(code_location, "__repository__"),
    job_name="located",
)
with DagsterInstance.get() as instance:
    run = instance.create_run_for_job(
        job_def=recon.get_definition(),
        remote_job_origin=origin,
        job_code_origin=recon.get_python_origin(),
    )
    print("RUN_ID", run.run_id, flush=True)
    result = execute_run(recon, run, instance)
sys.exit(0 if result.success else 1)
"""


@dataclass(frozen=True)
class Location:
    name: str
    module: str
    python: Path
    dagster_minor: str


def _site_packages(python: Path | str) -> str:
    return subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _environment(root: Path, base_python: Path | str, module: str) -> Path:
    """A venv over ``base_python``'s environment that can also import ``module`` (written into a
    directory only this venv's path names)."""
    code = root / "code"
    code.mkdir(parents=True)
    (code / f"{module}.py").write_text(JOBS)
    base_site = _site_packages(base_python)
    venv = root / "venv"
    subprocess.run([str(base_python), "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(_site_packages(python))
    # addsitedir, not a plain path line, so the base environment's own .pth files (editable
    # installs) are processed too.
    (site / "base_env.pth").write_text(f"import site; site.addsitedir({base_site!r})\n")
    (site / "location.pth").write_text(f"{code}\n")
    return python


@pytest.fixture
def locations(tmp_path: Path) -> tuple[Location, Location]:
    old_python = OLD_VENV / "bin" / "python"
    if not (OLD_VENV / ".installed").is_file():
        pytest.fail(f"{OLD_VENV} is missing or half-built: run `make versions`")
    a = Location(
        "loc_a", "loc_a_jobs", _environment(tmp_path / "env_a", old_python, "loc_a_jobs"), "1.12"
    )
    b = Location(
        "loc_b",
        "loc_b_jobs",
        _environment(tmp_path / "env_b", sys.executable, "loc_b_jobs"),
        ".".join(dagster.__version__.split(".")[:2]),
    )
    # Each module is importable in its own environment only, and not by the default --python.
    for python in (a.python, b.python, Path(sys.executable)):
        assert _importable(python, a.module, b.module) == [
            python == a.python,
            python == b.python,
        ], python
    return a, b


def _importable(python: Path, *modules: str) -> list[bool]:
    """Which of ``modules`` ``python`` finds (without importing them)."""
    found = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util, sys; "
            "print(*[importlib.util.find_spec(m) is not None for m in sys.argv[1:]])",
            *modules,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [word == "True" for word in found]


def _start_run_worker(
    location: Location, python: Path, location_name: str, log: Path
) -> subprocess.Popen[bytes]:
    script = log.with_suffix(".py")
    script.write_text(textwrap.dedent(RUN_WORKER))
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(python), str(script), location.module, location_name],
            env=child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _run_id(log: Path) -> str:
    match = re.search(r"^RUN_ID (\S+)$", log.read_text(), re.MULTILINE)
    assert match is not None, log.read_text()[-3000:]
    return match.group(1)


def _metric(stack: Stack, name: str, **labels: str) -> float:
    """The samples of a metric with these labels (0 when absent)."""
    return metric_value(stack.metrics(), name, **labels)


@pytest.mark.parametrize("mode", ["cold", "warm"])
def test_each_code_location_runs_in_its_own_environment_and_an_unmapped_one_is_refused(
    mode: str,
    locations: tuple[Location, Location],
    make_stack,  # noqa: ANN001
    instance: DagsterInstance,
    tmp_path: Path,
) -> None:
    a, b = locations
    args = [
        "--python-for",
        f"{a.name}={a.python},{b.name}={b.python}",
        "--python-for-unmapped",
        "refuse",
    ]
    if mode == "warm":
        args.append("--warm-pool")
    stack: Stack = make_stack(*args)

    # Three runs at once: one per mapped location, and one from a location nobody mapped
    # (its code is loc_b's, so its run worker can load it).
    workers = {
        name: _start_run_worker(location, location.python, name, tmp_path / f"worker-{name}.log")
        for name, location in ((a.name, a), (b.name, b), ("loc_c", b))
    }
    for worker in workers.values():
        try:
            worker.wait(RUN_TIMEOUT)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    logs = {name: (tmp_path / f"worker-{name}.log") for name in workers}
    runs = {name: _run_id(log) for name, log in logs.items()}

    for location in (a, b):
        run = instance.get_run_by_id(runs[location.name])
        assert run is not None and run.status == DagsterRunStatus.SUCCESS, logs[
            location.name
        ].read_text()[-4000:]
        assert run.remote_job_origin.location_name == location.name
        (output,) = events_of(instance, run.run_id, DagsterEventType.STEP_OUTPUT)
        metadata = output.dagster_event.event_specific_data.metadata
        # The step ran in its location's interpreter, on its location's Dagster.
        assert metadata["python"].value == str(location.python), metadata
        assert metadata["dagster_version"].value.startswith(location.dagster_minor + ".")

    # The unmapped location: refused with a verdict that names it; the step never ran.
    refused = instance.get_run_by_id(runs["loc_c"])
    assert refused is not None and refused.status == DagsterRunStatus.FAILURE
    records = instance.get_records_for_run(refused.run_id, limit=10_000).records
    dagster_events = [
        r.event_log_entry.dagster_event for r in records if r.event_log_entry.is_dagster_event
    ]
    verdicts = [v for v in map(read_verdict, dagster_events) if v is not None]
    assert [(step, attempt) for step, attempt, _ in verdicts] == [("where", 0)], verdicts
    assert '"loc_c"' in verdicts[0][2] and "unmapped_location" in verdicts[0][2], verdicts
    assert not events_of(instance, refused.run_id, DagsterEventType.STEP_START)
    (dead,) = take_dead_letters(stack.queues.dlq_url, 1, 30)
    assert dead["dagster_taskiq_error"] == "unmapped_location", dead
    assert refused.run_id in dead["body"]

    if mode == "warm":
        # One zygote per mapped environment, each started by its first step; none for the
        # default --python, which runs no step here.
        for location in (a, b):
            labels = {"environment": location.name}
            assert _metric(stack, "warm_pool_forks_total", **labels) == 1, stack.metrics()
            assert _metric(stack, "warm_pool_zygote_starts_total", result="ok", **labels) == 1
            assert _metric(stack, "warm_pool_zygote_pid", **labels) > 0
        assert 'environment="default"' not in stack.metrics()
        assert "warm_pool_fallbacks_total" not in stack.metrics()
    wait_for(stack.queue_empty, 30, "every message to be deleted")
