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

from tencrypt.core import handshake, wire
from tencrypt.core.identity import ClaimPolicy
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
