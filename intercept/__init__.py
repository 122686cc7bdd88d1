"""intercept: send your own requests to a Kubernetes service to the process on your machine.

The public Python API is :mod:`intercept.api`, whose names are also reachable here
(``intercept.intercepting``, ``intercept.start``, ...); the CLI, the tests, VS Code tasks,
CDE hooks and the MCP server all call it. They are loaded on first use, so that the agent
and ``intercept --help`` do not pay for them.
"""

from typing import Any

__version__ = "0.1.0"

_API = frozenset({
    "Event", "Intercept", "InterceptSpec", "Response", "agent_routes", "down", "inject_text", "intercepting", "leave",
    "list_services", "pod_env", "restore_text", "make_spec", "run", "send_request", "send_request_sync", "start", "status",
    "uninstall", "up", "vscode", "sandbox_create", "sandbox_list", "sandbox_delete", "sandbox_extend", "gc",
})


def __getattr__(name: str) -> Any:
    if name in _API:
        from intercept import api

        return getattr(api, name)
    raise AttributeError(f"module 'intercept' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
