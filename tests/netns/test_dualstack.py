"""IPv6 sealed like IPv4 on a dual-stack lab (issue 24): a dual-stack pod is one peer, one
session; its IPv6 packets ride the IPv4 tunnel to the pod behind the destination.

    [nginx1] 172.17.0.11 fd00:17::11 --+                   +-- [nginx2] :8080 (http, app)
      getaddrinfo: AAAA first          |  node1 br0, kube-proxy DNAT per family     (myproject)
    [cakephp] project2, never patched -+                   +-- [nginx3] :8080 (http), :9090 (app)
    Services of myproject (dual-stack: a cluster IP per family, fd00:30::/108 and 172.30/16):
      web    80 -> targetPort "app"  : nginx2 (8080), nginx3 (9090)
      front  80 -> targetPort "http" : nginx2
      each pod's own Service, port 8080 (and nginx2's UDP 9999)

Every sealed check captures the node's bridge and asserts that its marker never crossed it in
the clear, in either family, and that nothing but UDP 1337 over IPv4 went between myproject's
pods' addresses (both families).
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
from tests.netns.conftest import built_lab, download_sha256, metrics
from tests.netns.families import curl

pytestmark = pytest.mark.netns

TOPOLOGY = Topology(
    ip_family="dual",
    pods=[
        PodSpec("nginx1", "myproject"),
        PodSpec(
            "nginx2",
            "myproject",
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


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab(1, TOPOLOGY, prefix="d") as built:
        for name in ("nginx1", "nginx2", "nginx3"):
            built.patch(name)
        yield built


def is_tunnel4(f: Frame) -> bool:
    """UDP over IPv4 with port 1337 on either side: the only thing between the pods."""
    return f.proto == 17 and 1337 in (f.sport, f.dport) and ":" not in str(f.src)


def sealed(lab: Lab, action: Callable[[], Any], marker: str) -> Any:
    """``families.sealed``: nothing but UDP 1337 over IPv4 between myproject's addresses
    (both families)."""
    return families.sealed(lab, action, marker, is_tunnel4)


def test_curl_by_name_prefers_aaaa_and_is_sealed_in_both_families(lab: Lab):
    marker = f"tencrypt-ds-{secrets.token_hex(4)}"
    n2 = lab.pod("nginx2")

    def calls() -> tuple[tuple[str, str], ...]:
        return (
            curl(lab, "http://nginx2:8080/", marker=marker),  # getaddrinfo: AAAA first
            curl(lab, "http://nginx2:8080/", "-4", marker=marker),
            curl(lab, f"http://[{n2.vip_of(6)}]:8080/", marker=marker),  # a literal IPv6 VIP
        )

    by_name, v4, literal = sealed(lab, calls, marker)
    assert by_name == ("nginx2", n2.vip_of(6))
    assert v4 == ("nginx2", n2.vip_of(4))
    assert literal == ("nginx2", n2.vip_of(6))
    m = metrics(lab, "nginx1")
    assert m["tencrypt_packets_sealed_total"] > 0 and m["tencrypt_packets_opened_total"] > 0


def test_both_families_of_one_pod_share_one_peer_and_one_session(lab: Lab):
    n2 = lab.pod("nginx2")
    assert curl(lab, f"http://[{n2.ip_of(6)}]:8080/")[0] == "nginx2"
    assert curl(lab, f"http://{n2.ip_of(4)}:8080/")[0] == "nginx2"
    status = lab.exec("nginx1", ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/status"])
    peers = [p for p in json.loads(status.stdout)["peers"] if set(n2.ips) & set(p["addresses"])]
    assert len(peers) == 1, peers  # one peer for both of nginx2's addresses
    assert set(n2.ips) <= set(peers[0]["addresses"]), peers[0]


def test_forty_connections_over_ipv6_spread_over_both_replicas_port_to_target_port(lab: Lab):
    seen = families.forty_to_web_over_ipv6(lab, sealed)
    assert seen["nginx2"] >= 8 and seen["nginx3"] >= 8, seen  # nginx3 answers on 9090: "app"


def test_a_pod_ipv6_address_is_reached_after_a_session_through_a_service(lab: Lab):
    assert families.pod_after_service_over_ipv6(lab, sealed) == ("nginx2", "nginx2", "nginx1")


def test_udp_over_ipv6_crosses_the_tunnel(lab: Lab):
    families.udp_echo_over_ipv6(lab, sealed)  # answered from the VIP, sealed both ways


def test_a_large_ipv6_stream_is_cut_and_merged_by_the_batch_path(lab: Lab):
    """TCP over IPv6 large enough for TSO6 super-packets out of tenc0 and GRO merges in."""
    path, digest = lab.make_blob("nginx2", 30)
    before = metrics(lab, "nginx2").get("tencrypt_super_packets_split_total", 0)
    url = f"http://[{lab.pod('nginx2').ip_of(6)}]:8080{path}"
    assert download_sha256(lab, "nginx1", url) == digest
    assert metrics(lab, "nginx2")["tencrypt_super_packets_split_total"] > before


def test_packet_too_big_for_ipv6_reaches_the_senders_path_mtu(lab: Lab):
    """tenc0's MTU raised behind setup's back: the proxy answers an IPv6 packet above the
    MTU it was set up with by an ICMPv6 Packet Too Big, which the kernel believes (RFC 8201):
    the sending socket's path MTU drops to it."""
    mtu, before, after = families.path_mtu_after_packet_too_big(lab, lab.pod("nginx2").ip_of(6))
    assert (before, after) == (mtu + 60, mtu)


def test_an_unpatched_project_pod_gets_no_ipv6_in_the_clear(lab: Lab):
    """nginx3 without a proxy: nginx1's IPv6 to it is refused (strict mode), never sent in
    the clear."""
    lab.unpatch("nginx3")
    try:
        marker = f"tencrypt-np6-{secrets.token_hex(4)}"
        n3 = lab.pod("nginx3")
        node = lab.nodes["node1"]
        with Capture(node.netns, node.bridge, "not port 53") as cap:
            got = curl(lab, f"http://[{n3.ip_of(6)}]:8080/", marker=marker)
            cap.stop()
        assert got == ("", "")
        assert marker.encode() not in cap.data
    finally:
        if not proxy_pid(lab, lab.pod("nginx3")):
            lab.patch("nginx3")
