"""The developer loop: hot reload without failed requests, crash and fix, debugpy attach."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import INTERCEPT, Proc, free_port

APP = '''
import http.server, sys
VERSION = "{version}"
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = VERSION.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


def write_app(directory: Path, version: str) -> None:
    (directory / "app.py").write_text(APP.format(version=version))


def start_dev(agent, directory: Path, port: int, name: str, *flags: str) -> Proc:
    proc = Proc(
        INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), "--port", str(port),
                     "--header", f"x-dev={name}", "--name", name, *flags, "--", sys.executable, "app.py", str(port)],
        cwd=str(directory),
    )
    proc.wait_for(r"^intercept: ready: ")
    return proc


class SteadyLoad:
    """Requests with the header on keep-alive and fresh connections until stopped; counts failures."""

    def __init__(self, port: int, header: str, workers: int = 4) -> None:
        self.port, self.header = port, header
        self.failures: list[str] = []
        self.answers: list[str] = []
        self.stop = threading.Event()
        self.progress = threading.Condition()
        self.threads = [threading.Thread(target=self._run, args=(i % 2 == 0,)) for i in range(workers)]
        for t in self.threads:
            t.start()

    def _run(self, keep_alive: bool) -> None:
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("GET", "/", headers={"x-dev": self.header})
                resp = conn.getresponse()
                body = resp.read().decode()
                with self.progress:
                    if resp.status != 200:
                        self.failures.append(f"{resp.status} {body}")
                    else:
                        self.answers.append(body)
                    self.progress.notify_all()
                if not keep_alive or resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                with self.progress:
                    self.failures.append(repr(e))
                    self.progress.notify_all()
                conn = None
        if conn is not None:
            conn.close()

    def wait_for_answer(self, answer: str, limit: int = 200_000) -> None:
        """Let the load run until some request answered ``answer`` (bounded by a request count)."""
        start = len(self.answers)
        with self.progress:
            while answer not in self.answers[start:]:
                assert len(self.answers) - start < limit and not self.failures, self.failures[:5]
                self.progress.wait(30)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_saved_change_restarts_the_process_and_no_request_fails(agent, tmp_path, clients):
    port = free_port()
    write_app(tmp_path, "v1")
    dev = start_dev(agent, tmp_path, port, "reload")
    clients.append(dev)
    load = SteadyLoad(agent.http_port, "reload")
    try:
        load.wait_for_answer("v1")
        for version in ("v2", "v3"):
            seen = len(dev.lines)
            write_app(tmp_path, version)
            dev.wait_for(r"^intercept: reloading: app.py changed; restarting ", start=seen)
            dev.wait_for(r"^intercept: reloaded: ", start=seen)
            load.wait_for_answer(version)
    finally:
        load.finish()
    assert load.failures == []
    assert {"v1", "v2", "v3"} <= set(load.answers)
    assert agent.app_of() == "cluster"


def test_crashed_process_waits_for_a_fix_while_the_intercept_stays(agent, tmp_path, clients):
    port = free_port()
    write_app(tmp_path, "v1")
    dev = start_dev(agent, tmp_path, port, "crash")
    clients.append(dev)
    seen = len(dev.lines)
    (tmp_path / "app.py").write_text("raise SystemExit(7)\n")
    dev.wait_for(r"^intercept: exited: .* exited with status 7; save a change to restart it", start=seen)
    assert dev.p.poll() is None
    write_app(tmp_path, "fixed")
    dev.wait_for(r"^intercept: reloaded: ", start=seen)
    status, _, body = agent.request(headers={"x-dev": "crash"})
    assert (status, body) == (200, b"fixed")


def test_ignored_directories_do_not_restart(agent, tmp_path, clients):
    port = free_port()
    write_app(tmp_path, "v1")
    dev = start_dev(agent, tmp_path, port, "ignore")
    clients.append(dev)
    seen = len(dev.lines)
    for ignored in (".git", "__pycache__", "node_modules", ".venv"):
        (tmp_path / ignored).mkdir()
        (tmp_path / ignored / "x.py").write_text("x = 1\n")
    (tmp_path / "trigger.py").write_text("# a real change\n")
    m = dev.wait_for(r"^intercept: reloading: (.*) changed", start=seen)
    assert m[1] == "trigger.py"


def test_unwatched_command_exit_ends_the_intercept(agent, tmp_path, clients):
    (tmp_path / "app.py").write_text("raise SystemExit(3)\n")
    proc = Proc(
        INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), "--port", "1",
                     "--header", "x-dev=nowatch", "--no-watch", "--", sys.executable, "app.py"],
        cwd=str(tmp_path),
    )
    clients.append(proc)
    assert proc.finish() == 3


def test_a_command_killed_by_a_signal_ends_the_intercept_with_the_shells_status(agent, tmp_path, clients):
    # as a shell reports it (128 + the signal), so that `intercept start -- COMMAND; echo $?` reads alike
    (tmp_path / "app.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = Proc(
        INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), "--port", "1",
                     "--header", "x-dev=killed", "--no-watch", "--", sys.executable, "app.py"],
        cwd=str(tmp_path),
    )
    clients.append(proc)
    assert proc.finish() == 128 + signal.SIGKILL
    assert f"exited with status {128 + signal.SIGKILL} (killed by SIGKILL)" in proc.output


def dap_initialize(port: int) -> dict:
    """A Debug Adapter Protocol ``initialize`` request; the adapter's response."""
    body = json.dumps({"seq": 1, "type": "request", "command": "initialize",
                       "arguments": {"clientID": "intercept-test", "adapterID": "debugpy"}}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = int(head.split(b":")[1])
                if len(rest) >= length:
                    message = json.loads(rest[:length])
                    if message.get("type") == "response":
                        return message
                    data = rest[length:]
                    continue
            chunk = s.recv(65536)
            assert chunk, "debug adapter closed the connection"
            data += chunk


@pytest.mark.skipif(__import__("importlib").util.find_spec("debugpy") is None, reason="debugpy is not installed")
def test_debugger_answers_initialize_and_again_after_a_reload(agent, tmp_path, clients):
    port, debug_port = free_port(), free_port()
    write_app(tmp_path, "v1")
    dev = start_dev(agent, tmp_path, port, "debug", "--debug", "--debug-port", str(debug_port))
    clients.append(dev)
    assert f"intercept: debug: debugpy listens on 127.0.0.1:{debug_port}" in dev.output
    # the program runs (it answers), so debugpy, which starts before it, listens
    assert agent.request(headers={"x-dev": "debug"})[2] == b"v1"
    first = dap_initialize(debug_port)
    assert first["success"] and first["command"] == "initialize"
    seen = len(dev.lines)
    write_app(tmp_path, "v2")
    dev.wait_for(r"^intercept: reloaded: ", start=seen)
    assert agent.request(headers={"x-dev": "debug"})[2] == b"v2"
    again = dap_initialize(debug_port)
    assert again["success"] and again["command"] == "initialize"
    dev.signal(signal.SIGTERM)
    assert dev.finish() == 0


def test_command_gets_the_pod_environment_and_the_env_file(cluster_app, tmp_path, clients):
    from tests.conftest import start_agent

    agent = start_agent(tmp_path, cluster_app.port, env={"ORDERS_DB": "postgres://db:5432/orders", "INTERCEPT_HOLD_TIMEOUT": "10",
                                                         "IMAGE_ONLY": "x", "INTERCEPT_IMAGE_ENV": "IMAGE_ONLY"})
    try:
        port = free_port()
        (tmp_path / "app.py").write_text(
            "import json, os, sys\n"
            "keys = ('ORDERS_DB', 'IMAGE_ONLY', 'INTERCEPT_HOLD_TIMEOUT', 'INTERCEPT_SESSION_NAME', 'INTERCEPT_SESSION_ROUTE')\n"
            "print('ENV ' + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)\n"
        )
        env_file = tmp_path / "pod.env"
        proc = Proc(
            INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), "--port", str(port),
                         "--header", "x-dev=envy", "--name", "envy", "--no-watch", "--env-file", str(env_file),
                         "--", sys.executable, "app.py"],
            cwd=str(tmp_path),
        )
        clients.append(proc)
        assert proc.finish() == 0
        seen = json.loads(proc.wait_for(r"^ENV (.*)")[1])
        assert seen == {"ORDERS_DB": "postgres://db:5432/orders", "IMAGE_ONLY": None, "INTERCEPT_HOLD_TIMEOUT": None,
                        "INTERCEPT_SESSION_NAME": "envy", "INTERCEPT_SESSION_ROUTE": "requests with x-dev: envy"}
        text = env_file.read_text()
        assert 'ORDERS_DB="postgres://db:5432/orders"\n' in text and "INTERCEPT_SESSION_NAME=\"envy\"\n" in text
        assert "IMAGE_ONLY" not in text and "INTERCEPT_HOLD_TIMEOUT" not in text
    finally:
        agent.proc.stop()


