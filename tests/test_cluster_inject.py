"""Injection and exact restore against a real API server: both takeover shapes, a StatefulSet,
NetworkPolicies, and failures with real causes (admission, a rollout that never finishes,
RBAC, a concurrent writer), each leaving the workload as it was.

"As it was" is what the server returns, defaults included (``user_view``): the objects read
back before injection equal the ones read back after uninstall or after a failed start.
"""

from __future__ import annotations

import base64
import copy
import json
import ssl
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from e2e.cluster.api import APIError, wait_until
from e2e.cluster.pki import Authority
from tests.conftest import free_port
from tests.realcluster import (
    AGENT_IMAGE,
    ENFORCE_RESTRICTED,
    WAIT,
    RealCluster,
    app,
    deploy,
    intercept,
    no_trace_of_intercept,
    path,
    served_by,
    snapshot,
    start,
)


def kube(cluster: RealCluster, *args: str, kubeconfig: Path | None = None) -> list[str]:
    return [*args, "--kubeconfig", str(kubeconfig or cluster.kubeconfig)]


def error_line(output: str) -> str:
    """The one error line a failed command printed."""
    lines = [line for line in output.splitlines() if line.startswith("intercept: error: ")]
    assert len(lines) == 1, output
    return lines[0]


def test_numeric_target_port_of_a_statefulset_is_pointed_at_the_agent_and_put_back(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("ledger", ENFORCE_RESTRICTED)
    deploy(real_cluster, ns, app("ledger", 2, kind="StatefulSet", port_name=None)[:2])
    real_cluster.wait_ready(ns, "ledger", 2)
    before = snapshot(real_cluster, ns)

    port = free_port()
    client = start(real_cluster, ns, "ledger", port)
    try:
        ready = client.wait_for(r"^intercept: ready: (.*)$", timeout=WAIT)
        assert ready[1] == f"requests with x-dev: alice now reach localhost:{port} (2 replicas)"
        service = real_cluster.get("Service", ns, "ledger")
        assert service["spec"]["ports"][0]["targetPort"] == 9900  # the number now names the agent's port
        endpoints = real_cluster.wait_ready(ns, "ledger", 2)
        assert [e.pod for e in endpoints] == ["ledger-0", "ledger-1"] and {e.port for e in endpoints} == {9900}
        for endpoint in endpoints:
            assert served_by(endpoint, {"x-dev": "alice"}) == "local"
            assert served_by(endpoint) == f"cluster/{endpoint.pod}"
    finally:
        client.stop()

    result = intercept("uninstall", "ledger", *kube(real_cluster, "-n", ns))
    assert result.returncode == 0, result.stdout + result.stderr
    after = snapshot(real_cluster, ns)
    assert after == before
    no_trace_of_intercept(after)
    assert {e.port for e in real_cluster.wait_ready(ns, "ledger", 2)} == {8080}


def test_no_policy_changes_refuses_a_policy_that_would_cut_the_agent_off_and_changes_nothing(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("guarded")
    deploy(real_cluster, ns, app("guarded", 1))
    real_cluster.wait_ready(ns, "guarded", 1)
    before = snapshot(real_cluster, ns)

    client = start(real_cluster, ns, "guarded", free_port(), "--no-policy-changes")
    code = client.finish(WAIT)
    assert code == 10, client.output
    line = error_line(client.output)
    assert "NetworkPolicy/guarded" in line and "--no-policy-changes" in line, line
    assert snapshot(real_cluster, ns) == before


def test_uninstall_all_restores_every_injected_workload_of_the_namespace(real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("shop")
    deploy(real_cluster, ns, app("cart", 1) + app("stock", 2, port_name=None) + app("till", 1, kind="StatefulSet"))
    for name, count in (("cart", 1), ("stock", 2), ("till", 1)):
        real_cluster.wait_ready(ns, name, count)
    before = snapshot(real_cluster, ns)

    for service in ("cart", "stock", "till"):  # the agent added, then the pod's environment read through it
        result = intercept("inject", service, "--agent-image", AGENT_IMAGE, *kube(real_cluster, "-n", ns))
        assert result.returncode == 0, result.stdout + result.stderr
        result = intercept("env", service, "-o", "json", *kube(real_cluster, "-n", ns))
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["GREETING"] == "hello"
    injected = snapshot(real_cluster, ns)
    assert {name for kind, name in injected if kind == "Secret"} >= {"intercept-cart", "intercept-stock", "intercept-till"}

    result = intercept("uninstall", "--all", *kube(real_cluster, "-n", ns))
    assert result.returncode == 0, result.stdout + result.stderr
    after = snapshot(real_cluster, ns)
    assert after == before
    no_trace_of_intercept(after)
    again = intercept("uninstall", "--all", *kube(real_cluster, "-n", ns))  # idempotent
    assert again.returncode == 0, again.stdout + again.stderr
    assert snapshot(real_cluster, ns) == before


# --------------------------------------------------------------------------- failures with real causes


def test_a_validating_admission_policy_that_refuses_the_agent_leaves_everything_as_it_was(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("strict")
    deploy(real_cluster, ns, app("strict", 1))
    real_cluster.wait_ready(ns, "strict", 1)
    name = f"no-sidecars-{ns}"
    real_cluster.create({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {"failurePolicy": "Fail",
                 "matchConstraints": {"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
                                                         "operations": ["CREATE", "UPDATE"],
                                                         "resources": ["deployments"]}]},
                 "validations": [{"expression": "!object.spec.template.spec.containers.exists(c, c.name == 'intercept-agent')",
                                  "message": "sidecars are not allowed in this namespace"}]}})
    real_cluster.create({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}})
    try:
        _wait_policy_enforced(real_cluster, ns, "strict")
        before = snapshot(real_cluster, ns)

        client = start(real_cluster, ns, "strict", free_port())
        code = client.finish(WAIT)
        assert code == 10, client.output
        line = error_line(client.output)
        assert "sidecars are not allowed in this namespace" in line, line
        assert "put back NetworkPolicy/strict" in line and "nothing was left half-injected" in line, line
        assert snapshot(real_cluster, ns) == before
        no_trace_of_intercept(snapshot(real_cluster, ns))
    finally:
        real_cluster.delete("ValidatingAdmissionPolicyBinding", None, name)
        real_cluster.delete("ValidatingAdmissionPolicy", None, name)


def _wait_policy_enforced(cluster: RealCluster, ns: str, name: str) -> None:
    """Until a dry-run update adding an agent container is refused (policies take effect asynchronously)."""
    deployment = cluster.get("Deployment", ns, name)
    probe = copy.deepcopy(deployment)
    probe["spec"]["template"]["spec"]["containers"].append({"name": "intercept-agent", "image": "x"})

    def refused() -> bool:
        try:
            cluster.api.request("PUT", path("Deployment", ns, name) + "?dryRun=All", probe)
            return False
        except APIError as error:
            return error.status in (400, 403, 422)

    wait_until(refused, "the ValidatingAdmissionPolicy to be enforced", WAIT)


@pytest.mark.parametrize(("image", "expected"), [
    ("intercept.test/sleep:1", "did not finish within 10s"),  # runs, never ready
    ("registry.invalid/agent:1", "ErrImagePull"),  # never pulled: fails at once, with the kubelet's events
    ("intercept.test/crash:1", "CrashLoopBackOff"),  # exits at once, restarted with a back-off
])
def test_an_agent_that_never_becomes_ready_is_rolled_back(real_cluster: RealCluster, namespace_of,
                                                          image: str, expected: str) -> None:
    ns = namespace_of("stuck", ENFORCE_RESTRICTED)
    deploy(real_cluster, ns, app("stuck", 2))
    real_cluster.wait_ready(ns, "stuck", 2)
    before = snapshot(real_cluster, ns)

    client = start(real_cluster, ns, "stuck", free_port(), "--timeout", "10", image=image)
    code = client.finish(WAIT)
    assert code == 10, client.output
    line = error_line(client.output)
    assert expected in line and "nothing was left half-injected" in line, line
    if "ImagePull" in expected:
        assert "Failed to pull image" in line, line  # the pod's events, from the kubelet
    assert snapshot(real_cluster, ns) == before
    endpoints = real_cluster.wait_ready(ns, "stuck", 2)  # the app keeps serving
    assert {served_by(e) for e in endpoints} == {f"cluster/{e.pod}" for e in endpoints}


def test_an_agent_image_that_does_not_exist_is_named_with_the_build_and_push_command_and_the_flag(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("unpublished", ENFORCE_RESTRICTED)
    deploy(real_cluster, ns, app("unpublished", 1))
    real_cluster.wait_ready(ns, "unpublished", 1)
    before = snapshot(real_cluster, ns)
    image = "ghcr.intercept.invalid/agent:0.0.0"  # as a registry nobody published it to: the pull fails

    client = start(real_cluster, ns, "unpublished", free_port(), image=image)
    code = client.finish(WAIT)
    assert code == 10, client.output
    line = error_line(client.output)
    assert f"the agent image {image} could not be pulled" in line, line
    assert f"docker build -f agent_image/Dockerfile -t {image} . && docker push {image}" in line, line
    assert "--agent-image IMAGE" in line and "INTERCEPT_AGENT_IMAGE" in line, line
    assert "nothing was left half-injected" in line, line  # the rollback stays as it was
    assert snapshot(real_cluster, ns) == before


def test_a_user_who_may_not_update_deployments_gets_exit_11_naming_the_verb_and_resource(
    real_cluster: RealCluster, namespace_of, tmp_path: Path
) -> None:
    ns = namespace_of("rbac")
    deploy(real_cluster, ns, app("rbac", 1)[:2])
    real_cluster.wait_ready(ns, "rbac", 1)
    user = f"dev-{uuid.uuid4().hex[:6]}"
    read = ["get", "list", "watch"]
    real_cluster.create({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "developer"},
        "rules": [{"apiGroups": [""], "resources": ["pods", "services", "events"], "verbs": read},
                  {"apiGroups": [""], "resources": ["secrets"], "verbs": [*read, "create", "update", "delete"]},
                  {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "replicasets"], "verbs": read},
                  {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": read}]}, ns)
    real_cluster.create({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "developer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "developer"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}, ns)
    before = snapshot(real_cluster, ns)
    kubeconfig = real_cluster.kubeconfig_for(user, tmp_path, ns)

    client = start(real_cluster, ns, "rbac", free_port(), kubeconfig=kubeconfig)
    code = client.finish(WAIT)
    assert code == 11, client.output
    line = error_line(client.output)
    assert "update deployments" in line and "403" in line, line
    assert f"kubectl auth can-i update deployments -n {ns}" in line, line
    assert snapshot(real_cluster, ns) == before  # the Secret it created is gone again


def test_a_concurrent_edit_during_injection_is_retried_and_kept(real_cluster: RealCluster, namespace_of) -> None:
    """A validating webhook (served here) edits the Deployment while the API server admits our update.

    The API server then refuses our update with a real 409 Conflict (its resourceVersion
    is stale); intercept reads the Deployment again, keeps the other writer's change and
    writes again.
    """
    ns = namespace_of("busy")
    deploy(real_cluster, ns, app("busy", 1))
    real_cluster.wait_ready(ns, "busy", 1)
    edits: list[str] = []

    def admit(review: dict) -> None:
        request = review["request"]
        if request.get("dryRun"):
            return
        containers = request["object"]["spec"]["template"]["spec"]["containers"]
        if any(c["name"] == "intercept-agent" for c in containers):
            edits.append(request["object"]["metadata"]["resourceVersion"])
            if len(edits) == 1:  # someone else writes first
                real_cluster.patch("Deployment", ns, "busy", {"metadata": {"labels": {"edited-by": "someone-else"}}})

    with Webhook(real_cluster, ns, admit):
        port = free_port()
        client = start(real_cluster, ns, "busy", port)
        try:
            ready = client.wait_for(r"^intercept: ready: (.*)$", timeout=WAIT)
            assert ready[1] == f"requests with x-dev: alice now reach localhost:{port} (1 replica)"
        finally:
            client.stop()
    assert len(edits) >= 2 and edits[0] != edits[1], edits  # written again, from a fresh read
    deployment = real_cluster.get("Deployment", ns, "busy")
    assert deployment["metadata"]["labels"]["edited-by"] == "someone-else"
    assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == ["app", "intercept-agent"]


class Webhook:
    """A ValidatingWebhookConfiguration for Deployment updates in one namespace, served on loopback over TLS."""

    def __init__(self, cluster: RealCluster, namespace: str, admit) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.admit = admit
        self.name = f"busy-{namespace}"

    def __enter__(self) -> Webhook:
        authority = Authority(self.cluster.state / "pki", load=True)
        pair = authority.serving(f"webhook-{uuid.uuid4().hex[:6]}", ["127.0.0.1"])
        admit = self.admit
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen.append(review["request"]["uid"])
                admit(review)
                body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                   "response": {"uid": review["request"]["uid"], "allowed": True}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert, pair.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.cluster.api.post("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations", {
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": self.name},
            "webhooks": [{
                "name": "busy.intercept.test", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Fail", "timeoutSeconds": 10,
                "clientConfig": {"url": f"https://127.0.0.1:{self.server.server_address[1]}/validate",
                                 "caBundle": base64.b64encode(authority.cert.read_bytes()).decode()},
                "rules": [{"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["UPDATE"],
                           "resources": ["deployments"]}],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.namespace}},
            }]})
        self._wait_active()
        return self

    def _wait_active(self) -> None:
        """Until the API server calls the webhook (configurations take effect asynchronously): dry-run updates."""
        seen = self.seen

        def called() -> bool:
            deployment = self.cluster.items("Deployment", self.namespace)[0]
            deployment["metadata"].setdefault("labels", {})["probe"] = uuid.uuid4().hex[:8]
            before = len(seen)
            self.cluster.api.request("PUT", path("Deployment", self.namespace, deployment["metadata"]["name"])
                                     + "?dryRun=All", deployment)
            return len(seen) > before

        wait_until(called, "the webhook to be called", WAIT)

    def __exit__(self, *exc: object) -> None:
        self.cluster.api.delete(f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{self.name}")
        self.server.shutdown()
        self.server.server_close()
