"""Wire version 3 and identity per family (core/identity.py, handshaking.py rule 9, peer.py):
cores linked in memory whose pods have an IPv4 and an IPv6 address, or only an IPv6 one, and
reach each other over UDP/IPv4 or UDP/IPv6 by the destination's family.

    pod A 10.0.0.1 + fd00::1 ---+   DualNet: delivers each datagram to the pod     +--- pod B 10.0.0.2 + fd00::2
                                |   holding its destination address, from the    |
    pod C 10.0.0.3 + fd00::3 ---+   sender's address of the same family          +--- (insider: any claim)

A dual-stack pod is one peer with two addresses and one session; the other family's claim
is believed only when the membership pairs it with the one bound to the outer source.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.core import handshake, wire
from tencrypt.core.identity import ClaimPolicy, claimable, special
from tencrypt.core.membership import Members, MembershipError, parse_members, render_members
from tencrypt.core.session import PeerDown, PeerUp, Tunnel
from tencrypt.core.stats import Counter, DropReason, Stats
from tests.unit.linked import FAST, PORT, PSK, TEMPLATES, fast, ipv4

A4, A6 = "10.0.0.1", "fd00::1"
B4, B6 = "10.0.0.2", "fd00::2"
C4, C6 = "10.0.0.3", "fd00::3"
POD_CIDRS = ("10.0.0.0/24", "fd00::/64")
SERVICE_CIDRS = ("172.30.0.0/16", "fd00:30::/112")


def ipv6(src: str, dst: str, payload: bytes = b"y" * 20, nh: int = 17) -> bytes:
    return (
        struct.pack(
            "!IHBB16s16s",
            0x6000_0000,
            len(payload),
            nh,
            64,
            ipaddress.IPv6Address(src).packed,
            ipaddress.IPv6Address(dst).packed,
        )
        + payload
    )


def members(*pods: tuple[str, ...], paired: bool = True) -> Members:
    ips = frozenset(ip for pod in pods for ip in pod)
    return Members("p", 1, ips, frozenset(), pod_ips=tuple(pods) if paired else ())


def policy(self_ips: tuple[str, ...], m: Members | None, **kw) -> ClaimPolicy:
    return ClaimPolicy(
        pod_cidrs=POD_CIDRS,
        service_cidr=SERVICE_CIDRS,
        self_ip=self_ips[0],
        reserved=frozenset(self_ips[1:]),
        is_member=(lambda ip: None) if m is None else (lambda ip: ip in m.pods),
        paired=(lambda a, b: False) if m is None else m.paired,
        vip_sessions=False,
        **kw,
    )


class DualNet:
    """Tunnels keyed by every address they own; each datagram leaves from the sender's
    address of its destination's family (a pod's IPv4 and IPv6 addresses on one socket)."""

    def __init__(self, limits=FAST) -> None:
        self.limits = limits
        self.now, self.wall = 1000.0, 1_700_000_000.0
        self.pods: dict[str, Tunnel] = {}
        self.owned: dict[int, tuple[str, ...]] = {}
        self.delivered: dict[str, list[bytes]] = {}
        self.events: dict[str, list] = {}
        self.wire: list[tuple[bytes, str, str]] = []

    def add(self, *ips: str, m: Members | None = None, identity: bool = True, **kw) -> Tunnel:
        t = Tunnel(
            PSK,
            ips[0],
            Stats(),
            self.limits,
            port=PORT,
            secondary_ip=ips[1] if len(ips) > 1 else None,
            identity=policy(ips, m) if identity else None,
            **kw,
        )
        for ip in ips:
            self.pods[ip] = t
        self.owned[id(t)] = ips
        self.delivered[ips[0]] = []
        self.events[ips[0]] = []
        return t

    def source_for(self, t: Tunnel, dst: str) -> str:
        family = ipaddress.ip_address(dst).version
        return next(ip for ip in self.owned[id(t)] if ipaddress.ip_address(ip).version == family)

    def send(self, src: str, dst: str, packet: bytes) -> None:
        self.pods[src].send(dst, packet, self.now, self.wall)

    def pump(self) -> None:
        for _ in range(100):
            batch = []
            for t in {id(t): t for t in self.pods.values()}.values():
                name = self.owned[id(t)][0]
                self.events[name] += t.pop_events()
                batch += [(d, self.source_for(t, a[0]), a[0]) for d, a in t.pop_transmits()]
            if not batch:
                return
            for datagram, src, dst in batch:
                self.deliver(datagram, src, dst)
        raise AssertionError("the tunnels never went quiet")

    def deliver(self, datagram: bytes, src: str, dst: str) -> None:
        self.wire.append((datagram, src, dst))
        t = self.pods.get(dst)
        if t is None:
            return
        out = t.receive(datagram, (src, PORT), self.now, self.wall)
        if out is not None:
            self.delivered[self.owned[id(t)][0]].append(out)

    def data(self, src: str, dst: str) -> list[tuple[int, int]]:
        """(receiver index, counter) of each data message from ``src`` to ``dst``."""
        return [
            wire.parse_header(d)  # type: ignore[misc]
            for d, s, t in self.wire
            if s == src and t == dst and wire.message_type(d) == wire.TYPE_DATA
        ]


def dual(paired: bool = True, **kw) -> DualNet:
    net = DualNet(**kw)
    m = members((A4, A6), (B4, B6), (C4, C6), paired=paired)
    for pod in ((A4, A6), (B4, B6), (C4, C6)):
        net.add(*pod, m=m)
    return net


def peer_of(t: Tunnel, address: str):
    return t.table.by_addr.get(address)


# ---- one peer, two addresses, one session ----------------------------------------------------


def test_a_dual_stack_pod_is_one_peer_with_one_session_for_both_families():
    net = dual()
    net.send(A4, B4, ipv4(A4, B4, b"v4 first"))
    net.pump()
    a, b = net.pods[A4], net.pods[B4]
    assert net.delivered[B4] == [ipv4(A4, B4, b"v4 first")]
    assert peer_of(a, B4) is peer_of(a, B6) is not None
    assert peer_of(b, A4) is peer_of(b, A6) is not None
    assert a.peer_count() == b.peer_count() == 1
    net.send(A4, B6, ipv6(A6, B6, b"v6 on the same session"))
    net.send(B4, A6, ipv6(B6, A6, b"v6 reply"))
    net.pump()
    assert net.delivered[B4][-1] == ipv6(A6, B6, b"v6 on the same session")
    assert net.delivered[A4] == [ipv6(B6, A6, b"v6 reply")]
    assert a.session_count() == b.session_count() == 1  # one handshake, one session
    assert not [d for d, s, t in net.wire if ":" in t]  # the outer family stayed IPv4
    assert set(net.events[A4]) == {PeerUp(B4, (B4, PORT)), PeerUp(B6, (B4, PORT))}
    assert set(net.events[B4]) == {PeerUp(A4, (A4, PORT)), PeerUp(A6, (A4, PORT))}
    status = a.status(net.now)["peers"][0]  # type: ignore[index]
    assert status["addresses"] == [B4, B6] and status["paired_pod_ip"] == B6
    assert status["claimed_pod_ip"] == B4 and status["claimed_other_pod_ip"] == B6
    assert a.stats.get(Counter.CLAIMS_UNPAIRED) == b.stats.get(Counter.CLAIMS_UNPAIRED) == 0


def test_inner_ipv4_and_ipv6_packets_share_one_counter_never_reused():
    net = dual()
    net.send(A4, B4, ipv4(A4, B4, b"open"))
    net.pump()
    sent = []
    for i in range(6):
        if i % 2:
            net.send(A4, B6, ipv6(A6, B6, bytes([i]) * 30))
        else:
            net.send(A4, B4, ipv4(A4, B4, bytes([i]) * 30))
        sent.append(i)
    net.pump()
    data = [h for h in net.data(A4, B4)]
    indexes = {index for index, _ in data}
    counters = [counter for _, counter in data]
    assert len(indexes) == 1  # one session for both families
    assert len(set(counters)) == len(counters) == 1 + 6  # the first packet and six more
    assert counters == sorted(counters)
    assert len(net.delivered[B4]) == 7
    assert sum(1 for p in net.delivered[B4] if p[0] >> 4 == 6) == 3


def test_the_other_family_first_over_ipv6_outer_then_ipv4_joins_the_same_peer():
    net = dual()
    net.send(A4, B6, ipv6(A6, B6, b"v6 first"))
    net.pump()
    assert net.delivered[B4] == [ipv6(A6, B6, b"v6 first")]
    assert all(":" in t for _, _, t in net.wire)  # to an IPv6 peer address: UDP over IPv6
    a = net.pods[A4]
    assert peer_of(a, B6) is peer_of(a, B4) and peer_of(a, B6).pod_ip == B6
    net.send(A4, B4, ipv4(A4, B4, b"v4 after"))
    net.pump()
    assert net.delivered[B4][-1] == ipv4(A4, B4, b"v4 after")
    assert a.peer_count() == 1 and a.session_count() == 1


def test_crossing_first_contacts_over_both_families_converge_to_one_peer():
    net = dual()
    net.send(A4, B4, ipv4(A4, B4, b"four"))
    net.send(A4, B6, ipv6(A6, B6, b"six"))  # before any handshake completed
    net.pump()
    a, b = net.pods[A4], net.pods[B4]
    assert sorted(net.delivered[B4]) == sorted([ipv4(A4, B4, b"four"), ipv6(A6, B6, b"six")])
    assert a.peer_count() == 1 and peer_of(a, B4) is peer_of(a, B6)
    assert b.peer_count() == 1 and peer_of(b, A4) is peer_of(b, A6)
    net.send(B4, A6, ipv6(B6, A6, b"back"))
    net.send(B4, A4, ipv4(B4, A4, b"back"))
    net.pump()
    assert len(net.delivered[A4]) == 2


# ---- the other claim: only when paired -------------------------------------------------------


def test_without_pairing_the_other_family_is_left_out_and_counted():
    net = dual(paired=False)
    net.send(A4, B4, ipv4(A4, B4, b"hello"))
    net.pump()
    a, b = net.pods[A4], net.pods[B4]
    assert net.delivered[B4] == [ipv4(A4, B4, b"hello")]
    assert peer_of(a, B6) is None and peer_of(b, A6) is None
    assert a.stats.get(Counter.CLAIMS_UNPAIRED) == 1  # B's response claimed B6
    assert b.stats.get(Counter.CLAIMS_UNPAIRED) == 1  # A's initiation claimed A6
    # an IPv6 packet from A6 on the IPv4-bound session is not A's to send
    peer = peer_of(b, A4)
    s = peer.current
    datagram = wire.seal(s.send_aead, s.remote_index, s.send_counter, ipv6(B6, A6))
    s.send_counter += 1
    assert a.receive(datagram, (B4, PORT), net.now, net.wall) is None
    assert a.stats.dropped(DropReason.BAD_SOURCE) == 1
    assert sum(a.stats.drops.values()) == 1


def test_a_pairing_with_another_pod_is_not_taken():
    """C claims its own IPv4 address (bound to its source) and B's IPv6 one: the membership
    pairs B6 with B4, not with C4, so A never routes B6 to C."""
    net = dual()
    wall = net.wall
    _, forged = handshake.build_initiation(TEMPLATES, 77, int(wall * 1e9), wire.pod_ips(C4, B6))
    a = net.pods[A4]
    net.deliver(forged, C4, A4)
    assert a.stats.get(Counter.HANDSHAKES_RESPONDED) == 1  # for C4 alone
    assert a.stats.get(Counter.CLAIMS_UNPAIRED) == 1
    net.pump()
    assert peer_of(a, B6) is None


def test_the_bound_claim_is_the_outer_family():
    """An IPv4 datagram claiming only an IPv6 address has nothing bound to its source."""
    net = dual()
    _, only6 = handshake.build_initiation(TEMPLATES, 5, int(net.wall * 1e9), wire.pod_ips(B6))
    a = net.pods[A4]
    net.deliver(only6, B4, A4)
    assert a.stats.dropped(DropReason.CLAIM_NOT_SOURCE) == 1
    assert a.stats.get(Counter.HANDSHAKES_RESPONDED) == 0
    _, swapped = handshake.build_initiation(TEMPLATES, 6, int(net.wall * 1e9), wire.pod_ips(B4, C6))
    net.deliver(swapped, B6, A6)  # over IPv6 the bound claim is C6: not the source B6
    assert a.stats.dropped(DropReason.CLAIM_NOT_SOURCE) == 2


def test_an_initiation_without_any_address_is_malformed():
    net = dual()
    state = TEMPLATES.initiator.clone()
    payload = struct.pack("<I12s20s", 5, wire.build_tai64n(int(net.wall * 1e9)), bytes(20))
    datagram = wire.build_initiation(state.write_message(payload), TEMPLATES.mac_key)
    assert len(datagram) == wire.INITIATION_LEN
    a = net.pods[A4]
    net.deliver(datagram, B4, A4)
    assert a.stats.dropped(DropReason.BAD_HANDSHAKE) == 1 and a.pop_transmits() == []


def test_the_other_claim_held_by_a_peer_live_elsewhere_is_left_out():
    """Rule 6 for the other claim: B6 is the address of a confirmed peer with a usable session
    at an endpoint that is none of this handshake's pod addresses."""
    net = dual()
    net.send(A4, B4, ipv4(A4, B4, b"x"))
    net.pump()
    a = net.pods[A4]
    peer = peer_of(a, B6)
    peer.endpoint = ("10.0.0.9", PORT)  # B roamed (or someone else holds B6)
    _, c_claims_b6 = handshake.build_initiation(
        TEMPLATES, 9, int(net.wall * 1e9) + 1, wire.pod_ips(C4, B6)
    )
    a.set_identity(  # a membership that (wrongly) pairs B6 with C4 too
        ClaimPolicy(POD_CIDRS, SERVICE_CIDRS, A4, frozenset({A6}), paired=lambda x, y: True)
    )
    net.deliver(c_claims_b6, C4, A4)
    assert a.stats.get(Counter.CLAIMS_UNPAIRED) == 1
    assert peer_of(a, B6) is peer


