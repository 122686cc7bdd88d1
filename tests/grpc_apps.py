"""gRPC apps for the tests, on grpcio's own server: no generated code, messages are raw bytes.

A :class:`GrpcApp` plays the cluster's version or a developer's local version. Every
answer names the app (initial metadata ``x-app``), so a test sees where each call landed.

Methods of ``/test.Echo/``:

  Unary          answers ``NAME:`` + the request; echoes metadata (see below)
  ServerStream   request ``b"COUNT SIZE"``: COUNT messages of SIZE bytes (the i-th filled with ``i % 256``)
  ClientStream   answers ``NAME:COUNT:LENGTH:SHA256`` of the messages it received
  Bidi           answers each message at once with ``NAME:`` + the message (ping-pong)
  Abort          request ``b"CODE"``: aborts with that status code and message ``aborted CODE``
  Wait           waits until the call is cancelled or its deadline passes; records it in ``ended``
  Big            request ``b"SIZE PAYLOAD"``: one message of SIZE bytes; trailer ``x-request-sha256`` of PAYLOAD
  Ticks          request ``b"COUNT"``: COUNT messages, each sent only after the test released
                 the previous one (``gate``): a proxy that buffers a stream cannot pass this
  Hold           waits until ``release`` is set (in-flight calls for concurrency tests)

ClientStream counts the messages it has received in ``received`` (a Condition guards it),
so a test can send the next message only once the app has the previous one.

Metadata: every request key beginning with ``x-echo`` is sent back in the initial metadata
and (with ``-t`` inserted before a ``-bin`` suffix, or appended) in the trailing metadata.
Also the standard health service (grpcio-health-checking), status SERVING.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

MB = 1 << 20
OPTIONS = [("grpc.max_receive_message_length", 64 * MB), ("grpc.max_send_message_length", 64 * MB)]


def _trailing_key(key: str) -> str:
    return key[:-4] + "-t-bin" if key.endswith("-bin") else key + "-t"


class GrpcApp:
    def __init__(self, name: str, *, max_concurrent_streams: int | None = None, port: int = 0, workers: int = 64) -> None:
        self.name = name
        self.calls = 0
        self.ended: list[str] = []  # how each Wait call ended ("cancelled", "deadline")
        self.ended_event = threading.Event()
        self.started = threading.Event()  # a Wait or streaming call has begun
        self.peak = 0  # most calls in progress at once
        self._active = 0
        self._lock = threading.Lock()
        self.gate = threading.Semaphore(0)
        self.release = threading.Event()
        self.received = 0
        self.progress = threading.Condition()
        self.requests: list[tuple[str, bytes, dict]] = []  # (method, request messages joined, metadata) of each call

        options = list(OPTIONS)
        if max_concurrent_streams is not None:
            options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            "Abort": grpc.unary_unary_rpc_method_handler(self._abort),
            "Wait": grpc.unary_unary_rpc_method_handler(self._wait),
            "Big": grpc.unary_unary_rpc_method_handler(self._big),
            "Ticks": grpc.unary_stream_rpc_method_handler(self._ticks),
            "Hold": grpc.unary_unary_rpc_method_handler(self._hold),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def close(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()

    def _begin(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls += 1
            self._active += 1
            self.peak = max(self.peak, self._active)
        with self.progress:
            self.progress.notify_all()
        context.add_callback(self._end)
        echoed = [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-echo")]
        context.send_initial_metadata([("x-app", self.name), *echoed])
        context.set_trailing_metadata([(_trailing_key(k), v) for k, v in echoed])

    def _end(self) -> None:
        with self._lock:
            self._active -= 1
        with self.progress:
            self.progress.notify_all()

    def _record(self, method: str, request: bytes, context: grpc.ServicerContext) -> None:
        with self.progress:
            self.requests.append((method, request, dict(context.invocation_metadata())))
            self.progress.notify_all()

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin(context)
        self._record("Unary", request, context)
        return self.name.encode() + b":" + request

    def _server_stream(self, request: bytes, context: grpc.ServicerContext):
        self._begin(context)
        self._record("ServerStream", request, context)
        count, size = map(int, request.split())
        for i in range(count):
            yield bytes([i % 256]) * size

    def _client_stream(self, requests, context: grpc.ServicerContext) -> bytes:
        self._begin(context)
        digest, count, length = hashlib.sha256(), 0, 0
        for message in requests:
            digest.update(message)
            count += 1
            length += len(message)
            with self.progress:
                self.received += 1
                self.progress.notify_all()
        self._record("ClientStream", bytes.fromhex(digest.hexdigest()), context)
        return f"{self.name}:{count}:{length}:{digest.hexdigest()}".encode()

    def _bidi(self, requests, context: grpc.ServicerContext):
        self._begin(context)
        seen = []
        for message in requests:
            seen.append(message)
            yield self.name.encode() + b":" + message
        self._record("Bidi", b"|".join(seen), context)

    def _abort(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin(context)
        code = next(c for c in grpc.StatusCode if c.value[0] == int(request))
        context.abort(code, f"aborted {int(request)} by {self.name}")

    def _wait(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin(context)
        done = threading.Event()
        context.add_callback(done.set)
        self.started.set()
        done.wait(60)
        self.ended.append("deadline" if context.time_remaining() is not None and context.time_remaining() <= 0 else "cancelled")
        self.ended_event.set()
        return b""

    def _big(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin(context)
        size, _, payload = request.partition(b" ")
        context.set_trailing_metadata([("x-request-sha256", hashlib.sha256(payload).hexdigest())])
        return bytes(range(256)) * (int(size) // 256) + b"\x00" * (int(size) % 256)


    def _ticks(self, request: bytes, context: grpc.ServicerContext):
        self._begin(context)
        for i in range(int(request)):
            yield b"tick %d from %s" % (i, self.name.encode())
            if i + 1 < int(request) and not self.gate.acquire(timeout=30):
                return

    def _hold(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin(context)
        with self.progress:
            self.progress.notify_all()
        self.release.wait(60)
        return b"held by " + self.name.encode()

    def wait_until(self, predicate, timeout: float = 30) -> None:
        with self.progress:
            assert self.progress.wait_for(predicate, timeout), "the app never got there"

    @property
    def active(self) -> int:
        return self._active


def channel(port: int, **options) -> grpc.Channel:
    """An insecure channel (h2c with prior knowledge, as inside a cluster)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS + list(options.items()))


def unary(ch: grpc.Channel, request: bytes = b"hi", metadata=None, timeout: float = 30, method: str = "Unary"):
    """One unary call: (response, initial metadata dict, trailing metadata dict)."""
    call = ch.unary_unary(f"/test.Echo/{method}")
    response, c = call.with_call(request, metadata=metadata, timeout=timeout)
    return response, dict(c.initial_metadata()), dict(c.trailing_metadata())


def app_of(ch: grpc.Channel, metadata=None) -> str:
    return unary(ch, b"who", metadata)[0].split(b":")[0].decode()


if __name__ == "__main__":  # a developer's local gRPC process: python -m tests.grpc_apps NAME PORT
    import sys

    app = GrpcApp(sys.argv[1], port=int(sys.argv[2]))
    print(f"serving {sys.argv[1]} on {app.port}", flush=True)
    app.server.wait_for_termination()
