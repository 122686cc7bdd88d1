"""``intercept doctor [SERVICE]``: what a first intercept needs, one check at a time, each with its fix.

The checks, in order; each gives one :class:`Check` (ok, failed, or skipped with why):

1. ``cluster``: the API server answers these credentials (the context, the server, the namespace).
2. ``rbac``: every verb the injection, the tunnel and the cluster names use (:data:`NEEDED`), asked of the
   authorizer with SelfSubjectAccessReviews (what ``kubectl auth can-i`` asks).
3. ``agent image``: which image would be injected and who chose it; the built-in default
   passes only when the cluster already runs it (it exists once a release published it).
4. ``pod security``: the namespace's enforced Pod Security level; with a SERVICE (a
   ``service`` check fails instead when it cannot be intercepted at all), one of
   its pods as the injection would make it is created with ``dryRun=All``, so the API
   server's own admission (Pod Security included) says whether the rollout's pods would
   be let in.
5. ``network policies``: with a SERVICE, the NetworkPolicies that admit the app's port but
   not the agent's; the injection extends them, unless ``--no-policy-changes`` forbids it
   or the user may not update them: then they would cut the agent off.
6. ``protocol``: with a SERVICE, what the app's port on one of its pods speaks, probed
   through a port-forward (:mod:`intercept.kube.probe`): HTTP/1.1 and h2c are routed by
   header, TLS is relayed untouched (nothing can be routed).

The decisions are pure functions over objects and answers (``*_check``); :func:`run` does
the requests. A check that cannot run for a failure of an earlier one is skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes.client import ApiClient

from intercept.errors import InterceptError
from intercept.kube import inject
from intercept.kube.image import how_to_provide
from intercept.kube.inject import AGENT_HTTP_PORT, InjectOptions
from intercept.kube.probe import Protocol, probe
from intercept.kube.rest import AccessDenied, Cluster, ClusterError, NotFound, format_selector

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class Check:
    """One check's verdict: ``message`` says what was found, ``fix`` what to do when it failed."""

    name: str
    status: Status
    message: str
    fix: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "failed"

    def line(self) -> str:
        return f"{self.name}: {self.status}: {self.message}" + (f"; fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Access:
    """One permission the injection or the tunnel uses."""

    verb: str
    plural: str
    group: str = ""
    subresource: str = ""

    def __str__(self) -> str:
        return f"{self.verb} {self.plural}" + (f"/{self.subresource}" if self.subresource else "")


# What `intercept start` does in the namespace: read it (kube/apply.py _read_namespace), write
# the workload, Service, policies and Secret (and put them back on failure), follow the rollout
# and the agent pods (deleting pods for OnDelete StatefulSets), read events, and port-forward;
# and follow the Services and their EndpointSlices, whose names the local process reaches
# (intercept.kube.services, for intercept start's and intercept connect's cluster names).
NEEDED = (
    *(Access(verb, "services") for verb in ("get", "list", "watch", "update")),
    *(Access(verb, "endpointslices", "discovery.k8s.io") for verb in ("list", "watch")),
    *(Access(verb, plural, "apps") for plural in ("deployments", "statefulsets", "replicasets")
      for verb in ("get", "list", "update")),
    # intercept connect's own agent, where a namespace has none (intercept.kube.connect_agent): its Deployment
    # (and the Secret below)
    Access("create", "deployments", "apps"),
    *(Access(verb, "networkpolicies", "networking.k8s.io") for verb in ("get", "list", "update")),
    *(Access(verb, "secrets") for verb in ("get", "create", "update", "delete")),
    # the developers' routes, in the workload's routes ConfigMap (intercept.kube.developers)
    *(Access(verb, "configmaps") for verb in ("get", "create", "update")),
    *(Access(verb, "pods") for verb in ("get", "list", "watch", "delete")),
    Access("list", "events"),
    # The port-forward is a WebSocket upgrade (a GET); Kubernetes checks create as well as get
    # on pods/portforward for those (AuthorizePodWebsocketUpgradeCreatePermission).
    Access("get", "pods", subresource="portforward"),
    Access("create", "pods", subresource="portforward"),
)


# --------------------------------------------------------------------------- the decisions


def cluster_check(host: str, context: str | None, namespace: str, error: ClusterError | None,
                  namespace_exists: bool = True) -> Check:
    where = f"{host}" + (f" (context {context})" if context else " (in-cluster service account)")
    if isinstance(error, AccessDenied):  # its message ends with its own fix (log in again)
        return Check("cluster", "failed", f"{where}: {error}")
    if error is not None:
        return Check("cluster", "failed", f"{where}: {error}",
                     "start the cluster or pick the right one (--context, --kubeconfig, KUBECONFIG)")
    if not namespace_exists:
        return Check("cluster", "failed", f"{where} answers, but namespace {namespace} does not exist",
                     "pick the namespace with -n NAMESPACE (kubectl get namespaces lists them)")
    return Check("cluster", "ok", f"{where} answers; namespace {namespace}")


def rbac_check(namespace: str, denied: list[Access]) -> Check:
    if not denied:
        return Check("rbac", "ok", f"may do all {len(NEEDED)} things the injection and the tunnel do in namespace {namespace}")
    listed = ", ".join(map(str, denied))
    first = denied[0]
    return Check("rbac", "failed", f"may not {listed} in namespace {namespace}",
                 f"ask your cluster admin for a Role with these verbs in {namespace} (check one with: "
                 f"kubectl auth can-i {first.verb} {first.plural}{'/' + first.subresource if first.subresource else ''} "
                 f"-n {namespace})")


def image_check(image: str, origin: str | None, running: list[str], agent: tuple[str, str] | None = None) -> Check:
    """``origin`` is where the image was configured (None: the built-in default); ``running``
    names pods that already run it (so the cluster can pull it); ``agent`` is the SERVICE
    and the image of the agent already in place, which a start uses (and a start that asks
    for another one is refused)."""
    if agent is not None:
        service, current = agent
        if origin is None or image == current:
            return Check("agent image", "ok", f"{current}: the agent of {service} runs it already, and a start uses it")
        return Check("agent image", "failed",
                     f"the agent of {service} runs {current}, and {image} (from {origin}) differs: a start that asks "
                     "for it is refused, since every developer of the service shares one agent",
                     f"leave the image out to use the running agent's, or change it for everyone with "
                     f"intercept inject {service} --agent-image {image}")
    if running:
        return Check("agent image", "ok", f"{image} ({origin or 'the default'}) already runs in pod {running[0]}")
    if origin is not None:
        return Check("agent image", "ok", f"{image} (from {origin}); the cluster must be able to pull it")
    return Check("agent image", "failed",
                 f"none configured, and the default {image} exists only once its release is published "
                 "(no pod here runs it yet)", how_to_provide(image) + ", or agent_image in intercept.yaml")


POD_SECURITY_LABEL = "pod-security.kubernetes.io/enforce"


def pod_security_check(namespace: str, labels: dict[str, str] | None, workload: str | None,
                       refusal: str | None, untried: str | None = None) -> Check:
    """``labels`` of the namespace (None: unreadable); ``refusal``: the API server's answer to
    the dry-run pod of ``workload`` (None: admitted, or no SERVICE was named); ``untried``: why
    the dry run could not be made."""
    level = (labels or {}).get(POD_SECURITY_LABEL) if labels is not None else None
    said = (f"namespace {namespace} enforces Pod Security {level!r}" if level else
            f"namespace {namespace} enforces no Pod Security level" if labels is not None else
            f"namespace {namespace}'s Pod Security level is unknown (may not read the namespace)")
    if refusal is not None and "PodSecurity" not in refusal:  # a quota, a webhook, a policy: not the level
        return Check("pod security", "failed",
                     f"{said}, but the pods of {workload} as injected would be refused by the API server: {refusal}",
                     "fix what the API server names above; the agent container itself meets 'restricted'")
    if refusal is not None:
        return Check("pod security", "failed",
                     f"{said}, and the pods of {workload} as injected would be refused: {refusal}",
                     f"make {workload}'s pods meet that level (the agent container already meets 'restricted'; "
                     "the pods running now were admitted before), or ask for a lower level on the namespace")
    if workload and untried:
        return Check("pod security", "skipped", f"{said}; {untried}")
    if workload:
        return Check("pod security", "ok", f"{said}; a pod of {workload} with the agent passes admission (dry run)")
    return Check("pod security", "ok", f"{said}; the agent container meets 'restricted' (name a SERVICE to "
                                       "dry-run its pods)")


def policy_check(objects: list[Obj], service: str, options: InjectOptions, may_update: bool) -> Check:
    """The namespace's objects: which NetworkPolicies the injection would extend, and whether it may."""
    injected = inject.inject(objects, service, _allowing(options))
    extended = [o for o, n in zip(objects, injected) if o["kind"] == "NetworkPolicy" and o != n]
    names = ", ".join(f"NetworkPolicy/{o['metadata']['name']}" for o in extended)
    policies = sum(1 for o in objects if o["kind"] == "NetworkPolicy")
    if not extended:
        return Check("network policies", "ok", f"none of the {policies} NetworkPolicies in the namespace cuts the agent "
                                               f"off" if policies else "no NetworkPolicy in the namespace")
    what = f"{names} admit(s) the app's port but not the agent's ({AGENT_HTTP_PORT})"
    if options.no_policy_changes:
        return Check("network policies", "failed", f"{what}, and --no-policy-changes forbids extending them: the "
                                                   "Service's traffic would not reach the agent",
                     f"add port {AGENT_HTTP_PORT} wherever they admit the app's port, or drop --no-policy-changes")
    if not may_update:
        return Check("network policies", "failed", f"{what}, and you may not update networkpolicies to extend them",
                     "ask for update on networkpolicies, or for the agent's port to be added to them")
    return Check("network policies", "ok", f"{what}: the injection extends them (and uninstall puts them back)")


def protocol_check(target: str, verdict: Protocol | None, error: str | None = None) -> Check:
    if verdict is None:
        return Check("protocol", "failed", f"could not probe {target}: {error}",
                     "check that the pod runs and its app listens on that port")
    speaks = " and ".join(verdict.speaks) or "none of HTTP/1.1, h2c and TLS"
    said = f"{target} speaks {speaks} ({verdict.seen})"
    if "TLS" in verdict.speaks:
        return Check("protocol", "failed", f"{said}: the agent relays TLS untouched, so no request can be routed "
                                           "by header",
                     "intercept a port that serves plaintext HTTP (TLS ended before the pod, at an ingress or a mesh)")
    if not verdict.routable:
        return Check("protocol", "failed", f"{said}: the agent relays it untouched, so nothing is routed",
                     "intercept a Service port that serves HTTP/1.1 or h2c (gRPC); --service-port picks one")
    return Check("protocol", "ok", f"{said}: routed by header")


def names_check() -> Check:
    """Which way this machine gives the local process the cluster's names (``--access auto``), and why."""
    from intercept.access.modes import choose

    mode = choose("auto")
    if mode.names:
        return Check("cluster names", "ok", f"{mode.name}: {mode.why}")
    return Check("cluster names", "skipped", mode.why)


def _allowing(options: InjectOptions) -> InjectOptions:
    """The same options, allowed to change policies: to see which it would change."""
    return dataclasses.replace(options, no_policy_changes=False)


# --------------------------------------------------------------------------- the requests


def _running_agent(cluster: Cluster, namespace: str, service: str | None,
                   options: InjectOptions) -> tuple[str, str] | None:
    """``(service, image)`` of the agent already behind ``service``, or None (none, or no service)."""
    from intercept.kube.apply import _read_namespace

    if service is None:
        return None
    try:
        objects = _read_namespace(cluster, namespace, service)
        target = inject.resolve(objects, service, options.wanted_ports()[0])
    except InterceptError:  # the service check says why, below
        return None
    workload = next(o for o in objects if o["kind"] == target.workload_kind
                    and o["metadata"]["name"] == target.workload_name)
    return (service, inject.running_options(workload, options).image) if inject.is_injected(workload) else None


def run(api: ApiClient, namespace: str, context: str | None, service: str | None, options: InjectOptions,
        image_origin: str | None, *, in_cluster: bool = False) -> list[Check]:
    """Every check, in order. A pod's port is probed through a port-forward, or at the pod's IP
    ``in_cluster``."""
    from intercept.kube.apply import _read_namespace

    cluster = Cluster(api)
    checks: list[Check] = []
    try:
        allowed = {access: cluster.can_i(access.verb, access.plural, namespace, access.group, access.subresource)[0]
                   for access in NEEDED}
    except ClusterError as error:
        checks.append(cluster_check(cluster.host, context, namespace, error))
        skip = "the cluster does not answer"
        return checks + [Check(name, "skipped", skip) for name in
                         ("rbac", "agent image", "pod security", "network policies", "protocol")]
    labels, exists = _namespace_labels(cluster, namespace)
    checks.append(cluster_check(cluster.host, context, namespace, None, exists))
    if not exists:
        return checks + [Check(name, "skipped", f"namespace {namespace} does not exist") for name in
                         ("rbac", "agent image", "pod security", "network policies", "protocol")]
    checks.append(rbac_check(namespace, [a for a, ok in allowed.items() if not ok]))

    pods = _pods(cluster, namespace)
    checks.append(image_check(options.image, image_origin, [
        p["metadata"]["name"] for p in pods if any(c.get("image") == options.image for c in p["spec"]["containers"])],
        _running_agent(cluster, namespace, service, options)))

    if service is None:
        checks.append(pod_security_check(namespace, labels, None, None))
        return checks + [Check(name, "skipped", "name a SERVICE (intercept doctor SERVICE)")
                         for name in ("network policies", "protocol")]
    try:
        objects = _read_namespace(cluster, namespace, service)
        target = inject.resolve_ports(objects, service, options.wanted_ports())[0]
        injected = inject.inject(objects, service, _allowing(options))
    except InterceptError as error:  # the Service leads nowhere intercept can go: that is the one finding
        return checks + [Check("service", "failed", str(error)), *(
            Check(name, "skipped", f"Service {service} cannot be intercepted (above)")
            for name in ("pod security", "network policies", "protocol"))]
    workload = next(o for o in injected if o["kind"] == target.workload_kind
                    and o["metadata"]["name"] == target.workload_name)
    refusal, untried = _dry_run_pod(cluster, namespace, workload)
    checks.append(pod_security_check(namespace, labels, target.workload, refusal, untried))
    may_update = allowed[Access("update", "networkpolicies", "networking.k8s.io")]
    checks.append(policy_check(objects, service, options, may_update))

    selector = format_selector(workload["spec"]["selector"])
    ready = sorted((p for p in _pods(cluster, namespace, selector) if _ready(p)), key=lambda p: p["metadata"]["name"])
    if not ready:
        checks.append(Check("protocol", "failed", f"no ready pod of {target.workload} ({selector}) to probe",
                            f"check the pods: kubectl get pods -n {namespace} -l {selector}"))
        return checks
    pod = ready[0]
    where = (f"pod {pod['metadata']['name']} port {target.container_port} (container {target.container}, "
             f"probed through {'its IP' if in_cluster else 'a port-forward'})")
    connect, close, refusals = _dialer(api, namespace, pod, target.container_port, in_cluster)
    try:
        verdict = probe(connect, service, close)
    except (OSError, InterceptError) as error:
        checks.append(protocol_check(where, None, str(error)))
        return checks
    if not verdict.speaks and refusals:  # nothing answered: the kubelet says why (nothing listens, mostly)
        checks.append(protocol_check(where, None, refusals[0]))
    else:
        checks.append(protocol_check(where, verdict))
    return checks


def _dialer(api: ApiClient, namespace: str, pod: Obj, port: int, in_cluster: bool
            ) -> tuple[Callable[[], socket.socket], Callable[[socket.socket], None], list[str]]:
    """How to open and close a connection to the pod's port (its IP from inside the cluster, else a
    port-forward), and where a port-forward's failures to reach the port are kept."""
    if in_cluster:  # a refused connection raises at once
        ip = pod["status"]["podIP"]
        return (lambda: socket.create_connection((ip, port), timeout=10)), socket.socket.close, []
    from intercept.kube.portforward import PodPort

    forwards = PodPort(api, namespace, pod["metadata"]["name"], port)
    return forwards.connect, forwards.close, forwards.errors


def _pods(cluster: Cluster, namespace: str, selector: str | None = None) -> list[Obj]:
    try:
        return cluster.list("Pod", namespace, label_selector=selector)[0]
    except ClusterError as error:
        log.info("cannot list the pods of %s: %s", namespace, error)
        return []


def _namespace_labels(cluster: Cluster, namespace: str) -> tuple[dict[str, str] | None, bool]:
    """The namespace's labels (None: may not read them), and whether it exists."""
    try:
        return dict(cluster.get("Namespace", "", namespace)["metadata"].get("labels") or {}), True
    except NotFound:
        return None, False
    except ClusterError as error:
        log.info("cannot read namespace %s: %s", namespace, error)
        return None, True


def _dry_run_pod(cluster: Cluster, namespace: str, workload: Obj) -> tuple[str | None, str | None]:
    """One pod of ``workload``'s template, created with dryRun=All: (the refusal, or None; why it could not be tried)."""
    template = copy.deepcopy(workload["spec"]["template"])
    name = workload["metadata"]["name"]
    meta = template.get("metadata") or {}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": f"{name}-doctor-", "namespace": namespace, "labels": meta.get("labels") or {},
                        "annotations": meta.get("annotations") or {}},
           "spec": template["spec"]}
    # a StatefulSet's controller adds a volume for each claim template: so does this pod
    for claim in workload["spec"].get("volumeClaimTemplates") or []:
        claim_name = claim["metadata"]["name"]
        pod["spec"].setdefault("volumes", []).append(
            {"name": claim_name, "persistentVolumeClaim": {"claimName": f"{claim_name}-{name}-0"}})
    try:
        cluster.create(pod, dry_run=True)
    except AccessDenied as error:
        return None, f"could not dry-run a pod: {error.detail or error}"
    except ClusterError as error:
        if error.status in (400, 403, 422):
            return error.detail or str(error), None
        return None, f"could not dry-run a pod: {error}"
    return None, None


def _ready(pod: Obj) -> bool:
    status = pod.get("status") or {}
    return not pod["metadata"].get("deletionTimestamp") and bool(status.get("podIP")) and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
