"""Routes whose destination is in the cluster (sandboxes), as data. Sans-IO.

A sandbox forks a workload and routes the requests that carry its key to the fork,
with no developer connected. Such routes must outlive every client and every agent
restart, so they live in the cluster: a ConfigMap per workload (``routes.json``, the
:class:`RoutesDocument` here) that the injection mounts into the agent, which reads it
again whenever it changes; the CLI also pushes each new document over the control channel
so it takes effect at once on every replica. Each route carries its expiry, which the
agent enforces itself: an expired route stops routing even if nothing deletes it.

The document::

    {"updated": 1764547200.25,
     "authority": "ed25519:9q2mSPEn0cq6JLJ7dz3wVxvwZ3oAiKtTiEy+dr4Ovfo=",
     "routes": [{"sandbox": "pr-42",
                 "rules": [{"kind": "header", "name": "x-intercept-id", "value": "pr-42"}],
                 "destination": "orders-sbx-pr-42.shop.svc.cluster.local:8080",
                 "expires": 1764633600.0}]}

``updated`` orders documents: an agent keeps the newest it has seen, so a push that
arrived before the kubelet refreshed the mounted file is not undone by the old file.
It may be at most :data:`CLOCK_SKEW` ahead of the agent's clock, and a route's
``expires`` at most :data:`MAX_LIFETIME` (and the skew) ahead: a document beyond either
is refused whole (:meth:`RoutesDocument.check_times`).

Who may set these routes (a route's destination is any address in the cluster, so a
developer's token must not buy one): the mounted file is written by ``intercept sandbox``
under the cluster's RBAC. A push comes over a control channel that every holder of the
agent's token can open, so the agent takes it only when it is signed
(:func:`verify_push`) by the namespace's **routes authority**: an Ed25519 key that
``intercept sandbox`` keeps in a Secret of its own (:class:`RoutesAuthority`) and whose
public half, ``authority``, it writes into every routes document. The agent trusts the
public key of its mounted file only, never one a push carries: without a mounted key it
refuses every push, and the file alone still works.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any

from intercept.errors import UnverifiedPush, UsageError
from intercept.routing.match import Route

MAX_DOCUMENT = 1 << 20  # bytes: what a ConfigMap can hold; a longer routes file is refused unread
MAX_LIFETIME = 30 * 86400.0  # seconds: the longest a sandbox lives (create --ttl, extend --ttl)
CLOCK_SKEW = 300.0  # seconds a document's times may run ahead of the agent's clock (the writer's clock is not the pod's)
AUTHORITY_SCHEME = "ed25519:"  # a routes authority's public key: this, then its 32 raw bytes in base64
_SIGNED = b"intercept routes document v1\n"  # what a signature covers: this, then the document's text
SESSION_PREFIX = "sandbox:"  # the pseudo session that holds a sandbox's routes in the route table
_HOST = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def sandbox_name(text: str) -> str:
    """A sandbox's name: a DNS label short enough to suffix workload and Service names."""
    if not (1 <= len(text) <= 30 and _NAME.fullmatch(text)):
        raise UsageError(f"sandbox name {text!r}: use lowercase letters, digits and '-', at most 30 characters, e.g. pr-42")
    return text


def sandbox_lifetime(seconds: float) -> float:
    """A sandbox's lifetime (``--ttl``): more than nothing, at most :data:`MAX_LIFETIME` (the
    agents refuse a route that expires later)."""
    if not 0 < seconds <= MAX_LIFETIME:
        raise UsageError(f"--ttl {seconds:.0f}s: a sandbox lives more than 0s and at most {MAX_LIFETIME / 86400:g}d; "
                         "extend it later with intercept sandbox extend NAME --ttl DURATION")
    return seconds


