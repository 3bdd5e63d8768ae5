"""The step hop of the end-to-end benchmark, stage by stage (bench/e2e.py).

The hop is what isolation costs between two steps: an upstream step's STEP_SUCCESS written →
the next step's STEP_START written (the later of its upstreams' successes, from the run's
execution plan). For the controller it is cut into stages from timestamps that already exist:

- the run worker (this process: the benchmark runs the job's executor in-process) notices the
  success and calls ``SqsStepHandler.launch_step``, which builds the message and sends it
  (``PublishProbe`` records when the call began and when SendMessage returned);
- SQS and the controller's receive, the bridge's step check and the wait for a run slot,
  admission and the durable claim, the fork: the controller's step history
  (``/api/v1/steps``: received, admitted, launching, running);
- the child's set-up: its Dagster events (STEP_WORKER_STARTED, RESOURCE_INIT_STARTED,
  RESOURCE_INIT_SUCCESS, LOGS_CAPTURED, STEP_START; the ones without a step key are the step
  process's by their pid) and the op's own start time (``started`` metadata of its output,
  bench_jobs.py).

The step start latency (received → op code) is broken down over the same stages. Also the mean
duration of each bridge call and SQS request over the timed runs (the controller's metrics).
Every timestamp is the wall clock of one machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# The marks of a step's way from its upstream's success to its op code, in order, with what
# the stage that ends at each mark is made of. A stage runs from the previous mark present.
MARKS = (
    ("success", "upstream STEP_SUCCESS written"),
    ("publish", "run worker notices it (poll, event-log read) and calls launch_step"),
    ("sent", "launch_step: message built, SendMessage returned"),
    ("received", "SQS → controller receive"),
    ("admitted", "bridge step check (reconcile), wait for a run slot"),
    ("launching", "admission, launch rate, durable claim"),
    ("running", "fork (zygote spawn, go byte)"),
    ("STEP_WORKER_STARTED", "child: env, instance, run read, STEP_WORKER_STARTED"),
    ("RESOURCE_INIT_STARTED", "child: verify step, job load, execution plan"),
    ("RESOURCE_INIT_SUCCESS", "child: resources"),
    ("LOGS_CAPTURED", "child: compute-log capture"),
    ("STEP_START", "child: STEP_START"),
    ("op", "op code starts (inputs loaded)"),
)
# The hop ends at STEP_START; the step start runs from "received" to "op".
HOP_MARKS = MARKS[: [m for m, _ in MARKS].index("STEP_START") + 1]
START_MARKS = MARKS[[m for m, _ in MARKS].index("received") :]
CHILD_EVENTS = (
    "STEP_WORKER_STARTED",
    "RESOURCE_INIT_STARTED",
    "RESOURCE_INIT_SUCCESS",
    "LOGS_CAPTURED",
    "STEP_START",
    "STEP_SUCCESS",
)


class PublishProbe:
    """Records when the run worker's ``SqsStepHandler.launch_step`` began and ended for each
    (run id, step key), by wrapping it in this process. Only the first attempt is kept."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._original: Callable[..., Iterator[Any]] | None = None

    def install(self) -> None:
        from dagster_taskiq_controller.executor import SqsStepHandler

        if self._original is not None:
            return
        original = self._original = SqsStepHandler.launch_step
        original_sqs = SqsStepHandler._sqs
        probe = self
        sent = threading.local()

        class TimedClient:
            """The handler's SQS client, noting when each send returned."""

            def __init__(self, client: Any) -> None:
                self._client = client

            def __getattr__(self, name: str) -> Any:
                attr = getattr(self._client, name)
                if not name.startswith("send_message"):
                    return attr

                def timed(*args: Any, **kwargs: Any) -> Any:
                    result = attr(*args, **kwargs)
                    sent.at = time.time()
                    return result

                return timed

        def sqs(handler: Any) -> Any:
            return TimedClient(original_sqs(handler))

        def launch_step(handler: Any, context: Any) -> Iterator[Any]:
            began = time.time()
            sent.at = None
            # The engine event is written while the generator runs: drain it inside the probe.
            events = list(original(handler, context))
            key = (context.execute_step_args.run_id, handler._step_key(context))
            with probe._lock:
                probe.calls.setdefault(key, (began, sent.at or time.time()))
            yield from events

        SqsStepHandler._sqs = sqs  # type: ignore[method-assign]
        SqsStepHandler.launch_step = launch_step  # type: ignore[method-assign]


