"""``intercept connect``'s own agent: where a namespace has no agent, a small one of its own.

What it is: a Deployment ``intercept-connect`` of one pod running the agent image alone
(no app container, upstream nothing: nobody sends it requests), with the Secret
``intercept-intercept-connect`` (its host key and token, owned by the Deployment), both
labelled ``app.kubernetes.io/managed-by=intercept``. The agent container is the injected
agent's: Pod Security "restricted" (non-root, no capabilities, no privilege escalation,
read-only root, RuntimeDefault seccomp), the same resources, outbound connections allowed
with no fence of the pod's own. The pod mounts no service account token: the agent never
calls the API, so it may do nothing there at all.

It is shared: whoever creates it sets nothing that binds the connects after them. Each
connect's ``--outbound-allow``/``--outbound-deny`` is its own session's fence (the agent
applies it to that session only), never the pod's.

Trust: the Deployment records the image, the agent version and a hash of its pod template
(annotations). A connect reuses it only when it is exactly the one this intercept would
create: the image asked for, running as recorded, this version, the same template
(:func:`differences`); anything else (an older intercept's, another image, a Deployment of
that name planted by someone else with a Secret of their own) is refused with
:class:`ConnectAgentDiffers` (exit 13), naming what differs and the fix. A label alone is
no proof: anyone who may create Deployments may set it.

It is a pod of the namespace with labels of its own: NetworkPolicies that select every pod
of the namespace apply to its connections, those that select an app's pods do not.

Life: created by the first ``intercept connect`` that finds no agent in the namespace (its
rollout awaited; what was created deleted again when it fails, unless it became ready
meanwhile for a concurrent connect), reused by later ones, removed by ``intercept gc``
once it has been idle for ``--idle`` (no session used it) or has had no ready pod for as
long, and by ``intercept uninstall --all`` or ``intercept uninstall intercept-connect``
(refused while sessions use it, unless ``--force``): the namespace is then as it was.

All functions here block; call them from async code with ``asyncio.to_thread``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient

from intercept import agentconfig
from intercept.errors import AgentSettingsDiffer, InjectError, InterceptError
from intercept.kube import inject
from intercept.kube.apply import (CONFLICT_RETRIES, DEFAULT_TIMEOUT, MANAGED_BY, POLL_INTERVAL, WORKLOAD_LABEL, AgentInfo,
                                  Progress, RolloutFailed, Uninstalled, _ensure_secret, _events_for, _failure, _fix, _public,
                                  _RolloutProblem, _wait_rollout, agent_credentials)
from intercept.kube.inject import AGENT_CONTAINER, AGENT_HTTP_PORT, AGENT_SSH_PORT, InjectOptions
from intercept.kube.rest import AccessDenied, Cluster, Conflict, NotFound, format_selector

log = logging.getLogger(__name__)

Obj = dict[str, Any]

NAME = "intercept-connect"
SELECTOR = {MANAGED_BY[0]: MANAGED_BY[1], "app.kubernetes.io/name": NAME}
LABELS = {**SELECTOR, "app.kubernetes.io/component": "connect-agent", WORKLOAD_LABEL: NAME}
VERSION_ANNOTATION = "intercept.dev/agent-version"
IMAGE_ANNOTATION = "intercept.dev/agent-image"
TEMPLATE_ANNOTATION = "intercept.dev/template-sha256"  # of the pod template as created (before the server's defaults)
UPSTREAM = ("127.0.0.1", 1)  # nothing listens there, and nothing is sent: the agent serves no app


def deployment(namespace: str, options: InjectOptions) -> Obj:
    """The connect agent's Deployment in ``namespace`` (pure): ``options.image`` and
    ``options.agent_version``; no fence and no other pod-wide setting of ``options``
    (whoever creates it must not set them for the connects after them)."""
    secret_volume = {"name": inject.CREDENTIALS_VOLUME, "secret": {
        "secretName": inject.secret_name(NAME), "items": [{"key": inject.CREDENTIALS_KEY, "path": inject.CREDENTIALS_KEY}],
        "defaultMode": 0o444}}
    env = agentconfig.to_env({
        "listen": (("0.0.0.0", AGENT_HTTP_PORT),),
        "upstream": (UPSTREAM,),
        "ssh_listen": ("0.0.0.0", AGENT_SSH_PORT),
        "credentials": Path(inject.CREDENTIALS_DIR, inject.CREDENTIALS_KEY),
        "allow_outbound": True,  # what it is for; each session's fence is its own
    })
    container = {
        "name": AGENT_CONTAINER,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["intercept", "agent"],
        "ports": [{"name": inject.AGENT_HTTP_PORT_NAME, "containerPort": AGENT_HTTP_PORT, "protocol": "TCP"},
                  {"name": inject.AGENT_SSH_PORT_NAME, "containerPort": AGENT_SSH_PORT, "protocol": "TCP"}],
        "env": env,
        "volumeMounts": [{"name": inject.CREDENTIALS_VOLUME, "mountPath": inject.CREDENTIALS_DIR, "readOnly": True}],
        "readinessProbe": {"tcpSocket": {"port": AGENT_HTTP_PORT}, "periodSeconds": 5},
        "resources": copy.deepcopy(inject.AGENT_RESOURCES),
        "securityContext": inject.agent_security_context({}, {}),
    }
    template = {
        "metadata": {"labels": dict(LABELS)},
        "spec": {"automountServiceAccountToken": False, "containers": [container], "volumes": [secret_volume]},
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": namespace, "labels": dict(LABELS),
                     "annotations": {VERSION_ANNOTATION: options.agent_version, IMAGE_ANNOTATION: options.image,
                                     TEMPLATE_ANNOTATION: template_hash(template)}},
        "spec": {"replicas": 1, "selector": {"matchLabels": dict(SELECTOR)}, "template": template},
    }


def template_hash(template: Obj) -> str:
    """The SHA-256 of a pod template as intercept writes it (canonical JSON)."""
    return hashlib.sha256(json.dumps(template, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _contains(live: Any, wanted: Any) -> bool:
    """Whether ``live`` (as the server returns it) holds everything of ``wanted`` (as written):
    the server adds defaults, never changes what was written."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(k in live and _contains(live[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(live, list) and len(live) == len(wanted) and all(map(_contains, live, wanted))
    return bool(live == wanted)


