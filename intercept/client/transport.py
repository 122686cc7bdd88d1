"""How the client reaches an agent's SSH port.

A transport only opens the SSH connection; everything above it (authentication,
routes, channels) is the same whichever transport carries it. Direct TCP is used for
``intercept start --agent HOST:PORT`` and from inside the cluster; the Kubernetes
port-forward transport (thread-based client) lives in its own module.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import asyncssh

from intercept.errors import AgentUnreachable
from intercept.sshwrite import CoalescingTunnel

log = logging.getLogger(__name__)


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
            # asyncssh dials through the tunnel as it would itself, with one write(2) per SSH packet
            return await asyncssh.connect(
                self.host, self.port, connect_timeout=self.timeout, tunnel=CoalescingTunnel(), **ssh_options
            )
        except (OSError, asyncio.TimeoutError) as e:
            reason = getattr(e, "strerror", None) or str(e) or "timed out"
            raise AgentUnreachable(
                f"agent {self.describe()} is unreachable: {reason}; check the address and that the agent runs"
            ) from None


class FallbackTransport:
    """``first`` (a pod's IP, from inside the cluster), else ``then`` (the API server's
    port-forward) from the first time ``first`` is unreachable on: a NetworkPolicy that
    admits only the app's port drops a workspace pod's packets to the agent's SSH port,
    while a port-forward enters the pod without crossing the pod network.

    When both fail, the error says both reasons and how to admit the workspace."""

    def __init__(self, first: Transport, then: Transport) -> None:
        self.first = first
        self.then = then
        self.fell_back = False

    # equal when they dial the same two ways: a Fleet compares replicas to see whether one moved
    def __eq__(self, other: object) -> bool:
        return isinstance(other, FallbackTransport) and (self.first, self.then) == (other.first, other.then)

    def __hash__(self) -> int:
        return hash((self.first, self.then))

    def describe(self) -> str:
        return self.then.describe() if self.fell_back else self.first.describe()

    async def connect(self, **ssh_options: Any) -> asyncssh.SSHClientConnection:
        if not self.fell_back:
            try:
                return await self.first.connect(**ssh_options)
            except AgentUnreachable as e:
                log.warning("%s; trying %s (a NetworkPolicy may drop this pod's packets to the agent's SSH port)",
                            e, self.then.describe())
                first_error = e
            try:
                connection = await self.then.connect(**ssh_options)
            except AgentUnreachable as e:
                raise AgentUnreachable(
                    f"{first_error} (from this pod), and {e}; if a NetworkPolicy admits only the app's port, "
                    f"admit this workspace to the agent's SSH port (see the README: in-cluster workspaces)"
                ) from None
            self.fell_back = True
            return connection
        return await self.then.connect(**ssh_options)


@dataclass(frozen=True)
class ServiceTransport:
    """Names a Kubernetes Service; its agents are reached through their pods (see fleet and portforward)."""

    namespace: str
    service: str

    def describe(self) -> str:
        return f"service {self.namespace}/{self.service}"

    async def connect(self, **ssh_options: Any) -> asyncssh.SSHClientConnection:
        raise AgentUnreachable(f"{self.describe()} is reached through its agent pods, not directly")
