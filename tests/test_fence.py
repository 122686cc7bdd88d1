"""The outbound fence: the matcher alone, then through a real agent's outbound path.

Destinations are loopback addresses and ``localhost`` (from /etc/hosts): a refused
destination is refused before anything is dialled, an allowed one is a real app here.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from intercept import protocol
from intercept.errors import SpecError, UsageError
from intercept.kube.inject import InjectOptions, inject, restore
from intercept.routing.fence import Fence, FenceRule, check_all
from intercept.spec import merge
from tests.apps import App
from tests.conftest import INTERCEPT, Agent, Proc, free_port, start_agent
from tests.test_outbound import _connect, read_response, through_proxy

TIMEOUT = 15


# --- the matcher ---------------------------------------------------------------------------


def test_no_rule_lets_everything_pass():
    assert Fence().open
    assert Fence().check("orders", 8080).allowed
    assert Fence().check("10.1.2.3", 5432).allowed


def test_an_allow_list_admits_only_what_it_names():
    fence = Fence.parse(allow=["redis:6379", "*.shop.svc.cluster.local"])
    assert fence.check("redis", 6379).allowed
    assert fence.check("orders.shop.svc.cluster.local", 8080).allowed
    assert fence.check("ORDERS.Shop.svc.cluster.local.", 8080).allowed  # case and the root dot do not matter
    refused = fence.check("redis", 6380)
    assert not refused.allowed
    assert refused.reason == "redis:6380 matches no --outbound-allow rule of the agent (allowed: redis:6379, *.shop.svc.cluster.local)"
    assert not fence.check("shop.svc.cluster.local", 80).allowed  # *. needs something before the dot


def test_deny_wins_over_allow_and_names_its_rule():
    fence = Fence.parse(allow=["*"], deny=["*.internal", "10.0.0.0/8:5432"])
    assert fence.check("orders", 80).allowed
    verdict = fence.check("vault.internal", 8200)
    assert not verdict.allowed and verdict.reason == "vault.internal:8200 is denied by the agent's --outbound-deny *.internal"
    assert not fence.check("10.3.0.7", 5432).allowed
    assert fence.check("10.3.0.7", 6379).allowed  # the deny rule has a port


def test_networks_judge_the_addresses_a_name_resolves_to():
    fence = Fence.parse(allow=["10.96.0.0/12"], deny=["10.96.0.10"])
    assert fence.check("orders", 80, ["10.100.1.2"]) .addresses == ("10.100.1.2",)
    assert not fence.check("orders", 80, ["192.168.1.1"]).allowed  # resolved outside every allowed network
    denied = fence.check("dns", 53, ["10.96.0.10"])
    assert not denied.allowed and denied.reason == "dns:53 (10.96.0.10) is denied by the agent's --outbound-deny 10.96.0.10"
    # a name with a denied and an allowed address: only the allowed one is dialled
    assert fence.check("both", 80, ["10.96.0.10", "10.97.0.1"]).addresses == ("10.97.0.1",)
    assert not fence.check("nowhere", 80, []).allowed  # unresolvable: no network can admit it


def test_ipv6_rules_and_ports():
    fence = Fence.parse(allow=["[fd00::/8]:443", "::1"])
    assert fence.check("fd00::7", 443).allowed
    assert not fence.check("fd00::7", 80).allowed
    assert fence.check("::1", 1234).allowed
    assert not fence.check("127.0.0.1", 443).allowed  # another address family


def test_a_session_narrows_the_agents_fence_and_cannot_widen_it():
    agent = Fence.parse(allow=["*.shop"])
    session = Fence.parse(allow=["*"], deny=["payments.shop"], owner="this session")
    assert check_all([agent, session], "orders.shop", 80).allowed
    widened = check_all([agent, session], "evil.example", 443)
    assert not widened.allowed and "of the agent" in widened.reason  # the agent's rule refuses first
    narrowed = check_all([agent, session], "payments.shop", 80)
    assert not narrowed.allowed and narrowed.reason.endswith("by this session's --outbound-deny payments.shop")


@pytest.mark.parametrize("text, problem", [
    ("", "expected HOST[:PORT]"),
    ("redis:0", "is not a port"),
    ("redis:http", "is not a port"),
    ("10.0.0.1/8", "write 10.0.0.0/8"),
    ("a/b", "is not an address, a network"),
    ("fd00::1:443", None),  # a bare IPv6 address, no port
    ("[fd00::1", "in brackets"),
    ("bad_host!", "is not a host name pattern"),
])
def test_rules_parse_strictly_and_say_how_to_write_them(text, problem):
    if problem is None:
        assert FenceRule.parse(text).network is not None
        return
    with pytest.raises(UsageError, match=re.escape(problem)):
        FenceRule.parse(text, "--outbound-deny")


# --- the option table, the injection --------------------------------------------------------


def test_the_fence_options_come_from_flags_variables_and_the_file_and_are_checked():
    spec = merge(None, {"INTERCEPT_OUTBOUND_DENY": "'*.internal' 10.0.0.0/8"}, {"agent": "h:1", "credentials": "c",
                                                                               "outbound_allow": ["redis:6379"]})
    assert spec.outbound_allow == ("redis:6379",) and spec.outbound_deny == ("*.internal", "10.0.0.0/8")
    with pytest.raises(SpecError, match=r"--outbound-allow redis:99999: '99999' is not a port .*; e\.g\. --outbound-allow redis:6379$"):
        merge(None, {}, {"agent": "h:1", "credentials": "c", "outbound_allow": ["redis:99999"]})
    with pytest.raises(SpecError, match="turns them off"):
        merge(None, {}, {"agent": "h:1", "credentials": "c", "outbound_deny": ["*"], "no_outbound": True})


def test_injection_gives_the_agent_its_fence_and_restores_exactly():
    from tests.test_inject import agent_of, boutique, env_of, find

    objects = boutique()
    options = InjectOptions(image="intercept.test/agent:1", outbound_allow=("redis-cart:6379", "*.svc.cluster.local"),
                            outbound_deny=("10.0.0.0/8",))
    injected = inject(objects, "cartservice", options)
    env = env_of(agent_of(find(injected, "Deployment", "cartservice")))
    assert env["INTERCEPT_OUTBOUND_ALLOW"] == "redis-cart:6379 *.svc.cluster.local"
    assert env["INTERCEPT_OUTBOUND_DENY"] == "10.0.0.0/8"
    assert restore(injected) == objects
    plain = env_of(agent_of(find(inject(objects, "cartservice", InjectOptions(image="intercept.test/agent:1")), "Deployment", "cartservice")))
    assert "INTERCEPT_OUTBOUND_ALLOW" not in plain and "INTERCEPT_OUTBOUND_DENY" not in plain
    with pytest.raises(UsageError, match="--outbound-allow 'a b'"):
        InjectOptions(image="intercept.test/agent:1", outbound_allow=("a b",))


def test_inject_command_takes_the_fence_flags(tmp_path):
    from tests import shop

    result = Proc(INTERCEPT + ["inject", "cartservice", "-f", str(shop.files(tmp_path) / "kubernetes-manifests.yaml"),
                               "--outbound-allow", "redis-cart:6379",
                               "--outbound-deny", "*.internal"])
    assert result.finish() == 0, result.output
    assert "name: INTERCEPT_OUTBOUND_ALLOW\n          value: redis-cart:6379" in result.output
    assert "value: '*.internal'" in result.output


# --- through a real agent ------------------------------------------------------------------


@pytest.fixture(scope="module")
def apps() -> Iterator[tuple[App, App, App]]:
    allowed, denied, elsewhere = App("allowed"), App("denied"), App("elsewhere", host="127.0.0.2")
    yield allowed, denied, elsewhere
    for app in (allowed, denied, elsewhere):
        app.close()


@pytest.fixture(scope="module")
def fenced_agent(apps, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """Allows localhost by name (a wildcard) and 127.0.0.0/31 (a network: not 127.0.0.2,
    where the ``elsewhere`` app listens); denies the ``denied`` app's port on every host."""
    allowed, denied, _ = apps
    agent = start_agent(tmp_path_factory.mktemp("fenced"), allowed.port, "--allow-outbound",
                        "--outbound-allow", "local*", "--outbound-allow", "127.0.0.0/31",
                        "--outbound-deny", f"*:{denied.port}")
    agent.proc.wait_for(r"^intercept: agent: outbound fence: allow local\*, 127\.0\.0\.0/31; deny \*:\d+")
    yield agent
    agent.proc.stop()


