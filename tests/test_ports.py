"""Several ports in one intercept, in direct mode: an agent in front of an HTTP/1.1 port and a
gRPC (h2c) port of the app, and developers who take both, or one of them, with one route."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.apps import App
from tests.conftest import INTERCEPT, Agent, Proc, free_port
from tests.grpc_apps import GrpcApp, app_of, channel


class TwoPortAgent(Agent):
    """``intercept agent`` with two listeners; ``http_port`` is the first's, ``grpc_port`` the second's."""

    def __init__(self, proc: Proc, credentials, grpc_upstream: int) -> None:
        super().__init__(proc, credentials)
        m = proc.wait_for(rf"intercept: agent: http (\S+):(\d+) ssh \S+ upstream 127\.0\.0\.1:{grpc_upstream}$")
        self.grpc_port = int(m[2])


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[App, GrpcApp]]:
    http, grpc = App("cluster"), GrpcApp("cluster-grpc")
    yield http, grpc
    http.close()
    grpc.close()


@pytest.fixture(scope="module")
def agent(cluster, tmp_path_factory) -> Iterator[TwoPortAgent]:
    http, grpc = cluster
    credentials = tmp_path_factory.mktemp("agent") / "credentials.json"
    proc = Proc(INTERCEPT + ["-v", "agent", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{http.port}",
                             "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{grpc.port}",
                             "--ssh-listen", "127.0.0.1:0", "--credentials", str(credentials)])
    a = TwoPortAgent(proc, credentials, grpc.port)
    yield a
    proc.stop()


def start(agent: TwoPortAgent, *args: str) -> Proc:
    proc = Proc(INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), *args])
    proc.wait_for(r"^intercept: ready: ")
    return proc


def test_one_session_routes_both_ports_by_one_header_and_the_rest_reaches_the_cluster(agent, cluster):
    http, grpc = cluster
    local_http, local_grpc = App("alice"), GrpcApp("alice-grpc")
    alice = start(agent, "--port", f"{http.port}:{local_http.port}", "--port", f"{grpc.port}:{local_grpc.port}",
                  "--header", "x-dev=alice")
    try:
        assert re.search(rf"now reach port {http.port} to localhost:{local_http.port}, "
                         rf"port {grpc.port} to localhost:{local_grpc.port}", "\n".join(alice.lines))
        assert agent.app_of({"x-dev": "alice"}) == "alice"
        assert agent.app_of() == "cluster"
        with channel(agent.grpc_port) as ch:
            assert app_of(ch, [("x-dev", "alice")]) == "alice-grpc"
            assert app_of(ch) == "cluster-grpc"
            assert app_of(ch, [("x-dev", "bob")]) == "cluster-grpc"
    finally:
        alice.stop()
        local_http.close()
        local_grpc.close()
    with channel(agent.grpc_port) as ch:  # gone with the session: both ports fall back
        assert app_of(ch, [("x-dev", "alice")]) == "cluster-grpc"
    assert agent.app_of({"x-dev": "alice"}) == "cluster"


def test_a_session_that_takes_one_port_leaves_the_other_to_the_cluster(agent, cluster):
    http, grpc = cluster
    local_grpc = GrpcApp("bob-grpc")
    bob = start(agent, "--port", f"{grpc.port}:{local_grpc.port}", "--header", "x-dev=bob")
    try:
        with channel(agent.grpc_port) as ch:
            assert app_of(ch, [("x-dev", "bob")]) == "bob-grpc"
        assert agent.app_of({"x-dev": "bob"}) == "cluster", "bob did not take the HTTP port"
    finally:
        bob.stop()
        local_grpc.close()


def test_a_port_without_service_port_is_the_agents_first_as_before(agent, cluster):
    local_http = App("carol")
    carol = start(agent, "--port", str(local_http.port), "--header", "x-dev=carol")
    try:
        assert agent.app_of({"x-dev": "carol"}) == "carol"
        with channel(agent.grpc_port) as ch:
            assert app_of(ch, [("x-dev", "carol")]) == "cluster-grpc"
    finally:
        carol.stop()
        local_http.close()


def test_a_port_the_agent_is_not_in_front_of_is_refused_naming_its_ports(agent, cluster):
    http, grpc = cluster
    other = free_port()
    proc = Proc(INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials),
                             "--port", f"{other}:3000", "--header", "x-dev=dave"])
    assert proc.finish() != 0
    assert re.search(rf"is in front of the app's ports {http.port}, {grpc.port}, not {other}", proc.output)


def test_listen_and_upstream_pair_by_position(tmp_path):
    proc = Proc(INTERCEPT + ["agent", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--upstream", "127.0.0.1:2",
                             "--credentials", str(tmp_path / "c.json")])
    assert proc.finish() == 2
    assert "1 --listen for 2 --upstream (INTERCEPT_LISTEN, INTERCEPT_UPSTREAM): they pair by position; " \
           "give one --listen per --upstream" in proc.output
