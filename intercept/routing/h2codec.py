"""The HTTP/2 codec behind the agent's HTTP/2 path, as one small sans-IO interface.

The proxy (:mod:`intercept.agent.h2proxy`) speaks to a :class:`Codec` only: bytes in
(:meth:`Codec.receive`), a short list of the events below out, commands in, bytes out
(:meth:`Codec.pending`). One implementation is here, over python-hyper ``h2`` (the
reference: strict and well kept, pure Python, slow); another codec can replace it by
offering the same methods and events.

Events (plain slotted classes, built once per frame that matters):

- :class:`Headers` a request, a response, an informational response or trailers;
- :class:`Data` payload and its flow-controlled length (padding included);
- :class:`Reset` RST_STREAM from the peer;
- :class:`WindowOpened` the peer gave send window back (``stream_id`` 0: the connection,
  or every stream's); at most once per stream in one :meth:`Codec.receive`;
- :class:`Settings` the peer's SETTINGS arrived (its first one ends its preface);
- :class:`GoAway` the peer will accept no stream above ``last_stream_id``.

Errors: :class:`CodecError` when the peer broke the protocol; the connection is then
over, and :meth:`Codec.pending` holds the GOAWAY with the code the specification names.

As a server (the client side of the agent) both codecs behave as one, which
``tests/test_h2_diff.py`` checks frame by frame (:mod:`intercept.routing.h2engine` adapts
h2): a request that RFC 9113 calls malformed
(:func:`~intercept.routing.h2.malformed_fields`, ``malformed_request``, a body that disagrees with
its ``content-length``) is refused with RST_STREAM PROTOCOL_ERROR and never reported, or,
if its headers were, reported as :class:`Reset` (``CANCEL``); floods are counted by
:class:`~intercept.routing.h2.Intake` before either codec reads a byte of them, and end
the connection with ENHANCE_YOUR_CALM. Where RFC 9113 lets an endpoint choose (a frame
on a closed stream, a stream error made a connection error), the h2 codec chooses as
libnghttp2 does.

Which codec: :func:`new_codec` gives this module's :class:`Codec` (python-hyper h2),
or, with ``INTERCEPT_H2_CODEC=ngh2`` and the optional ``ngh2`` package installed,
:class:`intercept.routing.ngh2codec.NgCodec` (libnghttp2), which offers the same methods.

Flow control contract: the codec never gives receive window back by itself. The proxy
calls :meth:`Codec.ack` for bytes once the next hop has taken them, so a slow receiver
slows its sender, and what the agent holds per stream is bounded by the window it
advertised.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from intercept.routing.h2 import CANCEL, ENHANCE_YOUR_CALM, NO_ERROR, PROTOCOL_ERROR, Intake, authority_mismatch
from intercept.routing.h2engine import Connection, Refused, ServerConnection

# What the agent advertises as a receiver: windows large enough for 8 MB messages to
# move at speed (the 64 KiB default would cost a round trip per 64 KiB), bounded so
# that what one connection can make the agent hold is bounded too.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 4 << 20
# As a client (toward the app or a developer's process) one connection carries the
# streams of many clients at once: its connection window is the largest there is, so
# that the bytes held for clients that read slowly never use up the window the others
# need. What the agent holds is bounded per stream (STREAM_WINDOW), per client
# connection (intercept.agent.h2proxy.HELD_LIMIT) and for all clients together
# (intercept.agent.h2proxy.AGENT_HELD_LIMIT) instead.
SHARED_CONNECTION_WINDOW = 2**31 - 1
MAX_FRAME = 1 << 16
MAX_HEADER_LIST = 64 << 10
MAX_HEADER_COUNT = 1024  # fields in one header section (libnghttp2's limit)
MAX_CONCURRENT_STREAMS = 256


class CodecError(Exception):
    """The peer broke HTTP/2; ``code`` is the GOAWAY error code sent back."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class StreamError(Exception):
    """A command about a stream that the codec cannot carry out (closed, or no room)."""


class Headers:
    __slots__ = ("stream_id", "headers", "end_stream", "kind")
    REQUEST, RESPONSE, INFORMATIONAL, TRAILERS = range(4)

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool, kind: int) -> None:
        self.stream_id, self.headers, self.end_stream, self.kind = stream_id, headers, end_stream, kind


class Data:
    __slots__ = ("stream_id", "data", "flow_length", "end_stream")

    def __init__(self, stream_id: int, data: bytes, flow_length: int, end_stream: bool) -> None:
        self.stream_id, self.data, self.flow_length, self.end_stream = stream_id, data, flow_length, end_stream


class Reset:
    __slots__ = ("stream_id", "code")

    def __init__(self, stream_id: int, code: int) -> None:
        self.stream_id, self.code = stream_id, code


