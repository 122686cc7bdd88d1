"""A stand-in Kubernetes API server: the REST paths intercept uses, in memory, over real HTTP.

The real ``kubernetes`` client (kubeconfig loading, ``ApiClient``, its REST layer and
urllib3) talks to it exactly as to a cluster, through a kubeconfig that
:meth:`KubeAPI.kubeconfig` writes (bearer-token auth, checked). It is not a cluster: no
scheduler, no defaulting, no validation beyond what is listed here; what it simulates is
what intercept's correctness depends on.

Kept only where a real server cannot produce the fault or the observation on demand (a
watch that answers 410, conflicts on every write, a port-forward dropped or gone silent,
the exact order of the client's requests); each test that uses it says which, beside it.
Everything a real server decides (defaulting, validation, admission, RBAC, real 409s,
rollouts, port-forward through a kubelet) is tested against the real control plane
(``e2e/cluster``, ``tests/test_cluster_*.py``).

What it speaks (namespaced, and across namespaces for LIST):

- ``/api/v1``: services, secrets, pods, events (serviceaccounts, configmaps: stored
  only); ``/apis/apps/v1``: deployments, statefulsets, replicasets;
  ``/apis/networking.k8s.io/v1``: networkpolicies. Not: PATCH (405), subresources
  (``/status``, ``/log``), discovery.
- ``/api/v1/namespaces/NS/pods/NAME/portforward``: the WebSocket port-forward
  (``v4.channel.k8s.io``, :class:`PortForwarder`), relayed to the loopback port a test
  chose for that pod (:meth:`KubeAPI.forward`), as the kubelet relays to the pod's port.
- GET (one object), LIST (``labelSelector`` with ``=``, ``==``, ``!=``, ``in``,
  ``notin``, ``key``, ``!key``; ``fieldSelector`` with dotted paths and ``=``/``!=``),
  POST (409 AlreadyExists), PUT (409 Conflict unless ``metadata.resourceVersion`` is the
  stored one; ``status`` and ``uid``/``creationTimestamp``/``generation`` are the
  server's, as with a status subresource), DELETE (409 when its ``preconditions`` uid or
  resourceVersion is not the stored one), 404 as a Status object.
- ``?watch=true``: chunked JSON lines ``{"type": ADDED|MODIFIED|DELETED|ERROR, "object"}``
  from ``resourceVersion`` (or synthetic ADDED of the current objects without one),
  ending after ``timeoutSeconds``; a version older than the compaction horizon gets an
  ERROR event with a 410 Expired Status (or an HTTP 410, see :meth:`expire_watches`).
- ``resourceVersion`` is one global counter, as etcd's revision; ``metadata.generation``
  starts at 1 and grows when ``spec`` changes (workloads and NetworkPolicies).

The controllers and the kubelet (:class:`Controller`), one step per GET of a workload,
taken before that GET is answered (so a client that waits for a rollout sees it move,
and a test is deterministic: no timers):

- Deployment: observe the new generation; create a pod of the new template (owned by a
  ReplicaSet ``<name>-<hash>`` that the Deployment controls and that carries its
  annotations; the ``deployment.kubernetes.io/revision`` annotation is bumped); delete an
  old pod once every new pod is ready; and so on, never more than one pod over
  ``replicas`` (maxSurge 1, maxUnavailable 0), until all pods are new. A new pod that is
  not ready stops the rollout there. Restoring the old template rolls back the same way.
- StatefulSet (RollingUpdate): replace the highest-ordinal old pod once all are ready;
  with OnDelete, and a bare ReplicaSet: only recreate missing pods, from the current
  template (a client must delete the old ones).
- Pods get an IP (10.244.x.y), a Ready condition and containerStatuses. A container
  whose image is in :attr:`Controller.unpullable` waits in ImagePullBackOff, one in
  :attr:`Controller.crashing` in CrashLoopBackOff, with the Events a kubelet records
  (``Failed``, ``BackOff``, ...). A container whose image is in :attr:`Controller.starting`
  runs but is not ready (its readiness probe does not pass yet) until the test calls
  :meth:`KubeAPI.set_pod_ready`: a rollout waits there, as for a container that takes
  time to start. :attr:`Controller.enabled` ``= False`` freezes them.

Use::

    with KubeAPI() as server:
        server.load(boutique())                        # the shop (Online Boutique's shape), rolled out
        connection = connect(server.kubeconfig(tmp_path / "kubeconfig"))
        ...                                            # intercept.kube.* with connection.api
        assert as_user_sees_it(server.get("Deployment", "default", "frontend")) == ...

Test hooks (all thread-safe; call them from the test while the server runs):

- :meth:`KubeAPI.load` objects (then :meth:`settle` brings every workload to a steady,
  rolled-out state with ready pods); :meth:`get`, :meth:`objects`, :meth:`put`,
  :meth:`remove` work on the store directly.
- :meth:`interfere` — the next N PUTs (of a kind/name) find the object changed by
  another writer (a label added, or your ``mutate``), so they get 409 Conflict.
- :meth:`reject` — the next N writes of a kind are refused as an admission webhook does
  (403 with its message).
- :meth:`add_pod` / :meth:`set_pod_ready` / :meth:`set_pod_ip` / :meth:`remove_pod` —
  pods with given labels, IP and readiness, optionally with an agent container
  (``agent=True``, ``ssh_port=``), for the consumers of ``watch_agent_pods``;
  :meth:`add_event` — an Event about any object.
- :meth:`forward` — where ``pods/NAME/portforward`` goes: the loopback port that stands
  for the pod's ports (a real agent's SSH port, say). A pod that exists but has no port
  gets the kubelet's "connection refused" on the error channel; one that does not exist,
  404. :attr:`portforward` is the :class:`PortForwarder` (``forbidden``, ``forwards``, ``drop``).
- :meth:`wait_for` — block until a condition on the store holds (woken by every change;
  e.g. until the controller has created a pod), instead of polling.
- :meth:`expire_watches` — compact the history: open watches end with a 410 ERROR
  event (``http=True``: they end quietly, and the next watch request from an old
  version gets HTTP 410), so watchers must list again.
- :attr:`requests` — every request as ``(method, path, query)``; :meth:`writes` only
  the POST/PUT/PATCH/DELETE ones.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json
import re
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import parse_qs, parse_qsl, urlsplit

import yaml

Obj = dict[str, Any]
T = TypeVar("T")

TOKEN = "stand-in-token"
AGENT_CONTAINER = "intercept-agent"

# plural -> (apiVersion, kind)
RESOURCES = {
    "services": ("v1", "Service"),
    "secrets": ("v1", "Secret"),
    "pods": ("v1", "Pod"),
    "events": ("v1", "Event"),
    "serviceaccounts": ("v1", "ServiceAccount"),
    "configmaps": ("v1", "ConfigMap"),
    "deployments": ("apps/v1", "Deployment"),
    "statefulsets": ("apps/v1", "StatefulSet"),
    "replicasets": ("apps/v1", "ReplicaSet"),
    "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy"),
}
PLURAL = {kind: plural for plural, (_, kind) in RESOURCES.items()}
GENERATION = {"deployments", "statefulsets", "replicasets", "networkpolicies"}
STATUS = {"deployments", "statefulsets", "replicasets", "pods", "services"}
WORKLOADS = ("deployments", "statefulsets", "replicasets")
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, reason: str, message: str, **details: Any) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details, "code": code}


class ApiStatus(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.status = status_object(code, reason, message, **details)


REVISION = "deployment.kubernetes.io/revision"


def boutique() -> list[Obj]:
    """The shop of ``tests/shop.py`` (Online Boutique's shape): its manifests and its network
    policies, as a fresh list of dicts."""
    from tests import shop

    return shop.manifests() + shop.policies()


def as_user_sees_it(obj: Obj | None) -> Obj | None:
    """``obj`` without what the server and its controllers keep changing (versions, status, revision).

    What remains (uid, creationTimestamp, labels, annotations, spec, data) is what an
    exact restore must give back.
    """
    if obj is None:
        return None
    obj = copy.deepcopy(obj)
    obj.pop("status", None)
    metadata = obj["metadata"]
    for field in ("resourceVersion", "generation", "managedFields"):
        metadata.pop(field, None)
    annotations = metadata.get("annotations")
    if annotations is not None:
        annotations.pop(REVISION, None)
    return obj


# --------------------------------------------------------------------------- selectors


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        terms.append(current.strip())
    return terms


def label_selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    for term in _split_terms(selector or ""):
        if m := re.fullmatch(r"([^\s!=]+)\s+(in|notin)\s+\((.*)\)", term):
            key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",")}
            if op == "in" and labels.get(key) not in values:
                return False
            if op == "notin" and key in labels and labels[key] in values:
                return False
        elif m := re.fullmatch(r"([^\s!=]+)\s*(==|=|!=)\s*(\S*)", term):
            key, op, value = m[1], m[2], m[3]
            if op == "!=":
                if labels.get(key) == value:
                    return False
            elif labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_selector_matches(selector: str | None, obj: Obj) -> bool:
    for term in _split_terms(selector or ""):
        m = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            raise ApiStatus(400, "BadRequest", f"invalid field selector {term!r}")
        node: Any = obj
        for step in m[1].split("."):
            node = node.get(step) if isinstance(node, dict) else None
        value = "" if node is None else str(node)
        if (value == m[3]) == (m[2] == "!="):
            return False
    return True


# --------------------------------------------------------------------------- the controllers


def template_hash(template: Obj) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


class Controller:
    """The Deployment, StatefulSet and ReplicaSet controllers and the kubelet, stepped by the workload's GETs."""

    def __init__(self, api: KubeAPI) -> None:
        self.api = api
        self.unpullable: set[str] = set()  # images that cannot be pulled
        self.crashing: set[str] = set()  # images whose containers crash at start
        self.starting: set[str] = set()  # images whose containers run but are not ready until set_pod_ready
        self.enabled = True  # False: workloads do not move at all (a stuck controller)
        self._ips = itertools.count(10)
        self._names = itertools.count(1)

    # One step; returns whether anything changed. Called with the store lock held.
    def step(self, plural: str, namespace: str, name: str) -> bool:
        if not self.enabled:
            return False
        w = self.api._objects.get((plural, namespace, name))
        if w is None or plural not in WORKLOADS:
            return False
        if any(r.get("controller") and r.get("kind") == "Deployment" for r in w["metadata"].get("ownerReferences", [])):
            return False  # a Deployment's ReplicaSet: the Deployment's step moves its pods
        status = w.setdefault("status", {})
        if status.get("observedGeneration") != w["metadata"]["generation"]:
            status["observedGeneration"] = w["metadata"]["generation"]
            changed = True
        else:
            changed = {"deployments": self._deployment, "statefulsets": self._statefulset,
                       "replicasets": self._replicaset}[plural](w)
        self._write_status(plural, w, force=changed)
        return changed

    def settle(self, limit: int = 1000) -> None:
        for _ in range(limit):
            keys = [k for k in self.api._objects if k[0] in WORKLOADS]
            if not any(self.step(*k) for k in keys):
                return
        raise AssertionError("the stand-in controllers did not settle")

    # ------------------------------------------------------------------ kinds

    def _deployment(self, d: Obj) -> bool:
        ns, h = d["metadata"]["namespace"], template_hash(d["spec"]["template"])
        rs = self._replicaset_for(d, h)
        replicas = d["spec"].get("replicas", 1)
        pods = self._owned_pods(d)
        new = [p for p in pods if p["metadata"]["labels"].get("pod-template-hash") == h]
        old = [p for p in pods if p not in new]
        all_ready = all(_ready(p) for p in new)
        if len(new) < replicas and all_ready and len(pods) <= replicas:  # maxSurge 1
            labels = {**(d["spec"]["template"]["metadata"].get("labels") or {}), "pod-template-hash": h}
            self._create_pod(ns, f"{d['metadata']['name']}-{h[:5]}-{next(self._names)}",
                             d["spec"]["template"], labels, rs)
            return True
        if old and all_ready and len(pods) > replicas:
            self.api._delete("pods", ns, old[0]["metadata"]["name"])
            return True
        if len(new) > replicas:
            self.api._delete("pods", ns, new[-1]["metadata"]["name"])
            return True
        return False

    def _statefulset(self, s: Obj) -> bool:
        ns, name, h = s["metadata"]["namespace"], s["metadata"]["name"], template_hash(s["spec"]["template"])
        replicas = s["spec"].get("replicas", 1)
        pods = {p["metadata"]["name"]: p for p in self._owned_pods(s)}
        labels = {**(s["spec"]["template"]["metadata"].get("labels") or {}),
                  "controller-revision-hash": f"{name}-{h}"}
        for i in range(replicas):
            if f"{name}-{i}" not in pods:
                self._create_pod(ns, f"{name}-{i}", s["spec"]["template"], labels, s)
                return True
        on_delete = (s["spec"].get("updateStrategy") or {}).get("type") == "OnDelete"
        old = [p for p in pods.values() if p["metadata"]["labels"].get("controller-revision-hash") != f"{name}-{h}"]
        if old and not on_delete and all(_ready(p) for p in pods.values()):
            victim = max(old, key=lambda p: int(p["metadata"]["name"].rsplit("-", 1)[1]))
            self.api._delete("pods", ns, victim["metadata"]["name"])
            self._create_pod(ns, victim["metadata"]["name"], s["spec"]["template"], labels, s)
            return True
        return False

    def _replicaset(self, r: Obj) -> bool:
        replicas = r["spec"].get("replicas", 1)
        pods = self._owned_pods(r)
        if len(pods) < replicas:
            labels = dict(r["spec"]["template"]["metadata"].get("labels") or {})
            self._create_pod(r["metadata"]["namespace"], f"{r['metadata']['name']}-{next(self._names)}",
                             r["spec"]["template"], labels, r)
            return True
        return False

    # ------------------------------------------------------------------ pieces

    def _replicaset_for(self, d: Obj, h: str) -> Obj:
        ns, name = d["metadata"]["namespace"], f"{d['metadata']['name']}-{h}"
        existing = self.api._objects.get(("replicasets", ns, name))
        if existing is not None:
            return existing
        revision = int((d["metadata"].get("annotations") or {}).get(REVISION, "0")) + 1
        annotations = {**(d["metadata"].get("annotations") or {}), REVISION: str(revision)}
        d["metadata"]["annotations"] = annotations
        template = copy.deepcopy(d["spec"]["template"])
        template["metadata"]["labels"] = {**template["metadata"].get("labels", {}), "pod-template-hash": h}
        rs = {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": name, "namespace": ns, "labels": template["metadata"]["labels"],
                         "annotations": annotations, "ownerReferences": [_owner(d, controller=True)]},
            "spec": {"replicas": d["spec"].get("replicas", 1),
                     "selector": {"matchLabels": template["metadata"]["labels"]}, "template": template},
            "status": {"replicas": 0, "observedGeneration": 1},
        }
        return self.api._create("replicasets", ns, rs)

    def _owned_pods(self, w: Obj) -> list[Obj]:
        owners = {w["metadata"]["uid"]}
        if w["kind"] == "Deployment":
            owners |= {r["metadata"]["uid"] for r in self.api._list("replicasets", w["metadata"]["namespace"])
                       if any(o["uid"] == w["metadata"]["uid"] for o in r["metadata"].get("ownerReferences", []))}
        return sorted(
            (p for p in self.api._list("pods", w["metadata"]["namespace"])
             if any(o.get("uid") in owners for o in p["metadata"].get("ownerReferences", []))),
            key=lambda p: p["metadata"]["name"],
        )

    def _create_pod(self, ns: str, name: str, template: Obj, labels: dict[str, str], owner: Obj) -> None:
        spec = copy.deepcopy(template["spec"])
        statuses, ready = [], True
        for c in spec["containers"]:
            state: Obj = {"running": {"startedAt": now()}}
            if c.get("image") in self.unpullable:
                state = {"waiting": {"reason": "ImagePullBackOff",
                                     "message": f'Back-off pulling image "{c["image"]}"'}}
            elif c.get("image") in self.crashing:
                state = {"waiting": {"reason": "CrashLoopBackOff",
                                     "message": f"back-off 10s restarting failed container={c['name']} pod={name}"}}
            ok = "running" in state
            started = ok and c.get("image") not in self.starting
            ready = ready and started
            statuses.append({"name": c["name"], "image": c.get("image"), "ready": started,
                             "restartCount": 0 if ok or c.get("image") not in self.crashing else 3,
                             "started": ok, "state": state})
        running = all("running" in s["state"] for s in statuses)
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels,
                         "annotations": copy.deepcopy(template["metadata"].get("annotations") or {}),
                         "ownerReferences": [_owner(owner, controller=True)]},
            "spec": spec,
            "status": self.api.pod_status(next(self._ips), ready, statuses),
        }
        if running:
            pod["status"]["phase"] = "Running"  # a container that runs but is not ready yet
        self.api._create("pods", ns, pod)
        self.api._add_event(ns, pod, "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to stand-in-node")
        for c in spec["containers"]:
            image = c.get("image")
            if image in self.unpullable:
                self.api._add_event(ns, pod, "Normal", "Pulling", f'Pulling image "{image}"')
                self.api._add_event(ns, pod, "Warning", "Failed",
                                    f'Failed to pull image "{image}": rpc error: code = NotFound desc = '
                                    f'failed to pull and unpack image "{image}": not found')
                self.api._add_event(ns, pod, "Warning", "Failed", "Error: ErrImagePull")
                self.api._add_event(ns, pod, "Normal", "BackOff", f'Back-off pulling image "{image}"', count=3)
            elif image in self.crashing:
                self.api._add_event(ns, pod, "Warning", "BackOff",
                                    f"Back-off restarting failed container {c['name']} in pod {name}", count=3)

    def _write_status(self, plural: str, w: Obj, force: bool) -> None:
        pods = self._owned_pods(w)
        template = w["spec"]["template"]
        h = template_hash(template)
        if plural == "deployments":
            new = [p for p in pods if p["metadata"]["labels"].get("pod-template-hash") == h]
        elif plural == "statefulsets":
            new = [p for p in pods if p["metadata"]["labels"].get("controller-revision-hash") == f"{w['metadata']['name']}-{h}"]
        else:
            new = pods
        ready = sum(1 for p in pods if _ready(p))
        before = copy.deepcopy(w["status"])
        status = w["status"]
        status.update(replicas=len(pods), readyReplicas=ready, availableReplicas=ready, updatedReplicas=len(new))
        if plural == "statefulsets":
            revision = f"{w['metadata']['name']}-{h}"
            status["updateRevision"] = revision
            status["currentReplicas"] = len(new)
            if len(new) == len(pods) and len(pods) >= w["spec"].get("replicas", 1):
                status["currentRevision"] = revision
            status.setdefault("currentRevision", revision)
        if plural == "replicasets":
            status["fullyLabeledReplicas"] = len(pods)
        if force or status != before:
            self.api._touch(plural, w)


