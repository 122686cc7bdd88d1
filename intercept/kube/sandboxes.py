"""Sandboxes in a live cluster: create, list, extend, delete, and collect what expired.

:func:`create` forks each Service (:mod:`intercept.kube.sandbox` computes the objects),
makes sure the original workloads run the agent (:func:`~intercept.kube.apply.ensure_agent`),
creates the forks, optionally waits for them to be ready, and writes the sandbox's routes
into each original workload's routes ConfigMap (``intercept-<workload>``, mounted into its
agents). If anything fails after the first write, everything it created is removed before
the error is raised, with the pod's reason when a fork did not become ready.

Nothing here talks to an agent: each function returns the :class:`Change` per workload
(the agent's :class:`~intercept.kube.apply.AgentInfo`, the new routes document and the
routes authority that signs it) so the caller can push the routes at once (the mounted
file follows when the kubelet refreshes it). All functions block; call them from async
code with ``asyncio.to_thread``.

The routes authority (:func:`routes_authority`): agents take a pushed document only when
it is signed by the key in the namespace's Secret ``intercept.routes-authority``, whose
public half every routes ConfigMap carries (:mod:`intercept.routing.cluster`). So reading
that Secret is what pushing takes; the agents' token is not enough. :func:`create` makes
the Secret when absent and writes the key into each routes ConfigMap before it injects an
agent, so that the agent's pods mount it from their start (pods that started before the
ConfigMap existed refuse pushes until the kubelet refreshes their volume, and then apply
the file). The Secret goes with the namespace's last routes ConfigMap
(:func:`~intercept.kube.apply.drop_unused_authority`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kubernetes.client import ApiClient

from intercept.errors import InterceptError, UsageError
from intercept.kube import connect_agent, inject, sandbox
from intercept.kube.apply import (
    MANAGED_BY,
    AgentInfo,
    InjectOptions,
    RolloutFailed,
    _events_for,
    _read_namespace,
    _wait_rollout,
    _RolloutProblem,
    drop_unused_authority,
    ensure_agent,
    list_services,
    uninstall,
)
from intercept.kube.rest import Cluster, Conflict, NotFound
from intercept.kube.sandbox import SANDBOX_LABEL, Fork, Overrides
from intercept.routing.cluster import RoutesAuthority, RoutesDocument
from intercept.routing.match import Route

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Progress = Callable[[str], None]
CONFLICT_RETRIES = 5


@dataclass(frozen=True)
class Change:
    """The routes document now in a workload's ConfigMap, for its agents, and the routes
    authority that signs it for a push (None: the namespace has none, so nothing is pushed)."""

    agent: AgentInfo
    document: RoutesDocument
    authority: RoutesAuthority | None


@dataclass(frozen=True)
class Created:
    name: str
    namespace: str
    forks: tuple[Fork, ...]
    expires: float
    changes: tuple[Change, ...]


def _quiet(_: str) -> None:
    pass


def create(api: ApiClient, namespace: str, name: str, services: list[str], overrides: Overrides, *,
           ttl: float, keys: list[Route] | None = None, inject_options: InjectOptions, wait: bool = True,
           timeout: float = 300.0, progress: Progress = _quiet) -> Created:
    """Create sandbox ``name`` forking ``services`` (see the module docstring). ``keys``: the
    routes that reach the forks (default: the header or baggage key of :func:`sandbox.default_routes`)."""
    if not services:
        raise UsageError("a sandbox forks at least one Service: --fork SERVICE")
    cluster = Cluster(api)
    if _sandbox_objects(cluster, namespace, name):
        raise UsageError(f"sandbox {name} already exists in namespace {namespace}; delete it first "
                         f"(intercept sandbox delete {name} -n {namespace}) or choose another name")
    expires = time.time() + ttl
    objects = _read_namespace(cluster, namespace, None)
    forks = [sandbox.plan(objects, service, name, overrides, expires) for service in services]  # all checked before a write
    keys = keys or sandbox.default_routes(name)
    authority = routes_authority(cluster, namespace, create=True)
    created: list[Obj] = []
    changes: list[Change] = []
    unmounted: str | None = None  # a routes ConfigMap made here for an agent not in place yet
    try:
        agents = []
        for fork in forks:
            progress(f"{fork.original}: making sure its agent is in place")
            # the authority's key in the ConfigMap first: pods that the injection starts mount it
            if _update_routes(cluster, namespace, fork.original_name, lambda doc: doc, authority)[1]:
                unmounted = fork.original_name
            agents.append(ensure_agent(api, namespace, fork.service, inject_options, progress, timeout=timeout))
            unmounted = None
        for fork in forks:
            for obj in (fork.workload, fork.fork_service):
                created.append(cluster.create(obj) | {"kind": obj["kind"], "apiVersion": obj["apiVersion"]})
                progress(f"{obj['kind']}/{obj['metadata']['name']}: created")
        if wait:
            for fork in forks:
                _wait_fork(cluster, namespace, fork, progress, timeout)
        for fork, agent in zip(forks, agents, strict=True):
            document, _ = _update_routes(cluster, namespace, fork.original_name, lambda doc, f=fork: doc.with_routes(
                sandbox.routes(name, f, keys, expires), time.time()), authority)
            changes.append(Change(agent, document, authority))
            progress(f"ConfigMap/{inject.routes_name(fork.original_name)}: routes of sandbox {name} to {fork.destination[0]}")
    except BaseException as error:
        removed = _remove(cluster, namespace, name, created, [f.original_name for f in forks])
        if unmounted is not None and not _routes_document(cluster, namespace, unmounted).routes:
            try:
                cluster.delete("ConfigMap", namespace, inject.routes_name(unmounted))
            except NotFound:
                pass
            drop_unused_authority(cluster, namespace, progress)
        if isinstance(error, _RolloutProblem):
            events = _events_for(cluster, namespace, created[0], error) if created else []
            shown = f"; events: {' | '.join(events)}" if events else ""
            raise RolloutFailed(f"sandbox {name}: a fork did not become ready: {error.reason}{shown}; "
                                f"removed what it created ({', '.join(removed) or 'nothing'})", events) from None
        raise
    return Created(name, namespace, tuple(forks), expires, tuple(changes))


def delete(api: ApiClient, namespace: str, name: str, progress: Progress = _quiet) -> tuple[list[str], list[Change]]:
    """Remove every object of sandbox ``name`` and its routes; idempotent. Returns what was
    deleted and the routes changes to push."""
    cluster = Cluster(api)
    objects = _sandbox_objects(cluster, namespace, name)
    originals = sorted({(o["metadata"].get("labels") or {}).get(sandbox.FORK_OF_LABEL, "") for o in objects} - {""})
    originals += [w for w in _routed_workloads(cluster, namespace, name) if w not in originals]
    removed = _remove(cluster, namespace, name, objects, originals)
    for line in removed:
        progress(f"{line}: deleted")
    return removed, _changes(cluster, api, namespace, originals, routes_authority(cluster, namespace))


def extend(api: ApiClient, namespace: str, name: str, ttl: float) -> tuple[float, list[Change]]:
    """Move sandbox ``name``'s expiry to ``ttl`` from now (on its objects and its routes)."""
    cluster = Cluster(api)
    objects = _sandbox_objects(cluster, namespace, name)
    if not objects:
        raise UsageError(f"no sandbox {name} in namespace {namespace}; see intercept sandbox list -n {namespace}")
    expires = time.time() + ttl
    for obj in objects:
        _put_retrying(cluster, obj, lambda cur: _annotated(cur, sandbox.EXPIRES_ANNOTATION, sandbox.expiry_text(expires)))
    originals = _routed_workloads(cluster, namespace, name)
    authority = routes_authority(cluster, namespace)
    for original in originals:
        _update_routes(cluster, namespace, original, lambda doc: replace(doc, updated=time.time(), routes=tuple(
            r if r.sandbox != name else replace(r, expires=expires) for r in doc.routes)), authority)
    return expires, _changes(cluster, api, namespace, originals, authority)


