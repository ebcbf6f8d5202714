"""core/conntrack.py: the sender's per-connection Service translation.

Cast: this pod A talks to Service VIP (port 80, plus UDP 53), whose endpoints are pods P1 and
P2 (target ports 8080 and 5353). Expected packets are built by scapy from fields, so every
checksum in them is computed from scratch: an incremental update that is off shows up.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from tencrypt.core import packet as pk
from tencrypt.core.conntrack import DROP, REJECT, TRANSLATED, ServiceFlows
from tencrypt.core.services import Endpoint, Port, Service, ServiceTable
from tencrypt.core.stats import DropReason, Stats

A, VIP, P1, P2, P3 = "10.128.0.5", "172.30.5.9", "10.128.0.11", "10.129.0.12", "10.129.0.13"
PODS = frozenset({A, P1, P2, P3})
PAYLOAD = b"tencrypt conntrack test payload"


def n(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def service(*ips: str, affinity: float = 0.0, **conditions) -> Service:
    return Service(
        "web",
        (VIP,),
        (Port("http", pk.TCP, 80), Port("dns", pk.UDP, 53), Port("sctp", pk.SCTP, 9)),
        tuple(
            Endpoint(
                ip,
                (
                    Port("http", pk.TCP, 8080),
                    Port("dns", pk.UDP, 5353),
                    Port("sctp", pk.SCTP, 9),
                ),
                **conditions.get(ip, {}),
            )
            for ip in ips
        ),
        affinity,
    )


def table(*ips: str, **kw) -> ServiceTable:
    return ServiceTable.build([service(*ips, **kw)], PODS)


class Picks:
    """An rng that picks the given indexes in turn (then the first)."""

    def __init__(self, *indexes: int) -> None:
        self.indexes: Iterator[int] = iter(indexes)

    def __call__(self, bound: int) -> int:
        return next(self.indexes, 0) % bound


def flows_of(*ips: str, picks: tuple[int, ...] = (), **kw) -> ServiceFlows:
    return ServiceFlows(Stats(), Picks(*picks), table(*ips), **kw)


def raw(p) -> bytearray:
    return bytearray(bytes(p))


def out(flows: ServiceFlows, p, now: float = 0.0) -> tuple[int, bytearray]:
    buf = raw(p)
    ip = pk.parse_ipv4(buf)
    assert ip is not None
    return flows.translate(buf, ip, now), buf


def back(flows: ServiceFlows, p, now: float = 0.0) -> bytearray:
    buf = raw(p)
    ip = pk.parse_ipv4(buf)
    assert ip is not None
    flows.translate_reply(buf, ip, now)
    return buf


def syn(sport: int = 40000, flags: str = "S") -> IP:
    return IP(src=A, dst=VIP, id=7) / TCP(sport=sport, dport=80, flags=flags, seq=1) / PAYLOAD


def test_a_tcp_connection_goes_to_one_endpoint_and_its_replies_come_back_as_the_vip():
    flows = flows_of(P1, P2, picks=(1,))
    code, buf = out(flows, syn())
    expected = IP(src=A, dst=P2, id=7) / TCP(sport=40000, dport=8080, flags="S", seq=1) / PAYLOAD
    assert code == TRANSLATED and buf == raw(expected)
    code, buf = out(flows, syn(flags="A"), 1.0)  # the same flow: the same endpoint, no new pick
    assert code == TRANSLATED and buf[16:20] == ipaddress.IPv4Address(P2).packed
    reply = IP(src=P2, dst=A, id=9) / TCP(sport=8080, dport=40000, flags="SA") / PAYLOAD
    assert back(flows, reply, 1.0) == raw(
        IP(src=VIP, dst=A, id=9) / TCP(sport=80, dport=40000, flags="SA") / PAYLOAD
    )
    assert flows.endpoints == {n(P2): 1} and len(flows) == 1
    assert flows._stats.get("service_flows_created") == 1


def test_new_connections_spread_over_the_ready_endpoints():
    flows = ServiceFlows(Stats(), random.Random(7).randrange, table(P1, P2))
    seen = {P1: 0, P2: 0}
    for port in range(40000, 40040):
        code, buf = out(flows, syn(port))
        assert code == TRANSLATED
        seen[str(ipaddress.IPv4Address(bytes(buf[16:20])))] += 1
    assert seen[P1] >= 8 and seen[P2] >= 8  # 40 flows: each replica well above 20 %
    assert len(flows) == 40


def test_udp_keeps_a_zero_checksum_and_icmp_echo_keeps_its_id():
    flows = flows_of(P1)
    dgram = IP(src=A, dst=VIP) / UDP(sport=1234, dport=53, chksum=0) / PAYLOAD
    code, buf = out(flows, dgram)
    assert code == TRANSLATED
    assert buf == raw(IP(src=A, dst=P1) / UDP(sport=1234, dport=5353, chksum=0) / PAYLOAD)
    echo = IP(src=A, dst=VIP) / ICMP(type=8, id=77, seq=1) / PAYLOAD
    code, buf = out(flows, echo)
    assert code == TRANSLATED and buf == raw(
        IP(src=A, dst=P1) / ICMP(type=8, id=77, seq=1) / PAYLOAD
    )
    reply = IP(src=P1, dst=A) / ICMP(type=0, id=77, seq=1) / PAYLOAD
    assert back(flows, reply) == raw(IP(src=VIP, dst=A) / ICMP(type=0, id=77, seq=1) / PAYLOAD)
    other = IP(src=P1, dst=A) / ICMP(type=0, id=78, seq=1) / PAYLOAD  # not ours: untouched
    assert back(flows, other) == raw(other)


@pytest.mark.parametrize(
    "p",
    [
        IP(src=A, dst=VIP) / TCP(sport=1, dport=81),  # not a port of the Service
        IP(src=A, dst=VIP) / UDP(sport=1, dport=80),  # TCP port, UDP packet
        IP(src=A, dst=VIP, proto=132) / Raw(b"\x00\x01\x00\x09" + bytes(8)),  # SCTP
        IP(src=A, dst=VIP) / ICMP(type=13),  # a timestamp request: only echo is carried
        IP(src=A, dst=VIP, proto=47) / Raw(bytes(8)),  # GRE: no ports
    ],
)
def test_no_such_service_port_is_rejected_and_counted(p):
    flows = flows_of(P1)
    code, buf = out(flows, p)
    assert code == REJECT and buf == raw(p) and len(flows) == 0
    assert flows._stats.dropped(DropReason.SERVICE_NO_ENDPOINT) == 1


def test_a_service_port_without_a_usable_endpoint_is_rejected():
    flows = ServiceFlows(Stats(), Picks(), table(P1, **{P1: {"ready": False, "serving": False}}))
    assert out(flows, syn())[0] == REJECT
    flows.set_table(ServiceTable.build([service("10.250.0.1")], PODS), 0.0)  # not a member
    assert out(flows, syn())[0] == REJECT


def test_a_syn_on_a_closed_flow_is_a_new_connection_and_chooses_again():
    flows = flows_of(P1, P2, picks=(0, 1))
    assert out(flows, syn())[1][16:20] == ipaddress.IPv4Address(P1).packed
    out(flows, syn(flags="R"), 1.0)  # reset: the flow is closed
    code, buf = out(flows, syn(), 2.0)
    assert code == TRANSLATED and buf[16:20] == ipaddress.IPv4Address(P2).packed
    # a SYN on an open flow (a retransmission) keeps its endpoint
    assert out(flows, syn(), 2.5)[1][16:20] == ipaddress.IPv4Address(P2).packed


def test_a_direct_syn_on_a_closed_service_flows_tuple_ends_that_flow():
    """Rule 8: port 40000 went to the VIP (now closed), then the app opens 40000 -> P1:8080
    straight: P1's answers belong to the new connection, never rewritten to the VIP."""
    flows = flows_of(P1)
    out(flows, syn())
    out(flows, syn(flags="R"), 1.0)  # closed, still in the table for tcp_closed seconds
    direct = raw(IP(src=A, dst=P1) / TCP(sport=40000, dport=8080, flags="S"))
    flows.direct_syn(direct, 2.0)
    assert flows._stats.get("service_flows_reused") == 1 and len(flows) == 0
    answer = IP(src=P1, dst=A) / TCP(sport=8080, dport=40000, flags="SA")
    assert back(flows, answer, 2.0) == raw(answer)  # untouched: the direct connection's


