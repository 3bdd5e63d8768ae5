"""Dagster side of dagster-taskiq-controller: the executor, the bridge sidecar and the wire
contract shared with the Rust controller (docs/protocol.md)."""

from dagster_taskiq_controller.executor import SqsStepHandler, taskiq_controller_executor

__all__ = ["SqsStepHandler", "taskiq_controller_executor"]
