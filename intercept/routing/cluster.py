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
     "routes": [{"sandbox": "pr-42",
                 "rules": [{"kind": "header", "name": "x-intercept-id", "value": "pr-42"}],
                 "destination": "orders-sbx-pr-42.shop.svc.cluster.local:8080",
                 "expires": 1764633600.0}]}

``updated`` orders documents: an agent keeps the newest it has seen, so a push that
arrived before the kubelet refreshed the mounted file is not undone by the old file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from intercept.errors import UsageError
from intercept.routing.match import Route

MAX_DOCUMENT = 1 << 20  # bytes: what a ConfigMap can hold; a longer routes file is refused unread
SESSION_PREFIX = "sandbox:"  # the pseudo session that holds a sandbox's routes in the route table
_HOST = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def sandbox_name(text: str) -> str:
    """A sandbox's name: a DNS label short enough to suffix workload and Service names."""
    if not (1 <= len(text) <= 30 and _NAME.fullmatch(text)):
        raise UsageError(f"sandbox name {text!r}: use lowercase letters, digits and '-', at most 30 characters, e.g. pr-42")
    return text


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

    def to_text(self) -> str:
        return json.dumps({"updated": self.updated, "routes": [r.to_json() for r in self.routes]}, indent=1)

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
        return cls(updated, tuple(ClusterRoute.from_json(r) for r in data.get("routes", [])))

    def without(self, sandbox: str, updated: float) -> RoutesDocument:
        return RoutesDocument(updated, tuple(r for r in self.routes if r.sandbox != sandbox))

    def with_routes(self, routes: list[ClusterRoute], updated: float) -> RoutesDocument:
        """This document with ``routes`` replacing those of their sandbox."""
        sandboxes = {r.sandbox for r in routes}
        return RoutesDocument(updated, tuple(r for r in self.routes if r.sandbox not in sandboxes) + tuple(routes))

    def sandboxes(self) -> list[str]:
        return sorted({r.sandbox for r in self.routes})


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
