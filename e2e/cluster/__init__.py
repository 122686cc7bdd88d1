"""A real Kubernetes control plane for the tests, with no container engine.

- :mod:`e2e.cluster.build`: kube-apiserver, kube-controller-manager, kube-scheduler,
  kubectl, etcd and kwok built from the Go modules beside it, cached by their go.sum;
- :mod:`e2e.cluster.controlplane`: those processes on loopback, with a CA, RBAC and
  admission (PodSecurity included);
- :mod:`e2e.cluster.kubelet`: the pods of the simulated node run as real processes,
  each pod in its own network namespace (:mod:`e2e.cluster.network`), by image
  (:mod:`e2e.cluster.images`);
- :mod:`e2e.cluster.harness`: all of it started and stopped together; ``python -m
  e2e.cluster up --state DIR`` runs it by hand.
"""
