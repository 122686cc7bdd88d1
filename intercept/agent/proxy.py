"""The agent's HTTP listener: every request routed on its own headers, bytes forwarded as received.

One :class:`ClientConnection` per downstream TCP connection. It finds each request head
in the stream (:mod:`intercept.routing.http1`), asks the route table where it goes, and
forwards the head and body bytes unchanged over a :class:`Link`: a reused TCP connection
to the app container, or an SSH channel to the developer whose route matched. The
response is framed the same way, so the next request on a keep-alive connection is
routed again on its own headers. Requests on one connection are handled one at a time,
so pipelined requests are answered in order.

Invariants:

- A request that matches no route goes to the upstream, whatever happens to developers.
- A malformed request gets an error response on its own connection only.
- Nothing is buffered without bound: a full outgoing buffer pauses reading on the
  other side, in both directions.
- At most ``max_connections`` connections are *fresh* at once (accepted, no exchange
  completed yet: what a flood of new connections consists of); one more is answered
  503 as soon as it connects and closed. A connection stops being fresh once it has
  completed a request and its response (or switched protocols; on the HTTP/2 path,
  once one of its streams has), so established keep-alive users are counted apart and
  never refused.
- No client holds a connection (fresh or not) by sending nothing: one that waits for its
  request head, or stops sending a request body while the agent is reading it, longer
  than ``header_timeout`` is answered 408 and closed (:meth:`ClientConnection.expire`).
  Waiting for the app's response is the app's time, not the client's: never cut.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from intercept.routing.http1 import (
    MAX_EMPTY_LINES,
    MAX_HEAD_SIZE,
    ChunkedScanner,
    Framing,
    Kind,
    ProtocolError,
    RequestHead,
    ResponseHead,
    classify,
    error_response,
    forwarding_fields,
    parse_request_head,
    parse_response_head,
    skip_empty_lines,
)

from intercept.routing.h2 import begins_h2, h2c_upgrade_settings

if TYPE_CHECKING:
    from intercept.agent.h2proxy import Hub
    from intercept.agent.mirror import Copy, MirrorChannel
    from intercept.routing.match import RegisteredRoute, RouteTable

log = logging.getLogger(__name__)


class Link(Protocol):
    """One byte stream to where a request goes; reports to its owner's ``link_*`` methods."""

    reusable: bool  # may carry another request after this response

    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Unavailable(Exception):
    """The destination could not be reached; ``reason`` is the 502 body."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RouteGone(Exception):
    """The matched route was removed while its request waited: route the request again."""


class Destinations(Protocol):
    """What a connection needs from the agent."""

    routes: RouteTable
    pool: UpstreamPool | None
    h2: Hub | None  # the HTTP/2 path (intercept.agent.h2proxy); None relays HTTP/2 untouched
    connections: weakref.WeakSet[ClientConnection]
    forwarded_headers: bool  # add the client's address to each request (X-Forwarded-For, Forwarded)
    max_connections: int  # fresh connections allowed at once (0: no cap)
    fresh_connections: int  # connections that have not completed an exchange yet
    mirror_channels: collections.Counter[int]  # HTTP/1 mirror channels open, by mirror route id

    async def open_upstream(self, owner: ClientConnection) -> Link: ...
    async def open_developer(self, route: RegisteredRoute, owner: ClientConnection, first: bytes = b"") -> Link: ...
    async def open_mirror(self, route: RegisteredRoute, owner: MirrorChannel) -> Link: ...


class TCPLink(asyncio.Protocol):
    """A TCP connection to the upstream (the app container)."""

    reusable = True

    def __init__(self, owner: ClientConnection | UpstreamPool) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.pooled = False  # it served another client connection before: it may have gone stale

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.write = transport.write  # type: ignore[attr-defined, method-assign]  # one call less per write

    def data_received(self, data: bytes) -> None:
        self.owner.link_data(self, data)

    def eof_received(self) -> bool:
        return self.owner.link_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.link_lost(self)

    def pause_writing(self) -> None:
        self.owner.link_pause(self)

    def resume_writing(self) -> None:
        self.owner.link_resume(self)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        self.transport.close()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()


_REPLAYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})  # idempotent: may be resent on a fresh link


class UpstreamPool:
    """Idle keep-alive connections to the upstream, shared by every client connection.

    A client that opens a connection per request (curl in a script, health checks)
    would otherwise cost a TCP connect to the app per request; nginx's ``keepalive``
    does the same. While idle, a link reports to the pool: anything it says (data,
    EOF, close) ends it.
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.idle: list[TCPLink] = []

    def take(self, owner: ClientConnection) -> TCPLink | None:
        while self.idle:
            link = self.idle.pop()
            if not link.transport.is_closing():
                link.owner = owner
                link.transport.resume_reading()
                return link
        return None

    def give(self, link: TCPLink) -> None:
        """Keep a clean link (no request or response in flight) for another client connection."""
        if len(self.idle) >= self.limit or link.transport.is_closing():
            link.close()
            return
        link.owner = self
        link.pooled = True
        self.idle.append(link)

    def close(self) -> None:
        """Close every idle link (the agent is closing)."""
        idle, self.idle = self.idle, []
        for link in idle:
            link.close()

    def _drop(self, link: TCPLink) -> None:
        if link in self.idle:
            self.idle.remove(link)
        link.close()

    def link_data(self, link: TCPLink, data: bytes) -> None:
        self._drop(link)  # an idle upstream connection that speaks is out of step

    def link_eof(self, link: TCPLink) -> bool:
        self._drop(link)
        return True

    def link_lost(self, link: TCPLink) -> None:
        if link in self.idle:
            self.idle.remove(link)

    def link_pause(self, link: TCPLink) -> None:
        pass

    def link_resume(self, link: TCPLink) -> None:
        pass