@dataclass
class Breakdown:
    """Hops and step starts of one variant, with their stages, over every timed run."""

    hops: list[float] = field(default_factory=list)
    # Stage name -> seconds, in the order first seen.
    hop_stages: dict[str, list[float]] = field(default_factory=dict)
    start_stages: dict[str, list[float]] = field(default_factory=dict)
    # Mean seconds per call over the timed runs: bridge method / SQS operation -> (sum, count).
    calls: dict[str, list[float]] = field(default_factory=dict)


def merged(parts: list[Breakdown], calls: Breakdown | None = None) -> Breakdown:
    """One breakdown of the hops and stages of ``parts`` (in order), with the calls of
    ``calls``."""
    total = Breakdown(calls=dict(calls.calls) if calls is not None else {})
    for part in parts:
        total.hops += part.hops
        for into, stages in (
            (total.hop_stages, part.hop_stages),
            (total.start_stages, part.start_stages),
        ):
            for stage, values in stages.items():
                into.setdefault(stage, []).extend(values)
    return total


def upstreams(instance: Any, run_id: str) -> dict[str, set[str]]:
    """Step key -> the step keys whose outputs it reads, from the run's execution plan."""
    run = instance.get_run_by_id(run_id)
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    return {
        step.key: {h.step_key for i in step.inputs for h in i.upstream_output_handles}
        for step in plan.steps
    }


