"""Cluster access for the local process: what a connection through the tunnel costs (loopback only).

    python bench/access.py [--rounds 300] [--megabytes 256]

A Redis-speaking stand-in (answers ``PING`` with ``+PONG``) and a sink listen on 127.0.0.1;
a real agent (``intercept agent --allow-outbound``) runs beside them; the local side is the
product's own path (:class:`intercept.access.forward.ServiceListeners` on 127.77.0.1 over an
SSH ``direct-tcpip`` channel per connection). Measured, each as the median of ``rounds``:

- connect -> first byte of the ``PING`` reply, direct and through the tunnel;
- MB/s of one tunnelled connection sending ``megabytes`` to the sink (and direct, for scale).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from intercept.access.forward import ServiceListeners
from intercept.access.names import Entry
from intercept.client.outbound import SSHDialer
from intercept.client.session import AgentSession, InterceptOptions
from intercept.client.transport import DirectTransport
from intercept.credentials import load
from intercept.routing.match import Route

CHUNK = 256 * 1024


async def pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(64):
        writer.write(b"+PONG\r\n")
    writer.close()


async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(CHUNK):
        total += len(data)
    writer.write(b"%d\n" % total)
    await writer.drain()
    writer.close()


async def first_byte(host: str, port: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"*1\r\n$4\r\nPING\r\n")
    await reader.readexactly(1)
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


async def throughput(host: str, port: int, megabytes: int) -> float:
    block = b"x" * CHUNK
    reader, writer = await asyncio.open_connection(host, port)
    started = time.perf_counter()
    for _ in range(megabytes * 1024 * 1024 // CHUNK):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    total = int(await reader.readline())
    elapsed = time.perf_counter() - started
    writer.close()
    return total / elapsed / 1e6


async def main(rounds: int, megabytes: int) -> dict:
    pong_server = await asyncio.start_server(pong, "127.0.0.1", 0)
    sink_server = await asyncio.start_server(sink, "127.0.0.1", 0)
    pong_port, sink_port = pong_server.sockets[0].getsockname()[1], sink_server.sockets[0].getsockname()[1]
    state = Path(tempfile.mkdtemp(prefix="intercept-bench-"))
    agent = subprocess.Popen([sys.executable, "-m", "intercept", "agent", "--listen", "127.0.0.1:0", "--ssh-listen",
                              "127.0.0.1:0", "--upstream", f"127.0.0.1:{pong_port}", "--credentials",
                              str(state / "c.json"), "--allow-outbound"], stdout=subprocess.PIPE, text=True)
    line = await asyncio.to_thread(agent.stdout.readline)
    ssh = line.split(" ssh ")[1].split()[0]
    host, port = ssh.rsplit(":", 1)
    session = AgentSession(InterceptOptions(DirectTransport(host, int(port)), load(state / "c.json"), Route(frozenset()),
                                            "bench", 1))
    await session.open_unrouted()
    listeners = ServiceListeners(SSHDialer(lambda: session.conn), lambda line, warning: print(line, file=sys.stderr))
    await listeners.update([Entry("bench/redis", None, "127.77.0.1", ("redis",), "127.0.0.1", (pong_port, sink_port))])
    try:
        for _ in range(20):  # warm up both paths
            await first_byte("127.0.0.1", pong_port)
            await first_byte("127.77.0.1", pong_port)
        direct = [await first_byte("127.0.0.1", pong_port) for _ in range(rounds)]
        tunnel = [await first_byte("127.77.0.1", pong_port) for _ in range(rounds)]
        return {
            "rounds": rounds,
            "first_byte_direct_ms": round(statistics.median(direct) * 1e3, 3),
            "first_byte_tunnel_ms": round(statistics.median(tunnel) * 1e3, 3),
            "first_byte_tunnel_p90_ms": round(statistics.quantiles(tunnel, n=10)[-1] * 1e3, 3),
            "megabytes": megabytes,
            "mb_per_s_direct": round(await throughput("127.0.0.1", sink_port, megabytes), 1),
            "mb_per_s_tunnel": round(await throughput("127.77.0.1", sink_port, megabytes), 1),
        }
    finally:
        await listeners.close()
        await session.close()
        agent.terminate()
        agent.wait()
        pong_server.close()
        sink_server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--megabytes", type=int, default=256)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.rounds, args.megabytes)), indent=2))
