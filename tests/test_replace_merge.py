"""Where ``--replace`` meets main's features (the replace x mirror/ports merge): a replace
refuses ``--mirror``; a workload named directly takes no SERVICE_PORT; a replace of an agent
in front of several ports keeps every listener, exactly, and leaving puts back the same pod."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from intercept.errors import SpecError
from intercept.kube.inject import (
    AGENT_CONTAINER,
    STAND_IN_COMMAND,
    InjectOptions,
    describe_changes,
    inject,
    replaced_by,
    resolve,
    restore,
    served_ports,
)
from intercept.spec import merge
from tests.conftest import INTERCEPT
from tests.test_inject import OPTIONS, agent_of, container, env_of, service_reaches, two_port_objects

BOTH = InjectOptions(image=OPTIONS.image, service_ports=("http", "grpc"))


def test_replace_with_mirror_is_refused_naming_both_flags():
    with pytest.raises(SpecError, match=r"--replace takes every request from the app and stops it, but --mirror "
                                        r"leaves the requests to the app and copies them to you; drop one of them"):
        merge(None, {}, {"service": "orders", "replace": True, "mirror": True})
    with pytest.raises(SpecError, match=r"INTERCEPT_MIRROR"):
        merge(None, {"INTERCEPT_MIRROR": "1"}, {"service": "orders", "replace": True})


def test_replace_with_mirror_on_the_command_line_is_exit_2_in_one_line():
    refused = subprocess.run([*INTERCEPT, "start", "orders", "--replace", "--mirror", "--", "true"],
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.startswith("intercept: error: --replace takes every request") and "--mirror" in refused.stderr
    assert refused.stderr.count("\n") == 1


def test_replace_takes_several_ports_of_a_service():
    s = merge(None, {}, {"service": "shop", "replace": True, "port": ["http:3000", "grpc:5000"]})
    assert s.replace and [p.local_port for p in s.port] == [3000, 5000]


def test_a_workload_named_directly_takes_no_service_port():
    assert merge(None, {}, {"service": "deployment/worker", "replace": True, "port": ["3000"]}).local_port == 3000
    with pytest.raises(SpecError, match=r"--port http:3000: deployment/worker is a workload with no Service"):
        merge(None, {}, {"service": "deployment/worker", "replace": True, "port": ["http:3000"]})


def test_a_replace_keeps_every_listener_of_an_agent_in_front_of_several_ports():
    objects = two_port_objects()
    both = inject(objects, "orders", BOTH)
    # through the Service (asked for every port) and through the workload named directly (asks for none)
    for service, options in (("orders", dataclasses.replace(BOTH, replace_by="alice")),
                             ("deployment/orders", InjectOptions(image=OPTIONS.image, replace_by="alice"))):
        replaced = inject(both, service, options)
        assert replaced_by(replaced[0]) == "alice"
        assert container(replaced[0], "app")["command"] == [*STAND_IN_COMMAND, "alice"]
        assert agent_of(replaced[0]) == agent_of(both[0]), "the agent and its listeners are as they were"
        assert served_ports(replaced[0]) == [8080, 9090]
        assert replaced[1:] == both[1:], "the Service and the policy are untouched"
        assert service_reaches(replaced, "orders", 1) == (9901, AGENT_CONTAINER)
        lines = describe_changes(both, replaced)
        assert lines == ["Deployment/orders: container app replaced by alice's local process "
                         "(it runs the stand-in until they leave)"]
        back = inject(replaced, service, dataclasses.replace(options, replace_by=None))
        assert back == both
        assert describe_changes(replaced, back) == ["Deployment/orders: container app runs the app again"]
        assert restore(replaced) == objects


def test_a_first_replace_of_several_ports_says_both_upstreams_and_the_replace():
    objects = two_port_objects()
    replaced = inject(objects, "orders", dataclasses.replace(BOTH, replace_by="alice"))
    lines = describe_changes(objects, replaced)
    assert any("forwards to app:8080, app:9090" in line for line in lines)
    assert "Deployment/orders: container app replaced by alice's local process (it runs the stand-in until they leave)" in lines
    env = env_of(agent_of(replaced[0]))
    assert env["INTERCEPT_UPSTREAM"] == "127.0.0.1:8080 127.0.0.1:9090"
    assert resolve(replaced, "deployment/orders").container_port == 8080
    assert restore(replaced) == objects
