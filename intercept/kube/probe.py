"""What an app's port speaks: HTTP/1, h2c or TLS, from the first bytes of its answers.

The agent routes HTTP/1.x requests and h2c (HTTP/2 without TLS: gRPC) streams by their
headers; it relays TLS, and anything else, untouched, since the headers are encrypted.
:func:`probe` asks a port three questions, each on a fresh connection that ``connect``
opens (a port-forward to a pod, or a direct TCP connection):

1. a TLS ClientHello: does a TLS handshake complete?
2. an HTTP/1.1 request (``GET / HTTP/1.1``): does the answer start with ``HTTP/1.``?
3. the HTTP/2 connection preface and an empty SETTINGS frame: does a SETTINGS frame come back?

:func:`classify` decides from those answers alone (no I/O): bytes in, a :class:`Protocol` out.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0  # seconds each question may take
HTTP1_REQUEST = b"GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: intercept-doctor\r\nConnection: close\r\n\r\n"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
_SETTINGS = 0x4


@dataclass(frozen=True)
class Answers:
    """What the port said to each question."""

    tls: bool
    http1: bytes  # the first bytes of the answer to the HTTP/1.1 request
    h2: bytes  # the first bytes of the answer to the h2 preface


@dataclass(frozen=True)
class Protocol:
    """The verdict: what the port speaks, whether the agent can route it, and what was seen."""

    speaks: tuple[str, ...]  # of "TLS", "HTTP/1.1", "h2c"
    routable: bool
    seen: str


def classify(answers: Answers) -> Protocol:
    """TLS wins (an HTTPS server may also answer plaintext with a 400); then HTTP/1.1 and h2c."""
    speaks, seen = [], []
    if answers.tls:
        speaks.append("TLS")
        seen.append("a TLS handshake completed")
    if answers.http1.startswith(b"HTTP/1."):
        speaks.append("HTTP/1.1")
        seen.append(f"GET / answered {_status_line(answers.http1)!r}")
    elif not answers.tls:
        seen.append(f"GET / answered {_show(answers.http1)}")
    if len(answers.h2) >= 9 and answers.h2[3] == _SETTINGS:
        speaks.append("h2c")
        seen.append("the HTTP/2 preface was answered with SETTINGS")
    routable = not answers.tls and ("HTTP/1.1" in speaks or "h2c" in speaks)
    return Protocol(tuple(speaks), routable, "; ".join(seen))


def _status_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode("latin-1")[:60]


def _show(data: bytes) -> str:
    return f"with {data[:16]!r}" if data else "nothing (closed or silent)"


Close = Callable[[socket.socket], None]


def probe(connect: Callable[[], socket.socket], host: str, close: Close = socket.socket.close) -> Protocol:
    """Ask the port behind ``connect`` the three questions; ``host`` goes in SNI and ``Host``.

    ``connect`` returns a connected blocking socket (and may raise); each one is handed to
    ``close`` when its question is answered.
    """
    http1 = _ask(connect, close, HTTP1_REQUEST % host.encode(), lambda data: b"\r\n" in data or len(data) >= 256)
    h2 = _ask(connect, close, H2_PREFACE, lambda data: len(data) >= 9)
    return classify(Answers(tls=_tls(connect, close, host), http1=http1, h2=h2))


def _tls(connect: Callable[[], socket.socket], close: Close, host: str) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we ask whether it speaks TLS, not whom to trust
    sock = connect()
    sock.settimeout(PROBE_TIMEOUT)
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)  # it owns the connection now
    try:
        tls.do_handshake()
        return True
    except (OSError, ssl.SSLError) as e:
        log.debug("TLS probe: %s", e)
        return False
    finally:
        close(tls)


def _ask(connect: Callable[[], socket.socket], close: Close, question: bytes, enough: Callable[[bytes], bool]) -> bytes:
    """The first bytes of the answer to ``question``: until ``enough`` says so, the peer closes, or the timeout."""
    answer = b""
    sock = connect()
    try:
        sock.settimeout(PROBE_TIMEOUT)
        sock.sendall(question)
        while not enough(answer) and len(answer) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError as e:
        log.debug("probe %r: %s", question[:16], e)
    finally:
        close(sock)
    return answer
