"""Reaching the cluster from the local process: an HTTP proxy and TCP forwards that dial from the pod.

The developer's process calls other services by their in-cluster names, as it would in
the pod. Every connection it makes through :class:`OutboundProxy` or a
:class:`TCPForward` becomes one SSH ``direct-tcpip`` channel to an agent, and the agent
connects to the requested ``host:port`` from its pod: names are resolved by the pod's
DNS (``orders``, ``orders.default.svc``, ``redis.cache``), and the pod's network
policies apply. The agent allows this only when it runs with ``--allow-outbound`` (the
injection's default; ``--no-outbound`` turns it off).

:class:`OutboundProxy` is a local HTTP/1.1 forward proxy, for ``HTTP_PROXY`` and
``HTTPS_PROXY`` (:func:`proxy_env`):

- ``CONNECT host:port`` opens a tunnel: the proxy answers ``200 Connection
  established`` and relays bytes both ways untouched (TLS, gRPC, anything).
- An absolute-form request (``GET http://orders:8080/path HTTP/1.1``) is forwarded in
  origin form (``GET /path HTTP/1.1``) on a connection to ``orders:8080``; its header
  lines travel as sent, except ``Proxy-Connection`` and ``Proxy-Authorization``
  (meant for this proxy) and ``Host`` (set to the target's authority, RFC 9112 3.2.2).
  The client connection stays open across requests, and so does the upstream one while
  requests target the same ``host:port``.
- ``propagate`` headers (see :func:`propagation`) are added to every forwarded
  absolute-form request that does not carry them already, so that a chain of
  intercepted services keeps routing this developer's requests. They cannot be added
  inside a CONNECT tunnel: HTTPS (and anything else tunnelled) passes without them.

Errors are answered in HTTP, once, before the connection closes: 400 for a malformed
request (or one that is not a proxy request), 403 naming the rule when the agent's
outbound fence (or this session's) refuses the destination (:mod:`intercept.routing.fence`),
502 naming the ``host:port`` and the reason when the pod cannot reach it or the agent
refuses outbound connections, 503 while no agent connection is up.

Invariants: framing decisions come from :mod:`intercept.routing.http1` (a request is
forwarded only when its length is unambiguous); bodies and tunnels are streamed in
bounded chunks, each written and drained before the next is read, so neither side can
make the proxy buffer more than a chunk plus the transports' own limits.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol
from urllib.parse import quote

import asyncssh

from intercept.errors import InterceptError, UsageError
from intercept.protocol import FENCE_REFUSED
from intercept.routing.http1 import (
    ChunkedScanner,
    Framing,
    ProtocolError,
    RequestHead,
    error_response,
    parse_request_head,
    parse_response_head,
)
from intercept.routing.match import Baggage, HeaderEquals, Route, parse_baggage

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
DIAL_TIMEOUT = 20.0  # the pod's connect attempt; a blackholed address would take minutes
CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

# Meant for this proxy, not for the target (RFC 9110 7.6.1 and 11.7.1).
_PROXY_ONLY = frozenset({b"proxy-connection", b"proxy-authorization"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_HOST = re.compile(rb"[A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\]")
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([/?][^#]*)?")


class Reader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...

    def at_eof(self) -> bool: ...


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...


Dial = Callable[[str, int], Awaitable[tuple[Reader, Writer]]]


class Dialer(Protocol):
    """Anything with asyncssh's ``open_connection`` shape, an ``SSHClientConnection`` included."""

    async def open_connection(self, host: str, port: int) -> tuple[Reader, Writer]: ...


