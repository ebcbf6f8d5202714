"""Every public entry point of the C extension ``tencrypt._fastpath`` with random, right-typed,
adversarial arguments (core/fastpath.py rule 8), against its pure twin: the same result or the
same exception type, the same bytes written and the same replay window left; never a crash.

Ints are drawn around every bound the code checks (0, 19/20/60/61, 2**16, 2**31, 2**32,
2**63, 2**64, negatives) and far beyond 64 bits; buffers are random or real packets with
random header fields. Bounded: a fixed number of examples per entry point, no deadline, a
few seconds in all (``TENCRYPT_FUZZ_EXAMPLES=N`` for a longer hunt). IPv6 inputs (a 6 nibble
then anything, truncated headers, payload lengths that lie, extension headers) are drawn by
the ``_ipv6`` tests at the end. A crash in C kills the
pytest process (faulthandler prints where), so the run fails. With
TENCRYPT_REQUIRE_FASTPATH=1 (CI) a missing extension fails instead of skipping."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.all import raw

from tencrypt import fastpath as selection
from tencrypt.core import fastpath as pure
from tencrypt.core.batch import Rows, split_tcp_batch
from tencrypt.core.replay import WINDOW, ReplayWindow
from tencrypt.core.stats import Stats
from tests.unit import test_batch as tb
from tests.unit import test_batch_ipv6 as t6

C = selection.compiled()
REQUIRED = os.environ.get("TENCRYPT_REQUIRE_FASTPATH") == "1"
# TENCRYPT_FUZZ_EXAMPLES: more examples for a longer hunt (e.g. under ASan); CI runs 300
FUZZ = settings(
    max_examples=int(os.environ.get("TENCRYPT_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

EDGES = [0, 1, 2, 3, 4, 19, 20, 21, 24, 32, 39, 40, 59, 60, 61, 64, 1000, 1448, 65495]
EDGES += [65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
EDGES += [2**64, 2**64 + 5, 2**100]
EDGES += [-n for n in EDGES if n]
ANY_INT = st.one_of(st.sampled_from(EDGES), st.integers(-(2**70), 2**70), st.integers(-5, 200))
KEY = bytes(range(32))
INDEX = 0x11223344


def compiled():
    if C is None:
        if REQUIRED:
            pytest.fail("TENCRYPT_REQUIRE_FASTPATH=1 but tencrypt._fastpath is not built")
        pytest.skip("tencrypt._fastpath not built")
    return C


def both(name: str, *args, copy=None):
    """Call ``name`` on both backends; each result, or the exception type it raised.
    ``copy(args)`` gives each backend its own copy of what it writes to."""
    out = []
    for backend in (pure, compiled()):
        call_args = copy(args) if copy is not None else args
        try:
            out.append((getattr(backend, name)(*call_args), call_args))
        except (ValueError, TypeError, OverflowError) as exc:
            out.append((type(exc), call_args))
    return out


# ---- segment ---------------------------------------------------------------------------------


def _tcp(payload: int, options: bool) -> bytes:
    return raw(
        tb.tcp_packet(bytes(i % 253 for i in range(payload)), options=tb.TS if options else ())
    )


@st.composite
def _geometry(draw):
    """Half the time a real packet and the geometry split_tcp_batch reads from it (a cut or
    a drop by a byte either way), else anything: random bytes and adversarial ints."""
    if draw(st.booleans()):
        ts = draw(st.booleans())
        packet = _tcp(draw(st.integers(0, 4000)), ts)
        ihl, thl, total = 20, 32 if ts else 20, len(packet)
        mss = draw(st.one_of(st.integers(1, 1500), st.integers(65535 - 80, 65536)))
        n = max(1, -(-(total - ihl - thl) // mss))
        need = n * ((ihl + thl + mss + 3) & ~3)
        out_len = draw(st.one_of(st.just(need), st.integers(max(0, need - 2), need + 2)))
        if draw(st.integers(0, 4)) == 0:  # one field off by a little
            which = draw(st.integers(0, 3))
            delta = draw(st.sampled_from([-4, -1, 1, 4]))
            ihl, thl, total, mss = [
                v + delta if k == which else v for k, v in enumerate((ihl, thl, total, mss))
            ]
        return packet, ihl, thl, total, mss, min(out_len, 70000)
    packet = draw(st.binary(max_size=3000))
    ints = [draw(st.one_of(st.integers(-10, 4200), ANY_INT)) for _ in range(4)]
    return (packet, *ints, draw(st.integers(0, 20000)))


@FUZZ
@given(_geometry())
def test_segment(geometry):
    packet, ihl, thl, total, mss, out_len = geometry
    (a, out_a), (b, out_b) = both(
        "segment",
        packet,
        ihl,
        thl,
        total,
        mss,
        bytearray(out_len),
        copy=lambda args: (*args[:5], bytearray(args[5])),
    )
    assert a == b
    event("dropped" if a == 0 else "cut")
    if a == 0:
        assert out_a[5] == out_b[5] == bytearray(out_len)  # a drop writes nothing
        return
    hlen, payload = ihl + thl, total - ihl - thl
    n = max(1, -(-payload // mss))
    for i in range(n):  # the packets; padding between them is not part of rule 4
        size = hlen + (mss if i < n - 1 else payload - (n - 1) * mss)
        assert out_a[5][i * a : i * a + size] == out_b[5][i * a : i * a + size]
    assert out_a[5][n * a :] == out_b[5][n * a :] == bytearray(out_len - n * a)


# ---- coalesce --------------------------------------------------------------------------------


def _mangle(pkt: bytes, field: int, value: int, cut: int) -> bytes:
    """One header field of a TCP/IPv4 packet set to a random value, then maybe cut short."""
    b = bytearray(pkt)
    if not b:
        return pkt
    ihl = (b[0] & 0x0F) * 4
    at = [0, 2, 6, 9, ihl + 4, ihl + 12, ihl + 13, len(b) - 1][field % 8]
    if at + 2 <= len(b):
        struct.pack_into("!H", b, at, value & 0xFFFF)
    return bytes(b[: len(b) - cut % (len(b) + 1)] if cut % 3 == 0 else b)


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.integers(1, 3000),
                st.sampled_from([100, 536, 1448]),
                st.sampled_from(tb.FLAG_SETS),
                st.integers(0, 2**32 - 1),
            ),
            st.binary(max_size=120),
        ),
        max_size=4,
    ),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7), ANY_INT, ANY_INT), max_size=8),
    st.booleans(),
    st.booleans(),
)
def test_coalesce(flows, mangles, partial, as_rows):
    packets: list[bytes] = []
    for flow in flows:
        if isinstance(flow, bytes):
            packets.append(flow)
            continue
        size, mss, flags, seq = flow
        pkt = tb.tcp_packet(bytes(i % 251 for i in range(size)), seq=seq, flags=flags)
        packets += [bytes(p) for p in tb.kernel_segments(pkt, mss)]
    for at, field, value, cut in mangles:
        if packets:
            i = at % len(packets)
            packets[i] = _mangle(packets[i], field, value, cut)
    batch: object = packets
    if as_rows and packets:  # a GRO read's shape: equal strides, each padded with zeros
        stride = max(1, max(len(p) for p in packets))
        size = stride
        last = len(packets[-1])
        buf = bytearray(b"".join(p.ljust(stride, b"\0") for p in packets))
        batch = Rows(buf, stride, size, len(packets), last)
    (a, _), (b, _) = both("coalesce", batch, partial)
    event("merged" if any(n for _, n in a) else "passed through")
    assert [(bytes(p), n) for p, n in a] == [(bytes(p), n) for p, n in b]


# ---- seal_batch and open_batch ---------------------------------------------------------------


@FUZZ
@given(
    st.one_of(st.just(KEY), st.binary(max_size=40)),
    st.one_of(st.just(INDEX), ANY_INT),
    st.one_of(st.integers(0, 2**64 - 1), ANY_INT),
    st.lists(st.binary(max_size=300), max_size=8),
    st.booleans(),
)
def test_seal_batch(key, index, counter, packets, as_rows):
    batch: object = packets
    if as_rows and packets:
        stride = max(1, max(len(p) for p in packets))
        buf = bytearray(b"".join(p.ljust(stride, b"\0") for p in packets))
        batch = Rows(buf, stride, stride, len(packets), stride)
    (a, _), (b, _) = both("seal_batch", key, index, counter, batch)
    event("refused" if isinstance(a, type) else "sealed")
    assert a == b


def _window(marks: list[int]) -> ReplayWindow:
    w = ReplayWindow()
    for m in marks:
        w.update(m)
    return w


def _state(w: ReplayWindow) -> tuple[int, bytes]:
    return w.top, bytes(w.ring)


@FUZZ
@given(
    # one_of picks a branch uniformly: the session's own key and index most of the time
    st.one_of(st.just(KEY), st.just(KEY), st.just(KEY), st.binary(max_size=40)),
    st.one_of(st.just(INDEX), st.just(INDEX), st.just(INDEX), ANY_INT),
    st.one_of(st.sampled_from([2**64 - 2**13 - 1, 2**64 - 1, 0, 100]), ANY_INT),
    st.lists(st.integers(0, 3 * WINDOW) | st.integers(0, 2**64 - 1), max_size=3),
    st.one_of(st.binary(min_size=4, max_size=13), st.binary(max_size=13)),
    st.lists(
        st.one_of(
            *[st.tuples(st.integers(0, 3 * WINDOW), st.integers(0, 80))] * 3,
            st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 80)),
            st.binary(min_size=24, max_size=80),  # this session's header, then anything
            st.binary(max_size=24),
        ),
        min_size=1,
        max_size=10,
    ),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=2),
    st.one_of(st.just(0), st.just(0), st.integers(-3, 12), ANY_INT),
)
def test_open_batch(key, index, limit, marks, allowed, items, flips, start):
    datagrams: list[bytes] = []
    for item in items:
        if isinstance(item, bytes):
            datagrams.append(b"\x04\x00\x00\x00" + struct.pack("<I", INDEX) + item)
            continue
        counter, size = item
        inner = struct.pack("!BBH8x4s4s", 0x45, 0, max(20, size), allowed[:4].ljust(4, b"\0"), b"")
        inner = (inner + bytes(max(0, size - 20)))[: max(20, size)] if size else b""
        datagrams.append(pure.seal_batch(KEY, INDEX, counter, [inner]))
    for at, bit in flips:
        if datagrams:
            i = at % len(datagrams)
            d = bytearray(datagrams[i])
            if d:
                d[at % len(d)] ^= 1 << bit
            datagrams[i] = bytes(d)
    (a, args_a), (b, args_b) = both(
        "open_batch",
        key,
        index,
        limit,
        _window(marks),
        allowed,
        datagrams,
        start,
        copy=lambda args: (*args[:3], _window(marks), *args[4:]),
    )
    assert a == b
    event("refused" if isinstance(a, type) else f"opened {min(len(a[1]), 2)} (2: or more)")
    assert _state(args_a[3]) == _state(args_b[3])
    if isinstance(a, type):  # misuse: refused before anything changed
        assert _state(args_a[3]) == _state(_window(marks))


# ---- Rows geometry and the RFC 8439 entry points ---------------------------------------------


class _Geometry:
    def __init__(self, *geometry: object) -> None:
        self.geometry = geometry


@FUZZ
@given(st.integers(0, 64), ANY_INT, ANY_INT, ANY_INT, ANY_INT)
def test_any_rows_geometry(buf_len, stride, size, count, last):
    """A geometry Rows accepts gives the same as its views; any other is refused by C with
    ValueError (or OverflowError past 64 bits), never read, never allocated for."""
    c = compiled()
    buf = bytearray(os.urandom(buf_len))
    try:
        rows = Rows(buf, stride, size, count, last)
    except ValueError:
        with pytest.raises((ValueError, OverflowError)):
            c.seal_batch(KEY, INDEX, 0, _Geometry(buf, stride, size, count, last))
        with pytest.raises((ValueError, OverflowError)):
            c.coalesce(_Geometry(buf, stride, size, count, last), False)
        return
    assert c.seal_batch(KEY, INDEX, 0, rows) == pure.seal_batch(KEY, INDEX, 0, list(rows))


@FUZZ
@given(
    st.one_of(st.just(KEY), st.binary(max_size=40)),
    st.one_of(st.binary(min_size=12, max_size=12), st.binary(max_size=16)),
    st.binary(max_size=64),
    st.binary(max_size=300),
    st.integers(-1, 400),
)
def test_aead_entry_points(key, nonce, aad, data, flip):
    """``aead_seal``/``aead_open`` (the RFC 8439 vectors' way in) against cryptography's
    ChaCha20Poly1305: the same bytes; a wrong key or nonce size, or too short a message to
    open, is ValueError; a forged one None."""
    c = compiled()
    if len(key) != 32 or len(nonce) != 12:
        with pytest.raises(ValueError):
            c.aead_seal(key, nonce, aad, data)
        with pytest.raises(ValueError):
            c.aead_open(key, nonce, aad, data)
        return
    sealed = c.aead_seal(key, nonce, aad, data)
    assert sealed == ChaCha20Poly1305(key).encrypt(nonce, data, aad)
    if 0 <= flip < len(sealed):
        sealed = sealed[:flip] + bytes([sealed[flip] ^ 1]) + sealed[flip + 1 :]
    try:
        expected: bytes | None = ChaCha20Poly1305(key).decrypt(nonce, sealed, aad)
    except InvalidTag:
        expected = None
    assert c.aead_open(key, nonce, aad, sealed) == expected
    if len(data) < 16:
        with pytest.raises(ValueError):
            c.aead_open(key, nonce, aad, data)


# ---- IPv6 (core/batch.py rule 2a, rule 6; core/fastpath.py rule 2's allowed6) ---------------


def _tcp6(payload: int, options: bool) -> bytes:
    pkt = t6.tcp6_packet(bytes(i % 253 for i in range(payload)), options=tb.TS if options else ())
    return raw(pkt)


@st.composite
def _geometry6(draw):
    """A real IPv6 packet and its geometry (a field off by a little, the packet cut short), or
    random bytes that start with a 6 nibble and adversarial ints."""
    if draw(st.booleans()):
        ts = draw(st.booleans())
        packet = _tcp6(draw(st.integers(0, 4000)), ts)
        ihl, thl, total = 40, 32 if ts else 20, len(packet)
        mss = draw(st.one_of(st.integers(1, 1500), st.integers(65535 - 100, 65536)))
        n = max(1, -(-(total - ihl - thl) // mss))
        need = n * ((ihl + thl + mss + 3) & ~3)
        out_len = draw(st.one_of(st.just(need), st.integers(max(0, need - 2), need + 2)))
        if draw(st.integers(0, 3)) == 0:
            which = draw(st.integers(0, 3))
            delta = draw(st.sampled_from([-20, -4, -1, 1, 4, 20]))
            ihl, thl, total, mss = [
                v + delta if k == which else v for k, v in enumerate((ihl, thl, total, mss))
            ]
        if draw(st.integers(0, 4)) == 0:
            packet = packet[: draw(st.integers(0, len(packet)))]
        return packet, ihl, thl, total, mss, min(out_len, 70000)
    packet = bytes([0x60 | draw(st.integers(0, 15))]) + draw(st.binary(max_size=3000))
    ints = [draw(st.one_of(st.sampled_from([40, 20, 60]), ANY_INT)) for _ in range(2)]
    ints += [draw(st.one_of(st.integers(-10, 4200), ANY_INT)) for _ in range(2)]
    return (packet, *ints, draw(st.integers(0, 20000)))


@FUZZ
@given(_geometry6())
def test_segment_ipv6(geometry):
    test_segment.hypothesis.inner_test(geometry)  # the same checks as IPv4's


@FUZZ
@given(
    st.integers(0, 4200),
    st.booleans(),
    st.sampled_from([4, 4, 4 | 0x80, 0, 1, 3, 5, 0xFF]),  # TCPV6 (ECN), none, TCPV4, UDP, ...
    st.one_of(st.sampled_from([1, 100, 1428]), st.sampled_from([0, 65535]), st.integers()),
    st.integers(0, 15),  # which lies: 8 and above none
    st.integers(0, 0xFFFF),
    st.integers(0, 4300),
    st.sampled_from([6, 0, 17, 60, 43, 44]),  # next header: TCP, extension headers, UDP
)
def test_split_ipv6_frames(payload, ts, gso, size, lie, plen, cut, nh):
    """A TSO6 frame read from tenc0, its header lying (payload length, next header, the
    frame cut short): split_tcp_batch cuts it alike through both backends' ``segment``."""
    c = compiled()
    wire = bytearray(_tcp6(payload, ts))
    lie = 0 if lie >= 8 else lie
    size &= 0xFFFF
    if lie & 1:
        struct.pack_into("!H", wire, 4, plen)
    if lie & 2:
        wire[6] = nh
    if lie & 4:
        wire = wire[: cut % (len(wire) + 1)]
    hdr = struct.pack("=BBHHHH", 1, gso, 0, size, 40, 16)
    frame = hdr + bytes(wire)
    got = []
    for backend in (pure, c):
        stats = Stats()
        views = split_tcp_batch(frame, stats, bytearray(2 * 65536), backend.segment)
        got.append(([bytes(v) for v in views], dict(stats.drops)))
    event("cut" if len(got[0][0]) > 1 else "dropped" if not got[0][0] else "one")
    assert got[0] == got[1]


def _mangle6(pkt: bytes, field: int, value: int, cut: int) -> bytes:
    """One header field of a TCP/IPv6 packet set to a random value, then maybe cut short."""
    b = bytearray(pkt)
    at = [0, 2, 4, 6, 40 + 4, 40 + 12, 40 + 13, len(b) - 2][field % 8]
    if at >= 0 and at + 2 <= len(b):
        struct.pack_into("!H", b, at, value & 0xFFFF)
    return bytes(b[: len(b) - cut % (len(b) + 1)] if cut % 3 == 0 else b)


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.integers(1, 3000),
                st.sampled_from([100, 536, 1428]),
                st.sampled_from(tb.FLAG_SETS),
                st.integers(0, 2**32 - 1),
                st.booleans(),  # IPv6, else IPv4
            ),
            st.binary(max_size=120).map(lambda b: b"\x60" + b),
        ),
        max_size=4,
    ),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7), ANY_INT, ANY_INT), max_size=8),
    st.booleans(),
)
def test_coalesce_ipv6(flows, mangles, partial):
    packets: list[bytes] = []
    for flow in flows:
        if isinstance(flow, bytes):
            packets.append(flow)
            continue
        size, mss, flags, seq, v6 = flow
        payload = bytes(i % 251 for i in range(size))
        if v6:
            packets += t6.kernel_segments6(t6.tcp6_packet(payload, seq=seq, flags=flags), mss)
        else:
            pkt = tb.tcp_packet(payload, seq=seq, flags=flags)
            packets += [bytes(p) for p in tb.kernel_segments(pkt, mss)]
    for at, field, value, cut in mangles:
        if packets:
            i = at % len(packets)
            p = packets[i]
            packets[i] = (_mangle6 if p[:1] and p[0] >> 4 == 6 else _mangle)(p, field, value, cut)
    (a, _), (b, _) = both("coalesce", packets, partial)
    event("merged" if any(n for _, n in a) else "passed through")
    assert [(bytes(p), n) for p, n in a] == [(bytes(p), n) for p, n in b]


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(st.integers(0, 80), st.integers(0, 0xFFFF), st.booleans()),
            st.binary(max_size=80).map(lambda b: b"\x6f" + b),
        ),
        min_size=1,
        max_size=10,
    ),
    st.one_of(st.binary(max_size=40), st.binary(min_size=16, max_size=16)),
    st.binary(max_size=9),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=2),
    st.one_of(st.just(0), st.integers(-3, 12)),
)
def test_open_batch_ipv6(items, allowed6, allowed, flips, start):
    """IPv6 plaintexts: exact, truncated, payload length lying, a 6 nibble and anything; the
    sources from ``allowed6`` (random bytes, a whole or partial address) or not."""
    inners = []
    for item in items:
        if isinstance(item, bytes):
            inners.append(item)
            continue
        size, plen, honest = item
        src = allowed6[:16].ljust(16, b"\0")
        inner = struct.pack("!IHBB16s16s", 6 << 28, size if honest else plen, 6, 64, src, b"")
        inners.append(inner + bytes(size))
    datagrams = [pure.seal_batch(KEY, INDEX, n, [p]) for n, p in enumerate(inners)]
    for at, bit in flips:
        d = bytearray(datagrams[at % len(datagrams)])
        d[at % len(d)] ^= 1 << bit
        datagrams[at % len(datagrams)] = bytes(d)
    (a, args_a), (b, args_b) = both(
        "open_batch",
        KEY,
        INDEX,
        2**64 - 1,
        ReplayWindow(),
        allowed,
        datagrams,
        start,
        allowed6,
        copy=lambda args: (*args[:3], ReplayWindow(), *args[4:]),
    )
    assert a == b
    event(f"opened {min(len(a[1]), 2)} (2: or more)")
    assert _state(args_a[3]) == _state(args_b[3])
