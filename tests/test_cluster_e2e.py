"""The end-to-end flow of ``e2e/run.sh`` (the kind suite's, as a script) on the real node.

``e2e/run.sh`` with ``INTERCEPT_E2E_KUBECONFIG`` runs on a cluster that runs already, with
the images on its node: here the session's cluster, the agent built from
``agent_image/Dockerfile`` and the e2e sample app built from ``e2e/app/``. The flow is the
kind suite's: a namespace enforcing Pod Security "restricted", ``intercept start`` with the
built image, routing through each replica (port-forwards) and through the Service (by its
name, from inside a pod: cluster DNS and kube-proxy), idleness, leave, uninstall, specs
as before.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from e2e.cluster import images
from tests.realcluster import AGENT_IMAGE, ROOT, RealCluster

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="e2e/run.sh needs curl (apt-get install curl)")


def test_the_e2e_flow_passes_on_the_real_node(real_cluster: RealCluster) -> None:
    env = {**os.environ, "INTERCEPT_E2E_KUBECONFIG": str(real_cluster.kubeconfig),
           "INTERCEPT_E2E_AGENT_IMAGE": AGENT_IMAGE, "INTERCEPT_E2E_APP_IMAGE": images.SAMPLE,
           "INTERCEPT_E2E_IDLE": "5", "INTERCEPT": f"{sys.executable} -m intercept",
           "PATH": f"{real_cluster.kubectl.parent}:{os.environ['PATH']}"}
    env.pop("INTERCEPT_AGENT_IMAGE", None)
    done = subprocess.run(["bash", str(ROOT / "e2e" / "run.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("PASS"), done.stdout + done.stderr
    assert "20/20 with x-dev: e2e -> local" in done.stdout
