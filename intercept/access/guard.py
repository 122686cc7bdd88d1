"""Root mode (and CDE containers, where the hosts file is writable): a managed block in the
machine's hosts file, and a guard that removes it when its owner dies, ``kill -9`` included.

:class:`ManagedHosts` writes the block of this process (its owner: our pid) in place (the
same inode: a container's ``/etc/hosts`` is often a bind mount that cannot be replaced by
a rename), under an advisory lock. The guard is a small process of its own session
(``python -m intercept.access.guard``) that waits for the end of a pipe whose other end only
we hold: when we end, however we end, the pipe closes and the guard removes our block,
leaving the file byte for byte as it was. A later start also removes the blocks of owners
that are no longer alive (a guard that was itself killed).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from intercept.access import hostsfile

log = logging.getLogger(__name__)

HOSTS = Path("/etc/hosts")


def edit(path: Path, change: Callable[[bytes], bytes]) -> bytes:
    """Apply ``change`` to the file's bytes in place, under an exclusive advisory lock; the new bytes."""
    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            before = f.read()
            after = change(before)
            if after != before:
                f.seek(0)
                f.write(after)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            return after
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(owner: str) -> bool:
    if not owner.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(owner), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ManagedHosts:
    """This process's block in ``path``; :meth:`close` removes it (the guard does, if we cannot)."""

    def __init__(self, path: Path = HOSTS, owner: str | None = None) -> None:
        self.path = path
        self.owner = owner or str(os.getpid())
        self._guard: subprocess.Popen[bytes] | None = None
        self._pipe: int | None = None

    def remove_stale(self) -> list[str]:
        """Remove the blocks of owners no longer alive (left by a guard that was killed too); their owners."""
        stale: list[str] = []

        def change(text: bytes) -> bytes:
            for owner in hostsfile.owners(text):
                if owner != self.owner and not _alive(owner):
                    stale.append(owner)
                    text = hostsfile.remove(text, owner)
            return text

        edit(self.path, change)
        return stale

    def start_guard(self) -> None:
        """Start the guard (before the first :meth:`put`): it removes the block once we are gone."""
        read, write = os.pipe()
        try:
            self._guard = subprocess.Popen(
                [sys.executable, "-m", "intercept.access.guard", "--hosts", str(self.path), "--owner", self.owner],
                stdin=read, start_new_session=True, close_fds=True)
        finally:
            os.close(read)
        os.set_inheritable(write, False)
        self._pipe = write

    def put(self, lines: str) -> None:
        """The block holds ``lines`` now."""
        edit(self.path, lambda text: hostsfile.put(text, self.owner, lines))

    def close(self) -> None:
        """Remove the block, then let the guard go."""
        try:
            edit(self.path, lambda text: hostsfile.remove(text, self.owner))
        finally:
            if self._pipe is not None:
                os.close(self._pipe)
                self._pipe = None
            if self._guard is not None:
                try:
                    self._guard.wait(10)
                except subprocess.TimeoutExpired:
                    log.warning("the hosts file's guard (pid %s) did not end", self._guard.pid)
                self._guard = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m intercept.access.guard")
    parser.add_argument("--hosts", type=Path, required=True)
    parser.add_argument("--owner", required=True)
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a terminal's Ctrl-C is for the intercept, which cleans up itself
    while os.read(0, 4096):
        pass
    edit(args.hosts, lambda text: hostsfile.remove(text, args.owner))
    return 0


if __name__ == "__main__":
    sys.exit(main())
