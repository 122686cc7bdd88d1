"""HTTP/1.x framing decisions for the agent's proxy, sans-IO.

The proxy never re-serializes a message: it forwards the bytes it received. What it
needs from this module is where each message starts and ends, and whether it may be
forwarded at all. So the functions here take bytes and return small immutable facts:

- :func:`classify` decides from a connection's first bytes whether it speaks HTTP/1.x
  (routed per request) or something else (relayed untouched as a TCP stream).
- :func:`parse_request_head` / :func:`parse_response_head` find a complete head in a
  buffer, validate it strictly, and decide the body's framing (RFC 9112 section 6).
- :class:`ChunkedScanner` finds where a chunked body ends without copying its data.

Invariants kept here (the proxy relies on them for request-smuggling safety):

- A request is forwarded only when its length is unambiguous: Content-Length together
  with Transfer-Encoding, conflicting Content-Lengths, a Transfer-Encoding whose last
  coding is not ``chunked``, bare CR or LF in the head, obsolete line folding, and
  whitespace before a colon are all refused with 400.
- Header bytes are never altered: case, order and repeats arrive as sent. What the
  proxy adds (:func:`forwarding`: the client's address) comes as new lines after
  all of them, which HTTP reads as appended to those lists.
"""

from __future__ import annotations

import functools
from collections import deque
import re
from dataclasses import dataclass
from enum import Enum

MAX_HEAD_SIZE = 64 * 1024
MAX_EMPTY_LINES = 1024  # bytes of CRLF tolerated before a request line
MAX_CHUNK_LINE = 4096
MAX_TRAILER_SIZE = MAX_HEAD_SIZE  # all trailer lines of one chunked body together

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) HTTP/([0-9])\.([0-9])")
_ANY_VERSION = re.compile(rb".* HTTP/([0-9]+)\.([0-9]+)")
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([0-9]{3})(?:[ \t][\t\x20-\x7e\x80-\xff]*)?")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_TCHARS = frozenset(b"!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-")
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_BARE_LF = re.compile(rb"(?<!\r)\n")
_KNOWN_CODINGS = frozenset({b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})
_FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"host", b"upgrade", b"expect"})

# One pass at C speed over a whole head (the common case): the start line, then every field
# line, each validated as the line-by-line parser below validates it (a field value with
# its surrounding whitespace is any run of HTAB, SP, visible and obs-text bytes; no CR, no
# LF), up to the first empty line. A head this does not match exactly (incomplete, leading
# empty lines, a request-target or method this leaves out, anything malformed) goes to the
# line-by-line parser, which decides and names the error: the fast path only ever accepts
# a subset of what that parser accepts, with the same result.
_LINES = rb"((?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n"
_FAST_REQUEST = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) HTTP/1\.([0-9])\r\n" + _LINES)
_FAST_RESPONSE = re.compile(rb"HTTP/1\.([0-9]) ([0-9]{3})(?:[ \t][\t\x20-\x7e\x80-\xff]*)?\r\n" + _LINES)
# In a validated block: the fields framing reads (line starts only: the block is searched
# from the LF that ends the start line), and every field, for :attr:`RequestHead.headers`.
_REQUEST_FRAMING_FIELDS = re.compile(rb"\n(content-length|transfer-encoding|connection|host|upgrade):[ \t]*([^\r]*?)[ \t]*\r", re.I)
_RESPONSE_FRAMING_FIELDS = re.compile(rb"\n(content-length|transfer-encoding|connection):[ \t]*([^\r]*?)[ \t]*\r", re.I)
_FIELD = re.compile(rb"([^:\r\n]+):[ \t]*([^\r]*?)[ \t]*\r\n")
_NAMED_FIELDS: dict[frozenset[bytes], re.Pattern[bytes]] = {}  # for RequestHead.fields, by the names asked for


