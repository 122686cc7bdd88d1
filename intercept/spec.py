"""One intercept, three spellings: ``intercept.yaml``, the flags of ``intercept start``
and ``INTERCEPT_*`` environment variables.

Every option of an intercept is declared once, in :data:`OPTIONS`: its key in the file,
its flag, its variable, its type, its default and its help. The file loader, the
validation, :func:`merge` and the reference table in ``docs/intercept-yaml.md`` all
derive from that table (``tests/test_spec.py`` checks the doc against
:func:`render_reference`, so the two cannot drift).

Precedence, per option: flags > environment > the intercept's own entry in the file >
the file's top-level defaults > the built-in default. A list set by a higher layer
replaces a lower layer's list; lists are never concatenated. An empty variable
(``INTERCEPT_PORT=``) and a YAML ``null`` count as unset.

Typical use (the CLI)::

    workspace = load_workspace(Path("intercept.yaml"), os.environ)   # file + env
    workspace = resolve_workspace(workspace, os.environ, given_flags)  # + flags
    spec = merge(None, os.environ, given_flags)                       # no file

where ``given_flags`` maps option keys (``"port"``, ``"headers"``, ...) to the values of
only the flags the user typed.

Pure: nothing here reads the process environment, the network or the clock; callers
pass ``env`` in. The only I/O is :func:`load_workspace` reading its file (and making its
directory absolute).
"""

from __future__ import annotations

import difflib
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import yaml

from intercept.errors import SpecError, UsageError
from intercept.kube.image import DEFAULT_AGENT_IMAGE
from intercept.routing.fence import FenceRule
from intercept.routing.match import Rule, parse_rule

__all__ = [
    "DEFAULT_FILE",
    "for_service",
    "OPTIONS",
    "SPEC_VERSION",
    "TOP_LEVEL_KEYS",
    "Forward",
    "Port",
    "InterceptSpec",
    "Option",
    "Origin",
    "WorkspaceSpec",
    "load_workspace",
    "merge",
    "options",
    "parse_workspace",
    "render_reference",
    "resolve_workspace",
    "to_args",
    "update_reference",
]

SPEC_VERSION = 1
DEFAULT_FILE = "intercept.yaml"

Medium = Literal["file", "env", "flag"]

# Markers inside a problem's text, so that one message fits all three spellings:
# _AS stands for how the option is written ("port: ", "INTERCEPT_PORT=", "--port "),
# _EG for the option written with its example value ("port: 3000", "--port 3000").
_AS = "\x00"
_EG = "\x01"


class _Invalid(Exception):
    """A value's problem and its fix, in words that fit every spelling (see _AS, _EG)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


# --- values -------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """``--forward SERVICE:PORT[:LOCAL_PORT]``: plain TCP from localhost:LOCAL_PORT to a cluster service."""

    service: str
    port: int
    local_port: int

    def __str__(self) -> str:
        if self.local_port == self.port:
            return f"{self.service}:{self.port}"
        return f"{self.service}:{self.port}:{self.local_port}"


@dataclass(frozen=True)
class Port:
    """``--port [SERVICE_PORT:]LOCAL_PORT``: requests to one port of the Service (its number
    or its name; None: the single port, or ``service_port``) reach localhost:LOCAL_PORT.
    In direct mode SERVICE_PORT is the number of the app's port the agent forwards to."""

    service_port: int | str | None
    local_port: int

    def __str__(self) -> str:
        return str(self.local_port) if self.service_port is None else f"{self.service_port}:{self.local_port}"


# RFC 1035 label (Kubernetes Service names), RFC 1123 label (namespaces), IANA service
# name (named ports: at most 15 characters, at least one letter).
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_VISIBLE = re.compile(r"[!-~]+")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def _string(value: object) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _Invalid(f"expected text, got {_shown(value)}; e.g. {_EG}")


def _text(value: object) -> str:
    text = _string(value)
    if not text.strip():
        raise _Invalid(f"empty; give a value, e.g. {_EG}, or leave the option out")
    if text != text.strip():
        raise _Invalid(f"leading or trailing whitespace; write {_AS}{text.strip()}")
    return text


def _label(pattern: re.Pattern[str], what: str, limit: int) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _text(value)
        if len(text) <= limit and pattern.fullmatch(text):
            return text
        fixed = re.sub(r"[^-a-z0-9]+", "-", text.lower()).strip("-")
        hint = f"write {_AS}{fixed}" if fixed and len(fixed) <= limit and pattern.fullmatch(fixed) else f"e.g. {_EG}"
        raise _Invalid(f"not a {what}: lowercase letters, digits and '-', at most {limit} characters; {hint}")

    return parse


_service_name = _label(_DNS_1035, "Service name (starting with a letter)", 63)
_WORKLOAD_KINDS = ("deployment", "statefulset")  # intercept.kube.inject.WORKLOAD_REFS


def _service_or_workload(value: object) -> str:
    """A Service name, or ``deployment/NAME`` / ``statefulset/NAME`` (a workload with no Service, for ``replace``)."""
    text = _text(value)
    kind, sep, name = text.partition("/")
    if not sep:
        return _service_name(text)
    labels = name.split(".")
    if kind in _WORKLOAD_KINDS and len(name) <= 253 and all(len(x) <= 63 and _DNS_1123.fullmatch(x) for x in labels):
        return text
    raise _Invalid(f"expected a Service name, or deployment/NAME or statefulset/NAME (a workload, with replace); "
                   f"e.g. {_EG}")

_namespace_name = _label(_DNS_1123, "namespace name", 63)


def _name(value: object) -> str:
    text = _text(value)
    if not _VISIBLE.fullmatch(text):
        raise _Invalid(f"not visible ASCII without spaces (it is sent as a header value and the SSH user name); e.g. {_EG}")
    return text


def _path(value: object) -> Path:
    return Path(_text(value)).expanduser()


def _mount(value: object) -> Path | bool | None:
    """``--mount`` alone (or ``true``): a fresh temporary directory; ``false``: none; else the directory."""
    if isinstance(value, bool):
        return True if value else None
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return None
    return _path(value)


_MOUNT_MODES = ("auto", "live", "copy")


def _mount_mode(value: object) -> str:
    text = _text(value).lower()
    if text not in _MOUNT_MODES:
        raise _Invalid(f"expected one of {', '.join(_MOUNT_MODES)} (auto: live where sshfs and FUSE are available, "
                       f"else a copy); e.g. {_EG}")
    return text


_ACCESS_MODES = ("auto", "hosts-file", "namespace", "proxy", "off")  # intercept.access.modes.CHOICES


def _access(value: object) -> str:
    text = _text(value).lower()
    if text not in _ACCESS_MODES:
        raise _Invalid(f"expected one of {', '.join(_ACCESS_MODES)} (auto: the hosts file where it is writable, "
                       f"else a private namespace on Linux, else the proxy only); e.g. {_EG}")
    return text


