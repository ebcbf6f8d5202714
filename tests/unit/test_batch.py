"""core/batch.py against scapy, the independent implementation of IPv4/TCP and its checksums.

Expected segments are what the kernel's GSO makes of a super-packet (net/ipv4/tcp_offload.c
``tcp_gso_segment``, net/ipv4/af_inet.c ``inet_gso_segment``), built packet by packet with
scapy, which computes every length and checksum itself.
"""

import os
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, UDP, IPOption, raw
from scapy.utils import checksum as scapy_checksum

from tencrypt.core import batch
from tencrypt.core.batch import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    Coalesced,
    Rows,
    VnetHdr,
    build_gso_vnet_hdr,
    build_vnet_hdr,
    coalesce_batch,
    parse_vnet_hdr,
    split_tcp_batch,
)
from tencrypt.core.packet import pseudo_sum
from tencrypt.core.stats import DropReason, Stats

TS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]
IP_OPTS = IPOption(b"\x01\x01\x01\x00")  # NOP NOP NOP EOL: 4 bytes, IHL 6
FLAG_SETS = ["A", "PA", "FA", "FPA", "CA", "CPA", "EA", "CEPA", "CFPA"]
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers ------------------------------------------------------------------------------------


def tcp_packet(
    payload,
    *,
    seq=1000,
    ident=7,
    flags="A",
    options=(),
    ip_options=None,
    tos=0,
    ttl=64,
    src="10.1.0.1",
    dst="10.2.0.2",
    sport=40000,
    dport=80,
    ack=99,
):
    ip = IP(src=src, dst=dst, id=ident, flags="DF", tos=tos, ttl=ttl)
    if ip_options is not None:
        ip.options = ip_options
    return (
        ip
        / TCP(
            sport=sport,
            dport=dport,
            seq=seq,
            ack=ack,
            flags=flags,
            window=501,
            options=list(options),
        )
        / payload
    )


def partial_tcp(pkt_bytes):
    """The packet as the kernel hands it under NEEDS_CSUM: TCP field = pseudo-header sum."""
    buf = bytearray(pkt_bytes)
    ihl = (buf[0] & 0x0F) * 4
    src, dst = struct.unpack_from("!II", buf, 12)
    pseudo = pseudo_sum(src, dst, 6, len(buf) - ihl) % 0xFFFF or 0xFFFF
    struct.pack_into("!H", buf, ihl + 16, pseudo)
    return bytes(buf)


def tso_frame(pkt, mss, *, ecn=False):
    wire = partial_tcp(raw(pkt))
    ihl = (wire[0] & 0x0F) * 4
    gso = VIRTIO_NET_HDR_GSO_TCPV4 | (VIRTIO_NET_HDR_GSO_ECN if ecn else 0)
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, len(wire), mss, ihl, 16)
    return build_vnet_hdr(hdr) + wire


def kernel_segments(pkt, mss):
    """What tcp_gso_segment makes of ``pkt``: scapy-built, every checksum scapy's."""
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
        seg[IP].id = (pkt[IP].id + i) & 0xFFFF
        seg[TCP].seq = (pkt[TCP].seq + i * mss) & 0xFFFFFFFF
        seg[TCP].flags = f
        seg[TCP].remove_payload()
        seg = seg / chunk
        del seg[IP].len, seg[IP].chksum, seg[TCP].chksum
        out.append(raw(seg))
    return out


def assert_checksums_valid(seg):
    parsed = IP(seg)
    ip_ck, tcp_ck = parsed[IP].chksum, parsed[TCP].chksum
    del parsed[IP].chksum, parsed[TCP].chksum
    again = IP(raw(parsed))
    assert (ip_ck, tcp_ck) == (again[IP].chksum, again[TCP].chksum)


def split(frame, out=None):
    stats = Stats()
    return [bytes(s) for s in split_tcp_batch(frame, stats, out)], stats


# --- virtio-net header -------------------------------------------------------------------------


def test_vnet_header_round_trip_and_layout():
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1448, 20, 16)
    wire = build_vnet_hdr(hdr)
    assert len(wire) == batch.VNET_HDR_LEN == 10
    assert wire[:2] == b"\x01\x01"  # flags, gso_type are single bytes
    assert struct.unpack("=4H", wire[2:]) == (66, 1448, 20, 16)  # host order (legacy virtio)
    assert parse_vnet_hdr(wire + b"rest") == hdr
    assert parse_vnet_hdr(wire[:9]) is None


