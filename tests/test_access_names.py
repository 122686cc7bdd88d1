"""Which names the local process resolves to which Service, and the files it sees (sans-IO)."""

from __future__ import annotations

import random

import pytest

from intercept.access import hostsfile
from intercept.access.names import ClusterMap, Resolver, hosts_lines, link_variables, service_variables, with_cluster_names


def service(name: str, namespace: str = "shop", ports=((6379, "TCP"),), cluster_ip: str | None = "10.96.0.10", **spec):
    return {"kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": cluster_ip if cluster_ip is not None else "None",
                     "ports": [{"port": p, "protocol": proto} for p, proto in ports], **spec}}


def endpoint_slice(service_name: str, hostnames: list[str], namespace: str = "shop", port: int = 5432, name: str | None = None):
    return {"kind": "EndpointSlice",
            "metadata": {"name": name or f"{service_name}-abc", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "ports": [{"port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"10.0.0.{i}"], "hostname": h} for i, h in enumerate(hostnames, 1)]}


def added(obj):
    return {"type": "ADDED", "object": obj}


POD_RESOLV = """\
# written by kubelet
search shop.svc.cluster.local svc.cluster.local cluster.local corp.example
nameserver 10.96.0.10
options ndots:5
"""


def test_a_service_answers_to_every_name_a_pod_of_its_namespace_uses():
    m = ClusterMap(["shop"], Resolver.parse(POD_RESOLV))
    assert m.apply(added(service("redis")))
    [entry] = m.entries()
    assert entry.names == ("redis", "redis.shop", "redis.shop.svc", "redis.shop.svc.cluster.local")
    assert entry.dial == "redis.shop.svc.cluster.local."
    assert entry.ports == (6379,)
    assert entry.address.startswith("127.77.")
    assert m.find("REDIS.shop.svc.cluster.local.") == entry


def test_another_namespace_has_no_short_name():
    m = ClusterMap(["shop", "cache"], Resolver.parse(POD_RESOLV))
    m.replace("Service", "cache", [service("memo", "cache", cluster_ip="10.96.0.11")])
    [entry] = m.entries()
    assert entry.names == ("memo.cache", "memo.cache.svc", "memo.cache.svc.cluster.local")
    assert m.find("memo") is None


def test_namespaces_not_covered_are_ignored():
    m = ClusterMap(["shop"])
    assert not m.apply(added(service("x", "elsewhere")))
    assert m.entries() == []


def test_the_cluster_domain_comes_from_the_pods_search_path():
    resolver = Resolver.parse("search shop.svc.k8s.corp svc.k8s.corp k8s.corp\noptions ndots:2 timeout:1\n")
    assert resolver.domain == "k8s.corp" and resolver.ndots == 2
    m = ClusterMap(["shop"], resolver)
    m.apply(added(service("db", ports=((5432, "TCP"),))))
    assert m.entries()[0].names == ("db", "db.shop", "db.shop.svc", "db.shop.svc.k8s.corp")


def test_udp_ports_are_left_out_and_a_udp_only_service_gets_no_address():
    m = ClusterMap(["shop"])
    m.apply(added(service("dns", ports=((53, "UDP"),))))
    m.apply(added(service("both", ports=((53, "UDP"), (53, "TCP"), (8080, "TCP")), cluster_ip="10.96.0.12")))
    assert [(e.name, e.ports) for e in m.entries()] == [("both", (53, 8080))]


def test_each_pod_of_a_headless_service_has_its_own_name_and_address():
    m = ClusterMap(["shop"], Resolver.parse(POD_RESOLV))
    m.apply(added(service("pg", ports=((5432, "TCP"),), cluster_ip=None)))
    m.apply(added(endpoint_slice("pg", ["pg-0", "pg-1"])))
    service_entry, pod0, pod1 = m.entries()
    assert service_entry.pod is None and service_entry.cluster_ip is None
    assert pod0.names == ("pg-0.pg", "pg-0.pg.shop", "pg-0.pg.shop.svc", "pg-0.pg.shop.svc.cluster.local")
    assert pod0.dial == "pg-0.pg.shop.svc.cluster.local."
    assert pod1.pod == "pg-1"
    assert len({service_entry.address, pod0.address, pod1.address}) == 3


def test_an_endpoint_slice_seen_before_its_service_counts():
    m = ClusterMap(["shop"])
    m.apply(added(endpoint_slice("pg", ["pg-0"])))
    m.apply(added(service("pg", ports=((5432, "TCP"),), cluster_ip=None)))
    assert [e.pod for e in m.entries()] == [None, "pg-0"]


def test_addresses_stay_with_their_service_and_are_never_reused():
    m = ClusterMap(["shop"])
    m.apply(added(service("a")))
    m.apply(added(service("b", cluster_ip="10.96.0.2")))
    a, b = m.entries()
    m.apply({"type": "MODIFIED", "object": service("a", ports=((6379, "TCP"), (6380, "TCP")))})
    assert m.entries()[0].address == a.address and m.entries()[0].ports == (6379, 6380)
    assert m.apply({"type": "DELETED", "object": service("a")})
    m.apply(added(service("c", cluster_ip="10.96.0.3")))
    assert {e.name: e.address for e in m.entries()} == {"b": b.address, "c": m.find("c").address}
    assert m.find("c").address not in (a.address, b.address)


def test_a_relist_drops_what_was_deleted_while_the_watch_was_down():
    m = ClusterMap(["shop"])
    m.replace("Service", "shop", [service("a"), service("b", cluster_ip="10.96.0.2")])
    assert m.replace("Service", "shop", [service("b", cluster_ip="10.96.0.2")])
    assert [e.name for e in m.entries()] == ["b"]
    assert not m.replace("Service", "shop", [service("b", cluster_ip="10.96.0.2")])


def test_external_name_services_dial_their_target():
    m = ClusterMap(["shop"])
    m.apply(added(service("pay", cluster_ip=None, type="ExternalName", externalName="pay.example.com", ports=((443, "TCP"),))))
    [entry] = m.entries()
    assert entry.dial == "pay.example.com." and entry.ports == (443,)


def test_the_hosts_lines_keep_the_machines_own_names_first():
    m = ClusterMap(["shop"])
    m.apply(added(service("redis")))
    machine = b"127.0.0.1\tlocalhost\n::1 localhost ip6-localhost"
    text = with_cluster_names(machine, m.entries())
    assert text.startswith(machine + b"\n")
    assert text.endswith(f"{m.entries()[0].address} redis redis.shop redis.shop.svc redis.shop.svc.cluster.local\n".encode())


def test_an_entry_with_very_many_names_takes_several_lines_under_glibcs_limit():
    m = ClusterMap(["shop"], Resolver(tuple(f"s{i}.example" for i in range(10)) + ("shop.svc.cluster.local",)))
    m.apply(added(service("x" * 60)))
    assert all(len(line) < 1024 for line in hosts_lines(m.entries()).splitlines())


def test_service_link_variables_point_at_the_local_address():
    m = ClusterMap(["shop"])
    m.apply(added(service("redis-cart", cluster_ip="10.96.0.101")))
    address = m.entries()[0].address
    env = {"REDIS_CART_SERVICE_HOST": "10.96.0.101", "REDIS_CART_SERVICE_PORT": "6379",
           "REDIS_CART_PORT": "tcp://10.96.0.101:6379", "REDIS_CART_PORT_6379_TCP_ADDR": "10.96.0.101",
           "REDIS_CART_PORT_6379_TCP": "tcp://10.96.0.101:6379", "REDIS_CART_NOTE": "10.96.0.101",
           "OTHER": "10.96.0.101", "REDIS_CART_SERVICE_HOSTS": "10.96.0.1011"}
    new, changed = service_variables(env, m.entries())
    assert changed == ["REDIS_CART_PORT", "REDIS_CART_PORT_6379_TCP", "REDIS_CART_PORT_6379_TCP_ADDR", "REDIS_CART_SERVICE_HOST"]
    assert new["REDIS_CART_PORT"] == f"tcp://{address}:6379"
    assert new["REDIS_CART_NOTE"] == new["OTHER"] == "10.96.0.101" and new["REDIS_CART_SERVICE_PORT"] == "6379"
    assert link_variables(env) == changed  # what intercept env says start and connect point elsewhere


# --- the managed block -------------------------------------------------------------------


@pytest.mark.parametrize("original", [
    b"", b"127.0.0.1 localhost\n", b"127.0.0.1 localhost", b"# comment only", b"\n\n", b"a\r\nb\r\n",
    b"127.0.0.1 localhost\n# >>> intercept 1: the cluster's Services until this intercept ends >>>\n",
])
def test_removing_the_block_gives_the_file_back_byte_for_byte(original):
    text = hostsfile.put(original, "4242", "127.77.0.1 redis\n")
    assert b"127.77.0.1 redis\n" in text and hostsfile.owners(text)[-1] == "4242"
    text = hostsfile.put(text, "4242", "127.77.0.1 redis\n127.77.0.2 db\n")
    assert text.count(b"127.77.0.1 redis") == 1 and b"db" in text
    assert hostsfile.remove(text, "4242") == original


def test_blocks_of_two_owners_and_lines_added_meanwhile_survive_each_other():
    original = b"127.0.0.1 localhost"
    text = hostsfile.put(original, "1", "127.77.0.1 a\n")
    text = hostsfile.put(text, "2", "127.78.0.1 b\n")
    text += b"10.1.1.1 added-by-someone\n"
    text = hostsfile.remove(text, "1")
    assert hostsfile.owners(text) == ["2"] and text.endswith(b"added-by-someone\n")
    text = hostsfile.remove(text, "2")
    assert text.startswith(original) and b"intercept" not in text and text.endswith(b"10.1.1.1 added-by-someone\n")


def test_random_files_come_back_exactly():
    rng = random.Random(25)
    for _ in range(300):
        original = bytes(rng.choice(b"ab \n#\t1.") for _ in range(rng.randrange(0, 40)))
        text = hostsfile.put(original, "7", "127.77.0.9 x\n")
        assert hostsfile.remove(hostsfile.put(text, "7", ""), "7") == original
