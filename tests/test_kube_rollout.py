"""Rollout decisions, alone: kubectl's progress lines, early failures, replacing pods one by one."""

from __future__ import annotations

import pytest

from intercept.kube.rest import format_selector
from intercept.kube.rollout import rollout_status, runs_template

APP = {"name": "app", "image": "example/app:1"}
AGENT = {"name": "intercept-agent", "image": "example/agent:1"}


def template(*containers: dict) -> dict:
    return {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": list(containers)}}


def deployment(generation=2, observed=2, replicas=2, updated=2, total=2, available=2, **extra) -> dict:
    spec = {"replicas": replicas, "template": template(APP, AGENT), **extra.pop("spec", {})}
    return {"kind": "Deployment", "metadata": {"name": "web", "generation": generation}, "spec": spec,
            "status": {"observedGeneration": observed, "updatedReplicas": updated, "replicas": total,
                       "availableReplicas": available, **extra}}


def pod(name: str, *containers: dict, ready: bool = True, waiting: str | None = None, deleting: bool = False) -> dict:
    statuses = [{"name": c["name"], "ready": ready,
                 "state": {"waiting": {"reason": waiting, "message": "details"}} if waiting else {"running": {}}}
                for c in containers]
    metadata = {"name": name, **({"deletionTimestamp": "2025-01-01T00:00:00Z"} if deleting else {})}
    return {"metadata": metadata, "spec": {"containers": list(containers)},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "containerStatuses": statuses}}


@pytest.mark.parametrize("fields, message", [
    ({"generation": 3}, "Waiting for deployment spec update to be observed..."),
    ({"updated": 1}, 'Waiting for deployment "web" rollout to finish: 1 out of 2 new replicas have been updated...'),
    ({"total": 3}, 'Waiting for deployment "web" rollout to finish: 1 old replicas are pending termination...'),
    ({"available": 1}, 'Waiting for deployment "web" rollout to finish: 1 of 2 updated replicas are available...'),
    ({}, 'deployment "web" successfully rolled out'),
])
def test_deployment_progress_reads_as_kubectl_rollout_status(fields: dict, message: str) -> None:
    status = rollout_status(deployment(**fields), [])
    assert status.message == message
    assert status.done == (fields == {})
    assert status.failure is None


@pytest.mark.parametrize("reason", ["ImagePullBackOff", "ErrImagePull", "CrashLoopBackOff", "CreateContainerConfigError"])
def test_a_new_pod_that_cannot_start_fails_the_rollout_at_once_naming_it(reason: str) -> None:
    pods = [pod("web-new", APP, AGENT, ready=False, waiting=reason), pod("web-old", APP)]
    status = rollout_status(deployment(updated=1, total=3, available=2), pods)
    assert not status.done
    assert status.failure == f"pod web-new: container app is in {reason}: details"
    assert status.new_pods == ("web-new",)


@pytest.mark.parametrize("reason", ["ImagePullBackOff", "ErrImagePull", "InvalidImageName"])
def test_an_agent_image_that_cannot_be_pulled_is_named_as_the_cause(reason: str) -> None:
    agent_stuck = pod("web-new", APP, AGENT, ready=False)
    agent_stuck["status"]["containerStatuses"][1]["state"] = {"waiting": {"reason": reason, "message": "no such host"}}
    status = rollout_status(deployment(updated=1, total=3, available=2), [agent_stuck, pod("web-old", APP)])
    assert status.failure == f"pod web-new: container intercept-agent is in {reason}: no such host"
    assert status.unpulled == ("intercept-agent", "example/agent:1")


def test_a_crash_loop_is_not_taken_for_an_image_that_cannot_be_pulled() -> None:
    status = rollout_status(deployment(updated=1, total=3, available=2),
                            [pod("web-new", APP, AGENT, ready=False, waiting="CrashLoopBackOff")])
    assert status.failure and status.unpulled is None


def test_an_old_pod_that_cannot_start_is_not_the_rollouts_failure() -> None:
    status = rollout_status(deployment(updated=1, total=3), [pod("web-old", APP, ready=False, waiting="CrashLoopBackOff")])
    assert status.failure is None


def test_a_pod_still_pulling_its_image_is_only_waiting() -> None:
    status = rollout_status(deployment(updated=1, total=3), [pod("web-new", APP, AGENT, ready=False, waiting="ContainerCreating")])
    assert status.failure is None and not status.done


