"""A throwaway PostgreSQL server for the tests, and what goes around it: a database per test, a
``dagster.yaml`` whose storage is that database, and a TCP relay that a test can cut to take one
client off the network. Nothing here is used in production.

The server binaries (``initdb``, ``postgres``) come from ``DAGSTER_TASKIQ_PG_BIN`` or the newest
``/usr/lib/postgresql/<version>/bin`` (Debian's ``postgresql`` package; ``make postgresql``,
part of ``make test``, installs it). PostgreSQL refuses to run as root: as root the server runs
as the ``postgres`` user, in a directory of its own under the system's temporary directory
(pytest's are private to root). A server whose test session died without closing it is killed
by the next one that starts a server.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster_taskiq_controller_testing.stack import free_port, wait_for

PG_BIN_ENV = "DAGSTER_TASKIQ_PG_BIN"
BASE_PREFIX = "dtc-pg-"
OWNER_FILE = "owner.pid"
"""In a server's directory: the pid of the process that started it."""
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"
"""The OS user the server runs as when the tests run as root; also the cluster's superuser."""


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def bin_dir() -> Path:
    """The directory with ``initdb`` and ``postgres``; raises PostgresMissing."""
    configured = os.environ.get(PG_BIN_ENV)
    candidates = [Path(configured)] if configured else []
    if not configured and DEBIAN_PG_ROOT.is_dir():
        versions = [p for p in DEBIAN_PG_ROOT.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    raise PostgresMissing(
        f"no PostgreSQL server binaries (initdb, postgres) in {PG_BIN_ENV} or "
        f"{DEBIAN_PG_ROOT}/<version>/bin: install Debian's `postgresql` package "
        "(`make postgresql` does)"
    )


def _as_server_user() -> dict[str, Any]:
    """Popen arguments that drop root to the server's user (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresMissing(
            f"running as root and there is no `{SERVER_USER}` user for PostgreSQL to run as"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (a postmaster's backends lead their own sessions, so
    its process group does not hold them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _kill_server(pid: int) -> list[int]:
    """SIGKILLs a postmaster and its backends at once; returns their pids."""
    pids = [pid, *_children(pid)]
    for each in pids:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def reap_abandoned() -> None:
    """Kills the servers of test sessions that died without closing them (a SIGKILLed pytest)
    and removes their files."""
    for base in Path(tempfile.gettempdir()).glob(f"{BASE_PREFIX}*"):
        try:
            owner = int((base / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # being created, or not one of these
        if not _gone(owner):
            continue
        try:
            postmaster = int((base / "data" / "postmaster.pid").read_text().split()[0])
            command = Path(f"/proc/{postmaster}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            postmaster, command = 0, b""
        if postmaster and str(base).encode() in command:  # not a reused pid
            _kill_server(postmaster)
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1, trust authentication. fsync is off: what a
    transaction commits is in the OS's hands, so it survives ``kill()`` (not a machine crash).

    ``start()`` creates the cluster the first time; ``stop()`` shuts it down cleanly, ``kill()``
    SIGKILLs the server and every backend (a crash), ``restart()`` stops or kills and starts it
    again on the same port and data. ``close()`` stops it and removes its files.
    """

    port: int = field(default_factory=free_port)
    base: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    # A database that new ones copy by default (create_dagster_template).
    template: str | None = None

    @property
    def data_dir(self) -> Path:
        assert self.base is not None, "not started"
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        assert self.base is not None, "not started"
        return self.base / "server.log"

    def url(self, database: str = "postgres", port: int | None = None) -> str:
        """A SQLAlchemy/libpq URL of ``database``; ``port``: a relay in front of this server."""
        return f"postgresql://{SERVER_USER}@127.0.0.1:{port or self.port}/{database}"

    def _init(self) -> None:
        run_as = _as_server_user()
        binaries = bin_dir()
        reap_abandoned()
        self.base = Path(tempfile.mkdtemp(prefix=BASE_PREFIX))
        (self.base / OWNER_FILE).write_text(str(os.getpid()))
        if run_as:
            os.chown(self.base, run_as["user"], run_as["group"])
        command = [str(binaries / "initdb"), "-D", str(self.data_dir), "-U", SERVER_USER]
        command += ["-A", "trust", "-E", "UTF8", "--locale", "C", "--no-sync"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.base, **run_as)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> PostgresServer:
        if self.base is None:
            self._init()
        command = [str(bin_dir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for setting in (
            "listen_addresses=127.0.0.1",
            "unix_socket_directories=",
            "fsync=off",
            "full_page_writes=off",
            "max_connections=200",
        ):
            command += ["-c", setting]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                start_new_session=True,
                **_as_server_user(),
            )
        wait_for(self._accepting, 60, f"PostgreSQL on port {self.port} to accept connections")
        return self

    def _accepting(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.process.returncode}: {self.log_tail()}")
        try:
            self.execute("SELECT 1")
        except Exception:
            return False
        return True

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Runs one statement outside a transaction (CREATE/DROP DATABASE need that); returns
        its rows."""
        import psycopg2

        conn = psycopg2.connect(self.url(database), connect_timeout=2)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return list(cursor.fetchall()) if cursor.description else []
        finally:
            conn.close()

    def stop(self, timeout: float = 30) -> None:
        """A clean ("fast") shutdown: open sessions are ended, the data is kept."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server and each of its processes at once, as a crash would."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        pids = _kill_server(process.pid)
        process.wait()
        # Not before every backend is gone: a new server refuses shared memory still attached.
        wait_for(lambda: all(_gone(pid) for pid in pids), 10, "the server's processes to die")

    def restart(self, crash: bool = False) -> PostgresServer:
        if crash:
            self.kill()
        else:
            self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """A new database, a copy of ``template`` (default: ``self.template``, if set); returns
        its name."""
        name = name or f"t_{os.urandom(6).hex()}"
        template = template or self.template
        copy = f' TEMPLATE "{template}"' if template else ""
        self.execute(f'CREATE DATABASE "{name}"{copy}')
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a client that outlived its test (a killed step's backend) must not keep it.
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_dagster_yaml(home: Path, postgres_url: str) -> Path:
    """A ``DAGSTER_HOME`` whose runs, event log and schedules live in ``postgres_url``
    (compute logs and local artifacts stay in the directory)."""
    home.mkdir(parents=True, exist_ok=True)
    # JSON strings are YAML strings: the URL needs no escaping of its own.
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\n"
        f"storage:\n  postgres:\n    postgres_url: {json.dumps(postgres_url)}\n"
    )
    return home


def tcp_connections(pid: int, port: int) -> int:
    """How many established TCP connections process ``pid`` has open to ``port`` on this host
    (e.g. to the server, or to a relay): its socket descriptors matched against the kernel's
    connection table."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    established = "01"
    count = 0
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == established and fields[9] in inodes:
                count += 1
    return count


def create_dagster_template(server: PostgresServer, name: str = "dagster_template") -> str:
    """A database with Dagster's schema already in it, to copy for each test
    (``create_database(template=...)``): Dagster creates and stamps its tables on first use,
    about 2 s, and a copy takes a tenth of that."""
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    server.create_database(name)
    with tempfile.TemporaryDirectory() as home:
        write_dagster_yaml(Path(home), server.url(name))
        # Open and closed again: a template must have no connections when it is copied.
        DagsterInstance.from_ref(InstanceRef.from_dir(home)).dispose()
    return name


class TcpRelay:
    """Forwards 127.0.0.1:``port`` to ``target``; what a test points one client at to take
    that client (and no other) off the network.

    ``cut()`` closes the listener and every open connection, so the client's connections
    break and new ones are refused; ``restore()`` listens on the same port again.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.accepted = 0

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def start(self) -> TcpRelay:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(
            target=self._accept, args=(listener,), name="relay-accept", daemon=True
        ).start()
        return self

    restore = start

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            _close(sock)

    close = cut

    def open_connections(self) -> int:
        with self._lock:
            return len(self._open) // 2

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _close(client)
                    _close(server)
                    return
                self._open.update((client, server))
                self.accepted += 1
            for source, sink in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), name="relay-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._open.discard(source)
            self._open.discard(sink)
        _close(source)
        _close(sink)

    def __enter__(self) -> TcpRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(sock: socket.socket) -> None:
    """Shut down first: a thread blocked in accept or recv on the socket wakes up."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
