"""The ``intercept`` command: parse, call one API function, print. No logic lives here.

Every error is one line ``intercept: error: ...`` on stderr and the error's exit code
(listed in the README). Stable output lines start with ``intercept: KIND:``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import click

from intercept import __version__, protocol
from intercept.errors import InterceptError, UsageError


def _address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"{flag} {text!r}: expected HOST:PORT, e.g. {flag} 127.0.0.1:9900")
    return host.strip("[]"), int(port)


class _DashDashCommand(click.Command):
    """Keeps what follows ``--`` apart, as the local COMMAND (``ctx.meta['command']``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta["command"] = args[i + 1 :]
            args = args[:i]
        else:
            ctx.meta["command"] = []
        return super().parse_args(ctx, args)


def _run(main: Any) -> Any:
    """Run a coroutine on uvloop when it is installed (the data path is asyncio throughout)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _fail(error: InterceptError) -> None:
    click.echo(f"intercept: error: {error}", err=True)
    sys.exit(error.exit_code)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        logging.getLogger("asyncssh").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="intercept")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """Send your own requests to a service to the process on your machine."""
    _setup_logging(verbose)


@main.command()
@click.option("--listen", envvar="INTERCEPT_LISTEN", default="0.0.0.0:9900", show_default=True, help="HTTP listener, HOST:PORT.")
@click.option("--upstream", envvar="INTERCEPT_UPSTREAM", required=True, help="The app container, HOST:PORT.")
@click.option("--ssh-listen", envvar="INTERCEPT_SSH_LISTEN", default="0.0.0.0:9922", show_default=True, help="SSH server, HOST:PORT.")
@click.option("--credentials", envvar="INTERCEPT_CREDENTIALS", required=True, type=click.Path(path_type=Path), help="Host key and token file; created (0600) at first start.")
@click.option("--hold-timeout", envvar="INTERCEPT_HOLD_TIMEOUT", default=10.0, show_default=True, type=float, help="Seconds a matched request waits for the developer's process.")
@click.option("--allow-outbound/--no-allow-outbound", envvar="INTERCEPT_ALLOW_OUTBOUND", default=False, help="Let clients open TCP connections from this pod.")
@click.option("--shutdown-grace", envvar="INTERCEPT_SHUTDOWN_GRACE", default=0.0, show_default=True, type=float, help="Seconds to keep serving after SIGTERM.")
@click.option("--header-timeout", envvar="INTERCEPT_HEADER_TIMEOUT", default=60.0, show_default=True, type=float, help="Close connections that wait longer for a request head.")
def agent(listen: str, upstream: str, ssh_listen: str, credentials: Path, hold_timeout: float, allow_outbound: bool,
          shutdown_grace: float, header_timeout: float) -> None:
    """Run the agent in front of an app (in a pod: configured by INTERCEPT_* variables)."""
    from intercept.agent import AgentConfig, run

    try:
        config = AgentConfig(
            listen=_address(listen, "--listen"),
            upstream=_address(upstream, "--upstream"),
            ssh_listen=_address(ssh_listen, "--ssh-listen"),
            credentials=credentials,
            hold_timeout=hold_timeout,
            allow_outbound=allow_outbound,
            shutdown_grace=shutdown_grace,
            header_timeout=header_timeout,
        )

        def ready(a: Any) -> None:
            (h, p), (sh, sp) = a.http_address, a.ssh_address
            click.echo(f"intercept: agent: http {h}:{p} ssh {sh}:{sp} upstream {config.upstream[0]}:{config.upstream[1]}", nl=True)
            sys.stdout.flush()

        run(config, ready)
    except InterceptError as e:
        _fail(e)
    except OSError as e:
        _fail(InterceptError(f"agent cannot listen: {e.strerror or e}; choose free ports with --listen/--ssh-listen"))


def _cluster_options(command: Any) -> Any:
    """``-n``, ``--context``, ``--kubeconfig``: cluster access as kubectl's (see intercept.kube.config)."""
    command = click.option("--kubeconfig", type=click.Path(dir_okay=False), help="Kubeconfig file [default: $KUBECONFIG, else ~/.kube/config, else in-cluster].")(command)
    command = click.option("--context", help="Kubeconfig context [default: the current context].")(command)
    command = click.option("-n", "--namespace", help="Namespace [default: the context's, else default].")(command)
    return command


def _agent_image_option(command: Any) -> Any:
    from intercept.kube.image import AGENT_IMAGE_ENV, DEFAULT_AGENT_IMAGE

    return click.option("--agent-image", envvar=AGENT_IMAGE_ENV, default=DEFAULT_AGENT_IMAGE, show_default=True,
                        help=f"The agent image (also ${AGENT_IMAGE_ENV}).")(command)


@main.command(cls=_DashDashCommand)
@click.argument("service", required=False)
@click.option("--agent", "agent_address", metavar="HOST:PORT", help="The agent's SSH address (direct mode).")
@click.option("--credentials", type=click.Path(path_type=Path), help="The agent's credentials file.")
@click.option("--port", "local_port", type=int, default=8080, show_default=True, help="Local port the routed requests go to.")
@click.option("--header", "headers", multiple=True, metavar="NAME=VALUE", help="Route requests whose header NAME equals VALUE.")
@click.option("--header-regex", "header_regexes", multiple=True, metavar="NAME=REGEX", help="Route requests whose header NAME fully matches REGEX.")
@click.option("--baggage", "baggage", metavar="KEY=VALUE", help="Route requests whose W3C baggage has KEY=VALUE.")
@click.option("--path-prefix", metavar="PREFIX", help="Route requests whose path starts with PREFIX.")
@click.option("--all", "all_traffic", is_flag=True, help="Route ALL requests (only while nobody else intercepts).")
@click.option("--name", help="Your display name and personal header value [default: git user.email local part, else $USER].")
@click.option("--watch", "watch", multiple=True, metavar="PATH", help="Restart COMMAND when files under PATH change [default: . with a COMMAND].")
@click.option("--no-watch", is_flag=True, help="Do not restart COMMAND on changes; its exit ends the intercept.")
@click.option("--debug", is_flag=True, help="Run the Python COMMAND under debugpy.")
@click.option("--debug-port", type=int, default=5678, show_default=True, help="Port debugpy listens on (127.0.0.1).")
@click.option("--debug-wait", is_flag=True, help="With --debug: the program waits for the debugger before it starts.")
@click.option("--env-file", type=click.Path(dir_okay=False), help="Also write COMMAND's pod environment to FILE (dotenv).")
@click.option("--forward", "forwards", multiple=True, metavar="SERVICE:PORT[:LOCAL_PORT]", help="Plain TCP from localhost to a cluster service, through the agent's pod.")
@click.option("--propagate-header", is_flag=True, help="Add your route's headers to COMMAND's outbound plain HTTP (chains of intercepted services).")
@click.option("--no-outbound", is_flag=True, help="When injecting the agent: no connections from the pod on your behalf.")
@click.option("--no-policy-changes", is_flag=True, help="When injecting the agent: refuse rather than extend NetworkPolicies that would cut it off.")
@click.option("--timeout", "timeout", type=float, default=300.0, show_default=True, help="Seconds the agent's rollout may take when it is injected.")
@click.option("--service-port", metavar="NAME|NUMBER", help="The Service port to intercept, when it has several.")
@_agent_image_option
@_cluster_options
@click.pass_context
def start(
    ctx: click.Context,
    service: str | None,
    agent_address: str | None,
    credentials: Path | None,
    local_port: int,
    headers: tuple[str, ...],
    header_regexes: tuple[str, ...],
    baggage: str | None,
    path_prefix: str | None,
    all_traffic: bool,
    name: str | None,
    watch: tuple[str, ...],
    no_watch: bool,
    debug: bool,
    debug_port: int,
    debug_wait: bool,
    env_file: str | None,
    forwards: tuple[str, ...],
    propagate_header: bool,
    no_outbound: bool,
    no_policy_changes: bool,
    timeout: float,
    service_port: str | None,
    agent_image: str,
    namespace: str | None,
    context: str | None,
    kubeconfig: str | None,
) -> None:
    """Intercept: requests that match your route reach localhost:PORT.

    \b
    intercept start --agent HOST:PORT --credentials FILE --port 8080 [--header x-dev=alice] [-- COMMAND ARGS...]
    """
    import os

    from click.core import ParameterSource

    from intercept.client import DirectTransport, InterceptOptions, default_name
    from intercept.client import start as start_api
    from intercept.client.runner import LocalCommand
    from intercept.credentials import load
    from intercept.routing.match import HeaderEquals, Route
    from intercept.spec import merge
    from intercept.workspace import register

    # flags > INTERCEPT_* variables > defaults: one object (intercept.spec), as intercept.yaml is
    given = {key: ctx.params[param] for param, key in _START_OPTIONS.items()
             if ctx.get_parameter_source(param) is ParameterSource.COMMANDLINE}
    if ctx.meta["command"]:
        given["command"] = ctx.meta["command"]
    replicas = None
    try:
        spec = merge(None, os.environ, given)
        command = list(spec.command)
        if spec.agent_address is None and spec.service is None:
            raise UsageError("name the SERVICE to intercept (intercept start orders), or --agent HOST:PORT for an agent you can reach")
        if spec.agent_address is not None:
            if spec.credentials is None:
                raise UsageError("--credentials FILE is required with --agent (the file the agent wrote)")
            transport: Any = DirectTransport(*spec.agent_address)
            creds = load(spec.credentials)
            namespace = spec.namespace
        else:
            from intercept.client.fleet import pod_replicas
            from intercept.client.transport import ServiceTransport
            from intercept.kube.apply import ensure_agent
            from intercept.kube.config import connect
            from intercept.kube.inject import InjectOptions
            from intercept.kube.pods import watch_agent_pods

            cluster = connect(spec.kubeconfig, spec.context, spec.namespace)
            info = ensure_agent(cluster.api, cluster.namespace, spec.service,
                                InjectOptions(image=agent_image, service_port=spec.service_port, outbound=not spec.no_outbound,
                                              no_policy_changes=spec.no_policy_changes),
                                _progress, timeout=spec.timeout)
            transport, creds, namespace = ServiceTransport(cluster.namespace, spec.service), info.credentials, cluster.namespace
            replicas = pod_replicas(watch_agent_pods(cluster.api, cluster.namespace, info.selector), cluster.api, in_cluster=cluster.in_cluster)
        name = spec.name or default_name()
        rules = spec.rules()
        if not rules and not spec.all:
            rules = [HeaderEquals("x-intercept-id", name)]
            click.echo(f"intercept: header: your requests carry x-intercept-id: {name}")
        options = InterceptOptions(transport=transport, credentials=creds, route=Route(frozenset(rules)), name=name,
                                   local_port=spec.port, all_traffic=spec.all)

        def report(event: Any) -> None:
            click.echo(f"intercept: {event.kind}: {event.message}")
            sys.stdout.flush()

        local = LocalCommand(
            tuple(command),
            watch=tuple(str(p) for p in spec.watch) if command and not spec.no_watch else (),
            debug_port=spec.debug_port if spec.debug or spec.debug_wait else None,
            debug_wait=spec.debug_wait,
            env_file=str(spec.env_file) if spec.env_file else None,
        )
        entry = {"service": spec.service, "agent": given.get("agent") or os.environ.get("INTERCEPT_AGENT"), "namespace": namespace,
                 "context": spec.context, "route": options.describe(), "name": name, "local_port": spec.port, "command": command}
        click.echo(f"intercept: starting: {options.describe()} to localhost:{spec.port} through {transport.describe()}")
        with register(entry):  # for intercept status / leave; removed when this intercept ends
            code = _run(start_api(options, local, report, replicas, spec.forward, spec.propagate_header))
    except InterceptError as e:
        _fail(e)
    sys.exit(code)


# start's parameters, by the name of the option they spell in intercept.spec
_START_OPTIONS = {
    "service": "service", "agent_address": "agent", "credentials": "credentials", "local_port": "port",
    "headers": "headers", "header_regexes": "header_regexes", "baggage": "baggage", "path_prefix": "path_prefix",
    "all_traffic": "all", "name": "name", "watch": "watch", "no_watch": "no_watch", "debug": "debug",
    "debug_port": "debug_port", "debug_wait": "debug_wait", "env_file": "env_file", "forwards": "forward",
    "propagate_header": "propagate_header", "no_outbound": "no_outbound",
    "no_policy_changes": "no_policy_changes", "timeout": "timeout", "service_port": "service_port", "namespace": "namespace",
    "context": "context", "kubeconfig": "kubeconfig",
}


@main.command("env")
@click.argument("service", required=False)
@click.option("--agent", "agent_address", metavar="HOST:PORT", help="The agent's SSH address (direct mode).")
@click.option("--credentials", type=click.Path(path_type=Path), help="The agent's credentials file (direct mode).")
@click.option("-o", "--output", type=click.Choice(["dotenv", "json", "sh"]), default="dotenv", show_default=True)
@_agent_image_option
@_cluster_options
def env_command(service: str | None, agent_address: str | None, credentials: Path | None, output: str,
                agent_image: str, namespace: str | None, context: str | None, kubeconfig: str | None) -> None:
    """Print the pod's environment (the app container's variables), without intercepting."""
    import json
    import shlex

    from intercept.client import DirectTransport, InterceptOptions
    from intercept.client.runner import dotenv
    from intercept.client.start import ask_agent, default_name
    from intercept.credentials import load
    from intercept.routing.match import Route

    try:
        if agent_address is not None:
            if credentials is None:
                raise UsageError("--credentials FILE is required with --agent (the file the agent wrote)")
            transport: Any = DirectTransport(*_address(agent_address, "--agent"))
            creds = load(credentials)
            options = InterceptOptions(transport=transport, credentials=creds, route=Route(frozenset()), name=default_name(), local_port=0)
        elif service is not None:
            from intercept.kube.apply import ensure_agent
            from intercept.kube.config import connect
            from intercept.kube.inject import InjectOptions

            cluster = connect(kubeconfig, context, namespace)
            options = _one_agent(cluster, ensure_agent(cluster.api, cluster.namespace, service, InjectOptions(image=agent_image), _progress))
        else:
            raise UsageError("name the SERVICE (intercept env orders), or --agent HOST:PORT --credentials FILE")
        env = _run(ask_agent(options, protocol.Env())).get("env", {})
    except InterceptError as e:
        _fail(e)
    if output == "json":
        click.echo(json.dumps(env, indent=2, sort_keys=True))
    elif output == "sh":
        click.echo("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items())), nl=False)
    else:
        click.echo(dotenv(env), nl=False)


@main.command()
@click.option("--keep", is_flag=True, help="Leave the processes running after the table is printed (Ctrl-C stops them).")
def demo(keep: bool) -> None:
    """Show routing by header without a cluster: real agent, client and two apps on loopback."""
    from intercept.demo import run_demo

    try:
        ok = run_demo(click.echo, keep=keep)
    except InterceptError as e:
        _fail(e)
    sys.exit(0 if ok else 1)


# --------------------------------------------------------------------------- Kubernetes: inject, restore, uninstall, list


def _progress(line: str) -> None:
    click.echo(f"intercept: progress: {line}")
    sys.stdout.flush()


@main.command("inject")
@click.argument("service")
@click.option("-f", "--filename", "manifests", required=True, type=click.File("r"), help="Manifests (YAML, several documents); - reads stdin.")
@_agent_image_option
@click.option("--service-port", metavar="NAME|NUMBER", help="The Service port to take over, when it has several.")
@click.option("--no-policy-changes", is_flag=True, help="Refuse rather than extend NetworkPolicies that would cut the agent off.")
@click.option("--no-outbound", is_flag=True, help="Do not let clients open connections from the pod through the agent.")
def inject_command(service: str, manifests: Any, agent_image: str, service_port: str | None, no_policy_changes: bool, no_outbound: bool) -> None:
    """Print the manifests with the agent injected behind SERVICE (offline; comments are not kept).

    \b
    intercept inject orders -f manifests.yaml > injected.yaml
    """
    from intercept.kube.inject import InjectOptions
    from intercept.kube.manifests import inject_text

    try:
        options = InjectOptions(
            image=agent_image,
            service_port=int(service_port) if service_port and service_port.isdigit() else service_port,
            no_policy_changes=no_policy_changes,
            outbound=not no_outbound,
        )
        text, changes = inject_text(manifests.read(), service, options, source=manifests.name)
    except InterceptError as e:
        _fail(e)
    for line in changes:
        click.echo(f"intercept: injected: {line}", err=True)
    click.echo(text, nl=False)


@main.command("restore")
@click.option("-f", "--filename", "manifests", required=True, type=click.File("r"), help="Injected manifests (YAML); - reads stdin.")
def restore_command(manifests: Any) -> None:
    """Print injected manifests as they were before `intercept inject` (offline)."""
    from intercept.kube.manifests import restore_text

    try:
        text, changes = restore_text(manifests.read(), source=manifests.name)
    except InterceptError as e:
        _fail(e)
    for line in changes:
        click.echo(f"intercept: restored: {line}", err=True)
    click.echo(text, nl=False)


@main.command("uninstall")
@click.argument("service", required=False)
@click.option("--all", "all_agents", is_flag=True, help="Every agent in the namespace.")
@_cluster_options
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for each rollout.")
def uninstall_command(service: str | None, all_agents: bool, namespace: str | None, context: str | None, kubeconfig: str | None, timeout: float) -> None:
    """Remove the agent behind SERVICE (or every agent with --all) and restore what it changed, exactly."""
    from intercept.kube.apply import uninstall
    from intercept.kube.config import connect

    try:
        if bool(service) == all_agents:
            raise UsageError("pass a SERVICE, or --all for every agent in the namespace (not both)")
        cluster = connect(kubeconfig, context, namespace)
        result = uninstall(cluster.api, cluster.namespace, service, all=all_agents, progress=_progress, timeout=timeout)
    except InterceptError as e:
        _fail(e)
    what = f"Service {service}" if service else "no workload"
    if not result.changed:
        click.echo(f"intercept: uninstall: {what} has no agent in namespace {result.namespace}; nothing to do")
        return
    parts = [f"restored {', '.join(result.restored)}"] if result.restored else []
    parts += [f"deleted Secret {', '.join(result.secrets_deleted)}"] if result.secrets_deleted else []
    click.echo(f"intercept: uninstalled: {'; '.join(parts)} (namespace {result.namespace})")


@main.command("list")
@_cluster_options
@click.option("-A", "--all-namespaces", is_flag=True, help="Services of every namespace.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def list_command(namespace: str | None, context: str | None, kubeconfig: str | None, all_namespaces: bool, output: str) -> None:
    """The Services that can be intercepted, and which have an agent."""
    import json

    from intercept.kube.apply import list_services
    from intercept.kube.config import connect

    try:
        if all_namespaces and namespace:
            raise UsageError("pass -n NAMESPACE or -A, not both")
        cluster = connect(kubeconfig, context, namespace)
        rows = list_services(cluster.api, None if all_namespaces else cluster.namespace, routes=lambda info: _agent_routes(cluster, info))
    except InterceptError as e:
        _fail(e)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"intercept: list: no Services in {'any namespace' if all_namespaces else 'namespace ' + cluster.namespace}")
        return
    header = (["NAMESPACE"] if all_namespaces else []) + ["SERVICE", "WORKLOAD", "PORTS", "AGENT", "ROUTES", "NOTE"]
    table = [header]
    for r in rows:
        ports = ",".join(f"{p['port']}->{p['containerPort']}" for p in r["ports"]) or "-"
        routes = "-" if not r["routes"] else ", ".join(  # -o json says why an agent did not answer
            "unknown" if "error" in x else f"{x['holder']} ({x['description']})" for x in r["routes"])
        note = "" if r["interceptable"] else "not interceptable: " + (r["reason"] or "").split(";")[0]
        cells = [r["service"], r["workload"] or "-", ports, r["agentVersion"] or ("yes" if r["agent"] else "-"), routes, note]
        table.append(([r["namespace"]] if all_namespaces else []) + cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        click.echo(("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip())


def _one_agent(cluster: Any, info: Any) -> Any:
    """Options to ask one ready agent pod of ``info`` (no route); UsageError when none is ready."""
    from intercept.client import InterceptOptions
    from intercept.client.fleet import pod_transport
    from intercept.client.start import default_name
    from intercept.kube.apply import agent_pods
    from intercept.routing.match import Route

    pods = [p for p in agent_pods(cluster.api, info.namespace, info.selector) if p.ready and p.ip]
    if not pods:
        raise UsageError(f"no ready agent pod behind {info.namespace}/{info.service}; check `kubectl get pods -n {info.namespace}`")
    return InterceptOptions(transport=pod_transport(pods[0], cluster.api, in_cluster=cluster.in_cluster),
                            credentials=info.credentials, route=Route(frozenset()), name=default_name(), local_port=0)


def _agent_routes(cluster: Any, info: Any) -> list[dict[str, Any]]:
    """Everyone's routes, as one ready agent pod of ``info`` lists them (an ``error`` entry if none answers)."""
    from intercept.client.start import ask_agent

    try:
        return _run(ask_agent(_one_agent(cluster, info), protocol.ListRoutes())).get("routes", [])
    except InterceptError as e:
        return [{"error": str(e)}]


# --------------------------------------------------------------------------- this machine: up, down, status, leave, vscode


def _echo_line(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


@main.command("up")
@click.option("-f", "--filename", "spec_file", default="intercept.yaml", show_default=True, type=click.Path(dir_okay=False, path_type=Path), help="The intercepts to bring up.")
@click.option("--detach", is_flag=True, help="Return once every intercept is ready; they keep running in the background.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Where the intercepts' output goes [default with --detach: the state directory].")
def up_command(spec_file: Path, detach: bool, log_file: Path | None) -> None:
    """Bring up the intercepts of intercept.yaml (never prompts; already up: exit 0).

    \b
    intercept up -f intercept.yaml --detach --log-file /tmp/intercept.log
    """
    import os

    from intercept.workspace import up

    try:
        code = up(spec_file, os.environ, detach=detach, log_file=log_file, report=_echo_line)
    except InterceptError as e:
        _fail(e)
    sys.exit(code)


@main.command("down")
@click.option("-f", "--filename", "spec_file", default="intercept.yaml", show_default=True, type=click.Path(dir_okay=False, path_type=Path), help="The intercepts to stop (the file need not exist any more).")
@click.option("--all", "everything", is_flag=True, help="Stop every workspace that intercept up brought up on this machine.")
def down_command(spec_file: Path, everything: bool) -> None:
    """Stop what `intercept up` started (nothing up: exit 0)."""
    from intercept.workspace import down

    try:
        code = down(None if everything else spec_file, report=_echo_line)
    except InterceptError as e:
        _fail(e)
    sys.exit(code)


@main.command("status")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def status_command(output: str) -> None:
    """This machine's intercepts: service, route, local port, process, log."""
    import json

    from intercept.workspace import status

    try:
        rows = status()
    except InterceptError as e:
        _fail(e)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("intercept: status: no intercept is running on this machine")
        return
    table = [["SERVICE", "ROUTE", "PORT", "PID", "STATE", "STARTED", "LOG"]]
    for r in rows:
        state = "running" if r["alive"] else f"exited {r['exit_code']}" if r["exit_code"] is not None else "gone"
        what = r["service"] or f"agent {r['agent']}"
        what += f" -n {r['namespace']}" if r["namespace"] else ""
        table.append([what, r["route"] or "-", str(r["local_port"] or "-"), str(r["pid"]), state,
                      r["started_at"] or "-", r["log_file"] or "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        click.echo(("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip())


@main.command("leave")
@click.argument("service")
@click.option("-n", "--namespace", help="Only the intercepts of SERVICE in this namespace.")
def leave_command(service: str, namespace: str | None) -> None:
    """Remove my route from SERVICE (stops its `intercept start` on this machine); the agent stays."""
    from intercept.workspace import leave

    try:
        left = leave(service, namespace)
    except InterceptError as e:
        _fail(e)
    for entry in left:
        route = f": {entry.route} go to the cluster again" if entry.route else ""
        click.echo(f"intercept: left: {entry.label} (pid {entry.pid}){route}")


@main.command("vscode")
@click.argument("services", nargs=-1)
def vscode_command(services: tuple[str, ...]) -> None:
    """Write .vscode/launch.json and tasks.json to debug SERVICE (default: the services of ./intercept.yaml)."""
    from intercept.workspace import vscode

    try:
        written = vscode(services, directory=Path.cwd(), spec_file=Path("intercept.yaml"))
    except InterceptError as e:
        _fail(e)
    if not written:
        click.echo("intercept: vscode: .vscode/launch.json and .vscode/tasks.json are up to date")
    for path in written:
        shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
        if path.suffix == ".bak":
            click.echo(f"intercept: vscode: wrote {shown} (the original, with its comments, which the new file cannot keep)")
        else:
            click.echo(f"intercept: vscode: wrote {shown}")


if __name__ == "__main__":  # pragma: no cover
    main()
