"""The route on every replica: real agent processes as the replicas of one service.

Each test runs a :class:`~intercept.client.fleet.Fleet` on its own event loop thread and
feeds it replica sets over time, as the pod watch does in a cluster; HTTP requests are
sent through each agent, as the Service would spread them. Synchronization is on the
fleet's events and the agents' log lines, never on sleeps.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from intercept.client import DirectTransport, Event, InterceptOptions
from intercept.client.fleet import Fleet, Replica
from intercept.credentials import load
from intercept.errors import AgentUnreachable, RouteConflict
from intercept.routing.match import HeaderEquals, Route
from tests.apps import App, Relay
from tests.conftest import LINE_TIMEOUT, Agent, free_port, start_agent, start_client


class RunningFleet:
    """A Fleet on its own loop thread: the test sets replica sets and waits for events."""

    def __init__(self, options: InterceptOptions, **fleet_options: Any) -> None:
        self.options = options
        self.fleet_options = fleet_options
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._finished = False
        self._loop = asyncio.new_event_loop()
        self._sets: asyncio.Queue[list[Replica]] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)
        self._thread.start()

    async def _main(self) -> None:
        try:
            await Fleet(self.options, self._report, **self.fleet_options).run(self._source(), self._stop)
        except BaseException as e:  # handed to the test thread, which asserts on it
            self.error = e
        finally:
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    async def _source(self):
        while True:
            yield await self._sets.get()

    def _report(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def set(self, *agents: Agent, **named: Agent) -> int:
        """Make the replica set these agents (named after their SSH port, or as given); returns the event mark."""
        return self.set_replicas(*[replica(a) for a in agents], *[replica(a, name) for name, a in named.items()])

    def set_replicas(self, *replicas: Replica) -> int:
        mark = len(self.events)
        self._loop.call_soon_threadsafe(self._sets.put_nowait, list(replicas))
        return mark

    def wait_for(self, kind: str, pattern: str = "", start: int = 0) -> Event:
        """The first event of ``kind`` whose message matches ``pattern``, from index ``start``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + LINE_TIMEOUT
        with self._changed:
            while True:
                for event in self.events[start:]:
                    if event.kind == kind and rx.search(event.message):
                        return event
                if self._finished:
                    raise AssertionError(f"fleet ended ({self.error!r}) before {kind}: {pattern!r}; events: {self.lines()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kind}: {pattern!r} within {LINE_TIMEOUT}s; events: {self.lines()}")
                self._changed.wait(left)

    def wait_finished(self) -> BaseException | None:
        with self._changed:
            if not self._changed.wait_for(lambda: self._finished, LINE_TIMEOUT):
                raise AssertionError(f"fleet still running; events: {self.lines()}")
        self._thread.join(LINE_TIMEOUT)
        self._loop.close()
        return self.error

    def stop(self) -> None:
        if not self._finished:
            self._loop.call_soon_threadsafe(self._stop.set)
        error = self.wait_finished()
        if error is not None:
            raise error

    def kinds(self, start: int = 0) -> list[str]:
        return [e.kind for e in self.events[start:]]

    def lines(self) -> list[str]:
        return [f"{e.kind}: {e.message}" for e in self.events]


def replica(agent: Agent, name: str | None = None) -> Replica:
    return Replica(name or f"pod-{agent.ssh_port}", DirectTransport("127.0.0.1", agent.ssh_port))


