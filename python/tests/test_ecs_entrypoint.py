"""The ECS shim that resolves offloaded step args (dagster_taskiq_controller.ecs_entrypoint)."""

from __future__ import annotations

import hashlib

import pytest

from dagster_taskiq_controller import ecs_entrypoint as shim

ARGS = b"eJyrVkrLz1eyUkpKLFKqBQAdegQ0"


def test_pointer_is_replaced_by_the_fetched_args() -> None:
    fetched: list[str] = []

    def fetch(uri: str) -> bytes:
        fetched.append(uri)
        return ARGS

    env = shim.resolve_env(
        {
            shim.URI_ENV: "s3://bucket/dagster-taskiq/step-args/abc",
            shim.SHA256_ENV: hashlib.sha256(ARGS).hexdigest(),
            "DAGSTER_RUN_STEP_KEY": "op_a",
        },
        fetch,
    )
    assert fetched == ["s3://bucket/dagster-taskiq/step-args/abc"]
    assert env == {shim.ARGS_ENV: ARGS.decode(), "DAGSTER_RUN_STEP_KEY": "op_a"}


def test_inline_args_pass_through_untouched() -> None:
    env = {shim.ARGS_ENV: "inline", "X": "1"}
    assert shim.resolve_env(env, lambda uri: pytest.fail("no fetch expected")) == env


def test_a_corrupt_object_is_refused() -> None:
    with pytest.raises(shim.ShimError) as e:
        shim.resolve_env({shim.URI_ENV: "s3://b/k", shim.SHA256_ENV: "0" * 64}, lambda u: ARGS)
    assert e.value.exit_code == shim.EXIT_CORRUPT


@pytest.mark.parametrize("uri", ["https://b/k", "s3://bucket", "s3:///key"])
def test_a_bad_pointer_is_refused(uri: str) -> None:
    with pytest.raises(shim.ShimError) as e:
        shim.parse_s3_uri(uri)
    assert e.value.exit_code == shim.EXIT_BAD_POINTER
