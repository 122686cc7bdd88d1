"""A plain HTTP/2 (h2c, prior knowledge) app for the tests, on python-hyper h2 in a thread.

Every response is JSON naming the app, with the request's method, path, headers (as
received) and body length; header ``x-app`` names the app too. A request for
``/bytes/N`` is answered N bytes instead; one with the header ``x-goaway`` is answered,
then the app sends GOAWAY and closes the connection.
"""

from __future__ import annotations

import asyncio
import json
import threading

import h2.config
import h2.connection
import h2.events


class _Conn(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.requests: dict[int, dict] = {}
        self.leaving = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.requests[ev.stream_id] = {"headers": [(k.decode(), v.decode()) for k, v in ev.headers], "length": 0}
            elif isinstance(ev, h2.events.DataReceived):
                self.requests[ev.stream_id]["length"] += len(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self._answer(ev.stream_id)
        self.transport.write(self.conn.data_to_send())
        if self.leaving:
            self.transport.close()

    def _answer(self, stream_id: int) -> None:
        req = self.requests.pop(stream_id)
        pseudo = dict(h for h in req["headers"] if h[0].startswith(":"))
        path = pseudo.get(":path") or ""
        if path.startswith("/bytes/"):  # (within the stream's window)
            body = b"x" * int(path[len("/bytes/"):])
        else:
            body = json.dumps(
                {"app": self.name, "method": pseudo.get(":method"), "path": path,
                 "headers": req["headers"], "body_length": req["length"]}
            ).encode()
        self.conn.send_headers(stream_id, [(":status", "200"), ("x-app", self.name), ("content-type", "application/json"),
                                           ("content-length", str(len(body)))])
        step = self.conn.max_outbound_frame_size
        for i in range(0, len(body), step):
            self.conn.send_data(stream_id, body[i : i + step])
        self.conn.end_stream(stream_id)
        if any(k == "x-goaway" for k, _ in req["headers"]):
            self.conn.close_connection()
            self.leaving = True


class H2App:
    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(self.loop.create_server(lambda: _Conn(name), "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
