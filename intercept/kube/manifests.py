"""Offline inject and restore: YAML text in, YAML text out, the same pure transform as the cluster path.

In the manner of ``linkerd inject`` and ``istioctl kube-inject -f``: for GitOps users and
reviewers. Documents come back in their order, each as a YAML document (``---``
separated), keys in their original order, so that a diff shows only what changed;
comments are not kept (the YAML reader drops them). ``kind: List`` documents (what
``kubectl get -o yaml`` prints) are read as their items.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from intercept.errors import UsageError
from intercept.kube import inject

Obj = dict[str, Any]


def load(text: str, source: str = "the manifests") -> list[Obj]:
    """The objects of a multi-document YAML text; empty documents skipped, Lists flattened."""
    try:
        documents = list(yaml.load_all(text, Loader=_Loader))
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


# Plain scalars that kubectl's reader (sigs.k8s.io/yaml, go-yaml v2) takes for a number
# (0800, 1e3, 0o644, 0x1F) or a boolean (y, n) where PyYAML's YAML 1.1 reads a string.
_GO_NOT_STRING = re.compile(r"""^(?:[-+]?(?:0[xX][0-9a-fA-F_]+|0[oObB][0-7_]+|[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9_]+)?
                               |\.[0-9_]+(?:[eE][-+]?[0-9_]+)?)|[yYnN])$""", re.X)
_GO_TAG = "tag:intercept.dev,2025:not-a-string-for-kubectl"
_STR, _INT, _FLOAT = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float"))


def _go_value(text: str) -> Any:
    """What kubectl reads for a plain scalar that :data:`_GO_NOT_STRING` matches (the text if a string)."""
    if text in ("y", "Y", "n", "N"):
        return text in ("y", "Y")
    plain = text.replace("_", "")
    try:
        if re.fullmatch(r"[-+]?0[0-7]+", plain):
            return int(plain, 8)
        return int(plain, 0)
    except ValueError:
        pass
    try:
        number = float(plain)
    except ValueError:
        return text
    if number in (float("inf"), float("-inf")):
        return text  # out of range for Go: kept as a string
    return int(number) if number.is_integer() and "." not in plain else number


class _Loader(yaml.SafeLoader):
    """Reads plain scalars as kubectl does where YAML 1.1 differs: Go numbers and y/n are
    not strings; ``1:20`` (YAML 1.1 base 60) and ``=`` are strings."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0]:
            if tag == _STR and _GO_NOT_STRING.match(value) and _go_value(value) is not value:
                return _GO_TAG
            if (tag in (_INT, _FLOAT) and ":" in value) or tag == "tag:yaml.org,2002:value":
                return _STR
        return tag


_Loader.add_constructor(_GO_TAG, lambda loader, node: _go_value(node.value))


class _Dumper(yaml.SafeDumper):
    """Quotes the strings that kubectl would read as something else.

    PyYAML writes a string plain when YAML 1.1 reads it back as a string, but kubectl's
    reader (sigs.k8s.io/yaml, go-yaml v2) takes ``0800``, ``1e3``, ``0o644`` for numbers and
    ``y``/``n`` for booleans: a plain one would fail ``kubectl apply`` (an env value or an
    annotation must be a string) or change a value.
    """


_Dumper.add_implicit_resolver(_GO_TAG, _GO_NOT_STRING, list("-+0123456789.yYnN"))


def dump(objects: list[Obj]) -> str:
    """Multi-document YAML, keys in their order, long strings (the record annotation) unwrapped."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
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