def _get(host: str, port: int, url: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    conn.request("GET", url)
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


def _connect_through(host: str, port: int, target: str) -> tuple[int, str]:
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        status, body = read_response(s, "CONNECT")
        return status, body.decode()


def test_the_proxy_reaches_what_the_fence_allows(fenced_agent, apps):
    allowed, _, _ = apps

    def check(host, port):
        return _get(host, port, f"http://localhost:{allowed.port}/by-name"), _get(host, port, f"http://127.0.0.1:{allowed.port}/by-cidr")

    (by_name, body), (by_cidr, _) = through_proxy(fenced_agent, check)
    assert by_name == 200 and json.loads(body)["target"] == "/by-name"
    assert by_cidr == 200


def test_a_denied_request_and_connect_get_403_naming_the_rule(fenced_agent, apps):
    allowed, denied, elsewhere = apps

    def check(host, port):
        return (_get(host, port, f"http://127.0.0.1:{denied.port}/"),  # allowed by the network, denied by the port: deny wins
                _connect_through(host, port, f"localhost:{denied.port}"),
                _connect_through(host, port, f"127.0.0.2:{elsewhere.port}"))

    before = denied.hits
    (get_status, get_body), (connect_status, connect_body), (outside, outside_body) = through_proxy(fenced_agent, check)
    assert get_status == 403 and f"127.0.0.1:{denied.port} is denied by the agent's --outbound-deny *:{denied.port}" in get_body
    assert connect_status == 403 and f"--outbound-deny *:{denied.port}" in connect_body
    assert outside == 403 and "matches no --outbound-allow rule of the agent (allowed: local*, 127.0.0.0/31)" in outside_body
    assert denied.hits == before and elsewhere.hits == 0


def test_a_name_that_resolves_into_a_denied_network_is_refused(apps, tmp_path):
    allowed, _, _ = apps
    agent = start_agent(tmp_path, allowed.port, "--allow-outbound", env={"INTERCEPT_OUTBOUND_DENY": "127.0.0.0/8 ::1"})
    try:
        (status, body), = [through_proxy(agent, lambda h, p: _get(h, p, f"http://localhost:{allowed.port}/"))]
    finally:
        agent.proc.stop()
    assert status == 403 and f"localhost:{allowed.port} (127.0.0.1) is denied by the agent's --outbound-deny 127.0.0.0/8" in body


def test_a_client_cannot_widen_the_agents_fence_but_can_narrow_it(fenced_agent, apps):
    allowed, _, elsewhere = apps

    async def main():
        conn = await _connect(fenced_agent)
        try:
            writer, reader, _ = await conn.open_session(subsystem=protocol.CONTROL_SUBSYSTEM, encoding=None)

            async def ask(request):
                writer.write(protocol.encode(request))
                return json.loads(await reader.readline())

            widen = await ask(protocol.Fence(allow=["*"]))
            wide = await ask(protocol.CheckOutbound("127.0.0.2", elsewhere.port))
            try:
                await conn.open_connection("127.0.0.2", elsewhere.port)
                tunnel = "opened"
            except Exception as e:  # noqa: BLE001
                tunnel = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            narrow = await ask(protocol.Fence(deny=[f"localhost:{allowed.port}"]))
            narrowed = await ask(protocol.CheckOutbound("localhost", allowed.port))
            still = await ask(protocol.CheckOutbound("127.0.0.1", allowed.port))
            return widen, wide, tunnel, narrow, narrowed, still
        finally:
            conn.close()

    widen, wide, tunnel, narrow, narrowed, still = asyncio.run(main())
    assert widen["ok"] and widen["fence"]["agent"]["allow"] == ["local*", "127.0.0.0/31"]
    assert wide["error"] == "fenced" and "of the agent" in wide["message"]
    assert tunnel.startswith("ChannelOpenError: " + protocol.FENCE_REFUSED) and "of the agent" in tunnel
    assert elsewhere.hits == 0
    assert narrow["description"].endswith(f"then deny localhost:{allowed.port}")
    assert narrowed["error"] == "fenced" and narrowed["message"].endswith(f"by this session's --outbound-deny localhost:{allowed.port}")
    assert still["ok"]


def _start(agent: Agent, local_port: int, *args: str, env: dict | None = None) -> Proc:
    return Proc(INTERCEPT + ["start", "--agent", agent.ssh, "--credentials", str(agent.credentials), "--port", str(local_port),
                             "--name", f"fence{os.getpid()}", "--no-watch", *args], env=env or {})


def test_a_refused_forward_fails_at_start_with_the_rule(fenced_agent, apps, tmp_path):
    _, denied, _ = apps
    client = _start(fenced_agent, free_port(), "--forward", f"127.0.0.1:{denied.port}:{free_port()}", "--",
                    sys.executable, "-c", "import time; time.sleep(60)")
    code = client.finish()
    assert code == 2, client.output
    assert (f"intercept: error: --forward 127.0.0.1:{denied.port}:" in client.output
            and f"is denied by the agent's --outbound-deny *:{denied.port}" in client.output), client.output


def test_start_narrows_its_session_and_status_shows_the_fence(fenced_agent, apps, tmp_path):
    allowed, _, _ = apps
    state = {"INTERCEPT_STATE_DIR": str(tmp_path / "state")}
    local_port, forward_port = free_port(), free_port()
    script = ("import http.client, os, socket, time\n"
              "server = socket.create_server(('127.0.0.1', %d))\n"
              "c = http.client.HTTPConnection('localhost', %d, timeout=10); c.request('GET', '/'); r = c.getresponse()\n"
              "print('forward', r.status, flush=True)\n"
              "host, port = os.environ['HTTP_PROXY'].removeprefix('http://').rsplit(':', 1)\n"
              "p = http.client.HTTPConnection(host, int(port), timeout=10); p.request('GET', 'http://127.0.0.1:%d/')\n"
              "r = p.getresponse(); print('proxy', r.status, r.read().decode().strip(), flush=True)\n"
              "time.sleep(60)\n") % (local_port, forward_port, allowed.port)
    client = _start(fenced_agent, local_port, "--outbound-deny", "127.0.0.*", "--forward",
                    f"localhost:{allowed.port}:{forward_port}", "--", sys.executable, "-c", script, env=state)
    try:
        client.wait_for(r"^intercept: outbound: .* \(fence: allow local\*, 127\.0\.0\.0/31; deny \*:\d+, then deny 127\.0\.0\.\*\)$")
        client.wait_for(r"^forward 200$")
        m = client.wait_for(r"^proxy 403 (.*)$")
        assert f"127.0.0.1:{allowed.port} is denied by this session's --outbound-deny 127.0.0.*" in m[1]
        client.wait_for(r"^intercept: ready: ")
        status = Proc(INTERCEPT + ["status", "-o", "json"], env=state)
        assert status.finish() == 0, status.output
        (row,) = json.loads(status.output)
        assert row["fence"].endswith("then deny 127.0.0.*")
    finally:
        client.stop()
