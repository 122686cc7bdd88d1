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
- :class:`FieldRules` (:func:`malformed_fields`) and :func:`malformed_request` are RFC 9113's rules for what a
  client sends (sections 8.1.1, 8.2 and 8.3), as libnghttp2 applies them, plus the check of
  ``host`` against ``:authority`` that it leaves out (:func:`authority_mismatch`): both
  codecs refuse the same streams.
- :class:`Intake` reads a client's frame headers before either codec reads the frames:
  it counts what a client makes the agent do for nothing (PING, SETTINGS, PRIORITY,
  unknown frames, empty and tiny DATA, CONTINUATION runs, and streams reset before their
  answer: "rapid reset") with :class:`RateLimit` token buckets, and applies the few frame
  rules that one codec leaves out: both codecs stop at the same frame, with the same code.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from intercept.routing.http1 import RequestHead

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PREFACE_LINE = PREFACE[:16]  # "PRI * HTTP/2.0\r\n": a connection that begins so speaks HTTP/2 or nothing

FRAME_HEADER = 9
# frame types (RFC 9113 section 6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED_FLAG, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# error codes (RFC 9113 section 7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x2, 0x7, 0x8, 0xB
FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR, COMPRESSION_ERROR = 0x3, 0x5, 0x6, 0x9
MAX_STREAM_ID = 2**31 - 1

# What a client may make the agent do for nothing: PING, SETTINGS, PRIORITY, unknown and
# empty DATA frames (CVE-2019-9512/9515/9518), streams it resets before their answer
# (CVE-2023-44487, "rapid reset"), long CONTINUATION runs (CVE-2024-27316): nghttp2's
# figures, a little more generous for control frames. DATA frames under SMALL_DATA bytes
# that do not end their stream cost more to read than they carry (60,000 one-byte frames:
# over a second of the h2 codec's time); ten times as many of them are allowed, so that a
# stream of small gRPC messages (one frame each) can still be sent at a good pace.
CONTROL_BURST, CONTROL_RATE = 1000, 100.0
RESET_BURST, RESET_RATE = 1000, 33.0
SMALL_DATA = 128
SMALL_DATA_BURST, SMALL_DATA_RATE = 10_000, 1000.0
# WINDOW_UPDATE frames: a client with small windows sends one per half window it reads
# (64 KiB windows at 160 MB/s: 10,000 a second), so they have a bucket of their own; past
# it, they cost more to read than any download explains.
WINDOW_UPDATE_BURST, WINDOW_UPDATE_RATE = 10_000, 10_000.0
MAX_CONTINUATIONS = 8
MAX_SETTINGS = 32  # values in one SETTINGS frame (libnghttp2's limit)
MAX_HEADER_FIELDS = 1024  # fields in one header block (libnghttp2's limit)

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