class ProtocolError(Exception):
    """A message that must not be forwarded; ``status`` is what the client is told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Kind(Enum):
    NEED_MORE = 0
    HTTP = 1
    OTHER = 2


class Framing(Enum):
    NONE = 0  # no body
    LENGTH = 1  # Content-Length bytes
    CHUNKED = 2  # chunked transfer coding, ends at the last chunk and trailers
    UNTIL_CLOSE = 3  # response body delimited by the connection closing
    TUNNEL = 4  # after 101 Switching Protocols or a 2xx to CONNECT: raw bytes both ways


class RequestHead:
    """A request head, validated; its header fields are parsed only when asked for.

    Framing needs only Content-Length, Transfer-Encoding, Connection, Upgrade and Host, so
    the parser finds those and keeps the header lines as one block of bytes: routing (and
    the HTTP/2 upgrade) read :attr:`headers`, built from the block on first use, and an
    agent with an empty route table never builds it. Not frozen: a frozen ``__init__``
    costs a setattr call per field, per request.
    """

    __slots__ = ("method", "target", "minor", "size", "framing", "length", "keep_alive", "upgrade", "_block", "_headers")

    def __init__(self, method: bytes, target: bytes, minor: int, headers: list[tuple[bytes, bytes]] | None, size: int,
                 framing: Framing, length: int, keep_alive: bool, upgrade: bool, block: bytes = b"") -> None:
        self.method = method
        self.target = target
        self.minor = minor  # HTTP/1.<minor>
        self.size = size  # bytes of the head, leading empty lines and the final CRLF included
        self.framing = framing
        self.length = length  # body length when framing is LENGTH
        self.keep_alive = keep_alive
        self.upgrade = upgrade  # asks to switch protocols (Upgrade) or to tunnel (CONNECT)
        self._headers = headers
        self._block = block  # the header lines, each with its CRLF, when ``headers`` is still to be built

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Lowercased names, stripped values, wire order, repeats kept."""
        headers = self._headers
        if headers is None:
            headers = self._headers = [(name.lower(), value) for name, value in _FIELD.findall(self._block)]
        return headers

    def fields(self, names: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
        """The :attr:`headers` whose (lowercased) name is in ``names``, in wire order: what a
        route table that reads only these fields needs, found without building the rest."""
        if self._headers is not None:
            return [field for field in self._headers if field[0] in names]
        pattern = _NAMED_FIELDS.get(names)
        if pattern is None:
            if len(_NAMED_FIELDS) > 64:  # route tables come and go; keep the cache small
                _NAMED_FIELDS.clear()
            alternatives = b"|".join(re.escape(name) for name in sorted(names))
            pattern = _NAMED_FIELDS[names] = re.compile(rb"(?im)^(" + alternatives + rb"):[ \t]*([^\r]*?)[ \t]*\r$")
        found = pattern.findall(self._block)
        return [(name.lower(), value) for name, value in found] if found else found

    def __repr__(self) -> str:
        return (f"RequestHead({self.method!r}, {self.target!r}, minor={self.minor}, size={self.size}, "
                f"{self.framing}, length={self.length}, keep_alive={self.keep_alive}, upgrade={self.upgrade})")


_NO_BODY = Framing.NONE  # Python 3.11 reads Framing.NONE through EnumType's __getattr__ hook: 0.1 µs


@dataclass(slots=True)
class ResponseHead:
    status: int
    size: int
    framing: Framing
    length: int
    keep_alive: bool


def classify(buf: bytes | bytearray) -> Kind:
    """Decide from a connection's first bytes whether it speaks HTTP/1.x.

    Only what is clearly not HTTP/1.x is OTHER and gets relayed untouched: the HTTP/2
    connection preface, and a first byte that no request line can begin with (a TLS
    record starts with 0x16, binary protocols with control or high bytes). Anything that
    begins like a method is HTTP, so text that is nearly HTTP (a method longer than
    usual, a tab for a space, a protocol of text lines) meets the request parser and is
    refused with 400: it is never relayed past routing. Empty lines before the request
    line are allowed (RFC 9112 section 2.2).
    """
    start = 0
    n = len(buf)
    while start < n and buf[start] in (13, 10):
        start += 1
    if start > MAX_EMPTY_LINES:
        return Kind.HTTP  # the request parser refuses it
    if start == n:
        return Kind.NEED_MORE
    if buf[start] not in _TCHARS:
        return Kind.OTHER
    head = bytes(buf[start : start + len(_H2_PREFACE)])
    if _H2_PREFACE.startswith(head):
        return Kind.NEED_MORE if len(head) < len(_H2_PREFACE) else Kind.OTHER
    return Kind.HTTP  # even "PRI * HTTP/2.0" that is not the whole preface: h11 reads that as a request


def skip_empty_lines(buf: bytes | bytearray, pos: int) -> int:
    """Index of the first byte at or after ``pos`` that does not begin a CRLF pair."""
    n = len(buf)
    while pos + 1 < n and buf[pos] == 13 and buf[pos + 1] == 10:
        pos += 2
    return pos


def _find_head(buf: bytes | bytearray, start: int, search_from: int, status: int, what: str) -> int:
    """Index just past the head's terminating blank line, or -1 if it is not complete.

    A line that ends in a bare LF is refused at once (``status``) rather than waited on:
    this parser only ends lines at CRLF, and a peer that ends them at LF would otherwise
    wait for a blank line that never comes.
    """
    end = buf.find(b"\r\n\r\n", search_from)
    if end < 0:
        if len(buf) - start > MAX_HEAD_SIZE:
            raise ProtocolError(431 if status == 400 else status, f"{what} head larger than 64 KiB")
        if _BARE_LF.search(buf, max(start, search_from)) is not None:
            raise ProtocolError(status, f"{what} head has a line that ends in a bare LF (CRLF is required)")
        return -1
    if end - start > MAX_HEAD_SIZE:
        raise ProtocolError(431 if status == 400 else status, f"{what} head larger than 64 KiB")
    return end + 4


def _parse_fields(lines: list[bytes], status: int) -> list[tuple[bytes, bytes]]:
    headers = []
    match = _HEADER_LINE.fullmatch
    for line in lines:
        m = match(line)
        if m is None:
            if line[:1] in (b" ", b"\t"):
                raise ProtocolError(status, "obsolete line folding in a header")
            raise ProtocolError(status, f"malformed header line {line[:60]!r}")
        headers.append((m[1].lower(), m[2]))
    return headers


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip().lower() for v in values for t in v.split(b",") if t.strip()]


