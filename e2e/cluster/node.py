"""A real Kubernetes node: containerd and runc, the kubelet, kube-proxy, CNI networking and cluster DNS.

:class:`Node` runs them, as root, in a network namespace of the node's own
(:mod:`e2e.cluster.host` records and undoes every change to the machine):

- **Addresses.** A free ``10.X.0.0/16`` of this machine: pods ``10.X.0.0/24`` on the
  CNI bridge (Debian's ``containernetworking-plugins``: ``bridge`` + ``host-local``),
  Services ``10.X.128.0/20`` (kube-proxy, nftables mode), and a veth between this
  machine (``10.X.255.253``, where the API server listens) and the node
  (``10.X.255.254``, the node's IP: kubelet, DNS). This machine routes the pod and
  Service ranges to the node, so the tests reach pods and ClusterIPs as a client in the
  cluster would. The node has no default route: a pod reaches the pods, the Services,
  the API server, and nothing else (pod traffic never leaves the machine).
- **containerd** (Debian's 1.6, ``runc``, overlayfs) with a root and state of its own;
  the pause image and every image of :mod:`e2e.cluster.images` imported at start. The
  node has no route off this machine, so the lookup of any registry's name fails at once
  ("network is unreachable"): an image the node lacks is ``ErrImagePull`` at once, and no
  pull leaves the machine. Negative ``oom_score_adj`` is clamped (root here may not
  lower it).
- **kubelet** and **kube-proxy**, built with the control plane (:mod:`e2e.cluster.build`);
  the kubelet on cgroup v1 (``cgroupfs``, its own ``cgroupRoot``), with the node's IP.
- **cluster DNS** (:mod:`e2e.cluster.dns`) on the node's IP, port 53, as the pods'
  nameserver: Service names answer, anything else is NXDOMAIN at once.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from e2e.cluster.api import API, APIError, wait_until
from e2e.cluster.build import Binaries
from e2e.cluster.host import Ledger, ledgers, locked, make_cgroup, record_sysctls
from e2e.cluster.images import PAUSE, ROOT, Built, load
from e2e.cluster.pki import Authority

log = logging.getLogger(__name__)

PACKAGES = {"containerd": "containerd", "runc": "runc", "ctr": "containerd", "nsenter": "util-linux",
            "ip": "iproute2", "nft": "nftables", "sh": "dash"}
CNI_PLUGINS = Path("/usr/lib/cni")  # containernetworking-plugins
START_TIMEOUT = 120.0

Say = Callable[[str], None]


def unavailable() -> str | None:
    """Why a node cannot run here, or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root: the node's network namespace, cgroups and mounts"
    missing = sorted({package for tool, package in PACKAGES.items() if shutil.which(tool) is None})
    if not (CNI_PLUGINS / "bridge").is_file():
        missing.append("containernetworking-plugins")
    if missing:
        return (f"{', '.join(missing)} not installed: the node runs containerd, runc and CNI plugins "
                f"(apt-get install {' '.join(missing)})")
    return None


class Addresses:
    """The ranges of one node, in a free ``10.X.0.0/16`` (X from 200 to 250)."""

    def __init__(self, x: int) -> None:
        self.x = x
        self.pods = f"10.{x}.0.0/24"
        self.gateway = f"10.{x}.0.1"
        self.services = f"10.{x}.128.0/20"
        self.api_service = f"10.{x}.128.1"  # the first address of the Service range: "kubernetes"
        self.host = f"10.{x}.255.253"  # this machine's end of the link: the API server
        self.node = f"10.{x}.255.254"  # the node's end: its IP

    @classmethod
    def free(cls, ledger: Ledger) -> Addresses:
        """Ranges no address, route or other cluster of this machine uses, claimed in ``ledger``."""
        with locked():
            taken = {other.subnet for other in ledgers()}
            used = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
            choices = [x for x in range(200, 251) if x not in taken and f"10.{x}." not in used]
            if not choices:
                raise OSError("no free 10.X.0.0/16 (X from 200 to 250) on this machine for a node")
            ledger.record(subnet=random.choice(choices))
        assert ledger.subnet is not None
        return cls(ledger.subnet)


