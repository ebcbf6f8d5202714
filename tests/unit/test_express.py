"""The express lane (core/express.py, tencrypt/_lane.c) against the Python path it shortcuts.

Three cluster-mode proxies on in-memory ports (tests/unit/fakes.py) open a connection through
a Service the normal way; the lane has then learnt the flow. Every test runs the pure twin
(``Express.outbound``/``inbound``) and the compiled ``Lane`` (skipped when not built):
- the lane's datagram and the Python path's for the same packet from the same state are the
  same bytes, and leave the same state (counter, peer deadlines and figures, stats, the
  Service flow's last-seen time); inbound the same frame into tenc0;
- rule 4 (ownership): lane and Python seals of one session interleave with strictly
  increasing counters, and a datagram one path opened is a replay for the other;
- bad input (random bytes, cut or flipped datagrams, mutated frames) is handed back, never
  raises, changes nothing;
- the pumps on real (loopback, socketpair) descriptors: what they take goes out, what they
  cannot take comes back in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import select
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP

from tencrypt import fastpath
from tencrypt.core.express import Express, key13
from tencrypt.core.membership import Members
from tencrypt.core.stats import Counter, DropReason
from tencrypt.linux.kernel import UDP_GRO, UDP_SEGMENT
from tests.unit.fakes import Pod, Wire
from tests.unit.test_batch import tso_frame
from tests.unit.test_daemon_services import B1, B2, PAYLOAD, VIP, A, members, tcp

COMPILED = fastpath.compiled()
LANES = [
    "python",
    pytest.param(
        "c",
        marks=pytest.mark.skipif(
            COMPILED is None or not hasattr(COMPILED, "Lane"), reason="tencrypt._fastpath not built"
        ),
    ),
]


def policy_members(ip: str, policy: bool) -> Members:
    """The cluster's membership as ``ip``'s file says it; ``policy``: with a NetworkPolicy
    document (not isolating, but tracked: core/policyflows.py rule 6), as the agent writes."""
    found = members(B1, B2)
    if not policy:
        return found
    doc = {
        "format": "tencrypt-netpol/1",
        "project": "shop",
        "pod": ip,
        "generation": 0,
        "ips": [ip],
        "ingress": {"isolated": False, "policies": [], "rules": []},
        "egress": {"isolated": False, "policies": [], "rules": []},
        "named_ports": {},
        "malformed": [],
    }
    return dataclasses.replace(found, network_policy=json.dumps(doc))


def frame(packet: bytes) -> bytes:
    return bytes(10) + packet  # a virtio-net header asking nothing


class Lab:
    """A (client) -> VIP -> B2 (picked), an established TCP connection learnt by both lanes."""

    def __init__(self, policy: bool = False) -> None:
        async def main() -> tuple[Pod, Pod, Pod, Wire]:
            a = Pod(A, batch=True, members=policy_members(A, policy), rng=lambda bound: 1)
            b1 = Pod(B1, batch=True, members=policy_members(B1, policy))
            b2 = Pod(B2, batch=True, members=policy_members(B2, policy))
            for pod in (a, b1, b2):
                await pod.proxy.prepare()
                pod.proxy.tunnel.fastpath = fastpath.select(os.environ)
                c = pod.proxy.config
                pod.proxy.express = Express(
                    pod.proxy.tunnel,
                    pod.proxy.dispatch,
                    pod.proxy.flows,
                    pod.stats,
                    c.pod_ip,
                    c.mtu,
                )
            wire = Wire(a, b1, b2)
            a.app_sends(frame(tcp(A, VIP, 40000, 80, "S")))
            wire.pump()
            for pod in (a, b1, b2):
                await pod.proxy.effects.round()
            b2.app_sends(frame(tcp(B2, A, 8080, 40000, "SA")))
            wire.pump()
            a.app_sends(frame(tcp(A, VIP, 40000, 80, "A")))  # learnt by A's lane
            wire.pump()
            b2.app_sends(frame(tcp(B2, A, 8080, 40000, "PA")))  # learnt by B2's lane
            wire.pump()
            return a, b1, b2, wire

        self.policy = policy
        self.a, self.b1, self.b2, self.wire = asyncio.run(main())
        self.now = self.a.clock.now

    def lane(self, pod: Pod, kind: str) -> Any:
        e = pod.proxy.express
        assert e is not None
        if kind == "python":
            return e
        assert COMPILED is not None
        return COMPILED.Lane(e.out, e.inn, e.slots, e.pod4, pod.proxy.config.mtu)


# the peer's state the lane's take/accept change, as the Python path does (core/express.py rule 3)
PEER_STATE = (
    "keepalive_due",
    "stale_due",
    "tx_packets",
    "tx_bytes",
    "rx_packets",
    "rx_bytes",
    "endpoint",
    "confirmed",
)


def state(pod: Pod, peer_ip: str) -> dict[str, Any]:
    """What a packet of the flow may change (rule 3), to compare and to restore."""
    peer = pod.proxy.tunnel.table.by_addr[peer_ip]
    s = peer.current
    assert s is not None
    flows = pod.proxy.dispatch.flows._idle
    policy = pod.proxy.dispatch.netpol._idle
    return {
        "counter": s.send_counter,
        "top": s.replay.top,
        "ring": bytes(s.replay.ring),
        "peer": tuple(getattr(peer, name) for name in PEER_STATE),
        "stats": dict(pod.stats.counters),
        "drops": dict(pod.stats.drops),
        "flows": [(k, f.last_seen, f.queue) for k, f in flows.flows.items()],
        "order": [list(q) for q in flows.queues],
        "policy": [(k, f.last_seen, f.queue) for k, f in policy.flows.items()],
        "porder": [list(q) for q in policy.queues],
    }


def restore(pod: Pod, peer_ip: str, saved: dict[str, Any]) -> None:
    peer = pod.proxy.tunnel.table.by_addr[peer_ip]
    s = peer.current
    assert s is not None
    s.send_counter = saved["counter"]
    s.replay.top = saved["top"]
    s.replay.ring[:] = memoryview(bytearray(saved["ring"])).cast("Q")
    for name, value in zip(PEER_STATE, saved["peer"], strict=True):
        setattr(peer, name, value)
    pod.stats.counters.clear()
    pod.stats.counters.update(saved["stats"])
    pod.stats.drops.clear()
    pod.stats.drops.update(saved["drops"])
    flows = pod.proxy.dispatch.flows._idle
    for key, last_seen, _queue in saved["flows"]:
        flows.flows[key].last_seen = last_seen
    for queue, order in zip(flows.queues, saved["order"], strict=True):
        for key in order:
            queue.move_to_end(key)
    policy = pod.proxy.dispatch.netpol._idle
    for key, last_seen, _queue in saved["policy"]:
        policy.flows[key].last_seen = last_seen
    for queue, order in zip(policy.queues, saved["porder"], strict=True):
        for key in order:
            queue.move_to_end(key)


def counter_of(datagram: bytes) -> int:
    return int(struct.unpack_from("<Q", datagram, 8)[0])


def python_path_in(lab: Any, sender: Pod, pod: Pod, peer_ip: str, packet: bytes) -> Any:
    """``sender``'s app sends ``packet`` (sealed by its Python path); ``pod`` opens the
    datagram by its Python path a moment later. Returns (datagram, sender's endpoint, the
    frame written to tenc0, the peer state before and after); the state is put back to
    ``before``, so a lane can open the same datagram next."""
    sender.app_sends(frame(packet))
    [(datagram, _)] = sender.udp.sent
    sender.udp.sent = []
    addr = pod.proxy.tunnel.table.by_addr[peer_ip].endpoint
    lab.now += 0.25
    pod.clock.now = lab.now
    before = state(pod, peer_ip)
    pod.tun.written = []
    pod.udp.inbox.append(([datagram], addr))
    pod.proxy._on_udp()
    [(hdr, written)] = pod.tun.written
    after = state(pod, peer_ip)
    restore(pod, peer_ip, before)
    assert state(pod, peer_ip) == before
    return datagram, addr, hdr + written, after


def mutated(rng: random.Random, base: bytes, near: range | None = None) -> bytes:
    """``base`` with one or two bytes set at random: anywhere, or (``near``) half of them
    within that range (the headers)."""
    data = bytearray(base)
    for _ in range(rng.randrange(1, 3)):
        if near is None or rng.random() < 0.5:
            at = rng.randrange(len(data))
        else:
            at = rng.randrange(near.start, near.stop)
        data[at] = rng.randrange(256)
    return bytes(data)


def lanes_agree(pod: Pod, peer_ip: str, pure: Any, c: Any, method: str, *args: Any) -> Any:
    """``method(*args)`` of the ``pure`` lane, then of the ``c`` one from the same peer state:
    the same result and the same state after; the result."""
    saved = state(pod, peer_ip)
    want = getattr(pure, method)(*args)
    after = state(pod, peer_ip)
    restore(pod, peer_ip, saved)
    assert getattr(c, method)(*args) == want
    assert state(pod, peer_ip) == after
    return want


def test_both_sides_learnt_the_flow():
    lab = Lab()
    a, b2 = lab.a.proxy.express, lab.b2.proxy.express
    assert a is not None and b2 is not None
    assert list(a.out) == [key13(tcp(A, VIP, 40000, 80, "A"))]  # as A's app sent it
    assert list(b2.out) == [key13(tcp(B2, A, 8080, 40000, "A"))]
    assert a.out[next(iter(a.out))][2] == socket.inet_aton(B2)  # translated for B2
    assert list(a.inn) == [key13(tcp(B2, A, 8080, 40000, "A"))]  # B2's replies -> the VIP
    assert a.inn[next(iter(a.inn))][:2] == (socket.inet_aton(VIP), 80)


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
@pytest.mark.parametrize("kind", LANES)
def test_outbound_is_the_python_paths_datagram_and_state(kind, policy):
    lab = Lab(policy)
    a = lab.a
    data = frame(tcp(A, VIP, 40000, 80, "PA"))
    lab.now += 0.5
    a.clock.now = lab.now
    before = state(a, B2)
    a.app_sends(data)  # the Python path (it learns again: the same entries)
    [(reference, endpoint)] = a.udp.sent
    a.udp.sent = []
    after = state(a, B2)
    assert after["counter"] == before["counter"] + 1
    restore(a, B2, before)
    assert state(a, B2) == before
    got = lab.lane(a, kind).outbound(data, lab.now)
    assert got == (reference, endpoint)
    assert state(a, B2) == after


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
@pytest.mark.parametrize("kind", LANES)
def test_inbound_is_the_python_paths_frame_and_state(kind, policy):
    lab = Lab(policy)
    a, b2 = lab.a, lab.b2
    packet = tcp(B2, A, 8080, 40000, "PA")
    datagram, addr, written, after = python_path_in(lab, b2, a, B2, packet)
    assert after["top"] == counter_of(datagram)
    got = lab.lane(a, kind).inbound(datagram, addr, lab.now)
    assert got == written
    assert state(a, B2) == after
    assert written[10 + 12 : 10 + 16] == socket.inet_aton(VIP)  # the app sees the Service


@pytest.mark.parametrize("kind", LANES)
def test_rule_4_one_counter_and_one_window_whichever_path_uses_them(kind):
    lab = Lab(policy=True)
    a, b2 = lab.a, lab.b2
    lane, lane_b2 = lab.lane(a, kind), lab.lane(b2, kind)
    peer = a.proxy.tunnel.table.by_addr[B2]
    sealed: list[bytes] = []
    for i in range(12):
        data = frame(tcp(A, VIP, 40000, 80, "PA"))
        if i % 3 == 0:
            got = lane.outbound(data, lab.now)
            assert got is not None
            sealed.append(got[0])
        elif i % 3 == 1:
            a.app_sends(data)  # the Python path's seal
            sealed += [d for d, _ in a.udp.sent]
            a.udp.sent = []
        else:  # a keepalive, as the timers seal it
            a.proxy.tunnel.send(B2, b"", lab.now, 0.0)
            sealed += [bytes(d) for d, _ in a.proxy.tunnel.pop_transmits()]
    counters = [counter_of(d) for d in sealed]
    assert counters == sorted(set(counters)) and len(counters) == 12  # no nonce twice
    assert peer.current is not None and peer.current.send_counter == counters[-1] + 1
    # B2: its lane opens one, then the Python path sees it again: a replay, counted
    addr = b2.proxy.tunnel.table.by_addr[A].endpoint
    first = sealed[0]
    assert lane_b2.inbound(first, addr, lab.now) is not None
    b2.udp.inbox.append(([first], addr))
    b2.proxy._on_udp()
    assert b2.stats.dropped(DropReason.REPLAY) == 1
    # the Python path opens one, then the lane hands it back untouched, and Python refuses it
    second = sealed[3]
    b2.udp.inbox.append(([second], addr))
    b2.proxy._on_udp()
    saved = state(b2, A)
    assert lane_b2.inbound(second, addr, lab.now) is None
    assert state(b2, A) == saved
    b2.udp.inbox.append(([second], addr))
    b2.proxy._on_udp()
    assert b2.stats.dropped(DropReason.REPLAY) == 2


@pytest.mark.parametrize("kind", LANES)
def test_bad_input_is_handed_back_and_changes_nothing(kind):
    lab = Lab()
    a, b2 = lab.a, lab.b2
    lane = lab.lane(a, kind)
    b2.app_sends(frame(tcp(B2, A, 8080, 40000, "PA")))
    [(good, _)] = b2.udp.sent
    addr = a.proxy.tunnel.table.by_addr[B2].endpoint
    rng = random.Random(26)
    saved = state(a, B2)
    bad = [b"", b"\x04", good[:-1], good[:40], good + b"x", bytes(len(good))]
    for i in range(16, len(good)):  # a flipped bit anywhere past the header: a bad tag
        flipped = bytearray(good)
        flipped[i] ^= 1 << rng.randrange(8)
        bad.append(bytes(flipped))
    bad += [rng.randbytes(rng.randrange(0, 200)) for _ in range(200)]
    bad.append(b"\x04\x00\x00\x00" + good[4:8] + b"\xff" * 8 + good[16:])  # counter at the limit
    for datagram in bad:
        assert lane.inbound(datagram, addr, lab.now) is None
    assert lane.inbound(good, ("10.9.9.9", 1337), lab.now) is None  # not the peer's endpoint
    assert state(a, B2) == saved
    frames = [b"", bytes(9), bytes(10), frame(b"\x45"), frame(tcp(A, VIP, 40000, 80, "S"))]
    frames += [frame(tcp(A, VIP, 40000, 80, "F")), frame(tcp(A, VIP, 40000, 80, "R"))]
    frames += [frame(tcp(A, VIP, 40001, 80, "A")), frame(tcp(A, B1, 40000, 80, "A"))]
    frames.append(b"\x00\x01" + bytes(8) + tcp(A, VIP, 40000, 80, "A"))  # a GSO frame
    frames.append(frame(tcp(A, VIP, 40000, 80, "A") + b"pad"))  # total length not exact
    frames += [rng.randbytes(rng.randrange(0, 120)) for _ in range(200)]
    for data in frames:
        assert lane.outbound(data, lab.now) is None
    assert state(a, B2) == saved


def super_frame(payload: int, mss: int, flags: str = "PA", sport: int = 40000) -> bytes:
    """A TSO super-packet of A's connection as A's kernel writes it to tenc0 (core/batch.py
    rule 1: NEEDS_CSUM, the pseudo-header sum in the TCP checksum)."""
    body = bytes(i % 251 for i in range(payload))
    pkt = IP(src=A, dst=VIP, id=7) / TCP(sport=sport, dport=80, flags=flags, seq=1000) / body
    return tso_frame(pkt, mss)


def sent_by_python_path(pod: Pod, data: bytes) -> tuple[bytes, Any]:
    """``data`` through ``pod``'s Python path: its datagrams, one after the other, and their
    one endpoint."""
    pod.app_sends(data)
    sent, pod.udp.sent = pod.udp.sent, []
    assert sent and len({addr for _, addr in sent}) == 1
    return b"".join(d for d, _ in sent), sent[0][1]


@pytest.mark.parametrize("ecn", [False, True], ids=["tcpv4", "tcpv4-ecn"])
@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
@pytest.mark.parametrize("kind", LANES)
def test_a_super_packet_out_is_the_python_paths_datagrams_and_state(kind, policy, ecn):
    lab = Lab(policy)
    a = lab.a
    data = super_frame(3500, 1000)  # four segments, the last 500 bytes
    if ecn:
        data = data[:1] + bytes((data[1] | 0x80,)) + data[2:]
    lab.now += 0.5
    a.clock.now = lab.now
    before = state(a, B2)
    reference, endpoint = sent_by_python_path(a, data)
    after = state(a, B2)
    assert after["counter"] == before["counter"] + 4
    assert (
        after["stats"][Counter.SUPER_PACKETS_SPLIT]
        == before["stats"].get(Counter.SUPER_PACKETS_SPLIT, 0) + 1
    )
    restore(a, B2, before)
    got = lab.lane(a, kind).outbound(data, lab.now)
    assert got == (reference, endpoint)
    assert state(a, B2) == after
    # the receiver's Python path opens all four (the replies' side of the same bytes)
    b2 = lab.b2
    b2.tun.written = []
    size = 20 + 20 + 1000 + 32
    for at in range(0, len(reference), size):
        b2.udp.inbox.append(([reference[at : at + size]], endpoint))
    b2.proxy._on_udp()
    payload = b"".join(bytes(IP(w)[TCP].payload) for _, w in b2.tun.written)
    assert payload == bytes(i % 251 for i in range(3500))


@pytest.mark.parametrize("kind", LANES)
def test_a_super_packet_the_lane_cannot_take_is_handed_back_and_changes_nothing(kind):
    lab = Lab()
    a = lab.a
    lane = lab.lane(a, kind)
    saved = state(a, B2)
    mtu = a.proxy.config.mtu
    refused = [
        super_frame(3500, 1000, "FA"),  # FIN: conntrack's
        super_frame(3500, 1000, "S"),
        super_frame(3500, mtu - 39),  # a segment above the MTU
        super_frame(65 * 100, 100),  # more than MAX_SEGMENTS segments
        super_frame(3500, 1000, sport=40001),  # a flow the lane has not learnt
        super_frame(3500, 0),  # gso_size 0
    ]
    for data in refused:
        assert lane.outbound(data, lab.now) is None
    assert state(a, B2) == saved
    # a super-packet whose last segment would reach the re-key point: the Python path's, which
    # sends it and starts the re-key (its first segments alone would not have)
    s = a.proxy.tunnel.table.by_addr[B2].current
    assert s is not None
    limits = a.proxy.tunnel.limits
    s.send_counter = limits.rekey_after_messages - 4
    saved = state(a, B2)
    assert lane.outbound(super_frame(3500, 1000), lab.now) is None  # counters c .. c + 3
    assert state(a, B2) == saved
    assert lane.outbound(super_frame(2500, 1000), lab.now) is not None  # c .. c + 2: below
    assert s.send_counter == limits.rekey_after_messages - 1
    assert lane.outbound(super_frame(64 * 100, 100), lab.now) is None  # now the Python path's


@pytest.mark.parametrize("kind", LANES)
def test_a_super_packet_of_max_segments_is_the_lanes(kind):
    lab = Lab()
    got = lab.lane(lab.a, kind).outbound(super_frame(64 * 100, 100), lab.now)
    assert got is not None and len(got[0]) == 64 * (20 + 20 + 100 + 32)


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
def test_the_two_lanes_agree_on_mutated_super_packets():
    lab = Lab()
    a = lab.a
    pure, c = lab.lane(a, "python"), lab.lane(a, "c")
    rng = random.Random(2)
    base = super_frame(2500, 1000)
    for _ in range(300):
        data = mutated(rng, base, range(0, 10 + 40))
        lanes_agree(a, B2, pure, c, "outbound", data, lab.now)


def reply_run(lab: Lab, payload: int = 3500, mss: int = 1000) -> tuple[bytes, int, Any]:
    """B2's answer as one GRO read at A: B2's app writes a super-packet, B2's Python path
    seals its segments; their datagrams back to back, their size, B2's endpoint at A."""
    body = bytes(i % 241 for i in range(payload))
    pkt = IP(src=B2, dst=A, id=9) / TCP(sport=8080, dport=40000, flags="PA", seq=5000) / body
    data, _ = sent_by_python_path(lab.b2, tso_frame(pkt, mss))
    return data, 20 + 20 + mss + 32, lab.a.proxy.tunnel.table.by_addr[B2].endpoint


