"""Reload latency: from a saved file to the new code answering through the agent.

Real processes on loopback: an app behind an agent, and `intercept start` running a
small Python HTTP server as COMMAND with --watch. Each round saves a new version of the
server's file and measures, with a client polling through the agent with the
developer's header, the time until the new version answers. Debounce included.

    python bench/reload.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

APP = '''
import http.server, sys
VERSION = "{version}"
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = VERSION.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lines:
    def __init__(self, argv: list[str], cwd: str | None = None) -> None:
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            with self.cond:
                self.lines.append(line.rstrip())
                self.cond.notify_all()

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 60) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    if m := rx.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"no {pattern!r}:\n" + "\n".join(self.lines))
                self.cond.wait(left)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    me = [sys.executable, "-m", "intercept"]
    with tempfile.TemporaryDirectory(prefix="intercept-reload-") as tmp:
        work = Path(tmp)
        upstream = Lines([sys.executable, "-m", "intercept.demo", "app", "cluster"])
        up_port = upstream.wait_for(r"demo app cluster on (\d+)")[1]
        agent = Lines(me + ["agent", "--listen", "127.0.0.1:0", "--ssh-listen", "127.0.0.1:0",
                            "--upstream", f"127.0.0.1:{up_port}", "--credentials", str(work / "creds.json")])
        m = agent.wait_for(r"intercept: agent: http \S+:(\d+) ssh (\S+)")
        http_port, ssh = int(m[1]), m[2]
        port = free_port()
        (work / "app.py").write_text(APP.format(version="v0"))
        dev = Lines(me + ["start", "--agent", ssh, "--credentials", str(work / "creds.json"), "--port", str(port),
                          "--header", "x-dev=bench", "--name", "bench", "--", sys.executable, "app.py", str(port)], cwd=tmp)
        dev.wait_for(r"^intercept: ready: ")
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)

        def answer() -> str:
            nonlocal conn
            try:
                conn.request("GET", "/", headers={"x-dev": "bench"})
                return conn.getresponse().read().decode()
            except (OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
                return ""

        latencies, failures = [], 0
        for round_ in range(1, args.rounds + 1):
            version = f"v{round_}"
            seen = len(dev.lines)
            saved = time.monotonic()
            (work / "app.py").write_text(APP.format(version=version))
            while (got := answer()) != version:
                failures += got not in (f"v{round_ - 1}",)
            latencies.append(time.monotonic() - saved)
            dev.wait_for(r"^intercept: reloaded: ", start=seen)
        conn.close()
        for proc in (dev, agent, upstream):
            proc.p.terminate()
            proc.p.wait(10)
    ms = sorted(x * 1000 for x in latencies)
    print(f"reload latency over {len(ms)} saves (save -> new code answers through the agent):")
    print(f"  median {statistics.median(ms):.0f} ms, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms; "
          f"requests that failed meanwhile: {failures}")
    print(f"  target <= 500 ms: {'met' if statistics.median(ms) <= 500 else 'MISSED'}")


if __name__ == "__main__":
    main()
