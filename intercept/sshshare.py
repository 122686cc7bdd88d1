"""Channels take turns on their shared SSH connection, so that a bulk body cannot hold back
every other request of the session.

Why: a developer's routed requests all travel as channels of one SSH connection, over
one TCP connection. asyncssh writes a channel's data to the socket as soon as the peer's
window allows (2 MiB by default), so a large download can put megabytes into the socket
ahead of every small response that follows it: over a 20 Mbit/s link that was up to
0.7 s of link time, and 50 small requests' p99 went from 0.2 s (the link's own) to 1.27 s
(``bench/wan.py``, issue 27). Smaller windows would cap a lone transfer below the link
rate on a long path (a window must cover the bandwidth-delay product), so the bound is
put where the bytes wait, on the sending side:

- the socket keeps little unsent data (``TCP_NOTSENT_LOWAT``: :data:`UNSENT_TIME` of the
  connection's delivery rate), so what it holds beyond what is in flight is about 10 ms
  of link time;
- the socket's transport then says "full" once it holds :data:`PIPE_HIGH` bytes
  (``pause_writing``), and :class:`SendPipe` is closed until it drains to :data:`PIPE_LOW`;
- while the pipe is closed, each channel's data waits in its own :class:`ChannelSender`,
  and when the pipe has room, senders with data take turns of at most :data:`QUANTUM`
  bytes (one SSH packet at asyncssh's default size). A small response therefore waits
  for at most one packet of each busy channel, plus what the socket already holds;
- a sender holding more than :data:`SENDER_HIGH` bytes pauses its source (the connection
  it reads from) until it is down to :data:`SENDER_LOW`, so each channel's memory is
  bounded and the source is slowed, not buffered.

When the pipe has room and nothing waits, a write of at most :data:`QUANTUM` bytes goes
to the channel at once, as before: the loopback path pays one check per write.

The pipe is made by :mod:`intercept.sshwrite`'s tunnel, which watches the socket's
transport, and found by a channel through asyncssh's public ``get_extra_info`` (the
transport answers :data:`PIPE_INFO`). A channel of a connection made otherwise gets a
pipe of its own that is never full: turns of :data:`QUANTUM` bytes, nothing held back.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

QUANTUM = 32 * 1024
"""Bytes a channel writes per turn: asyncssh's default packet size, so no extra packets."""

UNSENT_TIME = 0.01
"""Seconds of the connection's delivery rate that the SSH socket may hold unsent beyond what
is in flight (``TCP_NOTSENT_LOWAT``, set by :mod:`intercept.sshwrite`): 125 KB at 100 Mbit/s,
25 KB at 20 Mbit/s. On loopback the kernel sends at once, so nothing waits there."""

UNSENT_MIN = 16 * 1024
"""... at least this many bytes (and this many until a rate is known) ..."""

UNSENT_MAX = 256 * 1024
"""... and at most this many."""

PIPE_HIGH = 16 * 1024
"""The socket's transport is full (no channel writes) above this many bytes of its own buffer..."""

PIPE_LOW = 4 * 1024
"""... and has room again at or below this many."""

SENDER_HIGH = 128 * 1024
"""A channel holding more than this many bytes pauses its source..."""

SENDER_LOW = 32 * 1024
"""... and resumes it at or below this many."""

PIPE_INFO = "intercept_send_pipe"
"""The ``get_extra_info`` name under which a connection's transport gives its :class:`SendPipe`."""


