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
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from intercept import protocol
from intercept.agent.files import ServedFiles, ServedRoot, Virtual, mounts_from_env
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
    assert files.locate("/etc/config/app.yaml").local == "/data/cfg/app.yaml"
    assert files.locate("/etc/config/extra/a").local == "/data/x/a"  # the deeper mount owns its paths
    assert files.locate("/etc/config/../../etc/passwd") is None  # normalized first: not served
    assert files.locate("../../../etc/config").local == "/data/cfg"  # never above /
    assert files.locate("/etc/configx") is None and files.locate("/tmp") is None
    with pytest.raises(ValueError):
        ServedFiles([ServedRoot("relative", "/x")])


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


def test_the_agent_serves_the_mounts_read_only_and_refuses_every_way_out(files_agent, pod):
    config, secret = str(pod["config"]), str(pod["secret"])

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
    assert out["token"] == b"s3cr3t-token" and out["cert"].startswith(b"-----BEGIN")
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
