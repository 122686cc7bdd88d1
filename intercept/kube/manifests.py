"""Offline inject and restore: YAML text in, YAML text out, the same pure transform as the cluster path.

In the manner of ``linkerd inject`` and ``istioctl kube-inject -f``: for GitOps users and
reviewers. Documents come back in their order, each as a YAML document (``---``
separated), keys in their original order, so that a diff shows only what changed;
comments are not kept (the YAML reader drops them). ``kind: List`` documents (what
``kubectl get -o yaml`` prints) are read as their items.
"""

from __future__ import annotations

from typing import Any

import yaml

from intercept.errors import UsageError
from intercept.kube import inject

Obj = dict[str, Any]


def load(text: str, source: str = "the manifests") -> list[Obj]:
    """The objects of a multi-document YAML text; empty documents skipped, Lists flattened."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        raise UsageError(f"{source} is not valid YAML ({error}); pass Kubernetes manifests with -f") from None
    objects: list[Obj] = []
    for doc in documents:
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc:
            raise UsageError(f"{source} holds a document that is not a Kubernetes object (no kind); "
                             "pass Kubernetes manifests with -f")
        if doc["kind"] == "List":
            objects += [item for item in doc.get("items") or [] if item]
        else:
            objects.append(doc)
    return objects


def dump(objects: list[Obj]) -> str:
    """Multi-document YAML, keys in their order, long strings (the record annotation) unwrapped."""
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False,
                              explicit_start=True, width=1 << 30, allow_unicode=True)


def inject_text(text: str, service: str, options: inject.InjectOptions,
                source: str = "the manifests") -> tuple[str, list[str]]:
    """``text`` with the agent injected behind ``service``, and one line per changed object."""
    objects = load(text, source)
    injected = inject.inject(objects, service, options)
    return dump(injected), inject.describe_changes(objects, injected)


def restore_text(text: str, source: str = "the manifests") -> tuple[str, list[str]]:
    """``text`` with every intercept change undone, and one line per restored object."""
    objects = load(text, source)
    restored = inject.restore(objects)
    return dump(restored), inject.describe_changes(objects, restored)