def step_events(instance: Any, run_id: str) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per step key: the first timestamp of each of ``CHILD_EVENTS``; and the op's own start
    (the ``started`` metadata of its output)."""
    from dagster import DagsterEventType

    wanted = {DagsterEventType(name) for name in CHILD_EVENTS} | {DagsterEventType.STEP_OUTPUT}
    marks: dict[str, dict[str, float]] = {}
    ops: dict[str, float] = {}
    records = instance.get_records_for_run(run_id, of_type=wanted, limit=10_000).records
    # Resource and log-capture events of a step process carry no step key: its pid names it.
    by_pid = {
        r.event_log_entry.dagster_event.pid: r.event_log_entry.step_key
        for r in records
        if r.event_log_entry.dagster_event is not None
        and r.event_log_entry.dagster_event.event_type == DagsterEventType.STEP_WORKER_STARTED
    }
    for record in records:
        entry = record.event_log_entry
        event = entry.dagster_event
        step_key = entry.step_key or (event.pid and by_pid.get(event.pid) if event else None)
        if event is None or not step_key:
            continue
        if event.event_type == DagsterEventType.STEP_OUTPUT:
            started = event.event_specific_data.metadata.get("started")
            if started is not None:
                ops.setdefault(step_key, float(started.value))
            continue
        marks.setdefault(step_key, {}).setdefault(event.event_type_value, entry.timestamp)
    return marks, ops


def observe_run(
    breakdown: Breakdown,
    instance: Any,
    run_id: str,
    history: dict[str, dict[str, float]] | None = None,
    probe: PublishProbe | None = None,
) -> None:
    """Adds the hops of one run (and, given the controller's step histories and the publish
    probe, their stages and the step starts' stages) to ``breakdown``."""
    marks, ops = step_events(instance, run_id)
    for step, ups in upstreams(instance, run_id).items():
        step_marks = dict(marks.get(step, {}))
        if step in ops:
            step_marks["op"] = ops[step]
        if history is not None:
            step_marks.update(history.get(step, {}))
        if probe is not None and (run_id, step) in probe.calls:
            step_marks["publish"], step_marks["sent"] = probe.calls[(run_id, step)]
        if history is not None:
            _add_stages(breakdown.start_stages, START_MARKS, step_marks)
        successes = [marks.get(u, {}).get("STEP_SUCCESS") for u in ups]
        if not ups or None in successes or "STEP_START" not in step_marks:
            continue
        step_marks["success"] = max(s for s in successes if s is not None)
        breakdown.hops.append(step_marks["STEP_START"] - step_marks["success"])
        if history is not None:
            _add_stages(breakdown.hop_stages, HOP_MARKS, step_marks)


def _add_stages(
    into: dict[str, list[float]], chain: tuple[tuple[str, str], ...], marks: dict[str, float]
) -> None:
    """One stage per mark of ``chain`` present in ``marks``, from the previous one present."""
    previous = None
    for mark, what in chain:
        if mark not in marks:
            continue
        if previous is not None:
            into.setdefault(f"{what} (→ {mark})", []).append(marks[mark] - marks[previous])
        previous = mark


def call_totals(metrics_text: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of every bridge call method and SQS operation the controller
    has timed so far, from its /metrics exposition."""
    import re

    totals: dict[str, list[float]] = {}
    pattern = (
        r"^dagster_taskiq_(bridge_latency|sqs_request_duration)_seconds_(sum|count)"
        r'\{(?:method|operation)="([^"]+)"\} (\S+)$'
    )
    for family, kind, name, value in re.findall(pattern, metrics_text, re.MULTILINE):
        key = f"{'bridge' if family == 'bridge_latency' else 'SQS'} {name}"
        pair = totals.setdefault(key, [0.0, 0.0])
        pair[0 if kind == "sum" else 1] += float(value)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def add_calls(
    breakdown: Breakdown,
    before: dict[str, tuple[float, float]],
    after: dict[str, tuple[float, float]],
) -> None:
    for name, (total, count) in after.items():
        prior = before.get(name, (0.0, 0.0))
        pair = breakdown.calls.setdefault(name, [0.0, 0.0])
        pair[0] += total - prior[0]
        pair[1] += count - prior[1]


def report_lines(
    label: str, breakdown: Breakdown, percentile: Callable[[list[float], float], float]
) -> list[str]:
    """The hop's and the step start's stages of one variant, as Markdown."""
    lines: list[str] = []

    def table(title: str, stages: dict[str, list[float]]) -> None:
        nonlocal lines
        lines += ["", title, "", "| stage | n | p50 | p99 | mean |", "|---|---|---|---|---|"]
        for name, values in stages.items():
            lines.append(
                f"| {name} | {len(values)} | {percentile(values, 0.5):.3f} | "
                f"{percentile(values, 0.99):.3f} | {sum(values) / len(values):.3f} |"
            )

    if breakdown.hop_stages:
        table(f"Where a hop goes, {label} (seconds):", breakdown.hop_stages)
    if breakdown.start_stages:
        table(
            f"Where a step start goes, {label} (received → op code, seconds):",
            breakdown.start_stages,
        )
    if breakdown.calls:
        lines += [
            "",
            f"Calls of the controller during the timed runs, {label}:",
            "",
            "| call | n | mean seconds |",
            "|---|---|---|",
        ]
        for name, (total, count) in sorted(breakdown.calls.items()):
            if count:
                lines.append(f"| {name} | {count:.0f} | {total / count:.4f} |")
    return lines


def hop_table(
    rows: list[tuple[str, Breakdown]], percentile: Callable[[list[float], float], float]
) -> list[str]:
    """The hop of every variant: p50/p99 (target: p50 ≤ 0.200 s)."""
    lines = [
        "",
        "Step hop, upstream STEP_SUCCESS written → next STEP_START written, seconds, over every "
        "step with an upstream in the timed runs (target p50 ≤ 0.200):",
        "",
        "| variant | hops | p50 | p99 |",
        "|---|---|---|---|",
    ]
    for label, breakdown in rows:
        if breakdown.hops:
            lines.append(
                f"| {label} | {len(breakdown.hops)} | {percentile(breakdown.hops, 0.5):.3f} | "
                f"{percentile(breakdown.hops, 0.99):.3f} |"
            )
    return lines
