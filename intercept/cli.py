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

from intercept import __version__
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
def agent(listen: str, upstream: str, ssh_listen: str, credentials: Path, hold_timeout: float, allow_outbound: bool) -> None:
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
) -> None:
    """Intercept: requests that match your route reach localhost:PORT.

    \b
    intercept start --agent HOST:PORT --credentials FILE --port 8080 [--header x-dev=alice] [-- COMMAND ARGS...]
    """
    from intercept.client import DirectTransport, InterceptOptions, default_name
    from intercept.client import start as start_api
    from intercept.client.runner import LocalCommand
    from intercept.credentials import load
    from intercept.routing.match import HeaderEquals, Route, parse_rule

    command = ctx.meta["command"]
    try:
        if agent_address is None:
            raise UsageError(
                f"intercepting {service or 'a service'} through Kubernetes is not available in this version; "
                "use --agent HOST:PORT --credentials FILE to reach an agent directly"
            )
        if credentials is None:
            raise UsageError("--credentials FILE is required with --agent (the file the agent wrote)")
        host, port = _address(agent_address, "--agent")
        name = name or default_name()
        rules = [parse_rule("header", h) for h in headers]
        rules += [parse_rule("header-regex", h) for h in header_regexes]
        rules += [parse_rule("baggage", baggage)] if baggage else []
        rules += [parse_rule("path-prefix", path_prefix)] if path_prefix else []
        if all_traffic and rules:
            raise UsageError("--all takes every request; drop it or drop the rules")
        if not rules and not all_traffic:
            rules = [HeaderEquals("x-intercept-id", name)]
            click.echo(f"intercept: header: your requests carry x-intercept-id: {name}")
        options = InterceptOptions(
            transport=DirectTransport(host, port),
            credentials=load(credentials),
            route=Route(frozenset(rules)),
            name=name,
            local_port=local_port,
            all_traffic=all_traffic,
        )

        def report(event: Any) -> None:
            click.echo(f"intercept: {event.kind}: {event.message}")
            sys.stdout.flush()

        if (debug or debug_wait) and not command:
            raise UsageError("--debug runs your COMMAND under debugpy: add -- COMMAND ARGS, e.g. -- python app.py")
        local = LocalCommand(
            tuple(command),
            watch=() if no_watch or not command else (watch or (".",)),
            debug_port=debug_port if debug or debug_wait else None,
            debug_wait=debug_wait,
        )
        code = asyncio.run(start_api(options, local, report))
    except InterceptError as e:
        _fail(e)
    sys.exit(code)


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


if __name__ == "__main__":  # pragma: no cover
    main()
