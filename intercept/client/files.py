"""The pod's files on the developer's machine: copied once, or mounted live with sshfs.

The agent serves the app container's mounts read-only over SFTP on the developer's own
SSH connection (:mod:`intercept.agent.files`): one tree, each mount at its ``mountPath``.
Here that tree lands under a local directory, the *root* (``INTERCEPT_ROOT`` for the
local process, as Telepresence's ``TELEPRESENCE_ROOT``): ``/etc/config/app.yaml`` in the
pod is ``$INTERCEPT_ROOT/etc/config/app.yaml`` here.

- :func:`copy_tree` copies once (``--mount-mode copy``, and ``intercept files``): every
  file mode 0600 (0700 if executable), every directory 0700, whatever the pod's modes,
  because Secrets are among them. A path the agent refuses (a link that leads out of its
  mount) is skipped and reported, never followed.
- :class:`LiveMount` mounts the tree with ``sshfs -o passive``: sshfs speaks SFTP on its
  stdin and stdout, which are bridged to an ``sftp`` channel of the connection, so
  nothing else is dialled or authenticated; a ConfigMap update in the pod shows here
  within about a second. FUSE gives the mounting user alone access.
- :class:`PodFiles` owns the root: it makes it (a fresh temporary directory, or an empty
  or new one that the user names), starts a guard process, and on :meth:`PodFiles.close`
  unmounts and removes what it put there. The guard (``python -m intercept.client.files
  --guard``, in its own session) waits for this process to end: when it ends without
  closing (``kill -9``, a crash) the guard's stdin reaches end of file, and the guard
  kills sshfs, unmounts (lazily, so a busy mount cannot stop it) and removes the files.

Invariant: the process that bridges sshfs never touches the mount from its event loop
(a stat there would wait for an answer that only that loop can relay): whether the root
is mounted is read from ``/proc/self/mountinfo``, and the unmount is a child process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from intercept.errors import InterceptError, UsageError
from intercept.events import Event
from intercept.protocol import FILES_SUBSYSTEM

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
MOUNT_TIMEOUT = 20.0  # seconds for sshfs to mount once its SFTP session is up
MODES = ("auto", "live", "copy")


class FilesError(InterceptError):
    """The pod's files could not be brought here."""


@dataclass(frozen=True)
class MountRequest:
    """``--mount [DIR]`` and ``--mount-mode``: where (None: a fresh temporary directory) and how."""

    directory: Path | None = None
    mode: str = "auto"


@dataclass
class Copied:
    """What :func:`copy_tree` brought: counts, and the paths the agent refused with why."""

    files: int = 0
    bytes: int = 0
    refused: list[str] = field(default_factory=list)

    def describe(self) -> str:
        size = f"{self.bytes / 1024:.1f} KiB" if self.bytes >= 1024 else f"{self.bytes} bytes"
        return f"{self.files} file{'s' if self.files != 1 else ''}, {size}"


# --------------------------------------------------------------------------- live: availability


def live_unavailable() -> str | None:
    """Why a live mount cannot be made here (None: it can be tried)."""
    if not sys.platform.startswith("linux"):
        return f"live mounts are supported on Linux only (this is {sys.platform})"
    if shutil.which("sshfs") is None:
        return "sshfs is not installed (Debian/Ubuntu: apt-get install sshfs)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (FUSE is not available here)"
    if _unmount_command("x") is None:
        return "neither fusermount3 nor fusermount is installed (Debian/Ubuntu: apt-get install fuse3)"
    return None


def _unmount_command(path: str, lazy: bool = False) -> list[str] | None:
    for tool in ("fusermount3", "fusermount"):
        if shutil.which(tool):
            return [tool, "-u", *(["-z"] if lazy else []), "--", path]
    if shutil.which("umount"):
        return ["umount", *(["-l"] if lazy else []), path]
    return None


def is_mounted(path: str | Path) -> bool:
    """Whether ``path`` is a mount point, read from ``/proc/self/mountinfo`` (never touching it)."""
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    return True
    except OSError:
        return False
    return False


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 4 <= len(text) and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------- copying


