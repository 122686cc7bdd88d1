"""Channels take turns on their shared SSH connection (intercept.sshshare): a bulk body waits
in its own channel, not in the socket ahead of everyone, and a small response overtakes it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast

import asyncssh
import pytest

from intercept.protocol import ENCRYPTION_ALGS
from intercept.sshshare import PIPE_HIGH, QUANTUM, SENDER_HIGH, SENDER_LOW, ChannelSender, SendPipe
from intercept.sshwrite import CoalescingTunnel
from tests.fakeclock import AnyLogin, FakeLoop


class Wire:
    """The socket's transport as the pipe sees it: takes ``room`` bytes, then says "full"."""

    def __init__(self, pipe: SendPipe, room: int) -> None:
        self.pipe = pipe
        self.room = room
        self.sent: list[tuple[str, bytes]] = []  # (channel, data), in the order they reach the socket

    def take(self, name: str, data: bytes) -> None:
        self.sent.append((name, data))
        self.room -= len(data)
        if self.room <= 0:
            self.pipe.pause_writing()

    def drain(self, room: int) -> None:
        """The socket sent what it held: room for ``room`` bytes more."""
        self.room = room
        self.pipe.resume_writing()

    def bytes_of(self, name: str) -> int:
        return sum(len(d) for n, d in self.sent if n == name)


class FakeChannel:
    def __init__(self, name: str, wire: Wire, pipe: SendPipe) -> None:
        self.name, self.wire, self.pipe = name, wire, pipe
        self.events: list[str] = []
        self.limits: tuple[int, int] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.pipe if name == "intercept_send_pipe" else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        self.limits = (high, low)

    def write(self, data: bytes) -> None:
        assert not self.pipe.full or self.pipe._running, "a channel wrote while the socket was full"
        self.wire.take(self.name, bytes(data))
        self.events.append("data")

    def write_eof(self) -> None:
        self.events.append("eof")

    def close(self) -> None:
        self.events.append("close")


class Source:
    """Whatever feeds a sender (the local connection): paused or reading."""

    def __init__(self) -> None:
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


def _setup(room: int = 10**9) -> tuple[SendPipe, Wire, FakeLoop]:
    loop = FakeLoop()
    pipe = SendPipe(cast(asyncio.AbstractEventLoop, loop))
    return pipe, Wire(pipe, room), loop


def _sender(name: str, wire: Wire, pipe: SendPipe) -> tuple[ChannelSender, FakeChannel, Source]:
    chan, source = FakeChannel(name, wire, pipe), Source()
    return ChannelSender(chan, source.pause, source.resume), chan, source


def test_a_small_write_goes_at_once_when_the_socket_has_room():
    pipe, wire, loop = _setup()
    small, chan, _ = _sender("small", wire, pipe)
    small.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert wire.sent == [("small", b"HTTP/1.1 200 OK\r\n\r\n")]
    assert chan.limits == (0, 0)  # "paused" from asyncssh means: the peer's window is used up


def test_a_bulk_body_cannot_fill_the_shared_socket():
    pipe, wire, loop = _setup(room=PIPE_HIGH)
    bulk, _, source = _sender("bulk", wire, pipe)
    written = 0
    while not source.paused:  # the local process writes until it is told to wait
        bulk.write(b"b" * 65536)
        written += 65536
    # the socket took what it had room for, one packet beyond at most; the rest waits in the channel
    assert wire.bytes_of("bulk") <= PIPE_HIGH + QUANTUM
    assert bulk.queued == written - wire.bytes_of("bulk")
    assert bulk.queued <= SENDER_HIGH + 65536  # and the process was paused soon after the bound


