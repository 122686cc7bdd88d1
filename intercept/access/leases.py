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
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
from pathlib import Path

from intercept.access.names import DEFAULT_NETWORK
from intercept.errors import InterceptError

log = logging.getLogger(__name__)

LEASES = Path("/tmp/intercept-addresses")
BLOCK_PREFIX = 24  # a block: 256 addresses


class NoFreeAddresses(InterceptError):
    """Every block of the local network is held by other sessions of this machine."""


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
        self._directory()
        for block in self.network.subnets(new_prefix=max(self.network.prefixlen, BLOCK_PREFIX)):
            if block in self._blocks:
                continue
            path = self.directory / str(block.network_address)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444)
            except OSError as e:  # a file of another user's that we may not open: not ours to use
                log.info("cannot open %s: %s; trying the next block", path, e)
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

    def _directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o755)
        except FileExistsError:
            return
        self.directory.chmod(0o1777)  # every user's sessions lease here; none may remove another's files

    def close(self) -> None:
        """Let every block go."""
        for fd in self._held:
            os.close(fd)
        self._held.clear()
        self._blocks.clear()


__all__ = ["AddressLeases", "LEASES", "NoFreeAddresses"]
