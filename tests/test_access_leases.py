"""Sessions of one machine never share a local address: blocks of 127.77.0.0/16 leased with
a lock file each, as real processes (issue 25: two root-mode sessions picked the same ones)."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from intercept.access.leases import AddressLeases, NoFreeAddresses, UnsafeLeases
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


# --- the directory is in /tmp: nothing in it is trusted by its name (what another local user may plant) ---


def test_a_link_planted_in_the_directory_is_not_followed(tmp_path):
    leases_dir = tmp_path / "leases"
    leases_dir.mkdir(mode=0o1777)
    victim = tmp_path / "nologin"  # as root, following the link would create it (/etc/nologin: nobody logs in)
    (leases_dir / "127.77.0.0").symlink_to(victim)
    leases = AddressLeases(directory=leases_dir)
    try:
        assert leases.allocate() == "127.77.1.1"  # the planted block is skipped
    finally:
        leases.close()
    assert not victim.exists() and not victim.is_symlink()


def test_a_fifo_planted_in_the_directory_is_skipped_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "127.77.0.0")  # an open for reading would wait for a writer forever
    leases = AddressLeases(directory=tmp_path)
    try:
        assert leases.allocate() == "127.77.1.1"
    finally:
        leases.close()


def test_a_directory_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "leases").symlink_to(elsewhere)
    with pytest.raises(UnsafeLeases, match=rf"the address lease directory {tmp_path / 'leases'} is a link, .*remove it"):
        AddressLeases(directory=tmp_path / "leases").allocate()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user takes root")
def test_a_directory_owned_by_another_user_is_refused(tmp_path):
    leases_dir = tmp_path / "leases"
    leases_dir.mkdir(mode=0o1777)
    os.chown(leases_dir, 4242, 4242)  # another local user made it first
    with pytest.raises(UnsafeLeases, match=rf"{leases_dir} is owned by another user \(uid 4242\).*chmod 1777"):
        AddressLeases(directory=leases_dir).allocate()
    assert list(leases_dir.iterdir()) == []


def test_a_directory_others_may_write_without_the_sticky_bit_is_refused(tmp_path):
    leases_dir = tmp_path / "leases"
    leases_dir.mkdir()
    leases_dir.chmod(0o777)
    with pytest.raises(UnsafeLeases, match=r"writable by others without the sticky bit \(mode 777\)"):
        AddressLeases(directory=leases_dir).allocate()


def test_a_new_directory_is_made_shared_and_sticky(tmp_path):
    leases = AddressLeases(directory=tmp_path / "leases")
    try:
        leases.allocate()
    finally:
        leases.close()
    assert stat.S_IMODE((tmp_path / "leases").lstat().st_mode) == 0o1777
