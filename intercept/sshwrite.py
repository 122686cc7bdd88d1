"""One ``write(2)`` per SSH packet: asyncssh's tiny writes joined to the write that follows.

Why: asyncssh 2.24 sends an SSH_MSG_IGNORE before every packet once keys are in use
(``SSHConnection.send_packet``) and hands each packet to its transport in a write of its
own, so every channel data packet costs two ``write(2)`` on the sending side, the first
of 36 bytes with ``aes128-gcm@openssh.com`` (what two intercept ends negotiate), and the
peer may wake up for each. Skipping the IGNORE would need a patch of asyncssh's private
``send_packet``, which is ruled out; this module only changes how the bytes reach the
socket. On bench/run.py's row (d) it took the agent from about 80 to 72 µs of CPU per
request and raised req/s by about 8% (bench/README.md).

:class:`CoalescingTransport` sits between asyncssh and the socket's transport. A write
of at most :data:`HOLD_MAX` bytes is held and goes out with the next write, which for an
IGNORE follows in the same call of ``send_packet``. A held write that no write follows
(a lone window adjust, EOF or close, a keepalive) goes out when the callbacks queued in
this loop iteration have run: one ``call_soon`` per iteration that held anything. Writes
larger than :data:`HOLD_MAX` are never delayed, so nothing waits for a later event: an
earlier attempt that held every write until the end of the iteration cost 30 to 40% of
the requests per second (bench/README.md, "Tried for (d) and not kept").

It is put in place through asyncssh's public ``tunnel`` option, on both ends:
``asyncssh.create_server(..., tunnel=CoalescingTunnel(sock=listening))`` and
``asyncssh.connect(host, port, ..., tunnel=CoalescingTunnel())`` or
``tunnel=CoalescingTunnel(sock=connected)``. asyncssh documents ``tunnel`` as an
``SSHClientConnection`` (or a string naming hosts); of that object it calls only
``create_connection`` or ``create_server`` (typed by asyncssh as structural protocols),
which :class:`CoalescingTunnel` provides. No private asyncssh code is patched or called;
should a later asyncssh accept only its own connections there, tests/test_sshwrite.py
fails. The receiving side is left alone: the socket's transport delivers to asyncssh
directly (``set_protocol``), so reads cost nothing more, and fewer writes on one side
already mean fewer reads on the other.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast

HOLD_MAX = 64
"""A write of at most this many bytes is held for the next one. An encrypted empty IGNORE
is 36 bytes with AES-GCM and chacha20-poly1305, and with aes128-ctr 28 (umac-64-etm,
asyncssh's first MAC), 36 (hmac-sha1) or 52 (hmac-sha2-256-etm); only hmac-sha2-512's 84
would pass unjoined. Window adjusts, EOF and close are 36 too; channel data of up to 22
bytes (52) is held as well, until the next write or the end of the iteration."""

HELD_MAX = 1024
"""Tiny writes in a row are held together up to this many bytes, then written."""

JOIN_MAX = 4096
"""Held bytes are joined to a following write of up to this many bytes (one copy); a larger
one goes out with ``writelines`` (one ``writev(2)`` under uvloop), which does not copy it."""


class CoalescingTransport(asyncio.Transport):
    """A transport that holds tiny writes for the next write; everything else is ``inner``'s."""

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.inner = inner
        self._loop = loop
        self._held = b""
        self._flush_queued = False

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        size = len(data)
        if size <= HOLD_MAX:
            if not size:
                return
            if not held:
                self._held = bytes(data)
                if not self._flush_queued:
                    self._flush_queued = True
                    self._loop.call_soon(self._flush)
                return
            if len(held) + size <= HELD_MAX:
                self._held = held + data
                return
        if held:
            self._held = b""
            if size <= JOIN_MAX:
                self.inner.write(held + data)
            else:
                self.inner.writelines((held, data))
        else:
            self.inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _flush(self) -> None:
        """Queued by the first held write of a loop iteration: the callbacks queued before it
        (the rest of this iteration's work) have run, and the loop has not polled for I/O since."""
        self._flush_queued = False
        self.flush()

    def flush(self) -> None:
        """Write the held bytes now, if any. Once the socket's transport is closing on its own
        (the peer went), they are dropped, as they would have been in its buffer."""
        held = self._held
        if held:
            self._held = b""
            if not self.inner.is_closing():
                self.inner.write(held)

    def write_eof(self) -> None:
        self.flush()
        self.inner.write_eof()

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def close(self) -> None:
        self.flush()  # close() still sends what was written before it
        self.inner.close()

    def abort(self) -> None:
        # Held bytes were written as far as the caller knows: they go to the socket as they
        # would have, before the abort (asyncssh sends its DISCONNECT, then aborts).
        self.flush()
        self.inner.abort()

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    # -- flow control and the rest: the inner transport's --------------------------------

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size() + len(self._held)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def is_reading(self) -> bool:
        return self.inner.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)


class _Splice(asyncio.Protocol):
    """The socket transport's first protocol: hands asyncssh a :class:`CoalescingTransport`,
    then steps aside, so that the transport delivers to asyncssh directly."""

    def __init__(self, make: Callable[[], asyncio.Protocol]) -> None:
        self._make = make
        self.protocol: asyncio.Protocol | None = None
        self.transport: CoalescingTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but it is one
        inner = cast(asyncio.Transport, transport)
        protocol = self.protocol = self._make()
        inner.set_protocol(protocol)
        self.transport = CoalescingTransport(inner, asyncio.get_running_loop())
        protocol.connection_made(self.transport)


class CoalescingTunnel:
    """What asyncssh's ``tunnel`` option calls to open its TCP connection or listener.

    ``sock``: an already connected socket (client) or a bound, listening one (server);
    without it the client dials ``host``/``port`` as asyncssh would.
    """

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock
        self.transport: CoalescingTransport | None = None  # the client's, once connected

    async def create_connection(
        self, session_factory: Callable[[], Any], remote_host: str, remote_port: int
    ) -> tuple[asyncio.Transport, Any]:
        loop = asyncio.get_running_loop()
        splice = _Splice(session_factory)
        if self.sock is not None:
            await loop.create_connection(lambda: splice, sock=self.sock)
        else:
            await loop.create_connection(lambda: splice, remote_host, remote_port)
        assert splice.protocol is not None and splice.transport is not None
        self.transport = splice.transport
        return splice.transport, splice.protocol

    async def create_server(
        self, session_factory: Callable[[str, int], Any], listen_host: str, listen_port: int
    ) -> asyncio.AbstractServer:
        if self.sock is None:
            raise ValueError("CoalescingTunnel.create_server needs a listening socket (sock=)")
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _Splice(lambda: session_factory("", 0)), sock=self.sock)

    # asyncssh closes a tunnel it opened itself; this one owns nothing beyond the connection.
    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass
