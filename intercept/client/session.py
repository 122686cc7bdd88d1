"""A developer's connection to an agent: authenticate, register the route, bring requests home.

:class:`AgentSession` is one SSH connection to one agent with one route on it.
:func:`keep_intercepting` holds a session up until told to stop, reconnecting with
backoff and registering the route again when the connection drops.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from intercept.agent.sshd import CONTROL_SUBSYSTEM, ENCRYPTION_ALGS, FORWARD_HOST, FORWARD_PORT, KEEPALIVE_COUNT_MAX, KEEPALIVE_INTERVAL
from intercept.client.door import LocalDoor
from intercept.client.transport import Transport
from intercept.credentials import Credentials
from intercept.errors import (
    AgentUnreachable,
    AuthenticationFailed,
    HostKeyMismatch,
    InterceptError,
    RouteConflict,
    UsageError,
)
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

    async def open(self) -> None:
        """Connect, pin the host key, authenticate and register the route; typed errors on failure."""
        await self.connect()
        await self._register()

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
            self.agent = await self.request(op="hello")
        except (asyncssh.Error, OSError) as e:
            self.conn.close()
            raise AgentUnreachable(f"agent {where}: connection lost while opening the control channel: {e}") from None

    async def _register(self) -> None:
        opts = self.options
        where = opts.transport.describe()
        try:
            await self.conn.create_server(self.door.accept, FORWARD_HOST, FORWARD_PORT)
            reply = await self.request(op="register", rules=opts.route.to_json(), all=opts.all_traffic)
        except (asyncssh.Error, OSError) as e:
            self.conn.close()
            raise AgentUnreachable(f"agent {where}: connection lost while registering: {e}") from None
        if not reply.get("ok"):
            self.conn.close()
            if reply.get("error") == "conflict":
                raise RouteConflict(reply["message"], holder=reply.get("holder"))
            raise UsageError(f"agent {where} refused the route: {reply.get('message')}")
        self.route_id = reply["id"]
        log.info("route %s registered on %s", opts.route.describe(), where)

    async def request(self, **message: Any) -> dict[str, Any]:
        """One request on the control channel and its reply."""
        writer, reader = self._control
        async with self._control_lock:
            writer.write(json.dumps(message).encode() + b"\n")
            line = await reader.readline()
        if not line:
            raise asyncssh.ConnectionLost("control channel closed")
        return json.loads(line)

    async def wait_closed(self) -> None:
        await self.conn.wait_closed()

    async def leave(self) -> None:
        """Unregister the route and close; the agent would drop it on close anyway."""
        if self.conn is None:
            return
        try:
            if self.route_id is not None:
                await asyncio.wait_for(self.request(op="unregister", id=self.route_id), 5)
        except (asyncssh.Error, OSError, asyncio.TimeoutError, ValueError) as e:
            log.debug("unregister failed: %s", e)
        self.conn.close()
        await self.conn.wait_closed()


@dataclass(frozen=True)
class Event:
    """Something the developer should hear about; the CLI prints ``intercept: KIND: MESSAGE``."""

    kind: str  # ready | waiting | joined | gone | reconnecting | reconnected | left | exited
    message: str


async def keep_intercepting(
    options: InterceptOptions, report: Callable[[Event], None], stop: asyncio.Event
) -> None:
    """Hold the intercept up until ``stop`` is set.

    The first connection's errors are raised as they are. Later, a lost connection is
    retried with backoff (0.5 s doubling to 10 s) for as long as the agent is
    unreachable; an authentication, host key or conflict error on reconnect is raised
    (except, for a while, our own route still held by the agent for the connection it
    has not yet seen die). This is a :class:`~intercept.client.fleet.Fleet` of the one
    agent ``options.transport``.
    """
    from intercept.client.fleet import Fleet, Replica, fixed  # fleet.py builds on this module

    replica = Replica(options.transport.describe(), options.transport)
    await Fleet(options, report, count_replicas=False, first_attempts=1).run(fixed([replica]), stop)


__all__ = ["AgentSession", "Event", "InterceptError", "InterceptOptions", "keep_intercepting"]
