"""The tunnel state machine, two or three cores linked in memory (harness: linked.py):
handshake and data, inner checks, re-keying and expiry, bounds, peers that move or merge."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tencrypt.core import handshake, wire
from tencrypt.core.session import PeerDown, PeerUnreachable, PeerUp
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
    drops,
    fast,
    ipv4,
    new_net,
)


@pytest.fixture
def net() -> Net:
    return new_net()


# ---- handshake and data ------------------------------------------------------------------------


def test_handshake_then_data_both_ways(net):
    a, b = net.pods[A], net.pods[B]
    first = ipv4(A, B, b"queued while the handshake ran")
    net.send(A, B, first)
    net.pump()
    assert net.delivered[B] == [first]
    assert net.events[A] == [PeerUp(B, (B, PORT))] and net.events[B] == [PeerUp(A, (A, PORT))]
    for i in range(5):
        net.send(B, A, ipv4(B, A, b"reply %d" % i))
        net.send(A, B, ipv4(A, B, b"more %d" % i))
    net.pump()
    assert net.delivered[A] == [ipv4(B, A, b"reply %d" % i) for i in range(5)]
    assert net.delivered[B][1:] == [ipv4(A, B, b"more %d" % i) for i in range(5)]
    assert (a.stats.get("handshakes_initiated"), a.stats.get("handshakes_completed")) == (1, 1)
    assert b.stats.get("handshakes_responded") == 1 and b.stats.get("handshakes_initiated") == 0
    assert a.stats.get("packets_sealed") == 6 and b.stats.get("packets_opened") == 6
    assert b.stats.get("bytes_opened") == sum(len(p) for p in net.delivered[B])
    assert a.stats.get("keepalives_sent") == 0  # the queued packet confirmed the session
    assert drops(a) == drops(b) == 0
    assert a.session_count() == b.session_count() == 1 and a.peer_count() == b.peer_count() == 1
    assert a.knows(B) and b.knows(A) and not a.knows(C)


def test_through_a_vip_replies_come_back_from_the_vip(net):
    net.vips[VIP] = B
    a = net.pods[A]
    connect(net, VIP)
    assert net.events[A] == [PeerUp(B, (VIP, PORT))]  # conntrack turned B's replies into VIP's
    net.send(B, A, ipv4(VIP, A, b"un-NATed reply"))  # B's NAT restored the VIP as source
    net.send(B, A, ipv4(B, A, b"from the pod itself"))
    net.pump()
    assert net.delivered[A] == [ipv4(VIP, A, b"un-NATed reply"), ipv4(B, A, b"from the pod itself")]
    assert a.knows(VIP) and a.knows(B) and a.peer_count() == 1
    net.send(A, B, ipv4(A, B, b"to the pod IP: same peer, same session"))
    net.pump()
    assert len(net.delivered[B]) == 1 and a.stats.get("handshakes_initiated") == 1


def test_inner_source_must_belong_to_the_peer(net):
    net.vips[VIP] = B
    connect(net, VIP)
    a, b = net.pods[A], net.pods[B]
    net.send(B, A, ipv4(C, A, b"spoofing another pod"))
    net.send(B, A, ipv4("172.30.0.99", A, b"spoofing another VIP"))
    net.send(A, B, ipv4(C, B, b"A spoofing C towards B"))
    net.pump()
    assert net.delivered[A] == [] and net.delivered[B] == []
    assert (
        a.stats.dropped(DropReason.BAD_SOURCE) == 2 and b.stats.dropped(DropReason.BAD_SOURCE) == 1
    )


@pytest.mark.parametrize(
    "inner",
    [
        b"\x60" + bytes(3) + b"\x00\x01" + bytes(34),  # IPv6: payload length says 1, has 0
        b"\x60" + bytes(38),  # IPv6: shorter than its fixed header
        b"\x50" + bytes(39),  # version 5
        ipv4(B, A)[:-1],  # total length says one byte more
        ipv4(B, A) + b"\x00",  # trailing garbage
        b"\x44" + ipv4(B, A)[1:],  # IHL 4
        bytes(10),
    ],
)
def test_inner_packet_must_be_one_ipv4_or_ipv6_packet(net, inner):
    connect(net)
    net.send(B, A, inner)
    net.pump()
    assert net.delivered[A] == [] and net.pods[A].stats.dropped(DropReason.NOT_IPV4) == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=1400), min_size=1, max_size=8))
def test_whatever_is_sealed_arrives_unchanged(payloads):
    net = Net()
    net.add(A)
    net.add(B)
    packets = [ipv4(A, B, p) for p in payloads]
    for p in packets:
        net.send(A, B, memoryview(bytearray(p)))  # the shell's reused buffers are fine
    net.pump()
    assert net.delivered[B] == packets


# ---- re-keying and expiry ----------------------------------------------------------------------


def test_rekey_on_time_keeps_traffic_flowing(net):
    a = net.pods[A]
    connect(net)
    net.advance(FAST.rekey_after_time + 0.5)
    assert a.stats.get("handshakes_initiated") == 1  # an idle session is not re-keyed
    net.send(A, B, ipv4(A, B, b"after rekey_after_time"))  # sealed on the old session ...
    net.pump()  # ... and it starts a handshake, answered at once
    assert net.delivered[B] == [ipv4(A, B, b"after rekey_after_time")]
    assert a.stats.get("rekeys") == 1 and a.stats.get("handshakes_completed") == 2
    net.send(A, B, ipv4(A, B, b"new keys"))
    net.send(B, A, ipv4(B, A, b"reply"))
    net.pump()
    assert net.delivered[B][-1] == ipv4(A, B, b"new keys")
    assert net.delivered[A] == [ipv4(B, A, b"reply")]
    to_b = net.data_indices(A)
    assert to_b[-1] != to_b[0] and len(set(to_b)) == 2
    # B's reply went out on the new session: it names A's index from the second handshake.
    assert net.data_indices(B)[-1] == net.response_indices()[-1] != net.response_indices()[0]
    assert drops(a) == drops(net.pods[B]) == 0


def test_initiator_sends_a_keepalive_so_the_responder_confirms(net):
    a, b = net.pods[A], net.pods[B]
    connect(net)
    net.advance(FAST.rekey_after_time + 0.5)
    net.send(A, B, ipv4(A, B))
    for d, s, dst in net.pump(hold=True):  # the data packet and the new initiation
        net.deliver(d, s, dst)
    response = net.pump(hold=True)
    assert [wire.message_type(d) for d, _, _ in response] == [wire.TYPE_RESPONSE]
    for d, s, dst in response:
        net.deliver(d, s, dst)
    after = net.pump(hold=True)
    assert [len(d) for d, _, _ in after] == [wire.DATA_OVERHEAD]  # the keepalive
    assert a.stats.get("keepalives_sent") == 1
    old_a, new_a = net.response_indices()
    net.send(B, A, ipv4(B, A))  # unconfirmed: B still seals with the old session
    net.pump()
    assert net.data_indices(B) == [old_a]
    for d, s, dst in after:
        net.deliver(d, s, dst)
    assert b.stats.get("keepalives_received") == 1
    net.send(B, A, ipv4(B, A))
    net.pump()
    assert net.data_indices(B) == [old_a, new_a]  # confirmed by the keepalive
    assert len(net.delivered[A]) == 2


def test_rekey_on_message_count():
    net = Net(fast(rekey_after_messages=5))
    a = net.add(A)
    net.add(B)
    for i in range(12):
        net.send(A, B, ipv4(A, B, b"%d" % i))
        net.pump()
    assert [p[20:] for p in net.delivered[B]] == [b"%d" % i for i in range(12)]
    assert a.stats.get("rekeys") == 2 and a.stats.get("handshakes_completed") == 3
    assert len(set(net.data_indices(A))) == 3


def test_initiator_renews_when_traffic_only_flows_towards_it(net):
    a, b = net.pods[A], net.pods[B]
    connect(net)  # A is the initiator, then only B talks (a download)
    for i in range(int(2.5 * FAST.reject_after_time / 0.5)):
        net.send(B, A, ipv4(B, A, b"%d" % i))
        net.advance(0.5)
    assert len(net.delivered[A]) == int(2.5 * FAST.reject_after_time / 0.5)
    assert b.stats.get("handshakes_initiated") == 0  # B never had to queue and handshake
    assert a.stats.get("rekeys") == a.stats.get("handshakes_completed") - 1 >= 2
    assert drops(a) == drops(b) == 0


def test_previous_session_still_opens_in_flight_packets():
    net = Net(fast(reject_after_time=100.0))  # no expiry here
    net.add(A)
    net.add(B)
    connect(net)
    net.advance(FAST.rekey_after_time + 0.5)
    net.send(A, B, ipv4(A, B, b"in flight on the old session"))
    held = net.pump(hold=True)
    in_flight = [x for x in held if wire.message_type(x[0]) == wire.TYPE_DATA]
    for d, s, dst in held:
        if wire.message_type(d) != wire.TYPE_DATA:
            net.deliver(d, s, dst)  # the initiation goes through; the data packet lags
    net.pump()
    assert net.pods[A].stats.get("handshakes_completed") == 2
    net.send(A, B, ipv4(A, B, b"new session"))
    net.pump()
    old_index = wire.parse_header(in_flight[0][0])[0]
    assert net.data_indices(A)[-1] != old_index
    for d, s, dst in in_flight:  # arrives late, after the switch
        net.deliver(d, s, dst)
    assert [p[20:] for p in net.delivered[B]] == [b"new session", b"in flight on the old session"]
    # One more re-key later, the session before last is gone: late packets on it are refused.
    net.send(A, B, ipv4(A, B, b"two sessions ago"))
    ((two_ago, s, dst),) = net.pump(hold=True)
    net.send(A, B, ipv4(A, B, b"companion"))  # answered by a keepalive: A sees B is alive
    net.pump()
    for label in (b"third session", b"fourth session"):
        net.advance(FAST.rekey_after_time + 0.5)
        net.send(A, B, ipv4(A, B, label))
        net.pump()
    net.send(A, B, ipv4(A, B, b"on it"))
    net.pump()
    assert net.pods[A].stats.get("handshakes_completed") == 4
    assert net.deliver(two_ago, s, dst) is None
    assert net.pods[B].stats.dropped(DropReason.UNKNOWN_INDEX) == 1
    assert net.delivered[B][-1] == ipv4(A, B, b"on it")


def test_nothing_opens_after_the_hard_time_limit(net):
    connect(net)
    net.send(A, B, ipv4(A, B, b"delayed past reject_after_time"))
    late = net.pump(hold=True)
    net.advance(FAST.reject_after_time + 0.1)  # nothing sent meanwhile: no re-key happened
    for d, s, dst in late:
        net.deliver(d, s, dst)
    assert net.delivered[B] == []
    assert net.pods[B].stats.dropped(DropReason.EXPIRED_SESSION) == 1
    assert net.pods[A].session_count() == net.pods[B].session_count() == 0
    # After the tombstone time the index is forgotten altogether.
    net.advance(FAST.tombstone_time + 0.1)
    for d, s, dst in late:
        net.deliver(d, s, dst)
    assert net.pods[B].stats.dropped(DropReason.UNKNOWN_INDEX) == 1
    # Sending again makes a fresh handshake instead of using the dead session.
    net.send(A, B, ipv4(A, B, b"fresh"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, B, b"fresh")]
    assert net.pods[A].stats.get("handshakes_completed") == 2


def test_expiry_is_checked_per_packet_not_only_by_the_timer(net):
    connect(net)
    net.send(A, B, ipv4(A, B, b"late"))
    late = net.pump(hold=True)
    net.now += FAST.reject_after_time  # no on_timer ran: the keys are still in memory
    for d, s, dst in late:
        assert net.deliver(d, s, dst) is None
    assert net.pods[B].stats.dropped(DropReason.EXPIRED_SESSION) == 1
    net.send(A, B, ipv4(A, B, b"not sealed on the dead session either"))
    assert [wire.message_type(d) for d, _, _ in net.pump(hold=True)] == [wire.TYPE_INITIATION]


def test_nothing_is_sealed_or_opened_past_the_message_limit():
    limits = fast(rekey_after_messages=3, reject_after_messages=5)
    net = Net(limits)
    a = net.add(A)
    net.add(B)
    connect(net)  # counter 0 used
    net.block = {wire.TYPE_INITIATION}  # the re-key cannot happen
    for i in range(8):
        net.send(A, B, ipv4(A, B, b"%d" % i))
        net.pump()
    counters = [
        wire.parse_header(d)[1]
        for d, s, _ in net.wire
        if s == A and wire.message_type(d) == wire.TYPE_DATA
    ]
    assert counters == [0, 1, 2, 3, 4]  # never a counter >= reject_after_messages
    assert [p[20:] for p in net.delivered[B]] == [b"0", b"1", b"2", b"3"]  # 4-7 are queued
    # A datagram with counter 5 under the right key is refused by the receiver too.
    session = next(iter(a.table.by_addr.values())).current
    forged = wire.seal(session.send_aead, session.remote_index, 5, ipv4(A, B))
    assert net.deliver(forged, A, B) is None
    assert net.pods[B].stats.dropped(DropReason.EXPIRED_SESSION) == 1
    net.block = set()
    net.advance(FAST.rekey_timeout)  # the retried initiation now gets through
    assert [p[20:] for p in net.delivered[B][4:]] == [b"4", b"5", b"6", b"7"]


# ---- limits ------------------------------------------------------------------------------------


def test_queue_bound_keeps_the_newest_packets():
    net = Net(fast(queue_limit=4))
    a = net.add(A)
    net.add(B)
    net.block = {wire.TYPE_INITIATION}
    for i in range(10):
        net.send(A, B, ipv4(A, B, b"%d" % i))
    net.pump()
    assert a.stats.dropped(DropReason.QUEUE_FULL) == 6
    net.block = set()
    net.advance(FAST.rekey_timeout)
    assert [p[20:] for p in net.delivered[B]] == [b"6", b"7", b"8", b"9"]


def test_total_queue_and_peer_count_are_bounded():
    net = Net(fast(queue_total_limit=5, max_peers=2))
    a = net.add(A)
    for dst in ("10.9.0.1", "10.9.0.2"):  # black holes: handshakes never complete
        for _ in range(4):
            net.send(A, dst, ipv4(A, dst))
    assert a.stats.dropped(DropReason.QUEUE_FULL) == 3  # 5 queued in all, not 8
    net.send(A, "10.9.0.3", ipv4(A, "10.9.0.3"))  # a third peer: both others are busy
    assert a.stats.dropped(DropReason.QUEUE_FULL) == 4
    assert a.peer_count() == 2 and not a.knows("10.9.0.3")
    net.advance(FAST.handshake_give_up + 0.1)
    assert a.stats.dropped(DropReason.HANDSHAKE_TIMEOUT) == 5
    net.send(A, "10.9.0.3", ipv4(A, "10.9.0.3"))  # room again
    assert a.knows("10.9.0.3") and a.peer_count() == 1


def test_an_idle_peer_makes_room_when_the_table_is_full():
    net = Net(fast(max_peers=1))
    net.add(A)
    net.add(B)
    net.add(C)
    connect(net)
    net.send(A, C, ipv4(A, C))
    net.pump()
    assert net.delivered[C] == [] and net.pods[A].stats.dropped(DropReason.QUEUE_FULL) == 1
    net.advance(FAST.reject_after_time + 0.1)  # B's session expires: B's peer is idle now
    net.send(A, C, ipv4(A, C))
    net.pump()
    assert net.delivered[C] == [ipv4(A, C)]
    assert net.events[A] == [PeerUp(B, (B, PORT)), PeerDown(B), PeerUp(C, (C, PORT))]


def test_handshake_gives_up_and_drops_the_queue():
    net = Net()
    a = net.add(A)
    for i in range(3):
        net.send(A, "10.0.0.99", ipv4(A, "10.0.0.99", b"%d" % i))  # no tunnel there
    net.advance(FAST.handshake_give_up + 0.1)
    # One try every rekey_timeout until give-up: t = 0, 1, 2, 3, 4 (at 5 it gives up instead).
    assert a.stats.get("handshakes_initiated") == int(FAST.handshake_give_up / FAST.rekey_timeout)
    assert a.stats.dropped(DropReason.HANDSHAKE_TIMEOUT) == 3
    assert a.peer_count() == 0 and not a.knows("10.0.0.99") and a.next_timer() is None
    assert net.events[A] == [PeerUnreachable(("10.0.0.99",))]  # the shell refuses or goes clear


def test_peer_that_goes_away_is_reported_down(net):
    connect(net)
    del net.pods[B]  # the pod is gone for good
    net.advance(FAST.reject_after_time + 0.1)  # its session expired
    net.send(A, B, ipv4(A, B))
    net.advance(FAST.handshake_give_up + 0.1)
    assert net.events[A] == [PeerUp(B, (B, PORT)), PeerUnreachable((B,)), PeerDown(B)]
    assert net.pods[A].peer_count() == 0


def test_handshake_rate_limit_runs_before_any_dh():
    dh = itertools.count()

    def counting_keygen():
        next(dh)
        return X25519PrivateKey.generate()

    net = Net(fast(handshake_rate=1.0, handshake_burst=3))
    b = net.add(B, keygen=counting_keygen)
    flood = []
    for i in range(10):  # ten valid initiations, from ten "pods", all from one source address
        pod = ipaddress.IPv4Address(f"10.1.0.{i + 1}").packed
        flood.append(handshake.build_initiation(TEMPLATES, i + 1, int(net.wall * 1e9), pod)[1])
    garbage = bytearray(flood[0])
    garbage[50] ^= 1
    net.deliver(bytes(garbage), "192.0.2.7", B)  # forged: refused by mac1, before the bucket
    for initiation in flood:
        net.deliver(initiation, "192.0.2.7", B)
    assert b.stats.get("handshakes_responded") == 3 and next(dh) == 3
    assert b.stats.dropped(DropReason.HANDSHAKE_RATELIMIT) == 7
    assert b.stats.dropped(DropReason.BAD_MAC) == 1
    net.advance(1.0)  # one token back
    net.deliver(flood[0], "192.0.2.7", B)  # a byte-identical copy: refused after mac1 alone
    assert b.stats.dropped(DropReason.HANDSHAKE_REPLAY) == 1 and next(dh) == 4
    # Nothing is recorded before the bucket admits it (gate rule "bounded before budgeted"):
    # the refused flood[3] is no replay when it comes again with a token to spend.
    net.deliver(flood[3], "192.0.2.7", B)
    assert b.stats.get("handshakes_responded") == 4 and next(dh) == 6
    assert b.stats.dropped(DropReason.HANDSHAKE_REPLAY) == 1


def test_indices_are_random_nonzero_and_unique():
    values = iter([0, 5, 5, 5, 7, 0, 9, 5, 7, 11] + list(range(100, 200)))
    net = Net()
    a = net.add(A, rng=lambda n: next(values).to_bytes(n, "little"))
    net.add(B)
    net.add(C)
    connect(net)
    net.send(A, C, ipv4(A, C))
    net.pump()
    assert sorted(a.table.by_index) == [5, 7]
    assert net.delivered[C] == [ipv4(A, C)]


def test_crossing_handshakes_settle(net):
    net.send(A, B, ipv4(A, B, b"a"))
    net.send(B, A, ipv4(B, A, b"b"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, B, b"a")] and net.delivered[A] == [ipv4(B, A, b"b")]
    for i in range(3):
        net.send(A, B, ipv4(A, B, b"%d" % i))
        net.send(B, A, ipv4(B, A, b"%d" % i))
    net.pump()
    assert len(net.delivered[A]) == len(net.delivered[B]) == 4
    assert net.pods[A].peer_count() == net.pods[B].peer_count() == 1
    assert drops(net.pods[A]) == drops(net.pods[B]) == 0


def test_two_vips_of_one_pod_merge_into_one_peer(net):
    net.vips[VIP] = B
    net.vips["172.30.0.11"] = B
    connect(net, VIP)
    net.send(A, "172.30.0.11", ipv4(A, "172.30.0.11", b"second service"))
    net.pump()
    a = net.pods[A]
    assert net.delivered[B] == [ipv4(A, "172.30.0.11", b"second service")]
    assert a.peer_count() == 1 and all(a.knows(x) for x in (VIP, "172.30.0.11", B))
    net.send(B, A, ipv4("172.30.0.11", A, b"reply from the second VIP"))
    net.send(B, A, ipv4(VIP, A, b"reply from the first VIP"))
    net.pump()
    assert len(net.delivered[A]) == 2
    assert net.events[A] == [PeerUp(B, (VIP, PORT))]


def test_vip_moving_to_another_pod_rebinds_the_peer(net):
    net.add(C)
    net.vips[VIP] = B
    connect(net, VIP)
    net.vips[VIP] = C  # B went away, the Service now points at C
    net.conntrack.clear()
    del net.pods[B]
    net.send(A, VIP, ipv4(A, VIP, b"lost on the way to C"))
    net.advance(FAST.stale_timeout + 0.1)
    net.send(A, VIP, ipv4(A, VIP, b"to C"))
    net.pump()
    assert net.delivered[C] == [ipv4(A, VIP, b"to C")]
    assert net.events[A] == [PeerUp(B, (VIP, PORT)), PeerDown(B), PeerUp(C, (VIP, PORT))]
    assert not net.pods[A].knows(B) and net.pods[A].knows(C)


# ---- send_batch: the batch path's sealing ---------------------------------------------------------


def test_send_batch_delivers_the_same_packets_as_send_one_by_one():
    one, many = new_net(), new_net()
    for n in (one, many):
        connect(n)
    packets = [ipv4(A, B, b"segment %02d" % i) for i in range(44)]
    for p in packets:
        one.send(A, B, p)
    many.pods[A].send_batch(B, packets, many.now, many.wall)
    one.pump()
    many.pump()
    assert many.delivered[B] == one.delivered[B] == packets
    for key in ("packets_sealed", "bytes_sealed"):
        assert many.pods[A].stats.get(key) == one.pods[A].stats.get(key)
    assert drops(many.pods[B]) == 0


def test_send_batch_without_a_session_queues_and_handshakes():
    net = new_net()
    packets = [ipv4(A, B, b"early %d" % i) for i in range(5)]
    net.pods[A].send_batch(B, packets, net.now, net.wall)
    net.pump()
    assert net.delivered[B] == packets
    assert net.pods[A].stats.get("handshakes_initiated") == 1


def test_send_batch_respects_the_message_limits():
    net = new_net(fast(rekey_after_messages=10, reject_after_messages=20))
    connect(net)
    a = net.pods[A]
    sealed = a.stats.get("packets_sealed")
    a.send_batch(B, [ipv4(A, B, b"%d" % i) for i in range(12)], net.now, net.wall)
    assert a.stats.get("packets_sealed") == sealed + 12
    assert a.stats.get("handshakes_initiated") == 2  # crossing rekey_after_messages re-keys
    net.pump()
    assert len(net.delivered[B]) == 12
