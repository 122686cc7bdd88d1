"""gRPC through a real agent, with grpcio's own servers and clients, routed and unrouted.

The cluster's version and the developer's local version are grpcio servers
(:mod:`tests.grpc_apps`); the developer's process is reached over a real SSH session
from a real ``intercept start``. Calls carrying ``x-dev: alice`` go to the developer.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port, start_agent, start_client
from tests.grpc_apps import GrpcApp, app_of, channel, unary

ALICE = [("x-dev", "alice")]


@pytest.fixture(scope="module")
def cluster_grpc():
    app = GrpcApp("cluster")
    yield app
    app.close()


@pytest.fixture(scope="module")
def local_grpc():
    app = GrpcApp("local")
    yield app
    app.close()


@pytest.fixture(scope="module")
def grpc_agent(cluster_grpc, tmp_path_factory):
    agent = start_agent(tmp_path_factory.mktemp("agent"), cluster_grpc.port, "--hold-timeout", "10")
    yield agent
    agent.proc.stop()


@pytest.fixture(scope="module")
def alice(grpc_agent, local_grpc):
    """alice's intercept (x-dev: alice -> local_grpc), for the whole module."""
    proc = start_client(grpc_agent, local_grpc.port, "--header", "x-dev=alice", "--name", "alice")
    yield proc
    proc.stop()


@pytest.fixture
def ch(grpc_agent, alice):
    c = channel(grpc_agent.http_port)
    yield c
    c.close()


@pytest.fixture(params=["cluster", "developer"])
def side(request, cluster_grpc, local_grpc):
    """(metadata that routes there, the app that must answer)."""
    return (ALICE, local_grpc) if request.param == "developer" else ([], cluster_grpc)


def test_unary_call_without_header_reaches_cluster_version(ch):
    response, initial, _ = unary(ch, b"hello")
    assert response == b"cluster:hello" and initial["x-app"] == "cluster"


def test_unary_call_with_header_reaches_developer(ch):
    response, initial, _ = unary(ch, b"hello", ALICE)
    assert response == b"local:hello" and initial["x-app"] == "local"
    assert app_of(ch, [("x-dev", "bob")]) == "cluster"


def test_one_channel_splits_streams_between_app_and_developer_at_once(ch, cluster_grpc, local_grpc):
    # two streams held open at once on one connection, one at each destination
    ticks_local = ch.unary_stream("/test.Echo/Ticks")(b"2", metadata=ALICE, timeout=30)
    ticks_cluster = ch.unary_stream("/test.Echo/Ticks")(b"2", timeout=30)
    assert next(ticks_local) == b"tick 0 from local"
    assert next(ticks_cluster) == b"tick 0 from cluster"
    # meanwhile unary calls on the same channel keep being routed one by one
    seen = [app_of(ch, ALICE if i % 2 else []) for i in range(10)]
    assert seen == ["local" if i % 2 else "cluster" for i in range(10)]
    local_grpc.gate.release()
    cluster_grpc.gate.release()
    assert list(ticks_local) == [b"tick 1 from local"] and list(ticks_cluster) == [b"tick 1 from cluster"]


def test_route_rules_are_the_http1_rules(grpc_agent, local_grpc, clients):
    clients.append(start_client(grpc_agent, local_grpc.port, "--baggage", "dev=erin", "--path-prefix", "/test.Echo/Un",
                                "--name", "erin"))
    clients.append(start_client(grpc_agent, local_grpc.port, "--header-regex", "x-user=fr.*k", "--name", "frank"))
    with channel(grpc_agent.http_port) as c:
        assert app_of(c, [("baggage", "userId=1, dev = erin;ttl=5")]) == "local"
        assert unary(c, b"4 x", [("baggage", "dev=erin")], method="Big")[1]["x-app"] == "cluster"  # path differs
        assert app_of(c, [("x-user", "frank")]) == "local"
        assert app_of(c, [("x-user", "frankly")]) == "cluster"


