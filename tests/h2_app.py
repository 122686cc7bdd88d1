"""A plain HTTP/2 (h2c, prior knowledge) app for the tests, on python-hyper h2 in a thread.

Every response is JSON naming the app, with the request's method, path, headers (as
received) and body length; header ``x-app`` names the app too. A request for
``/bytes/N`` is answered N bytes instead; one with the header ``x-goaway`` is answered,
then the app sends GOAWAY and closes the connection.

A request whose header ``x-refuse`` has a value the app has not seen before is refused
unprocessed (RFC 9113 section 8.7): with RST_STREAM REFUSED_STREAM, or, for a value
starting ``goaway``, with a GOAWAY whose last stream is the one before it. ``refused``
lists those values, in order.
"""

from __future__ import annotations

import asyncio
import json
import threading

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions


class _Conn(asyncio.Protocol):
    def __init__(self, name: str, refused: list[str]) -> None:
        self.name = name
        self.refused = refused
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
                headers = [(k.decode(), v.decode()) for k, v in ev.headers]
                refuse = dict(headers).get("x-refuse")
                if refuse is not None and refuse not in self.refused:
                    self.refused.append(refuse)
                    if refuse.startswith("goaway"):
                        self.conn.close_connection(last_stream_id=ev.stream_id - 2)
                        self.leaving = True
                    else:
                        self.conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    continue
                self.requests[ev.stream_id] = {"headers": headers, "length": 0}
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ev.stream_id in self.requests:
                    self.requests[ev.stream_id]["length"] += len(ev.data)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in self.requests:
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
        self.refused: list[str] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(self.loop.create_server(lambda: _Conn(name, self.refused), "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
