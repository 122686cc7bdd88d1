"""Several ports in one intercept, on the real node: a Service with an HTTP/1.1 port and an
h2c gRPC port of the same pods, both taken by one session with one route.

The HTTP port's targetPort is a name (taken over by renaming the app's port), the gRPC
port's a number (the Service is pointed at the agent): both ways of injection at once.
"""

from __future__ import annotations

import json
import signal
import sys
from concurrent import futures
from pathlib import Path

import grpc

from e2e.cluster.api import wait_until
from e2e.cluster.images import ECHO, SERVERS
from tests.conftest import INTERCEPT, Proc, free_port
from tests.realcluster import AGENT_IMAGE, RESTRICTED, SAMPLE, WAIT, RealCluster, deploy, intercept, served_by, snapshot


def shop() -> list[dict]:
    """Pods of two containers: echo (HTTP/1.1, port ``http`` 8080) and a gRPC server (h2c, 9090);
    the Service ``shop``: ``http`` 80 -> ``http``, ``grpc`` 9090 -> 9090; a policy admitting both."""
    tmp = {"name": "tmp", "mountPath": "/tmp"}
    pod = {
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        "containers": [
            {"name": "web", "image": ECHO, "env": [{"name": "PORTS", "value": "8080"}],
             "ports": [{"name": "http", "containerPort": 8080}],
             "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1}, "securityContext": RESTRICTED},
            {"name": "grpc", "image": SERVERS, "args": ["grpc", "9090"],
             "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
             "ports": [{"name": "grpc", "containerPort": 9090}], "volumeMounts": [tmp],
             "readinessProbe": {"tcpSocket": {"port": 9090}, "periodSeconds": 1}, "securityContext": RESTRICTED},
        ],
    }
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "shop", "labels": {"app": "shop"}},
         "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "shop"}},
                  "template": {"metadata": {"labels": {"app": "shop"}}, "spec": pod}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop"},
         "spec": {"selector": {"app": "shop"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                                         {"name": "grpc", "port": 9090, "targetPort": 9090}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "shop"},
         "spec": {"podSelector": {"matchLabels": {"app": "shop"}}, "policyTypes": ["Ingress"],
                  "ingress": [{"ports": [{"port": 8080, "protocol": "TCP"}, {"port": 9090, "protocol": "TCP"}]}]}},
    ]


class LocalGrpc:
    """The developer's gRPC process: ``/test.Echo/Say`` answers ``local: `` and the request."""

    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
            "Say": grpc.unary_unary_rpc_method_handler(lambda request, context: b"local: " + request)})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(None)


def endpoints_at(cluster: RealCluster, namespace: str, port_name: str, port: int) -> list:
    """The two ready endpoints of Service shop's port ``port_name``, once both are at pod port ``port``."""
    def found() -> list | None:
        endpoints = cluster.endpoints(namespace, "shop", port_name)
        return endpoints if len(endpoints) == 2 and {e.port for e in endpoints} == {port} else None

    return wait_until(found, f"Service {namespace}/shop port {port_name} at pod port {port} on 2 pods", WAIT)


def say(ip: str, port: int, metadata=None) -> str:
    """Who answered one gRPC call to ``ip:port`` (h2c, as inside the cluster): the pod, or ``local``."""
    with grpc.insecure_channel(f"{ip}:{port}") as channel:
        answer = channel.unary_unary("/test.Echo/Say")(b"hi", metadata=metadata, timeout=30)
    return answer.decode().split(":")[0]


def test_one_session_takes_the_http_and_the_grpc_port_by_one_header_and_uninstall_restores_them(
        real_cluster: RealCluster, namespace_of, tmp_path: Path) -> None:
    ns = namespace_of("ports")
    deploy(real_cluster, ns, shop())
    http_side = endpoints_at(real_cluster, ns, "http", 8080)
    assert {served_by(e) for e in http_side} == {e.pod for e in http_side}
    assert {say(e.ip, e.port) for e in endpoints_at(real_cluster, ns, "grpc", 9090)} == {e.pod for e in http_side}
    before = snapshot(real_cluster, ns)

    http_port = free_port()
    local_http = Proc([sys.executable, str(SAMPLE), "serve", "--port", str(http_port), "--name", "local"])
    local_grpc = LocalGrpc()
    state = {"INTERCEPT_STATE_DIR": str(tmp_path / "state")}
    client = Proc([*INTERCEPT, "start", "shop", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig),
                   "--agent-image", AGENT_IMAGE, "--header", "x-dev=alice", "--name", "alice",
                   "--port", f"http:{http_port}", "--port", f"grpc:{local_grpc.port}"], env=state)
    try:
        ready = client.wait_for(r"^intercept: ready: (.*)$", timeout=WAIT)
        assert ready[1] == (f"requests with x-dev: alice now reach port 8080 to localhost:{http_port}, "
                            f"port 9090 to localhost:{local_grpc.port} (2 replicas)")

        # intercept status lists both ports of the one intercept
        status = intercept("status", "-o", "json", env=state)
        (row,) = json.loads(status.stdout)
        assert row["ports"] == [f"http:{http_port}", f"grpc:{local_grpc.port}"]
        assert f"http:{http_port} grpc:{local_grpc.port}" in intercept("status", env=state).stdout

        # every pod: each Service port lands on its own listener of the agent; one header routes both
        http_endpoints = endpoints_at(real_cluster, ns, "http", 9900)
        grpc_endpoints = endpoints_at(real_cluster, ns, "grpc", 9901)
        for endpoint in http_endpoints:
            assert served_by(endpoint, {"x-dev": "alice"}) == "local"
            assert served_by(endpoint, {"x-dev": "bob"}) == endpoint.pod
            assert served_by(endpoint) == endpoint.pod
        for endpoint in grpc_endpoints:
            assert say(endpoint.ip, endpoint.port, [("x-dev", "alice")]) == "local"
            assert say(endpoint.ip, endpoint.port, [("x-dev", "bob")]) == endpoint.pod
            assert say(endpoint.ip, endpoint.port) == endpoint.pod

        client.signal(signal.SIGTERM)
        assert client.finish() == 0, client.output
        for endpoint in grpc_endpoints:  # gone with the session, on both ports
            assert say(endpoint.ip, endpoint.port, [("x-dev", "alice")]) == endpoint.pod
        for endpoint in http_endpoints:
            assert served_by(endpoint, {"x-dev": "alice"}) == endpoint.pod
    finally:
        client.stop()
        local_http.stop()
        local_grpc.close()

    result = intercept("uninstall", "shop", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig))
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.splitlines()[-1]
    assert last.startswith("intercept: uninstalled: restored ") and all(
        f"{what}/shop" in last for what in ("Deployment", "Service", "NetworkPolicy")), last
    assert snapshot(real_cluster, ns) == before