def differences(running: Obj, wanted: Obj) -> tuple[tuple[str, str, str], ...]:
    """What of the connect agent ``running`` (its Deployment, as read) is not what ``wanted``
    (:func:`deployment`) describes, as (what, it has, asked for), in words; () when it may be
    reused (pure).

    Every item is a reason not to trust it: its image (as run, and as recorded), its
    version, and its pod template, both as recorded (the hash) and as it is now (a
    template changed since it was created, or never intercept's, holds more or other than
    intercept writes)."""
    found: list[tuple[str, str, str]] = []
    has = running["metadata"].get("annotations") or {}
    asked = wanted["metadata"]["annotations"]
    live_spec = ((running.get("spec") or {}).get("template") or {}).get("spec") or {}
    wanted_spec = wanted["spec"]["template"]["spec"]
    images = [c.get("image", "") for c in live_spec.get("containers") or []]
    if images != [asked[IMAGE_ANNOTATION]]:
        found.append(("image", ", ".join(images) or "no container", asked[IMAGE_ANNOTATION]))
    elif has.get(IMAGE_ANNOTATION) != asked[IMAGE_ANNOTATION]:
        found.append(("recorded image", has.get(IMAGE_ANNOTATION) or "none", asked[IMAGE_ANNOTATION]))
    if has.get(VERSION_ANNOTATION) != asked[VERSION_ANNOTATION]:
        found.append(("agent version", has.get(VERSION_ANNOTATION) or "none", asked[VERSION_ANNOTATION]))
    if has.get(TEMPLATE_ANNOTATION) != asked[TEMPLATE_ANNOTATION]:
        found.append(("pod template", f"recorded as {(has.get(TEMPLATE_ANNOTATION) or 'none')[:12]}",
                      f"{asked[TEMPLATE_ANNOTATION][:12]} (this intercept's)"))
    elif not _contains(live_spec, wanted_spec) or set((live_spec.get("containers") or [{}])[0]) - _CONTAINER_KEYS \
            or live_spec.get("initContainers") or live_spec.get("ephemeralContainers"):
        found.append(("pod template", "changed since it was created", "as intercept created it"))
    return tuple(found)


# What a server adds to a container intercept wrote (defaults); any other key was written by someone else.
_CONTAINER_KEYS = {"name", "image", "imagePullPolicy", "command", "ports", "env", "volumeMounts", "readinessProbe",
                   "resources", "securityContext", "terminationMessagePath", "terminationMessagePolicy"}


class ConnectAgentDiffers(AgentSettingsDiffer):
    """The namespace's ``intercept-connect`` is not the connect agent this intercept would
    run (another image or version, a changed template, or not intercept's at all): it is
    not reused (exit 13, as for an injected agent whose settings differ). ``differences``
    as :func:`differences` gives them."""


def _ours(obj: Obj) -> bool:
    return (obj["metadata"].get("labels") or {}).get(MANAGED_BY[0]) == MANAGED_BY[1]


