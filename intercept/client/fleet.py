"""The route on every agent replica of a service, kept there as pods come and go.

A Service spreads its traffic over its pods, and each pod's agent has its own route
table. A route registered on one agent only brings home the requests that pod receives:
1/N of them (Telepresence's issue #4085). A :class:`Fleet` therefore holds one
:class:`~intercept.client.session.AgentSession` per agent replica, with the same route
on each, and follows the set of replicas it is given: it opens a session for a replica
that appears, closes the session of one that goes, and reconnects to one whose
connection drops, each on its own, with backoff (0.5 s doubling to 10 s).

Direct mode (``intercept start --agent``) is a fleet of one fixed replica (:func:`fixed`).

Events, printed by the CLI as ``intercept: KIND: MESSAGE``:

============  ===============================================================================
ready         once, when every current replica has the route:
              ``requests with x-dev: alice now reach localhost:8080 (2 replicas)``
waiting       before ready: no replica yet, or one not reached yet (with the reason and retry)
joined        a replica that appeared after ready has the route
gone          a replica left the set; its session is closed
reconnecting  a replica's connection was lost; retrying after the delay. Also when a
              connected agent has not answered for ``silence_notice`` seconds: requests
              routed to this developer wait there until it answers again (then
              ``reconnected``) or the connection is given up (15 s of silence)
reconnected   that replica has the route again
leaving       the fleet is stopping: the route is already off every replica, and responses
              still in flight to the local process are let finish (up to ``leave_grace``)
left          the fleet was stopped; the route is removed from every replica
============  ===============================================================================

Leaving (``stop``) is in three steps, so that nobody's request is cut: the route is
unregistered from every replica (new requests go to the app at once), the agents are
asked to close each channel at the end of its response (as for a restart), and the
connections close when the last routed connection did, or after ``leave_grace``
seconds (an endless stream), or at once when ``hurry`` is set (a second Ctrl-C).
``before_close`` is awaited just before they close: ``intercept start`` stops COMMAND
there, while the connections its forwards and proxy ride on are still up.
A crash (``kill -9``) skips all that: the agents see the connections close, drop the
route and cut what was in flight to this machine.

Invariants:

- At most one session per replica name. A replica that leaves the set has its session
  closed, so its agent drops the route at once.
- An error that retrying cannot fix, on any replica (the route held by someone else,
  a wrong token, a host key that is not the pinned one, a route the agent refuses),
  ends the fleet: every session is closed, which removes the route from every agent,
  and then the error is raised. The route is never left on some replicas only.
- Before ready, when no replica could be reached at all (every one failed its first
  ``first_attempts`` attempts), the error is raised rather than retried in silence;
  otherwise unreachable replicas are retried for as long as they are in the set.
- A reconnect that finds the route held under our own name, shortly after our
  connection was lost, is retried: after a silent loss (a port-forward that died
  without a word) the agent keeps our previous session until its keepalive gives up on
  it (15 s). Any other conflict is fatal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from intercept import protocol
from intercept.protocol import SILENT_LOSS_BOUND
from intercept.client.door import LocalDoor
from intercept.client.session import AgentSession, InterceptOptions
from intercept.client.transport import DirectTransport, FallbackTransport, Transport
from intercept.events import Event
from intercept.credentials import Credentials
from intercept.errors import AgentUnreachable, HostKeyMismatch, InterceptError, RouteConflict

if TYPE_CHECKING:
    from intercept.kube.pods import PodEndpoint

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
# After a silent loss, the agent may still hold our previous session (and its route) until
# its keepalive gives up on it; a reconnect that meets our own route is retried this long.
STALE_SESSION_GRACE = 2.0 * SILENT_LOSS_BOUND
# A connected agent that has not answered a hello for this long is said to be silent
# (reconnecting): the requests routed to us wait there meanwhile. A hello is sent this often.
SILENCE_NOTICE = 2.0


@dataclass(frozen=True)
class Replica:
    """One agent to hold a session with: its name (the pod's) and how to reach it."""

    name: str
    transport: Transport


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _close_source(source: AsyncIterator[Any]) -> None:
    """Close an async generator source at once (a pod watch stops as soon as we do)."""
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


async def fixed(replicas: Iterable[Replica]) -> AsyncIterator[list[Replica]]:
    """A replica source that never changes (direct mode: one agent at a known address)."""
    yield list(replicas)


async def pod_replicas(
    pods: AsyncIterator[Iterable[PodEndpoint]], api: Any, *, in_cluster: bool = False
) -> AsyncIterator[list[Replica]]:
    """The replica sets to follow, from a watch of agent pods (:func:`intercept.kube.pods.watch_agent_pods`).

    Each ready pod with an address is a replica named after the pod, reached through a
    port-forward to its agent's SSH port, or, when we run inside the cluster, directly
    at the pod's IP (no API server in the data path).
    """
    try:
        async for current in pods:
            yield [Replica(pod.name, pod_transport(pod, api, in_cluster=in_cluster)) for pod in current if pod.ready and pod.ip]
    finally:
        aclose = getattr(pods, "aclose", None)
        if aclose is not None:  # stop the watch at once
            await aclose()


def pod_transport(pod: PodEndpoint, api: Any, *, in_cluster: bool = False) -> Transport:
    """How to reach one agent pod's SSH server: see :func:`pod_replicas`."""
    from intercept.kube.portforward import PortForwardTransport  # loads the kubernetes client: only here

    forward = PortForwardTransport(api, pod.namespace, pod.name, pod.ssh_port)
    if in_cluster and pod.ip:
        return FallbackTransport(DirectTransport(pod.ip, pod.ssh_port, timeout=5.0), forward)
    return forward


class _Holder:
    """The task that keeps one replica's session up, and what it has achieved so far."""

    def __init__(self, replica: Replica, ever_registered: bool = False) -> None:
        self.replica = replica
        self.task: asyncio.Task[None] | None = None
        self.session: AgentSession | None = None
        self.failures = 0  # connection attempts that found the agent unreachable, in a row
        self.registered = False  # the route is on this replica now
        self.ever_registered = ever_registered
        self.lost_at: float | None = None  # when a session of this replica last closed
        self.previous: asyncio.Task[None] | None = None  # the closing of the session this one replaces


class Fleet:
    """This developer's route on every agent replica in the set it follows.

    Each replica's session uses ``options`` with the replica's transport;
    ``options.transport`` itself is not dialled. ``count_replicas`` adds the replica
    count to the lines (off for direct mode, whose lines name no replicas).
    ``first_attempts``: before ready, how many times in a row every replica must have
    been found unreachable for the fleet to give up (1 in direct mode: fail at once; a
    pod that has just become ready, or a port-forward that hiccups, deserves a retry).
    """

    def __init__(
        self,
        options: InterceptOptions,
        report: Callable[[Event], None],
        *,
        count_replicas: bool = True,
        first_attempts: int = 3,
        door: LocalDoor | None = None,
        leave_grace: float = 10.0,
        hurry: asyncio.Event | None = None,
        silence_notice: float = SILENCE_NOTICE,
        before_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.options = options
        self.before_close = before_close
        self.silence_notice = silence_notice
        self.leave_grace = leave_grace
        self.hurry = hurry or asyncio.Event()
        self.door = door or LocalDoor(options.name, options.local_port, options.local_host)
        self._report = report
        self._count_replicas = count_replicas
        self._first_attempts = first_attempts
        self._holders: dict[str, _Holder] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closing_named: dict[str, asyncio.Task[None]] = {}
        self._ready = False
        self.became_ready = asyncio.Event()
        self._said_no_replica = False
        self._error: BaseException | None = None
        self._failed = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Every replica of the set had the route at least once (``ready`` was reported)."""
        return self._ready

    @property
    def replicas(self) -> dict[str, bool]:
        """The current replicas, by name: whether each has the route right now."""
        return {name: holder.registered for name, holder in self._holders.items()}

    async def run(self, replicas: AsyncIterator[Collection[Replica]], stop: asyncio.Event) -> None:
        """Follow ``replicas`` (each item: the whole current set) until ``stop`` is set.

        Returns after removing the route from every replica. Raises the error that ended
        the fleet (see the module's invariants), or one raised by ``replicas``, after
        removing the route likewise. When ``replicas`` ends, the last set is kept.
        """
        follow = asyncio.ensure_future(self._follow(replicas))
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (follow, stopped, failed):
                task.cancel()
            await asyncio.gather(follow, return_exceptions=True)
            await self._close_all(self.leave_grace if self._error is None else 0.0)
        if self._error is not None:
            raise self._error
        self._report(Event("left", f"{self.options.describe()} {self.options.gone}", route=self.options.describe()))

    def connection(self) -> Any:
        """A live SSH connection to any agent of the set (for outbound dials), or None."""
        for holder in self._holders.values():
            session = holder.session
            if holder.registered and session is not None and session.conn is not None and not session.conn.is_closed():
                return session.conn
        return None

    def outbound_allowed(self) -> bool:
        """Whether the agents let us open connections from their pods (``--allow-outbound``)."""
        return any(h.registered and h.session is not None and h.session.agent.outbound for h in self._holders.values())

    def fence(self) -> str | None:
        """The outbound fence in effect, described (``allow redis:6379; deny ...``), as a
        replica reports it; None before any replica has the route."""
        for holder in self._holders.values():
            if holder.registered and holder.session is not None:
                return holder.session.fence
        return None

    def resolver(self) -> str:
        """The agents' pod's ``resolv.conf``, as a replica's hello says it ("" before any has the route)."""
        for holder in self._holders.values():
            if holder.registered and holder.session is not None:
                return holder.session.agent.resolver
        return ""

    async def check_outbound(self, host: str, port: int) -> str | None:
        """Why the agents' outbound fence (with this intercept's) refuses ``host:port``, or
        None when it passes, as a replica judges it (every replica has the same fence)."""
        for holder in list(self._holders.values()):
            if holder.registered and holder.session is not None:
                try:
                    return await holder.session.check_outbound(host, port)
                except Exception as e:  # noqa: BLE001 - any failure: try the next replica
                    log.info("replica %s: no outbound check: %s", holder.replica.name, e)
        return None

    async def pod_environment(self) -> dict[str, str]:
        """The app container's environment, as an agent of the set reports it ({} if none can)."""
        for holder in list(self._holders.values()):
            if holder.registered and holder.session is not None:
                try:
                    reply = await holder.session.request(protocol.Env())
                except Exception as e:  # noqa: BLE001 - any failure: try the next replica
                    log.info("replica %s: no environment: %s", holder.replica.name, e)
                    continue
                if isinstance(reply, protocol.EnvReply):
                    return dict(reply.env)
        return {}

    async def mirror_counts(self) -> tuple[int, int]:
        """This mirror's copies so far on every replica that holds it: (copied, dropped), as the
        agents count them (a replica that does not answer counts nothing)."""
        copied = dropped = 0
        for holder in list(self._holders.values()):
            session = holder.session
            if not holder.registered or session is None or session.route_id is None:
                continue
            try:
                reply = await session.request(protocol.ListRoutes())
            except Exception as e:  # noqa: BLE001 - any failure: this replica counts nothing now
                log.info("replica %s: no mirror counts: %s", holder.replica.name, e)
                continue
            for route in getattr(reply, "routes", ()):
                if route.get("id") == session.route_id and route.get("mirror"):
                    copied += int(route.get("copied", 0))
                    dropped += int(route.get("dropped", 0))
        return copied, dropped

    async def drain(self, draining: bool) -> None:
        """Ask every agent to keep no channel past its response (``True``), or to reuse them again."""
        sessions = [h.session for h in self._holders.values() if h.registered and h.session is not None]
        results = await asyncio.gather(
            *(s.request(protocol.Drain() if draining else protocol.Resume()) for s in sessions), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception):  # a lost connection drops its channels anyway
                log.info("drain request failed: %s", result)

    # -- following the set ------------------------------------------------------------------

    async def _follow(self, replicas: AsyncIterator[Collection[Replica]]) -> None:
        try:
            async for current in replicas:
                self._update(current)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the source's own error ends the fleet, typed as it came
            self._fail(e)
            return
        finally:
            await _close_source(replicas)
        log.info("the replica source ended; keeping %s", sorted(self._holders) or "no replica")

    def _update(self, current: Collection[Replica]) -> None:
        wanted = {replica.name: replica for replica in current}
        for name, holder in list(self._holders.items()):
            replica = wanted.get(name)
            if replica == holder.replica:
                continue
            self._remove(holder, gone=replica is None)
            if replica is not None:  # the same pod at another address: dial that one
                self._add(replica, ever_registered=holder.ever_registered)
        for name, replica in wanted.items():
            if name not in self._holders:
                self._add(replica)
        if not wanted and not self._ready and not self._said_no_replica:
            self._said_no_replica = True
            self._report(Event("waiting", "no agent replica is ready yet; waiting for one"))
        self._check_ready()

    def _add(self, replica: Replica, ever_registered: bool = False) -> None:
        holder = _Holder(replica, ever_registered)
        previous = self._closing_named.get(replica.name)
        if previous is not None:  # the same pod again, while its old session is still closing
            holder.previous = previous
            holder.lost_at = asyncio.get_running_loop().time()
        self._holders[replica.name] = holder
        holder.task = asyncio.ensure_future(self._hold(holder))
        log.info("replica %s: connecting to %s", replica.name, replica.transport.describe())

    def _remove(self, holder: _Holder, gone: bool) -> None:
        """Close the session of a replica that left the set (or moved to another address)."""
        name = holder.replica.name
        del self._holders[name]
        closing = asyncio.ensure_future(self._close(holder))
        self._closing.add(closing)
        self._closing_named[name] = closing

        def closed(task: asyncio.Task[None]) -> None:
            self._closing.discard(task)
            if self._closing_named.get(name) is task:
                del self._closing_named[name]

        closing.add_done_callback(closed)
        log.info("replica %s %s", name, "left the set" if gone else "moved to another address")
        if gone and self._ready:
            self._report(Event("gone", f"replica {name} is gone ({self._count()})", replica=name))

    # -- one replica ------------------------------------------------------------------------

    async def _hold(self, holder: _Holder) -> None:
        """Keep ``holder``'s replica registered until cancelled; report what happens."""
        replica = holder.replica
        options = dataclasses.replace(self.options, transport=replica.transport)
        where = replica.transport.describe()
        if holder.previous is not None:  # let the replaced session close before registering again
            await asyncio.wait({holder.previous})
        delay: float | None = None  # no wait before the first attempt
        while True:
            if delay is not None:
                await asyncio.sleep(delay)
            session = holder.session = AgentSession(options, self.door)
            try:
                await session.open()
            except asyncio.CancelledError:
                raise
            except HostKeyMismatch as e:
                fresh = await self._reinstalled()
                if fresh is None:
                    if self.options.refresh_credentials is not None:
                        e = HostKeyMismatch(f"agent {where} presented a host key that is not the one in the agent's "
                                            "Secret: possible impersonation; refusing to connect")
                    self._fail(e)
                    return
                options = dataclasses.replace(options, credentials=fresh)
                delay = None
                continue
            except Exception as e:  # each is either retried or ends the fleet (and is raised)
                if isinstance(e, AgentUnreachable):
                    holder.failures += 1
                retry = self._retry(holder, e)
                if retry is None:
                    self._fail(self._on_replica(e, replica))
                    return
                delay = BACKOFF_FIRST if delay is None else min(delay * 2, BACKOFF_MAX)
                log.info("replica %s: %s", replica.name, e)
                kind, message = retry
                self._report(Event(kind, f"{message}; retrying in {delay:g}s", replica=replica.name))
                continue
            holder.failures = 0
            self._registered(holder)
            await self._watch(session, replica, where)
            holder.registered, holder.session = False, None
            holder.lost_at = asyncio.get_running_loop().time()
            delay = BACKOFF_FIRST
            log.info("replica %s: connection to %s lost", replica.name, where)
            self._report(Event("reconnecting", f"connection to agent {where} lost; retrying in {delay:g}s", replica=replica.name))

    async def _watch(self, session: AgentSession, replica: Replica, where: str) -> None:
        """Until ``session`` closes: ask the agent every ``silence_notice`` seconds whether it is
        there (hello), and say ``reconnecting`` when it does not answer within that time (a link
        gone silent: the agent holds the requests routed here meanwhile), ``reconnected`` when it
        answers again. Without this nothing was said until keepalive gave up, 15 s later."""
        closed = asyncio.ensure_future(session.wait_closed())
        try:
            while True:
                # never cancelled: a hello cut after it was sent would leave its reply to the next request
                probe = asyncio.ensure_future(session.request(protocol.Hello()))
                probe.add_done_callback(_retrieved)  # a lost connection's error is the close's to report
                done, _ = await asyncio.wait({closed, probe}, timeout=self.silence_notice, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    return
                if probe not in done:
                    log.info("replica %s: agent %s silent for %gs", replica.name, where, self.silence_notice)
                    self._report(Event("reconnecting", f"agent {where} has not answered for {self.silence_notice:g}s: "
                                       "requests routed here wait there until it does (the connection is given up "
                                       f"after {SILENT_LOSS_BOUND:g}s of silence)", replica=replica.name))
                    done, _ = await asyncio.wait({closed, probe}, return_when=asyncio.FIRST_COMPLETED)
                    if closed in done:
                        return
                    self._report(Event("reconnected", f"agent {where} answers again", replica=replica.name))
                if probe.exception() is not None:  # the connection is going: closed follows
                    await closed
                    return
                done, _ = await asyncio.wait({closed}, timeout=self.silence_notice)
                if closed in done:
                    return
        finally:
            closed.cancel()

    def _retry(self, holder: _Holder, error: Exception) -> tuple[str, str] | None:
        """The event kind and message for a failed attempt worth retrying; None when it is fatal."""
        where = holder.replica.transport.describe()
        if isinstance(error, AgentUnreachable):
            if self._nothing_reachable():
                return None
            if holder.ever_registered:
                return "reconnecting", f"connection to agent {where} lost"
            return "waiting", str(error)
        if (
            isinstance(error, RouteConflict)
            and error.holder == self.options.name
            and holder.lost_at is not None
            and asyncio.get_running_loop().time() - holder.lost_at < STALE_SESSION_GRACE
        ):
            # Most likely our own previous connection: after a silent loss the agent holds
            # it, and its route, until its keepalive gives up on it.
            return "reconnecting", (
                f"agent {where} still holds the route of {error.holder}, most likely for our "
                "previous connection, which it has not yet seen close"
            )
        return None

    async def _reinstalled(self) -> Credentials | None:
        """The credentials of a reinstalled agent (uninstalled, then injected again: a new host
        key in its Secret), read again from where they came from; None when there is nowhere
        to read them or the Secret holds the key we had (the key presented is not the agent's)."""
        refresh = self.options.refresh_credentials
        if refresh is None:
            return None
        try:
            fresh = await refresh()
        except InterceptError as e:
            log.info("could not read the agent's credentials again: %s", e)
            return None
        if fresh.host_public_key == self.options.credentials.host_public_key:
            return None
        self.options = dataclasses.replace(self.options, credentials=fresh)
        self._report(Event("progress", "the agent was reinstalled: its new host key and token come from its Secret"))
        return fresh

    def _registered(self, holder: _Holder) -> None:
        holder.registered = True
        again = holder.ever_registered
        holder.ever_registered = True
        if not self._ready:
            self._check_ready()
            return
        what, target = self.options.describe(), self.options.destinations()
        name = holder.replica.name
        # as the agent that just answered says (an explicit inject may have changed it)
        fence = holder.session.fence if holder.session is not None else self.fence()
        if not self._count_replicas:
            self._report(Event("reconnected", f"{what} reach {target} again", replica=name, fence=fence))
        elif again:
            self._report(Event("reconnected", f"replica {name}: {what} reach {target} again ({self._count()})",
                               replica=name, fence=fence))
        else:
            self._report(Event("joined", f"replica {name}: {what} reach {target} through it too ({self._count()})",
                               replica=name, fence=fence))

    def _check_ready(self) -> None:
        if self._ready or not self._holders or not all(h.registered for h in self._holders.values()):
            return
        self._ready = True
        self.became_ready.set()
        line = f"{self.options.describe()} now reach {self.options.destinations()}"
        if self.options.replacing is not None:  # no Service: nothing to reach; say what holds
            line = f"{self.options.replacing} is yours: your process runs in place of its app container"
        self._report(Event("ready", f"{line} ({self._count()})" if self._count_replicas else line, route=self.options.describe(),
                           fence=self.fence()))
        tls = sum(h.session.agent.tls_connections for h in self._holders.values() if h.session is not None)
        if tls:
            self._report(Event("warning", f"the agent has seen {tls} TLS connection(s) to this service: requests inside TLS "
                               "are relayed untouched to the cluster's version and never routed by header; header "
                               "routing needs plaintext HTTP/1.1 or h2c (gRPC without TLS) inside the pod"))

    def _nothing_reachable(self) -> bool:
        holders = self._holders.values()
        return (
            not self._ready
            and all(h.failures >= self._first_attempts for h in holders)
            and not any(h.ever_registered for h in holders)
        )

    def _on_replica(self, error: Exception, replica: Replica) -> Exception:
        """Name the replica in a conflict (the agent's message names only the holder)."""
        if self._count_replicas and isinstance(error, RouteConflict):
            return RouteConflict(f"agent {replica.transport.describe()}: {error}", holder=error.holder)
        return error

    def _count(self) -> str:
        total = len(self._holders)
        registered = sum(h.registered for h in self._holders.values())
        noun = "replica" if total == 1 else "replicas"
        return f"{total} {noun}" if registered == total else f"{registered} of {total} {noun}"

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            log.info("intercept ends: %s", error)
        self._failed.set()

    # -- closing ----------------------------------------------------------------------------

    async def _close(self, holder: _Holder) -> None:
        """End ``holder``'s task, then close its session (its agent drops the route)."""
        if holder.task is not None:
            holder.task.cancel()
            await asyncio.gather(holder.task, return_exceptions=True)
        session, holder.session, holder.registered = holder.session, None, False
        if session is not None:
            await session.close()

    async def _close_all(self, grace: float) -> None:
        """Leave every replica: unregister and drain, let responses in flight finish (up to
        ``grace`` seconds, or until :attr:`hurry`), then close (see the module's docstring)."""
        holders = list(self._holders.values())
        self._holders.clear()
        for holder in holders:
            if holder.task is not None:
                holder.task.cancel()
        await asyncio.gather(*(h.task for h in holders if h.task is not None), return_exceptions=True)
        sessions = [h.session for h in holders if h.session is not None and h.session.conn is not None]
        for holder in holders:
            holder.session, holder.registered = None, False
        await asyncio.gather(*(session.withdraw() for session in sessions), return_exceptions=True)
        busy = self.door.busy
        if sessions and busy and grace > 0 and not self.hurry.is_set():
            what = f"{busy} response{'s' if busy != 1 else ''} in flight"
            self._report(Event("leaving", f"{self.options.describe()} {self.options.gone}; letting {what} finish "
                                          f"(up to {grace:g}s; Ctrl-C again to leave now)", route=self.options.describe()))
            drained = asyncio.ensure_future(self.door.drained(grace))
            hurried = asyncio.ensure_future(self.hurry.wait())
            await asyncio.wait({drained, hurried}, return_when=asyncio.FIRST_COMPLETED)
            hurried.cancel()
            drained.cancel()
            if self.door.busy:
                log.warning("leaving with %d routed connections still open", self.door.busy)
        if self.before_close is not None:
            try:
                await self.before_close()
            except Exception:
                log.exception("before closing the sessions")
        results = await asyncio.gather(*(session.close() for session in sessions), *self._closing, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("closing a session failed: %s", result)


__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "STALE_SESSION_GRACE", "Fleet", "Replica", "fixed"]
