"""A listener per Service address: connections dialled from a real agent, the fence's refusal at connect."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from intercept.access.forward import ServiceListeners
from intercept.access.names import Entry
from intercept.client.outbound import SSHDialer
from intercept.client.session import AgentSession, InterceptOptions
from intercept.client.transport import DirectTransport
from intercept.credentials import load
from intercept.protocol import Hello
from intercept.routing.match import Route
from tests.apps import App
from tests.conftest import Agent, free_port, start_agent

TIMEOUT = 15


@pytest.fixture(scope="module")
def allowed() -> Iterator[App]:
    app = App("allowed")
    yield app
    app.close()


@pytest.fixture(scope="module")
def denied() -> Iterator[App]:
    app = App("denied")
    yield app
    app.close()


@pytest.fixture(scope="module")
def fenced_agent(allowed: App, denied: App, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    agent = start_agent(tmp_path_factory.mktemp("access"), allowed.port, "--allow-outbound",
                        "--outbound-deny", f"127.0.0.1:{denied.port}")
    agent.proc.wait_for(r"outbound fence")
    yield agent
    agent.proc.stop()


def entry(name: str, address: str, port: int) -> Entry:
    return Entry(f"shop/{name}", None, address, (name, f"{name}.shop"), "127.0.0.1", (port,))


def with_listeners(agent: Agent, entries: list[Entry], check_in_thread) -> tuple[object, list[tuple[str, bool]]]:
    lines: list[tuple[str, bool]] = []

    async def main():
        host, port = agent.ssh.rsplit(":", 1)
        session = AgentSession(InterceptOptions(DirectTransport(host, int(port)), load(agent.credentials),
                                                Route(frozenset()), "access-test", 1))
        await session.open_unrouted()
        listeners = ServiceListeners(SSHDialer(lambda: session.conn), lambda line, warning: lines.append((line, warning)),
                                     session.check_outbound)
        try:
            await listeners.update(entries)
            return await asyncio.to_thread(check_in_thread, listeners, asyncio.get_running_loop())
        finally:
            await listeners.close()
            await session.close()

    return asyncio.run(main()), lines


def echo(address: str, port: int) -> bytes:
    with socket.create_connection((address, port), timeout=TIMEOUT) as s:
        s.sendall(b"\x01ping")
        data = b""
        while not data.endswith(b"ping"):
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
        return data


def test_a_service_address_reaches_the_service_through_the_agent_and_a_fenced_one_refuses_at_connect(
        fenced_agent, allowed, denied):
    redis, secret = entry("redis", "127.77.0.1", allowed.port), entry("secret", "127.77.0.2", denied.port)

    def check(listeners, loop):
        answer = echo("127.77.0.1", allowed.port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.77.0.2", denied.port), timeout=TIMEOUT)
        return answer, listeners.listening

    (answer, listening), lines = with_listeners(fenced_agent, [redis, secret], check)
    assert answer == b"\x01ping"
    assert listening == [("127.77.0.1", allowed.port)]
    [(line, warning)] = lines
    assert warning and line.startswith(f"secret:{denied.port} is not reachable: refused by the outbound fence")
    assert f"127.0.0.1:{denied.port}" in line  # the rule that refused it


def test_a_connection_the_pod_cannot_make_is_reset_and_said_once(fenced_agent):
    closed = free_port()
    gone = entry("gone", "127.77.0.3", closed)

    def check(listeners, loop):
        errors = []
        for _ in range(2):
            with socket.create_connection(("127.77.0.3", closed), timeout=TIMEOUT) as s:
                try:
                    errors.append(s.recv(10))
                except ConnectionResetError as e:
                    errors.append(type(e))
        return errors

    errors, lines = with_listeners(fenced_agent, [gone], check)
    assert errors == [ConnectionResetError, ConnectionResetError]
    assert len(lines) == 1 and lines[0][0].startswith(f"gone:{closed}: cannot reach 127.0.0.1:{closed} from the agent's pod")


def test_a_service_that_goes_away_stops_listening_and_one_that_comes_listens(fenced_agent, allowed):
    first = entry("first", "127.77.0.4", allowed.port)
    later = entry("later", "127.77.0.5", allowed.port)

    def check(listeners, loop):
        before = echo("127.77.0.4", allowed.port)
        asyncio.run_coroutine_threadsafe(listeners.update([later]), loop).result(TIMEOUT)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.77.0.4", allowed.port), timeout=TIMEOUT)
        return before, echo("127.77.0.5", allowed.port)

    (before, after), _ = with_listeners(fenced_agent, [first], check)
    assert before == after == b"\x01ping"


def test_a_session_that_reaches_the_cluster_keeps_the_agent_from_idling(fenced_agent: Agent, allowed: App):
    """intercept gc removes agents idle for --idle; a connect holds no route, but its agent is in use."""
    host, port = fenced_agent.ssh.rsplit(":", 1)

    def session(name: str) -> AgentSession:
        return AgentSession(InterceptOptions(DirectTransport(host, int(port)), load(fenced_agent.credentials),
                                             Route(frozenset()), name, 1))

    async def idle() -> float:
        asking = session("gc")  # as intercept gc asks: a session that only asks is no use
        await asking.connect()
        try:
            return (await asking.ask(Hello())).idle_seconds
        finally:
            await asking.leave()

    async def main() -> float:
        connect = session("connect")
        await connect.open_unrouted()
        assert await connect.check_outbound("127.0.0.1", allowed.port) is None  # as connect asks for each Service
        try:
            return await idle()
        finally:
            await connect.close()

    assert asyncio.run(main()) == 0.0
    # That the idle time counts from the connect's end (exactly, the agent's clock moved by hand, no
    # threshold): tests/test_agent_idle.py.