def _port(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise _Invalid(f"not a port number; write a number from 1 to 65535, e.g. {_EG}")


def _local_port(value: object) -> Port:
    """One ``--port``: ``LOCAL_PORT`` or ``SERVICE_PORT:LOCAL_PORT`` (SERVICE_PORT a number or a name)."""
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and value.strip().isdigit():
        try:
            return Port(None, _port(value))
        except _Invalid:
            raise _Invalid(f"not a port number; write a number from 1 to 65535, e.g. {_EG}") from None
    text = _text(value)
    wanted, sep, local = text.rpartition(":")
    if not sep:
        if len(text) <= 15 and _PORT_NAME.fullmatch(text) and re.search("[a-z]", text):
            raise _Invalid(f"not a port number; to take the Service port named {text}, add the local port: "
                           f"{_AS}{text}:LOCAL_PORT, e.g. {_AS}{text}:3000")
        raise _Invalid(f"not a port number; write a number from 1 to 65535, e.g. {_EG}, "
                       f"or SERVICE_PORT:LOCAL_PORT, e.g. {_AS}grpc:5000")
    if not (local.isdigit() and 1 <= int(local) <= 65535):
        raise _Invalid(f"{local!r} is not a local port; write SERVICE_PORT:LOCAL_PORT with LOCAL_PORT "
                       f"a number from 1 to 65535, e.g. {_AS}grpc:5000 or {_AS}9090:5000")
    try:
        service_port = _service_port(wanted)
    except _Invalid:
        raise _Invalid(f"{wanted!r} is not a Service port; write SERVICE_PORT:LOCAL_PORT with SERVICE_PORT "
                       f"the Service port's number (1 to 65535) or name, e.g. {_AS}grpc:5000 or {_AS}9090:5000") from None
    return Port(service_port, int(local))


def _seconds(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"):
        return float(value)
    raise _Invalid(f"not a number of seconds; write a positive number, e.g. {_EG}")


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d12h``, or a number of seconds; raises ValueError."""
    text = text.strip()
    if text.replace(".", "", 1).isdigit():
        seconds = float(text)
    else:
        m = _DURATION.fullmatch(text)
        if not text or m is None:
            raise ValueError(text)
        d, h, mi, se = (int(g or 0) for g in m.groups())
        seconds = float(((d * 24 + h) * 60 + mi) * 60 + se)
    if seconds <= 0:
        raise ValueError(text)
    return seconds


def _duration(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    try:
        return parse_duration(_string(value))
    except ValueError:
        raise _Invalid(f"not a duration; write e.g. {_EG} (90s, 30m, 2h, 1d12h, or seconds)") from None


def _address(value: object) -> str:
    text = _text(value)
    host, sep, port = text.rpartition(":")
    if sep and host.strip("[]") and port.isdigit() and 1 <= int(port) <= 65535:
        return text
    raise _Invalid(f"expected HOST:PORT (the agent's SSH address), e.g. {_EG}")


def _service_port(value: object) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and value.strip().isdigit():
        return _port(value)
    text = _text(value)
    if len(text) <= 15 and _PORT_NAME.fullmatch(text) and re.search("[a-z]", text):
        return text
    raise _Invalid(f"expected the Service port's name or number (1 to 65535), e.g. {_EG}")


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _Invalid(f"expected true or false (also 1/0, yes/no, on/off), e.g. {_EG}")


def _word(value: object) -> str:
    return _string(value)


def _rule(kind: str) -> Callable[[object], str]:
    flag = f"--{kind}"

    def parse(value: object) -> str:
        text = _string(value)
        try:
            parse_rule(kind, text)
        except UsageError as error:
            # The rule's own message, re-spelled: "--header 'x dev=a': header name ..."
            # becomes "header name ...; e.g. headers: x-dev=alice" in a file.
            message = str(error)
            lead = f"{flag} {shlex.quote(text)}: "
            if message.startswith(lead):
                message = message[len(lead):]
            raise _Invalid(message.replace(f"{flag} ", _AS)) from None
        return text

    return parse


def _fence_rule(flag: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _string(value)
        try:
            FenceRule.parse(text, flag)
        except UsageError as error:
            message = str(error)
            lead = f"{flag} {text!r}: "
            if message.startswith(lead):
                message = message[len(lead):]
            message = message.split("; e.g. ")[0]
            raise _Invalid(f"{message}; e.g. {_EG}") from None
        return text

    return parse


def _forward(value: object) -> Forward:
    text = _text(value)
    parts = text.split(":")
    if len(parts) in (2, 3):
        service, *ports = parts
        labels = service.split(".")
        if all(len(x) <= 63 and _DNS_1123.fullmatch(x) for x in labels) and all(p.isdigit() and 1 <= int(p) <= 65535 for p in ports):
            port = int(ports[0])
            return Forward(service, port, int(ports[1]) if len(ports) == 2 else port)
    raise _Invalid(f"expected SERVICE:PORT or SERVICE:PORT:LOCAL_PORT (SERVICE as named in the cluster, e.g. redis or redis.cache), e.g. {_EG}")


def parse_forward(text: str) -> Forward:
    """``--forward SERVICE:PORT[:LOCAL_PORT]`` as typed on the command line."""
    try:
        return _forward(text)
    except _Invalid as e:
        option = next(o for o in OPTIONS if o.key == "forward")
        raise UsageError(f"--forward {text!r}: {_render(str(e), option, 'flag')}") from None


# --- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option of an intercept, in all its spellings.

    ``key`` is both the ``intercept.yaml`` key and the :class:`InterceptSpec` field.
    ``flag`` is how ``intercept start`` spells it (``SERVICE`` is the argument and ``--``
    introduces COMMAND). ``multiple``: a list; the flag repeats, the variable holds
    shell words, the file takes a YAML list or one string (one item; shell words for
    ``command``). ``parse`` checks one value (one item of a list) and returns it typed.
    """

    key: str
    flag: str
    type: str
    default: object
    help: str
    example: object
    parse: Callable[[object], object] = field(repr=False, compare=False)
    multiple: bool = False
    path: bool = False
    top_level: bool = False
    short: str | None = None
    default_doc: str | None = None
    # Read a YAML scalar as written ("no" stays "no", "0123" stays "0123"), not as YAML types it.
    verbatim: bool = True
    # In the file, one string (instead of a list) is split like shell words; other list
    # options take one string as one item.
    words: bool = False
    # The flag may be given without a value, which then stands for this one (``--mount``).
    flag_value: str | None = None

    @property
    def env(self) -> str:
        if self.flag == "SERVICE":
            return "INTERCEPT_SERVICE"
        if self.flag == "--":
            return "INTERCEPT_COMMAND"
        return "INTERCEPT_" + self.flag.lstrip("-").upper().replace("-", "_")

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)

    @property
    def label(self) -> str:
        """How the option is named on the command line."""
        return {"SERVICE": "SERVICE", "--": "-- COMMAND"}.get(self.flag, self.flag)


OPTIONS: tuple[Option, ...] = (
    Option("service", "SERVICE", "Service name", None,
           "The Kubernetes Service whose requests you take (the argument of `intercept start`); with `replace`, "
           "also `deployment/NAME` or `statefulset/NAME`: a workload with no Service (a queue worker).",
           "orders", _service_or_workload,
           default_doc="none: then `agent` is required"),
    Option("namespace", "--namespace", "namespace name", None,
           "The Service's namespace.", "shop", _namespace_name, top_level=True, short="-n",
           default_doc="the context's namespace, else `default`"),
    Option("context", "--context", "text", None,
           "The kubeconfig context to use.", "kind-dev", _text, top_level=True,
           default_doc="the kubeconfig's current context"),
    Option("kubeconfig", "--kubeconfig", "path", None,
           "The kubeconfig file.", "/home/dev/.kube/config", _path, path=True, top_level=True,
           default_doc="`$KUBECONFIG`, else `~/.kube/config`; in a pod, the in-cluster configuration"),
    Option("agent", "--agent", "HOST:PORT", None,
           "Direct mode: the agent's SSH address, instead of finding it through Kubernetes.",
           "10.0.0.7:9922", _address, default_doc="none: the agent is found through Kubernetes"),
    Option("credentials", "--credentials", "path", None,
           "Direct mode: the agent's credentials file (host key and token).",
           "/etc/intercept/credentials.json", _path, path=True,
           default_doc="none; required with `agent`"),
    Option("service_port", "--service-port", "port name or number", None,
           "Which Service port to take, when the Service has several.", "http", _service_port,
           default_doc="the Service's only port"),
    Option("port", "--port", "list of [SERVICE_PORT:]LOCAL_PORT", (Port(None, 8080),),
           "The local port that routed requests reach. Repeat it as SERVICE_PORT:LOCAL_PORT to take several ports "
           "of the Service in one intercept, each to its own local port, with one route: SERVICE_PORT is the "
           "Service port's number or name (in direct mode, the number of the app's port behind the agent). "
           "Without SERVICE_PORT: the Service's only port, or `service_port`.",
           3000, _local_port, multiple=True, default_doc="`8080`"),
    Option("headers", "--header", "list of NAME=VALUE", (),
           "Route requests whose header NAME has exactly VALUE. All rules of an intercept must match; "
           "with no rule at all, the route is your personal header `x-intercept-id: NAME`.",
           ["x-dev=alice"], _rule("header"), multiple=True, default_doc="none"),
    Option("header_regexes", "--header-regex", "list of NAME=REGEX", (),
           "Route requests whose header NAME fully matches REGEX.",
           ["x-dev=alice.*"], _rule("header-regex"), multiple=True, default_doc="none"),
    Option("baggage", "--baggage", "KEY=VALUE", None,
           "Route requests whose W3C `baggage` has member KEY with value VALUE.",
           "dev=alice", _rule("baggage"), default_doc="none"),
    Option("path_prefix", "--path-prefix", "/PREFIX", None,
           "Route requests whose path starts with PREFIX (a plain string prefix of the normalized path: /%61pi is /api, /api/../x is /x; the query is not part of it).",
           "/api", _rule("path-prefix"), default_doc="none"),
    Option("all", "--all", "boolean", False,
           "Route every request; only while nobody else holds a route, and not with other rules.",
           True, _bool, verbatim=False),
    Option("replace", "--replace", "boolean", False,
           "Replace the cluster's version: every request comes to you (as `all`), and the app container runs in no "
           "replica while you intercept (it runs a stand-in from the agent image, keeping its environment and "
           "mounts for you), so its queue consumers and schedulers stop competing with yours; it comes back when "
           "you leave. Only one developer at a time, and only while nobody else holds a route on it. Not with "
           "`mirror`.",
           True, _bool, verbatim=False),
    Option("mirror", "--mirror", "boolean", False,
           "Mirror instead of intercept: the app still answers every request; a copy of each one the rules match "
           "(every one with --all) comes to your process, whose answer is discarded. Never slows the app's "
           "answer: copies your process does not take in time are dropped and counted (intercept status). "
           "Any number of developers may mirror the same requests, beside an intercept of them.",
           True, _bool, verbatim=False),
    Option("name", "--name", "text", None,
           "Your display name, and the value of your personal header.", "alice", _name, top_level=True,
           default_doc="the local part of `git config user.email`, else `$USER`"),
    Option("command", "--", "list of words", (),
           "The local process: run with the pod's environment, restarted on changes, stopped when you leave. "
           "On the command line, everything after `--`.",
           ["python", "app.py"], _word, multiple=True, words=True, default_doc="none: start your process yourself"),
    Option("watch", "--watch", "list of paths", (),
           "Restart the command when files under these paths change.",
           ["/srv/orders/src"], _path, multiple=True, path=True,
           default_doc="with a command: the directory of intercept.yaml (on the command line, the current directory); else none"),
    Option("no_watch", "--no-watch", "boolean", False,
           "Never restart the command on changes (overrides `watch`).", True, _bool, verbatim=False),
    Option("env_file", "--env-file", "path", None,
           "Also write the command's environment (the pod's) to this file, as dotenv.",
           "/tmp/orders.env", _path, path=True, default_doc="none"),
    Option("mount", "--mount", "path, or true", None,
           "Bring the pod's files (the app container's mounts: ConfigMaps, Secrets, the service account token) here, "
           "read-only, each at its mountPath below this directory; the command gets `INTERCEPT_ROOT` set to it. "
           "`--mount` alone (`mount: true`): a fresh temporary directory. Removed when you leave, even after a crash.",
           "/tmp/orders-root", _mount, path=True, flag_value="true",
           default_doc="none: the files stay in the pod"),
    Option("mount_mode", "--mount-mode", "auto, live or copy", "auto",
           "live: sshfs over the intercept's SSH connection (a ConfigMap update shows at once); copy: once, at start; "
           "auto: live where sshfs and FUSE are available, else a copy (said in the `mount` line).",
           "copy", _mount_mode, verbatim=False),
    Option("debug", "--debug", "boolean", False,
           "Run the (Python) command under debugpy, listening on 127.0.0.1:`debug_port`, again after each reload.",
           True, _bool, verbatim=False),
    Option("debug_port", "--debug-port", "port", 5678,
           "The debugger's port.", 5679, _port, verbatim=False),
    Option("debug_wait", "--debug-wait", "boolean", False,
           "Wait for the debugger to attach before the program starts (needs `debug`).",
           True, _bool, verbatim=False),
    Option("forward", "--forward", "list of SERVICE:PORT[:LOCAL_PORT]", (),
           "Plain TCP from localhost:LOCAL_PORT (default: PORT) to a cluster service.",
           ["redis:6379", "postgres.db:5432:15432"], _forward, multiple=True, default_doc="none"),
    Option("also_namespaces", "--also-namespace", "list of namespace names", (),
           "Also reach the Services of these namespaces by name (`NAME.NS`, `NAME.NS.svc`, the full name), "
           "besides those of the Service's own namespace.",
           ["cache"], _namespace_name, multiple=True, default_doc="none"),
    Option("access", "--access", "auto, hosts-file, namespace, proxy or off", "auto",
           "How the local process reaches every Service by the names a pod uses (a loopback address per Service, "
           "dialled from the agent's pod): hosts-file (a managed block in /etc/hosts, removed when you leave: root, "
           "CDE containers), namespace (Linux without root: the command alone sees a hosts file of its own), "
           "proxy or off (the proxy variables and `forward` only). `intercept doctor` says what auto picks here.",
           "namespace", _access, verbatim=False),
    Option("propagate_header", "--propagate-header", "boolean", False,
           "Add your route's header to outbound HTTP through the proxy, so that a chain of intercepted services keeps routing.",
           True, _bool, verbatim=False),
    Option("no_outbound", "--no-outbound", "boolean", False,
           "When the agent is injected: refuse connections from the pod on a developer's behalf (no proxy, no --forward).",
           True, _bool, verbatim=False),
    Option("outbound_allow", "--outbound-allow", "list of HOST[:PORT]", (),
           "Outbound connections from the pod (the proxy, `forward`) may go only where one of these matches: "
           "a host name (`*` for any characters), an address or a CIDR network, with or without a port. "
           "Set on the agent when it is injected, and on this intercept's sessions (which can narrow an agent's fence, never widen it).",
           ["redis:6379"], _fence_rule("--outbound-allow"), multiple=True,
           default_doc="none: everything the pod's network policies allow"),
    Option("outbound_deny", "--outbound-deny", "list of HOST[:PORT]", (),
           "Outbound connections never go where one of these matches (deny wins over allow); spelled as `outbound_allow`.",
           ["10.0.0.0/8"], _fence_rule("--outbound-deny"), multiple=True, default_doc="none"),
    Option("no_policy_changes", "--no-policy-changes", "boolean", False,
           "When the agent is injected: refuse, rather than extend, NetworkPolicies that would cut the agent off.",
           True, _bool, verbatim=False),
    Option("no_forwarded_headers", "--no-forwarded-headers", "boolean", False,
           "When the agent is injected: do not add the client's address to X-Forwarded-For and Forwarded (the app then sees every client as 127.0.0.1).",
           True, _bool, verbatim=False),
    Option("timeout", "--timeout", "seconds", 300.0,
           "How long the agent's rollout may take when it is injected (then the originals are put back).",
           120, _seconds, verbatim=False),
    Option("ttl", "--ttl", "duration", None,
           "End the route by itself after this long, even if this machine is gone (the agent enforces it).",
           "2h", _duration, default_doc="none: the route lasts until you leave"),
    Option("agent_image", "--agent-image", "image", DEFAULT_AGENT_IMAGE,
           "The agent image to inject (build it with `agent_image/Dockerfile`; the cluster must be able to pull it). "
           "Where the agent runs already, its image is used; naming another one is refused unless `reinject`.",
           "registry.example.com/intercept-agent:0.1.0", _text, top_level=True,
           default_doc="the running agent's; when there is none, `ghcr.io/intercept-dev/agent:VERSION`"),
    Option("hold_timeout", "--hold-timeout", "seconds", 10.0,
           "How long a request that matches your route waits for your process (and, on a pod that started after "
           "your intercept, for your session) before it is answered 502 (or goes to the app). Pod-wide: set when "
           "the agent is injected; where it runs, naming another value is refused unless `reinject`.",
           30, _seconds, verbatim=False, top_level=True),
    Option("reinject", "--reinject", "boolean", False,
           "Where the agent runs already with other pod-wide settings (`agent_image`, `no_outbound`, "
           "`no_forwarded_headers`) than these: change them for everyone, replacing its pods (every developer "
           "connected is interrupted and reconnects). Without it such a start is refused, naming the difference.",
           True, _bool, verbatim=False),
)

_BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}
_BY_ENV: dict[str, Option] = {o.env: o for o in OPTIONS}
_RULE_KEYS = ("headers", "header_regexes", "baggage", "path_prefix")
TOP_LEVEL_KEYS: tuple[str, ...] = ("version", "intercepts", *(o.key for o in OPTIONS if o.top_level))


