#!/usr/bin/env python3
"""Benchmark the agent's HTTP/2 path against nginx grpc_pass, with h2load, in one run on loopback.

    python bench/grpc.py              # h2load -c64 -m1, 10 s per row
    python bench/grpc.py --quick      # 3 s per row

Rows (see bench/README.md, "gRPC and HTTP/2"):
  (a)  h2load -> app                                              (the floor)
  (b)  h2load -> nginx grpc_pass, a map on x-dev -> app           (the yardstick)
  (c0) h2load -> agent, no route registered -> app                (the relay)
  (c)  h2load -> agent, alice's route registered, not matched -> app
  (d)  h2load (x-dev: alice) -> agent -> SSH -> intercept start -> local app

Each request is a unary gRPC call (POST, content-type application/grpc, a framed
16-byte message); the apps are nginx over h2c answering a framed message with the
trailer grpc-status: 0, so they are not the bottleneck. Needs h2load (Debian
nghttp2-client), nginx (nginx-light) and taskset; the helpers come from bench/run.py.
Reported: req/s, p50 and p99 (from h2load's per-request log), CPU of the proxy per
call, and the agent's RSS after each row.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402  (bench/run.py: the shared process and measurement helpers)
    HEADER,
    Pinning,
    Procs,
    busy_ticks,
    children_ticks,
    free_port,
    log,
    rss_mb,
    tree_ticks,
    wait_quiet,
)

ROWS = {
    "a": "(a) direct to the app",
    "b": "(b) nginx grpc_pass + map",
    "c0": "(c0) agent, no route registered (relay)",
    "c": "(c) agent, route registered, not matched",
    "d": "(d) agent, x-dev: alice -> SSH",
}
PATH = "/bench.Echo/Unary"

APP = """
    # A gRPC app that is not the bottleneck: every call is answered with the same framed
    # message and grpc-status 0 as a trailer (a POST to a static file is a 405, turned
    # into that 200 answer).
    server {
        listen 127.0.0.1:${PORT} http2 backlog=4096;
        http2_max_concurrent_streams 1024;
        location / {
            client_max_body_size 0;
            error_page 405 =200 /reply.bin;
            return 405;
        }
        location = /reply.bin {
            root ${DIR};
            default_type application/grpc;
            add_header x-app ${NAME} always;
            add_trailer grpc-status 0 always;
            sendfile off;  # trailers follow a body sent through the HTTP/2 output filters
        }
    }
"""

ROUTER = """
    # Row (b): nginx doing the agent's job for gRPC: a map on x-dev picks the backend,
    # grpc_pass over kept-alive HTTP/2 connections.
    map $http_x_dev $backend {
        default upstream_app;
        alice   local_app;
    }
    upstream upstream_app {
        server 127.0.0.1:${UPSTREAM_PORT};
        keepalive 64;
    }
    upstream local_app {
        server 127.0.0.1:${LOCAL_PORT};
        keepalive 64;
    }
    server {
        listen 127.0.0.1:${PORT} http2 backlog=4096;
        http2_max_concurrent_streams 1024;
        location / {
            grpc_pass grpc://$backend;
        }
    }
