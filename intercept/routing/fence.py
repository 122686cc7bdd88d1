"""The outbound fence: where a developer's connections from the agent's pod may go. Sans-IO.

The outbound proxy and ``--forward`` dial from the agent's pod (SSH ``direct-tcpip``). A
fence says where to: ``--outbound-allow HOST[:PORT]`` and ``--outbound-deny HOST[:PORT]``,
each repeatable. ``HOST`` is

- a host name pattern: case-insensitive, ``*`` stands for any run of characters (dots
  included), so ``*.shop.svc.cluster.local`` is every name under it, ``redis*`` every name
  that starts so, and ``*`` alone every destination; a pattern is compared with the
  destination's one form (:class:`Destination`): a name as IDNA writes it (UTS-46:
  ``vault。internal``, ``ＶＡＵＬＴ.internal.`` and ``vault.inter\u00adnal`` are all
  ``vault.internal``), an address in its plain text (``10.0.0.*`` matches ``10.0.0.5`` and
  ``0xa.5``, not a name that resolves to it: use a network for that). ``orders`` is not
  ``orders.shop.svc.cluster.local``, although the pod's DNS makes them the same;
- an address or a network in CIDR notation (``10.96.0.10``, ``10.0.0.0/8``, ``fd00::/8``;
  ``[fd00::1]:443`` and ``[fd00::/8]:443`` with a port), compared with the address the
  agent connects to: a destination given by name is resolved by the agent first, and
  only the addresses that pass are dialled (so a name cannot smuggle a denied address).
  A rule in the IPv4-mapped range is the IPv4 network it carries (``::ffff:10.0.0.0/104``
  is ``10.0.0.0/8``); an address spelled as only some resolvers spell it (``0x7f000001``,
  ``127.1``) and the unspecified addresses (``0.0.0.0``, ``::``) are refused as rules,
  saying what to write.

``PORT`` is a port number, or absent (or ``*``) for every port.

A destination is reduced to the one thing it means before any rule sees it, and the agent
connects to what was judged, never to the text it was given: every form of an address
that ``getaddrinfo`` reads (``127.1``, ``0x7f.1``, ``017700000001``, ``2130706433``,
``0:0::1``, ``[::1]``, ``fe80::1%eth0``) is that address; an IPv4-mapped address
(``::ffff:127.0.0.1``) is the IPv4 address; an IPv4-compatible one (``::127.0.0.1``) or one
in the NAT64 well-known prefix (``64:ff9b::7f00:1``) is judged both as itself and as the
IPv4 address it carries; the unspecified addresses ``0.0.0.0`` and ``::`` reach the pod
itself and are judged as its loopback, ``127.0.0.1`` and ``::1``. A destination judged
in several forms passes only if every form does. Text that resolvers read differently
(``1.2.3.4.``: a name to glibc, an address to a browser) or that is neither an address
nor a host name is refused, saying why.

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

_PATTERN = re.compile(r"[a-z0-9*_]([a-z0-9*_.-]*[a-z0-9*_])?")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
# a part of an address as inet_aton reads it (C's strtoul, base 0): hex, octal or decimal
_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
# a last label that URL parsers (WHATWG) read as a number, making the host an address or an error
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # an interface name (at most IFNAMSIZ - 1) or index
_LONGEST = 253  # characters in a DNS name, without the root dot
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # but :: and ::1, which are not IPv4 addresses
_LOOPBACK = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """The address glibc's ``inet_aton`` reads in the whole of ``text`` (as ``getaddrinfo``
    calls it), or None: one to four parts, each decimal, octal (``0177``) or hex (``0x7f``),
    the last one filling the bytes left (``127.1``, ``0x7f.1``, ``2130706433``)."""
    parts = text.split(".")
    if len(parts) > 4 or not all(_ATON_PART.fullmatch(p) for p in parts):
        return None
    values = [int(p[2:], 16) if p[:2] in ("0x", "0X") else int(p, 8 if p.startswith("0") else 10) for p in parts]
    *head, last = values
    if any(v > 0xFF for v in head) or last >> 8 * (4 - len(head)):
        return None
    value = last
    for i, v in enumerate(head):
        value |= v << 8 * (3 - i)
    return ipaddress.IPv4Address(value)


def _address(text: str) -> Address | None:
    """The one address ``text`` spells, in any form ``getaddrinfo`` reads as a number (an
    IPv6 address with its scope, ``%eth0``, if any), or None. An IPv4-mapped address is the
    IPv4 address: a connection to it is an IPv4 connection. A scope is read only where it
    picks an interface, on a link-local address."""
    if (v4 := _inet_aton(text)) is not None:
        return v4
    if ":" not in text:
        return None
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    if address.scope_id is not None and not (address.is_link_local and _SCOPE.fullmatch(address.scope_id)):
        return None
    return address.ipv4_mapped or address


def _judged_as(address: Address) -> tuple[Address, ...]:
    """The addresses whose rules judge a connection to ``address``: every one must pass."""
    if address.is_unspecified:  # connect() to 0.0.0.0 or :: reaches the pod itself
        return _LOOPBACK
    if address.version == 6:
        plain = ipaddress.IPv6Address(int(address))  # rules judge the address on any interface
        if plain in _NAT64 or (plain in _COMPATIBLE and int(plain) > 1):
            return (plain, *_judged_as(ipaddress.IPv4Address(int(plain) & 0xFFFFFFFF)))
        return (plain,)
    return (address,)


def _dialled(address: Address) -> str:
    """What the agent connects to for ``address``: the loopback for an unspecified address
    (what the kernel would do, said plainly), else the address itself."""
    if address.is_unspecified:
        return str(_LOOPBACK[address.version == 6])
    return str(address)


def _mapped(text: str) -> str:
    """``text`` through UTS-46's mapping (lower case, full-width forms and ideographic dots to
    ASCII, soft hyphens and other ignorables dropped); ValueError says what it cannot map."""
    if text.isascii():
        return text.lower()
    import idna  # noqa: PLC0415 - its tables take ~20 ms to load: only for a name that needs them

    try:
        return idna.uts46_remap(text, std3_rules=False, transitional=False)
    except idna.IDNAError as e:
        raise ValueError(f"it is not a valid internationalised name ({e})") from None


def _labels(name: str, wildcard: bool) -> list[str]:
    """The labels of the mapped ``name`` (without its root dot), each non-ASCII one as its
    IDNA A-label (``xn--``); ValueError says which label is not valid."""
    labels = name.split(".")
    for i, label in enumerate(labels):
        if label.isascii():
            continue
        if wildcard and "*" in label:
            raise ValueError(f"a label with * must be ASCII: write {label!r} as its IDNA form (xn--...) "
                             "and the * in a label of its own")
        import idna  # noqa: PLC0415 - see _mapped

        try:
            labels[i] = idna.alabel(label).decode("ascii")
        except (idna.IDNAError, UnicodeError) as e:
            raise ValueError(f"the label {label!r} is not a valid internationalised name ({e})") from None
    return labels


def _shown(text: str) -> str:
    """``text`` for a message: non-ASCII and control characters escaped, at most 100 characters."""
    shown = text.encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return shown if len(shown) <= 100 else shown[:97] + "..."


@dataclass(frozen=True)
class Destination:
    """A host as a client asked for it (``asked``), reduced to the one thing it means.

    Exactly one of ``address`` (any spelling ``getaddrinfo`` reads as an address, reduced:
    ``0x7f.1`` is ``127.0.0.1``, ``::ffff:10.0.0.1`` is ``10.0.0.1``), ``name`` (lower-case
    ASCII, IDNA A-labels, no root dot: what patterns are compared with; ``rooted`` says
    whether it had one, which resolvers heed) and ``problem`` (why it is neither, or why
    its meaning depends on who reads it: refused) is set.
    """

    asked: str
    address: Address | None = None
    name: str | None = None
    problem: str = ""
    rooted: bool = False  # looked up as is, not in the pod's search domains

    @classmethod
    def of(cls, host: str) -> Destination:
        bracketed = host.startswith("[") and host.endswith("]")
        text = host[1:-1] if bracketed else host
        if len(text) > _LONGEST + 1:
            return cls(host, problem=f"it is longer than any host name ({_LONGEST} characters)")
        try:
            mapped = _mapped(text)
        except ValueError as e:
            return cls(host, problem=str(e))
        if (address := _address(mapped)) is not None and (":" in mapped or not bracketed):
            return cls(host, address=address)
        if bracketed:
            return cls(host, problem="brackets hold an IPv6 address, and this is none")
        if ":" in mapped:
            return cls(host, problem="it is not an IPv6 address (a scope, %eth0, goes only on a link-local one, "
                                     "fe80::/10), and a host name has no ':'")
        rooted = mapped.endswith(".")
        name = mapped[:-1] if rooted else mapped
        if (address := _address(name)) is not None:
            return cls(host, problem=f"it is the address {address} to some resolvers and a name to others; write {address}")
        try:
            labels = _labels(name, wildcard=False)
        except ValueError as e:
            return cls(host, problem=str(e))
        name = ".".join(labels)
        if not all(_LABEL.fullmatch(label) for label in labels) or len(name) > _LONGEST:
            return cls(host, problem="it is neither an address nor a host name (letters, digits, '-' and '_' "
                                     "in labels of 1 to 63, joined by dots)")
        if _NUMERIC_LABEL.fullmatch(labels[-1]):
            return cls(host, problem="it ends in a number but is no address: resolvers disagree on what it means")
        return cls(host, name=name, rooted=rooted)

    @property
    def judged(self) -> tuple[Address, ...]:
        """For an address, the addresses whose rules judge it (see :func:`_judged_as`)."""
        return _judged_as(self.address) if self.address is not None else ()

    @property
    def lookup(self) -> str | None:
        """The name to resolve or dial: :attr:`name`, with its root dot if it had one."""
        return self.name + "." * self.rooted if self.name is not None else None

    @property
    def dial(self) -> tuple[str, ...]:
        """What the agent connects to when no fence judges it (an unclear host: nothing)."""
        if self.address is not None:
            return (_dialled(self.address),)
        return (self.lookup,) if self.lookup is not None else ()

    def target(self, port: int, resolved: Sequence[Address] = ()) -> str:
        """``host:port`` as asked, for messages, then what it was judged as where that reads
        otherwise: ``0x7f.1:80 (127.0.0.1)``, ``vault\\u3002internal:80 (vault.internal: 10.0.0.7)``."""
        host = _shown(self.asked)
        target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        meaning = self.name if self.name is not None else ", ".join(map(str, self.judged))
        if meaning == self.asked.strip("[]").lower().removesuffix("."):
            meaning = ""
        if resolved:
            meaning = f"{meaning}: " * bool(meaning) + ", ".join(map(str, resolved))
        return f"{target} ({meaning})" if meaning else target


@dataclass(frozen=True)
class FenceRule:
    """One ``HOST[:PORT]`` of ``--outbound-allow`` or ``--outbound-deny``, as written in ``text``.

    Exactly one of ``pattern`` (a lower-case ASCII name pattern) and ``network`` is set;
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
            if network is not None:
                return cls(text, network=network, port=port)
            if "/" in host or ":" in host:
                raise ValueError(f"{host!r} is not an address, a network (CIDR) or a host name pattern")
            return cls(text, pattern=_pattern(host), port=port)
        except ValueError as e:
            raise bad(str(e)) from None

    def _port_matches(self, port: int) -> bool:
        return self.port is None or self.port == port

    def matches_name(self, name: str, port: int) -> bool:
        """Whether this name pattern matches ``name`` (a :class:`Destination`'s name, or an
        address's text) on ``port``."""
        return self.pattern is not None and self._port_matches(port) and fnmatchcase(name, self.pattern)

    def matches_address(self, address: Address, port: int) -> bool:
        """Whether this network rule matches a connection to ``address`` on ``port``."""
        return (self.network is not None and self._port_matches(port)
                and address.version == self.network.version and address in self.network)

    def __str__(self) -> str:
        return self.text


