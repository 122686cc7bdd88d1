"""Cluster access for the local process, put together: the map, the listeners, the mode's hosts file.

:class:`ClusterAccess` takes the batches of :func:`intercept.kube.services.follow_services`
(or any source of the same shape), keeps a :class:`~intercept.access.names.ClusterMap`,
listens for each entry (:class:`~intercept.access.forward.ServiceListeners`) and writes the
names where the mode puts them: the machine's hosts file (``hosts-file``: the managed
block and its guard) or a hosts file of COMMAND's own (``namespace``: :attr:`setup` is the
child's preexec step). It reports ``access`` events: what COMMAND reaches, and each Service
that comes or goes while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from intercept.access import isolate
from intercept.access.forward import Check, ServiceListeners
from intercept.access.guard import HOSTS, ManagedHosts
from intercept.access.leases import AddressLeases
from intercept.access.modes import Mode, choose
from intercept.access.names import ClusterMap, Entry, Resolver, hosts_lines, service_variables, with_cluster_names
from intercept.client.outbound import Dial, Dialer
from intercept.events import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccessPlan:
    """What to reach: ``requested`` (a mode of :data:`~intercept.access.modes.CHOICES`), the
    namespaces (the first is home), and where their Services come from (a fresh iterator
    of :func:`~intercept.kube.services.follow_services` batches per call)."""

    requested: str
    namespaces: tuple[str, ...]
    changes: Callable[[], AsyncIterator[list[tuple]]]


async def open_access(plan: AccessPlan, dialer: Dial | Dialer, report: Callable[[Event], None], *, resolver_text: str,
                      check: Check | None, for_command: bool) -> ClusterAccess | None:
    """The cluster's names for the local process, in the mode this machine gets (None: a mode
    without names, said in one line; or the namespace mode with no COMMAND to put in it)."""
    mode = await asyncio.to_thread(choose, plan.requested)
    if not mode.names:
        report(Event("access", f"no cluster names for the local process: {mode.why}"))
        return None
    if mode.name == "namespace" and not for_command:
        report(Event("access", f"no cluster names: the namespace mode gives them to a COMMAND only (intercept start ... "
                               f"-- COMMAND); {mode.why}"))
        return None
    resolver = Resolver.parse(resolver_text) if resolver_text.strip() else Resolver.for_namespace(plan.namespaces[0])
    if not resolver.search:
        resolver = Resolver.for_namespace(plan.namespaces[0])
    leases = AddressLeases()  # this session's addresses, none of another session's of this machine
    access = ClusterAccess(mode, ClusterMap(plan.namespaces, resolver, allocate=leases.allocate), dialer, report, check,
                           leases=leases)
    try:
        await access.start(plan.changes())
    except BaseException:
        await access.close()
        raise
    return access


class ClusterAccess:
    """While it runs, COMMAND reaches the Services of ``cluster_map``'s namespaces by name."""

    def __init__(self, mode: Mode, cluster_map: ClusterMap, dialer: Dial | Dialer, report: Callable[[Event], None],
                 check: Check | None = None, hosts: Path = HOSTS, leases: AddressLeases | None = None) -> None:
        if not mode.names:
            raise ValueError(f"mode {mode.name} gives no names")
        self.mode = mode
        self.map = cluster_map
        self.hosts = hosts
        self.leases = leases  # the map's addresses, let go by close
        self._report = report
        self.listeners = ServiceListeners(dialer, lambda line, warning: report(Event("warning" if warning else "access", line)),
                                          check)
        self._managed: ManagedHosts | None = None
        self._private: Path | None = None
        self._following: asyncio.Task[None] | None = None
        self.setup: Callable[[], None] | None = None  # for COMMAND's child (namespace mode)

    async def start(self, changes: AsyncIterator[list[tuple]]) -> None:
        """Apply the first batch (everything listed), listen and write the names; then follow the rest."""
        first = await anext(changes)
        self._apply(first)
        if self.mode.name == "hosts-file":
            self._managed = ManagedHosts(self.hosts)
            stale = await asyncio.to_thread(self._managed.remove_stale)
            if stale:
                log.info("removed the hosts blocks of intercepts no longer running: %s", ", ".join(stale))
            await asyncio.to_thread(self._managed.start_guard)
        else:
            handle, name = tempfile.mkstemp(prefix="intercept-hosts-")
            os.close(handle)
            self._private = Path(name)
            self._private.chmod(0o644)
            self.setup = isolate.private_hosts(self._private, str(self.hosts))
        await self._sync()
        entries = self.map.entries()
        namespaces = " and ".join(self.map.namespaces)
        shown = ", ".join(e.names[0] for e in entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
        self._report(Event("access", f"the local process reaches {len(entries)} name(s) of {namespaces} as a pod does"
                                     f"{': ' + shown if shown else ''} ({self.mode.name}: {self.mode.why})"))
        self._following = asyncio.ensure_future(self._follow(changes))

    def environment(self, env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        """The pod's environment with its Service variables pointed at the local addresses (and which)."""
        return service_variables(env, self.map.entries())

    def _apply(self, batch: list[tuple]) -> bool:
        changed = False
        for change in batch:
            if change[0] == "list":
                _, kind, namespace, items = change
                changed |= self.map.replace(kind, namespace, items)
            else:
                changed |= self.map.apply(change[1])
        return changed

    async def _follow(self, changes: AsyncIterator[list[tuple]]) -> None:
        try:
            async for batch in changes:
                before = {e.service + (f"#{e.pod}" if e.pod else ""): e for e in self.map.entries()}
                if not self._apply(batch):
                    continue
                await self._sync()
                after = {e.service + (f"#{e.pod}" if e.pod else ""): e for e in self.map.entries()}
                for key in after.keys() - before.keys():
                    self._report(Event("access", f"{after[key].describe()} is reachable now"))
                for key in before.keys() - after.keys():
                    self._report(Event("access", f"{before[key].names[0]} is gone"))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the names stay as they were; say why they no longer follow
            self._report(Event("warning", f"the cluster's Services are no longer followed: {e}"))

    async def _sync(self) -> None:
        entries: list[Entry] = self.map.entries()
        await self.listeners.update(entries)
        if self._managed is not None:
            await asyncio.to_thread(self._managed.put, hosts_lines(entries))
        elif self._private is not None:
            machine = await asyncio.to_thread(self.hosts.read_bytes)
            await asyncio.to_thread(isolate.rewrite, self._private, with_cluster_names(machine, entries))

    async def close(self) -> None:
        """Stop following, stop listening, and take the names away (the hosts file as it was)."""
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
        await self.listeners.close()
        if self._managed is not None:
            await asyncio.to_thread(self._managed.close)
        if self._private is not None:
            with contextlib.suppress(OSError):
                self._private.unlink()
        if self.leases is not None:
            self.leases.close()


__all__ = ["AccessPlan", "ClusterAccess", "open_access"]
