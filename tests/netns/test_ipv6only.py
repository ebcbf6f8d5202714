"""An IPv6-only cluster sealed by Tencrypt (issue 24, "Outer IPv6"): pods with only an IPv6
address, Services with only IPv6 cluster IPs, the cluster DNS on IPv6, and the tunnel itself
UDP/IPv6 port 1337 between the pods — across two nodes joined by VXLAN over an IPv6 underlay.

    node1 (br0 fd00:17::1/64)                         node2 (br0 fd00:18::1/64)
    [nginx1] fd00:17::..   --+                      +-- [nginx2] :8080 (http, app), UDP 9999
    [nginx3] :8080, :9090  --+-- vxlan0 (1430) ======+        (myproject)
    [cakephp] project2, never patched     underlay: IPv6, VXLAN UDP 4789
    Services of myproject (IPv6 only, fd00:30::/108):
      web    80 -> targetPort "app"  : nginx2 (8080), nginx3 (9090)
      front  80 -> targetPort "http" : nginx2
      each pod's own Service, port 8080 (and nginx2's UDP 9999)

Every sealed check captures node1's bridge and asserts that its marker never crossed it in the
clear and that nothing but UDP/IPv6 port 1337 (and IPv6's neighbour discovery, which the
tunnel needs as IPv4 needs ARP) went between myproject's addresses. The underlay check
captures node1's underlay: only VXLAN between the nodes, carrying UDP/IPv6 1337 between the
pods and nothing of the marker.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tencrypt.lab.capture import Capture, Frame
from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import METRICS, proxy_pid
from tencrypt.lab.topology import PodSpec, ServiceSpec, Topology
from tests.netns import families
from tests.netns.conftest import built_lab, download_sha256, forgeries_are_counted, metrics
from tests.netns.families import curl

pytestmark = pytest.mark.netns

TOPOLOGY = Topology(
    ip_family="ipv6",
    pods=[
        PodSpec("nginx1", "myproject"),
        PodSpec(
            "nginx2",
            "myproject",
            node=2,
            ports={"http": 8080, "app": 8080},
            service_ports=[
                {"name": "http", "port": 8080, "targetPort": 8080},
                {"name": "echo", "port": 9999, "targetPort": 9999, "protocol": "UDP"},
            ],
        ),
        PodSpec("cakephp", "project2"),
        PodSpec("nginx3", "myproject", ports={"http": 8080, "app": 9090}),
    ],
    services=[
        ServiceSpec(
            "web",
            "myproject",
            ["nginx2", "nginx3"],
            [{"name": "h", "port": 80, "targetPort": "app"}],
        ),
        ServiceSpec("front", "myproject", ["nginx2"]),
    ],
)
ICMPV6, ND_TYPES = 58, range(133, 138)  # RFC 4861: router/neighbour solicit/advert, redirect


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab(2, TOPOLOGY, prefix="s6") as built:
        for name in ("nginx1", "nginx2", "nginx3"):
            built.patch(name)
        yield built


def is_tunnel6(f: Frame) -> bool:
    """UDP/IPv6 with port 1337 on either side."""
    return f.proto == 17 and 1337 in (f.sport, f.dport) and ":" in str(f.src)


def is_nd(f: Frame) -> bool:
    """ICMPv6 neighbour discovery right behind the IPv6 header (Ethernet 14 + IPv6 40)."""
    return f.proto == ICMPV6 and len(f.raw) > 54 and f.raw[54] in ND_TYPES


def sealed(lab: Lab, action: Callable[[], Any], marker: str) -> Any:
    """``families.sealed``: nothing but UDP/IPv6 1337 (and neighbour discovery) between
    myproject's addresses."""
    return families.sealed(lab, action, marker, is_tunnel6, is_nd)


