"""What a cluster changes on this machine: written down before it is changed, undone from what was written.

A cluster changes the machine in these ways, and no other:

- a network namespace for its node (``ip netns``): the node's bridge, the pods' veths,
  kube-proxy's nftables tables and the node's network sysctls all live in it, so they
  all go with it; a veth joins it to this machine, with routes to the pods and Services;
- cgroups ``/icn-TAG`` in every v1 hierarchy: the node's processes and its pods'
  containers are all in ``pids:/icn-TAG`` (the containers' shims included, which outlive
  containerd by design), so every one of them can be found and killed;
- mounts (containerd's root filesystems and pod network namespaces, the kubelet's
  volumes), all under directories of its own;
- the sysctls the kubelet sets (:data:`KUBELET_SYSCTLS`), machine-wide: their values
  before the first live cluster changed them are kept in ``/run/intercept-node``
  and put back when the last live cluster ends.

Each is recorded in ``/run/intercept-node/TAG.json`` (a :class:`Ledger`) before it is
made, and :func:`undo` removes whatever a ledger names: the processes (SIGKILL, until
none is left), the mounts (deepest first), the namespace, the cgroups, the directories,
then the ledger itself. It runs in three places:

- the harness's own stop (SIGTERM, Ctrl-C, a failed start);
- the guard (``python -m e2e.cluster.host guard TAG``), a process in a session of its own
  that the harness starts first, which waits for the harness to end, however it ends
  (SIGKILL included), and undoes what is still recorded;
- the next harness's start (:func:`sweep`), for a ledger whose harness and guard are
  both gone (every process of the machine killed at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = Path("/run/intercept-node")  # not /run/intercept-cluster: older harnesses sweep what is there
CGROUPS = Path("/sys/fs/cgroup")
SYSCTLS = RUN_DIR / "sysctls.json"  # the values before the first live cluster changed them
# What a kubelet sets at start (its kernel tunables), machine-wide, whatever namespace it runs in.
KUBELET_SYSCTLS = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
                   "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes")
MNT_DETACH = 2


@dataclass
class Ledger:
    """What one cluster has changed, or is about to: saved at each :meth:`record`."""

    tag: str
    owner: int = 0  # the harness's pid
    guard: int = 0
    subnet: int | None = None  # X of the 10.X.0.0/16 the node's addresses are taken from
    netns: str | None = None
    cgroup: str | None = None  # "/icn-TAG" in every v1 hierarchy
    dirs: list[str] = field(default_factory=list)  # unmounted under, then removed
    sysctls: bool = False

    @property
    def path(self) -> Path:
        return RUN_DIR / f"{self.tag}.json"

    def record(self, **changes: object) -> None:
        """Write the ledger with ``changes`` made to it, before the machine is changed that way."""
        for key, value in changes.items():
            setattr(self, key, value)
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(self)))
        os.replace(partial, self.path)

    @classmethod
    def load(cls, path: Path) -> Ledger | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ledgers() -> list[Ledger]:
    return [ledger for path in sorted(RUN_DIR.glob("*.json")) if (ledger := Ledger.load(path)) is not None]


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Between clusters starting and ending at once on this machine."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------- cgroups


def hierarchies(v2: bool = False) -> list[Path]:
    """The mounted v1 hierarchies that hold processes; with ``v2``, also ``unified`` (the kubelet makes its
    cgroupRoot there too)."""
    return sorted(h for h in CGROUPS.iterdir() if (v2 or h.name != "unified") and (h / "cgroup.procs").exists())


def make_cgroup(cgroup: str) -> None:
    """``cgroup`` in every v1 hierarchy (cpuset's with its parent's cpus and mems, or it holds no process)."""
    for hierarchy in hierarchies():
        path = hierarchy / cgroup.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        if hierarchy.name == "cpuset":
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not (path / name).read_text().strip():
                    (path / name).write_text((hierarchy / name).read_text())


def in_cgroup(cgroup: str, argv: list[str]) -> list[str]:
    """``argv``, run in ``pids:cgroup`` (created): its children and theirs stay there."""
    procs = CGROUPS / "pids" / cgroup.lstrip("/") / "cgroup.procs"
    procs.parent.mkdir(parents=True, exist_ok=True)
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *argv]


def _pids(cgroup: str) -> set[int]:
    found: set[int] = set()
    for directory, _, _ in os.walk(CGROUPS / "pids" / cgroup.lstrip("/")):  # a cgroup going meanwhile is skipped
        try:
            found.update(int(p) for p in (Path(directory) / "cgroup.procs").read_text().split())
        except OSError:
            pass
    return found


def kill_cgroup(cgroup: str, timeout: float = 30.0) -> None:
    """SIGKILL every process in ``pids:cgroup`` and below, until none is left (new ones included)."""
    deadline = time.monotonic() + timeout
    while pids := _pids(cgroup):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.warning("processes of %s survived SIGKILL: %s", cgroup, sorted(pids))
            return
        time.sleep(0.05)


def remove_cgroup(cgroup: str) -> None:
    """``cgroup`` and those below it, in every hierarchy, deepest first. The walk does not stop at a cgroup
    that someone else (a runtime tidying its containers' cgroups) removes meanwhile."""
    for hierarchy in hierarchies(v2=True):
        for directory, _, _ in os.walk(hierarchy / cgroup.lstrip("/"), topdown=False):
            for _ in range(50):  # a cgroup whose last process just died may still be busy for a moment
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


# --------------------------------------------------------------------------- mounts, sysctls


def mounts_under(directories: list[str]) -> list[str]:
    """Mount points under (or at) any of ``directories``, deepest first."""
    roots = [os.path.realpath(d) for d in directories]
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if any(point == r or point.startswith(r + "/") for r in roots):
            found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def unmount(directories: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(5):  # a lazily detached mount may reveal the one it covered
        points = mounts_under(directories)
        if not points:
            return
        for point in points:
            if libc.umount2(point.encode(), MNT_DETACH) != 0:
                log.info("umount %s: %s", point, os.strerror(ctypes.get_errno()))


def sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def record_sysctls() -> None:
    """Keep the kubelet's sysctls as they are now, unless a live cluster kept them already."""
    with locked():
        if not SYSCTLS.exists():
            values = {k: sysctl_path(k).read_text().strip() for k in KUBELET_SYSCTLS if sysctl_path(k).exists()}
            SYSCTLS.write_text(json.dumps(values))


def _restore_sysctls(ending: str) -> None:
    """Put the kubelet's sysctls back, when no other cluster that changed them is alive."""
    others = [ledger for ledger in ledgers()
              if ledger.tag != ending and ledger.sysctls and (alive(ledger.owner) or alive(ledger.guard))]
    if others or not SYSCTLS.exists():
        return
    for key, value in json.loads(SYSCTLS.read_text()).items():
        try:
            sysctl_path(key).write_text(value)
        except OSError as error:
            log.warning("sysctl %s: %s", key, error)
    SYSCTLS.unlink()


# --------------------------------------------------------------------------- undo


def undo(ledger: Ledger) -> None:
    """Remove everything ``ledger`` names; safe to run again, and on a ledger half-recorded."""
    if ledger.cgroup:
        kill_cgroup(ledger.cgroup)
    unmount(ledger.dirs + ([f"/run/netns/{ledger.netns}"] if ledger.netns else []))
    if ledger.netns:
        subprocess.run(["ip", "netns", "delete", ledger.netns], capture_output=True)
    if ledger.cgroup:
        remove_cgroup(ledger.cgroup)
    for directory in ledger.dirs:
        shutil.rmtree(directory, ignore_errors=True)
    with locked():
        if ledger.sysctls:
            _restore_sysctls(ledger.tag)
        ledger.path.unlink(missing_ok=True)


def sweep() -> list[str]:
    """Undo the ledgers whose harness and guard are both gone; their tags."""
    swept = []
    for ledger in ledgers():
        if alive(ledger.owner) or alive(ledger.guard):
            continue
        undo(ledger)
        swept.append(ledger.tag)
    return swept


def start_guard(ledger: Ledger) -> None:
    """The guard of ``ledger`` (this process is its owner), in a session of its own: see the module."""
    ledger.record(owner=os.getpid())
    guard = subprocess.Popen([sys.executable, "-m", "e2e.cluster.host", "guard", ledger.tag],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, cwd="/", env={**os.environ, "PYTHONPATH": str(ROOT)})
    ledger.record(guard=guard.pid)


def guard(tag: str) -> None:
    """Wait for the ledger's owner to end, then undo what it left recorded."""
    path = RUN_DIR / f"{tag}.json"
    ledger = Ledger.load(path)
    if ledger is None:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the owner's end ends the guard
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pidfd = os.pidfd_open(ledger.owner)
        select.select([pidfd], [], [])
    except ProcessLookupError:
        pass
    ledger = Ledger.load(path)  # what is still recorded once the owner is gone
    if ledger is not None:
        undo(ledger)


if __name__ == "__main__":
    if sys.argv[1:2] == ["guard"]:
        guard(sys.argv[2])