def list_sandboxes(api: ApiClient, namespace: str | None) -> list[dict[str, Any]]:
    """Every sandbox (of ``namespace``, or all with None): its forks, key, expiry and readiness."""
    cluster = Cluster(api)
    deployments, _ = cluster.list("Deployment", namespace, label_selector=SANDBOX_LABEL)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    now = time.time()
    for d in deployments:
        ns, labels = d["metadata"]["namespace"], d["metadata"].get("labels") or {}
        name = labels[SANDBOX_LABEL]
        expires = sandbox.expiry_of(d)
        row = rows.setdefault((ns, name), {"namespace": ns, "sandbox": name, "forks": [], "expires": expires,
                                            "expired": expires is not None and expires <= now, "ready": True})
        status = d.get("status") or {}
        ready = (status.get("readyReplicas") or 0) >= 1
        row["ready"] = row["ready"] and ready
        row["forks"].append({"service": (d["metadata"].get("annotations") or {}).get(sandbox.SERVICE_ANNOTATION),
                             "workload": d["metadata"]["name"], "ready": ready})
    for row in rows.values():
        row["key"] = f"{sandbox.KEY_HEADER}: {row['sandbox']} (or baggage {sandbox.KEY_BAGGAGE}={row['sandbox']})"
        row["expiresAt"] = sandbox.expiry_text(row["expires"]) if row["expires"] else None
    return sorted(rows.values(), key=lambda r: (r["namespace"], r["sandbox"]))


