"""Routes to a cluster address (sandboxes), held by the agent with no developer connected.

The agent reads them from its routes file (in a pod: a mounted ConfigMap) whenever it
changes, takes pushed documents over the control channel at once when the routes
authority that file names signed them, and ends each route at its expiry by itself.
Real agent process, real apps, real SSH.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from intercept import protocol
from intercept.credentials import load
from intercept.routing.cluster import ClusterRoute, RoutesAuthority, RoutesDocument
from intercept.routing.match import HeaderEquals, Route
from tests.apps import App
from tests.conftest import INTERCEPT, Agent, Proc, start_agent, start_client
from tests.netns import needs_netns

WAIT = 30.0
AUTHORITY = RoutesAuthority.generate()  # what intercept sandbox keeps in the namespace's Secret


def route(sandbox: str, port: int, expires: float, header: str = "x-intercept-id", host: str = "127.0.0.1") -> ClusterRoute:
    return ClusterRoute(sandbox, Route(frozenset({HeaderEquals(header, sandbox)})), (host, port), expires)


def write(path: Path, *routes: ClusterRoute) -> None:
    """Replace the file as a ConfigMap volume does: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(RoutesDocument(time.time(), routes, AUTHORITY.public).to_text())
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
    write(routes)  # the routes authority, from the start
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


async def control_lines(agent, *lines: bytes) -> list[dict]:
    """Lines on the agent's control channel, as anyone with the agent's token can write them; the replies."""
    creds = load(agent.credentials)
    async with asyncssh.connect("127.0.0.1", agent.ssh_port, username="ci", password=creds.token, known_hosts=None,
                                client_keys=None, preferred_auth="password") as conn:
        writer, reader, _ = await conn.open_session(subsystem=protocol.CONTROL_SUBSYSTEM, encoding=None)
        replies = []
        for line in lines:
            writer.write(line.rstrip(b"\n") + b"\n")
            replies.append(json.loads(await reader.readline()))
        return replies


async def control(agent, request: protocol.Request) -> dict:
    """One request on the agent's control channel, as a client with its credentials."""
    return (await control_lines(agent, protocol.encode(request)))[0]


def push(agent, document: RoutesDocument, authority: RoutesAuthority = AUTHORITY) -> dict:
    """A routes document pushed as intercept sandbox pushes it: its text, signed."""
    text = document.to_text()
    return asyncio.run(control(agent, protocol.SetClusterRoutes(text, authority.sign(text))))


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
        start = len(agent.proc.lines)
        publish(volume, RoutesDocument(time.time(), (route("good", fork.port, time.time() + 3600),)).to_text().encode())
        agent.proc.wait_for("cluster routes of .* applied: good", start=start)
        assert agent.app_of({"x-intercept-id": "good"}) == "fork"

        # and expiry still runs: a --ttl route leaves the table (a frozen client cannot end it)
        client = start_client(agent, local_app.port, "--header", "x-dev=ttl", "--ttl", "2s")
        client.signal(signal.SIGSTOP)
        agent.proc.wait_for(r"route x-dev: ttl of .* expired")
        assert [r["holder"] for r in asyncio.run(control(agent, protocol.ListRoutes()))["routes"]] == ["sandbox good"]
    finally:
        if client is not None:
            client.signal(signal.SIGCONT)
            client.stop()
        agent.proc.stop()


@pytest.fixture
def secret():
    """What listens on the pod's own loopback and nobody outside should reach: an admin port, a metadata proxy."""
    app = App("secret")
    yield app
    app.close()


def test_a_developer_session_cannot_push_a_route_to_anywhere(cluster_app, secret, fork, tmp_path):
    routes = tmp_path / "routes.json"
    write(routes)  # the routes authority, as intercept sandbox wrote it
    agent = start_agent(tmp_path, cluster_app.port, "--routes-file", str(routes))  # and no --allow-outbound
    try:
        attack = {"updated": 1e308, "routes": [{"sandbox": "x", "rules": [{"kind": "header", "name": "x-ssrf", "value": "1"}],
                                                "destination": f"127.0.0.1:{secret.port}", "expires": 1e308}]}
        own = RoutesAuthority.generate()
        naming_its_own_key = json.dumps({**attack, "authority": own.public})
        replies = asyncio.run(control_lines(agent, *(json.dumps(push).encode() for push in (
            {"op": "cluster-routes", "document": attack},
            {"op": "cluster-routes", "document": json.dumps(attack), "signature": ""},
            {"op": "cluster-routes", "document": naming_its_own_key, "signature": own.sign(naming_its_own_key)}))))
        assert [r["ok"] for r in replies] == [False, False, False], replies
        assert [r["error"] for r in replies[1:]] == ["forbidden", "forbidden"]
        assert "it is not signed" in replies[1]["message"]
        assert "its signature does not verify against the routes authority of this agent's routes file" in replies[2]["message"]
        assert agent.app_of({"x-ssrf": "1"}) == "cluster" and secret.hits == 0
        # nothing made the routes file look stale: its next version applies
        start = len(agent.proc.lines)
        write(routes, route("pr-1", fork.port, time.time() + 3600))
        agent.proc.wait_for("cluster routes of .* applied: pr-1", start=start)
        assert agent.app_of({"x-intercept-id": "pr-1"}) == "fork"
    finally:
        agent.proc.stop()


