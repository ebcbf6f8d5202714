"""core/nat.py: the receiver's VIP <-> pod IP translation and its flow table.

Cast: peer pod A (PEER) talks to Service VIP, which kube-proxy leads to this pod (POD). Expected
packets are built by scapy from fields, so every checksum in them is recomputed from scratch.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.packet import Raw

from tencrypt.core.nat import FlowTable
from tencrypt.core.packet import parse_ipv4
from tencrypt.core.stats import DropReason, Stats
from tencrypt.errors import UsageError
from tests.unit.test_packet import SETTINGS, build, build_scapy, fields, u8, u16

POD = "10.128.0.5"
PEER = "10.129.0.7"
VIP = "172.30.5.9"
VIP2 = "172.30.7.7"
TIMEOUTS = dict(tcp_idle=7440.0, tcp_closed=10.0, udp_idle=180.0, icmp_idle=30.0)


def table(**kw) -> FlowTable:
    return FlowTable(POD, "172.30.0.0/16", stats=Stats(), **kw)


def stats_of(nat: FlowTable) -> Stats:
    return nat._stats


def request(f) -> dict:
    """A's packet to the VIP: the fields drawn, addressed PEER -> VIP, never a reset."""
    g = {**f, "src": PEER, "dst": VIP}
    if g["proto"] == "tcp":
        g["flags"] &= ~0x04
    if g["proto"] == "icmp":
        g["type"] = g["type"] if g["type"] in (8, 13) else 8
    return g


def reply(f, g) -> dict:
    """This pod's answer to request ``f`` (other fields from ``g``): POD -> PEER, ports swapped."""
    r = {
        "seq": 1,
        "ack": 1,
        "window": 1,
        "options": 0,
        "flags": 0x10,
        "nocsum": False,
        **g,
        "proto": f["proto"],
        "src": POD,
        "dst": PEER,
        "sport": f["dport"],
        "dport": f["sport"],
    }
    if f["proto"] == "icmp":
        r.update(type={8: 0, 13: 14}[f["type"]], sport=f["sport"])
    return r


def inbound(nat, raw: bytes, now: float) -> tuple[bool, bytes]:
    buf = bytearray(raw)
    return nat.rewrite_inbound(buf, now), bytes(buf)


def outbound(nat, raw: bytes, now: float) -> tuple[bool, bytes]:
    buf = bytearray(raw)
    return nat.rewrite_outbound(buf, now), bytes(buf)


# --- the round trip ---------------------------------------------------------------------------


@SETTINGS
@given(fields(), fields())
def test_inbound_then_reply_restores_exact_bytes(f, g):
    nat = table()
    req = request(f)
    ok, got = inbound(nat, build(req), 0.0)
    assert ok and got == build(req, dst=POD)
    if g["proto"] != f["proto"]:
        g = {k: v for k, v in g.items() if k in ("id", "ttl", "tos", "df", "nops", "payload")}
    rep = reply(req, g)
    ok, got = outbound(nat, build(rep), 1.0)
    assert ok and got == build(rep, src=VIP)
    assert sum(stats_of(nat).drops.values()) == 0


@SETTINGS
@given(fields(protos=("udp", "tcp"), max_payload=1400), st.sampled_from([64, 256, 512]))
def test_fragmented_request_and_reply(f, size):
    nat = table()
    req = {**request(f), "df": False}
    rep = {**reply(req, req), "df": False}
    if req["proto"] == "tcp":
        req["flags"] |= 0x02
    for raw, want in zip(
        fragment(build_scapy(req), size), fragment(build_scapy(req, dst=POD), size), strict=True
    ):
        assert inbound(nat, bytes(raw), 0.0) == (True, bytes(want))
    for raw, want in zip(
        fragment(build_scapy(rep), size), fragment(build_scapy(rep, src=VIP), size), strict=True
    ):
        assert outbound(nat, bytes(raw), 1.0) == (True, bytes(want))


def test_later_fragments_of_an_unknown_datagram_pass_unchanged():
    nat = table()
    frags = fragment(
        IP(src=POD, dst=PEER, id=99) / UDP(sport=80, dport=4000) / Raw(b"x" * 600), 256
    )
    for raw in frags[1:]:
        assert outbound(nat, bytes(raw), 0.0) == (True, bytes(raw))


def test_pod_ip_destination_passes_untouched():
    nat = table()
    raw = bytes(IP(src=PEER, dst=POD) / TCP(sport=1, dport=2, flags="S"))
    assert inbound(nat, raw, 0.0) == (True, raw)
    assert len(nat) == 0


