"""Identity bound to the network (core/identity.py, handshaking.py rule 9): three cores linked
in memory - the victim A, its real peer B, and an insider C that holds the project key - and C
trying to be someone else. Every claim is refused and counted by its reason, and A's sealed
traffic for B keeps going to B.

    A 10.0.0.1 (victim) ---+                    +--- B 10.0.0.2 (real peer, behind VIP)
                           |  linked.Net         |
    C 10.0.0.3 (insider) --+                    +--- gateway 10.0.0.254, DNS 10.0.0.53
"""

from __future__ import annotations

import ipaddress

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tencrypt.core import handshake, wire
from tencrypt.core.identity import ClaimPolicy, claimable, initiation_name, response_name
from tencrypt.core.peer import Peer, Session
from tencrypt.core.session import PeerUp
from tencrypt.core.stats import DropReason
from tests.unit.linked import (
    FAST,
    PORT,
    TEMPLATES,
    VIP,
    A,
    B,
    C,
    Net,
    connect,
    fast,
    ipv4,
)

GATEWAY, DNS, STRANGER = "10.0.0.254", "10.0.0.53", "10.0.0.99"


def policy(self_ip: str, **kw) -> ClaimPolicy:
    members = {A, B, C}
    return ClaimPolicy(
        pod_cidrs=("10.0.0.0/24",),
        service_cidr="172.30.0.0/16",
        self_ip=self_ip,
        reserved=frozenset({GATEWAY, DNS}),
        is_member=lambda ip: ip in members if ip != STRANGER else False,
        **kw,
    )


def bound_net(limits=FAST, **kw) -> Net:
    net = Net(limits)
    for pod in (A, B, C):
        net.add(pod, identity=policy(pod, **kw))
    return net


@pytest.fixture
def net() -> Net:
    return bound_net()


def forged_initiation(claim: str, wall: float, index: int = 99) -> bytes:
    """What C builds with the project key: a valid initiation claiming ``claim``."""
    return handshake.build_initiation(
        TEMPLATES, index, int(wall * 1e9), ipaddress.IPv4Address(claim).packed
    )[1]


def sealed_destinations(net: Net, src: str) -> list[str]:
    return [
        dst
        for d, s, dst in net.wire
        if s == src and wire.message_type(d) == wire.TYPE_DATA and len(d) > 32
    ]


def assert_a_still_talks_to_b(net: Net) -> None:
    """A's sealed traffic for B goes to B, B opens it, and B's answer reaches A."""
    net.wire.clear()
    net.delivered[B].clear()
    net.delivered[A].clear()
    net.send(A, B, ipv4(A, B, b"for B only"))
    net.pump()
    net.send(B, A, ipv4(B, A, b"from B"))
    net.pump()
    assert sealed_destinations(net, A) == [B]
    assert net.delivered[B] == [ipv4(A, B, b"for B only")]
    assert net.delivered[A] == [ipv4(B, A, b"from B")]
    assert net.delivered[C] == []


# ---- the policy alone --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "source", "reason"),
    [
        (B, B, None),
        (B, C, DropReason.CLAIM_NOT_SOURCE),
        (VIP, VIP, DropReason.CLAIM_SERVICE_IP),
        ("169.254.169.254", "169.254.169.254", DropReason.CLAIM_RESERVED),
        (GATEWAY, GATEWAY, DropReason.CLAIM_RESERVED),
        (DNS, DNS, DropReason.CLAIM_RESERVED),
        (A, A, DropReason.CLAIM_RESERVED),  # this pod itself
        ("127.0.0.1", "127.0.0.1", DropReason.CLAIM_RESERVED),
        ("224.0.0.1", "224.0.0.1", DropReason.CLAIM_RESERVED),
        ("255.255.255.255", C, DropReason.CLAIM_RESERVED),
        ("0.0.0.0", C, DropReason.CLAIM_RESERVED),
        ("192.168.7.7", "192.168.7.7", DropReason.CLAIM_OUTSIDE_POD_NETWORK),
        (STRANGER, STRANGER, DropReason.CLAIM_NOT_MEMBER),
    ],
)
def test_policy_table(claim, source, reason):
    assert policy(A).check(claim, source) is reason


def test_policy_switches():
    snat = policy(A, bind_to_source=False)
    assert snat.check(B, "192.0.2.1") is None  # SNAT networks: the source is not the pod
    open_net = ClaimPolicy((), "172.30.0.0/16", A)
    assert open_net.check("192.168.7.7", "192.168.7.7") is None  # no pod CIDR given
    assert open_net.check(STRANGER, STRANGER) is None  # membership unknown
    with pytest.raises(ValueError):
        ClaimPolicy(("not a cidr",), "172.30.0.0/16", A)