def _network(host: str) -> Network | None:
    """The network ``host`` writes (an address is a network of one), None for a name;
    ValueError for what would not mean what it says, saying what to write instead."""
    try:
        network = (ipaddress.ip_network(host, strict=True) if "/" in host
                   else ipaddress.ip_network(ipaddress.ip_address(host)))
    except ValueError as e:
        if "/" in host and "host bits set" in str(e):
            fixed = ipaddress.ip_network(host, strict=False)
            raise ValueError(f"the address has bits set beyond the prefix /{fixed.prefixlen}: write {fixed}") from None
        return None
    if "%" in host:
        raise ValueError(f"a rule judges an address on every interface: write it without its scope ({host.partition('%')[0]})")
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        # a connection to an IPv4-mapped address is an IPv4 connection: so is the rule
        network = ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
    if network.num_addresses == 1 and network.network_address.is_unspecified:
        raise ValueError(f"{host} is never dialled: a destination {host} is judged as the pod's loopback, "
                         "127.0.0.1 and ::1; write 127.0.0.0/8 and ::1")
    return network


def _pattern(host: str) -> str:
    """The name pattern ``host`` writes, mapped as destinations are (see :class:`Destination`)."""
    mapped = _mapped(host)
    name = ".".join(_labels(mapped[:-1] if mapped.endswith(".") else mapped, wildcard=True))
    if not _PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(f"{host!r} is not a host name pattern (letters, digits, '-', '.', and * for any run of characters)")
    if (address := _address(name)) is not None:
        _network(str(address))  # the unspecified address: refused, saying what to write
        raise ValueError(f"{host!r} is the address {address} as only some resolvers write it: write {address}")
    return name