def _as(option: Option, medium: Medium) -> str:
    if medium == "file":
        return f"{option.key}: "
    if medium == "env":
        return f"{option.env}="
    return "" if option.flag == "SERVICE" else f"{option.flag} "


def _inline_yaml(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _written(option: Option, medium: Medium, value: object) -> str:
    """``value`` (in its file form) written as the option in ``medium``."""
    if isinstance(value, bool):
        if medium == "flag":
            return option.flag if value else f"--no-{option.flag.lstrip('-')}"
        return f"{_as(option, medium)}{'true' if value else 'false'}"
    if isinstance(value, list):
        words = [str(v) for v in value]
        if medium == "file":
            return f"{option.key}: {_inline_yaml(words)}"
        if medium == "env":
            return f"{option.env}={shlex.quote(shlex.join(words))}"
        if option.flag == "--":
            return f"-- {shlex.join(words)}"
        return " ".join(f"{option.flag} {shlex.quote(w)}" for w in words)
    if medium == "file":
        return f"{option.key}: {_inline_yaml(value)}"
    return f"{_as(option, medium)}{shlex.quote(str(value))}"


def _example(option: Option, medium: Medium) -> str:
    return _written(option, medium, option.example)


def _render(problem: str, option: Option, medium: Medium) -> str:
    return problem.replace(_EG, _example(option, medium)).replace(_AS, _as(option, medium))


# --- the object ---------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Where a value came from: ``intercept.yaml:9``, ``INTERCEPT_PORT``, ``--port``."""

    medium: Medium
    label: str
    path: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class InterceptSpec:
    """One intercept, validated, every option resolved to its value.

    Build it with :func:`merge` or :func:`load_workspace`, which validate and apply the
    defaults (including ``watch``'s: ``directory`` when a command is given, unless
    ``no_watch``); the constructor does not. The fields up to ``reinject`` are
    the options of :data:`OPTIONS`, in order. ``directory`` is where the command runs
    and where relative paths of the file were resolved from (the directory of
    intercept.yaml, else ``.``). ``origins`` says which option was set where (options
    left at their default are absent); it takes no part in equality.
    """

    service: str | None = None
    namespace: str | None = None
    context: str | None = None
    kubeconfig: Path | None = None
    agent: str | None = None
    credentials: Path | None = None
    service_port: int | str | None = None
    port: tuple[Port, ...] = (Port(None, 8080),)
    headers: tuple[str, ...] = ()
    header_regexes: tuple[str, ...] = ()
    baggage: str | None = None
    path_prefix: str | None = None
    all: bool = False
    replace: bool = False
    mirror: bool = False
    name: str | None = None
    command: tuple[str, ...] = ()
    watch: tuple[Path, ...] = ()
    no_watch: bool = False
    env_file: Path | None = None
    mount: Path | bool | None = None
    mount_mode: str = "auto"
    debug: bool = False
    debug_port: int = 5678
    debug_wait: bool = False
    forward: tuple[Forward, ...] = ()
    also_namespaces: tuple[str, ...] = ()
    access: str = "auto"
    propagate_header: bool = False
    no_outbound: bool = False
    outbound_allow: tuple[str, ...] = ()
    outbound_deny: tuple[str, ...] = ()
    no_policy_changes: bool = False
    no_forwarded_headers: bool = False
    timeout: float = 300.0
    ttl: float | None = None
    agent_image: str = DEFAULT_AGENT_IMAGE
    hold_timeout: float = 10.0
    reinject: bool = False
    directory: Path = Path(".")
    origins: Mapping[str, Origin] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)
    location: Origin | None = field(default=None, compare=False, repr=False)

    @property
    def agent_address(self) -> tuple[str, int] | None:
        """``agent`` as ``(host, port)`` (brackets of an IPv6 host removed), or ``None``."""
        if self.agent is None:
            return None
        host, _, port = self.agent.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def local_port(self) -> int:
        """The first ``port``'s local port: the one the command's ``INTERCEPT_SESSION_PORT`` names."""
        return self.port[0].local_port

    def ports(self) -> tuple[Port, ...]:
        """Each ``port`` with the Service port it takes: its own, else ``service_port`` (None: the only one)."""
        return tuple(p if p.service_port is not None else Port(self.service_port, p.local_port) for p in self.port)

    def rules(self) -> list[Rule]:
        """The route's explicit rules (empty: the caller applies the personal header, or ``all``)."""
        rules = [parse_rule("header", h) for h in self.headers]
        rules += [parse_rule("header-regex", h) for h in self.header_regexes]
        rules += [parse_rule("baggage", self.baggage)] if self.baggage else []
        rules += [parse_rule("path-prefix", self.path_prefix)] if self.path_prefix else []
        return rules

    def to_dict(self) -> dict[str, object]:
        """Every option by its file key, JSON-ready (paths and forwards as strings)."""

        def plain(value: object) -> object:
            if isinstance(value, Path | Forward):
                return str(value)
            if isinstance(value, Port):
                if value.service_port is None:
                    return value.local_port

                return str(value)
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        return {o.key: plain(getattr(self, o.key)) for o in OPTIONS}


