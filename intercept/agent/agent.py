"""The agent: the HTTP listener, the SSH server and the route table they share."""

from __future__ import annotations

import asyncio
import collections
import importlib
import ipaddress
import logging
import os
import socket
import time
import weakref
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Any

from intercept import __version__, credentials, protocol
from intercept.agent.files import ServedFiles, parse_serve_files
from intercept.agent.files import describe as describe_files
from intercept.agentconfig import AgentConfig
from intercept.agent.proxy import ClientConnection, Link, RouteGone, TCPLink, Unavailable, UpstreamPool
from intercept.errors import CredentialsError, InterceptError, RouteConflict, UsageError
from intercept.routing.cluster import MAX_DOCUMENT, SESSION_PREFIX, RoutesDocument, verify_push
from intercept.routing.developers import PENDING_PREFIX, DevelopersDocument
from intercept.routing.fence import check_all
from intercept.routing.match import RegisteredRoute, Route, RouteTable

if TYPE_CHECKING:
    import asyncssh

    from intercept.agent import sshd

log = logging.getLogger(__name__)

ROUTES_POLL = 1.0  # seconds between looks at the routes file and at expiries
# SSH connections that have not logged in yet, at once: a flood of them (each a socket that
# never sends a banner) must not use up the pod's descriptors, which HTTP traffic needs too.
# Beyond it the oldest is dropped, so a developer who logs in (a few round trips) still gets in.
MAX_LOGGING_IN = 64
LOGIN_TIMEOUT = 10.0  # seconds an SSH connection may take to log in


