"""Plain HTTP/2 through a real agent: curl (prior knowledge and Upgrade: h2c), malformed
frames built with hyperframe, and the relay that serves while no route could apply."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.apps import App
from tests.conftest import INTERCEPT, free_port, start_agent, start_client
from tests.grpc_apps import GrpcApp, app_of, channel
from tests.h2_app import H2App
from tests.h2_diff import parse

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def h2_cluster():
    app = H2App("cluster")
    yield app
    app.close()


@pytest.fixture(scope="module")
def h2_local():
    app = H2App("local")
    yield app
    app.close()


@pytest.fixture(scope="module")
def h2_agent(h2_cluster, h2_local, tmp_path_factory):
    agent = start_agent(tmp_path_factory.mktemp("agent"), h2_cluster.port)
    client = start_client(agent, h2_local.port, "--header", "x-dev=alice", "--name", "alice")
    yield agent
    client.stop()
    agent.proc.stop()


@pytest.fixture
def pure_h2_agent(h2_cluster, h2_local, tmp_path_factory):
    """:func:`h2_agent` on the pure-Python codec. The tests that use it keep the client's
    window at 0 and wait for an empty response's END_STREAM; libnghttp2 (ngh2, the default
    codec) defers even an empty DATA frame while the window is 0, so that end never comes
    there (a client must open its window to see it: RFC 9113 allows either)."""
    agent = start_agent(tmp_path_factory.mktemp("agent"), h2_cluster.port, env={"INTERCEPT_H2_CODEC": "h2"})
    client = start_client(agent, h2_local.port, "--header", "x-dev=alice", "--name", "alice")
    yield agent
    client.stop()
    agent.proc.stop()


def curl(*args: str) -> tuple[dict, str]:
    out = subprocess.run([CURL, "-sS", "--max-time", "30", "-w", "\n%{http_version}", *args],
                         capture_output=True, check=True, text=True).stdout
    body, _, version = out.rpartition("\n")
    return json.loads(body), version


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
@pytest.mark.parametrize("mode", ["--http2-prior-knowledge", "--http2"])
def test_curl_http2_is_routed_per_request(h2_agent, mode):
    url = f"http://127.0.0.1:{h2_agent.http_port}/some/path?q=1"
    got, version = curl(mode, url)
    assert (got["app"], got["path"], version) == ("cluster", "/some/path?q=1", "2")
    got, version = curl(mode, "-H", "x-dev: alice", "-H", "x-other: Kept As Sent", url)
    assert (got["app"], version) == ("local", "2")
    assert ["x-other", "Kept As Sent"] in got["headers"]
    assert [":authority", f"127.0.0.1:{h2_agent.http_port}"] in got["headers"]


FORWARDED = [("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=1.2.3.4"),  # the client's own entries first,
             ("x-forwarded-for", "127.0.0.1"), ("forwarded", "for=127.0.0.1")]  # then the peer the agent accepted


def forwarded_fields(got: dict) -> list[tuple[str, str]]:
    return [(k, v) for k, v in got["headers"] if k in ("x-forwarded-for", "forwarded")]


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
@pytest.mark.parametrize("mode", ["--http2-prior-knowledge", "--http2"])
@pytest.mark.parametrize("to", ["cluster", "local"])
def test_the_last_forwarded_entry_is_the_agents_as_on_http1(h2_agent, mode, to):
    dev = ["-H", "x-dev: alice"] if to == "local" else []
    got, version = curl(mode, "-H", "X-Forwarded-For: 1.2.3.4", "-H", "Forwarded: for=1.2.3.4", *dev,
                        f"http://127.0.0.1:{h2_agent.http_port}/")
    assert (got["app"], version, forwarded_fields(got)) == (to, "2", FORWARDED)


@pytest.fixture(scope="module", params=["h2", "ngh2"])
def codec_h2_agent(request, h2_cluster, h2_local, tmp_path_factory):
    """:func:`h2_agent` on each codec."""
    if request.param == "ngh2":
        pytest.importorskip("ngh2", reason="the ngh2 codec is not installed (pip install -e '.[test]')")
    agent = start_agent(tmp_path_factory.mktemp("agent"), h2_cluster.port, env={"INTERCEPT_H2_CODEC": request.param})
    client = start_client(agent, h2_local.port, "--header", "x-dev=alice", "--name", "alice")
    yield agent
    client.stop()
    agent.proc.stop()


def post_once(port: int, headers: list[tuple[str, str]], body: bytes) -> dict | int:
    """One POST on a connection of its own, from a client that does not retry (as curl
    does a refused stream): the JSON answer, or the RST_STREAM code it got instead."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/upload"), *headers])
    for i in range(0, len(body), 16384):  # (within the initial window)
        conn.send_data(1, body[i : i + 16384], end_stream=i + 16384 >= len(body))
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(conn.data_to_send())
        while True:
            data = s.recv(65536)
            assert data, "the agent closed the connection without an answer"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.StreamReset):
                    return ev.error_code
                if isinstance(ev, h2.events.DataReceived):
                    answer += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if isinstance(ev, h2.events.StreamEnded):
                    return json.loads(answer)
            s.sendall(conn.data_to_send())


