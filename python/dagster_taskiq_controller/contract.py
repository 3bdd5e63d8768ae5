"""The wire contract between the Dagster executor and the controller (docs/protocol.md).

Everything here is plain data: the executor uses :func:`build_step_message` to publish a step,
the bridge uses the verdict metadata keys, and the tests use :func:`decode_step_message`, a
reference decoder of the rules in docs/protocol.md ("Validation") that the Rust controller
implements too. The JSON vectors in ``tests/vectors`` are checked against both.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster._grpc.types import ExecuteStepArgs

# --- message shape -------------------------------------------------------------------------

TASK_NAME = "execute_plan"
"""The TaskIQ task name every step message carries (the one dagster-taskiq registers)."""

KWARG_EXECUTE_STEP_ARGS = "execute_step_args_packed"
KWARG_EXECUTABLE_DICT = "executable_dict"

TASKIQ_LABEL_TYPE_STR = 3
"""TaskIQ's ``LabelType.STR``; every label we send is a string."""

MAX_BODY_BYTES = 1024 * 1024
"""SQS's body limit (1 MiB); a larger body is poison (``too_large``)."""

# --- labels ----------------------------------------------------------------------------------

LABEL_RUN_ID = "dagster_run_id"
LABEL_STEP_KEY = "dagster_step_key"
LABEL_ATTEMPT = "dagster_attempt"
LABEL_JOB_NAME = "dagster_job_name"
LABEL_LAUNCHER = "dagster_launcher"
LABEL_PRIORITY = "dagster_priority"
LABEL_TIMEOUT = "dagster_timeout"
LABEL_TAGS = "dagster_tags"

ALL_LABELS: tuple[str, ...] = (
    LABEL_RUN_ID,
    LABEL_STEP_KEY,
    LABEL_ATTEMPT,
    LABEL_JOB_NAME,
    LABEL_LAUNCHER,
    LABEL_PRIORITY,
    LABEL_TIMEOUT,
    LABEL_TAGS,
)

LABEL_SENT_AT = "dagster_sent_at"
"""When the executor sent the message: seconds since the Unix epoch, three decimals. Read by
the controller for schedule-to-start latency only (bounded there, docs/protocol.md); absent
from messages built without a send time (the test vectors)."""

LAUNCHERS: tuple[str, ...] = ("process", "ecs")
"""Values the ``dagster_launcher`` label may take besides empty (the controller's default)."""

# --- op tags that steer the launch -----------------------------------------------------------

TAG_PRIORITY = "dagster/priority"
TAG_TIMEOUT = "dagster-taskiq/timeout"
TAG_LAUNCHER = "dagster-taskiq/launcher"

# --- verdict engine events -------------------------------------------------------------------

VERDICT_METADATA_PREFIX = "dagster_taskiq_controller"
META_VERDICT = "dagster_taskiq_controller/verdict"
META_ATTEMPT = "dagster_taskiq_controller/attempt"
META_TASK_ID = "dagster_taskiq_controller/task_id"
META_EXIT = "dagster_taskiq_controller/exit"
META_STDERR_TAIL = "dagster_taskiq_controller/stderr_tail"
# Set (to the attempt's task_id) on the engine event the executor's ``terminate_step`` writes;
# the bridge pushes it to the controller, which stops that attempt at once.
META_TERMINATE = "dagster_taskiq_controller/terminate"
# Prefix of the url metadata entries of the controller's engine events: the execution's pages
# (``ecs_task``, ``cloudwatch_logs``), so the Dagster UI leads to the step's task and logs.
META_LINK_PREFIX = "dagster_taskiq_controller/link/"
LINK_KINDS = frozenset({"ecs_task", "cloudwatch_logs"})

# --- validation patterns (docs/protocol.md, "Validation") ------------------------------------

TASK_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
RUN_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
STEP_KEY_RE = re.compile(r"[A-Za-z0-9_.\[\]-]{1,255}")
JOB_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,255}")
ATTEMPT_LABEL_RE = re.compile(r"[0-9]{1,10}")
PRIORITY_LABEL_RE = re.compile(r"-?[0-9]{1,10}")
TIMEOUT_LABEL_RE = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")

