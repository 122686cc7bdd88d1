"""asyncssh's SFTP server over :class:`intercept.agent.files.ServedFiles`: the pod's files, read-only.

The invariants are those of :mod:`intercept.agent.files`; this module is the SFTP protocol's
side, loaded with the agent's SSH server, and the I/O. Every file system call runs in one of
:class:`FileService`'s few threads, never on the event loop, so that a slow volume or a
large directory cannot stop the HTTP traffic; one session uses at most
:data:`TURNS_PER_SESSION` of them at once, so that it cannot occupy them all.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import posixpath
import resource
import stat
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncssh
from asyncssh.stream import SSHServerStreamSession

from intercept.agent.beneath import OutsideRoot, open_beneath
from intercept.agent.files import (
    KUBELET_PREFIX,
    MAX_CHANNELS_PER_SESSION,
    MAX_HANDLES,
    MAX_READ,
    READ_ONLY,
    SFTP_VERSION,
    Inside,
    Quota,
    ServedFiles,
    Virtual,
    handle_quota,
    normalize,
    unservable,
)

log = logging.getLogger("intercept.agent.files")

WORKERS = 4  # threads for the file system calls of all sessions
TURNS_PER_SESSION = 2  # of which one session uses at most this many at once

T = TypeVar("T")


def _denied(reason: str) -> asyncssh.SFTPPermissionDenied:
    return asyncssh.SFTPPermissionDenied(reason)


class FileService:
    """What the SFTP channels of every session on one agent share: the served tree, the
    threads that make the file system calls and each session's turn at them, and the quotas
    of handles (by the agent's RLIMIT_NOFILE as it is now) and channels."""

    def __init__(self, files: ServedFiles) -> None:
        self.files = files
        self.handles = handle_quota(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        # channels cost memory, not descriptors: the cap that matters is each session's
        self.channels = Quota("SFTP channels", MAX_CHANNELS_PER_SESSION, MAX_HANDLES)
        self._threads = ThreadPoolExecutor(WORKERS, thread_name_prefix="intercept-files")
        # a session's turns live while one of its calls waits or runs
        self._turns: weakref.WeakValueDictionary[str, asyncio.Semaphore] = weakref.WeakValueDictionary()

    async def run(self, session: str, call: Callable[..., T], *args: Any,
                  undo: Callable[[T], object] | None = None) -> T:
        """``call(*args)`` in a worker thread, in one of ``session``'s turns. When the caller
        is cancelled while it runs, ``undo`` gets its result (a descriptor opened for no one)."""
        turn = self._turns.get(session)
        if turn is None:
            turn = self._turns[session] = asyncio.Semaphore(TURNS_PER_SESSION)
        async with turn:
            future = self._threads.submit(call, *args)
            try:
                return await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                if undo is not None:
                    future.add_done_callback(lambda done: _undo(done, undo))
                raise

    async def close(self, fd: int) -> None:
        """Close ``fd`` in a worker thread (a network volume's close waits on the network), and
        surely: without waiting for a turn, and even when the caller is cancelled meanwhile."""
        await asyncio.shield(asyncio.wrap_future(self._threads.submit(os.close, fd)))


def _undo(done: Future[T], undo: Callable[[T], object]) -> None:
    if not done.cancelled() and done.exception() is None:
        undo(done.result())


@dataclass
class ServedFile:
    """An open regular file: its descriptor, and its size when it was opened."""

    fd: int
    size: int

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Only asyncssh's answer to a sparse-ranges request (``ranges@asyncssh.com``) calls
        this: the whole file counts as data, as long as it was when opened; nothing is read."""
        if whence == os.SEEK_DATA and offset < self.size:
            return offset
        if whence == os.SEEK_DATA:
            raise OSError(errno.ENXIO, "no data past the end")
        if whence == os.SEEK_HOLE:
            return max(offset, self.size)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


class Listing:
    """A directory handle: its entries are listed (in a worker thread) at the first READDIR,
    then handed out. asyncssh drops it when the client closes the handle, or leaves."""

    def __init__(self, list_entries: Callable[[], Awaitable[list[asyncssh.SFTPName]]]) -> None:
        self._list_entries = list_entries
        self._entries: Iterator[asyncssh.SFTPName] | None = None

    def __aiter__(self) -> Listing:
        return self

    async def __anext__(self) -> asyncssh.SFTPName:
        if self._entries is None:
            self._entries = iter(await self._list_entries())
        try:
            return next(self._entries)
        except StopIteration:
            raise StopAsyncIteration from None


class FileServer(asyncssh.SFTPServer):
    """asyncssh's SFTP server over :class:`ServedFiles`: read-only, links followed, nothing
    outside, and no more than its session's share of :class:`FileService`.

    Methods named ``_..._now`` make file system calls: they run in a worker thread.
    """

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], service: FileService, session: str, who: str,
                 stream: SSHServerStreamSession[bytes]) -> None:
        super().__init__(chan)
        self.service = service
        self.files = service.files
        self.session = session
        self.who = who
        self._stream = stream
        self._started = time.time()

    async def _call(self, call: Callable[..., T], *args: Any, undo: Callable[[T], object] | None = None) -> T:
        # A client that does not read its answers is not answered further: what it was
        # answered waits in the channel's buffer, which must not grow without bound.
        await self._stream.drain(None)
        return await self.service.run(self.session, call, *args, undo=undo)

    def _take_handle(self, shown: str) -> None:
        refusal = self.service.handles.take(self.session)
        if refusal is not None:
            log.info("refused %s to %s: %s", shown, self.who, refusal)
            raise asyncssh.SFTPFailure(f"{shown}: {refusal}")

    # -- paths ---------------------------------------------------------------------------

    def _locate(self, path: bytes) -> Virtual | Inside:
        """Where the client's ``path`` leads (no file is touched); SFTP's no such file when
        it is not served."""
        text = os.fsdecode(path)
        located = self.files.locate(text) if "\0" not in text else None
        if located is None:
            raise asyncssh.SFTPNoSuchFile(f"{normalize(text)} is not one of the pod's served files")
        return located

    def _open_now(self, located: Inside, flags: int) -> int:
        """A descriptor for ``located`` opened with ``flags``, every link followed inside its
        root, in one step; typed SFTP errors for a way out, or for nothing there."""
        try:
            return open_beneath(located.root.location, located.relative, flags)
        except OutsideRoot:
            log.info("refused %s to %s: a link that leads out of %s", located.path, self.who, located.root.path)
            raise _denied(f"{located.path} is a link that leads out of {located.root.path}; refused") from None
        except FileNotFoundError:
            raise asyncssh.SFTPNoSuchFile(f"{located.path}: no such file") from None

    def _virtual_attrs(self) -> asyncssh.SFTPAttrs:
        now = int(self._started)
        return asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_DIRECTORY, size=0, uid=0, gid=0,
                                  permissions=stat.S_IFDIR | 0o555, atime=now, mtime=now, nlink=2)

    def _attrs_now(self, located: Virtual | Inside) -> asyncssh.SFTPAttrs:
        if isinstance(located, Virtual):
            return self._virtual_attrs()
        fd = self._open_now(located, os.O_PATH)
        try:
            return asyncssh.SFTPAttrs.from_local(os.fstat(fd))
        finally:
            os.close(fd)

    # -- reading -------------------------------------------------------------------------

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return await self._call(self._attrs_now, self._locate(path))

    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return await self.stat(path)  # links are followed: the developer sees none

    def realpath(self, path: bytes) -> bytes:
        return os.fsencode(normalize(os.fsdecode(path)))

    def format_user(self, uid: int | None) -> str:
        return "" if uid is None else str(uid)  # the pod's user names mean nothing here; no passwd lookup on the loop

    def format_group(self, gid: int | None) -> str:
        return "" if gid is None else str(gid)

    def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        located = self._locate(path)
        self._take_handle(located.path)
        listing = Listing(lambda: self._call(self._list_now, located))
        weakref.finalize(listing, self.service.handles.give, self.session)
        return listing

    def _list_now(self, located: Virtual | Inside) -> list[asyncssh.SFTPName]:
        shown = located.path
        names = [asyncssh.SFTPName(b".", attrs=self._attrs_now(located)),
                 asyncssh.SFTPName(b"..", attrs=self._attrs_now(self._locate(os.fsencode(posixpath.join(shown, "..")))))]
        if isinstance(located, Virtual):
            for child in located.children:
                try:
                    attrs = self._attrs_now(self._locate(os.fsencode(posixpath.join(shown, child))))
                except (asyncssh.SFTPError, OSError):  # a root that is not there (a token that was not mounted)
                    continue
                names.append(asyncssh.SFTPName(os.fsencode(child), attrs=attrs))
            return names
        fd = self._open_now(located, os.O_RDONLY | os.O_DIRECTORY)  # a directory or nothing: no FIFO is opened
        try:
            with os.scandir(fd) as entries:
                listed = sorted(entry.name for entry in entries if not entry.name.startswith(KUBELET_PREFIX))
            for name in listed:
                try:
                    attrs = self._attrs_now(self._locate(os.fsencode(posixpath.join(shown, name))))
                except (asyncssh.SFTPError, OSError):  # listed, but refused when used: the link itself
                    try:
                        attrs = asyncssh.SFTPAttrs.from_local(os.stat(name, dir_fd=fd, follow_symlinks=False))
                    except OSError:
                        continue
                names.append(asyncssh.SFTPName(os.fsencode(name), attrs=attrs))
        finally:
            os.close(fd)
        return names

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        if pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC | asyncssh.FXF_EXCL):
            raise _denied(READ_ONLY)
        located = self._locate(path)
        if isinstance(located, Virtual):
            raise asyncssh.SFTPFailure(f"{located.path} is a directory")
        self._take_handle(located.path)
        try:
            served = await self._call(self._open_file_now, located, undo=lambda f: os.close(f.fd))
        except BaseException:
            self.service.handles.give(self.session)
            raise
        log.debug("%s reads %s", self.who, located.path)
        return served

    def _open_file_now(self, located: Inside) -> ServedFile:
        probe = self._open_now(located, os.O_PATH)  # what it is, first: a FIFO or a device is never opened
        try:
            self._servable_now(located, probe)
        finally:
            os.close(probe)
        fd = self._open_now(located, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)  # never waits, not even for a FIFO
        try:
            size = self._servable_now(located, fd).st_size
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return ServedFile(fd, size)

    def _servable_now(self, located: Inside, fd: int) -> os.stat_result:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise asyncssh.SFTPFailure(f"{located.path} is a directory")
        kind = unservable(st.st_mode)
        if kind is not None:
            log.info("refused %s to %s: %s", located.path, self.who, kind)
            raise _denied(f"{located.path} is {kind}; only regular files and directories are served")
        return st

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        assert isinstance(file_obj, ServedFile)
        return await self._call(os.pread, file_obj.fd, min(size, MAX_READ), offset)  # short, as SFTP allows

    async def fstat(self, file_obj: object) -> os.stat_result:
        assert isinstance(file_obj, ServedFile)
        return await self._call(os.fstat, file_obj.fd)

    async def close(self, file_obj: object) -> None:
        assert isinstance(file_obj, ServedFile)
        self.service.handles.give(self.session)
        await self.service.close(file_obj.fd)

    async def readlink(self, path: bytes) -> bytes:
        located = self._locate(path)
        await self._call(self._attrs_now, located)  # not served, no such file or leading out: that first
        raise _denied(f"{located.path}: the agent follows links itself; the pod's files are served without them")

    async def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        located = self._locate(path)
        if isinstance(located, Virtual):
            raise asyncssh.SFTPOpUnsupported("no file system above the served files")
        return asyncssh.SFTPVFSAttrs.from_local(await self._call(self._statvfs_now, located))

    def _statvfs_now(self, located: Inside) -> os.statvfs_result:
        fd = self._open_now(located, os.O_PATH)
        try:
            return os.fstatvfs(fd)
        finally:
            os.close(fd)

    async def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        assert isinstance(file_obj, ServedFile)
        return asyncssh.SFTPVFSAttrs.from_local(await self._call(os.fstatvfs, file_obj.fd))

    # -- writing: never ----------------------------------------------------------------------

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: asyncssh.SFTPAttrs) -> object:
        raise asyncssh.SFTPOpUnsupported(f"SFTP version {SFTP_VERSION} only")

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        raise _denied(READ_ONLY)

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        raise _denied(READ_ONLY)

    def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        raise _denied(READ_ONLY)

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        raise _denied(READ_ONLY)

    def remove(self, path: bytes) -> None:
        raise _denied(READ_ONLY)

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        raise _denied(READ_ONLY)

    def rmdir(self, path: bytes) -> None:
        raise _denied(READ_ONLY)

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        raise _denied(READ_ONLY)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        raise _denied(READ_ONLY)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise _denied(READ_ONLY)

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise _denied(READ_ONLY)

    def fsync(self, file_obj: object) -> None:
        pass  # nothing was written


def sftp_session(service: FileService, session: str, who: str) -> SSHServerStreamSession[bytes]:
    """The session that serves ``service``'s files on an ``sftp`` subsystem channel of
    ``session`` (its id; ``who``: its name, for the log)."""
    stream: SSHServerStreamSession[bytes] = SSHServerStreamSession(
        None, lambda chan: FileServer(chan, service, session, who, stream), SFTP_VERSION)
    return stream


__all__ = ["FileServer", "FileService", "sftp_session"]
