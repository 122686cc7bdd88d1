"""Cluster access without a cluster, as a process: the tests' stand-in for ``intercept connect``.

    python -m tests.access_driver --agent H:P --credentials FILE --mode MODE \
        --service NAME=PORT ... [--later NAME=PORT] [-- COMMAND ...]

Services of namespace ``shop`` are ExternalName Services whose target is 127.0.0.1 (what
the agent, on this machine, can dial); ``--later`` ones are created on SIGUSR1. The real
product path from there on: :func:`intercept.access.reach.open_access` through a real
agent's ``direct-tcpip``, in the mode asked. Prints the ``access`` lines, then ``ready``;
with a COMMAND, exits with its status; else runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from intercept.access.reach import AccessPlan, open_access
from intercept.client.outbound import SSHDialer
from intercept.client.runner import LocalProcess
from intercept.client.session import AgentSession, InterceptOptions
from intercept.client.transport import DirectTransport
from intercept.credentials import load
from intercept.routing.match import Route


def service(spec: str) -> dict:
    name, port = spec.split("=")
    return {"kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "127.0.0.1", "ports": [{"port": int(port), "protocol": "TCP"}]}}


async def main(args: argparse.Namespace) -> int:
    host, port = args.agent.rsplit(":", 1)
    session = AgentSession(InterceptOptions(DirectTransport(host, int(port)), load(args.credentials), Route(frozenset()),
                                            "driver", 1))
    await session.open_unrouted()
    later = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, later.set)

    async def changes():
        yield [("list", "Service", "shop", [service(s) for s in args.service]), ("list", "EndpointSlice", "shop", [])]
        await later.wait()
        yield [("event", {"type": "ADDED", "object": service(s)}) for s in args.later]
        await asyncio.Event().wait()

    access = await open_access(AccessPlan(args.mode, ("shop",), changes), SSHDialer(lambda: session.conn),
                               lambda event: print(event.line(), flush=True), resolver_text="", check=session.check_outbound,
                               for_command=bool(args.command))
    try:
        if args.command:
            process = LocalProcess(args.command[1:] if args.command[0] == "--" else args.command, os.environ,
                                   setup=access.setup)
            await process.start()
            return await process.wait()
        print("ready", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        await access.close()
        await session.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--agent", required=True)
    parser.add_argument("--credentials", required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--service", action="append", default=[])
    parser.add_argument("--later", action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    sys.exit(asyncio.run(main(parser.parse_args())))
