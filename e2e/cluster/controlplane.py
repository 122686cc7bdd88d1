"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok.

:class:`ControlPlane` starts the built binaries (:mod:`e2e.cluster.build`) as child
processes in a state directory, each on a free loopback port, and stops them all again.
What the API server runs with matters to the tests, so it is the real thing:

- the secure port only, with its own CA (:mod:`e2e.cluster.pki`); clients authenticate
  with client certificates: ``admin`` (``system:masters``) and any user the tests ask
  for (:meth:`ControlPlane.kubeconfig_for`), who has only what RBAC grants;
- authorization ``Node,RBAC``; admission is the API server's default set, which
  includes ``PodSecurity`` (namespace labels ``pod-security.kubernetes.io/*``) and
  ``ValidatingAdmissionPolicy``, plus ``NodeRestriction``;
- the controller manager runs every default controller (Deployment, ReplicaSet,
  StatefulSet, EndpointSlice, garbage collector, ...), the scheduler binds pods;
- kwok is the kubelet of one simulated Node ``kwok-node-0`` (its node stages keep the
  Node Ready; it serves the kubelet API on loopback, so the API server's port-forward
  reaches it); the pods themselves are run by :mod:`e2e.cluster.kubelet`.

Invariant: :meth:`ControlPlane.stop` (also on a failed start) ends every process it
started, by process group, and waits for each.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import urllib3
import yaml

from e2e.cluster.api import API, APIError, wait_until
from e2e.cluster.build import Binaries
from e2e.cluster.network import orphan_guard
from e2e.cluster.pki import Authority, KeyPair, signing_key

log = logging.getLogger(__name__)

NODE = "kwok-node-0"
NODE_IP = "127.0.0.1"
SERVICE_CIDR = "10.96.0.0/16"
START_TIMEOUT = 120.0

Say = Callable[[str], None]


class StartFailed(Exception):
    """A component did not come up; the message names it and ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlane:
    """The control plane's processes in ``state``; ``kubeconfig`` is the administrator's."""

    def __init__(self, binaries: Binaries, state: Path, say: Say = lambda line: None) -> None:
        self.binaries = binaries
        self.state = state
        self.say = say
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.pki = state / "pki"
        self.logs = state / "logs"
        self.kubeconfig = state / "kubeconfig"
        self.server = ""
        self.kwok_port = 0
        self._authority: Authority | None = None
        self.api: API | None = None

    # ------------------------------------------------------------------ start / stop

    def start(self) -> None:
        """Start every component and wait until the API server answers and the Node is Ready."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        for old in ("etcd", "pki", "logs", "pods"):  # a state directory is reused: start afresh
            shutil.rmtree(self.state / old, ignore_errors=True)
        self.logs.mkdir(exist_ok=True)
        link = self.state / "bin"  # DIR/bin/kubectl --kubeconfig DIR/kubeconfig works by hand
        link.unlink(missing_ok=True)
        link.symlink_to(self.binaries.dir)
        ca = self._authority = Authority(self.pki)
        sa_key = signing_key(self.pki / "service-account.key")
        etcd_port, peer_port, api_port, self.kwok_port = free_port(), free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        serving = ca.serving("apiserver", ["127.0.0.1", "localhost", "kubernetes", "kubernetes.default",
                                           "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
                                           "10.96.0.1"])
        admin = ca.client("admin", "admin", ["system:masters"])
        self._write_kubeconfig(self.kubeconfig, "admin", admin)

        self._spawn("etcd", [
            str(self.binaries["etcd"]), "--name=node0", f"--data-dir={self.state / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=node0=http://127.0.0.1:{peer_port}",
            "--auto-compaction-retention=1", "--quota-backend-bytes=1073741824",
            "--unsafe-no-fsync",  # a throwaway store: durability costs time and buys nothing here
            "--log-level=warn",
        ])
        self._wait_port("etcd", etcd_port)
        self.say("etcd: running")

        self._spawn("kube-apiserver", [
            str(self.binaries["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={api_port}", "--advertise-address=127.0.0.1",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={ca.cert}",
            f"--service-account-key-file={sa_key.cert}", f"--service-account-signing-key-file={sa_key.key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={admin.cert}", f"--kubelet-client-key={admin.key}",
            "--kubelet-preferred-address-types=InternalIP",
            "--endpoint-reconciler-type=none",  # no endpoints for the "kubernetes" Service on loopback
            "--max-requests-inflight=0", "--max-mutating-requests-inflight=0", "--enable-priority-and-fairness=false",
            "--v=1",
        ])
        self.api = API(self.server, str(ca.cert), str(admin.cert), str(admin.key))
        wait_until(self._healthy, "the API server's /readyz", START_TIMEOUT, check=self._check_alive)
        self.say(f"kube-apiserver: serving on {self.server}")

        for name in ("kube-controller-manager", "kube-scheduler"):
            pair = ca.client(name, f"system:{name}")
            config = self.pki / f"{name}.kubeconfig"
            self._write_kubeconfig(config, name, pair)
            extra = ([f"--root-ca-file={ca.cert}", f"--service-account-private-key-file={sa_key.key}",
                      "--use-service-account-credentials=true", "--controllers=*"]
                     if name == "kube-controller-manager" else [])
            self._spawn(name, [
                str(self.binaries[name]), f"--kubeconfig={config}", f"--authentication-kubeconfig={config}",
                f"--authorization-kubeconfig={config}", "--leader-elect=false", "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}", "--kube-api-qps=500", "--kube-api-burst=1000", *extra, "--v=1",
            ])

        self._start_kwok(ca, admin)
        wait_until(self._node_ready, f"Node {NODE} to be Ready", START_TIMEOUT, check=self._check_alive)
        self.say(f"kwok: Node {NODE} is Ready (kubelet API on {NODE_IP}:{self.kwok_port})")

    def _start_kwok(self, ca: Authority, admin: KeyPair) -> None:
        assert self.api is not None
        crd = yaml.safe_load(self.binaries.asset("kwok-portforwards-crd.yaml").read_text())
        self.api.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        wait_until(lambda: _established(self.api, crd["metadata"]["name"]), "kwok's PortForward CRD", 60)
        serving = ca.serving("kwok", [NODE_IP, "localhost", NODE])
        # Node stages only: kwok keeps the Node Ready; pods are left to e2e.cluster.kubelet.
        config = self.state / "kwok.yaml"
        docs = [{"apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokConfiguration",
                 # kwok's defaults are not applied to a configuration file's options: spell them out
                 "options": {"enableDebuggingHandlers": True, "podPlayStageParallelism": 4,
                             "nodePlayStageParallelism": 4, "nodeLeaseParallelism": 4,
                             "podsOnNodeSyncParallelism": 1, "enablePodsOnNodeSyncListPager": True,
                             "enablePodsOnNodeSyncStreamWatch": False}}]
        docs += [yaml.safe_load(self.binaries.asset(name).read_text())
                 for name in ("kwok-node-initialize.yaml", "kwok-node-heartbeat.yaml")]
        config.write_text(yaml.safe_dump_all(docs))
        self._spawn("kwok", [
            str(self.binaries["kwok"]), f"--kubeconfig={self.kubeconfig}", f"--config={config}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--node-ip={NODE_IP}", f"--node-name={NODE}", f"--node-port={self.kwok_port}",
            f"--server-address={NODE_IP}:{self.kwok_port}", "--manage-all-nodes=true",
            "--node-lease-duration-seconds=40", "--enable-crds=PortForward",
        ])
        self.api.post("/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                         "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux",
                                    "kubernetes.io/arch": "amd64", "type": "kwok"}},
            "spec": {},
        })

    def stop(self) -> None:
        """End every component (newest first): SIGTERM to its process group, SIGKILL after 10 s."""
        if self.api is not None:
            self.api.close()
        for name, process in reversed(list(self.processes.items())):
            _end(process, name)
        self.processes.clear()

    # ------------------------------------------------------------------ users

    def kubeconfig_for(self, user: str, path: Path, groups: tuple[str, ...] = (), namespace: str | None = None) -> Path:
        """A kubeconfig for ``user`` (a client certificate); it may do only what RBAC grants ``user``."""
        assert self._authority is not None
        safe = "".join(c if c.isalnum() else "-" for c in user)
        self._write_kubeconfig(path, user, self._authority.client(f"user-{safe}", user, groups), namespace)
        return path

    # ------------------------------------------------------------------ plumbing

    def _write_kubeconfig(self, path: Path, user: str, pair: KeyPair, namespace: str | None = None) -> None:
        assert self._authority is not None
        context: dict = {"cluster": "intercept", "user": user}
        if namespace:
            context["namespace"] = namespace
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "intercept", "cluster": {"server": self.server,
                                                           "certificate-authority": str(self._authority.cert)}}],
            "users": [{"name": user, "user": {"client-certificate": str(pair.cert), "client-key": str(pair.key)}}],
            "contexts": [{"name": "intercept", "context": context}],
            "current-context": "intercept",
        }))

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.logs / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(orphan_guard("TERM") + argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True, cwd=self.state)
        out.close()
        log.info("started %s (pid %d)", name, self.processes[name].pid)

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise StartFailed(f"{name} exited with code {process.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 25) -> str:
        try:
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_port(self, name: str, port: int) -> None:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(listening, f"{name} to listen on port {port}", START_TIMEOUT, check=self._check_alive)

    def _healthy(self) -> bool:
        assert self.api is not None
        try:
            self.api.text("/readyz")
            return True
        except (APIError, urllib3.exceptions.HTTPError):
            return False

    def _node_ready(self) -> bool:
        assert self.api is not None
        try:
            node = self.api.get(f"/api/v1/nodes/{NODE}")
        except APIError:
            return False
        return any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in (node.get("status") or {}).get("conditions") or [])


def _established(api: API | None, name: str) -> bool:
    assert api is not None
    crd = api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    return any(c.get("type") == "Established" and c.get("status") == "True"
               for c in (crd.get("status") or {}).get("conditions") or [])


def _end(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within 10s; killing it", name)
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    else:
        try:  # its children, if any outlived it
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
