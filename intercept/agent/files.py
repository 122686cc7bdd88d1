"""The pod's files, served read-only to authenticated developers over SFTP.

The injection gives the agent container the app container's volume mounts, read-only,
at the same paths (ConfigMaps, Secrets, certificates, the service account token); in
direct mode ``intercept agent --serve-files DIR`` names what is served. Each served
root has a ``path`` (where the developer sees it: the app's ``mountPath``) and a
``location`` (where the agent reads it; the same path in a pod).

The developer's SSH session opens the ``sftp`` subsystem (:data:`intercept.protocol.FILES_SUBSYSTEM`)
and sees one tree: every root at its path, and above them read-only directories that
hold only the way to the roots. :class:`ServedFiles` is that tree, sans-IO;
:class:`FileServer` is asyncssh's SFTP server over it.

Invariants:

- Nothing outside the roots is reachable: a path is normalized (``..`` never climbs out
  of ``/``), must fall under a root, and its real path (every symlink resolved) must stay
  under that root's real location. A symlink pointing out, or nowhere, is listed (so that
  the developer sees it exists) but refused: its attributes are the link's, and opening,
  reading or following it is ``permission denied`` with the reason.
- Links inside a root are followed by the agent, so the developer sees no symlinks: a
  ConfigMap volume's ``key -> ..data/key`` is the file itself, and a ConfigMap update
  (the kubelet swaps ``..data``) shows at the same path. The kubelet's own entries
  (names beginning with ``..``) are left out of listings.
- Nothing is writable: every request that would write, create, remove, rename, link or
  change attributes is ``permission denied``.
- Only an authenticated SSH session reaches this (the SSH server takes only the token).
  File contents are never logged; paths are, at debug level.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import stat
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncssh
from asyncssh.stream import SSHServerStreamSession

log = logging.getLogger(__name__)

READ_ONLY = "the pod's files are served read-only"
KUBELET_PREFIX = ".."  # AtomicWriter's own entries in ConfigMap, Secret and projected volumes
SFTP_VERSION = 3


@dataclass(frozen=True)
class ServedRoot:
    """One served mount: seen at ``path``, read from ``location`` (both absolute)."""

    path: str
    location: str


@dataclass(frozen=True)
class Virtual:
    """A directory above the roots: it holds only ``children`` (names), each toward a root."""

    path: str
    children: tuple[str, ...]


@dataclass(frozen=True)
class Inside:
    """A path under ``root``: ``local`` is where the agent reads it (links not yet resolved)."""

    path: str
    root: ServedRoot
    local: str


def normalize(path: str) -> str:
    """``path`` as an absolute, normalized path: ``..`` never climbs above ``/``."""
    return "/" + posixpath.normpath(posixpath.join("/", path)).lstrip("/")


class ServedFiles:
    """The served roots as one tree (sans-IO: no file is touched here).

    ``roots`` may nest (a mount inside another's path); the deepest root owns a path.
    """

    def __init__(self, roots: Iterable[ServedRoot]) -> None:
        by_path: dict[str, ServedRoot] = {}
        for root in roots:
            path = normalize(root.path)
            if not posixpath.isabs(root.path) or path == "/":
                raise ValueError(f"served path {root.path!r}: it must be an absolute path below /")
            by_path.setdefault(path, ServedRoot(path, root.location))
        self.roots: tuple[ServedRoot, ...] = tuple(sorted(by_path.values(), key=lambda r: r.path))

    def __bool__(self) -> bool:
        return bool(self.roots)

    def locate(self, path: str) -> Virtual | Inside | None:
        """Where ``path`` (as the client wrote it) leads: a directory above the roots, a path
        under one, or None (not served)."""
        path = normalize(path)
        owner = max((r for r in self.roots if path == r.path or path.startswith(r.path + "/")),
                    key=lambda r: len(r.path), default=None)
        if owner is not None:
            return Inside(path, owner, owner.location + path[len(owner.path):])
        prefix = path.rstrip("/") + "/"
        children = sorted({r.path[len(prefix):].split("/", 1)[0] for r in self.roots if r.path.startswith(prefix)})
        return Virtual(path, tuple(children)) if children else None

    @staticmethod
    def contained(real: str, real_root: str) -> bool:
        """Whether ``real`` (a resolved path) is ``real_root`` or below it."""
        return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def parse_serve_files(values: Iterable[str]) -> list[ServedRoot]:
    """``--serve-files DIR`` values: each served at its own absolute path."""
    roots = []
    for value in values:
        location = os.path.abspath(os.path.expanduser(value))
        roots.append(ServedRoot(location, location))
    return roots


MOUNTS_ENV = "INTERCEPT_MOUNTS"


def mounts_from_env(env: Mapping[str, str]) -> list[ServedRoot]:
    """The app's mounts as the injection describes them to the agent: ``INTERCEPT_MOUNTS``,
    a JSON list of the ``mountPath`` values (where the developer sees each), and
    ``INTERCEPT_MOUNT_<i>``, where the agent reads the i-th. In a pod both are the mount
    path; a runtime that puts volumes elsewhere rewrites only the second (the test
    harness's kubelet does). ValueError for a malformed list."""
    text = env.get(MOUNTS_ENV)
    if not text:
        return []
    paths = json.loads(text)
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{MOUNTS_ENV}: expected a JSON list of paths, got {text[:100]!r}")
    return [ServedRoot(path, env.get(f"{MOUNTS_ENV[:-1]}_{i}", path)) for i, path in enumerate(paths)]


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


def describe(files: ServedFiles) -> list[dict[str, Any]]:
    """The roots as the agent tells its clients (``hello``): path and whether it exists now."""
    return [{"path": r.path, "present": os.path.exists(r.location)} for r in files.roots]


__all__ = ["MOUNTS_ENV", "FileServer", "Inside", "ServedFiles", "ServedRoot", "Virtual", "mounts_from_env", "normalize",
           "parse_serve_files", "sftp_session"]
