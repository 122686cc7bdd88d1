"""A developer's connection to an agent: authenticate, register the route, bring requests home.

:class:`AgentSession` is one SSH connection to one agent with one route on it;
:class:`~intercept.client.fleet.Fleet` keeps one per agent replica up, reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from intercept import protocol
from intercept.protocol import (
    CONTROL_SUBSYSTEM,
    ENCRYPTION_ALGS,
    FORWARD_HOST,
    FORWARD_PORT,
    KEEPALIVE_COUNT_MAX,
    KEEPALIVE_INTERVAL,
    PORT_FORWARD_HOST,
    Refusal,
)
from intercept.client.door import LocalDoor
from intercept.client.transport import Transport
from intercept.credentials import Credentials
from intercept.errors import (
    InterceptError,
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
    # (app port, local port) for each port intercepted: requests that came to the agent's
    # listener for that app port reach that local port. (): the agent's first port, to local_port.
    ports: tuple[tuple[int, int], ...] = ()
    local_host: str = "127.0.0.1"
    all_traffic: bool = False
    mirror: bool = False  # a copy of each matching request comes here; the app still answers it
    ttl: float | None = None  # seconds after which the agents end the route by themselves
    fence: Fence = Fence(owner="this session")  # narrows the agents' outbound fence for this intercept
    # Where the credentials come from again (a workload's Secret), to tell a reinstalled agent's
    # new host key from an impersonation; None in direct mode (the file is all there is).
    refresh_credentials: Callable[[], Awaitable[Credentials]] | None = field(default=None, compare=False)
    # A workload with no Service replaced by this intercept (deployment/worker): no request comes,
    # and the lines say what the route holds instead.
    replacing: str | None = None

    def describe(self) -> str:
        what = f"requests with {self.route.describe()}" if self.route.rules else "all requests"
        return f"copies of {what}" if self.mirror else what

    @property
    def gone(self) -> str:
        """What leaving does to the traffic, said after :meth:`describe`."""
        return "stop coming here" if self.mirror else "go to the cluster again"

    def destinations(self) -> str:
        """Where routed requests go: ``localhost:3000``, or per app port with several."""
        if len(self.ports) <= 1:
            return f"localhost:{self.ports[0][1] if self.ports else self.local_port}"
        return ", ".join(f"port {app} to localhost:{local}" for app, local in self.ports)


# Requests that only an agent with the feature understands (protocol.FEATURES).
_FEATURE_OF = {protocol.CheckOutbound: "check-outbound", protocol.SetClusterRoutes: "signed-pushes"}


class AgentSession:
    """One SSH connection to one agent, with this developer's route registered on it."""

    def __init__(self, options: InterceptOptions, door: LocalDoor | None = None) -> None:
        self.options = options
        self.door = door or LocalDoor(options.name, options.local_port, options.local_host)
        self.conn: asyncssh.SSHClientConnection | None = None
        self._control: tuple[asyncssh.SSHWriter[bytes], asyncssh.SSHReader[bytes]] | None = None
        self._control_lock = asyncio.Lock()  # one request at a time: replies come in order
        self.route_id: int | None = None
        self.agent = protocol.HelloReply()  # what the agent says of itself (hello)
        self.fence = ""  # the outbound fence in effect for this session, described

    async def open(self) -> None:
        """Connect, pin the host key, authenticate, narrow the outbound fence (``options.fence``)
        and register the route; typed errors on failure."""
        await self.connect()
        await self._narrow()
        await self._register()

    async def open_unrouted(self) -> None:
        """Connect and narrow the outbound fence, registering no route: a session that only
        reaches the cluster (``intercept connect``). The agent counts it as in use from here
        (:class:`~intercept.protocol.Reach`), before its first connection: ``intercept gc``
        does not remove an agent a connect has just logged in to."""
        await self.connect()
        if self.agent.lacks("reach") is None:
            try:
                reply = await self.request(protocol.Reach())
            except (asyncssh.Error, OSError) as e:
                self.conn.close()
                raise AgentUnreachable(f"agent {self.options.transport.describe()}: connection lost while saying it "
                                       f"reaches the cluster: {e}") from None
            if isinstance(reply, Refusal):
                log.info("agent %s: %s", self.options.transport.describe(), reply.message)
        await self._narrow()

    async def check_outbound(self, host: str, port: int) -> str | None:
        """Why the agent's outbound fence (then this session's) refuses ``host:port``, or None when it passes."""
        reply = await self.request(protocol.CheckOutbound(host, port))
        if isinstance(reply, Refusal) and reply.error == "fenced":
            return reply.message
        return None

    async def _narrow(self) -> None:
        fence = self.options.fence
        agent_fence = self.agent.fence
        self.fence = Fence.parse(agent_fence.get("allow", ()), agent_fence.get("deny", ())).describe()
        if not self.agent.outbound:
            self.fence = "off"  # the agent allows no outbound connection at all
        if fence.open:
            return
        try:
            reply = await self.request(protocol.Fence(**fence.to_json()))
        except (asyncssh.Error, OSError) as e:
            self.conn.close()
            raise AgentUnreachable(f"agent {self.options.transport.describe()}: connection lost while setting the outbound fence: {e}") from None
        if isinstance(reply, Refusal):
            self.conn.close()
            raise UsageError(f"agent {self.options.transport.describe()} refused the outbound fence "
                             f"({fence.describe()}): {reply.message}")
        if self.agent.outbound:
            self.fence = reply.description or fence.describe()

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
            hello = await self.request(protocol.Hello())
        except (asyncssh.Error, OSError) as e:
            self.conn.close()
            raise AgentUnreachable(f"agent {where}: connection lost while opening the control channel: {e}") from None
        if isinstance(hello, Refusal):
            self.conn.close()
            raise AgentUnreachable(f"agent {where} did not say hello: {hello.message}")
        self.agent = hello

    async def _register(self) -> None:
        opts = self.options
        where = opts.transport.describe()
        unknown = sorted({rule.kind for rule in opts.route.rules} - set(self.agent.rule_kinds))
        if unknown:  # an older agent: say so, rather than let it answer "unknown kind"
            self.conn.close()
            raise UsageError(f"agent {where} (intercept {self.agent.agent_version}, control protocol "
                             f"{self.agent.protocol}) does not know the rule kind {', '.join(map(repr, unknown))} of "
                             "this route: upgrade it (intercept inject SERVICE --agent-image IMAGE of this version), "
                             "or route with other rules")
        if opts.mirror and self.agent.lacks("mirror"):
            self.conn.close()
            raise UsageError(f"agent {where}: {self.agent.lacks('mirror')}")
        try:
            await self._forward(where)
            if not self.agent.lacks("early-data"):  # the door writes what a channel's opening carries (LocalDoor)
                await self.request(protocol.EarlyData())
            reply = await self.request(protocol.Register(opts.route.to_json(), opts.all_traffic, opts.ttl, opts.mirror))
        except (asyncssh.Error, OSError) as e:
            self.conn.close()
            raise AgentUnreachable(f"agent {where}: connection lost while registering: {e}") from None
        if isinstance(reply, Refusal):
            self.conn.close()
            if reply.error == "conflict":
                raise RouteConflict(reply.message, holder=reply.holder)
            raise UsageError(f"agent {where} refused the route: {reply.message}")
        self.route_id = reply.id
        log.info("%s %s registered on %s", "mirror of" if opts.mirror else "route", opts.route.describe(), where)

    async def _forward(self, where: str) -> None:
        """Ask the agent for the routed connections of each port intercepted (``options.ports``):
        per app port where the agent has several (feature ``ports``), else its first port."""
        ports = self.options.ports
        if ports and not self.agent.lacks("ports"):
            for app_port, local_port in ports:
                if app_port not in self.agent.ports:
                    self.conn.close()
                    raise UsageError(f"agent {where} is in front of the app's port{'s' if len(self.agent.ports) > 1 else ''} "
                                     f"{', '.join(map(str, self.agent.ports))}, not {app_port}: intercept one of those, "
                                     f"or put the agent in front of {app_port} too (intercept start SERVICE --port ... "
                                     f"--reinject, with every port it should serve)")
                await self.conn.create_server(self.door.acceptor(local_port), PORT_FORWARD_HOST, app_port)
            return
        if len(ports) > 1:
            self.conn.close()
            raise UsageError(f"agent {where}: several ports in one intercept need an agent in front of several; "
                             f"{self.agent.lacks('ports')}")
        await self.conn.create_server(self.door.acceptor(ports[0][1]) if ports else self.door.accept,
                                      FORWARD_HOST, FORWARD_PORT)

    async def request(self, request: protocol.Request) -> protocol.Reply | Refusal:
        """One request on the control channel and its typed reply, or the agent's refusal; a
        request for a feature the agent's hello does not list is refused here, naming it."""
        feature = _FEATURE_OF.get(type(request))
        if feature is not None and self.agent.lacks(feature):
            return Refusal("unsupported", self.agent.lacks(feature) or "")
        writer, reader = self._control
        async with self._control_lock:
            writer.write(protocol.encode(request))
            line = await reader.readline()
        if not line:
            raise asyncssh.ConnectionLost("control channel closed")
        return protocol.decode_reply(request, line)

    async def ask(self, request: protocol.Request) -> Any:
        """:meth:`request` for a reply the caller needs: a refusal raises :class:`InterceptError` with its reason."""
        reply = await self.request(request)
        if isinstance(reply, Refusal):
            raise InterceptError(f"agent {self.options.transport.describe()} refused {request.op}: {reply.message}")
        return reply

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
