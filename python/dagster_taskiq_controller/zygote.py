"""The warm pool's zygote: a long-lived, single-threaded process that has imported Dagster (and
the configured preload modules) once and forks one child per step (docs/protocol.md, section 3).

Run by the controller as ``python -m dagster_taskiq_controller.zygote [--preload MODULE]...``
with one end of a Unix stream socket as its stdin. Requests are JSON lines; each ``spawn``
carries three file descriptors (SCM_RIGHTS): the write ends of the step's stdout and stderr
pipes and the read end of its control pipe. The child:

- leads its own process group (the controller stops it with ``killpg``, as for cold steps);
- writes to the controller's pipes, reads /dev/null;
- runs nothing until the controller writes ``g`` on the control pipe (so a child whose zygote
  died before reporting it never runs) and kills its group when that pipe reaches EOF (the
  controller died: a step never outlives it, whoever its parent is);
- runs ``dagster api execute_step`` in-process, through Dagster's own click command, with the
  request's environment over the zygote's, and SIGTERM guarded as ``stop_guard`` does for a
  cold step.

The zygote reaps its children and reports their wait status; before reaping one it kills what is
left of the child's process group, so a step leaves no processes behind. It never runs user steps
itself, so nothing a step does (globals, environment, monkeypatching, crashing) reaches the next
one.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from dagster_taskiq_controller import stop_guard

FDS_PER_SPAWN = 3
MAX_FDS_PER_READ = 64
READ_SIZE = 1 << 16
GO = b"g"
# Exit code of a child told not to run (its zygote died before reporting it, or the controller
# gave up on it): EX_TEMPFAIL.
NOT_STARTED_EXIT = 75
# Modules every step imports; loading them here is most of what "warm" buys.
STEP_MODULES = (
    "dagster",
    "dagster._cli",
    "dagster._cli.api",
    "dagster._core.execution.api",
    "dagster._core.execution.plan.execute_plan",
    "dagster._core.instance",
    "dagster._core.storage.runs.sqlite.sqlite_run_storage",
    "dagster._core.storage.event_log.sqlite.sqlite_event_log",
    "dagster._core.storage.schedules.sqlite.sqlite_schedule_storage",
    "dagster._core.storage.local_compute_log_manager",
    "dagster._core.storage.fs_io_manager",
    "dagster._core.run_coordinator",
    "dagster._core.launcher",
    "sqlalchemy",
    "sqlalchemy.dialects.sqlite",
    "alembic",
    # Imported lazily while the step opens its instance and loads its job (Dagster 1.13):
    # a third of a warm step's start when left to each child.
    "dagster._core.instance.factory",
    "dagster._core.storage.root",
    "dagster._core.storage.sqlite_storage",
    "dagster._core.system_config.composite_descent",
    "dagster._core.definitions.repository_definition.repository_data_builder",
    "dagster._core.workspace.autodiscovery",
    "dagster._core.utility_ops",
    "dagster._utils.temp_file",
    "dagster._utils.test.definitions",
    "upath",
    "fsspec",
)


def log(message: str) -> None:
    """The zygote's own log lines (its stderr is forwarded to the controller's log)."""
    sys.stderr.write(f"zygote[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


def rss_bytes() -> int:
    """Current resident set size (the controller recycles a zygote that grows)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def preload(name: str) -> None:
    """Imports a module by name, or a ``.py`` file the way Dagster loads ``python_file`` code
    (module named after the file), so a step that loads the same file finds it imported."""
    if name.endswith(".py") or os.sep in name:
        from dagster._core.code_pointer import load_python_file

        load_python_file(str(Path(name).resolve()), working_directory=None)
    else:
        __import__(name)


