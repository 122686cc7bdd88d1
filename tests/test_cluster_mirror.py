"""``intercept start SERVICE --mirror`` against the real cluster: every replica's agent copies the
matching requests to the developer while each pod's app answers them."""

from __future__ import annotations

import signal

from e2e.cluster.api import wait_until
from tests.apps import App
from tests.conftest import INTERCEPT, Proc
from tests.realcluster import AGENT_IMAGE, WAIT, RealCluster, app, deploy, served_by


def test_a_mirror_gets_copies_from_every_replica_while_the_pods_answer(real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("mirror")
    deploy(real_cluster, ns, app("orders", 2))
    real_cluster.wait_ready(ns, "orders", 2)
    local = App("local")
    client = Proc([*INTERCEPT, "start", "orders", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig),
                   "--agent-image", AGENT_IMAGE, "--mirror", "--header", "x-dev=alice", "--name", "alice",
                   "--port", str(local.port)])
    try:
        ready = client.wait_for(r"^intercept: ready: (.*)$", timeout=WAIT)
        assert ready[1] == f"copies of requests with x-dev: alice now reach localhost:{local.port} (2 replicas)"
        client.wait_for(r'^intercept: progress: deployment "orders" successfully rolled out$')
        endpoints = wait_until(lambda: (lambda e: e if {x.port for x in e} == {9900} else None)(
            real_cluster.wait_ready(ns, "orders", 2)), "the Service's endpoints on the agent", WAIT)
        for endpoint in endpoints:
            assert served_by(endpoint, {"x-dev": "alice"}) == f"cluster/{endpoint.pod}"  # the pod's app answers
            assert served_by(endpoint, {"x-dev": "bob"}) == f"cluster/{endpoint.pod}"
        copies = local.wait_requests(len(endpoints))
        assert [(c["method"], c["target"], dict(c["headers"])["x-dev"]) for c in copies] == [("GET", "/", "alice")] * 2
        client.wait_for(rf"^intercept: mirrored: 2 copies reached localhost:{local.port}, 0 dropped$", timeout=WAIT)
        client.signal(signal.SIGTERM)
        assert client.finish() == 0, client.output
    finally:
        client.stop()
        local.close()
