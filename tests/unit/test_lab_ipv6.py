"""The lab's IP families (``ip_family``), pure: the addresses planned, what dnsmasq is told,
the ip6tables rules, the Kubernetes objects handed to node-sync and the agent's reduction, the
membership file, the CNI emulation's nft text and IPv6 frames in captures. Nothing here runs
a command: ``Lab(...)`` only plans."""

from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path

import pytest

from tencrypt.core.membership import parse_members
from tencrypt.core.stats import Stats
from tencrypt.errors import UsageError
from tencrypt.lab import clusterdns, netpolicy, proxy, services
from tencrypt.lab.capture import LINKTYPE_ETHERNET, _frame
from tencrypt.lab.cluster import Lab
from tencrypt.lab.topology import Topology
from tencrypt.nodesync.cluster import load_list
from tencrypt.nodesync.kubeobjects import build_list, lab_objects


def lab(family: str, nodes: int = 1, **changes: object) -> Lab:
    topo = Topology.default()
    topo.ip_family = family
    for key, value in changes.items():
        setattr(topo, key, value)
    return Lab("t", topo, nodes)


# --- addresses --------------------------------------------------------------------------------


def test_an_ipv4_lab_is_planned_as_before() -> None:
    ipv4 = lab("ipv4", 2)
    nginx1 = ipv4.pod("nginx1")
    assert (nginx1.ip, nginx1.vip, nginx1.ips, nginx1.vips) == (
        "172.17.0.11",
        "172.30.0.11",
        ["172.17.0.11"],
        ["172.30.0.11"],
    )
    assert (nginx1.mtu, nginx1.prefixlen, nginx1.gateway) == (1450, 16, "172.17.0.1")
    assert ipv4.dns_ips == ["172.30.0.2"] and ipv4.families == (4,)
    assert ipv4.nodes["node2"].overlay_ips == ["10.42.0.2/24"]


def test_dual_stack_addresses_repeat_the_ipv4_digits_ipv4_first() -> None:
    dual = lab("dual", 2)
    nginx2 = dual.pod("nginx2")
    assert nginx2.ips == ["172.18.0.12", "fd00:18::12"]
    assert nginx2.vips == ["172.30.0.12", "fd00:30::12"]
    assert (nginx2.ip, nginx2.vip, nginx2.mtu) == ("172.18.0.12", "172.30.0.12", 1450)
    node2 = dual.nodes["node2"]
    assert node2.pod_cidrs == ["172.18.0.0/16", "fd00:18::/64"]
    assert node2.bridge_ips == ["172.18.0.1", "fd00:18::1"]
    assert node2.underlay_ip == "192.168.200.2/24"  # the underlay stays IPv4
    assert node2.overlay_ips == ["10.42.0.2/24", "fd00:42::2/64"]
    assert dual.dns_ips == ["172.30.0.2", "fd00:30::2"] and dual.dns_ip == "172.30.0.2"
    web = dual.services_by_name["web"]
    assert web.cluster_ips == ("172.30.0.100", "fd00:30::100") and web.vip == "172.30.0.100"
    assert [e.addresses for e in web.endpoints] == [
        ("172.18.0.12", "fd00:18::12"),
        ("172.17.0.14", "fd00:17::14"),
    ]
    assert dual.services_by_name["db"].cluster_ips == ()


def test_ipv6_only_lab_has_no_ipv4_and_a_1430_overlay() -> None:
    v6 = lab("ipv6", 2)
    nginx1 = v6.pod("nginx1")
    assert (nginx1.ip, nginx1.vip, nginx1.ips) == ("fd00:17::11", "fd00:30::11", ["fd00:17::11"])
    assert (nginx1.prefixlen, nginx1.gateway, nginx1.mtu) == (64, "fd00:17::1", 1430)
    node1 = v6.nodes["node1"]
    assert (node1.underlay_ip, node1.overlay_ip) == ("fd00:200::1/64", "fd00:42::1/64")
    assert v6.dns_ip == "fd00:30::2" and v6.service_cidr == "fd00:30::/108"
    assert lab("ipv6", 1).pod("nginx1").mtu == 1500


