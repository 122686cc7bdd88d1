"""``intercept mcp``: the API as Model Context Protocol tools, for coding agents (stdio).

Each tool is a thin call into :mod:`intercept.api`: the same resolve, inject, route and
leave as the CLI, the same one-line reasons when something fails (a tool error whose text
is what ``intercept: error:`` would say). Intercepts started here live as long as the
server and are stopped when it ends; their local command's output is kept for
``process_output`` instead of being printed, because stdout carries only the protocol.

Uses the official MCP Python SDK (``pip install 'intercept[mcp]'``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from intercept import __version__, api
from intercept.errors import InterceptError

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0  # how long start_intercept waits for the route to be held


class Intercepts:
    """The intercepts this server started, by id (``i1``, ``i2``, ...), each also in this
    machine's registry (so ``intercept status`` lists it and ``intercept leave`` stops it,
    asking on this server's control socket)."""

    def __init__(self) -> None:
        self.running: dict[str, api.Intercept] = {}
        self._ids = (f"i{n}" for n in itertools.count(1))
        self._registrations: dict[str, Any] = {}
        self._control: asyncio.AbstractServer | None = None
        self._socket: Path | None = None

    def new_id(self) -> str:
        return next(self._ids)

    async def add(self, key: str, it: api.Intercept) -> None:
        """Keep ``it`` (ready) as ``key`` and record it in this machine's registry."""
        from intercept.workspace import register

        self.running[key] = it
        socket_path = await self._serve_control()
        self._registrations[key] = register({
            "service": it.spec.service, "agent": it.spec.agent, "namespace": it.namespace, "context": it.spec.context,
            "route": it.route, "name": it.name, "local_port": it.local_port, "command": list(it.spec.command),
            "ports": [str(p) for p in it.spec.port] if len(it.spec.port) > 1 else [],
            "fence": next((e.fence for e in reversed(it.events) if e.fence is not None), None),
            "id": key, "control": str(socket_path) if socket_path else None})

    def get(self, key: str) -> api.Intercept:
        it = self.running.get(key)
        if it is None:
            known = ", ".join(self.running) or "none"
            raise ToolError(f"no intercept {key!r} was started by this server (running: {known}); see the status tool")
        return it

    async def stop(self, key: str) -> int:
        """Leave intercept ``key``: its route goes, its command stops; its exit status."""
        it = self.running.pop(key)
        registration = self._registrations.pop(key, None)
        try:
            return await it.stop()
        except InterceptError as e:
            return e.exit_code
        finally:
            if registration is not None:
                registration.remove()

    async def stop_all(self) -> None:
        for key in list(self.running):
            await self.stop(key)
        if self._control is not None:
            self._control.close()
        if self._socket is not None:
            self._socket.unlink(missing_ok=True)

    async def _serve_control(self) -> Path | None:
        """The Unix socket on which ``intercept leave`` asks this server to stop one of its
        intercepts (a line ``{"leave": ID}``, answered ``{"ok": ...}`` once it has left)."""
        if self._control is not None:
            return self._socket
        from intercept.workspace import state_dir

        directory = state_dir()
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = directory / f"mcp-{os.getpid()}.sock"
            path.unlink(missing_ok=True)
            self._control = await asyncio.start_unix_server(self._leave_request, path=str(path))
            path.chmod(0o600)
        except OSError as e:
            log.warning("intercept leave will not reach this server's intercepts: %s", e)
            return None
        self._socket = path
        return path

    async def _leave_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline() or b"{}")
            key = request.get("leave") if isinstance(request, dict) else None
            if key in self.running:
                status = await self.stop(key)
                reply = {"ok": True, "exit_status": status}
            else:
                reply = {"ok": False, "message": f"no intercept {key!r} runs here"}
        except ValueError:
            reply = {"ok": False, "message": "expected a JSON line {\"leave\": ID}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
        writer.close()


def _describe(key: str, it: api.Intercept) -> dict[str, Any]:
    state = "running" if not it.done else "ended"
    counts = next((e for e in reversed(it.events) if e.kind == "mirrored"), None)
    mirrored = {"mirrored": {"copied": counts.copied if counts else 0, "dropped": counts.dropped if counts else 0}} \
        if it.spec.mirror else {}
    return {
        "id": key,
        "service": it.spec.service,
        "agent": it.spec.agent,
        "namespace": it.namespace,
        "route": it.route,
        "local_port": it.local_port,
        "ports": [str(p) for p in it.spec.port],
        "state": state,
        "events": [event.line() for event in it.events[-20:]],
        **mirrored,
    }


def _spec(intercepting: bool = True, **options: Any) -> api.InterceptSpec:
    """The options a tool was given, over this server's ``INTERCEPT_*`` variables and the
    service's entry in ./intercept.yaml, validated as ``intercept start``'s flags are
    (``intercepting=False``: connect, which needs no service)."""
    try:
        return api.make_spec(env=os.environ, file=Path("intercept.yaml"), intercepting=intercepting,
                             **{k: v for k, v in options.items() if v not in (None, [], "")})
    except InterceptError as e:
        raise ToolError(str(e)) from None


def _options(**given: Any) -> dict[str, Any]:
    """Options of a tool that is not an intercept (list_services, doctor without a service),
    over this server's ``INTERCEPT_*`` variables, validated."""
    from intercept.spec import options

    try:
        return options(os.environ, {k: v for k, v in given.items() if v not in (None, [], "")}, given)
    except InterceptError as e:
        raise ToolError(str(e)) from None


def build(intercepts: Intercepts | None = None) -> MCPServer:
    """The server and its tools (``intercepts``: where started intercepts are kept)."""
    intercepts = intercepts or Intercepts()

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[None]:
        try:
            yield None
        finally:
            await intercepts.stop_all()

    server = MCPServer(
        "intercept",
        version=__version__,
        instructions=(
            "Route requests that carry a personal header from a Kubernetes service (or an agent in direct mode) "
            "to a process on this machine. start_intercept a service to a local port or command, send_request to "
            "see who answers with and without the header, process_output to read the local process, "
            "stop_intercept when done. connect runs one command that reaches the cluster's Services by name, "
            "as a pod does, without intercepting."
        ),
        lifespan=lifespan,
    )

    @server.tool()
    def list_services(namespace: str | None = None, all_namespaces: bool = False, kubeconfig: str | None = None,
                      context: str | None = None) -> list[dict[str, Any]]:
        """The Services of a namespace (or all): whether each can be intercepted, has an agent, and who routes what."""
        cluster = _options(namespace=namespace, kubeconfig=kubeconfig, context=context)
        try:
            _, rows = api.list_services(all_namespaces=all_namespaces, **cluster)
        except InterceptError as e:
            raise ToolError(str(e)) from None
        return rows

    @server.tool()
    def doctor(service: str | None = None, namespace: str | None = None, agent_image: str | None = None,
               kubeconfig: str | None = None, context: str | None = None) -> dict[str, Any]:
        """What an intercept of SERVICE needs, checked as intercept start would go about it (cluster, RBAC, the
        agent image, Pod Security, NetworkPolicies, the protocol its pods speak); each check with its status and
        its fix. Where the agent runs already, the image check reports its image."""
        if service:
            s = _spec(service=service, namespace=namespace, agent_image=agent_image, kubeconfig=kubeconfig,
                      context=context)
            origin = s.origins.get("agent_image")
            image, cluster = s.agent_image, {"namespace": s.namespace, "kubeconfig": s.kubeconfig, "context": s.context}
        else:
            cluster = _options(namespace=namespace, kubeconfig=kubeconfig, context=context)
            image = _options(agent_image=agent_image)["agent_image"]
            origin = "agent_image" if agent_image else "INTERCEPT_AGENT_IMAGE" if os.environ.get(
                "INTERCEPT_AGENT_IMAGE") else None
        try:
            checks = api.doctor(service, agent_image=image if origin else None, **cluster,
                                image_origin=("agent_image" if agent_image else str(origin)) if origin else None)
        except InterceptError as e:
            raise ToolError(str(e)) from None
        return {"passed": all(c.passed for c in checks),
                "checks": [{"name": c.name, "status": c.status, "message": c.message, "fix": c.fix} for c in checks]}

    @server.tool()
    async def start_intercept(
        service: str | None = None,
        port: int | str | list[int | str] | None = None,
        headers: list[str] | None = None,
        baggage: str | None = None,
        path_prefix: str | None = None,
        command: list[str] | None = None,
        name: str | None = None,
        namespace: str | None = None,
        context: str | None = None,
        kubeconfig: str | None = None,
        agent_image: str | None = None,
        ttl: str | None = None,
        outbound_allow: list[str] | None = None,
        outbound_deny: list[str] | None = None,
        agent: str | None = None,
        credentials: str | None = None,
        replace: bool | None = None,
        mirror: bool | None = None,
    ) -> dict[str, Any]:
        """Intercept a Service: requests that match reach localhost:PORT (or COMMAND, run with the pod's
        environment; default port 8080). port may be [SERVICE_PORT:]LOCAL_PORT, and a list of them takes several
        ports of the Service in one intercept, each to its own local port (e.g. ["http:3000", "grpc:5000"];
        SERVICE_PORT is the Service port's number or name). headers are NAME=VALUE rules that must all match; with no rule, requests carrying
        x-intercept-id: NAME are routed. replace: every request comes here and the app container runs in no
        replica until stop_intercept (its queue consumers stop competing); service may then also be
        deployment/NAME or statefulset/NAME (a worker with no Service); refused while others hold routes on it.
        mirror: the app still answers them, and a copy of each comes to the local process (its answer discarded;
        copies it does not take in time are dropped and counted); not with replace. ttl (90m, 2h) ends the route by itself even if this machine goes.
        outbound_allow/outbound_deny (HOST[:PORT]) narrow where the process may connect through the pod.
        agent_image is used only when the service has no agent yet (a running agent's is shared by everyone).
        agent and credentials select direct mode (no Kubernetes). Options not given come from INTERCEPT_*
        variables and the service's entry in ./intercept.yaml, as for intercept start. Returns the intercept's
        id, its route and its events once the route is held; intercept status and leave see it too."""
        s = _spec(service=service, port=port, headers=headers, baggage=baggage, path_prefix=path_prefix,
                  command=command, name=name, namespace=namespace, context=context, kubeconfig=kubeconfig,
                  agent_image=agent_image, ttl=ttl, outbound_allow=outbound_allow, outbound_deny=outbound_deny,
                  agent=agent, credentials=credentials, no_watch=True if command else None, replace=replace,
                  mirror=mirror or None)
        try:
            it = await api.start(s, capture_output=True)
        except InterceptError as e:
            raise ToolError(str(e)) from None
        key = intercepts.new_id()
        try:
            await it.ready(READY_TIMEOUT)
        except InterceptError as e:
            with contextlib.suppress(InterceptError):
                await it.stop()
            raise ToolError(str(e)) from None
        await intercepts.add(key, it)
        return _describe(key, it)

    @server.tool()
    async def stop_intercept(id: str) -> dict[str, Any]:  # noqa: A002 (the tool's parameter name)
        """Stop an intercept started by start_intercept: its route goes from every agent, its command stops."""
        it = intercepts.get(id)
        status = await intercepts.stop(id)
        return {**_describe(id, it), "exit_status": status}

    @server.tool()
    async def leave(service: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Stop every intercept of SERVICE on this machine, whoever started it (a terminal's intercept start,
        intercept up, or this server), as intercept leave does."""
        try:  # in a thread: an intercept of this server is asked to leave on its control socket, served here
            left = await asyncio.to_thread(api.leave, service, namespace)
        except InterceptError as e:
            raise ToolError(str(e)) from None
        return [{"service": e.label, "pid": e.pid, "id": e.id, "route": e.route} for e in left]

    @server.tool()
    def status() -> dict[str, Any]:
        """The intercepts this server started, and every intercept running on this machine (these included)."""
        try:
            machine = api.status()
        except InterceptError as e:
            raise ToolError(str(e)) from None
        return {"started_here": [_describe(k, it) for k, it in intercepts.running.items()], "this_machine": machine}

    @server.tool()
    async def pod_env(service: str | None = None, namespace: str | None = None, context: str | None = None,
                      kubeconfig: str | None = None, agent: str | None = None,
                      credentials: str | None = None) -> dict[str, str]:
        """The pod's environment (the app container's variables) as the agent hands it over (never adds an agent)."""
        s = _spec(service=service, namespace=namespace, context=context, kubeconfig=kubeconfig, agent=agent,
                  credentials=credentials)
        try:
            return await api.pod_env(s)
        except InterceptError as e:
            raise ToolError(str(e)) from None

    @server.tool()
    async def connect(
        command: list[str],
        service: str | None = None,
        namespace: str | None = None,
        also_namespaces: list[str] | None = None,
        access: str | None = None,
        outbound_allow: list[str] | None = None,
        outbound_deny: list[str] | None = None,
        name: str | None = None,
        context: str | None = None,
        kubeconfig: str | None = None,
        agent_image: str | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Run COMMAND once on this machine reaching the cluster as a pod of NAMESPACE does: every Service by
        the names a pod uses (redis, redis.NS, redis.NS.svc.cluster.local; also_namespaces add other
        namespaces'), any TCP port, no proxy settings; nothing is intercepted. Goes through the agent of
        SERVICE, else any agent of the namespace, else a small agent of its own (removed by intercept gc once
        idle). Returns exit_status (null when timeout seconds, counted from COMMAND's start, ran out and it
        was stopped), its output
        (stdout and stderr lines, the last 1000) and the events (which names it reached, refusals)."""
        s = _spec(False, service=service, namespace=namespace, also_namespaces=also_namespaces, access=access,
                  outbound_allow=outbound_allow, outbound_deny=outbound_deny, name=name, context=context,
                  kubeconfig=kubeconfig, agent_image=agent_image)  # no service: any agent of the namespace
        output: collections.deque[str] = collections.deque(maxlen=api.OUTPUT_LINES)
        events: list[str] = []
        stop = asyncio.Event()  # set when COMMAND's timeout runs out, counted from its start (not the agent's rollout)
        try:
            status = await api.connect(s, command, on_event=lambda event: events.append(event.line()),
                                       output=output.append, stop=stop, timeout=timeout)
        except InterceptError as e:
            raise ToolError(str(e)) from None
        timed_out = stop.is_set()
        return {"exit_status": None if timed_out else status, "timed_out": timed_out, "output": list(output),
                "events": events}

    @server.tool()
    async def send_request(
        path: str = "/",
        service: str | None = None,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: str = "",
        namespace: str | None = None,
        context: str | None = None,
        kubeconfig: str | None = None,
        agent: str | None = None,
        credentials: str | None = None,
        limit: int = 16384,
    ) -> dict[str, Any]:
        """Send one HTTP request into the service's agent as cluster traffic arrives (so it is routed like it:
        with a developer's header to their process, without to the app) and return status, headers and
        the body (at most limit bytes, as text)."""
        s = _spec(service=service, namespace=namespace, context=context, kubeconfig=kubeconfig, agent=agent,
                  credentials=credentials)
        try:
            reply = await api.send_request(s, path, method=method, headers=headers, body=body.encode(), limit=limit)
        except InterceptError as e:
            raise ToolError(str(e)) from None
        return {"status": reply.status, "reason": reply.reason, "headers": [list(h) for h in reply.headers],
                "body": reply.body.decode("utf-8", "replace"), "truncated": reply.truncated}

    @server.tool()
    def create_sandbox(name: str, fork: list[str], images: list[str] | None = None, env: list[str] | None = None,
                       ttl: str = "2h", namespace: str | None = None) -> dict[str, Any]:
        """Fork Services into sandbox NAME in the cluster: requests carrying x-intercept-id: NAME (or baggage
        intercept-id=NAME) reach the forks, everyone else the originals, until the ttl (e.g. 90m, 2h) is up.
        images are [CONTAINER=]IMAGE, env [CONTAINER:]KEY=VALUE overrides for the forks. No local process needed."""
        from intercept.spec import parse_duration

        try:
            seconds = parse_duration(ttl)
        except ValueError:
            raise ToolError(f"ttl {ttl!r}: expected a duration such as 90s, 30m, 2h or 1d12h") from None
        try:
            return api.sandbox_create(name, fork, images=images or (), env=env or (), ttl=seconds, namespace=namespace)
        except InterceptError as e:
            raise ToolError(str(e)) from None

    @server.tool()
    def list_sandboxes(namespace: str | None = None) -> list[dict[str, Any]]:
        """The sandboxes of a namespace: forks, routing key, expiry, readiness."""
        try:
            return api.sandbox_list(namespace)
        except InterceptError as e:
            raise ToolError(str(e)) from None

    @server.tool()
    def delete_sandbox(name: str, namespace: str | None = None) -> list[str]:
        """Remove a sandbox: its forks, their Services and its routes."""
        try:
            return api.sandbox_delete(name, namespace=namespace)
        except InterceptError as e:
            raise ToolError(str(e)) from None

    @server.tool()
    def process_output(id: str, lines: int = 50) -> list[str]:  # noqa: A002 (the tool's parameter name)
        """The last lines the local command of an intercept printed (stdout and stderr)."""
        it = intercepts.get(id)
        return list(it.output)[-max(1, lines):]

    return server


def serve() -> None:
    """Run the server on stdio until the client goes away."""
    build().run("stdio")
