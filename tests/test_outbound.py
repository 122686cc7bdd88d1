"""Reaching the cluster from the local process: the outbound proxy and TCP forwards, through a real agent.

Every test dials through a real agent's SSH server (``--allow-outbound``) with real HTTP
clients (http.client, urllib, curl). The network-namespace test at the end is the
decisive one: the service is reachable, and its name resolvable, only from the
"cluster" namespace.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from intercept.client.outbound import (
    CONNECT_ESTABLISHED,
    OutboundProxy,
    SSHDialer,
    TCPForward,
    parse_absolute_target,
    parse_authority,
    propagation,
    proxy_env,
)
from intercept.errors import UsageError
from intercept.routing.http1 import ProtocolError
from intercept.routing.match import Route, parse_rule
from tests.apps import App, accept_each
from tests.netns import needs_netns, sh, two_hosts
from tests.conftest import INTERCEPT, Agent, Proc, free_port, start_agent

TIMEOUT = 15


async def _connect(agent: Agent) -> asyncssh.SSHClientConnection:
    creds = json.loads(agent.credentials.read_text())
    host, port = agent.ssh.rsplit(":", 1)
    return await asyncssh.connect(
        host, int(port), username="outbound-test", password=creds["token"],
        known_hosts=([asyncssh.import_public_key(creds["host_public_key"])], [], []),
        client_keys=None, agent_path=None, preferred_auth="password", config=None,
    )


def through_proxy(agent: Agent | None, check: Callable[[str, int], Any], propagate=()) -> Any:
    """Run ``check(proxy_host, proxy_port)`` (blocking clients, in a thread) against a proxy
    whose connections dial through ``agent`` (None: no agent connection is up)."""

    async def main():
        conn = await _connect(agent) if agent is not None else None
        proxy = OutboundProxy(SSHDialer(lambda: conn), propagate)
        host, port = await proxy.start()
        try:
            return await asyncio.to_thread(check, host, port)
        finally:
            await proxy.close()
            if conn is not None:
                conn.close()
                await conn.wait_closed()

    return asyncio.run(main())


def echo_of(resp: http.client.HTTPResponse) -> dict:
    body = resp.read()
    assert resp.status == 200, (resp.status, body)
    return json.loads(body)


def header_values(echo: dict, name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name]


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock: socket.socket, method: str = "GET") -> tuple[int, bytes]:
    return read_responses(sock, [method])[0]


class _OneFile:
    """``sock`` as http.client reads it, through one buffered file for every response: an
    ``HTTPResponse`` per response would buffer past its own and drop the next one's bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")

    def makefile(self, *args, **kwargs):
        return self

    def __getattr__(self, name: str):  # readline, read, readinto: the shared file's
        return getattr(self.file, name)

    def close(self) -> None:  # a response read to its end closes its file: not the next one's
        pass


def read_responses(sock: socket.socket, methods: list[str]) -> list[tuple[int, bytes]]:
    """The responses to pipelined requests of ``methods``, in order."""
    source = _OneFile(sock)
    answers = []
    for method in methods:
        resp = http.client.HTTPResponse(source, method=method)
        resp.begin()
        answers.append((resp.status, resp.read()))
    return answers


@pytest.fixture(scope="module")
def target() -> Iterator[App]:
    app = App("target")
    yield app
    app.close()


@pytest.fixture(scope="module")
def other() -> Iterator[App]:
    app = App("other")
    yield app
    app.close()


