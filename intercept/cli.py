"""The ``intercept`` command: parse, call one API function, print. No logic lives here.

Every error is one line ``intercept: error: ...`` on stderr and the error's exit code
(listed in the README). Stable output lines start with ``intercept: KIND:``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

import click

from intercept import __version__
from intercept.errors import InterceptError, UsageError
from intercept.kube.image import CLI_TARGET, DEFAULT_CLI_IMAGE


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


def _spec_options(*keys: str) -> Callable[[Any], Any]:
    """click parameters for the options ``keys`` of :data:`intercept.spec.OPTIONS`: the flag,
    its short form, help, variable and default are the table's, written nowhere else.

    Each parameter is named by its option key; only the flags typed on the command line
    are passed on (:func:`_given`), so that :func:`intercept.spec.merge` applies the
    ``INTERCEPT_*`` variables and the defaults below them, as for ``intercept.yaml``.
    """
    from intercept.spec import OPTIONS

    table = {o.key: o for o in OPTIONS}

    def decorate(command: Any) -> Any:
        for key in reversed(keys):
            option = table[key]
            if option.flag == "SERVICE":
                command = click.argument(key, required=False, metavar="[SERVICE]")(command)
                continue
            default = option.default_doc or ("" if option.is_bool or option.multiple else str(option.default))
            text = option.help.replace("`", "") + f" [env: {option.env}" + (f"; default: {default.replace('`', '')}]" if default else "]")
            decls = [option.flag, *([option.short] if option.short else []), key]
            extra: dict[str, Any] = {"is_flag": True} if option.is_bool else {"metavar": option.type.removeprefix("list of ").upper()}
            if option.flag_value is not None:  # --mount [DIR]
                extra = {"is_flag": False, "flag_value": option.flag_value, "metavar": "[DIR]"}
            command = click.option(*decls, multiple=option.multiple, default=None, help=text, **extra)(command)
        return command

    return decorate


def _given(ctx: click.Context, *keys: str) -> dict[str, Any]:
    """The options ``keys`` that were typed on the command line, by key."""
    from click.core import ParameterSource

    return {key: ctx.params[key] for key in keys if ctx.get_parameter_source(key) is ParameterSource.COMMANDLINE}


def _spec(ctx: click.Context, *keys: str, target: bool = True, **extra: Any) -> Any:
    """The intercept this command line describes, over the ``INTERCEPT_*`` variables and the
    service's entry in ./intercept.yaml (:func:`intercept.spec.for_service`), validated
    (``target=False``: no SERVICE required, for connect)."""
    import os

    from intercept.spec import for_service

    return for_service(os.environ, {**_given(ctx, *keys), **extra}, target=target)


def _options(ctx: click.Context, *keys: str) -> dict[str, Any]:
    """Options of a command that is not an intercept, over the ``INTERCEPT_*`` variables, validated."""
    import os

    from intercept.spec import options

    return options(os.environ, _given(ctx, *keys), keys)


CLUSTER = ("namespace", "context", "kubeconfig")
_START = (
    "service", "agent", "credentials", "port", "headers", "header_regexes", "baggage", "path_prefix", "all", "replace", "mirror", "name",
    "watch", "no_watch", "debug", "debug_port", "debug_wait", "env_file", "mount", "mount_mode", "forward", "also_namespaces", "access", "propagate_header",
    "no_outbound", "outbound_allow", "outbound_deny", "no_policy_changes", "no_forwarded_headers", "timeout", "ttl",
    "service_port", "agent_image", "hold_timeout", "reinject", *CLUSTER,
)


def _print_table(table: list[list[str]]) -> None:
    """Rows of cells in aligned columns (the last one left ragged), the header first."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        click.echo(("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip())


def _claim_stdout() -> TextIO | None:
    """Keep standard output for the command's own machine-readable lines.

    The command's lines go to a private copy of file descriptor 1; descriptor 1 and
    ``sys.stdout`` then point at stderr, so whatever else would write there (a
    dependency's print or warning, a C library, COMMAND's output) cannot put a stray line
    between them. None when stdout is not the process's descriptor 1 (already redirected
    inside the process: nothing to guard).
    """
    import os

    try:
        if sys.stdout is None or sys.stdout.fileno() != 1:
            return None
    except (AttributeError, OSError, ValueError):
        return None
    sys.stdout.flush()
    private = os.dup(1)
    os.set_inheritable(private, False)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return open(private, "w", buffering=1, encoding="utf-8", closefd=True)  # noqa: SIM115 (lives as long as the command)


_MACHINE_FORMATS = frozenset({"json", "yaml", "dotenv", "sh"})