@pytest.mark.parametrize("condition, words", [
    ({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet has timed out"},
     "exceeded its progress deadline"),
    ({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
      "message": 'pods "web-1" is forbidden: violates PodSecurity "restricted:latest"'}, "violates PodSecurity"),
])
def test_deployment_conditions_that_end_a_rollout(condition: dict, words: str) -> None:
    status = rollout_status(deployment(updated=0, conditions=[condition]), [])
    assert words in (status.failure or "")


def test_a_paused_deployment_fails_with_the_command_that_resumes_it() -> None:
    status = rollout_status(deployment(updated=0, spec={"paused": True}), [])
    assert "kubectl rollout resume deployment/web" in (status.failure or "")


def test_sidecars_added_by_admission_do_not_make_a_pod_old() -> None:
    mesh = {"name": "istio-proxy", "image": "istio/proxyv2"}
    assert runs_template(pod("p", APP, AGENT, mesh), template(APP, AGENT))
    assert not runs_template(pod("p", APP), template(APP, AGENT))
    assert not runs_template(pod("p", APP, AGENT), template(APP)), "a pod with an agent is old after uninstall"
    assert not runs_template(pod("p", APP, dict(AGENT, image="example/agent:2")), template(APP, AGENT))


def statefulset(strategy: dict | None = None, **status) -> dict:
    spec = {"replicas": 3, "template": template(APP, AGENT)}
    if strategy:
        spec["updateStrategy"] = strategy
    return {"kind": "StatefulSet", "metadata": {"name": "db", "generation": 2}, "spec": spec,
            "status": {"observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 3,
                       "currentRevision": "db-2", "updateRevision": "db-2", "currentReplicas": 3, **status}}


@pytest.mark.parametrize("sts, message, done", [
    (statefulset(observedGeneration=1), "Waiting for statefulset spec update to be observed...", False),
    (statefulset(readyReplicas=2), "Waiting for 1 pods to be ready...", False),
    (statefulset(currentRevision="db-1", updatedReplicas=1),
     "waiting for statefulset rolling update to complete 1 pods at revision db-2...", False),
    (statefulset({"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}, updatedReplicas=0),
     "Waiting for partitioned roll out to finish: 0 out of 1 new pods have been updated...", False),
    (statefulset(), "statefulset rolling update complete 3 pods at revision db-2...", True),
])
def test_statefulset_progress_reads_as_kubectl_rollout_status(sts: dict, message: str, done: bool) -> None:
    status = rollout_status(sts, [])
    assert (status.message, status.done) == (message, done)


def test_on_delete_pods_are_replaced_highest_ordinal_first_and_only_when_all_are_ready() -> None:
    sts = statefulset({"type": "OnDelete"})
    old = [pod(f"db-{i}", APP) for i in (0, 1, 2)]
    assert rollout_status(sts, old).replace_pod == "db-2"
    mixed = [old[0], pod("db-1", APP, ready=False), pod("db-2", APP, AGENT)]
    status = rollout_status(sts, mixed)
    assert status.replace_pod is None and not status.done
    sts["spec"]["replicas"] = 11
    pods = [pod(f"db-{i}", APP, AGENT) for i in range(9)] + [pod("db-9", APP), pod("db-10", APP)]
    assert rollout_status(sts, pods).replace_pod == "db-10", "by ordinal, not by name"
    sts["spec"]["replicas"] = 4
    assert rollout_status(sts, [pod(f"db-{i}", APP, AGENT) for i in range(4)]).done


def test_a_bare_replicaset_gets_one_pod_replaced_at_a_time() -> None:
    rs = {"kind": "ReplicaSet", "metadata": {"name": "web", "generation": 2},
          "spec": {"replicas": 2, "template": template(APP, AGENT)}, "status": {"observedGeneration": 2}}
    status = rollout_status(rs, [pod("web-a", APP), pod("web-b", APP)])
    assert status.replace_pod == "web-b" and "a ReplicaSet does not roll out a new template by itself" in status.message
    terminating = [pod("web-a", APP), pod("web-b", APP, deleting=True), pod("web-c", APP, AGENT, ready=False)]
    assert rollout_status(rs, terminating).replace_pod is None
    assert rollout_status(rs, [pod("web-c", APP, AGENT), pod("web-d", APP, AGENT)]).done


def test_label_selectors_are_written_in_the_query_syntax() -> None:
    selector = {"matchLabels": {"app": "web", "tier": "front"},
                "matchExpressions": [{"key": "env", "operator": "In", "values": ["a", "b"]},
                                     {"key": "canary", "operator": "DoesNotExist"},
                                     {"key": "track", "operator": "Exists"},
                                     {"key": "zone", "operator": "NotIn", "values": ["x"]}]}
    assert format_selector(selector) == "app=web,tier=front,env in (a,b),!canary,track,zone notin (x)"
