"""``intercept start --replace`` on the real node (issue 26): the cluster's version stops, yours
takes its place, and it comes back exactly.

A queue worker (a Deployment of 2 with no Service, consuming a Redis list from Debian's
``redis-server`` in the ``intercept.test/servers`` image) stops consuming while replaced, and
the local process, handed the pod's environment and reaching Redis through the agent,
consumes every item; after leaving, the cluster's worker consumes again, and the specs
equal what was applied. A Service's replace takes every request, and is refused while
another developer holds a route on it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from e2e.cluster.api import wait_until
from e2e.cluster.images import SERVERS
from intercept.kube.inject import STAND_IN_COMMAND, restore_object
from tests.conftest import INTERCEPT, Proc, free_port
from tests.realcluster import (
    AGENT_IMAGE,
    RESTRICTED,
    SAMPLE,
    WAIT,
    RealCluster,
    app,
    deploy,
    intercept,
    served_by,
    snapshot,
    start,
    user_view,
)

# The cluster's worker: takes items off the list $QUEUE and records who took each on "done".
# Raw RESP on a socket (the image has no Redis client library); exits at once on SIGTERM.
_WORKER = r'''
import os, signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
WHO, QUEUE, HOST, PORT = sys.argv[1], os.environ["QUEUE"], sys.argv[2], int(sys.argv[3])

def command(s, *words):
    s.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
    reader = s.makefile("rb")
    head = reader.readline()
    if head.startswith(b"*-1") or head.startswith(b":"):
        return None
    items = []
    for _ in range(int(head[1:])):
        size = int(reader.readline()[1:])
        items.append(reader.read(size + 2)[:-2])
    return items

s = socket.create_connection((HOST, PORT))
print(WHO, "worker consuming", QUEUE, flush=True)
while True:
    popped = command(s, b"BLPOP", QUEUE.encode(), b"1")
    if popped:
        command(s, b"RPUSH", b"done", WHO.encode() + b":" + popped[1])
        print(WHO, "took", popped[1].decode(), flush=True)
'''


def _redis() -> list[dict]:
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "redis"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "redis"}},
                  "template": {"metadata": {"labels": {"app": "redis"}}, "spec": {
                      "volumes": [{"name": "tmp", "emptyDir": {}}],
                      "containers": [{"name": "redis", "image": SERVERS, "args": ["redis", "6379"],
                                      "ports": [{"containerPort": 6379}],
                                      "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                                      "readinessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 1},
                                      "securityContext": RESTRICTED}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "redis"},
         "spec": {"selector": {"app": "redis"}, "ports": [{"port": 6379, "targetPort": 6379}]}},
    ]


def _worker(replicas: int) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "worker"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "worker"}},
                     "template": {"metadata": {"labels": {"app": "worker"}}, "spec": {"containers": [{
                         "name": "worker", "image": SERVERS, "command": ["python3", "-c", _WORKER],
                         "args": ["cluster", "redis", "6379"],
                         "env": [{"name": "QUEUE", "value": "jobs"}],
                         "livenessProbe": {"exec": {"command": ["python3", "-c", "pass"]}, "periodSeconds": 10},
                         "securityContext": RESTRICTED}]}}}}


class _Redis:
    """The test's own client of the cluster's Redis (this machine reaches pod addresses)."""

    def __init__(self, address: str) -> None:
        self.socket = socket.create_connection((address, 6379), timeout=WAIT)
        self.reader = self.socket.makefile("rb")

    def call(self, *words: str) -> list[str] | int | None:
        data = [w.encode() for w in words]
        self.socket.sendall(b"*%d\r\n" % len(data) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in data))
        head = self.reader.readline()
        if head.startswith(b":"):
            return int(head[1:])
        if head.startswith(b"*-1"):
            return None
        items = []
        for _ in range(int(head[1:])):
            size = int(self.reader.readline()[1:])
            items.append(self.reader.read(size + 2)[:-2].decode())
        return items

    def taken(self, count: int) -> list[str]:
        """The next ``count`` records of who took an item (waiting for each, up to WAIT)."""
        return [self.call("BLPOP", "done", str(int(WAIT)))[1] for _ in range(count)]  # type: ignore[index]


def _app_back(cluster: RealCluster, ns: str, selector: str, container: str, count: int) -> None:
    """Until the pods of ``selector`` are ``count`` ready ones, all running the app (the stand-ins gone)."""
    def stands_in(pod: dict) -> bool:
        spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
        return tuple(spec.get("command") or ())[:2] == STAND_IN_COMMAND

    wait_until(lambda: (lambda pods: len(pods) == count and not any(map(stands_in, pods)) or None)(
        cluster.pods(ns, selector)), f"{count} pods of {selector} in {ns} running the app", WAIT)
    cluster.wait_ready_pods(ns, selector, count)


def _restored(workload: dict) -> dict:
    """``workload`` (as read) with the agent taken out by its record, as a snapshot lists it."""
    view = user_view(restore_object(workload))
    return {k: v for k, v in view.items() if k not in ("apiVersion", "kind")}


def _app_container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def test_a_replaced_worker_stops_consuming_the_local_one_takes_every_item_and_the_cluster_gets_it_back(
        real_cluster: RealCluster, namespace_of, tmp_path: Path) -> None:
    ns = namespace_of("replace")
    deploy(real_cluster, ns, [*_redis(), _worker(2)])
    redis = _Redis(real_cluster.wait_ready(ns, "redis", 1)[0].ip)
    real_cluster.wait_ready_pods(ns, "app=worker", 2)
    redis.call("RPUSH", "jobs", "before")
    assert redis.taken(1) == ["cluster:before"]
    before = snapshot(real_cluster, ns)

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    forward = free_port()
    kube = ["-n", ns, "--kubeconfig", str(real_cluster.kubeconfig)]
    alice = Proc([*INTERCEPT, "start", "deployment/worker", "--replace", *kube, "--agent-image", AGENT_IMAGE,
                  "--name", "alice", "--access", "off", "--forward", f"redis:6379:{forward}", "--no-watch",
                  "--", sys.executable, str(script), "local", "127.0.0.1", str(forward)])
    try:
        alice.wait_for(r"^intercept: ready: deployment/worker is yours: your process runs in place of its app container",
                       timeout=WAIT * 2)
        alice.wait_for(r"^local worker consuming jobs$", timeout=WAIT)  # QUEUE: the pod's environment, handed over

        # no replica runs the worker: each runs the stand-in, with the worker's environment kept (a pod the
        # rollout let go may still be listed, terminating: "ready" came once its containers had stopped)
        pods = real_cluster.pods(ns, "app=worker")
        seen = [(p["metadata"]["name"], p["metadata"].get("deletionTimestamp"), (p.get("status") or {}).get("phase"))
                for p in pods]
        running = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        assert len([p for p in running if not p["metadata"].get("deletionTimestamp")]) == 2, seen
        for pod in running:
            container = next(c for c in pod["spec"]["containers"] if c["name"] == "worker")
            assert container["command"] == [*STAND_IN_COMMAND, "alice"] and "args" not in container
            assert container["env"] == [{"name": "QUEUE", "value": "jobs"}]

        # bob cannot replace it too, and asking changes nothing
        generation = real_cluster.get("Deployment", ns, "worker")["metadata"]["generation"]
        bob = intercept("start", "deployment/worker", "--replace", *kube, "--agent-image", AGENT_IMAGE,
                        "--name", "bob", "--", "true")
        assert bob.returncode == 17, bob.stderr
        assert "Deployment/worker in namespace" in bob.stderr and "is replaced by alice already" in bob.stderr
        assert real_cluster.get("Deployment", ns, "worker")["metadata"]["generation"] == generation

        items = [f"item-{i}" for i in range(20)]
        redis.call("RPUSH", "jobs", *items)
        assert redis.taken(len(items)) == [f"local:{item}" for item in items]  # every one, in order, by alice's

        alice.signal(2)
        assert alice.finish(WAIT * 2) == 0, alice.output
        assert ("intercept: progress: Deployment/worker: container worker runs the app again (its pods are being "
                "replaced)") in alice.lines, alice.output
    finally:
        alice.stop()

    # the pod template is the one before the replace (the agent stays, dormant, as after any intercept)
    after = real_cluster.get("Deployment", ns, "worker")
    assert _app_container(user_view(after), "worker") == _app_container(before[("Deployment", "worker")], "worker")
    assert _restored(after) == before[("Deployment", "worker")]
    _app_back(real_cluster, ns, "app=worker", "worker", 2)
    redis.call("RPUSH", "jobs", "after")
    assert redis.taken(1) == ["cluster:after"]

    removed = intercept("uninstall", "worker", *kube)
    assert removed.returncode == 0, removed.stderr
    assert snapshot(real_cluster, ns) == before


def test_replacing_a_service_takes_every_request_and_is_refused_while_another_developer_holds_a_route(
        real_cluster: RealCluster, namespace_of) -> None:
    ns = namespace_of("replsvc")
    deploy(real_cluster, ns, app("cart", 2))
    real_cluster.wait_ready(ns, "cart", 2)
    before = snapshot(real_cluster, ns)
    kube = ["-n", ns, "--kubeconfig", str(real_cluster.kubeconfig)]

    alice = start(real_cluster, ns, "cart", free_port(), name="alice", header="x-dev=alice")
    try:
        alice.wait_for(r"^intercept: ready: ", timeout=WAIT * 2)
        template = real_cluster.get("Deployment", ns, "cart")["spec"]["template"]
        port = free_port()
        refused = intercept("start", "cart", "--replace", *kube, "--name", "bob", "--port", str(port), "--no-watch",
                            "--", sys.executable, str(SAMPLE), "serve", "--port", str(port), "--name", "bob")
        assert refused.returncode == 17, refused.stderr
        assert "alice holds routes on its agent" in refused.stderr, refused.stderr
        assert real_cluster.get("Deployment", ns, "cart")["spec"]["template"] == template  # nothing changed
    finally:
        alice.signal(2)
        alice.finish(WAIT)
        alice.stop()

    port = free_port()
    bob = Proc([*INTERCEPT, "start", "cart", "--replace", *kube, "--agent-image", AGENT_IMAGE, "--name", "bob",
                "--port", str(port), "--no-watch",
                "--", sys.executable, str(SAMPLE), "serve", "--port", str(port), "--name", "bob"])
    try:
        bob.wait_for(r"^intercept: ready: ", timeout=WAIT * 2)
        endpoints = real_cluster.wait_ready(ns, "cart", 2)
        for endpoint in endpoints:  # every request, with a header or not, on every replica
            assert served_by(endpoint) == "bob"
            assert served_by(endpoint, {"x-dev": "alice"}) == "bob"
        carol = intercept("start", "cart", *kube, "--name", "carol", "--header", "x-dev=carol", "--port",
                          str(free_port()), timeout=WAIT * 2)
        assert carol.returncode == 6 and "bob" in carol.stderr, carol.stderr
        bob.signal(2)
        assert bob.finish(WAIT * 2) == 0, bob.output
    finally:
        bob.stop()

    assert _restored(real_cluster.get("Deployment", ns, "cart")) == before[("Deployment", "cart")]
    _app_back(real_cluster, ns, "app=cart", "app", 2)
    for endpoint in real_cluster.wait_ready(ns, "cart", 2):
        assert served_by(endpoint) == f"cluster/{endpoint.pod}"
    assert intercept("uninstall", "cart", *kube).returncode == 0
    assert snapshot(real_cluster, ns) == before
