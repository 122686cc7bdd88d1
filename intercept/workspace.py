"""This machine's intercepts: the registry of running ``intercept start`` processes, and
``intercept up`` / ``down`` for the intercepts of an ``intercept.yaml``.

The CLI (``up``, ``down``, ``status``, ``leave``, ``vscode``), CDE hooks and the tests
all call the functions here.

State lives in one directory (:func:`state_dir`: ``$INTERCEPT_STATE_DIR``, else
``$XDG_STATE_HOME/intercept``, else ``~/.local/state/intercept``), mode 0700:

- ``intercepts/PID.json``: one per running ``intercept start`` (:func:`register`).
- ``workspaces/ID.json``: one per workspace that ``up`` brought up (ID: a hash of the
  file's absolute path): the file, the digest of its resolved intercepts, the
  supervising process and each intercept's process. Beside it ``ID.lock`` (``up`` and
  ``down`` of one workspace take turns) and ``ID.log`` (the default ``--log-file``).

Every file is written atomically (a temporary file renamed over it), mode 0600.

Invariants:

- A process is named by its pid *and* its start time (``/proc/PID/stat``), so a pid
  reused by another process is never mistaken for ours, signalled or reported alive.
  A zombie counts as gone.
- A registry file whose process is gone is stale: :func:`entries` deletes it.
- ``up`` runs one supervisor per workspace: the ``up`` process itself in the foreground,
  or (``--detach``) a background copy of it in its own session, writing to the log
  file. The supervisor starts one ``intercept start`` child per intercept (each in its
  own session), relays their lines prefixed with ``[SERVICE]``, and stops them on
  SIGINT/SIGTERM. If one fails before every intercept is ready, the others are stopped
  and nothing is left running.
- ``up`` is idempotent: a workspace whose state records the same digest, whose
  supervisor and intercepts are all alive, is left alone ("already up").

Library code: lines go to the ``report`` callback, never to stdout (except for the
background supervisor, whose stdout is the log file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from intercept.errors import InterceptError, UsageError
from intercept.spec import DEFAULT_FILE, InterceptSpec, WorkspaceSpec, load_workspace, resolve_workspace, to_args
from intercept.vscode import write_vscode

__all__ = [
    "STATUS_FIELDS",
    "Entry",
    "NotRunning",
    "Registration",
    "UpFailed",
    "WorkspaceState",
    "digest",
    "down",
    "entries",
    "leave",
    "register",
    "state_dir",
    "status",
    "up",
    "vscode",
    "workspaces",
]

log = logging.getLogger(__name__)

STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
READY_LINE = "intercept: ready: "
ERROR_LINE = "intercept: error: "

Report = Callable[[str], None]


class UpFailed(InterceptError):
    """An intercept of the workspace failed before every one was ready; the exit code is that intercept's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code or 1


class NotRunning(InterceptError):
    """No intercept on this machine matches what was named."""

    exit_code = 1


# --- places and processes ------------------------------------------------------------------


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where this machine's intercepts are recorded: ``$INTERCEPT_STATE_DIR``, else
    ``$XDG_STATE_HOME/intercept``, else ``~/.local/state/intercept``."""
    env = os.environ if env is None else env
    if env.get("INTERCEPT_STATE_DIR"):
        return Path(env["INTERCEPT_STATE_DIR"]).expanduser()
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]).expanduser() / "intercept"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".local" / "state" / "intercept"


def _directory(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_HAS_PROC = Path("/proc/self/stat").exists()


def _process_start(pid: int) -> str | None:
    """The start time of live process ``pid`` (clock ticks since boot), ``""`` where
    there is no /proc to tell, ``None`` when there is no such process or it is a zombie."""
    if pid <= 0:
        return None
    if not _HAS_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "PID (COMM) STATE ... field 22 = starttime"; COMM may hold spaces and parentheses.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` is still the process that started at ``started``."""
    now = _process_start(pid)
    return now is not None and (not started or not now or now == started)


