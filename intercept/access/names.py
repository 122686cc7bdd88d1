"""Which names answer where: the cluster's Services, as the local process will reach them (sans-IO).

A :class:`ClusterMap` is fed the Services and EndpointSlices of the namespaces it covers
(list results, then watch events, as dicts) and says, as :class:`Entry` objects, which
local loopback address stands for each Service (and for each named pod of a headless
Service), by which host names, on which TCP ports, and which name the agent dials in
the cluster for it.

Names are those a pod of the home namespace would use: the full name
(``redis.shop.svc.cluster.local``) and every shorter name that the pod's resolver search
path (:class:`Resolver`, from its ``resolv.conf``) completes to it: ``redis``,
``redis.shop``, ``redis.shop.svc`` for the home namespace, ``cache.other``,
``cache.other.svc`` for another. A headless Service's pods with a hostname (a
StatefulSet's) get ``web-0.web.shop.svc.cluster.local`` and its shorter forms.

Invariants:

- An address stays with its Service (or pod) for as long as the map knows it; addresses
  are never reused within one map, so a connection to a Service that is gone never reaches
  another one that came later.
- The agent always dials the full name with a trailing dot (``redis.shop.svc.cluster.local.``),
  so the pod's resolver tries no search suffix first and the fence judges one name.
- Only TCP ports are listed (UDP and SCTP are out of scope).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Obj = Mapping[str, Any]

DEFAULT_DOMAIN = "cluster.local"
DEFAULT_NETWORK = "127.77.0.0/16"  # off 127.0.0.1, where local servers listen


@dataclass(frozen=True)
class Resolver:
    """A pod's resolver configuration: its search path and ``ndots``."""

    search: tuple[str, ...]
    ndots: int = 5

    @classmethod
    def parse(cls, text: str) -> Resolver:
        """Read ``resolv.conf`` text (the last ``search`` or ``domain`` line wins, as in glibc)."""
        search: tuple[str, ...] = ()
        ndots = 1
        for line in text.splitlines():
            words = line.split("#", 1)[0].split(";", 1)[0].split()
            if not words:
                continue
            if words[0] in ("search", "domain"):
                search = tuple(w.lower().rstrip(".") for w in words[1:] if w.strip("."))
            elif words[0] == "options":
                for option in words[1:]:
                    if option.startswith("ndots:") and option[6:].isdigit():
                        ndots = min(int(option[6:]), 15)
        return cls(search, ndots)

    @classmethod
    def for_namespace(cls, namespace: str, domain: str = DEFAULT_DOMAIN) -> Resolver:
        """What kubelet writes for a pod of ``namespace`` (``ClusterFirst``)."""
        return cls((f"{namespace}.svc.{domain}", f"svc.{domain}", domain), 5)

    @property
    def domain(self) -> str:
        """The cluster domain: what follows ``svc.`` in the search path (``cluster.local`` if none)."""
        for entry in self.search:
            if entry.startswith("svc."):
                return entry[4:]
        for entry in self.search:
            head, sep, rest = entry.partition(".svc.")
            if sep and head:
                return rest
        return DEFAULT_DOMAIN

    def names(self, full: str) -> list[str]:
        """``full`` and every shorter name the search path completes to it, shortest first."""
        shorter = {full[: -len(s) - 1] for s in self.search if full.endswith("." + s) and len(full) > len(s) + 1}
        return sorted(shorter, key=lambda n: (n.count("."), n)) + [full]


@dataclass(frozen=True)
class Entry:
    """One local address: the names that resolve to it, and where its connections go.

    ``service`` is ``NAMESPACE/NAME``; ``pod`` the hostname of a headless Service's pod
    (None for the Service itself). ``dial`` is what the agent connects to, from its pod.
    ``cluster_ip`` is the Service's (None when headless, and for pods).
    """

    service: str
    pod: str | None
    address: str
    names: tuple[str, ...]
    dial: str
    ports: tuple[int, ...]
    cluster_ip: str | None = None

    @property
    def full_name(self) -> str:
        return self.names[-1]

    @property
    def namespace(self) -> str:
        return self.service.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.service.split("/", 1)[1]

    def describe(self) -> str:
        return f"{self.names[0]} ({self.address})" if len(self.names) == 1 else f"{self.names[0]} ({self.full_name}, {self.address})"


@dataclass
class _Service:
    spec: Obj
    slices: dict[str, Obj] = field(default_factory=dict)


