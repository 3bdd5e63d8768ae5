"""The bridge's watch of runs whose event log is in PostgreSQL (docs/protocol.md, "Pushes").

Dagster 1.13 watches a PostgreSQL event log by polling: a thread per run reads every new event,
every 0.25 s while events come and up to every 16 s once the run is quiet, on a new connection
each time, and a database error ends the thread (and the run's pushes) for good. A cancel of a
run whose steps had run quietly for a while reached the controller seconds late.

dagster-postgres still sends ``NOTIFY run_events, '<run_id>_<event id>'`` after each event it
writes. ``PostgresRunWatcher`` listens on one connection of its own and, for a watched run that
was notified, reads only the new events of the types a push comes from:

- PostgreSQL hands out ids before commit, so an event can commit after a later one was read;
  its notification names it, and an event behind the read position is read by id.
- Notifications sent while the watcher was not listening are lost: every watched run is read
  after (re)connecting, and every ``CHECK_SECONDS`` one query looks for pushable events past the
  read position of every watched run (pushes still arrive, later, from a Dagster that stopped
  notifying).
- A database error is logged once per outage and the connection opened again, with backoff.
"""

from __future__ import annotations

import logging
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as db
from dagster import DagsterInstance
from dagster._core.event_api import EventLogCursor
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable

logger = logging.getLogger("dagster_taskiq_controller.bridge")

CHANNEL = "run_events"
"""dagster-postgres's notification channel (``dagster_postgres.event_log.CHANNEL_NAME``)."""
WAKE_SECONDS = 0.25
"""The longest the thread waits for a notification before it looks at its other work."""
CHECK_SECONDS = 2.0
"""How often every watched run is checked for pushable events, notified or not."""
RECONNECT_MAX_SECONDS = 5.0
DELIVERED_KEPT = 256
"""Ids of delivered events remembered per run, so an event read twice is pushed once."""


def is_postgres(storage: Any) -> bool:
    """Whether ``storage`` is dagster-postgres's event log (without importing dagster-postgres
    where it is not in use)."""
    module = sys.modules.get("dagster_postgres.event_log.event_log")
    return module is not None and isinstance(storage, module.PostgresEventLogStorage)


@dataclass
class _Run:
    cursor: str | None
    delivered: deque[int] = field(default_factory=lambda: deque(maxlen=DELIVERED_KEPT))

    def position(self) -> int:
        """The storage id of the last event read (0: none)."""
        return EventLogCursor.parse(self.cursor).storage_id() if self.cursor else 0