@dataclass(frozen=True)
class WorkspaceSpec:
    """``intercept.yaml``: ``version``, top-level defaults and one or more intercepts."""

    path: Path
    intercepts: tuple[InterceptSpec, ...]
    version: int = SPEC_VERSION
    namespace: str | None = None
    context: str | None = None
    kubeconfig: Path | None = None
    name: str | None = None


# --- layers ---------------------------------------------------------------------------


def _check(option: Option, value: object, where: str, medium: Medium, *, path: str | None = None, line: int | None = None) -> object:
    try:
        return option.parse(value)
    except _Invalid as invalid:
        raise SpecError(f"{where}: {_render(invalid.problem, option, medium)}", path=path, line=line, key=option.key) from None


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, object], dict[str, Origin]]:
    values: dict[str, object] = {}
    origins: dict[str, Origin] = {}
    for option in OPTIONS:
        raw = env.get(option.env)
        if raw is None or raw == "":
            continue
        where = f"{option.env}={shlex.quote(raw)}"
        if option.multiple:
            try:
                words = shlex.split(raw)
            except ValueError as error:
                raise SpecError(
                    f"{where}: {error}; the value is split like shell words, e.g. {_example(option, 'env')}",
                    key=option.key,
                ) from None
            items = []
            for i, word in enumerate(words):
                at = where if len(words) == 1 else f"{where} (word {i + 1}, {shlex.quote(word)})"
                items.append(_check(option, word, at, "env"))
            values[option.key] = tuple(items)
        else:
            values[option.key] = _check(option, raw, where, "env")
        origins[option.key] = Origin("env", option.env)
    return values, origins


