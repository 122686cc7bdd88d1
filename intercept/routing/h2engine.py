"""python-hyper h2 as the HTTP/2 engine of :class:`intercept.routing.h2codec.Codec`.

:class:`Connection` is h2's connection with a GOAWAY received as RFC 9113 means it.
:class:`ServerConnection` is h2 as the agent's server side, adapted frame by frame to do
what libnghttp2 does (the other codec, :mod:`intercept.routing.ngh2codec`) wherever RFC
9113 lets implementations differ, so that a client gets one behaviour from the agent,
whichever codec runs: ``tests/test_h2_diff.py`` compares them.
"""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hpack
import hpack.hpack
from hyperframe.frame import HeadersFrame, RstStreamFrame, WindowUpdateFrame

# What this module overrides or calls of h2's and hpack's private internals, by owner: the
# versions pyproject.toml pins have them all; another version may not, or not mean the same.
REQUIRED = "h2>=4.4.1,<4.5 hpack>=4.2,<4.3"
INTERNALS = {
    h2.connection.H2Connection: ("_receive_headers_frame", "_receive_goaway_frame", "_begin_new_stream",
                                 "_receive_data_frame", "_handle_data_on_closed_stream", "_receive_priority_frame",
                                 "_receive_window_update_frame", "_receive_settings_frame", "_receive_rst_stream_frame",
                                 "receive_data", "open_inbound_streams"),
    h2.connection: ("_decode_headers",),
    h2.errors: ("_error_code_from_int",),
    h2.frame_buffer.FrameBuffer: ("__next__", "_update_header_buffer"),
    h2.stream.H2Stream: ("_initialize_content_length", "_track_content_length"),
    hpack.Decoder: ("_decode_indexed", "_decode_literal"),
    hpack.hpack: ("decode_integer",),
}


def check_internals() -> None:
    """Raise ImportError, naming the versions to install, if an internal this module
    relies on is missing from the installed h2 or hpack."""
    missing = [f"{getattr(owner, '__qualname__', None) or owner.__name__}.{name}"
               for owner, names in INTERNALS.items() for name in names if not hasattr(owner, name)]
    if missing:
        install = " ".join(f"'{r}'" for r in REQUIRED.split())
        raise ImportError(f"intercept's HTTP/2 engine needs {REQUIRED} (installed: h2 {h2.__version__}, hpack "
                          f"{hpack.__version__}, without {', '.join(missing)}): pip install {install}")


check_internals()

from h2.connection import _decode_headers  # noqa: E402 (checked above)
from hpack.hpack import decode_integer  # noqa: E402

from intercept.routing.h2 import (
    FLOW_CONTROL_ERROR,
    FieldRules,
    MAX_STREAM_ID,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
    malformed_request,
)


class Connection(h2.connection.H2Connection):
    """h2's connection, with GOAWAY received as the specification means it.

    h2 closes the whole connection when a GOAWAY arrives (its state machine goes to
    CLOSED, refuses every later frame and drops unsent output), so streams in flight
    could never finish. RFC 9113 section 6.8: streams up to the last stream id go on.
    Here a GOAWAY only reports :class:`h2.events.ConnectionTerminated`; the proxy stops
    opening streams on the connection and closes it once they have ended.
    """

    def _receive_headers_frame(self, frame):  # type: ignore[no-untyped-def]
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.ProtocolError as e:
            _compression_error(e)
            raise

    def _receive_goaway_frame(self, frame):  # type: ignore[no-untyped-def]
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def _compression_error(e: h2.exceptions.ProtocolError) -> None:
    """RFC 9113 4.3: a field block that cannot be decoded is a COMPRESSION_ERROR (h2 says
    PROTOCOL_ERROR)."""
    if type(e) is h2.exceptions.ProtocolError and str(e).startswith("Error decoding header block"):
        e.error_code = h2.errors.ErrorCodes.COMPRESSION_ERROR


