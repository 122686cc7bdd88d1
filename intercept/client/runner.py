"""The local process: COMMAND started in its own process group, stopped with it on leaving.

COMMAND never outlives the intercept: leaving stops its whole group, and on Linux the
kernel sends it SIGTERM when the intercept dies without leaving (``kill -9``, a crash),
through a parent-death signal, so that it cannot be left holding its port.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from intercept.client.door import connect_local
from intercept.errors import CommandFailed, UsageError

log = logging.getLogger(__name__)


class LocalProcess:
    """COMMAND as a child process group; :meth:`stop` ends the whole group (TERM, then KILL).

    With ``output``, its stdout and stderr are read line by line and handed to it (an
    API caller that shows them, such as the MCP server, whose own stdout is its protocol);
    without, the process writes to ours.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
                 output: Callable[[str], None] | None = None, setup: Callable[[], None] | None = None,
                 own_group: bool = True) -> None:
        self.setup = setup
        self.own_group = own_group  # False: an interactive shell, in the terminal's foreground group
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.output = output
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        piped = {"stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.STDOUT} if self.output else {}
        if sys.platform == "linux":
            piped["preexec_fn"] = _terminate_with(os.getpid(), self.setup)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=self.cwd, start_new_session=self.own_group, stdin=asyncio.subprocess.DEVNULL if self.output else None, **piped
            )
        except (OSError, ValueError) as e:  # ValueError: a NUL in an argument or a variable, which exec cannot pass
            raise CommandFailed(f"cannot run {self.argv[0]!r}: {getattr(e, 'strerror', None) or e}; "
                                "check the command after --") from None
        except subprocess.SubprocessError:  # the setup step failed in the child (it said why on stderr)
            raise CommandFailed(f"cannot run {self.argv[0]!r}: its private namespace could not be made; "
                                "use --access hosts-file (root) or --access proxy") from None
        if self.output is not None:
            _reading.add(task := asyncio.ensure_future(_read_lines(self.proc.stdout, self.output)))
            task.add_done_callback(_reading.discard)
        log.info("started %s (pid %s)", self.argv, self.proc.pid)

    async def wait(self) -> int:
        return await self.proc.wait()

    async def stop(self, grace: float = 5.0) -> int | None:
        """TERM the whole process group, then KILL what is left of it after ``grace`` (the
        group outlives its leader when children remain: they are stopped too)."""
        if self.proc is None:
            return None
        kill = (lambda sig: os.killpg(self.proc.pid, sig)) if self.own_group else self.proc.send_signal
        try:
            kill(signal.SIGTERM)
        except ProcessLookupError:
            return await self.proc.wait()
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %ss; killing it", self.argv[0], grace)
        try:
            kill(signal.SIGKILL)
        except ProcessLookupError:
            pass
        return await self.proc.wait()


async def run_command(process: LocalProcess, stop: asyncio.Event | None = None,
                      timeout: float | None = None) -> int | None:
    """Run ``process`` once: started unless ``stop`` is set already, then waited for until it
    exits, ``stop`` is set, or ``timeout`` seconds have passed since its start (counted from
    there, not from whatever the caller did before: a rollout, a tunnel), which sets
    ``stop`` (when given, so the caller can tell). Returns its exit status (as
    :meth:`asyncio.subprocess.Process.wait` gives it), or None when it was stopped before it
    exited (or never started).

    However this ends (its own task cancelled too) the process does not outlive it, and no
    task of its is left behind."""
    stop = stop if stop is not None else asyncio.Event()
    if stop.is_set():
        return None
    await process.start()
    timer = asyncio.get_running_loop().call_later(timeout, stop.set) if timeout is not None else None
    waiting = asyncio.ensure_future(process.wait())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        return waiting.result() if waiting.done() else None
    finally:
        if timer is not None:
            timer.cancel()
        stopping.cancel()
        if not waiting.done():
            await asyncio.shield(process.stop())  # cancelled or stopped: it goes before we do
        waiting.cancel()
        await asyncio.gather(waiting, stopping, return_exceptions=True)


