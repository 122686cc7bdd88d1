"""Kubernetes objects as plain dicts over the REST paths, through the ``kubernetes`` client.

Why not the generated typed API (``CoreV1Api().replace_namespaced_service(...)``): since
37.x its models are pydantic classes with ``extra="forbid"``, so a round trip through them
drops or refuses fields the pinned client does not know, and an exact restore needs every
field back as the server gave it. So we keep the client's transport (kubeconfig auth,
TLS, proxies, token refresh: ``ApiClient.param_serialize`` and ``ApiClient.call_api``) and
send and receive the JSON form, the same dicts :mod:`intercept.kube.inject` transforms.

:class:`Cluster` is the only place requests are made. Its errors are typed:
:class:`ClusterError` (exit code 11) names the request and the fix; :class:`NotFound`,
:class:`Conflict` and :class:`Gone` are the answers callers handle.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from intercept.errors import InterceptError

log = logging.getLogger(__name__)

Obj = dict[str, Any]

REQUEST_TIMEOUT = 30.0  # seconds, per request (a watch sets its own)


class ClusterError(InterceptError):
    """The cluster cannot be used: no configuration, unreachable, or a request refused."""

    exit_code = 11

    def __init__(self, message: str, status: int = 0, reason: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.detail = detail  # the API server's own message, when it gave one


class NotFound(ClusterError):
    """404: the object (or its namespace) does not exist."""


class Conflict(ClusterError):
    """409: the object changed since it was read (or already exists, on create)."""


class Gone(ClusterError):
    """410: a watch's resourceVersion is too old; list again."""


