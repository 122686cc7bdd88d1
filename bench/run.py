#!/usr/bin/env python3
"""Benchmark the agent against nginx doing the same header routing, in one run on loopback.

    python bench/run.py              # wrk -t1 -c16 -d10s per row, 100 MB bodies
    python bench/run.py --quick      # 3 s per row
    python bench/run.py --help

Rows (see bench/README.md):
  (a) wrk -> upstream app                                   (the floor: no proxy at all)
  (b) wrk -> nginx routing on x-dev with a map -> upstream  (the yardstick)
  (h) wrk -> HAProxy routing on x-dev with an ACL -> upstream (the second yardstick)
  (g) wrk -> Go net/http ReverseProxy routing on x-dev -> upstream (the Go-class anchor)
  (c) wrk -> agent -> upstream                              (requests without the header)
  (c100) as (c), with 100 other developers' routes held     (bench/routes.py)
  (cstd) as (c), the agent on the standard asyncio loop     (no uvloop: `pip install intercept`)
  (d) wrk -> agent -> SSH -> intercept client -> local app  (requests with x-dev: alice)

The apps and the router are nginx (worker_processes 1, keep-alive, access_log off), so
they are not the bottleneck. Needs wrk, nginx (nginx-light), haproxy and curl on PATH,
and Go for row (g) (bench/goproxy.go, built into ~/.cache/intercept-bench; without Go the
row is left out, saying so); stdlib only.
Reported: req/s, p50, p99 (wrk --latency), the agent's RSS after each row, the agent's
RSS with 200 open keep-alive connections, and MB/s for a 100 MB body each way.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEADER = ("x-dev", "alice")
MB = 1_000_000  # MB/s as curl and wrk count them (10^6 bytes)

ROWS = {
    "a": "(a) direct to upstream",
    "b": "(b) nginx map routing",
    "h": "(h) HAProxy ACL routing",
    "g": "(g) Go net/http ReverseProxy routing",
    "c": "(c) agent, no header",
    "c100": "(c100) agent, no header, 100 other routes",
    "cstd": "(cstd) agent on asyncio (no uvloop), no header",
    "d": "(d) agent, x-dev: alice -> SSH",
}
# (g) is not among them: the apps answer POST /sink before reading the body (nginx's return 200),
# and net/http's server stops reading a request body once the proxy's handler has returned,
# so Go's upload ends mid-body where nginx, HAProxy and the agent stream it to its end
BULK_ROWS = ("a", "b", "h", "c", "d")
# which watched processes make up each row's proxy (their CPU is the row's "proxy CPU")
PROXY = {"a": [], "b": ["router"], "h": ["haproxy"], "g": ["goproxy"], "c": ["agent"], "c100": ["agent"], "cstd": ["agent_std"],
         "d": ["agent", "client"]}
HAPROXY_CONFIG = """
# Row (h): the agent's job done by HAProxy, one thread on the pod's CPU: x-dev: alice to the
# local app, everything else to the upstream, over reused keep-alive server connections.
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    http-reuse always
    option http-keep-alive
frontend bench
    bind 127.0.0.1:${PORT}
    use_backend local_app if { req.hdr(x-dev) -m str alice }
    default_backend upstream_app
backend upstream_app
    server upstream 127.0.0.1:${UPSTREAM_PORT} maxconn 1000
backend local_app
    server local 127.0.0.1:${LOCAL_PORT} maxconn 1000
"""


# -- small helpers ------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s") from None
            time.sleep(0.05)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def rss_mb(pid: int) -> float:
    return proc_status(pid)["VmRSS"] / 1024


def hwm_mb(pid: int) -> float:
    return proc_status(pid)["VmHWM"] / 1024


def busy_ticks() -> int:
    """Non-idle CPU time of the whole machine, in clock ticks (/proc/stat)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq + steal


def tree_ticks(roots: list[int]) -> int:
    """utime + stime of ``roots`` and their descendants (nginx workers), in clock ticks."""
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                raw = (d / "stat").read_text()
                f = raw[raw.rindex(")") + 2 :].split()
                stats[int(d.name)] = (int(f[1]), int(f[11]) + int(f[12]))  # ppid, utime + stime
    ours, grew = set(roots), True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return sum(stats[pid][1] for pid in ours if pid in stats)


def children_ticks() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * os.sysconf("SC_CLK_TCK")


def http_get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers.get("X-App", ""), r.read().decode()


# -- processes ----------------------------------------------------------------------------


@dataclass
class Pinning:
    """CPU sets: ``pod`` for the agent, the upstream app and the nginx router; ``dev`` for
    wrk, the intercept client and the local app (the load generator and the developer's
    machine). Empty sets mean no pinning."""

    pod: str = ""
    dev: str = ""

    def prefix(self, where: str) -> list[str]:
        cpus = self.pod if where == "pod" else self.dev
        return ["taskset", "-c", cpus] if cpus else []

    def describe(self) -> str:
        if not self.pod:
            return "no CPU pinning"
        return f"agent, upstream app, nginx router on CPU {self.pod}; wrk, curl, intercept client, local app on CPU {self.dev}"