def _info(namespace: str, workload: Obj, credentials: Any) -> AgentInfo:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return AgentInfo(namespace=namespace, service=NAME, workload_kind="Deployment", workload_name=NAME,
                     selector=format_selector(workload["spec"]["selector"]), http_port=AGENT_HTTP_PORT,
                     ssh_port=AGENT_SSH_PORT, credentials=_public(credentials),
                     agent_version=(workload["metadata"].get("annotations") or {}).get(VERSION_ANNOTATION, ""),
                     image=container.get("image", ""))


def _get(cluster: Cluster, namespace: str) -> Obj | None:
    """The connect agent's Deployment, or None; InjectError when one of that name is not intercept's."""
    try:
        workload = cluster.get("Deployment", namespace, NAME)
    except NotFound:
        return None
    if not _ours(workload):
        raise InjectError(f"Deployment {NAME} in namespace {namespace} exists and was not created by intercept (no "
                          f"label {MANAGED_BY[0]}={MANAGED_BY[1]}); intercept connect's own agent needs that name: "
                          f"rename it, or inject an agent into a Service of the namespace and connect through it")
    return workload


def unready_for(workload: Obj, now: float) -> float | None:
    """Seconds the connect agent's Deployment has had no ready replica at ``now`` (Unix time),
    or None while it has one (pure): since its ``Available`` condition turned False, else
    since its creation. A crash-looping or unschedulable agent serves nobody: ``intercept gc``
    removes it once this exceeds ``--idle``."""
    if _ready_replicas(workload) > 0:
        return None
    conditions = (workload.get("status") or {}).get("conditions") or []
    available = next((c for c in conditions if c.get("type") == "Available"), None)
    since = available.get("lastTransitionTime") if available is not None and available.get("status") != "True" else None
    since = since or workload["metadata"].get("creationTimestamp")
    if not since:
        return None
    started = datetime.fromisoformat(since.replace("Z", "+00:00")).astimezone(timezone.utc).timestamp()
    return max(0.0, now - started)


def read(api: ApiClient, namespace: str) -> Obj | None:
    """The connect agent's Deployment of ``namespace`` as it is now, or None;
    :class:`~intercept.errors.InjectError` when one of that name is not intercept's."""
    workload = _get(Cluster(api), namespace)
    return None if workload is None else {"apiVersion": "apps/v1", "kind": "Deployment", **workload}


def info_of(api: ApiClient, namespace: str, workload: Obj) -> AgentInfo:
    """What reaches the agent of ``workload`` (its credentials from its Secret)."""
    return _info(namespace, workload, agent_credentials(api, namespace, NAME))


def find(api: ApiClient, namespace: str) -> AgentInfo | None:
    """The connect agent of ``namespace`` (its credentials from its Secret), or None."""
    workload = _get(Cluster(api), namespace)
    if workload is None:
        return None
    return _info(namespace, workload, agent_credentials(api, namespace, NAME))


def ensure(api: ApiClient, namespace: str, options: InjectOptions, progress: Progress, *,
           timeout: float = DEFAULT_TIMEOUT, poll_interval: float = POLL_INTERVAL,
           interrupt: threading.Event | None = None) -> AgentInfo:
    """The connect agent of ``namespace``, running: the one there, reused when it is exactly
    what ``options`` describe (:func:`differences`; else :class:`ConnectAgentDiffers`), else a
    new one, its rollout awaited. A rollout that fails deletes what this call created (not
    when it became ready meanwhile: a concurrent connect may use it) and raises
    :class:`RolloutFailed`."""
    cluster = Cluster(api)
    wanted = deployment(namespace, options)
    workload, created = None, False
    for _ in range(CONFLICT_RETRIES):
        workload = _get(cluster, namespace)
        if workload is not None:
            break
        progress(f"Deployment/{NAME}: no agent in namespace {namespace}; starting intercept connect's own "
                 f"(agent {options.agent_version}, image {options.image}; intercept gc removes it once idle)")
        try:
            workload, created = cluster.create(wanted), True
            break
        except Conflict:  # another connect created it meanwhile: read it (and if it went again, create it)
            continue
        except AccessDenied as e:
            raise AccessDenied(
                f"{e}; intercept connect runs an agent of its own where the namespace has none, which needs create "
                f"on deployments and secrets in {namespace}: ask for them, or connect through an agent injected into "
                f"a Service (intercept inject SERVICE -n {namespace})", e.status, e.reason) from None
    if workload is None:
        raise InjectError(f"Deployment {NAME} in namespace {namespace} kept appearing and disappearing while intercept "
                          f"connect started its agent; run the command again")
    workload = {"apiVersion": "apps/v1", "kind": "Deployment", **workload}
    if not created:
        _check_reusable(namespace, workload, wanted, options)
    try:
        credentials, _ = _ensure_secret(cluster, workload)
        _wait_rollout(cluster, workload, progress, timeout, poll_interval, interrupt)
    except BaseException as error:
        if not created:
            if isinstance(error, _RolloutProblem):
                events = _events_for(cluster, namespace, workload, error)
                raise RolloutFailed(f"intercept connect's own agent (Deployment/{NAME} in namespace {namespace}) does "
                                    f"not become ready: {error.what}; {_fix(error)}, or remove it with intercept "
                                    f"uninstall {NAME} -n {namespace}", events) from None
            raise
        events = _events_for(cluster, namespace, workload, error) if isinstance(error, _RolloutProblem) else []
        removed = _remove_unless_ready(api, namespace, workload["metadata"]["uid"], progress)
        if not isinstance(error, (_RolloutProblem, InjectError)):
            raise
        what = error.what if isinstance(error, _RolloutProblem) else str(error)
        if removed is None:
            raise RolloutFailed(f"starting intercept connect's own agent in namespace {namespace} failed: {what}; it "
                                f"became ready meanwhile, and another connect may use it, so it was kept: connect "
                                f"again (intercept gc removes it once idle)", events) from None
        raise _failure(f"starting intercept connect's own agent in namespace {namespace}", what, events,
                       [f"{o} (deleted)" for o in (*removed.deleted, *(f"Secret/{n}" for n in removed.secrets_deleted))],
                       _fix(error)) from None
    progress(f"Deployment/{NAME}: agent ready")
    return _info(namespace, workload, credentials)


