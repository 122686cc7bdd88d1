"""The SSH wire protocol between the agent and its clients: constants and control messages.

Both sides import this module and nothing of each other, so that the client does not load
the agent and the two cannot drift apart.

Channels:

- The control channel is the SSH subsystem :data:`CONTROL_SUBSYSTEM`: JSON lines, one
  reply line per request line, in order.
- The pod's files are the SFTP subsystem :data:`FILES_SUBSYSTEM`: read-only, each served
  root at its path (the app's ``mountPath``); ``hello`` lists the roots (``files``).
- The client asks for ``tcpip-forward`` on the pseudo address
  (:data:`FORWARD_HOST`, :data:`FORWARD_PORT`); nothing is bound in the pod. The agent then
  opens one ``forwarded-tcpip`` channel per routed downstream connection, and for a mirror
  (``Register(mirror=True)``) one per downstream HTTP/1.1 connection with copies, or one
  HTTP/2 connection carrying every stream's copy; what comes back on those is discarded. An
  agent in front of several app ports (``hello``'s ``ports``; feature ``ports``) takes instead,
  for each port a developer intercepts, ``tcpip-forward`` on (:data:`PORT_FORWARD_HOST`, the
  app's port), and opens each routed connection on the pseudo address of the port it came to;
  (:data:`FORWARD_HOST`, :data:`FORWARD_PORT`) stands for its first port.
- ``direct-tcpip`` to (:data:`FRONT_DOOR_HOST`, :data:`FRONT_DOOR_PORT`) reaches the agent's
  own HTTP listener, so a client can send a request exactly as cluster traffic arrives
  (routed like it). Any other ``direct-tcpip`` is outbound from the pod and needs the agent's
  ``--allow-outbound``; it must pass the agent's outbound fence and the session's
  (:class:`Fence`, :mod:`intercept.routing.fence`). A refusal by a fence is the channel-open
  failure ``administratively prohibited`` whose reason starts with :data:`FENCE_REFUSED`
  and names the rule.

Requests are small frozen classes (:data:`Request`); :func:`encode` writes one and
:func:`decode` reads one, raising :class:`BadRequest` for anything else. Replies are
typed too (:class:`Reply` and its subclasses, one per request: :data:`REPLIES`), JSON
objects with ``"ok": true`` on the wire, read with :func:`decode_reply`; ``hello``
carries :data:`PROTOCOL_VERSION` and the rule kinds and :data:`FEATURES` the agent
knows, so a client meeting an older agent says which feature it lacks. A refusal (:class:`Refusal`) carries ``error`` (``conflict``,
``invalid``, ``fenced``, ``forbidden``, ``bad-request``), ``message`` and, for a conflict, the ``holder``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

CONTROL_SUBSYSTEM = "intercept"
FILES_SUBSYSTEM = "sftp"  # the pod's files, read-only (the agent's --serve-files; in a pod, the app's mounts)
FORWARD_HOST = "intercept"
FORWARD_PORT = 1
PORT_FORWARD_HOST = "intercept-port"  # with the app's port: routed connections that came to that port
FRONT_DOOR_HOST = "intercept-http"
FRONT_DOOR_PORT = 1
EARLY_DATA_ORIGIN = "intercept-early-data:"  # then, base64: a channel's first bytes, carried by its opening (EarlyData)
EARLY_DATA_MAX = 8192  # bytes carried by an opening at most (an SSH packet holds 32 KiB; base64 grows them by a third)
KEEPALIVE_INTERVAL = 5
# asyncssh drops a peer when the timer fires with count_max keepalives unanswered: after
# (count_max + 1) silent intervals. 2 makes a silent peer's loss known within 15 s.
KEEPALIVE_COUNT_MAX = 2
SILENT_LOSS_BOUND = KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT_MAX + 1)  # seconds: what the README promises
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr"]
MAX_CONTROL_LINE = 1 << 20
FENCE_REFUSED = "refused by the outbound fence: "
# The control protocol's version, in every hello. 1: agents from before hello said it. 2: hello
# names the rule kinds and features the agent knows, and every reply is one of the typed
# replies below.
PROTOCOL_VERSION = 2
RULE_KINDS = ("header", "header-regex", "baggage", "path-prefix")  # what a version-1 agent knew too
# What an agent may do beyond version 1's requests, by name: a client asks for a feature only
# from an agent whose hello lists it, and otherwise says which one the agent lacks.
FEATURES = (
    "check-outbound",  # CheckOutbound: would the fences let host:port through?
    "signed-pushes",  # SetClusterRoutes carries the document's text and the routes authority's signature
    "pending-routes",  # routes of developers not connected yet, from the mounted developers file
    "mirror",  # Register(mirror=True): a copy of each matching request; the app still answers
    "ports",  # in front of several app ports (hello's ports), each forwarded on (PORT_FORWARD_HOST, port)
    "reach",  # Reach: this session reaches the cluster through the pod, in use from then on; hello names such sessions
    "early-data",  # EarlyData: a new channel's first bytes come with its opening, so they need no round trip first
)


class BadRequest(ValueError):
    """A control line that is not a known request."""


@dataclass(frozen=True)
class Hello:
    """What the agent says of itself (version, upstream, outbound allowed)."""

    op: ClassVar[str] = "hello"


@dataclass(frozen=True)
class Env:
    """The pod's environment: the app container's variables."""

    op: ClassVar[str] = "env"


@dataclass(frozen=True)
class ListRoutes:
    """Everyone's routes on this agent."""

    op: ClassVar[str] = "list"


