"""End-to-end benchmark, in one sitting: wall time of a 4-op diamond and an 11-op fan-out
(median of N runs after one warm-up run each) through

- the controller, cold (one fresh ``dagster api execute_step`` per step);
- the controller with the warm pool (steps forked from a zygote that preloaded the job file);
- the controller with the warm pool but the executor polling the event log every 1 s
  (Dagster's default), to price the executor's poll interval;
- Dagster's multiprocess executor with ``spawn``, and with ``forkserver`` + ``preload_modules``;
- an in-process taskiq worker (real ``taskiq`` + ``taskiq-aio-sqs``) running the steps inside
  its own process (no isolation), as dagster-taskiq does;
- on a PostgreSQL-backed instance (a throwaway server from the machine's PostgreSQL binaries,
  ``make postgresql``): the controller cold and warm, and the forkserver executor beside them;
- Dagster's ``in_process_executor`` (every step in the run worker, no isolation): the floor.

Also the step hop (an upstream's STEP_SUCCESS written → the next STEP_START written) of every
variant, and for the controller both the hop and the step start cut into stages (bench/hop.py).

Also the step start latency (message received → op code running) and, for the controller, where
the time before a step starts goes (queue → received → bridge check → launch → op running).
Writes a Markdown report to stdout and to ``target/bench-e2e.md``.

Run with ``make bench-e2e`` (needs ``cargo build --release`` and the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import hop  # noqa: E402  (bench/hop.py, beside this file)

GRAPHS = ("diamond4", "fanout11")
STEPS = {"diamond4": 4, "fanout11": 11}
MAX_CONCURRENT = 16
TASKIQ_WORKERS = os.cpu_count() or 2
PG = "PostgreSQL: "
VARIANTS = [
    "cold",
    "warm",
    "warm_poll1",
    "spawn",
    "forkserver",
    "taskiq",
    "cold_pg",
    "warm_pg",
    "forkserver_pg",
    "in_process",
    "scale",
]


@dataclass
class Variant:
    name: str
    label: str
    executor: str  # which job family: controller, multiprocess, taskiq
    run_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measured:
    seconds: dict[str, list[float]] = field(default_factory=dict)
    # Seconds from message received (controller) or task entry (taskiq) to op code running.
    start_latency: list[float] = field(default_factory=list)
    # The same per job (graph name).
    start_latency_by_graph: dict[str, list[float]] = field(default_factory=dict)
    # Controller only: per phase, seconds.
    phases: dict[str, list[float]] = field(default_factory=dict)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def parse_time(text: str) -> float:
    # chrono writes RFC 3339 with nanoseconds; Python takes at most microseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def metric(dashboard: str, name: str) -> float:
    with urllib.request.urlopen(f"{dashboard}/metrics", timeout=5) as response:
        text = response.read().decode()
    # Summed over labels: the warm pool's metrics are per Python environment (one here).
    from dagster_taskiq_controller_testing.stack import metric_value

    return metric_value(text, name)


class Bench:
    def __init__(
        self, repeats: int, binary: Path, workdir: Path, controller_concurrency: int
    ) -> None:
        self.repeats = repeats
        self.controller_concurrency = controller_concurrency
        self.binary = binary
        self.workdir = workdir
        self.results: dict[str, Measured] = {}
        # The step hop of every variant, and its stages for the controller (bench/hop.py).
        self.hops: dict[str, hop.Breakdown] = {}
        self.dashboard: str | None = None
        self.probe = hop.PublishProbe()
        self.probe.install()

    # --- one job run -------------------------------------------------------------------------

    def run_job(self, job_name: str, run_config: dict[str, Any]) -> tuple[float, str]:
        import bench_jobs
        from dagster import DagsterInstance, execute_job
        from dagster._core.definitions.reconstruct import ReconstructableJob

        recon = ReconstructableJob.for_file(bench_jobs.__file__, job_name)
        instance = DagsterInstance.get()
        started = time.perf_counter()
        with execute_job(recon, instance, run_config=run_config) as result:
            elapsed = time.perf_counter() - started
            if not result.success:
                raise RuntimeError(f"{job_name} failed (run {result.run_id})")
            return elapsed, result.run_id

    def op_starts(self, run_id: str) -> dict[str, float]:
        from dagster import DagsterEventType, DagsterInstance

        instance = DagsterInstance.get()
        starts = {}
        for record in instance.get_records_for_run(
            run_id, of_type=DagsterEventType.STEP_OUTPUT, limit=1000
        ).records:
            metadata = record.event_log_entry.dagster_event.event_specific_data.metadata
            starts[record.event_log_entry.step_key] = float(metadata["started"].value)
        return starts

    def enqueue_times(self, run_id: str) -> dict[str, float]:
        from dagster import DagsterEventType, DagsterInstance

        instance = DagsterInstance.get()
        times = {}
        for record in instance.get_records_for_run(
            run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=10_000
        ).records:
            entry = record.event_log_entry
            if entry.step_key and "enqueued for dagster-taskiq-controller" in (
                entry.user_message or ""
            ):
                times.setdefault(entry.step_key, entry.timestamp)
        return times

    def measure(
        self,
        variant: Variant,
        observe: Callable[[str, Measured], None] | None = None,
    ) -> None:
        measured = self.results.setdefault(variant.name, Measured())
        for graph in GRAPHS:
            job_name = f"{graph}_{variant.executor}"
            warmup, _ = self.run_job(job_name, variant.run_config)
            times = []
            calls_before = self.hop_calls()
            for _ in range(self.repeats):
                seconds, run_id = self.run_job(job_name, variant.run_config)
                times.append(seconds)
                if observe is not None:
                    before = len(measured.start_latency)
                    observe(run_id, measured)
                    measured.start_latency_by_graph.setdefault(graph, []).extend(
                        measured.start_latency[before:]
                    )
                # Per job: in the fan-out most branches wait for one of the controller's run
                # slots, which the diamond's steps (at most 2 at once) never do.
                self.observe_hop(f"{variant.name}/{graph}", run_id)
            self.hop_calls_since(variant.name, calls_before)
            measured.seconds[graph] = times
            log(
                f"{variant.label}: {graph} warm-up {warmup:.2f}s, runs "
                + ", ".join(f"{t:.2f}" for t in times)
            )

    # --- the step hop (bench/hop.py) -------------------------------------------------------

    def observe_hop(self, name: str, run_id: str) -> None:
        from dagster import DagsterInstance

        history = None
        if self.dashboard is not None:
            history = {
                r["step_key"]: {h["state"]: parse_time(h["at"]) for h in r["history"]}
                for r in http_json(f"{self.dashboard}/api/v1/steps")
                if r["run_id"] == run_id
            }
        breakdown = self.hops.setdefault(name, hop.Breakdown())
        hop.observe_run(breakdown, DagsterInstance.get(), run_id, history, self.probe)

    def hop_calls(self) -> dict[str, tuple[float, float]]:
        if self.dashboard is None:
            return {}
        with urllib.request.urlopen(f"{self.dashboard}/metrics", timeout=5) as response:
            return hop.call_totals(response.read().decode())

    def hop_calls_since(self, name: str, before: dict[str, tuple[float, float]]) -> None:
        if self.dashboard is not None:
            hop.add_calls(self.hops.setdefault(name, hop.Breakdown()), before, self.hop_calls())

    def hop_report(self, present: list[tuple[str, str]]) -> list[str]:
        # Each run was observed once, into its job's breakdown; a variant's is their union
        # with the calls of its timed runs.
        rows = []
        for name, label in present:
            jobs = [self.hops[f"{name}/{g}"] for g in GRAPHS if f"{name}/{g}" in self.hops]
            if jobs or name in self.hops:
                rows.append((label, hop.merged(jobs, self.hops.get(name))))
        per_job = [
            (f"{label}, {graph}", self.hops[f"{name}/{graph}"])
            for name, label in present
            for graph in GRAPHS
            if f"{name}/{graph}" in self.hops
        ]
        lines = hop.hop_table(rows + per_job, percentile)
        for label, breakdown in rows:
            lines += hop.report_lines(label, breakdown, percentile)
        # The stages without the wait for a run slot: the diamond's.
        for label, breakdown in per_job:
            if label.endswith(f", {GRAPHS[0]}"):
                lines += hop.report_lines(label, breakdown, percentile)
        return lines

    def run_in_process(self) -> None:
        """Dagster's in_process_executor: every step in the run worker, one after another (no
        isolation); the floor of the comparison."""
        self.measure(Variant("in_process", "Dagster in_process_executor", "in_process"))

    # --- variants ----------------------------------------------------------------------------

    @contextmanager
    def controller(self, name: str, extra: tuple[str, ...]) -> Iterator[str]:
        from dagster_taskiq_controller_testing.stack import Controller, create_queues

        queues = create_queues(os.environ["AWS_ENDPOINT_URL"], f"bench-{uuid.uuid4().hex[:8]}")
        os.environ["DAGSTER_TASKIQ_SQS_QUEUE_URL"] = queues.queue_url
        controller = Controller(
            queue_url=queues.queue_url,
            env=dict(os.environ),
            binary=self.binary,
            args=(
                "--max-concurrent",
                str(self.controller_concurrency),
                "--receive-wait",
                "20",
                *extra,
            ),
            log_path=self.workdir / f"controller-{name}.log",
        )
        with controller:
            if "--warm-pool" in extra:
                deadline = time.monotonic() + 120
                while metric(controller.dashboard_url, "warm_pool_zygote_pid") == 0:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the zygote did not become ready")
                    time.sleep(0.05)
            self.dashboard = controller.dashboard_url
            try:
                yield controller.dashboard_url
            finally:
                self.dashboard = None

    def controller_observer(self, dashboard: str) -> Callable[[str, Measured], None]:
        def observe(run_id: str, measured: Measured) -> None:
            records = [r for r in http_json(f"{dashboard}/api/v1/steps") if r["run_id"] == run_id]
            starts = self.op_starts(run_id)
            enqueued = self.enqueue_times(run_id)
            for record in records:
                history = {h["state"]: parse_time(h["at"]) for h in record["history"]}
                step = record["step_key"]
                if step not in starts or "received" not in history:
                    continue
                measured.start_latency.append(starts[step] - history["received"])
                phases = {
                    "queue (enqueued → received)": (enqueued.get(step), history["received"]),
                    "bridge check (received → admitted)": (
                        history["received"],
                        history.get("admitted"),
                    ),
                    "admission (admitted → launching)": (
                        history.get("admitted"),
                        history.get("launching"),
                    ),
                    "launch (launching → running)": (
                        history.get("launching"),
                        history.get("running"),
                    ),
                    "step init (running → op code)": (history.get("running"), starts[step]),
                }
                for phase, (begin, end) in phases.items():
                    if begin is not None and end is not None:
                        measured.phases.setdefault(phase, []).append(end - begin)

        return observe

    def run_controller(self, name: str, label: str, extra: tuple[str, ...], poll: float) -> None:
        variant = Variant(
            name,
            label,
            "controller",
            {"execution": {"config": {"poll_interval_seconds": poll}}},
        )
        with self.controller(name, extra) as dashboard:
            self.measure(variant, self.controller_observer(dashboard))
            if "--warm-pool" in extra:
                forks = metric(dashboard, "warm_pool_forks_total")
                log(f"{label}: {forks:.0f} warm forks")

    def run_multiprocess(self, name: str, label: str, start_method: dict[str, Any]) -> None:
        config = {"max_concurrent": MAX_CONCURRENT, "start_method": start_method}
        self.measure(Variant(name, label, "multiprocess", {"execution": {"config": config}}))

    def run_taskiq(self) -> None:
        import boto3

        # Named (in main) before bench_jobs imported taskiq_app, whose broker reads it.
        boto3.client("sqs").create_queue(QueueName=os.environ["BENCH_TASKIQ_QUEUE"])
        start_log = Path(os.environ["BENCH_TASKIQ_START_LOG"])
        worker_log = open(self.workdir / "taskiq-worker.log", "ab")
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskiq",
                "worker",
                "taskiq_app:broker",
                # One step at a time per worker process (Dagster steps deadlocked when run
                # concurrently in threads of one process here), one process per CPU.
                "--workers",
                str(TASKIQ_WORKERS),
                "--max-threadpool-threads",
                "1",
                "--app-dir",
                str(BENCH_DIR),
            ],
            cwd=BENCH_DIR,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        )

        def observe(run_id: str, measured: Measured) -> None:
            starts = self.op_starts(run_id)
            for line in start_log.read_text().splitlines():
                line_run, step, received = line.split()
                if line_run == run_id and step in starts:
                    measured.start_latency.append(starts[step] - float(received))

        try:
            variant = Variant("taskiq", "taskiq in-process worker", "taskiq")
            self.measure(variant, observe)
        finally:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            worker_log.close()

    # --- report ------------------------------------------------------------------------------

    def storage_ratios(
        self, present: list[tuple[str, str]], medians: dict[tuple[str, str], float]
    ) -> list[str]:
        """PostgreSQL's wall time over SQLite's, per variant measured on both."""
        pairs = [
            (name, label)
            for name, label in present
            if name.endswith("_pg") and name.removesuffix("_pg") in self.results
        ]
        if not pairs:
            return []
        lines = [
            "",
            "Ratio of a PostgreSQL-backed instance to SQLite, same variant (lower is better):",
            "",
            "| job | " + " | ".join(label.removeprefix(PG) for _, label in pairs) + " |",
            "|---|" + "---|" * len(pairs),
        ]
        for graph in GRAPHS:
            cells = [
                f"{medians[(name, graph)] / medians[(name.removesuffix('_pg'), graph)]:.2f}"
                for name, _ in pairs
            ]
            lines.append(f"| {graph} | " + " | ".join(cells) + " |")
        return lines

    def report(self) -> str:
        names = [
            ("cold", "controller, cold"),
            ("warm", "controller, warm pool"),
            ("warm_poll1", "warm pool, executor poll 1 s"),
            ("spawn", "multiprocess (spawn)"),
            ("forkserver", "multiprocess (forkserver + preload)"),
            ("taskiq", "taskiq in-process worker"),
            ("cold_pg", "PostgreSQL: controller, cold"),
            ("warm_pg", "PostgreSQL: controller, warm pool"),
            ("forkserver_pg", "PostgreSQL: multiprocess (forkserver + preload)"),
            ("in_process", "Dagster in_process_executor"),
        ]
        present = [(n, label) for n, label in names if n in self.results]
        lines = [
            f"# End-to-end benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs)",
            "",
            f"Wall time of a run in seconds: median (min to max) of {self.repeats} after one "
            f"warm-up run. Steps at once, at most: {self.controller_concurrency} through the "
            f"controller, {MAX_CONCURRENT} for the multiprocess executor, {TASKIQ_WORKERS} for "
            f"the taskiq worker (one per worker process).",
            "",
            "| job | " + " | ".join(label for _, label in present) + " |",
            "|---|" + "---|" * len(present),
        ]
        medians: dict[tuple[str, str], float] = {}
        for graph in GRAPHS:
            cells = []
            for name, _ in present:
                runs = self.results[name].seconds[graph]
                value = statistics.median(runs)
                medians[(name, graph)] = value
                cells.append(f"{value:.2f} ({min(runs):.2f} to {max(runs):.2f})")
            lines.append(f"| {graph} ({STEPS[graph]} ops) | " + " | ".join(cells) + " |")
        if "taskiq" in self.results:
            lines += [
                "",
                "Ratio to the taskiq in-process worker (lower is better; target ≤ 1.0):",
                "",
            ]
            lines.append("| job | " + " | ".join(label for _, label in present) + " |")
            lines.append("|---|" + "---|" * len(present))
            for graph in GRAPHS:
                base = medians[("taskiq", graph)]
                cells = [f"{medians[(name, graph)] / base:.2f}" for name, _ in present]
                lines.append(f"| {graph} | " + " | ".join(cells) + " |")
        controllers = [(n, label) for n, label in present if n in ("cold", "warm")]
        multiprocess = [(n, label) for n, label in present if n in ("spawn", "forkserver")]
        lines += self.storage_ratios(present, medians)
        if controllers and multiprocess:
            lines += [
                "",
                "Ratio of the controller to Dagster's multiprocess executor at the same "
                "concurrency (lower is better):",
                "",
                "| job | controller | "
                + " | ".join(f"÷ {label}" for _, label in multiprocess)
                + " |",
                "|---|---|" + "---|" * len(multiprocess),
            ]
            for graph in GRAPHS:
                for name, label in controllers:
                    cells = [
                        f"{medians[(name, graph)] / medians[(base, graph)]:.2f}"
                        for base, _ in multiprocess
                    ]
                    lines.append(f"| {graph} | {label} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Step start latency, message received (taskiq: task entry) → op code running, "
            "seconds, over every step of the timed runs:",
            "",
            "| launcher | steps | p50 | p99 |",
            "|---|---|---|---|",
        ]
        for name, label in present:
            rows = [(label, self.results[name].start_latency)] + [
                (f"{label}, {graph}", values)
                for graph, values in self.results[name].start_latency_by_graph.items()
            ]
            for row_label, latency in rows:
                if latency:
                    lines.append(
                        f"| {row_label} | {len(latency)} | {percentile(latency, 0.5):.3f} | "
                        f"{percentile(latency, 0.99):.3f} |"
                    )
        lines += self.hop_report(present)
        for name, label in present:
            phases = self.results[name].phases
            if not phases:
                continue
            lines += [
                "",
                f"Where a step's start goes, {label} (seconds):",
                "",
                "| phase | p50 | p99 |",
                "|---|---|---|",
            ]
            for phase, values in phases.items():
                lines.append(
                    f"| {phase} | {percentile(values, 0.5):.3f} | {percentile(values, 0.99):.3f} |"
                )
        return "\n".join(lines) + "\n"


def run_on_postgres(bench: Bench, only: set[str], warm: tuple[str, ...], workdir: Path) -> None:
    """The PostgreSQL variants, on a throwaway server and a DAGSTER_HOME of their own."""
    from dagster_taskiq_controller_testing.postgres import PostgresServer, write_dagster_yaml

    sqlite_home = os.environ["DAGSTER_HOME"]
    with PostgresServer() as server:
        home = write_dagster_yaml(workdir / "dagster_home_pg", server.url(server.create_database()))
        os.environ["DAGSTER_HOME"] = str(home)
        try:
            if "cold_pg" in only:
                bench.run_controller("cold_pg", "PostgreSQL: controller, cold", (), poll=0.1)
            if "warm_pg" in only:
                bench.run_controller("warm_pg", "PostgreSQL: controller, warm pool", warm, poll=0.1)
            if "forkserver_pg" in only:
                bench.run_multiprocess(
                    "forkserver_pg",
                    "PostgreSQL: multiprocess (forkserver + preload)",
                    {"forkserver": {"preload_modules": ["dagster", "bench_jobs"]}},
                )
        finally:
            os.environ["DAGSTER_HOME"] = sqlite_home


# --- scale: a wide fan-out's throughput and CPU per step (issue 19) ---------------------------
#
# One source and N trivial leaves, through the controller's warm pool and through Dagster's
# in_process_executor (the floor: no isolation), on SQLite. Per run: wall time, steps per
# second and CPU seconds per step of every process: the controller, its bridge sidecar, the
# zygote with its forked steps (reaped by the zygote, so counted in its children's time) and
# the run worker (this process: ``execute_job`` runs the executor here). Then the bridge's
# cost per check when the run has 1 finished step and when it has 1,000.

SCALE_PROCESSES = ("controller", "bridge", "zygote + steps", "run worker")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ScaleRow:
    leaves: int
    executor: str
    seconds: list[float] = field(default_factory=list)
    # Per process, CPU seconds of each run.
    cpu: dict[str, list[float]] = field(default_factory=dict)


def _proc_stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # the fields after the command name


def _cpu_of(pid: int, with_children: bool = False) -> float:
    """CPU seconds (user + system) of ``pid``, and of its reaped children with
    ``with_children``."""
    fields = _proc_stat(pid)
    # Fields 14-17 of proc(5): utime stime cutime cstime; this list starts at field 3.
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_proc_stat(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _scale_processes(binary: Path) -> dict[str, tuple[int, bool]]:
    """pid of each measured process and whether its reaped children count too."""
    (controller,) = [p for p in _children(os.getpid()) if str(binary) in _cmdline(p)]
    found: dict[str, tuple[int, bool]] = {"controller": (controller, False)}
    for child in _children(controller):
        command = _cmdline(child)
        if "dagster_taskiq_controller.bridge" in command:
            found["bridge"] = (child, False)
        elif "dagster_taskiq_controller.zygote" in command:
            found["zygote + steps"] = (child, True)
    return found


def _self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _scale_cpu(binary: Path) -> tuple[dict[str, dict[int, float]], float]:
    """CPU seconds so far of each measured process by name and pid, and of the controller's
    reaped children (a recycled zygote with its steps, a replaced bridge)."""
    processes = _scale_processes(binary)
    cpu: dict[str, dict[int, float]] = {}
    for name, (pid, children) in processes.items():
        try:
            cpu.setdefault(name, {})[pid] = _cpu_of(pid, children)
        except FileNotFoundError:  # exited since it was found
            continue
    controller = processes["controller"][0]
    fields = _proc_stat(controller)
    reaped = (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
    return cpu, reaped


def _scale_run(bench: Bench, row: ScaleRow, run_config: dict[str, Any]) -> None:
    job_name = f"scale{row.leaves}_{'controller' if row.executor != 'in_process' else 'inprocess'}"
    measured = row.executor != "in_process"
    before, reaped_before = _scale_cpu(bench.binary) if measured else ({}, 0.0)
    worker_before = _self_cpu()
    seconds, _run_id = bench.run_job(job_name, run_config)
    row.seconds.append(seconds)
    row.cpu.setdefault("run worker", []).append(_self_cpu() - worker_before)
    if measured:
        after, reaped_after = _scale_cpu(bench.binary)
        for name in SCALE_PROCESSES[:3]:
            then, now = before.get(name, {}), after.get(name, {})
            used = sum(now.values()) - sum(v for pid, v in then.items() if pid in now)
            # A process that exited during the run (the zygote recycled after its forks)
            # was reaped by the controller: its CPU is in the controller's children time.
            gone = {pid: v for pid, v in then.items() if pid not in now}
            if gone and name == "zygote + steps":
                used += reaped_after - reaped_before - sum(gone.values())
            row.cpu.setdefault(name, []).append(used)
    steps = row.leaves + 1
    log(
        f"scale {row.executor} {steps} steps: {seconds:.1f}s, {steps / seconds:.1f} steps/s, "
        + ", ".join(f"{name} {values[-1]:.1f}s CPU" for name, values in row.cpu.items())
    )


def run_scale(bench: Bench, sizes: list[int], repeats: int, big_repeats: int) -> list[ScaleRow]:
    """Each size on the warm pool, then on the in_process_executor: one warm-up run of the
    101-step job, then ``repeats`` runs (``big_repeats`` for sizes over 100)."""
    import bench_jobs

    rows: list[ScaleRow] = []
    warm = ("--warm-pool", "--warm-preload", bench_jobs.__file__)
    # All leaves are published at once: the last ones wait in the queue for as long as the
    # run takes, which must not trip the executor's start watchdog (30 min by default).
    config = {"poll_interval_seconds": 0.1, "step_start_timeout_seconds": 4 * 3600}
    controller_config = {"execution": {"config": config}}
    with bench.controller("scale", warm):
        missing = set(SCALE_PROCESSES) - {"run worker"} - _scale_processes(bench.binary).keys()
        if missing:
            raise RuntimeError(f"scale: no {', '.join(sorted(missing))} process found")
        bench.run_job("scale100_controller", controller_config)  # warm-up
        for leaves in sizes:
            row = ScaleRow(leaves, "warm pool")
            for _ in range(repeats if leaves <= 100 else big_repeats):
                _scale_run(bench, row, controller_config)
            rows.append(row)
    bench.run_job("scale100_inprocess", {})  # warm-up
    for leaves in sizes:
        row = ScaleRow(leaves, "in_process")
        for _ in range(repeats if leaves <= 100 else big_repeats):
            _scale_run(bench, row, {})
        rows.append(row)
    return rows


def bridge_check_cost(finished: tuple[int, ...] = (1, 1000), calls: int = 20) -> dict[int, dict]:
    """Milliseconds per bridge check (median of ``calls``) on a run of the 1,000-leaf job
    whose event log holds, per finished step, the events a controller step writes that these
    checks filter on (start, an engine event, success): a step-state check of the last
    finished step, and a verdict check that finds its verdict already written."""
    import bench_jobs
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.events import DagsterEvent, EngineEventData
    from dagster._core.execution.plan.objects import StepSuccessData

    from dagster_taskiq_controller.bridge import Bridge

    instance = DagsterInstance.get()
    job = bench_jobs.scale_job(1000, "controller")
    run = instance.create_run_for_job(job_def=job)
    bridge = Bridge()
    bridge._instance = instance
    verdict = {
        "run_id": run.run_id,
        "step_key": "source",
        "attempt": 0,
        "task_id": "bench",
        "verdict": "bench verdict",
    }
    bridge.report_verdict(verdict)

    def write(step_key: str) -> None:
        for event_type, data in (
            (DagsterEventType.STEP_START, None),
            (DagsterEventType.STEP_SUCCESS, StepSuccessData(1.0)),
        ):
            instance.report_dagster_event(
                DagsterEvent(
                    event_type.value,
                    job_name=run.job_name,
                    step_key=step_key,
                    event_specific_data=data,
                ),
                run_id=run.run_id,
            )
        instance.report_engine_event("bench", run, EngineEventData(), step_key=step_key)

    def median_ms(call: Callable[[], Any]) -> float:
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    costs: dict[int, dict] = {}
    written = 0
    try:
        for count in finished:
            while written < count:
                write(f"leaf_{written}")
                written += 1
            last = f"leaf_{count - 1}"
            params = {"run_id": run.run_id, "step_key": last, "attempt": 0}
            costs[count] = {
                "step_state": median_ms(lambda: bridge.step_state(params)),  # noqa: B023
                "report_verdict": median_ms(lambda: bridge.report_verdict(verdict)),
            }
            log(f"bridge checks with {count} finished steps: {costs[count]}")
    finally:
        bridge._instance = None
    return costs


def scale_report(rows: list[ScaleRow], costs: dict[int, dict]) -> str:
    lines = [
        "",
        f"## Scale: one source and N trivial leaves, SQLite ({os.cpu_count()} CPUs)",
        "",
        "Wall seconds as median (min to max) of the runs; steps/s from the median; CPU seconds "
        "per step (median run) of each process: controller, bridge, zygote with its forked "
        "steps, run worker (the in_process_executor runs everything in the run worker).",
        "",
        "| steps | executor | runs | wall s | steps/s | "
        + " | ".join(f"CPU/step {name}" for name in SCALE_PROCESSES)
        + " | CPU/step total |",
        "|---|---|---|---|---|" + "---|" * (len(SCALE_PROCESSES) + 1),
    ]
    for row in rows:
        steps = row.leaves + 1
        median = statistics.median(row.seconds)
        cells = []
        total = 0.0
        for name in SCALE_PROCESSES:
            values = row.cpu.get(name)
            if values:
                per_step = statistics.median(values) / steps
                total += per_step
                cells.append(f"{per_step:.4f}")
            else:
                cells.append("-")
        lines.append(
            f"| {steps} | {row.executor} | {len(row.seconds)} | {median:.2f} "
            f"({min(row.seconds):.2f} to {max(row.seconds):.2f}) | {steps / median:.1f} | "
            + " | ".join(cells)
            + f" | {total:.4f} |"
        )
    if costs:
        lines += [
            "",
            "The bridge's cost per check (ms, median of 20) as the run's finished steps grow:",
            "",
            "| finished steps | step_state | report_verdict (already written) |",
            "|---|---|---|",
        ]
        for count, cost in costs.items():
            lines.append(f"| {count} | {cost['step_state']:.2f} | {cost['report_verdict']:.2f} |")
    return "\n".join(lines) + "\n"


def bench_jobs_scale_leaves() -> tuple[int, ...]:
    import bench_jobs

    return bench_jobs.SCALE_LEAVES


def main() -> int:
    # Before anything imports bench_jobs (the parser's choices do): the taskiq variant's broker
    # takes its queue name when taskiq_app is imported.
    os.environ["BENCH_TASKIQ_QUEUE"] = f"bench-taskiq-{uuid.uuid4().hex[:8]}"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--binary",
        type=Path,
        default=os.environ.get(
            "DAGSTER_TASKIQ_CONTROLLER_BINARY",
            REPO_ROOT / "target" / "release" / "dagster-taskiq-controller",
        ),
        help="the controller (default: $DAGSTER_TASKIQ_CONTROLLER_BINARY, else the release build)",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "target" / "bench-e2e.md")
    parser.add_argument(
        "--only",
        action="append",
        choices=VARIANTS,
        help="measure only these (repeatable); default: all",
    )
    parser.add_argument(
        "--controller-concurrency",
        type=int,
        default=MAX_CONCURRENT,
        help="the controller's --max-concurrent (steps running at once)",
    )
    parser.add_argument(
        "--warm-poll",
        type=float,
        default=0.1,
        help="the executor's poll_interval_seconds in the warm variant (default: 0.1, the "
        "executor's default)",
    )
    parser.add_argument(
        "--scale-leaves",
        type=int,
        action="append",
        choices=bench_jobs_scale_leaves(),
        help="scale: the fan-outs measured (repeatable); default: all",
    )
    parser.add_argument(
        "--scale-big-repeats",
        type=int,
        default=1,
        help="scale: runs of each fan-out over 100 leaves (each takes minutes)",
    )
    args = parser.parse_args()
    only = set(args.only or VARIANTS)

    from dagster_taskiq_controller_testing.stack import MotoServer, aws_env

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp, MotoServer() as moto:
        workdir = Path(tmp)
        home = workdir / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        os.environ.update(aws_env(moto.url))
        os.environ["DAGSTER_HOME"] = str(home)
        # Step processes, the zygote, the forkserver and the taskiq worker import the bench jobs.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH", "")) if p
        )
        os.environ["BENCH_TASKIQ_START_LOG"] = str(workdir / "taskiq-starts.log")
        bench = Bench(args.repeats, args.binary, workdir, args.controller_concurrency)
        import bench_jobs

        warm = ("--warm-pool", "--warm-preload", bench_jobs.__file__)
        if "cold" in only:
            bench.run_controller("cold", "controller, cold", (), poll=0.1)
        if "warm" in only:
            bench.run_controller("warm", "controller, warm pool", warm, poll=args.warm_poll)
        if "warm_poll1" in only:
            bench.run_controller("warm_poll1", "warm pool, executor poll 1 s", warm, poll=1.0)
        if "spawn" in only:
            bench.run_multiprocess("spawn", "multiprocess (spawn)", {"spawn": {}})
        if "forkserver" in only:
            bench.run_multiprocess(
                "forkserver",
                "multiprocess (forkserver + preload)",
                {"forkserver": {"preload_modules": ["dagster", "bench_jobs"]}},
            )
        if "taskiq" in only:
            bench.run_taskiq()
        if "in_process" in only:
            bench.run_in_process()
        if only & {"cold_pg", "warm_pg", "forkserver_pg"}:
            run_on_postgres(bench, only, warm, workdir)
        report = bench.report() if bench.results else ""
        if "scale" in only:
            leaves = sorted(args.scale_leaves or bench_jobs.SCALE_LEAVES)
            rows = run_scale(bench, leaves, args.repeats, args.scale_big_repeats)
            report += scale_report(rows, bridge_check_cost())
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
