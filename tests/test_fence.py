"""The outbound fence: the matcher alone, then through a real agent's outbound path.

Destinations are loopback addresses and ``localhost`` (from /etc/hosts): a refused
destination is refused before anything is dialled, an allowed one is a real app here.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncssh
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
    unresolved = Fence.parse(deny=["10.0.0.0/8"]).check("nowhere", 80, [])  # nor dial: a second lookup could find anything
    assert not unresolved.allowed and unresolved.reason == "nowhere:80 resolves to no address from the agent's pod"


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


# Spellings of the pod's loopback, of the metadata address and of vault.internal; issue 22 found the
# mapped ones, 0.0.0.0, 0, :: and the ideographic and full-width dots reaching what the rule denies.
LOOPBACK_SPELLINGS = [
    "::ffff:127.0.0.1", "[::ffff:127.0.0.1]", "::ffff:7f00:1", "0:0:0:0:0:ffff:127.0.0.1", "::FFFF:127.0.0.1",
    "0.0.0.0", "0", "::", "[::]", "::ffff:0.0.0.0", "127.1", "0x7f.1", "0x7F.0.0.1", "017700000001", "0177.0.0.01",
    "2130706433", "0x7f000001", "::127.0.0.1", "64:ff9b::127.0.0.1", "64:ff9b::7f00:1", "\uff11\uff12\uff17.0.0.1",
]
METADATA_SPELLINGS = ["::ffff:169.254.169.254", "::ffff:a9fe:a9fe", "0xa9fea9fe", "169.254.43518", "0251.0376.0251.0376",
                      "2852039166", "64:ff9b::a9fe:a9fe", "[0:0::ffff:169.254.169.254]"]
INTERNAL_SPELLINGS = ["vault\u3002internal", "vault\uff0einternal", "vault\uff61internal", "vault.internal\u00ad",
                      "vault.inter\u00adnal", "VAULT.Internal.", "\uff56\uff41\uff55\uff4c\uff54.internal", "vault\u200b.internal",
                      "vault.internal\u3002"]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_a_denied_loopback_address_is_denied(host):
    verdict = Fence.parse(deny=["127.0.0.0/8"]).check(host, 8080)
    assert not verdict.allowed and verdict.reason.endswith("is denied by the agent's --outbound-deny 127.0.0.0/8"), verdict
    assert re.search(r"\(.*127\.0\.0\.1.*\) is denied", verdict.reason), verdict  # says what it was judged as


@pytest.mark.parametrize("host", METADATA_SPELLINGS)
def test_every_spelling_of_the_metadata_address_is_denied(host):
    verdict = Fence.parse(deny=["169.254.169.254"]).check(host, 80)
    assert not verdict.allowed and verdict.reason.endswith("--outbound-deny 169.254.169.254"), verdict


@pytest.mark.parametrize("host", INTERNAL_SPELLINGS)
def test_names_are_judged_in_their_one_idna_form(host):
    verdict = Fence.parse(allow=["*"], deny=["*.internal"]).check(host, 8200)
    assert not verdict.allowed and verdict.reason.endswith("is denied by the agent's --outbound-deny *.internal"), verdict
    assert host.isascii() or "(vault.internal)" in verdict.reason  # says what it was judged as


def test_a_name_that_resolves_to_a_mapped_or_unspecified_address_is_judged_as_what_it_reaches():
    fence = Fence.parse(deny=["127.0.0.0/8"])
    mapped = fence.check("mapped.test", 80, ["::ffff:127.0.0.1"])
    assert not mapped.allowed and mapped.reason == "mapped.test:80 (127.0.0.1) is denied by the agent's --outbound-deny 127.0.0.0/8"
    assert not fence.check("zero.test", 80, ["0.0.0.0"]).allowed
    assert not fence.check("zero6.test", 80, ["::"]).allowed
    both = fence.check("both.test", 80, ["0.0.0.0", "::ffff:10.0.0.1"])
    assert both.allowed and both.dial == ("10.0.0.1",)  # only what passed, as the IPv4 address it is


def test_the_unspecified_addresses_are_the_pods_loopback_in_both_families():
    assert not Fence.parse(deny=["::1"]).check("0.0.0.0", 80).allowed
    assert not Fence.parse(deny=["127.0.0.1"]).check("::", 80).allowed
    assert not Fence.parse(allow=["127.0.0.0/8"]).check("0", 80).allowed  # ::1 is not allowed: every form must pass
    allowed = Fence.parse(allow=["127.0.0.0/8", "::1"]).check("0", 80)
    assert allowed.allowed and allowed.dial == ("127.0.0.1",)
    assert Fence.parse(allow=["127.0.0.0/8", "::1"]).check("::", 80).dial == ("::1",)


def test_an_address_that_carries_an_ipv4_address_passes_only_as_both():
    assert not Fence.parse(deny=["64:ff9b::/96"]).check("64:ff9b::10.0.0.1", 80).allowed  # no NAT64 at all
    assert not Fence.parse(allow=["10.0.0.0/8"]).check("64:ff9b::10.0.0.1", 80).allowed  # the IPv6 form is not allowed
    assert Fence.parse(allow=["10.0.0.0/8", "64:ff9b::/96"]).check("64:ff9b::10.0.0.1", 80).dial == ("64:ff9b::a00:1",)
    assert Fence.parse(allow=["10.0.0.0/8"]).check("::ffff:10.0.0.1", 80).dial == ("10.0.0.1",)  # mapped: IPv4 itself
    assert Fence.parse(deny=["::/0"]).check("::ffff:10.0.0.1", 80).allowed  # an IPv6 network holds no IPv4 address


def test_the_address_dialled_is_the_one_judged_never_the_text_sent():
    fence = Fence.parse(allow=["10.0.0.0/8", "*.internal", "fe80::/10"])
    assert fence.check("0xa.1", 80).dial == ("10.0.0.1",)
    assert fence.check("012.0.0.1", 80).dial == ("10.0.0.1",)  # octal: 10, which ipaddress would refuse to read
    assert fence.check("\uff36\uff21\uff35\uff2c\uff34.internal", 80).dial == ("vault.internal",)
    assert fence.check("vault\u3002internal\uff0e", 80).dial == ("vault.internal.",)  # rooted: not in the search domains
    assert fence.check("b\u00fccher.internal", 80).dial == ("xn--bcher-kva.internal",)
    assert fence.check("fe80::1%eth0", 80).dial == ("fe80::1%eth0",)  # the scope picks the interface
    assert check_all([Fence.parse(deny=["10.0.0.0/8"]), Fence(owner="this session")], "0", 80).dial == ("127.0.0.1",)


@pytest.mark.parametrize("host, problem", [
    ("1.2.3.4.", "is the address 1.2.3.4 to some resolvers and a name to others; write 1.2.3.4"),
    ("0x7f.1.", "is the address 127.0.0.1 to some resolvers"),
    ("08.1", "ends in a number but is no address"),
    ("orders.0x", "ends in a number"),
    ("[127.0.0.1]", "brackets hold an IPv6 address"),
    ("127.0.0.1 ", "neither an address nor a host name"),  # inet_aton reads it, getaddrinfo does not
    ("::1.", "a host name has no ':'"),
    ("::ffff:127.0.0.1%lo", "a scope, %eth0, goes only on a link-local one"),
    ("vault\u2024internal", "not a valid internationalised name"),  # NFKC makes it a dot; UTS-46 refuses it
    ("a\u200db.internal", "not a valid internationalised name"),
    ("x" * 300, "longer than any host name"),
])
def test_text_that_resolvers_read_differently_is_refused_saying_why(host, problem):
    verdict = Fence.parse(deny=["10.0.0.0/8"]).check(host, 80)
    assert not verdict.allowed and problem in verdict.reason and "is refused by the agent's fence" in verdict.reason, verdict


def test_rules_mean_what_they_say_in_every_spelling():
    mapped = Fence.parse(deny=["::ffff:10.0.0.0/104"])
    assert mapped.deny[0].network == ipaddress.ip_network("10.0.0.0/8")  # the IPv4 network it carries
    assert not mapped.check("10.1.2.3", 80).allowed and not mapped.check("::ffff:10.1.2.3", 80).allowed
    assert FenceRule.parse("\uff36\uff21\uff35\uff2c\uff34\u3002internal").pattern == "vault.internal"
    assert FenceRule.parse("*.b\u00fccher").pattern == "*.xn--bcher-kva"
    assert Fence.parse(deny=["127.0.0.*"]).check("0x7f.1", 80).reason.endswith("--outbound-deny 127.0.0.*")  # its text is 127.0.0.1


@pytest.mark.parametrize("text, problem", [
    ("", "expected HOST[:PORT]"),
    ("redis:0", "is not a port"),
    ("redis:http", "is not a port"),
    ("10.0.0.1/8", "write 10.0.0.0/8"),
    ("a/b", "is not an address, a network"),
    ("fd00::1:443", None),  # a bare IPv6 address, no port
    ("[fd00::1", "in brackets"),
    ("bad_host!", "is not a host name pattern"),
    ("0x7f000001", "is the address 127.0.0.1 as only some resolvers write it: write 127.0.0.1"),
    ("127.1:80", "write 127.0.0.1"),
    ("1.2.3.4.", "write 1.2.3.4"),
    ("0", "0.0.0.0 is never dialled: a destination 0.0.0.0 is judged as the pod's loopback, 127.0.0.1 and ::1; write 127.0.0.0/8 and ::1"),
    ("0.0.0.0", "write 127.0.0.0/8 and ::1"),
    ("[::]:443", "write 127.0.0.0/8 and ::1"),
    ("::ffff:0.0.0.0", "write 127.0.0.0/8 and ::1"),
    ("fe80::1%eth0", "write it without its scope (fe80::1)"),
    ("b\u00fc*cher", "a label with * must be ASCII"),
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


# --- every spelling, through a real agent (issue 22) ----------------------------------------

# What a client may send for the pod's 127.0.0.1 (the proxy takes IPv6 in brackets).
PROXY_SPELLINGS = ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]", "0.0.0.0", "0", "[::]",
                   "127.1", "0x7f.1", "017700000001", "2130706433"]

_SPELLING_SCRIPT = r"""
import http.client, json, os, socket, sys
proxy_host, proxy_port = os.environ["HTTP_PROXY"].removeprefix("http://").rsplit(":", 1)
port = int(sys.argv[1])
for host in sys.argv[2:]:
    p = http.client.HTTPConnection(proxy_host, int(proxy_port), timeout=10)
    p.request("GET", f"http://{host}:{port}/")
    r = p.getresponse()
    get = [r.status, r.read().decode()]
    with socket.create_connection((proxy_host, int(proxy_port)), timeout=10) as s:
        s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        r = http.client.HTTPResponse(s, method="CONNECT")
        r.begin()
        connect = [r.status, r.read().decode() if r.status != 200 else ""]
    print(json.dumps({"host": host, "get": get, "connect": connect}), flush=True)
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def loopback_service() -> Iterator[App]:
    """What the pod's owners fenced off: a service on the pod's 127.0.0.1."""
    app = App("loopback-only")
    yield app
    app.close()


