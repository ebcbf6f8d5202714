"""The tunnel under attack, cores linked in memory (harness: linked.py): replayed and forged
handshakes, restarted peers, and the rule that every datagram - tampered, random, replayed -
ends as exactly one counted outcome and never an exception."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tencrypt.core import handshake, wire
from tencrypt.core.session import PeerUp
from tencrypt.core.stats import DropReason
from tests.unit.linked import (
    FAST,
    PORT,
    TEMPLATES,
    A,
    B,
    C,
    Net,
    connect,
    drops,
    fast,
    handled,
    ipv4,
    new_net,
    remac,
)


@pytest.fixture
def net() -> Net:
    return new_net()


# ---- attacks -----------------------------------------------------------------------------------


def test_replayed_data_is_dropped(net):
    connect(net)
    for datagram, src, dst in list(net.wire):
        if wire.message_type(datagram) == wire.TYPE_DATA:
            assert net.deliver(datagram, src, dst) is None
    assert net.pods[B].stats.dropped(DropReason.REPLAY) == 1


def test_replayed_initiation_creates_nothing_and_disturbs_nothing(net):
    connect(net)
    b = net.pods[B]
    initiation = next(d for d, _, _ in net.wire if wire.message_type(d) == wire.TYPE_INITIATION)
    net.advance(1.0)
    for _ in range(3):
        net.deliver(initiation, "192.0.2.66", B)  # an attacker replays it from elsewhere
    assert net.pump(hold=True) == []  # no response, no DH
    assert b.stats.dropped(DropReason.HANDSHAKE_REPLAY) == 3  # seen mac1: no Noise work
    assert b.stats.get("handshakes_responded") == 1 and b.session_count() == 1
    net.send(A, B, ipv4(A, B, b"live session unharmed"))
    net.send(B, A, ipv4(B, A, b"both ways"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, B, b"live session unharmed")]
    assert net.delivered[A] == [ipv4(B, A, b"both ways")]


def test_replay_to_a_restarted_responder_yields_no_usable_session(net):
    connect(net)
    initiation = next(d for d, _, _ in net.wire if wire.message_type(d) == wire.TYPE_INITIATION)
    b2 = net.add(B)  # B restarted: it has no record of A's timestamps
    net.deliver(initiation, "192.0.2.66", B)
    response = net.pump(hold=True)
    assert [(wire.message_type(d), dst) for d, _, dst in response] == [(2, "192.0.2.66")]
    assert b2.session_count() == 1  # unconfirmed: the attacker cannot finish it
    net.send(B, A, ipv4(B, A, b"must not use the replayed session"))
    sent = net.pump(hold=True)
    assert [wire.message_type(d) for d, _, _ in sent] == [wire.TYPE_INITIATION]
    assert sent[0][2] == A  # to A's own tunnel port, not to where the replay came from
    for d, s, dst in sent:
        net.deliver(d, s, dst)
    net.pump()
    assert net.delivered[A] == [ipv4(B, A, b"must not use the replayed session")]
    net.advance(FAST.reject_after_time + 1)  # the replayed session expires unused
    assert b2.session_count() == 0


def test_initiation_older_than_max_age_is_stale():
    net = Net()
    net.add(B)
    state, initiation = handshake.build_initiation(
        TEMPLATES,
        77,
        int((net.wall - FAST.initiation_max_age - 1) * 1e9),
        ipaddress.IPv4Address(A).packed,
    )
    net.deliver(initiation, A, B)
    assert net.pods[B].stats.dropped(DropReason.STALE_HANDSHAKE) == 1
    assert net.pump(hold=True) == []


def test_forged_response_is_dropped_and_the_real_one_still_completes(net):
    a = net.pods[A]
    net.send(A, B, ipv4(A, B))
    for d, s, dst in net.pump(hold=True):
        net.deliver(d, s, dst)
    ((response, src, dst),) = net.pump(hold=True)
    for byte in (8, 40, 63):  # ephemeral, encrypted payload, tag
        forged = bytearray(response)
        forged[byte] ^= 0x80
        net.deliver(bytes(forged), src, dst)  # mac1 fails
        net.deliver(remac(bytes(forged)), src, dst)  # a key holder's forgery: Noise fails
    unknown = response[:4] + struct.pack("<I", (struct.unpack_from("<I", response, 4)[0] + 1))
    net.deliver(remac(unknown + response[8:]), src, dst)
    assert a.stats.dropped(DropReason.BAD_MAC) == 3
    assert a.stats.dropped(DropReason.BAD_HANDSHAKE) == 3
    assert a.stats.dropped(DropReason.UNKNOWN_INDEX) == 1
    assert a.session_count() == 0
    net.deliver(response, src, dst)
    net.pump()
    assert len(net.delivered[B]) == 1 and a.stats.get("handshakes_completed") == 1
    net.deliver(response, src, dst)  # replayed after completion: its index is no longer pending
    assert a.stats.dropped(DropReason.UNKNOWN_INDEX) == 2 and a.session_count() == 1


def test_restarted_peer_is_rehandshaked_after_stale_timeout(net):
    a = net.pods[A]
    connect(net)
    b2 = net.add(B)  # B's proxy restarted: new keys, nothing known; A is not told
    net.send(A, B, ipv4(A, B, b"lost: B2 cannot open it"))
    net.pump()
    assert net.delivered[B] == [] and b2.stats.dropped(DropReason.UNKNOWN_INDEX) == 1
    net.advance(FAST.stale_timeout + 0.1)
    assert a.stats.get("handshakes_completed") == 2 and b2.stats.get("handshakes_responded") == 1
    assert a.stats.get("keepalives_sent") == 1  # nothing was queued: B2 confirms on this
    net.send(A, B, ipv4(A, B, b"after the re-handshake"))
    net.send(B, A, ipv4(B, A, b"and back"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, B, b"after the re-handshake")]
    assert net.delivered[A] == [ipv4(B, A, b"and back")]
    assert net.events[B] == [PeerUp(A, (A, PORT))]


def test_restarted_initiator_is_accepted_by_timestamp(net):
    connect(net)
    net.advance(0.5)
    net.add(A)  # A's proxy restarted: its new initiation carries a newer timestamp
    net.send(A, B, ipv4(A, B, b"hello again"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, B, b"hello again")]
    assert net.pods[B].stats.dropped(DropReason.STALE_HANDSHAKE) == 0


def test_keepalive_keeps_a_one_way_flow_from_looking_stale(net):
    a, b = net.pods[A], net.pods[B]
    connect(net)
    for _ in range(10):  # A streams to B, B has nothing to say
        net.send(A, B, ipv4(A, B))
        net.advance(0.5)
    assert b.stats.get("keepalives_sent") >= 2 and a.stats.get("keepalives_received") >= 2
    assert a.stats.get("handshakes_initiated") == 1  # no stale re-handshake


# ---- every datagram ends in exactly one outcome --------------------------------------------------


@pytest.fixture(scope="module")
def live_pair():
    """A live A<->B pair, plus one captured datagram of each kind (not yet delivered)."""
    net = Net(fast(rekey_after_time=1e9, reject_after_time=1e9, tombstone_time=1e9))
    net.add(A)
    net.add(B)
    net.send(A, B, ipv4(A, B))
    ((initiation, _, _),) = net.pump(hold=True)
    net.deliver(initiation, A, B)
    ((response, _, _),) = net.pump(hold=True)
    net.deliver(response, B, A)
    net.pump()
    net.send(A, B, ipv4(A, B, b"captured"))
    ((data, _, _),) = net.pump(hold=True)
    # A fresh initiator whose response is captured but not delivered.
    net.add(C)
    net.send(C, B, ipv4(C, B))
    ((c_init, _, _),) = net.pump(hold=True)
    net.deliver(c_init, C, B)
    ((c_resp, _, _),) = net.pump(hold=True)
    return net, {"data": (data, A, B), "initiation": (initiation, A, B), "response": (c_resp, B, C)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["data", "initiation", "response"]), st.data())
def test_any_bit_flip_in_any_datagram_is_one_counted_drop(live_pair, kind, data):
    net, captured = live_pair
    datagram, src, dst = captured[kind]
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    forged = bytearray(datagram)
    forged[bit // 8] ^= 1 << (bit % 8)
    t = net.pods[dst]
    drops_before, handled_before = drops(t), handled(t)
    assert t.receive(bytes(forged), (src, PORT), net.now, net.wall) is None
    assert drops(t) == drops_before + 1 and handled(t) == handled_before
    assert t.pop_transmits() == [] and t.pop_events() == []


def test_captured_datagrams_are_still_good_after_all_the_flipping(live_pair):
    net, captured = live_pair
    datagram, src, dst = captured["data"]
    assert net.deliver(datagram, src, dst) == ipv4(A, B, b"captured")
    datagram, src, dst = captured["response"]
    net.deliver(datagram, src, dst)
    assert net.pods[C].stats.get("handshakes_completed") == 1


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(st.sampled_from([1, 2, 4]), st.binary(max_size=100)).map(
            lambda t: struct.pack("<I", t[0]) + t[1]
        ),
        st.sampled_from([(1, 68), (2, 60)]).flatmap(  # exact handshake lengths
            lambda t: st.binary(min_size=t[1], max_size=t[1]).map(
                lambda b, k=t[0]: struct.pack("<I", k) + b
            )
        ),
    )
)
def test_random_bytes_are_always_one_counted_drop(live_pair, blob):
    net, _ = live_pair
    for pod in (A, B):
        t = net.pods[pod]
        before = drops(t)
        assert t.receive(blob, ("192.0.2.1", 4242), net.now, net.wall) is None
        assert drops(t) == before + 1
        assert t.pop_transmits() == []


def test_random_data_with_a_live_index_is_a_bad_tag(live_pair):
    net, captured = live_pair
    datagram = captured["data"][0]
    b = net.pods[B]
    before = b.stats.dropped(DropReason.BAD_TAG)
    for _ in range(50):
        blob = datagram[:8] + struct.pack("<Q", 2**40 + _) + os.urandom(40)
        assert b.receive(blob, (A, PORT), net.now, net.wall) is None
    assert b.stats.dropped(DropReason.BAD_TAG) == before + 50
