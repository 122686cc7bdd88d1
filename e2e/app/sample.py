"""The e2e sample app, and the probe that calls it from inside the cluster (stdlib only).

    python sample.py serve --port 8080 [--name NAME]
        Answers every request 200 with the body "NAME\\n" and the header X-Served-By: NAME.
        NAME defaults to "cluster/$POD_NAME": the cluster's version, naming its pod
        ("$SAMPLE_VERSION/$POD_NAME" where the image sets SAMPLE_VERSION: a changed build).
        The developer's "local version" runs the same file with --name local.
        With $DOWNSTREAM (a URL), each request first calls it, passing on the routing key
        (x-intercept-id and baggage) as a service that propagates it would, and answers
        with X-Downstream: what served that call.

    python sample.py probe URL [-H "NAME: VALUE"] [-n COUNT]
        COUNT requests (fresh connections) to URL; prints each X-Served-By, one a line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


PROPAGATED = ("x-intercept-id", "baggage")


def serve(port: int, name: str) -> None:
    body = f"{name}\n".encode()
    downstream = os.environ.get("DOWNSTREAM")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            called = None
            if downstream:
                key = {h: self.headers[h] for h in PROPAGATED if self.headers.get(h)}
                with urllib.request.urlopen(urllib.request.Request(downstream, headers=key), timeout=30) as response:
                    called = response.headers.get("X-Served-By", "?")
            self.send_response(200)
            self.send_header("X-Served-By", name)
            if called is not None:
                self.send_header("X-Downstream", called)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    # In a container this is PID 1, for which the kernel ignores SIGTERM unless handled: without this
    # every pod of the sample would wait out its grace period (30 s) at each rollout.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    # one write for the line and its end: under PYTHONUNBUFFERED print makes two, and another
    # process writing to the same pipe (intercept start, whose COMMAND this is) can land between
    sys.stdout.write(f"sample: serving as {name} on port {port}\n")
    sys.stdout.flush()
    server.serve_forever()


def probe(url: str, headers: list[str], count: int) -> None:
    fields = dict(h.split(":", 1) for h in headers)
    for _ in range(count):
        request = urllib.request.Request(url, headers={k.strip(): v.strip() for k, v in fields.items()})
        with urllib.request.urlopen(request, timeout=30) as response:
            print(response.headers.get("X-Served-By", "?"), flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sample.py")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("serve")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--name", default=f"{os.environ.get('SAMPLE_VERSION', 'cluster')}/{os.environ.get('POD_NAME', 'unknown')}")
    p = commands.add_parser("probe")
    p.add_argument("url")
    p.add_argument("-H", "--header", action="append", default=[])
    p.add_argument("-n", "--count", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port, args.name)
    else:
        probe(args.url, args.header, args.count)


if __name__ == "__main__":
    main(sys.argv[1:])
