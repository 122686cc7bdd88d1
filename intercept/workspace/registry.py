"""The state directory: the registry of running ``intercept start`` processes and the
state of each workspace that ``up`` brought up; ``status`` and ``leave`` read them.

Every file is written atomically (a temporary file renamed over it), mode 0600, in a
directory of mode 0700. A registry file whose process is gone is stale: :func:`entries`
deletes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from intercept.errors import InterceptError
from intercept.workspace.processes import (
    STOP_GRACE,
    _alive,
    _process_start,
    _send,
    _wait_gone,
)

log = logging.getLogger(__name__)


class NotRunning(InterceptError):
    """No intercept on this machine matches what was named."""

    exit_code = 1


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
    ports: tuple[str, ...] = ()  # each --port as given ([SERVICE_PORT:]LOCAL_PORT), when there are several
    command: tuple[str, ...] = ()
    log_file: str | None = None
    workspace: str | None = None
    exit_code: int | None = None
    fence: str | None = None  # the outbound fence in effect, once the route is held
    files: str | None = None  # where the pod's files are (--mount)
    mirrored: dict[str, int] | None = None  # a mirror's copies so far: {"copied": N, "dropped": M}
    # An intercept hosted by a process with several (the MCP server): its id there, and the
    # Unix socket on which that process takes "leave ID" (see :func:`leave`).
    id: str | None = None
    control: str | None = None
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
            "route": self.route, "name": self.name, "local_port": self.local_port, "ports": list(self.ports),
            "command": list(self.command),
            "log_file": self.log_file, "workspace": self.workspace, "exit_code": self.exit_code,
            "fence": self.fence, "files": self.files, "id": self.id, "control": self.control,
            "mirrored": self.mirrored,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], file: Path | None = None) -> Entry:
        known = {k: data[k] for k in REGISTER_FIELDS + ("process_start", "exit_code", "mirrored") if k in data}
        known["pid"] = int(known["pid"])
        known["command"] = tuple(known.get("command") or ())
        known["ports"] = tuple(known.get("ports") or ())
        return cls(**known, file=file)


# What register() accepts; pid defaults to this process, started_at to now.
REGISTER_FIELDS: tuple[str, ...] = ("pid", "started_at", "service", "agent", "namespace", "context", "route",
                                    "name", "local_port", "ports", "command", "log_file", "workspace", "fence", "files", "id",
                                    "control")


def _registry(env: Mapping[str, str] | None) -> Path:
    return state_dir(env) / "intercepts"


@dataclass
class Registration:
    """A registered intercept; :meth:`remove` (or leaving the ``with`` block) unregisters it."""

    entry: Entry
    file: Path | None

    def update(self, **fields: Any) -> None:
        """Record what became known since (``fence``, ``files``, ``mirrored``); the file is rewritten atomically."""
        unknown = set(fields) - {"route", "fence", "files", "mirrored"}
        if unknown:
            raise ValueError(f"Registration.update(): unknown keys {sorted(unknown)}")
        self.entry = replace(self.entry, **fields)
        if self.file is not None:
            try:
                _write_json(self.file, self.entry.to_json())
            except OSError as error:
                log.warning("cannot update %s: %s", self.file, error.strerror or error)

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
    file = _registry(env) / (f"{record.pid}-{record.id}.json" if record.id else f"{record.pid}.json")
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


# The keys of each status() row, in order: stable for scripts (`intercept status -o json`).
STATUS_FIELDS: tuple[str, ...] = ("service", "agent", "namespace", "context", "route", "name", "local_port",
                                  "command", "pid", "alive", "started_at", "exit_code", "log_file", "workspace",
                                  "fence", "files", "id", "mirrored", "ports")


def _known(env: Mapping[str, str] | None) -> list[Entry]:
    """Every intercept known on this machine, by pid: the registry's records, completed
    with (or else taken from) the records of ``up``."""
    by_pid: dict[int, Entry] = {}
    for state in workspaces(env):
        for entry in state.intercepts:
            by_pid[entry.pid] = entry
    hosted = []  # several intercepts of one process (the MCP server's)
    for entry in entries(env):
        if entry.id is not None:
            hosted.append(entry)
            continue
        ours = by_pid.get(entry.pid)
        if ours is not None and ours.process_start == entry.process_start:
            # The process's own record knows its route; up's knows the workspace and log.
            entry = replace(entry, workspace=entry.workspace or ours.workspace, log_file=entry.log_file or ours.log_file)
        by_pid[entry.pid] = entry
    return sorted([*by_pid.values(), *hosted], key=lambda e: (e.started_at, e.pid, e.id or ""))


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


def _ask_to_leave(entry: Entry, timeout: float) -> None:
    """Ask the process hosting ``entry`` (its ``control`` socket) to stop that intercept; it
    answers once the route is gone."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(entry.control)
            sock.sendall(json.dumps({"leave": entry.id}).encode() + b"\n")
            reply = json.loads(sock.makefile("rb").readline() or b"{}")
    except (OSError, ValueError) as error:
        raise InterceptError(f"the intercept of {entry.label} (pid {entry.pid}, {entry.id}) did not answer on "
                             f"{entry.control}: {error}; stop the process that hosts it (pid {entry.pid})") from None
    if not reply.get("ok"):
        raise InterceptError(f"the intercept of {entry.label} ({entry.id}) was not stopped: {reply.get('message')}")


def leave(service: str, namespace: str | None = None, env: Mapping[str, str] | None = None, *,
          timeout: float = STOP_GRACE) -> list[Entry]:
    """Stop this machine's intercepts of ``service`` (or of the agent at that address):
    SIGTERM each ``intercept start``, which unregisters its route and exits, and wait
    for them, at most ``timeout``; an intercept hosted by the MCP server is asked to
    leave on that server's control socket. Returns the intercepts stopped.

    Raises :class:`NotRunning` when none matches, and :class:`InterceptError` naming
    the pid when one is still running after ``timeout``.
    """
    matching = [e for e in _known(env)
                if e.alive and service in (e.service, e.agent) and (namespace is None or e.namespace == namespace)]
    if not matching:
        where = f" in namespace {namespace}" if namespace else ""
        raise NotRunning(f"no intercept of {service}{where} is running on this machine; `intercept status` lists them")
    for entry in [e for e in matching if e.control is not None]:
        _ask_to_leave(entry, timeout)
    processes = [(e.pid, e.process_start) for e in matching if e.control is None]
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

