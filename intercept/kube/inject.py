"""Inject the agent into a workload's manifests, and restore them: pure functions over dicts.

The objects are the JSON form of Kubernetes objects, as ``yaml.safe_load_all`` or the API
server give them. Nothing here does I/O; the cluster path (``kube/apply.py``) and the
offline path (``intercept inject -f`` / ``intercept restore -f``) call the same functions.

What :func:`inject` changes, and nothing else:

- the workload (Deployment, StatefulSet, ReplicaSet) behind the Service: the agent
  container is appended, a volume holding the Secret ``intercept-<workload>`` is
  appended, and for a *named* targetPort the app container's port is renamed (and its
  probes that used the name follow it) so that the name now resolves to the agent;
- the Service, for a *numeric* targetPort: that port's targetPort points at the agent;
- for several Service ports (``InjectOptions.service_ports``), all of the above for each:
  the agent listens once per app port (9900, 9901, ...), each listener forwarding to its own;
- NetworkPolicies that admit the app's port but not the agent's: the rules that admit
  the app's port also admit the agent's (refused with ``no_policy_changes``);
- with ``replace_by`` (``intercept start --replace``), the app container itself: it runs
  the stand-in (:data:`STAND_IN_COMMAND`, from the agent image) instead of the app, with
  its name, env, envFrom, volumeMounts, ports, resources and securityContext kept, and
  without what belongs to the app's own program (args, workingDir, probes, lifecycle).

A workload may also be named directly (``deployment/NAME``, ``statefulset/NAME``: a queue
worker with no Service, replaced only): then no Service or policy is changed.

Invariants, kept by the tests:

- ``restore(inject(x)) == x`` for every list of objects ``x``: each changed object
  carries, in the annotation :data:`ANNOTATION`, the original value of every field that
  was replaced and the name of every list item that was added.
- ``inject(inject(x)) == inject(x)``: the injection is computed from the restored
  original, never from an injected object, so it is a function of the original and the
  options only. Other options (another agent image) upgrade the agent in place.
- Input objects are never mutated; unchanged objects are returned as they came.

Annotation format (``intercept.dev/original``), compact JSON, the record's keys sorted and
the recorded values' keys in their original order::

    {"version": 1,
     "role": "workload" | "service" | "policy",
     "replaced": [{"path": [...], "value": <original>} | {"path": [...], "absent": true}],
     "added": [{"path": [...], "name": "<list item name>", "listWasAbsent": bool}],
     "annotationsWereAbsent": bool,
     ...role specific: "agentVersion", "upstream", "portName" (workload; with several
                       ports also "upstreams" and "portNames", one per listener, in order),
                       "replacedBy" (workload, only while a developer replaces the app container),
                       "workload" (service), "workloads" (policy)}

A path is a list of keys, where ``{"name": N}`` stands for the list item named N (paths
survive containers being reordered).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from intercept import __version__, agentconfig
from intercept.errors import InjectError, ResolveError, UsageError
from intercept.routing.fence import Fence

log = logging.getLogger(__name__)

Obj = dict[str, Any]

AGENT_CONTAINER = "intercept-agent"
ANNOTATION = "intercept.dev/original"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "ReplicaSet")

AGENT_HTTP_PORT = 9900
AGENT_SSH_PORT = 9922
AGENT_HTTP_PORT_NAME = "intercept-http"
AGENT_SSH_PORT_NAME = "intercept-ssh"
CREDENTIALS_VOLUME = "intercept-credentials"
CREDENTIALS_DIR = "/var/run/intercept"
CREDENTIALS_KEY = "credentials.json"
# The sandboxes' routes to this workload: a ConfigMap named like the Secret (routes_name),
# optional (absent until a sandbox is created), mounted beside the credentials.
ROUTES_VOLUME = "intercept-routes"
ROUTES_DIR = "/var/run/intercept-routes"
ROUTES_KEY = "routes.json"
DEVELOPERS_KEY = "developers.json"  # the routes of the developers intercepting it (intercept.routing.developers)
# The namespace's routes authority: the key that signs pushed routes (intercept sandbox holds
# it; its public half is in each routes ConfigMap). A dot, so that no workload's Secret
# (intercept-<workload>) can have its name.
AUTHORITY_SECRET = "intercept.routes-authority"
AUTHORITY_KEY = "ed25519.key"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MOUNTS_ENV = "INTERCEPT_MOUNTS"  # read by intercept.agent.files.mounts_from_env
# The user the agent runs as when the pod does not name a non-root one (distroless "nonroot").
AGENT_USER = 65532
AGENT_RESOURCES = {
    "requests": {"cpu": "10m", "memory": "32Mi"},
    "limits": {"cpu": "500m", "memory": "128Mi"},
}

_RECORD_VERSION = 1
_PORT_NAME_MAX = 15  # IANA_SVC_NAME
_DNS_LABEL_MAX = 63
_DNS_SUBDOMAIN_MAX = 253
_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
_POD_SPEC = ("spec", "template", "spec")

# What the app container runs while a developer replaces it: a process of the agent image
# (already on the node, and present whatever the app's image holds: distroless has no
# sleep) that does nothing until SIGTERM (intercept.agent.standin).
STAND_IN_COMMAND = ("intercept", "stand-in")
# The app container's fields that belong to its own program, and go while it is replaced:
# arguments to a command it no longer runs, a directory the agent image may not have (and
# could not create under readOnlyRootFilesystem), probes of ports nothing listens on, hooks
# that exec the app's binaries. Its name, env, envFrom, volumeMounts, ports, resources and
# securityContext stay: the pod keeps its shape, the agent's copies of them stay true, and a
# resourceFieldRef naming the container still resolves.
_STAND_IN_DROPS = ("args", "workingDir", *_PROBES, "lifecycle")
# How a workload is named instead of a Service (intercept start deployment/worker --replace).
WORKLOAD_REFS = {"deployment": "Deployment", "statefulset": "StatefulSet"}
_DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"


@dataclass(frozen=True)
class InjectOptions:
    """How to inject: the agent image, the agent's pod-wide settings (``outbound`` is its
    ``allow_outbound``; :mod:`intercept.agentconfig`) and the injection's own choices."""

    image: str
    agent_version: str = __version__
    service_port: str | int | None = None
    # Several Service ports (names or numbers) to put the agent in front of; () : ``service_port`` alone.
    service_ports: tuple[str | int | None, ...] = ()
    no_policy_changes: bool = False
    outbound: bool = True
    hold_timeout: float = 10.0
    forwarded_headers: bool = True  # the agent adds the client's address (X-Forwarded-For, Forwarded)
    outbound_allow: tuple[str, ...] = ()  # the agent's outbound fence: HOST[:PORT] rules (intercept.routing.fence)
    outbound_deny: tuple[str, ...] = ()
    # The developer whose local process replaces the app container (intercept start --replace):
    # it runs the stand-in meanwhile. Not pod-wide: it comes and goes with that developer.
    replace_by: str | None = None

    def __post_init__(self) -> None:
        if not self.image or any(c.isspace() for c in self.image):
            raise UsageError(f"invalid agent image {self.image!r}: pass --agent-image REPOSITORY:TAG")
        if self.replace_by is not None and not (self.replace_by.isprintable() and self.replace_by.strip()):
            raise UsageError(f"invalid developer name {self.replace_by!r} for --replace: pass --name NAME")
        Fence.parse(self.outbound_allow, self.outbound_deny)  # a bad rule fails here, not in the pod
        if self.hold_timeout <= 0:
            raise UsageError(f"invalid hold timeout {self.hold_timeout!r}: it must be positive")

    def wanted_ports(self) -> tuple[str | int | None, ...]:
        """The Service ports to put the agent in front of (None: the Service's only port)."""
        return self.service_ports or (self.service_port,)

    def pod_wide(self) -> dict[str, object]:
        """The agent's pod-wide settings these options make, by :mod:`intercept.agentconfig` key."""
        return {"hold_timeout": self.hold_timeout, "allow_outbound": self.outbound,
                "outbound_allow": self.outbound_allow, "outbound_deny": self.outbound_deny,
                "forwarded_headers": self.forwarded_headers}