def _content_length(values: list[bytes], status: int) -> int:
    lengths = {t.strip() for v in values for t in v.split(b",")}
    if len(lengths) != 1:
        raise ProtocolError(status, "conflicting Content-Length values")
    (value,) = lengths
    if not value.isdigit() or len(value) > 18:
        raise ProtocolError(status, f"invalid Content-Length {value[:30]!r}")
    return int(value)


def _request_line(line: bytes) -> tuple[bytes, bytes, int]:
    """Method, target and minor version of a request line; raises 400 or 505."""
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        v = _ANY_VERSION.fullmatch(line)
        if v is not None and v[1] != b"1":
            raise ProtocolError(505, f"HTTP version {v[1].decode()}.{v[2].decode()} is not supported; use HTTP/1.1")
        raise ProtocolError(400, f"malformed request line {line[:60]!r}")
    if m[3] != b"1":
        raise ProtocolError(505, f"HTTP version {m[3].decode()}.{m[4].decode()} is not supported; use HTTP/1.1")
    if m[1] == b"PRI":  # llhttp reads on for the rest of an HTTP/2 preface: framing would differ
        raise ProtocolError(400, "method PRI is reserved for the HTTP/2 connection preface")
    return m[1], m[2], int(m[4])


def parse_request_head(buf: bytes | bytearray, start: int = 0, scanned: int = 0) -> RequestHead | None:
    """Parse the request head that begins at ``buf[start]``; None while it is incomplete.

    ``scanned``: how many bytes of ``buf`` an earlier call already searched (so a head
    that arrives in many pieces is searched once, not once per piece). Raises
    :class:`ProtocolError` with 400, 431, 501 or 505 for a request that must be refused.

    A head seen whole on the first call (``scanned`` 0: the usual case) is matched by one
    compiled pattern (:data:`_FAST_REQUEST`); any other goes line by line. Both give the
    same result for every head the pattern accepts (tests/test_http1.py compares them).
    """
    if not scanned:
        m = _FAST_REQUEST.match(buf, start)
        if m is not None and m.end() - start <= MAX_HEAD_SIZE and m[1] != b"PRI":
            method, minor = m[1], int(m[3])
            found = _REQUEST_FRAMING_FIELDS.findall(buf, m.start(4) - 1, m.end(4))
            if len(found) == 1 and minor == 1 and found[0][0].lower() == b"host" and method != b"CONNECT":
                # the usual request: its one framing field is Host; no body, keep-alive, no upgrade
                return RequestHead(method, m[2], 1, None, m.end() - start, _NO_BODY, 0, True, False, m[4])
            fields: dict[bytes, list[bytes]] = {}
            for name, value in found:
                name = name.lower()
                values = fields.get(name)
                if values is None:
                    fields[name] = [value]
                else:
                    values.append(value)
            framing, length, keep_alive, upgrade = _request_framing(method, minor, fields)
            return RequestHead(method, m[2], minor, None, m.end() - start, framing, length, keep_alive, upgrade, m[4])
    return _parse_request_lines(buf, start, scanned)


