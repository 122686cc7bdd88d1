"""The agent image's promises, proven without a container engine.

``agent_image/Dockerfile`` says: the agent runs as uid 65532, with a read-only root
filesystem, the credentials mounted read-only, and writes nothing; its tag is the
package version. Here the pod runner of the real control plane starts agent containers
as the securityContext the injection wrote (:mod:`e2e.cluster.confine`: bubblewrap and
setpriv), and the process is looked at from outside.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
import yaml

import intercept
from e2e.cluster.confine import Confinement, for_container, image_config
from intercept.kube.image import DEFAULT_AGENT_IMAGE
from intercept.kube.inject import AGENT_CONTAINER, InjectOptions, inject
from tests.realcluster import RealCluster, app, deploy, intercept as run_intercept

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

    injected = run_intercept("env", "confined", "-o", "json", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig),
                             "--agent-image", "intercept.test/agent:1")
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