# ---- claims in initiations ---------------------------------------------------------------------


def test_insider_claiming_another_pod_in_an_initiation_is_refused(net):
    connect(net)
    a = net.pods[A]
    net.deliver(forged_initiation(B, net.wall), C, A)  # from C's own address
    assert a.stats.dropped(DropReason.CLAIM_NOT_SOURCE) == 1
    assert net.pump(hold=True) == []  # no response, no DH
    assert a.table.by_addr[B].endpoint == (B, PORT)
    assert_a_still_talks_to_b(net)


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        (VIP, DropReason.CLAIM_SERVICE_IP),
        ("169.254.169.254", DropReason.CLAIM_RESERVED),
        (GATEWAY, DropReason.CLAIM_RESERVED),
        (DNS, DropReason.CLAIM_RESERVED),
        ("192.168.7.7", DropReason.CLAIM_OUTSIDE_POD_NETWORK),
        (STRANGER, DropReason.CLAIM_NOT_MEMBER),
    ],
)
@pytest.mark.parametrize("spoofed", [False, True])
def test_insider_claiming_special_addresses_is_refused(net, claim, reason, spoofed):
    connect(net)
    a = net.pods[A]
    net.deliver(forged_initiation(claim, net.wall), claim if spoofed else C, A)
    assert a.stats.dropped(reason) == 1 and sum(a.stats.drops.values()) == 1
    assert net.pump(hold=True) == [] and not a.knows(claim)
    assert [e for e in net.events[A] if e.pod_ip == claim] == []  # no route for it
    assert_a_still_talks_to_b(net)


def test_spoofing_the_peers_source_gets_the_response_sent_to_the_peer(net):
    """With B's address spoofed, C's claim passes the source rule - but the response goes to
    B, which cannot use it, so C never has the session keys and A's session with B stays."""
    connect(net)
    a = net.pods[A]
    current = a.table.by_addr[B].current
    net.deliver(forged_initiation(B, net.wall), B, A)
    ((response, _, to),) = net.pump(hold=True)
    assert wire.message_type(response) == wire.TYPE_RESPONSE and to == B
    net.deliver(response, A, B)
    assert net.pods[B].stats.dropped(DropReason.UNKNOWN_INDEX) == 1
    assert a.table.by_addr[B].current is current
    assert_a_still_talks_to_b(net)


def test_a_confirmed_peer_is_not_rebound_from_another_endpoint(net):
    connect(net)
    a = net.pods[A]
    a.receive(forged_initiation(B, net.wall), (B, 40000), net.now, net.wall)
    assert a.stats.dropped(DropReason.CLAIM_REBIND) == 1 and a.pop_transmits() == []
    assert_a_still_talks_to_b(net)


def test_without_source_binding_a_live_confirmed_pod_ip_is_still_not_taken():
    net = bound_net(bind_to_source=False)  # a network that SNATs pod-to-pod traffic
    connect(net)
    a = net.pods[A]
    net.deliver(forged_initiation(B, net.wall), C, A)
    assert a.stats.dropped(DropReason.CLAIM_REBIND) == 1 and net.pump(hold=True) == []
    assert_a_still_talks_to_b(net)


def test_restarted_peer_from_the_same_endpoint_is_let_in(net):
    connect(net)
    net.send(B, A, ipv4(B, A, b"confirms B at A"))
    net.pump()
    a = net.pods[A]
    assert a.table.by_addr[B].confirmed
    net.add(B, identity=policy(B))  # B's proxy restarted: new keys, same pod IP and port
    net.advance(0.5)
    net.send(B, A, ipv4(B, A, b"after restart"))
    net.pump()
    assert net.delivered[A][-1] == ipv4(B, A, b"after restart")
    assert sum(a.stats.drops.get(r, 0) for r in DropReason if r.name.startswith("CLAIM")) == 0
    assert_a_still_talks_to_b(net)


# ---- claims in responses -----------------------------------------------------------------------


def insider_response(initiation: bytes, claim: str) -> bytes:
    """C answers an initiation it received, claiming ``claim``."""
    return insider_session(initiation, claim)[0]


def insider_session(initiation: bytes, claim: str) -> tuple[bytes, handshake.Keys, int]:
    """C's response, C's session keys, and the index C must put in data messages to A."""
    init = handshake.read_initiation(TEMPLATES, initiation)
    assert init is not None
    reply = handshake.build_response(
        init, 4242, ipaddress.IPv4Address(claim).packed, TEMPLATES.mac_key
    )
    assert reply is not None
    return reply[0], reply[1], init.sender_index


