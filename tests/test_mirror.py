"""Mirror (issue 26): the app answers every request; a copy of each matching one reaches the
developer's process, whose answer is discarded. Real agent and ``intercept start`` processes,
real HTTP servers and clients on loopback."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from intercept import api
from intercept.agent.mirror import MAX_UNANSWERED
from tests.apps import App, read_responses
from tests.conftest import INTERCEPT, start_client


@pytest.fixture
def developer_app():
    """A second developer's local process (``local_app`` is the first's)."""
    app = App("developer")
    yield app
    app.close()


def mirror_counts(agent, holder: str) -> list[dict]:
    """The mirrors of ``holder`` as the agent lists them (with their copied and dropped counts)."""
    spec = api.make_spec(agent=agent.ssh, credentials=str(agent.credentials))
    return [r for r in asyncio.run(api.agent_routes(spec)) if r.get("mirror") and r["holder"] == holder]


def wait_until_counted(agent, holder: str, total: int, timeout: float = 30) -> dict:
    """The mirror's counts once every one of ``total`` copies is counted, copied or dropped."""
    deadline = time.monotonic() + timeout
    while True:
        [mirror] = mirror_counts(agent, holder)
        if mirror["copied"] + mirror["dropped"] >= total or time.monotonic() > deadline:
            return mirror


def comparable(request: dict) -> dict:
    """What the developer must see as the app saw it."""
    return {k: request[k] for k in ("method", "target", "headers", "body_length", "body_sha256")}


def test_the_app_answers_while_the_developer_sees_the_same_requests_in_order(agent, cluster_app, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--mirror", "--header", "x-dev=mirror-one", "--name", "mona"))
    before = len(cluster_app.requests)
    sock = socket.create_connection(("127.0.0.1", agent.http_port))
    big = os.urandom(300_000)
    requests = [
        b"GET /one?x=1 HTTP/1.1\r\nHost: shop\r\nx-dev: mirror-one\r\n\r\n",
        b"POST /two HTTP/1.1\r\nHost: shop\r\nx-dev: mirror-one\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /not-mirrored HTTP/1.1\r\nHost: shop\r\n\r\n",
        b"PUT /three HTTP/1.1\r\nHost: shop\r\nx-dev: mirror-one\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        b"POST /big HTTP/1.1\r\nHost: shop\r\nx-dev: mirror-one\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
    ]
    sock.sendall(b"".join(requests))  # pipelined, on one keep-alive connection
    responses = read_responses(sock, len(requests))
    sock.close()
    assert [dict(r.headers)[b"x-app"] for r, _ in responses] == [b"cluster"] * 5
    assert [json.loads(body)["target"] for _, body in responses] == ["/one?x=1", "/two", "/not-mirrored", "/three", "/big"]

    seen = local_app.wait_requests(4)
    app_saw = [r for r in cluster_app.requests[before:] if r["target"] != "/not-mirrored"]
    assert [comparable(r) for r in seen] == [comparable(r) for r in app_saw]
    assert len({r["connection"] for r in seen}) == 1  # one connection, as the client's was
    assert wait_until_counted(agent, "mona", 4)["copied"] == 4


def test_a_stopped_developer_costs_the_client_nothing(agent, local_app, clients):
    client = start_client(agent, local_app.port, "--mirror", "--header", "x-dev=mirror-stopped", "--name", "sam")
    clients.append(client)
    os.killpg(client.p.pid, signal.SIGSTOP)  # the developer's machine stops reading
    try:
        conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
        statuses = []
        for i in range(1000):
            conn.request("POST", f"/n{i}", body=b"x" * 100, headers={"x-dev": "mirror-stopped"})
            response = conn.getresponse()
            response.read()
            statuses.append((response.status, response.getheader("X-App")))
        conn.close()
    finally:
        os.killpg(client.p.pid, signal.SIGCONT)
    assert statuses == [(200, "cluster")] * 1000
    counts = wait_until_counted(agent, "sam", 1000)
    assert counts["copied"] + counts["dropped"] == 1000
    assert counts["dropped"] >= 1000 - MAX_UNANSWERED  # at most that many waited for the stopped developer


def test_two_mirrors_and_an_intercept_on_the_same_request(agent, cluster_app, local_app, developer_app, clients):
    third = App("third")
    try:
        clients.append(start_client(agent, local_app.port, "--header", "x-dev=shared", "--name", "alice"))
        clients.append(start_client(agent, developer_app.port, "--mirror", "--header", "x-dev=shared", "--name", "bob"))
        clients.append(start_client(agent, third.port, "--mirror", "--header", "x-dev=shared", "--name", "dave"))
        before = len(cluster_app.requests)
        status, headers, body = agent.request("POST", "/order", {"x-dev": "shared"}, b"one order")
        assert (status, headers["X-App"]) == (200, "local")  # alice's intercept answers
        [alice_saw] = local_app.wait_requests(1)
        for mirror in (developer_app, third):
            [copy] = mirror.wait_requests(1)
            assert comparable(copy) == comparable(alice_saw)
        assert len(cluster_app.requests) == before  # the cluster's version never saw it
        assert agent.app_of() == "cluster"
    finally:
        third.close()


def test_a_mirror_takes_every_request_with_all_beside_another_developers_route(agent, cluster_app, developer_app, clients):
    clients.append(start_client(agent, developer_app.port, "--mirror", "--all", "--name", "eve"))
    assert agent.app_of({"x-anything": "1"}, "/everything") == "cluster"
    [copy] = developer_app.wait_requests(1)
    assert copy["target"] == "/everything"


def test_a_mirror_whose_process_is_not_listening_drops_copies_and_the_app_still_answers(agent, clients):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here while the test runs
        clients.append(start_client(agent, port, "--mirror", "--header", "x-dev=nobody-home", "--name", "nora"))
        for _ in range(3):
            assert agent.app_of({"x-dev": "nobody-home"}) == "cluster"
        counts = wait_until_counted(agent, "nora", 3)
    assert (counts["copied"], counts["dropped"]) == (0, 3)


def test_status_shows_a_mirrors_copied_and_dropped(agent, local_app, tmp_path):
    env = dict(os.environ, INTERCEPT_STATE_DIR=str(tmp_path), PYTHONUNBUFFERED="1")
    client = start_client_env(agent, local_app.port, env, "--mirror", "--header", "x-dev=counted", "--name", "cole")
    try:
        for _ in range(2):
            assert agent.app_of({"x-dev": "counted"}) == "cluster"
        client.wait_for(r"^intercept: mirrored: 2 copies reached localhost:\d+, 0 dropped$")
        rows = json.loads(subprocess.run(INTERCEPT + ["status", "-o", "json"], env=env, capture_output=True,
                                         check=True, text=True).stdout)
        assert [r["mirrored"] for r in rows] == [{"copied": 2, "dropped": 0}]
        table = subprocess.run(INTERCEPT + ["status"], env=env, capture_output=True, check=True, text=True).stdout
        assert "copies of requests with x-dev: counted (copied 2, dropped 0)" in table
        left = subprocess.run(INTERCEPT + ["leave", f"127.0.0.1:{agent.ssh_port}"], env=env, capture_output=True,
                              check=True, text=True).stdout
        assert left.endswith(": copies of requests with x-dev: counted stop coming here\n")
        assert client.finish() == 0
        assert client.lines[-1] == "intercept: left: copies of requests with x-dev: counted stop coming here"
    finally:
        client.stop()


def start_client_env(agent, local_port, env, *args):
    from tests.conftest import Proc

    proc = Proc(INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials),
                             "--port", str(local_port), *args], env=env)
    proc.wait_for(r"^intercept: ready: ")
    return proc


