"""``intercept start`` as a Python API: the intercept and, optionally, the local process.

With a watched COMMAND, a change restarts it without failing a request: the door is
closed (new routed connections wait), the agents are asked to drain (each channel to
the old process closes when its response is complete), the old process is stopped once
its last connection closed, the new one started, and the door opened again as soon as
it accepts connections. Lines: ``intercept: reloading: ...`` then
``intercept: reloaded: ...``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any
from pathlib import Path

from intercept import protocol
from intercept.client.door import LocalDoor
from intercept.client.files import MountRequest, PodFiles, bring, keep_live
from intercept.client.fleet import Fleet, Replica, fixed
from intercept.client.outbound import OutboundProxy, SSHDialer, TCPForward, propagation, proxy_env
from intercept.client.runner import LocalCommand, Supervisor, accepting, describe_exit, dotenv, exit_status, refuse_taken_port, watch
from intercept.client.session import AgentSession, InterceptOptions
from intercept.events import Event
from intercept.errors import FenceRefused, InterceptError
from intercept.spec import Forward

if TYPE_CHECKING:  # intercept.access imports the client's outbound module: no cycle at import time
    from intercept.access.reach import AccessPlan, ClusterAccess

log = logging.getLogger(__name__)

MIRROR_REPORT = 2.0  # seconds between looks at a mirror's counts (reported when they changed)
DRAIN_GRACE = 10.0  # how long a restart waits for responses in flight to the old process
LEAVE_GRACE = 10.0  # how long leaving waits for responses in flight (a second Ctrl-C: not at all)


def default_name() -> str:
    """``--name`` default: the local part of ``git config user.email``, else ``$USER``."""
    try:
        email = subprocess.run(
            ["git", "config", "user.email"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        email = ""
    name = email.split("@", 1)[0] if email else os.environ.get("USER") or os.environ.get("USERNAME") or "developer"
    return name


async def start(
    options: InterceptOptions,
    command: LocalCommand | Sequence[str] = (),
    report: Callable[[Event], None] = lambda event: None,
    replicas: AsyncIterator[Collection[Replica]] | None = None,
    forwards: Sequence[Forward] = (),
    propagate_header: bool = False,
    stop: asyncio.Event | None = None,
    hurry: asyncio.Event | None = None,
    mount: MountRequest | None = None,
    access: AccessPlan | None = None,
) -> int:
    """Intercept until ``stop`` is set (exit 0), or until an unwatched COMMAND exits (its status).

    Raises the typed errors of the first connection (unreachable, authentication, host
    key, conflict). With ``replicas`` (each item: the current set of agent replicas),
    the route is held on every replica (:class:`~intercept.client.fleet.Fleet`) and
    ``options.transport`` is not dialled; without, on the one agent ``options.transport``.
    A watched COMMAND that exits is restarted by the next change instead.

    Leaving (``stop``) unregisters the route first, then lets responses in flight to the
    local process finish, up to :data:`LEAVE_GRACE` seconds or until ``hurry`` is set,
    and only then stops COMMAND, before the sessions its forwards and proxy ride on close
    (see :class:`~intercept.client.fleet.Fleet`): it can still use them while it stops.

    When the agents allow outbound connections, COMMAND gets HTTP_PROXY/HTTPS_PROXY
    pointing at a local proxy that dials from the agent's pod (with the route's headers
    added to plain HTTP when ``propagate_header``); each of ``forwards`` listens on
    localhost for plain TCP to a cluster service.

    With ``mount``, the pod's files are brought to a local root once the route is held
    (live or copied, :func:`intercept.client.files.bring`), before COMMAND starts with
    ``INTERCEPT_ROOT`` pointing at it; the root is removed when the intercept ends.

    With ``access`` (and agents that allow outbound connections), the local process reaches
    every Service of its namespaces by the names a pod uses (:mod:`intercept.access`), in
    the mode this machine gets; the pod's ``*_SERVICE_HOST`` variables point at the local
    addresses, said in an ``access`` line. The names go when the intercept ends.
    """
    propagate = propagation(options.route) if propagate_header else []
    if not isinstance(command, LocalCommand):
        command = LocalCommand(tuple(command))
    if command.argv and command.serves:  # before the route is held: COMMAND is to listen on the port
        for port in _local_ports(options):
            await refuse_taken_port(options.local_host, port)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    door = LocalDoor(options.name, options.local_port, options.local_host)
    held: list[Event] = []  # with a COMMAND, "ready" waits until the process accepts

    def fleet_report(event: Event) -> None:
        if command.argv and event.kind == "ready" and not door.is_open:
            held.append(event)
        else:
            report(event)

    async def stop_command() -> None:
        if supervisor is not None:
            await supervisor.stop()

    if replicas is None:
        fleet = Fleet(options, fleet_report, count_replicas=False, first_attempts=1, door=door,
                      leave_grace=LEAVE_GRACE, hurry=hurry, before_close=stop_command)
        replicas = fixed([Replica(options.transport.describe(), options.transport)])
    else:
        fleet = Fleet(options, fleet_report, door=door, leave_grace=LEAVE_GRACE, hurry=hurry, before_close=stop_command)
    exited: asyncio.Future[int] = loop.create_future()  # COMMAND's returncode (-N: killed by signal N)
    supervisor: Supervisor | None = None
    reloading: asyncio.Future[None] | None = None
    intercepting: asyncio.Future[None] | None = None
    listeners: list[OutboundProxy | TCPForward] = []
    pod_files: PodFiles | None = None
    remounting: asyncio.Future[None] | None = None
    cluster_access: ClusterAccess | None = None
    expiry: asyncio.TimerHandle | None = None
    if options.ttl is not None:  # the agents end the route then, connected or not; so do we

        def time_is_up() -> None:
            report(Event("warning", f"the route's time to live ({options.ttl:g}s) is up; leaving"))
            stop.set()

        expiry = loop.call_later(options.ttl, time_is_up)
    counting: asyncio.Future[None] | None = None
    try:
        intercepting = asyncio.ensure_future(fleet.run(replicas, stop))
        if options.mirror:
            counting = asyncio.ensure_future(_report_mirror_counts(fleet, options, report, stop))
        if command.argv:
            door.close()  # routed requests wait until the process accepts them
        if command.argv or mount is not None or access is not None:
            ready = asyncio.ensure_future(fleet.became_ready.wait())
            await asyncio.wait([ready, intercepting], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if intercepting.done():
                intercepting.result()  # raise the intercept's error
                return 0
        if access is not None:
            from intercept.access.reach import open_access

            if fleet.outbound_allowed():
                cluster_access = await open_access(access, SSHDialer(fleet.connection), report,
                                                   resolver_text=fleet.resolver(), check=fleet.check_outbound,
                                                   for_command=bool(command.argv))
            else:
                report(Event("access", "no cluster names for the local process: the agent allows no outbound "
                                       "connections (injected with --no-outbound)"))
        if mount is not None:
            pod_files = await bring(mount, fleet.connection(), report, label=options.transport.describe())
            remounting = asyncio.ensure_future(keep_live(pod_files, fleet.connection, stop, report))
        if command.argv:

            def on_exit(returncode: int) -> None:
                if command.watch:
                    report(Event("exited", f"{command.argv[0]} {describe_exit(returncode)}; save a change to restart it"))
                elif not exited.done():
                    exited.set_result(returncode)

            pod = {**await fleet.pod_environment(), **session_variables(options)}
            if pod_files is not None:
                pod["INTERCEPT_ROOT"] = str(pod_files.path)
            if cluster_access is not None:
                pod, pointed = cluster_access.environment(pod)
                if pointed:
                    report(Event("access", f"{', '.join(pointed)} point at the Services' local addresses"))
                command = dataclasses.replace(command, setup=cluster_access.setup)
            dialer = SSHDialer(fleet.connection)
            for forward in forwards:  # all judged before any listens: a refused one fails the start
                refusal = await fleet.check_outbound(forward.service, forward.port)
                if refusal is not None:
                    raise FenceRefused(f"--forward {forward}: {refusal}; forward a destination the fence allows, "
                                       "or inject the agent with a fence that allows it (--outbound-allow)")
            for forward in forwards:
                listeners.append(TCPForward(dialer, forward.service, forward.port, forward.local_port))
                await listeners[-1].start()
                report(Event("forward", f"localhost:{forward.local_port} reaches {forward.service}:{forward.port} in the cluster"))
            if fleet.outbound_allowed():
                listeners.append(OutboundProxy(dialer, propagate))
                host, port = await listeners[-1].start()
                pod.update(proxy_env(host, port))
                fence = fleet.fence()
                fenced = f" (fence: {fence})" if fence and fence != "everything" else ""
                report(Event("outbound", f"{command.argv[0]} reaches cluster services through the proxy on {host}:{port}{fenced}"))
            if command.env_file:
                Path(command.env_file).write_text(dotenv(pod))
            env = {**(os.environ if command.env is None else command.env), **pod}
            supervisor = Supervisor(dataclasses.replace(command, env=env), on_exit)
            await supervisor.start()
            if command.debug_port is not None:
                waiting = "; it waits for the debugger before running" if command.debug_wait else ""
                report(Event("debug", f"debugpy listens on 127.0.0.1:{command.debug_port}{waiting}"))
            if command.watch:
                batches = await watch(command.watch, stop)
                reloading = asyncio.ensure_future(_reload_on_change(batches, command, supervisor, door, fleet, options, report))
            if command.serves and not command.debug_wait:
                await _accepting_all(options, door, supervisor)
            door.open()
            for event in held:
                report(event)
        await asyncio.wait([intercepting, exited], return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            report(Event("exited", f"{command.argv[0]} {describe_exit(exited.result())}"))
            stop.set()
            await intercepting
            return exit_status(exited.result())
        intercepting.result()  # raise the intercept's error, if any
        return 0
    finally:
        stop.set()
        if expiry is not None:
            expiry.cancel()
        for task in (reloading, counting):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (reloading, intercepting, counting) if t is not None), return_exceptions=True)
        if supervisor is not None:
            await supervisor.stop()
        for listener in listeners:
            await listener.close()
        if remounting is not None:
            remounting.cancel()
            await asyncio.gather(remounting, return_exceptions=True)
        if pod_files is not None:
            await pod_files.close()
        if cluster_access is not None:
            await cluster_access.close()


async def ask_agent(options: InterceptOptions, request: protocol.Request) -> Any:
    """One control request to the agent ``options.transport`` reaches, without a route, and
    its typed reply (a refusal raises): :class:`~intercept.protocol.Env` (the pod's
    environment), :class:`~intercept.protocol.ListRoutes`, :class:`~intercept.protocol.Hello`."""
    session = AgentSession(options)
    await session.connect()
    try:
        return await session.ask(request)
    finally:
        await session.leave()


async def _report_mirror_counts(fleet: Fleet, options: InterceptOptions, report: Callable[[Event], None],
                                stop: asyncio.Event) -> None:
    """Until ``stop``: a ``mirrored`` event whenever the mirror's counts changed (looked at
    every :data:`MIRROR_REPORT` seconds), so that the lines and ``intercept status`` say them."""
    said = (0, 0)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), MIRROR_REPORT)
        except asyncio.TimeoutError:
            pass
        if not fleet.ready:
            continue
        counts = await fleet.mirror_counts()
        if counts != said:
            said = counts
            copied, dropped = counts
            report(Event("mirrored", f"{copied} copies reached localhost:{options.local_port}, {dropped} dropped",
                         copied=copied, dropped=dropped))


def session_variables(options: InterceptOptions) -> dict[str, str]:
    """``INTERCEPT_SESSION_*``: the intercept, described to the local process."""
    return {
        "INTERCEPT_SESSION_NAME": options.name,
        "INTERCEPT_SESSION_ROUTE": options.describe(),
        "INTERCEPT_SESSION_PORT": str(options.local_port),
    }


async def _reload_on_change(
    batches: AsyncIterator[list[str]],
    command: LocalCommand,
    supervisor: Supervisor,
    door: LocalDoor,
    fleet: Fleet,
    options: InterceptOptions,
    report: Callable[[Event], None],
) -> None:
    name = command.argv[0]
    async for changed in batches:
        first = os.path.relpath(changed[0], command.cwd or os.getcwd())
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        report(Event("reloading", f"{first}{more} changed; restarting {name}"))
        door.close()
        try:
            await fleet.drain(True)
            if not await door.drained(DRAIN_GRACE):
                log.warning("%d routed connections still open after %ss; restarting anyway", door.busy, DRAIN_GRACE)
            await supervisor.restart()
            up = await _accepting_all(options, door, supervisor)
        except InterceptError as e:  # e.g. the command vanished mid-save: say so, keep watching
            report(Event("waiting", f"{e}; save a change to try again"))
            continue
        finally:
            door.open()
            await fleet.drain(False)
        if up:
            report(Event("reloaded", f"{name} restarted; {options.describe()} reach {options.destinations()}"))
        else:
            shown = " or ".join(f"localhost:{p}" for p in _local_ports(options))
            report(Event("waiting", f"{name} does not accept connections on {shown}; save a fix to restart it"))


def _local_ports(options: InterceptOptions) -> list[int]:
    """The local ports routed requests reach (one per port intercepted)."""
    return [local for _, local in options.ports] or [options.local_port]


async def _accepting_all(options: InterceptOptions, door: LocalDoor, supervisor: Any) -> bool:
    """Whether the process accepts on every local port (each awaited as :func:`accepting` does)."""
    up = True
    for port in _local_ports(options):
        up = await accepting(options.local_host, port, door.hold_timeout, lambda: supervisor.running) and up
    return up
