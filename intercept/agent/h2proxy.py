"""The agent's HTTP/2 path: h2c connections terminated, every stream routed on its own headers.

:mod:`intercept.agent.proxy` hands over a downstream connection that begins with the
HTTP/2 preface, or an HTTP/1.1 request that asks for ``Upgrade: h2c``, to the
:class:`Hub`. Then:

- While the route table is empty, a prior-knowledge connection is a :class:`Relay`:
  bytes both ways to the app, with frame boundaries followed so that, when the first
  route appears, a graceful GOAWAY can be given to the client at a boundary
  (:class:`~intercept.routing.h2.RelayConversion`): calls in flight finish on the relay,
  new calls come on a new connection, which is routed.
- Otherwise it is a :class:`Downstream`: the agent is the HTTP/2 server. Each stream is
  matched with the same :meth:`RouteTable.match` as HTTP/1.1 and started as a new
  stream on an :class:`UpConnection` from a :class:`Pool`: the app's pool (TCP, shared
  by every downstream connection) or one developer's pool (HTTP/2 over the channels of
  their SSH session to their local process).

Invariants:

- A stream is forwarded as received: headers, metadata (``-bin`` keys too), data,
  trailers, trailers-only responses, RST_STREAM codes; PING and SETTINGS are answered
  per hop. The agent adds only the client's address (``x-forwarded-for``, ``forwarded``)
  after the request's own fields, as on HTTP/1.1, unless ``--no-forwarded-headers``.
- Flow control is end to end per stream: bytes received on one side are given back
  (WINDOW_UPDATE) only when the other side's window took them, so a stream holds at most
  the window the agent advertised (:mod:`intercept.routing.h2codec`), and a slow reader
  slows its writer instead of filling the agent.
- A slow reader costs only itself: an upstream connection's own window never runs out
  (:data:`~intercept.routing.h2codec.SHARED_CONNECTION_WINDOW`), so streams whose client
  does not read cannot stall the other clients' streams on it; what one client connection
  leaves unread is bounded by :data:`HELD_LIMIT`, past which the stream that passes it is
  reset (ENHANCE_YOUR_CALM), and what all of them leave by :data:`AGENT_HELD_LIMIT`, past
  which the connection that leaves most has its streams reset (ENHANCE_YOUR_CALM).
- A pool respects its peer's SETTINGS_MAX_CONCURRENT_STREAMS: a stream waits for room
  or for another connection; it is never failed for lack of room. A stream the peer
  refused unprocessed (RST_STREAM REFUSED_STREAM, or past a GOAWAY's last stream: RFC 9113
  section 8.7) is sent again, on that connection once one of its streams has ended or on
  another, while the request bytes already passed on are kept (:data:`RESEND_LIMIT`; they
  are let go once a response begins or the peer opens the stream's window, which shows it
  is reading it), up to :data:`RESENDS` times; otherwise the client gets the refusal.
- A stream whose developer cannot be reached is held up to the hold timeout, then
  answered gRPC UNAVAILABLE (or 502) with the HTTP/1.1 path's text. A developer who
  leaves ends their streams in flight with UNAVAILABLE; new streams go to the app.
- A peer that breaks HTTP/2 or floods control frames gets GOAWAY with the code the
  specification names, on its connection only.
- A client connection counts against ``--max-connections`` until one of its streams has
  completed (as on HTTP/1.1, until an exchange has), and is closed once it has had no
  stream open for ``--header-timeout`` (:meth:`ClientSide.expire`). A stream whose request
  is still open and that moves nothing either way for ``--header-timeout`` is reset
  (CANCEL, :meth:`Downstream.expire`); one whose response was sent whole while its request
  is still open is reset NO_ERROR (RFC 9113 section 8.1); a stream waits for room in a
  pool up to the hold timeout. So no stream holds a place, or an app's stream, for ever.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from intercept.agent.h2mirror import MirrorConnection, StreamCopy
from intercept.agent.proxy import ClientConnection, RouteGone, TCPLink, Unavailable
from intercept.routing import h2codec
from intercept.routing.h2 import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    NO_ERROR,
    REFUSED_STREAM,
    RelayConversion,
    error_response,
    grpc_trailers,
    is_grpc,
    request_view,
    upgraded_request,
)
from intercept.routing.h2codec import new_codec
from intercept.routing.h2codec import CodecError, Data, GoAway, Headers, Reset, Settings, StreamError, WindowOpened
from intercept.routing.http1 import forwarding

if TYPE_CHECKING:
    from intercept.routing.http1 import RequestHead
    from intercept.routing.match import RegisteredRoute

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 8  # per pool; beyond, streams wait for room
READY_TIMEOUT = 10.0  # for a new upstream connection's SETTINGS
LINGER = 1.0  # after a GOAWAY that closes a connection: how long what the client still sends is read
# Response bytes one client connection may leave unread in the agent (each stream holds at
# most its window, STREAM_WINDOW): four streams' worth.
HELD_LIMIT = 4 * h2codec.STREAM_WINDOW
# Response bytes all clients together may leave unread in the agent: past it, the client
# connection that leaves most has its streams reset (the agent's memory limit is 128 Mi).
AGENT_HELD_LIMIT = 32 << 20
# Request bytes kept per stream, after they were passed on, until its response begins: so
# that a stream its peer refused unprocessed can be sent again. A longer request is not.
RESEND_LIMIT = 64 << 10
RESENDS = 3  # times one stream is sent again after a refusal, before the client gets it

_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"


class Hub:
    """Everything HTTP/2 in one agent: the pools, the relays, the frames waiting to be written.

    Writes are batched: handlers mark the connections whose codec has output
    (:attr:`dirty`) and each entry point (bytes received, a connection ready, a route
    change) ends with :meth:`flush`, so one read costs one write per connection touched.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent  # the front (intercept.agent.agent.Front): routes, upstream, open_developer
        self.codec: str = agent.h2_codec  # the codec's kind, for new_codec (chosen at the agent's start)
        self.app = Pool(self, None)
        self.developers: dict[str, Pool] = {}
        self.mirrors: dict[int, MirrorConnection] = {}  # by mirror route id (intercept.agent.h2mirror)
        self.relays: weakref.WeakSet[Relay] = weakref.WeakSet()
        self.dirty: set[Downstream | UpConnection] = set()
        self.downstreams: set[Downstream] = set()  # open client connections (terminated)
        self.held = 0  # response bytes held for all of them (the sum of their ``held``)
        self.upstream_h2: bool | None = None  # does the app speak h2c? (learnt from its first connection)
        self._probe: asyncio.Task[bool | None] | None = None

    # -- from the HTTP/1 listener ------------------------------------------------------

    def accept(self, transport: asyncio.Transport, data: bytes, upgrade: RequestHead | None = None,
               settings: bytes | None = None, original: bytes = b"", *, fresh: bool = False) -> None:
        """Take over ``transport`` (the listener's protocol stops being called), whose
        first unprocessed bytes are ``data``: the preface, or what followed an upgrade
        request ``upgrade`` with its ``HTTP2-Settings`` value (``original``: that request's
        bytes and what followed, to give the connection back to HTTP/1.1 if need be).
        ``fresh``: it holds a place among the listener's fresh connections."""
        proto: TakenConnection
        if upgrade is not None and self.upstream_h2 is None:
            proto = UpgradeProbe(self, fresh, upgrade, settings, data, original)
        elif upgrade is None and not len(self.agent.routes) and not self.agent.routes.mirrors:
            proto = Relay(self, fresh)
        else:
            proto = Downstream(self, fresh, upgrade, settings)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        transport.resume_reading()
        if data:
            proto.data_received(data)

    def close(self) -> None:
        """The agent is closing: end every pooled connection."""
        for pool in (self.app, *self.developers.values()):
            pool.closed = True
            for conn in list(pool.conns):
                conn.close("the agent is closing")

    def takes_upgrade(self) -> bool:
        """Whether to answer ``Upgrade: h2c`` ourselves: not when the app does not speak
        HTTP/2 (it then declines such upgrades itself, as before the agent was there)."""
        return self.upstream_h2 is not False

    async def probe_upstream(self) -> bool | None:
        """Does the app speak h2c? Its answer to a client preface says (a SETTINGS frame,
        or HTTP/1.1 / a close); None when it cannot be reached now (asked again later)."""
        if self.upstream_h2 is not None:
            return self.upstream_h2
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._probe_once())
        try:
            return await asyncio.shield(self._probe)
        finally:
            if self._probe is not None and self._probe.done():
                self._probe = None

    async def _probe_once(self) -> bool | None:
        host, port = self.agent.upstream
        codec = new_codec(client=True, kind=self.codec)
        codec.start()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), READY_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            return None
        try:
            writer.write(codec.pending())
            head = await asyncio.wait_for(reader.read(9), READY_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            head = b""
        finally:
            writer.close()
        if self.upstream_h2 is None:  # (a pool connection may have learnt it meanwhile)
            self.upstream_h2 = len(head) == 9 and head[3] == 0x4 and head[5:9] == b"\0\0\0\0"
            log.info("upstream %s:%s %s HTTP/2 (h2c)", host, port, "speaks" if self.upstream_h2 else "does not speak")
        return self.upstream_h2

    # -- from the agent ----------------------------------------------------------------

    def routes_changed(self) -> None:
        """A route was registered: relayed connections must start being routed."""
        if len(self.agent.routes) or self.agent.routes.mirrors:
            for relay in list(self.relays):
                relay.convert()

    def session_closed(self, session_id: str, holder: str) -> None:
        pool = self.developers.pop(session_id, None)
        if pool is not None:
            pool.close(f"intercept of {holder} ended: {holder} left")
            self.flush()

    # -- routing -----------------------------------------------------------------------

    def route(self, stream: Stream) -> None:
        """Send ``stream`` where the route table says (again, after its route went away)."""
        routes = self.agent.routes
        route = routes.match(*request_view(stream.headers)) if routes.held else None
        stream.route = route
        if route is None:
            self.app.attach(stream)
            return
        pool = self.developers.get(route.session_id)
        if pool is None:
            pool = self.developers[route.session_id] = Pool(self, route.session_id)
        pool.attach(stream)

    def copy(self, stream: Stream) -> None:
        """Start a copy of ``stream`` for each mirror it matches (its own routing is done)."""
        routes = self.agent.routes
        if not routes.mirrors:
            return
        matching = routes.mirrors_matching(*request_view(stream.headers))
        if not matching:
            return
        headers = stream.headers + stream.down.forwarded if stream.down.forwarded else stream.headers
        copies = []
        for route in matching:
            conn = self.mirrors.get(route.id)
            if conn is None or not conn.accepting:
                conn = self.mirrors[route.id] = MirrorConnection(self, route)
            copy = conn.begin(headers, stream.req_ended)
            if copy is not None:
                copies.append(copy)
        stream.copies = copies or None

    def mirror_gone(self, conn: MirrorConnection) -> None:
        """``conn`` takes no new copies: the next copy of its mirror opens another connection."""
        if self.mirrors.get(conn.route.id) is conn:
            del self.mirrors[conn.route.id]

    def over_budget(self) -> None:
        """More than :data:`AGENT_HELD_LIMIT` is held for clients: the connection that
        leaves most unread loses its streams that hold bytes, until under the limit."""
        while self.held > AGENT_HELD_LIMIT:
            down = max(self.downstreams, key=lambda d: d.held, default=None)
            if down is None or not down.held or not down.shed():
                return

    def flush(self) -> None:
        while self.dirty:
            self.dirty.pop().flush()


class Stream:
    """One request: the client's stream on a :class:`Downstream`, and the stream the agent
    opened for it on an :class:`UpConnection` (``up``), once it has one.

    Each direction keeps what the next hop's window has not taken yet: ``to_up`` (request
    data) and ``to_down`` (response data), bounded by the window the agent advertised to
    the sender, because the sender gets window back only for bytes passed on.
    """

    __slots__ = (
        "down", "sid", "headers", "grpc", "route", "up", "up_id", "pool",
        "to_up", "req_ended", "req_trailers", "sent_end_up", "got_end_up",
        "to_down", "resp_started", "resp_ended", "resp_trailers", "sent_end_down", "dead", "copies",
        "moved", "stall", "wait_timer", "kept", "kept_len", "credited", "resends",
    )

    def __init__(self, down: Downstream, sid: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.down = down
        self.sid = sid
        self.headers = headers
        self.grpc = is_grpc(headers)
        self.route: RegisteredRoute | None = None
        self.up: UpConnection | None = None
        self.up_id = 0
        self.pool: Pool | None = None  # while waiting for room
        self.to_up: deque[bytes] = deque()
        self.req_ended = ended
        self.req_trailers: list[tuple[bytes, bytes]] | None = None
        self.sent_end_up = False
        self.got_end_up = False
        self.to_down: deque[bytes] = deque()
        self.resp_started = False
        self.resp_ended = False
        self.resp_trailers: list[tuple[bytes, bytes]] | None = None
        self.sent_end_down = False
        self.dead = False  # answered or reset: request bytes still arriving are dropped
        self.copies: list[StreamCopy] | None = None  # for the mirrors it matches (intercept.agent.h2mirror)
        self.moved = 0  # frames that moved the stream on, either way (ClientSide.expire watches it)
        self.stall: tuple[int, float] = (-1, 0.0)  # (moved, since when) at the sweeper's last look
        self.wait_timer: asyncio.TimerHandle | None = None  # while waiting in a pool: the hold timeout
        # Request bytes passed on to ``up`` (``kept_len`` of them), kept until the response
        # begins or the peer opens the stream's window, so that a refused stream can be sent
        # again; None past RESEND_LIMIT.
        self.kept: list[bytes] | None = []
        self.kept_len = 0
        self.credited = 0  # bytes at the head of ``to_up`` the client already got window for
        self.resends = 0

    # -- request direction -------------------------------------------------------------

    def pump_up(self) -> None:
        """Pass queued request bytes to the up stream as far as its window allows."""
        up = self.up
        if up is None or self.sent_end_up or not up.writable:
            return
        codec, down_codec, sid, up_id = up.codec, self.down.codec, self.sid, self.up_id
        queue = self.to_up
        hub = up.hub
        hub.dirty.add(up)
        hub.dirty.add(self.down)
        try:
            while queue:
                room = min(codec.window(up_id), codec.max_frame)
                if room <= 0:
                    return
                chunk = queue[0]
                if len(chunk) > room:
                    piece, queue[0] = chunk[:room], chunk[room:]
                else:
                    piece = queue.popleft()
                last = not queue and self.req_ended and self.req_trailers is None
                codec.send_data(up_id, piece, end_stream=last)
                n = len(piece)
                if self.kept is not None:
                    self.kept_len += n
                    if self.kept_len > RESEND_LIMIT:
                        self.kept = None
                    else:
                        self.kept.append(piece)
                if self.credited:  # sent before, on a stream that was refused
                    skip = min(self.credited, n)
                    self.credited -= skip
                    n -= skip
                if n:
                    down_codec.ack(sid, n)
                if last:
                    self.sent_end_up = True
            if self.req_ended and not self.sent_end_up:
                if self.req_trailers is not None:
                    codec.send_headers(up_id, self.req_trailers, end_stream=True)
                else:
                    codec.end_stream(up_id)
                self.sent_end_up = True
        except StreamError as e:
            log.debug("stream %d to %s: %s", up_id, up.where, e)
            self._drop_up_queue()
            self.sent_end_up = True
        if self.sent_end_up:
            up.maybe_done(self)

    def resend(self) -> bool:
        """``up`` refused this stream unprocessed: make it ready to be started again, with
        the request bytes passed on so far queued first. False if it cannot be: its response
        has begun, the client is gone, the bytes were not kept, or it was refused too often."""
        if self.kept is None or self.resp_started or self.dead or self.down.closed or self.resends >= RESENDS:
            return False
        self.resends += 1
        self.to_up.extendleft(reversed(self.kept))
        self.credited += self.kept_len
        self.kept, self.kept_len = [], 0
        self.up, self.up_id = None, 0
        self.sent_end_up = False
        return True

    def _drop_up_queue(self) -> None:
        """Request bytes that will never be passed on: give their window back to the client."""
        n = sum(map(len, self.to_up)) - self.credited
        self.credited = 0
        self.to_up.clear()
        if n and not self.down.closed:
            self.down.codec.ack(self.sid, n)
            self.down.hub.dirty.add(self.down)

    def _clear_down(self) -> int:
        """Forget the response bytes the client has not taken; returns how many there were."""
        n = sum(map(len, self.to_down))
        self.to_down.clear()
        self.down.hold(-n)
        return n

    def _drop_down_queue(self) -> None:
        n = self._clear_down()
        if n and self.up is not None and not self.up.closed:
            self.up.codec.ack(self.up_id, n)
            self.up.hub.dirty.add(self.up)

    # -- response direction ------------------------------------------------------------

    def pump_down(self) -> None:
        """Pass queued response bytes (then trailers or the end) to the client."""
        down = self.down
        if self.sent_end_down or down.closed or not down.writable:
            return
        codec, sid = down.codec, self.sid
        up = self.up
        queue = self.to_down
        down.hub.dirty.add(down)
        if up is not None:
            down.hub.dirty.add(up)
        try:
            while queue:
                room = min(codec.window(sid), codec.max_frame)
                if room <= 0:
                    return
                chunk = queue[0]
                if len(chunk) > room:
                    piece, queue[0] = chunk[:room], chunk[room:]
                else:
                    piece = queue.popleft()
                last = not queue and self.resp_ended and self.resp_trailers is None
                codec.send_data(sid, piece, end_stream=last)
                down.hold(-len(piece))
                if up is not None and not up.closed:
                    up.codec.ack(self.up_id, len(piece))
                if last:
                    self.sent_end_down = True
            if self.resp_ended and not self.sent_end_down:
                if self.resp_trailers is not None:
                    codec.send_headers(sid, self.resp_trailers, end_stream=True)
                else:
                    codec.end_stream(sid)
                self.sent_end_down = True
        except StreamError as e:
            log.debug("stream %d from client: %s", sid, e)
            self.sent_end_down = True
        if self.sent_end_down:
            down.maybe_done(self)

    def respond(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        self.resp_started = True
        self.kept = None
        try:
            self.down.codec.send_headers(self.sid, headers, end_stream=end)
        except StreamError as e:
            log.debug("stream %d from client: %s", self.sid, e)
            end = True
        self.down.hub.dirty.add(self.down)
        if end:
            self.resp_ended = self.sent_end_down = True
            self.down.maybe_done(self)

    def fail(self, reason: str) -> None:
        """End the client's stream with the agent's own answer: UNAVAILABLE (gRPC) or 502
        before a response began; after, gRPC trailers saying so, or RST_STREAM."""
        if self.sent_end_down or self.down.closed:
            return
        self.dead = True
        self._drop_up_queue()
        if not self.resp_started:
            log.info("stream %d unavailable: %s", self.sid, reason)
            headers, body = error_response(self.grpc, reason)
            if body:
                self.respond(headers, False)
                self.to_down.append(body)
                self.down.hold(len(body))
                self.resp_ended = True
                self.pump_down()
            else:
                self.respond(headers, True)
        elif self.grpc and not self.resp_ended:
            self.resp_trailers = grpc_trailers(reason)
            self.resp_ended = True
            self.pump_down()
        elif not self.resp_ended:
            self.down.reset(self, INTERNAL_ERROR)


class TakenConnection(asyncio.Protocol):
    """A client connection the HTTP/2 path took over from the listener.

    While ``fresh`` it holds its place among the agent's fresh connections
    (``--max-connections``), as it did in the listener, until one of its streams has
    completed or it closes (:meth:`established`).
    """

    def __init__(self, hub: Hub, fresh: bool) -> None:
        self.hub = hub
        self.fresh = fresh

    def established(self) -> None:
        if self.fresh:
            self.fresh = False
            self.hub.agent.fresh_connections -= 1


class ClientSide(TakenConnection):
    """A taken connection that lasts: the agent's sweeper calls :meth:`expire`, and one
    that has had no stream open for ``--header-timeout`` (it never sent a request, or no
    longer sends any) is closed with :meth:`close_idle`. Subclasses say how many streams
    the client opened (:meth:`streams_opened`) and how to close (:meth:`close_idle`).
    """

    def __init__(self, hub: Hub, fresh: bool) -> None:
        super().__init__(hub, fresh)
        self.idle_since = 0.0
        self.streams_seen = 0  # how many streams the client had opened at the last look

    def watch(self) -> None:
        """Be expired by the agent's sweeper (it calls :meth:`expire` on its connections)."""
        self.idle_since = asyncio.get_running_loop().time()
        self.hub.agent.connections.add(self)

    def expire(self, now: float, timeout: float) -> None:
        opened, open_now = self.streams_opened()
        if open_now or opened != self.streams_seen:
            self.streams_seen, self.idle_since = opened, now
        elif now - self.idle_since > timeout:
            log.info("HTTP/2 connection from %s closed: no stream open for %gs (--header-timeout)",
                     self.transport.get_extra_info("peername"), timeout)
            self.close_idle()

    def streams_opened(self) -> tuple[int, bool]:
        """(how many streams the client has opened so far, whether one is open now)."""
        raise NotImplementedError

    def close_idle(self) -> None:
        raise NotImplementedError

    def linger(self) -> None:
        """Close after a GOAWAY, gracefully: the agent's side is shut (the client reads the
        GOAWAY, then the end), what the client still sends is read and dropped, and the
        socket is closed once the client closes or after :data:`LINGER`. Closed at once,
        it would answer a request already on its way with a TCP reset, which can discard
        the GOAWAY unread: the client could not tell that its call was never seen and
        safe to retry."""
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER, transport.close)


class Downstream(ClientSide):
    """A client's HTTP/2 connection, terminated: the agent is its server."""

    def __init__(self, hub: Hub, fresh: bool = False, upgrade: RequestHead | None = None, settings: bytes | None = None) -> None:
        super().__init__(hub, fresh)
        self.upgrade = upgrade
        self.settings = settings
        self.codec = new_codec(client=False, clock=asyncio.get_running_loop().time, kind=hub.codec)  # (flood limits)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.writable = True
        self.closed = False
        self.held = 0  # response bytes received for this client and not yet taken by it
        self.overflowed = False
        self.forwarded: list[tuple[bytes, bytes]] = []  # added to every request: the client's address
        self.opened = 0  # streams the client has opened

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.hub.downstreams.add(self)
        self.watch()
        if self.hub.agent.forwarded_headers:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and peer:
                self.forwarded = forwarding(str(peer[0]))
        if self.upgrade is None:
            self.codec.start()
            self.hub.dirty.add(self)
            self.hub.flush()
            return
        transport.write(_SWITCHING)  # type: ignore[attr-defined]
        try:
            self.codec.start(self.settings)
        except CodecError as e:
            self._abort(e)
            return
        stream = self.streams[1] = Stream(self, 1, upgraded_request(self.upgrade), True)
        self.opened = 1
        self.hub.dirty.add(self)
        self.hub.route(stream)
        self.hub.copy(stream)
        self.hub.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.codec.receive(data)
        except CodecError as e:
            self._abort(e)
            return
        self.hub.dirty.add(self)
        streams = self.streams
        for ev in events:
            t = type(ev)
            if t is Data:
                stream = streams.get(ev.stream_id)
                if stream is not None and stream.copies:
                    for copy in stream.copies:
                        copy.data(ev.data, ev.end_stream)
                if stream is None or stream.dead:
                    self.codec.ack(ev.stream_id, ev.flow_length)
                    continue
                if ev.flow_length > len(ev.data):
                    self.codec.ack(ev.stream_id, ev.flow_length - len(ev.data))  # padding
                stream.moved += 1
                if ev.data:
                    stream.to_up.append(ev.data)
                if ev.end_stream:
                    stream.req_ended = True
                stream.pump_up()
                if ev.end_stream:
                    self.maybe_done(stream)
            elif t is Headers:
                if ev.kind == Headers.REQUEST:
                    stream = streams[ev.stream_id] = Stream(self, ev.stream_id, ev.headers, ev.end_stream)
                    self.opened += 1
                    self.hub.route(stream)
                    self.hub.copy(stream)
                else:  # trailers
                    stream = streams.get(ev.stream_id)
                    if stream is not None and stream.copies:
                        for copy in stream.copies:
                            copy.end_with(ev.headers)
                    if stream is not None and not stream.dead:
                        stream.moved += 1
                        stream.req_trailers = ev.headers
                        stream.req_ended = True
                        stream.pump_up()
                        self.maybe_done(stream)
            elif t is WindowOpened:
                if ev.stream_id:
                    stream = streams.get(ev.stream_id)
                    if stream is not None:
                        stream.pump_down()
                else:
                    for stream in list(streams.values()):
                        stream.pump_down()
            elif t is Reset:
                stream = streams.pop(ev.stream_id, None)
                if stream is not None:
                    self._abandon(stream, ev.code)
            elif t is GoAway:
                log.debug("client sent GOAWAY (last stream %d, code %d)", ev.last_stream_id, ev.code)
        self.hub.flush()

    def _abandon(self, stream: Stream, code: int) -> None:
        """The client reset ``stream``: carry the reset to the other side."""
        if stream.copies:
            for copy in stream.copies:
                copy.cancel()
        stream.dead = True
        stream.sent_end_down = True
        if stream.pool is not None:
            stream.pool.unwait(stream)
        stream._drop_down_queue()  # (whatever became of the app's side: held counts it)
        up = stream.up
        if up is not None and not up.closed:
            up.codec.reset(stream.up_id, code)
            self.hub.dirty.add(up)
            up.forget(stream)
        stream._drop_up_queue()

    def hold(self, n: int) -> None:
        """``n`` more response bytes held for this client (fewer, if negative)."""
        self.held += n
        self.hub.held += n

    def shed(self) -> bool:
        """This connection leaves the most unread while the agent holds too much: its
        streams that hold bytes are reset (ENHANCE_YOUR_CALM). False if none did."""
        holding = [stream for stream in self.streams.values() if stream.to_down]
        log.info("HTTP/2 connection from %s leaves %d bytes of responses unread while the agent holds over %d: "
                 "its %d streams holding bytes are reset", self.transport.get_extra_info("peername"), self.held,
                 AGENT_HELD_LIMIT, len(holding))
        for stream in holding:
            self.streams.pop(stream.sid, None)
            self._abandon(stream, CANCEL)
            self.codec.reset(stream.sid, ENHANCE_YOUR_CALM)
        self.hub.dirty.add(self)
        return bool(holding)

    def overflow(self, stream: Stream) -> None:
        """The client leaves more than :data:`HELD_LIMIT` of responses unread: ``stream``,
        whose bytes passed the limit, is reset (ENHANCE_YOUR_CALM) and cancelled upstream."""
        if not self.overflowed:
            self.overflowed = True
            log.info("HTTP/2 connection from %s leaves over %d bytes of responses unread: "
                     "the streams that pass it are reset", self.transport.get_extra_info("peername"), HELD_LIMIT)
        self.streams.pop(stream.sid, None)
        self._abandon(stream, CANCEL)
        self.codec.reset(stream.sid, ENHANCE_YOUR_CALM)
        self.hub.dirty.add(self)

    def reset(self, stream: Stream, code: int) -> None:
        """The agent resets the client's ``stream`` (its other side failed or reset it)."""
        stream.dead = True
        stream._drop_up_queue()
        stream._clear_down()
        stream.sent_end_down = True
        if not self.closed:
            self.codec.reset(stream.sid, code)
            self.hub.dirty.add(self)
        if stream.copies:
            for copy in stream.copies:
                copy.cancel()
        self.streams.pop(stream.sid, None)

    def maybe_done(self, stream: Stream) -> None:
        """Forget ``stream`` once its response has been sent whole (or it ended otherwise).

        A request still open then is not wanted any more (RFC 9113 section 8.1): the client
        gets RST_STREAM NO_ERROR and the app's stream is cancelled, so that neither side
        keeps a stream open that nobody will end. The connection is established only by a
        stream whose request and response both completed."""
        if not stream.sent_end_down:
            return
        complete = stream.req_ended
        if not complete:
            if stream.copies:  # the rest of the request will not be read
                for copy in stream.copies:
                    copy.cancel()
            stream.req_ended = stream.dead = True
            stream._drop_up_queue()
            if not self.closed:
                self.codec.reset(stream.sid, NO_ERROR)
                self.hub.dirty.add(self)
            up = stream.up
            if up is not None and not up.closed and not stream.sent_end_up:
                stream.sent_end_up = True
                up.codec.reset(stream.up_id, CANCEL)
                self.hub.dirty.add(up)
                up.forget(stream)
        if self.streams.pop(stream.sid, None) is not None and complete:
            self.established()

    def streams_opened(self) -> tuple[int, bool]:
        return self.opened, bool(self.streams)

    def expire(self, now: float, timeout: float) -> None:
        """Also reset each stream whose request is still open and that has moved nothing
        either way for ``timeout`` while nothing of it waited for the app's window (HEADERS
        without END_STREAM, then silence): RST_STREAM CANCEL, cancelled toward the app."""
        stalled = []
        for stream in self.streams.values():
            if stream.req_ended or stream.dead or stream.to_up:
                stream.stall = (-1, 0.0)
            elif stream.stall[0] != stream.moved:
                stream.stall = (stream.moved, now)
            elif now - stream.stall[1] > timeout:
                stalled.append(stream)
        for stream in stalled:
            log.info("HTTP/2 stream %d from %s reset: its request stopped arriving for %gs (--header-timeout)",
                     stream.sid, self.transport.get_extra_info("peername"), timeout)
            self.streams.pop(stream.sid, None)
            self._abandon(stream, CANCEL)
            self.codec.reset(stream.sid, CANCEL)
            self.hub.dirty.add(self)
        super().expire(now, timeout)
        if stalled:
            self.hub.flush()

    def close_idle(self) -> None:
        self.codec.goaway(NO_ERROR)
        self.flush()
        self._closed()  # what comes now is dropped
        self.linger()

    def _abort(self, error: CodecError) -> None:
        peer = self.transport.get_extra_info("peername")
        log.info("HTTP/2 connection from %s closed with GOAWAY code %d: %s", peer, error.code, error.reason)
        self.flush()
        self.transport.close()
        self._closed()

    def flush(self) -> None:
        data = self.codec.pending()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.established()
        self.hub.agent.connections.discard(self)
        self.hub.dirty.discard(self)
        self.hub.downstreams.discard(self)
        for stream in list(self.streams.values()):
            self._abandon(stream, CANCEL)
        self.streams.clear()
        self.hub.flush()

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        for stream in list(self.streams.values()):
            stream.pump_down()
        self.hub.flush()


class UpConnection:
    """An HTTP/2 connection the agent opened as a client: to the app over TCP, or to a
    developer's process over an SSH channel. It is the ``owner`` its link reports to."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.hub = pool.hub
        self.codec = new_codec(client=True, kind=self.hub.codec)
        self.codec.start()
        self.link: Any = None  # TCPLink or sshd.ChannelLink
        self.streams: dict[int, Stream] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.accepting = True
        self.writable = True
        self.closed = False
        self.link_closed = False
        self.where = pool.where
        # After the peer refused a stream: the streams it had room for then, until one ends.
        self.cap: int | None = None

    def has_room(self) -> bool:
        limit = self.codec.remote_max_streams if self.cap is None else self.cap
        return self.accepting and len(self.streams) < limit

    def start(self, stream: Stream) -> None:
        """Open ``stream``'s counterpart here and pass on what it has so far."""
        end = stream.req_ended and not stream.to_up and stream.req_trailers is None
        forwarded = stream.down.forwarded
        try:
            up_id = self.codec.open_stream(stream.headers + forwarded if forwarded else stream.headers, end)
        except StreamError as e:
            stream.pool = None
            stream.fail(f"{self.where} refused the request headers: {e}")
            return
        stream.up, stream.up_id, stream.pool = self, up_id, None
        self.streams[up_id] = stream
        self.hub.dirty.add(self)
        if end:
            stream.sent_end_up = True
        else:
            stream.pump_up()

    def forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.up_id, None) is not None:
            self.cap = None
            if not self.accepting and not self.streams:
                self.close()
            else:
                self.pool.room(self)

    def maybe_done(self, stream: Stream) -> None:
        if stream.sent_end_up and stream.got_end_up:
            self.forget(stream)

    # -- link events -------------------------------------------------------------------

    def link_data(self, link: Any, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.codec.receive(data)
        except CodecError as e:
            self.hub.dirty.add(self)
            if not self.ready.done() and self.pool.session_id is None:
                self.hub.upstream_h2 = False
            reason = f"{self.where} broke HTTP/2: {e.reason}" if self.ready.done() else f"{self.where} does not speak HTTP/2 (h2c): {e.reason}"
            self._lost(reason)
            return
        self.hub.dirty.add(self)
        streams = self.streams
        for ev in events:
            t = type(ev)
            if t is Data:
                stream = streams.get(ev.stream_id)
                if stream is None or stream.sent_end_down:
                    self.codec.ack(ev.stream_id, ev.flow_length)
                    continue
                if ev.flow_length > len(ev.data):
                    self.codec.ack(ev.stream_id, ev.flow_length - len(ev.data))
                stream.moved += 1
                if ev.data:
                    stream.to_down.append(ev.data)
                    stream.down.hold(len(ev.data))
                if ev.end_stream:
                    stream.resp_ended = stream.got_end_up = True
                stream.pump_down()
                if stream.down.held > HELD_LIMIT and not stream.sent_end_down:
                    stream.down.overflow(stream)
                elif ev.end_stream:
                    self.maybe_done(stream)
                if self.hub.held > AGENT_HELD_LIMIT:
                    self.hub.over_budget()
            elif t is Headers:
                stream = streams.get(ev.stream_id)
                if stream is None or stream.sent_end_down:
                    continue
                stream.moved += 1
                if ev.kind == Headers.TRAILERS:
                    stream.resp_trailers = ev.headers
                    stream.resp_ended = stream.got_end_up = True
                    stream.pump_down()
                    self.maybe_done(stream)
                elif ev.kind == Headers.INFORMATIONAL:
                    stream.down.codec.send_headers(stream.sid, ev.headers)
                    self.hub.dirty.add(stream.down)
                else:
                    if ev.end_stream:
                        stream.got_end_up = True
                    stream.respond(ev.headers, ev.end_stream)
                    if ev.end_stream:
                        self.maybe_done(stream)
            elif t is WindowOpened:
                if ev.stream_id:
                    stream = streams.get(ev.stream_id)
                    if stream is not None:
                        stream.kept = None  # the peer is reading it: it will not be refused now
                        stream.pump_up()
                else:
                    for stream in list(streams.values()):
                        stream.pump_up()
            elif t is Reset:
                stream = streams.get(ev.stream_id)
                if stream is not None:
                    if ev.code == REFUSED_STREAM:
                        self._refused(stream)
                        continue
                    self.forget(stream)
                    stream.up = None
                    if stream.resp_ended:  # answered; the request's rest is not wanted
                        stream._drop_up_queue()
                        stream.dead = True
                        stream.down.maybe_done(stream)
                    else:
                        stream.down.reset(stream, ev.code)
            elif t is Settings:
                if not self.ready.done():
                    self.ready.set_result(None)
                    if self.pool.session_id is None:
                        self.hub.upstream_h2 = True
                self.pool.room(self)
            elif t is GoAway:
                self._going_away(ev.last_stream_id)
        self.hub.flush()

    def _refused(self, stream: Stream) -> None:
        """The peer refused ``stream`` unprocessed (RFC 9113 section 8.7): this connection
        takes no more streams than it holds now until one ends (a connection left with none
        is retired), and the stream is sent again, or the client gets the refusal."""
        self.cap = len(self.streams) - 1
        if self.cap == 0:
            self.accepting = False
            self.pool.drop(self)
        self.streams.pop(stream.up_id, None)
        if not self.accepting and not self.streams:
            self.close()
        self._again(stream)

    def _again(self, stream: Stream) -> None:
        """``stream``, refused unprocessed here, is routed again (its route may have changed
        meanwhile), or the client gets the refusal."""
        stream.up = None
        if stream.resend():
            log.debug("%s refused a stream: it is sent again (time %d)", self.where, stream.resends)
            self.hub.route(stream)
        else:
            stream.down.reset(stream, REFUSED_STREAM)

    def _going_away(self, last_stream_id: int) -> None:
        """The peer takes no new stream: streams it never saw are sent again on another
        connection (or refused to the client, which may retry them, as gRPC does), the
        others finish; new streams go to another connection."""
        log.info("%s sent GOAWAY (last stream %d)", self.where, last_stream_id)
        self.accepting = False
        self.pool.drop(self)
        unseen = [stream for up_id, stream in self.streams.items() if up_id > last_stream_id]
        for stream in unseen:
            self.streams.pop(stream.up_id)
            self._again(stream)
        if not self.streams:
            self.close()

    def link_eof(self, link: Any) -> bool:
        return False  # the link closes; link_lost follows

    def link_lost(self, link: Any) -> None:
        self._lost(f"{self.where} closed the connection")

    def link_pause(self, link: Any) -> None:
        self.writable = False

    def link_resume(self, link: Any) -> None:
        self.writable = True
        for stream in list(self.streams.values()):
            stream.pump_up()
        self.hub.flush()

    def release(self, link: Any) -> None:
        """The developer's process restarts (drain): take no new stream here; close once idle."""
        self.accepting = False
        self.pool.drop(self)
        if not self.streams:
            self.close()
        self.hub.flush()

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.accepting = False
        self.pool.drop(self)
        if not self.ready.done():
            self.ready.set_exception(Unavailable(reason))
            self.ready.exception()  # retrieved: the pool may have stopped waiting
        if self.pool.holder is not None:
            reason = f"intercept of {self.pool.holder} failed: {reason}"
        for stream in list(self.streams.values()):
            stream.up = None
            stream.fail(reason)
        self.streams.clear()
        self._close_link()
        self.hub.flush()

    def _close_link(self) -> None:
        if self.link is not None and not self.link_closed:
            self.link_closed = True
            self.hub.dirty.discard(self)
            self.link.close()

    def close(self, reason: str = "") -> None:
        if reason:
            self._lost(reason)
            return
        if not self.closed:
            self.closed = True
            self.pool.drop(self)
            if self.link is not None and not self.link_closed:
                self.codec.goaway()
                self.flush()
                self._close_link()

    def flush(self) -> None:
        if self.link is not None and not self.link_closed:
            data = self.codec.pending()
            if data:
                self.link.write(data)


class Pool:
    """HTTP/2 connections to one destination: the app (``session_id`` None) or one developer.

    Streams take a connection that has room; otherwise they wait, and one more
    connection is opened while there are fewer than :data:`MAX_CONNECTIONS`. A developer
    connection is an SSH channel opened with the agent's ``open_developer``: held up to
    the hold timeout while their process does not accept.
    """

    def __init__(self, hub: Hub, session_id: str | None) -> None:
        self.hub = hub
        self.session_id = session_id
        self.conns: list[UpConnection] = []
        self.waiting: deque[Stream] = deque()
        self.opening = 0
        self.closed = False
        self.holder: str | None = None  # the developer, once known
        if session_id is None:
            host, port = hub.agent.upstream
            self.where = f"upstream {host}:{port}"
        else:
            self.where = "the developer's process"

    def attach(self, stream: Stream) -> None:
        for conn in self.conns:
            if conn.has_room():
                conn.start(stream)
                return
        stream.pool = self
        self.waiting.append(stream)
        hold = self.hub.agent.config.hold_timeout
        stream.wait_timer = asyncio.get_running_loop().call_later(hold, self._waited_too_long, stream, hold)
        self._grow()

    def _waited_too_long(self, stream: Stream, hold: float) -> None:
        """``stream`` found no room here within the hold timeout: answered UNAVAILABLE (or 502)."""
        stream.wait_timer = None
        if stream.pool is not self:
            return
        if self.opening:  # a connection being opened answers it: it has a bound of its own (_open)
            stream.wait_timer = asyncio.get_running_loop().call_later(hold, self._waited_too_long, stream, hold)
            return
        self.unwait(stream)
        stream.fail(f"{self.where} had no room for another stream within {hold:g}s (--hold-timeout)")
        self.hub.flush()

    def _take(self) -> Stream:
        """The first waiting stream, which leaves the queue."""
        return _left(self.waiting.popleft())

    def unwait(self, stream: Stream) -> None:
        try:
            self.waiting.remove(stream)
        except ValueError:
            pass
        _left(stream)
        stream.pool = None

    def room(self, conn: UpConnection) -> None:
        waiting = self.waiting
        while waiting and conn.has_room():
            conn.start(self._take())
        if waiting:
            self._grow()

    def drop(self, conn: UpConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        if self.waiting:
            self._grow()

    def _grow(self) -> None:
        if self.waiting and not self.opening and not self.closed and len(self.conns) < MAX_CONNECTIONS:
            self.opening += 1
            asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        conn = UpConnection(self)
        try:
            if self.session_id is None:
                host, port = self.hub.agent.upstream
                try:
                    _, conn.link = await asyncio.get_running_loop().create_connection(lambda: TCPLink(conn), host, port)
                except OSError as e:
                    raise Unavailable(f"upstream {host}:{port} is unreachable: {e.strerror or e}") from None
            else:
                route = self.waiting[0].route if self.waiting else None
                if route is None:
                    return
                self.holder = route.holder
                conn.where = f"{route.holder}'s process"
                conn.link = await self.hub.agent.open_developer(route, conn)
            conn.flush()
            try:
                await asyncio.wait_for(asyncio.shield(conn.ready), READY_TIMEOUT)
            except asyncio.TimeoutError:
                conn.close()
                raise Unavailable(f"{conn.where} sent no HTTP/2 SETTINGS within {READY_TIMEOUT:g}s (does it speak h2c?)") from None
        except RouteGone:
            waiting, self.waiting = self.waiting, deque()
            for stream in waiting:
                _left(stream).pool = None
                self.hub.route(stream)
            self.hub.flush()
            return
        except Unavailable as e:
            waiting, self.waiting = self.waiting, deque()
            for stream in waiting:
                _left(stream).pool = None
                stream.fail(e.reason)
            self.hub.flush()
            return
        finally:
            self.opening -= 1
        if self.closed or conn.closed:
            if not conn.closed:
                conn.close()
            self._grow()
            self.hub.flush()
            return
        self.conns.append(conn)
        self.room(conn)
        self.hub.flush()

    def close(self, reason: str) -> None:
        """The developer left: their streams in flight end with ``reason``."""
        self.closed = True
        for conn in list(self.conns):
            conn.close(reason)
        waiting, self.waiting = self.waiting, deque()
        for stream in waiting:  # they never reached the developer: route them again
            _left(stream).pool = None
            self.hub.route(stream)


def _left(stream: Stream) -> Stream:
    """``stream`` left a pool's queue: its hold timeout no longer runs."""
    if stream.wait_timer is not None:
        stream.wait_timer.cancel()
        stream.wait_timer = None
    return stream


class UpgradeProbe(TakenConnection):
    """An ``Upgrade: h2c`` request while it is not known whether the app speaks HTTP/2.

    Reading waits while :meth:`Hub.probe_upstream` asks the app. If it speaks h2c, the
    connection becomes a :class:`Downstream` (the agent answers 101 and routes every
    stream); if not, or if it cannot be reached, the connection goes back to the HTTP/1.1
    listener with the request's own bytes, as if the agent had never looked: an app that
    speaks only HTTP/1.1 declines the upgrade itself and the request is not disturbed.
    It lasts as long as the question (READY_TIMEOUT at most), so it is not watched.
    """

    def __init__(self, hub: Hub, fresh: bool, upgrade: RequestHead, settings: bytes | None, data: bytes,
                 original: bytes) -> None:
        super().__init__(hub, fresh)
        self.upgrade, self.settings = upgrade, settings
        self.data = bytearray(data)  # after the upgrade request
        self.original = bytearray(original)  # the upgrade request and what followed
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._decide())

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.original += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.established()

    async def _decide(self) -> None:
        self.transport.pause_reading()
        h2c = await self.hub.probe_upstream()
        if self.closed:
            return
        proto: asyncio.Protocol
        if h2c:
            proto, data = Downstream(self.hub, self.fresh, self.upgrade, self.settings), bytes(self.data)
        else:
            self.established()  # the listener counts it again
            proto, data = ClientConnection(self.hub.agent), bytes(self.original)
        self.fresh = False
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        self.transport.resume_reading()
        if data:
            proto.data_received(data)
        self.hub.flush()


class Relay(ClientSide):
    """A prior-knowledge connection relayed as bytes while no route could apply.

    Costs about what a TCP relay costs, plus following frame headers both ways
    (:class:`~intercept.routing.h2.RelayConversion`) so that it can be converted,
    gracefully, when the first route appears.
    """

    def __init__(self, hub: Hub, fresh: bool = False) -> None:
        super().__init__(hub, fresh)
        self.conv = RelayConversion()
        self.transport: asyncio.Transport | None = None
        self.link: TCPLink | None = None
        self.early: list[bytes] = []  # client bytes before the app connection is up
        self.closed = False
        self.raw = bytearray()  # everything the client sent before the link was up, for a fallback
        self.lingering = False  # closing after a GOAWAY: what the client sends is dropped

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.hub.relays.add(self)
        self.watch()
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        host, port = self.hub.agent.upstream
        self.transport.pause_reading()
        try:
            _, link = await asyncio.get_running_loop().create_connection(lambda: TCPLink(self), host, port)
        except OSError:
            # no app: let a terminated connection answer each stream with the reason
            if self.closed:
                return
            self.hub.relays.discard(self)
            self.hub.agent.connections.discard(self)
            down = Downstream(self.hub, self.fresh)
            self.fresh = False
            self.transport.set_protocol(down)
            down.connection_made(self.transport)
            self.transport.resume_reading()
            if self.raw:
                down.data_received(bytes(self.raw))
            return
        if self.closed:
            link.close()
            return
        self.link = link
        self.raw = bytearray()
        for data in self.early:
            link.write(data)
        self.early = []
        self.transport.resume_reading()
        if self.conv.wanted:
            self.convert()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        acked = self.conv.client.ping_acked
        out, _ = self.conv.client.feed(data)
        if self.conv.client.ping_acked and not acked:
            log.info("relayed HTTP/2 connection from %s read the GOAWAY: its new streams will be routed",
                     self.transport.get_extra_info("peername"))
        if self.link is None:
            self.raw += data
            self.early.append(out)
        elif out:
            self.link.write(out)
        if self.fresh and self.conv.completed:
            self.established()
        if self.conv.done:
            self._finish()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.established()
        self.hub.relays.discard(self)
        self.hub.agent.connections.discard(self)
        if self.link is not None:
            self.link.close()

    def streams_opened(self) -> tuple[int, bool]:
        return self.conv.client.max_stream_id, bool(self.conv.streams)

    def close_idle(self) -> None:
        """At a frame boundary of the app's direction, a GOAWAY naming the last stream the
        client opened (it then knows that none was lost), then :meth:`linger`; anywhere
        else, just the close."""
        if self.link is not None and self.conv.server.at_boundary:
            self.transport.write(self.conv.farewell())
            self.lingering = True
            self.link.close()
            self.transport.resume_reading()  # (the app's side may have paused it)
            self.linger()
        else:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.link is not None:
            self.link.pause_reading()

    def resume_writing(self) -> None:
        if self.link is not None:
            self.link.resume_reading()

    def convert(self) -> None:
        """A route appeared: ask the client, at a frame boundary, to move on (see
        :class:`~intercept.routing.h2.RelayConversion`)."""
        conv = self.conv
        if conv.sent or self.closed:
            return
        conv.wanted = True
        if self.link is not None and conv.server.at_boundary and not conv.server.goaway_seen:
            self.transport.write(conv.notice())

    def _finish(self) -> None:
        if self.conv.server.at_boundary and not self.closed:
            self.transport.write(self.conv.farewell())
            self.transport.close()

    # -- the app side --------------------------------------------------------------------

    def link_data(self, link: TCPLink, data: bytes) -> None:
        conv = self.conv
        out, boundary = conv.server.feed(data)
        if conv.wanted and not conv.sent and boundary >= 0 and not conv.server.goaway_seen:
            self.transport.write(out[:boundary] + conv.notice() + out[boundary:])
        else:
            self.transport.write(out)
        if self.fresh and conv.completed:
            self.established()
        if conv.done:
            self._finish()

    def link_eof(self, link: TCPLink) -> bool:
        return False

    def link_lost(self, link: TCPLink) -> None:
        if not self.closed and not self.lingering:
            self.transport.close()

    def link_pause(self, link: TCPLink) -> None:
        self.transport.pause_reading()

    def link_resume(self, link: TCPLink) -> None:
        self.transport.resume_reading()
