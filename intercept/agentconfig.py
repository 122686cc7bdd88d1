"""The agent's configuration: one table of its settings, written and read by the same code.

Every setting of ``intercept agent`` is declared once, in :data:`SETTINGS`: its key (the
:class:`AgentConfig` field), its flag, its ``INTERCEPT_*`` variable, its type, its default,
its help and its scope. ``intercept agent``'s flags are generated from it; the injection
writes a pod's agent container with :func:`to_env`; the agent reads its variables back
with :func:`resolve` (flags over variables over defaults, as ``intercept start`` does with
:data:`intercept.spec.OPTIONS`); :func:`from_env` reads an injected container's settings
back (what ``intercept start`` compares with what a developer asks for).

Scopes:

- ``pod``: one value per workload, shared by every developer of it, chosen when the agent
  is injected and changed only by an explicit act (``intercept inject SERVICE ...``, or
  ``intercept start --reinject``) that says whom it interrupts. A start that names none
  of them uses what the running agent has.
- ``injection``: written by the injection from the pod's shape (its ports, the Secret
  and ConfigMap it mounts); nobody chooses them.
- ``agent``: the agent's own tuning, for direct mode; the injection leaves them at their
  defaults.

Pure: nothing here reads the process environment; callers pass ``env`` in.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from intercept.errors import UsageError
from intercept.routing.fence import Fence, FenceRule

Scope = Literal["pod", "injection", "agent"]
_TRUE = {"1", "true", "yes", "on"}
_NEEDS_QUOTES = re.compile(r"[\s'\"\\]")
_FALSE = {"0", "false", "no", "off"}


# --- value types: text (a flag's or a variable's) to value, and back ---------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 <= int(port) < 65536:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9900")
    return host.strip("[]"), int(port)


def _show_address(value: tuple[str, int]) -> str:
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError("expected a number of seconds, 0 or more, e.g. 10")
    return value


def _show_number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError("expected a whole number, 0 or more, e.g. 100")
    return int(text)


def _bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE | _FALSE:
        return word in _TRUE
    raise ValueError("expected true or false")


def _fence_rules(flag: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        FenceRule.parse(text, flag)  # UsageError names the rule and the fix
        return text

    return parse


@dataclass(frozen=True)
class Setting:
    """One setting of the agent in all its spellings (``multiple``: the flag repeats, the
    variable holds shell words)."""

    key: str
    flag: str
    type: str
    default: Any  # None with ``required``: no default
    help: str
    scope: Scope
    parse: Callable[[str], Any] = field(repr=False, compare=False)
    show: Callable[[Any], str] = field(default=str, repr=False, compare=False)
    multiple: bool = False
    required: bool = False
    default_doc: str | None = None

    @property
    def env(self) -> str:
        return "INTERCEPT_" + self.flag.removeprefix("--").upper().replace("-", "_")

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)

    def value(self, text: str, where: str) -> Any:
        """``text`` (one item of a list) as this setting's value; UsageError names ``where``."""
        try:
            return self.parse(text)
        except UsageError:
            raise
        except (ValueError, TypeError) as error:
            raise UsageError(f"{where}: {error}") from None

    def text(self, value: Any) -> str:
        """``value`` as the variable holds it."""
        if self.multiple:  # shell words, quoted only where a word needs it (a space): readable in a pod spec
            return " ".join(w if w and not _NEEDS_QUOTES.search(w) else shlex.quote(w) for w in map(self.show, value))
        if self.is_bool:
            return "true" if value else "false"
        return self.show(value)


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "--listen", "HOST:PORT", (("0.0.0.0", 9900),),
            "HTTP listener (the Service's traffic); repeat it with --upstream to front several ports of the app, "
            "each --listen forwarding to the --upstream in the same place.",
            "injection", _address, _show_address, multiple=True, default_doc="0.0.0.0:9900"),
    Setting("upstream", "--upstream", "HOST:PORT", None,
            "The app container's port (repeatable: one per --listen, in the same order; their port numbers differ, "
            "since developers name each by it).", "injection", _address,
            _show_address, required=True, multiple=True),
    Setting("ssh_listen", "--ssh-listen", "HOST:PORT", ("0.0.0.0", 9922), "SSH server.", "injection", _address,
            _show_address),
    Setting("credentials", "--credentials", "FILE", None,
            "Host key and token file; created (0600) at first start.", "injection", Path, required=True),
    Setting("routes_file", "--routes-file", "FILE", None,
            "The sandboxes' routes (JSON), read again when it changes; the injection mounts it from a ConfigMap.",
            "injection", Path, default_doc="none"),
    Setting("developers_file", "--developers-file", "FILE", None,
            "The routes of the developers intercepting this workload (JSON), held from the first request until "
            "each one's session arrives; the injection mounts it from the routes ConfigMap.",
            "injection", Path, default_doc="none"),
    Setting("shutdown_grace", "--shutdown-grace", "SECONDS", 0.0,
            "Seconds to keep serving after SIGTERM (the injection sets 5).", "injection", _seconds, _show_number),
    Setting("hold_timeout", "--hold-timeout", "SECONDS", 10.0,
            "Seconds a matched request waits for the developer's process.", "pod", _seconds, _show_number),
    Setting("allow_outbound", "--allow-outbound", "boolean", False,
            "Let developers open TCP connections from this pod (their proxy, --forward).", "pod", _bool),
    Setting("outbound_allow", "--outbound-allow", "HOST[:PORT]", (),
            "Outbound connections may go only where one such rule matches (repeatable; * in names, CIDR for addresses).",
            "pod", _fence_rules("--outbound-allow"), multiple=True, default_doc="none"),
    Setting("outbound_deny", "--outbound-deny", "HOST[:PORT]", (),
            "Outbound connections never go where such a rule matches (repeatable; deny wins over allow).",
            "pod", _fence_rules("--outbound-deny"), multiple=True, default_doc="none"),
    Setting("forwarded_headers", "--forwarded-headers", "boolean", True,
            "Add the client's address to each request (X-Forwarded-For, Forwarded).", "pod", _bool),
    Setting("header_timeout", "--header-timeout", "SECONDS", 60.0,
            "Close connections that wait longer for a request head, or whose request body stops arriving for as long.",
            "agent", _seconds, _show_number),
    Setting("max_connections", "--max-connections", "N", 10000,
            "New connections (no request completed yet) served at once; more get 503. 0: no cap.", "agent", _count),
    Setting("serve_files", "--serve-files", "DIR", (),
            "Serve DIR (or a file), read-only, to developers at its own path (repeatable; in a pod the injection "
            "names the app's mounts).", "agent", str, multiple=True, default_doc="none"),
)

