"""intercept.test/servers: one real server per container, as its first argument says.

- ``redis PORT``: Debian's ``redis-server``, no persistence.
- ``postgres PORT``: Debian's PostgreSQL 15, a fresh cluster in /tmp, user ``test``,
  database ``postgres``, every client trusted (a test database, reached from other pods).
- ``grpc PORT``: an h2c gRPC server (Debian's ``python3-grpcio``) whose unary method
  ``/test.Echo/Say`` answers ``POD: `` and the request's bytes.

Every one runs as the image's user (1000), writes only under /tmp, and is replaced by the
server process (``exec``), so the container's signals reach it.
"""

from __future__ import annotations

import os
import subprocess
import sys

PG = "/usr/lib/postgresql/15/bin"


def redis(port: str) -> None:
    os.execvp("redis-server", ["redis-server", "--port", port, "--bind", "0.0.0.0", "--protected-mode", "no",
                               "--save", "", "--appendonly", "no", "--dir", "/tmp"])


def postgres(port: str) -> None:
    data = "/tmp/pg"
    subprocess.run([f"{PG}/initdb", "-D", data, "-U", "test", "--auth=trust", "-E", "UTF8", "--no-sync"], check=True,
                   stdout=subprocess.DEVNULL)
    with open(f"{data}/pg_hba.conf", "a") as hba:
        hba.write("host all all 0.0.0.0/0 trust\n")
    os.execv(f"{PG}/postgres", [f"{PG}/postgres", "-D", data, "-p", port, "-c", "listen_addresses=*",
                                "-c", "unix_socket_directories=/tmp", "-c", "fsync=off", "-c", "jit=off"])


def grpc(port: str) -> None:
    from concurrent import futures

    import grpc as g

    pod = os.environ.get("POD_NAME", "?").encode()

    def say(request: bytes, context: object) -> bytes:
        return pod + b": " + request

    server = g.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers([g.method_handlers_generic_handler("test.Echo", {
        "Say": g.unary_unary_rpc_method_handler(say)})])
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    {"redis": redis, "postgres": postgres, "grpc": grpc}[sys.argv[1]](sys.argv[2])
