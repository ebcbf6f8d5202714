"""The data path's batch loops (core/fastpath.py, the specification, and tencrypt/_fastpath.c):
every test runs against both backends, and a differential test feeds both the same random
batches — tampered, duplicated, reordered, foreign — and compares bytes, counts and the
replay window they leave behind. With TENCRYPT_REQUIRE_FASTPATH=1 (CI) a missing extension
fails instead of skipping."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.all import raw

from tencrypt import fastpath as selection
from tencrypt.core import fastpath as pure
from tencrypt.core import wire
from tencrypt.core.batch import Rows, VnetHdr, build_vnet_hdr, split_tcp_batch
from tencrypt.core.fastpath import (
    AUTHENTICATED,
    BAD_SOURCE,
    BYTES_OPENED,
    COUNTS,
    EXPIRED,
    KEEPALIVES,
    NOT_IPV4,
    REPLAY,
)
from tencrypt.core.replay import WINDOW, ReplayWindow
from tencrypt.core.stats import DropReason, Stats
from tencrypt.errors import UsageError
from tests.unit import test_batch as tb
from tests.unit.test_wire import (
    RFC_AAD,
    RFC_CIPHERTEXT,
    RFC_KEY,
    RFC_NONCE,
    RFC_PLAINTEXT,
    RFC_TAG,
)

COMPILED = selection.compiled()
REQUIRED = os.environ.get("TENCRYPT_REQUIRE_FASTPATH") == "1"
needs_c = pytest.mark.skipif(
    COMPILED is None and not REQUIRED, reason="tencrypt._fastpath not built"
)
BACKENDS = [pytest.param(pure, id="python"), pytest.param(COMPILED, id="c", marks=needs_c)]

KEY = bytes(range(32))
LIMIT = 2**64 - 2**13 - 1  # Limits().reject_after_messages
SRC, OTHER = bytes([10, 128, 0, 5]), bytes([10, 128, 0, 9])
INDEX = 0x11223344
REPO = Path(__file__).resolve().parents[2]

RFC_SEALED = RFC_CIPHERTEXT + RFC_TAG  # RFC 8439 §2.8.2, the vector test_wire.py checks


def ipv4(size: int, src: bytes = SRC) -> bytes:
    """A minimal IPv4 packet of ``size`` bytes (what the open loop's inner checks accept)."""
    return struct.pack("!BBH8x4s4s", 0x45, 0, size, src, bytes(4)) + bytes(size - 20)


def split(blob: bytes, packets: list[bytes]) -> list[bytes]:
    """The datagrams of one seal_batch result."""
    out, pos = [], 0
    for p in packets:
        out.append(blob[pos : pos + len(p) + 32])
        pos += len(p) + 32
    assert pos == len(blob)
    return out


def window_state(w: ReplayWindow) -> tuple[int, bytes]:
    return w.top, bytes(w.ring)


# ---- sealing ---------------------------------------------------------------------------------


@needs_c
def test_rfc8439_vectors_through_the_c_code():
    assert COMPILED is not None
    sealed = COMPILED.aead_seal(RFC_KEY, RFC_NONCE, RFC_AAD, RFC_PLAINTEXT)  # type: ignore[attr-defined]
    assert sealed == RFC_SEALED
    assert COMPILED.aead_open(RFC_KEY, RFC_NONCE, RFC_AAD, sealed) == RFC_PLAINTEXT  # type: ignore[attr-defined]
    forged = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert COMPILED.aead_open(RFC_KEY, RFC_NONCE, RFC_AAD, forged) is None  # type: ignore[attr-defined]
    assert COMPILED.aead_open(RFC_KEY, RFC_NONCE, RFC_AAD[:-1], sealed) is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", BACKENDS)
def test_seal_batch_is_one_data_message_per_packet_back_to_back(backend):
    packets = [ipv4(1400), ipv4(1400), memoryview(ipv4(60)), b"", bytearray(b"x")]
    blob = backend.seal_batch(KEY, INDEX, 2**40, packets)
    aead = ChaCha20Poly1305(KEY)
    for i, (packet, message) in enumerate(zip(packets, split(blob, packets), strict=True)):
        assert message[:4] == b"\x04\x00\x00\x00"
        assert wire.parse_header(message) == (INDEX, 2**40 + i)
        assert aead.decrypt(b"\0" * 4 + message[8:16], message[16:], message[:16]) == packet
        assert message == wire.seal(aead, INDEX, 2**40 + i, packet)  # the one-packet path's bytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_seal_batch_of_nothing_is_empty(backend):
    assert backend.seal_batch(KEY, 1, 0, []) == b""


# ---- opening ---------------------------------------------------------------------------------


def opened(backend, datagrams, window=None, start=0, allowed=SRC, limit=LIMIT):
    window = window if window is not None else ReplayWindow()
    stop, packets, counts = backend.open_batch(KEY, INDEX, limit, window, allowed, datagrams, start)
    return stop, packets, dict(zip(COUNTS, counts, strict=True)), window


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_batch_returns_the_packets_and_marks_the_window(backend):
    packets = [ipv4(1400), ipv4(1400), ipv4(100)]
    datagrams = split(backend.seal_batch(KEY, INDEX, 0, packets), packets)
    stop, got, counts, window = opened(backend, [memoryview(d) for d in datagrams])
    assert stop == 3 and got == packets
    assert counts == {**dict.fromkeys(COUNTS, 0), "authenticated": 3, "bytes_opened": 2900}
    assert window.top == 2 and not any(window.check(c) for c in range(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_drop_is_counted_once_in_the_stages_order(backend):
    packets = [ipv4(40), b"", ipv4(40, src=OTHER), b"not ipv4 at all, 26 bytes", ipv4(40)]
    good = split(backend.seal_batch(KEY, INDEX, 10, packets), packets)
    tampered = bytearray(good[0])
    tampered[20] ^= 1
    expired = backend.seal_batch(KEY, INDEX, LIMIT, [ipv4(40)])
    datagrams = [bytes(tampered), *good, good[0], expired]
    stop, got, counts, window = opened(backend, datagrams)
    assert stop == len(datagrams)
    assert got == [packets[0], packets[4]]  # the tampered copy failed, so the genuine one opens
    assert counts["bad_tag"] == 1 and counts["keepalives"] == 1
    assert counts["bad_source"] == 1 and counts["not_ipv4"] == 1
    assert counts["replay"] == 1 and counts["expired"] == 1
    assert counts["authenticated"] == 5 and counts["bytes_opened"] == 80
    assert window.top == 14


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_batch_stops_at_the_first_message_not_of_this_session(backend):
    mine = split(backend.seal_batch(KEY, INDEX, 0, [ipv4(40)] * 2), [ipv4(40)] * 2)
    theirs = backend.seal_batch(KEY, INDEX + 1, 0, [ipv4(40)])
    initiation = b"\x01\x00\x00\x00" + bytes(84)
    short = mine[1][:31]
    for foreign in (theirs, initiation, short, b"", b"\x04\x00\x00\x01" + mine[1][4:]):
        datagrams = [mine[0], foreign, mine[1]]
        stop, got, counts, window = opened(backend, datagrams)
        assert stop == 1 and got == [ipv4(40)] and counts["authenticated"] == 1
        stop, got, counts, _ = opened(backend, datagrams, window, start=2)
        assert stop == 3 and got == [ipv4(40)] and window.top == 1
    assert opened(backend, mine, start=2)[:2] == (2, [])
    assert opened(backend, [theirs])[:2] == (0, [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forged_message_does_not_move_the_window(backend):
    window = ReplayWindow()
    far = bytearray(backend.seal_batch(KEY, INDEX, 10**12, [ipv4(40)]))
    far[-1] ^= 1
    opened(backend, [bytes(far)], window)
    assert window_state(window) == window_state(ReplayWindow())
    near = backend.seal_batch(KEY, INDEX, 5, [ipv4(40)])
    assert opened(backend, [near], window)[1] == [ipv4(40)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_window_is_shared_with_the_one_packet_path(backend):
    """The state the loop leaves is the ReplayWindow's own: core/replay.py reads it."""
    window = ReplayWindow()
    window.update(WINDOW + 100)
    old = backend.seal_batch(KEY, INDEX, 100, [ipv4(40)])  # just outside the window
    edge = backend.seal_batch(KEY, INDEX, 101, [ipv4(40)])  # just inside
    _, got, counts, _ = opened(backend, [old, edge, edge], window)
    assert got == [ipv4(40)] and counts["replay"] == 2
    assert not window.check(101) and window.check(102)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_the_window_slides_into_are_cleared(backend):
    """A ring block reused after the window went round must not keep its old bits: 69 is
    marked in block 1; the top jumps to block 128, then by two blocks to 130, which clears
    blocks 129 and 130 (ring slots 1 and 2): 129 * 64 + 5 is fresh."""
    counters = [69, 128 * 64, 130 * 64, 129 * 64 + 5, 129 * 64 + 5]
    datagrams = [backend.seal_batch(KEY, INDEX, n, [b""]) for n in counters]
    _, _, counts, window = opened(backend, datagrams)
    assert counts["keepalives"] == 4 and counts["replay"] == 1
    model = ReplayWindow()
    for n in counters:
        model.check_and_update(n)
    assert window_state(window) == window_state(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_order_counters_clear_the_block_they_move_into_after_8192(backend):
    """The in-order case (a gap of one block) after the ring went round: 0..8191 and 8200 in
    order, then 8195 (ring slot 0, bit 3, set by counter 3 long ago) is fresh."""
    counters = [*range(128 * 64), 128 * 64 + 8, 128 * 64 + 3, 128 * 64 + 3]
    datagrams = [pure.seal_batch(KEY, INDEX, n, [b""]) for n in counters]
    _, _, counts, window = opened(backend, datagrams)
    assert counts["keepalives"] == len(counters) - 1 and counts["replay"] == 1
    model = ReplayWindow()
    for n in counters:
        model.check_and_update(n)
    assert window_state(window) == window_state(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_allowed_holds_any_number_of_sources(backend):
    packets = [ipv4(40, src=OTHER), ipv4(40)]
    datagrams = split(backend.seal_batch(KEY, INDEX, 0, packets), packets)
    assert opened(backend, datagrams, allowed=SRC + OTHER)[1] == packets
    assert opened(backend, datagrams, allowed=b"")[2]["bad_source"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_inner_length_must_be_exact(backend):
    longer, shorter = bytearray(ipv4(60)), bytearray(ipv4(60))
    longer[3], shorter[3] = 61, 59
    packets = [
        bytes(longer),
        bytes(shorter),
        ipv4(60)[:59],
        bytes([0x44]) + ipv4(60)[1:],
        bytes([0x50]) + ipv4(60)[1:],
        ipv4(60),
    ]
    datagrams = split(backend.seal_batch(KEY, INDEX, 0, packets), packets)
    _, got, counts, _ = opened(backend, datagrams)
    assert got == [ipv4(60)] and counts["not_ipv4"] == 5


# ---- the two backends agree -----------------------------------------------------------------


def _packet():
    return st.one_of(
        st.integers(20, 1500).map(ipv4),
        st.integers(20, 200).map(lambda n: ipv4(n, src=OTHER)),
        st.binary(max_size=64),  # keepalives, not IPv4, wrong lengths
    )


_EDIT = st.tuples(
    st.sampled_from(["dup", "swap", "flip", "foreign", "short", "drop"]),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)


def _edit(datagrams: list[bytes], edits) -> list[bytes]:
    out = list(datagrams)
    for kind, a, b in edits:
        if not out:
            break
        i, j = a % len(out), b % len(out)
        if kind == "dup":
            out.insert(j, out[i])
        elif kind == "swap":
            out[i], out[j] = out[j], out[i]
        elif kind == "flip" and out[i]:
            d = bytearray(out[i])
            d[b % len(d)] ^= 1 << (a % 8)
            out[i] = bytes(d)
        elif kind == "foreign":
            out.insert(j, b"\x02\x00\x00\x00" + bytes(76))
        elif kind == "short":
            out[i] = out[i][: b % 32]
        else:
            del out[i]
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_packet(), max_size=40),
    st.integers(0, 2**64 - 1),
    st.lists(_EDIT, max_size=12),
    st.lists(st.integers(0, 2**64 - 1), max_size=4),
    st.integers(-3 * WINDOW, 3 * WINDOW),
    st.sampled_from([LIMIT, 2**64 - 1, 0, 2**20]),
)
def test_both_backends_agree_on_random_batches(packets, counter, edits, marks, shift, limit):
    c = COMPILED
    if c is None:
        if REQUIRED:
            pytest.fail("TENCRYPT_REQUIRE_FASTPATH=1 but tencrypt._fastpath is not built")
        pytest.skip("tencrypt._fastpath not built")
    counter = min(counter, 2**64 - 1 - len(packets))
    blob = pure.seal_batch(KEY, INDEX, counter, packets)
    assert c.seal_batch(KEY, INDEX, counter, packets) == blob
    datagrams = _edit(split(blob, packets), edits)
    windows = (ReplayWindow(), ReplayWindow())
    for window in windows:  # the same history: marks near and far from this batch
        for m in marks:
            window.update(m)
        window.update(max(0, min(2**64 - 1, counter + shift)))
    # Walk the whole list as Tunnel.receive_batch does: a run of the session, then one
    # message handed to the one-packet path (here: skipped), then the next run.
    results: list[list[object]] = [[], []]
    for backend, window, result in zip((pure, c), windows, results, strict=True):
        start = 0
        while start <= len(datagrams):
            stop, got, counts = backend.open_batch(KEY, INDEX, limit, window, SRC, datagrams, start)
            result.append((stop, got, counts))
            start = stop + 1
    assert results[0] == results[1]
    assert window_state(windows[0]) == window_state(windows[1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 3 * WINDOW), max_size=60))
def test_both_backends_keep_the_same_window_over_counter_jumps(counters):
    if COMPILED is None:
        if REQUIRED:
            pytest.fail("TENCRYPT_REQUIRE_FASTPATH=1 but tencrypt._fastpath is not built")
        pytest.skip("tencrypt._fastpath not built")
    datagrams = [pure.seal_batch(KEY, INDEX, n, [b""]) for n in counters]
    a, b = ReplayWindow(), ReplayWindow()
    ra = pure.open_batch(KEY, INDEX, 2**64 - 1, a, b"", datagrams, 0)
    rb = COMPILED.open_batch(KEY, INDEX, 2**64 - 1, b, b"", datagrams, 0)
    assert ra == rb and window_state(a) == window_state(b)
    assert ra[2][AUTHENTICATED] == ra[2][KEEPALIVES]
    assert sum(ra[2][k] for k in (AUTHENTICATED, REPLAY, EXPIRED)) == len(counters)
    assert ra[2][NOT_IPV4] == ra[2][BAD_SOURCE] == ra[2][BYTES_OPENED] == 0


# ---- selection -------------------------------------------------------------------------------


def test_selection_follows_the_environment():
    assert selection.select({"TENCRYPT_FASTPATH": "0"}) is pure
    with pytest.raises(UsageError):
        selection.select({"TENCRYPT_FASTPATH": "0", "TENCRYPT_REQUIRE_FASTPATH": "1"})
    chosen = selection.select({})
    assert chosen is (COMPILED or pure)
    assert "Python" in selection.describe(pure)
    if COMPILED is None:
        with pytest.raises(UsageError):
            selection.select({"TENCRYPT_REQUIRE_FASTPATH": "1"})
    else:
        assert selection.select({"TENCRYPT_REQUIRE_FASTPATH": "1"}) is COMPILED
        assert selection.describe(COMPILED).startswith("C ")


def test_ci_requires_the_extension():
    assert "export TENCRYPT_REQUIRE_FASTPATH=1" in (REPO / ".ci" / "run").read_text()
    if REQUIRED:
        assert COMPILED is not None, "TENCRYPT_REQUIRE_FASTPATH=1 but the extension is missing"


# ---- segmentation (core/batch.py rules 2-4) ---------------------------------------------------


def _split(frame, backend, out_size=2 * 65536):
    stats = Stats()
    out = bytearray(b"\xee" * out_size)  # stale bytes must not leak into sums
    views = split_tcp_batch(frame, stats, out, backend.segment)
    return [bytes(v) for v in views], stats, views


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_of_a_64k_super_packet_equals_the_kernels(backend):
    payload = os.urandom(65535 - 52)
    pkt = tb.tcp_packet(payload, seq=0xFFFFFF00, ident=0xFFF0, flags="PA", options=tb.TS)
    segments, stats, views = _split(tb.tso_frame(pkt, 1448), backend)
    assert segments == tb.kernel_segments(pkt, 1448) and not stats.drops
    assert len(segments) == 46 and all(not v.readonly for v in views)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [0xFF, 0x00, 0x80])
def test_segment_checksums_hold_at_every_length_and_every_carry(backend, fill):
    """The C sum adds whole 64-bit words and counts their carries: payloads of one byte
    value (0xFF: a carry out of every add) at every length up to 40 words plus a tail."""
    for size in range(1, 330):
        pkt = tb.tcp_packet(bytes([fill]) * size, seq=size, flags="A", options=tb.TS)
        segments, stats, _views = _split(tb.tso_frame(pkt, 160), backend)
        assert segments == tb.kernel_segments(pkt, 160) and not stats.drops, size


@given(
    n=st.integers(1, 50),
    mss=st.integers(1, 1460),
    cut=st.integers(0, 1459),
    flags=st.sampled_from(tb.FLAG_SETS),
    ts=st.booleans(),
    ipopt=st.booleans(),
    seq=st.integers(0, 2**32 - 1),
    ident=st.integers(0, 0xFFFF),
    ecn=st.booleans(),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_both_backends_segment_like_the_kernel(n, mss, cut, flags, ts, ipopt, seq, ident, ecn):
    if COMPILED is None and REQUIRED:
        pytest.fail("TENCRYPT_REQUIRE_FASTPATH=1 but tencrypt._fastpath is not built")
    size = max(1, n * mss - cut % mss)
    hlen = 20 + (4 if ipopt else 0) + (32 if ts else 20)
    assume(hlen + size <= 65535)
    pkt = tb.tcp_packet(
        os.urandom(size),
        seq=seq,
        ident=ident,
        flags=flags,
        options=tb.TS if ts else (),
        ip_options=tb.IP_OPTS if ipopt else None,
    )
    frame = tb.tso_frame(pkt, mss, ecn=ecn)
    expected = tb.kernel_segments(pkt, mss)
    for backend in [pure] + ([COMPILED] if COMPILED is not None else []):
        assert _split(frame, backend)[0] == expected


@needs_c
@given(*tb.LYING_HEADER)
@settings(max_examples=200, deadline=None)
def test_lying_headers_give_the_same_result_through_c(cut, flags, gso, size, start, offset):
    pkt = tb.tcp_packet(os.urandom(3000), options=tb.TS)
    frame = (
        build_vnet_hdr(VnetHdr(flags, gso, 0, size & 0xFFFF, start & 0xFFFF, offset & 0xFFFF))
        + raw(pkt)[:cut]
    )
    a, b = _split(frame, pure), _split(frame, COMPILED)
    assert a[0] == b[0] and a[1] == b[1]


_SEG = tb.tso_frame(tb.tcp_packet(bytes(range(250)) * 12), 1000)[10:]  # 3040 bytes, thl 20


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("ihl", "thl", "total", "mss", "out"),
    [
        (20, 20, len(_SEG), 1000, 100),  # out too small for the segments
        (20, 20, len(_SEG), 1000, 3 * 1040 - 1),  # a byte short of three segments
        (20, 20, len(_SEG), 0, 65536),  # mss 0: C divided by it before checking (SIGFPE)
        (20, 20, len(_SEG), -1, 65536),
        (20, 20, len(_SEG), 65535 - 40 + 1, 65536),  # a segment beyond 65535 (struct.error)
        (2**63 - 1, 2**63 - 1, len(_SEG), 1000, 65536),  # ihl + thl wrapped past the checks
        (2**62, 2**62, len(_SEG), 1000, 65536),  # (SIGSEGV, or worse)
        (2**63 - 1, -(2**63) + 41, len(_SEG), 1000, 65536),
        (2**64, 20, len(_SEG), 1000, 65536),  # beyond Py_ssize_t: C raised OverflowError
        (-20, 20, len(_SEG), 1000, 65536),
        (20, 64, len(_SEG), 1000, 65536),  # a TCP header longer than 60
        (22, 20, len(_SEG), 1000, 65536),  # not a multiple of 4
        (20, 20, len(_SEG) + 1, 1000, 65536),  # more than the packet holds
        (20, 20, 39, 1000, 65536),  # less than its headers
        (20, 20, 2**63 - 1, 1, 65536),
    ],
)
def test_segment_drops_what_it_cannot_cut(backend, ihl, thl, total, mss, out):
    """core/batch.py rule 8: outside its bounds nothing is written, the stride is 0, and
    nothing raises or crashes (issue 22, item 7)."""
    buf = bytearray(b"\xa5" * out)
    assert backend.segment(_SEG, ihl, thl, total, mss, buf) == 0
    assert buf == b"\xa5" * out


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_cuts_exactly_what_fits(backend):
    """The bounds of rule 8 are not tighter than they must be: the largest mss, and an
    ``out`` of exactly the segments' size."""
    assert backend.segment(_SEG, 20, 20, len(_SEG), 1000, bytearray(3 * 1040)) == 1040
    stride = backend.segment(_SEG, 20, 20, len(_SEG), 65535 - 40, bytearray(65536))
    assert stride == (65535 + 3) & ~3


@pytest.mark.parametrize("backend", BACKENDS)
def test_seal_refuses_a_counter_that_would_wrap(backend):
    """A nonce twice under one key: the last counter of a batch is at most 2**64 - 1. The C
    code wrapped to 0; Python raised struct.error. Both now raise ValueError."""
    assert len(backend.seal_batch(KEY, INDEX, 2**64 - 2, [b"a", b"b"])) == 2 * 33
    with pytest.raises(ValueError):
        backend.seal_batch(KEY, INDEX, 2**64 - 2, [b"a", b"b", b"c"])
    with pytest.raises(ValueError):
        backend.seal_batch(KEY, INDEX, 2**64, [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", [-1, 2**32, 2**64 + INDEX, 2**70])
def test_an_index_outside_u32_is_misuse_in_both(backend, index):
    """The C code read the index without overflow checks: 2**64 + INDEX sealed as INDEX."""
    with pytest.raises(ValueError):
        backend.seal_batch(KEY, index, 0, [b"a"])
    datagrams = [pure.seal_batch(KEY, INDEX, 0, [ipv4(40)])]
    with pytest.raises(ValueError):
        backend.open_batch(KEY, index, LIMIT, ReplayWindow(), SRC, datagrams, 0)
    for limit in (-1, 2**64):
        with pytest.raises(ValueError):
            backend.open_batch(KEY, INDEX, limit, ReplayWindow(), SRC, datagrams, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_start_is_clamped_to_the_batch(backend):
    datagrams = split(pure.seal_batch(KEY, INDEX, 0, [ipv4(40)] * 3), [ipv4(40)] * 3)
    for start, stop, opened_ in ((-1, 3, 3), (-(2**70), 3, 3), (2**70, 3, 0), (1, 3, 2)):
        got = backend.open_batch(KEY, INDEX, LIMIT, ReplayWindow(), SRC, datagrams, start)
        assert (got[0], len(got[1])) == (stop, opened_)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_super_packet_whose_segments_exceed_an_ip_packet_is_malformed(backend):
    """gso_size + headers > 65535: the split drops it (the pure path raised struct.error)."""
    pkt = tb.tcp_packet(os.urandom(3000))
    stats = Stats()
    frame = tb.tso_frame(pkt, 65535 - 40 + 1)
    assert split_tcp_batch(frame, stats, bytearray(2 * 65536), backend.segment) == []
    assert stats.dropped(DropReason.MALFORMED_PACKET) == 1
    assert split_tcp_batch(frame, stats) == []  # NumPy's path alike
    assert stats.dropped(DropReason.MALFORMED_PACKET) == 2


# ---- coalescing (core/batch.py rule 6) --------------------------------------------------------


def _flows():
    """Segments of a few flows (some sharing headers), cut, reordered, with strangers."""
    one = st.tuples(
        st.integers(1, 4000),
        st.sampled_from([100, 536, 1448]),
        st.sampled_from(tb.FLAG_SETS),
        st.booleans(),
        st.integers(0, 2**32 - 1),
        st.sampled_from([40000, 40001]),
    )
    return st.lists(one, min_size=1, max_size=3)


@given(
    _flows(),
    st.lists(
        st.tuples(
            st.sampled_from(["swap", "drop", "dup", "odd", "cut"]),
            st.integers(0, 10**6),
            st.integers(0, 10**6),
        ),
        max_size=6,
    ),
    st.booleans(),
)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_both_backends_coalesce_alike(flows, edits, partial):
    if COMPILED is None:
        if REQUIRED:
            pytest.fail("TENCRYPT_REQUIRE_FASTPATH=1 but tencrypt._fastpath is not built")
        pytest.skip("tencrypt._fastpath not built")
    packets: list = []
    for size, mss, flags, ts, seq, sport in flows:
        pkt = tb.tcp_packet(
            bytes(size % 251 for size in range(size)),
            seq=seq,
            flags=flags,
            options=tb.TS if ts else (),
            sport=sport,
        )
        packets += tb.kernel_segments(pkt, mss)
    for kind, a, b in edits:
        i, j = a % len(packets), b % len(packets)
        if kind == "swap":
            packets[i], packets[j] = packets[j], packets[i]
        elif kind == "drop" and len(packets) > 1:
            del packets[i]
        elif kind == "dup":
            packets.insert(j, packets[i])
        elif kind == "odd":
            packets.insert(j, bytes(b % 97))
        else:
            packets[i] = packets[i][: b % (len(packets[i]) + 1)]
    packets = [bytearray(p) if k % 2 else p for k, p in enumerate(packets)]
    expected = [(bytes(p), n) for p, n in pure.coalesce(packets, partial)]
    got = COMPILED.coalesce(packets, partial)
    assert [(bytes(p), n) for p, n in got] == expected
    for (p, n), (q, m) in zip(got, pure.coalesce(packets, partial), strict=True):
        assert (p is q) == (n == 0 and m == 0)  # passed through: the same object


@pytest.mark.parametrize("backend", BACKENDS)
def test_coalesce_of_a_64k_split_is_the_super_packet(backend):
    pkt = tb.tcp_packet(os.urandom(65535 - 52), options=tb.TS, flags="PA")
    segments = tb.kernel_segments(pkt, 1448)
    (merged,) = backend.coalesce(segments, False)
    assert bytes(merged[0]) == raw(pkt) and merged[1] == 1448
    (partial,) = backend.coalesce(segments, True)
    assert bytes(partial[0]) == tb.partial_tcp(raw(pkt))
    ack = raw(tb.tcp_packet(b""))
    assert backend.coalesce([ack, b""], False)[0][0] is ack


# ---- rule 7: a Rows batch is its views ---------------------------------------------------------


def gro_read(datagrams: list[bytes]) -> Rows:
    """Datagrams of equal size but a shorter last, laid out as one GRO read is (stride = size)."""
    size = len(datagrams[0])
    return Rows(bytearray(b"".join(datagrams)), size, size, len(datagrams), len(datagrams[-1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_super_packets_rows_seal_open_and_coalesce_as_their_views(backend):
    pkt = tb.tcp_packet(os.urandom(20000), options=tb.TS, flags="PA")
    rows = split_tcp_batch(tb.tso_frame(pkt, 1446), Stats(), bytearray(65536), backend.segment)
    assert isinstance(rows, Rows) and rows.stride > rows.size  # padded rows: the stride counts
    segments = [bytes(r) for r in rows]
    blob = backend.seal_batch(KEY, INDEX, 7, rows)
    assert blob == pure.seal_batch(KEY, INDEX, 7, segments)
    read = gro_read(split(blob, segments))
    for start in (0, 5, len(segments), len(segments) + 3):
        by_rows = opened(backend, read, start=start, allowed=bytes(raw(pkt)[12:16]))
        by_list = opened(backend, list(read), start=start, allowed=bytes(raw(pkt)[12:16]))
        assert by_rows[:3] == by_list[:3]
        assert window_state(by_rows[3]) == window_state(by_list[3])
    assert by_rows[0] == len(segments)  # a start past the end stops at the end
    stop, got, counts, _ = opened(backend, read, allowed=bytes(raw(pkt)[12:16]))
    assert (stop, got, counts["authenticated"]) == (len(segments), segments, len(segments))
    assert [(bytes(p), n) for p, n in backend.coalesce(rows, False)] == [(raw(pkt), 1446)]


@settings(max_examples=120, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(20, 1500),
    st.integers(0, 1480),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=6),
    st.integers(0, 50),
)
def test_both_backends_open_a_tampered_gro_read_alike(n, size, cut, flips, start):
    """A GRO read with bits flipped in place: the Rows and its list of views give the same
    packets, counts and window, in both backends."""
    c = COMPILED
    if c is None:
        if REQUIRED:
            pytest.fail("TENCRYPT_REQUIRE_FASTPATH=1 but tencrypt._fastpath is not built")
        pytest.skip("tencrypt._fastpath not built")
    packets = [ipv4(size)] * (n - 1) + [ipv4(max(20, size - cut))]
    read = gro_read(split(pure.seal_batch(KEY, INDEX, 0, packets), packets))
    buf = read.geometry[0]
    for at, bit in flips:
        buf[at % len(buf)] ^= 1 << bit
    results = []
    for backend in (pure, c):
        for datagrams in (read, list(read)):
            stop, got, counts, window = opened(backend, datagrams, start=start)
            results.append((stop, got, counts, window_state(window)))
    assert all(r == results[0] for r in results[1:])


class _Geometry:
    """A Rows whose geometry was never checked: misuse the C backend must refuse."""

    def __init__(self, *geometry: object) -> None:
        self.geometry = geometry

    def __len__(self) -> int:
        return 0


@needs_c
@pytest.mark.parametrize(
    "geometry",
    [
        (bytearray(24), 4, 6, 2, 4),
        (bytearray(24), 8, 6, 2, 7),
        (bytearray(24), 10, 6, 3, 6),
        (bytearray(24), 8, 6, -1, 0),
        (bytearray(24), 2**62, 6, 4, 1),
        (bytearray(24), 0, 0, 2**31, 0),  # no stride: a 32 GB calloc for its pieces
        ("text", 8, 6, 1, 1),
    ],
)
def test_the_c_backend_refuses_a_geometry_outside_its_buffer(geometry):
    assert COMPILED is not None
    with pytest.raises((ValueError, TypeError)):
        COMPILED.seal_batch(KEY, INDEX, 0, _Geometry(*geometry))
    with pytest.raises((ValueError, TypeError)):
        COMPILED.open_batch(KEY, INDEX, LIMIT, ReplayWindow(), SRC, _Geometry(*geometry), 0)