def test_a_restarted_dual_stack_pod_may_come_back_over_its_other_family():
    """Rule 6's exception: the confirmed peer's endpoint is B4:1337, the new initiation comes
    from B6:1337 claiming B6 and the paired B4: the same pod, let in at once."""
    net = dual()
    net.send(A4, B4, ipv4(A4, B4, b"x"))
    net.pump()
    net.send(B4, A4, ipv4(B4, A4, b"confirms B at A"))
    net.pump()
    a = net.pods[A4]
    peer = peer_of(a, B4)
    assert peer.confirmed and peer.endpoint == (B4, PORT)
    restarted = Tunnel(PSK, B4, Stats(), FAST, port=PORT, secondary_ip=B6)
    restarted.send(A6, ipv6(B6, A6, b"after restart"), net.now, net.wall)
    ((initiation, to),) = restarted.pop_transmits()
    assert to == (A6, PORT)
    net.deliver(initiation, B6, A6)
    assert a.stats.drops == {} and a.stats.get(Counter.HANDSHAKES_RESPONDED) == 1
    assert peer.next is not None and peer.next.claims == (B6, B4)
    assert a.peer_count() == 1


def test_a_stranger_over_ipv6_is_still_a_rebind():
    net = dual()
    net.send(A4, B4, ipv4(A4, B4, b"x"))
    net.pump()
    net.send(B4, A4, ipv4(B4, A4, b"confirm"))
    net.pump()
    a = net.pods[A4]
    peer_of(a, B4).endpoint = (B4, 40000)  # B's endpoint is now another port
    _, forged = handshake.build_initiation(
        TEMPLATES, 12, int(net.wall * 1e9) + 5, wire.pod_ips(B4, B6)
    )
    net.deliver(forged, B6, A6)  # port 1337: neither B's endpoint nor (B's address, its port)
    assert a.stats.dropped(DropReason.CLAIM_REBIND) == 1


