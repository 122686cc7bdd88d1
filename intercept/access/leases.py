"""Which loopback addresses a session may use: blocks of 127.77.0.0/16, leased machine-wide.

Every session of this machine that gives COMMAND the cluster's names listens on loopback
addresses of the same network (127.77.0.0/16), in the machine's one network namespace
(the ``namespace`` mode gives COMMAND its own mount namespace, not its own network). Two
sessions that picked addresses alone would both take 127.77.0.1, and the second could not
listen there (or, root mode, its hosts block would send the first one's names to it).

So a session leases blocks of 256 addresses (``127.77.N.0/24``): a block is held while the
session holds an exclusive ``flock`` on the file ``127.77.N.0`` of :data:`LEASES`, a directory
every user of the machine may create files in (sticky, like ``/tmp``). The kernel lets the
lock go when the session ends, however it ends (``kill -9`` too), so no lease outlives its
holder and nothing is left to clean. A session takes the lowest free block first, and
another one when it has more Services than one block holds.

The directory is in ``/tmp``, where any local user may put anything first, so nothing in it
is trusted by its name: it is used only when it is a real directory (not a link), owned by
root or by this user, and, when others may write in it, sticky (none may remove or replace
another's files); anything else is :class:`UnsafeLeases`, naming the path and the fix.
The lock files are opened in it (by descriptor) without following a link
(``O_NOFOLLOW``), without waiting on a FIFO, and used only when they are regular files: a
link planted there (to ``/etc/nologin``, say) makes no file anywhere, even as root.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import stat
from pathlib import Path

from intercept.access.names import DEFAULT_NETWORK
from intercept.errors import InterceptError

log = logging.getLogger(__name__)

LEASES = Path("/tmp/intercept-addresses")
BLOCK_PREFIX = 24  # a block: 256 addresses


class NoFreeAddresses(InterceptError):
    """Every block of the local network is held by other sessions of this machine."""


class UnsafeLeases(InterceptError):
    """The lease directory is not one this session may trust (a link, another user's, or
    writable by others without the sticky bit), or it cannot create its lock files there."""


# A lock file: created if absent, never through a link, never a terminal, never waiting on a FIFO.
_OPEN_FLAGS = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC


class AddressLeases:
    """The addresses of this session: :meth:`allocate` hands them out in order, each once,
    leasing a new block when the held ones are used up; :meth:`close` lets them all go."""

    def __init__(self, network: str = DEFAULT_NETWORK, directory: Path = LEASES) -> None:
        self.network = ipaddress.IPv4Network(network)
        self.directory = directory
        self._held: list[int] = []  # the lock files' descriptors, in lease order
        self._blocks: list[ipaddress.IPv4Network] = []
        self._next = 0  # within the last block

    @property
    def blocks(self) -> list[str]:
        """The blocks held now (``127.77.0.0/24``, ...), in the order they were leased."""
        return [str(b) for b in self._blocks]

    def allocate(self) -> str:
        """The next address of the held blocks (leasing another when they are used up)."""
        while True:
            if self._blocks:
                block = self._blocks[-1]
                while self._next < block.num_addresses:
                    address = block[self._next]
                    self._next += 1
                    if str(address).split(".")[-1] not in ("0", "255"):
                        return str(address)
            self._lease()
            self._next = 0

    def _lease(self) -> None:
        directory = self._directory()
        try:
            self._lease_in(directory)
        finally:
            os.close(directory)

    def _lease_in(self, directory: int) -> None:
        for block in self.network.subnets(new_prefix=max(self.network.prefixlen, BLOCK_PREFIX)):
            if block in self._blocks:
                continue
            name = str(block.network_address)
            path = self.directory / name
            try:
                fd = os.open(name, _OPEN_FLAGS, 0o444, dir_fd=directory)
            except OSError as e:  # a link (ELOOP), or another user's file we may not open: not ours to use
                log.info("cannot open %s: %s; trying the next block", path, e)
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                log.warning("%s is not a regular file (planted by someone?); trying the next block", path)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                continue  # another session holds it
            self._held.append(fd)
            self._blocks.append(block)
            log.info("leased the local addresses %s (%s)", block, path)
            return
        raise NoFreeAddresses(
            f"every block of {self.network} is held by another session of this machine ({len(self._blocks)} by this "
            f"one; the leases are the locked files of {self.directory}): leave some intercepts or connects")

    def _directory(self) -> int:
        """The lease directory, opened (a descriptor), made when absent; :class:`UnsafeLeases`
        when it is not one to trust (see the module docstring)."""
        try:
            self.directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:  # every user's sessions lease here; none may remove another's files
            os.chmod(self.directory, 0o1777)
        where = self.directory
        try:
            fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeLeases(f"cannot open the address lease directory {where}: {e}") from None
            kind = "a link" if where.is_symlink() else "not a directory"
            raise UnsafeLeases(f"the address lease directory {where} is {kind}, not a directory this session may "
                               f"trust (someone else may have put it there): remove it (rm {where}, as root if it is "
                               f"not yours) and start again") from None
        st = os.fstat(fd)
        me = os.geteuid()
        problem = None
        if st.st_uid not in (0, me):
            problem = f"is owned by another user (uid {st.st_uid}), who could plant files in it"
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            problem = f"is writable by others without the sticky bit (mode {stat.S_IMODE(st.st_mode):o})"
        elif not os.access(where, os.W_OK | os.X_OK):
            problem = (f"does not let this user (uid {me}) create lock files in it (mode {stat.S_IMODE(st.st_mode):o}, "
                       f"owner uid {st.st_uid})")
        if problem is not None:
            os.close(fd)
            raise UnsafeLeases(f"the address lease directory {where} {problem}; intercept leases local addresses "
                               f"there for every user of this machine: as root, remove it (rm -r {where}) or make it "
                               f"root's and shared (chown root:root {where} && chmod 1777 {where}), then start again")
        return fd

    def close(self) -> None:
        """Let every block go."""
        for fd in self._held:
            os.close(fd)
        self._held.clear()
        self._blocks.clear()


__all__ = ["AddressLeases", "LEASES", "NoFreeAddresses", "UnsafeLeases"]