def test_a_direct_syn_on_an_open_service_flows_tuple_is_counted_and_changes_nothing():
    flows = flows_of(P1)
    out(flows, syn())
    before = flows.endpoint_of((pk.TCP, n(A), 40000, n(VIP), 80), 1.0)
    for flags in ("S", "SA", "A"):  # only a SYN without ACK is looked at
        flows.direct_syn(raw(IP(src=A, dst=P1) / TCP(sport=40000, dport=8080, flags=flags)), 1.0)
    flows.direct_syn(raw(IP(src=A, dst=P1) / TCP(sport=40001, dport=8080, flags="S")), 1.0)
    assert flows._stats.get("service_tuple_conflicts") == 1
    assert flows.endpoint_of((pk.TCP, n(A), 40000, n(VIP), 80), 1.0) == before == (n(P1), 8080)


def test_fins_both_ways_close_the_flow_then_it_expires_quickly():
    flows = flows_of(P1, tcp_closed=10.0)
    out(flows, syn())
    out(flows, syn(flags="FA"), 1.0)
    back(flows, IP(src=P1, dst=A) / TCP(sport=8080, dport=40000, flags="FA"), 1.5)
    assert flows.endpoint_of((pk.TCP, n(A), 40000, n(VIP), 80), 5.0) == (n(P1), 8080)
    assert flows.endpoint_of((pk.TCP, n(A), 40000, n(VIP), 80), 12.0) is None
    assert flows.endpoints == {}


