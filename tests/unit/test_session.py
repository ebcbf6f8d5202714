"""Two (or more) Tunnels linked in memory, with an injected clock.

    pod A 10.0.0.1 ----+                          +---- pod B 10.0.0.2   (behind VIP 172.30.0.10)
                       |   Net: delivers every     |
    pod C 10.0.0.3 ----+   datagram, DNATs VIPs,   +---- (attacker: any address, any bytes)
                           rewrites replies like
                           conntrack, logs the wire

Each test drives the cores the way the daemon does: send / receive / pop_transmits /
pop_events / on_timer, and checks what arrives, what does not, and the exact drop counters.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tencrypt.core import handshake, wire
from tencrypt.core.session import Limits, PeerDown, PeerUnreachable, PeerUp, Tunnel
from tencrypt.core.stats import DropReason, Stats

PSK = bytes(range(1, 33))
A, B, C, VIP = "10.0.0.1", "10.0.0.2", "10.0.0.3", "172.30.0.10"
PORT = 1337
FAST = Limits(rekey_after_time=20.0, reject_after_time=30.0, rekey_timeout=1.0,
              handshake_give_up=5.0, keepalive_timeout=1.0, stale_timeout=2.5,
              initiation_max_age=30.0, handshake_rate=1000.0, handshake_burst=1000,
              tombstone_time=30.0)


def ipv4(src: str, dst: str, payload: bytes = b"x" * 20, proto: int = 17) -> bytes:
    total = 20 + len(payload)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + payload


def drops(t: Tunnel) -> int:
    return sum(t.stats.drops.values())


class Net:
    def __init__(self, limits: Limits = FAST) -> None:
        self.limits = limits
        self.now, self.wall = 1000.0, 1_700_000_000.0
        self.pods: dict[str, Tunnel] = {}
        self.vips: dict[str, str] = {}
        self.conntrack: dict[tuple[str, str], str] = {}  # (client, pod) -> VIP it asked for
        self.delivered: dict[str, list[bytes]] = {}
        self.events: dict[str, list] = {}
        self.wire: list[tuple[bytes, str, str]] = []  # (datagram, from pod, to address)
        self.block: set[int] = set()  # message types the network loses

    def add(self, ip: str, **kw) -> Tunnel:
        self.pods[ip] = Tunnel(PSK, ip, Stats(), self.limits, port=PORT, **kw)
        self.delivered[ip] = []
        self.events[ip] = []
        return self.pods[ip]

    def send(self, pod: str, dst: str, packet: bytes) -> None:
        self.pods[pod].send(dst, packet, self.now, self.wall)

    def pump(self, hold: bool = False) -> list[tuple[bytes, str, str]]:
        """Deliver until quiet; with ``hold``, return one round of datagrams undelivered."""
        for _ in range(100):
            batch = []
            for ip, t in self.pods.items():
                self.events[ip] += t.pop_events()
                batch += [(d, ip, addr[0]) for d, addr in t.pop_transmits()]
            if hold or not batch:
                return batch
            for datagram, src, dst in batch:
                self.deliver(datagram, src, dst)
        raise AssertionError("the tunnels never went quiet")

    def deliver(self, datagram: bytes, src: str, dst: str) -> bytes | None:
        self.wire.append((datagram, src, dst))
        if wire.message_type(datagram) in self.block:
            return None
        pod = self.vips.get(dst, dst)
        if pod != dst:
            self.conntrack[(src, pod)] = dst
        seen_from = self.conntrack.get((dst, src), src)  # a reply comes back from the VIP
        t = self.pods.get(pod)
        if t is None:
            return None
        out = t.receive(datagram, (seen_from, PORT), self.now, self.wall)
        if out is not None:
            self.delivered[pod].append(out)
        return out

    def advance(self, seconds: float) -> None:
        """Move both clocks, running every timer that falls due on the way."""
        end = self.now + seconds
        for _ in range(10_000):  # a timer that never stops firing is a bug: fail, not hang
            due = min((t for t in (p.next_timer() for p in self.pods.values()) if t is not None),
                      default=None)
            step_to = end if due is None or due > end else max(due, self.now)
            self.wall += step_to - self.now
            self.now = step_to
            for t in self.pods.values():
                t.on_timer(self.now, self.wall)
            self.pump()
            if step_to >= end:
                return
        raise AssertionError("timers kept firing at the same instant")

    def response_indices(self) -> list[int]:
        """Receiver index of every response on the wire: the initiator's new session index."""
        return [struct.unpack_from("<I", d, 4)[0] for d, _, _ in self.wire
                if wire.message_type(d) == wire.TYPE_RESPONSE]

    def data_indices(self, src: str) -> list[int]:
        """Receiver index of every data message (keepalives excluded) ``src`` put on the wire."""
        return [wire.parse_header(d)[0] for d, s, _ in self.wire
                if s == src and wire.message_type(d) == wire.TYPE_DATA
                and len(d) > wire.DATA_OVERHEAD]


