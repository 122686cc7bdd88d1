"""Copies of HTTP/2 streams (gRPC calls too) for the developers who mirror them.

The HTTP/2 path (:mod:`intercept.agent.h2proxy`) routes each stream as if nobody mirrored
it; for each mirror the stream matches it also starts a :class:`StreamCopy`: a new stream
with the same headers (and the client's address, as the app gets it), data and trailers,
on the mirror's :class:`MirrorConnection` (HTTP/2 over an SSH channel to the developer's
process, one per mirror route and agent). The developer's response is read, its window
given back at once, and discarded; the copy is ``copied`` when the response ends.

Invariants (those of :mod:`intercept.agent.mirror`, per stream):

- A copy never holds the original back: the client's window is given back by the
  original stream alone, and a copy's bytes are queued apart. A copy whose queue passes
  :data:`~intercept.agent.mirror.MIRROR_BUFFER` (its stream's window, or the channel, does
  not take them) is reset (CANCEL) and dropped; so is one begun while
  :data:`~intercept.agent.mirror.MAX_UNANSWERED` copies wait for an answer on the
  connection, and every copy in flight when the connection is lost.
- Every copy ends counted once on its route: ``copied`` or ``dropped``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from intercept.agent.mirror import MAX_UNANSWERED, MIRROR_BUFFER
from intercept.routing.h2 import CANCEL
from intercept.routing.h2codec import CodecError, Data, GoAway, Headers, Reset, Settings, StreamError, WindowOpened, new_codec

if TYPE_CHECKING:
    from intercept.routing.match import RegisteredRoute

log = logging.getLogger(__name__)

READY_TIMEOUT = 10.0  # for the developer's process to send its SETTINGS


class StreamCopy:
    """One stream's copy: fed the request's headers, data and trailers as the client sends them."""

    __slots__ = ("conn", "headers", "up_id", "queue", "queued", "trailers", "ended", "sent_end", "done")

    def __init__(self, conn: MirrorConnection, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.conn = conn
        self.headers = headers
        self.up_id = 0  # its stream on the connection, once opened
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.ended = ended  # the client's request ended
        self.sent_end = False
        self.done = False  # counted: copied or dropped

    def data(self, data: bytes, end: bool) -> None:
        if self.done:
            return
        if data:
            self.queue.append(data)
            self.queued += len(data)
        self.ended = self.ended or end
        if self.queued > MIRROR_BUFFER:
            self.conn.drop(self, "its developer does not take the request's body in time")
            return
        self.conn.pump(self)

    def end_with(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if not self.done:
            self.trailers, self.ended = trailers, True
            self.conn.pump(self)

    def cancel(self) -> None:
        """The original ends before its request did (reset, or forgotten): a copy whose request is
        not complete goes too; a complete one is still answered."""
        if not self.done and not self.ended:
            self.conn.drop(self, "the client reset its stream")


class MirrorConnection:
    """An HTTP/2 connection to one mirror's developer process, for copies; the owner its link
    reports to. Copies wait for its SETTINGS, and for room under the peer's stream limit."""

    def __init__(self, hub: Any, route: RegisteredRoute) -> None:
        self.hub = hub
        self.route = route
        self.codec = new_codec(client=True)
        self.codec.start()
        self.link: Any = None
        self.ready = False
        self.accepting = True  # takes new copies (not after GOAWAY, a drain or a loss)
        self.closed = False
        self.waiting: deque[StreamCopy] = deque()  # not opened yet
        self.open: dict[int, StreamCopy] = {}  # opened, not answered yet
        self.ready_timer: asyncio.TimerHandle | None = None
        self.opening: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        from intercept.agent.proxy import Unavailable

        try:
            self.link = await self.hub.agent.open_mirror(self.route, self)
        except Unavailable as e:
            log.info("mirror of %s: %s", self.route.holder, e.reason)
            self.opening = None
            self.lost()
            return
        self.opening = None
        if self.closed:
            self.link.close()
            return
        self.hub.dirty.add(self)
        self.hub.flush()
        if not self.ready:
            self.ready_timer = asyncio.get_running_loop().call_later(READY_TIMEOUT, self._not_ready)

    def _not_ready(self) -> None:
        if not self.ready and not self.closed:
            log.info("mirror of %s: no HTTP/2 SETTINGS within %gs (does the process speak h2c?)", self.route.holder,
                     READY_TIMEOUT)
            self.lost()

    def begin(self, headers: list[tuple[bytes, bytes]], ended: bool) -> StreamCopy | None:
        """A copy of a new stream, or None when it is dropped at once (counted)."""
        if not self.accepting or len(self.waiting) + len(self.open) >= MAX_UNANSWERED:
            self.route.dropped += 1
            return None
        copy = StreamCopy(self, headers, ended)
        self.waiting.append(copy)
        self._start_waiting()
        return copy

    def _start_waiting(self) -> None:
        if not self.ready or self.closed:
            return
        while self.waiting and len(self.open) < self.codec.remote_max_streams:
            copy = self.waiting.popleft()
            end = copy.ended and not copy.queue and copy.trailers is None
            try:
                copy.up_id = self.codec.open_stream(copy.headers, end)
            except StreamError as e:
                self._count(copy, copied=False)
                log.info("mirror of %s: %s", self.route.holder, e)
                continue
            self.open[copy.up_id] = copy
            copy.sent_end = end
            self.pump(copy)
        self.hub.dirty.add(self)

    def pump(self, copy: StreamCopy) -> None:
        """Pass the copy's queued bytes on as far as its stream's window (and the channel) allow."""
        if not copy.up_id or copy.sent_end or self.closed or self.link is None:
            return
        codec, queue = self.codec, copy.queue
        try:
            while queue:
                if self.link.buffered() > MIRROR_BUFFER:
                    return  # the channel is not taking bytes: they wait in the copy (bounded)
                room = min(codec.window(copy.up_id), codec.max_frame)
                if room <= 0:
                    return
                chunk = queue[0]
                if len(chunk) > room:
                    piece, queue[0] = chunk[:room], chunk[room:]
                else:
                    piece = queue.popleft()
                copy.queued -= len(piece)
                last = not queue and copy.ended and copy.trailers is None
                codec.send_data(copy.up_id, piece, end_stream=last)
                copy.sent_end = last
            if copy.ended and not copy.sent_end:
                if copy.trailers is not None:
                    codec.send_headers(copy.up_id, copy.trailers, end_stream=True)
                else:
                    codec.end_stream(copy.up_id)
                copy.sent_end = True
        except StreamError as e:
            self.open.pop(copy.up_id, None)
            self._count(copy, copied=False)
            log.debug("mirror of %s: %s", self.route.holder, e)
        self.hub.dirty.add(self)

    def drop(self, copy: StreamCopy, reason: str) -> None:
        """Abandon ``copy`` (counted dropped); its stream, if opened, is reset."""
        if copy.done:
            return
        log.info("mirror of %s: a copy was dropped: %s", self.route.holder, reason)
        if copy.up_id:
            self.open.pop(copy.up_id, None)
            if not self.closed:
                self.codec.reset(copy.up_id, CANCEL)
                self.hub.dirty.add(self)
        else:
            try:
                self.waiting.remove(copy)
            except ValueError:
                pass
        self._count(copy, copied=False)
        copy.queue.clear()
        self._start_waiting()

    def _count(self, copy: StreamCopy, copied: bool) -> None:
        if not copy.done:
            copy.done = True
            if copied:
                self.route.copied += 1
            else:
                self.route.dropped += 1

    def _answered(self, up_id: int) -> None:
        copy = self.open.pop(up_id, None)
        if copy is not None:
            if not copy.sent_end:  # answered before its request ended: the rest is not wanted
                copy.queue.clear()
                copy.sent_end = True
                self.codec.reset(up_id, CANCEL)
            self._count(copy, copied=True)
            self._start_waiting()
            if not self.accepting and not self.open and not self.waiting:
                self.close()

    # -- the link's reports --------------------------------------------------------------

    def link_data(self, link: Any, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.codec.receive(data)
        except CodecError as e:
            log.info("mirror of %s: its process broke HTTP/2: %s", self.route.holder, e.reason)
            self.lost()
            return
        self.hub.dirty.add(self)
        for ev in events:
            t = type(ev)
            if t is Data:
                self.codec.ack(ev.stream_id, ev.flow_length)  # read and discarded
                if ev.end_stream:
                    self._answered(ev.stream_id)
            elif t is Headers:
                if ev.end_stream and ev.kind != Headers.INFORMATIONAL:
                    self._answered(ev.stream_id)
            elif t is WindowOpened:
                for copy in [self.open[ev.stream_id]] if ev.stream_id in self.open else list(self.open.values()):
                    self.pump(copy)
            elif t is Reset:
                copy = self.open.pop(ev.stream_id, None)
                if copy is not None:
                    self._count(copy, copied=False)
                    self._start_waiting()
            elif t is Settings:
                self.ready = True
                self._start_waiting()
            elif t is GoAway:
                self.accepting = False
                self.hub.mirror_gone(self)
                if not self.open:
                    self.close()
        self.hub.flush()

    def link_eof(self, link: Any) -> bool:
        return False  # the link closes; link_lost follows

    def link_lost(self, link: Any) -> None:
        self.link = None
        self.lost()

    def link_pause(self, link: Any) -> None:
        pass  # copies wait in their queues (bounded): nothing else is held back

    def link_resume(self, link: Any) -> None:
        for copy in list(self.open.values()):
            self.pump(copy)
        self.hub.flush()

    def release(self, link: Any) -> None:
        """The developer's process restarts (drain): no new copies here; close once answered."""
        self.accepting = False
        self.hub.mirror_gone(self)
        for copy in list(self.waiting):
            self.drop(copy, "its developer's process restarts")
        if not self.open:
            self.close()

    def lost(self) -> None:
        """The connection cannot go on: every copy not answered is dropped."""
        self.accepting = False
        self.hub.mirror_gone(self)
        for copy in [*self.waiting, *self.open.values()]:
            self._count(copy, copied=False)
        self.waiting.clear()
        self.open.clear()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.accepting = False
        self.hub.mirror_gone(self)
        self.hub.dirty.discard(self)
        if self.opening is not None:
            self.opening.cancel()
        if self.ready_timer is not None:
            self.ready_timer.cancel()
        if self.link is not None:
            try:
                self.codec.goaway()
                self.flush()
            finally:
                link, self.link = self.link, None
                link.close()

    def flush(self) -> None:
        if self.link is not None:
            data = self.codec.pending()
            if data:
                self.link.write(data)
