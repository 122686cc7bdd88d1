"""A microservice shop's manifests, built here: the tests' corpus of real-world shapes.

It has the shape of Google's Online Boutique (the same twelve workloads and their
Services, ServiceAccounts and network policies, the same ports), written out by this
module rather than copied, so that a fresh clone runs every test without
``../shared/fixtures``. What makes it worth injecting into, as the original:

- the Pod Security "restricted" profile everywhere (runAsNonRoot, readOnlyRootFilesystem,
  capabilities dropped), fsGroup and a pod-level securityContext;
- numeric targetPorts, one that differs from its port (emailservice 5000 -> 8080), two
  Services in front of one workload (frontend, frontend-external of type LoadBalancer),
  a workload without a Service (loadgenerator, with an init container);
- HTTP, gRPC and TCP probes on the service port, an HTTP probe with headers;
- a volume mount (redis-cart's emptyDir), env with service addresses;
- network policies that admit ingress only on the numeric service port, from named
  neighbours, a default deny-all, and one that admits every port (frontend).

When the real Online Boutique manifests are beside the checkout
(``../shared/fixtures/online-boutique``, or ``$INTERCEPT_FIXTURES``) they are an extra
corpus (:func:`corpora`).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

ONLINE_BOUTIQUE = Path(os.environ.get(
    "INTERCEPT_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "online-boutique"))
REGISTRY = "registry.example/shop"

# name: (container port, Service port or None, probe kind, env, callers admitted by its policy)
_WORKLOADS: dict[str, tuple[int, int | None, str, dict[str, str], tuple[str, ...]]] = {
    "emailservice": (8080, 5000, "grpc", {"PORT": "8080", "DISABLE_PROFILER": "1"}, ("checkoutservice",)),
    "checkoutservice": (5050, 5050, "grpc", {
        "PORT": "5050", "PRODUCT_CATALOG_SERVICE_ADDR": "productcatalogservice:3550",
        "SHIPPING_SERVICE_ADDR": "shippingservice:50051", "PAYMENT_SERVICE_ADDR": "paymentservice:50051",
        "EMAIL_SERVICE_ADDR": "emailservice:5000", "CURRENCY_SERVICE_ADDR": "currencyservice:7000",
        "CART_SERVICE_ADDR": "cartservice:7070"}, ("frontend",)),
    "recommendationservice": (8080, 8080, "grpc", {
        "PORT": "8080", "PRODUCT_CATALOG_SERVICE_ADDR": "productcatalogservice:3550", "DISABLE_PROFILER": "1"},
        ("frontend",)),
    "frontend": (8080, 80, "http", {
        "PORT": "8080", "PRODUCT_CATALOG_SERVICE_ADDR": "productcatalogservice:3550",
        "CURRENCY_SERVICE_ADDR": "currencyservice:7000", "CART_SERVICE_ADDR": "cartservice:7070",
        "RECOMMENDATION_SERVICE_ADDR": "recommendationservice:8080", "SHIPPING_SERVICE_ADDR": "shippingservice:50051",
        "CHECKOUT_SERVICE_ADDR": "checkoutservice:5050", "AD_SERVICE_ADDR": "adservice:9555",
        "ENABLE_PROFILER": "0"}, ()),
    "paymentservice": (50051, 50051, "grpc", {"PORT": "50051", "DISABLE_PROFILER": "1"}, ("checkoutservice",)),
    "productcatalogservice": (3550, 3550, "grpc", {"PORT": "3550", "DISABLE_PROFILER": "1"},
                              ("frontend", "checkoutservice", "recommendationservice")),
    "cartservice": (7070, 7070, "grpc", {"REDIS_ADDR": "redis-cart:6379"}, ("frontend", "checkoutservice")),
    "loadgenerator": (0, None, "none", {"FRONTEND_ADDR": "frontend:80", "USERS": "10", "RATE": "1"}, ()),
    "currencyservice": (7000, 7000, "grpc", {"PORT": "7000", "DISABLE_PROFILER": "1"}, ("frontend", "checkoutservice")),
    "shippingservice": (50051, 50051, "grpc", {"PORT": "50051", "DISABLE_PROFILER": "1"}, ("frontend", "checkoutservice")),
    "redis-cart": (6379, 6379, "tcp", {}, ("cartservice",)),
    "adservice": (9555, 9555, "grpc", {"PORT": "9555"}, ("frontend",)),
}
_ORDER = ("frontend", "adservice", "currencyservice", "cartservice", "redis-cart", "loadgenerator",
          "recommendationservice", "checkoutservice", "emailservice", "paymentservice", "shippingservice",
          "productcatalogservice")
_PORT_NAMES = {"http": "http", "grpc": "grpc", "tcp": "tcp-redis"}

_RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "privileged": False,
    "readOnlyRootFilesystem": True,
}
_POD_SECURITY = {"fsGroup": 1000, "runAsGroup": 1000, "runAsNonRoot": True, "runAsUser": 1000}


def _probe(kind: str, port: int, which: str) -> Obj:
    if kind == "http":
        return {"initialDelaySeconds": 10, "httpGet": {
            "path": "/_healthz", "port": port,
            "httpHeaders": [{"name": "Cookie", "value": f"shop_session-id=x-{which}-probe"}]}}
    if kind == "tcp":
        return {"periodSeconds": 5, "tcpSocket": {"port": port}}
    return {"periodSeconds": 5, "grpc": {"port": port}}


def _deployment(name: str) -> Obj:
    port, _, probe, env, _ = _WORKLOADS[name]
    main: Obj = {
        "name": "redis" if name == "redis-cart" else "main" if name == "loadgenerator" else "server",
        "securityContext": copy.deepcopy(_RESTRICTED),
        "image": f"{REGISTRY}/{name}:1.0",
    }
    if port:
        main["ports"] = [{"name": "grpc", "containerPort": port}] if name == "currencyservice" else [{"containerPort": port}]
        main["readinessProbe"] = _probe(probe, port, "readiness")
        main["livenessProbe"] = _probe(probe, port, "liveness")
    if env:
        main["env"] = [{"name": key, "value": value} for key, value in env.items()]
    if name == "redis-cart":
        main["volumeMounts"] = [{"mountPath": "/data", "name": "redis-data"}]
    main["resources"] = {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "200m", "memory": "128Mi"}}
    pod: Obj = {}
    if name != "redis-cart":
        pod["serviceAccountName"] = name
    if name not in ("frontend", "checkoutservice", "shippingservice", "redis-cart"):
        pod["terminationGracePeriodSeconds"] = 5
    pod["securityContext"] = dict(_POD_SECURITY)
    if name == "loadgenerator":
        pod["restartPolicy"] = "Always"
        pod["initContainers"] = [{
            "name": "frontend-check", "image": f"{REGISTRY}/busybox:1",
            "command": ["/bin/sh", "-c", "until wget -q -O /dev/null http://$FRONTEND_ADDR; do sleep 5; done"],
            "securityContext": copy.deepcopy(_RESTRICTED), "env": [{"name": "FRONTEND_ADDR", "value": "frontend:80"}]}]
    pod["containers"] = [main]
    if name == "redis-cart":
        pod["volumes"] = [{"name": "redis-data", "emptyDir": {}}]
    template: Obj = {"metadata": {"labels": {"app": name}}, "spec": pod}
    if name in ("frontend", "loadgenerator"):
        template["metadata"]["annotations"] = {"sidecar.istio.io/rewriteAppHTTPProbers": "true"}
    spec: Obj = {"selector": {"matchLabels": {"app": name}}, "template": template}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": {"app": name}}, "spec": spec}


def _service(name: str, workload: str, service_type: str = "ClusterIP") -> Obj:
    port, service_port, probe, _, _ = _WORKLOADS[workload]
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": {"app": workload}},
            "spec": {"type": service_type, "selector": {"app": workload},
                     "ports": [{"name": _PORT_NAMES[probe], "port": service_port, "targetPort": port}]}}


def _policy(name: str) -> Obj:
    port, _, _, _, callers = _WORKLOADS[name]
    spec: Obj = {"podSelector": {"matchLabels": {"app": name}}, "policyTypes": ["Ingress", "Egress"]}
    if name == "frontend":
        spec["ingress"] = [{}]  # every port, from anywhere
    elif name == "loadgenerator":
        spec["policyTypes"] = ["Egress"]
    else:
        spec["ingress"] = [{"from": [{"podSelector": {"matchLabels": {"app": caller}}} for caller in callers],
                            "ports": [{"port": port, "protocol": "TCP"}]}]
    spec["egress"] = [{}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name}, "spec": spec}


def manifests() -> list[Obj]:
    """The workloads, their Services and ServiceAccounts, in the order of a release file."""
    objects: list[Obj] = []
    for name in _ORDER:
        objects.append(_deployment(name))
        if _WORKLOADS[name][1] is not None:
            objects.append(_service(name, name))
        if name == "frontend":
            objects.append(_service("frontend-external", name, "LoadBalancer"))
        if name != "redis-cart":
            objects.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
    return objects


def policies() -> list[Obj]:
    """One NetworkPolicy per workload, and a default deny-all."""
    names = sorted([*_WORKLOADS, "deny-all"])
    return [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "deny-all"},
             "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}} if name == "deny-all" else _policy(name)
            for name in names]


def files(directory: Path | None = None) -> Path:
    """``kubernetes-manifests.yaml`` and ``network-policies.yaml`` written to ``directory``
    (default: a fresh temporary one), for the tests that pass files to the CLI."""
    directory = Path(tempfile.mkdtemp(prefix="intercept-shop-")) if directory is None else directory
    (directory / "kubernetes-manifests.yaml").write_text(yaml.safe_dump_all(manifests(), sort_keys=False))
    (directory / "network-policies.yaml").write_text(yaml.safe_dump_all(policies(), sort_keys=False))
    return directory


def load(directory: Path) -> tuple[list[Obj], list[Obj]]:
    """The manifests and the policies of a corpus directory laid out as :func:`files` writes it."""
    def read(name: str) -> list[Obj]:
        return [o for o in yaml.safe_load_all((directory / name).read_text()) if o]

    return read("kubernetes-manifests.yaml"), read("network-policies.yaml")


def corpora() -> dict[str, tuple[list[Obj], list[Obj]]]:
    """Every corpus to run the manifest tests over: this shop, and the real Online Boutique
    when it is beside the checkout. Each is ``(manifests, policies)``."""
    found = {"shop": (manifests(), policies())}
    if (ONLINE_BOUTIQUE / "kubernetes-manifests.yaml").exists():
        found["online-boutique"] = load(ONLINE_BOUTIQUE)
    return found
