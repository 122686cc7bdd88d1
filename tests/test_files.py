"""The pod's files on the developer's machine: real files through a real agent.

The "pod" is a directory laid out as the kubelet lays out volumes: a ConfigMap-like
directory (``key -> ..data/key``, ``..data -> ..<timestamp>``, swapped atomically on an
update), a Secret-like file (mode 0400), a certificate mounted as a single file (subPath),
and links that lead out of their mount. The agent serves them (``--serve-files``); the
client copies them (``intercept files``, ``--mount-mode copy``) or mounts them live
(sshfs over the same SSH connection).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import resource
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from asyncssh.packet import Byte, String, UInt32, UInt64

from intercept import protocol
from intercept.agent.beneath import KERNEL_RESOLVES, OutsideRoot, follow, open_beneath
from intercept.agent.files import Inside, Quota, ServedFiles, ServedRoot, Virtual, handle_quota, mounts_from_env, unservable
from intercept.client.files import is_mounted, live_unavailable
from intercept.errors import SpecError
from intercept.spec import merge, to_args
from tests.conftest import INTERCEPT, Agent, Proc, free_port, start_agent
from tests.test_outbound import _connect

DEADLINE = 20.0
needs_live = pytest.mark.skipif(live_unavailable() is not None, reason=f"live mode: {live_unavailable()}")


def update_configmap(directory: Path, key: str, text: str) -> None:
    """Write a ConfigMap volume's new contents as the kubelet does: a new timestamped
    directory, then ``..data`` swapped to it with one rename."""
    stamp = directory / f"..{time.monotonic_ns()}"
    stamp.mkdir()
    (stamp / key).write_text(text)
    (directory / "..data_tmp").symlink_to(stamp.name)
    os.rename(directory / "..data_tmp", directory / "..data")


def make_pod(base: Path) -> dict[str, Path]:
    config, secret, certs = base / "etc" / "config", base / "var" / "secret", base / "etc" / "tls"
    for d in (config, secret, certs):
        d.mkdir(parents=True)
    update_configmap(config, "app.yaml", "greeting: hello\n")
    (config / "app.yaml").symlink_to("..data/app.yaml")
    (config / "escape").symlink_to("/etc/hostname")  # leads out of the mount
    (config / "sideways").symlink_to("../../var/secret/token")  # into another mount: out of its own
    (secret / "token").write_text("s3cr3t-token")
    os.chmod(secret / "token", 0o400)
    (certs / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    return {"config": config, "secret": secret, "cert": certs / "tls.crt"}


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pod(tmp_path_factory.mktemp("pod"))


@pytest.fixture(scope="module")
def files_agent(pod, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    agent = start_agent(tmp_path_factory.mktemp("files-agent"), free_port(), "--serve-files", str(pod["config"]),
                        "--serve-files", str(pod["secret"]), "--serve-files", str(pod["cert"]))
    agent.proc.wait_for(r"^intercept: agent: files: ")
    yield agent
    agent.proc.stop()


def until(condition, what: str, timeout: float = DEADLINE):
    """Poll ``condition`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


# --- the served tree, alone ------------------------------------------------------------------


def test_the_served_tree_is_the_roots_at_their_paths_and_nothing_else():
    files = ServedFiles([ServedRoot("/etc/config", "/data/cfg"), ServedRoot("/etc/config/extra/", "/data/x"),
                         ServedRoot("/var/run/secrets/token", "/data/t")])
    assert files.locate("/") == Virtual("/", ("etc", "var"))
    assert files.locate("/etc") == Virtual("/etc", ("config",))
    assert files.locate("/etc/config/app.yaml") == Inside("/etc/config/app.yaml", ServedRoot("/etc/config", "/data/cfg"))
    assert files.locate("/etc/config/app.yaml").relative == "app.yaml"
    assert files.locate("/etc/config/extra/a").root.location == "/data/x"  # the deeper mount owns its paths
    assert files.locate("/etc/config/../../etc/passwd") is None  # normalized first: not served
    assert files.locate("../../../etc/config").relative == ""  # never above /
    assert files.locate("/etc/configx") is None and files.locate("/tmp") is None
    with pytest.raises(ValueError):
        ServedFiles([ServedRoot("relative", "/x")])


def test_only_regular_files_and_directories_are_served():
    assert unservable(stat.S_IFREG | 0o644) is None and unservable(stat.S_IFDIR | 0o755) is None
    assert [unservable(kind | 0o600) for kind in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)] == [
        "a FIFO", "a socket", "a character device", "a block device"]


def test_a_quota_counts_each_session_and_all_of_them():
    quota = Quota("open files and directories", per_session=2, total=3)
    assert quota.take("s1") is None and quota.take("s1") is None
    assert quota.take("s1") == "this session holds 2 open files and directories, the most one session may; close some"
    assert quota.take("s2") is None
    assert quota.take("s3") == ("the agent's 3 open files and directories for its sessions are all in use; "
                                "try again when other sessions close some")
    quota.give("s1")
    assert quota.take("s3") is None and quota.held == 3
    assert handle_quota(1024).total == 256 and handle_quota(1 << 20).total == 1024 and handle_quota(64).total == 128


def test_the_injections_description_of_the_mounts_is_read_with_each_location():
    env = {"INTERCEPT_MOUNTS": json.dumps(["/etc/config", "/var/run/secrets/kubernetes.io/serviceaccount"]),
           "INTERCEPT_MOUNT_0": "/kubelet/volumes/config"}
    assert mounts_from_env(env) == [ServedRoot("/etc/config", "/kubelet/volumes/config"),
                                    ServedRoot("/var/run/secrets/kubernetes.io/serviceaccount",
                                               "/var/run/secrets/kubernetes.io/serviceaccount")]
    assert mounts_from_env({}) == []


def test_injection_names_the_apps_mounts_and_the_token_and_restores_exactly():
    from intercept.kube.inject import InjectOptions, inject, restore
    from tests.test_inject import agent_of, boutique, env_of, find, pod_of

    objects = boutique()
    redis = find(objects, "Deployment", "redis-cart")
    mounts = [m["mountPath"] for c in pod_of(redis)["containers"] for m in c.get("volumeMounts", [])]
    assert mounts, "the shop's redis-cart mounts a volume"
    injected = inject(objects, "redis-cart", InjectOptions(image="intercept.test/agent:1"))
    env = env_of(agent_of(find(injected, "Deployment", "redis-cart")))
    served = json.loads(env["INTERCEPT_MOUNTS"])
    assert served == [*mounts, "/var/run/secrets/kubernetes.io/serviceaccount"]
    assert [env[f"INTERCEPT_MOUNT_{i}"] for i in range(len(served))] == served
    assert restore(injected) == objects
    pod_of(find(objects, "Deployment", "redis-cart"))["automountServiceAccountToken"] = False
    env = env_of(agent_of(find(inject(objects, "redis-cart", InjectOptions(image="intercept.test/agent:1")), "Deployment", "redis-cart")))
    assert json.loads(env["INTERCEPT_MOUNTS"]) == mounts


def test_mount_options_spell_alike_and_are_checked(tmp_path):
    base = {"agent": "h:1", "credentials": "c"}
    assert merge(None, {}, {**base, "mount": "true"}).mount is True
    assert merge(None, {"INTERCEPT_MOUNT": "/tmp/root"}, base).mount == Path("/tmp/root")
    spec = merge(None, {}, {**base, "mount": "true", "mount_mode": "copy"})
    assert to_args(spec) == ["--agent", "h:1", "--credentials", "c", "--mount", "--mount-mode", "copy"]
    with pytest.raises(SpecError, match="expected one of auto, live, copy"):
        merge(None, {}, {**base, "mount": "true", "mount_mode": "sometimes"})
    with pytest.raises(SpecError, match="not asked for; add --mount /tmp/orders-root"):
        merge(None, {}, {**base, "mount_mode": "live"})


# --- the SFTP subsystem, straight -------------------------------------------------------------


def test_the_agent_serves_the_mounts_read_only_and_refuses_every_way_out(files_agent, pod, tmp_path):
    config, secret = str(pod["config"]), str(pod["secret"])
    local = tmp_path / "token"

    async def main():
        conn = await _connect(files_agent)
        out = {}
        try:
            async with conn.start_sftp_client() as sftp:
                out["config"] = sorted(await sftp.listdir(config))
                async with sftp.open(f"{config}/app.yaml", "rb") as f:
                    out["app"] = await f.read()
                async with sftp.open(f"{secret}/token", "rb") as f:
                    out["token"] = await f.read()
                async with sftp.open(str(pod["cert"]), "rb") as f:
                    out["cert"] = await f.read()
                await sftp.get(f"{secret}/token", str(local))  # asyncssh's copy: sparse ranges asked first
                out["got"] = local.read_bytes()
                out["app_is_file"] = (await sftp.lstat(f"{config}/app.yaml")).type == asyncssh.FILEXFER_TYPE_REGULAR
                refusals = {}
                for name, attempt in {
                    "escape": lambda: sftp.open(f"{config}/escape"),
                    "sideways": lambda: sftp.open(f"{config}/sideways"),
                    "dotdot": lambda: sftp.open(f"{config}{'/..' * 20}/etc/hostname"),  # past / whatever tmp's depth
                    "outside": lambda: sftp.open("/etc/hostname"),
                    "readlink": lambda: sftp.readlink(f"{config}/app.yaml"),
                    "write": lambda: sftp.open(f"{secret}/token", "w"),
                    "create": lambda: sftp.open(f"{secret}/new", "w"),
                    "mkdir": lambda: sftp.mkdir(f"{secret}/d"),
                    "remove": lambda: sftp.remove(f"{secret}/token"),
                    "rename": lambda: sftp.rename(f"{secret}/token", f"{secret}/t2"),
                    "chmod": lambda: sftp.chmod(f"{secret}/token", 0o777),
                    "symlink": lambda: sftp.symlink("/etc/hostname", f"{secret}/l"),
                }.items():
                    try:
                        result = await attempt()
                        refusals[name] = f"allowed: {result!r}"
                    except asyncssh.SFTPError as e:
                        refusals[name] = (e.code, e.reason)
                out["refusals"] = refusals
        finally:
            conn.close()
        return out

    out = asyncio.run(main())
    assert out["config"] == [".", "..", "app.yaml", "escape", "sideways"]  # the kubelet's ..data entries are left out
    assert out["app"] == b"greeting: hello\n" and out["app_is_file"]
    assert out["token"] == out["got"] == b"s3cr3t-token" and out["cert"].startswith(b"-----BEGIN")
    r = out["refusals"]
    denied, missing = asyncssh.FX_PERMISSION_DENIED, asyncssh.FX_NO_SUCH_FILE
    assert r["escape"] == (denied, f"{config}/escape is a link that leads out of {config}; refused")
    assert r["sideways"][0] == denied
    assert r["dotdot"] == (missing, "/etc/hostname is not one of the pod's served files")
    assert r["outside"][0] == missing
    assert r["readlink"][0] == denied
    for name in ("write", "create", "mkdir", "remove", "rename", "chmod", "symlink"):
        assert r[name] == (denied, "the pod's files are served read-only"), (name, r[name])
    assert pod["secret"].joinpath("token").read_text() == "s3cr3t-token" and not pod["secret"].joinpath("new").exists()


def test_without_the_token_there_is_no_session_and_no_file(files_agent):
    creds = json.loads(files_agent.credentials.read_text())

    async def main():
        await asyncssh.connect("127.0.0.1", files_agent.ssh_port, username="mallory", password="not-the-token",
                               known_hosts=([asyncssh.import_public_key(creds["host_public_key"])], [], []),
                               client_keys=None, agent_path=None, preferred_auth="password", config=None)

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(main())


def test_an_agent_that_serves_nothing_refuses_the_subsystem(tmp_path):
    agent = start_agent(tmp_path, free_port())
    try:
        async def main():
            conn = await _connect(agent)
            try:
                hello = await _hello(conn)
                with pytest.raises(asyncssh.Error):
                    async with conn.start_sftp_client():
                        pass
                return hello
            finally:
                conn.close()

        assert asyncio.run(main())["files"] == []
    finally:
        agent.proc.stop()


async def _hello(conn) -> dict:
    writer, reader, _ = await conn.open_session(subsystem=protocol.CONTROL_SUBSYSTEM, encoding=None)
    writer.write(protocol.encode(protocol.Hello()))
    return json.loads(await reader.readline())


# --- intercept files ---------------------------------------------------------------------------


def _cli(agent: Agent, *args: str, env: dict | None = None) -> Proc:
    return Proc(INTERCEPT + [args[0], "--agent", agent.ssh, "--credentials", str(agent.credentials), *args[1:]], env=env or {})


def test_files_copies_everything_with_private_modes_and_reports_what_it_refused(files_agent, pod, tmp_path):
    to = tmp_path / "root"
    result = _cli(files_agent, "files", "--to", str(to))
    assert result.finish() == 0, result.output
    config = to / str(pod["config"]).lstrip("/")
    assert (config / "app.yaml").read_text() == "greeting: hello\n"
    token = to / str(pod["secret"]).lstrip("/") / "token"
    assert token.read_text() == "s3cr3t-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(config.stat().st_mode) == 0o700
    assert (to / str(pod["cert"]).lstrip("/")).read_text().startswith("-----BEGIN")
    assert not (config / "escape").exists() and not (config / "sideways").exists() and not (config / "..data").exists()
    assert f"intercept: warning: not copied: {pod['config']}/escape: {pod['config']}/escape is a link that leads out of" in result.output
    assert f"intercept: files: copied 3 files (" in result.output and f"to {to}" in result.output
    assert "s3cr3t" not in result.output


def test_files_copies_one_path_and_refuses_a_full_directory(files_agent, pod, tmp_path):
    to = tmp_path / "one"
    result = _cli(files_agent, "files", str(pod["secret"]), "--to", str(to))
    assert result.finish() == 0, result.output
    assert sorted(p.name for p in to.rglob("*") if p.is_file()) == ["token"]
    again = _cli(files_agent, "files", "--to", str(to))
    assert again.finish() == 2 and "it exists and is not an empty directory" in again.output


# --- intercept start --mount -------------------------------------------------------------------

_SHOW = ("import os, sys, time, pathlib, socket\n"
         "server = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
         "root = os.environ['INTERCEPT_ROOT']\n"
         "app = pathlib.Path(root + sys.argv[2])\n"
         "seen = None\n"
         "def say(line):  # one write(2): the client prints to the same pipe (unbuffered)\n"
         "    sys.stdout.write(line + '\\n'); sys.stdout.flush()\n"
         "say('root ' + root)\n"
         "while True:\n"
         "    try:\n"
         "        text = app.read_text().strip()\n"
         "    except OSError as e:  # a live mount between two connections\n"
         "        text = type(e).__name__\n"
         "    if text != seen:\n"
         "        say('app.yaml: ' + text)\n"
         "        seen = text\n"
         "    time.sleep(0.05)\n")


def _start_mounted(agent: Agent, pod: dict[str, Path], *mount: str, env: dict | None = None) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), "--port", str(port),
                             "--name", f"files{port}", "--no-watch", *mount, "--", sys.executable, "-c", _SHOW, str(port),
                             f"{pod['config']}/app.yaml"], env=env or {})
    return proc, port


def test_mount_copy_gives_the_command_its_root_and_removes_it_on_leave(files_agent, pod, tmp_path):
    state = {"INTERCEPT_STATE_DIR": str(tmp_path / "state")}
    client, _ = _start_mounted(files_agent, pod, "--mount", "--mount-mode", "copy", env=state)
    try:
        m = client.wait_for(r"^intercept: mount: the pod's files are under (\S+), copied once \(--mount-mode copy\) "
                            r"\(3 files, \d+ bytes; refused: ")
        root = Path(m[1])
        assert client.wait_for(r"^root (\S+)$")[1] == str(root)
        client.wait_for(r"^app.yaml: greeting: hello$")
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        client.wait_for(r"^intercept: ready: ")
        status = Proc(INTERCEPT + ["status", "-o", "json"], env=state)
        assert status.finish() == 0, status.output
        assert json.loads(status.output)[0]["files"] == str(root)
    finally:
        client.signal(signal.SIGTERM)
        assert client.finish() == 0, client.output
    assert not root.exists()


def test_auto_mode_without_sshfs_copies_once_and_says_why(files_agent, pod, tmp_path):
    client, _ = _start_mounted(files_agent, pod, "--mount", str(tmp_path / "named"),
                               env={"PATH": str(tmp_path / "empty-bin")})
    try:
        client.wait_for(r"^intercept: mount: the pod's files are under \S+/named, copied once, not live: "
                        r"sshfs is not installed \(Debian/Ubuntu: apt-get install sshfs\)")
        client.wait_for(r"^app.yaml: greeting: hello$")
    finally:
        client.stop()
    assert not (tmp_path / "named").exists()  # made by the intercept: removed with what it held


def test_a_named_directory_must_be_new_or_empty(files_agent, pod, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    client, _ = _start_mounted(files_agent, pod, "--mount", str(tmp_path / "busy"), "--mount-mode", "copy")
    assert client.finish() == 2
    assert "it exists and is not an empty directory" in client.output
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    client, _ = _start_mounted(files_agent, pod, "--mount", str(tmp_path / "empty"), "--mount-mode", "copy")
    try:
        client.wait_for(r"^app.yaml: greeting: hello$")
    finally:
        client.signal(signal.SIGTERM)
        client.finish()
    assert (tmp_path / "empty").is_dir() and list((tmp_path / "empty").iterdir()) == []  # emptied, kept


@needs_live
def test_live_mount_shows_a_configmap_update_in_the_pod(files_agent, pod, tmp_path):
    root = tmp_path / "live"
    client, _ = _start_mounted(files_agent, pod, "--mount", str(root), "--mount-mode", "live")
    try:
        client.wait_for(rf"^intercept: mount: the pod's files are under {root} \(live, sshfs\)$")
        assert is_mounted(root)
        client.wait_for(r"^app.yaml: greeting: hello$")
        update_configmap(pod["config"], "app.yaml", "greeting: updated\n")
        client.wait_for(r"^app.yaml: greeting: updated$", timeout=DEADLINE)
    finally:
        update_configmap(pod["config"], "app.yaml", "greeting: hello\n")
        client.signal(signal.SIGTERM)
        assert client.finish() == 0, client.output
    assert not is_mounted(root) and not root.exists()


@pytest.mark.parametrize("mode", [pytest.param("live", marks=needs_live), "copy"])
def test_a_killed_client_leaves_no_mount_and_no_files(files_agent, pod, tmp_path, mode):
    root = tmp_path / f"killed-{mode}"
    client, _ = _start_mounted(files_agent, pod, "--mount", str(root), "--mount-mode", mode)
    try:
        client.wait_for(r"^app.yaml: greeting: hello$")
        assert root.exists() and is_mounted(root) == (mode == "live")
        os.kill(client.p.pid, signal.SIGKILL)  # the intercept itself; its command follows (parent-death signal)
        client.finish()
        until(lambda: not root.exists() and not is_mounted(root), f"{root} unmounted and removed after kill -9")
    finally:
        client.stop()


@needs_live
def test_a_live_mount_comes_back_when_the_agent_does(pod, tmp_path):
    ports = (free_port(), free_port())
    credentials = tmp_path / "agent.json"
    serve = ("--serve-files", str(pod["config"]))
    agent = start_agent(tmp_path, free_port(), *serve, credentials=credentials, ports=ports)
    root = tmp_path / "again"
    client, _ = _start_mounted(agent, pod, "--mount", str(root), "--mount-mode", "live")
    try:
        client.wait_for(r"^app.yaml: greeting: hello$")
        agent.proc.stop()
        client.wait_for(r"^intercept: warning: the live mount at \S+ ended: its connection to the agent was lost")
        agent = start_agent(tmp_path, free_port(), *serve, credentials=credentials, ports=ports)
        client.wait_for(rf"^intercept: mount: the pod's files are under {root} again \(live, sshfs\)$")
        update_configmap(pod["config"], "app.yaml", "greeting: back\n")
        client.wait_for(r"^app.yaml: greeting: back$")
    finally:
        update_configmap(pod["config"], "app.yaml", "greeting: hello\n")
        client.stop()
        agent.proc.stop()
    until(lambda: not root.exists() and not is_mounted(root), f"{root} unmounted and removed")


# --- what one session may cost the others -------------------------------------------------------
#
# The agent is shared by every developer of the service: a session's file requests must not stop
# the HTTP traffic, take the agent's memory or its file descriptors. The agent here runs with
# 1,024 descriptors (as in many containers), so that exhausting them is quick to try.

FD_LIMIT = 1024
BIG = 1 << 30  # a sparse file: 1 GiB that costs no disk
MiB = 1 << 20


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A served directory with what is not a file: a FIFO, a socket; and a big sparse file."""
    root = tmp_path_factory.mktemp("hostile")
    os.mkfifo(root / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "socket"))
    with open(root / "big", "wb") as f:
        f.truncate(BIG)
    (root / "small").write_text("small\n")
    yield root
    listener.close()


def _cost_agent(state: Path, cluster_app, hostile: Path) -> Iterator[Agent]:
    agent = start_agent(state, cluster_app.port, "--serve-files", str(hostile))
    agent.proc.wait_for(r"^intercept: agent: files: ")
    resource.prlimit(agent.proc.p.pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))  # before any developer
    yield agent
    agent.proc.stop()


@pytest.fixture(scope="module")
def cost_agent(hostile, cluster_app, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    yield from _cost_agent(tmp_path_factory.mktemp("cost-agent"), cluster_app, hostile)


@pytest.fixture
def idle_cost_agent(hostile, cluster_app, tmp_path: Path) -> Iterator[Agent]:
    """A cost agent of its own: no handle of an earlier test's session still being given back
    (the agent gives them back after the session's queued work, not at the client's close)."""
    yield from _cost_agent(tmp_path, cluster_app, hostile)


def peak_rss_reset(pid: int) -> int:
    """The process's resident memory now; its peak (VmHWM) restarts from here."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    return _status_kib(pid, "VmHWM") * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def _served_by_cluster(agent: Agent) -> str:
    """A plain HTTP request through the agent, from a thread: who answered."""
    return await asyncio.to_thread(agent.app_of)


async def _sftp_error(attempt) -> tuple[int, str]:
    try:
        result = await asyncio.wait_for(attempt, DEADLINE)
    except asyncssh.SFTPError as e:
        return e.code, e.reason
    raise AssertionError(f"allowed: {result!r}")


def test_a_fifo_or_a_socket_is_refused_at_once_and_traffic_flows(cost_agent, hostile):
    async def main():
        conn = await _connect(cost_agent)
        try:  # no orderly SFTP exit: an agent stuck in open(2) would never answer it
            sftp = await conn.start_sftp_client()
            listed = {n.filename: n.attrs.type for n in await sftp.readdir(str(hostile))}
            fifo = await _sftp_error(sftp.open(f"{hostile}/fifo"))
            served = await _served_by_cluster(cost_agent)
            sock = await _sftp_error(sftp.open(f"{hostile}/socket"))
            async with sftp.open(f"{hostile}/small", "rb") as f:
                small = await f.read()
            return listed, fifo, sock, served, small
        finally:
            conn.close()

    listed, fifo, sock, served, small = asyncio.run(main())
    assert (listed["fifo"], listed["socket"]) == (asyncssh.FILEXFER_TYPE_FIFO, asyncssh.FILEXFER_TYPE_SOCKET)  # listed
    assert fifo == (asyncssh.FX_PERMISSION_DENIED,
                    f"{hostile}/fifo is a FIFO; only regular files and directories are served")
    assert sock == (asyncssh.FX_PERMISSION_DENIED,
                    f"{hostile}/socket is a socket; only regular files and directories are served")
    assert served == "cluster" and small == b"small\n"


def test_a_4_gib_read_is_answered_short_and_the_agent_stays_small(cost_agent, hostile):
    pid = cost_agent.proc.p.pid

    async def main():
        conn = await _connect(cost_agent)
        try:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open(f"{hostile}/big", "rb", block_size=0) as f:  # one READ request, as asked
                    before = peak_rss_reset(pid)
                    data = await f.read(0xFFFFFFFF, 0)
                    peak = peak_rss(pid)
                    tail = await f.read(0xFFFFFFFF, BIG - 10)
            return before, peak, data, tail, await _served_by_cluster(cost_agent)
        finally:
            conn.close()

    before, peak, data, tail, served = asyncio.run(main())
    assert len(data) == 256 * 1024 and data.count(0) == len(data)  # a short read, as SFTP allows
    assert tail == bytes(10)
    assert peak - before < 64 * MiB, f"the agent's memory grew by {(peak - before) // MiB} MiB"  # unbounded: > 1 GiB
    assert served == "cluster"


def test_answers_a_client_does_not_read_are_not_piled_up_in_the_agent(cost_agent, hostile):
    """A client that sends READ after READ and never reads the answers: the agent stops
    answering it when its channel's buffer is full, instead of holding every answer."""
    pid = cost_agent.proc.p.pid
    reads = 2000  # 500 MiB of answers

    async def main():
        conn = await _connect(cost_agent)
        try:
            writer, reader, _ = await conn.open_session(subsystem=protocol.FILES_SUBSYSTEM, encoding=None)
            sftp = RawSFTP(writer, reader)
            await sftp.init()
            handle = await sftp.open(f"{hostile}/big")
            before = peak_rss_reset(pid)
            for i in range(reads):
                sftp.send(5, String(handle) + UInt64(0) + UInt32(256 * 1024))  # SSH_FXP_READ
            served = await _served_by_cluster(cost_agent)  # the agent's loop went past the requests
            peak = peak_rss(pid)
            writer.close()
            return before, peak, served
        finally:
            conn.close()

    before, peak, served = asyncio.run(main())
    assert served == "cluster"
    assert peak - before < 64 * MiB, f"the agent's memory grew by {(peak - before) // MiB} MiB"


def test_handles_and_channels_are_capped_per_session_and_in_all(idle_cost_agent, hostile):
    cost_agent = idle_cost_agent
    per_session, in_all, per_session_channels = 128, FD_LIMIT // 4, 8

    async def open_until_refused(sftp) -> tuple[list, tuple[int, str]]:
        files = []
        for _ in range(FD_LIMIT * 2):
            try:
                files.append(await sftp.open(f"{hostile}/small"))
            except asyncssh.SFTPError as e:
                return files, (e.code, e.reason)
        raise AssertionError(f"{len(files)} files open, none refused")

    async def main():
        conns = [await _connect(cost_agent) for _ in range(3)]
        try:
            a, b, c = [await conn.start_sftp_client() for conn in conns]
            held_a, refused_a = await open_until_refused(a)
            held_b, refused_b = await open_until_refused(b)
            refused_c = await _sftp_error(c.open(f"{hostile}/small"))
            served = await _served_by_cluster(cost_agent)
            late = await _connect(cost_agent)  # a new developer still logs in
            late.close()
            await held_a.pop().close()
            async with c.open(f"{hostile}/small", "rb") as f:  # a handle given back is anyone's again
                read = await f.read()
            channels = [await conns[0].start_sftp_client() for _ in range(per_session_channels - 1)]
            with pytest.raises(asyncssh.ChannelOpenError) as too_many:
                await conns[0].start_sftp_client()
            closed = channels.pop()
            closed.exit()
            await closed.wait_closed()
            await conns[0].start_sftp_client()  # a channel closed is one more for its session
            return len(held_a) + 1, refused_a, len(held_b), refused_b, refused_c, served, read, too_many.value
        finally:
            for conn in conns:
                conn.close()

    count_a, refused_a, count_b, refused_b, refused_c, served, read, too_many = asyncio.run(main())
    assert (count_a, count_b) == (per_session, in_all - per_session)
    assert refused_a == (asyncssh.FX_FAILURE, f"{hostile}/small: this session holds {per_session} open files and "
                                              f"directories, the most one session may; close some")
    assert refused_b[0] == refused_c[0] == asyncssh.FX_FAILURE
    assert refused_c[1] == (f"{hostile}/small: the agent's {in_all} open files and directories for its sessions are "
                            "all in use; try again when other sessions close some")
    assert served == "cluster" and read == b"small\n"


class RawSFTP:
    """SFTP version 3 spoken by hand on a channel: requests sent without waiting for answers."""

    def __init__(self, writer, reader) -> None:
        self.writer, self.reader, self.ids = writer, reader, itertools.count()

    def send(self, kind: int, body: bytes) -> None:
        payload = Byte(kind) + UInt32(next(self.ids)) + body
        self.writer.write(UInt32(len(payload)) + payload)

    async def answer(self) -> tuple[int, bytes]:
        length = int.from_bytes(await self.reader.readexactly(4), "big")
        payload = await self.reader.readexactly(length)
        return payload[0], payload[5:]

    async def init(self) -> None:
        self.writer.write(UInt32(5) + Byte(1) + UInt32(3))  # SSH_FXP_INIT, version 3
        length = int.from_bytes(await self.reader.readexactly(4), "big")
        await self.reader.readexactly(length)

    async def open(self, path: str) -> bytes:
        self.send(3, String(path) + UInt32(asyncssh.FXF_READ) + UInt32(0))  # SSH_FXP_OPEN
        kind, body = await self.answer()
        assert kind == 102, body  # SSH_FXP_HANDLE
        return body[4:4 + int.from_bytes(body[:4], "big")]

# --- a served directory that its app changes under the agent ------------------------------------


class Swapper(threading.Thread):
    """Flips ``root/d`` between a directory and a symlink out of the root (``../outside``, or its
    absolute path), as fast as it can, until stopped: a writer inside an app-writable mount."""

    def __init__(self, root: Path, outside: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        (root / "aside").mkdir()
        (root / "aside" / "f").write_text("inside")
        os.symlink("../outside", root / "link-relative")
        os.symlink(outside, root / "link-absolute")
        self.stop = threading.Event()
        self.swapped = threading.Event()

    def run(self) -> None:
        d, aside = self.root / "d", self.root / "aside"
        links = itertools.cycle([self.root / "link-relative", self.root / "link-absolute"])
        while not self.stop.is_set():
            link = next(links)
            os.rename(aside, d)  # d is the directory
            os.rename(d, aside)
            os.rename(link, d)  # d leads out
            os.rename(d, link)
            self.swapped.set()


def test_a_directory_swapped_for_a_link_never_lets_a_read_out(cluster_app, tmp_path):
    root, outside = tmp_path / "shared", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "f").write_text("OUTSIDE")
    swapper = Swapper(root, outside)
    # not verbose (-v): a log line for each of a thousand refusals would fill the pipe that no one reads meanwhile
    agent = Agent(Proc(INTERCEPT + ["agent", "--listen", "127.0.0.1:0", "--ssh-listen", "127.0.0.1:0", "--upstream",
                                    f"127.0.0.1:{cluster_app.port}", "--credentials", str(tmp_path / "agent.json"),
                                    "--serve-files", str(root)]), tmp_path / "agent.json")
    tries = 3000

    async def main():
        conn = await _connect(agent)
        seen: collections.Counter[str] = collections.Counter()
        try:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open(f"{root}/aside/f", "rb") as f:  # before the swapping: read, plainly
                    seen[(await f.read()).decode()] += 1
                swapper.start()
                await asyncio.to_thread(swapper.swapped.wait)
                for _ in range(tries):
                    try:
                        async with sftp.open(f"{root}/d/f", "rb") as f:
                            seen[(await f.read()).decode()] += 1
                    except asyncssh.SFTPError as e:
                        seen[e.reason.replace(str(root), "ROOT")] += 1
        finally:
            conn.close()
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        swapper.stop.set()
        if swapper.ident is not None:
            swapper.join()
        agent.proc.stop()
    assert seen["inside"] and "OUTSIDE" not in seen, seen
    assert set(seen) <= {"inside", "ROOT/d/f: no such file", "ROOT/d/f is a link that leads out of ROOT; refused"}, seen


@pytest.fixture(params=[pytest.param(True, id="openat2"), pytest.param(False, id="walk")])
def kernel(request) -> bool:
    """Both ways to open beneath a root: the kernel's openat2, and the walk used without it."""
    if request.param and not KERNEL_RESOLVES:
        pytest.skip("this kernel has no openat2 (Linux 5.6)")
    return request.param


def test_links_inside_a_root_are_followed_and_every_way_out_refused(tmp_path, kernel):
    root, outside = tmp_path / "config", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("OUTSIDE")
    make_pod(tmp_path / "pod")
    configmap = tmp_path / "pod" / "etc" / "config"  # key -> ..data/key, ..data -> ..<timestamp>
    root.mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "file").write_text("inside")
    links = {"relative": "sub/file", "absolute-inside": str(root / "sub" / "file"), "down-and-up": "sub/../sub/file",
             "up-and-back": "../config/sub/file", "out": "../outside/secret", "absolute-out": str(outside / "secret"),
             "dangling": "sub/nothing", "loop": "loop", "file-as-dir": "sub/file/x"}
    for name, target in links.items():
        os.symlink(target, root / name)

    def read(location: Path, path: str) -> str:
        fd = open_beneath(str(location), path, os.O_RDONLY, kernel=kernel)
        with open(fd, encoding="utf-8") as f:
            return f.read()

    def refusal(path: str) -> type[Exception]:
        with pytest.raises((OutsideRoot, OSError)) as raised:
            read(root, path)
        return raised.type

    assert read(configmap, "app.yaml") == "greeting: hello\n"
    assert read(root, "relative") == read(root, "absolute-inside") == read(root, "down-and-up") == "inside"
    assert read(root / "sub" / "file", "") == "inside"  # a root that is a file (a subPath mount)
    assert [refusal(p) for p in ("up-and-back", "out", "absolute-out", "sub/../../outside/secret")] == [OutsideRoot] * 4
    assert refusal("dangling") is FileNotFoundError and refusal("nothing") is FileNotFoundError
    assert refusal("loop") is OSError and refusal("file-as-dir") is NotADirectoryError
    assert follow("../x", ("/r",)) == (False, ["..", "x"]) and follow("/r/a/../b", ("/r",)) == (True, ["", "a", "..", "b"])
    with pytest.raises(OutsideRoot):
        follow("/rx/a", ("/r",))


def test_the_walk_never_opens_outside_while_a_directory_is_swapped_for_a_link(tmp_path):
    """The resolution used where the kernel has no openat2, raced directly (no agent)."""
    root, outside = tmp_path / "shared", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "f").write_text("OUTSIDE")
    swapper = Swapper(root, outside)
    seen: collections.Counter[str] = collections.Counter()
    swapper.start()
    try:
        swapper.swapped.wait()
        for _ in range(3000):
            try:
                fd = open_beneath(str(root), "d/f", os.O_RDONLY, kernel=False)
            except (OutsideRoot, OSError) as e:
                seen[type(e).__name__] += 1
                continue
            with open(fd, encoding="utf-8") as f:
                seen[f.read()] += 1
    finally:
        swapper.stop.set()
        swapper.join()
    assert "OUTSIDE" not in seen, seen
