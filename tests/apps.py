"""A scriptable HTTP/1.1 app for the tests, built on h11 (an independent HTTP implementation).

It plays the "cluster version" (the upstream behind the agent) or a developer's "local
version". Every answer names the app, so a test sees where each request landed. It
echoes what it received as JSON: method, target, raw header lines (case, order and
repeats as they arrived), body length and SHA-256, streamed (no body is held).

Paths:
  /status/N        status N (no body for 1xx/204/304)
  /bytes/N         N bytes with Content-Length, streamed
  /chunked/N/M     N chunks of M bytes, chunked
  /close           a body delimited by closing the connection (HTTP/1.0 style)
  /ws              101 Switching Protocols, then echoes raw bytes
  /hangup          reads the request, closes without answering (a crash)
  /idle-close      answers (keep-alive, as far as the client knows), then closes: an idle timeout
  anything else    the JSON echo
A connection whose first byte is not a letter is echoed back raw (a TCP echo server).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading

import h11

CHUNK = 64 * 1024


def accept_each(sock: socket.socket, handle, *, threaded: bool = True) -> None:
    """Accept connections on ``sock`` in a daemon thread until it is closed; ``handle(conn)``
    runs in a thread per connection (or inline, one at a time, with ``threaded=False``)."""

    def loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if threaded:
                threading.Thread(target=handle, args=(conn,), daemon=True).start()
            else:
                handle(conn)

    threading.Thread(target=loop, daemon=True).start()


class App:
    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "::1": a process on IPv6 localhost
        self.sock = socket.create_server((host, port), family=family, backlog=512, reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self.seen: list[str] = []  # "METHOD target" of every request, in order
        self.connections = 0  # TCP connections accepted
        self.requests: list[dict] = []  # every complete request: method, target, headers, body digest, connection
        self._lock = threading.Condition()
        accept_each(self.sock, self._handle)

    def wait_requests(self, count: int, timeout: float = 30) -> list[dict]:
        """The requests received, once there are ``count`` of them."""
        with self._lock:
            assert self._lock.wait_for(lambda: len(self.requests) >= count, timeout), \
                f"{self.name} received {len(self.requests)} of {count} requests within {timeout}s"
            return list(self.requests)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            first = conn.recv(CHUNK)
            if first and (not first[:1].isalpha() or first.startswith(b"PRI * HTTP/2")):
                self._echo_raw(conn, first)
                return
            h = h11.Connection(h11.SERVER)
            h.receive_data(first)
            while self._one_request(conn, h):
                h.start_next_cycle()
        except (OSError, h11.ProtocolError):
            pass
        finally:
            conn.close()

    def _echo_raw(self, conn: socket.socket, data: bytes) -> None:
        while data:
            conn.sendall(data)
            data = conn.recv(CHUNK)

    def _next(self, conn: socket.socket, h: h11.Connection):
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                if h.they_are_waiting_for_100_continue:
                    conn.sendall(h.send(h11.InformationalResponse(status_code=100, headers=[])))
                h.receive_data(conn.recv(CHUNK))
                continue
            return event

    def _one_request(self, conn: socket.socket, h: h11.Connection) -> bool:
        event = self._next(conn, h)
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return False
        request: h11.Request = event
        with self._lock:
            self.hits += 1
            self.seen.append(f"{request.method.decode()} {request.target.decode()}")
        digest, length = hashlib.sha256(), 0
        while True:
            event = self._next(conn, h)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                length += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False
        with self._lock:
            self.requests.append({"method": request.method.decode(), "target": request.target.decode(),
                                  "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw_items()],
                                  "body_length": length, "body_sha256": digest.hexdigest(), "connection": id(conn)})
            self._lock.notify_all()
        target = request.target.decode()
        parts = target.split("?")[0].strip("/").split("/")
        base = [("X-App", self.name)]
        if parts[0] == "hangup":
            return False
        if parts[0] == "status":
            status = int(parts[1])
            body = b"" if status in (204, 304) else f"{self.name} {status}\n".encode()
            headers = base + ([("Content-Length", str(len(body)))] if status not in (204, 304) else [])
            conn.sendall(h.send(h11.Response(status_code=status, headers=headers)))
            if body:
                conn.sendall(h.send(h11.Data(data=body)))
        elif parts[0] == "bytes":
            n = int(parts[1])
            conn.sendall(h.send(h11.Response(status_code=200, headers=base + [("Content-Length", str(n))])))
            block = b"x" * CHUNK
            while n:
                piece = block[: min(n, CHUNK)]
                conn.sendall(h.send(h11.Data(data=piece)))
                n -= len(piece)
        elif parts[0] == "chunked":
            count, size = int(parts[1]), int(parts[2])
            conn.sendall(h.send(h11.Response(status_code=200, headers=base + [("Transfer-Encoding", "chunked")])))
            for i in range(count):
                conn.sendall(h.send(h11.Data(data=bytes([97 + i % 26]) * size)))
        elif parts[0] == "close":
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nX-App: " + self.name.encode() + b"\r\nConnection: close\r\n\r\n"
                + self.name.encode() + b" until close\n"
            )
            return False
        elif parts[0] == "ws":
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"X-App: " + self.name.encode() + b"\r\n\r\n"
            )
            self._echo_raw(conn, h.trailing_data[0] or conn.recv(CHUNK))
            return False
        else:
            body = json.dumps(
                {
                    "app": self.name,
                    "method": request.method.decode(),
                    "target": target,
                    "http_version": request.http_version.decode(),
                    "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw_items()],
                    "body_length": length,
                    "body_sha256": digest.hexdigest(),
                }
            ).encode()
            headers = base + [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            conn.sendall(h.send(h11.Response(status_code=200, headers=headers)))
            if request.method != b"HEAD":
                conn.sendall(h.send(h11.Data(data=body)))
        conn.sendall(h.send(h11.EndOfMessage()))
        if parts[0] == "idle-close":
            return False
        return h.our_state is h11.DONE and h.their_state is h11.DONE


class Recorder:
    """A TCP relay in front of an app that records what each upstream connection carried.

    The agent's upstream is pointed here, so a test sees exactly which bytes reached the
    app on which connection, and whether the agent closed that connection.
    """

    class Conn:
        def __init__(self) -> None:
            self.sent = bytearray()  # agent -> app
            self.closed = threading.Event()  # the agent closed (or half-closed) its side

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self.conns: list[Recorder.Conn] = []
        self._lock = threading.Condition()
        accept_each(self.sock, self._relay)

    def close(self) -> None:
        self.sock.close()

    def carried(self) -> list[bytes]:
        with self._lock:
            return [bytes(c.sent) for c in self.conns]

    def wait_for(self, marker: bytes, timeout: float = 30) -> Conn:
        """The upstream connection that carried ``marker``, once it has."""
        with self._lock:
            found = self._lock.wait_for(lambda: next((c for c in self.conns if marker in c.sent), None), timeout)
        assert found is not None, f"no upstream connection carried {marker!r} within {timeout}s"
        return found

    def _relay(self, down: socket.socket) -> None:
        record = Recorder.Conn()
        with self._lock:
            self.conns.append(record)
        up = socket.create_connection(("127.0.0.1", self.target_port))

        def back() -> None:
            try:
                while data := up.recv(CHUNK):
                    down.sendall(data)
            except OSError:
                pass
            try:
                down.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        threading.Thread(target=back, daemon=True).start()
        try:
            while data := down.recv(CHUNK):
                with self._lock:
                    record.sent += data
                    self._lock.notify_all()
                up.sendall(data)
        except OSError:
            pass
        finally:
            record.closed.set()
            try:
                up.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def read_responses(source: socket.socket | bytes, count: int, methods: list[bytes] | None = None) -> list[tuple[h11.Response, bytes]]:
    """``count`` responses, read with h11 (an independent parser) from a keep-alive
    connection, or from the bytes it already gave (``methods``: of the requests, for HEAD)."""
    h = h11.Connection(h11.CLIENT)
    if isinstance(source, bytes):
        h.receive_data(source)
    out: list[tuple[h11.Response, bytes]] = []
    for method in methods or [b"GET"] * count:
        if out:
            h.start_next_cycle()
        h.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        h.send(h11.EndOfMessage())
        resp, body = None, b""
        while not isinstance(event := h.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                assert not isinstance(source, bytes), f"only {len(out)} of {count} responses in {source!r}"
                h.receive_data(source.recv(65536))
            elif isinstance(event, h11.Response):
                resp = event
            elif isinstance(event, h11.Data):
                body += event.data
        out.append((resp, body))
    return out


class EventStream:
    """A server of endless ``text/event-stream`` responses whose events the test sends.

    Each connection gets one chunked response (``X-App: NAME``); :meth:`send` writes an
    event to every stream open, :meth:`end` finishes them (the last chunk). The test
    reads them with :func:`read_events`, so it synchronizes on what arrived, never on time.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._streams: list[socket.socket] = []
        self._opened = threading.Condition()
        accept_each(self.sock, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            head += chunk
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"X-App: %s\r\n\r\n" % self.name.encode())
        with self._opened:
            self._streams.append(conn)
            self._opened.notify_all()

    def wait_open(self, count: int = 1) -> None:
        with self._opened:
            assert self._opened.wait_for(lambda: len(self._streams) >= count, 30), "no stream opened"

    def send(self, text: str) -> None:
        data = f"data: {text}\n\n".encode()
        for conn in self._streams:
            conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def end(self) -> None:
        for conn in self._streams:
            conn.sendall(b"0\r\n\r\n")
            conn.close()
        self._streams.clear()

    def close(self) -> None:
        self.sock.close()
        for conn in self._streams:
            conn.close()


