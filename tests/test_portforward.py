"""SSH through the Kubernetes port-forward API, with the real kubernetes client.

A stand-in API server speaks the WebSocket port-forward protocol the client uses
(``v4.channel.k8s.io``: per port a data and an error channel, each opened by a frame
carrying the port number) and relays to real agents on loopback, as the kubelet relays
to a pod's port. It can refuse (403, 404), report a refused pod port on the error
channel, and drop a forward, so every path of the transport runs here; a real cluster
runs it in ``e2e/``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest
from kubernetes.client import ApiClient, Configuration

from intercept.client import AgentSession, InterceptOptions
from intercept.client.fleet import Replica
from intercept.kube.portforward import PortForwardTransport
from intercept.credentials import load
from intercept.errors import AgentUnreachable
from intercept.routing.match import HeaderEquals, Route
from tests.apps import accept_each
from tests.conftest import LINE_TIMEOUT, free_port, start_agent
from tests.kubeapi import PortForwarder, close
from tests.test_fleet import RunningFleet

# The client's relay thread must never die of a reset or a broken pipe (see portforward.py).
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


class PortForwardAPI(PortForwarder):
    """A bare API server that serves only ``pods/NAME/portforward`` (no auth), relaying to loopback ports.

    The protocol and the relay are :class:`tests.kubeapi.PortForwarder`'s (``pods``,
    ``forbidden``, ``forwards``, ``drop``, ``release_stale``); the full stand-in serves
    the same path among the others; the real path (API server -> kubelet -> pod) is
    ``tests/test_cluster_*.py``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        accept_each(self.sock, self.serve_connection)

    def api_client(self) -> ApiClient:
        config = Configuration()
        config.host = f"http://127.0.0.1:{self.port}"
        return ApiClient(config)

    def close(self) -> None:
        super().close()
        close(self.sock)


def relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("Kubernetes port forward proxy")]


@pytest.fixture
def api() -> Iterator[PortForwardAPI]:
    server = PortForwardAPI()
    yield server
    server.close()


@pytest.fixture(scope="module")
def pods(cluster_app, tmp_path_factory):
    """Two agents sharing one Secret: the pods web-0 and web-1 of namespace shop."""
    tmp = tmp_path_factory.mktemp("pods")
    agents = [start_agent(tmp, cluster_app.port, credentials=tmp / "credentials.json") for _ in range(2)]
    yield agents
    for a in agents:
        a.proc.stop()


def options(pods, header_value: str, local_port: int, transport) -> InterceptOptions:
    return InterceptOptions(
        transport=transport,
        credentials=load(pods[0].credentials),
        route=Route(frozenset([HeaderEquals("x-dev", header_value)])),
        name=header_value,
        local_port=local_port,
    )


def open_session(opts: InterceptOptions) -> None:
    async def main() -> None:
        session = AgentSession(opts)
        await session.open()
        await session.leave()

    asyncio.run(main())


# stand-in: counts the forwards opened per pod.
def test_ssh_through_the_port_forward_routes_every_replica(api, pods, local_app):
    client = api.api_client()
    for i, agent in enumerate(pods):
        api.pods[f"shop/web-{i}"] = agent.ssh_port
    replicas = [Replica(f"web-{i}", PortForwardTransport(client, "shop", f"web-{i}", 9922)) for i in range(2)]
    fleet = RunningFleet(options(pods, "ana", local_app.port, replicas[0].transport))
    try:
        fleet.set_replicas(*replicas)
        assert fleet.wait_for("ready").message.endswith("(2 replicas)")
        assert sorted(api.forwards) == [("shop/web-0", 9922), ("shop/web-1", 9922)]
        for agent in pods:
            assert agent.app_of({"x-dev": "ana"}) == "local"
            assert agent.app_of() == "cluster"
    finally:
        fleet.stop()
    assert [a.app_of({"x-dev": "ana"}) for a in pods] == ["cluster", "cluster"]
    for relay in relay_threads():  # each relay saw our end go and closed its WebSocket
        relay.join(LINE_TIMEOUT)
        assert not relay.is_alive()


# stand-in: the API server dropping an open forward, on demand.
def test_a_dropped_port_forward_is_reported_and_the_session_reconnects(api, pods, local_app):
    client = api.api_client()
    api.pods["shop/web-0"] = pods[0].ssh_port
    transport = PortForwardTransport(client, "shop", "web-0", 9922)
    fleet = RunningFleet(options(pods, "ben", local_app.port, transport))
    try:
        fleet.set_replicas(Replica("web-0", transport))
        fleet.wait_for("ready")
        mark = len(fleet.events)
        seen = len(pods[0].proc.lines)
        api.drop("shop/web-0")
        lost = fleet.wait_for("reconnecting", start=mark)
        assert lost.message == "connection to agent pod shop/web-0 port 9922 (port-forward) lost; retrying in 0.5s"
        pods[0].proc.wait_for(r"dropped route x-dev: ben of ben", start=seen)
        fleet.wait_for("reconnected", r"^replica web-0: requests with x-dev: ben reach", start=mark)
        assert len(api.forwards) == 2
        assert pods[0].app_of({"x-dev": "ben"}) == "local"
    finally:
        fleet.stop()


