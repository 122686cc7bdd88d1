"""``intercept start SERVICE`` end to end, without a cluster.

Real processes throughout: the client (``python -m intercept start web --kubeconfig K``),
one real agent per agent pod, and the apps. The only stand-in is the Kubernetes API server
(``tests/kubeapi.py``): the real ``kubernetes`` client injects the agent through it, its
simulated Deployment controller rolls the pods out, the client watches those pods and
port-forwards to each one over the WebSocket protocol, and the stand-in relays each pod's
forward to the real agent the test started for that pod, with the credentials from the
Secret the injection created (as the pod would mount it).

An agent pod's container is not ready until the test has started its agent and pointed
the pod's port-forward at it (``Controller.starting``), as a readiness probe would hold
it; so the rollout, the client's pod watch and the test proceed in step, on printed lines
and store changes, never on sleeps.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from intercept.kube.inject import AGENT_CONTAINER
from tests.conftest import INTERCEPT, Agent, Proc, start_agent
from tests.kubeapi import KubeAPI, as_user_sees_it

NS = "default"
IMAGE = "test/agent:1"
SECRET = "intercept-web"

# A Deployment of 2 replicas behind a Service with a named targetPort (the agent takes it
# over by a port rename), and a NetworkPolicy that admits only the app's port (extended,
# then restored).
WEB: list[dict] = [
    {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{
                    "name": "app", "image": "example/web:1",
                    "env": [{"name": "GREETING", "value": "hello"}],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                }]},
            },
        },
    },
    {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    },
    {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"ports": [{"port": 8080, "protocol": "TCP"}]}]},
    },
]


def snapshot(server: KubeAPI) -> dict[tuple[str, str], dict]:
    """What the user owns in the namespace, as they see it (no versions, status, revision)."""
    return {(kind, o["metadata"]["name"]): as_user_sees_it(o)
            for kind in ("Deployment", "Service", "NetworkPolicy", "Secret") for o in server.objects(kind, NS)}


def has_agent(pod: dict) -> bool:
    return any(c["name"] == AGENT_CONTAINER for c in pod["spec"]["containers"])


def is_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


class Pods:
    """The agent pods of the stand-in, each served by a real agent process the test starts."""

    def __init__(self, server: KubeAPI, tmp_path: Path, upstream_port: int) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.upstream_port = upstream_port
        self.agents: dict[str, Agent] = {}  # pod name -> its agent
        self.credentials: Path | None = None

    def credentials_file(self) -> Path:
        """The Secret the injection created, as the pod mounts it (its credentials.json)."""
        if self.credentials is None:
            secret = self.server.wait_for(lambda: self.server.get("Secret", NS, SECRET), what=f"Secret {SECRET}")
            raw = base64.b64decode(secret["data"]["credentials.json"])
            data = json.loads(raw)
            assert {"token", "host_public_key", "host_private_key"} <= set(data), "the agent in the pod needs its host key"
            self.credentials = self.tmp_path / "credentials.json"
            self.credentials.write_bytes(raw)
            os.chmod(self.credentials, 0o600)
        return self.credentials

    def serve_next(self) -> str:
        """Wait for the next agent pod the controller creates; start its agent; the pod becomes ready."""

        def starting() -> str | None:
            return next((p["metadata"]["name"] for p in self.server.objects("Pod", NS)
                         if has_agent(p) and not is_ready(p) and p["metadata"]["name"] not in self.agents), None)

        pod = self.server.wait_for(starting, what="a new agent pod")
        agent = self.agents[pod] = start_agent(self.tmp_path, self.upstream_port, credentials=self.credentials_file())
        self.server.forward(pod, agent.ssh_port)
        self.server.set_pod_ready(pod, True)
        return pod

    def stop(self, pod: str) -> None:
        self.agents[pod].proc.stop()

    def stop_all(self) -> None:
        for agent in self.agents.values():
            agent.proc.stop()


@pytest.fixture
def server() -> Iterator[KubeAPI]:
    with KubeAPI() as api:
        api.controller.starting.add(IMAGE)
        api.load(WEB)
        yield api


def intercept(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "INTERCEPT_AGENT_IMAGE"}
    return subprocess.run([sys.executable, "-m", "intercept", *args], capture_output=True, text=True, env=environ, timeout=60)


def test_start_injects_holds_the_route_on_every_pod_as_they_come_and_go_and_uninstall_restores(
    server: KubeAPI, tmp_path: Path, cluster_app, local_app
) -> None:
    before = snapshot(server)
    kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
    pods = Pods(server, tmp_path, cluster_app.port)
    client = Proc(INTERCEPT + ["start", "web", "--kubeconfig", str(kubeconfig), "--agent-image", IMAGE,
                               "--header", "x-dev=kube", "--name", "kube", "--port", str(local_app.port)])
    try:
        # Inject: the Deployment gets the agent; the rollout replaces the pods one by one.
        client.wait_for(r"^intercept: progress: Deployment/web in namespace default: agent added \(test/agent:1; ")
        first, second = pods.serve_next(), pods.serve_next()
        client.wait_for(r'^intercept: progress: deployment "web" successfully rolled out$')
        client.wait_for(r"^intercept: progress: Deployment/web: agent 0\.1\.0 ready$")
        ready = client.wait_for(r"^intercept: ready: (.*)$")
        assert ready[1] == f"requests with x-dev: kube now reach localhost:{local_app.port} (2 replicas)"
        deployment = server.get("Deployment", NS, "web")
        assert [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]] == ["example/web:1", IMAGE]
        assert sorted(p["metadata"]["name"] for p in server.objects("Pod", NS)) == sorted([first, second])
        # Each pod was reached through its own port-forward, to the agent's SSH port.
        assert sorted(server.portforward.forwards) == sorted([(f"{NS}/{first}", 9922), (f"{NS}/{second}", 9922)])

        # Whichever replica receives a request, ours come home and the others stay.
        for pod in (first, second):
            assert pods.agents[pod].app_of({"x-dev": "kube"}) == "local"
            assert pods.agents[pod].app_of({"x-dev": "someone-else"}) == "cluster"
            assert pods.agents[pod].app_of() == "cluster"

        # A pod goes: its session is closed, so its agent drops the route at once.
        mark, seen = len(client.lines), len(pods.agents[first].proc.lines)
        server.remove_pod(first)
        gone = client.wait_for(r"^intercept: gone: (.*)$", start=mark)
        assert gone[1] == f"replica {first} is gone (1 replica)"
        pods.agents[first].proc.wait_for(r"dropped route x-dev: kube of kube", start=seen)
        assert pods.agents[first].app_of({"x-dev": "kube"}) == "cluster"
        pods.stop(first)
        assert pods.agents[second].app_of({"x-dev": "kube"}) == "local"

        # The controller replaces it; once its agent is up, the client holds the route there too.
        server.settle()
        third = pods.serve_next()
        assert third not in (first, second)
        joined = client.wait_for(r"^intercept: joined: (.*)$", start=mark)
        assert joined[1] == f"replica {third}: requests with x-dev: kube reach localhost:{local_app.port} through it too (2 replicas)"
        assert (f"{NS}/{third}", 9922) in server.portforward.forwards
        for pod in (second, third):
            assert pods.agents[pod].app_of({"x-dev": "kube"}) == "local"
            assert pods.agents[pod].app_of() == "cluster"
        assert not any(line.startswith(("intercept: reconnecting:", "intercept: error:")) for line in client.lines), client.output

        # list shows the service, its agent and who holds which route (asked of an agent pod).
        listed = intercept("list", "--kubeconfig", str(kubeconfig), "-o", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        (row,) = [r for r in json.loads(listed.stdout) if r["service"] == "web"]
        assert row["agent"] is True
        assert [(r["holder"], r["description"]) for r in row["routes"]] == [("kube", "x-dev: kube")]

        # SIGTERM: the route leaves every agent, exit 0.
        client.signal(signal.SIGTERM)
        assert client.finish() == 0, client.output
        assert client.lines[-1] == "intercept: left: requests with x-dev: kube go to the cluster again", client.output
        for pod in (second, third):
            assert pods.agents[pod].app_of({"x-dev": "kube"}) == "cluster"
    finally:
        client.stop()
        pods.stop_all()

    # Uninstall puts everything back exactly as loaded.
    result = intercept("uninstall", "web", "--kubeconfig", str(kubeconfig))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == (
        "intercept: uninstalled: restored Deployment/web, NetworkPolicy/web; deleted Secret intercept-web (namespace default)")
    after = snapshot(server)
    assert after == before
    assert after[("Deployment", "web")]["spec"] == WEB[0]["spec"]
    assert after[("Service", "web")]["spec"] == WEB[1]["spec"]
    pods_left = server.objects("Pod", NS)
    assert len(pods_left) == 2 and not any(has_agent(p) for p in pods_left) and all(is_ready(p) for p in pods_left)
