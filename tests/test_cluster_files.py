"""The pod's files through ``intercept start --mount`` on the real control plane.

The app's pod mounts a projected volume whose source is a Secret (the shape in which
Kubernetes hands out credentials and the service account token); the harness's kubelet
writes it out. The injected agent serves it at its mountPath over the developer's SSH
session (port-forwarded through the API server and the kubelet), and the developer's process
reads it under ``$INTERCEPT_ROOT``.
"""

from __future__ import annotations

import base64
import signal
import sys
from pathlib import Path

from intercept.client.files import live_unavailable
from tests.conftest import INTERCEPT, Proc, free_port
from tests.realcluster import AGENT_IMAGE, ENFORCE_RESTRICTED, WAIT, RealCluster, app, deploy

MOUNT_PATH = "/etc/orders/credentials"

# The developer's process: says what it found under INTERCEPT_ROOT, then serves HTTP.
_PROCESS = ("import http.server, os, sys\n"
            "path = os.environ['INTERCEPT_ROOT'] + sys.argv[2]\n"
            "print('found', open(path).read(), flush=True)\n"
            "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()\n")


def test_a_pods_projected_secret_reaches_the_developers_process_through_mount(
    real_cluster: RealCluster, namespace_of, tmp_path: Path
) -> None:
    ns = namespace_of("files", ENFORCE_RESTRICTED)
    workload, service, policy = app("orders", 1)
    pod = workload["spec"]["template"]["spec"]
    pod["volumes"] = [{"name": "credentials", "projected": {"sources": [
        {"secret": {"name": "orders-db", "items": [{"key": "password", "path": "db-password"}]}}]}}]
    pod["containers"][0]["volumeMounts"] = [{"name": "credentials", "mountPath": MOUNT_PATH, "readOnly": True}]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "orders-db"},
              "data": {"password": base64.b64encode(b"hunter2-from-the-pod").decode()}}
    deploy(real_cluster, ns, [secret, workload, service, policy])
    real_cluster.wait_ready(ns, "orders", 1)

    port = free_port()
    client = Proc([*INTERCEPT, "start", "orders", "-n", ns, "--kubeconfig", str(real_cluster.kubeconfig),
                   "--agent-image", AGENT_IMAGE, "--header", "x-dev=alice", "--name", "alice", "--port", str(port),
                   "--no-watch", "--mount", "--", sys.executable, "-c", _PROCESS, str(port), f"{MOUNT_PATH}/db-password"])
    try:
        mounted = client.wait_for(r"^intercept: mount: the pod's files are under (\S+?),? (.*)$", timeout=WAIT)
        root = Path(mounted[1])
        # live through the port-forward where sshfs and FUSE are here, else a copy that says why
        assert mounted[2] == "(live, sshfs)" if live_unavailable() is None else mounted[2].startswith("copied once, not live")
        assert client.wait_for(r"^found (.*)$", timeout=WAIT)[1] == "hunter2-from-the-pod"
        client.wait_for(r"^intercept: ready: ", timeout=WAIT)
        client.signal(signal.SIGTERM)
        assert client.finish() == 0, client.output
    finally:
        client.stop()
    assert not root.exists()
    assert "hunter2" not in "\n".join(line for line in client.lines if line.startswith("intercept:"))
