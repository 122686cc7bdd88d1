"""The outbound fence: where a developer's connections from the agent's pod may go. Sans-IO.

The outbound proxy and ``--forward`` dial from the agent's pod (SSH ``direct-tcpip``). A
fence says where to: ``--outbound-allow HOST[:PORT]`` and ``--outbound-deny HOST[:PORT]``,
each repeatable. ``HOST`` is

- a host name pattern: case-insensitive, ``*`` stands for any run of characters (dots
  included), so ``*.shop.svc.cluster.local`` is every name under it, ``redis*`` every name
  that starts so, and ``*`` alone every destination; a pattern is compared with the
  destination as the client wrote it (``orders`` is not ``orders.shop.svc.cluster.local``,
  although the pod's DNS makes them the same; ``10.0.0.*`` matches the text ``10.0.0.5``,
  not a name that resolves to it: use a network for that);
- an address or a network in CIDR notation (``10.96.0.10``, ``10.0.0.0/8``, ``fd00::/8``;
  ``[fd00::1]:443`` and ``[fd00::/8]:443`` with a port), compared with the address the
  agent connects to: a destination given by name is resolved by the agent first, and
  only the addresses that pass are dialled (so a name cannot smuggle a denied address).

``PORT`` is a port number, or absent (or ``*``) for every port.

A destination passes one :class:`Fence` when no deny rule matches it and, if there is any
allow rule, one allow rule does (**deny wins**). No rule at all: everything passes (what
the pod's own network policies allow). The agent checks its own fence and the fence the
client asked for on its session, in that order: a session can narrow the agent's fence,
never widen it. A refusal names the rule (:attr:`Verdict.reason`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from intercept.errors import UsageError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAME = re.compile(r"[a-z0-9*_]([a-z0-9*_.-]*[a-z0-9*_])?")


@dataclass(frozen=True)
class FenceRule:
    """One ``HOST[:PORT]`` of ``--outbound-allow`` or ``--outbound-deny``, as written in ``text``.

    Exactly one of ``pattern`` (a lower-case name pattern) and ``network`` is set;
    ``port`` None is every port.
    """

    text: str
    pattern: str | None = None
    network: Network | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str, flag: str = "--outbound-allow") -> FenceRule:
        """A rule from its text; :class:`UsageError` says what is wrong and gives an example."""
        def bad(problem: str) -> UsageError:
            return UsageError(f"{flag} {text!r}: {problem}; e.g. {flag} '*.shop.svc.cluster.local', "
                              f"{flag} redis:6379, {flag} 10.0.0.0/8 or {flag} '[fd00::/8]:443'")

        if not isinstance(text, str) or not text or text != text.strip():
            raise bad("expected HOST[:PORT] without spaces")
        host, port_text = text, None
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or rest and not rest.startswith(":"):
                raise bad("an IPv6 address goes in brackets before :PORT")
            port_text = rest[1:] if rest else None
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        port = None
        if port_text is not None and port_text != "*":
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise bad(f"{port_text!r} is not a port (1 to 65535, or * for every port)")
            port = int(port_text)
        try:
            network = _network(host)
        except ValueError as e:
            raise bad(str(e)) from None
        if network is not None:
            return cls(text, network=network, port=port)
        if "/" in host or ":" in host:
            raise bad(f"{host!r} is not an address, a network (CIDR) or a host name pattern")
        name = host.lower().rstrip(".")
        if not _NAME.fullmatch(name) or ".." in name:
            raise bad(f"{host!r} is not a host name pattern (letters, digits, '-', '.', and * for any run of characters)")
        return cls(text, pattern=name, port=port)

    def _port_matches(self, port: int) -> bool:
        return self.port is None or self.port == port

    def matches_name(self, asked: str, port: int) -> bool:
        """Whether this name pattern matches the destination as asked (lower-case) on ``port``."""
        return self.pattern is not None and self._port_matches(port) and fnmatchcase(asked, self.pattern)

    def matches_address(self, address: Address, port: int) -> bool:
        """Whether this network rule matches a connection to ``address`` on ``port``."""
        return (self.network is not None and self._port_matches(port)
                and address.version == self.network.version and address in self.network)

    def __str__(self) -> str:
        return self.text


def _network(host: str) -> Network | None:
    """The network ``host`` writes (an address is a network of one), None for a name;
    ValueError for a network with host bits set (``10.0.0.1/8``), saying which one was meant."""
    try:
        if "/" in host:
            return ipaddress.ip_network(host, strict=True)
        return ipaddress.ip_network(ipaddress.ip_address(host))
    except ValueError as e:
        if "/" in host and "host bits set" in str(e):
            fixed = ipaddress.ip_network(host, strict=False)
            raise ValueError(f"the address has bits set beyond the prefix /{fixed.prefixlen}: write {fixed}") from None
        return None


@dataclass(frozen=True)
class Verdict:
    """A destination's fate: ``allowed``, and then ``addresses`` (the resolved addresses that
    passed, in the resolver's order; None: dial the name as given), or ``reason`` naming the
    rule that refused it."""

    allowed: bool
    addresses: tuple[str, ...] | None = None
    reason: str = ""


@dataclass(frozen=True)
class Fence:
    """Allow and deny rules; ``owner`` says whose they are in refusals ("the agent", "this session")."""

    allow: tuple[FenceRule, ...] = ()
    deny: tuple[FenceRule, ...] = ()
    owner: str = "the agent"

    @classmethod
    def parse(cls, allow: Iterable[str] = (), deny: Iterable[str] = (), owner: str = "the agent") -> Fence:
        return cls(tuple(FenceRule.parse(r, "--outbound-allow") for r in allow),
                   tuple(FenceRule.parse(r, "--outbound-deny") for r in deny), owner)

    @property
    def open(self) -> bool:
        """No rule: every destination passes."""
        return not self.allow and not self.deny

    @property
    def has_address_rules(self) -> bool:
        return any(r.network is not None for r in (*self.allow, *self.deny))

    def to_json(self) -> dict[str, list[str]]:
        return {"allow": [r.text for r in self.allow], "deny": [r.text for r in self.deny]}

    def describe(self) -> str:
        """``allow redis:6379, *.shop; deny 10.0.0.0/8``, or ``everything`` with no rule."""
        parts = [f"{word} {', '.join(r.text for r in rules)}" for word, rules in (("allow", self.allow), ("deny", self.deny)) if rules]
        return "; ".join(parts) or "everything"

    def check(self, host: str, port: int, addresses: Sequence[str] | None = None) -> Verdict:
        """Whether ``host:port`` passes, ``host`` as the client asked (a name or an address).

        ``addresses``: what the agent resolved a name to (needed, for a name, when the fence
        has address rules: without them no address rule can pass the name, and none can
        refuse it). For an address literal they are ignored.
        """
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        asked = host.lower().strip("[]").rstrip(".")
        literal = _address(asked)
        resolved = (literal,) if literal is not None else tuple(a for a in (_address(x) for x in addresses or ()) if a is not None)
        for rule in self.deny:
            if rule.matches_name(asked, port):
                return Verdict(False, reason=f"{target} is denied by {self.owner}'s --outbound-deny {rule.text}")
        kept = list(resolved)
        denied_by: FenceRule | None = None
        for rule in self.deny:
            for address in [a for a in kept if rule.matches_address(a, port)]:
                kept.remove(address)
                denied_by = denied_by or rule
        if denied_by is not None and not kept:
            shown = "" if literal is not None else f" ({', '.join(map(str, resolved))})"
            return Verdict(False, reason=f"{target}{shown} is denied by {self.owner}'s --outbound-deny {denied_by.text}")
        if self.allow and not any(r.matches_name(asked, port) for r in self.allow):
            kept = [a for a in kept if any(r.matches_address(a, port) for r in self.allow)]
            if not kept:
                shown = f" ({', '.join(map(str, resolved))})" if literal is None and resolved else ""
                return Verdict(False, reason=f"{target}{shown} matches no --outbound-allow rule of {self.owner} "
                                             f"(allowed: {', '.join(r.text for r in self.allow)})")
        if not resolved:
            return Verdict(True, None)
        return Verdict(True, tuple(str(a) for a in kept))


def check_all(fences: Sequence[Fence], host: str, port: int, addresses: Sequence[str] | None = None) -> Verdict:
    """``host:port`` against every fence in turn (the agent's first); the first refusal wins,
    and each fence dials only what the ones before let through."""
    verdict = Verdict(True, None)
    for fence in fences:
        if fence.open:
            continue
        verdict = fence.check(host, port, addresses if verdict.addresses is None else verdict.addresses)
        if not verdict.allowed:
            return verdict
    return verdict


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


__all__ = ["Fence", "FenceRule", "Verdict", "check_all"]
