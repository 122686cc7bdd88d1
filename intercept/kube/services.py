"""The Services and EndpointSlices of some namespaces, followed (for cluster access: :mod:`intercept.access`).

:func:`follow_services` yields batches of changes for a
:class:`~intercept.access.names.ClusterMap`: first one batch with the whole list of each
kind in each namespace (``("list", kind, namespace, items)``), then each watch event as it
comes (``("event", event)``). A watch whose version is too old lists again (a ``list``
change, which drops what was deleted meanwhile); other failures retry with backoff, and
401/403/404 end the iteration with the typed error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from kubernetes.client import ApiClient

from intercept.kube.rest import Cluster, ClusterError, Gone

log = logging.getLogger(__name__)

KINDS = ("Service", "EndpointSlice")
WATCH_TIMEOUT = 300
_BACKOFF_START, _BACKOFF_MAX = 0.5, 10.0

Change = tuple[Any, ...]


async def follow_services(api: ApiClient, namespaces: Sequence[str], *,
                          watch_timeout: int = WATCH_TIMEOUT) -> AsyncIterator[list[Change]]:
    """Batches of changes: the first lists everything, the others carry watch events."""
    cluster = Cluster(api)
    queue: asyncio.Queue[Change | BaseException] = asyncio.Queue()
    first = await asyncio.gather(*(asyncio.to_thread(cluster.list, kind, ns) for ns in namespaces for kind in KINDS))
    batch: list[Change] = []
    tasks = []
    for (ns, kind), (items, version) in zip(((ns, kind) for ns in namespaces for kind in KINDS), first):
        batch.append(("list", kind, ns, items))
        tasks.append(asyncio.ensure_future(_watch(cluster, kind, ns, version, watch_timeout, queue)))
    try:
        yield batch
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            more = [item]
            while not queue.empty():
                extra = queue.get_nowait()
                if isinstance(extra, BaseException):
                    raise extra
                more.append(extra)
            yield more
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _watch(cluster: Cluster, kind: str, namespace: str, version: str, timeout: int,
                 queue: asyncio.Queue[Change | BaseException]) -> None:
    backoff = _BACKOFF_START
    try:
        while True:
            try:
                stream = await asyncio.to_thread(cluster.watch, kind, namespace, version, None, timeout)
                try:
                    events = iter(stream)
                    while (event := await asyncio.to_thread(next, events, None)) is not None:
                        backoff = _BACKOFF_START
                        if event.get("type") == "BOOKMARK":
                            version = (event.get("object") or {}).get("metadata", {}).get("resourceVersion") or version
                            continue
                        obj = event.get("object") or {}
                        obj.setdefault("kind", kind)
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        queue.put_nowait(("event", event))
                finally:
                    stream.close()
            except Gone as error:
                log.info("%s in namespace %s: %s; listing again", kind, namespace, error)
                items, version = await asyncio.to_thread(cluster.list, kind, namespace)
                queue.put_nowait(("list", kind, namespace, items))
            except ClusterError as error:
                if error.status in (401, 403, 404):
                    raise
                log.warning("watching %s in namespace %s: %s; retrying in %.1fs", kind, namespace, error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
    except asyncio.CancelledError:
        raise
    except BaseException as error:  # noqa: BLE001 - handed to the reader, which raises it
        queue.put_nowait(error)


__all__ = ["Change", "follow_services"]