def test_a_small_response_overtakes_a_bulk_body_queued_before_it():
    pipe, wire, loop = _setup(room=PIPE_HIGH)
    bulk, _, _ = _sender("bulk", wire, pipe)
    small, _, _ = _sender("small", wire, pipe)
    for _ in range(4):
        bulk.write(b"b" * 65536)
    before = wire.bytes_of("bulk")
    queued_then = bulk.queued
    assert queued_then > 2 * QUANTUM
    small.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert wire.bytes_of("small") == 0  # the socket is full: it waits its turn, in its own channel
    while not wire.bytes_of("small"):
        wire.drain(room=PIPE_HIGH)
        loop.end_iteration()
    # one packet of the bulk body at most, then the small response: not the bulk's whole backlog
    names = [n for n, _ in wire.sent]
    at = names.index("small")
    assert sum(len(d) for n, d in wire.sent[:at] if n == "bulk") <= before + QUANTUM
    while bulk.queued:
        wire.drain(room=PIPE_HIGH)
        loop.end_iteration()
    assert b"".join(d for n, d in wire.sent if n == "bulk") == b"b" * 4 * 65536  # all of it, in order


def test_busy_channels_take_turns_one_packet_each():
    pipe, wire, loop = _setup(room=1)
    senders = [_sender(name, wire, pipe)[0] for name in "abc"]
    wire.take("x", b"x")  # the socket is full
    for s in senders:
        s.write(bytes([ord(s.chan.name)]) * 3 * QUANTUM)
    wire.drain(room=10**9)
    loop.end_iteration()
    assert [n for n, _ in wire.sent[1:]] == list("abc" * 3)
    assert all(len(d) == QUANTUM for _, d in wire.sent[1:])


def test_the_process_is_resumed_as_its_channel_drains():
    pipe, wire, loop = _setup(room=1)
    bulk, _, source = _sender("bulk", wire, pipe)
    wire.take("x", b"x")
    bulk.write(b"b" * (SENDER_HIGH + 1))
    assert source.paused
    while source.paused:
        wire.drain(room=QUANTUM)
        loop.end_iteration()
    assert bulk.queued <= SENDER_LOW


def test_eof_and_close_wait_for_the_bytes_written_before_them():
    pipe, wire, loop = _setup(room=1)
    bulk, chan, _ = _sender("bulk", wire, pipe)
    wire.take("x", b"x")
    bulk.write(b"b" * 100_000)
    bulk.write_eof()
    bulk.close()
    assert chan.events == []
    while bulk.queued:
        wire.drain(room=QUANTUM)
        loop.end_iteration()
    assert chan.events[-2:] == ["eof", "close"]
    assert chan.events.count("data") == 4


def test_a_channel_whose_window_is_used_up_takes_no_turn_and_holds_no_one_back():
    pipe, wire, loop = _setup(room=1)
    stuck, _, _ = _sender("stuck", wire, pipe)
    small, _, _ = _sender("small", wire, pipe)
    wire.take("x", b"x")
    stuck.write(b"s" * 100_000)
    stuck.channel_paused()  # the developer's side stopped reading: no window left
    small.write(b"ok")
    wire.drain(room=10**9)
    loop.end_iteration()
    assert wire.sent[1:] == [("stuck", b"s" * QUANTUM), ("small", b"ok")] or wire.sent[1:] == [("small", b"ok")]
    sent = wire.bytes_of("stuck")
    wire.drain(room=10**9)
    loop.end_iteration()
    assert wire.bytes_of("stuck") == sent  # nothing more while its window is used up
    stuck.channel_resumed()
    loop.end_iteration()
    assert wire.bytes_of("stuck") == 100_000


def test_a_lost_channel_drops_what_waits():
    pipe, wire, loop = _setup(room=1)
    bulk, chan, source = _sender("bulk", wire, pipe)
    wire.take("x", b"x")
    bulk.write(b"b" * 200_000)
    bulk.lost()
    wire.drain(room=10**9)
    loop.end_iteration()
    assert wire.bytes_of("bulk") == 0 and bulk.queued == 0


# -- a real SSH connection over a link that stalls ----------------------------------------


class _Sink(asyncssh.SSHTCPSession[bytes]):
    """The far end of a channel: counts bytes, and notes how much of the bulk body had arrived
    when each small message did."""

    def __init__(self, name: str, arrivals: dict[str, Any]) -> None:
        self.name, self.arrivals = name, arrivals

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.arrivals[self.name] = self.arrivals.get(self.name, 0) + len(data)
        if self.name == "small":
            self.arrivals["bulk_when_small"] = self.arrivals.get("bulk", 0)
            self.arrivals["small_arrived"].set()