class Intake:
    """A client connection's frames as they come in, before a codec reads them (sans-IO:
    ``clock`` gives the time): both codecs then read the same frames at the same time, stop
    at the same frame with the same code, and the slow one never parses a flood.

    :meth:`feed` takes the client's bytes as they arrive (the preface first) and returns
    what a codec may read of them now: whole frames only (libnghttp2 reads a frame as it
    arrives, h2 once it is whole: a stream or a connection refused halfway would be refused
    at different times), a header block (HEADERS and its CONTINUATION frames) only once
    whole, for the same reason, and no extension frames (types above 9: RFC 9113 section
    5.5 says to ignore them, and each codec knew some of them, differently). The rest of a
    frame comes with the next bytes. When the connection must end first, it returns nothing and ``code``
    is the GOAWAY code (``reason`` says why):

    - ENHANCE_YOUR_CALM past a limit: PING, SETTINGS, PRIORITY, RST_STREAM, GOAWAY,
      extension frames and empty DATA frames (:data:`CONTROL_BURST`; a reset of a stream
      that is over, or a GOAWAY repeated, does nothing else), WINDOW_UPDATE frames
      (:data:`WINDOW_UPDATE_BURST`), DATA frames under :data:`SMALL_DATA`
      bytes that do not end their stream (:data:`SMALL_DATA_BURST`), a header block
      continued more than :data:`MAX_CONTINUATIONS` times, a SETTINGS frame of more than
      :data:`MAX_SETTINGS` values, a header block of more than ``max_header_fields``
      field representations (counted from the block's bytes, before any is decoded, in
      every block: a request's, trailers, or one a codec would decode only for the HPACK
      state, whose fields neither codec keeps or counts). The codec calls :meth:`reset` for each stream the client
      resets before its answer began, and each one it refuses as malformed
      (:data:`RESET_BURST`).
    - PROTOCOL_ERROR or FRAME_SIZE_ERROR for what a frame's header (and padding) shows,
      which one codec sees before the frame's payload has arrived and the other after, or
      not the same way: a first frame that is not SETTINGS (section 3.4), a frame longer
      than the agent allows (4.2: 16 KiB, ``max_frame_size`` once the client has
      acknowledged the agent's SETTINGS), a header block interrupted (6.10), a frame of a
      length its type does not have or on a stream it may not be on (6), padding longer
      than its frame (6.1, 6.2), a second SETTINGS acknowledgement (the agent sends one
      SETTINGS frame, 6.5.3), PUSH_PROMISE from a client (8.4), DATA, RST_STREAM or
      WINDOW_UPDATE on a stream the client has not opened yet (5.1: "idle").
    """

    def __init__(self, clock: Callable[[], float], max_frame_size: int, max_header_fields: int = MAX_HEADER_FIELDS) -> None:
        self.clock = clock
        self.max_frame_size = max_frame_size
        self.max_header_fields = max_header_fields
        self.frame_limit = 1 << 14  # until the client acknowledges the agent's SETTINGS
        self.acked = False  # it has
        self.control = RateLimit(CONTROL_BURST, CONTROL_RATE)
        self.small_data = RateLimit(SMALL_DATA_BURST, SMALL_DATA_RATE)
        self.resets = RateLimit(RESET_BURST, RESET_RATE)
        self.windows = RateLimit(WINDOW_UPDATE_BURST, WINDOW_UPDATE_RATE)
        self.skip = len(PREFACE)
        self.held = b""  # the start of a frame that has not arrived whole
        self.judged = False  # its header was judged already
        self.pending = bytearray()  # the header block being held
        self.first = True  # no frame yet
        self.block = 0  # the stream of the header block open now (0: none is)
        self.continuations = 0  # CONTINUATION frames in it so far
        self.highest = 0  # the highest stream a HEADERS frame of the client's named
        self.code: int | None = None
        self.reason = ""

    def feed(self, data: bytes) -> bytes:
        if self.code is not None:
            return b""
        if self.held:
            data, self.held = self.held + data, b""
        n = len(data)
        pos = min(self.skip, n)
        self.skip -= pos
        start = 0  # where the bytes passed on so far begin: data[start:pos] is passed as is
        pieces: list[bytes] = []
        while pos < n:
            if n - pos < FRAME_HEADER + 1:
                if n - pos < FRAME_HEADER or data[pos + 3] in (DATA, HEADERS) and data[pos + 4] & PADDED_FLAG:
                    break  # (a padded frame's padding length too)
            length = data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]
            kind, flags = data[pos + 3], data[pos + 4]
            if not self.judged:  # (the header of a frame held whole was judged when it came)
                sid = (data[pos + 5] & 0x7F) << 24 | data[pos + 6] << 16 | data[pos + 7] << 8 | data[pos + 8]
                pad = data[pos + 9] if flags & PADDED_FLAG and (kind == DATA or kind == HEADERS) and length else -1
                problem = self._problem(kind, flags, length, sid, pad)
                if problem is not None:
                    self.code, self.reason = problem
                    return b""
                self.judged = True
            end = pos + FRAME_HEADER + length
            if end > n:
                break  # a frame is given whole
            self.judged = False
            # (each field takes a byte at least: a block as short as the limit is not read)
            if (flags & END_HEADERS and (kind == HEADERS or kind == CONTINUATION)
                    and length + (len(self.pending) if kind == CONTINUATION else 0) > self.max_header_fields):
                block = _block(self.pending + data[pos:end] if kind == CONTINUATION else data[pos:end])
                if _field_count(block, self.max_header_fields) > self.max_header_fields:
                    self.code = ENHANCE_YOUR_CALM
                    self.reason = f"a header block of more than {self.max_header_fields} fields"
                    return b""
            if kind > CONTINUATION or kind == CONTINUATION or kind == HEADERS and self.block:
                # a header block of several frames is given once whole; an extension frame, never
                if start < pos:
                    pieces.append(data[start:pos])
                start = end
                if kind <= CONTINUATION:
                    self.pending += data[pos:end]
                    if not self.block:
                        pieces.append(bytes(self.pending))
                        self.pending.clear()
            pos = end
        self.held = data[pos:]
        if not pieces:
            return data if pos == n and not start else data[start:pos]
        if start < pos:
            pieces.append(data[start:pos])
        return b"".join(pieces)

    def _problem(self, kind: int, flags: int, length: int, sid: int, pad: int) -> tuple[int, str] | None:
        """The connection error a frame's header (and ``pad``, its padding's length: -1 if
        none) shows, if any, in libnghttp2's order; else the frame is counted."""
        if self.first:
            self.first = False
            if kind != SETTINGS or flags & ACK:
                return PROTOCOL_ERROR, "the first frame is not SETTINGS"
        if self.block:  # only the header block's CONTINUATION frames may come now
            if kind != CONTINUATION or sid != self.block:
                return PROTOCOL_ERROR, "a header block interrupted by another frame"
            self.continuations += 1
            if self.continuations > MAX_CONTINUATIONS:
                return ENHANCE_YOUR_CALM, f"a header block continued more than {MAX_CONTINUATIONS} times"
        if length > self.frame_limit:
            return FRAME_SIZE_ERROR, f"a frame of {length} bytes"
        if kind == CONTINUATION:
            if not self.block:
                return PROTOCOL_ERROR, "CONTINUATION outside a header block"
            if flags & END_HEADERS:
                self.block = 0
        elif kind == HEADERS:
            if not sid:
                return PROTOCOL_ERROR, "HEADERS on stream 0"
            if flags & PADDED_FLAG and (not length or pad + 1 + (5 if flags & PRIORITY_FLAG else 0) > length):
                return PROTOCOL_ERROR, "HEADERS with more padding than payload"
            if not flags & END_HEADERS:
                self.block, self.continuations = sid, 0
            if sid & 1 and sid > self.highest:
                self.highest = sid
        elif kind == PUSH_PROMISE:
            return PROTOCOL_ERROR, "PUSH_PROMISE from a client"
        elif kind == SETTINGS:
            if sid:
                return PROTOCOL_ERROR, "SETTINGS on a stream"
            if length % 6 or flags & ACK and length:
                return FRAME_SIZE_ERROR, "a SETTINGS frame of a wrong length"
            if length > 6 * MAX_SETTINGS:
                return ENHANCE_YOUR_CALM, f"a SETTINGS frame of more than {MAX_SETTINGS} values"
            if flags & ACK:
                if self.acked:
                    return PROTOCOL_ERROR, "a SETTINGS acknowledgement the agent did not ask for"  # it sends one SETTINGS
                self.acked = True
                self.frame_limit = self.max_frame_size
        elif kind == PING or kind == GOAWAY:
            if kind == PING and length != 8 or kind == GOAWAY and length < 8:
                return FRAME_SIZE_ERROR, "a frame of a length its type does not have"
            if sid:
                return PROTOCOL_ERROR, "a PING or GOAWAY on a stream"
            if kind == GOAWAY and not self.control.spend(self.clock()):
                return ENHANCE_YOUR_CALM, "too many GOAWAY frames"
        elif kind == PRIORITY:
            if length != 5:
                return FRAME_SIZE_ERROR, "a PRIORITY frame that is not 5 bytes"
            if not sid:
                return PROTOCOL_ERROR, "PRIORITY on stream 0"
        elif kind == DATA or kind == RST_STREAM or kind == WINDOW_UPDATE:
            if kind != DATA and length != 4:
                return FRAME_SIZE_ERROR, "a frame of a length its type does not have"
            if (sid or kind == DATA) and (not sid & 1 or sid > self.highest):
                return PROTOCOL_ERROR, f"frame type {kind} on idle stream {sid}"
            if kind == RST_STREAM and not self.control.spend(self.clock()):
                return ENHANCE_YOUR_CALM, "too many RST_STREAM frames"
            if kind == WINDOW_UPDATE and not self.windows.spend(self.clock()):
                return ENHANCE_YOUR_CALM, "too many WINDOW_UPDATE frames"
            if kind == DATA:
                if flags & PADDED_FLAG and (not length or pad >= length):
                    return PROTOCOL_ERROR, "DATA with more padding than payload"
                if not flags & END_STREAM and length < SMALL_DATA:
                    if length and not self.small_data.spend(self.clock()):
                        return ENHANCE_YOUR_CALM, "too many small DATA frames"
                    if not length and not self.control.spend(self.clock()):
                        return ENHANCE_YOUR_CALM, "too many empty DATA frames"
            return None
        if (kind == PING or kind == SETTINGS or kind == PRIORITY or kind > CONTINUATION) and not self.control.spend(self.clock()):
            return ENHANCE_YOUR_CALM, "too many PING, SETTINGS, PRIORITY or extension frames"
        return None

    def reset(self) -> bool:
        """A stream the client reset before its answer began, or one refused as malformed:
        False once there have been too many ("rapid reset")."""
        if self.resets.spend(self.clock()):
            return True
        self.reason = "too many streams reset before their answer (rapid reset) or refused as malformed"
        return False