class Mode(Enum):
    CLASSIFY = 0  # first bytes: HTTP or something else?
    HEAD = 1  # waiting for a request head
    CONNECTING = 2  # head parsed, destination being reached
    BODY = 3  # forwarding the request body
    AWAIT = 4  # request sent, response not finished: further bytes wait
    TUNNEL = 5  # raw bytes both ways (not HTTP, or after an Upgrade)
    CLOSED = 6


# Python 3.11 reads an enum member through EnumType's __getattr__ hook: 0.1 µs a time, some
# twenty times per request here. The methods below use these names for the same objects
# (3.12 reads members as plain class attributes).
_CLASSIFY, _HEAD, _CONNECTING, _BODY, _AWAIT, _TUNNEL, _CLOSED = Mode
_NO_BODY, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _SWITCHED = (Framing.NONE, Framing.LENGTH, Framing.CHUNKED, Framing.UNTIL_CLOSE,
                                                       Framing.TUNNEL)


class ClientConnection(asyncio.Protocol):
    def __init__(self, destinations: Destinations) -> None:
        self.dest = destinations
        self.transport: asyncio.Transport | None = None
        self.mode = _CLASSIFY
        self.pending = b""  # downstream bytes not yet processed
        self.scanned = 0  # how far ``pending`` was searched for the end of a head
        self.empty_lines = 0  # bytes of empty lines skipped before the next request line
        self.link_eof_seen = False  # in a tunnel: the far side sent EOF
        self.paused: set[str] = set()  # why downstream reading is paused
        self.down_full = False  # downstream write buffer is full
        self.client_eof = False
        # where requests go; links are reused across requests
        self.upstream: Link | None = None
        self.developers: dict[str, Link] = {}
        self.link: Link | None = None  # the current request's link
        self.link_used = False  # the current link carried an earlier request
        self.connecting: asyncio.Task[None] | None = None
        self.waiting_since = 0.0  # when the connection began waiting for its next request head
        # the current request
        self.req: RequestHead | None = None
        self.req_left = 0
        self.req_chunks: ChunkedScanner | None = None
        # where a body-less idempotent request's bytes are (buffer, start, end), to resend it once
        # if a reused link turns out stale; sliced only then, not on every request
        self.replay: tuple[bytes, int, int] | None = None
        # its response
        self.resp: ResponseHead | None = None
        self.resp_pending = b""  # a response head not complete yet
        self.resp_scanned = 0  # how far ``resp_pending`` was searched for the end of the head
        self.resp_left = 0
        self.resp_chunks: ChunkedScanner | None = None
        self.resp_started = False
        self.resp_done = False
        self.forwarded = b""  # the lines added to every request head: the same for the whole connection
        self.fresh = False  # counted in dest.fresh_connections: no exchange completed yet
        self.reads = 0  # downstream reads so far: progress, as the sweeper sees it (expire)
        self.stall = (0, 0.0)  # (reads, when) the sweeper last saw this connection's body progress
        # mirrors (intercept.agent.mirror): a channel per mirror route, and the current request's copies
        self.mirrors: dict[int, MirrorChannel] | None = None
        self.copies: list[Copy] | None = None
        self.copied_head: RequestHead | None = None  # the request the copies are of (a resent one is not copied again)

    # -- downstream events -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send = transport.write  # to the client
        self.loop = asyncio.get_running_loop()  # once: get_running_loop() costs a getpid() syscall
        self.waiting_since = self.loop.time()
        dest = self.dest
        if dest.max_connections and dest.fresh_connections >= dest.max_connections:
            self.mode = _CLOSED
            log.warning("503 to %s: %d connections have not completed a request yet (--max-connections %d)",
                        transport.get_extra_info("peername"), dest.fresh_connections, dest.max_connections)
            transport.write(error_response(503, f"the agent has {dest.fresh_connections} new connections that have "
                                                f"not completed a request (--max-connections {dest.max_connections}); "
                                                "try again shortly"))
            transport.close()
            return
        dest.fresh_connections += 1
        self.fresh = True
        dest.connections.add(self)
        if self.dest.forwarded_headers:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and peer:
                self.forwarded = forwarding_fields(str(peer[0]))

    def expire(self, now: float, timeout: float) -> None:
        """Close a connection that has waited for a request head longer than ``timeout``
        (a slow or idle client holding a socket): 408 if a head had begun. Likewise one whose
        request body has not advanced for ``timeout`` while the agent was reading it (a
        ``Content-Length: 1000000`` and one byte), unless a response already began."""
        mode = self.mode
        if mode in (_CLASSIFY, _HEAD) and now - self.waiting_since > timeout:
            if self.pending:
                self._refuse(408, f"no complete request head within {timeout:g}s", head_only=False)
            else:
                self._close()
        elif mode is _BODY and not self.paused and not self.resp_started:
            reads, since = self.stall
            if reads != self.reads or since == 0.0:
                self.stall = (self.reads, now)
            elif now - since > timeout:
                self._refuse(408, f"the request body stopped arriving for {timeout:g}s", head_only=False)
        else:
            self.stall = (0, 0.0)

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        if self.mode is _TUNNEL:
            self.link.write(data)
            return
        if self.pending:
            if not isinstance(self.pending, bytearray):
                self.pending = bytearray(self.pending)
            self.pending += data  # amortized: a slow head is not copied again on every read
            data, self.pending = self.pending, b""
        self._consume(data)

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.mode is _TUNNEL:
            self.link.write_eof()
            if self.link_eof_seen:
                self._close()
            return True
        # keep the connection half open while an answer is still owed
        return self.mode in (_CONNECTING, _AWAIT) or (self.mode is _BODY and self.resp_started)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        self._close()

    def pause_writing(self) -> None:
        self.down_full = True
        if self.link is not None:
            self.link.pause_reading()

    def resume_writing(self) -> None:
        self.down_full = False
        if self.link is not None:
            self.link.resume_reading()

    # -- requests ----------------------------------------------------------------------

    def _consume(self, data: bytes) -> None:
        """Process downstream bytes; whatever cannot be processed yet goes to ``pending``."""
        pos, n = 0, len(data)
        while pos < n:
            mode = self.mode
            if mode is _BODY:
                end = self._request_body_end(data, pos)
                if self.mode is _CLOSED:
                    return
                if end > pos:
                    self.link.write(data[pos:end])
                    if self.copies:
                        for copy in self.copies:
                            copy.write(data[pos:end])
                pos = end
            elif mode is _HEAD:
                if data[pos] == 13:
                    pos = self._skip_empty_lines(data, pos)
                    if pos < 0 or pos == n:
                        return
                try:
                    head = parse_request_head(data, pos, self.scanned if pos == 0 else 0)
                except ProtocolError as e:
                    self._refuse(e.status, e.reason, head_only=False)
                    return
                if head is None:
                    self.pending = data if pos == 0 else data[pos:]
                    self.scanned = len(self.pending)
                    return
                self.scanned = 0
                self.req = head
                if head.upgrade and self._h2c_upgrade(data, pos, head):
                    return
                routes = self.dest.routes
                route = routes.match(head.method, head.target, head.fields(routes.names)) if routes.held else None
                link = self._current_link(route)
                if link is None:
                    self.mode = _CONNECTING
                    self._pause("connecting")
                    self.connecting = self.loop.create_task(self._connect(route, head))
                    self.pending = data[pos:]
                    return
                self.link_used = True
                pos = self._send_head(link, data, pos)
                if self.mode is _CLOSED:
                    return
            elif mode is _CLASSIFY:
                if data[0] == 13:
                    pos = self._skip_empty_lines(data, 0)
                    if pos < 0 or pos == n:
                        return
                    data, pos, n = data[pos:], 0, n - pos
                kind = classify(data)
                if kind is Kind.NEED_MORE:
                    self.pending = data
                    return
                if self.dest.h2 is not None:
                    if begins_h2(data):
                        self._hand_over_h2(data)
                        return
                    if kind is Kind.OTHER and data[0] == 0x16:  # a TLS record: counted for intercept start's warning
                        self.dest.h2.tls_seen += 1
                if kind is Kind.HTTP:
                    self.mode = _HEAD
                    continue
                self.mode = _CONNECTING
                self._pause("connecting")
                self.connecting = self.loop.create_task(self._connect(None, None))
                self.pending = data
                return
            elif mode is _TUNNEL:
                self.link.write(data[pos:])
                return
            else:  # CONNECTING or AWAIT: later
                self.pending = data[pos:]
                if len(self.pending) > MAX_HEAD_SIZE:
                    self._pause("pipeline")
                return

    def _skip_empty_lines(self, data: bytes, pos: int) -> int:
        """Skip the empty lines (CRLF pairs) at ``data[pos]`` that may precede a request line.

        They are dropped, not forwarded, and skipped once as they arrive rather than
        rescanned on every read. Returns where the request line may begin, or -1 when
        there is nothing more to do now (refused, or a CR whose LF is still to come).
        """
        end = skip_empty_lines(data, pos)
        self.empty_lines += end - pos
        if self.empty_lines > MAX_EMPTY_LINES:
            self._refuse(400, "too many empty lines before the request line", head_only=False)
            return -1
        if end == len(data) - 1 and data[end] == 13:
            self.pending = data[end:]
            return -1
        return end

    def _head_bytes(self, data: bytes, start: int, end: int) -> bytes:
        """What the destination gets of ``data[start:end]``, the head at its start: the
        client's address spliced in as new lines before the head's final CRLF."""
        if not self.forwarded:
            return data[start:end]
        pos = start + self.req.size
        return b"".join((data[start : pos - 2], self.forwarded, data[pos - 2 : end]))

    def _send_head(self, link: Link, data: bytes, pos: int, carried: bool = False) -> int:
        """Start forwarding the current request (head at ``data[pos]``) over ``link``; with
        ``carried``, a request without a body whose bytes the link's opening carried."""
        head = self.req
        switched = self.link is not link
        self.link = link
        self.resp = None
        self.resp_started = self.resp_done = False
        start = pos
        pos += head.size
        if head.framing is _NO_BODY:  # most requests: the head is the whole request
            self.req_chunks = None
            self.replay = (data, start, pos) if head.method in _REPLAYABLE else None
            self.mode = _AWAIT
            end = pos
        else:
            self.req_left = head.length
            self.req_chunks = ChunkedScanner(400) if head.framing is _CHUNKED else None
            self.replay = None
            self.mode = _BODY
            end = self._request_body_end(data, pos)
        if self.mode is not _CLOSED:
            chunk = self._head_bytes(data, start, end)
            if not carried:
                link.write(chunk)
            if head is not self.copied_head:
                self.copied_head = head
                self.copies = self._begin_copies(head) if self.dest.routes.mirrors and not head.upgrade else None
                if self.copies:
                    for copy in self.copies:
                        copy.write(chunk)
        if switched and not carried:  # (a carried link is resumed by _connect, once this request is all taken)
            if self.down_full:
                link.pause_reading()
            else:
                link.resume_reading()  # it may have been paused while it was not current
        return end

    def _begin_copies(self, head: RequestHead) -> list[Copy] | None:
        """A copy of the request ``head`` for each mirror it matches (on this connection's
        channel to that mirror, opened with the first): the bytes the app gets go to them too."""
        from intercept.agent.mirror import MAX_CHANNELS, MirrorChannel

        routes = self.dest.routes
        matching = routes.mirrors_matching(head.method, head.target, head.fields(routes.names))
        if not matching:
            return None
        if self.mirrors is None:
            self.mirrors = {}
        copies = []
        for route in matching:
            channel = self.mirrors.get(route.id)
            if channel is None or channel.closed:
                if self.dest.mirror_channels[route.id] >= MAX_CHANNELS:
                    route.dropped += 1  # this mirror has a channel for as many connections as it may
                    continue
                channel = self.mirrors[route.id] = MirrorChannel(self.dest, route, self.loop)
            copy = channel.begin(head.method)
            if copy is not None:
                copies.append(copy)
        return copies

    def _request_body_end(self, data: bytes, pos: int) -> int:
        """How far the current request's body reaches in ``data``; moves on when it ends."""
        head = self.req
        if head.framing is _LENGTH:
            take = min(self.req_left, len(data) - pos)
            self.req_left -= take
            end, done = pos + take, self.req_left == 0
        elif head.framing is _CHUNKED:
            try:
                end = self.req_chunks.feed(data, pos)
            except ProtocolError as e:
                self._refuse(e.status, e.reason, head_only=False)
                return len(data)
            done = self.req_chunks.done
        else:
            end, done = pos, True
        if done:
            if not self.resp_done:  # an upgrade request waits here too: its answer decides what follows
                self.mode = _AWAIT
            else:
                self._request_finished()
        return end

    async def _connect(self, route: RegisteredRoute | None, head: RequestHead | None, again: bool = False) -> None:
        """Reach the destination of a request (or of a non-HTTP stream when ``head`` is None).
        ``again``: the request is being sent a second time (its first link closed unanswered)."""
        reused = False
        # a request without a body may come with the channel's opening (no round trip first)
        first = b""
        if route is not None and head is not None and head.framing is _NO_BODY:
            first = self._head_bytes(self.pending, 0, head.size)
        while True:
            try:
                if route is None:
                    link = self.upstream = await self.dest.open_upstream(self)
                else:
                    link = self.developers[route.session_id] = await self.dest.open_developer(route, self, first)
                break
            except RouteGone:
                route = self.dest.routes.match(head.method, head.target, head.headers)
                link = self._current_link(route)
                if link is not None:  # the link this connection has to the app (or to the new holder)
                    reused = True
                    break
            except Unavailable as e:
                self.connecting = None
                if head is None:
                    log.info("non-HTTP stream dropped: %s", e.reason)
                    self._close()
                else:
                    self._refuse(502, e.reason, head_only=head.method == b"HEAD")
                return
        self.connecting = None
        if self.mode is _CLOSED:
            link.close()
            return
        self.link_used = reused or getattr(link, "pooled", False)  # an idle upstream connection
        data, self.pending = self.pending, b""
        self._resume("connecting")
        if head is None:
            self.link = link
            self._tunnel(data)
            return
        carried = not reused and getattr(link, "carried", False)
        pos = self._send_head(link, data, 0, carried)
        if pos < len(data) and self.mode is not _CLOSED:
            self._consume(data[pos:])
        if carried and self.link is link and not self.down_full:
            # last: the answer may have come with the opening's confirmation, and resuming
            # hands it over at once; what the client sent after the request waits in pending
            link.resume_reading()

    def _current_link(self, route: RegisteredRoute | None) -> Link | None:
        """The link this connection already has to the destination of ``route`` (None: the
        app), when it can carry another request; one that cannot is closed."""
        link = self.upstream if route is None else self.developers.get(route.session_id)
        if link is not None and not link.reusable:
            self._forget(link)
            link.close()
            link = None
        return link

    def _established(self) -> None:
        """No longer fresh: this connection no longer counts against ``max_connections``."""
        if self.fresh:
            self.fresh = False
            self.dest.fresh_connections -= 1

    def _request_finished(self) -> None:
        """Request and response are both complete: the next request may start."""
        if self.fresh:
            self._established()
        self.mode = _HEAD
        self.empty_lines = 0
        self.waiting_since = self.loop.time()
        if self.paused:
            self._resume("pipeline")
        if self.pending:
            data, self.pending = self.pending, b""
            self._consume(data)
        if self.client_eof and self.mode is _HEAD:  # the client sent all it will send
            self._close()

    def _tunnel(self, data: bytes) -> None:
        if self.req is not None:  # switched protocols; a stream that is not HTTP stays counted
            self._established()
        self.mode = _TUNNEL
        self._resume("pipeline")
        if data:
            self.link.write(data)
        if self.client_eof:
            self.link.write_eof()

    # -- responses ---------------------------------------------------------------------

    def link_data(self, link: Link, data: bytes) -> None:
        if link is not self.link or self.resp_done:
            # an idle connection spoke out of turn: it can no longer be trusted for framing
            self._forget(link)
            link.close()
            return
        if self.mode is _TUNNEL:
            self.send(data)
            return
        scanned = 0
        if self.resp_pending:
            if not isinstance(self.resp_pending, bytearray):
                self.resp_pending = bytearray(self.resp_pending)
            self.resp_pending += data  # amortized, and searched on from where the last search ended
            data, self.resp_pending, scanned = self.resp_pending, b"", self.resp_scanned
        send = self.send
        pos, n = 0, len(data)
        try:
            while pos < n:
                if self.resp is None:
                    resp = parse_response_head(data, self.req.method, pos, scanned if pos == 0 else 0)
                    if resp is None:
                        self.resp_pending = data[pos:]
                        self.resp_scanned = len(self.resp_pending)
                        return
                    start = pos
                    pos += resp.size
                    self.resp_started = True
                    if resp.status < 200 and resp.framing is not _SWITCHED:
                        send(data[start:pos])  # 1xx: forward, a final response follows
                        continue
                    self.resp = resp
                    if resp.framing is _SWITCHED:
                        send(data[start:])
                        pending, self.pending = self.pending, b""
                        self._tunnel(pending)
                        return
                    self.resp_left = resp.length
                    self.resp_chunks = ChunkedScanner(502) if resp.framing is _CHUNKED else None
                    end = self._response_body_end(data, pos)
                    send(data if start == 0 and end == n else data[start:end])
                else:
                    end = self._response_body_end(data, pos)
                    send(data if pos == 0 and end == n else data[pos:end])
                pos = end
                if self.resp_done:
                    if pos < n:  # bytes after a complete response: do not reuse this link
                        self._forget(link)
                        link.close()
                    self._response_finished(link)
                    return
        except ProtocolError as e:
            self._forget(link)
            link.close()
            if self.resp is None:
                self._refuse(502, e.reason, head_only=False)
            else:
                self._close()

    def _response_body_end(self, data: bytes, pos: int) -> int:
        framing = self.resp.framing
        if framing is _LENGTH:
            take = min(self.resp_left, len(data) - pos)
            self.resp_left -= take
            self.resp_done = self.resp_left == 0
            return pos + take
        if framing is _CHUNKED:
            end = self.resp_chunks.feed(data, pos)
            self.resp_done = self.resp_chunks.done
            return end
        if framing is _UNTIL_CLOSE:
            return len(data)
        self.resp_done = True
        return pos

    def _response_finished(self, link: Link) -> None:
        self.resp_done = True
        # after an upgrade that was declined, the destination's idea of the connection's
        # state cannot be trusted for framing (some servers stop parsing HTTP): never reuse it
        if not (self.resp.keep_alive and link.reusable) or self.req.upgrade:
            self._forget(link)
            link.close()
        if not (self.req.keep_alive and self.resp.keep_alive):
            self._close()
        elif self.mode is _AWAIT:
            self._request_finished()

    def link_eof(self, link: Link) -> bool:
        if link is self.link and self.mode is _TUNNEL:
            self.link_eof_seen = True
            if self.client_eof:
                self._close()
            elif self.transport.can_write_eof():
                self.transport.write_eof()
            return True
        link.close()  # outside a tunnel, EOF ends the link: link_lost follows
        return True

    def link_lost(self, link: Link) -> None:
        self._forget(link)
        if link is not self.link or self.mode is _CLOSED:
            return
        self.link = None
        self._resume("link")  # a lost link's backpressure must not keep the client paused
        if self.mode is _TUNNEL:
            self._close()
        elif self.mode is _BODY and self.resp_done:
            self._close()  # answered early; the rest of the body has nowhere to go
        elif self.resp is not None and self.resp.framing is _UNTIL_CLOSE:
            self._close()  # the close is the end of this response
        elif self.mode in (_BODY, _AWAIT) and not self.resp_done:
            if not self.resp_started and self.link_used and self.replay is not None:
                # a reused keep-alive connection was closed by the server: resend once
                self.mode = _CONNECTING
                self._pause("connecting")
                buf, start, end = self.replay
                self.pending = buf[start:end] + self.pending
                routes = self.dest.routes
                route = routes.match(self.req.method, self.req.target, self.req.headers) if routes.held else None
                self.connecting = self.loop.create_task(self._connect(route, self.req, again=True))
            elif not self.resp_started:
                self._refuse(502, "the destination closed the connection before responding", head_only=self.req.method == b"HEAD")
            else:
                self._close()

    def release(self, link: Link) -> None:
        """Close ``link`` now if it is idle, else once the current response is complete."""
        if self.connecting is not None and link not in self._links():
            # just opened for the request this connection holds, not handed to it yet: it carries
            # that request, and the response's end closes it (no longer reusable); closed now,
            # the request would be lost on a channel nobody answers
            return
        busy = link is self.link and (
            self.mode in (_BODY, _TUNNEL) or (self.mode is _AWAIT and not self.resp_done)
        )
        if not busy:
            self._forget(link)
            link.close()

    def link_pause(self, link: Link) -> None:
        self._pause("link")

    def link_resume(self, link: Link) -> None:
        self._resume("link")

    # -- HTTP/2: handed over to intercept.agent.h2proxy --------------------------------

    def _h2c_upgrade(self, data: bytes, pos: int, head: RequestHead) -> bool:
        """An HTTP/1.1 request asking for ``Upgrade: h2c`` on a fresh connection: the
        HTTP/2 path answers 101 and routes it as stream 1, and every later stream."""
        if self.dest.h2 is None or self.link is not None or not self.dest.h2.takes_upgrade():
            return False
        settings = h2c_upgrade_settings(head)
        if settings is None:
            return False
        self._hand_over_h2(data[pos + head.size :], head, settings, bytes(data[pos:]))
        return True

    def _hand_over_h2(self, data: bytes, head: RequestHead | None = None, settings: bytes | None = None,
                      original: bytes = b"") -> None:
        """From now on the transport belongs to the HTTP/2 path, with its place among the
        fresh connections (released once a stream completes there); this object is done."""
        self.mode = _CLOSED
        fresh, self.fresh = self.fresh, False
        self.dest.connections.discard(self)
        self.dest.h2.accept(self.transport, bytes(data), head, settings, original, fresh=fresh)

    # -- helpers -----------------------------------------------------------------------

    def _links(self) -> list[Link]:
        links = list(self.developers.values())
        if self.upstream is not None:
            links.append(self.upstream)
        if self.link is not None and self.link not in links:
            links.append(self.link)
        return links

    def _forget(self, link: Link) -> None:
        if self.upstream is link:
            self.upstream = None
        for key, value in list(self.developers.items()):
            if value is link:
                del self.developers[key]

    def _pause(self, reason: str) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self.paused:
            self.paused.discard(reason)
            if not self.paused and self.mode is not _CLOSED:
                self.transport.resume_reading()

    def _refuse(self, status: int, reason: str, *, head_only: bool) -> None:
        """Answer with an error of our own (unless a response already began) and close."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.info("%s from %s: %s", status, peer, reason)
        if not self.resp_started and self.mode is not _CLOSED:
            self.transport.write(error_response(status, reason, head_only=head_only))
        self._close()

    def _close(self) -> None:
        self._established()
        if self.mirrors:
            mirrors, self.mirrors, self.copies = self.mirrors, None, None
            for channel in mirrors.values():
                channel.finish()
        clean = self.mode is _HEAD  # both directions ended a message: nothing in flight
        if self.mode is not _CLOSED:
            self.mode = _CLOSED
            self.transport.close()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if clean and isinstance(upstream, TCPLink) and self.dest.pool is not None:
                if self.link is upstream:
                    self.link = None
                self.dest.pool.give(upstream)
            else:
                upstream.close()
        for link in self._links():
            link.close()
