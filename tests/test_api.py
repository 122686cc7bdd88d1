"""The Python API that every face calls, used as a script or a test suite would use it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

import intercept
from intercept import api
from intercept.errors import HostKeyMismatch, SpecError
from tests.conftest import INTERCEPT, Proc, echo, free_port, start_agent


@pytest.fixture(scope="module")
def direct(agent):
    """The options of direct mode against the suite's agent."""
    return {"agent": agent.ssh, "credentials": str(agent.credentials)}


def test_intercepting_routes_while_the_block_runs_and_falls_back_after(agent, local_app, direct):
    with intercept.intercepting(headers=["x-dev=api"], port=local_app.port, name="api", **direct) as it:
        assert it.route == "requests with x-dev: api"
        assert agent.app_of({"x-dev": "api"}) == "local"
        assert agent.app_of() == "cluster"
        assert [e.kind for e in it.events][:2] == ["starting", "ready"]
    assert agent.app_of({"x-dev": "api"}) == "cluster"


def test_send_request_enters_like_cluster_traffic_and_is_routed(agent, local_app, direct):
    """The front door works without --allow-outbound: it reaches only the agent itself."""
    with intercept.intercepting(headers=["x-dev=door"], port=local_app.port, **direct):
        routed = intercept.send_request_sync(path="/via-door", headers={"x-dev": "door"}, **direct)
        plain = intercept.send_request_sync(path="/via-door", **direct)
    assert routed.status == 200 and routed.header("X-App") == "local"
    assert plain.header("X-App") == "cluster" and echo(plain.body)["target"] == "/via-door"


def test_send_request_truncates_a_long_body_at_the_limit(agent, direct):
    reply = intercept.send_request_sync(path="/bytes/100000", limit=1000, **direct)
    assert reply.status == 200 and len(reply.body) == 1000 and reply.truncated


APP_COMMAND = (
    "import os, sys, threading\n"
    "sys.path.insert(0, os.environ['REPO'])\n"
    "from tests.apps import App\n"
    "App('cmd', port=int(os.environ['INTERCEPT_SESSION_PORT']))\n"
    "print('serving as', os.environ['INTERCEPT_SESSION_NAME'], flush=True)\n"
    "threading.Event().wait()\n"
)


def test_a_command_is_run_for_the_intercept_and_its_output_is_captured(agent, direct, monkeypatch):
    monkeypatch.setenv("REPO", str(Path(__file__).resolve().parent.parent))

    async def scenario() -> list[str]:
        s = api.make_spec(headers=["x-dev=cmd"], port=free_port(), name="cmd", command=[sys.executable, "-c", APP_COMMAND],
                     no_watch=True, **direct)
        it = await api.start(s, capture_output=True)
        try:
            await it.ready(60)
            reply = await api.send_request(s, "/c", headers={"x-dev": "cmd"})
            assert reply.header("X-App") == "cmd"
        finally:
            assert await it.stop() == 0
        return list(it.output)

    assert asyncio.run(scenario()) == ["serving as cmd"]


def test_another_agents_credentials_are_refused_with_the_typed_error(agent, tmp_path):
    other = start_agent(tmp_path, 1)
    try:
        with pytest.raises(HostKeyMismatch) as e:
            with intercept.intercepting(agent=agent.ssh, credentials=str(other.credentials), headers=["x-dev=x"], port=9):
                pass
        assert e.value.exit_code == 5 and "impersonation" in str(e.value)
    finally:
        other.proc.stop()


def test_options_are_validated_as_flags_are():
    with pytest.raises(SpecError) as e:
        intercept.make_spec("orders", port=70000)
    assert "port" in str(e.value) and e.value.exit_code == 2


def test_start_output_json_is_one_event_per_line(agent, local_app):
    proc = Proc(INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), "--port",
                             str(local_app.port), "--header", "x-dev=json", "--output", "json"])
    try:
        proc.wait_for(r'"kind": "ready"')
        events = [json.loads(line) for line in proc.lines]
        assert [e["kind"] for e in events] == ["starting", "ready"]
        assert events[1]["message"] == f"requests with x-dev: json now reach localhost:{local_app.port}"
    finally:
        proc.stop()


def test_start_output_json_reports_an_error_as_an_event(tmp_path):
    proc = Proc(INTERCEPT + ["start", "--agent", "127.0.0.1:1", "--credentials", str(tmp_path / "missing.json"), "-o", "json"])
    assert proc.finish() == 7
    error = json.loads(proc.lines[0])
    assert error["kind"] == "error" and error["status"] == 7 and "missing.json" in error["message"]
