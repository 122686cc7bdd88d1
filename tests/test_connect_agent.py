"""intercept connect's own agent: what it is made of, when it may be reused, and its life.

The decisions are pure (:func:`connect_agent.deployment`, :func:`connect_agent.differences`)
and tested alone; ``ensure`` and ``remove`` run against the stand-in API server
(``tests/kubeapi.py``) where it produces on demand what a real one cannot: a Deployment
planted between two requests, a delete racing a change (its preconditions). The real
node runs it in ``tests/test_cluster_access.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest

from intercept import agentconfig
from intercept.errors import AgentSettingsDiffer
from intercept.kube import connect_agent
from intercept.kube.config import connect
from intercept.kube.connect_agent import ConnectAgentDiffers, deployment, differences
from intercept.kube.inject import InjectOptions
from intercept.kube.rest import Cluster, Conflict
from tests.kubeapi import KubeAPI

IMAGE = "registry.example/intercept-agent:0.1.0"
NS = "default"


def as_served(obj: dict) -> dict:
    """``obj`` as a real API server returns it: its defaults added, nothing written changed."""
    served = copy.deepcopy(obj)
    served["metadata"] |= {"uid": "u-1", "resourceVersion": "7", "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"}
    spec = served["spec"]
    spec |= {"revisionHistoryLimit": 10, "progressDeadlineSeconds": 600,
             "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}}
    pod = spec["template"]["spec"]
    pod |= {"restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "securityContext": {}, "schedulerName": "default-scheduler"}
    for c in pod["containers"]:
        c |= {"terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}
        c["readinessProbe"] |= {"timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3}
    served["status"] = {"replicas": 1, "readyReplicas": 1}
    return served


def env_of(obj: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in obj["spec"]["template"]["spec"]["containers"][0]["env"]}


# --- what it is ------------------------------------------------------------------------------


def test_the_connect_agent_has_no_pod_fence_whatever_its_creator_asked() -> None:
    # the first connect's --outbound-deny '*' would otherwise block every connect after it
    created = deployment(NS, InjectOptions(image=IMAGE, outbound_allow=("db:5432",), outbound_deny=("*",)))
    config = agentconfig.from_env(env_of(created), ("pod",))
    assert config.get("outbound_allow", ()) == () and config.get("outbound_deny", ()) == ()
    assert config["allow_outbound"] is True
    assert created == deployment(NS, InjectOptions(image=IMAGE))  # the fence leaves no trace at all


def test_the_deployment_records_its_image_version_and_template() -> None:
    created = deployment(NS, InjectOptions(image=IMAGE, agent_version="9.9"))
    annotations = created["metadata"]["annotations"]
    assert annotations[connect_agent.IMAGE_ANNOTATION] == IMAGE
    assert annotations[connect_agent.VERSION_ANNOTATION] == "9.9"
    assert annotations[connect_agent.TEMPLATE_ANNOTATION] == connect_agent.template_hash(created["spec"]["template"])


# --- when it may be reused (pure) -------------------------------------------------------------


def test_the_agent_as_created_and_served_back_is_reused() -> None:
    wanted = deployment(NS, InjectOptions(image=IMAGE))
    assert differences(as_served(wanted), wanted) == ()


def test_an_agent_of_another_image_is_not_reused() -> None:
    running = as_served(deployment(NS, InjectOptions(image="other.example/agent:1")))
    wanted = deployment(NS, InjectOptions(image=IMAGE))
    assert ("image", "other.example/agent:1", IMAGE) in differences(running, wanted)


def test_an_agent_whose_image_was_changed_after_creation_is_not_reused() -> None:
    wanted = deployment(NS, InjectOptions(image=IMAGE))
    running = as_served(wanted)
    running["spec"]["template"]["spec"]["containers"][0]["image"] = "evil.example/agent:1"  # the annotation still says IMAGE
    assert [d[0] for d in differences(running, wanted)] == ["image", "pod template"]


def test_an_agent_of_another_version_is_not_reused() -> None:
    running = as_served(deployment(NS, InjectOptions(image=IMAGE, agent_version="0.0.1")))
    wanted = deployment(NS, InjectOptions(image=IMAGE, agent_version="0.0.2"))
    assert ("agent version", "0.0.1", "0.0.2") in differences(running, wanted)


def test_a_planted_deployment_with_intercepts_label_is_not_trusted() -> None:
    # anyone who may create Deployments may set the label: a name and a label are no proof
    wanted = deployment(NS, InjectOptions(image=IMAGE))
    planted = as_served(wanted)
    planted["metadata"]["annotations"] = {}
    found = dict((what, has) for what, has, _ in differences(planted, wanted))
    assert found["recorded image"] == "none" and found["agent version"] == "none" and "pod template" in found


@pytest.mark.parametrize("change", [
    lambda c, pod: c.__setitem__("args", ["--credentials", "/tmp/mine.json"]),
    lambda c, pod: c["env"].append({"name": "INTERCEPT_OUTBOUND_DENY", "value": "*"}),
    lambda c, pod: c.__setitem__("command", ["sh", "-c", "steal"]),
    lambda c, pod: pod.__setitem__("initContainers", [{"name": "x", "image": "evil.example/x"}]),
    lambda c, pod: pod["volumes"][0]["secret"].__setitem__("secretName", "someone-elses"),
], ids=["args", "env", "command", "init container", "secret"])
def test_a_template_changed_since_creation_is_not_reused(change) -> None:
    wanted = deployment(NS, InjectOptions(image=IMAGE))
    running = as_served(wanted)
    pod = running["spec"]["template"]["spec"]
    change(pod["containers"][0], pod)
    assert differences(running, wanted) == (("pod template", "changed since it was created", "as intercept created it"),)


def test_an_agent_created_with_a_pod_fence_is_not_reused() -> None:
    # what an intercept before this fix made: the first connect's fence set for everyone
    wanted = deployment(NS, InjectOptions(image=IMAGE))
    old = copy.deepcopy(wanted)
    old["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "INTERCEPT_OUTBOUND_DENY", "value": "*"})
    old["metadata"]["annotations"] = {connect_agent.VERSION_ANNOTATION: wanted["metadata"]["annotations"][
        connect_agent.VERSION_ANNOTATION]}
    assert [d[0] for d in differences(as_served(old), wanted)] == ["recorded image", "pod template"]


# --- ensure and remove, on the stand-in -----------------------------------------------------------


class Stand:
    def __init__(self, server: KubeAPI, kubeconfig: Path) -> None:
        self.server = server
        self.api = connect(kubeconfig).api
        self.progress: list[str] = []

    def ensure(self, options: InjectOptions = InjectOptions(image=IMAGE), **kwargs):
        return connect_agent.ensure(self.api, NS, options, self.progress.append, poll_interval=0, **kwargs)


@pytest.fixture
def stand(tmp_path: Path) -> Iterator[Stand]:
    with KubeAPI() as server:
        yield Stand(server, server.kubeconfig(tmp_path / "kubeconfig"))


def test_ensure_creates_the_agent_and_a_later_one_reuses_it(stand: Stand) -> None:
    first = stand.ensure()
    uid = stand.server.get("Deployment", NS, connect_agent.NAME)["metadata"]["uid"]
    again = stand.ensure()
    assert again.credentials == first.credentials
    assert stand.server.get("Deployment", NS, connect_agent.NAME)["metadata"]["uid"] == uid


def test_ensure_refuses_a_planted_deployment_and_writes_nothing(stand: Stand) -> None:
    planted = deployment(NS, InjectOptions(image="evil.example/agent:1"))
    planted["metadata"]["annotations"] = {}
    stand.server.load([planted])
    before = len(stand.server.writes())
    with pytest.raises(ConnectAgentDiffers) as refused:
        stand.ensure()
    assert isinstance(refused.value, AgentSettingsDiffer) and refused.value.exit_code == 13
    message = str(refused.value)
    assert "image: it has evil.example/agent:1, not " + IMAGE in message
    assert f"intercept uninstall intercept-connect -n {NS}" in message
    assert stand.server.writes()[before:] == []  # no Secret made for it: its host key is never trusted
    assert stand.server.get("Secret", NS, "intercept-intercept-connect") is None


def test_ensure_refuses_the_agent_of_another_image(stand: Stand) -> None:
    stand.ensure(InjectOptions(image="other.example/agent:1"))
    with pytest.raises(ConnectAgentDiffers, match="image: it has other.example/agent:1, not " + IMAGE):
        stand.ensure()


def test_remove_with_a_resource_version_keeps_an_agent_changed_since(stand: Stand) -> None:
    stand.ensure()
    read = stand.server.get("Deployment", NS, connect_agent.NAME)
    changed = copy.deepcopy(read)
    changed["metadata"]["labels"]["touched"] = "yes"
    stand.server.put(changed)
    with pytest.raises(Conflict):
        connect_agent.remove(stand.api, NS, resource_version=read["metadata"]["resourceVersion"])
    assert stand.server.get("Deployment", NS, connect_agent.NAME) is not None
    assert Cluster(stand.api).get("Secret", NS, "intercept-intercept-connect")


# --- intercept gc: idle, asked again just before the delete, which carries a precondition -----------


def gc(stand: Stand, idle_of, idle: float = 60.0):
    from intercept.kube import sandboxes

    return sandboxes.gc(stand.api, NS, idle=idle, idle_of=idle_of, progress=stand.progress.append)


def test_gc_removes_the_connect_agent_idle_at_both_questions(stand: Stand) -> None:
    stand.ensure()
    assert gc(stand, lambda info: 3600.0).agents == (f"{NS}/{connect_agent.NAME}",)
    assert stand.server.get("Deployment", NS, connect_agent.NAME) is None


def test_gc_keeps_the_connect_agent_when_a_connect_logs_in_before_the_delete(stand: Stand) -> None:
    stand.ensure()
    answers = [3600.0, 0.0]  # idle at the first question; a connect logged in before the second
    assert gc(stand, lambda info: answers.pop(0)).agents == ()
    assert answers == []
    assert stand.server.get("Deployment", NS, connect_agent.NAME) is not None
    assert any("kept: a session reached the cluster through it while gc asked" in line for line in stand.progress)


def test_gc_keeps_the_connect_agent_that_changed_since_it_was_read(stand: Stand) -> None:
    stand.ensure()

    def idle_of(info) -> float:  # meanwhile, the Deployment changes (a connect recreated it, its pod restarted)
        current = stand.server.get("Deployment", NS, connect_agent.NAME)
        current["metadata"]["labels"]["changed"] = str(len(stand.progress))
        stand.server.put(current)
        return 3600.0

    assert gc(stand, idle_of).agents == ()
    assert stand.server.get("Deployment", NS, connect_agent.NAME) is not None
    assert any("kept: it changed since gc read it" in line for line in stand.progress)


def _never_ready(stand: Stand, since: str) -> None:
    """The connect agent's Deployment, its pod never ready since ``since`` (unpullable, say)."""
    stand.server.controller.unpullable.add("registry.example/unpullable:1")
    created = deployment(NS, InjectOptions(image="registry.example/unpullable:1"))
    stand.server.load([created])  # its pod waits in ImagePullBackOff
    stored = stand.server.get("Deployment", NS, connect_agent.NAME)
    stored["status"]["conditions"] = [
        {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable", "lastTransitionTime": since}]
    stand.server.put(stored)
    assert stand.server.get("Deployment", NS, connect_agent.NAME)["status"]["readyReplicas"] == 0


def test_gc_removes_a_connect_agent_that_has_had_no_ready_pod_for_longer_than_idle(stand: Stand) -> None:
    _never_ready(stand, "2020-01-01T00:00:00Z")
    asked = []
    assert gc(stand, asked.append).agents == (f"{NS}/{connect_agent.NAME}",)
    assert asked == []  # nothing to ask: no pod answers
    assert stand.server.get("Deployment", NS, connect_agent.NAME) is None


def test_gc_keeps_a_connect_agent_not_ready_for_less_than_idle(stand: Stand) -> None:
    from datetime import datetime, timezone

    _never_ready(stand, datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert gc(stand, lambda info: None, idle=86400.0).agents == ()
    assert stand.server.get("Deployment", NS, connect_agent.NAME) is not None


def test_unready_for_counts_from_available_turning_false_else_from_creation() -> None:
    workload = {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {"readyReplicas": 0}}
    start = 1767225600.0  # 2026-01-01T00:00:00Z
    assert connect_agent.unready_for(workload, start + 90) == 90.0
    workload["status"]["conditions"] = [{"type": "Available", "status": "False", "lastTransitionTime": "2026-01-01T00:01:00Z"}]
    assert connect_agent.unready_for(workload, start + 90) == 30.0
    workload["status"]["readyReplicas"] = 1
    assert connect_agent.unready_for(workload, start + 90) is None


# --- two connects at once: the create's conflict, and a failed rollout of an agent someone uses ------------


class _Racing(Cluster):
    """The stand-in's client, whose creates of the connect agent meet another connect's first ``times``."""

    before: list = []

    def create(self, obj, **kwargs):
        if obj["kind"] == "Deployment" and self.before:
            self.before.pop(0)()
            raise Conflict("create deployments/intercept-connect: conflict (already exists)", 409, "AlreadyExists")
        return super().create(obj, **kwargs)


def test_a_create_conflict_with_an_agent_gone_again_creates_it(stand: Stand, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connect_agent, "Cluster", _Racing)
    monkeypatch.setattr(_Racing, "before", [lambda: None])  # created by another connect, and removed again (gc)
    info = stand.ensure()
    assert info.image == IMAGE and stand.server.get("Deployment", NS, connect_agent.NAME) is not None


def test_a_create_conflict_reuses_the_agent_another_connect_created(stand: Stand, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connect_agent, "Cluster", _Racing)
    monkeypatch.setattr(_Racing, "before", [lambda: stand.server.load([deployment(NS, InjectOptions(image=IMAGE))])])
    stand.ensure()
    assert not any("starting intercept connect's own" in line for line in stand.progress[1:])  # one attempt only


def test_an_agent_that_keeps_appearing_and_disappearing_is_a_typed_error(stand: Stand,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from intercept.errors import InjectError

    monkeypatch.setattr(connect_agent, "Cluster", _Racing)
    monkeypatch.setattr(_Racing, "before", [lambda: None] * 10)
    with pytest.raises(InjectError, match="kept appearing and disappearing.*run the command again"):
        stand.ensure()


def test_a_failed_rollout_keeps_an_agent_that_became_ready_for_another_connect(stand: Stand) -> None:
    stand.ensure()  # ready: another connect may be using it
    uid = stand.server.get("Deployment", NS, connect_agent.NAME)["metadata"]["uid"]
    assert connect_agent._remove_unless_ready(stand.api, NS, uid, stand.progress.append) is None
    assert stand.server.get("Deployment", NS, connect_agent.NAME) is not None
    assert connect_agent._remove_unless_ready(stand.api, NS, "another-uid", stand.progress.append).deleted == ()
    assert stand.server.get("Deployment", NS, connect_agent.NAME) is not None


def test_a_failed_rollout_removes_what_it_created(stand: Stand) -> None:
    from intercept.kube.apply import RolloutFailed

    stand.server.controller.unpullable.add("registry.example/unpullable:1")
    with pytest.raises(RolloutFailed, match=r"Deployment/intercept-connect \(deleted\)"):
        stand.ensure(InjectOptions(image="registry.example/unpullable:1"))
    assert stand.server.get("Deployment", NS, connect_agent.NAME) is None
    assert stand.server.get("Secret", NS, "intercept-intercept-connect") is None
