"""The agent pods of a workload: listed once, or watched as they come and go.

This is the interface the tunnel side (sessions to every replica) consumes::

    info = ensure_agent(api, namespace, service, options, progress)     # kube/apply.py
    async with contextlib.aclosing(watch_agent_pods(api, info.namespace, info.selector)) as pods:
        async for ready in pods:          # list[PodEndpoint]: every READY agent pod, sorted by name
            reconcile(ready)              # connect to new ones, drop the ones that left

- :class:`PodEndpoint` ``(name, namespace, ip, ready, ssh_port, http_port)``: the
  agent's ports are read from the pod itself (its ``INTERCEPT_SSH_LISTEN`` /
  ``INTERCEPT_LISTEN``), so pods of an older agent during an upgrade report their own.
  ``ready`` is the agent container's readiness (its probe checks the HTTP listener; the
  SSH server starts right after it, so retry a first refused connection); terminating
  pods are never ready.
- :func:`agent_pods` (blocking): every pod of the selector that has an agent container,
  ready or not.
- :func:`watch_agent_pods` (async iterator): yields the list of ready agent pods at once
  (possibly empty) and again whenever that list changes, never the same list twice in a
  row. It lists, then watches from the list's resourceVersion; when the server ends the
  watch it resumes from the last version seen; on ``410 Gone`` (version too old) it lists
  again; on a lost connection it retries with backoff (0.5 s doubling to 10 s), logging a
  warning. 401/403/404 end it with a :class:`~intercept.kube.rest.ClusterError`. The
  blocking client calls run in threads (``asyncio.to_thread``); closing the iterator
  (``aclose()``, or cancelling the task that iterates it) shuts the open watch down at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient

from intercept import agentconfig
from intercept.errors import AgentRemoved, UsageError
from intercept.kube.inject import AGENT_CONTAINER, AGENT_HTTP_PORT, AGENT_SSH_PORT, is_injected
from intercept.kube.rest import Cluster, ClusterError, Gone, NotFound, WatchStream

log = logging.getLogger(__name__)

Obj = dict[str, Any]

WATCH_TIMEOUT = 300  # seconds the server keeps one watch open before we resume it
_BACKOFF_START, _BACKOFF_MAX = 0.5, 10.0


@dataclass(frozen=True, order=True)
class PodEndpoint:
    """One pod with an agent: where to reach its SSH server."""

    name: str
    namespace: str
    ip: str | None  # None until the pod has an address
    ready: bool
    ssh_port: int
    http_port: int


def agent_ports(pod_spec: Obj) -> tuple[int, int] | None:
    """``(http_port, ssh_port)`` of the agent container in a pod spec, or None without an agent
    (read through :mod:`intercept.agentconfig`, as the agent reads them)."""
    agent = next((c for c in pod_spec.get("containers") or [] if c.get("name") == AGENT_CONTAINER), None)
    if agent is None:
        return None
    env = {e["name"]: e["value"] for e in agent.get("env") or [] if isinstance(e.get("value"), str) and "name" in e}
    try:
        settings = agentconfig.from_env(env, ("injection",))
    except UsageError:
        settings = {}
    listen = settings.get("listen", (("", AGENT_HTTP_PORT),))[0]  # the first listener's
    ssh_listen = settings.get("ssh_listen", ("", AGENT_SSH_PORT))
    return listen[1], ssh_listen[1]


def endpoint(pod: Obj) -> PodEndpoint | None:
    """The agent endpoint of one pod, or None when the pod has no agent container."""
    ports = agent_ports((pod.get("spec") or {}))
    if ports is None:
        return None
    metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
    agent_status = next(
        (s for s in status.get("containerStatuses") or [] if s.get("name") == AGENT_CONTAINER), {}
    )
    ip = status.get("podIP") or None
    ready = bool(agent_status.get("ready")) and ip is not None and not metadata.get("deletionTimestamp")
    return PodEndpoint(metadata.get("name", ""), metadata.get("namespace", ""), ip, ready, ports[1], ports[0])


def agent_pods(api: ApiClient, namespace: str, selector: str) -> list[PodEndpoint]:
    """Every pod of ``selector`` with an agent container, ready or not, sorted by name (blocking)."""
    items, _ = Cluster(api).list("Pod", namespace, label_selector=selector)
    return sorted(e for e in map(endpoint, items) if e is not None)


async def watch_agent_pods(
    api: ApiClient, namespace: str, selector: str, *, watch_timeout: int = WATCH_TIMEOUT,
    workload: tuple[str, str, str] | None = None,
) -> AsyncIterator[list[PodEndpoint]]:
    """The ready agent pods of ``selector``: now, then after every change (see the module docstring).

    With ``workload`` (``(kind, name, service)``), a set that becomes empty because the
    workload no longer has the agent (an uninstall restored it) ends the watch with
    :class:`~intercept.errors.AgentRemoved` instead.
    """
    cluster = Cluster(api)
    last: list[PodEndpoint] | None = None
    backoff = _BACKOFF_START
    while True:
        try:
            items, version = await asyncio.to_thread(cluster.list, "Pod", namespace, selector)
            pods = {p["metadata"]["name"]: p for p in items}
            backoff = _BACKOFF_START
            current = _ready(pods)
            if current != last:
                last = current
                yield current
            while True:  # one watch request after another, until the version is too old
                stream = await _open_watch(cluster, namespace, version, selector, watch_timeout)
                try:
                    events = iter(stream)
                    while (event := await asyncio.to_thread(next, events, None)) is not None:
                        version = _apply(pods, event) or version
                        current = _ready(pods)
                        if current != last:
                            if not current and workload is not None:
                                await asyncio.to_thread(_check_not_removed, cluster, namespace, workload)
                            last = current
                            yield current
                finally:
                    stream.close()
        except Gone as error:
            log.info("pods of %s in namespace %s: %s; listing again", selector, namespace, error)
        except ClusterError as error:
            if error.status in (401, 403, 404):
                raise
            log.warning("watching the pods of %s in namespace %s: %s; retrying in %.1fs",
                        selector, namespace, error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)


async def _open_watch(cluster: Cluster, namespace: str, version: str, selector: str, timeout: int) -> WatchStream:
    """Open a watch in a thread; if we are cancelled meanwhile, close it once it is open."""
    opening = asyncio.get_running_loop().run_in_executor(
        None, lambda: cluster.watch("Pod", namespace, version, selector, timeout))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(lambda f: f.result().close() if not f.cancelled() and f.exception() is None else None)
        raise


def _apply(pods: dict[str, Obj], event: Obj) -> str | None:
    """Apply one watch event to ``pods``; returns the resourceVersion it carries."""
    obj = event.get("object") or {}
    metadata = obj.get("metadata") or {}
    kind = event.get("type")
    if kind in ("ADDED", "MODIFIED"):
        pods[metadata["name"]] = obj
    elif kind == "DELETED":
        pods.pop(metadata.get("name", ""), None)
    return metadata.get("resourceVersion")


def _ready(pods: dict[str, Obj]) -> list[PodEndpoint]:
    return sorted(e for e in map(endpoint, pods.values()) if e is not None and e.ready)


def _check_not_removed(cluster: Cluster, namespace: str, workload: tuple[str, str, str]) -> None:
    """Raise :class:`AgentRemoved` when ``workload`` (kind, name, service) no longer has the agent."""
    kind, name, service = workload
    try:
        current = cluster.get(kind, namespace, name)
    except NotFound:
        current = None
    if current is None or not is_injected(current):
        raise AgentRemoved(f"the agent of {service} was removed by an uninstall (namespace {namespace}); your route "
                           f"went with it: start again (intercept start {service} -n {namespace}) once it is back")
