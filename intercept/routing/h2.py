"""HTTP/2 routing decisions for the agent, sans-IO.

The agent routes each HTTP/2 stream on its own request headers with the same
:class:`~intercept.routing.match.RouteTable` as HTTP/1.1. What it needs from this
module, as small facts computed from bytes:

- :func:`begins_h2` recognises a connection that starts with the HTTP/2 preface (h2c
  with prior knowledge, how gRPC talks inside a cluster); :func:`h2c_upgrade_settings`
  an HTTP/1.1 request that asks to switch to h2c (``Upgrade: h2c``), and
  :func:`upgraded_request` turns that request into the headers of stream 1.
- :func:`request_view` turns a stream's header list into the ``(method, target,
  headers)`` view that :meth:`RouteTable.match` takes: ``:path`` is the target and
  ``:authority`` is also visible as ``host``, so one rule means the same thing on
  both protocols.
- :func:`error_response` is what a stream is answered when its destination cannot be
  reached: gRPC status UNAVAILABLE (trailers-only) for gRPC, a plain-text 502 otherwise,
  with the same reason text as the HTTP/1.1 path.
- :class:`FrameScanner` follows frame boundaries and stream lifetimes in a relayed
  byte stream, so that a relayed connection can be handed a GOAWAY at a frame boundary
  when the first route appears (:class:`RelayConversion`).
- :class:`RateLimit` is the token bucket that bounds what a peer may make the agent do
  for nothing (PING, SETTINGS, PRIORITY, empty DATA, and RST_STREAM: "rapid reset").
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass, field

from intercept.routing.http1 import RequestHead

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PREFACE_LINE = PREFACE[:16]  # "PRI * HTTP/2.0\r\n": a connection that begins so speaks HTTP/2 or nothing

FRAME_HEADER = 9
# frame types (RFC 9113 section 6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
# error codes (RFC 9113 section 7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x2, 0x7, 0x8, 0xB
MAX_STREAM_ID = 2**31 - 1

GRPC_UNAVAILABLE = 14

Headers = list[tuple[bytes, bytes]]

# Hop-by-hop fields of an HTTP/1.1 request that HTTP/2 forbids (RFC 9113 section 8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"upgrade", b"http2-settings", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"host"}
)


def begins_h2(buf: bytes | bytearray) -> bool:
    """True when ``buf`` begins with the HTTP/2 preface's request line.

    The rest of the preface is checked by the HTTP/2 codec, which answers a connection
    whose preface goes wrong after these bytes with GOAWAY PROTOCOL_ERROR.
    """
    return bytes(buf[:16]) == PREFACE_LINE


def _tokens(headers: Headers, name: bytes) -> list[bytes]:
    return [t.strip().lower() for n, v in headers if n == name for t in v.split(b",") if t.strip()]


def h2c_upgrade_settings(head: RequestHead) -> bytes | None:
    """The ``HTTP2-Settings`` value when ``head`` asks to switch to h2c (RFC 7540 section
    3.2), else None.

    Only an HTTP/1.1 request, not CONNECT, with ``h2c`` among its Upgrade tokens and
    exactly one HTTP2-Settings field (valid base64url) qualifies; the HTTP/1.1 parser has
    already refused an upgrade request with a body.
    """
    if head.minor != 1 or head.method == b"CONNECT" or b"h2c" not in _tokens(head.headers, b"upgrade"):
        return None
    values = [v for n, v in head.headers if n == b"http2-settings"]
    if len(values) != 1:
        return None
    value = values[0]
    try:
        base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None
    return value + b"=" * (-len(value) % 4)


def upgraded_request(head: RequestHead) -> Headers:
    """The request of an ``Upgrade: h2c`` exchange as the header list of stream 1."""
    authority = next((v for n, v in head.headers if n == b"host"), b"")
    target = head.target
    scheme = b"http"
    if not target.startswith(b"/") and target != b"*":  # absolute-form
        scheme, _, rest = target.partition(b"://")
        authority, slash, path = rest.partition(b"/")
        target = slash + path or b"/"
    headers: Headers = [(b":method", head.method), (b":scheme", scheme), (b":authority", authority), (b":path", target)]
    hop = set(_tokens(head.headers, b"connection"))
    for name, value in head.headers:
        if name in _CONNECTION_SPECIFIC or name in hop:
            continue
        if name == b"te" and value.lower() != b"trailers":
            continue
        headers.append((name, value))
    return headers


def request_view(headers: Headers) -> tuple[bytes, bytes, Headers]:
    """``(method, target, headers)`` for :meth:`RouteTable.match` from an HTTP/2 request.

    ``:path`` is the target; ``:authority`` is also given as a ``host`` field (first, as
    HTTP/1.1 puts it); other pseudo-headers are left out; regular fields keep their
    order and repeats (names are lowercase in HTTP/2).
    """
    method = target = b""
    out: Headers = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                target = value
            elif name == b":authority":
                out.insert(0, (b"host", value))
        else:
            out.append((name, value))
    return method, target, out


def is_grpc(headers: Headers) -> bool:
    """The request is a gRPC call (``content-type: application/grpc...``)."""
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(b"application/grpc")
    return False


def grpc_message(text: str) -> bytes:
    """``grpc-message`` encoding: UTF-8, percent-encoding bytes outside 0x20-0x7E and ``%``."""
    return b"".join(
        bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in text.encode("utf-8")
    )


def error_response(grpc: bool, reason: str, status: int = 502) -> tuple[Headers, bytes]:
    """The agent's own answer to a stream it cannot deliver: (headers, body).

    gRPC: a trailers-only response with ``grpc-status: 14`` (UNAVAILABLE) and ``reason``
    as ``grpc-message``; the body is empty and the headers end the stream. Otherwise a
    plain-text ``status`` (502) whose body is ``reason``.
    """
    if grpc:
        return [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(GRPC_UNAVAILABLE).encode()),
            (b"grpc-message", grpc_message(reason)),
        ], b""
    body = reason.encode("utf-8", "replace") + b"\n"
    return [
        (b":status", str(status).encode()),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ], body


def grpc_trailers(reason: str) -> Headers:
    """Trailers that end a gRPC response already begun with UNAVAILABLE and ``reason``."""
    return [(b"grpc-status", str(GRPC_UNAVAILABLE).encode()), (b"grpc-message", grpc_message(reason))]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream_id) + payload


def goaway(last_stream_id: int, code: int = NO_ERROR, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + debug)


@dataclass
class RateLimit:
    """A token bucket: ``burst`` events at once, then ``rate`` per second.

    :meth:`spend` is False once the peer has spent more than the bucket holds: the
    caller then ends the connection with ENHANCE_YOUR_CALM. ``now`` is given by the
    caller (sans-IO).
    """

    burst: float
    rate: float
    tokens: float = field(init=False)
    at: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def spend(self, now: float, n: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return self.tokens >= 0


class FrameScanner:
    """Follows one direction of a relayed HTTP/2 connection, frame by frame, without copying.

    :meth:`feed` takes the bytes as they arrive and returns where the last complete frame
    ended in them, or -1 when that chunk holds no frame boundary that a frame may be
    inserted at. A frame may be inserted at a boundary only outside a header block
    (HEADERS or PUSH_PROMISE without END_HEADERS must be followed by its CONTINUATION
    frames, and nothing else) and after the first frame (the peer's SETTINGS preface).

    Per stream it reports to ``streams`` (shared by both directions of a connection):
    a HEADERS frame opens a stream, END_STREAM ends this direction's half, RST_STREAM
    ends both. ``watch_ping`` holds PING frames whole so :meth:`feed` can drop the ACK of
    the agent's own PING (its opaque data), which the other side never sent.
    """

    def __init__(self, streams: dict[int, int], side: int, *, preface: bool = False) -> None:
        self.streams = streams  # stream id -> halves ended (bit ``side`` for this direction)
        self.side = side
        self.skip = len(PREFACE) if preface else 0  # client direction: the preface is not a frame
        self.header = b""  # an incomplete frame header
        self.left = 0  # payload bytes of the current frame still to come
        self.frames = 0
        self.in_header_block = False
        self.max_stream_id = 0  # highest stream this direction opened
        self.completed = 0  # streams whose two halves ended with this direction's END_STREAM
        self.goaway_seen = False
        self.watch_ping: bytes | None = None  # opaque data of the agent's own PING
        self.ping_acked = False
        self._held = b""  # a PING frame being held until complete

    def _insertable(self) -> bool:
        return not self.in_header_block and self.frames > 0

    @property
    def at_boundary(self) -> bool:
        """A frame may be inserted now, before whatever this direction sends next."""
        return not (self.left or self.header or self.skip or self._held) and self._insertable()

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """Scan ``data``: returns (the bytes to forward now, the offset in them just after
        the last boundary where a frame may be inserted, or -1).

        The bytes are ``data`` itself unless a PING is being held back (it is forwarded
        with the next call, once complete) or the agent's own PING ACK was dropped.
        """
        if self._held:
            data = self._held + data
            self._held = b""
        pos, n = 0, len(data)
        boundary = -1
        cuts: list[tuple[int, int]] = []
        if self.skip:
            take = min(self.skip, n)
            self.skip -= take
            pos = take
        watching = self.watch_ping is not None
        while pos < n:
            if self.left:
                take = min(self.left, n - pos)
                self.left -= take
                pos += take
                if not self.left and self._insertable():
                    boundary = pos
                continue
            start = -1
            if self.header:  # a frame header split across reads
                need = FRAME_HEADER - len(self.header)
                if n - pos < need:
                    self.header += data[pos:]
                    break
                head = self.header + data[pos : pos + need]
                self.header = b""
                pos += need
            else:
                if n - pos < FRAME_HEADER:
                    if watching:  # it may be a PING: hold it back whole
                        self._held, n = data[pos:], pos
                    else:
                        self.header = data[pos:]
                    break
                head = data[pos : pos + FRAME_HEADER]
                start = pos
                pos += FRAME_HEADER
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            if kind == PING and watching and start >= 0:
                if n - pos < length:
                    self._held, n = data[start:], start
                    break
                if flags & ACK and data[pos : pos + length] == self.watch_ping:
                    self.ping_acked = True
                    pos += length
                    cuts.append((start, pos))
                    if self._insertable():
                        boundary = pos
                    continue
            self.frames += 1
            self._frame(kind, flags, int.from_bytes(head[5:9], "big") & MAX_STREAM_ID)
            take = min(length, n - pos)
            pos += take
            self.left = length - take
            if not self.left and self._insertable():
                boundary = pos
        if not cuts and n == len(data):
            return data, boundary
        out = b"".join(data[a:b] for a, b in _keep(cuts, n))
        if boundary >= 0:
            boundary -= sum(b - a for a, b in cuts if b <= boundary)
        return out, boundary

    def _frame(self, kind: int, flags: int, sid: int) -> None:
        streams = self.streams
        if kind == HEADERS:
            if sid not in streams and sid > self.max_stream_id:
                streams[sid] = 0
                self.max_stream_id = sid
            self.in_header_block = not flags & END_HEADERS
            if flags & END_STREAM:
                self._end(sid)
        elif kind == CONTINUATION:
            self.in_header_block = not flags & END_HEADERS
        elif kind == PUSH_PROMISE:
            self.in_header_block = not flags & END_HEADERS
        elif kind == DATA:
            if flags & END_STREAM:
                self._end(sid)
        elif kind == RST_STREAM:
            streams.pop(sid, None)
        elif kind == GOAWAY:
            self.goaway_seen = True

    def _end(self, sid: int) -> None:
        halves = self.streams.get(sid)
        if halves is None:
            return
        halves |= 1 << self.side
        if halves == 3:
            del self.streams[sid]
            self.completed += 1
        else:
            self.streams[sid] = halves


def _keep(cuts: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The ranges of ``[0, n)`` outside ``cuts`` (sorted, disjoint)."""
    keep, at = [], 0
    for a, b in cuts:
        keep.append((at, a))
        at = b
    keep.append((at, n))
    return keep


class RelayConversion:
    """Turning a relayed HTTP/2 connection into a routed one, without breaking a call.

    While no route could apply, the agent relays an HTTP/2 connection as bytes. When the
    first route appears, the client must move its new streams to a new connection, which
    the agent will terminate and route: the agent sends it, at a frame boundary of the
    server's direction, ``GOAWAY(last=2^31-1, NO_ERROR)`` and a PING. A client that obeys
    opens no stream after it has read the GOAWAY, so once its PING ACK arrives every
    stream it will ever open here is known. When they have all ended, the agent sends the
    final ``GOAWAY(last=highest stream seen)`` and closes both sides. Streams in flight
    finish on the relay, as before; nothing in flight is cut.
    """

    def __init__(self) -> None:
        self.streams: dict[int, int] = {}
        self.client = FrameScanner(self.streams, 0, preface=True)
        self.server = FrameScanner(self.streams, 1)
        self.wanted = False  # a route appeared: convert at the next boundary
        self.sent = False  # the GOAWAY and PING went out
        self.ping = os.urandom(8)

    def notice(self) -> bytes:
        """The frames to insert toward the client at a boundary of the server's direction."""
        self.sent = True
        self.client.watch_ping = self.ping
        return goaway(MAX_STREAM_ID) + frame(PING, 0, 0, self.ping)

    @property
    def completed(self) -> bool:
        """A stream has completed: both its halves ended (not reset)."""
        return bool(self.client.completed or self.server.completed)

    @property
    def done(self) -> bool:
        """Every stream the client opened has ended, and none can follow."""
        return self.sent and self.client.ping_acked and not self.streams

    def farewell(self) -> bytes:
        return goaway(self.client.max_stream_id)
