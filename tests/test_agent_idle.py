"""When an agent counts as in use, for ``intercept gc`` (idle) and ``intercept uninstall`` (who uses it).

A real agent runs in this process, its SSH server and control channel real, with one thing
replaced: the clock it measures idleness by (``intercept.agent.agent.time.monotonic``), which
the test moves by hand. So "idle for 5 s, counted from the connect's end" is an exact value,
not a race with the machine's load, and nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from intercept.agent import agent as agent_module
from intercept.agent.agent import Agent
from intercept.agentconfig import AgentConfig
from intercept.client.session import AgentSession, InterceptOptions
from intercept.client.transport import DirectTransport
from intercept.credentials import load
from intercept.protocol import CheckOutbound, Hello, HelloReply, Refusal
from intercept.routing.match import Route
from tests.fakeclock import Clock

DENIED = ("192.0.2.1", 5432)  # the agent's fence refuses it: nothing is dialled


class Running:
    def __init__(self, agent: Agent, credentials: Path, clock: Clock) -> None:
        self.agent = agent
        self.credentials = credentials
        self.clock = clock
        self.closed = asyncio.Event()  # set each time the agent has seen a session go
        seen = agent.session_closed

        def session_closed(session, exc) -> None:
            seen(session, exc)
            self.closed.set()

        agent.session_closed = session_closed  # type: ignore[method-assign]

    def session(self, name: str) -> AgentSession:
        host, port = self.agent.ssh_address
        return AgentSession(InterceptOptions(DirectTransport(host, port), load(self.credentials), Route(frozenset()),
                                             name, 1))

    async def ask(self) -> HelloReply:
        """What intercept gc and uninstall see: a session that only asks."""
        asking = self.session("gc")
        await asking.connect()
        try:
            return await asking.ask(Hello())
        finally:
            self.closed.clear()
            await asking.leave()
            await self.closed.wait()

    async def leave(self, session: AgentSession) -> None:
        self.closed.clear()
        await session.close()
        await self.closed.wait()


@pytest.fixture
def with_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[Running], Awaitable[None]]], None]:
    """Run ``body(running)`` against a real agent of this process, its clock the test's."""
    clock = Clock()
    monkeypatch.setattr(agent_module, "time", clock)
    credentials = tmp_path / "credentials.json"

    def run(body: Callable[[Running], Awaitable[None]]) -> None:
        async def main() -> None:
            agent = Agent(AgentConfig(listen=(("127.0.0.1", 0),), ssh_listen=("127.0.0.1", 0), upstream=(("127.0.0.1", 1),),
                                      credentials=credentials, allow_outbound=True, outbound_deny=(DENIED[0],)))
            await agent.start()
            try:
                await body(Running(agent, credentials, clock))
            finally:
                await agent.close()

        asyncio.run(main())

    return run


def test_a_connect_is_in_use_from_login_before_its_first_connection(with_agent) -> None:
    async def body(running: Running) -> None:
        connect = running.session("alice-connect")
        await connect.open_unrouted()  # no connection yet: the command is still starting
        try:
            running.clock.now += 3600
            hello = await running.ask()
            assert hello.idle_seconds == 0.0
            assert hello.reaching == ["alice-connect"]
        finally:
            await running.leave(connect)

    with_agent(body)


def test_idle_counts_from_the_connects_end(with_agent) -> None:
    async def body(running: Running) -> None:
        connect = running.session("alice-connect")
        await connect.open_unrouted()
        running.clock.now += 1000  # the connect ran for 1000 s
        await running.leave(connect)
        running.clock.now += 5
        hello = await running.ask()
        assert hello.idle_seconds == 5.0  # not 1005: from the connect's end, not from the agent's start
        assert hello.reaching == []

    with_agent(body)


def test_a_session_that_only_asks_is_no_use(with_agent) -> None:
    async def body(running: Running) -> None:
        running.clock.now += 60
        await running.ask()
        running.clock.now += 60
        assert (await running.ask()).idle_seconds == 120.0  # gc's own questions keep nothing alive

    with_agent(body)


def test_a_refused_outbound_attempt_does_not_keep_the_agent_busy(with_agent) -> None:
    async def body(running: Running) -> None:
        probing = running.session("mallory")
        await probing.connect()  # not a connect's session: it never said it reaches the cluster
        try:
            refusal = await probing.request(CheckOutbound(*DENIED))
            assert isinstance(refusal, Refusal) and refusal.error == "fenced"
            running.clock.now += 30
            hello = await running.ask()
            assert hello.idle_seconds == 30.0 and hello.reaching == []
        finally:
            await running.leave(probing)
        running.clock.now += 30
        assert (await running.ask()).idle_seconds == 60.0  # its end did not count as a use either

    with_agent(body)


def test_a_refused_connection_does_not_keep_the_agent_busy(with_agent) -> None:
    async def body(running: Running) -> None:
        probing = running.session("mallory")
        await probing.connect()
        try:
            with pytest.raises(Exception, match="outbound fence"):
                await probing.conn.open_connection(*DENIED)
            running.clock.now += 30
            hello = await running.ask()
            assert hello.idle_seconds == 30.0 and hello.reaching == []
        finally:
            await running.leave(probing)

    with_agent(body)
