"""What differs between the Dagster minor versions this package supports (1.11 to 1.13).

Every private Dagster API the package uses was compared across 1.11.16, 1.12.22 and 1.13.x;
the shims for the ones that differ live here, each naming the version that differs. What was
found the same (and so needs no shim) is listed in docs/operations.md, "Dagster versions".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster._grpc.types import ExecuteStepArgs

SUPPORTED_MINORS: tuple[tuple[int, int], ...] = ((1, 11), (1, 12), (1, 13))


def replace_step_args(args: ExecuteStepArgs, **changes: Any) -> ExecuteStepArgs:
    """A copy of ``args`` with ``changes``.

    Dagster 1.11: ``ExecuteStepArgs`` is a ``NamedTuple`` (``_replace``); from 1.12 it is a
    ``@record``, which is built on a tuple and still has a ``_replace`` that fails (records
    forbid iteration), so it is told apart with ``is_record`` and copied with
    ``dagster._record.copy``. The serialized form is the same in all three.
    """
    from dagster._record import copy, is_record

    if is_record(args):
        return copy(args, **changes)
    return args._replace(**changes)
