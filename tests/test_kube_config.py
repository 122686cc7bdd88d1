"""Cluster access as kubectl finds it: kubeconfig, KUBECONFIG, context, namespace, in-cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from intercept.kube.config import connect
from intercept.kube.rest import Cluster, ClusterError
from tests.kubeapi import TOKEN, KubeAPI


def kubeconfig(path: Path, contexts: dict[str, str | None], current: str | None, server: str = "http://127.0.0.1:1",
               token: str = TOKEN) -> Path:
    """A kubeconfig with one cluster and user, and a context per name (with its namespace or none)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        **({"current-context": current} if current else {}),
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": "c", "user": "u", **({"namespace": ns} if ns else {})}}
                     for name, ns in contexts.items()],
    }))
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home and environment: no ~/.kube/config, no KUBECONFIG, not in a pod."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    return tmp_path


@pytest.fixture
def server() -> Iterator[KubeAPI]:
    with KubeAPI() as api:
        yield api


def test_the_current_context_and_its_namespace_are_used(home: Path) -> None:
    path = kubeconfig(home / "config", {"dev": "orders", "prod": None}, "dev")
    connection = connect(path)
    assert (connection.context, connection.namespace, connection.in_cluster) == ("dev", "orders", False)
    assert connection.api.configuration.host == "http://127.0.0.1:1"


def test_flags_choose_the_context_and_the_namespace(home: Path) -> None:
    path = kubeconfig(home / "config", {"dev": "orders", "prod": None}, "dev")
    assert connect(path, context="prod").namespace == "default"
    assert connect(path, context="dev", namespace="billing").namespace == "billing"


def test_kubeconfig_and_the_default_file_are_found_like_kubectl(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / ".kube").mkdir()
    kubeconfig(home / ".kube" / "config", {"home": "from-home"}, "home")
    assert connect().context == "home"
    first = kubeconfig(home / "a", {"a": "ns-a"}, "a")
    second = kubeconfig(home / "b", {"b": "ns-b"}, "b")
    monkeypatch.setenv("KUBECONFIG", f"{home / 'missing'}:{first}:{second}")
    connection = connect()
    assert (connection.context, connection.namespace) == ("a", "ns-a"), "the first file's current-context wins"
    assert connect(context="b").namespace == "ns-b", "contexts of every file are merged"


def test_an_unknown_context_lists_the_known_ones(home: Path) -> None:
    path = kubeconfig(home / "config", {"dev": None, "prod": None}, "dev")
    with pytest.raises(ClusterError) as raised:
        connect(path, context="staging")
    assert "context 'staging' is not in kubeconfig" in str(raised.value)
    assert "(contexts: dev, prod)" in str(raised.value)
    assert raised.value.exit_code == 11


def test_a_kubeconfig_without_a_current_context_asks_for_one(home: Path) -> None:
    path = kubeconfig(home / "config", {"dev": None}, None)
    with pytest.raises(ClusterError, match="has no current context; pass --context NAME"):
        connect(path)


def test_no_configuration_at_all_says_where_it_looked(home: Path) -> None:
    with pytest.raises(ClusterError) as raised:
        connect()
    assert "no cluster configuration found: no kubeconfig at ~/.kube/config" in str(raised.value)
    with pytest.raises(ClusterError, match="kubeconfig /nowhere/config does not exist"):
        connect("/nowhere/config")


def test_in_a_pod_the_service_account_is_used(home: Path) -> None:
    account = home / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("pod-token")
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (account / "namespace").write_text("workspaces\n")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    connection = connect(environ=environ, service_account_dir=account)
    assert connection.in_cluster and connection.context is None
    assert connection.namespace == "workspaces"
    assert connection.api.configuration.host == "https://10.96.0.1:443"
    assert connect(namespace="other", environ=environ, service_account_dir=account).namespace == "other"
    with pytest.raises(ClusterError, match="service account is unusable"):
        connect(environ=environ, service_account_dir=home / "nothing")


# stand-in: a 401 for a token, on demand.
def test_a_refused_token_says_to_log_in_again(home: Path, server: KubeAPI) -> None:
    path = kubeconfig(home / "config", {"dev": None}, "dev", server=server.url, token="expired")
    with pytest.raises(ClusterError) as raised:
        Cluster(connect(path).api).list("Service", "default")
    assert "401" in str(raised.value) and "log in to the cluster again" in str(raised.value)


# stand-in: a server that stops answering.
def test_an_unreachable_server_is_named(home: Path, server: KubeAPI) -> None:
    address = server.url
    server.stop()
    path = kubeconfig(home / "config", {"dev": None}, "dev", server=address)
    with pytest.raises(ClusterError) as raised:
        Cluster(connect(path).api).get("Service", "default", "orders")
    assert f"cannot reach the Kubernetes API server at {address}" in str(raised.value)