class Refused(h2.events.Event):
    """A client's stream refused as malformed (RST_STREAM PROTOCOL_ERROR sent);
    ``reported``: its request had been reported."""

    def __init__(self, stream_id: int, reported: bool) -> None:
        self.stream_id, self.reported = stream_id, reported


def _connection_error(code: int, reason: str) -> h2.exceptions.ProtocolError:
    error = h2.exceptions.ProtocolError(reason)
    error.error_code = h2.errors.ErrorCodes(code)
    return error


class Closing:
    """A stream refused in the current read: whether the client had ended it, and its
    send window (which libnghttp2 still keeps up to date until the RST_STREAM is written)."""

    __slots__ = ("ended", "window")

    def __init__(self, ended: bool, window: int) -> None:
        self.ended, self.window = ended, window


class ServerConnection(Connection):
    """h2 as a server that behaves as libnghttp2 does, frame by frame, where RFC 9113 lets
    implementations differ.

    h2's own checks of requests are off: a request or trailers that
    :class:`~intercept.routing.h2.FieldRules` (as the fields are decoded) or
    ``malformed_request`` refuses, a
    body that disagrees with its ``content-length``, trailers without END_STREAM, end their
    stream (RST_STREAM PROTOCOL_ERROR, reported as :class:`Refused`) as the frame is read,
    before the frames after it. A header block on a closed stream is ignored (RFC 9113
    section 5.1.1 would end the connection for one that a higher stream closed: a client
    may not know yet that its stream is closed), and so is DATA (section 5.1: "MAY"); on
    a stream the client ended and the agent has not answered yet, either ends the
    connection (STREAM_CLOSED). HEADERS on an even stream is refused before its block is
    decoded. A stream that depends on itself is not an error (RFC 9113 deprecates those
    dependencies); a WINDOW_UPDATE past 2^31-1 on an open stream ends the connection
    (section 5.4.1 allows it).
    """

    def __init__(self, config: h2.config.H2Configuration, max_header_list_size: int, max_header_count: int) -> None:
        super().__init__(config)
        self.decoder = _Decoder(max_header_list_size, max_header_count)
        self.incoming_buffer.__class__ = _FrameBuffer
        self.incoming_buffer.check = self._check_headers_frame  # type: ignore[attr-defined]
        self.lengths: dict[int, list[int]] = {}  # [content-length (-1: none), bytes received] per open request
        self.client_last: int | None = None  # the last stream id of the client's GOAWAY, once it sent one
        # streams refused in this read: libnghttp2 holds a stream it resets until its
        # RST_STREAM is written, after the read
        self.closing: dict[int, Closing] = {}

    def receive_data(self, data):  # type: ignore[no-untyped-def]
        self.closing.clear()
        return super().receive_data(data)

    def _ended_by_client(self, stream_id: int) -> bool:
        """The client ended the stream, which the agent has not ended yet (half-closed remote)."""
        if stream_id in self.closing:
            return self.closing[stream_id].ended
        stream = self.streams.get(stream_id)
        return stream is not None and stream.state_machine.state is h2.stream.StreamState.HALF_CLOSED_REMOTE

    def _check_headers_frame(self, frame: HeadersFrame) -> None:
        """What libnghttp2 checks as a HEADERS frame arrives, before its block is complete."""
        if not frame.stream_id % 2:
            raise _connection_error(PROTOCOL_ERROR, f"HEADERS on stream {frame.stream_id}, which a client may not open")
        if self._ended_by_client(frame.stream_id):
            raise _connection_error(STREAM_CLOSED, f"HEADERS on stream {frame.stream_id} after its END_STREAM")
        if "PRIORITY" in frame.flags and frame.depends_on == frame.stream_id > self.highest_inbound_stream_id:
            raise _connection_error(PROTOCOL_ERROR, f"a new stream {frame.stream_id} depends on itself")

    def _begin_new_stream(self, stream_id, allowed_ids):  # type: ignore[no-untyped-def]
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _Stream
        return stream

    def _refuse(self, stream_id: int, reported: bool, ended: bool) -> Refused:
        """Reset a client's stream as malformed; ``ended``: the client's END_STREAM counts (as
        in libnghttp2, only once its header section was read whole, or its body)."""
        self.lengths.pop(stream_id, None)
        self.closing[stream_id] = Closing(ended, self.streams[stream_id].outbound_flow_control_window)
        self.reset_stream(stream_id, PROTOCOL_ERROR)
        return Refused(stream_id, reported)

    def _receive_headers_frame(self, frame):  # type: ignore[no-untyped-def]
        sid = frame.stream_id
        new = sid > self.highest_inbound_stream_id
        stream = self.streams.get(sid)
        refused = new and self.open_inbound_streams + len(self.closing) >= self.local_settings.max_concurrent_streams
        trailers = stream is not None and not stream.closed and sid not in self.closing
        self.decoder.start(None if refused or not (new or trailers) else trailers)
        if refused:
            # one stream more than the agent allows: refused on its own (RFC 9113 5.1.2), the
            # streams refused in this read still counted, as libnghttp2 counts them until written
            try:
                _decode_headers(self.decoder, frame.data)  # (the HPACK state goes on)
            except h2.exceptions.ProtocolError as e:
                _compression_error(e)
                raise
            self.highest_inbound_stream_id = sid
            return [RstStreamFrame(sid, error_code=REFUSED_STREAM)], []
        try:
            frames, events = super()._receive_headers_frame(frame)
        except h2.exceptions.StreamClosedError as e:
            if e._events:  # half-closed (remote): h2 has just reset it
                raise _connection_error(STREAM_CLOSED, f"HEADERS on stream {frame.stream_id} after its END_STREAM") from None
            return [], []
        except h2.exceptions.StreamIDTooLowError:
            return [], []
        except h2.exceptions.ProtocolError as e:
            if str(e) != "Trailers must have END_STREAM set":
                raise
            return [], [self._refuse(frame.stream_id, True, False)]
        end = "END_STREAM" in frame.flags
        out = []
        refused = None
        for ev in events:
            t = type(ev)
            if t is h2.events.RequestReceived:
                refused = self._check_request(ev, end)
            elif t is h2.events.TrailersReceived:
                refused = self._check_trailers(ev)
            elif t is h2.events.StreamEnded and refused:
                continue
            out.append(refused or ev)
        return frames, out

    def _check_request(self, ev: h2.events.RequestReceived, end: bool) -> Refused | None:
        """The stream refused, or None: its ``content-length``, if any, is then counted."""
        headers = ev.headers
        if self.decoder.malformed:  # (found as the fields were decoded)
            return self._refuse(ev.stream_id, False, False)
        if malformed_request(headers):
            return self._refuse(ev.stream_id, False, end)
        length = next((v for n, v in headers if n == b"content-length"), None)
        expected = -1 if length is None or (b":method", b"CONNECT") in headers else int(length)  # CONNECT: it means nothing
        if end:
            return self._refuse(ev.stream_id, False, True) if expected > 0 else None
        self.lengths[ev.stream_id] = [expected, 0]
        return None

    def _check_trailers(self, ev: h2.events.TrailersReceived) -> Refused | None:
        """The stream refused, or None. A ``content-length`` may come in the trailers (once)."""
        counted = self.lengths.pop(ev.stream_id, None) or [-1, 0]
        length = next((v for n, v in ev.headers if n == b"content-length"), None)
        if self.decoder.malformed or length is not None and counted[0] >= 0:
            return self._refuse(ev.stream_id, True, False)
        expected = int(length) if length is not None else counted[0]
        if expected >= 0 and expected != counted[1]:
            return self._refuse(ev.stream_id, True, True)
        return None

    def _receive_data_frame(self, frame):  # type: ignore[no-untyped-def]
        frames, events = super()._receive_data_frame(frame)
        counted = self.lengths.get(frame.stream_id)
        if counted is None:
            return frames, events
        out = []
        for ev in events:
            if type(ev) is h2.events.DataReceived:
                counted[1] += len(ev.data)
                end = ev.stream_ended is not None
                if end:
                    del self.lengths[frame.stream_id]
                if counted[0] >= 0 and (counted[1] > counted[0] or end and counted[1] != counted[0]):
                    self.acknowledge_received_data(ev.flow_controlled_length, frame.stream_id)  # never reported
                    return frames, [self._refuse(frame.stream_id, True, counted[1] <= counted[0])]
            out.append(ev)
        return frames, out

    def _handle_data_on_closed_stream(self, events, exc, frame):  # type: ignore[no-untyped-def]
        closing = self.closing.get(frame.stream_id)
        if exc._events or closing is not None and closing.ended:  # the client had ended the stream
            raise _connection_error(STREAM_CLOSED, f"DATA on stream {frame.stream_id} after its END_STREAM")
        frames, events = super()._handle_data_on_closed_stream(events, exc, frame)
        return [f for f in frames if not isinstance(f, RstStreamFrame)], events

    def _receive_priority_frame(self, frame):  # type: ignore[no-untyped-def]
        if frame.depends_on == frame.stream_id:  # (a new stream that does: _check_headers_frame)
            frame.depends_on = 0
        return super()._receive_priority_frame(frame)

    def _receive_window_update_frame(self, frame):  # type: ignore[no-untyped-def]
        sid, increment = frame.stream_id, frame.window_increment
        closing = self.closing.get(sid)
        stream = self.streams.get(sid) if sid else None
        if closing is not None or stream is not None and not stream.closed:
            if not increment:  # (on stream 0, hyperframe refuses it; on a stream, see _FrameBuffer)
                raise _connection_error(PROTOCOL_ERROR, f"a WINDOW_UPDATE of 0 on stream {sid}")
            window = closing.window if closing is not None else stream.outbound_flow_control_window
            if window + increment > 2**31 - 1:
                raise _connection_error(FLOW_CONTROL_ERROR, f"a WINDOW_UPDATE takes stream {sid}'s window past 2^31-1")
            if closing is not None:
                closing.window += increment
                return [], []
        elif sid and not increment:
            return [], []  # a stream that is over
        return super()._receive_window_update_frame(frame)

    def _receive_settings_frame(self, frame):  # type: ignore[no-untyped-def]
        window = frame.settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
        if window is not None:  # it changes the windows of the streams refused in this read too
            delta = window - self.remote_settings.initial_window_size
            for closing in self.closing.values():
                closing.window += delta
                if closing.window > 2**31 - 1:
                    raise _connection_error(FLOW_CONTROL_ERROR, "SETTINGS take a stream's window past 2^31-1")
        return super()._receive_settings_frame(frame)

    def _receive_rst_stream_frame(self, frame):  # type: ignore[no-untyped-def]
        self.lengths.pop(frame.stream_id, None)
        if self.closing.pop(frame.stream_id, None) is not None:
            # refused in this read, its RST_STREAM not written yet: the client's reset is
            # what its stream ends with, as in libnghttp2
            return [], [h2.events.StreamReset(stream_id=frame.stream_id, error_code=frame.error_code, remote_reset=True)]
        return super()._receive_rst_stream_frame(frame)

    def _receive_goaway_frame(self, frame):  # type: ignore[no-untyped-def]
        last = frame.last_stream_id = frame.last_stream_id & MAX_STREAM_ID
        if last % 2:  # the last stream of the agent's that the client took: never odd
            raise _connection_error(PROTOCOL_ERROR, f"GOAWAY names stream {last}, which the agent never opened")
        if self.client_last is not None and last > self.client_last:
            raise _connection_error(PROTOCOL_ERROR, "a GOAWAY names a later stream than the client's previous one")
        self.client_last = last
        return super()._receive_goaway_frame(frame)


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, which shows each HEADERS frame to ``check`` as it arrives (it
    would otherwise hold it until its block is complete), and passes on a WINDOW_UPDATE of
    0 on a stream (hyperframe would refuse it, and its reserved bit)."""

    check: Callable[[HeadersFrame], None]

    def __next__(self):  # type: ignore[no-untyped-def]
        data = self._data
        if len(data) >= 13 and data[3] == 8 and data[:3] == b"\0\0\x04":
            data[9] &= 0x7F  # the increment's reserved bit, to be ignored (RFC 9113 6.9), which hyperframe refuses
            sid = int.from_bytes(data[5:9], "big") & MAX_STREAM_ID
            if sid and not int.from_bytes(data[9:13], "big"):
                del data[:13]
                return self._update_header_buffer(WindowUpdateFrame(sid)) or self.__next__()
        return super().__next__()

    def _update_header_buffer(self, f):  # type: ignore[no-untyped-def]
        if isinstance(f, HeadersFrame) and not self._headers_buffer:
            self.check(f)
        return super()._update_header_buffer(f)


class _Decoder(hpack.Decoder):
    """HPACK as libnghttp2 decodes a client's header block (after :meth:`start`).

    A name or value whose length says more than 64 KiB is a COMPRESSION_ERROR as soon as
    that length is read. Each field is checked as it is decoded (:class:`FieldRules`):
    those after the first malformed one (the stream is then refused) are decoded for the
    HPACK state only, as are those of a block that is ignored. Every field is counted,
    whatever block it is in: more than ``max_header_count`` fields in one block are an
    ENHANCE_YOUR_CALM (``Intake`` counts them from the bytes before this decoder runs;
    this bounds the decoder on its own too), and so are more than
    ``max_header_list_size`` bytes (RFC 9113's count: 32 more per field) of the fields a
    request or trailers keep. The fields of an ignored block, or after a malformed one,
    are not kept, and libnghttp2 does not size them: their count bounds what they cost.
    """

    def __init__(self, max_header_list_size: int, max_header_count: int) -> None:
        super().__init__()
        self.max_header_list_size = 2**63  # counted here instead
        self.list_limit, self.count_limit = max_header_list_size, max_header_count
        self.rules: FieldRules | None = None
        self.malformed: str | None = None  # why the last block's fields are malformed
        self.size = self.count = 0

    def start(self, trailers: bool | None) -> None:
        """A block begins: a request's (``trailers`` False), trailers, or one that is ignored (None)."""
        self.rules = None if trailers is None else FieldRules(trailers)
        self.malformed = None
        self.size = self.count = 0

    def _field(self, header):  # type: ignore[no-untyped-def]
        self.count += 1
        if self.count > self.count_limit:
            raise hpack.OversizedHeaderListError(f"a header block of more than {self.count_limit} fields")
        rules = self.rules
        if rules is None:
            return
        self.malformed = rules.check(header[0], header[1])
        if self.malformed is not None:
            self.rules = None
            return
        self.size += 32 + len(header[0]) + len(header[1])
        if self.size > self.list_limit:
            raise hpack.OversizedHeaderListError(f"a header list of more than {self.list_limit} bytes")

    def _decode_indexed(self, data):  # type: ignore[no-untyped-def]
        header, consumed = super()._decode_indexed(data)
        self._field(header)
        return header, consumed

    def _decode_literal(self, data, should_index):  # type: ignore[no-untyped-def]
        view = memoryview(data)
        prefix = 6 if should_index else 4
        if view[0] & ((1 << prefix) - 1):  # the name is an index
            pos = decode_integer(view, prefix)[1]
        else:
            length, used = decode_integer(view[1:], 7)
            if length > 1 << 16:
                raise hpack.HPACKDecodingError("a header name longer than 64 KiB")
            pos = 1 + used + length
        if decode_integer(view[pos:], 7)[0] > 1 << 16:
            raise hpack.HPACKDecodingError("a header value longer than 64 KiB")
        header, consumed = super()._decode_literal(data, should_index)
        self._field(header)
        return header, consumed


class _Stream(h2.stream.H2Stream):
    """A stream whose ``content-length`` the codec checks itself (a mismatch ends the
    stream, not the connection, as RFC 9113 section 8.1.1 says)."""

    def _initialize_content_length(self, headers):  # type: ignore[no-untyped-def]
        pass

    def _track_content_length(self, length, end_stream):  # type: ignore[no-untyped-def]
        pass
