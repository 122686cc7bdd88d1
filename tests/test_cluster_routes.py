"""Routes to a cluster address (sandboxes), held by the agent with no developer connected.

The agent reads them from its routes file (in a pod: a mounted ConfigMap) whenever it
changes, takes pushed documents over the control channel at once, and ends each route
at its expiry by itself. Real agent process, real apps, real SSH.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import asyncssh
import pytest

from intercept import protocol
from intercept.credentials import load
from intercept.routing.cluster import ClusterRoute, RoutesDocument
from intercept.routing.match import HeaderEquals, Route
from tests.apps import App
from tests.conftest import start_agent, start_client

WAIT = 30.0


def route(sandbox: str, port: int, expires: float, header: str = "x-intercept-id") -> ClusterRoute:
    return ClusterRoute(sandbox, Route(frozenset({HeaderEquals(header, sandbox)})), ("127.0.0.1", port), expires)


def write(path: Path, *routes: ClusterRoute) -> None:
    """Replace the file as a ConfigMap volume does: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(RoutesDocument(time.time(), routes).to_text())
    tmp.replace(path)


def eventually(check, what: str, timeout: float = WAIT) -> None:
    """Poll ``check`` until it is true (the agent looks at its file once a second)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.05)


@pytest.fixture
def fork():
    app = App("fork")
    yield app
    app.close()


@pytest.fixture
def routed_agent(cluster_app, tmp_path):
    routes = tmp_path / "routes.json"
    agent = start_agent(tmp_path, cluster_app.port, "--routes-file", str(routes))
    yield agent, routes
    agent.proc.stop()


def test_a_route_in_the_file_sends_its_key_to_the_fork_and_goes_when_removed(routed_agent, fork):
    agent, routes = routed_agent
    write(routes, route("pr-1", fork.port, time.time() + 3600))
    eventually(lambda: agent.app_of({"x-intercept-id": "pr-1"}) == "fork", "the route from the file")
    assert agent.app_of() == "cluster" and agent.app_of({"x-intercept-id": "pr-2"}) == "cluster"
    write(routes)
    eventually(lambda: agent.app_of({"x-intercept-id": "pr-1"}) == "cluster", "the route's removal")


def test_a_route_stops_routing_at_its_expiry_with_nothing_deleting_it(routed_agent, fork):
    agent, routes = routed_agent
    write(routes, route("short", fork.port, time.time() + 3))
    eventually(lambda: agent.app_of({"x-intercept-id": "short"}) == "fork", "the route from the file")
    eventually(lambda: agent.app_of({"x-intercept-id": "short"}) == "cluster", "the expiry")
    assert "short" in routes.read_text()  # still in the file: the agent enforced the expiry itself


async def control(agent, request: protocol.Request) -> dict:
    """One request on the agent's control channel, as a client with its credentials."""
    creds = load(agent.credentials)
    async with asyncssh.connect("127.0.0.1", agent.ssh_port, username="ci", password=creds.token, known_hosts=None,
                                client_keys=None, preferred_auth="password") as conn:
        writer, reader, _ = await conn.open_session(subsystem=protocol.CONTROL_SUBSYSTEM, encoding=None)
        writer.write(protocol.encode(request))
        return json.loads(await reader.readline())


def push(agent, document: RoutesDocument) -> dict:
    return asyncio.run(control(agent, protocol.SetClusterRoutes(json.loads(document.to_text()))))


def test_a_pushed_document_takes_effect_at_once_and_an_older_one_does_not_undo_it(routed_agent, fork):
    agent, routes = routed_agent
    newer = RoutesDocument(time.time(), (route("pushed", fork.port, time.time() + 3600),))
    reply = push(agent, newer)
    assert reply["ok"] and reply["applied"] == ["pushed"]
    assert agent.app_of({"x-intercept-id": "pushed"}) == "fork"  # no wait: the push is applied before the reply
    older = RoutesDocument(newer.updated - 10, ())
    assert push(agent, older)["stale"]
    assert agent.app_of({"x-intercept-id": "pushed"}) == "fork"


def test_a_sandbox_route_conflicts_with_a_developers_as_two_developers_do(routed_agent, fork, local_app):
    agent, routes = routed_agent
    client = start_client(agent, local_app.port, "--header", "x-intercept-id=taken", "--name", "dana")
    try:
        reply = push(agent, RoutesDocument(time.time(), (route("taken", fork.port, time.time() + 3600),)))
        assert reply["applied"] == [] and "already held by dana" in reply["refused"][0]
        assert agent.app_of({"x-intercept-id": "taken"}) == "local"
    finally:
        client.stop()


def test_an_unreachable_fork_gets_a_502_naming_the_sandbox(cluster_app, tmp_path):
    routes = tmp_path / "routes.json"
    agent = start_agent(tmp_path, cluster_app.port, "--routes-file", str(routes), "--hold-timeout", "0.2")
    try:
        write(routes, route("gone", 1, time.time() + 3600))
        eventually(lambda: agent.request(headers={"x-intercept-id": "gone"})[0] == 502, "the route from the file")
        status, _, body = agent.request(headers={"x-intercept-id": "gone"})
        assert b"sandbox gone failed: its fork 127.0.0.1:1 is unreachable" in body
    finally:
        agent.proc.stop()


