"""``intercept doctor`` against the real control plane: all checks passing once, then each of
RBAC, Pod Security and NetworkPolicies failing for a real cause (a denied verb, a namespace
that enforces "restricted" on pods that do not meet it, a policy that would cut the agent off).

Every line is ``intercept: doctor: NAME: ok|failed|skipped: ...``; the exit status is 0 only
when no check failed (12 otherwise). Nothing is changed in the cluster.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from tests.conftest import free_port
from tests.realcluster import (
    AGENT_IMAGE,
    ENFORCE_RESTRICTED,
    RealCluster,
    app,
    deploy,
    intercept,
    snapshot,
)
from intercept.kube.doctor import NEEDED


def doctor(cluster: RealCluster, namespace: str, *args: str, kubeconfig: Path | None = None,
           env: dict[str, str] | None = None) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Run ``intercept doctor``: its exit status, {check: (status, text)} and the whole output."""
    result = intercept("doctor", *args, "-n", namespace, "--kubeconfig", str(kubeconfig or cluster.kubeconfig), env=env)
    checks = {}
    for line in result.stdout.splitlines():
        m = re.match(r"^intercept: doctor: ([a-z ]+): (ok|failed|skipped): (.*)$", line)
        if m:
            checks[m[1]] = (m[2], m[3])
    return result.returncode, checks, result.stdout + result.stderr


NAMES = ["cluster", "rbac", "agent image", "pod security", "network policies", "protocol", "cluster names"]