class Node:
    """The node of one cluster; :meth:`start` needs the API server running (``server``, ``authority``)."""

    def __init__(self, binaries: Binaries, state: Path, ledger: Ledger, addresses: Addresses,
                 spawn: Callable[[str, list[str]], subprocess.Popen[bytes]], say: Say = lambda line: None) -> None:
        self.binaries = binaries
        self.dir = state / "node"
        self.ledger = ledger
        self.addresses = addresses
        self.spawn = spawn
        self.say = say
        self.name = f"node-{ledger.tag}"
        self.netns = f"icn-{ledger.tag}"
        self.run = Path(f"/run/icn-{ledger.tag}")  # short paths: sockets
        self.socket = self.run / "containerd" / "containerd.sock"
        self.cgroup = f"/icn-{ledger.tag}"

    # ------------------------------------------------------------------ the machine's side

    def plumb(self) -> None:
        """The namespace, the link, the routes, the cgroups: before any process of the node starts."""
        a = self.addresses
        self.ledger.record(netns=self.netns, cgroup=self.cgroup, dirs=[str(self.dir), str(self.run)], sysctls=True)
        record_sysctls()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(parents=True, exist_ok=True)
        make_cgroup(self.cgroup)
        _ip("netns", "add", self.netns)
        outside = f"icn{self.ledger.tag}"
        _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        _ip("addr", "add", f"{a.host}/30", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("-n", self.netns, "addr", "add", f"{a.node}/30", "dev", "eth0")
        _ip("-n", self.netns, "link", "set", "eth0", "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        for cidr in (a.pods, a.services):
            _ip("route", "add", cidr, "via", a.node)

    def in_node(self, argv: list[str]) -> list[str]:
        """``argv`` in the node's network namespace (not a mount namespace of its own: the kubelet's mounts
        must be the ones containerd sees)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    # ------------------------------------------------------------------ start

    def start(self, server: str, authority: Authority, api: API, images: list[Built]) -> None:
        self._containerd()
        load(images, self.ctr(), self.say)
        self._dns(server, authority)
        self._kubelet(server, authority)
        self._kube_proxy(server, authority)
        wait_until(lambda: self._ready(api), f"Node {self.name} to be Ready", START_TIMEOUT)
        self.say(f"node: {self.name} is Ready ({self.addresses.node}; pods {self.addresses.pods}, "
                 f"Services {self.addresses.services})")

    def ctr(self) -> list[str]:
        return ["ctr", "--address", str(self.socket), "--namespace", "k8s.io"]

    def _containerd(self) -> None:
        root, state = self.dir / "containerd", self.run / "containerd"
        cni = self.dir / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-pods.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "pods",
            "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                         "ipam": {"type": "host-local", "dataDir": str(self.dir / "ipam"),
                                  "ranges": [[{"subnet": self.addresses.pods, "gateway": self.addresses.gateway}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}}],
        }, indent=1))
        config = self.dir / "containerd.toml"
        config.write_text(CONTAINERD_CONFIG.format(
            root=root, state=state, socket=self.socket, pause=PAUSE, cni_bin=CNI_PLUGINS, cni_conf=cni))
        self.spawn("containerd", self.in_node(["containerd", f"--config={config}"]))

        def answers() -> bool:
            return subprocess.run([*self.ctr(), "version"], capture_output=True).returncode == 0

        wait_until(answers, "containerd to answer", START_TIMEOUT)

    def _dns(self, server: str, authority: Authority) -> None:
        config = self._kubeconfig("dns", server, authority, "intercept-cluster-dns", ("system:masters",))
        self.spawn("dns", self.in_node(["env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "e2e.cluster.dns",
                                        "--kubeconfig", str(config), "--listen", self.addresses.node]))

    def _kubelet(self, server: str, authority: Authority) -> None:
        a = self.addresses
        config = self._kubeconfig("kubelet", server, authority, f"system:node:{self.name}", ("system:nodes",))
        serving = authority.serving("kubelet-serving", [a.node, self.name, "localhost"])
        resolv = self.dir / "resolv.conf"  # for pods with dnsPolicy Default: the same nameserver
        resolv.write_text(f"nameserver {a.node}\noptions timeout:1 attempts:1\n")
        kubelet_yaml = self.dir / "kubelet.yaml"
        kubelet_yaml.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup, "cgroupsPerQOS": True,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": a.node, "port": 10250, "readOnlyPort": 0, "healthzPort": 0,
            "tlsCertFile": str(serving.cert), "tlsPrivateKeyFile": str(serving.key),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(authority.cert)}},
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local", "clusterDNS": [a.node], "resolvConf": str(resolv),
            "oomScoreAdj": 0,  # root here may not lower an oom_score_adj (no CAP_SYS_RESOURCE)
            "failSwapOn": False, "rotateCertificates": False, "serverTLSBootstrap": False,
            "makeIPTablesUtilChains": False, "podCIDR": a.pods, "maxPods": 250, "serializeImagePulls": False,
            "podLogsDir": str(self.dir / "pod-logs"),
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "syncFrequency": "5s", "fileCheckFrequency": "5s", "nodeStatusUpdateFrequency": "5s",
            "registerNode": True, "localStorageCapacityIsolation": True,
        }))
        self.spawn("kubelet", self.in_node([
            str(self.binaries["kubelet"]), f"--config={kubelet_yaml}", f"--kubeconfig={config}",
            f"--root-dir={self.run / 'kubelet'}", f"--hostname-override={self.name}", f"--node-ip={a.node}", "--v=1"]))

    def _kube_proxy(self, server: str, authority: Authority) -> None:
        a = self.addresses
        config = self._kubeconfig("kube-proxy", server, authority, "system:kube-proxy")
        proxy_yaml = self.dir / "kube-proxy.yaml"
        proxy_yaml.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "nftables", "clientConnection": {"kubeconfig": str(config)}, "hostnameOverride": self.name,
            "clusterCIDR": a.pods, "nodePortAddresses": [f"{a.node}/32"], "bindAddress": a.node,
            "healthzBindAddress": "127.0.0.1:10256", "metricsBindAddress": "127.0.0.1:10249",
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }))
        self.spawn("kube-proxy", self.in_node([str(self.binaries["kube-proxy"]), f"--config={proxy_yaml}", "--v=1"]))

    def _kubeconfig(self, name: str, server: str, authority: Authority, user: str, groups: tuple[str, ...] = ()) -> Path:
        pair = authority.client(name, user, groups)
        path = self.dir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "intercept", "cluster": {"server": server, "certificate-authority": str(authority.cert)}}],
            "users": [{"name": user, "user": {"client-certificate": str(pair.cert), "client-key": str(pair.key)}}],
            "contexts": [{"name": "intercept", "context": {"cluster": "intercept", "user": user}}],
            "current-context": "intercept",
        }))
        return path

    def _ready(self, api: API) -> bool:
        try:
            node = api.get(f"/api/v1/nodes/{self.name}")
        except APIError:
            return False
        return any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in (node.get("status") or {}).get("conditions") or [])


CONTAINERD_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
oom_score = 0
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result