class ClusterMap:
    """The Services of ``namespaces`` (the first is home: the pod's own), as local entries.

    Feed it with :meth:`replace` (a list result) and :meth:`apply` (a watch event); read
    :meth:`entries`. Both return whether the entries changed.
    """

    def __init__(self, namespaces: Sequence[str], resolver: Resolver | None = None, network: str = DEFAULT_NETWORK,
                 allocate: Callable[[], str] | None = None) -> None:
        if not namespaces:
            raise ValueError("a ClusterMap covers at least one namespace")
        self.namespaces = tuple(dict.fromkeys(namespaces))
        self.resolver = resolver or Resolver.for_namespace(self.namespaces[0])
        self._network = ipaddress.IPv4Network(network)
        self._next = 1
        self._allocate = allocate or self._in_order  # each call a new address (intercept.access.leases: machine-wide)
        self._addresses: dict[tuple[str, ...], str] = {}
        self._services: dict[tuple[str, str], _Service] = {}
        self._orphan_slices: dict[tuple[str, str], dict[str, Obj]] = {}  # slices seen before their Service
        self._entries: list[Entry] = []

    # -- input

    def replace(self, kind: str, namespace: str, objects: Iterable[Obj]) -> bool:
        """The whole current list of ``kind`` (``Service`` or ``EndpointSlice``) in ``namespace``."""
        if kind == "Service":
            keep = {}
            for obj in objects:
                name = _meta(obj, "name")
                old = self._services.get((namespace, name))
                keep[(namespace, name)] = _Service(obj, old.slices if old else self._orphan_slices.pop((namespace, name), {}))
            for key in [k for k in self._services if k[0] == namespace]:
                del self._services[key]
            self._services.update(keep)
        elif kind == "EndpointSlice":
            for key, svc in self._services.items():
                if key[0] == namespace:
                    svc.slices = {}
            self._orphan_slices = {k: v for k, v in self._orphan_slices.items() if k[0] != namespace}
            for obj in objects:
                self._put_slice(namespace, obj)
        else:
            raise ValueError(f"a ClusterMap follows Services and EndpointSlices, not {kind}")
        return self._rebuild()

    def apply(self, event: Obj) -> bool:
        """One watch event (``{"type": ADDED|MODIFIED|DELETED, "object": {...}}``; others are ignored)."""
        obj = event.get("object") or {}
        kind, kind_of_event = obj.get("kind"), event.get("type")
        namespace, name = _meta(obj, "namespace"), _meta(obj, "name")
        if namespace not in self.namespaces or kind_of_event not in ("ADDED", "MODIFIED", "DELETED"):
            return False
        if kind == "Service":
            if kind_of_event == "DELETED":
                self._services.pop((namespace, name), None)
            else:
                old = self._services.get((namespace, name))
                self._services[(namespace, name)] = _Service(
                    obj, old.slices if old else self._orphan_slices.pop((namespace, name), {}))
        elif kind == "EndpointSlice":
            if kind_of_event == "DELETED":
                owner = _slice_service(obj)
                for slices in (getattr(self._services.get((namespace, owner)), "slices", None),
                               self._orphan_slices.get((namespace, owner))):
                    if slices is not None:
                        slices.pop(name, None)
            else:
                self._put_slice(namespace, obj)
        else:
            return False
        return self._rebuild()

    def _put_slice(self, namespace: str, obj: Obj) -> None:
        owner = _slice_service(obj)
        if not owner:
            return
        svc = self._services.get((namespace, owner))
        slices = svc.slices if svc is not None else self._orphan_slices.setdefault((namespace, owner), {})
        slices[_meta(obj, "name")] = obj

    # -- output

    def entries(self) -> list[Entry]:
        """Every local entry, Services before their pods, in a stable order."""
        return list(self._entries)

    def find(self, name: str) -> Entry | None:
        """The entry a host name resolves to (as the hosts file would: exact, case-insensitive)."""
        wanted = name.lower().rstrip(".")
        for entry in self._entries:
            if wanted in entry.names:
                return entry
        return None

    def _rebuild(self) -> bool:
        domain = self.resolver.domain
        entries: list[Entry] = []
        for (namespace, name), svc in sorted(self._services.items(), key=lambda kv: (self.namespaces.index(kv[0][0]), kv[0][1])):
            spec = svc.spec.get("spec") or {}
            kind = spec.get("type") or "ClusterIP"
            ports = _tcp_ports(spec.get("ports"))
            slice_ports = sorted({p for s in svc.slices.values() for p in _tcp_ports(s.get("ports"))})
            cluster_ip = spec.get("clusterIP")
            headless = cluster_ip in (None, "", "None")
            full = f"{name}.{namespace}.svc.{domain}"
            if kind == "ExternalName":
                target = str(spec.get("externalName") or "").rstrip(".")
                if ports and target:
                    dial = target if _is_address(target) else target + "."
                    entries.append(self._entry((namespace, name), None, full, dial, ports, None))
                continue
            all_ports = tuple(sorted(set(ports) | set(slice_ports))) if headless else ports
            if all_ports:
                entries.append(self._entry((namespace, name), None, full, full + ".", all_ports,
                                           None if headless else cluster_ip))
            if headless:
                pod_ports = tuple(sorted(set(ports) | set(slice_ports)))
                for hostname in _hostnames(svc.slices.values()):
                    pod_full = f"{hostname}.{full}"
                    if pod_ports:
                        entries.append(self._entry((namespace, name, hostname), hostname, pod_full, pod_full + ".", pod_ports, None))
        live = {(*e.service.split("/"),) + ((e.pod,) if e.pod else ()) for e in entries}
        for key in [k for k in self._addresses if k not in live]:
            del self._addresses[key]
        changed = entries != self._entries
        self._entries = entries
        return changed

    def _entry(self, key: tuple[str, ...], pod: str | None, full: str, dial: str, ports: tuple[int, ...],
               cluster_ip: str | None) -> Entry:
        address = self._addresses.get(key)
        if address is None:
            address = self._allocate()
            self._addresses[key] = address
        return Entry(f"{key[0]}/{key[1]}", pod, address, tuple(self.resolver.names(full)), dial, ports, cluster_ip)

    def _in_order(self) -> str:
        while True:
            if self._next >= self._network.num_addresses - 1:
                raise OverflowError(f"more Services than local addresses in {self._network}")
            address = self._network[self._next]
            self._next += 1
            if str(address).split(".")[-1] not in ("0", "255"):
                return str(address)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _meta(obj: Obj, key: str) -> str:
    return str((obj.get("metadata") or {}).get(key) or "")