BY_KEY: Mapping[str, Setting] = {s.key: s for s in SETTINGS}


@dataclass(frozen=True)
class AgentConfig:
    """The agent's settings, validated; fields as in :data:`SETTINGS`, in order.

    ``mounts`` are the app's mounts as the injection describes them
    (:func:`intercept.agent.files.mounts_from_env`), served beside ``serve_files``.
    """

    listen: tuple[tuple[str, int], ...] = (("0.0.0.0", 9900),)
    upstream: tuple[tuple[str, int], ...] = (("127.0.0.1", 8080),)
    ssh_listen: tuple[str, int] = ("0.0.0.0", 9922)
    credentials: Path = Path("credentials.json")
    routes_file: Path | None = None
    developers_file: Path | None = None
    shutdown_grace: float = 0.0
    hold_timeout: float = 10.0
    allow_outbound: bool = False
    outbound_allow: tuple[str, ...] = ()
    outbound_deny: tuple[str, ...] = ()
    forwarded_headers: bool = True
    header_timeout: float = 60.0
    max_connections: int = 10000
    serve_files: tuple[str, ...] = ()
    mounts: tuple[Any, ...] = ()  # intercept.agent.files.ServedRoot

    @property
    def fronts(self) -> list[tuple[tuple[str, int], tuple[str, int]]]:
        """Each HTTP listener with the app port it forwards to: ``(listen, upstream)``, in order."""
        return list(zip(self.listen, self.upstream))

    def check_fronts(self) -> None:
        """Raise :class:`UsageError` unless ``listen`` and ``upstream`` pair one to one, with
        distinct upstream ports (a developer names a front by its app port)."""
        if len(self.listen) != len(self.upstream):
            raise UsageError(f"{len(self.listen)} --listen for {len(self.upstream)} --upstream (INTERCEPT_LISTEN, "
                             "INTERCEPT_UPSTREAM): they pair by position; give one --listen per --upstream")
        ports = [port for _, port in self.upstream]
        twice = next((p for p in ports if ports.count(p) > 1), None)
        if twice is not None:
            raise UsageError(f"--upstream: port {twice} twice; developers name each app port by its number, "
                             "so give each --upstream its own port")

    @cached_property
    def fence(self) -> Fence:
        """Where outbound connections may go (``outbound_allow`` / ``outbound_deny``)."""
        return Fence.parse(self.outbound_allow, self.outbound_deny)


