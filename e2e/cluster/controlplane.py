"""A real Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

:class:`ControlPlane` starts the built binaries (:mod:`e2e.cluster.build`) as child
processes in a state directory, etcd on loopback and the API server on ``address`` (this
machine's end of the link to the node, :mod:`e2e.cluster.node`, so that the kubelet and
the pods reach it too), and stops them all again. What the API server runs with matters
to the tests, so it is the real thing:

- the secure port only, with its own CA (:mod:`e2e.cluster.pki`); clients authenticate
  with client certificates: ``admin`` (``system:masters``) and any user the tests ask
  for (:meth:`ControlPlane.kubeconfig_for`), who has only what RBAC grants;
- authorization ``Node,RBAC``; admission is the API server's default set, which
  includes ``PodSecurity`` (namespace labels ``pod-security.kubernetes.io/*``) and
  ``ValidatingAdmissionPolicy``, plus ``NodeRestriction``;
- the controller manager runs every default controller (Deployment, ReplicaSet,
  StatefulSet, EndpointSlice, garbage collector, ...), the scheduler binds pods.

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
from e2e.cluster.pki import Authority, KeyPair, signing_key

log = logging.getLogger(__name__)

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

    def __init__(self, binaries: Binaries, state: Path, address: str, service_cidr: str, api_service: str,
                 spawn: Callable[[str, list[str]], subprocess.Popen[bytes]], say: Say = lambda line: None) -> None:
        self.binaries = binaries
        self.state = state
        self.address = address
        self.service_cidr = service_cidr
        self.api_service = api_service  # the ClusterIP of the "kubernetes" Service
        self.spawn = spawn
        self.say = say
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.pki = state / "pki"
        self.logs = state / "logs"
        self.kubeconfig = state / "kubeconfig"
        self.server = ""
        self._authority: Authority | None = None
        self.api: API | None = None

    # ------------------------------------------------------------------ start / stop

    def start(self) -> None:
        """Start every component and wait until the API server answers."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        for old in ("etcd", "pki"):  # a state directory is reused: start afresh
            shutil.rmtree(self.state / old, ignore_errors=True)
        link = self.state / "bin"  # DIR/bin/kubectl --kubeconfig DIR/kubeconfig works by hand
        link.unlink(missing_ok=True)
        link.symlink_to(self.binaries.dir)
        ca = self._authority = Authority(self.pki)
        sa_key = signing_key(self.pki / "service-account.key")
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://{self.address}:{api_port}"
        serving = ca.serving("apiserver", [self.address, "127.0.0.1", "localhost", "kubernetes", "kubernetes.default",
                                           "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
                                           self.api_service])
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
            f"--bind-address={self.address}", f"--secure-port={api_port}", f"--advertise-address={self.address}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={ca.cert}",
            f"--service-account-key-file={sa_key.cert}", f"--service-account-signing-key-file={sa_key.key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={self.service_cidr}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={admin.cert}", f"--kubelet-client-key={admin.key}",
            "--kubelet-preferred-address-types=InternalIP",
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


    @property
    def authority(self) -> Authority:
        assert self._authority is not None
        return self._authority

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
        self.processes[name] = self.spawn(name, argv)

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