class PostgresRunWatcher:
    """Watches runs of a ``PostgresEventLogStorage`` for events that become pushes; the same
    interface as the bridge's ``ShardWatcher``."""

    def __init__(
        self,
        instance: DagsterInstance,
        storage: Any,
        deliver: Callable[[str, EventLogEntry], None],
        event_types: frozenset[Any],
    ) -> None:
        self._instance = instance
        self._storage = storage
        self._deliver = deliver
        self._types = set(event_types)
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Any = None  # SQLAlchemy's wrapper of the listening DBAPI connection
        self.connects = 0

    def set_runs(self, run_ids: set[str], first_cursor: Callable[[str], str | None]) -> None:
        """Watches exactly these runs; one not watched yet from ``first_cursor(run_id)``."""
        with self._lock:
            known = set(self._runs)
        added = {run_id: _Run(first_cursor(run_id)) for run_id in run_ids - known}
        with self._lock:
            for run_id in self._runs.keys() - run_ids:
                del self._runs[run_id]
            self._runs.update(added)
        if run_ids and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pg-run-watcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._disconnect()

    # --- the thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        failures = 0
        checked_at = 0.0
        while not self._stop.is_set():
            try:
                if self._connection is None:
                    self._listen()
                    if failures:
                        logger.info("listening to the PostgreSQL event log again")
                    failures = 0
                    checked_at = 0.0  # notifications were lost meanwhile: read every run
                notified = self._wait()
                if time.monotonic() - checked_at >= CHECK_SECONDS:
                    checked_at = time.monotonic()
                    for run_id in self._behind():
                        notified.setdefault(run_id, set())
                for run_id, event_ids in notified.items():
                    self._read(run_id, event_ids)
            except Exception as exc:
                failures += 1
                self._disconnect()
                if failures == 1:
                    logger.warning("watching the PostgreSQL event log failed (%s); retrying", exc)
                else:
                    logger.debug("watching the PostgreSQL event log failed again: %s", exc)
                self._stop.wait(min(RECONNECT_MAX_SECONDS, 0.25 * 2**failures))

    def _listen(self) -> None:
        # Through the storage's engine: the same URL, driver and credential hooks as its
        # other connections (its pool is NullPool, so this connection is ours alone).
        connection = self._storage._engine.raw_connection()
        try:
            dbapi = connection.driver_connection
            dbapi.autocommit = True
            with dbapi.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
            _keep_alive(dbapi.fileno())
        except BaseException:
            connection.invalidate()
            raise
        self._connection = connection
        self.connects += 1

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.invalidate()  # closed, never handed back to a pool
            except Exception:
                pass

    def _wait(self) -> dict[str, set[int]]:
        """The watched runs notified within ``WAKE_SECONDS``, each with its events' ids."""
        dbapi = self._connection.driver_connection
        readable, _, _ = select.select([dbapi], [], [], WAKE_SECONDS)
        if not readable:
            return {}
        dbapi.poll()  # raises if the connection broke
        notes = list(dbapi.notifies)
        dbapi.notifies.clear()
        with self._lock:
            watched = set(self._runs)
        notified: dict[str, set[int]] = {}
        for note in notes:
            run_id, _, event_id = note.payload.rpartition("_")
            if run_id in watched and event_id.isdigit():
                notified.setdefault(run_id, set()).add(int(event_id))
        return notified

    def _behind(self) -> list[str]:
        """Watched runs with a pushable event past their read position (one query)."""
        with self._lock:
            positions = {run_id: run.position() for run_id, run in self._runs.items()}
        if not positions:
            return []
        table = SqlEventLogStorageTable
        query = (
            db.select(table.c.run_id, db.func.max(table.c.id))
            .where(table.c.run_id.in_(list(positions)))
            .where(table.c.dagster_event_type.in_([t.value for t in self._types]))
            .group_by(table.c.run_id)
        )
        with self._storage.index_connection() as conn:
            rows = conn.execute(query).fetchall()
        return [run_id for run_id, last in rows if last > positions.get(run_id, 0)]

    def _read(self, run_id: str, event_ids: set[int]) -> None:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:  # no longer watched
            return
        behind = {i for i in event_ids if i <= run.position()}
        connection = self._instance.get_records_for_run(
            run_id, cursor=run.cursor, of_type=self._types, limit=1000
        )
        while True:
            for record in connection.records:
                self._push(run_id, run, record)
                run.cursor = EventLogCursor.from_storage_id(record.storage_id).to_string()
            if not connection.has_more:
                break
            connection = self._instance.get_records_for_run(
                run_id, cursor=run.cursor, of_type=self._types, limit=1000
            )
        # Notified behind the read position: committed after the read passed them, or found
        # by a read before their notification came (then not pushed again).
        for event_id in sorted(behind):
            after = EventLogCursor.from_storage_id(event_id - 1).to_string()
            records = self._instance.get_records_for_run(
                run_id, cursor=after, of_type=self._types, limit=1
            ).records
            if records and records[0].storage_id == event_id:
                self._push(run_id, run, records[0])

    def _push(self, run_id: str, run: _Run, record: Any) -> None:
        if record.storage_id in run.delivered:
            return
        run.delivered.append(record.storage_id)
        with self._lock:
            if run_id not in self._runs:
                return
        self._deliver(run_id, record.event_log_entry)


def _keep_alive(fd: int) -> None:
    """TCP keepalives on the listening connection: one whose peer vanished without a word
    (no FIN, no RST) would otherwise wait for notifications for good."""
    try:
        sock = socket.socket(fileno=socket.dup(fd))
    except OSError:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError:
        pass  # a Unix socket: no keepalives, and no network to lose
    finally:
        sock.close()
