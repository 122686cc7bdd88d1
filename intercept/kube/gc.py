"""``intercept gc --install``: the objects that run ``intercept gc`` in the cluster. Pure.

An hourly CronJob in the namespace runs the agent image (which holds ``intercept``) with a
ServiceAccount whose Role has only the verbs gc uses: read and delete the sandboxes'
forks, their Services and route ConfigMaps; restore an idle agent's workload, Service and
NetworkPolicies and delete its Secret; read pods and events while a rollout settles. In
the cluster it reaches the agents directly at their pod IPs, so it needs no port-forward.
"""

from __future__ import annotations

from typing import Any

NAME = "intercept-gc"
LABELS = {"app.kubernetes.io/managed-by": "intercept", "app.kubernetes.io/name": NAME}

RULES = [
    {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "replicasets"],
     "verbs": ["get", "list", "update", "delete"]},
    {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": ["get", "list", "create", "update", "delete"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "list", "update"]},
]


def install_objects(namespace: str, image: str, idle: float) -> list[dict[str, Any]]:
    """ServiceAccount, Role, RoleBinding and CronJob for gc in ``namespace``."""
    meta = {"name": NAME, "namespace": namespace, "labels": dict(LABELS)}
    restricted = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
                  "runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": dict(meta), "rules": RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": dict(meta),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
         "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}]},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": dict(meta), "spec": {
            "schedule": "17 * * * *",
            "concurrencyPolicy": "Forbid",
            "jobTemplate": {"spec": {"backoffLimit": 1, "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {
                    "serviceAccountName": NAME,
                    "restartPolicy": "OnFailure",
                    "containers": [{
                        "name": "gc", "image": image,
                        "command": ["intercept", "gc", "-n", namespace, "--idle", f"{idle:g}s"],
                        "securityContext": restricted,
                    }],
                },
            }}},
        }},
    ]
