"""TCP over IPv6 through both backends of the data path's loops (core/fastpath.py, the
specification, and tencrypt/_fastpath.c): segmentation (core/batch.py rule 2a), coalescing
(rule 6) and ``open_batch``'s IPv6 plaintexts (core/fastpath.py rule 2, ``allowed6``) give
the same bytes and counts in both, and the kernel's segments (tests/unit/test_batch_ipv6.py's
scapy reference). With TENCRYPT_REQUIRE_FASTPATH=1 (CI) a missing extension fails."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import raw

from tencrypt.core import batch
from tencrypt.core import fastpath as pure
from tencrypt.core.batch import Rows, split_tcp_batch
from tencrypt.core.fastpath import COUNTS, NOT_IP, NOT_IPV4
from tencrypt.core.replay import ReplayWindow
from tencrypt.core.stats import Stats
from tests.unit import test_batch as tb
from tests.unit import test_batch_ipv6 as t6
from tests.unit.test_fastpath import (
    BACKENDS,
    COMPILED,
    INDEX,
    KEY,
    LIMIT,
    REQUIRED,
    gro_read,
    ipv4,
    split,
    window_state,
)

SRC6 = bytes.fromhex("fd000010000100000000000000000001")
OTHER6 = bytes.fromhex("fd000010000100000000000000000009")
SRC4 = bytes([10, 128, 0, 5])


def ipv6(size: int, src: bytes = SRC6, nh: int = 6) -> bytes:
    """A minimal IPv6 packet of ``size`` bytes (what the open loop's inner checks accept)."""
    return struct.pack("!IHBB16s16s", 6 << 28, size - 40, nh, 64, src, bytes(16)) + bytes(size - 40)


def backends():
    if COMPILED is None:
        if REQUIRED:
            pytest.fail("TENCRYPT_REQUIRE_FASTPATH=1 but tencrypt._fastpath is not built")
        pytest.skip("tencrypt._fastpath not built")
    return pure, COMPILED


def opened(backend, datagrams, allowed=SRC4, allowed6=SRC6, window=None):
    window = window if window is not None else ReplayWindow()
    args = (KEY, INDEX, LIMIT, window, allowed, datagrams, 0)
    stop, packets, counts = backend.open_batch(*args, allowed6)
    return stop, packets, dict(zip(COUNTS, counts, strict=True)), window


# ---- segmentation ----------------------------------------------------------------------------


def _split(frame, backend):
    stats = Stats()
    out = bytearray(b"\xee" * (2 * 65536))  # stale bytes must not leak into sums
    return [bytes(v) for v in split_tcp_batch(frame, stats, out, backend.segment)], stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_of_a_64k_ipv6_super_packet_equals_the_kernels(backend):
    pkt = t6.tcp6_packet(
        os.urandom(65535 - 72), seq=0xFFFFFF00, flags="CPA", options=tb.TS, tc=0xB8, fl=0xABCDE
    )
    segments, stats = _split(t6.tso6_frame(pkt, 1428, ecn=True), backend)
    assert segments == t6.kernel_segments6(pkt, 1428) and not stats.drops
    for seg in segments:
        t6.assert_tcp6_checksum_valid(seg)


@given(**t6.SUPER6, ecn=st.booleans())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_both_backends_and_both_pure_loops_segment_ipv6_like_the_kernel(
    n, mss, cut, flags, ts, seq, tc, fl, ecn
):
    """C, NumPy and the loops without NumPy: the kernel's bytes, around MSS boundaries."""
    c = backends()[1]
    pkt, _ = t6.super6(n, mss, cut, flags, ts, seq, tc, fl)
    frame = t6.tso6_frame(pkt, mss, ecn=ecn)
    expected = t6.kernel_segments6(pkt, mss)
    assert _split(frame, c)[0] == expected
    assert _split(frame, pure)[0] == expected
    original = batch.numpy_module
    batch.numpy_module = lambda: None
    try:
        assert _split(frame, pure)[0] == expected
    finally:
        batch.numpy_module = original


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_takes_the_family_from_the_first_nibble(backend):
    """An IPv6 packet is cut only with ihl 40; the same bytes with a 4 nibble follow IPv4's
    rules (ihl 20-60) and get an IPv4 header's fields written."""
    v6 = raw(t6.tcp6_packet(bytes(range(250)) * 12))
    for ihl in (20, 36, 44, 60):
        buf = bytearray(b"\xa5" * 8192)
        assert backend.segment(v6, ihl, 20, len(v6), 1000, buf) == 0
        assert buf == b"\xa5" * 8192
    buf = bytearray(8192)
    assert backend.segment(v6, 40, 20, len(v6), 1000, buf) == 1060
    assert buf[4:6] == struct.pack("!H", 1020) and buf[6] == 6  # payload length, next header
    as_v4 = bytes([0x4A]) + v6[1:]
    buf4 = bytearray(8192)
    assert backend.segment(as_v4, 40, 20, len(v6), 1000, buf4) == 1060
    assert buf4[2:4] == struct.pack("!H", 1060)  # an IPv4 total length, not IPv6's field


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ipv6_super_packets_rows_seal_open_and_coalesce_as_their_views(backend):
    pkt = t6.tcp6_packet(os.urandom(20000), options=tb.TS, flags="PA")
    wire = raw(pkt)
    rows = split_tcp_batch(t6.tso6_frame(pkt, 1426), Stats(), bytearray(65536), backend.segment)
    assert isinstance(rows, Rows) and rows.stride > rows.size
    segments = [bytes(r) for r in rows]
    blob = backend.seal_batch(KEY, INDEX, 7, rows)
    assert blob == pure.seal_batch(KEY, INDEX, 7, segments)
    read = gro_read(split(blob, segments))
    stop, got, counts, _ = opened(backend, read, allowed6=wire[8:24])
    assert (stop, got, counts["authenticated"]) == (len(segments), segments, len(segments))
    assert [(bytes(p), n) for p, n in backend.coalesce(rows, False)] == [(wire, 1426)]
    assert [(bytes(p), n) for p, n in backend.coalesce(rows, True)] == [(t6.partial6(wire), 1426)]


# ---- coalescing ------------------------------------------------------------------------------


def _flow(size, mss, flags, ts, seq, sport, v6, tc):
    payload = bytes(i % 251 for i in range(size))
    opts = tb.TS if ts else ()
    if v6:
        pkt = t6.tcp6_packet(payload, seq=seq, flags=flags, options=opts, sport=sport, tc=tc)
        return t6.kernel_segments6(pkt, mss)
    pkt = tb.tcp_packet(payload, seq=seq, flags=flags, options=opts, sport=sport, tos=tc)
    return tb.kernel_segments(pkt, mss)


@given(
    st.lists(
        st.tuples(
            st.integers(1, 4000),
            st.sampled_from([100, 536, 1428]),
            st.sampled_from(tb.FLAG_SETS),
            st.booleans(),
            st.integers(0, 2**32 - 1),
            st.sampled_from([40000, 40001]),
            st.booleans(),
            st.sampled_from([0, 0, 4]),
        ),
        min_size=1,
        max_size=4,
    ),
    st.lists(
        st.tuples(
            st.sampled_from(["swap", "drop", "dup", "odd", "cut", "tc", "flow"]),
            st.integers(0, 10**6),
            st.integers(0, 10**6),
        ),
        max_size=6,
    ),
    st.booleans(),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_both_backends_coalesce_mixed_families_alike(flows, edits, partial):
    c = backends()[1]
    packets: list = []
    for flow in flows:
        packets += _flow(*flow)
    for kind, a, b in edits:
        i, j = a % len(packets), b % len(packets)
        p = bytearray(packets[i])
        if kind == "swap":
            packets[i], packets[j] = packets[j], packets[i]
        elif kind == "drop" and len(packets) > 1:
            del packets[i]
        elif kind == "dup":
            packets.insert(j, packets[i])
        elif kind == "odd":
            packets.insert(j, bytes([0x60]) + bytes(b % 97))
        elif kind == "cut":
            packets[i] = bytes(p[: b % (len(p) + 1)])
        elif len(p) > 3 and p[0] >> 4 == 6:  # traffic class or flow label of one segment changed
            p[1 if kind == "tc" else 3] ^= 1 << (b % 4)
            packets[i] = bytes(p)
    packets = [bytearray(p) if k % 2 else p for k, p in enumerate(packets)]
    expected = pure.coalesce(packets, partial)
    got = c.coalesce(packets, partial)
    assert [(bytes(p), n) for p, n in got] == [(bytes(p), n) for p, n in expected]
    for (p, n), (q, m) in zip(got, expected, strict=True):
        assert (p is q) == (n == 0 and m == 0)  # passed through: the same object
        if n and p[0] >> 4 == 6 and not partial:
            t6.assert_tcp6_checksum_valid(bytes(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_coalesce_keeps_families_and_flow_labels_apart(backend):
    v4 = [bytes(s) for s in tb.segs(os.urandom(3000), seq=1)]
    v6 = t6.segs6(os.urandom(3000), seq=1)
    labelled = t6.segs6(os.urandom(2000), seq=3001, fl=5)
    merged = backend.coalesce(v4 + v6 + labelled, False)
    assert [n for _, n in merged] == [1000, 1000, 1000]
    assert [bytes(p)[0] >> 4 for p, _ in merged] == [4, 6, 6]
    alternating = [v6[0], v4[1], labelled[0], v6[1]]
    assert [n for _, n in backend.coalesce(alternating, False)] == [0, 0, 0, 0]


# ---- open_batch: IPv6 plaintexts -------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_batch_accepts_ipv6_from_allowed6_only(backend):
    packets = [ipv6(1400), ipv6(60, src=OTHER6), ipv4(60), ipv6(40), ipv6(100, nh=17)]
    datagrams = split(backend.seal_batch(KEY, INDEX, 0, packets), packets)
    stop, got, counts, _ = opened(backend, datagrams)
    assert stop == 5 and got == [packets[0], packets[2], packets[3], packets[4]]
    assert counts["bad_source"] == 1 and counts["not_ipv4"] == 0
    assert counts["bytes_opened"] == 1400 + 60 + 40 + 100
    both = opened(backend, datagrams, allowed6=SRC6 + OTHER6)
    assert both[1] == packets and both[2]["bad_source"] == 0
    default = backend.open_batch(KEY, INDEX, LIMIT, ReplayWindow(), SRC4, datagrams, 0)
    assert default[1] == [packets[2]] and default[2][COUNTS.index("bad_source")] == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ipv6_source_is_never_matched_against_the_ipv4_list(backend):
    """The first 4 bytes of an IPv6 source in ``allowed``, or an IPv4 source's bytes inside
    ``allowed6``, admit nothing; a trailing partial address is ignored."""
    packets = [ipv6(60), ipv4(60, src=SRC6[:4])]
    datagrams = split(backend.seal_batch(KEY, INDEX, 0, packets), packets)
    _, got, counts, _ = opened(backend, datagrams, allowed=SRC6[:4], allowed6=b"")
    assert got == [packets[1]] and counts["bad_source"] == 1
    _, got, counts, _ = opened(backend, datagrams, allowed=b"", allowed6=SRC6[:15])
    assert got == [] and counts["bad_source"] == 2
    _, got, _, _ = opened(backend, datagrams, allowed=b"", allowed6=OTHER6 + SRC6 + SRC6[:7])
    assert got == [packets[0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ipv6_payload_length_must_be_exact(backend):
    longer, shorter = bytearray(ipv6(80)), bytearray(ipv6(80))
    longer[5], shorter[5] = 41, 39
    packets = [
        bytes(longer),
        bytes(shorter),
        ipv6(80)[:79],
        ipv6(80)[:39],
        bytes([0x50]) + ipv6(80)[1:],
        bytes([0x7F]) + ipv6(80)[1:],
        bytes([0x6F, 0xFF, 0xFF, 0xFF]) + ipv6(80)[4:],  # any traffic class and flow label
    ]
    datagrams = split(backend.seal_batch(KEY, INDEX, 0, packets), packets)
    _, got, counts, _ = opened(backend, datagrams)
    assert got == [packets[-1]] and counts["not_ipv4"] == 6
    assert NOT_IP == NOT_IPV4 == COUNTS.index("not_ipv4")


def _inner():
    return st.one_of(
        st.integers(40, 1500).map(ipv6),
        st.integers(40, 200).map(lambda n: ipv6(n, src=OTHER6)),
        st.integers(20, 300).map(ipv4),
        st.binary(max_size=64).map(lambda b: bytes([0x60]) + b),  # a 6 nibble, anything after
        st.binary(max_size=64),
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_inner(), max_size=30),
    st.lists(st.sampled_from([SRC6, OTHER6, SRC6[:9], b"\x00" * 16]), max_size=3),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=4),
)
def test_both_backends_open_ipv6_batches_alike(packets, allowed6, flips):
    pure_, c = backends()
    datagrams = split(pure.seal_batch(KEY, INDEX, 0, packets), packets)
    for at, bit in flips:
        if datagrams:
            d = bytearray(datagrams[at % len(datagrams)])
            d[at % len(d)] ^= 1 << bit
            datagrams[at % len(datagrams)] = bytes(d)
    a6 = b"".join(allowed6)
    ra, rb = (opened(b, datagrams, allowed6=a6) for b in (pure_, c))
    assert ra[:3] == rb[:3] and window_state(ra[3]) == window_state(rb[3])
    counts = ra[2]
    assert counts["authenticated"] == sum(
        counts[k] for k in ("keepalives", "not_ipv4", "bad_source")
    ) + len(ra[1])
