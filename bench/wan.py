#!/usr/bin/env python3
"""The routed path over a shaped network link, not loopback (issue 27, part 2). Needs root.

    python bench/wan.py                  # profiles A and B, 3 runs each, medians
    python bench/wan.py --quick          # profile A, one run, small bodies, short rows
    python bench/wan.py --profiles B --runs 1

Two network namespaces stand for the two ends: "cluster" (the app, the agent, an sshd,
the load generator) and "laptop" (``intercept start`` with its local app, ``ssh -R``).
They are joined by two TUN devices and a userspace link emulator in between (this
machine's kernel has no ``sch_netem``), which applies netem's delay-and-rate arithmetic
in each direction: a packet leaves at ``max(arrival + delay, previous departure) +
size / rate`` (size counted with a 14-byte Ethernet header, as netem on a veth would),
first in first out, at most 1,000 packets queued per direction (more are dropped), and
a switch that drops every packet while the link is "down".

Profiles: A (40 ms RTT, 100 Mbit/s) and B (120 ms RTT, 20 Mbit/s). Load is sent from
the cluster side. Columns:

- **direct** (the floor): the same request across the link to the laptop's app, no intercept;
- **intercept**: cluster client -> agent -> SSH channel (asyncssh) -> ``intercept start`` -> local app;
- **OpenSSH**: cluster client -> a second agent without routes, whose upstream is the port
  that ``ssh -N -R`` forwards (sshd in the cluster namespace, ``ssh`` on the laptop, as
  ``bench/carrier.py`` sets it up) -> local app.

Rows: warm keep-alive GET (wrk -c1) extra over the floor, p50 / p99; a bulk GET and POST
(curl) as a share of the link rate; 50 concurrent small GETs alone (wrk -c50), req/s
against 50/RTT; the same 50 while a download runs on the same path, p99 against the
floor's; a link outage under routed load (requests sent at a steady rate, each on its
own connection): how many were answered by the laptop's app, how long after link-up
the first answer came, and whether the client said ``reconnecting`` meanwhile.

``WAN_HOLD=1`` keeps the setup up once it is made (for ``ss -ti`` and the like inside the
namespaces) until SIGTERM. Traffic stays inside the two namespaces made here. Namespaces, TUN devices and processes
are removed at the end, on an error and on Ctrl-C. Needs ip (iproute2), wrk, curl, nginx,
ssh and sshd (openssh-client, openssh-server). Prints Markdown on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import string
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import HERE, ROOT, WrkResult, big_file, log, median, read_line  # bench/ is not a package

PROFILES = {"A": (40.0, 100.0), "B": (120.0, 20.0)}  # RTT ms, Mbit/s
CLUSTER_IP, LAPTOP_IP = "10.201.0.1", "10.201.0.2"
UP_PORT, LOCAL_PORT, SSHD_PORT, FORWARDED_PORT = 8080, 8081, 2222, 8082
HEADER = ("x-dev", "alice")
CIPHER = "aes128-gcm@openssh.com"
COLUMNS = ("direct", "intercept", "openssh")
ROWS = ("warm", "bulk", "fifty", "during", "outage")
ETHERNET = 14  # bytes netem on a veth would count per packet beyond the IP packet
LIMIT = 1000  # packets queued per direction, netem's default limit

APP_SERVER = """
    server {
        listen 0.0.0.0:${PORT} backlog=4096;
        add_header X-App ${NAME} always;
        location / { return 200 "${NAME}\\n"; }
        location = /big { alias ${BIG}; }
        location = /stream { alias ${STREAM}; }
        # the answer comes once the whole body is read (nginx reads a proxied request's body
        # first); a bare "return" answers at once and reads the body afterwards
        location = /sink {
            client_max_body_size 0;
            client_body_buffer_size 1m;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://127.0.0.1:${PORT}/sunk;
        }
        location = /sunk { return 200 "${NAME} sink\\n"; }
    }
