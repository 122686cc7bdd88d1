"""What an intercept tells the people, scripts and editors watching it.

Every face renders the same :class:`Event`: the CLI as the line
``intercept: KIND: MESSAGE`` (a contract: VS Code's problem matcher and scripts read it),
``intercept start --output json`` and ``intercept up`` as one JSON object per line, the
MCP server as part of a tool result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

EventKind = Literal[
    "starting",  # what is about to be intercepted, and through what
    "header",  # the personal header, when no rule was given
    "progress",  # injecting the agent, waiting for its rollout
    "waiting",  # nothing reachable yet, or the local process does not accept
    "ready",  # requests that match now reach the local port
    "joined",  # one more agent replica holds the route
    "gone",  # an agent replica went away
    "reconnecting",  # a connection to an agent was lost; retrying
    "reconnected",
    "debug",  # debugpy listens
    "outbound",  # the local process reaches the cluster through the proxy
    "forward",  # a --forward listens
    "access",  # the local process reaches the cluster's Services by name (and which came or went)
    "mount",  # the pod's files are under a local directory (--mount)
    "mirrored",  # a mirror's copies so far: copied (answered by the local process) and dropped
    "warning",  # something works, but probably not as the developer expects
    "reloading",  # a change was saved; the local process restarts
    "reloaded",
    "exited",  # the local process exited
    "leaving",  # the route is off every agent; responses in flight are let finish
    "left",  # the route is gone from every agent
    "error",  # the intercept ended with an error
]

KINDS: tuple[str, ...] = EventKind.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Event:
    """One thing that happened to an intercept.

    ``route`` describes the route for ``starting``, ``ready`` and ``left``
    (``requests with x-dev: alice``); ``replica`` names the agent replica for ``joined``,
    ``gone``, ``reconnecting`` and ``reconnected`` on a Service; ``status`` is the exit
    status for ``exited``, and the exit code of the error for ``error``; ``fence``
    describes the outbound fence in effect for ``ready`` (``allow redis:6379; deny
    10.0.0.0/8``, or ``everything``); ``path`` is the local directory for ``mount``;
    ``copied`` and ``dropped`` count a mirror's copies for ``mirrored``.
    """

    kind: EventKind
    message: str
    replica: str | None = None
    status: int | None = None
    route: str | None = None
    fence: str | None = None
    path: str | None = None
    copied: int | None = None
    dropped: int | None = None

    def line(self) -> str:
        return f"intercept: {self.kind}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.replica is not None:
            out["replica"] = self.replica
        if self.status is not None:
            out["status"] = self.status
        if self.route is not None:
            out["route"] = self.route
        if self.fence is not None:
            out["fence"] = self.fence
        if self.path is not None:
            out["path"] = self.path
        if self.copied is not None:
            out["copied"], out["dropped"] = self.copied, self.dropped
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        kind = data.get("kind")
        if kind not in KINDS or not isinstance(data.get("message"), str):
            raise ValueError(f"not an intercept event: {data!r}")
        return cls(kind, data["message"], data.get("replica"), data.get("status"), data.get("route"), data.get("fence"),
                   data.get("path"), data.get("copied"), data.get("dropped"))
