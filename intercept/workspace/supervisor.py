"""``intercept up`` / ``down``: the intercepts of an ``intercept.yaml``, run by one supervisor.

The supervisor starts one ``intercept start -o json`` child per intercept (each in its own
session), reads their events (JSON lines), relays them as lines prefixed with
``[SERVICE]``, and stops them on SIGINT/SIGTERM. If one fails before every intercept is
ready, the others are stopped and nothing is left running. ``up`` is idempotent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from intercept.errors import InterceptError
from intercept.events import Event
from intercept.spec import (
    InterceptSpec,
    WorkspaceSpec,
    load_workspace,
    resolve_workspace,
    to_args,
)
from intercept.workspace.processes import STOP_GRACE, _alive, _process_start, _stop
from intercept.workspace.registry import (
    Entry,
    WorkspaceState,
    _directory,
    _Lock,
    _now,
    _read_state,
    _unwritable,
    _workspace_id,
    _workspaces_dir,
    _write_json,
)

log = logging.getLogger(__name__)




ERROR_LINE = "intercept: error: "


Report = Callable[[str], None]


class UpFailed(InterceptError):
    """An intercept of the workspace failed before every one was ready; the exit code is that intercept's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code or 1


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


DETACH_TIMEOUT = 600.0  # up --detach: how long every intercept may take to be ready


def up(path: Path, env: Mapping[str, str] | None = None, *, detach: bool, log_file: Path | None = None,
       report: Report = lambda line: None, timeout: float = DETACH_TIMEOUT) -> int:
    """Bring up the intercepts of ``intercept.yaml`` at ``path``; never prompts.

    Already up (same file, same resolved intercepts, all alive): reports so and returns
    0. A previous run of the same file that changed or lost an intercept is stopped
    first. With ``detach``: returns 0 once every intercept is ready, the intercepts
    running on in the background (output to ``log_file``, default
    ``STATE/workspaces/ID.log``), or raises :class:`UpFailed` when they are not all ready
    within ``timeout`` seconds (a CDE hook must not hang: an agent that never answers, a
    rollout that never ends), after stopping them. Without: relays the intercepts' lines until
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
            return _detach(path, absolute, env, log_file or directory / f"{wid}.log", report, timeout)
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


def _detach(shown: Path, absolute: Path, env: Mapping[str, str], log_file: Path, report: Report, timeout: float) -> int:
    """Start the supervisor in the background and relay its lines until it says ready or
    failed, or until ``timeout`` seconds passed (then it is stopped, and so is what it started)."""
    _directory(log_file.parent)
    notices_fd, notify_fd = os.pipe()
    # -c rather than -m: this module may already be imported by the package, and must not run twice.
    argv = [sys.executable, "-c", "import sys; from intercept.workspace.supervisor import _serve; sys.exit(_serve(sys.argv[1:]))",
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
    deadline = time.monotonic() + timeout
    with os.fdopen(notices_fd, "rb", buffering=0) as notices:
        try:
            with _interruptible():
                for raw in _lines_until(notices, deadline):
                    if raw is None:
                        daemon.terminate()  # the supervisor stops what it started
                        daemon.wait()
                        raise UpFailed(f"the intercepts of {shown} were not ready within {timeout:g}s (--timeout); "
                                       f"they were stopped; their output is in {log_file}", 1)
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


def _lines_until(stream: Any, deadline: float) -> Iterator[bytes | None]:
    """The lines of an unbuffered pipe until it ends; None once, when ``deadline`` passes first."""
    pending = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            yield None
            return
        chunk = stream.read(65536)
        if not chunk:
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"


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
            argv = [sys.executable, "-m", "intercept", "start", "--output", "json", *to_args(spec)]
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=spec.directory, env=self.env, start_new_session=True)
            entry = Entry(pid=process.pid, process_start=_process_start(process.pid), started_at=_now(),
                          service=spec.service, agent=spec.agent, namespace=spec.namespace, context=spec.context,
                          name=spec.name, local_port=spec.local_port, command=spec.command,
                          ports=tuple(str(p) for p in spec.port) if len(spec.port) > 1 else (),
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
        """One line of a child: its events (JSON), or what its local command printed."""
        event = _event(text)
        if event is None:
            self.emit(f"[{child.label}] {text}")
            return
        if event.kind == "ready" and not child.ready.is_set():
            child.entry = replace(child.entry, route=event.route)
            child.ready.set()
        elif event.kind == "error" and not child.ready.is_set():
            child.error = event.message
            return  # it becomes up's own error line
        self.emit(f"[{child.label}] {event.line()}")

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


def _event(text: str) -> Event | None:
    """The event on a line of ``intercept start -o json``, or None for any other line."""
    if not text.startswith("{"):
        return None
    try:
        return Event.from_json(json.loads(text))
    except (ValueError, TypeError, AttributeError):
        return None


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