def test_every_check_passes_for_a_restricted_http_service_with_a_policy_the_injection_extends(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("healthy", ENFORCE_RESTRICTED)
    deploy(real_cluster, ns, app("healthy", 1))
    real_cluster.wait_ready(ns, "healthy", 1)
    before = snapshot(real_cluster, ns)

    code, checks, output = doctor(real_cluster, ns, "healthy", "--agent-image", AGENT_IMAGE)
    assert code == 0, output
    assert list(checks) == NAMES and {status for status, _ in checks.values()} == {"ok"}, output
    assert f"namespace {ns}" in checks["cluster"][1] and "(context " in checks["cluster"][1]
    assert f"all {len(NEEDED)} things" in checks["rbac"][1]
    assert checks["agent image"][1].startswith(f"{AGENT_IMAGE} (from --agent-image)")
    assert "enforces Pod Security 'restricted'" in checks["pod security"][1] and "dry run" in checks["pod security"][1]
    assert "NetworkPolicy/healthy" in checks["network policies"][1] and "extends" in checks["network policies"][1]
    protocol = checks["protocol"][1]
    assert re.match(r"pod healthy-\S+ port 8080 \(container app, probed through a port-forward\) speaks HTTP/1\.1 "
                    r"\(GET / answered 'HTTP/1\.[01] 200 OK'\): routed by header$", protocol), protocol
    assert output.rstrip().endswith(f"intercept: doctor: all {len(NAMES)} checks passed")
    assert snapshot(real_cluster, ns) == before  # looked, changed nothing


def test_a_verb_the_user_may_not_use_fails_rbac_naming_it(real_cluster: RealCluster, namespace_of, tmp_path: Path) -> None:
    ns = namespace_of("denied")
    deploy(real_cluster, ns, app("denied", 1)[:2])
    real_cluster.wait_ready(ns, "denied", 1)
    user = f"dev-{uuid.uuid4().hex[:6]}"
    rules: dict[tuple[str, str], set[str]] = {}
    for access in NEEDED:
        resource = access.plural + (f"/{access.subresource}" if access.subresource else "")
        rules.setdefault((access.group, resource), set()).add(access.verb)
    rules[("apps", "deployments")].discard("update")  # the one thing this developer may not do
    rules[("", "pods")].add("create")  # so that the doctor may dry-run a pod
    real_cluster.create({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "almost"},
        "rules": [{"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
                  for (group, resource), verbs in sorted(rules.items())]}, ns)
    real_cluster.create({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "almost"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "almost"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}, ns)
    kubeconfig = real_cluster.kubeconfig_for(user, tmp_path, ns)

    code, checks, output = doctor(real_cluster, ns, "denied", kubeconfig=kubeconfig,
                                  env={"INTERCEPT_AGENT_IMAGE": AGENT_IMAGE})
    assert code == 12, output
    assert checks["rbac"] == ("failed", f"may not update deployments in namespace {ns}; fix: ask your cluster admin "
                                        f"for a Role with these verbs in {ns} (check one with: kubectl auth can-i "
                                        f"update deployments -n {ns})"), output
    assert checks["agent image"][1].startswith(f"{AGENT_IMAGE} (from INTERCEPT_AGENT_IMAGE)"), output
    assert [name for name, (status, _) in checks.items() if status != "ok"] == ["rbac"], output
    assert "unknown (may not read the namespace)" in checks["pod security"][1]  # the dry run still decides
    assert output.rstrip().endswith("1 of 7 checks failed (rbac)")


def test_a_namespace_that_enforces_restricted_on_pods_that_do_not_meet_it_fails_pod_security(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("tightened")
    workload, service, _ = app("legacy", 1)
    workload["spec"]["template"]["spec"]["containers"][0].pop("securityContext")  # admitted while nothing was enforced
    deploy(real_cluster, ns, [workload, service])
    real_cluster.wait_ready(ns, "legacy", 1)
    real_cluster.patch("Namespace", None, ns, {"metadata": {"labels": ENFORCE_RESTRICTED}})  # enforced from now on

    code, checks, output = doctor(real_cluster, ns, "legacy", "--agent-image", AGENT_IMAGE)
    assert code == 12, output
    status, text = checks["pod security"]
    assert status == "failed", output
    assert text.startswith(f"namespace {ns} enforces Pod Security 'restricted', and the pods of Deployment/legacy as "
                           "injected would be refused: "), text
    assert 'violates PodSecurity "restricted:latest"' in text and 'container "app"' in text, text
    assert "make Deployment/legacy's pods meet that level" in text
    assert [name for name, (s, _) in checks.items() if s != "ok"] == ["pod security"], output


def test_a_policy_that_would_cut_the_agent_off_fails_when_policy_changes_are_forbidden(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("fenced")
    deploy(real_cluster, ns, app("fenced", 1))
    real_cluster.wait_ready(ns, "fenced", 1)

    code, checks, output = doctor(real_cluster, ns, "fenced", "--agent-image", AGENT_IMAGE, "--no-policy-changes")
    assert code == 12, output
    assert checks["network policies"] == (
        "failed", "NetworkPolicy/fenced admit(s) the app's port but not the agent's (9900), and --no-policy-changes "
                  "forbids extending them: the Service's traffic would not reach the agent; fix: add port 9900 "
                  "wherever they admit the app's port, or drop --no-policy-changes"), output
    assert [name for name, (s, _) in checks.items() if s != "ok"] == ["network policies"], output


def test_without_an_agent_image_or_a_service_the_default_image_fails_and_the_service_checks_are_skipped(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("fresh")
    code, checks, output = doctor(real_cluster, ns)
    assert code == 12, output
    status, text = checks["agent image"]
    assert status == "failed" and "none configured" in text, text
    assert "docker build -f agent_image/Dockerfile -t ghcr.io/intercept-dev/agent:" in text, text
    assert checks["network policies"][0] == checks["protocol"][0] == "skipped"


def test_a_namespace_that_does_not_exist_fails_the_cluster_check_and_skips_the_rest(real_cluster: RealCluster) -> None:
    missing = f"typo-{uuid.uuid4().hex[:6]}"
    code, checks, output = doctor(real_cluster, missing, "--agent-image", AGENT_IMAGE)
    assert code == 12, output
    status, text = checks["cluster"]
    assert status == "failed" and text.endswith(
        f" answers, but namespace {missing} does not exist; "
        "fix: pick the namespace with -n NAMESPACE (kubectl get namespaces lists them)"), output
    assert {status for name, (status, _) in checks.items() if name not in ("cluster", "cluster names")} == {"skipped"}, output


def test_a_service_port_nothing_listens_on_fails_protocol_with_the_kubelets_connection_refused(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("deaf")
    workload, service, _ = app("deaf", 1)
    workload["spec"]["template"]["spec"]["containers"][0]["ports"].append({"containerPort": 9999, "name": "admin"})
    service["spec"]["ports"][0]["targetPort"] = "admin"  # declared, but the app listens on 8080 only
    deploy(real_cluster, ns, [workload, service])
    real_cluster.wait_ready(ns, "deaf", 1)  # ready: its readiness probe asks 8080

    code, checks, output = doctor(real_cluster, ns, "deaf", "--agent-image", AGENT_IMAGE)
    assert code == 12, output
    status, text = checks["protocol"]
    assert status == "failed", output
    assert re.match(r"could not probe pod deaf-\S+ port 9999 \(container app, probed through a port-forward\): "
                    r".*(connection refused|failed to connect to localhost:9999).*; fix: check that the pod runs and its app "
                    r"listens on that port$", text), text
    assert [name for name, (s, _) in checks.items() if s != "ok"] == ["protocol"], output


def test_doctor_judges_what_a_start_would_do_where_an_agent_runs_already(real_cluster: RealCluster, namespace_of,
                                                                        tmp_path: Path) -> None:
    """doctor and start agree: with the agent in place, doctor reports the image it runs (which a
    start uses), and an intercept.yaml naming another image fails the check, as start refuses it."""
    ns = namespace_of("agree")
    deploy(real_cluster, ns, app("agree", 1))
    real_cluster.wait_ready(ns, "agree", 1)
    kube = ["-n", ns, "--kubeconfig", str(real_cluster.kubeconfig)]
    assert intercept("inject", "agree", *kube, "--agent-image", AGENT_IMAGE).returncode == 0

    _, checks, output = doctor(real_cluster, ns, "agree", "-f", str(tmp_path / "none.yaml"))
    assert checks["agent image"] == ("ok", f"{AGENT_IMAGE}: the agent of agree runs it already, and a start uses it"), output

    spec = tmp_path / "intercept.yaml"
    spec.write_text("version: 1\nagent_image: intercept.test/agent:other\nintercepts:\n  - service: agree\n")
    code, checks, output = doctor(real_cluster, ns, "agree", "-f", str(spec))
    assert code == 12, output
    status, message = checks["agent image"]
    assert status == "failed" and message.startswith(f"the agent of agree runs {AGENT_IMAGE}, and intercept.test/agent:other")
    started = intercept("start", "agree", *kube, "--agent-image", "intercept.test/agent:other", "--port", str(free_port()))
    assert started.returncode == 13, started.stdout + started.stderr  # start refuses what doctor failed
