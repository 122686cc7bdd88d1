"""Cluster access as kubectl finds it: kubeconfig, context, namespace; or the pod's own account.

Precedence, as kubectl's:

- the kubeconfig: ``--kubeconfig FILE``, else ``$KUBECONFIG`` (paths joined by ``:``,
  merged: the first file to name a context or a current-context wins), else
  ``~/.kube/config``; when none of these exists and ``KUBERNETES_SERVICE_HOST`` is set
  (we run in a pod, e.g. a CDE workspace in the cluster), the pod's service account;
- the context: ``--context``, else the kubeconfig's current-context;
- the namespace: ``-n``, else the context's namespace (in a pod: the service account's
  namespace), else ``default``.

:func:`connect` returns a :class:`Connection`; it never touches the network, so a wrong
address shows up on the first request, as a :class:`~intercept.kube.rest.ClusterError`
that names the server.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient, Configuration
from kubernetes.config import ConfigException, load_kube_config
from kubernetes.config.incluster_config import InClusterConfigLoader

from intercept.kube.rest import ClusterError

log = logging.getLogger(__name__)

DEFAULT_KUBECONFIG = "~/.kube/config"
DEFAULT_NAMESPACE = "default"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class Connection:
    """How to reach one cluster: the client, the namespace to work in, and where they came from."""

    api: ApiClient
    namespace: str
    context: str | None  # None in a pod (service account)
    in_cluster: bool  # True: we run in a pod and may dial pod IPs directly


def connect(
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    namespace: str | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> Connection:
    """Find the cluster as kubectl does; raises :class:`ClusterError` naming what is missing."""
    paths = _kubeconfig_paths(kubeconfig, environ)
    existing = [p for p in paths if p.is_file()]
    if kubeconfig is not None and not existing:
        raise ClusterError(f"kubeconfig {kubeconfig} does not exist; pass the file kubectl uses (--kubeconfig)")
    if not existing:
        if environ.get("KUBERNETES_SERVICE_HOST"):
            if context:
                raise ClusterError(
                    f"--context {context} needs a kubeconfig, and none was found (running in a pod, "
                    "the pod's service account is used); drop --context or pass --kubeconfig"
                )
            return _in_cluster(namespace, environ, service_account_dir)
        where = environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
        raise ClusterError(
            f"no cluster configuration found: no kubeconfig at {where}, and not running in a pod "
            "(KUBERNETES_SERVICE_HOST is unset); pass --kubeconfig FILE, set KUBECONFIG, or "
            "run from where kubectl works"
        )

    contexts, current = _read_contexts(existing)
    chosen = context or current
    known = ", ".join(sorted(contexts)) or "none"
    shown = os.pathsep.join(str(p) for p in existing)
    if not chosen:
        raise ClusterError(f"kubeconfig {shown} has no current context; pass --context NAME (contexts: {known})")
    if chosen not in contexts:
        raise ClusterError(f"context {chosen!r} is not in kubeconfig {shown} (contexts: {known}); pass --context NAME")

    configuration = Configuration()
    try:
        load_kube_config(
            config_file=os.pathsep.join(str(p) for p in existing),
            context=chosen,
            client_configuration=configuration,
            persist_config=False,
        )
    except (ConfigException, OSError, ValueError, KeyError) as error:
        raise ClusterError(
            f"kubeconfig {shown}, context {chosen!r}, is unusable ({error}); fix it or pick "
            "another context with --context"
        ) from None
    ns = namespace or contexts[chosen].get("namespace") or DEFAULT_NAMESPACE
    log.info("cluster %s (context %s), namespace %s", configuration.host, chosen, ns)
    return Connection(ApiClient(configuration), ns, chosen, in_cluster=False)


def _kubeconfig_paths(flag: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> list[Path]:
    raw = str(flag) if flag is not None else environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def _read_contexts(paths: list[Path]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Contexts by name and the current context, merged as kubectl merges: first one wins."""
    contexts: dict[str, dict[str, Any]] = {}
    current = None
    for path in paths:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ClusterError(f"kubeconfig {path} is unreadable ({error}); fix it or pass another with --kubeconfig") from None
        if not isinstance(data, dict):
            raise ClusterError(f"kubeconfig {path} is not a kubeconfig (a YAML mapping); pass another with --kubeconfig")
        for entry in data.get("contexts") or []:
            if isinstance(entry, dict) and entry.get("name"):
                contexts.setdefault(entry["name"], entry.get("context") or {})
        current = current or data.get("current-context") or None
    return contexts, current


def _in_cluster(namespace: str | None, environ: Mapping[str, str], account: Path) -> Connection:
    configuration = Configuration()
    try:
        InClusterConfigLoader(
            token_filename=str(account / "token"),
            cert_filename=str(account / "ca.crt"),
            environ=environ,
        ).load_and_set(configuration)
    except ConfigException as error:
        raise ClusterError(
            f"running in a pod (KUBERNETES_SERVICE_HOST is set) but its service account is "
            f"unusable ({error}); mount the service account token (automountServiceAccountToken) "
            "or pass --kubeconfig"
        ) from None
    ns = namespace
    if not ns:
        try:
            ns = (account / "namespace").read_text().strip()
        except OSError:
            ns = ""
    ns = ns or DEFAULT_NAMESPACE
    log.info("cluster %s (in-cluster service account), namespace %s", configuration.host, ns)
    return Connection(ApiClient(configuration), ns, None, in_cluster=True)