@dataclass
class Procs:
    tmp: Path
    pin: Pinning
    what_if: str = ""  # changes for bench/whatif.py; "" runs intercept as it is
    children: list[subprocess.Popen] = field(default_factory=list)
    watch: dict[str, int] = field(default_factory=dict)  # processes whose CPU use each row reports
    files: list = field(default_factory=list)

    def logfile(self, name: str):
        f = open(self.tmp / name, "wb")  # noqa: SIM115  (closed in stop_all)
        self.files.append(f)
        return f

    def spawn(self, argv: list[str], where: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.pin.prefix(where) + argv, **kw)
        self.children.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self) -> None:
        for p in reversed(self.children):
            with contextlib.suppress(Exception):
                self.stop(p)
        for f in self.files:
            f.close()

    def nginx(self, name: str, server: str, port: int) -> subprocess.Popen:
        tmpl = string.Template((HERE / "nginx.conf.template").read_text())
        conf = self.tmp / f"{name}.conf"
        conf.write_text(tmpl.safe_substitute(DIR=self.tmp, NAME=name, SERVER=server))
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.tmp / f"{name}.{sub}").mkdir(exist_ok=True)
        where = "dev" if name == "local" else "pod"
        p = self.spawn(
            ["nginx", "-p", str(self.tmp), "-e", str(self.tmp / f"{name}.error.log"), "-c", str(conf), "-g", "daemon off;"],
            where,
            stdout=subprocess.DEVNULL,
            stderr=self.logfile(f"{name}.stderr"),
        )
        try:
            wait_port(port)
        except RuntimeError:
            raise RuntimeError(f"nginx {name} did not start: {(self.tmp / f'{name}.stderr').read_text()}") from None
        return p

    def app(self, name: str, port: int, big: Path) -> subprocess.Popen:
        server = string.Template((HERE / "app.server.template").read_text()).safe_substitute(NAME=name, PORT=port, BIG=big)
        return self.nginx(name, server, port)

    def haproxy(self, port: int, upstream_port: int, local_port: int) -> subprocess.Popen:
        conf = self.tmp / "haproxy.cfg"
        conf.write_text(string.Template(HAPROXY_CONFIG).safe_substitute(PORT=port, UPSTREAM_PORT=upstream_port, LOCAL_PORT=local_port))
        p = self.spawn(["haproxy", "-db", "-f", str(conf)], "pod", stdout=subprocess.DEVNULL, stderr=self.logfile("haproxy.stderr"))
        try:
            wait_port(port)
        except RuntimeError:
            raise RuntimeError(f"haproxy did not start: {(self.tmp / 'haproxy.stderr').read_text()}") from None
        return p

    def goproxy(self, binary: Path, port: int, upstream_port: int, local_port: int) -> subprocess.Popen:
        """Row (g): bench/goproxy.go on one core (GOMAXPROCS=1) of the pod's CPUs."""
        p = self.spawn([str(binary), f"127.0.0.1:{port}", f"127.0.0.1:{upstream_port}", f"127.0.0.1:{local_port}"], "pod",
                       stdout=subprocess.DEVNULL, stderr=self.logfile("goproxy.stderr"), env={**os.environ, "GOMAXPROCS": "1"})
        try:
            wait_port(port)
        except RuntimeError:
            raise RuntimeError(f"goproxy did not start: {(self.tmp / 'goproxy.stderr').read_text()}") from None
        return p

    def router(self, port: int, upstream_port: int, local_port: int) -> subprocess.Popen:
        server = string.Template((HERE / "router.server.template").read_text()).safe_substitute(
            PORT=port, UPSTREAM_PORT=upstream_port, LOCAL_PORT=local_port
        )
        return self.nginx("router", server, port)

    def intercept(self) -> list[str]:
        if self.what_if:
            return [sys.executable, str(HERE / "whatif.py"), self.what_if]
        return [sys.executable, "-m", "intercept"]

    def agent(self, upstream_port: int, *, stdlib_loop: bool = False) -> tuple[subprocess.Popen, int, int, float]:
        """An agent; returns it, its HTTP and SSH ports, and the seconds from spawn to listening.

        ``stdlib_loop``: as installed without the ``fast`` extra (uvloop cannot be imported)."""
        command = self.intercept()
        if stdlib_loop:
            command = [sys.executable, "-c", "import sys; sys.modules['uvloop'] = None; from intercept.cli import main; "
                       "sys.argv[0] = 'intercept'; main()"]
        argv = [
            *command, "-v", "agent",
            "--listen", "127.0.0.1:0", "--ssh-listen", "127.0.0.1:0",
            "--upstream", f"127.0.0.1:{upstream_port}",
            "--credentials", str(self.tmp / "agent-credentials.json"),
        ]  # fmt: skip
        name = "agent-asyncio.log" if stdlib_loop else "agent.log"
        t0 = time.monotonic()
        p = self.spawn(argv, "pod", stdout=subprocess.PIPE, stderr=self.logfile(name), text=True, cwd=ROOT)
        line = read_line(p, "intercept: agent:", 30, self.tmp / name)
        started = time.monotonic() - t0
        m = re.search(r"http [^ ]+:(\d+) ssh [^ ]+:(\d+)", line)
        return p, int(m[1]), int(m[2]), started

    def other_routes(self, ssh_port: int, count: int) -> subprocess.Popen:
        """bench/routes.py holding ``count`` other developers' routes on the agent."""
        argv = [sys.executable, str(HERE / "routes.py"), "--agent", f"127.0.0.1:{ssh_port}",
                "--credentials", str(self.tmp / "agent-credentials.json"), "--count", str(count)]
        p = self.spawn(argv, "dev", stdout=subprocess.PIPE, stderr=self.logfile("routes.log"), text=True, cwd=ROOT)
        read_line(p, "routes:", 30, self.tmp / "routes.log")
        return p

    def client(self, ssh_port: int, local_port: int) -> subprocess.Popen:
        argv = [
            *self.intercept(), "-v", "start",
            "--agent", f"127.0.0.1:{ssh_port}",
            "--credentials", str(self.tmp / "agent-credentials.json"),
            "--port", str(local_port), "--header", f"{HEADER[0]}={HEADER[1]}", "--name", "alice",
        ]  # fmt: skip
        p = self.spawn(argv, "dev", stdout=subprocess.PIPE, stderr=self.logfile("client.log"), text=True, cwd=ROOT)
        read_line(p, "intercept: ready:", 30, self.tmp / "client.log")
        return p