def _slice_service(obj: Obj) -> str:
    return str(((obj.get("metadata") or {}).get("labels") or {}).get("kubernetes.io/service-name") or "")


def _tcp_ports(ports: Any) -> tuple[int, ...]:
    out = []
    for port in ports or []:
        number = port.get("port")
        if (port.get("protocol") or "TCP") == "TCP" and isinstance(number, int) and 0 < number < 65536:
            out.append(number)
    return tuple(sorted(set(out)))


_HOSTNAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _hostnames(slices: Iterable[Obj]) -> list[str]:
    """The hostnames of a headless Service's endpoints (ready or not: DNS publishes
    not-ready ones only with publishNotReadyAddresses, but a name that answers is harmless)."""
    names = set()
    for s in slices:
        for endpoint in s.get("endpoints") or []:
            hostname = endpoint.get("hostname")
            if isinstance(hostname, str) and _HOSTNAME.fullmatch(hostname):
                names.add(hostname)
    return sorted(names)


# --- the files and variables the local process sees ---------------------------------------------


def hosts_lines(entries: Iterable[Entry]) -> str:
    """``ADDRESS NAME ...`` per entry, for a hosts file (each line under glibc's 1024-byte
    limit: an entry with many names takes several lines)."""
    lines = []
    for entry in entries:
        line = entry.address
        for name in entry.names:
            if len(line) + 1 + len(name) > 1000:
                lines.append(line)
                line = entry.address
            line += " " + name
        lines.append(line)
    return "".join(line + "\n" for line in lines)


def with_cluster_names(hosts: bytes, entries: Iterable[Entry]) -> bytes:
    """A private copy of the machine's hosts file with the cluster's names after it
    (local names first: ``localhost`` stays the process's own)."""
    body = hosts if not hosts or hosts.endswith(b"\n") else hosts + b"\n"
    return body + b"# intercept: the cluster's Services, for this process only\n" + hosts_lines(entries).encode("ascii")


def service_variables(env: Mapping[str, str], entries: Iterable[Entry]) -> tuple[dict[str, str], list[str]]:
    """The pod's environment with each Service's link variables (``REDIS_SERVICE_HOST``,
    ``REDIS_PORT``, ``REDIS_PORT_6379_TCP``, ``..._ADDR``) pointed at its local address:
    (the new environment, the names of the variables changed).

    Only a variable of the Service's own prefix whose value carries its ClusterIP is
    changed, so an application's variable that merely looks alike is left alone.
    """
    out = dict(env)
    changed = []
    for entry in entries:
        if entry.pod is not None or entry.cluster_ip is None:
            continue
        for key in _link_keys(env, entry.name.upper().replace("-", "_") + "_", entry.cluster_ip):
            new = re.sub(rf"(?<![\d.]){re.escape(entry.cluster_ip)}(?![\d.])", entry.address, env[key])
            if new != env[key]:
                out[key] = new
                changed.append(key)
    return out, sorted(changed)


def link_variables(env: Mapping[str, str]) -> list[str]:
    """The Service link variables of a pod's environment that carry a Service's ClusterIP
    (those :func:`service_variables` points elsewhere), sorted: for each ``P_SERVICE_HOST``,
    the variables of prefix ``P_`` that :func:`service_variables` would consider."""
    found: set[str] = set()
    for key, value in env.items():
        if key.endswith("_SERVICE_HOST") and _is_address(value):
            found.update(_link_keys(env, key[: -len("SERVICE_HOST")], value))
    return sorted(found)


def _link_keys(env: Mapping[str, str], prefix: str, cluster_ip: str) -> list[str]:
    """The variables of ``prefix`` (``REDIS_``) that Kubernetes sets for a Service and that carry ``cluster_ip``."""
    keys = []
    for key, value in env.items():
        rest = key[len(prefix):] if key.startswith(prefix) else None
        if rest is not None and (rest in ("SERVICE_HOST", "PORT") or rest.startswith("PORT_")) and cluster_ip in value:
            keys.append(key)
    return keys


__all__ = ["ClusterMap", "DEFAULT_DOMAIN", "DEFAULT_NETWORK", "Entry", "Resolver", "hosts_lines", "link_variables",
           "service_variables", "with_cluster_names"]
