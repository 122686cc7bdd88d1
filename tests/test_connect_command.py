"""``api.connect`` runs COMMAND once: never after a stop that came during the setup, its
``timeout`` counted from its start, and never outliving a cancelled call (issue 25).

Real commands run; what is not under test is replaced: the cluster, the agent session
and the cluster names (their own tests are ``test_connect_agent*.py``, ``test_access_*.py``).
Whether COMMAND started at all is told by its setup step, which runs in the child between
fork and exec (as the namespace mode's does): deterministic, where anything the command
itself wrote would race with its being stopped.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from intercept import api
from intercept.spec import InterceptSpec

WAITS = [sys.executable, "-c", "import os, sys; print(os.getpid(), flush=True); sys.stdin.read(); os.pause()"]


@pytest.fixture
def connect(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``api.connect`` as through an agent of the namespace; ``started`` exists once COMMAND has started."""
    started = tmp_path / "started"
    state = SimpleNamespace(rows=[{"service": "orders", "agent": True}], outbound=True)

    class Session:
        def __init__(self, options) -> None:
            self.agent = SimpleNamespace(outbound=state.outbound, resolver="")
            self.conn = None

        async def open_unrouted(self) -> None:
            pass

        def check_outbound(self, host, port):
            return None

        async def close(self) -> None:
            pass

    class Access:
        def setup(self) -> None:  # in the child, before exec
            started.write_text("started")

        async def close(self) -> None:
            pass

    async def open_access(*args, **kwargs):
        return Access()

    async def service_agents(*args, **kwargs):
        return SimpleNamespace(transport=None, credentials=None)

    monkeypatch.setattr("intercept.kube.config.connect", lambda *a: SimpleNamespace(api=None, namespace="shop"))
    async def own_agent(*args, **kwargs):  # intercept connect's own agent (where no Service has one)
        return SimpleNamespace(workload="Deployment/intercept-connect", workload_name="intercept-connect", credentials=None)

    monkeypatch.setattr("intercept.kube.apply.list_services", lambda *a, **k: state.rows)
    monkeypatch.setattr(api, "_connect_agent", own_agent)
    monkeypatch.setattr(api, "_one_pod", lambda *a: None)
    monkeypatch.setattr("intercept.client.session.AgentSession", Session)
    monkeypatch.setattr("intercept.access.reach.open_access", open_access)
    monkeypatch.setattr(api, "_service_agents", service_agents)
    monkeypatch.setattr(api, "_access_plan", lambda *a: object())

    def run(command, **kwargs):
        return api.connect(InterceptSpec(namespace="shop"), command, **kwargs)

    run.started = started
    run.state = state
    return run


def test_a_stop_during_the_setup_never_starts_the_command(connect) -> None:
    stop = asyncio.Event()
    stop.set()  # Ctrl-C, or the caller's deadline, while the agent rolled out

    async def main() -> int:
        return await connect(["true"], stop=stop, output=lambda line: None)

    assert asyncio.run(main()) == 0
    assert not connect.started.exists()


def test_the_timeout_counts_from_the_commands_start(connect) -> None:
    lines: list[str] = []

    async def main() -> tuple[int, bool]:
        stop = asyncio.Event()
        code = await connect(WAITS, stop=stop, timeout=0, output=lines.append)
        return code, stop.is_set()

    assert asyncio.run(main()) == (0, True)  # stopped by its timeout, said by stop
    assert connect.started.exists()  # but it ran: the setup before it took no part of its time


def test_a_command_that_exits_returns_its_status_before_any_timeout(connect) -> None:
    async def main() -> int:
        return await connect([sys.executable, "-c", "raise SystemExit(3)"], timeout=3600, output=lambda line: None)

    assert asyncio.run(main()) == 3


def test_a_cancelled_connect_stops_its_command_and_leaves_no_task(connect) -> None:
    pids: list[int] = []

    async def main() -> list[asyncio.Task]:
        printed = asyncio.Event()

        def output(line: str) -> None:
            pids.append(int(line))
            printed.set()

        running = asyncio.ensure_future(connect(WAITS, output=output))
        await printed.wait()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()
                and "_read_lines" not in repr(t.get_coro())]

    try:
        left = asyncio.run(main())
        assert left == []  # neither its wait nor the stop's
        with pytest.raises(ProcessLookupError):
            os.kill(pids[0], 0)  # stopped and reaped
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


# --- a connect without a SERVICE reads no intercept.yaml entry (an entry named "any" used to leak in) -----


def _workspace_with_an_entry_named_any(directory: Path) -> None:
    import yaml

    (directory / "intercept.yaml").write_text(yaml.safe_dump({"version": 1, "intercepts": [
        {"service": "any", "access": "off", "outbound_deny": ["db:5432"]}]}))


def test_make_spec_for_connect_needs_no_service_and_reads_no_entry(tmp_path: Path) -> None:
    _workspace_with_an_entry_named_any(tmp_path)
    spec = api.make_spec(env={}, file=tmp_path / "intercept.yaml", intercepting=False, namespace="shop")
    assert spec.service is None and spec.access == "auto" and spec.outbound_deny == ()


def test_cli_connect_without_a_service_reads_no_entry_named_any(tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import INTERCEPT

    _workspace_with_an_entry_named_any(tmp_path)
    (tmp_path / "intercept.yaml").write_text((tmp_path / "intercept.yaml").read_text().replace("off", "bogus"))
    done = subprocess.run([*INTERCEPT, "connect", "-n", "shop", "--kubeconfig", str(tmp_path / "none"), "--", "true"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "intercept.yaml" not in done.stderr and "bogus" not in done.stderr, done.stderr  # the entry of "any" is not read
    assert done.returncode == 11, done.stderr  # it goes on to the cluster, which this kubeconfig does not name


def test_an_own_agent_without_outbound_is_named_with_its_fix(connect) -> None:
    from intercept.errors import UsageError

    connect.state.rows, connect.state.outbound = [], False  # no agent in the namespace: connect's own, and it allows none
    with pytest.raises(UsageError) as refused:
        asyncio.run(connect(["true"], output=lambda line: None))
    message = str(refused.value)
    assert "None" not in message
    assert message.startswith("intercept connect's own agent (Deployment/intercept-connect) (namespace shop) allows no "
                              "outbound connections")
    assert "intercept uninstall intercept-connect -n shop" in message and "intercept inject" not in message
    assert not connect.started.exists()


def test_a_service_agent_without_outbound_says_how_to_inject_it_again(connect) -> None:
    from intercept.errors import UsageError

    connect.state.outbound = False
    with pytest.raises(UsageError, match=r"the agent of orders \(namespace shop\) allows no outbound connections "
                                         r"\(injected with --no-outbound\); .*intercept inject orders -n shop"):
        asyncio.run(connect(["true"], output=lambda line: None))


# --- intercept env: an --access that cannot work here is a note, not a failure --------------------------


def test_env_access_says_why_a_mode_cannot_work_instead_of_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    from intercept.errors import UsageError

    def choose(requested: str):
        raise UsageError("--access hosts-file: /etc/hosts is not writable here; run as root, or use --access namespace")

    monkeypatch.setattr("intercept.access.modes.choose", choose)
    event = api.env_access({"REDIS_SERVICE_HOST": "10.0.0.7"}, InterceptSpec(service="orders", access="hosts-file"))
    assert event is not None and event.kind == "access"
    assert "REDIS_SERVICE_HOST are as in the pod" in event.message
    assert "--access hosts-file would not start here: --access hosts-file: /etc/hosts is not writable" in event.message