def test_setup_made_an_ipv6_only_proxy(lab: Lab):
    """The proxy runs on the pod's IPv6 address: tenc0 is the VXLAN pod MTU (1430) less the
    80 bytes of the IPv6 tunnel, and the tunnel's socket is UDP/IPv6 on [::]:1337."""
    assert lab.exec("nginx1", ["cat", "/sys/class/net/tenc0/mtu"]).stdout.strip() == "1350"
    sockets = lab.exec("nginx1", ["ss", "-Hnul", "sport", "= :1337"]).stdout
    assert "[::]:1337" in sockets and "0.0.0.0:1337" not in sockets, sockets
    routes = lab.exec("nginx1", ["ip", "-6", "route", "show", "proto", "137"]).stdout
    assert f"{lab.topology.service_cidrs[0]} dev tenc0" in routes, routes


def test_curl_by_name_and_by_literal_ipv6_vip_is_sealed_over_udp6(lab: Lab):
    marker = f"tencrypt-v6o-{secrets.token_hex(4)}"
    n2 = lab.pod("nginx2")

    def calls() -> tuple[tuple[str, str], ...]:
        return (
            curl(lab, "http://nginx2:8080/", marker=marker),  # AAAA only
            curl(lab, f"http://[{n2.vip_of(6)}]:8080/", marker=marker),  # a literal IPv6 VIP
        )

    by_name, literal = sealed(lab, calls, marker)
    assert by_name == ("nginx2", n2.vip_of(6))
    assert literal == ("nginx2", n2.vip_of(6))
    m = metrics(lab, "nginx1")
    assert m["tencrypt_packets_sealed_total"] > 0 and m["tencrypt_packets_opened_total"] > 0
    status = lab.exec("nginx1", ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/status"])
    peers = [p for p in json.loads(status.stdout)["peers"] if n2.ip in p["addresses"]]
    # one peer, reached at its IPv6 address as the core names endpoints: (canonical host, port)
    assert [p["endpoint"] for p in peers] == [f"{n2.ip}:1337"], peers


def test_forty_connections_over_ipv6_spread_over_both_replicas_port_to_target_port(lab: Lab):
    seen = families.forty_to_web_over_ipv6(lab, sealed)
    assert seen["nginx2"] >= 8 and seen["nginx3"] >= 8, seen  # nginx3 answers on 9090: "app"


def test_a_pod_ipv6_address_is_reached_after_a_session_through_a_service(lab: Lab):
    assert families.pod_after_service_over_ipv6(lab, sealed) == ("nginx2", "nginx2", "nginx1")


def test_udp_over_ipv6_crosses_the_tunnel(lab: Lab):
    families.udp_echo_over_ipv6(lab, sealed)  # answered from the VIP, sealed both ways


def test_a_large_download_over_the_ipv6_tunnel_is_intact(lab: Lab):
    """~30 MB of TCP over IPv6 across the nodes: TSO6 super-packets cut into UDP/IPv6 GSO
    runs that fit the 1430 overlay, merged again (GRO) on the other side."""
    path, digest = lab.make_blob("nginx2", 30)
    try:
        before = metrics(lab, "nginx2").get("tencrypt_super_packets_split_total", 0)
        url = f"http://[{lab.pod('nginx2').ip}]:8080{path}"
        assert download_sha256(lab, "nginx1", url) == digest
        assert metrics(lab, "nginx2")["tencrypt_super_packets_split_total"] > before
    finally:
        (lab.www("nginx2") / "blob").unlink(missing_ok=True)


def test_the_underlay_carries_only_vxlan_with_udp6_1337_between_the_pods(lab: Lab):
    node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
    assert node1.underlay_if and node1.underlay_ip and node2.underlay_ip
    underlay = {node1.underlay_ip.split("/")[0], node2.underlay_ip.split("/")[0]}
    marker = f"tencrypt-ul6-{secrets.token_hex(4)}"
    n1, n2 = lab.pod("nginx1"), lab.pod("nginx2")
    with Capture(node1.netns, node1.underlay_if, "") as cap:
        assert curl(lab, "http://nginx2:8080/", marker=marker)[0] == "nginx2"
        assert curl(lab, f"http://[{n1.ip}]:8080/", pod="nginx2", marker=marker)[0] == "nginx1"
        frames = cap.stop()
    assert marker.encode() not in cap.data
    vxlan = [f for f in frames if f.proto == 17 and 4789 in (f.sport, f.dport)]
    assert vxlan, "no VXLAN packet crossed the underlay"
    for f in frames:  # IPv6 VXLAN between the nodes, or the underlay's own ND
        assert ":" in str(f.src) and (f in vxlan or is_nd(f)), f
    assert all({f.src, f.dst} == underlay for f in vxlan)
    # inside: Ethernet 14 + IPv6 40 + UDP 8 + VXLAN 8, then the pods' frames
    inner = [_inner(f.raw) for f in vxlan]
    pods = {n1.ip, n2.ip}
    between = [i for i in inner if i is not None and {i.src, i.dst} == pods]
    assert between, "no packet between the pods inside the VXLAN"
    assert all(is_tunnel6(i) or is_nd(i) for i in between), between
    assert any(is_tunnel6(i) for i in between)


def _inner(raw: bytes) -> Frame | None:
    from tencrypt.lab.capture import LINKTYPE_ETHERNET, _frame

    outer = 14 + 40 + 8 + 8
    return _frame(raw[outer:], LINKTYPE_ETHERNET) if len(raw) > outer + 14 else None


def test_forged_and_replayed_ipv6_datagrams_are_counted_drops(lab: Lab):
    n3 = lab.pod("nginx3")  # on node1: its datagrams cross node1's bridge
    node = lab.nodes["node1"]
    udp_payload = 14 + 40 + 8  # Ethernet, IPv6 (no extension header), UDP
    with Capture(node.netns, node.bridge, f"udp and dst host {n3.ip} and dst port 1337") as cap:
        assert curl(lab, f"http://[{n3.ip}]:8080/")[0] == "nginx3"
        cap.stop()
    data = [
        f.raw[udp_payload:]
        for f in cap.frames()
        if f.raw[udp_payload : udp_payload + 1] == b"\x04"  # data messages
    ]
    assert data, "no data messages captured"
    forgeries_are_counted(lab, "nginx3", "node1", n3.ip, data)
    assert curl(lab, f"http://[{n3.ip}]:8080/")[0] == "nginx3"  # still serving


def test_packet_too_big_reaches_the_senders_path_mtu(lab: Lab):
    """tenc0's MTU raised behind setup's back: the proxy answers an IPv6 packet above the
    MTU it was set up with (1430 - 80) by an ICMPv6 Packet Too Big from the pod's own
    address, which the kernel believes (RFC 8201): the sending socket's path MTU drops to
    it."""
    mtu, before, after = families.path_mtu_after_packet_too_big(lab, lab.pod("nginx2").ip)
    assert mtu == 1350 and (before, after) == (mtu + 60, mtu)


def test_an_unpatched_project_pod_gets_nothing_in_the_clear_and_undo_leaves_it_whole(lab: Lab):
    """nginx3 unpatched (the launcher's `setup --undo` on an IPv6-only pod): nginx1's IPv6 to
    it is refused (strict mode), never sent in the clear; nginx3 itself still has its IPv6
    network (cakephp of the other project reaches it)."""
    lab.unpatch("nginx3")
    try:
        n3 = lab.pod("nginx3")
        assert "tenc0" not in lab.exec("nginx3", ["ip", "link"]).stdout
        assert lab.exec("nginx3", ["ip", "-6", "rule"]).stdout.count("fwmark") == 0
        marker = f"tencrypt-np6o-{secrets.token_hex(4)}"
        node = lab.nodes["node1"]
        with Capture(node.netns, node.bridge, "not port 53") as cap:
            got = curl(lab, f"http://[{n3.ip}]:8080/", marker=marker)
            cap.stop()
        assert got == ("", "")
        assert marker.encode() not in cap.data
        assert curl(lab, f"http://[{n3.ip}]:8080/", pod="cakephp")[0] == "nginx3"
    finally:
        if not proxy_pid(lab, lab.pod("nginx3")):
            lab.patch("nginx3")
