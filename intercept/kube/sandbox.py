"""Sandboxes as data: the fork of a workload, its Service, and the routes to it. Pure.

A sandbox NAME forks one or more Services: for each, a copy of the workload behind it
(one replica, the same pod spec: config, env, volumes, service account, with the images
and variables the sandbox overrides) that the original Service never selects, a Service
for the copy, and routes on the original workload's agents that send the sandbox's key to
the copy. The default key is the header ``x-intercept-id: NAME`` or the W3C baggage
member ``intercept-id=NAME`` (two routes with one destination: either one routes).

Invariants kept here:

- A fork is never selected by a Service of the namespace that selects the original's
  pods: every label such a Service selects on is given a sandbox-specific value.
- A fork is built from the original as it was before injection: it has no agent.
- Every object a sandbox creates carries ``intercept.dev/sandbox: NAME`` and its expiry,
  so that list, delete and gc find all of it by label.

The cluster side (create, wait, delete, gc) is :mod:`intercept.kube.sandboxes`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from intercept.errors import InjectError, UsageError
from intercept.kube import inject
from intercept.routing.cluster import ClusterRoute, sandbox_name
from intercept.routing.match import Baggage, HeaderEquals, Route

Obj = dict[str, Any]

SANDBOX_LABEL = "intercept.dev/sandbox"
FORK_OF_LABEL = "intercept.dev/fork-of"  # the original workload's name
EXPIRES_ANNOTATION = "intercept.dev/expires"  # RFC 3339, UTC
SERVICE_ANNOTATION = "intercept.dev/forked-service"  # the Service that was forked
KEY_HEADER = "x-intercept-id"
KEY_BAGGAGE = "intercept-id"
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


@dataclass(frozen=True)
class Overrides:
    """What a sandbox changes in its forks: ``images`` by container (None: the Service's
    container), ``env`` as (container or None, name, value)."""

    images: dict[str | None, str] = field(default_factory=dict)
    env: tuple[tuple[str | None, str, str], ...] = ()

    @classmethod
    def parse(cls, images: list[str], env: list[str]) -> Overrides:
        """``--image [CONTAINER=]IMAGE`` and ``--env [CONTAINER:]KEY=VALUE`` as typed."""
        by_container: dict[str | None, str] = {}
        for text in images:
            container, sep, image = text.rpartition("=")
            if not image or any(c.isspace() for c in image):
                raise UsageError(f"--image {text!r}: expected [CONTAINER=]IMAGE, e.g. --image orders=registry/orders:pr-42")
            by_container[container if sep else None] = image
        variables = []
        for text in env:
            head, sep, value = text.partition("=")
            if not sep:
                raise UsageError(f"--env {text!r}: expected [CONTAINER:]KEY=VALUE, e.g. --env FEATURE_X=on")
            container, colon, key = head.rpartition(":")
            if not re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", key):
                raise UsageError(f"--env {text!r}: {key!r} is not a valid variable name")
            variables.append((container if colon else None, key, value))
        return cls(by_container, tuple(variables))


@dataclass(frozen=True)
class Fork:
    """The fork of one Service: what to create, and where its routes send requests."""

    service: str  # the forked Service
    original: str  # Kind/name of the original workload
    original_name: str
    workload: Obj  # the fork's Deployment
    fork_service: Obj  # its Service
    destination: tuple[str, int]  # host:port the original's agents send the sandbox's requests to


def default_routes(name: str) -> list[Route]:
    """The sandbox's key: the header ``x-intercept-id: NAME`` or the baggage member ``intercept-id=NAME``."""
    return [Route(frozenset({HeaderEquals(KEY_HEADER, name)})), Route(frozenset({Baggage(KEY_BAGGAGE, name)}))]


def fork_name(base: str, name: str, limit: int = 63) -> str:
    """``BASE-sbx-NAME``, shortened from the base so it stays a valid object name."""
    suffix = f"-sbx-{name}"
    return base[: limit - len(suffix)].rstrip("-.") + suffix