class EventReader:
    """The client side of one event stream on a raw socket, parsed with h11."""

    def __init__(self, port: int, headers: list[tuple[str, str]], path: str = "/events") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.h = h11.Connection(h11.CLIENT)
        self.sock.sendall(self.h.send(h11.Request(method="GET", target=path, headers=[("Host", "a"), *headers]))
                          + self.h.send(h11.EndOfMessage()))
        self.response = self._next(h11.Response)

    def _next(self, *kinds: type) -> object:
        while True:
            event = self.h.next_event()
            if event is h11.NEED_DATA:
                self.h.receive_data(self.sock.recv(65536))
                continue
            assert isinstance(event, kinds), event
            return event

    def header(self, name: str) -> str | None:
        return next((v.decode() for k, v in self.response.headers if k.decode().lower() == name.lower()), None)

    def event(self) -> bytes | None:
        """The next event's bytes; None when the response ended (its last chunk came)."""
        event = self._next(h11.Data, h11.EndOfMessage)
        return event.data if isinstance(event, h11.Data) else None

    def cut(self) -> bool:
        """Read to the end: True if the connection closed before the response ended."""
        try:
            while self.event() is not None:
                pass
        except h11.RemoteProtocolError:  # EOF inside the chunked body
            return True
        return False

    def close(self) -> None:
        self.sock.close()


class Relay:
    """A TCP relay to loopback ``port`` whose directions can be held without closing anything:
    a link whose packets are all dropped (a laptop's Wi-Fi gone, a VPN that stalls).
    ``forth`` carries what the connecting side sends, ``back`` what ``port`` answers."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.forth, self.back = threading.Event(), threading.Event()
        self.carry()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, *directions: threading.Event) -> None:
        """Stop carrying ``directions`` (both when none is named)."""
        for direction in directions or (self.forth, self.back):
            direction.clear()

    def carry(self) -> None:
        self.forth.set()
        self.back.set()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            for src, dst, direction in ((a, b, self.forth), (b, a, self.back)):
                threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                direction.wait()  # held: nothing goes through, nothing is closed
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def close(self) -> None:
        self.listener.close()
