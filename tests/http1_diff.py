"""Differential framing of HTTP/1.1 requests: the agent against h11 and llhttp.

The agent decides where each request's head and message end and forwards the bytes; the
app behind it decides again. Where both accept a message they must agree on its
boundaries, or a request could reach the app that routing never saw. So for one byte
string (a connection's worth of pipelined requests) each framer reports the messages it
completed, ``(head_end, end)`` as offsets, and how it stopped; :func:`disagreement`
names the first place where the agent accepted something a reference frames otherwise.

The agent may always be stricter (reject what a reference accepts). It may also accept
what a reference rejects: the app then answers 400 and closes, so nothing is smuggled.

:func:`generate` builds requests from a grammar of the shapes that parsers disagree on,
driven by any ``choose(options)`` function: hypothesis in the test suite, a seeded
``random.Random`` or atheris in the longer campaign (``fuzz/http1_diff.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import h11
import httptools

from intercept.routing.http1 import (
    ChunkedScanner,
    Framing,
    Kind,
    ProtocolError,
    classify,
    parse_request_head,
    skip_empty_lines,
)

T = TypeVar("T")
Choose = Callable[[Sequence[T]], T]

# How a framer stopped reading the connection.
INCOMPLETE = "incomplete"  # wants more bytes
REJECT = "reject"  # refused the bytes at ``forwarded``
UPGRADE = "upgrade"  # the rest belongs to another protocol (once the response agrees)
CLOSE = "close"  # the last message asked to close the connection
RAW = "raw"  # (agent only) relayed as an opaque byte stream, unrouted

Framed = tuple[list[tuple[int, int]], str, int]  # messages, how it stopped, bytes it may have passed on


def agent_frames(data: bytes) -> Framed:
    """The agent's framing, as ``intercept.agent.proxy`` applies the sans-IO functions.

    The third element is how far the agent may have forwarded bytes before it stopped: it
    forwards a head only when it is complete and valid, but streams a body as it comes,
    so a body refused midway has been partly forwarded.
    """
    kind = classify(data)
    if kind is Kind.OTHER:
        return [], RAW, len(data)
    if kind is Kind.NEED_MORE:
        return [], INCOMPLETE, 0
    messages: list[tuple[int, int]] = []
    pos = 0
    while True:
        pos = skip_empty_lines(data, pos)
        if pos >= len(data):
            return messages, INCOMPLETE, pos
        try:
            head = parse_request_head(data, pos)
        except ProtocolError:
            return messages, REJECT, pos
        if head is None:
            return messages, INCOMPLETE, pos
        head_end = pos + head.size
        if head.framing is Framing.LENGTH:
            end = head_end + head.length
            if end > len(data):
                return messages, INCOMPLETE, len(data)
        elif head.framing is Framing.CHUNKED:
            scanner = ChunkedScanner(400)
            try:
                end = scanner.feed(data, head_end)
            except ProtocolError:
                # the line that failed was not forwarded; what came before it may have been
                return messages, REJECT, _line_start(data, head_end)
            if not scanner.done:
                return messages, INCOMPLETE, len(data)
        else:
            end = head_end
        messages.append((head_end, end))
        if head.upgrade:
            return messages, UPGRADE, end
        if not head.keep_alive:
            return messages, CLOSE, end
        pos = end


def _line_start(data: bytes, body_start: int) -> int:
    """Where the chunked-body line that the scanner refused begins (an upper bound on what
    the agent forwarded of that body)."""
    scanner = ChunkedScanner(400)
    good = body_start
    for i in range(body_start, len(data)):
        try:
            scanner.feed(data[i : i + 1])
        except ProtocolError:
            return good
        if data[i] == 10:
            good = i + 1
    return good


def h11_frames(data: bytes) -> Framed:
    conn = h11.Connection(h11.SERVER)
    if data:  # to h11, no data means the peer closed
        conn.receive_data(data)
    messages: list[tuple[int, int]] = []
    head_end = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return messages, REJECT, 0
        consumed = len(data) - len(conn.trailing_data[0])
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return messages, INCOMPLETE, 0
        if event is h11.PAUSED:
            return messages, UPGRADE, 0
        if isinstance(event, h11.Request):
            head_end = consumed
        elif isinstance(event, h11.EndOfMessage):
            messages.append((head_end, consumed))
            if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                return messages, UPGRADE, 0
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE:
                return messages, CLOSE, 0
            conn.start_next_cycle()


class _LlhttpEvents:
    def __init__(self) -> None:
        self.head_done = False
        self.message_done = False

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_message_complete(self) -> None:
        self.message_done = True


def llhttp_frames(data: bytes) -> Framed:
    """llhttp (through httptools), fed a byte at a time so that every boundary has an offset."""
    events = _LlhttpEvents()
    parser = httptools.HttpRequestParser(events)
    messages: list[tuple[int, int]] = []
    head_end = 0
    for i in range(len(data)):
        try:
            parser.feed_data(data[i : i + 1])
        except httptools.HttpParserUpgrade:
            if events.head_done:
                head_end = i + 1
            messages.append((head_end, i + 1))
            return messages, UPGRADE, 0
        except httptools.HttpParserError:
            return messages, REJECT, 0
        if events.head_done:
            events.head_done = False
            head_end = i + 1
        if events.message_done:
            events.message_done = False
            messages.append((head_end, i + 1))
            if not parser.should_keep_alive():
                return messages, CLOSE, 0
    return messages, INCOMPLETE, 0


REFERENCES: dict[str, Callable[[bytes], Framed]] = {"h11": h11_frames, "llhttp": llhttp_frames}


def disagreement(data: bytes) -> str | None:
    """Why the agent's framing of ``data`` is unsafe against a reference, or None.

    Unsafe: a message the agent accepted that a reference frames at other offsets; a
    reference that ends a message inside bytes the agent forwards as part of one (the
    rest would be a request routing never saw); bytes relayed raw that a reference reads
    as a request.
    """
    agent, agent_stop, forwarded = agent_frames(data)
    for name, frames in REFERENCES.items():
        ref, ref_stop, _ = frames(data)
        if agent_stop == RAW:
            # h11 reads the HTTP/2 preface itself as a PRI request; nothing after it can
            # be a request ("SM" is no request line), so relaying it raw smuggles nothing
            inert = data.startswith(PREFACE) and ref == [(18, 18)]
            if ref and not inert:
                return f"agent relays raw what {name} reads as a request ending at {ref[0][1]}"
            continue
        for k, ours in enumerate(agent):
            if k >= len(ref):
                if ref_stop == INCOMPLETE:
                    return f"agent ends message {k} at {ours}, {name} is still reading it"
                if ref_stop == UPGRADE:
                    return f"{name} switched protocols before message {k}, agent framed it as HTTP at {ours}"
                break  # the reference refused it or closed: the app answers 400 or stops reading
            if ref[k] != ours:
                return f"message {k}: agent frames it as {ours}, {name} as {ref[k]}"
        else:
            if len(ref) > len(agent) and agent_stop in (INCOMPLETE, REJECT):
                # the agent has passed on bytes up to ``forwarded`` as one message; the
                # reference ends it earlier and reads on
                head_end, end = ref[len(agent)]
                if end < forwarded:
                    return f"{name} ends message {len(agent)} at {end}, agent forwards it up to {forwarded}"
    return None


# -- the grammar ------------------------------------------------------------------------

LENGTH = b"<len>"  # a Content-Length value replaced by the actual body length


def mostly(usual: list[bytes], odd: list[bytes], weight: int = 3) -> list[bytes]:
    """Options where the usual ones come up ``weight`` times as often as each odd one."""
    return usual * weight * max(1, len(odd) // max(1, len(usual))) + odd


METHODS = mostly([b"GET", b"POST", b"PUT", b"HEAD", b"CONNECT"], [b"get", b"X" * 40, b"G\x00T", b"PRI", b""], 8)
SPACES = mostly([b" "], [b"\t", b"  ", b"", b"\x0b"], 16)
TARGETS = mostly([b"/", b"/a?b=c"], [b"*", b"http://h/x", b"h:443", b"/a b", b"/\x7f", b"/%00", b"/\xff", b"/x#f"])
VERSIONS = mostly([b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11"], 12)
EOLS = mostly([b"\r\n"], [b"\n", b"\r", b"\r\r\n", b"\n\r"], 24)
NAMES = mostly(
    [b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"x-dev", b"Host"],
    [b"Expect", b"Content-Length ", b" Content-Length", b"Content_Length", b"content-length", b"TRANSFER-ENCODING",
     b"Transfer-Encoding\t", b"Transfer-Encoding\x00", b"X", b"\tX"],
)
SEPARATORS = mostly([b": ", b":"], [b":\t", b" : ", b"::", b": \x0b", b":\r\n "], 12)
VALUES: dict[bytes, list[bytes]] = {
    b"host": mostly([b"a"], [b"", b"a b", b"a\x00", b"a:80"]),
    b"content-length": mostly([LENGTH], [b"0", b"5", b"10", b"05", b"+5", b"5 ", b"5,5", b"5, 6", b"-1", b"0x5",
                                         b"99999999999999999999", b"", b"5\x00", b"1_0"], 2),
    b"transfer-encoding": mostly([b"chunked"], [b"Chunked", b"chunked ", b"chunked, chunked", b"gzip, chunked", b"chunked, gzip",
                                                b"identity", b"x", b"\x0bchunked", b"chunked;q=1", b"", b"gzip", b"chunked,"], 2),
    b"connection": [b"close", b"keep-alive", b"Upgrade", b"upgrade, close", b"Keep-Alive, Upgrade", b"TE"],
    b"upgrade": [b"websocket", b"h2c", b"foo", b""],
    b"expect": [b"100-continue"],
    b"x-dev": [b"alice", b"alice\x00", b"alice, bob"],
}
OTHER_VALUES = mostly([b"y"], [b"\x80", b"a\rb", b"a\nb", b" folded", b""])
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\nx-dev: alice\r\n\r\n"
BODIES = mostly(
    [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", SMUGGLED],
    [b"0123456789", b"5;ext=1\r\nhello\r\n0\r\n\r\n", b"5 \r\nhello\r\n0\r\n\r\n",
     b"05\r\nhello\r\n0\r\n\r\n", b"0x5\r\nhello\r\n0\r\n\r\n", b"5\nhello\n0\n\n", b"5\r\nhelloXX\r\n0\r\n\r\n",
     b"5\r\nhel", b"0\r\nX: y\r\n\r\n", b"0\r\nX y\r\n\r\n", b"ffffffffffffffffff\r\n", b"-5\r\nhello\r\n0\r\n\r\n",
     b"5\r\nhello\r\n0\r\n", b"5\r\nhello\r\r\n0\r\n\r\n", b"0\r\n\r\n" + SMUGGLED,
     b"2d\r\n" + SMUGGLED[:45] + b"\r\n0\r\n\r\n", b"0\r\n\n", b"5\r\nhello\n0\r\n\r\n"],
    2,
)
PREFIXES = mostly([b""], [b"\r\n", b"\r\n\r\n", b"\n", b" ", b"\x16\x03\x01", PREFACE], 12)


def generate(choose: Choose) -> bytes:
    """One connection's worth of bytes: one to three requests from the grammar above."""
    out = choose(PREFIXES)
    for _ in range(choose([1, 1, 2, 3])):
        body = choose(BODIES)
        head = choose(METHODS) + choose(SPACES) + choose(TARGETS) + choose(SPACES) + choose(VERSIONS) + choose(EOLS)
        if choose([True] * 9 + [False]):
            head += b"Host: a\r\n"
        for _ in range(choose([0, 1, 1, 2, 2, 3])):
            name = choose(NAMES)
            value = choose(VALUES.get(name.strip(b" \t\x00").lower(), OTHER_VALUES))
            if value == LENGTH:
                value = str(len(body)).encode()
            head += name + choose(SEPARATORS) + value + choose(EOLS)
        out += head + choose(EOLS) + body
    return out
