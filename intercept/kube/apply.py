"""Put the agent into a live workload, and take it out again: the cluster side of inject/restore.

Every change is computed by the pure transform (:mod:`intercept.kube.inject`) on the
objects as the API server gives them, and written read-modify-write: a PUT that carries
the ``resourceVersion`` it was computed from, recomputed from a fresh read on ``409
Conflict`` (so a concurrent writer's change, an HPA's ``replicas`` say, is kept).

:func:`ensure_agent` writes in the order that never cuts traffic off:

1. NetworkPolicies that must admit the agent's port (before any pod serves on it);
2. the Secret ``intercept-<workload>`` (host key and token; owned by the workload, so it
   is garbage-collected with it; an existing one is reused);
3. the workload; then it waits for the rollout as ``kubectl rollout status`` does;
4. the Service, when its numeric targetPort must point at the agent (only once agent
   pods are ready to answer there).

If a write is refused (an admission webhook, RBAC) or the rollout fails (an image that
cannot be pulled, a crash loop, the timeout), the pod events that explain it are
collected, every object written is put back as it was (the spec fields this call
changed and the record annotation; others' changes stay), a Secret created by this call
is deleted, and :class:`RolloutFailed` says so. When nothing needs to change (the agent
of this version is in place) it writes nothing.

:func:`uninstall` undoes it in the reverse order (Service, workload and its rollout,
policies, Secret) and is idempotent. :func:`list_services` reports which Services can be
intercepted. The agent pods themselves: :mod:`intercept.kube.pods`.

All functions here block; call them from async code with ``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient

from intercept.credentials import Credentials
from intercept.errors import (AgentSettingsDiffer, CredentialsError, InjectError, InterceptError, NoAgent,
                              ReplaceRefused, ResolveError)
from intercept.kube import inject
from intercept.kube.image import how_to_provide
from intercept.kube.inject import ANNOTATION, AGENT_CONTAINER, CREDENTIALS_KEY, InjectOptions
from intercept.kube.pods import PodEndpoint, agent_pods, agent_ports, watch_agent_pods
from intercept.kube.rest import AccessDenied, Cluster, ClusterError, Conflict, NotFound, format_selector
from intercept.kube.rollout import rollout_status

__all__ = [
    "AgentInfo",
    "PodEndpoint",
    "RolloutFailed",
    "Uninstalled",
    "agent_credentials",
    "agent_pods",
    "ensure_agent",
    "list_services",
    "put_back",
    "uninstall",
    "watch_agent_pods",
]

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Progress = Callable[[str], None]

DEFAULT_TIMEOUT = 300.0  # seconds a rollout may take
POLL_INTERVAL = 1.0  # at most this many seconds between two looks at a rollout
_FIRST_POLL = 0.05  # the first looks come sooner: most rollouts of one small pod are quick
CONFLICT_RETRIES = 5
MANAGED_BY = ("app.kubernetes.io/managed-by", "intercept")
WORKLOAD_LABEL = "intercept.dev/workload"

# Events that say nothing about why a pod does not run.
_ROUTINE_EVENTS = frozenset({"Scheduled", "Pulling", "Pulled", "Created", "Started", "Killing",
                             "SuccessfulCreate", "SuccessfulDelete", "ScalingReplicaSet"})
_MAX_EVENTS = 8


class RolloutFailed(InjectError):
    """Injecting (or removing) the agent failed; the message says why, with the pod events, and what was put back."""

    def __init__(self, message: str, events: list[str] | None = None) -> None:
        super().__init__(message)
        self.events = events or []


class Interrupted(BaseException):
    """A rollout wait was interrupted from another thread (as KeyboardInterrupt in this one)."""


@dataclass(frozen=True)
class AgentInfo:
    """What a client needs to reach the agents of a workload."""

    namespace: str
    service: str
    workload_kind: str
    workload_name: str
    selector: str  # label selector of the workload's pods, for agent_pods / watch_agent_pods
    http_port: int
    ssh_port: int
    credentials: Credentials  # token and host public key (no private key)
    agent_version: str
    image: str
    app_ports: tuple[int, ...] = ()  # the app port behind each Service port asked for, in order

    @property
    def workload(self) -> str:
        return f"{self.workload_kind}/{self.workload_name}"


@dataclass(frozen=True)
class Uninstalled:
    """What :func:`uninstall` put back (``Kind/name``, in write order), which Secrets it
    deleted, and which other objects of intercept's own (``Kind/name``: intercept connect's
    agent) it deleted."""

    namespace: str
    restored: tuple[str, ...]
    secrets_deleted: tuple[str, ...]
    deleted: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.restored or self.secrets_deleted or self.deleted)


class _RolloutProblem(Exception):
    """Internal: the rollout cannot succeed (or timed out); carries the pods whose events explain it."""

    def __init__(self, reason: str, pods: tuple[str, ...], unpulled: tuple[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.pods = pods
        self.unpulled = unpulled  # (container, image) that cannot be pulled, when that is the cause

    @property
    def what(self) -> str:
        """The reason, led by the image that cannot be pulled when that is the cause."""
        if self.unpulled is None:
            return self.reason
        container, image = self.unpulled
        whose = "the agent image" if container == AGENT_CONTAINER else f"the image of container {container},"
        return f"{whose} {image} could not be pulled ({self.reason})"


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------- ensure_agent


def ensure_agent(
    api: ApiClient,
    namespace: str,
    service: str,
    options: InjectOptions,
    progress: Progress = _quiet,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    poll_interval: float = POLL_INTERVAL,
    interrupt: threading.Event | None = None,
    named: Collection[str] = (),
    reinject: bool = False,
    add: bool = True,
    replace_by: str | None = None,
    holders: Callable[[AgentInfo], list[str]] | None = None,
) -> AgentInfo:
    """Make sure the workload behind ``service`` runs an agent; wait for it.

    One agent configuration serves every developer of a workload. Without an agent, the
    one ``options`` describe is injected (unless ``add`` is false: :class:`NoAgent`). With
    one, nothing is written: the agent keeps its image and pod-wide settings, and a
    pod-wide option among ``named`` (:class:`InjectOptions` fields the user asked for)
    that differs from the running agent's raises :class:`AgentSettingsDiffer`, saying
    which and how to change it. ``reinject`` is that explicit change: the running agent's
    settings with the ``named`` ones replaced, written when they differ (its pods are
    replaced).

    Raises :class:`~intercept.errors.ResolveError` when the Service does not lead to one
    workload and port, :class:`~intercept.errors.InjectError` when the agent cannot be
    injected as asked (nothing is written then), :class:`RolloutFailed` when a write was
    refused or the rollout failed (what was written is put back first), and
    :class:`~intercept.kube.rest.ClusterError` when the cluster cannot be used.

    ``interrupt``, set from another thread, ends a rollout wait as Ctrl-C would: what was
    written is put back and :class:`Interrupted` raised.

    With ``replace_by`` (a developer's name: ``intercept start --replace``), the app container
    runs the stand-in in every replica once this returns (the pods of the app that went are
    gone, not only terminating): written with the agent in one rollout when there is none.
    Refused (:class:`~intercept.errors.ReplaceRefused`, nothing written) while another
    developer replaces the workload, or while ``holders`` (who holds routes on an agent in
    place) names anyone. ``service`` may name a workload (``deployment/NAME``).
    """
    cluster = Cluster(api)
    objects = _read_namespace(cluster, namespace, None if inject.is_workload_ref(service) else service)
    targets = inject.resolve_ports(objects, service, options.wanted_ports())
    target = targets[0]
    # the app port behind each port asked for; none for a workload named directly (no Service, no requests)
    asked = () if not target.has_service else tuple(inject.resolve(objects, service, p).container_port
                                                      for p in options.wanted_ports())
    wi = _index(objects, target.workload_kind, target.workload_name)
    workload = objects[wi]
    if inject.is_injected(workload):
        served = inject.served_ports(workload)
        missing = [t for t in targets if t.container_port not in served]
        if missing and reinject:  # in front of these ports too, and of those it serves already
            options = dataclasses.replace(options, service_port=None,
                                          service_ports=_with_served(objects, service, served, targets))
        else:
            for t in targets:
                inject.check_serves(workload, t)
            if replace_by is not None and target.has_service:
                # the replace rewrites the pod template: the agent stays in front of every port it serves
                options = dataclasses.replace(options, service_port=None,
                                              service_ports=_served_in_order(objects, service, served, targets))
        running = inject.running_options(workload, options)
        wanted = dataclasses.replace(running, **{k: getattr(options, k) for k in named if k in inject.POD_WIDE_FLAGS})
        if not reinject:
            differences = inject.pod_wide_differences(running, wanted, named)
            if differences:
                credentials, _ = _ensure_secret(cluster, workload)
                said = "; ".join(f"{flag}: the agent has {has}, not {asked}" for flag, has, asked in differences)
                raise AgentSettingsDiffer(
                    f"Service {service} in namespace {namespace}: {said}",
                    _agent_info(namespace, service, workload, credentials, running), tuple(differences))
            wanted = running
        options = dataclasses.replace(wanted, agent_version=options.agent_version if reinject else running.agent_version)
    elif not add:
        raise NoAgent(f"Service {service} in namespace {namespace} has no agent ({target.workload} runs none), and "
                      f"this command does not add one: add it with intercept inject {service} -n {namespace} "
                      f"(or intercept start {service} -n {namespace}, which adds it)")
    if replace_by is not None:
        options = _replacing(cluster, namespace, service, workload, target, options, replace_by, holders)
    unchanged = inject.is_injected(workload) and not reinject and options.replace_by == inject.replaced_by(workload)
    injected = objects if unchanged else inject.inject(objects, service, options)
    changed = [i for i, (old, new) in enumerate(zip(objects, injected)) if old != new]

    if not changed:
        log.info("%s already runs agent %s", target.workload, options.agent_version)
        progress(f"{target.workload}: agent {options.agent_version} already in place")
        credentials, _ = _ensure_secret(cluster, workload)
        try:
            _wait_rollout(cluster, workload, progress, timeout, poll_interval, interrupt)
            if replace_by is not None:
                _wait_app_gone(cluster, workload, progress, timeout, poll_interval, interrupt)
        except _RolloutProblem as problem:
            events = _events_for(cluster, namespace, workload, problem)
            shown = f"; events: {' | '.join(events)}" if events else ""
            raise RolloutFailed(
                f"the agent of {_ref(workload)} is in place but its rollout fails: {problem.what}"
                f"{shown}; {_fix(problem)}, or remove the agent with intercept uninstall "
                f"{service} -n {namespace}",
                events,
            ) from None
        return dataclasses.replace(_agent_info(namespace, service, injected[wi], credentials, options), app_ports=asked)

    for line in inject.describe_changes(objects, injected):
        progress(line)
    written: list[tuple[Obj, Obj]] = []  # (before, as written), in write order
    created_secret: str | None = None

    def write(i: int) -> None:
        written.append(_put(cluster, objects[i], lambda cur: _substituted_inject(objects, i, cur, service, options)))

    try:
        for i in changed:
            if objects[i]["kind"] == "NetworkPolicy":
                write(i)
        credentials, created = _ensure_secret(cluster, workload)
        created_secret = inject.secret_name(target.workload_name) if created else None
        if wi in changed:
            write(wi)
        # Also when only the Service changes (an earlier run stopped short): its pods must answer first.
        _wait_rollout(cluster, workload, progress, timeout, poll_interval, interrupt)
        if replace_by is not None:
            _wait_app_gone(cluster, workload, progress, timeout, poll_interval, interrupt)
        for i in changed:
            if objects[i]["kind"] == "Service":
                write(i)
    except BaseException as error:
        if not written and not created_secret and not isinstance(error, _RolloutProblem):
            raise
        what = error.what if isinstance(error, _RolloutProblem) else str(error) or error.__class__.__name__
        events = _events_for(cluster, namespace, workload, error) if isinstance(error, _RolloutProblem) else []
        try:
            put_back = _roll_back(cluster, written, created_secret, namespace)
        except InterceptError as also:
            raise RolloutFailed(
                f"injecting the agent into {_ref(workload)} failed: {what}; putting the originals "
                f"back failed too ({also}): run intercept uninstall {service} -n {namespace} to finish",
                events,
            ) from None
        if not isinstance(error, (_RolloutProblem, InterceptError)) or isinstance(error, ReplaceRefused):
            raise  # interrupted (Ctrl-C), refused meanwhile, or a bug: put back, then let it through
        doing = f"replacing the app of {_ref(workload)}" if replace_by else f"injecting the agent into {_ref(workload)}"
        failure = _failure(doing, what, events, put_back, _fix(error))
        if isinstance(error, AccessDenied):  # the user may not do this: exit 11, not "cannot be injected"
            raise AccessDenied(str(failure), error.status, error.reason) from None
        raise failure from None

    progress(f"{target.workload}: agent {options.agent_version} ready")
    return dataclasses.replace(_agent_info(namespace, service, injected[wi], credentials, options), app_ports=asked)


def _with_served(objects: list[Obj], service: str, served: list[int], targets: list[inject.Target]) -> tuple[int, ...]:
    """The Service ports (numbers) of ``targets`` and those of ``service`` whose app ports in
    ``served`` the agent is in front of already: an injection for more ports drops none."""
    ports = [t.service_port for t in targets]
    found_service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == service)
    for port in inject.restore_object(found_service)["spec"]["ports"]:
        try:
            found = inject.resolve(objects, service, port["port"])
        except ResolveError:
            continue
        if found.container_port in served and found.service_port not in ports:
            ports.insert(0, found.service_port)
    return tuple(ports)


def _served_in_order(objects: list[Obj], service: str, served: list[int], targets: list[inject.Target]) -> tuple[int, ...]:
    """:func:`_with_served` in the order of the agent's listeners (``served``), then the new
    ones: an injection that adds no port keeps each listener's port as it was."""
    ports = _with_served(objects, service, served, targets)
    app = {p: inject.resolve(objects, service, p).container_port for p in ports}
    return tuple(sorted(ports, key=lambda p: served.index(app[p]) if app[p] in served else len(served)))


def _replacing(cluster: Cluster, namespace: str, service: str, workload: Obj, target: inject.Target,
               options: InjectOptions, replace_by: str, holders: Callable[[AgentInfo], list[str]] | None) -> InjectOptions:
    """``options`` replacing the app container for ``replace_by``; ReplaceRefused while someone
    else replaces it or holds a route on its agent."""
    _refuse_other_replacer(workload, replace_by)
    if inject.is_injected(workload) and inject.replaced_by(workload) is None and holders is not None:
        credentials, _ = _ensure_secret(cluster, workload)
        held = holders(_agent_info(namespace, service, workload, credentials, options))
        if held:
            who = ", ".join(held)
            raise ReplaceRefused(
                f"{target.workload} in namespace {namespace}: {who} hold{'s' if len(held) == 1 else ''} routes on its "
                f"agent, and replacing it would take their requests and stop the app they fall back to; ask "
                f"{who} to leave (intercept status shows theirs), then replace it", tuple(held))
    return dataclasses.replace(options, replace_by=replace_by)


def _refuse_other_replacer(workload: Obj, replace_by: str) -> None:
    holder = inject.replaced_by(workload)
    if holder is not None and holder != replace_by:
        namespace = workload["metadata"].get("namespace")
        raise ReplaceRefused(
            f"{_key(workload)} in namespace {namespace} is replaced by {holder} already, and one developer at a time "
            f"replaces a workload; ask {holder} to leave (or remove the agent: intercept uninstall "
            f"{workload['metadata']['name']} -n {namespace})", (holder,))


def _substituted_inject(objects: list[Obj], i: int, current: Obj, service: str, options: InjectOptions) -> Obj:
    """The injected form of ``current`` (a fresh read of ``objects[i]``), the others as first read."""
    if options.replace_by is not None and current.get("kind") in inject.WORKLOAD_KINDS:
        _refuse_other_replacer(current, options.replace_by)  # another developer's replace won the race
    view = list(objects)
    view[i] = current
    return inject.inject(view, service, options)[i]


def _agent_info(namespace: str, service: str, workload: Obj, credentials: Credentials, options: InjectOptions) -> AgentInfo:
    pod = workload["spec"]["template"]["spec"]
    ports = agent_ports(pod)
    assert ports is not None, "an injected workload has an agent container"
    agent = next(c for c in pod["containers"] if c["name"] == AGENT_CONTAINER)
    return AgentInfo(
        namespace=namespace,
        service=service,
        workload_kind=workload["kind"],
        workload_name=workload["metadata"]["name"],
        selector=format_selector(workload["spec"]["selector"]),
        http_port=ports[0],
        ssh_port=ports[1],
        credentials=_public(credentials),
        agent_version=_agent_version(workload) or options.agent_version,
        image=agent["image"],
    )


# --------------------------------------------------------------------------- the Secret


def agent_credentials(api: ApiClient, namespace: str, workload_name: str) -> Credentials:
    """The token and host public key of a workload's agents, from its Secret (no private key)."""
    name = inject.secret_name(workload_name)
    try:
        secret = Cluster(api).get("Secret", namespace, name)
    except NotFound:
        raise CredentialsError(
            f"Secret {name} does not exist in namespace {namespace}: the workload {workload_name!r} "
            "has no agent; run intercept start SERVICE, which injects it"
        ) from None
    return _public(_credentials_of(secret))


def _ensure_secret(cluster: Cluster, workload: Obj) -> tuple[Credentials, bool]:
    """The agent's credentials, from the existing Secret or a new one owned by ``workload``; (credentials, created)."""
    namespace, name = workload["metadata"]["namespace"], inject.secret_name(workload["metadata"]["name"])
    owner = {
        "apiVersion": workload["apiVersion"],
        "kind": workload["kind"],
        "name": workload["metadata"]["name"],
        "uid": workload["metadata"]["uid"],
        "controller": False,
        "blockOwnerDeletion": False,
    }
    for _ in range(CONFLICT_RETRIES):
        try:
            secret = cluster.get("Secret", namespace, name)
        except NotFound:
            credentials = Credentials.generate()
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {MANAGED_BY[0]: MANAGED_BY[1], WORKLOAD_LABEL: workload["metadata"]["name"][:63]},
                    "ownerReferences": [owner],
                },
                "type": "Opaque",
                "data": {CREDENTIALS_KEY: base64.b64encode(credentials.to_json().encode()).decode()},
            }
            try:
                cluster.create(body)
            except Conflict:
                continue  # created meanwhile (another developer's start): read it
            log.info("created Secret %s in namespace %s", name, namespace)
            return credentials, True
        if (secret["metadata"].get("labels") or {}).get(MANAGED_BY[0]) != MANAGED_BY[1]:
            raise InjectError(
                f"Secret {name} in namespace {namespace} exists and was not created by intercept "
                f"(no label {MANAGED_BY[0]}={MANAGED_BY[1]}); the agent needs that name: rename or "
                "delete that Secret"
            )
        credentials = _credentials_of(secret)
        if owner["uid"] not in {r.get("uid") for r in secret["metadata"].get("ownerReferences") or []}:
            # Left over from an earlier workload of the same name: adopt it, or it would be collected.
            _put(cluster, secret, lambda cur: _with_owner(cur, owner))
        return credentials, False
    raise ClusterError(f"Secret {name} in namespace {namespace} kept appearing and disappearing; run the command again")