async def copy_tree(sftp: asyncssh.SFTPClient, root: Path, path: str = "/") -> Copied:
    """Copy what the agent serves at ``path`` (and below) to ``root`` + ``path``.

    Files are written 0600 (0700 when executable), directories 0700; a path the agent
    refuses is skipped, with its reason in :attr:`Copied.refused`. Raises
    :class:`FilesError` when ``path`` itself is not served.
    """
    path = "/" + posixpath.normpath(posixpath.join("/", path)).lstrip("/")
    copied = Copied()
    try:
        attrs = await sftp.stat(path)
    except asyncssh.SFTPError as e:
        raise FilesError(f"{path}: {e.reason}; `intercept files SERVICE` with no PATH copies everything the agent serves") from None
    await _copy(sftp, root, path, attrs, copied)
    return copied


def _local(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


async def _copy(sftp: asyncssh.SFTPClient, root: Path, path: str, attrs: asyncssh.SFTPAttrs, copied: Copied) -> None:
    local = _local(root, path)
    if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
        local.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(local, 0o700)
        async for entry in sftp.scandir(path):
            name = entry.filename if isinstance(entry.filename, str) else os.fsdecode(entry.filename)
            if name in (".", "..") or "/" in name or "\0" in name:  # only names, never a way out of the root
                continue
            await _copy(sftp, root, posixpath.join(path, name), entry.attrs, copied)
        return
    if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR:  # what the agent lists but refuses: a link leading out
        try:
            await sftp.stat(path)
            reason = "not a regular file"
        except asyncssh.SFTPError as e:
            reason = e.reason
        copied.refused.append(f"{path}: {reason}")
        log.info("not copied: %s: %s", path, reason)
        return
    local.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = 0o700 if (attrs.permissions or 0) & 0o111 else 0o600
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        async with sftp.open(path, "rb") as remote:
            while data := await remote.read(CHUNK):
                os.write(fd, data)
                copied.bytes += len(data)
    except asyncssh.SFTPError as e:
        os.close(fd)
        fd = -1
        local.unlink(missing_ok=True)
        copied.refused.append(f"{path}: {e.reason}")
        return
    finally:
        if fd >= 0:
            os.close(fd)
    copied.files += 1
    log.debug("copied %s", path)


# --------------------------------------------------------------------------- live


class LiveMount:
    """sshfs mounting the agent's file tree at a local directory, over one SSH connection.

    :meth:`start` returns once the directory is a mount point (typed error otherwise);
    :meth:`close` unmounts it and waits for sshfs. ``ended`` is set when the mount ends by
    itself (its connection was lost).
    """

    def __init__(self, conn: asyncssh.SSHClientConnection, directory: Path, label: str = "intercept") -> None:
        self.conn = conn
        self.directory = directory
        self.label = label
        self.process: asyncio.subprocess.Process | None = None
        self._bridge: list[asyncio.Task[None]] = []
        self._channel: tuple[Any, Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()

    async def start(self) -> None:
        writer, reader, _ = await self.conn.open_session(subsystem=FILES_SUBSYSTEM, encoding=None)
        self._channel = (writer, reader)
        fsname = "".join(c if c.isalnum() or c in "-_.:@" else "_" for c in self.label)
        options = f"passive,ro,dir_cache=no,fsname={fsname},subtype=intercept"
        self.process = await asyncio.create_subprocess_exec(
            "sshfs", "-f", "-o", options, "intercept:/", str(self.directory),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)
        self._bridge = [asyncio.ensure_future(self._up(writer)), asyncio.ensure_future(self._down(reader))]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MOUNT_TIMEOUT
        delay = 0.02
        while not is_mounted(self.directory):
            if self.process.returncode is not None or loop.time() > deadline:
                why = await self._stderr() if self.process.returncode is not None else f"not mounted within {MOUNT_TIMEOUT:g}s"
                await self.close()
                raise FilesError(f"sshfs could not mount the pod's files at {self.directory}: {why}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        self._watcher = asyncio.ensure_future(self._watch())

    async def _stderr(self) -> str:
        assert self.process is not None and self.process.stderr is not None
        text = (await self.process.stderr.read()).decode(errors="replace").strip()
        return text.splitlines()[-1] if text else f"exit status {self.process.returncode}"

    async def _up(self, writer: Any) -> None:
        """sshfs's requests to the agent."""
        assert self.process is not None and self.process.stdout is not None
        try:
            while data := await self.process.stdout.read(CHUNK):
                writer.write(data)
            writer.write_eof()
        except (OSError, asyncssh.Error) as e:
            log.debug("sshfs bridge (requests) ended: %s", e)

    async def _down(self, reader: Any) -> None:
        """The agent's answers to sshfs."""
        assert self.process is not None and self.process.stdin is not None
        try:
            while data := await reader.read(CHUNK):
                self.process.stdin.write(data)
                await self.process.stdin.drain()
        except (OSError, asyncssh.Error) as e:
            log.debug("sshfs bridge (answers) ended: %s", e)
        finally:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    async def _watch(self) -> None:
        assert self.process is not None
        await self.process.wait()
        self.ended.set()

    async def close(self) -> None:
        """Unmount (lazily if busy) and wait for sshfs; idempotent."""
        if is_mounted(self.directory):
            await _run(_unmount_command(str(self.directory)))
            if is_mounted(self.directory):
                await _run(_unmount_command(str(self.directory), lazy=True))
        if self.process is not None and self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        for task in self._bridge:
            task.cancel()
        await asyncio.gather(*self._bridge, return_exceptions=True)
        if self._channel is not None:
            self._channel[0].close()
            self._channel = None


async def _run(argv: list[str] | None) -> int:
    if argv is None:
        return -1
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await process.communicate()
    if process.returncode:
        log.info("%s: %s", " ".join(argv), err.decode(errors="replace").strip())
    return process.returncode or 0


# --------------------------------------------------------------------------- the local root


class PodFiles:
    """The local root of the pod's files for one intercept: made, filled, guarded, removed.

    ``directory`` None: a fresh temporary directory (removed on close); otherwise a new
    directory (removed on close) or an empty one (emptied on close, kept). Anything else
    is refused: what is there would be mixed with the pod's files, then removed with them.
    """

    def __init__(self, directory: Path | None) -> None:
        if directory is None:
            self.path = Path(tempfile.mkdtemp(prefix="intercept-files-"))
            self.created = True
        else:
            self.path = directory.expanduser().absolute()
            self.created = not self.path.exists()
            if not self.created:
                if not self.path.is_dir() or is_mounted(self.path) or any(self.path.iterdir()):
                    raise UsageError(f"--mount {directory}: it exists and is not an empty directory; the pod's files go "
                                     "there and are removed on leave: name a new or empty directory, or give --mount alone "
                                     "for a fresh temporary one")
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        self.live: LiveMount | None = None
        self.guard = _start_guard(self.path, self.created)

    def guard_sshfs(self, pid: int) -> None:
        """Tell the guard which sshfs to stop should this process die."""
        try:
            self.guard.stdin.write(f"sshfs {pid}\n".encode())
            self.guard.stdin.flush()
        except (OSError, ValueError) as e:
            log.warning("the guard of %s is gone (%s): files may stay if this process is killed", self.path, e)

    async def close(self) -> None:
        """Unmount, remove what was put there (the directory too if it was made here),
        then release the guard; idempotent."""
        if self.live is not None:
            await self.live.close()
            self.live = None
        await asyncio.to_thread(clean, self.path, self.created)
        if self.guard.stdin and not self.guard.stdin.closed:
            try:
                self.guard.stdin.close()
            except OSError:
                pass
        try:
            await asyncio.to_thread(self.guard.wait, 10)
        except subprocess.TimeoutExpired:
            log.warning("the guard of %s did not exit; leaving it", self.path)


def _start_guard(path: Path, created: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "intercept.client.files", "--guard", str(path), "--remove" if created else "--empty"]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def clean(path: Path, remove: bool) -> None:
    """Unmount ``path`` if mounted (lazily when busy), then delete what is in it (and it,
    with ``remove``). Never descends into a mount: when it cannot be unmounted, it stays."""
    if is_mounted(path):
        for lazy in (False, True):
            argv = _unmount_command(str(path), lazy)
            if argv is not None:
                subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if not is_mounted(path):
                break
    if is_mounted(path):
        log.warning("%s is still mounted; not removing it", path)
        return
    if remove:
        shutil.rmtree(path, ignore_errors=True)
    elif path.is_dir():
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _guard(path: Path, remove: bool) -> None:
    """Wait for the end of stdin (the intercept ended, or died), then stop the sshfs it
    named, and clean ``path``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sshfs: list[int] = []
    for line in sys.stdin.buffer:
        words = line.split()
        if len(words) == 2 and words[0] == b"sshfs" and words[1].isdigit():
            sshfs.append(int(words[1]))
    for pid in sshfs:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sshfs":  # not a pid reused since
                os.kill(pid, signal.SIGTERM)
        except (OSError, ProcessLookupError):
            pass
    clean(path, remove)


# --------------------------------------------------------------------------- bringing them


async def bring(request: MountRequest, conn: asyncssh.SSHClientConnection | None, report: Callable[[Event], None],
                label: str = "intercept") -> PodFiles:
    """Make the root and fill it, live or by a copy (see :class:`MountRequest`), reporting
    one ``mount`` event that says which and, for a copy in auto mode, why not live."""
    if conn is None:
        raise FilesError("no connection to an agent is up to bring the pod's files from; start again")
    if request.mode not in MODES:
        raise UsageError(f"--mount-mode {request.mode!r}: expected one of {', '.join(MODES)}")
    unavailable = live_unavailable() if request.mode != "copy" else None
    if request.mode == "live" and unavailable:
        raise FilesError(f"--mount-mode live: {unavailable}; or --mount-mode copy to copy the files once")
    files = PodFiles(request.directory)
    try:
        why_not = unavailable
        if request.mode != "copy" and not unavailable:
            live = LiveMount(conn, files.path, label)
            try:
                await live.start()
            except FilesError as e:
                if request.mode == "live":
                    raise
                why_not = str(e)
            else:
                files.live = live
                if live.process is not None:
                    files.guard_sshfs(live.process.pid)
                report(Event("mount", f"the pod's files are under {files.path} (live, sshfs)", path=str(files.path)))
                return files
        async with conn.start_sftp_client() as sftp:
            copied = await copy_tree(sftp, files.path)
        refused = f"; refused: {'; '.join(copied.refused)}" if copied.refused else ""
        if request.mode == "copy":
            how = "copied once (--mount-mode copy)"
        else:
            how = f"copied once, not live: {why_not}"
        report(Event("mount", f"the pod's files are under {files.path}, {how} ({copied.describe()}{refused})",
                     path=str(files.path)))
        return files
    except BaseException:
        await files.close()
        raise


async def keep_live(files: PodFiles, connection: Callable[[], asyncssh.SSHClientConnection | None], stop: asyncio.Event,
                    report: Callable[[Event], None]) -> None:
    """While ``stop`` is not set: when the live mount of ``files`` ends (the connection it
    rode on was lost: the pod went, the network dropped), say so and mount again on the
    next connection that ``connection()`` gives, with backoff (0.5 s doubling to 10 s)."""
    while files.live is not None and not stop.is_set():
        live = files.live
        ended, stopped = asyncio.ensure_future(live.ended.wait()), asyncio.ensure_future(stop.wait())
        await asyncio.wait({ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        stopped.cancel()
        if stop.is_set():
            return
        report(Event("warning", f"the live mount at {files.path} ended: its connection to the agent was lost; "
                                "mounting again once one is up"))
        await live.close()
        delay = 0.5
        while not stop.is_set():
            conn = connection()
            if conn is not None and not conn.is_closed():
                fresh = LiveMount(conn, files.path, live.label)
                try:
                    await fresh.start()
                except (FilesError, asyncssh.Error, OSError) as e:
                    log.info("mounting %s again failed: %s", files.path, e)
                else:
                    files.live = fresh
                    if fresh.process is not None:
                        files.guard_sshfs(fresh.process.pid)
                    report(Event("mount", f"the pod's files are under {files.path} again (live, sshfs)", path=str(files.path)))
                    break
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, 10.0)


__all__ = ["Copied", "FilesError", "LiveMount", "MountRequest", "PodFiles", "bring", "copy_tree", "is_mounted",
           "keep_live", "live_unavailable"]


if __name__ == "__main__":  # the guard: python -m intercept.client.files --guard DIR --remove|--empty
    if len(sys.argv) == 4 and sys.argv[1] == "--guard" and sys.argv[3] in ("--remove", "--empty"):
        _guard(Path(sys.argv[2]), sys.argv[3] == "--remove")
    else:
        sys.exit("usage: python -m intercept.client.files --guard DIR --remove|--empty")
