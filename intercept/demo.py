"""``intercept demo``: header routing shown without a cluster.

Runs, in this process and on loopback: a "cluster version" app, an agent in front of it,
a "local version" app, and an intercept with a personal header, through the same API
the CLI uses (:mod:`intercept.api`). Then sends requests with and without the header,
on fresh and keep-alive connections, and prints which version answered each. Succeeds
only when every request landed where it should.

With ``grpc``, the same on HTTP/2: the two versions speak gRPC over h2c and the calls
share one client connection (:mod:`intercept.demo_grpc`).

With ``mirror``, a mirror instead of an intercept: the cluster version answers every
request, and the table says which copies reached the local version (those with the
header, and only those).
"""

from __future__ import annotations

import http.client
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from intercept import api, demo_grpc
from intercept.agent import Agent, AgentConfig

DEV = "demo-dev"
HEADER = "x-intercept-id"


class _VersionHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    version_name = "?"
    seen: _Seen | None = None  # the paths it was asked for (the mirror's local version)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.seen is not None:
            self.seen.add(self.path)
        body = f"{self.version_name} version\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Seen:
    """The paths an app was asked for, as they come (from its threads)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.changed = threading.Condition()

    def add(self, path: str) -> None:
        with self.changed:
            self.paths.append(path)
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> list[str]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.paths) >= count, timeout)
            return list(self.paths)


def _serve_app(name: str, seen: _Seen | None = None) -> ThreadingHTTPServer:
    """A demo app in a thread: answers every GET with "<name> version" (and notes its path in ``seen``)."""
    handler = type("Handler", (_VersionHandler,), {"version_name": name, "seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name=f"demo app {name}", daemon=True).start()
    return server


def run_demo(echo: Callable[[str], None], keep: bool = False, grpc: bool = False, mirror: bool = False) -> bool:
    """Run the demo; True only when every request of the table landed where it should.

    Ctrl-C (KeyboardInterrupt) before the table is complete proves nothing: False. With
    ``keep``, Ctrl-C is how the demo is stopped after its table: the table's verdict.
    With ``grpc``, the apps and the calls are gRPC on h2c instead of HTTP/1.1. With
    ``mirror``, a mirror: the cluster version answers, the local version gets copies.
    """
    seen = _Seen()
    cluster, local = (demo_grpc.serve_app("cluster"), demo_grpc.serve_app("local")) if grpc else \
        (_serve_app("cluster"), _serve_app("local", seen))
    loop = api.LoopThread()
    ok: bool | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="intercept-demo-") as tmp:
            creds = Path(tmp) / "credentials.json"
            agent = Agent(AgentConfig(listen=(("127.0.0.1", 0),), upstream=(("127.0.0.1", cluster.server_port),),
                                      ssh_listen=("127.0.0.1", 0), credentials=creds))
            loop.call(agent.start())
            (host, port), (_, ssh_port) = agent.http_address, agent.ssh_address
            http_addr = f"{host}:{port}"
            speaking = " (gRPC on h2c)" if grpc else ""
            echo(f"cluster version{speaking} on :{cluster.server_port}, "
                 f"agent in front of it on {http_addr} (ssh {host}:{ssh_port})")
            echo(f"local version{speaking} on :{local.server_port}")
            shown = lambda event: echo(event.line()) if event.kind in ("ready", "header") else None  # noqa: E731
            with api.intercepting(agent=f"{host}:{ssh_port}", credentials=str(creds), port=local.server_port, name=DEV,
                                  on_event=shown, mirror=mirror):
                if grpc:
                    ok = demo_grpc.send_calls(echo, http_addr, HEADER, DEV)
                elif mirror:
                    ok = _send_mirrored(echo, http_addr, seen, agent)
                else:
                    ok = _send_requests(echo, http_addr)
                if keep:
                    h2c = "--http2-prior-knowledge " if grpc else ""
                    echo(f"\ntry: curl {h2c}-H '{HEADER}: {DEV}' http://{http_addr}/   (Ctrl-C to stop)")
                    if grpc:
                        echo(f"     or any gRPC client (h2c) at {http_addr}, any method, metadata {HEADER}: {DEV}")
                    threading.Event().wait()
            loop.call(agent.close())
            return ok
    except KeyboardInterrupt:
        if ok is None:
            echo("intercept: demo: interrupted before every request was sent; nothing was shown")
            return False
        return ok
    finally:
        loop.close()
        for app in (cluster, local):
            app.shutdown()
            app.server_close()


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


COPIES_TIMEOUT = 10.0  # seconds the mirror demo waits for the copies to reach the local version


def _send_mirrored(echo: Callable[[str], None], http_addr: str, seen: _Seen, agent: Agent) -> bool:
    """The mirror's table: every request answered by the cluster version, and a copy of each
    one with the header (only those) at the local version."""
    host, port = http_addr.rsplit(":", 1)
    plan = [
        ("fresh", {HEADER: DEV}, True),
        ("fresh", {}, False),
        ("fresh", {HEADER: "someone-else"}, False),
        ("keep-alive", {}, False),
        ("keep-alive", {HEADER: DEV}, True),
        ("keep-alive", {HEADER: DEV}, True),
        ("keep-alive", {}, False),
        ("keep-alive", {"X-Intercept-Id": DEV}, True),
    ]
    answers = []
    kept = http.client.HTTPConnection(host, int(port), timeout=30)
    for i, (connection, headers, _) in enumerate(plan, 1):
        conn = kept if connection == "keep-alive" else http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", f"/demo/{i}", headers=headers)
        resp = conn.getresponse()
        answers.append(resp.read().decode().strip().removesuffix(" version") if resp.status == 200 else f"HTTP {resp.status}")
        if conn is not kept:
            conn.close()
    kept.close()
    copies = set(seen.wait_for(sum(copied for _, _, copied in plan), COPIES_TIMEOUT))
    rows = []
    for i, ((connection, headers, expected), answered) in enumerate(zip(plan, answers), 1):
        header = "; ".join(f"{k}: {v}" for k, v in headers.items()) or "(none)"
        reached = f"/demo/{i}" in copies
        good = answered == "cluster" and reached == expected
        rows.append((str(i), connection, header, answered, "yes" if expected else "no", "yes" if reached else "no",
                     "ok" if good else "WRONG"))
    titles = ("#", "connection", "header", "answered by", "copy expected", "copy reached local", "")
    widths = [max(len(r[c]) for r in rows + [titles]) for c in range(len(titles))]
    echo("")
    for row in [titles] + rows:
        echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    deadline = time.monotonic() + COPIES_TIMEOUT  # the agent counts a copy when its answer has come back
    while True:
        copied = sum(m.copied for m in agent.routes.mirrors)
        dropped = sum(m.dropped for m in agent.routes.mirrors)
        if copied + dropped >= len(copies) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    echo("")
    echo(f"intercept: demo: {sum(r[-1] == 'ok' for r in rows)}/{len(rows)} requests answered by the cluster version "
         f"with their copies where they should be (the agent counts {copied} copied, {dropped} dropped)")
    return all(r[-1] == "ok" for r in rows)



if __name__ == "__main__":  # python -m intercept.demo app NAME: one demo app alone (bench/reload.py uses it)
    import sys

    if sys.argv[1:2] != ["app"] or len(sys.argv) != 3:
        sys.exit("usage: python -m intercept.demo app NAME")
    app = _serve_app(sys.argv[2])
    print(f"demo app {sys.argv[2]} on {app.server_port}", flush=True)
    threading.Event().wait()
