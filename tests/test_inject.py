"""The manifest transform, tested alone: inject the agent, restore the originals, exactly.

Run over every Service of a microservice shop built by ``tests/shop.py`` in the shape of
Google's Online Boutique (with its network policies), and of the real Online Boutique
when its manifests are beside the checkout, and over small hand-made manifests for the shapes the demo lacks (named targetPorts, several
ports, headless, ExternalName, StatefulSets, shared policies). Where a test checks what
the cluster will do (which port a Service reaches, which rule admits a packet) it
re-derives it with its own small model of Kubernetes, not with the code under test.
"""

from __future__ import annotations

import copy
import json
import re

import kubernetes_validate
import pytest
import yaml

from intercept.errors import InjectError, ResolveError, UsageError
from intercept.kube import manifests
from intercept import agentconfig
from intercept.kube.inject import (
    AGENT_CONTAINER,
    ANNOTATION,
    check_serves,
    InjectOptions,
    describe_changes,
    inject,
    is_injected,
    resolve,
    restore,
    secret_name,
    served_ports,
)
from tests import shop

KUBERNETES_VERSION = "1.31"  # pinned: the schemas kubernetes-validate checks against
# The corpora: the shop built by tests/shop.py, always; the real Online Boutique too when
# it is beside the checkout. The tests that name services use the shop.
CORPORA = {name: (manifests, policies, manifests + policies) for name, (manifests, policies) in shop.corpora().items()}
MANIFESTS, POLICIES, BOUTIQUE = CORPORA["shop"]
SERVICES = [o["metadata"]["name"] for o in MANIFESTS if o["kind"] == "Service"]
CASES = [pytest.param(corpus, o["metadata"]["name"], id=f"{corpus}-{o['metadata']['name']}")
         for corpus, (manifests, _, _) in CORPORA.items() for o in manifests if o["kind"] == "Service"]
OPTIONS = InjectOptions(image="registry.example/intercept-agent:0.1.0")
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


# --------------------------------------------------------------------------- a small model of Kubernetes


def boutique(corpus: str = "shop") -> list[dict]:
    """A fresh copy, so that a test that mutated its input cannot hide behind another's."""
    return copy.deepcopy(CORPORA[corpus][2])