def _block(frames: bytes | bytearray) -> bytes:
    """The field block that whole HEADERS and CONTINUATION ``frames`` carry (padding and
    priority left out)."""
    parts = []
    pos = 0
    while pos + FRAME_HEADER <= len(frames):
        length, kind, flags = int.from_bytes(frames[pos : pos + 3], "big"), frames[pos + 3], frames[pos + 4]
        start, end = pos + FRAME_HEADER, pos + FRAME_HEADER + length
        if kind == HEADERS:
            if flags & PADDED_FLAG and length:
                end -= frames[start]
                start += 1
            if flags & PRIORITY_FLAG:
                start += 5
        parts.append(bytes(frames[start:max(start, end)]))
        pos += FRAME_HEADER + length
    return b"".join(parts)


def _field_count(block: bytes, limit: int) -> int:
    """How many fields an HPACK ``block`` holds (RFC 7541 section 6), read from the
    representations' prefixes without decoding any: it stops once past ``limit``, or where
    the block cannot be read (the codec then says why)."""
    count, pos, n = 0, 0, len(block)

    def skip_int(pos: int, prefix: int) -> tuple[int, int]:  # (value, position after it)
        mask = (1 << prefix) - 1
        value = block[pos] & mask
        pos += 1
        if value < mask:
            return value, pos
        shift = 0
        while pos < n and shift < 64:
            b = block[pos]
            pos += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, pos
        return -1, n  # truncated or absurd: not read further

    while pos < n and count <= limit:
        b = block[pos]
        if b & 0x80:  # indexed field
            count += 1
            pos = skip_int(pos, 7)[1]
            continue
        if b & 0xE0 == 0x20:  # dynamic table size update: no field
            pos = skip_int(pos, 5)[1]
            continue
        count += 1  # a literal field: with incremental indexing (01), without (0000), never indexed (0001)
        index, pos = skip_int(pos, 6 if b & 0x40 else 4)
        for _ in range(1 if index else 2):  # the name (unless indexed), then the value
            if pos >= n:
                return count
            length, pos = skip_int(pos, 7)
            if length < 0:
                return count
            pos += length
    return count