# Short snake_case names of the reasons a body is poison (docs/protocol.md, "Validation"). The
# Rust decoder (src/envelope.rs, ``Poison::name``) uses the same names, in metrics and in the
# message attribute ``dagster_taskiq_error`` of the dead-lettered message.
ERR_TOO_LARGE = "too_large"
ERR_INVALID_JSON = "invalid_json"
ERR_INVALID_SHAPE = "invalid_shape"
ERR_INVALID_TASK_ID = "invalid_task_id"
ERR_WRONG_TASK_NAME = "wrong_task_name"
ERR_UNEXPECTED_ARGS = "unexpected_args"
ERR_INVALID_STEP_ARGS = "invalid_step_args"
ERR_STEP_COUNT = "step_count"
ERR_INVALID_STEP_KEY = "invalid_step_key"
ERR_INVALID_RUN_ID = "invalid_run_id"
ERR_INVALID_LABEL = "invalid_label"
ERR_LABEL_MISMATCH = "label_mismatch"

ERROR_NAMES: tuple[str, ...] = (
    ERR_TOO_LARGE,
    ERR_INVALID_JSON,
    ERR_INVALID_SHAPE,
    ERR_INVALID_TASK_ID,
    ERR_WRONG_TASK_NAME,
    ERR_UNEXPECTED_ARGS,
    ERR_INVALID_STEP_ARGS,
    ERR_STEP_COUNT,
    ERR_INVALID_STEP_KEY,
    ERR_INVALID_RUN_ID,
    ERR_INVALID_LABEL,
    ERR_LABEL_MISMATCH,
)

# Only for extended (S3) messages, which the controller resolves and this decoder does not.
ERR_INVALID_EXTENDED_PAYLOAD = "invalid_extended_payload"

# --- dagster-taskiq compatibility (docs/protocol.md, "TaskIQ compatibility") ------------------

# Message attribute of a taskiq-aio-sqs extended message: the body is an S3 pointer
# ``{"s3_bucket", "s3_key"}`` and the real body is that object.
EXTENDED_MESSAGE_ATTRIBUTE = "s3_extended_message"


class StepExecutionError(Exception):
    """The exception of the controller's error results (``exc_module`` is this module): what
    ``TaskiqResult.raise_for_error()`` raises for a step that crashed, timed out, was not run
    or was dead-lettered. Without this package imported, taskiq builds an ``Exception``
    subclass of the same name instead."""


MAX_ATTEMPT = 2**32 - 1
MAX_PRIORITY = 2**31 - 1
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0


def step_task_id(run_id: str, step_key: str, attempt: int) -> str:
    """The deterministic TaskIQ ``task_id`` of one step attempt: the idempotency key."""
    digest = hashlib.sha256(f"{run_id}/{step_key}/{attempt}".encode()).hexdigest()
    return digest[:32]


