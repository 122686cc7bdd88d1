"""The agent image's promises, proven without a container engine.

``agent_image/Dockerfile`` says: the agent runs as uid 65532, with a read-only root
filesystem, the credentials mounted read-only, and writes nothing; its tag is the
package version. Here:

- the file tree the image holds is built as the Dockerfile builds it (the wheels of
  ``.[fast]``, installed into a directory, bytecode compiled at install), and
  ``intercept agent`` runs from it confined as the injected securityContext says
  (:mod:`e2e.cluster.confine`: bubblewrap and setpriv; uid 65532, the tree and ``/``
  read-only, the credentials bound read-only), configured only by the image's ``ENV``
  and the ``INTERCEPT_*`` variables the injection sets, in a network namespace of its
  own; a developer's request and everyone else's are routed through it;
- the pod runner of the real control plane starts agent containers the same way, and
  the process is looked at from outside (``/proc``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import intercept
from e2e.cluster.confine import Confinement, for_container, image_config, unavailable
from intercept.kube.image import DEFAULT_AGENT_IMAGE
from intercept.credentials import Credentials
from intercept.kube.inject import AGENT_CONTAINER, InjectOptions, inject
from tests.conftest import INTERCEPT, Proc, free_port
from tests.netns import needs_netns, two_hosts
from tests.realcluster import SAMPLE, RealCluster, app, deploy, intercept as run_intercept

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "agent_image" / "Dockerfile"


def test_the_default_agent_image_is_tagged_with_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert intercept.__version__ == version
    repository, _, tag = DEFAULT_AGENT_IMAGE.rpartition(":")
    assert tag == version, f"{DEFAULT_AGENT_IMAGE} is not tagged {version}: the release pushes the package version"
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    push = next(step["with"] for step in workflow["jobs"]["image"]["steps"]
                if step.get("uses", "").startswith("docker/build-push-action"))
    assert push["tags"] == repository + ":${{ needs.version.outputs.version }}"
    assert push["platforms"] == "linux/amd64,linux/arm64" and push["file"] == "agent_image/Dockerfile"


def test_the_dockerfile_runs_the_agent_as_65532_and_writes_no_bytecode() -> None:
    config = image_config(DOCKERFILE)
    assert (config.uid, config.gid) == (65532, 65532)
    assert config.env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "HOME" in config.env["INTERCEPT_IMAGE_ENV"].split()


def injected_pod(security_context: dict | None = None) -> tuple[dict, dict]:
    """The pod template of a one-container Deployment after injection, and its agent container."""
    workload, service, _ = app("web", 1)
    container = workload["spec"]["template"]["spec"]["containers"][0]
    if security_context is None:
        container.pop("securityContext")
    else:
        container["securityContext"] = security_context
    for obj in (workload, service):
        obj["metadata"]["namespace"] = "shop"
    out = inject([workload, service], "web", InjectOptions(image="intercept.test/agent:1"))
    pod = out[0]["spec"]["template"]
    return pod, next(c for c in pod["spec"]["containers"] if c["name"] == AGENT_CONTAINER)


def test_an_agent_beside_a_root_app_is_confined_as_65532_with_everything_read_only(tmp_path: Path) -> None:
    pod, agent = injected_pod()
    volumes = {v["name"]: tmp_path / v["name"] for v in pod["spec"]["volumes"]}
    confinement, moved = for_container(pod, agent, image_config(DOCKERFILE), volumes)
    assert (confinement.uid, confinement.gid, confinement.groups) == (65532, 65532, ())
    assert confinement.read_only_root and confinement.drop_all_capabilities and confinement.no_new_privs
    assert moved == []  # /var/run/intercept lies in the container's own /run
    assert {(str(m.source), m.target, m.read_only) for m in confinement.mounts} == {
        (str(tmp_path / "intercept-credentials"), os.path.realpath("/var/run/intercept"), True),
        (str(tmp_path / "intercept-routes"), os.path.realpath("/var/run/intercept-routes"), True),
    }
    argv = confinement.argv(["python", "-m", "intercept", "agent"])
    assert argv[:6] == ["bwrap", "--die-with-parent", "--unshare-pid", "--ro-bind", "/", "/"]
    assert argv[argv.index("--remount-ro") + 1] == "/tmp"
    setpriv = argv[argv.index("--") + 1:]
    assert setpriv[0].endswith("setpriv") and setpriv[1:] == ["--reuid=65532", "--regid=65532", "--clear-groups", "--bounding-set=-all", "--inh-caps=-all",
                           "--no-new-privs", "--", "python", "-m", "intercept", "agent"]


def test_an_agent_beside_a_non_root_app_runs_as_the_apps_user(tmp_path: Path) -> None:
    pod, agent = injected_pod({"runAsUser": 1000, "runAsGroup": 3000})
    confinement, _ = for_container(pod, agent, image_config(DOCKERFILE), {})
    assert (confinement.uid, confinement.gid) == (1000, 3000)


def test_a_mount_path_the_read_only_root_cannot_hold_is_moved_under_run_volumes(tmp_path: Path) -> None:
    pod = {"spec": {"volumes": [{"name": "data", "emptyDir": {}}]}}
    container = {"name": "c", "volumeMounts": [{"name": "data", "mountPath": "/no/such/dir"}]}
    confinement, moved = for_container(pod, container, image_config(DOCKERFILE), {"data": tmp_path})
    assert moved == [("/no/such/dir", "/run/volumes/data")]
    assert confinement.mounts[0].target == "/run/volumes/data" and not confinement.mounts[0].read_only


def test_a_path_the_user_could_not_reach_is_bound_in_the_containers_own_directories(tmp_path: Path) -> None:
    python = tmp_path / "hidden" / "python"  # under /tmp, the container's own (and /tmp/pytest-of-root is 0700)
    python.mkdir(parents=True)
    argv = Confinement(65532, 65532, reach=(str(python),)).argv(["true"])
    i = argv.index("--ro-bind", 4)
    assert argv[i:i + 3] == ["--ro-bind", str(python), str(python)]
    made = [argv[j + 3] for j in range(len(argv) - 3) if argv[j:j + 3] == ["--perms", "0755", "--dir"]]
    assert made == [str(p) for p in reversed(python.parents) if str(p).startswith("/tmp/")]


# --------------------------------------------------------------------------- on the real control plane


def _descendants(pid: int) -> list[int]:
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found += [int(child), *_descendants(int(child))]
    return found


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def _mounts(pid: int) -> dict[str, set[str]]:
    """Mount point -> its per-mount options, as the process sees them (the last mount at a point wins)."""
    mounts = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        mounts[fields[4]] = set(fields[5].split(","))
    return mounts


def test_the_pod_runner_gives_the_agent_the_security_context_the_injection_wrote(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("confined")
    workload, service, _ = app("confined", 1)
    workload["spec"]["template"]["spec"]["containers"][0].pop("securityContext")  # the app runs as root
    deploy(real_cluster, ns, [workload, service])
    real_cluster.wait_ready(ns, "confined", 1)

    added = run_intercept("inject", "confined", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig),
                          "--agent-image", "intercept.test/agent:1")
    assert added.returncode == 0, added.stdout + added.stderr
    injected = run_intercept("env", "confined", "-o", "json", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig))
    assert injected.returncode == 0, injected.stdout + injected.stderr
    assert json.loads(injected.stdout)["GREETING"] == "hello"
    template = real_cluster.get("Deployment", ns, "confined")["spec"]["template"]["spec"]
    context = next(c for c in template["containers"] if c["name"] == AGENT_CONTAINER)["securityContext"]
    assert context["runAsUser"] == 65532 and context["readOnlyRootFilesystem"] is True

    pod = next(p for p in real_cluster.pods(ns, "app=confined") if len(p["spec"]["containers"]) == 2)
    runner = int((real_cluster.pod_dir(ns, pod) / f"{AGENT_CONTAINER}.pid").read_text())
    agent = next(pid for pid in _descendants(runner)  # under bwrap and setpriv: the interpreter
                 if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-m", b"intercept", b"agent"])
    status = _status(agent)
    assert status["Uid"].split() == ["65532"] * 4 and status["Gid"].split() == ["65532"] * 4
    assert status["Groups"].strip() == ""
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"] == "1"
    mounts = _mounts(agent)
    assert "ro" in mounts["/"], mounts["/"]
    for path in ("/var/run/intercept", "/var/run/intercept-routes", "/tmp", "/run"):
        assert "ro" in mounts[os.path.realpath(path)], (path, mounts)
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{agent}/environ").read_text().split("\0") if "=" in item)
    assert environ["PYTHONDONTWRITEBYTECODE"] == "1" and environ["HOME"] == "/"
    assert environ["INTERCEPT_CREDENTIALS"] == "/var/run/intercept/credentials.json"  # as injected, not rewritten
    assert environ["INTERCEPT_UPSTREAM"] == "127.0.0.1:8080"


# --------------------------------------------------------------------------- the image's file tree, run confined


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the image holds besides Python: the wheels of ``.[fast]`` installed under a prefix,
    as the Dockerfile's two stages do (pip wheel, then pip install --no-index from them)."""
    missing = unavailable()
    if missing:
        pytest.skip(missing)
    work = tmp_path_factory.mktemp("image")
    wheels, tree = work / "wheels", work / "tree"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), f"{ROOT}[fast]"],
                   check=True, capture_output=True, timeout=900)
    subprocess.run([sys._base_executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                    "--prefix", str(tree), "--ignore-installed", "--no-warn-script-location", "--no-warn-conflicts", "intercept[fast]"],
                   check=True, capture_output=True, timeout=900)
    return tree