def _with_owner(secret: Obj, owner: Obj) -> Obj:
    secret = copy.deepcopy(secret)
    refs = [r for r in secret["metadata"].get("ownerReferences") or []
            if (r.get("kind"), r.get("name")) != (owner["kind"], owner["name"])]
    secret["metadata"]["ownerReferences"] = [*refs, owner]
    return secret


def _credentials_of(secret: Obj) -> Credentials:
    name, namespace = secret["metadata"]["name"], secret["metadata"].get("namespace")
    try:
        raw = base64.b64decode((secret.get("data") or {})[CREDENTIALS_KEY], validate=True)
        data = json.loads(raw)
        return Credentials(data["token"], data["host_public_key"], data.get("host_private_key"))
    except (KeyError, TypeError, ValueError, binascii.Error) as error:
        raise CredentialsError(
            f"Secret {name} in namespace {namespace} has no readable {CREDENTIALS_KEY} "
            f"({error.__class__.__name__}); delete it (kubectl delete secret {name} -n {namespace}) "
            "and run intercept uninstall, then start again"
        ) from None


def _public(credentials: Credentials) -> Credentials:
    return Credentials(credentials.token, credentials.host_public_key)


# --------------------------------------------------------------------------- writes


def _put(cluster: Cluster, first: Obj, compute: Callable[[Obj], Obj], *, fresh: bool = False) -> tuple[Obj, Obj]:
    """PUT ``compute(current)``; on 409 Conflict read ``current`` again and recompute.

    ``current`` is ``first`` (as just read), or with ``fresh`` a new read of the object
    ``first`` names. Returns the object as it was read last before the write (what a
    rollback reverts to) and as written (``current`` twice when there was nothing to write).
    """
    kind, namespace, name = first["kind"], first["metadata"]["namespace"], first["metadata"]["name"]
    current = cluster.get(kind, namespace, name) if fresh else first
    for attempt in range(1, CONFLICT_RETRIES + 1):
        desired = compute(current)
        if desired == current:
            return current, current
        try:
            written = cluster.replace(desired)
            log.info("updated %s/%s in namespace %s", kind, name, namespace)
            return current, {"apiVersion": desired["apiVersion"], "kind": kind, **written}
        except Conflict:
            log.info("%s/%s changed since it was read (attempt %d); reading it again", kind, name, attempt)
            current = cluster.get(kind, namespace, name)
    raise ClusterError(
        f"{kind}/{name} in namespace {namespace} kept changing while intercept updated it "
        f"({CONFLICT_RETRIES} conflicts in a row); run the command again"
    )