def _output_option(*choices: str, help: str | None = None) -> Callable[[Any], Any]:
    """``-o/--output`` (the first choice is the default); a machine-readable format claims
    stdout for the command's own output (:func:`_claim_stdout`, read back with :func:`_out`)."""

    def claim(ctx: click.Context, param: click.Parameter, value: str) -> str:
        if value in _MACHINE_FORMATS and "stdout" not in ctx.meta:
            ctx.meta["stdout"] = _claim_stdout()
        return value

    return click.option("-o", "--output", type=click.Choice(list(choices)), default=choices[0], show_default=True,
                        help=help, callback=claim)


def _out() -> TextIO | None:
    """Where the command's own output goes: the claimed stdout, or None for click's default."""
    return click.get_current_context().meta.get("stdout")


def _fail(error: InterceptError) -> None:
    click.echo(f"intercept: error: {error}", err=True)
    sys.exit(error.exit_code)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        logging.getLogger("asyncssh").setLevel(logging.WARNING)


class _Commands(click.Group):
    """The ``intercept`` group: what click itself refuses (an unknown option or command, a
    missing or unparsable value, a file it cannot open) is one line ``intercept: error:
    ...; see intercept COMMAND --help``, exit 2, like every other error."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.ClickException as e:
            _refused_by_click(e)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            _refused_by_click(e)


def _refused_by_click(error: click.ClickException) -> NoReturn:
    if isinstance(error, click.exceptions.NoArgsIsHelpError):  # a group alone: its help, as click shows it
        raise error
    message = " ".join(error.format_message().split()).rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(error, "ctx", None)
    where = ctx.command_path if ctx is not None else "intercept"
    click.echo(f"intercept: error: {message}; see {where} --help", err=True)
    sys.exit(UsageError.exit_code)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="intercept")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """Send your own requests to a service to the process on your machine."""
    _setup_logging(verbose)


def _agent_options(command: Any) -> Any:
    """click parameters for every setting of :data:`intercept.agentconfig.SETTINGS`: flag, help,
    variable and default are the table's. Only the flags typed are passed on; the variables
    and defaults below them are applied by :func:`intercept.agentconfig.resolve`."""
    from intercept.agentconfig import SETTINGS

    for setting in reversed(SETTINGS):
        if setting.required:
            default = "required"
        elif setting.default_doc is not None:
            default = setting.default_doc
        else:
            default = setting.text(setting.default)
        text = f"{setting.help} [env: {setting.env}; default: {default}]"
        if setting.is_bool:
            name = setting.flag.removeprefix("--")
            decls = [f"{setting.flag}/--no-{name}", setting.key]
            command = click.option(*decls, default=None, help=text)(command)
        else:
            command = click.option(setting.flag, setting.key, multiple=setting.multiple, default=None, help=text,
                                   metavar=setting.type)(command)
    return command


@main.command()
@_agent_options
@click.pass_context
def agent(ctx: click.Context, **_: Any) -> None:
    """Run the agent in front of an app (in a pod: configured by INTERCEPT_* variables)."""
    import os

    from click.core import ParameterSource

    from intercept.agent import run
    from intercept.agent.files import MOUNTS_ENV, ServedFiles, mounts_from_env, parse_serve_files
    from intercept.agentconfig import SETTINGS, resolve

    try:
        given: dict[str, Any] = {}
        try:
            for setting in SETTINGS:
                if ctx.get_parameter_source(setting.key) is not ParameterSource.COMMANDLINE:
                    continue
                value = ctx.params[setting.key]
                if setting.multiple:
                    value = tuple(setting.value(v, f"{setting.flag} {v!r}") for v in value)
                elif not setting.is_bool:
                    value = setting.value(value, f"{setting.flag} {value!r}")
                given[setting.key] = value
            config = resolve(os.environ, {**given, "mounts": tuple(mounts_from_env(os.environ))})
            ServedFiles([*config.mounts, *parse_serve_files(config.serve_files)])
        except UsageError as e:
            raise UsageError(f"{e}; see {ctx.command_path} --help") from None
        except ValueError as e:
            raise UsageError(f"--serve-files / {MOUNTS_ENV}: {e}; see {ctx.command_path} --help") from None

        def ready(a: Any) -> None:
            sh, sp = a.ssh_address
            for front in a.fronts:  # one line per listener, the first as before there were several
                (h, p), (uh, up) = front.http_address, front.upstream
                click.echo(f"intercept: agent: http {h}:{p} ssh {sh}:{sp} upstream {uh}:{up}", nl=True)
            if not config.fence.open:  # it judges sandbox destinations, and developers' outbound connections
                click.echo(f"intercept: agent: outbound fence: {config.fence.describe()}")
            if a.files:
                click.echo(f"intercept: agent: files: {' '.join(r.path for r in a.files.roots)}")
            sys.stdout.flush()

        run(config, ready)
    except InterceptError as e:
        _fail(e)
    except OSError as e:
        _fail(InterceptError(f"agent cannot listen: {e.strerror or e}; choose free ports with --listen/--ssh-listen"))


@main.command("stand-in", hidden=True)
@click.argument("developer")
def stand_in_command(developer: str) -> None:
    """What a replaced app container runs until its pod goes (intercept start --replace)."""
    from intercept.standin import stand_in

    stand_in(developer, lambda line: click.echo(line))
    sys.exit(0)


@main.command(cls=_DashDashCommand)
@_spec_options(*_START)
@_output_option("text", "json", help="text: intercept: KIND: MESSAGE lines; json: one event object per line (for scripts and "
                                     "intercept up), and nothing else: COMMAND's output then goes to stderr.")
@click.pass_context
def start(ctx: click.Context, output: str, **_: Any) -> None:
    """Intercept: requests that match your route reach localhost:PORT.

    \b
    intercept start orders --header x-dev=alice --port 8080 -- python app.py
    intercept start orders --replace --port 8080 -- python app.py
    intercept start deployment/worker --replace -- python worker.py
    intercept start --agent HOST:PORT --credentials FILE --port 8080 [--header x-dev=alice] [-- COMMAND ARGS...]
    """
    import json

    from intercept import api

    out = _out()

    def render(event: Any) -> None:  # called from the API's thread: no click context there
        click.echo(json.dumps(event.to_json()) if output == "json" else event.line(), file=out)
        sys.stdout.flush()

    try:
        spec = _spec(ctx, *_START, command=ctx.meta["command"] or None)
        entry = {"service": spec.service, "agent": spec.agent, "namespace": spec.namespace, "context": spec.context,
                 "name": spec.name, "local_port": spec.local_port, "command": list(spec.command),
                 "ports": [str(p) for p in spec.port] if len(spec.port) > 1 else []}
        code = api.run(spec, render, registry_entry=entry)
    except InterceptError as e:
        if output == "json":
            click.echo(json.dumps({"kind": "error", "message": str(e), "status": e.exit_code}), file=out)
        _fail(e)
    sys.exit(code)


@main.command("connect", cls=_DashDashCommand)
@_spec_options("service", "also_namespaces", "access", "name", "outbound_allow", "outbound_deny", "agent_image", "timeout",
               *CLUSTER)
@click.pass_context
def connect_command(ctx: click.Context, **_: Any) -> None:
    """Reach the cluster as a pod of the namespace does, without intercepting: COMMAND (else
    your shell) resolves every Service by name and connects through an agent's pod (SERVICE's,
    else any in the namespace, else a small agent of its own that intercept gc removes once idle).

    \b
    intercept connect -n shop -- python -c "import redis; print(redis.Redis('redis-cart').ping())"
    intercept connect -n shop --also-namespace cache        (a shell)
    """
    import asyncio
    import signal

    from intercept import api

    command = ctx.meta["command"] or []

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a shell shares the terminal: its Ctrl-C is the shell's
            loop.add_signal_handler(sig, stop.set if command or sig == signal.SIGTERM else (lambda: None))
        return await api.connect(spec, command, on_event=lambda event: click.echo(event.line(), err=True), stop=stop)

    try:
        keys = ("service", "also_namespaces", "access", "name", "outbound_allow", "outbound_deny", "agent_image", "timeout",
                *CLUSTER)
        spec = _spec(ctx, *keys, target=False)  # without a SERVICE, any agent of the namespace will do
        code = asyncio.run(run())
    except InterceptError as e:
        _fail(e)
    sys.exit(code)


@main.command("env")
@_spec_options("service", "agent", "credentials", "agent_image", "access", *CLUSTER)
@_output_option("dotenv", "json", "sh")
@click.pass_context
def env_command(ctx: click.Context, output: str, **_: Any) -> None:
    """Print the pod's environment (the app container's variables), without intercepting.

    The Services' link variables (REDIS_SERVICE_HOST, ...) are printed as the pod has them;
    a line on stderr says what intercept start and connect do with them on this machine."""
    import asyncio
    import json
    import shlex

    from intercept import api
    from intercept.client.runner import dotenv

    try:
        spec = _spec(ctx, "service", "agent", "credentials", "agent_image", "access", *CLUSTER)
        env = asyncio.run(api.pod_env(spec))
        note = api.env_access(env, spec)
    except InterceptError as e:
        _fail(e)
    if note is not None:
        click.echo(note.line(), err=True)
    if output == "json":
        click.echo(json.dumps(env, indent=2, sort_keys=True), file=_out())
    elif output == "sh":
        click.echo("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items())), nl=False, file=_out())
    else:
        click.echo(dotenv(env), nl=False, file=_out())


@main.command("files")
@_spec_options("service", "agent", "credentials", "agent_image", *CLUSTER)
@click.argument("path", required=False, default="/")
@click.option("--to", "to", type=click.Path(file_okay=False, path_type=Path), help="A new or empty directory [default: a fresh temporary one].")
@click.pass_context
def files_command(ctx: click.Context, path: str, to: Path | None, **_: Any) -> None:
    """Copy the pod's files (the app container's mounts) here, without intercepting.

    \b
    intercept files orders --to ./orders-root            # /etc/config/app.yaml -> ./orders-root/etc/config/app.yaml
    intercept files orders /etc/config --to ./orders-root
    """
    import asyncio

    from intercept import api

    service = ctx.params.get("service")
    if service and service.startswith("/") and path == "/":  # intercept files --agent H:P --credentials F /etc/config
        ctx.params["service"], path = None, service
    try:
        copied = asyncio.run(api.files(_spec(ctx, "service", "agent", "credentials", "agent_image", *CLUSTER), path, to=to))
    except InterceptError as e:
        _fail(e)
    for refused in copied["refused"]:
        click.echo(f"intercept: warning: not copied: {refused}", err=True)
    size = copied["bytes"]
    click.echo(f"intercept: files: copied {copied['files']} files ({size} bytes) to {copied['path']}")


@main.command()
@click.option("--keep", is_flag=True, help="Leave the processes running after the table is printed (Ctrl-C stops them).")
@click.option("--grpc", is_flag=True, help="gRPC on HTTP/2 (h2c) instead: the calls share one client connection.")
@click.option("--mirror", is_flag=True, help="Mirror instead: the cluster version answers every request, and a copy of "
                                             "each one with the header reaches the local version.")
def demo(keep: bool, grpc: bool, mirror: bool) -> None:
    """Show routing by header without a cluster: real agent, client and two apps on loopback."""
    from intercept.demo import run_demo

    if grpc and mirror:
        _fail(UsageError("intercept demo: --mirror shows HTTP/1.1 requests; drop --grpc or --mirror"))
    try:
        ok = run_demo(click.echo, keep=keep, grpc=grpc, mirror=mirror)
    except InterceptError as e:
        _fail(e)
    sys.exit(0 if ok else 1)


# --------------------------------------------------------------------------- Kubernetes: inject, restore, uninstall, list


def _progress(event: Any) -> None:
    click.echo(event.line())
    sys.stdout.flush()


_INJECT = ("agent_image", "service_port", "no_policy_changes", "no_outbound", "no_forwarded_headers", "outbound_allow",
           "outbound_deny", "hold_timeout")


@main.command("inject")
@click.argument("service")
@click.option("-f", "--filename", "manifests", type=click.File("r"),
              help="Offline: read manifests (YAML, several documents; - reads stdin) and print them injected.")
@_spec_options(*_INJECT, "timeout", *CLUSTER)
@click.pass_context
def inject_command(ctx: click.Context, service: str, manifests: Any, **_: Any) -> None:
    """Add the agent behind SERVICE, or change its pod-wide settings for everyone; with -f, offline.

    \b
    intercept inject orders -n shop --outbound-deny '*.internal'   # the running agent's fence, for everyone
    intercept inject orders -f manifests.yaml > injected.yaml       # offline (comments are not kept)
    """
    from intercept import api

    try:
        if manifests is None:
            done = api.inject(_spec(ctx, *_INJECT, "timeout", *CLUSTER, service=service), on_event=_progress)
            if done["changed"]:
                click.echo(f"intercept: injected: {done['workload']}: its agent changed for everyone "
                           f"({'; '.join(done['changed'])}; namespace {done['namespace']})")
            else:
                click.echo(f"intercept: injected: {done['workload']} runs the agent {done['image']} as asked "
                           f"(namespace {done['namespace']})")
            return
        text, changes = api.inject_text(manifests.read(), service, **_options(ctx, *_INJECT), source=manifests.name)
    except InterceptError as e:
        _fail(e)
    for line in changes:
        click.echo(f"intercept: injected: {line}", err=True)
    click.echo(text, nl=False)


@main.command("restore")
@click.option("-f", "--filename", "manifests", required=True, type=click.File("r"), help="Injected manifests (YAML); - reads stdin.")
def restore_command(manifests: Any) -> None:
    """Print injected manifests as they were before `intercept inject` (offline)."""
    from intercept import api

    try:
        text, changes = api.restore_text(manifests.read(), source=manifests.name)
    except InterceptError as e:
        _fail(e)
    for line in changes:
        click.echo(f"intercept: restored: {line}", err=True)
    click.echo(text, nl=False)


@main.command("uninstall")
@click.argument("service", required=False)
@click.option("--all", "all_agents", is_flag=True, help="Every agent in the namespace.")
@click.option("--force", is_flag=True, help="Even while developers hold routes on it (their intercepts end, saying so).")
@_spec_options("timeout", *CLUSTER)
@click.pass_context
def uninstall_command(ctx: click.Context, service: str | None, all_agents: bool, force: bool, **_: Any) -> None:
    """Remove the agent behind SERVICE (or every agent with --all) and restore what it changed, exactly."""
    from intercept import api

    try:
        result = api.uninstall(service, all=all_agents, **_options(ctx, "timeout", *CLUSTER), on_event=_progress,
                               force=force)
    except InterceptError as e:
        _fail(e)
    what = f"Service {service}" if service else "no workload"
    if not result.changed:
        click.echo(f"intercept: uninstall: {what} has no agent in namespace {result.namespace}; nothing to do")
        return
    parts = [f"restored {', '.join(result.restored)}"] if result.restored else []
    parts += [f"deleted Secret {', '.join(result.secrets_deleted)}"] if result.secrets_deleted else []
    parts += [f"deleted {', '.join(result.deleted)}"] if result.deleted else []
    click.echo(f"intercept: uninstalled: {'; '.join(parts)} (namespace {result.namespace})")


@main.command("list")
@_spec_options(*CLUSTER)
@click.option("-A", "--all-namespaces", is_flag=True, help="Services of every namespace.")
@_output_option("table", "json")
@click.pass_context
def list_command(ctx: click.Context, all_namespaces: bool, output: str, **_: Any) -> None:
    """The Services that can be intercepted, and which have an agent."""
    import json

    from intercept import api

    try:
        listed, rows = api.list_services(all_namespaces=all_namespaces, **_options(ctx, *CLUSTER))
    except InterceptError as e:
        _fail(e)
    if output == "json":
        click.echo(json.dumps(rows, indent=2), file=_out())
        return
    if not rows:
        click.echo(f"intercept: list: no Services in {'any namespace' if listed is None else 'namespace ' + listed}")
        return
    header = (["NAMESPACE"] if all_namespaces else []) + ["SERVICE", "WORKLOAD", "PORTS", "AGENT", "ROUTES", "NOTE"]
    table = [header]
    for r in rows:
        ports = ",".join(f"{p['port']}->{p['containerPort']}" for p in r["ports"]) or "-"
        routes = "-" if not r["routes"] else ", ".join(  # -o json says why an agent did not answer
            "unknown" if "error" in x else f"{x['holder']} ({'mirror of ' if x.get('mirror') else ''}{x['description']})"
            for x in r["routes"])
        note = "" if r["interceptable"] else "not interceptable: " + (r["reason"] or "").split(";")[0]
        cells = [r["service"], r["workload"] or "-", ports, r["agentVersion"] or ("yes" if r["agent"] else "-"), routes, note]
        table.append(([r["namespace"]] if all_namespaces else []) + cells)
    _print_table(table)


# --------------------------------------------------------------------------- sandboxes and gc


def _duration(value: str, flag: str) -> float:
    from intercept.spec import parse_duration

    try:
        return parse_duration(value)
    except ValueError:
        raise UsageError(f"{flag} {value!r}: expected a duration such as 90s, 30m, 2h or 1d12h") from None


@main.group("sandbox")
def sandbox_group() -> None:
    """In-cluster forks of Services, reached by a routing key, with a lifetime."""


@sandbox_group.command("create")
@click.argument("name")
@click.option("--fork", "forks", multiple=True, required=True, metavar="SERVICE", help="A Service to fork (repeatable).")
@click.option("--image", "images", multiple=True, metavar="[CONTAINER=]IMAGE", help="The forks' image (of the Service's container unless named).")
@click.option("--env", "env", multiple=True, metavar="[CONTAINER:]KEY=VALUE", help="A variable set in the forks (repeatable).")
@click.option("--ttl", default="24h", show_default=True, metavar="DURATION", help="How long the sandbox lives (at most 30d); gc removes it after.")
@click.option("--header", "headers", multiple=True, metavar="NAME=VALUE", help="The routing key instead of x-intercept-id: NAME.")
@click.option("--baggage", metavar="KEY=VALUE", help="The routing key as a W3C baggage member instead of intercept-id=NAME.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until every fork is ready (removing everything if one is not).")
@click.option("--dry-run", is_flag=True, help="Print the objects it would create (-o yaml) and change nothing.")
@_output_option("text", "yaml", "json")
@click.option("-f", "--filename", "manifests", type=click.File("r"), help="With --dry-run: read the namespace's objects from MANIFESTS, not the cluster.")
@_spec_options("agent_image", "timeout", *CLUSTER)
@click.pass_context
def sandbox_create(ctx: click.Context, name: str, forks: tuple[str, ...], images: tuple[str, ...], env: tuple[str, ...],
                   ttl: str, headers: tuple[str, ...], baggage: str | None, wait: bool, dry_run: bool, output: str,
                   manifests: Any, **_: Any) -> None:
    """Fork SERVICEs as sandbox NAME; requests carrying its key reach the forks.

    \b
    intercept sandbox create pr-42 --fork orders --fork payments --image orders=registry/orders:pr-42 --ttl 2d
    curl -H 'x-intercept-id: pr-42' http://orders/...     # or baggage: intercept-id=pr-42
    """
    import json

    from intercept import api

    try:
        options = _options(ctx, "agent_image", "timeout", *CLUSTER)
        seconds = _duration(ttl, "--ttl")
        if dry_run:
            objects = api.sandbox_manifests(name, forks, images=images, env=env, ttl=seconds, headers=headers, baggage=baggage,
                                            manifests=manifests.read() if manifests else None, **options)
            click.echo(json.dumps(objects, indent=2) if output == "json" else _yaml(objects), nl=output == "json", file=_out())
            return
        summary = api.sandbox_create(name, forks, images=images, env=env, ttl=seconds, headers=headers, baggage=baggage,
                                     wait=wait, on_event=_progress, **options)
    except InterceptError as e:
        _fail(e)
    if output == "json":
        click.echo(json.dumps(summary, indent=2), file=_out())


def _yaml(objects: list[dict[str, Any]]) -> str:
    from intercept.kube.manifests import dump

    return dump(objects)


@sandbox_group.command("list")
@_spec_options(*CLUSTER)
@click.option("-A", "--all-namespaces", is_flag=True, help="Sandboxes of every namespace.")
@_output_option("table", "json")
@click.pass_context
def sandbox_list(ctx: click.Context, all_namespaces: bool, output: str, **_: Any) -> None:
    """The sandboxes: forks, routing key, expiry, readiness."""
    import json

    from intercept import api

    try:
        rows = api.sandbox_list(all_namespaces=all_namespaces, **_options(ctx, *CLUSTER))
    except InterceptError as e:
        _fail(e)
    if output == "json":
        click.echo(json.dumps(rows, indent=2), file=_out())
        return
    if not rows:
        click.echo("intercept: sandbox: no sandboxes")
        return
    table = [["NAMESPACE", "SANDBOX", "FORKS", "KEY", "EXPIRES", "STATE"]]
    for r in rows:
        forks = ", ".join(f"{f['service']}->{f['workload']}" for f in r["forks"])
        state = "expired" if r["expired"] else "ready" if r["ready"] else "starting"
        table.append([r["namespace"], r["sandbox"], forks, r["key"], r["expiresAt"] or "-", state])
    _print_table(table)


@sandbox_group.command("delete")
@click.argument("name")
@_spec_options(*CLUSTER)
@click.pass_context
def sandbox_delete(ctx: click.Context, name: str, **_: Any) -> None:
    """Remove sandbox NAME: its forks, their Services and its routes (idempotent)."""
    from intercept import api

    try:
        removed = api.sandbox_delete(name, on_event=_progress, **_options(ctx, *CLUSTER))
    except InterceptError as e:
        _fail(e)
    click.echo(f"intercept: deleted: sandbox {name}" + (f" ({len(removed)} objects and routes)" if removed else ": nothing was left"))


@sandbox_group.command("extend")
@click.argument("name")
@click.option("--ttl", required=True, metavar="DURATION", help="The new lifetime, from now.")
@_spec_options(*CLUSTER)
@click.pass_context
def sandbox_extend(ctx: click.Context, name: str, ttl: str, **_: Any) -> None:
    """Give sandbox NAME a new lifetime, counted from now."""
    from intercept import api
    from intercept.kube.sandbox import expiry_text

    try:
        expires = api.sandbox_extend(name, _duration(ttl, "--ttl"), on_event=_progress, **_options(ctx, *CLUSTER))
    except InterceptError as e:
        _fail(e)
    click.echo(f"intercept: extended: sandbox {name} lives until {expiry_text(expires)}")


def _agent_image_origin(ctx: click.Context) -> str | None:
    """Where the agent image was named (its flag or its variable), or None: the built-in default."""
    import os

    from intercept.kube.image import AGENT_IMAGE_ENV, AGENT_IMAGE_FLAG

    if "agent_image" in _given(ctx, "agent_image"):
        return AGENT_IMAGE_FLAG
    return AGENT_IMAGE_ENV if os.environ.get(AGENT_IMAGE_ENV) else None


@main.command("gc")
@_spec_options("timeout", "agent_image", *CLUSTER)
@click.option("-A", "--all-namespaces", is_flag=True, help="Every namespace.")
@click.option("--idle", default="24h", show_default=True, metavar="DURATION", help="Uninstall agents nobody has used for this long.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@click.option("--install", is_flag=True, help="Instead: create a CronJob that runs intercept gc in the namespace, hourly, "
              "in the CLI image (--image).")
@click.option("--image", metavar="IMAGE", help=f"With --install: the image the CronJob runs (default: {DEFAULT_CLI_IMAGE}, "
              f"agent_image/Dockerfile --target {CLI_TARGET}). Name it here, not with --agent-image: that one still names "
              "the Job's image when --image is not given, as before, but an agent image lacks the kubernetes client "
              "intercept gc needs.")
@click.pass_context
def gc_command(ctx: click.Context, all_namespaces: bool, idle: str, dry_run: bool, install: bool, image: str | None,
               **_: Any) -> None:
    """Delete expired sandboxes and uninstall idle agents (restoring their workloads exactly)."""
    from intercept import api
    from intercept.kube.image import build_command

    try:
        options = _options(ctx, "timeout", "agent_image", *CLUSTER)
        agent_image = options.pop("agent_image")
        if image is not None and not install:
            raise UsageError("--image names the image of gc's CronJob: pass it with --install")
        if install:
            origin = _agent_image_origin(ctx)
            if image is None and origin:
                click.echo(f"intercept: warning: gc's CronJob runs {agent_image}, the agent image ({origin}); an "
                           "agent image built from agent_image/Dockerfile lacks the kubernetes client intercept gc "
                           f"needs: name the CLI image with --image (default {DEFAULT_CLI_IMAGE}; build one with "
                           f"{build_command('IMAGE', CLI_TARGET)})")
            for line in api.gc_install(idle=_duration(idle, "--idle"), dry_run=dry_run, image=image,
                                       agent_image=agent_image if origin else None, **options):
                click.echo(f"intercept: gc: {line}")
            return
        collected = api.gc(all_namespaces=all_namespaces, idle=_duration(idle, "--idle"), dry_run=dry_run,
                           on_event=_progress, **options)
    except InterceptError as e:
        _fail(e)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"intercept: gc: {verb} {len(collected.sandboxes)} sandboxes and {len(collected.agents)} idle agents"
               + (f" ({', '.join([*collected.sandboxes, *collected.agents])})" if collected.sandboxes or collected.agents else ""))


@main.command("doctor")
@click.argument("service", required=False)
@_spec_options("agent_image", "service_port", "no_policy_changes", *CLUSTER)
@click.option("-f", "--filename", "spec_file", default="intercept.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Read SERVICE's entry here when the file exists (its agent_image, namespace, ...), as intercept start does.")
@click.pass_context
def doctor_command(ctx: click.Context, service: str | None, spec_file: Path, **_: Any) -> None:
    """Check what a first intercept of SERVICE needs; one line per check, with its fix.

    \b
    Cluster and context, RBAC (SelfSubjectAccessReview), the agent image, Pod Security,
    NetworkPolicies, and what the Service's pods speak (HTTP/1.1, h2c, TLS). Exit 0 only
    when every check passes (12 otherwise).
    """
    import os

    from intercept import api
    from intercept.errors import ChecksFailed
    from intercept.spec import for_service

    keys = ("agent_image", "service_port", "no_policy_changes", *CLUSTER)
    try:
        if service:  # what intercept start SERVICE would read
            spec = for_service(os.environ, {**_given(ctx, *keys), "service": service}, spec_file)
            origin = spec.origins.get("agent_image")  # None: the built-in default, or the running agent's
            options = {key: getattr(spec, key) for key in keys}
        else:
            options = dict(_options(ctx, *keys))
            origin = _agent_image_origin(ctx)
        results = api.doctor(service, **{**options, "agent_image": options["agent_image"] if origin else None},
                             image_origin=str(origin) if origin else None)
    except InterceptError as e:
        _fail(e)
    for check in results:
        click.echo(f"intercept: doctor: {check.line()}")
    failed = [c.name for c in results if not c.passed]
    if failed:
        click.echo(f"intercept: doctor: {len(failed)} of {len(results)} checks failed ({', '.join(failed)})")
        sys.exit(ChecksFailed.exit_code)
    click.echo(f"intercept: doctor: all {len(results)} checks passed" if all(c.status == "ok" for c in results)
               else f"intercept: doctor: no check failed ({sum(c.status == 'skipped' for c in results)} skipped)")


@main.command("mcp")
def mcp_command() -> None:
    """Serve intercept to coding agents: a Model Context Protocol server on stdio.

    \b
    Tools: list_services, start_intercept, stop_intercept, status, pod_env, send_request, process_output, doctor.
    """
    try:
        from intercept.mcp_server import serve
    except ImportError as e:
        _fail(UsageError(f"intercept mcp needs the MCP SDK ({e.name} is missing): pip install 'intercept[mcp]'"))
    serve()


# --------------------------------------------------------------------------- this machine: up, down, status, leave, vscode


def _echo_line(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


@main.command("up")
@click.option("-f", "--filename", "spec_file", default="intercept.yaml", show_default=True, type=click.Path(dir_okay=False, path_type=Path), help="The intercepts to bring up.")
@click.option("--detach", is_flag=True, help="Return once every intercept is ready; they keep running in the background.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Where the intercepts' output goes [default with --detach: the state directory].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True, help="With --detach: give up (and stop them) if the intercepts are not all ready by then, in seconds.")
def up_command(spec_file: Path, detach: bool, log_file: Path | None, timeout: float) -> None:
    """Bring up the intercepts of intercept.yaml (never prompts; already up: exit 0).

    \b
    intercept up -f intercept.yaml --detach --log-file /tmp/intercept.log
    """
    from intercept import api

    try:
        code = api.up(spec_file, detach=detach, log_file=log_file, report=_echo_line, timeout=timeout)
    except InterceptError as e:
        _fail(e)
    sys.exit(code)


@main.command("down")
@click.option("-f", "--filename", "spec_file", default="intercept.yaml", show_default=True, type=click.Path(dir_okay=False, path_type=Path), help="The intercepts to stop (the file need not exist any more).")
@click.option("--all", "everything", is_flag=True, help="Stop every workspace that intercept up brought up on this machine.")
def down_command(spec_file: Path, everything: bool) -> None:
    """Stop what `intercept up` started (nothing up: exit 0)."""
    from intercept import api

    try:
        code = api.down(None if everything else spec_file, report=_echo_line)
    except InterceptError as e:
        _fail(e)
    sys.exit(code)


@main.command("status")
@_output_option("table", "json")
def status_command(output: str) -> None:
    """This machine's intercepts: service, route, local port, outbound fence, files, process, log."""
    import json

    from intercept import api

    try:
        rows = api.status()
    except InterceptError as e:
        _fail(e)
    if output == "json":
        click.echo(json.dumps(rows, indent=2), file=_out())
        return
    if not rows:
        click.echo("intercept: status: no intercept is running on this machine")
        return
    table = [["SERVICE", "ROUTE", "PORT", "OUTBOUND", "FILES", "PID", "STATE", "STARTED", "LOG"]]
    for r in rows:
        state = "running" if r["alive"] else f"exited {r['exit_code']}" if r["exit_code"] is not None else "gone"
        what = r["service"] or f"agent {r['agent']}"
        what += f" -n {r['namespace']}" if r["namespace"] else ""
        port = " ".join(r.get("ports") or ()) or str(r["local_port"] or "-")  # several: SERVICE_PORT:LOCAL_PORT each
        route = r["route"] or "-"
        if r.get("mirrored"):
            route += f" (copied {r['mirrored']['copied']}, dropped {r['mirrored']['dropped']})"
        table.append([what, route, port, r["fence"] or "-", r["files"] or "-",
                      str(r["pid"]), state, r["started_at"] or "-", r["log_file"] or "-"])
    _print_table(table)