def _site(tree: Path) -> Path:
    return next(tree.glob("lib/python3*/site-packages"))


@needs_netns
def test_the_agent_runs_from_the_image_tree_as_65532_read_only_and_routes_a_request(image_tree: Path,
                                                                                     tmp_path: Path) -> None:
    pod, container = injected_pod()  # an app running as root: the agent gets the image's user
    credentials = tmp_path / "secret"
    credentials.mkdir()
    (credentials / "credentials.json").write_text(Credentials.generate().to_json())
    (credentials / "credentials.json").chmod(0o444)  # the Secret volume's defaultMode, as injected
    routes = tmp_path / "routes"
    routes.mkdir()
    image = image_config(DOCKERFILE)
    base = Path(sys._base_executable)
    confinement, moved = for_container(pod, container, image, {"intercept-credentials": credentials,
                                                               "intercept-routes": routes},
                                       reach=(str(image_tree), sys.base_prefix),
                                       env={"PATH": f"{image_tree / 'bin'}:{base.parent}"})
    assert moved == [] and confinement.uid == 65532 and confinement.read_only_root
    configured = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("INTERCEPT_") and "value" in e}
    env = {**image.env, **configured, "HOME": "/", "LANG": "C.UTF-8",
           "PYTHONPATH": str(_site(image_tree))}  # where the image's interpreter finds its site-packages
    before = sorted(str(p.relative_to(image_tree)) for p in image_tree.rglob("*"))

    # -S: the interpreter's own site-packages stay out; only the tree's code runs.
    entrypoint = [str(base), "-S", str(image_tree / "bin" / "intercept"), "agent"]  # the Dockerfile's ENTRYPOINT
    with two_hosts("10.81.0") as hosts:
        cluster_app = Proc([*hosts.run_in(hosts.cluster), sys.executable, str(SAMPLE), "serve", "--port", "8080",
                            "--name", "cluster/app"])
        agent = Proc([*hosts.run_in(hosts.cluster), *confinement.argv(entrypoint)], env=env, cwd="/")
        port = free_port()
        client = None
        try:
            cluster_app.wait_for(r"serving as cluster/app on port 8080")
            agent.wait_for(r"^intercept: agent: http 0\.0\.0\.0:9900 ssh 0\.0\.0\.0:9922 upstream 127\.0\.0\.1:8080$")
            python = _agent_process(agent.p.pid)
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{python}/status").read_text().splitlines()
                          if ":\t" in line)
            assert status["Uid"].split() == ["65532"] * 4 and int(status["CapEff"], 16) == 0
            imported = subprocess.run([*hosts.run_in(hosts.cluster), *confinement.argv(
                [str(base), "-S", "-c", "import intercept, uvloop; print(intercept.__file__)"])],
                env=env, capture_output=True, text=True, timeout=120, cwd="/")
            assert imported.stdout.strip() == str(_site(image_tree) / "intercept" / "__init__.py"), imported

            client = Proc([*hosts.run_in(hosts.laptop), *INTERCEPT, "start", "--agent", f"{hosts.cluster_ip}:9922",
                           "--credentials", str(credentials / "credentials.json"), "--header", "x-dev=alice",
                           "--port", str(port), "--no-watch", "--", sys.executable, str(SAMPLE), "serve",
                           "--port", str(port), "--name", "local"])
            client.wait_for(r"^intercept: ready: ", timeout=60)
            url = f"http://{hosts.cluster_ip}:9900/"
            probe = [*hosts.run_in(hosts.laptop), sys.executable, str(SAMPLE), "probe", url, "-n", "2"]
            mine = subprocess.run([*probe, "-H", "x-dev: alice"], capture_output=True, text=True, timeout=60)
            others = subprocess.run(probe, capture_output=True, text=True, timeout=60)
            assert mine.stdout.split() == ["local", "local"], mine
            assert others.stdout.split() == ["cluster/app", "cluster/app"], others
        finally:
            if client is not None:
                client.stop()
            agent.stop()
            cluster_app.stop()
    assert not any(line.startswith(("Traceback", "intercept: error")) for line in agent.lines), agent.output
    assert sorted(str(p.relative_to(image_tree)) for p in image_tree.rglob("*")) == before  # wrote nothing there
    assert sorted(p.name for p in credentials.iterdir()) == ["credentials.json"]


def _agent_process(runner: int) -> int:
    """The interpreter under ``ip netns exec`` + bwrap + setpriv (each execs the next, or forks it)."""
    return next(pid for pid in _descendants(runner)
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == sys._base_executable.encode())
