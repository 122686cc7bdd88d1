"""asyncssh's SFTP server over :class:`intercept.agent.files.ServedFiles`: the pod's files, read-only.

The invariants are those of :mod:`intercept.agent.files`; this module is only the SFTP
protocol's side, loaded with the agent's SSH server.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import time
from collections.abc import AsyncIterator

import asyncssh
from asyncssh.stream import SSHServerStreamSession

from intercept.agent.files import KUBELET_PREFIX, READ_ONLY, SFTP_VERSION, ServedFiles, Virtual, normalize

log = logging.getLogger("intercept.agent.files")


def _denied(reason: str) -> asyncssh.SFTPPermissionDenied:
    return asyncssh.SFTPPermissionDenied(reason)


class FileServer(asyncssh.SFTPServer):
    """asyncssh's SFTP server over :class:`ServedFiles`: read-only, links followed, nothing outside."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], files: ServedFiles, who: str) -> None:
        super().__init__(chan)
        self.files = files
        self.who = who
        self._started = time.time()

    # -- paths ---------------------------------------------------------------------------

    def _real(self, path: bytes) -> tuple[str, Virtual | str]:
        """(the client's path normalized, the virtual directory or the real path it reaches);
        typed SFTP errors for what is not served or leads out."""
        text = os.fsdecode(path)
        located = self.files.locate(text)
        if located is None:
            raise asyncssh.SFTPNoSuchFile(f"{normalize(text)} is not one of the pod's served files")
        if isinstance(located, Virtual):
            return located.path, located
        real_root = os.path.realpath(located.root.location)
        real = os.path.realpath(located.local)
        if not ServedFiles.contained(real, real_root):
            log.info("refused %s to %s: a link that leads out of %s", located.path, self.who, located.root.path)
            raise _denied(f"{located.path} is a link that leads out of {located.root.path}; refused")
        if not os.path.lexists(real):
            raise asyncssh.SFTPNoSuchFile(f"{located.path}: no such file")
        return located.path, real

    def _virtual_attrs(self) -> asyncssh.SFTPAttrs:
        now = int(self._started)
        return asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_DIRECTORY, size=0, uid=0, gid=0,
                                  permissions=stat.S_IFDIR | 0o555, atime=now, mtime=now, nlink=2)

    def _attrs(self, path: bytes) -> asyncssh.SFTPAttrs:
        _, target = self._real(path)
        if isinstance(target, Virtual):
            return self._virtual_attrs()
        return asyncssh.SFTPAttrs.from_local(os.stat(target))

    # -- reading -------------------------------------------------------------------------

    def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return self._attrs(path)

    def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return self._attrs(path)  # links are followed: the developer sees none

    def realpath(self, path: bytes) -> bytes:
        return os.fsencode(normalize(os.fsdecode(path)))

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        shown, target = self._real(path)
        for name in (b".", b".."):
            yield asyncssh.SFTPName(name, attrs=self._attrs(os.fsencode(posixpath.join(shown, name.decode()))))
        if isinstance(target, Virtual):
            for child in target.children:
                try:
                    attrs = self._attrs(os.fsencode(posixpath.join(shown, child)))
                except asyncssh.SFTPError:  # a root that is not there (a token that was not mounted)
                    continue
                yield asyncssh.SFTPName(os.fsencode(child), attrs=attrs)
            return
        with os.scandir(target) as entries:
            names = sorted(entry.name for entry in entries if not entry.name.startswith(KUBELET_PREFIX))
        for name in names:
            try:
                attrs = self._attrs(os.fsencode(posixpath.join(shown, name)))
            except (asyncssh.SFTPError, OSError):  # listed, but refused when used: the link itself
                try:
                    attrs = asyncssh.SFTPAttrs.from_local(os.lstat(os.path.join(target, name)))
                except OSError:
                    continue
            yield asyncssh.SFTPName(os.fsencode(name), attrs=attrs)

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        if pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC | asyncssh.FXF_EXCL):
            raise _denied(READ_ONLY)
        shown, target = self._real(path)
        if isinstance(target, Virtual) or os.path.isdir(target):
            raise asyncssh.SFTPFailure(f"{shown} is a directory")
        log.debug("%s reads %s", self.who, shown)
        return open(target, "rb", buffering=0)  # noqa: SIM115 - closed by close()

    def readlink(self, path: bytes) -> bytes:
        shown, _ = self._real(path)
        raise _denied(f"{shown}: the agent follows links itself; the pod's files are served without them")

    def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        _, target = self._real(path)
        if isinstance(target, Virtual):
            raise asyncssh.SFTPOpUnsupported("no file system above the served files")
        return asyncssh.SFTPVFSAttrs.from_local(os.statvfs(target))

    def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        return asyncssh.SFTPVFSAttrs.from_local(os.fstatvfs(file_obj.fileno()))  # type: ignore[attr-defined]

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


def sftp_session(files: ServedFiles, who: str) -> SSHServerStreamSession[bytes]:
    """The session that serves ``files`` on an ``sftp`` subsystem channel."""
    return SSHServerStreamSession(None, lambda chan: FileServer(chan, files, who), SFTP_VERSION)


__all__ = ["FileServer", "sftp_session"]
