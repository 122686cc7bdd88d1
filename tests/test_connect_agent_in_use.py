"""``intercept uninstall`` and ``intercept gc`` ask intercept connect's own agent whether
connects use it, as for an injected agent's routes (issue 25).

The stand-in API server (``tests/kubeapi.py``) holds the Deployment and its Secret and
port-forwards its pod to a real agent running in this process, with the Secret's
credentials: the stand-in is kept here because it sequences what a real server cannot on
demand (a connect logging in between gc's question and its delete, a Deployment changed
between gc's read and its delete). Its idle clock is moved by hand: nothing sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from intercept import api
from intercept.agent import agent as agent_module
from intercept.agent.agent import Agent
from intercept.agentconfig import AgentConfig
from intercept.client.session import AgentSession, InterceptOptions
from intercept.client.transport import DirectTransport
from intercept.credentials import load
from intercept.errors import AgentInUse
from intercept.kube import connect_agent
from intercept.kube.config import connect
from intercept.kube.inject import InjectOptions
from intercept.routing.match import Route
from tests.fakeclock import Clock
from tests.kubeapi import KubeAPI

NS = "default"
IMAGE = "registry.example/intercept-agent:0.1.0"


class Bed:
    """The stand-in with intercept connect's own agent in it, its pod a real agent of this process."""

    def __init__(self, server: KubeAPI, kubeconfig: Path, agent: Agent, credentials: Path, clock: Clock) -> None:
        self.server, self.kubeconfig, self.agent, self.credentials, self.clock = server, kubeconfig, agent, credentials, clock

    async def connect(self, name: str) -> AgentSession:
        """A connect's session (as api.connect opens it), straight to the agent."""
        host, port = self.agent.ssh_address
        session = AgentSession(InterceptOptions(DirectTransport(host, port), load(self.credentials), Route(frozenset()),
                                                name, 1))
        await session.open_unrouted()
        return session

    async def uninstall(self, **kwargs):
        return await asyncio.to_thread(api.uninstall, kubeconfig=str(self.kubeconfig), namespace=NS, **kwargs)

    def present(self) -> bool:
        return self.server.get("Deployment", NS, connect_agent.NAME) is not None


@pytest.fixture
def with_bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[Bed], Awaitable[None]]], None]:
    clock = Clock()
    monkeypatch.setattr(agent_module, "time", clock)

    def run(body: Callable[[Bed], Awaitable[None]]) -> None:
        with KubeAPI() as server:
            kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
            connect_agent.ensure(connect(kubeconfig).api, NS, InjectOptions(image=IMAGE), lambda line: None,
                                 poll_interval=0)
            secret = server.get("Secret", NS, "intercept-intercept-connect")
            credentials = tmp_path / "credentials.json"
            credentials.write_text(base64.b64decode(secret["data"]["credentials.json"]).decode())
            json.loads(credentials.read_text())

            async def main() -> None:
                agent = Agent(AgentConfig(listen=(("127.0.0.1", 0),), ssh_listen=("127.0.0.1", 0),
                                          upstream=(("127.0.0.1", 1),), credentials=credentials, allow_outbound=True))
                await agent.start()
                pod = next(p for p in server.objects("Pod", NS) if p["metadata"]["name"].startswith(connect_agent.NAME))
                server.forward(pod["metadata"]["name"], agent.ssh_address[1])
                try:
                    await body(Bed(server, kubeconfig, agent, credentials, clock))
                finally:
                    await agent.close()

            asyncio.run(main())

    return run


def test_uninstall_of_the_connect_agent_is_refused_while_a_connect_uses_it(with_bed) -> None:
    async def body(bed: Bed) -> None:
        alice = await bed.connect("alice-connect")
        try:
            for kwargs in ({"service": connect_agent.NAME}, {"all": True}):
                with pytest.raises(AgentInUse) as refused:
                    await bed.uninstall(**kwargs)
                assert refused.value.exit_code == 16
                assert f"intercept connect's own agent ({connect_agent.NAME}) serves alice-connect" in str(refused.value)
                assert "--force" in str(refused.value)
                assert bed.present()
        finally:
            await alice.close()

    with_bed(body)


def test_uninstall_force_removes_the_connect_agent_in_use(with_bed) -> None:
    async def body(bed: Bed) -> None:
        alice = await bed.connect("alice-connect")
        try:
            removed = await bed.uninstall(service=connect_agent.NAME, force=True)
            assert removed.deleted == (f"Deployment/{connect_agent.NAME}",)
            assert not bed.present()
        finally:
            await alice.close()

    with_bed(body)


def test_uninstall_removes_the_connect_agent_nobody_uses(with_bed) -> None:
    async def body(bed: Bed) -> None:
        removed = await bed.uninstall(all=True)
        assert f"Deployment/{connect_agent.NAME}" in removed.deleted
        assert not bed.present()

    with_bed(body)