def python_path_run(pod: Pod, peer_ip: str, data: bytes, size: int, addr: Any) -> Any:
    """``data`` (one GRO read) through ``pod``'s Python path: the frames written to tenc0
    and the state after; the state is put back."""
    before = state(pod, peer_ip)
    pod.tun.written = []
    pod.udp.inbox.append(([data[at : at + size] for at in range(0, len(data), size)], addr))
    pod.proxy._on_udp()
    frames = [hdr + written for hdr, written in pod.tun.written]
    after = state(pod, peer_ip)
    restore(pod, peer_ip, before)
    return frames, after


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
@pytest.mark.parametrize("kind", LANES)
def test_a_gro_read_in_is_the_python_paths_frames_and_state(kind, policy):
    lab = Lab(policy)
    a = lab.a
    data, size, addr = reply_run(lab)
    lab.now += 0.25
    a.clock.now = lab.now
    frames, after = python_path_run(a, B2, data, size, addr)
    assert len(frames) == 1 and frames[0][1] == 1  # one TSO frame of the four segments
    assert (
        after["stats"][Counter.PACKETS_OPENED]
        - state(a, B2)["stats"].get(Counter.PACKETS_OPENED, 0)
        == 4
    )
    got = lab.lane(a, kind).inbound_run(data, size, addr, lab.now)
    assert got == (frames, 4)
    assert state(a, B2) == after
    assert frames[0][10 + 12 : 10 + 16] == socket.inet_aton(VIP)  # the app sees the Service
    assert lab.lane(a, kind).inbound_run(data, size, addr, lab.now) is None  # now replays


