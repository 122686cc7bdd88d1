"""Real servers reached by their cluster names, with real clients, on the real node (issue 25).

Redis (Debian's ``redis-server``), PostgreSQL (Debian's ``postgresql``) and an h2c gRPC
server (``python3-grpcio``) run as pods behind Services (the ``intercept.test/servers``
image), and a headless StatefulSet of 2 Redis pods. ``intercept connect`` runs COMMAND (its
own agent: the namespace has none) with every proxy variable unset; COMMAND uses redis-py,
psycopg, grpcio and raw sockets by short name, ``NAME.NS`` and the full name, each pod of the
StatefulSet by its own name, a Service created while it runs, a Service the fence denies, a
name that is only this machine's, and ``localhost``.

The machine's /etc/hosts is never touched: ``intercept connect`` runs in a mount namespace
of its own (``unshare -m``) over a copy of it that also names ``only-here.test`` (the name
that is not the cluster's), and in the ``namespace`` mode.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

from e2e.cluster.images import SERVERS
from intercept.protocol import FENCE_REFUSED
from tests.conftest import INTERCEPT, Proc, free_port
from tests.realcluster import AGENT_IMAGE, RESTRICTED, WAIT, RealCluster, deploy, intercept, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare (a mount namespace with a copy of the hosts file)")

# COMMAND: every line it prints is something it reached, or how it failed; exits 0 when all went.
_COMMAND = r'''
import os, signal, socket, sys, threading
import grpc, psycopg, redis

ns, local_port = sys.argv[1], int(sys.argv[2])
assert not any(k.lower().endswith("_proxy") for k in os.environ), sorted(os.environ)
full = f"{ns}.svc.cluster.local"

for host in ("redis", f"redis.{ns}", f"redis.{full}"):
    r = redis.Redis(host=host, port=6379, socket_timeout=20)
    r.set("key", host)
    print("redis", host, r.get("key").decode(), flush=True)

for host in ("pg", f"pg.{ns}", f"pg.{full}"):
    with psycopg.connect(host=host, port=5432, user="test", dbname="postgres", connect_timeout=20) as db:
        print("postgres", host, db.execute("SELECT 40 + 2").fetchone()[0], flush=True)

for host in ("grpc", f"grpc.{ns}", f"grpc.{full}"):
    with grpc.insecure_channel(f"{host}:50051") as channel:
        say = channel.unary_unary("/test.Echo/Say")
        print("grpc", host, say(b"hi", timeout=20).decode().split("-")[0], flush=True)

for pod in ("kv-0", "kv-1"):  # each pod of the headless Service by its own name, as a StatefulSet's client does
    redis.Redis(host=f"{pod}.kv", port=6379, socket_timeout=20).set("who", pod)
for host in ("kv-0.kv", f"kv-1.kv.{ns}", f"kv-0.kv.{full}"):
    with socket.create_connection((host, 6379), timeout=20) as s:  # raw RESP: GET who
        s.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nwho\r\n")
        print("kv", host, s.recv(100).split(b"\r\n")[1].decode(), flush=True)

try:
    socket.create_connection(("vault", 6379), timeout=20)
    print("vault reached", flush=True)
except ConnectionRefusedError:
    print("vault refused at once", flush=True)

# a name that is not the cluster's resolves as on the machine; localhost is COMMAND's own
server = socket.create_server(("127.0.0.1", local_port))
threading.Thread(target=lambda: server.accept()[0].sendall(b"mine"), daemon=True).start()
for host in ("only-here.test", "localhost"):
    address = socket.gethostbyname(host)
    with socket.create_connection((host, local_port), timeout=20) as s:
        print("local", host, address, s.recv(10).decode(), flush=True)
    if host == "only-here.test":
        threading.Thread(target=lambda: server.accept()[0].sendall(b"mine"), daemon=True).start()

# a Service created while it runs: the test creates it, then says so
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])  # until sigwait takes it
print("waiting for late", os.getpid(), flush=True)
signal.sigwait([signal.SIGUSR1])
print("late", redis.Redis(host="late", port=6379, socket_timeout=20).ping(), flush=True)
'''


def _workload(name: str, server: str, port: int, replicas: int = 1, kind: str = "Deployment") -> dict:
    spec = {
        "replicas": replicas, "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name}}, "spec": {
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "containers": [{
                "name": server, "image": SERVERS, "args": [server, str(port)],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "ports": [{"containerPort": port}], "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
                "securityContext": RESTRICTED}]}}}
    if kind == "StatefulSet":
        spec.update(serviceName=name, podManagementPolicy="Parallel")
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def _service(name: str, port: int, selector: str | None = None, headless: bool = False) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": selector or name}, "ports": [{"port": port, "targetPort": port}],
                     **({"clusterIP": "None"} if headless else {})}}


def test_real_clients_reach_real_servers_by_every_name_a_pod_uses(real_cluster: RealCluster, namespace_of,
                                                                  tmp_path: Path) -> None:
    ns = namespace_of("servers")
    deploy(real_cluster, ns, [
        _workload("redis", "redis", 6379), _service("redis", 6379),
        _workload("pg", "postgres", 5432), _service("pg", 5432),
        _workload("grpc", "grpc", 50051), _service("grpc", 50051),
        _workload("kv", "redis", 6379, replicas=2, kind="StatefulSet"), _service("kv", 6379, headless=True),
        _service("vault", 6379, selector="redis"),  # the fence denies it
        _service("localhost", 6379, selector="redis"),  # a Service whose short name is localhost: COMMAND's own wins
    ])
    for service, count in (("redis", 1), ("pg", 1), ("grpc", 1), ("kv", 2)):
        real_cluster.wait_ready(ns, service, count)
    before = snapshot(real_cluster, ns)
    hosts = tmp_path / "hosts"
    hosts.write_bytes(Path("/etc/hosts").read_bytes() + b"\n127.0.0.1 only-here.test\n")
    script = tmp_path / "command.py"
    script.write_text(_COMMAND)
    local_port = free_port()
    unset = ["env", *(f"-u{v}" for v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY",
                                         "no_proxy", "ALL_PROXY", "all_proxy", "GRPC_PROXY", "grpc_proxy"))]
    connect = Proc(["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
                    str(hosts), *INTERCEPT, "connect", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig),
                    "--agent-image", AGENT_IMAGE, "--access", "namespace", "--outbound-deny", "vault.*",
                    "--", *unset, sys.executable, str(script), ns, str(local_port)])
    try:
        pid = int(connect.wait_for(r"^waiting for late (\d+)$", timeout=WAIT * 3)[1])
        deploy(real_cluster, ns, [_service("late", 6379, selector="redis")])
        connect.wait_for(r"^intercept: access: late \(late\.\S+, 127\.77\.\d+\.\d+\) is reachable now$", timeout=WAIT)
        os.kill(pid, signal.SIGUSR1)
        assert connect.finish(WAIT) == 0, connect.output
        full = f"{ns}.svc.cluster.local"
        reached = [line for line in connect.lines if not line.startswith("intercept: ")]
        assert reached == [
            "redis redis redis", f"redis redis.{ns} redis.{ns}", f"redis redis.{full} redis.{full}",
            "postgres pg 42", f"postgres pg.{ns} 42", f"postgres pg.{full} 42",
            "grpc grpc grpc", f"grpc grpc.{ns} grpc", f"grpc grpc.{full} grpc",
            "kv kv-0.kv kv-0", f"kv kv-1.kv.{ns} kv-1", f"kv kv-0.kv.{full} kv-0",
            "vault refused at once",
            "local only-here.test 127.0.0.1 mine", "local localhost 127.0.0.1 mine",
            f"waiting for late {pid}", "late True",
        ], connect.output
        # the refusal, said once at start, naming the rule
        refusals = [line for line in connect.lines if "vault" in line and line.startswith("intercept: warning: ")]
        assert len(refusals) == 1 and re.fullmatch(
            rf"intercept: warning: vault:6379 is not reachable: {re.escape(FENCE_REFUSED)}vault\.{ns}\.svc\.cluster\.local"
            r"\S* is denied by .*--outbound-deny vault\.\*", refusals[0]), connect.output
    finally:
        connect.stop()
    # uninstall --all takes intercept connect's own agent away too: the namespace as it was
    removed = intercept("uninstall", "--all", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert removed.stdout.splitlines()[-1] == (f"intercept: uninstalled: deleted Secret intercept-intercept-connect; "
                                               f"deleted Deployment/intercept-connect (namespace {ns})")
    after = snapshot(real_cluster, ns)
    assert after.pop(("Service", "late"))["metadata"]["name"] == "late"  # the test's own, made while it ran
    assert after == before
