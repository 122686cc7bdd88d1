"""A running intercept against the real cluster: pods that come and go, and the commands around it.

The session set follows the agent pods as the real controllers and the kubelet change
them (``gone`` / ``joined`` lines): a pod deleted and replaced, a scale from 3 to 5 and
back, an agent process killed and restarted by the kubelet. Throughout, a routed request
reaches the developer through every ready endpoint of the Service. Then ``list``,
``status``, ``env`` and ``leave`` against the same cluster.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from e2e.cluster.api import wait_until
from tests.conftest import free_port
from tests.realcluster import (
    AGENT_IMAGE,
    WAIT,
    RealCluster,
    app,
    deploy,
    intercept,
    served_by,
    start,
)


def routed_everywhere(cluster: RealCluster, ns: str, service: str, count: int) -> list[str]:
    """Every one of the ``count`` ready endpoints sends our requests to us and others to its app; their pods."""
    endpoints = cluster.wait_ready(ns, service, count)
    for endpoint in endpoints:
        assert served_by(endpoint, {"x-dev": "alice"}) == "local"
        assert served_by(endpoint) == f"cluster/{endpoint.pod}"
    return [e.pod for e in endpoints]


def test_the_sessions_follow_pods_deleted_scaled_and_an_agent_killed(real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("fleet")
    deploy(real_cluster, ns, app("fleet", 3)[:2])
    real_cluster.wait_ready(ns, "fleet", 3)
    port = free_port()
    client = start(real_cluster, ns, "fleet", port)
    joined = rf"^intercept: joined: replica (\S+): requests with x-dev: alice reach localhost:{port} through it too \((\d+) replicas\)$"
    gone = r"^intercept: gone: replica (\S+) is gone \((\d+) replicas?\)$"
    try:
        ready = client.wait_for(r"^intercept: ready: (.*)$", timeout=WAIT)
        assert ready[1].endswith("(3 replicas)"), ready[1]
        pods = routed_everywhere(real_cluster, ns, "fleet", 3)

        # A pod deleted: its session goes; the ReplicaSet's replacement joins.
        mark = len(client.lines)
        real_cluster.delete("Pod", ns, pods[0])
        assert client.wait_for(gone, start=mark, timeout=WAIT)[1] == pods[0]
        replacement = client.wait_for(joined, start=mark, timeout=WAIT)
        assert replacement[1] not in pods and replacement[2] == "3"
        pods = routed_everywhere(real_cluster, ns, "fleet", 3)

        # Scaled to 5, then back to 3.
        mark = len(client.lines)
        real_cluster.patch("Deployment", ns, "fleet", {"spec": {"replicas": 5}})
        client.wait_for(r"^intercept: joined: replica \S+: .* \(5 replicas\)$", start=mark, timeout=WAIT)
        five = routed_everywhere(real_cluster, ns, "fleet", 5)
        mark = len(client.lines)
        real_cluster.patch("Deployment", ns, "fleet", {"spec": {"replicas": 3}})
        client.wait_for(r"^intercept: gone: replica \S+ is gone \(3 replicas\)$", start=mark, timeout=WAIT)
        pods = routed_everywhere(real_cluster, ns, "fleet", 3)
        assert set(pods) < set(five)

        # The agent process of one pod killed: the kubelet restarts it; its session goes and comes back.
        pid = real_cluster.container_pid(ns, pods[1], "intercept-agent")
        mark = len(client.lines)
        os.kill(pid, signal.SIGKILL)
        assert client.wait_for(gone, start=mark, timeout=WAIT)[1] == pods[1]
        back = client.wait_for(joined, start=mark, timeout=WAIT)
        assert back[1] == pods[1] and back[2] == "3"
        restarted = wait_until(lambda: next(
            (s for s in real_cluster.get("Pod", ns, pods[1])["status"]["containerStatuses"]
             if s["name"] == "intercept-agent" and s["restartCount"] == 1 and s["ready"]), None),
            "the agent container's restart in the pod status", WAIT)
        assert restarted["lastState"]["terminated"]["exitCode"] == 137  # SIGKILL, as a runtime reports it
        assert routed_everywhere(real_cluster, ns, "fleet", 3) == pods
        assert not any(line.startswith("intercept: error:") for line in client.lines), client.output
    finally:
        client.stop()


def test_list_status_env_and_leave_against_the_real_server(real_cluster: RealCluster, namespace_of,
                                                           tmp_path: Path) -> None:
    ns = namespace_of("menu")
    deploy(real_cluster, ns, app("menu", 2))
    real_cluster.wait_ready(ns, "menu", 2)
    state = {"INTERCEPT_STATE_DIR": str(tmp_path / "state")}  # this test's own record of running intercepts
    kube = ["-n", ns, "--kubeconfig", str(real_cluster.kubeconfig)]
    port = free_port()
    client = start(real_cluster, ns, "menu", port, env=state)
    try:
        client.wait_for(r"^intercept: ready: ", timeout=WAIT)

        listed = intercept("list", *kube, "-o", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        (row,) = json.loads(listed.stdout)
        assert (row["service"], row["workload"], row["agent"], row["agentImage"]) == (
            "menu", "Deployment/menu", True, AGENT_IMAGE)
        assert [(r["holder"], r["description"]) for r in row["routes"]] == [("alice", "x-dev: alice")]

        status = intercept("status", "-o", "json", env=state)
        assert status.returncode == 0, status.stdout + status.stderr
        (entry,) = json.loads(status.stdout)
        assert (entry["service"], entry["namespace"], entry["route"], entry["alive"]) == (
            "menu", ns, "requests with x-dev: alice", True)

        env = intercept("env", "menu", *kube, "-o", "json")
        assert env.returncode == 0, env.stdout + env.stderr
        variables = json.loads(env.stdout)
        assert variables["GREETING"] == "hello" and variables["POD_NAME"].startswith("menu-")

        left = intercept("leave", "menu", "-n", ns, env=state)
        assert left.returncode == 0, left.stdout + left.stderr
        assert left.stdout.startswith("intercept: left: "), left.stdout
        assert client.finish(WAIT) == 0, client.output
        for endpoint in real_cluster.wait_ready(ns, "menu", 2):
            assert served_by(endpoint, {"x-dev": "alice"}) == f"cluster/{endpoint.pod}"
        gone = intercept("status", "-o", "json", env=state)
        assert json.loads(gone.stdout) == []
    finally:
        client.stop()
