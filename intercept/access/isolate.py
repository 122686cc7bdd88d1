"""Linux without root: COMMAND in a private mount namespace whose ``/etc/hosts`` is its own.

The child, between fork and exec, enters a new user namespace (its own uid and gid mapped
to themselves, so COMMAND runs as the same user, without capabilities once it execs) and
a new mount namespace, makes every mount private, and bind-mounts a file of ours over
``/etc/hosts``: the machine's own lines, then the cluster's names
(:func:`intercept.access.names.with_cluster_names`). Nothing changes for any other
process, and nothing is left behind: the namespace ends with COMMAND's last process.

The file is rewritten in place (same inode: the bind mount holds it) as Services come and
go; resolvers read ``/etc/hosts`` at each lookup, so COMMAND sees the change at once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18


class IsolationError(OSError):
    """The private namespace could not be made (user namespaces off, or a mount refused)."""


def private_hosts(hosts: Path, target: str = "/etc/hosts") -> Callable[[], None]:
    """What the child runs between fork and exec: enter the namespaces, bind ``hosts`` over ``target``.

    Async-signal-safe enough for a preexec function: no allocation beyond ctypes calls and
    small writes; failures raise, which fails the start of COMMAND with the reason.
    """
    uid, gid = os.getuid(), os.getgid()
    source, where = os.fsencode(hosts), os.fsencode(target)
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            code = ctypes.get_errno()
            # the parent sees only "Exception occurred in preexec_fn": say why on the child's stderr
            os.write(2, f"intercept: error: a hosts file of its own for the command: {what}: {os.strerror(code)}\n".encode())
            raise IsolationError(code, f"{what}: {os.strerror(code)}")

    def setup() -> None:
        check(libc.unshare(CLONE_NEWNS if uid == 0 else CLONE_NEWNS | CLONE_NEWUSER), "unshare")
        if uid != 0:
            _write("/proc/self/setgroups", b"deny")
            _write("/proc/self/uid_map", b"%d %d 1" % (uid, uid))
            _write("/proc/self/gid_map", b"%d %d 1" % (gid, gid))
        check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
        check(libc.mount(source, where, None, MS_BIND, None), f"bind-mounting over {target}")

    return setup


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def rewrite(path: Path, data: bytes) -> None:
    """Replace the content of ``path`` in place (the same inode: a bind mount of it sees the change)."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def available() -> str | None:
    """None when this machine lets this user make the private namespace; else why not."""
    if sys.platform != "linux":
        return f"{sys.platform} has no mount namespaces"
    setup = private_hosts(Path("/etc/hosts"))  # binding a file over itself: a harmless probe
    try:
        subprocess.run(["true"], preexec_fn=setup, check=True, capture_output=True, timeout=10)
    except subprocess.SubprocessError as e:
        return f"user and mount namespaces are not available to this user ({_reason(e)})"
    except OSError as e:
        return f"user and mount namespaces are not available to this user ({e})"
    return None


def _reason(error: BaseException) -> str:
    text = str(error)
    if "EPERM" in text or str(errno.EPERM) in text or "not permitted" in text:
        return "unshare is not permitted: see kernel.unprivileged_userns_clone or kernel.apparmor_restrict_unprivileged_userns"
    return text


__all__ = ["IsolationError", "available", "private_hosts", "rewrite"]