def test_gso_vnet_header_for_a_coalesced_packet():
    pkt = raw(tcp_packet(b"x" * 3000, options=TS))
    hdr = parse_vnet_hdr(build_gso_vnet_hdr(pkt, 1448))
    assert hdr == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 52, 1448, 20, 16)
    assert build_gso_vnet_hdr(pkt, 0) == bytes(10)


# --- checksums ---------------------------------------------------------------------------------


@given(st.binary(min_size=1, max_size=9000), st.integers(0, 3))
@settings(max_examples=200, deadline=None)
def test_ones_sum_matches_scapy_on_both_paths(data, start):
    assume(any(data[start:]))
    region = data[start:]
    assert batch.csum_field(batch.ones_sum(data, start, len(data))) == scapy_checksum(region)


# --- split against the kernel's segmentation -----------------------------------------------------


def test_split_of_a_64k_super_packet_equals_the_kernels_segments():
    payload = os.urandom(65535 - 52)
    pkt = tcp_packet(payload, seq=0xFFFFFF00, ident=0xFFF0, flags="PA", options=TS)
    segments, stats = split(tso_frame(pkt, 1448))
    expected = kernel_segments(pkt, 1448)
    assert len(segments) == 46 and segments == expected
    assert not stats.drops
    assert b"".join(s[52:] for s in segments) == payload
    for seg in segments:
        assert_checksums_valid(seg)


# a super-packet: n segments of mss bytes, the last ``cut`` short; options and fields drawn
SUPER_PACKETS = {
    "n": st.integers(1, 50),
    "mss": st.integers(1, 1460),
    "cut": st.integers(0, 1459),
    "flags": st.sampled_from(FLAG_SETS),
    "ts": st.booleans(),
    "ipopt": st.booleans(),
    "seq": st.integers(0, 2**32 - 1),
    "ident": st.integers(0, 0xFFFF),
}


def super_packet(n, mss, cut, flags, ts, ipopt, seq, ident):
    """(packet, header length) for ``SUPER_PACKETS``' draws; hypothesis skips one too long."""
    size = max(1, n * mss - cut % mss)
    hlen = 20 + (4 if ipopt else 0) + (32 if ts else 20)
    assume(hlen + size <= 65535)
    pkt = tcp_packet(
        os.urandom(size),
        seq=seq,
        ident=ident,
        flags=flags,
        options=TS if ts else (),
        ip_options=IP_OPTS if ipopt else None,
    )
    return pkt, hlen


@given(**SUPER_PACKETS, ecn=st.booleans())
@SLOW
def test_split_equals_kernel_segmentation(n, mss, cut, flags, ts, ipopt, seq, ident, ecn):
    pkt, hlen = super_packet(n, mss, cut, flags, ts, ipopt, seq, ident)
    segments, stats = split(tso_frame(pkt, mss, ecn=ecn))
    assert segments == kernel_segments(pkt, mss)
    assert not stats.drops
    assert all(len(s) == hlen + mss for s in segments[:-1])


def test_large_payloads_at_both_ends_of_the_size_range():
    for size, mss in ((1, 1448), (65535 - 40, 1), (65535 - 40, 65535 - 40), (1448 * 3, 1448)):
        if mss == 1:
            size = 1000  # 1000 one-byte segments: the worst case, kept affordable
        pkt = tcp_packet(os.urandom(size), flags="FPA")
        segments, _ = split(tso_frame(pkt, mss))
        assert segments == kernel_segments(pkt, mss), (size, mss)


def test_split_reuses_the_callers_buffer_and_gives_writable_views():
    out = bytearray(70000)
    pkt = tcp_packet(os.urandom(10000), options=TS)
    views = split_tcp_batch(tso_frame(pkt, 1448), Stats(), out)
    assert all(v.obj is out and not v.readonly for v in views)
    assert [bytes(v) for v in views] == kernel_segments(pkt, 1448)
    # a smaller packet into the same buffer: stale bytes of the first must not leak into sums
    pkt2 = tcp_packet(os.urandom(2000), options=TS, seq=5)
    views2 = split_tcp_batch(tso_frame(pkt2, 1448), Stats(), out)
    assert [bytes(v) for v in views2] == kernel_segments(pkt2, 1448)
    too_small = bytearray(100)
    views3 = split_tcp_batch(tso_frame(pkt, 1448), Stats(), too_small)
    assert views3[0].obj is not too_small and [bytes(v) for v in views3] == kernel_segments(
        pkt, 1448
    )


# --- the one-packet path -----------------------------------------------------------------------