# -- HTTP/2: gRPC calls mirrored per stream ------------------------------------------------


@pytest.fixture
def grpc_apps(tmp_path):
    from tests.conftest import start_agent
    from tests.grpc_apps import GrpcApp

    cluster, mirror, developer = GrpcApp("cluster"), GrpcApp("mirror"), GrpcApp("developer")
    agent = start_agent(tmp_path, cluster.port, "--hold-timeout", "10")
    yield agent, cluster, mirror, developer
    agent.proc.stop()
    for app in (cluster, mirror, developer):
        app.close()


def mirrored_calls(app, count: int) -> list[tuple[str, bytes, dict]]:
    app.wait_until(lambda: len(app.requests) >= count)
    return list(app.requests)


def test_grpc_unary_and_streaming_calls_are_mirrored_while_the_app_answers(grpc_apps, clients):
    import hashlib

    from tests.grpc_apps import channel, unary

    agent, cluster, mirror, _ = grpc_apps
    clients.append(start_client(agent, mirror.port, "--mirror", "--header", "x-dev=grace", "--name", "grace"))
    metadata = [("x-dev", "grace"), ("x-echo-order", "42")]
    messages = [os.urandom(1000 + i) for i in range(5)]
    with channel(agent.http_port) as ch:
        response, initial, trailing = unary(ch, b"hello", metadata)
        assert (response, initial["x-app"], trailing["x-echo-order-t"]) == (b"cluster:hello", "cluster", "42")
        streamed = list(ch.unary_stream("/test.Echo/ServerStream")(b"3 10", metadata=metadata, timeout=30))
        assert streamed == [bytes([i]) * 10 for i in range(3)]
        summed = ch.stream_unary("/test.Echo/ClientStream")(iter(messages), metadata=metadata, timeout=30)
        digest = hashlib.sha256(b"".join(messages)).hexdigest()
        assert summed == f"cluster:5:{sum(map(len, messages))}:{digest}".encode()
        echoed = list(ch.stream_stream("/test.Echo/Bidi")(iter([b"a", b"b", b"c"]), metadata=metadata, timeout=30))
        assert echoed == [b"cluster:a", b"cluster:b", b"cluster:c"]
        assert unary(ch, b"not copied")[0] == b"cluster:not copied"
    calls = mirrored_calls(mirror, 4)
    # each call is a stream of its own: its copy may end at the developer before an earlier one's
    assert sorted((method, request) for method, request, _ in calls) == sorted([
        ("Unary", b"hello"), ("ServerStream", b"3 10"), ("ClientStream", bytes.fromhex(digest)), ("Bidi", b"a|b|c")])
    assert all(seen["x-dev"] == "grace" and seen["x-echo-order"] == "42" for _, _, seen in calls)
    assert wait_until_counted(agent, "grace", 4)["copied"] == 4
    assert len(cluster.requests) == 5


