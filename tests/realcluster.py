"""The real cluster (e2e/cluster: a real control plane and a real node) as a pytest fixture: one per
test session, a namespace per test.

``real_cluster`` runs ``python -m e2e.cluster up --state DIR`` (the command a developer
runs by hand), waits for its ``cluster: ready:`` line, and at the end sends SIGTERM and
waits for it to tear everything down. It builds the binaries and images first when the
cache is cold (``.ci/run`` builds them before the tests, with its progress shown).

Skipped, with one line saying what is missing, where Go is not installed or a node
cannot run here (not root; containerd, runc, the CNI plugins, buildah or mmdebstrap
missing: the line names the Debian package).

The tests' own view of the cluster goes through :class:`e2e.cluster.api.API` as the
administrator, never through the product's Kubernetes code (which is what they test).
"""

from __future__ import annotations

import copy
import http.client
import os
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster.api import API, APIError, wait_until
from e2e.cluster import images, node
from e2e.cluster.build import go_missing
from e2e.cluster.pki import Authority
from tests.conftest import INTERCEPT, Proc

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "e2e" / "app" / "sample.py"
AGENT_IMAGE = images.AGENT  # agent_image/Dockerfile of this checkout, built by e2e.cluster.images
APP_IMAGE = images.SAMPLE
START_TIMEOUT = 3600.0  # a cold build of the binaries included
WAIT = 120.0  # seconds the cluster may take to converge (rollouts, endpoints)

Obj = dict[str, Any]

PLURALS = {
    "Namespace": ("v1", "namespaces", False), "Pod": ("v1", "pods", True), "Service": ("v1", "services", True),
    "Secret": ("v1", "secrets", True), "ConfigMap": ("v1", "configmaps", True),
    "ServiceAccount": ("v1", "serviceaccounts", True), "Event": ("v1", "events", True),
    "Deployment": ("apps/v1", "deployments", True), "StatefulSet": ("apps/v1", "statefulsets", True),
    "ReplicaSet": ("apps/v1", "replicasets", True),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies", True),
    "EndpointSlice": ("discovery.k8s.io/v1", "endpointslices", True),
    "Role": ("rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings", True),
    "CronJob": ("batch/v1", "cronjobs", True), "Job": ("batch/v1", "jobs", True),
    "ValidatingAdmissionPolicy": ("admissionregistration.k8s.io/v1", "validatingadmissionpolicies", False),
    "ValidatingAdmissionPolicyBinding": ("admissionregistration.k8s.io/v1", "validatingadmissionpolicybindings", False),
}

# Pod Security "restricted", as a restricted namespace demands of every container.
RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
              "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}


def path(kind: str, namespace: str | None = None, name: str | None = None) -> str:
    api_version, plural, namespaced = PLURALS[kind]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespaced and namespace else ""
    return f"{base}{scope}/{plural}" + (f"/{name}" if name else "")


@dataclass(frozen=True)
class Endpoint:
    """A ready endpoint of a Service, from its EndpointSlices: where "the Service" sends a connection."""

    pod: str
    ip: str
    port: int