@dataclass(frozen=True)
class Target:
    """What a Service port leads to: the workload, its app container and the port it serves.

    For a workload named directly (``deployment/worker``), ``service`` is that name, there is
    no Service port (``service_port`` 0), and the container is the pod's default one.
    """

    service: str
    namespace: str | None
    service_port: int
    service_port_name: str | None
    target_port: str | int  # as the Service states it (defaulted to the port): name or number
    workload_kind: str
    workload_name: str
    container: str
    container_port: int

    @property
    def workload(self) -> str:
        """``Kind/name``, the key that records and :func:`restore` use."""
        return f"{self.workload_kind}/{self.workload_name}"

    @property
    def named(self) -> bool:
        """True when the Service reaches the app by port name (taken over by renaming)."""
        return isinstance(self.target_port, str)

    @property
    def has_service(self) -> bool:
        """False for a workload named directly: no Service, no traffic."""
        return not is_workload_ref(self.service)


# How a developer names each pod-wide option of InjectOptions (on intercept start and inject).
POD_WIDE_FLAGS = {"image": "--agent-image", "outbound": "--no-outbound", "forwarded_headers": "--no-forwarded-headers",
                  "hold_timeout": "--hold-timeout", "outbound_allow": "--outbound-allow", "outbound_deny": "--outbound-deny"}


def running_options(workload: Obj, options: InjectOptions) -> InjectOptions:
    """``options`` with the image and the pod-wide settings of the agent injected in
    ``workload``, read back from its container (:func:`intercept.agentconfig.pod_wide`)."""
    container = _container(workload, AGENT_CONTAINER)
    values = agentconfig.pod_wide(container.get("env") or [])
    return dataclasses.replace(
        options, image=container.get("image") or options.image,
        agent_version=(_record(workload) or {}).get("agentVersion", options.agent_version),
        outbound=values["allow_outbound"], hold_timeout=values["hold_timeout"],
        forwarded_headers=values["forwarded_headers"], outbound_allow=tuple(values["outbound_allow"]),
        outbound_deny=tuple(values["outbound_deny"]), replace_by=replaced_by(workload))


def replaced_by(workload: Obj) -> str | None:
    """The developer whose local process replaces ``workload``'s app container, or None."""
    return (_record(workload) or {}).get("replacedBy")


def running_upstream(workload: Obj) -> tuple[str, int] | None:
    """The app container and port the agent injected in ``workload`` serves, or None."""
    record = _record(workload)
    return (record["upstream"]["container"], record["upstream"]["port"]) if record else None


def is_workload_ref(name: str | None) -> bool:
    """Whether ``name`` names a workload (``deployment/NAME``, ``statefulset/NAME``), not a Service."""
    kind, sep, _ = (name or "").partition("/")
    return bool(sep) and kind.lower() in WORKLOAD_REFS


def pod_wide_differences(running: InjectOptions, wanted: InjectOptions,
                         named: Iterable[str]) -> list[tuple[str, str, str]]:
    """Each pod-wide option among ``named`` (InjectOptions fields) that ``wanted`` sets
    otherwise than ``running`` does: ``(flag, running value, wanted value)``, in words."""
    def shown(key: str, value: object) -> str:
        if key == "outbound":
            return "outbound connections allowed" if value else "--no-outbound"
        if key == "forwarded_headers":
            return "forwarded headers" if value else "--no-forwarded-headers"
        if isinstance(value, tuple):
            return " ".join(value) or "none"
        return str(value)

    return [(POD_WIDE_FLAGS[key], shown(key, getattr(running, key)), shown(key, getattr(wanted, key)))
            for key in POD_WIDE_FLAGS if key in named and getattr(running, key) != getattr(wanted, key)]


def check_serves(workload: Obj, target: Target) -> None:
    """Raise :class:`InjectError` unless the agent injected in ``workload`` serves ``target``'s port."""
    _takeover_name(workload, target)


def served_ports(workload: Obj) -> list[int]:
    """The app (container) ports the agent injected in ``workload`` is in front of, in order."""
    record = _record(workload) or {}
    return [u["port"] for u in _upstreams(record)]


def _upstreams(record: Obj) -> list[Obj]:
    return record.get("upstreams") or ([record["upstream"]] if "upstream" in record else [])


def _port_names_of(record: Obj) -> list[str | None]:
    return record.get("portNames") or [record.get("portName")]


def secret_name(workload_name: str) -> str:
    """The Secret holding the agent's host key and token: ``intercept-<workload>``.

    Shortened with a hash when the name would exceed a DNS subdomain's 253 characters.
    """
    name = f"intercept-{workload_name}"
    if len(name) <= _DNS_SUBDOMAIN_MAX:
        return name
    digest = hashlib.sha256(workload_name.encode()).hexdigest()[:10]
    return f"{name[: _DNS_SUBDOMAIN_MAX - 11].rstrip('-.')}-{digest}"


def routes_name(workload_name: str) -> str:
    """The ConfigMap of the sandboxes' routes to a workload: named like its Secret."""
    return secret_name(workload_name)


def is_injected(obj: Obj) -> bool:
    """True when ``obj`` carries an intercept record (a workload, Service or policy we changed)."""
    return _record(obj) is not None


