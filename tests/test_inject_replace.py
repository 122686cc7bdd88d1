"""The replace transform (``intercept start --replace``), tested alone: the app container runs
the stand-in while a developer replaces it, keeps what the developer's process is handed
(env, mounts), and comes back exactly.

Over every Service of the shop of ``tests/shop.py`` (probes, named ports, policies) and over
small workloads with no Service (``deployment/worker``, ``statefulset/NAME``).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from intercept.errors import ResolveError, UsageError
from intercept.kube.inject import (
    AGENT_CONTAINER,
    STAND_IN_COMMAND,
    InjectOptions,
    describe_changes,
    inject,
    replaced_by,
    resolve,
    restore,
    running_options,
)
from tests.test_inject import CASES, CORPORA, OPTIONS, boutique, container, find, validate

REPLACE = dataclasses.replace(OPTIONS, replace_by="alice")
# What the app container keeps while replaced: what the pod and the developer's process rely on.
KEPT = ("name", "env", "envFrom", "volumeMounts", "ports", "resources", "securityContext")


def _worker(kind: str = "Deployment", **container_fields) -> dict:
    app = {"name": "worker", "image": "registry.example/worker:1", "command": ["python", "-m", "worker"],
           "args": ["--queue", "jobs"], "workingDir": "/srv/worker",
           "env": [{"name": "REDIS_URL", "value": "redis://redis:6379"},
                   {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}],
           "envFrom": [{"configMapRef": {"name": "worker-config"}}],
           "volumeMounts": [{"name": "config", "mountPath": "/etc/worker"}],
           "livenessProbe": {"exec": {"command": ["python", "-m", "worker.alive"]}},
           "lifecycle": {"preStop": {"exec": {"command": ["python", "-m", "worker.drain"]}}},
           "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}}, **container_fields}
    spec = {"replicas": 2, "selector": {"matchLabels": {"app": "worker"}},
            "template": {"metadata": {"labels": {"app": "worker"}},
                         "spec": {"containers": [app], "volumes": [{"name": "config", "configMap": {"name": "worker-config"}}]}}}
    if kind == "StatefulSet":
        spec["serviceName"] = "worker"
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "worker", "namespace": "jobs"}, "spec": spec}


def _app_of(objects, service):
    target = resolve(objects, service)
    return target, container(find(objects, target.workload_kind, target.workload_name), target.container)


@pytest.mark.parametrize("corpus, service", CASES)
def test_the_replaced_app_container_runs_the_stand_in_and_keeps_the_pods_world(corpus, service):
    objects = boutique(corpus)
    target, original = _app_of(objects, service)
    replaced = inject(objects, service, REPLACE)
    _, app = _app_of(replaced, service)
    assert app["image"] == REPLACE.image
    assert app["command"] == [*STAND_IN_COMMAND, "alice"]
    assert not {"args", "workingDir", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle"} & set(app)
    plain = inject(objects, service, OPTIONS)
    _, plain_app = _app_of(plain, service)
    assert {k: app.get(k) for k in KEPT} == {k: plain_app.get(k) for k in KEPT}  # a named port's takeover still applies
    workload = find(replaced, target.workload_kind, target.workload_name)
    # the agent hands the developer the same environment and files as when nothing is replaced
    assert container(workload, AGENT_CONTAINER) == container(find(plain, target.workload_kind, target.workload_name),
                                                             AGENT_CONTAINER)
    assert replaced_by(workload) == "alice"
    validate(replaced)


@pytest.mark.parametrize("corpus, service", CASES)
def test_restore_of_a_replaced_workload_gives_back_exactly_the_original(corpus, service):
    objects = boutique(corpus)
    replaced = inject(objects, service, REPLACE)
    assert objects == CORPORA[corpus][2], "inject mutated its input"
    assert restore(replaced) == CORPORA[corpus][2]
    assert restore(list(yaml.safe_load_all(yaml.safe_dump_all(replaced)))) == CORPORA[corpus][2]


@pytest.mark.parametrize("corpus, service", CASES)
def test_leaving_a_replace_gives_back_the_agent_as_it_was_before(corpus, service):
    plain = inject(boutique(corpus), service, OPTIONS)
    replaced = inject(plain, service, REPLACE)
    back = inject(replaced, service, OPTIONS)
    assert back == plain
    assert inject(replaced, service, REPLACE) == replaced  # replacing twice changes nothing


def test_a_probe_renamed_by_the_port_takeover_comes_back_as_it_was():
    objects = boutique()
    service = "currencyservice"
    svc = find(objects, "Service", service)
    svc["spec"]["ports"][0]["targetPort"] = "grpc"  # named: the app's port and its probes are renamed
    _, original = _app_of(objects, service)
    original["readinessProbe"] = {"tcpSocket": {"port": "grpc"}}
    before = copy.deepcopy(objects)
    replaced = inject(objects, service, REPLACE)
    _, app = _app_of(replaced, service)
    assert "readinessProbe" not in app
    assert restore(replaced) == before


def test_a_worker_with_no_service_is_named_as_deployment_slash_name():
    worker = _worker()
    objects = [worker]
    target = resolve(objects, "deployment/worker")
    assert (target.workload, target.container, target.has_service) == ("Deployment/worker", "worker", False)
    replaced = inject(objects, "deployment/worker", REPLACE)
    app = container(replaced[0], "worker")
    assert app["command"] == [*STAND_IN_COMMAND, "alice"] and app["image"] == REPLACE.image
    assert {k: app.get(k) for k in KEPT} == {k: worker["spec"]["template"]["spec"]["containers"][0].get(k) for k in KEPT}
    agent = container(replaced[0], AGENT_CONTAINER)
    assert [e["name"] for e in agent["env"]][:2] == ["REDIS_URL", "CPU"]
    assert agent["env"][1]["valueFrom"]["resourceFieldRef"]["containerName"] == "worker"  # still resolves
    assert agent["envFrom"] == [{"configMapRef": {"name": "worker-config"}}]
    assert restore(replaced) == [worker]
    validate(replaced)


def test_a_statefulset_is_named_as_statefulset_slash_name_and_other_objects_stay():
    worker = _worker("StatefulSet")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "worker", "namespace": "jobs"},
               "spec": {"clusterIP": "None", "selector": {"app": "worker"}, "ports": [{"port": 80}]}}
    objects = [service, worker]
    replaced = inject(objects, "statefulset/worker", REPLACE)
    assert replaced[0] is service
    assert replaced_by(replaced[1]) == "alice"
    assert restore(replaced) == [service, worker]


def test_the_default_container_annotation_picks_the_container_to_replace():
    worker = _worker()
    pod = worker["spec"]["template"]
    pod["spec"]["containers"].insert(0, {"name": "log-shipper", "image": "registry.example/shipper:1"})
    pod["metadata"]["annotations"] = {"kubectl.kubernetes.io/default-container": "worker"}
    replaced = inject([worker], "deployment/worker", REPLACE)
    assert container(replaced[0], "log-shipper") == {"name": "log-shipper", "image": "registry.example/shipper:1"}
    assert container(replaced[0], "worker")["command"][:2] == list(STAND_IN_COMMAND)


def test_an_agent_in_place_keeps_the_container_it_serves_when_the_workload_is_named():
    objects = boutique()
    injected = inject(objects, "cartservice", OPTIONS)
    target = resolve(objects, "cartservice")
    ref = f"deployment/{target.workload_name}"
    replaced = inject(injected, ref, REPLACE)
    assert replaced_by(find(replaced, "Deployment", target.workload_name)) == "alice"
    assert find(replaced, "Service", "cartservice") is find(injected, "Service", "cartservice")
    assert inject(replaced, ref, OPTIONS) == injected
    assert restore(replaced) == objects


def test_a_workload_that_is_not_there_is_refused_naming_those_that_are():
    with pytest.raises(ResolveError, match=r"no Deployment named 'wroker'.*Deployments: worker"):
        resolve([_worker()], "deployment/wroker")


def test_the_running_options_say_who_replaces():
    replaced = inject([_worker()], "deployment/worker", REPLACE)[0]
    assert running_options(replaced, OPTIONS).replace_by == "alice"
    assert running_options(inject([_worker()], "deployment/worker", OPTIONS)[0], OPTIONS).replace_by is None


def test_the_changes_are_described_in_words():
    plain = inject([_worker()], "deployment/worker", OPTIONS)
    replaced = inject(plain, "deployment/worker", REPLACE)
    assert describe_changes(plain, replaced) == [
        "Deployment/worker in namespace jobs: container worker replaced by alice's local process "
        "(it runs the stand-in until they leave)"]
    assert describe_changes(replaced, plain) == ["Deployment/worker in namespace jobs: container worker runs the app again"]


def test_a_blank_developer_name_is_refused():
    with pytest.raises(UsageError, match="--name"):
        InjectOptions(image="registry.example/agent:1", replace_by=" ")
