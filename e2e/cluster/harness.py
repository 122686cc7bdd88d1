"""The whole local cluster, started and stopped as one: binaries, images, control plane, node.

:class:`Harness` is a context manager; on leaving it (or on a failed start) every
process, mount, namespace, cgroup and sysctl it made or changed is gone or put back
(:mod:`e2e.cluster.host`), and a guard process does the same if the harness is killed
outright. ``say`` receives one line per step.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from e2e.cluster.build import Binaries, Say, ensure_binaries
from e2e.cluster.controlplane import ControlPlane
from e2e.cluster.host import Ledger, in_cgroup, start_guard, sweep, undo
from e2e.cluster.images import Images
from e2e.cluster.node import Addresses, Node

log = logging.getLogger(__name__)


def orphan_guard(signal_name: str) -> list[str]:
    """An argv prefix that sends the child ``signal_name`` when the thread that started it dies (util-linux)."""
    return ["setpriv", f"--pdeathsig={signal_name}", "--"] if shutil.which("setpriv") else []


class Harness:
    """A running cluster whose state (kubeconfig, PKI, logs, the node's files) is under ``state``."""

    def __init__(self, state: Path, say: Say = lambda line: None, binaries: Binaries | None = None) -> None:
        self.state = state.resolve()
        self.say = say
        self.binaries = binaries
        self.ledger: Ledger | None = None
        self.control_plane: ControlPlane | None = None
        self.node: Node | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def __enter__(self) -> Harness:
        try:
            self.start()
        except BaseException:
            try:
                self.stop()
            except Exception:  # noqa: BLE001 - the start's failure is the one to report; this one is logged
                log.exception("tearing down the cluster whose start failed")
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        started = time.monotonic()
        self.state.mkdir(parents=True, exist_ok=True)
        for old in ("logs", "node"):  # a state directory is reused: start afresh
            shutil.rmtree(self.state / old, ignore_errors=True)
        (self.state / "logs").mkdir()
        for tag in sweep():
            self.say(f"removed what a killed cluster ({tag}) had left on this machine")
        binaries = self.binaries or ensure_binaries(self.say)
        images = Images(binaries, self.say).ensure()
        self.ledger = ledger = Ledger(uuid.uuid4().hex[:6])
        start_guard(ledger)
        addresses = Addresses.free(ledger)
        self.control_plane = ControlPlane(binaries, self.state, addresses.host, addresses.services,
                                          addresses.api_service, self._spawn, self.say)
        self.node = Node(binaries, self.state, ledger, addresses, self._spawn, self.say)
        self.node.plumb()
        self.control_plane.start()
        assert self.control_plane.api is not None
        self.node.start(self.control_plane.server, self.control_plane.authority, self.control_plane.api, images)
        self.say(f"started in {time.monotonic() - started:.1f}s")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """``argv`` as the cluster's process ``name``: its log in ``state/logs``, in the cluster's cgroup."""
        assert self.node is not None
        argv = in_cgroup(self.node.cgroup + "/runtime", argv)  # where undo() finds it, whatever became of us
        with open(self.state / "logs" / f"{name}.log", "ab") as out:
            process = subprocess.Popen(orphan_guard("TERM") + argv, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.state)
        self.processes[name] = process
        log.info("started %s (pid %d)", name, process.pid)
        return process

    def stop(self) -> None:
        """Everything the ledger names (every process of the cluster killed at once: nothing here keeps state
        worth a graceful end), then the control plane's books closed."""
        if self.ledger is not None:
            undo(self.ledger)
            self.ledger = None
        if self.control_plane is not None:
            self.control_plane.stop()
            self.control_plane = None
        for process in self.processes.values():
            process.wait()
        self.processes.clear()