def _send(pid: int, started: str | None, sig: int, *, group: bool = False) -> None:
    """Signal ``pid`` (its process group with ``group``, when it leads one), only if it is still ours."""
    if not _alive(pid, started):
        return
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _pause_for_exit(pid: int, timeout: float) -> None:
    """Return when ``pid`` exits or after ``timeout`` (a pidfd where the OS has them)."""
    try:
        fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        time.sleep(min(timeout, 0.05))
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _wait_gone(processes: Sequence[tuple[int, str | None]], timeout: float) -> list[int]:
    """Wait until every ``(pid, start)`` is gone, at most ``timeout`` s; the pids still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [(pid, started) for pid, started in processes if _alive(pid, started)]
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            return [pid for pid, _ in alive]
        _pause_for_exit(alive[0][0], min(left, 1.0))


def _stop(processes: Sequence[tuple[int, str | None]], grace: float = STOP_GRACE) -> list[int]:
    """SIGTERM, wait ``grace``, then SIGKILL (the process group of a group leader): the pids that needed SIGKILL."""
    for pid, started in processes:
        _send(pid, started, signal.SIGTERM)
    stubborn = _wait_gone(processes, grace)
    killed = [(pid, started) for pid, started in processes if pid in stubborn]
    for pid, started in killed:
        log.warning("pid %d did not stop within %gs of SIGTERM; killing it", pid, grace)
        _send(pid, started, signal.SIGKILL, group=True)
    _wait_gone(killed, grace)
    return stubborn


def _write_json(path: Path, data: object) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600."""
    _directory(path.parent)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("ignoring %s: %s", path, error)
        return None


def _unwritable(path: Path, error: OSError) -> InterceptError:
    return InterceptError(f"cannot write {path}: {error.strerror or error}; "
                          "set INTERCEPT_STATE_DIR to a directory you can write")


class _Lock:
    """An exclusive ``flock`` on a file: ``up`` and ``down`` of one workspace take turns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            _directory(self.path.parent)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise _unwritable(self.path, error) from None
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> _Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- the registry --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One running intercept of this machine: an ``intercept start`` process.

    ``process_start`` identifies the process together with ``pid`` (see
    :func:`_process_start`). ``workspace`` and ``log_file`` are set for the intercepts
    of ``up``; ``exit_code`` once such an intercept has ended. ``route`` is the route
    as ``intercept start`` describes it (``requests with x-dev: alice``).
    """

    pid: int
    process_start: str | None = None
    started_at: str = ""
    service: str | None = None
    agent: str | None = None
    namespace: str | None = None
    context: str | None = None
    route: str | None = None
    name: str | None = None
    local_port: int | None = None
    command: tuple[str, ...] = ()
    log_file: str | None = None
    workspace: str | None = None
    exit_code: int | None = None
    file: Path | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """How the user names it: the Service, else the agent's address."""
        if self.service:
            return self.service
        return f"agent {self.agent}" if self.agent else f"pid {self.pid}"

    @property
    def alive(self) -> bool:
        return _alive(self.pid, self.process_start)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid, "process_start": self.process_start, "started_at": self.started_at,
            "service": self.service, "agent": self.agent, "namespace": self.namespace, "context": self.context,
            "route": self.route, "name": self.name, "local_port": self.local_port, "command": list(self.command),
            "log_file": self.log_file, "workspace": self.workspace, "exit_code": self.exit_code,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], file: Path | None = None) -> Entry:
        known = {k: data[k] for k in REGISTER_FIELDS + ("process_start", "exit_code") if k in data}
        known["pid"] = int(known["pid"])
        known["command"] = tuple(known.get("command") or ())
        return cls(**known, file=file)


# What register() accepts; pid defaults to this process, started_at to now.
REGISTER_FIELDS: tuple[str, ...] = ("pid", "started_at", "service", "agent", "namespace", "context", "route",
                                    "name", "local_port", "command", "log_file", "workspace")


def _registry(env: Mapping[str, str] | None) -> Path:
    return state_dir(env) / "intercepts"