class Agent:
    """Serves HTTP on each ``config.listen`` (a :class:`Front` per listener): each request to
    that listener's upstream, or to the developer whose route it matches."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.credentials = credentials.load_or_create(config.credentials)
        self.routes = RouteTable()
        self.connections: weakref.WeakSet[ClientConnection] = weakref.WeakSet()
        self.forwarded_headers = config.forwarded_headers
        self.max_connections = config.max_connections
        self.fresh_connections = 0
        self.mirror_channels: collections.Counter[int] = collections.Counter()  # intercept.agent.mirror
        self.fence = config.fence
        self.files = ServedFiles([*config.mounts, *parse_serve_files(config.serve_files)])
        self.fronts = [Front(self, i, listen, upstream) for i, (listen, upstream) in enumerate(config.fronts)]
        self.pool = self.fronts[0].pool  # the first listener's, as before there were several
        self.h2 = self.fronts[0].h2
        self._sweeper: asyncio.Task[None] | None = None
        self.sessions: dict[str, sshd.DeveloperSession] = {}
        self.logging_in: dict[sshd.DeveloperSession, None] = {}  # not logged in yet, oldest first
        self._ssh_socket: socket.socket | None = None  # bound at start; asyncssh takes it with the first developer
        self._ssh_address: tuple[str, int] = ("", 0)
        self._ssh: asyncssh.SSHAcceptor | None = None
        self._ssh_starting: asyncio.Task[None] | None = None
        self._closing = False
        self.failed = asyncio.Event()  # set, with ``failure``, when the agent cannot go on (its SSH server did not start)
        self.failure = ""
        self.h2_codec = "h2"  # the HTTP/2 codec, chosen at start (choose_h2_codec)
        self.cluster_routes = RoutesDocument(0.0)
        self.routes_authority: str | None = None  # the public key that signs pushed routes, from the routes file
        self._routes_follower: asyncio.Task[None] | None = None
        self._last_busy = time.monotonic()  # when a route last went away
        self._removal: asyncio.Future[None] | None = None  # resolved when a route leaves the table

    async def start(self) -> None:
        requested = os.environ.get("INTERCEPT_H2_CODEC")
        self.h2_codec, why = choose_h2_codec(requested)
        fell_back = self.h2_codec == "h2" and not requested  # shown without -v: gRPC routing is slow
        (log.warning if fell_back else log.info)("agent: HTTP/2 codec %s: %s", self.h2_codec, why)
        loop = asyncio.get_running_loop()
        # SSH first: the pod's readiness probe checks the HTTP port, and a ready pod must take sessions.
        # The port is bound now, but asyncssh (with its cryptography, 17 MB and 100 ms of imports) is
        # loaded only when the first developer connects: most agents idle between intercepts.
        if "PRIVATE KEY-----" not in (self.credentials.host_private_key or ""):
            raise CredentialsError(f"credentials file {self.config.credentials}: host_private_key is not a private key; "
                                   "pass the JSON file the agent wrote, or delete it to let the agent create a new one")
        # the routes file before the first request: a new pod routes the sandboxes' keys from the start
        seen = self._look_at_routes_file(self.config.routes_file, None) if self.config.routes_file is not None else None
        developers = self.config.developers_file  # likewise the developers' routes: held until they connect
        seen_developers = self._look_at_developers_file(developers, None) if developers is not None else None
        self._ssh_socket = _listening_socket(*self.config.ssh_listen)
        self._ssh_address = self._ssh_socket.getsockname()[:2]
        try:
            for front in self.fronts:
                await front.start()
        except BaseException:
            for front in self.fronts:
                front.close()
            self._close_ssh_socket()
            raise
        loop.add_reader(self._ssh_socket.fileno(), self._first_developer)
        self._sweeper = loop.create_task(self._expire_waiting())
        self._routes_follower = loop.create_task(self._follow_routes_file(seen, seen_developers))
        for front in self.fronts:
            log.info("agent %s: http %s, ssh %s, upstream %s", __version__, front.http_address, self.ssh_address,
                     front.upstream)

    def _first_developer(self) -> None:
        """A connection waits on the SSH port: start asyncssh's server on it (the import in a thread,
        so that the HTTP traffic keeps flowing meanwhile); it accepts what waits in the backlog."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._ssh_socket.fileno())
        self._ssh_starting = loop.create_task(self._start_ssh())

    async def _start_ssh(self) -> None:
        """Import and start the SSH server; when it cannot start, the agent fails (``failed``):
        a pod whose developers could never connect must restart and say why, not look ready."""
        loop = asyncio.get_running_loop()
        try:
            server = await loop.run_in_executor(None, importlib.import_module, "intercept.agent.sshd")
            import asyncssh

            key = asyncssh.import_private_key(self.credentials.host_private_key)
            if self._closing:
                return
            self._ssh = await server.start_server(self, self._ssh_socket, key)
        except Exception as e:
            log.exception("agent: the SSH server could not start")
            self._close_ssh_socket()  # refused, rather than left waiting
            self.failure = f"the SSH server could not start ({e.__class__.__name__}: {e}); developers cannot connect"
            self.failed.set()
            return
        _release_startup_memory(collect=False)
        log.info("agent: SSH server started for the first developer")

    def _close_ssh_socket(self) -> None:
        sock, self._ssh_socket = self._ssh_socket, None
        if sock is not None:
            if self._ssh_starting is None and sock.fileno() != -1:
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    @property
    def http_address(self) -> tuple[str, int]:
        """The first listener's address."""
        return self.fronts[0].http_address

    def front_of(self, port: int) -> Front | None:
        """The listener that forwards to the app's port ``port``, if any."""
        return next((f for f in self.fronts if f.port == port), None)

    @property
    def ssh_address(self) -> tuple[str, int]:
        return self._ssh_address

    async def _expire_waiting(self) -> None:
        """Every few seconds, close connections that wait too long for a request head (slowloris),
        or on HTTP/2 have had no stream open that long."""
        timeout = self.config.header_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(5.0, timeout / 2))
            now = loop.time()
            for connection in list(self.connections):
                try:
                    connection.expire(now, timeout)
                except Exception:  # noqa: BLE001 - one connection's failure must not end the sweep for all
                    log.exception("expiring %r failed; the sweeper goes on", connection)

    async def close(self) -> None:
        for task in (self._sweeper, self._routes_follower):
            if task is not None:
                task.cancel()
        self._closing = True
        if self._ssh_starting is not None:
            await asyncio.wait({self._ssh_starting})  # an import in a thread cannot be cancelled
        if self._ssh is not None:
            self._ssh.close()  # and the socket it took
        else:
            self._close_ssh_socket()
        for session in list(self.sessions.values()):
            session.conn.close()
        for front in self.fronts:
            front.close()

    @staticmethod
    def pod_environment() -> dict[str, str]:
        """The app container's variables as the pod sees them: the injection gives the agent
        copies of the app's env and envFrom; the agent's own settings (``INTERCEPT_*``) and
        its image's variables (named in ``INTERCEPT_IMAGE_ENV``) are left out."""
        own = set(os.environ.get("INTERCEPT_IMAGE_ENV", "").split())
        return {k: v for k, v in os.environ.items() if not k.startswith("INTERCEPT_") and k not in own}

    def hello(self) -> protocol.HelloReply:
        """What the agent says of itself: versions, what it knows, its settings and state."""
        host, port = self.fronts[0].upstream
        return protocol.HelloReply(
            agent_version=__version__, protocol=protocol.PROTOCOL_VERSION, rule_kinds=list(protocol.RULE_KINDS),
            features=list(protocol.FEATURES), upstream=f"{host}:{port}", ports=[f.port for f in self.fronts],
            hold_timeout=self.config.hold_timeout,
            outbound=self.config.allow_outbound, fence=self.fence.to_json(), files=describe_files(self.files),
            tls_connections=sum(f.h2.tls_seen for f in self.fronts),
            # for intercept gc: how long neither a route has been held nor a session reached the cluster through
            # this pod (intercept connect); a session that only asks, as gc does, is no use
            idle_seconds=0.0 if self.routes.held or self.routes.mirrors or any(s.reaching for s in self.sessions.values())
            else round(time.monotonic() - self._last_busy, 1),
            reaching=sorted(s.name for s in self.sessions.values() if s.reaching),
            resolver=_resolver_text())

    def fence_of(self, session: sshd.DeveloperSession) -> dict[str, Any]:
        """The outbound fence in effect for ``session``: the agent's, then the session's own."""
        own = session.fence
        description = self.fence.describe() if own.open else own.describe() if self.fence.open else \
            f"{self.fence.describe()}, then {own.describe()}"
        return {"fence": {"agent": self.fence.to_json(), "session": own.to_json()}, "description": description}

    # -- sessions and routes -------------------------------------------------------------

    def login_started(self, session: sshd.DeveloperSession) -> None:
        """A new SSH connection; beyond :data:`MAX_LOGGING_IN` not logged in, the oldest goes."""
        self.logging_in[session] = None
        if len(self.logging_in) > MAX_LOGGING_IN:
            oldest = next(iter(self.logging_in))
            del self.logging_in[oldest]
            log.warning("dropped an SSH connection from %s that had not logged in: %d others are waiting to log in",
                        oldest.peer[0], MAX_LOGGING_IN)
            oldest.conn.abort()

    def session_opened(self, session: sshd.DeveloperSession) -> None:
        self.logging_in.pop(session, None)
        self.sessions[session.id] = session
        log.info("%s connected from %s as %s", session.name, session.peer[0], session.id)

    def session_closed(self, session: sshd.DeveloperSession, exc: Exception | None) -> None:
        self.logging_in.pop(session, None)
        self.sessions.pop(session.id, None)
        if session.reaching:
            self._last_busy = time.monotonic()  # gc's idle time counts from the last session that reached the cluster
        for route in self.routes.remove_session(session.id):
            log.info("dropped route %s of %s (%s)", route.route.describe(), session.name, exc or "connection closed")
            self._last_busy = time.monotonic()  # gc's idle time counts from the last route
        self._routes_removed()
        for front in self.fronts:
            front.h2.session_closed(session.id, session.name)

    def register(self, session: sshd.DeveloperSession, rules: list[dict[str, Any]], all_traffic: bool,
                 ttl: float | None = None, *, mirror: bool = False) -> RegisteredRoute:
        """Hold a developer's route for ``session``; with ``ttl`` (seconds) it ends by itself then.
        A ``mirror`` takes nothing: the session gets a copy of each matching request."""
        if not session.forwarding:
            from intercept.agent.sshd import FORWARD_HOST, FORWARD_PORT  # loaded: a session calls this

            raise UsageError(f"request tcpip-forward on {FORWARD_HOST}:{FORWARD_PORT} before registering a route")
        route = Route.from_json(rules)
        if not route.rules and not all_traffic:
            raise UsageError("a route without rules takes all traffic; register it with all=true (--all)")
        if ttl is not None and not ttl > 0:
            raise UsageError(f"ttl {ttl!r}: it must be a positive number of seconds")
        expires = time.time() + ttl if ttl is not None else None
        if mirror:
            registered = self.routes.add(session.id, session.name, route, expires=expires, mirror=True)
            log.info("mirror of %s registered by %s", route.describe(), session.name)
            self.h2.routes_changed()
            return registered
        registered = self.routes.adopt(PENDING_PREFIX + session.name, session.id, route, expires=expires)
        if registered is not None:  # the route this pod knew from the developers file: requests held for it go on
            log.info("route %s taken over by %s's session", route.describe(), session.name)
            self._routes_removed()
        else:
            registered = self.routes.add(session.id, session.name, route, expires=expires)
            log.info("route %s registered by %s", route.describe(), session.name)
        self._tell_routes_changed()
        return registered

    def unregister(self, session: sshd.DeveloperSession, route_id: int) -> None:
        route = self.routes.get(route_id)  # a lookup: serializing the table for this cost 22 µs with 10 routes
        if route is not None and route.session_id == session.id:
            self.routes.remove(route_id)
            log.info("%s %s unregistered by %s", "mirror of" if route.mirror else "route", route.route.describe(),
                     session.name)
            self._last_busy = time.monotonic()
            self._routes_removed()

    def _tell_routes_changed(self) -> None:
        for front in self.fronts:
            front.h2.routes_changed()

    # -- destinations for the proxy --------------------------------------------------------

    async def open_upstream(self, owner: ClientConnection) -> Link:
        """A link to the first listener's upstream (:meth:`Front.open_upstream`)."""
        return await self.fronts[0].open_upstream(owner)

    def _routes_removed(self) -> None:
        """Wake every request waiting for a route: if its route went, it is routed again now."""
        removal, self._removal = self._removal, None
        if removal is not None and not removal.done():
            removal.set_result(None)

    def _next_removal(self) -> asyncio.Future[None]:
        """A future resolved the next time a route leaves the table."""
        if self._removal is None:
            self._removal = asyncio.get_running_loop().create_future()
        return self._removal

    def _still_held(self, route: RegisteredRoute) -> bool:
        return route.session_id in self.sessions and self.routes.holds(route)

    async def open_developer(self, route: RegisteredRoute, owner: ClientConnection, front: Front | None = None,
                             first: bytes = b"") -> Link:
        """A channel to the developer of ``route``; held up to the hold timeout while their process does not accept.

        Raises :class:`RouteGone` as soon as ``route`` leaves the table while the request
        waits (the developer left, or their connection was found dead), whatever it waits
        for: their process, or the answer to the channel's opening from a machine that went
        silent (then the keepalive bounds the wait: 15 s). The caller routes it again: to the
        app, or to whoever matches now. Raises :class:`Unavailable` (the 502's text, with the
        time really held) when the hold timeout passes with the route still there.

        A sandbox's route goes to its cluster destination instead (:meth:`_open_fork`).
        ``front`` is the listener the request came to (None: the first): the channel is
        opened for that port of the developer's (:meth:`DeveloperSession.open_channel`).
        With ``first``, the channel's opening may carry those bytes (the link's ``carried``
        says whether it did: :meth:`DeveloperSession.open_channel`)."""
        if route.destination is not None:
            return await self._open_fork(route, owner)
        if route.session_id.startswith(PENDING_PREFIX):
            await self._await_developer(route)  # raises RouteGone: routed again, to their session or the app
        loop = asyncio.get_running_loop()
        hold = self.config.hold_timeout
        started = loop.time()
        deadline = started + hold
        delay = 0.02
        reason = "no answer"
        while True:
            if not self._still_held(route):
                raise RouteGone()
            if loop.time() > deadline:
                raise Unavailable(f"intercept of {route.holder} failed: {reason} (held {loop.time() - started:.1f}s)")
            session = self.sessions[route.session_id]
            opening = asyncio.ensure_future(session.open_channel(owner, front or self.fronts[0], first))
            while not opening.done():
                await asyncio.wait({opening, self._next_removal()}, return_when=asyncio.FIRST_COMPLETED)
                if not opening.done() and not self._still_held(route):
                    opening.add_done_callback(_close_unused_channel)  # an answer that comes late is closed
                    raise RouteGone()
            import asyncssh  # loaded already: a session exists

            try:
                return opening.result()
            except asyncssh.ChannelOpenError as e:
                reason = e.reason
            except (asyncssh.Error, OSError) as e:
                reason = f"the connection to their machine failed ({e})"
            if delay == 0.02:
                log.info("holding a request for %s: %s", route.holder, reason)
            # wait before trying again, but not past a removal: a connection that failed is
            # followed at once by its session's end, which takes its routes
            removal = self._next_removal()
            await asyncio.wait({removal}, timeout=delay)
            delay = min(delay * 2, 0.25)

    async def open_mirror(self, route: RegisteredRoute, owner: Any, front: Front) -> Link:
        """A channel to the developer of mirror ``route``, for copies; :class:`Unavailable` when
        it cannot be had (at once: a copy never waits as an intercepted request does)."""
        session = self.sessions.get(route.session_id)
        if session is None or not self.routes.holds(route):
            raise Unavailable(f"{route.holder} is no longer connected")
        import asyncssh  # loaded already: a session exists

        try:
            return await session.open_channel(owner, front)
        except asyncssh.ChannelOpenError as e:
            raise Unavailable(f"{route.holder}'s process cannot take a copy: {e.reason}") from None
        except (asyncssh.Error, OSError) as e:
            raise Unavailable(f"the connection to {route.holder}'s machine failed ({e})") from None

    async def _await_developer(self, route: RegisteredRoute) -> None:
        """Hold a request matching the pending route of a developer whose session has not
        reached this agent yet (a pod that started after their intercept did) until it takes
        the route over; past the hold timeout the pending route goes (the developer left
        without a word, most likely) and the request with it, to the app. Always raises
        :class:`RouteGone`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.hold_timeout
        log.info("holding a request for %s until their session arrives", route.holder)
        while self.routes.holds(route):
            left = deadline - loop.time()
            if left <= 0:
                log.warning("%s's session did not arrive within %gs: their pending route %s goes", route.holder,
                            self.config.hold_timeout, route.route.describe())
                self.routes.remove(route.id)
                self._routes_removed()
                break
            await asyncio.wait({self._next_removal()}, timeout=left)
        raise RouteGone()

    async def _open_fork(self, route: RegisteredRoute, owner: ClientConnection) -> Link:
        """A TCP connection to a sandbox's fork; held up to the hold timeout while it does not accept.

        The destination's name is resolved here and only the addresses that pass the agent's
        outbound fence, and do not lead back to the agent itself, are dialled: a destination
        that leaves none is refused at once (the 502 names the rule)."""
        loop = asyncio.get_running_loop()
        hold = self.config.hold_timeout
        deadline = loop.time() + hold
        host, port = route.destination
        delay = 0.02
        while True:
            if not self.routes.holds(route):
                raise RouteGone()
            try:
                for address in await self._fork_addresses(route):
                    try:
                        _, link = await loop.create_connection(lambda: TCPLink(owner), address, port)
                        return link
                    except OSError as e:
                        reason = e.strerror or str(e)
            except OSError as e:  # the name does not resolve (yet: a headless Service has no address before its pod is ready)
                reason = e.strerror or str(e)
            if loop.time() + delay > deadline:
                raise Unavailable(f"{route.holder} failed: its fork {host}:{port} is unreachable: {reason} (held {hold:g}s)")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _fork_addresses(self, route: RegisteredRoute) -> list[str]:
        """The addresses of ``route``'s destination the agent may dial; :class:`Unavailable`
        saying why when the fence or the agent itself leaves none, OSError when the name
        does not resolve."""
        host, port = route.destination
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        verdict = check_all((self.fence,), host, port, addresses)
        if not verdict.allowed:
            raise Unavailable(f"{route.holder} failed: its fork {verdict.reason}")
        passed = addresses if verdict.addresses is None else list(verdict.dial)  # as judged (fence.Verdict.dial)
        own_ports = {*(f.http_address[1] for f in self.fronts), self.ssh_address[1]}
        kept = [a for a in passed if not (port in own_ports and _reaches_this_pod(a))]
        if not kept:
            raise Unavailable(f"{route.holder} failed: its destination {host}:{port} is this agent's own listener")
        return kept

    # -- routes to the cluster (sandboxes) ---------------------------------------------------

    def push_routes(self, text: str, signature: str) -> dict[str, list[str]]:
        """A routes document pushed over the control channel: applied (:meth:`apply_routes`)
        only when signed by the routes authority of the mounted routes file, never by a key
        the push brings (:func:`~intercept.routing.cluster.verify_push` raises why not)."""
        return self.apply_routes(verify_push(text, signature, self.routes_authority))

    def apply_routes(self, document: RoutesDocument) -> dict[str, list[str]]:
        """Hold the cluster routes of ``document`` (unless a newer one was applied): sandboxes
        no longer listed lose their routes; a route that conflicts with another holder's is
        refused, saying why. Returns the sandboxes ``applied`` and the ``refused`` reasons.
        A document whose times are out of bounds (:meth:`RoutesDocument.check_times`) is
        refused whole with :class:`UsageError`."""
        document.check_times(time.time())
        if document.updated < self.cluster_routes.updated:
            return {"applied": [], "refused": [], "stale": [f"a newer routes document ({self.cluster_routes.updated}) is in place"]}
        self.cluster_routes = document
        now = time.time()
        live = [r for r in document.routes if r.expires > now]  # an expired route is gone, whatever it was before
        wanted = {(r.session_id, r.route) for r in live}
        for session_id in [s for s in self.routes.sessions() if s.startswith(SESSION_PREFIX)]:
            for registered in self.routes.routes_of(session_id):
                if (session_id, registered.route) not in wanted:
                    self.routes.remove(registered.id)
                    self._last_busy = time.monotonic()
                    log.info("route %s of %s removed", registered.route.describe(), registered.holder)
                    self._routes_removed()
        applied, refused = set(), []
        for route in live:
            try:
                self.routes.add(route.session_id, route.holder, route.route, destination=route.destination, expires=route.expires)
                applied.add(route.sandbox)
            except RouteConflict as e:
                refused.append(f"{route.holder}: {e}")
                log.warning("%s", refused[-1])
        self._tell_routes_changed()
        log.info("cluster routes of %s applied: %s", document.updated, ", ".join(sorted(applied)) or "none")
        return {"applied": sorted(applied), "refused": refused}

    def apply_developers(self, document: DevelopersDocument) -> None:
        """Hold, as pending routes, the routes of the developers ``document`` lists whose
        session has not registered them here; drop pending routes no longer listed."""
        now = time.time()
        live = document.live(now)
        wanted = {(d.session_id, d.route): d for d in live}
        for session_id in [s for s in self.routes.sessions() if s.startswith(PENDING_PREFIX)]:
            for pending in self.routes.routes_of(session_id):
                if (session_id, pending.route) not in wanted:
                    self.routes.remove(pending.id)
                    self._routes_removed()
        connected = {(s.name, r.route) for s in self.sessions.values() for r in self.routes.routes_of(s.id)}
        for entry in live:
            if (entry.name, entry.route) in connected:
                continue
            try:
                self.routes.add(entry.session_id, entry.name, entry.route, expires=entry.expires)
            except RouteConflict as e:
                log.warning("pending route of %s not held: %s", entry.name, e)
        self._tell_routes_changed()

    async def _follow_routes_file(self, seen: tuple[str, float, int] | None,
                                  seen_developers: tuple[str, float, int] | None = None) -> None:
        """Read the mounted routes file again whenever it changes from what was ``seen`` (a
        ConfigMap volume swaps a symlink, so its resolved path's stat is compared), and drop
        routes whose time is up.

        A bad document is logged once and skipped, keeping what is held; nothing a file holds
        ends this loop, since route expiry depends on it."""
        path, developers = self.config.routes_file, self.config.developers_file
        while True:
            try:
                for expired in self.routes.remove_expired(time.time()):
                    log.info("route %s of %s expired", expired.route.describe(), expired.holder)
                    self._last_busy = time.monotonic()
                    self._routes_removed()
                if path is not None:
                    seen = self._look_at_routes_file(path, seen)
                if developers is not None:
                    seen_developers = self._look_at_developers_file(developers, seen_developers)
            except Exception:  # a bug here must not stop expiry for good: say it, and go on
                log.exception("routes file %s: reading it failed; keeping the routes held", path)
            await asyncio.sleep(ROUTES_POLL)

    def _look_at_routes_file(self, path: Path, seen: tuple[str, float, int] | None) -> tuple[str, float, int] | None:
        """Apply the routes file if it changed since ``seen``; what was seen now."""
        def apply(data: bytes) -> None:
            document = RoutesDocument.from_bytes(data)
            self.apply_routes(document)
            self.routes_authority = document.authority  # from the file only: who may push

        return _look_at_file(path, seen, apply, "routes file")

    def _look_at_developers_file(self, path: Path, seen: tuple[str, float, int] | None) -> tuple[str, float, int] | None:
        """Apply the developers file (their routes, pending here) if it changed since ``seen``."""
        return _look_at_file(path, seen, lambda data: self.apply_developers(DevelopersDocument.from_bytes(data)),
                             "developers file")


def _look_at_file(path: Path, seen: tuple[str, float, int] | None, apply: Any,
                  what: str) -> tuple[str, float, int] | None:
    """``apply(content)`` of a mounted file (a ConfigMap volume swaps a symlink, so its
    resolved path's stat is compared) when it changed since ``seen``; what is seen now. A bad
    document is logged once and skipped, keeping what is held."""
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return seen
    current = (real, stat.st_mtime, stat.st_size)
    if current == seen:
        return seen
    try:
        if not S_ISREG(stat.st_mode):  # a FIFO would block the loop on open
            raise UsageError("not a regular file")
        with open(real, "rb") as f:
            apply(f.read(MAX_DOCUMENT + 1))
    except (OSError, InterceptError) as e:
        log.warning("%s %s: %s; keeping the routes held", what, path, e)
    return current


class Front:
    """One HTTP listener of the agent and the app port behind it (a ``--listen`` and its
    ``--upstream``): the destinations its connections use (:class:`~intercept.agent.proxy.Destinations`).

    Its upstream pool and HTTP/2 hub are its own; the routes, sessions, limits and the
    connections the sweeper expires are the agent's. A developer names a front by its app
    port (``port``). A route holds on every front, but a request that matches it here goes
    to the developer only if their session takes this port (:meth:`takes`); else to the app,
    as if the route were not there: who intercepts HTTP alone leaves gRPC to the cluster."""

    def __init__(self, agent: Agent, index: int, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.agent = agent
        self.index = index
        self.listen = listen
        self.upstream = upstream
        self.port = upstream[1]
        self.pool = UpstreamPool()
        self.h2 = LazyHub(self)
        # one front: every session that forwards takes it, so the table itself (nothing added to the hot path)
        self.routes: Any = agent.routes if len(agent.config.listen) == 1 else _FrontRoutes(self)
        self._http: asyncio.Server | None = None

    # what connections read of the agent, shared by every front
    @property
    def connections(self) -> weakref.WeakSet[ClientConnection]:
        return self.agent.connections

    @property
    def forwarded_headers(self) -> bool:
        return self.agent.forwarded_headers

    @property
    def max_connections(self) -> int:
        return self.agent.max_connections

    @property
    def config(self) -> Any:
        return self.agent.config

    @property
    def h2_codec(self) -> str:
        return self.agent.h2_codec

    @property
    def mirror_channels(self) -> collections.Counter[int]:
        return self.agent.mirror_channels

    @property
    def fresh_connections(self) -> int:
        return self.agent.fresh_connections

    @fresh_connections.setter
    def fresh_connections(self, value: int) -> None:
        self.agent.fresh_connections = value

    async def start(self) -> None:
        host, port = self.listen
        self._http = await asyncio.get_running_loop().create_server(lambda: ClientConnection(self), host, port,
                                                                    backlog=1024, reuse_address=True)

    @property
    def http_address(self) -> tuple[str, int]:
        return self._http.sockets[0].getsockname()[:2]

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        self.pool.close()
        self.h2.close()

    def takes(self, route: RegisteredRoute) -> bool:
        """Whether a request to this front that matches ``route`` goes where the route says."""
        if route.destination is not None:  # a sandbox's fork: reached on its Service's one port
            return self.index == 0
        session = self.agent.sessions.get(route.session_id)
        # a route whose session is not (or no longer) here: open_developer holds or routes it again
        return session is None or session.takes(self)

    async def open_upstream(self, owner: ClientConnection) -> Link:
        link = self.pool.take(owner)
        if link is not None:
            return link
        host, port = self.upstream
        try:
            _, link = await asyncio.get_running_loop().create_connection(lambda: TCPLink(owner), host, port)
        except OSError as e:
            raise Unavailable(f"upstream {host}:{port} is unreachable: {e.strerror or e}") from None
        return link

    async def open_developer(self, route: RegisteredRoute, owner: ClientConnection, first: bytes = b"") -> Link:
        return await self.agent.open_developer(route, owner, self, first)

    async def open_mirror(self, route: RegisteredRoute, owner: Any) -> Link:
        return await self.agent.open_mirror(route, owner, self)


class _FrontRoutes:
    """The agent's route table as one front sees it: a match whose session does not take the
    front's port is no match (the request goes to the app). Everything else is the table's."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._table = front.agent.routes

    def match(self, method: bytes, target: bytes, headers: Any) -> RegisteredRoute | None:
        route = self._table.match(method, target, headers)
        return route if route is None or self._front.takes(route) else None

    @property
    def mirrors(self) -> tuple[RegisteredRoute, ...]:
        """The mirrors whose sessions take this front's port."""
        return tuple(r for r in self._table.mirrors if self._front.takes(r))

    def mirrors_matching(self, method: bytes, target: bytes, headers: Any) -> list[RegisteredRoute]:
        return [r for r in self._table.mirrors_matching(method, target, headers) if self._front.takes(r)]

    @property
    def held(self) -> Any:
        return self._table.held

    @property
    def names(self) -> Any:
        return self._table.names

    def __len__(self) -> int:
        return len(self._table)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)


class LazyHub:
    """The HTTP/2 path (:class:`intercept.agent.h2proxy.Hub`), imported and built with the
    first HTTP/2 connection: an agent that never sees one does not load the h2 stack
    (about 5 MB of its idle RSS and a tenth of its start-up). Until then there is no
    HTTP/2 state, so route and session changes have nothing to tell it."""

    def __init__(self, agent: Front) -> None:
        self.agent = agent  # what the hub takes its routes, upstream and developers from
        self.hub: Any = None
        self.tls_seen = 0  # connections that began with a TLS record (counted by the listener)

    def _built(self) -> Any:
        if self.hub is None:
            from intercept.agent.h2proxy import Hub

            self.hub = Hub(self.agent)
        return self.hub

    def accept(self, transport: asyncio.Transport, data: bytes, upgrade: Any = None, settings: bytes | None = None,
               original: bytes = b"", *, fresh: bool = False) -> None:
        self._built().accept(transport, data, upgrade, settings, original, fresh=fresh)

    def takes_upgrade(self) -> bool:
        return self.hub is None or self.hub.takes_upgrade()

    def routes_changed(self) -> None:
        if self.hub is not None:
            self.hub.routes_changed()

    def session_closed(self, session_id: str, name: str) -> None:
        if self.hub is not None:
            self.hub.session_closed(session_id, name)

    def close(self) -> None:
        if self.hub is not None:
            self.hub.close()


def _close_unused_channel(opening: asyncio.Future[Link]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def _release_startup_memory(collect: bool = True) -> None:
    """Hand back to the system the heap that start-up used and freed (imports, key
    parsing): glibc keeps freed memory at the top of its heaps until asked (about 2 MB of
    the agent's idle RSS, 0.5 MB after the SSH server's imports). ``collect``: first
    collect garbage cycles (9 ms with asyncssh loaded, so not while traffic flows).
    Elsewhere than glibc, nothing to do."""
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reaches_this_pod(address: str) -> bool:
    """Whether a connection to ``address`` stays in this pod (its network namespace): a
    loopback or unspecified address (``0.0.0.0`` and ``::`` reach the local host), also
    IPv4-mapped, or one of its interfaces' addresses, which a socket can bind to (where
    ``ip_nonlocal_bind`` lets any address bind, every one counts: the safe side)."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return True
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def _listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on the first address ``host`` resolves to (``""``: the wildcard)."""
    family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.create_server(address, family=family, backlog=100)
    sock.setblocking(False)
    return sock


def choose_h2_codec(requested: str | None) -> tuple[str, str]:
    """The HTTP/2 codec the agent's terminated connections use, and why, in words for its one
    log line: ``requested`` is ``INTERCEPT_H2_CODEC`` (None or empty: not set).

    Unset, it is ``ngh2`` (libnghttp2, installed by ``intercept[fast]`` and in the agent
    image) when that imports, else ``h2`` (python-hyper, pure Python, about a tenth of the
    speed per stream). Chosen once, at start, by importing ngh2 (3 ms, 1 MB): a package that
    is there but cannot load (a wheel for another libc) falls back here, not on the first
    HTTP/2 connection. Asked for by name, a codec that cannot load is a :class:`UsageError`."""
    if requested not in (None, "", "h2", "ngh2"):
        raise UsageError(f"INTERCEPT_H2_CODEC={requested}: unknown HTTP/2 codec; "
                         "use ngh2 (the default when installed) or h2")
    if requested == "h2":
        return "h2", "INTERCEPT_H2_CODEC=h2"
    try:
        import ngh2  # noqa: F401
    except ImportError as e:
        if requested == "ngh2":
            raise UsageError(f"INTERCEPT_H2_CODEC=ngh2: the ngh2 package cannot be imported ({e}); "
                             "pip install 'intercept[fast]', or unset INTERCEPT_H2_CODEC") from None
        return "h2", (f"ngh2 cannot be imported ({e}), so HTTP/2 streams are routed by the pure-Python codec, "
                      "about a tenth as fast; pip install 'intercept[fast]' for libnghttp2")
    return "ngh2", "INTERCEPT_H2_CODEC=ngh2" if requested else "libnghttp2, the default"


def run(config: AgentConfig, ready: Any = None) -> None:
    """Run the agent until SIGINT/SIGTERM; ``ready(agent)`` is called once it listens."""
    import signal

    async def main() -> None:
        agent = Agent(config)
        await agent.start()
        _release_startup_memory()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready(agent)
        waiting = {loop.create_task(stop.wait()), loop.create_task(agent.failed.wait())}
        _, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if agent.failed.is_set():
            await agent.close()
            raise InterceptError(agent.failure)
        if config.shutdown_grace > 0:
            # the pod is leaving; until every node has dropped it from the endpoints, traffic still arrives
            log.warning("stopping: still serving for %gs", config.shutdown_grace)
            await asyncio.sleep(config.shutdown_grace)
        await agent.close()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def _resolver_text() -> str:
    """The pod's resolver configuration, as a pod's process reads it (empty where there is none)."""
    try:
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as f:
            return f.read(64 * 1024)
    except OSError:
        return ""