_PR_SET_PDEATHSIG = 1


def _terminate_with(parent: int, setup: Callable[[], None] | None = None) -> Callable[[], None]:
    """What the child runs between fork and exec: ask the kernel for SIGTERM when ``parent``
    (this process) dies, and send it now if it already has. SIGTERM, not SIGKILL, so that
    a COMMAND with children of its own (a reloader and its worker) can stop them."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request was in place
            os.kill(os.getpid(), signal.SIGTERM)
        if setup is not None:
            setup()

    return preexec


def port_holder(port: int) -> str | None:
    """Who listens on TCP ``port`` of this machine: ``pid N (COMMAND LINE)``, or None when it
    cannot be told (not Linux, or a process this user may not look into)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if not any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                continue
            argv = open(f"/proc/{pid}/cmdline", "rb").read().rstrip(b"\0").split(b"\0")
        except OSError:  # gone meanwhile, or not ours to see
            continue
        line = shlex.join(arg.decode(errors="replace") for arg in argv)
        return f"pid {pid} ({line[:120]}{'...' if len(line) > 120 else ''})"
    return None


async def refuse_taken_port(host: str, port: int) -> None:
    """Raise :class:`CommandFailed` naming the holder when something already accepts on
    ``host:port``: COMMAND could not listen there, and requests would reach the other."""
    try:
        transport, _ = await connect_local(asyncio.Protocol, host, port)
    except OSError:
        return
    transport.close()
    holder = await asyncio.to_thread(port_holder, port)
    if holder is None:
        raise CommandFailed(f"localhost:{port} is already in use by another process; stop it, or choose another --port")
    pid = holder.split()[1]
    raise CommandFailed(
        f"localhost:{port} is already in use by {holder}, perhaps a command left running by an earlier "
        f"intercept; stop it (kill {pid}) or choose another --port"
    )


_reading: set[asyncio.Task[None]] = set()  # output readers, held so they are not collected


async def _read_lines(stream: asyncio.StreamReader, output: Callable[[str], None]) -> None:
    while line := await stream.readline():
        output(line.decode(errors="replace").rstrip("\n"))


_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?(\.exe)?$")
IGNORED_DIRS = {"venv", "env", ".direnv", ".eggs", "build", "dist", ".ruff_cache", ".nox", ".vscode"}


def debug_argv(argv: Sequence[str], port: int, wait: bool) -> list[str]:
    """COMMAND under debugpy listening on 127.0.0.1:PORT (Python commands only)."""
    if not argv or not _PYTHON.match(os.path.basename(argv[0])):
        raise UsageError(
            f"--debug runs a Python COMMAND under debugpy, not {argv[0] if argv else 'nothing'!r}; "
            "for other runtimes pass the runtime's own flag, e.g. -- node --inspect=127.0.0.1:9229 app.js"
        )
    return [argv[0], "-m", "debugpy", "--listen", f"127.0.0.1:{port}", *(["--wait-for-client"] if wait else []), *argv[1:]]


def debugpy_path() -> str:
    """A directory holding only debugpy, for PYTHONPATH: the developer's interpreter may not have it."""
    try:
        import debugpy
    except ImportError:
        raise UsageError("--debug needs debugpy: pip install debugpy") from None
    path = Path(tempfile.gettempdir()) / f"intercept-debugpy-{os.getuid()}"
    link = path / "debugpy"
    if not link.exists():
        path.mkdir(exist_ok=True)
        link.symlink_to(Path(debugpy.__file__).parent, target_is_directory=True)
    return str(path)


class _WatchFilter(watchfiles.DefaultFilter):
    ignore_dirs = (*watchfiles.DefaultFilter.ignore_dirs, *sorted(IGNORED_DIRS))


async def changes(paths: Sequence[str], stop: asyncio.Event) -> AsyncIterator[list[str]]:
    """Batches of changed files under ``paths`` (VCS, virtual environments, caches ignored)."""
    async for batch in watchfiles.awatch(*paths, watch_filter=_WatchFilter(), debounce=100, step=20, stop_event=stop):
        yield sorted({path for _, path in batch})


