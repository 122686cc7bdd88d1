"""The agent's configuration table: every setting has one definition, written by the injection
and read back by the agent through the same code, and spelled as a flag of intercept agent."""

from __future__ import annotations

import re

import subprocess
import sys
from pathlib import Path

import pytest

from intercept import agentconfig
from intercept.agentconfig import SETTINGS, AgentConfig, from_env, resolve, to_env
from intercept.errors import UsageError
from intercept.kube.inject import AGENT_CONTAINER, InjectOptions, inject, running_options
from tests.test_inject import boutique, find

# A value for every setting that is not its default: a new setting must get one here.
SAMPLES = {
    "listen": (("0.0.0.0", 19900), ("0.0.0.0", 19901)), "upstream": (("127.0.0.1", 3000), ("127.0.0.1", 9090)),
    "ssh_listen": ("::", 19922),
    "credentials": Path("/var/run/x/c.json"), "routes_file": Path("/var/run/r/routes.json"),
    "developers_file": Path("/var/run/r/developers.json"), "shutdown_grace": 7.5,
    "hold_timeout": 3.0, "allow_outbound": True, "outbound_allow": ("redis:6379", "*.shop.svc.cluster.local"),
    "outbound_deny": ("10.0.0.0/8", "[fd00::/8]:443"), "forwarded_headers": False, "header_timeout": 12.0,
    "max_connections": 0, "serve_files": ("/etc/config", "/srv/a dir with spaces"),
}


def test_every_setting_has_a_sample_and_round_trips_through_its_variable():
    assert set(SAMPLES) == {s.key for s in SETTINGS}
    env = {e["name"]: e["value"] for e in to_env(SAMPLES)}
    assert from_env(env) == SAMPLES
    config = resolve(env, {})
    for key, value in SAMPLES.items():
        assert getattr(config, key) == value, key


def test_every_pod_wide_setting_round_trips_through_an_injected_pod_spec():
    options = InjectOptions(image="registry.example/agent:1", outbound=False, hold_timeout=2.5, forwarded_headers=False,
                            outbound_allow=("redis:6379",), outbound_deny=("*.internal", "169.254.0.0/16"))
    objects = inject(boutique(), "cartservice", options)
    workload = find(objects, "Deployment", "cartservice")
    agent = next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == AGENT_CONTAINER)
    config = resolve({e["name"]: e["value"] for e in agent["env"] if "value" in e}, {})
    assert (config.allow_outbound, config.hold_timeout, config.forwarded_headers, config.outbound_allow,
            config.outbound_deny) == (False, 2.5, False, ("redis:6379",), ("*.internal", "169.254.0.0/16"))
    assert config.shutdown_grace == 5.0 and config.credentials == Path("/var/run/intercept/credentials.json")
    assert running_options(workload, InjectOptions(image="ignored")) == options  # what a start compares with
    written = {e["name"] for e in agent["env"]}
    assert "INTERCEPT_APP_CONTAINER" not in written  # written once, read by nothing: gone
    assert not {s.env for s in SETTINGS if s.scope == "agent"} & written  # the agent's own tuning stays default


def test_intercept_agent_has_a_flag_for_every_setting_naming_its_variable():
    done = subprocess.run([sys.executable, "-m", "intercept", "agent", "--help"], capture_output=True, text=True,
                          timeout=60)
    text = " ".join(done.stdout.split())
    for setting in SETTINGS:
        assert setting.flag in text and setting.env in text, setting.key


@pytest.mark.parametrize(("env", "named"), [
    ({"INTERCEPT_HOLD_TIMEOUT": "soon"}, "INTERCEPT_HOLD_TIMEOUT=soon: expected a number of seconds"),
    ({"INTERCEPT_MAX_CONNECTIONS": "-1"}, "INTERCEPT_MAX_CONNECTIONS=-1"),
    ({"INTERCEPT_OUTBOUND_DENY": "'a b'"}, "--outbound-deny 'a b'"),
    ({"INTERCEPT_ALLOW_OUTBOUND": "perhaps"}, "INTERCEPT_ALLOW_OUTBOUND=perhaps"),
])
def test_a_bad_variable_is_refused_naming_it(env, named):
    with pytest.raises(UsageError) as caught:
        resolve({"INTERCEPT_UPSTREAM": "127.0.0.1:1", "INTERCEPT_CREDENTIALS": "c.json", **env}, {})
    assert named in str(caught.value)


def test_listeners_and_upstreams_pair_by_position():
    config = resolve({"INTERCEPT_LISTEN": "0.0.0.0:9900 0.0.0.0:9901", "INTERCEPT_UPSTREAM": "127.0.0.1:8080 127.0.0.1:9090",
                      "INTERCEPT_CREDENTIALS": "c.json"}, {})
    assert config.fronts == [(("0.0.0.0", 9900), ("127.0.0.1", 8080)), (("0.0.0.0", 9901), ("127.0.0.1", 9090))]
    one = resolve({"INTERCEPT_UPSTREAM": "127.0.0.1:8080", "INTERCEPT_CREDENTIALS": "c.json"}, {})
    assert one.fronts == [(("0.0.0.0", 9900), ("127.0.0.1", 8080))], "one upstream: the default listener, as before"


@pytest.mark.parametrize(("env", "expected"), [
    ({"INTERCEPT_UPSTREAM": "127.0.0.1:8080 127.0.0.1:9090"},
     "2 --upstream need as many --listen (INTERCEPT_LISTEN), one for each in the same order"),
    ({"INTERCEPT_LISTEN": "0.0.0.0:9900 0.0.0.0:9901", "INTERCEPT_UPSTREAM": "127.0.0.1:8080"},
     "2 --listen for 1 --upstream (INTERCEPT_LISTEN, INTERCEPT_UPSTREAM): they pair by position"),
    ({"INTERCEPT_LISTEN": "0.0.0.0:9900 0.0.0.0:9901", "INTERCEPT_UPSTREAM": "127.0.0.1:8080 10.0.0.1:8080"},
     "--upstream: port 8080 twice; developers name each app port by its number"),
])
def test_listeners_without_their_upstream_are_refused_with_the_fix(env, expected):
    with pytest.raises(UsageError, match=re.escape(expected)):
        resolve({"INTERCEPT_CREDENTIALS": "c.json", **env}, {})


def test_the_fence_is_the_allow_and_deny_settings():
    config = AgentConfig(outbound_allow=("redis:6379",), outbound_deny=("10.0.0.0/8",))
    assert config.fence.describe() == "allow redis:6379; deny 10.0.0.0/8"
    assert agentconfig.BY_KEY["outbound_deny"].scope == "pod"
