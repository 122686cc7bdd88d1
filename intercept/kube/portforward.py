"""SSH to an agent pod through the Kubernetes port-forward API (the kubernetes client's).

The kubernetes client's port-forward is thread-based: :func:`kubernetes.stream.portforward`
opens a WebSocket to ``pods/NAME/portforward`` and starts one thread (the *relay*) that
moves bytes between that WebSocket and one end of a socketpair. This module is the only
place that touches it: the WebSocket handshake runs in a worker thread, and our end of
the socketpair is handed to asyncssh as an ordinary connected stream socket, so
everything above the transport stays asyncio.

Invariants:

- Nothing listens: the SSH connection runs over a socketpair, not a local port.
- A dropped port-forward is a dropped SSH connection: when the API server, the kubelet or
  the pod ends the WebSocket, the relay closes its end of the pair, asyncssh sees the
  connection lost, and the session reconnects. A relay that stops silently is caught by
  the SSH keepalive (every 5 s, 3 unanswered: 15 s), which also keeps an idle forward
  busy enough not to be reaped for idleness.
- Our end is let go gently: half-closed, drained until the relay closes its end, then
  closed. Closing it outright while the relay still reads or writes makes the relay's
  thread die with a reset or broken pipe, leaving its WebSocket open and a traceback on
  the developer's terminal.
- Every failure to connect is an :class:`~intercept.errors.AgentUnreachable` naming the
  pod and the fix (RBAC, a pod that is gone, an agent that does not listen, the cluster).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException, ApiValueError
from kubernetes.stream import portforward
from kubernetes.stream.ws_client import PortForward

from intercept.errors import AgentUnreachable
from intercept.sshwrite import CoalescingTunnel

log = logging.getLogger(__name__)

RELEASE_TIMEOUT = 5.0  # how long to wait for the relay to close its end after we half-close ours

# Watchers of open connections: held here so that they are not garbage-collected.
_watchers: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class PortForwardTransport:
    """SSH to ``port`` of pod ``namespace/pod`` through the API server's port-forward.

    A transport in the sense of :class:`intercept.client.transport.Transport`. Equal
    transports dial the same pod port through the same API client, which lets a
    :class:`~intercept.client.fleet.Fleet` see whether a replica changed.
    """

    api: ApiClient = field(repr=False)
    namespace: str
    pod: str
    port: int
    timeout: float = 30.0

    def describe(self) -> str:
        return f"pod {self.namespace}/{self.pod} port {self.port} (port-forward)"

    async def connect(self, **ssh_options: Any) -> asyncssh.SSHClientConnection:
        opening = asyncio.ensure_future(asyncio.to_thread(self._open))
        try:
            forward = await asyncio.wait_for(asyncio.shield(opening), self.timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            # The handshake thread cannot be interrupted: close its forward when it arrives.
            opening.add_done_callback(_close_late)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise AgentUnreachable(
                f"agent {self.describe()}: the API server did not open the port-forward within "
                f"{self.timeout:g}s; check that the cluster is reachable (kubectl cluster-info)"
            ) from None
        ours, kept = _ends(forward, self.port)
        try:
            # The host only names the peer (a socketpair has no address); nothing resolves it.
            conn = await asyncssh.connect(self.pod, self.port, tunnel=CoalescingTunnel(sock=ours),
                                          connect_timeout=self.timeout, **ssh_options)
        except (asyncssh.HostKeyNotVerifiable, asyncssh.PermissionDenied):
            ours.close()
            await asyncio.to_thread(_release, kept)
            raise
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as e:
            ours.close()
            await asyncio.to_thread(_release, kept)  # the relay has recorded the kubelet's error, if any, by now
            raise AgentUnreachable(self._failure(forward, e)) from None
        except BaseException:  # cancelled
            ours.close()
            _release_in_thread(kept)
            raise
        watcher = asyncio.ensure_future(self._watch(conn, forward, kept))
        _watchers.add(watcher)
        watcher.add_done_callback(_watchers.discard)
        return conn

    def _open(self) -> PortForward:
        """The WebSocket handshake (blocking; runs in a worker thread).

        On a client of its own: :func:`kubernetes.stream.portforward` swaps the client's
        ``call_api`` for the duration of the call, which would send a concurrent request
        on a shared client (another pod's forward, the pod watch) down the WebSocket path.
        """
        client = ApiClient(self.api.configuration, cookie=self.api.cookie)
        client.default_headers.update(self.api.default_headers)
        try:
            core = CoreV1Api(client)
            return portforward(core.connect_get_namespaced_pod_portforward, self.pod, self.namespace, ports=str(self.port))
        except (ApiException, ApiValueError) as e:
            raise AgentUnreachable(self._refused(e)) from None
        except OSError as e:  # raised before the client wraps it, e.g. reading a certificate
            raise AgentUnreachable(
                f"agent {self.describe()}: cannot open a port-forward: {e.strerror or e}; "
                "check the cluster configuration (kubectl cluster-info)"
            ) from None
        finally:
            client.close()  # the forward's WebSocket is its own connection, not the client's

    def _refused(self, e: Exception) -> str:
        """The API server's refusal of the port-forward, with the fix."""
        reason = str(getattr(e, "reason", None) or e)
        status = re.search(r"Handshake status (\d{3})", reason)
        code = int(status[1]) if status else getattr(e, "status", 0)
        where = f"agent {self.describe()}"
        if code in (401, 403):
            return (
                f"{where}: the API server refused the port-forward ({code}); you need permission to "
                f"create pods/portforward in namespace {self.namespace} "
                f"(kubectl auth can-i create pods/portforward -n {self.namespace})"
            )
        if code == 404:
            return f"{where}: pod {self.pod} does not exist in namespace {self.namespace} (it may have just been replaced)"
        if code:
            return f"{where}: the API server refused the port-forward ({code}): {_gist(reason)}"
        return f"{where}: cannot open a port-forward: {_gist(reason)}; check that the cluster is reachable (kubectl cluster-info)"

    def _failure(self, forward: PortForward, e: BaseException) -> str:
        """Why SSH over an open forward failed: the kubelet's word if it gave one."""
        fix = f"check that the {self.pod} agent container is running and listens on port {self.port}"
        error = _forward_error(forward, self.port)
        if error:
            return f"agent {self.describe()}: the port-forward failed: {_gist(error)}; {fix}"
        return f"agent {self.describe()}: SSH over the port-forward failed: {e or e.__class__.__name__}; {fix}"

    async def _watch(self, conn: asyncssh.SSHClientConnection, forward: PortForward, kept: socket.socket) -> None:
        """When the SSH connection ends (or the event loop does), let the pair go."""
        try:
            await conn.wait_closed()
        finally:
            error = _forward_error(forward, self.port)
            if error:
                log.info("port-forward to %s ended: %s", self.describe(), _gist(error))
            _release_in_thread(kept)


class PodPort:
    """Blocking sockets to one port of a pod through port-forwards, for short exchanges (the
    doctor's probes): one forward per :meth:`connect`, let go by :meth:`close`, which keeps
    what the kubelet said of it in :attr:`errors` (``connect: connection refused`` when nothing
    listens on the port). Refusals of the forward itself raise
    :class:`~intercept.errors.AgentUnreachable`, as for :class:`PortForwardTransport`."""

    def __init__(self, api: ApiClient, namespace: str, pod: str, port: int) -> None:
        self.transport = PortForwardTransport(api, namespace, pod, port)
        self.errors: list[str] = []
        self._forwards: dict[int, PortForward] = {}  # by the socket's file descriptor

    def connect(self) -> socket.socket:
        forward = self.transport._open()
        wrapped = forward.socket(self.transport.port)
        sock = socket.socket(fileno=os.dup(wrapped.fileno()))
        wrapped.close()
        sock.setblocking(True)
        self._forwards[sock.fileno()] = forward
        return sock

    def close(self, sock: socket.socket) -> None:
        forward = self._forwards.pop(sock.fileno(), None)
        _release(sock)  # half-close, drain until the relay lets go (its error is recorded by then), close
        error = _forward_error(forward, self.transport.port) if forward is not None else None
        if error:
            self.errors.append(_gist(error))


def _ends(forward: PortForward, port: int) -> tuple[socket.socket, socket.socket]:
    """Two handles on our end of the forward's socketpair: one for asyncio, one kept.

    The client wraps the end in an adapter object; asyncio (and uvloop) want a real
    ``socket.socket``. asyncio closes its handle with the connection; the kept handle
    keeps the end open until :func:`_release` lets it go gently.
    """
    wrapped = forward.socket(port)
    ours = socket.socket(fileno=os.dup(wrapped.fileno()))
    kept = socket.socket(fileno=os.dup(wrapped.fileno()))
    wrapped.close()
    ours.setblocking(False)
    return ours, kept


def _release(kept: socket.socket) -> None:
    """Half-close our end, drain it until the relay closes its end, then close it (blocking)."""
    try:
        kept.settimeout(RELEASE_TIMEOUT)
        kept.shutdown(socket.SHUT_WR)  # the relay reads EOF, closes its end and the WebSocket
        while kept.recv(65536):
            pass
    except OSError as e:  # includes the timeout
        log.debug("port-forward relay did not close its end cleanly: %s", e)
    finally:
        kept.close()


def _release_in_thread(kept: socket.socket) -> None:
    """:func:`_release` in a thread of its own, which the interpreter waits for at exit.

    So the release completes even when the event loop ends first (``asyncio.run``
    cancels what is left), and the relay's thread never meets a reset.
    """
    threading.Thread(target=_release, args=(kept,), name="intercept port-forward release").start()


def _close_late(opening: asyncio.Future[PortForward]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def _forward_error(forward: PortForward, port: int) -> str | None:
    try:
        return forward.error(port)
    except ValueError:
        return None


def _gist(text: str, limit: int = 300) -> str:
    """The first line of a message, without the headers and body a handshake error appends."""
    text = text.split(" -+-+- ", 1)[0].strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


__all__ = ["PodPort", "PortForwardTransport"]