def test_pinned_addresses_and_hosts_per_family() -> None:
    topo = Topology.from_dict(
        {
            "ip_family": "dual",
            "pods": [
                {
                    "name": "a",
                    "project": "p",
                    "host": 300,
                    "vip": "172.30.9.9",
                    "vip6": "fd00:30::9:9",
                }
            ],
        }
    )
    nodes, pods = topo.plan("t", 1)
    assert pods["a"].ips == ["172.17.1.44", "fd00:17::300"]
    assert pods["a"].vips == ["172.30.9.9", "fd00:30::9:9"]
    # a pinned address of a family the lab does not run is ignored
    topo.ip_family = "ipv6"
    assert topo.plan("t", 1)[1]["a"].vips == ["fd00:30::9:9"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ip_family": "ipv5"}, "ip_family 'ipv5'"),
        ({"service_cidr6": "fd00:30::/64"}, "wider than a /108"),
        ({"service_cidr6": "172.31.0.0/16"}, "is not IPv6"),
        ({"dns_ip6": "fd00:31::2"}, "dns_ip6 fd00:31::2 is outside"),
        ({"pod_cidrs6": ["fd00:17::/64", "fd00:17::/56"]}, "overlaps"),
        ({"pod_cidrs6": ["fd00:17::/64"]}, "pod_cidrs6 need 2 entries"),
    ],
)
def test_bad_ipv6_topologies_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        lab("dual", 1, **changes)


def test_topology_round_trips_with_its_family() -> None:
    topo = Topology.from_dict({"ip_family": "ipv6", "pods": [{"name": "a", "project": "p"}]})
    again = Topology.from_dict(json.loads(json.dumps(topo.to_dict())))
    assert again == topo and again.families == (6,)


# --- DNS --------------------------------------------------------------------------------------


def test_hosts_give_a_and_aaaa_and_headless_pods() -> None:
    dual = lab("dual")
    hosts = clusterdns.build_hosts(dual.pods.values(), dual.services).splitlines()
    assert "172.30.0.12 nginx2.myproject.svc.cluster.local" in hosts
    assert "fd00:30::12 nginx2.myproject.svc.cluster.local" in hosts
    assert "fd00:17::12 nginx2.nginx2.myproject.svc.cluster.local" in hosts
    assert "fd00:30::100 web.myproject.svc.cluster.local" in hosts
    assert "fd00:17::14 db.myproject.svc.cluster.local" in hosts  # headless: the pod


def test_reverse_zones_are_whole_nibbles() -> None:
    zone = clusterdns.reverse_zones("fd00:30::/108")
    assert zone == [".".join(reversed("fd00003" + "0" * 20)) + ".ip6.arpa"]
    assert len(clusterdns.reverse_zones("fd00:30::/106")) == 4  # widened to /108s
    assert clusterdns.reverse_zones("fd00:17::/64") == ["0.0.0.0.0.0.0.0.7.1.0.0.0.0.d.f.ip6.arpa"]
    address = ipaddress.ip_address("fd00:30::12").reverse_pointer
    assert address.endswith(zone[0])


def test_dnsmasq_listens_on_both_dns_addresses_and_fixes_ipv6_ptrs() -> None:
    argv = clusterdns.build_dnsmasq_argv(
        ["172.30.0.2", "fd00:30::2"],
        [Path("/h")],
        Path("/l"),
        Path("/p"),
        ["172.30.0.0/16", "fd00:30::/108"],
        [("fd00:17::11", "nginx1.nginx1.myproject.svc.cluster.local")],
    )
    assert "--listen-address=172.30.0.2" in argv and "--listen-address=fd00:30::2" in argv
    ptr = ipaddress.ip_address("fd00:17::11").reverse_pointer
    assert f"--ptr-record={ptr},nginx1.nginx1.myproject.svc.cluster.local" in argv
    assert any(a.startswith("--local=/") and a.endswith(".ip6.arpa/") for a in argv)


# --- kube-proxy rules and the objects ---------------------------------------------------------


