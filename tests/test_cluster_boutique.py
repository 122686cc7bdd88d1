"""Third-party manifests applied as they are: the shop of ``tests/shop.py`` (Online Boutique's
shape, always), and the real Online Boutique (``../shared/fixtures/online-boutique/``) when present.

``kubectl apply`` (built with the control plane) sends the 12 Deployments, Services,
ServiceAccounts and the NetworkPolicies to the real API server, unchanged; the node holds
``intercept.test/echo:1`` under each of their image names (there is no registry here), so
the frontend answers HTTP on 8080 and passes its real probes, while the gRPC services
never become ready, as their images are not what they expect. Then ``frontend`` (HTTP,
numeric targetPort, behind a deny-all policy and its own) is intercepted by header, and
uninstalled back to exactly what was applied.

"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests import shop
from tests.conftest import free_port
from tests.realcluster import WAIT, RealCluster, intercept, no_trace_of_intercept, served_by, snapshot, start

CORPORA = ["shop"] + (["online-boutique"] if (shop.ONLINE_BOUTIQUE / "kubernetes-manifests.yaml").is_file() else [])


@pytest.mark.parametrize("corpus", CORPORA)
def test_online_boutique_applied_as_is_and_frontend_intercepted_by_header(real_cluster: RealCluster, namespace_of,
                                                                          corpus: str) -> None:
    ns = namespace_of("boutique")
    directory = shop.files() if corpus == "shop" else shop.ONLINE_BOUTIQUE
    manifests = [doc for doc in yaml.safe_load_all((directory / "kubernetes-manifests.yaml").read_text()) if doc]
    real_cluster.provide_as_echo({c["image"] for doc in manifests if doc["kind"] == "Deployment"
                                  for c in doc["spec"]["template"]["spec"]["containers"]
                                  + (doc["spec"]["template"]["spec"].get("initContainers") or [])})
    applied = subprocess.run(
        [str(real_cluster.kubectl), "--kubeconfig", str(real_cluster.kubeconfig), "apply", "-n", ns,
         "-f", str(directory / "kubernetes-manifests.yaml"), "-f", str(directory / "network-policies.yaml")],
        capture_output=True, text=True, timeout=120)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert len(real_cluster.items("Deployment", ns)) == 12
    (frontend,) = real_cluster.wait_ready(ns, "frontend", 1)
    assert served_by(frontend) == frontend.pod  # echo, under the frontend image's name
    before = snapshot(real_cluster, ns)

    port = free_port()
    client = start(real_cluster, ns, "frontend", port)
    try:
        ready = client.wait_for(r"^intercept: ready: (.*)$", timeout=WAIT)
        assert ready[1] == f"requests with x-dev: alice now reach localhost:{port} (1 replica)"
        # frontend's own policy admits every port, and deny-all is overridden by it: nothing to extend
        assert snapshot(real_cluster, ns)[("NetworkPolicy", "frontend")] == before[("NetworkPolicy", "frontend")]
        (endpoint,) = real_cluster.wait_ready(ns, "frontend", 1)
        assert endpoint.port == 9900
        assert served_by(endpoint, {"x-dev": "alice"}) == "local"
        assert served_by(endpoint) == endpoint.pod
    finally:
        client.stop()

    result = intercept("uninstall", "frontend", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig))
    assert result.returncode == 0, result.stdout + result.stderr
    after = snapshot(real_cluster, ns)
    assert after == before
    no_trace_of_intercept(after)