@dataclass(frozen=True)
class Register:
    """Hold a route (all ``rules`` must match; ``all``: every request) for this session;
    with ``ttl`` (seconds) the agent ends it by itself then, connected or not.

    With ``mirror`` (feature ``"mirror"``) the route takes nothing: each matching request
    still goes where it would, and a copy of it comes to this session, whose answer the
    agent reads and discards. Sent only when true, so an agent without the feature reads
    every other register as before."""

    op: ClassVar[str] = "register"
    rules: list[dict[str, Any]] = field(default_factory=list)
    all: bool = False
    ttl: float | None = None
    mirror: bool = False


@dataclass(frozen=True)
class Unregister:
    op: ClassVar[str] = "unregister"
    id: int


@dataclass(frozen=True)
class Drain:
    """Around a restart of the developer's process: channels close at response ends."""

    op: ClassVar[str] = "drain"


@dataclass(frozen=True)
class Resume:
    op: ClassVar[str] = "resume"


@dataclass(frozen=True)
class SetClusterRoutes:
    """The sandboxes' routes of this workload, pushed so they take effect before the mounted
    file catches up: ``document`` is the text of an
    :class:`intercept.routing.cluster.RoutesDocument` and ``signature`` its signature by the
    namespace's routes authority (:class:`~intercept.routing.cluster.RoutesAuthority`: base64
    Ed25519 over a fixed prefix and the text, exactly as sent). The agent verifies it against
    the authority of its mounted routes file and refuses (``forbidden``) a push without
    one, unsigned, or signed by another key. The reply says which sandboxes were
    ``applied``, the ``refused`` ones (a conflict) and, for a document older than the one
    in place, ``stale``."""

    op: ClassVar[str] = "cluster-routes"
    document: str = ""
    signature: str = ""


@dataclass(frozen=True)
class Fence:
    """Narrow this session's outbound connections to ``allow``/``deny`` (``HOST[:PORT]`` rules,
    see :mod:`intercept.routing.fence`); the agent's own fence still applies first, so a
    session can narrow it, never widen it. Sent again, it replaces the session's rules.
    The reply carries the ``fence`` in effect: ``{"agent": {...}, "session": {...}}`` and
    its ``description``."""

    op: ClassVar[str] = "fence"
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CheckOutbound:
    """Would a connection to ``host:port`` from the pod pass the fences (the agent resolves
    the name when an address rule needs it)? A refusal is ``fenced``, naming the rule."""

    op: ClassVar[str] = "check-outbound"
    host: str
    port: int


@dataclass(frozen=True)
class Reach:
    """This session reaches the cluster through the pod (``intercept connect``): the agent
    counts it as in use from now until it leaves, whether or not it has connected anywhere
    yet (``intercept gc`` keeps the agent; ``intercept uninstall`` names it). Refused
    (``invalid``) by an agent that allows no outbound connection."""

    op: ClassVar[str] = "reach"


