"""The routes of the developers intercepting a workload, kept where a new pod reads them. Sans-IO.

A developer's route lives on each agent replica only once their client has connected to
it and registered. A pod that becomes Ready after a rollout, a delete or a scale-up would
answer that developer's requests with the app until then. So every client also writes
its route into the workload's routes ConfigMap (key ``developers.json``, the
:class:`DevelopersDocument` here), which the injection mounts beside the sandboxes'
routes: an agent that starts knows every active route from its first request, as a
*pending* route of that developer (:data:`PENDING_PREFIX`), and holds a matching
request until their session arrives and takes the route over (up to the hold timeout;
then the request goes to the app, as for a developer who left).

Each entry carries its ``expires``: the client renews it while it runs and removes it
when it leaves, and an entry whose client died without a word expires by itself. The
destination of a pending route is always the developer's own session, never an address:
what this document may hold buys nothing a developer's token does not.

The document::

    {"developers": [{"name": "alice", "rules": [{"kind": "header", "name": "x-dev", "value": "alice"}],
                     "expires": 1764547500.0}]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from intercept.errors import UsageError
from intercept.routing.match import Route

PENDING_PREFIX = "pending:"  # the pseudo session holding a developer's route until their session arrives
LEASE = 600.0  # seconds an entry lives unless its client renews it
RENEW = 120.0  # seconds between a running client's renewals
MAX_DOCUMENT = 1 << 20  # bytes: what a ConfigMap can hold


@dataclass(frozen=True)
class DeveloperRoute:
    """``name``'s route (``route``; all traffic when it has no rule) until ``expires``."""

    name: str
    route: Route
    expires: float

    @property
    def session_id(self) -> str:
        return PENDING_PREFIX + self.name

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rules": self.route.to_json(), "expires": self.expires}

    @classmethod
    def from_json(cls, data: Any) -> DeveloperRoute:
        if not isinstance(data, dict):
            raise UsageError("a developer's route is an object with name, rules and expires")
        name, rules, expires = data.get("name"), data.get("rules"), data.get("expires")
        if not isinstance(name, str) or not name.isprintable() or not 0 < len(name) <= 253:
            raise UsageError("a developer's route names the developer (text)")
        if not isinstance(rules, list):
            raise UsageError(f"the route of {name}: rules must be a list")
        if not isinstance(expires, int | float) or isinstance(expires, bool) or not math.isfinite(expires):
            raise UsageError(f"the route of {name}: expires must be a Unix time")
        return cls(name, Route.from_json(rules), float(expires))


@dataclass(frozen=True)
class DevelopersDocument:
    """Every developer's route on one workload, as its ConfigMap holds them."""

    developers: tuple[DeveloperRoute, ...] = ()

    def to_text(self) -> str:
        return json.dumps({"developers": [d.to_json() for d in self.developers]}, indent=1)

    @classmethod
    def from_bytes(cls, data: bytes) -> DevelopersDocument:
        """:class:`UsageError` for anything that is not such a document (too long, not UTF-8 or
        JSON, nested too deep, a wrong type anywhere)."""
        if len(data) > MAX_DOCUMENT:
            raise UsageError(f"developers document is longer than {MAX_DOCUMENT} bytes (a ConfigMap's limit)")
        try:
            raw = json.loads(data.decode())
        except RecursionError:
            raise UsageError("developers document is nested too deeply") from None
        except ValueError as e:  # UnicodeDecodeError too
            raise UsageError(f"developers document is not JSON text: {e}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("developers", []), list):
            raise UsageError("a developers document is an object with a list of developers")
        try:
            return cls(tuple(DeveloperRoute.from_json(d) for d in raw.get("developers", [])))
        except RecursionError:
            raise UsageError("developers document is nested too deeply") from None

    def live(self, now: float) -> list[DeveloperRoute]:
        return [d for d in self.developers if d.expires > now]

    def with_route(self, entry: DeveloperRoute, now: float) -> DevelopersDocument:
        """This document with ``entry`` (replacing the same developer's same route) and
        without the entries that expired."""
        kept = [d for d in self.live(now) if (d.name, d.route) != (entry.name, entry.route)]
        return DevelopersDocument((*kept, entry))

    def without_route(self, name: str, route: Route, now: float) -> DevelopersDocument:
        return DevelopersDocument(tuple(d for d in self.live(now) if (d.name, d.route) != (name, route)))
