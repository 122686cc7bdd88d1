"""One write per SSH packet (intercept.sshwrite): what is held, when it goes, and that nothing
is lost or reordered through a real agent and client."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import random
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, cast

import asyncssh
import pytest

from intercept.protocol import ENCRYPTION_ALGS
from intercept.sshwrite import (
    HELD_MAX,
    HOLD_MAX,
    IDLE,
    JOIN_MAX,
    REST,
    SO_MAX_PACING_RATE,
    CoalescingTransport,
    CoalescingTunnel,
    Pacing,
    _UnsentBound,
)
from tests.conftest import echo, start_client
from tests.fakeclock import AnyLogin, FakeLoop

IGNORE = b"i" * 36  # an encrypted empty SSH_MSG_IGNORE with aes128-gcm@openssh.com


class FakeTransport:
    """Records what reaches the socket: one entry per write(2) it would make."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.closing = False

    @property
    def writes(self) -> list[bytes]:
        return [data for kind, data in self.events if kind == "write"]

    def write(self, data: bytes) -> None:
        assert not self.closing
        self.events.append(("write", bytes(data)))

    def writelines(self, parts: Any) -> None:
        self.events.append(("write", b"".join(parts)))  # one writev(2)

    def write_eof(self) -> None:
        self.events.append(("eof", b""))

    def close(self) -> None:
        self.closing = True
        self.events.append(("close", b""))

    def abort(self) -> None:
        self.closing = True
        self.events.append(("abort", b""))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 1000

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.0.0.1", 22)}.get(name, default)

    def pause_reading(self) -> None:
        self.events.append(("pause_reading", b""))

    def resume_reading(self) -> None:
        self.events.append(("resume_reading", b""))


def _wrapped() -> tuple[CoalescingTransport, FakeTransport, FakeLoop]:
    inner, loop = FakeTransport(), FakeLoop()
    return CoalescingTransport(cast(asyncio.Transport, inner), cast(asyncio.AbstractEventLoop, loop)), inner, loop


def test_an_ignore_and_its_packet_are_one_write_at_once():
    t, inner, loop = _wrapped()
    packet = b"p" * 200
    t.write(IGNORE)
    assert inner.writes == []
    t.write(packet)
    assert inner.writes == [IGNORE + packet]  # not deferred: written in the same call
    loop.end_iteration()
    assert inner.writes == [IGNORE + packet]