def _from_flags(flags: Mapping[str, object]) -> tuple[dict[str, object], dict[str, Origin]]:
    values: dict[str, object] = {}
    origins: dict[str, Origin] = {}
    for key, value in flags.items():
        option = _BY_KEY.get(key)
        if option is None:
            raise ValueError(f"merge(): unknown option key {key!r}; the keys are {', '.join(_BY_KEY)}")
        if value is None:
            continue
        if option.multiple:
            items = [value] if isinstance(value, str | Path | int) else list(value)  # type: ignore[call-overload]
            if not items:
                continue
            if option.flag == "--":
                where = f"-- {shlex.join(str(i) for i in items)}"
                values[key] = tuple(_check(option, item, where, "flag") for item in items)
            else:
                values[key] = tuple(_check(option, item, f"{option.flag} {shlex.quote(str(item))}", "flag") for item in items)
        else:
            where = option.flag if option.is_bool else f"{_as(option, 'flag')}{shlex.quote(str(value))}".strip()
            values[key] = _check(option, value, where, "flag")
        origins[key] = Origin("flag", option.label)
    return values, origins


def _build(values: Mapping[str, object], origins: Mapping[str, Origin], *, directory: Path,
           location: Origin | None, target: bool = True) -> InterceptSpec:
    """Defaults, derived defaults and the checks that involve several options (``target``:
    a SERVICE or an agent is required, as for everything that intercepts)."""
    v = {o.key: o.default for o in OPTIONS}
    v.update(values)
    medium: Medium = location.medium if location is not None else "flag"
    lead = f"{location.label}: " if location is not None else ""

    def said(key: str) -> str:
        origin = origins.get(key)
        if origin is None:
            return _BY_KEY[key].label if medium == "flag" else key
        if origin.medium == "file":
            return f"{key} ({origin.label})"
        return origin.label

    def medium_of(key: str) -> Medium:
        origin = origins.get(key)
        return origin.medium if origin is not None else medium

    def fail(message: str, key: str) -> SpecError:
        return SpecError(lead + message, key=key,
                         path=location.path if location else None, line=location.line if location else None)

    if target and not v["service"] and not v["agent"]:
        service, agent = _BY_KEY["service"], _BY_KEY["agent"]
        if medium == "file":
            fix = f"add {_example(service, 'file')} (a Kubernetes Service) or {_example(agent, 'file')} (direct mode)"
        else:
            fix = f"give a SERVICE (intercept start {service.example}) or {_example(agent, 'flag')} (direct mode)"
        raise fail(f"nothing to intercept: {fix}", "service")
    if v["agent"] and not v["credentials"]:
        raise fail(f"{said('agent')} needs the agent's credentials file; add {_example(_BY_KEY['credentials'], medium_of('agent'))}",
                   "credentials")
    rule_key = next((k for k in _RULE_KEYS if v[k]), None)
    if v["all"] and rule_key is not None:
        raise fail(f"{said('all')} takes every request, but {said(rule_key)} sets a rule; drop one of them", "all")
    if v["replace"] and rule_key is not None:
        raise fail(f"{said('replace')} takes every request, but {said(rule_key)} sets a rule; drop one of them", "replace")
    if v["replace"] and v["mirror"]:
        raise fail(f"{said('replace')} takes every request from the app and stops it, but {said('mirror')} leaves the "
                   f"requests to the app and copies them to you; drop one of them", "mirror")
    if v["replace"] and v["agent"]:
        raise fail(f"{said('replace')} stops the app container of a workload in Kubernetes, but {said('agent')} names "
                   "an agent directly; name the Service (or deployment/NAME) instead", "replace")
    if v["service"] and "/" in v["service"] and not v["replace"]:
        raise fail(f"{v['service']} names a workload, which has no Service whose requests to take; add "
                   f"{_example(_BY_KEY['replace'], medium_of('service'))} to run COMMAND in its place, or name a Service",
                   "service")
    if v["debug"] and not v["command"]:
        raise fail(f"{said('debug')} runs the local command under debugpy, but no command is given; "
                   f"add one, e.g. {_example(_BY_KEY['command'], medium_of('debug'))}", "debug")
    if v["debug_wait"] and not v["debug"]:
        raise fail(f"{said('debug_wait')} waits for a debugger, which needs debug; "
                   f"add {_example(_BY_KEY['debug'], medium_of('debug_wait'))}, or drop {said('debug_wait')}", "debug_wait")
    _check_ports(v, said, medium_of, fail)
    if v["debug"] and v["debug_port"] in {p.local_port for p in v["port"]}:
        raise fail(f"{said('debug_port')} {v['debug_port']} is also the local port ({said('port')}); "
                   f"give the debugger another port, e.g. {_example(_BY_KEY['debug_port'], medium_of('debug_port'))}", "debug_port")
    fence_key = next((k for k in ("outbound_allow", "outbound_deny") if v[k]), None)
    if v["no_outbound"] and fence_key is not None:
        raise fail(f"{said(fence_key)} fences outbound connections, but {said('no_outbound')} turns them off; drop one of them",
                   fence_key)
    if "mount_mode" in values and v["mount"] is None:
        raise fail(f"{said('mount_mode')} says how to bring the pod's files, but they are not asked for; "
                   f"add {_example(_BY_KEY['mount'], medium_of('mount_mode'))}, or drop {said('mount_mode')}", "mount_mode")
    if "watch" in values and not v["command"] and not v["no_watch"]:
        raise fail(f"{said('watch')} restarts the local command on changes, but no command is given; "
                   f"add one, e.g. {_example(_BY_KEY['command'], medium_of('watch'))}, or drop {said('watch')}", "watch")

    if v["no_watch"]:
        v["watch"] = ()
    elif "watch" not in values:
        v["watch"] = (directory,) if v["command"] else ()
    return InterceptSpec(**v, directory=directory, origins=MappingProxyType(dict(origins)), location=location)  # type: ignore[arg-type]


