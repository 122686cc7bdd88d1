"""The simulated node's pods, run for real: a process per container, and the pod status they produce.

kwok (the Node's kubelet as the API server sees it) marks pods Running without running
anything; here it is given no pod stages, and :class:`Kubelet` does a kubelet's pod work
instead, for every pod the scheduler binds to the Node:

- the pod gets a network namespace and an IP (:mod:`e2e.cluster.network`); each
  container runs as the process its image stands for (:mod:`e2e.cluster.images`) in that
  namespace, with the environment the pod spec gives it (``env``, ``envFrom``, Secret,
  ConfigMap and field references, ``$(VAR)``) and its volumes as directories: Secret and
  ConfigMap volumes, and those sources of projected volumes, are read from the API and
  written out, and every path in the env or args under a ``mountPath`` is mapped to the
  directory that stands for the mount;
- an agent container (``*/agent`` images) runs as its securityContext says, under
  :mod:`e2e.cluster.confine`: its user (the image's ``USER`` when the pod names none), a
  read-only root, its volumes bound at their mountPaths (Secrets read-only), the
  image's ``ENV`` (``agent_image/Dockerfile``), so what the injection writes is what the
  process gets;
- a kwok ``PortForward`` object named after the pod points each declared container
  port at ``podIP:port``, so a port-forward travels client -> API server -> kwok -> pod;
- the pod status follows the processes: ``Running`` with the pod IP once started; a
  container is ready when its readinessProbe passes (httpGet, tcpSocket; a gRPC probe
  is a TCP connect, an exec probe passes while the process runs), or without a probe
  once its first declared port accepts connections; a process that exits is
  ``terminated`` and restarted (``restartPolicy``), the second time after a back-off
  shown as ``CrashLoopBackOff``; an image that cannot be pulled stays
  ``ErrImagePull``/``ImagePullBackOff`` with a ``Failed`` event; init containers run to
  completion first;
- a pod being deleted gets SIGTERM (SIGKILL after its grace period, at most 10 s), its
  namespace is removed, and the pod object is deleted (``gracePeriodSeconds: 0``, with the
  pod's UID as precondition), as a kubelet finishes a deletion.

Liveness and startup probes are not run. Status is written with a merge patch of the whole
``status`` only when it changed; a pod is looked at every :data:`TICK` seconds.
"""

from __future__ import annotations

import base64
import datetime
import functools
import http.client
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from e2e.cluster.api import API, APIError
from e2e.cluster.confine import Confinement, ImageConfig, for_container, image_config
from e2e.cluster.images import AGENT_REPOSITORIES, ROOT, Program, program, repository
from e2e.cluster.network import PodNetwork, orphan_guard
from e2e.cluster.services import ServiceNetwork

log = logging.getLogger(__name__)

Obj = dict[str, Any]

TICK = 0.25  # seconds between two looks at a pod
PROBE_TIMEOUT = 1.0
MAX_GRACE = 10.0
BACKOFF_START, BACKOFF_MAX = 1.0, 8.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    """Runs every pod bound to ``node``; :meth:`stop` ends them all and removes their namespaces."""

    def __init__(self, api: API, node: str, node_ip: str, state: Path, network: PodNetwork,
                 services: ServiceNetwork | None = None) -> None:
        self.api = api
        self.node = node
        self.node_ip = node_ip
        self.state = state
        self.network = network
        self.services = services  # cluster DNS names and ClusterIPs for the pods (e2e.cluster.services)
        self._pods: dict[str, PodWorker] = {}  # uid -> worker
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            workers = list(self._pods.values())
            self._pods.clear()
        threads = [threading.Thread(target=w.stop, args=(0.0,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # ------------------------------------------------------------------ the pod watch

    def _run(self) -> None:
        selector = f"spec.nodeName={self.node}"
        while not self._stopping.is_set():
            try:
                listed = self.api.get("/api/v1/pods", fieldSelector=selector)
                for pod in listed.get("items") or []:
                    self._reconcile("ADDED", pod)
                version = listed["metadata"]["resourceVersion"]
                while not self._stopping.is_set():
                    for event in self.api.watch("/api/v1/pods", version, query={"fieldSelector": selector}, timeout=60):
                        if self._stopping.is_set():
                            return
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            raise APIError("WATCH", "/api/v1/pods", int(obj.get("code") or 0), obj.get("message", ""))
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        if event.get("type") != "BOOKMARK":
                            self._reconcile(event["type"], obj)
            except Exception as error:  # noqa: BLE001 - list again after any failure, as a kubelet does
                if self._stopping.is_set():
                    return
                log.info("pod watch: %s; listing again", error)
                self._stopping.wait(0.5)

    def _reconcile(self, kind: str, pod: Obj) -> None:
        metadata = pod["metadata"]
        uid = metadata["uid"]
        with self._lock:
            if self._stopping.is_set():
                return
            worker = self._pods.get(uid)
            if kind == "DELETED":
                if worker is not None:
                    del self._pods[uid]
                    threading.Thread(target=worker.stop, args=(0.0,), daemon=True).start()
                return
            if metadata.get("deletionTimestamp"):
                if worker is None or worker.deleting:
                    if worker is None:
                        threading.Thread(target=self._finish_deletion, args=(pod,), daemon=True).start()
                    return
                worker.deleting = True
                grace = float(metadata.get("deletionGracePeriodSeconds") or 0)
                threading.Thread(target=self._delete, args=(worker, grace), daemon=True).start()
                return
            if worker is None and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                worker = self._pods[uid] = PodWorker(self, pod)
                worker.start()

    def _delete(self, worker: PodWorker, grace: float) -> None:
        worker.stop(grace)
        with self._lock:
            self._pods.pop(worker.uid, None)
        self._finish_deletion(worker.pod)

    def _finish_deletion(self, pod: Obj) -> None:
        metadata = pod["metadata"]
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}", {
                "apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": metadata["uid"]}})
        except APIError as error:
            if error.status not in (404, 409):
                log.warning("deleting pod %s/%s: %s", metadata["namespace"], metadata["name"], error)


class Container:
    """One container's process and what its status says."""

    def __init__(self, spec: Obj, prog: Program, init: bool) -> None:
        self.spec = spec
        self.name = spec["name"]
        self.program = prog
        self.init = init
        self.process: subprocess.Popen[bytes] | None = None
        self.id = ""
        self.started_at = ""
        self.restarts = 0
        self.last_terminated: Obj | None = None
        self.terminated: Obj | None = None  # the current state, when not running
        self.ready = False
        self.pulled = prog.pull_error is None
        self.pull_reported = False
        self.backoff_until = 0.0
        self.backoff = BACKOFF_START


class PodWorker:
    """The processes and the status of one pod, looked after in a thread of its own."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        self.kubelet = kubelet
        self.api = kubelet.api
        self.pod = pod
        metadata = pod["metadata"]
        self.uid = metadata["uid"]
        self.namespace = metadata["namespace"]
        self.name = metadata["name"]
        self.path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"
        self.dir = kubelet.state / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.deleting = False
        self.netns: str | None = None
        self.ip: str | None = None
        self.started = _now()
        self.inits = [Container(c, program(c.get("image", ""), c, pod, init=True), True)
                      for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(c, program(c.get("image", ""), c, pod), False) for c in pod["spec"]["containers"]]
        self.transitions: dict[str, tuple[str, str]] = {}
        self.last_status: Obj | None = None
        self.mounts: dict[str, Path] = {}  # volume name -> directory
        self.waiting_for: str | None = None  # why containers cannot be created yet
        self.events_sent: set[str] = set()
        self._stop = threading.Event()
        self._reaped = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"pod {self.namespace}/{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------------ lifecycle

    def _run(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.pod["spec"].get("hostNetwork"):
                self.ip = self.kubelet.node_ip
            else:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self.netns, self.ip = self.kubelet.network.add()
                    if self.kubelet.services is not None:
                        self.kubelet.services.pod_added(self.netns, self.namespace)
            self._ensure_portforward()
            while not self._stop.is_set():
                self._tick()
                self._stop.wait(TICK)
        except Exception:  # noqa: BLE001 - a broken pod must not take the node down; say why
            log.exception("pod %s/%s", self.namespace, self.name)
        finally:
            # The processes die with this thread (orphan_guard): it lives until stop() has let them go.
            self._reaped.wait()

    def stop(self, grace: float) -> None:
        """SIGTERM every process, SIGKILL after ``grace`` seconds (at most :data:`MAX_GRACE`), remove the namespace."""
        with self._lock:
            self._stop.set()
            processes = [c.process for c in self.inits + self.containers if c.process and c.process.poll() is None]
        for p in processes:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + min(grace, MAX_GRACE)
        for p in processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal(p, signal.SIGKILL)
            p.wait()
        self._reaped.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.netns:
            if self.kubelet.services is not None:
                self.kubelet.services.pod_removed(self.netns)
            self.kubelet.network.remove(self.netns)
            self.netns = None

    # ------------------------------------------------------------------ one look

    def _tick(self) -> None:
        if self.waiting_for is not None or not self.mounts:
            self._prepare_volumes()
        if self.waiting_for is None:
            pending_init = next((c for c in self.inits if not _completed(c)), None)
            if pending_init is not None:
                self._step(pending_init)
            else:
                for c in self.containers:
                    self._step(c)
        status = self._status()
        if status != self.last_status:
            try:
                self.api.patch(self.path + "/status", {"status": status})
                self.last_status = status
            except APIError as error:
                if error.status == 404:
                    self._stop.set()
                else:
                    log.info("pod %s/%s status: %s", self.namespace, self.name, error)

    def _step(self, c: Container) -> None:
        if not c.pulled:
            self._event(f"pull-{c.name}", "Warning", "Failed", f"Failed to pull image \"{c.spec.get('image')}\": "
                        f"{c.program.pull_error}")
            return
        if c.program.completes:
            if c.terminated is None:
                c.terminated = {"exitCode": 0, "reason": "Completed", "startedAt": _now(), "finishedAt": _now()}
            return
        if c.process is not None and c.process.poll() is not None:
            code = c.process.returncode
            c.terminated = {"exitCode": code if code >= 0 else 128 - code,
                            "reason": "Completed" if code == 0 else "Error",
                            "startedAt": c.started_at, "finishedAt": _now(), "containerID": c.id}
            c.process = None
            c.ready = False
            policy = self.pod["spec"].get("restartPolicy", "Always")
            restart = policy == "Always" or (policy == "OnFailure" and code != 0)
            if c.init and code == 0:
                restart = False
            if restart:
                c.backoff_until = time.monotonic() + (0 if c.restarts == 0 else c.backoff)
                if c.restarts:
                    c.backoff = min(c.backoff * 2, BACKOFF_MAX)
            else:
                c.backoff_until = float("inf")
        if c.process is None and time.monotonic() >= c.backoff_until:
            if c.terminated is not None:
                c.last_terminated = c.terminated
                c.restarts += 1
            self._launch(c)
        if c.process is not None and not c.init:
            c.ready = self._probe(c)

    def _launch(self, c: Container) -> None:
        assert c.program.argv is not None
        confined = self._confinement(c)
        env, mapping = self._environment(c, None if confined is None else confined[1])
        argv = [_map_path(a, mapping) for a in c.program.argv]
        argv = orphan_guard("KILL") + (argv if confined is None else confined[0].argv(argv))
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        log_file = open(self.dir / f"{c.name}.log", "ab")
        with self._lock:
            if self._stop.is_set():
                log_file.close()
                return
            c.process = subprocess.Popen(argv, env=env, cwd=self.dir, stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        log_file.close()
        (self.dir / f"{c.name}.pid").write_text(f"{c.process.pid}\n")  # for tests that crash a container
        c.id = f"kwok://{uuid.uuid4().hex}"
        c.started_at = _now()
        c.terminated = None
        log.info("pod %s/%s: started %s (pid %d)", self.namespace, self.name, c.name, c.process.pid)

    # ------------------------------------------------------------------ readiness

    def _probe(self, c: Container) -> bool:
        probe = c.spec.get("readinessProbe")
        if probe is None:
            ports = [p for p in c.spec.get("ports") or [] if (p.get("protocol") or "TCP") == "TCP"]
            return not ports or self._connects(int(ports[0]["containerPort"]))
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = self._port(c, get.get("port"))
            try:
                conn = http.client.HTTPConnection(self.ip, port, timeout=PROBE_TIMEOUT)
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                conn.request("GET", get.get("path") or "/", headers=headers)
                ok = 200 <= conn.getresponse().status < 400
                conn.close()
                return ok
            except (OSError, http.client.HTTPException):
                return False
        if "tcpSocket" in probe:
            return self._connects(self._port(c, probe["tcpSocket"].get("port")))
        if "grpc" in probe:
            return self._connects(int(probe["grpc"]["port"]))
        return True  # exec: passes while the process runs

    def _port(self, c: Container, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for container in self.pod["spec"]["containers"]:
            for p in container.get("ports") or []:
                if p.get("name") == port:
                    return int(p["containerPort"])
        return 0

    def _connects(self, port: int) -> bool:
        if not port or not self.ip:
            return False
        try:
            socket.create_connection((self.ip, port), timeout=PROBE_TIMEOUT).close()
            return True
        except OSError:
            return False

    # ------------------------------------------------------------------ status

    def _status(self) -> Obj:
        inits_done = all(_completed(c) for c in self.inits)
        statuses = [self._container_status(c) for c in self.containers]
        ready = inits_done and bool(statuses) and all(s["ready"] for s in statuses)
        conditions = [
            self._condition("PodReadyToStartContainers", self.ip is not None),
            self._condition("Initialized", inits_done),
            self._condition("Ready", ready),
            self._condition("ContainersReady", ready),
            self._condition("PodScheduled", True),
        ]
        status: Obj = {
            "phase": "Running" if any(c.process is not None for c in self.containers) or (
                inits_done and any(c.restarts for c in self.containers)) else "Pending",
            "conditions": conditions,
            "hostIP": self.kubelet.node_ip, "hostIPs": [{"ip": self.kubelet.node_ip}],
            "startTime": self.started,
            "containerStatuses": statuses,
            "qosClass": (self.pod.get("status") or {}).get("qosClass", "BestEffort"),
        }
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        if self.inits:
            status["initContainerStatuses"] = [self._container_status(c) for c in self.inits]
        return status

    def _condition(self, kind: str, value: bool) -> Obj:
        text = "True" if value else "False"
        previous = self.transitions.get(kind)
        if previous is None or previous[0] != text:
            previous = self.transitions[kind] = (text, _now())
        return {"type": kind, "status": text, "lastProbeTime": None, "lastTransitionTime": previous[1]}

    def _container_status(self, c: Container) -> Obj:
        image = c.spec.get("image", "")
        state: Obj
        if not c.pulled:
            # the first look reports the failed pull, later ones the back-off, as a kubelet's do
            reason = "ImagePullBackOff" if c.pull_reported else "ErrImagePull"
            c.pull_reported = True
            state = {"waiting": {"reason": reason, "message": c.program.pull_error}}
        elif self.waiting_for is not None:
            state = {"waiting": {"reason": "ContainerCreating", "message": self.waiting_for}}
        elif c.process is not None:
            state = {"running": {"startedAt": c.started_at}}
        elif c.terminated is not None and (c.init or c.backoff_until == float("inf")):
            state = {"terminated": c.terminated}
        elif c.terminated is not None and c.restarts:
            state = {"waiting": {"reason": "CrashLoopBackOff",
                                 "message": f"back-off {c.backoff:g}s restarting failed container={c.name} "
                                            f"pod={self.name}_{self.namespace}({self.uid})"}}
        elif c.terminated is not None:
            state = {"terminated": c.terminated}
        else:
            state = {"waiting": {"reason": "PodInitializing" if not c.init else "ContainerCreating"}}
        status: Obj = {"name": c.name, "image": image, "imageID": "" if not c.pulled else f"{image}@kwok",
                       "ready": c.ready, "restartCount": c.restarts, "started": c.process is not None,
                       "state": state}
        if c.id:
            status["containerID"] = c.id
        if c.last_terminated:
            status["lastState"] = {"terminated": c.last_terminated}
        return status

    def _event(self, key: str, kind: str, reason: str, message: str) -> None:
        if key in self.events_sent:
            return
        self.events_sent.add(key)
        now = _now()
        try:
            self.api.post(f"/api/v1/namespaces/{self.namespace}/events", {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{self.name}.", "namespace": self.namespace},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "namespace": self.namespace,
                                   "uid": self.uid},
                "reason": reason, "message": message, "type": kind, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": "kubelet", "host": self.kubelet.node},
            })
        except APIError as error:
            log.info("event for pod %s/%s: %s", self.namespace, self.name, error)

    # ------------------------------------------------------------------ volumes, env, port-forward

    def _prepare_volumes(self) -> None:
        """Write each volume out as a directory; a missing Secret or ConfigMap keeps the containers waiting.

        Secret and ConfigMap volumes, and the Secret and ConfigMap sources of a projected
        volume, are written; other projected sources (tokens, the downward API) are not.
        """
        waiting = None
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            where = self.dir / "volumes" / name
            where.mkdir(parents=True, exist_ok=True)
            self.mounts[name] = where
            projected = volume.get("projected") or {}
            sources = [volume] + list(projected.get("sources") or [])
            for source_of in sources:
                for kind, ref, key in (("secret", "secretName", "secrets"), ("configMap", "name", "configmaps")):
                    source = source_of.get(kind)
                    if source is None:
                        continue
                    if source_of is not volume:  # a projected source names its object by "name"
                        ref = "name"
                    missing = self._write_source(where, kind, key, source[ref], source, projected.get("defaultMode"))
                    if missing:
                        waiting = missing
                        self._event(f"mount-{name}", "Warning", "FailedMount",
                                    f'MountVolume.SetUp failed for volume "{name}" : {waiting}')
        self.waiting_for = waiting

    def _write_source(self, where: Path, kind: str, key: str, name: str, source: Obj, default_mode: int | None) -> str | None:
        """Write one Secret or ConfigMap into ``where``; the reason to wait when it is missing and not optional."""
        try:
            obj = self.api.get(f"/api/v1/namespaces/{self.namespace}/{key}/{name}")
        except APIError as error:
            if error.status == 404 and not source.get("optional"):
                return f'{kind} "{name}" not found'
            return None
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()} if kind == "secret" \
            else {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        mode = source.get("defaultMode", default_mode if default_mode is not None else 0o644)
        for item in items:
            if item["key"] in data:
                target = where / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[item["key"]])
                os.chmod(target, item.get("mode", mode))
        return None

    def _confinement(self, c: Container) -> tuple[Confinement, list[tuple[str, str]]] | None:
        """How an agent container runs (:mod:`e2e.cluster.confine`): as its securityContext says; others: None."""
        if repository(c.spec.get("image", "")) not in AGENT_REPOSITORIES:
            return None
        # On PATH only the interpreter's directory: the slim image has no C compiler (with one on PATH,
        # ctypes' find_library, which asyncssh calls at import, would need a writable /tmp).
        return for_container(self.pod, c.spec, _agent_image(), self.mounts, reach=(sys.prefix, sys.base_prefix, str(ROOT)),
                             env={"PATH": str(Path(sys.executable).parent)})

    def _environment(self, c: Container, confined: list[tuple[str, str]] | None = None
                     ) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """The container's variables and the (mountPath, directory) pairs its paths map through.

        ``confined``: the container runs confined with its mounts in place, but for these.
        """
        if confined is None:
            mapping = sorted(((m["mountPath"].rstrip("/") or "/", str(self.mounts.get(m["name"], self.dir)))
                              for m in c.spec.get("volumeMounts") or []), key=lambda m: -len(m[0]))
        else:
            mapping = sorted(confined, key=lambda m: -len(m[0]))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir), "HOSTNAME": self.name,
               "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "LANG": os.environ.get("LANG", "C.UTF-8")}
        if confined is not None:  # the image's ENV; HOME as a runtime sets it for a user the image does not name
            env.update({**_agent_image().env, "HOME": "/"})
        values: dict[str, str] = {}
        for source in c.spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("configMapRef", "configmaps"), ("secretRef", "secrets")):
                ref = source.get(kind)
                if ref:
                    data = self._read_data(key, ref["name"])
                    values.update({prefix + k: v for k, v in data.items()})
        for var in c.spec.get("env") or []:
            if "value" in var:
                values[var["name"]] = _expand(str(var["value"]), values)
            elif "valueFrom" in var:
                value = self._value_from(var["valueFrom"])
                if value is not None:
                    values[var["name"]] = value
        env.update({k: _map_path(v, mapping) for k, v in values.items()})
        return env, mapping

    def _value_from(self, source: Obj) -> str | None:
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            metadata = self.pod["metadata"]
            fields = {"metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
                      "spec.nodeName": self.kubelet.node, "spec.serviceAccountName": self.pod["spec"].get(
                          "serviceAccountName", "default"),
                      "status.podIP": self.ip or "", "status.hostIP": self.kubelet.node_ip}
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if m:
                return (metadata.get(m[1]) or {}).get(m[2], "")
            return fields.get(path, "")
        if "resourceFieldRef" in source:
            return "1"
        for kind, key in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            ref = source.get(kind)
            if ref:
                return self._read_data(key, ref["name"]).get(ref["key"])
        return None

    def _read_data(self, key: str, name: str) -> dict[str, str]:
        try:
            obj = self.api.get(f"/api/v1/namespaces/{self.namespace}/{key}/{name}")
        except APIError:
            return {}
        data = obj.get("data") or {}
        if key == "secrets":
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
        return dict(data)

    def _ensure_portforward(self) -> None:
        """kwok's PortForward for this pod: each declared TCP port -> podIP:port; owned by the pod."""
        ports = sorted({int(p["containerPort"]) for c in self.pod["spec"]["containers"] for p in c.get("ports") or []
                        if (p.get("protocol") or "TCP") == "TCP"})
        path = f"/apis/kwok.x-k8s.io/v1alpha1/namespaces/{self.namespace}/portforwards"
        body = {
            "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "PortForward",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}]},
            "spec": {"forwards": [{"ports": [p], "target": {"address": self.ip, "port": p}} for p in ports]},
        }
        for _ in range(20):
            try:
                self.api.post(path, body)
                return
            except APIError as error:
                if error.status != 409:
                    raise
            try:  # left by an earlier pod of the same name (a StatefulSet's): take it over
                current = self.api.get(f"{path}/{self.name}")
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self.api.put(f"{path}/{self.name}", body)
                return
            except APIError as error:
                if error.status not in (404, 409):
                    raise
                body["metadata"].pop("resourceVersion", None)
        raise OSError(f"cannot write the PortForward of pod {self.namespace}/{self.name}")


@functools.cache
def _agent_image() -> ImageConfig:
    """The USER and ENV of the agent's image, as ``agent_image/Dockerfile`` gives them."""
    return image_config(ROOT / "agent_image" / "Dockerfile")


def _completed(c: Container) -> bool:
    return c.terminated is not None and c.terminated.get("exitCode") == 0 and c.process is None


def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _map_path(value: str, mapping: list[tuple[str, str]]) -> str:
    """``value`` with a leading mount path replaced by the directory that stands for it."""
    for mount, directory in mapping:
        if value == mount or value.startswith(mount + "/"):
            return directory + value[len(mount):]
    return value


def _expand(value: str, known: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion (``$$`` escapes); unknown references stay as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m[0] == "$$" else known.get(m[1], m[0]), value)
