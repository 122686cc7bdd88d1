"""One agent configuration per workload, shared by every developer, on the real cluster.

A start, ``env``, ``files`` or a start with other flags never rolls the pods: what is
pod-wide (the image, outbound access, forwarded headers) is the running agent's, and
asking for something else is refused, naming the difference, who the agent serves and
the explicit fix (``intercept inject SERVICE ...``), which says whom it interrupts.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Proc, free_port
from tests.realcluster import AGENT_IMAGE, WAIT, RealCluster, app, deploy, intercept, start


def _generation(cluster: RealCluster, ns: str, name: str) -> int:
    return int(cluster.get("Deployment", ns, name)["metadata"]["generation"])


def _agent_env(cluster: RealCluster, ns: str, name: str) -> dict[str, str]:
    pod = cluster.get("Deployment", ns, name)["spec"]["template"]["spec"]
    agent = next(c for c in pod["containers"] if c["name"] == "intercept-agent")
    return {e["name"]: e.get("value", "") for e in agent.get("env") or []}


def test_a_start_never_rolls_the_pods_and_asking_other_pod_wide_settings_is_refused_naming_who_it_serves(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("cart")
    deploy(real_cluster, ns, app("cart", 2))
    real_cluster.wait_ready(ns, "cart", 2)
    kube = ["-n", ns, "--kubeconfig", str(real_cluster.kubeconfig)]
    clients: list[Proc] = []
    try:
        for name in ("alice", "bob"):
            clients.append(start(real_cluster, ns, "cart", free_port(), name=name, header=f"x-dev={name}"))
            clients[-1].wait_for(r"^intercept: ready: ", timeout=WAIT)
        generation = _generation(real_cluster, ns, "cart")

        # carol narrows her own fence: her session's, not the agent's; nothing rolls
        carol = start(real_cluster, ns, "cart", free_port(), "--outbound-deny", "*.internal", name="carol",
                      header="x-dev=carol")
        clients.append(carol)
        carol.wait_for(r"^intercept: ready: ", timeout=WAIT)
        assert any("(fence: deny *.internal)" in line for line in carol.lines), carol.output
        assert _generation(real_cluster, ns, "cart") == generation  # the pods were not replaced
        assert "INTERCEPT_OUTBOUND_DENY" not in _agent_env(real_cluster, ns, "cart")

        # frank names no image: the running agent's is used (not the default, which would roll the pods)
        frank = start(real_cluster, ns, "cart", free_port(), name="frank", header="x-dev=frank", image=None,
                      env={"INTERCEPT_AGENT_IMAGE": ""})
        clients.append(frank)
        frank.wait_for(r"^intercept: ready: ", timeout=WAIT)

        # dave asks for what only the whole workload can have: refused, and nothing changes
        for asked, said in (
            (["--no-forwarded-headers"], "--no-forwarded-headers: the agent has forwarded headers, not --no-forwarded-headers"),
            (["--agent-image", "intercept.test/agent:other"],
             f"--agent-image: the agent has {AGENT_IMAGE}, not intercept.test/agent:other"),
        ):
            refused = intercept("start", "cart", *kube, "--header", "x-dev=dave", "--name", "dave", "--port",
                                str(free_port()), *asked, env={"INTERCEPT_AGENT_IMAGE": ""})
            assert refused.returncode == 13, refused.stdout + refused.stderr
            [line] = [x for x in refused.stderr.splitlines() if x.startswith("intercept: error: ")]
            assert said in line
            assert "it serves alice, bob, carol, frank now" in line
            assert f"intercept inject cart -n {ns} {' '.join(asked)}" in line
        assert _generation(real_cluster, ns, "cart") == generation
        for client in clients:
            assert client.p.poll() is None, client.output
    finally:
        for client in clients:
            client.stop()


def test_env_and_files_never_inject_and_never_roll(real_cluster: RealCluster, namespace_of, tmp_path: Path) -> None:
    ns = namespace_of("menu")
    deploy(real_cluster, ns, app("menu", 1))
    real_cluster.wait_ready(ns, "menu", 1)
    kube = ["-n", ns, "--kubeconfig", str(real_cluster.kubeconfig), "--agent-image", AGENT_IMAGE]
    generation = _generation(real_cluster, ns, "menu")
    for command in (["env", "menu"], ["files", "menu", "--to", str(tmp_path / "files")]):
        refused = intercept(*command, *kube)
        assert refused.returncode == 14, refused.stdout + refused.stderr
        assert refused.stderr.strip() == (
            f"intercept: error: Service menu in namespace {ns} has no agent (Deployment/menu runs none), and this "
            f"command does not add one: add it with intercept inject menu -n {ns} (or intercept start menu -n {ns}, "
            "which adds it)")
    assert _generation(real_cluster, ns, "menu") == generation  # nothing was injected

    added = intercept("inject", "menu", *kube)
    assert added.returncode == 0, added.stdout + added.stderr
    assert added.stdout.splitlines()[-1] == (
        f"intercept: injected: Deployment/menu runs the agent {AGENT_IMAGE} as asked (namespace {ns})")
    generation = _generation(real_cluster, ns, "menu")
    env = intercept("env", "menu", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig), "-o", "json")
    assert env.returncode == 0, env.stdout + env.stderr
    assert json.loads(env.stdout)["GREETING"] == "hello"
    assert _generation(real_cluster, ns, "menu") == generation  # the default image named nowhere: no roll


def test_an_explicit_inject_changes_the_fence_for_everyone_saying_whom_it_interrupts(
    real_cluster: RealCluster, namespace_of, tmp_path: Path
) -> None:
    ns = namespace_of("vault")
    deploy(real_cluster, ns, app("vault", 1))
    real_cluster.wait_ready(ns, "vault", 1)
    state = {"INTERCEPT_STATE_DIR": str(tmp_path / "state")}
    alice = start(real_cluster, ns, "vault", free_port(), env=state)

    def fence_in_status() -> str:
        (row,) = json.loads(intercept("status", "-o", "json", env=state).stdout)
        return row["fence"]

    try:
        alice.wait_for(r"^intercept: ready: ", timeout=WAIT)
        assert fence_in_status() == "everything"
        mark = len(alice.lines)
        changed = intercept("inject", "vault", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig),
                            "--outbound-deny", "*.internal")
        assert changed.returncode == 0, changed.stdout + changed.stderr
        assert (f"intercept: progress: Deployment/vault: changing the agent for everyone (--outbound-deny none -> "
                "*.internal); its pods are replaced, interrupting 1 developer (alice): they reconnect by themselves"
                ) in changed.stdout.splitlines()
        assert changed.stdout.splitlines()[-1] == (
            f"intercept: injected: Deployment/vault: its agent changed for everyone (--outbound-deny none -> "
            f"*.internal; namespace {ns})")
        assert _agent_env(real_cluster, ns, "vault")["INTERCEPT_OUTBOUND_DENY"] == "*.internal"
        alice.wait_for(r"^intercept: joined: ", start=mark, timeout=WAIT)  # the new pod, with the new fence
        assert fence_in_status() == "deny *.internal"  # as the agent enforces it now
        again = intercept("inject", "vault", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig),
                          "--outbound-deny", "*.internal")
        assert again.returncode == 0 and "changing" not in again.stdout, again.stdout + again.stderr
    finally:
        alice.stop()


def test_uninstall_refuses_while_developers_hold_routes_and_with_force_their_intercepts_end_saying_why(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("gone")
    deploy(real_cluster, ns, app("gone", 1))
    real_cluster.wait_ready(ns, "gone", 1)
    kube = ["-n", ns, "--kubeconfig", str(real_cluster.kubeconfig)]
    carol = start(real_cluster, ns, "gone", free_port(), name="carol", header="x-dev=carol")
    try:
        carol.wait_for(r"^intercept: ready: ", timeout=WAIT)
        refused = intercept("uninstall", "gone", *kube)
        assert refused.returncode == 16, refused.stdout + refused.stderr
        assert refused.stderr.strip() == (
            f"intercept: error: the agent of gone serves carol (namespace {ns}): uninstalling cuts their intercepts; "
            "ask them to leave (intercept leave SERVICE), or uninstall anyway with --force")
        assert carol.p.poll() is None

        forced = intercept("uninstall", "gone", "--force", *kube)
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert carol.finish(WAIT) == 15, carol.output
        assert carol.lines[-1].startswith(
            f"intercept: error: the agent of gone was removed by an uninstall (namespace {ns})"), carol.output
    finally:
        carol.stop()


def test_a_reinstalled_agents_host_key_comes_from_its_secret_and_only_a_key_unlike_the_secrets_is_refused(
    real_cluster: RealCluster, namespace_of
) -> None:
    import base64

    from intercept.credentials import Credentials
    from tests.realcluster import served_by

    ns = namespace_of("keys")
    deploy(real_cluster, ns, app("keys", 1))
    real_cluster.wait_ready(ns, "keys", 1)

    def secret(credentials: Credentials) -> None:
        real_cluster.patch("Secret", ns, "intercept-keys", {"data": {
            "credentials.json": base64.b64encode(credentials.to_json().encode()).decode()}})

    alice = start(real_cluster, ns, "keys", free_port())
    try:
        alice.wait_for(r"^intercept: ready: ", timeout=WAIT)
        old = real_cluster.get("Secret", ns, "intercept-keys")["data"]["credentials.json"]
        secret(Credentials.generate())  # what a reinstall does: a new host key and token...
        # the pod that serves (the rollout's old one may still be terminating)
        (pod,) = [p["metadata"]["name"] for p in real_cluster.pods(ns, "app=keys")
                  if not p["metadata"].get("deletionTimestamp")]
        mark = len(alice.lines)
        real_cluster.delete("Pod", ns, pod)  # ...and pods that present it
        alice.wait_for(r"^intercept: progress: the agent was reinstalled: its new host key and token come from its "
                       r"Secret$", start=mark, timeout=WAIT)
        alice.wait_for(r"^intercept: joined: ", start=mark, timeout=WAIT)
        (endpoint,) = real_cluster.wait_ready(ns, "keys", 1)
        assert served_by(endpoint, {"x-dev": "alice"}) == "local"

        # The Secret holds another key than the pods present: that is no reinstall.
        real_cluster.patch("Secret", ns, "intercept-keys", {"data": {"credentials.json": old}})
        bob = start(real_cluster, ns, "keys", free_port(), name="bob", header="x-dev=bob")
        try:
            assert bob.finish(WAIT) == 5, bob.output
            assert "presented a host key that is not the one in the agent's Secret: possible impersonation" in bob.output
        finally:
            bob.stop()
    finally:
        alice.stop()
