"""The PostgreSQL test bed (dagster_taskiq_controller_testing.postgres) does what the tests built
on it assume: a crash and restart keep what was committed, and a cut relay takes its clients,
and only them, off the network until it is restored."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest

from dagster_taskiq_controller_testing.postgres import PostgresServer, TcpRelay


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of the test's own: it is killed, which the session's server must not be."""
    with PostgresServer() as server:
        yield server


def _query(url: str, sql: str) -> list[tuple]:
    conn = psycopg2.connect(url, connect_timeout=2)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def test_a_killed_server_restarts_with_what_was_committed(own_server: PostgresServer) -> None:
    url = own_server.url(own_server.create_database())
    _query(url, "CREATE TABLE t (v int)")
    held = psycopg2.connect(url)
    _query(url, "INSERT INTO t VALUES (1)")  # committed just before the crash
    own_server.kill()
    with pytest.raises(psycopg2.OperationalError):
        _query(url, "SELECT 1")
    with pytest.raises(psycopg2.Error), held.cursor() as cursor:
        cursor.execute("SELECT 1")
    held.close()
    own_server.start()
    assert _query(url, "SELECT v FROM t") == [(1,)]
    own_server.restart()
    assert _query(url, "SELECT v FROM t") == [(1,)]


def test_a_cut_relay_breaks_its_clients_only_until_restored(
    postgres_server: PostgresServer,
) -> None:
    with TcpRelay(postgres_server.port) as relay:
        relayed = postgres_server.url(port=relay.port)
        through = psycopg2.connect(relayed)
        direct = psycopg2.connect(postgres_server.url())
        try:
            assert relay.open_connections() == 1
            relay.cut()
            assert relay.open_connections() == 0
            with pytest.raises(psycopg2.OperationalError), through.cursor() as cursor:
                cursor.execute("SELECT 1")
            with pytest.raises(psycopg2.OperationalError, match="refused"):
                _query(relayed, "SELECT 1")
            with direct.cursor() as cursor:  # another client is not affected
                cursor.execute("SELECT 1")
            relay.restore()
            assert _query(relayed, "SELECT 2") == [(2,)]
        finally:
            through.close()
            direct.close()
