"""Sandboxes as data: the fork of a workload, its Service and the routes to it (pure), and
the offline ``intercept sandbox create --dry-run -o yaml``."""

from __future__ import annotations

import subprocess
import sys
import time

import kubernetes_validate
import pytest
import yaml

from intercept.errors import InjectError, UsageError
from intercept.kube.inject import InjectOptions, inject
from intercept.kube.sandbox import (
    EXPIRES_ANNOTATION,
    SANDBOX_LABEL,
    Overrides,
    default_routes,
    expiry_of,
    plan,
    routes,
)
from intercept.routing.cluster import RoutesDocument
from intercept.routing.match import RouteTable

KUBERNETES_VERSION = "1.31"
EXPIRES = time.time() + 3600


def shop() -> list[dict]:
    """A namespace with two Services over one Deployment's pods, and an unrelated one."""
    pod_labels = {"app": "orders", "tier": "backend"}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "orders", "namespace": "shop", "labels": {"app": "orders"}},
         "spec": {"replicas": 3, "selector": {"matchLabels": pod_labels}, "template": {
             "metadata": {"labels": pod_labels},
             "spec": {"serviceAccountName": "orders",
                      "containers": [
                          {"name": "app", "image": "registry/orders:1", "ports": [{"name": "http", "containerPort": 8080}],
                           "env": [{"name": "MODE", "value": "prod"}],
                           "volumeMounts": [{"name": "config", "mountPath": "/etc/orders"}]},
                          {"name": "cache", "image": "redis:7"}],
                      "volumes": [{"name": "config", "configMap": {"name": "orders"}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders", "namespace": "shop"},
         "spec": {"selector": {"app": "orders"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders-metrics", "namespace": "shop"},
         "spec": {"selector": {"tier": "backend"}, "ports": [{"name": "m", "port": 9000, "targetPort": 8080}]}},
    ]


def selects(service: dict, labels: dict) -> bool:
    selector = service["spec"]["selector"]
    return all(labels.get(k) == v for k, v in selector.items())


def test_a_fork_is_one_replica_of_the_same_pod_that_no_service_of_the_original_selects():
    fork = plan(shop(), "orders", "pr-42", Overrides(), EXPIRES)
    workload, labels = fork.workload, fork.workload["spec"]["template"]["metadata"]["labels"]
    assert workload["metadata"]["name"] == "orders-sbx-pr-42" and workload["spec"]["replicas"] == 1
    assert labels[SANDBOX_LABEL] == "pr-42"
    assert not any(selects(s, labels) for s in shop() if s["kind"] == "Service"), "an original Service would select the fork"
    pod, original = workload["spec"]["template"]["spec"], shop()[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "orders" and pod["volumes"] == original["volumes"]
    assert pod["containers"] == original["containers"]
    assert selects(fork.fork_service, labels) and fork.fork_service["spec"]["clusterIP"] == "None"
    assert fork.destination == ("orders-sbx-pr-42.shop.svc.cluster.local", 8080)
    assert abs(expiry_of(workload) - EXPIRES) < 1 and EXPIRES_ANNOTATION in fork.fork_service["metadata"]["annotations"]


def test_overrides_change_the_image_and_variables_of_the_forked_container_only():
    overrides = Overrides.parse(["registry/orders:pr-42", "cache=redis:8"], ["MODE=test", "cache:MAXMEMORY=1mb"])
    containers = {c["name"]: c for c in plan(shop(), "orders", "pr-42", overrides, EXPIRES).workload["spec"]["template"]["spec"]["containers"]}
    assert containers["app"]["image"] == "registry/orders:pr-42" and containers["cache"]["image"] == "redis:8"
    assert containers["app"]["env"] == [{"name": "MODE", "value": "test"}]
    assert containers["cache"]["env"] == [{"name": "MAXMEMORY", "value": "1mb"}]
    with pytest.raises(UsageError, match="no container 'db'"):
        plan(shop(), "orders", "pr-42", Overrides.parse(["db=postgres:16"], []), EXPIRES)


def test_an_injected_workload_is_forked_as_it_was_before_injection():
    injected = inject(shop(), "orders", InjectOptions(image="intercept/agent:1"))
    fork = plan(injected, "orders", "pr-42", Overrides(), EXPIRES)
    names = [c["name"] for c in fork.workload["spec"]["template"]["spec"]["containers"]]
    assert names == ["app", "cache"]
    assert fork.workload["spec"]["template"]["spec"]["containers"][0]["ports"] == [{"name": "http", "containerPort": 8080}]


def test_a_statefulset_with_its_own_volumes_is_refused_with_the_reason():
    objects = shop()
    objects[0] = {**objects[0], "kind": "StatefulSet",
                  "spec": {**objects[0]["spec"], "serviceName": "orders", "volumeClaimTemplates": [{"metadata": {"name": "data"}}]}}
    with pytest.raises(InjectError, match="volumeClaimTemplates"):
        plan(objects, "orders", "pr-42", Overrides(), EXPIRES)


def test_the_default_key_is_the_header_or_the_baggage_member():
    fork = plan(shop(), "orders", "pr-42", Overrides(), EXPIRES)
    table = RouteTable()
    for route in routes("pr-42", fork, default_routes("pr-42"), EXPIRES):
        table.add(route.session_id, route.holder, route.route, destination=route.destination, expires=route.expires)
    assert table.match(b"GET", b"/", [(b"x-intercept-id", b"pr-42")]).destination == fork.destination
    assert table.match(b"GET", b"/", [(b"baggage", b"user=1,intercept-id=pr-42")]).destination == fork.destination
    assert table.match(b"GET", b"/", [(b"x-intercept-id", b"pr-43")]) is None


@pytest.mark.parametrize("name", ["PR-42", "a" * 31, "-x", ""])
def test_a_sandbox_name_must_fit_in_object_names(name):
    with pytest.raises(UsageError, match="sandbox name"):
        plan(shop(), "orders", name, Overrides(), EXPIRES)


def test_dry_run_prints_schema_valid_objects_and_writes_nothing(tmp_path):
    manifests = tmp_path / "shop.yaml"
    manifests.write_text(yaml.safe_dump_all(shop()))
    out = subprocess.run([sys.executable, "-m", "intercept", "sandbox", "create", "pr-42", "--fork", "orders",
                          "--image", "registry/orders:pr-42", "--ttl", "2h", "--dry-run", "-o", "yaml", "-f", str(manifests)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objects = list(yaml.safe_load_all(out.stdout))
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Deployment", "orders-sbx-pr-42"), ("Service", "orders-sbx-pr-42"), ("ConfigMap", "intercept-orders")]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    document = RoutesDocument.from_text(objects[2]["data"]["routes.json"])
    assert document.sandboxes() == ["pr-42"] and len(document.routes) == 2


def test_a_sandbox_lives_at_most_30_days_which_is_what_its_agents_accept(tmp_path):
    manifests = tmp_path / "shop.yaml"
    manifests.write_text(yaml.safe_dump_all(shop()))
    out = subprocess.run([sys.executable, "-m", "intercept", "sandbox", "create", "pr-42", "--fork", "orders",
                          "--ttl", "31d", "--dry-run", "-o", "yaml", "-f", str(manifests)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "intercept: error: --ttl 2678400s: a sandbox lives more than 0s and at most 30d; "
        "extend it later with intercept sandbox extend NAME --ttl DURATION"), out.stderr
    longest = RoutesDocument(time.time(), tuple(routes("pr-42", plan(shop(), "orders", "pr-42", Overrides(), EXPIRES),
                                                        default_routes("pr-42"), time.time() + 30 * 86400)))
    longest.check_times(time.time())  # an agent takes it