def _roll_back(cluster: Cluster, written: list[tuple[Obj, Obj]], secret: str | None, namespace: str) -> list[str]:
    """Put back what this call wrote, newest first; returns what was put back. Raises when it cannot."""
    done = []
    for before, ours in reversed(written):
        _put(cluster, before, lambda cur, b=before, o=ours: _revert(cur, b, o), fresh=True)  # type: ignore[misc]
        done.append(_key(before))
    if secret:
        try:
            cluster.delete("Secret", namespace, secret)
        except NotFound:
            pass
        done.append(f"Secret/{secret} (deleted)")
    return done


def _revert(current: Obj, before: Obj, ours: Obj) -> Obj:
    """``current`` with the spec fields our write changed, and our annotation, as in ``before``.

    Fields nobody asked us to change (an HPA's ``replicas``, a label added meanwhile) keep
    their current value.
    """
    result = copy.deepcopy(current)
    old, new = before.get("spec") or {}, ours.get("spec") or {}
    spec = result.setdefault("spec", {})
    for key in set(old) | set(new):
        if old.get(key, _MISSING) != new.get(key, _MISSING):
            if key in old:
                spec[key] = copy.deepcopy(old[key])
            else:
                spec.pop(key, None)
    metadata = result["metadata"]
    annotations = dict(metadata.get("annotations") or {})
    original = (before["metadata"].get("annotations") or {}).get(ANNOTATION)
    if original is None:
        annotations.pop(ANNOTATION, None)
    else:
        annotations[ANNOTATION] = original
    if annotations or "annotations" in before["metadata"]:
        metadata["annotations"] = annotations
    else:
        metadata.pop("annotations", None)
    return result