@pytest.mark.parametrize("how", ["rst-stream", "goaway"])
@pytest.mark.parametrize("to", ["cluster", "local"])
def test_a_request_its_app_refused_unprocessed_is_sent_again_whole(codec_h2_agent, h2_cluster, h2_local, how, to, tmp_path):
    """RFC 9113 section 8.7: a stream refused with REFUSED_STREAM, or past a GOAWAY's last
    stream, was not processed; the agent sends it again (body included) instead of passing
    the refusal on to a client that may not retry it."""
    app = h2_cluster if to == "cluster" else h2_local
    token = f"{how}-{os.getpid()}-{tmp_path.name}"
    dev = [("x-dev", "alice")] if to == "local" else []
    got = post_once(codec_h2_agent.http_port, [("x-refuse", token), *dev], os.urandom(20000))
    assert token in app.refused  # it was refused once
    assert isinstance(got, dict), f"the client got RST_STREAM {got}"
    assert (got["app"], got["method"], got["body_length"]) == (to, "POST", 20000)


def test_every_stream_of_a_connection_gets_the_agents_forwarded_entry(h2_agent):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    asked = {}
    for dev in ([], [("x-dev", "alice")], []):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/"),
                                ("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=1.2.3.4"), *dev], end_stream=True)
        asked[sid] = "local" if dev else "cluster"
    bodies = {sid: b"" for sid in asked}
    with socket.create_connection(("127.0.0.1", h2_agent.http_port), timeout=30) as s:
        s.sendall(conn.data_to_send())
        ended = set()
        while ended != set(asked):
            for ev in conn.receive_data(s.recv(65536)):
                if isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if getattr(ev, "stream_ended", None) is not None or isinstance(ev, h2.events.StreamEnded):
                    ended.add(ev.stream_id)
            s.sendall(conn.data_to_send())
    for sid, to in asked.items():
        got = json.loads(bodies[sid])
        assert (got["app"], forwarded_fields(got)) == (to, FORWARDED)


# -- malformed HTTP/2 ---------------------------------------------------------------------

NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0, 1, 3, 5, 6, 8, 9, 11


