"""This machine's intercepts: `intercept up`/`down`/`status`/`leave`/`vscode` and the registry.

Real processes throughout: a real agent (direct mode, `agent:` and `credentials:` in
intercept.yaml), a real local app, the real CLI. Every test has its own state directory
(INTERCEPT_STATE_DIR), which also marks the processes it started: the teardown stops
them and `running_with()` finds any that were left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from intercept.workspace import STATUS_FIELDS, down, entries, register, state_dir, status
from tests.conftest import INTERCEPT, Agent, Proc

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc (Linux)")


class Machine:
    """One test's view of "this machine": its state directory and the CLI run with it."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.state = tmp_path / "state"
        self.env = {**os.environ, "INTERCEPT_STATE_DIR": str(self.state), "PYTHONUNBUFFERED": "1"}

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(INTERCEPT + list(args), capture_output=True, text=True, env=self.env,
                              cwd=cwd or self.dir, stdin=subprocess.DEVNULL, timeout=120)

    def proc(self, *args: str) -> Proc:
        return Proc(INTERCEPT + list(args), env={"INTERCEPT_STATE_DIR": str(self.state)}, cwd=self.dir)

    def status(self) -> list[dict]:
        return status(self.env)

    def running(self) -> list[int]:
        return running_with(self.state)


def running_with(state: Path) -> list[int]:
    """The live processes (not zombies) whose environment names ``state`` as INTERCEPT_STATE_DIR."""
    marker = f"INTERCEPT_STATE_DIR={state}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            text = (proc / "stat").read_text()
        except OSError:
            continue
        if text[text.rindex(")") + 2] not in "ZX":
            found.append(int(proc.name))
    return found


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    m = Machine(tmp_path)
    yield m
    down(None, m.env, grace=5)
    for pid in m.running():
        os.kill(pid, signal.SIGKILL)


def header() -> tuple[str, str]:
    """A route of this test's own, so that tests sharing the agent never conflict."""
    return "x-dev", f"dev-{uuid.uuid4().hex[:8]}"