def find(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def pod_of(workload):
    return workload["spec"]["template"]["spec"]


def container(workload, name):
    return next(c for c in pod_of(workload)["containers"] if c["name"] == name)


def agent_of(workload):
    return container(workload, AGENT_CONTAINER)


def env_of(c) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def selected_workload(objects, service):
    selector = service["spec"]["selector"]
    return next(
        o for o in objects
        if o["kind"] in ("Deployment", "StatefulSet", "ReplicaSet")
        and all(o["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
    )


def endpoint_port(pod, target) -> int | None:
    """What the endpoints controller does with a targetPort: a name is looked up in order."""
    if isinstance(target, int):
        return target
    for c in pod["containers"]:
        for p in c.get("ports", []):
            if p.get("name") == target:
                return p["containerPort"]
    return None


def owner_of_port(pod, number) -> str | None:
    return next((c["name"] for c in pod["containers"] for p in c.get("ports", [])
                 if p["containerPort"] == number), None)


def service_reaches(objects, service_name, index=0) -> tuple[int, str | None]:
    """(pod port, container) that a Service port's traffic lands on."""
    service = find(objects, "Service", service_name)
    port = service["spec"]["ports"][index]
    pod = pod_of(selected_workload(objects, service))
    number = endpoint_port(pod, port.get("targetPort", port["port"]))
    return number, owner_of_port(pod, number)


def probe_port(c, probe) -> int:
    """The port a kubelet probe hits: names resolve within the probed container."""
    handler = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
    port = handler["port"]
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p.get("name") == port)


def admitting_rules(objects, workload, port: int) -> set[tuple[str, int]]:
    """(policy, rule index) of every ingress rule that admits TCP ``port`` to the workload's pods."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    names = {p["name"]: p["containerPort"] for c in pod_of(workload)["containers"]
             for p in c.get("ports", []) if "name" in p}
    found = set()
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        wanted = spec["podSelector"].get("matchLabels", {})
        if any(labels.get(k) != v for k, v in wanted.items()):
            continue
        if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
            continue
        for i, rule in enumerate(spec.get("ingress", [])):
            entries = rule.get("ports")
            if not entries or any(
                e.get("protocol", "TCP") == "TCP"
                and (e.get("port") is None or names.get(e["port"], e["port"]) == port)
                for e in entries
            ):
                found.add((policy["metadata"]["name"], i))
    return found


def policies_selecting(objects, workload) -> set[str]:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return {
        o["metadata"]["name"] for o in objects if o["kind"] == "NetworkPolicy"
        and all(labels.get(k) == v for k, v in o["spec"]["podSelector"].get("matchLabels", {}).items())
    }


def assert_restricted(pod, c) -> None:
    """Pod Security Standards, "restricted" profile, for one container (plus read-only root)."""
    sc, pod_sc = c.get("securityContext", {}), pod.get("securityContext", {})
    assert sc.get("allowPrivilegeEscalation") is False
    assert "ALL" in sc.get("capabilities", {}).get("drop", [])
    assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
    assert sc.get("privileged") is not True
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) != 0
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    assert seccomp.get("type") in ("RuntimeDefault", "Localhost")
    assert sc.get("readOnlyRootFilesystem") is True
    assert all("hostPort" not in p for p in c.get("ports", []))


def validate(objects) -> None:
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def assert_sane_pod_ports(pod) -> None:
    """What the API server checks and the JSON schemas do not: port names and clashes."""
    ports = [p for c in pod["containers"] for p in c.get("ports", [])]
    numbers = [p["containerPort"] for p in ports]
    assert len(numbers) == len(set(numbers)), numbers
    names = [p["name"] for p in ports if "name" in p]
    assert len(names) == len(set(names)), names
    assert all(IANA_SVC_NAME.match(n) for n in names), names


# --------------------------------------------------------------------------- every Online Boutique Service


@pytest.mark.parametrize("corpus, service", CASES)
def test_every_fixture_service_resolves_to_its_deployment(corpus, service):
    target = resolve(CORPORA[corpus][2], service)
    svc = find(CORPORA[corpus][2], "Service", service)
    assert target.workload == f"Deployment/{selected_workload(CORPORA[corpus][2], svc)['metadata']['name']}"
    assert target.container_port == svc["spec"]["ports"][0]["targetPort"]


@pytest.mark.parametrize("corpus, service", CASES)
def test_injected_manifests_validate_against_the_kubernetes_schemas(corpus, service):
    injected = inject(boutique(corpus), service, OPTIONS)
    validate(injected)
    workload = find(injected, "Deployment", resolve(CORPORA[corpus][2], service).workload_name)
    assert_sane_pod_ports(pod_of(workload))


@pytest.mark.parametrize("corpus, service", CASES)
def test_restore_gives_back_exactly_the_original_manifests(corpus, service):
    objects = boutique(corpus)
    injected = inject(objects, service, OPTIONS)
    assert injected != CORPORA[corpus][2]
    assert objects == CORPORA[corpus][2], "inject mutated its input"
    assert restore(injected) == CORPORA[corpus][2]
    # The offline path prints YAML and reads it back: the record must survive that too.
    reread = list(yaml.safe_load_all(yaml.safe_dump_all(injected)))
    assert restore(reread) == CORPORA[corpus][2]


@pytest.mark.parametrize("corpus, service", CASES)
def test_injecting_twice_changes_nothing(corpus, service):
    once = inject(boutique(corpus), service, OPTIONS)
    twice = inject(once, service, OPTIONS)
    assert twice == once
    assert all(a is b for a, b in zip(once, twice)), "an unchanged object was replaced"


@pytest.mark.parametrize("corpus, service", CASES)
def test_only_the_workload_the_service_and_its_policies_change(corpus, service):
    objects = boutique(corpus)
    injected = inject(objects, service, OPTIONS)
    target = resolve(objects, service)
    changed = {(a["kind"], a["metadata"]["name"]) for a, b in zip(objects, injected) if a is not b}
    allowed = {(target.workload_kind, target.workload_name), ("Service", service)}
    workload = find(objects, "Deployment", target.workload_name)
    allowed |= {("NetworkPolicy", n) for n in policies_selecting(objects, workload)}
    assert (target.workload_kind, target.workload_name) in changed
    assert changed <= allowed
    assert all(is_injected(b) for a, b in zip(objects, injected) if a is not b)


@pytest.mark.parametrize("corpus, service", CASES)
def test_agent_container_passes_the_restricted_pod_security_profile(corpus, service):
    injected = inject(boutique(corpus), service, OPTIONS)
    workload = find(injected, "Deployment", resolve(CORPORA[corpus][2], service).workload_name)
    agent = agent_of(workload)
    assert_restricted(pod_of(workload), agent)
    assert agent["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert agent["securityContext"]["runAsNonRoot"] is True
    secret_volumes = [v for v in pod_of(workload)["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in secret_volumes] == [secret_name(workload["metadata"]["name"])]
    assert agent["resources"]["requests"] and agent["resources"]["limits"]


@pytest.mark.parametrize("corpus, service", CASES)
def test_service_traffic_reaches_the_agent_which_forwards_to_the_app(corpus, service):
    before_port, before_container = service_reaches(CORPORA[corpus][2], service)
    injected = inject(boutique(corpus), service, OPTIONS)
    after_port, after_container = service_reaches(injected, service)
    agent = agent_of(selected_workload(injected, find(injected, "Service", service)))
    env = env_of(agent)
    assert after_container == AGENT_CONTAINER
    assert env["INTERCEPT_LISTEN"] == f"0.0.0.0:{after_port}"
    assert env["INTERCEPT_UPSTREAM"] == f"127.0.0.1:{before_port}"
    assert agent["readinessProbe"] == {"tcpSocket": {"port": after_port}, "periodSeconds": 5}
    assert before_container != AGENT_CONTAINER


@pytest.mark.parametrize("corpus, service", CASES)
def test_app_container_probes_still_reach_the_app(corpus, service):
    target = resolve(CORPORA[corpus][2], service)
    injected = inject(boutique(corpus), service, OPTIONS)
    before = container(find(CORPORA[corpus][2], "Deployment", target.workload_name), target.container)
    after = container(find(injected, "Deployment", target.workload_name), target.container)
    for key in ("livenessProbe", "readinessProbe", "startupProbe"):
        if key in before:
            assert probe_port(after, after[key]) == probe_port(before, before[key])


@pytest.mark.parametrize("corpus, service", CASES)
def test_agent_receives_the_app_environment_and_read_only_mounts(corpus, service):
    target = resolve(CORPORA[corpus][2], service)
    injected = inject(boutique(corpus), service, OPTIONS)
    workload = find(injected, "Deployment", target.workload_name)
    app, agent = container(workload, target.container), agent_of(workload)
    assert agent["env"][: len(app.get("env", []))] == app.get("env", [])
    assert agent.get("envFrom") == app.get("envFrom")
    copied = [m for m in agent["volumeMounts"] if m["mountPath"] not in ("/var/run/intercept", "/var/run/intercept-routes")]
    assert copied == [dict(m, readOnly=True) for m in app.get("volumeMounts", [])]
    assert {"name": "INTERCEPT_CREDENTIALS", "value": "/var/run/intercept/credentials.json"} in agent["env"]
    assert env_of(agent)["INTERCEPT_ROUTES_FILE"] == "/var/run/intercept-routes/routes.json"
    routes = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v.get("configMap", {}).get("name") == f"intercept-{target.workload_name}")
    assert routes["configMap"]["optional"] is True  # no sandbox yet: the pod starts anyway
    assert env_of(agent)["INTERCEPT_ALLOW_OUTBOUND"] == "true"
    assert env_of(agent)["INTERCEPT_HOLD_TIMEOUT"] == "10"
    assert env_of(agent)["INTERCEPT_SSH_LISTEN"].startswith("0.0.0.0:")


@pytest.mark.parametrize("corpus, service", CASES)
def test_policies_admit_the_agent_wherever_they_admitted_the_app(corpus, service):
    target = resolve(CORPORA[corpus][2], service)
    injected = inject(boutique(corpus), service, OPTIONS)
    agent_port, _ = service_reaches(injected, service)
    original_workload = find(CORPORA[corpus][2], "Deployment", target.workload_name)
    before = admitting_rules(CORPORA[corpus][2], original_workload, target.container_port)
    after_workload = find(injected, "Deployment", target.workload_name)
    assert admitting_rules(injected, after_workload, agent_port) >= before
    # Direct traffic to the app's port is admitted as before.
    assert admitting_rules(injected, after_workload, target.container_port) == before


@pytest.mark.parametrize("corpus, service", CASES)
def test_no_policy_changes_refuses_naming_the_policy_that_would_cut_traffic(corpus, service):
    target = resolve(CORPORA[corpus][2], service)
    objects = boutique(corpus)
    workload = find(objects, "Deployment", target.workload_name)
    app_only = (admitting_rules(objects, workload, target.container_port)
                - admitting_rules(objects, workload, 9900))
    options = InjectOptions(image=OPTIONS.image, no_policy_changes=True)
    if app_only:
        with pytest.raises(InjectError) as caught:
            inject(objects, service, options)
        message = str(caught.value)
        assert all(f"NetworkPolicy/{policy}" in message for policy, _ in app_only)
        assert "--no-policy-changes" in message and "9900" in message
    else:  # frontend: its policy admits every port
        injected = inject(objects, service, options)
        assert [o for o in injected if o["kind"] == "NetworkPolicy"] == CORPORA[corpus][1]


def test_the_fixture_policies_are_extended_for_most_services():
    """Guards the parametrized policy tests against passing vacuously."""
    extended = [s for s in SERVICES
                if any(a != b and a["kind"] == "NetworkPolicy"
                       for a, b in zip(BOUTIQUE, inject(boutique(), s, OPTIONS)))]
    assert set(SERVICES) - set(extended) == {"frontend", "frontend-external"}


@pytest.mark.parametrize(("corpus", "name"), CASES)
def test_offline_restore_gives_back_the_manifests_text_keys_in_their_order(corpus, name):
    # a reviewer diffs `intercept restore -f` against the original: only what changed may differ
    text = manifests.dump(boutique(corpus))
    named = manifests.dump([deployment(containers=[app_container(
        ports=[{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        readinessProbe={"httpGet": {"port": "http", "path": "/"}, "periodSeconds": 5})]), service()])
    for source, target in ((text, name), (named, "orders")):
        injected, _ = manifests.inject_text(source, target, OPTIONS)
        assert manifests.restore_text(injected)[0] == source


class KubectlLoader(yaml.SafeLoader):
    """Plain scalars as kubectl reads them (sigs.k8s.io/yaml, go-yaml v2) where PyYAML reads a
    string: Go numbers (0800, 1e3, 0o644) and y/n booleans. Each comes back as a ``GoValue``."""


class GoValue(str):
    pass


KubectlLoader.add_implicit_resolver(
    "tag:kubectl,go-value",
    re.compile(r"^(?:[-+]?(?:0[xX][0-9a-fA-F_]+|0[oObB][0-7_]+|[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9_]+)?"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9_]+)?)|[yYnN])$"),
    list("-+0123456789.yYnN"))
KubectlLoader.add_constructor("tag:kubectl,go-value", lambda loader, node: GoValue(node.value))


def test_offline_output_keeps_strings_that_kubectl_would_read_as_numbers_or_booleans():
    tricky = ["0800", "08540", "1e3", "0o644", "y", "N", "1_000", "0x1F", "+1", "yes", "1.0"]
    app = app_container(env=[{"name": f"V{i}", "value": v} for i, v in enumerate(tricky)])
    objects = [deployment(containers=[app]), service()]
    objects[0]["metadata"]["annotations"] = {"build": "1e3"}
    text = manifests.dump(objects)
    injected, _ = manifests.inject_text(text, "orders", OPTIONS)
    for output in (text, injected, manifests.restore_text(injected)[0]):
        read = list(yaml.load_all(output, Loader=KubectlLoader))
        assert [e["value"] for e in container(read[0], "app")["env"]] == tricky
        assert not any(isinstance(e["value"], GoValue) for e in container(read[0], "app")["env"])
        assert not isinstance(read[0]["metadata"]["annotations"]["build"], GoValue)


def test_offline_input_is_read_as_kubectl_reads_it():
    # plain scalars that kubectl (sigs.k8s.io/yaml) reads otherwise than YAML 1.1 does
    text = manifests.dump([deployment(volumes=[{"name": "conf", "configMap": {"name": "orders"}}]), service()])
    text = text.replace("image: example/orders:1\n", "image: example/orders:1\n        env:\n"
                        "        - {name: A, value: 1:20}\n        - {name: B, value: =}\n", 1)
    text = text.replace("name: orders\n---", "name: orders\n          defaultMode: 0o644\n---", 1)
    objects = manifests.load(text)
    assert pod_of(objects[0])["volumes"][0]["configMap"]["defaultMode"] == 420
    assert [e["value"] for e in container(objects[0], "app")["env"]] == ["1:20", "="]
    workload = next(yaml.load_all(manifests.inject_text(text, "orders", OPTIONS)[0], Loader=KubectlLoader))
    assert pod_of(workload)["volumes"][0]["configMap"]["defaultMode"] == 420
    assert [e["value"] for e in container(workload, "app")["env"]] == ["1:20", "="]


def test_every_service_injected_one_after_another_restores_exactly():
    objects = boutique()
    for service in SERVICES:
        objects = inject(objects, service, OPTIONS)
    validate(objects)
    for service in SERVICES:  # frontend and frontend-external share one agent
        assert service_reaches(objects, service)[1] == AGENT_CONTAINER
    assert restore(objects) == BOUTIQUE


def test_restoring_one_workload_keeps_the_others_injected():
    objects = inject(inject(boutique(), "adservice", OPTIONS), "cartservice", OPTIONS)
    partly = restore(objects, workload="Deployment/adservice")
    assert find(partly, "Deployment", "adservice") == find(BOUTIQUE, "Deployment", "adservice")
    assert find(partly, "Service", "adservice") == find(BOUTIQUE, "Service", "adservice")
    assert find(partly, "NetworkPolicy", "adservice") == find(BOUTIQUE, "NetworkPolicy", "adservice")
    assert is_injected(find(partly, "Deployment", "cartservice"))
    assert is_injected(find(partly, "NetworkPolicy", "cartservice"))
    assert restore(partly) == BOUTIQUE


def test_describe_changes_names_each_changed_object():
    injected = inject(boutique(), "adservice", OPTIONS)
    lines = describe_changes(BOUTIQUE, injected)
    assert [line.split(":")[0] for line in lines] == [
        "Deployment/adservice", "Service/adservice", "NetworkPolicy/adservice"]
    assert "forwards to server:9555" in lines[0]
    assert describe_changes(injected, restore(injected)) == [
        "Deployment/adservice: restored", "Service/adservice: restored", "NetworkPolicy/adservice: restored"]


# --------------------------------------------------------------------------- upgrade, options


def test_an_agent_of_another_version_is_upgraded_in_place():
    old = InjectOptions(image="registry.example/intercept-agent:0.0.9", agent_version="0.0.9")
    first = inject(boutique(), "emailservice", old)
    upgraded = inject(first, "emailservice", OPTIONS)
    assert upgraded == inject(boutique(), "emailservice", OPTIONS)
    assert agent_of(find(upgraded, "Deployment", "emailservice"))["image"] == OPTIONS.image
    containers = pod_of(find(upgraded, "Deployment", "emailservice"))["containers"]
    assert [c["name"] for c in containers] == ["server", AGENT_CONTAINER]
    assert restore(upgraded) == BOUTIQUE


def test_outbound_and_hold_timeout_reach_the_agent_environment():
    options = InjectOptions(image=OPTIONS.image, outbound=False, hold_timeout=2.5)
    env = env_of(agent_of(find(inject(boutique(), "adservice", options), "Deployment", "adservice")))
    assert env["INTERCEPT_ALLOW_OUTBOUND"] == "false"
    assert env["INTERCEPT_FORWARDED_HEADERS"] == "true"
    quiet = InjectOptions(image=OPTIONS.image, forwarded_headers=False)
    assert env_of(agent_of(find(inject(boutique(), "adservice", quiet), "Deployment", "adservice")))["INTERCEPT_FORWARDED_HEADERS"] == "false"
    assert env["INTERCEPT_HOLD_TIMEOUT"] == "2.5"


@pytest.mark.parametrize("image", ["", "has space:1"])
def test_a_malformed_agent_image_is_a_usage_error(image):
    with pytest.raises(UsageError, match="--agent-image"):
        InjectOptions(image=image)


def test_secret_name_follows_the_workload_and_fits_a_dns_subdomain():
    assert secret_name("orders") == "intercept-orders"
    long = secret_name("a" * 253)
    assert len(long) <= 253 and long.startswith("intercept-a") and long != secret_name("a" * 252)


# --------------------------------------------------------------------------- hand-made manifests


def deployment(name="orders", containers=None, labels=None, volumes=None, **pod) -> dict:
    labels = labels or {"app": name}
    spec = {"containers": containers or [app_container()], **pod}
    if volumes is not None:
        spec["volumes"] = volumes
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": spec}},
    }


def app_container(name="app", ports=None, **fields) -> dict:
    ports = [{"name": "http", "containerPort": 8080}] if ports is None else ports
    c = {"name": name, "image": "example/orders:1", **fields}
    if ports:
        c["ports"] = ports
    return c


def service(name="orders", ports=None, selector=None, **spec) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"selector": {"app": name} if selector is None else selector,
                 "ports": ports or [{"name": "http", "port": 80, "targetPort": "http"}], **spec},
    }


def policy(name, selector, ports, section="ingress") -> dict:
    peer = "from" if section == "ingress" else "to"
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name},
        "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": [section.capitalize()],
                 section: [{peer: [{"podSelector": {"matchLabels": {"app": "client"}}}],
                            "ports": ports}]},
    }


def roundtrip(objects, name="orders", options=OPTIONS) -> list[dict]:
    """Inject, check the universal invariants, return the injected objects."""
    original = copy.deepcopy(objects)
    injected = inject(objects, name, options)
    assert objects == original
    validate(injected)
    assert restore(injected) == original
    assert inject(injected, name, options) == injected
    return injected


def test_named_target_port_is_taken_over_by_renaming_the_app_port():
    probe = {"httpGet": {"path": "/healthz", "port": "http"}}
    app = app_container(livenessProbe=probe, readinessProbe={"tcpSocket": {"port": "http"}},
                        startupProbe={"httpGet": {"path": "/", "port": 8080}},
                        lifecycle={"preStop": {"httpGet": {"path": "/quit", "port": "http"}}})
    objects = [deployment(containers=[app]), service()]
    injected = roundtrip(objects)
    pod = pod_of(injected[0])
    assert_sane_pod_ports(pod)
    assert injected[1] == objects[1], "a named targetPort needs no Service change"
    assert service_reaches(injected, "orders") == (9900, AGENT_CONTAINER)
    new_app = container(injected[0], "app")
    assert new_app["ports"] == [{"name": "app-http", "containerPort": 8080}]
    for key in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert probe_port(new_app, new_app[key]) == 8080
    assert new_app["lifecycle"]["preStop"]["httpGet"]["port"] == "app-http"
    assert env_of(agent_of(injected[0]))["INTERCEPT_UPSTREAM"] == "127.0.0.1:8080"


def test_named_target_port_on_a_fixture_service():
    objects = boutique()
    find(objects, "Service", "currencyservice")["spec"]["ports"][0]["targetPort"] = "grpc"
    original = copy.deepcopy(objects)
    injected = roundtrip(objects, "currencyservice")
    assert find(injected, "Service", "currencyservice") == find(original, "Service", "currencyservice")
    assert service_reaches(injected, "currencyservice") == (9900, AGENT_CONTAINER)
    assert [p["name"] for p in agent_of(find(injected, "Deployment", "currencyservice"))["ports"]] == [
        "grpc", "intercept-ssh"]


def test_numeric_target_port_points_the_service_at_the_agent():
    objects = [deployment(), service(ports=[{"name": "http", "port": 80, "targetPort": 8080}])]
    injected = roundtrip(objects)
    assert injected[1]["spec"]["ports"][0]["targetPort"] == 9900
    assert container(injected[0], "app") == container(objects[0], "app")


def test_a_missing_target_port_defaults_to_the_port_and_is_restored_as_missing():
    objects = [deployment(), service(ports=[{"port": 8080}])]
    injected = roundtrip(objects)
    assert injected[1]["spec"]["ports"] == [{"port": 8080, "targetPort": 9900}]


def test_an_undeclared_port_of_a_single_container_pod_is_served_by_that_container():
    objects = [deployment(containers=[app_container(ports=[])]),
               service(ports=[{"port": 80, "targetPort": 3000}])]
    injected = roundtrip(objects)
    assert env_of(agent_of(injected[0]))["INTERCEPT_UPSTREAM"] == "127.0.0.1:3000"


def test_agent_ports_avoid_every_port_in_the_pod():
    app = app_container(ports=[{"name": "http", "containerPort": 9900},
                               {"name": "intercept-http", "containerPort": 9901}],
                        livenessProbe={"tcpSocket": {"port": 9922}})
    sidecar = app_container("sidecar", ports=[{"name": "intercept-ssh", "containerPort": 9923}])
    objects = [deployment(containers=[app, sidecar]),
               service(ports=[{"name": "http", "port": 80, "targetPort": 9900}])]
    injected = roundtrip(objects)
    agent = agent_of(injected[0])
    assert [(p["name"], p["containerPort"]) for p in agent["ports"]] == [
        ("intercept-http2", 9902), ("intercept-ssh2", 9924)]
    assert_sane_pod_ports(pod_of(injected[0]))


def test_agent_volume_name_avoids_the_pod_volumes_and_restores_an_empty_list():
    objects = [deployment(volumes=[{"name": "intercept-credentials", "emptyDir": {}},
                                   {"name": "intercept-routes", "emptyDir": {}}]), service()]
    injected = roundtrip(objects)
    assert [v["name"] for v in pod_of(injected[0])["volumes"]] == [
        "intercept-credentials", "intercept-routes", "intercept-credentials2", "intercept-routes2"]
    objects = [deployment(volumes=[]), service()]
    assert pod_of(restore(roundtrip(objects))[0])["volumes"] == []


def test_a_null_volumes_list_is_injected_and_restored_as_null():
    # what a Helm chart renders for `volumes:` followed by an empty `{{- with }}` block
    objects = [deployment(volumes=None), service()]
    pod_of(objects[0])["volumes"] = None
    injected = roundtrip(objects)
    assert [v["name"] for v in pod_of(injected[0])["volumes"]] == ["intercept-credentials", "intercept-routes"]
    assert pod_of(restore(injected)[0])["volumes"] is None


def test_existing_annotations_are_kept_and_restored():
    objects = [deployment(), service()]
    objects[0]["metadata"]["annotations"] = {"team": "payments"}
    objects[1]["metadata"]["annotations"] = {}
    objects[1]["spec"]["ports"][0]["targetPort"] = 8080
    injected = roundtrip(objects)
    assert injected[0]["metadata"]["annotations"]["team"] == "payments"
    assert set(injected[1]["metadata"]["annotations"]) == {ANNOTATION}
    assert json.loads(injected[1]["metadata"]["annotations"][ANNOTATION])["workload"] == "Deployment/orders"


def test_null_annotations_are_restored_as_null():
    # `annotations:` with nothing after it, as a Helm chart renders an empty `{{- with }}`
    objects = [deployment(), service(ports=[{"name": "http", "port": 80, "targetPort": 8080}]),
               policy("orders-in", {"app": "orders"}, [{"port": 8080}])]
    for obj in objects:
        obj["metadata"]["annotations"] = None
    injected = roundtrip(objects)
    assert all(is_injected(o) for o in injected)
    assert [o["metadata"]["annotations"] for o in restore(injected)] == [None, None, None]
    assert restore(injected, "Deployment/orders") == objects


def test_agent_runs_as_a_non_root_user_when_the_pod_runs_as_root():
    objects = [deployment(securityContext={"runAsUser": 0})]
    objects.append(service())
    agent = agent_of(roundtrip(objects)[0])
    assert agent["securityContext"]["runAsUser"] == 65532
    assert_restricted(pod_of(objects[0]), agent)


def test_agent_env_copies_point_resource_fields_at_the_app():
    env = [{"name": "LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
           {"name": "INTERCEPT_LISTEN", "value": "app's own, not the agent's"}]
    app = app_container(env=env, envFrom=[{"configMapRef": {"name": "orders"}}],
                        volumeMounts=[{"name": "data", "mountPath": "/data",
                                       "mountPropagation": "HostToContainer"}])
    objects = [deployment(containers=[app], volumes=[{"name": "data", "emptyDir": {}}]), service()]
    agent = agent_of(roundtrip(objects)[0])
    assert agent["env"][0]["valueFrom"]["resourceFieldRef"] == {
        "resource": "limits.memory", "containerName": "app"}
    assert [e["value"] for e in agent["env"] if e["name"] == "INTERCEPT_LISTEN"] == ["0.0.0.0:9900"]
    assert agent["envFrom"] == [{"configMapRef": {"name": "orders"}}]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in agent["volumeMounts"]


def test_statefulset_and_replicaset_workloads_are_injected():
    for kind in ("StatefulSet", "ReplicaSet"):
        workload = deployment()
        workload["kind"] = kind
        if kind == "StatefulSet":
            workload["spec"]["serviceName"] = "orders"
        injected = roundtrip([workload, service()])
        assert resolve(injected, "orders").workload == f"{kind}/orders"


def test_a_service_of_a_daemonset_says_the_kind_cannot_be_injected():
    workload = deployment()
    workload["kind"] = "DaemonSet"
    with pytest.raises(ResolveError, match=r"DaemonSet/orders.*only into Deployments, StatefulSets and ReplicaSets") as error:
        inject([workload, service()], "orders", OPTIONS)
    assert "include the workload's manifest" not in str(error.value)


def test_a_replicaset_owned_by_a_deployment_is_not_a_candidate():
    owned = deployment("orders-5d4f")
    owned["kind"] = "ReplicaSet"
    owned["spec"]["template"]["metadata"]["labels"] = {"app": "orders"}
    owned["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "orders",
                                             "uid": "1", "controller": True}]
    assert resolve([owned, deployment(), service()], "orders").workload == "Deployment/orders"
    with pytest.raises(ResolveError, match="owned by a Deployment"):
        resolve([owned, service()], "orders")


def test_a_second_service_on_another_port_of_an_injected_workload_is_refused():
    app = app_container(ports=[{"name": "http", "containerPort": 8080},
                               {"name": "admin", "containerPort": 8081}])
    objects = [deployment(containers=[app]), service(),
               service("orders-admin", selector={"app": "orders"},
                       ports=[{"name": "admin", "port": 81, "targetPort": "admin"}])]
    injected = inject(objects, "orders", OPTIONS)
    with pytest.raises(InjectError, match="already has an agent for container 'app' port 8080, and Service "
                                          "'orders-admin' port 81 targets container 'app' port 8081"):
        inject(injected, "orders-admin", OPTIONS)


def test_a_numeric_and_a_named_service_share_one_agent():
    objects = [deployment(), service(),
               service("orders-direct", selector={"app": "orders"},
                       ports=[{"name": "http", "port": 80, "targetPort": 8080}])]
    injected = inject(inject(objects, "orders-direct", OPTIONS), "orders", OPTIONS)
    validate(injected)
    assert service_reaches(injected, "orders") == (9900, AGENT_CONTAINER)
    assert service_reaches(injected, "orders-direct") == (9900, AGENT_CONTAINER)
    assert inject(injected, "orders-direct", OPTIONS) == injected
    assert restore(injected) == objects


def test_a_container_named_like_the_agent_without_a_record_is_refused():
    objects = [deployment(containers=[app_container(), app_container(AGENT_CONTAINER, ports=[])]), service()]
    with pytest.raises(InjectError, match="intercept.dev/original"):
        inject(objects, "orders", OPTIONS)


def test_restore_says_what_vanished_when_the_app_container_is_gone():
    injected = inject([deployment(), service()], "orders", OPTIONS)
    pod_of(injected[0])["containers"][0]["name"] = "renamed"
    with pytest.raises(InjectError, match=r"containers\.\[app\]\.ports is gone"):
        restore(injected)


def test_restore_leaves_objects_without_a_record_alone():
    objects = boutique()
    assert all(a is b for a, b in zip(objects, restore(objects)))


# --------------------------------------------------------------------------- network policies


def test_a_policy_admitting_the_app_port_by_name_keeps_admitting_both():
    by_name = policy("orders", {"app": "orders"}, [{"port": "http", "protocol": "TCP"}])
    objects = [deployment(), service(), by_name]
    injected = roundtrip(objects)
    assert injected[2]["spec"]["ingress"][0]["ports"] == [
        {"port": "http", "protocol": "TCP"}, {"port": "app-http", "protocol": "TCP"}]
    workload = injected[0]
    assert admitting_rules(injected, workload, 9900) == {("orders", 0)}
    assert admitting_rules(injected, workload, 8080) == {("orders", 0)}


def test_a_policy_admitting_a_port_range_that_covers_the_agent_is_left_alone():
    objects = [deployment(), service(ports=[{"port": 80, "targetPort": 8080}]),
               policy("orders", {"app": "orders"}, [{"port": 8000, "endPort": 9999, "protocol": "TCP"}])]
    injected = roundtrip(objects)
    assert injected[2] is objects[2]


def test_a_policy_for_other_pods_or_ports_is_left_alone():
    objects = [deployment(), service(),
               policy("other-pods", {"app": "billing"}, [{"port": 8080}]),
               policy("other-port", {"app": "orders"}, [{"port": 5432}])]
    injected = roundtrip(objects)
    assert injected[2] is objects[2] and injected[3] is objects[3]


def test_a_client_egress_policy_to_the_app_port_admits_the_agent_port():
    client_policy = policy("client", {"app": "client"}, [{"port": 8080, "protocol": "TCP"}], section="egress")
    client_policy["spec"]["egress"][0]["to"] = [{"podSelector": {"matchLabels": {"app": "orders"}}}]
    objects = [deployment(), service(ports=[{"port": 80, "targetPort": 8080}]), client_policy]
    injected = roundtrip(objects)
    assert {"port": 9900, "protocol": "TCP"} in injected[2]["spec"]["egress"][0]["ports"]


def test_a_policy_shared_by_two_workloads_is_restored_when_its_last_agent_goes():
    shared = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "web"},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                       "ingress": [{"ports": [{"port": 8080, "protocol": "TCP"}]}]}}
    objects = [deployment("orders"), service("orders", ports=[{"port": 80, "targetPort": 8080}]),
               deployment("billing"), service("billing", ports=[{"port": 80, "targetPort": 8080}]), shared]
    injected = inject(inject(objects, "orders", OPTIONS), "billing", OPTIONS)
    record = json.loads(injected[4]["metadata"]["annotations"][ANNOTATION])
    assert record["workloads"] == ["Deployment/orders", "Deployment/billing"]
    # Already admitted for orders: billing's refusal flag has nothing to refuse.
    strict = InjectOptions(image=OPTIONS.image, no_policy_changes=True)
    assert inject(inject(objects, "orders", OPTIONS), "billing", strict)[4]["spec"] == injected[4]["spec"]
    without_orders = restore(injected, workload="Deployment/orders")
    assert without_orders[4]["spec"] == injected[4]["spec"]
    assert without_orders[0] == objects[0] and is_injected(without_orders[2])
    assert restore(without_orders, workload="Deployment/billing") == objects
    assert restore(injected) == objects


# --------------------------------------------------------------------------- resolve: every dead end


def multi_port_service():
    return service(ports=[{"name": "http", "port": 80, "targetPort": "http"},
                          {"name": "metrics", "port": 9090, "targetPort": 9090}])


def test_a_service_with_several_ports_needs_service_port_and_lists_them():
    objects = [deployment(), multi_port_service()]
    with pytest.raises(ResolveError) as caught:
        resolve(objects, "orders")
    message = str(caught.value)
    assert "http (80 -> http)" in message and "metrics (9090 -> 9090)" in message
    assert "--service-port" in message
    with pytest.raises(ResolveError, match="--service-port"):
        inject(objects, "orders", OPTIONS)


@pytest.mark.parametrize(
    "chosen, container_port", [("http", 8080), ("metrics", 9090), (9090, 9090), ("80", 8080)]
)
def test_service_port_picks_by_name_or_number(chosen, container_port):
    objects = [deployment(), multi_port_service()]
    assert resolve(objects, "orders", chosen).container_port == container_port
    roundtrip(objects, options=InjectOptions(image=OPTIONS.image, service_port=chosen))


def test_a_port_number_served_over_udp_and_tcp_picks_the_tcp_port():
    # HTTP/3 beside HTTPS, DNS: one number, two protocols, the UDP one listed first
    app = app_container(ports=[{"name": "h3", "containerPort": 8443, "protocol": "UDP"},
                               {"name": "https", "containerPort": 8443}])
    ports = [{"name": "h3", "port": 443, "protocol": "UDP", "targetPort": "h3"},
             {"name": "https", "port": 443, "targetPort": "https"}]
    objects = [deployment(containers=[app]), service(ports=ports)]
    assert resolve(objects, "orders", 443).service_port_name == "https"
    assert resolve(objects, "orders", "443").service_port_name == "https"


def test_an_unknown_service_port_lists_the_ports():
    with pytest.raises(ResolveError, match=r"no port 'grpc'.*http \(80 -> http\).*--service-port"):
        resolve([deployment(), multi_port_service()], "orders", "grpc")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "ExternalName", "externalName": "orders.example.com"}, "ExternalName"),
        ({"clusterIP": "None"}, "headless"),
        ({"selector": {}}, "no selector"),
        ({"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}, "only TCP ports"),
        ({"ports": [{"name": "http", "port": 80, "targetPort": "nope"}]}, "port name 'nope'"),
        ({"selector": {"app": "nobody"}}, "app=nobody but no Deployment"),
    ],
)
def test_services_that_cannot_be_intercepted_say_why(spec, message):
    svc = service()
    svc["spec"].update(spec)
    with pytest.raises(ResolveError, match=message):
        resolve([deployment(), svc], "orders")


def test_a_missing_service_lists_the_services_there_are():
    with pytest.raises(ResolveError, match=r"no Service named 'order'.*orders"):
        resolve([deployment(), service()], "order")


def test_a_service_selecting_several_workloads_lists_them():
    canary = deployment("orders-canary", labels={"app": "orders", "track": "canary"})
    objects = [deployment("orders"), canary, service()]
    with pytest.raises(ResolveError, match=r"Deployment/orders, Deployment/orders-canary"):
        resolve(objects, "orders")


def test_an_undeclared_port_in_a_pod_of_several_containers_asks_to_declare_it():
    objects = [deployment(containers=[app_container(ports=[]), app_container("sidecar", ports=[])]),
               service(ports=[{"port": 80, "targetPort": 3000}])]
    with pytest.raises(ResolveError, match="declare containerPort 3000"):
        resolve(objects, "orders")


def test_services_in_other_namespaces_do_not_select_the_workload():
    svc = service()
    svc["metadata"]["namespace"] = "shop"
    with pytest.raises(ResolveError, match="no Deployment"):
        resolve([deployment(), svc], "orders")


# --------------------------------------------------------------------------- several ports of one Service

def two_port_objects(**policy_ports):
    """orders: http (named targetPort) on 8080 and grpc (numeric targetPort) on 9090, and a
    policy that admits both app ports to the pods."""
    app = app_container(ports=[{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
                        readinessProbe={"tcpSocket": {"port": "http"}})
    return [deployment(containers=[app]),
            service(ports=[{"name": "http", "port": 80, "targetPort": "http"},
                           {"name": "grpc", "port": 9090, "targetPort": 9090}]),
            policy("orders-in", {"app": "orders"}, [{"port": 8080}, {"port": 9090}])]


def test_the_agent_is_put_in_front_of_every_port_asked_for_and_restored_exactly():
    objects = two_port_objects()
    injected = roundtrip(objects, options=InjectOptions(image=OPTIONS.image, service_ports=("http", 9090)))
    pod = pod_of(injected[0])
    assert_sane_pod_ports(pod)
    # each Service port now lands on its own listener of the agent, which forwards to its app port
    assert service_reaches(injected, "orders", 0) == (9900, AGENT_CONTAINER)
    assert service_reaches(injected, "orders", 1) == (9901, AGENT_CONTAINER)
    env = env_of(agent_of(injected[0]))
    assert env["INTERCEPT_LISTEN"] == "0.0.0.0:9900 0.0.0.0:9901"
    assert env["INTERCEPT_UPSTREAM"] == "127.0.0.1:8080 127.0.0.1:9090"
    assert agentconfig.from_env(env, ("injection",))["upstream"] == (("127.0.0.1", 8080), ("127.0.0.1", 9090))
    # the renamed app port keeps its probe; the policy admits both agent ports
    assert probe_port(container(injected[0], "app"), container(injected[0], "app")["readinessProbe"]) == 8080
    assert admitting_rules(injected, injected[0], 9900) == admitting_rules(injected, injected[0], 9901) != set()
    assert served_ports(injected[0]) == [8080, 9090]
    assert "forwards to app:8080, app:9090" in " ".join(describe_changes(objects, injected))


def test_one_port_of_a_multi_port_service_is_injected_as_before():
    objects = two_port_objects()
    injected = roundtrip(objects, options=InjectOptions(image=OPTIONS.image, service_port="grpc"))
    env = env_of(agent_of(injected[0]))
    assert (env["INTERCEPT_LISTEN"], env["INTERCEPT_UPSTREAM"]) == ("0.0.0.0:9900", "127.0.0.1:9090")
    assert service_reaches(injected, "orders", 0) == (8080, "app"), "the http port is left to the app"
    assert served_ports(injected[0]) == [9090]


def test_an_agent_in_front_of_one_port_refuses_another_until_injected_for_both():
    objects = two_port_objects()
    one = inject(objects, "orders", InjectOptions(image=OPTIONS.image, service_port="http"))
    target = resolve(one, "orders", "grpc")
    with pytest.raises(InjectError, match=r"already has an agent for container 'app' port 8080, and Service 'orders' "
                                          r"port 9090 targets container 'app' port 9090; to put the agent in front of it too, "
                                          r"start with every port it should serve and --reinject"):
        check_serves(one[0], target)
    both = inject(one, "orders", InjectOptions(image=OPTIONS.image, service_ports=("http", "grpc")))
    check_serves(both[0], target)
    assert restore(both) == objects


def test_a_policy_change_for_any_port_is_refused_under_no_policy_changes():
    objects = two_port_objects()
    with pytest.raises(InjectError, match="NetworkPolicy/orders-in admits only the app's port 8080"):
        inject(objects, "orders", InjectOptions(image=OPTIONS.image, service_ports=("http", "grpc"),
                                                no_policy_changes=True))