def _check_ports(v: dict[str, object], said: Callable[[str], str], medium_of: Callable[[str], Medium],
                 fail: Callable[[str, str], SpecError]) -> None:
    """Several ``port``s name each their Service port, once; no local port twice; in direct
    mode a Service port is a number (there is no Service to name it)."""
    ports: tuple[Port, ...] = v["port"]  # type: ignore[assignment]
    example = _written(_BY_KEY["port"], medium_of("port"), ["http:3000", "grpc:5000"])
    if len(ports) > 1:
        bare = [p for p in ports if p.service_port is None]
        if bare:
            raise fail(f"{said('port')} {bare[0]}: with several ports, name the Service port each one takes "
                       f"(SERVICE_PORT:LOCAL_PORT), e.g. {example}", "port")
    if v["service_port"] is not None and all(p.service_port is not None for p in ports):
        raise fail(f"{said('service_port')} picks the Service port of a {said('port')} without one, but each names "
                   f"its own; drop {said('service_port')}", "service_port")
    seen: dict[object, Port] = {}
    for p in ports:
        for key, what in ((("local", p.local_port), "local port"), (("service", p.service_port), "Service port")):
            if key[1] is None:
                continue
            other = seen.get(key)
            if other is not None:
                raise fail(f"{said('port')} {other} and {p}: the {what} {key[1]} twice; give each "
                           f"{'Service port its own local port' if what == 'local port' else 'Service port once'}, "
                           f"e.g. {example}", "port")
            seen[key] = p
    if v["service"] and "/" in v["service"]:
        named = next((p for p in ports if p.service_port is not None), None)
        if named is not None:
            raise fail(f"{said('port')} {named}: {v['service']} is a workload with no Service, whose port "
                       f"{named.service_port} nobody sends requests to; give only the LOCAL_PORT, e.g. "
                       f"{_written(_BY_KEY['port'], medium_of('port'), ['8080'])}", "port")
    if v["agent"] and not v["service"]:
        named = next((p for p in ports if isinstance(p.service_port, str)), None)
        if named is not None:
            raise fail(f"{said('port')} {named}: in direct mode ({said('agent')}) there is no Service to name the "
                       f"port {named.service_port!r}; write the number of the app's port the agent forwards to, "
                       f"e.g. {_written(_BY_KEY['port'], medium_of('port'), ['8080:3000', '9090:5000'])}", "port")


def merge(base: InterceptSpec | None, env: Mapping[str, str], flags: Mapping[str, object], *,
          target: bool = True) -> InterceptSpec:
    """One intercept from its three spellings: ``base`` (from a file, or ``None``) < ``env`` < ``flags``.

    ``env`` is the process environment (only the ``INTERCEPT_*`` names of
    :data:`OPTIONS` are read; others are ignored). ``flags`` maps option keys
    (``"port"``, ``"headers"``, ``"command"``, ...) to the values of the flags the user
    actually gave: a ``None`` value or an empty list counts as not given. Values may be
    strings or already typed (click's ints, Paths, tuples). A list replaces, never
    extends, a lower layer's list. Raises :class:`SpecError` (exit code 2) naming the
    spelling at fault and the fix; ``ValueError`` for a key that is no option (a bug).
    ``target=False``: no SERVICE (nor agent) is required, for what intercepts nothing
    (``intercept connect`` without one uses any agent of the namespace).
    """
    values: dict[str, object] = {}
    origins: dict[str, Origin] = {}
    if base is not None:
        for key, origin in base.origins.items():
            values[key] = getattr(base, key)
            origins[key] = origin
    for layer_values, layer_origins in (_from_env(env), _from_flags(flags)):
        values.update(layer_values)
        origins.update(layer_origins)
    return _build(values, origins,
                  directory=base.directory if base is not None else Path("."),
                  location=base.location if base is not None else None, target=target)


def for_service(env: Mapping[str, str], flags: Mapping[str, object], path: Path = Path(DEFAULT_FILE), *,
                target: bool = True) -> InterceptSpec:
    """The intercept ``flags`` name, as every face reads it: flags > ``env`` > the entry of
    its ``service`` in ``path`` (``./intercept.yaml``), when that file exists and has one
    (with the file's top-level defaults) > the built-in defaults. So ``intercept start
    orders``, ``doctor``, ``env``, the MCP tools and ``up`` agree on what ``orders`` is.
    ``target``: as for :func:`merge` (with no SERVICE, no entry of the file applies)."""
    service = flags.get("service") or env.get(_BY_KEY["service"].env)
    base = None
    if service and path.is_file():
        base = next((i for i in load_workspace(path, env).intercepts if i.service == service), None)
    return merge(base, env, flags, target=target)


def options(env: Mapping[str, str], flags: Mapping[str, object], keys: Iterable[str]) -> dict[str, object]:
    """Some options alone, for the commands that are not an intercept (inject, list, uninstall):
    each of ``keys`` from ``flags`` > ``env`` > its default, every value validated as
    :func:`merge` validates it, without the checks that need a whole intercept."""
    keys = tuple(keys)
    names = {_BY_KEY[key].env for key in keys}
    from_env, _ = _from_env({name: value for name, value in env.items() if name in names})
    from_flags, _ = _from_flags({key: value for key, value in flags.items() if key in keys})
    return {key: from_flags.get(key, from_env.get(key, _BY_KEY[key].default)) for key in keys}


def to_args(spec: InterceptSpec, *, skip: Iterable[str] = ()) -> list[str]:
    """The ``intercept start`` arguments that spell the options ``spec`` sets (defaults
    left out): SERVICE first, ``-- COMMAND`` last. ``merge(None, {}, flags)`` of these
    arguments, parsed, gives ``spec`` back (relative paths of a file were made absolute).
    ``skip`` leaves options out, e.g. those a VS Code task sets itself.
    """
    skipped = set(skip)
    args: list[str] = []
    tail: list[str] = []
    for option in OPTIONS:
        value = getattr(spec, option.key)
        if option.key in skipped or option.key not in spec.origins or value in (None, (), False):
            continue
        if option.flag == "SERVICE":
            args.insert(0, str(value))
        elif option.flag == "--":
            tail = ["--", *value]
        elif option.is_bool or value is True and option.flag_value is not None:
            args.append(option.flag)
        elif option.multiple:
            for item in value:
                args += [option.flag, str(item)]
        else:
            args += [option.flag, str(value)]
    return args + tail