def options_for(agent: Agent, header: str, name: str, local_port: int) -> InterceptOptions:
    key, value = header.split("=", 1)
    return InterceptOptions(
        transport=DirectTransport("127.0.0.1", agent.ssh_port),  # not dialled: each replica brings its own
        credentials=load(agent.credentials),
        route=Route(frozenset([HeaderEquals(key, value)])),
        name=name,
        local_port=local_port,
    )


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Secret for all replicas of the workload, as in a cluster."""
    return tmp_path_factory.mktemp("fleet") / "credentials.json"


@pytest.fixture(scope="module")
def replicas(cluster_app: App, credentials: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Agent]]:
    """Three agents in front of the same cluster app: the replicas of one service."""
    tmp = tmp_path_factory.mktemp("replicas")
    agents = [start_agent(tmp, cluster_app.port, credentials=credentials) for _ in range(3)]
    yield agents
    for a in agents:
        a.proc.stop()


@pytest.fixture
def fleets() -> Iterator[list[RunningFleet]]:
    running: list[RunningFleet] = []
    yield running
    for fleet in running:
        if not fleet._finished:
            fleet.stop()


def start_fleet(fleets: list[RunningFleet], agent: Agent, header: str, name: str, local_port: int) -> RunningFleet:
    fleet = RunningFleet(options_for(agent, header, name, local_port))
    fleets.append(fleet)
    return fleet


def test_matching_requests_reach_me_through_every_replica(replicas, local_app, fleets):
    fleet = start_fleet(fleets, replicas[0], "x-dev=alice", "alice", local_app.port)
    fleet.set(*replicas)
    ready = fleet.wait_for("ready")
    assert ready.message == f"requests with x-dev: alice now reach localhost:{local_app.port} (3 replicas)"
    for agent in replicas:
        for _ in range(3):
            assert agent.app_of({"x-dev": "alice"}) == "local"


def test_other_requests_reach_the_cluster_through_every_replica(replicas, local_app, fleets):
    fleet = start_fleet(fleets, replicas[0], "x-dev=bea", "bea", local_app.port)
    fleet.set(*replicas)
    fleet.wait_for("ready")
    for agent in replicas:
        assert agent.app_of() == "cluster"
        assert agent.app_of({"x-dev": "someone-else"}) == "cluster"
        assert agent.app_of({"x-dev": "bea"}) == "local"


def test_a_replica_that_appears_gets_the_route(replicas, local_app, fleets):
    first, second, third = replicas
    fleet = start_fleet(fleets, first, "x-dev=cleo", "cleo", local_app.port)
    fleet.set(first, second)
    assert fleet.wait_for("ready").message.endswith("(2 replicas)")
    assert third.app_of({"x-dev": "cleo"}) == "cluster"
    mark = fleet.set(first, second, third)
    joined = fleet.wait_for("joined", start=mark)
    assert joined.message == (
        f"replica {replica(third).name}: requests with x-dev: cleo reach localhost:{local_app.port} through it too (3 replicas)"
    )
    assert [a.app_of({"x-dev": "cleo"}) for a in replicas] == ["local"] * 3


def test_a_removed_replica_has_its_session_closed_and_its_route_dropped(replicas, local_app, fleets):
    first, second, third = replicas
    fleet = start_fleet(fleets, first, "x-dev=dora", "dora", local_app.port)
    fleet.set(*replicas)
    fleet.wait_for("ready")
    seen = len(second.proc.lines)
    mark = fleet.set(first, third)
    assert fleet.wait_for("gone", start=mark).message == f"replica {replica(second).name} is gone (2 replicas)"
    # The agent drops a session's routes when its connection closes, and says so.
    second.proc.wait_for(r"dropped route x-dev: dora of dora \(", start=seen)
    assert second.app_of({"x-dev": "dora"}) == "cluster"
    assert first.app_of({"x-dev": "dora"}) == "local"
    assert third.app_of({"x-dev": "dora"}) == "local"


def test_a_killed_replica_is_registered_again_when_it_restarts(cluster_app, credentials, local_app, tmp_path, fleets):
    steady = start_agent(tmp_path, cluster_app.port, credentials=credentials)
    flaky = start_agent(tmp_path, cluster_app.port, credentials=credentials)
    try:
        fleet = start_fleet(fleets, steady, "x-dev=edna", "edna", local_app.port)
        fleet.set(steady, flaky)
        fleet.wait_for("ready")
        assert flaky.app_of({"x-dev": "edna"}) == "local"
        ports = (flaky.http_port, flaky.ssh_port)
        mark = len(fleet.events)
        flaky.proc.signal(signal.SIGKILL)  # the agent container crashes; the pod stays
        flaky.proc.finish()
        flaky.proc.stop()
        fleet.wait_for("reconnecting", rf"connection to agent 127\.0\.0\.1:{flaky.ssh_port} lost", start=mark)
        assert steady.app_of({"x-dev": "edna"}) == "local"  # the other replica keeps routing meanwhile
        flaky = start_agent(tmp_path, cluster_app.port, credentials=credentials, ports=ports)
        again = fleet.wait_for("reconnected", start=mark)
        assert again.message == (
            f"replica pod-{ports[1]}: requests with x-dev: edna reach localhost:{local_app.port} again (2 replicas)"
        )
        assert flaky.app_of({"x-dev": "edna"}) == "local"
        assert steady.app_of({"x-dev": "edna"}) == "local"
    finally:
        steady.proc.stop()
        flaky.proc.stop()


def test_a_conflict_on_one_replica_removes_the_route_from_the_others(replicas, local_app, fleets):
    first, second, third = replicas
    other_app = App("bob's")
    bob = start_client(third, other_app.port, "--header", "x-dev=fay", "--name", "bob")
    try:
        fleet = start_fleet(fleets, first, "x-dev=fay", "fay", local_app.port)
        fleet.set(first, second)
        fleet.wait_for("ready")
        assert first.app_of({"x-dev": "fay"}) == "local"
        fleet.set(first, second, third)
        error = fleet.wait_finished()
        assert isinstance(error, RouteConflict) and error.exit_code == 6
        assert error.holder == "bob"
        assert f"agent 127.0.0.1:{third.ssh_port}: route x-dev: fay is already held by bob" in str(error)
        # The fleet returns only after the route is off every replica.
        assert first.app_of({"x-dev": "fay"}) == "cluster"
        assert second.app_of({"x-dev": "fay"}) == "cluster"
        assert third.app_of({"x-dev": "fay"}) == "bob's"
        assert "left" not in fleet.kinds()
    finally:
        bob.stop()
        other_app.close()


def test_an_unreachable_replica_holds_ready_back_until_it_leaves_the_set(replicas, local_app, fleets):
    first = replicas[0]
    dead = free_port()
    fleet = start_fleet(fleets, first, "x-dev=gus", "gus", local_app.port)
    fleet.set_replicas(replica(first, "web-0"), Replica("web-1", DirectTransport("127.0.0.1", dead)))
    waiting = fleet.wait_for("waiting", rf"agent 127\.0\.0\.1:{dead} is unreachable: .*; retrying in 0\.5s")
    assert "check the address and that the agent runs" in waiting.message
    fleet.wait_for("waiting", r"retrying in 1s")  # still retried, and still not ready
    assert "ready" not in fleet.kinds()
    mark = fleet.set_replicas(replica(first, "web-0"))
    ready = fleet.wait_for("ready", start=mark)
    assert ready.message.endswith("(1 replica)")
    assert first.app_of({"x-dev": "gus"}) == "local"


def test_no_reachable_replica_is_an_error_with_its_exit_code(replicas, local_app, fleets):
    dead = [free_port(), free_port()]
    fleet = start_fleet(fleets, replicas[0], "x-dev=hal", "hal", local_app.port)
    fleet.set_replicas(*[Replica(f"web-{i}", DirectTransport("127.0.0.1", p)) for i, p in enumerate(dead)])
    error = fleet.wait_finished()
    assert isinstance(error, AgentUnreachable) and error.exit_code == 3
    assert re.search(rf"agent 127\.0\.0\.1:({dead[0]}|{dead[1]}) is unreachable", str(error))
    assert "ready" not in fleet.kinds()


def test_stopping_removes_the_route_from_every_replica(replicas, local_app, fleets):
    fleet = start_fleet(fleets, replicas[0], "x-dev=ivy", "ivy", local_app.port)
    fleet.set(*replicas)
    fleet.wait_for("ready")
    assert [a.app_of({"x-dev": "ivy"}) for a in replicas] == ["local"] * 3
    fleet.stop()
    assert fleet.events[-1].kind == "left"
    assert fleet.events[-1].message == "requests with x-dev: ivy go to the cluster again"
    assert [a.app_of({"x-dev": "ivy"}) for a in replicas] == ["cluster"] * 3


def test_a_replica_that_moved_is_dialled_at_its_new_address(replicas, local_app, fleets):
    first, second, third = replicas
    fleet = start_fleet(fleets, first, "x-dev=jon", "jon", local_app.port)
    fleet.set(first, **{"web-0": second})
    fleet.wait_for("ready")
    seen = len(second.proc.lines)
    mark = fleet.set(first, **{"web-0": third})  # the pod was recreated with a new IP
    fleet.wait_for("reconnected", r"^replica web-0: ", start=mark)
    second.proc.wait_for(r"dropped route x-dev: jon of jon", start=seen)
    assert second.app_of({"x-dev": "jon"}) == "cluster"
    assert third.app_of({"x-dev": "jon"}) == "local"
    assert "gone" not in fleet.kinds(mark)


def test_no_replica_yet_is_said_and_the_first_one_makes_it_ready(replicas, local_app, fleets):
    fleet = start_fleet(fleets, replicas[0], "x-dev=kay", "kay", local_app.port)
    fleet.set()
    assert fleet.wait_for("waiting").message == "no agent replica is ready yet; waiting for one"
    fleet.set(replicas[1])
    assert fleet.wait_for("ready").message.endswith("(1 replica)")
    assert replicas[1].app_of({"x-dev": "kay"}) == "local"


def test_a_pod_ip_that_cannot_be_reached_falls_back_to_the_port_forward_and_says_how_otherwise(tmp_path):
    """In-cluster workspaces dial the agent pod's IP; a NetworkPolicy that admits only the
    app's port drops those packets, and the port-forward (here: the agent's own address)
    takes over. When both fail, the error says both and how to admit the workspace."""
    from intercept import protocol
    from intercept.client.session import AgentSession
    from intercept.client.transport import FallbackTransport

    cluster = App("cluster")
    agent = start_agent(tmp_path, cluster.port)
    try:
        blocked = DirectTransport("127.0.0.1", free_port(), timeout=5)  # nothing listens: refused, as dropped would be
        forward = DirectTransport("127.0.0.1", agent.ssh_port)
        transport = FallbackTransport(blocked, forward)
        options = InterceptOptions(transport=transport, credentials=load(agent.credentials),
                                   route=Route(frozenset({HeaderEquals("x-dev", "ws")})), name="ws", local_port=1)

        async def hello(options: InterceptOptions) -> protocol.HelloReply:
            session = AgentSession(options)
            await session.connect()
            try:
                return await session.request(protocol.Hello())
            finally:
                await session.leave()

        assert asyncio.run(hello(options)).protocol == protocol.PROTOCOL_VERSION
        assert transport.fell_back and transport.describe() == forward.describe()
        both = FallbackTransport(blocked, DirectTransport("127.0.0.1", free_port(), timeout=5))
        with pytest.raises(AgentUnreachable, match="admit this workspace to the agent's SSH port"):
            asyncio.run(hello(InterceptOptions(transport=both, credentials=options.credentials, route=options.route,
                                               name="ws", local_port=1)))
    finally:
        agent.proc.stop()
        cluster.close()


def test_a_silent_agent_is_said_while_requests_wait_and_its_return_too(replicas, local_app):
    """When the link goes silent, the connection stays up for up to 15 s (keepalive) while the
    agent holds the requests routed here; the developer is told at once, not after 15 s."""
    agent = replicas[0]
    link = Relay(agent.ssh_port)
    fleet = RunningFleet(options_for(agent, "x-dev=hal", "hal", local_app.port), silence_notice=0.5)
    try:
        fleet.set_replicas(Replica("web-0", DirectTransport("127.0.0.1", link.port)))
        fleet.wait_for("ready")
        mark = len(fleet.events)
        link.hold()
        silent = fleet.wait_for("reconnecting", r"has not answered for 0.5s: requests routed here wait there until it does", start=mark)
        assert silent.message.startswith(f"agent 127.0.0.1:{link.port} has not answered")
        link.carry()
        fleet.wait_for("reconnected", rf"^agent 127.0.0.1:{link.port} answers again$", start=mark)
        assert "reconnecting: connection to agent" not in "\n".join(fleet.lines())  # the connection itself held
    finally:
        link.carry()
        fleet.stop()
        link.close()
