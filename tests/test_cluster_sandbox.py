"""Sandboxes against the real control plane: forks created and waited for by the real
Deployment controller, their routes in a ConfigMap the agents mount, cleanup on failure,
delete, expiry and gc restoring an idle agent's workload exactly, run by hand or by the
CronJob of ``gc --install`` in the CLI image."""

from __future__ import annotations

import http.client
import itertools
import json
import subprocess

from e2e.cluster import images
from e2e.cluster.api import wait_until
from intercept.kube.image import DEFAULT_CLI_IMAGE
from tests.realcluster import (
    AGENT_IMAGE,
    ENFORCE_RESTRICTED,
    WAIT,
    RealCluster,
    app,
    deploy,
    intercept,
    snapshot,
)

SANDBOX = "intercept.dev/sandbox"
CLI_IMAGE = images.CLI  # agent_image/Dockerfile --target cli of this checkout


def where(cluster: RealCluster, ns: str) -> list[str]:
    return ["-n", ns, "--kubeconfig", str(cluster.kubeconfig)]


def sandbox_objects(cluster: RealCluster, ns: str, name: str) -> list[str]:
    return sorted(f"{kind}/{o['metadata']['name']}" for kind in ("Deployment", "Service")
                  for o in cluster.items(kind, ns, labelSelector=f"{SANDBOX}={name}"))


def routed_sandboxes(cluster: RealCluster, ns: str, workload: str) -> list[str]:
    if not cluster.exists("ConfigMap", ns, f"intercept-{workload}"):
        return []
    document = json.loads(cluster.get("ConfigMap", ns, f"intercept-{workload}")["data"]["routes.json"])
    return sorted({r["sandbox"] for r in document["routes"]})


