"""intercept mcp, driven by the MCP SDK's own client over stdio, as a coding agent drives it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

from tests.conftest import free_port, tool_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"list_services", "start_intercept", "stop_intercept", "status", "pod_env", "send_request", "process_output", "doctor",
         "connect"}
# the developer's process: a test app named "mcp-dev" on the intercept's port, saying so on stdout
COMMAND = [
    sys.executable, "-c",
    "import os, sys, threading\n"
    "sys.path.insert(0, os.environ['REPO'])\n"
    "from tests.apps import App\n"
    "App('mcp-dev', port=int(os.environ['INTERCEPT_SESSION_PORT']))\n"
    "print('mcp-dev listening', flush=True)\n"
    "threading.Event().wait()\n",
]


def server(tmp_path: Path) -> StdioServerParameters:
    env = {**os.environ, "REPO": str(ROOT), "INTERCEPT_STATE_DIR": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"}
    return StdioServerParameters(command=sys.executable, args=["-m", "intercept", "mcp"], env=env, cwd=str(ROOT))


def test_an_agent_starts_an_intercept_sees_who_answers_and_stops_it(agent, tmp_path):
    direct = {"agent": agent.ssh, "credentials": str(agent.credentials)}

    async def session() -> None:
        async with Client(server(tmp_path)) as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            assert TOOLS <= tools

            started = tool_result(await client.call_tool("start_intercept", {
                **direct, "port": free_port(), "headers": ["x-dev=mcp"], "command": COMMAND}))
            assert started["route"] == "requests with x-dev: mcp" and started["state"] == "running"

            routed = tool_result(await client.call_tool("send_request", {**direct, "path": "/x", "headers": {"x-dev": "mcp"}}))
            plain = tool_result(await client.call_tool("send_request", {**direct, "path": "/x"}))
            assert routed["status"] == 200 and ["X-App", "mcp-dev"] in routed["headers"]
            assert ["X-App", "cluster"] in plain["headers"] and json.loads(plain["body"])["target"] == "/x"

            output = tool_result(await client.call_tool("process_output", {"id": started["id"]}))
            assert "mcp-dev listening" in output

            status = tool_result(await client.call_tool("status", {}))
            assert [i["id"] for i in status["started_here"]] == [started["id"]]

            stopped = tool_result(await client.call_tool("stop_intercept", {"id": started["id"]}))
            assert stopped["exit_status"] == 0
            after = tool_result(await client.call_tool("send_request", {**direct, "path": "/x", "headers": {"x-dev": "mcp"}}))
            assert ["X-App", "cluster"] in after["headers"]

    asyncio.run(session())


def test_errors_come_back_as_tool_errors_with_the_clis_reason(agent, tmp_path):
    async def session() -> None:
        async with Client(server(tmp_path)) as client:
            missing = await client.call_tool("start_intercept", {"agent": agent.ssh, "credentials": str(tmp_path / "nope.json")})
            assert missing.is_error and "nope.json" in missing.content[0].text
            unknown = await client.call_tool("stop_intercept", {"id": "i9"})
            assert unknown.is_error and "no intercept 'i9'" in unknown.content[0].text
            direct = {"agent": agent.ssh, "credentials": str(agent.credentials)}
            bad = await client.call_tool("send_request", {**direct, "path": "x"})
            assert bad.is_error and "must start with /" in bad.content[0].text
            # what http.client or h11 would refuse is refused first, naming the part and the fix
            for arguments, reason in [
                ({"headers": {"x dev": "mcp"}}, "header name 'x dev' is not a valid HTTP field name; "),
                ({"headers": {"x-dev": "a\r\nb"}}, "header x-dev: value 'a\\r\\nb' is not a valid HTTP field value; "),
                ({"headers": {"x-dev": "café"}}, "header x-dev: value 'café' is not a valid HTTP field value; "),
                ({"headers": {"Content-Length": "5"}}, "header Content-Length: send_request frames the body itself; "),
                ({"method": "GE T"}, "method 'GE T' is not an HTTP method; "),
                ({"path": "/a b"}, "path '/a b' is not a valid request target; "),
                ({"limit": -1}, "limit -1: "),
            ]:
                refused = await client.call_tool("send_request", {**direct, **arguments})
                assert refused.is_error and reason in refused.content[0].text, (arguments, refused.content[0].text)
            hosted = tool_result(await client.call_tool("send_request", {**direct, "headers": {"Host": "orders.test"}}))
            assert json.loads(hosted["body"])["headers"].count(["Host", "orders.test"]) == 1
            nul = await client.call_tool("start_intercept", {**direct, "port": free_port(), "command": ["app\x00"]})
            assert nul.is_error and "cannot run 'app\\x00': embedded null byte" in nul.content[0].text, nul.content[0].text
            # port goes through the option table: [SERVICE_PORT:]LOCAL_PORT, a list for several
            named = await client.call_tool("start_intercept", {**direct, "port": ["8080:3000", "grpc:5000"]})
            assert named.is_error and "port grpc:5000: in direct mode (--agent) there is no Service to name the port " \
                                      "'grpc'" in named.content[0].text, named.content[0].text

    asyncio.run(session())


def test_an_intercept_started_here_is_in_this_machines_registry_and_a_terminal_can_leave_it(agent, tmp_path):
    """What a coding agent started shows in intercept status, and intercept leave stops it
    (asking the MCP server, which keeps running); INTERCEPT_* variables are read as by the CLI."""
    import subprocess

    state = {"INTERCEPT_STATE_DIR": str(tmp_path / "state")}
    params = server(tmp_path)
    params.env = {**params.env, "INTERCEPT_NAME": "from-env"}  # no name given to the tool: this one

    def terminal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "intercept", *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **state})

    async def session() -> None:
        direct = {"agent": agent.ssh, "credentials": str(agent.credentials)}
        async with Client(params) as client:
            started = tool_result(await client.call_tool("start_intercept", {**direct, "port": free_port(),
                                                                             "command": COMMAND}))
            assert started["route"] == "requests with x-intercept-id: from-env"
            listed = await asyncio.to_thread(terminal, "status", "-o", "json")
            (row,) = json.loads(listed.stdout)
            assert (row["agent"], row["route"], row["id"], row["alive"]) == (
                agent.ssh, "requests with x-intercept-id: from-env", started["id"], True)
            left = await asyncio.to_thread(terminal, "leave", agent.ssh)
            assert left.returncode == 0, left.stdout + left.stderr
            assert left.stdout.startswith(f"intercept: left: agent {agent.ssh}")
            routed = tool_result(await client.call_tool("send_request", {**direct, "headers": {"x-intercept-id": "from-env"}}))
            assert ["X-App", "cluster"] in routed["headers"]  # the route went with it
            status = tool_result(await client.call_tool("status", {}))
            assert status["started_here"] == [] and status["this_machine"] == []

    asyncio.run(session())


def test_an_agent_mirrors_requests_while_the_app_answers_and_sees_the_counts(agent, local_app, tmp_path):
    import time

    direct = {"agent": agent.ssh, "credentials": str(agent.credentials)}

    async def session() -> None:
        async with Client(server(tmp_path)) as client:
            started = tool_result(await client.call_tool("start_intercept", {
                **direct, "port": local_app.port, "headers": ["x-dev=mcp-mirror"], "mirror": True}))
            assert started["route"] == "copies of requests with x-dev: mcp-mirror"
            answered = tool_result(await client.call_tool("send_request", {
                **direct, "path": "/copied", "headers": {"x-dev": "mcp-mirror"}}))
            assert ["X-App", "cluster"] in answered["headers"]
            assert await asyncio.to_thread(local_app.wait_requests, 1) and local_app.requests[0]["target"] == "/copied"
            deadline = time.monotonic() + 30
            while True:  # the counts come with the intercept's next look at its agents
                [mine] = tool_result(await client.call_tool("status", {}))["started_here"]
                if mine["mirrored"]["copied"] == 1 or time.monotonic() > deadline:
                    break
            assert mine["mirrored"] == {"copied": 1, "dropped": 0}
            await client.call_tool("stop_intercept", {"id": started["id"]})

    asyncio.run(session())
