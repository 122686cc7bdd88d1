"""Routes and the route table: the agent's routing decision, as data.

Sans-IO: no sockets, no asyncio. The agent hands :meth:`RouteTable.match` a view of one
request head and gets back the registered route that claims it, or ``None`` (the
request goes to the app container, undisturbed).

The request view, as the agent's HTTP layer produces it:

- ``method``: bytes, e.g. ``b"GET"``;
- ``target``: the request-target as sent, origin-form (``b"/a/b?x=1"``) or absolute-form
  (``b"http://h/a"``);
- ``headers``: ``list[tuple[bytes, bytes]]`` in wire order, repeats kept, each name
  already lowercased, each value with surrounding whitespace stripped.

Rules (all rules of a route must match; a route without rules takes all traffic):

- :class:`HeaderEquals` (``--header NAME=VALUE``): a member of the NAME field is exactly
  VALUE (case-sensitive), or, for a VALUE with commas, the whole field is.
- :class:`HeaderRegex` (``--header-regex NAME=REGEX``): REGEX *fully* matches a member of
  the NAME field, or the whole field, so ``x-dev=alice`` does not match ``alice2``
  unless written ``alice.*``. REGEX runs on RE2 (linear time, whatever the input).
- :class:`Baggage` (``--baggage KEY=VALUE``): the W3C baggage (all ``baggage`` lines
  together) has a member KEY whose percent-decoded value is VALUE; the first member
  with that key counts.
- :class:`PathPrefix` (``--path-prefix /PREFIX``): the normalized path of the target
  (query excluded; see :func:`normalize_path`) starts with PREFIX, as a plain string:
  ``/api`` also matches ``/apiv2``, like Telepresence's ``--http-path-prefix``.

A field is a list (RFC 9110 section 5.3): ``x-dev: alice, bob`` on one line and two
lines ``x-dev: alice`` and ``x-dev: bob`` are the same field, and every rule treats them
alike, so a proxy that merges repeated lines (or splits them) never changes who gets a
request. Its *members* are the comma-separated elements of all its lines in wire order
(commas inside a quoted string do not separate; whitespace around a member is dropped,
empty members are ignored); its *whole value* is the members joined with ``", "``.

Hot path: every rule precomputes its bytes (and compiled regex) at construction, and
matching compares bytes without decoding or copying the request, except where a rule
needs a list split, a joined or decoded value (a line with a comma; baggage) or a
path that holds ``%`` or a dot segment.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote, unquote

from intercept.errors import RouteConflict, UsageError

__all__ = [
    "Baggage",
    "HeaderEquals",
    "HeaderRegex",
    "PathPrefix",
    "RegisteredRoute",
    "Route",
    "RouteTable",
    "Rule",
    "field_members",
    "normalize_path",
    "parse_baggage",
    "parse_rule",
    "request_path",
]

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN_BYTES = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# W3C baggage-octet: visible US-ASCII except DQUOTE, comma, semicolon and backslash.
_BAGGAGE_VALUE = re.compile(rb"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
# A header value the agent could ever see: no control characters except HTAB.
_FIELD_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A path prefix as it appears on the wire: visible ASCII, no query or fragment.
_PATH_PREFIX = re.compile(r"/[\x21\x22\x24-\x3e\x40-\x7e]*")
_OWS = b" \t"


def _arg(flag: str, text: str) -> str:
    """The flag and its argument as the user would type them (shell-quoted)."""
    return f"{flag} {shlex.quote(text)}"


def _check_token(flag: str, text: str, what: str, name: str, example: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise UsageError(
            f"{_arg(flag, text)}: {what} {name!r} is not a valid HTTP token; "
            f"write {'NAME' if what == 'header name' else 'KEY'}=VALUE, e.g. {flag} {example}"
        )


def field_members(values: list[bytes]) -> list[bytes]:
    """The members of a list field whose lines are ``values`` (wire order).

    Commas separate members except inside a quoted string (``"a,b"``, with ``\\``
    escapes); spaces and tabs around a member are dropped and empty members ignored
    (RFC 9110 section 5.6.1), so ``[b"a, b"]``, ``[b"a", b"b"]`` and ``[b"a,,b "]``
    all give ``[b"a", b"b"]``. Never raises: an unterminated quote runs to the line's end.
    """
    members: list[bytes] = []
    for value in values:
        if b'"' not in value:
            parts = value.split(b",")
        else:
            parts, start, quoted, i, n = [], 0, False, 0, len(value)
            while i < n:
                c = value[i]
                if quoted and c == 0x5C:  # backslash: the next byte is escaped
                    i += 1
                elif c == 0x22:
                    quoted = not quoted
                elif c == 0x2C and not quoted:
                    parts.append(value[start:i])
                    start = i + 1
                i += 1
            parts.append(value[start:])
        for part in parts:
            part = part.strip(_OWS)
            if part:
                members.append(part)
    return members


@dataclass(frozen=True, slots=True)
class HeaderEquals:
    """``--header NAME=VALUE``: a member of the field NAME is exactly VALUE.

    The name is case-insensitive (stored lowercased); the value is compared exactly,
    case-sensitive, as UTF-8 bytes. The field's members (see :func:`field_members`)
    are those of all NAME lines together, so ``x-dev: alice, bob`` on one line matches
    ``x-dev=alice`` exactly as two lines ``x-dev: alice`` and ``x-dev: bob`` do. A VALUE
    with a comma is itself a list: it matches when the whole field has exactly its
    members, in order (``x-dev=a,b`` matches ``a, b`` on one line or on two).
    """

    name: str
    value: str
    kind: ClassVar[str] = "header"
    _name: bytes = field(init=False, repr=False, compare=False)
    _value: bytes = field(init=False, repr=False, compare=False)
    _members: list[bytes] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        flag, text = "--header", f"{self.name}={self.value}"
        _check_token(flag, text, "header name", self.name, "x-dev=alice")
        _check_header_value(flag, text, self.name, self.value)
        name = self.name.lower()
        value = self.value.encode("utf-8")
        members = field_members([value])
        if not members:
            raise UsageError(
                f"{_arg(flag, text)}: the value {self.value!r} has no list member (only commas); "
                f"write NAME=VALUE, e.g. {flag} {name}=alice"
            )
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_name", name.encode("ascii"))
        object.__setattr__(self, "_value", value)
        # a one-member VALUE (the usual case) compares with a member; else with the whole field
        object.__setattr__(self, "_members", None if len(members) == 1 else members)
        if len(members) == 1:
            object.__setattr__(self, "_value", members[0])

    def matches(self, method: bytes, target: bytes, headers: Headers) -> bool:
        name, value, whole = self._name, self._value, self._members
        if whole is None:
            for n, v in headers:
                if n == name:
                    if v == value:
                        return True
                    # only a line holding the value and a comma can have it as one member
                    if b"," in v and value in v and value in field_members([v]):
                        return True
            return False
        lines = [v for n, v in headers if n == name]
        return bool(lines) and field_members(lines) == whole

    def describe(self) -> str:
        return f"{self.name}: {self.value}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "value": self.value}

    def _sort_key(self) -> tuple[int, str, str]:
        return (0, self.name, self.value)


def _re2_options(utf8: bool) -> Any:
    import re2  # imported with the first regex rule: an agent without one saves its 2.5 MB

    options = re2.Options()
    options.log_errors = False  # the error is raised, with the fix; not printed by the library too
    options.encoding = re2.Options.Encoding.UTF8 if utf8 else re2.Options.Encoding.LATIN1
    return options


@dataclass(frozen=True, slots=True)
class HeaderRegex:
    """``--header-regex NAME=REGEX``: REGEX fully matches a member of the field NAME, or its whole value.

    Full match: ``alice`` does not match ``alice2``; write ``alice.*`` for that. Tried
    against each member of the field (all NAME lines together, see :func:`field_members`),
    then against the whole value (the members joined with ``", "``), so one line
    ``alice, bob`` and two lines ``alice`` and ``bob`` match alike.

    The pattern runs on every request that carries the header, so it runs on RE2, whose
    matching takes time linear in the value whatever the pattern: a pattern cannot be
    made to backtrack without bound (``(a+)+b`` against a long line of ``a``). RE2's
    syntax is Python's without what needs backtracking: a backreference or a lookaround
    is refused with a :class:`UsageError` saying so. An ASCII pattern matches bytes
    (``.`` is one byte); a non-ASCII one matches UTF-8 characters (invalid UTF-8 in a
    value never matches a character class).
    """

    name: str
    pattern: str
    kind: ClassVar[str] = "header-regex"
    _name: bytes = field(init=False, repr=False, compare=False)
    _regex: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        flag, text = "--header-regex", f"{self.name}={self.pattern}"
        _check_token(flag, text, "header name", self.name, "x-dev='alice.*'")
        if not self.pattern:
            raise UsageError(
                f"{_arg(flag, text)}: the pattern is empty; "
                f"write NAME=REGEX, e.g. {flag} x-dev='alice.*'"
            )
        try:
            re.compile(self.pattern)
        except re.error as error:
            raise UsageError(
                f"{_arg(flag, text)}: pattern {self.pattern!r} is not a valid regular "
                f"expression ({error}); fix it, e.g. {flag} x-dev='alice.*'"
            ) from None
        import re2

        try:
            regex = re2.compile(self.pattern.encode("utf-8"), _re2_options(not self.pattern.isascii()))
        except re2.error as error:
            reason = error.args[0].decode("utf-8", "replace") if error.args and isinstance(error.args[0], bytes) else str(error)
            raise UsageError(
                f"{_arg(flag, text)}: pattern {self.pattern!r} cannot run in linear time ({reason}): "
                "routes use RE2, which has no backreferences, lookarounds or huge repetitions, "
                "so that no request can make a pattern backtrack without bound; "
                f"rewrite it without them, e.g. {flag} x-dev='alice.*'"
            ) from None
        name = self.name.lower()
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_name", name.encode("ascii"))
        object.__setattr__(self, "_regex", regex)

    def matches(self, method: bytes, target: bytes, headers: Headers) -> bool:
        name, fullmatch = self._name, self._regex.fullmatch
        lines: list[bytes] | None = None
        listed = False  # a line holds a comma: its members are not simply the line
        for n, v in headers:
            if n == name:
                if lines is None:
                    lines = [v]
                else:
                    lines.append(v)
                if b"," in v:
                    listed = True
                elif v and fullmatch(v) is not None:  # a line without a comma is one member
                    return True
        if lines is None:
            return False
        if not listed and len(lines) == 1:
            return not lines[0] and fullmatch(b"") is not None  # an empty field: its whole value is ""
        if listed and any(fullmatch(m) is not None for m in field_members([v for v in lines if b"," in v])):
            return True
        members = field_members(lines)
        return len(members) != 1 and fullmatch(b", ".join(members)) is not None

    def describe(self) -> str:
        return f"{self.name} matching {self.pattern}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "pattern": self.pattern}

    def _sort_key(self) -> tuple[int, str, str]:
        return (1, self.name, self.pattern)


@dataclass(frozen=True, slots=True)
class Baggage:
    """``--baggage KEY=VALUE``: the W3C baggage has member KEY with value VALUE.

    All ``baggage`` lines of the request form one list (see :func:`parse_baggage`); the
    first valid member named KEY counts, and its percent-decoded value must equal VALUE
    exactly. Keys are case-sensitive.
    """

    key: str
    value: str
    kind: ClassVar[str] = "baggage"
    _key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        flag, text = "--baggage", f"{self.key}={self.value}"
        _check_token(flag, text, "baggage key", self.key, "dev=alice")
        if not self.value:
            raise UsageError(
                f"{_arg(flag, text)}: the value is empty; write KEY=VALUE, e.g. {flag} {self.key}=alice"
            )
        object.__setattr__(self, "_key", self.key.encode("ascii"))

    def matches(self, method: bytes, target: bytes, headers: Headers) -> bool:
        key = self._key
        lines: list[bytes] | None = None
        for n, v in headers:
            if n == b"baggage":
                if lines is None:
                    lines = [v]
                else:
                    lines.append(v)
        if lines is None or not any(key in line for line in lines):
            return False
        return _baggage_value(lines, key) == self.value

    def describe(self) -> str:
        return f"baggage {self.key}={self.value}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "value": self.value}

    def _sort_key(self) -> tuple[int, str, str]:
        return (2, self.key, self.value)


_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _percent_normalized(m: re.Match[bytes]) -> bytes:
    byte = int(m[1], 16)
    return bytes((byte,)) if byte in _UNRESERVED else b"%" + m[1].upper()


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 section 5.2.4 for a path that starts with ``/`` (or is empty)."""
    segments = path.split(b"/")
    out: list[bytes] = []
    for segment in segments:
        if segment == b".":
            continue
        if segment == b"..":
            if len(out) > 1:  # never above the root: out[0] is the empty segment before the first "/"
                out.pop()
            continue
        out.append(segment)
    if segments[-1] in (b".", b".."):
        out.append(b"")  # "/a/b/.." is the directory "/a/"
    return b"/".join(out)


