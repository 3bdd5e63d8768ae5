"""A module that acts when imported, as a message's ``custom_instance_class_data`` or storage
data could make a step import it: it touches the file named by ``DTC_TEST_HOSTILE_MARKER``.
The hostile-message tests check that nothing in the controller or its steps imports it."""

from __future__ import annotations

import os
from pathlib import Path

MARKER_ENV = "DTC_TEST_HOSTILE_MARKER"

_marker = os.environ.get(MARKER_ENV)
if _marker:
    Path(_marker).touch()