def second_connection(lab: Lab, sport: int = 40001) -> None:
    """A's second connection through the VIP to B2 (the same peer, the same session), learnt
    by both lanes as the first one."""
    a, b2, wire = lab.a, lab.b2, lab.wire
    a.app_sends(frame(tcp(A, VIP, sport, 80, "S")))
    wire.pump()
    b2.app_sends(frame(tcp(B2, A, 8080, sport, "SA")))
    wire.pump()
    a.app_sends(frame(tcp(A, VIP, sport, 80, "A")))
    wire.pump()
    b2.app_sends(frame(tcp(B2, A, 8080, sport, "PA")))
    wire.pump()
    a.udp.sent, b2.udp.sent = [], []


def answer(lab: Lab, dport: int, seq: int) -> bytes:
    """B2's app answers on connection ``dport`` with two full segments: B2's datagrams."""
    body = bytes(i % 239 for i in range(2000))
    pkt = IP(src=B2, dst=A) / TCP(sport=8080, dport=dport, flags="A", seq=seq) / body
    return sent_by_python_path(lab.b2, tso_frame(pkt, 1000))[0]


@pytest.mark.parametrize("kind", LANES)
def test_a_gro_read_of_two_interleaved_connections_is_taken_group_by_group(kind):
    lab = Lab()
    second_connection(lab)
    a = lab.a
    data = answer(lab, 40000, 5000) + answer(lab, 40001, 7000) + answer(lab, 40000, 7000)
    size = 20 + 20 + 1000 + 32
    addr = a.proxy.tunnel.table.by_addr[B2].endpoint
    lab.now += 0.25
    a.clock.now = lab.now
    frames, after = python_path_run(a, B2, data, size, addr)
    assert [f[1] for f in frames] == [1, 1, 1]  # three TSO frames of two segments each
    got = lab.lane(a, kind).inbound_run(data, size, addr, lab.now)
    assert got == (frames, 6)
    assert state(a, B2) == after


