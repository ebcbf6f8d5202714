"""core/policyflows.py and core/netpolicy.py on IPv6 flows.

Cast: this dual-stack pod DB (DB4, DB6) whose ingress admits FRONT6 on TCP 6379 and the IPv6
block fd00:10:129::/48 on UDP 53; OTHER6 a project pod no rule names.
"""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrFragment,
)
from scapy.packet import Raw

from tencrypt.core import packet as pk
from tencrypt.core.netpolicy import from_doc
from tencrypt.core.policyflows import PolicyFlows
from tencrypt.core.stats import DropReason, Stats
from tests.unit.test_policyflows import doc

DB4, DB6 = "10.128.0.7", "fd00:10:128::7"
FRONT6, OTHER6, BLOCKED6 = "fd00:10:128::9", "fd00:10:128::8", "fd00:10:129::5"

FRONT_6379 = {
    "peers": {"ips": [FRONT6], "blocks": []},
    "ports": [{"protocol": "TCP", "port": 6379, "end": 6379}],
}
BLOCK_53 = {
    "peers": {"ips": [], "blocks": [{"cidr": "fd00:10:129::/48", "except": []}]},
    "ports": [{"protocol": "UDP", "port": 53, "end": 53}],
}
V4_EVERYTHING = {
    "peers": {"ips": [], "blocks": [{"cidr": "0.0.0.0/0", "except": []}]},
    "ports": "any",
}


def flows(ingress: list | None = None, egress: list | None = None) -> tuple[PolicyFlows, Stats]:
    stats = Stats()
    table = PolicyFlows(stats, max_flows=8)
    policy = doc(ingress, egress)
    policy["ips"] = [DB4, DB6]
    table.set_policy(from_doc(policy), 0.0)
    return table, stats


def check(table: PolicyFlows, way: str, pkt, now: float = 1.0) -> bool:
    buf = bytearray(bytes(pkt))
    ip = pk.parse_ip(buf)
    assert ip is not None
    return (table.inbound if way == "in" else table.outbound)(buf, ip, now)


def test_ingress_over_ipv6_admits_the_named_peer_port_and_block_only():
    table, stats = flows(ingress=[FRONT_6379, BLOCK_53])
    assert check(table, "in", IPv6(src=FRONT6, dst=DB6) / TCP(sport=5000, dport=6379, flags="S"))
    assert not check(table, "in", IPv6(src=FRONT6, dst=DB6) / TCP(sport=5000, dport=22))
    assert not check(table, "in", IPv6(src=OTHER6, dst=DB6) / TCP(sport=5000, dport=6379))
    assert check(table, "in", IPv6(src=BLOCKED6, dst=DB6) / UDP(sport=5, dport=53))
    assert stats.dropped(DropReason.NETWORK_POLICY) == 2
    # the reply of the allowed connection leaves without a lookup
    assert check(table, "out", IPv6(src=DB6, dst=FRONT6) / TCP(sport=6379, dport=5000, flags="SA"))
    assert len(table) == 2 and list(table.denied_by_peer) == [pk.ip_key(FRONT6), pk.ip_key(OTHER6)]
    assert pk.int_to_ip(next(iter(table.denied_by_peer))) == FRONT6  # what status shows


def test_an_ipv4_block_never_matches_an_ipv6_peer():
    """0.0.0.0/0 is every IPv4 address, and no IPv6 one (as in Kubernetes)."""
    table, _ = flows(ingress=[V4_EVERYTHING])
    assert check(table, "in", IP(src="10.128.0.9", dst=DB4) / UDP(sport=1, dport=2))
    assert not check(table, "in", IPv6(src="::a80:9", dst=DB6) / UDP(sport=1, dport=2))
    assert not check(table, "in", IPv6(src=FRONT6, dst=DB6) / UDP(sport=1, dport=2))


def test_icmpv6_echo_is_a_flow_and_errors_follow_their_flow():
    any_peer = {"peers": "any", "ports": "any"}
    table, stats = flows(ingress=[FRONT_6379], egress=[any_peer])
    ping = IPv6(src=DB6, dst=OTHER6) / ICMPv6EchoRequest(id=42)
    assert check(table, "out", ping)
    assert check(table, "in", IPv6(src=OTHER6, dst=DB6) / ICMPv6EchoReply(id=42))
    assert not check(table, "in", IPv6(src=OTHER6, dst=DB6) / ICMPv6EchoReply(id=43))
    # an error about our packet of a known flow is RELATED; about an unknown one it is not
    ours = bytes(IPv6(src=DB6, dst=OTHER6) / UDP(sport=7, dport=9))
    assert check(table, "out", IPv6(src=DB6, dst=OTHER6) / UDP(sport=7, dport=9))
    error = IPv6(src=OTHER6, dst=DB6) / ICMPv6DestUnreach(code=4) / Raw(ours)
    assert check(table, "in", error)
    stray = bytes(IPv6(src=DB6, dst=OTHER6) / UDP(sport=8, dport=9))
    assert not check(table, "in", IPv6(src=OTHER6, dst=DB6) / ICMPv6DestUnreach() / Raw(stray))
    # the peer's packet that our stack reports on (out): known flow, RELATED
    theirs = bytes(IPv6(src=FRONT6, dst=DB6) / TCP(sport=5000, dport=6379, flags="S"))
    assert check(table, "in", IPv6(src=FRONT6, dst=DB6) / TCP(sport=5000, dport=6379, flags="S"))
    assert check(table, "out", IPv6(src=DB6, dst=FRONT6) / ICMPv6DestUnreach() / Raw(theirs))
    assert stats.dropped(DropReason.NETWORK_POLICY) == 2


def test_ipv6_fragments_follow_their_first():
    table, _ = flows(ingress=[BLOCK_53])
    first = (
        IPv6(src=BLOCKED6, dst=DB6)
        / IPv6ExtHdrFragment(m=1, id=0xABCDEF)
        / UDP(sport=5, dport=53, len=300)
        / Raw(b"q" * 64)
    )
    later = IPv6(src=BLOCKED6, dst=DB6) / IPv6ExtHdrFragment(offset=9, id=0xABCDEF, nh=17)
    orphan = IPv6(src=BLOCKED6, dst=DB6) / IPv6ExtHdrFragment(offset=9, id=0xABCDEE, nh=17)
    assert check(table, "in", first)
    assert check(table, "in", later / Raw(b"r" * 16))
    assert not check(table, "in", orphan / Raw(b"r" * 16))  # no port: the rule lists one


def test_colliding_integers_are_two_flows():
    any_peer = {"peers": "any", "ports": "any"}
    table, _ = flows(egress=[any_peer])
    assert check(table, "out", IP(src=DB4, dst="10.128.0.9") / UDP(sport=1, dport=2))
    assert check(table, "out", IPv6(src="::a80:7", dst="::a80:9") / UDP(sport=1, dport=2))
    assert len(table) == 2
