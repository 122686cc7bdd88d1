"""How the client reaches an agent's SSH port.

A transport only opens the SSH connection; everything above it (authentication,
routes, channels) is the same whichever transport carries it. Direct TCP is used for
``intercept start --agent HOST:PORT`` and from inside the cluster; the Kubernetes
port-forward transport (thread-based client) lives in its own module.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import asyncssh

from intercept.errors import AgentUnreachable


class Transport(Protocol):
    def describe(self) -> str: ...

    async def connect(self, **ssh_options: Any) -> asyncssh.SSHClientConnection: ...


@dataclass(frozen=True)
class DirectTransport:
    """Plain TCP to HOST:PORT."""

    host: str
    port: int
    timeout: float = 10.0

    def describe(self) -> str:
        return f"{self.host}:{self.port}"

    async def connect(self, **ssh_options: Any) -> asyncssh.SSHClientConnection:
        try:
            return await asyncssh.connect(self.host, self.port, connect_timeout=self.timeout, **ssh_options)
        except (OSError, asyncio.TimeoutError) as e:
            reason = getattr(e, "strerror", None) or str(e) or "timed out"
            raise AgentUnreachable(
                f"agent {self.describe()} is unreachable: {reason}; check the address and that the agent runs"
            ) from None


@dataclass(frozen=True)
class ServiceTransport:
    """Names a Kubernetes Service; its agents are reached through their pods (see fleet and portforward)."""

    namespace: str
    service: str

    def describe(self) -> str:
        return f"service {self.namespace}/{self.service}"

    async def connect(self, **ssh_options: Any) -> asyncssh.SSHClientConnection:
        raise AgentUnreachable(f"{self.describe()} is reached through its agent pods, not directly")
