"""core/batch.py rule 2a and rule 6 for TCP over IPv6, against scapy (an independent IPv6/TCP
implementation that computes the payload length and the RFC 8200 §8.1 pseudo-header checksum
itself) and against a checksum recomputed here by hand.

Expected segments are what the kernel's TSO6 makes of a super-packet (net/ipv6/ip6_offload.c
``ipv6_gso_segment`` around net/ipv4/tcp_offload.c ``tcp_gso_segment``): every header field
copied, the payload length per segment, seq advanced, FIN/PSH on the last, CWR on the first.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.all import TCP, UDP, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, raw

from tencrypt.core import batch
from tencrypt.core.batch import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VnetHdr,
    build_gso_vnet_hdr,
    build_vnet_hdr,
    coalesce_batch,
    parse_vnet_hdr,
    rewrite_partial_csum,
    segmentable,
    split_tcp_batch,
)
from tencrypt.core.stats import DropReason, Stats
from tests.unit import test_batch as tb

TS = tb.TS
FLAG_SETS = tb.FLAG_SETS
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SRC6, DST6 = "fd00:10:1::1", "fd00:10:2::2"


# --- helpers ------------------------------------------------------------------------------------


def tcp6_packet(
    payload,
    *,
    seq=1000,
    flags="A",
    options=(),
    tc=0,
    fl=0,
    hlim=64,
    src=SRC6,
    dst=DST6,
    sport=40000,
    dport=80,
    ack=99,
    ext=None,
):
    ip = IPv6(src=src, dst=dst, tc=tc, fl=fl, hlim=hlim)
    if ext is not None:
        ip = ip / ext
    tcp = TCP(
        sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=501, options=list(options)
    )
    return ip / tcp / payload


def fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def words(data: bytes) -> int:
    data = data + b"\0" * (len(data) & 1)
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def pseudo6(pkt: bytes) -> int:
    """RFC 8200 §8.1: source, destination, upper-layer length (32 bits), next header 6."""
    return words(pkt[8:40]) + (len(pkt) - 40) + 6


def assert_tcp6_checksum_valid(pkt: bytes) -> None:
    """Recomputed here in full, independent of core/batch.py: the sum over the pseudo-header
    and the whole TCP segment, its checksum field included, folds to 0xFFFF."""
    assert fold(pseudo6(pkt) + words(pkt[40:])) == 0xFFFF


def partial6(pkt_bytes: bytes) -> bytes:
    """The packet as the kernel hands it under NEEDS_CSUM: TCP field = pseudo-header sum."""
    buf = bytearray(pkt_bytes)
    struct.pack_into("!H", buf, 56, fold(pseudo6(bytes(buf))) or 0xFFFF)
    return bytes(buf)


def tso6_frame(pkt, mss, *, ecn=False, gso=VIRTIO_NET_HDR_GSO_TCPV6):
    wire = partial6(raw(pkt))
    hdr = VnetHdr(
        VIRTIO_NET_HDR_F_NEEDS_CSUM, gso | (VIRTIO_NET_HDR_GSO_ECN if ecn else 0), 0, mss, 40, 16
    )
    return build_vnet_hdr(hdr) + wire


def kernel_segments6(pkt, mss):
    """What TSO6 makes of ``pkt``: scapy-built, payload length and checksum scapy's."""
    payload = bytes(pkt[TCP].payload)
    chunks = [payload[i : i + mss] for i in range(0, len(payload), mss)] or [b""]
    flags = int(pkt[TCP].flags)
    out = []
    for i, chunk in enumerate(chunks):
        f = flags
        if i < len(chunks) - 1:
            f &= ~(batch.FIN | batch.PSH)
        if i > 0:
            f &= ~batch.CWR
        seg = pkt.copy()
        seg[TCP].seq = (pkt[TCP].seq + i * mss) & 0xFFFFFFFF
        seg[TCP].flags = f
        seg[TCP].remove_payload()
        seg = seg / chunk
        del seg[IPv6].plen, seg[TCP].chksum
        out.append(raw(seg))
    return out


def split(frame, out=None):
    stats = Stats()
    return [bytes(s) for s in split_tcp_batch(frame, stats, out)], stats


SUPER6 = {
    "n": st.integers(1, 50),
    "mss": st.integers(1, 1440),
    "cut": st.integers(0, 1439),
    "flags": st.sampled_from(FLAG_SETS),
    "ts": st.booleans(),
    "seq": st.integers(0, 2**32 - 1),
    "tc": st.integers(0, 255),
    "fl": st.integers(0, 0xFFFFF),
}


