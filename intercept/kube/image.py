"""The agent image: the one default, how a user overrides it, and how a user builds it; and
the CLI image beside it.

``--agent-image IMAGE``, else ``$INTERCEPT_AGENT_IMAGE`` (else the ``agent_image`` key of
``intercept.yaml``, through :mod:`intercept.spec`), else :data:`DEFAULT_AGENT_IMAGE`, the
image ``agent_image/Dockerfile`` builds for this version of the package.

:data:`DEFAULT_CLI_IMAGE` is the same Dockerfile's ``cli`` target: ``intercept`` with all
its dependencies, for what runs intercept's commands in the cluster (the CronJob of
``intercept gc --install``, which needs the kubernetes client the agent image leaves out).

Both tags are always the package version: the release workflow pushes them under that tag.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from intercept import __version__

DEFAULT_AGENT_IMAGE = f"ghcr.io/intercept-dev/agent:{__version__}"
DEFAULT_CLI_IMAGE = f"ghcr.io/intercept-dev/intercept:{__version__}"
CLI_TARGET = "cli"  # the stage of DOCKERFILE that builds the CLI image
AGENT_IMAGE_ENV = "INTERCEPT_AGENT_IMAGE"
AGENT_IMAGE_FLAG = "--agent-image"
DOCKERFILE = "agent_image/Dockerfile"


def agent_image(flag: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """The image to inject: the flag, else the environment, else the default."""
    return flag or environ.get(AGENT_IMAGE_ENV) or DEFAULT_AGENT_IMAGE


def build_command(image: str, target: str | None = None) -> str:
    """The shell line that builds the agent image (``target`` :data:`CLI_TARGET`: the CLI image)
    as ``image`` and pushes it, run from the repository root.

    Docker's spelling; ``podman`` takes the same arguments.
    """
    stage = f" --target {target}" if target else ""
    return f"docker build -f {DOCKERFILE}{stage} -t {image} . && docker push {image}"


def how_to_provide(image: str) -> str:
    """The fix for a cluster that cannot pull ``image``: build and push it, or name another one."""
    return (f"build and push it from a checkout of intercept ({build_command(image)}; on kind, k3d or minikube "
            f"load it instead, see the README), or pass an image the cluster can pull with {AGENT_IMAGE_FLAG} IMAGE "
            f"(or {AGENT_IMAGE_ENV})")
