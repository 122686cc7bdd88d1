"""The HTTP/2 codec interface of :mod:`intercept.routing.h2codec`, over libnghttp2 (``ngh2``).

``ngh2`` (PyPI, MIT) wraps libnghttp2 — the HTTP/2 engine of curl, nginx's test
tools and Apache httpd — in a sans-IO API much like h2's, with the engine in C. It is
optional (``pip install 'intercept[h2fast]'``) and chosen with
``INTERCEPT_H2_CODEC=ngh2``; it is young (alpha), so python-hyper h2 stays the default.

What differs from h2, and how this class hides it:

- A request's stream exists in the engine only once its HEADERS are serialized, and
  data is queued by the engine until windows allow: output is taken from the engine
  after each command (:attr:`_out`), and :meth:`window` subtracts what is queued.
- The engine checks requests as RFC 9113 says and resets a malformed stream itself: a
  stream it closes with an error after its request was reported is reported as
  :class:`Reset` (CANCEL). It leaves out one rule, ``host`` against ``:authority``
  (:func:`~intercept.routing.h2.authority_mismatch`), applied here.
- Floods are counted, and the frame rules it leaves out applied, before the engine reads
  the frames (:class:`~intercept.routing.h2.Intake`), as for the h2 codec; the engine's own
  limits (unread acknowledgements) stop it too, and the GOAWAY is then written here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ngh2

from intercept.routing import h2codec
from intercept.routing.h2 import CANCEL, ENHANCE_YOUR_CALM, NO_ERROR, PROTOCOL_ERROR, Intake, authority_mismatch, goaway
from intercept.routing.h2codec import CodecError, Data, GoAway, Headers, Reset, Settings, StreamError, WindowOpened

_SETTINGS = {
    ngh2.Setting.MAX_CONCURRENT_STREAMS: h2codec.MAX_CONCURRENT_STREAMS,
    ngh2.Setting.MAX_HEADER_LIST_SIZE: h2codec.MAX_HEADER_LIST,
    ngh2.Setting.INITIAL_WINDOW_SIZE: h2codec.STREAM_WINDOW,
    ngh2.Setting.MAX_FRAME_SIZE: h2codec.MAX_FRAME,
}


class NgCodec:
    """:class:`intercept.routing.h2codec.Codec`'s interface over ngh2 (libnghttp2)."""

    def __init__(self, client: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.intake = None if client else Intake(clock, h2codec.MAX_FRAME, h2codec.MAX_HEADER_COUNT)
        self._reported: set[int] = set()  # server: streams whose request was reported and that are not closed
        self._ending: set[int] = set()  # server: streams reset by the client or the agent, until closed
        config = ngh2.Configuration(
            auto_window_update=False,
            max_inbound_header_list_size=h2codec.MAX_HEADER_LIST,
            max_inbound_header_count=h2codec.MAX_HEADER_COUNT,
            stream_reset_rate_limit=(100_000, 1000),  # far above Intake's (ENHANCE_YOUR_CALM)
        )
        self.conn = ngh2.Connection(ngh2.Role.CLIENT if client else ngh2.Role.SERVER, config)
        self.remote_max_streams = 100
        self.settings_seen = False
        self._out = b""
        self._responded: set[int] = set()
        self._dead = False

    def start(self, upgrade_settings: bytes | None = None) -> None:
        settings = dict(_SETTINGS)
        if self.client:
            settings[ngh2.Setting.ENABLE_PUSH] = 0
        try:
            if upgrade_settings is not None:
                import base64

                self.conn.initiate_upgrade(base64.urlsafe_b64decode(upgrade_settings), local_settings=settings)
                self._responded.discard(1)
                self._reported.add(1)  # the upgraded request
                self.intake.highest = 1  # (its stream is open)
            else:
                self.conn.initiate_connection(settings)
        except ngh2.NGH2Error as e:
            raise CodecError(PROTOCOL_ERROR, f"bad HTTP2-Settings: {e}") from None
        self.conn.set_local_window_size(h2codec.SHARED_CONNECTION_WINDOW if self.client else h2codec.CONNECTION_WINDOW)
        self._take()

    def _take(self) -> None:
        if not self._dead:
            self._out += self.conn.data_to_send()

    def receive(self, data: bytes) -> list:
        if self._dead:
            return []
        intake = self.intake
        if intake is not None:
            if not self.conn.want_read:  # the client sent GOAWAY and has no stream left
                self._dead = True
                raise CodecError(NO_ERROR, "the client sent GOAWAY and has no stream left")
            data = intake.feed(data)
            if intake.code is not None:
                self._end(intake.code, intake.reason)
        conn = self.conn
        try:
            conn.receive_data(data)
            raw = conn.events()
            self._out += conn.data_to_send()
            raw += conn.events()
        except ngh2.DenialOfServiceError as e:
            self._die(ENHANCE_YOUR_CALM)
            raise CodecError(ENHANCE_YOUR_CALM, str(e)) from None
        except ngh2.NGH2Error as e:
            self._die(PROTOCOL_ERROR)
            raise CodecError(PROTOCOL_ERROR, str(e)) from None
        out: list = []
        append = out.append
        opened: set[int] = set()  # streams (0: the connection) reported WindowOpened in this read
        for ev in raw:
            t = type(ev)
            if t is ngh2.DataReceived:
                append(Data(ev.stream_id, ev.data, len(ev.data), ev.end_stream))
            elif t is ngh2.RequestReceived:
                headers = list(ev.headers)
                if authority_mismatch(headers):
                    self.reset(ev.stream_id, PROTOCOL_ERROR)
                    self._refused()
                    continue
                self._reported.add(ev.stream_id)
                append(Headers(ev.stream_id, headers, ev.end_stream, Headers.REQUEST))
            elif t is ngh2.ResponseReceived:
                append(Headers(ev.stream_id, list(ev.headers), ev.end_stream, Headers.RESPONSE))
            elif t is ngh2.TrailersReceived:
                append(Headers(ev.stream_id, list(ev.headers), True, Headers.TRAILERS))
            elif t is ngh2.WindowUpdated:
                if ev.stream_id not in opened:  # once a read, as the h2 codec
                    opened.add(ev.stream_id)
                    append(WindowOpened(ev.stream_id))
            elif t is ngh2.StreamReset:
                if self.intake is not None:
                    # a stream that is over, or was refused unreported, the engine still reports:
                    # its StreamClosed (if any) counts it
                    if ev.stream_id not in self._reported:
                        continue
                    self._reported.discard(ev.stream_id)
                    self._ending.add(ev.stream_id)
                    if ev.stream_id in self._responded:
                        self._responded.discard(ev.stream_id)
                    else:
                        self._refused()
                append(Reset(ev.stream_id, ev.error_code))
            elif t is ngh2.StreamClosed and self.intake is not None:
                if ev.stream_id in self._ending:  # the client's reset, or ours
                    self._ending.discard(ev.stream_id)
                elif ev.error_code:  # the engine refused it (malformed)
                    self._refused()
                    if ev.stream_id in self._reported:
                        append(Reset(ev.stream_id, CANCEL))
                self._reported.discard(ev.stream_id)
            elif t is ngh2.InformationalResponseReceived:
                append(Headers(ev.stream_id, list(ev.headers), False, Headers.INFORMATIONAL))
            elif t is ngh2.SettingsReceived:
                self.settings_seen = True
                value = ev.settings.get(ngh2.Setting.MAX_CONCURRENT_STREAMS)
                if value is not None:
                    self.remote_max_streams = value
                append(Settings(self.remote_max_streams))
                if ngh2.Setting.INITIAL_WINDOW_SIZE in ev.settings and 0 not in opened:
                    opened.add(0)
                    append(WindowOpened(0))
            elif t is ngh2.GoAwayReceived:
                append(GoAway(ev.last_stream_id, ev.error_code))
            elif t is ngh2.ConnectionClosed:
                # a protocol error, or a GOAWAY and no stream left (NO_ERROR)
                if ev.error_code:
                    self._dead = True
                    raise CodecError(ev.error_code, (ev.debug_data or b"").decode("utf-8", "replace") or "connection error")
                if self.client:
                    self._dead = True  # (a server's next read ends the connection: receive)
        return out

    def _refused(self) -> None:
        """A stream reset before its answer began, or refused as malformed: counted."""
        if not self.intake.reset():
            self._end(ENHANCE_YOUR_CALM, self.intake.reason)

    def _end(self, code: int, reason: str) -> None:
        """End the connection with GOAWAY ``code`` (raises :class:`CodecError`)."""
        self.goaway(code)
        self._take()
        self._dead = True
        raise CodecError(code, reason)

    def _die(self, code: int) -> None:
        """The engine stopped without a word: say GOAWAY ourselves."""
        self._dead = True
        self._out += goaway(0, code)

    def pending(self) -> bytes:
        self._take()
        out, self._out = self._out, b""
        return out

    # -- commands ----------------------------------------------------------------------

    def open_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> int:
        try:
            sid = self.conn.send_request(headers, end_stream=end_stream)
        except ngh2.NGH2Error as e:
            raise StreamError(str(e)) from None
        self._take()  # the stream exists in the engine once its HEADERS are out
        return sid

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        conn = self.conn
        try:
            if self.client or stream_id in self._responded:
                conn.send_trailers(stream_id, headers)
            elif headers and headers[0][1][:1] == b"1" and headers[0][0] == b":status":
                conn.send_informational_response(stream_id, headers)
            else:
                self._responded.add(stream_id)
                conn.send_response(stream_id, headers, end_stream=end_stream)
                if end_stream:
                    self._responded.discard(stream_id)
        except ngh2.NGH2Error as e:
            raise StreamError(str(e)) from None
        self._take()

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        try:
            self.conn.send_data(stream_id, data, end_stream=end_stream)
        except ngh2.NGH2Error as e:
            raise StreamError(str(e)) from None
        if end_stream:
            self._responded.discard(stream_id)

    def end_stream(self, stream_id: int) -> None:
        try:
            self.conn.end_stream(stream_id)
        except ngh2.NGH2Error as e:
            raise StreamError(str(e)) from None
        self._responded.discard(stream_id)

    def reset(self, stream_id: int, code: int) -> None:
        self._responded.discard(stream_id)
        self._reported.discard(stream_id)
        if self.intake is not None:
            self._ending.add(stream_id)
        try:
            self.conn.reset_stream(stream_id, code)
        except ngh2.NGH2Error:
            pass

    def ack(self, stream_id: int, n: int) -> None:
        if n and not self._dead:
            try:
                self.conn.acknowledge_received_data(n, stream_id)
            except ngh2.NGH2Error:
                pass

    def window(self, stream_id: int) -> int:
        conn = self.conn
        try:
            return min(conn.stream_remote_window_size(stream_id) - conn.queued_body_size(stream_id),
                       conn.remote_window_size - conn.queued_body_size())
        except ngh2.NGH2Error:
            return 0

    max_frame = 1 << 20  # the engine cuts DATA frames to the peer's limit itself

    def goaway(self, code: int = 0, last_stream_id: int | None = None) -> None:
        if self._dead:
            return
        try:
            self.conn.terminate_connection(code, last_stream_id=last_stream_id)
        except ngh2.NGH2Error:
            self._die(code)