def headers_frame(stream_id: int, encoder: hpack.Encoder, extra=(), flags=("END_HEADERS", "END_STREAM")) -> bytes:
    f = HeadersFrame(stream_id, flags=set(flags))
    f.data = encoder.encode([(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/"), *extra])
    return f.serialize()


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return n.to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def hpack_bomb() -> bytes:
    # one 4000-byte value put in the dynamic table, then referenced 20 times: 80 kB decoded
    literal = b"\x40" + b"\x01x" + b"\x7f" + hpack_int(4000 - 127) + b"b" * 4000
    indexed = bytes([0x80 | 62]) * 20
    f = HeadersFrame(1, flags={"END_HEADERS", "END_STREAM"})
    f.data = hpack.Encoder().encode([(":method", "GET"), (":scheme", "http"), (":path", "/")]) + literal + indexed
    return f.serialize()


def hpack_int(n: int) -> bytes:
    out = b""
    while n >= 128:
        out += bytes([n % 128 + 128])
        n //= 128
    return out + bytes([n])


def grpc_call(stream_id: int, encoder: hpack.Encoder) -> bytes:
    """A complete unary gRPC call on ``stream_id``: HEADERS, then a message with END_STREAM."""
    f = HeadersFrame(stream_id, flags={"END_HEADERS"})
    f.data = encoder.encode([(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/test.Echo/Unary"),
                             ("content-type", "application/grpc"), ("te", "trailers")])
    return f.serialize() + DataFrame(stream_id, b"\x00\x00\x00\x00\x02hi", flags={"END_STREAM"}).serialize()


def case_frames(name: str) -> tuple[bytes, bytes]:
    """(bytes to send first, bytes to send once the first response has ended); each case
    has its own HPACK encoder, as a connection would."""
    enc = hpack.Encoder()
    if name == "bad-preface-after-the-first-bytes":
        return b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", b""
    if name == "data-on-an-idle-stream":
        return DataFrame(1, b"x").serialize(), b""
    if name == "data-on-a-closed-stream":  # then a PING: an endpoint may also ignore the frame (RFC 9113 5.1)
        return grpc_call(1, enc), DataFrame(1, b"late").serialize() + PingFrame(0, opaque_data=b"closed?!").serialize()
    if name == "headers-on-an-even-stream":
        return headers_frame(2, enc), b""
    if name == "oversized-header-list":  # frames within the default 16 KiB, our SETTINGS may not be acked yet
        block = enc.encode([(":method", "GET"), (":path", "/"), ("x-big", "v" * 100_000)])
        pieces = [block[i : i + 16000] for i in range(0, len(block), 16000)]
        return (HeadersFrame(1, data=pieces[0]).serialize()
                + b"".join(ContinuationFrame(1, data=p).serialize() for p in pieces[1:-1])
                + ContinuationFrame(1, data=pieces[-1], flags={"END_HEADERS"}).serialize()), b""
    if name == "hpack-bomb":
        return hpack_bomb(), b""
    if name == "invalid-hpack-index":
        return raw_frame(1, 0x5, 1, bytes([0x80 | 120])), b""
    if name == "frame-larger-than-allowed":
        return raw_frame(0, 0, 1, b"", length=100_000) + b"x" * 100_000, b""
    if name == "window-overflow":
        return WindowUpdateFrame(0, window_increment=2**31 - 1).serialize() * 2, b""
    if name == "continuation-without-headers":
        return ContinuationFrame(1, data=b"", flags={"END_HEADERS"}).serialize(), b""
    if name == "continuation-flood":
        return HeadersFrame(1, data=enc.encode([(":method", "GET")])).serialize() + ContinuationFrame(1, data=b"").serialize() * 200, b""
    if name == "settings-flood":
        return SettingsFrame(0, settings={4: 65535}).serialize() * 3000, b""
    if name == "ping-flood":
        return b"".join(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(3000)), b""
    if name == "rapid-reset":
        return b"".join(headers_frame(2 * i + 1, enc, flags=("END_HEADERS",)) + RstStreamFrame(2 * i + 1, error_code=8).serialize()
                        for i in range(3000)), b""
    if name == "host-differs-from-authority":  # a route on host must see what the app acts on
        return headers_frame(1, enc, extra=[("host", "evil")]), PingFrame(0, opaque_data=b"closed?!").serialize()
    if name == "path-not-absolute":
        f = HeadersFrame(1, flags={"END_HEADERS", "END_STREAM"})
        f.data = enc.encode([(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "http://evil/x")])
        return f.serialize(), PingFrame(0, opaque_data=b"closed?!").serialize()
    if name == "tiny-data-flood":  # 60,000 one-byte DATA frames: over a second of the h2 codec's time
        return headers_frame(1, enc, flags=("END_HEADERS",)) + DataFrame(1, b"x").serialize() * 60_000, b""
    raise KeyError(name)


# What the client gets, on either codec: GOAWAY with this code, or RST_STREAM on stream 1
# (a malformed request is a stream error, RFC 9113 8.1.1), or None: the frame is ignored
# (DATA on a stream both sides ended: RFC 9113 5.1 lets the endpoint choose) and a PING
# sent after it is answered.
EXPECTED = {
    "bad-preface-after-the-first-bytes": ("GOAWAY", PROTOCOL_ERROR),
    "data-on-an-idle-stream": ("GOAWAY", PROTOCOL_ERROR),
    "data-on-a-closed-stream": None,
    "headers-on-an-even-stream": ("GOAWAY", PROTOCOL_ERROR),
    "oversized-header-list": ("GOAWAY", COMPRESSION_ERROR),  # a value over 64 KiB: as libnghttp2 reads its length
    "hpack-bomb": ("GOAWAY", ENHANCE_YOUR_CALM),
    "invalid-hpack-index": ("GOAWAY", COMPRESSION_ERROR),
    "frame-larger-than-allowed": ("GOAWAY", FRAME_SIZE_ERROR),
    "window-overflow": ("GOAWAY", FLOW_CONTROL_ERROR),
    "continuation-without-headers": ("GOAWAY", PROTOCOL_ERROR),
    "continuation-flood": ("GOAWAY", ENHANCE_YOUR_CALM),
    "settings-flood": ("GOAWAY", ENHANCE_YOUR_CALM),
    "ping-flood": ("GOAWAY", ENHANCE_YOUR_CALM),
    "rapid-reset": ("GOAWAY", ENHANCE_YOUR_CALM),
    "host-differs-from-authority": ("RST_STREAM", PROTOCOL_ERROR),
    "path-not-absolute": ("RST_STREAM", PROTOCOL_ERROR),
    "tiny-data-flood": ("GOAWAY", ENHANCE_YOUR_CALM),
}


def read_frames_until_goaway(sock: socket.socket, stop_on_end_stream: bool = False) -> list[Frame]:
    buf, frames = b"", []
    while True:
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n = 9 + int.from_bytes(buf[:3], "big")
            f, length = Frame.parse_frame_header(memoryview(buf[:9]))
            f.parse_body(memoryview(buf[9:n]))
            buf = buf[n:]
            frames.append(f)
            if isinstance(f, (GoAwayFrame, RstStreamFrame)) or (isinstance(f, PingFrame) and f.opaque_data == b"closed?!") or (stop_on_end_stream and "END_STREAM" in f.flags and isinstance(f, HeadersFrame)):
                return frames
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return frames
        if not chunk:
            return frames
        buf += chunk


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module", params=["h2", "ngh2"])
def grpc_pair(request, tmp_path_factory):
    """An agent on each HTTP/2 codec, between gRPC apps, with a route (connections terminated)."""
    if request.param == "ngh2":
        pytest.importorskip("ngh2", reason="the ngh2 codec is not installed (pip install -e '.[test]')")
    app = GrpcApp("cluster")
    dev = GrpcApp("local")
    agent = start_agent(tmp_path_factory.mktemp("agent"), app.port, env={"INTERCEPT_H2_CODEC": request.param})
    client = start_client(agent, dev.port, "--header", "x-dev=alice", "--name", "alice")  # routes exist: terminated
    yield agent
    client.stop()
    agent.proc.stop()
    app.close()
    dev.close()


@pytest.mark.parametrize("case", list(EXPECTED))
def test_malformed_http2_gets_the_error_the_spec_names_on_that_connection_only(grpc_pair, case):
    agent = grpc_pair
    with channel(agent.http_port) as neighbour:
        assert app_of(neighbour) == "cluster"
        first, then = case_frames(case)
        with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as s:
            if case.startswith("bad-preface"):
                s.sendall(first)
            else:
                s.sendall(PREFACE + SettingsFrame(0).serialize() + first)
            frames = []
            if then:
                frames = read_frames_until_goaway(s, stop_on_end_stream=True)
                s.sendall(then)
            try:
                s.sendall(b"")  # the agent may have closed already
            except OSError:
                pass
            frames += read_frames_until_goaway(s)
        errors = [("GOAWAY" if isinstance(f, GoAwayFrame) else "RST_STREAM", f.error_code)
                  for f in frames if isinstance(f, (GoAwayFrame, RstStreamFrame))]
        if EXPECTED[case] is None:
            assert not errors and isinstance(frames[-1], PingFrame) and "ACK" in frames[-1].flags, (case, frames[-3:])
        else:
            assert errors and errors[-1] == EXPECTED[case], (case, frames[-3:])
        assert app_of(neighbour) == "cluster" and app_of(neighbour, [("x-dev", "alice")]) == "local"


def test_memory_stays_bounded_under_the_malformed_corpus(grpc_pair):
    agent = grpc_pair
    before = rss_kb(agent.proc.p.pid)
    for _ in range(3):
        for case in ("hpack-bomb", "rapid-reset", "ping-flood", "oversized-header-list", "continuation-flood"):
            first, _ = case_frames(case)
            with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as s:
                s.sendall(PREFACE + SettingsFrame(0).serialize() + first)
                read_frames_until_goaway(s)
    with channel(agent.http_port) as c:
        assert app_of(c) == "cluster"
    assert rss_kb(agent.proc.p.pid) - before < 64 * 1024


# -- what one client may cost the others ---------------------------------------------------

MB = 1 << 20


@pytest.fixture(scope="module", params=["h2", "ngh2"])
def codec_agent(request, tmp_path_factory):
    """An agent on each HTTP/2 codec in front of a gRPC app, with a route registered (so
    every connection is terminated and its streams share pooled connections to the app)."""
    if request.param == "ngh2":
        pytest.importorskip("ngh2", reason="the ngh2 codec is not installed (pip install -e '.[test]')")
    app = GrpcApp("cluster")
    agent = start_agent(tmp_path_factory.mktemp("agent"), app.port, env={"INTERCEPT_H2_CODEC": request.param})
    client = start_client(agent, free_port(), "--header", "x-dev=alice", "--name", "alice")
    yield agent
    client.stop()
    agent.proc.stop()
    app.close()


def server_stream_call(stream_id: int, encoder: hpack.Encoder, size: int) -> bytes:
    """A gRPC call on ``stream_id`` asking one response message of ``size`` bytes."""
    f = HeadersFrame(stream_id, flags={"END_HEADERS"})
    f.data = encoder.encode([(":method", "POST"), (":scheme", "http"), (":authority", "a"),
                             (":path", "/test.Echo/ServerStream"), ("content-type", "application/grpc"), ("te", "trailers")])
    message = b"1 %d" % size
    return f.serialize() + DataFrame(stream_id, b"\0" + len(message).to_bytes(4, "big") + message, flags={"END_STREAM"}).serialize()


def never_reading_client(port: int, calls: int) -> tuple[socket.socket, list[Frame]]:
    """A connection that advertises a stream window of 0 and asks ``calls`` 2 MiB responses;
    returns once the app has answered each with its headers."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    enc = hpack.Encoder()
    s.sendall(PREFACE + SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0}).serialize()
              + b"".join(server_stream_call(2 * i + 1, enc, 2 * MB) for i in range(calls)))
    frames: list[Frame] = []
    while len({f.stream_id for f in frames if isinstance(f, HeadersFrame)}) < calls:
        frames += read_frames(s, 1)
    return s, frames


def read_frames(sock: socket.socket, count: int) -> list[Frame]:
    """The next ``count`` frames (fewer if the connection ends)."""
    frames = []
    while len(frames) < count:
        head = recv_exactly(sock, 9)
        if len(head) < 9:
            break
        f, length = Frame.parse_frame_header(memoryview(head))
        f.parse_body(memoryview(recv_exactly(sock, length)))
        frames.append(f)
    return frames


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer if the connection ends (MSG_WAITALL does not wait on a socket
    with a timeout)."""
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_a_client_that_reads_nothing_stalls_no_one_else(codec_agent):
    # its responses fill their own stream windows in the agent, never the window of the
    # connection to the app that every client's streams share
    s, _ = never_reading_client(codec_agent.http_port, 6)
    with s, channel(codec_agent.http_port) as c:
        replies = list(c.unary_stream("/test.Echo/ServerStream")(b"3 %d" % (2 * MB), timeout=30))
        assert [len(r) for r in replies] == [2 * MB] * 3
        assert app_of(c) == "cluster"


def test_what_a_client_leaves_unread_is_bounded_by_resetting_the_streams_past_the_limit(codec_agent):
    from intercept.agent.h2proxy import HELD_LIMIT
    from intercept.routing.h2codec import STREAM_WINDOW

    kept = HELD_LIMIT // STREAM_WINDOW  # each stream holds its window: 1 MiB of its 2 MiB
    calls = kept + 8
    s, frames = never_reading_client(codec_agent.http_port, calls)
    with s:
        resets = [f for f in frames if isinstance(f, RstStreamFrame)]
        while len(resets) < calls - kept:
            resets += [f for f in read_frames(s, 1) if isinstance(f, RstStreamFrame)]
        assert {f.error_code for f in resets} == {ENHANCE_YOUR_CALM}
    with channel(codec_agent.http_port) as c:
        assert app_of(c) == "cluster"


def test_a_response_held_for_a_client_is_let_go_when_it_resets_the_stream_after_the_apps_goaway(pure_h2_agent):
    # each round: a response the client does not read (its window is 0) held in the agent,
    # the app's GOAWAY and close, then the client's reset: what was held is let go, so the
    # rounds never add up to the connection's limit (its streams would be reset past it)
    from intercept.agent.h2proxy import HELD_LIMIT

    size = 900_000  # within a stream's window: the app sends it all
    enc = hpack.Encoder()

    def request(sid: int, path: str, *extra: tuple[str, str]) -> bytes:
        f = HeadersFrame(sid, flags={"END_HEADERS", "END_STREAM"})
        f.data = enc.encode([(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", path), *extra])
        return f.serialize()

    with socket.create_connection(("127.0.0.1", pure_h2_agent.http_port), timeout=30) as s:
        s.sendall(PREFACE + SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0}).serialize())
        sid = 1
        for _ in range(HELD_LIMIT // size + 2):
            # the app answers both on one connection, in order: the second's end comes once
            # the agent holds the whole first
            held, last = sid, sid + 2
            s.sendall(request(held, f"/bytes/{size}") + request(last, "/bytes/0", ("x-goaway", "1")))
            frames = []
            while not any(f.stream_id == last and "END_STREAM" in f.flags for f in frames):
                frames += read_frames(s, 1)
            assert not [f for f in frames if isinstance(f, (RstStreamFrame, GoAwayFrame))]
            s.sendall(RstStreamFrame(held, error_code=CANCEL).serialize())
            sid += 4
        # and a response read in full still comes whole
        s.sendall(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20}).serialize()
                  + WindowUpdateFrame(0, window_increment=1 << 30).serialize() + request(sid, f"/bytes/{size}"))
        got = 0
        while True:
            (f,) = read_frames(s, 1)
            assert not isinstance(f, (RstStreamFrame, GoAwayFrame)), f
            if f.stream_id == sid and isinstance(f, DataFrame):
                got += len(f.data)
            if f.stream_id == sid and "END_STREAM" in f.flags:
                break
        assert got == size


def get(sid: int, enc: hpack.Encoder, path: str, *extra: tuple[str, str]) -> bytes:
    f = HeadersFrame(sid, flags={"END_HEADERS", "END_STREAM"})
    f.data = enc.encode([(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", path), *extra])
    return f.serialize()


def test_what_all_clients_leave_unread_is_bounded_and_a_reading_client_is_still_served(pure_h2_agent):
    # connection after connection leaves 3.6 MB unread (under its own limit); past the
    # agent's budget, the connection that leaves most has its streams reset
    from intercept.agent.h2proxy import AGENT_HELD_LIMIT, HELD_LIMIT

    size = 900_000  # within a stream's window: the app sends it all, the agent holds it all
    per_connection = HELD_LIMIT // size
    connections = []
    try:
        for _ in range(AGENT_HELD_LIMIT // (per_connection * size) + 2):
            s = socket.create_connection(("127.0.0.1", pure_h2_agent.http_port), timeout=30)
            connections.append(s)
            enc = hpack.Encoder()
            held = [2 * i + 1 for i in range(per_connection)]
            marker = 2 * per_connection + 1  # answered after the others, on the same app connection
            s.sendall(PREFACE + SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0}).serialize()
                      + b"".join(get(sid, enc, f"/bytes/{size}") for sid in held) + get(marker, enc, "/bytes/0"))
            frames = []
            while not any(f.stream_id == marker and "END_STREAM" in f.flags for f in frames):
                frames += read_frames(s, 1)
        unread = 0
        reset = 0
        for s in connections:  # what each has been told so far: a PING's answer comes after it
            s.sendall(PingFrame(0, opaque_data=b"counted!").serialize())
            frames = []
            while not any(isinstance(f, PingFrame) and "ACK" in f.flags for f in frames):
                frames += read_frames(s, 1)
            resets = {f.stream_id for f in frames if isinstance(f, RstStreamFrame) and f.error_code == ENHANCE_YOUR_CALM}
            reset += bool(resets)
            unread += (per_connection - len(resets)) * size
        assert reset >= 2 and unread <= AGENT_HELD_LIMIT
        with socket.create_connection(("127.0.0.1", pure_h2_agent.http_port), timeout=30) as s:
            s.sendall(PREFACE + SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20}).serialize()
                      + WindowUpdateFrame(0, window_increment=1 << 30).serialize() + get(1, hpack.Encoder(), f"/bytes/{size}"))
            got = 0
            while True:
                (f,) = read_frames(s, 1)
                assert not isinstance(f, (RstStreamFrame, GoAwayFrame)), f
                if f.stream_id == 1 and isinstance(f, DataFrame):
                    got += len(f.data)
                if f.stream_id == 1 and "END_STREAM" in f.flags:
                    break
            assert got == size
    finally:
        for s in connections:
            s.close()


# -- counted and expired as HTTP/1.1 connections are ---------------------------------------


@pytest.fixture(params=["relayed", "h2", "ngh2"])
def h2_mode(request):
    """How the agent takes a prior-knowledge connection: relayed as bytes (no route
    registered), or terminated on each codec (a route registered)."""
    if request.param == "ngh2":
        pytest.importorskip("ngh2", reason="the ngh2 codec is not installed (pip install -e '.[test]')")
    return request.param


@pytest.fixture
def limited_agent(h2_mode, tmp_path, clients):
    """(agent, app) with --max-connections 2 and --header-timeout 0.5, in ``h2_mode``."""
    app = GrpcApp("cluster")
    codec = "h2" if h2_mode == "relayed" else h2_mode
    agent = start_agent(tmp_path, app.port, "--max-connections", "2", "--header-timeout", "0.5",
                        env={"INTERCEPT_H2_CODEC": codec})
    if h2_mode != "relayed":
        clients.append(start_client(agent, free_port(), "--header", "x-dev=alice", "--name", "alice"))
    yield agent, app
    agent.proc.stop()
    app.close()


def h2_connection(port: int) -> socket.socket:
    """A prior-knowledge connection, once the HTTP/2 side (the agent, or the app through a
    relay) has answered its preface."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(PREFACE + SettingsFrame(0).serialize())
    assert isinstance(read_frames(s, 1)[0], SettingsFrame)
    return s


def until_closed(s: socket.socket) -> bytes:
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got


def test_h2_connections_count_against_max_connections_until_a_stream_completes(limited_agent):
    agent, _ = limited_agent
    first, second = h2_connection(agent.http_port), h2_connection(agent.http_port)
    with first, second:
        with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as over:
            assert until_closed(over).startswith(b"HTTP/1.1 503 ")
        first.sendall(grpc_call(1, hpack.Encoder()))  # a call completes: its place is free
        read_frames_until_goaway(first, stop_on_end_stream=True)
        with channel(agent.http_port) as c:
            assert app_of(c) == "cluster"


def test_h2_connections_with_no_stream_open_are_closed_after_the_header_timeout(limited_agent):
    agent, app = limited_agent
    with channel(agent.http_port) as busy:
        assert app_of(busy) == "cluster"  # established: the other two fit under --max-connections 2
        ticks = busy.unary_stream("/test.Echo/Ticks")(b"2", timeout=30)
        assert next(ticks) == b"tick 0 from cluster"  # a stream stays open on this connection
        with h2_connection(agent.http_port) as idle, h2_connection(agent.http_port) as done:
            done.sendall(grpc_call(1, hpack.Encoder()))
            read_frames_until_goaway(done, stop_on_end_stream=True)
            for s, last in ((idle, 0), (done, 1)):
                frames = parse(until_closed(s))
                goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
                assert [(f.error_code, f.last_stream_id) for f in goaways] == [(NO_ERROR, last)]
        app.gate.release()  # idle for longer than either, but never without a stream: still served
        assert list(ticks) == [b"tick 1 from cluster"]


def test_a_client_still_sending_as_an_idle_connection_is_closed_is_not_reset(limited_agent):
    # a call on its way as the agent's GOAWAY arrives: the agent shuts its side and reads
    # what still comes, instead of answering it with a TCP reset (which can discard the
    # GOAWAY unread, and with it the client's knowledge that it may retry the call)
    agent, _ = limited_agent
    with h2_connection(agent.http_port) as s:
        frames = parse(until_closed(s))  # the GOAWAY, then the agent's end of the connection
        assert [(f.error_code, f.last_stream_id) for f in frames if isinstance(f, GoAwayFrame)] == [(NO_ERROR, 0)]
        s.sendall(grpc_call(1, hpack.Encoder()))
        s.sendall(PingFrame(0, opaque_data=b"still on").serialize())  # (a reset would have made this fail)
        assert s.recv(65536) == b""


def test_every_connection_the_sweeper_watches_says_how_to_expire_it():
    # the upgrade probe lasts as long as its question: it is not watched, and has no
    # methods of a watched connection that would only raise
    from intercept.agent.h2proxy import ClientSide, Downstream, Relay, UpgradeProbe

    assert not issubclass(UpgradeProbe, ClientSide)
    for cls in (Downstream, Relay):
        assert {"streams_opened", "close_idle"} <= set(vars(cls)), cls


# -- streams that stop: reset, so that they hold no place and no app stream -----------------


@pytest.fixture(params=["h2", "ngh2"])
def stalling_agent(request, tmp_path, clients):
    """(agent, app): --header-timeout 0.5, --hold-timeout 1, a route registered (streams are
    terminated), an app that takes one stream per connection, on each codec."""
    if request.param == "ngh2":
        pytest.importorskip("ngh2", reason="the ngh2 codec is not installed (pip install -e '.[test]')")
    app = GrpcApp("cluster", max_concurrent_streams=1)
    agent = start_agent(tmp_path, app.port, "--header-timeout", "0.5", "--hold-timeout", "1",
                        env={"INTERCEPT_H2_CODEC": request.param})
    clients.append(start_client(agent, free_port(), "--header", "x-dev=alice", "--name", "alice"))
    yield agent, app
    app.release.set()
    agent.proc.stop()
    app.close()


def open_request(stream_id: int, encoder: hpack.Encoder, path: str) -> bytes:
    """HEADERS of a gRPC call without END_STREAM: its request goes on, or never does."""
    f = HeadersFrame(stream_id, flags={"END_HEADERS"})
    f.data = encoder.encode([(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", path),
                             ("content-type", "application/grpc"), ("te", "trailers")])
    return f.serialize()


def test_a_stream_whose_request_never_ends_is_reset_after_the_header_timeout(stalling_agent):
    agent, _ = stalling_agent
    with h2_connection(agent.http_port) as s:
        s.sendall(open_request(1, hpack.Encoder(), "/test.Echo/Unary"))  # then nothing
        frames = parse(until_closed(s))
    assert [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)] == [(1, CANCEL)]
    # its connection then has no stream open: GOAWAY, and its place is free
    assert [(f.error_code, f.last_stream_id) for f in frames if isinstance(f, GoAwayFrame)] == [(NO_ERROR, 1)]


def test_a_response_sent_whole_while_its_request_is_open_ends_the_stream_with_no_error(stalling_agent):
    # RFC 9113 8.1: the app answered (UNIMPLEMENTED, trailers-only) before the request
    # ended; the client is told to stop sending, and the stream holds nothing any more
    agent, _ = stalling_agent
    with h2_connection(agent.http_port) as s:
        s.sendall(open_request(1, hpack.Encoder(), "/no.Such/Method"))
        frames = parse(until_closed(s))
    ends = [(type(f).__name__, f.stream_id) for f in frames
            if isinstance(f, RstStreamFrame) or isinstance(f, HeadersFrame) and "END_STREAM" in f.flags]
    assert ends == [("HeadersFrame", 1), ("RstStreamFrame", 1)]
    assert [f.error_code for f in frames if isinstance(f, RstStreamFrame)] == [NO_ERROR]


def test_a_stream_that_finds_no_room_at_the_app_is_answered_after_the_hold_timeout(stalling_agent):
    from intercept.agent.h2proxy import MAX_CONNECTIONS

    agent, app = stalling_agent
    with channel(agent.http_port) as c:
        held = [c.unary_unary("/test.Echo/Hold").future(b"", timeout=60) for _ in range(MAX_CONNECTIONS)]
        app.wait_until(lambda: app.active == MAX_CONNECTIONS)  # every connection the pool may open is busy
        with pytest.raises(grpc.RpcError) as e:
            c.unary_unary("/test.Echo/Unary")(b"hi", timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "--hold-timeout" in e.value.details()
        app.release.set()
        assert [f.result() for f in held] == [b"held by cluster"] * MAX_CONNECTIONS


# -- while no route could apply: a relay, converted when the first route appears -----------


def test_relayed_connection_is_routed_after_the_first_route_without_breaking_a_call(tmp_path, clients):
    app = GrpcApp("cluster")
    dev = GrpcApp("local")
    agent = start_agent(tmp_path, app.port)
    try:
        with channel(agent.http_port) as c:
            assert app_of(c, [("x-dev", "alice")]) == "cluster"  # no route: relayed
            stream = c.unary_stream("/test.Echo/Ticks")(b"3", timeout=30)
            assert next(stream) == b"tick 0 from cluster"
            seen = len(agent.proc.lines)
            client = start_client(agent, dev.port, "--header", "x-dev=alice", "--name", "alice")
            clients.append(client)
            # calls that began before the client read the GOAWAY may still take the relay
            agent.proc.wait_for(r"relayed HTTP/2 connection from .* read the GOAWAY", start=seen)
            assert app_of(c, [("x-dev", "alice")]) == "local"  # a new connection, routed
            assert app_of(c) == "cluster"
            app.gate.release()
            app.gate.release()
            assert list(stream) == [b"tick 1 from cluster", b"tick 2 from cluster"]  # the call in flight finished
            client.stop()
            assert app_of(c, [("x-dev", "alice")]) == "cluster"
    finally:
        agent.proc.stop()
        app.close()
        dev.close()


def test_tls_is_relayed_untouched_even_with_routes_and_start_warns(tmp_path, clients):
    echo = App("cluster")  # echoes bytes that are not HTTP
    agent = start_agent(tmp_path, echo.port)
    try:
        client = start_client(agent, free_port(), "--header", "x-dev=alice", "--name", "alice")
        clients.append(client)
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(32)
        with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as s:
            s.sendall(hello)
            got = b""
            while len(got) < len(hello):
                got += s.recv(65536)
        assert got == hello
        client.stop()
        # intercept start says so: this service's traffic looks like TLS, which is never routed
        second = start_client(agent, free_port(), "--header", "x-dev=bob", "--name", "bob")
        clients.append(second)
        second.wait_for(r"^intercept: warning: the agent has seen 1 TLS connection\(s\) to this service")
        second.stop()
    finally:
        agent.proc.stop()
        echo.close()


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
def test_upgrade_to_h2c_is_left_to_an_app_that_speaks_only_http1(tmp_path):
    # Java's HttpClient and curl --http2 ask for h2c on plain http://; an app that speaks
    # only HTTP/1.1 declines, as it did before the agent was there, from the first request on
    app = App("cluster")
    agent = start_agent(tmp_path, app.port)
    try:
        for _ in range(2):
            got, version = curl("--http2", f"http://127.0.0.1:{agent.http_port}/plain")
            assert (got["app"], got["target"], version) == ("cluster", "/plain", "1.1")
        agent.proc.wait_for(r"upstream 127.0.0.1:\d+ does not speak HTTP/2")
    finally:
        agent.proc.stop()
        app.close()


def test_an_unknown_h2_codec_stops_the_agent_at_start_naming_the_variable(tmp_path: Path) -> None:
    done = subprocess.run(INTERCEPT + ["agent", "--listen", "127.0.0.1:0", "--ssh-listen", "127.0.0.1:0", "--upstream",
                                       "127.0.0.1:9", "--credentials", str(tmp_path / "c.json")],
                          env={**os.environ, "INTERCEPT_H2_CODEC": "nghttp3"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert ("INTERCEPT_H2_CODEC=nghttp3: unknown HTTP/2 codec; use ngh2 (the default when installed) or h2"
            in done.stderr), done.stderr


def _without_ngh2(tmp_path: Path) -> dict[str, str]:
    """An environment where ``import ngh2`` fails, as with a wheel that cannot load here."""
    fake = tmp_path / "no-ngh2" / "ngh2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("libnghttp2 cannot be loaded (a test stand-in)")\n')
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}


def test_the_agent_routes_grpc_with_libnghttp2_by_default_and_says_so(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("ngh2", reason="the ngh2 codec is not installed (pip install -e '.[fast]')")
    monkeypatch.delenv("INTERCEPT_H2_CODEC", raising=False)
    app, dev = GrpcApp("cluster"), GrpcApp("local")
    agent = start_agent(tmp_path, app.port)
    try:
        agent.proc.wait_for(r"agent: HTTP/2 codec ngh2: libnghttp2, the default$")
        client = start_client(agent, dev.port, "--header", "x-dev=alice", "--name", "alice")
        with channel(agent.http_port) as c:
            assert app_of(c) == "cluster" and app_of(c, [("x-dev", "alice")]) == "local"
        client.stop()
    finally:
        agent.proc.stop()
        app.close()
        dev.close()


def test_an_agent_whose_ngh2_cannot_load_routes_grpc_with_the_h2_codec_and_says_why(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("INTERCEPT_H2_CODEC", raising=False)
    app, dev = GrpcApp("cluster"), GrpcApp("local")
    agent = start_agent(tmp_path, app.port, env=_without_ngh2(tmp_path))
    try:
        line = agent.proc.wait_for(r"WARNING .*agent: HTTP/2 codec h2: ngh2 cannot be imported \((.*)\).*$")
        assert line[1] == "libnghttp2 cannot be loaded (a test stand-in)"
        assert "pip install 'intercept[fast]'" in line[0]
        client = start_client(agent, dev.port, "--header", "x-dev=alice", "--name", "alice")
        with channel(agent.http_port) as c:
            assert app_of(c) == "cluster" and app_of(c, [("x-dev", "alice")]) == "local"
        client.stop()
        assert len(re.findall("HTTP/2 codec", agent.proc.output)) == 1  # said once, at start
    finally:
        agent.proc.stop()
        app.close()
        dev.close()


def test_an_h2_codec_asked_for_by_name_that_cannot_load_stops_the_agent_at_start(tmp_path: Path) -> None:
    done = subprocess.run(INTERCEPT + ["agent", "--listen", "127.0.0.1:0", "--ssh-listen", "127.0.0.1:0", "--upstream",
                                       "127.0.0.1:9", "--credentials", str(tmp_path / "c.json")],
                          env={**os.environ, **_without_ngh2(tmp_path), "INTERCEPT_H2_CODEC": "ngh2"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "INTERCEPT_H2_CODEC=ngh2: the ngh2 package cannot be imported (libnghttp2 cannot be loaded" in done.stderr