class RealCluster:
    """The running cluster: its administrator's kubeconfig and API, and helpers the tests share."""

    def __init__(self, state: Path, process: Proc) -> None:
        self.state = state
        self.process = process
        self.kubeconfig = state / "kubeconfig"
        self.api = API(_server(self.kubeconfig), str(state / "pki" / "ca.crt"), str(state / "pki" / "admin.crt"),
                       str(state / "pki" / "admin.key"))
        self.kubectl = state / "bin" / "kubectl"

    # ------------------------------------------------------------------ objects

    def create(self, obj: Obj, namespace: str | None = None) -> Obj:
        obj = copy.deepcopy(obj)
        ns = namespace or obj["metadata"].get("namespace")
        if ns and PLURALS[obj["kind"]][2]:
            obj["metadata"]["namespace"] = ns
        return self.api.post(path(obj["kind"], ns), obj)

    def get(self, kind: str, namespace: str | None, name: str) -> Obj:
        return self.api.get(path(kind, namespace, name))

    def items(self, kind: str, namespace: str | None, **query: str) -> list[Obj]:
        return self.api.get(path(kind, namespace), **query).get("items") or []

    def exists(self, kind: str, namespace: str | None, name: str) -> bool:
        try:
            self.get(kind, namespace, name)
            return True
        except APIError as error:
            if error.status == 404:
                return False
            raise

    def patch(self, kind: str, namespace: str, name: str, body: Obj) -> Obj:
        return self.api.patch(path(kind, namespace, name), body)

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        self.api.delete(path(kind, namespace, name))

    # ------------------------------------------------------------------ namespaces and users

    def new_namespace(self, prefix: str, labels: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})
        return name

    def kubeconfig_for(self, user: str, directory: Path, namespace: str | None = None) -> Path:
        """A kubeconfig of ``user``, a user with no rights but what RBAC grants it."""
        authority = Authority(self.state / "pki", load=True)
        pair = authority.client(f"test-{uuid.uuid4().hex[:8]}", user)
        config = yaml.safe_load(self.kubeconfig.read_text())
        config["users"] = [{"name": user, "user": {"client-certificate": str(pair.cert), "client-key": str(pair.key)}}]
        config["contexts"][0]["context"]["user"] = user
        if namespace:
            config["contexts"][0]["context"]["namespace"] = namespace
        target = directory / f"kubeconfig-{user}"
        target.write_text(yaml.safe_dump(config))
        return target

    # ------------------------------------------------------------------ waiting

    def wait_ready(self, namespace: str, service: str, count: int, timeout: float = WAIT) -> list[Endpoint]:
        """The Service's ready endpoints once there are exactly ``count`` of them; on timeout, the error
        says what the Service's pods are doing (unscheduled, waiting for an image, failing a probe)."""
        try:
            return wait_until(lambda: (lambda e: e if len(e) == count else None)(self.endpoints(namespace, service)),
                              f"{count} ready endpoints of Service {namespace}/{service}", timeout)
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.describe_pods(namespace, service)}") from None

    def describe_pods(self, namespace: str, service: str) -> str:
        """One line per pod the Service selects (phase, conditions not met, containers not running), then the
        namespace's warning events: what a timeout message needs to say why."""
        selector = self.get("Service", namespace, service)["spec"].get("selector") or {}
        lines = []
        for pod in self.items("Pod", namespace, labelSelector=",".join(f"{k}={v}" for k, v in selector.items())):
            status = pod.get("status") or {}
            unmet = [f"{c['type']}={c['status']}({c.get('reason', '')}: {c.get('message', '')})"
                     for c in status.get("conditions") or [] if c.get("status") != "True"]
            containers = []
            for c in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
                state, detail = next(iter((c.get("state") or {"unknown": {}}).items()))  # one of waiting, running, ...
                reason = f"({detail['reason']})" if detail.get("reason") else ""
                containers.append(f"{c['name']}:{state}{reason} restarts={c.get('restartCount')}")
            lines.append(f"  pod {pod['metadata']['name']}: {status.get('phase')} {' '.join(unmet)} {' '.join(containers)}")
        for event in self.items("Event", namespace):
            if event.get("type") == "Warning":
                lines.append(f"  event {event['involvedObject'].get('name')}: {event.get('reason')}: {event.get('message')}")
        return "\n".join(lines[-40:]) or "  (no pods)"

    def endpoints(self, namespace: str, service: str, port_name: str | None = None) -> list[Endpoint]:
        """Ready endpoints of ``service`` (sorted by pod), read from its EndpointSlices."""
        found = []
        for slice_ in self.items("EndpointSlice", namespace, labelSelector=f"kubernetes.io/service-name={service}"):
            ports = [p for p in slice_.get("ports") or [] if port_name is None or p.get("name") == port_name]
            if not ports:
                continue
            for endpoint in slice_.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready"):
                    pod = (endpoint.get("targetRef") or {}).get("name", "")
                    found += [Endpoint(pod, endpoint["addresses"][0], int(ports[0]["port"]))]
        return sorted(found, key=lambda e: e.pod)

    def wait_ready_pods(self, namespace: str, selector: str, count: int, timeout: float = WAIT) -> list[str]:
        """The names of the pods of ``selector`` once exactly ``count`` of them are Ready."""
        def ready() -> list[str] | None:
            names = sorted(p["metadata"]["name"] for p in self.pods(namespace, selector)
                           if any(c.get("type") == "Ready" and c.get("status") == "True"
                                  for c in (p.get("status") or {}).get("conditions") or []))
            return names if len(names) == count else None

        return wait_until(ready, f"{count} ready pods of {selector} in {namespace}", timeout)

    def pods(self, namespace: str, selector: str) -> list[Obj]:
        return self.items("Pod", namespace, labelSelector=selector)

    def ctr(self) -> list[str]:
        """``ctr`` for the node's containerd, in the kubelet's namespace."""
        config = tomllib.loads((self.state / "node" / "containerd.toml").read_text())
        return ["ctr", "--address", config["grpc"]["address"], "--namespace", "k8s.io"]

    def provide_as_echo(self, references: set[str]) -> None:
        """Have the node hold ``intercept.test/echo:1`` under each image reference (as a registry mirror of them
        would serve it), so that third-party manifests run unchanged: each container answers HTTP on 8080.

        A reference pinned by digest is left out: no mirror serves other content under a digest (and the
        node's image store, asked for such a name on another image, fails every name of that image)."""
        names = sorted({docker_name(r) for r in references if "@" not in r})
        tagged = subprocess.run([*self.ctr(), "images", "tag", "--force", images.ECHO, *names],
                                capture_output=True, text=True)
        assert tagged.returncode == 0, tagged.stderr

    def container_pid(self, namespace: str, pod: str, container: str) -> int:
        """The process id (on this machine) of a running container's first process, as containerd reports it."""
        status = next(s for s in self.get("Pod", namespace, pod)["status"]["containerStatuses"] if s["name"] == container)
        container_id = status["containerID"].removeprefix("containerd://")
        tasks = subprocess.run([*self.ctr(), "tasks", "ls"], capture_output=True, text=True, check=True).stdout
        return next(int(line.split()[1]) for line in tasks.splitlines() if line.startswith(container_id))


