"""The Python API: every user path, one call each.

The CLI, ``intercept up`` (CDE hooks), the VS Code tasks, the MCP server for coding agents
and the tests all come through here; a face parses its input, calls one function and
renders the :class:`~intercept.events.Event` objects and results it gets back. Errors are
the typed errors of :mod:`intercept.errors`, each with its exit code and its fix.

A script::

    import intercept

    with intercept.intercepting("orders", headers=["x-dev=alice"], port=8080) as it:
        reply = intercept.send_request_sync("orders", "/health", headers={"x-dev": "alice"})
        print(it.route, reply.status)   # requests with x-dev: alice 200

Asynchronous callers use :func:`start` (a running :class:`Intercept`), :func:`send_request`,
:func:`pod_env` and :func:`agent_routes`; :func:`run` is the whole ``intercept start``
command (signals, the registry of this machine's intercepts). Options are those of
``intercept.yaml``/``intercept start`` (:data:`intercept.spec.OPTIONS`), by their file
keys: ``service``, ``namespace``, ``agent``, ``credentials``, ``port``, ``headers``,
``command``, ...; :func:`make_spec` validates them exactly as the flags are validated.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h11

from intercept import protocol
from intercept.errors import AgentSettingsDiffer, InterceptError, UsageError
from intercept.events import Event
from intercept.spec import InterceptSpec, merge

log = logging.getLogger(__name__)

OnEvent = Callable[[Event], None]
OUTPUT_LINES = 1000  # lines of the local process kept by an Intercept that captures its output
BODY_LIMIT = 64 * 1024  # body bytes send_request returns by default


def make_spec(service: str | None = None, *, env: Mapping[str, str] | None = None, file: Path | None = None,
              intercepting: bool = True, **options: Any) -> InterceptSpec:
    """An intercept's options, validated as ``intercept start``'s flags are.

    ``options`` are keyed as in ``intercept.yaml`` (``port=8080``, ``headers=["x-dev=alice"]``,
    ``command=["python", "app.py"]``); ``env`` (for example ``os.environ``) adds the
    ``INTERCEPT_*`` variables below them, and ``file`` (an ``intercept.yaml``, when it
    exists) the service's entry below those, as the CLI reads them. Raises
    :class:`~intercept.errors.SpecError`. ``intercepting=False``: for :func:`connect`, which
    intercepts nothing: ``service`` may be None (any agent of the namespace), and then no
    entry of the file applies.
    """
    from intercept.spec import for_service

    if service is not None:
        options["service"] = service
    if file is not None:
        return for_service(env or {}, options, file, target=intercepting)
    return merge(None, env or {}, options, target=intercepting)


# --------------------------------------------------------------------------- reaching the agents


@dataclass
class _Target:
    """What an intercept reaches: the options of its sessions, and the replica sets to follow."""

    options: Any  # intercept.client.session.InterceptOptions
    replicas: AsyncIterator[Collection[Any]] | None  # None: the one agent options.transport reaches
    namespace: str | None
    # While the intercept runs, keep its route where agents that start later read it (until the
    # event is set); None in direct mode.
    record: Callable[[asyncio.Event], Any] | None = None
    access: Any = None  # intercept.access.reach.AccessPlan: the cluster's names for the local process; None in direct mode
    # With --replace: puts the app container back when the intercept ends (its progress as events).
    put_back: Callable[[OnEvent], Any] | None = None


@dataclass
class _Agents:
    """The agents of a Service: how to reach them, and what a running intercept keeps up to date."""

    transport: Any
    credentials: Any
    replicas: Any  # the replica sets to follow, or None: the one agent ``transport`` reaches
    namespace: str
    refresh: Callable[[], Any]  # the credentials read again (a reinstalled agent has a new host key)
    cluster: Any
    workload: str
    app_ports: tuple[int, ...] = ()  # the app port behind each of the spec's ports, in order


def _app_ports(s: InterceptSpec, agents: _Agents | None) -> tuple[tuple[int, int], ...]:
    """``(app port, local port)`` for each of ``s``'s ports: the app port behind the Service
    port (direct mode: as given); () for one port without SERVICE_PORT in direct mode (the
    agent's first port, as before several)."""
    if agents is None:
        if len(s.port) == 1 and s.port[0].service_port is None:
            return ()
        return tuple((int(p.service_port), p.local_port) for p in s.port)  # type: ignore[arg-type]
    pairs = tuple(zip(agents.app_ports, (p.local_port for p in s.port)))
    seen: dict[int, Any] = {}
    for (app, _), port in zip(pairs, s.port):
        if app in seen:
            raise UsageError(f"--port {seen[app]} and --port {port} take the same port of Service {s.service} "
                             f"(the app's port {app}); name it once")
        seen[app] = port
    return pairs


async def _target(s: InterceptSpec, emit: OnEvent, *, route: bool = True, follow: bool = True) -> _Target:
    """Resolve ``s`` to its agents: direct, or the Service's (injecting the agent once;
    only when ``route``: a command that does not intercept never adds one).

    ``route``: build the route (the personal header when no rule is given, said in a
    ``header`` event); ``follow``: watch the agent pods (else the first ready one).
    """
    from intercept.client.session import InterceptOptions
    from intercept.client.start import default_name
    from intercept.routing.fence import Fence
    from intercept.routing.match import HeaderEquals, Route

    agents = None
    if s.agent_address is not None:
        from intercept.client.transport import DirectTransport
        from intercept.credentials import load

        if s.credentials is None:
            raise UsageError("--credentials FILE is required with --agent (the file the agent wrote)")
        transport, credentials, namespace = DirectTransport(*s.agent_address), load(s.credentials), s.namespace
    elif s.service is None:
        raise UsageError("name the SERVICE (intercept start orders), or --agent HOST:PORT for an agent you can reach")
    name = s.name or default_name()
    replace_by = name if s.replace and route else None
    if agents is None and s.agent_address is None:
        agents = await _service_agents(s, emit, follow, add=route, replace_by=replace_by)
        transport, credentials, namespace = agents.transport, agents.credentials, agents.namespace
    rules = s.rules() if route else []
    if route and not rules and not s.all and not s.replace:
        rules = [HeaderEquals("x-intercept-id", name)]
        emit(Event("header", f"your requests carry x-intercept-id: {name}"))
    options = InterceptOptions(transport=transport, credentials=credentials, route=Route(frozenset(rules)), name=name,
                               local_port=s.local_port, ports=_app_ports(s, agents), all_traffic=(s.all or s.replace) and route,
                               mirror=s.mirror and route, ttl=s.ttl if route else None,
                               fence=Fence.parse(s.outbound_allow, s.outbound_deny, owner="this session"),
                               refresh_credentials=agents.refresh if agents else None,
                               replacing=s.service if replace_by is not None and "/" in (s.service or "") else None)
    if agents is None:
        return _Target(options, None, namespace)
    # A mirror is not recorded for pods that start later: they would hold its requests as an
    # intercept's until the session arrives; the fleet registers it there when it connects.
    record = functools.partial(_keep_route_recorded, agents, name, options.route) if route and not s.mirror else None
    put_back = functools.partial(_put_back, agents, s, replace_by) if replace_by is not None else None
    return _Target(options, agents.replicas, namespace, record, _access_plan(s, agents.cluster, namespace), put_back)


async def _put_back(agents: _Agents, s: InterceptSpec, replace_by: str, emit: OnEvent) -> None:
    """The app container of ``s.service`` as it was before ``replace_by`` replaced it
    (:func:`intercept.kube.apply.put_back`); a failure is said, as an ``error`` event and in
    the log, not raised: the intercept has ended by then."""
    from intercept.kube.apply import put_back

    loop = asyncio.get_running_loop()
    progress = lambda line: loop.call_soon_threadsafe(emit, Event("progress", line))  # noqa: E731 (from the worker thread)
    try:
        await asyncio.to_thread(put_back, agents.cluster.api, agents.namespace, s.service, replace_by, progress)
    except InterceptError as e:
        log.error("the app of %s is not back: %s", s.service, e)
        emit(Event("error", f"the app of {s.service} is not back: {e}; run intercept uninstall "
                            f"{agents.workload} -n {agents.namespace} to put it back"))


def _access_plan(s: InterceptSpec, cluster: Any, namespace: str) -> Any:
    """The Services to reach by name from the local process (``--access``, ``--also-namespace``), or None."""
    from intercept.access.reach import AccessPlan
    from intercept.kube.services import follow_services

    if s.access == "off":
        return None
    namespaces = tuple(dict.fromkeys((namespace, *s.also_namespaces)))
    return AccessPlan(s.access, namespaces, lambda: follow_services(cluster.api, namespaces))


async def _keep_route_recorded(agents: _Agents, name: str, route: Any, ended: asyncio.Event) -> None:
    """Until ``ended``: this developer's route in the workload's routes ConfigMap, renewed, so
    that an agent pod that starts meanwhile holds their requests until their session
    arrives (:mod:`intercept.routing.developers`); then removed. A cluster that refuses
    the write is logged: the intercept goes on without it."""
    import time

    from intercept.kube.developers import announce, withdraw
    from intercept.routing.developers import LEASE, RENEW, DeveloperRoute

    api, ns, workload = agents.cluster.api, agents.namespace, agents.workload
    entry = None
    try:
        while not ended.is_set():
            entry = DeveloperRoute(name, route, time.time() + LEASE)
            try:
                await asyncio.to_thread(announce, api, ns, workload, entry, time.time())
            except InterceptError as e:
                log.warning("your route is not recorded for agent pods that start later: %s", e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ended.wait(), RENEW)
    finally:
        if entry is not None:
            try:
                await asyncio.to_thread(withdraw, api, ns, workload, entry, time.time())
            except InterceptError as e:
                log.warning("your route stays recorded until it expires (%gs): %s", LEASE, e)


# The pod-wide options of an intercept (spec keys) and the InjectOptions fields they set. A
# start's --outbound-allow/--outbound-deny are not among them: they narrow the session's own
# fence once the agent runs (and become the agent's fence only when the start injects it).
_POD_WIDE = {"agent_image": "image", "no_outbound": "outbound", "no_forwarded_headers": "forwarded_headers",
             "hold_timeout": "hold_timeout"}


def _inject_options(s: InterceptSpec) -> Any:
    from intercept.kube.inject import InjectOptions

    ports = s.ports()
    return InjectOptions(image=s.agent_image, service_port=ports[0].service_port if len(ports) == 1 else None,
                         service_ports=tuple(p.service_port for p in ports) if len(ports) > 1 else (),
                         outbound=not s.no_outbound,
                         no_policy_changes=s.no_policy_changes, forwarded_headers=not s.no_forwarded_headers,
                         outbound_allow=s.outbound_allow, outbound_deny=s.outbound_deny, hold_timeout=s.hold_timeout)


async def _ensure_agent(cluster: Any, s: InterceptSpec, emit: OnEvent, *, add: bool, named: Collection[str],
                        reinject: bool, replace_by: str | None = None) -> Any:
    """:func:`_ensure_agent_raw`; a refusal for settings that differ names the developers the
    agent serves now and the explicit way to change it."""
    try:
        return await _ensure_agent_raw(cluster, s, emit, add=add, named=named, reinject=reinject, replace_by=replace_by)
    except AgentSettingsDiffer as e:
        holders = await _holders(cluster, e.agent)
        serves = f"it serves {', '.join(holders)} now" if holders else "nobody holds a route on it now"
        flags = " ".join(_pod_wide_flags(s, named))
        raise AgentSettingsDiffer(
            f"{e} ({serves}); one agent configuration serves every developer of {s.service}, and a start does not "
            f"change it: leave those options out to use the agent's, or change it for everyone with "
            f"intercept inject {s.service} -n {cluster.namespace} {flags} (its pods are replaced, interrupting "
            f"{len(holders)} developer{'' if len(holders) == 1 else 's'})", e.agent, e.differences) from None


async def _ensure_agent_raw(cluster: Any, s: InterceptSpec, emit: OnEvent, *, add: bool, named: Collection[str],
                            reinject: bool, replace_by: str | None = None) -> Any:
    """:func:`intercept.kube.apply.ensure_agent` in a thread, its progress as events; Ctrl-C
    while a rollout is awaited puts the originals back first. With ``replace_by``, the
    developers holding routes on an agent in place are asked for (a replace is refused then)."""
    from intercept.kube.apply import ensure_agent

    loop = asyncio.get_running_loop()

    def holders(info: Any) -> list[str]:  # from ensure_agent's thread: ask on the loop
        return asyncio.run_coroutine_threadsafe(_holders(cluster, info), loop).result()

    return await _awaiting_rollout(emit, ensure_agent, cluster.api, cluster.namespace, s.service, _inject_options(s),
                                   timeout=s.timeout, named=named, reinject=reinject, add=add, replace_by=replace_by,
                                   holders=holders)


async def _awaiting_rollout(emit: OnEvent, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``write(*args, progress, interrupt=..., **kwargs)`` (a blocking call that writes to the
    cluster and awaits a rollout) in a thread, its progress as events; cancelled (Ctrl-C)
    while it waits, it is interrupted, puts back what it wrote, and only then do we go."""
    loop = asyncio.get_running_loop()
    progress = lambda line: loop.call_soon_threadsafe(emit, Event("progress", line))  # noqa: E731 (from the worker thread)
    interrupt = threading.Event()
    writing = asyncio.ensure_future(asyncio.to_thread(write, *args, progress, interrupt=interrupt, **kwargs))
    try:
        return await asyncio.shield(writing)
    except asyncio.CancelledError:
        interrupt.set()
        await asyncio.gather(writing, return_exceptions=True)
        raise


def _pod_wide_flags(s: InterceptSpec, named: Collection[str]) -> list[str]:
    from intercept.spec import OPTIONS, to_args

    return to_args(s, skip=[o.key for o in OPTIONS if _POD_WIDE.get(o.key) not in named])


async def _holders(cluster: Any, info: Any) -> list[str]:
    """Who holds routes on the agents of ``info`` (an AgentInfo), as one of them lists them; [] if none answers."""
    from intercept.client.session import AgentSession, InterceptOptions
    from intercept.routing.match import Route

    try:
        transport = await asyncio.to_thread(_one_pod, cluster, info)
        session = AgentSession(InterceptOptions(transport=transport, credentials=info.credentials, route=Route(frozenset()),
                                                name="intercept", local_port=1))
        await session.connect()
        try:
            routes = (await session.ask(protocol.ListRoutes())).routes
        finally:
            await session.leave()
    except (InterceptError, OSError) as e:
        log.info("could not ask the agents of %s who they serve: %s", info.service, e)
        return []
    return sorted({str(r.get("holder")) for r in routes if _connected(r)})


def _connected(route: Mapping[str, Any]) -> bool:
    """Whether a route an agent lists is held by a developer connected to it: not a sandbox's,
    nor the pending route of a developer known only from the developers file."""
    from intercept.routing.cluster import SESSION_PREFIX
    from intercept.routing.developers import PENDING_PREFIX

    return not str(route.get("session", "")).startswith((SESSION_PREFIX, PENDING_PREFIX))


async def _service_agents(s: InterceptSpec, emit: OnEvent, follow: bool, *, add: bool = True,
                          replace_by: str | None = None) -> _Agents:
    """The agents of Service ``s.service`` (the agent injected first if it has none and
    ``add``); with ``follow``, the replica sets to follow (an uninstall ends them with
    AgentRemoved), else the transport to one ready pod."""
    from intercept.client.fleet import pod_replicas
    from intercept.client.transport import ServiceTransport
    from intercept.kube.apply import agent_credentials
    from intercept.kube.config import connect
    from intercept.kube.pods import watch_agent_pods

    cluster = await asyncio.to_thread(connect, s.kubeconfig, s.context, s.namespace)
    named = {field for key, field in _POD_WIDE.items() if key in s.origins}
    info = await _ensure_agent(cluster, s, emit, add=add, named=named, reinject=s.reinject and add, replace_by=replace_by)

    async def refresh() -> Any:
        return await asyncio.to_thread(agent_credentials, cluster.api, cluster.namespace, info.workload_name)

    if follow:
        pods = watch_agent_pods(cluster.api, cluster.namespace, info.selector,
                                workload=(info.workload_kind, info.workload_name, s.service))
        replicas = pod_replicas(pods, cluster.api, in_cluster=cluster.in_cluster)
        return _Agents(ServiceTransport(cluster.namespace, s.service), info.credentials, replicas, cluster.namespace,
                       refresh, cluster, info.workload_name, info.app_ports)
    return _Agents(await asyncio.to_thread(_one_pod, cluster, info), info.credentials, None, cluster.namespace, refresh,
                   cluster, info.workload_name, info.app_ports)


def _one_pod(cluster: Any, info: Any) -> Any:
    """The transport to one ready agent pod of ``info`` (an AgentInfo); UsageError when none is ready."""
    from intercept.client.fleet import pod_transport
    from intercept.kube.pods import agent_pods

    pods = [p for p in agent_pods(cluster.api, info.namespace, info.selector) if p.ready and p.ip]
    if not pods:
        raise UsageError(f"no ready agent pod behind {info.namespace}/{info.service}; check `kubectl get pods -n {info.namespace}`")
    return pod_transport(pods[0], cluster.api, in_cluster=cluster.in_cluster)


@contextlib.asynccontextmanager
async def _session(s: InterceptSpec) -> AsyncIterator[Any]:
    """A control session (no route) to one agent of ``s``."""
    from intercept.client.session import AgentSession

    target = await _target(s, lambda event: None, route=False, follow=False)
    session = AgentSession(target.options)
    await session.connect()
    try:
        yield session
    finally:
        await session.leave()


async def _connect_agent(cluster: Any, s: InterceptSpec, emit: OnEvent) -> Any:
    """:func:`intercept.kube.connect_agent.ensure` (its rollout interruptible), its progress as events."""
    from intercept.kube import connect_agent

    return await _awaiting_rollout(emit, connect_agent.ensure, cluster.api, cluster.namespace, _inject_options(s),
                                   timeout=s.timeout)


async def connect(s: InterceptSpec, command: Sequence[str] = (), *, on_event: OnEvent | None = None,
                  output: Callable[[str], None] | None = None, stop: asyncio.Event | None = None,
                  timeout: float | None = None) -> int:
    """``intercept connect``: the local process reaches the cluster as a pod of ``s.namespace``
    does (every Service by name, ``s.also_namespaces`` too), without intercepting anything.

    It goes through the agent of ``s.service`` when given (and adds none there:
    :class:`~intercept.errors.NoAgent` names the fix), else any agent of the namespace, else
    a small agent of its own (:mod:`intercept.kube.connect_agent`: ``s.agent_image``, its
    fence from ``s.outbound_allow``/``s.outbound_deny``), started once and reused, which
    ``intercept gc`` removes once idle. Runs ``command`` (the user's shell when empty) with
    the names, and returns its exit status (128 + N when signal N ended it); ``stop`` ends it
    early (status 0), and set before it starts, it is not started at all. ``timeout``: the
    seconds ``command`` may run, counted from its start (not the agent's rollout nor the
    tunnel's setup); then it is stopped (status 0) and ``stop`` set, so the caller can tell.
    However this ends (cancelled too), ``command`` does not outlive it. ``output``: the
    command's lines, instead of our stdout (the MCP server's tool).
    """
    from intercept.access.reach import open_access
    from intercept.client.outbound import SSHDialer
    from intercept.client.runner import LocalProcess, exit_status, run_command
    from intercept.client.session import AgentSession, InterceptOptions
    from intercept.client.start import default_name
    from intercept.kube.apply import list_services as rows_of
    from intercept.kube.config import connect as connect_cluster
    from intercept.routing.fence import Fence
    from intercept.routing.match import Route

    emit = on_event or (lambda event: None)
    cluster = await asyncio.to_thread(connect_cluster, s.kubeconfig, s.context, s.namespace)
    service = s.service
    if service is None:
        rows = await asyncio.to_thread(rows_of, cluster.api, cluster.namespace, routes=None)
        service = next((row["service"] for row in rows if row.get("agent")), None)
    if service is not None:
        spec = s if s.service == service else replace(s, service=service, namespace=cluster.namespace)
        agents = await _service_agents(spec, emit, False, add=False)
        transport, credentials, via = agents.transport, agents.credentials, f"the agent of {service}"
        no_outbound = (f" (injected with --no-outbound); inject it again without it: intercept inject {service} -n "
                       f"{cluster.namespace}")
    else:
        spec = replace(s, namespace=cluster.namespace)
        info = await _connect_agent(cluster, s, emit)
        transport = await asyncio.to_thread(_one_pod, cluster, info)
        credentials, via = info.credentials, f"intercept connect's own agent ({info.workload})"
        no_outbound = (f", which intercept never starts it without: it is not one this intercept started; remove it "
                       f"(intercept uninstall {info.workload_name} -n {cluster.namespace}) and connect again")
    options = InterceptOptions(transport=transport, credentials=credentials, route=Route(frozenset()),
                               name=s.name or default_name(), local_port=1,
                               fence=Fence.parse(s.outbound_allow, s.outbound_deny, owner="this session"))
    session = AgentSession(options)
    await session.open_unrouted()
    access = None
    try:
        if not session.agent.outbound:
            raise UsageError(f"{via} (namespace {cluster.namespace}) allows no outbound connections{no_outbound}")
        emit(Event("starting", f"reaching the cluster as a pod of {cluster.namespace} does, through {via}"))
        plan = _access_plan(spec, cluster, cluster.namespace)
        if plan is None:
            raise UsageError("intercept connect --access off: nothing to connect; leave --access out (auto)")
        access = await open_access(plan, SSHDialer(lambda: session.conn), emit, resolver_text=session.agent.resolver,
                                   check=session.check_outbound, for_command=True)
        argv = list(command) or [os.environ.get("SHELL") or "/bin/sh"]
        process = LocalProcess(argv, os.environ, output=output, setup=access.setup if access else None,
                               own_group=bool(command) or output is not None)
        status = await run_command(process, stop, timeout)
        if status is None:  # stopped (or never started: stop came during the setup)
            return 0
        code = exit_status(status)
        emit(Event("exited", f"{argv[0]} exited with status {code}", status=code))
        return code
    finally:
        if access is not None:
            await access.close()
        await session.close()


async def pod_env(s: InterceptSpec) -> dict[str, str]:
    """The pod's environment (the app container's variables), as the agent hands it over."""
    async with _session(s) as session:
        return dict((await session.ask(protocol.Env())).env)


def env_access(env: Mapping[str, str], s: InterceptSpec) -> Event | None:
    """What ``intercept env`` did to the pod's Service link variables (``REDIS_SERVICE_HOST``,
    ...): nothing, and what ``intercept start``/``intercept connect`` do with them on this
    machine (pointed at the Services' local addresses, or left); None when ``env`` has none."""
    from intercept.access.modes import choose
    from intercept.access.names import link_variables

    variables = link_variables(env)
    if not variables:
        return None
    shown = ", ".join(variables[:4]) + (f" and {len(variables) - 4} more" if len(variables) > 4 else "")
    said = f"{shown} are as in the pod (the Services' ClusterIPs): intercept env leaves them"
    if s.agent_address is not None:
        return Event("access", f"{said}, and so does intercept start --agent (direct mode follows no Services)")
    try:
        mode = choose(s.access)
    except UsageError as e:  # --access MODE that cannot work here: informational here, said as the reason
        return Event("access", f"{said}; intercept start and connect with --access {s.access} would not start here: {e}")
    if mode.names:
        return Event("access", f"{said}; intercept start and connect point them at the Services' local addresses for "
                               f"COMMAND ({mode.name}: {mode.why})")
    return Event("access", f"{said}, and so do intercept start and connect here ({mode.name}: {mode.why})")


async def agent_routes(s: InterceptSpec) -> list[dict[str, Any]]:
    """Everyone's routes, as one agent of ``s`` lists them."""
    async with _session(s) as session:
        return list((await session.ask(protocol.ListRoutes())).routes)


async def files(s: InterceptSpec, path: str = "/", *, to: Path | None = None) -> dict[str, Any]:
    """Copy the pod's files (the app container's mounts, as one agent of ``s`` serves them)
    under ``to``, each at its path (``/etc/config/app.yaml`` is ``to/etc/config/app.yaml``);
    ``path`` copies only that part. ``to`` must be new or empty (default: a fresh temporary
    directory). Files are written 0600, directories 0700; what the agent refuses (a link
    that leads out of its mount) is listed, not copied. Returns ``path`` (the directory),
    ``files``, ``bytes`` and ``refused``. Nothing is intercepted."""
    import tempfile

    from intercept.client.files import copy_tree

    if to is None:
        dest = Path(tempfile.mkdtemp(prefix="intercept-files-"))
    else:
        dest = to.expanduser().absolute()
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise UsageError(f"--to {to}: it exists and is not an empty directory; name a new or empty one")
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    async with _session(s) as session:
        if not session.agent.files:
            raise InterceptError(f"agent {session.options.transport.describe()} serves no files: the app container has no "
                                 "volume mounts (in direct mode: run the agent with --serve-files DIR)")
        async with session.conn.start_sftp_client() as sftp:
            copied = await copy_tree(sftp, dest, path)
    return {"path": str(dest), "files": copied.files, "bytes": copied.bytes, "refused": copied.refused}


@dataclass(frozen=True)
class Response:
    """What :func:`send_request` got back; ``body`` holds at most the limit it was given."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    truncated: bool

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


async def send_request(
    s: InterceptSpec,
    path: str = "/",
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    limit: int = BODY_LIMIT,
    timeout: float = 30.0,
) -> Response:
    """Send one HTTP request into the agent of ``s`` as cluster traffic arrives, and read the reply.

    It enters through the agent's own listener (the SSH front door), so it is routed
    exactly like a request from inside the cluster: with a developer's header it reaches
    that developer's process, without it the app. ``body`` of the reply stops at ``limit``.
    A method, path or header that HTTP/1.1 cannot carry is a :class:`~intercept.errors.UsageError`
    naming it, before anything is sent.
    """
    head = _request_head(method, path, headers or {}, host=s.service or "intercept", length=len(body))
    if limit < 0:
        raise UsageError(f"limit {limit}: the most body bytes to return must be 0 or more")
    async with _session(s) as session:
        try:
            reader, writer = await asyncio.wait_for(
                session.conn.open_connection(protocol.FRONT_DOOR_HOST, protocol.FRONT_DOOR_PORT), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise InterceptError(f"agent {session.options.transport.describe()} did not open its HTTP listener: {e}") from None
        h = h11.Connection(h11.CLIENT)
        writer.write(h.send(head) + h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage()))
        try:
            return await asyncio.wait_for(_read_response(h, reader, limit), timeout)
        except asyncio.TimeoutError:
            raise InterceptError(f"no response to {method} {path} within {timeout:g}s") from None
        except h11.RemoteProtocolError as e:
            raise InterceptError(f"malformed response to {method} {path}: {e}") from None
        finally:
            writer.close()


# RFC 9110: a method and a field name are tokens (5.6.2); a field value is visible ASCII with
# inner spaces and tabs (5.5; other octets are sent only percent-encoded); a request target in
# origin form is visible ASCII (7.1).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")
_TARGET = re.compile(r"/[\x21-\x7e]*")
_FRAMING = ("content-length", "transfer-encoding")  # send_request's own: they follow from the body


def _request_head(method: str, path: str, headers: Mapping[str, str], *, host: str, length: int) -> h11.Request:
    """The head :func:`send_request` sends: ``headers`` after ``Host: host`` (a ``Host`` among
    them replaces it), then ``Content-Length: length`` and ``Connection: close``.

    Raises :class:`~intercept.errors.UsageError` naming the method, path or header that
    HTTP/1.1 cannot carry, and how to write it.
    """
    if not path.startswith("/"):
        raise UsageError(f"path {path!r}: it must start with /, e.g. /health")
    if not _TARGET.fullmatch(path):
        raise UsageError(f"path {path!r} is not a valid request target; use visible ASCII without spaces, "
                         "percent-encoding the rest, e.g. /a%20b")
    if not _TOKEN.fullmatch(method):
        raise UsageError(f"method {method!r} is not an HTTP method; write a token such as GET, POST or DELETE")
    fields = [("Host", host)]
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise UsageError(f"header name {name!r} is not a valid HTTP field name; use letters, digits and "
                             "!#$%&'*+-.^_`|~ only (no spaces or colons), e.g. x-dev")
        if not _FIELD_VALUE.fullmatch(value):
            raise UsageError(f"header {name}: value {value!r} is not a valid HTTP field value; use visible ASCII "
                             "with inner spaces only (no line breaks, control characters or spaces at either end), "
                             "percent-encoding the rest")
        if name.lower() in _FRAMING:
            raise UsageError(f"header {name}: send_request frames the body itself; remove {name} "
                             "(the body's length is sent as Content-Length)")
        if name.lower() == "host":
            fields[0] = (name, value)
        else:
            fields.append((name, value))
    fields += [("Content-Length", str(length)), ("Connection", "close")]
    return h11.Request(method=method, target=path, headers=fields)


async def _read_response(h: h11.Connection, reader: Any, limit: int) -> Response:
    response, data, truncated = None, bytearray(), False
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            chunk = await reader.read(65536)
            h.receive_data(chunk)
            continue
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            room = limit - len(data)
            data += event.data[:room]
            if len(event.data) > room:
                truncated = True
                break
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    if response is None:
        raise InterceptError("the connection closed before a response")
    return Response(response.status_code, response.reason.decode("latin-1"),
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw_items()],
                    bytes(data), truncated)


# --------------------------------------------------------------------------- intercepting


class Intercept:
    """A running intercept, from :func:`start`: its route held on every agent replica.

    ``events`` is everything it reported so far; ``output`` the last lines of the local
    process when :func:`start` was asked to capture them. :meth:`stop` leaves (the route
    goes from every agent, the process stops); :meth:`wait` returns the exit status when it
    ends by itself (an unwatched command exited) and raises the error that ended it.
    """

    def __init__(self, s: InterceptSpec, target: _Target, emit: OnEvent) -> None:
        self.spec = s
        self.name: str = target.options.name
        self.route: str = target.options.describe()
        self.local_port: int = s.local_port
        self.namespace = target.namespace
        self.events: list[Event] = []
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self._emit = emit
        self._target = target
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()  # leave without waiting for responses in flight
        self._ready = asyncio.Event()
        self._task: asyncio.Task[int] | None = None

    def _event(self, event: Event) -> None:
        self.events.append(event)
        if event.kind == "ready":
            self._ready.set()
        self._emit(event)

    def _run(self, capture: bool) -> None:
        from intercept.client.runner import LocalCommand
        from intercept.client.start import start as start_client
        from intercept.kube.inject import is_workload_ref

        s = self.spec
        command = LocalCommand(
            tuple(s.command),
            watch=tuple(str(p) for p in s.watch) if s.command and not s.no_watch else (),
            cwd=str(s.directory) if s.command and s.directory != Path(".") else None,
            debug_port=s.debug_port if s.debug or s.debug_wait else None,
            debug_wait=s.debug_wait,
            env_file=str(s.env_file) if s.env_file else None,
            output=self.output.append if capture else None,
            serves=not is_workload_ref(s.service),
        )
        mount = None
        if s.mount is not None:
            from intercept.client.files import MountRequest

            mount = MountRequest(None if s.mount is True else Path(s.mount), s.mount_mode)
        self._task = asyncio.ensure_future(self._running(start_client(
            self._target.options, command, self._event, self._target.replicas, s.forward, s.propagate_header, self._stop,
            self._hurry, mount, self._target.access)))

    async def _running(self, client: Any) -> int:
        """The intercept, with its route recorded for agent pods that start while it runs."""
        ended = asyncio.Event()
        record = self._target.record
        recording = asyncio.ensure_future(record(ended)) if record is not None else None
        try:
            return await client
        finally:
            ended.set()
            if recording is not None:
                await asyncio.gather(recording, return_exceptions=True)
            if self._target.put_back is not None:  # --replace: the app comes back (also after a failed start)
                await self._target.put_back(self._event)

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def ready(self, timeout: float | None = None) -> None:
        """Until requests that match reach the local port; raises the error if it ends first."""
        waiting = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({waiting, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if self._ready.is_set():
            return
        if self._task.done():
            self._task.result()  # its error
            raise InterceptError(f"intercept of {self.spec.service or self.spec.agent} ended before it was ready")
        raise InterceptError(f"intercept of {self.spec.service or self.spec.agent} not ready within {timeout:g}s")

    async def wait(self) -> int:
        return await asyncio.shield(self._task)

    async def stop(self, *, now: bool = False) -> int:
        """Leave: the route goes from every agent first, then responses in flight to the local
        process are let finish (up to 10 s; ``now``: not waited for), then the process stops."""
        self._stop.set()
        if now:
            self._hurry.set()
        return await self.wait()

    def hurry(self) -> None:
        """While leaving: stop waiting for responses in flight (a second Ctrl-C)."""
        self._hurry.set()
        self._stop.set()


async def start(s: InterceptSpec, *, on_event: OnEvent | None = None, capture_output: bool = False) -> Intercept:
    """Start intercepting: resolve (and inject once), then hold the route in the background.

    Returns once the intercept runs (``starting`` was reported); ``await it.ready()`` for
    the route to be held. Raises the typed errors of resolving and injecting; the errors
    of connecting (unreachable, token, host key, conflict) come from ``ready()``/``wait()``.
    With ``capture_output``, the local command's lines go to ``it.output``, not to stdout.
    """
    emit = on_event or (lambda event: None)
    early: list[Event] = []  # said while resolving and injecting, before the Intercept exists

    def say(event: Event) -> None:
        early.append(event)
        emit(event)

    target = await _target(s, say)
    it = Intercept(s, target, emit)
    it.events.extend(early)
    transport = target.options.transport.describe()
    if s.replace and "/" in (s.service or ""):
        said = f"{s.service} replaced by your process: its app container runs in no replica until you leave (no Service: no requests)"
    else:
        said = f"{it.route} to localhost:{s.local_port} through {transport}"
        said += f"; its app container runs in no replica until you leave" if s.replace else ""
    it._event(Event("starting", said, route=it.route))
    it._run(capture_output)
    return it


def run(s: InterceptSpec, on_event: OnEvent, *, registry_entry: Mapping[str, Any] | None = None) -> int:
    """``intercept start``: intercept until SIGINT or SIGTERM (0), or until an unwatched
    command exits (its status). With ``registry_entry``, this process is listed in this
    machine's registry while the intercept runs (``intercept status`` / ``leave`` find it),
    completed with the route, the name and the namespace."""
    from intercept.workspace import register

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        running: list[Intercept] = []

        def on_signal() -> None:
            if stopping.is_set():  # the second Ctrl-C: leave now, cutting what is in flight
                for it in running:
                    it.hurry()
            stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        registration: Any = None

        def record(event: Event) -> None:  # what status shows, once it is known
            if registration is not None and event.fence is not None:  # ready, joined, reconnected: as agents say
                registration.update(fence=event.fence)
            elif registration is not None and event.kind == "mount":
                registration.update(files=event.path)
            elif registration is not None and event.kind == "mirrored":
                registration.update(mirrored={"copied": event.copied, "dropped": event.dropped})

        def observe(event: Event) -> None:
            record(event)  # first: once a line is printed, intercept status says it too
            on_event(event)

        try:
            preparing = asyncio.ensure_future(start(s, on_event=observe))
            interrupted = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({preparing, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            interrupted.cancel()
            if not preparing.done():  # interrupted while injecting: the originals are put back, then we leave
                preparing.cancel()
                await asyncio.gather(preparing, return_exceptions=True)
                return 0
            it = preparing.result()
            running.append(it)
            entry = {**registry_entry, "route": it.route, "name": it.name, "namespace": it.namespace} if registry_entry else None
            with register(entry) if entry is not None else contextlib.nullcontext() as registration:
                for event in it.events:  # said before the registration existed
                    record(event)
                stopped = asyncio.ensure_future(stopping.wait())
                ended = asyncio.ensure_future(it.wait())
                await asyncio.wait({stopped, ended}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                return await (ended if ended.done() else it.stop())
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    return _run_loop(main())


def _run_loop(main: Any) -> Any:
    """Run a coroutine on uvloop when it is installed (the data path is asyncio throughout)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class LoopThread:
    """An event loop in a daemon thread, for the synchronous API (and the demo's agent)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="intercept", daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def intercepting(service: str | None = None, *, on_event: OnEvent | None = None, timeout: float = 120.0,
                 capture_output: bool = False, **options: Any) -> Iterator[Intercept]:
    """Intercept for the duration of a ``with`` block (from synchronous code: scripts, pytest).

    Blocks until the route is held (or raises its error), yields the :class:`Intercept`,
    and leaves when the block ends. ``options`` as for :func:`spec`.
    """
    s = make_spec(service, **options)
    runner = LoopThread()
    try:
        it = runner.call(start(s, on_event=on_event, capture_output=capture_output))
        try:
            runner.call(it.ready(timeout))
            yield it
        finally:
            runner.call(it.stop())
    finally:
        runner.close()


def send_request_sync(service: str | None = None, path: str = "/", **kwargs: Any) -> Response:
    """:func:`send_request` from synchronous code; ``kwargs`` mixes its arguments and :func:`make_spec`'s options."""
    request_keys = {"method", "headers", "body", "limit", "timeout"}
    request = {k: kwargs.pop(k) for k in list(kwargs) if k in request_keys}
    return asyncio.run(send_request(make_spec(service, **kwargs), path, **request))


# --------------------------------------------------------------------------- the cluster and this machine

# These are synchronous: each is one short exchange with the API server or the state directory.


def list_services(namespace: str | None = None, *, all_namespaces: bool = False, kubeconfig: str | Path | None = None,
                  context: str | None = None, with_routes: bool = True) -> tuple[str | None, list[dict[str, Any]]]:
    """The namespace listed (None: all of them) and its Services: which can be intercepted,
    which have an agent, and (``with_routes``) everyone's routes as one agent pod of each
    lists them (an ``error`` entry where none answers). Nothing is injected."""
    from intercept.client.session import InterceptOptions
    from intercept.client.start import ask_agent, default_name
    from intercept.kube.apply import list_services as rows_of
    from intercept.kube.config import connect
    from intercept.routing.match import Route

    if all_namespaces and namespace:
        raise UsageError("pass -n NAMESPACE or -A, not both")
    cluster = connect(kubeconfig, context, namespace)

    def routes(info: Any) -> list[dict[str, Any]]:
        try:
            options = InterceptOptions(transport=_one_pod(cluster, info), credentials=info.credentials,
                                       route=Route(frozenset()), name=default_name(), local_port=0)
            return list(asyncio.run(ask_agent(options, protocol.ListRoutes())).routes)
        except InterceptError as e:
            return [{"error": str(e)}]

    listed = None if all_namespaces else cluster.namespace
    return listed, rows_of(cluster.api, listed, routes=routes if with_routes else None)


def uninstall(service: str | None = None, *, all: bool = False, namespace: str | None = None,
              kubeconfig: str | None = None, context: str | None = None, timeout: float = 300.0,
              on_event: OnEvent | None = None, force: bool = False) -> Any:
    """Remove the agent behind ``service`` (or every agent of the namespace with ``all``) and
    restore what it changed, exactly; idempotent. Returns :class:`~intercept.kube.apply.Uninstalled`.

    Refused (:class:`~intercept.errors.AgentInUse`), naming them, while developers hold
    routes on an agent it would remove, or reach the cluster through intercept connect's
    own agent (``intercept-connect``, which ``all`` removes too; asked as ``intercept gc``
    asks it), unless ``force``; their intercepts and connects then end saying that the
    agent was removed by an uninstall."""
    from intercept.errors import AgentInUse
    from intercept.kube import connect_agent
    from intercept.kube.apply import uninstall as remove
    from intercept.kube.config import connect

    if bool(service) == all:
        raise UsageError("pass a SERVICE, or --all for every agent in the namespace (not both)")
    emit = on_event or (lambda event: None)
    cluster = connect(kubeconfig, context, namespace)
    if not force:
        _, rows = list_services(cluster.namespace, kubeconfig=kubeconfig, context=context)
        held = {r["service"]: sorted({x["holder"] for x in r["routes"] if "holder" in x and _connected(x)})
                for r in rows if r["agent"] and (all or r["service"] == service)}
        held = {name: holders for name, holders in held.items() if holders}
        said = [f"the agent of {name} serves {', '.join(holders)}" for name, holders in sorted(held.items())]
        connects = False
        if all or (service == connect_agent.NAME and not any(r["service"] == service for r in rows)):
            users = _connect_agent_users(cluster)
            if users:
                said.append(f"intercept connect's own agent ({connect_agent.NAME}) {users}")
                connects = True
        if said:
            cut, leave = ("intercepts and connects", "intercept leave SERVICE, or end the connect") if connects else (
                "intercepts", "intercept leave SERVICE")
            raise AgentInUse(f"{'; '.join(said)} (namespace {cluster.namespace}): uninstalling cuts their {cut}; "
                             f"ask them to leave ({leave}), or uninstall anyway with --force")
    return remove(cluster.api, cluster.namespace, service, all=all, progress=lambda line: emit(Event("progress", line)),
                  timeout=timeout)


def _connect_agent_users(cluster: Any) -> str:
    """Who reaches the cluster through the namespace's connect agent now, as it says (in
    words: "serves alice, bob"), or "" when nobody does, it has no ready pod (nobody can
    be using it) or the namespace has none. An agent that cannot be asked is taken as in
    use (:class:`~intercept.errors.AgentInUse` says so): an uninstall without ``--force``
    never cuts what it could not see."""
    from intercept.client.session import InterceptOptions
    from intercept.client.start import ask_agent, default_name
    from intercept.errors import AgentInUse
    from intercept.kube import connect_agent
    from intercept.routing.match import Route

    try:
        info = connect_agent.find(cluster.api, cluster.namespace)
    except InterceptError:  # a Deployment of that name that is not intercept's: uninstall keeps it anyway
        return ""
    if info is None:
        return ""
    try:
        transport = _one_pod(cluster, info)
    except UsageError:  # no ready pod: nobody reaches anything through it
        return ""
    try:
        hello = asyncio.run(ask_agent(InterceptOptions(transport=transport, credentials=info.credentials,
                                                       route=Route(frozenset()), name=default_name(), local_port=0),
                                      protocol.Hello()))
    except Exception as e:  # noqa: BLE001 - said in the refusal, with the way past it
        raise AgentInUse(f"intercept connect's own agent ({connect_agent.NAME}, namespace {cluster.namespace}) could "
                         f"not be asked whether connects use it ({e}); uninstall anyway with --force") from None
    if hello.reaching:
        return f"serves {', '.join(hello.reaching)}"
    if hello.lacks("reach") is not None and hello.idle_seconds == 0:  # an agent from before it named them
        return "is in use (its agent does not say by whom)"
    return ""


def doctor(service: str | None = None, *, namespace: str | None = None, kubeconfig: str | Path | None = None,
           context: str | None = None, agent_image: str | None = None, image_origin: str | None = None,
           service_port: str | int | None = None, no_policy_changes: bool = False) -> list[Any]:
    """What a first ``intercept start [SERVICE]`` needs, checked: the cluster, RBAC, the agent
    image, Pod Security, NetworkPolicies and (with a SERVICE) what its app's port speaks.

    Returns :class:`~intercept.kube.doctor.Check` objects in order; none raises for a failed
    check (only a cluster configuration that cannot be read raises). ``agent_image`` None is the
    built-in default; ``image_origin`` says where a given image came from (``--agent-image``,
    ``INTERCEPT_AGENT_IMAGE``, ``intercept.yaml``)."""
    from intercept.kube import doctor as checks
    from intercept.kube.config import connect
    from intercept.kube.image import DEFAULT_AGENT_IMAGE
    from intercept.kube.inject import InjectOptions

    cluster = connect(kubeconfig, context, namespace)
    options = InjectOptions(image=agent_image or DEFAULT_AGENT_IMAGE, service_port=service_port,
                            no_policy_changes=no_policy_changes)
    found = checks.run(cluster.api, cluster.namespace, cluster.context, service, options,
                       (image_origin or "the caller") if agent_image else None, in_cluster=cluster.in_cluster)
    return [*found, checks.names_check()]


# The agent's pod-wide options an explicit inject may set (spec keys -> InjectOptions fields).
_INJECTABLE = {**_POD_WIDE, "outbound_allow": "outbound_allow", "outbound_deny": "outbound_deny"}


def inject(s: InterceptSpec, *, on_event: OnEvent | None = None) -> dict[str, Any]:
    """Put the agent behind ``s.service``, or change the running agent's pod-wide settings to
    those ``s`` names (image, outbound access and fence, forwarded headers): the explicit act
    that a start never does. Before replacing the pods of a running agent, a ``progress``
    event says which developers it interrupts. Returns ``workload``, ``image``, ``changed``
    (what differed, empty when nothing was written) and ``interrupted``."""
    emit = on_event or (lambda event: None)
    if s.service is None:
        raise UsageError("name the SERVICE whose agent to add or change: intercept inject orders -n shop ...")

    async def main() -> dict[str, Any]:
        from intercept.kube.config import connect

        cluster = await asyncio.to_thread(connect, s.kubeconfig, s.context, s.namespace)
        named = {field for key, field in _INJECTABLE.items() if key in s.origins}
        changed: list[str] = []
        holders: list[str] = []
        try:
            info = await _ensure_agent_raw(cluster, s, emit, add=True, named=named, reinject=False)
        except AgentSettingsDiffer as differ:
            changed = [f"{flag} {has} -> {asked}" for flag, has, asked in differ.differences]
            holders = await _holders(cluster, differ.agent)
            who = f" ({', '.join(holders)})" if holders else ""
            emit(Event("progress", f"{differ.agent.workload}: changing the agent for everyone ({'; '.join(changed)}); its "
                                   f"pods are replaced, interrupting {len(holders)} developer"
                                   f"{'' if len(holders) == 1 else 's'}{who}: they reconnect by themselves"))
            info = await _ensure_agent_raw(cluster, s, emit, add=True, named=named, reinject=True)
        return {"workload": info.workload, "namespace": info.namespace, "image": info.image, "changed": changed,
                "interrupted": holders}

    return _run_loop(main())


def inject_text(text: str, service: str, *, agent_image: str | None = None, service_port: str | int | None = None,
                no_policy_changes: bool = False, no_outbound: bool = False, no_forwarded_headers: bool = False,
                outbound_allow: Sequence[str] = (), outbound_deny: Sequence[str] = (), hold_timeout: float = 10.0,
                source: str = "the manifests") -> tuple[str, list[str]]:
    """Manifests (YAML text) with the agent injected behind ``service``, and what changed (offline).
    ``outbound_allow``/``outbound_deny``: the agent's outbound fence (``HOST[:PORT]`` rules)."""
    from intercept.kube.image import DEFAULT_AGENT_IMAGE
    from intercept.kube.inject import InjectOptions
    from intercept.kube.manifests import inject_text as render

    options = InjectOptions(image=agent_image or DEFAULT_AGENT_IMAGE, service_port=service_port,
                            no_policy_changes=no_policy_changes, outbound=not no_outbound,
                            forwarded_headers=not no_forwarded_headers, outbound_allow=tuple(outbound_allow),
                            outbound_deny=tuple(outbound_deny), hold_timeout=hold_timeout)
    return render(text, service, options, source=source)


def restore_text(text: str, *, source: str = "the manifests") -> tuple[str, list[str]]:
    """Injected manifests as they were before :func:`inject_text`, and what changed (offline)."""
    from intercept.kube.manifests import restore_text as render

    return render(text, source=source)


# --------------------------------------------------------------------------- sandboxes


async def _push_routes(change: Any, in_cluster: bool, api_client: Any) -> list[str]:
    """Push a workload's routes document, signed by the namespace's routes authority, to every
    ready agent pod of it; the problems, if any (a pod that refuses the push reads the same
    document from its ConfigMap when the kubelet refreshes it)."""
    from intercept.client.fleet import pod_transport
    from intercept.client.session import AgentSession, InterceptOptions
    from intercept.client.start import default_name
    from intercept.kube.pods import agent_pods
    from intercept.routing.match import Route

    info = change.agent
    later = "it reads the routes from its ConfigMap when the kubelet refreshes it"
    if change.authority is None:
        return [f"{info.workload} in namespace {info.namespace}: no routes authority to sign the routes with; {later}"]
    text = change.document.to_text()
    push = protocol.SetClusterRoutes(text, change.authority.sign(text))
    pods = [p for p in await asyncio.to_thread(agent_pods, api_client, info.namespace, info.selector) if p.ready and p.ip]

    async def one(pod: Any) -> str | None:
        options = InterceptOptions(transport=pod_transport(pod, api_client, in_cluster=in_cluster), credentials=info.credentials,
                                   route=Route(frozenset()), name=default_name(), local_port=0)
        session = AgentSession(options)
        try:
            await session.connect()
            reply = await session.request(push)
        except InterceptError as e:
            return f"pod {pod.name}: {e} ({later})"
        finally:
            await session.leave()
        if isinstance(reply, protocol.Refusal):
            return f"pod {pod.name}: {reply.message} ({later})"
        refused = reply.refused
        return f"pod {pod.name}: {'; '.join(refused)}" if refused else None

    return [p for p in await asyncio.gather(*(one(pod) for pod in pods)) if p]


def _sandbox_cluster(namespace: str | None, kubeconfig: str | Path | None, context: str | None) -> Any:
    from intercept.kube.config import connect

    return connect(kubeconfig, context, namespace)


def _push_all(cluster: Any, changes: Any, emit: OnEvent) -> None:
    async def push() -> list[str]:
        results = await asyncio.gather(*(_push_routes(c, cluster.in_cluster, cluster.api) for c in changes))
        return [p for problems in results for p in problems]

    for problem in asyncio.run(push()) if changes else []:
        emit(Event("warning", problem))


def sandbox_create(name: str, services: Sequence[str], *, namespace: str | None = None, kubeconfig: str | Path | None = None,
                   context: str | None = None, images: Sequence[str] = (), env: Sequence[str] = (), ttl: float = 86400.0,
                   headers: Sequence[str] = (), baggage: str | None = None, wait: bool = True,
                   agent_image: str | None = None, timeout: float = 300.0, on_event: OnEvent | None = None) -> dict[str, Any]:
    """Fork ``services`` as sandbox ``name``: requests with its key (default: header
    ``x-intercept-id: NAME`` or baggage ``intercept-id=NAME``; else ``headers``/``baggage``,
    all of which must match) reach the forks until ``ttl`` seconds from now. Fails cleanly
    (nothing left behind) when a fork does not become ready. Returns the sandbox's summary."""
    from intercept.kube import sandboxes
    from intercept.kube.image import DEFAULT_AGENT_IMAGE
    from intercept.kube.inject import InjectOptions
    from intercept.kube.sandbox import Overrides, expiry_text
    from intercept.routing.cluster import sandbox_lifetime, sandbox_name
    from intercept.routing.match import Route, parse_rule

    emit = on_event or (lambda event: None)
    sandbox_name(name)
    sandbox_lifetime(ttl)
    overrides = Overrides.parse(list(images), list(env))
    rules = [parse_rule("header", h) for h in headers] + ([parse_rule("baggage", baggage)] if baggage else [])
    keys = [Route(frozenset(rules))] if rules else None
    cluster = _sandbox_cluster(namespace, kubeconfig, context)
    created = sandboxes.create(cluster.api, cluster.namespace, name, list(services), overrides, ttl=ttl, keys=keys,
                               inject_options=InjectOptions(image=agent_image or DEFAULT_AGENT_IMAGE), wait=wait,
                               timeout=timeout, progress=lambda line: emit(Event("progress", line)))
    _push_all(cluster, created.changes, emit)
    key = " and ".join(r.describe() for r in rules) if rules else f"x-intercept-id: {name} (or baggage intercept-id={name})"
    forks = ", ".join(f"{f.service} -> {f.fork_service['metadata']['name']}" for f in created.forks)
    emit(Event("ready", f"sandbox {name}: requests with {key} reach {forks} until {expiry_text(created.expires)}"))
    return {"sandbox": name, "namespace": created.namespace, "key": key, "expiresAt": expiry_text(created.expires),
            "forks": [{"service": f.service, "fork": f.fork_service["metadata"]["name"], "workload": f.workload["metadata"]["name"]}
                      for f in created.forks]}


def sandbox_list(namespace: str | None = None, *, all_namespaces: bool = False, kubeconfig: str | Path | None = None,
                 context: str | None = None) -> list[dict[str, Any]]:
    """Every sandbox of the namespace (or of all): forks, key, expiry, readiness."""
    from intercept.kube import sandboxes

    if all_namespaces and namespace:
        raise UsageError("pass -n NAMESPACE or -A, not both")
    cluster = _sandbox_cluster(namespace, kubeconfig, context)
    return sandboxes.list_sandboxes(cluster.api, None if all_namespaces else cluster.namespace)


def sandbox_delete(name: str, *, namespace: str | None = None, kubeconfig: str | Path | None = None, context: str | None = None,
                   on_event: OnEvent | None = None) -> list[str]:
    """Remove sandbox ``name``: its forks, their Services and its routes (idempotent)."""
    from intercept.kube import sandboxes

    emit = on_event or (lambda event: None)
    cluster = _sandbox_cluster(namespace, kubeconfig, context)
    removed, changes = sandboxes.delete(cluster.api, cluster.namespace, name, lambda line: emit(Event("progress", line)))
    _push_all(cluster, changes, emit)
    return removed


def sandbox_extend(name: str, ttl: float, *, namespace: str | None = None, kubeconfig: str | Path | None = None,
                   context: str | None = None, on_event: OnEvent | None = None) -> float:
    """Move sandbox ``name``'s expiry to ``ttl`` seconds from now; the new expiry (Unix time)."""
    from intercept.kube import sandboxes
    from intercept.routing.cluster import sandbox_lifetime

    sandbox_lifetime(ttl)
    cluster = _sandbox_cluster(namespace, kubeconfig, context)
    expires, changes = sandboxes.extend(cluster.api, cluster.namespace, name, ttl)
    _push_all(cluster, changes, on_event or (lambda event: None))
    return expires


def gc(namespace: str | None = None, *, all_namespaces: bool = False, idle: float = 86400.0, dry_run: bool = False,
       kubeconfig: str | Path | None = None, context: str | None = None, timeout: float = 300.0,
       on_event: OnEvent | None = None) -> Any:
    """Delete expired sandboxes; uninstall agents (restoring their workloads exactly) that have
    had no session and no sandbox route for ``idle`` seconds. ``dry_run`` changes nothing."""
    from intercept.client.session import InterceptOptions
    from intercept.client.start import ask_agent, default_name
    from intercept.kube import sandboxes
    from intercept.routing.match import Route

    emit = on_event or (lambda event: None)
    if all_namespaces and namespace:
        raise UsageError("pass -n NAMESPACE or -A, not both")
    cluster = _sandbox_cluster(namespace, kubeconfig, context)

    def idle_of(info: Any) -> float | None:
        try:
            options = InterceptOptions(transport=_one_pod(cluster, info), credentials=info.credentials,
                                       route=Route(frozenset()), name=default_name(), local_port=0)
            hello = asyncio.run(ask_agent(options, protocol.Hello()))
        except Exception as e:  # noqa: BLE001 - one agent that cannot be asked is kept; the run goes on
            # (an untyped error here used to abort gc after sandboxes were deleted, before their routes were pushed)
            log.warning("gc: asking the agent of %s failed", info.workload, exc_info=not isinstance(e, InterceptError))
            emit(Event("warning", f"{info.workload} in namespace {info.namespace}: kept: its agent did not answer ({e})"))
            return None
        seconds = hello.idle_seconds
        return float(seconds) if isinstance(seconds, int | float) else None

    collected = sandboxes.gc(cluster.api, None if all_namespaces else cluster.namespace, idle=idle, idle_of=idle_of,
                             dry_run=dry_run, timeout=timeout, progress=lambda line: emit(Event("progress", line)))
    _push_all(cluster, collected.changes, emit)
    return collected


def sandbox_manifests(name: str, services: Sequence[str], *, images: Sequence[str] = (), env: Sequence[str] = (),
                      ttl: float = 86400.0, headers: Sequence[str] = (), baggage: str | None = None,
                      manifests: str | None = None, namespace: str | None = None, kubeconfig: str | Path | None = None,
                      context: str | None = None, **_: Any) -> list[dict[str, Any]]:
    """The objects :func:`sandbox_create` would create (the forks, their Services, the routes
    ConfigMaps), from the cluster's objects or from ``manifests`` (YAML text); nothing is written."""
    import time

    from intercept.kube import sandbox
    from intercept.kube.inject import ROUTES_KEY, routes_name
    from intercept.kube.manifests import load
    from intercept.routing.cluster import RoutesDocument, sandbox_lifetime
    from intercept.routing.match import Route, parse_rule

    sandbox_lifetime(ttl)
    if manifests is not None:
        objects = load(manifests)
        ns = namespace or next((o["metadata"].get("namespace") for o in objects if o["metadata"].get("namespace")), "default")
        objects = [{**o, "metadata": {**o["metadata"], "namespace": o["metadata"].get("namespace", ns)}} for o in objects]
    else:
        from intercept.kube.apply import _read_namespace
        from intercept.kube.rest import Cluster

        cluster = _sandbox_cluster(namespace, kubeconfig, context)
        ns, objects = cluster.namespace, _read_namespace(Cluster(cluster.api), cluster.namespace, None)
    overrides = sandbox.Overrides.parse(list(images), list(env))
    rules = [parse_rule("header", h) for h in headers] + ([parse_rule("baggage", baggage)] if baggage else [])
    keys = [Route(frozenset(rules))] if rules else sandbox.default_routes(name)
    expires = time.time() + ttl
    out: list[dict[str, Any]] = []
    for service in services:
        fork = sandbox.plan(objects, service, name, overrides, expires)
        document = RoutesDocument(time.time(), tuple(sandbox.routes(name, fork, keys, expires)))
        out += [fork.workload, fork.fork_service, {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": routes_name(fork.original_name), "namespace": ns,
                         "labels": {"app.kubernetes.io/managed-by": "intercept", "intercept.dev/workload": fork.original_name}},
            "data": {ROUTES_KEY: document.to_text()}}]
    return out


def gc_install(*, idle: float = 86400.0, dry_run: bool = False, namespace: str | None = None,
               kubeconfig: str | Path | None = None, context: str | None = None, image: str | None = None,
               agent_image: str | None = None, timeout: float = 300.0) -> list[str]:
    """Create (or update) an hourly CronJob running ``intercept gc`` in the namespace, with a
    ServiceAccount and a Role that has only the verbs gc uses. Returns what it wrote.

    The Job runs ``image``, by default the CLI image (``DEFAULT_CLI_IMAGE``): ``intercept gc``
    needs the kubernetes client, which the agent image leaves out. ``agent_image`` is what
    named the Job's image before ``image`` did; it still does when ``image`` is None."""
    from intercept.kube.gc import install_objects
    from intercept.kube.image import DEFAULT_CLI_IMAGE
    from intercept.kube.rest import Cluster, NotFound

    cluster = _sandbox_cluster(namespace, kubeconfig, context)
    objects = install_objects(cluster.namespace, image or agent_image or DEFAULT_CLI_IMAGE, idle)
    if dry_run:
        return [f"would write {o['kind']}/{o['metadata']['name']}" for o in objects]
    api, written = Cluster(cluster.api), []
    for obj in objects:
        try:
            current = api.get(obj["kind"], cluster.namespace, obj["metadata"]["name"])
        except NotFound:
            api.create(obj)
            written.append(f"created {obj['kind']}/{obj['metadata']['name']} in namespace {cluster.namespace}")
            continue
        api.replace({**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}})
        written.append(f"updated {obj['kind']}/{obj['metadata']['name']} in namespace {cluster.namespace}")
    return written