@given(size=st.integers(1, 20000), mss=st.sampled_from([536, 1388, 1448]), ts=st.booleans())
@settings(max_examples=40, deadline=None)
def test_one_packet_path_gives_identical_segments(size, mss, ts):
    """The same stream as one super-packet, or as MSS-sized packets read one by one (no TSO:
    GSO_NONE frames whose partial checksum the split completes): the same bytes."""
    payload = os.urandom(size)
    opts = TS if ts else ()
    pkt = tcp_packet(payload, flags="PA", options=opts)
    batched, _ = split(tso_frame(pkt, mss))
    one_by_one = []
    for i, seg in enumerate(kernel_segments(pkt, mss)):
        wire = partial_tcp(seg)
        hdr = VnetHdr(
            VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, (wire[0] & 0x0F) * 4, 16
        )
        got, stats = split(build_vnet_hdr(hdr) + wire)
        assert len(got) == 1 and not stats.drops, i
        one_by_one += got
    assert one_by_one == batched


def test_udp_checksum_completion_never_yields_zero():
    # choose the last payload word so that the computed checksum is 0: it must go out as 0xFFFF
    base = IP(src="10.1.0.1", dst="10.2.0.2") / UDP(sport=5, dport=53) / b"abcd\0\0"
    word = IP(raw(base))[UDP].chksum
    pkt = (
        IP(src="10.1.0.1", dst="10.2.0.2")
        / UDP(sport=5, dport=53)
        / (b"abcd" + struct.pack("!H", word))
    )
    wire = bytearray(raw(pkt))
    src, dst = struct.unpack_from("!II", wire, 12)
    struct.pack_into("!H", wire, 26, pseudo_sum(src, dst, 17, len(wire) - 20) % 0xFFFF)
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 20, 6)
    (got,), _ = split(build_vnet_hdr(hdr) + bytes(wire))
    assert got[26:28] == b"\xff\xff"
    plain = build_vnet_hdr(VnetHdr()) + raw(pkt)
    (same,), _ = split(plain)
    assert same == raw(pkt)  # no NEEDS_CSUM: passed through untouched


# --- coalesce ----------------------------------------------------------------------------------


@given(
    n=st.integers(1, 47),
    mss=st.sampled_from([1, 100, 536, 1388, 1448]),
    cut=st.integers(0, 1447),
    flags=st.sampled_from(FLAG_SETS),
    ts=st.booleans(),
    ipopt=st.booleans(),
    seq=st.integers(0, 2**32 - 1),
)
@SLOW
def test_coalesce_of_split_is_the_super_packet(n, mss, cut, flags, ts, ipopt, seq):
    size = max(1, n * mss - cut % mss)
    hlen = 20 + (4 if ipopt else 0) + (32 if ts else 20)
    assume(hlen + size <= 65535 and (mss > 1 or size < 2000))
    pkt = tcp_packet(
        os.urandom(size),
        seq=seq,
        flags=flags,
        options=TS if ts else (),
        ip_options=IP_OPTS if ipopt else None,
    )
    views = split_tcp_batch(tso_frame(pkt, mss), Stats())
    merged = coalesce_batch(views)
    assert len(merged) == 1
    assert bytes(merged[0].packet) == raw(pkt)  # scapy's full checksums
    assert merged[0].gso_size == (mss if len(views) > 1 else 0)
    # and back: splitting the merged packet gives the same segments again
    again, _ = split(build_gso_vnet_hdr(merged[0].packet, mss) + bytes(merged[0].packet))
    assert again == [bytes(v) for v in views]


def test_partial_checksum_for_a_tun_write():
    pkt = tcp_packet(os.urandom(5000), options=TS)
    views = split_tcp_batch(tso_frame(pkt, 1448), Stats())
    (merged,) = coalesce_batch(views, partial=True)
    assert bytes(merged.packet) == partial_tcp(raw(pkt))


def segs(payload, mss=1000, **kw):
    return kernel_segments(tcp_packet(payload, **kw), mss)


def test_runs_are_cut_where_the_flow_or_its_headers_change():
    a = segs(os.urandom(3000), seq=1)  # 3 segments of flow a
    b = segs(os.urandom(2000), sport=41000, seq=1)  # 2 of flow b
    a2 = segs(os.urandom(2000), seq=3001)  # a continues after b
    merged = coalesce_batch(a + b + a2)
    assert [m.gso_size for m in merged] == [1000, 1000, 1000]  # consecutive runs only
    assert [len(m.packet) for m in merged] == [3040, 2040, 2040]
    ttl = segs(os.urandom(2000), seq=1)
    ttl[1] = ttl[1][:8] + b"\x3f" + ttl[1][9:]  # TTL 63 on the second
    assert [m.gso_size for m in coalesce_batch(ttl)] == [0, 0]
    opts = segs(os.urandom(1000), options=TS) + segs(os.urandom(1000), seq=2000)
    assert [m.gso_size for m in coalesce_batch(opts)] == [0, 0]