def super6(n, mss, cut, flags, ts, seq, tc, fl):
    size = max(1, n * mss - cut % mss)
    hlen = 40 + (32 if ts else 20)
    assume(hlen + size <= 65535)
    pkt = tcp6_packet(
        os.urandom(size), seq=seq, flags=flags, options=TS if ts else (), tc=tc, fl=fl
    )
    return pkt, hlen


# --- split (rule 2a) ----------------------------------------------------------------------------


def test_split_of_a_64k_ipv6_super_packet_equals_the_kernels_segments():
    payload = os.urandom(65535 - 40 - 32)
    pkt = tcp6_packet(payload, seq=0xFFFFFF00, flags="PA", options=TS, tc=0xB8, fl=0xABCDE)
    segments, stats = split(tso6_frame(pkt, 1428))
    assert segments == kernel_segments6(pkt, 1428) and not stats.drops
    assert len(segments) == 46
    assert b"".join(s[72:] for s in segments) == payload
    for seg in segments:
        assert_tcp6_checksum_valid(seg)
        assert seg[:4] == raw(pkt)[:4] and seg[6:40] == raw(pkt)[6:40]  # tc, flow label, hlim


@given(**SUPER6, ecn=st.booleans())
@SLOW
def test_ipv6_split_equals_kernel_segmentation(n, mss, cut, flags, ts, seq, tc, fl, ecn):
    pkt, hlen = super6(n, mss, cut, flags, ts, seq, tc, fl)
    segments, stats = split(tso6_frame(pkt, mss, ecn=ecn))
    assert segments == kernel_segments6(pkt, mss) and not stats.drops
    assert all(len(s) == hlen + mss for s in segments[:-1])
    for seg in segments:
        assert_tcp6_checksum_valid(seg)


@given(**SUPER6, reuse=st.booleans())
@SLOW
def test_without_numpy_the_ipv6_split_is_byte_identical(n, mss, cut, flags, ts, seq, tc, fl, reuse):
    pkt, _ = super6(n, mss, cut, flags, ts, seq, tc, fl)
    frame = tso6_frame(pkt, mss)
    with_numpy, _ = split(frame, bytearray(os.urandom(70000)) if reuse else None)
    original = batch.numpy_module
    batch.numpy_module = lambda: None  # as where numpy is not installed
    try:
        without, stats = split(frame, bytearray(os.urandom(70000)) if reuse else None)
    finally:
        batch.numpy_module = original
    assert without == with_numpy == kernel_segments6(pkt, mss) and not stats.drops


def test_the_largest_segment_size_and_one_byte_segments():
    for size, mss in ((1, 1440), (1000, 1), (65535 - 60, 65535 - 60), (1440 * 3, 1440)):
        pkt = tcp6_packet(os.urandom(size), flags="FPA")
        segments, stats = split(tso6_frame(pkt, mss))
        assert segments == kernel_segments6(pkt, mss) and not stats.drops, (size, mss)


def test_one_packet_ipv6_path_gives_identical_segments():
    """A stream as one TSO6 super-packet, or as MSS-sized packets read one by one (GSO_NONE,
    partial checksum completed by the split): the same bytes."""
    pkt = tcp6_packet(os.urandom(5000), flags="PA", options=TS)
    batched, _ = split(tso6_frame(pkt, 1428))
    one_by_one = []
    for seg in kernel_segments6(pkt, 1428):
        hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 40, 16)
        got, stats = split(build_vnet_hdr(hdr) + partial6(seg))
        assert len(got) == 1 and not stats.drops
        one_by_one += got
    assert one_by_one == batched


def test_ipv6_udp_and_icmpv6_frames_pass_as_one_packet():
    udp = raw(IPv6(src=SRC6, dst=DST6) / UDP(sport=5, dport=53) / b"query")
    plain, stats = split(build_vnet_hdr(VnetHdr()) + udp + b"trailing bytes")
    assert plain == [udp] and not stats.drops  # cut to 40 + payload length
    wire = bytearray(udp)
    struct.pack_into("!H", wire, 46, fold(words(udp[8:40]) + 17 + len(udp) - 40))
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 40, 6)
    (done,), _ = split(build_vnet_hdr(hdr) + bytes(wire))
    assert done == udp  # the checksum completed equals scapy's