@dataclass
class Registration:
    """A registered intercept; :meth:`remove` (or leaving the ``with`` block) unregisters it."""

    entry: Entry
    file: Path | None

    def remove(self) -> None:
        if self.file is not None:
            self.file.unlink(missing_ok=True)
            self.file = None

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register(entry: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Registration:
    """Record a running ``intercept start`` process (``entry["pid"]``, default this one).

    Keys: :data:`REGISTER_FIELDS`. An unknown key or a pid that is not a live process
    is a bug (``ValueError``). When the state directory cannot be written, the intercept
    still works: the problem is logged and the registration records nothing.
    """
    unknown = set(entry) - set(REGISTER_FIELDS)
    if unknown:
        raise ValueError(f"register(): unknown keys {sorted(unknown)}; the keys are {', '.join(REGISTER_FIELDS)}")
    data = dict(entry)
    data.setdefault("pid", os.getpid())
    data.setdefault("started_at", _now())
    data["process_start"] = _process_start(int(data["pid"]))
    if data["process_start"] is None:
        raise ValueError(f"register(): no running process {data['pid']}")
    for key in ("log_file", "workspace"):
        if data.get(key) is not None:
            data[key] = str(data[key])
    record = Entry.from_json(data)
    file = _registry(env) / f"{record.pid}.json"
    try:
        _write_json(file, record.to_json())
    except OSError as error:
        log.warning("cannot record this intercept in %s (%s); intercept status and leave will not see it",
                    file.parent, error.strerror or error)
        return Registration(record, None)
    return Registration(replace(record, file=file), file)


def entries(env: Mapping[str, str] | None = None) -> list[Entry]:
    """The registered intercepts whose process still runs; stale files are deleted."""
    found = []
    directory = _registry(env)
    for file in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        data = _read_json(file)
        try:
            entry = Entry.from_json(data, file)
        except (TypeError, KeyError, ValueError):
            log.warning("ignoring %s: not an intercept record", file)
            continue
        if entry.alive:
            found.append(entry)
        else:
            file.unlink(missing_ok=True)
    return sorted(found, key=lambda e: (e.started_at, e.pid))


# --- workspaces ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkspaceState:
    """What ``up`` started for one ``intercept.yaml`` (the file ``workspaces/ID.json``)."""

    path: str  # the absolute path of intercept.yaml
    digest: str
    status: str  # "starting", then "up" once every intercept is ready
    supervisor: int
    supervisor_start: str | None
    log_file: str | None
    started_at: str
    intercepts: tuple[Entry, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "digest": self.digest, "status": self.status,
            "supervisor": {"pid": self.supervisor, "process_start": self.supervisor_start},
            "log_file": self.log_file, "started_at": self.started_at,
            "intercepts": [e.to_json() for e in self.intercepts],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkspaceState:
        return cls(path=data["path"], digest=data["digest"], status=data["status"],
                   supervisor=int(data["supervisor"]["pid"]), supervisor_start=data["supervisor"]["process_start"],
                   log_file=data.get("log_file"), started_at=data.get("started_at", ""),
                   intercepts=tuple(Entry.from_json(e) for e in data.get("intercepts", ())))

    @property
    def processes(self) -> list[tuple[int, str | None]]:
        """The supervisor first, then the intercepts."""
        return [(self.supervisor, self.supervisor_start), *((e.pid, e.process_start) for e in self.intercepts)]

    def anything_alive(self) -> bool:
        return any(_alive(pid, started) for pid, started in self.processes)


def _workspace_id(path: Path) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()[:16]


def _workspaces_dir(env: Mapping[str, str] | None) -> Path:
    return state_dir(env) / "workspaces"


def _read_state(file: Path) -> WorkspaceState | None:
    data = _read_json(file)
    if data is None:
        return None
    try:
        return WorkspaceState.from_json(data)
    except (TypeError, KeyError, ValueError):
        log.warning("ignoring %s: not a workspace record", file)
        return None


def workspaces(env: Mapping[str, str] | None = None) -> list[WorkspaceState]:
    """The workspaces ``up`` brought up whose processes (some of them) still run; stale records are deleted."""
    directory = _workspaces_dir(env)
    found = []
    for file in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        state = _read_state(file)
        if state is None:
            continue
        if state.anything_alive():
            found.append(state)
        else:
            file.unlink(missing_ok=True)
    return found


def digest(workspace: WorkspaceSpec) -> str:
    """What makes two ``up`` runs the same: each intercept's ``intercept start``
    arguments and directory, after the file and the environment are applied (a comment
    or a reordered key in the file changes nothing)."""
    plan = [[str(spec.directory), to_args(spec)] for spec in workspace.intercepts]
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


def _labels(specs: Sequence[InterceptSpec]) -> list[str]:
    names = [spec.service or f"agent {spec.agent}" for spec in specs]
    return [f"{n}#{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _not_up_because(state: WorkspaceState, wanted: str) -> str | None:
    """Why ``state`` is not the workspace ``wanted`` up and well (``None``: it is)."""
    if state.digest != wanted:
        return "its intercepts changed since it was brought up"
    if state.status != "up" or not _alive(state.supervisor, state.supervisor_start):
        return "it was not completely up"
    dead = [e.label for e in state.intercepts if not e.alive]
    if dead:
        return f"{', '.join(dead)} {'is' if len(dead) == 1 else 'are'} no longer running"
    return None


def up(path: Path, env: Mapping[str, str] | None = None, *, detach: bool, log_file: Path | None = None,
       report: Report = lambda line: None) -> int:
    """Bring up the intercepts of ``intercept.yaml`` at ``path``; never prompts.

    Already up (same file, same resolved intercepts, all alive): reports so and returns
    0. A previous run of the same file that changed or lost an intercept is stopped
    first. With ``detach``: returns 0 once every intercept is ready, the intercepts
    running on in the background (output to ``log_file``, default
    ``STATE/workspaces/ID.log``). Without: relays the intercepts' lines until
    SIGINT/SIGTERM (then 0) or until every intercept ended (the first non-zero status).

    Raises :class:`~intercept.errors.SpecError` for a bad file (nothing started) and
    :class:`UpFailed` (the failing intercept's message and exit code) when one failed
    before all were ready; then nothing is left running.
    """
    env = dict(os.environ if env is None else env)
    workspace = resolve_workspace(load_workspace(path, env), env, {})
    absolute = path.resolve()
    wanted = digest(workspace)
    wid = _workspace_id(absolute)
    directory = _workspaces_dir(env)
    state_file = directory / f"{wid}.json"
    lock = _Lock(directory / f"{wid}.lock")
    lock.acquire()
    try:
        state = _read_state(state_file)
        if state is not None:
            reason = _not_up_because(state, wanted)
            if reason is None:
                pids = ", ".join(f"{e.label} pid {e.pid}" for e in state.intercepts)
                report(f"intercept: up: {path} is already up ({pids}); nothing to do")
                return 0
            if state.anything_alive():
                report(f"intercept: up: {path}: {reason}; restarting its intercepts")
                _stop(state.processes)
            state_file.unlink(missing_ok=True)
        if detach:
            return _detach(path, absolute, env, log_file or directory / f"{wid}.log", report)
        supervisor = _Supervisor(workspace, shown=str(path), absolute=absolute, digest=wanted,
                                 state_file=state_file, log_file=log_file, env=env, emit=report, tee=True)
        return asyncio.run(supervisor.run(on_ready=lock.release))
    finally:
        lock.release()


class _Interrupted(Exception):
    pass


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`_Interrupted` meanwhile (in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted()

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _detach(shown: Path, absolute: Path, env: Mapping[str, str], log_file: Path, report: Report) -> int:
    """Start the supervisor in the background and relay its lines until it says ready or failed."""
    _directory(log_file.parent)
    notices_fd, notify_fd = os.pipe()
    # -c rather than -m: this module may already be imported by the package, and must not run twice.
    argv = [sys.executable, "-c", "import sys; from intercept.workspace import _serve; sys.exit(_serve(sys.argv[1:]))",
            "--notify-fd", str(notify_fd), "--log-file", str(log_file), "--shown", str(shown), str(absolute)]
    try:
        try:
            log_out = open(log_file, "ab")
        except OSError as error:
            raise InterceptError(f"cannot write the log file {log_file}: {error.strerror or error}; "
                                 "name another with --log-file") from None
        with log_out:
            daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_out, stderr=subprocess.STDOUT,
                                      env={**env, "PYTHONUNBUFFERED": "1"}, cwd=absolute.parent,
                                      start_new_session=True, pass_fds=(notify_fd,))
    finally:
        os.close(notify_fd)
    with os.fdopen(notices_fd, "rb") as notices:
        try:
            with _interruptible():
                for raw in notices:
                    kind, _, rest = raw.decode(errors="replace").rstrip("\n").partition(" ")
                    if kind == "line":
                        report(rest)
                    elif kind == "ready":
                        daemon.returncode = 0  # it runs on, on purpose: no "still running" warning
                        return 0
                    elif kind == "failed":
                        code, _, message = rest.partition(" ")
                        daemon.wait()
                        raise UpFailed(message, int(code))
        except _Interrupted:
            daemon.terminate()  # the supervisor stops what it started
            daemon.wait()
            raise InterceptError(f"interrupted; the intercepts of {shown} were stopped") from None
    code = daemon.wait()
    raise InterceptError(f"the background process of intercept up exited with status {code} before the "
                         f"intercepts of {shown} were ready; its output is in {log_file}")


@dataclass
class _Child:
    """One ``intercept start`` process of the supervisor."""

    spec: InterceptSpec
    label: str
    process: asyncio.subprocess.Process
    entry: Entry
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None
    exited: asyncio.Future[int] | None = None
    relay: asyncio.Future[None] | None = None


class _Supervisor:
    """Runs the intercepts of one workspace: starts them, relays their lines, stops them."""

    def __init__(self, workspace: WorkspaceSpec, *, shown: str, absolute: Path, digest: str, state_file: Path,
                 log_file: Path | None, env: Mapping[str, str], emit: Report, tee: bool) -> None:
        self.workspace = workspace
        self.shown = shown
        self.absolute = absolute
        self.digest = digest
        self.state_file = state_file
        self.log_file = log_file
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self._emit = emit
        self._tee = tee  # also append each line to log_file (the background supervisor's stdout already is it)
        self._log: Any = None
        self.children: list[_Child] = []
        self.status = "starting"
        self.started_at = _now()
        self._stop = asyncio.Event()

    def emit(self, line: str) -> None:
        self._emit(line)
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()

    async def run(self, on_ready: Callable[[], None]) -> int:
        """Start, relay, stop: see :func:`up`. ``on_ready`` is called once every intercept is ready."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        if self._tee and self.log_file is not None:
            self._log = open(self.log_file, "a", encoding="utf-8")
        try:
            failed = await self._start()
            if failed is not None:
                await self._stop_all()
                self.state_file.unlink(missing_ok=True)
                failure = self._failure(failed)
                if self._log is not None:  # the CLI prints it; the log should say it too
                    self._log.write(f"{ERROR_LINE}{failure}\n")
                raise failure
            if self._stop.is_set():
                return await self._shut_down()
            self.status = "up"
            self._save()
            ready = ", ".join(f"{c.label} (pid {c.process.pid})" for c in self.children)
            where = f"; output in {self.log_file}" if self.log_file else ""
            self.emit(f"intercept: up: {self.shown}: {ready} ready{where}")
            on_ready()
            return await self._watch()
        except BaseException:
            # Whatever went wrong, nothing is left running behind us.
            await self._stop_all()
            self.state_file.unlink(missing_ok=True)
            raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if self._log is not None:
                self._log.close()

    async def _start(self) -> _Child | None:
        """Start every intercept; the first that ended before it was ready, else ``None``."""
        for spec, label in zip(self.workspace.intercepts, _labels(self.workspace.intercepts), strict=True):
            argv = [sys.executable, "-m", "intercept", "start", *to_args(spec)]
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=spec.directory, env=self.env, start_new_session=True)
            entry = Entry(pid=process.pid, process_start=_process_start(process.pid), started_at=_now(),
                          service=spec.service, agent=spec.agent, namespace=spec.namespace, context=spec.context,
                          name=spec.name, local_port=spec.port, command=spec.command,
                          log_file=str(self.log_file) if self.log_file else None, workspace=str(self.absolute))
            child = _Child(spec, label, process, entry)
            child.exited = asyncio.ensure_future(process.wait())
            child.relay = asyncio.ensure_future(self._relay(child))
            self.children.append(child)
        self._save()

        stopping = asyncio.ensure_future(self._stop.wait())
        pending = {asyncio.ensure_future(self._settled(c)) for c in self.children}
        failed = None
        try:
            while pending and failed is None and not self._stop.is_set():
                done, pending = await asyncio.wait(pending | {stopping}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopping)
                failed = next((t.result() for t in done if t is not stopping and t.result() is not None), None)
        finally:
            for task in (*pending, stopping):
                task.cancel()
        return failed

    async def _settled(self, child: _Child) -> _Child | None:
        """Wait until ``child`` is ready (``None``) or has ended before it was (``child``)."""
        ready = asyncio.ensure_future(child.ready.wait())
        try:
            await asyncio.wait([ready, child.exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if child.ready.is_set():
            return None
        await self._drain(child)  # its last words: the error line
        return child if not child.ready.is_set() else None

    async def _drain(self, child: _Child) -> None:
        # The relay ends when the pipe closes, normally as the process exits; a
        # grandchild that kept the pipe open must not hold us up.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(child.relay), 2.0)

    async def _relay(self, child: _Child) -> None:
        stream = child.process.stdout
        buffer = b""
        while chunk := await stream.read(65536):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self._line(child, line.decode(errors="replace").rstrip("\r"))
        if buffer:
            self._line(child, buffer.decode(errors="replace"))

    def _line(self, child: _Child, text: str) -> None:
        if text.startswith(READY_LINE) and not child.ready.is_set():
            # "requests with x-dev: alice now reach localhost:8080": the route is the first half.
            message = text[len(READY_LINE):]
            child.entry = replace(child.entry, route=message.split(" now reach ", 1)[0])
            child.ready.set()
        elif text.startswith(ERROR_LINE) and not child.ready.is_set():
            child.error = text[len(ERROR_LINE):]
            return  # it becomes up's own error line
        self.emit(f"[{child.label}] {text}")

    def _failure(self, child: _Child) -> UpFailed:
        code = child.exited.result()
        if child.error:
            return UpFailed(f"{child.label}: {child.error}", code)
        where = f"; its output is in {self.log_file}" if self.log_file else ""
        return UpFailed(f"{child.label}: intercept start exited with status {code} before it was ready{where}", code)

    async def _watch(self) -> int:
        """Relay until stopped (0) or until every intercept ended (the first non-zero status)."""
        stopping = asyncio.ensure_future(self._stop.wait())
        codes: list[int] = []
        try:
            running = {c.exited: c for c in self.children}
            while running and not self._stop.is_set():
                done, _ = await asyncio.wait([*running, stopping], return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    child = running.pop(future, None)
                    if child is None:
                        continue
                    await self._drain(child)
                    code = future.result()
                    codes.append(code)
                    child.entry = replace(child.entry, exit_code=code)
                    self.emit(f"intercept: exited: {child.label} (pid {child.process.pid}) ended with status {code}")
                    self._save()
        finally:
            stopping.cancel()
        if self._stop.is_set():
            return await self._shut_down()
        self.state_file.unlink(missing_ok=True)
        return next((c for c in codes if c != 0), 0)

    async def _shut_down(self) -> int:
        stopped = await self._stop_all()
        self.state_file.unlink(missing_ok=True)
        self.emit(f"intercept: down: {self.shown}: stopped {_plural(stopped, 'intercept')}")
        return 0

    async def _stop_all(self) -> int:
        """SIGTERM every running child, SIGKILL its group after the grace; how many were running."""
        running = [c for c in self.children if c.process.returncode is None]

        async def stop(child: _Child) -> None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(child.exited), STOP_GRACE)
            except asyncio.TimeoutError:
                log.warning("%s (pid %d) did not stop within %gs; killing it", child.label, child.process.pid, STOP_GRACE)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                await child.exited
            await self._drain(child)

        await asyncio.gather(*(stop(c) for c in running))
        return len(running)

    def _save(self) -> None:
        state = WorkspaceState(path=str(self.absolute), digest=self.digest, status=self.status,
                               supervisor=os.getpid(), supervisor_start=_process_start(os.getpid()),
                               log_file=str(self.log_file) if self.log_file else None, started_at=self.started_at,
                               intercepts=tuple(c.entry for c in self.children))
        try:
            _write_json(self.state_file, state.to_json())
        except OSError as error:
            raise _unwritable(self.state_file, error) from None


def _print(line: str) -> None:
    """The background supervisor's output: its stdout is the log file."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _serve(argv: Sequence[str]) -> int:
    """The background supervisor of ``up --detach`` (its command-line arguments: ``argv``).

    It tells the waiting ``up`` how it goes through ``--notify-fd``, one notice a line:
    ``line TEXT`` (a line to show), then ``ready``, or ``failed CODE MESSAGE``.
    """
    parser = argparse.ArgumentParser(prog="intercept-up-supervisor")
    parser.add_argument("--notify-fd", type=int, required=True)
    parser.add_argument("--log-file", type=Path, required=True)
    parser.add_argument("--shown", required=True)
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    notify: list[Any] = [os.fdopen(args.notify_fd, "wb", buffering=0)]

    def notice(text: str) -> None:
        if notify:
            try:
                notify[0].write(text.replace("\n", " ").encode() + b"\n")
            except OSError:  # the waiting up is gone; carry on without it
                close()

    def close() -> None:
        if notify:
            with contextlib.suppress(OSError):
                notify.pop().close()

    def emit(line: str) -> None:
        _print(line)
        notice(f"line {line}")

    def ready() -> None:
        notice("ready")
        close()

    env = dict(os.environ)
    try:
        workspace = resolve_workspace(load_workspace(args.path, env), env, {})
        directory = _workspaces_dir(env)
        supervisor = _Supervisor(workspace, shown=args.shown, absolute=args.path, digest=digest(workspace),
                                 state_file=directory / f"{_workspace_id(args.path)}.json", log_file=args.log_file,
                                 env=env, emit=emit, tee=False)
        return asyncio.run(supervisor.run(on_ready=ready))
    except InterceptError as error:
        _print(f"{ERROR_LINE}{error}")
        notice(f"failed {error.exit_code} {error}")
        return error.exit_code
    finally:
        close()


def down(path: Path | None, env: Mapping[str, str] | None = None, *, report: Report = lambda line: None,
         grace: float = STOP_GRACE) -> int:
    """Stop what ``up`` started for ``path`` (every workspace with ``None``): SIGTERM,
    then SIGKILL after ``grace``. Idempotent: nothing up is reported and returns 0."""
    directory = _workspaces_dir(env)
    if not directory.is_dir():
        files = []
    elif path is None:
        files = sorted(directory.glob("*.json"))
    else:
        files = [directory / f"{_workspace_id(path.resolve())}.json"]
    stopped = 0
    for file in files:
        with _Lock(file.with_suffix(".lock")):
            state = _read_state(file)
            if state is None:
                continue
            alive = [e for e in state.intercepts if e.alive]
            if state.anything_alive():
                killed = _stop(state.processes, grace)
                shown = path if path is not None else state.path
                note = f" (killed pid {', '.join(map(str, killed))} after {grace:g}s)" if killed else ""
                report(f"intercept: down: {shown}: stopped {_plural(len(alive), 'intercept')}"
                       f" ({', '.join(e.label for e in alive) or 'none running'}){note}")
                stopped += 1
            file.unlink(missing_ok=True)
    if not stopped:
        report(f"intercept: down: nothing is up for {path}" if path is not None
               else "intercept: down: nothing is up on this machine")
    return 0


# --- status and leave ----------------------------------------------------------------------

# The keys of each status() row, in order: stable for scripts (`intercept status -o json`).
STATUS_FIELDS: tuple[str, ...] = ("service", "agent", "namespace", "context", "route", "name", "local_port",
                                  "command", "pid", "alive", "started_at", "exit_code", "log_file", "workspace")


def _known(env: Mapping[str, str] | None) -> list[Entry]:
    """Every intercept known on this machine, by pid: the registry's records, completed
    with (or else taken from) the records of ``up``."""
    by_pid: dict[int, Entry] = {}
    for state in workspaces(env):
        for entry in state.intercepts:
            by_pid[entry.pid] = entry
    for entry in entries(env):
        ours = by_pid.get(entry.pid)
        if ours is not None and ours.process_start == entry.process_start:
            # The process's own record knows its route; up's knows the workspace and log.
            entry = replace(entry, workspace=entry.workspace or ours.workspace, log_file=entry.log_file or ours.log_file)
        by_pid[entry.pid] = entry
    return sorted(by_pid.values(), key=lambda e: (e.started_at, e.pid))


def status(env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """This machine's intercepts, one dict per process with the keys :data:`STATUS_FIELDS`.

    Intercepts of ``up`` that ended while their workspace is still up are listed with
    ``alive: false`` and their ``exit_code``.
    """
    rows = []
    for entry in _known(env):
        data = entry.to_json()
        data["alive"] = entry.alive
        rows.append({key: data[key] for key in STATUS_FIELDS})
    return rows


def leave(service: str, namespace: str | None = None, env: Mapping[str, str] | None = None, *,
          timeout: float = STOP_GRACE) -> list[Entry]:
    """Stop this machine's intercepts of ``service`` (or of the agent at that address):
    SIGTERM each ``intercept start``, which unregisters its route and exits, and wait
    for them, at most ``timeout``. Returns the intercepts stopped.

    Raises :class:`NotRunning` when none matches, and :class:`InterceptError` naming
    the pid when one is still running after ``timeout``.
    """
    matching = [e for e in _known(env)
                if e.alive and service in (e.service, e.agent) and (namespace is None or e.namespace == namespace)]
    if not matching:
        where = f" in namespace {namespace}" if namespace else ""
        raise NotRunning(f"no intercept of {service}{where} is running on this machine; `intercept status` lists them")
    processes = [(e.pid, e.process_start) for e in matching]
    for pid, started in processes:
        _send(pid, started, signal.SIGTERM)
    stubborn = _wait_gone(processes, timeout)
    if stubborn:
        pids = ", ".join(map(str, stubborn))
        raise InterceptError(f"the intercept of {service} (pid {pids}) is still running {timeout:g}s after SIGTERM; "
                             f"stop it with kill -KILL {pids.replace(', ', ' ')}")
    for entry in matching:
        if entry.file is not None:
            entry.file.unlink(missing_ok=True)
    return matching


# --- VS Code ----------------------------------------------------------------------------------


def vscode(services: Sequence[str], *, directory: Path, spec_file: Path | None = None,
           env: Mapping[str, str] | None = None) -> list[Path]:
    """``.vscode/launch.json`` and ``tasks.json`` in ``directory`` for ``services``.

    With no service: the services of ``spec_file`` (default ``directory/intercept.yaml``),
    each task starting its intercept with the file's options. Returns the files written
    (see :func:`~intercept.vscode.write_vscode`).
    """
    if services:
        return write_vscode(directory, services)
    spec_file = directory / DEFAULT_FILE if spec_file is None else spec_file
    if not spec_file.exists():
        raise UsageError(f"name the services to debug, e.g. intercept vscode orders, "
                         f"or run it where an {DEFAULT_FILE} lists them")
    env = dict(os.environ if env is None else env)
    workspace = resolve_workspace(load_workspace(spec_file, env), env, {})
    specs = [spec for spec in workspace.intercepts if spec.service]
    if not specs:
        raise UsageError(f"{spec_file}: no intercept names a service; name the services: intercept vscode SERVICE ...")
    start_args = {spec.service: to_args(spec, skip=("service", "debug", "debug_port", "debug_wait")) for spec in specs}
    return write_vscode(directory, [spec.service for spec in specs], start_args=start_args)  # type: ignore[misc]


