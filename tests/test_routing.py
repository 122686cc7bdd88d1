"""Per-request routing to developers' processes: real agent, real clients, real SSH."""

from __future__ import annotations

import http.client
import random
import re
import socket
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.apps import App, Relay
from tests.conftest import LINE_TIMEOUT, echo, free_port, start_agent, start_client


def test_request_with_my_header_reaches_my_process(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--header", "x-dev=alice", "--name", "alice"))
    assert "requests with x-dev: alice now reach localhost" in clients[0].output
    assert agent.app_of({"x-dev": "alice"}) == "local"
    assert agent.app_of({"x-dev": "bob"}) == "cluster"
    assert agent.app_of() == "cluster"


def test_default_route_is_the_personal_header(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--name", "carol"))
    assert "your requests carry x-intercept-id: carol" in clients[0].output
    assert agent.app_of({"X-Intercept-Id": "carol"}) == "local"
    assert agent.app_of() == "cluster"


def test_each_request_on_a_keep_alive_connection_is_routed_on_its_own(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--header", "x-dev=dave", "--name", "dave"))
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    seen = []
    for i in range(12):
        headers = {"x-dev": "dave"} if i % 3 == 0 else {}
        conn.request("POST", f"/k{i}", body=b"b" * i, headers=headers)
        resp = conn.getresponse()
        got = echo(resp.read())
        assert got["target"] == f"/k{i}" and got["body_length"] == i
        seen.append(got["app"])
    conn.close()
    assert seen == ["local" if i % 3 == 0 else "cluster" for i in range(12)]


def test_baggage_and_path_prefix_routes(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--baggage", "dev=erin", "--path-prefix", "/api", "--name", "erin"))
    assert agent.app_of({"baggage": "userId=1, dev = erin;ttl=5"}, path="/api/orders") == "local"
    assert agent.app_of({"baggage": "userId=1, dev=erin"}, path="/web") == "cluster"
    assert agent.app_of({"baggage": "dev=frank"}, path="/api/orders") == "cluster"


def test_upgrade_is_routed_by_the_upgrade_requests_headers(agent, local_app, clients):
    import socket

    clients.append(start_client(agent, local_app.port, "--header", "x-dev=gina", "--name", "gina"))
    with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: a\r\nx-dev: gina\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert b"X-App: local" in head
        s.sendall(b"ping over ssh")
        got = b""
        while len(got) < 13:
            got += s.recv(100)
        assert got == b"ping over ssh"


def test_same_rule_held_by_someone_else_is_refused_naming_the_holder(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--header", "x-dev=hank", "--name", "hank"))
    second = start_client(agent, local_app.port, "--header", "x-dev=hank", "--name", "ivan", wait=False)
    clients.append(second)
    assert second.finish() == 6
    assert "already held by hank" in second.output
    assert agent.app_of({"x-dev": "hank"}) == "local"


def test_all_traffic_only_while_nobody_else_intercepts(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--header", "x-dev=judy", "--name", "judy"))
    greedy = start_client(agent, local_app.port, "--all", "--name", "kim", wait=False)
    clients.append(greedy)
    assert greedy.finish() == 6


def test_ten_developers_ten_thousand_requests_none_misrouted(cluster_app, tmp_path):
    agent = start_agent(tmp_path, cluster_app.port)
    apps = [App(f"dev{i}") for i in range(10)]
    procs = [start_client(agent, app.port, "--header", f"x-dev=dev{i}", "--name", f"dev{i}") for i, app in enumerate(apps)]
    try:
        def worker(seed: int) -> list[tuple[str, str]]:
            rng = random.Random(seed)
            conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=60)
            wrong = []
            for n in range(500):
                who = rng.randrange(11)  # 10 = nobody's header
                headers = {"x-dev": f"dev{who}"} if who < 10 else {}
                conn.request("GET", f"/{seed}/{n}", headers=headers)
                resp = conn.getresponse()
                resp.read()
                expected = f"dev{who}" if who < 10 else "cluster"
                if resp.getheader("X-App") != expected:
                    wrong.append((expected, resp.getheader("X-App")))
            conn.close()
            return wrong

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(worker, range(20)))
        assert sum(map(len, results)) == 0, results
        assert all(app.hits > 0 for app in apps)
    finally:
        for p in procs:
            p.stop()
        for app in apps:
            app.close()
        agent.proc.stop()


def test_killed_developer_falls_back_and_others_keep_working(agent, cluster_app, local_app, clients):
    other_app = App("other")
    try:
        victim = start_client(agent, local_app.port, "--header", "x-dev=leo", "--name", "leo")
        survivor = start_client(agent, other_app.port, "--header", "x-dev=mia", "--name", "mia")
        clients += [victim, survivor]
        assert agent.app_of({"x-dev": "leo"}) == "local"
        seen = len(agent.proc.lines)
        victim.signal(signal.SIGKILL)
        agent.proc.wait_for(r"dropped route x-dev: leo of leo", start=seen)
        assert agent.app_of({"x-dev": "leo"}) == "cluster"
        assert agent.app_of({"x-dev": "mia"}) == "other"
    finally:
        other_app.close()


def test_ctrl_c_unregisters_and_exits_zero(agent, local_app, clients):
    client = start_client(agent, local_app.port, "--header", "x-dev=nina", "--name", "nina")
    clients.append(client)
    assert agent.app_of({"x-dev": "nina"}) == "local"
    client.signal(signal.SIGINT)
    assert client.finish() == 0
    assert "intercept: left: " in client.output
    assert agent.app_of({"x-dev": "nina"}) == "cluster"


def test_matched_request_is_held_until_the_process_accepts(agent, clients):
    port = free_port()
    clients.append(start_client(agent, port, "--header", "x-dev=olga", "--name", "olga"))
    seen = len(agent.proc.lines)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(app=agent.app_of({"x-dev": "olga"})))
    t.start()
    agent.proc.wait_for(r"holding a request for olga", start=seen)
    late = App("late", port=port)
    try:
        t.join(60)
        assert result["app"] == "late"
    finally:
        late.close()


def test_a_held_request_whose_developer_leaves_goes_to_the_app_on_its_connections_own_upstream(agent, cluster_app, clients):
    # A keep-alive connection reached the app once; its next request waits for a developer
    # whose process does not accept yet, and the developer leaves meanwhile: the request
    # goes to the app over the connection it already had, not over a second one that
    # would leave the first open and idle.
    client = start_client(agent, free_port(), "--header", "x-dev=pia", "--name", "pia")
    clients.append(client)
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    try:
        conn.request("GET", "/first")
        first = conn.getresponse()
        first.read()
        assert first.getheader("X-App") == "cluster"
        before = cluster_app.connections
        seen = len(agent.proc.lines)
        conn.request("GET", "/held", headers={"x-dev": "pia"})
        agent.proc.wait_for(r"holding a request for pia", start=seen)
        client.signal(signal.SIGTERM)
        held = conn.getresponse()
        assert held.getheader("X-App") == "cluster" and echo(held.read())["target"] == "/held"
        assert cluster_app.connections == before
    finally:
        conn.close()


def test_a_process_listening_on_localhost_over_ipv6_gets_its_requests(agent, clients):
    # Node's and Vite's "localhost" is ::1 on many systems: such a process is on localhost:PORT too
    try:
        local = App("local6", host="::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        clients.append(start_client(agent, local.port, "--header", "x-dev=vera", "--name", "vera"))
        status, headers, _ = agent.request(headers={"x-dev": "vera"})
        assert (status, headers.get("X-App")) == (200, "local6")
        assert agent.app_of() == "cluster"
    finally:
        local.close()


def test_matched_request_whose_process_never_accepts_gets_502_naming_the_developer(cluster_app, tmp_path, clients):

    agent = start_agent(tmp_path, cluster_app.port, "--hold-timeout", "0.3")
    try:
        port = free_port()
        clients.append(start_client(agent, port, "--header", "x-dev=pete", "--name", "pete"))
        status, _, body = agent.request(headers={"x-dev": "pete"})
        assert status == 502
        assert b"intercept of pete failed" in body and f"localhost:{port}".encode() in body
        held = float(re.search(rb"\(held (\d+\.\d)s\)", body)[1])
        assert held >= 0.3  # the time it was really held, not the setting
        assert agent.app_of() == "cluster"
    finally:
        agent.proc.stop()


def test_wrong_token_is_refused_with_its_exit_code(agent, local_app, tmp_path, clients):
    import json

    creds = json.loads(agent.credentials.read_text())
    creds["token"] = "not-the-token"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(creds))
    client = start_client(agent, local_app.port, "--name", "quinn", credentials=bad, wait=False)
    clients.append(client)
    assert client.finish() == 4
    assert "refused the access token" in client.output


def test_host_key_mismatch_is_refused_as_possible_impersonation(agent, local_app, tmp_path, clients):
    import json

    from intercept.credentials import Credentials

    creds = json.loads(agent.credentials.read_text())
    creds["host_public_key"] = Credentials.generate().host_public_key
    other = tmp_path / "other.json"
    other.write_text(json.dumps(creds))
    client = start_client(agent, local_app.port, "--name", "rita", credentials=other, wait=False)
    clients.append(client)
    assert client.finish() == 5
    assert "possible impersonation" in client.output


def test_unreachable_agent_has_its_exit_code(agent, clients):

    from tests.conftest import INTERCEPT, Proc

    port = free_port()
    dead = Proc(INTERCEPT + ["start", "--agent", f"127.0.0.1:{port}", "--credentials", str(agent.credentials), "--port", "1"])
    clients.append(dead)
    assert dead.finish() == 3
    assert f"agent 127.0.0.1:{port} is unreachable" in dead.output


def test_client_reconnects_and_registers_again_after_agent_restart(cluster_app, local_app, tmp_path, clients):
    agent = start_agent(tmp_path, cluster_app.port)
    client = start_client(agent, local_app.port, "--header", "x-dev=tina", "--name", "tina")
    clients.append(client)
    assert agent.app_of({"x-dev": "tina"}) == "local"
    ports = (agent.http_port, agent.ssh_port)
    agent.proc.stop()
    client.wait_for(r"^intercept: reconnecting: ")
    agent = start_agent(tmp_path, cluster_app.port, credentials=agent.credentials, ports=ports)
    try:
        client.wait_for(r"^intercept: reconnected: requests with x-dev: tina reach localhost")
        assert agent.app_of({"x-dev": "tina"}) == "local"
    finally:
        agent.proc.stop()


def test_command_runs_as_the_local_process_and_stops_with_the_intercept(agent, clients, tmp_path):
    import socket
    import sys

    port = free_port()
    (tmp_path / "index.html").write_text("from the command\n")
    client = start_client(
        agent, port, "--header", "x-dev=uma", "--name", "uma", "--",
        sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path),
        wait=True,
    )
    clients.append(client)
    status, _, body = agent.request(path="/index.html", headers={"x-dev": "uma"})
    assert (status, body) == (200, b"from the command\n")
    client.signal(signal.SIGTERM)
    assert client.finish() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_intercept_variables_are_another_spelling_of_the_flags(agent, local_app, clients):
    from tests.conftest import INTERCEPT, Proc

    proc = Proc(INTERCEPT + ["start", "--port", str(local_app.port), "--header", "x-dev=flag-wins"],
                env={"INTERCEPT_AGENT": agent.ssh, "INTERCEPT_CREDENTIALS": str(agent.credentials),
                     "INTERCEPT_HEADER": "x-dev=from-env", "INTERCEPT_NAME": "yuri"})
    clients.append(proc)
    proc.wait_for(r"^intercept: ready: requests with x-dev: flag-wins now reach")
    assert agent.app_of({"x-dev": "flag-wins"}) == "local"
    assert agent.app_of({"x-dev": "from-env"}) == "cluster"
    bad = Proc(INTERCEPT + ["start"], env={"INTERCEPT_AGENT": agent.ssh, "INTERCEPT_PORT": "http"})
    clients.append(bad)
    assert bad.finish() == 2
    assert "INTERCEPT_PORT=http" in bad.output


def test_developer_process_closing_connections_never_hangs_a_request(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--header", "x-dev=zoe", "--name", "zoe"))
    # a close-delimited response from the developer's process arrives whole
    with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as s:
        s.sendall(b"GET /close HTTP/1.1\r\nHost: a\r\nx-dev: zoe\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.endswith(b"local until close\n")
    # the process crashes mid-request: a 502 naming the intercept, not a hang
    status, _, body = agent.request(path="/hangup", headers={"x-dev": "zoe"})
    assert status == 502
    # the process closes idle keep-alive connections: the next request still gets through
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    for path in ("/idle-close", "/after", "/idle-close", "/after-again"):
        conn.request("GET", path, headers={"x-dev": "zoe"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("X-App") == "local", path
        resp.read()
    conn.close()


def _raw_exchange(port: int, request: bytes, source: str = "127.0.0.1") -> tuple[str, dict]:
    """One request written byte for byte on a fresh socket from address ``source``:
    (who answered, the echo)."""
    from tests.apps import read_responses

    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s:
        s.sendall(request)
        ((resp, body),) = read_responses(s, 1)
    headers = {k.decode().lower(): v.decode() for k, v in resp.headers}
    return headers["x-app"], echo(body)


def test_a_list_on_one_line_and_repeated_lines_route_alike(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--header", "x-dev=abby", "--name", "abby"))
    port = agent.http_port
    one_line = b"GET /one HTTP/1.1\r\nHost: a\r\nx-dev: bob, abby\r\n\r\n"
    two_lines = b"GET /two HTTP/1.1\r\nHost: a\r\nx-dev: bob\r\nx-dev: abby\r\n\r\n"
    neither = b"GET /neither HTTP/1.1\r\nHost: a\r\nx-dev: bob,carl\r\n\r\n"
    assert _raw_exchange(port, one_line)[0] == "local"
    assert _raw_exchange(port, two_lines)[0] == "local"
    assert _raw_exchange(port, neither)[0] == "cluster"


def test_path_prefix_routes_on_the_normalized_path_and_forwards_the_raw_one(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--path-prefix", "/api", "--header", "x-dev=beth", "--name", "beth"))
    port = agent.http_port
    app, seen = _raw_exchange(port, b"GET /api/../secret HTTP/1.1\r\nHost: a\r\nx-dev: beth\r\n\r\n")
    assert (app, seen["target"]) == ("cluster", "/api/../secret")
    app, seen = _raw_exchange(port, b"GET /%61pi/x HTTP/1.1\r\nHost: a\r\nx-dev: beth\r\n\r\n")
    assert (app, seen["target"]) == ("local", "/%61pi/x")


def test_new_connections_requests_reach_the_developer_with_no_round_trip_first(cluster_app, tmp_path, clients):
    """Opening an SSH channel to the developer's machine costs a round trip (40 to 120 ms over
    a real network). A request without a body travels with its channel's opening: several new
    connections' requests reach the developer's process while nothing from their machine
    (a channel's confirmation included) can reach the agent."""
    local = App("local")
    agent = start_agent(tmp_path, cluster_app.port)
    link = Relay(agent.ssh_port)
    answers: list[tuple] = []
    try:
        clients.append(start_client(agent, local.port, "--header", "x-dev=sal", "--name", "sal", via=f"127.0.0.1:{link.port}"))
        assert agent.app_of({"x-dev": "sal"}) == "local"
        link.hold(link.forth)  # the developer's machine can no longer answer anything, a channel's opening included
        asking = [threading.Thread(target=lambda i=i: answers.append(agent.request(path=f"/new{i}", headers={"x-dev": "sal"})))
                  for i in range(3)]
        for thread in asking:
            thread.start()
        assert sorted(r["target"] for r in local.wait_requests(4, timeout=LINE_TIMEOUT)[1:]) == ["/new0", "/new1", "/new2"]
        link.carry()
        for thread in asking:
            thread.join()
        assert sorted((status, headers["X-App"]) for status, headers, _ in answers) == [(200, "local")] * 3
        assert local.connections == 4  # one per connection: nothing held open ahead of need
    finally:
        link.carry()
        link.close()
        agent.proc.stop()
        local.close()


def test_requests_waiting_for_a_silently_lost_developer_go_to_the_app(cluster_app, local_app, tmp_path, clients):
    # The laptop lid closes: the client stops answering anything, SSH keepalives included.
    # A request for it waits for the channel that will never open; when the agent's
    # keepalive gives up on the connection (15 s), its route goes and the request is
    # routed again, to the app, not answered 502 (the hold timeout is long past by then).
    agent = start_agent(tmp_path, cluster_app.port, "--hold-timeout", "1")
    try:
        client = start_client(agent, local_app.port, "--header", "x-dev=sid", "--name", "sid")
        clients.append(client)
        assert agent.app_of({"x-dev": "sid"}) == "local"
        seen = len(agent.proc.lines)
        client.signal(signal.SIGSTOP)
        try:
            status, headers, body = agent.request(path="/while-stopped", headers={"x-dev": "sid"})
            assert (status, headers.get("X-App")) == (200, "cluster"), body
            assert echo(body)["target"] == "/while-stopped"
            agent.proc.wait_for(r"dropped route x-dev: sid of sid", start=seen)
        finally:
            client.signal(signal.SIGCONT)
    finally:
        agent.proc.stop()


def test_leaving_unregisters_first_and_lets_a_stream_in_flight_finish(agent, clients):
    from tests.apps import EventReader, EventStream

    stream = EventStream("local-sse")
    try:
        client = start_client(agent, stream.port, "--header", "x-dev=sse", "--name", "sse")
        clients.append(client)
        reader = EventReader(agent.http_port, [("x-dev", "sse")])
        assert reader.header("X-App") == "local-sse"
        stream.wait_open()
        stream.send("one")
        assert reader.event() == b"data: one\n\n"
        client.signal(signal.SIGTERM)
        client.wait_for(r"^intercept: leaving: requests with x-dev: sse go to the cluster again; letting 1 response in flight finish")
        assert agent.app_of({"x-dev": "sse"}) == "cluster"  # the route went first
        stream.send("two")  # the stream in flight goes on
        assert reader.event() == b"data: two\n\n"
        stream.end()
        assert reader.event() is None  # and ends whole
        assert client.finish() == 0
        assert "intercept: left: requests with x-dev: sse go to the cluster again" in client.output
        reader.close()
    finally:
        stream.close()


def test_the_app_and_the_developer_see_the_client_address_in_forwarding_headers(agent, cluster_app, local_app, tmp_path, clients):
    # the client connects from 127.0.0.2; the agent reaches the apps from 127.0.0.1
    clients.append(start_client(agent, local_app.port, "--header", "x-dev=fern", "--name", "fern"))
    head = b"GET /who HTTP/1.1\r\nHost: a\r\n%sX-Forwarded-For: 203.0.113.7\r\n\r\n"
    for routing, expected_app in ((b"", "cluster"), (b"x-dev: fern\r\n", "local")):
        app, seen = _raw_exchange(agent.http_port, head % routing, source="127.0.0.2")
        assert app == expected_app
        assert seen["headers"][-3:] == [["X-Forwarded-For", "203.0.113.7"], ["X-Forwarded-For", "127.0.0.2"],
                                        ["Forwarded", "for=127.0.0.2"]]
    quiet = start_agent(tmp_path, cluster_app.port, "--no-forwarded-headers")
    try:
        app, seen = _raw_exchange(quiet.http_port, head % b"", source="127.0.0.2")
        assert seen["headers"] == [["Host", "a"], ["X-Forwarded-For", "203.0.113.7"]]
    finally:
        quiet.proc.stop()
