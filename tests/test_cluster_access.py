"""The local process reaches the cluster's Services by their names, on the real node (issue 25).

COMMAND runs with every proxy variable unset and connects by plain name, ``NAME.NS`` and
the full name, to Services of the intercepted namespace and (``--also-namespace``) of
another; the connection is dialled from the agent's pod. The mode is ``namespace`` (a
private hosts file for COMMAND), so the machine's /etc/hosts is never touched.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import INTERCEPT, Proc, free_port
from tests.realcluster import AGENT_IMAGE, WAIT, RealCluster, app, deploy, echo, intercept

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
