"""``Tunnel.send_batch`` / ``receive_batch`` through each backend (None: one AEAD call per
packet; core/fastpath.py; the compiled tencrypt._fastpath): the same datagrams on the wire,
the same packets delivered, the same counters and drops, the same replay window. Tunnels are
made deterministic (seeded randomness and ephemeral keys) so that twins agree byte for byte.
"""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.core import fastpath as pure
from tencrypt.core import wire
from tencrypt.core.batch import Rows
from tencrypt.core.session import datagrams_of
from tencrypt.core.stats import DropReason
from tests.unit.linked import PORT, A, B, Net, ipv4
from tests.unit.test_fastpath import _EDIT, BACKENDS, COMPILED, REQUIRED, _edit

MODES = [pytest.param(None, id="per-packet"), *BACKENDS]


def twin_net(backend, seed: int = 7) -> Net:
    """Two pods whose randomness is seeded: built twice, they put the same bytes on the wire."""
    net = Net()
    for ip in (A, B):
        r = random.Random(f"{seed}-{ip}")
        net.add(
            ip,
            rng=r.randbytes,
            fastpath=backend,
            keygen=lambda r=r: X25519PrivateKey.from_private_bytes(r.randbytes(32)),
        )
    net.send(A, B, ipv4(A, B, b"hello"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, B, b"hello")]
    return net


def state(net: Net, ip: str) -> tuple:
    """What receiving leaves behind: counters, drops, and every session's replay window."""
    t = net.pods[ip]
    windows = sorted(
        (s.local_index, s.replay.top, bytes(s.replay.ring)) for s in t.table.by_index.values()
    )
    peers = sorted(
        (p.pod_ip, p.endpoint, p.confirmed, p.keepalive_due, p.stale_due, p.claimed)
        + (p.tx_packets, p.tx_bytes, p.rx_packets, p.rx_bytes)  # tencrypt status's figures
        for p in t.table.peers
    )
    return dict(t.stats.counters), dict(t.stats.drops), windows, peers


@pytest.mark.parametrize("backend", MODES)
def test_a_super_packet_goes_through_send_batch_and_receive_batch(backend):
    net = twin_net(backend)
    a, b = net.pods[A], net.pods[B]
    packets = [ipv4(A, B, bytes([i]) * 1400) for i in range(44)] + [ipv4(A, B, b"last")]
    a.send_batch(B, [memoryview(bytearray(p)) for p in packets], net.now, net.wall)
    transmits = a.pop_transmits()
    assert [addr for _, addr in transmits] == [(B, PORT)] * 45
    datagrams = [bytes(d) for d, _ in transmits]
    assert [wire.parse_header(d)[1] for d in datagrams] == list(range(1, 46))
    buf = bytearray(b"".join(datagrams))  # one GRO read: views into one buffer
    views, pos = [], 0
    for d in datagrams:
        views.append(memoryview(buf)[pos : pos + len(d)])
        pos += len(d)
    assert b.receive_batch(views, (A, PORT), net.now, net.wall) == packets
    assert b.stats.get("packets_opened") == 46 and b.stats.get("bytes_opened") == sum(
        map(len, packets)
    ) + len(ipv4(A, B, b"hello"))
    assert b.receive_batch(views, (A, PORT), net.now, net.wall) == []
    assert b.stats.dropped(DropReason.REPLAY) == 45
    # per peer, as tencrypt status shows them: each side's count of the other's inner packets
    sent, got = a.table.by_addr[B], b.table.by_addr[A]
    total = sum(map(len, packets)) + len(ipv4(A, B, b"hello"))
    assert (sent.tx_packets, sent.tx_bytes, got.rx_packets, got.rx_bytes) == (46, total, 46, total)
    assert (sent.claimed, got.claimed) == (B, A) and sent.last_handshake == net.now


@pytest.mark.parametrize("backend", MODES)
def test_receive_batch_hands_handshakes_and_strangers_to_receive(backend):
    net = twin_net(backend)
    a, b = net.pods[A], net.pods[B]
    a.send_batch(B, [ipv4(A, B, b"one"), ipv4(A, B, b"two")], net.now, net.wall)
    one, two = (bytes(d) for d, _ in a.pop_transmits())
    stranger = one[:4] + b"\xff\xff\xff\x7f" + one[8:]  # an index nobody has
    datagrams = [one, b"\x09\x00\x00\x00" + bytes(60), stranger, b"\x04\x00", two]
    got = b.receive_batch(datagrams, (A, PORT), net.now, net.wall)
    assert got == [ipv4(A, B, b"one"), ipv4(A, B, b"two")]
    assert b.stats.dropped(DropReason.UNKNOWN_TYPE) == 1
    assert b.stats.dropped(DropReason.UNKNOWN_INDEX) == 1
    assert b.stats.dropped(DropReason.SHORT) == 1