def _parse_request_lines(buf: bytes | bytearray, start: int, scanned: int) -> RequestHead | None:
    """:func:`parse_request_head` line by line: incomplete heads, and every refusal with its reason."""
    body = start
    n = len(buf)
    while body + 1 < n and buf[body] == 13 and buf[body + 1] == 10:
        body += 2  # RFC 9112 2.2: ignore empty lines before the request line
        if body - start > MAX_EMPTY_LINES:
            raise ProtocolError(400, "too many empty lines before the request line")
    end = _find_head(buf, body, max(body, scanned - 3), 400, "request")
    if end < 0:
        if buf.find(b"\r\n", max(body, scanned - 1)) >= 0:
            # a line was completed by the new bytes: judge the request line now rather than
            # wait for a head that a client speaking something else will never finish
            _request_line(bytes(buf[body : buf.find(b"\r\n", body)]))
        return None
    lines = bytes(buf[body : end - 4]).split(b"\r\n")
    method, target, minor = _request_line(lines[0])
    headers = _parse_fields(lines[1:], 400)
    fields: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in _FRAMING_HEADERS:
            fields.setdefault(name, []).append(value)
    framing, length, keep_alive, upgrade = _request_framing(method, minor, fields)
    return RequestHead(method, target, minor, headers, end - start, framing, length, keep_alive, upgrade)


