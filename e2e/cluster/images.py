"""What "running an image" means on the simulated node: an image name -> the process that stands for it.

There is no container engine; each container of a pod becomes a process (in the pod's
network namespace, see :mod:`e2e.cluster.kubelet`). The map, first match wins:

==============================================  ==================================================
image                                           runs
==============================================  ==================================================
``*/agent:*`` under ``intercept.test/`` or      the intercept agent of this checkout:
``ghcr.io/intercept-dev/``                      ``python -m intercept agent`` + the container's args
``intercept.test/sample:*``                     ``e2e/app/sample.py serve --port P`` (the e2e app)
``intercept.test/sample-v2:*``                  the same app answering as ``v2/POD`` (a changed build)
``intercept.test/sleep:*``                      a process that never listens (never ready)
``intercept.test/crash:*``                      a process that exits 1 at once (a crash loop)
a registry ending in ``.invalid``               nothing: the pull fails (``ErrImagePull``, then
                                                ``ImagePullBackOff``), as for a registry that
                                                does not exist
anything else                                   :mod:`e2e.cluster.responder` on each declared TCP
                                                containerPort, answering with the pod's and the
                                                container's names; as an init container: done
==============================================  ==================================================

So third-party manifests (the online-boutique fixture) apply unchanged, and the tests
choose behaviour by image name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TEST_REGISTRY = "intercept.test/"
AGENT_REPOSITORIES = ("intercept.test/agent", "ghcr.io/intercept-dev/agent")

Obj = dict[str, Any]


@dataclass(frozen=True)
class Program:
    """How to run one container: ``argv`` (None: nothing runs), or why its image cannot be had."""

    argv: list[str] | None
    pull_error: str | None = None  # the image cannot be pulled: this is the kubelet's message
    completes: bool = False  # nothing to run and nothing to wait for: done at once (init containers)


def repository(image: str) -> str:
    """The image without its tag or digest."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def program(image: str, container: Obj, pod: Obj, *, init: bool = False) -> Program:
    """The process that stands for ``container`` (of ``pod``), by its image (see the module's table)."""
    repo = repository(image)
    registry = repo.split("/", 1)[0] if "/" in repo else ""
    python = sys.executable
    args = [str(a) for a in container.get("args") or []]
    if registry.endswith(".invalid"):
        return Program(None, pull_error=(
            f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
            f"failed to do request: dial tcp: lookup {registry}: no such host"))
    if repo in AGENT_REPOSITORIES:
        command = [str(c) for c in container.get("command") or []]
        subcommand = command[1:] if command[:1] == ["intercept"] else ["agent"]
        return Program([python, "-m", "intercept", *subcommand, *args])
    if repo in (TEST_REGISTRY + "sample", TEST_REGISTRY + "sample-v2"):
        port = _ports(container)[:1] or [8080]
        named = ["--name", f"v2/{(pod.get('metadata') or {}).get('name', '')}"] if repo.endswith("-v2") else []
        return Program([python, str(ROOT / "e2e" / "app" / "sample.py"), "serve", "--port", str(port[0]), *named, *args])
    if repo == TEST_REGISTRY + "sleep":
        return Program([python, "-c", "import signal; signal.pause()"])
    if repo == TEST_REGISTRY + "crash":
        return Program([python, "-c", "import sys; print('crashing on purpose', flush=True); sys.exit(1)"])
    if init:
        return Program(None, completes=True)
    metadata = pod.get("metadata") or {}
    argv = [python, "-m", "e2e.cluster.responder", "--pod", metadata.get("name", ""),
            "--namespace", metadata.get("namespace", ""), "--container", container.get("name", "")]
    for port in _ports(container):
        argv += ["--port", str(port)]
    return Program(argv)


def _ports(container: Obj) -> list[int]:
    return [int(p["containerPort"]) for p in container.get("ports") or []
            if (p.get("protocol") or "TCP") == "TCP" and p.get("containerPort")]
