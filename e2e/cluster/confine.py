"""A container's securityContext, made real for a process: its user, a read-only root, its mounts.

There is no container engine, so a container that must be held to its promises (the
agent: non-root, read-only root filesystem, credentials read-only) runs under
bubblewrap (``bwrap``, Debian's ``bubblewrap``) and util-linux's ``setpriv``, as root
starts them, in the pod's network namespace:

- a private mount namespace whose ``/`` is this machine's root, bound read-only with
  every mount under it; ``/tmp`` and ``/run`` are the container's own, empty, and
  read-only too when ``readOnlyRootFilesystem`` is set (as an image's are); a fresh
  ``/dev`` and ``/proc`` (its own PID namespace);
- each volumeMount bound at its ``mountPath`` (read-only when the mount says so, and
  always for Secret and ConfigMap volumes, as a kubelet mounts them); a mountPath that
  cannot be made on the read-only root (it does not exist, and is not under ``/tmp`` or
  ``/run``) is bound under ``/run/volumes/NAME`` instead, and the caller maps paths to it;
- host paths the process must read (the interpreter, the code) that a non-root user
  could not reach (``/root`` is 0700) are bound at their own paths over an empty,
  read-only tmpfs that hides the rest of the directory that hid them;
- then ``setpriv`` switches to ``runAsUser``/``runAsGroup`` (the image's ``USER`` when
  unset), sets the supplementary groups (``fsGroup``, ``supplementalGroups``), empties
  the capability bounding set when ``capabilities.drop`` has ``ALL`` (keeping
  ``capabilities.add``), and sets no_new_privs unless ``allowPrivilegeEscalation`` is
  true. The process dies with the runner (``--die-with-parent``).

Not modelled: seccomp profiles, SELinux/AppArmor options, ``procMount``, user namespaces.
:func:`image_config` reads the ``USER`` and ``ENV`` an image's Dockerfile gives it, so the
tests run a process as its image would.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

Obj = dict[str, Any]

CONTAINER_DIRS = ("/tmp", "/run")  # the container's own: empty, not this machine's
VOLUMES_DIR = "/run/volumes"  # where a mountPath that cannot be made on the read-only root goes


def unavailable() -> str | None:
    """Why processes cannot be confined here, or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root to confine containers (bubblewrap and setpriv: a private mount namespace, another user)"
    missing = [tool for tool, package in (("bwrap", "bubblewrap"), ("setpriv", "util-linux"))
               if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed: the agent containers run as their securityContext says, "
                "under bubblewrap and setpriv (apt-get install bubblewrap util-linux)")
    return None


@dataclass(frozen=True)
class ImageConfig:
    """What an image's Dockerfile says about running it: its ``USER`` and its ``ENV``."""

    uid: int
    gid: int
    env: dict[str, str] = field(default_factory=dict)


def image_config(dockerfile: Path) -> ImageConfig:
    """The final stage's ``USER uid[:gid]`` (numeric, root when absent) and ``ENV`` of ``dockerfile``."""
    uid, gid, env = 0, 0, {}
    for instruction in _instructions(dockerfile.read_text()):
        word, _, rest = instruction.partition(" ")
        word = word.upper()
        if word == "FROM":
            uid, gid, env = 0, 0, {}
        elif word == "USER":
            user, _, group = rest.strip().partition(":")
            uid = int(user)
            gid = int(group) if group else uid
        elif word == "ENV":
            for item in shlex.split(rest):
                key, eq, value = item.partition("=")
                if not eq:
                    raise ValueError(f"{dockerfile}: ENV {rest!r}: only the KEY=VALUE form is read here")
                env[key] = value
    return ImageConfig(uid, gid, env)