_MISSING = object()


# --------------------------------------------------------------------------- rollout


def _wait_rollout(cluster: Cluster, workload: Obj, progress: Progress, timeout: float, poll_interval: float,
                  interrupt: threading.Event | None = None) -> None:
    """Wait until ``workload`` is rolled out; raises :class:`_RolloutProblem` when it cannot be,
    :class:`Interrupted` when ``interrupt`` is set."""
    kind, namespace, name = workload["kind"], workload["metadata"]["namespace"], workload["metadata"]["name"]
    start = time.monotonic()
    shown = None
    pause = min(_FIRST_POLL, poll_interval)
    while True:
        current = cluster.get(kind, namespace, name)
        pods, _ = cluster.list("Pod", namespace, label_selector=format_selector(current["spec"]["selector"]))
        status = rollout_status(current, pods)
        if status.message != shown:
            progress(status.message)
            shown = status.message
        if status.done:
            return
        if status.failure:
            raise _RolloutProblem(status.failure, status.new_pods, status.unpulled)
        if status.replace_pod:
            try:
                cluster.delete("Pod", namespace, status.replace_pod)
            except NotFound:
                pass
        if time.monotonic() - start >= timeout:
            raise _RolloutProblem(f"the rollout did not finish within {timeout:g}s ({status.message})", status.new_pods)
        if interrupt is None:
            time.sleep(pause)
        elif interrupt.wait(pause):
            raise Interrupted()
        pause = min(pause * 2, poll_interval)


