"""core/conntrack.py and core/services.py on IPv6 and in a dual-stack cluster.

Cast: this pod A (A4, A6) talks to Service "web" with one cluster IP per family (VIP4, VIP6),
whose endpoints are pods P1 and P2, each with an IPv4 and an IPv6 address (target ports 8080
and 5353). Expected packets are built by scapy from fields, so every checksum in them (the
IPv6 pseudo-header's included) is computed from scratch.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
)
from scapy.packet import Raw

from tencrypt.core import packet as pk
from tencrypt.core.conntrack import DROP, REJECT, TRANSLATED, ServiceFlows
from tencrypt.core.services import Endpoint, Port, Service, ServiceTable
from tencrypt.core.stats import DropReason, Stats

A4, A6 = "10.128.0.5", "fd00:10:128::5"
VIP4, VIP6 = "172.30.5.9", "fd00:30::5:9"
P1_4, P1_6 = "10.128.0.11", "fd00:10:128::11"
P2_4, P2_6 = "10.129.0.12", "fd00:10:129::12"
PODS = frozenset({A4, A6, P1_4, P1_6, P2_4, P2_6})
PAYLOAD = b"tencrypt conntrack IPv6 test payload"
PORTS = (Port("http", pk.TCP, 80), Port("dns", pk.UDP, 53))
TARGETS = (Port("http", pk.TCP, 8080), Port("dns", pk.UDP, 5353))


def k(ip: str) -> int:
    return pk.ip_key(ip)


def web(*endpoints: str, ips: tuple[str, ...] = (VIP4, VIP6), **conditions) -> Service:
    return Service(
        "web",
        ips,
        PORTS,
        tuple(Endpoint(ip, TARGETS, **conditions.get(ip, {})) for ip in endpoints),
    )


class Picks:
    def __init__(self, *indexes: int) -> None:
        self.indexes = iter(indexes)

    def __call__(self, bound: int) -> int:
        return next(self.indexes, 0) % bound


def flows_of(*endpoints: str, picks: tuple[int, ...] = (), **kw) -> ServiceFlows:
    table = ServiceTable.build([web(*endpoints)], PODS)
    return ServiceFlows(Stats(), Picks(*picks), table, **kw)


def raw(p) -> bytearray:
    return bytearray(bytes(p))


def out(flows: ServiceFlows, p, now: float = 0.0) -> tuple[int, bytearray]:
    buf = raw(p)
    ip = pk.parse_ip(buf)
    assert ip is not None
    return flows.translate(buf, ip, now), buf


def back(flows: ServiceFlows, p, now: float = 0.0) -> bytearray:
    buf = raw(p)
    ip = pk.parse_ip(buf)
    assert ip is not None
    flows.translate_reply(buf, ip, now)
    return buf


def dst6(buf: bytearray) -> str:
    return str(ipaddress.IPv6Address(bytes(buf[24:40])))


def syn6(sport: int = 40000, flags: str = "S", dst: str = VIP6, dport: int = 80) -> IPv6:
    return IPv6(src=A6, dst=dst, fl=7) / TCP(sport=sport, dport=dport, flags=flags) / PAYLOAD


# --- the table ----------------------------------------------------------------------------------


def test_each_cluster_ip_leads_to_the_endpoints_of_its_own_family():
    table = ServiceTable.build([web(P1_4, P1_6, P2_6)], PODS)
    four, six = table.lookup(k(VIP4), pk.TCP, 80), table.lookup(k(VIP6), pk.TCP, 80)
    assert four is not None and four.choose == ((k(P1_4), 8080),)
    assert six is not None and six.choose == ((k(P1_6), 8080), (k(P2_6), 8080))
    echo6 = table.lookup(k(VIP6), pk.ICMPV6, 0)
    assert echo6 is not None and {e for e, _ in echo6.choose} == {k(P1_6), k(P2_6)}
    assert table.lookup(k(VIP6), pk.ICMP, 0) is None and table.lookup(k(VIP4), pk.ICMPV6, 0) is None
    assert table.packed == {bytes([172, 30, 5, 9]), ipaddress.IPv6Address(VIP6).packed}
    assert table.unusable == 0


def test_a_family_without_endpoints_is_rejected_as_kube_proxy_does():
    flows = flows_of(P1_4)  # an IPv4-only endpoint behind a dual-stack Service
    assert out(flows, syn6())[0] == REJECT
    assert flows._stats.dropped(DropReason.SERVICE_NO_ENDPOINT) == 1
    v4 = IP(src=A4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S")
    assert out(flows, v4)[0] == TRANSLATED
    only6 = ServiceTable.build([web(P1_6, ips=(VIP6,))], PODS)
    assert only6.lookup(k(VIP4), pk.TCP, 80) is None and len(only6) == 1


def test_an_ipv6_endpoint_that_is_not_a_member_is_never_chosen():
    table = ServiceTable.build([web(P1_6, "fd00:99::1")], PODS)
    six = table.lookup(k(VIP6), pk.TCP, 80)
    assert six is not None and six.choose == ((k(P1_6), 8080),) and table.unusable == 1


# --- translation ------------------------------------------------------------------------------


def test_a_tcp_connection_to_an_ipv6_vip_goes_to_one_ipv6_endpoint_and_back():
    flows = flows_of(P1_4, P1_6, P2_6, picks=(1,))
    code, buf = out(flows, syn6())
    expected = IPv6(src=A6, dst=P2_6, fl=7) / TCP(sport=40000, dport=8080, flags="S") / PAYLOAD
    assert code == TRANSLATED and buf == raw(expected)
    code, buf = out(flows, syn6(flags="A"), 1.0)
    assert code == TRANSLATED and dst6(buf) == P2_6
    reply = IPv6(src=P2_6, dst=A6) / TCP(sport=8080, dport=40000, flags="SA") / PAYLOAD
    assert back(flows, reply, 1.0) == raw(
        IPv6(src=VIP6, dst=A6) / TCP(sport=80, dport=40000, flags="SA") / PAYLOAD
    )
    assert flows.endpoints == {k(P2_6): 1} and len(flows) == 1
    assert flows.endpoint_of((pk.TCP, k(A6), 40000, k(VIP6), 80), 1.0) == (k(P2_6), 8080)


def test_new_ipv6_flows_spread_over_the_ipv6_endpoints_only():
    table = ServiceTable.build([web(P1_4, P2_4, P1_6, P2_6)], PODS)
    flows = ServiceFlows(Stats(), random.Random(5).randrange, table)
    seen: dict[str, int] = {}
    for port in range(40000, 40040):
        code, buf = out(flows, syn6(port))
        assert code == TRANSLATED
        seen[dst6(buf)] = seen.get(dst6(buf), 0) + 1
        v4 = IP(src=A4, dst=VIP4) / TCP(sport=port, dport=80, flags="S")
        code, buf = out(flows, v4)
        assert code == TRANSLATED and str(ipaddress.IPv4Address(bytes(buf[16:20]))) in (P1_4, P2_4)
    assert set(seen) == {P1_6, P2_6} and min(seen.values()) >= 8
    assert len(flows) == 80


def test_udp_and_icmpv6_echo_round_trips():
    flows = flows_of(P1_6)
    dgram = IPv6(src=A6, dst=VIP6) / UDP(sport=1234, dport=53) / PAYLOAD
    code, buf = out(flows, dgram)
    assert code == TRANSLATED
    assert buf == raw(IPv6(src=A6, dst=P1_6) / UDP(sport=1234, dport=5353) / PAYLOAD)
    reply = IPv6(src=P1_6, dst=A6) / UDP(sport=5353, dport=1234) / PAYLOAD
    assert back(flows, reply) == raw(IPv6(src=VIP6, dst=A6) / UDP(sport=53, dport=1234) / PAYLOAD)
    echo = IPv6(src=A6, dst=VIP6) / ICMPv6EchoRequest(id=77, seq=1) / PAYLOAD
    code, buf = out(flows, echo)
    assert code == TRANSLATED  # the ICMPv6 checksum follows the pseudo-header's address
    assert buf == raw(IPv6(src=A6, dst=P1_6) / ICMPv6EchoRequest(id=77, seq=1) / PAYLOAD)
    pong = IPv6(src=P1_6, dst=A6) / ICMPv6EchoReply(id=77, seq=1) / PAYLOAD
    assert back(flows, pong) == raw(
        IPv6(src=VIP6, dst=A6) / ICMPv6EchoReply(id=77, seq=1) / PAYLOAD
    )
    other = IPv6(src=P1_6, dst=A6) / ICMPv6EchoReply(id=78, seq=1) / PAYLOAD
    assert back(flows, other) == raw(other)


@pytest.mark.parametrize(
    "p",
    [
        IPv6(src=A6, dst=VIP6) / TCP(sport=1, dport=81),  # not a port of the Service
        IPv6(src=A6, dst=VIP6) / UDP(sport=1, dport=80),
        IPv6(src=A6, dst=VIP6, nh=132) / Raw(b"\x00\x01\x00\x09" + bytes(8)),  # SCTP
        IPv6(src=A6, dst=VIP6) / ICMPv6EchoReply(id=3),  # only echo requests open flows
        IPv6(src=A6, dst=VIP6, nh=1) / Raw(bytes([8, 0, 0, 0, 0, 1, 0, 1])),  # ICMPv4 over IPv6
        IPv6(src=A6, dst=VIP6, nh=59) / Raw(bytes(8)),  # No Next Header: no ports
    ],
)
def test_no_such_service_port_over_ipv6_is_rejected(p):
    flows = flows_of(P1_6)
    code, buf = out(flows, p)
    assert code == REJECT and buf == raw(p) and len(flows) == 0


def test_extension_headers_are_kept_and_the_ports_behind_them_translated():
    flows = flows_of(P1_6)
    p = IPv6(src=A6, dst=VIP6) / IPv6ExtHdrDestOpt() / TCP(sport=5, dport=80, flags="S")
    code, buf = out(flows, p)
    assert code == TRANSLATED
    assert buf == raw(
        IPv6(src=A6, dst=P1_6) / IPv6ExtHdrDestOpt() / TCP(sport=5, dport=8080, flags="S")
    )


# --- ICMPv6 errors --------------------------------------------------------------------------------


def test_our_icmpv6_error_about_a_reply_from_the_vip_goes_to_the_endpoint():
    flows = flows_of(P1_6)
    out(flows, IPv6(src=A6, dst=VIP6) / UDP(sport=1234, dport=53) / PAYLOAD)
    seen = raw(IPv6(src=VIP6, dst=A6) / UDP(sport=53, dport=1234) / PAYLOAD)
    sent = raw(IPv6(src=P1_6, dst=A6) / UDP(sport=5353, dport=1234) / PAYLOAD)
    error = IPv6(src=A6, dst=VIP6) / ICMPv6DestUnreach(code=4) / Raw(bytes(seen))
    code, buf = out(flows, error)
    assert code == TRANSLATED
    assert buf == raw(IPv6(src=A6, dst=P1_6) / ICMPv6DestUnreach(code=4) / Raw(bytes(sent)))
    stray_quote = raw(IPv6(src=VIP6, dst=A6) / UDP(sport=53, dport=999) / PAYLOAD)
    stray = IPv6(src=A6, dst=VIP6) / ICMPv6DestUnreach(code=4) / Raw(bytes(stray_quote))
    assert out(flows, stray)[0] == DROP


def test_an_endpoints_packet_too_big_about_our_packet_names_the_vip():
    flows = flows_of(P1_6)
    out(flows, syn6())
    ours = raw(IPv6(src=A6, dst=P1_6, fl=7) / TCP(sport=40000, dport=8080, flags="S") / PAYLOAD)
    app = raw(syn6())
    error = IPv6(src=P1_6, dst=A6) / ICMPv6PacketTooBig(mtu=1280) / Raw(bytes(ours))
    assert back(flows, error) == raw(
        IPv6(src=VIP6, dst=A6) / ICMPv6PacketTooBig(mtu=1280) / Raw(bytes(app))
    )
    # a router's error keeps its source; the quote names the VIP (both checksummed anew)
    routed = IPv6(src="fd00::1", dst=A6) / ICMPv6TimeExceeded() / Raw(bytes(ours[:48]))
    assert back(flows, routed) == raw(
        IPv6(src="fd00::1", dst=A6) / ICMPv6TimeExceeded() / Raw(bytes(app[:48]))
    )


def test_an_icmpv6_error_built_by_the_proxy_is_what_the_app_would_see():
    """The daemon refuses a translated packet with an ICMPv6 error and runs it through the
    reply path (dispatch.on_reply): the app must see its own VIP:port in the quote."""
    flows = flows_of(P1_6)
    code, buf = out(flows, syn6())
    assert code == TRANSLATED
    refusal = pk.build_icmp_admin_prohibited(buf, "10.128.0.5")  # the pod's IPv4: no use here
    assert refusal is not None
    got = back(flows, refusal)
    p = IPv6(bytes(got))
    assert (p.src, p.dst) == (VIP6, A6)  # from the address the app sent to
    assert bytes(p[ICMPv6DestUnreach].payload) == bytes(raw(syn6()))
    again = IPv6(bytes(got))
    del again[ICMPv6DestUnreach].cksum
    assert bytes(IPv6(bytes(again))) == bytes(got)


# --- families apart ---------------------------------------------------------------------------


def test_ipv4_and_ipv6_flows_with_colliding_integers_stay_apart():
    """::a.b.c.d has the int of a.b.c.d: the keys must still differ (packet.addr_key)."""
    a6 = "::" + A4  # the same 32-bit value as A4
    vip6, p6 = "::" + VIP4, "::" + P1_4
    pods = frozenset({A4, a6, P1_4, p6})
    table = ServiceTable.build([web(P1_4, p6, ips=(VIP4, vip6))], pods)
    assert len(table) == 2
    flows = ServiceFlows(Stats(), Picks(), table)
    v4 = IP(src=A4, dst=VIP4) / UDP(sport=1234, dport=53) / PAYLOAD
    v6 = IPv6(src=a6, dst=vip6) / UDP(sport=1234, dport=53) / PAYLOAD
    assert out(flows, v4) == (
        TRANSLATED,
        raw(IP(src=A4, dst=P1_4) / UDP(sport=1234, dport=5353) / PAYLOAD),
    )
    assert out(flows, v6) == (
        TRANSLATED,
        raw(IPv6(src=a6, dst=p6) / UDP(sport=1234, dport=5353) / PAYLOAD),
    )
    assert len(flows) == 2 and set(flows.endpoints) == {k(P1_4), k(p6)}
    assert k(P1_4) == pk.ip_to_int(p6) != k(p6)
    r6 = IPv6(src=p6, dst=a6) / UDP(sport=5353, dport=1234) / PAYLOAD
    assert back(flows, r6) == raw(IPv6(src=vip6, dst=a6) / UDP(sport=53, dport=1234) / PAYLOAD)
    r4 = IP(src=P1_4, dst=A4) / UDP(sport=5353, dport=1234) / PAYLOAD
    assert back(flows, r4) == raw(IP(src=VIP4, dst=A4) / UDP(sport=53, dport=1234) / PAYLOAD)
    assert flows.expire(1000.0) == 2 and flows.endpoints == {}


# --- fragments, reused tuples, restore ----------------------------------------------------------


def test_ipv6_fragments_follow_their_first_fragment():
    flows = flows_of(P1_6)
    first = (
        IPv6(src=A6, dst=VIP6)
        / IPv6ExtHdrFragment(m=1, id=0xCAFE)
        / UDP(sport=1234, dport=53, len=100, chksum=0x1234)
        / PAYLOAD
    )
    code, buf = out(flows, first)
    assert code == TRANSLATED and dst6(buf) == P1_6
    later = IPv6(src=A6, dst=VIP6) / IPv6ExtHdrFragment(offset=5, id=0xCAFE, nh=17) / Raw(PAYLOAD)
    code, buf = out(flows, later, 1.0)
    assert code == TRANSLATED and buf == raw(
        IPv6(src=A6, dst=P1_6) / IPv6ExtHdrFragment(offset=5, id=0xCAFE, nh=17) / Raw(PAYLOAD)
    )
    other_id = (
        IPv6(src=A6, dst=VIP6) / IPv6ExtHdrFragment(offset=5, id=0xCAFF, nh=17) / Raw(PAYLOAD)
    )
    assert out(flows, other_id, 1.0)[0] == DROP
    reply_first = (
        IPv6(src=P1_6, dst=A6)
        / IPv6ExtHdrFragment(m=1, id=0xBEEF)
        / UDP(sport=5353, dport=1234, len=100, chksum=0x1234)
        / PAYLOAD
    )
    assert str(ipaddress.IPv6Address(bytes(back(flows, reply_first, 1.0)[8:24]))) == VIP6
    reply_later = (
        IPv6(src=P1_6, dst=A6) / IPv6ExtHdrFragment(offset=5, id=0xBEEF, nh=17) / Raw(PAYLOAD)
    )
    assert back(flows, reply_later, 1.0) == raw(
        IPv6(src=VIP6, dst=A6) / IPv6ExtHdrFragment(offset=5, id=0xBEEF, nh=17) / Raw(PAYLOAD)
    )


def test_a_direct_ipv6_syn_on_a_closed_service_flows_tuple_ends_that_flow():
    flows = flows_of(P1_6)
    out(flows, syn6())
    out(flows, syn6(flags="R"), 1.0)
    flows.direct_syn(raw(syn6(flags="SA", dst=P1_6, dport=8080)), 2.0)  # not a SYN alone
    flows.direct_syn(raw(IPv6(src=A6, dst=P1_6) / UDP(sport=40000, dport=8080)), 2.0)
    assert len(flows) == 1
    flows.direct_syn(raw(syn6(dst=P1_6, dport=8080)), 2.0)
    assert flows._stats.get("service_flows_reused") == 1 and len(flows) == 0


def test_restore_undoes_an_ipv6_translation():
    flows = flows_of(P1_6)
    buf = raw(syn6())
    ip = pk.parse_ip(buf)
    assert flows.translate(buf, ip, 0.0) == TRANSLATED and buf != raw(syn6())
    flows.restore(buf, ip)
    assert buf == raw(syn6())


def test_endpoint_changes_apply_per_family():
    flows = flows_of(P1_4, P1_6, P2_6, picks=(0, 0))
    dgram = IPv6(src=A6, dst=VIP6) / UDP(sport=1234, dport=53) / PAYLOAD
    assert dst6(out(flows, dgram)[1]) == P1_6
    assert flows.set_table(ServiceTable.build([web(P1_4, P2_6)], PODS), 1.0) == 1
    assert dst6(out(flows, dgram, 2.0)[1]) == P2_6  # chose again, among IPv6 endpoints
