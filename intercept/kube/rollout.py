"""Is a rollout done, still going, or failed? A pure decision over a workload and its pods.

:func:`rollout_status` reads what ``kubectl rollout status`` reads (``observedGeneration``,
``updatedReplicas``, ``availableReplicas``/``readyReplicas``, the revisions of a
StatefulSet, the Deployment's conditions) and gives kubectl's progress lines. On top of
that it looks at the pods that run the new template, so that a rollout which cannot
succeed (an image that cannot be pulled, a crash loop, pods the admission refused) fails
at once instead of at the timeout.

Controllers that do not replace pods when the template changes (a bare ReplicaSet, a
StatefulSet with ``updateStrategy: OnDelete``) get their pods replaced one at a time:
the status names the next pod to delete, only once every other pod is ready.
``kube/apply.py`` performs the deletion; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from intercept.kube.inject import AGENT_CONTAINER

Obj = dict[str, Any]

# Waiting reasons from which a container does not recover by itself.
FATAL_REASONS = frozenset({
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
})
# Of those, the reasons that say the image cannot be had (not pulled, or not a valid name).
PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "ErrImageNeverPull", "InvalidImageName"})


@dataclass(frozen=True)
class RolloutStatus:
    """One look at a rollout: ``done``, or a progress ``message``; ``failure`` says why it cannot succeed."""

    done: bool
    message: str
    failure: str | None = None
    replace_pod: str | None = None  # delete this pod so that its controller recreates it from the template
    new_pods: tuple[str, ...] = ()  # the pods that run the new template (their events explain a failure)
    unpulled: tuple[str, str] | None = None  # (container, image) whose image cannot be pulled: the failure's cause


def rollout_status(workload: Obj, pods: list[Obj]) -> RolloutStatus:
    """The rollout of ``workload`` (Deployment, StatefulSet, ReplicaSet) given the pods its selector matches."""
    kind = workload.get("kind")
    template = workload["spec"]["template"]
    new = [p for p in pods if runs_template(p, template) and not _terminating(p)]
    new_names = tuple(sorted(_name(p) for p in new))
    failure, unpulled = _pod_failure(new) or (_condition_failure(workload), None)
    if kind == "Deployment":
        status = _deployment(workload)
    elif kind == "StatefulSet":
        status = _statefulset(workload, pods, template)
    elif kind == "ReplicaSet":
        status = _replace_one_by_one(workload, pods, template, "a ReplicaSet does not roll out a new template by itself")
    else:
        raise ValueError(f"no rollout for kind {kind!r}")
    failure = failure or status.failure
    if failure and not status.done:
        return RolloutStatus(False, status.message, failure, None, new_names, unpulled)
    return RolloutStatus(status.done, status.message, None, status.replace_pod, new_names)


def runs_template(pod: Obj, template: Obj) -> bool:
    """Whether ``pod`` was made from ``template``: the same containers with the same images.

    Containers that admission webhooks add (service-mesh sidecars) are not in the
    template and are ignored, except the agent: a pod that has it while the template has
    not (after uninstall) is an old pod.
    """
    have = {c["name"]: c.get("image") for c in (pod.get("spec") or {}).get("containers") or []}
    want = {c["name"]: c.get("image") for c in template["spec"]["containers"]}
    return all(have.get(name) == image for name, image in want.items()) and (
        (AGENT_CONTAINER in have) == (AGENT_CONTAINER in want))


def is_ready(pod: Obj) -> bool:
    """The pod's Ready condition is True and it is not being deleted."""
    if _terminating(pod):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


# --------------------------------------------------------------------------- per kind


def _deployment(d: Obj) -> RolloutStatus:
    name = _name(d)
    spec, status = d.get("spec") or {}, d.get("status") or {}
    if spec.get("paused"):
        return RolloutStatus(False, f'deployment "{name}" is paused',
                             f'Deployment "{name}" is paused (spec.paused), so it rolls nothing out; '
                             f"resume it with kubectl rollout resume deployment/{name}")
    if (d["metadata"].get("generation") or 0) > (status.get("observedGeneration") or 0):
        return RolloutStatus(False, "Waiting for deployment spec update to be observed...")
    replicas = spec.get("replicas", 1)
    updated = status.get("updatedReplicas") or 0
    total = status.get("replicas") or 0
    available = status.get("availableReplicas") or 0
    waiting = f'Waiting for deployment "{name}" rollout to finish: '
    if updated < replicas:
        return RolloutStatus(False, f"{waiting}{updated} out of {replicas} new replicas have been updated...")
    if total > updated:
        return RolloutStatus(False, f"{waiting}{total - updated} old replicas are pending termination...")
    if available < updated:
        return RolloutStatus(False, f"{waiting}{available} of {updated} updated replicas are available...")
    return RolloutStatus(True, f'deployment "{name}" successfully rolled out')


