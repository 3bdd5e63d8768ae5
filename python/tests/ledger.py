"""Reads the ops' ledger (jobs.LEDGER_ENV) and finds overlapping executions of one attempt."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path


def executions(path: Path) -> dict[tuple[str, str, int], dict[int, tuple[float, float]]]:
    """(run_id, step, attempt) -> pid -> (first, last) time seen alive."""
    spans: dict[tuple[str, str, int], dict[int, tuple[float, float]]] = defaultdict(dict)
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        key = (entry["run_id"], entry["step"], entry["attempt"])
        first, last = spans[key].get(entry["pid"], (entry["t"], entry["t"]))
        spans[key][entry["pid"]] = (min(first, entry["t"]), max(last, entry["t"]))
    return dict(spans)


def overlaps(path: Path) -> list[str]:
    """Every pair of executions of the same attempt whose lifetimes intersect."""
    found = []
    for key, by_pid in executions(path).items():
        spans = sorted(by_pid.items(), key=lambda item: item[1][0])
        for (pid_a, (_, end_a)), (pid_b, (start_b, _)) in itertools.pairwise(spans):
            if start_b <= end_a:
                found.append(f"{key}: pid {pid_a} ran until {end_a}, pid {pid_b} from {start_b}")
    return found
