"""Fixtures: real agent and client processes, real apps, real sockets.

Processes are synchronized on the stable lines they print (``intercept: agent: ...``,
``intercept: ready: ...``), never on sleeps.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apps import App

LINE_TIMEOUT = 30.0

# .ci/run sets it: there every system tool is installed, so a skipped test (but the kind
# suite's, which needs Docker) fails the run, naming what it missed, instead of passing quietly.
NO_SKIP = os.environ.get("INTERCEPT_TESTS_NO_SKIP") == "1"
MAY_SKIP = ("e2e/test_e2e.py",)


def _skipped(reporter: pytest.TerminalReporter) -> list[pytest.TestReport]:
    return [r for r in reporter.stats.get("skipped", []) if not r.nodeid.startswith(MAY_SKIP)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if NO_SKIP and reporter is not None and session.exitstatus == 0 and _skipped(reporter):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for report in _skipped(terminalreporter) if NO_SKIP else []:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(f"INTERCEPT_TESTS_NO_SKIP: {report.nodeid} skipped ({reason}): a failure here",
                                    red=True)


class Proc:
    """A child process whose merged stdout/stderr is read line by line (``stderr=``: kept apart, there)."""

    def __init__(self, argv: list[str], **kwargs) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update(kwargs.pop("env", {}))
        self.argv = argv
        stderr = kwargs.pop("stderr", subprocess.STDOUT)  # read with stdout, unless the caller keeps it apart
        self.p = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, **kwargs,
        )
        self.lines: list[str] = []
        self._buf = b""
        os.set_blocking(self.p.stdout.fileno(), False)

    def _read(self, timeout: float) -> bool:
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
        sel.close()
        if not ready:
            return False
        chunk = self.p.stdout.read()
        if not chunk:
            return False
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        self.lines += [line.decode(errors="replace") for line in lines]
        return True

    def wait_for(self, pattern: str, timeout: float = LINE_TIMEOUT, start: int = 0) -> re.Match[str]:
        """The first output line (from index ``start``) matching ``pattern``; fails if the process ends first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for i in range(seen, len(self.lines)):
                m = rx.search(self.lines[i])
                if m:
                    return m
            seen = max(seen, len(self.lines))
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n" + "\n".join(self.lines))
            if not self._read(left) and self.p.poll() is not None:
                self._read(0)
                if not any(rx.search(line) for line in self.lines[seen:]):
                    raise AssertionError(f"{self.argv[:4]} exited {self.p.returncode} before printing {pattern!r}:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = LINE_TIMEOUT) -> int:
        code = self.p.wait(timeout)
        while self._read(0):
            pass
        if self._buf:
            self.lines.append(self._buf.decode(errors="replace"))
            self._buf = b""
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        self.p.send_signal(sig)

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.p.stdout.close()


INTERCEPT = [sys.executable, "-m", "intercept"]


def free_port() -> int:
    """A loopback port nothing listens on (free until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    def __init__(self, proc: Proc, credentials: Path) -> None:
        self.proc = proc
        self.credentials = credentials
        m = proc.wait_for(r"intercept: agent: http (\S+):(\d+) ssh (\S+):(\d+)")
        self.http_port = int(m[2])
        self.ssh_port = int(m[4])
        self.ssh = f"127.0.0.1:{self.ssh_port}"

    def request(self, method: str = "GET", path: str = "/", headers: dict | None = None, body: bytes | None = None):
        """One request on a fresh connection: (status, headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def app_of(self, headers: dict | None = None, path: str = "/") -> str:
        status, hdrs, body = self.request(path=path, headers=headers)
        assert status == 200, (status, body)
        return hdrs["X-App"]


def start_agent(tmp_path: Path, upstream_port: int, *extra: str, credentials: Path | None = None, ports=(0, 0), env=None,
                verbose: str = "-v") -> Agent:
    credentials = credentials or tmp_path / f"agent-{time.monotonic_ns()}.json"
    proc = Proc(
        INTERCEPT + [verbose, "agent", "--listen", f"127.0.0.1:{ports[0]}", "--ssh-listen", f"127.0.0.1:{ports[1]}",
                     "--upstream", f"127.0.0.1:{upstream_port}", "--credentials", str(credentials), *extra],
        env=env or {},
    )
    return Agent(proc, credentials)


def start_client(agent: Agent, local_port: int, *args: str, credentials: Path | None = None, wait: bool = True,
                 via: str | None = None) -> Proc:
    """``intercept start`` against ``agent`` (reached at ``via`` instead, when given: a relay)."""
    proc = Proc(
        INTERCEPT + ["start", "--agent", via or agent.ssh, "--credentials", str(credentials or agent.credentials),
                     "--port", str(local_port), *args]
    )
    if wait:
        proc.wait_for(r"^intercept: ready: ")
    return proc


@pytest.fixture(scope="module")
def cluster_app() -> Iterator[App]:
    app = App("cluster")
    yield app
    app.close()


@pytest.fixture
def local_app() -> Iterator[App]:
    app = App("local")
    yield app
    app.close()


@pytest.fixture(scope="module")
def agent(cluster_app: App, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = start_agent(tmp_path_factory.mktemp("agent"), cluster_app.port, "--hold-timeout", "10")
    yield a
    a.proc.stop()


@pytest.fixture
def clients() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.stop()


def echo(body: bytes) -> dict:
    return json.loads(body)


# The real control plane (e2e/cluster): one per session, for every test module that asks.
from tests.realcluster import namespace_of, real_cluster  # noqa: E402,F401


def tool_result(reply) -> object:
    """What an MCP tool call returned (its structured content), asserting it did not fail."""
    assert not reply.is_error, reply.content
    content = reply.structured_content
    if content is None:
        return json.loads(reply.content[0].text)
    return content["result"] if isinstance(content, dict) and set(content) == {"result"} else content