def test_destination_outside_service_cidr_dropped():
    nat = table()
    raw = bytes(IP(src=PEER, dst="10.128.0.6") / UDP(sport=1, dport=2))
    ok, got = inbound(nat, raw, 0.0)
    assert not ok and got == raw
    assert stats_of(nat).dropped(DropReason.BAD_DESTINATION) == 1 and len(nat) == 0


def test_unrelated_outbound_passes_untouched():
    nat = table()
    inbound(nat, bytes(IP(src=PEER, dst=VIP) / UDP(sport=4000, dport=53)), 0.0)
    for raw in [
        IP(src=POD, dst=PEER) / UDP(sport=53, dport=4001),  # other port
        IP(src=POD, dst="10.129.0.8") / UDP(sport=53, dport=4000),  # other peer
        IP(src="10.128.0.9", dst=PEER) / UDP(sport=53, dport=4000),  # not our source
        IP(src=POD, dst=PEER) / TCP(sport=53, dport=4000),
    ]:  # other protocol
        assert outbound(nat, bytes(raw), 1.0) == (True, bytes(raw))


def test_own_pings_are_not_translated():
    nat = table()
    inbound(nat, bytes(IP(src=PEER, dst=VIP) / ICMP(type=8, id=77)), 0.0)
    own = bytes(IP(src=POD, dst=PEER) / ICMP(type=8, id=77))
    assert outbound(nat, own, 1.0) == (True, own)
    answer = bytes(IP(src=PEER, dst=POD) / ICMP(type=0, id=77))
    assert inbound(nat, answer, 1.0) == (True, answer)
    echo = bytes(IP(src=POD, dst=PEER) / ICMP(type=0, id=77))
    assert outbound(nat, echo, 2.0) == (True, bytes(IP(src=VIP, dst=PEER) / ICMP(type=0, id=77)))


def test_only_icmp_requests_open_flows():
    nat = table()
    stray = IP(src=PEER, dst=VIP) / ICMP(type=0, id=78)  # a reply sent to a VIP
    assert inbound(nat, bytes(stray), 0.0) == (
        True,
        bytes(IP(src=PEER, dst=POD) / ICMP(type=0, id=78)),
    )
    assert len(nat) == 0
    assert reply_source(nat, 1.0, "icmp", sport=78) == POD


def test_other_protocols_keyed_by_peer():
    nat = table()
    gre = IP(src=PEER, dst=VIP, proto=47) / Raw(b"\0\0\x08\0payload!")
    assert inbound(nat, bytes(gre), 0.0) == (
        True,
        bytes(IP(src=PEER, dst=POD, proto=47) / Raw(b"\0\0\x08\0payload!")),
    )
    back = IP(src=POD, dst=PEER, proto=47) / Raw(b"reply")
    assert outbound(nat, bytes(back), 1.0)[1] == bytes(
        IP(src=VIP, dst=PEER, proto=47) / Raw(b"reply")
    )


# --- ICMP errors ------------------------------------------------------------------------------


@SETTINGS
@given(fields(), st.sampled_from([8, 18, 20, 548]), u16, u8)
def test_our_icmp_error_about_a_natted_packet(f, extra, ident, code):
    """Our stack reports on a packet that came in for VIP: the peer must see VIP everywhere."""
    nat = table()
    req = request(f)
    sent = build(req)  # what A sent and what A's stack will match the quote against
    ok, delivered = inbound(nat, sent, 0.0)
    hlen = parse_ipv4(sent).hlen
    err = IP(src=POD, dst=PEER, id=ident) / ICMP(type=3, code=code) / Raw(delivered[: hlen + extra])
    ok, got = outbound(nat, bytes(err), 1.0)
    want = bytearray(sent[: hlen + extra])
    if req["proto"] == "tcp" and extra < 20 and len(want) >= hlen + 18:
        want[hlen + 16 : hlen + 18] = delivered[hlen + 16 : hlen + 18]  # as Linux: not updated
    assert ok and got == bytes(
        IP(src=VIP, dst=PEER, id=ident) / ICMP(type=3, code=code) / Raw(bytes(want))
    )


@SETTINGS
@given(fields(), st.sampled_from([8, 20, 548]), u16)
def test_peer_icmp_error_about_our_translated_reply(f, extra, ident):
    """A's stack reports on a reply we sent as VIP: our stack must see its own packet quoted."""
    nat = table()
    rep = reply(request(f), request(f))
    theirs = build(rep, src=VIP)  # what left us after un-NAT
    hlen = parse_ipv4(theirs).hlen
    err = IP(src=PEER, dst=VIP, id=ident) / ICMP(type=3, code=3) / Raw(theirs[: hlen + extra])
    ok, got = inbound(nat, bytes(err), 2.0)
    ours = build(rep)[: hlen + extra]
    assert ok and got == bytes(IP(src=PEER, dst=POD, id=ident) / ICMP(type=3, code=3) / Raw(ours))