class OutboundError(InterceptError):
    """A connection to ``target`` could not be opened from the pod; ``status`` is the proxy's answer."""

    def __init__(self, status: int, target: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.target = target


class SSHDialer:
    """Opens ``direct-tcpip`` channels on whichever agent connection is up right now.

    ``get_conn`` is asked on every dial, so the dialer follows reconnects: it returns
    the current :class:`asyncssh.SSHClientConnection` (any agent of the service will do:
    each connects from its own pod), or None while none is up, which fails the dial
    with 503.
    """

    def __init__(self, get_conn: Callable[[], asyncssh.SSHClientConnection | None], *, timeout: float = DIAL_TIMEOUT) -> None:
        self._get_conn = get_conn
        self.timeout = timeout

    async def open_connection(self, host: str, port: int) -> tuple[Reader, Writer]:
        target = _authority(host, port)
        conn = self._get_conn()
        if conn is None or conn.is_closed():
            raise OutboundError(503, target, f"cannot reach {target}: no connection to an agent is up right now (connecting or reconnecting); retry shortly")
        try:
            return await asyncio.wait_for(dial(conn, host, port), self.timeout)
        except asyncio.TimeoutError:
            raise OutboundError(
                502, target, f"cannot reach {target} from the agent's pod: no connection within {self.timeout:g}s; check the service name and port"
            ) from None


async def dial(dialer: Dial | Dialer, host: str, port: int) -> tuple[Reader, Writer]:
    """Open a connection to ``host:port`` from the pod; every failure is an :class:`OutboundError`."""
    target = _authority(host, port)
    try:
        if callable(getattr(dialer, "open_connection", None)):
            return await dialer.open_connection(host, port)  # type: ignore[union-attr]
        return await dialer(host, port)  # type: ignore[operator]
    except OutboundError:
        raise
    except asyncssh.ChannelOpenError as e:
        raise explain_open_error(target, e) from None
    except (asyncssh.Error, OSError) as e:
        raise OutboundError(503, target, f"cannot reach {target}: the connection to the agent failed ({e}); retry once it reconnects") from None


def explain_open_error(target: str, error: asyncssh.ChannelOpenError) -> OutboundError:
    """The agent's refusal of a ``direct-tcpip`` channel, in the user's words."""
    reason = error.reason or "no reason given"
    if reason.startswith(FENCE_REFUSED):
        return OutboundError(403, target, f"cannot reach {target}: {reason}")
    # An SSH server whose connection_requested() says no answers asyncssh's bare
    # "Connection refused"; the pod's own failure to connect carries the OS error text
    # ("[Errno 111] Connect call failed ...", "[Errno -2] Name or service not known").
    if error.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED or (
        error.code == asyncssh.OPEN_CONNECT_FAILED and reason == "Connection refused"
    ):
        return OutboundError(
            502, target,
            f"cannot reach {target}: agent refused outbound connections: the agent was injected with --no-outbound "
            "(or runs without --allow-outbound); inject it again without --no-outbound to reach cluster services",
        )
    return OutboundError(502, target, f"cannot reach {target} from the agent's pod: {reason}")


def proxy_env(host: str, port: int, no_proxy: Iterable[str] = ("localhost", "127.0.0.1", "::1")) -> dict[str, str]:
    """Environment for the local process so that its HTTP clients use the proxy at ``host:port``.

    Both spellings are set: curl and Go read the lowercase ones (curl ignores an
    uppercase ``HTTP_PROXY``), others the uppercase ones. ``NO_PROXY`` keeps local
    traffic (by default localhost) off the proxy.
    """
    url = f"http://{_authority(host, port)}"
    skip = ",".join(no_proxy)
    return {
        "HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
        "NO_PROXY": skip, "no_proxy": skip,
    }


def propagation(route: Route) -> list[tuple[str, str]]:
    """The headers that carry ``route`` to the next service (``--propagate-header``).

    Each exact header rule becomes that header; each baggage rule a ``baggage`` member
    (``key=value``, percent-encoded). A route that needs anything else (a regex, a path
    prefix) or nothing at all (all traffic) cannot be carried by headers: UsageError.
    """
    headers: list[tuple[str, str]] = []
    for item in route.to_json():
        if item["kind"] == HeaderEquals.kind:
            headers.append((item["name"], item["value"]))
        elif item["kind"] == Baggage.kind:
            headers.append(("baggage", f"{item['key']}={quote(item['value'], safe='')}"))
        else:
            raise UsageError(
                f"--propagate-header cannot carry the rule {item!r} of the route {route.describe()!r}: "
                "only exact --header and --baggage rules can be added to outbound requests; drop --propagate-header "
                "or route on an exact header"
            )
    if not headers:
        raise UsageError("--propagate-header needs a route with a --header or --baggage rule; this route takes all traffic")
    return headers


# --- request heads, sans-IO -----------------------------------------------------------


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_authority(text: bytes, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` -> (host, port); ProtocolError(400) when malformed."""
    host, colon, port = text.rpartition(b":")
    if not colon or host.startswith(b"[") and not host.endswith(b"]") or text.endswith(b"]"):
        host, port = text, b""
    if not port:
        if default_port is None:
            raise ProtocolError(400, f"{text[:100]!r}: expected host:port")
        port_number = default_port
    elif port.isdigit() and 0 < int(port) < 65536:
        port_number = int(port)
    else:
        raise ProtocolError(400, f"{text[:100]!r}: invalid port")
    if not _HOST.fullmatch(host):
        raise ProtocolError(400, f"{text[:100]!r}: invalid host")
    return host.strip(b"[]").decode("ascii"), port_number


def parse_absolute_target(target: bytes) -> tuple[bytes, str, int, bytes]:
    """``http://host[:port]/path?q`` -> (authority, host, port, origin-form target)."""
    m = _ABSOLUTE.fullmatch(target)
    if m is None:
        raise ProtocolError(
            400, f"request target {target[:100]!r} is not absolute: this is a forward proxy; send "
            "GET http://SERVICE:PORT/path (set HTTP_PROXY for the client)",
        )
    scheme, authority, path = m[1].lower(), m[2], m[3] or b"/"
    if scheme != b"http":
        raise ProtocolError(400, f"{scheme.decode('ascii', 'replace')}:// through the proxy: use CONNECT for HTTPS (set HTTPS_PROXY)")
    if b"@" in authority:
        raise ProtocolError(400, "user information in the request target is not supported")
    host, port = parse_authority(authority, 80)
    return authority, host, port, path if path.startswith(b"/") else b"/" + path


def to_origin_form(raw: bytes, head: RequestHead, propagate: Sequence[tuple[str, str]] = ()) -> tuple[str, int, bytes]:
    """Rewrite the absolute-form request head ``raw`` for its target: (host, port, new head).

    Header lines keep their bytes and order, minus the proxy's own; ``Host`` becomes
    the target's authority; ``propagate`` headers are appended unless the request
    already carries them (for ``baggage``: a member with the same key).
    """
    authority, host, port, path = parse_absolute_target(head.target)
    lines = raw.lstrip(b"\r\n").split(b"\r\n")[: -2]  # the head ends with an empty line
    out = [b"%s %s HTTP/1.%d" % (head.method, path, head.minor)]
    has_host = False
    for line in lines[1:]:
        name = line.split(b":", 1)[0].lower()
        if name in _PROXY_ONLY:
            continue
        if name == b"host":
            line = line[:4] + b": " + authority
            has_host = True
        out.append(line)
    if not has_host:
        out.append(b"Host: " + authority)
    present = {name for name, _ in head.headers}
    baggage = parse_baggage([v for n, v in head.headers if n == b"baggage"])
    for name, value in propagate:
        lower = name.lower().encode("ascii")
        if lower == b"baggage":
            if value.partition("=")[0] in baggage:
                continue
        elif lower in present:
            continue
        out.append(f"{name}: {value}".encode("latin-1"))
    return host, port, b"\r\n".join(out) + b"\r\n\r\n"


def _check_propagate(propagate: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    for name, value in propagate:
        if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise UsageError(f"propagated header {name}: {value!r} is not a valid HTTP header; use a token name and a printable value")
    return list(propagate)


# --- streams ----------------------------------------------------------------------------


class _Truncated(Exception):
    """A peer closed its side in the middle of a message."""


class _Stream:
    """One side of a relay: a reader with a pushback buffer, and its writer.

    Bytes read past the end of a message stay in ``buf`` for the next one. ``send``
    drains after each write, so a slow reader on this side pauses the copy that feeds it.
    """

    __slots__ = ("reader", "writer", "buf")

    def __init__(self, reader: Reader, writer: Writer) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    async def fill(self) -> bool:
        data = await self.reader.read(CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    async def read_some(self, limit: int = CHUNK) -> bytes:
        if self.buf:
            data = bytes(self.buf[:limit])
            del self.buf[:limit]
            return data
        return await self.reader.read(min(limit, CHUNK))

    def unread(self, data: bytes) -> None:
        self.buf[:0] = data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def write_eof(self) -> None:
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
        except (OSError, RuntimeError, asyncssh.Error):
            pass  # already closing: the peer sees the close instead

    def reset(self) -> None:
        """Close with a TCP reset, so that the peer's next read or write fails at once
        (``ECONNRESET``) instead of seeing an orderly end of the stream."""
        sock = self.writer.get_extra_info("socket") if hasattr(self.writer, "get_extra_info") else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # already gone
        self.close()

    def close(self) -> None:
        try:
            self.writer.close()
        except (OSError, RuntimeError, asyncssh.Error):
            pass


async def _copy_body(src: _Stream, dst: _Stream, framing: Framing, length: int, error_status: int) -> None:
    """Copy one message body, as framed, from ``src`` to ``dst``; bytes past its end stay in ``src``."""
    if framing is Framing.LENGTH:
        left = length
        while left:
            data = await src.read_some(left)
            if not data:
                raise _Truncated(f"{left} body bytes missing")
            await dst.send(data)
            left -= len(data)
    elif framing is Framing.CHUNKED:
        scanner = ChunkedScanner(error_status)
        while not scanner.done:
            data = await src.read_some()
            if not data:
                raise _Truncated("chunked body cut short")
            end = scanner.feed(data)
            if end < len(data):
                src.unread(data[end:])
                data = data[:end]
            await dst.send(data)
    elif framing is Framing.UNTIL_CLOSE:
        while data := await src.read_some():
            await dst.send(data)


async def _pipe(src: _Stream, dst: _Stream) -> None:
    while data := await src.read_some():
        await dst.send(data)
    dst.write_eof()


async def relay(a: _Stream, b: _Stream) -> None:
    """Bytes both ways until both sides have finished (half-closes pass through) or one fails."""
    tasks = [asyncio.ensure_future(_pipe(a, b)), asyncio.ensure_future(_pipe(b, a))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.debug("relay ended: %r", task.exception())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Listener:
    """A local TCP listener whose connections are tasks that :meth:`close` ends."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _listen(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, host, port, limit=CHUNK)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        stream = _Stream(reader, writer)
        try:
            await self._serve(stream)
        except asyncio.CancelledError:
            pass
        except Exception:  # one connection's bug must not end the listener; say so loudly
            log.exception("outbound connection failed")
        finally:
            stream.close()
            self._tasks.discard(task)

    async def _serve(self, client: _Stream) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop listening and end every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


# --- the HTTP proxy ---------------------------------------------------------------------


class _Stale(Exception):
    """A reused upstream connection closed before answering: the request can be sent again."""


class _Upstream:
    __slots__ = ("host", "port", "stream", "used")

    def __init__(self, host: str, port: int, stream: _Stream) -> None:
        self.host, self.port, self.stream = host, port, stream
        self.used = False  # has carried a request: it may have been closed by its server since


class OutboundProxy(_Listener):
    """A local HTTP proxy (CONNECT and absolute-form) whose every connection dials from the pod.

    ``dial`` is a :data:`Dial` or a :class:`Dialer` (:class:`SSHDialer`, or an
    ``SSHClientConnection`` itself). ``propagate``: headers added to forwarded plain
    HTTP requests that lack them (see :func:`propagation`); never inside CONNECT tunnels.
    """

    def __init__(self, dial: Dial | Dialer, propagate: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__()
        self._dial = dial
        self.propagate = _check_propagate(propagate)
        self.address: tuple[str, int] | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen; returns the bound (host, port)."""
        self.address = await self._listen(host, port)
        log.info("outbound proxy listening on %s", _authority(*self.address))
        return self.address

    async def _serve(self, client: _Stream) -> None:
        upstream: _Upstream | None = None
        try:
            while True:
                try:
                    head = await self._read_head(client)
                except ProtocolError as e:
                    await client.send(error_response(e.status, e.reason))
                    return
                if head is None:
                    return
                raw = bytes(client.buf[: head.size])
                del client.buf[: head.size]
                if head.method == b"CONNECT":
                    if upstream is not None:
                        upstream.stream.close()
                        upstream = None
                    await self._tunnel(client, head)
                    return
                upstream, keep = await self._exchange(client, head, raw, upstream)
                if not keep:
                    return
        except (_Truncated, OSError, asyncssh.Error) as e:
            log.debug("proxy connection ended: %r", e)
        finally:
            if upstream is not None:
                upstream.stream.close()

    @staticmethod
    async def _read_head(client: _Stream) -> RequestHead | None:
        while True:
            head = parse_request_head(client.buf)
            if head is not None:
                return head
            if not await client.fill():
                if client.buf.strip(b"\r\n"):
                    log.debug("client closed in the middle of a request head")
                return None

    async def _open(self, host: str, port: int) -> _Stream:
        reader, writer = await dial(self._dial, host, port)
        return _Stream(reader, writer)

    async def _tunnel(self, client: _Stream, head: RequestHead) -> None:
        try:
            host, port = parse_authority(head.target, None)
        except ProtocolError as e:
            await client.send(error_response(e.status, f"CONNECT {e.reason}"))
            return
        try:
            upstream = await self._open(host, port)
        except OutboundError as e:
            log.info("CONNECT %s: %s", e.target, e)
            await client.send(error_response(e.status, str(e)))
            return
        log.debug("CONNECT %s: tunnel open", _authority(host, port))
        try:
            await client.send(CONNECT_ESTABLISHED)
            await relay(client, upstream)  # bytes the client sent after the head go first
        finally:
            upstream.close()

    async def _exchange(
        self, client: _Stream, head: RequestHead, raw: bytes, upstream: _Upstream | None
    ) -> tuple[_Upstream | None, bool]:
        """Forward one request and its response: (the upstream to keep, whether the client connection stays)."""
        try:
            host, port, out = to_origin_form(raw, head, self.propagate)
        except ProtocolError as e:
            await client.send(error_response(e.status, e.reason))
            return upstream, False
        target = _authority(host, port)
        log.debug("%s %s", head.method.decode("latin-1"), head.target[:200].decode("latin-1"))
        for _attempt in range(2):
            if upstream is not None and ((upstream.host, upstream.port) != (host, port) or upstream.stream.reader.at_eof()):
                upstream.stream.close()
                upstream = None
            if upstream is None:
                try:
                    upstream = _Upstream(host, port, await self._open(host, port))
                except OutboundError as e:
                    log.info("%s: %s", e.target, e)
                    await client.send(error_response(e.status, str(e)))
                    return None, False
            reused, upstream.used = upstream.used, True
            try:
                keep_upstream, keep_client = await self._send_and_answer(client, upstream.stream, head, out, reused, target)
            except _Stale:  # only a reused connection is stale: the second attempt is on a new one
                log.debug("%s: reused connection was closed by the server; sending again on a new one", target)
                upstream.stream.close()
                upstream = None
                continue
            except BaseException:
                upstream.stream.close()
                raise
            if not keep_upstream and upstream is not None:
                upstream.stream.close()
                upstream = None
            return upstream, keep_client
        raise AssertionError("unreachable: a new connection is never stale")

    async def _send_and_answer(
        self, client: _Stream, up: _Stream, head: RequestHead, out: bytes, reused: bool, target: str
    ) -> tuple[bool, bool]:
        """Send the head, stream the body while relaying the response: (keep upstream, keep client).

        The body and the response run side by side: a client waiting for ``100 Continue``
        sends its body only after the response side has relayed it, and a server may
        answer before it has read the whole body.
        """
        answered = False  # response bytes went to the client: no error response may follow

        async def answer() -> tuple[bool, bool]:
            nonlocal answered
            while True:
                resp = None
                while resp is None:
                    resp = parse_response_head(up.buf, head.method)
                    if resp is None and not await up.fill():
                        if up.buf:
                            raise ProtocolError(502, f"{target} closed the connection in the middle of a response head")
                        if reused and head.framing is Framing.NONE:
                            raise _Stale()
                        raise ProtocolError(502, f"{target} closed the connection without answering")
                answered = True
                await client.send(bytes(up.buf[: resp.size]))
                del up.buf[: resp.size]
                if resp.framing is Framing.TUNNEL:  # 101 Switching Protocols
                    await relay(client, up)
                    return False, False
                if resp.status >= 200:
                    break
            await _copy_body(up, client, resp.framing, resp.length, 502)
            keep = resp.keep_alive and head.keep_alive and resp.framing is not Framing.UNTIL_CLOSE
            return keep, keep

        async def send() -> None:
            await up.send(out)
            await _copy_body(client, up, head.framing, head.length, 400)

        sending = asyncio.ensure_future(send())
        answering = asyncio.ensure_future(answer())
        try:
            pending = {sending, answering}
            while answering in pending:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if not answering.done() and sending.done() and sending.exception() is not None:
                    raise sending.exception()
            keep_upstream, keep_client = answering.result()
            if not sending.done():
                if not keep_upstream:
                    return False, False  # answered early and closing: the rest of the body is not wanted
                await sending  # a server that keeps the connection reads the rest: let the client send it
            elif sending.exception() is not None:
                return False, False
            return keep_upstream, keep_client
        except ProtocolError as e:
            log.info("%s: %s", target, e.reason)
            if not answered:
                await _try_send(client, error_response(e.status, e.reason))
            return False, False
        except (_Truncated, OSError, asyncssh.Error) as e:
            log.debug("%s: exchange ended: %r", target, e)
            if not answered:
                await _try_send(client, error_response(502, f"{target}: the connection ended before a response ({e})"))
            return False, False
        finally:
            for task in (sending, answering):
                task.cancel()
            await asyncio.gather(sending, answering, return_exceptions=True)


async def _try_send(stream: _Stream, data: bytes) -> None:
    """Send an error response to a client that may itself be the side that failed."""
    try:
        await stream.send(data)
    except (OSError, asyncssh.Error) as e:
        log.debug("could not send the error response: %r", e)


# --- plain TCP --------------------------------------------------------------------------


class TCPForward(_Listener):
    """``--forward SERVICE:PORT[:LOCAL_PORT]``: each connection to ``host:local_port`` is
    relayed to ``service:port`` as dialled from the pod.

    A connection the pod cannot make is closed at once (plain TCP has no way to say
    why); the reason is logged at WARNING.
    """

    reset_on_failure = False  # a failed dial closes the local connection with a reset (else an orderly close)

    def __init__(self, dial: Dial | Dialer, service: str, port: int, local_port: int, host: str = "127.0.0.1") -> None:
        super().__init__()
        self._dial = dial
        self.service = service
        self.port = port
        self.local_port = local_port
        self.host = host
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        """Listen on ``host:local_port`` (0: any free port); returns the bound (host, port).

        Raises UsageError when that port cannot be bound (typically: already in use).
        """
        spec = f"{self.service}:{self.port}:{self.local_port}"
        try:
            self.address = await self._listen(self.host, self.local_port)
        except OSError as e:
            raise UsageError(
                f"--forward {spec}: cannot listen on {_authority(self.host, self.local_port)} "
                f"({e.strerror or e}); pick a free LOCAL_PORT: --forward {self.service}:{self.port}:LOCAL_PORT"
            ) from None
        log.info("forwarding %s to %s", _authority(*self.address), _authority(self.service, self.port))
        return self.address

    async def _serve(self, client: _Stream) -> None:
        try:
            reader, writer = await dial(self._dial, self.service, self.port)
        except OutboundError as e:
            self.failed(e)
            if self.reset_on_failure:
                client.reset()
            return
        upstream = _Stream(reader, writer)
        try:
            await relay(client, upstream)
        finally:
            upstream.close()

    def failed(self, error: OutboundError) -> None:
        """A connection the pod could not make (its local connection is then closed)."""
        log.warning("forward %s: %s", _authority(*self.address), error)


__all__ = [
    "CONNECT_ESTABLISHED",
    "Dial",
    "Dialer",
    "OutboundError",
    "OutboundProxy",
    "SSHDialer",
    "TCPForward",
    "dial",
    "explain_open_error",
    "parse_absolute_target",
    "parse_authority",
    "propagation",
    "proxy_env",
    "to_origin_form",
]