@pytest.mark.parametrize("kind", LANES)
def test_a_gro_read_whose_second_flow_the_lane_does_not_know_hands_back_the_rest(kind):
    lab = Lab()
    second_connection(lab)
    a = lab.a
    first, rest = answer(lab, 40000, 5000), answer(lab, 40001, 7000)
    size = 20 + 20 + 1000 + 32
    addr = a.proxy.tunnel.table.by_addr[B2].endpoint
    e = a.proxy.express
    assert e is not None
    e.inn.pop(key13(tcp(B2, A, 8080, 40001, "A")))  # as if not learnt (yet)
    lab.now += 0.25
    a.clock.now = lab.now
    frames, after = python_path_run(a, B2, first, size, addr)  # what the lane may take
    got = lab.lane(a, kind).inbound_run(first + rest, size, addr, lab.now)
    assert got == (frames, 2)  # the first group; the second flow's two go back
    assert state(a, B2) == after


@pytest.mark.parametrize("kind", LANES)
def test_a_gro_read_the_lane_cannot_take_is_handed_back_and_changes_nothing(kind):
    lab = Lab()
    a = lab.a
    lane = lab.lane(a, kind)
    data, size, addr = reply_run(lab)
    saved = state(a, B2)
    d = [data[at : at + size] for at in range(0, len(data), size)]
    flipped = bytearray(data)
    flipped[size + 40] ^= 1  # the second datagram's tag fails
    refused = [
        (bytes(flipped), size),
        (d[0] + d[0] + d[2] + d[3], size),  # a replay within the read
        (d[1] + d[0] + d[2] + d[3], size),  # out of order
        (d[0], size),  # one datagram: inbound's
        (data, size - 1),  # cut at the wrong size
        (data, 0),
        (d[0] * 65, size),  # more than MAX_SEGMENTS
    ]
    for bad, cut in refused:
        assert lane.inbound_run(bad, cut, addr, lab.now) is None
    assert lane.inbound_run(data, size, ("10.9.9.9", 1337), lab.now) is None  # not the peer
    assert state(a, B2) == saved


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
def test_the_two_lanes_agree_on_mutated_gro_reads():
    lab = Lab()
    a = lab.a
    pure, c = lab.lane(a, "python"), lab.lane(a, "c")
    data, size, addr = reply_run(lab, 2500)
    rng = random.Random(3)
    for _ in range(200):
        lanes_agree(a, B2, pure, c, "inbound_run", mutated(rng, data), size, addr, lab.now)
    lanes_agree(a, B2, pure, c, "inbound_run", data, size, addr, lab.now)


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
def test_the_two_lanes_agree_on_mutated_frames_and_datagrams():
    lab = Lab()
    a = lab.a
    pure, c = lab.lane(a, "python"), lab.lane(a, "c")
    rng = random.Random(1)
    base = frame(tcp(A, VIP, 40000, 80, "PA"))
    for _ in range(300):
        data = mutated(rng, base)
        lanes_agree(a, B2, pure, c, "outbound", data, lab.now)