def test_icmp_error_about_unknown_flow_passes_untouched():
    nat = table()
    quote = bytes(IP(src=PEER, dst=POD) / UDP(sport=5, dport=6))
    err = bytes(IP(src=POD, dst=PEER) / ICMP(type=3, code=3) / Raw(quote))
    assert outbound(nat, err, 0.0) == (True, err)


def test_icmp_error_with_truncated_quote_dropped():
    nat = table()
    quote = bytes(IP(src=PEER, dst=POD) / UDP(sport=5, dport=6))[:24]
    for direction, raw in [(outbound, IP(src=POD, dst=PEER)), (inbound, IP(src=PEER, dst=VIP))]:
        ok, _ = direction(nat, bytes(raw / ICMP(type=3, code=3) / Raw(quote)), 0.0)
        assert not ok
    assert stats_of(nat).dropped(DropReason.MALFORMED_PACKET) == 2


# --- garbage ----------------------------------------------------------------------------------


def check_counted(nat, direction, buf: bytearray) -> None:
    before = sum(stats_of(nat).drops.values())
    ok = direction(buf, 5.0)
    assert isinstance(ok, bool)
    assert sum(stats_of(nat).drops.values()) == before + (0 if ok else 1)


@SETTINGS
@given(st.binary(max_size=120))
def test_random_bytes_never_raise_and_drops_are_counted(data):
    nat = table()
    inbound(nat, bytes(IP(src=PEER, dst=VIP) / TCP(sport=1, dport=2)), 0.0)
    for raw in (data, b"\x45" + data, bytes(IP(src=PEER, dst=VIP) / ICMP(type=3) / Raw(data))):
        check_counted(nat, nat.rewrite_inbound, bytearray(raw))
        check_counted(nat, nat.rewrite_outbound, bytearray(raw))


@SETTINGS
@given(fields(), st.lists(st.tuples(st.integers(0, 80), u8), min_size=1, max_size=6))
def test_mutated_packets_never_raise(f, flips):
    nat = table()
    for src, dst in [(PEER, VIP), (POD, PEER)]:
        buf = bytearray(build(f, src=src, dst=dst))
        for at, value in flips:
            buf[at % len(buf)] = value
        check_counted(nat, nat.rewrite_inbound, bytearray(buf))
        check_counted(nat, nat.rewrite_outbound, bytearray(buf))


def test_bad_configuration_refused():
    with pytest.raises(UsageError):
        FlowTable("10.128.0.300")
    with pytest.raises(UsageError):
        FlowTable(POD, "172.30.0.1/16")  # host bits set
    with pytest.raises(UsageError):
        FlowTable("172.30.0.9")  # inside the Service CIDR
    with pytest.raises(UsageError):
        FlowTable(POD, max_flows=0)


# --- the flow table ---------------------------------------------------------------------------


def send_in(nat, now, proto="udp", sport=4000, dport=53, vip=VIP, flags="A", peer=PEER) -> bool:
    l4 = {
        "udp": UDP(sport=sport, dport=dport),
        "tcp": TCP(sport=sport, dport=dport, flags=flags),
        "icmp": ICMP(type=8, id=sport),
    }[proto]
    return inbound(nat, bytes(IP(src=peer, dst=vip) / l4), now)[0]


def reply_source(nat, now, proto="udp", sport=4000, dport=53, flags="A", peer=PEER) -> str:
    """Source address of this pod's reply after rewrite_outbound (VIP if the flow lives)."""
    l4 = {
        "udp": UDP(sport=dport, dport=sport),
        "tcp": TCP(sport=dport, dport=sport, flags=flags),
        "icmp": ICMP(type=0, id=sport),
    }[proto]
    ok, got = outbound(nat, bytes(IP(src=POD, dst=peer) / l4), now)
    assert ok
    return IP(got).src


# ---- per-peer quota (rule 8) -------------------------------------------------------------------

OTHER = "10.128.0.77"