def normalize_path(path: bytes) -> bytes:
    """The path as a server that follows RFC 3986 section 6.2.2 reads it.

    Percent-escapes of unreserved characters are decoded (``/%61pi`` is ``/api``), the
    others get upper-case hex (``%2f`` is ``%2F``; an encoded ``/`` stays encoded), then
    dot segments are removed (``/api/../secret`` is ``/secret``, ``/api/%2e%2e/x`` is
    ``/x``; never above ``/``). Empty segments (``//``) are kept. Never raises.
    """
    if b"%" in path:
        path = _PERCENT.sub(_percent_normalized, path)
    if b"/." in path:
        path = _remove_dot_segments(path)
    return path


def request_path(target: bytes) -> bytes | None:
    """What a :class:`PathPrefix` compares with: the normalized path of a request-target
    (:func:`normalize_path`), or None for a target without a path (``*``, CONNECT's
    authority-form). For an origin-form target with nothing to normalize, the target
    itself, query included: a prefix holds no ``?`` or ``#``, so comparing a prefix with
    it never reaches into the query, and no copy is made."""
    if target[:1] == b"/":
        if b"%" not in target and b"/." not in target:
            return target
        end = len(target)
        for delimiter in (b"?", b"#"):
            at = target.find(delimiter, 0, end)
            if at >= 0:
                end = at
        return normalize_path(target[:end])
    scheme_end = target.find(b"://")
    if scheme_end < 0:
        return None  # asterisk-form ("*") or authority-form (CONNECT): no path
    start = scheme_end + 3
    end = len(target)
    for delimiter in (b"/", b"?", b"#"):
        at = target.find(delimiter, start, end)
        if at >= 0:
            end = at
    if end < len(target) and target[end] == 0x2F:  # "/"
        path_end = len(target)
        for delimiter in (b"?", b"#"):
            at = target.find(delimiter, end, path_end)
            if at >= 0:
                path_end = at
        return normalize_path(target[end:path_end])
    return b"/"  # "http://h" or "http://h?q": the path is "/"


