"""HTTP/1.1 proxying through a real agent process, with real clients (http.client, curl, raw sockets)."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess

import pytest

from tests.apps import read_responses
from tests.conftest import echo, free_port, start_agent


def raw_exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    """Send bytes on a fresh connection; everything the agent answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_request_without_header_reaches_cluster_version(agent):
    status, headers, body = agent.request(path="/hello?x=1")
    assert status == 200
    assert headers["X-App"] == "cluster"
    assert echo(body)["target"] == "/hello?x=1"


def test_headers_arrive_as_sent_case_order_and_repeats(agent):
    request = (
        b"GET /h HTTP/1.1\r\nHost: a\r\nX-Mixed-Case: one\r\nx-mixed-case: two\r\nZ-Last: 1\r\n"
        b"A-First: 2\r\nConnection: close\r\n\r\n"
    )
    reply = raw_exchange(agent.http_port, request)
    body = reply.split(b"\r\n\r\n", 1)[1]
    assert echo(body)["headers"] == [
        ["Host", "a"], ["X-Mixed-Case", "one"], ["x-mixed-case", "two"], ["Z-Last", "1"], ["A-First", "2"], ["Connection", "close"],
        # what the agent adds, after everything the client sent
        ["X-Forwarded-For", "127.0.0.1"], ["Forwarded", "for=127.0.0.1"],
    ]


def test_content_length_upload_is_streamed_intact(agent):
    data = os.urandom(3 * 1024 * 1024 + 17)
    status, _, body = agent.request("POST", "/upload", body=data, headers={"Content-Type": "application/octet-stream"})
    assert status == 200
    assert echo(body)["body_length"] == len(data)
    assert echo(body)["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_chunked_upload_is_streamed_intact(agent):
    pieces = [os.urandom(n) for n in (1, 100, 65536, 70000, 3)]
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    conn.request("POST", "/chunked-upload", body=iter(pieces), encode_chunked=True)
    resp = conn.getresponse()
    got = echo(resp.read())
    conn.close()
    assert got["body_length"] == sum(map(len, pieces))
    assert got["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert ["Transfer-Encoding", "chunked"] in got["headers"]


def test_chunked_and_length_downloads_on_one_keep_alive_connection(agent):
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    conn.request("GET", "/chunked/40/5000")
    resp = conn.getresponse()
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert len(resp.read()) == 40 * 5000
    conn.request("GET", "/bytes/1000000")
    assert len(conn.getresponse().read()) == 1000000
    conn.request("GET", "/again")
    assert echo(conn.getresponse().read())["target"] == "/again"
    conn.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (apt-get install curl)")
def test_expect_100_continue_through_curl(agent, tmp_path):
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(200_000))
    out = subprocess.run(
        ["curl", "-sv", "-H", "Expect: 100-continue", "--data-binary", f"@{payload}", f"http://127.0.0.1:{agent.http_port}/up"],
        capture_output=True, timeout=30, check=True,
    )
    assert b"< HTTP/1.1 100" in out.stderr
    assert echo(out.stdout)["body_sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()


def test_head_204_304_keep_the_connection_in_step(agent):
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    conn.request("HEAD", "/head")
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) > 0
    assert resp.read() == b""
    for status in (204, 304):
        conn.request("GET", f"/status/{status}")
        resp = conn.getresponse()
        assert resp.status == status and resp.read() == b""
    conn.request("GET", "/after")
    assert echo(conn.getresponse().read())["target"] == "/after"
    conn.close()


def test_connection_close_closes_after_the_response(agent):
    reply = raw_exchange(agent.http_port, b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200") == 1
    assert b"/never" not in reply


def test_http_1_0_client_gets_its_answer_and_a_close(agent):
    reply = raw_exchange(agent.http_port, b"GET /old HTTP/1.0\r\n\r\n")
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert echo(body)["http_version"] == "1.0"


def test_close_delimited_response_reaches_the_client_whole(agent):
    reply = raw_exchange(agent.http_port, b"GET /close HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.endswith(b"cluster until close\n")


def test_pipelined_requests_are_answered_in_order(agent):
    with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as s:
        s.sendall(b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5)) + b"HEAD /p5 HTTP/1.1\r\nHost: a\r\n\r\n")
        responses = read_responses(s, 6, [b"GET"] * 5 + [b"HEAD"])
    assert [echo(body)["target"] for _, body in responses[:5]] == [f"/p{i}" for i in range(5)]
    assert responses[5][0].status_code == 200 and responses[5][1] == b""


def test_websocket_upgrade_then_bytes_both_ways(agent):
    with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as s:
        s.sendall(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101")
        frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # a masked "Hello" text frame
        s.sendall(frame)
        got = b""
        while len(got) < len(frame):
            got += s.recv(100)
        assert got == frame


@pytest.mark.parametrize(
    "first_bytes",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # TLS ClientHello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",  # HTTP/2 preface
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # binary (a PostgreSQL SSLRequest)
    ],
    ids=["tls", "h2-preface", "binary"],
)
def test_non_http_traffic_is_relayed_untouched(agent, first_bytes):
    with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as s:
        s.sendall(first_bytes)
        got = b""
        while len(got) < len(first_bytes):
            got += s.recv(65536)
        s.sendall(b"\x00more")
        more = b""
        while len(more) < 5:
            more += s.recv(100)
    assert got == first_bytes and more == b"\x00more"


MALFORMED = [
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, b"Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400, b"Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 7\r\n\r\nhello!!", 400, b"Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400, b"Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400, b"chunked"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400, b"chunked"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: rot13, chunked\r\n\r\n", 501, b"rot13"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, b"chunk"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n", 400, b"folding"),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, b"header"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad\x00Name: x\r\n\r\n", 400, b"header"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400, b"header"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, b"Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, b"Host"),
    (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400, b"request line"),
    (b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n", 400, b"request line"),
    (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505, b"version"),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, b"version"),
    (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, b"HTTP/1.0"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431, b"64 KiB"),
    # nearly HTTP: refused, never relayed raw past routing
    (b"*1\r\n$4\r\nPING\r\n", 400, b"request line"),
    (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, b"request line"),
    (b"GET / HTTP/1.1\nHost: a\n\n", 400, b"bare LF"),
    (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400, b"header"),
    # an Upgrade or CONNECT with a body: parsers disagree on where it ends
    (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: foo\r\nContent-Length: 5\r\n\r\nhello", 400, b"Upgrade"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, b"Upgrade"),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 5\r\n\r\nhello", 400, b"CONNECT"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X: y\r\n" * 20000 + b"\r\n", 400, b"trailer"),
]


@pytest.mark.parametrize("request_bytes,status,reason", MALFORMED, ids=[f"{i}-{m[1]}" for i, m in enumerate(MALFORMED)])
def test_malformed_request_gets_its_status_and_others_keep_being_served(agent, cluster_app, request_bytes, status, reason):
    neighbour = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    neighbour.request("GET", "/before")
    assert neighbour.getresponse().read()
    hits = cluster_app.hits
    reply = raw_exchange(agent.http_port, request_bytes)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), reply[:200]
    assert reason in body
    if reason == b"trailer":
        # refused mid-body: its head may already be at the app (bodies are streamed, and
        # the bytes may arrive in pieces), which then sees its connection close mid-body
        assert cluster_app.hits - hits <= 1
    else:
        assert cluster_app.hits == hits, "a refused request must not reach the app"
    neighbour.request("GET", "/after")
    assert echo(neighbour.getresponse().read())["target"] == "/after"
    neighbour.close()


def test_unreachable_upstream_gets_502_naming_it(tmp_path):
    dead_port = free_port()
    agent = start_agent(tmp_path, dead_port)
    try:
        status, _, body = agent.request(path="/")
        assert status == 502
        assert f"upstream 127.0.0.1:{dead_port} is unreachable".encode() in body
    finally:
        agent.proc.stop()


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to read the agent's peak memory")
def test_large_bodies_are_streamed_not_held(agent):
    size = 300 * 1024 * 1024
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=60)
    conn.request("GET", f"/bytes/{size}")
    resp = conn.getresponse()
    got = 0
    while chunk := resp.read(1 << 20):
        got += len(chunk)
    assert got == size

    def upload():
        block = b"u" * (1 << 20)
        for _ in range(size >> 20):
            yield block

    conn.request("POST", "/upload", body=upload(), headers={"Content-Length": str(size)})
    assert echo(conn.getresponse().read())["body_length"] == size
    conn.close()
    assert _peak_rss_kib(agent.proc.p.pid) < 150 * 1024, "the agent held a body in memory"


