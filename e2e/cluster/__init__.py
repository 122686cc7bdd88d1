"""A real Kubernetes cluster for the tests, on this machine: a real control plane and a real node.

- :mod:`e2e.cluster.build`: kube-apiserver, kube-controller-manager, kube-scheduler,
  kubectl, the kubelet, kube-proxy and etcd built from the Go modules beside it (and the
  pod sandbox's pause), cached by their go.sum;
- :mod:`e2e.cluster.images`: the images the node runs (the agent's from
  ``agent_image/Dockerfile``), built with mmdebstrap and buildah, cached by their inputs;
- :mod:`e2e.cluster.controlplane`: the control plane's processes, with a CA, RBAC and
  admission (PodSecurity included);
- :mod:`e2e.cluster.node`: the node: containerd and runc, the kubelet, kube-proxy, CNI
  networking and cluster DNS (:mod:`e2e.cluster.dns`), in a network namespace of its own;
- :mod:`e2e.cluster.host`: every change to this machine, recorded before it is made and
  undone from that record (also after the harness is killed);
- :mod:`e2e.cluster.harness`: all of it started and stopped together; ``python -m
  e2e.cluster up --state DIR`` runs it by hand.
"""
