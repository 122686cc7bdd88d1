"""End to end on kind: inject, tunnel to every replica, leave, uninstall, everything as before.

The flow (``e2e/run.sh`` is the same flow as a shell script):

1. create a kind cluster (its own kubeconfig file; yours is not touched);
2. build the agent image from ``agent_image/`` and the sample app from ``e2e/app/``, and
   ``kind load`` both;
3. deploy ``e2e/manifests.yaml``: a namespace enforcing Pod Security "restricted", a
   Deployment ``echo`` of 2 replicas, a Service ``echo`` with a named targetPort;
4. ``intercept start echo --header x-dev=e2e --port P -- python sample.py serve ...``;
5. through each pod's port (the one the Service targets) a request with ``x-dev: e2e``
   reaches the local process and one without reaches that pod's app; through the
   Service, from inside the cluster, likewise; again after an idle period;
6. ``intercept leave echo``: the header's requests reach the cluster again;
7. ``intercept uninstall echo``: the Deployment's and the Service's specs equal the ones
   read before step 4, no pod runs the agent, the Secret is gone;
8. delete the cluster (``INTERCEPT_E2E_KEEP=1`` keeps it).

Skipped, saying why, where Docker (with a running engine) or kind is missing. Settings:
``INTERCEPT_E2E_IDLE`` (seconds of idleness in step 5, default 20).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
E2E = ROOT / "e2e"
NAMESPACE = "intercept-e2e"
SERVICE = "echo"
AGENT_IMAGE = "intercept-agent:e2e"
APP_IMAGE = "intercept-e2e-app:e2e"
INTERCEPT = [sys.executable, "-m", "intercept"]
READY_TIMEOUT = 600.0  # the injection's rollout, image pulls included
SETTLE_TIMEOUT = 120.0  # the cluster converging: endpoints, terminating pods

T = TypeVar("T")
Obj = dict[str, Any]


def _missing() -> str | None:
    if not shutil.which("docker"):
        return "docker is not on PATH"
    if not shutil.which("kind"):
        return "kind is not on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 60s"
    if info.returncode != 0:
        return "the Docker engine is not running (docker info failed)"
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(
    MISSING is not None,
    reason=f"e2e needs Docker with a running engine and kind on PATH (https://kind.sigs.k8s.io); skipped: {MISSING}",
)


# -- processes -----------------------------------------------------------------------------


def run(*argv: str, timeout: float = 900.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A command to completion; on failure, an assertion that shows its output."""
    env = dict(os.environ, DOCKER_BUILDKIT="1")  # agent_image/Dockerfile mounts from a stage
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


class Started:
    """A background process whose merged output is collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.p = subprocess.Popen(
            argv, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", **env), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if m := rx.search(line):
                        return m
                if self.p.poll() is not None and self.p.stdout.closed:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 1.0))
        raise AssertionError(f"{' '.join(self.argv[:4])}: no line matching {pattern!r} (exit {self.p.poll()}):\n{self.output}")

    def interrupt(self, timeout: float = 60.0) -> int:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGINT)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
            raise AssertionError(f"{' '.join(self.argv[:4])} did not stop on SIGINT:\n{self.output}") from None

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


def eventually(check: Callable[[], T], what: str, timeout: float = SETTLE_TIMEOUT) -> T:
    """``check()`` once it stops raising AssertionError: the cluster converges, it does not jump."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still not so after {timeout:g}s: {e}") from None
        time.sleep(1.0)  # polling the cluster's state, not waiting for our own code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the cluster ---------------------------------------------------------------------------