def test_a_syn_forgets_the_flow_and_a_new_membership_flushes_the_lane():
    lab = Lab()
    a = lab.a
    e = a.proxy.express
    assert e is not None and e.out
    a.app_sends(frame(tcp(A, VIP, 40000, 80, "S")))  # the tuple is reused: may choose again
    assert key13(tcp(A, VIP, 40000, 80, "A")) not in e.out and not e.inn
    a.app_sends(frame(tcp(A, VIP, 40000, 80, "A")))
    assert e.out
    a.set_members(members(B1, B2, generation=2))
    assert not e.out and not e.inn and not e.slots


@pytest.mark.parametrize("kind", LANES)
def test_a_retired_session_is_never_used_by_the_lane(kind):
    lab = Lab()
    a = lab.a
    lane = lab.lane(a, kind)
    s = a.proxy.tunnel.table.by_addr[B2].current
    assert s is not None
    data = frame(tcp(A, VIP, 40000, 80, "PA"))
    saved = state(a, B2)
    assert lane.outbound(data, s.expires_at) is None  # expired: Python's path re-keys
    s.initiator, rekey_at = True, s.rekey_at
    assert lane.outbound(data, rekey_at) is None  # this packet would start the re-key
    assert state(a, B2) == saved
    peer = a.proxy.tunnel.table.by_addr[B2]
    peer.current = None  # retired (a re-key installs another)
    assert lane.outbound(data, lab.now) is None
    peer.current = s
    assert state(a, B2) == saved


@contextlib.contextmanager
def pump_rig(gro: bool = False) -> Iterator[tuple[socket.socket, ...]]:
    """Descriptors for the pumps: tenc0 as a datagram socketpair (the app's end, the proxy's),
    the proxy's UDP socket and the peer's (``sink``; with ``gro``: UDP_GRO reads), both bound
    on loopback; closed after the block."""
    tun_app, tun_proxy = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for sock in (tun_app, tun_proxy):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        if gro:
            sink.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
        for sock in (tun_proxy, udp, sink):
            sock.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        sink.bind(("127.0.0.1", 0))
        yield tun_app, tun_proxy, udp, sink
    finally:
        for sock in (tun_app, tun_proxy, udp, sink):
            sock.close()


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
def test_the_pumps_send_what_they_take_and_hand_back_the_rest_in_order():
    lab = Lab()
    a = lab.a
    lane = lab.lane(a, "c")
    with pump_rig() as (tun_app, tun_proxy, udp, sink):
        peer = a.proxy.tunnel.table.by_addr[B2]
        peer.endpoint = sink.getsockname()  # the peer proxy, on loopback
        data = frame(tcp(A, VIP, 40000, 80, "PA"))
        syn = frame(tcp(A, VIP, 40002, 80, "S"))
        for f in (data, data, syn, data):
            tun_app.send(f)
        back, dropped = lane.pump_tun(tun_proxy.fileno(), udp.fileno(), lab.now, 64, 0)
        assert back == [syn] and dropped == 0  # the SYN stops the pump; the last waits
        got = [sink.recv(2048), sink.recv(2048)]
        first = counter_of(got[0])
        assert counter_of(got[1]) == first + 1 and peer.current.send_counter == first + 2
        back, _ = lane.pump_tun(tun_proxy.fileno(), udp.fileno(), lab.now, 64, 0)
        assert back == [] and len(sink.recv(2048)) == len(data) - 10 + 32
        # a lone small frame, cold: no second read
        tun_app.send(data)
        tun_app.send(data)
        back, _ = lane.pump_tun(tun_proxy.fileno(), udp.fileno(), lab.now, 64, 256)
        assert back == [] and tun_proxy.recv(2048) == data  # the second is still queued
        assert len(sink.recv(2048)) == len(data) - 10 + 32  # the first went out
        # inbound: B2's datagram from the peer's endpoint goes to tenc0, a stranger's back
        b2 = lab.b2
        b2.app_sends(frame(tcp(B2, A, 8080, 40000, "PA")))
        [(datagram, _)] = b2.udp.sent
        peer.endpoint = udp.getsockname()  # the peer sends from here
        want = lab.lane(a, "python")
        saved = state(a, B2)
        expected = want.inbound(datagram, peer.endpoint, lab.now)
        restore(a, B2, saved)
        udp.sendto(datagram, sink.getsockname())
        udp.sendto(b"\x01junk", sink.getsockname())
        back, errors = lane.pump_udp(sink.fileno(), tun_proxy.fileno(), lab.now, 64, 0)
        assert errors == 0 and back == [(b"\x01junk", 0, False, udp.getsockname())]
        assert expected is not None and tun_app.recv(70000) == expected
        assert a.stats.get(Counter.PACKETS_OPENED.value) >= 1


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
def test_the_pump_sends_a_super_packet_as_the_pure_lanes_datagrams_in_gso_runs():
    lab = Lab()
    a = lab.a
    lane = lab.lane(a, "c")
    with pump_rig() as (tun_app, tun_proxy, udp, sink):
        peer = a.proxy.tunnel.table.by_addr[B2]
        peer.endpoint = sink.getsockname()
        # 50 segments of 1300 bytes: 1372-byte datagrams, 47 to a UDP GSO send, so two sends
        data = super_frame(65000, 1300)
        saved = state(a, B2)
        want = lab.lane(a, "python").outbound(data, lab.now)
        after = state(a, B2)
        restore(a, B2, saved)
        assert want is not None
        tun_app.send(data)
        back, dropped = lane.pump_tun(tun_proxy.fileno(), udp.fileno(), lab.now, 64, 0)
        assert back == [] and dropped == 0
        got = []
        while True:
            try:
                got.append(sink.recv(2048))
            except BlockingIOError:
                break
        assert len(got) == 50 and {len(d) for d in got[:-1]} == {1372}
        assert b"".join(got) == want[0]
        assert state(a, B2) == after and lane.counts()[0] == 50


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
def test_the_pump_opens_a_gro_read_into_the_pure_lanes_frames():
    lab = Lab()
    a = lab.a
    lane = lab.lane(a, "c")
    data, size, _ = reply_run(lab)
    with pump_rig(gro=True) as (tun_app, tun_proxy, udp, sink):
        peer = a.proxy.tunnel.table.by_addr[B2]
        peer.endpoint = udp.getsockname()  # B2's proxy sends from here
        saved = state(a, B2)
        want = lab.lane(a, "python").inbound_run(data, size, peer.endpoint, lab.now)
        after = state(a, B2)
        restore(a, B2, saved)
        assert want is not None and len(want[0]) == 1
        segment = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        udp.sendmsg([data], segment, 0, sink.getsockname())  # one GSO send: one GRO read
        back, errors = lane.pump_udp(sink.fileno(), tun_proxy.fileno(), lab.now, 64, 0)
        assert back == [] and errors == 0
        assert tun_app.recv(70000) == want[0][0]
        assert state(a, B2) == after and lane.counts()[1] == 4


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
def test_the_pump_writes_the_groups_it_takes_and_hands_back_the_rest_of_the_read():
    lab = Lab()
    second_connection(lab)
    a = lab.a
    lane = lab.lane(a, "c")
    first, rest = answer(lab, 40000, 5000), answer(lab, 40001, 7000)
    size = 20 + 20 + 1000 + 32
    e = a.proxy.express
    assert e is not None
    e.inn.pop(key13(tcp(B2, A, 8080, 40001, "A")))  # the second flow: the Python path's
    with pump_rig(gro=True) as (tun_app, tun_proxy, udp, sink):
        peer = a.proxy.tunnel.table.by_addr[B2]
        peer.endpoint = udp.getsockname()
        saved = state(a, B2)
        want = lab.lane(a, "python").inbound_run(first + rest, size, peer.endpoint, lab.now)
        restore(a, B2, saved)
        assert want is not None and want[1] == 2
        segment = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        udp.sendmsg([first + rest], segment, 0, sink.getsockname())
        back, errors = lane.pump_udp(sink.fileno(), tun_proxy.fileno(), lab.now, 64, 0)
        assert errors == 0 and back == [(rest, size, False, udp.getsockname())]
        assert [tun_app.recv(70000) for _ in want[0]] == want[0]


