"""The pod's files, served read-only to authenticated developers over SFTP.

The injection gives the agent container the app container's volume mounts, read-only,
at the same paths (ConfigMaps, Secrets, certificates, the service account token); in
direct mode ``intercept agent --serve-files DIR`` names what is served. Each served
root has a ``path`` (where the developer sees it: the app's ``mountPath``) and a
``location`` (where the agent reads it; the same path in a pod).

The developer's SSH session opens the ``sftp`` subsystem (:data:`intercept.protocol.FILES_SUBSYSTEM`)
and sees one tree: every root at its path, and above them read-only directories that
hold only the way to the roots. :class:`ServedFiles` is that tree, sans-IO;
:class:`intercept.agent.sftp.FileServer` is asyncssh's SFTP server over it (apart, so that
an agent no developer has reached yet never loads asyncssh).

Invariants:

- Nothing outside the roots is reachable: a path is normalized (``..`` never climbs out
  of ``/``) and must fall under a root; below the root's location it is resolved and
  opened in one step (:mod:`intercept.agent.beneath`), so that no link on its way, even
  one swapped in meanwhile, leads out of the root. A symlink pointing out is listed (so
  that the developer sees it exists) but refused: its attributes are the link's, and
  opening, reading or following it is ``permission denied`` with the reason.
- Links inside a root are followed by the agent, so the developer sees no symlinks: a
  ConfigMap volume's ``key -> ..data/key`` is the file itself, and a ConfigMap update
  (the kubelet swaps ``..data``) shows at the same path. The kubelet's own entries
  (names beginning with ``..``) are left out of listings.
- Nothing is writable: every request that would write, create, remove, rename, link or
  change attributes is ``permission denied``.
- Only regular files and directories are served: a FIFO, a socket or a device is listed,
  but opening it is ``permission denied`` (an open could block, or act on a device).
- One session costs the others no more than its share (the agent is shared by every
  developer of the service): a READ is answered with at most :data:`MAX_READ` bytes (a
  short read, as SFTP allows); a session holds at most :data:`MAX_HANDLES_PER_SESSION`
  open files and directories and all sessions together at most :data:`MAX_HANDLES` (and
  a quarter of the agent's file descriptors); a session has at most
  :data:`MAX_CHANNELS_PER_SESSION` SFTP channels; no file system call runs on the event
  loop; and a channel whose client does not read its answers is not answered further.
- Only an authenticated SSH session reaches this (the SSH server takes only the token).
  File contents are never logged; paths are, at debug level.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

READ_ONLY = "the pod's files are served read-only"
KUBELET_PREFIX = ".."  # AtomicWriter's own entries in ConfigMap, Secret and projected volumes
SFTP_VERSION = 3
MAX_READ = 256 * 1024  # bytes one READ is answered with, at most (OpenSSH's sftp-server answers as short)
MAX_HANDLES_PER_SESSION = 128  # open files and directories one session may hold
MAX_HANDLES = 1024  # ... all sessions together; and at most a quarter of the agent's file descriptors
MAX_CHANNELS_PER_SESSION = 8  # SFTP channels of one session (sshfs and `intercept files` open one)

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


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
    """A path under ``root``: the agent resolves ``relative`` below the root's location."""

    path: str
    root: ServedRoot

    @property
    def relative(self) -> str:
        """The path below its root (``""``: the root itself)."""
        return self.path[len(self.root.path):].lstrip("/")


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
            return Inside(path, owner)
        prefix = path.rstrip("/") + "/"
        children = sorted({r.path[len(prefix):].split("/", 1)[0] for r in self.roots if r.path.startswith(prefix)})
        return Virtual(path, tuple(children)) if children else None


def unservable(mode: int) -> str | None:
    """What a file of ``mode`` (``st_mode``, links resolved) is, when it is not served: anything
    but a regular file or a directory (``"a FIFO"``, ``"a socket"``, ...). None: it is served."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "neither a regular file nor a directory")


class Quota:
    """How much of one shared thing (``what``: "open files and directories") the sessions hold:
    at most ``per_session`` each and ``total`` in all. Sans-IO: sessions are names."""

    def __init__(self, what: str, per_session: int, total: int) -> None:
        self.what = what
        self.per_session = per_session
        self.total = total
        self.held = 0
        self._by_session: dict[str, int] = {}

    def take(self, session: str) -> str | None:
        """Count one more for ``session``; or, counting nothing, the reason it may not have one."""
        mine = self._by_session.get(session, 0)
        if mine >= self.per_session:
            return f"this session holds {mine} {self.what}, the most one session may; close some"
        if self.held >= self.total:
            return (f"the agent's {self.total} {self.what} for its sessions are all in use; "
                    "try again when other sessions close some")
        self._by_session[session] = mine + 1
        self.held += 1
        return None

    def give(self, session: str) -> None:
        """One that ``session`` took is given back."""
        left = self._by_session[session] - 1
        if left:
            self._by_session[session] = left
        else:
            del self._by_session[session]
        self.held -= 1


def handle_quota(fd_limit: int) -> Quota:
    """The handles all sessions may hold, for an agent that may open ``fd_limit`` descriptors:
    a quarter of them (HTTP connections, upstream connections and SSH need the rest), at
    most :data:`MAX_HANDLES`, and at least one session's worth."""
    total = max(MAX_HANDLES_PER_SESSION, min(MAX_HANDLES, fd_limit // 4))
    return Quota("open files and directories", MAX_HANDLES_PER_SESSION, total)


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


def describe(files: ServedFiles) -> list[dict[str, Any]]:
    """The roots as the agent tells its clients (``hello``): path and whether it exists now."""
    return [{"path": r.path, "present": os.path.exists(r.location)} for r in files.roots]


__all__ = ["MAX_CHANNELS_PER_SESSION", "MAX_HANDLES", "MAX_HANDLES_PER_SESSION", "MAX_READ", "MOUNTS_ENV", "Inside",
           "Quota", "ServedFiles", "ServedRoot", "Virtual", "describe", "handle_quota", "mounts_from_env", "normalize",
           "parse_serve_files", "unservable"]
