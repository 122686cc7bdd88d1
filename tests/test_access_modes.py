"""The modes, as real processes: the managed hosts block (root: inside a mount namespace the
test makes, over a copy of the hosts file) and a private hosts file for COMMAND (no root).

The machine's own /etc/hosts is never written: the root-mode driver runs under
``unshare -m`` with a copy bind-mounted over it, and the test checks that copy's bytes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apps import App
from tests.conftest import Agent, Proc, start_agent

TIMEOUT = 15
DRIVER = [sys.executable, "-m", "tests.access_driver"]
ROOT = Path(__file__).resolve().parent.parent

linux_root = pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare (a mount namespace with a copy of the hosts file)")


@pytest.fixture(scope="module")
def redis_like() -> Iterator[App]:
    app = App("redis")  # echoes a connection whose first byte is not a letter
    yield app
    app.close()


@pytest.fixture(scope="module")
def agent(redis_like: App, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    agent = start_agent(tmp_path_factory.mktemp("modes"), redis_like.port, "--allow-outbound")
    agent.proc.wait_for(r"^intercept: agent: http ")
    yield agent
    agent.proc.stop()


def echo(address: str, port: int) -> bytes:
    with socket.create_connection((address, port), timeout=TIMEOUT) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        data = b""
        while len(data) < 14 and (chunk := s.recv(100)):
            data += chunk
        return data


def in_namespace_of(pid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-m", *argv], capture_output=True, text=True, timeout=TIMEOUT)


@linux_root
@pytest.mark.parametrize("ending", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_root_mode_puts_the_names_in_the_hosts_file_and_leaves_it_byte_for_byte(agent, redis_like, tmp_path, ending):
    hosts = tmp_path / "hosts"
    original = b"127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n# no newline at the end"
    hosts.write_bytes(original)
    port = redis_like.port
    driver = Proc(["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *DRIVER, "--agent", agent.ssh,
                   "--credentials", str(agent.credentials), "--mode", "hosts-file", "--service", f"redis={port}",
                   "--later", f"cache={port}"], cwd=ROOT)
    try:
        driver.wait_for(r"^ready$")
        assert "hosts-file" in driver.output and "redis" in driver.output
        seen = in_namespace_of(driver.p.pid, "getent", "hosts", "redis.shop.svc.cluster.local")
        address = seen.stdout.split()[0]
        assert seen.stdout.split()[1:] == ["redis", "redis.shop", "redis.shop.svc", "redis.shop.svc.cluster.local"]
        assert in_namespace_of(driver.p.pid, "getent", "hosts", "redis").stdout.split()[0] == address
        assert echo(address, port) == b"*1\r\n$4\r\nPING\r\n"  # through the agent, to the echo server
        assert hosts.read_bytes().startswith(original + b"\n# >>> intercept ")
        driver.signal(signal.SIGUSR1)  # a Service created while it runs
        driver.wait_for(r"^intercept: access: cache .* is reachable now")
        assert in_namespace_of(driver.p.pid, "getent", "hosts", "cache.shop").returncode == 0
        assert in_namespace_of(driver.p.pid, "getent", "hosts", "localhost").stdout.split()[0] in ("127.0.0.1", "::1")
        os.kill(driver.p.pid, ending)
        code = driver.finish()
        if ending == signal.SIGKILL:  # the guard removes the block once its owner is gone
            guard = subprocess.run(["pgrep", "-f", f"intercept.access.guard --hosts /etc/hosts --owner {driver.p.pid}"],
                                   capture_output=True, text=True)
            for pid in guard.stdout.split():
                _wait_gone(int(pid))
        else:
            assert code == 0, driver.output
        assert hosts.read_bytes() == original
    finally:
        driver.stop()


@linux_root
def test_two_root_mode_sessions_at_once_get_addresses_of_their_own(agent, redis_like, tmp_path):
    port = redis_like.port
    drivers = []
    try:
        for who in ("first", "second"):
            hosts = tmp_path / f"hosts-{who}"
            hosts.write_bytes(b"127.0.0.1 localhost\n")
            drivers.append(Proc(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                 f'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *DRIVER, "--agent", agent.ssh,
                                 "--credentials", str(agent.credentials), "--mode", "hosts-file",
                                 "--service", f"redis={port}"], cwd=ROOT))
        for driver in drivers:
            driver.wait_for(r"^ready$")
        seen = [in_namespace_of(d.p.pid, "getent", "hosts", "redis.shop").stdout.split()[0] for d in drivers]
        assert seen[0] != seen[1], seen  # both listen on redis's port, each on an address of its own
        for address in seen:
            assert echo(address, port) == b"*1\r\n$4\r\nPING\r\n"
        assert not any("is not reachable" in d.output for d in drivers), [d.output for d in drivers]
    finally:
        for driver in drivers:
            driver.stop()


def _wait_gone(pid: int) -> None:
    """Until process ``pid`` (not our child) has exited: pidfd_open, then poll its readability."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        import select

        select.select([fd], [], [], TIMEOUT)
    finally:
        os.close(fd)


@linux_root
def test_namespace_mode_gives_the_names_to_command_alone(agent, redis_like):
    port = redis_like.port
    machine = Path("/etc/hosts").read_bytes()
    script = ("import socket; a = socket.gethostbyname('redis'); s = socket.create_connection((a, %d), timeout=10); "
              "s.sendall(b'\\x01ping'); print('got', s.recv(10), socket.gethostbyname('redis.shop.svc.cluster.local') == a, "
              "socket.gethostbyname('localhost'))" % port)
    driver = Proc([*DRIVER, "--agent", agent.ssh, "--credentials", str(agent.credentials), "--mode", "namespace",
                   "--service", f"redis={port}", "--", sys.executable, "-c", script], cwd=ROOT)
    try:
        assert driver.finish(60) == 0, driver.output
        assert "got b'\\x01ping' True 127.0.0.1" in driver.output
        assert Path("/etc/hosts").read_bytes() == machine
        with pytest.raises(socket.gaierror):
            socket.gethostbyname("redis.shop.svc.cluster.local")  # this process never sees the name
    finally:
        driver.stop()


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to become an unprivileged user (setpriv)")
def test_an_unprivileged_user_gets_a_hosts_file_of_its_own():
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="intercept-test-"))  # under /tmp: the user can reach it
    directory.chmod(0o755)
    private = directory / "hosts"
    private.write_bytes(b"127.0.0.1 localhost\n127.77.9.9 only-here only-here.shop\n")
    private.chmod(0o644)
    code = ("import subprocess, sys, pathlib; from intercept.access.isolate import private_hosts, available; "
            "assert available() is None, available(); "
            f"r = subprocess.run(['getent', 'hosts', 'only-here.shop'], preexec_fn=private_hosts(pathlib.Path('{private}')), "
            "capture_output=True, text=True); print('uid', __import__('os').getuid(), r.stdout.split())")
    result = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "uid 65534 ['127.77.9.9', 'only-here', 'only-here.shop']"
    assert b"only-here" not in Path("/etc/hosts").read_bytes()
    shutil.rmtree(directory)
