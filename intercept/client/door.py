"""Where routed connections enter the developer's machine.

Every channel an agent opens for a routed request becomes one TCP connection to the
local process, bridged byte for byte with flow control both ways
(:mod:`intercept.sshbridge`). A channel whose opening carries the request
(:class:`intercept.protocol.EarlyData`) has it written to the process before the opening
is confirmed, so the request needs no round trip to the agent first. The door can be
*closed* while the local process restarts: new channels then wait (up to the hold
timeout) instead of failing, and :meth:`LocalDoor.drained` tells when the old process
has finished its last response (the agents close channels at response boundaries
while draining). Together these make a restart invisible to the requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncssh

from intercept.protocol import early_data
from intercept.sshbridge import TCPBridge, TCPSide


LOOPBACKS = ("127.0.0.1", "::1")


def local_addresses(host: str) -> tuple[str, ...]:
    """Where ``host`` is dialled: localhost is both loopbacks, IPv4's first. A process that
    listens on either is on localhost:PORT (Node's and Vite's ``localhost`` is ``::1`` on
    many systems, as is ``curl localhost``'s first try)."""
    return LOOPBACKS if host in ("127.0.0.1", "localhost") else (host,)


async def connect_local(factory: Callable[[], asyncio.BaseProtocol], host: str, port: int) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """A TCP connection to ``host:port`` (each of :func:`local_addresses` in turn); raises
    the last address's :class:`OSError` when none accepts."""
    loop = asyncio.get_running_loop()
    *first, last = local_addresses(host)
    for address in first:
        try:
            return await loop.create_connection(factory, address, port)
        except OSError:  # refused on this loopback: the process may listen on the other
            pass
    return await loop.create_connection(factory, last, port)


class _Bridge(TCPBridge):
    """One routed connection: an SSH channel on one side, a local TCP connection on the other."""

    def __init__(self, door: LocalDoor) -> None:
        super().__init__(door._closed)
        self.door = door


class LocalDoor:
    """Connects routed channels to ``host:port``; can hold them while the process restarts."""

    def __init__(self, name: str, port: int, host: str = "127.0.0.1", hold_timeout: float = 10.0) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.hold_timeout = hold_timeout
        self._open_gate = asyncio.Event()
        self._open_gate.set()
        self._bridges: set[_Bridge] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def close(self) -> None:
        """New channels wait until :meth:`open`."""
        self._open_gate.clear()

    def open(self) -> None:
        self._open_gate.set()

    @property
    def is_open(self) -> bool:
        return self._open_gate.is_set()

    @property
    def busy(self) -> int:
        return len(self._bridges)

    async def drained(self, timeout: float) -> bool:
        """Wait until no routed connection is open (True), or ``timeout`` (False)."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def accept(self, orig_host: str, orig_port: int) -> asyncssh.SSHTCPSession[bytes]:
        """asyncssh's session factory for a channel from an agent: to ``port``."""
        return await self._accept(self.port, orig_host)

    def acceptor(self, port: int) -> Callable[[str, int], Awaitable[asyncssh.SSHTCPSession[bytes]]]:
        """A session factory like :meth:`accept` for channels to local ``port`` (one per port
        intercepted; the gate and the count of connections are the door's, shared)."""
        return lambda orig_host, orig_port: self._accept(port, orig_host)

    async def _accept(self, port: int, origin: str) -> asyncssh.SSHTCPSession[bytes]:
        bridge = _Bridge(self)
        await self._connect(bridge, port)
        first = early_data(origin)  # the request the opening carried: the process has it before the agent hears back
        if first:
            bridge.tcp.write(first)
        return bridge

    async def _connect(self, bridge: _Bridge, port: int) -> None:
        """Connect ``bridge`` to the process on ``port``, once the door is open (held up to the
        hold timeout). Refused: :class:`asyncssh.ChannelOpenError`."""
        if not self._open_gate.is_set():
            try:
                await asyncio.wait_for(self._open_gate.wait(), self.hold_timeout)
            except asyncio.TimeoutError:
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_CONNECT_FAILED, f"{self.name}'s process is still restarting"
                ) from None
        # Counted from now, not once connected: a restart that begins while this connects to the
        # process waits for its request too, instead of stopping the process under it.
        self._bridges.add(bridge)
        self._empty.clear()
        try:
            await connect_local(lambda: TCPSide(bridge), self.host, port)
        except OSError:
            self._closed(bridge)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED,
                f"{self.name}'s process does not accept connections on localhost:{port}",
            ) from None
        except BaseException:  # cancelled
            self._closed(bridge)
            raise

    def _closed(self, bridge: _Bridge) -> None:
        self._bridges.discard(bridge)
        if not self._bridges:
            self._empty.set()
