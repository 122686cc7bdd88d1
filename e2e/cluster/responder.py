"""The stand-in for an image the harness does not know: an HTTP responder on each declared port.

    python -m e2e.cluster.responder --pod NAME --namespace NS --container NAME --port P [--port Q ...]

Every request, any method and path, is answered 200 with the header
``X-Served-By: POD/CONTAINER`` and a JSON body ``{"pod", "namespace", "container", "port",
"method", "path"}``; with no port it just waits (a container that serves nothing).
Prints ``responder: serving POD/CONTAINER on ports P,Q`` once listening.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(pod: str, namespace: str, container: str, ports: list[int]) -> None:
    servers = []
    for port in ports:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            served_port = port

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps({"pod": pod, "namespace": namespace, "container": container,
                                   "port": self.served_port, "method": self.command, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("X-Served-By", f"{pod}/{container}")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"responder: serving {pod}/{container} on ports {','.join(map(str, ports)) or 'none'}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster.responder")
    parser.add_argument("--pod", required=True)
    parser.add_argument("--namespace", default="")
    parser.add_argument("--container", required=True)
    parser.add_argument("--port", type=int, action="append", default=[])
    options = parser.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    serve(options.pod, options.namespace, options.container, options.port)


if __name__ == "__main__":
    main(sys.argv[1:])
