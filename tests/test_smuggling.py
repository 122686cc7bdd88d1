"""Request smuggling, end to end: a real agent in front of real app servers.

The app is uvicorn with each of its two parsers, llhttp (``--http httptools``, its
default) and h11, behind a relay that records what every upstream connection carried.
Where the agent and the app could disagree on where a request ends, a request could
reach the app that routing never saw (carrying a developer's header), or one user's
bytes could land in another user's request on a shared upstream connection. These
tests send the shapes that did that and check what the app actually received.
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest

from intercept.routing.http1 import forwarding_fields
from tests.apps import App, Recorder, read_responses
from tests.conftest import Agent, Proc, free_port, start_agent, start_client

pytest.importorskip("uvicorn")
pytest.importorskip("httptools")

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    agent: Agent
    recorder: Recorder
    log: Path
    parser: str

    def logged(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.agent.http_port), timeout=30)


@pytest.fixture(scope="module", params=["httptools", "h11"])
def stack(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"smuggling-{request.param}")
    log = tmp / "requests.jsonl"
    log.touch()
    port = free_port()
    server = Proc(
        [sys.executable, "-m", "uvicorn", "tests.asgi_app:app", "--http", request.param,
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
        env={"APP_LOG": str(log)}, cwd=ROOT,
    )
    server.wait_for(r"Uvicorn running on")
    recorder = Recorder(port)
    agent = start_agent(tmp, recorder.port)
    alice = App("alice")
    client = start_client(agent, alice.port, "--header", "x-dev=alice")
    yield Stack(agent, recorder, log, request.param)
    client.stop()
    agent.proc.stop()
    alice.close()
    recorder.close()
    server.stop()


def read_response(sock: socket.socket, method: bytes = b"GET") -> tuple[h11.Response, bytes]:
    return read_responses(sock, 1, [method])[0]


def send_ignoring_close(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the agent closed the connection: what we send goes nowhere


def drain(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def app_header(resp: h11.Response) -> bytes:
    return dict(resp.headers).get(b"x-app", b"")


def test_an_upgrade_with_a_body_is_refused_and_its_body_never_reaches_the_app(stack):
    outer = b"POST /outer HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: foo\r\nContent-Length: 49\r\n\r\n"
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\nx-dev: alice\r\n\r\n"
    assert len(smuggled) == 49
    with stack.connect() as s:
        s.sendall(outer)
        resp, body = read_response(s)
        send_ignoring_close(s, smuggled)  # what llhttp would read as a new request
        drain(s)
    assert resp.status_code == 400 and b"smuggling" in body
    assert (b"x-intercept-agent", b"error") in resp.headers
    with stack.connect() as s:
        s.sendall(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s)[0].status_code == 200
    paths = [e["path"] for e in stack.logged()]
    assert "/outer" not in paths and "/smuggled" not in paths
    assert not any(b"/outer" in c or b"/smuggled" in c for c in stack.recorder.carried())


def test_the_next_users_request_never_lands_in_an_attackers_body(stack):
    store = b"POST /store HTTP/1.1\r\nHost: a\r\nContent-Length: 60\r\n\r\n"
    outer = b"POST /outer HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: foo\r\nContent-Length: %d\r\n\r\n" % len(store)
    with stack.connect() as s:
        s.sendall(outer)
        assert read_response(s)[0].status_code == 400
        send_ignoring_close(s, store)
    with stack.connect() as s:
        s.sendall(b"GET /victim HTTP/1.1\r\nHost: a\r\nCookie: session=secret-of-bob\r\n\r\n")
        resp, body = read_response(s)
    assert resp.status_code == 200 and body == b"GET /victim 0\n"
    logged = stack.logged()
    victim = [e for e in logged if e["path"] == "/victim"]
    assert victim and ["cookie", "session=secret-of-bob"] in victim[-1]["headers"]
    assert not any("secret-of-bob" in e["body"] for e in logged)
    assert "/store" not in [e["path"] for e in logged]


def forwarded(message: bytes) -> bytes:
    """``message`` as the agent forwards it: its head gains the client's address lines."""
    end = message.index(b"\r\n\r\n") + 2
    return message[:end] + forwarding_fields("127.0.0.1") + message[end:]


def test_a_declined_upgrade_keeps_the_connection_in_step_and_its_link_is_not_reused(stack):
    plain = b"GET /plain-%s HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n" % stack.parser.encode()
    with stack.connect() as s:
        s.sendall(
            plain
            + b"GET /next HTTP/1.1\r\nHost: a\r\nx-dev: alice\r\n\r\n"
            + b"GET /third-%s HTTP/1.1\r\nHost: a\r\n\r\n" % stack.parser.encode()
        )
        s.shutdown(socket.SHUT_WR)  # and the agent closes once all three are answered
        replies = read_responses(drain(s), 3)
    assert [app_header(r) for r, _ in replies] == [b"cluster", b"alice", b"cluster"]
    assert replies[0][1].startswith(b"GET /plain") and replies[2][1].startswith(b"GET /third")
    carried_plain = stack.recorder.wait_for(b"/plain-" + stack.parser.encode())
    assert carried_plain.closed.wait(30), "the link of a declined upgrade must be closed, not reused"
    assert bytes(carried_plain.sent).endswith(forwarded(plain)), "nothing may follow a declined upgrade on its link"
    assert "/next" not in [e["path"] for e in stack.logged()]


def test_the_pool_never_takes_back_a_link_in_the_middle_of_a_message(stack):
    head = b"POST /partial-%s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n" % stack.parser.encode()
    with stack.connect() as s:
        s.sendall(head)
        partial = stack.recorder.wait_for(b"/partial-" + stack.parser.encode())
        s.sendall(b"zz\r\n")  # a malformed chunk: refused mid-body
        resp, body = read_response(s)
    assert resp.status_code == 400 and b"chunk" in body
    assert partial.closed.wait(30), "a link left in the middle of a request must be closed"
    assert bytes(partial.sent).endswith(forwarded(head))
    for i in range(5):  # whichever pooled link they get, every request arrives whole and alone
        with stack.connect() as s:
            s.sendall(b"GET /whole-%d HTTP/1.1\r\nHost: a\r\nCookie: n=%d\r\n\r\n" % (i, i))
            assert read_response(s)[1] == b"GET /whole-%d 0\n" % i
    assert not any("Cookie" in e["body"] or "/whole" in e["body"] for e in stack.logged())


def test_nearly_http_first_bytes_are_refused_not_relayed(stack):
    for first in (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", b"*1\r\n$4\r\nPING\r\n"):
        with stack.connect() as s:
            s.sendall(first)
            s.sendall(b"GET /relayed HTTP/1.1\r\nHost: a\r\nx-dev: alice\r\n\r\n")
            resp, _ = read_response(s)
            drain(s)
        assert resp.status_code == 400 and (b"x-intercept-agent", b"error") in resp.headers
    assert "/relayed" not in [e["path"] for e in stack.logged()]
    assert not any(b"/relayed" in c for c in stack.recorder.carried())


def test_a_long_method_is_routed_like_any_other(stack):
    method = b"X" * 40
    with stack.connect() as s:
        s.sendall(method + b" /long HTTP/1.1\r\nHost: a\r\nx-dev: alice\r\n\r\n")
        resp, body = read_response(s, method=b"GET")
    assert app_header(resp) == b"alice"
    assert json.loads(body)["method"] == method.decode()
