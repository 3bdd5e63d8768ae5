"""Generate the wire-contract test vectors in ``tests/vectors`` from real Dagster objects.

    python python/tests/make_vectors.py            # (re)write the vectors
    python python/tests/make_vectors.py --check    # exit 1 if the files on disk differ

The output is deterministic: fixed run ids, fixed paths inside the packed objects (an instance
at ``/opt/dagster/home``, code at ``/opt/dagster/app/jobs.py``), and step keys taken from the
real execution plans of the jobs in ``jobs.py``. Every vector is checked against the reference
decoder (``dagster_taskiq_controller.contract.decode_step_message``) before it is written.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dagster._core.code_pointer import FileCodePointer
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._core.instance.ref import InstanceRef
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value, pack_value, serialize_value

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobs

from dagster_taskiq_controller import contract

VECTORS_DIR = Path(__file__).resolve().parents[2] / "tests" / "vectors"

RUN_ID = "8a6f5b1e-3c2d-4e7f-9a0b-1c2d3e4f5a6b"
RUN_ID_2 = "0d9c8b7a-6f5e-4d3c-8b2a-19f8e7d6c5b4"
PLAIN_TASK_ID = "5f0c1c8e0a7d4e4c9b8f3b0a1e2d3c4b"  # what a uuid4().hex looks like
INSTANCE_HOME = "/opt/dagster/home"
APP_DIR = "/opt/dagster/app"
PYTHON = "/usr/local/bin/python"


def fixed_instance_ref() -> InstanceRef:
    """A genuine InstanceRef (default sqlite storages) for a home at INSTANCE_HOME."""
    with tempfile.TemporaryDirectory() as tmp:
        packed = serialize_value(InstanceRef.from_dir(tmp))
        packed = packed.replace(os.path.realpath(tmp), INSTANCE_HOME).replace(tmp, INSTANCE_HOME)
    return deserialize_value(packed, InstanceRef)


def fixed_recon_job(name: str) -> ReconstructableJob:
    pointer = FileCodePointer(f"{APP_DIR}/jobs.py", name, APP_DIR)
    return ReconstructableJob(ReconstructableRepository(pointer, executable_path=PYTHON), name)


def plan_step_keys(name: str) -> list[str]:
    """Step keys of the job's real execution plan."""
    plan = create_execution_plan(jobs.recon(name))
    return [step.key for step in plan.get_all_steps_in_topo_order()]


def step_args(
    job_name: str,
    run_id: str,
    step_key: str,
    retries: Mapping[str, int] | None = None,
    known_state: KnownExecutionState | None = None,
    with_instance_ref: bool = True,
) -> ExecuteStepArgs:
    return ExecuteStepArgs(
        job_origin=fixed_recon_job(job_name).get_python_origin(),
        run_id=run_id,
        step_keys_to_execute=[step_key],
        instance_ref=fixed_instance_ref() if with_instance_ref else None,
        retry_mode=RetryMode.DEFERRED,
        known_state=known_state or KnownExecutionState(previous_retry_attempts=dict(retries or {})),
        should_verify_step=False,
        print_serialized_events=False,
    )


def ours(job_name: str, args: ExecuteStepArgs, tags: Mapping[str, str]) -> dict[str, Any]:
    return contract.build_step_message(
        args, fixed_recon_job(job_name).to_dict(), job_name=job_name, step_tags=tags
    )


def plain(job_name: str, args: ExecuteStepArgs) -> dict[str, Any]:
    """What the dagster-taskiq executor sends: no labels, a uuid4-style task id."""
    return {
        "task_id": PLAIN_TASK_ID,
        "task_name": contract.TASK_NAME,
        "labels": {},
        "labels_types": {},
        "args": [],
        "kwargs": {
            contract.KWARG_EXECUTE_STEP_ARGS: pack_value(args),
            contract.KWARG_EXECUTABLE_DICT: fixed_recon_job(job_name).to_dict(),
        },
    }


