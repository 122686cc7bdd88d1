"""``intercept start SERVICE`` against a real API server, the real controllers and pods whose processes run.

The cluster is ``e2e/cluster`` (one per test session, a namespace per test). "The
Service" is reached as kube-proxy would reach it: a ready endpoint from the Service's
real EndpointSlices, dialled at ``podIP:port``, so a request lands on whatever the
Service's targetPort now resolves to (the agent, after the takeover). The client
reaches each agent pod through the real port-forward path: API server -> kubelet -> containerd -> pod.
"""

from __future__ import annotations

import signal
from pathlib import Path


from tests.conftest import free_port
from tests.realcluster import (
    ENFORCE_RESTRICTED,
    WAIT,
    RealCluster,
    app,
    deploy,
    intercept,
    no_trace_of_intercept,
    served_by,
    snapshot,
    start,
)

def test_start_reaches_every_replica_under_restricted_pod_security_and_uninstall_restores_what_the_server_had(
    real_cluster: RealCluster, namespace_of, tmp_path: Path
) -> None:
    ns = namespace_of("orders", ENFORCE_RESTRICTED)
    deploy(real_cluster, ns, app("orders", 3))
    cluster_side = real_cluster.wait_ready(ns, "orders", 3)
    assert {served_by(e) for e in cluster_side} == {f"cluster/{e.pod}" for e in cluster_side}
    before = snapshot(real_cluster, ns)

    port = free_port()
    client = start(real_cluster, ns, "orders", port)
    try:
        ready = client.wait_for(r"^intercept: ready: (.*)$", timeout=WAIT)
        assert ready[1] == f"requests with x-dev: alice now reach localhost:{port} (3 replicas)"
        client.wait_for(r'^intercept: progress: deployment "orders" successfully rolled out$')

        # The real Deployment controller rolled out 3 pods with the agent, admitted under "restricted".
        pods = real_cluster.pods(ns, "app=orders")
        assert len([p for p in pods if not p["metadata"].get("deletionTimestamp")]) >= 3
        # The NetworkPolicy that admitted only 8080 now also admits the agent, as the server stored it.
        policy = real_cluster.get("NetworkPolicy", ns, "orders")
        assert {p["port"] for p in policy["spec"]["ingress"][0]["ports"]} == {8080, 9900}

        # The Service's named targetPort now resolves to the agent on every endpoint.
        endpoints = real_cluster.wait_ready(ns, "orders", 3)
        assert {e.port for e in endpoints} == {9900}
        for endpoint in endpoints:
            assert served_by(endpoint, {"x-dev": "alice"}) == "local"
            assert served_by(endpoint, {"x-dev": "bob"}) == f"cluster/{endpoint.pod}"
            assert served_by(endpoint) == f"cluster/{endpoint.pod}"

        client.signal(signal.SIGTERM)
        assert client.finish() == 0, client.output
        assert client.lines[-1] == "intercept: left: requests with x-dev: alice go to the cluster again"
        for endpoint in endpoints:
            assert served_by(endpoint, {"x-dev": "alice"}) == f"cluster/{endpoint.pod}"
    finally:
        client.stop()

    result = intercept("uninstall", "orders", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == (
        f"intercept: uninstalled: restored Deployment/orders, NetworkPolicy/orders; deleted Secret intercept-orders "
        f"(namespace {ns})")
    after = snapshot(real_cluster, ns)
    assert after == before
    no_trace_of_intercept(after)
    assert {served_by(e) for e in real_cluster.wait_ready(ns, "orders", 3)} <= {f"cluster/{p['metadata']['name']}"
                                                                                   for p in real_cluster.pods(ns, "app=orders")}
