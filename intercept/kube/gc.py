"""``intercept gc --install``: the objects that run ``intercept gc`` in the cluster. Pure.

An hourly CronJob in the namespace runs the CLI image (``intercept`` with the kubernetes
client, which the agent image leaves out) with a ServiceAccount whose Role grants what
``intercept gc -n NS`` does and nothing else. In the cluster it reaches the agents directly
at their pod IPs, so it needs no port-forward.

What it does, and so may do (each rule below says which step needs it):

- delete an expired sandbox: list the forks (Deployments) and their Services by label,
  delete them; take the sandbox's routes out of the routes ConfigMaps (list, get, update);
- ask each agent whether it is idle, and push the changed routes: list the agent pods, read
  the agent's Secret (its token) and the routes authority's (to sign the push);
- uninstall an idle agent, restoring its workload exactly: list Services, workloads and
  NetworkPolicies; update them (get again on a conflict); watch the rollout (get the
  workload, list its pods, delete an old pod that a StatefulSet with OnDelete or a bare
  ReplicaSet does not replace by itself; list events when it fails); delete the agent's
  Secret and routes ConfigMap, and the routes authority with the last of them;
- remove intercept connect's own agent once idle: get its Deployment and Secret, ask its
  pod as any agent's, delete both.

RBAC cannot narrow these to intercept's objects: ``resourceNames`` takes exact names, and
the agents' Secrets and ConfigMaps are named after workloads that come and go
(``intercept-<workload>``); nor can it select by label. So the Role can ``get`` and
``delete`` every Secret of the namespace by name (not list or watch them), ``update``
every workload, Service and NetworkPolicy, and ``delete`` every Deployment and Service.
It cannot create anything, read pods, or exec into them.
"""

from __future__ import annotations

from typing import Any

NAME = "intercept-gc"
LABELS = {"app.kubernetes.io/managed-by": "intercept", "app.kubernetes.io/name": NAME}

RULES = [
    # restore an idle agent's workload; delete a sandbox's forks (Deployments only)
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "update", "delete"]},
    {"apiGroups": ["apps"], "resources": ["statefulsets", "replicasets"], "verbs": ["get", "list", "update"]},
    # restore a Service; delete a fork's Service; the sandboxes' routes ConfigMaps
    {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": ["get", "list", "update", "delete"]},
    # an agent's token and the routes authority (get, by name); an uninstalled agent's Secret (delete)
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "delete"]},
    # find the agent pods; replace an old pod the controller leaves to its user
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "list", "update"]},
]


def install_objects(namespace: str, image: str, idle: float) -> list[dict[str, Any]]:
    """ServiceAccount, Role, RoleBinding and CronJob for gc in ``namespace``; the Job runs ``image``."""
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
                        # uid 65532 has no account in the image, and asyncssh's client refuses to
                        # connect to an agent without a local user name (getpass.getuser)
                        "env": [{"name": "USER", "value": NAME}],
                        "securityContext": restricted,
                    }],
                },
            }}},
        }},
    ]
