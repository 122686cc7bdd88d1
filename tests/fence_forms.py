"""Textual forms of destinations, and the check that the fence reads each as resolvers do.

Shared by the suite (``tests/test_fence_forms.py``, bounded, hypothesis) and the long
campaign (``fuzz/fence.py``). :func:`generate` writes a host as a client may send it: an
address in any form glibc's ``getaddrinfo``/``inet_aton`` or Python's ``ipaddress`` read
(short, octal, hex and integer IPv4; IPv4-mapped, -compatible and NAT64 IPv6 with zeros
compressed or not, leading zeros, either case, dotted tails; scopes; brackets; trailing
dots; full-width digits and dots; blanks), or a name with the IDNA edge cases (case,
full-width and mathematical letters, ideographic and other dots, soft hyphens and other
ignorables, joiners, deviation characters, the root dot). :func:`disagreement` says how
the fence's reading of it differs from what a resolver would connect to, or None.

The oracles are the resolvers themselves, asked never to look anything up
(``AI_NUMERICHOST``): glibc through Python's socket layer (what the agent dialled before
issue 22: Python folds a non-ASCII host through IDNA 2003 first), glibc on the raw UTF-8
bytes, and ``ipaddress``. A host one of them reads as an address must be that address to
the fence (or refused); a name is compared with what Python's socket layer would have
looked up. On every host, for each fence of :data:`FENCES`, the fence's verdict must equal
its verdict on that canonical address or name, and what the fence dials must pass it when
asked plainly and reach what the resolver would have reached.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any

from intercept.routing.fence import Address, Destination, Fence, Verdict, check_all

Choose = Callable[[Sequence[Any]], Any]

IPV4 = ["127.0.0.1", "127.0.0.2", "127.255.255.254", "0.0.0.0", "0.0.0.1", "10.0.0.1", "10.255.0.7",
        "169.254.169.254", "100.100.100.200", "192.0.2.1", "255.255.255.255", "1.2.3.4"]
IPV6 = ["::1", "::", "fe80::1", "fd00::1", "2001:db8::1", "64:ff9b::a9fe:a9fe", "::2", "::ffff:0:1"]
NAMES = ["vault.internal", "metadata.google.internal", "localhost", "kubernetes.default.svc", "mapped.test",
         "zero.test", "orders", "bücher.internal"]
SCOPES = ["lo", "1", "eth0", "", "0", "lo.1"]

# the fake resolver the fences judge names with (the agent would ask the pod's DNS)
RESOLVED = {"vault.internal": ["10.0.0.7"], "metadata.google.internal": ["169.254.169.254"],
            "localhost": ["127.0.0.1", "::1"], "mapped.test": ["::ffff:127.0.0.1"], "zero.test": ["0.0.0.0", "::"],
            "kubernetes.default.svc": ["10.96.0.1"]}
FENCES = [
    Fence.parse(deny=["127.0.0.0/8", "::1"]),
    Fence.parse(allow=["10.0.0.0/8"]),
    Fence.parse(deny=["169.254.169.254", "100.100.100.200"]),
    Fence.parse(allow=["*"], deny=["*.internal", "localhost", "127.0.0.*", "169.254.*"]),
    Fence.parse(allow=["*.internal", "10.0.0.0/8"]),
    Fence.parse(deny=["fe80::/10", "64:ff9b::/96", "2001:db8::/32", "0.0.0.0/8"]),
    Fence.parse(allow=["127.0.0.0/8", "::1"]),
]

FULL_WIDTH = {c: chr(0xFF00 + ord(c) - 0x20) for c in "0123456789abcdefxABCDEFX:.%[]"}
DOTS = [".", ".", ".", "\u3002", "\uff0e", "\uff61", "\u2024", "\ufe52"]
IGNORABLE = ["\u00ad", "\u200b", "\u2060", "\ufeff", "\u034f", "\ufe0f", "\u180b", "\u200c", "\u200d", "\u180e"]
EDITS = ["", ".", "..", "0", "00", "x", "X", ":", "::", "%", "8", "9", "a", "f", "g", "-", "_", "*", "/", "[", "]", " ",
         "\u00ad", "\u3002", "\uff10", "\u0660", "\u200b", "\x00"]
LOOKALIKE = {"s": ["\u017f", "ß"], "i": ["\u0131", "\u2139", "\u2170"], "k": ["\u212a"], "l": ["\u217c", "\u2113"],
             "a": ["\u00e0", "a\u0300", "\u24d0"], "e": ["\u212f", "\u0435"], "o": ["\u00f6", "\u2092", "\u0ce6"]}


def _ipv4_text(value: int, choose: Choose) -> str:
    """``value`` as inet_aton reads it: 1 to 4 parts, each decimal, octal or hex."""
    parts = choose([4, 4, 4, 3, 2, 1])
    numbers = [(value >> 8 * (3 - i)) & 0xFF for i in range(parts - 1)]
    numbers.append(value & ((1 << 8 * (5 - parts)) - 1))
    out = []
    for n in numbers:
        base = choose(["dec", "dec", "dec", "oct", "hex"])
        if base == "oct":
            out.append("0" * choose([1, 1, 2, 5]) + (f"{n:o}" if n else ""))
        elif base == "hex":
            digits = f"{n:x}"
            out.append(choose(["0x", "0X"]) + "0" * choose([0, 0, 1, 3]) + choose([digits, digits.upper()]))
        else:
            out.append(str(n))
    return ".".join(out)


def _ipv6_text(value: int, choose: Choose) -> str:
    """``value`` as IPv6 text: zeros compressed or not, leading zeros, case, a dotted tail."""
    groups = [(value >> 16 * (7 - i)) & 0xFFFF for i in range(8)]
    dotted = choose([False, False, True])
    words = [format(g, "x") for g in (groups[:6] if dotted else groups)]
    words = ["0" * min(choose([0, 0, 1, 3]), 4 - len(w)) + w for w in words]
    if choose([True, False]):
        words = [w.upper() for w in words]
    tail = [".".join(str((value >> 8 * (3 - i)) & 0xFF) for i in range(4))] if dotted else []
    zero_runs = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words) + 1)
                 if all(int(w, 16) == 0 for w in words[i:j])]
    if zero_runs and choose([True, True, False]):
        i, j = choose(zero_runs)
        return ":".join(words[:i]) + "::" + ":".join(words[j:] + tail)
    return ":".join(words + tail)


def _address_text(choose: Choose) -> str:
    kind = choose(["ipv4", "ipv4", "mapped", "compatible", "nat64", "ipv6"])
    if kind == "ipv6":
        return _ipv6_text(int(ipaddress.IPv6Address(choose(IPV6))), choose)
    v4 = int(ipaddress.IPv4Address(choose(IPV4)))
    if kind == "ipv4":
        return _ipv4_text(v4, choose)
    prefix = {"mapped": 0xFFFF << 32, "compatible": 0, "nat64": int(ipaddress.IPv6Address("64:ff9b::"))}[kind]
    return _ipv6_text(prefix | v4, choose)


def _name_text(choose: Choose) -> str:
    out = []
    for c in choose(NAMES):
        roll = choose(range(24))
        if c == "." and roll < 8:
            c = choose(DOTS)
        elif roll == 0:
            c = c.upper()
        elif roll == 1 and c.isascii() and c.isalnum():
            c = chr(0xFF00 + ord(c) - 0x20)  # FULLWIDTH
        elif roll == 2 and c.isalpha() and c.isascii():
            c = chr(0x1D41A + ord(c) - ord("a"))  # MATHEMATICAL BOLD SMALL
        elif roll == 3 and c in LOOKALIKE:
            c = choose(LOOKALIKE[c])
        out.append(c)
        if roll == 4:
            out.append(choose(IGNORABLE))
    return "".join(out)


def _decorated(text: str, choose: Choose) -> str:
    roll = choose(range(20))
    if roll == 0:
        return text + choose([".", "..", "\u3002", "\uff0e"])
    if roll == 1:
        return "".join(FULL_WIDTH.get(c, c) if choose([True, False]) else c for c in text)
    if roll == 2:
        return choose([" ", "\t", "\n"]) + text if choose([True, False]) else text + choose([" ", "\t", "\n", "\x00"])
    if roll == 6:  # C strings end at the NUL: glibc reads only what comes before
        return text + "\x00" + choose(["", ".example", "junk", ".internal", " 10.0.0.1"])
    if roll == 3 and ":" in text:
        return f"{text}%{choose(SCOPES)}"
    if roll == 4:
        return f"[{text}]"
    for _ in range(choose([0, 1, 2, 3]) if roll == 5 else 0):  # an edit or three: near misses of each form
        i = choose(range(len(text) + 1))
        text = text[:i] + choose(EDITS) + text[i + choose([0, 1]):]
    return text


def generate(choose: Choose) -> str:
    """One host as a client may write it."""
    text = _address_text(choose) if choose([True, True, False]) else _name_text(choose)
    return _decorated(text, choose)


def as_before(host: str) -> Destination:
    """How the fence read a host before issue 22: an address as ``ipaddress`` reads it, else
    the text itself as a name (``fuzz/fence.py --as-before``, and the test that shows the
    comparison can fail)."""
    try:
        return Destination(host, address=ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return Destination(host, name=host.lower().removesuffix("."))


# --- the oracles ----------------------------------------------------------------------------


def _numeric(host: str | bytes) -> Address | None:
    """The address glibc's getaddrinfo reads in ``host`` without looking anything up, or None."""
    try:
        sockaddr = socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0][4]
    except (OSError, UnicodeError, ValueError):
        return None
    return ipaddress.ip_address(sockaddr[0])


