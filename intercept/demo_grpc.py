"""``intercept demo --grpc``: the demo's two versions and its client, on HTTP/2 with gRPC framing.

The apps are small h2c servers on python-hyper h2 (grpcio is not needed): every call,
whatever its method, is one length-prefixed message in and one out, ``<name> version``,
with ``grpc-status: 0`` as a trailer. A request that is not gRPC (``curl
--http2-prior-knowledge``) is answered the same text as plain HTTP/2.

The client opens one h2c connection (prior knowledge) and sends its calls in batches:
every call of a batch is written before any answer is read, so the streams of one
connection are in flight at once and must split between the two versions.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions

Metadata = list[tuple[bytes, bytes]]

METHOD = b"/intercept.demo.Version/Which"
GRPC_OK, GRPC_INVALID_ARGUMENT = b"0", b"3"


def message(payload: bytes) -> bytes:
    """One gRPC message: uncompressed flag, 4-byte big-endian length, the bytes."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def only_message(body: bytes) -> bytes | None:
    """The payload when ``body`` is exactly one uncompressed gRPC message, else None."""
    if len(body) < 5 or body[0] != 0 or struct.unpack(">I", body[1:5])[0] != len(body) - 5:
        return None
    return body[5:]


class _VersionHandler(socketserver.BaseRequestHandler):
    """One h2c connection of a demo app; answers each stream when its request has ended."""

    version_name = "?"

    def handle(self) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        self.request.sendall(conn.data_to_send())
        requests: dict[int, tuple[Metadata, bytearray]] = {}
        try:
            while data := self.request.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        requests[event.stream_id] = (event.headers, bytearray())
                    elif isinstance(event, h2.events.DataReceived):
                        requests[event.stream_id][1].extend(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        self._answer(conn, event.stream_id, *requests.pop(event.stream_id))
                    elif isinstance(event, h2.events.StreamReset):
                        requests.pop(event.stream_id, None)
                self.request.sendall(conn.data_to_send())
        except h2.exceptions.ProtocolError:  # h2 has queued the GOAWAY that names the error
            self.request.sendall(conn.data_to_send())
        except OSError:  # the agent or a --keep client went away: so does this connection
            pass

    def _answer(self, conn: h2.connection.H2Connection, stream_id: int, headers: Metadata, body: bytearray) -> None:
        text = f"{self.version_name} version".encode()
        if not dict(headers).get(b"content-type", b"").startswith(b"application/grpc"):
            conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"text/plain"),
                                          (b"content-length", str(len(text) + 1).encode())])
            conn.send_data(stream_id, text + b"\n", end_stream=True)
            return
        conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        if only_message(bytes(body)) is None:  # a message cut or merged on the way: say so
            conn.send_headers(stream_id, [(b"grpc-status", GRPC_INVALID_ARGUMENT),
                                          (b"grpc-message", b"expected%20one%20length-prefixed%20message")],
                              end_stream=True)
            return
        conn.send_data(stream_id, message(text))
        conn.send_headers(stream_id, [(b"grpc-status", GRPC_OK)], end_stream=True)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True

    @property
    def server_port(self) -> int:
        return self.server_address[1]


def serve_app(name: str) -> _Server:
    """A demo gRPC app in a thread on loopback: answers every call with "<name> version"."""
    handler = type("Handler", (_VersionHandler,), {"version_name": name})
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name=f"demo grpc app {name}", daemon=True).start()
    return server


class _Call:
    def __init__(self, batch: int, metadata: Metadata, expected: str) -> None:
        self.batch, self.metadata, self.expected = batch, metadata, expected
        self.stream_id = 0
        self.status = b""
        self.grpc_status = b""
        self.body = bytearray()
        self.ended = False

    def answered_by(self) -> str:
        if not self.ended:
            return "no answer"
        if not self.status:
            return "reset"
        if self.status != b"200":
            return f"HTTP {self.status.decode()}"
        payload = only_message(bytes(self.body))
        return "?" if payload is None else payload.decode(errors="replace").removesuffix(" version")

    def landed(self) -> bool:
        return self.grpc_status == GRPC_OK and self.answered_by() == self.expected


def send_calls(echo: Callable[[str], None], address: str, header: str, value: str) -> bool:
    """The demo's calls on one h2c connection to ``address``; prints the table; True when all landed."""
    mine, theirs = [(header.encode(), value.encode())], [(header.encode(), b"someone-else")]
    plan = [
        [(mine, "local"), ([], "cluster"), (theirs, "cluster"), (mine, "local"), ([], "cluster"), (mine, "local")],
        [([], "cluster"), (mine, "local"), (mine, "local"), ([], "cluster")],
    ]
    calls = [_Call(n, metadata, expected) for n, batch in enumerate(plan, 1) for metadata, expected in batch]
    host, port = address.rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for n in range(1, len(plan) + 1):
            batch = [c for c in calls if c.batch == n]
            for call in batch:
                call.stream_id = conn.get_next_available_stream_id()
                conn.send_headers(call.stream_id, [
                    (b":method", b"POST"), (b":scheme", b"http"), (b":authority", address.encode()), (b":path", METHOD),
                    (b"content-type", b"application/grpc"), (b"te", b"trailers"), *call.metadata])
                conn.send_data(call.stream_id, message(b"which version?"), end_stream=True)
            sock.sendall(conn.data_to_send())  # the whole batch before any answer is read
            if not _receive(sock, conn, {c.stream_id: c for c in batch}):
                break
    _print_table(echo, calls)
    return all(c.landed() for c in calls)


def _receive(sock: socket.socket, conn: h2.connection.H2Connection, calls: dict[int, _Call]) -> bool:
    """Read until every call in ``calls`` has ended; False when the connection ends first."""
    while not all(c.ended for c in calls.values()):
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        if not data:
            return False
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            return False
        for event in events:
            call = calls.get(getattr(event, "stream_id", 0))
            if call is None:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                call.status = dict(event.headers).get(b":status", b"")
                call.grpc_status = dict(event.headers).get(b"grpc-status", call.grpc_status)  # trailers-only
            elif isinstance(event, h2.events.DataReceived):
                call.body.extend(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                call.grpc_status = dict(event.headers).get(b"grpc-status", b"")
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                call.ended = True
        sock.sendall(conn.data_to_send())
    return True


def _print_table(echo: Callable[[str], None], calls: list[_Call]) -> None:
    rows = []
    for i, c in enumerate(calls, 1):
        metadata = "; ".join(f"{k.decode()}: {v.decode()}" for k, v in c.metadata) or "(none)"
        rows.append((str(i), str(c.batch), str(c.stream_id), metadata, c.expected, c.answered_by(),
                     c.grpc_status.decode() or "-", "ok" if c.landed() else "WRONG"))
    titles = ("#", "batch", "stream", "metadata", "expected", "answered by", "grpc-status", "")
    widths = [max(len(r[col]) for r in rows + [titles]) for col in range(len(titles))]
    echo("")
    echo("one h2c connection; each batch's calls in flight at once")
    for row in [titles] + rows:
        echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    echo("")
    echo(f"intercept: demo: {sum(c.landed() for c in calls)}/{len(calls)} gRPC calls landed where they should")
