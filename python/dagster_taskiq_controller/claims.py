"""Durable per-attempt claims in the Dagster instance's own storage (docs/guarantees.md,
"Claims").

A claim is one row of the run storage's key-value table (``kvs``), keyed by the step attempt.
That table has a unique index on its key, on SQLite and PostgreSQL alike, so of two
controllers inserting the same key exactly one insert succeeds; every later change is a
compare-and-set (``UPDATE ... WHERE key = k AND value = <the value read>``), which one writer
wins. The value is a small JSON record:

- ``holder``: the controller id; ``token``: a fresh id per claim, so a restarted controller
  with the same id is told apart from the one before it;
- ``message_id``: the SQS message the holder runs the attempt for (it changes on a hand-off);
- ``beat``: bumped by the holder while it holds a live lease on that message;
- ``ended``: set (instead of deleting the row) when the attempt ended with a controller
  verdict, so a late duplicate of the message is not run after the verdict.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as db
from dagster import DagsterInstance
from dagster._core.storage.legacy_storage import LegacyRunStorage
from dagster._core.storage.runs.schema import KeyValueStoreTable
from dagster._core.storage.runs.sql_run_storage import SqlRunStorage
from sqlalchemy import exc as db_exc

KEY_PREFIX = "dtc-claim:"
"""Short on purpose: MySQL's unique index on ``kvs.key`` covers the first 64 characters."""


class ClaimsUnsupported(Exception):
    """The instance's run storage has no SQL key-value table to claim in."""


def claim_key(run_id: str, step_key: str, attempt: int) -> str:
    digest = hashlib.sha256(f"{run_id}/{step_key}/{attempt}".encode()).hexdigest()
    return KEY_PREFIX + digest[:40]


def _sql_storage(instance: DagsterInstance) -> SqlRunStorage:
    storage: Any = instance.run_storage
    if isinstance(storage, LegacyRunStorage):  # a `storage:` block wraps the real one
        storage = storage._storage.run_storage
    if not isinstance(storage, SqlRunStorage):
        raise ClaimsUnsupported(
            f"run storage {type(storage).__name__} is not SQL-backed: attempts cannot be claimed"
        )
    return storage


def _record(holder: str, token: str, message_id: str, beat: int = 0) -> dict[str, Any]:
    return {"holder": holder, "token": token, "message_id": message_id, "beat": beat}


def _encode(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


class AttemptClaims:
    """Claims of one Dagster instance."""

    def __init__(self, instance: DagsterInstance) -> None:
        self._storage = _sql_storage(instance)

    def _read(self, key: str) -> str | None:
        with self._storage.connect() as conn:
            row = conn.execute(
                db.select(KeyValueStoreTable.c.value).where(KeyValueStoreTable.c.key == key)
            ).fetchone()
        return None if row is None else row[0]

    def _insert(self, key: str, value: str) -> bool:
        try:
            with self._storage.connect() as conn:
                conn.execute(KeyValueStoreTable.insert().values(key=key, value=value))
        except db_exc.IntegrityError:
            return False
        return True

    def _swap(self, key: str, old: str, new: str | None) -> bool:
        """Replaces (or deletes, for ``None``) the value only if it is still ``old``."""
        where = db.and_(KeyValueStoreTable.c.key == key, KeyValueStoreTable.c.value == old)
        with self._storage.connect() as conn:
            if new is None:
                result = conn.execute(KeyValueStoreTable.delete().where(where))
            else:
                result = conn.execute(KeyValueStoreTable.update().where(where).values(value=new))
        return result.rowcount == 1

    def take(
        self,
        key: str,
        holder: str,
        token: str,
        message_id: str,
        replace_token: str | None = None,
    ) -> dict[str, Any]:
        """Claims the attempt. With ``replace_token``, takes over the claim holding that token
        (and no other). Answers ``claimed`` and the claim as it now stands."""
        mine = _encode(_record(holder, token, message_id))
        if replace_token is None:
            if self._insert(key, mine):
                return {"claimed": True, "current": json.loads(mine)}
        else:
            current = self._read(key)
            if current is not None and _token_of(current) == replace_token:
                if self._swap(key, current, mine):
                    return {"claimed": True, "current": json.loads(mine)}
        current = self._read(key)
        if current is None:
            # Released in between: claim afresh (the caller asks again on False).
            return {"claimed": False, "current": None}
        record = json.loads(current)
        return {"claimed": record.get("token") == token, "current": record}

    def renew(self, claims: Sequence[Mapping[str, str]]) -> list[bool]:
        """Bumps the beat of each held claim (and records its current message); False where
        the claim is no longer held with that token."""
        alive: list[bool] = []
        for claim in claims:
            key, token = claim["key"], claim["token"]
            current = self._read(key)
            if current is None or _token_of(current) != token:
                alive.append(False)
                continue
            record = json.loads(current)
            if record.get("ended"):
                alive.append(False)
                continue
            record["beat"] = int(record.get("beat", 0)) + 1
            record["message_id"] = claim.get("message_id", record.get("message_id", ""))
            alive.append(self._swap(key, current, _encode(record)))
        return alive

    def release(self, key: str, token: str, ended: str | None) -> bool:
        """Lets go of a claim: deleted, or kept as the record of a verdict (``ended``)."""
        current = self._read(key)
        if current is None or _token_of(current) != token:
            return False
        if ended is None:
            return self._swap(key, current, None)
        record = json.loads(current)
        record["ended"] = ended
        return self._swap(key, current, _encode(record))


def _token_of(value: str) -> str | None:
    try:
        token = json.loads(value).get("token")
    except (ValueError, AttributeError):
        return None
    return token if isinstance(token, str) else None