def test_env_prints_the_pod_environment_without_intercepting(cluster_app, tmp_path):
    from tests.conftest import start_agent

    links = {"REDIS_SERVICE_HOST": "10.96.0.12", "REDIS_SERVICE_PORT": "6379", "REDIS_PORT": "tcp://10.96.0.12:6379",
             "REDIS_PORT_6379_TCP_ADDR": "10.96.0.12"}
    agent = start_agent(tmp_path, cluster_app.port, env={"ORDERS_DB": "postgres://db/orders", "QUOTED": "a 'b' $c", **links})
    try:
        for output in ("json", "sh", "dotenv"):
            proc = Proc(INTERCEPT + ["env", "--agent", agent.ssh, "--credentials", str(agent.credentials), "-o", output],
                        stderr=subprocess.PIPE)
            assert proc.finish() == 0, proc.output
            text = proc.output  # stdout alone: machine-readable
            if output == "json":
                env = json.loads(text)
                assert env["ORDERS_DB"] == "postgres://db/orders" and not any(k.startswith("INTERCEPT_") for k in env)
                assert {k: env[k] for k in links} == links  # as the pod has them
            elif output == "sh":
                assert "export QUOTED='a '\"'\"'b'\"'\"' $c'" in text
            else:
                assert 'ORDERS_DB="postgres://db/orders"' in text
            # stderr says what was done to the Services' variables: nothing, here and in direct mode
            assert proc.p.stderr.read().decode().splitlines() == [
                "intercept: access: REDIS_PORT, REDIS_PORT_6379_TCP_ADDR, REDIS_SERVICE_HOST are as in the pod (the "
                "Services' ClusterIPs): intercept env leaves them, and so does intercept start --agent (direct mode "
                "follows no Services)"]
        agent.proc.wait_for(r"connected from")  # it really spoke to the agent
        assert agent.app_of() == "cluster"
    finally:
        agent.proc.stop()