class AccessDenied(ClusterError):
    """401, or a 403 from the authorizer (RBAC): these credentials may not do this.

    Not every 403 is one: admission (a webhook, Pod Security) also answers 403, and
    that is a refusal of the object, not of the user. The authorizer's message is
    ``User "NAME" cannot VERB resource "PLURAL" ...``.
    """


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST API."""

    kind: str
    api_version: str  # "v1", "apps/v1", ...
    plural: str

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        scope = f"/namespaces/{namespace}" if namespace else ""
        return f"{base}{scope}/{self.plural}" + (f"/{name}" if name else "")


RESOURCES = {
    r.kind: r
    for r in (
        Resource("Service", "v1", "services"),
        Resource("Secret", "v1", "secrets"),
        Resource("Pod", "v1", "pods"),
        Resource("Event", "v1", "events"),
        Resource("Deployment", "apps/v1", "deployments"),
        Resource("StatefulSet", "apps/v1", "statefulsets"),
        Resource("ReplicaSet", "apps/v1", "replicasets"),
        Resource("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies"),
        Resource("ConfigMap", "v1", "configmaps"),
        Resource("ServiceAccount", "v1", "serviceaccounts"),
        Resource("CronJob", "batch/v1", "cronjobs"),
        Resource("Role", "rbac.authorization.k8s.io/v1", "roles"),
        Resource("RoleBinding", "rbac.authorization.k8s.io/v1", "rolebindings"),
        Resource("Namespace", "v1", "namespaces"),
        Resource("EndpointSlice", "discovery.k8s.io/v1", "endpointslices"),
        Resource("SelfSubjectAccessReview", "authorization.k8s.io/v1", "selfsubjectaccessreviews"),
    )
}

_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "DELETE": "delete", "PATCH": "patch"}


class Cluster:
    """Typed-error, dict-in/dict-out access to one cluster (blocking; wrap in a thread in async code)."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    @property
    def host(self) -> str:
        return str(self.api.configuration.host)

    # ------------------------------------------------------------------ verbs

    def get(self, kind: str, namespace: str, name: str) -> Obj:
        return self._json("GET", kind, namespace, name)

    def list(
        self,
        kind: str,
        namespace: str | None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[Obj], str]:
        """Items (with ``kind`` and ``apiVersion`` filled in, as a GET gives them) and the list's resourceVersion.

        ``namespace=None`` lists across all namespaces.
        """
        query = []
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        body = self._json("GET", kind, namespace, None, query=query)
        resource = RESOURCES[kind]
        items = [{"apiVersion": resource.api_version, "kind": kind, **item} for item in body.get("items") or []]
        return items, (body.get("metadata") or {}).get("resourceVersion", "")

    def create(self, obj: Obj, *, dry_run: bool = False) -> Obj:
        """POST; with ``dry_run`` the server admits it (admission, validation) and stores nothing."""
        query = [("dryRun", "All")] if dry_run else None
        return self._json("POST", obj["kind"], _namespace(obj), None, query=query, body=obj)

    def can_i(self, verb: str, plural: str, namespace: str, group: str = "", subresource: str = "") -> tuple[bool, str]:
        """Whether these credentials may ``verb`` ``plural`` (``/subresource``) in ``namespace``, and the
        authorizer's reason: a SelfSubjectAccessReview, which every authenticated user may create."""
        attributes = {"namespace": namespace, "verb": verb, "group": group, "resource": plural}
        if subresource:
            attributes["subresource"] = subresource
        review = self._json("POST", "SelfSubjectAccessReview", None, None, body={
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes}})
        status = review.get("status") or {}
        return bool(status.get("allowed")), str(status.get("reason") or status.get("evaluationError") or "")

    def replace(self, obj: Obj) -> Obj:
        """PUT: fails with :class:`Conflict` when ``metadata.resourceVersion`` is no longer current."""
        return self._json("PUT", obj["kind"], _namespace(obj), obj["metadata"]["name"], body=obj)

    def delete(self, kind: str, namespace: str, name: str, *, uid: str | None = None,
               resource_version: str | None = None) -> None:
        """DELETE; with ``uid`` or ``resource_version`` only that object, unchanged since it was
        read (the server's preconditions): :class:`Conflict` when it is another or has changed."""
        preconditions = {k: v for k, v in (("uid", uid), ("resourceVersion", resource_version)) if v is not None}
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": preconditions} if preconditions else None
        self._json("DELETE", kind, namespace, name, body=body)

    def watch(
        self,
        kind: str,
        namespace: str,
        resource_version: str,
        label_selector: str | None = None,
        timeout_seconds: int = 300,
    ) -> WatchStream:
        """A watch from ``resource_version``: iterate it for ``{"type", "object"}`` events.

        Raises :class:`Gone` (at once or while iterating) when the version is too old.
        """
        query = [("watch", "true"), ("resourceVersion", resource_version),
                 ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(timeout_seconds))]
        if label_selector:
            query.append(("labelSelector", label_selector))
        # The read timeout outlives the server's, so a dead connection is noticed, a quiet one is not.
        response = self._request("GET", kind, namespace, None, query=query, stream=True,
                                 timeout=(REQUEST_TIMEOUT, timeout_seconds + REQUEST_TIMEOUT))
        return WatchStream(response, f"watch {RESOURCES[kind].plural} in namespace {namespace}")

    # ------------------------------------------------------------------ plumbing

    def _json(self, method: str, kind: str, namespace: str | None, name: str | None,
              query: list[tuple[str, str]] | None = None, body: Obj | None = None) -> Obj:
        response = self._request(method, kind, namespace, name, query=query, body=body)
        data = response.data
        return json.loads(data) if data else {}

    def _request(
        self,
        method: str,
        kind: str,
        namespace: str | None,
        name: str | None,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Obj | None = None,
        stream: bool = False,
        timeout: Any = REQUEST_TIMEOUT,
    ) -> urllib3.BaseHTTPResponse:
        resource = RESOURCES[kind]
        path = resource.path(namespace, name)
        verb = "list" if method == "GET" and name is None else _VERBS[method]
        if query and ("watch", "true") in query:
            verb = "watch"
        what = f"{verb} {resource.plural}" + (f"/{name}" if name else "") + (
            f" in namespace {namespace}" if namespace else " in all namespaces")
        request = self.api.param_serialize(
            method,
            path,
            query_params=query or None,
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        log.debug("%s %s", method, request[1])
        try:
            response = self.api.call_api(*request, _request_timeout=timeout).response
        except urllib3.exceptions.HTTPError as error:
            raise ClusterError(
                f"cannot reach the Kubernetes API server at {self.host} to {what} ({error}); "
                "check that the cluster is running and that --context/--kubeconfig name it"
            ) from None
        except ApiException as error:  # the client's own failures (TLS), before any answer
            reason = " ".join(str(error.reason).split())
            raise ClusterError(
                f"cannot talk to the Kubernetes API server at {self.host} to {what} ({reason}); "
                "check the cluster's certificate authority and credentials in the kubeconfig"
            ) from None
        if 200 <= response.status <= 299:
            return response if stream else _preloaded(response)
        raise _error(response, what, verb, resource, namespace)


class WatchStream:
    """The events of one watch request; ``close()`` from any thread ends a blocked iteration."""

    def __init__(self, response: urllib3.BaseHTTPResponse, what: str) -> None:
        self._response = response
        self._what = what

    def __iter__(self) -> Iterator[Obj]:
        buffer = b""
        try:
            for chunk in self._response.stream(4096, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield self._event(line)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            if self._response.closed:
                return  # closed by close(): the reader asked to stop
            raise ClusterError(f"{self._what} was interrupted ({error})") from None
        if buffer.strip():
            yield self._event(buffer)

    def _event(self, line: bytes) -> Obj:
        event = json.loads(line)
        if event.get("type") == "ERROR":
            status = event.get("object") or {}
            code = int(status.get("code") or 0)
            message = status.get("message", "")
            if code == 410:
                raise Gone(f"{self._what}: {message}", 410, status.get("reason", "Expired"))
            raise ClusterError(f"{self._what} failed: {code} {message}", code, status.get("reason", ""))
        return event

    def close(self) -> None:
        try:
            self._response.shutdown()  # wakes a reader blocked in another thread
        except (RuntimeError, ValueError, OSError):
            pass  # the stream already ended and its connection went back to the pool
        finally:
            self._response.release_conn()
            self._response.close()


def _preloaded(response: urllib3.BaseHTTPResponse) -> urllib3.BaseHTTPResponse:
    response.data  # noqa: B018 - read the whole body now (it is cached on the response)
    response.release_conn()  # and give the connection back to the pool
    return response


def _error(response: urllib3.BaseHTTPResponse, what: str, verb: str, resource: Resource,
           namespace: str | None) -> ClusterError:
    try:
        status = json.loads(response.data)
    except ValueError:
        status = {}
    message = status.get("message") or (response.data or b"").decode(errors="replace").strip()[:200]
    reason = status.get("reason") or response.reason or ""
    code = response.status
    where = f" -n {namespace}" if namespace else " -A"
    if code == 404:
        return NotFound(f"{what}: not found ({message})", code, reason, message)
    if code == 409:
        return Conflict(f"{what}: conflict ({message})", code, reason, message)
    if code == 410:
        return Gone(f"{what}: {message}", code, reason, message)
    if code == 401:
        fix = "log in to the cluster again (the context's credentials were refused)"
        return AccessDenied(f"cannot {what}: {code} {reason}: {message}; {fix}", code, reason, message)
    if code == 403 and _AUTHORIZER_DENIAL.search(message):
        fix = (f"ask for permission to {verb} {resource.plural} "
               f"(check with: kubectl auth can-i {verb} {resource.plural}{where})")
        return AccessDenied(f"cannot {what}: {code} {reason}: {message}; {fix}", code, reason, message)
    if code == 403:
        fix = "the API server refused the request; see its message"
    elif code in (400, 422):
        fix = "the API server rejected the object; see its message"
    else:
        fix = "retry; if it persists, check the API server"
    return ClusterError(f"cannot {what}: {code} {reason}: {message}; {fix}", code, reason, message)


_AUTHORIZER_DENIAL = re.compile(r'\bcannot [\w-]+ resource "')


def _namespace(obj: Obj) -> str:
    return obj["metadata"]["namespace"]


def format_selector(selector: Obj) -> str:
    """A LabelSelector (``matchLabels``, ``matchExpressions``) in the ``?labelSelector=`` syntax."""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op in ("In", "NotIn"):
            parts.append(f"{key} {op.lower()} ({','.join(values)})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)