def _ready(pod: Obj) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def _owner(obj: Obj, controller: bool) -> Obj:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": controller, "blockOwnerDeletion": True}


# --------------------------------------------------------------------------- the server


class KubeAPI:
    """The stand-in API server; ``with KubeAPI() as api:`` runs it on 127.0.0.1 in a thread."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._objects: dict[tuple[str, str, str], Obj] = {}
        self._history: list[tuple[int, str, str, str, Obj]] = []  # (rv, type, plural, namespace, object)
        self._rv = 100
        self._horizon = 0  # watches from older versions are expired
        self._expired_http = False
        self._epoch = 0  # bumped by expire_watches: open watches end with 410
        self._interference: list[tuple[str | None, str | None, Callable[[Obj], None] | None]] = []
        self._rejections: list[tuple[str, int, str]] = []
        self._closing = False
        self.controller = Controller(self)
        self.portforward = PortForwarder(self._pod_exists)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> KubeAPI:
        api = self

        class Handler(_Handler):
            server_api = api

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="kubeapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.portforward.close()

    def __enter__(self) -> KubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str | None = "default", context: str = "stand-in") -> Path:
        """Write a kubeconfig whose current context reaches this server (token auth)."""
        ctx: Obj = {"cluster": "stand-in", "user": "developer"}
        if namespace:
            ctx["namespace"] = namespace
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "developer", "user": {"token": TOKEN}}],
            "contexts": [{"name": context, "context": ctx}],
        }))
        return path

    # ------------------------------------------------------------------ direct access for tests

    def load(self, objects: Iterable[Obj], namespace: str = "default", settle: bool = True) -> None:
        """Create ``objects`` (in ``namespace`` unless they name one); then roll every workload out."""
        with self._lock:
            for obj in objects:
                obj = copy.deepcopy(obj)
                ns = obj.setdefault("metadata", {}).setdefault("namespace", namespace)
                self._create(PLURAL[obj["kind"]], ns, obj)
            if settle:
                self.controller.settle()

    def settle(self) -> None:
        with self._lock:
            self.controller.settle()

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        with self._lock:
            obj = self._objects.get((PLURAL[kind], namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind: str, namespace: str | None = None) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(o) for o in self._list(PLURAL[kind], namespace)]

    def put(self, obj: Obj) -> Obj:
        """Store ``obj`` as another writer would (no resourceVersion check); returns the stored copy."""
        with self._lock:
            plural, ns = PLURAL[obj["kind"]], obj["metadata"]["namespace"]
            key = (plural, ns, obj["metadata"]["name"])
            if key in self._objects:
                obj = copy.deepcopy(obj)
                obj["metadata"]["resourceVersion"] = self._objects[key]["metadata"]["resourceVersion"]
                return copy.deepcopy(self._replace(plural, ns, obj, keep_status=False))
            return copy.deepcopy(self._create(plural, ns, copy.deepcopy(obj)))

    def remove(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._delete(PLURAL[kind], namespace, name)

    def writes(self) -> list[tuple[str, str]]:
        """The (method, path) of every write request received so far."""
        return [(m, p) for m, p, _ in self.requests if m in WRITES]

    # ------------------------------------------------------------------ hooks

    def interfere(self, times: int = 1, kind: str | None = None, name: str | None = None,
                  mutate: Callable[[Obj], None] | None = None) -> None:
        """The next ``times`` PUTs (of ``kind``/``name``) meet a concurrent change: 409 Conflict.

        The stored object is changed first (``mutate``, default: a label
        ``other-writer: "<n>"``), so the client must read it again and keep that change.
        """
        with self._lock:
            self._interference += [(kind, name, mutate)] * times

    def reject(self, kind: str, message: str = "denied by policy", times: int = 1, code: int = 403) -> None:
        """The next ``times`` creates/updates of ``kind`` are refused as an admission webhook does."""
        with self._lock:
            self._rejections += [(kind, code, message)] * times

    def expire_watches(self, http: bool = False) -> None:
        """Compact: every version so far is too old. Open watches get a 410 ERROR event and end.

        ``http=True``: open watches just end (as when the API server restarts), and a
        watch request from an old version is answered HTTP 410 instead of with an ERROR
        event (both happen in real clusters).
        """
        with self._lock:
            self._horizon = self._rv + 1
            self._expired_http = http
            self._epoch += 1
            self._changed.notify_all()

    def pod_status(self, ip_index: int | None, ready: bool, statuses: list[Obj]) -> Obj:
        ip = None if ip_index is None else f"10.244.{ip_index // 250}.{ip_index % 250 + 2}"
        status: Obj = {
            "phase": "Running" if ready else "Pending",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"},
                           {"type": "ContainersReady", "status": "True" if ready else "False"}],
            "containerStatuses": statuses,
        }
        if ip:
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        return status

    def add_pod(self, name: str, labels: dict[str, str], *, namespace: str = "default", ip: str | None = "auto",
                ready: bool = True, agent: bool = True, ssh_port: int = 9922, http_port: int = 9900) -> Obj:
        """A pod with an app container and (``agent=True``) an agent container serving SSH on ``ssh_port``."""
        containers = [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}]}]
        if agent:
            containers.append({
                "name": AGENT_CONTAINER, "image": "example/agent:1",
                "ports": [{"name": "intercept-http", "containerPort": http_port},
                          {"name": "intercept-ssh", "containerPort": ssh_port}],
                "env": [{"name": "INTERCEPT_LISTEN", "value": f"0.0.0.0:{http_port}"},
                        {"name": "INTERCEPT_SSH_LISTEN", "value": f"0.0.0.0:{ssh_port}"}],
            })
        with self._lock:
            statuses = [{"name": c["name"], "image": c["image"], "ready": ready, "restartCount": 0,
                         "state": {"running": {}} if ready else {"waiting": {"reason": "ContainerCreating"}}}
                        for c in containers]
            status = self.pod_status(next(self.controller._ips) if ip == "auto" else None, ready, statuses)
            if ip and ip != "auto":
                status.update(podIP=ip, podIPs=[{"ip": ip}])
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
                   "spec": {"containers": containers}, "status": status}
            return copy.deepcopy(self._create("pods", namespace, pod))

    def set_pod_ready(self, name: str, ready: bool, namespace: str = "default") -> None:
        with self._lock:
            pod = self._objects[("pods", namespace, name)]
            flag = "True" if ready else "False"
            pod["status"]["phase"] = "Running" if ready else "Pending"
            for condition in pod["status"]["conditions"]:
                condition["status"] = flag
            for container in pod["status"].get("containerStatuses", []):
                container["ready"] = ready
            self._touch("pods", pod)

    def set_pod_ip(self, name: str, ip: str | None, namespace: str = "default") -> None:
        with self._lock:
            pod = self._objects[("pods", namespace, name)]
            pod["status"].pop("podIP", None)
            pod["status"].pop("podIPs", None)
            if ip:
                pod["status"].update(podIP=ip, podIPs=[{"ip": ip}])
            self._touch("pods", pod)

    def remove_pod(self, name: str, namespace: str = "default") -> None:
        self.remove("Pod", namespace, name)

    def add_event(self, about: Obj, type_: str, reason: str, message: str, count: int = 1) -> None:
        with self._lock:
            self._add_event(about["metadata"]["namespace"], about, type_, reason, message, count)

    def forward(self, pod: str, port: int | None, namespace: str = "default") -> None:
        """Port-forwards to pod ``namespace/pod`` (whichever pod port they ask for) reach 127.0.0.1:``port``.

        ``None``: nothing listens in that pod any more (the kubelet's "connection refused").
        The pod itself must exist in the store when the forward is opened (else 404).
        """
        with self.portforward.lock:
            if port is None:
                self.portforward.pods.pop(f"{namespace}/{pod}", None)
            else:
                self.portforward.pods[f"{namespace}/{pod}"] = port

    def wait_for(self, condition: Callable[[], T], timeout: float = 30.0, what: str = "the condition") -> T:
        """Block until ``condition()`` returns something truthy, and return it.

        It is called with the store lock held, now and after every change to the store
        (a request, a controller step, a hook), so it may call :meth:`get` and
        :meth:`objects`; it must not block.
        """
        with self._changed:
            result = self._changed.wait_for(condition, timeout)
        if not result:
            raise AssertionError(f"stand-in API server: {what} did not happen within {timeout:g}s")
        return result

    def _pod_exists(self, namespace: str, name: str) -> bool:
        with self._lock:
            return ("pods", namespace, name) in self._objects

    # ------------------------------------------------------------------ the store (lock held)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, type_: str, plural: str, ns: str, obj: Obj) -> None:
        self._history.append((self._rv, type_, plural, ns, copy.deepcopy(obj)))
        self._changed.notify_all()

    def _list(self, plural: str, ns: str | None) -> list[Obj]:
        return [o for (p, n, _), o in sorted(self._objects.items()) if p == plural and (ns is None or n == ns)]

    def _create(self, plural: str, ns: str, obj: Obj) -> Obj:
        md = obj.setdefault("metadata", {})
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + uuid.uuid4().hex[:5]
        key = (plural, ns, md.get("name", ""))
        if key in self._objects:
            raise ApiStatus(409, "AlreadyExists", f'{plural} "{key[2]}" already exists',
                            name=key[2], kind=plural)
        api_version, kind = RESOURCES[plural]
        obj["apiVersion"], obj["kind"] = api_version, kind
        md.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now(), resourceVersion=self._next_rv())
        md.pop("deletionTimestamp", None)
        if plural in GENERATION:
            md["generation"] = 1
        self._objects[key] = obj
        self._record("ADDED", plural, ns, obj)
        return obj

    def _replace(self, plural: str, ns: str, obj: Obj, keep_status: bool = True) -> Obj:
        key = (plural, ns, obj["metadata"]["name"])
        stored = self._objects.get(key)
        if stored is None:
            raise ApiStatus(404, "NotFound", f'{plural} "{key[2]}" not found', name=key[2], kind=plural)
        wanted = obj["metadata"].get("resourceVersion")
        if wanted and wanted != stored["metadata"]["resourceVersion"]:
            raise ApiStatus(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{key[2]}": the object '
                            "has been modified; please apply your changes to the latest version and try again",
                            name=key[2], kind=plural)
        new = copy.deepcopy(obj)
        api_version, kind = RESOURCES[plural]
        new["apiVersion"], new["kind"] = api_version, kind
        for field in ("uid", "creationTimestamp", "generation"):
            if field in stored["metadata"]:
                new["metadata"][field] = stored["metadata"][field]
            else:
                new["metadata"].pop(field, None)
        new["metadata"]["namespace"] = ns
        if keep_status and plural in STATUS:
            if "status" in stored:
                new["status"] = copy.deepcopy(stored["status"])
            else:
                new.pop("status", None)
        if plural in GENERATION and new.get("spec") != stored.get("spec"):
            new["metadata"]["generation"] = stored["metadata"]["generation"] + 1
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[key] = new
        self._record("MODIFIED", plural, ns, new)
        return new

    def _touch(self, plural: str, obj: Obj) -> None:
        """Record an in-place change made by the controllers or a hook."""
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._record("MODIFIED", plural, obj["metadata"]["namespace"], obj)

    def _delete(self, plural: str, ns: str, name: str) -> Obj:
        obj = self._objects.pop((plural, ns, name), None)
        if obj is None:
            raise ApiStatus(404, "NotFound", f'{plural} "{name}" not found', name=name, kind=plural)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._record("DELETED", plural, ns, obj)
        if plural in WORKLOADS:  # the garbage collector: what the workload owns goes with it
            uid = obj["metadata"]["uid"]
            for (p, n, other), o in list(self._objects.items()):
                if n == ns and any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", [])):
                    self._delete(p, n, other)
        return obj

    def _add_event(self, ns: str, about: Obj, type_: str, reason: str, message: str, count: int = 1) -> None:
        stamp = now()
        self._create("events", ns, {
            # Named as the kubelet names them (a hex clock), so a LIST returns them in order.
            "metadata": {"name": f"{about['metadata']['name']}.{self._rv + 1:016x}"},
            "involvedObject": {"kind": about["kind"], "name": about["metadata"]["name"], "namespace": ns,
                               "uid": about["metadata"].get("uid"), "apiVersion": about["apiVersion"]},
            "type": type_, "reason": reason, "message": message, "count": count,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "source": {"component": "stand-in"},
        })

    # ------------------------------------------------------------------ requests (called by the handler)

    def handle(self, method: str, plural: str, ns: str | None, name: str | None,
               query: dict[str, str], body: Obj | None) -> Obj:
        with self._lock:
            if method == "GET" and name is not None:
                self.controller.step(plural, ns or "", name)
                obj = self._objects.get((plural, ns or "", name))
                if obj is None:
                    raise ApiStatus(404, "NotFound", f'{plural} "{name}" not found', name=name, kind=plural)
                return copy.deepcopy(obj)
            if method == "GET":
                items = []
                for o in self._list(plural, ns):
                    if label_selector_matches(query.get("labelSelector"), o["metadata"].get("labels") or {}) \
                            and field_selector_matches(query.get("fieldSelector"), o):
                        item = copy.deepcopy(o)
                        del item["apiVersion"], item["kind"]  # as the real server's list items
                        items.append(item)
                api_version, kind = RESOURCES[plural]
                return {"apiVersion": api_version, "kind": f"{kind}List",
                        "metadata": {"resourceVersion": str(self._rv)}, "items": items}
            if ns is None:
                raise ApiStatus(405, "MethodNotAllowed", "writes need a namespace")
            if method in ("POST", "PUT"):
                kind = RESOURCES[plural][1]
                for i, (rk, code, message) in enumerate(self._rejections):
                    if rk == kind:
                        del self._rejections[i]
                        raise ApiStatus(code, "Forbidden",
                                        f'admission webhook "validate.policy.example" denied the request: {message}')
            if method == "POST":
                assert body is not None
                return copy.deepcopy(self._create(plural, ns, copy.deepcopy(body)))
            if method == "PUT":
                assert body is not None and name is not None
                if body.get("metadata", {}).get("name") != name:
                    raise ApiStatus(400, "BadRequest", "the name of the object does not match the name on the URL")
                self._interfere(plural, ns, name)
                return copy.deepcopy(self._replace(plural, ns, body))
            if method == "DELETE":
                assert name is not None
                self._check_preconditions(plural, ns, name, (body or {}).get("preconditions") or {})
                self._delete(plural, ns, name)
                return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": {"name": name, "kind": plural}}
            raise ApiStatus(405, "MethodNotAllowed", f"{method} is not supported by the stand-in")

    def _check_preconditions(self, plural: str, ns: str, name: str, preconditions: Obj) -> None:
        """A DELETE's ``preconditions`` (uid, resourceVersion), as the real server checks them: 409."""
        stored = self._objects.get((plural, ns, name))
        if stored is None:
            return
        for key in ("uid", "resourceVersion"):
            if key in preconditions and preconditions[key] != stored["metadata"].get(key):
                raise ApiStatus(409, "Conflict", f"Operation cannot be fulfilled on {plural} \"{name}\": the "
                                f"{key} in the precondition ({preconditions[key]}) does not match the {key} in record "
                                f"({stored['metadata'].get(key)}). The object might have been modified")

    def _interfere(self, plural: str, ns: str, name: str) -> None:
        kind = RESOURCES[plural][1]
        for i, (k, n, mutate) in enumerate(self._interference):
            if (k is None or k == kind) and (n is None or n == name):
                del self._interference[i]
                stored = self._objects.get((plural, ns, name))
                if stored is None:
                    return
                if mutate is None:
                    stored["metadata"].setdefault("labels", {})["other-writer"] = str(self._rv)
                else:
                    mutate(stored)
                self._touch(plural, stored)
                return

    def watch(self, plural: str, ns: str | None, query: dict[str, str], send: Callable[[Obj], None]) -> None:
        """Stream events until timeoutSeconds, an expiry, or shutdown. Called without the lock."""
        timeout = float(query.get("timeoutSeconds", "300"))
        labels, fields = query.get("labelSelector"), query.get("fieldSelector")

        def matches(p: str, n: str, o: Obj) -> bool:
            return (p == plural and (ns is None or n == ns)
                    and label_selector_matches(labels, o["metadata"].get("labels") or {})
                    and field_selector_matches(fields, o))

        with self._lock:
            version = query.get("resourceVersion") or "0"
            epoch = self._epoch
            if version == "0":
                initial = [{"type": "ADDED", "object": copy.deepcopy(o)}
                           for o in self._list(plural, ns) if matches(plural, o["metadata"]["namespace"], o)]
                position = len(self._history)
            elif int(version) < self._horizon:
                initial = [{"type": "ERROR", "object": status_object(
                    410, "Expired", f"too old resource version: {version} ({self._horizon})")}]
                position = None
            else:
                initial = []
                position = next((i for i, h in enumerate(self._history) if h[0] > int(version)), len(self._history))
        for event in initial:
            send(event)
        if position is None:
            return
        deadline = threading.Event()

        def expire() -> None:
            with self._lock:
                deadline.set()
                self._changed.notify_all()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            while True:
                with self._lock:
                    while (position >= len(self._history) and epoch == self._epoch
                           and not self._closing and not deadline.is_set()):
                        self._changed.wait()
                    if self._closing or deadline.is_set():
                        return
                    if epoch != self._epoch and self._expired_http:
                        return  # the stream just ends; the next request from this version gets HTTP 410
                    if epoch != self._epoch:
                        pending = [{"type": "ERROR", "object": status_object(
                            410, "Expired", "too old resource version: the watch cache was compacted")}]
                    else:
                        pending = [{"type": t, "object": o} for (_, t, p, n, o) in self._history[position:]
                                   if matches(p, n, o)]
                        position = len(self._history)
                for event in pending:
                    send(event)
                if pending and pending[-1]["type"] == "ERROR":
                    return
        finally:
            timer.cancel()

    def watch_refused(self, query: dict[str, str]) -> bool:
        with self._lock:
            version = query.get("resourceVersion") or "0"
            return self._expired_http and version != "0" and int(version) < self._horizon


# --------------------------------------------------------------------------- port-forward


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PORTFORWARD_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/portforward$")


class PortForwarder:
    """The API server's (and kubelet's) side of ``pods/NAME/portforward`` over WebSocket.

    The protocol the kubernetes client speaks (``v4.channel.k8s.io``): binary frames whose
    first byte is the channel, per port a data channel and an error channel, each opened by
    a frame carrying the port number (little-endian). Data is relayed to loopback ports, as
    the kubelet relays to a pod's port. ``pods`` maps "namespace/name" to the loopback port
    that stands for the pod's ports. Every path of a client's transport can be made to run:
    refusal (``forbidden``: 403; a pod that does not exist: 404), a refused pod port (the
    error channel), a forward cut on the client's side (:meth:`drop`), or silently.

    ``exists(namespace, name)`` says whether a pod exists (default: it has a port in
    ``pods``); one that exists without a port gets "connection refused", as from a pod
    where nothing listens. :meth:`serve` answers one request whose head has been read
    (the :class:`KubeAPI` handler); :meth:`serve_connection` reads the head itself.
    """

    def __init__(self, exists: Callable[[str, str], bool] | None = None) -> None:
        self.pods: dict[str, int] = {}
        self.forbidden = False
        self.forwards: list[tuple[str, int]] = []  # (pod, pod port) per forward opened
        self.lock = threading.Lock()
        self._exists = exists or (lambda namespace, name: f"{namespace}/{name}" in self.pods)
        self._open: dict[str, list[Forward]] = {}
        self._stale: list[socket.socket] = []

    def drop(self, pod: str, silently: bool = False) -> None:
        """Cut every open forward to ``pod`` ("namespace/name") on the client's side, as an API server restart does.

        ``silently`` leaves the pod's side of the connection open, as a forward that died
        without a word does: the agent keeps that session until its keepalive gives up
        on it, or until :meth:`release_stale`.
        """
        with self.lock:
            forwards = self._open.pop(pod, [])
            if silently:
                self._stale += [f.upstream for f in forwards]
        for forward in forwards:
            forward.silent = silently
            close(forward.conn, shut_only=True)

    def release_stale(self) -> None:
        """Close the pod's side of the silently dropped forwards."""
        with self.lock:
            stale, self._stale = self._stale, []
        for upstream in stale:
            close(upstream)

    def close(self) -> None:
        """End every forward (both sides)."""
        self.release_stale()
        with self.lock:
            forwards = [f for fs in self._open.values() for f in fs]
            self._open.clear()
        for forward in forwards:
            close(forward.conn, shut_only=True)
            close(forward.upstream)

    def serve_connection(self, conn: socket.socket) -> None:
        """Read a request head from ``conn`` and answer it (blocking, until the forward ends)."""
        reader = conn.makefile("rb")
        try:
            request_line = reader.readline().decode("latin-1")
            headers: dict[str, str] = {}
            while (line := reader.readline().decode("latin-1").strip()):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            target = urlsplit(request_line.split()[1])
            self.serve(conn, reader, target.path, parse_qs(target.query), headers)
        except (OSError, IndexError):
            pass
        finally:
            reader.close()
            close(conn)

    def serve(self, conn: socket.socket, reader: BinaryIO, path: str, query: Mapping[str, list[str]],
              headers: Mapping[str, str]) -> None:
        """Answer the port-forward request ``path?query`` (head read; ``headers`` lower-cased) on ``conn``.

        ``reader`` reads what follows the head on ``conn``. Returns when the forward ends,
        with ``conn`` shut down.
        """
        try:
            m = PORTFORWARD_PATH.match(path)
            if not m:
                return _refuse(conn, 404, "Not Found", "the server could not find the requested resource")
            namespace, name = m[1], m[2]
            pod = f"{namespace}/{name}"
            port = int(query["ports"][0])
            if self.forbidden:
                return _refuse(conn, 403, "Forbidden", f'pods "{name}" is forbidden: cannot create resource "pods/portforward"')
            if not self._exists(namespace, name):
                return _refuse(conn, 404, "Not Found", f'pods "{name}" not found')
            accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + WS_GUID).encode()).digest()).decode()
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n".encode()
            )
            with self.lock:
                self.forwards.append((pod, port))
                local = self.pods.get(pod)
            opening = struct.pack("<H", port)
            send_frame(conn, b"\x00" + opening)
            send_frame(conn, b"\x01" + opening)
            try:
                if local is None:
                    raise ConnectionRefusedError(111, "Connection refused")
                upstream = socket.create_connection(("127.0.0.1", local))
            except OSError as e:
                send_frame(conn, b"\x01" + f"error forwarding port {port} to pod {pod}: dial tcp 127.0.0.1:{port}: "
                           f"{(e.strerror or str(e)).lower()}".encode())
                return
            forward = Forward(conn, reader, upstream)
            with self.lock:
                self._open.setdefault(pod, []).append(forward)
            to_pod = threading.Thread(target=self._to_pod, args=(forward,), name=f"stand-in port-forward {pod}", daemon=True)
            to_pod.start()
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                send_frame(conn, b"\x00" + data)
        except (OSError, ValueError, KeyError):
            pass
        finally:
            close(conn, shut_only=True)

    def _to_pod(self, forward: Forward) -> None:
        try:
            while True:
                opcode, payload = recv_frame(forward.reader)
                if opcode == 8:
                    break
                if opcode == 2 and payload[:1] == b"\x00" and len(payload) > 1:
                    forward.upstream.sendall(payload[1:])
        except (OSError, EOFError, ValueError):
            pass
        finally:
            if not forward.silent:
                close(forward.upstream)