def _statefulset(s: Obj, pods: list[Obj], template: Obj) -> RolloutStatus:
    name = _name(s)
    spec, status = s.get("spec") or {}, s.get("status") or {}
    strategy = spec.get("updateStrategy") or {}
    if strategy.get("type") == "OnDelete":
        return _replace_one_by_one(
            s, pods, template,
            f'StatefulSet "{name}" updates pods only when they are deleted (updateStrategy OnDelete)',
        )
    observed = status.get("observedGeneration") or 0
    if observed == 0 or (s["metadata"].get("generation") or 0) > observed:
        return RolloutStatus(False, "Waiting for statefulset spec update to be observed...")
    replicas = spec.get("replicas", 1)
    ready = status.get("readyReplicas") or 0
    if ready < replicas:
        return RolloutStatus(False, f"Waiting for {replicas - ready} pods to be ready...")
    partition = ((strategy.get("rollingUpdate") or {}).get("partition")) or 0
    updated = status.get("updatedReplicas") or 0
    if partition:
        if updated < replicas - partition:
            return RolloutStatus(False, f"Waiting for partitioned roll out to finish: {updated} out of "
                                        f"{replicas - partition} new pods have been updated...")
        return RolloutStatus(True, f"partitioned roll out complete: {updated} new pods have been updated...")
    revision = status.get("updateRevision")
    if revision != status.get("currentRevision"):
        return RolloutStatus(False, f"waiting for statefulset rolling update to complete {updated} pods "
                                    f"at revision {revision}...")
    return RolloutStatus(True, f"statefulset rolling update complete {status.get('currentReplicas', updated)} "
                               f"pods at revision {status.get('currentRevision')}...")


def _replace_one_by_one(w: Obj, pods: list[Obj], template: Obj, why: str) -> RolloutStatus:
    """For controllers that keep old pods: delete one stale pod whenever all the others are ready."""
    name, kind = _name(w), w["kind"].lower()
    if (w["metadata"].get("generation") or 0) > ((w.get("status") or {}).get("observedGeneration") or 0):
        return RolloutStatus(False, f"Waiting for {kind} spec update to be observed...")
    replicas = (w.get("spec") or {}).get("replicas", 1)
    live = [p for p in pods if not _terminating(p)]
    ready = sum(1 for p in live if is_ready(p))
    stale = sorted((_name(p) for p in live if not runs_template(p, template)), key=_ordinal_last)
    if ready < replicas or len(live) < replicas:
        return RolloutStatus(False, f'Waiting for {kind} "{name}": {ready} of {replicas} pods are ready...')
    if stale:
        pod = stale[-1]
        return RolloutStatus(False, f"replacing pod {pod} ({why}); {len(stale)} left", replace_pod=pod)
    return RolloutStatus(True, f'{kind} "{name}": all {replicas} pods run the new template')


# --------------------------------------------------------------------------- failures


def _pod_failure(pods: list[Obj]) -> tuple[str, tuple[str, str] | None] | None:
    """Why the first stuck container cannot run, and (container, image) when its image cannot be pulled."""
    for pod in sorted(pods, key=_name):
        status = pod.get("status") or {}
        for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in FATAL_REASONS:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                name = cs.get("name", "")
                unpulled = (name, _image(pod, name) or cs.get("image", "")) if reason in PULL_REASONS else None
                return f"pod {_name(pod)}: container {name} is in {reason}{detail}", unpulled
    return None


def _image(pod: Obj, container: str) -> str:
    """The image ``container`` of ``pod`` names in its spec (a status may report it resolved)."""
    spec = pod.get("spec") or {}
    return next((c.get("image", "") for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
                 if c.get("name") == container), "")


def _condition_failure(w: Obj) -> str | None:
    for c in (w.get("status") or {}).get("conditions") or []:
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            return f"{w['kind']} {_name(w)} cannot create pods ({c.get('reason')}): {c.get('message', '')}"
        if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
            return f'deployment "{_name(w)}" exceeded its progress deadline: {c.get("message", "")}'
    return None


def _terminating(pod: Obj) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def _name(obj: Obj) -> str:
    return (obj.get("metadata") or {}).get("name", "")


def _ordinal_last(name: str) -> tuple[int, str]:
    """Sort key: StatefulSet pods by ordinal (``web-10`` after ``web-9``), others by name."""
    stem, _, tail = name.rpartition("-")
    return (int(tail), stem) if tail.isdigit() else (-1, name)
