"""Two hosts on one machine: "cluster" and "laptop" network namespaces joined by a veth pair (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

available = sys.platform == "linux" and os.geteuid() == 0 and shutil.which("ip") is not None
needs_netns = pytest.mark.skipif(not available, reason="needs root and iproute2 (ip netns) to build separate hosts")


@dataclass(frozen=True)
class Hosts:
    cluster: str  # namespace names
    laptop: str
    cluster_ip: str
    laptop_ip: str

    def run_in(self, host: str) -> list[str]:
        """The argv prefix that runs a command on ``host`` (``self.cluster`` or ``self.laptop``)."""
        return ["ip", "netns", "exec", host]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@contextmanager
def two_hosts(subnet: str) -> Iterator[Hosts]:
    """``subnet`` like "10.77.0": the cluster host gets .1, the laptop .2; both are removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    hosts = Hosts(f"icl-{tag}", f"ilp-{tag}", f"{subnet}.1", f"{subnet}.2")
    veth_c, veth_l = f"vc{tag}", f"vl{tag}"
    try:
        sh("ip", "netns", "add", hosts.cluster)
        sh("ip", "netns", "add", hosts.laptop)
        sh("ip", "link", "add", veth_c, "type", "veth", "peer", "name", veth_l)
        sh("ip", "link", "set", veth_c, "netns", hosts.cluster)
        sh("ip", "link", "set", veth_l, "netns", hosts.laptop)
        for ns, dev, addr in ((hosts.cluster, veth_c, hosts.cluster_ip), (hosts.laptop, veth_l, hosts.laptop_ip)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        subprocess.run(["ip", "netns", "del", hosts.cluster], capture_output=True)
        subprocess.run(["ip", "netns", "del", hosts.laptop], capture_output=True)