def read_line(p: subprocess.Popen, prefix: str, timeout: float, logfile: Path) -> str:
    """The first stdout line of ``p`` that starts with ``prefix``; the rest of stdout is drained."""
    found: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        for line in p.stdout:
            if not found and line.startswith(prefix):
                found.append(line.strip())
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    if not ready.wait(timeout) or not found:
        raise RuntimeError(f"no {prefix!r} line from {p.args}: {logfile.read_text()[-2000:]}")
    return found[0]


# -- wrk ----------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50: float  # ms
    p99: float  # ms
    requests: int
    errors: str  # "" when none
    other_cpu: float = 0.0  # CPU used by processes not of this benchmark during the run, % of one CPU
    cpu: dict[str, float] = field(default_factory=dict)  # CPU of the agent, the client, the nginx router, % of one CPU

    def proxy_us(self, row: str) -> float:
        """CPU time the proxy spent per request, µs: nginx router (b), HAProxy (h), agent (c), agent + client (d)."""
        names = PROXY[row]
        return sum(self.cpu[n] for n in names) / 100 / self.rps * 1e6 if names else 0.0

    def proxy_cpu(self, row: str) -> float:
        return sum(self.cpu[n] for n in PROXY[row] if n != "client")

    @staticmethod
    def parse(out: str) -> WrkResult:
        def latency(pct: str) -> float:
            m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
            if m is None:
                raise RuntimeError(f"wrk output without the {pct}% latency:\n{out}")
            return float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[m[2]]

        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
        requests = int(re.search(r"(\d+) requests in", out)[1])
        errors = []
        if m := re.search(r"Socket errors: (.*)", out):
            errors.append("socket " + m[1].strip())
        if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
            errors.append(f"{m[1]} non-2xx")
        return WrkResult(rps, latency("50"), latency("99"), requests, "; ".join(errors))