def _wait_app_gone(cluster: Cluster, workload: Obj, progress: Progress, timeout: float, poll_interval: float,
                   interrupt: threading.Event | None = None) -> None:
    """Wait until no pod of ``workload`` runs its app any more: a rollout is done while the
    pods it replaced still terminate, and a queue consumer among them may take one more item."""
    kind, namespace, name = workload["kind"], workload["metadata"]["namespace"], workload["metadata"]["name"]
    start = time.monotonic()
    pause = min(_FIRST_POLL, poll_interval)
    said = False
    while True:
        current = cluster.get(kind, namespace, name)
        container = (inject.running_upstream(current) or ("", 0))[0]
        pods, _ = cluster.list("Pod", namespace, label_selector=format_selector(current["spec"]["selector"]))
        running_app = [p["metadata"]["name"] for p in pods if not _stands_in(p, container)]
        if not running_app:
            return
        if not said:
            progress(f"{_key(current)}: waiting for the app to stop in {', '.join(running_app)}")
            said = True
        if time.monotonic() - start >= timeout:
            raise _RolloutProblem(f"the app still runs in {', '.join(running_app)} after {timeout:g}s",
                                  tuple(running_app))
        if interrupt is None:
            time.sleep(pause)
        elif interrupt.wait(pause):
            raise Interrupted()
        pause = min(pause * 2, poll_interval)


def _stands_in(pod: Obj, container: str) -> bool:
    """Whether ``pod``'s container ``container`` runs the stand-in (a pod that has finished runs nothing)."""
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return True
    spec = next((c for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == container), {})
    return tuple(spec.get("command") or ())[:2] == inject.STAND_IN_COMMAND


def put_back(api: ApiClient, namespace: str, service: str, replace_by: str, progress: Progress = _quiet) -> bool:
    """End ``replace_by``'s replace of the workload behind ``service``: its app container as it
    was (the pod template equal to the one before the replace; the agent stays, as after every
    intercept). One write, not waited for: leaving must end within ``intercept leave``'s and
    ``intercept down``'s grace, and the controllers roll the pods back to the app by
    themselves. False, writing nothing, when it is not replaced by ``replace_by`` (any more:
    uninstalled, or the workload is gone)."""
    cluster = Cluster(api)
    try:
        objects = _read_namespace(cluster, namespace, None)
        target = _resolve_any_port(objects, service)
    except (ResolveError, NotFound):
        return False
    index = _index(objects, target.workload_kind, target.workload_name)
    if inject.replaced_by(objects[index]) != replace_by:
        return False

    def unreplaced(current: Obj) -> Obj:
        if inject.replaced_by(current) != replace_by:
            return current  # uninstalled meanwhile
        running = inject.running_options(current, InjectOptions(image=AGENT_CONTAINER))  # the image is read back
        if target.has_service:  # in front of every port it serves, as they were
            running = dataclasses.replace(running, service_ports=_served_in_order(
                objects, service, inject.served_ports(current), []))
        view = [current if i == index else o for i, o in enumerate(objects)]
        return inject.inject(view, service, dataclasses.replace(running, replace_by=None))[index]

    _, written = _put(cluster, objects[index], unreplaced, fresh=True)
    if inject.replaced_by(written) is None:
        progress(f"{target.workload}: container {target.container} runs the app again (its pods are being replaced)")
    return True


