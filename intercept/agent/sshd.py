"""The agent's SSH server: token authentication, a control channel, channels back to clients.

Each client connection is one :class:`DeveloperSession`. The client asks for a
``tcpip-forward`` on the pseudo address ``intercept:1`` (nothing is bound in the pod);
the agent then opens one ``forwarded-tcpip`` channel per downstream connection that
matched the developer's route, and the client connects it to the local process. Opening
a channel costs a round trip to the developer's machine, so for a client that asks
(``early-data``) a request without a body goes with the channel's opening: the client
writes it to its process before it confirms (:meth:`DeveloperSession.open_channel`).

A session channel is either the control subsystem or ``sftp``: the pod's files, served
read-only (:mod:`intercept.agent.files`) when the agent serves any, on a few channels per
session (:data:`intercept.agent.files.MAX_CHANNELS_PER_SESSION`).

Routes are registered over the control subsystem (the messages are
:mod:`intercept.protocol`'s): register, unregister, list, hello, env (the pod's
environment), drain and resume (around a restart of the developer's process). A
session's routes lead only to its own channel; routes to anywhere else (sandboxes) come
from the mounted routes file, or from a ``cluster-routes`` push signed by the routes
authority that file names (:mod:`intercept.routing.cluster`), which a token alone cannot make.

Invariants: no shell, no exec, no port bound in answer to a client; ``direct-tcpip``
reaches the agent's own HTTP listener (the front door: a request sent there is routed
like cluster traffic, and no fence applies to it), anything else only with
``allow_outbound`` and only where the agent's outbound fence and then the session's let
it (:mod:`intercept.routing.fence`: the session's rules can narrow the agent's, never
widen them; the host is reduced to the one address or name it means, a name is resolved
here in that form, and only what passed is dialled, never the client's text); a
closed connection's routes are dropped at once, and keepalive closes a silent one within
15 s.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import itertools
import json
import logging
import socket
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import asyncssh

from intercept import protocol
from intercept.agent.agent import LOGIN_TIMEOUT
from intercept.agent.sftp import FileService, sftp_session
from intercept.errors import InterceptError, RouteConflict, UnverifiedPush
from intercept.routing.fence import Destination, Fence, Verdict, check_all
from intercept.protocol import (
    CONTROL_SUBSYSTEM,
    ENCRYPTION_ALGS,
    FORWARD_HOST,
    FORWARD_PORT,
    PORT_FORWARD_HOST,
    FRONT_DOOR_HOST,
    FRONT_DOOR_PORT,
    FENCE_REFUSED,
    FILES_SUBSYSTEM,
    KEEPALIVE_COUNT_MAX,
    KEEPALIVE_INTERVAL,
    BadRequest,
    Refusal,
    Reply,
)
from intercept.sshbridge import bridge_to
from intercept.sshshare import ChannelSender
from intercept.sshwrite import CoalescingTunnel

if TYPE_CHECKING:
    from intercept.agent.agent import Agent, Front
    from intercept.agent.proxy import ClientConnection

log = logging.getLogger(__name__)

_session_ids = itertools.count(1)


class ChannelLink(asyncssh.SSHTCPSession[bytes]):
    """An SSH channel to a developer's machine, as a :class:`~intercept.agent.proxy.Link`.

    One opened for early data (``carried``: :class:`~intercept.protocol.EarlyData`) is not read
    before its owner takes it, since the answer may come with the opening's confirmation."""

    def __init__(self, owner: ClientConnection, session: DeveloperSession, carried: bool = False) -> None:
        self.owner = owner
        self.session = session
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.sender: ChannelSender | None = None  # what goes to the developer, taking turns with other channels
        # its opening carried the first bytes (EarlyData): they are not written again, and the
        # answer, which may come with the confirmation, is not read before the owner takes the link
        self.carried = carried

    @property
    def reusable(self) -> bool:
        return not self.session.draining

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan
        self.sender = ChannelSender(chan, lambda: self.owner.link_pause(self), lambda: self.owner.link_resume(self))
        if self.carried:
            chan.pause_reading()  # until the owner takes the link (its _send_head resumes it)
        self.session.links.add(self)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.owner.link_data(self, data)

    def eof_received(self) -> bool:
        return self.owner.link_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sender.lost()
        self.session.links.discard(self)
        self.owner.link_lost(self)

    # the developer's window is used up / open again: the sender holds the bytes and pauses the owner
    def pause_writing(self) -> None:
        self.sender.channel_paused()

    def resume_writing(self) -> None:
        self.sender.channel_resumed()

    def write(self, data: bytes) -> None:
        try:
            self.sender.write(bytes(data))
        except BrokenPipeError:  # the developer's side closed: connection_lost follows
            pass

    def write_eof(self) -> None:
        self.sender.write_eof()

    def buffered(self) -> int:
        """Bytes written and not yet sent: the developer's end has not opened its window for them."""
        return self.chan.get_write_buffer_size()

    def close(self) -> None:
        self.sender.close()  # after what was written before it

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

    def __init__(self, agent: Agent, files: FileService | None = None) -> None:
        self.agent = agent
        self.files = files  # the pod's files, shared by every session (None: the agent serves none)
        self.id = f"s{next(_session_ids)}"
        self.name = "?"
        self.peer: tuple[str, int] = ("", 0)
        self.conn: asyncssh.SSHServerConnection | None = None
        self.forwarding = False
        self.first_port = False  # forwarding on (FORWARD_HOST, FORWARD_PORT): the agent's first port
        self.ports: set[int] = set()  # the app ports forwarded on (PORT_FORWARD_HOST, port)
        self.links: set[ChannelLink] = set()
        self.takes_early_data = False  # the client asked for it (EarlyData): an opening may carry the first bytes
        self.draining = False  # the developer's process restarts: keep no channel past its response
        self.fence = Fence(owner="this session")  # the client's narrowing of the agent's fence
        # it reaches the cluster through this pod (intercept connect): the agent is in use. Set by a Reach request
        # (connect's sessions, at once after login) or by a connection the fences let through, never by a refused one
        self.reaching = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.agent.login_started(self)

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
        return self.conn.create_server_channel(encoding=None), SubsystemChannel(self)

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        if (listen_host, listen_port) == (FORWARD_HOST, FORWARD_PORT):
            self.first_port = True
        elif listen_host == PORT_FORWARD_HOST and self.agent.front_of(listen_port) is not None:
            self.ports.add(listen_port)
        else:
            log.warning("refused tcpip-forward %s:%s from %s", listen_host, listen_port, self.name)
            return False
        self.forwarding = True
        return _PseudoListener()

    def takes(self, front: Front) -> bool:
        """Whether this developer intercepts the app port of ``front``."""
        return front.port in self.ports or (self.first_port and front.index == 0)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        if (dest_host, dest_port) == (FRONT_DOOR_HOST, FRONT_DOOR_PORT):
            # the agent's own listener: nothing is reached that cluster traffic could not reach
            host, port = self.agent.http_address
            return bridge_to("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
        if not self.agent.config.allow_outbound:
            log.info("refused outbound connection to %s:%s from %s (agent started without --allow-outbound)", dest_host, dest_port, self.name)
            return False
        if self.agent.fence.open and self.fence.open:
            self.reaching = True
            return bridge_to(dest_host, dest_port)  # not asyncssh's forwarder: it loses what a server says first
        return self._fenced_connection(dest_host, dest_port)

    def fences(self) -> tuple[Fence, Fence]:
        """The fences a connection of this session passes, in order: the agent's, then its own."""
        return self.agent.fence, self.fence

    async def check_outbound(self, host: str, port: int) -> Verdict:
        """Whether ``host:port`` passes this session's fences. The host is reduced to the one
        thing it means first (:class:`~intercept.routing.fence.Destination`); a name is
        resolved here, in that form, when an address rule must judge it."""
        fences = self.fences()
        destination = Destination.of(host)
        addresses: list[str] | None = None
        if destination.name is not None and any(f.has_address_rules for f in fences):
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(destination.lookup, port, type=socket.SOCK_STREAM)
                addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            except (OSError, UnicodeError) as e:
                log.info("outbound %s:%s for %s: %s", destination.name, port, self.name, e)
                addresses = []
        return check_all(fences, destination, port, addresses)

    async def _fenced_connection(self, host: str, port: int) -> Any:
        verdict = await self.check_outbound(host, port)
        if not verdict.allowed:
            log.info("refused outbound connection from %s: %s", self.name, verdict.reason)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, FENCE_REFUSED + verdict.reason)
        self.reaching = True  # only once the fences let it through: a refused attempt does not keep the agent busy
        error: asyncssh.ChannelOpenError | None = None
        for address in verdict.dial:  # what was judged, never the client's text nor the name resolved again
            try:
                return await bridge_to(address, port)
            except asyncssh.ChannelOpenError as e:
                error = e
        raise error

    async def open_channel(self, owner: ClientConnection, front: Front, first: bytes = b"") -> ChannelLink:
        """A channel to the developer for a connection that came to ``front``'s port (a round
        trip to their machine). With ``first`` (the bytes to send first: a request without a
        body) and a client that takes early data, they go with the opening, so the request
        reaches the process as soon as the opening does (the link's ``carried`` says so)."""
        key = (PORT_FORWARD_HOST, front.port) if front.port in self.ports else (FORWARD_HOST, FORWARD_PORT)
        if first and self.takes_early_data and len(first) <= protocol.EARLY_DATA_MAX:
            _, link = await self.conn.create_connection(lambda: ChannelLink(owner, self, carried=True), *key,
                                                        protocol.early_data_origin(first), 0)
        else:
            _, link = await self.conn.create_connection(lambda: ChannelLink(owner, self), *key, *self.peer)
        return link

    def drain(self, draining: bool) -> int:
        """While draining, channels close at the end of their response (idle ones now), so that
        the developer's old process sees no new request. Returns the channels still busy."""
        self.draining = draining
        if draining:
            for link in list(self.links):
                link.owner.release(link)
        return len(self.links)