@pytest.fixture(scope="module")
def outbound_agent(target: App, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    agent = start_agent(tmp_path_factory.mktemp("outbound"), target.port, "--allow-outbound")
    yield agent
    agent.proc.stop()


@pytest.fixture
def closed_port() -> int:
    """A port on which nothing listens."""
    return free_port()


# --- plain HTTP (absolute-form) ----------------------------------------------------------


def test_absolute_form_get_reaches_the_service_through_the_agent(outbound_agent, target):
    def check(host, port):
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.request("GET", f"http://127.0.0.1:{target.port}/orders/7?full=1",
                     headers={"Proxy-Connection": "keep-alive", "Proxy-Authorization": "Basic eDp5", "X-Mine": "1"})
        resp = conn.getresponse()
        assert resp.getheader("X-App") == "target"
        return echo_of(resp)

    echo = through_proxy(outbound_agent, check)
    assert echo["target"] == "/orders/7?full=1"  # origin-form upstream
    assert header_values(echo, "host") == [f"127.0.0.1:{target.port}"]
    assert header_values(echo, "x-mine") == ["1"]
    assert header_values(echo, "proxy-connection") == header_values(echo, "proxy-authorization") == []


def test_urllib_with_proxy_handler_posts_through_the_agent(outbound_agent, target, monkeypatch):
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    body = os.urandom(300_000)

    def check(host, port):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{host}:{port}"}))
        req = urllib.request.Request(f"http://127.0.0.1:{target.port}/upload", data=body, method="POST")
        with opener.open(req, timeout=TIMEOUT) as resp:
            return json.loads(resp.read())

    echo = through_proxy(outbound_agent, check)
    assert (echo["method"], echo["body_length"]) == ("POST", len(body))
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_keep_alive_carries_several_requests_and_bodies_on_one_client_connection(outbound_agent, target, other):
    big = os.urandom(1 << 20)

    def check(host, port):
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        base = f"http://127.0.0.1:{target.port}"
        conn.request("POST", f"{base}/a", body=big)
        first = echo_of(conn.getresponse())
        sock = conn.sock
        conn.request("POST", f"{base}/b", body=iter([b"x" * 1000, b"y" * 5]), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        second = echo_of(conn.getresponse())
        conn.request("GET", f"{base}/chunked/3/70000")
        resp = conn.getresponse()
        streamed = resp.read()
        conn.request("GET", f"http://127.0.0.1:{other.port}/elsewhere")  # another host: a new upstream
        elsewhere = conn.getresponse()
        fourth = echo_of(elsewhere)
        assert conn.sock is sock, "the client connection was not kept alive"
        return first, second, streamed, fourth, elsewhere.getheader("X-App")

    first, second, streamed, fourth, app = through_proxy(outbound_agent, check)
    assert first["body_sha256"] == hashlib.sha256(big).hexdigest()
    assert second["body_length"] == 1005 and header_values(second, "transfer-encoding") == ["chunked"]
    assert streamed == b"a" * 70000 + b"b" * 70000 + b"c" * 70000
    assert (app, fourth["target"]) == ("other", "/elsewhere")


def test_pipelined_requests_are_each_forwarded_and_answered_in_order(outbound_agent, target):
    def check(host, port):
        base = f"http://127.0.0.1:{target.port}"
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.sendall(f"POST {base}/one HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      f"5\r\nhello\r\n0\r\n\r\n"
                      f"POST {base}/two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                      f"GET {base}/three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answers = read_responses(s, ["POST", "POST", "GET"])
            return answers, s.recv(1)

    answers, after = through_proxy(outbound_agent, check)
    echoes = [json.loads(body) for _, body in answers]
    assert [(e["target"], e["body_length"]) for e in echoes] == [("/one", 5), ("/two", 3), ("/three", 0)]
    assert after == b""  # Connection: close is honoured


class ForgetfulServer:
    """Answers the first request of each connection, keep-alive, then reads the next request
    and closes without answering: a server dropping an idle connection just as it is reused."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        accept_each(self.sock, self._handle, threaded=False)

    def _handle(self, conn: socket.socket) -> None:
        self.connections += 1
        with conn:
            read_until(conn, b"\r\n\r\n")
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            conn.recv(65536)

    def close(self) -> None:
        self.sock.close()


def test_a_dropped_keep_alive_upstream_is_retried_only_for_requests_without_body(outbound_agent):
    server = ForgetfulServer()

    def check(host, port):
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        answers = []
        for method, body in (("GET", None), ("GET", None), ("POST", b"data")):
            conn.request(method, f"http://127.0.0.1:{server.port}/", body=body)
            resp = conn.getresponse()
            answers.append((resp.status, resp.read()))
        return answers

    try:
        (first, second, post) = through_proxy(outbound_agent, check)
    finally:
        server.close()
    assert first == second == (200, b"ok")  # the GET was sent again on a new connection
    assert post[0] == 502 and b"closed the connection without answering" in post[1]
    assert server.connections == 2


def test_expect_100_continue_and_upgrade_pass_through(outbound_agent, target):
    def check(host, port):
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.sendall(f"POST http://127.0.0.1:{target.port}/expect HTTP/1.1\r\nHost: x\r\n"
                      "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode())
            interim = read_until(s, b"\r\n\r\n")
            s.sendall(b"hello")
            status, body = read_response(s, "POST")
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.sendall(f"GET http://127.0.0.1:{target.port}/ws HTTP/1.1\r\nHost: x\r\n"
                      "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode())
            switched = read_until(s, b"\r\n\r\n")
            s.sendall(b"\x81frame")
            frame = read_until(s, b"frame")
        return interim, status, json.loads(body), switched, frame

    interim, status, echo, switched, frame = through_proxy(outbound_agent, check)
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert status == 200 and echo["body_length"] == 5
    assert switched.startswith(b"HTTP/1.1 101 ") and frame == b"\x81frame"


def test_curl_uses_the_proxy_for_http_and_https_style_tunnels(outbound_agent, target):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install curl)")

    def check(host, port):
        env = {**os.environ, **proxy_env(host, port, no_proxy=())}
        url = f"http://127.0.0.1:{target.port}/via-curl"
        plain = subprocess.run(["curl", "-sS", "--max-time", "10", url], env=env, capture_output=True, timeout=20)
        tunnel = subprocess.run(["curl", "-sS", "--max-time", "10", "--proxytunnel", url], env=env, capture_output=True, timeout=20)
        return plain, tunnel

    plain, tunnel = through_proxy(outbound_agent, check)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["target"] == "/via-curl"
    assert tunnel.returncode == 0, tunnel.stderr
    assert json.loads(tunnel.stdout)["target"] == "/via-curl"


# --- --propagate-header ------------------------------------------------------------------


def test_propagated_headers_are_added_to_plain_http_once(outbound_agent, target):
    propagate = [("x-dev", "alice"), ("baggage", "dev=alice")]

    def check(host, port):
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        url = f"http://127.0.0.1:{target.port}/chain"
        conn.request("GET", url)
        plain = echo_of(conn.getresponse())
        conn.request("GET", url, headers={"X-Dev": "bob", "baggage": "tenant=7"})
        already = echo_of(conn.getresponse())
        conn.request("GET", url, headers={"baggage": "dev=carol"})
        member = echo_of(conn.getresponse())
        return plain, already, member

    plain, already, member = through_proxy(outbound_agent, check, propagate)
    assert header_values(plain, "x-dev") == ["alice"] and header_values(plain, "baggage") == ["dev=alice"]
    assert header_values(already, "x-dev") == ["bob"]  # the process's own value wins, not duplicated
    assert header_values(already, "baggage") == ["tenant=7", "dev=alice"]
    assert header_values(member, "baggage") == ["dev=carol"]


def test_connect_tunnel_relays_bytes_untouched(outbound_agent, target):
    def check(host, port):
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.set_tunnel("127.0.0.1", target.port)
        conn.request("GET", "/inside-tunnel")
        inside = echo_of(conn.getresponse())
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            # first bytes sent together with the CONNECT head: they must reach the target first
            s.sendall(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\nHost: x\r\n\r\n\x00raw bytes".encode())
            answer = read_until(s, b"raw bytes")
            s.sendall(b"\x00more")
            more = read_until(s, b"more")
        return inside, answer, more

    inside, answer, more = through_proxy(outbound_agent, check, propagate=[("x-dev", "alice")])
    assert inside["target"] == "/inside-tunnel"
    assert header_values(inside, "x-dev") == []  # nothing is added inside a tunnel
    assert answer == CONNECT_ESTABLISHED + b"\x00raw bytes"
    assert more == b"\x00more"


# --- errors ----------------------------------------------------------------------------


def test_agent_without_outbound_answers_502_with_the_reason(target, tmp_path):
    agent = start_agent(tmp_path, target.port)  # no --allow-outbound: as injected with --no-outbound

    def check(host, port):
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.request("GET", f"http://127.0.0.1:{target.port}/")
        resp = conn.getresponse()
        plain = resp.status, resp.read().decode()
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.set_tunnel("127.0.0.1", target.port)
        with pytest.raises(OSError, match="502"):
            conn.request("GET", "/")
        return plain

    try:
        status, text = through_proxy(agent, check)
    finally:
        agent.proc.stop()
    assert status == 502
    assert f"127.0.0.1:{target.port}" in text and "agent refused outbound connections" in text and "--no-outbound" in text


def test_unreachable_target_answers_502_naming_it(outbound_agent, closed_port):
    def check(host, port):
        results = []
        for url in (f"http://127.0.0.1:{closed_port}/", "http://no-such-service.invalid:8080/"):
            conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
            conn.request("GET", url)
            resp = conn.getresponse()
            results.append((resp.status, resp.read().decode()))
        return results

    (refused_status, refused), (unknown_status, unknown) = through_proxy(outbound_agent, check)
    assert refused_status == 502 and f"cannot reach 127.0.0.1:{closed_port} from the agent's pod" in refused
    assert unknown_status == 502 and "cannot reach no-such-service.invalid:8080 from the agent's pod" in unknown


def test_no_agent_connection_answers_503(target):
    def check(host, port):
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.request("GET", f"http://127.0.0.1:{target.port}/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()

    status, text = through_proxy(None, check)
    assert status == 503 and "no connection to an agent is up" in text


@pytest.mark.parametrize(
    "request_bytes, reason",
    [
        (b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n", "forward proxy"),
        (b"GET https://orders/ HTTP/1.1\r\nHost: orders\r\n\r\n", "use CONNECT"),
        (b"CONNECT orders HTTP/1.1\r\nHost: orders\r\n\r\n", "expected host:port"),
        (b"GET http://orders:99999/ HTTP/1.1\r\nHost: orders\r\n\r\n", "invalid port"),
        (b"GET http://orders/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\nHost: o\r\n\r\n", "smuggling"),
        (b"\x16\x03\x01 not http\r\n\r\n", "malformed request line"),
    ],
)
def test_malformed_or_non_proxy_requests_answer_400(outbound_agent, request_bytes, reason):
    def check(host, port):
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.sendall(request_bytes)
            return read_response(s)

    status, body = through_proxy(outbound_agent, check)
    assert status == 400 and reason in body.decode(), body


# --- plain TCP -------------------------------------------------------------------------


def test_tcp_forward_relays_bytes_and_http(outbound_agent, target, closed_port):
    async def main():
        conn = await _connect(outbound_agent)
        dialer = SSHDialer(lambda: conn)
        forward = TCPForward(dialer, "127.0.0.1", target.port, 0)
        dead = TCPForward(dialer, "127.0.0.1", closed_port, 0)
        (_, port), (_, dead_port) = await forward.start(), await dead.start()

        def check():
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
                s.sendall(b"\x01ping")
                echoed = read_until(s, b"ping")
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            c.request("GET", "/forwarded")
            echo = echo_of(c.getresponse())
            with socket.create_connection(("127.0.0.1", dead_port), timeout=TIMEOUT) as s:
                closed = s.recv(10)
            return echoed, echo, closed

        try:
            return await asyncio.to_thread(check)
        finally:
            await forward.close()
            await dead.close()
            conn.close()

    echoed, echo, closed = asyncio.run(main())
    assert echoed == b"\x01ping" and echo["target"] == "/forwarded"
    assert closed == b""  # the pod could not connect: the local connection is closed


def test_a_server_that_speaks_first_is_heard_on_every_connection(outbound_agent):
    """MySQL, SMTP and gRPC servers speak before the client does. Their first bytes reach the
    agent while the channel for the connection is still opening; asyncssh's own forwarder
    dropped them (or kept them where nothing sent them on), and the client waited forever."""
    greeter = socket.create_server(("127.0.0.1", 0))

    def greet(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"220 greeter ready\r\n")
            conn.recv(1)  # until the client closes

    accept_each(greeter, greet)

    async def main():
        conn = await _connect(outbound_agent)
        forward = TCPForward(SSHDialer(lambda: conn), "127.0.0.1", greeter.getsockname()[1], 0)
        _, port = await forward.start()

        def greetings() -> list[bytes]:
            heard = []
            for _ in range(30):
                with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
                    heard.append(read_until(s, b"\r\n"))
            return heard

        try:
            return await asyncio.to_thread(greetings)
        finally:
            await forward.close()
            conn.close()

    try:
        assert asyncio.run(main()) == [b"220 greeter ready\r\n"] * 30
    finally:
        greeter.close()


def test_ctrl_c_stops_the_command_before_its_forwarded_connections_close(outbound_agent):
    """Leaving, ``intercept start`` stops COMMAND first, then closes the SSH sessions its
    forwards ride on: a worker holding a connection through ``--forward`` can still use it
    once asked to stop (here: to hand its work back), instead of finding it cut."""
    holder = socket.create_server(("127.0.0.1", 0))

    def hold(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"hello\n")
            if conn.makefile("rb").readline() == b"bye\n":
                conn.sendall(b"ok\n")

    accept_each(holder, hold)
    local_port, forward_port = free_port(), free_port()
    # each line in one write(2): the worker's output shares a pipe with intercept's lines
    worker = ("import os, signal, socket, sys\n"
              "server = socket.create_server(('127.0.0.1', %d))\n"
              "s = socket.create_connection(('127.0.0.1', %d))\n"
              "os.write(1, b'connected ' + s.makefile('rb').readline())\n"
              "def stopped(*_):\n"
              "    s.sendall(b'bye\\n')\n"
              "    handed_back = s.recv(16) == b'ok\\n'\n"
              "    os.write(1, b'handed back\\n' if handed_back else b'connection lost\\n')\n"
              "    sys.exit(0 if handed_back else 3)\n"
              "signal.signal(signal.SIGTERM, stopped)\n"
              "s.recv(1)\n"
              "os.write(1, b'connection lost\\n')\n"
              "sys.exit(3)\n") % (local_port, forward_port)
    client = Proc(INTERCEPT + ["start", "--agent", outbound_agent.ssh, "--credentials", str(outbound_agent.credentials),
                               "--port", str(local_port), "--name", "worker", "--no-watch",
                               "--forward", f"127.0.0.1:{holder.getsockname()[1]}:{forward_port}",
                               "--", sys.executable, "-c", worker])
    try:
        client.wait_for(r"^connected hello$")
        client.wait_for(r"^intercept: ready: ")
        client.signal(signal.SIGINT)
        assert client.finish() == 0, client.output
        assert "handed back" in client.lines and "connection lost" not in client.lines, client.output
    finally:
        client.stop()
        holder.close()


def test_tcp_forward_on_a_busy_port_says_which_forward_and_the_fix(target):
    async def main():
        with socket.create_server(("127.0.0.1", 0)) as busy:
            local_port = busy.getsockname()[1]
            with pytest.raises(UsageError, match=f"--forward orders:8080:{local_port}: cannot listen on 127.0.0.1:{local_port}"):
                await TCPForward(SSHDialer(lambda: None), "orders", 8080, local_port).start()

    asyncio.run(main())


def test_a_client_that_stops_reading_stops_the_sender(outbound_agent):
    """Flow control end to end: nothing on the way buffers without bound."""
    limit = 256 << 20

    async def main():
        sent, stalled, finished = 0, asyncio.Event(), asyncio.Event()

        async def produce(reader, writer):
            nonlocal sent
            block = b"x" * 65536
            try:
                while sent < limit:
                    writer.write(block)
                    try:
                        await asyncio.wait_for(writer.drain(), 1.0)  # detects the stall; no ordering relies on it
                    except asyncio.TimeoutError:
                        stalled.set()
                        return
                    sent += len(block)
            finally:
                finished.set()
                writer.transport.abort()

        producer = await asyncio.start_server(produce, "127.0.0.1", 0)
        conn = await _connect(outbound_agent)
        forward = TCPForward(SSHDialer(lambda: conn), "127.0.0.1", producer.sockets[0].getsockname()[1], 0)
        _, port = await forward.start()
        _, idle = await asyncio.open_connection("127.0.0.1", port)  # connected, never read
        try:
            await asyncio.wait_for(finished.wait(), 60)
            return stalled.is_set(), sent
        finally:
            idle.close()
            await forward.close()
            producer.close()
            conn.close()

    stalled, sent = asyncio.run(main())
    assert stalled, f"the sender wrote {sent >> 20} MiB to a client that reads nothing"
    assert sent < 64 << 20


# --- pure pieces -----------------------------------------------------------------------


def test_proxy_env_sets_both_spellings_and_keeps_localhost_direct():
    env = proxy_env("127.0.0.1", 3128)
    assert env["HTTP_PROXY"] == env["https_proxy"] == "http://127.0.0.1:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"
    assert proxy_env("::1", 3128)["http_proxy"] == "http://[::1]:3128"


def test_propagation_carries_exact_header_and_baggage_rules_only():
    route = Route(frozenset({parse_rule("header", "x-dev=alice"), parse_rule("baggage", "dev=al ice")}))
    assert propagation(route) == [("x-dev", "alice"), ("baggage", "dev=al%20ice")]
    with pytest.raises(UsageError, match="header-regex"):
        propagation(Route(frozenset({parse_rule("header-regex", "x-dev=al.*")})))
    with pytest.raises(UsageError, match="all traffic"):
        propagation(Route())
    with pytest.raises(UsageError):
        OutboundProxy(SSHDialer(lambda: None), [("x dev", "alice")])


def test_targets_and_authorities_parse_strictly():
    assert parse_absolute_target(b"http://orders.default.svc:8080/a?b") == (b"orders.default.svc:8080", "orders.default.svc", 8080, b"/a?b")
    assert parse_absolute_target(b"http://orders?q")[1:] == ("orders", 80, b"/?q")
    assert parse_authority(b"[::1]:443", None) == ("::1", 443)
    for bad in (b"[::1]", b"a:b:443", b"host:0", b"ho st:80"):
        with pytest.raises(ProtocolError):
            parse_authority(bad, None)


# --- the decisive test: separate network namespaces --------------------------------------


@needs_netns
def test_proxy_reaches_a_service_only_the_cluster_namespace_can_reach_and_propagates_the_header(tmp_path):
    """The "cluster" namespace has the service (10.88.0.1:8080, named ``orders`` in its
    /etc/hosts) and the agent; the "laptop" namespace reaches only the agent's address."""
    procs: list[Proc] = []
    with two_hosts("10.78.0") as hosts:
        hosts_dir = Path("/etc/netns") / hosts.cluster  # `ip netns exec` bind-mounts these files over /etc
        try:
            sh("ip", "-n", hosts.cluster, "addr", "add", "10.88.0.1/32", "dev", "lo")
            hosts_dir.mkdir(parents=True)
            (hosts_dir / "hosts").write_text("127.0.0.1 localhost\n10.88.0.1 orders orders.default.svc.cluster.local\n")
            in_cluster = hosts.run_in(hosts.cluster)
            app = Proc(in_cluster + [sys.executable, "-c",
                       "import sys, threading; sys.path.insert(0, '.'); from tests.apps import App; "
                       "App('orders-in-cluster', host='10.88.0.1', port=8080); print('up', flush=True); threading.Event().wait()"],
                       cwd=os.getcwd())
            procs.append(app)
            app.wait_for("^up")
            creds = tmp_path / "c.json"
            agent_proc = Proc(in_cluster + INTERCEPT + ["-v", "agent", "--listen", f"{hosts.cluster_ip}:0", "--ssh-listen", f"{hosts.cluster_ip}:0",
                                                        "--upstream", "10.88.0.1:8080", "--credentials", str(creds), "--allow-outbound"])
            procs.append(agent_proc)
            agent = Agent(agent_proc, creds)
            out = subprocess.run(
                hosts.run_in(hosts.laptop) + [sys.executable, "-c", _LAPTOP_SCRIPT, f"{hosts.cluster_ip}:{agent.ssh_port}", str(creds)],
                capture_output=True, text=True, timeout=60, cwd=os.getcwd(),
            )
            assert out.returncode == 0, out.stdout + out.stderr
            result = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            for proc in procs:
                proc.stop()
            shutil.rmtree(hosts_dir, ignore_errors=True)

    assert result["resolve"].startswith("gaierror"), "the laptop resolved the cluster-only name"
    assert result["direct"].startswith("OSError"), "the laptop reached the service directly"
    assert result["app"] == "orders-in-cluster"
    assert result["x-dev"] == ["alice"]
    assert result["host"] == ["orders:8080"]
    assert result["tunnel_app"] == "orders-in-cluster"


# Runs in the "laptop" namespace: try the service directly, then through the proxy.
_LAPTOP_SCRIPT = r"""
import asyncio, http.client, json, socket, sys
sys.path.insert(0, ".")
from tests.test_outbound import through_proxy

ssh, creds = sys.argv[1], sys.argv[2]

class Remote:  # what through_proxy needs of an Agent
    def __init__(self):
        from pathlib import Path
        self.ssh, self.credentials = ssh, Path(creds)

result = {}
try:
    socket.getaddrinfo("orders", 8080)
    result["resolve"] = "resolved"
except socket.gaierror as e:
    result["resolve"] = f"gaierror: {e}"
try:
    socket.create_connection(("10.88.0.1", 8080), timeout=3).close()
    result["direct"] = "connected"
except OSError as e:
    result["direct"] = f"OSError: {e}"

def check(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=20)
    conn.request("GET", "http://orders:8080/chain")
    resp = conn.getresponse()
    echo = json.loads(resp.read())
    assert resp.status == 200, echo
    result["app"] = resp.getheader("X-App")
    result["x-dev"] = [v for k, v in echo["headers"] if k.lower() == "x-dev"]
    result["host"] = [v for k, v in echo["headers"] if k.lower() == "host"]
    tunnel = http.client.HTTPConnection(host, port, timeout=20)
    tunnel.set_tunnel("orders", 8080)
    tunnel.request("GET", "/in-tunnel")
    resp = tunnel.getresponse()
    resp.read()
    result["tunnel_app"] = resp.getheader("X-App")

through_proxy(Remote(), check, propagate=[("x-dev", "alice")])
print(json.dumps(result))
"""