def _check_reusable(namespace: str, workload: Obj, wanted: Obj, options: InjectOptions) -> None:
    found = differences(workload, wanted)
    if not found:
        return
    said = "; ".join(f"{what}: it has {has}, not {asked}" for what, has, asked in found)
    raise ConnectAgentDiffers(
        f"Deployment {NAME} in namespace {namespace} is not the agent this intercept ({options.agent_version}) would run "
        f"for intercept connect, so it is not trusted: {said}; it may be an older intercept's, started with another "
        f"--agent-image, or not intercept's at all. Connect with the intercept and --agent-image it was started with, "
        f"or remove it (intercept uninstall {NAME} -n {namespace}; refused while sessions use it) and connect again",
        None, found)


def _ready_replicas(workload: Obj) -> int:
    return int((workload.get("status") or {}).get("readyReplicas") or 0)


def _remove_unless_ready(api: ApiClient, namespace: str, uid: str, progress: Progress) -> Uninstalled | None:
    """Delete the Deployment of ``uid`` that this call created and whose rollout failed, unless
    it became ready meanwhile (None then: a concurrent connect may be using it)."""
    try:
        current = Cluster(api).get("Deployment", namespace, NAME)
    except NotFound:
        return Uninstalled(namespace, (), ())
    if current["metadata"].get("uid") != uid:
        return Uninstalled(namespace, (), ())  # another one now: not ours to delete
    if _ready_replicas(current) > 0:
        return None
    try:
        return remove(api, namespace, progress, resource_version=current["metadata"]["resourceVersion"])
    except Conflict:  # it changed meanwhile (became ready?): keep it
        return None


def remove(api: ApiClient, namespace: str, progress: Progress = lambda line: None, *,
           resource_version: str | None = None) -> Uninstalled:
    """Delete the connect agent of ``namespace`` (its Deployment, then its Secret, which it
    owns: the garbage collector would take it too, but unseen), if any; idempotent.
    Nothing else of the namespace was changed for it. ``resource_version``: only the
    Deployment as it was read then (:class:`~intercept.kube.rest.Conflict` when it has
    changed, and nothing is deleted)."""
    cluster = Cluster(api)
    deleted: dict[str, list[str]] = {"Deployment": [], "Secret": []}
    for kind, name in (("Deployment", NAME), ("Secret", inject.secret_name(NAME))):
        try:
            obj = cluster.get(kind, namespace, name)
        except NotFound:
            continue
        if not _ours(obj):
            log.warning("%s %s in namespace %s was not created by intercept; kept", kind, name, namespace)
            continue
        try:
            cluster.delete(kind, namespace, name, resource_version=resource_version if kind == "Deployment" else None)
        except NotFound:
            continue
        deleted[kind].append(name)
        progress(f"{kind}/{name}: deleted (intercept connect's own agent)")
    return Uninstalled(namespace, (), tuple(deleted["Secret"]), tuple(f"Deployment/{n}" for n in deleted["Deployment"]))


__all__ = ["LABELS", "NAME", "ConnectAgentDiffers", "deployment", "differences", "ensure", "find", "info_of", "read", "remove", "template_hash",
           "unready_for"]