# stand-in: a forward that goes silent without closing, on demand.
def test_after_a_silent_drop_the_reconnect_waits_for_the_agent_to_let_go_of_our_old_session(api, pods, local_app):
    api.pods["shop/web-1"] = pods[1].ssh_port
    transport = PortForwardTransport(api.api_client(), "shop", "web-1", 9922)
    fleet = RunningFleet(options(pods, "cat", local_app.port, transport))
    try:
        fleet.set_replicas(Replica("web-1", transport))
        fleet.wait_for("ready")
        mark = len(fleet.events)
        api.drop("shop/web-1", silently=True)
        fleet.wait_for("reconnecting", r"still holds the route of cat, most likely for our previous connection", start=mark)
        seen = len(pods[1].proc.lines)
        api.release_stale()
        pods[1].proc.wait_for(r"dropped route x-dev: cat of cat", start=seen)
        fleet.wait_for("reconnected", r"^replica web-1: requests with x-dev: cat reach", start=mark)
        assert pods[1].app_of({"x-dev": "cat"}) == "local"
    finally:
        fleet.stop()


# stand-in: a 404 at the port-forward handshake.
def test_a_pod_that_does_not_exist_is_unreachable_naming_it(api, pods, local_app):
    transport = PortForwardTransport(api.api_client(), "shop", "web-9", 9922)
    with pytest.raises(AgentUnreachable) as e:
        open_session(options(pods, "cid", local_app.port, transport))
    assert str(e.value) == (
        "agent pod shop/web-9 port 9922 (port-forward): pod web-9 does not exist in namespace shop "
        "(it may have just been replaced)"
    )
    assert e.value.exit_code == 3


# stand-in: a 403 at the port-forward handshake without setting up RBAC.
def test_a_forbidden_port_forward_names_the_permission_it_needs(api, pods, local_app):
    api.forbidden = True
    transport = PortForwardTransport(api.api_client(), "shop", "web-0", 9922)
    with pytest.raises(AgentUnreachable) as e:
        open_session(options(pods, "dee", local_app.port, transport))
    assert "refused the port-forward (403)" in str(e.value)
    assert "kubectl auth can-i create pods/portforward -n shop" in str(e.value)


# stand-in: the kubelet's error on the forward's error channel, on demand.
def test_an_agent_that_does_not_listen_gets_the_kubelets_reason(api, pods, local_app):
    api.pods["shop/web-0"] = free_port()
    transport = PortForwardTransport(api.api_client(), "shop", "web-0", 9922)
    with pytest.raises(AgentUnreachable) as e:
        open_session(options(pods, "eve", local_app.port, transport))
    message = str(e.value)
    assert message.startswith("agent pod shop/web-0 port 9922 (port-forward): the port-forward failed: error forwarding port 9922")
    assert "connection refused" in message
    assert "check that the web-0 agent container is running and listens on port 9922" in message


# stand-in: no server at all.
def test_an_unreachable_api_server_says_so(pods, local_app):
    config = Configuration()
    config.host = f"http://127.0.0.1:{free_port()}"
    transport = PortForwardTransport(ApiClient(config), "shop", "web-0", 9922)
    with pytest.raises(AgentUnreachable) as e:
        open_session(options(pods, "fox", local_app.port, transport))
    assert str(e.value).startswith("agent pod shop/web-0 port 9922 (port-forward): cannot open a port-forward: ")
    assert "kubectl cluster-info" in str(e.value)


def test_pod_replicas_forward_to_each_ready_pod_or_dial_its_ip_inside_the_cluster():
    from intercept.client import DirectTransport
    from intercept.client.fleet import pod_replicas
    from intercept.kube.pods import PodEndpoint

    client = ApiClient(Configuration())
    web0 = PodEndpoint("web-0", "shop", "10.0.0.5", True, 9922, 9900)
    web1 = PodEndpoint("web-1", "shop", "10.0.0.6", True, 9923, 9900)
    pending = PodEndpoint("web-2", "shop", None, False, 9922, 9900)
    closed = []

    async def watch():
        try:
            yield [web0, pending]
            yield [web0, web1]
        finally:
            closed.append(True)

    async def collect(in_cluster: bool) -> list[list[Replica]]:
        return [r async for r in pod_replicas(watch(), client, in_cluster=in_cluster)]

    outside = asyncio.run(collect(False))
    assert outside == [
        [Replica("web-0", PortForwardTransport(client, "shop", "web-0", 9922))],
        [Replica("web-0", PortForwardTransport(client, "shop", "web-0", 9922)),
         Replica("web-1", PortForwardTransport(client, "shop", "web-1", 9923))],
    ]
    assert outside[0][0] == outside[1][0]  # the same pod is the same replica: its session is kept
    inside = asyncio.run(collect(True))
    # inside: the pod's IP first, the port-forward if a NetworkPolicy drops the packets
    from intercept.client.transport import FallbackTransport

    assert [r.transport for r in inside[1]] == [
        FallbackTransport(DirectTransport("10.0.0.5", 9922, timeout=5.0), PortForwardTransport(client, "shop", "web-0", 9922)),
        FallbackTransport(DirectTransport("10.0.0.6", 9923, timeout=5.0), PortForwardTransport(client, "shop", "web-1", 9923))]
    assert inside[0][0] == inside[1][0]
    assert closed == [True, True]


# stand-in: inspects which requests arrived as WebSocket upgrades.
def test_the_shared_api_client_is_never_switched_to_websocket_calls(api, pods, local_app):
    """kubernetes.stream swaps a client's call_api during a port-forward; ours must not be the shared one."""
    swaps = []

    class Shared(ApiClient):
        def __setattr__(self, name, value):
            if name == "call_api":
                swaps.append(value)
            super().__setattr__(name, value)

    config = Configuration()
    config.host = f"http://127.0.0.1:{api.port}"
    api.pods["shop/web-0"] = pods[0].ssh_port
    open_session(options(pods, "gil", local_app.port, PortForwardTransport(Shared(config), "shop", "web-0", 9922)))
    assert api.forwards == [("shop/web-0", 9922)]
    assert swaps == []
