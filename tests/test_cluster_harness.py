"""The harness itself (e2e/cluster): kubectl's port-forward reaches a pod's process, and ``up`` leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from e2e.cluster.api import wait_until
from tests.conftest import Proc
from tests.realcluster import ROOT, WAIT, RealCluster


def test_kubectl_port_forward_travels_through_the_api_server_and_kwok_to_the_pods_process(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("pf")
    real_cluster.create({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27",
                                                       "ports": [{"containerPort": 80}]}]}}}}, ns)
    pod = real_cluster.wait_ready_pods(ns, "app=web", 1)[0]
    forward = Proc([str(real_cluster.kubectl), "--kubeconfig", str(real_cluster.kubeconfig), "-n", ns,
                    "port-forward", f"pod/{pod}", ":80"])
    try:
        port = int(forward.wait_for(r"^Forwarding from 127\.0\.0\.1:(\d+) -> 80$", timeout=WAIT)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/anything", timeout=30) as response:
            assert response.headers["X-Served-By"] == f"{pod}/nginx"  # the stand-in for an image it does not know
    finally:
        forward.stop()


def test_up_runs_until_sigterm_then_leaves_no_process_namespace_or_bridge(tmp_path: Path, real_cluster: RealCluster) -> None:
    state = tmp_path / "state"
    up = Proc([sys.executable, "-m", "e2e.cluster", "up", "--state", str(state)], cwd=ROOT)
    try:
        up.wait_for(rf"^cluster: ready: kubeconfig {state}/kubeconfig$", timeout=WAIT)
        bridge = up.wait_for(r"^cluster: pods: network \S+ on bridge (\S+)$")[1]
        kubectl = [str(state / "bin" / "kubectl"), "--kubeconfig", str(state / "kubeconfig")]
        made = subprocess.run([*kubectl, "create", "deployment", "one", "--image=intercept.test/sample:1", "--port=8080"],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        waited = subprocess.run([*kubectl, "rollout", "status", "deployment/one", "--timeout=120s"],
                                capture_output=True, text=True, timeout=150)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert bridge in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout

        up.signal(signal.SIGTERM)
        assert up.finish(120) == 0, up.output
        assert up.lines[-1] == "cluster: stopped"
    finally:
        up.stop()
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(state) not in processes
    assert bridge not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    tag = bridge.removeprefix("icb")
    assert f"icp-{tag}-" not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout


def test_a_harness_killed_outright_leaves_no_process_and_the_next_one_removes_its_network(
    tmp_path: Path, real_cluster: RealCluster
) -> None:
    state = tmp_path / "killed"
    up = Proc([sys.executable, "-m", "e2e.cluster", "up", "--state", str(state)], cwd=ROOT)
    try:
        up.wait_for(r"^cluster: ready: ", timeout=WAIT)
        bridge = up.wait_for(r"^cluster: pods: network \S+ on bridge (\S+)$")[1]
        kubectl = [str(state / "bin" / "kubectl"), "--kubeconfig", str(state / "kubeconfig")]
        subprocess.run([*kubectl, "create", "deployment", "one", "--image=intercept.test/sample:1", "--port=8080"],
                       capture_output=True, text=True, timeout=60, check=True)
        subprocess.run([*kubectl, "rollout", "status", "deployment/one", "--timeout=120s"],
                       capture_output=True, text=True, timeout=150, check=True)
        up.p.kill()  # SIGKILL: no teardown runs
        up.finish(30)
    finally:
        up.stop()

    def control_plane_gone() -> bool:
        return str(state) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout

    wait_until(control_plane_gone, "the killed harness's processes to end (their parent-death signal)", WAIT)
    assert bridge in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout  # left behind, for now

    again = Proc([sys.executable, "-m", "e2e.cluster", "up", "--state", str(tmp_path / "next")], cwd=ROOT)
    try:
        again.wait_for(r"^cluster: ready: ", timeout=WAIT)
        assert any(f"removed the pod network {bridge.removeprefix('icb')}" in line for line in again.lines), again.output
        assert bridge not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
        again.signal(signal.SIGTERM)
        assert again.finish(120) == 0, again.output
    finally:
        again.stop()


def test_up_refuses_at_once_naming_the_package_when_what_its_pods_need_is_missing(tmp_path: Path) -> None:
    tools = tmp_path / "bin"  # a PATH with iproute2 and setpriv but no bubblewrap
    tools.mkdir()
    for tool in ("ip", "setpriv"):
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    done = subprocess.run([sys.executable, "-m", "e2e.cluster", "up", "--state", str(tmp_path / "state")], cwd=ROOT,
                          env={**os.environ, "PATH": str(tools)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout.startswith("cluster: error: cannot run pods here: ")
    assert "apt-get install" in done.stdout
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())