def _python_ipaddress(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _python_name(host: str) -> str | None:
    """The name glibc looks up when Python's socket layer is handed ``host`` (IDNA 2003 for
    non-ASCII), lower case and without the root dot, or None when it looks up none."""
    try:
        name = host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return name.partition("\x00")[0].lower().removesuffix(".") or None  # a C string ends at its NUL


def _reached(address: Address) -> Address:
    """Where the kernel connects for ``address``: the IPv4 address of an IPv4-mapped one, the
    loopback for an unspecified one (scope aside)."""
    plain = ipaddress.ip_address(int(address)) if address.version == 4 else ipaddress.IPv6Address(int(address))
    if plain.version == 6 and plain.ipv4_mapped is not None:
        plain = plain.ipv4_mapped
    if plain.is_unspecified:
        return ipaddress.ip_address("127.0.0.1" if plain.version == 4 else "::1")
    return plain


def _meant(address: Address) -> set[Address]:
    """The plain addresses a connection to ``address`` must be judged as (the fence's rules,
    written down again here): where the kernel goes, and for an unspecified address the
    pod's loopback in both families."""
    if address.is_unspecified or getattr(address, "ipv4_mapped", None) == ipaddress.IPv4Address(0):
        return {ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")}
    return {_reached(address)}


def _resolved(name: str | None) -> list[str]:
    return RESOLVED.get(name or "", ["192.0.2.1"])


def _verdict(fence: Fence, host: str) -> Verdict:
    destination = Destination.of(host)
    return check_all([fence], destination, 80, _resolved(destination.name))


def _readers(host: str) -> dict[str, Address | None]:
    """The address each numeric reader finds in ``host`` (C strings end at a NUL: so does
    what glibc reads)."""
    return {"glibc via Python": _numeric(host), "glibc on bytes": _numeric(host.encode("utf-8", "surrogatepass")),
            "ipaddress": _python_ipaddress(host[1:-1] if host.startswith("[") and host.endswith("]") else host)}


def reading(host: str) -> tuple[str, Any]:
    """What the resolvers read in ``host``: ("address", A), ("name", N) or ("nothing", None)."""
    for address in _readers(host).values():
        if address is not None:
            return "address", address
    name = _python_name(host)
    return ("name", name) if name is not None else ("nothing", None)


def disagreement(host: str) -> str | None:
    """How the fence's reading of ``host`` differs from the resolvers', or None (see the module)."""
    destination = Destination.of(host)
    for reader, address in _readers(host).items():
        if address is None or destination.problem:
            continue
        if destination.address is None:
            return f"{reader} reads the address {address}, the fence the name {destination.name}"
        if _reached(destination.address) != _reached(address) or set(destination.judged) != set(Destination.of(str(address)).judged):
            return f"{reader} reads {address}, the fence {destination.address}"
    if destination.name is not None and (looked_up := _python_name(destination.name)) != destination.name:
        return f"the fence judges the name {destination.name!r}, which the resolver looks up as {looked_up}"
    kind, meaning = reading(host)  # judged plainly, what the host means must get the same verdict
    plainly = [str(a) for a in _meant(meaning)] if kind == "address" else [meaning] if kind == "name" and meaning == destination.name else []
    for fence in FENCES:
        verdict = _verdict(fence, host)
        if destination.problem:
            if verdict.allowed:
                return f"{fence.describe()}: allowed although the fence cannot read it ({destination.problem})"
            continue
        refused = [p for p in plainly if not _verdict(fence, p).allowed]
        if plainly and verdict.allowed == bool(refused):
            return f"{fence.describe()}: {'allowed' if verdict.allowed else 'refused'} as written, " \
                   f"{'refused as ' + refused[0] if refused else 'allowed as ' + ', '.join(plainly)} ({verdict.reason})"
        if verdict.allowed:
            problem = _misdialled(fence, destination, verdict.dial)
            if problem is not None:
                return f"{fence.describe()}: {problem}"
    return None


def _misdialled(fence: Fence, destination: Destination, dial: Sequence[str]) -> str | None:
    """Why what the fence dials for an allowed ``destination`` is not what it judged, or None:
    the resolver must read each dialled text as the judged address (where the kernel goes)
    or name, and a dialled address must pass the fence asked plainly."""
    if destination.address is not None:
        (dialled,) = dial
        read = _numeric(dialled)
        if read is None and getattr(destination.address, "scope_id", None):
            return None  # no such interface here: nothing is reached
        if read is None or _reached(read) != _reached(destination.address):
            return f"dials {dialled!r}, which glibc reads as {read}, not where {destination.address} leads"
        again = _verdict(fence, dialled)
        return None if again.allowed else f"dials {dialled}, which it refuses when asked plainly ({again.reason})"
    resolved = {_reached(ipaddress.ip_address(a)) for a in _resolved(destination.name)}
    for dialled in dial:
        read = _numeric(dialled)
        if read is None and _python_name(dialled) != destination.name or read is not None and _reached(read) not in resolved:
            return f"dials {dialled!r}, neither {destination.name} as judged nor an address it resolved to"
    return None


def outcome(host: str) -> str:
    """How the fence reads ``host`` (for the campaign's figures): address, name, or refused;
    and whether that name differs from the one Python's socket layer would look up."""
    destination = Destination.of(host)
    kind, meaning = reading(host)
    if destination.problem:
        return f"refused ({'a resolver reads an address' if kind == 'address' else 'a resolver reads a name' if kind == 'name' else 'no resolver reads it'})"
    if destination.address is not None:
        return "address" if kind == "address" else "address (only after UTS-46 mapping)"
    if kind == "name" and meaning != destination.name:
        return "name, not the one Python's IDNA 2003 would look up"
    return "name"