# ---- outer IPv6 only ---------------------------------------------------------------------------


def test_ipv6_only_pods_handshake_over_udp_ipv6():
    net = DualNet()
    m = members((A6,), (B6,))
    a = net.add(A6, m=m)
    b = net.add(B6, m=m)
    net.send(A6, B6, ipv6(A6, B6, b"v6 only"))
    net.pump()
    assert net.delivered[B6] == [ipv6(A6, B6, b"v6 only")]
    assert net.events[A6] == [PeerUp(B6, (B6, PORT))]
    assert net.events[B6] == [PeerUp(A6, (A6, PORT))]
    assert all(":" in s and ":" in t for _, s, t in net.wire)
    init = next(d for d, _, _ in net.wire if wire.message_type(d) == wire.TYPE_INITIATION)
    assert len(init) == 104
    net.send(B6, A6, ipv6(B6, A6, b"back"))
    net.pump()
    assert net.delivered[A6] == [ipv6(B6, A6, b"back")]
    assert a.stats.drops == {} and b.stats.drops == {}


def test_an_ipv6_source_is_rate_limited_by_its_canonical_text():
    net = DualNet(fast(handshake_rate=0.001, handshake_burst=1))
    b = net.add(B6, m=members((A6,), (B6,)))
    for i, spelling in enumerate(("fd00::1", "FD00:0:0::1", "fd00:0000::0001")):
        _, init = handshake.build_initiation(
            TEMPLATES, i + 1, int(net.wall * 1e9) + i, wire.pod_ips(A6)
        )
        b.receive(init, (spelling, PORT), net.now, net.wall)
    assert b.stats.get(Counter.HANDSHAKES_RESPONDED) == 1
    assert b.stats.dropped(DropReason.HANDSHAKE_RATELIMIT) == 2
    assert len(b._gate.limiter) == 1  # noqa: SLF001


