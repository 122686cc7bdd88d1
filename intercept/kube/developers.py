"""A running intercept's route, kept in its workload's routes ConfigMap for agents that start later.

See :mod:`intercept.routing.developers` for why and for the document (the key
``developers.json`` of the ConfigMap ``intercept-<workload>``, mounted into every agent
pod). :func:`announce` adds or renews this developer's entry, :func:`withdraw` removes it;
both read-modify-write the ConfigMap with its resourceVersion (another developer, or a
sandbox, may write it meanwhile), creating it when absent. Blocking: call them from
async code with ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kubernetes.client import ApiClient

from intercept.errors import InterceptError
from intercept.kube import inject
from intercept.kube.apply import CONFLICT_RETRIES, MANAGED_BY
from intercept.kube.rest import Cluster, Conflict, NotFound
from intercept.routing.developers import DeveloperRoute, DevelopersDocument

log = logging.getLogger(__name__)




def announce(api: ApiClient, namespace: str, workload: str, entry: DeveloperRoute, now: float) -> None:
    """Write (or renew) ``entry`` in the routes ConfigMap of ``workload``."""
    _update(Cluster(api), namespace, workload, lambda document: document.with_route(entry, now))


def withdraw(api: ApiClient, namespace: str, workload: str, entry: DeveloperRoute, now: float) -> None:
    """Remove ``entry`` (its developer and route) from the routes ConfigMap of ``workload``, if there."""
    _update(Cluster(api), namespace, workload, lambda document: document.without_route(entry.name, entry.route, now),
            create=False)


def _update(cluster: Cluster, namespace: str, workload: str,
            change: Callable[[DevelopersDocument], DevelopersDocument], *, create: bool = True) -> None:
    name = inject.routes_name(workload)
    for _ in range(CONFLICT_RETRIES):
        try:
            current = cluster.get("ConfigMap", namespace, name)
        except NotFound:
            if not create:
                return
            document = change(DevelopersDocument())
            try:
                cluster.create({"apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"name": name, "namespace": namespace,
                                             "labels": {MANAGED_BY[0]: MANAGED_BY[1], "intercept.dev/workload": workload}},
                                "data": {inject.DEVELOPERS_KEY: document.to_text()}})
                return
            except Conflict:
                continue  # created meanwhile (a sandbox, another developer): read it
        text = (current.get("data") or {}).get(inject.DEVELOPERS_KEY)
        try:
            document = DevelopersDocument.from_bytes(text.encode()) if text else DevelopersDocument()
        except InterceptError as e:
            log.warning("ConfigMap/%s: %s; writing it anew", name, e)
            document = DevelopersDocument()
        written = change(document).to_text()
        if written == text:
            return
        current["data"] = {**(current.get("data") or {}), inject.DEVELOPERS_KEY: written}
        try:
            cluster.replace(current | {"kind": "ConfigMap", "apiVersion": "v1"})
            return
        except Conflict:
            continue
    raise InterceptError(f"ConfigMap/{name} in namespace {namespace} kept changing; your route is not recorded there "
                         "(pods that start now will not hold your requests until you connect)")