def test_insider_response_claiming_another_pod_is_refused(net):
    connect(net)
    a = net.pods[A]
    net.send(A, C, ipv4(A, C, b"to C"))  # A talks to C, which answers as B
    ((initiation, _, to),) = net.pump(hold=True)
    assert to == C
    net.deliver(insider_response(initiation, B), C, A)
    assert a.stats.dropped(DropReason.CLAIM_NOT_SOURCE) == 1
    assert a.table.by_addr[B].endpoint == (B, PORT) and net.pump(hold=True) == []
    net.deliver(insider_response(initiation, C), C, A)  # the pending handshake survived
    net.pump()
    assert net.delivered[C] == [] and a.stats.get("handshakes_completed") == 2
    assert_a_still_talks_to_b(net)


def test_insider_response_answering_for_the_wrong_pod_is_refused(net):
    """A initiates to B; C (on the path) answers with its own, true, pod IP: A asked B."""
    a = net.pods[A]
    net.send(A, B, ipv4(A, B, b"for B"))
    ((initiation, _, _),) = net.pump(hold=True)
    net.deliver(insider_response(initiation, C), C, A)
    assert a.stats.dropped(DropReason.CLAIM_REBIND) == 1 and not a.knows(C)
    net.deliver(initiation, A, B)
    net.pump()
    assert net.delivered[B] == [ipv4(A, B, b"for B")]
    assert_a_still_talks_to_b(net)


def test_response_through_a_vip_speaks_for_the_vip_only(net):
    """C sits behind a VIP and answers A's initiation as B: the response comes back from the
    VIP, so the claim cannot be checked - the session is bound to the VIP, never to B."""
    net.vips[VIP] = C
    a = net.pods[A]
    net.send(A, VIP, ipv4(A, VIP, b"to the service"))
    ((initiation, _, _),) = net.pump(hold=True)
    net.conntrack[(A, C)] = VIP
    response, keys, index = insider_session(initiation, B)
    net.deliver(response, C, A)  # seen from the VIP
    net.pump()
    assert not a.knows(B) and a.table.by_addr[VIP].pod_ip == VIP
    assert PeerUp(VIP, (VIP, PORT)) in net.events[A]
    assert PeerUp(B, (VIP, PORT)) not in net.events[A]
    # C holds the session keys: packets "from B" are refused, packets from the VIP pass
    net.deliver(wire.seal(keys.send, index, 0, ipv4(B, A, b"I am B")), C, A)
    assert a.stats.dropped(DropReason.BAD_SOURCE) == 1
    net.deliver(wire.seal(keys.send, index, 1, ipv4(VIP, A, b"service reply")), C, A)
    assert net.delivered[A] == [ipv4(VIP, A, b"service reply")]
    # and A's traffic for B goes to B, through its own handshake
    net.wire.clear()
    net.send(A, B, ipv4(A, B, b"for B"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, B, b"for B")] and sealed_destinations(net, A) == [B]


def test_response_through_a_vip_from_the_real_pod_works(net):
    """The ordinary case: A reaches B through B's VIP; the session carries B's VIP traffic."""
    net.vips[VIP] = B
    net.send(A, VIP, ipv4(A, VIP, b"hello service"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, VIP, b"hello service")]
    net.send(B, A, ipv4(VIP, A, b"reply as the VIP"))
    net.pump()
    assert net.delivered[A] == [ipv4(VIP, A, b"reply as the VIP")]
    assert sum(net.pods[A].stats.drops.values()) == 0


def test_forged_claims_are_cheap_after_a_refusal():
    """A refused claim stores no timestamp: the real pod is not blocked by it."""
    net = bound_net(fast())
    a = net.pods[A]
    net.deliver(forged_initiation(B, net.wall + 20.0), C, A)  # future stamp, wrong source
    assert a.stats.dropped(DropReason.CLAIM_NOT_SOURCE) == 1
    net.send(B, A, ipv4(B, A, b"real B"))
    net.pump()
    assert net.delivered[A] == [ipv4(B, A, b"real B")]