class WindowOpened:
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class Settings:
    __slots__ = ("max_concurrent_streams",)

    def __init__(self, max_concurrent_streams: int) -> None:
        self.max_concurrent_streams = max_concurrent_streams


class GoAway:
    __slots__ = ("last_stream_id", "code")

    def __init__(self, last_stream_id: int, code: int) -> None:
        self.last_stream_id, self.code = last_stream_id, code


Event = Headers | Data | Reset | WindowOpened | Settings | GoAway


class Codec:
    """One end of one HTTP/2 connection (``client=True``: the agent opens the streams).

    Headers are lists of ``(bytes, bytes)``; names lowercase, as HTTP/2 sends them.
    Inbound headers are validated (a client's by RFC 9113's rules, see
    :mod:`intercept.routing.h2engine`; a server's by h2's); outbound ones are passed on as
    received from another validated connection, so they are not validated twice.
    """

    def __init__(self, client: bool, clock: Callable[[], float] = time.monotonic) -> None:
        config = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_inbound_headers=client,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.client = client
        self.conn = Connection(config) if client else ServerConnection(config, MAX_HEADER_LIST, MAX_HEADER_COUNT)
        self.intake = None if client else Intake(clock, MAX_FRAME, MAX_HEADER_COUNT)
        self._answered: set[int] = set()  # server: streams whose response has begun and not ended
        self._client_left: int | None = None  # server: the code of the client's GOAWAY
        self.conn.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                **({h2.settings.SettingCodes.ENABLE_PUSH: 0} if client else {}),
            },
        )
        if client:  # (a server's decoder counts as libnghttp2 does: ServerConnection)
            self.conn.decoder.max_header_list_size = MAX_HEADER_LIST
        # as large as advertised at once (peers send such frames before h2 has read their
        # SETTINGS acknowledgement); a client's frames are held to the spec by Intake
        self.conn.max_inbound_frame_size = MAX_FRAME
        self.remote_max_streams = 100  # until the peer's SETTINGS say otherwise (RFC 9113 recommends >= 100)
        self.settings_seen = False

    def start(self, upgrade_settings: bytes | None = None) -> None:
        """Queue our preface (SETTINGS and a larger connection window). A server switching
        from HTTP/1.1 passes the client's ``HTTP2-Settings``: stream 1 is then the
        upgraded request, already complete."""
        if upgrade_settings is not None:
            try:
                self.conn.initiate_upgrade_connection(upgrade_settings)
            except (h2.exceptions.ProtocolError, ValueError) as e:
                raise CodecError(h2.errors.ErrorCodes.PROTOCOL_ERROR, f"bad HTTP2-Settings: {e}") from None
            if self.intake is not None:
                self.intake.highest = 1  # the upgraded request's stream is open
        else:
            self.conn.initiate_connection()
        self.conn.increment_flow_control_window((SHARED_CONNECTION_WINDOW if self.client else CONNECTION_WINDOW) - 65535)

    def receive(self, data: bytes) -> list[Event]:
        intake = self.intake
        if intake is not None:
            if self._client_left is not None and not self.conn.open_inbound_streams:
                raise CodecError(NO_ERROR, "the client sent GOAWAY and has no stream left")
            data = intake.feed(data)
            if intake.code is not None:
                self._end(intake.code, intake.reason)
        try:
            raw = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            code = getattr(e, "error_code", None) or h2.errors.ErrorCodes.PROTOCOL_ERROR
            if self.conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                self.conn.close_connection(code)  # a bad preface is refused before h2 would say so
            raise CodecError(int(code), str(e) or type(e).__name__) from None
        out: list[Event] = []
        append = out.append
        opened: set[int] = set()  # streams (0: the connection) reported WindowOpened in this read
        refused: list[Refused] = []
        after_read = False  # a stream was refused after the read
        for ev in raw:
            t = type(ev)
            if t is h2.events.DataReceived:
                append(Data(ev.stream_id, ev.data, ev.flow_controlled_length, ev.stream_ended is not None))
            elif t is h2.events.RequestReceived:
                if intake is not None and authority_mismatch(ev.headers):  # checked after the read, as for ngh2
                    if ev.stream_id not in self.conn.closing:  # (not refused in the read already)
                        self.reset(ev.stream_id, PROTOCOL_ERROR)
                        self._count_reset()
                        after_read = True
                    continue
                append(Headers(ev.stream_id, ev.headers, ev.stream_ended is not None, Headers.REQUEST))
            elif t is h2.events.ResponseReceived:
                append(Headers(ev.stream_id, ev.headers, ev.stream_ended is not None, Headers.RESPONSE))
            elif t is h2.events.TrailersReceived:
                append(Headers(ev.stream_id, ev.headers, True, Headers.TRAILERS))
            elif t is h2.events.WindowUpdated:
                if ev.stream_id not in opened:  # once a read: each costs the proxy a pass over streams
                    opened.add(ev.stream_id)
                    append(WindowOpened(ev.stream_id))
            elif t is h2.events.StreamReset:
                if ev.remote_reset:
                    if ev.stream_id in self._answered:
                        self._answered.discard(ev.stream_id)
                    elif intake is not None:
                        self._count_reset()
                    append(Reset(ev.stream_id, int(ev.error_code)))
            elif t is Refused:
                refused.append(ev)
            elif t is h2.events.InformationalResponseReceived:
                append(Headers(ev.stream_id, ev.headers, False, Headers.INFORMATIONAL))
            elif t is h2.events.RemoteSettingsChanged:
                self.settings_seen = True
                changed = ev.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                if changed is not None:
                    self.remote_max_streams = changed.new_value
                append(Settings(self.remote_max_streams))
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings and 0 not in opened:
                    opened.add(0)
                    append(WindowOpened(0))
            elif t is h2.events.ConnectionTerminated:
                if intake is not None:  # the client leaves: its streams go on, then the connection is over
                    self._client_left = int(ev.error_code or 0)
                append(GoAway(ev.last_stream_id or 0, int(ev.error_code or 0)))
        # a refused stream ends, for the proxy, as the read ends, unless the client reset it in it
        for ev in refused:
            if ev.stream_id in self.conn.closing:
                if ev.reported:
                    append(Reset(ev.stream_id, CANCEL))
                self._count_reset()
        if (self._client_left and intake is not None and not self.conn.open_inbound_streams
                and not after_read):  # (a stream refused after the read counts until written, at the next)
            raise CodecError(self._client_left, f"the client sent GOAWAY with code {self._client_left}")
        return out

    def _count_reset(self) -> None:
        """A stream the client reset before its answer began, or one refused as malformed."""
        if not self.intake.reset():
            self._end(ENHANCE_YOUR_CALM, self.intake.reason)

    def _end(self, code: int, reason: str) -> None:
        """End the connection with GOAWAY ``code`` (raises :class:`CodecError`)."""
        if self.conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            self.conn.close_connection(code)
        raise CodecError(code, reason)

    def pending(self) -> bytes:
        return self.conn.data_to_send()

    # -- commands ----------------------------------------------------------------------

    def open_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> int:
        """Client: start a stream with ``headers``; returns its id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.send_headers(stream_id, headers, end_stream)
        return stream_id

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        if not self.client:
            if end_stream:
                self._answered.discard(stream_id)
            else:
                self._answered.add(stream_id)
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as e:
            raise StreamError(str(e) or type(e).__name__) from None

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send ``data`` (at most :meth:`window` and :attr:`max_frame` bytes)."""
        if end_stream:
            self._answered.discard(stream_id)
        try:
            self.conn.send_data(stream_id, data, end_stream=end_stream)
        except h2.exceptions.ProtocolError as e:
            raise StreamError(str(e) or type(e).__name__) from None

    def end_stream(self, stream_id: int) -> None:
        self._answered.discard(stream_id)
        try:
            self.conn.end_stream(stream_id)
        except h2.exceptions.ProtocolError as e:
            raise StreamError(str(e) or type(e).__name__) from None

    def reset(self, stream_id: int, code: int) -> None:
        self._answered.discard(stream_id)
        if not self.client:
            self.conn.lengths.pop(stream_id, None)
        try:
            self.conn.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            pass  # already closed: nothing to say

    def ack(self, stream_id: int, n: int) -> None:
        """The next hop took ``n`` flow-controlled bytes of ``stream_id``: give them back."""
        if n:
            self.conn.acknowledge_received_data(n, stream_id)

    def window(self, stream_id: int) -> int:
        """How many bytes :meth:`send_data` may send on ``stream_id`` now."""
        try:
            return self.conn.local_flow_control_window(stream_id)
        except h2.exceptions.ProtocolError:
            return 0

    @property
    def max_frame(self) -> int:
        return self.conn.max_outbound_frame_size

    def goaway(self, code: int = 0, last_stream_id: int | None = None) -> None:
        self.conn.close_connection(code, last_stream_id=last_stream_id)


def new_codec(client: bool, clock: Callable[[], float] = time.monotonic, kind: str | None = None) -> Codec:
    """A codec of the ``kind`` that ``INTERCEPT_H2_CODEC`` names (unless given): ``h2``
    (default) or ``ngh2``. ``clock`` times a server's flood limits."""
    if (kind or CODEC) == "ngh2":
        from intercept.routing.ngh2codec import NgCodec

        return NgCodec(client, clock)  # type: ignore[return-value]
    return Codec(client, clock)


CODEC = os.environ.get("INTERCEPT_H2_CODEC", "h2")