@dataclass(frozen=True)
class EarlyData:
    """This session takes a new channel's first bytes with its opening: the agent may open a
    routed channel with originator :data:`EARLY_DATA_ORIGIN` followed by those bytes in
    base64 (:func:`early_data_origin`, at most :data:`EARLY_DATA_MAX` of them: a request
    without a body, as the process is to read it). The client connects the channel to its
    process, writes them there, and only then confirms the opening; a refused opening
    delivered nothing. So every new connection's request reaches the developer's process
    after one trip, however many come at once."""

    op: ClassVar[str] = "early-data"


def early_data_origin(data: bytes) -> str:
    """The originator of a channel whose opening carries ``data`` (:class:`EarlyData`)."""
    if len(data) > EARLY_DATA_MAX:
        raise ValueError(f"{len(data)} bytes is more than an opening carries ({EARLY_DATA_MAX})")
    return EARLY_DATA_ORIGIN + base64.b64encode(data).decode()


def early_data(origin: str) -> bytes | None:
    """The bytes an opening with originator ``origin`` carries; None for any other originator
    (or one that is not this encoding: the channel is then an ordinary one)."""
    if not origin.startswith(EARLY_DATA_ORIGIN):
        return None
    try:
        data = base64.b64decode(origin[len(EARLY_DATA_ORIGIN):], validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if len(data) <= EARLY_DATA_MAX else None


Request = (Hello | Env | ListRoutes | Register | Unregister | Drain | Resume | SetClusterRoutes | Fence | CheckOutbound
           | Reach | EarlyData)
_REQUESTS: dict[str, type] = {
    cls.op: cls for cls in (Hello, Env, ListRoutes, Register, Unregister, Drain, Resume, SetClusterRoutes, Fence,
                            CheckOutbound, Reach, EarlyData)
}


# Fields added after an agent could already read the request: written only when they differ
# from their default, so that an agent from before them still reads the request.
_LATER_FIELDS = {Register: ("mirror",)}


def encode(request: Request) -> bytes:
    fields = asdict(request)
    for name in _LATER_FIELDS.get(type(request), ()):
        if not fields[name]:
            del fields[name]
    return json.dumps({"op": request.op, **fields}).encode() + b"\n"


def decode(line: bytes) -> Request:
    """The request on one control line; :class:`BadRequest` says what is wrong with it."""
    try:
        message = json.loads(line)
        op = message.pop("op")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise BadRequest("expected a JSON object with an op") from None
    cls = _REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise BadRequest(f"unknown op {op!r}")
    try:
        request = cls(**message)
    except TypeError as e:
        raise BadRequest(f"malformed {op} request: {e}") from None
    if isinstance(request, Register) and not (isinstance(request.rules, list) and isinstance(request.all, bool)):
        raise BadRequest("malformed register request: rules must be a list and all a boolean")
    if isinstance(request, Register) and not isinstance(request.mirror, bool):
        raise BadRequest("malformed register request: mirror must be a boolean")
    if isinstance(request, Register) and request.ttl is not None and (
            not isinstance(request.ttl, int | float) or isinstance(request.ttl, bool)):
        raise BadRequest("malformed register request: ttl must be a number of seconds")
    if isinstance(request, SetClusterRoutes) and not (isinstance(request.document, str) and isinstance(request.signature, str)):
        raise BadRequest("malformed cluster-routes request: document must be the routes document's text and signature text")
    if isinstance(request, Unregister) and (not isinstance(request.id, int) or isinstance(request.id, bool)):
        raise BadRequest("malformed unregister request: id must be a number")
    if isinstance(request, Fence) and not all(
            isinstance(rules, list) and all(isinstance(r, str) for r in rules) for rules in (request.allow, request.deny)):
        raise BadRequest("malformed fence request: allow and deny must be lists of HOST[:PORT] strings")
    if isinstance(request, CheckOutbound) and not (
            isinstance(request.host, str) and isinstance(request.port, int) and not isinstance(request.port, bool)
            and 0 < request.port < 65536):
        raise BadRequest("malformed check-outbound request: host must be text and port a number from 1 to 65535")
    return request


# --- replies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A request's answer: ``{"ok": true, ...fields}`` on the wire. Reading one keeps only the
    fields its class knows, so a newer agent may add fields without breaking an older client."""

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reply:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class HelloReply(Reply):
    """What the agent says of itself. ``protocol`` is 1 for an agent from before it said so
    (whose ``rule_kinds`` were :data:`RULE_KINDS` and which had none of :data:`FEATURES`)."""

    agent_version: str = "?"
    protocol: int = 1
    rule_kinds: list[str] = field(default_factory=lambda: list(RULE_KINDS))
    features: list[str] = field(default_factory=list)
    upstream: str = ""
    ports: list[int] = field(default_factory=list)  # the app ports it is in front of (empty: an agent before "ports")
    hold_timeout: float = 10.0
    outbound: bool = False
    fence: dict[str, list[str]] = field(default_factory=dict)  # the agent's own: {"allow": [...], "deny": [...]}
    files: list[dict[str, Any]] = field(default_factory=list)  # the served roots: path, present
    tls_connections: int = 0  # connections that began with a TLS record: relayed, never routed
    idle_seconds: float = 0.0  # how long no route has been held (for intercept gc)
    reaching: list[str] = field(default_factory=list)  # the sessions that reach the cluster through the pod now, by name
    resolver: str = ""  # the pod's /etc/resolv.conf: its search path names the cluster's Services

    def lacks(self, feature: str) -> str | None:
        """Why this agent cannot do ``feature`` (one of :data:`FEATURES`), or None when it can."""
        if feature in self.features:
            return None
        return (f"the agent (intercept {self.agent_version}, control protocol {self.protocol}) lacks {feature!r}, "
                f"which this intercept ({PROTOCOL_VERSION}) uses: upgrade it (intercept inject SERVICE --agent-image "
                "IMAGE of this version)")


@dataclass(frozen=True)
class EnvReply(Reply):
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutesReply(Reply):
    routes: list[dict[str, Any]] = field(default_factory=list)  # RouteTable.snapshot(): id, holder, session, ...


@dataclass(frozen=True)
class Registered(Reply):
    id: int = 0
    description: str = ""


@dataclass(frozen=True)
class PushReply(Reply):
    applied: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Drained(Reply):
    busy: int = 0  # channels still carrying a response


@dataclass(frozen=True)
class Done(Reply):
    """A request with nothing to say back (unregister)."""


@dataclass(frozen=True)
class FenceReply(Reply):
    fence: dict[str, Any] = field(default_factory=dict)  # {"agent": {...}, "session": {...}}
    description: str = ""


@dataclass(frozen=True)
class OutboundReply(Reply):
    addresses: list[str] | None = None  # what would be dialled: the addresses (or the name) the fences passed


REPLIES: dict[type, type[Reply]] = {
    Hello: HelloReply, Env: EnvReply, ListRoutes: RoutesReply, Register: Registered, Unregister: Done,
    Drain: Drained, Resume: Drained, SetClusterRoutes: PushReply, Fence: FenceReply, CheckOutbound: OutboundReply,
    Reach: Done, EarlyData: Done,
}


def decode_reply(request: Request, line: bytes) -> Reply | Refusal:
    """The reply to ``request`` on one control line: its typed reply, or a :class:`Refusal`
    (also for a line that is not a JSON object: ``bad-request``)."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return Refusal("bad-request", f"the agent's reply to {request.op} is not JSON")
    if not isinstance(data, dict):
        return Refusal("bad-request", f"the agent's reply to {request.op} is not an object")
    if not data.get("ok"):
        return Refusal.from_json(data)
    try:
        return REPLIES[type(request)].from_json(data)
    except TypeError as e:
        return Refusal("bad-request", f"the agent's reply to {request.op} is malformed: {e}")


@dataclass(frozen=True)
class Refusal:
    """A request the agent refused: ``error`` is ``conflict``, ``invalid``, ``fenced`` (an
    outbound destination the fences refuse), ``forbidden`` (a pushed routes document it
    cannot verify: :class:`SetClusterRoutes`) or ``bad-request``."""

    error: str
    message: str
    holder: str | None = None

    def to_json(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": False, "error": self.error, "message": self.message}
        if self.holder is not None:
            reply["holder"] = self.holder
        return reply

    @classmethod
    def from_json(cls, reply: dict[str, Any]) -> Refusal:
        return cls(str(reply.get("error", "invalid")), str(reply.get("message", "")), reply.get("holder"))
