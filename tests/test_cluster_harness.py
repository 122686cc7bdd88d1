"""The harness itself (e2e/cluster): a real node, kubectl's port-forward reaches a container, and ``up``
leaves nothing behind on this machine, however it ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from e2e.cluster.api import wait_until
from e2e.cluster.host import KUBELET_SYSCTLS, RUN_DIR, sysctl_path
from tests.conftest import Proc
from tests.realcluster import ROOT, WAIT, RealCluster, echo


def test_the_node_runs_containerd_and_kubectl_port_forward_reaches_a_container(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("pf")
    (node,) = json.loads(subprocess.run([str(real_cluster.kubectl), "--kubeconfig", str(real_cluster.kubeconfig),
                                         "get", "nodes", "-o", "json"], capture_output=True, text=True).stdout)["items"]
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    real_cluster.create(echo("web", 1, ports=(8080, 9090)), ns)
    pod = real_cluster.wait_ready_pods(ns, "app=web", 1)[0]
    forward = Proc([str(real_cluster.kubectl), "--kubeconfig", str(real_cluster.kubeconfig), "-n", ns,
                    "port-forward", f"pod/{pod}", ":9090"])
    try:
        port = int(forward.wait_for(r"^Forwarding from 127\.0\.0\.1:(\d+) -> 9090$", timeout=WAIT)[1])
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/anything", headers={"X-Probe": "1"}),
                                    timeout=30) as response:
            assert response.headers["X-Served-By"] == pod
            body = json.loads(response.read())
        assert (body["port"], body["method"], body["path"]) == (9090, "GET", "/anything")
        assert ["X-Probe", "1"] in body["headers"]
    finally:
        forward.stop()


def _left(tag: str, state: Path) -> dict[str, list[str]]:
    """What the cluster ``tag`` (state in ``state``) has on this machine now: its processes, network namespace,
    links, routes, cgroups, mounts and ledger (other clusters, the session's among them, may run meanwhile)."""
    def run(*argv: str) -> list[str]:
        return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()

    found = {
        "processes": [line for line in run("ps", "-ww", "-eo", "args") if str(state) in line or f"icn-{tag}" in line],
        "netns": [line for line in run("ip", "netns") if line.startswith(f"icn-{tag}")],
        "links": [line for line in run("ip", "-o", "link") if f"icn{tag}" in line],
        "cgroups": [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/icn-{tag}")],
        "mounts": [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if f"/icn-{tag}" in line.split()[4] or str(state) in line.split()[4]],
        "ledger": [str(p) for p in RUN_DIR.glob(f"{tag}.json")],
    }
    return {what: items for what, items in found.items() if items}


def _sysctls() -> dict[str, str]:
    return {k: sysctl_path(k).read_text() for k in KUBELET_SYSCTLS}


def _up(state: Path) -> tuple[Proc, str]:
    """A cluster of its own, ready, with a Deployment of 2 running pods; and its tag."""
    up = Proc([sys.executable, "-m", "e2e.cluster", "up", "--state", str(state)], cwd=ROOT)
    up.wait_for(rf"^cluster: ready: kubeconfig {state}/kubeconfig$", timeout=WAIT)
    tag = up.wait_for(r"^cluster: node: node-(\w+) is Ready ")[1]
    kubectl = [str(state / "bin" / "kubectl"), "--kubeconfig", str(state / "kubeconfig")]
    made = subprocess.run([*kubectl, "create", "deployment", "one", "--image=intercept.test/echo:1", "--replicas=2"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    waited = subprocess.run([*kubectl, "rollout", "status", "deployment/one", "--timeout=120s"],
                            capture_output=True, text=True, timeout=150)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    return up, tag


def test_up_runs_until_sigterm_then_leaves_nothing_behind(tmp_path: Path, real_cluster: RealCluster) -> None:
    sysctls = _sysctls()
    state = tmp_path / "state"
    up, tag = _up(state)
    try:
        assert set(_left(tag, state)) == {"processes", "netns", "links", "cgroups", "mounts", "ledger"}
        up.signal(signal.SIGTERM)
        assert up.finish(120) == 0, up.output
        assert up.lines[-1] == "cluster: stopped"
    finally:
        up.stop()
    assert _left(tag, state) == {}
    assert _sysctls() == sysctls


def test_a_harness_killed_outright_is_cleaned_up_by_its_guard_or_else_by_the_next_up(
    tmp_path: Path, real_cluster: RealCluster
) -> None:
    sysctls = _sysctls()
    killed = tmp_path / "killed"
    up, tag = _up(killed)
    up.p.kill()  # SIGKILL: no teardown runs in the harness; its guard sees it end
    up.finish(30)
    up.stop()
    wait_until(lambda: _left(tag, killed) == {}, "the guard's cleanup", WAIT)
    assert _sysctls() == sysctls

    # The harness and its guard both killed (every process of the machine ended at once): the next up cleans.
    again = tmp_path / "again"
    up, tag = _up(again)
    ledger = json.loads((RUN_DIR / f"{tag}.json").read_text())
    os.kill(ledger["guard"], signal.SIGKILL)
    up.p.kill()
    up.finish(30)
    up.stop()
    assert "netns" in _left(tag, again)  # left behind, for now
    third = Proc([sys.executable, "-m", "e2e.cluster", "up", "--state", str(tmp_path / "third")], cwd=ROOT)
    try:
        third.wait_for(rf"^cluster: removed what a killed cluster \({tag}\) had left on this machine$", timeout=WAIT)
        third.wait_for(r"^cluster: ready: ", timeout=WAIT)
        assert _left(tag, again) == {}
        third.signal(signal.SIGTERM)
        assert third.finish(120) == 0, third.output
    finally:
        third.stop()
    assert _sysctls() == sysctls


def test_up_refuses_at_once_naming_the_package_when_what_the_node_needs_is_missing(tmp_path: Path) -> None:
    tools = tmp_path / "bin"  # a PATH with everything the node needs but containerd
    tools.mkdir()
    for tool in ("ip", "nsenter", "nft", "runc", "sh", "buildah", "mmdebstrap", "go", "gcc"):
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    done = subprocess.run([sys.executable, "-m", "e2e.cluster", "up", "--state", str(tmp_path / "state")], cwd=ROOT,
                          env={**os.environ, "PATH": str(tools)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.startswith("cluster: error: cannot run a node here: containerd not installed"), done.stdout
    assert "apt-get install containerd" in done.stdout
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())
