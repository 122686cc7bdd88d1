"""Pod addresses: a network namespace per pod, joined to the host by a veth pair on one bridge (root only).

A pod's containers share its namespace, so they reach each other on ``127.0.0.1`` and
two pods can both listen on ``0.0.0.0:9900``, as in Kubernetes. The host (the API
server's port-forward through kwok, the tests) reaches a pod at its IP through the
bridge, which holds the first address of the subnet. The subnet is a /24 of 10.0.0.0/8
that no address or route of the machine uses; only addresses of the namespaces made
here are ever sent traffic.

:meth:`PodNetwork.close` removes every namespace, veth and the bridge it made, also
after a failure part-way; a network whose owner was killed before it could close it is
removed by the next :meth:`PodNetwork.open` (:func:`sweep_orphans`).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


RUN_DIR = Path("/run/intercept-cluster")  # one file per live PodNetwork: its tag, holding the owner's pid
NETNS_ETC = Path("/etc/netns")  # files that `ip netns exec NETNS` mounts over /etc (e2e.cluster.services writes hosts)
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


def orphan_guard(signal_name: str) -> list[str]:
    """An argv prefix that sends the child ``signal_name`` when the thread that started it dies.

    So a harness killed with SIGKILL (a CI timeout) leaves no control plane or pod process
    running. ``setpriv`` is util-linux's; where it is missing, no prefix.
    """
    return ["setpriv", f"--pdeathsig={signal_name}", "--"] if shutil.which("setpriv") else []


def sweep_orphans() -> list[str]:
    """Remove the namespaces and bridges of pod networks whose owner died without closing them; their tags."""
    swept = []
    for record in RUN_DIR.glob("*") if RUN_DIR.is_dir() else []:
        try:
            owner = int(record.read_text())
            os.kill(owner, 0)
            continue  # alive
        except (ValueError, OSError):
            pass
        tag = record.name
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            netns = line.split()[0] if line.strip() else ""
            if netns.startswith(f"icp-{tag}-"):
                for pid in _ip("netns", "pids", netns, check=False).stdout.split():
                    try:
                        os.kill(int(pid), 9)
                    except (ValueError, OSError):
                        pass
                _ip("netns", "del", netns, check=False)
                shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
        _ip("link", "del", f"icb{tag}", check=False)
        record.unlink(missing_ok=True)
        swept.append(tag)
    return swept


def unavailable() -> str | None:
    """Why pods cannot get namespaces here, or None."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (ip netns; apt-get install iproute2) to give each pod its own network namespace and address"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


class PodNetwork:
    """The bridge and the pod namespaces of one cluster."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.bridge = f"icb{self.tag}"
        self.prefix = self._free_prefix()
        self.gateway = f"{self.prefix}.1"
        self._lock = threading.Lock()
        self._free = list(range(2, 255))
        self._namespaces: dict[str, int] = {}  # netns -> host number
        self._up = False

    @staticmethod
    def _free_prefix() -> str:
        used = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
        for _ in range(100):
            prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
            if f" {prefix}." not in used and f"\n{prefix}." not in used and not used.startswith(prefix + "."):
                return prefix
        raise OSError("no free /24 in 10.200.0.0-10.250.255.0 for the pods")

    def open(self) -> None:
        for tag in sweep_orphans():
            log.warning("removed the pod network %s left by a harness that was killed", tag)
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        (RUN_DIR / self.tag).write_text(f"{os.getpid()}\n")
        _ip("link", "add", self.bridge, "type", "bridge")
        self._up = True
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        log.info("pod network %s.0/24 on bridge %s", self.prefix, self.bridge)

    def add(self) -> tuple[str, str]:
        """A new namespace with an address: ``(netns name, pod IP)``."""
        with self._lock:
            if not self._free:
                raise OSError(f"the pod network {self.prefix}.0/24 is full")
            host = self._free.pop(0)
        netns, ip = f"icp-{self.tag}-{host}", f"{self.prefix}.{host}"
        outside, inside = f"icv{self.tag}{host}", f"icq{self.tag}{host}"
        with self._lock:
            self._namespaces[netns] = host
        _ip("netns", "add", netns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", netns)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("-n", netns, "link", "set", inside, "name", "eth0")
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.gateway)
        # The pod's resolver asks its own loopback, where nothing listens: a name that is not in its
        # hosts file (e2e.cluster.services) fails at once, as cluster DNS would answer NXDOMAIN. Without
        # this file it would ask the host's nameserver, unreachable from here, and wait 10 s
        # (http.server's getfqdn() at bind, asyncssh's getfqdn() for GSS at each login, ...).
        (NETNS_ETC / netns).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / netns / "resolv.conf").write_text(RESOLV_CONF)
        return netns, ip

    def remove(self, netns: str) -> None:
        """Delete a pod's namespace (its veth goes with it) and its files, and free its address."""
        _ip("netns", "del", netns, check=False)
        shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
        with self._lock:
            host = self._namespaces.pop(netns, None)
            if host is not None:
                self._free.append(host)

    def close(self) -> None:
        for netns in list(self._namespaces):
            self.remove(netns)
        if self._up:
            _ip("link", "del", self.bridge, check=False)
            self._up = False
        (RUN_DIR / self.tag).unlink(missing_ok=True)
