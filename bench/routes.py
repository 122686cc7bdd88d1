#!/usr/bin/env python3
"""Hold other developers' routes on an agent, for bench/run.py's row (c100).

    python bench/routes.py --agent 127.0.0.1:PORT --credentials FILE [--count 100]

One SSH session registers ``--count`` routes, a realistic mix that no benchmark request
matches: a third header rules (``x-dev=dev-N``, some with a second rule on the path),
a third W3C baggage rules (``dev=dev-N``), a third path prefixes (``/team-N/``). It
prints ``routes: N held`` once they are all registered and keeps them until it is
terminated (the agent drops a closed session's routes at once).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from intercept import credentials, protocol  # noqa: E402
from intercept.client.session import AgentSession, InterceptOptions  # noqa: E402
from intercept.client.transport import DirectTransport  # noqa: E402
from intercept.routing.match import Route, parse_rule  # noqa: E402


def other_routes(count: int) -> list[Route]:
    routes = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            rules = [parse_rule("header", f"x-dev=dev-{i}")] + ([parse_rule("path-prefix", "/api")] if i % 2 else [])
        elif kind == 1:
            rules = [parse_rule("baggage", f"dev=dev-{i}")]
        else:
            rules = [parse_rule("path-prefix", f"/team-{i}/")]
        routes.append(Route(frozenset(rules)))
    return routes


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--credentials", required=True)
    ap.add_argument("--count", type=int, default=100)
    args = ap.parse_args()
    host, _, port = args.agent.rpartition(":")
    routes = other_routes(args.count)
    options = InterceptOptions(DirectTransport(host, int(port)), credentials.load(Path(args.credentials)), routes[0],
                               "others", local_port=9)
    session = AgentSession(options)
    await session.open()
    for route in routes[1:]:
        reply = await session.request(protocol.Register(route.to_json(), False, None))
        if isinstance(reply, protocol.Refusal):
            sys.exit(f"routes: refused: {reply.message}")
    print(f"routes: {len(routes)} held", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await session.close()


if __name__ == "__main__":
    asyncio.run(main())