def test_a_flood_of_empty_lines_is_refused_and_bounded(agent):
    reply = raw_exchange(agent.http_port, b"\r\n" * 5000 + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"empty lines" in reply


def test_pipelined_requests_then_half_close_are_all_answered(agent):
    with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as s:
        s.sendall(b"".join(b"GET /h%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3)))
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.count(b"HTTP/1.1 200 ") == 3 and b"/h2" in out


def test_a_stale_keep_alive_link_is_retried_for_get_but_never_for_post(agent, cluster_app):
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    conn.request("GET", "/warm")
    conn.getresponse().read()
    before = len(cluster_app.seen)
    conn.request("POST", "/hangup", body=b"")  # Content-Length: 0, body-less but not idempotent
    assert conn.getresponse().status == 502
    conn.close()
    assert cluster_app.seen[before:].count("POST /hangup") == 1
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    conn.request("GET", "/warm")
    conn.getresponse().read()
    before = len(cluster_app.seen)
    conn.request("GET", "/hangup")
    assert conn.getresponse().status == 502
    conn.close()
    assert cluster_app.seen[before:].count("GET /hangup") == 2  # resent once on a fresh connection


def test_after_sigterm_the_agent_keeps_serving_for_its_grace(cluster_app, tmp_path):
    import signal

    agent = start_agent(tmp_path, cluster_app.port, "--shutdown-grace", "60")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
        conn.request("GET", "/before")
        conn.getresponse().read()
        agent.proc.signal(signal.SIGTERM)
        agent.proc.wait_for(r"stopping: still serving for 60s")
        conn.request("GET", "/during")  # the same keep-alive connection, and a new one
        assert echo(conn.getresponse().read())["target"] == "/during"
        assert agent.app_of(path="/new") == "cluster"
        conn.close()
    finally:
        agent.proc.p.kill()
        agent.proc.stop()


def test_after_sigterm_a_long_stream_flows_through_the_grace_and_is_cut_at_its_end(tmp_path):
    from tests.apps import EventReader, EventStream

    stream = EventStream("cluster-sse")
    try:
        agent = start_agent(tmp_path, stream.port, "--shutdown-grace", "60")
        try:
            reader = EventReader(agent.http_port, [])
            stream.wait_open()
            agent.proc.signal(signal.SIGTERM)
            agent.proc.wait_for(r"stopping: still serving for 60s")
            stream.send("during the grace")
            assert reader.event() == b"data: during the grace\n\n"
            reader.close()
        finally:
            agent.proc.p.kill()
            agent.proc.stop()
        # with a short grace the agent ends by itself, and a stream still open is cut then
        agent = start_agent(tmp_path, stream.port, "--shutdown-grace", "0.5")
        try:
            reader = EventReader(agent.http_port, [])
            stream.wait_open(2)
            agent.proc.signal(signal.SIGTERM)
            assert reader.cut()
            assert agent.proc.finish() == 0
            reader.close()
        finally:
            agent.proc.stop()
    finally:
        stream.close()


def _one_request_then_hang_up(port: int, path: str) -> bytes:
    """A client that sends one keep-alive request, reads the answer and closes (no Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode())
        (resp, body), = read_responses(s, 1)
        return resp.status_code, body


def test_a_connection_per_request_reuses_upstream_connections(agent, cluster_app):
    before = cluster_app.connections
    for i in range(20):
        status, body = _one_request_then_hang_up(agent.http_port, f"/once/{i}")
        assert status == 200 and echo(body)["target"] == f"/once/{i}"
    assert cluster_app.connections - before <= 1  # one upstream connection served them all


def test_pooled_upstream_connections_closed_by_the_app_are_not_a_failure(agent):
    for i in range(10):
        path = "/idle-close" if i % 2 == 0 else f"/then/{i}"
        assert _one_request_then_hang_up(agent.http_port, path)[0] == 200, path


def test_connections_that_never_finish_a_head_are_closed(cluster_app, tmp_path):
    agent = start_agent(tmp_path, cluster_app.port, "--header-timeout", "0.5")
    try:
        with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as slow, \
             socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as idle:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")  # and never more
            reply = b""
            while chunk := slow.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408 ")
            assert idle.recv(1) == b""  # closed without a word: it had sent nothing
        assert agent.app_of() == "cluster"  # others are served as before
    finally:
        agent.proc.stop()


def test_a_request_body_that_stops_arriving_is_cut_and_frees_its_place(cluster_app, tmp_path):
    """A head promising a large body and then silence held a --max-connections place for ever:
    two of them refused every new client. Now each gets a 408 and the places come back."""
    agent = start_agent(tmp_path, cluster_app.port, "--max-connections", "2", "--header-timeout", "0.5")
    try:
        stalled = [socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) for _ in range(2)]
        for s in stalled:
            s.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\nx")  # and never more
        for s in stalled:
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408 ") and b"request body stopped arriving" in reply
            s.close()
        assert agent.app_of(path="/after") == "cluster"  # a new client has a place again
    finally:
        agent.proc.stop()


def test_fresh_connections_beyond_max_connections_get_503_and_established_ones_are_not_counted(cluster_app, tmp_path):
    agent = start_agent(tmp_path, cluster_app.port, "--max-connections", "2")
    try:
        keep = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
        keep.request("GET", "/first")  # an established keep-alive user: not counted
        assert keep.getresponse().read()
        fresh = [socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) for _ in range(2)]
        try:
            with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as over:
                reply = b""
                while chunk := over.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 503 ") and b"--max-connections 2" in reply
            keep.request("GET", "/second")  # the established user is served throughout
            assert echo(keep.getresponse().read())["target"] == "/second"
            # a fresh connection that completes an exchange frees its place at once
            fresh[0].sendall(b"GET /done HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_responses(fresh[0], 1)[0][0].status_code == 200
            assert agent.app_of(path="/after") == "cluster"
        finally:
            for s in fresh:
                s.close()
        keep.close()
    finally:
        agent.proc.stop()


def test_an_agent_loads_neither_the_http2_stack_nor_re2_until_it_needs_them():
    """Idle RSS: h2 (with hpack) and RE2 come with the first HTTP/2 connection and the first
    regex rule; the HTTP/2 tests above show that they still come when needed."""
    import sys

    code = ("import sys, intercept.cli, intercept.agent.agent; "
            "print(sorted(m for m in ('h2', 'hpack', 're2', 'intercept.agent.h2proxy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
