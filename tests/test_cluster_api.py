"""The Python API and the MCP server on the Kubernetes path, against the real control plane.

The same scenario the CLI tests run (tests/test_cluster_start.py): the agent injected
into a Deployment, the route held on every replica through the real port-forward path,
routed requests reaching the developer whichever pod received them, and uninstall putting
everything back. Here driven in-process through intercept.api, then by a coding agent
through intercept mcp.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

import intercept
from tests.conftest import free_port, tool_result
from tests.realcluster import AGENT_IMAGE, SAMPLE, WAIT, RealCluster, app, deploy, intercept as run_cli, served_by, snapshot

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402


def local_command(port: int) -> list[str]:
    return [sys.executable, str(SAMPLE), "serve", "--port", str(port), "--name", "local"]


def test_the_api_intercepts_a_service_on_every_replica_and_sends_requests_through_its_agents(
        real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("api")
    deploy(real_cluster, ns, app("web", 2))
    real_cluster.wait_ready(ns, "web", 2)
    before = snapshot(real_cluster, ns)
    port = free_port()
    where = {"namespace": ns, "kubeconfig": str(real_cluster.kubeconfig), "agent_image": AGENT_IMAGE}
    events: list[str] = []
    with intercept.intercepting("web", headers=["x-dev=api"], port=port, command=local_command(port), no_watch=True,
                                capture_output=True, timeout=WAIT, on_event=lambda e: events.append(e.kind), **where) as it:
        assert it.route == "requests with x-dev: api"
        assert "progress" in events and events[-1] == "ready"
        for endpoint in real_cluster.wait_ready(ns, "web", 2):
            assert served_by(endpoint, {"x-dev": "api"}) == "local"
            assert served_by(endpoint) == f"cluster/{endpoint.pod}"
        routed = intercept.send_request_sync("web", "/", headers={"x-dev": "api"}, **where)
        plain = intercept.send_request_sync("web", "/", **where)
        assert routed.header("X-Served-By") == "local"
        assert plain.header("X-Served-By").startswith("cluster/web-")
        assert intercept.send_request_sync("web", "/", **where).status == 200
    assert run_cli("uninstall", "web", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig)).returncode == 0
    assert snapshot(real_cluster, ns) == before


def test_a_coding_agent_intercepts_a_service_through_intercept_mcp(real_cluster: RealCluster, namespace_of, tmp_path) -> None:
    ns = namespace_of("mcp")
    deploy(real_cluster, ns, app("shop", 1))
    real_cluster.wait_ready(ns, "shop", 1)
    env = {**os.environ, "KUBECONFIG": str(real_cluster.kubeconfig), "INTERCEPT_AGENT_IMAGE": AGENT_IMAGE,
           "INTERCEPT_STATE_DIR": str(tmp_path / "state")}
    server = StdioServerParameters(command=sys.executable, args=["-m", "intercept", "mcp"], env=env)
    port = free_port()

    async def session() -> None:
        async with Client(server, read_timeout_seconds=WAIT) as client:
            services = tool_result(await client.call_tool("list_services", {"namespace": ns}))
            assert [(s["service"], s["interceptable"], s["agent"]) for s in services] == [("shop", True, False)]
            started = tool_result(await client.call_tool("start_intercept", {
                "service": "shop", "namespace": ns, "port": port, "headers": ["x-dev=agent"], "command": local_command(port)}))
            assert started["namespace"] == ns and started["state"] == "running"
            routed = tool_result(await client.call_tool("send_request", {"service": "shop", "namespace": ns, "headers": {"x-dev": "agent"}}))
            plain = tool_result(await client.call_tool("send_request", {"service": "shop", "namespace": ns}))
            assert ["X-Served-By", "local"] in routed["headers"]
            assert any(k == "X-Served-By" and v.startswith("cluster/shop-") for k, v in plain["headers"])
            env_of_pod = tool_result(await client.call_tool("pod_env", {"service": "shop", "namespace": ns}))
            assert env_of_pod["GREETING"] == "hello"

            # One registry for every face: a terminal sees the coding agent's intercept, and leaves it.
            listed = await asyncio.to_thread(run_cli, "status", "-o", "json", env={"INTERCEPT_STATE_DIR": env["INTERCEPT_STATE_DIR"]})
            (row,) = json.loads(listed.stdout)
            assert (row["service"], row["namespace"], row["id"], row["route"]) == (
                "shop", ns, started["id"], "requests with x-dev: agent")
            left = await asyncio.to_thread(run_cli, "leave", "shop", "-n", ns, env={"INTERCEPT_STATE_DIR": env["INTERCEPT_STATE_DIR"]})
            assert left.returncode == 0 and left.stdout.startswith("intercept: left: shop"), left.stdout + left.stderr
            status = tool_result(await client.call_tool("status", {}))
            assert status["started_here"] == [] and status["this_machine"] == []
            after = tool_result(await client.call_tool("send_request", {"service": "shop", "namespace": ns, "headers": {"x-dev": "agent"}}))
            assert any(k == "X-Served-By" and v.startswith("cluster/shop-") for k, v in after["headers"])

    asyncio.run(session())