def resolve_workspace(workspace: WorkspaceSpec, env: Mapping[str, str], flags: Mapping[str, object]) -> WorkspaceSpec:
    """Every intercept of ``workspace`` merged with ``env`` and ``flags`` (each applies to every intercept)."""
    intercepts = tuple(merge(spec, env, flags) for spec in workspace.intercepts)
    _check_together(intercepts)
    return replace(workspace, intercepts=intercepts)


def _check_together(intercepts: tuple[InterceptSpec, ...]) -> None:
    """Local listeners of different intercepts must not collide."""
    taken: dict[int, InterceptSpec] = {}  # port -> the intercept listening there
    for spec in intercepts:
        wants = []
        if spec.command:
            wants += [("port", p.local_port) for p in spec.port]
        if spec.debug:
            wants.append(("debug_port", spec.debug_port))
        for key, port in wants:
            other = taken.get(port)
            if other is not None:
                here = spec.location.label if spec.location else "an intercept"
                there = other.location.label if other.location else "another intercept"
                raise SpecError(
                    f"{here}: {key} {port} is already used by {there}; two local processes cannot listen on one port: "
                    f"give each intercept its own port and debug_port",
                    path=spec.location.path if spec.location else None,
                    line=spec.location.line if spec.location else None, key=key)
            taken[port] = spec


# --- the file ------------------------------------------------------------------------


class _Document:
    """One parsed ``intercept.yaml``: node walking with line numbers, and its errors."""

    def __init__(self, loader: yaml.SafeLoader, name: str, directory: Path) -> None:
        self.loader = loader
        self.name = name
        self.directory = directory

    def line(self, node: yaml.Node) -> int:
        return node.start_mark.line + 1

    def error(self, node: yaml.Node | int, message: str, key: str | None = None) -> SpecError:
        line = node if isinstance(node, int) else self.line(node)
        return SpecError(f"{self.name}:{line}: {message}", path=self.name, line=line, key=key)

    def origin(self, node: yaml.Node) -> Origin:
        return Origin("file", f"{self.name}:{self.line(node)}", self.name, self.line(node))

    def pairs(self, node: yaml.Node, where: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """The mapping's (key, key node, value node), refusing duplicate and non-text keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{where}: expected a mapping of keys to values, got {self.kind(node)}")
        seen: dict[str, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(key_node, f"{where}: a key must be text")
            if key_node.value in seen:
                raise self.error(key_node, f"duplicate key {key_node.value!r} in {where} "
                                           f"(first at line {self.line(seen[key_node.value])}); keep one", key_node.value)
            seen[key_node.value] = key_node
        self.loader.flatten_mapping(node)  # YAML merge keys ("<<: *defaults"); later keys win
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            result[key_node.value] = (key_node, value_node)
        return [(k, kn, vn) for k, (kn, vn) in result.items()]

    @staticmethod
    def kind(node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        return repr(node.value)

    def scalar(self, option: Option, node: yaml.ScalarNode) -> object:
        return node.value if option.verbatim else self.loader.construct_object(node, deep=True)

    def value(self, option: Option, node: yaml.Node, where: str) -> object:
        """One option's value from its node, typed and checked, relative paths resolved."""
        at = f"{where}.{option.key}"
        if option.multiple:
            if isinstance(node, yaml.ScalarNode) and option.words:
                try:
                    words = shlex.split(node.value)
                except ValueError as error:
                    raise self.error(node, f"{at} {node.value!r}: {error}; a string is split like shell words; "
                                           f"or write a list, e.g. {_example(option, 'file')}", option.key) from None
                items = [(self.line(node), f"{at} {node.value!r}", word) for word in words]
            elif isinstance(node, yaml.ScalarNode):  # one item
                items = [(self.line(node), f"{at} {node.value!r}", self.scalar(option, node))]
            elif isinstance(node, yaml.SequenceNode):
                items = []
                for i, item in enumerate(node.value):
                    if not isinstance(item, yaml.ScalarNode):
                        raise self.error(item, f"{at}[{i}]: expected one value, got {self.kind(item)}; "
                                               f"{self._mapping_hint(option, item)}", option.key)
                    items.append((self.line(item), f"{at}[{i}] {item.value!r}", self.scalar(option, item)))
            else:
                raise self.error(node, f"{at}: expected a list, got a mapping; {self._mapping_hint(option, node)}", option.key)
            parsed = tuple(_check(option, value, f"{self.name}:{line}: {label}", "file", path=self.name, line=line)
                           for line, label, value in items)
            return tuple(self.resolve(p) for p in parsed) if option.path else parsed
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, f"{at}: expected one value, got {self.kind(node)}; e.g. {_example(option, 'file')}", option.key)
        line = self.line(node)
        value = _check(option, self.scalar(option, node), f"{self.name}:{line}: {at} {node.value!r}", "file",
                       path=self.name, line=line)
        return self.resolve(value) if option.path else value  # type: ignore[arg-type]

    def _mapping_hint(self, option: Option, node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode) and len(node.value) == 1 and option.key in ("headers", "header_regexes"):
            k, v = node.value[0]
            if isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode):
                return f"write NAME=VALUE, not NAME: VALUE, e.g. {option.key}: [{k.value}={v.value}]"
        return f"e.g. {_example(option, 'file')}"

    def resolve(self, path: object) -> object:
        if not isinstance(path, Path):  # mount: true
            return path
        return path if path.is_absolute() else self.directory / path

    def options(self, node: yaml.Node, where: str, allowed: Iterable[str]) -> tuple[dict[str, object], dict[str, Origin]]:
        """The options of one mapping (an intercept, or the top level's defaults)."""
        allowed = set(allowed)
        values: dict[str, object] = {}
        origins: dict[str, Origin] = {}
        for key, key_node, value_node in self.pairs(node, where):
            if key not in allowed:
                raise self.error(key_node, self.unknown(key, where, allowed), key)
            if value_node.tag == "tag:yaml.org,2002:null":
                continue
            option = _BY_KEY[key]
            values[key] = self.value(option, value_node, where)
            origins[key] = self.origin(key_node)
        return values, origins

    @staticmethod
    def unknown(key: str, where: str, allowed: set[str]) -> str:
        message = f"unknown key {key!r} in {where}"
        if where == "the top level" and key in _BY_KEY:
            return f"{message}; {key!r} is an option of one intercept: move it under intercepts"
        spelled = _ALIASES.get(key) or _ALIASES.get(key.lower())
        if spelled is None:
            close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
            spelled = close[0] if close else None
        if spelled in allowed:
            return f"{message}; did you mean {spelled!r}?"
        if spelled is not None and where == "the top level":
            return f"{message}; {spelled!r} is an option of one intercept: move it under intercepts"
        return f"{message}; the keys are: {', '.join(k for k in _KEY_ORDER if k in allowed)}"