def _events_for(cluster: Cluster, namespace: str, workload: Obj, error: BaseException) -> list[str]:
    """The events that explain a failed rollout: the new pods', the workload's and its ReplicaSets'."""
    pods = set(error.pods) if isinstance(error, _RolloutProblem) else set()
    name = workload["metadata"]["name"]
    try:
        events, _ = cluster.list("Event", namespace)
    except ClusterError as problem:
        log.warning("cannot read the events of namespace %s: %s", namespace, problem)
        return []

    def relevant(event: Obj) -> bool:
        involved = event.get("involvedObject") or {}
        kind, who = involved.get("kind"), involved.get("name", "")
        if event.get("reason") in _ROUTINE_EVENTS:
            return False
        if kind == "Pod" and who in pods:
            return True
        owned = who == name or (kind in ("ReplicaSet", "Pod") and who.startswith(f"{name}-"))
        return owned and (kind == workload["kind"] or kind == "ReplicaSet" or event.get("type") == "Warning")

    chosen = sorted(filter(relevant, events), key=_event_time)
    lines: list[str] = []
    for event in chosen:
        involved = event["involvedObject"]
        count = event.get("count") or 1
        line = (f"{involved.get('kind')}/{involved.get('name')}: {event.get('reason')}: "
                f"{(event.get('message') or '').strip()}" + (f" (x{count})" if count > 1 else ""))
        if line not in lines:
            lines.append(line)
    return lines[-_MAX_EVENTS:]


def _event_time(event: Obj) -> str:
    return event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or ""


def _fix(error: BaseException) -> str:
    """What to do about a failed write or rollout."""
    reason = str(error)
    unpulled = error.unpulled if isinstance(error, _RolloutProblem) else None
    if unpulled is not None and unpulled[0] == AGENT_CONTAINER:
        return how_to_provide(unpulled[1])
    if unpulled is not None:
        return f"check that the cluster can pull {unpulled[1]} (the workload's own image, which intercept does not change)"
    if "CrashLoopBackOff" in reason:
        return "check the agent's logs (kubectl logs POD -c intercept-agent --previous) and report it"
    if "did not finish within" in reason:
        return "check the pods, or allow more time with --timeout"
    return "fix the cause above and run the command again"


def _failure(doing: str, what: str, events: list[str], put_back: list[str], fix: str) -> RolloutFailed:
    shown = f"; events: {' | '.join(events)}" if events else ""
    back = (f"; put back {', '.join(put_back)}, nothing was left half-injected" if put_back
            else "; nothing was changed")
    return RolloutFailed(f"{doing} failed: {what}{shown}{back}; {fix}", events)


# --------------------------------------------------------------------------- uninstall


def uninstall(
    api: ApiClient,
    namespace: str,
    service: str | None = None,
    *,
    all: bool = False,  # noqa: A002 - the CLI's --all
    progress: Progress = _quiet,
    timeout: float = DEFAULT_TIMEOUT,
    poll_interval: float = POLL_INTERVAL,
) -> Uninstalled:
    """Remove the agent behind ``service`` (or every agent in ``namespace`` with ``all``) and restore exactly.

    Idempotent: where there is no agent it changes nothing (``result.changed`` is False).
    When the Service is already gone, its agent is found by its own record: the injected
    workload of that name (``service`` may also name the workload itself); with no agent
    left in the namespace there is nothing to do, and with agents on other workloads only,
    a :class:`ResolveError` names them. ``intercept-connect`` (where no Service has that
    name) is intercept connect's own agent, which ``all`` removes too
    (:mod:`intercept.kube.connect_agent`: its Deployment and Secret are deleted).
    """
    from intercept.kube import connect_agent

    if (service is None) == (not all):
        raise InjectError("uninstall takes a SERVICE or --all, not both" if service else
                          "uninstall needs a SERVICE, or --all for every agent in the namespace")
    cluster = Cluster(api)
    objects = _read_namespace(cluster, namespace, None)
    workload_key = None
    secrets: list[str] = []
    own = Uninstalled(namespace, (), ())  # intercept connect's agent, deleted
    if service is not None and any(o["kind"] == "Service" and o["metadata"]["name"] == service for o in objects):
        target = _resolve_any_port(objects, service)
        workload_key = target.workload
        secrets = [inject.secret_name(target.workload_name)]
    elif service == connect_agent.NAME:
        return connect_agent.remove(api, namespace, progress)
    elif service is not None:
        orphan = _agent_without_service(objects, namespace, service)
        if orphan is None:
            return Uninstalled(namespace, (), ())
        progress(f"Service/{service} is gone; removing the agent of {_key(orphan)}")
        workload_key = _key(orphan)
        secrets = [inject.secret_name(orphan["metadata"]["name"])]
    else:
        own = connect_agent.remove(api, namespace, progress)
        listed, _ = cluster.list("Secret", namespace, label_selector=f"{MANAGED_BY[0]}={MANAGED_BY[1]}")
        secrets = sorted(s["metadata"]["name"] for s in listed)
    restored = inject.restore(objects, workload_key)
    changed = [i for i, (old, new) in enumerate(zip(objects, restored)) if old != new]
    for line in inject.describe_changes(objects, restored):
        progress(line)

    def write(kinds: tuple[str, ...]) -> list[Obj]:
        done = []
        for i in changed:
            if objects[i]["kind"] in kinds:
                done.append(_put(cluster, objects[i], lambda cur: _substituted_restore(objects, i, cur, workload_key))[1])
        return done

    # Services first (back to the app's port, which the app serves all along), then the
    # workloads; the policies only once the agent pods that need their port are gone.
    written = write(("Service",))
    workloads = write(inject.WORKLOAD_KINDS)
    for w in workloads:
        _wait_restored(cluster, namespace, w, progress, timeout, poll_interval)
    written += workloads + write(("NetworkPolicy",))

    deleted = []
    for name in secrets:
        _delete_routes(cluster, namespace, name, progress)
        try:
            secret = cluster.get("Secret", namespace, name)
        except NotFound:
            continue
        if (secret["metadata"].get("labels") or {}).get(MANAGED_BY[0]) != MANAGED_BY[1]:
            log.warning("Secret %s in namespace %s was not created by intercept; kept", name, namespace)
            continue
        try:
            cluster.delete("Secret", namespace, name)
        except NotFound:
            continue
        deleted.append(name)
        progress(f"Secret/{name}: deleted")
    return Uninstalled(namespace, tuple(_key(o) for o in written), (*deleted, *own.secrets_deleted), own.deleted)


