"""The wire contract: task ids, message shape and the shared JSON vectors."""

import hashlib
import json
from pathlib import Path
from typing import Any

import make_vectors
import pytest
from conftest import VECTORS_DIR
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value, serialize_value, unpack_value

from dagster_taskiq_controller import contract

VALID = sorted((VECTORS_DIR / "valid").glob("*.json"))
INVALID = sorted((VECTORS_DIR / "invalid").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_task_id_is_deterministic_and_distinct() -> None:
    task_id = contract.step_task_id("run-1", "add_one", 0)
    assert task_id == contract.step_task_id("run-1", "add_one", 0)
    assert task_id == hashlib.sha256(b"run-1/add_one/0").hexdigest()[:32]
    assert len(task_id) == 32 and int(task_id, 16) >= 0
    others = {
        contract.step_task_id("run-1", "add_one", 1),
        contract.step_task_id("run-1", "double", 0),
        contract.step_task_id("run-2", "add_one", 0),
    }
    assert task_id not in others and len(others) == 3


def test_every_op_tag_is_sent_as_a_string_in_key_order() -> None:
    tags = {
        "ecs/cpu": "256",
        "dagster-taskiq/timeout": "10",
        "dagster/priority": "3",
        "dagster/other": "x",
        "team": "data",
        "ecsx/cpu": "1",
    }
    assert contract.label_tags(tags) == dict(sorted(tags.items()))
    assert list(contract.label_tags(tags)) == sorted(tags)


def _args(step_key: str = "add_one", attempt: int | None = None) -> ExecuteStepArgs:
    retries = {step_key: attempt} if attempt is not None else {}
    return ExecuteStepArgs(
        job_origin=make_vectors.fixed_recon_job("diamond").get_python_origin(),
        run_id="run-1",
        step_keys_to_execute=[step_key],
        instance_ref=None,
        retry_mode=RetryMode.DEFERRED,
        known_state=KnownExecutionState(previous_retry_attempts=retries),
    )


def test_message_shape_follows_taskiq_conventions() -> None:
    executable = make_vectors.fixed_recon_job("diamond").to_dict()
    message = contract.build_step_message(
        _args(attempt=3),
        executable,
        job_name="diamond",
        step_tags={"dagster/priority": "7", "dagster-taskiq/timeout": "1.5", "x": "y"},
    )
    assert list(message) == ["task_id", "task_name", "labels", "labels_types", "args", "kwargs"]
    assert message["task_id"] == contract.step_task_id("run-1", "add_one", 3)
    assert message["task_name"] == "execute_plan"
    assert message["args"] == []
    labels = message["labels"]
    assert set(labels) == set(contract.ALL_LABELS)
    # TaskIQ sends every label value as a string and records its type; ours are all STR (3).
    assert all(isinstance(value, str) for value in labels.values())
    assert message["labels_types"] == {name: 3 for name in labels}
    assert labels == {
        "dagster_run_id": "run-1",
        "dagster_step_key": "add_one",
        "dagster_attempt": "3",
        "dagster_job_name": "diamond",
        "dagster_launcher": "",
        "dagster_priority": "7",
        "dagster_timeout": "1.5",
        "dagster_tags": json.dumps(
            {"dagster-taskiq/timeout": "1.5", "dagster/priority": "7", "x": "y"}, sort_keys=True
        ),
    }
    assert set(message["kwargs"]) == {"execute_step_args_packed", "executable_dict"}
    assert message["kwargs"]["executable_dict"] == executable
    unpacked = unpack_value(message["kwargs"]["execute_step_args_packed"], ExecuteStepArgs)
    assert unpacked == _args(attempt=3)
    # The body is plain JSON the reference decoder accepts.
    decoded = contract.decode_step_message(contract.encode_body(message))
    assert (decoded.run_id, decoded.step_key, decoded.attempt) == ("run-1", "add_one", 3)
    assert decoded.priority == 7 and decoded.timeout_seconds == 1.5


def test_attempt_defaults_to_zero() -> None:
    message = contract.build_step_message(_args(), {}, job_name="diamond", step_tags={})
    assert message["labels"]["dagster_attempt"] == "0"
    assert message["labels"]["dagster_priority"] == "0"
    assert message["labels"]["dagster_tags"] == "{}"


@pytest.mark.parametrize(
    "tags",
    [
        {"dagster/priority": "high"},
        {"dagster-taskiq/timeout": "-1"},
        {"dagster-taskiq/timeout": "soon"},
        {"dagster-taskiq/launcher": "k8s"},
    ],
)
def test_bad_steering_tags_are_refused_at_launch(tags: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        contract.build_step_message(_args(), {}, job_name="diamond", step_tags=tags)


def test_one_step_per_message() -> None:
    args = ExecuteStepArgs(
        job_origin=_args().job_origin, run_id="run-1", step_keys_to_execute=["a", "b"]
    )
    with pytest.raises(ValueError):
        contract.build_step_message(args, {}, job_name="diamond", step_tags={})


def test_vector_sets_are_complete() -> None:
    assert len(VALID) >= 3
    assert len(INVALID) >= 12
    names = {path.stem for path in VALID}
    assert {"ours_all_labels", "plain_dagster_taskiq", "ours_steering_tags"} <= names
    errors = {load(path)["error"] for path in INVALID}
    assert errors <= set(contract.ERROR_NAMES)
    # every documented error name except too_large (a 1 MiB vector is impractical) is covered
    assert set(contract.ERROR_NAMES) - errors == {"too_large"}


def test_vectors_are_up_to_date() -> None:
    """The checked-in vectors are exactly what make_vectors.py generates."""
    assert make_vectors.main(["--check"]) == 0


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_vector_round_trips(path: Path) -> None:
    vector = load(path)
    assert isinstance(vector["body"], str)
    expect = vector["expect"]
    message = json.loads(vector["body"])

    # The packed args are genuine: Dagster unpacks them into the step the labels describe.
    packed = message["kwargs"]["execute_step_args_packed"]
    args = deserialize_value(json.dumps(packed), ExecuteStepArgs)
    assert args.run_id == expect["run_id"]
    assert args.step_keys_to_execute == [expect["step_key"]]
    assert contract.step_attempt(args, expect["step_key"]) == expect["attempt"]
    assert json.loads(serialize_value(args)) == packed
    unpack_value(message["kwargs"]["executable_dict"])

    decoded = contract.decode_step_message(vector["body"])
    assert {key: getattr(decoded, key) for key in expect} == expect
    if message.get("labels", {}).get(contract.LABEL_RUN_ID):
        assert expect["task_id"] == contract.step_task_id(
            expect["run_id"], expect["step_key"], expect["attempt"]
        )


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_vector_is_poison(path: Path) -> None:
    vector = load(path)
    assert isinstance(vector["body"], str) and vector["description"]
    with pytest.raises(contract.PoisonMessage) as info:
        contract.decode_step_message(vector["body"])
    assert info.value.error == vector["error"]


def test_oversized_body_is_poison() -> None:
    body = json.dumps({"pad": "x" * contract.MAX_BODY_BYTES})
    with pytest.raises(contract.PoisonMessage) as info:
        contract.decode_step_message(body)
    assert info.value.error == "too_large"