class SubsystemChannel(asyncssh.SSHServerSession[bytes]):
    """A session channel: no shell, no exec, no pty; one of two subsystems, chosen when it is
    asked for: ``intercept`` (:class:`ControlChannel`) or ``sftp`` (the pod's files, read-only,
    when the agent serves any: :mod:`intercept.agent.files`). Everything after is the chosen
    one's."""

    def __init__(self, session: DeveloperSession) -> None:
        self.session = session
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.chosen: Any = None
        self.files: FileService | None = None  # when the chosen one is sftp: whose channel quota it counts in

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        if self.chosen is not None:
            return False
        files = self.session.files
        if subsystem == CONTROL_SUBSYSTEM:
            self.chosen = ControlChannel(self.session)
        elif subsystem == FILES_SUBSYSTEM and files is not None:
            refusal = files.channels.take(self.session.id)
            if refusal is not None:
                log.info("refused the pod's files to %s: %s", self.session.name, refusal)
                return False
            self.files = files
            self.chosen = sftp_session(files, self.session.id, self.session.name)
            log.info("%s opened the pod's files", self.session.name)
        else:
            log.info("refused subsystem %r from %s", subsystem, self.session.name)
            return False
        self.chosen.connection_made(self.chan)
        return bool(self.chosen.subsystem_requested(subsystem))

    def session_started(self) -> None:
        if self.chosen is not None:
            self.chosen.session_started()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.chosen is not None:
            self.chosen.data_received(data, datatype)

    def eof_received(self) -> bool:
        return bool(self.chosen.eof_received()) if self.chosen is not None else False

    def pause_writing(self) -> None:
        if self.chosen is not None:
            self.chosen.pause_writing()

    def resume_writing(self) -> None:
        if self.chosen is not None:
            self.chosen.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.files is not None:
            self.files.channels.give(self.session.id)
        if self.chosen is not None:
            self.chosen.connection_lost(exc)