@dataclass(frozen=True, slots=True)
class PathPrefix:
    """``--path-prefix /PREFIX``: the normalized path of the request-target starts with PREFIX.

    A plain string prefix (``/api`` also matches ``/apiv2`` and ``/api/v1``) of the path
    as :func:`normalize_path` reads it, so that a request reaches the developer exactly
    when the app would see a path under PREFIX: ``/api/../secret`` is ``/secret`` (not
    matched by ``/api``) and ``/%61pi/x`` is ``/api/x`` (matched). The query never takes
    part. For an absolute-form target (``http://host/a``) the path after the authority
    is used, ``/`` when there is none. PREFIX must start with ``/`` and be written as on
    the wire (percent-encoded); it is normalized the same way, and one with a dot
    segment is refused (it could never match a normalized path as written).
    """

    prefix: str
    kind: ClassVar[str] = "path-prefix"
    _prefix: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        flag = "--path-prefix"
        if not self.prefix.startswith("/"):
            raise UsageError(
                f"{_arg(flag, self.prefix)}: the prefix must start with '/'; "
                f"e.g. {flag} {shlex.quote('/' + self.prefix.lstrip())}"
            )
        if not _PATH_PREFIX.fullmatch(self.prefix):
            path = re.split(r"[?#]", self.prefix, maxsplit=1)[0]
            fixed = quote(path, safe="/%!$&'()*+,;=:@-._~")
            raise UsageError(
                f"{_arg(flag, self.prefix)}: the prefix must be a path as sent on the wire: "
                f"visible ASCII, percent-encoded, without a query ('?') or fragment ('#'); "
                f"write {flag} {shlex.quote(fixed)}"
            )
        raw = self.prefix.encode("ascii")
        decoded = _PERCENT.sub(_percent_normalized, raw)
        normalized = normalize_path(raw)
        if normalized != decoded:
            fixed = normalized.decode("ascii")
            raise UsageError(
                f"{_arg(flag, self.prefix)}: the prefix has a dot segment ('.' or '..'), which is "
                f"removed from request paths before they are matched; write {flag} {shlex.quote(fixed)}"
            )
        object.__setattr__(self, "_prefix", normalized)

    def matches(self, method: bytes, target: bytes, headers: Headers) -> bool:
        path = request_path(target)
        return path is not None and path.startswith(self._prefix)

    def describe(self) -> str:
        return f"path {self.prefix}*"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "prefix": self.prefix}

    def _sort_key(self) -> tuple[int, str, str]:
        return (3, self.prefix, "")


