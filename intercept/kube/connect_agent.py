"""``intercept connect``'s own agent: where a namespace has no agent, a small one of its own.

What it is: a Deployment ``intercept-connect`` of one pod running the agent image alone
(no app container, upstream nothing: nobody sends it requests), with the Secret
``intercept-intercept-connect`` (its host key and token, owned by the Deployment), both
labelled ``app.kubernetes.io/managed-by=intercept``. The agent container is the injected
agent's: Pod Security "restricted" (non-root, no capabilities, no privilege escalation,
read-only root, RuntimeDefault seccomp), the same resources, outbound connections allowed
under the fence it is created with. The pod mounts no service account token: the agent
never calls the API, so it may do nothing there at all.

It is a pod of the namespace with labels of its own: NetworkPolicies that select every pod
of the namespace apply to its connections, those that select an app's pods do not.

Life: created by the first ``intercept connect`` that finds no agent in the namespace (its
rollout awaited, what was created deleted again when it fails), reused by later ones,
removed by ``intercept gc`` once it has been idle for ``--idle`` (no session reached the
cluster through it), and by ``intercept uninstall --all`` or ``intercept uninstall
intercept-connect``: the namespace is then as it was.

All functions here block; call them from async code with ``asyncio.to_thread``.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient

from intercept import agentconfig
from intercept.errors import InjectError
from intercept.kube import inject
from intercept.kube.apply import (DEFAULT_TIMEOUT, MANAGED_BY, POLL_INTERVAL, WORKLOAD_LABEL, AgentInfo, Progress,
                                  RolloutFailed, Uninstalled, _ensure_secret, _events_for, _failure, _fix, _public,
                                  _RolloutProblem, _wait_rollout, agent_credentials)
from intercept.kube.inject import AGENT_CONTAINER, AGENT_HTTP_PORT, AGENT_SSH_PORT, InjectOptions
from intercept.kube.rest import AccessDenied, Cluster, Conflict, NotFound, format_selector

log = logging.getLogger(__name__)

Obj = dict[str, Any]

NAME = "intercept-connect"
SELECTOR = {MANAGED_BY[0]: MANAGED_BY[1], "app.kubernetes.io/name": NAME}
LABELS = {**SELECTOR, "app.kubernetes.io/component": "connect-agent", WORKLOAD_LABEL: NAME}
VERSION_ANNOTATION = "intercept.dev/agent-version"
UPSTREAM = ("127.0.0.1", 1)  # nothing listens there, and nothing is sent: the agent serves no app


def deployment(namespace: str, options: InjectOptions) -> Obj:
    """The connect agent's Deployment in ``namespace`` (pure)."""
    secret_volume = {"name": inject.CREDENTIALS_VOLUME, "secret": {
        "secretName": inject.secret_name(NAME), "items": [{"key": inject.CREDENTIALS_KEY, "path": inject.CREDENTIALS_KEY}],
        "defaultMode": 0o444}}
    env = agentconfig.to_env({
        "listen": (("0.0.0.0", AGENT_HTTP_PORT),),
        "upstream": (UPSTREAM,),
        "ssh_listen": ("0.0.0.0", AGENT_SSH_PORT),
        "credentials": Path(inject.CREDENTIALS_DIR, inject.CREDENTIALS_KEY),
        **options.pod_wide(),
        "allow_outbound": True,  # what it is for
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
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": namespace, "labels": dict(LABELS),
                     "annotations": {VERSION_ANNOTATION: options.agent_version}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(SELECTOR)},
            "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {"automountServiceAccountToken": False, "containers": [container], "volumes": [secret_volume]},
            },
        },
    }


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


def find(api: ApiClient, namespace: str) -> AgentInfo | None:
    """The connect agent of ``namespace`` (its credentials from its Secret), or None."""
    workload = _get(Cluster(api), namespace)
    if workload is None:
        return None
    return _info(namespace, workload, agent_credentials(api, namespace, NAME))


def ensure(api: ApiClient, namespace: str, options: InjectOptions, progress: Progress, *,
           timeout: float = DEFAULT_TIMEOUT, poll_interval: float = POLL_INTERVAL,
           interrupt: threading.Event | None = None) -> AgentInfo:
    """The connect agent of ``namespace``, running: the one there (reused as it is), else a
    new one from ``options`` (its image and fence), its rollout awaited. A rollout that
    fails deletes what this call created and raises :class:`RolloutFailed`."""
    cluster = Cluster(api)
    workload = _get(cluster, namespace)
    created = workload is None
    if workload is None:
        progress(f"Deployment/{NAME}: no agent in namespace {namespace}; starting intercept connect's own "
                 f"(agent {options.agent_version}, image {options.image}; intercept gc removes it once idle)")
        try:
            workload = cluster.create(deployment(namespace, options))
        except Conflict:  # another connect created it meanwhile
            workload, created = _get(cluster, namespace), False
        except AccessDenied as e:
            raise AccessDenied(
                f"{e}; intercept connect runs an agent of its own where the namespace has none, which needs create "
                f"on deployments and secrets in {namespace}: ask for them, or connect through an agent injected into "
                f"a Service (intercept inject SERVICE -n {namespace})", e.status, e.reason) from None
        assert workload is not None
    workload = {"apiVersion": "apps/v1", "kind": "Deployment", **workload}
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
        removed = remove(api, namespace)
        if not isinstance(error, (_RolloutProblem, InjectError)):
            raise
        what = error.what if isinstance(error, _RolloutProblem) else str(error)
        raise _failure(f"starting intercept connect's own agent in namespace {namespace}", what, events,
                       [f"{o} (deleted)" for o in (*removed.deleted, *(f"Secret/{n}" for n in removed.secrets_deleted))],
                       _fix(error)) from None
    progress(f"Deployment/{NAME}: agent ready")
    return _info(namespace, workload, credentials)


def remove(api: ApiClient, namespace: str, progress: Progress = lambda line: None) -> Uninstalled:
    """Delete the connect agent of ``namespace`` (its Secret, then its Deployment: the Secret
    is owned by it, and the garbage collector would take it away unseen), if any;
    idempotent. Nothing else of the namespace was changed for it."""
    cluster = Cluster(api)
    deleted: dict[str, list[str]] = {"Deployment": [], "Secret": []}
    for kind, name in (("Secret", inject.secret_name(NAME)), ("Deployment", NAME)):
        try:
            obj = cluster.get(kind, namespace, name)
        except NotFound:
            continue
        if not _ours(obj):
            log.warning("%s %s in namespace %s was not created by intercept; kept", kind, name, namespace)
            continue
        try:
            cluster.delete(kind, namespace, name)
        except NotFound:
            continue
        deleted[kind].append(name)
        progress(f"{kind}/{name}: deleted (intercept connect's own agent)")
    return Uninstalled(namespace, (), tuple(deleted["Secret"]), tuple(f"Deployment/{n}" for n in deleted["Deployment"]))


__all__ = ["LABELS", "NAME", "deployment", "ensure", "find", "remove"]