def test_an_ipv4_mapped_outer_source_is_its_ipv4_address():
    net = dual()
    a = net.pods[A4]
    _, init = handshake.build_initiation(TEMPLATES, 3, int(net.wall * 1e9), wire.pod_ips(B4, B6))
    a.receive(init, ("::ffff:10.0.0.2", PORT), net.now, net.wall)
    assert a.stats.get(Counter.HANDSHAKES_RESPONDED) == 1
    assert peer_of(a, B4).next.claims == (B4, B6)


# ---- timestamps per claimed address ----------------------------------------------------------


def test_an_initiation_must_be_newer_than_the_last_from_each_claimed_address():
    net = dual()
    a = net.pods[A4]
    stamp = int(net.wall * 1e9)
    _, first = handshake.build_initiation(TEMPLATES, 1, stamp, wire.pod_ips(B4, B6))
    net.deliver(first, B4, A4)
    assert a.stats.get(Counter.HANDSHAKES_RESPONDED) == 1
    _, over6 = handshake.build_initiation(TEMPLATES, 2, stamp, wire.pod_ips(B6))
    a.receive(over6, (B6, PORT), net.now, net.wall)  # same stamp, recorded for B6 too
    assert a.stats.dropped(DropReason.STALE_HANDSHAKE) == 1
    _, six = handshake.build_initiation(TEMPLATES, 3, stamp + 10, wire.pod_ips(C6))
    a.receive(six, (C6, PORT), net.now, net.wall)  # C6's stamp: stamp + 10
    _, both = handshake.build_initiation(TEMPLATES, 4, stamp + 5, wire.pod_ips(C4, C6))
    a.receive(both, (C4, PORT), net.now, net.wall)  # new for C4, not newer for C6
    assert a.stats.dropped(DropReason.STALE_HANDSHAKE) == 2
    assert a.stats.get(Counter.HANDSHAKES_RESPONDED) == 2