@pytest.fixture
def net() -> Net:
    n = Net()
    n.add(A)
    n.add(B)
    return n


def connect(net: Net, dst: str = B) -> None:
    net.send(A, dst, ipv4(A, dst, b"hello"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, dst, b"hello")]
    net.delivered[B].clear()


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
    assert a.stats.dropped(DropReason.BAD_SOURCE) == 2 and b.stats.dropped(DropReason.BAD_SOURCE) == 1


@pytest.mark.parametrize("inner", [b"\x60" + bytes(39),  # IPv6
                                   ipv4(B, A)[:-1],  # total length says one byte more
                                   ipv4(B, A) + b"\x00",  # trailing garbage
                                   b"\x44" + ipv4(B, A)[1:],  # IHL 4
                                   bytes(10)])
def test_inner_packet_must_be_ipv4(net, inner):
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
    net = Net(Limits(**{**_fields(FAST), "rekey_after_messages": 5}))
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
    net = Net(Limits(**{**_fields(FAST), "reject_after_time": 100.0}))  # no expiry here
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
    (two_ago, s, dst), = net.pump(hold=True)
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
    limits = Limits(**{**_fields(FAST), "rekey_after_messages": 3, "reject_after_messages": 5})
    net = Net(limits)
    a = net.add(A)
    net.add(B)
    connect(net)  # counter 0 used
    net.block = {wire.TYPE_INITIATION}  # the re-key cannot happen
    for i in range(8):
        net.send(A, B, ipv4(A, B, b"%d" % i))
        net.pump()
    counters = [wire.parse_header(d)[1] for d, s, _ in net.wire
                if s == A and wire.message_type(d) == wire.TYPE_DATA]
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
    assert b.stats.dropped(DropReason.STALE_HANDSHAKE) == 3
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
        PSK, 77, int((net.wall - FAST.initiation_max_age - 1) * 1e9),
        ipaddress.IPv4Address(A).packed, X25519PrivateKey.generate)
    net.deliver(initiation, A, B)
    assert net.pods[B].stats.dropped(DropReason.STALE_HANDSHAKE) == 1
    assert net.pump(hold=True) == []


def test_forged_response_is_dropped_and_the_real_one_still_completes(net):
    a = net.pods[A]
    net.send(A, B, ipv4(A, B))
    for d, s, dst in net.pump(hold=True):
        net.deliver(d, s, dst)
    (response, src, dst), = net.pump(hold=True)
    for byte in (8, 40, 63):  # ephemeral, encrypted payload, tag
        forged = bytearray(response)
        forged[byte] ^= 0x80
        net.deliver(bytes(forged), src, dst)
    unknown = response[:4] + struct.pack("<I", (struct.unpack_from("<I", response, 4)[0] + 1))
    net.deliver(unknown + response[8:], src, dst)
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


# ---- limits ------------------------------------------------------------------------------------

def test_queue_bound_keeps_the_newest_packets():
    net = Net(Limits(**{**_fields(FAST), "queue_limit": 4}))
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
    net = Net(Limits(**{**_fields(FAST), "queue_total_limit": 5, "max_peers": 2}))
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
    net = Net(Limits(**{**_fields(FAST), "max_peers": 1}))
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

    net = Net(Limits(**{**_fields(FAST), "handshake_rate": 1.0, "handshake_burst": 3}))
    b = net.add(B, keygen=counting_keygen)
    flood = []
    for i in range(10):  # ten valid initiations, from ten "pods", all from one source address
        pod = ipaddress.IPv4Address(f"10.1.0.{i + 1}").packed
        flood.append(handshake.build_initiation(PSK, i + 1, int(net.wall * 1e9), pod,
                                                X25519PrivateKey.generate)[1])
    garbage = bytearray(flood[0])
    garbage[50] ^= 1
    net.deliver(bytes(garbage), "192.0.2.7", B)  # forged: refused before the bucket
    for initiation in flood:
        net.deliver(initiation, "192.0.2.7", B)
    assert b.stats.get("handshakes_responded") == 3 and next(dh) == 3
    assert b.stats.dropped(DropReason.HANDSHAKE_RATELIMIT) == 7
    assert b.stats.dropped(DropReason.BAD_HANDSHAKE) == 1
    net.advance(1.0)  # one token back
    net.deliver(flood[3], "192.0.2.7", B)  # not answered before, so not stale
    assert b.stats.get("handshakes_responded") == 4


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


