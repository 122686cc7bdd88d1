"""The agent's SSH server: nothing without the token, nothing beyond routes, silent clients dropped."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from intercept.credentials import Credentials
from intercept.errors import CredentialsError
from intercept.protocol import CONTROL_SUBSYSTEM
from tests.conftest import INTERCEPT, Agent, Proc, start_agent, start_client
from tests.netns import needs_netns, two_hosts


async def _connect(agent, token: str | None = None, username: str = "probe") -> asyncssh.SSHClientConnection:
    creds = json.loads(agent.credentials.read_text())
    return await asyncssh.connect(
        "127.0.0.1", agent.ssh_port, username=username, password=token or creds["token"],
        known_hosts=([asyncssh.import_public_key(creds["host_public_key"])], [], []),
        client_keys=None, agent_path=None, preferred_auth="password", config=None,
    )


def test_credentials_file_is_created_private_and_reused(cluster_app, tmp_path):
    path = tmp_path / "creds.json"
    first = start_agent(tmp_path, cluster_app.port, credentials=path)
    first.proc.stop()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    content = path.read_text()
    assert {"token", "host_public_key", "host_private_key"} <= json.loads(content).keys()
    second = start_agent(tmp_path, cluster_app.port, credentials=path)
    second.proc.stop()
    assert path.read_text() == content


def test_shell_and_exec_are_refused(agent):
    async def main():
        async with await _connect(agent) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("id", check=True)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_process(term_type="xterm")
            # the control subsystem is the one thing a session may open
            writer, reader, _ = await conn.open_session(subsystem=CONTROL_SUBSYSTEM, encoding=None)
            writer.write(b'{"op": "hello"}\n')
            assert json.loads(await reader.readline())["ok"] is True

    asyncio.run(main())


def test_forwarding_binds_nothing_and_outbound_is_refused_by_default(agent, cluster_app):
    async def main():
        async with await _connect(agent) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", cluster_app.port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("0.0.0.0", 0, "127.0.0.1", 1)

    asyncio.run(main())


def test_outbound_is_allowed_only_with_the_flag(cluster_app, tmp_path):
    agent = start_agent(tmp_path, cluster_app.port, "--allow-outbound")

    async def main():
        async with await _connect(agent) as conn:
            reader, writer = await conn.open_connection("127.0.0.1", cluster_app.port)
            writer.write(b"GET /outbound HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return await reader.read()

    try:
        assert b'"target": "/outbound"' in asyncio.run(main())
    finally:
        agent.proc.stop()


def test_wrong_token_gets_no_session(agent):
    async def main():
        with pytest.raises(asyncssh.PermissionDenied):
            await _connect(agent, token="guess")

    asyncio.run(main())


def test_control_channel_answers_bad_requests_without_dropping_the_session(agent):
    async def main():
        async with await _connect(agent) as conn:
            writer, reader, _ = await conn.open_session(subsystem=CONTROL_SUBSYSTEM, encoding=None)
            for line, error in ((b"not json", "bad-request"), (b'{"op": "nope"}', "bad-request"),
                                (b'{"op": "register", "rules": []}', "invalid")):
                writer.write(line + b"\n")
                reply = json.loads(await reader.readline())
                assert reply["ok"] is False and reply["error"] == error
            writer.write(b'{"op": "list"}\n')
            assert json.loads(await reader.readline()) == {"ok": True, "routes": []}

    asyncio.run(main())


def test_list_shows_everyones_routes(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--header", "x-dev=wendy", "--name", "wendy"))

    async def main():
        async with await _connect(agent) as conn:
            writer, reader, _ = await conn.open_session(subsystem=CONTROL_SUBSYSTEM, encoding=None)
            writer.write(b'{"op": "list"}\n')
            return json.loads(await reader.readline())["routes"]

    routes = asyncio.run(main())
    assert [(r["holder"], r["description"]) for r in routes] == [("wendy", "x-dev: wendy")]


def test_silent_client_is_dropped_by_keepalive(agent, local_app, clients):
    """A frozen laptop (SIGSTOP: TCP stays up, nothing answers) loses its route within 15 s."""
    client = start_client(agent, local_app.port, "--header", "x-dev=xena", "--name", "xena")
    clients.append(client)
    assert agent.app_of({"x-dev": "xena"}) == "local"
    seen = len(agent.proc.lines)
    client.signal(signal.SIGSTOP)
    try:
        agent.proc.wait_for(r"dropped route x-dev: xena of xena", start=seen, timeout=40)
        assert agent.app_of({"x-dev": "xena"}) == "cluster"
    finally:
        client.signal(signal.SIGCONT)


@needs_netns
def test_agent_and_client_in_separate_network_namespaces(tmp_path):
    """A "cluster" host runs the app and the agent; a "laptop" host runs the client and the local app."""
    with two_hosts("10.77.0") as hosts:
        run = [sys.executable, "-c", _NETNS_SCRIPT, str(tmp_path)]
        out = subprocess.run(
            hosts.run_in(hosts.cluster) + run + ["cluster", hosts.laptop],
            capture_output=True, text=True, timeout=120, cwd=os.getcwd(),
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "local via laptop" in out.stdout and "cluster without header" in out.stdout


# Runs inside the "cluster" namespace: app + agent there; client + local app in the laptop
# namespace (started through `ip netns exec`); then requests from the cluster side.
_NETNS_SCRIPT = r"""
import sys, subprocess
from pathlib import Path
sys.path.insert(0, ".")
from tests.apps import App
from tests.conftest import Agent, Proc, INTERCEPT
tmp, _, laptop = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
app = App("cluster", host="10.77.0.1")
agent = Agent(Proc(INTERCEPT + ["-v", "agent", "--listen", "10.77.0.1:0", "--ssh-listen", "10.77.0.1:0",
                                 "--upstream", f"10.77.0.1:{app.port}", "--credentials", str(tmp / "c.json")]), tmp / "c.json")