def test_seq_gaps_sizes_and_flags_end_a_run():
    base = segs(os.urandom(4000))  # 4 x 1000
    assert [m.gso_size for m in coalesce_batch(base[:1] + base[2:])] == [0, 1000]  # gap
    short_first = segs(os.urandom(500)) + segs(os.urandom(1000), seq=1500)
    assert [m.gso_size for m in coalesce_batch(short_first)] == [0, 0]  # a short one ends it
    psh = segs(os.urandom(2000), flags="PA") + segs(os.urandom(2000), seq=3000)
    merged = coalesce_batch(psh)
    assert [m.gso_size for m in merged] == [1000, 1000]
    assert IP(bytes(merged[0].packet))[TCP].flags == "PA"
    syn = segs(b"x" * 10, flags="S") + segs(b"y" * 10, seq=1010)
    assert [m.gso_size for m in coalesce_batch(syn)] == [0, 0]
    cwr = segs(os.urandom(1000)) + segs(os.urandom(1000), seq=2000, flags="CA")
    assert [m.gso_size for m in coalesce_batch(cwr)] == [0, 0]


def test_pure_acks_udp_and_fragments_pass_through_as_the_same_objects():
    ack = raw(tcp_packet(b""))
    dup = raw(tcp_packet(b""))
    udp = raw(IP(src="10.1.0.1", dst="10.2.0.2") / UDP() / b"hi")
    frag = raw(IP(src="10.1.0.1", dst="10.2.0.2", flags="MF", proto=6) / (b"\0" * 40))
    packets = [ack, dup, udp, frag, b"", b"\x45" * 30]
    merged = coalesce_batch(packets)
    assert [m.gso_size for m in merged] == [0] * 6
    assert all(m.packet is p for m, p in zip(merged, packets, strict=True))


def test_a_run_stops_at_64k():
    run = segs(os.urandom(1448 * 50), mss=1448, options=TS)
    merged = coalesce_batch(run)
    assert [m.gso_size for m in merged] == [1448, 1448]
    assert all(len(m.packet) <= 65535 for m in merged)
    assert len(merged[0].packet) == 52 + 1448 * 45  # 46 would exceed 65535
    assert b"".join(bytes(m.packet)[52:] for m in merged) == b"".join(s[52:] for s in run)


# --- bad input ---------------------------------------------------------------------------------


@given(st.binary(max_size=200))
@settings(max_examples=400, deadline=None)
def test_garbage_frames_never_raise(frame):
    stats = Stats()
    out = split_tcp_batch(frame, stats)
    assert isinstance(out, list)
    if not out:
        assert sum(stats.drops.values()) == 1
    coalesce_batch([frame, frame[10:], frame[:40]])


# a cut of a 3000-byte segment, then vnet header flags, gso type, size, csum start and offset
LYING_HEADER = (
    st.integers(0, 1600),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 70000),
    st.integers(0, 70000),
    st.integers(0, 70000),
)


@given(*LYING_HEADER)
@settings(max_examples=300, deadline=None)
def test_truncated_or_lying_headers_never_raise(cut, flags, gso, size, start, offset):
    pkt = tcp_packet(os.urandom(3000), options=TS)
    wire = raw(pkt)
    hdr = VnetHdr(flags, gso, 0, size & 0xFFFF, start & 0xFFFF, offset & 0xFFFF)
    stats = Stats()
    out = split_tcp_batch(build_vnet_hdr(hdr) + wire[:cut], stats)
    assert out or sum(stats.drops.values()) == 1
    for seg in out:
        assert len(seg) <= len(wire)


def test_drop_reasons():
    """Neither IPv4 nor IPv6 is NOT_IPV4; what either family cannot be is MALFORMED_PACKET
    (IPv6's own cases: tests/unit/test_batch_ipv6.py)."""
    tcp6 = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 0, 1000, 40, 16)
    v5 = b"\x50" + bytes(59)
    uso = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, 0, 1000, 20, 6)
    udp = raw(IP() / UDP() / (b"u" * 3000))
    cases = [
        (build_vnet_hdr(tcp6) + v5, DropReason.NOT_IPV4),
        (build_vnet_hdr(VnetHdr()) + v5, DropReason.NOT_IPV4),
        (build_vnet_hdr(tcp6) + raw(tcp_packet(b"x" * 3000)), DropReason.MALFORMED_PACKET),
        (build_vnet_hdr(uso) + udp, DropReason.MALFORMED_PACKET),
        (b"short", DropReason.MALFORMED_PACKET),
        (tso_frame(tcp_packet(b"x" * 3000), 1000)[:500], DropReason.MALFORMED_PACKET),
    ]
    for frame, reason in cases:
        stats = Stats()
        assert split_tcp_batch(frame, stats) == []
        assert stats.drops == {reason: 1}, reason


