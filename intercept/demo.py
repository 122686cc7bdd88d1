"""``intercept demo``: header routing shown without a cluster.

Starts, as real processes on loopback: a "cluster version" app, an agent in front of
it, a "local version" app, and ``intercept start`` with a personal header. Then sends
requests with and without the header, on fresh and keep-alive connections, and
prints which version answered each. Succeeds only when every request landed where it
should.

``python -m intercept.demo app NAME`` is the small app it runs for both versions.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from intercept.errors import InterceptError

DEV = "demo-dev"
HEADER = "x-intercept-id"


class _VersionHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    version_name = "?"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = f"{self.version_name} version\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_app(name: str) -> None:
    """The demo app: answers every GET with "<name> version"; prints its port."""
    handler = type("Handler", (_VersionHandler,), {"version_name": name})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    print(f"demo app {name} on {server.server_address[1]}", flush=True)
    server.serve_forever()


class _Processes:
    """Children started by the demo; a line read from one fails if it does not come in time."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str], until: str, timeout: float = 30.0) -> str:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            output = []
            for line in proc.stdout:
                output.append(line.rstrip())
                if line.startswith(until):
                    return line.strip()
        finally:
            timer.cancel()
        raise InterceptError(f"demo: {' '.join(argv[2:4])} stopped before printing {until!r}:\n" + "\n".join(output))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_demo(echo: Callable[[str], None], keep: bool = False) -> bool:
    me = [sys.executable, "-m", "intercept"]
    procs = _Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="intercept-demo-") as tmp:
            cluster_port = procs.start([sys.executable, "-m", "intercept.demo", "app", "cluster"], "demo app").split()[-1]
            local_port = procs.start([sys.executable, "-m", "intercept.demo", "app", "local"], "demo app").split()[-1]
            creds = str(Path(tmp) / "credentials.json")
            line = procs.start(
                me + ["agent", "--listen", "127.0.0.1:0", "--ssh-listen", "127.0.0.1:0",
                      "--upstream", f"127.0.0.1:{cluster_port}", "--credentials", creds],
                "intercept: agent:",
            )
            http_addr, ssh_addr = line.split()[3], line.split()[5]
            echo(f"cluster version on :{cluster_port}, agent in front of it on {http_addr} (ssh {ssh_addr})")
            echo(f"local version on :{local_port}")
            echo(procs.start(me + ["start", "--agent", ssh_addr, "--credentials", creds,
                                   "--port", local_port, "--name", DEV], "intercept: ready:"))
            ok = _send_requests(echo, http_addr)
            if keep:
                echo(f"\ntry: curl -H '{HEADER}: {DEV}' http://{http_addr}/   (Ctrl-C to stop)")
                threading.Event().wait()
            return ok
    except KeyboardInterrupt:
        return True
    finally:
        procs.stop()


def _send_requests(echo: Callable[[str], None], http_addr: str) -> bool:
    host, port = http_addr.rsplit(":", 1)
    plan = [
        ("fresh", {HEADER: DEV}, "local"),
        ("fresh", {}, "cluster"),
        ("fresh", {HEADER: "someone-else"}, "cluster"),
        ("keep-alive", {}, "cluster"),
        ("keep-alive", {HEADER: DEV}, "local"),
        ("keep-alive", {HEADER: DEV}, "local"),
        ("keep-alive", {}, "cluster"),
        ("keep-alive", {"X-Intercept-Id": DEV}, "local"),
    ]
    rows = []
    kept = http.client.HTTPConnection(host, int(port), timeout=30)
    for i, (connection, headers, expected) in enumerate(plan, 1):
        conn = kept if connection == "keep-alive" else http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", f"/demo/{i}", headers=headers)
        resp = conn.getresponse()
        answered = resp.read().decode().strip().removesuffix(" version") if resp.status == 200 else f"HTTP {resp.status}"
        if conn is not kept:
            conn.close()
        header = "; ".join(f"{k}: {v}" for k, v in headers.items()) or "(none)"
        rows.append((str(i), connection, header, expected, answered, "ok" if answered == expected else "WRONG"))
    kept.close()
    titles = ("#", "connection", "header", "expected", "answered by", "")
    widths = [max(len(r[c]) for r in rows + [titles]) for c in range(len(titles))]
    echo("")
    for row in [titles] + rows:
        echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    good = all(r[-1] == "ok" for r in rows)
    echo("")
    echo(f"intercept: demo: {sum(r[-1] == 'ok' for r in rows)}/{len(rows)} requests landed where they should")
    return good


if __name__ == "__main__":
    if sys.argv[1:2] == ["app"] and len(sys.argv) == 3:
        serve_app(sys.argv[2])
    else:
        sys.exit("usage: python -m intercept.demo app NAME")
