"""The doctor's decisions, alone: what a port speaks from its answers, and each check's verdict.

The probe is run against real servers on loopback (an HTTP/1.1 app, an h2c app, a TLS
server); the checks against the real control plane are in tests/test_cluster_doctor.py.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster.pki import Authority
from intercept.kube.doctor import (NEEDED, Access, image_check, pod_security_check, policy_check, protocol_check,
                                   rbac_check)
from intercept.kube.inject import InjectOptions
from intercept.kube.probe import Answers, classify, probe
from tests.apps import App
from tests.h2_app import H2App
from tests.realcluster import app


def dial(port: int):
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=10)


@pytest.mark.parametrize(("answers", "speaks", "routable"), [
    (Answers(False, b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 400 Bad Request\r\n"), ("HTTP/1.1",), True),
    (Answers(False, b"\x00\x00\x06\x04\x00\x00\x00\x00\x00", b"\x00\x00\x06\x04\x00\x00\x00\x00\x00"), ("h2c",), True),
    (Answers(False, b"HTTP/1.1 200 OK\r\n", b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"), ("HTTP/1.1", "h2c"), True),
    (Answers(True, b"HTTP/1.1 400 Bad Request\r\n", b""), ("TLS", "HTTP/1.1"), False),  # nginx's plain-HTTP-to-HTTPS 400
    (Answers(False, b"220 smtp.example ESMTP\r\n", b"220 smtp.example ESMTP\r\n"), (), False),
    (Answers(False, b"", b""), (), False),
])
def test_what_a_port_speaks_is_decided_from_its_answers(answers: Answers, speaks: tuple, routable: bool) -> None:
    verdict = classify(answers)
    assert verdict.speaks == speaks and verdict.routable == routable


def test_an_http1_app_is_found_to_speak_http1_only() -> None:
    served = App("cluster")
    try:
        verdict = probe(dial(served.port), "orders")
    finally:
        served.close()
    assert verdict.speaks == ("HTTP/1.1",) and verdict.routable, verdict
    assert verdict.seen.startswith("GET / answered 'HTTP/1.1 200")


def test_an_h2c_app_is_found_to_speak_h2c() -> None:
    served = H2App("grpc")
    try:
        verdict = probe(dial(served.port), "orders")
    finally:
        served.close()
    assert "h2c" in verdict.speaks and verdict.routable, verdict
    assert "the HTTP/2 preface was answered with SETTINGS" in verdict.seen


@pytest.fixture
def tls_port(tmp_path: Path) -> Iterator[int]:
    pair = Authority(tmp_path / "pki").serving("app", ["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert, pair.key)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except (OSError, ssl.SSLError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    server.close()
    thread.join(10)


def test_a_tls_port_fails_the_protocol_check_saying_nothing_can_be_routed(tls_port: int) -> None:
    verdict = probe(dial(tls_port), "orders")
    assert verdict.speaks[:1] == ("TLS",) and not verdict.routable
    check = protocol_check(f"pod web-1 port {tls_port}", verdict)
    assert check.status == "failed"
    assert "the agent relays TLS untouched, so no request can be routed by header" in check.message
    assert "plaintext HTTP" in check.fix


def test_rbac_names_every_denied_verb_and_the_can_i_command() -> None:
    check = rbac_check("shop", [Access("update", "deployments", "apps"), Access("create", "pods", "", "portforward")])
    assert check.status == "failed"
    assert check.message == "may not update deployments, create pods/portforward in namespace shop"
    assert "kubectl auth can-i update deployments -n shop" in check.fix
    assert rbac_check("shop", []).status == "ok"
    assert Access("create", "pods", "", "portforward") in NEEDED and Access("update", "deployments", "apps") in NEEDED
    # the cluster's names for the local process follow the Services and their endpoints
    assert {Access(v, "services") for v in ("list", "watch")} <= set(NEEDED)
    assert {Access(v, "endpointslices", "discovery.k8s.io") for v in ("list", "watch")} <= set(NEEDED)
    # intercept connect's own agent, where a namespace has none: its Deployment and its Secret (README)
    assert {Access("create", "deployments", "apps"), Access("create", "secrets")} <= set(NEEDED)


def test_the_default_image_passes_only_when_the_cluster_already_runs_it() -> None:
    image = "ghcr.io/intercept-dev/agent:0.1.0"
    unconfigured = image_check(image, None, [])
    assert unconfigured.status == "failed" and "--agent-image" in unconfigured.fix and "docker push" in unconfigured.fix
    assert image_check(image, None, ["web-1"]).status == "ok"
    assert image_check("registry.example/agent:1", "--agent-image", []).status == "ok"


def test_a_policy_that_admits_only_the_app_port_passes_unless_it_may_not_be_extended() -> None:
    objects = app("web", 1)
    for obj in objects:
        obj["metadata"]["namespace"] = "shop"
    options = InjectOptions(image="intercept.test/agent:1")
    assert policy_check(objects, "web", options, may_update=True).status == "ok"
    assert policy_check(objects, "web", options, may_update=False).status == "failed"
    forbidden = InjectOptions(image="intercept.test/agent:1", no_policy_changes=True)
    assert "--no-policy-changes" in policy_check(objects, "web", forbidden, may_update=True).message
    assert policy_check(objects[:2], "web", forbidden, may_update=False).status == "ok"  # no policy at all


def test_a_refusal_that_is_not_pod_security_is_not_blamed_on_the_level() -> None:
    quota = 'pods "orders-doctor-x" is forbidden: exceeded quota: compute, requested: cpu=1, limited: cpu=0'
    check = pod_security_check("shop", {"pod-security.kubernetes.io/enforce": "baseline"}, "Deployment/orders",
                                      quota)
    assert check.status == "failed" and "refused by the API server: " + quota in check.message
    assert "meet that level" not in check.fix and "fix what the API server names" in check.fix
    restricted = 'pods "x" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true'
    check = pod_security_check("shop", {"pod-security.kubernetes.io/enforce": "restricted"}, "Deployment/orders",
                                      restricted)
    assert check.status == "failed" and "meet that level" in check.fix