@dataclass(frozen=True)
class Verdict:
    """A destination's fate: ``allowed``, and then ``addresses`` (the resolved addresses that
    passed, reduced, in the resolver's order; None: the name was not resolved) and ``dial``
    (what to connect to: those addresses as they reach what was judged, or the name in its one
    form; never the text the client sent); or ``reason`` naming the rule that refused it."""

    allowed: bool
    addresses: tuple[str, ...] | None = None
    reason: str = ""
    dial: tuple[str, ...] = ()


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

    def check(self, host: str | Destination, port: int, addresses: Sequence[str] | None = None) -> Verdict:
        """Whether ``host:port`` passes, ``host`` as the client asked it or already reduced
        (:class:`Destination`).

        ``addresses``: what the agent resolved the name to (needed, for a name, when the fence
        has address rules: without them no address rule can pass the name, and none can
        refuse it; a name that resolved to none is refused). For an address they are ignored.
        """
        destination = host if isinstance(host, Destination) else Destination.of(host)
        if destination.problem:
            return Verdict(False, reason=f"{destination.target(port)} is refused by {self.owner}'s fence: {destination.problem}")
        if destination.name is not None:
            name = destination.name
            for rule in self.deny:
                if rule.matches_name(name, port):
                    return self._denied(destination.target(port), rule)
            named = not self.allow or any(r.matches_name(name, port) for r in self.allow)
            if addresses is None:
                return Verdict(True, None, dial=destination.dial) if named else self._unlisted(destination.target(port))
            resolved = [a for a in map(_address, addresses) if a is not None]
            if not resolved:  # nothing to judge, nor to dial: resolving it again could find anything
                return Verdict(False, reason=f"{destination.target(port)} resolves to no address from the agent's pod")
        else:
            named, resolved = not self.allow, [destination.address]
        literal = destination.address is not None  # name patterns judge an address's text too

        def matches(rule: FenceRule, form: Address) -> bool:
            return rule.matches_address(form, port) or literal and rule.matches_name(str(form), port)

        kept: list[Address] = []
        denied_by: FenceRule | None = None
        for address in resolved:
            forms = _judged_as(address)
            rule = next((r for r in self.deny for form in forms if matches(r, form)), None)
            if rule is not None:
                denied_by = denied_by or rule
            elif named or all(any(matches(r, form) for r in self.allow) for form in forms):
                kept.append(address)
        if kept:
            return Verdict(True, tuple(map(str, kept)), dial=tuple(dict.fromkeys(map(_dialled, kept))))
        target = destination.target(port, resolved if destination.name is not None else ())
        return self._denied(target, denied_by) if denied_by is not None else self._unlisted(target)

    def _denied(self, target: str, rule: FenceRule) -> Verdict:
        return Verdict(False, reason=f"{target} is denied by {self.owner}'s --outbound-deny {rule.text}")

    def _unlisted(self, target: str) -> Verdict:
        return Verdict(False, reason=f"{target} matches no --outbound-allow rule of {self.owner} "
                                     f"(allowed: {', '.join(r.text for r in self.allow)})")


def check_all(fences: Sequence[Fence], host: str | Destination, port: int, addresses: Sequence[str] | None = None) -> Verdict:
    """``host:port`` against every fence in turn (the agent's first); the first refusal wins,
    and each fence judges only the addresses the ones before let through."""
    destination = host if isinstance(host, Destination) else Destination.of(host)
    verdict = Verdict(True, None, dial=destination.dial)
    for fence in fences:
        if fence.open:
            continue
        verdict = fence.check(destination, port, addresses if verdict.addresses is None else verdict.addresses)
        if not verdict.allowed:
            return verdict
    return verdict


__all__ = ["Destination", "Fence", "FenceRule", "Verdict", "check_all"]
