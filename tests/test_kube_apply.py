"""The cluster path: ensure_agent, uninstall and list against the stand-in API server.

What a real API server does (defaulting, admission, RBAC, real 409s, rollouts by the
real controllers, exact restore of what the server returns) is tested against the real
control plane in ``tests/test_cluster_*.py``; the tests here are kept where the stand-in
produces a fault or an observation on demand that a real server cannot (each says which,
beside it): conflicts every time, a write between two of ours, the order and number of
the requests the client sent.

The real ``kubernetes`` client runs (kubeconfig, ApiClient, urllib3) against
``tests/kubeapi.py``, which keeps the objects, checks resourceVersions, and simulates
the controllers and the kubelet one step per look at a workload: rollouts move, pods
get IPs and readiness, unpullable images fail with the kubelet's events. Nothing here
sleeps or times anything.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from intercept.credentials import Credentials
from intercept.errors import AgentSettingsDiffer, CredentialsError, InjectError, ResolveError
from intercept.kube import inject
from intercept.kube.apply import (
    CONFLICT_RETRIES,
    AgentInfo,
    RolloutFailed,
    agent_credentials,
    ensure_agent,
    list_services,
    uninstall,
)
from intercept.kube.config import connect
from intercept.kube.inject import AGENT_CONTAINER, ANNOTATION, InjectOptions
from intercept.kube.pods import agent_pods
from tests.kubeapi import KubeAPI, as_user_sees_it, boutique

IMAGE = "registry.example/intercept-agent:0.1.0"
OPTIONS = InjectOptions(image=IMAGE)
NS = "default"


class Cluster:
    """The stand-in server, loaded with the Online Boutique, and a client connected through a kubeconfig."""

    def __init__(self, server: KubeAPI, kubeconfig: Path) -> None:
        self.server = server
        self.kubeconfig = kubeconfig
        self.api = connect(kubeconfig).api
        self.progress: list[str] = []

    def ensure(self, service: str, options: InjectOptions = OPTIONS, **kwargs) -> AgentInfo:
        return ensure_agent(self.api, NS, service, options, self.progress.append, poll_interval=0, **kwargs)

    def uninstall(self, service: str | None = None, **kwargs):
        return uninstall(self.api, NS, service, progress=self.progress.append, poll_interval=0, **kwargs)

    def get(self, kind: str, name: str, namespace: str = NS) -> dict | None:
        return self.server.get(kind, namespace, name)

    def snapshot(self, namespace: str = NS) -> dict[tuple[str, str], dict]:
        """Every object a user owns in the namespace, as they see it."""
        return {(kind, o["metadata"]["name"]): as_user_sees_it(o)
                for kind in ("Service", "Deployment", "StatefulSet", "NetworkPolicy", "Secret")
                for o in self.server.objects(kind, namespace)}

    def pods(self, selector: str) -> list:
        return agent_pods(self.api, NS, selector)


def with_replicas(objects: list[dict], name: str, replicas: int) -> list[dict]:
    for o in objects:
        if o["kind"] == "Deployment" and o["metadata"]["name"] == name:
            o["spec"]["replicas"] = replicas
    return objects


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with KubeAPI() as server:
        server.load(with_replicas(boutique(), "cartservice", 2))
        yield Cluster(server, server.kubeconfig(tmp_path / "kubeconfig"))


def agent_of(workload: dict) -> dict | None:
    return next((c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == AGENT_CONTAINER), None)


def secret_credentials(secret: dict) -> Credentials:
    data = json.loads(base64.b64decode(secret["data"]["credentials.json"]))
    return Credentials(data["token"], data["host_public_key"], data.get("host_private_key"))


def admitted_ports(policy: dict) -> set:
    return {p.get("port") for rule in policy["spec"].get("ingress", []) for p in rule.get("ports", [])}


# --------------------------------------------------------------------------- ensure_agent


# stand-in: compares what was written with the pure transform, field for field (a real server adds its defaults).
def test_ensure_agent_injects_the_deployment_behind_the_service(cluster: Cluster) -> None:
    before = boutique()
    info = cluster.ensure("cartservice")

    deployment = cluster.get("Deployment", "cartservice")
    agent = agent_of(deployment)
    assert agent is not None and agent["image"] == IMAGE
    # The cluster got exactly what the pure transform computes from the manifests.
    expected = inject.inject(before, "cartservice", OPTIONS)
    expected_deployment = next(o for o in expected if o["kind"] == "Deployment" and o["metadata"]["name"] == "cartservice")
    assert deployment["spec"]["template"] == expected_deployment["spec"]["template"]
    service = cluster.get("Service", "cartservice")
    assert service["spec"]["ports"][0]["targetPort"] == info.http_port == 9900
    assert 9900 in admitted_ports(cluster.get("NetworkPolicy", "cartservice"))

    assert (info.workload_kind, info.workload_name, info.namespace, info.service) == ("Deployment", "cartservice", NS, "cartservice")
    assert info.selector == "app=cartservice"
    assert (info.http_port, info.ssh_port) == (9900, 9922)
    assert info.agent_version == "0.1.0" and info.image == IMAGE


# stand-in: reads the Secret's private key as stored, without a pod in between.
def test_the_secret_holds_the_credentials_and_is_owned_by_the_workload(cluster: Cluster) -> None:
    info = cluster.ensure("cartservice")
    secret = cluster.get("Secret", "intercept-cartservice")
    deployment = cluster.get("Deployment", "cartservice")
    stored = secret_credentials(secret)
    assert stored.host_private_key, "the agent needs its private host key"
    assert (info.credentials.token, info.credentials.host_public_key) == (stored.token, stored.host_public_key)
    assert info.credentials.host_private_key is None, "the client gets no private key"
    [owner] = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Deployment", "cartservice", deployment["metadata"]["uid"])
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "intercept"
    assert agent_credentials(cluster.api, NS, "cartservice") == info.credentials


# stand-in: a rollout of the Online Boutique in one step per look, no processes.
def test_after_ensure_agent_every_replica_runs_a_ready_agent(cluster: Cluster) -> None:
    info = cluster.ensure("cartservice")
    pods = cluster.pods(info.selector)
    assert len(pods) == 2
    assert all(p.ready and p.ip and p.ssh_port == info.ssh_port for p in pods)


# stand-in: the order of the client's requests, which a real server does not record.
def test_writes_happen_in_the_order_that_keeps_traffic_flowing(cluster: Cluster) -> None:
    cluster.ensure("cartservice")
    writes = [(m, p.rsplit("/", 2)[-2] if m == "PUT" else p.rsplit("/", 1)[-1]) for m, p in cluster.server.writes()]
    assert writes == [
        ("PUT", "networkpolicies"),  # the agent's port is admitted before any pod serves on it
        ("POST", "secrets"),  # the credentials exist before the pods mount them
        ("PUT", "deployments"),
        ("PUT", "services"),  # the Service moves to the agent's port last
    ]
    requests = cluster.server.requests
    service_put = next(i for i, (m, p, _) in enumerate(requests) if m == "PUT" and "/services/" in p)
    assert cluster.progress.index('deployment "cartservice" successfully rolled out') >= 0
    # The rollout was observed complete before the Service was pointed at the agent.
    last_look = max(i for i, (m, p, _) in enumerate(requests[:service_put]) if m == "GET" and p.endswith("/deployments/cartservice"))
    assert last_look < service_put


# stand-in: a 409 on every one of CONFLICT_RETRIES writes in a row, on demand.
def test_endless_conflicts_fail_clearly_and_put_the_policy_back(cluster: Cluster) -> None:
    before = cluster.snapshot()
    cluster.server.interfere(times=CONFLICT_RETRIES, kind="Deployment", name="cartservice")
    with pytest.raises(RolloutFailed) as failure:
        cluster.ensure("cartservice")
    message = str(failure.value)
    assert "kept changing" in message and "NetworkPolicy/cartservice" in message
    assert "nothing was left half-injected" in message
    after = cluster.snapshot()
    assert after[("NetworkPolicy", "cartservice")] == before[("NetworkPolicy", "cartservice")]
    assert ("Secret", "intercept-cartservice") not in after
    assert agent_of(cluster.get("Deployment", "cartservice")) is None


# stand-in: every intermediate rollout state, one per look (a real controller skips some).
def test_the_rollout_is_awaited_with_kubectls_progress_lines(cluster: Cluster) -> None:
    cluster.ensure("cartservice")
    expected = [
        'Waiting for deployment "cartservice" rollout to finish: 0 out of 2 new replicas have been updated...',
        'Waiting for deployment "cartservice" rollout to finish: 1 out of 2 new replicas have been updated...',
        'Waiting for deployment "cartservice" rollout to finish: 1 old replicas are pending termination...',
        'deployment "cartservice" successfully rolled out',
    ]
    shown = [line for line in cluster.progress if "deployment" in line]
    assert shown == expected
    assert cluster.progress[0].startswith("Service/cartservice in namespace default: now targets the agent")
    assert cluster.progress[-1] == "Deployment/cartservice: agent 0.1.0 ready"


# stand-in: another writer's change exactly between our write and our rollback, on demand.
def test_a_rollback_keeps_what_another_writer_changed_meanwhile(cluster: Cluster) -> None:
    before = cluster.get("Deployment", "cartservice")

    def autoscale(deployment: dict) -> None:
        deployment["spec"]["replicas"] = 3

    cluster.server.interfere(kind="Deployment", name="cartservice", mutate=autoscale)
    cluster.server.controller.unpullable.add(IMAGE)
    with pytest.raises(RolloutFailed):
        cluster.ensure("cartservice")
    after = cluster.get("Deployment", "cartservice")
    assert after["spec"]["replicas"] == 3
    assert after["spec"]["template"] == before["spec"]["template"]
    assert ANNOTATION not in after["metadata"]["annotations"]


# stand-in: counts the client's writes.
def test_a_second_ensure_agent_writes_nothing(cluster: Cluster) -> None:
    first = cluster.ensure("cartservice")
    writes = len(cluster.server.writes())
    second = cluster.ensure("cartservice")
    assert len(cluster.server.writes()) == writes
    assert second == first


# stand-in: counts the client's writes (the Secret is reused).
def test_a_start_of_another_version_uses_the_running_agent_and_writes_nothing(cluster: Cluster) -> None:
    first = cluster.ensure("cartservice")
    writes = len(cluster.server.writes())
    newer = InjectOptions(image="registry.example/intercept-agent:0.2.0", agent_version="0.2.0")
    second = cluster.ensure("cartservice", newer)  # the image not named by the user: the running agent's
    assert agent_of(cluster.get("Deployment", "cartservice"))["image"] == OPTIONS.image
    assert (second.image, second.credentials) == (OPTIONS.image, first.credentials)
    assert len(cluster.server.writes()) == writes
    with pytest.raises(AgentSettingsDiffer) as refused:  # named: refused, naming both images
        cluster.ensure("cartservice", newer, named={"image"})
    assert f"--agent-image: the agent has {OPTIONS.image}, not {newer.image}" in str(refused.value)
    assert len(cluster.server.writes()) == writes


def test_an_agent_of_another_version_is_upgraded_in_place_with_the_same_credentials_when_asked(cluster: Cluster) -> None:
    first = cluster.ensure("cartservice")
    newer = InjectOptions(image="registry.example/intercept-agent:0.2.0", agent_version="0.2.0")
    second = cluster.ensure("cartservice", newer, named={"image"}, reinject=True)
    assert agent_of(cluster.get("Deployment", "cartservice"))["image"] == newer.image
    assert second.credentials == first.credentials
    assert second.agent_version == "0.2.0"
    assert not any(m == "POST" for m, _ in cluster.server.writes()[4:]), "the Secret was reused"


# stand-in: an upgrade whose image fails, without a first rollout to wait for.
def test_a_failed_upgrade_goes_back_to_the_previous_agent_not_to_none(cluster: Cluster) -> None:
    cluster.ensure("cartservice")
    injected = cluster.snapshot()
    newer = InjectOptions(image="registry.example/intercept-agent:0.2.0", agent_version="0.2.0")
    cluster.server.controller.unpullable.add(newer.image)
    with pytest.raises(RolloutFailed):
        cluster.ensure("cartservice", newer, named={"image"}, reinject=True)
    assert cluster.snapshot() == injected


# stand-in: no server behaviour involved: the refusal is ours; kept fast.
def test_a_foreign_secret_of_the_same_name_is_refused(cluster: Cluster) -> None:
    cluster.server.put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "intercept-cartservice", "namespace": NS},
                        "data": {"x": "eQ=="}})
    before = cluster.snapshot()
    with pytest.raises(InjectError) as raised:
        cluster.ensure("cartservice")
    assert "was not created by intercept" in str(raised.value)
    assert cluster.snapshot() == before


# stand-in: asserts that no write was sent at all.
def test_a_missing_service_names_the_services_of_the_namespace(cluster: Cluster) -> None:
    with pytest.raises(ResolveError) as raised:
        cluster.ensure("cart")
    assert raised.value.exit_code == 9
    assert "no Service named 'cart' in namespace default" in str(raised.value)
    assert "cartservice, checkoutservice" in str(raised.value)
    assert cluster.server.writes() == []


# stand-in: no server behaviour involved; kept fast.
def test_agent_credentials_of_a_workload_without_agent_say_how_to_get_one(cluster: Cluster) -> None:
    with pytest.raises(CredentialsError) as raised:
        agent_credentials(cluster.api, NS, "cartservice")
    assert "intercept start" in str(raised.value)


# --------------------------------------------------------------------------- other workload kinds


def small_app(kind: str, strategy: str | None = None) -> list[dict]:
    labels = {"app": "db"}
    workload = {
        "apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "db"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "db", "image": "example/db:1",
                                                       "ports": [{"name": "http", "containerPort": 8080}]}]}}},
    }
    if strategy:
        workload["spec"]["updateStrategy"] = {"type": strategy}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
               "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]}}
    return [service, workload]


# stand-in: counts the pod deletions intercept sends for OnDelete and bare ReplicaSets.
@pytest.mark.parametrize("kind, strategy, deleted", [
    ("StatefulSet", "RollingUpdate", 0),  # the controller replaces the pods
    ("StatefulSet", "OnDelete", 2),  # intercept replaces them, one at a time
    ("ReplicaSet", None, 2),
])
def test_statefulsets_and_replicasets_get_the_agent_on_every_pod_and_lose_it_again(
    tmp_path: Path, kind: str, strategy: str | None, deleted: int
) -> None:
    with KubeAPI() as server:
        server.load(small_app(kind, strategy))
        cluster = Cluster(server, server.kubeconfig(tmp_path / "kubeconfig"))
        before = cluster.snapshot()
        info = cluster.ensure("db")
        assert info.workload_kind == kind
        pods = cluster.pods(info.selector)
        assert len(pods) == 2 and all(p.ready for p in pods)
        assert sum(m == "DELETE" and "/pods/" in p for m, p in server.writes()) == deleted

        cluster.uninstall("db")
        assert cluster.snapshot() == before
        assert cluster.pods(info.selector) == []
        assert len(server.objects("Pod", NS)) == 2


# --------------------------------------------------------------------------- uninstall


# stand-in: an autoscaler's write between inject and uninstall, without waiting for its rollout.
def test_uninstall_keeps_what_others_changed_meanwhile(cluster: Cluster) -> None:
    cluster.ensure("cartservice")
    scaled = cluster.get("Deployment", "cartservice")
    scaled["spec"]["replicas"] = 3  # an autoscaler at work
    cluster.server.put(scaled)
    cluster.uninstall("cartservice")
    deployment = cluster.get("Deployment", "cartservice")
    assert deployment["spec"]["replicas"] == 3
    assert agent_of(deployment) is None and ANNOTATION not in deployment["metadata"].get("annotations", {})


# stand-in: counts the client's writes.
def test_uninstall_without_an_agent_changes_nothing(cluster: Cluster) -> None:
    cluster.ensure("cartservice")
    cluster.uninstall("cartservice")
    writes = len(cluster.server.writes())
    result = cluster.uninstall("cartservice")
    assert not result.changed
    assert len(cluster.server.writes()) == writes


# stand-in: no server behaviour involved; kept fast.
def test_uninstall_needs_a_service_or_all(cluster: Cluster) -> None:
    with pytest.raises(InjectError):
        cluster.uninstall()
    with pytest.raises(InjectError):
        cluster.uninstall("cartservice", all=True)


# --------------------------------------------------------------------------- list


# stand-in: the whole Online Boutique plus an ExternalName Service, listed without running 12 rollouts.
def test_list_says_which_services_can_be_intercepted_and_which_have_an_agent(cluster: Cluster) -> None:
    cluster.server.load([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "payments-gateway"},
         "spec": {"type": "ExternalName", "externalName": "pay.example.com"}},
    ])
    cluster.ensure("cartservice")
    rows = {r["service"]: r for r in list_services(cluster.api, NS)}

    cart = rows["cartservice"]
    assert cart["interceptable"] and cart["agent"] and cart["agentVersion"] == "0.1.0"
    assert cart["workload"] == "Deployment/cartservice"
    assert cart["ports"] == [{"port": 7070, "name": "grpc", "targetPort": 7070, "container": "server", "containerPort": 7070}]
    assert cart["routes"] is None
    assert rows["adservice"]["interceptable"] and not rows["adservice"]["agent"]
    gateway = rows["payments-gateway"]
    assert not gateway["interceptable"] and "ExternalName" in gateway["reason"]
    assert len(rows) == 13


# stand-in: the routes hook called without agents to ask.
def test_list_of_all_namespaces_and_the_routes_hook(cluster: Cluster) -> None:
    cluster.server.load(small_app("Deployment"), namespace="db")
    ensure_agent(cluster.api, "db", "db", OPTIONS, poll_interval=0)
    asked: list[AgentInfo] = []

    def routes(info: AgentInfo) -> list[dict]:
        asked.append(info)
        return [{"name": "alice", "rules": ["x-dev: alice"]}]

    rows = list_services(cluster.api, None, routes=routes)
    assert {r["namespace"] for r in rows} == {"default", "db"}
    db = next(r for r in rows if r["namespace"] == "db")
    assert db["routes"] == [{"name": "alice", "rules": ["x-dev: alice"]}]
    assert [(i.namespace, i.workload, i.ssh_port) for i in asked] == [("db", "Deployment/db", 9922)]
    assert asked[0].credentials.token
    assert all(r["routes"] is None for r in rows if r["namespace"] == "default")


# stand-in: no server behaviour beyond owner references; kept fast.
def test_list_ignores_the_replicasets_of_deployments(cluster: Cluster) -> None:
    assert cluster.server.objects("ReplicaSet", NS), "the stand-in's Deployments own ReplicaSets"
    rows = list_services(cluster.api, NS)
    assert all(r["interceptable"] for r in rows), [r["reason"] for r in rows if not r["interceptable"]]



# --------------------------------------------------------------------------- several ports

def two_port_app() -> list[dict]:
    """db: http (named targetPort) on 8080 and grpc (numeric) on 9090 of one container."""
    labels = {"app": "db"}
    workload = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "db"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "db", "image": "example/db:1",
                                                       "ports": [{"name": "http", "containerPort": 8080},
                                                                 {"name": "grpc", "containerPort": 9090}]}]}}},
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
               "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                                      {"name": "grpc", "port": 9090, "targetPort": 9090}]}}
    return [service, workload]


# stand-in: what was written, read back, and the refusal before any write.
def test_a_start_for_more_ports_is_refused_and_with_reinject_the_agent_fronts_them_all(tmp_path: Path) -> None:
    with KubeAPI() as server:
        server.load(two_port_app())
        cluster = Cluster(server, server.kubeconfig(tmp_path / "kubeconfig"))
        before = cluster.snapshot()
        first = cluster.ensure("db", InjectOptions(image=IMAGE, service_port="grpc"))
        assert first.app_ports == (9090,)
        assert inject.served_ports(cluster.get("Deployment", "db")) == [9090]

        both = InjectOptions(image=IMAGE, service_ports=("http", "grpc"))
        writes = len(server.writes())
        with pytest.raises(InjectError, match=r"already has an agent for container 'db' port 9090, and Service 'db' "
                                              r"port 80 targets container 'db' port 8080; .* --reinject"):
            cluster.ensure("db", both)
        assert len(server.writes()) == writes

        info = cluster.ensure("db", InjectOptions(image=IMAGE, service_port="http"), reinject=True)
        assert info.app_ports == (8080,)
        assert inject.served_ports(cluster.get("Deployment", "db")) == [9090, 8080], "the port it served is kept"
        assert cluster.ensure("db", both).app_ports == (8080, 9090)  # now in front of both: nothing to write
        cluster.uninstall("db")
        assert cluster.snapshot() == before