class WaitRig:
    """``Lane.wait`` on real descriptors: A's compiled lane (``Lab``), tenc0 as a datagram
    socketpair (``tun_app`` is the pod's side), the tunnel socket ``udp`` and the peer proxy
    ``sink`` on loopback, another descriptor (``other_a``; ``other_b`` writes to it), and one
    epoll watching tenc0, ``other_a`` and, if ``with_udp``, the tunnel socket."""

    def __init__(self, with_udp: bool) -> None:
        self.lab = Lab()
        self.a = self.lab.a
        self.lane = self.lab.lane(self.a, "c")
        self.tun_app, self.tun_proxy = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.other_a, self.other_b = socket.socketpair()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ep = select.epoll()
        for sock in (self.tun_proxy, self.udp, self.sink, self.other_a):
            sock.setblocking(False)
        for sock in (self.tun_proxy, self.other_a) + ((self.udp,) if with_udp else ()):
            self.ep.register(sock.fileno(), select.EPOLLIN)
        self.udp.bind(("127.0.0.1", 0))
        self.sink.bind(("127.0.0.1", 0))
        self.peer = self.a.proxy.tunnel.table.by_addr[B2]
        self.peer.endpoint = self.sink.getsockname()
        self.fds = (self.tun_proxy.fileno(), self.udp.fileno())

    def wait(
        self, timeout: float | None, udp_ok: bool = True, spin: float = 0.0, quiet: float = 0.0
    ) -> list[tuple[int, int]]:
        args = (*self.fds, udp_ok, 64, 256, self.lab.now, spin, quiet)
        return self.lane.wait(self.ep.fileno(), timeout, 8, *args)

    def close(self) -> None:
        self.ep.close()
        for sock in (self.tun_app, self.tun_proxy, self.udp, self.sink, self.other_a):
            sock.close()
        self.other_b.close()


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
def test_wait_serves_the_lanes_readiness_in_c_and_returns_only_what_python_must_see():
    """``Lane.wait`` (tencrypt/_lane.c, linux/spin.py rule 5) on real descriptors: a frame the
    lane takes goes out inside the call; a frame it hands back makes it return the descriptor,
    and the next pump returns that frame first, without reading (order kept); another
    descriptor, or the socket while ``udp_ok`` is false, is returned untouched."""
    rig = WaitRig(with_udp=True)
    lane, fds, now, sink = rig.lane, rig.fds, rig.lab.now, rig.sink
    try:
        data = frame(tcp(A, VIP, 40000, 80, "PA"))
        syn = frame(tcp(A, VIP, 40002, 80, "S"))
        assert rig.wait(0.0) == []  # nothing ready: the timeout
        rig.tun_app.send(data)
        assert rig.wait(0.0) == []  # taken in C: sealed and sent inside the call
        first = counter_of(sink.recv(2048))
        assert rig.peer.current.send_counter == first + 1
        # a lone small frame, then a SYN behind it: the first wake-up is served in C, the
        # second (epoll again, level-triggered) hands the SYN back: one wake-up without Python
        for f in (data, syn, data):
            rig.tun_app.send(f)
        woken = lane.woken()
        assert rig.wait(5.0) == [(fds[0], select.EPOLLIN)]
        assert lane.woken() == woken + 1
        assert counter_of(sink.recv(2048)) == first + 1
        back, dropped = lane.pump_tun(fds[0], fds[1], now, 64, 0)
        assert back == [syn] and dropped == 0  # kept by wait, returned first, nothing read
        assert rig.tun_proxy.recv(2048) == data  # still queued behind it
        # the socket while udp_ok is false, and any other descriptor: returned untouched
        sink.sendto(b"\x01junk", rig.udp.getsockname())
        rig.other_b.send(b"x")
        got = rig.wait(0.0, udp_ok=False)
        assert sorted(got) == sorted([(fds[1], select.EPOLLIN), (rig.other_a.fileno(), 1)])
        # with udp_ok the lane reads it, cannot take it, keeps it for pump_udp, as read
        rig.other_a.recv(16)
        assert rig.wait(0.0) == [(fds[1], select.EPOLLIN)]
        with pytest.raises(BlockingIOError):
            rig.udp.recv(2048)  # the lane read it
        back, errors = lane.pump_udp(fds[1], fds[0], now, 0, 0)
        assert back == [(b"\x01junk", 0, False, sink.getsockname())] and errors == 0
        assert lane.pump_udp(fds[1], fds[0], now, 0, 0) == ([], 0)  # returned once
    finally:
        rig.close()


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
@pytest.mark.parametrize("quiet", [0.0, 0.5])
def test_wait_reads_a_stream_until_eagain_and_a_lone_packet_alone(quiet):
    """daemon.py READS inside ``Lane.wait``: cold (not served within ``quiet``), a lone small
    frame is read alone; served again within ``quiet`` (hot: a stream, a bulk transfer's
    ACKs), the pump reads what is queued. 0.5 s is far longer than this takes."""
    rig = WaitRig(with_udp=False)
    try:
        data = frame(tcp(A, VIP, 40000, 80, "PA"))
        for _ in range(3):
            rig.tun_app.send(data)
        assert rig.wait(0.0, quiet=quiet) == []  # cold: the first frame alone
        assert rig.lane.counts()[0] == 1
        assert rig.wait(0.0, quiet=quiet) == []
        assert rig.lane.counts()[0] == (3 if quiet else 2)  # hot: both queued ones at once
    finally:
        rig.close()


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
def test_wait_polls_within_the_spin_window_after_an_event_and_never_at_idle():
    """linux/spin.py's rules 1-3 inside ``Lane.wait`` (rule 5): idle (no event within
    ``spin``), a wait blocks without polling; a packet the lane sent to the network opens no
    window (its answer is a network round trip away); after any other event the next wait
    polls until its timeout, which cuts the window (so the budget stays); spin 0 never
    polls. The window (0.5 s) is far longer than anything here takes: no timing asserted."""
    rig = WaitRig(with_udp=False)
    lane = rig.lane
    try:
        data = frame(tcp(A, VIP, 40000, 80, "PA"))
        assert rig.wait(0.01) == [] and lane.spin_stats()[0] == 0  # spin 0: plain epoll
        assert rig.wait(0.01, spin=0.5) == [] and lane.spin_stats() == (0, 0, 0, 0.5)  # idle
        rig.tun_app.send(data)
        assert rig.wait(0.0, spin=0.5) == []  # served in C: sent to the network
        assert len(rig.sink.recv(2048)) == len(data) - 10 + 32
        assert rig.wait(0.02, spin=0.5) == [] and lane.spin_stats()[0] == 0  # no window
        rig.other_b.send(b"x")
        assert rig.wait(0.0, spin=0.5) == [(rig.other_a.fileno(), select.EPOLLIN)]  # an event
        rig.other_a.recv(16)
        assert rig.wait(0.02, spin=0.5) == []
        polls, misses, grown, budget = lane.spin_stats()
        assert polls > 0 and misses == 0 and budget == 0.5  # the timeout cut the window
    finally:
        rig.close()