Rule = HeaderEquals | HeaderRegex | Baggage | PathPrefix

_KINDS: dict[str, type[HeaderEquals] | type[HeaderRegex] | type[Baggage] | type[PathPrefix]] = {
    cls.kind: cls for cls in (HeaderEquals, HeaderRegex, Baggage, PathPrefix)
}
_EXAMPLES = {
    "header": "x-dev=alice",
    "header-regex": "x-dev='alice.*'",
    "baggage": "dev=alice",
    "path-prefix": "/api",
}
# Cheapest checks first: Route.matches stops at the first rule that fails.
_COST = {PathPrefix: 0, HeaderEquals: 1, HeaderRegex: 2, Baggage: 3}


def _check_header_value(flag: str, text: str, name: str, value: str) -> None:
    example = f"{flag} {name}=alice"
    if not value:
        raise UsageError(f"{_arg(flag, text)}: the value is empty; write NAME=VALUE, e.g. {example}")
    if value != value.strip(" \t"):
        raise UsageError(
            f"{_arg(flag, text)}: the value {value!r} has leading or trailing whitespace, "
            f"which HTTP strips, so it could never match; write {flag} "
            f"{shlex.quote(f'{name}={value.strip()}')}"
        )
    if _FIELD_VALUE_FORBIDDEN.search(value):
        raise UsageError(
            f"{_arg(flag, text)}: the value {value!r} holds control characters, which "
            f"no HTTP header can carry; use printable text, e.g. {example}"
        )