def test_one_peer_at_its_quota_cannot_evict_another_peers_flows():
    nat = table(max_flows=8, max_flows_per_peer=4)
    for port in (1, 2):
        assert send_in(nat, 1.0, "tcp", sport=port, flags="S", peer=OTHER)
    for port in range(100, 110):  # the noisy peer opens ten flows
        send_in(nat, 2.0, "udp", sport=port, peer=PEER)
    assert nat.flows_of(PEER) == 4 and nat.flows_of(OTHER) == 2
    assert stats_of(nat).dropped(DropReason.NAT_PEER_QUOTA) == 6
    assert stats_of(nat).get("nat_flows_evicted") == 0
    # the other peer's replies still leave with the VIP, the noisy peer's extra flows do not
    assert [reply_source(nat, 3.0, "tcp", sport=p, peer=OTHER) for p in (1, 2)] == [VIP, VIP]
    assert reply_source(nat, 3.0, "udp", sport=103, peer=PEER) == VIP
    assert reply_source(nat, 3.0, "udp", sport=104, peer=PEER) == POD  # refused, not tracked


def test_quota_frees_up_when_the_peers_own_flows_die():
    nat = table(max_flows=8, max_flows_per_peer=2, udp_idle=10.0)
    assert send_in(nat, 1.0, sport=1) and send_in(nat, 1.0, sport=2)
    assert not send_in(nat, 2.0, sport=3)
    assert send_in(nat, 12.0, sport=3)  # the first two are dead: reaped, not evicted
    assert nat.flows_of(PEER) == 1 and stats_of(nat).dropped(DropReason.NAT_PEER_QUOTA) == 1


def test_full_table_evicts_from_the_peer_holding_most():
    nat = table(max_flows=4, max_flows_per_peer=3)
    assert send_in(nat, 1.0, sport=1, peer=OTHER)  # oldest of all, but OTHER holds only one
    for port in (10, 11, 12):
        assert send_in(nat, 2.0 + port / 100, sport=port)
    assert send_in(nat, 3.0, sport=2, peer="10.128.0.78")  # table full: PEER pays
    assert nat.flows_of(OTHER) == 1 and nat.flows_of(PEER) == 2
    assert reply_source(nat, 3.0, sport=1, peer=OTHER) == VIP
    assert reply_source(nat, 3.0, sport=10, peer=PEER) == POD  # PEER's idlest flow went


@pytest.mark.parametrize("proto,timeout", [("udp", 180.0), ("tcp", 7440.0), ("icmp", 30.0)])
def test_idle_timeout_per_protocol(proto, timeout):
    nat = table(**TIMEOUTS)
    assert send_in(nat, 0.0, proto)
    assert nat.expire(timeout - 0.001) == 0 and len(nat) == 1
    assert nat.expire(timeout) == 1 and len(nat) == 0
    assert reply_source(nat, timeout, proto) == POD

    lazy = table(**TIMEOUTS)  # dead on lookup even before expire() runs
    send_in(lazy, 0.0, proto)
    assert reply_source(lazy, timeout - 0.001, proto) == VIP  # and this refreshes it
    assert reply_source(lazy, 2 * timeout - 0.002, proto) == VIP
    assert reply_source(lazy, 3 * timeout, proto) == POD
    assert len(lazy) == 0


def test_tcp_fin_each_way_closes():
    nat = table(**TIMEOUTS)
    send_in(nat, 0.0, "tcp", flags="S")
    send_in(nat, 1.0, "tcp", flags="FA")
    assert nat.expire(1.0 + 10.0) == 0  # one FIN only: half-closed, still long timeout
    assert reply_source(nat, 2.0, "tcp", flags="FA") == VIP  # second FIN, from us
    assert reply_source(nat, 3.0, "tcp", flags="A") == VIP  # last ACK refreshes
    assert nat.expire(12.999) == 0
    assert nat.expire(13.0) == 1


@pytest.mark.parametrize("rst_inbound", [True, False])
def test_tcp_rst_closes(rst_inbound):
    nat = table(**TIMEOUTS)
    send_in(nat, 0.0, "tcp", flags="S")
    if rst_inbound:
        send_in(nat, 1.0, "tcp", flags="R")
    else:
        assert reply_source(nat, 1.0, "tcp", flags="RA") == VIP
    assert nat.expire(10.999) == 0
    assert nat.expire(11.0) == 1


def test_rst_for_unknown_flow_creates_nothing():
    nat = table()
    assert send_in(nat, 0.0, "tcp", flags="R")
    assert len(nat) == 0


def test_syn_reopens_a_closed_flow():
    nat = table(**TIMEOUTS)
    send_in(nat, 0.0, "tcp", flags="S")
    send_in(nat, 1.0, "tcp", flags="R")
    send_in(nat, 2.0, "tcp", flags="S")  # port reused for a new connection
    assert nat.expire(100.0) == 0
    assert reply_source(nat, 100.0, "tcp") == VIP