def test_metadata_and_trailers_arrive_byte_for_byte(ch, side):
    metadata, app = side
    binary = bytes(range(256))
    sent = metadata + [("x-echo-text", "a b c ~!"), ("x-echo-repeat", "1"), ("x-echo-repeat", "2"), ("x-echo-raw-bin", binary)]
    _, initial, trailing = unary(ch, b"m", sent)
    assert initial["x-app"] == app.name
    assert initial["x-echo-text"] == "a b c ~!" and initial["x-echo-raw-bin"] == binary
    assert trailing["x-echo-text-t"] == "a b c ~!" and trailing["x-echo-raw-t-bin"] == binary
    call = ch.unary_unary("/test.Echo/Unary")
    _, c = call.with_call(b"m", metadata=sent, timeout=30)
    assert [v for k, v in c.initial_metadata() if k == "x-echo-repeat"] == ["1", "2"]


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK], ids=lambda c: c.name)
def test_every_status_code_arrives_with_its_message(ch, side, code):
    metadata, app = side
    with pytest.raises(grpc.RpcError) as e:
        unary(ch, str(code.value[0]).encode(), metadata, method="Abort")
    assert e.value.code() is code
    assert e.value.details() == f"aborted {code.value[0]} by {app.name}"


def test_server_streaming_delivers_each_message_as_it_is_sent(ch, side):
    metadata, app = side
    stream = ch.unary_stream("/test.Echo/Ticks")(b"5", metadata=metadata, timeout=30)
    for i in range(5):
        assert next(stream) == b"tick %d from %s" % (i, app.name.encode())
        app.gate.release()  # the next message exists only once this one has arrived
    assert list(stream) == []


def test_client_streaming_delivers_each_message_as_it_is_sent(ch, side):
    metadata, app = side
    with app.progress:
        app.received = 0
    messages = [os.urandom(100 + i) for i in range(5)]

    def requests():
        for i, message in enumerate(messages):
            yield message
            app.wait_until(lambda: app.received >= i + 1)  # the app has it before the next is sent

    response = ch.stream_unary("/test.Echo/ClientStream")(requests(), metadata=metadata, timeout=30)
    digest = hashlib.sha256(b"".join(messages)).hexdigest()
    assert response == f"{app.name}:5:{sum(map(len, messages))}:{digest}".encode()


def test_bidi_ping_pong_is_never_buffered(ch, side):
    metadata, app = side
    outgoing: list[bytes] = []
    cond = threading.Condition()

    def requests():
        for i in range(20):
            with cond:
                cond.wait_for(lambda: len(outgoing) == i, 30)  # send the next only after its answer came
            yield b"ping %d" % i

    replies = []
    for reply in ch.stream_stream("/test.Echo/Bidi")(requests(), metadata=metadata, timeout=30):
        replies.append(reply)
        with cond:
            outgoing.append(reply)
            cond.notify_all()
    assert replies == [b"%s:ping %d" % (app.name.encode(), i) for i in range(20)]


def test_8_mb_messages_both_ways(ch, side):
    metadata, app = side
    payload = os.urandom(8 * 1024 * 1024)
    size = 8 * 1024 * 1024 + 3
    response, initial, trailing = unary(ch, b"%d " % size + payload, metadata, method="Big")
    assert initial["x-app"] == app.name
    assert len(response) == size and response[:512] == bytes(range(256)) * 2
    assert trailing["x-request-sha256"] == hashlib.sha256(payload).hexdigest()
    # and many of them in both directions on one stream
    big = [os.urandom(3 * 1024 * 1024) for _ in range(3)]
    replies = list(ch.stream_stream("/test.Echo/Bidi")(iter(big), metadata=metadata, timeout=60))
    assert [r.split(b":", 1)[1] for r in replies] == big


def test_deadline_is_carried_and_enforced(ch, side):
    metadata, app = side
    app.ended_event.clear()
    with pytest.raises(grpc.RpcError) as e:
        unary(ch, b"", metadata, timeout=0.5, method="Wait")
    assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert app.ended_event.wait(30)  # the far side learnt that the call is over


def test_cancel_mid_stream_is_seen_by_the_far_side(ch, side):
    metadata, app = side
    app.started.clear()
    app.ended_event.clear()
    call = ch.unary_unary("/test.Echo/Wait").future(b"", metadata=metadata, timeout=60)
    assert app.started.wait(30)
    call.cancel()
    assert app.ended_event.wait(30)
    assert app.ended[-1] == "cancelled"


def test_health_check_and_watch(ch, side):
    metadata, app = side
    stub = health_pb2_grpc.HealthStub(ch)
    reply, call = stub.Check.with_call(health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert dict(call.initial_metadata()).get("x-app", app.name) == app.name
    app.health.set("svc", health_pb2.HealthCheckResponse.SERVING)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="svc"), metadata=metadata, timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    app.health.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()