def parse_rule(kind: str, text: str) -> Rule:
    """Parse one CLI rule argument.

    ``kind`` is the flag without dashes: ``header`` (``x-dev=alice``), ``header-regex``
    (``x-dev=al.*``), ``baggage`` (``dev=alice``) or ``path-prefix`` (``/api``). Raises
    :class:`UsageError` naming the flag, the bad value and the fix.
    """
    if kind not in _KINDS:
        raise UsageError(f"unknown rule kind {kind!r}; use one of {', '.join(_KINDS)}")
    flag = f"--{kind}"
    if kind == "path-prefix":
        return PathPrefix(text)
    name, sep, value = text.partition("=")
    if not sep:
        hint = _EXAMPLES[kind]
        before, colon, after = text.partition(":")
        if colon and before.strip() and after.strip():
            hint = shlex.quote(f"{before.strip()}={after.strip()}")
        placeholder = "KEY=VALUE" if kind == "baggage" else "NAME=REGEX" if kind == "header-regex" else "NAME=VALUE"
        raise UsageError(f"{_arg(flag, text)}: expected {placeholder}; e.g. {flag} {hint}")
    if kind == "header":
        return HeaderEquals(name, value)
    if kind == "header-regex":
        return HeaderRegex(name, value)
    return Baggage(name, value)


def _rule_from_json(item: object) -> Rule:
    if not isinstance(item, dict):
        raise UsageError(f"route rule {item!r}: expected an object with a 'kind'")
    kind = item.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UsageError(f"route rule {item!r}: unknown kind {kind!r}; use one of {', '.join(_KINDS)}")
    fields = {"header": ("name", "value"), "header-regex": ("name", "pattern"),
              "baggage": ("key", "value"), "path-prefix": ("prefix",)}[kind]
    extra = set(item) - {"kind", *fields}
    if extra:
        raise UsageError(f"route rule {item!r}: unexpected field(s) {', '.join(sorted(map(str, extra)))}; expected {', '.join(fields)}")
    args = []
    for name in fields:
        value = item.get(name)
        if not isinstance(value, str):
            raise UsageError(f"route rule {item!r}: field {name!r} must be a string")
        args.append(value)
    return cls(*args)