def expect_of(
    message: Mapping[str, Any],
    *,
    run_id: str,
    step_key: str,
    attempt: int,
    job_name: str | None,
    launcher: str | None = None,
    priority: int = 0,
    timeout_seconds: float | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "task_id": message["task_id"],
        "run_id": run_id,
        "step_key": step_key,
        "attempt": attempt,
        "job_name": job_name,
        "launcher": launcher,
        "priority": priority,
        "timeout_seconds": timeout_seconds,
        "tags": dict(tags or {}),
    }


def valid_vectors() -> dict[str, dict[str, Any]]:
    vectors: dict[str, dict[str, Any]] = {}
    diamond_keys = plan_step_keys("diamond")
    assert "add_one" in diamond_keys and "emit" in diamond_keys, diamond_keys

    args = step_args("diamond", RUN_ID, "add_one")
    msg = ours("diamond", args, {})
    vectors["ours_all_labels"] = {
        "description": "our executor's message for step add_one of job diamond, attempt 0, "
        "every label present, no steering tags",
        "body": contract.encode_body(msg),
        "expect": expect_of(msg, run_id=RUN_ID, step_key="add_one", attempt=0, job_name="diamond"),
    }

    args = step_args("diamond", RUN_ID, "emit", retries={"emit": 1})
    msg = plain("diamond", args)
    vectors["plain_dagster_taskiq"] = {
        "description": "a plain dagster-taskiq message: no labels, uuid4 task id; run id, step "
        "key and attempt (1) come from the packed args",
        "body": json.dumps(msg),
        "expect": expect_of(msg, run_id=RUN_ID, step_key="emit", attempt=1, job_name=None),
    }

    msg = plain("diamond", step_args("diamond", RUN_ID, "emit"))
    msg["labels"] = {"group_id": "dagster", "delay": "0"}
    msg["labels_types"] = {"group_id": 3, "delay": 2}
    vectors["plain_dagster_taskiq_unknown_labels"] = {
        "description": "a dagster-taskiq message whose labels are all unknown to us: ignored",
        "body": json.dumps(msg),
        "expect": expect_of(msg, run_id=RUN_ID, step_key="emit", attempt=0, job_name=None),
    }

    msg = plain("diamond", step_args("diamond", RUN_ID, "double"))
    for optional in ("labels", "labels_types", "args"):
        msg.pop(optional)
    vectors["minimal_optional_fields_absent"] = {
        "description": "labels, labels_types and args are optional (default: empty)",
        "body": json.dumps(msg),
        "expect": expect_of(msg, run_id=RUN_ID, step_key="double", attempt=0, job_name=None),
    }

    (tagged_key,) = plan_step_keys("tagged")
    tags = jobs.tagged_op.tags
    msg = ours("tagged", step_args("tagged", RUN_ID_2, tagged_key), tags)
    vectors["ours_steering_tags"] = {
        "description": "our executor's message for an op with priority, timeout, launcher and "
        "ecs tags, and the tag 'team' that only tag limits count",
        "body": contract.encode_body(msg),
        "expect": expect_of(
            msg,
            run_id=RUN_ID_2,
            step_key=tagged_key,
            attempt=0,
            job_name="tagged",
            launcher="process",
            priority=5,
            timeout_seconds=30.0,
            tags=contract.label_tags(tags),
        ),
    }

    (flaky_key,) = plan_step_keys("flaky")
    msg = ours(
        "flaky",
        step_args("flaky", RUN_ID_2, flaky_key, retries={flaky_key: 2, "other": 1}),
        {"dagster/priority": "-3", "dagster-taskiq/timeout": "2.5"},
    )
    vectors["ours_retry_attempt_2"] = {
        "description": "our executor's message for the third attempt (2) of flaky_op, negative "
        "priority and a fractional timeout",
        "body": contract.encode_body(msg),
        "expect": expect_of(
            msg,
            run_id=RUN_ID_2,
            step_key=flaky_key,
            attempt=2,
            job_name="flaky",
            priority=-3,
            timeout_seconds=2.5,
            tags={"dagster-taskiq/timeout": "2.5", "dagster/priority": "-3"},
        ),
    }

    dynamic_key = "stage.process_item[item_1]"
    known = KnownExecutionState(
        previous_retry_attempts={dynamic_key: 1},
        dynamic_mappings={"stage.fan_out": {"result": ["item_1", "item_2"]}},
    )
    msg = ours(
        "diamond",
        step_args("diamond", RUN_ID, dynamic_key, known_state=known, with_instance_ref=False),
        {"dagster-taskiq/launcher": "ecs", "ecs/task_overrides": '{"cpu": "1024"}'},
    )
    vectors["ours_dynamic_step_key"] = {
        "description": "a graph-nested dynamic mapping step key, attempt 1, null instance_ref, "
        "ecs launcher",
        "body": contract.encode_body(msg),
        "expect": expect_of(
            msg,
            run_id=RUN_ID,
            step_key=dynamic_key,
            attempt=1,
            job_name="diamond",
            launcher="ecs",
            tags={"dagster-taskiq/launcher": "ecs", "ecs/task_overrides": '{"cpu": "1024"}'},
        ),
    }
    return vectors