def test_a_refused_other_claim_records_no_timestamp():
    net = dual(paired=False)
    a = net.pods[A4]
    stamp = int(net.wall * 1e9)
    _, first = handshake.build_initiation(TEMPLATES, 1, stamp, wire.pod_ips(C4, B6))
    net.deliver(first, C4, A4)
    assert a.stats.get(Counter.CLAIMS_UNPAIRED) == 1
    _, b_own = handshake.build_initiation(TEMPLATES, 2, stamp, wire.pod_ips(B6))
    a.receive(b_own, (B6, PORT), net.now, net.wall)  # B6 is not blocked by C's claim
    assert a.stats.dropped(DropReason.STALE_HANDSHAKE) == 0
    assert a.stats.get(Counter.HANDSHAKES_RESPONDED) == 2


# ---- the rules on one claim ------------------------------------------------------------------


OPEN = ("0.0.0.0/0", "::/0")  # every address inside the pod network: only rule 1 refuses


@pytest.mark.parametrize(
    "claim",
    [
        "::",
        "::1",
        "::10.0.0.2",  # IPv4-compatible
        "::ffff:10.0.0.2",  # IPv4-mapped
        "fe80::1",
        "fec0::1",
        "ff02::1",
        "ff0e::1",
        "2001:db8::7",
        "100::1",
        "4000::1",  # unassigned (IETF-reserved)
        A6,  # this pod's own IPv6 address
    ],
)
def test_every_ipv6_reserved_class_is_refused(claim):
    p = ClaimPolicy(OPEN, "172.30.0.0/16", A4, reserved=frozenset({A6}))
    assert p.check(claim, claim) is DropReason.CLAIM_RESERVED
    assert p.check_paired(claim, A4) is DropReason.CLAIM_RESERVED


