"""The tests' stand-in for any HTTP service: one HTTP/1.1 server per port in $PORTS (stdlib only).

    PORTS=8080,9090 python echo.py        (PORTS defaults to 8080)

Every request, any method and path, is answered 200 with the header
``X-Served-By: $HOSTNAME`` (in a pod: the pod's name) and a JSON body
``{"pod", "port", "method", "path", "headers"}`` (headers as ``[name, value]`` pairs, in
order). Prints ``echo: serving POD on ports P,Q`` once every port listens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(pod: str, ports: list[int]) -> list[ThreadingHTTPServer]:
    servers = []
    for port in ports:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            served_port = port

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps({"pod": pod, "port": self.served_port, "method": self.command, "path": self.path,
                                   "headers": list(self.headers.items())}).encode()
                self.send_response(200)
                self.send_header("X-Served-By", pod)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
            daemon_threads = True

            def server_bind(self) -> None:  # every address, IPv4 and IPv6, without a name lookup
                if self.address_family == socket.AF_INET6:
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.socket.bind(self.server_address)
                self.server_address = self.socket.getsockname()[:2]

        server = Server(("::" if socket.has_ipv6 else "0.0.0.0", port), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return servers


def main() -> None:
    ports = [int(p) for p in os.environ.get("PORTS", "8080").split(",") if p.strip()]
    pod = os.environ.get("HOSTNAME") or socket.gethostname()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    serve(pod, ports)
    print(f"echo: serving {pod} on ports {','.join(map(str, ports))}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    main()
