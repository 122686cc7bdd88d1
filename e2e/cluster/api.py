"""The harness's own small client of the API server: JSON requests and watches, as the administrator.

The harness (and the tests' own checks) must not go through the product's Kubernetes
code, which is what the tests test; so this is a separate, deliberately plain client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import urllib3

Obj = dict[str, Any]
T = TypeVar("T")


class APIError(Exception):
    """A request answered with an error status; ``status`` and the server's ``message``."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        super().__init__(f"{method} {path}: {status} {message}")
        self.status = status
        self.message = message


class API:
    """Requests to one API server with a client certificate."""

    def __init__(self, server: str, ca: str, cert: str, key: str) -> None:
        self.server = server.rstrip("/")
        self._pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca, cert_file=cert, key_file=key,
                                         maxsize=8, retries=False)

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                query: dict[str, str] | None = None, timeout: float = 30.0) -> Obj:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        response = self._pool.request(method, self.server + path, body=data, fields=query if method == "GET" else None,
                                      headers={"Content-Type": content_type, "Accept": "application/json"},
                                      timeout=urllib3.Timeout(connect=10, read=timeout))
        if response.status >= 300:
            try:
                message = json.loads(response.data).get("message", "")
            except ValueError:
                message = response.data[:300].decode(errors="replace")
            raise APIError(method, path, response.status, message)
        return json.loads(response.data) if response.data else {}

    def text(self, path: str, timeout: float = 5.0) -> str:
        """GET a plain-text endpoint (``/readyz``); raises :class:`APIError` unless 2xx."""
        response = self._pool.request("GET", self.server + path, timeout=urllib3.Timeout(connect=5, read=timeout))
        if response.status >= 300:
            raise APIError("GET", path, response.status, response.data[:300].decode(errors="replace"))
        return response.data.decode(errors="replace")

    def get(self, path: str, **query: str) -> Obj:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)

    def put(self, path: str, body: Obj) -> Obj:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Obj, kind: str = "merge") -> Obj:
        return self.request("PATCH", path, body, content_type=f"application/{kind}-patch+json")

    def delete(self, path: str) -> Obj:
        return self.request("DELETE", path)

    def apply(self, path: str, body: Obj, manager: str = "intercept-tests") -> Obj:
        """Server-side apply of ``body`` at ``path`` (the object's own path)."""
        return self.request("PATCH", f"{path}?fieldManager={manager}&force=true", body,
                            content_type="application/apply-patch+yaml")

    def watch(self, path: str, resource_version: str, *, query: dict[str, str] | None = None,
              timeout: int = 300) -> Iterator[Obj]:
        """The events of one watch request (``{"type", "object"}``), until the server ends it."""
        response = self._pool.request(
            "GET", self.server + path,
            fields={**(query or {}), "watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                    "timeoutSeconds": str(timeout)},
            preload_content=False, timeout=urllib3.Timeout(connect=10, read=timeout + 30))
        try:
            if response.status >= 300:
                raise APIError("WATCH", path, response.status, response.data[:300].decode(errors="replace"))
            buffer = b""
            for chunk in response.stream(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            response.release_conn()
            response.close()

    def close(self) -> None:
        self._pool.clear()


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = 60.0, interval: float = 0.2,
               check: Callable[[], None] | None = None) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds.

    ``check`` runs before each look and may raise to stop waiting early (a process died).
    """
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)
