"""Kubernetes: the only code that talks to the API server, and the pure transform it applies.

Nothing is imported here, so that ``intercept inject -f`` and the agent start without
loading the ``kubernetes`` client. The public API, by module:

- :mod:`~intercept.kube.inject` (pure): ``resolve``, ``inject``, ``restore``,
  ``describe_changes``, ``secret_name``, ``InjectOptions``, ``Target``.
- :mod:`~intercept.kube.manifests` (pure, offline): ``inject_text``, ``restore_text``,
  ``load``, ``dump``.
- :mod:`~intercept.kube.image`: ``DEFAULT_AGENT_IMAGE``, ``agent_image(flag)``.
- :mod:`~intercept.kube.config`: ``connect(kubeconfig, context, namespace) -> Connection``.
- :mod:`~intercept.kube.apply`: ``ensure_agent -> AgentInfo``, ``uninstall -> Uninstalled``,
  ``list_services``, ``agent_credentials``, ``RolloutFailed``.
- :mod:`~intercept.kube.pods`: ``PodEndpoint``, ``agent_pods``, ``watch_agent_pods``.
- :mod:`~intercept.kube.rollout` (pure): ``rollout_status -> RolloutStatus``.
- :mod:`~intercept.kube.rest`: ``Cluster`` (dicts over the REST paths), ``ClusterError``
  (exit code 11) and its ``NotFound``, ``Conflict``, ``Gone``.
"""