def test_create_forks_waits_and_routes_then_delete_removes_everything(real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("sbx", ENFORCE_RESTRICTED)
    deploy(real_cluster, ns, app("web", 2))
    real_cluster.wait_ready(ns, "web", 2)
    created = intercept("sandbox", "create", "pr-1", "--fork", "web", "--ttl", "1h", "--agent-image", AGENT_IMAGE,
                        *where(real_cluster, ns), timeout=WAIT * 2)
    assert created.returncode == 0, created.stdout + created.stderr
    ready = [line for line in created.stdout.splitlines() if line.startswith("intercept: ready: ")]
    assert ready and "sandbox pr-1: requests with x-intercept-id: pr-1 (or baggage intercept-id=pr-1) reach web -> web-sbx-pr-1" in ready[0]
    # every agent pod took the push, signed by the routes authority whose key its ConfigMap gave it from the start
    assert "intercept: warning:" not in created.stdout, created.stdout
    assert real_cluster.exists("Secret", ns, "intercept.routes-authority")
    assert sandbox_objects(real_cluster, ns, "pr-1") == ["Deployment/web-sbx-pr-1", "Service/web-sbx-pr-1"]
    fork = real_cluster.get("Deployment", ns, "web-sbx-pr-1")
    assert (fork.get("status") or {}).get("readyReplicas") == 1
    assert real_cluster.get("Service", ns, "web-sbx-pr-1")["spec"]["clusterIP"] == "None"
    # the original Service never selects the fork
    assert {e.pod for e in real_cluster.endpoints(ns, "web")} == set(real_cluster.wait_ready_pods(ns, "app=web", 2))
    assert routed_sandboxes(real_cluster, ns, "web") == ["pr-1"]
    listed = json.loads(intercept("sandbox", "list", "-o", "json", *where(real_cluster, ns)).stdout)
    assert [(r["sandbox"], r["ready"], r["expired"]) for r in listed] == [("pr-1", True, False)]

    deleted = intercept("sandbox", "delete", "pr-1", *where(real_cluster, ns))
    assert deleted.returncode == 0 and "intercept: deleted: sandbox pr-1" in deleted.stdout, deleted.stdout + deleted.stderr
    assert sandbox_objects(real_cluster, ns, "pr-1") == [] and routed_sandboxes(real_cluster, ns, "web") == []
    assert "intercept: warning:" not in deleted.stdout, deleted.stdout
    again = intercept("sandbox", "delete", "pr-1", *where(real_cluster, ns))
    assert again.returncode == 0 and "nothing was left" in again.stdout


def test_a_fork_that_never_becomes_ready_leaves_nothing_behind(real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("sbxfail")
    deploy(real_cluster, ns, app("web", 1))
    real_cluster.wait_ready(ns, "web", 1)
    failed = intercept("sandbox", "create", "bad", "--fork", "web", "--image", "registry.invalid/web:pr-1", "--timeout", "60",
                       "--agent-image", AGENT_IMAGE, *where(real_cluster, ns), timeout=WAIT * 2)
    assert failed.returncode == 10, failed.stdout + failed.stderr
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("intercept: error: sandbox bad: a fork did not become ready") and "registry.invalid/web:pr-1" in error
    assert sandbox_objects(real_cluster, ns, "bad") == [] and routed_sandboxes(real_cluster, ns, "web") == []


def test_an_agent_that_cannot_be_injected_leaves_no_routes_configmap_or_authority_behind(
        real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("sbxnoagent")
    deploy(real_cluster, ns, app("web", 1))
    real_cluster.wait_ready(ns, "web", 1)
    before = snapshot(real_cluster, ns)
    failed = intercept("sandbox", "create", "pr-2", "--fork", "web", "--timeout", "60", "--agent-image",
                       "registry.invalid/agent:1", *where(real_cluster, ns), timeout=WAIT * 2)
    assert failed.returncode == 10, failed.stdout + failed.stderr
    real_cluster.wait_ready(ns, "web", 1)
    assert snapshot(real_cluster, ns) == before  # no routes authority Secret either
    assert not real_cluster.exists("ConfigMap", ns, "intercept-web")


def test_gc_removes_an_expired_sandbox_then_the_idle_agent_and_dry_run_changes_nothing(
        real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("gc")
    deploy(real_cluster, ns, app("web", 1))
    real_cluster.wait_ready(ns, "web", 1)
    before = snapshot(real_cluster, ns)
    created = intercept("sandbox", "create", "short", "--fork", "web", "--ttl", "3s", "--agent-image", AGENT_IMAGE,
                        *where(real_cluster, ns), timeout=WAIT * 2)
    assert created.returncode == 0, created.stdout + created.stderr
    wait_until(lambda: json.loads(intercept("sandbox", "list", "-o", "json", *where(real_cluster, ns)).stdout)[0]["expired"],
               "the sandbox's expiry", WAIT)

    state = {kind: snapshot(real_cluster, ns) for kind in ("before",)}
    dry = intercept("gc", "--dry-run", "--idle", "1", *where(real_cluster, ns))
    assert dry.returncode == 0 and "would remove 1 sandboxes" in dry.stdout, dry.stdout + dry.stderr
    assert snapshot(real_cluster, ns) == state["before"] and sandbox_objects(real_cluster, ns, "short")

    collected = intercept("gc", "--idle", "1", *where(real_cluster, ns), timeout=WAIT * 2)
    assert collected.returncode == 0 and f"{ns}/short" in collected.stdout, collected.stdout + collected.stderr
    assert sandbox_objects(real_cluster, ns, "short") == []

    def uninstalled() -> bool:
        out = intercept("gc", "--idle", "1", *where(real_cluster, ns), timeout=WAIT * 2)
        assert out.returncode == 0, out.stdout + out.stderr
        return f"{ns}/web" in out.stdout or not real_cluster.exists("Secret", ns, "intercept-web")

    wait_until(uninstalled, "gc uninstalling the idle agent", WAIT)
    real_cluster.wait_ready(ns, "web", 1)
    assert snapshot(real_cluster, ns) == before
    assert not real_cluster.exists("ConfigMap", ns, "intercept-web")


def call(cluster: RealCluster, ns: str, service: str, headers: dict[str, str] | None = None) -> tuple[str, str | None]:
    """One request to the Service's ClusterIP, as a client in the cluster sends it: (served by, downstream)."""
    ip = cluster.get("Service", ns, service)["spec"]["clusterIP"]
    conn = http.client.HTTPConnection(ip, 80, timeout=30)
    try:
        conn.request("GET", "/", headers=headers or {})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        return response.headers["X-Served-By"], response.headers.get("X-Downstream")
    finally:
        conn.close()


def _answers(cluster: RealCluster, ns: str, service: str) -> bool:
    """Whether the Service answers yet (its ClusterIP follows the endpoints within a second)."""
    try:
        call(cluster, ns, service)
        return True
    except (OSError, AssertionError, http.client.HTTPException):
        return False


def test_a_sandbox_of_two_services_serves_its_key_along_the_call_chain_until_it_expires(
        real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("chain")
    front = app("front", 1)
    front[0]["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "DOWNSTREAM", "value": "http://back/"})
    deploy(real_cluster, ns, front + app("back", 1))
    real_cluster.wait_ready(ns, "front", 1)
    real_cluster.wait_ready(ns, "back", 1)
    wait_until(lambda: _answers(real_cluster, ns, "front"), "front calling back through its Service", WAIT)
    assert [s.split("/")[0] for s in call(real_cluster, ns, "front")] == ["cluster", "cluster"]

    created = intercept("sandbox", "create", "pr-7", "--fork", "front", "--fork", "back", "--image",
                        "intercept.test/sample-v2:1", "--agent-image", AGENT_IMAGE, *where(real_cluster, ns), timeout=WAIT * 3)
    assert created.returncode == 0, created.stdout + created.stderr
    # The injections replaced front's and back's pods: calls through the Services work again once the
    # ClusterIPs follow the new endpoints (kube-proxy's lag; the old pods exit at once on SIGTERM).
    wait_until(lambda: _answers(real_cluster, ns, "front"), "front calling back through its Service again", WAIT)
    for key in ({"x-intercept-id": "pr-7"}, {"baggage": "team=shop,intercept-id=pr-7"}):
        served, downstream = call(real_cluster, ns, "front", key)
        assert served.startswith("v2/front-sbx-pr-7-") and downstream.startswith("v2/back-sbx-pr-7-"), (key, served, downstream)
    served, downstream = call(real_cluster, ns, "front", {"x-intercept-id": "someone-else"})
    assert served.startswith("cluster/front-") and downstream.startswith("cluster/back-")

    # a short lifetime: the agents stop routing at the deadline by themselves
    extended = intercept("sandbox", "extend", "pr-7", "--ttl", "3s", *where(real_cluster, ns))
    assert extended.returncode == 0 and "intercept: extended: sandbox pr-7 lives until" in extended.stdout, extended.stderr
    wait_until(lambda: call(real_cluster, ns, "front", {"x-intercept-id": "pr-7"})[0].startswith("cluster/front-"),
               "the sandbox's routes ending at its expiry", WAIT)
    assert call(real_cluster, ns, "front", {"x-intercept-id": "pr-7"})[1].startswith("cluster/back-")


def allowed(cluster: RealCluster, ns: str, user: str, verb: str, resource: str, group: str = "") -> bool:
    """What the API server's authorizer answers for ``user`` (a SubjectAccessReview, as kubectl auth can-i --as)."""
    review = cluster.api.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "resourceAttributes": {"namespace": ns, "verb": verb, "group": group, "resource": resource}}})
    return bool(review["status"].get("allowed"))


def test_gc_install_writes_a_cronjob_whose_role_is_enough_to_collect_and_no_more(
        real_cluster: RealCluster, namespace_of, tmp_path) -> None:
    ns = namespace_of("gcinstall", ENFORCE_RESTRICTED)

    def job_container() -> dict:
        return real_cluster.get("CronJob", ns, "intercept-gc")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]

    installed = intercept("gc", "--install", *where(real_cluster, ns))
    assert installed.returncode == 0 and "intercept: warning:" not in installed.stdout, installed.stdout + installed.stderr
    assert [line.split()[3] for line in installed.stdout.splitlines()] == [
        "ServiceAccount/intercept-gc", "Role/intercept-gc", "RoleBinding/intercept-gc", "CronJob/intercept-gc"]
    assert job_container()["image"] == DEFAULT_CLI_IMAGE and job_container()["command"][:4] == ["intercept", "gc", "-n", ns]
    # --agent-image named the Job's image before --image did: it still does, and says what to use instead
    again = intercept("gc", "--install", "--agent-image", AGENT_IMAGE, *where(real_cluster, ns))
    assert again.returncode == 0 and again.stdout.count("updated ") == 4, again.stdout + again.stderr  # idempotent
    assert job_container()["image"] == AGENT_IMAGE
    warning = next(line for line in again.stdout.splitlines() if line.startswith("intercept: warning: "))
    assert f"runs {AGENT_IMAGE}, the agent image (--agent-image)" in warning and "with --image" in warning, warning
    named = intercept("gc", "--install", "--image", CLI_IMAGE, "--agent-image", AGENT_IMAGE, *where(real_cluster, ns))
    assert named.returncode == 0 and "intercept: warning:" not in named.stdout, named.stdout + named.stderr
    assert job_container()["image"] == CLI_IMAGE
    alone = intercept("gc", "--image", CLI_IMAGE, *where(real_cluster, ns))
    assert alone.returncode == 2 and "--image names the image of gc's CronJob: pass it with --install" in alone.stderr

    # A user with only the CronJob's Role (and, since it runs outside the cluster where the
    # CronJob dials pod IPs, port-forward) collects an expired sandbox, then the idle agent.
    deploy(real_cluster, ns, app("web", 1))
    real_cluster.wait_ready(ns, "web", 1)
    before = snapshot(real_cluster, ns)
    created = intercept("sandbox", "create", "old", "--fork", "web", "--ttl", "2s", "--agent-image", AGENT_IMAGE,
                        *where(real_cluster, ns), timeout=WAIT * 2)
    assert created.returncode == 0, created.stdout + created.stderr
    real_cluster.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "port-forward"},
                         "rules": [{"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]}]}, ns)
    for role in ("intercept-gc", "port-forward"):
        real_cluster.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                             "metadata": {"name": f"gc-tester-{role}"},
                             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
                             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "gc-tester"}]}, ns)
    kubeconfig = real_cluster.kubeconfig_for("gc-tester", tmp_path, ns)
    wait_until(lambda: json.loads(intercept("sandbox", "list", "-o", "json", *where(real_cluster, ns)).stdout)[0]["expired"],
               "the sandbox's expiry", WAIT)
    collected = intercept("gc", "--idle", "24h", "-n", ns, "--kubeconfig", str(kubeconfig), timeout=WAIT * 2)
    assert collected.returncode == 0 and f"{ns}/old" in collected.stdout, collected.stdout + collected.stderr
    assert "intercept: warning:" not in collected.stdout, collected.stdout  # its push too: it may read the routes authority
    assert sandbox_objects(real_cluster, ns, "old") == []

    def uninstalled() -> bool:
        out = intercept("gc", "--idle", "1", "-n", ns, "--kubeconfig", str(kubeconfig), timeout=WAIT * 2)
        assert out.returncode == 0, out.stdout + out.stderr
        return f"{ns}/web" in out.stdout

    wait_until(uninstalled, "gc uninstalling the idle agent", WAIT)
    real_cluster.wait_ready(ns, "web", 1)
    assert snapshot(real_cluster, ns) == before  # the agent's Secret and the routes authority included

    # ... and no more: what collection never does, the Role does not grant
    for verb, resource, group in (("list", "secrets", ""), ("watch", "secrets", ""), ("create", "secrets", ""),
                                  ("update", "secrets", ""), ("create", "configmaps", ""), ("create", "services", ""),
                                  ("create", "deployments", "apps"), ("delete", "statefulsets", "apps"),
                                  ("delete", "replicasets", "apps"), ("get", "pods", ""),
                                  ("delete", "networkpolicies", "networking.k8s.io")):
        assert not allowed(real_cluster, ns, "gc-tester", verb, resource, group), (verb, resource)