# -- what a client may send (RFC 9113 sections 8.1.1, 8.2, 8.3) -----------------------------

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NAME = bytes(c for c in range(256) if c in _TOKEN and not 0x41 <= c <= 0x5A)  # lowercase token characters
_METHOD = bytes(_TOKEN)
_VALUE = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])  # no NUL, CR, LF nor other controls
_PATH = bytes([*range(0x21, 0x7F), *range(0x80, 0x100)])
_AUTHORITY = b"!$%&'()*+,-.0123456789:;=ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz~"
_SCHEME_FIRST = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SCHEME = _SCHEME_FIRST + b"0123456789+-."
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_FORBIDDEN = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}


def _only(value: bytes, allowed: bytes) -> bool:
    return not value.translate(None, allowed)


def _field_problem(name: bytes, value: bytes) -> str | None:
    """What is wrong with a regular field, as any field block may carry it, or None."""
    if not name or not _only(name, _NAME):
        return f"field name {name!r} is not a lowercase token"
    if value and (value[0] in b" \t" or value[-1] in b" \t" or not _only(value, _VALUE)):
        return f"field {name.decode('latin-1')} has a value with surrounding whitespace or control characters"
    if name in _FORBIDDEN:
        return f"connection-specific field {name.decode()}"
    if name == b"te" and value.lower() != b"trailers":
        return "te other than trailers"
    return None