def test_a_removed_endpoint_gets_no_new_flow_its_udp_flows_choose_again_open_tcp_stays():
    flows = flows_of(P1, P2, picks=(0, 0, 0))
    out(flows, syn())  # TCP to P1, open
    dgram = IP(src=A, dst=VIP) / UDP(sport=1234, dport=53) / PAYLOAD
    assert out(flows, dgram)[1][16:20] == ipaddress.IPv4Address(P1).packed
    removed = flows.set_table(table(P2), 1.0)
    assert removed == 1 and flows._stats.get("service_flows_repicked") == 1
    assert out(flows, dgram, 2.0)[1][16:20] == ipaddress.IPv4Address(P2).packed  # re-picked
    assert out(flows, syn(flags="A"), 2.0)[1][16:20] == ipaddress.IPv4Address(P1).packed
    assert out(flows, syn(40001), 2.0)[1][16:20] == ipaddress.IPv4Address(P2).packed


def test_a_terminating_endpoint_keeps_its_flows_but_gets_no_new_ones():
    flows = flows_of(P1, P2, picks=(0, 0))
    dgram = IP(src=A, dst=VIP) / UDP(sport=1234, dport=53) / PAYLOAD
    out(flows, dgram)
    terminating = {P1: {"ready": False, "serving": True, "terminating": True}}
    assert flows.set_table(table(P1, P2, **terminating), 1.0) == 0
    assert out(flows, dgram, 2.0)[1][16:20] == ipaddress.IPv4Address(P1).packed
    new = IP(src=A, dst=VIP) / UDP(sport=1235, dport=53) / PAYLOAD
    assert out(flows, new, 2.0)[1][16:20] == ipaddress.IPv4Address(P2).packed


def test_client_ip_affinity_keeps_new_flows_on_one_endpoint_until_it_times_out_or_goes():
    flows = ServiceFlows(Stats(), random.Random(3).randrange, table(P1, P2, P3, affinity=100.0))
    first = out(flows, syn(40000))[1][16:20]
    for port in range(40001, 40020):
        assert out(flows, syn(port), 1.0)[1][16:20] == first
    flows.expire(200.0)  # 100 s after its last new flow: the affinity is over
    chosen = {bytes(out(flows, syn(p), 200.0 + p)[1][16:20]) for p in range(41000, 41020)}
    assert len(chosen) == 1  # a new affinity, held again
    gone = str(ipaddress.IPv4Address(chosen.pop()))
    flows.set_table(table(*({P1, P2, P3} - {gone}), affinity=100.0), 300.0)
    again = {bytes(out(flows, syn(p), 301.0)[1][16:20]) for p in range(42000, 42010)}
    assert len(again) == 1 and ipaddress.IPv4Address(again.pop()) != ipaddress.IPv4Address(gone)


def test_our_icmp_error_about_a_reply_from_the_vip_goes_to_the_endpoint():
    flows = flows_of(P1)
    out(flows, IP(src=A, dst=VIP) / UDP(sport=1234, dport=53) / PAYLOAD)
    seen = raw(IP(src=VIP, dst=A, id=3) / UDP(sport=53, dport=1234) / PAYLOAD)[:28]
    sent = raw(IP(src=P1, dst=A, id=3) / UDP(sport=5353, dport=1234) / PAYLOAD)[:28]
    code, buf = out(flows, IP(src=A, dst=VIP) / ICMP(type=3, code=3) / Raw(bytes(seen)))
    assert code == TRANSLATED
    assert buf == raw(IP(src=A, dst=P1) / ICMP(type=3, code=3) / Raw(bytes(sent)))
    stray = (
        IP(src=A, dst=VIP)
        / ICMP(type=3, code=3)
        / Raw(bytes(raw(IP(src=VIP, dst=A) / UDP(sport=53, dport=999) / PAYLOAD)[:28]))
    )
    assert out(flows, stray)[0] == DROP  # no such flow: not sent anywhere