"""


# -- the link emulator (a process of its own: python bench/wan.py --emulate ...) -----------

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def emulate(names: list[str], delay_ms: float, rate_mbit: float, limit: int) -> None:
    """Carry IP packets between two TUN devices as netem would shape them each way.

    SIGUSR1 takes the link down (every packet dropped), SIGUSR2 brings it up. SIGTERM
    ends it (the TUN devices go with their file descriptors) after one line of counts."""
    fds = [open_tun(n) for n in names]
    delay, byte_time = delay_ms / 1e3, 8 / (rate_mbit * 1e6)
    queues: list[deque[tuple[float, bytes]]] = [deque(), deque()]  # direction 0: fds[0] -> fds[1]
    last = [0.0, 0.0]
    state = {"down": False, "run": True}
    counts = {"carried": 0, "dropped_full": 0, "dropped_down": 0}
    signal.signal(signal.SIGUSR1, lambda *_: state.update(down=True))
    signal.signal(signal.SIGUSR2, lambda *_: state.update(down=False))
    signal.signal(signal.SIGTERM, lambda *_: state.update(run=False))
    with contextlib.suppress(OSError, AttributeError):  # the link keeps time under others' load (needs root)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    poller = select.epoll()
    for fd in fds:
        poller.register(fd, select.EPOLLIN)
    print("ready", flush=True)
    clock = time.monotonic
    while state["run"]:
        heads = [q[0][0] for q in queues if q]
        timeout = max(0.0, min(heads) - clock()) if heads else 1.0
        try:
            events = poller.poll(timeout)
        except InterruptedError:
            continue
        for fd, _ in events:
            d = fds.index(fd)
            q = queues[d]
            while True:
                try:
                    packet = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                if state["down"]:
                    counts["dropped_down"] += 1
                    continue
                if len(q) >= limit:
                    counts["dropped_full"] += 1
                    continue
                now = clock()
                # netem_enqueue with a rate: after the packet before it, then its own transmission time
                leave = max(now + delay, last[d]) + (len(packet) + ETHERNET) * byte_time
                last[d] = leave
                q.append((leave, packet))
        now = clock()
        for d, q in enumerate(queues):
            out = fds[1 - d]
            while q and q[0][0] <= now:
                _, packet = q.popleft()
                try:
                    os.write(out, packet)
                    counts["carried"] += 1
                except OSError:  # the device is down (setup or teardown): as a drop
                    counts["dropped_full"] += 1
    print(json.dumps(counts), flush=True)


# -- the outage load (a process in the cluster namespace: python bench/wan.py --load ...) --


async def _one(port: int, sent: float, results: list[dict]) -> None:
    request = f"GET / HTTP/1.1\r\nHost: orders\r\n{HEADER[0]}: {HEADER[1]}\r\nConnection: close\r\n\r\n".encode()
    result = {"sent": sent, "done": None, "local": False}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
        writer.write(request)
        response = await asyncio.wait_for(reader.read(-1), 60)
        writer.close()
        head = response.split(b"\r\n\r\n", 1)[0].lower()
        result["done"] = time.time()
        result["local"] = head.startswith(b"http/1.1 200") and b"x-app: local" in head
    except (OSError, asyncio.TimeoutError) as e:
        result["error"] = str(e) or type(e).__name__
    results.append(result)


async def _load(port: int, rate: float, seconds: float) -> list[dict]:
    results: list[dict] = []
    tasks = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.ensure_future(_one(port, time.time(), results)))
    await asyncio.gather(*tasks)
    return results


# -- namespaces, link, processes ---------------------------------------------------------


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)


@dataclass
class Wan:
    """Two namespaces joined by the emulated link, and the processes in them."""

    tmp: Path
    rtt_ms: float
    rate_mbit: float
    tag: str = field(default_factory=lambda: f"icw{os.getpid() % 100000}")
    children: list[subprocess.Popen] = field(default_factory=list)
    files: list = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    emulator: subprocess.Popen | None = None
    nice: int = 0  # niceness of every process of the setup (not the link emulator, which runs SCHED_FIFO)

    @property
    def cluster(self) -> str:
        return f"{self.tag}-cluster"

    @property
    def laptop(self) -> str:
        return f"{self.tag}-laptop"

    def up(self) -> None:
        tuns = [f"{self.tag}c", f"{self.tag}l"]
        self.emulator = subprocess.Popen(
            [sys.executable, __file__, "--emulate", *tuns, "--delay-ms", str(self.rtt_ms / 2),
             "--rate-mbit", str(self.rate_mbit)],
            stdout=subprocess.PIPE, stderr=self.logfile("emulator.log"), text=True,
        )  # fmt: skip
        if self.emulator.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the link emulator did not start: {(self.tmp / 'emulator.log').read_text()}")
        for ns, tun, mine, peer in ((self.cluster, tuns[0], CLUSTER_IP, LAPTOP_IP), (self.laptop, tuns[1], LAPTOP_IP, CLUSTER_IP)):
            ip("netns", "add", ns)
            self.namespaces.append(ns)
            ip("link", "set", tun, "netns", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", mine, "peer", peer, "dev", tun)
            ip("-n", ns, "link", "set", tun, "txqueuelen", "10000", "up")

    def logfile(self, name: str):
        f = open(self.tmp / name, "ab")  # noqa: SIM115  (closed in down)
        self.files.append(f)
        return f

    def spawn(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *self.niced(argv)], **kw)  # ip execs the command: same pid
        self.children.append(p)
        return p

    def run(self, ns: str, argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *self.niced(argv)], capture_output=True, text=True, timeout=timeout, **kw)

    def niced(self, argv: list[str]) -> list[str]:
        return ["nice", "-n", str(self.nice), *argv] if self.nice else argv

    def wait_port(self, ns: str, host: str, port: int, timeout: float = 20) -> None:
        probe = f"import socket,time\nfor _ in range({int(timeout * 20)}):\n try: socket.create_connection(('{host}', {port}), 1).close(); break\n except OSError: time.sleep(0.05)\nelse: raise SystemExit(1)"
        if self.run(ns, [sys.executable, "-c", probe], timeout + 10).returncode:
            raise RuntimeError(f"nothing listens on {host}:{port} in {ns} after {timeout:g}s")

    def link(self, down: bool) -> None:
        self.emulator.send_signal(signal.SIGUSR1 if down else signal.SIGUSR2)

    def down(self) -> None:
        for p in reversed(self.children):
            with contextlib.suppress(Exception):
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
        self.children.clear()
        if self.emulator is not None and self.emulator.poll() is None:
            self.emulator.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                log(f"link: {self.emulator.communicate(timeout=10)[0].strip()}")
            if self.emulator.poll() is None:
                self.emulator.kill()
                self.emulator.wait()
        for ns in self.namespaces:
            # any process still in it (none should be) goes first, then the namespace
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        for f in self.files:
            f.close()
        self.files.clear()

    # -- the processes of the setup

    def nginx(self, ns: str, name: str, port: int, big: Path, stream: Path) -> None:
        server = string.Template(APP_SERVER).safe_substitute(NAME=name, PORT=port, BIG=big, STREAM=stream)
        conf = self.tmp / f"{name}.conf"
        tmpl = string.Template((HERE / "nginx.conf.template").read_text())
        conf.write_text(tmpl.safe_substitute(DIR=self.tmp, NAME=name, SERVER=server))
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.tmp / f"{name}.{sub}").mkdir(exist_ok=True)
        self.spawn(ns, ["nginx", "-p", str(self.tmp), "-e", str(self.tmp / f"{name}.error.log"), "-c", str(conf),
                        "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=self.logfile(f"{name}.stderr"))
        self.wait_port(ns, "127.0.0.1", port)

    def agent(self, upstream: int, name: str) -> tuple[int, int]:
        argv = [sys.executable, "-m", "intercept", "-v", "agent", "--listen", "127.0.0.1:0",
                "--ssh-listen", f"{CLUSTER_IP}:0", "--upstream", f"127.0.0.1:{upstream}",
                "--credentials", str(self.tmp / "agent-credentials.json")]  # fmt: skip
        p = self.spawn(self.cluster, argv, stdout=subprocess.PIPE, stderr=self.logfile(f"{name}.log"), text=True, cwd=ROOT)
        line = read_line(p, "intercept: agent:", 30, self.tmp / f"{name}.log")
        m = re.search(r"http [^ ]+:(\d+) ssh [^ ]+:(\d+)", line)
        return int(m[1]), int(m[2])

    def client(self, ssh_port: int) -> subprocess.Popen:
        argv = [sys.executable, "-m", "intercept", "-v", "start", "--agent", f"{CLUSTER_IP}:{ssh_port}",
                "--credentials", str(self.tmp / "agent-credentials.json"), "--port", str(LOCAL_PORT),
                "--header", f"{HEADER[0]}={HEADER[1]}", "--name", "alice"]  # fmt: skip
        out = self.tmp / "client.out"
        p = self.spawn(self.laptop, argv, stdout=open(out, "w"), stderr=self.logfile("client.log"), text=True, cwd=ROOT)  # noqa: SIM115
        deadline = time.monotonic() + 30
        while "intercept: ready:" not in out.read_text():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"intercept start did not get ready: {(self.tmp / 'client.log').read_text()[-2000:]}")
            time.sleep(0.1)
        return p

    def openssh(self) -> None:
        tmp, sshd = self.tmp, shutil.which("sshd") or "/usr/sbin/sshd"
        for name in ("host", "user"):
            if not (tmp / name).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
        (tmp / "authorized_keys").write_text((tmp / "user.pub").read_text())
        (tmp / "sshd_config").write_text(
            f"ListenAddress {CLUSTER_IP}:{SSHD_PORT}\nHostKey {tmp / 'host'}\nAuthorizedKeysFile {tmp / 'authorized_keys'}\n"
            f"PidFile {tmp / 'sshd.pid'}\nCiphers {CIPHER}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory
        self.spawn(self.cluster, [sshd, "-D", "-e", "-f", str(tmp / "sshd_config")], stderr=self.logfile("sshd.log"))
        self.wait_port(self.cluster, CLUSTER_IP, SSHD_PORT)
        # -tt: both OpenSSH ends set TCP_NODELAY, as for an interactive session (bench/carrier.py)
        self.spawn(self.laptop, [
            "ssh", "-tt", "-c", CIPHER, "-i", str(tmp / "user"), "-p", str(SSHD_PORT), "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={tmp / 'known_hosts'}", "-o", "ExitOnForwardFailure=yes",
            "-R", f"127.0.0.1:{FORWARDED_PORT}:127.0.0.1:{LOCAL_PORT}", f"root@{CLUSTER_IP}", "sleep 1000000",
        ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.logfile("ssh.log"))  # fmt: skip
        self.wait_port(self.cluster, "127.0.0.1", FORWARDED_PORT)


# -- measurements --------------------------------------------------------------------------


@dataclass
class Column:
    name: str
    url: str  # base URL from the cluster namespace
    header: bool

    def curl_args(self) -> list[str]:
        return ["-H", f"{HEADER[0]}: {HEADER[1]}"] if self.header else []


def wrk(wan: Wan, col: Column, connections: int, seconds: float) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    if col.header:
        argv += ["-H", f"{HEADER[0]}: {HEADER[1]}"]
    out = wan.run(wan.cluster, [*argv, col.url + "/"], seconds + 60)
    if out.returncode:
        raise RuntimeError(f"wrk {col.name}: {out.stderr}")
    result = WrkResult.parse(out.stdout)
    if result.errors:
        log(f"wrk {col.name}: {result.errors}")
    return result


def curl_bulk(wan: Wan, col: Column, direction: str, big: Path) -> float:
    """Bytes per second of one body of ``big``'s size, from the request's first byte to the
    response's last: ``get`` downloads /big, ``post`` uploads to /sink."""
    argv = ["curl", "-sS", "--max-time", "600", "-o", "/dev/null", *col.curl_args()]
    if direction == "get":
        argv += ["-w", "%{http_code} %{size_download} %{time_pretransfer} %{time_total}", col.url + "/big"]
    else:
        argv += ["-H", "Expect:", "-X", "POST", "-T", str(big), "-w", "%{http_code} %{size_upload} %{time_pretransfer} %{time_total}",
                 col.url + "/sink"]
    out = wan.run(wan.cluster, argv, 700)
    parts = out.stdout.split()
    if out.returncode or len(parts) != 4 or parts[0] != "200" or int(parts[1]) != big.stat().st_size:
        raise RuntimeError(f"curl {direction} {col.name} failed: rc={out.returncode} {out.stdout!r} {out.stderr.strip()}")
    # from the request's first byte to the response's last: an upload counts until the app has
    # answered, i.e. has read the whole body (curl's speed_upload counts what the socket took)
    return int(parts[1]) / (float(parts[3]) - float(parts[2]))