def status() -> list[dict[str, Any]]:
    """This machine's intercepts: started by hand (``intercept start``) or by ``intercept up``."""
    from intercept.workspace import status as rows

    return rows()


def leave(service: str, namespace: str | None = None) -> list[Any]:
    """Stop this machine's intercepts of ``service``; the agent stays. Returns the entries stopped."""
    from intercept.workspace import leave as stop

    return stop(service, namespace)


def up(path: Path, *, detach: bool = False, log_file: Path | None = None, report: Callable[[str], None] = lambda line: None,
       env: Mapping[str, str] | None = None, timeout: float = 600.0) -> int:
    """``intercept up``: the intercepts of ``path`` (``intercept.yaml``); idempotent, never prompts.
    With ``detach``, failing (and stopping them) when they are not all ready within ``timeout`` seconds."""
    from intercept.workspace import up as bring_up

    return bring_up(path, os.environ if env is None else env, detach=detach, log_file=log_file, report=report,
                    timeout=timeout)


def down(path: Path | None, *, report: Callable[[str], None] = lambda line: None) -> int:
    """``intercept down``: stop what ``up`` started for ``path`` (every workspace with None)."""
    from intercept.workspace import down as bring_down

    return bring_down(path, report=report)


def vscode(services: Sequence[str], *, directory: Path, spec_file: Path | None = None,
           command: Sequence[str] = (), options: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``.vscode/launch.json`` and ``tasks.json`` (edited in place, comments kept) to
    debug ``services`` (default: those of ``spec_file``) running ``command`` (default: each
    one's ``command`` in ``spec_file``; none at all is refused); ``options`` (keyed as in
    ``intercept.yaml``: ``namespace``, ``context``, ``agent_image``, ...) are written into
    every task, over the file's; the files written."""
    from intercept.workspace import vscode as write

    return write(services, directory=directory, spec_file=spec_file, command=command, flags=options or {})


__all__ = [
    "doctor",
    "gc_install",
    "sandbox_manifests",
    "Event",
    "Intercept",
    "InterceptSpec",
    "Response",
    "agent_routes",
    "down",
    "env_access",
    "files",
    "gc",
    "inject_text",
    "intercepting",
    "leave",
    "list_services",
    "make_spec",
    "pod_env",
    "restore_text",
    "run",
    "sandbox_create",
    "sandbox_delete",
    "sandbox_extend",
    "sandbox_list",
    "send_request",
    "send_request_sync",
    "start",
    "status",
    "uninstall",
    "up",
    "vscode",
]
