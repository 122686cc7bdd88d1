"""``intercept mcp``: the API as Model Context Protocol tools, for coding agents (stdio).

Each tool is a thin call into :mod:`intercept.api`: the same resolve, inject, route and
leave as the CLI, the same one-line reasons when something fails (a tool error whose text
is what ``intercept: error:`` would say). Intercepts started here live as long as the
server and are stopped when it ends; their local command's output is kept for
``process_output`` instead of being printed, because stdout carries only the protocol.

Uses the official MCP Python SDK (``pip install 'intercept[mcp]'``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from intercept import __version__, api
from intercept.errors import InterceptError

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0  # how long start_intercept waits for the route to be held


class Intercepts:
    """The intercepts this server started, by id (``i1``, ``i2``, ...)."""

    def __init__(self) -> None:
        self.running: dict[str, api.Intercept] = {}
        self._ids = (f"i{n}" for n in itertools.count(1))

    def add(self, it: api.Intercept) -> str:
        key = next(self._ids)
        self.running[key] = it
        return key

    def get(self, key: str) -> api.Intercept:
        it = self.running.get(key)
        if it is None:
            known = ", ".join(self.running) or "none"
            raise ToolError(f"no intercept {key!r} was started by this server (running: {known}); see the status tool")
        return it

    async def stop_all(self) -> None:
        for it in self.running.values():
            with contextlib.suppress(InterceptError):
                await it.stop()


def _describe(key: str, it: api.Intercept) -> dict[str, Any]:
    state = "running" if not it.done else "ended"
    return {
        "id": key,
        "service": it.spec.service,
        "agent": it.spec.agent,
        "namespace": it.namespace,
        "route": it.route,
        "local_port": it.local_port,
        "state": state,
        "events": [event.line() for event in it.events[-20:]],
    }


def _spec(**options: Any) -> api.InterceptSpec:
    options.setdefault("agent_image", os.environ.get("INTERCEPT_AGENT_IMAGE"))  # as the CLI and the doctor tool read it
    try:
        return api.make_spec(**{k: v for k, v in options.items() if v not in (None, [], "")})
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
            "stop_intercept when done."
        ),
        lifespan=lifespan,
    )

    @server.tool()
    def list_services(namespace: str | None = None, all_namespaces: bool = False) -> list[dict[str, Any]]:
        """The Services of a namespace (or all): whether each can be intercepted, has an agent, and who routes what."""
        try:
            _, rows = api.list_services(namespace, all_namespaces=all_namespaces)
        except InterceptError as e:
            raise ToolError(str(e)) from None
        return rows

    @server.tool()
    def doctor(service: str | None = None, namespace: str | None = None,
               agent_image: str | None = None) -> dict[str, Any]:
        """What a first intercept of SERVICE needs, checked (cluster, RBAC, agent image, Pod Security,
        NetworkPolicies, the protocol its pods speak); each check with its status and its fix."""
        image = agent_image or os.environ.get("INTERCEPT_AGENT_IMAGE")
        origin = "agent_image" if agent_image else "INTERCEPT_AGENT_IMAGE" if image else None
        try:
            checks = api.doctor(service, namespace=namespace, agent_image=image, image_origin=origin)
        except InterceptError as e:
            raise ToolError(str(e)) from None
        return {"passed": all(c.passed for c in checks),
                "checks": [{"name": c.name, "status": c.status, "message": c.message, "fix": c.fix} for c in checks]}

    @server.tool()
    async def start_intercept(
        service: str | None = None,
        port: int = 8080,
        headers: list[str] | None = None,
        baggage: str | None = None,
        path_prefix: str | None = None,
        command: list[str] | None = None,
        name: str | None = None,
        namespace: str | None = None,
        agent: str | None = None,
        credentials: str | None = None,
    ) -> dict[str, Any]:
        """Intercept a Service: requests that match reach localhost:PORT (or COMMAND, run with the pod's
        environment). headers are NAME=VALUE rules that must all match; with no rule, requests carrying
        x-intercept-id: NAME are routed. agent and credentials select direct mode (no Kubernetes).
        Returns the intercept's id, its route and its events once the route is held."""
        s = _spec(service=service, port=port, headers=headers, baggage=baggage, path_prefix=path_prefix,
                  command=command, name=name, namespace=namespace, agent=agent, credentials=credentials,
                  no_watch=True if command else None)
        try:
            it = await api.start(s, capture_output=True)
        except InterceptError as e:
            raise ToolError(str(e)) from None
        key = intercepts.add(it)
        try:
            await it.ready(READY_TIMEOUT)
        except InterceptError as e:
            intercepts.running.pop(key, None)
            with contextlib.suppress(InterceptError):
                await it.stop()
            raise ToolError(str(e)) from None
        return _describe(key, it)

    @server.tool()
    async def stop_intercept(id: str) -> dict[str, Any]:  # noqa: A002 (the tool's parameter name)
        """Stop an intercept started by start_intercept: its route goes from every agent, its command stops."""
        it = intercepts.get(id)
        try:
            status = await it.stop()
        except InterceptError as e:
            status = e.exit_code
        intercepts.running.pop(id, None)
        return {**_describe(id, it), "exit_status": status}

    @server.tool()
    def status() -> dict[str, Any]:
        """The intercepts this server started, and every intercept running on this machine."""
        try:
            machine = api.status()
        except InterceptError as e:
            raise ToolError(str(e)) from None
        return {"started_here": [_describe(k, it) for k, it in intercepts.running.items()], "this_machine": machine}

    @server.tool()
    async def pod_env(service: str | None = None, namespace: str | None = None, agent: str | None = None,
                      credentials: str | None = None) -> dict[str, str]:
        """The pod's environment (the app container's variables) as the agent hands it over."""
        s = _spec(service=service, namespace=namespace, agent=agent, credentials=credentials)
        try:
            return await api.pod_env(s)
        except InterceptError as e:
            raise ToolError(str(e)) from None

    @server.tool()
    async def send_request(
        path: str = "/",
        service: str | None = None,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: str = "",
        namespace: str | None = None,
        agent: str | None = None,
        credentials: str | None = None,
        limit: int = 16384,
    ) -> dict[str, Any]:
        """Send one HTTP request into the service's agent as cluster traffic arrives (so it is routed like it:
        with a developer's header to their process, without to the app) and return status, headers and
        the body (at most limit bytes, as text)."""
        s = _spec(service=service, namespace=namespace, agent=agent, credentials=credentials)
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