class SendPipe:
    """One SSH connection's way into its socket: open or full, and whose turn it is.

    ``pause_writing``/``resume_writing`` are the socket transport's flow-control callbacks
    (the tunnel routes them here). Invariant: while the pipe is full no sender writes; a
    sender with data waits in :attr:`turns` unless its channel's own window is used up."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.full = False
        self.turns: deque[ChannelSender] = deque()
        self._running = False
        self._queued_run = False
        self.on_full: Callable[[], None] | None = None  # told when the socket fills (intercept.sshwrite)

    @property
    def idle(self) -> bool:
        """Room in the socket, and nobody waiting for it."""
        return not self.full and not self.turns

    def pause_writing(self) -> None:
        self.full = True
        if self.on_full is not None:
            self.on_full()

    def resume_writing(self) -> None:
        self.full = False
        if self.turns and not self._queued_run:
            # not from inside the transport's own write completion: on the next loop iteration
            self._queued_run = True
            (self.loop or asyncio.get_running_loop()).call_soon(self._queued)

    def _queued(self) -> None:
        self._queued_run = False
        self.run()

    def run(self) -> None:
        """Give turns, one packet each, until the socket is full or nobody waits."""
        if self._running:
            return
        self._running = True
        try:
            turns = self.turns
            while turns and not self.full:
                turns.popleft()._turn()
        finally:
            self._running = False


class ChannelSender:
    """What a channel sends, through its connection's :class:`SendPipe`.

    ``pause_source``/``resume_source``: stop and restart whatever feeds :meth:`write` (the
    local connection the data comes from). The channel's session must call
    :meth:`channel_paused` and :meth:`channel_resumed` from its ``pause_writing`` and
    ``resume_writing``, and :meth:`lost` from ``connection_lost``; the sender sets the
    channel's write-buffer limits to zero, so that "paused" means "the peer's window is used
    up" (asyncssh holds the rest), and takes no turn while it is.

    EOF and close wait for the data written before them, as a transport's do.
    """

    def __init__(self, chan: Any, pause_source: Callable[[], None], resume_source: Callable[[], None]) -> None:
        self.chan = chan
        pipe = chan.get_extra_info(PIPE_INFO)
        self.pipe: SendPipe = pipe if isinstance(pipe, SendPipe) else SendPipe()
        self._pause_source = pause_source
        self._resume_source = resume_source
        self.queue: deque[bytes | memoryview] = deque()
        self.queued = 0
        self.blocked = False  # the peer's window is used up: asyncssh holds data for this channel
        self.source_paused = False
        self._waiting = False  # in the pipe's turns
        self._ending: set[str] = set()  # "eof", "close": once the queue is empty
        self._lost = False
        chan.set_write_buffer_limits(high=0, low=0)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost or self._ending:
            return
        if self.pipe.idle and not self.queue and not self.blocked and len(data) <= QUANTUM:
            self.chan.write(data)  # may raise BrokenPipeError, as the channel's write would
            return
        self.queue.append(data)
        self.queued += len(data)
        if self.queued > SENDER_HIGH and not self.source_paused:
            self.source_paused = True
            self._pause_source()
        self._wait()
        self.pipe.run()

    def write_eof(self) -> None:
        self._end("eof")

    def close(self) -> None:
        self._end("close")

    def channel_paused(self) -> None:
        self.blocked = True

    def channel_resumed(self) -> None:
        self.blocked = False
        if self.queue:
            self._wait()
            if not self.pipe.full:  # from inside asyncssh's window processing: on the next iteration
                loop = self.pipe.loop or asyncio.get_running_loop()
                loop.call_soon(self.pipe.run)
        elif self._ending:
            self._finish()

    def lost(self) -> None:
        """The channel is gone: what waits is dropped (a waiting turn finds nothing)."""
        self._lost = True
        self.queue.clear()
        self.queued = 0

    # -- the pipe's side

    def _wait(self) -> None:
        if not self._waiting and not self.blocked and not self._lost:
            self._waiting = True
            self.pipe.turns.append(self)

    def _turn(self) -> None:
        self._waiting = False
        if self.blocked or not self.queue:
            return
        data = self.queue[0]
        if len(data) > QUANTUM:
            view = data if isinstance(data, memoryview) else memoryview(data)
            piece: bytes | bytearray | memoryview = view[:QUANTUM]
            self.queue[0] = view[QUANTUM:]
        else:
            piece = self.queue.popleft()
        self.queued -= len(piece)
        try:
            self.chan.write(bytes(piece))
        except (BrokenPipeError, OSError) as e:  # the channel closed meanwhile: connection_lost follows
            log.debug("channel write dropped: %s", e)
            self.lost()
            return
        if self.source_paused and self.queued <= SENDER_LOW:
            self.source_paused = False
            self._resume_source()
        if self.queue:
            self._wait()  # to the back of the line
        elif self._ending:
            self._finish()

    def _end(self, how: str) -> None:
        if self._lost:
            if how == "close":
                self.chan.close()
            return
        self._ending.add(how)
        if not self.queue:
            self._finish()

    def _finish(self) -> None:
        ending, self._ending = self._ending, set()
        if "eof" in ending:
            try:
                self.chan.write_eof()
            except (BrokenPipeError, OSError) as e:
                log.debug("channel EOF dropped: %s", e)
        if "close" in ending:
            self.chan.close()


__all__ = ["ChannelSender", "SendPipe", "PIPE_INFO", "QUANTUM"]
