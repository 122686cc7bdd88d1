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
fails.

The tunnel also bounds what the socket holds and tells the connection's channels when
it is full (:mod:`intercept.sshshare`: channels take turns, so a bulk body waits in its
own channel rather than in the socket ahead of every other request): it sets
``TCP_NOTSENT_LOWAT`` and the transport's write-buffer limits, paces a bulk sender just
under the link's rate so that the network's queue stays short (:class:`Pacing`), and
routes the transport's ``pause_writing``/``resume_writing`` (which asyncssh ignores) to
the connection's :class:`~intercept.sshshare.SendPipe`, which a channel finds through
``get_extra_info``.
The receiving side is left alone: the socket's transport delivers to asyncssh
directly (``set_protocol``), so reads cost nothing more, and fewer writes on one side
already mean fewer reads on the other.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, cast

from intercept.sshshare import PIPE_HIGH, PIPE_INFO, PIPE_LOW, UNSENT_MAX, UNSENT_MIN, UNSENT_TIME, SendPipe

log = logging.getLogger(__name__)

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

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop, pipe: SendPipe | None = None) -> None:
        super().__init__()
        self.inner = inner
        self._loop = loop
        self.pipe = pipe  # the channels' turns on this connection (intercept.sshshare), when watched
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
        if name == PIPE_INFO and self.pipe is not None:
            return self.pipe
        return self.inner.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol = self.inner.get_protocol()
        return cast(asyncio.BaseProtocol, protocol.protocol) if isinstance(protocol, _Watched) else protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)


class _Watched:
    """The socket transport's protocol: asyncssh's, whose reads it receives directly (the
    bound methods themselves), except that the transport's ``pause_writing`` and
    ``resume_writing`` (which asyncssh ignores) tell the connection's :class:`SendPipe`."""

    def __init__(self, protocol: asyncio.Protocol, pipe: SendPipe) -> None:
        self.protocol = protocol
        self.data_received = protocol.data_received
        self.eof_received = protocol.eof_received
        self.connection_lost = protocol.connection_lost
        self.pause_writing = pipe.pause_writing
        self.resume_writing = pipe.resume_writing


class Pacing:
    """How fast a bulk sender's SSH socket may send, so that it keeps the network's queue
    short (sans-IO: fed what ``TCP_INFO`` says, it answers the cap to set).

    Why: every request of a session shares one TCP connection. Its congestion control
    (cubic, or BBR in its startup) puts up to a few times the path's bandwidth-delay product
    in flight while a download runs; the excess waits in the bottleneck's queue, and each
    small response sent behind it waits as long (``bench/wan.py``'s "during a download"
    row: p99 3.8x the floor at 40 ms and 100 Mbit/s). A socket paced just under the link's
    rate keeps that queue empty.

    Looked at while the socket is full (a bulk transfer), at most once per round trip. The
    delivery rate is taken even when the kernel flags it as limited by the sender (ours
    often is: the socket holds little unsent, and cubic's window runs ahead of what is in
    flight), since a standing queue shows the link is full all the same. A queue stands
    when both what is in flight beyond what the path holds (the delivery rate times the
    least RTT) is over :data:`QUEUE_BYTES` and the smoothed RTT is over the least by :data:`QUEUE_TARGET`
    (the first alone is also true of a slow start, whose delivery rate lags; the second
    alone, of a slow sender's delayed ACKs). Then the cap is the delivery rate (the
    bottleneck's, while a queue stands) less the share that drains the queue in
    :data:`DRAIN_TIME`; otherwise an existing cap grows by :data:`GROW`, probing for room.
    A queue that stays for :data:`GIVE_UP` looks is not this connection's (other traffic
    fills it): the cap goes for :data:`REST` seconds, so that the tunnel does not yield to
    everyone else's downloads. After :data:`IDLE` seconds without a look the cap goes too.
    A path shorter than :data:`NEAR` (loopback, a LAN) is never capped: a busy CPU's delays
    look like a queue there, and nothing is gained."""

    def __init__(self) -> None:
        self.cap: float | None = None  # bytes per second; None: not capped
        self.last = -IDLE
        self.queued = 0  # looks in a row that found a queue
        self.resting_until = 0.0

    def look(self, now: float, rtt: float, min_rtt: float, delivered: float, in_flight: int) -> float | None:
        """The cap (bytes per second; None: none), given the smoothed and least RTT
        (seconds), the delivery rate (bytes per second) and the bytes in flight at ``now``."""
        if now - self.last > IDLE:
            self.cap, self.queued = None, 0
        self.last = now
        if now < self.resting_until or min_rtt < NEAR:
            return None
        if delivered <= 0:
            return self.cap
        excess = in_flight - delivered * min_rtt  # bytes
        queue = min(rtt - min_rtt, excess / delivered)  # seconds
        if excess > QUEUE_BYTES and queue > QUEUE_TARGET:
            self.queued += 1
            if self.queued > GIVE_UP:
                self.cap, self.queued, self.resting_until = None, 0, now + REST
            else:
                self.cap = delivered * max(1 - queue / DRAIN_TIME, 1 - MAX_CUT)
        else:
            self.queued = 0
            if self.cap is not None:
                self.cap *= GROW
        return self.cap


