"""``--replace`` through the option table: the flag, the variable, the ``intercept.yaml`` key,
the API and the MCP tool all take it, and its mistakes are refused with the fix."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from intercept import api
from intercept.errors import ReplaceRefused, SpecError
from intercept.spec import load_workspace, merge, render_reference
from tests.conftest import INTERCEPT


def test_replace_is_an_option_in_every_spelling(tmp_path: Path):
    assert merge(None, {}, {"service": "orders", "replace": True}).replace is True
    assert merge(None, {"INTERCEPT_REPLACE": "true"}, {"service": "orders"}).replace is True
    (tmp_path / "intercept.yaml").write_text("version: 1\nintercepts:\n"
                                             "  - service: deployment/worker\n    replace: true\n    command: python worker.py\n")
    spec = load_workspace(tmp_path / "intercept.yaml", {}).intercepts[0]
    assert (spec.service, spec.replace, spec.command) == ("deployment/worker", True, ("python", "worker.py"))
    assert api.make_spec("statefulset/kv", replace=True).service == "statefulset/kv"
    assert "| `replace` | `--replace` | `INTERCEPT_REPLACE` |" in render_reference()
    assert "| `replace` | `--replace` | `INTERCEPT_REPLACE` |" in (Path(__file__).parent.parent / "docs/intercept-yaml.md").read_text()


def test_a_workload_without_replace_is_refused_with_the_fix():
    with pytest.raises(SpecError, match=r"deployment/worker names a workload.*add --replace"):
        merge(None, {}, {"service": "deployment/worker"})


@pytest.mark.parametrize("flags, said", [
    ({"headers": ["x-dev=alice"]}, r"--replace takes every request, but --header sets a rule; drop one of them"),
    ({"agent": "127.0.0.1:9922", "credentials": "c.json"}, r"--replace stops the app container.*--agent"),
])
def test_replace_with_what_contradicts_it_is_refused(flags, said):
    with pytest.raises(SpecError, match=said):
        merge(None, {}, {"service": "orders", "replace": True, **flags})


@pytest.mark.parametrize("service", ["daemonset/agent", "deployment/Worker", "deployment/"])
def test_other_workload_names_are_refused(service):
    with pytest.raises(SpecError, match=r"deployment/NAME or statefulset/NAME"):
        merge(None, {}, {"service": service, "replace": True})


def test_start_help_lists_replace_and_a_refusal_is_one_line_with_exit_2():
    shown = subprocess.run([*INTERCEPT, "start", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--replace" in shown and "intercept start deployment/worker --replace -- python worker.py" in shown
    refused = subprocess.run([*INTERCEPT, "start", "deployment/worker", "--", "true"], capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.startswith("intercept: error: deployment/worker names a workload") and refused.stderr.count("\n") == 1


def test_the_refusal_has_its_own_exit_code_documented_in_the_readme():
    assert ReplaceRefused.exit_code == 17
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "| 17 | `intercept start --replace` refused" in readme


def test_the_mcp_start_tool_takes_replace():
    pytest.importorskip("mcp")
    from intercept.mcp_server import build

    async def schema() -> dict:
        tools = await build().list_tools()
        return next(t for t in tools if t.name == "start_intercept").input_schema

    properties = asyncio.run(schema())["properties"]
    assert "replace" in properties


def test_the_stand_in_says_whose_process_replaces_the_app_and_exits_0_on_sigterm():
    import signal

    from tests.conftest import Proc

    stand_in = Proc([*INTERCEPT, "stand-in", "alice"])
    try:
        stand_in.wait_for(r"^intercept: stand-in: the app container is replaced by alice's local process ")
        stand_in.signal(signal.SIGTERM)
        assert stand_in.finish() == 0
    finally:
        stand_in.stop()