_KEY_ORDER = ("version", "intercepts", *(o.key for o in OPTIONS))
# Other spellings users reach for: the flag ("header-regex", "--port"), the variable,
# kebab-case and the singular/plural form.
_ALIASES: dict[str, str] = {}
for _option in OPTIONS:
    for _alias in (_option.flag.lstrip("-"), _option.flag, _option.env, _option.env.lower(),
                   _option.key.replace("_", "-"), _option.key.rstrip("s"), _option.key.removesuffix("es")):
        if _alias and _alias not in _BY_KEY:
            _ALIASES.setdefault(_alias, _option.key)
_ALIASES.update({"SERVICE": "service", "COMMAND": "command", "--": "command", "cmd": "command",
                 "ns": "namespace", "args": "command", "local_port": "port", "local-port": "port"})
del _option, _alias


def parse_workspace(text: str, *, name: str, directory: Path, env: Mapping[str, str]) -> WorkspaceSpec:
    """An ``intercept.yaml`` from its text: ``name`` is how errors name the file,
    ``directory`` what relative paths in it are relative to. ``env`` is applied on top
    of every intercept (see :func:`merge`). Raises :class:`SpecError` with file and line.
    """
    loader = yaml.SafeLoader(text)
    try:
        return _read_workspace(_Document(loader, name, directory), env)
    except yaml.MarkedYAMLError as error:  # syntax, or a bad merge key ("<<: 1")
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = error.problem or error.context or "not valid YAML"
        raise SpecError(f"{name}:{line}: not valid YAML: {problem}; fix the syntax at that line", path=name, line=line) from None
    except yaml.YAMLError as error:
        raise SpecError(f"{name}: not valid YAML: {error}", path=name) from None
    finally:
        loader.dispose()


def _read_workspace(doc: _Document, env: Mapping[str, str]) -> WorkspaceSpec:
    name, loader = doc.name, doc.loader
    root = loader.get_single_node()
    if root is None:
        raise doc.error(1, f"the file is empty; start it with version: {SPEC_VERSION} and intercepts: (see docs/intercept-yaml.md)")
    top: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key, key_node, value_node in doc.pairs(root, "the top level"):
        if key.startswith("x-"):
            continue  # extension keys: a place for YAML anchors, ignored
        if key not in TOP_LEVEL_KEYS:
            raise doc.error(key_node, doc.unknown(key, "the top level", set(TOP_LEVEL_KEYS)), key)
        top[key] = (key_node, value_node)

    if "version" not in top:
        raise doc.error(root, f"missing 'version'; add version: {SPEC_VERSION} as the first line", "version")
    version_node = top["version"][1]
    version = loader.construct_object(version_node, deep=True)
    if version != SPEC_VERSION or isinstance(version, bool):
        raise doc.error(version_node, f"version {_shown(version)} is not supported; "
                                      f"this intercept reads version: {SPEC_VERSION}", "version")

    defaults_node = yaml.MappingNode("tag:yaml.org,2002:map",
                                     [(kn, vn) for k, (kn, vn) in top.items() if k not in ("version", "intercepts")],
                                     start_mark=root.start_mark, end_mark=root.end_mark)
    top_values, top_origins = doc.options(defaults_node, "the top level", (o.key for o in OPTIONS if o.top_level))

    example = "e.g. intercepts: [{service: orders, command: [python, app.py]}]"
    if "intercepts" not in top:
        raise doc.error(root, f"missing 'intercepts'; add a list with one entry per intercept, {example}", "intercepts")
    list_node = top["intercepts"][1]
    if not isinstance(list_node, yaml.SequenceNode) or not list_node.value:
        raise doc.error(list_node, f"intercepts: expected a list with one entry per intercept, {example}", "intercepts")
    env_values, env_origins = _from_env(env)
    intercepts = []
    for i, node in enumerate(list_node.value):
        where = f"intercepts[{i}]"
        own_values, own_origins = doc.options(node, where, _BY_KEY)
        values = {**top_values, **own_values, **env_values}
        origins = {**top_origins, **own_origins, **env_origins}
        location = Origin("file", f"{name}:{doc.line(node)}: {where}", name, doc.line(node))
        intercepts.append(_build(values, origins, directory=doc.directory, location=location))
    result = tuple(intercepts)
    _check_together(result)
    return WorkspaceSpec(path=Path(name), intercepts=result, version=SPEC_VERSION,
                         **{k: top_values.get(k) for k in ("namespace", "context", "kubeconfig", "name")})  # type: ignore[arg-type]


def load_workspace(path: Path, env: Mapping[str, str]) -> WorkspaceSpec:
    """Read and validate ``intercept.yaml`` at ``path``, with ``env`` applied (flags come later, in :func:`resolve_workspace`).

    Relative paths in the file are relative to its directory, which becomes each
    intercept's ``directory``. Errors name the file as given, the line, the key and the fix.
    """
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{name}: no such file; write one (see docs/intercept-yaml.md) or name another with -f FILE", path=name) from None
    except UnicodeDecodeError as error:
        raise SpecError(f"{name}: not UTF-8 text ({error.reason}); save it as UTF-8", path=name) from None
    except OSError as error:
        raise SpecError(f"{name}: cannot read it: {error.strerror or error}", path=name) from None
    workspace = parse_workspace(text, name=name, directory=path.absolute().parent, env=env)
    return replace(workspace, path=path)


# --- the reference ----------------------------------------------------------------------

_BEGIN = "<!-- BEGIN options: generated from intercept/spec.py by `python -m intercept.spec docs/intercept-yaml.md`; edit there -->"
_END = "<!-- END options -->"


def _default_text(option: Option) -> str:
    if option.default_doc is not None:
        return option.default_doc
    if isinstance(option.default, bool):
        return f"`{'true' if option.default else 'false'}`"
    return f"`{option.default}`"


def render_reference() -> str:
    """The reference table of every option, as in ``docs/intercept-yaml.md`` (markers included)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [
        _BEGIN,
        "",
        "| key | flag | environment | type | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for o in OPTIONS:
        if o.flag == "SERVICE":
            flag = "`SERVICE` (argument)"
        elif o.flag == "--":
            flag = "`-- COMMAND ARGS...`"
        else:
            flag = f"`{o.short}`, `{o.flag}`" if o.short else f"`{o.flag}`"
            flag += " (repeatable)" if o.multiple else ""
        rows.append(f"| `{o.key}` | {flag} | `{o.env}` | {cell(o.type)} | {cell(_default_text(o))} | {cell(o.help)} |")
    rows += [
        "",
        f"Top level of the file: `version` (required: `{SPEC_VERSION}`), `intercepts` (required: a list of the "
        "options above, one entry per intercept), and defaults for every intercept: "
        + ", ".join(f"`{o.key}`" for o in OPTIONS if o.top_level) + ".",
        "",
        _END,
    ]
    return "\n".join(rows) + "\n"


def update_reference(document: str) -> str:
    """``document`` with its generated block replaced by :func:`render_reference`."""
    start, end = document.find(_BEGIN), document.find(_END)
    if start < 0 or end < start:
        raise ValueError(f"the document has no generated block; add the lines {_BEGIN!r} and {_END!r}")
    rest = document[end + len(_END):]
    return document[:start] + render_reference() + rest.removeprefix("\n")


if __name__ == "__main__":  # pragma: no cover - regenerate the reference in place
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/intercept-yaml.md")
    before = target.read_text(encoding="utf-8")
    after = update_reference(before)
    if after != before:
        target.write_text(after, encoding="utf-8")
