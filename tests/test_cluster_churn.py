"""Every replica knows every active route from its first request, on the real cluster.

A pod that becomes Ready after a delete, a rollout or a scale-up reads the routes of the
developers intercepting its workload from the mounted routes ConfigMap (their clients
keep them there), and holds a matching request until that developer's session arrives,
instead of answering it with the app; and ``ready`` is printed only once every replica
holds the route.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading

from e2e.cluster.api import wait_until
from tests.conftest import free_port
from tests.realcluster import WAIT, Endpoint, RealCluster, app, deploy, served_by, start


def _answer(endpoint: Endpoint, headers: dict[str, str]) -> str | None:
    """Who answered (X-Served-By), or None when the pod went away meanwhile (not a misroute)."""
    try:
        return served_by(endpoint, headers)
    except (OSError, AssertionError, http.client.HTTPException):  # cut mid-response (IncompleteRead) too
        return None


def test_a_replacement_pod_holds_a_developers_request_until_their_session_arrives(
    real_cluster: RealCluster, namespace_of
) -> None:
    ns = namespace_of("churn")
    deploy(real_cluster, ns, app("churn", 2))
    real_cluster.wait_ready(ns, "churn", 2)
    # a hold long enough for a client frozen (below) while a pod is replaced on a busy machine
    alice = start(real_cluster, ns, "churn", free_port(), "--hold-timeout", "90", served_as="alice")
    alice.wait_for(r"^intercept: ready: ", timeout=WAIT)
    bob = start(real_cluster, ns, "churn", free_port(), name="bob", header="x-dev=bob", served_as="bob")
    misrouted: list[tuple[str, str, str]] = []
    stop = threading.Event()
    # While alice's client is frozen, the agents she was connected to may drop her after their
    # keepalive (about 10 s: a developer who has gone) and answer her requests themselves; her
    # requests are loaded only while she is running and back on every pod.
    frozen = threading.Event()
    # A pod the test deletes keeps serving for the agent's shutdown grace while the clients have
    # already let it go (a terminating pod is no longer one of the replicas), so what it answers
    # then is not judged here: a known gap, said in the README ("Every replica").
    deleted: set[str] = set()

    def load() -> None:  # both developers' requests through every ready pod, until told to stop
        while not stop.is_set():
            for endpoint in real_cluster.endpoints(ns, "churn"):
                for developer in ("bob",) if frozen.is_set() else ("alice", "bob"):
                    answered = _answer(endpoint, {"x-dev": developer})
                    if answered not in (None, developer) and endpoint.pod not in deleted:
                        misrouted.append((endpoint.pod, developer, answered))

    try:
        for client in (alice, bob):
            client.wait_for(r"^intercept: ready: .*\(2 replicas\)$", timeout=WAIT)
        loading = threading.Thread(target=load, daemon=True)
        loading.start()

        # A pod deleted while alice's client is frozen: its replacement becomes Ready before she can
        # connect to it, and must hold her request until she does.
        old = {e.pod for e in real_cluster.wait_ready(ns, "churn", 2)}
        frozen.set()
        os.kill(alice.p.pid, signal.SIGSTOP)
        try:
            deleted.add(sorted(old)[0])
            real_cluster.delete("Pod", ns, sorted(old)[0])
            fresh = wait_until(lambda: next((e for e in real_cluster.endpoints(ns, "churn") if e.pod not in old), None),
                               "the replacement pod's ready endpoint", WAIT)
            held: list[str | None] = []
            waiting = threading.Thread(target=lambda: held.append(_answer(fresh, {"x-dev": "alice"})), daemon=True)
            waiting.start()
            bob.wait_for(rf"^intercept: joined: replica {fresh.pod}: ", timeout=WAIT)
        finally:
            os.kill(alice.p.pid, signal.SIGCONT)
        waiting.join(WAIT)
        assert held == ["alice"]  # held by the new pod until alice's session took the route over
        wait_until(lambda: all(_answer(e, {"x-dev": "alice"}) == "alice"
                               for e in real_cluster.endpoints(ns, "churn")) or None,
                   "alice's requests to reach her through every pod again", WAIT)
        frozen.clear()

        # Two more deletes under the same steady load of both developers.
        for _ in range(2):
            before = {e.pod for e in real_cluster.wait_ready(ns, "churn", 2)}
            mark = len(bob.lines)
            deleted.add(sorted(before)[-1])
            real_cluster.delete("Pod", ns, sorted(before)[-1])
            bob.wait_for(r"^intercept: joined: ", start=mark, timeout=WAIT)
            real_cluster.wait_ready(ns, "churn", 2)
        stop.set()
        loading.join(WAIT)
        assert misrouted == []
    finally:
        stop.set()
        alice.stop()
        bob.stop()


def test_the_first_request_at_ready_reaches_the_developer_through_every_pod(real_cluster: RealCluster,
                                                                              namespace_of) -> None:
    ns = namespace_of("first")
    deploy(real_cluster, ns, app("first", 3))
    real_cluster.wait_ready(ns, "first", 3)
    alice = start(real_cluster, ns, "first", free_port(), served_as="alice")
    try:
        alice.wait_for(r"^intercept: ready: .*\(3 replicas\)$", timeout=WAIT)
        endpoints = real_cluster.endpoints(ns, "first")  # at once: what the Service sends to now
        assert [served_by(e, {"x-dev": "alice"}) for e in endpoints] == ["alice"] * len(endpoints)
    finally:
        alice.stop()