class _Server(AnyLogin):
    def __init__(self, arrivals: dict[str, Any]) -> None:
        self.arrivals = arrivals

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> _Sink:
        return _Sink(dest_host, self.arrivals)


class _Relay(asyncio.Protocol):
    """One side of a TCP relay standing for the network: it can stop carrying (a stalled link)."""

    def __init__(self, dial_port: int | None = None) -> None:
        self.dial_port = dial_port  # the accepting side dials the far end
        self.transport: asyncio.Transport | None = None
        self.peer: _Relay | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.dial_port is not None:
            asyncio.get_running_loop().create_task(self._dial())

    async def _dial(self) -> None:
        _, back = await asyncio.get_running_loop().create_connection(_Relay, "127.0.0.1", self.dial_port)
        self.peer, back.peer = back, self
        for data in self.early:
            back.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.transport.close()


class _Link:
    """Client -> relay -> server; :meth:`stall` stops carrying the client's bytes."""

    def __init__(self) -> None:
        self.upstream: _Relay | None = None

    async def start(self, server_port: int) -> int:
        def accepted() -> _Relay:
            self.upstream = _Relay(server_port)
            return self.upstream

        self.server = await asyncio.get_running_loop().create_server(accepted, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def stall(self) -> None:
        self.upstream.transport.pause_reading()

    def resume(self) -> None:
        self.upstream.transport.resume_reading()


def _run(loop_kind: str, main: Callable[[], Any]) -> Any:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    return asyncio.run(main())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_small_message_overtakes_a_bulk_body_when_the_link_stalls(loop_kind):
    """Through asyncssh over the tunnel: while the link carries nothing, a bulk channel's
    body waits in its channel (the connection's own buffer stays bounded and the source is
    paused); a small message written afterwards arrives ahead of the bulk's backlog."""

    async def main() -> dict[str, Any]:
        arrivals: dict[str, Any] = {"small_arrived": asyncio.Event()}
        listening = socket.create_server(("127.0.0.1", 0))
        listening.setblocking(False)
        server = await asyncssh.create_server(
            lambda: _Server(arrivals), "127.0.0.1", listening.getsockname()[1], tunnel=CoalescingTunnel(sock=listening),
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")], encryption_algs=ENCRYPTION_ALGS,
        )  # fmt: skip
        link = _Link()
        port = await link.start(listening.getsockname()[1])
        tunnel = CoalescingTunnel()
        async with await asyncssh.connect(
            "127.0.0.1", port, tunnel=tunnel, known_hosts=None, username="u", password="p", client_keys=None,
            agent_path=None, preferred_auth="password", encryption_algs=ENCRYPTION_ALGS, config=None,
        ) as conn:  # fmt: skip
            source = Source()
            bulk_chan, _ = await conn.create_connection(asyncssh.SSHTCPSession, "bulk", 1)
            small_chan, _ = await conn.create_connection(asyncssh.SSHTCPSession, "small", 1)
            bulk = ChannelSender(bulk_chan, source.pause, source.resume)
            small = ChannelSender(small_chan, lambda: None, lambda: None)
            link.stall()
            written = 0
            while not source.paused:  # the local process writes until it is told to wait
                bulk.write(b"b" * 65536)
                written += 65536
                await asyncio.sleep(0)  # the loop runs: the socket takes what the kernel will
            assert tunnel.transport is not None
            held_by_connection = tunnel.transport.get_write_buffer_size()
            handed = written - bulk.queued  # what the bulk channel had given to SSH when the small message came
            small.write(b"ok")
            link.resume()
            await asyncio.wait_for(arrivals["small_arrived"].wait(), 30)
            result = dict(arrivals, written=written, queued=bulk.queued, handed=handed, held=held_by_connection)
            bulk.close()
        server.close()
        await server.wait_closed()
        return result

    r = _run(loop_kind, main)
    assert r["held"] <= PIPE_HIGH + 2 * QUANTUM  # the connection's own buffer: bounded, not the whole body
    assert r["written"] - r["handed"] > QUANTUM  # the bulk had a backlog of its own when the small message came...
    assert r["bulk_when_small"] <= r["handed"] + QUANTUM  # ... and the small message went ahead of it