def test_a_large_packet_goes_with_its_ignore_in_one_writelines():
    t, inner, loop = _wrapped()
    packet = bytes(range(256)) * ((JOIN_MAX + 4096) // 256)
    t.write(IGNORE)
    t.write(packet)
    assert inner.writes == [IGNORE + packet]


def test_a_held_write_that_nothing_follows_goes_at_the_end_of_the_iteration():
    t, inner, loop = _wrapped()
    t.write(IGNORE)
    t.write(b"w" * 36)  # a window adjust: tiny too, held with it
    assert inner.writes == []
    assert len(loop.queued) == 1
    loop.end_iteration()
    assert inner.writes == [IGNORE + b"w" * 36]
    assert loop.queued == []  # nothing held: nothing queued for the next iteration


def test_one_flush_is_queued_per_iteration_however_many_packets():
    t, inner, loop = _wrapped()
    for i in range(50):
        t.write(IGNORE)
        t.write(bytes([i]) * 100)
    assert len(loop.queued) == 1
    assert inner.writes == [IGNORE + bytes([i]) * 100 for i in range(50)]
    loop.end_iteration()
    t.write(IGNORE)
    assert len(loop.queued) == 1  # a new iteration, a new flush
    loop.end_iteration()
    assert inner.writes[-1] == IGNORE


def test_larger_writes_are_never_held_and_order_is_kept():
    t, inner, loop = _wrapped()
    t.write(b"a" * (HOLD_MAX + 1))
    assert inner.writes == [b"a" * (HOLD_MAX + 1)]
    t.write(b"b")
    t.write(b"c" * 2)
    t.write(b"d" * 500)
    t.write(b"e")
    loop.end_iteration()
    assert b"".join(inner.writes) == b"a" * (HOLD_MAX + 1) + b"b" + b"cc" + b"d" * 500 + b"e"
    assert inner.writes[1:] == [b"bcc" + b"d" * 500, b"e"]


def test_tiny_writes_in_a_row_are_held_together_up_to_a_bound():
    t, inner, loop = _wrapped()
    for _ in range(HELD_MAX // 32):
        t.write(b"x" * 32)
    assert inner.writes == []
    assert t.get_write_buffer_size() == 1000 + HELD_MAX
    t.write(b"y" * 32)  # would pass the bound: everything goes, this one too
    assert inner.writes == [b"x" * HELD_MAX + b"y" * 32]
    assert t.get_write_buffer_size() == 1000
    loop.end_iteration()
    assert len(inner.writes) == 1


def test_mutable_buffers_are_copied_when_held():
    t, inner, loop = _wrapped()
    buf = bytearray(b"abc")
    t.write(buf)
    buf[:] = b"zzz"
    loop.end_iteration()
    assert inner.writes == [b"abc"]


@pytest.mark.parametrize("ending", ["close", "abort", "eof"])
def test_close_abort_and_eof_send_what_was_written_before_them(ending):
    t, inner, loop = _wrapped()
    t.write(IGNORE)
    getattr(t, {"eof": "write_eof"}.get(ending, ending))()
    assert inner.events == [("write", IGNORE), (ending, b"")]
    loop.end_iteration()  # the queued flush finds nothing
    assert inner.events == [("write", IGNORE), (ending, b"")]


def test_held_bytes_are_dropped_if_the_socket_closed_on_its_own():
    t, inner, loop = _wrapped()
    t.write(IGNORE)
    inner.closing = True  # the peer went: the socket's transport closes itself
    assert t.is_closing()
    loop.end_iteration()
    assert inner.writes == []


def test_everything_else_is_the_inner_transports():
    t, inner, loop = _wrapped()
    assert t.get_extra_info("peername") == ("10.0.0.1", 22)
    assert t.get_extra_info("nothing", 7) == 7
    assert t.get_write_buffer_size() == 1000
    t.pause_reading()
    t.resume_reading()
    assert [kind for kind, _ in inner.events] == ["pause_reading", "resume_reading"]


def test_the_flush_runs_before_the_loop_polls_again():
    """On a real loop: a callback queued after the held write sees it written."""

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        inner = FakeTransport()
        t = CoalescingTransport(cast(asyncio.Transport, inner), loop)
        seen: asyncio.Future[list[bytes]] = loop.create_future()
        t.write(IGNORE)
        loop.call_soon(lambda: seen.set_result(list(inner.writes)))
        return await seen

    assert asyncio.run(main()) == [IGNORE]


# -- asyncssh over the tunnel, in one process ---------------------------------------------


class _Echo(asyncssh.SSHTCPSession[bytes]):
    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.chan.write(data)


class _Server(AnyLogin):
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> _Echo:
        return _Echo()


class _Received(asyncssh.SSHTCPSession[bytes]):
    def __init__(self) -> None:
        self.data = b""
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.data += data
        self.arrived.set()


class _CountingTransport:
    """Stands in for the socket's transport under the client's CoalescingTransport: counts writes."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        self.writes.append(len(data))
        self.inner.write(data)

    def writelines(self, parts: Any) -> None:
        parts = list(parts)
        self.writes.append(sum(map(len, parts)))
        self.inner.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _run(loop_kind: str, main: Callable[[], Any]) -> Any:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    return asyncio.run(main())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("cipher", ENCRYPTION_ALGS)
def test_each_channel_packet_costs_one_socket_write(cipher, loop_kind):
    """Whatever cipher is negotiated, its IGNORE is small enough to be held for its packet."""

    async def main() -> tuple[list[int], bytes]:
        listening = socket.create_server(("127.0.0.1", 0))
        listening.setblocking(False)
        port = listening.getsockname()[1]
        server = await asyncssh.create_server(
            _Server, "127.0.0.1", port, tunnel=CoalescingTunnel(sock=listening),
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")], encryption_algs=[cipher],
        )  # fmt: skip
        tunnel = CoalescingTunnel()
        async with await asyncssh.connect(
            "127.0.0.1", port, tunnel=tunnel, known_hosts=None, username="u", password="p", client_keys=None,
            agent_path=None, preferred_auth="password", encryption_algs=[cipher], config=None,
        ) as conn:  # fmt: skip
            chan, received = await conn.create_connection(_Received, "echo", 1)
            assert tunnel.transport is not None
            counting = _CountingTransport(tunnel.transport.inner)
            tunnel.transport.inner = cast(asyncio.Transport, counting)
            sent = b""
            for size in (1, 6, 7, 22, 23, 100, 1500, 20000):
                piece = bytes([size % 251]) * size
                chan.write(piece)
                sent += piece
                while len(received.data) < len(sent):
                    received.arrived.clear()
                    await received.arrived.wait()
            writes = list(counting.writes)
        server.close()
        await server.wait_closed()
        assert received.data == sent
        return writes, sent

    writes, _ = _run(loop_kind, main)
    assert len(writes) == 8, writes  # eight data packets, each with its IGNORE, in eight writes


# -- through a real agent and client ----------------------------------------------------------


def _ws_echo_roundtrip(port: int, header: str, seed: int, total: int) -> None:
    """An upgraded connection routed to the developer's app, which echoes raw bytes: ``total``
    bytes in writes of mixed sizes (many of a few bytes), read back concurrently, compared in order."""
    rng = random.Random(seed)
    data = rng.randbytes(total)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(
            f"GET /ws HTTP/1.1\r\nHost: a\r\n{header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101") and b"X-App: local" in head, head

        def send() -> None:
            at = 0
            while at < total:
                step = rng.choice((1, 3, 7, 20, 64, 1000, 40000, 300000))
                s.sendall(data[at : at + step])
                at += step

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while len(got) < total:
            chunk = s.recv(1 << 20)
            assert chunk, f"connection {seed} closed after {len(got)} of {total} bytes"
            got += chunk
        sender.join()
        assert got == data, f"connection {seed}: the echo differs from what was sent"


def test_data_through_agent_and_client_is_intact_and_in_order_under_flow_control(agent, local_app, clients):
    clients.append(start_client(agent, local_app.port, "--header", "x-dev=wren", "--name", "wren"))
    # 12 channels at once, each 3 MB both ways: far beyond an SSH channel's window (2 MiB), so
    # windows fill and writes pause and resume while the packets of all channels interleave.
    errors: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            _ws_echo_roundtrip(agent.http_port, "x-dev: wren", seed, 3_000_000)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    # and plain HTTP bodies both ways on one keep-alive connection
    body = random.Random(99).randbytes(40_000_000)
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=60)
    conn.request("POST", "/upload", body=body, headers={"x-dev": "wren"})
    reply = echo(conn.getresponse().read())
    assert (reply["app"], reply["body_length"], reply["body_sha256"]) == ("local", len(body), hashlib.sha256(body).hexdigest())
    conn.request("GET", "/chunked/400/100003", headers={"x-dev": "wren"})
    resp = conn.getresponse()
    got = resp.read()
    assert resp.getheader("X-App") == "local"
    assert got == b"".join(bytes([97 + i % 26]) * 100003 for i in range(400))
    conn.request("GET", "/small", headers={"x-dev": "wren"})  # the connection is still in step
    assert echo(conn.getresponse().read())["target"] == "/small"
    conn.close()


# -- pacing a bulk sender under the link's rate (issue 27) -----------------------------------

LINK = 12.5e6  # bytes per second: 100 Mbit/s
RTT = 0.040
BDP = int(LINK * RTT)  # what the path holds: 500 kB


def test_a_transfer_that_builds_no_queue_is_not_capped():
    pacing = Pacing()
    assert [pacing.look(t / 10, RTT + 0.001, RTT, LINK, BDP) for t in range(20)] == [None] * 20


def test_a_slow_start_is_no_queue_though_more_is_in_flight_than_its_delivery_rate_shows():
    pacing = Pacing()
    assert pacing.look(0.0, RTT + 0.001, RTT, LINK / 4, BDP) is None


def test_delayed_acks_of_a_slow_sender_are_no_queue_though_the_rtt_grows():
    pacing = Pacing()
    assert pacing.look(0.0, RTT + 0.025, RTT, 70_000, 3 * 1448) is None


def test_a_standing_queue_gets_a_cap_under_the_delivery_rate_that_drains_it():
    pacing = Pacing()
    queued = int(0.060 * LINK)  # 60 ms of the link in the bottleneck's queue
    cap = pacing.look(0.0, RTT + 0.060, RTT, LINK, BDP + queued)
    assert cap is not None and LINK * 0.8 < cap < LINK
    # the smaller the queue, the less the cap is under the link
    assert pacing.look(0.1, RTT + 0.020, RTT, LINK, BDP + queued // 3) > cap


def test_once_the_queue_is_gone_the_cap_grows_until_a_queue_appears_again():
    pacing = Pacing()
    caps = [pacing.look(0.0, RTT + 0.060, RTT, LINK, BDP + int(0.060 * LINK))]
    for i in range(1, 5):
        caps.append(pacing.look(0.1 * i, RTT + 0.001, RTT, caps[-1], int(caps[-1] * RTT)))
    assert caps == sorted(caps) and len(set(caps)) == 5 and caps[-1] > LINK
    assert pacing.look(0.5, RTT + 0.030, RTT, LINK, BDP + int(0.030 * LINK)) < LINK


def test_a_queue_the_cap_cannot_drain_is_others_and_the_cap_goes_for_a_while():
    """Other traffic filling the bottleneck must not make the tunnel yield to it for ever."""
    pacing = Pacing()
    t, caps = 0.0, []
    while t < 5.0:
        caps.append(pacing.look(t, RTT + 0.080, RTT, LINK / 2, BDP))
        t += 0.1
    assert caps[0] is not None and None in caps
    gave_up = caps.index(None)
    assert set(caps[gave_up:]) == {None}  # resting: no cap however long the queue
    assert pacing.look(t + REST, RTT + 0.080, RTT, LINK / 2, BDP) is not None  # then it tries again


def test_a_near_path_is_never_capped_though_a_busy_cpu_delays_its_acks():
    """Loopback or a LAN: milliseconds of delay there are the CPU's, not a queue, and a cap
    from a starved receiver's delivery rate would slow the transfer for nothing."""
    pacing = Pacing()
    assert [pacing.look(t / 10, 0.008, 0.00005, 2e6, 4 << 20) for t in range(20)] == [None] * 20


def test_a_cap_is_dropped_after_the_sender_was_idle():
    pacing = Pacing()
    assert pacing.look(0.0, RTT + 0.060, RTT, LINK, 2 * BDP) is not None
    assert pacing.look(IDLE + 1, RTT + 0.001, RTT, LINK, BDP) is None


class Timers:
    """An event loop's ``time`` and ``call_later``: the test says when time passes."""

    def __init__(self) -> None:
        self.now = 0.0
        self.due: list[Timers.Handle] = []

    class Handle:
        def __init__(self, when: float, callback: Callable[[], Any]) -> None:
            self.when, self.callback, self.cancelled = when, callback, False

        def cancel(self) -> None:
            self.cancelled = True

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], Any]) -> Timers.Handle:
        handle = Timers.Handle(self.now + delay, callback)
        self.due.append(handle)
        return handle

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for handle in [h for h in self.due if h.when <= self.now]:
            self.due.remove(handle)
            if not handle.cancelled:
                handle.callback()