def share_alembic_scripts() -> None:
    """Load Dagster's alembic migration scripts once, here, for every child to reuse.

    Dagster checks the schema of each SQLite file a process opens (the run, index and schedule
    databases, and each run's event-log shard) against the head revision of its migration
    scripts, and alembic reads every script file again for each check: about half a second
    of each warm step's start on a 2-core machine. The installed scripts cannot change while
    the zygote lives, so ``ScriptDirectory.from_config`` hands out one shared, already-read
    directory per configuration.
    """
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from dagster._core.storage.event_log.sqlite import sqlite_event_log
    from dagster._core.storage.sql import get_alembic_config

    load = ScriptDirectory.from_config.__func__  # type: ignore[attr-defined]
    loaded: dict[tuple[Any, ...], ScriptDirectory] = {}

    def from_config(cls: type[ScriptDirectory], config: Config) -> ScriptDirectory:
        key = (
            cls,
            config.get_main_option("script_location"),
            config.get_main_option("version_locations"),
        )
        script = loaded.get(key)
        if script is None:
            script = loaded[key] = load(cls, config)
        return script

    ScriptDirectory.from_config = classmethod(from_config)  # type: ignore[method-assign,assignment]
    ScriptDirectory.from_config(get_alembic_config(sqlite_event_log.__file__)).get_heads()


def share_instance() -> None:
    """Open the ``DAGSTER_HOME`` instance once, before forking, and hand it to every step whose
    args carry the same instance ref.

    A step would otherwise build all of the instance's storages again (about 0.1 s of its
    start). Only SQLite storages are shared: their engines keep no connection open (NullPool),
    so nothing open crosses the fork, and each child works on its own copy. Other storages are
    opened, queried and closed, which still leaves their modules and SQLAlchemy's first-use
    set-up in place for the children; dagster-postgres opens a connection per operation
    (NullPool), so no PostgreSQL connection is left open to be shared across the fork.
    """
    if not os.environ.get("DAGSTER_HOME"):
        return
    from dagster import DagsterInstance
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
    from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage

    try:
        instance = DagsterInstance.get()
        runs = instance.get_runs(limit=1)
        if runs:
            instance.get_records_for_run(runs[0].run_id, limit=1)
        shareable = isinstance(instance.run_storage, SqliteRunStorage) and isinstance(
            instance.event_log_storage, SqliteEventLogStorage
        )
        ref = instance.get_ref()
    except Exception as exc:  # a slower step start, not a broken zygote
        log(f"could not open the Dagster instance ahead of the steps: {exc}")
        return
    if not shareable:
        instance.dispose()
        return
    build = DagsterInstance.from_ref

    def from_ref(instance_ref: Any) -> DagsterInstance:
        return instance if instance_ref == ref else build(instance_ref)

    DagsterInstance.from_ref = staticmethod(from_ref)  # type: ignore[method-assign]


# Dagster's SQLite storages, which build a new SQLAlchemy engine for every connection.
SQLITE_STORAGE_MODULES = (
    "dagster._core.storage.runs.sqlite.sqlite_run_storage",
    "dagster._core.storage.event_log.sqlite.sqlite_event_log",
    "dagster._core.storage.event_log.sqlite.consolidated_sqlite_event_log",
    "dagster._core.storage.schedules.sqlite.sqlite_schedule_storage",
)