def wait_quiet(procs: Procs, limit: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until other processes use under ``limit`` % of one CPU; returns their last use."""
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + max_wait
    while True:
        roots = [p.pid for p in procs.children if p.poll() is None]
        before, t0 = busy_ticks() - tree_ticks(roots), time.monotonic()
        time.sleep(0.5)
        other = 100 * (busy_ticks() - tree_ticks(roots) - before) / hz / (time.monotonic() - t0)
        if other < limit or time.monotonic() > deadline:
            return other
        log(f"other processes use {other:.0f}% CPU; waiting for a quieter moment")
        time.sleep(2)


def wrk(procs: Procs, port: int, args: argparse.Namespace, duration: float, header: bool) -> WrkResult:
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency", "--timeout", "5s"]
    if header:
        argv += ["-H", f"{HEADER[0]}: {HEADER[1]}"]
    if args.connection_close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    roots = [p.pid for p in procs.children if p.poll() is None]
    hz = os.sysconf("SC_CLK_TCK")
    before = busy_ticks() - tree_ticks(roots) - children_ticks()
    watched = {name: tree_ticks([pid]) for name, pid in procs.watch.items()}
    t0 = time.monotonic()
    out = subprocess.run(procs.pin.prefix("dev") + argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    elapsed = time.monotonic() - t0
    watched = {name: tree_ticks([procs.watch[name]]) - t for name, t in watched.items()}
    other = busy_ticks() - tree_ticks(roots) - children_ticks() - before
    result = WrkResult.parse(out.stdout)
    result.other_cpu = max(0.0, 100 * other / hz / elapsed)
    result.cpu = {name: 100 * t / hz / elapsed for name, t in watched.items()}
    return result


# -- open connections and bulk bodies -------------------------------------------------------


def hold_connections(port: int, n: int, header: bool) -> list[socket.socket]:
    """Open ``n`` keep-alive connections, complete one request on each, keep them open."""
    extra = f"{HEADER[0]}: {HEADER[1]}\r\n" if header else ""
    request = f"GET / HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(request)
        socks.append(s)
    for s in socks:
        data = b""
        while True:
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", data[:head_end], re.I)
                if m and len(data) >= head_end + 4 + int(m[1]):
                    break
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed before the response")
            data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response {data[:80]!r}")
    return socks


def curl_bulk(procs: Procs, port: int, direction: str, header: bool, big: Path, expect_app: str) -> float:
    """MB/s of one 100 MB body: ``get`` downloads /big, ``post`` uploads to /sink."""
    headers_file = procs.tmp / "curl.headers"
    argv = ["curl", "-sS", "--max-time", "300", "-o", "/dev/null", "-D", str(headers_file)]
    if header:
        argv += ["-H", f"{HEADER[0]}: {HEADER[1]}"]
    if direction == "get":
        argv += ["-w", "%{http_code} %{size_download} %{speed_download}", f"http://127.0.0.1:{port}/big"]
    else:
        argv += ["-H", "Expect:", "-X", "POST", "-T", str(big)]
        argv += ["-w", "%{http_code} %{size_upload} %{speed_upload}", f"http://127.0.0.1:{port}/sink"]
    out = subprocess.run(procs.pin.prefix("dev") + argv, capture_output=True, text=True, timeout=400)
    parts = out.stdout.split()
    if out.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != big.stat().st_size:
        raise RuntimeError(f"curl {direction} via :{port} failed: rc={out.returncode} {out.stdout!r} {out.stderr.strip()}")
    app = re.search(r"^x-app:\s*(\S+)", headers_file.read_text(), re.M | re.I)
    if app is None or app[1] != expect_app:
        raise RuntimeError(f"curl {direction} via :{port} reached {app and app[1]!r}, expected {expect_app!r}")
    return float(parts[2]) / MB


# -- profiling (optional; py-spy is not a dependency) --------------------------------------


def profile(procs: Procs, pids: dict[str, int], port: int, args: argparse.Namespace, header: bool, tag: str) -> dict[str, Path]:
    """Run wrk with py-spy recording ``pids``; returns the raw (collapsed) stack files."""
    files = {}
    spies = []
    duration = max(args.duration, 5)
    for name, pid in pids.items():
        out = Path(args.profile) / f"{tag}-{name}.txt"
        files[name] = out
        # --native stops the process at each sample (slower, but shows C frames: libc, uvloop, crypto);
        # without it, sampling does not stop the process and C time counts to the calling Python frame
        mode = ["--native", "-r", "100"] if args.profile_native else ["--nonblocking", "-r", "250"]
        cmd = ["py-spy", "record", *mode, "-d", str(int(duration) + 1), "-f", "raw", "-o", str(out), "-p", str(pid)]
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    time.sleep(0.5)
    result = wrk(procs, port, args, duration, header)
    for spy in spies:
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0:
            log(f"py-spy failed: {err.strip()[-300:]}")
    log(f"profiled {tag}: {result.rps:.0f} req/s under py-spy (not comparable to the table)")
    return files


def _function(frame: str) -> str:
    """``func (/long/path/pkg/file.py:123)`` -> ``func (pkg/file.py)``: one entry per function, not per line."""
    m = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame)
    if m is None:
        return frame
    return f"{m[1]} ({'/'.join(m[2].split('/')[-2:])})"


def summarize_profile(path: Path, top: int = 12) -> str:
    """Self and inclusive sample shares per function, from py-spy's raw (collapsed) output."""
    if not path.exists():
        return f"(no profile at {path})\n"
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";") if f]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"{path.name}: {total} samples", "  self%  incl%  function"]
    for f, n in own.most_common(top):
        lines.append(f"  {100 * n / total:5.1f}  {100 * incl[f] / total:5.1f}  {f}")
    lines.append("  -- top inclusive (frames in nearly every sample left out) --")
    for f, n in [(f, n) for f, n in incl.most_common() if n < 0.97 * total][:top]:
        lines.append(f"  {100 * own[f] / total:5.1f}  {100 * n / total:5.1f}  {f}")
    return "\n".join(lines) + "\n"