async def watch(paths: Sequence[str], stop: asyncio.Event) -> AsyncIterator[list[str]]:
    """:func:`changes`, with the watches already set up when this returns: a change saved
    after it is seen."""
    batches = changes(paths, stop)
    first = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0)  # the task's first step sets up the OS watches (awatch builds its notifier)

    async def rest() -> AsyncIterator[list[str]]:
        try:
            yield await first
        except StopAsyncIteration:
            return
        async for batch in batches:
            yield batch

    return rest()


@dataclass(frozen=True)
class LocalCommand:
    """The developer's process: what to run, where, with what, watched for changes, debugged."""

    argv: tuple[str, ...]
    watch: tuple[str, ...] = ()  # restart on changes under these paths; empty: no reload
    env: Mapping[str, str] | None = None  # the whole environment; None: this one
    cwd: str | None = None
    debug_port: int | None = None  # run under debugpy listening on 127.0.0.1:PORT
    debug_wait: bool = False
    env_file: str | None = None  # also write the process's pod environment here (dotenv)
    output: Callable[[str], None] | None = field(default=None, compare=False)  # its lines; None: our stdout
    # Runs in the child between fork and exec (a private mount namespace: intercept.access.isolate).
    setup: Callable[[], None] | None = field(default=None, compare=False)
    # Whether it serves routed requests on the local port (False: a workload with no Service, a
    # queue worker replaced by it; nobody waits for it to accept connections there).
    serves: bool = True


def dotenv(env: Mapping[str, str]) -> str:
    """``KEY="value"`` lines, quoted so that dotenv readers and ``set -a; . FILE`` agree."""
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("\n", "\\n") + '"'

    return "".join(f"{key}={quote(value)}\n" for key, value in sorted(env.items()))


def exit_status(returncode: int) -> int:
    """A process's exit status as a shell reports it: ``128 + N`` when signal N ended it
    (asyncio's ``returncode`` is ``-N`` then; ``sys.exit(-N)`` would exit ``256 - N``)."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    """``exited with status 137 (killed by SIGKILL)``, or ``exited with status 3``."""
    text = f"exited with status {exit_status(returncode)}"
    if returncode < 0:
        try:
            text += f" (killed by {signal.Signals(-returncode).name})"
        except ValueError:
            text += f" (killed by signal {-returncode})"
    return text


class Supervisor:
    """Runs a :class:`LocalCommand` and restarts it on demand; tells when it exits by itself."""

    def __init__(self, command: LocalCommand, on_exit: Callable[[int], None]) -> None:
        self.command = command
        self.on_exit = on_exit
        self.process: LocalProcess | None = None
        self._stopped: LocalProcess | None = None  # the process stop() ended: its exit is not news

    async def start(self) -> None:
        cmd = self.command
        argv, env = list(cmd.argv), dict(os.environ if cmd.env is None else cmd.env)
        if cmd.debug_port is not None:
            argv = debug_argv(argv, cmd.debug_port, cmd.debug_wait)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (debugpy_path(), env.get("PYTHONPATH")) if p)
        process = self.process = LocalProcess(argv, env, cmd.cwd, cmd.output, cmd.setup)
        await process.start()
        asyncio.ensure_future(process.wait()).add_done_callback(lambda task: self._ended(process, task))

    def _ended(self, process: LocalProcess, task: asyncio.Future[int]) -> None:
        if process is self.process and process is not self._stopped and not task.cancelled():
            self.on_exit(task.result())

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.proc is not None and self.process.proc.returncode is None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def stop(self) -> None:
        if self.process is not None:
            self._stopped = self.process
            await self.process.stop()


async def accepting(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """Wait until ``host:port`` accepts a connection (True), ``timeout`` passes or ``alive()`` is False."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while alive() and loop.time() < deadline:
        try:
            transport, _ = await connect_local(asyncio.Protocol, host, port)
        except OSError:
            await asyncio.sleep(0.02)  # polling a port that is not open yet
            continue
        transport.close()
        return True
    return False