def docker_name(reference: str) -> str:
    """An image reference as the node's runtime looks it up: ``redis:alpine`` is
    ``docker.io/library/redis:alpine``, a reference without a tag is ``:latest``."""
    first, _, rest = reference.partition("/")
    if not rest:
        reference = f"docker.io/library/{reference}"
    elif "." not in first and ":" not in first and first != "localhost":
        reference = f"docker.io/{reference}"
    return reference if ":" in reference.rpartition("/")[2] else f"{reference}:latest"


def served_by(endpoint: Endpoint, headers: dict[str, str] | None = None) -> str:
    """Who answered one request (fresh connection) sent to the endpoint: its X-Served-By."""
    conn = http.client.HTTPConnection(endpoint.ip, endpoint.port, timeout=30)
    try:
        conn.request("GET", "/", headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return response.headers.get("X-Served-By", "?")
    finally:
        conn.close()


def user_view(obj: Obj) -> Obj:
    """What the user owns of an object as the server gives it back, defaults included.

    Leaves out what the server or controllers keep (versions, managedFields, status, the
    Deployment controller's revision annotation), so "before" and "after" compare.
    """
    obj = copy.deepcopy(obj)
    metadata = obj["metadata"]
    for key in ("resourceVersion", "generation", "managedFields"):
        metadata.pop(key, None)
    annotations = metadata.get("annotations") or {}
    annotations.pop("deployment.kubernetes.io/revision", None)
    if not annotations:
        metadata.pop("annotations", None)
    obj.pop("status", None)
    return obj


def intercept(*args: str, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``intercept ARGS``, to completion (``env``: variables added to ours)."""
    environ = {k: v for k, v in os.environ.items() if k != "INTERCEPT_AGENT_IMAGE"}
    return subprocess.run([*INTERCEPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**environ, **(env or {})})


def start(cluster: RealCluster, namespace: str, service: str, port: int, *args: str, name: str = "alice",
          header: str = "x-dev=alice", kubeconfig: Path | None = None, image: str | None = AGENT_IMAGE,
          env: dict[str, str] | None = None, served_as: str = "local") -> Proc:
    """``intercept start SERVICE -- python sample.py serve --port PORT --name SERVED_AS`` (not
    waited for; ``image`` None: no ``--agent-image``)."""
    return Proc([*INTERCEPT, "start", service, "-n", namespace, "--kubeconfig", str(kubeconfig or cluster.kubeconfig),
                 *(["--agent-image", image] if image else []), "--header", header, "--name", name, "--port", str(port),
                 "--no-watch",
                 *args, "--", sys.executable, str(SAMPLE), "serve", "--port", str(port), "--name", served_as],
                env=env or {})


ENFORCE_RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
                      "pod-security.kubernetes.io/enforce-version": "latest"}


def app(name: str, replicas: int, *, kind: str = "Deployment", port_name: str | None = "http") -> list[dict]:
    """A workload of the sample app (cluster/POD answers), its Service and a NetworkPolicy admitting only 8080.

    ``port_name`` None: the Service's targetPort is the number 8080 (else the port's name).
    """
    port = {"containerPort": 8080, **({"name": port_name} if port_name else {})}
    workload = {
        "apiVersion": "apps/v1", "kind": kind,
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": "app", "image": APP_IMAGE,
                    "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "GREETING", "value": "hello"}],
                    "ports": [port],
                    "readinessProbe": {"httpGet": {"path": "/", "port": port_name or 8080}, "periodSeconds": 1},
                    "securityContext": RESTRICTED,
                }]},
            },
        },
    }
    if kind == "StatefulSet":
        workload["spec"]["serviceName"] = name
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"selector": {"app": name},
                        "ports": [{"name": "http", "port": 80, "targetPort": port_name or 8080}]}}
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name},
              "spec": {"podSelector": {"matchLabels": {"app": name}}, "policyTypes": ["Ingress"],
                       "ingress": [{"ports": [{"port": 8080, "protocol": "TCP"}]}]}}
    return [workload, service, policy]


def echo(name: str, replicas: int, ports: tuple[int, ...] = (8080,)) -> dict:
    """A Deployment of ``intercept.test/echo:1`` listening on ``ports`` (``X-Served-By``: its pod)."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{
                                  "name": "echo", "image": images.ECHO,
                                  "env": [{"name": "PORTS", "value": ",".join(map(str, ports))}],
                                  "ports": [{"containerPort": p} for p in ports],
                                  "readinessProbe": {"tcpSocket": {"port": ports[0]}, "periodSeconds": 1},
                                  "securityContext": RESTRICTED}]}}},
    }