def parse_destination(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    # ASCII digits, at most 5: int() would take other scripts' digits, and refuses 4,300 of them
    if not sep or not _HOST.fullmatch(host) or not (port.isascii() and port.isdigit() and len(port) <= 5) \
            or not 1 <= int(port) <= 65535:
        shown = text if len(text) <= 100 else text[:100] + "..."
        raise UsageError(f"destination {shown!r}: expected HOST:PORT, e.g. orders-sbx-pr-42.shop.svc.cluster.local:8080")
    return host, int(port)


@dataclass(frozen=True)
class ClusterRoute:
    """Requests matching ``route`` go to ``destination`` until ``expires`` (Unix time)."""

    sandbox: str
    route: Route
    destination: tuple[str, int]
    expires: float

    @property
    def session_id(self) -> str:
        return SESSION_PREFIX + self.sandbox

    @property
    def holder(self) -> str:
        return f"sandbox {self.sandbox}"

    def to_json(self) -> dict[str, Any]:
        host, port = self.destination
        return {"sandbox": self.sandbox, "rules": self.route.to_json(), "destination": f"{host}:{port}", "expires": self.expires}

    @classmethod
    def from_json(cls, data: Any) -> ClusterRoute:
        if not isinstance(data, dict):
            raise UsageError("a cluster route must be an object with sandbox, rules, destination and expires")
        try:
            sandbox, rules, destination, expires = data["sandbox"], data["rules"], data["destination"], data["expires"]
        except KeyError as e:
            raise UsageError(f"a cluster route lacks {e.args[0]!r}") from None
        if not isinstance(sandbox, str) or not isinstance(destination, str):
            raise UsageError("a cluster route's sandbox and destination are text")
        route = Route.from_json(rules)
        if not route.rules:
            raise UsageError(f"sandbox {sandbox}: a cluster route needs at least one rule")
        return cls(sandbox_name(sandbox), route, parse_destination(destination), _unix_time(expires, f"sandbox {sandbox}: expires"))


@dataclass(frozen=True)
class RoutesDocument:
    """The cluster routes of one workload, as stored in its ConfigMap and pushed to its agents."""

    updated: float
    routes: tuple[ClusterRoute, ...] = ()
    authority: str | None = None  # the routes authority's public key (AUTHORITY_SCHEME...): who signs pushes

    def to_text(self) -> str:
        authority = {"authority": self.authority} if self.authority is not None else {}
        return json.dumps({"updated": self.updated, **authority, "routes": [r.to_json() for r in self.routes]}, indent=1)

    @classmethod
    def from_bytes(cls, data: bytes) -> RoutesDocument:
        """A routes file's content; :class:`~intercept.errors.UsageError` for anything that is not a
        routes document (too long, not UTF-8, not JSON, nested too deep, a wrong type anywhere)."""
        if len(data) > MAX_DOCUMENT:
            raise UsageError(f"routes document is longer than {MAX_DOCUMENT} bytes (a ConfigMap's limit)")
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise UsageError(f"routes document is not UTF-8 ({e.reason} at byte {e.start})") from None
        return cls.from_text(text)

    @classmethod
    def from_text(cls, text: str) -> RoutesDocument:
        """Raises :class:`~intercept.errors.UsageError` saying what is wrong."""
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except RecursionError:
            raise UsageError("routes document is nested too deeply") from None
        except ValueError as e:
            raise UsageError(f"routes document is not JSON: {e}") from None
        try:
            return cls.from_json(data)
        except RecursionError:  # a message quoting a value nested just short of json's limit
            raise UsageError("routes document is nested too deeply") from None

    @classmethod
    def from_json(cls, data: Any) -> RoutesDocument:
        if not isinstance(data, dict) or not isinstance(data.get("routes", []), list):
            raise UsageError("a routes document is an object with updated and a list of routes")
        updated = _unix_time(data.get("updated", 0), "a routes document's updated")
        authority = data.get("authority")
        if authority is not None:
            _public_key(authority)
        return cls(updated, tuple(ClusterRoute.from_json(r) for r in data.get("routes", [])), authority)

    def check_times(self, now: float) -> None:
        """:class:`UsageError` when ``updated`` is more than :data:`CLOCK_SKEW` ahead of ``now``
        (it would make every later document look stale) or a route expires more than
        :data:`MAX_LIFETIME` from ``now``."""
        if self.updated > now + CLOCK_SKEW:
            raise UsageError(f"routes document: updated is {self.updated - now:.0f}s ahead of the agent's clock "
                             f"(at most {CLOCK_SKEW:g}s is taken); check the clock of the machine that wrote it")
        for route in self.routes:
            if route.expires > now + MAX_LIFETIME + CLOCK_SKEW:
                raise UsageError(f"{route.holder}: expires {route.expires - now:.0f}s from now, past the longest "
                                 f"lifetime of a sandbox ({MAX_LIFETIME / 86400:g} days)")

    def without(self, sandbox: str, updated: float) -> RoutesDocument:
        return replace(self, updated=updated, routes=tuple(r for r in self.routes if r.sandbox != sandbox))

    def with_routes(self, routes: list[ClusterRoute], updated: float) -> RoutesDocument:
        """This document with ``routes`` replacing those of their sandbox."""
        sandboxes = {r.sandbox for r in routes}
        return replace(self, updated=updated,
                       routes=tuple(r for r in self.routes if r.sandbox not in sandboxes) + tuple(routes))

    def sandboxes(self) -> list[str]:
        return sorted({r.sandbox for r in self.routes})


@dataclass(frozen=True)
class RoutesAuthority:
    """The private key that signs pushed routes documents (``intercept sandbox`` keeps it in
    a Secret of its own); ``public`` goes into every routes document it writes."""

    private_key: bytes  # the Ed25519 key's 32 raw bytes

    @classmethod
    def generate(cls) -> RoutesAuthority:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        return cls(Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    def _key(self) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.private_key)

    @property
    def public(self) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = self._key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return AUTHORITY_SCHEME + base64.b64encode(raw).decode()

    def sign(self, text: str) -> str:
        """The signature of a document's text, as :func:`verify_push` checks it (base64)."""
        return base64.b64encode(self._key().sign(_SIGNED + text.encode())).decode()


def verify_push(text: str, signature: str, authority: str | None) -> RoutesDocument:
    """The pushed document ``text``, once ``signature`` verifies against ``authority`` (the
    public key of the agent's mounted routes file; None: it has none). Raises
    :class:`~intercept.errors.UnverifiedPush` saying why not, or
    :class:`~intercept.errors.UsageError` for a signed text that is no routes document."""
    if authority is None:
        raise UnverifiedPush("refused a pushed routes document: this agent's routes file names no routes authority "
                             "to verify it against (intercept sandbox create writes one into the ConfigMap; the "
                             "agent applies the file itself when the kubelet refreshes it)")
    if not signature:
        raise UnverifiedPush("refused a pushed routes document: it is not signed; only intercept sandbox, with the "
                             "namespace's routes authority, may push routes")
    from cryptography.exceptions import InvalidSignature  # loaded already: a push comes over SSH
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(_public_key(authority)).verify(base64.b64decode(signature, validate=True),
                                                                          _SIGNED + text.encode())
    except (InvalidSignature, binascii.Error, ValueError):
        raise UnverifiedPush(f"refused a pushed routes document: its signature does not verify against the routes "
                             f"authority of this agent's routes file ({authority[:20]}...); only intercept sandbox, "
                             "with the namespace's routes authority, may push routes") from None
    return RoutesDocument.from_text(text)


def _public_key(authority: Any) -> bytes:
    """The 32 raw bytes of an ``authority`` (:data:`AUTHORITY_SCHEME` and base64); UsageError otherwise."""
    if isinstance(authority, str) and authority.startswith(AUTHORITY_SCHEME):
        try:
            raw = base64.b64decode(authority[len(AUTHORITY_SCHEME):], validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) == 32:
            return raw
    raise UsageError(f"a routes document's authority is {AUTHORITY_SCHEME} and a 32-byte public key in base64")


def _unix_time(value: Any, what: str) -> float:
    """``value`` as a finite Unix time; :class:`UsageError` naming ``what`` otherwise (the value
    is not shown: it may be 4,000 digits long)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise UsageError(f"{what} must be a Unix time (a number)")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise UsageError(f"{what} must be a finite Unix time")
    return seconds


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")
