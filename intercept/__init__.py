"""intercept: send your own requests to a Kubernetes service to the process on your machine.

The public Python API is :mod:`intercept.api`, whose names are also reachable here
(``intercept.intercepting``, ``intercept.start``, ...); the CLI, the tests, VS Code tasks,
CDE hooks and the MCP server all call it. They are loaded on first use, so that the agent
and ``intercept --help`` do not pay for them.
"""

import warnings
from typing import Any

__version__ = "0.1.0"

# asyncssh still supports DSA keys, and cryptography >= 47 warns that DSA is deprecated at
# every mention of its ``dsa`` module in asyncssh's own modules: five lines on stderr at
# the first SSH login, in every command and in the agent's log, about keys intercept
# never makes or accepts (its keys are Ed25519). Only that warning, only from asyncssh's
# modules, is hidden; anything else a dependency warns about is still shown.
warnings.filterwarnings("ignore", message=r"DSA is deprecated", category=UserWarning, module=r"asyncssh\.")

_API = frozenset({
    "Event", "Intercept", "InterceptSpec", "Response", "agent_routes", "down", "inject_text", "intercepting", "leave",
    "list_services", "connect", "pod_env", "restore_text", "make_spec", "run", "send_request", "send_request_sync", "start", "status",
    "uninstall", "up", "vscode", "sandbox_create", "sandbox_list", "sandbox_delete", "sandbox_extend", "gc",
})


def __getattr__(name: str) -> Any:
    if name in _API:
        from intercept import api

        return getattr(api, name)
    raise AttributeError(f"module 'intercept' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
