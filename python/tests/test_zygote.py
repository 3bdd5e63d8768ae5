"""Unit tests of the warm pool's zygote set-up (the forking itself is tested end to end in
test_e2e_process.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg2
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef

from dagster_taskiq_controller_testing.postgres import (
    PostgresServer,
    tcp_connections,
    write_dagster_yaml,
)


def test_alembic_scripts_are_read_once_and_schema_checks_still_work(tmp_path: Path) -> None:
    # A real instance whose schema the patched check must still read correctly.
    home = tmp_path / "home"
    home.mkdir()
    DagsterInstance.from_ref(InstanceRef.from_dir(str(home))).dispose()
    check = textwrap.dedent(
        f"""
        from alembic.script import ScriptDirectory
        from dagster import DagsterInstance
        from dagster._core.instance.ref import InstanceRef
        from dagster._core.storage.event_log.sqlite import sqlite_event_log
        from dagster._core.storage.sql import get_alembic_config

        from dagster_taskiq_controller.zygote import share_alembic_scripts

        share_alembic_scripts()
        config = lambda: get_alembic_config(sqlite_event_log.__file__)
        first = ScriptDirectory.from_config(config())
        assert ScriptDirectory.from_config(config()) is first
        instance = DagsterInstance.from_ref(InstanceRef.from_dir({str(home)!r}))
        db_revision, head = instance.event_log_storage.alembic_version()
        assert db_revision == head == first.get_current_head(), (db_revision, head)
        print("ok", head)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")


def test_steps_of_the_zygotes_instance_get_it_already_open_and_can_write(tmp_path: Path) -> None:
    """The zygote's SQLite instance and engines, shared with a forked step that writes."""
    home, other = tmp_path / "home", tmp_path / "other"
    for path in (home, other):
        path.mkdir()
        DagsterInstance.from_ref(InstanceRef.from_dir(str(path))).dispose()
    check = textwrap.dedent(
        f"""
        import os
        from dagster import DagsterInstance, job, op
        from dagster._core.instance.ref import InstanceRef

        from dagster_taskiq_controller.zygote import share_instance, share_sqlite_engines

        @op
        def noop() -> None:
            pass

        @job
        def tiny() -> None:
            noop()

        share_sqlite_engines()
        share_instance()
        ref = InstanceRef.from_dir({str(home)!r})
        shared = DagsterInstance.from_ref(ref)
        assert DagsterInstance.from_ref(ref) is shared
        assert DagsterInstance.from_ref(InstanceRef.from_dir({str(other)!r})) is not shared
        run = shared.create_run_for_job(job_def=tiny)
        # One engine per database (its statement cache kept), none per connection.
        storages = (shared.event_log_storage.run_connection, shared.run_storage.connect)
        for connect, args in zip(storages, ((run.run_id,), ())):
            engines = []
            for _ in range(2):
                with connect(*args) as connection:
                    engines.append(connection.engine)
            assert engines[0] is engines[1], connect
        pid = os.fork()
        if pid == 0:  # a step: writes through its copy of the shared instance
            with DagsterInstance.from_ref(ref) as instance:
                instance.report_engine_event("from the child", instance.get_run_by_id(run.run_id))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        records = shared.get_records_for_run(run.run_id).records
        messages = [r.event_log_entry.message for r in records]
        assert "from the child" in messages, messages
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DAGSTER_HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_a_zygote_on_postgres_forks_with_no_database_connection_open(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    """SQLAlchemy connections must not cross a fork (two processes on one socket corrupt each
    other's protocol stream). The zygote opens a PostgreSQL-backed instance while it prepares;
    once ready it must hold no connection to the server, so each step opens its own."""
    home = write_dagster_yaml(tmp_path / "home", postgres_url)
    ours, theirs = socket.socketpair()
    zygote = subprocess.Popen(
        [sys.executable, "-m", "dagster_taskiq_controller.zygote"],
        stdin=theirs,
        env={**os.environ, "DAGSTER_HOME": str(home)},
    )
    theirs.close()
    try:
        ours.settimeout(120)
        ready = json.loads(ours.makefile("rb").readline())
        assert ready["op"] == "ready", ready
        # It did open the instance: the PostgreSQL driver is loaded (for the steps, too).
        assert "psycopg2/_psycopg" in Path(f"/proc/{zygote.pid}/maps").read_text()
        assert tcp_connections(zygote.pid, postgres_server.port) == 0
        # The check sees a connection when there is one.
        conn = psycopg2.connect(postgres_url)
        try:
            assert tcp_connections(os.getpid(), postgres_server.port) == 1
        finally:
            conn.close()
    finally:
        ours.close()  # the zygote exits when its control socket closes
        assert zygote.wait(30) == 0