local = Proc(["ip", "netns", "exec", laptop, sys.executable, "-c",
              "import sys; sys.path.insert(0, '.'); from tests.apps import App; import threading; "
              "a = App('laptop', port=18123); print('up', flush=True); threading.Event().wait()"])
local.wait_for("^up")
client = Proc(["ip", "netns", "exec", laptop] + INTERCEPT + ["start", "--agent", f"10.77.0.1:{agent.ssh_port}",
              "--credentials", str(tmp / "c.json"), "--port", "18123", "--header", "x-dev=ns", "--name", "ns"])
try:
    client.wait_for("^intercept: ready: ")
    import http.client
    def app_of(headers):
        c = http.client.HTTPConnection("10.77.0.1", agent.http_port, timeout=30)
        c.request("GET", "/", headers=headers)
        r = c.getresponse(); r.read(); c.close()
        return r.getheader("X-App")
    assert app_of({"x-dev": "ns"}) == "laptop", "routed request did not reach the laptop"
    print("local via laptop")
    assert app_of({}) == "cluster"
    print("cluster without header")
finally:
    client.stop(); local.stop(); agent.proc.stop()
"""


def _ssh_stack_loaded(pid: int) -> bool:
    """Whether the process has mapped cryptography's bindings, which asyncssh brings."""
    with open(f"/proc/{pid}/maps") as maps:
        return "cryptography/hazmat/bindings/_rust" in maps.read()


def test_the_ssh_stack_loads_with_the_first_developer_and_serves_them(cluster_app, local_app, tmp_path):
    path = tmp_path / "creds.json"
    path.write_text(Credentials.generate().to_json())  # as the injection's Secret holds them in a pod
    agent = start_agent(tmp_path, cluster_app.port, credentials=path)
    try:
        assert agent.app_of() == "cluster"
        assert not _ssh_stack_loaded(agent.proc.p.pid), "an agent no developer has reached loaded asyncssh"
        client = start_client(agent, local_app.port, "--header", "x-dev=alice")
        try:
            assert agent.app_of({"x-dev": "alice"}) == "local"
            assert agent.app_of() == "cluster"
            assert _ssh_stack_loaded(agent.proc.p.pid)
        finally:
            client.stop()
    finally:
        agent.proc.stop()


