"""The sans-IO HTTP/2 routing facts (intercept.routing.h2): fast unit tests."""

from __future__ import annotations

import base64

from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame

from intercept.routing.h2 import (
    PREFACE,
    FrameScanner,
    RateLimit,
    RelayConversion,
    begins_h2,
    error_response,
    grpc_message,
    h2c_upgrade_settings,
    request_view,
    upgraded_request,
)
from intercept.routing.http1 import parse_request_head
from intercept.routing.match import Route, RouteTable, parse_rule


def test_begins_h2_needs_the_preface_request_line():
    assert begins_h2(PREFACE)
    assert begins_h2(b"PRI * HTTP/2.0\r\n\r\nXX")
    assert not begins_h2(b"PRI * HTTP/2.0\r")
    assert not begins_h2(b"GET / HTTP/1.1\r\n")


def test_request_view_gives_the_route_table_what_http1_gives_it():
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/api/x?y=1"), (b":authority", b"orders:8080"),
               (b"x-dev", b"alice"), (b"baggage", b"dev=alice"), (b"x-dev", b"bob")]
    method, target, view = request_view(headers)
    assert (method, target) == (b"POST", b"/api/x?y=1")
    assert view == [(b"host", b"orders:8080"), (b"x-dev", b"alice"), (b"baggage", b"dev=alice"), (b"x-dev", b"bob")]
    table = RouteTable()
    table.add("s1", "alice", Route(frozenset({parse_rule("path-prefix", "/api"), parse_rule("header", "host=orders:8080")})))
    assert table.match(method, target, view) is not None
    assert table.match(*request_view([(b":method", b"GET"), (b":path", b"/web")])) is None


def test_h2c_upgrade_is_recognised_and_becomes_stream_1():
    settings = base64.urlsafe_b64encode(SettingsFrame(0, settings={4: 65535}).serialize_body()).rstrip(b"=")
    raw = (b"GET /p?q HTTP/1.1\r\nHost: h:1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: " + settings + b"\r\nx-dev: alice\r\nTE: trailers\r\n\r\n")
    head = parse_request_head(raw)
    assert h2c_upgrade_settings(head) is not None
    assert upgraded_request(head) == [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"h:1"), (b":path", b"/p?q"),
                                      (b"x-dev", b"alice"), (b"te", b"trailers")]
    websocket = parse_request_head(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert h2c_upgrade_settings(websocket) is None
    no_settings = parse_request_head(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert h2c_upgrade_settings(no_settings) is None


def test_grpc_errors_are_trailers_only_and_others_are_502():
    headers, body = error_response(True, "intercept of pete failed: 100% down é")
    assert body == b"" and (b"grpc-status", b"14") in headers
    assert dict(headers)[b"grpc-message"] == b"intercept of pete failed: 100%25 down %C3%A9"
    headers, body = error_response(False, "intercept of pete failed")
    assert dict(headers)[b":status"] == b"502" and body == b"intercept of pete failed\n"
    assert grpc_message("plain") == b"plain"


def test_rate_limit_allows_a_burst_then_its_rate():
    limit = RateLimit(burst=3, rate=1)
    assert [limit.spend(0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.spend(2.0)  # two seconds refilled two tokens, one was owed


def frames_client(*frames: bytes) -> bytes:
    return PREFACE + b"".join(frames)


def test_frame_scanner_finds_boundaries_however_the_bytes_are_split():
    data = SettingsFrame(0).serialize() + HeadersFrame(1, data=b"h", flags={"END_HEADERS"}).serialize() + DataFrame(1, b"x" * 50, flags={"END_STREAM"}).serialize()
    whole = FrameScanner({}, 1)
    out, boundary = whole.feed(data)
    assert out == data and boundary == len(data) and whole.at_boundary
    for cut in range(1, len(data)):
        scanner = FrameScanner({}, 1)
        scanner.feed(data[:cut])
        scanner.feed(data[cut:])
        assert scanner.at_boundary, cut


def test_frame_scanner_never_offers_a_boundary_inside_a_header_block():
    scanner = FrameScanner({}, 1)
    scanner.feed(SettingsFrame(0).serialize())
    assert scanner.at_boundary
    _, boundary = scanner.feed(HeadersFrame(1, data=b"h").serialize())  # no END_HEADERS: CONTINUATION must follow
    assert boundary == -1 and not scanner.at_boundary


def test_relay_conversion_waits_for_the_ping_ack_and_every_stream():
    conv = RelayConversion()
    conv.client.feed(frames_client(SettingsFrame(0).serialize(), HeadersFrame(1, data=b"h", flags={"END_HEADERS", "END_STREAM"}).serialize()))
    conv.server.feed(SettingsFrame(0).serialize())
    notice = conv.notice()
    assert GoAwayFrame in {type(f) for f in parse(notice)}
    assert not conv.done
    ack = PingFrame(0, opaque_data=conv.ping, flags={"ACK"}).serialize()
    other = PingFrame(0, opaque_data=b"12345678", flags={"ACK"}).serialize()
    out, _ = conv.client.feed(other + ack[:5])  # the agent's ACK is held until whole, then dropped
    assert out == other
    out, _ = conv.client.feed(ack[5:])
    assert out == b"" and conv.client.ping_acked
    assert not conv.done  # stream 1 is still open: its response has not ended
    conv.server.feed(HeadersFrame(1, data=b"r", flags={"END_HEADERS", "END_STREAM"}).serialize())
    assert conv.done
    assert parse(conv.farewell())[0].last_stream_id == 1


def parse(data: bytes) -> list:
    from hyperframe.frame import Frame

    frames = []
    while data:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(f)
        data = data[9 + length :]
    return frames