SERVE = ("import http.server, os, sys; print('command pid', os.getpid(), flush=True); "
         "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()")


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_intercept_takes_its_command_with_it(agent, tmp_path, clients):
    import os
    import select

    port = free_port()
    proc = Proc(INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), "--port", str(port),
                             "--header", "x-dev=orphan", "--no-watch", "--", sys.executable, "-c", SERVE, str(port)],
                cwd=str(tmp_path))
    clients.append(proc)
    pid = int(proc.wait_for(r"command pid (\d+)")[1])
    proc.wait_for(r"^intercept: ready: ")
    command = os.pidfd_open(pid)
    try:
        proc.p.kill()  # kill -9 of intercept start alone: no chance to stop COMMAND itself
        proc.finish()
        readable, _, _ = select.select([command], [], [], 30)
        assert readable, f"COMMAND (pid {pid}) outlived the intercept"
    finally:
        os.close(command)
    with socket.socket() as s:  # and its port is free again, for a server as the next start would run
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: its old connections may linger
        s.bind(("127.0.0.1", port))
        s.listen()


def test_a_start_whose_port_is_taken_names_the_process_holding_it(agent, tmp_path, clients):
    import os

    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        proc = Proc(INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), "--port", str(port),
                                 "--header", "x-dev=taken", "--no-watch", "--", sys.executable, "-c", SERVE, str(port)],
                    cwd=str(tmp_path))
        clients.append(proc)
        assert proc.finish() == 8
    assert f"localhost:{port} is already in use by pid {os.getpid()} (" in proc.output
    assert f"kill {os.getpid()}" in proc.output


def test_a_start_whose_port_is_taken_on_ipv6_localhost_names_the_process_holding_it(agent, tmp_path, clients):
    import os

    try:
        holder = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    # the command listens where Node's and Vite's "localhost" is on many systems
    serve6 = SERVE.replace("http.server.HTTPServer(('127.0.0.1'", "http.server.HTTPServer.address_family = socket.AF_INET6; "
                                                                 "http.server.HTTPServer(('::1'").replace("import ", "import socket, ", 1)
    with holder:
        port = holder.getsockname()[1]
        proc = Proc(INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), "--port", str(port),
                                 "--header", "x-dev=taken6", "--no-watch", "--", sys.executable, "-c", serve6, str(port)],
                    cwd=str(tmp_path))
        clients.append(proc)
        assert proc.finish() == 8
    assert f"localhost:{port} is already in use by pid {os.getpid()} (" in proc.output