"""


def framed(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def nginx_app(procs: Procs, name: str, port: int) -> None:
    server = APP.replace("${PORT}", str(port)).replace("${DIR}", str(procs.tmp)).replace("${NAME}", name)
    procs.nginx(name, server, port)


def nginx_router(procs: Procs, port: int, upstream_port: int, local_port: int) -> None:
    server = ROUTER.replace("${PORT}", str(port)).replace("${UPSTREAM_PORT}", str(upstream_port)).replace("${LOCAL_PORT}", str(local_port))
    procs.nginx("router", server, port)


class Result:
    def __init__(self, rps: float, p50: float, p99: float, mean: float, done: int, failed: int, cpu: dict[str, float]) -> None:
        self.rps, self.p50, self.p99, self.mean, self.done, self.failed, self.cpu = rps, p50, p99, mean, done, failed, cpu
        self.other_cpu = 0.0  # CPU used by processes not of this benchmark during the run, % of one CPU


def h2load(procs: Procs, port: int, args: argparse.Namespace, duration: float, header: bool, app: str | None) -> Result:
    """One h2load run; checks that every call succeeded (and, with ``app``, reached it)."""
    logfile = procs.tmp / "h2load.log"
    argv = [
        "h2load", "-t1", f"-c{args.connections}", f"-m{args.streams}", f"-D{duration:g}", f"--warm-up-time={args.warmup:g}",
        "-d", str(procs.tmp / "request.bin"), "-H", "content-type: application/grpc", "-H", "te: trailers",
        "--log-file", str(logfile),
    ]  # fmt: skip
    if header:
        argv += ["-H", f"{HEADER[0]}: {HEADER[1]}"]
    argv.append(f"http://127.0.0.1:{port}{PATH}")
    hz = os.sysconf("SC_CLK_TCK")
    watched = {name: tree_ticks([pid]) for name, pid in procs.watch.items()}
    roots = [p.pid for p in procs.children if p.poll() is None]
    others = busy_ticks() - tree_ticks(roots) - children_ticks()
    t0 = time.monotonic()
    out = subprocess.run(procs.pin.prefix("dev") + argv, capture_output=True, text=True, timeout=duration + args.warmup + 120)
    elapsed = time.monotonic() - t0
    others = busy_ticks() - tree_ticks(roots) - children_ticks() - others
    if out.returncode != 0:
        raise RuntimeError(f"h2load failed: {out.stdout[-1500:]} {out.stderr[-500:]}")
    cpu = {name: 100 * (tree_ticks([procs.watch[name]]) - t) / hz / elapsed for name, t in watched.items()}
    text = out.stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)[1])
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
    done, failed = int(m[3]), int(m[3]) - int(m[4])
    if failed > done / 100:
        raise RuntimeError(f"h2load saw failures:\n{text[-1500:]}")
    # h2load 1.52 logs only part of the requests when streams are multiplexed (-m > 1, with
    # some garbage lines): percentiles are given only from a complete log
    rows = [line.split() for line in logfile.read_text().splitlines()]
    latencies = sorted(int(r[2]) for r in rows if len(r) == 3 and r[1] == "200")
    if latencies and len(latencies) >= 0.95 * int(m[4]):
        p50 = statistics.median(latencies) / 1000
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000
    else:
        p50 = p99 = float("nan")
    t = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", text)
    mean = float(t[5]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[t[6]]
    result = Result(rps, p50, p99, mean, done, failed, cpu)
    result.other_cpu = max(0.0, 100 * others / hz / elapsed)
    return result


def check_route(procs: Procs, port: int, header: bool, expect: str) -> None:
    """One call with h2load -n1, its response headers printed (-v): it must reach ``expect``."""
    argv = ["h2load", "-n1", "-c1", "-v", "-d", str(procs.tmp / "request.bin"), "-H", "content-type: application/grpc"]
    if header:
        argv += ["-H", f"{HEADER[0]}: {HEADER[1]}"]
    out = subprocess.run(argv + [f"http://127.0.0.1:{port}{PATH}"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"x-app: (\S+)", out)
    if m is None or m[1] != expect or "1 succeeded" not in out:
        raise RuntimeError(f"a call through :{port} (header={header}) reached {m and m[1]!r}, expected {expect!r}:\n{out[-1500:]}")


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--duration", type=float, help="seconds per row (default 10, 3 with --quick)")
    ap.add_argument("-c", "--connections", type=int, default=64, help="h2load connections (default 64)")
    ap.add_argument("-m", "--streams", type=int, default=1,
                    help="concurrent streams per connection (default 1: h2load 1.52 logs only part of the requests "
                    "of multiplexed streams, so p50/p99 are shown only with -m1)")
    ap.add_argument("--warmup", type=float, help="h2load warm-up seconds (default 2, 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="3 s per row, 1 s warm-up (unless -d, --warmup say)")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="seconds to wait, before each row, for other processes to calm down (default 30)")
    ap.add_argument("--rows", default="a,b,c0,c,d", help="rows to measure (default a,b,c0,c,d)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the rows, interleaved; each row reports its fastest round (default 1)")
    ap.add_argument("--pin", default="auto", help="as bench/run.py: auto, none, or POD_CPUS/DEV_CPUS")
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    for tool in ("h2load", "nginx") + (("taskset",) if args.pin != "none" else ()):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not on PATH (apt-get install -y nghttp2-client nginx-light util-linux)")
    ncpu = os.cpu_count() or 1
    if args.pin == "none" or (args.pin == "auto" and ncpu < 2):
        pin = Pinning()
    elif args.pin == "auto":
        pin = Pinning("0", f"1-{ncpu - 1}" if ncpu > 2 else "1")
    else:
        pod, _, dev = args.pin.partition("/")
        pin = Pinning(pod, dev)
    tmp = Path(tempfile.mkdtemp(prefix="intercept-bench-grpc-"))
    procs = Procs(tmp, pin)
    try:
        return run(procs, args)
    finally:
        procs.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run(procs: Procs, args: argparse.Namespace) -> int:
    rows = args.rows.split(",")
    (procs.tmp / "request.bin").write_bytes(framed(b"0123456789abcdef"))
    (procs.tmp / "reply.bin").write_bytes(framed(b"fedcba9876543210"))
    up_port, local_port, router_port = free_port(), free_port(), free_port()
    nginx_app(procs, "upstream", up_port)
    nginx_app(procs, "local", local_port)
    nginx_router(procs, router_port, up_port, local_port)
    agent, http_port, ssh_port, _ = procs.agent(up_port)
    procs.watch["agent"] = agent.pid
    procs.watch["router"] = procs.children[2].pid
    log(f"pinning: {procs.pin.describe()}")
    every: dict[str, list[Result]] = {}
    rss: dict[str, float] = {"start": rss_mb(agent.pid)}

    def measure(row: str, port: int, header: bool, expect: str) -> None:
        check_route(procs, port, header, expect)
        other = wait_quiet(procs, 2.5, args.quiet_wait)
        log(f"{ROWS[row]}: h2load for {args.duration:g}s (other processes: {other:.0f}% CPU)")
        r = h2load(procs, port, args, args.duration, header, expect)
        every.setdefault(row, []).append(r)
        rss[row] = rss_mb(agent.pid)
        log(f"{ROWS[row]}: {r.rps:,.0f} req/s, p50 {_ms(r.p50)} ms, p99 {_ms(r.p99)} ms, others {r.other_cpu:.0f}%")

    for rnd in range(args.repeat):
        if "a" in rows:
            measure("a", up_port, False, "upstream")
        if "b" in rows:
            measure("b", router_port, False, "upstream")
        if "c0" in rows:
            measure("c0", http_port, False, "upstream")  # no route: alice's session is not there
        client = procs.client(ssh_port, local_port)
        procs.watch["client"] = client.pid
        if "c" in rows:
            measure("c", http_port, False, "upstream")
        if "d" in rows:
            measure("d", http_port, True, "local")
        if rnd + 1 < args.repeat:
            procs.stop(client)  # its route goes with it: (c0) relays again
            procs.watch.pop("client")
    # other processes only ever slow a row down: each row reports its fastest round
    results = {row: max(runs, key=lambda r: r.rps) for row, runs in every.items()}

    base = results.get("b")
    print(f"h2load -t1 -c{args.connections} -m{args.streams} -D{args.duration:g}, unary gRPC calls (16-byte messages); "
          f"{procs.pin.describe()}" + (f"; the fastest of {args.repeat} rounds per row" if args.repeat > 1 else "") + "\n")
    print("| row | req/s | vs nginx | p50 ms | p99 ms | p99 vs nginx | mean ms | failed | proxy CPU µs/call | others' CPU % "
          "| agent RSS MB after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, r in results.items():
        names = {"a": [], "b": ["router"], "c0": ["agent"], "c": ["agent"], "d": ["agent", "client"]}[row]
        us = sum(r.cpu.get(n, 0) for n in names) / 100 / r.rps * 1e6 if names else 0
        vs = f"{r.rps / base.rps:.2f}x" if base else "-"
        p99 = f"{r.p99 / base.p99:.2f}x" if base and base.p99 == base.p99 and r.p99 == r.p99 else "-"
        print(f"| {ROWS[row]} | {r.rps:,.0f} | {vs} | {_ms(r.p50)} | {_ms(r.p99)} | {p99} | {r.mean:.2f} | {r.failed} | {us:.0f} "
              f"| {r.other_cpu:.0f} | {rss.get(row, 0):.1f} |")
    if args.repeat > 1:
        print("\nAll rounds, req/s (others' CPU %): " + "; ".join(
            f"({row}) " + ", ".join(f"{r.rps:,.0f} ({r.other_cpu:.0f})" for r in runs) for row, runs in every.items()) + ".")
    print(f"\nAgent RSS: {rss['start']:.1f} MB at start, {rss_mb(agent.pid):.1f} MB at the end.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