def test_start_ttl_ends_the_route_on_the_agent_even_when_the_client_is_frozen(agent, local_app):
    import signal

    client = start_client(agent, local_app.port, "--header", "x-dev=ttl", "--ttl", "3s")
    try:
        assert agent.app_of({"x-dev": "ttl"}) == "local"
        client.signal(signal.SIGSTOP)  # a laptop whose lid closed: only the agent can end the route
        held = lambda: [r["holder"] for r in asyncio.run(control(agent, protocol.ListRoutes()))["routes"]]  # noqa: E731
        eventually(lambda: held() == [], "the route's expiry on the agent")
        assert agent.app_of({"x-dev": "ttl"}) == "cluster"
        client.signal(signal.SIGCONT)
        assert client.finish() == 0
        assert any("time to live (3s) is up; leaving" in line for line in client.lines), client.output
    finally:
        client.stop()


def test_a_document_whose_route_has_expired_ends_the_route_held_before(routed_agent, fork):
    agent, routes = routed_agent
    assert push(agent, RoutesDocument(time.time(), (route("late", fork.port, time.time() + 3600),)))["applied"] == ["late"]
    assert agent.app_of({"x-intercept-id": "late"}) == "fork"
    # extended to a deadline that passed before the document arrived
    assert push(agent, RoutesDocument(time.time(), (route("late", fork.port, time.time() - 1),)))["applied"] == []
    assert agent.app_of({"x-intercept-id": "late"}) == "cluster"


def publish(directory: Path, content: bytes) -> None:
    """A new version of ``directory/routes.json``, swapped in as the kubelet swaps a ConfigMap
    volume's: a new directory, then the ``..data`` symlink renamed over the old one."""
    version = directory / f"..{time.monotonic_ns()}"
    version.mkdir()
    (version / "routes.json").write_bytes(content)
    (directory / "..data_tmp").symlink_to(version.name)
    (directory / "..data_tmp").replace(directory / "..data")
    if not (directory / "routes.json").is_symlink():
        (directory / "routes.json").symlink_to("..data/routes.json")


def good_route(sandbox: str, port: int) -> dict:
    return {"sandbox": sandbox, "rules": [{"kind": "header", "name": "x-intercept-id", "value": sandbox}],
            "destination": f"127.0.0.1:{port}", "expires": time.time() + 3600}


def bad_documents(port: int) -> dict[str, bytes]:
    """Routes files the agent must refuse, each for its own reason."""
    def doc(**fields) -> bytes:
        return json.dumps({"updated": time.time(), "routes": [good_route("bad", port)], **fields}).encode()

    def with_route(**fields) -> bytes:
        return doc(routes=[{**good_route("bad", port), **fields}])

    return {
        "nested 100k deep": b"[" * 100_000 + b"]" * 100_000,
        "nested inside a route": b'{"updated": 1, "routes": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
        "a port of 5,000 digits": with_route(destination="fork:" + "9" * 5000),
        "a port in other digits": with_route(destination="fork:\u0664\u0663"),
        "an updated of 5,000 digits": b'{"updated": ' + b"9" * 5000 + b', "routes": []}',
        "an updated of 1e400": b'{"updated": 1e400, "routes": []}',
        "an expiry of 10**400": b'{"updated": 1, "routes": [' + json.dumps(good_route("bad", port))[:-1].encode()
                                + b', "expires": 1' + b"0" * 400 + b"}]}",
        "NaN": b'{"updated": NaN, "routes": []}',
        "Infinity": with_route(expires=float("inf")),
        "-Infinity": doc(updated=float("-inf")),
        "routes as an object": doc(routes={"a": 1}),
        "a route as a list": doc(routes=[[1, 2]]),
        "rules as text": with_route(rules="x-intercept-id=bad"),
        "a rule's kind as a number": with_route(rules=[{"kind": 1}]),
        "a rule's value as a number": with_route(rules=[{"kind": "header", "name": "x", "value": 1}]),
        "a destination as a number": with_route(destination=8080),
        "a sandbox as a list": with_route(sandbox=["a"]),
        "an expiry as text": with_route(expires="tomorrow"),
        "an updated as true": doc(updated=True),
        "an updated as null": doc(updated=None),
        "null": b"null",
        "a list": b"[]",
        "empty": b"",
        "not UTF-8": b'{"updated": 1, "routes": [], "x": "\xff\xfe"}',
        "2 MiB": doc(padding=" " * (2 << 20)),
    }


def test_malformed_routes_files_are_each_logged_and_skipped_and_routes_still_come_and_expire(cluster_app, fork, local_app,
                                                                                               tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    agent = start_agent(tmp_path, cluster_app.port, "--routes-file", str(volume / "routes.json"))
    client = None
    try:
        for what, content in bad_documents(fork.port).items():
            start = len(agent.proc.lines)
            publish(volume, content)
            agent.proc.wait_for(r"WARNING .*routes file .*; keeping the routes held", start=start)
            assert agent.app_of({"x-intercept-id": "bad"}) == "cluster", what
        publish(volume, RoutesDocument(time.time(), (route("good", fork.port, time.time() + 3600),)).to_text().encode())
        eventually(lambda: agent.app_of({"x-intercept-id": "good"}) == "fork", "the good document after the bad ones")

        # and expiry still runs: a --ttl route leaves the table (a frozen client cannot end it)
        import signal

        client = start_client(agent, local_app.port, "--header", "x-dev=ttl", "--ttl", "2s")
        client.signal(signal.SIGSTOP)
        agent.proc.wait_for(r"route x-dev: ttl of .* expired")
        assert [r["holder"] for r in asyncio.run(control(agent, protocol.ListRoutes()))["routes"]] == ["sandbox good"]
    finally:
        if client is not None:
            client.signal(signal.SIGCONT)
            client.stop()
        agent.proc.stop()