@pytest.mark.parametrize("backend", MODES)
def test_the_responder_confirms_its_session_on_a_batch(backend):
    """Rule 4 through receive_batch: the first authenticated batch confirms B's session (a
    PeerUp) and flushes nothing more than the one-packet path would."""
    net = Net()
    for ip in (A, B):
        net.add(ip, fastpath=backend)
    net.send(A, B, ipv4(A, B, b"queued"))
    initiation = net.pump(hold=True)
    for datagram, src, dst in initiation:
        net.deliver(datagram, src, dst)
    for datagram, src, dst in net.pump(hold=True):  # the response, to A
        net.deliver(datagram, src, dst)
    data = [d for d, _ in net.pods[A].pop_transmits()]
    b = net.pods[B]
    assert b.pop_events() == []
    assert b.receive_batch(data, (A, PORT), net.now, net.wall) == [ipv4(A, B, b"queued")]
    assert [e.pod_ip for e in b.pop_events()] == [A]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(max_size=80), min_size=1, max_size=30), st.lists(_EDIT, max_size=8))
def test_backends_leave_the_same_state_as_one_packet_at_a_time(payloads, edits):
    if COMPILED is None and REQUIRED:
        pytest.fail("TENCRYPT_REQUIRE_FASTPATH=1 but tencrypt._fastpath is not built")
    backends = [None, pure] + ([COMPILED] if COMPILED is not None else [])
    nets = [twin_net(backend) for backend in backends]
    packets = [ipv4(A, B, p) for p in payloads]
    results = []
    for net in nets:
        a, b = net.pods[A], net.pods[B]
        a.send_batch(B, packets, net.now, net.wall)
        datagrams = _edit([bytes(d) for d, _ in a.pop_transmits()], edits)
        if b.fastpath is None:  # the reference: receive, one datagram at a time
            got = [
                p
                for d in datagrams
                if (p := b.receive(d, (A, PORT), net.now, net.wall)) is not None
            ]
        else:
            got = b.receive_batch(datagrams, (A, PORT), net.now, net.wall)
        results.append((datagrams, got, state(net, B), b.pop_transmits()))
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_super_packet_leaves_as_one_gso_run_with_the_per_packet_bytes(backend):
    """``pop_transmit_runs``: a batch backend hands a super-packet's datagrams over as one run
    (one buffer, one datagram size: UDP GSO's layout, sent without a copy); its datagrams are
    byte for byte those the one-call-per-packet path puts on the wire as single entries. Small
    packets of different sizes stay single entries."""
    packets = [ipv4(A, B, bytes([i]) * 1400) for i in range(44)] + [ipv4(A, B, b"last")]
    wires = {}
    for mode in (None, backend):
        net = twin_net(mode)
        net.pods[A].send_batch(B, packets, net.now, net.wall)
        wires[mode] = net.pods[A].pop_transmit_runs()
    [(data, endpoint, size)] = wires[backend]
    assert endpoint == (B, PORT) and size == len(packets[0]) + wire.DATA_OVERHEAD
    assert len(data) == sum(map(len, packets)) + 45 * wire.DATA_OVERHEAD
    assert [s for _, _, s in wires[None]] == [0] * 45
    assert [bytes(d) for d, _ in datagrams_of(wires[backend])] == [
        bytes(d) for d, _, _ in wires[None]
    ]
    net = twin_net(backend)
    net.pods[A].send_batch(B, [ipv4(A, B, b"a" * 100), ipv4(A, B, b"b" * 300)], net.now, net.wall)
    assert [s for _, _, s in net.pods[A].pop_transmit_runs()] == [0, 0]


@pytest.mark.parametrize("backend", MODES)
def test_an_empty_batch_sends_nothing_and_changes_nothing(backend):
    """A super-packet the split refused arrives as no segments at all."""
    net = twin_net(backend)
    a = net.pods[A]
    before = state(net, A)
    a.send_batch(B, [], net.now, net.wall)
    assert a.pop_transmit_runs() == [] and state(net, A) == before


def rows_of(packets: list[bytes], stride: int) -> Rows:
    """Packets of equal size but a shorter last, one every ``stride`` bytes of one buffer."""
    buf = bytearray(stride * len(packets))
    for i, p in enumerate(packets):
        buf[i * stride : i * stride + len(p)] = p
    return Rows(buf, stride, len(packets[0]), len(packets), len(packets[-1]))


@pytest.mark.parametrize("backend", MODES)
@pytest.mark.parametrize("count", [1, 45])
def test_rows_go_through_the_tunnel_as_their_views(backend, count):
    """A super-packet's segments as ``Rows`` (padded rows) and a GRO read as ``Rows``: the
    same runs on the wire and the same packets, counters and window as their lists."""
    packets = [ipv4(A, B, bytes([i]) * 1401) for i in range(count - 1)] + [ipv4(A, B, b"end")]
    results = []
    for form in (list, lambda p: rows_of(p, 1448)):
        net = twin_net(backend)
        a, b = net.pods[A], net.pods[B]
        a.send_batch(B, form(packets), net.now, net.wall)
        runs = [(bytes(d), e, size) for d, e, size in a.pop_transmit_runs()]
        datagrams = [bytes(d) for d, _ in datagrams_of(runs)]
        read = list if len(datagrams) == 1 else lambda d: rows_of(d, len(d[0]))
        for batch in (read(datagrams), read(datagrams)):  # the second: every one a replay
            results.append(b.receive_batch(batch, (A, PORT), net.now, net.wall))
        results.append((runs, state(net, A), state(net, B)))
    assert results[:3] == results[3:]
    assert results[0] == packets and results[1] == []