class Forward:
    """One open port-forward: the client's WebSocket and the connection to the pod's port."""

    def __init__(self, conn: socket.socket, reader: BinaryIO, upstream: socket.socket) -> None:
        self.conn = conn
        self.reader = reader
        self.upstream = upstream
        self.silent = False


def close(sock: socket.socket, shut_only: bool = False) -> None:
    """Shut down, then close: a thread blocked in recv() on it would otherwise keep it open.

    ``shut_only``: leave the closing to the socket's owner (an HTTP server's handler).
    """
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    if not shut_only:
        sock.close()


def _refuse(conn: socket.socket, code: int, reason: str, message: str) -> None:
    body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}).encode()
    conn.sendall(f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)


def send_frame(conn: socket.socket, payload: bytes, opcode: int = 2) -> None:
    """One unmasked WebSocket frame (the server's side)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    conn.sendall(head + payload)


def recv_exactly(reader: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = reader.read(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def recv_frame(reader: BinaryIO) -> tuple[int, bytes]:
    """One WebSocket frame (masked, as a client sends): (opcode, payload)."""
    b0, b1 = recv_exactly(reader, 2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", recv_exactly(reader, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", recv_exactly(reader, 8))
    mask = recv_exactly(reader, 4) if b1 & 0x80 else b"\0\0\0\0"
    data = recv_exactly(reader, n)
    return b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(data))


_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[\w.]+)/(?P<version>v\w+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?$"
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # a reply leaves in one segment (flushed after each request; a watch flushes each event)
    server_api: KubeAPI

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # A client that goes away (a watching process that exits) leaves unsent bytes in the
    # buffered writer; flushing them again must not print a traceback.
    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def finish(self) -> None:
        try:
            super().finish()
        except (BrokenPipeError, ConnectionResetError):
            self.rfile.close()

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def _serve(self, method: str) -> None:
        api = self.server_api
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        with api._lock:
            api.requests.append((method, url.path, query))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, status_object(401, "Unauthorized", "Unauthorized"))
        if PORTFORWARD_PATH.match(url.path):
            if method != "GET" or (self.headers.get("Upgrade") or "").lower() != "websocket":
                return self._reply(400, status_object(400, "BadRequest", "the stand-in port-forwards over WebSocket only"))
            headers = {k.lower(): v for k, v in self.headers.items()}
            self.close_connection = True
            return api.portforward.serve(self.connection, self.rfile, url.path, parse_qs(url.query), headers)
        m = _PATH.match(url.path)
        if not m or m["plural"] not in RESOURCES:
            return self._reply(404, status_object(404, "NotFound", "the server could not find the requested resource"))
        group = f"{m['group']}/{m['version']}" if m["group"] else "v1"
        plural, ns, name = m["plural"], m["ns"], m["name"]
        if RESOURCES[plural][0] != group:
            return self._reply(404, status_object(404, "NotFound", "the server could not find the requested resource"))
        if method == "GET" and query.get("watch") in ("true", "1"):
            return self._watch(plural, ns, query)
        try:
            body = json.loads(raw) if raw else None
            self._reply(201 if method == "POST" else 200, api.handle(method, plural, ns, name, query, body))
        except ApiStatus as status:
            self._reply(status.code, status.status)
        except (ValueError, KeyError, TypeError) as error:
            self._reply(400, status_object(400, "BadRequest", f"stand-in: {error!r}"))

    def _reply(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, plural: str, ns: str | None, query: dict[str, str]) -> None:
        if self.server_api.watch_refused(query):
            return self._reply(410, status_object(410, "Expired", "too old resource version"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()  # the client's request returns now, as from an API server

        def send(event: Obj) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            self.server_api.watch(plural, ns, query, send)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True