@dataclass(frozen=True)
class Collected:
    """What :func:`gc` removed (or, with ``dry_run``, would remove)."""

    sandboxes: tuple[str, ...]  # NAMESPACE/NAME
    agents: tuple[str, ...]  # NAMESPACE/SERVICE whose agent was uninstalled
    changes: tuple[Change, ...]


def gc(api: ApiClient, namespace: str | None, *, idle: float, idle_of: Callable[[AgentInfo], float | None],
       dry_run: bool = False, timeout: float = 300.0, progress: Progress = _quiet) -> Collected:
    """Delete expired sandboxes; uninstall agents with no sandbox route that nobody has used for
    ``idle`` seconds (``idle_of`` asks an agent; None: it did not answer, so it is kept)."""
    cluster = Cluster(api)
    expired = [r for r in list_sandboxes(api, namespace) if r["expired"]]
    changes: list[Change] = []
    for row in expired:
        progress(f"sandbox {row['namespace']}/{row['sandbox']}: expired at {row['expiresAt']}"
                 + ("; would delete it" if dry_run else "; deleting it"))
        if not dry_run:
            changes += delete(api, row["namespace"], row["sandbox"], progress)[1]
    agents: list[str] = []
    namespaces = [namespace] if namespace else sorted({s["metadata"]["namespace"] for s in cluster.list("Secret", None,
                                                       label_selector=f"{MANAGED_BY[0]}={MANAGED_BY[1]}")[0]})
    for ns in namespaces:
        infos: list[AgentInfo] = []
        list_services(api, ns, routes=lambda info: infos.append(info) or [])
        for info in infos:
            if _routes_document(cluster, ns, info.workload_name).routes and not dry_run:
                continue  # a sandbox still routes through this agent
            seconds = idle_of(info)
            if seconds is None or seconds < idle:
                continue
            progress(f"{info.workload} in namespace {ns}: no session or sandbox for {seconds:.0f}s"
                     + ("; would uninstall its agent" if dry_run else "; uninstalling its agent"))
            if not dry_run:
                uninstall(api, ns, info.service, progress=progress, timeout=timeout)
            agents.append(f"{ns}/{info.service}")
        if _connect_agent_idle(api, ns, idle, idle_of, progress, dry_run):
            agents.append(f"{ns}/{connect_agent.NAME}")
    return Collected(tuple(f"{r['namespace']}/{r['sandbox']}" for r in expired), tuple(agents), tuple(changes))


