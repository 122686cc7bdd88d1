"""The Kubernetes commands end to end: ``python -m intercept inject|restore|uninstall|list``.

Offline commands read the Online Boutique manifests; cluster commands reach the stand-in
API server through ``--kubeconfig``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from intercept.kube.apply import ensure_agent
from intercept.kube.config import connect
from intercept.kube.image import DEFAULT_AGENT_IMAGE
from intercept.kube.inject import AGENT_CONTAINER, InjectOptions
from tests import shop
from tests.kubeapi import KubeAPI, as_user_sees_it, boutique

FIXTURES = shop.files()  # the shop's manifests as files, for -f
MANIFESTS = FIXTURES / "kubernetes-manifests.yaml"
POLICIES = FIXTURES / "network-policies.yaml"
ALL = MANIFESTS.read_text() + "\n---\n" + POLICIES.read_text()


def intercept(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "INTERCEPT_AGENT_IMAGE"}
    return subprocess.run([sys.executable, "-m", "intercept", *args], input=stdin, capture_output=True, text=True,
                          env={**environ, **(env or {})}, timeout=60)


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def agent_image_of(objects: list[dict], name: str) -> str | None:
    workload = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
    return next((c["image"] for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == AGENT_CONTAINER), None)


# --------------------------------------------------------------------------- offline


def test_inject_then_restore_through_files_and_stdin_gives_back_the_manifests(tmp_path: Path) -> None:
    source = tmp_path / "all.yaml"
    source.write_text(ALL)
    injected = intercept("inject", "cartservice", "-f", str(source))
    assert injected.returncode == 0, injected.stderr
    assert injected.stderr.splitlines() == [
        "intercept: injected: Deployment/cartservice: agent added "
        f"({DEFAULT_AGENT_IMAGE}; intercept-http=9900, intercept-ssh=9922; forwards to server:7070)",
        "intercept: injected: Service/cartservice: now targets the agent of Deployment/cartservice",
        "intercept: injected: NetworkPolicy/cartservice: now also admits the agent's port (for Deployment/cartservice)",
    ]
    assert agent_image_of(documents(injected.stdout), "cartservice") == DEFAULT_AGENT_IMAGE

    restored = intercept("restore", "-f", "-", stdin=injected.stdout)
    assert restored.returncode == 0, restored.stderr
    assert documents(restored.stdout) == documents(ALL)
    assert len(restored.stderr.splitlines()) == 3


def test_inject_reads_stdin_and_its_output_is_stable_and_idempotent() -> None:
    first = intercept("inject", "frontend", "-f", "-", stdin=ALL)
    second = intercept("inject", "frontend", "-f", str(MANIFESTS))
    assert first.returncode == second.returncode == 0
    assert first.stdout.startswith("---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: frontend\n")
    again = intercept("inject", "frontend", "-f", "-", stdin=second.stdout)
    assert again.stdout == second.stdout, "injecting injected manifests changes nothing"
    assert again.stderr == ""


def test_the_agent_image_comes_from_the_flag_else_the_environment() -> None:
    env = {"INTERCEPT_AGENT_IMAGE": "registry.internal/agent:7"}
    from_env = intercept("inject", "adservice", "-f", str(MANIFESTS), env=env)
    from_flag = intercept("inject", "adservice", "-f", str(MANIFESTS), "--agent-image", "example/agent:9", env=env)
    assert agent_image_of(documents(from_env.stdout), "adservice") == "registry.internal/agent:7"
    assert agent_image_of(documents(from_flag.stdout), "adservice") == "example/agent:9"


def test_a_service_that_does_not_resolve_is_one_line_and_exit_code_9() -> None:
    result = intercept("inject", "carts", "-f", str(MANIFESTS))
    assert result.returncode == 9
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("intercept: error: no Service named 'carts' in the manifests (Services: adservice, cartservice,")


def test_a_policy_change_refused_by_flag_is_exit_code_10() -> None:
    result = intercept("inject", "cartservice", "-f", "-", "--no-policy-changes", stdin=ALL)
    assert result.returncode == 10
    assert "intercept: error: NetworkPolicy/cartservice admits only the app's port 7070" in result.stderr
    assert "drop --no-policy-changes" in result.stderr


def test_input_that_is_not_yaml_is_a_usage_error() -> None:
    result = intercept("inject", "x", "-f", "-", stdin="kind: [unclosed\n")
    assert result.returncode == 2
    assert result.stderr.startswith("intercept: error: <stdin> is not valid YAML")


# --------------------------------------------------------------------------- against the stand-in


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[KubeAPI, Path]]:
    with KubeAPI() as server:
        server.load(boutique())
        yield server, server.kubeconfig(tmp_path / "kubeconfig")


def snapshot(server: KubeAPI) -> dict:
    return {(k, o["metadata"]["name"]): as_user_sees_it(o)
            for k in ("Service", "Deployment", "NetworkPolicy", "Secret") for o in server.objects(k, "default")}


# stand-in: the CLI's lines and exit codes, without waiting for rollouts.
def test_uninstall_restores_and_a_second_one_has_nothing_to_do(cluster) -> None:
    server, config = cluster
    before = snapshot(server)
    ensure_agent(connect(config).api, "default", "cartservice", InjectOptions(image="example/agent:1"), poll_interval=0)

    result = intercept("uninstall", "cartservice", "--kubeconfig", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "intercept: uninstalled: restored Service/cartservice, Deployment/cartservice, NetworkPolicy/cartservice; "
        "deleted Secret intercept-cartservice (namespace default)")
    assert 'intercept: progress: deployment "cartservice" successfully rolled out' in result.stdout
    assert snapshot(server) == before

    again = intercept("uninstall", "cartservice", "--kubeconfig", str(config), "-n", "default")
    assert again.returncode == 0
    assert again.stdout == "intercept: uninstall: Service cartservice has no agent in namespace default; nothing to do\n"


# stand-in: the CLI's lines and exit codes, without waiting for rollouts.
def test_uninstall_all_restores_every_agent(cluster) -> None:
    server, config = cluster
    before = snapshot(server)
    api = connect(config).api
    for service in ("adservice", "emailservice"):
        ensure_agent(api, "default", service, InjectOptions(image="example/agent:1"), poll_interval=0)
    result = intercept("uninstall", "--all", "--kubeconfig", str(config))
    assert result.returncode == 0, result.stderr
    assert "deleted Secret intercept-adservice, intercept-emailservice" in result.stdout
    assert snapshot(server) == before


# stand-in: no server behaviour involved; kept fast.
def test_uninstall_needs_a_service_or_all_and_a_cluster(cluster, tmp_path: Path) -> None:
    _, config = cluster
    both = intercept("uninstall", "cartservice", "--all", "--kubeconfig", str(config))
    assert both.returncode == 2 and "pass a SERVICE, or --all" in both.stderr
    nowhere = intercept("uninstall", "cartservice", "--kubeconfig", str(tmp_path / "missing"))
    assert nowhere.returncode == 11
    assert nowhere.stderr == f"intercept: error: kubeconfig {tmp_path / 'missing'} does not exist; pass the file kubectl uses (--kubeconfig)\n"


# stand-in: the table's layout over the whole Online Boutique, without 12 rollouts.
def test_list_shows_a_table_and_json(cluster) -> None:
    server, config = cluster
    ensure_agent(connect(config).api, "default", "frontend", InjectOptions(image="example/agent:1"), poll_interval=0)
    table = intercept("list", "--kubeconfig", str(config))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SERVICE", "WORKLOAD", "PORTS", "AGENT", "ROUTES", "NOTE"]
    frontend = next(line for line in lines if line.startswith("frontend "))
    # its pods have no agent that answers here: the routes are unknown (-o json says why)
    assert frontend.split() == ["frontend", "Deployment/frontend", "80->8080", "0.1.0", "unknown"]
    assert len(lines) == 13

    rows = json.loads(intercept("list", "--kubeconfig", str(config), "-o", "json").stdout)
    assert {r["service"]: r["agent"] for r in rows}["frontend"] is True
    assert "error" in next(r for r in rows if r["service"] == "frontend")["routes"][0]
    everywhere = intercept("list", "--kubeconfig", str(config), "-A")
    assert everywhere.stdout.splitlines()[0].split()[:2] == ["NAMESPACE", "SERVICE"]
    assert everywhere.stdout.splitlines()[1].startswith("default ")
