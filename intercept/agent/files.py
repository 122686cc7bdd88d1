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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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


def describe(files: ServedFiles) -> list[dict[str, Any]]:
    """The roots as the agent tells its clients (``hello``): path and whether it exists now."""
    return [{"path": r.path, "present": os.path.exists(r.location)} for r in files.roots]


__all__ = ["MOUNTS_ENV", "Inside", "ServedFiles", "ServedRoot", "Virtual", "describe", "mounts_from_env", "normalize",
           "parse_serve_files"]
