"""Differential test of the agent's two HTTP/2 codecs: python-hyper h2 and libnghttp2 (ngh2).

The agent terminates a client's h2c connection with one of two codecs
(:mod:`intercept.routing.h2codec`, :mod:`intercept.routing.ngh2codec`); whichever runs, the
client must get the same answers and the app the same requests. For one connection's worth
of client frames, :func:`outcome` plays the agent's part as :mod:`intercept.agent.h2proxy`
does with a codec's events (each request reported is forwarded, its data passed on and the
window given back at once, its trailers and resets carried, and a complete request
answered ``204`` on streams 1, 5, 9..., left waiting on 3, 7...), and records what the app got and what the client got: per stream, and
the connection's end. :func:`disagreement` names the first difference between the codecs,
with the frames fed one at a time (the finest chunking) and all at once.

:func:`generate` builds frame sequences from a grammar of the shapes on which HTTP/2
implementations differ, driven by any ``choose(options)`` function: hypothesis in the test
suite, a seeded ``random.Random`` in the campaign (``fuzz/h2_diff.py``). :data:`CORPUS` is
the named malformed corpus (issue 22): each case must end the same way on both codecs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from intercept.routing.h2 import CANCEL, PREFACE
from intercept.routing.h2codec import CodecError, Data, Headers, Reset, StreamError, new_codec

CODECS = ("h2", "ngh2")

T = TypeVar("T")
Choose = Callable[[Sequence[T]], T]
Fields = tuple[tuple[bytes, bytes], ...]


@dataclass
class Seen:
    """One stream: what the app got (``request`` .. ``cancelled``) and what the client got."""

    request: Fields | None = None
    data: bytes = b""
    trailers: Fields | None = None
    ended: bool = False  # the app saw the request end
    cancelled: int | None = None  # the code the agent reset it with toward the app
    answered: bool = False  # the client got the response headers
    reset: int | None = None  # the first RST_STREAM the client got on it


@dataclass
class Outcome:
    streams: dict[int, Seen] = field(default_factory=dict)
    goaway: int | None = None  # the error code of the first GOAWAY the client got
    closed: bool = False  # the agent ended the connection (a connection error)

    def summary(self) -> str:
        streams = {sid: {k: v for k, v in vars(s).items() if v not in (None, b"", False)} for sid, s in self.streams.items()}
        return f"goaway={self.goaway} closed={self.closed} streams={streams}"


def outcome(kind: str, chunks: Sequence[bytes]) -> Outcome:
    """What the agent on codec ``kind`` makes of a client's ``chunks`` (read in that order)."""
    codec = new_codec(client=False, clock=lambda: 0.0, kind=kind)
    codec.start()
    codec.pending()  # the agent's SETTINGS
    result = Outcome()
    streams: dict[int, Seen] = {}
    done: set[int] = set()  # streams over on both sides: the proxy has forgotten them
    out = bytearray()
    last = b""  # what the chunk that ended the connection wrote

    def answer(sid: int) -> None:
        if sid % 4 == 3:  # the app answers streams 1, 5, 9...; 3, 7... are still waiting
            return
        try:
            codec.send_headers(sid, [(b":status", b"204")], end_stream=True)
        except StreamError:
            return
        done.add(sid)

    for chunk in chunks:
        try:
            events = codec.receive(chunk)
        except CodecError:
            result.closed = True
            last = codec.pending()
            break
        for ev in events:
            t = type(ev)
            seen = streams.get(getattr(ev, "stream_id", 0)) if t is not Headers or ev.kind != Headers.REQUEST else None
            if seen is not None and (seen.cancelled is not None or ev.stream_id in done):
                seen = None
            if t is Headers and ev.kind == Headers.REQUEST:
                streams[ev.stream_id] = Seen(request=tuple(map(tuple, ev.headers)), ended=ev.end_stream)
                if ev.end_stream:
                    answer(ev.stream_id)
            elif t is Headers and ev.kind == Headers.TRAILERS and seen is not None:
                seen.trailers, seen.ended = tuple(map(tuple, ev.headers)), True
                answer(ev.stream_id)
            elif t is Data:
                codec.ack(ev.stream_id, ev.flow_length)
                if seen is not None:
                    seen.data += ev.data
                    if ev.end_stream:
                        seen.ended = True
                        answer(ev.stream_id)
            elif t is Reset and seen is not None:
                seen.cancelled = ev.code
        out += codec.pending()
    for f in parse(bytes(out)):
        if isinstance(f, GoAwayFrame) and result.goaway is None:
            result.goaway = f.error_code
        elif isinstance(f, RstStreamFrame):
            seen = streams.setdefault(f.stream_id, Seen())
            if seen.reset is None:
                seen.reset = f.error_code
        elif isinstance(f, HeadersFrame):
            streams.setdefault(f.stream_id, Seen()).answered = True
    # of the write that ends the connection only the GOAWAY counts: the stream errors found
    # in the same read are written before it by one engine, dropped by the other
    for f in parse(last):
        if isinstance(f, GoAwayFrame) and result.goaway is None:
            result.goaway = f.error_code
    # libnghttp2 decodes a header block as its frames arrive and may refuse its stream
    # before the block ends; h2 decides at its end. So a stream whose last block never
    # ended is compared on what reached the app before that block; and when the connection
    # ends with an error, on what reached the app: every stream is then over for the client,
    # and the proxy cancels toward the app each one that was not (as Downstream does)
    unfinished, reset_by_client = scan(b"".join(chunks))
    for sid, seen in list(streams.items()):
        if sid in reset_by_client:
            seen.reset = None  # a client ignores frames on a stream it reset (RFC 9113 5.4.2), RST_STREAM too
        if seen.request is None and (result.closed or sid in unfinished):
            del streams[sid]
        elif result.closed:
            seen.reset = None
            if sid not in done and seen.cancelled is None:
                seen.cancelled = CANCEL
        elif sid in unfinished:
            seen.reset = seen.cancelled = None
    result.streams = {sid: seen for sid, seen in sorted(streams.items()) if seen != Seen()}
    return result