def test_extension_headers_are_refused_for_tso_and_passed_without_it():
    """Rule 2a: a TSO6 super-packet with an extension header is MALFORMED_PACKET, never cut;
    the same packet without GSO is one packet, its checksum completed past the header."""
    for ext in (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()):
        pkt = tcp6_packet(os.urandom(3000), ext=ext)
        wire = raw(pkt)
        assert wire[6] != 6  # next header: the extension
        hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 0, 1000, 48, 16)
        got, stats = split(build_vnet_hdr(hdr) + wire)
        assert got == [] and stats.drops == {DropReason.MALFORMED_PACKET: 1}
        one, stats = split(build_vnet_hdr(VnetHdr()) + wire)
        assert one == [wire] and not stats.drops
        segs = [bytes(s) for s in kernel_segments6(pkt, 1000)]
        merged = coalesce_batch(segs)
        assert [m.gso_size for m in merged] == [0, 0, 0]  # rule 6: not merged
        assert all(m.packet is s for m, s in zip(merged, segs, strict=True))


def test_ipv6_drop_reasons():
    good = raw(tcp6_packet(os.urandom(3000)))
    tso6 = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 0, 1000, 40, 16)
    tso4 = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 0, 1000, 40, 16)
    lying = bytearray(good)
    struct.pack_into("!H", lying, 4, len(good) - 40 + 1)  # one byte more than there is
    jumbo = bytearray(good)
    struct.pack_into("!H", jumbo, 4, 0)  # RFC 2675's zero: no TCP header to cut
    bad_thl = bytearray(good)
    bad_thl[52] = 0x40  # a TCP data offset of 16 bytes
    zero_mss = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 0, 0, 40, 16)
    cases = [
        (build_vnet_hdr(tso6) + good[:39], DropReason.MALFORMED_PACKET),
        (build_vnet_hdr(VnetHdr()) + good[:39], DropReason.MALFORMED_PACKET),
        (build_vnet_hdr(tso6) + bytes(lying), DropReason.MALFORMED_PACKET),
        (build_vnet_hdr(VnetHdr()) + bytes(lying), DropReason.MALFORMED_PACKET),
        (build_vnet_hdr(tso6) + bytes(jumbo), DropReason.MALFORMED_PACKET),
        (build_vnet_hdr(tso6) + bytes(bad_thl), DropReason.MALFORMED_PACKET),
        (build_vnet_hdr(tso4) + good, DropReason.MALFORMED_PACKET),  # the other family's GSO
        (build_vnet_hdr(zero_mss) + good, DropReason.MALFORMED_PACKET),
        (build_vnet_hdr(tso6) + b"\x70" + good[1:], DropReason.NOT_IPV4),
    ]
    for frame, reason in cases:
        stats = Stats()
        assert split_tcp_batch(frame, stats) == []
        assert stats.drops == {reason: 1}, (frame[:20], reason)
    csum = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 20, 16)
    stats = Stats()  # a checksum to write into the IPv6 header itself: refused
    assert split_tcp_batch(build_vnet_hdr(csum) + good, stats) == []
    assert stats.drops == {DropReason.MALFORMED_PACKET: 1}


@given(st.binary(max_size=200), st.integers(0, 255), st.integers(0, 255))
@settings(max_examples=300, deadline=None)
def test_garbage_with_a_6_nibble_never_raises(body, low, gso):
    frame = bytes(10) + bytes([0x60 | (low & 0x0F)]) + body
    frame = bytes([frame[0], gso]) + frame[2:]
    stats = Stats()
    out = split_tcp_batch(frame, stats)
    assert out or sum(stats.drops.values()) == 1
    coalesce_batch([frame[10:], frame[10:], frame[:40]])


def test_segmentable_asks_ipv6_for_exactly_its_fixed_header():
    assert segmentable(40, 20, 100, 10, 100, 6) and segmentable(40, 20, 100, 10, 100)
    assert not segmentable(44, 20, 100, 10, 100, 6) and segmentable(44, 20, 100, 10, 100, 4)
    assert not segmentable(20, 20, 100, 10, 100, 6)
    assert segmentable(40, 20, 65535, 65535 - 60, 65535, 6)
    assert not segmentable(40, 20, 65535, 65535 - 59, 65535, 6)


# --- coalesce (rule 6) and the TUN write --------------------------------------------------------


