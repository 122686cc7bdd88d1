"""The whole local cluster, started and stopped as one: binaries, control plane, pod network, Services, kubelet.

:class:`Harness` is a context manager; on leaving it (or on a failed start) every
process, namespace and veth it made is gone. ``say`` receives one line per step.
"""

from __future__ import annotations

import logging
from pathlib import Path

from e2e.cluster.build import Binaries, Say, ensure_binaries
from e2e.cluster.controlplane import NODE, NODE_IP, ControlPlane
from e2e.cluster.kubelet import Kubelet
from e2e.cluster.network import PodNetwork
from e2e.cluster.services import ServiceNetwork

log = logging.getLogger(__name__)


class Harness:
    """A running cluster whose state (kubeconfig, PKI, logs, pod directories) is under ``state``."""

    def __init__(self, state: Path, say: Say = lambda line: None, binaries: Binaries | None = None) -> None:
        self.state = state.resolve()
        self.say = say
        self.binaries = binaries
        self.control_plane: ControlPlane | None = None
        self.network: PodNetwork | None = None
        self.services: ServiceNetwork | None = None
        self.kubelet: Kubelet | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def __enter__(self) -> Harness:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        binaries = self.binaries or ensure_binaries(self.say)
        self.control_plane = ControlPlane(binaries, self.state, self.say)
        self.control_plane.start()
        self.network = PodNetwork()
        self.network.open()
        self.say(f"pods: network {self.network.prefix}.0/24 on bridge {self.network.bridge}")
        assert self.control_plane.api is not None
        self.services = ServiceNetwork(self.control_plane.api, self.network.bridge)
        self.services.start()
        self.kubelet = Kubelet(self.control_plane.api, NODE, NODE_IP, self.state / "pods", self.network, self.services)
        self.kubelet.start()

    def stop(self) -> None:
        """Pods first (their processes and namespaces), then the control plane, then the bridge."""
        if self.kubelet is not None:
            self.kubelet.stop()
            self.kubelet = None
        if self.services is not None:
            self.services.stop()
            self.services = None
        if self.control_plane is not None:
            self.control_plane.stop()
            self.control_plane = None
        if self.network is not None:
            self.network.close()
            self.network = None