# --------------------------------------------------------------------------- resolve


def resolve(objects: list[Obj], service_name: str, service_port: str | int | None = None) -> Target:
    """Service -> selector -> the one workload whose pods it selects -> container and port.

    Works on injected objects too: it sees through the records to the originals.
    Raises :class:`ResolveError` for every ambiguity and dead end, naming the candidates
    and the flag that picks one. ``deployment/NAME`` or ``statefulset/NAME`` names a
    workload instead (:func:`resolve_workload`).
    """
    view = [restore_object(o) for o in objects]
    if is_workload_ref(service_name):
        return resolve_workload(objects, service_name)  # the records say which container an agent serves
    service = _find_service(view, service_name)
    _check_interceptable(service)
    port = service["spec"]["ports"][_choose_service_port(service, service_port)]
    workload = _find_workload(view, service)
    container, container_port = _find_container_port(workload, service, port)
    return Target(
        service=service_name,
        namespace=_namespace(service),
        service_port=port["port"],
        service_port_name=port.get("name"),
        target_port=_target_port(port),
        workload_kind=workload["kind"],
        workload_name=workload["metadata"]["name"],
        container=container["name"],
        container_port=container_port,
    )


def resolve_workload(objects: list[Obj], ref: str) -> Target:
    """``deployment/NAME`` or ``statefulset/NAME`` -> the workload, its default container
    (``kubectl.kubernetes.io/default-container``, else the first) and that container's first
    TCP port (0 when it declares none: nothing reaches the agent of a workload named so).

    An agent in place keeps the container and port it was injected for (its first)."""
    return _workload_targets(objects, ref)[0]