def test_pod_behind_a_vip_rehandshakes_through_conntrack(net):
    """B restarts; conntrack still holds A's VIP entry, so B's own initiation reaches A from
    the VIP. A attaches it to the VIP peer (rule 8): B's traffic as the VIP flows, B's own
    pod IP as inner source does not (nobody could check that claim)."""
    net.vips[VIP] = B
    a = net.pods[A]
    net.send(A, VIP, ipv4(A, VIP, b"hello service"))
    net.pump()
    net.add(B, identity=policy(B))  # B's proxy restarted
    net.advance(0.5)
    net.send(B, A, ipv4(VIP, A, b"service reply after restart"))
    net.pump()
    assert net.delivered[A] == [ipv4(VIP, A, b"service reply after restart")]
    assert a.stats.get("handshakes_responded") == 1 and not a.knows(B)
    net.send(B, A, ipv4(B, A, b"from B's own address"))
    net.pump()
    assert a.stats.dropped(DropReason.BAD_SOURCE) == 1
    assert sum(a.stats.drops.get(r, 0) for r in DropReason if r.name.startswith("CLAIM")) == 0


def test_a_vip_session_does_not_roam_to_the_old_pod_after_the_endpoint_moved(net):
    """Session rule 11: the Service's endpoint moves from B to C and the node forgets its
    conntrack entry. B's late traffic now reaches A from B's own address: it is delivered and
    counted, but A keeps sending to the VIP (never straight to B), and once the VIP has been
    silent for stale_timeout a new handshake reaches C, the pod the Service now picks."""
    net.vips[VIP] = B
    a = net.pods[A]
    net.send(A, VIP, ipv4(A, VIP, b"before the move"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, VIP, b"before the move")]
    net.vips[VIP] = C
    net.conntrack.clear()
    net.send(B, A, ipv4(VIP, A, b"late reply from the old pod"))
    net.pump()
    assert net.delivered[A] == [ipv4(VIP, A, b"late reply from the old pod")]
    assert a.stats.get("vip_data_elsewhere") == 1
    assert a.table.by_addr[VIP].endpoint == (VIP, PORT)  # not roamed to (B, PORT)
    net.wire.clear()
    net.send(A, VIP, ipv4(A, VIP, b"lost: C has no such session"))
    net.pump()
    assert sealed_destinations(net, A) == [VIP]
    assert net.pods[C].stats.dropped(DropReason.UNKNOWN_INDEX) == 1
    net.advance(net.limits.stale_timeout + 1.0)
    net.send(A, VIP, ipv4(A, VIP, b"after the move"))
    net.pump()
    assert net.delivered[C][-1] == ipv4(A, VIP, b"after the move")
    assert ipv4(A, VIP, b"after the move") not in net.delivered[B]


# ---- rules 7 and 8 as functions: a VIP other than the one we talk to proves nothing ----------

VIP2 = "172.30.0.20"  # another Service's VIP


def peer_at(endpoint_ip: str, *addresses: str, confirmed: bool = False, live: bool = False):
    """A peer we reach at ``endpoint_ip``, known by ``addresses``; ``live``: a usable session."""
    p = Peer((endpoint_ip, PORT), addresses=set(addresses), confirmed=confirmed)
    if live:
        aead = ChaCha20Poly1305(bytes(32))
        p.current = Session(1, 2, aead, aead, True, True, bytes(4), p, 10.0, 10.0, 100.0, 200.0)
    return p


def test_an_initiation_through_the_vip_we_talk_to_is_named_after_it():
    vip_peer = peer_at(VIP, VIP)
    assert initiation_name(policy(A), {VIP: vip_peer}, B, (VIP, PORT)) == VIP


@pytest.mark.parametrize(
    "by_addr",
    [
        {},  # a VIP we talk to at all: its claim is just a claim
        {VIP2: peer_at(B, VIP2, B)},  # a peer known by VIP2 but reached at its pod IP
        {VIP: peer_at(VIP, VIP)},  # the VIP we talk to is another one
    ],
    ids=["unknown VIP", "peer reached elsewhere", "another VIP's peer"],
)
def test_an_initiation_from_a_vip_we_do_not_talk_to_through_is_the_claim_only(by_addr):
    """Rule 8: only the VIP a peer is reached at names an initiation after itself; from any
    other VIP the claim stands, and the source check then refuses it."""
    p = policy(A)
    assert initiation_name(p, by_addr, B, (VIP2, PORT)) == B
    assert p.check(B, VIP2) is DropReason.CLAIM_NOT_SOURCE


def test_an_initiation_from_a_pod_ip_or_without_source_binding_is_the_claim():
    c_peer = peer_at(C, C)
    assert initiation_name(policy(A), {C: c_peer}, B, (C, PORT)) == B  # not a VIP
    snat = policy(A, bind_to_source=False)
    assert initiation_name(snat, {VIP: peer_at(VIP, VIP)}, B, (VIP, PORT)) == B
    assert initiation_name(policy(A), {VIP: peer_at(VIP, VIP)}, VIP, (VIP, PORT)) == VIP