class ControlChannel(asyncssh.SSHServerSession[bytes]):
    """The ``intercept`` subsystem: JSON lines in, one JSON line out per request, in order.

    Most requests are answered at once; one that must wait (a name to resolve) holds the
    requests behind it until its reply is written.
    """

    def __init__(self, session: DeveloperSession) -> None:
        self.session = session
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.buf = b""
        self._queue: collections.deque[bytes] = collections.deque()
        self._busy: asyncio.Future[dict[str, Any]] | None = None

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
        self._queue.extend(line for line in lines if line.strip())
        self._serve()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._busy is not None:
            self._busy.cancel()

    def _serve(self) -> None:
        while self._queue and self._busy is None:
            reply = self._handle(self._queue.popleft())
            if isinstance(reply, Reply | Refusal):
                self._write(reply)
                continue
            self._busy = asyncio.ensure_future(reply)
            self._busy.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Future[Reply | Refusal]) -> None:
        self._busy = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("a control request failed", exc_info=error)
            self._write(Refusal("invalid", f"the agent failed to answer: {error}"))
        else:
            self._write(task.result())
        self._serve()

    def _write(self, reply: Reply | Refusal) -> None:
        try:
            self.chan.write(json.dumps(reply.to_json()).encode() + b"\n")
        except (BrokenPipeError, asyncssh.Error) as e:  # the client went: nothing to answer
            log.debug("control reply not sent: %s", e)

    async def _check_outbound(self, request: protocol.CheckOutbound) -> Reply | Refusal:
        if not self.session.agent.config.allow_outbound:
            return Refusal("invalid", "the agent does not allow outbound connections (it runs without --allow-outbound)")
        verdict = await self.session.check_outbound(request.host, request.port)
        if not verdict.allowed:  # a refused attempt is no use of the pod: it does not keep the agent from idling
            return Refusal("fenced", verdict.reason)
        self.session.reaching = True
        return protocol.OutboundReply(list(verdict.dial))

    def _handle(self, line: bytes) -> Reply | Refusal | Coroutine[Any, Any, Reply | Refusal]:
        try:
            request = protocol.decode(line)
        except BadRequest as e:
            return Refusal("bad-request", str(e))
        agent, session = self.session.agent, self.session
        try:
            match request:
                case protocol.Hello():
                    return agent.hello()
                case protocol.Env():
                    return protocol.EnvReply(agent.pod_environment())
                case protocol.ListRoutes():
                    return protocol.RoutesReply(agent.routes.snapshot())
                case protocol.Register(rules=rules, all=everything, ttl=ttl, mirror=mirror):
                    route = agent.register(session, rules, everything, ttl, mirror=mirror)
                    return protocol.Registered(route.id, route.route.describe())
                case protocol.SetClusterRoutes(document=text, signature=signature):
                    return protocol.PushReply(**agent.push_routes(text, signature))
                case protocol.Drain() | protocol.Resume():
                    return protocol.Drained(session.drain(isinstance(request, protocol.Drain)))
                case protocol.Unregister(id=route_id):
                    agent.unregister(session, route_id)
                    return protocol.Done()
                case protocol.EarlyData():
                    session.takes_early_data = True
                    return protocol.Done()
                case protocol.Fence(allow=allow, deny=deny):
                    session.fence = Fence.parse(allow, deny, owner="this session")
                    log.info("%s narrows its outbound connections: %s", session.name, session.fence.describe())
                    return protocol.FenceReply(**agent.fence_of(session))
                case protocol.CheckOutbound():
                    return self._check_outbound(request)  # a coroutine: _serve awaits it
                case protocol.Reach():
                    if not agent.config.allow_outbound:
                        return Refusal("invalid", "the agent does not allow outbound connections (it runs without "
                                                  "--allow-outbound): nothing is reached through it")
                    session.reaching = True
                    log.info("%s reaches the cluster through this pod", session.name)
                    return protocol.Done()
        except RouteConflict as e:
            return Refusal("conflict", str(e), e.holder)
        except UnverifiedPush as e:
            log.warning("%s: %s", session.name, e)
            return Refusal("forbidden", str(e))
        except InterceptError as e:
            return Refusal("invalid", str(e))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            return Refusal("bad-request", f"malformed {request.op} request: {e}")
        raise AssertionError(f"unhandled request {request!r}")  # every Request class has a case


async def start_server(agent: Agent, sock: socket.socket, host_key: asyncssh.SSHKey) -> asyncssh.SSHAcceptor:
    """Serve developers' SSH sessions on ``sock``, a bound and listening socket."""
    host, port = sock.getsockname()[:2]  # only named in asyncssh's log: the socket is listening already
    files = FileService(agent.files) if agent.files else None
    return await asyncssh.create_server(
        lambda: DeveloperSession(agent, files),
        host,
        port,
        tunnel=CoalescingTunnel(sock=sock),  # one write(2) per SSH packet (intercept.sshwrite)
        server_host_keys=[host_key],
        encryption_algs=ENCRYPTION_ALGS,
        keepalive_interval=KEEPALIVE_INTERVAL,
        keepalive_count_max=KEEPALIVE_COUNT_MAX,
        login_timeout=LOGIN_TIMEOUT,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        line_editor=False,
        # No GSS (Kerberos): asyncssh would otherwise call getfqdn() for it on every authentication,
        # a DNS lookup that a pod with slow DNS makes each developer wait on (5 s a try).
        gss_host=None,
    )

