"""Sessions of one machine never share a local address: blocks of 127.77.0.0/16 leased with
a lock file each, as real processes (issue 25: two root-mode sessions picked the same ones)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from intercept.access.leases import AddressLeases, NoFreeAddresses
from tests.conftest import Proc

ROOT = Path(__file__).resolve().parent.parent

# A session's addresses: leases the first three, prints them, and holds them until it is ended.
_SESSION = (
    "import signal, sys; from pathlib import Path; from intercept.access.leases import AddressLeases\n"
    "leases = AddressLeases(directory=Path(sys.argv[1]))\n"
    "print('addresses', *(leases.allocate() for _ in range(3)), flush=True)\n"
    "signal.pause()\n"
)


def session(directory: Path) -> tuple[Proc, list[str]]:
    proc = Proc([sys.executable, "-c", _SESSION, str(directory)], cwd=ROOT)
    return proc, proc.wait_for(r"^addresses (.*)")[1].split()


def test_two_sessions_get_addresses_of_their_own_and_a_killed_ones_come_free(tmp_path):
    first, mine = session(tmp_path)
    second, theirs = session(tmp_path)
    try:
        assert mine == ["127.77.0.1", "127.77.0.2", "127.77.0.3"]
        assert theirs == ["127.77.1.1", "127.77.1.2", "127.77.1.3"]  # the next block: nothing in common
        os.kill(first.p.pid, signal.SIGKILL)  # no chance to let go: the kernel drops its lock
        first.finish()
        third, again = session(tmp_path)
        try:
            assert again == mine
        finally:
            third.stop()
    finally:
        first.stop()
        second.stop()


def test_a_session_with_more_services_than_a_block_leases_the_next_free_one(tmp_path):
    other, held = session(tmp_path)  # holds 127.77.0.0/24
    leases = AddressLeases("127.77.0.0/22", tmp_path)
    try:
        addresses = [leases.allocate() for _ in range(254 + 1)]
        assert addresses[0] == "127.77.1.1" and addresses[253] == "127.77.1.254"
        assert addresses[254] == "127.77.2.1" and leases.blocks == ["127.77.1.0/24", "127.77.2.0/24"]
        assert len(set(addresses)) == len(addresses)
        for _ in range(253 + 254):  # the rest of the second block, and the whole third
            leases.allocate()
        with pytest.raises(NoFreeAddresses, match=r"every block of 127\.77\.0\.0/22 is held by another session .*"
                                                  rf"\(3 by this one; the leases are the locked files of {tmp_path}\)"):
            leases.allocate()
    finally:
        leases.close()
        other.stop()
    assert held[0] == "127.77.0.1"
