"""--replace's cluster path against the stand-in API server, for the faults a real one cannot
produce on demand (each test says which): the real node's test is tests/test_cluster_replace.py."""

from __future__ import annotations

import dataclasses

import pytest

from intercept.errors import ReplaceRefused
from intercept.kube import inject
from intercept.kube.apply import RolloutFailed, put_back
from tests.test_kube_apply import IMAGE, NS, OPTIONS, Cluster, cluster  # noqa: F401 (the fixture)


def _replaced_by(name: str):
    def mutate(deployment: dict) -> None:  # another developer's replace, written in place
        replaced = inject.inject([deployment], f"deployment/{deployment['metadata']['name']}",
                                 dataclasses.replace(OPTIONS, replace_by=name))[0]
        deployment.clear()
        deployment.update(replaced)

    return mutate


# stand-in: an image the node cannot pull on demand, after the agent runs (the stand-in runs from it).
def test_a_failed_replace_leaves_the_workload_as_it_was(cluster: Cluster) -> None:
    cluster.ensure("cartservice")
    injected = cluster.snapshot()
    cluster.server.controller.unpullable.add(IMAGE)
    with pytest.raises(RolloutFailed, match=r"replacing the app of Deployment/cartservice .* failed: .*put back"):
        cluster.ensure("cartservice", replace_by="alice")
    assert cluster.snapshot() == injected


# stand-in: another developer's replace exactly between our read and our write.
def test_a_replace_that_loses_the_race_to_another_developer_is_refused_naming_them(cluster: Cluster) -> None:
    cluster.ensure("cartservice")
    cluster.server.interfere(kind="Deployment", name="cartservice", mutate=_replaced_by("bob"))
    with pytest.raises(ReplaceRefused, match=r"is replaced by bob already") as refused:
        cluster.ensure("cartservice", replace_by="alice")
    assert refused.value.holders == ("bob",)
    assert inject.replaced_by(cluster.get("Deployment", "cartservice")) == "bob"


# stand-in: counts the client's writes.
def test_leaving_puts_back_only_ones_own_replace(cluster: Cluster) -> None:
    cluster.ensure("cartservice")
    injected = cluster.get("Deployment", "cartservice")["spec"]["template"]
    cluster.ensure("cartservice", replace_by="bob")
    writes = len(cluster.server.writes())
    assert put_back(cluster.api, NS, "cartservice", "alice") is False
    assert len(cluster.server.writes()) == writes
    assert put_back(cluster.api, NS, "cartservice", "bob", cluster.progress.append) is True
    assert cluster.get("Deployment", "cartservice")["spec"]["template"] == injected
    assert cluster.progress[-1] == "Deployment/cartservice: container server runs the app again (its pods are being replaced)"


# stand-in: counts the client's writes.
def test_a_command_that_adds_no_agent_reaches_the_one_in_place_and_writes_nothing(cluster: Cluster) -> None:
    first = cluster.ensure("cartservice")
    writes = len(cluster.server.writes())
    assert cluster.ensure("cartservice", add=False) == first
    assert len(cluster.server.writes()) == writes


# stand-in: what was written, read back (the replace x ports merge).
@pytest.mark.parametrize("service, options", [
    ("db", dataclasses.replace(OPTIONS, service_port="grpc")),  # one of the agent's two ports asked for
    ("deployment/db", OPTIONS),  # the workload named directly: no port asked for
])
def test_a_replace_of_an_agent_in_front_of_several_ports_keeps_them_all_and_leaving_gives_the_pod_back(
        tmp_path, service, options) -> None:
    from tests.kubeapi import KubeAPI
    from tests.test_kube_apply import Cluster, two_port_app

    with KubeAPI() as server:
        server.load(two_port_app())
        cluster = Cluster(server, server.kubeconfig(tmp_path / "kubeconfig"))
        cluster.ensure("db", dataclasses.replace(OPTIONS, service_ports=("http", "grpc")))
        injected = cluster.snapshot()
        info = cluster.ensure(service, options, replace_by="alice")
        workload = cluster.get("Deployment", "db")
        assert inject.replaced_by(workload) == "alice"
        assert inject.served_ports(workload) == [8080, 9090], "no listener dropped"
        assert info.app_ports == ((9090,) if service == "db" else ())
        assert cluster.snapshot()[("Service", "db")] == injected[("Service", "db")]
        assert put_back(cluster.api, NS, service, "alice", cluster.progress.append) is True
        assert cluster.snapshot() == injected