def _workload_targets(objects: list[Obj], ref: str) -> list[Target]:
    """:func:`resolve_workload`, and with an agent in place one target per app port it is in
    front of, in its order (one injected for several ports of a Service keeps them all)."""
    kind_word, _, name = ref.partition("/")
    kind = WORKLOAD_REFS[kind_word.lower()]
    found = [o for o in objects if o.get("kind") == kind and _name(o) == name]
    if not found:
        known = ", ".join(sorted(_name(o) for o in objects if o.get("kind") == kind)) or "none"
        raise ResolveError(f"no {kind} named {name!r} in the manifests ({kind}s: {known}); check the name, "
                           "or pick the namespace with -n NAMESPACE")
    if len(found) > 1:
        raise ResolveError(f"several {kind}s named {name!r}: pass the manifests of one namespace only")
    workload = found[0]
    containers = _pod_spec(workload).get("containers") or []
    if not containers:
        raise ResolveError(f"{_ref(workload)} has no containers to replace")
    record = _record(workload)
    if record is not None:
        upstreams = [(u["container"], u["port"]) for u in _upstreams(record)]
    else:
        default = ((workload["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get(_DEFAULT_CONTAINER)
        chosen = next((c for c in containers if c["name"] == default), containers[0])
        port = next((p["containerPort"] for p in chosen.get("ports") or [] if p.get("protocol", "TCP") == "TCP"), 0)
        upstreams = [(chosen["name"], port)]
    return [Target(service=ref, namespace=_namespace(workload), service_port=0, service_port_name=None, target_port=port,
                   workload_kind=kind, workload_name=name, container=container, container_port=port)
            for container, port in upstreams]


def resolve_ports(objects: list[Obj], service_name: str, wanted: Iterable[str | int | None]) -> list[Target]:
    """:func:`resolve` for each Service port of ``wanted`` (None: the only one), each once.
    A workload named directly (``deployment/NAME``) has no Service port to want: its targets
    are those of :func:`_workload_targets`."""
    if is_workload_ref(service_name):
        return _workload_targets(objects, service_name)
    targets: list[Target] = []
    for port in wanted:
        target = resolve(objects, service_name, port)
        if all(t.service_port != target.service_port for t in targets):
            targets.append(target)
    return targets


def _find_service(view: list[Obj], name: str) -> Obj:
    services = [o for o in view if o.get("kind") == "Service"]
    found = [s for s in services if _name(s) == name]
    if not found:
        known = ", ".join(sorted({_name(s) for s in services})) or "none"
        raise ResolveError(f"no Service named {name!r} in the manifests (Services: {known})")
    if len(found) > 1:
        where = ", ".join(repr(_namespace(s)) for s in found)
        raise ResolveError(
            f"several Services named {name!r} (namespaces {where}): "
            "pass the manifests of one namespace only"
        )
    return found[0]


def _check_interceptable(service: Obj) -> None:
    spec = service.get("spec") or {}
    name = _name(service)
    if spec.get("type") == "ExternalName":
        raise ResolveError(
            f"Service {name!r} is of type ExternalName (it points at "
            f"{spec.get('externalName', '?')!r} outside the cluster): there are no pods to "
            "intercept; intercept the Service of the workload that serves it"
        )
    if spec.get("clusterIP") == "None" or "None" in (spec.get("clusterIPs") or []):
        raise ResolveError(
            f"Service {name!r} is headless (clusterIP: None): its clients connect to pod "
            "addresses directly, so the traffic cannot be taken over; intercept a Service "
            "with a cluster IP that selects the same pods"
        )
    if not spec.get("selector"):
        raise ResolveError(
            f"Service {name!r} has no selector (its endpoints are managed by hand): "
            "intercept a Service that selects the workload's pods"
        )
    if not spec.get("ports"):
        raise ResolveError(f"Service {name!r} declares no ports: there is nothing to intercept")


def _describe_service_port(port: Obj) -> str:
    label = port.get("name") or "(unnamed)"
    return f"{label} ({port['port']} -> {_target_port(port)})"


def _choose_service_port(service: Obj, wanted: str | int | None) -> int:
    ports = service["spec"]["ports"]
    name = _name(service)
    candidates = ", ".join(_describe_service_port(p) for p in ports)
    if wanted is None or wanted == "":
        if len(ports) > 1:
            raise ResolveError(
                f"Service {name!r} has several ports: {candidates}; "
                "pick one with --service-port NAME|NUMBER"
            )
        index = 0
    else:
        by_number = isinstance(wanted, int) or str(wanted).isdigit()
        matches = [
            i
            for i, p in enumerate(ports)
            if (p["port"] == int(wanted) if by_number else p.get("name") == wanted)
        ]
        if not matches:
            raise ResolveError(
                f"Service {name!r} has no port {wanted!r}; its ports: {candidates}; "
                "pass one of them to --service-port"
            )
        # One number may be served over UDP and TCP (DNS, HTTP/3 beside HTTPS): take the TCP one.
        index = next((i for i in matches if ports[i].get("protocol", "TCP") == "TCP"), matches[0])
    protocol = ports[index].get("protocol", "TCP")
    if protocol != "TCP":
        raise ResolveError(
            f"Service {name!r} port {_describe_service_port(ports[index])} is {protocol}: "
            "only TCP ports can be intercepted; pick another with --service-port"
        )
    return index


def _find_workload(view: list[Obj], service: Obj) -> Obj:
    selector = service["spec"]["selector"]
    shown = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    ns = _namespace(service)
    selected = [
        o
        for o in view
        if o.get("kind") in WORKLOAD_KINDS
        and _namespace(o) == ns
        and all(_pod_labels(o).get(k) == v for k, v in selector.items())
    ]
    # A Deployment's ReplicaSets carry its pod template; the Deployment is the one to change.
    candidates = [o for o in selected if not _controlled_by_deployment(o)]
    # A DaemonSet's (or a bare Pod's) pods: say that the kind is the dead end, not the manifests.
    others = [
        o for o in view
        if o.get("kind") not in WORKLOAD_KINDS and _namespace(o) == ns
        and all(_labels_of_pods(o).get(k) == v for k, v in selector.items())
    ]
    if not candidates and others:
        raise ResolveError(
            f"Service {_name(service)!r} selects {shown}, the pods of "
            f"{', '.join(_ref(o) for o in others)}: intercept can inject its agent "
            "only into Deployments, StatefulSets and ReplicaSets; intercept a Service of one of those"
        )
    if not candidates:
        owned = [_ref(o) for o in selected]
        hint = f" ({', '.join(owned)} is owned by a Deployment not in the manifests)" if owned else ""
        raise ResolveError(
            f"Service {_name(service)!r} selects {shown} but no Deployment, StatefulSet or "
            f"ReplicaSet in the manifests has pods with those labels{hint}; "
            "include the workload's manifest"
        )
    if len(candidates) > 1:
        raise ResolveError(
            f"Service {_name(service)!r} selects {shown}, which matches the pods of several "
            f"workloads: {', '.join(_ref(o) for o in candidates)}; intercept a Service whose "
            "selector matches one workload only (narrow its selector)"
        )
    return candidates[0]


def _find_container_port(workload: Obj, service: Obj, port: Obj) -> tuple[Obj, int]:
    containers = _pod_spec(workload).get("containers") or []
    target = _target_port(port)
    tcp = [
        (c, p)
        for c in containers
        for p in c.get("ports") or []
        if p.get("protocol", "TCP") == "TCP"
    ]
    if isinstance(target, str):
        # As the endpoints controller resolves a named targetPort: first container in order.
        for c, p in tcp:
            if p.get("name") == target:
                return c, p["containerPort"]
        declared = ", ".join(
            f"{c['name']}:{p.get('name') or '(unnamed)'}={p['containerPort']}" for c, p in tcp
        ) or "none"
        raise ResolveError(
            f"Service {_name(service)!r} port {_describe_service_port(port)} targets the port "
            f"name {target!r}, which no container of {_ref(workload)} declares (ports: "
            f"{declared}); fix the name or pick another port with --service-port"
        )
    for c, p in tcp:
        if p["containerPort"] == target:
            return c, target
    if len(containers) == 1:
        # Declaring a containerPort is optional; a single container is the one listening.
        return containers[0], target
    raise ResolveError(
        f"Service {_name(service)!r} port {_describe_service_port(port)} targets port "
        f"{target}, which no container of {_ref(workload)} declares, and the pod has several "
        f"containers ({', '.join(c['name'] for c in containers)}); declare containerPort "
        f"{target} on the container that serves it"
    )


# --------------------------------------------------------------------------- inject


def inject(objects: list[Obj], service_name: str, options: InjectOptions) -> list[Obj]:
    """Return ``objects`` with the agent injected behind ``service_name``.

    All objects come back in the same order, unchanged ones as they came. Raises
    :class:`ResolveError` when the Service does not lead to one workload and port, and
    :class:`InjectError` when the injection cannot be done safely (a NetworkPolicy would
    need a change under ``no_policy_changes``, an agent already serves another port, ...).
    """
    targets = resolve_ports(objects, service_name, options.wanted_ports())
    target = targets[0]
    result = list(objects)

    wi = _index_of(objects, target.workload_kind, target.workload_name, target.namespace)
    current = objects[wi]
    original = restore_object(current)
    # one listener per app port; Service ports that reach the same app port share it
    fronts = list({t.container_port: t for t in reversed(targets)}.values())[::-1]
    # an agent in front of some of these ports may be put in front of more (none dropped)
    extending = is_injected(current) and set(served_ports(current)) < {t.container_port for t in fronts}
    takeovers = [_takeover_name(current, t, extending) for t in fronts]
    workload, agent = _inject_workload(original, fronts, takeovers, options)
    if workload != current:
        log.info("%s: agent %s", _ref(current), "updated" if is_injected(current) else "added")
        result[wi] = workload

    if not target.has_service:
        return result  # a workload named directly: no Service, no traffic, no policy to widen
    numeric = [t for t in targets if not t.named]
    if numeric:
        si = _index_of(objects, "Service", target.service, target.namespace)
        service = _redirect_service(restore_object(objects[si]), numeric, agent)
        if service != objects[si]:
            for t in numeric:
                log.info("%s: port %s now targets the agent's port %d", _ref(service),
                         t.service_port, agent.front(t).http_port)
            result[si] = service

    refused: dict[str, tuple[Target, _Front]] = {}
    for i, obj in enumerate(objects):
        if obj.get("kind") != "NetworkPolicy" or _namespace(obj) != target.namespace:
            continue
        policy = obj
        for front in agent.fronts:
            # each front's additions on top of the last; the first one's record keeps the original
            changed, admits_more = _admit_agent(policy, original, front.target, front)
            if changed is policy:
                continue
            if admits_more and options.no_policy_changes:
                refused.setdefault(_ref(obj), (front.target, front))
            else:
                log.info("%s: now also admits the agent's port %d", _ref(obj), front.http_port)
                policy = changed
        if policy is not obj:
            result[i] = policy
    if refused:
        first_target, first = next(iter(refused.values()))
        raise InjectError(
            f"{', '.join(refused)} admit{'s' if len(refused) == 1 else ''} only the app's port "
            f"{first_target.container_port} to the pods of {target.workload}, so traffic to the "
            f"agent's port {first.http_port} would be dropped; drop --no-policy-changes to "
            f"let intercept extend it (restored on uninstall), or admit TCP port "
            f"{first.http_port} yourself"
        )
    return result


@dataclass(frozen=True)
class _Front:
    """One of the agent's listeners in a pod: the app port behind it and how it is reached."""

    target: Target  # the (first) Service port that reaches this app port
    http_port: int
    http_port_name: str
    app_port_name: str | None  # the app port's name after injection


@dataclass(frozen=True)
class _Agent:
    """The agent's choices in one pod, which the Service and the policies must follow."""

    fronts: tuple[_Front, ...]
    ssh_port: int

    def front(self, target: Target) -> _Front:
        return next(f for f in self.fronts if f.target.container_port == target.container_port)


def _takeover_name(current: Obj, target: Target, extending: bool = False) -> str | None:
    """The port name the agent takes over: this Service's, or the one an earlier injection took.

    The agent forwards to the app ports it was injected for; a Service on another port is
    refused, unless ``extending`` (an injection for more ports, all of the earlier ones among them).
    """
    record = _record(current)
    if not record:
        return target.target_port if target.named else None
    upstreams = _upstreams(record)
    for upstream, name in zip(upstreams, _port_names_of(record)):
        if (upstream["container"], upstream["port"]) == (target.container, target.container_port):
            return target.target_port if target.named else name
    if extending:
        return target.target_port if target.named else None
    served = ", ".join(f"container {u['container']!r} port {u['port']}" for u in upstreams)
    raise InjectError(
        f"{target.workload} already has an agent for {served}, and Service {target.service!r} "
        f"port {target.service_port} targets container {target.container!r} port {target.container_port}; "
        f"to put the agent in front of it too, start with every port it should serve and --reinject "
        f"(intercept start {target.service} --port SERVICE_PORT:LOCAL_PORT ... --reinject; its pods are replaced), "
        f"or, for another Service, run `intercept uninstall` for the first one first"
    )


def _inject_workload(
    original: Obj, targets: list[Target], takeovers: list[str | None], options: InjectOptions
) -> tuple[Obj, _Agent]:
    workload = copy.deepcopy(original)
    pod = _pod_spec(workload)
    containers = pod["containers"]
    if any(c.get("name") == AGENT_CONTAINER for c in containers):
        raise InjectError(
            f"{_ref(original)} has a container named {AGENT_CONTAINER!r} but no "
            f"{ANNOTATION} annotation to restore from; remove that container by hand, then inject"
        )
    target = targets[0]
    app = next(c for c in containers if c["name"] == target.container)
    replaced: list[Obj] = []

    used_ports = _pod_ports(pod) | {t.container_port for t in targets}
    used_names = _pod_port_names(pod)
    fronts = []
    saved: set[str] = set()  # containers whose ports list is recorded already
    for t, takeover in zip(targets, takeovers):
        owner = next(c for c in containers if c["name"] == t.container)
        owner_path = [*_POD_SPEC, "containers", {"name": owner["name"]}]
        http_port = _free_port(AGENT_HTTP_PORT, used_ports)
        used_ports.add(http_port)
        app_port_name = _port_name(owner, t.container_port)
        if takeover is not None:
            others = [c["name"] for c in containers if c is not owner and takeover in _port_names(c)]
            if others:
                raise InjectError(
                    f"{_ref(original)}: containers {owner['name']!r} and {', '.join(others)} both "
                    f"declare the port name {takeover!r}; give the others another name so that "
                    "the name can be taken over"
                )
            fresh = _fresh_name(f"app-{takeover}", used_names, _PORT_NAME_MAX)
            if owner["name"] not in saved:
                replaced.append({"path": [*owner_path, "ports"], "value": copy.deepcopy(owner["ports"])})
                saved.add(owner["name"])
            owner["ports"] = [dict(p, name=fresh) if p.get("name") == takeover else p for p in owner["ports"]]
            # Probes address ports within their own container: follow the rename there only.
            for key in (*_PROBES, "lifecycle"):
                if key in owner:
                    renamed = _rename_port_refs(owner[key], takeover, fresh)
                    if renamed != owner[key]:
                        if not any(r["path"] == [*owner_path, key] for r in replaced):
                            replaced.append({"path": [*owner_path, key], "value": owner[key]})
                        owner[key] = renamed
            http_name, app_port_name = takeover, fresh
            used_names = (used_names - {takeover}) | {fresh}
        else:
            http_name = _fresh_name(AGENT_HTTP_PORT_NAME, used_names, _PORT_NAME_MAX)
        used_names = used_names | {http_name}
        fronts.append(_Front(t, http_port, http_name, app_port_name))
    ssh_port = _free_port(AGENT_SSH_PORT, used_ports)
    ssh_name = _fresh_name(AGENT_SSH_PORT_NAME, used_names, _PORT_NAME_MAX)
    agent = _Agent(tuple(fronts), ssh_port)

    volume_names = {v.get("name") for v in pod.get("volumes") or []}
    volume = _fresh_name(CREDENTIALS_VOLUME, volume_names, _DNS_LABEL_MAX)
    routes_volume = _fresh_name(ROUTES_VOLUME, volume_names | {volume}, _DNS_LABEL_MAX)
    added = [{"path": [*_POD_SPEC, "containers"], "name": AGENT_CONTAINER, "listWasAbsent": False}]
    for name in (volume, routes_volume):
        added.append({"path": [*_POD_SPEC, "volumes"], "name": name, "listWasAbsent": "volumes" not in pod})
    if "volumes" in pod and pod["volumes"] is None:
        # `volumes:` with nothing after it (a rendered Helm chart): restored as null, not as []
        replaced.append({"path": [*_POD_SPEC, "volumes"], "value": None})
        pod["volumes"] = []
    pod.setdefault("volumes", []).extend([
        {
            "name": volume,
            "secret": {
                "secretName": secret_name(_name(original)),
                "items": [{"key": CREDENTIALS_KEY, "path": CREDENTIALS_KEY}],
                # Readable by whichever non-root user the agent runs as; only the agent mounts it.
                "defaultMode": 0o444,
            },
        },
        {
            "name": routes_volume,
            # optional: until a sandbox routes to this workload there is no ConfigMap
            "configMap": {"name": routes_name(_name(original)), "optional": True, "defaultMode": 0o444},
        },
    ])
    containers.append(_agent_container(original, pod, app, agent, ssh_name, volume, routes_volume, options))
    if options.replace_by is not None:
        _stand_in(app, [*_POD_SPEC, "containers", {"name": app["name"]}], replaced, options)

    record = {
        "role": "workload",
        "agentVersion": options.agent_version,
        "upstream": {"container": target.container, "port": target.container_port},
        "portName": takeovers[0],
        "replaced": replaced,
        "added": added,
    }
    if len(targets) > 1:
        record["upstreams"] = [{"container": t.container, "port": t.container_port} for t in targets]
        record["portNames"] = list(takeovers)
    if options.replace_by is not None:
        record["replacedBy"] = options.replace_by
    _write_record(workload, record, _annotations_absent(original))
    return workload, agent


def _stand_in(app: Obj, app_path: list[Any], replaced: list[Obj], options: InjectOptions) -> None:
    """The app container (already copied into the agent's) turned into the stand-in, in
    place; each field changed recorded once, with its value before injection (a probe that a
    port takeover renamed is recorded already)."""
    recorded = {json.dumps(r["path"]) for r in replaced}

    def record(key: str) -> None:
        path = [*app_path, key]
        if json.dumps(path) in recorded:
            return
        entry = ({"path": path, "value": copy.deepcopy(app[key])} if key in app else {"path": path, "absent": True})
        replaced.append(entry)
        recorded.add(json.dumps(path))

    for key, value in (("image", options.image), ("imagePullPolicy", "IfNotPresent"),
                       ("command", [*STAND_IN_COMMAND, options.replace_by])):
        if app.get(key) != value:
            record(key)
            app[key] = value
    for key in _STAND_IN_DROPS:
        if key in app:
            record(key)
            del app[key]


def _agent_container(
    workload: Obj,
    pod: Obj,
    app: Obj,
    agent: _Agent,
    ssh_name: str,
    volume: str,
    routes_volume: str,
    options: InjectOptions,
) -> Obj:
    mounts = []
    for mount in app.get("volumeMounts") or []:
        path = mount.get("mountPath", "").rstrip("/")
        for own in (CREDENTIALS_DIR, ROUTES_DIR):
            if path == own or path.startswith(own + "/"):
                raise InjectError(
                    f"{_ref(workload)}: container {app['name']!r} mounts {path}, where the agent "
                    f"mounts {own}; move that mount elsewhere"
                )
        copied = dict(mount, readOnly=True)
        copied.pop("mountPropagation", None)  # Bidirectional needs a privileged container
        mounts.append(copied)
    served = _served_paths(pod, app)
    mounts.append({"name": volume, "mountPath": CREDENTIALS_DIR, "readOnly": True})
    mounts.append({"name": routes_volume, "mountPath": ROUTES_DIR, "readOnly": True})

    env = [_copy_env_var(e, app["name"]) for e in app.get("env") or []
           if not e.get("name", "").startswith("INTERCEPT_")]
    env += agentconfig.to_env({
        "listen": tuple(("0.0.0.0", f.http_port) for f in agent.fronts),
        "upstream": tuple(("127.0.0.1", f.target.container_port) for f in agent.fronts),
        "ssh_listen": ("0.0.0.0", agent.ssh_port),
        "credentials": Path(CREDENTIALS_DIR, CREDENTIALS_KEY),
        "routes_file": Path(ROUTES_DIR, ROUTES_KEY),
        "developers_file": Path(ROUTES_DIR, DEVELOPERS_KEY),
        # keep serving a few seconds after SIGTERM, while the endpoints controller removes the pod
        "shutdown_grace": 5.0,
        **options.pod_wide(),
    })
    env += [
        # the app's mounts, served read-only to developers (intercept start --mount, intercept files):
        # where each is seen, and where the agent reads it (the same path here; see agent/files.py)
        *([{"name": MOUNTS_ENV, "value": json.dumps(served)}] if served else []),
        *({"name": f"{MOUNTS_ENV[:-1]}_{i}", "value": path} for i, path in enumerate(served)),
    ]

    container: Obj = {
        "name": AGENT_CONTAINER,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["intercept", "agent"],
        "ports": [
            *({"name": f.http_port_name, "containerPort": f.http_port, "protocol": "TCP"} for f in agent.fronts),
            {"name": ssh_name, "containerPort": agent.ssh_port, "protocol": "TCP"},
        ],
        "env": env,
    }
    if app.get("envFrom"):
        container["envFrom"] = copy.deepcopy(app["envFrom"])
    container.update(
        {
            "volumeMounts": mounts,
            "readinessProbe": {"tcpSocket": {"port": agent.fronts[0].http_port}, "periodSeconds": 5},
            "resources": copy.deepcopy(AGENT_RESOURCES),
            "securityContext": agent_security_context(pod, app),
        }
    )
    return container


def _served_paths(pod: Obj, app: Obj) -> list[str]:
    """The app container's mount paths, and the service account token's directory, which
    the ServiceAccount admission adds to every container (the agent's too) unless the pod
    opts out."""
    served: list[str] = []
    for mount in app.get("volumeMounts") or []:
        path = (mount.get("mountPath") or "").rstrip("/")
        if path.startswith("/") and path not in served:
            served.append(path)
    covered = any(SERVICE_ACCOUNT_DIR == p or SERVICE_ACCOUNT_DIR.startswith(p + "/") for p in served)
    if pod.get("automountServiceAccountToken") is not False and not covered:
        served.append(SERVICE_ACCOUNT_DIR)
    return served


def _copy_env_var(var: Obj, app_name: str) -> Obj:
    var = copy.deepcopy(var)
    ref = (var.get("valueFrom") or {}).get("resourceFieldRef")
    if ref is not None and not ref.get("containerName"):
        # Without a name it would report the agent's own limits, not the app's.
        ref["containerName"] = app_name
    return var


def agent_security_context(pod: Obj, app: Obj) -> Obj:
    """Pod Security "restricted", as the same user as the app where that is non-root.

    Sharing the app's user lets the agent read the files of the mounts it copies.
    """
    app_sc = app.get("securityContext") or {}
    pod_sc = pod.get("securityContext") or {}
    uid = app_sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = app_sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    if not uid:  # unset or root
        uid, gid = AGENT_USER, AGENT_USER
    context: Obj = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if gid is not None:
        context["runAsGroup"] = gid
    return context


def _redirect_service(original: Obj, targets: list[Target], agent: _Agent) -> Obj:
    service = copy.deepcopy(original)
    ports = service["spec"]["ports"]
    for target in targets:
        index = next(
            i for i, p in enumerate(ports)
            if p["port"] == target.service_port and p.get("name") == target.service_port_name
        )
        ports[index]["targetPort"] = agent.front(target).http_port
    record = {
        "role": "service",
        "workload": target.workload,
        "replaced": [{"path": ["spec", "ports"], "value": original["spec"]["ports"]}],
        "added": [],
    }
    _write_record(service, record, _annotations_absent(original))
    return service


# --------------------------------------------------------------------------- network policies


def _admit_agent(
    current: Obj, original_workload: Obj, target: Target, agent: _Front
) -> tuple[Obj, bool]:
    """``current`` with every rule that reaches the app's port also reaching the agent's.

    Returns the policy and whether it admits more than before; ``current`` itself when
    nothing needs to change (when only the record changes, it admits nothing more). Whether a rule needs the
    agent's port is decided on the original policy; the ports are added to the current
    one, so other workloads' additions stay. Named ports resolve against the pod as
    NetworkPolicies do: before injection the app port's name, after it the agent's.
    ``current`` may hold another front's additions already (one call per listener).
    """
    original = restore_object(current)
    labels = _pod_labels(original_workload)
    old_name = _port_name(_container(original_workload, target.container), target.container_port)
    spec = original.get("spec") or {}
    types = spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec else ["Ingress"])

    additions: dict[tuple[str, int], list[Obj]] = {}
    for section in ("ingress", "egress"):
        if section.capitalize() not in types:
            continue
        if section == "ingress" and not _selects(spec.get("podSelector") or {}, labels):
            continue
        for index, rule in enumerate(spec.get(section) or []):
            if section == "egress" and not _may_reach(rule.get("to"), labels):
                continue
            ports = rule.get("ports")
            if not _admits(ports, target.container_port, old_name):
                continue
            extra = []
            if not _admits(ports, agent.http_port, agent.http_port_name):
                extra.append({"port": agent.http_port, "protocol": "TCP"})
            renamed = agent.app_port_name != old_name
            if renamed and not _admits(ports, target.container_port, agent.app_port_name):
                # The app's port was renamed: keep admitting direct traffic to it by its new name.
                extra.append({"port": agent.app_port_name, "protocol": "TCP"})
            if extra:
                additions[(section, index)] = extra
    if not additions:
        return current, False

    policy = copy.deepcopy(current)
    admits_more = False
    for (section, index), extra in additions.items():
        rule = policy["spec"][section][index]
        new = [e for e in extra if e not in rule["ports"]]
        admits_more = admits_more or bool(new)
        rule["ports"] = rule["ports"] + new
    record = _record(current)
    workloads = record["workloads"] if record else []
    if target.workload not in workloads:
        workloads = [*workloads, target.workload]
    replaced = record["replaced"] if record else []
    recorded = {tuple(r["path"]) for r in replaced}
    for section in sorted({s for s, _ in additions}):
        if ("spec", section) not in recorded:
            replaced = [*replaced, {"path": ["spec", section], "value": spec[section]}]
    new_record = {"role": "policy", "workloads": workloads, "replaced": replaced, "added": []}
    absent = record["annotationsWereAbsent"] if record else _annotations_absent(current)
    _write_record(policy, new_record, absent)
    return (policy, admits_more) if policy != current else (current, False)


def _admits(ports: list[Obj] | None, number: int, name: str | None) -> bool:
    """Whether a rule's ``ports`` admit TCP ``number`` (declared in the pod as ``name``)."""
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        port = entry.get("port")
        if port is None:
            return True
        if isinstance(port, str) and not port.isdigit():
            if port == name:
                return True
            continue
        if int(port) <= number <= int(entry.get("endPort", port)):
            return True
    return False


def _may_reach(peers: list[Obj] | None, labels: dict[str, str]) -> bool:
    """Whether an egress rule's ``to`` can include the pods (ipBlocks are taken as outside)."""
    if not peers:
        return True
    for peer in peers:
        if "podSelector" in peer:
            if _selects(peer["podSelector"] or {}, labels):
                return True
        elif "namespaceSelector" in peer:
            return True
    return False


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a pod's labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# --------------------------------------------------------------------------- restore


def restore(objects: list[Obj], workload: str | None = None) -> list[Obj]:
    """Return ``objects`` with every intercept change undone, exactly; others as they came.

    With ``workload`` (``"Deployment/name"``), undo only what was done for that workload:
    the workload, the Services pointed at its agent, and the policies no other agent
    still needs (a shared policy keeps the agent port until its last agent goes).
    """
    if workload is None:
        return [restore_object(o) for o in objects]
    result = []
    for obj in objects:
        record = _record(obj)
        if record is None:
            result.append(obj)
        elif record["role"] == "workload":
            result.append(restore_object(obj) if _key(obj) == workload else obj)
        elif record["role"] == "service":
            result.append(restore_object(obj) if record["workload"] == workload else obj)
        elif workload not in record["workloads"]:
            result.append(obj)
        elif record["workloads"] == [workload]:
            result.append(restore_object(obj))
        else:
            kept = copy.deepcopy(obj)
            rest = dict(record, workloads=[w for w in record["workloads"] if w != workload])
            absent = rest.pop("annotationsWereAbsent")
            rest.pop("version")
            _write_record(kept, rest, absent)
            result.append(kept)
    return result


def restore_object(obj: Obj) -> Obj:
    """One object as it was before injection; ``obj`` itself when it carries no record."""
    record = _record(obj)
    if record is None:
        return obj
    restored = copy.deepcopy(obj)
    annotations = restored["metadata"]["annotations"]
    del annotations[ANNOTATION]
    if not annotations and record["annotationsWereAbsent"]:
        del restored["metadata"]["annotations"]
    for item in record["added"]:
        parent, key = _parent(restored, item["path"], obj)
        kept = [x for x in parent.get(key) or [] if x.get("name") != item["name"]]
        if not kept and item["listWasAbsent"]:
            parent.pop(key, None)
        else:
            parent[key] = kept
    for item in record["replaced"]:
        parent, key = _parent(restored, item["path"], obj)
        if item.get("absent"):
            parent.pop(key, None)
        else:
            parent[key] = copy.deepcopy(item["value"])
    return restored


def _parent(root: Obj, path: list[Any], obj: Obj) -> tuple[Any, Any]:
    node: Any = root
    for step in path[:-1]:
        if isinstance(step, dict):
            node = next((x for x in node if x.get("name") == step["name"]), None)
        else:
            node = node.get(step) if isinstance(node, dict) else None
        if node is None:
            raise InjectError(
                f"cannot restore {_ref(obj)}: {'.'.join(_show(s) for s in path)} is gone "
                f"since injection; edit it by hand and remove the {ANNOTATION} annotation"
            )
    return node, path[-1]


def _show(step: Any) -> str:
    return f"[{step['name']}]" if isinstance(step, dict) else str(step)


# --------------------------------------------------------------------------- describe


def describe_changes(before: list[Obj], after: list[Obj]) -> list[str]:
    """One line per object that :func:`inject` or :func:`restore` changed, for the CLI to print."""
    lines = []
    for old, new in zip(before, after):
        if old == new:
            continue
        record = _record(new)
        if record is None:
            lines.append(f"{_ref(new)}: restored")
        elif record["role"] == "workload":
            agent = _container(new, AGENT_CONTAINER)
            ups = _upstreams(record)
            if not is_injected(old) or _container(old, AGENT_CONTAINER) != agent:
                ports = ", ".join(f"{p['name']}={p['containerPort']}" for p in agent["ports"])
                verb = "agent updated" if is_injected(old) else "agent added"
                forwards = ", ".join(f"{up['container']}:{up['port']}" for up in ups)
                lines.append(f"{_ref(new)}: {verb} ({agent['image']}; {ports}; forwards to {forwards})")
            by, was = record.get("replacedBy"), replaced_by(old)
            if by != was:
                lines.append(f"{_ref(new)}: container {ups[0]['container']} " + (
                    f"replaced by {by}'s local process (it runs the stand-in until they leave)" if by
                    else "runs the app again"))
        elif record["role"] == "service":
            lines.append(f"{_ref(new)}: now targets the agent of {record['workload']}")
        else:
            verb = "still admits" if is_injected(old) else "now also admits"
            lines.append(f"{_ref(new)}: {verb} the agent's port "
                         f"(for {', '.join(record['workloads'])})")
    return lines


# --------------------------------------------------------------------------- small pieces


def _record(obj: Obj) -> Obj | None:
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError as error:
        raise InjectError(f"{_ref(obj)}: the {ANNOTATION} annotation is not JSON ({error}); "
                          "restore the object by hand") from None
    if not isinstance(record, dict) or record.get("version") != _RECORD_VERSION:
        raise InjectError(f"{_ref(obj)}: the {ANNOTATION} annotation was written by another "
                          "version of intercept; restore with that version")
    return record


def _write_record(obj: Obj, record: Obj, annotations_absent: bool) -> None:
    metadata = obj.setdefault("metadata", {})
    null = ["metadata", "annotations"]
    if "annotations" in metadata and metadata["annotations"] is None:
        # `annotations:` with nothing after it: restored as null, not as {}
        record = dict(record, replaced=[*[r for r in record["replaced"] if r["path"] != null],
                                        {"path": null, "value": None}])
    record = {"version": _RECORD_VERSION, **record, "annotationsWereAbsent": annotations_absent}
    metadata["annotations"] = {
        **(metadata.get("annotations") or {}),
        # The record's keys sorted; the recorded values keep their keys' order, so that a
        # restored field reads as it did (`intercept restore -f` diffs clean against the original).
        ANNOTATION: json.dumps(dict(sorted(record.items())), separators=(",", ":")),
    }


def _annotations_absent(obj: Obj) -> bool:
    return "annotations" not in (obj.get("metadata") or {})


def _free_port(preferred: int, used: set[int]) -> int:
    port = preferred
    while port in used:
        port += 1
    if port > 65535:
        raise InjectError(f"no free port at or above {preferred} in the pod for the agent")
    return port


def _fresh_name(base: str, used: set[str | None], limit: int) -> str:
    """``base``, or ``base`` shortened and numbered, so that it is unused and at most ``limit`` long."""
    for n in itertools.count(1):
        suffix = "" if n == 1 else str(n)
        name = base[: limit - len(suffix)].rstrip("-") + suffix
        if name not in used:
            return name
    raise AssertionError("unreachable")


def _rename_port_refs(handler: Any, old: str, new: str) -> Any:
    """A probe or lifecycle handler with httpGet/tcpSocket ``port: old`` changed to ``new``."""
    if isinstance(handler, dict):
        return {
            k: (new if k == "port" and v == old else _rename_port_refs(v, old, new))
            for k, v in handler.items()
        }
    return handler


def _pod_ports(pod: Obj) -> set[int]:
    """Every port number the pod declares or probes: the agent must not take any of them."""
    used = set()
    for c in [*(pod.get("containers") or []), *(pod.get("initContainers") or [])]:
        used |= {p["containerPort"] for p in c.get("ports") or []}
        for key in (*_PROBES, "lifecycle"):
            used |= _numeric_ports(c.get(key))
    return used


def _numeric_ports(handler: Any) -> set[int]:
    if not isinstance(handler, dict):
        return set()
    found = set()
    for key, value in handler.items():
        if key == "port" and isinstance(value, int):
            found.add(value)
        else:
            found |= _numeric_ports(value)
    return found


def _pod_port_names(pod: Obj) -> set[str | None]:
    names: set[str | None] = set()
    for c in [*(pod.get("containers") or []), *(pod.get("initContainers") or [])]:
        names |= _port_names(c)
    return names


def _port_names(container: Obj) -> set[str | None]:
    return {p.get("name") for p in container.get("ports") or [] if p.get("name")}


def _port_name(container: Obj, number: int) -> str | None:
    for p in container.get("ports") or []:
        if p["containerPort"] == number and p.get("protocol", "TCP") == "TCP":
            return p.get("name")
    return None


def _container(workload: Obj, name: str) -> Obj:
    return next(c for c in _pod_spec(workload)["containers"] if c["name"] == name)


def _pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def _pod_labels(workload: Obj) -> dict[str, str]:
    template = (workload.get("spec") or {}).get("template") or {}
    return (template.get("metadata") or {}).get("labels") or {}


def _labels_of_pods(obj: Obj) -> dict[str, str]:
    """The labels of the pods ``obj`` is or makes (a Pod, or a pod template under spec.template)."""
    if obj.get("kind") == "Pod":
        return (obj.get("metadata") or {}).get("labels") or {}
    return _pod_labels(obj) if isinstance((obj.get("spec") or {}).get("template"), dict) else {}


def _controlled_by_deployment(obj: Obj) -> bool:
    return any(
        ref.get("controller") and ref.get("kind") == "Deployment"
        for ref in (obj.get("metadata") or {}).get("ownerReferences") or []
    )


def _target_port(port: Obj) -> str | int:
    target = port.get("targetPort", port["port"])
    return int(target) if isinstance(target, str) and target.isdigit() else target


def _index_of(objects: list[Obj], kind: str, name: str, namespace: str | None) -> int:
    return next(
        i for i, o in enumerate(objects)
        if o.get("kind") == kind and _name(o) == name and _namespace(o) == namespace
    )


def _name(obj: Obj) -> str:
    return (obj.get("metadata") or {}).get("name", "")


def _namespace(obj: Obj) -> str | None:
    return (obj.get("metadata") or {}).get("namespace")


def _key(obj: Obj) -> str:
    """``Kind/name``: how records name a workload."""
    return f"{obj.get('kind', '?')}/{_name(obj)}"


def _ref(obj: Obj) -> str:
    namespace = _namespace(obj)
    where = f" in namespace {namespace}" if namespace else ""
    return f"{obj.get('kind', '?')}/{_name(obj)}{where}"