def _connect_agent_idle(api: ApiClient, namespace: str, idle: float, idle_of: Callable[[AgentInfo], float | None],
                        progress: Progress, dry_run: bool) -> bool:
    """Remove intercept connect's own agent of ``namespace`` when it has been idle for ``idle``
    seconds (no session reached the cluster through it; asked twice, the second time just
    before the delete) or has had no ready pod for as long; whether it was (or would be).

    The delete carries the Deployment's resourceVersion as read: one that changed since (a
    connect recreated it, its pod restarted) is kept. A connect that logs in after the
    second question and before the delete is still cut: the window is one request long."""
    def kept(why: str) -> bool:
        progress(f"intercept connect's own agent in namespace {namespace}: kept: {why}")
        return False

    try:
        workload = connect_agent.read(api, namespace)
    except InterceptError as e:
        return kept(str(e))
    if workload is None:
        return False
    unready = connect_agent.unready_for(workload, time.time())
    if unready is not None:
        if unready < idle:
            return False
        why = f"no ready pod for {unready:.0f}s"
    else:
        try:
            info = connect_agent.info_of(api, namespace, workload)
        except InterceptError as e:
            return kept(str(e))
        seconds = idle_of(info)
        if seconds is None or seconds < idle:
            return False
        if not dry_run:
            again = idle_of(info)  # just before the delete: a connect may have logged in since
            if again is None or again < idle:
                return kept("a session reached the cluster through it while gc asked")
        why = f"no session for {seconds:.0f}s"
    progress(f"intercept connect's own agent in namespace {namespace}: {why}"
             + ("; would remove it" if dry_run else "; removing it"))
    if not dry_run:
        try:
            connect_agent.remove(api, namespace, progress, resource_version=workload["metadata"]["resourceVersion"])
        except Conflict:
            return kept("it changed since gc read it (a connect may be starting it)")
    return True


# --------------------------------------------------------------------------- plumbing


def _sandbox_objects(cluster: Cluster, namespace: str, name: str) -> list[Obj]:
    selector = f"{SANDBOX_LABEL}={name}"
    objects = []
    for kind in ("Deployment", "Service"):
        objects += cluster.list(kind, namespace, label_selector=selector)[0]
    return objects


def _routed_workloads(cluster: Cluster, namespace: str, name: str) -> list[str]:
    """The workloads whose routes ConfigMap holds routes of sandbox ``name``."""
    maps, _ = cluster.list("ConfigMap", namespace, label_selector=f"{MANAGED_BY[0]}={MANAGED_BY[1]}")
    found = []
    for cm in maps:
        try:
            document = RoutesDocument.from_text((cm.get("data") or {}).get(inject.ROUTES_KEY, "{}"))
        except InterceptError:
            continue
        if name in document.sandboxes():
            found.append(cm["metadata"]["labels"].get("intercept.dev/workload", ""))
    return [w for w in found if w]


def _routes_document(cluster: Cluster, namespace: str, workload: str) -> RoutesDocument:
    try:
        cm = cluster.get("ConfigMap", namespace, inject.routes_name(workload))
    except NotFound:
        return RoutesDocument(0.0)
    return RoutesDocument.from_text((cm.get("data") or {}).get(inject.ROUTES_KEY, "{}"))


def _update_routes(cluster: Cluster, namespace: str, workload: str, change: Callable[[RoutesDocument], RoutesDocument],
                   authority: RoutesAuthority | None) -> tuple[RoutesDocument, bool]:
    """Read-modify-write the routes ConfigMap of ``workload`` (created when absent), naming
    ``authority`` (None: the one it names stays); the document, and whether it was created."""
    name = inject.routes_name(workload)

    def changed(document: RoutesDocument) -> RoutesDocument:
        return replace(change(document), authority=authority.public if authority is not None else document.authority)

    for _ in range(CONFLICT_RETRIES):
        try:
            current = cluster.get("ConfigMap", namespace, name)
        except NotFound:
            document = changed(RoutesDocument(0.0))
            cm = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": name, "namespace": namespace,
                               "labels": {MANAGED_BY[0]: MANAGED_BY[1], "intercept.dev/workload": workload}},
                  "data": {inject.ROUTES_KEY: document.to_text()}}
            try:
                cluster.create(cm)
                return document, True
            except Conflict:
                continue  # created meanwhile: read it
        text = (current.get("data") or {}).get(inject.ROUTES_KEY, "{}")
        document = changed(RoutesDocument.from_text(text))
        if document.to_text() == text:
            return document, False
        current["data"] = {**(current.get("data") or {}), inject.ROUTES_KEY: document.to_text()}
        try:
            cluster.replace(current | {"kind": "ConfigMap", "apiVersion": "v1"})
            return document, False
        except Conflict:
            continue
    raise InterceptError(f"ConfigMap/{name} in namespace {namespace} kept changing; run the command again")