def expiry_text(expires: float) -> str:
    return datetime.fromtimestamp(expires, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expiry_of(obj: Obj) -> float | None:
    text = (obj["metadata"].get("annotations") or {}).get(EXPIRES_ANNOTATION)
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def plan(objects: list[Obj], service: str, name: str, overrides: Overrides, expires: float,
         cluster_domain: str = "cluster.local") -> Fork:
    """The fork of ``service`` for sandbox ``name`` from the namespace's ``objects`` (as read;
    injected or not). Raises ResolveError/InjectError saying why it cannot be forked."""
    sandbox_name(name)
    originals = [inject.restore_object(o) for o in objects]
    target = inject.resolve(originals, service)
    original = next(o for o in originals if o["kind"] == target.workload_kind and o["metadata"]["name"] == target.workload_name)
    namespace = target.namespace or original["metadata"].get("namespace")
    if original["kind"] == "StatefulSet" and original["spec"].get("volumeClaimTemplates"):
        raise InjectError(f"StatefulSet/{target.workload_name} has volumeClaimTemplates: a fork would need its own "
                          "volumes; fork a Deployment, or give the StatefulSet's data another source")
    template = copy.deepcopy(original["spec"]["template"])
    pod_labels = dict(template["metadata"].get("labels") or {})
    # Every label a Service of the namespace selects the original's pods on gets a value of its own.
    selecting = [o for o in originals if o["kind"] == "Service" and _selects(o, pod_labels)]
    for svc in selecting:
        for key in (svc["spec"].get("selector") or {}):
            pod_labels[key] = _label_value(f"{pod_labels[key]}-sbx-{name}")
    marks = {SANDBOX_LABEL: name, FORK_OF_LABEL: _label_value(target.workload_name)}
    pod_labels.update(marks)
    template["metadata"]["labels"] = pod_labels
    _override(template["spec"], target.container, overrides, f"{original['kind']}/{target.workload_name}")

    annotations = {EXPIRES_ANNOTATION: expiry_text(expires), SERVICE_ANNOTATION: service}
    workload = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": fork_name(target.workload_name, name), "namespace": namespace,
                     "labels": {**(original["metadata"].get("labels") or {}), **marks}, "annotations": annotations},
        "spec": {"replicas": 1, "selector": {"matchLabels": dict(marks)}, "template": template},
    }
    source_service = next(o for o in originals if o["kind"] == "Service" and o["metadata"]["name"] == service)
    port = next(p for p in source_service["spec"]["ports"] if p["port"] == target.service_port)
    fork_service_name = fork_name(service, name)
    fork_service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": fork_service_name, "namespace": namespace, "labels": dict(marks), "annotations": annotations},
        "spec": {
            # headless: the fork's one pod is reached directly, as the agents resolve the name
            "clusterIP": "None",
            "selector": dict(marks),
            "ports": [{"name": port.get("name") or "http", "port": target.container_port, "targetPort": target.container_port,
                       "protocol": port.get("protocol", "TCP")}],
        },
    }
    host = f"{fork_service_name}.{namespace}.svc.{cluster_domain}"
    return Fork(service, f"{original['kind']}/{target.workload_name}", target.workload_name, workload, fork_service,
                (host, target.container_port))


def routes(name: str, fork: Fork, keys: list[Route], expires: float) -> list[ClusterRoute]:
    """The cluster routes that send the sandbox's ``keys`` to ``fork``."""
    return [ClusterRoute(name, key, fork.destination, expires) for key in keys]


def _selects(service: Obj, labels: dict[str, str]) -> bool:
    selector = service["spec"].get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _label_value(text: str) -> str:
    """``text`` as a label value: at most 63 characters, alphanumeric at both ends."""
    text = text[:63].rstrip("-._")
    return text if _LABEL_VALUE.fullmatch(text) else re.sub(r"[^-A-Za-z0-9_.]", "-", text).strip("-._")[:63]


def _override(pod: Obj, main: str, overrides: Overrides, what: str) -> None:
    containers = {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}
    for container, image in overrides.images.items():
        name = container or main
        if name not in containers:
            raise UsageError(f"--image {container}={image}: {what} has no container {name!r} "
                             f"(containers: {', '.join(containers)})")
        containers[name]["image"] = image
    for container, key, value in overrides.env:
        name = container or main
        if name not in containers:
            raise UsageError(f"--env {container}:{key}=...: {what} has no container {name!r} "
                             f"(containers: {', '.join(containers)})")
        env = [e for e in containers[name].get("env") or [] if e.get("name") != key]
        containers[name]["env"] = [*env, {"name": key, "value": value}]
