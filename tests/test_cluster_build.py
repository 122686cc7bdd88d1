"""The Go modules that build the control plane: the generated staging ``replace`` list, and the pins agree."""

from __future__ import annotations

import re

import pytest

from e2e.cluster.build import HERE, BuildFailed, staging_replaces

KUBERNETES_GO_MOD = """module k8s.io/kubernetes

go 1.26.0

require (
	k8s.io/api v0.0.0
	k8s.io/client-go v0.0.0
)

replace (
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/client-go => ./staging/src/k8s.io/client-go
	k8s.io/kube-openapi => k8s.io/kube-openapi v0.0.0-20260317180543-43fb72c5454a
)
"""


def test_every_local_staging_replace_becomes_the_tag_of_the_release() -> None:
    assert staging_replaces(KUBERNETES_GO_MOD, "v1.37.2") == [("k8s.io/api", "v0.37.2"), ("k8s.io/client-go", "v0.37.2")]


def test_a_go_mod_without_staging_replaces_is_an_error_not_an_empty_list() -> None:
    with pytest.raises(BuildFailed, match="replaces no staging module"):
        staging_replaces("module k8s.io/kubernetes\n", "v1.37.2")


def test_the_committed_kube_module_replaces_every_staging_module_with_the_release_it_builds() -> None:
    go_mod = (HERE / "kube" / "go.mod").read_text()
    release = re.search(r"^\tk8s\.io/kubernetes (v1\.\d+\.\d+)", go_mod, re.M)[1]
    replaced = dict(re.findall(r"^\t(k8s\.io/[\w.-]+) => \1 (\S+)$", go_mod, re.M))
    assert len(replaced) >= 30 and {"k8s.io/api", "k8s.io/apiserver", "k8s.io/client-go"} <= set(replaced)
    assert set(replaced.values()) == {"v0." + release.removeprefix("v1.")}
    for module in ("kube", "etcd"):
        assert "\ntool " in (HERE / module / "go.mod").read_text() or "\ntool (" in (HERE / module / "go.mod").read_text()
        assert (HERE / module / "go.sum").is_file(), f"{module}/go.sum is committed"