def routes_authority(cluster: Cluster, namespace: str, *, create: bool = False) -> RoutesAuthority | None:
    """The namespace's routes authority, from its Secret; with ``create`` a new one when it has
    none (else None)."""
    name = inject.AUTHORITY_SECRET
    for _ in range(CONFLICT_RETRIES):
        try:
            secret = cluster.get("Secret", namespace, name)
        except NotFound:
            if not create:
                return None
            authority = RoutesAuthority.generate()
            try:
                cluster.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                "metadata": {"name": name, "namespace": namespace, "labels": {MANAGED_BY[0]: MANAGED_BY[1]}},
                                "data": {inject.AUTHORITY_KEY: base64.b64encode(authority.private_key).decode()}})
            except Conflict:
                continue  # created meanwhile (another sandbox create): read it
            log.info("created Secret %s in namespace %s", name, namespace)
            return authority
        try:
            key = base64.b64decode((secret.get("data") or {})[inject.AUTHORITY_KEY], validate=True)
            if len(key) != 32:
                raise ValueError("not an Ed25519 key")
            return RoutesAuthority(key)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise InterceptError(f"Secret {name} in namespace {namespace} has no readable {inject.AUTHORITY_KEY}; delete it "
                                 f"(kubectl delete secret {name} -n {namespace}) and create a sandbox: that makes a new "
                                 "one (pushes are refused until the agents' ConfigMaps name it)") from None
    raise InterceptError(f"Secret {name} in namespace {namespace} kept appearing and disappearing; run the command again")


def _changes(cluster: Cluster, api: ApiClient, namespace: str, workloads: list[str],
             authority: RoutesAuthority | None) -> list[Change]:
    """The routes now in force for each of ``workloads`` whose agent is in place."""
    infos: dict[str, AgentInfo] = {}
    list_services(api, namespace, routes=lambda info: infos.setdefault(info.workload_name, info) and [])
    return [Change(infos[w], _routes_document(cluster, namespace, w), authority) for w in workloads if w in infos]


def _remove(cluster: Cluster, namespace: str, name: str, objects: list[Obj], originals: list[str]) -> list[str]:
    """Delete ``objects`` and the sandbox's routes from the ConfigMaps of ``originals``."""
    removed = []
    for obj in objects:
        try:
            cluster.delete(obj["kind"], namespace, obj["metadata"]["name"])
            removed.append(f"{obj['kind']}/{obj['metadata']['name']}")
        except NotFound:
            pass
    for original in originals:
        if name in _routes_document(cluster, namespace, original).sandboxes():
            _update_routes(cluster, namespace, original, lambda doc: doc.without(name, time.time()), None)
            removed.append(f"routes of sandbox {name} to {original}")
    return removed


def _wait_fork(cluster: Cluster, namespace: str, fork: Fork, progress: Progress, timeout: float) -> None:
    progress(f"Deployment/{fork.workload['metadata']['name']}: waiting for the fork to be ready")
    _wait_rollout(cluster, cluster.get("Deployment", namespace, fork.workload["metadata"]["name"]) | {
        "kind": "Deployment", "apiVersion": "apps/v1"}, progress, timeout, 1.0)


def _annotated(obj: Obj, key: str, value: str) -> Obj:
    changed = {**obj, "metadata": {**obj["metadata"], "annotations": {**(obj["metadata"].get("annotations") or {}), key: value}}}
    return changed


def _put_retrying(cluster: Cluster, obj: Obj, compute: Callable[[Obj], Obj]) -> None:
    current = obj
    for _ in range(CONFLICT_RETRIES):
        try:
            cluster.replace(compute(current))
            return
        except Conflict:
            current = cluster.get(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]) | {
                "kind": obj["kind"], "apiVersion": obj["apiVersion"]}
    raise InterceptError(f"{obj['kind']}/{obj['metadata']['name']} kept changing; run the command again")
