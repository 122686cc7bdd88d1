"""Services on the simulated node: cluster DNS names and ClusterIPs that work, as CoreDNS and kube-proxy make them.

Nothing here is part of the product: it gives the pods what a real node gives them, so
that a process in a pod can call another Service by name (``http://payments/``), and an
agent can reach a sandbox's fork at ``NAME.NS.svc.cluster.local``.

- **Names.** Every pod's network namespace gets ``/etc/netns/NETNS/hosts``, which
  ``ip netns exec`` (how every container process is started) mounts over ``/etc/hosts``.
  It holds, for every Service, ``NAME.NS.svc.cluster.local``, ``NAME.NS.svc`` and
  ``NAME.NS``, and for the pod's own namespace also ``NAME``: the ClusterIP, or for a
  headless Service the address of its first ready endpoint. It is rewritten in place
  (same file, so the mounts see it) whenever Services or their endpoints change.
- **ClusterIPs.** Each ClusterIP becomes an address of the pod bridge, and a relay thread
  per Service port accepts connections there and joins each to a ready endpoint (round
  robin) at the port the EndpointSlices give: kube-proxy's old userspace mode. Pods reach
  it through their default route; the host (the tests) reaches it directly. The addresses
  go with the bridge.

Services and EndpointSlices are read every :data:`POLL` seconds: a connection made within that
lag of a rollout can still be sent to a pod that is gone, as with a real kube-proxy.
"""

from __future__ import annotations

import itertools
import logging
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.cluster.api import API

log = logging.getLogger(__name__)

POLL = 0.2  # kube-proxy's lag behind the endpoints: calls right after a rollout may still meet an old pod
NETNS_ETC = Path("/etc/netns")
DOMAIN = "cluster.local"
LOCALHOST = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"

Obj = dict[str, Any]


@dataclass(frozen=True)
class _Port:
    """One port of a ClusterIP Service: where it listens, and where its ready endpoints are."""

    ip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]


class _Relay:
    """Accepts on a ClusterIP:port and joins each connection to an endpoint."""

    def __init__(self, ip: str, port: int) -> None:
        self.endpoints: tuple[tuple[str, int], ...] = ()
        self._turn = itertools.count()
        self.sock = socket.create_server((ip, port), backlog=256)
        threading.Thread(target=self._accept, name=f"service {ip}:{port}", daemon=True).start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._join, args=(down,), daemon=True).start()

    def _join(self, down: socket.socket) -> None:
        endpoints = self.endpoints
        if not endpoints:
            down.close()  # as kube-proxy with no endpoint: refused
            return
        ip, port = endpoints[next(self._turn) % len(endpoints)]
        try:
            up = socket.create_connection((ip, port), timeout=10)
        except OSError:
            down.close()
            return
        up.settimeout(None)
        threading.Thread(target=_pump, args=(up, down), daemon=True).start()
        _pump(down, up)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class ServiceNetwork:
    """The names and ClusterIPs of every Service, for the pods of one node."""

    def __init__(self, api: API, bridge: str) -> None:
        self.api = api
        self.bridge = bridge
        self._relays: dict[tuple[str, int], _Relay] = {}
        self._pods: dict[str, str] = {}  # netns -> the pod's namespace
        self._names: dict[str, str] = {}  # FQDN -> address
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="services", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        with self._lock:
            for relay in self._relays.values():
                relay.close()
            self._relays.clear()
            self._pods.clear()  # their /etc/netns directories go with their namespaces (e2e.cluster.network)

    def pod_added(self, netns: str, namespace: str) -> None:
        """Give a new pod namespace its hosts file (before its processes start)."""
        with self._lock:
            self._pods[netns] = namespace
            self._write_hosts(netns, namespace)

    def pod_removed(self, netns: str) -> None:
        """Stop writing the pod's hosts file; the network removes its directory with its namespace."""
        with self._lock:
            self._pods.pop(netns, None)

    # ------------------------------------------------------------------ keeping up

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._sync()
            except Exception as error:  # noqa: BLE001 - the next look tries again
                log.info("services: %s", error)
            self._stopping.wait(POLL)

    def _sync(self) -> None:
        services = self.api.get("/api/v1/services").get("items") or []
        slices = self.api.get("/apis/discovery.k8s.io/v1/endpointslices").get("items") or []
        ready: dict[tuple[str, str], list[Obj]] = {}
        for s in slices:
            owner = (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            if owner:
                ready.setdefault((s["metadata"]["namespace"], owner), []).append(s)
        names: dict[str, str] = {}
        ports: list[_Port] = []
        for svc in services:
            ns, name, spec = svc["metadata"]["namespace"], svc["metadata"]["name"], svc.get("spec") or {}
            cluster_ip = spec.get("clusterIP")
            endpoints = {port_name: eps for port_name, eps in _endpoints(ready.get((ns, name), [])).items()}
            if cluster_ip and cluster_ip != "None":
                names[f"{name}.{ns}"] = cluster_ip
                for port in spec.get("ports") or []:
                    if port.get("protocol", "TCP") == "TCP":
                        ports.append(_Port(cluster_ip, port["port"], tuple(endpoints.get(port.get("name") or "", ()))))
            else:
                addresses = sorted({ip for eps in endpoints.values() for ip, _ in eps})
                if addresses:
                    names[f"{name}.{ns}"] = addresses[0]
        with self._lock:
            self._apply(ports)
            if names != self._names:
                self._names = names
                for netns, namespace in self._pods.items():
                    self._write_hosts(netns, namespace)

    def _apply(self, ports: list[_Port]) -> None:
        wanted = {(p.ip, p.port): p for p in ports}
        for key in [k for k in self._relays if k not in wanted]:
            self._relays.pop(key).close()
        for key, port in wanted.items():
            relay = self._relays.get(key)
            if relay is None:
                if not any(ip == port.ip for ip, _ in self._relays):
                    subprocess.run(["ip", "addr", "replace", f"{port.ip}/32", "dev", self.bridge], capture_output=True, check=False)
                try:
                    relay = self._relays[key] = _Relay(port.ip, port.port)
                except OSError as error:
                    log.info("service %s:%s: %s", port.ip, port.port, error)
                    continue
            relay.endpoints = port.endpoints

    def _write_hosts(self, netns: str, namespace: str) -> None:
        lines = [LOCALHOST]
        for qualified, address in sorted(self._names.items()):
            name, ns = qualified.split(".", 1)
            aliases = [f"{qualified}.svc.{DOMAIN}", f"{qualified}.svc", qualified] + ([name] if ns == namespace else [])
            lines.append(f"{address} {' '.join(aliases)}\n")
        directory = NETNS_ETC / netns
        directory.mkdir(parents=True, exist_ok=True)
        hosts = directory / "hosts"
        # In place, not a new file renamed over it: the processes' /etc/hosts is a bind mount of this inode.
        with open(hosts, "a+") as f:
            f.seek(0)
            f.truncate()
            f.write("".join(lines))


def _endpoints(slices: list[Obj]) -> dict[str, list[tuple[str, int]]]:
    """Ready endpoint addresses by the Service port's name, from a Service's EndpointSlices."""
    out: dict[str, list[tuple[str, int]]] = {}
    for s in slices:
        ready = [e["addresses"][0] for e in s.get("endpoints") or []
                 if (e.get("conditions") or {}).get("ready") and e.get("addresses")]
        for port in s.get("ports") or []:
            if port.get("port"):
                out.setdefault(port.get("name") or "", []).extend((ip, int(port["port"])) for ip in ready)
    return out