def deploy(cluster: RealCluster, namespace: str, objects: list[dict]) -> None:
    for obj in objects:
        cluster.create(obj, namespace)


def snapshot(cluster: RealCluster, namespace: str) -> dict[tuple[str, str], dict]:
    """Every workload, Service, NetworkPolicy and Secret of the namespace, as the server returns them."""
    return {(kind, o["metadata"]["name"]): user_view(o)
            for kind in ("Deployment", "StatefulSet", "Service", "NetworkPolicy", "Secret")
            for o in cluster.items(kind, namespace)}


def no_trace_of_intercept(objects: dict[tuple[str, str], dict]) -> None:
    for (kind, name), obj in objects.items():
        metadata = obj["metadata"]
        assert not any(k.startswith("intercept.dev/") for k in metadata.get("annotations") or {}), (kind, name)
        assert (metadata.get("labels") or {}).get("app.kubernetes.io/managed-by") != "intercept", (kind, name)
        assert not (kind == "Secret" and name.startswith("intercept-")), (kind, name)


def _server(kubeconfig: Path) -> str:
    return yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]


def _why_not() -> str | None:
    return go_missing() or node.unavailable() or images.unavailable()


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    missing = _why_not()
    if missing:
        pytest.skip(f"real cluster: {missing}")
    state = tmp_path_factory.mktemp("cluster")
    process = Proc([sys.executable, "-m", "e2e.cluster", "up", "--state", str(state)], cwd=ROOT)
    try:
        process.wait_for(r"^cluster: ready: kubeconfig ", timeout=START_TIMEOUT)
        yield RealCluster(state, process)
    finally:
        process.signal(signal.SIGTERM)
        try:
            code = process.finish(120)
        finally:
            process.stop()
        assert code == 0, process.output


@pytest.fixture
def namespace_of(real_cluster: RealCluster) -> Iterator[Any]:
    """``namespace_of(prefix, labels)`` makes a namespace for this test; all of them are deleted after it."""
    made: list[str] = []

    def make(prefix: str, labels: dict[str, str] | None = None) -> str:
        made.append(real_cluster.new_namespace(prefix, labels))
        return made[-1]

    yield make
    for name in made:
        try:
            real_cluster.delete("Namespace", None, name)
        except APIError:
            pass