def _delete_routes(cluster: Cluster, namespace: str, name: str, progress: Progress) -> None:
    """The sandboxes' routes ConfigMap of an uninstalled agent (named like its Secret) goes too."""
    try:
        routes = cluster.get("ConfigMap", namespace, name)
    except NotFound:
        return
    if (routes["metadata"].get("labels") or {}).get(MANAGED_BY[0]) != MANAGED_BY[1]:
        return
    sandboxes = json.loads((routes.get("data") or {}).get(inject.ROUTES_KEY) or "{}").get("routes") or []
    if sandboxes:
        log.warning("the routes of sandboxes %s to %s go with its agent", sorted({r.get("sandbox") for r in sandboxes}), name)
    try:
        cluster.delete("ConfigMap", namespace, name)
    except NotFound:
        return
    progress(f"ConfigMap/{name}: deleted")
    drop_unused_authority(cluster, namespace, progress)


def drop_unused_authority(cluster: Cluster, namespace: str, progress: Progress) -> None:
    """The namespace's routes authority (its Secret) goes with its last routes ConfigMap: no
    agent is left to trust it, and the namespace is left as it was."""
    maps, _ = cluster.list("ConfigMap", namespace, label_selector=f"{MANAGED_BY[0]}={MANAGED_BY[1]}")
    if any(inject.ROUTES_KEY in (cm.get("data") or {}) for cm in maps):
        return
    try:
        cluster.delete("Secret", namespace, inject.AUTHORITY_SECRET)
    except NotFound:
        return
    progress(f"Secret/{inject.AUTHORITY_SECRET}: deleted (no routes ConfigMap is left)")


def _substituted_restore(objects: list[Obj], i: int, current: Obj, workload: str | None) -> Obj:
    view = list(objects)
    view[i] = current
    return inject.restore(view, workload)[i]


def _wait_restored(cluster: Cluster, namespace: str, workload: Obj, progress: Progress,
                   timeout: float, poll_interval: float) -> None:
    try:
        _wait_rollout(cluster, workload, progress, timeout, poll_interval)
    except _RolloutProblem as problem:
        events = _events_for(cluster, namespace, workload, problem)
        shown = f"; events: {' | '.join(events)}" if events else ""
        raise RolloutFailed(
            f"{_ref(workload)} is restored as it was before injection, but its rollout failed: "
            f"{problem.reason}{shown}; its pods need attention (kubectl get pods -n {namespace}); "
            "run uninstall again to finish restoring the network policies and the Secret",
            events,
        ) from None