def test_an_endpoints_icmp_error_about_our_packet_names_the_vip():
    flows = flows_of(P1)
    out(flows, syn())
    ours = raw(IP(src=A, dst=P1, id=7) / TCP(sport=40000, dport=8080, flags="S", seq=1) / PAYLOAD)
    app = raw(IP(src=A, dst=VIP, id=7) / TCP(sport=40000, dport=80, flags="S", seq=1) / PAYLOAD)
    error = IP(src=P1, dst=A) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(bytes(ours[:48]))
    assert back(flows, error) == raw(
        IP(src=VIP, dst=A) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(bytes(app[:48]))
    )
    # a router's error (another source) keeps its source; the quote still names the VIP
    routed = IP(src="10.0.0.1", dst=A) / ICMP(type=11) / Raw(bytes(ours[:48]))
    assert back(flows, routed) == raw(
        IP(src="10.0.0.1", dst=A) / ICMP(type=11) / Raw(bytes(app[:48]))
    )


def test_fragments_follow_their_first_fragment():
    flows = flows_of(P1)
    first = (
        IP(src=A, dst=VIP, id=99, flags="MF")
        / UDP(sport=1234, dport=53, len=100, chksum=0)
        / PAYLOAD
    )
    code, buf = out(flows, first)
    assert code == TRANSLATED and buf[16:20] == ipaddress.IPv4Address(P1).packed
    later = IP(src=A, dst=VIP, id=99, frag=5, proto=17) / Raw(PAYLOAD)
    code, buf = out(flows, later, 1.0)
    assert code == TRANSLATED and buf == raw(
        IP(src=A, dst=P1, id=99, frag=5, proto=17) / Raw(PAYLOAD)
    )
    orphan = IP(src=A, dst=VIP, id=100, frag=5, proto=17) / Raw(PAYLOAD)
    assert out(flows, orphan, 1.0)[0] == DROP
    assert out(flows, later, 40.0)[0] == DROP  # past FRAG_TIMEOUT
    back_first = (
        IP(src=P1, dst=A, id=5, flags="MF")
        / UDP(sport=5353, dport=1234, len=100, chksum=0)
        / PAYLOAD
    )
    assert back(flows, back_first, 1.0)[12:16] == ipaddress.IPv4Address(VIP).packed
    back_later = IP(src=P1, dst=A, id=5, frag=5, proto=17) / Raw(PAYLOAD)
    assert back(flows, back_later, 1.0) == raw(
        IP(src=VIP, dst=A, id=5, frag=5, proto=17) / Raw(PAYLOAD)
    )


def test_a_full_table_evicts_the_idlest_flow_closed_tcp_first():
    flows = flows_of(P1, max_flows=2)
    out(flows, syn(1), 0.0)
    out(flows, syn(2), 1.0)
    out(flows, syn(3), 2.0)  # full: the flow idle longest (port 1) goes
    assert flows.endpoint_of((pk.TCP, n(A), 1, n(VIP), 80), 2.0) is None
    assert flows._stats.get("service_flows_evicted") == 1
    out(flows, syn(2, "R"), 3.0)  # port 2 closed
    out(flows, syn(4), 4.0)  # the closed flow goes before the idler open one
    assert flows.endpoint_of((pk.TCP, n(A), 2, n(VIP), 80), 4.0) is None
    assert flows.endpoint_of((pk.TCP, n(A), 3, n(VIP), 80), 4.0) == (n(P1), 8080)
    with pytest.raises(ValueError):
        ServiceFlows(Stats(), Picks(), max_flows=0)


def test_expired_flows_are_gone_and_their_replies_pass_untouched():
    flows = flows_of(P1, udp_idle=180.0)
    out(flows, IP(src=A, dst=VIP) / UDP(sport=1234, dport=53) / PAYLOAD)
    assert flows.expire(100.0) == 0 and flows.expire(181.0) == 1
    reply = IP(src=P1, dst=A) / UDP(sport=5353, dport=1234) / PAYLOAD
    assert back(flows, reply, 181.0) == raw(reply) and flows.endpoints == {}
    assert flows._stats.get("service_flows_expired") == 1


def test_malformed_icmp_errors_are_dropped_out_and_ignored_in():
    flows = flows_of(P1)
    short = IP(src=A, dst=VIP) / ICMP(type=3, code=3) / Raw(b"\x45" + bytes(10))
    assert out(flows, short)[0] == DROP
    assert flows._stats.dropped(DropReason.MALFORMED_PACKET) == 1
    bad_in = IP(src=P1, dst=A) / ICMP(type=3, code=3) / Raw(b"\x45" + bytes(10))
    assert back(flows, bad_in) == raw(bad_in)