def _instructions(text: str) -> Iterable[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        yield (current + stripped).strip()
        current = ""
    if current.strip():
        yield current.strip()


@dataclass(frozen=True)
class Mount:
    """A directory of this machine bound at ``target`` in the container."""

    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class Confinement:
    """How one container's process runs: see the module's docstring. :meth:`argv` is a pure function."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    read_only_root: bool = True
    drop_all_capabilities: bool = True
    keep_capabilities: tuple[str, ...] = ()
    no_new_privs: bool = True
    mounts: tuple[Mount, ...] = ()
    reach: tuple[str, ...] = ()  # host paths the process reads (interpreter, code), made reachable where hidden
    workdir: str = "/"
    env: tuple[tuple[str, str], ...] = ()  # set inside, over the runner's environment (PATH: the runner needs its own)

    def argv(self, command: list[str]) -> list[str]:
        """``command`` wrapped in ``bwrap ... -- setpriv ... --``."""
        tmpfs = list(CONTAINER_DIRS)
        binds: dict[str, str] = {}  # path -> the tmpfs it is bound in
        for wanted in self.reach:
            path = os.path.realpath(wanted)
            hidden = _hiding_dir(path, tmpfs)
            if hidden is not None:
                if hidden not in tmpfs:
                    tmpfs.append(hidden)
                binds[path] = hidden
        out = ["bwrap", "--die-with-parent", "--unshare-pid", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        for directory in sorted(tmpfs, key=lambda p: (p.count("/"), p)):
            out += ["--perms", "0755", "--tmpfs", directory]
        made: set[str] = set()
        for path, under in sorted(binds.items()):
            out += _parents(path, under, made)
            out += ["--ro-bind", path, path]
        for mount in self.mounts:
            under = next((d for d in tmpfs if mount.target.startswith(d + "/")), None)
            out += _parents(mount.target, under, made) if under else []
            out += ["--ro-bind" if mount.read_only else "--bind", str(mount.source), mount.target]
        read_only = tmpfs if self.read_only_root else tmpfs[len(CONTAINER_DIRS):]
        for directory in read_only:
            out += ["--remount-ro", directory]
        for key, value in self.env:
            out += ["--setenv", key, value]
        out += ["--unsetenv", "PWD"]  # bwrap sets it on --chdir; a container runtime does not
        out += ["--chdir", self.workdir, "--", *self.setpriv(), "--", *command]
        return out

    def setpriv(self) -> list[str]:
        out = [shutil.which("setpriv") or "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}"]
        out += [f"--groups={','.join(map(str, self.groups))}"] if self.groups else ["--clear-groups"]
        if self.drop_all_capabilities:
            keep = "".join(f",+{c.lower()}" for c in self.keep_capabilities)
            out += [f"--bounding-set=-all{keep}", f"--inh-caps=-all{keep}"]
        if self.no_new_privs:
            out.append("--no-new-privs")
        return out


def _parents(path: str, top: str, made: set[str]) -> list[str]:
    """bwrap arguments that make the directories between tmpfs ``top`` and ``path``, searchable by all."""
    out = []
    parent = PurePosixPath(path).parent
    for directory in reversed([parent, *parent.parents]):
        d = str(directory)
        if d.startswith(top + "/") and d not in made:
            made.add(d)
            out += ["--perms", "0755", "--dir", d]
    return out


def _hiding_dir(path: str, tmpfs: list[str]) -> str | None:
    """The first directory on the way to ``path`` that the confined process would not see it through.

    That is a directory replaced by a tmpfs in the container, or one that others may not
    search (no ``o+x``: a non-root user cannot pass it). None: ``path`` is visible as it is.
    """
    parts = PurePosixPath(path).parts
    for depth in range(2, len(parts) + 1):
        directory = str(PurePosixPath(*parts[:depth]))
        if directory in tmpfs:
            return directory
        if depth == len(parts):
            return None
        try:
            mode = os.stat(directory).st_mode
        except OSError:
            return None
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return directory
    return None


def for_container(pod: Obj, container: Obj, image: ImageConfig, volumes: dict[str, Path],
                  reach: Iterable[str] = (), env: dict[str, str] | None = None
                  ) -> tuple[Confinement, list[tuple[str, str]]]:
    """The confinement the pod spec asks for ``container``, and the mountPaths moved under :data:`VOLUMES_DIR`.

    ``volumes`` maps a volume name to the directory that holds it; the moved mountPaths come
    as ``(mountPath, path in the container)`` pairs, for the caller to map in the env and args.
    """
    spec = pod.get("spec") or {}
    pod_context = spec.get("securityContext") or {}
    context = container.get("securityContext") or {}
    uid = context.get("runAsUser", pod_context.get("runAsUser"))
    gid = context.get("runAsGroup", pod_context.get("runAsGroup"))
    if uid is None:
        uid, gid = image.uid, image.gid if gid is None else gid
    groups = tuple(dict.fromkeys([*([pod_context["fsGroup"]] if "fsGroup" in pod_context else []),
                                  *(pod_context.get("supplementalGroups") or [])]))
    capabilities = context.get("capabilities") or {}
    always_read_only = {v["name"] for v in spec.get("volumes") or [] if "secret" in v or "configMap" in v}
    mounts, moved = [], []
    for m in container.get("volumeMounts") or []:
        source = volumes.get(m["name"])
        if source is None:
            continue
        target = os.path.realpath(m["mountPath"])
        if not _can_mount_at(target):
            moved.append((m["mountPath"].rstrip("/") or "/", f"{VOLUMES_DIR}/{m['name']}"))
            target = f"{VOLUMES_DIR}/{m['name']}"
        mounts.append(Mount(source, target, bool(m.get("readOnly")) or m["name"] in always_read_only))
    confinement = Confinement(
        uid=int(uid),
        gid=int(gid if gid is not None else uid),
        groups=tuple(int(g) for g in groups),
        read_only_root=bool(context.get("readOnlyRootFilesystem")),
        drop_all_capabilities="ALL" in (capabilities.get("drop") or []),
        keep_capabilities=tuple(capabilities.get("add") or []),
        no_new_privs=context.get("allowPrivilegeEscalation") is not True,
        mounts=tuple(mounts),
        reach=tuple(reach),
        workdir=container.get("workingDir") or "/",
        env=tuple((env or {}).items()),
    )
    return confinement, moved


def _can_mount_at(target: str) -> bool:
    """Whether bwrap can bind at ``target``: it exists, or it lies in a directory that is the container's own."""
    return os.path.isdir(target) or any(target == d or target.startswith(d + "/") for d in CONTAINER_DIRS)