@pytest.mark.parametrize("claim", ["fd00::7", "fc00::7", "2600:1f18::7"])
def test_ula_and_global_addresses_are_decided_by_the_pod_network(claim):
    assert not special(ipaddress.ip_address(claim))
    assert ClaimPolicy(OPEN, "172.30.0.0/16", A4).check(claim, claim) is None
    inside = ClaimPolicy(("10.0.0.0/24", claim + "/128"), "172.30.0.0/16", A4)
    assert inside.check(claim, claim) is None
    v4_only = ClaimPolicy(("10.0.0.0/24",), "172.30.0.0/16", A4)
    assert v4_only.check(claim, claim) is DropReason.CLAIM_OUTSIDE_POD_NETWORK


def test_ipv6_claims_follow_rules_2_to_5():
    m = members((A4, A6), (B4, B6))
    p = policy((A4, A6), m)
    assert p.check("fd00:30::5", "fd00:30::5") is DropReason.CLAIM_SERVICE_IP
    assert p.check("fd01::5", "fd01::5") is DropReason.CLAIM_OUTSIDE_POD_NETWORK
    assert p.check("fd00::99", "fd00::99") is DropReason.CLAIM_NOT_MEMBER
    assert p.check(B6, "fd00::9") is DropReason.CLAIM_NOT_SOURCE
    assert p.check(B6, "FD00:0::2") is None  # compared as addresses
    assert p.check("FD00::2", B6) is None
    assert p.check_paired(B6, B4) is None and p.check_paired(B4, B6) is None
    assert p.check_paired(B6, A4) is DropReason.CLAIM_NOT_SOURCE  # another pod's pairing
    assert p.check_paired("fd00::99", B4) is DropReason.CLAIM_NOT_MEMBER
    unpaired = policy((A4, A6), members((A4, A6), (B4, B6), paired=False))
    assert unpaired.check_paired(B6, B4) is DropReason.CLAIM_NOT_SOURCE


