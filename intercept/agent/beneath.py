"""Opening a path below a served root in one step: every link followed, none leading out.

A path checked (``realpath``) and then opened again can change in between: a writer inside
a served, app-writable directory (an emptyDir) that swaps a directory for a symlink makes
the second resolution leave the root. Here the resolution that is judged is the one that
opens: ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`` from a descriptor of the root
where the kernel has it (Linux 5.6; called through its system call number, Python has no
wrapper), else :func:`walk`, one name at a time from directory descriptors, each opened
``O_NOFOLLOW``, each link read from the very descriptor that was opened for it.

Links inside the root are followed: relative ones from the directory that holds them (a
ConfigMap's ``key -> ..data/key``, ``..data -> ..2026_12_06_...``), absolute ones when they
name a path below the root's location. A ``..`` that would climb above the root, even on
the way back down, or an absolute link anywhere else, is :class:`OutsideRoot`. openat2
refuses absolute links altogether; those are left to :func:`walk`, so that both ways
answer alike.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import posixpath
import stat
from typing import Any

MAX_LINKS = 40  # links followed in one resolution, as Linux allows (then ELOOP)

# openat2(2): its number is the same on every architecture whose numbers were unified in 5.1
_OPENAT2 = 437 if platform.machine() in {"x86_64", "aarch64", "armv7l", "armv8l", "riscv64", "ppc64le", "s390x",
                                         "loongarch64"} else None
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08


class OutsideRoot(Exception):
    """The path, or a link on its way, leads out of the root."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@functools.cache
def _syscall() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall


def openat2(dir_fd: int, path: str, flags: int) -> int:
    """``path`` opened with ``flags`` below ``dir_fd`` by the kernel, never leaving it
    (``RESOLVE_BENEATH``), through no magic link. OSError as the system call fails: EXDEV
    for a way out (or an absolute link), ENOSYS where the kernel has no openat2."""
    if _OPENAT2 is None:
        raise OSError(errno.ENOSYS, "openat2 is not known on this architecture")
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = _syscall()(ctypes.c_long(_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(path)),
                    ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return int(fd)


def _kernel_resolves() -> bool:
    """Whether openat2 works here: Linux 5.6 or later, and no seccomp profile that refuses it
    (older container runtimes answer EPERM or ENOSYS)."""
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        os.close(openat2(root, ".", os.O_PATH))
    except OSError:
        return False
    finally:
        os.close(root)
    return True


KERNEL_RESOLVES = _kernel_resolves()


def follow(target: str, roots: tuple[str, ...]) -> tuple[bool, list[str]]:
    """Where a link whose text is ``target`` leads: (whether from the root, the names to
    resolve). A relative link goes on from its own directory; an absolute one from the root
    when it names one of ``roots`` (the root's location, as given and resolved) or a path
    below it, and is :class:`OutsideRoot` otherwise. The names after the root are left as
    they are (a ``..`` among them is resolved where it is met, as the kernel would). Sans-IO."""
    if not target.startswith("/"):
        return False, target.split("/")
    for root in roots:
        if target == root or target.startswith(root.rstrip("/") + "/"):
            return True, target[len(root):].split("/")
    raise OutsideRoot(target)


def walk(root_fd: int, path: str, flags: int, roots: tuple[str, ...]) -> int:
    """``path`` (relative) opened with ``flags`` below the directory ``root_fd``, one name at
    a time: each opened ``O_PATH | O_NOFOLLOW`` from the descriptor of the directory before
    it, a link read from its own descriptor and its text resolved in its place (:func:`follow`),
    a ``..`` taken back to the directory the walk came from. The last name is opened with
    ``flags | O_NOFOLLOW`` from its directory's descriptor, so what is opened is always a
    name inside the root, whatever changes meanwhile."""
    dirs = [root_fd]  # the directories the walk went through, the root first (the caller's to close)
    todo = path.split("/")[::-1]  # the names still to resolve, the next one last
    links = 0
    try:
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(dirs) == 1:
                    raise OutsideRoot(path)
                os.close(dirs.pop())
                continue
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirs[-1])
            try:
                mode = os.fstat(fd).st_mode
                if stat.S_ISLNK(mode):
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    from_root, parts = follow(os.readlink("", dir_fd=fd), roots)  # the link opened, not its name again
                    if from_root:
                        _close(dirs[1:])
                        del dirs[1:]
                    todo.extend(reversed(parts))
                    continue
                if any(n not in ("", ".") for n in todo):  # more to come: this one must be a directory
                    if not stat.S_ISDIR(mode):
                        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                    dirs.append(fd)
                    fd = -1
                    continue
                if flags & os.O_PATH:
                    fd, opened = -1, fd
                    return opened
                try:
                    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirs[-1])
                except OSError as e:
                    if e.errno != errno.ELOOP:
                        raise
                    links += 1  # it became a link meanwhile: resolved again, as one (and counted as one)
                    if links > MAX_LINKS:
                        raise
                    todo.append(name)
            finally:
                if fd >= 0:
                    os.close(fd)
        # every name resolved to a directory the walk holds (a path ending in "..", or empty)
        return os.dup(dirs[-1]) if flags & os.O_PATH else os.open(".", flags | os.O_CLOEXEC, dir_fd=dirs[-1])
    finally:
        _close(dirs[1:])


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def open_beneath(location: str, path: str, flags: int, *, kernel: bool | None = None) -> int:
    """``path`` (relative; ``""``: the root itself) opened with ``flags`` below the served
    root at ``location`` (a directory, or a file), every link followed and none out of it.

    openat2 when ``kernel`` (default: where it works, :data:`KERNEL_RESOLVES`), else
    :func:`walk`; a way the kernel refuses (EXDEV: an absolute link, or a way out) or
    answers EAGAIN for (a rename raced a ``..``) is walked, so both answer alike. Raises
    :class:`OutsideRoot`, or OSError (``FileNotFoundError`` for nothing there).
    """
    if not path:
        return os.open(location, flags | os.O_CLOEXEC)  # the root is whatever its location is now
    root_fd = os.open(location, os.O_PATH | os.O_CLOEXEC)
    try:
        if KERNEL_RESOLVES if kernel is None else kernel:
            try:
                return openat2(root_fd, path, flags)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EAGAIN, errno.ELOOP):
                    raise
        return walk(root_fd, path, flags, (posixpath.normpath(location), os.path.realpath(location)))
    finally:
        os.close(root_fd)


__all__ = ["KERNEL_RESOLVES", "MAX_LINKS", "OutsideRoot", "follow", "open_beneath", "openat2", "walk"]