def test_a_host_key_that_is_no_key_stops_the_agent_at_start_naming_the_file(cluster_app, tmp_path):
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({**json.loads(Credentials.generate().to_json()), "host_private_key": "garbage"}))
    done = subprocess.run(INTERCEPT + ["agent", "--listen", "127.0.0.1:0", "--ssh-listen", "127.0.0.1:0",
                                       "--upstream", f"127.0.0.1:{cluster_app.port}", "--credentials", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == CredentialsError.exit_code, done
    assert f"credentials file {path}: host_private_key is not a private key" in done.stderr, done.stderr


def test_an_ssh_server_that_cannot_start_stops_the_agent_saying_why(cluster_app, local_app, tmp_path):
    """A key that looks like one but is not: found when the first developer comes. The agent
    exits (its pod restarts and shows why) rather than stay ready with a dead SSH port."""
    path = tmp_path / "creds.json"
    broken = "-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5\n-----END OPENSSH PRIVATE KEY-----\n"
    path.write_text(json.dumps({**json.loads(Credentials.generate().to_json()), "host_private_key": broken}))
    agent = start_agent(tmp_path, cluster_app.port, credentials=path)
    assert agent.app_of() == "cluster"
    client = start_client(agent, local_app.port, "--header", "x-dev=alice", wait=False)
    try:
        assert agent.proc.finish() == 1, agent.proc.output
        assert "intercept: error: the SSH server could not start (KeyImportError" in agent.proc.output, agent.proc.output
        assert client.finish() != 0
    finally:
        client.stop()


_DNS_RECORDER = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("listening", flush=True)
while True:
    query, _ = s.recvfrom(512)
    labels, i = [], 12
    while query[i]:
        labels.append(query[i + 1:i + 1 + query[i]].decode(errors="replace"))
        i += 1 + query[i]
    print("query", ".".join(labels), flush=True)
"""


@needs_netns
def test_a_developer_connects_without_the_agent_asking_dns(tmp_path):
    """A pod's DNS may be slow or broken: the SSH server looks up no name (no GSS host, no reverse lookup)."""
    netns = f"ipd-{os.urandom(3).hex()}"
    etc = Path("/etc/netns") / netns
    procs = []
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        etc.mkdir(parents=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n")  # the pod's hostname is not in it, as in many pods
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        inside = ["ip", "netns", "exec", netns]
        recorder = Proc(inside + [sys.executable, "-c", _DNS_RECORDER])
        procs.append(recorder)
        recorder.wait_for("^listening")
        path = tmp_path / "creds.json"
        path.write_text(Credentials.generate().to_json())
        agent = Proc(inside + INTERCEPT + ["agent", "--listen", "127.0.0.1:0", "--ssh-listen", "127.0.0.1:0",
                                           "--upstream", "127.0.0.1:18080", "--credentials", str(path)])
        procs.append(agent)
        ssh_port = Agent(agent, path).ssh_port
        client = Proc(inside + INTERCEPT + ["start", "--agent", f"127.0.0.1:{ssh_port}", "--credentials", str(path),
                                            "--port", "18081", "--header", "x-dev=dns", "--name", "dns"])
        procs.append(client)
        client.wait_for("^intercept: ready: ")
        # A lookup of our own marks the end: every query the connection made came before it.
        marker = Proc(inside + ["getent", "hosts", "end-of-connect.invalid"])  # waits on the silent server:
        procs.append(marker)  # stopped once its query is seen
        recorder.wait_for(r"^query end-of-connect\.invalid")
        queries = [line for line in recorder.lines if line.startswith("query ")]
        assert queries[0] == "query end-of-connect.invalid", queries
    finally:
        for proc in reversed(procs):
            proc.stop()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)


def test_a_flood_of_connections_that_never_log_in_is_bounded_and_a_developer_still_gets_in(agent):
    """Sockets that open the SSH port and say nothing were each held for the login timeout,
    with no cap: enough of them used up the pod's descriptors, and HTTP clients and
    developers were reset. Now at most MAX_LOGGING_IN wait; the oldest beyond go."""
    from intercept.agent.agent import MAX_LOGGING_IN

    flood = [socket.create_connection(("127.0.0.1", agent.ssh_port), timeout=30) for _ in range(MAX_LOGGING_IN * 3)]
    try:
        for s in flood:  # the agent's banner, or the close of one dropped already: each was accepted
            s.recv(256)
        assert agent.app_of() == "cluster"  # HTTP served meanwhile (and the agent's loop has moved on)

        async def log_in() -> None:
            async with await _connect(agent, username="real-developer") as conn:
                writer, reader, _ = await conn.open_session(subsystem=CONTROL_SUBSYSTEM, encoding=None)
                writer.write(b'{"op": "hello"}\n')
                assert json.loads(await reader.readline())["ok"] is True

        asyncio.run(log_in())
        still_open = 0
        for s in flood:
            s.setblocking(False)
            try:
                still_open += s.recv(256) != b""  # more of a banner: open
            except BlockingIOError:
                still_open += 1
            except ConnectionResetError:
                pass
        assert still_open <= MAX_LOGGING_IN
    finally:
        for s in flood:
            s.close()