def test_ip6tables_rules_pick_per_connection_and_translate_the_port() -> None:
    dual = lab("dual")
    text = services.build_kube_services(dual.services, family=6)
    assert "-d fd00:30::100/128 -p tcp -m tcp --dport 80 " in text
    assert "--probability 0.5000000000 -j KUBE-SEP-" in text
    assert "-j DNAT --to-destination [fd00:17::12]:8080" in text
    assert "-s fd00:17::11/128 -d fd00:17::11/128 -m conntrack --ctstate DNAT" in text
    assert "172.30." not in text and "1337" not in text  # no stand-in unless asked
    with_tunnel = services.build_kube_services(
        dual.services, family=6, tunnel=services.unforwarded_vips(dual.services)
    )
    assert '--dport 1337 -m comment --comment "myproject/web:tencrypt-udp"' in with_tunnel
    assert "-p udp -j DNAT --to-destination [fd00:17::14]:1337" in with_tunnel
    assert services.build_kube_services(dual.services) == services.build_kube_services(
        lab("ipv4").services
    )  # the IPv4 proxier's rules do not change with a second family


def test_stand_in_covers_exactly_the_ipv6_vips_node_sync_leaves_out() -> None:
    dual = lab("dual")
    objs = services.objects(dual.services)
    covered = {b.vip for b in load_list(build_list(objs), Stats()).desired()}
    assert covered == {s.vip for s in dual.services if s.vip}  # node-sync: IPv4 today
    assert services.unforwarded_vips(dual.services) == {
        ip for s in dual.services for ip in s.cluster_ips if ":" in ip
    }
    assert services.unforwarded_vips(lab("ipv4").services) == frozenset()


def test_ipv4_objects_are_lab_objects_and_dual_stack_ones_are_as_a_cluster_holds_them() -> None:
    ipv4 = lab("ipv4", 2)
    assert services.objects(ipv4.services) == lab_objects(ipv4.services)
    objs = services.objects(lab("dual", 2).services)
    web = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "web")
    assert web["spec"]["clusterIPs"] == ["172.30.0.100", "fd00:30::100"]
    assert web["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    assert web["spec"]["ipFamilyPolicy"] == "RequireDualStack"
    slices = [
        o
        for o in objs
        if o["kind"] == "EndpointSlice"
        and o["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
    ]
    assert sorted(
        (s["addressType"], [e["addresses"][0] for e in s["endpoints"]]) for s in slices
    ) == [
        ("IPv4", ["172.18.0.12", "172.17.0.14"]),
        ("IPv6", ["fd00:18::12", "fd00:17::14"]),
    ]
    names = [o["metadata"]["name"] for o in objs if o["kind"] == "EndpointSlice"]
    uids = [o["metadata"]["uid"] for o in objs if o["kind"] == "EndpointSlice"]
    assert len(set(names)) == len(names) and len(set(uids)) == len(uids)
    only6 = services.objects(lab("ipv6").services)
    spec = next(o for o in only6 if o["kind"] == "Service")["spec"]
    assert (spec["ipFamilies"], spec["ipFamilyPolicy"]) == (["IPv6"], "SingleStack")
    assert {o["addressType"] for o in only6 if o["kind"] == "EndpointSlice"} == {"IPv6"}


# --- the membership file ----------------------------------------------------------------------


def test_membership_file_lists_both_families_and_pod_ips() -> None:
    dual = lab("dual", 2)
    nginx1 = dual.pod("nginx1")
    text = proxy.render_pod_ips(dual, proxy.members_of(dual, nginx1))
    doc = json.loads(text)
    assert doc["podIPs"] == [
        ["172.17.0.11", "fd00:17::11"],
        ["172.17.0.14", "fd00:17::14"],
        ["172.18.0.12", "fd00:18::12"],
    ]
    assert doc["serviceCIDRs"] == ["172.30.0.0/16", "fd00:30::/108"]
    assert doc["podCIDRs"] == ["172.17.0.0/16", "172.18.0.0/16", "fd00:17::/64", "fd00:18::/64"]
    web = next(s for s in doc["services"] if s["name"] == "web")
    assert web["ips"] == ["172.30.0.100", "fd00:30::100"]
    assert sorted(e["ip"] for e in web["endpoints"]) == [
        "172.17.0.14",
        "172.18.0.12",
        "fd00:17::14",
        "fd00:18::12",
    ]
    assert all(e["ports"] == web["endpoints"][0]["ports"] for e in web["endpoints"])
    members = parse_members(text)  # today's parser reads it (podIPs is a key it ignores)
    assert "fd00:18::12" in members.pods and "fd00:30::100" in members.services
    # IPv6-only: one address per pod, still listed
    v6 = lab("ipv6")
    doc = json.loads(proxy.render_pod_ips(v6, proxy.members_of(v6, v6.pod("nginx1"))))
    assert doc["podIPs"][0] == ["fd00:17::11"] and doc["serviceCIDRs"] == ["fd00:30::/108"]


def test_an_ipv4_lab_membership_file_has_no_pod_ips_key() -> None:
    ipv4 = lab("ipv4")
    members = proxy.members_of(ipv4, ipv4.pod("nginx1"))
    text = proxy.render_pod_ips(ipv4, members)
    assert "podIPs" not in json.loads(text)


# --- the CNI emulation ------------------------------------------------------------------------


def test_network_policy_chains_match_both_families() -> None:
    dual = lab("dual")
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "only-nginx1", "namespace": "myproject"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "nginx2"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "nginx1"}}}]}],
        },
    }
    dual.topology.network_policies = [policy]
    pod = netpolicy.pod_object(dual.pod("nginx2"))
    assert pod["status"]["podIPs"] == [{"ip": "172.17.0.12"}, {"ip": "fd00:17::12"}]
    ruleset = netpolicy.build_ruleset(dual.pods.values(), netpolicy.documents(dual))
    assert "    ip daddr 172.17.0.12 jump ingress_nginx2" in ruleset
    assert "    ip6 daddr fd00:17::12 jump ingress_nginx2" in ruleset
    assert "    ip saddr { 172.17.0.11 } return" in ruleset
    assert "    ip6 saddr { fd00:17::11 } return" in ruleset