@main.command("leave")
@click.argument("service")
@click.option("-n", "--namespace", help="Only the intercepts of SERVICE in this namespace.")
def leave_command(service: str, namespace: str | None) -> None:
    """Remove my route from SERVICE (stops its `intercept start` on this machine); the agent stays."""
    from intercept import api

    try:
        left = api.leave(service, namespace)
    except InterceptError as e:
        _fail(e)
    for entry in left:
        gone = "stop coming here" if entry.route and entry.route.startswith("copies of ") else "go to the cluster again"
        route = f": {entry.route} {gone}" if entry.route else ""
        click.echo(f"intercept: left: {entry.label} (pid {entry.pid}){route}")


@main.command("vscode", cls=_DashDashCommand)
@click.argument("services", nargs=-1)
@_spec_options(*(key for key in _START if key not in ("service", "agent", "credentials", "debug", "debug_port",
                                                       "debug_wait", "watch", "no_watch")))
@click.pass_context
def vscode_command(ctx: click.Context, services: tuple[str, ...], **_: Any) -> None:
    """Write .vscode/launch.json and tasks.json to debug SERVICE running COMMAND.

    \b
    intercept vscode orders -n shop --header x-dev=alice -- python app.py
    intercept vscode            (the services and commands of ./intercept.yaml)

    The options are start's, written into each task (over ./intercept.yaml's).
    """
    from intercept import api

    keys = [key for key in _START if key in ctx.params]
    try:
        written = api.vscode(services, directory=Path.cwd(), spec_file=Path("intercept.yaml"), command=ctx.meta["command"],
                             options=_given(ctx, *keys))
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
