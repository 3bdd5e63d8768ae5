"""The controller's Dagster bridge with faults a test switches on with control files. Nothing
here is used in production: a test starts the controller with the hidden flag
``--bridge-module dagster_taskiq_controller_testing.faulty_bridge`` and names the control files
in the controller's environment (the sidecar inherits it):

- ``DTC_TEST_BRIDGE_HANG_FILE``: while this file exists, a request hangs for good.
  The bridge first starts a child that sleeps (in its process group, so a test can see the
  whole group die) and writes ``{"pid", "child", "at"}`` to ``<hang file>.hung``.
- ``DTC_TEST_BRIDGE_FAIL_FILE``: while this file exists, every request that opens a
  Dagster instance raises, as when Dagster's storage is unreachable; a plain ``ping`` (no
  instance) still answers, as a running sidecar does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dagster import DagsterInstance

from dagster_taskiq_controller.bridge import Bridge, main

HANG_FILE_ENV = "DTC_TEST_BRIDGE_HANG_FILE"
FAIL_FILE_ENV = "DTC_TEST_BRIDGE_FAIL_FILE"
MODULE = "dagster_taskiq_controller_testing.faulty_bridge"


class InjectedStorageError(Exception):
    """Stands for a storage failure (a database that does not answer)."""


def _control_file(env: str) -> Path | None:
    value = os.environ.get(env)
    return Path(value) if value else None


def hung_marker(hang_file: Path) -> Path:
    """Where a hanging bridge writes its pid and its child's."""
    return hang_file.with_name(hang_file.name + ".hung")


class FaultyBridge(Bridge):
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        hang_file = _control_file(HANG_FILE_ENV)
        if hang_file is not None and hang_file.exists():
            self._hang(hang_file)
        return super().handle(request)

    def instance(self) -> DagsterInstance:
        fail_file = _control_file(FAIL_FILE_ENV)
        if fail_file is not None and fail_file.exists():
            raise InjectedStorageError("injected: Dagster's storage does not answer")
        return super().instance()

    def _hang(self, hang_file: Path) -> None:
        child = subprocess.Popen(["sleep", "3600"])
        marker = hung_marker(hang_file)
        partial = marker.with_name(marker.name + ".tmp")
        partial.write_text(json.dumps({"pid": os.getpid(), "child": child.pid, "at": time.time()}))
        partial.replace(marker)
        threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main(FaultyBridge))