def _agent_without_service(objects: list[Obj], namespace: str, service: str) -> Obj | None:
    """The injected workload named ``service`` (whose Service was deleted), or None when the
    namespace has no agent at all (nothing to uninstall); otherwise a ResolveError that names
    the workloads that do have one."""
    injected = [o for o in objects if o["kind"] in inject.WORKLOAD_KINDS and inject.is_injected(o)]
    for workload in injected:
        if workload["metadata"]["name"] == service:
            return workload
    if not injected:
        return None
    known = ", ".join(sorted(_key(o) for o in injected))
    services = ", ".join(sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Service")) or "none"
    raise ResolveError(
        f"no Service named {service!r} in namespace {namespace} (Services there: {services}), and no agent on "
        f"a workload of that name; the agents there are on {known}: name the workload, e.g. "
        f"intercept uninstall {sorted(o['metadata']['name'] for o in injected)[0]}, or use --all"
    )


def _resolve_any_port(objects: list[Obj], service: str) -> inject.Target:
    """The workload behind ``service`` through any of its ports (every port leads to the same pods)."""
    try:
        return inject.resolve(objects, service)
    except ResolveError as first:
        svc = next((o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == service), None)
        for port in ((svc or {}).get("spec") or {}).get("ports") or []:
            try:
                return inject.resolve(objects, service, port["port"])
            except ResolveError:
                continue
        raise first from None


# --------------------------------------------------------------------------- list


def list_services(
    api: ApiClient,
    namespace: str | None,
    *,
    routes: Callable[[AgentInfo], list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Every Service (of ``namespace``, or of all namespaces with None): can it be intercepted, has it an agent.

    Each row: ``namespace``, ``service``, ``interceptable`` (bool), ``reason`` (why not,
    else None), ``workload`` (``Kind/name`` or None), ``ports`` (the Service ports that
    can be intercepted), ``agent`` (bool), ``agentVersion``, ``agentImage`` and
    ``routes``: None, unless ``routes`` is given: then it is called with the
    :class:`AgentInfo` of each Service that has an agent and its answer is the row's
    ``routes`` (the tunnel side asks the agents; a failure there should return a list
    with one ``{"error": ...}`` entry rather than raise).
    """
    cluster = Cluster(api)
    by_namespace: dict[str, list[Obj]] = {}
    for kind in ("Service", *inject.WORKLOAD_KINDS):
        items, _ = cluster.list(kind, namespace)
        for obj in items:
            if kind == "ReplicaSet" and _controlled_by_deployment(obj):
                continue
            by_namespace.setdefault(obj["metadata"]["namespace"], []).append(obj)
    rows = []
    for ns in sorted(by_namespace):
        objects = by_namespace[ns]
        for svc in sorted((o for o in objects if o["kind"] == "Service"), key=lambda o: o["metadata"]["name"]):
            rows.append(_service_row(cluster, ns, objects, svc, routes))
    return rows


def _service_row(cluster: Cluster, ns: str, objects: list[Obj], svc: Obj,
                 routes: Callable[[AgentInfo], list[dict[str, Any]]] | None) -> dict[str, Any]:
    name = svc["metadata"]["name"]
    row: dict[str, Any] = {"namespace": ns, "service": name, "interceptable": False, "reason": None,
                           "workload": None, "ports": [], "agent": False, "agentVersion": None,
                           "agentImage": None, "routes": None}
    target = None
    reason = None
    for port in (svc.get("spec") or {}).get("ports") or [None]:
        try:
            found = inject.resolve(objects, name, port["port"] if port else None)
        except ResolveError as error:
            reason = reason or str(error)
            continue
        target = target or found
        row["ports"].append({"port": found.service_port, "name": found.service_port_name,
                             "targetPort": found.target_port, "container": found.container,
                             "containerPort": found.container_port})
    if target is None:
        row["reason"] = reason
        return row
    row["interceptable"] = True
    row["workload"] = target.workload
    workload = objects[_index(objects, target.workload_kind, target.workload_name)]
    if inject.is_injected(workload):
        pod = workload["spec"]["template"]["spec"]
        agent = next((c for c in pod["containers"] if c["name"] == AGENT_CONTAINER), {})
        row.update(agent=True, agentVersion=_agent_version(workload), agentImage=agent.get("image"))
        if routes is not None:
            info = AgentInfo(
                namespace=ns, service=name, workload_kind=target.workload_kind,
                workload_name=target.workload_name,
                selector=format_selector(workload["spec"]["selector"]),
                http_port=(agent_ports(pod) or (0, 0))[0], ssh_port=(agent_ports(pod) or (0, 0))[1],
                credentials=Credentials("", ""),
                agent_version=row["agentVersion"] or "", image=row["agentImage"] or "",
            )
            try:
                credentials = agent_credentials(cluster.api, ns, target.workload_name)
            except CredentialsError as error:
                row["routes"] = [{"error": str(error)}]
            else:
                row["routes"] = routes(dataclasses.replace(info, credentials=credentials))
    return row


# --------------------------------------------------------------------------- reading


def _read_namespace(cluster: Cluster, namespace: str, service: str | None) -> list[Obj]:
    """The objects resolve, inject and restore need: Services, workloads, NetworkPolicies.

    All Services, so that restore finds every one pointed at an agent. ReplicaSets that a
    Deployment controls are left out: the Deployment is what changes. With ``service``,
    a missing Service is a :class:`ResolveError` naming the namespace's Services.
    """
    services, _ = cluster.list("Service", namespace)
    if service is not None and not any(s["metadata"]["name"] == service for s in services):
        known = ", ".join(sorted(s["metadata"]["name"] for s in services)) or "none"
        raise ResolveError(
            f"no Service named {service!r} in namespace {namespace} (Services there: {known}); "
            "check the name, or pick the namespace with -n NAMESPACE"
        )
    objects = list(services)
    for kind in (*inject.WORKLOAD_KINDS, "NetworkPolicy"):
        items, _ = cluster.list(kind, namespace)
        objects += [o for o in items if not (kind == "ReplicaSet" and _controlled_by_deployment(o))]
    return objects


def _controlled_by_deployment(obj: Obj) -> bool:
    return any(r.get("controller") and r.get("kind") == "Deployment"
               for r in obj["metadata"].get("ownerReferences") or [])


def _agent_version(workload: Obj) -> str | None:
    """The agent version the record (format in :mod:`intercept.kube.inject`) names."""
    raw = (workload["metadata"].get("annotations") or {}).get(ANNOTATION)
    try:
        return json.loads(raw).get("agentVersion") if raw else None
    except (ValueError, AttributeError):
        return None


def _index(objects: list[Obj], kind: str, name: str) -> int:
    return next(i for i, o in enumerate(objects) if o["kind"] == kind and o["metadata"]["name"] == name)


def _key(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _ref(obj: Obj) -> str:
    return f"{_key(obj)} in namespace {obj['metadata'].get('namespace')}"