def test_client_keepalive_pings_are_answered_by_the_agent(grpc_agent, alice, cluster_grpc):
    # grpcio servers answer frequent pings with GOAWAY too_many_pings; the agent answers
    # pings itself (per hop), so the app never sees them and calls keep working
    with channel(grpc_agent.http_port, **{"grpc.keepalive_time_ms": 100, "grpc.keepalive_permit_without_calls": 1,
                                          "grpc.http2.max_pings_without_data": 0}) as c:
        with pytest.raises(grpc.RpcError) as e:
            unary(c, b"", timeout=1.5, method="Wait")  # pings flow while the call waits
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert [app_of(c, ALICE if i % 2 else []) for i in range(6)] == ["cluster", "local"] * 3


def test_upstream_limited_to_4_concurrent_streams_never_fails_a_call(tmp_path, clients):
    app = GrpcApp("narrow", max_concurrent_streams=4)
    agent = start_agent(tmp_path, app.port)
    try:
        clients.append(start_client(agent, free_port(), "--header", "x-dev=zed", "--name", "zed"))  # routes: terminate h2
        with channel(agent.http_port) as c:
            hold = c.unary_unary("/test.Echo/Hold")
            calls = [hold.future(b"", timeout=60) for _ in range(12)]
            app.wait_until(lambda: app.active >= 4)
            app.release.set()
            assert [f.result() for f in calls] == [b"held by narrow"] * 12
    finally:
        agent.proc.stop()
        app.close()


def test_server_stop_with_grace_mid_stream_finishes_the_call(tmp_path, local_grpc, clients):
    app = GrpcApp("leaving")
    agent = start_agent(tmp_path, app.port)
    try:
        clients.append(start_client(agent, local_grpc.port, "--header", "x-dev=yan", "--name", "yan"))
        with channel(agent.http_port) as c:
            stream = c.unary_stream("/test.Echo/Ticks")(b"3", timeout=30)
            assert next(stream) == b"tick 0 from leaving"
            stopped = app.server.stop(30)  # GOAWAY to the agent; the call in flight may finish
            app.gate.release()
            app.gate.release()
            assert list(stream) == [b"tick 1 from leaving", b"tick 2 from leaving"]
            stopped.wait(30)
            with pytest.raises(grpc.RpcError) as e:
                unary(c)
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
            assert app_of(c, [("x-dev", "yan")]) == "local"  # other destinations are unaffected
    finally:
        agent.proc.stop()


def test_call_is_held_until_the_developer_process_accepts(grpc_agent, alice, clients):
    port = free_port()
    clients.append(start_client(grpc_agent, port, "--header", "x-dev=olga", "--name", "olga"))
    seen = len(grpc_agent.proc.lines)
    with channel(grpc_agent.http_port) as c:
        future = c.unary_unary("/test.Echo/Unary").future(b"late", metadata=[("x-dev", "olga")], timeout=60)
        grpc_agent.proc.wait_for(r"holding a request for olga", start=seen)
        late = GrpcApp("late", port=port)
        try:
            assert future.result() == b"late:late"
        finally:
            late.close()


def test_developer_not_accepting_gets_unavailable_naming_the_developer(cluster_grpc, tmp_path, clients):
    agent = start_agent(tmp_path, cluster_grpc.port, "--hold-timeout", "0.3")
    try:
        port = free_port()
        clients.append(start_client(agent, port, "--header", "x-dev=pete", "--name", "pete"))
        with channel(agent.http_port) as c:
            with pytest.raises(grpc.RpcError) as e:
                unary(c, metadata=[("x-dev", "pete")])
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "intercept of pete failed" in e.value.details() and f"localhost:{port}" in e.value.details()
            assert app_of(c) == "cluster"
    finally:
        agent.proc.stop()