class Kind:
    """One kind cluster with the images loaded and the sample deployed, and a client for it."""

    def __init__(self, tmp: Path) -> None:
        from kubernetes import client, config

        self.name = f"intercept-e2e-{uuid.uuid4().hex[:6]}"
        self.kubeconfig = tmp / "kubeconfig"
        run("kind", "create", "cluster", "--name", self.name, "--kubeconfig", str(self.kubeconfig), "--wait", "180s")
        self.api = config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)

    def delete(self) -> None:
        run("kind", "delete", "cluster", "--name", self.name, "--kubeconfig", str(self.kubeconfig), check=False)

    # Objects are read as the API server sends them (JSON): the spec comparison needs that
    # form, and the client's strict models refuse some objects real clusters send.

    def raw(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        return json.loads(call(*args, _preload_content=False, **kwargs).data)

    def deployment(self) -> Obj:
        return self.raw(self.apps.read_namespaced_deployment, SERVICE, NAMESPACE)

    def service(self) -> Obj:
        return self.raw(self.core.read_namespaced_service, SERVICE, NAMESPACE)

    def pods(self) -> list[Obj]:
        """The sample's pods that are not terminating."""
        items = self.raw(self.core.list_namespaced_pod, NAMESPACE, label_selector=f"app={SERVICE}")["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def apply(self, path: Path) -> None:
        create = {
            "Namespace": lambda body: self.core.create_namespace(body, _preload_content=False),
            "Deployment": lambda body: self.apps.create_namespaced_deployment(NAMESPACE, body, _preload_content=False),
            "Service": lambda body: self.core.create_namespaced_service(NAMESPACE, body, _preload_content=False),
        }
        for doc in yaml.safe_load_all(path.read_text()):
            create[doc["kind"]](doc)

    def wait_available(self) -> None:
        def available() -> None:
            status = self.deployment().get("status") or {}
            assert status.get("availableReplicas") == 2 and status.get("updatedReplicas") == 2, status
        eventually(available, "Deployment echo has 2 available replicas", READY_TIMEOUT)

    def get_via_pod(self, pod: Obj, headers: dict[str, str]) -> str:
        """GET / through the pod's port that the Service targets (a port-forward): who served it."""
        from kubernetes.stream import portforward

        port = served_port(pod)
        name = pod["metadata"]["name"]
        forward = portforward(self.core.connect_get_namespaced_pod_portforward, name, NAMESPACE, ports=str(port))
        conn = http.client.HTTPConnection("localhost", timeout=30)
        conn.sock = forward.socket(port)
        conn.sock.settimeout(30)
        try:
            # Keep-alive: the client's relay drops what is still buffered when the forward
            # closes, so a server's closing the connection could cut the response short.
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            response.read()
            return response.getheader("X-Served-By", "?")
        finally:
            conn.close()
            forward.close()

    def get_via_service(self, headers: dict[str, str], count: int) -> list[str]:
        """``count`` requests to the Service from inside the cluster (the app's own container)."""
        from kubernetes.stream import stream

        args = [f"-H{k}: {v}" for k, v in headers.items()]
        pod = self.pods()[0]["metadata"]["name"]
        out = stream(
            self.core.connect_get_namespaced_pod_exec, pod, NAMESPACE, container="app",
            command=["python", "/app/sample.py", "probe", f"http://{SERVICE}.{NAMESPACE}/", *args, "-n", str(count)],
            stdout=True, stderr=True, stdin=False, tty=False,
        )
        return out.split()


def served_port(pod: Obj) -> int:
    """The port the Service's targetPort (named ``http``) resolves to in this pod."""
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == "http":
                return port["containerPort"]
    raise AssertionError(f"pod {pod['metadata']['name']} has no port named http")


def has_agent(pod: Obj) -> bool:
    return any(c["name"] == "intercept-agent" for c in pod["spec"]["containers"])


def name_of(pod: Obj) -> str:
    return pod["metadata"]["name"]


@pytest.fixture(scope="module")
def kind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kind]:
    cluster = Kind(tmp_path_factory.mktemp("kind"))
    try:
        run("docker", "build", "-f", "agent_image/Dockerfile", "-t", AGENT_IMAGE, ".")
        run("docker", "build", "-t", APP_IMAGE, "e2e/app")
        run("kind", "load", "docker-image", "--name", cluster.name, AGENT_IMAGE, APP_IMAGE)
        cluster.apply(E2E / "manifests.yaml")
        cluster.wait_available()
        yield cluster
    finally:
        if os.environ.get("INTERCEPT_E2E_KEEP") == "1":
            print(f"\nkept kind cluster {cluster.name}; kubeconfig {cluster.kubeconfig}")
        else:
            cluster.delete()


# -- the flow ------------------------------------------------------------------------------


def test_intercept_reaches_me_from_every_replica_and_uninstall_puts_everything_back(kind: Kind) -> None:
    deployment_before, service_before = kind.deployment(), kind.service()
    cluster_flags = ["-n", NAMESPACE, "--kubeconfig", str(kind.kubeconfig)]
    env = {"INTERCEPT_AGENT_IMAGE": AGENT_IMAGE}
    port = free_port()
    local = [sys.executable, str(E2E / "app" / "sample.py"), "serve", "--port", str(port), "--name", "local"]

    start = Started(INTERCEPT + ["start", SERVICE, *cluster_flags, "--header", "x-dev=e2e", "--port", str(port), "--", *local], env)
    try:
        start.wait_for(r"^intercept: ready: requests with x-dev: e2e now reach localhost:\d+ \(2 replicas\)$", READY_TIMEOUT)

        def every_replica_routes() -> None:
            pods = kind.pods()
            assert len(pods) == 2 and all(map(has_agent, pods)), [name_of(p) for p in pods]
            for pod in pods:
                assert kind.get_via_pod(pod, {"x-dev": "e2e"}) == "local", name_of(pod)
                assert kind.get_via_pod(pod, {"x-dev": "someone-else"}) == f"cluster/{name_of(pod)}"
                assert kind.get_via_pod(pod, {}) == f"cluster/{name_of(pod)}"

        def the_service_routes() -> None:
            mine = kind.get_via_service({"x-dev": "e2e"}, 20)
            assert mine == ["local"] * 20, mine
            others = kind.get_via_service({}, 20)
            assert all(o.startswith("cluster/") for o in others), others

        eventually(every_replica_routes, "a matching request reaches the local process through each replica")
        eventually(the_service_routes, "requests through the Service are routed by the header")
        idle = float(os.environ.get("INTERCEPT_E2E_IDLE", "20"))
        time.sleep(idle)  # the tunnel must survive idleness (keepalive over the port-forward)
        every_replica_routes()
        assert start.p.poll() is None, start.output

        leave = run(*INTERCEPT, "leave", SERVICE, *cluster_flags, check=False)
        assert leave.returncode == 0, leave.stdout + leave.stderr

        def mine_reach_the_cluster() -> None:
            for pod in kind.pods():
                assert kind.get_via_pod(pod, {"x-dev": "e2e"}) == f"cluster/{name_of(pod)}"

        eventually(mine_reach_the_cluster, "after leave, matching requests reach the cluster")
    finally:
        code = start.interrupt()
    assert code == 0, start.output

    uninstall = run(*INTERCEPT, "uninstall", SERVICE, *cluster_flags, check=False, timeout=READY_TIMEOUT)
    assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr
    deployment_after, service_after = kind.deployment(), kind.service()
    assert deployment_after["spec"] == deployment_before["spec"]
    assert service_after["spec"] == service_before["spec"]
    for obj in (deployment_after, service_after):
        assert "intercept.dev/original" not in (obj["metadata"].get("annotations") or {})

    def no_agent_left() -> None:
        pods = kind.pods()
        assert len(pods) == 2 and not any(map(has_agent, pods)), [name_of(p) for p in pods]
        for pod in pods:
            assert kind.get_via_pod(pod, {"x-dev": "e2e"}) == f"cluster/{name_of(pod)}"

    eventually(no_agent_left, "after uninstall, the pods run without the agent")
    secrets = [s["metadata"]["name"] for s in kind.raw(kind.core.list_namespaced_secret, NAMESPACE)["items"]]
    assert f"intercept-{SERVICE}" not in secrets, secrets