def _request_framing(method: bytes, minor: int, fields: dict[bytes, list[bytes]]) -> tuple[Framing, int, bool, bool]:
    """Body framing, keep-alive and upgrade of a request from its framing fields (lowercased
    names, values in wire order); raises :class:`ProtocolError` for an ambiguous length."""
    get = fields.get
    hosts = get(b"host")
    if minor >= 1 and hosts is None:
        raise ProtocolError(400, "HTTP/1.1 request without a Host header")
    if hosts is not None and len(hosts) > 1:
        raise ProtocolError(400, "several Host headers")
    te = get(b"transfer-encoding")
    cl = get(b"content-length")
    framing, length = Framing.NONE, 0
    if te is not None:
        if cl is not None:
            raise ProtocolError(400, "both Content-Length and Transfer-Encoding (refused: request smuggling shape)")
        if minor == 0:
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = _tokens(te)
        for coding in codings:
            if coding not in _KNOWN_CODINGS:
                raise ProtocolError(501, f"transfer coding {coding[:30].decode('latin-1')!r} is not implemented")
        if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
            raise ProtocolError(400, "Transfer-Encoding must end with chunked, once")
        framing = Framing.CHUNKED
    elif cl is not None:
        length = _content_length(cl, 400)
        if length:
            framing = Framing.LENGTH
    conn = get(b"connection")
    if conn is None:
        keep_alive, connection_upgrade = minor >= 1, False
    else:
        connection = _tokens(conn)
        keep_alive = b"close" not in connection and (minor >= 1 or b"keep-alive" in connection)
        connection_upgrade = b"upgrade" in connection
    # Parsers disagree on what makes an upgrade (h11: an Upgrade field; llhttp: Upgrade and
    # Connection: upgrade) and on where its body ends (llhttp ends the message at the head),
    # so every reading counts, and a body on any of them is refused: what one side frames
    # as a body the app could read as the next request.
    upgrade = method == b"CONNECT" or connection_upgrade or get(b"upgrade") is not None
    if upgrade and framing is not Framing.NONE:
        if method != b"CONNECT" and b"h2c" in _tokens(get(b"upgrade") or []):  # curl --http2 -d ...
            raise ProtocolError(400, "an Upgrade: h2c request with a body is refused (request smuggling shape); "
                                     "send it over HTTP/2 with prior knowledge (curl --http2-prior-knowledge) or as plain HTTP/1.1")
        raise ProtocolError(
            400,
            f"{'CONNECT' if method == b'CONNECT' else 'an Upgrade request'} with a body is refused "
            "(request smuggling shape); send the body without Upgrade or after the switch",
        )
    return framing, length, keep_alive, upgrade


def parse_response_head(buf: bytes | bytearray, method: bytes, start: int = 0, scanned: int = 0) -> ResponseHead | None:
    """Parse the response head at ``buf[start]`` to a request with ``method``.

    Body framing follows RFC 9112 section 6.3. Raises :class:`ProtocolError` (502) for a
    response that cannot be framed. ``scanned``: as for :func:`parse_request_head`. A
    head seen whole on the first call is matched by one compiled pattern
    (:data:`_FAST_RESPONSE`), any other line by line, with the same result.
    """
    if not scanned:
        m = _FAST_RESPONSE.match(buf, start)
        if m is not None and m.end() - start <= MAX_HEAD_SIZE:
            fields = tuple(_RESPONSE_FRAMING_FIELDS.findall(buf, m.start(3) - 1, m.end(3)))
            status, framing, length, keep_alive = _framing_of(method, m[1], m[2], fields)
            return ResponseHead(status, m.end() - start, framing, length, keep_alive)
    end = _find_head(buf, start, max(start, scanned - 3), 502, "upstream response")
    if end < 0:
        return None
    end -= 4
    lines = bytes(buf[start:end]).split(b"\r\n")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise ProtocolError(502, f"malformed status line {lines[0][:60]!r} from upstream")
    headers = _parse_fields(lines[1:], 502)
    te, cl, conn = [], [], []
    for name, value in headers:
        if name == b"transfer-encoding":
            te.append(value)
        elif name == b"content-length":
            cl.append(value)
        elif name == b"connection":
            conn.append(value)
    return _response_framing(method, int(m[1]), int(m[2]), te, cl, conn, end + 4 - start)


@functools.lru_cache(maxsize=256)
def _framing_of(method: bytes, minor: bytes, status: bytes, fields: tuple[tuple[bytes, bytes], ...]) -> tuple[int, Framing, int, bool]:
    """Status, framing, length and keep-alive of a response head whose status line and
    framing fields (names as sent) are these. Pure, so cached: an app's responses repeat
    the same few heads, and each is then framed by one lookup. Refusals are not cached."""
    te: list[bytes] = []
    cl: list[bytes] = []
    conn: list[bytes] = []
    for name, value in fields:
        name = name.lower()
        (te if name == b"transfer-encoding" else cl if name == b"content-length" else conn).append(value)
    head = _response_framing(method, int(minor), int(status), te, cl, conn, 0)
    return head.status, head.framing, head.length, head.keep_alive