def test_developer_killed_mid_stream_ends_it_unavailable_and_new_calls_reach_the_app(grpc_agent, alice, clients):
    app = GrpcApp("victim")
    try:
        victim = start_client(grpc_agent, app.port, "--header", "x-dev=leo", "--name", "leo")
        clients.append(victim)
        with channel(grpc_agent.http_port) as c:
            stream = c.unary_stream("/test.Echo/Ticks")(b"3", metadata=[("x-dev", "leo")], timeout=30)
            assert next(stream) == b"tick 0 from victim"
            seen = len(grpc_agent.proc.lines)
            victim.signal(signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as e:
                list(stream)
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "leo" in e.value.details()
            grpc_agent.proc.wait_for(r"dropped route x-dev: leo of leo", start=seen)
            assert app_of(c, [("x-dev", "leo")]) == "cluster"
            assert app_of(c, ALICE) == "local"
    finally:
        app.close()


def test_ten_developers_ten_thousand_mixed_rpcs_none_misrouted(cluster_grpc, tmp_path):
    agent = start_agent(tmp_path, cluster_grpc.port)
    apps = [GrpcApp(f"dev{i}", workers=8) for i in range(10)]
    procs = [start_client(agent, app.port, "--header", f"x-dev=dev{i}", "--name", f"dev{i}") for i, app in enumerate(apps)]
    try:
        def worker(seed: int) -> list[tuple[str, str]]:
            rng = random.Random(seed)
            wrong = []
            with channel(agent.http_port) as c:
                unary_call = c.unary_unary("/test.Echo/Unary")
                stream_call = c.unary_stream("/test.Echo/ServerStream")
                for batch in range(25):
                    pending = []
                    for n in range(20):
                        who = rng.randrange(11)  # 10: nobody's header
                        metadata = [("x-dev", f"dev{who}")] if who < 10 else []
                        expected = f"dev{who}" if who < 10 else "cluster"
                        if n % 5 == 4:
                            pending.append((expected, "stream", stream_call(b"2 10", metadata=metadata, timeout=60)))
                        else:
                            pending.append((expected, "unary", unary_call.future(b"%d" % n, metadata=metadata, timeout=60)))
                    for expected, kind, call in pending:
                        if kind == "stream":
                            got = dict(call.initial_metadata())["x-app"]
                            assert len(list(call)) == 2
                        else:
                            got = call.result().split(b":")[0].decode()
                        if got != expected:
                            wrong.append((expected, got))
            return wrong

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(worker, range(20)))  # 20 x 25 x 20 = 10,000 calls
        assert sum(map(len, results)) == 0, results
        assert all(app.calls > 0 for app in apps)
    finally:
        for p in procs:
            p.stop()
        for app in apps:
            app.close()
        agent.proc.stop()


GRPC_DEV_APP = '''
import sys
from tests.grpc_apps import GrpcApp
VERSION = "{version}"
app = GrpcApp(VERSION, port=int(sys.argv[1]))
app.server.wait_for_termination()
'''


def test_reload_under_steady_grpc_load_fails_no_call(grpc_agent, alice, tmp_path, clients):
    import sys
    import time

    from tests.conftest import INTERCEPT, Proc

    port = free_port()
    (tmp_path / "app.py").write_text(GRPC_DEV_APP.format(version="v1"))
    dev = Proc(INTERCEPT + ["start", "--agent", grpc_agent.ssh, "--credentials", str(grpc_agent.credentials),
                            "--port", str(port), "--header", "x-dev=reload", "--name", "reload", "--",
                            sys.executable, "app.py", str(port)],
               cwd=str(tmp_path), env={"PYTHONPATH": os.getcwd()})
    clients.append(dev)
    dev.wait_for(r"^intercept: ready: ")
    answers: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    progress = threading.Condition()

    def load() -> None:
        with channel(grpc_agent.http_port) as c:
            call = c.unary_unary("/test.Echo/Unary")
            while not stop.is_set():
                try:
                    got = call(b"x", metadata=[("x-dev", "reload")], timeout=30).split(b":")[0].decode()
                except grpc.RpcError as e:
                    got, failures[len(failures):] = None, [f"{e.code()}: {e.details()}"]
                with progress:
                    if got:
                        answers.append(got)
                    progress.notify_all()

    def wait_for_answer(version: str) -> None:
        start = len(answers)
        deadline = time.monotonic() + 60
        with progress:
            while version not in answers[start:]:
                assert not failures and time.monotonic() < deadline, failures[:5]
                progress.wait(5)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for_answer("v1")
        for version in ("v2", "v3"):
            seen = len(dev.lines)
            (tmp_path / "app.py").write_text(GRPC_DEV_APP.format(version=version))
            dev.wait_for(r"^intercept: reloaded: ", start=seen)
            wait_for_answer(version)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert {"v1", "v2", "v3"} <= set(answers)