NEAR = 0.002
"""Seconds of least RTT below which a path is not paced."""

QUEUE_BYTES = 64 * 1024
"""Bytes queued in the network that a bulk sender leaves alone..."""

QUEUE_TARGET = 0.005
"""... and seconds of queueing."""

DRAIN_TIME = 0.5
"""Seconds in which a standing queue is to be drained: the cap is the delivery rate less
the queue's share of it."""

MAX_CUT = 0.5
"""The cap is at most this share below the delivery rate."""

GROW = 1.05
"""An existing cap grows this much per look that finds no queue."""

GIVE_UP = 30
"""Looks in a row that found a queue, after which the queue is taken to be others'."""

REST = 10.0
"""Seconds without a cap after giving up."""

IDLE = 2.0
"""Seconds without a look after which a cap is dropped."""


class _UnsentBound:
    """The unsent bytes a TCP socket's kernel buffer may hold (``TCP_NOTSENT_LOWAT``): about
    :data:`~intercept.sshshare.UNSENT_TIME` of what the connection delivers (``TCP_INFO``'s
    delivery rate), between :data:`~intercept.sshshare.UNSENT_MIN` and
    :data:`~intercept.sshshare.UNSENT_MAX`; and its pacing cap (``SO_MAX_PACING_RATE``, on
    Linux), as :class:`Pacing` says. Looked at again when the pipe fills, at most once per
    round trip and every :data:`RECHECK` seconds. A fixed unsent bound was either too small
    for a fast link (the sender did not refill it in time: an upload at 78% of 100 Mbit/s)
    or too large for a slow one (a small response waited behind it: 26 ms per 64 KiB at
    20 Mbit/s)."""

    def __init__(self, sock: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.bound = 0
        self.next = 0.0
        self.pacing = Pacing()
        self.cap: int | None = None
        self.idle: asyncio.TimerHandle | None = None  # drops the cap once looks stop (the sender went idle)
        self.set(UNSENT_MIN)

    def set(self, bound: int) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, bound)
            self.bound = bound
        except OSError as e:  # an old kernel, or a socket closed meanwhile: the transport's bound still holds
            log.debug("TCP_NOTSENT_LOWAT not set: %s", e)

    def pace(self, cap: float | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if cap is not None:
            self.idle = self.loop.call_later(IDLE, self._idle)
        value = UNPACED if cap is None else max(int(cap), PACING_MIN)
        if value == (self.cap or UNPACED):
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, struct.pack("I", value))
            self.cap = None if cap is None else value
        except OSError as e:  # not Linux, or a socket closed meanwhile
            log.debug("SO_MAX_PACING_RATE not set: %s", e)

    def _idle(self) -> None:
        self.idle = None
        self.pacing.cap = None
        self.pace(None)

    def pipe_full(self) -> None:
        now = self.loop.time()
        if now < self.next:
            return
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 168)
        except OSError:
            self.next = now + RECHECK
            return
        if len(info) < 168:  # a kernel without tcpi_delivery_rate
            self.next = now + RECHECK
            return
        (mss,) = struct.unpack_from("I", info, 16)  # tcpi_snd_mss
        (unacked,) = struct.unpack_from("I", info, 24)  # segments in flight
        (rtt,) = struct.unpack_from("I", info, 68)  # smoothed, microseconds
        (min_rtt,) = struct.unpack_from("I", info, 148)
        (rate,) = struct.unpack_from("Q", info, 160)  # tcpi_delivery_rate, bytes per second
        self.next = now + max(RECHECK, rtt / 1e6)
        bound = min(UNSENT_MAX, max(UNSENT_MIN, int(rate * UNSENT_TIME)))
        if abs(bound - self.bound) * 4 > self.bound:  # more than a quarter off
            self.set(bound)
        if SO_MAX_PACING_RATE is not None and min_rtt:
            self.pace(self.pacing.look(now, rtt / 1e6, min_rtt / 1e6, rate, unacked * mss))