def _response_framing(method: bytes, minor: int, status: int, te: list[bytes], cl: list[bytes], conn: list[bytes],
                      size: int) -> ResponseHead:
    # one Connection value and one plain Content-Length (the usual response) are read directly:
    # a stripped value without a comma is its own single token, as _tokens would make it
    if not conn:
        keep_alive = minor >= 1
    elif len(conn) == 1 and b"," not in conn[0]:
        token = conn[0].lower()
        keep_alive = token != b"close" and (minor >= 1 or token == b"keep-alive")
    else:
        connection = _tokens(conn)
        keep_alive = b"close" not in connection and (minor >= 1 or b"keep-alive" in connection)
    length = 0
    if status == 101 or (method == b"CONNECT" and 200 <= status < 300):
        framing = Framing.TUNNEL
    elif method == b"HEAD" or status < 200 or status in (204, 304):
        framing = Framing.NONE
    elif te:
        framing = Framing.CHUNKED if _tokens(te)[-1:] == [b"chunked"] else Framing.UNTIL_CLOSE
    elif cl:
        value = cl[0]
        length = int(value) if len(cl) == 1 and value.isdigit() and len(value) <= 18 else _content_length(cl, 502)
        framing = Framing.LENGTH if length else Framing.NONE
    else:
        framing = Framing.UNTIL_CLOSE
    if framing is Framing.UNTIL_CLOSE:
        keep_alive = False
    return ResponseHead(status, size, framing, length, keep_alive)


class ChunkedScanner:
    """Finds the end of a chunked body in a byte stream, without copying chunk data.

    Feed it the bytes that follow the head; :meth:`feed` returns how far the body
    reaches in that buffer. Once :attr:`done`, the bytes after that index belong to the
    next message. ``error_status`` is the status of the :class:`ProtocolError` raised
    for a malformed body (400 for requests, 502 for responses).
    """

    __slots__ = ("done", "_remaining", "_line", "_in_trailer", "_trailer_size", "_error_status")

    def __init__(self, error_status: int = 400) -> None:
        self.done = False
        self._remaining = 0  # data bytes, then 2 for the CRLF after them, still to skip
        self._line = b""  # partial size or trailer line
        self._in_trailer = False
        self._trailer_size = 0
        self._error_status = error_status

    def feed(self, buf: bytes, pos: int = 0) -> int:
        n = len(buf)
        while pos < n and not self.done:
            if self._remaining:
                take = min(self._remaining, n - pos)
                if self._remaining <= 2:  # the CRLF that closes a chunk's data
                    expect = b"\r\n"[2 - self._remaining : 2 - self._remaining + take]
                    if buf[pos : pos + take] != expect:
                        raise ProtocolError(self._error_status, "chunk data longer than its size")
                elif take > self._remaining - 2:
                    take = self._remaining - 2
                self._remaining -= take
                pos += take
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                self._line += buf[pos:]
                if len(self._line) > MAX_CHUNK_LINE:
                    raise ProtocolError(self._error_status, "chunk size line too long")
                return n
            line = self._line + buf[pos:nl]
            self._line = b""
            pos = nl + 1
            if not line.endswith(b"\r") or len(line) > MAX_CHUNK_LINE:
                raise ProtocolError(self._error_status, "malformed chunk line")
            line = line[:-1]
            if self._in_trailer:
                self._trailer_size += len(line) + 2
                if not line:
                    self.done = True
                elif _HEADER_LINE.fullmatch(line) is None:
                    raise ProtocolError(self._error_status, "malformed trailer")
                elif self._trailer_size > MAX_TRAILER_SIZE:
                    raise ProtocolError(self._error_status, "chunked trailer section larger than 64 KiB")
                continue
            m = _CHUNK_SIZE.fullmatch(line)
            if m is None:
                raise ProtocolError(self._error_status, f"malformed chunk size {line[:30]!r}")
            size = int(m[1], 16)
            if size == 0:
                self._in_trailer = True
            else:
                self._remaining = size + 2
        return pos


