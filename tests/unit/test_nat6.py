"""core/nat.py on IPv6: the receiver's VIP <-> pod IP translation, one pod IP per family.

Cast: peer pod A (PEER4, PEER6) talks to Service VIP (VIP4, VIP6), which kube-proxy leads to
this dual-stack pod (POD4, POD6). Expected packets are built by scapy from fields, so every
checksum in them (the IPv6 pseudo-header's included) is recomputed from scratch.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrFragment,
)
from scapy.packet import Raw

from tencrypt.core.nat import FlowTable
from tencrypt.core.stats import DropReason, Stats
from tencrypt.errors import UsageError
from tests.unit.test_packet6 import SETTINGS, build, fields

POD4, POD6 = "10.128.0.5", "fd00:10:128::5"
PEER4, PEER6 = "10.129.0.7", "fd00:10:129::7"
VIP4, VIP6 = "172.30.5.9", "fd00:30::5:9"
CIDRS = ("172.30.0.0/16", "fd00:30::/108")
PAYLOAD = b"tencrypt nat IPv6 payload"


def table(pods=(POD4, POD6), cidrs=CIDRS, **kw) -> FlowTable:
    return FlowTable(pods, cidrs, stats=Stats(), **kw)


def inbound(nat: FlowTable, p, now: float = 0.0) -> tuple[bool, bytes]:
    buf = bytearray(bytes(p))
    return nat.rewrite_inbound(buf, now), bytes(buf)


def outbound(nat: FlowTable, p, now: float = 0.0) -> tuple[bool, bytes]:
    buf = bytearray(bytes(p))
    return nat.rewrite_outbound(buf, now), bytes(buf)


@SETTINGS
@given(fields(protos=("tcp", "udp", "icmp6")))
def test_inbound_then_reply_restores_exact_bytes(f):
    f = {**f, "src": PEER6, "dst": VIP6, "type": 128}
    if f["proto"] == "tcp":
        f["flags"] &= ~0x04  # never a reset: it opens no flow
    nat = table()
    ok, got = inbound(nat, build(f))
    assert ok and got == build(f, dst=POD6)
    r = {**f, "src": POD6, "dst": PEER6, "sport": f["dport"], "dport": f["sport"]}
    if f["proto"] == "icmp6":
        r.update(type=129, sport=f["sport"])
    ok, back = outbound(nat, build(r), 1.0)
    assert ok and back == build(r, src=VIP6)
    assert nat.flows_of(PEER6) == 1 and nat.flows_of(PEER4) == 0


def test_destinations_are_judged_within_their_own_family():
    nat = table()
    to_pod = IPv6(src=PEER6, dst=POD6) / UDP(sport=1, dport=2)
    assert inbound(nat, to_pod) == (True, bytes(to_pod))
    outside = IPv6(src=PEER6, dst="fd00:31::1") / UDP(sport=1, dport=2)
    assert inbound(nat, outside)[0] is False
    # the IPv4 Service CIDR's bits in an IPv6 address are no IPv6 VIP
    assert inbound(nat, IPv6(src=PEER6, dst="::172.30.5.9") / UDP())[0] is False
    assert nat._stats.dropped(DropReason.BAD_DESTINATION) == 2
    v4 = IP(src=PEER4, dst=VIP4) / UDP(sport=1, dport=2)
    ok, got = inbound(nat, v4)
    assert ok and got == bytes(IP(src=PEER4, dst=POD4) / UDP(sport=1, dport=2))


def test_an_ipv4_only_table_accepts_no_ipv6_destination():
    nat = FlowTable(POD4, "172.30.0.0/16", stats=Stats())
    for dst in (VIP6, POD6):
        assert inbound(nat, IPv6(src=PEER6, dst=dst) / UDP(sport=1, dport=2))[0] is False
    assert nat._stats.dropped(DropReason.BAD_DESTINATION) == 2
    # and outbound IPv6 (no pod IPv6 address known) passes untouched
    p = IPv6(src=POD6, dst=PEER6) / UDP(sport=2, dport=1)
    assert outbound(nat, p) == (True, bytes(p))


def test_an_ipv6_only_pod():
    nat = FlowTable(POD6, "fd00:30::/108", stats=Stats())
    ok, got = inbound(nat, IPv6(src=PEER6, dst=VIP6) / UDP(sport=1, dport=2) / PAYLOAD)
    assert ok and got == bytes(IPv6(src=PEER6, dst=POD6) / UDP(sport=1, dport=2) / PAYLOAD)
    assert inbound(nat, IP(src=PEER4, dst=VIP4) / UDP())[0] is False


def test_own_pings_are_not_translated_and_only_requests_open_flows():
    nat = table()
    ok, _ = inbound(nat, IPv6(src=PEER6, dst=VIP6) / ICMPv6EchoReply(id=5))
    assert ok and len(nat) == 0  # a reply opens nothing
    mine = IPv6(src=POD6, dst=PEER6) / ICMPv6EchoReply(id=5)
    assert outbound(nat, mine) == (True, bytes(mine))
    mine_req = IPv6(src=POD6, dst=PEER6) / ICMPv6EchoRequest(id=6)
    assert outbound(nat, mine_req) == (True, bytes(mine_req))


def test_icmpv6_errors_both_ways():
    nat = table()
    inbound(nat, IPv6(src=PEER6, dst=VIP6) / UDP(sport=1234, dport=53) / PAYLOAD)
    # our stack reports on the peer's packet, which it saw addressed to this pod
    seen = bytes(IPv6(src=PEER6, dst=POD6) / UDP(sport=1234, dport=53) / PAYLOAD)
    sent = bytes(IPv6(src=PEER6, dst=VIP6) / UDP(sport=1234, dport=53) / PAYLOAD)
    ours = IPv6(src=POD6, dst=PEER6) / ICMPv6DestUnreach(code=4) / Raw(seen)
    ok, got = outbound(nat, ours, 1.0)
    assert ok and got == bytes(IPv6(src=VIP6, dst=PEER6) / ICMPv6DestUnreach(code=4) / Raw(sent))
    # the peer reports on a reply we sent as the VIP
    reply_as_vip = bytes(IPv6(src=VIP6, dst=PEER6) / UDP(sport=53, dport=1234) / PAYLOAD)
    reply_as_pod = bytes(IPv6(src=POD6, dst=PEER6) / UDP(sport=53, dport=1234) / PAYLOAD)
    theirs = IPv6(src=PEER6, dst=VIP6) / ICMPv6DestUnreach(code=3) / Raw(reply_as_vip)
    ok, got = inbound(nat, theirs, 1.0)
    assert ok and got == bytes(
        IPv6(src=PEER6, dst=POD6) / ICMPv6DestUnreach(code=3) / Raw(reply_as_pod)
    )
    short = IPv6(src=PEER6, dst=VIP6) / ICMPv6DestUnreach() / Raw(b"\x60" + bytes(20))
    assert inbound(nat, short, 1.0)[0] is False
    assert nat._stats.dropped(DropReason.MALFORMED_PACKET) == 1


def test_outbound_fragments_get_the_first_fragments_vip():
    nat = table()
    inbound(nat, IPv6(src=PEER6, dst=VIP6) / UDP(sport=1234, dport=53) / PAYLOAD)
    first = (
        IPv6(src=POD6, dst=PEER6)
        / IPv6ExtHdrFragment(m=1, id=77)
        / UDP(sport=53, dport=1234, len=200, chksum=0x4321)
        / PAYLOAD
    )
    ok, got = outbound(nat, first, 1.0)
    assert ok and got[8:24] == bytes(IPv6(src=VIP6))[8:24]
    later = IPv6(src=POD6, dst=PEER6) / IPv6ExtHdrFragment(offset=9, id=77, nh=17) / PAYLOAD
    ok, got = outbound(nat, later, 2.0)
    assert ok and got == bytes(
        IPv6(src=VIP6, dst=PEER6) / IPv6ExtHdrFragment(offset=9, id=77, nh=17) / PAYLOAD
    )


def test_colliding_integers_of_both_families_are_two_peers():
    """PEER4 and ::PEER4 share an int: two peers, two flows, two quotas (packet.addr_key)."""
    nat = table(max_flows_per_peer=1, max_flows=8)
    twin = "::" + PEER4
    assert inbound(nat, IP(src=PEER4, dst=VIP4) / UDP(sport=1, dport=2))[0]
    assert inbound(nat, IPv6(src=twin, dst=VIP6) / UDP(sport=1, dport=2))[0]
    assert nat.flows_of(PEER4) == 1 and nat.flows_of(twin) == 1 and len(nat) == 2
    ok, got = outbound(nat, IPv6(src=POD6, dst=twin) / UDP(sport=2, dport=1), 1.0)
    assert ok and got == bytes(IPv6(src=VIP6, dst=twin) / UDP(sport=2, dport=1))
    ok, got = outbound(nat, IP(src=POD4, dst=PEER4) / UDP(sport=2, dport=1), 1.0)
    assert ok and got == bytes(IP(src=VIP4, dst=PEER4) / UDP(sport=2, dport=1))


@pytest.mark.parametrize(
    ("pods", "cidrs"),
    [
        ((POD4, "10.128.0.6"), CIDRS),  # two IPv4 pod IPs
        ((POD6, "fd00:10:128::6"), CIDRS),
        ((POD4, "fd00:30::1"), CIDRS),  # the IPv6 pod IP inside the IPv6 Service CIDR
        ((POD4, POD6), ("172.30.0.0/16", "fd00:30::1/108")),  # host bits set
        (("pod",), CIDRS),
    ],
)
def test_bad_configuration_refused(pods, cidrs):
    with pytest.raises(UsageError):
        FlowTable(pods, cidrs, stats=Stats())
