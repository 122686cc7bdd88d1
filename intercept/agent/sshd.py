"""The agent's SSH server: token authentication, a control channel, channels back to clients.

Each client connection is one :class:`DeveloperSession`. The client asks for a
``tcpip-forward`` on the pseudo address ``intercept:1`` (nothing is bound in the pod);
the agent then opens one ``forwarded-tcpip`` channel per downstream connection that
matched the developer's route, and the client connects it to the local process.

Routes are registered over the control subsystem (the messages are
:mod:`intercept.protocol`'s): register, unregister, list, hello, env (the pod's
environment), drain and resume (around a restart of the developer's process).

Invariants: no shell, no exec, no port bound in answer to a client; ``direct-tcpip``
reaches the agent's own HTTP listener (the front door: a request sent there is routed
like cluster traffic), anything else only with ``allow_outbound``; a closed connection's
routes are dropped at once, and keepalive closes a silent one within 15 s.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
from typing import TYPE_CHECKING, Any

import asyncssh

from intercept import protocol
from intercept.errors import InterceptError, RouteConflict
from intercept.routing.cluster import RoutesDocument
from intercept.protocol import (
    CONTROL_SUBSYSTEM,
    ENCRYPTION_ALGS,
    FORWARD_HOST,
    FORWARD_PORT,
    FRONT_DOOR_HOST,
    FRONT_DOOR_PORT,
    KEEPALIVE_COUNT_MAX,
    KEEPALIVE_INTERVAL,
    BadRequest,
    Refusal,
)

if TYPE_CHECKING:
    from intercept.agent.agent import Agent
    from intercept.agent.proxy import ClientConnection

log = logging.getLogger(__name__)

_session_ids = itertools.count(1)


class ChannelLink(asyncssh.SSHTCPSession[bytes]):
    """An SSH channel to a developer's machine, as a :class:`~intercept.agent.proxy.Link`."""

    def __init__(self, owner: ClientConnection, session: DeveloperSession) -> None:
        self.owner = owner
        self.session = session
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None

    @property
    def reusable(self) -> bool:
        return not self.session.draining

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan
        self.session.links.add(self)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.owner.link_data(self, data)

    def eof_received(self) -> bool:
        return self.owner.link_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.links.discard(self)
        self.owner.link_lost(self)

    def pause_writing(self) -> None:
        self.owner.link_pause(self)

    def resume_writing(self) -> None:
        self.owner.link_resume(self)

    def write(self, data: bytes) -> None:
        try:
            self.chan.write(bytes(data))
        except BrokenPipeError:  # the developer's side closed: connection_lost follows
            pass

    def write_eof(self) -> None:
        self.chan.write_eof()

    def close(self) -> None:
        self.chan.close()

    def pause_reading(self) -> None:
        self.chan.pause_reading()

    def resume_reading(self) -> None:
        self.chan.resume_reading()


class _PseudoListener(asyncssh.SSHListener):
    """Accepts a client's tcpip-forward without binding anything in the pod."""

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


class DeveloperSession(asyncssh.SSHServer):
    """One client's SSH connection: who they are, whether they can receive requests, their routes."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.id = f"s{next(_session_ids)}"
        self.name = "?"
        self.peer: tuple[str, int] = ("", 0)
        self.conn: asyncssh.SSHServerConnection | None = None
        self.forwarding = False
        self.links: set[ChannelLink] = set()
        self.draining = False  # the developer's process restarts: keep no channel past its response

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.agent.session_closed(self, exc)

    def begin_auth(self, username: str) -> bool:
        self.name = username
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        ok = hmac.compare_digest(password.encode(), self.agent.credentials.token.encode())
        if ok:
            self.agent.session_opened(self)
        else:
            log.warning("refused %s from %s: wrong token", username, self.peer[0])
        return ok

    def session_requested(self) -> Any:
        return self.conn.create_server_channel(encoding=None), ControlChannel(self)

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        if (listen_host, listen_port) != (FORWARD_HOST, FORWARD_PORT):
            log.warning("refused tcpip-forward %s:%s from %s", listen_host, listen_port, self.name)
            return False
        self.forwarding = True
        return _PseudoListener()

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        if (dest_host, dest_port) == (FRONT_DOOR_HOST, FRONT_DOOR_PORT):
            # the agent's own listener: nothing is reached that cluster traffic could not reach
            host, port = self.agent.http_address
            return self.conn.forward_connection("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
        if not self.agent.config.allow_outbound:
            log.info("refused outbound connection to %s:%s from %s (agent started without --allow-outbound)", dest_host, dest_port, self.name)
            return False
        return True

    async def open_channel(self, owner: ClientConnection) -> ChannelLink:
        _, link = await self.conn.create_connection(
            lambda: ChannelLink(owner, self), FORWARD_HOST, FORWARD_PORT, self.peer[0], self.peer[1]
        )
        return link

    def drain(self, draining: bool) -> int:
        """While draining, channels close at the end of their response (idle ones now), so that
        the developer's old process sees no new request. Returns the channels still busy."""
        self.draining = draining
        if draining:
            for link in list(self.links):
                link.owner.release(link)
        return len(self.links)


class ControlChannel(asyncssh.SSHServerSession[bytes]):
    """The ``intercept`` subsystem: JSON lines in, one JSON line out per request."""

    def __init__(self, session: DeveloperSession) -> None:
        self.session = session
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.buf = b""

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == CONTROL_SUBSYSTEM

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.buf += data
        if len(self.buf) > protocol.MAX_CONTROL_LINE:
            self.chan.close()
            return
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            if line.strip():
                reply = self._handle(line)
                self.chan.write(json.dumps(reply).encode() + b"\n")

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = protocol.decode(line)
        except BadRequest as e:
            return Refusal("bad-request", str(e)).to_json()
        agent, session = self.session.agent, self.session
        try:
            match request:
                case protocol.Hello():
                    return {"ok": True, **agent.describe()}
                case protocol.Env():
                    return {"ok": True, "env": agent.pod_environment()}
                case protocol.ListRoutes():
                    return {"ok": True, "routes": agent.routes.snapshot()}
                case protocol.Register(rules=rules, all=everything, ttl=ttl):
                    route = agent.register(session, rules, everything, ttl)
                    return {"ok": True, "id": route.id, "description": route.route.describe()}
                case protocol.SetClusterRoutes(document=document):
                    return {"ok": True, **agent.apply_routes(RoutesDocument.from_json(document))}
                case protocol.Drain() | protocol.Resume():
                    return {"ok": True, "busy": session.drain(isinstance(request, protocol.Drain))}
                case protocol.Unregister(id=route_id):
                    agent.unregister(session, route_id)
                    return {"ok": True}
        except RouteConflict as e:
            return Refusal("conflict", str(e), e.holder).to_json()
        except InterceptError as e:
            return Refusal("invalid", str(e)).to_json()
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            return Refusal("bad-request", f"malformed {request.op} request: {e}").to_json()
        raise AssertionError(f"unhandled request {request!r}")  # every Request class has a case


async def start_server(agent: Agent, host: str, port: int, host_key: asyncssh.SSHKey) -> asyncssh.SSHAcceptor:
    return await asyncssh.create_server(
        lambda: DeveloperSession(agent),
        host,
        port,
        server_host_keys=[host_key],
        encryption_algs=ENCRYPTION_ALGS,
        keepalive_interval=KEEPALIVE_INTERVAL,
        keepalive_count_max=KEEPALIVE_COUNT_MAX,
        login_timeout=30,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        line_editor=False,
        reuse_address=True,
    )

