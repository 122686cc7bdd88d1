"""The agent image: the one default, and how a user overrides it.

``--agent-image IMAGE``, else ``$INTERCEPT_AGENT_IMAGE``, else :data:`DEFAULT_AGENT_IMAGE`,
the image ``agent_image/Dockerfile`` builds for this version of the package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from intercept import __version__

DEFAULT_AGENT_IMAGE = f"ghcr.io/intercept-dev/agent:{__version__}"
AGENT_IMAGE_ENV = "INTERCEPT_AGENT_IMAGE"


def agent_image(flag: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """The image to inject: the flag, else the environment, else the default."""
    return flag or environ.get(AGENT_IMAGE_ENV) or DEFAULT_AGENT_IMAGE