# ---- every datagram ends in exactly one outcome --------------------------------------------------

@pytest.fixture(scope="module")
def linked():
    """A live A<->B pair, plus one captured datagram of each kind (not yet delivered)."""
    net = Net(Limits(**{**_fields(FAST), "rekey_after_time": 1e9, "reject_after_time": 1e9,
                        "tombstone_time": 1e9}))
    net.add(A)
    net.add(B)
    net.send(A, B, ipv4(A, B))
    (initiation, _, _), = net.pump(hold=True)
    net.deliver(initiation, A, B)
    (response, _, _), = net.pump(hold=True)
    net.deliver(response, B, A)
    net.pump()
    net.send(A, B, ipv4(A, B, b"captured"))
    (data, _, _), = net.pump(hold=True)
    # A fresh initiator whose response is captured but not delivered.
    net.add(C)
    net.send(C, B, ipv4(C, B))
    (c_init, _, _), = net.pump(hold=True)
    net.deliver(c_init, C, B)
    (c_resp, _, _), = net.pump(hold=True)
    return net, {"data": (data, A, B), "initiation": (initiation, A, B),
                 "response": (c_resp, B, C)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["data", "initiation", "response"]), st.data())
def test_any_bit_flip_in_any_datagram_is_one_counted_drop(linked, kind, data):
    net, captured = linked
    datagram, src, dst = captured[kind]
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    forged = bytearray(datagram)
    forged[bit // 8] ^= 1 << (bit % 8)
    t = net.pods[dst]
    before, handled = drops(t), _handled(t)
    assert t.receive(bytes(forged), (src, PORT), net.now, net.wall) is None
    assert drops(t) == before + 1 and _handled(t) == handled
    assert t.pop_transmits() == [] and t.pop_events() == []


def test_captured_datagrams_are_still_good_after_all_the_flipping(linked):
    net, captured = linked
    datagram, src, dst = captured["data"]
    assert net.deliver(datagram, src, dst) == ipv4(A, B, b"captured")
    datagram, src, dst = captured["response"]
    net.deliver(datagram, src, dst)
    assert net.pods[C].stats.get("handshakes_completed") == 1


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from([1, 2, 4]), st.binary(max_size=100)).map(
        lambda t: struct.pack("<I", t[0]) + t[1]),
    st.sampled_from([(1, 68), (2, 60)]).flatmap(  # exact handshake lengths
        lambda t: st.binary(min_size=t[1], max_size=t[1]).map(
            lambda b, k=t[0]: struct.pack("<I", k) + b)),
))
def test_random_bytes_are_always_one_counted_drop(linked, blob):
    net, _ = linked
    for pod in (A, B):
        t = net.pods[pod]
        before = drops(t)
        assert t.receive(blob, ("192.0.2.1", 4242), net.now, net.wall) is None
        assert drops(t) == before + 1
        assert t.pop_transmits() == []


def test_random_data_with_a_live_index_is_a_bad_tag(linked):
    net, captured = linked
    datagram = captured["data"][0]
    b = net.pods[B]
    before = b.stats.dropped(DropReason.BAD_TAG)
    for _ in range(50):
        blob = datagram[:8] + struct.pack("<Q", 2**40 + _) + os.urandom(40)
        assert b.receive(blob, (A, PORT), net.now, net.wall) is None
    assert b.stats.dropped(DropReason.BAD_TAG) == before + 50


def _handled(t: Tunnel) -> int:
    return sum(t.stats.get(k) for k in ("packets_opened", "handshakes_responded",
                                        "handshakes_completed", "keepalives_received"))


def _fields(limits: Limits) -> dict:
    return {f: getattr(limits, f) for f in Limits.__slots__}