def test_a_lane_that_raises_in_the_wait_stops_and_the_loop_lives_on():
    """daemon._lane_wait: an exception from the lane (a bug) is counted, stops the lane and
    detaches its wait from the selector; the loop gets an empty result, not the exception."""
    from tencrypt.linux.spin import SpinSelector

    class Broken:
        def wait(self, *args: object) -> list[tuple[int, int]]:
            raise RuntimeError("boom")

    a = Lab().a
    proxy = a.proxy
    proxy.selector = SpinSelector(0.0)
    proxy.lane = Broken()
    proxy.selector.wait = proxy._lane_wait
    try:
        assert proxy.selector.select(0) == []
        assert proxy.lane is None and proxy.express is None and proxy.selector.wait is None
        assert a.stats.get(Counter.EXPRESS_FAILURES.value) == 1
    finally:
        proxy.selector.close()


@pytest.mark.parametrize("kind", LANES)
def test_with_a_policy_the_lane_touches_the_policy_flow_and_stops_when_it_is_blocked(kind):
    lab = Lab(policy=True)
    a = lab.a
    netpol = a.proxy.dispatch.netpol
    assert netpol.policy is not None
    [(key, flow)] = [(k, f) for k, f in netpol._idle.flows.items() if k[4] == 8080]
    lane = lab.lane(a, kind)
    data = frame(tcp(A, VIP, 40000, 80, "PA"))
    lab.now += 1.0
    assert lane.outbound(data, lab.now) is not None
    assert flow.last_seen == lab.now  # touched, as netpol.outbound touches it
    flow.decision = None  # a newer policy blocks the flow (policyflows rule 5)
    saved = state(a, B2)
    assert lane.outbound(data, lab.now + 1) is None
    assert state(a, B2) == saved
    a.app_sends(data)  # the Python path drops it, counted
    assert a.stats.dropped(DropReason.NETWORK_POLICY) == 1


def test_a_new_session_of_the_peer_drops_the_old_ones_entries_and_the_tables_are_bounded(
    monkeypatch,
):
    from tencrypt.core import express

    lab = Lab()
    a = lab.a
    e = a.proxy.express
    assert e is not None
    peer = a.proxy.tunnel.table.by_addr[B2]
    old = peer.current
    assert old is not None and old.local_index in e.slots
    new = dataclasses.replace(old, local_index=old.local_index + 1)
    peer.current = new
    assert e.learn(key13(tcp(A, B2, 5555, 8080, "A")), tcp(A, B2, 5555, 8080, "A"), B2, lab.now)
    assert old.local_index not in e.slots and new.local_index in e.slots
    assert list(e.out) == [key13(tcp(A, B2, 5555, 8080, "A"))]  # the VIP flow's went with it
    monkeypatch.setattr(express, "MAX_FLOWS", 3)
    for port in range(6000, 6004):
        packet = tcp(A, B2, port, 8080, "A")
        assert e.learn(key13(packet), packet, B2, lab.now)
        assert len(e.out) <= 3


# ---- ICMP echo (core/express.py rules 2-3) ---------------------------------------------------
PING_VIP, PING_POD = 7, 9  # echo ids: A pings the Service (-> B2), and B2's pod IP


def echo(src: str, dst: str, ident: int, reply: bool = False, seq: int = 1) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident, seq=seq) / PAYLOAD)