def test_flood_keeps_bound_and_active_flow():
    nat = table(max_flows=64, max_flows_per_peer=64)  # one peer: no quota
    assert send_in(nat, 0.0, "tcp", sport=1, dport=80, vip=VIP2, flags="S")
    for i in range(5000):
        now = 1.0 + i * 0.01
        assert send_in(nat, now, "udp", sport=10000 + i, dport=53)
        assert len(nat) <= 64
        if i % 16 == 0:  # the active connection keeps talking, both ways
            assert send_in(nat, now, "tcp", sport=1, dport=80, vip=VIP2)
            assert reply_source(nat, now, "tcp", sport=1, dport=80) == VIP2
    assert len(nat) == 64
    assert reply_source(nat, 60.0, "tcp", sport=1, dport=80) == VIP2
    assert reply_source(nat, 60.0, "udp", sport=10000 + 4999) == VIP
    assert reply_source(nat, 60.0, "udp", sport=10000) == POD  # evicted long ago, whole
    assert stats_of(nat).get("nat_flows_evicted") == 5001 - 64


def test_eviction_takes_closed_first_then_longest_idle():
    nat = table(max_flows=3, max_flows_per_peer=3)  # one peer: no quota
    for now, port in [(0.0, 1), (1.0, 2), (2.0, 3)]:
        send_in(nat, now, "tcp", sport=port, flags="S")
    send_in(nat, 3.0, "tcp", sport=1)  # 1 active again: 2 is now idle longest
    send_in(nat, 4.0, "tcp", sport=4, flags="S")
    assert reply_source(nat, 4.0, "tcp", sport=2) == POD
    send_in(nat, 5.0, "tcp", sport=3, flags="R")  # 3 closed, though 1 is idle longer
    send_in(nat, 6.0, "tcp", sport=5, flags="S")
    assert reply_source(nat, 6.0, "tcp", sport=3) == POD
    assert [reply_source(nat, 6.0, "tcp", sport=p) for p in (1, 4, 5)] == [VIP] * 3


def test_full_table_reaps_dead_flows_before_evicting():
    nat = table(max_flows=2, max_flows_per_peer=2, **TIMEOUTS)  # one peer: no quota
    send_in(nat, 0.0, "icmp", sport=1)
    send_in(nat, 1.0, "tcp", sport=2, flags="S")
    send_in(nat, 31.0, "udp", sport=3)  # the ping flow is dead: no live flow is evicted
    assert stats_of(nat).get("nat_flows_evicted") == 0
    assert reply_source(nat, 31.0, "tcp", sport=2) == VIP


def test_evicted_flow_restarts_with_its_own_vip():
    nat = table(max_flows=1, max_flows_per_peer=1)  # one peer: no quota
    send_in(nat, 0.0, "udp", sport=1, vip=VIP)
    send_in(nat, 1.0, "udp", sport=2, vip=VIP2)  # evicts sport 1
    assert reply_source(nat, 1.0, "udp", sport=1) == POD  # no half mapping left behind
    send_in(nat, 2.0, "udp", sport=1, vip=VIP)
    assert reply_source(nat, 2.0, "udp", sport=1) == VIP
    assert reply_source(nat, 2.0, "udp", sport=2) == POD


def test_new_flow_on_old_tuple_takes_the_new_vip():
    nat = table(**TIMEOUTS)
    send_in(nat, 0.0, "udp", vip=VIP)
    send_in(nat, 200.0, "udp", vip=VIP2)  # old one is dead
    assert reply_source(nat, 200.0, "udp") == VIP2
    assert stats_of(nat).get("nat_vip_remapped") == 0


def test_two_vips_one_udp_tuple_latest_wins():
    nat = table()
    send_in(nat, 0.0, "udp", vip=VIP)
    send_in(nat, 1.0, "udp", vip=VIP2)
    assert reply_source(nat, 1.0, "udp") == VIP2
    assert stats_of(nat).get("nat_vip_remapped") == 1 and len(nat) == 1


def test_two_vips_one_tcp_tuple_open_connection_keeps_its_vip():
    nat = table()
    assert send_in(nat, 0.0, "tcp", flags="S", vip=VIP)
    raw = bytes(IP(src=PEER, dst=VIP2) / TCP(sport=4000, dport=53, flags="S"))
    assert inbound(nat, raw, 1.0) == (False, raw)
    assert stats_of(nat).dropped(DropReason.NAT_CONFLICT) == 1
    assert reply_source(nat, 1.0, "tcp") == VIP
    send_in(nat, 2.0, "tcp", flags="R", vip=VIP)
    assert send_in(nat, 3.0, "tcp", flags="S", vip=VIP2)  # closed: the newcomer takes it
    assert reply_source(nat, 3.0, "tcp") == VIP2
    assert nat.expire(20.0) == 0  # and it is open again