def test_a_response_through_the_vip_we_initiated_to_is_named_after_it():
    p = policy(A)
    asked = peer_at(VIP, VIP)
    assert response_name(p, {VIP: asked}, asked, B, (VIP, PORT), 1.0, FAST) == VIP


@pytest.mark.parametrize(
    ("endpoint", "source"),
    [(VIP, VIP2), (B, VIP), (B, VIP2)],
    ids=["asked VIP, answered by another", "asked the pod, answered by a VIP", "both"],
)
def test_a_response_from_a_vip_we_did_not_ask_is_refused(endpoint, source):
    """Rule 7: a response proves nothing about its claim when it comes from a VIP, so it is
    named after the VIP only when that is the VIP we sent the initiation to; from another
    VIP the claim must equal the source (CLAIM_NOT_SOURCE)."""
    asked = peer_at(endpoint, endpoint)
    got = response_name(policy(A), {endpoint: asked}, asked, B, (source, PORT), 1.0, FAST)
    assert got is DropReason.CLAIM_NOT_SOURCE


def test_a_response_claiming_a_pod_live_at_another_endpoint_is_a_rebind():
    """Rule 7 with rule 6: the claimed pod IP belongs to another confirmed peer with a usable
    session elsewhere; unless that peer is the one we asked, or not live, or not confirmed."""
    p = policy(A, bind_to_source=False)
    asked = peer_at(VIP, VIP)
    owner = peer_at(B, B, confirmed=True, live=True)
    by_addr = {VIP: asked, B: owner}
    assert response_name(p, by_addr, asked, B, (C, PORT), 1.0, FAST) is DropReason.CLAIM_REBIND
    assert response_name(p, by_addr, owner, B, (C, PORT), 1.0, FAST) == B  # the one we asked
    idle = peer_at(B, B, confirmed=True)  # confirmed, nothing usable: a restarted pod
    assert response_name(p, {VIP: asked, B: idle}, asked, B, (C, PORT), 1.0, FAST) == B
    fresh = peer_at(B, B, live=True)  # not confirmed: nothing proved it owns B yet
    assert response_name(p, {VIP: asked, B: fresh}, asked, B, (C, PORT), 1.0, FAST) == B
    assert response_name(p, {VIP: asked}, asked, B, (B, PORT), 1.0, FAST) == B


def test_an_initiation_through_another_vip_is_refused_end_to_end(net):
    """The same through the tunnel: A talks to B through VIP; C's initiation claiming B
    arrives from VIP2 (another Service, C behind it): refused, nothing named after VIP2."""
    net.vips[VIP] = B
    net.vips[VIP2] = C
    a = net.pods[A]
    net.send(A, VIP, ipv4(A, VIP, b"to the service"))
    net.pump()
    net.conntrack[(A, C)] = VIP2  # C's datagrams reach A from VIP2
    net.deliver(forged_initiation(B, net.wall), C, A)
    assert a.stats.dropped(DropReason.CLAIM_NOT_SOURCE) == 1
    assert not a.knows(VIP2) and not a.knows(B)
    assert a.stats.get("handshakes_responded") == 0


# ---- the claim's form, and the baseline every tunnel applies -----------------------------------


def test_a_claim_that_is_no_address_is_reserved():
    p = policy(A)
    assert p.check("not an address", C) is DropReason.CLAIM_RESERVED
    assert p.check_paired("not an address", C) is DropReason.CLAIM_RESERVED
    # a pod network of one family refuses every claim of the other (never guessed)
    assert p.check("fd00::1", "fd00::1") is DropReason.CLAIM_OUTSIDE_POD_NETWORK
    assert p.is_service_ip("not an address") is False and p.is_service_ip(VIP) is True
    assert p.is_service_ip(B) is False


@pytest.mark.parametrize(
    "claim",
    [A, "0.0.0.0", "127.0.0.1", "224.0.0.1", "240.0.0.1", "255.255.255.255"],
    ids=["this pod", "unspecified", "loopback", "multicast", "reserved", "broadcast"],
)
def test_claimable_refuses_this_pod_and_special_addresses(claim):
    """The baseline of every tunnel, policy or not: never the pod's own address."""
    packed = ipaddress.IPv4Address(claim).packed
    assert claimable(packed, ipaddress.IPv4Address(A).packed) is None


def test_claimable_passes_any_other_address():
    self_packed = ipaddress.IPv4Address(A).packed
    for claim in (B, VIP, "192.168.7.7", "169.254.169.254"):  # the policy's to refuse
        assert claimable(ipaddress.IPv4Address(claim).packed, self_packed) == claim
