"""An SSH channel bridged to a TCP connection, byte for byte, with flow control both ways.

Used wherever a channel stands for a TCP connection that this end makes: the client's
routed connections to the developer's process (:mod:`intercept.client.door`) and the
agent's outbound connections from the pod (``direct-tcpip``, :mod:`intercept.agent.sshd`).

Why not asyncssh's own forwarder (``forward_connection``): it makes the TCP connection
first and reads from it at once, and bytes the server sends before the channel is open
(a gRPC server's SETTINGS, a MySQL or SMTP greeting) are dropped, or kept where nothing
ever sends them: the client then waits forever for a greeting that never comes. Here the
TCP side does not read until the channel is open, so what a server says first waits in
its socket; what was read before that is kept and sent first. The channel's bytes take
turns with the connection's other channels (:class:`~intercept.sshshare.ChannelSender`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncssh

from intercept.sshshare import ChannelSender


class TCPBridge(asyncssh.SSHTCPSession[bytes]):
    """The channel's side of a bridge; its TCP side is :attr:`tcp`, a connection made with
    :class:`TCPSide` (:func:`connect_tcp`) before the channel opens or (a subclass's choice)
    after. ``on_close``: told once the channel is gone."""

    def __init__(self, on_close: Callable[[TCPBridge], None] | None = None) -> None:
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.sender: ChannelSender | None = None  # the TCP side's bytes, taking turns with other channels
        self.tcp: asyncio.Transport | None = None
        # what the TCP side said before the channel was open: a server that speaks first is
        # not always held off by pause_reading (bytes read in the same step as the connect)
        self.early: list[bytes] = []
        self._on_close = on_close

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan
        self.sender = ChannelSender(chan, self._pause_tcp, self._resume_tcp)
        if self.tcp is not None:
            self.start()

    def start(self) -> None:
        """Both sides are there: what the TCP side said first goes, then it is read."""
        for data in self.early:
            self.sender.write(data)
        self.early.clear()
        if self.tcp.is_closing():  # closed before the channel was open
            self.sender.write_eof()
            self.sender.close()
            return
        self.tcp.resume_reading()

    def _pause_tcp(self) -> None:
        self.tcp.pause_reading()

    def _resume_tcp(self) -> None:
        self.tcp.resume_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.tcp.write(data)

    def eof_received(self) -> bool:
        if self.tcp.can_write_eof():
            self.tcp.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.sender.lost()
        if self.tcp is not None:
            self.tcp.close()
        if self._on_close is not None:
            self._on_close(self)

    # the peer's window is used up / open again: the sender holds the bytes and pauses the TCP side
    def pause_writing(self) -> None:
        self.sender.channel_paused()

    def resume_writing(self) -> None:
        self.sender.channel_resumed()


class TCPSide(asyncio.Protocol):
    """The TCP side of ``bridge``: give ``lambda: TCPSide(bridge)`` to ``create_connection``."""

    def __init__(self, bridge: TCPBridge) -> None:
        self.bridge = bridge

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.bridge.tcp = transport  # type: ignore[assignment]
        transport.pause_reading()  # until the channel is open (TCPBridge.start)

    def data_received(self, data: bytes) -> None:
        sender = self.bridge.sender
        if sender is None:
            self.bridge.early.append(data)
        else:
            sender.write(data)

    def eof_received(self) -> bool:
        if self.bridge.sender is None:
            return False  # closes; the channel, once open, is closed with it
        self.bridge.sender.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.bridge.sender is not None:
            self.bridge.sender.close()  # after what the TCP side sent before it

    def pause_writing(self) -> None:
        self.bridge.chan.pause_reading()

    def resume_writing(self) -> None:
        self.bridge.chan.resume_reading()


async def connect_tcp(bridge: TCPBridge, host: str, port: int) -> None:
    """Make ``bridge``'s TCP side: a connection to ``host:port``, not read until the channel is
    open. Raises :class:`OSError` when it cannot be made."""
    await asyncio.get_running_loop().create_connection(lambda: TCPSide(bridge), host, port)


async def bridge_to(host: str, port: int) -> TCPBridge:
    """A channel's session (asyncssh's ``session_factory`` result for ``direct-tcpip``) bridged to
    a new connection to ``host:port``; :class:`asyncssh.ChannelOpenError` with the OS's reason
    (as asyncssh's ``forward_connection`` says it) when the connection cannot be made."""
    bridge = TCPBridge()
    try:
        await connect_tcp(bridge, host, port)
    except OSError as e:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(e)) from None
    return bridge


__all__ = ["TCPBridge", "TCPSide", "bridge_to", "connect_tcp"]
