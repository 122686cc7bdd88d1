"""Copies of HTTP/1 requests for the developers who mirror them (``intercept start --mirror``).

The app answers every request exactly as if nobody mirrored it. Each mirror a request
matches gets a copy (head and body, the bytes the app gets) on a channel of its own per
client connection (:class:`MirrorChannel`), so the developer's process sees a keep-alive
connection's requests in order, on one connection; its answers are framed only to be
counted (:class:`~intercept.routing.http1.Answers`) and are discarded.

Invariants:

- Nothing here pauses, delays or fails the original: a mirror channel never applies
  backpressure to the client connection, and the client connection never waits for one
  to open. A copy that cannot be delivered in time is dropped and counted instead.
- At most :data:`MIRROR_BUFFER` bytes wait in the agent per mirror channel (copies not yet
  taken by the developer's end, or written before the channel is open). A larger body is
  streamed while the developer's end keeps taking it; when it does not, the copy is
  abandoned (and its channel closed, since a partial request is on it), never the original.
- At most :data:`MAX_UNANSWERED` copies wait for an answer on a channel, and a mirror has
  at most :data:`MAX_CHANNELS` channels at once (one per client connection that has
  copies); one more copy is dropped whole. A paused or dead developer therefore costs a
  bounded amount of the agent.
- Every copy ends counted once on its route: ``copied`` (the developer's process answered
  it) or ``dropped``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from intercept.routing.http1 import Answers, ProtocolError

if TYPE_CHECKING:
    from intercept.agent.proxy import Link
    from intercept.routing.match import RegisteredRoute

log = logging.getLogger(__name__)

MIRROR_BUFFER = 1 << 20  # bytes held per mirror channel while the developer's end does not take them (1 MiB)
MAX_UNANSWERED = 32  # copies sent on one mirror channel and not answered yet
MIRROR_LINGER = 10.0  # seconds a channel waits for answers after its client connection ended
MAX_CHANNELS = 64  # HTTP/1 channels of one mirror at once (client connections with copies in flight)


class Copy:
    """One request's copy on a :class:`MirrorChannel`: fed the request's bytes as the app gets them."""

    __slots__ = ("channel", "method", "started", "ended")

    def __init__(self, channel: MirrorChannel, method: bytes) -> None:
        self.channel = channel
        self.method = method
        self.started = False  # some of its bytes are on (or held for) the channel
        self.ended = False  # counted: copied or dropped

    def write(self, data: bytes) -> None:
        if not self.ended and data:
            self.channel.write(self, data)


class MirrorChannel:
    """One channel to a mirroring developer for one client connection, reporting as a link's
    owner (``link_*``). Opened when its first copy begins; copies written meanwhile are held
    (within :data:`MIRROR_BUFFER`)."""

    def __init__(self, dest: Any, route: RegisteredRoute, loop: asyncio.AbstractEventLoop) -> None:
        self.dest = dest
        dest.mirror_channels[route.id] += 1  # given back at close
        self.route = route
        self.loop = loop
        self.link: Link | None = None
        self.held = bytearray()  # copies' bytes before the channel is open
        self.copies: deque[Copy] = deque()  # begun and not answered, oldest first
        self.answers = Answers()
        self.closed = False
        self.finishing = False  # the client connection ended: close once everything is answered
        self.linger: asyncio.TimerHandle | None = None
        self.opening: asyncio.Task[None] | None = loop.create_task(self._open(dest))

    async def _open(self, dest: Any) -> None:
        from intercept.agent.proxy import Unavailable

        try:
            link = await dest.open_mirror(self.route, self)
        except Unavailable as e:
            log.info("mirror of %s: %s", self.route.holder, e.reason)
            self.opening = None
            self.close()
            return
        self.opening = None
        if self.closed:
            link.close()
            return
        self.link = link
        if self.held:
            held, self.held = bytes(self.held), bytearray()
            link.write(held)
        if self.finishing:
            self.finish()

    def begin(self, method: bytes) -> Copy | None:
        """A copy of the next request, or None when it is dropped at once (counted)."""
        if self.closed or len(self.copies) >= MAX_UNANSWERED:
            self.route.dropped += 1
            return None
        copy = Copy(self, method)
        self.copies.append(copy)
        return copy

    def write(self, copy: Copy, data: bytes) -> None:
        link = self.link
        waiting = len(self.held) if link is None else link.buffered()
        if waiting + len(data) > MIRROR_BUFFER:
            self._abandon(copy)
            return
        if not copy.started:
            copy.started = True
            self.answers.expect(copy.method)
        if link is None:
            self.held += data
        else:
            link.write(data)

    def _abandon(self, copy: Copy) -> None:
        """The developer's end is not taking ``copy`` in time: drop it. If part of it is on the
        channel, the channel cannot carry another request: it goes, with its unanswered copies."""
        if not copy.started:
            self.copies.remove(copy)
            self._drop(copy)
            return
        log.info("mirror of %s: a copy was abandoned (%d bytes waiting for their end)", self.route.holder, MIRROR_BUFFER)
        self.close()

    def _drop(self, copy: Copy) -> None:
        if not copy.ended:
            copy.ended = True
            self.route.dropped += 1

    def _answered(self, count: int) -> None:
        for _ in range(min(count, len(self.copies))):
            copy = self.copies.popleft()
            copy.ended = True
            self.route.copied += 1
        if self.finishing and not self.copies:
            self.close()

    def finish(self) -> None:
        """The client connection ended: no more copies; close once the ones sent are answered,
        or after :data:`MIRROR_LINGER` seconds (the rest dropped)."""
        self.finishing = True
        if self.closed:
            return
        if not self.copies:
            self.close()
            return
        if self.link is not None:
            self.link.write_eof()  # a partial copy then ends at the developer's end too
        if self.linger is None:
            self.linger = self.loop.call_later(MIRROR_LINGER, self.close)

    def close(self) -> None:
        """End the channel; copies not answered are dropped."""
        if self.closed:
            return
        self.closed = True
        counts = self.dest.mirror_channels
        counts[self.route.id] -= 1
        if counts[self.route.id] <= 0:
            del counts[self.route.id]
        if self.linger is not None:
            self.linger.cancel()
        if self.opening is not None:
            self.opening.cancel()
        for copy in self.copies:
            self._drop(copy)
        self.copies.clear()
        self.held = bytearray()
        link, self.link = self.link, None
        if link is not None:
            link.close()

    # -- the channel's reports (the owner of a Link) ----------------------------------------

    def link_data(self, link: Link, data: bytes) -> None:
        try:
            self._answered(self.answers.feed(data))
        except ProtocolError as e:
            log.info("mirror of %s: %s; the channel is closed", self.route.holder, e.reason)
            self.close()

    def link_eof(self, link: Link) -> bool:
        self._answered(self.answers.closed() if self.copies else 0)
        self.close()
        return False

    def link_lost(self, link: Link) -> None:
        if self.link is link and self.copies:
            self._answered(self.answers.closed())
        self.link = None
        self.close()

    def link_pause(self, link: Link) -> None:
        pass  # a mirror never holds the original back: its buffer is watched instead (write)

    def link_resume(self, link: Link) -> None:
        pass

    def release(self, link: Link) -> None:
        """The developer's process restarts (drain): no further copies on this channel."""
        self.finish()