@given(
    n=st.integers(1, 47),
    mss=st.sampled_from([1, 100, 536, 1368, 1428]),
    cut=st.integers(0, 1427),
    flags=st.sampled_from(FLAG_SETS),
    ts=st.booleans(),
    seq=st.integers(0, 2**32 - 1),
    tc=st.integers(0, 255),
    fl=st.integers(0, 0xFFFFF),
)
@SLOW
def test_coalesce_of_an_ipv6_split_is_the_super_packet(n, mss, cut, flags, ts, seq, tc, fl):
    size = max(1, n * mss - cut % mss)
    hlen = 40 + (32 if ts else 20)
    assume(hlen + size <= 65535 and (mss > 1 or size < 2000))
    pkt = tcp6_packet(
        os.urandom(size), seq=seq, flags=flags, options=TS if ts else (), tc=tc, fl=fl
    )
    views = split_tcp_batch(tso6_frame(pkt, mss), Stats())
    (merged,) = coalesce_batch(views)
    assert bytes(merged.packet) == raw(pkt)  # scapy's payload length and checksum
    assert merged.gso_size == (mss if len(views) > 1 else 0)
    again, _ = split(build_gso_vnet_hdr(merged.packet, mss) + bytes(merged.packet))
    assert again == [bytes(v) for v in views]
    (partial,) = coalesce_batch(views, partial=True)
    assert bytes(partial.packet) == (partial6(raw(pkt)) if len(views) > 1 else raw(pkt))


def test_gso_vnet_header_and_partial_checksum_for_an_ipv6_packet():
    pkt = raw(tcp6_packet(os.urandom(3000), options=TS))
    hdr = parse_vnet_hdr(build_gso_vnet_hdr(pkt, 1428))
    assert hdr == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 72, 1428, 40, 16)
    assert build_gso_vnet_hdr(pkt, 0) == bytes(10)
    buf = bytearray(pkt)
    buf[24:40] = bytes.fromhex("fd000000000000000000000000000099")  # a rewritten destination
    rewrite_partial_csum(buf)
    assert bytes(buf) == partial6(bytes(buf))


def segs6(payload, mss=1000, **kw):
    return kernel_segments6(tcp6_packet(payload, **kw), mss)


def test_ipv6_runs_end_where_the_flow_or_its_header_changes():
    a = segs6(os.urandom(3000), seq=1)
    assert [m.gso_size for m in coalesce_batch(a)] == [1000]
    for field in ({"tc": 4}, {"fl": 77}, {"hlim": 63}, {"src": "fd00:10:1::7"}, {"dport": 81}):
        b = segs6(os.urandom(2000), seq=3001, **field)
        merged = coalesce_batch(a + b)
        assert [m.gso_size for m in merged] == [1000, 1000], field
        assert [len(m.packet) for m in merged] == [3060, 2060]
    gap = segs6(os.urandom(2000), seq=3002)
    assert [m.gso_size for m in coalesce_batch(a + gap)] == [1000, 1000]
    cwr = segs6(os.urandom(1000)) + segs6(os.urandom(1000), seq=2000, flags="CA")
    assert [m.gso_size for m in coalesce_batch(cwr)] == [0, 0]


def test_ipv4_and_ipv6_segments_never_merge():
    """Same ports, seq and payload sizes: the version nibble alone keeps them apart, one run
    of each family in a row, and alternating ones pass through."""
    v4 = [bytes(s) for s in tb.segs(os.urandom(3000), seq=1)]
    v6 = segs6(os.urandom(3000), seq=1)
    merged = coalesce_batch(v4 + v6)
    assert [m.gso_size for m in merged] == [1000, 1000]
    assert merged[0].packet[0] >> 4 == 4 and merged[1].packet[0] >> 4 == 6
    v6_after = segs6(os.urandom(2000), seq=3001)
    mixed = [v6[0], v4[1], v6_after[0], v4[2]]  # each one the other family's continuation
    assert [m.gso_size for m in coalesce_batch(mixed)] == [0, 0, 0, 0]


def test_an_ipv6_run_stops_at_64k():
    run = segs6(os.urandom(1428 * 50), mss=1428, options=TS)
    merged = coalesce_batch(run)
    assert [m.gso_size for m in merged] == [1428, 1428]
    assert all(len(m.packet) <= 65535 for m in merged)
    assert len(merged[0].packet) == 72 + 1428 * 45  # 46 would exceed 65535
    assert b"".join(bytes(m.packet)[72:] for m in merged) == b"".join(s[72:] for s in run)