@pytest.fixture(scope="module")
def loopback_denied(apps, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    allowed, _, _ = apps
    agent = start_agent(tmp_path_factory.mktemp("loopback"), allowed.port, "--allow-outbound", "--outbound-deny", "127.0.0.0/8")
    agent.proc.wait_for(r"^intercept: agent: outbound fence: deny 127\.0\.0\.0/8$")
    yield agent
    agent.proc.stop()


def test_every_spelling_of_a_denied_address_through_the_start_proxy_gets_403(loopback_denied, loopback_service, tmp_path):
    client = _start(loopback_denied, free_port(), "--", sys.executable, "-c", _SPELLING_SCRIPT, str(loopback_service.port),
                    *PROXY_SPELLINGS, env={"INTERCEPT_STATE_DIR": str(tmp_path / "state")})
    try:
        client.wait_for(r"^done$")
    finally:
        client.stop()
    answers = {row["host"]: row for row in map(json.loads, (line for line in client.lines if line.startswith("{")))}
    assert sorted(answers) == sorted(PROXY_SPELLINGS), client.output
    for host, row in answers.items():
        for status, body in (row["get"], row["connect"]):
            assert status == 403 and "is denied by the agent's --outbound-deny 127.0.0.0/8" in body, (host, status, body)
    assert loopback_service.connections == 0


def _open_each(agent: Agent, hosts: list[str], port: int) -> dict[str, str]:
    """``direct-tcpip`` to each ``host:port`` as a client may ask: "opened", or the agent's refusal."""

    async def main():
        conn = await _connect(agent)
        outcome = {}
        try:
            for host in hosts:
                try:
                    _, writer = await conn.open_connection(host, port)
                    writer.close()
                    outcome[host] = "opened"
                except asyncssh.ChannelOpenError as e:
                    outcome[host] = e.reason
        finally:
            conn.close()
            await conn.wait_closed()
        return outcome

    return asyncio.run(main())


def test_every_spelling_of_a_denied_address_over_direct_tcpip_is_refused(loopback_denied, loopback_service):
    hosts = [h.strip("[]") for h in PROXY_SPELLINGS] + ["::ffff:127.0.0.1", "::", "64:ff9b::7f00:1", "\uff11\uff12\uff17.1"]
    outcome = _open_each(loopback_denied, hosts, loopback_service.port)
    for host, reason in outcome.items():
        assert reason.startswith(protocol.FENCE_REFUSED) and reason.endswith("--outbound-deny 127.0.0.0/8"), (host, reason)
    assert loopback_service.connections == 0


needs_private_hosts = pytest.mark.skipif(
    not (sys.platform == "linux" and os.geteuid() == 0 and shutil.which("unshare")),
    reason="needs root and unshare (util-linux) to give the agent a hosts file of its own",
)


@needs_private_hosts
def test_names_in_other_spellings_and_names_of_mapped_or_unspecified_addresses_are_refused(apps, loopback_service, tmp_path):
    """The agent runs with a hosts file of the test's own (a private mount namespace):
    vault.internal is 127.0.0.2, where a vault listens; mapped.test and zero.test lead to
    the denied 127.0.0.1 in words that are not 127.0.0.1."""
    allowed, _, _ = apps
    vault = App("vault", host="127.0.0.2")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.2 vault.internal\n::ffff:127.0.0.1 mapped.test\n0.0.0.0 zero.test\n")
    credentials = tmp_path / "agent.json"
    agent = Agent(Proc(["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *INTERCEPT,
                        "-v", "agent", "--listen", "127.0.0.1:0", "--ssh-listen", "127.0.0.1:0",
                        "--upstream", f"127.0.0.1:{allowed.port}", "--credentials", str(credentials),
                        "--allow-outbound", "--outbound-deny", "*.internal", "--outbound-deny", "127.0.0.1"]), credentials)
    names = ["vault\u3002internal", "vault\uff0einternal", "vault.internal\u00ad", "VAULT.internal.", "\uff56ault.internal"]
    try:
        outcome = _open_each(agent, [*names, "vault.internal\x00.example", "mapped.test", "zero.test", "127.0.0.2"], vault.port)
        proxied = through_proxy(agent, lambda h, p: [_get(h, p, f"http://{name}:{loopback_service.port}/")
                                                     for name in ("mapped.test", "zero.test")])
    finally:
        agent.proc.stop()
        vault.close()
    assert outcome.pop("127.0.0.2") == "opened"  # the vault is there, and the agent reaches what its fence allows
    for name in names:
        assert outcome[name].endswith("(vault.internal) is denied by the agent's --outbound-deny *.internal") or (
            name.isascii() and outcome[name].endswith("is denied by the agent's --outbound-deny *.internal")), outcome[name]
    # glibc reads a C string: up to the NUL
    assert outcome["vault.internal\x00.example"].endswith("it is neither an address nor a host name "
                                                         "(letters, digits, '-' and '_' in labels of 1 to 63, joined by dots)")
    for name, judged in (("mapped.test", "127.0.0.1"), ("zero.test", "0.0.0.0")):
        assert outcome[name].endswith(f"{name}:{vault.port} ({judged}) is denied by the agent's --outbound-deny 127.0.0.1"), outcome[name]
    for status, body in proxied:
        assert status == 403 and "is denied by the agent's --outbound-deny 127.0.0.1" in body, body
    assert vault.connections == 1 and loopback_service.connections == 0