@pytest.mark.skipif(SO_MAX_PACING_RATE is None, reason="SO_MAX_PACING_RATE is Linux's")
def test_the_cap_reaches_the_socket_and_goes_once_the_sender_is_idle():
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as sock:
        timers = Timers()
        bound = _UnsentBound(sock, cast(asyncio.AbstractEventLoop, timers))

        def kernel_cap() -> int:
            return struct.unpack("I", sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, 4))[0]

        bound.pace(3_000_000.7)
        assert kernel_cap() == 3_000_000
        timers.advance(IDLE / 2)
        bound.pace(3_100_000)  # a look while the transfer goes on: the idle clock starts again
        timers.advance(IDLE * 0.9)
        assert kernel_cap() == 3_100_000
        timers.advance(IDLE * 0.2)  # no look for IDLE seconds: a small response is not held to the cap
        assert kernel_cap() == 0xFFFFFFFF and bound.pacing.cap is None


@pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"), reason="TCP_CONGESTION is Linux's")
@pytest.mark.parametrize("chosen", ["bbr", "cubic", "reno"])
def test_an_ssh_socket_never_runs_bbr_whose_probe_rtt_stalls_every_request_of_the_session(chosen):
    """The tunnel's own sockets, client and server: on a BBR system they run cubic; any
    other choice is left as it is."""
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, chosen.encode())
    except OSError:
        pytest.skip(f"this kernel has no {chosen}")

    def congestion(sock: socket.socket) -> str:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()

    async def main() -> list[str]:
        listening = socket.create_server(("127.0.0.1", 0))
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, chosen.encode())  # accepted sockets inherit it
        seen: list[str] = []
        both = asyncio.Event()

        class Side(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                seen.append(congestion(transport.get_extra_info("socket")))
                if len(seen) == 2:
                    both.set()

        server = await CoalescingTunnel(sock=listening).create_server(lambda *_: Side(), "", 0)
        dialled = socket.socket()
        dialled.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, chosen.encode())
        dialled.connect(listening.getsockname())
        transport, _ = await CoalescingTunnel(sock=dialled).create_connection(Side, "", 0)
        await asyncio.wait_for(both.wait(), 10)
        transport.close()
        server.close()
        return seen

    expected = "cubic" if chosen == "bbr" else chosen
    assert asyncio.run(main()) == [expected, expected]