def share_sqlite_engines() -> None:
    """One SQLAlchemy engine per SQLite database for the zygote and every step, instead of a
    new one per connection.

    Dagster's SQLite storages build an engine for each connection they open: a step writes
    about ten events, and each engine starts with an empty statement cache, so every insert
    is compiled again, and every engine runs the dialect's first-connect set-up. Only engines
    without a pool (``NullPool``) are shared: they hold no connection between uses, so nothing
    open crosses a fork, and each process still opens its own connection for each use.
    """
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    build = sqlalchemy.create_engine
    engines: dict[tuple[str, str], Any] = {}

    def create_engine(url: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs.get("poolclass") is not NullPool or not str(url).startswith("sqlite"):
            return build(url, *args, **kwargs)
        key = (str(url), repr(sorted((k, repr(v)) for k, v in kwargs.items())))
        engine = engines.get(key)
        if engine is None:
            engine = engines[key] = build(url, **kwargs)
        return engine

    for name in SQLITE_STORAGE_MODULES:
        module = sys.modules.get(name)
        if module is None:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
        if getattr(module, "create_engine", None) is build:
            module.create_engine = create_engine  # type: ignore[attr-defined]


def skip_tail_orphan_watchers() -> None:
    """Start compute-log mirroring in the steps without Dagster's orphan watcher processes.

    For each captured stream Dagster starts ``tail -F`` plus a second Python interpreter whose
    only job is to kill that tail if the step dies without cleaning up: two interpreter starts
    per step, about a tenth of a CPU second, on the critical path of every warm step. Here the
    zygote does that job instead: when a step ends it kills what is left of the step's process
    group (``sweep_group``), the tails included.
    """
    import subprocess
    from contextlib import contextmanager

    from dagster._core.execution import compute_logs

    fileno = getattr(compute_logs, "_fileno", None)
    clean_up = getattr(compute_logs, "_clean_up_subprocess", None)
    if not hasattr(compute_logs, "execute_posix_tail") or fileno is None or clean_up is None:
        log("compute-log tails keep their orphan watchers (unknown Dagster layout)")
        return

    @contextmanager
    def execute_posix_tail(path: str, stream: Any) -> Iterator[tuple[int, None]]:
        tail = subprocess.Popen(
            ["tail", "-F", "-c", "+0", path], stdout=stream if fileno(stream) else None
        )
        try:
            yield (tail.pid, None)
        finally:
            # Dagster's knob for output that tail has not copied yet (dagster#23336).
            time.sleep(float(os.getenv("DAGSTER_COMPUTE_LOG_TAIL_WAIT_AFTER_FINISH", "0")))
            clean_up(tail)

    compute_logs.execute_posix_tail = execute_posix_tail


def sweep_group(pid: int) -> None:
    """Kill whatever is left in an ended step's process group (compute-log tails, a step's
    stray background processes). Called before the step is reaped: while it is a zombie its
    pid, which is the group's id, cannot be reused, so only the step's own group is hit."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        # Not ProcessLookupError alone (as ecs_entrypoint.signal_group): a member that changed
        # its uid gives EPERM, and the zygote must go on serving.
        pass


def decode_status(status: int) -> dict[str, int]:
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    if os.WIFEXITED(status):
        return {"exit_code": os.WEXITSTATUS(status)}
    return {"exit_code": -1}


class Zygote:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.buffer = b""
        self.fds: deque[int] = deque()
        self.poller = select.poll()
        self.poller.register(control.fileno(), select.POLLIN)
        # pidfd -> child pid, so the loop wakes when a child exits (no SIGCHLD handler to
        # inherit and undo in the children).
        self.children: dict[int, int] = {}
        self.forks = 0

    def send(self, message: dict[str, Any]) -> None:
        self.control.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def serve(self) -> None:
        while True:
            for fd, _events in self.poller.poll():
                if fd == self.control.fileno():
                    if not self.read_requests():
                        log("control socket closed; exiting")
                        return
                else:
                    self.reap(fd)

    def read_requests(self) -> bool:
        """Reads what is available; handles complete lines. False on EOF."""
        data, ancdata, flags, _ = self.control.recvmsg(
            READ_SIZE, socket.CMSG_SPACE(MAX_FDS_PER_READ * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                self.fds.extend(
                    int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, usable, 4)
                )
        if flags & socket.MSG_CTRUNC:
            # Descriptors were lost: their requests can no longer be matched to them.
            raise RuntimeError("control message truncated: file descriptors lost")
        if not data:
            return False
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                self.handle(json.loads(line))
        return True

    def handle(self, request: dict[str, Any]) -> None:
        op = request.get("op")
        if op == "spawn":
            if len(self.fds) < FDS_PER_SPAWN:
                raise RuntimeError("spawn request without its file descriptors")
            fds = [self.fds.popleft() for _ in range(FDS_PER_SPAWN)]
            self.spawn(request["id"], request.get("env") or {}, fds)
        elif op == "ping":
            self.send({"op": "pong", "id": request.get("id"), "rss_bytes": rss_bytes()})
        else:
            raise RuntimeError(f"unknown request {op!r}")

    def spawn(self, request_id: int, env: dict[str, str], fds: list[int]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self.send(
                {"op": "spawn_failed", "id": request_id, "error": str(exc), "errno": exc.errno}
            )
            return
        if pid == 0:
            self.become_step(env, fds)
        # Both sides set the group, so the controller can signal it as soon as it has the pid.
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass  # the child did it first, or already exited
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        self.forks += 1
        self.send(
            {
                "op": "spawned",
                "id": request_id,
                "pid": pid,
                "forks": self.forks,
                "rss_bytes": rss_bytes(),
            }
        )

    def reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        sweep_group(pid)
        _, status = os.waitpid(pid, 0)
        self.send({"op": "exited", "pid": pid, **decode_status(status)})

    def become_step(self, env: dict[str, str], fds: list[int]) -> NoReturn:
        """In the forked child: never returns into the zygote's loop."""
        code = 70  # EX_SOFTWARE, if setup itself fails
        try:
            stdout_w, stderr_w, control_r = fds
            os.setpgid(0, 0)
            # Nothing of the zygote's may stay open here: a held control socket would hide the
            # zygote's death, a held pipe of another step would delay that step's EOF.
            for fd in (self.control.fileno(), *self.children, *self.fds):
                try:
                    os.close(fd)
                except OSError:
                    pass
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(stdout_w, 1)
            os.dup2(stderr_w, 2)
            for fd in (devnull, stdout_w, stderr_w):
                os.close(fd)
            # A fresh interpreter's signal dispositions.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if os.read(control_r, 1) != GO:
                os._exit(NOT_STARTED_EXIT)
            threading.Thread(
                target=_die_with_controller,
                args=(control_r,),
                name="controller-lifeline",
                daemon=True,
            ).start()
            os.environ.update(env)
            # SIGTERM that Dagster did not ask for ends the step without an interrupt failure.
            stop_guard.install()
            code = run_execute_step()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            _flush()
            os._exit(code)


def _die_with_controller(control_r: int) -> None:
    """Blocks until the controller's end of the control pipe closes, then kills the step's
    group: the controller is gone, and a step never runs without it."""
    while True:
        try:
            if not os.read(control_r, 64):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os.killpg(0, signal.SIGKILL)


def run_execute_step() -> int:
    """``dagster api execute_step`` through Dagster's own CLI, in this process; returns the
    exit status a fresh ``python -m dagster api execute_step`` would have had."""
    from dagster._cli import ENV_PREFIX, cli

    sys.argv = ["dagster", "api", "execute_step"]
    try:
        cli.main(args=["api", "execute_step"], prog_name="dagster", auto_envvar_prefix=ENV_PREFIX)
        code: int = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    # What interpreter shutdown would do: wait for non-daemon threads, run atexit hooks.
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    import atexit

    atexit._run_exitfuncs()
    return code


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dagster_taskiq_controller.zygote")
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE")
    args = parser.parse_args(argv)
    # The control socket arrives as stdin; keep it off fd 0 so nothing reads it by mistake.
    control = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    started = time.monotonic()
    try:
        for name in STEP_MODULES:
            try:
                __import__(name)
            except ImportError as exc:
                # Another Dagster version may not have it: a slower step, not a broken one.
                log(f"not preloaded: {name} ({exc})")
        share_alembic_scripts()
        share_sqlite_engines()
        share_instance()
        skip_tail_orphan_watchers()
        for name in args.preload:
            preload(name)
    except BaseException as exc:
        log(f"preload failed: {traceback.format_exc()}")
        control.sendall(
            json.dumps({"op": "failed", "error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n"
        )
        return 1
    if threading.active_count() > 1:
        log(
            f"warning: {threading.active_count()} threads after preload; forking is only safe "
            "from a single-threaded process"
        )
    # Objects that exist now are shared with every child; keep the collector from touching
    # (and so copying) their pages.
    gc.collect()
    gc.freeze()
    import dagster

    zygote = Zygote(control)
    zygote.send(
        {
            "op": "ready",
            "pid": os.getpid(),
            "dagster_version": dagster.__version__,
            "preloaded": list(args.preload),
            "rss_bytes": rss_bytes(),
            "load_seconds": round(time.monotonic() - started, 3),
        }
    )
    try:
        zygote.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
