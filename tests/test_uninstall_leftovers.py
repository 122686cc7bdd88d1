"""Uninstall when what led to the agent is gone already, against the real control plane.

(A module of its own beside ``test_cluster_*.py``, whose owner keeps those; it uses the same
session-wide real cluster, and skips with it.)
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.realcluster import AGENT_IMAGE, RealCluster, app, deploy, intercept, no_trace_of_intercept, snapshot


def kube(cluster: RealCluster, *args: str) -> list[str]:
    return ["--kubeconfig", str(cluster.kubeconfig), *args]


def test_uninstall_finds_the_agent_of_a_deleted_service_by_its_own_record(real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("gone")
    deploy(real_cluster, ns, app("cart", 1) + app("stock", 1))
    real_cluster.wait_ready(ns, "cart", 1)
    real_cluster.wait_ready(ns, "stock", 1)
    before = snapshot(real_cluster, ns)
    for service in ("cart", "stock"):
        result = intercept("inject", service, "--agent-image", AGENT_IMAGE, *kube(real_cluster, "-n", ns))
        assert result.returncode == 0, result.stdout + result.stderr
    real_cluster.delete("Service", ns, "cart")

    result = intercept("uninstall", "cart", *kube(real_cluster, "-n", ns))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "intercept: progress: Service/cart is gone; removing the agent of Deployment/cart" in result.stdout
    after = snapshot(real_cluster, ns)
    expected = {key: obj for key, obj in before.items() if key != ("Service", "cart")}
    def cart(objects: dict) -> dict:
        return {key: obj for key, obj in objects.items() if "stock" not in key[1]}

    assert cart(after) == cart(expected)
    no_trace_of_intercept(cart(after))
    # the other agent stays; a name that leads nowhere says where the agents are
    nowhere = intercept("uninstall", "till", *kube(real_cluster, "-n", ns))
    assert nowhere.returncode == 9
    assert "the agents there are on Deployment/stock" in nowhere.stderr
    assert intercept("uninstall", "stock", *kube(real_cluster, "-n", ns)).returncode == 0
    assert snapshot(real_cluster, ns) == expected
    again = intercept("uninstall", "cart", *kube(real_cluster, "-n", ns))  # idempotent
    assert again.returncode == 0 and "nothing to do" in again.stdout