# -- the run --------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--duration", type=float, help="seconds per wrk row (default 10, 3 with --quick)")
    ap.add_argument("-c", "--connections", type=int, default=16, help="wrk connections (default 16)")
    ap.add_argument("-t", "--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="3 s per row and 1 s warm-up (unless -d, --warmup say)")
    ap.add_argument("--warmup", type=float, help="seconds of wrk before each row (default 2, 1 with --quick)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the wrk rows, interleaved; each row reports its best measurement, and from 3 rounds on (c100) is also compared with (c) round by round")
    ap.add_argument("--max-other-cpu", type=float, default=5.0, help="a row during which other processes used more CPU (%% of one CPU) is measured again (default 5)")
    ap.add_argument("--quiet-wait", type=float, default=30.0, help="seconds to wait, before each row, for other processes to calm down (default 30)")
    ap.add_argument("--retries", type=int, default=3, help="extra attempts for a disturbed row (default 3)")
    ap.add_argument(
        "--connection-close",
        action="store_true",
        help="wrk sends Connection: close: a new connection per request (not what the targets are about)",
    )
    ap.add_argument("--open-connections", type=int, default=200, help="keep-alive connections held for the RSS figure")
    ap.add_argument("--rows", default="", help="measure only these rows (comma-separated keys: a,b,h,g,c,c100,cstd,d); "
                    "a shortcut while working, the targets table needs them all")
    ap.add_argument("--other-routes", type=int, default=100, help="other developers' routes held during row (c100) (default 100)")
    ap.add_argument("--body-mb", type=int, default=100, help="size of the bulk body, MiB (default 100)")
    ap.add_argument("--bulk-runs", type=int, default=3, help="transfers per row and direction; the median is reported (default 3)")
    ap.add_argument("--no-bulk", action="store_true", help="skip the 100 MB transfers")
    ap.add_argument(
        "--pin",
        default="auto",
        help="CPU pinning: 'auto' (with >= 2 CPUs: agent + upstream + router on CPU 0, wrk + client + local app on the others), "
        "'none', or POD_CPUS/DEV_CPUS such as 0/1",
    )
    ap.add_argument("--profile", metavar="DIR", help="after the table, rerun (c) and (d) under py-spy and write stacks and summaries to DIR")
    ap.add_argument("--profile-native", action="store_true", help="with --profile: py-spy --native (C frames; stops the process at each sample)")
    ap.add_argument(
        "--what-if",
        metavar="CHANGES",
        default="",
        help="run agent and client through bench/whatif.py with these changes (comma-separated: uvloop, no-ignore, none); "
        "measures a possible fix, not intercept as it is",
    )
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    if args.rows:
        keep = set(args.rows.split(",")) | {"b"}  # every row is compared with nginx's
        for row in [r for r in ROWS if r not in keep]:
            del ROWS[row]
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    warmup = args.warmup if args.warmup is not None else 1.0 if args.quick else 2.0

    for tool in ("wrk", "nginx", "haproxy", "curl") + (("taskset",) if args.pin != "none" else ()):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not on PATH (apt-get install -y wrk nginx-light haproxy curl util-linux)")
    if "g" in ROWS and shutil.which("go") is None:
        log("go is not on PATH: row (g), Go's net/http reverse proxy, is left out (https://go.dev/dl/)")
        del ROWS["g"]
    ncpu = os.cpu_count() or 1
    if args.pin == "none" or (args.pin == "auto" and ncpu < 2):
        pin = Pinning()
    elif args.pin == "auto":
        pin = Pinning("0", f"1-{ncpu - 1}" if ncpu > 2 else "1")
    else:
        pod, _, dev = args.pin.partition("/")
        pin = Pinning(pod, dev)

    tmp = Path(tempfile.mkdtemp(prefix="intercept-bench-"))
    procs = Procs(tmp, pin, args.what_if)
    try:
        return run(procs, args, warmup)
    finally:
        procs.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def go_proxy() -> Path | None:
    """bench/goproxy.go built by this machine's Go into ~/.cache/intercept-bench (``$XDG_CACHE_HOME``),
    reused while the source and the Go version are the same; None without Go."""
    go = shutil.which("go")
    if go is None:
        return None
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "", "CGO_ENABLED": "0"}
    version = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=True, env=env).stdout.strip()
    source = HERE / "goproxy.go"
    key = hashlib.sha256(source.read_bytes() + version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "intercept-bench"
    binary = cache / f"goproxy-{key}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".goproxy-{key}.{os.getpid()}"
        log(f"building {source.name} with {version} into {cache}")
        done = subprocess.run([go, "build", "-trimpath", "-o", str(partial), source.name], cwd=HERE, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"go build {source} failed: {done.stderr[-2000:]}")
        partial.rename(binary)
    return binary


def big_file(tmp: Path, mb: int) -> Path:
    """The apps' ``/big`` body, ``mb`` MiB, written so that every row reads it from the page cache."""
    big = tmp / "big.bin"
    with open(big, "wb") as f:
        f.writelines(bytes(range(256)) * 4096 for _ in range(mb))
    return big


def run(procs: Procs, args: argparse.Namespace, warmup: float) -> int:
    tmp = procs.tmp
    big = big_file(tmp, args.body_mb)

    up_port, local_port, router_port, haproxy_port = free_port(), free_port(), free_port(), free_port()
    procs.app("upstream", up_port, big)
    procs.app("local", local_port, big)
    router = procs.router(router_port, up_port, local_port)
    haproxy = procs.haproxy(haproxy_port, up_port, local_port)
    goproxy_port = free_port()
    goproxy = procs.goproxy(go_proxy(), goproxy_port, up_port, local_port) if "g" in ROWS else None
    # the credentials exist before the agent starts, as the injection's Secret holds them in a pod
    from intercept.credentials import Credentials

    credentials = tmp / "agent-credentials.json"
    credentials.write_text(Credentials.generate().to_json())
    credentials.chmod(0o600)
    agent, agent_port, ssh_port, started = procs.agent(up_port)
    time.sleep(1.0)  # settle: the idle figure, not one taken in the middle of start-up
    rss_idle = rss_mb(agent.pid)
    # before any developer has connected (the agent loads its SSH server with the first one)
    socks = hold_connections(agent_port, args.open_connections, False)
    time.sleep(0.5)
    rss_nodev = rss_mb(agent.pid)
    for s in socks:
        s.close()
    agent_std, agent_std_port, _, started_std = procs.agent(up_port, stdlib_loop=True)
    client = procs.client(ssh_port, local_port)
    procs.watch = {"agent": agent.pid, "client": client.pid, "router": router.pid, "haproxy": haproxy.pid,
                   "agent_std": agent_std.pid}
    if goproxy is not None:
        procs.watch["goproxy"] = goproxy.pid
    log(f"agent pid {agent.pid} http :{agent_port} ssh :{ssh_port}, listening {started * 1e3:.0f} ms after spawn; "
        f"client pid {client.pid}; {procs.pin.describe()}")

    ports = {"a": up_port, "b": router_port, "h": haproxy_port, "g": goproxy_port, "c": agent_port, "c100": agent_port,
             "cstd": agent_std_port, "d": agent_port}
    # each row reaches the app it should, or the figures mean nothing
    expect = {row: (row == "d", "local" if row == "d" else "upstream") for row in ROWS}
    for row, (header, app) in expect.items():
        status, got, body = http_get(ports[row], "/", {HEADER[0]: HEADER[1]} if header else {})
        if status != 200 or got != app or body.strip() != app:
            raise RuntimeError(f"row {row}: expected {app}, got {status} {got!r} {body!r}")
    for name, port in (("nginx router", router_port), ("haproxy", haproxy_port)) + ((("goproxy", goproxy_port),) if goproxy else ()):
        status, got, _ = http_get(port, "/", {HEADER[0]: HEADER[1]})
        if got != "local":
            raise RuntimeError(f"{name} sent x-dev: alice to {got!r}")
    rss_client_idle = rss_mb(client.pid)

    results: dict[str, list[WrkResult]] = {r: [] for r in ROWS}
    accepted: dict[str, list[WrkResult]] = {r: [] for r in ROWS}
    rss_after: dict[str, float] = {}
    for rnd in range(args.repeat):
        for row in ROWS:
            header = row == "d"
            others = None
            if row == "c100":
                others = procs.other_routes(ssh_port, args.other_routes)
                status, got, _ = http_get(agent_port, "/", {HEADER[0]: HEADER[1]})
                if got != "local":
                    raise RuntimeError(f"with {args.other_routes} other routes, x-dev: alice reached {got!r}")
            for attempt in range(1 + args.retries):
                wait_quiet(procs, args.max_other_cpu / 2, args.quiet_wait)
                wrk(procs, ports[row], args, warmup, header)
                res = wrk(procs, ports[row], args, args.duration, header)
                results[row].append(res)
                rss_after[row] = rss_mb(agent.pid)
                log(
                    f"round {rnd + 1} {ROWS[row]}: {res.rps:.0f} req/s p50 {res.p50:.2f} ms p99 {res.p99:.2f} ms, "
                    f"CPU proxy {res.proxy_cpu(row):.0f}% client {res.cpu['client']:.0f}% "
                    f"others {res.other_cpu:.0f}% {res.errors}"
                )
                if res.other_cpu <= args.max_other_cpu:
                    break
                log(f"other processes used {res.other_cpu:.0f}% CPU during the row; measuring it again")
            accepted[row].append(res)  # the round's last attempt: the one the rounds are paired by
            if others is not None:
                procs.stop(others)

    # the agent with N open keep-alive connections: to the upstream, then over SSH
    held: dict[str, float] = {}
    for header in (False, True):
        key = "d" if header else "c"
        held[f"{key}_before"] = rss_mb(agent.pid)
        socks = hold_connections(agent_port, args.open_connections, header)
        time.sleep(0.5)
        held[key] = rss_mb(agent.pid)
        for s in socks:
            s.close()
        time.sleep(0.5)
    log(f"agent RSS with {args.open_connections} open connections: upstream {held['c']:.1f} MB, over SSH {held['d']:.1f} MB")

    bulk: dict[tuple[str, str], float] = {}
    if not args.no_bulk:
        for row in [r for r in BULK_ROWS if r in ROWS]:
            header, app = expect[row]
            for direction in ("get", "post"):
                runs = [curl_bulk(procs, ports[row], direction, header, big, app) for _ in range(args.bulk_runs)]
                bulk[row, direction] = median(runs)
                log(f"{ROWS[row]} {direction} {args.body_mb} MiB: " + ", ".join(f"{x:.0f}" for x in runs) + " MB/s")
    rss_end, hwm_end = rss_mb(agent.pid), hwm_mb(agent.pid)
    client_rss_end, client_hwm = rss_mb(client.pid), hwm_mb(client.pid)

    loops = {"agent": event_loop(agent.pid), "client": event_loop(client.pid)}
    report(args, procs, results, accepted, rss_after, held, bulk, rss_idle, rss_nodev, rss_end, hwm_end, rss_client_idle, client_rss_end, client_hwm, loops,
           (started, started_std))

    if args.profile:
        if shutil.which("py-spy") is None:
            log("--profile needs py-spy (pip install py-spy); skipped")
        else:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            files = profile(procs, {"agent": agent.pid}, agent_port, args, False, "c")
            files |= {f"d-{k}": v for k, v in profile(procs, {"agent": agent.pid, "client": client.pid}, agent_port, args, True, "d").items()}
            summary = "".join(summarize_profile(p) + "\n" for p in files.values())
            (Path(args.profile) / "summary.txt").write_text(summary)
            print("\n```\n" + summary + "```")
    for name, p in (("agent", agent), ("client", client)):
        if p.poll() is not None:
            log(f"the {name} exited during the run (status {p.returncode})")
            return 1
    return 0


def median(values: list[float]) -> float:
    return statistics.median(values)


def c100_against_c(accepted: dict[str, list[WrkResult]]) -> tuple[list[float], float] | None:
    """(c100)'s req/s over (c)'s in each round, and their median; None with fewer than three rounds.

    A row moves by ±10% between rounds on a shared machine, more than the 5% the target is
    about; the two rows of one round run back to back, so their ratio moves much less.
    """
    pairs = list(zip(accepted.get("c", []), accepted.get("c100", [])))
    if len(pairs) < 3:
        return None
    ratios = [c100.rps / c.rps for c, c100 in pairs]
    return ratios, median(ratios)


def report(args, procs, results, accepted, rss_after, held, bulk, rss_idle, rss_nodev, rss_end, hwm_end, rss_client_idle, client_rss_end, client_hwm, loops,
           started) -> None:
    # noise from other processes only ever slows a row down: each row reports its best measurement
    best = {r: max(v, key=lambda x: x.rps) for r, v in results.items()}
    nginx = best["b"]
    n = args.open_connections
    print()
    print(f"### intercept bench, {datetime.datetime.now().isoformat(timespec='minutes')}, {git_revision()}")
    print()
    print(
        f"`nproc` {os.cpu_count()}, Python {platform.python_version()}, event loop: agent {loops['agent']}, client {loops['client']}; "
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s"
        + (" with Connection: close" if args.connection_close else " keep-alive")
        + f", {sum(len(v) for v in results.values())} measurements for {len(ROWS)} rows (each row reports its fastest); "
        f"{procs.pin.describe()}"
        + (f"; WHAT-IF {args.what_if} (bench/whatif.py: not intercept as it is)" if args.what_if else "")
    )
    print()
    print(
        "| row | req/s | vs nginx | p50 ms | p99 ms | p99 vs nginx | proxy CPU µs/req | CPU % proxy / client / others "
        "| agent RSS MB after |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, label in ROWS.items():
        b = best[row]
        cpu = f"{b.proxy_cpu(row):.0f} / {b.cpu['client']:.0f} / {b.other_cpu:.0f}"
        us = f"{b.proxy_us(row):.0f}" if row != "a" else "-"
        if row == "d":
            us += f" ({b.cpu['agent'] / b.rps * 1e4:.0f} agent + {b.cpu['client'] / b.rps * 1e4:.0f} client)"
        line = (
            f"| {label} | {b.rps:,.0f} | {b.rps / nginx.rps:.2f}x | {b.p50:.2f} | {b.p99:.2f} | {b.p99 / nginx.p99:.2f}x | "
            f"{us} | {cpu} | {rss_after[row]:.1f} |"
        )
        errors = "; ".join(x.errors for x in results[row] if x.errors)
        print(line + (f" errors: {errors}" if errors else ""))
    noisy = [f"({r}) {b.other_cpu:.0f}%" for r, b in best.items() if b.other_cpu > args.max_other_cpu]
    if noisy:
        print()
        print(
            f"**Warning**: other processes kept the machine busy during rows {', '.join(noisy)} of a CPU, even after "
            f"{args.retries} retries: their req/s and latencies are not reliable; rerun on a quiet machine. "
            "CPU µs/req is much less sensitive."
        )
    retried = {r: v for r, v in results.items() if len(v) > 1}
    if retried:
        print()
        print(
            "All measurements, req/s (other processes' CPU %): "
            + "; ".join(f"({r}) " + ", ".join(f"{x.rps:,.0f} ({x.other_cpu:.0f})" for x in v) for r, v in retried.items())
            + "."
        )
    paired = c100_against_c(accepted)
    if paired is not None:
        ratios, mid = paired
        print()
        print(f"(c100) against (c) round by round (each pair measured back to back in the same agent): "
              f"{', '.join(f'{r - 1:+.1%}' for r in ratios)}; median {mid - 1:+.1%}.")
    if bulk:
        print()
        print(f"| {args.body_mb} MiB body, median of {args.bulk_runs} | GET (download) MB/s | POST (upload) MB/s |")
        print("|---|---:|---:|")
        for row in [r for r in BULK_ROWS if r in ROWS]:
            print(f"| {ROWS[row]} | {bulk[row, 'get']:,.0f} | {bulk[row, 'post']:,.0f} |")
    print()
    print(
        f"Agent: listening {started[0] * 1e3:.0f} ms after spawn ({started[1] * 1e3:.0f} ms on asyncio). "
        f"RSS: {rss_idle:.1f} MB idle; {rss_nodev:.1f} MB holding {n} keep-alive connections to the upstream before "
        f"any developer connected; with a developer connected, {held['c']:.1f} MB holding {n} to the upstream "
        f"({held['c'] - held['c_before']:+.1f} MB), {held['d']:.1f} MB holding {n} routed over SSH "
        f"({held['d'] - held['d_before']:+.1f} MB); {rss_end:.1f} MB at the end (peak {hwm_end:.1f} MB). "
        f"Client RSS: {rss_client_idle:.1f} MB at start, {client_rss_end:.1f} MB at the end (peak {client_hwm:.1f} MB)."
    )
    print()
    if args.connection_close:
        print("(wrk sent Connection: close: one connection per request; the targets are about keep-alive connections.)")
        print()
        return
    if "g" in best and "c" in best:
        print(f"(c) against (g), Go's net/http on one core: {best['c'].rps / best['g'].rps:.2f}x its req/s, "
              f"{best['c'].proxy_us('c') / best['g'].proxy_us('g'):.2f}x its CPU per request.")
        print()
    if not {"c", "c100", "h"} <= set(ROWS):
        return
    c, c100 = best["c"], best["c100"]
    # issue 27's targets (part 3: keep what is met); issue 11's others are withdrawn
    checks = [
        ("(c) req/s >= 0.65x nginx", c.rps / nginx.rps >= 0.65,
         f"{c.rps / nginx.rps:.2f}x (HAProxy {best['h'].rps / nginx.rps:.2f}x"
         + (f", Go {best['g'].rps / nginx.rps:.2f}x)" if "g" in best else ")")),
        ("(c) p99 <= 1.5x nginx", c.p99 <= 1.5 * nginx.p99, f"{c.p99 / nginx.p99:.2f}x ({c.p99:.2f} vs {nginx.p99:.2f} ms)"),
        ("(c100) within 5% of (c)", (paired[1] if paired else c100.rps / c.rps) >= 0.95,
         (f"median of {len(paired[0])} back-to-back pairs {paired[1] - 1:+.1%} req/s; best of each " if paired else "")
         + f"{c100.rps / c.rps - 1:+.1%} req/s, {c100.proxy_us('c100') - c.proxy_us('c'):+.1f} µs/req"),
        ("agent RSS <= 35 MB idle", rss_idle <= 35, f"{rss_idle:.1f} MB"),
        ("agent listening <= 300 ms after spawn", started[0] <= 0.3, f"{started[0] * 1e3:.0f} ms"),
    ]
    print("| target | measured | met |")
    print("|---|---:|---|")
    for name, ok, shown in checks:
        print(f"| {name} | {shown} | {'yes' if ok else 'NO'} |")
    print()


def git_revision() -> str:
    """The commit measured (read only: no index refresh), with "+changes" when the tree differs from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "commit unknown"
    if rev.returncode != 0:
        return "commit unknown"
    return f"commit {rev.stdout.strip()}" + (" +changes" if dirty.stdout.strip() else "")


def event_loop(pid: int) -> str:
    """uvloop when the process has uvloop's extension mapped, else the standard asyncio loop."""
    try:
        return "uvloop" if "/uvloop/loop." in Path(f"/proc/{pid}/maps").read_text() else "asyncio"
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