def scan(data: bytes) -> tuple[set[int], set[int]]:
    """In a client's bytes: the streams of header blocks that never end (the input stops,
    or another frame comes, before END_HEADERS), and the streams it resets."""
    unfinished, reset, open_block = set(), set(), 0
    pos = len(PREFACE) if data.startswith(PREFACE) else 0
    while pos + 9 <= len(data):
        length, kind, flags = int.from_bytes(data[pos : pos + 3], "big"), data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        if open_block and (kind != 9 or sid != open_block):
            unfinished.add(open_block)
            open_block = 0
        if kind in (1, 5, 9) and not flags & 0x4:
            open_block = open_block or sid
        elif kind == 9:
            open_block = 0
        elif kind == 3:
            reset.add(sid)
        pos += 9 + length
    if open_block:
        unfinished.add(open_block)
    return unfinished, reset


def parse(data: bytes) -> list[Frame]:
    frames = []
    while len(data) >= 9:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(f)
        data = data[9 + length :]
    return frames


def disagreement(frames: Sequence[bytes]) -> str | None:
    """Where the two codecs differ on a client's ``frames`` (the preface included), or None."""
    for name, chunks in (("frame by frame", frames), ("all at once", [b"".join(frames)])):
        first, second = (outcome(kind, chunks) for kind in CODECS)
        if first != second:
            return f"{name}:\n  {CODECS[0]}: {first.summary()}\n  {CODECS[1]}: {second.summary()}"
    return None


# -- frames ---------------------------------------------------------------------------------

REQUEST: list[tuple[bytes, bytes]] = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
POST: list[tuple[bytes, bytes]] = [(b":method", b"POST"), *REQUEST[1:]]