def run_now(cluster: RealCluster, ns: str, job: str) -> str:
    """Run gc's CronJob at once (``kubectl create job JOB --from=cronjob/intercept-gc``), wait for
    the Job to succeed, and return its pod's log; fail with the log if the container fails."""
    made = subprocess.run([str(cluster.kubectl), "--kubeconfig", str(cluster.kubeconfig), "-n", ns, "create", "job",
                           job, "--from=cronjob/intercept-gc"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stdout + made.stderr

    def ended() -> tuple[int, str] | None:
        """The exit code and log of the Job's container once it has ended (a failed one is restarted)."""
        for pod in cluster.pods(ns, f"job-name={job}"):
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                for state, previous in ((status.get("state"), "false"), (status.get("lastState"), "true")):
                    if (state or {}).get("terminated"):
                        log = cluster.api.text(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/log"
                                               f"?previous={previous}")
                        return state["terminated"]["exitCode"], log
        return None

    code, log = wait_until(ended, f"Job {job}'s container to end", WAIT)
    assert code == 0, log
    wait_until(lambda: (cluster.get("Job", ns, job).get("status") or {}).get("succeeded"), f"Job {job} to succeed", WAIT)
    return log


def test_the_installed_cronjob_collects_an_expired_sandbox_then_the_idle_agent_in_the_cluster(
        real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("gcjob", ENFORCE_RESTRICTED)
    deploy(real_cluster, ns, app("web", 1))
    real_cluster.wait_ready(ns, "web", 1)
    installed = intercept("gc", "--install", "--image", CLI_IMAGE, "--idle", "1", *where(real_cluster, ns))
    assert installed.returncode == 0 and "intercept: warning:" not in installed.stdout, installed.stdout + installed.stderr
    before = snapshot(real_cluster, ns)
    created = intercept("sandbox", "create", "old", "--fork", "web", "--ttl", "2s", "--agent-image", AGENT_IMAGE,
                        *where(real_cluster, ns), timeout=WAIT * 2)
    assert created.returncode == 0, created.stdout + created.stderr
    wait_until(lambda: json.loads(intercept("sandbox", "list", "-o", "json", *where(real_cluster, ns)).stdout)[0]["expired"],
               "the sandbox's expiry", WAIT)

    # In the pod: the service account's token, the API server through the kubernetes Service, the agent at its pod IP.
    log = run_now(real_cluster, ns, "gc-now-1")
    assert "intercept: gc: removed 1 sandboxes" in log and f"({ns}/old" in log, log
    assert "intercept: warning:" not in log, log  # the pushed routes reached the agent
    assert sandbox_objects(real_cluster, ns, "old") == [] and routed_sandboxes(real_cluster, ns, "web") == []

    jobs = (f"gc-now-{n}" for n in itertools.count(2))
    wait_until(lambda: not real_cluster.exists("Secret", ns, "intercept-web")
               or f"{ns}/web" in run_now(real_cluster, ns, next(jobs)), "a run of the CronJob uninstalling the idle agent",
               WAIT * 2)
    real_cluster.wait_ready(ns, "web", 1)
    assert snapshot(real_cluster, ns) == before  # the agent's Secret and the routes authority included
    assert not real_cluster.exists("ConfigMap", ns, "intercept-web")
