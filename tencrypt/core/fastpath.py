"""The data path's loops, one call per batch: the pure-Python specification of the C extension
``tencrypt._fastpath`` (tencrypt/_fastpath.c, _fastpath_tcp.c). Both have this module's API
and must give the same bytes, the same counts and leave the same replay state;
tests/unit/test_fastpath.py runs every test against both and differential tests feed both the
same random input. tencrypt/fastpath.py chooses one at start.

Rules:
1. ``seal_batch(key, receiver_index, counter, packets)`` seals packet ``i`` into one data
   message (core/wire.py: the 16-byte header ``4, 0, 0, 0 || receiver_index u32 LE || counter
   + i u64 LE`` as associated data, nonce ``4 zero bytes || counter + i LE``, tag 16) and lays
   the messages back to back in one new buffer: the packets of one TSO super-packet (equal
   sizes but the last) come out ready for one UDP GSO send. It cannot fail on input: any
   buffer is a plaintext. The caller owns the counters (``counter + len(packets)`` is next).
2. ``open_batch(key, receiver_index, limit, window, allowed, datagrams, start, allowed6=b"")``
   walks
   ``datagrams`` from ``start`` and stops at the first one that is not a data message of this
   session (shorter than 32 bytes, a first word other than 4, another receiver index): it
   returns that position, and the caller hands the rest to ``Tunnel.receive``. Each message
   of the session passes the stages of ``Tunnel._on_data`` in its order: counter at or above
   ``limit`` (EXPIRED), replay check (REPLAY), AEAD (BAD_TAG), replay mark (only now), then
   the plaintext: empty is a keepalive; otherwise an IPv4 packet (first byte 0x45..0x4f, the
   total length exact) whose source is one of the 4-byte addresses in ``allowed``, or an
   IPv6 packet (first nibble 6, at least 40 bytes, 40 + its payload length exact) whose
   source is one of the 16-byte addresses in ``allowed6`` (optional, positional, empty by
   default: no IPv6 source is allowed), is returned. Anything else is NOT_IPV4 (read "not an
   IP packet": ``NOT_IP`` is the same field), a packet of either family from a source not in
   its list BAD_SOURCE. A trailing part of ``allowed`` or ``allowed6`` shorter than one
   address is ignored. Nothing raises; every message is counted exactly once.
3. The per-session checks (index known, keys held, not expired) and what an authenticated
   message changes about its peer are the caller's, once per batch (``Tunnel.receive_batch``).
4. ``segment(packet, ihl, thl, total, mss, out)`` cuts a TSO super-packet whose headers
   ``core.batch.split_tcp_batch`` checked into its MSS segments, written into ``out`` one
   every ``stride`` bytes (returned): core/batch.py rules 2-4, byte for byte. The family is
   the packet's first nibble: 6 is IPv6 (rule 2a: ``ihl`` must be 40, ``total`` is 40 + the
   payload length), anything else IPv4's rules. Arguments outside
   ``core.batch.segmentable`` (header lengths, mss, total) or segments that do not fit in
   ``out`` are a drop: nothing is written and the stride is 0.
5. ``coalesce(packets, partial)`` is ``core.batch.coalesce_batch`` (IPv4 and IPv6, rule 6):
   the same (packet, gso_size) pairs, a packet that is not merged passed through as the same
   object.
6. The replay window is ``core.replay.ReplayWindow``: ``ring`` a writable buffer of 128
   native u64 words, ``top`` an int; the C loop reads and writes the same two.
7. ``packets`` and ``datagrams`` are a list or tuple of buffers, or a ``core.batch.Rows``
   (a super-packet's segments, a GRO read's datagrams): the same packets as its views. The
   C backend reads a Rows' ``geometry`` instead, so a batch costs no Python object per packet.
8. No input of the right types crashes either backend or makes them differ: any bytes in
   ``packets`` and ``datagrams``, any ints for ``segment``'s geometry and ``open_batch``'s
   ``start`` (below 0 is 0, past the end is the end). Only misuse that no packet can cause
   raises, in both backends alike: a key that is not 32 bytes or an index, counter or limit
   outside its field (ValueError; ``counter + len(packets) > 2**64`` too, since the last
   nonce would wrap around to one used before), a window that is not a ReplayWindow, a
   batch that is not buffers. tests/unit/test_fastpath_fuzz.py holds both to this.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tencrypt.core import batch
from tencrypt.core.replay import ReplayWindow
from tencrypt.core.stats import Counter, DropReason, Stats

Buffer = bytes | bytearray | memoryview

NAME = "python"
DATA_OVERHEAD = 32  # wire.DATA_OVERHEAD: header 16 + tag 16
_HEADER = struct.Struct("<IIQ")
_U32_MAX, _U64_MAX = 2**32 - 1, 2**64 - 1
_NONCE_PAD = b"\x00\x00\x00\x00"

# The fields of ``open_batch``'s counts tuple, in order.
COUNTS = (
    "authenticated",
    "keepalives",
    "expired",
    "replay",
    "bad_tag",
    "not_ipv4",
    "bad_source",
    "bytes_opened",
)
AUTHENTICATED, KEEPALIVES, EXPIRED, REPLAY, BAD_TAG, NOT_IPV4, BAD_SOURCE, BYTES_OPENED = range(8)
NOT_IP = NOT_IPV4  # neither an IPv4 nor an IPv6 packet (rule 2): one field, one drop reason

OpenResult = tuple[int, list[bytes], tuple[int, ...]]
_DROPS = (
    (EXPIRED, DropReason.EXPIRED_SESSION),
    (REPLAY, DropReason.REPLAY),
    (BAD_TAG, DropReason.BAD_TAG),
    (NOT_IPV4, DropReason.NOT_IPV4),
    (BAD_SOURCE, DropReason.BAD_SOURCE),
)


class Backend(Protocol):
    """What ``Tunnel`` needs of a backend: this module, or the compiled ``tencrypt._fastpath``."""

    NAME: str

    def seal_batch(
        self, key: bytes, receiver_index: int, counter: int, packets: Sequence[Buffer]
    ) -> bytes: ...

    def open_batch(
        self,
        key: bytes,
        receiver_index: int,
        limit: int,
        window: ReplayWindow,
        allowed: bytes,
        datagrams: Sequence[Buffer],
        start: int,
        allowed6: bytes = b"",
    ) -> OpenResult: ...

    def segment(
        self, packet: Buffer, ihl: int, thl: int, total: int, mss: int, out: bytearray
    ) -> int: ...

    def coalesce(self, packets: Sequence[Buffer], partial: bool) -> list[tuple[Buffer, int]]: ...


def seal_batch(key: bytes, receiver_index: int, counter: int, packets: Sequence[Buffer]) -> bytes:
    """Rule 1 (rule 8: the misuse that raises)."""
    aead = ChaCha20Poly1305(key)
    if not 0 <= receiver_index <= _U32_MAX or not 0 <= counter <= _U64_MAX:
        raise ValueError("seal_batch: receiver_index or counter out of range")
    if counter + len(packets) > _U64_MAX + 1:
        raise ValueError("seal_batch: counter + len(packets) > 2**64")
    pack = _HEADER.pack
    parts: list[bytes] = []
    for packet in packets:
        header = pack(4, receiver_index, counter)
        parts.append(header)
        parts.append(aead.encrypt(_NONCE_PAD + header[8:], packet, header))
        counter += 1
    return b"".join(parts)


def open_batch(
    key: bytes,
    receiver_index: int,
    limit: int,
    window: ReplayWindow,
    allowed: bytes,
    datagrams: Sequence[Buffer],
    start: int,
    allowed6: bytes = b"",
) -> OpenResult:
    """Rule 2: ``(stop, packets, counts)``; ``counts`` in the order of ``COUNTS``."""
    aead = ChaCha20Poly1305(key)
    if not 0 <= receiver_index <= _U32_MAX or not 0 <= limit <= _U64_MAX:
        raise ValueError("open_batch: receiver_index or limit out of range")
    start = min(max(start, 0), len(datagrams))  # rule 8
    sources = {bytes(allowed[i : i + 4]) for i in range(0, len(allowed) - 3, 4)}
    sources6 = {bytes(allowed6[i : i + 16]) for i in range(0, len(allowed6) - 15, 16)}
    counts = [0] * len(COUNTS)
    packets: list[bytes] = []
    i = start
    for i in range(start, len(datagrams)):
        view = memoryview(datagrams[i])
        if len(view) < DATA_OVERHEAD:
            break
        word, index, counter = _HEADER.unpack_from(view)
        if word != 4 or index != receiver_index:
            break
        if counter >= limit:
            counts[EXPIRED] += 1
            continue
        if not window.check(counter):
            counts[REPLAY] += 1
            continue
        try:
            packet = aead.decrypt(_NONCE_PAD + view[8:16], view[16:], view[:16])
        except InvalidTag:
            counts[BAD_TAG] += 1
            continue
        window.update(counter)
        counts[AUTHENTICATED] += 1
        n = len(packet)
        if n == 0:
            counts[KEEPALIVES] += 1
            continue
        if n >= 20 and 0x45 <= packet[0] <= 0x4F and (packet[2] << 8 | packet[3]) == n:
            allowed_source = packet[12:16] in sources
        elif n >= 40 and packet[0] >> 4 == 6 and 40 + (packet[4] << 8 | packet[5]) == n:
            allowed_source = packet[8:24] in sources6
        else:
            counts[NOT_IP] += 1
            continue
        if not allowed_source:
            counts[BAD_SOURCE] += 1
        else:
            counts[BYTES_OPENED] += n
            packets.append(packet)
    else:
        i = len(datagrams)
    return i, packets, tuple(counts)


def segment(packet: Buffer, ihl: int, thl: int, total: int, mss: int, out: bytearray) -> int:
    """Rule 4: NumPy's segmentation (core/batch.py), into ``out``; 0 when it is a drop."""
    version = packet[0] >> 4 if len(packet) else 4
    if not batch.segmentable(ihl, thl, total, mss, len(packet), version):
        return 0
    stride = (ihl + thl + mss + 3) & ~3
    if max(1, -(-(total - ihl - thl) // mss)) > len(out) // stride:
        return 0
    batch._segment(memoryview(packet), ihl, thl, total, mss, out)
    return stride


def coalesce(packets: Sequence[Buffer], partial: bool) -> list[tuple[Buffer, int]]:
    """Rule 5."""
    return [(c.packet, c.gso_size) for c in batch.coalesce_batch(packets, partial=partial)]


def count(stats: Stats, counts: Sequence[int], opened: int) -> None:
    """Record one ``open_batch`` in ``stats`` under the names ``Tunnel._on_data`` uses."""
    for field, reason in _DROPS:
        if counts[field]:
            stats.drop(reason, counts[field])
    if counts[KEEPALIVES]:
        stats.inc(Counter.KEEPALIVES_RECEIVED, counts[KEEPALIVES])
    if opened:
        stats.inc(Counter.PACKETS_OPENED, opened)
        stats.inc(Counter.BYTES_OPENED, counts[BYTES_OPENED])