def write_spec(path: Path, agent: Agent, *intercepts: dict) -> Path:
    data = {"version": 1, "intercepts": [
        {"agent": agent.ssh, "credentials": str(agent.credentials), **intercept} for intercept in intercepts
    ]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def unreachable_address() -> tuple[socket.socket, str]:
    """A bound port that does not listen: connections are refused as long as the socket is open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


# --- up --detach, status, down ------------------------------------------------------------


def test_up_detach_returns_once_ready_and_requests_with_the_header_reach_the_local_app(agent, local_app, machine):
    name, value = header()
    write_spec(machine.dir / "intercept.yaml", agent,
               {"service": "orders", "port": local_app.port, "headers": [f"{name}={value}"]})

    result = machine.run("up", "--detach", "--log-file", str(machine.dir / "intercept.log"))

    assert result.returncode == 0, result.stderr
    assert f"[orders] intercept: ready: requests with {name}: {value} now reach localhost:{local_app.port}" in result.stdout
    assert "intercept: up: intercept.yaml: orders (pid " in result.stdout
    assert agent.app_of({name: value}) == "local"
    assert agent.app_of({name: "someone-else"}) == "cluster"
    assert "intercept: ready:" in (machine.dir / "intercept.log").read_text()


def test_a_second_up_says_already_up_and_starts_nothing(agent, local_app, machine):
    name, value = header()
    write_spec(machine.dir / "intercept.yaml", agent,
               {"service": "orders", "port": local_app.port, "headers": [f"{name}={value}"]})
    assert machine.run("up", "--detach").returncode == 0
    before = (machine.status(), sorted(machine.running()))

    again = machine.run("up", "--detach")

    assert again.returncode == 0, again.stderr
    assert "intercept: up: intercept.yaml is already up (orders pid " in again.stdout
    assert (machine.status(), sorted(machine.running())) == before
    assert agent.app_of({name: value}) == "local"


def test_status_json_lists_the_intercepts_of_up_alive(agent, local_app, machine):
    name, value = header()
    spec = write_spec(machine.dir / "intercept.yaml", agent,
                      {"service": "orders", "port": local_app.port, "headers": [f"{name}={value}"]})
    log_file = machine.dir / "intercept.log"
    assert machine.run("up", "--detach", "--log-file", str(log_file)).returncode == 0

    result = machine.run("status", "-o", "json")

    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert list(row) == list(STATUS_FIELDS)
    assert row["service"] == "orders" and row["agent"] == agent.ssh
    assert row["route"] == f"requests with {name}: {value}"
    assert row["local_port"] == local_app.port
    assert row["alive"] is True and row["exit_code"] is None
    assert row["pid"] in machine.running()
    assert row["log_file"] == str(log_file) and row["workspace"] == str(spec.resolve())
    assert row["started_at"]
    table = machine.run("status")
    assert table.stdout.splitlines()[0].split() == ["SERVICE", "ROUTE", "PORT", "OUTBOUND", "FILES", "PID", "STATE", "STARTED", "LOG"]
    assert f"orders   requests with {name}: {value}" in table.stdout and "running" in table.stdout


def test_down_stops_the_intercepts_and_the_route_falls_back_and_down_again_exits_zero(agent, local_app, machine):
    name, value = header()
    write_spec(machine.dir / "intercept.yaml", agent,
               {"service": "orders", "port": local_app.port, "headers": [f"{name}={value}"]})
    assert machine.run("up", "--detach").returncode == 0
    assert agent.app_of({name: value}) == "local"

    result = machine.run("down")

    assert result.returncode == 0, result.stderr
    assert "intercept: down: intercept.yaml: stopped 1 intercept (orders)" in result.stdout
    assert agent.app_of({name: value}) == "cluster"
    assert machine.running() == [] and machine.status() == []
    again = machine.run("down")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "intercept: down: nothing is up for intercept.yaml\n"


def test_status_with_nothing_running_says_so(machine):
    assert machine.run("status").stdout == "intercept: status: no intercept is running on this machine\n"
    assert json.loads(machine.run("status", "-o", "json").stdout) == []


def test_an_edited_file_is_brought_up_again_with_its_new_route(agent, local_app, machine):
    name, old = header()
    _, new = header()
    spec = machine.dir / "intercept.yaml"
    write_spec(spec, agent, {"service": "orders", "port": local_app.port, "headers": [f"{name}={old}"]})
    assert machine.run("up", "--detach").returncode == 0
    (first,) = machine.status()

    write_spec(spec, agent, {"service": "orders", "port": local_app.port, "headers": [f"{name}={new}"]})
    result = machine.run("up", "--detach")

    assert result.returncode == 0, result.stderr
    assert "intercept: up: intercept.yaml: its intercepts changed since it was brought up; restarting its intercepts" in result.stdout
    (second,) = machine.status()
    assert second["pid"] != first["pid"] and first["pid"] not in machine.running()
    assert agent.app_of({name: new}) == "local"
    assert agent.app_of({name: old}) == "cluster"


def test_up_detach_gives_up_after_its_timeout_and_leaves_nothing_running(agent, machine):
    # an "agent" that accepts connections and never says a word: the intercept waits on it
    with socket.create_server(("127.0.0.1", 0)) as silent:
        spec = machine.dir / "intercept.yaml"
        data = {"version": 1, "intercepts": [{"service": "orders", "agent": f"127.0.0.1:{silent.getsockname()[1]}",
                                              "credentials": str(agent.credentials), "port": 1}]}
        spec.write_text(yaml.safe_dump(data, sort_keys=False))
        log_file = machine.dir / "up.log"
        result = machine.run("up", "--detach", "--timeout", "1", "--log-file", str(log_file))
    assert result.returncode == 1
    assert result.stderr == (f"intercept: error: the intercepts of intercept.yaml were not ready within 1s (--timeout); "
                             f"they were stopped; their output is in {log_file}\n")
    assert machine.running() == []
    assert machine.status() == []


def test_a_bad_spec_file_exits_2_with_the_file_and_line_and_starts_nothing(agent, machine):
    (machine.dir / "intercept.yaml").write_text(
        f"version: 1\nintercepts:\n  - service: orders\n    agent: {agent.ssh}\n    heders: [x-dev=a]\n")

    result = machine.run("up", "--detach")

    assert result.returncode == 2
    assert result.stderr == ("intercept: error: intercept.yaml:5: unknown key 'heders' in intercepts[0]; "
                             "did you mean 'headers'?\n")
    assert machine.running() == []


def test_a_missing_spec_file_exits_2_and_says_how_to_fix_it(machine):
    result = machine.run("up", "-f", "nowhere.yaml", "--detach")
    assert result.returncode == 2
    assert result.stderr.startswith("intercept: error: nowhere.yaml: no such file; ")


def test_an_unreachable_agent_fails_up_with_its_error_and_leaves_nothing_running(agent, local_app, machine):
    name, value = header()
    sock, address = unreachable_address()
    with sock:
        write_spec(machine.dir / "intercept.yaml", agent,
                   {"service": "orders", "port": local_app.port, "headers": [f"{name}={value}"]},
                   {"service": "cart", "agent": address, "port": local_app.port + 1, "headers": [f"{name}={value}"]})

        result = machine.run("up", "--detach", "--log-file", str(machine.dir / "intercept.log"))

    assert result.returncode == 3, (result.stdout, result.stderr)
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"intercept: error: cart: agent {address} is unreachable")
    assert machine.running() == [] and machine.status() == []
    assert agent.app_of({name: value}) == "cluster"
    assert line in (machine.dir / "intercept.log").read_text()


def test_up_in_the_foreground_relays_the_lines_and_sigterm_stops_everything(agent, local_app, machine):
    name, value = header()
    write_spec(machine.dir / "intercept.yaml", agent,
               {"service": "orders", "port": local_app.port, "headers": [f"{name}={value}"]})
    log_file = machine.dir / "intercept.log"
    up = machine.proc("up", "--log-file", str(log_file))
    try:
        up.wait_for(r"^intercept: up: intercept.yaml: orders \(pid \d+\) ready")
        assert "[orders] intercept: ready: " in up.output
        assert agent.app_of({name: value}) == "local"
        assert machine.run("up", "--detach").stdout.startswith("intercept: up: intercept.yaml is already up")

        up.signal(signal.SIGTERM)
        assert up.finish() == 0
    finally:
        up.stop()
    assert "intercept: down: intercept.yaml: stopped 1 intercept" in up.output
    assert agent.app_of({name: value}) == "cluster"
    assert machine.running() == [] and machine.status() == []
    assert "[orders] intercept: ready: " in log_file.read_text()


def test_down_stops_a_foreground_up(agent, local_app, machine):
    name, value = header()
    write_spec(machine.dir / "intercept.yaml", agent,
               {"service": "orders", "port": local_app.port, "headers": [f"{name}={value}"]})
    up = machine.proc("up")
    try:
        up.wait_for(r"^intercept: up: ")
        assert machine.run("down").returncode == 0
        assert up.finish() == 0
    finally:
        up.stop()
    assert agent.app_of({name: value}) == "cluster"
    assert machine.running() == []


# --- leave --------------------------------------------------------------------------------


def test_leave_stops_an_intercept_started_by_hand_and_its_route_falls_back(agent, local_app, machine):
    name, value = header()
    start = machine.proc("start", "orders", "--agent", agent.ssh, "--credentials", str(agent.credentials),
                         "--port", str(local_app.port), "--header", f"{name}={value}")
    registration = None
    try:
        start.wait_for(r"^intercept: ready: ")
        if not any(e.pid == start.p.pid for e in entries(machine.env)):
            # Until `intercept start` registers itself: what it will record.
            registration = register({"pid": start.p.pid, "service": "orders", "agent": agent.ssh,
                                     "route": f"requests with {name}: {value}", "local_port": local_app.port},
                                    machine.env)
        assert [row["pid"] for row in machine.status()] == [start.p.pid]

        result = machine.run("leave", "orders")

        assert result.returncode == 0, result.stderr
        assert result.stdout == (f"intercept: left: orders (pid {start.p.pid}): "
                                 f"requests with {name}: {value} go to the cluster again\n")
        assert start.finish() == 0
        assert "intercept: left: " in start.output
        assert agent.app_of({name: value}) == "cluster"
        assert entries(machine.env) == []
    finally:
        start.stop()
        if registration is not None:
            registration.remove()


def test_leave_stops_an_intercept_of_up_and_up_brings_it_back(agent, local_app, machine):
    name, value = header()
    write_spec(machine.dir / "intercept.yaml", agent,
               {"service": "orders", "port": local_app.port, "headers": [f"{name}={value}"]})
    assert machine.run("up", "--detach").returncode == 0
    (row,) = machine.status()

    left = machine.run("leave", "orders")

    assert left.returncode == 0, left.stderr
    assert left.stdout.startswith(f"intercept: left: orders (pid {row['pid']})")
    assert agent.app_of({name: value}) == "cluster"
    again = machine.run("up", "--detach")
    assert again.returncode == 0, again.stderr
    assert agent.app_of({name: value}) == "local"


def test_leave_of_a_service_that_is_not_intercepted_fails_naming_it_and_the_fix(machine):
    result = machine.run("leave", "orders", "-n", "shop")
    assert result.returncode == 1
    assert result.stderr == ("intercept: error: no intercept of orders in namespace shop is running on this machine; "
                             "`intercept status` lists them\n")


# --- the registry -------------------------------------------------------------------------


def test_a_registration_is_a_private_file_removed_when_the_intercept_ends(machine):
    with register({"service": "orders", "route": "requests with x-dev: a", "local_port": 8080}, machine.env) as r:
        (entry,) = entries(machine.env)
        assert entry.pid == os.getpid() and entry.service == "orders" and entry.local_port == 8080
        assert stat.S_IMODE(r.file.stat().st_mode) == 0o600
        assert json.loads(r.file.read_text())["route"] == "requests with x-dev: a"
    assert entries(machine.env) == []
    assert list((machine.state / "intercepts").iterdir()) == []


def test_the_registration_of_a_process_that_is_gone_is_dropped(machine):
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        registration = register({"pid": process.pid, "service": "orders"}, machine.env)
        assert [e.pid for e in entries(machine.env)] == [process.pid]
    finally:
        process.stdin.close()
        process.wait()
    assert entries(machine.env) == []
    assert not registration.file.exists()


def test_a_reused_pid_is_not_mistaken_for_the_registered_process(machine):
    registration = register({"service": "orders"}, machine.env)
    record = json.loads(registration.file.read_text())
    record["process_start"] = "1"  # the same pid, but a process that started at another time
    registration.file.write_text(json.dumps(record))
    assert entries(machine.env) == []
    assert status(machine.env) == []


def test_register_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        register({"servcie": "orders"}, {"INTERCEPT_STATE_DIR": "/nonexistent"})


def test_the_state_directory_comes_from_the_environment():
    assert state_dir({"INTERCEPT_STATE_DIR": "/s", "XDG_STATE_HOME": "/x", "HOME": "/h"}) == Path("/s")
    assert state_dir({"XDG_STATE_HOME": "/x", "HOME": "/h"}) == Path("/x/intercept")
    assert state_dir({"HOME": "/h"}) == Path("/h/.local/state/intercept")


# --- vscode -------------------------------------------------------------------------------


def test_vscode_writes_launch_and_tasks_for_the_services_of_intercept_yaml(agent, machine):
    write_spec(machine.dir / "intercept.yaml", agent,
               {"service": "orders", "port": 8080, "command": ["python", "app.py"]},
               {"service": "cart", "port": 8081, "command": ["python", "cart.py"]})

    result = machine.run("vscode")

    assert result.returncode == 0, result.stderr
    assert result.stdout == "intercept: vscode: wrote .vscode/launch.json\nintercept: vscode: wrote .vscode/tasks.json\n"
    launch = json.loads((machine.dir / ".vscode" / "launch.json").read_text())
    tasks = json.loads((machine.dir / ".vscode" / "tasks.json").read_text())
    assert [c["name"] for c in launch["configurations"]] == ["intercept: attach orders", "intercept: attach cart"]
    orders = tasks["tasks"][0]["args"]
    assert orders[:5] == ["start", "orders", "--debug", "--debug-port", "5678"]
    assert orders[orders.index("--agent") + 1] == agent.ssh and orders[-3:] == ["--", "python", "app.py"]
    again = machine.run("vscode")
    assert again.stdout == "intercept: vscode: .vscode/launch.json and .vscode/tasks.json are up to date\n"


def test_vscode_takes_the_services_named_and_the_command_after_the_dashes(machine):
    result = machine.run("vscode", "cart", "--", "python", "cart.py")
    assert result.returncode == 0, result.stderr
    tasks = json.loads((machine.dir / ".vscode" / "tasks.json").read_text())
    assert [t["label"] for t in tasks["tasks"]] == ["intercept: cart"]
    assert tasks["tasks"][0]["args"] == ["start", "cart", "--debug", "--debug-port", "5678", "--", "python", "cart.py"]


def test_vscode_without_a_command_refuses_with_the_fix_and_writes_nothing(agent, machine):
    result = machine.run("vscode", "orders")
    assert result.returncode == 2
    assert result.stderr == (
        "intercept: error: no command to debug for orders: the task runs intercept start --debug, which needs the "
        "command after --, and there is no intercept.yaml; write it: intercept vscode orders -- python app.py\n")
    write_spec(machine.dir / "intercept.yaml", agent, {"service": "orders", "port": 8080},
               {"service": "cart", "port": 8081, "command": ["python", "cart.py"]})
    result = machine.run("vscode")
    assert result.returncode == 2 and "no command to debug for orders" in result.stderr
    assert not (machine.dir / ".vscode").exists()
    result = machine.run("vscode", "cart")  # intercept.yaml gives cart its command (and options)
    assert result.returncode == 0, result.stderr
    args = json.loads((machine.dir / ".vscode" / "tasks.json").read_text())["tasks"][0]["args"]
    assert args[-3:] == ["--", "python", "cart.py"] and "--agent" in args


def test_vscode_without_a_service_or_intercept_yaml_says_how_to_name_one(machine):
    result = machine.run("vscode")
    assert result.returncode == 2
    assert result.stderr == ("intercept: error: name the services to debug, e.g. intercept vscode orders -- python app.py, "
                             "or run it where an intercept.yaml lists them\n")