def test_coalesced_is_a_named_pair():
    pkt = b"\x00" * 4
    assert coalesce_batch([pkt]) == [Coalesced(pkt, 0)]


def test_zero_gso_size_is_malformed():
    stats = Stats()
    assert split_tcp_batch(tso_frame(tcp_packet(b"x" * 100), 0), stats) == []
    assert stats.drops == {DropReason.MALFORMED_PACKET: 1}


# --- rule 7: Rows -------------------------------------------------------------------------------


def test_rows_are_the_packets_at_their_stride():
    buf = bytearray(range(20))
    rows = Rows(buf, 8, 6, 3, 4)
    assert [bytes(r) for r in rows] == [bytes(buf[0:6]), bytes(buf[8:14]), bytes(buf[16:20])]
    assert len(rows) == 3 and rows.nbytes == 16
    assert bytes(rows[-1]) == bytes(buf[16:20]) and bytes(rows[-3]) == bytes(buf[0:6])
    assert [bytes(r) for r in rows[1:]] == [bytes(buf[8:14]), bytes(buf[16:20])]
    rows[1][0] = 0xAA  # writable views into the buffer itself
    assert buf[8] == 0xAA
    for bad in (3, -4):
        with pytest.raises(IndexError):
            rows[bad]
    assert list(Rows(buf, 8, 6, 0, 0)) == [] and Rows(buf, 8, 6, 0, 0).nbytes == 0


@pytest.mark.parametrize(
    "geometry",
    [
        (4, 6, 2, 4),
        (8, 6, 2, 7),
        (10, 6, 3, 6),
        (8, 6, -1, 0),
        (8, 6, 1, -1),
        (8, 6, 4, 1),
        (0, 0, 2, 0),
        (0, 0, 2**31, 0),
    ],
    ids=[
        "size>stride",
        "last>size",
        "past the end",
        "negative count",
        "negative last",
        "end+1",
        "no stride",
        "no stride, 2**31 packets",
    ],
)
def test_rows_refuse_a_geometry_outside_their_buffer(geometry):
    with pytest.raises(ValueError):
        Rows(bytearray(24), *geometry)


def test_a_zero_stride_holds_one_packet_at_most():
    """Rule 7: a Rows never counts more packets than its buffer bounds (a zero stride with a
    huge count asked the C backend for 16 bytes of bookkeeping per packet)."""
    assert [bytes(r) for r in Rows(bytearray(24), 0, 0, 1, 0)] == [b""]
    assert list(Rows(bytearray(24), 0, 0, 0, 0)) == []


# --- without NumPy (an optional dependency): the pure loops, byte-identical -----------------------


@given(**SUPER_PACKETS, reuse=st.booleans())
@SLOW
def test_without_numpy_the_split_is_byte_identical(
    n, mss, cut, flags, ts, ipopt, seq, ident, reuse
):
    pkt, _ = super_packet(n, mss, cut, flags, ts, ipopt, seq, ident)
    frame = tso_frame(pkt, mss)
    with_numpy, _ = split(frame, bytearray(os.urandom(70000)) if reuse else None)
    original = batch.numpy_module
    batch.numpy_module = lambda: None  # as where numpy is not installed
    try:
        without, stats = split(frame, bytearray(os.urandom(70000)) if reuse else None)
    finally:
        batch.numpy_module = original
    assert without == with_numpy and not stats.drops


def test_without_numpy_a_64k_super_packet_and_large_sums(monkeypatch):
    payload = os.urandom(65535 - 52)
    pkt = tcp_packet(payload, seq=0xFFFFFF00, ident=0xFFF0, flags="PA", options=TS)
    data = os.urandom(9001)
    sums = [batch.ones_sum(data, s, len(data)) for s in range(4)]
    monkeypatch.setattr(batch, "numpy_module", lambda: None)
    segments, stats = split(tso_frame(pkt, 1448))
    assert segments == kernel_segments(pkt, 1448) and not stats.drops
    assert [batch.ones_sum(data, s, len(data)) for s in range(4)] == sums
    assert batch.numpy_module() is None
    monkeypatch.undo()
    assert batch.numpy_module() is not None  # the test environment has it (the test extra)