Mutation = Callable[[dict[str, Any]], None]


def _packed(msg: dict[str, Any]) -> dict[str, Any]:
    return msg["kwargs"][contract.KWARG_EXECUTE_STEP_ARGS]


def _set_step_key(msg: dict[str, Any], key: str) -> None:
    _packed(msg)["step_keys_to_execute"] = [key]
    msg["labels"][contract.LABEL_STEP_KEY] = key


def _set_run_id(msg: dict[str, Any], run_id: str) -> None:
    _packed(msg)["pipeline_run_id"] = run_id
    msg["labels"][contract.LABEL_RUN_ID] = run_id


def _label(name: str, value: Any) -> Mutation:
    def mutate(msg: dict[str, Any]) -> None:
        msg["labels"][name] = value

    return mutate


def invalid_vectors(base: dict[str, Any], base_plain: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each breaks exactly one rule of docs/protocol.md."""
    vectors: dict[str, dict[str, Any]] = {}

    def case(
        name: str, error: str, description: str, source: dict[str, Any] | str, mutate: Mutation
    ) -> None:
        if isinstance(source, str):
            body = source
        else:
            msg = copy.deepcopy(source)
            mutate(msg)
            body = json.dumps(msg)
        vectors[name] = {"description": description, "body": body, "error": error}

    def keep(msg: dict[str, Any]) -> None:
        pass

    retries = "previous_retry_attempts"
    exe = contract.KWARG_EXECUTABLE_DICT
    packed_kw = contract.KWARG_EXECUTE_STEP_ARGS

    # fmt: off
    # not JSON at all
    case("not_json", "invalid_json", "body is not JSON", '{"task_id": "abc", ', keep)
    case("json_nan", "invalid_json", "body uses NaN, which JSON does not have",
         '{"task_id": NaN}', keep)
    # the TaskIQ envelope
    case("json_array", "invalid_shape", "body is a JSON array", "[1, 2, 3]", keep)
    case("json_string", "invalid_shape", "body is a JSON string", '"execute_plan"', keep)
    case("missing_task_id", "invalid_shape", "no task_id", base, lambda m: m.pop("task_id"))
    case("task_id_number", "invalid_shape", "task_id is a number", base,
         lambda m: m.update(task_id=12345))
    case("missing_task_name", "invalid_shape", "no task_name", base,
         lambda m: m.pop("task_name"))
    case("labels_not_object", "invalid_shape", "labels is an array", base,
         lambda m: m.update(labels=[]))
    case("label_not_string", "invalid_shape", "a label value is a number, not a string", base,
         _label(contract.LABEL_ATTEMPT, 0))
    case("labels_types_not_ints", "invalid_shape", "a labels_types value is a string", base,
         lambda m: m["labels_types"].update(dagster_attempt="STR"))
    case("args_not_array", "invalid_shape", "args is an object", base,
         lambda m: m.update(args={}))
    case("missing_kwargs", "invalid_shape", "no kwargs", base, lambda m: m.pop("kwargs"))
    case("kwargs_missing_packed_args", "invalid_shape", "kwargs without "
         "execute_step_args_packed", base, lambda m: m["kwargs"].pop(packed_kw))
    case("kwargs_missing_executable_dict", "invalid_shape", "kwargs without executable_dict",
         base, lambda m: m["kwargs"].pop(exe))
    case("task_id_bad_chars", "invalid_task_id", "task_id with slashes and dots", base,
         lambda m: m.update(task_id="../../etc/passwd"))
    case("task_id_too_long", "invalid_task_id", "task_id of 65 characters", base,
         lambda m: m.update(task_id="a" * 65))
    case("task_id_empty", "invalid_task_id", "empty task_id", base,
         lambda m: m.update(task_id=""))
    case("wrong_task_name", "wrong_task_name", "a task other than execute_plan", base,
         lambda m: m.update(task_name="os.system"))
    case("args_non_empty", "unexpected_args", "positional args present", base,
         lambda m: m.update(args=["rm", "-rf", "/"]))
    # the packed ExecuteStepArgs
    case("packed_args_not_object", "invalid_step_args", "execute_step_args_packed is a "
         "string (the serialized form instead of the packed one)", base,
         lambda m: m["kwargs"].update({packed_kw: json.dumps(_packed(m))}))
    case("packed_missing_run_id", "invalid_step_args", "packed args without "
         "pipeline_run_id", base_plain, lambda m: _packed(m).pop("pipeline_run_id"))
    case("packed_missing_step_keys", "invalid_step_args", "packed args without "
         "step_keys_to_execute", base_plain, lambda m: _packed(m).pop("step_keys_to_execute"))
    case("step_keys_null", "invalid_step_args", "step_keys_to_execute is null (Dagster's "
         "'all steps')", base_plain, lambda m: _packed(m).update(step_keys_to_execute=None))
    case("step_key_not_string", "invalid_step_args", "step key is a number", base_plain,
         lambda m: _packed(m).update(step_keys_to_execute=[7]))
    case("packed_attempt_negative", "invalid_step_args", "previous_retry_attempts of the "
         "step is -1", base_plain, lambda m: _packed(m)["known_state"][retries].update(emit=-1))
    case("packed_attempt_float", "invalid_step_args", "previous_retry_attempts of the step "
         "is 1.5", base_plain, lambda m: _packed(m)["known_state"][retries].update(emit=1.5))
    case("known_state_not_object", "invalid_step_args", "known_state is a string",
         base_plain, lambda m: _packed(m).update(known_state="none"))
    case("instance_ref_not_object", "invalid_step_args", "instance_ref is a string",
         base_plain, lambda m: _packed(m).update(instance_ref="/opt/dagster/home"))
    case("two_step_keys", "step_count", "step_keys_to_execute names two steps", base_plain,
         lambda m: _packed(m).update(step_keys_to_execute=["add_one", "double"]))
    case("no_step_keys", "step_count", "step_keys_to_execute is empty", base_plain,
         lambda m: _packed(m).update(step_keys_to_execute=[]))
    # labels against the args
    case("label_run_id_mismatch", "label_mismatch", "run id label differs from the packed "
         "run id", base, _label(contract.LABEL_RUN_ID, RUN_ID_2))
    case("label_step_key_mismatch", "label_mismatch", "step key label differs from the "
         "packed step key", base, _label(contract.LABEL_STEP_KEY, "double"))
    case("label_attempt_mismatch", "label_mismatch", "attempt label 1, packed attempt 0",
         base, _label(contract.LABEL_ATTEMPT, "1"))
    case("attempt_label_not_number", "invalid_label", "attempt label is not a number", base,
         _label(contract.LABEL_ATTEMPT, "one"))
    case("attempt_label_negative", "invalid_label", "attempt label is negative", base,
         _label(contract.LABEL_ATTEMPT, "-1"))
    # identifiers
    case("run_id_with_slash", "invalid_run_id", "run id with a slash, in the packed args "
         "and the label alike", base, lambda m: _set_run_id(m, "../run"))
    case("run_id_too_long", "invalid_run_id", "run id of 65 characters", base,
         lambda m: _set_run_id(m, "r" * 65))
    case("step_key_shell_metachars", "invalid_step_key", "step key with shell "
         "metacharacters, in the packed args and the label alike", base,
         lambda m: _set_step_key(m, "a;rm -rf /"))
    case("step_key_too_long", "invalid_step_key", "step key of 256 characters", base,
         lambda m: _set_step_key(m, "s" * 256))
    case("step_key_empty", "invalid_step_key", "empty step key (no labels)", base_plain,
         lambda m: _packed(m).update(step_keys_to_execute=[""]))
    # steering labels
    case("priority_not_integer", "invalid_label", "priority label 'high'", base,
         _label(contract.LABEL_PRIORITY, "high"))
    case("timeout_negative", "invalid_label", "timeout label -5", base,
         _label(contract.LABEL_TIMEOUT, "-5"))
    case("timeout_zero", "invalid_label", "timeout label 0", base,
         _label(contract.LABEL_TIMEOUT, "0"))
    case("timeout_inf", "invalid_label", "timeout label inf", base,
         _label(contract.LABEL_TIMEOUT, "inf"))
    case("timeout_over_a_week", "invalid_label", "timeout label 604801 (over 7 days)", base,
         _label(contract.LABEL_TIMEOUT, "604801"))
    case("launcher_unknown", "invalid_label", "launcher label kubernetes", base,
         _label(contract.LABEL_LAUNCHER, "kubernetes"))
    case("tags_not_json", "invalid_label", "tags label is not JSON", base,
         _label(contract.LABEL_TAGS, "ecs/cpu=256"))
    case("tags_not_strings", "invalid_label", "tags label maps to a number", base,
         _label(contract.LABEL_TAGS, '{"ecs/cpu": 256}'))
    case("job_name_invalid", "invalid_label", "job name label with a space and a semicolon",
         base, _label(contract.LABEL_JOB_NAME, "diamond; rm -rf /"))
    # fmt: on
    return vectors


def render(vector: Mapping[str, Any]) -> str:
    return json.dumps(vector, indent=2) + "\n"


def all_vectors() -> dict[Path, str]:
    valid = valid_vectors()
    base = json.loads(valid["ours_all_labels"]["body"])
    base_plain = json.loads(valid["plain_dagster_taskiq"]["body"])
    files: dict[Path, str] = {}
    for name, vector in valid.items():
        decoded = contract.decode_step_message(vector["body"])
        got = {key: getattr(decoded, key) for key in vector["expect"]}
        assert got == vector["expect"], (name, got, vector["expect"])
        files[VECTORS_DIR / "valid" / f"{name}.json"] = render(vector)
    for name, vector in invalid_vectors(base, base_plain).items():
        try:
            contract.decode_step_message(vector["body"])
        except contract.PoisonMessage as exc:
            assert exc.error == vector["error"], (name, exc.error, exc.detail)
        else:
            raise AssertionError(f"invalid vector {name} decodes")
        files[VECTORS_DIR / "invalid" / f"{name}.json"] = render(vector)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    options = parser.parse_args(argv)
    files = all_vectors()
    if options.check:
        stale = [
            str(path)
            for path, text in files.items()
            if not path.exists() or path.read_text() != text
        ]
        for kind in ("valid", "invalid"):
            stale += [
                str(path)
                for path in sorted((VECTORS_DIR / kind).glob("*.json"))
                if path not in files
            ]
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        return 1 if stale else 0
    for kind in ("valid", "invalid"):
        (VECTORS_DIR / kind).mkdir(parents=True, exist_ok=True)
        for path in (VECTORS_DIR / kind).glob("*.json"):
            if path not in files:
                path.unlink()
    for path, text in files.items():
        path.write_text(text)
    print(f"wrote {len(files)} vectors to {VECTORS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