class FieldRules:
    """The rules libnghttp2 applies to each field of a request's header section
    (``trailers``: its trailer section) as it is decoded: :meth:`check` says why a field
    is malformed, given those before it, or None.

    Pseudo-header fields first, once each, none unknown, none empty, none in trailers;
    ``:method`` a token, ``:scheme`` a scheme, ``:path`` and ``:authority`` without
    forbidden characters; lowercase field names; values without NUL, CR, LF, other
    controls or surrounding whitespace; at most one ``host`` (an authority) and one
    ``content-length`` (digits); no connection-specific field; ``te`` only ``trailers``.
    """

    __slots__ = ("trailers", "pseudo", "regular", "host", "length")

    def __init__(self, trailers: bool = False) -> None:
        self.trailers = trailers
        self.pseudo: set[bytes] = set()
        self.regular = self.host = self.length = False

    def check(self, name: bytes, value: bytes) -> str | None:
        if name[:1] == b":":
            if self.regular or self.trailers:
                return f"pseudo-header field {name!r} after a regular field, or in trailers"
            if name not in _PSEUDO or name in self.pseudo or not value:
                return f"pseudo-header field {name!r} unknown, repeated or empty"
            allowed = (_METHOD if name == b":method" else _PATH if name == b":path"
                       else _AUTHORITY if name == b":authority" else _SCHEME)
            if not _only(value, allowed) or name == b":scheme" and value[0] not in _SCHEME_FIRST:
                return f"pseudo-header field {name.decode()} has characters it may not"
            self.pseudo.add(name)
            return None
        self.regular = True
        problem = _field_problem(name, value)
        if problem is not None:
            return problem
        if name == b"host":
            if self.host or not value or not _only(value, _AUTHORITY):
                return "host repeated, empty or with characters it may not have"
            self.host = True
        elif name == b"content-length":
            if self.length or not value.isdigit() or len(value) > 19 or int(value) >= 1 << 63:
                return "content-length repeated or not a number"
            self.length = True
        return None


def malformed_fields(headers: Headers, trailers: bool = False) -> str | None:
    """Why a request's header section (``trailers``: its trailer section) has a malformed
    field (:class:`FieldRules`), or None."""
    rules = FieldRules(trailers)
    for name, value in headers:
        problem = rules.check(name, value)
        if problem is not None:
            return problem
    return None


def malformed_request(headers: Headers) -> str | None:
    """Why a request whose fields pass :func:`malformed_fields` is malformed as a whole, or
    None (RFC 9113 section 8.3.1): ``:method``, ``:scheme`` and ``:path`` present (only
    ``:authority`` for CONNECT); an ``:authority`` or a ``host``; for ``http`` and
    ``https``, a ``:path`` that is ``/...`` (or ``*`` for OPTIONS).

    A request refused by either function, or by :func:`authority_mismatch`, is a stream
    error (RST_STREAM PROTOCOL_ERROR), as RFC 9113 section 8.1.1 says.
    """
    pseudo = {name: value for name, value in headers if name[:1] == b":"}
    method = pseudo.get(b":method")
    if method == b"CONNECT":
        if b":scheme" in pseudo or b":path" in pseudo or b":authority" not in pseudo:
            return "CONNECT needs :authority, and no :scheme nor :path"
        return None
    if method is None or b":scheme" not in pseudo or b":path" not in pseudo:
        return "a request needs :method, :scheme and :path"
    if b":authority" not in pseudo and not any(name == b"host" for name, _ in headers):
        return "a request needs :authority or host"
    path, scheme = pseudo[b":path"], pseudo[b":scheme"].lower()
    if scheme in _DEFAULT_PORTS and path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        return f":path {path[:40]!r} is not an absolute path"
    return None


def authority_mismatch(headers: Headers) -> str | None:
    """A ``host`` that names another authority than ``:authority`` (compared as RFC 3986
    section 6.2.3 says: the host's case and the scheme's default port do not count), or None.

    RFC 9113 section 8.3.1: a server should treat such a request as malformed; libnghttp2
    leaves it to its user, python-hyper h2 refuses any difference. A route that matches
    ``host`` must not see one name while the app acts on the other.
    """
    authority = host = scheme = None
    for name, value in headers:
        if name == b"host":
            host = value
        elif name == b":authority":
            authority = value
        elif name == b":scheme":
            scheme = value.lower()
    if host is None or authority is None or host == authority:
        return None
    default = _DEFAULT_PORTS.get(scheme or b"")
    if _authority_key(host, default) == _authority_key(authority, default):
        return None
    return f"host {host[:40]!r} differs from :authority {authority[:40]!r}"


def _authority_key(authority: bytes, default_port: bytes | None) -> bytes:
    host, colon, port = authority.rpartition(b":")
    if not colon or b"]" in port or not port.isdigit() and port:
        host, port = authority, b""
    if port == default_port:
        port = b""
    return host.lower() + (b":" + port if port else b"")


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