def test_grpc_two_mirrors_and_an_intercept_on_the_same_call(grpc_apps, clients):
    from tests.grpc_apps import GrpcApp, channel, unary

    agent, cluster, mirror, developer = grpc_apps
    second = GrpcApp("second")
    try:
        clients.append(start_client(agent, developer.port, "--header", "x-dev=heidi", "--name", "heidi"))
        clients.append(start_client(agent, mirror.port, "--mirror", "--header", "x-dev=heidi", "--name", "ivan"))
        clients.append(start_client(agent, second.port, "--mirror", "--header", "x-dev=heidi", "--name", "judy"))
        with channel(agent.http_port) as ch:
            assert unary(ch, b"order", [("x-dev", "heidi")])[0] == b"developer:order"
        for app in (mirror, second):
            assert [(m, r) for m, r, _ in mirrored_calls(app, 1)] == [("Unary", b"order")]
        assert cluster.requests == []
    finally:
        second.close()


def test_a_stopped_grpc_mirror_costs_the_calls_nothing(grpc_apps, clients):
    from tests.grpc_apps import channel, unary

    agent, cluster, mirror, _ = grpc_apps
    client = start_client(agent, mirror.port, "--mirror", "--all", "--name", "kim")
    clients.append(client)
    os.killpg(client.p.pid, signal.SIGSTOP)
    try:
        with channel(agent.http_port) as ch:
            answers = [unary(ch, b"%d" % i)[0] for i in range(300)]
    finally:
        os.killpg(client.p.pid, signal.SIGCONT)
    assert answers == [b"cluster:%d" % i for i in range(300)]
    counts = wait_until_counted(agent, "kim", 300)
    assert counts["copied"] + counts["dropped"] == 300
    assert counts["dropped"] >= 300 - MAX_UNANSWERED


def test_mirror_is_spelt_in_intercept_yaml_the_environment_and_the_api(tmp_path):
    (tmp_path / "intercept.yaml").write_text("version: 1\nintercepts:\n  - service: orders\n    mirror: true\n"
                                             "    headers: [x-dev=alice]\n")
    assert api.make_spec("orders", file=tmp_path / "intercept.yaml").mirror is True
    assert api.make_spec("orders", env={"INTERCEPT_MIRROR": "true"}).mirror is True
    assert api.make_spec("orders", mirror=True).mirror is True
    assert api.make_spec("orders").mirror is False


def test_a_mirror_holds_a_bounded_number_of_channels_for_a_stopped_developer(agent, local_app, clients):
    from intercept.agent.mirror import MAX_CHANNELS

    client = start_client(agent, local_app.port, "--mirror", "--header", "x-dev=many-connections", "--name", "mia")
    clients.append(client)
    os.killpg(client.p.pid, signal.SIGSTOP)
    try:
        apps = [agent.app_of({"x-dev": "many-connections"}) for _ in range(MAX_CHANNELS + 36)]  # a connection each
    finally:
        os.killpg(client.p.pid, signal.SIGCONT)
    assert apps == ["cluster"] * (MAX_CHANNELS + 36)
    counts = wait_until_counted(agent, "mia", MAX_CHANNELS + 36)
    assert counts["copied"] + counts["dropped"] == MAX_CHANNELS + 36 and counts["dropped"] >= 36
