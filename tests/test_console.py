"""Every command as a user meets it: no warning on stderr from intercept's own imports, and
machine-readable stdout that carries nothing else, whatever a dependency or COMMAND prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from intercept.cli import main
from tests.conftest import INTERCEPT, LINE_TIMEOUT, Proc, free_port

ROOT = Path(__file__).resolve().parent.parent

# `intercept ARGS` with every warning shown once, and any warning attributed to intercept's
# own modules (a deprecated call of ours) raised as an error.
STRICT = [sys.executable, "-c",
          "import sys, warnings\n"
          "warnings.simplefilter('default')\n"
          "warnings.filterwarnings('error', module=r'intercept(\\.|$)')\n"
          "sys.argv[0] = 'intercept'\n"
          "from intercept.cli import main\n"
          "main()\n"]


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in sorted(group.commands.items()):
        found.append((*path, name))
        if isinstance(command, click.Group):
            found += _commands(command, (*path, name))
    return found


@pytest.mark.parametrize("command", _commands(main), ids=" ".join)
def test_every_command_shows_its_help_and_no_warning(command):
    done = subprocess.run([*STRICT, *command, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("Usage: intercept ")


@pytest.mark.parametrize("flags, verdict", [([], "8/8 requests"), (["--grpc"], "10/10 gRPC calls")])
def test_the_demo_loads_the_ssh_stack_and_prints_no_warning(flags, verdict):
    done = subprocess.run([*STRICT, "demo", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout
    assert "Warning" not in done.stdout  # not the DSA one, and no socket left unclosed either
    assert f"intercept: demo: {verdict} landed where they should" in done.stdout


def _noisy_dependencies(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing asyncssh (what every SSH-speaking command does after
    its start) prints a line on stdout, as a careless dependency would, from Python and from C."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.abc, os, sys\n"
        "class Noisy(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'asyncssh':\n"
        "            print('stray line from a dependency', flush=True)\n"
        "            os.write(1, b'stray line written to fd 1\\n')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Noisy())\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def test_start_json_stdout_carries_only_events_whatever_command_and_dependencies_print(agent, tmp_path):
    port = free_port()
    stderr = (tmp_path / "stderr").open("wb")
    command = [sys.executable, "-c", f"print('stray line from COMMAND', flush=True)\n"
                                     f"import http.server\nhttp.server.test(http.server.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')"]
    proc = Proc(INTERCEPT + ["start", "-o", "json", "--agent", agent.ssh, "--credentials", str(agent.credentials),
                             "--port", str(port), "--header", "x-dev=console", "--", *command],
                env=_noisy_dependencies(tmp_path), stderr=stderr)
    try:
        proc.wait_for(r'"kind": "ready"')
        assert agent.request(headers={"x-dev": "console"})[0] == 200  # COMMAND answers (and logs on its stderr)
    finally:
        proc.stop()
        stderr.close()
    events = [json.loads(line) for line in proc.lines if line]
    assert [e["kind"] for e in events][:2] == ["starting", "ready"]
    elsewhere = (tmp_path / "stderr").read_text()
    for stray in ("stray line from a dependency", "stray line written to fd 1", "stray line from COMMAND"):
        assert stray in elsewhere


def test_the_mcp_servers_stdout_carries_only_the_protocol_whatever_a_dependency_prints(agent, tmp_path):
    pytest.importorskip("mcp")
    calls = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "send_request", "arguments": {
            "agent": agent.ssh, "credentials": str(agent.credentials), "path": "/mcp"}}},
    ]
    server = subprocess.Popen(INTERCEPT + ["mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**os.environ, **_noisy_dependencies(tmp_path),
                                                           "INTERCEPT_STATE_DIR": str(tmp_path / "state")})
    try:
        replies = []
        for call in calls:
            server.stdin.write(json.dumps(call).encode() + b"\n")
            server.stdin.flush()
            if "id" in call:
                replies.append(json.loads(server.stdout.readline()))  # a stray line here fails the parse
        rest, errors = server.communicate(timeout=LINE_TIMEOUT)  # closes its stdin: the server ends
    finally:
        if server.poll() is None:
            server.kill()
    assert [r["id"] for r in replies] == [1, 2]
    assert not replies[1]["result"].get("isError"), replies[1]
    assert json.loads(replies[1]["result"]["content"][0]["text"])["status"] == 200
    assert all(json.loads(line) for line in rest.splitlines())
    assert b"stray line from a dependency" in errors and b"stray line written to fd 1" in errors