@dataclass(frozen=True, slots=True)
class Route:
    """A developer's route: all ``rules`` must match; no rules means all traffic."""

    rules: frozenset[Rule] = frozenset()
    _ordered: tuple[Rule, ...] = field(init=False, repr=False, compare=False)
    _by_cost: tuple[Rule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules = frozenset(self.rules)
        for rule in rules:
            if not isinstance(rule, (HeaderEquals, HeaderRegex, Baggage, PathPrefix)):
                raise UsageError(f"route rule {rule!r}: not a rule; build rules with parse_rule()")
        object.__setattr__(self, "rules", rules)
        ordered = tuple(sorted(rules, key=lambda rule: rule._sort_key()))
        object.__setattr__(self, "_ordered", ordered)
        object.__setattr__(self, "_by_cost", tuple(sorted(ordered, key=lambda rule: _COST[type(rule)])))

    def matches(self, method: bytes, target: bytes, headers: Headers) -> bool:
        for rule in self._by_cost:
            if not rule.matches(method, target, headers):
                return False
        return True

    @property
    def is_all_traffic(self) -> bool:
        return not self.rules

    def describe(self) -> str:
        """Human text, e.g. ``x-dev: alice and path /api*``; ``all traffic`` when empty."""
        if not self._ordered:
            return "all traffic"
        return " and ".join(rule.describe() for rule in self._ordered)

    def to_json(self) -> list[dict[str, str]]:
        """Rules as ``[{"kind": "header", "name": "x-dev", "value": "alice"}, ...]``,
        in a deterministic order (the order of :meth:`describe`)."""
        return [rule.to_json() for rule in self._ordered]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> Route:
        """The inverse of :meth:`to_json`; validates like :func:`parse_rule`."""
        if not isinstance(data, list):
            raise UsageError(f"route {data!r}: expected a list of rules")
        return cls(frozenset(_rule_from_json(item) for item in data))


def _parse_member(member: bytes) -> tuple[str, str] | None:
    """One W3C baggage list-member -> (key, decoded value), or None when invalid.

    Properties (after the first ';') are ignored, valid or not.
    """
    key_value = member.split(b";", 1)[0]
    key, sep, value = key_value.partition(b"=")
    if not sep:
        return None
    key = key.strip(_OWS)
    value = value.strip(_OWS)
    if not _TOKEN_BYTES.fullmatch(key) or not _BAGGAGE_VALUE.fullmatch(value):
        return None
    # The value is ASCII here; unquote decodes %XX as UTF-8, puts U+FFFD for
    # invalid UTF-8 (as the spec requires) and leaves a stray '%' as is.
    return key.decode("ascii"), unquote(value.decode("ascii"), "utf-8", "replace")


def parse_baggage(values: list[bytes]) -> dict[str, str]:
    """Parse W3C baggage (https://www.w3.org/TR/baggage/) into ``{key: value}``.

    ``values`` are the ``baggage`` field lines in wire order; together they are one list.
    Members are separated by ``,``; OWS around members, keys and values is trimmed;
    a value is percent-decoded as UTF-8 (invalid sequences become U+FFFD); properties
    are ignored. An invalid member is skipped, not the whole header; for a duplicate
    key the first member wins. Never raises, whatever the bytes.
    """
    result: dict[str, str] = {}
    for line in values:
        for member in line.split(b","):
            parsed = _parse_member(member)
            if parsed is not None and parsed[0] not in result:
                result[parsed[0]] = parsed[1]
    return result


def _baggage_value(values: list[bytes], key: bytes) -> str | None:
    """The value of the first valid member named ``key``, as :func:`parse_baggage` would."""
    name = key.decode("ascii")
    for line in values:
        for member in line.split(b","):
            if key not in member:  # cheap skip: only members naming the key are parsed
                continue
            parsed = _parse_member(member)
            if parsed is not None and parsed[0] == name:
                return parsed[1]
    return None


@dataclass
class RegisteredRoute:
    """A route as held by one session of one developer (``holder``), or by a sandbox.

    ``destination`` is ``None`` for a developer's route (the session's channel), else the
    cluster address that matching requests go to. ``expires`` (Unix time) ends the route
    by itself: an expired route no longer matches.

    A ``mirror`` route takes nothing: matching requests still go where they would go, and
    a copy of each goes to the session. ``copied`` counts the copies the developer's
    process answered, ``dropped`` those abandoned (the developer did not keep up, or
    could not be reached); every copy ends as one or the other.
    """

    id: int
    session_id: str
    holder: str
    route: Route
    destination: tuple[str, int] | None = None
    expires: float | None = None
    mirror: bool = False
    copied: int = 0
    dropped: int = 0


def _alternative(route: Route) -> str:
    kinds = {rule.kind for rule in route.rules}
    if len(kinds) != 1:
        return "other rules"
    return {
        "header": "header value",
        "header-regex": "pattern",
        "baggage": "baggage value",
        "path-prefix": "path prefix",
    }[kinds.pop()]


def _who(holder: str, other: RegisteredRoute) -> str:
    if other.holder == holder:
        return f"{other.holder} (in another session)"
    return other.holder


class RouteTable:
    """The routes an agent serves, in registration order.

    Invariants:

    - The first registered route that matches a request wins (:meth:`match` scans in
      registration order), so a later, narrower route never steals traffic from an
      earlier one, and a request goes to exactly one session.
    - No two sessions hold an identical rule set, and a session holding all traffic
      (an empty rule set) is the only session in the table: :meth:`add` refuses with
      :class:`RouteConflict` naming the holder.
    - Route ids are never reused within a table.
    - Mirrors (``add(..., mirror=True)``) are held apart: they never take a request
      (:meth:`match` ignores them) and never conflict, with each other or with routes;
      :meth:`mirrors_matching` lists every one a request matches. Any number of
      sessions may mirror the same requests, and an intercept of them may be held too.

    Mutation rebuilds an immutable tuple and a :class:`_RouteIndex` of it, so that
    :meth:`match` looks up the request's header values, baggage members and path in
    dicts rather than trying every route: its cost does not grow with the table. The
    index only proposes candidates (every route that matches is among them); each is
    checked with :meth:`Route.matches` in registration order, so the answer is always
    the linear scan's (tests/test_match.py compares them on random tables).
    """

    def __init__(self) -> None:
        self.mirrors: tuple[RegisteredRoute, ...] = ()  # public and truthy when any mirror is held
        self._set(())
        self._next_id = 1

    def _set(self, routes: tuple[RegisteredRoute, ...], mirrors: tuple[RegisteredRoute, ...] | None = None) -> None:
        self._routes = routes
        self.held = routes  # public and truthy when any route is held: the proxy's test, without a call
        if mirrors is not None:
            self.mirrors = mirrors
        # Every rule reads only the lines of its own field (a header rule its NAME, a baggage
        # rule ``baggage``, a path rule none), so match() gives the same answer when handed
        # only the lines named here: the proxy passes just those (RequestHead.fields).
        self.names = frozenset(
            rule._name if isinstance(rule, (HeaderEquals, HeaderRegex)) else b"baggage"
            for r in (*routes, *self.mirrors) for rule in r.route.rules if not isinstance(rule, PathPrefix)
        )
        self._by_id = {r.id: r for r in (*routes, *self.mirrors)}
        self._index = _RouteIndex(routes)

    def add(self, session_id: str, holder: str, route: Route, *, destination: tuple[str, int] | None = None,
            expires: float | None = None, mirror: bool = False) -> RegisteredRoute:
        """Register ``route`` for ``session_id``; idempotent for the same session.

        A session may hold several routes. Raises :class:`RouteConflict` (with
        ``holder``) when another session holds the identical rule set, when ``route``
        is all traffic and another session holds any route, or when another session
        holds all traffic. A ``mirror`` never conflicts.
        """
        if mirror:
            for other in self.mirrors:
                if other.session_id == session_id and other.route == route:
                    other.expires = expires
                    return other
            registered = RegisteredRoute(self._next_id, session_id, holder, route, None, expires, mirror=True)
            self._next_id += 1
            self._set(self._routes, (*self.mirrors, registered))
            return registered
        for other in self._routes:
            if other.session_id == session_id and other.route == route:
                other.destination, other.expires = destination, expires
                return other
        for other in self._routes:
            if other.session_id == session_id:
                continue
            who = _who(holder, other)
            if other.route.is_all_traffic:
                raise RouteConflict(
                    f"route {route.describe()} cannot be added: all traffic is already held by "
                    f"{who}; ask {other.holder} to leave",
                    holder=other.holder,
                )
            if route.is_all_traffic:
                raise RouteConflict(
                    f"cannot take all traffic: {who} holds route {other.route.describe()}; "
                    f"add a rule, e.g. --header x-dev=NAME, "
                    f"or ask {other.holder} to leave",
                    holder=other.holder,
                )
            if other.route == route:
                raise RouteConflict(
                    f"route {route.describe()} is already held by {who}; choose another "
                    f"{_alternative(route)}, or ask {other.holder} to leave",
                    holder=other.holder,
                )
        registered = RegisteredRoute(self._next_id, session_id, holder, route, destination, expires)
        self._next_id += 1
        self._set((*self._routes, registered))
        return registered

    def adopt(self, pending_id: str, session_id: str, route: Route, *, expires: float | None = None) -> RegisteredRoute | None:
        """Give the route ``route`` that ``pending_id`` holds for a developer not connected yet
        to their ``session_id``, in its place (so the order of registration is kept); None
        when ``pending_id`` holds no such route. A request waiting on the pending route sees
        it gone (:meth:`holds`) and is routed again: to the session."""
        for i, other in enumerate(self._routes):
            if other.session_id == pending_id and other.route == route:
                taken = RegisteredRoute(self._next_id, session_id, other.holder, route, None, expires)
                self._next_id += 1
                self._set((*self._routes[:i], taken, *self._routes[i + 1:]))
                return taken
        return None

    def remove(self, route_id: int) -> None:
        """Drop one route or mirror; an unknown id is ignored (the route is already gone)."""
        if route_id in self._by_id:
            self._set(tuple(r for r in self._routes if r.id != route_id),
                      tuple(r for r in self.mirrors if r.id != route_id))

    def remove_session(self, session_id: str) -> list[RegisteredRoute]:
        """Drop every route and mirror of a session (it left); returns them in registration order."""
        removed = [r for r in (*self._routes, *self.mirrors) if r.session_id == session_id]
        if removed:
            self._set(tuple(r for r in self._routes if r.session_id != session_id),
                      tuple(r for r in self.mirrors if r.session_id != session_id))
        return sorted(removed, key=lambda r: r.id)

    def mirrors_matching(self, method: bytes, target: bytes, headers: Headers) -> list[RegisteredRoute]:
        """Every mirror the request matches, in registration order (none expired)."""
        found = [m for m in self.mirrors if m.route.matches(method, target, headers)]
        if found and any(m.expires is not None for m in found):
            now = time.time()
            found = [m for m in found if m.expires is None or m.expires > now]
        return found

    def match(self, method: bytes, target: bytes, headers: Headers) -> RegisteredRoute | None:
        """The first registered route matching the request, or None (to the app); an
        expired route does not match (the clock is read only when one with an expiry does)."""
        routes = self._routes
        if not routes:
            return None
        for position in self._index.candidates(target, headers):
            registered = routes[position]
            if registered.route.matches(method, target, headers):
                if registered.expires is not None and registered.expires <= time.time():
                    continue
                return registered
        return None

    def match_linear(self, method: bytes, target: bytes, headers: Headers) -> RegisteredRoute | None:
        """:meth:`match` without the index: every route tried in registration order (the reference)."""
        for registered in self._routes:
            if registered.route.matches(method, target, headers):
                if registered.expires is not None and registered.expires <= time.time():
                    continue
                return registered
        return None

    def remove_expired(self, now: float) -> list[RegisteredRoute]:
        """Drop the routes whose time is up; returns them."""
        expired = [r for r in (*self._routes, *self.mirrors) if r.expires is not None and r.expires <= now]
        if expired:
            self._set(tuple(r for r in self._routes if r not in expired), tuple(r for r in self.mirrors if r not in expired))
        return expired

    def holds(self, registered: RegisteredRoute) -> bool:
        """Whether ``registered`` (that very registration) is still in the table."""
        return self._by_id.get(registered.id) is registered

    def get(self, route_id: int) -> RegisteredRoute | None:
        """The route registered with ``route_id``, if it is still held."""
        return self._by_id.get(route_id)

    def routes_of(self, session_id: str) -> list[RegisteredRoute]:
        """The routes (not the mirrors) of a session."""
        return [r for r in self._routes if r.session_id == session_id]

    def sessions(self) -> set[str]:
        """The sessions holding a route (not only mirrors)."""
        return {r.session_id for r in self._routes}

    def __len__(self) -> int:
        return len(self._routes)

    def snapshot(self) -> list[dict[str, Any]]:
        """The table as JSON-ready dicts, in registration order: the routes, then the mirrors
        (``"mirror": true`` with their ``copied`` and ``dropped`` counts)."""
        return [
            {
                "id": r.id,
                "holder": r.holder,
                "session": r.session_id,
                "rules": r.route.to_json(),
                "description": r.route.describe(),
                **({"destination": f"{r.destination[0]}:{r.destination[1]}"} if r.destination else {}),
                **({"expires": r.expires} if r.expires is not None else {}),
                **({"mirror": True, "copied": r.copied, "dropped": r.dropped} if r.mirror else {}),
            }
            for r in (*self._routes, *self.mirrors)
        ]


class _RouteIndex:
    """Which routes a request could match, found by lookups instead of a scan.

    Each route is filed under one of its rules, its *key*: a one-member
    :class:`HeaderEquals` (by field name, then value), else a :class:`Baggage` (by key,
    then value), else a :class:`PathPrefix` (by prefix); a route with none of these
    (only regexes or list values, or all traffic) is a candidate for every request.
    Invariant: a route that matches a request is among :meth:`candidates`, because its
    key rule matches, and a matching key rule is found by these lookups: a member of a
    field line is the line itself or, for a line with a comma, one of its
    :func:`field_members`; a baggage rule reads the first valid member of its key, as
    :func:`parse_baggage` does; a path prefix is the normalized path cut to its length.
    """

    __slots__ = ("headers", "baggage", "paths", "path_lengths", "always")

    def __init__(self, routes: tuple[RegisteredRoute, ...]) -> None:
        self.headers: dict[bytes, dict[bytes, list[int]]] = {}
        self.baggage: dict[str, dict[str, list[int]]] = {}
        self.paths: dict[bytes, list[int]] = {}
        self.always: list[int] = []
        for position, registered in enumerate(routes):
            rules = registered.route.rules
            key = next((r for r in rules if isinstance(r, HeaderEquals) and r._members is None), None)
            if key is not None:
                self.headers.setdefault(key._name, {}).setdefault(key._value, []).append(position)
                continue
            key = next((r for r in rules if isinstance(r, Baggage)), None)
            if key is not None:
                self.baggage.setdefault(key.key, {}).setdefault(key.value, []).append(position)
                continue
            key = next((r for r in rules if isinstance(r, PathPrefix)), None)
            if key is not None:
                self.paths.setdefault(key._prefix, []).append(position)
                continue
            self.always.append(position)
        self.path_lengths = sorted({len(prefix) for prefix in self.paths})

    def candidates(self, target: bytes, headers: Headers) -> list[int]:
        """Positions (registration order) of the routes that may match; ascending."""
        found = self.always
        by_name, by_key = self.headers, self.baggage
        baggage: list[bytes] | None = None
        if by_name or by_key:
            for name, value in headers:  # one pass over the fields, whatever the size of the table
                values = by_name.get(name)
                if values is not None:
                    hit = values.get(value)
                    if hit is not None:
                        found = found + hit
                    if b"," in value:
                        for member in field_members([value]):
                            hit = values.get(member)
                            if hit is not None:
                                found = found + hit
                if name == b"baggage" and by_key:
                    if baggage is None:
                        baggage = [value]
                    else:
                        baggage.append(value)
        if baggage is not None:
            for key, value in parse_baggage(baggage).items():
                values = by_key.get(key)
                if values is not None:
                    hit = values.get(value)
                    if hit is not None:
                        found = found + hit
        if self.paths:
            path = request_path(target)
            if path is not None:
                size = len(path)
                for length in self.path_lengths:
                    if length > size:
                        break  # the lengths ascend; no longer prefix fits in the path
                    hit = self.paths.get(path[:length])
                    if hit is not None:
                        found = found + hit
        if len(found) > 1:
            found = sorted(set(found))
        return found