def label_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The op tags sent in the ``dagster_tags`` label: all of them, as strings. Some steer the
    launch (``ecs/*``, ``dagster-taskiq/*``, ``dagster/priority``); the controller's
    ``--tag-limit`` caps count any of them."""
    return {key: str(tags[key]) for key in sorted(tags)}


def _priority_label(tags: Mapping[str, str]) -> str:
    raw = str(tags.get(TAG_PRIORITY, "0")).strip() or "0"
    if not PRIORITY_LABEL_RE.fullmatch(raw):
        raise ValueError(f"op tag {TAG_PRIORITY}={raw!r} is not an integer")
    return str(int(raw))


def _timeout_label(tags: Mapping[str, str]) -> str:
    raw = str(tags.get(TAG_TIMEOUT, "")).strip()
    if not raw:
        return ""
    if not TIMEOUT_LABEL_RE.fullmatch(raw) or float(raw) <= 0:
        raise ValueError(f"op tag {TAG_TIMEOUT}={raw!r} is not a positive number of seconds")
    return raw


def _launcher_label(tags: Mapping[str, str]) -> str:
    raw = str(tags.get(TAG_LAUNCHER, "")).strip()
    if raw and raw not in LAUNCHERS:
        raise ValueError(f"op tag {TAG_LAUNCHER}={raw!r} is not one of {', '.join(LAUNCHERS)}")
    return raw


def step_attempt(execute_step_args: ExecuteStepArgs, step_key: str) -> int:
    """The attempt number of ``step_key`` in these args (0 when no retry happened yet)."""
    known_state = execute_step_args.known_state
    if known_state is None:
        return 0
    return int(known_state.previous_retry_attempts.get(step_key, 0))


def build_step_message(
    execute_step_args: ExecuteStepArgs,
    executable_dict: Mapping[str, Any],
    job_name: str,
    step_tags: Mapping[str, str],
    sent_at: float | None = None,
) -> dict[str, Any]:
    """The TaskIQ message (the SQS body is its ``json.dumps``) for the one step in the args.

    ``sent_at`` (``time.time()`` of the send) becomes the ``dagster_sent_at`` label.

    Raises ``ValueError`` when the args do not name exactly one step or when a steering tag has
    a value the controller would reject.
    """
    from dagster._serdes import pack_value

    step_keys = list(execute_step_args.step_keys_to_execute or [])
    if len(step_keys) != 1:
        raise ValueError(f"a step message carries exactly one step, got {step_keys!r}")
    step_key = step_keys[0]
    run_id = execute_step_args.run_id
    attempt = step_attempt(execute_step_args, step_key)

    labels = {
        LABEL_RUN_ID: run_id,
        LABEL_STEP_KEY: step_key,
        LABEL_ATTEMPT: str(attempt),
        LABEL_JOB_NAME: job_name,
        LABEL_LAUNCHER: _launcher_label(step_tags),
        LABEL_PRIORITY: _priority_label(step_tags),
        LABEL_TIMEOUT: _timeout_label(step_tags),
        LABEL_TAGS: json.dumps(label_tags(step_tags), sort_keys=True),
    }
    if sent_at is not None:
        labels[LABEL_SENT_AT] = f"{sent_at:.3f}"
    return {
        "task_id": step_task_id(run_id, step_key, attempt),
        "task_name": TASK_NAME,
        "labels": labels,
        "labels_types": {name: TASKIQ_LABEL_TYPE_STR for name in labels},
        "args": [],
        "kwargs": {
            KWARG_EXECUTE_STEP_ARGS: pack_value(execute_step_args),
            KWARG_EXECUTABLE_DICT: dict(executable_dict),
        },
    }


def encode_body(message: Mapping[str, Any]) -> str:
    """The SQS body of a message: compact JSON, as taskiq-aio-sqs sends it (``json.dumps``)."""
    return json.dumps(message, separators=(",", ":"))


# --- reference decoder -----------------------------------------------------------------------


class PoisonMessage(ValueError):
    """A body that breaks the contract. ``error`` is one of :data:`ERROR_NAMES`."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail


@dataclass(frozen=True)
class StepRequest:
    """What the controller needs from a step message, without touching Dagster's serdes."""

    task_id: str
    run_id: str
    step_key: str
    attempt: int
    job_name: str | None
    launcher: str | None
    priority: int
    timeout_seconds: float | None
    tags: dict[str, str] = field(default_factory=dict)
    instance_ref: dict[str, Any] | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(condition: bool, detail: str) -> None:
    if not condition:
        raise PoisonMessage(ERR_INVALID_SHAPE, detail)


def _step_args(condition: bool, detail: str) -> None:
    if not condition:
        raise PoisonMessage(ERR_INVALID_STEP_ARGS, detail)


def _label_value(labels: Mapping[str, str], name: str) -> str | None:
    """A label's value; an empty string counts as absent."""
    return labels.get(name) or None


def _agree(labels: Mapping[str, str], name: str, args_value: str) -> str:
    label = _label_value(labels, name)
    if label is not None and label != args_value:
        raise PoisonMessage(ERR_LABEL_MISMATCH, f"label {name}={label!r}, args {args_value!r}")
    return args_value


def decode_step_message(body: str | bytes) -> StepRequest:
    """Validate a body by the rules of docs/protocol.md and extract the step request.

    Raises :class:`PoisonMessage` with the documented error name. The checks run in the same
    order as the Rust decoder's, though every vector breaks only one rule.
    """
    raw = body.encode() if isinstance(body, str) else body
    if len(raw) > MAX_BODY_BYTES:
        raise PoisonMessage(ERR_TOO_LARGE, f"body of {len(raw)} bytes")
    try:
        msg = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PoisonMessage(ERR_INVALID_JSON, str(exc)) from None

    # The TaskIQ envelope: wrong JSON types and missing required fields are invalid_shape.
    _shape(isinstance(msg, dict), "the body is not a JSON object")
    _shape(isinstance(msg.get("task_id"), str), "task_id is missing or not a string")
    _shape(isinstance(msg.get("task_name"), str), "task_name is missing or not a string")
    labels = msg.get("labels", {})
    _shape(isinstance(labels, dict), "labels is not an object")
    _shape(all(isinstance(v, str) for v in labels.values()), "a label value is not a string")
    labels_types = msg.get("labels_types", {})
    _shape(isinstance(labels_types, dict), "labels_types is not an object")
    _shape(all(_is_int(v) for v in labels_types.values()), "a labels_types value is not an int")
    args = msg.get("args", [])
    _shape(isinstance(args, list), "args is not an array")
    kwargs = msg.get("kwargs")
    _shape(isinstance(kwargs, dict), "kwargs is missing or not an object")
    _shape(KWARG_EXECUTE_STEP_ARGS in kwargs, f"kwargs.{KWARG_EXECUTE_STEP_ARGS} is missing")
    _shape(KWARG_EXECUTABLE_DICT in kwargs, f"kwargs.{KWARG_EXECUTABLE_DICT} is missing")

    task_id = msg["task_id"]
    if not TASK_ID_RE.fullmatch(task_id):
        raise PoisonMessage(ERR_INVALID_TASK_ID, f"task_id {task_id!r}")
    if msg["task_name"] != TASK_NAME:
        raise PoisonMessage(ERR_WRONG_TASK_NAME, f"task_name {msg['task_name']!r}")
    if args:
        raise PoisonMessage(ERR_UNEXPECTED_ARGS, f"{len(args)} positional args")

    # The packed ExecuteStepArgs: wrong JSON types and missing fields are invalid_step_args.
    packed = kwargs[KWARG_EXECUTE_STEP_ARGS]
    _step_args(isinstance(packed, dict), "execute_step_args_packed is not an object")
    args_run_id = packed.get("pipeline_run_id")
    _step_args(isinstance(args_run_id, str), "pipeline_run_id is missing or not a string")
    step_keys = packed.get("step_keys_to_execute")
    _step_args(
        isinstance(step_keys, list) and all(isinstance(k, str) for k in step_keys),
        "step_keys_to_execute is missing or not an array of strings",
    )
    instance_ref = packed.get("instance_ref")
    known_state = packed.get("known_state")
    _step_args(known_state is None or isinstance(known_state, dict), "known_state")
    retries = (known_state or {}).get("previous_retry_attempts", {})
    _step_args(isinstance(retries, dict), "previous_retry_attempts is not an object")
    _step_args(
        all(_is_int(v) and 0 <= v <= MAX_ATTEMPT for v in retries.values()),
        "previous_retry_attempts holds a value that is not an attempt number",
    )
    if len(step_keys) != 1:
        raise PoisonMessage(ERR_STEP_COUNT, f"{len(step_keys)} step keys")
    args_step_key = step_keys[0]
    args_attempt = int(retries.get(args_step_key, 0))
    _step_args(
        instance_ref is None or isinstance(instance_ref, dict),
        "instance_ref must be an object or null",
    )

    # Labels agree with the args, then the values are checked.
    run_id = _agree(labels, LABEL_RUN_ID, args_run_id)
    step_key = _agree(labels, LABEL_STEP_KEY, args_step_key)
    attempt = args_attempt
    attempt_label = _label_value(labels, LABEL_ATTEMPT)
    if attempt_label is not None:
        if not ATTEMPT_LABEL_RE.fullmatch(attempt_label) or int(attempt_label) > MAX_ATTEMPT:
            raise PoisonMessage(ERR_INVALID_LABEL, f"attempt label {attempt_label!r}")
        if int(attempt_label) != args_attempt:
            raise PoisonMessage(
                ERR_LABEL_MISMATCH, f"attempt label {attempt_label!r}, args {args_attempt}"
            )
    if not RUN_ID_RE.fullmatch(run_id):
        raise PoisonMessage(ERR_INVALID_RUN_ID, f"run id {run_id!r}")
    if not STEP_KEY_RE.fullmatch(step_key):
        raise PoisonMessage(ERR_INVALID_STEP_KEY, f"step key {step_key!r}")

    launcher = _label_value(labels, LABEL_LAUNCHER)
    if launcher is not None and launcher not in LAUNCHERS:
        raise PoisonMessage(ERR_INVALID_LABEL, f"launcher label {launcher!r}")
    priority_raw = _label_value(labels, LABEL_PRIORITY) or "0"
    if not PRIORITY_LABEL_RE.fullmatch(priority_raw) or abs(int(priority_raw)) > MAX_PRIORITY:
        raise PoisonMessage(ERR_INVALID_LABEL, f"priority label {priority_raw!r}")
    timeout_raw = _label_value(labels, LABEL_TIMEOUT)
    timeout: float | None = None
    if timeout_raw is not None:
        if not TIMEOUT_LABEL_RE.fullmatch(timeout_raw):
            raise PoisonMessage(ERR_INVALID_LABEL, f"timeout label {timeout_raw!r}")
        timeout = float(timeout_raw)
        if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_SECONDS):
            raise PoisonMessage(ERR_INVALID_LABEL, f"timeout label {timeout_raw!r}")
    tags_raw = _label_value(labels, LABEL_TAGS) or "{}"
    try:
        tags = json.loads(tags_raw, parse_constant=_reject_constant)
    except ValueError:
        raise PoisonMessage(ERR_INVALID_LABEL, "tags label is not JSON") from None
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise PoisonMessage(ERR_INVALID_LABEL, "tags label is not an object of strings")
    job_name = _label_value(labels, LABEL_JOB_NAME)
    if job_name is not None and not JOB_NAME_RE.fullmatch(job_name):
        raise PoisonMessage(ERR_INVALID_LABEL, f"job name label {job_name!r}")

    return StepRequest(
        task_id=task_id,
        run_id=run_id,
        step_key=step_key,
        attempt=attempt,
        job_name=job_name,
        launcher=launcher,
        priority=int(priority_raw),
        timeout_seconds=timeout,
        tags=tags,
        instance_ref=instance_ref,
    )


def verdict_metadata(
    *, verdict: str, attempt: int, task_id: str, exit: str, stderr_tail: str
) -> dict[str, str | int]:
    """The metadata of a verdict engine event (values as raw Dagster metadata)."""
    return {
        META_VERDICT: verdict,
        META_ATTEMPT: int(attempt),
        META_TASK_ID: task_id,
        META_EXIT: exit,
        META_STDERR_TAIL: stderr_tail,
    }


def terminate_metadata(*, task_id: str, attempt: int) -> dict[str, str | int]:
    """The metadata of the engine event that asks the controller to stop a step attempt."""
    return {META_TERMINATE: task_id, META_ATTEMPT: int(attempt)}


def link_metadata(links: Mapping[str, str]) -> dict[str, Any]:
    """The url metadata entries of an engine event for ``{kind: url}`` links; raises
    ValueError for an unknown kind or a URL that is not http(s)."""
    from dagster import MetadataValue

    entries: dict[str, Any] = {}
    for kind, url in links.items():
        if kind not in LINK_KINDS:
            raise ValueError(f"unknown link kind {kind!r} (known: {sorted(LINK_KINDS)})")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ValueError(f"link {kind!r} is not an http(s) URL")
        entries[META_LINK_PREFIX + kind] = MetadataValue.url(url)
    return entries