def forwarding(host: str) -> list[tuple[bytes, bytes]]:
    """The fields that tell the app who the client is: ``X-Forwarded-For`` and
    ``Forwarded`` (RFC 7239) naming ``host``, the peer address of the connection, as
    ``(lowercase name, value)``.

    They come after every field the client sent: for these list fields a new line is the
    same as appending to the list (RFC 9110 section 5.3), so ``X-Forwarded-For: a`` from
    an ingress becomes ``a, <peer>`` for an app that joins repeated lines, the usual
    reading, and the last entry is always the agent's. An IPv4-mapped IPv6 address is
    written as IPv4; an IPv6 address is bracketed and quoted in ``Forwarded``.
    """
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    node = f'"[{host}]"' if ":" in host else host
    return [(b"x-forwarded-for", host.encode("ascii", "replace")), (b"forwarded", f"for={node}".encode("ascii", "replace"))]


def forwarding_fields(host: str) -> bytes:
    """:func:`forwarding` as HTTP/1.1 field lines, spliced in before the head's final CRLF."""
    (_, xff), (_, fwd) = forwarding(host)
    return b"X-Forwarded-For: " + xff + b"\r\nForwarded: " + fwd + b"\r\n"


def error_response(status: int, reason: str, *, head_only: bool = False) -> bytes:
    """A short plain-text response from the agent itself; the connection closes after it."""
    body = (reason.rstrip() + "\n").encode("utf-8", "replace")
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "X-Intercept-Agent: error\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class Answers:
    """Counts the complete responses on a connection whose requests are known only by their
    methods, in order (:meth:`expect`); the responses themselves are discarded. Sans-IO: a
    mirror's channel feeds it what the developer's process says (:mod:`intercept.agent.mirror`).

    Interim (1xx) responses are skipped; a response delimited by the connection's close
    completes at :meth:`closed`. Raises :class:`ProtocolError` (502) for bytes that are not
    a response to an expected request: the connection can no longer be framed.
    """

    __slots__ = ("methods", "_buf", "_scanned", "_head", "_left", "_chunks")

    def __init__(self) -> None:
        self.methods: deque[bytes] = deque()  # of the requests not answered yet, oldest first
        self._buf = b""
        self._scanned = 0
        self._head: ResponseHead | None = None  # of the response whose body is arriving
        self._left = 0
        self._chunks: ChunkedScanner | None = None

    def expect(self, method: bytes) -> None:
        self.methods.append(method)

    def feed(self, data: bytes) -> int:
        """How many responses ``data`` completed."""
        buf = self._buf + data if self._buf else data
        self._buf, pos, n, done = b"", 0, len(buf), 0
        while pos < n:
            head = self._head
            if head is None:
                if not self.methods:
                    raise ProtocolError(502, "a response to no request")
                head = parse_response_head(buf, self.methods[0], pos, self._scanned if pos == 0 else 0)
                if head is None:
                    self._buf, self._scanned = buf[pos:], n - pos
                    return done
                self._scanned = 0
                pos += head.size
                if head.status < 200:
                    continue
                if head.framing is Framing.TUNNEL:
                    raise ProtocolError(502, "a response that switches protocols")
                self._head, self._left = head, head.length
                self._chunks = ChunkedScanner(502) if head.framing is Framing.CHUNKED else None
            if head.framing is Framing.LENGTH:
                take = min(self._left, n - pos)
                self._left -= take
                pos += take
                finished = self._left == 0
            elif head.framing is Framing.CHUNKED:
                pos = self._chunks.feed(buf, pos)
                finished = self._chunks.done
            elif head.framing is Framing.UNTIL_CLOSE:
                return done  # everything up to the close is its body
            else:
                finished = True
            if finished:
                self._head = None
                self.methods.popleft()
                done += 1
        return done

    def closed(self) -> int:
        """The connection closed: 1 when that ended a response (one delimited by the close)."""
        head, self._head = self._head, None
        if head is not None and head.framing is Framing.UNTIL_CLOSE:
            self.methods.popleft()
            return 1
        return 0