def test_allow_all_rule_allows_every_family_of_the_lab() -> None:
    from tencrypt.lab.netpolicy import _rule

    rule = {"peers": "any", "ports": "any"}
    assert _rule(rule, "saddr", {}) == ["meta nfproto ipv4"]
    assert _rule(rule, "saddr", {}, (4, 6)) == ["meta nfproto ipv4", "meta nfproto ipv6"]
    blocks = {"ips": [], "blocks": [{"cidr": "fd00::/8", "except": ["fd00:17::/64"]}]}
    assert _rule({"peers": blocks, "ports": "any"}, "saddr", {}, (4,)) == []
    assert _rule({"peers": blocks, "ports": "any"}, "saddr", {}, (4, 6)) == [
        "ip6 saddr fd00::/8 ip6 saddr != { fd00:17::/64 }"
    ]


# --- captures ---------------------------------------------------------------------------------


def ipv6_frame(src: str, dst: str, proto: int, payload: bytes, ext: bytes = b"") -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(ext) + len(payload),
        proto if not ext else 60,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return b"\0" * 12 + b"\x86\xdd" + header + ext + payload


def test_ipv6_frames_are_parsed_with_their_upper_layer() -> None:
    udp = struct.pack("!HHHH", 40000, 1337, 12, 0) + b"abcd"
    frame = _frame(ipv6_frame("fd00:17::11", "fd00:17::12", 17, udp), LINKTYPE_ETHERNET)
    assert (frame.proto, frame.src, frame.dst, frame.sport, frame.dport) == (
        17,
        "fd00:17::11",
        "fd00:17::12",
        40000,
        1337,
    )
    options = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # destination options, then TCP
    tcp = struct.pack("!HH", 8080, 50000) + b"\0" * 16
    frame = _frame(ipv6_frame("fd00::1", "fd00::2", 6, tcp, options), LINKTYPE_ETHERNET)
    assert (frame.proto, frame.sport, frame.dport) == (6, 8080, 50000)
    assert _frame(b"\0" * 12 + b"\x86\xdd" + b"\x60" * 10, LINKTYPE_ETHERNET).proto is None