def in4_chksum_ok(packet: bytes) -> bool:
    """The ICMP checksum of an IPv4 packet with a 20-byte header sums to 0xFFFF."""
    total = sum(int.from_bytes(packet[i : i + 2], "big") for i in range(20, len(packet) - 1, 2))
    if len(packet) % 2:
        total += packet[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


class PingLab(Lab):
    """Lab, then A pings the Service (its echo goes to B2) and B2's pod IP; B2 answers both
    (the flows B2's peer opened: B2's lane learns them from its replies)."""

    def __init__(self, policy: bool = False) -> None:
        super().__init__(policy)
        a, b2, wire = self.a, self.b2, self.wire
        for ident, dst in ((PING_VIP, VIP), (PING_POD, B2)):
            a.app_sends(frame(echo(A, dst, ident)))
            wire.pump()
            b2.app_sends(frame(echo(B2, A, ident, reply=True)))
            wire.pump()


# (pod that sends, its peer, the packet as its app sends it)
PINGS_OUT = {
    "request-to-vip": ("a", B2, echo(A, VIP, PING_VIP, seq=2)),
    "request-to-pod": ("a", B2, echo(A, B2, PING_POD, seq=2)),
    "reply-from-b2": ("b2", A, echo(B2, A, PING_VIP, reply=True, seq=2)),
}
# (pod that sends, pod that receives, the packet as the sender's app sends it, the source
# the receiving app sees)
PINGS_IN = {
    "reply-to-vip-ping": ("b2", "a", echo(B2, A, PING_VIP, reply=True, seq=2), VIP),
    "reply-to-pod-ping": ("b2", "a", echo(B2, A, PING_POD, reply=True, seq=2), B2),
    "request-at-b2": ("a", "b2", echo(A, B2, PING_POD, seq=2), A),
}


def test_echoes_are_learnt_both_ways_on_both_sides():
    lab = PingLab()
    a, b2 = lab.a.proxy.express, lab.b2.proxy.express
    assert a is not None and b2 is not None
    to_vip = key13(echo(A, VIP, PING_VIP))
    assert to_vip == b"\x01" + socket.inet_aton(A) + socket.inet_aton(VIP) + b"\x00\x07\x00\x00"
    assert a.out[to_vip][2:4] == (socket.inet_aton(B2), 0)  # translated to the endpoint
    assert a.inn[key13(echo(B2, A, PING_VIP, reply=True))][:2] == (socket.inet_aton(VIP), 0)
    assert a.out[key13(echo(A, B2, PING_POD))][2] == b""
    assert a.inn[key13(echo(B2, A, PING_POD, reply=True))][0] == b""
    # B2 learnt the flows A opened from its own replies: their requests come in by the lane
    assert key13(echo(B2, A, PING_VIP, reply=True)) in b2.out
    assert key13(echo(A, B2, PING_VIP)) in b2.inn and key13(echo(A, B2, PING_POD)) in b2.inn
    # what ``_retire`` does to a peer's old session: each flow's entries go, the reply's too
    for e in (a, b2):
        for key in [k for k in e.out if k[0] == 1]:
            e.forget(key)
        assert not [k for k in e.inn if k[0] == 1]


@pytest.mark.parametrize("case", list(PINGS_OUT))
@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
@pytest.mark.parametrize("kind", LANES)
def test_an_echo_out_is_the_python_paths_datagram_and_state(kind, policy, case):
    lab = PingLab(policy)
    name, peer_ip, packet = PINGS_OUT[case]
    pod = getattr(lab, name)
    data = frame(packet)
    lab.now += 0.5
    pod.clock.now = lab.now
    before = state(pod, peer_ip)
    pod.app_sends(data)  # the Python path
    [(reference, endpoint)] = pod.udp.sent
    pod.udp.sent = []
    after = state(pod, peer_ip)
    assert after["counter"] == before["counter"] + 1
    restore(pod, peer_ip, before)
    got = lab.lane(pod, kind).outbound(data, lab.now)
    assert got == (reference, endpoint)
    assert state(pod, peer_ip) == after


@pytest.mark.parametrize("case", list(PINGS_IN))
@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
@pytest.mark.parametrize("kind", LANES)
def test_an_echo_in_is_the_python_paths_frame_and_state(kind, policy, case):
    lab = PingLab(policy)
    sender_name, name, packet, seen = PINGS_IN[case]
    sender, pod = getattr(lab, sender_name), getattr(lab, name)
    peer_ip = B2 if name == "a" else A
    datagram, addr, frame_in, after = python_path_in(lab, sender, pod, peer_ip, packet)
    got = lab.lane(pod, kind).inbound(datagram, addr, lab.now)
    assert got == frame_in
    assert state(pod, peer_ip) == after
    written = frame_in[10:]
    assert written[12:16] == socket.inet_aton(seen)  # the app sees whom it pinged
    parsed = IP(written)
    del parsed.chksum  # recomputed by scapy: the rewrite left both checksums right
    assert IP(bytes(parsed)).chksum == IP(written).chksum and in4_chksum_ok(written)


@pytest.mark.parametrize("kind", LANES)
def test_an_echo_the_lane_does_not_take_is_handed_back_and_changes_nothing(kind):
    lab = PingLab()
    a = lab.a
    lane = lab.lane(a, kind)
    saved = state(a, B2)
    good = echo(A, B2, PING_POD, seq=3)
    frames = [
        bytes(IP(src=A, dst=B2) / ICMP(type=3, code=3) / good[:28]),  # an error: related-flow logic
        bytes(IP(src=A, dst=B2) / ICMP(type=8, code=1, id=PING_POD)),  # a code
        bytes(IP(src=A, dst=B2) / ICMP(type=13, id=PING_POD)),  # a timestamp query
        bytes(IP(src=A, dst=B2) / ICMP(type=8, id=0)),  # id 0: request and reply keys coincide
        bytes(IP(src=A, dst=B2, flags="MF") / ICMP(type=8, id=PING_POD) / PAYLOAD),  # fragment
        bytes(IP(src=A, dst=B2, frag=3, proto=1) / good[20:]),  # a later fragment
        good[:27],  # short
        good[:20] + good[20:28],  # total length no longer exact
        echo(A, B2, PING_POD + 1),  # another id: not learnt
    ]
    for data in frames:
        assert lane.outbound(frame(data), lab.now) is None
    assert state(a, B2) == saved
    # the lane takes an echo with a wrong ICMP checksum as the Python path does: untouched
    bad = bytearray(good)
    bad[22] ^= 0xFF
    got = lane.outbound(frame(bytes(bad)), lab.now)
    assert got is not None
    restore(a, B2, saved)
    a.app_sends(frame(bytes(bad)))
    [(reference, _)] = a.udp.sent
    assert got[0] == reference


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
@pytest.mark.parametrize("case", list(PINGS_OUT))
def test_the_two_lanes_agree_on_mutated_echoes(case):
    lab = PingLab(policy=True)
    name, peer_ip, packet = PINGS_OUT[case]
    pod = getattr(lab, name)
    pure, c = lab.lane(pod, "python"), lab.lane(pod, "c")
    rng = random.Random(8)
    base = frame(packet)
    taken = 0
    for _ in range(300):
        data = mutated(rng, base, range(10, 40))
        want = lanes_agree(pod, peer_ip, pure, c, "outbound", data, lab.now)
        taken += want is not None
    assert taken  # some mutations (payload, checksum, sequence) are still the flow's


@pytest.mark.skipif(COMPILED is None or not hasattr(COMPILED, "Lane"), reason="not built")
def test_the_two_lanes_agree_on_mutated_echoes_coming_in():
    from tencrypt.core import fastpath as pure_fastpath

    lab = PingLab(policy=True)
    a = lab.a
    pure, c = lab.lane(a, "python"), lab.lane(a, "c")
    s = lab.b2.proxy.tunnel.table.by_addr[A].current  # B2's session: it seals A's datagrams
    assert s is not None and s.send_key is not None
    addr = a.proxy.tunnel.table.by_addr[B2].endpoint
    rng = random.Random(9)
    base = echo(B2, A, PING_VIP, reply=True, seq=5)
    taken = 0
    for i in range(300):
        plain = mutated(rng, base, range(0, 28))
        datagram = pure_fastpath.seal_batch(
            s.send_key, s.remote_index, s.send_counter + 1000 + i, [plain]
        )
        want = lanes_agree(a, B2, pure, c, "inbound", datagram, addr, lab.now)
        taken += want is not None
    assert taken  # the payload, the sequence, the checksum: still the flow's