def test_an_agent_whose_routes_file_names_no_authority_refuses_every_push(agent, fork):
    reply = push(agent, RoutesDocument(time.time(), (route("pr-1", fork.port, time.time() + 3600),)))
    assert reply["error"] == "forbidden" and "routes file names no routes authority" in reply["message"]
    assert agent.app_of({"x-intercept-id": "pr-1"}) == "cluster"


def test_a_document_from_the_future_or_outliving_any_sandbox_is_refused(routed_agent, fork):
    agent, routes = routed_agent
    early = push(agent, RoutesDocument(time.time() + 3600, (route("early", fork.port, time.time() + 3600),)))
    assert early["error"] == "invalid" and "updated is 3600s ahead of the agent's clock" in early["message"]
    forever = push(agent, RoutesDocument(time.time(), (route("forever", fork.port, 1e308),)))
    assert forever["error"] == "invalid" and "past the longest lifetime of a sandbox" in forever["message"]
    assert agent.app_of({"x-intercept-id": "early"}) == agent.app_of({"x-intercept-id": "forever"}) == "cluster"
    # the same from the file: skipped, and the next document is not stale
    start = len(agent.proc.lines)
    routes.write_text(json.dumps({"updated": 1e308, "authority": AUTHORITY.public, "routes": []}))
    agent.proc.wait_for(r"routes file .*: routes document: updated is \d+s ahead of the agent's clock", start=start)
    assert push(agent, RoutesDocument(time.time(), (route("now", fork.port, time.time() + 3600),)))["applied"] == ["now"]


def test_a_sandbox_destination_passes_the_agents_outbound_fence(cluster_app, fork, tmp_path):
    routes = tmp_path / "routes.json"
    write(routes, route("fenced", fork.port, time.time() + 3600))
    agent = start_agent(tmp_path, cluster_app.port, "--routes-file", str(routes), "--outbound-deny", f"127.0.0.1:{fork.port}")
    try:
        agent.proc.wait_for(rf"^intercept: agent: outbound fence: deny 127\.0\.0\.1:{fork.port}$")
        status, _, body = agent.request(headers={"x-intercept-id": "fenced"})
        assert status == 502 and (f"sandbox fenced failed: its fork 127.0.0.1:{fork.port} is denied by the agent's "
                                  f"--outbound-deny 127.0.0.1:{fork.port}").encode() in body, body
        assert fork.hits == 0
    finally:
        agent.proc.stop()


def routes_to(agent: Agent, routes: Path, *hosts: str) -> dict[str, str]:
    """Routes (as the authority writes them) from keys to the agent's own two ports at each of
    ``hosts``; the key of each destination."""
    keys = {f"self-{i}": f"{host}:{port}" for i, (host, port) in enumerate(
        (host, port) for host in hosts for port in (agent.http_port, agent.ssh_port))}
    start = len(agent.proc.lines)
    write(routes, *(route(key, int(port), time.time() + 3600, host=host) for key, (host, _, port) in
                    ((k, d.rpartition(":")) for k, d in keys.items())))
    agent.proc.wait_for("cluster routes of .* applied: self-0", start=start)
    return keys


def test_a_sandbox_destination_is_never_the_agent_itself(cluster_app, tmp_path):
    routes = tmp_path / "routes.json"
    agent = start_agent(tmp_path, cluster_app.port, "--routes-file", str(routes))
    try:
        for key, destination in routes_to(agent, routes, "127.0.0.1", "0.0.0.0", "localhost", "127.9.9.9").items():
            status, _, body = agent.request(headers={"x-intercept-id": key})
            assert (status, body) == (502, f"sandbox {key} failed: its destination {destination} is this agent's own "
                                           "listener\n".encode()), destination
    finally:
        agent.proc.stop()


@needs_netns
def test_a_sandbox_destination_at_the_pods_own_address_is_refused(tmp_path):
    """A pod's agent listens on every address: the pod IP reaches it as 127.0.0.1 does."""
    pod = f"ipod-{os.urandom(3).hex()}"
    run_in = ["ip", "netns", "exec", pod]
    try:
        for command in (["ip", "netns", "add", pod], ["ip", "-n", pod, "link", "set", "lo", "up"],
                        ["ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
                        ["ip", "-n", pod, "addr", "add", "10.78.0.5/24", "dev", "eth0"],
                        ["ip", "-n", pod, "link", "set", "eth0", "up"]):
            subprocess.run(command, check=True, capture_output=True)
        routes = tmp_path / "routes.json"
        credentials = tmp_path / "agent.json"
        agent = Agent(Proc(run_in + INTERCEPT + ["-v", "agent", "--listen", "0.0.0.0:0", "--ssh-listen", "0.0.0.0:0",
                                                 "--upstream", "127.0.0.1:1", "--credentials", str(credentials),
                                                 "--routes-file", str(routes)]), credentials)
        try:
            for key, destination in routes_to(agent, routes, "10.78.0.5").items():
                curl = subprocess.run(run_in + ["curl", "-sS", "-H", f"x-intercept-id: {key}",
                                                f"http://127.0.0.1:{agent.http_port}/"], capture_output=True, text=True)
                assert curl.stdout == f"sandbox {key} failed: its destination {destination} is this agent's own listener\n", \
                    curl.stdout + curl.stderr
        finally:
            agent.proc.stop()
    finally:
        subprocess.run(["ip", "netns", "del", pod], capture_output=True)