def raw(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def headers(stream_id: int, fields, encoder: hpack.Encoder, *, end_stream: bool = True, pieces: int = 1,
            padded: bool = False, priority: int | None = None) -> list[bytes]:
    """A header block on ``stream_id``: one HEADERS frame, or split into ``pieces`` frames
    (HEADERS then CONTINUATIONs). ``fields`` may be raw HPACK bytes."""
    block = fields if isinstance(fields, bytes) else encoder.encode(list(fields), huffman=False)
    size = max(1, -(-len(block) // pieces))
    parts = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
    parts += [b""] * (pieces - len(parts))
    flags = (0x1 if end_stream else 0) | (0x4 if pieces == 1 else 0) | (0x8 if padded else 0) | (0x20 if priority is not None else 0)
    payload = (b"\3" if padded else b"") + (priority.to_bytes(4, "big") + b"\x0f" if priority is not None else b"") + parts[0]
    out = [raw(1, flags, stream_id, payload + (b"\0" * 3 if padded else b""))]
    for i, part in enumerate(parts[1:], 2):
        out.append(raw(9, 0x4 if i == pieces else 0, stream_id, part))
    return out


def data(stream_id: int, payload: bytes, end_stream: bool = False, padded: bool = False) -> bytes:
    flags = (0x1 if end_stream else 0) | (0x8 if padded else 0)
    return raw(0, flags, stream_id, b"\4" + payload + b"\0" * 4 if padded else payload)


def start(settings: dict[int, int] | None = None) -> list[bytes]:
    return [PREFACE, SettingsFrame(0, settings=settings or {}).serialize()]


def _corpus() -> dict[str, list[bytes]]:
    def case(*parts) -> list[bytes]:
        out = start()
        for p in parts:
            out += p if isinstance(p, list) else [p]
        return out

    def req(fields, **kw) -> list[bytes]:
        return headers(1, fields, hpack.Encoder(), **kw)

    path = lambda p: [*REQUEST[:3], (b":path", p)]  # noqa: E731
    return {
        # field rules (RFC 9113 sections 8.2, 8.3)
        "valid": case(req(REQUEST)),
        "host-differs-from-authority": case(req([*REQUEST, (b"host", b"evil")])),
        "host-same-authority-other-spelling": case(req([*REQUEST[:2], (b":authority", b"A:80"), REQUEST[3], (b"host", b"a")])),
        "host-only": case(req([*REQUEST[:2], REQUEST[3], (b"host", b"a")])),
        "two-hosts": case(req([*REQUEST, (b"host", b"a"), (b"host", b"a")])),
        "path-relative": case(req(path(b"foo"))),
        "path-absolute-uri": case(req(path(b"http://evil/x"))),
        "path-empty": case(req(path(b""))),
        "path-asterisk-get": case(req(path(b"*"))),
        "path-asterisk-options": case(req([(b":method", b"OPTIONS"), *path(b"*")[1:]])),
        "path-with-space": case(req(path(b"/a b"))),
        "no-path": case(req(REQUEST[:3])),
        "no-method": case(req(REQUEST[1:])),
        "no-authority-nor-host": case(req([*REQUEST[:2], REQUEST[3]])),
        "repeated-pseudo": case(req([*REQUEST, ][:4] + [(b":path", b"/again")])),
        "pseudo-after-regular": case(req([*REQUEST[:3], (b"x", b"1"), REQUEST[3]])),
        "unknown-pseudo": case(req([*REQUEST, (b":x", b"1")])),
        "status-in-request": case(req([(b":status", b"200"), *REQUEST])),
        "uppercase-name": case(req([*REQUEST, (b"X-Dev", b"alice")])),
        "name-with-space": case(req([*REQUEST, (b"x dev", b"alice")])),
        "empty-name": case(req([*REQUEST, (b"", b"alice")])),
        "value-with-nul": case(req([*REQUEST, (b"x-dev", b"ali\0ce")])),
        "value-with-ctl": case(req([*REQUEST, (b"x-dev", b"ali\x01ce")])),
        "value-with-del": case(req([*REQUEST, (b"x-dev", b"ali\x7fce")])),
        "value-with-obs-text": case(req([*REQUEST, (b"x-dev", b"ali\xe9ce")])),
        "value-surrounded-by-space": case(req([*REQUEST, (b"x-dev", b" alice")])),
        "value-with-inner-tab": case(req([*REQUEST, (b"x-dev", b"al\tice")])),
        "connection-field": case(req([*REQUEST, (b"connection", b"close")])),
        "keep-alive-field": case(req([*REQUEST, (b"keep-alive", b"1")])),
        "transfer-encoding-field": case(req([*POST, (b"transfer-encoding", b"chunked")], end_stream=False),
                                        data(1, b"x", end_stream=True)),
        "upgrade-field": case(req([*REQUEST, (b"upgrade", b"h2c")])),
        "te-gzip": case(req([*REQUEST, (b"te", b"gzip")])),
        "te-trailers": case(req([*REQUEST, (b"te", b"Trailers")])),
        "connect-with-path": case(req([(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")])),
        "connect": case(req([(b":method", b"CONNECT"), (b":authority", b"a:443")], end_stream=False), data(1, b"tunnel")),
        "scheme-not-a-scheme": case(req([REQUEST[0], (b":scheme", b"1http"), *REQUEST[2:]])),
        "method-with-space": case(req([(b":method", b"GE T"), *REQUEST[1:]])),
        "authority-with-userinfo": case(req([*REQUEST[:2], (b":authority", b"u@a"), REQUEST[3]])),
        # content-length (RFC 9113 section 8.1.1)
        "content-length-matches": case(req([*POST, (b"content-length", b"3")], end_stream=False), data(1, b"abc", True)),
        "content-length-short": case(req([*POST, (b"content-length", b"5")], end_stream=False), data(1, b"abc", True)),
        "content-length-exceeded": case(req([*POST, (b"content-length", b"2")], end_stream=False), data(1, b"abc", True)),
        "content-length-exceeded-late": case(req([*POST, (b"content-length", b"4")], end_stream=False), data(1, b"abc"),
                                             data(1, b"de", True)),
        "content-length-headers-only": case(req([*POST, (b"content-length", b"5")])),
        "content-length-twice": case(req([*POST, (b"content-length", b"3"), (b"content-length", b"3")], end_stream=False),
                                     data(1, b"abc", True)),
        "content-length-not-a-number": case(req([*POST, (b"content-length", b"3x")], end_stream=False), data(1, b"abc", True)),
        "content-length-huge": case(req([*POST, (b"content-length", b"9" * 30)], end_stream=False), data(1, b"abc", True)),
        "content-length-short-then-trailers": case(req([*POST, (b"content-length", b"5")], end_stream=False), data(1, b"abc"),
                                                   headers(1, [(b"x-t", b"1")], hpack.Encoder())),
        # trailers
        "trailers": case(req(POST, end_stream=False), data(1, b"abc"), headers(1, [(b"x-t", b"1")], hpack.Encoder())),
        "trailers-without-end-stream": case(req(POST, end_stream=False), data(1, b"abc"),
                                            headers(1, [(b"x-t", b"1")], hpack.Encoder(), end_stream=False)),
        "pseudo-in-trailers": case(req(POST, end_stream=False), headers(1, [(b":path", b"/")], hpack.Encoder())),
        "uppercase-in-trailers": case(req(POST, end_stream=False), headers(1, [(b"X-T", b"1")], hpack.Encoder())),
        # framing
        "data-after-end-stream": case(req(REQUEST), data(1, b"x")),
        "data-on-idle-stream": case(data(3, b"x")),
        "headers-on-even-stream": case(headers(2, REQUEST, hpack.Encoder())),
        "stream-id-going-down": case(headers(5, REQUEST, hpack.Encoder()), headers(3, REQUEST, hpack.Encoder())),
        "padded-data": case(req(POST, end_stream=False), data(1, b"abc", True, padded=True)),
        "padded-headers": case(req(REQUEST, padded=True)),
        "priority-loop-in-headers": case(req(REQUEST, priority=1)),
        "priority-loop": case(PriorityFrame(1, depends_on=1).serialize()),
        "priority-on-stream-0": case(raw(2, 0, 0, b"\0\0\0\1\x0f")),
        "priority-wrong-length": case(raw(2, 0, 1, b"\0\0\0")),
        "continuation-without-headers": case(ContinuationFrame(1, data=b"", flags={"END_HEADERS"}).serialize()),
        "continuation-on-another-stream": case(headers(1, REQUEST, hpack.Encoder(), pieces=2)[0],
                                               ContinuationFrame(3, data=b"", flags={"END_HEADERS"}).serialize()),
        "continuations-8": case(headers(1, REQUEST, hpack.Encoder(), pieces=9)),
        "continuations-9": case(headers(1, REQUEST, hpack.Encoder(), pieces=10)),
        "continuation-flood": case(HeadersFrame(1, data=hpack.Encoder().encode([(":method", "GET")])).serialize(),
                                   *[ContinuationFrame(1, data=b"").serialize()] * 200),
        "window-overflow-connection": case([WindowUpdateFrame(0, window_increment=2**31 - 1).serialize()] * 2),
        "window-overflow-stream": case(req(POST, end_stream=False), [WindowUpdateFrame(1, window_increment=2**31 - 1).serialize()] * 2),
        "window-update-zero": case(raw(8, 0, 0, b"\0\0\0\0")),
        "window-update-zero-on-stream": case(req(POST, end_stream=False), raw(8, 0, 1, b"\0\0\0\0")),
        "settings-initial-window-too-large": case(SettingsFrame(0, settings={4: 2**31}).serialize()),
        "settings-enable-push-2": case(SettingsFrame(0, settings={2: 2}).serialize()),
        "settings-max-frame-too-small": case(SettingsFrame(0, settings={5: 100}).serialize()),
        "settings-ack-with-payload": case(raw(4, 1, 0, b"\0\4\0\0\0\1")),
        "settings-wrong-length": case(raw(4, 0, 0, b"\0\4\0")),
        "ping-wrong-length": case(raw(6, 0, 0, b"1234")),
        "ping-on-a-stream": case(raw(6, 0, 1, b"12345678")),
        "rst-on-idle-stream": case(RstStreamFrame(1, error_code=8).serialize()),
        "rst-wrong-length": case(req(POST, end_stream=False), raw(3, 0, 1, b"\0\0\0")),
        "goaway-from-client": case(req(POST, end_stream=False), GoAwayFrame(0, last_stream_id=0).serialize(), data(1, b"x", True)),
        "push-promise-from-client": case(req(POST, end_stream=False), raw(5, 4, 1, b"\0\0\0\2" + hpack.Encoder().encode(REQUEST))),
        "unknown-frame-type": case(raw(0xFA, 0, 0, b"ignore me"), req(REQUEST)),
        "frame-larger-than-allowed": case(raw(0, 0, 1, b"x" * 20000)),
        "invalid-hpack-index": case(raw(1, 5, 1, bytes([0x80 | 120]))),
        "hpack-table-size-too-large": case(raw(1, 5, 1, b"\x3f\xe1\xff\x03" + hpack.Encoder().encode(REQUEST))),
        "oversized-header-list": case(req([*REQUEST, (b"x-big", b"v" * 70_000)], pieces=6)),
        "oversized-header-list-of-small-fields": case(req([*REQUEST, *[(b"x-%d" % i, b"v" * 100) for i in range(600)]], pieces=6)),
        "more-than-1024-fields": case(req([*REQUEST, *[(b"x%d" % i, b"1") for i in range(1021)]], pieces=4)),
        "a-malformed-field-then-a-huge-list": case(req([*REQUEST, (b"X", b"1"), *[(b"x-%d" % i, b"v" * 100) for i in range(600)]],
                                                      pieces=6)),
        # a block whose fields nobody keeps is still decoded (the HPACK state): one field, then
        # 147,000 one-byte indexed fields, after a malformed field, or on a stream that is over
        "a-malformed-field-then-a-field-bomb": case(field_bomb(1, b"\x00\x01A\x01x")),
        "a-field-bomb-on-a-closed-stream": case(req(REQUEST), field_bomb(1, b"\x82")),
        "a-field-bomb-on-a-refused-stream": case([f for i in range(256) for f in headers(2 * i + 1, POST, _encoder, end_stream=False)],
                                                 field_bomb(513, b"\x82")),
        # floods
        "settings-flood": case([SettingsFrame(0, settings={4: 65535}).serialize()] * 1500),
        "ping-flood": case([PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(1500)]),
        "ping-ack-flood": case([PingFrame(0, opaque_data=b"x" * 8, flags={"ACK"}).serialize()] * 1500),
        "priority-flood": case([PriorityFrame(3, depends_on=0, stream_weight=5).serialize()] * 1500),
        "unknown-frame-flood": case([raw(0xFA, 0, 0, b"x")] * 1500),
        "window-update-flood": case(req(POST, end_stream=False), [WindowUpdateFrame(0, window_increment=1).serialize()] * 12_000),
        "window-update-flood-on-a-closed-stream": case(req(REQUEST), [WindowUpdateFrame(1, window_increment=1).serialize()] * 12_000),
        "rst-on-a-closed-stream-flood": case(req(REQUEST), [RstStreamFrame(1, error_code=8).serialize()] * 1500),
        "goaway-flood": case(req(POST, end_stream=False), [GoAwayFrame(0, last_stream_id=0).serialize()] * 1500),
        "empty-data-flood": case(req(POST, end_stream=False), [data(1, b"")] * 1500),
        "tiny-data-flood": case(req(POST, end_stream=False), [data(1, b"x")] * 12_000),
        "small-message-stream": case(req(POST, end_stream=False), [data(1, b"\0\0\0\0\x03abc")] * 5_000, data(1, b"", True)),
        "rapid-reset": case(rapid_reset(hpack.Encoder())),
        "malformed-stream-flood": case(malformed_streams(hpack.Encoder())),
        "more-streams-than-allowed": case([f for i in range(300) for f in headers(4 * i + 3, REQUEST, _encoder)]),
    }


def field_bomb(stream_id: int, first: bytes, frame: int = 1 << 14) -> list[bytes]:
    """A header block of HEADERS and 8 CONTINUATION frames (the most a client may send, in
    frames of the size allowed before SETTINGS are acknowledged): the field ``first``, then
    ``\\x82`` (``:method: GET``, one byte) to the end."""
    block = first + b"\x82" * (9 * frame - len(first))
    parts = [block[i : i + frame] for i in range(0, len(block), frame)]
    return [raw(1, 0x1, stream_id, parts[0]), *(raw(9, 0x4 if i == len(parts) - 1 else 0, stream_id, p)
                                               for i, p in enumerate(parts) if i)]


def rapid_reset(enc: hpack.Encoder) -> list[bytes]:
    return [f for i in range(1500) for f in
            [*headers(2 * i + 1, REQUEST, enc, end_stream=False), RstStreamFrame(2 * i + 1, error_code=8).serialize()]]


def malformed_streams(enc: hpack.Encoder) -> list[bytes]:
    return [f for i in range(1500) for f in headers(2 * i + 1, [*REQUEST[:3], (b":path", b"foo")], enc)]


_encoder = hpack.Encoder()
CORPUS = _corpus()


# -- the grammar ------------------------------------------------------------------------------

FIELD_MUTATIONS: list[Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]] = [
    *[lambda f: f] * 20,  # most requests are valid, so that inputs go on past them
    lambda f: [*f, (b"host", b"a")],
    lambda f: [*f, (b"host", b"b")],
    lambda f: [*f, (b"host", b"A:80")],
    lambda f: [*f[:3], (b":path", b"foo")],
    lambda f: [*f[:3], (b":path", b"http://evil/x")],
    lambda f: [*f[:3], (b":path", b"")],
    lambda f: [*f[:3], (b":path", b"*")],
    lambda f: [(b":method", b"OPTIONS"), *f[1:3], (b":path", b"*")],
    lambda f: [(b":method", b"CONNECT"), f[2]],
    lambda f: f[1:],
    lambda f: f[:3],
    lambda f: [*f, (b":path", b"/2")],
    lambda f: [f[0], (b"x", b"1"), *f[1:]],
    lambda f: [*f, (b"X-Dev", b"alice")],
    lambda f: [*f, (b"x-dev", b"a\x00b")],
    lambda f: [*f, (b"x-dev", b"a\x01b")],
    lambda f: [*f, (b"x-dev", b" a")],
    lambda f: [*f, (b"x-dev", b"a\xffb")],
    lambda f: [*f, (b"x dev", b"a")],
    lambda f: [*f, (b"connection", b"close")],
    lambda f: [*f, (b"te", b"trailers")],
    lambda f: [*f, (b"te", b"gzip")],
    lambda f: [*f, (b"content-length", b"0")],
    lambda f: [*f, (b"content-length", b"3")],
    lambda f: [*f, (b"content-length", b"3"), (b"content-length", b"3")],
    lambda f: [*f, (b"content-length", b"-1")],
    lambda f: [f[0], (b":scheme", b"https"), *f[2:]],
    lambda f: [f[0], (b":scheme", b"foo"), f[2], (b":path", b"bar")],
    lambda f: [(b":status", b"200"), *f],
]
TRAILER_FIELDS = [[(b"x-t", b"1")], [(b"grpc-status", b"0")], [(b":path", b"/")], [(b"X-T", b"1")], [(b"te", b"gzip")],
                  [(b"content-length", b"3")], []]
PAYLOADS = [b"", b"x", b"abc", b"\0\0\0\0\x03abc", b"y" * 200]
STREAM_IDS = ["next"] * 6 + ["same"] * 3 + ["lower", "even", "zero"]
FLOOD_SIZES = [2, 10, 1001, 1500]


def generate(choose: Choose) -> list[bytes]:
    """One client connection's frames, from the grammar above (the preface first)."""
    enc = hpack.Encoder()
    frames = start(choose([{}] * 12 + [{4: 0}, {4: 2**31}, {5: 100}, {2: 2}, {1: 0}, {3: 0}, {0x99: 1}]))
    sid = last = 1
    for _ in range(choose([1, 2, 3, 4, 6, 8])):
        act = choose(["request"] * 8 + ["data"] * 6 + ["trailers"] * 3 + ["rst"] * 2 + ["priority", "window", "ping",
                      "settings", "goaway", "unknown", "push", "flood", "raw-hpack"])
        if sid == 1 and act in ("data", "trailers", "rst", "window"):
            act = "request"  # (on a stream never opened, they only end the connection)
        pick = choose(STREAM_IDS)
        target = {"next": sid, "same": last, "lower": max(1, last - 2), "even": sid + 1, "zero": 0}[pick]
        if act == "request":
            fields = choose(FIELD_MUTATIONS)(list(choose([REQUEST, POST])))
            frames += headers(target, fields, enc, end_stream=choose([True, False]), pieces=choose([1] * 6 + [2, 3, 9, 10]),
                              padded=choose([False, False, True]), priority=choose([None] * 6 + [0, target]))
            if target == sid:
                last, sid = sid, sid + 2
        elif act == "data":
            for _ in range(choose([1, 1, 2])):
                frames.append(data(last if pick != "zero" else 0, choose(PAYLOADS), end_stream=choose([True, False]),
                                   padded=choose([False, False, True])))
        elif act == "trailers":
            frames += headers(last, choose(TRAILER_FIELDS), enc, end_stream=choose([True, True, False]))
        elif act == "rst":
            frames.append(RstStreamFrame(target, error_code=choose([0, 1, 8])).serialize() if target else raw(3, 0, 0, b"\0\0\0\x08"))
        elif act == "priority":
            frames.append(raw(2, 0, target, (choose([0, target, last]) | choose([0, 1 << 31])).to_bytes(4, "big") + b"\x0f"))
        elif act == "window":
            frames.append(raw(8, 0, choose([0, last]), choose([0, 1, 2**31 - 1]).to_bytes(4, "big")))
        elif act == "ping":
            frames.append(raw(6, choose([0, 1]), choose([0, 0, 1]), choose([b"12345678", b"1234"])))
        elif act == "settings":
            frames.append(choose([SettingsFrame(0, settings={4: 2**31 - 1}).serialize(), raw(4, 1, 0), raw(4, 1, 0, b"\0\4\0\0\0\1"),
                                  SettingsFrame(0, settings={5: 1 << 24}).serialize(), raw(4, 0, 1, b"")]))
        elif act == "goaway":
            frames.append(GoAwayFrame(0, last_stream_id=choose([0, 0, 0, last]), error_code=choose([0, 2])).serialize())
        elif act == "unknown":
            frames.append(raw(choose([0xA, 0xFA]), choose([0, 0xFF]), choose([0, last]), b"xyz"))
        elif act == "push":
            frames.append(raw(5, 4, last, b"\0\0\0\2" + enc.encode(REQUEST)))
        elif act == "raw-hpack":
            frames.append(raw(1, 5, target, choose([bytes([0x80 | 120]), b"\x3f\xe1\xff\x03", b"\x00\x01", b"\x82\x87"])))
        else:  # flood
            one = choose([PingFrame(0, opaque_data=b"12345678").serialize(), SettingsFrame(0).serialize(), data(last, b""),
                          data(last, b"x"), raw(2, 0, 3, b"\0\0\0\0\x0f"), raw(0xFA, 0, 0, b"")])
            frames += [one] * choose(FLOOD_SIZES)
    return frames