def test_claimable_baseline_for_ipv6():
    own = {ipaddress.ip_address(A4).packed, ipaddress.ip_address(A6).packed}
    for bad in (A6, "::1", "ff02::1", "::ffff:10.0.0.2", "::10.0.0.2"):
        assert claimable(ipaddress.ip_address(bad).packed, own) is None, bad
    assert claimable(ipaddress.ip_address("FD00::2").packed, own) == B6
    assert claimable(ipaddress.ip_address("fe80::1").packed, own) == "fe80::1"  # rule 1's


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=4, max_size=4))
def test_any_claims_give_one_verdict_and_never_raise(ip6, ip4):
    net = DualNet()
    a = net.add(A4, A6, m=members((A4, A6), (B4, B6)))
    ips = wire.PodIPs(None if ip4 == bytes(4) else ip4, None if ip6 == bytes(16) else ip6)
    payload = wire.build_initiation_payload(5, int(net.wall * 1e9), ips)
    state = TEMPLATES.initiator.clone()
    datagram = wire.build_initiation(state.write_message(payload), TEMPLATES.mac_key)
    a.receive(datagram, (B4, PORT), net.now, net.wall)
    responded = a.stats.get(Counter.HANDSHAKES_RESPONDED)
    assert responded + sum(a.stats.drops.values()) == 1
    if responded:
        assert ips.ip4 == ipaddress.IPv4Address(B4).packed  # bound to the source, always
        assert set(a.table.by_addr) <= {B4, B6}


# ---- the membership's podIPs -------------------------------------------------------------------


def doc(**extra) -> str:
    import json

    base = {
        "format": "tencrypt-members/2",
        "project": "p",
        "generation": 1,
        "pods": [A4, A6, B4, "FD00::2", C4],
        "services": [],
    }
    base.update(extra)
    return json.dumps(base)


def test_pod_ips_pair_the_addresses_of_one_pod():
    m = parse_members(doc(podIPs=[[A4, A6], ["fd00:0::2", B4], [C4]]))
    assert m.pod_ips == ((A4, A6), (B4, B6), (C4,))
    assert m.paired(A4, A6) and m.paired(A6, A4) and m.paired(B6, B4)
    assert not m.paired(A4, B6) and not m.paired(A4, A4) and not m.paired(C4, A6)
    assert not m.paired("10.9.9.9", A6)
    assert parse_members(render_members(m)) == m
    assert '"podIPs": [["10.0.0.1", "fd00::1"]' in render_members(m)
    plain = parse_members(doc())
    assert plain.pod_ips == () and not plain.paired(A4, A6)
    assert "podIPs" not in render_members(plain)


@pytest.mark.parametrize(
    "value, words",
    [
        ("not a list", "must be a list"),
        ([A4], "one or two addresses"),
        ([[]], "one or two addresses"),
        ([[A4, A6, B4]], "one or two addresses"),
        ([[A4, "not an address"]], "not an IP address"),
        ([[A4, B4]], "two addresses of one family"),
        ([[A6, B6]], "two addresses of one family"),
        ([[A4, A4]], "two addresses of one family"),
        ([[A4, "fd00::99"]], "fd00::99 is not in 'pods'"),
    ],
)
def test_bad_pod_ips_refuse_the_whole_file(value, words):
    with pytest.raises(MembershipError, match=words):
        parse_members(doc(podIPs=value))


def test_an_address_listed_for_two_pods_pairs_with_nothing():
    m = parse_members(doc(podIPs=[[A4, A6], [B4, A6]]))
    assert not m.paired(A4, A6) and not m.paired(B4, A6) and not m.paired(A6, B4)


# ---- events --------------------------------------------------------------------------------------


def test_a_peer_losing_its_pairing_announces_the_address_down():
    net = dual()
    net.send(A4, B4, ipv4(A4, B4, b"x"))
    net.pump()
    a = net.pods[A4]
    peer = peer_of(a, B4)
    net.events[A4].clear()
    a.table.pair(peer, None)
    assert a.pop_events() == [PeerDown(B6)] and peer_of(a, B6) is None
    a.table.pair(peer, B6)
    assert a.pop_events() == [PeerUp(B6, (B4, PORT))] and peer_of(a, B6) is peer
    a.table.remove_peer(peer)
    assert set(a.pop_events()) == {PeerDown(B4), PeerDown(B6)}


def test_without_a_policy_both_claims_are_taken():
    net = DualNet()
    net.add(A4, A6, identity=False)
    net.add(B4, B6, identity=False)
    net.send(A4, B4, ipv4(A4, B4, b"x"))
    net.pump()
    a = net.pods[A4]
    assert peer_of(a, B6) is peer_of(a, B4)
