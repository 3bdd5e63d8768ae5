"""The events of given steps of a run, of given types: what the bridge's step-state and verdict
checks read (docs/architecture.md, "The bridge's reads").

Dagster's ``get_records_for_run`` filters a run's events by type but not by step, so reading
one step's terminal events through it reads those of every step of the run: O(N) per check
and O(N^2) per run of N steps. The ``event_logs`` table of every SQL event-log storage has a
``step_key`` column (set from the event's step key when the event is stored) and an index on
it (``idx_step_key``), so here the storage's own connection for the run
(``SqlEventLogStorage.run_connection``, in every Dagster from 1.11 to 1.13) answers one query
that reads only the rows of the asked steps and types:

- SQLite (one shard file per run): the index holds only that run's rows, so the query reads
  the asked steps' rows and nothing else;
- PostgreSQL, MySQL, the consolidated SQLite storage (one table for every run): the query
  filters on ``run_id`` and ``step_key`` both; the database picks its index.

An event-log storage that is not SQL-backed (a custom ``EventLogStorage``, such as one that
reads over an API) has no such query: for it the run's events of those types are scanned as
before, and the step keys filtered here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

import sqlalchemy as db
from dagster import DagsterEventType, DagsterInstance
from dagster._core.event_api import EventLogRecord
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._core.storage.legacy_storage import LegacyEventLogStorage
from dagster._serdes import deserialize_value

PAGE_SIZE = 1000
"""Records per read of the fallback scan."""


def sql_event_storage(instance: DagsterInstance) -> SqlEventLogStorage | None:
    """The instance's event-log storage when it is SQL-backed (unwrapping the one a
    ``storage:`` block configures), else ``None``."""
    storage: Any = instance.event_log_storage
    if isinstance(storage, LegacyEventLogStorage):
        storage = storage._storage.event_log_storage
    return storage if isinstance(storage, SqlEventLogStorage) else None


def records_of(
    instance: DagsterInstance,
    run_id: str,
    of_type: DagsterEventType | set[DagsterEventType],
    cursor: str | None = None,
) -> Iterator[EventLogRecord]:
    """The run's event records of these types after ``cursor``, page by page (every step's)."""
    while True:
        conn = instance.get_records_for_run(run_id, cursor=cursor, of_type=of_type, limit=PAGE_SIZE)
        yield from conn.records
        if not conn.has_more:
            return
        cursor = conn.cursor


class StepEvents:
    """Reads the events of some steps of a run, of some types, oldest first."""

    def __init__(self, instance: DagsterInstance) -> None:
        self._instance = instance
        self._storage = sql_event_storage(instance)

    @property
    def indexed(self) -> bool:
        """Whether reads go through the ``step_key`` index (else: the fallback scan)."""
        return self._storage is not None

    def types(
        self, run_id: str, step_keys: Collection[str], types: Collection[DagsterEventType]
    ) -> dict[str, list[str]]:
        """The event types (``DagsterEventType`` values) of each asked step's events of these
        types, oldest first; a step without any gets an empty list."""
        found: dict[str, list[str]] = {key: [] for key in step_keys}
        if not found:
            return found
        if self._storage is None:
            for entry in self._scan(run_id, found.keys(), types):
                found[entry.dagster_event.step_key].append(  # type: ignore[union-attr]
                    entry.dagster_event.event_type_value  # type: ignore[union-attr]
                )
            return found
        column = SqlEventLogStorageTable.c.dagster_event_type
        queries = {key: self._query(run_id, key, types, column) for key in found}
        # One query per step on one connection: with several step keys in one query, SQLite
        # reads the run's whole index instead.
        with self._storage.run_connection(run_id) as conn:
            for step_key, query in queries.items():
                found[step_key] = [event_type for (event_type,) in conn.execute(query)]
        return found

    def entries(
        self, run_id: str, step_key: str, types: Collection[DagsterEventType]
    ) -> list[EventLogEntry]:
        """The step's event log entries of these types, oldest first."""
        if self._storage is None:
            return list(self._scan(run_id, {step_key}, types))
        query = self._query(run_id, step_key, types, SqlEventLogStorageTable.c.event)
        with self._storage.run_connection(run_id) as conn:
            rows = conn.execute(query).fetchall()
        return [deserialize_value(text, EventLogEntry) for (text,) in rows]

    @staticmethod
    def _query(run_id: str, step_key: str, types: Collection[DagsterEventType], column: Any) -> Any:
        table = SqlEventLogStorageTable
        return (
            db.select(column)
            .where(
                table.c.run_id == run_id,
                table.c.step_key == step_key,
                # `IN` even for one type: SQLite then keeps to the step-key index instead of the
                # event-type one, which holds every step's events of that type.
                table.c.dagster_event_type.in_(sorted(t.value for t in types)),
            )
            .order_by(table.c.id.asc())
        )

    def _scan(
        self, run_id: str, step_keys: Collection[str], types: Collection[DagsterEventType]
    ) -> Iterator[EventLogEntry]:
        for record in records_of(self._instance, run_id, set(types)):
            entry = record.event_log_entry
            event = entry.dagster_event
            if event is not None and event.step_key in step_keys:
                yield entry
