"""A listener per Service address and port, each connection dialled from the agent's pod.

:class:`ServiceListeners` follows the entries of a :class:`~intercept.access.names.ClusterMap`:
for every (local address, TCP port) of an entry it listens there, and relays each
connection over one SSH ``direct-tcpip`` channel to the entry's full name and that port,
as the agent's pod dials it (the pod's DNS, its NetworkPolicies, the agent's outbound fence
and the session's own).

The fence is asked once per destination before anything listens (``check``): a refused
destination gets no listener, so a local connect to it fails at once (connection refused),
and one line names the rule (``report``). A connection the pod cannot make when it is
dialled is closed with a reset, and said once per destination.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Iterable

from intercept.access.names import Entry
from intercept.protocol import FENCE_REFUSED
from intercept.client.outbound import Dial, Dialer, OutboundError, TCPForward

log = logging.getLogger(__name__)

Check = Callable[[str, int], Awaitable[str | None]]  # why the fence refuses host:port, or None


class _ServicePort(TCPForward):
    reset_on_failure = True

    def __init__(self, owner: ServiceListeners, dialer: Dial | Dialer, entry: Entry, port: int) -> None:
        super().__init__(dialer, entry.dial, port, port, host=entry.address)
        self.owner = owner
        self.entry = entry

    def failed(self, error: OutboundError) -> None:
        self.owner.dial_failed(self.entry, self.port, error)

    async def start(self) -> tuple[str, int]:
        """Listen on the entry's address and this port; OSError when it cannot."""
        self.address = await self._listen(self.host, self.local_port)
        return self.address


class ServiceListeners:
    """The local listeners of a set of entries, kept in step with it by :meth:`update`.

    ``report(line, warning)``: one line for the user (refusals, ports that cannot be
    bound); ``check``: the fence's verdict on a destination (None: no check, every one
    is tried).
    """

    def __init__(self, dialer: Dial | Dialer, report: Callable[[str, bool], None], check: Check | None = None) -> None:
        self._dialer = dialer
        self._report = report
        self._check = check
        self._listening: dict[tuple[str, int], _ServicePort] = {}
        self._entries: dict[tuple[str, int], Entry] = {}
        self._refused: dict[tuple[str, int], str] = {}  # (dial, port) -> why, as said once
        self._failing: set[tuple[str, int]] = set()
        self._lock = asyncio.Lock()

    @property
    def listening(self) -> list[tuple[str, int]]:
        """The (address, port) pairs that accept connections now."""
        return sorted(self._listening)

    def refused(self, entry: Entry, port: int) -> str | None:
        """Why the fence refuses ``entry`` on ``port`` (no listener there), or None."""
        return self._refused.get((entry.dial, port))

    async def update(self, entries: Iterable[Entry]) -> None:
        """Listen for every port of ``entries``; stop listening where no entry is any more."""
        async with self._lock:
            wanted = {(e.address, p): e for e in entries for p in e.ports}
            for key in [k for k, listener in self._listening.items() if wanted.get(k) != listener.entry]:
                await self._listening.pop(key).close()
            new = [(key, entry) for key, entry in wanted.items() if key not in self._listening]
            verdicts = await asyncio.gather(*(self._verdict(entry, key[1]) for key, entry in new))
            for (key, entry), refusal in zip(new, verdicts):
                if refusal is not None:
                    if self._refused.get((entry.dial, key[1])) != refusal:
                        self._report(f"{entry.names[0]}:{key[1]} is not reachable: {FENCE_REFUSED}{refusal}", True)
                    self._refused[(entry.dial, key[1])] = refusal
                    continue
                self._refused.pop((entry.dial, key[1]), None)
                listener = _ServicePort(self, self._dialer, entry, key[1])
                try:
                    await listener.start()
                except OSError as e:
                    self._report(_cannot_listen(entry, key[1], e), True)
                    continue
                self._listening[key] = listener
            self._entries = wanted

    async def _verdict(self, entry: Entry, port: int) -> str | None:
        if self._check is None:
            return None
        try:
            return await self._check(entry.dial, port)
        except Exception as e:  # noqa: BLE001 - no verdict: let the dial itself be judged
            log.info("no fence check for %s:%s: %s", entry.dial, port, e)
            return None

    def dial_failed(self, entry: Entry, port: int, error: OutboundError) -> None:
        key = (entry.dial, port)
        if key not in self._failing:
            self._failing.add(key)
            self._report(f"{entry.names[0]}:{port}: {error}", True)
        else:
            log.info("%s:%s: %s", entry.names[0], port, error)

    async def close(self) -> None:
        async with self._lock:
            for listener in self._listening.values():
                await listener.close()
            self._listening.clear()


def _cannot_listen(entry: Entry, port: int, error: OSError) -> str:
    where = f"{entry.address}:{port}"
    if error.errno == errno.EACCES and port < 1024:
        return (f"{entry.names[0]}:{port} is not reachable by its name: listening on {where} needs root (a port below "
                f"1024); use --forward {entry.names[0]}:{port}:{port + 10000}, or allow unprivileged ports "
                "(sysctl net.ipv4.ip_unprivileged_port_start=0)")
    return f"{entry.names[0]}:{port} is not reachable by its name: cannot listen on {where} ({error.strerror or error})"


__all__ = ["Check", "ServiceListeners"]