def _where(setting: Setting, medium: str, text: str) -> str:
    return f"{setting.flag} {text!r}" if medium == "flag" else f"{setting.env}={shlex.quote(text)}"


def _read(setting: Setting, text: str, medium: str) -> Any:
    if not setting.multiple:
        return setting.value(text, _where(setting, medium, text))
    try:
        words = shlex.split(text) if medium == "env" else [text]
    except ValueError as error:
        raise UsageError(f"{_where(setting, medium, text)}: {error}") from None
    return tuple(setting.value(w, _where(setting, medium, w)) for w in words)


def from_env(env: Mapping[str, str], scopes: tuple[Scope, ...] = ("pod", "injection", "agent")) -> dict[str, Any]:
    """The settings of ``scopes`` that ``env`` sets (``INTERCEPT_*``), by key, typed.

    An empty variable counts as unset. Raises :class:`UsageError` naming the variable.
    """
    values = {}
    for setting in SETTINGS:
        text = env.get(setting.env)
        if setting.scope in scopes and text:
            values[setting.key] = _read(setting, text, "env")
    return values


def resolve(env: Mapping[str, str], flags: Mapping[str, Any]) -> AgentConfig:
    """The agent's configuration: ``flags`` (by key, typed, only those given) over the
    variables of ``env`` over the defaults. Raises :class:`UsageError` for a missing
    required setting or a bad value, naming the flag and the variable."""
    values = {**from_env(env), **flags}
    for setting in SETTINGS:
        if setting.required and setting.key not in values:
            raise UsageError(f"missing option {setting.flag!r} (or {setting.env}): {setting.help[0].lower()}"
                             f"{setting.help[1:].rstrip('.')}")
    if "listen" not in values and len(values.get("upstream", ())) > 1:
        raise UsageError(f"{len(values['upstream'])} --upstream need as many --listen (INTERCEPT_LISTEN), "
                         "one for each in the same order")
    config = AgentConfig(**values)
    config.check_fronts()
    config.fence  # noqa: B018 (a bad rule fails here, naming it)
    return config


def to_env(values: Mapping[str, Any]) -> list[dict[str, str]]:
    """``values`` (by key) as a container's ``env`` entries, in the table's order; an empty
    list is left out (an empty variable counts as unset)."""
    return [{"name": s.env, "value": s.text(values[s.key])} for s in SETTINGS
            if s.key in values and not (s.multiple and not values[s.key])]


def pod_wide(env: list[dict[str, Any]]) -> dict[str, Any]:
    """Every pod-wide setting of an injected agent container whose ``env`` entries these are
    (defaults for those it does not set): what the running agent serves everyone with."""
    plain = {e["name"]: e["value"] for e in env if isinstance(e.get("value"), str)}
    values = {s.key: s.default for s in SETTINGS if s.scope == "pod"}
    values.update(from_env(plain, ("pod",)))
    return values
