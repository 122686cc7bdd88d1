"""The agent image's promises, kept by the image itself on the real node.

``agent_image/Dockerfile`` says: the agent runs as uid 65532, with a read-only root
filesystem, the credentials mounted read-only, and writes nothing; it holds the agent's
dependencies and not the CLI's (its ``cli`` target, the CLI image, holds those); the tags
of both are the package version. Here the image is the one ``e2e.cluster.images`` built
from the Dockerfile of this checkout (``intercept.test/agent:dev``),
run by containerd and runc as the injection wrote its container, and looked at from
outside (``/proc``, its cgroup, its log).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

import intercept
from e2e.cluster import images
from e2e.cluster.api import wait_until
from e2e.cluster.build import Binaries
from intercept.kube.image import CLI_TARGET, DEFAULT_AGENT_IMAGE, DEFAULT_CLI_IMAGE
from intercept.kube.inject import AGENT_CONTAINER
from tests.conftest import free_port
from tests.realcluster import (
    AGENT_IMAGE,
    RESTRICTED,
    WAIT,
    RealCluster,
    app,
    deploy,
    intercept as run_intercept,
    served_by,
    start,
)

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
AGENT_DEPENDENCIES = PYPROJECT["tool"]["intercept"]["agent-dependencies"]


def test_the_release_pushes_the_default_agent_and_cli_images_tagged_with_the_package_version() -> None:
    version = PYPROJECT["project"]["version"]
    assert intercept.__version__ == version
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    pushes = {step["with"].get("target"): step["with"] for step in workflow["jobs"]["image"]["steps"]
              if step.get("uses", "").startswith("docker/build-push-action")}
    assert set(pushes) == {None, CLI_TARGET}  # the agent is the Dockerfile's default target
    for image, target in ((DEFAULT_AGENT_IMAGE, None), (DEFAULT_CLI_IMAGE, CLI_TARGET)):
        repository, _, tag = image.rpartition(":")
        assert tag == version, f"{image} is not tagged {version}: the release pushes the package version"
        push = pushes[target]
        assert push["tags"] == repository + ":${{ needs.version.outputs.version }}"
        assert push["platforms"] == "linux/amd64,linux/arm64" and push["file"] == "agent_image/Dockerfile"
    assert images.IMAGES_BY_NAME[images.CLI].target == CLI_TARGET  # the test bed builds what the release pushes


# --------------------------------------------------------------------------- what the image holds


def test_the_agents_dependencies_are_the_packages_own_and_not_the_clis() -> None:
    declared = set(PYPROJECT["project"]["dependencies"]) | set(PYPROJECT["project"]["optional-dependencies"]["fast"])
    assert set(AGENT_DEPENDENCIES) <= declared  # the same spelling: one range per package
    names = {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0].lower() for d in AGENT_DEPENDENCIES}
    assert not names & {"kubernetes", "debugpy", "watchfiles"}  # the CLI's: `pip install intercept` still has them


# The agent's modules, and what they import when a developer connects (asyncssh) or a regex rule arrives (re2).
_IMPORT_AGENT = """
import importlib.abc, importlib.metadata, re, sys
allowed = set()
todo = [re.split(r"[<>=;\\[ ]", d, maxsplit=1)[0] for d in sys.argv[1:]]
while todo:
    dist = importlib.metadata.distribution(todo.pop())
    if dist.metadata["Name"].lower() in allowed:
        continue
    allowed.add(dist.metadata["Name"].lower())
    todo += [re.split(r"[<>=;\\[ ]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
owners = importlib.metadata.packages_distributions()
class OnlyTheAgents(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in owners and top != "intercept" and not {d.lower() for d in owners[top]} & allowed:
            raise ModuleNotFoundError(f"{name} (of {owners[top]}) is not an agent dependency")
sys.meta_path.insert(0, OnlyTheAgents())
import intercept.cli, intercept.agent.agent, intercept.agent.sshd, intercept.agent.h2proxy, intercept.agent.sftp
import intercept.routing.match, intercept.routing.cluster, intercept.routing.ngh2codec, uvloop, re2
print("imported")
"""


def test_the_agents_modules_import_with_only_the_agents_dependencies() -> None:
    done = subprocess.run([sys.executable, "-c", _IMPORT_AGENT, *AGENT_DEPENDENCIES], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr


def test_the_agent_image_adds_at_most_40_mb_to_its_base(real_cluster: RealCluster) -> None:
    built = images.Images(Binaries(real_cluster.state / "bin"))
    agent, base = (built.archive(images.IMAGES_BY_NAME[name]) for name in (images.AGENT, images.BASE))
    assert images.layers_size(agent, without=base) <= 40_000_000


# --------------------------------------------------------------------------- run by the real node


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def _mounts(pid: int) -> dict[str, set[str]]:
    """Mount point -> its per-mount options, as the process sees them (the last mount at a point wins)."""
    mounts = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        mounts[fields[4]] = set(fields[5].split(","))
    return mounts


def _memory_limit(pid: int) -> int:
    path = next(line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if line.split(":")[1] == "memory")
    return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())


def test_the_node_runs_the_agent_as_the_injection_wrote_it(real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("confined")
    workload, service, _ = app("confined", 1)
    workload["spec"]["template"]["spec"]["containers"][0].pop("securityContext")  # the app runs as the image's user
    deploy(real_cluster, ns, [workload, service])
    real_cluster.wait_ready(ns, "confined", 1)

    added = run_intercept("inject", "confined", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig),
                          "--agent-image", AGENT_IMAGE)
    assert added.returncode == 0, added.stdout + added.stderr
    injected = run_intercept("env", "confined", "-o", "json", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig))
    assert injected.returncode == 0, injected.stdout + injected.stderr
    variables = json.loads(injected.stdout)
    assert variables["GREETING"] == "hello"
    assert variables["CONFINED_SERVICE_HOST"] == real_cluster.get("Service", ns, "confined")["spec"]["clusterIP"]
    template = real_cluster.get("Deployment", ns, "confined")["spec"]["template"]["spec"]
    context = next(c for c in template["containers"] if c["name"] == AGENT_CONTAINER)["securityContext"]
    assert context["runAsUser"] == 65532 and context["readOnlyRootFilesystem"] is True

    pod = next(p for p in real_cluster.pods(ns, "app=confined") if len(p["spec"]["containers"]) == 2
               and not p["metadata"].get("deletionTimestamp"))
    agent = real_cluster.container_pid(ns, pod["metadata"]["name"], AGENT_CONTAINER)
    assert Path(f"/proc/{agent}/cmdline").read_bytes().split(b"\0")[1:3] == [b"/usr/local/bin/intercept", b"agent"]
    status = _status(agent)
    assert status["Uid"].split() == ["65532"] * 4 and status["Gid"].split() == ["65532"] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"] == "1"
    mounts = _mounts(agent)
    assert "ro" in mounts["/"], mounts["/"]
    for path in ("/var/run/intercept", "/var/run/intercept-routes"):  # /var/run is /run in the image
        assert "ro" in mounts[path.removeprefix("/var")], (path, mounts)
    assert _memory_limit(agent) == 128 * 1024 * 1024  # the injected limit, enforced by the kernel
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{agent}/environ").read_text().split("\0") if "=" in item)
    assert environ["PYTHONDONTWRITEBYTECODE"] == "1" and environ["INTERCEPT_UPSTREAM"] == "127.0.0.1:8080"
    assert environ["INTERCEPT_CREDENTIALS"] == "/var/run/intercept/credentials.json"
    # the HTTP/2 codec over libnghttp2, chosen at start (loaded then), not the pure-Python fallback
    assert "/ngh2/_core" in Path(f"/proc/{agent}/maps").read_text()
    credentials = Path(f"/proc/{agent}/root/run/intercept")
    assert (credentials / "..data").is_symlink() and (credentials / "credentials.json").is_symlink()  # a Secret volume


def test_an_intercept_through_the_image_prints_no_warning_in_its_output_or_the_agents_log(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("quiet")
    deploy(real_cluster, ns, app("quiet", 1))
    real_cluster.wait_ready(ns, "quiet", 1)
    client = start(real_cluster, ns, "quiet", free_port())
    try:
        client.wait_for(r"^intercept: ready: ", timeout=WAIT)
        (endpoint,) = real_cluster.wait_ready(ns, "quiet", 1)
        assert served_by(endpoint, {"x-dev": "alice"}) == "local"  # an SSH login and a routed request, at least
    finally:
        client.stop()
    pod = next(p["metadata"]["name"] for p in real_cluster.pods(ns, "app=quiet") if len(p["spec"]["containers"]) == 2
               and not p["metadata"].get("deletionTimestamp"))
    log = real_cluster.api.text(f"/api/v1/namespaces/{ns}/pods/{pod}/log?container={AGENT_CONTAINER}")
    assert "intercept: agent: http 0.0.0.0:9900 ssh 0.0.0.0:9922" in log
    for text in (log, client.output):
        assert not re.search(r"Warning|DSA is deprecated|Traceback", text), text


def test_an_agent_whose_credentials_are_not_mounted_says_so(real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("nocreds")
    real_cluster.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent"},
                         "spec": {"containers": [{"name": "agent", "image": AGENT_IMAGE,
                                                  "securityContext": {**RESTRICTED, "runAsUser": 65532,
                                                                      "readOnlyRootFilesystem": True},
                                                  "env": [{"name": "INTERCEPT_UPSTREAM", "value": "127.0.0.1:8080"},
                                                          {"name": "INTERCEPT_CREDENTIALS",
                                                           "value": "/var/run/intercept/credentials.json"}]}]}}, ns)

    def logged() -> str | None:
        try:
            log = real_cluster.api.text(f"/api/v1/namespaces/{ns}/pods/agent/log")
        except Exception:  # noqa: BLE001 - not started yet
            return None
        return log if "intercept: error:" in log else None

    log = wait_until(logged, "the agent's error line", WAIT)
    assert ("intercept: error: credentials file /var/run/intercept/credentials.json does not exist and cannot be "
            "created (Read-only file system)") in log, log
    assert "cannot listen" not in log
