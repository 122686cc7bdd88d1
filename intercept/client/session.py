"""A developer's connection to an agent: authenticate, register the route, bring requests home.

:class:`AgentSession` is one SSH connection to one agent with one route on it;
:class:`~intercept.client.fleet.Fleet` keeps one per agent replica up, reconnecting.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from intercept import protocol
from intercept.protocol import CONTROL_SUBSYSTEM, ENCRYPTION_ALGS, FORWARD_HOST, FORWARD_PORT, KEEPALIVE_COUNT_MAX, KEEPALIVE_INTERVAL, Refusal
from intercept.client.door import LocalDoor
from intercept.client.transport import Transport
from intercept.credentials import Credentials
from intercept.errors import (
    AgentUnreachable,
    AuthenticationFailed,
    HostKeyMismatch,
    RouteConflict,
    UsageError,
)
from intercept.routing.fence import Fence
from intercept.routing.match import Route

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterceptOptions:
    transport: Transport
    credentials: Credentials
    route: Route
    name: str  # the developer's display name, sent as the SSH user name
    local_port: int
    local_host: str = "127.0.0.1"
    all_traffic: bool = False
    ttl: float | None = None  # seconds after which the agents end the route by themselves
    fence: Fence = Fence(owner="this session")  # narrows the agents' outbound fence for this intercept
    # Where the credentials come from again (a workload's Secret), to tell a reinstalled agent's
    # new host key from an impersonation; None in direct mode (the file is all there is).
    refresh_credentials: Callable[[], Awaitable[Credentials]] | None = field(default=None, compare=False)

    def describe(self) -> str:
        return f"requests with {self.route.describe()}" if self.route.rules else "all requests"


class AgentSession:
    """One SSH connection to one agent, with this developer's route registered on it."""

    def __init__(self, options: InterceptOptions, door: LocalDoor | None = None) -> None:
        self.options = options
        self.door = door or LocalDoor(options.name, options.local_port, options.local_host)
        self.conn: asyncssh.SSHClientConnection | None = None
        self._control: tuple[asyncssh.SSHWriter[bytes], asyncssh.SSHReader[bytes]] | None = None
        self._control_lock = asyncio.Lock()  # one request at a time: replies come in order
        self.route_id: int | None = None
        self.agent: dict[str, Any] = {}  # what the agent says of itself (hello)
        self.fence = ""  # the outbound fence in effect for this session, described

    async def open(self) -> None:
        """Connect, pin the host key, authenticate, narrow the outbound fence (``options.fence``)
        and register the route; typed errors on failure."""
        await self.connect()
        await self._narrow()
        await self._register()

    async def _narrow(self) -> None:
        fence = self.options.fence
        agent_fence = self.agent.get("fence") or {}
        self.fence = Fence.parse(agent_fence.get("allow", ()), agent_fence.get("deny", ())).describe()
        if not self.agent.get("outbound"):
            self.fence = "off"  # the agent allows no outbound connection at all
        if fence.open:
            return
        try:
            reply = await self.request(protocol.Fence(**fence.to_json()))
        except (asyncssh.Error, OSError) as e:
            self.conn.close()
            raise AgentUnreachable(f"agent {self.options.transport.describe()}: connection lost while setting the outbound fence: {e}") from None
        if not reply.get("ok"):
            self.conn.close()
            raise UsageError(f"agent {self.options.transport.describe()} refused the outbound fence "
                             f"({fence.describe()}): {Refusal.from_json(reply).message}")
        if self.agent.get("outbound"):
            self.fence = str(reply.get("description", fence.describe()))

    async def connect(self) -> None:
        """Connect, pin the host key, authenticate and open the control channel (no route yet)."""
        opts = self.options
        where = opts.transport.describe()
        try:
            self.conn = await opts.transport.connect(
                username=opts.name,
                password=opts.credentials.token,
                known_hosts=([asyncssh.import_public_key(opts.credentials.host_public_key)], [], []),
                client_keys=None,
                agent_path=None,
                preferred_auth="password",
                encryption_algs=ENCRYPTION_ALGS,
                keepalive_interval=KEEPALIVE_INTERVAL,
                keepalive_count_max=KEEPALIVE_COUNT_MAX,
                config=None,
            )
        except asyncssh.HostKeyNotVerifiable:
            raise HostKeyMismatch(
                f"agent {where} presented a host key that is not the one in the credentials: "
                "possible impersonation; refusing to connect. Check that --credentials belongs to this agent"
            ) from None
        except asyncssh.PermissionDenied:
            raise AuthenticationFailed(
                f"agent {where} refused the access token; use the credentials file of this agent (--credentials)"
            ) from None
        except (asyncssh.Error, OSError) as e:
            raise AgentUnreachable(f"agent {where}: SSH connection failed: {e}; check the address and that the agent runs") from None
        try:
            writer, reader, _ = await self.conn.open_session(subsystem=CONTROL_SUBSYSTEM, encoding=None)
            self._control = (writer, reader)
            self.agent = await self.request(protocol.Hello())
        except (asyncssh.Error, OSError) as e:
            self.conn.close()
            raise AgentUnreachable(f"agent {where}: connection lost while opening the control channel: {e}") from None

    async def _register(self) -> None:
        opts = self.options
        where = opts.transport.describe()
        try:
            await self.conn.create_server(self.door.accept, FORWARD_HOST, FORWARD_PORT)
            reply = await self.request(protocol.Register(opts.route.to_json(), opts.all_traffic, opts.ttl))
        except (asyncssh.Error, OSError) as e:
            self.conn.close()
            raise AgentUnreachable(f"agent {where}: connection lost while registering: {e}") from None
        if not reply.get("ok"):
            self.conn.close()
            refusal = Refusal.from_json(reply)
            if refusal.error == "conflict":
                raise RouteConflict(refusal.message, holder=refusal.holder)
            raise UsageError(f"agent {where} refused the route: {refusal.message}")
        self.route_id = reply["id"]
        log.info("route %s registered on %s", opts.route.describe(), where)

    async def request(self, request: protocol.Request) -> dict[str, Any]:
        """One request on the control channel and its reply."""
        writer, reader = self._control
        async with self._control_lock:
            writer.write(protocol.encode(request))
            line = await reader.readline()
        if not line:
            raise asyncssh.ConnectionLost("control channel closed")
        return json.loads(line)

    async def wait_closed(self) -> None:
        await self.conn.wait_closed()

    async def withdraw(self) -> None:
        """Unregister the route (new requests go elsewhere at once) and ask the agent to close
        each channel at the end of its response, idle ones now; the connection stays open so
        that responses in flight can finish. Failures are logged: closing drops the route anyway."""
        if self.conn is None:
            return
        for request in ([protocol.Unregister(self.route_id)] if self.route_id is not None else []) + [protocol.Drain()]:
            try:
                await asyncio.wait_for(self.request(request), 5)
            except (asyncssh.Error, OSError, asyncio.TimeoutError, ValueError) as e:
                log.debug("%s failed: %s", request.op, e)
                return
        self.route_id = None

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            await self.conn.wait_closed()

    async def leave(self) -> None:
        """Unregister the route and close; the agent would drop it on close anyway."""
        if self.conn is None:
            return
        try:
            if self.route_id is not None:
                await asyncio.wait_for(self.request(protocol.Unregister(self.route_id)), 5)
        except (asyncssh.Error, OSError, asyncio.TimeoutError, ValueError) as e:
            log.debug("unregister failed: %s", e)
        await self.close()


__all__ = ["AgentSession", "InterceptOptions"]