RECHECK = 0.1
"""Seconds between looks at a socket's delivery rate, at least."""

SO_MAX_PACING_RATE: int | None = getattr(socket, "SO_MAX_PACING_RATE", 47 if sys.platform == "linux" else None)
UNPACED = 0xFFFFFFFF  # the kernel's "no cap"
PACING_MIN = 64 * 1024
"""A cap is never below this many bytes per second."""


def _bound_unsent(inner: asyncio.Transport, pipe: SendPipe, loop: asyncio.AbstractEventLoop) -> None:
    """:class:`_UnsentBound` on a TCP socket, and the transport's own buffer full at
    :data:`~intercept.sshshare.PIPE_HIGH`: beyond that, channels' bytes wait in their own
    senders, where they can take turns (:mod:`intercept.sshshare`). A Unix socket's buffer
    (the port-forward's socketpair) is no network queue: only the transport's bound applies."""
    sock = inner.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        _without_probe_rtt(sock)
        if hasattr(socket, "TCP_NOTSENT_LOWAT"):
            pipe.on_full = _UnsentBound(sock, loop).pipe_full
    inner.set_write_buffer_limits(high=PIPE_HIGH, low=PIPE_LOW)


def _without_probe_rtt(sock: socket.socket) -> None:
    """An SSH socket whose congestion control is BBR (the system's default here, and on many
    cloud machines) uses :data:`LOSS_BASED` instead. BBR's PROBE_RTT cuts what is in flight
    to 4 packets for 200 ms every 10 s: on one connection that carries every request of a
    session, each request sent in that window waits a round trip more (``bench/wan.py`` at
    120 ms: 50 small requests' p99 247 ms under BBR, 126 ms under cubic, 124 ms direct).
    The queue a loss-based sender builds is :class:`Pacing`'s to keep short. Where the
    kernel refuses (a congestion control not allowed to unprivileged users), BBR stays."""
    if not hasattr(socket, "TCP_CONGESTION"):
        return
    try:
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").startswith(b"bbr"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, LOSS_BASED)
    except OSError as e:
        log.debug("TCP_CONGESTION not changed: %s", e)


LOSS_BASED = b"cubic"


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
        loop = asyncio.get_running_loop()
        protocol = self.protocol = self._make()
        pipe = SendPipe(loop)
        _bound_unsent(inner, pipe, loop)
        inner.set_protocol(cast(asyncio.BaseProtocol, _Watched(protocol, pipe)))
        self.transport = CoalescingTransport(inner, loop, pipe)
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
