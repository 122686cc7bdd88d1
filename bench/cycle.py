#!/usr/bin/env python3
"""The agent's own Python cost of one keep-alive request cycle, without sockets or an event loop.

    python bench/cycle.py              # µs per cycle: alice's route held; alice + 100 others
    python bench/cycle.py --n 3000 --reps 15

One :class:`~intercept.agent.proxy.ClientConnection` with transports that do nothing gets
wrk's request (``GET /`` with a Host field, no ``x-dev``) and then nginx's 9-byte response
from its upstream link, again and again; the figure is the fastest of ``--reps`` rounds of
``--n`` cycles, so other processes' load barely moves it. It leaves out what ``bench/run.py``
also counts: the syscalls, the kernel's loopback and the event loop (about three quarters of
row (c)'s CPU per request). The route tables are the ones of run.py's rows (c) and (c100)
(bench/routes.py's mix). It measures the tree it sits in: copy it into an older checkout to
compare (the before/after table in bench/README.md was made that way).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from intercept.agent.proxy import ClientConnection  # noqa: E402
from intercept.routing.match import Route, RouteTable, parse_rule  # noqa: E402
from routes import other_routes  # noqa: E402  (bench/routes.py, beside this script)

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:41809\r\n\r\n"  # what wrk sends
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 02:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 9\r\nConnection: keep-alive\r\n"
    b"X-App: upstream\r\n\r\nupstream\n"
)  # what the bench's upstream nginx answers


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Link(_Transport):
    pooled = False
    reusable = True

    def write_eof(self) -> None:
        pass


class _Agent:
    """The little of :class:`~intercept.agent.agent.Agent` that a connection reads."""

    pool = None
    h2 = None
    forwarded_headers = False
    max_connections = 0
    fresh_connections = 0

    def __init__(self, routes: RouteTable) -> None:
        self.routes = routes
        self.connections: weakref.WeakSet[ClientConnection] = weakref.WeakSet()
        self.link = _Link()

    async def open_upstream(self, owner: ClientConnection) -> _Link:
        return self.link

    async def open_developer(self, route: object, owner: ClientConnection) -> _Link:
        raise AssertionError("no request of this benchmark matches a route")


def route_table(others: int) -> RouteTable:
    table = RouteTable()
    table.add("s0", "alice", Route(frozenset([parse_rule("header", "x-dev=alice")])))
    for i, route in enumerate(other_routes(others)):  # the mix run.py's (c100) registers
        table.add(f"s{i + 1}", f"dev-{i}", route)
    return table


async def cycle_us(others: int, n: int, reps: int) -> float:
    agent = _Agent(route_table(others))
    conn = ClientConnection(agent)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    conn.data_received(REQUEST)
    for _ in range(5):  # the first request opens the upstream link (a task)
        await asyncio.sleep(0)
    conn.link_data(agent.link, RESPONSE)
    request, response = conn.data_received, conn.link_data
    link = agent.link
    best = float("inf")
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                request(REQUEST)
                response(link, RESPONSE)
            best = min(best, (time.perf_counter() - t0) / n)
    finally:
        gc.enable()
    return best * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="cycles per round (default 3000)")
    ap.add_argument("--reps", type=int, default=15, help="rounds; the fastest counts (default 15)")
    args = ap.parse_args()
    one = await cycle_us(0, args.n, args.reps)
    hundred = await cycle_us(100, args.n, args.reps)
    print(f"µs per request cycle: {one:.2f} with alice's route, {hundred:.2f} with 100 other routes")


if __name__ == "__main__":
    asyncio.run(main())
