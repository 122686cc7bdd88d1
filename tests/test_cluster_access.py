"""The local process reaches the cluster's Services by their names, on the real node (issue 25).

COMMAND runs with every proxy variable unset and connects by plain name, ``NAME.NS`` and
the full name, to Services of the intercepted namespace and (``--also-namespace``) of
another; the connection is dialled from the agent's pod. The mode is ``namespace`` (a
private hosts file for COMMAND), so the machine's /etc/hosts is never touched.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from e2e.cluster.api import wait_until
from tests.conftest import INTERCEPT, Proc, free_port, tool_result
from tests.realcluster import (AGENT_IMAGE, ENFORCE_RESTRICTED, WAIT, RealCluster, app, deploy, echo, intercept,
                               snapshot)

# GET / on each host:port given, by name, with no proxy: prints "NAME STATUS" per line.
_CLIENT = (
    "import http.client, os, sys\n"
    "assert not any(k.lower().endswith('_proxy') for k in os.environ), os.environ\n"
    "for target in sys.argv[1:]:\n"
    "    host, port = target.rsplit(':', 1)\n"
    "    c = http.client.HTTPConnection(host, int(port), timeout=20)\n"
    "    c.request('GET', '/')\n"
    "    print('reached', target, c.getresponse().status, flush=True)\n"
)


def _service(name: str, port: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": port}]}}


def _unset_proxies() -> list[str]:
    return ["env", *(f"-u{v}" for v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"))]


def test_command_reaches_services_by_every_name_a_pod_uses(real_cluster: RealCluster, namespace_of, tmp_path: Path) -> None:
    ns, other = namespace_of("access"), namespace_of("cache")
    deploy(real_cluster, ns, [*app("orders", 1), echo("redis", 1, (6379,)), _service("redis", 6379)])
    deploy(real_cluster, other, [echo("memo", 1, (8080,)), _service("memo", 8080)])
    for namespace, service in ((ns, "orders"), (ns, "redis"), (other, "memo")):
        real_cluster.wait_ready(namespace, service, 1)
    script = tmp_path / "client.py"
    script.write_text(_CLIENT)
    targets = ["redis:6379", f"redis.{ns}:6379", f"redis.{ns}.svc.cluster.local:6379", f"memo.{other}:8080",
               f"memo.{other}.svc:8080"]
    client = Proc([*INTERCEPT, "start", "orders", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig),
                   "--agent-image", AGENT_IMAGE, "--name", "alice", "--port", str(free_port()), "--no-watch",
                   "--access", "namespace", "--also-namespace", other,
                   "--", *_unset_proxies(), sys.executable, str(script), *targets])
    try:
        code = client.finish(WAIT * 2)
        assert code == 0, client.output
        assert [line for line in client.lines if line.startswith("reached")] == [f"reached {t} 200" for t in targets]
        client.wait_for(rf"^intercept: access: the local process reaches \d+ name\(s\) of {ns} and {other} as a pod does")
    finally:
        client.stop()

    # intercept connect: the same, without intercepting, through the agent now in the namespace
    done = intercept("connect", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig), "--access", "namespace", "--",
                     *_unset_proxies(), sys.executable, "-c", _CLIENT + "sys.exit(3)\n", "redis:6379", timeout=WAIT)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["reached redis:6379 200"]


def test_connect_with_no_agent_runs_its_own_reuses_it_and_gc_removes_it_once_idle(
        real_cluster: RealCluster, namespace_of, tmp_path: Path) -> None:
    ns = namespace_of("own", ENFORCE_RESTRICTED)  # its agent runs under Pod Security "restricted"
    deploy(real_cluster, ns, [echo("redis", 1, (6379,)), _service("redis", 6379)])
    real_cluster.wait_ready(ns, "redis", 1)
    before = snapshot(real_cluster, ns)
    kube = ["-n", ns, "--kubeconfig", str(real_cluster.kubeconfig)]
    client = [*_unset_proxies(), sys.executable, "-c", _CLIENT + "sys.exit(3)\n", "redis:6379", f"redis.{ns}:6379"]

    first = intercept("connect", *kube, "--agent-image", AGENT_IMAGE, "--access", "namespace",
                      "--outbound-deny", "memo:1", "--", *client, timeout=WAIT * 2)
    assert first.returncode == 3, first.stdout + first.stderr
    assert first.stdout.splitlines() == ["reached redis:6379 200", f"reached redis.{ns}:6379 200"]
    assert "intercept: progress: Deployment/intercept-connect: no agent in namespace" in first.stderr
    assert "through intercept connect's own agent (Deployment/intercept-connect)" in first.stderr
    own = real_cluster.get("Deployment", ns, "intercept-connect")
    assert own["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "intercept"
    assert [c["name"] for c in own["spec"]["template"]["spec"]["containers"]] == ["intercept-agent"]  # no app
    assert "INTERCEPT_OUTBOUND_DENY" not in str(own["spec"]["template"])  # no fence of the first connect's for all

    # a later connect reuses it: the same Deployment, nothing started
    again = intercept("connect", *kube, "--agent-image", AGENT_IMAGE, "--access", "namespace", "--", *client,
                      timeout=WAIT)
    assert again.returncode == 3, again.stdout + again.stderr
    assert "no agent in namespace" not in again.stderr and "through intercept connect's own agent" in again.stderr
    assert real_cluster.get("Deployment", ns, "intercept-connect")["metadata"]["uid"] == own["metadata"]["uid"]

    # one of another image is not trusted: refused (exit 13), naming the difference and the fix, nothing changed
    seen = real_cluster.get("Deployment", ns, "intercept-connect")["metadata"]["resourceVersion"]
    other = intercept("connect", *kube, "--agent-image", "registry.example/other-agent:1", "--access", "namespace", "--",
                      "true", timeout=WAIT)
    assert other.returncode == 13, other.stdout + other.stderr
    assert f"image: it has {AGENT_IMAGE}, not registry.example/other-agent:1" in other.stderr
    assert f"intercept uninstall intercept-connect -n {ns}" in other.stderr
    assert real_cluster.get("Deployment", ns, "intercept-connect")["metadata"]["resourceVersion"] == seen

    # a coding agent's connect tool reuses it too: one command, its exit status and output
    async def tool() -> dict:
        from mcp import Client
        from mcp.client.stdio import StdioServerParameters

        env = {**os.environ, "KUBECONFIG": str(real_cluster.kubeconfig), "INTERCEPT_STATE_DIR": str(tmp_path / "state")}
        async with Client(StdioServerParameters(command=sys.executable, args=["-m", "intercept", "mcp"], env=env),
                          read_timeout_seconds=WAIT) as mcp:
            return tool_result(await mcp.call_tool("connect", {"namespace": ns, "access": "namespace", "command": client,
                                                                  "agent_image": AGENT_IMAGE}))

    result = asyncio.run(tool())
    assert (result["exit_status"], result["timed_out"]) == (3, False), result
    assert result["output"] == ["reached redis:6379 200", f"reached redis.{ns}:6379 200"], result
    assert any("through intercept connect's own agent" in line for line in result["events"]), result

    # gc keeps it while it has not been idle for --idle, and removes it after: the namespace as it was
    kept = intercept("gc", *kube, "--idle", "1h")
    assert kept.returncode == 0 and "removed 0 sandboxes and 0 idle agents" in kept.stdout, kept.stdout + kept.stderr

    def removed() -> bool:  # once it has been idle for a second (gc asks its agent)
        out = intercept("gc", *kube, "--idle", "1")
        assert out.returncode == 0, out.stdout + out.stderr
        return f"removed 0 sandboxes and 1 idle agents ({ns}/intercept-connect)" in out.stdout

    wait_until(removed, "gc removing intercept connect's idle agent", WAIT)
    assert snapshot(real_cluster, ns) == before