def during_download(wan: Wan, col: Column, seconds: float, ramp: float) -> WrkResult:
    """50 small GETs (wrk -c50) while one download of /stream runs on the same path."""
    dl = wan.spawn(wan.cluster, ["curl", "-sS", "-o", "/dev/null", *col.curl_args(), col.url + "/stream"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(ramp)  # past TCP's slow start: the download fills the link
        if dl.poll() is not None:
            raise RuntimeError(f"the download through {col.name} ended before the small requests began")
        result = wrk(wan, col, 50, seconds)
        if dl.poll() is not None:
            log(f"warning: the download through {col.name} ended before the small requests did")
        return result
    finally:
        dl.terminate()
        dl.wait()


def outage(wan: Wan, col: Column, client_out: Path, rate: float, seconds: float, down_at: float, down_for: float) -> dict:
    before = client_out.read_text()
    load = wan.spawn(wan.cluster, [sys.executable, __file__, "--load", col.url.rsplit(":", 1)[1], "--rate", str(rate),
                                   "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    time.sleep(down_at)
    t_down = time.time()
    wan.link(down=True)
    time.sleep(down_for)
    wan.link(down=False)
    t_up = time.time()
    out, _ = load.communicate(timeout=seconds + 120)
    results = json.loads(out)
    said = client_out.read_text()[len(before):]
    delivered = sum(r["local"] for r in results)
    after_up = [r["done"] for r in results if r["local"] and r["done"] >= t_up]
    held = sum(1 for r in results if r["local"] and r["sent"] >= t_down - 0.1 and r["sent"] < t_up)
    return {
        "sent": len(results), "delivered": delivered, "held": held,
        "back": (min(after_up) - t_up) if after_up else float("nan"),
        "reconnecting": "reconnecting" in said,
        "errors": sorted({r.get("error", "") for r in results if not r["local"]} - {""}),
    }  # fmt: skip


def measure(wan: Wan, cols: dict[str, Column], args: argparse.Namespace, big: Path, client_out: Path) -> dict:
    rtt = wan.rtt_ms / 1e3
    res: dict = {"columns": list(cols)}
    rows = set(args.rows.split(","))
    if os.environ.get("WAN_HOLD"):  # debugging: keep the setup up for poking, until interrupted
        log(f"holding: {wan.cluster} {wan.laptop} {[c.url for c in cols.values()]}")
        time.sleep(3600)
    for c in cols.values():
        wrk(wan, c, 1, 1)  # warm: connections open, SSH channels made
    for name, c in cols.items():
        if "warm" not in rows:
            break
        res["warm", name] = wrk(wan, c, 1, args.duration)
        log(f"  warm GET {name}: p50 {res['warm', name].p50:.1f} ms, p99 {res['warm', name].p99:.1f} ms")
    for direction in ("get", "post"):
        for name, c in cols.items():
            if "bulk" not in rows:
                break
            bps = curl_bulk(wan, c, direction, big)
            res[direction, name] = bps * 8 / (wan.rate_mbit * 1e6)
            log(f"  {direction.upper()} {name}: {bps / 1e6:.2f} MB/s, {res[direction, name]:.0%} of the link")
    for name, c in cols.items():
        if "fifty" not in rows:
            break
        r = wrk(wan, c, 50, args.duration)
        res["fifty", name] = r
        log(f"  50 small GETs {name}: {r.rps:.0f} req/s ({r.rps / (50 / rtt):.0%} of 50/RTT), p99 {r.p99:.0f} ms")
    for name, c in cols.items():
        if "during" not in rows:
            break
        r = during_download(wan, c, args.duration, args.ramp)
        res["during", name] = r
        log(f"  50 during a download {name}: p99 {r.p99:.0f} ms, {r.rps:.0f} req/s")
    if args.outage > 0 and "outage" in rows:
        o = outage(wan, cols["intercept"], client_out, args.outage_rate, args.outage + 2 * args.outage_margin,
                   args.outage_margin, args.outage)  # fmt: skip
        res["outage"] = o
        log(f"  outage {args.outage:g} s: {o['delivered']}/{o['sent']} delivered ({o['held']} sent while down), "
            f"back {o['back']:.2f} s after link-up, reconnecting said: {o['reconnecting']}, errors {o['errors']}")
    return res


def setup(wan: Wan, big: Path, stream: Path, columns: list[str]) -> tuple[dict[str, Column], Path]:
    wan.up()
    wan.nginx(wan.cluster, "upstream", UP_PORT, big, stream)
    wan.nginx(wan.laptop, "local", LOCAL_PORT, big, stream)
    http, ssh = wan.agent(UP_PORT, "agent")
    wan.client(ssh)
    cols = {
        "direct": Column("direct", f"http://{LAPTOP_IP}:{LOCAL_PORT}", False),
        "intercept": Column("intercept", f"http://127.0.0.1:{http}", True),
    }
    if "openssh" in columns:
        wan.openssh()
        http_o, _ = wan.agent(FORWARDED_PORT, "agent_o")
        cols["openssh"] = Column("openssh", f"http://127.0.0.1:{http_o}", False)
    for c in cols.values():  # each path reaches the laptop's app
        out = wan.run(wan.cluster, ["curl", "-sS", "-D", "-", "-o", "/dev/null", *c.curl_args(), c.url + "/"], 30)
        if "x-app: local" not in out.stdout.lower():
            raise RuntimeError(f"{c.name} did not reach the laptop's app: {out.stdout!r} {out.stderr!r}")
    return cols, wan.tmp / "client.out"


# -- the table -----------------------------------------------------------------------------


def spread(values: list[float], fmt: str) -> str:
    """The median, and the range when there are several runs."""
    m = median(values)
    if len(values) < 2:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def report(profile: str, rtt_ms: float, rate: float, runs: list[dict], args: argparse.Namespace) -> None:
    n = len(runs)
    print(f"\n### Profile {profile}: {rtt_ms:g} ms RTT, {rate:g} Mbit/s; "
          f"{'median of ' + str(n) + ' runs (range)' if n > 1 else 'one run'}\n")  # fmt: skip
    print("| measure | direct (floor) | intercept | OpenSSH carrier |")
    print("|---|---:|---:|---:|")

    def cells(f, fmt: str, floor: str | None = None) -> list[str]:
        return [floor if (floor is not None and c == "direct") else spread([f(r, c) for r in runs], fmt)
                if c in runs[0]["columns"] else "" for c in COLUMNS]

    rows = set(args.rows.split(","))
    if "warm" in rows:
        warm_row(runs, cells)
    if "bulk" in rows:
        for d in ("get", "post"):
            print(f"| {args.body_mb} MiB {d.upper()}, share of link rate | "
                  + " | ".join(cells(lambda r, c, d=d: 100 * r[d, c], "{:.0f}%")) + " |")
    rtt = rtt_ms / 1e3
    if "fifty" in rows:
        print("| 50 concurrent small GETs alone: req/s, share of 50/RTT | "
              + " | ".join(f"{a}, {b}" for a, b in zip(cells(lambda r, c: r["fifty", c].rps, "{:,.0f}"),
                                                        cells(lambda r, c: 100 * r["fifty", c].rps / (50 / rtt), "{:.0f}%"))) + " |")
    if "during" in rows:
        print("| the same 50 during a download: p99 ms, vs the floor's | "
              + " | ".join(f"{a}, {b}" for a, b in zip(cells(lambda r, c: r["during", c].p99, "{:,.0f}"),
                                                        cells(lambda r, c: r["during", c].p99 / r["during", "direct"].p99, "{:.2f}x"))) + " |")
        print("| the same 50 during a download: req/s | " + " | ".join(cells(lambda r, c: r["during", c].rps, "{:,.0f}")) + " |")
    if "outage" in runs[0]:
        outs = [r["outage"] for r in runs]
        text = "; ".join(f"{o['delivered']}/{o['sent']} delivered, back {o['back']:.2f} s after link-up"
                         f"{', reconnecting said' if o['reconnecting'] else ', nothing said'}" for o in outs)
        print(f"| {args.outage:g} s link outage under routed load ({args.outage_rate:g} req/s) | — | {text} | |")


def warm_row(runs: list[dict], cells) -> None:
    row = cells(lambda r, c: r["warm", c].p50 - r["warm", "direct"].p50, "{:+.1f}", "—")
    row99 = cells(lambda r, c: r["warm", c].p99 - r["warm", "direct"].p99, "{:+.1f}", "—")
    floor = f"{median([r['warm', 'direct'].p50 for r in runs]):.1f} / {median([r['warm', 'direct'].p99 for r in runs]):.1f}"
    print(f"| warm keep-alive GET, ms: floor p50 / p99, others extra over it | {floor} | "
          + " | ".join(f"{a} / {b}" for a, b in zip(row[1:], row99[1:])) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="A,B", help="profiles to run (A: 40 ms, 100 Mbit/s; B: 120 ms, 20 Mbit/s)")
    ap.add_argument("--runs", type=int, default=3, help="runs per profile; medians are reported (default 3)")
    ap.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per wrk row (default 10)")
    ap.add_argument("--ramp", type=float, default=2.0, help="seconds a download runs before the small requests start")
    ap.add_argument("--body-mb", type=int, default=100, help="bulk body, MiB (default 100)")
    ap.add_argument("--outage", type=float, default=5.0, help="seconds the link is down in the outage row (0: no row)")
    ap.add_argument("--outage-rate", type=float, default=80.0, help="routed requests per second during the outage row")
    ap.add_argument("--outage-margin", type=float, default=2.5, help="seconds of load before and after the outage")
    ap.add_argument("--quick", action="store_true", help="profile A, one run, 4 MiB bodies, 2 s rows, a 2 s outage")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows to measure (default all: {','.join(ROWS)}); "
                    "the table shows those measured")
    ap.add_argument("--columns", default=",".join(COLUMNS), help="direct and intercept are always measured; "
                    "openssh (the anchor) by default")
    ap.add_argument("--nice", type=int, default=0, help="niceness of the setup's processes, e.g. -10 on a machine "
                    "that others load (default 0); the link emulator always runs SCHED_FIFO")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--emulate", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--delay-ms", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--rate-mbit", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--load", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emulate:
        emulate(args.emulate, args.delay_ms, args.rate_mbit, LIMIT)
        return 0
    if args.load:
        print(json.dumps(asyncio.run(_load(args.load, args.rate, args.seconds))))
        return 0
    if args.quick:
        args.profiles, args.runs, args.duration, args.body_mb, args.ramp = "A", 1, 2.0, 4, 1.0
        args.outage, args.outage_rate, args.outage_margin = 2.0, 20.0, 1.0
    if os.geteuid() != 0:
        sys.exit("wan: needs root (network namespaces, TUN devices)")
    for tool in ("ip", "wrk", "curl", "nginx", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            sys.exit(f"wan: {tool} is not on PATH")
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        sys.exit("wan: sshd is not installed (apt-get install -y openssh-server)")
    if not Path("/dev/net/tun").exists():
        sys.exit("wan: /dev/net/tun is missing")
    # Ctrl-C and SIGTERM end the run through the same cleanup
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where it was started with SIGINT ignored
    tmp = Path(tempfile.mkdtemp(prefix="intercept-wan-"))
    from intercept.credentials import Credentials

    credentials = tmp / "agent-credentials.json"
    credentials.write_text(Credentials.generate().to_json())
    credentials.chmod(0o600)
    big = big_file(tmp, args.body_mb)
    stream = tmp / "stream.bin"
    with open(stream, "wb") as f:
        f.truncate(20 * 2**30)  # sparse: a download that outlasts the row, read from no disk
    print(f"bench/wan.py: commit {git_revision()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"wrk rows {args.duration:g} s, bulk bodies {args.body_mb} MiB, nice {args.nice}; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    try:
        for profile in args.profiles.split(","):
            rtt_ms, rate = PROFILES[profile]
            runs = []
            for i in range(args.runs):
                wan = Wan(tmp, rtt_ms, rate, nice=args.nice)
                try:
                    log(f"profile {profile} ({rtt_ms:g} ms, {rate:g} Mbit/s), run {i + 1} of {args.runs}: setting up")
                    cols, client_out = setup(wan, big, stream, args.columns.split(","))
                    runs.append(measure(wan, cols, args, big, client_out))
                finally:
                    wan.down()
            report(profile, rtt_ms, rate, runs, args)
    except KeyboardInterrupt:
        log("interrupted; everything made was removed")
        return 130
    finally:
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def git_revision() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
