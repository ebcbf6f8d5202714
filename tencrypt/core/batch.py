"""The batch path's pure building blocks: virtio-net headers, TCP super-packet split and coalesce.

Rules:
1. Frames. tenc0 opened with ``IFF_VNET_HDR`` reads and writes a 10-byte ``struct
   virtio_net_hdr`` (linux/virtio_net.h) before each IP packet. Its 16-bit fields are legacy
   virtio, i.e. host byte order for a TUN that never saw ``TUNSETVNETBE`` (drivers/net/tun.c
   ``tun_is_little_endian``). ``hdr_len`` from the kernel is only a hint (the linear length), so
   header lengths are always read from the IP and TCP headers themselves.
2. ``split_tcp_batch`` segments as the kernel's GSO does (net/ipv4/af_inet.c
   ``inet_gso_segment``, net/ipv6/ip6_offload.c ``ipv6_gso_segment``, net/ipv4/tcp_offload.c
   ``tcp_gso_segment``): every segment carries the IP and TCP headers with their options; IP id
   counts up from the super-packet's, total length is per segment; TCP seq advances by
   ``gso_size``; FIN and PSH stay on the last segment only, CWR on the first only; both
   checksums are computed in full, since the kernel hands the TCP one partial
   (``VIRTIO_NET_HDR_F_NEEDS_CSUM``: only the pseudo-header sum). GSO_ECN changes nothing: the
   CWR rule is the whole of it. A frame without GSO that needs its checksum gets it completed
   the way ``skb_checksum_help`` does: sum from ``csum_start`` to the end, folded, complemented.
2a. IPv6 (RFC 8200; gso_type TCPV6): the same segments with the IPv6 header's rules instead —
   no IP checksum and no id; the payload length (bytes 4-5, everything after the fixed
   40-byte header) is per segment; the TCP checksum covers the IPv6 pseudo-header (RFC 8200
   §8.1: both 128-bit addresses, the upper-layer length, next header 6). Traffic class, flow
   label and hop limit are copied unchanged. Extension headers are refused: a TCPV6
   super-packet whose next header is not TCP is MALFORMED_PACKET (never cut with a wrong
   pseudo-header or a wrong TCP offset); the kernel's TCP puts none on its own segments
   unless an application sets IPV6_HOPOPTS/RTHDR/DSTOPTS on its socket. The "ihl" of an
   IPv6 packet, wherever this module and core/fastpath.py take one, is 40. A packet's family
   is its version nibble; a gso_type of the other family is MALFORMED_PACKET.
3. Vectorised: the segments are rows of one NumPy array at a 4-byte aligned stride; a single
   reduction sums every row. Ones' complement arithmetic is arithmetic modulo 0xFFFF
   (2**16 == 1): a little-endian word sum times 256 is the big-endian sum (RFC 1071 §2 (B)),
   and the checksum field is ``-sum mod 0xFFFF``, which gives the same bits as the fold-and-
   complement of RFC 1071 for any packet whose sum is not zero (a header never sums to zero).
4. Output shape: writable memoryviews into one bytearray (``out`` when given and big enough,
   valid until the next call that reuses it), so a segment can be NAT-rewritten in place and
   sealed by itself without a copy. All segments but the last have the same length, so their
   sealed datagrams suit one UDP GSO send; they come as one ``Rows`` (rule 7). A frame
   without GSO comes back as a view into
   ``frame`` itself when that is writable (a reused read buffer: valid until the next read),
   as a copy when it is not.
5. Bad input never raises: the frame is dropped with ``Stats.drop`` (NOT_IPV4: neither IPv4
   nor IPv6; or MALFORMED_PACKET) and the result is an empty list. Any exception here is a bug.
6. ``coalesce_batch`` applies GRO's rule (tcp_offload.c ``tcp_gro_receive``) to *consecutive*
   packets: same IP header but for id, length and checksum; same TCP header but for seq,
   checksum and flags; contiguous seq; every segment but the last of exactly the first one's
   payload size (so that the result can be re-segmented into the same packets); PSH or FIN
   only on the last, CWR only on the first; no SYN, RST or URG; at most 65535 bytes. Pure
   ACKs (no payload), non-TCP packets and fragments pass through as the same objects.
   IPv6 alike (``ipv6_gro_receive``): the same IPv6 header but for the payload length — so
   the same addresses, traffic class, flow label and hop limit — and no extension headers
   (a segment whose next header is not TCP passes through). The 65535-byte bound holds for
   the whole packet in both families. The version nibble is part of the compared bytes: an
   IPv4 and an IPv6 packet never merge.
7. ``Rows`` is a batch of packets laid out in one buffer: packet ``i`` at ``i * stride``, each
   ``size`` bytes long but the last, which is ``last`` bytes (``0 <= last <= size <= stride``,
   and the stride no longer than the buffer).
   The segments of a super-packet (rule 4) and the datagrams of one GRO read have this shape.
   To Python it is a sequence of views, made on demand; the compiled backend reads its
   ``geometry`` and makes no Python object per packet (core/fastpath.py rule 7). A zero
   stride holds at most one packet, so a Rows never counts more packets than its buffer
   bounds, and every number of its geometry is at most the buffer's length plus one.
8. What can be cut is one predicate, ``segmentable``, shared by ``split_tcp_batch`` (a frame
   outside it is MALFORMED_PACKET) and both backends' ``segment`` (outside it: nothing
   written, stride 0): IP and TCP header lengths 20-60 and multiples of 4, ``gso_size`` at
   least 1 and at most what fits in one 65535-byte packet with the headers, the packet's
   total length at least its headers and at most the bytes there are. For an IPv6 packet
   (version nibble 6) the IP header length is exactly 40 (rule 2a) and "total length" is 40
   plus its payload length.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, overload

from tencrypt.core.packet import TCP, UDP, pseudo_sum
from tencrypt.core.stats import DropReason, Stats

Buffer = bytes | bytearray | memoryview
# (packet, ihl, thl, total, mss, out) -> stride: writes the segments into ``out`` (big enough),
# one every stride bytes — _segment's work, e.g. the compiled tencrypt._fastpath.segment
Segmenter = Callable[[Buffer, int, int, int, int, bytearray], int]

# struct virtio_net_hdr, linux/virtio_net.h
VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80
_VNET = struct.Struct("=BBHHHH")


def is_super_packet(frame: Buffer) -> bool:
    """Whether a frame read from tenc0 carries a segmentation offload (its virtio-net header's
    gso_type, byte 1, is not GSO_NONE): a TCP super-packet to split."""
    return frame[1] != VIRTIO_NET_HDR_GSO_NONE


# TCP flags (RFC 793 §3.1, RFC 3168 §6.1 for ECE/CWR); protocol numbers come from core.packet
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
TCP_CSUM_OFFSET = 16  # offsetof(struct tcphdr, check)
IP_MAX = 65535  # the IPv4 total length field; also the bound of one IPv6 packet here (rule 8)
IPV6_HLEN = 40  # the fixed IPv6 header (RFC 8200 §3)

_IP = struct.Struct("!BxHHHBBHII")  # ver/ihl, total, id, flags/frag, ttl, proto, csum, src, dst
_U16 = struct.Struct("!H")
_M = 0xFFFF  # ones' complement arithmetic is arithmetic modulo 0xFFFF


@dataclass(slots=True, frozen=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0


class Coalesced(NamedTuple):
    """An IP packet out of ``coalesce_batch``: merged (``gso_size`` > 0, the payload size of
    each segment it holds) or an input packet passed through as it was (``gso_size`` 0)."""

    packet: Buffer
    gso_size: int


# --- virtio-net header --------------------------------------------------------------------------


def parse_vnet_hdr(frame: Buffer) -> VnetHdr | None:
    """The virtio-net header at the start of ``frame``; None if the frame is shorter."""
    if len(frame) < VNET_HDR_LEN:
        return None
    return VnetHdr(*_VNET.unpack_from(frame, 0))


def build_vnet_hdr(hdr: VnetHdr) -> bytes:
    return _VNET.pack(
        hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset
    )


def build_gso_vnet_hdr(packet: Buffer, gso_size: int) -> bytes:
    """The header to write ``packet`` to a TUN: TSO (TCPV4, or TCPV6 for an IPv6 packet) when
    ``gso_size`` > 0, else none.

    The kernel refuses a TSO frame unless it asks for the checksum at the TCP checksum field
    (include/linux/virtio_net.h ``__virtio_net_hdr_to_skb``), so NEEDS_CSUM is set; the field
    then has to hold the pseudo-header sum: coalesce with ``partial=True``.
    """
    if gso_size <= 0 or len(packet) < 20:
        return bytes(VNET_HDR_LEN)
    v6 = packet[0] >> 4 == 6
    ihl = IPV6_HLEN if v6 else (packet[0] & 0x0F) << 2
    thl = (packet[ihl + 12] >> 4) << 2 if len(packet) >= ihl + 13 else 20
    return _VNET.pack(
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4,
        ihl + thl,
        gso_size,
        ihl,
        TCP_CSUM_OFFSET,
    )


def rewrite_partial_csum(pkt: bytearray | memoryview) -> None:
    """Set a TCP packet's checksum field to its pseudo-header sum (CHECKSUM_PARTIAL), as a
    TUN write with NEEDS_CSUM wants it — after an address rewrite (NAT), whose incremental
    update assumes a complete checksum and would leave a partial one wrong. IPv4, or IPv6
    without extension headers (what ``coalesce_batch`` merges)."""
    ihl = IPV6_HLEN if pkt[0] >> 4 == 6 else (pkt[0] & 0x0F) << 2
    _U16.pack_into(pkt, ihl + 16, (_pseudo_base(pkt) + len(pkt) - ihl) % _M or _M)


def _pseudo_base(pkt: Buffer) -> int:
    """The TCP pseudo-header's sum but its length: the addresses and the protocol (RFC 793
    §3.1; RFC 8200 §8.1 for IPv6: both 128-bit addresses, next header 6), modulo 0xFFFF or
    not (callers reduce)."""
    if pkt[0] >> 4 == 6:
        return ones_sum(pkt, 8, IPV6_HLEN) + TCP
    src, dst = _IP.unpack_from(pkt, 0)[7:9]
    return pseudo_sum(src, dst, TCP, 0)


# --- checksums (RFC 1071), modulo 0xFFFF --------------------------------------------------------


def ones_sum(buf: Buffer, start: int, end: int) -> int:
    """Big-endian ones' complement sum of ``buf[start:end]``, modulo 0xFFFF (odd end zero-padded).

    Small regions go through one Python integer; large ones through NumPy, whose per-call cost
    (µs) is repaid above a few kB (bench/batch_micro.py).
    """
    n = end - start
    np = numpy_module() if n >= 2048 else None
    if np is None:
        total = int.from_bytes(buf[start:end], "big")
        return (total << 8 if n & 1 else total) % _M

    words = n >> 2
    le = int(np.frombuffer(buf, dtype="<u4", count=words, offset=start).sum(dtype=np.uint64))
    tail = int.from_bytes(bytes(buf[start + 4 * words : end]).ljust(4, b"\0"), "little")
    return ((le + tail) % _M) * 256 % _M  # little-endian sum x 256 = big-endian sum


def numpy_module() -> Any:
    """NumPy, imported on first use (15 MB a proxy on the compiled path never needs), or None
    where it is not installed: then the pure loops below do its work, byte-identical and
    slower (numpy is an optional dependency, the ``pure`` extra: pyproject.toml)."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def csum_field(total: int) -> int:
    """The checksum field for a region whose (non-zero) ones' complement sum is ``total``."""
    return -total % _M


class Rows(Sequence[memoryview]):
    """``n`` packets in one buffer at a fixed stride (rule 7): ``geometry`` is ``(buf, stride,
    size, n, last)``, what the compiled backend reads."""

    __slots__ = ("geometry", "stride", "size", "n", "last", "_view")

    def __init__(self, buf: bytearray | memoryview, stride: int, size: int, count: int, last: int):
        if count < 0 or not 0 <= last <= size <= stride <= len(buf) or (stride == 0 and count > 1):
            raise ValueError("Rows: geometry out of range")
        if count and (count - 1) * stride + last > len(buf):
            raise ValueError("Rows: geometry out of range")
        self.geometry = (buf, stride, size, count, last)
        self.stride, self.size, self.n, self.last = stride, size, count, last
        self._view = memoryview(buf)

    @property
    def nbytes(self) -> int:
        """The packets' total length."""
        return (self.n - 1) * self.size + self.last if self.n else 0

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> memoryview: ...

    @overload
    def __getitem__(self, i: slice) -> list[memoryview]: ...

    def __getitem__(self, i: int | slice) -> memoryview | list[memoryview]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError("Rows index out of range")
        at = i * self.stride
        return self._view[at : at + (self.last if i == self.n - 1 else self.size)]

    def __iter__(self) -> Iterator[memoryview]:
        view, stride, size, end = self._view, self.stride, self.size, (self.n - 1) * self.stride
        for at in range(0, end, stride or 1):  # stride 0: one packet at most (end is 0)
            yield view[at : at + size]
        if self.n:
            yield view[end : end + self.last]


# --- split --------------------------------------------------------------------------------------


def split_tcp_batch(
    frame: Buffer, stats: Stats, out: bytearray | None = None, segment: Segmenter | None = None
) -> Sequence[memoryview]:
    """The IP packets of one frame read from tenc0 with a virtio-net header (rules 2-5).

    A TSO super-packet (TCPV4, or TCPV6: rule 2a) becomes its ``gso_size`` segments; any other
    IPv4 or IPv6 packet comes back as one packet, its checksum completed if the header asks
    for it. ``segment`` (with an ``out`` big enough) does the cutting instead of NumPy, byte
    for byte the same.
    """
    if len(frame) < VNET_HDR_LEN + 20:
        stats.drop(DropReason.MALFORMED_PACKET)
        return []
    flags, gso_type, _hint, gso_size, csum_start, csum_offset = _VNET.unpack_from(frame, 0)
    pkt = memoryview(frame)[VNET_HDR_LEN:]
    version = pkt[0] >> 4
    if version == 6:
        if len(pkt) < IPV6_HLEN:
            stats.drop(DropReason.MALFORMED_PACKET)
            return []
        ihl, total, frag, proto = IPV6_HLEN, IPV6_HLEN + (pkt[4] << 8 | pkt[5]), 0, pkt[6]
        tso, floor = VIRTIO_NET_HDR_GSO_TCPV6, IPV6_HLEN
    elif version == 4:
        vihl, total, _id, frag, _ttl, proto, _ck, _src, _dst = _IP.unpack_from(pkt, 0)
        ihl = (vihl & 0x0F) << 2
        tso, floor = VIRTIO_NET_HDR_GSO_TCPV4, 20
    else:
        stats.drop(DropReason.NOT_IPV4)
        return []
    if ihl < 20 or total < ihl or total > len(pkt):
        stats.drop(DropReason.MALFORMED_PACKET)
        return []
    kind = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if kind == VIRTIO_NET_HDR_GSO_NONE:
        return _complete(pkt[:total], proto, flags, (csum_start, csum_offset, floor), stats)
    if kind != tso or proto != TCP or frag & 0x3FFF or gso_size == 0:
        stats.drop(DropReason.MALFORMED_PACKET)  # IPv6: extension headers too (rule 2a)
        return []
    thl = (pkt[ihl + 12] >> 4) << 2 if total >= ihl + 20 else 0
    if not segmentable(ihl, thl, total, gso_size, len(pkt), version):
        stats.drop(DropReason.MALFORMED_PACKET)
        return []
    return _segment(pkt, ihl, thl, total, gso_size, out, segment)


def segmentable(ihl: int, thl: int, total: int, mss: int, available: int, version: int = 4) -> bool:
    """Rule 8: can a super-packet of this IP version (its first nibble; anything but 6 is
    IPv4's rules) with these header lengths, total length and gso_size, in a buffer of
    ``available`` bytes, be cut into segments?"""
    return (
        (ihl == IPV6_HLEN if version == 6 else 20 <= ihl <= 60 and ihl % 4 == 0)
        and 20 <= thl <= 60
        and thl % 4 == 0
        and 1 <= mss <= IP_MAX - ihl - thl
        and ihl + thl <= total <= available
    )


def _complete(
    pkt: memoryview, proto: int, flags: int, csum: tuple[int, int, int], stats: Stats
) -> list[memoryview]:
    """One packet, writable; its checksum completed when NEEDS_CSUM asks (skb_checksum_help).
    ``csum`` is the header's csum_start and csum_offset, and the lowest start that does not
    reach into the IP header (20; 40 for IPv6). ``proto`` is IPv6's next header: after an
    extension header a UDP checksum of 0 is not turned into 0xFFFF (a one in 65535 case)."""
    start, offset, floor = csum
    if pkt.readonly:
        pkt = memoryview(bytearray(pkt))
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        at = start + offset
        if start < floor or at + 2 > len(pkt):
            stats.drop(DropReason.MALFORMED_PACKET)
            return []
        ck = csum_field(ones_sum(pkt, start, len(pkt)))
        if ck == 0 and proto == UDP:
            ck = 0xFFFF  # a UDP checksum of 0 means "none" (RFC 768)
        _U16.pack_into(pkt, at, ck)
    return [pkt]


def _segment(
    pkt: memoryview,
    ihl: int,
    thl: int,
    total: int,
    mss: int,
    out: bytearray | None,
    segment: Segmenter | None = None,
) -> Rows:
    """Vectorised segmentation (rules 2-4). Inlined on purpose: each NumPy call costs ~1 µs.
    NumPy is imported on first use: a compiled ``segment`` leaves it unloaded (memory)."""
    hlen = ihl + thl
    payload = total - hlen
    n = max(1, -(-payload // mss))
    last = payload - (n - 1) * mss
    stride = (hlen + mss + 3) & ~3
    size = n * stride
    if segment is not None and out is not None and len(out) >= size:
        cut = segment(pkt, ihl, thl, total, mss, out)
        if cut:  # 0: outside rule 8, which split_tcp_batch checked: cannot happen
            return Rows(out, cut, hlen + mss, n, hlen + last)
    np = numpy_module()
    if np is None:
        return _segment_rows(pkt, ihl, thl, mss, out, (n, last, stride, size))

    if out is not None and len(out) >= size:
        buf = out
    else:
        buf = bytearray(size)
        out = None
    rows = np.frombuffer(buf, dtype=np.uint8, count=size).reshape(n, stride)
    v6 = pkt[0] >> 4 == 6  # rule 2a: payload length at byte 4, no IP checksum, no id
    # 1. every row: the super-packet's headers, with the fields shared by the middle rows
    head = bytearray(pkt[:hlen])
    flags = head[ihl + 13]
    if v6:
        _U16.pack_into(head, 4, thl + mss)
    else:
        _U16.pack_into(head, 2, hlen + mss)
        head[10:12] = b"\0\0"
    head[ihl + 16 : ihl + 18] = b"\0\0"
    head[ihl + 13] = flags & ~(FIN | PSH | CWR)
    rows[:, :hlen] = np.frombuffer(head, dtype=np.uint8)
    # 2. payload, mss bytes a row; zero padding so the row sums see nothing else
    body = np.frombuffer(pkt, dtype=np.uint8, count=payload, offset=hlen)
    full = n - 1
    if full:
        rows[:full, hlen : hlen + mss] = body[: full * mss].reshape(full, mss)
    rows[full, hlen : hlen + last] = body[full * mss :]
    if out is not None:
        rows[:, hlen + mss :] = 0
    rows[full, hlen + last :] = 0
    # 3. per-row fields: IP id, TCP seq; the first and last rows' flags and the last's length
    be16 = rows.view(">u2")
    ident = int(_U16.unpack_from(pkt, 4)[0])
    ids = np.arange(ident, ident + n, dtype=np.int64) & 0xFFFF
    if not v6:
        be16[:, 2] = ids
    seq0 = int.from_bytes(pkt[ihl + 4 : ihl + 8], "big")
    seqs = np.arange(n, dtype=np.int64) * mss + seq0
    be16[:, (ihl >> 1) + 2] = (seqs >> 16) & 0xFFFF
    be16[:, (ihl >> 1) + 3] = seqs & 0xFFFF
    rows[0, ihl + 13] = flags & ~(FIN | PSH) if n > 1 else flags
    if n > 1:
        rows[full, ihl + 13] = flags & ~CWR
    if v6:
        be16[full, 2] = thl + last
    else:
        be16[full, 1] = hlen + last
        # 4. checksums: IP from the shared header's sum plus each row's id
        ip_base = ones_sum(head, 0, ihl) - ident
        ip_ck = -(ids + ip_base) % _M
        ip_ck[full] = csum_field(ip_base + int(ids[full]) + last - mss)
        be16[:, 5] = ip_ck
    # 4. TCP checksums by one row reduction
    le = rows.view("<u4")[:, ihl >> 2 :].sum(axis=1, dtype=np.uint64)
    pseudo = _pseudo_base(pkt) + thl + mss
    tcp = (le % _M) * 256 + pseudo
    tcp[full] += last - mss + _M
    be16[:, (ihl >> 1) + 8] = (-tcp.astype(np.int64)) % _M
    return Rows(buf, stride, hlen + mss, n, hlen + last)


def _segment_rows(
    pkt: memoryview,
    ihl: int,
    thl: int,
    mss: int,
    out: bytearray | None,
    geometry: tuple[int, int, int, int],
) -> Rows:
    """``_segment`` without NumPy, given its geometry (rows, last payload, stride, bytes):
    the same rows, one at a time (rules 2-4)."""
    n, last, stride, size = geometry
    hlen = ihl + thl
    buf = out if out is not None and len(out) >= size else bytearray(size)
    v6 = pkt[0] >> 4 == 6  # rule 2a
    head = bytearray(pkt[:hlen])
    flags = head[ihl + 13]
    if not v6:
        head[10:12] = b"\0\0"
    head[ihl + 16 : ihl + 18] = b"\0\0"
    ident = int(_U16.unpack_from(pkt, 4)[0])
    seq0 = int.from_bytes(pkt[ihl + 4 : ihl + 8], "big")
    pseudo = _pseudo_base(pkt)
    for i in range(n):
        at, size_i = i * stride, last if i == n - 1 else mss
        row = memoryview(buf)[at : at + stride]
        row[:hlen] = head
        row[hlen : hlen + size_i] = pkt[hlen + i * mss : hlen + i * mss + size_i]
        row[hlen + size_i :] = bytes(stride - hlen - size_i)
        if v6:
            _U16.pack_into(row, 4, thl + size_i)
        else:
            _U16.pack_into(row, 2, hlen + size_i)
            _U16.pack_into(row, 4, (ident + i) & 0xFFFF)
        row[ihl + 4 : ihl + 8] = ((seq0 + i * mss) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags & ~(FIN | PSH) if i < n - 1 else flags
        row[ihl + 13] = f & ~CWR if i > 0 else f
        if not v6:
            _U16.pack_into(row, 10, csum_field(ones_sum(row, 0, ihl)))
        tcp = ones_sum(row, ihl, stride) + pseudo + thl + size_i
        _U16.pack_into(row, ihl + 16, csum_field(tcp))
    return Rows(buf, stride, hlen + mss, n, hlen + last)


# --- coalesce -----------------------------------------------------------------------------------


def coalesce_batch(packets: Sequence[Buffer], *, partial: bool = False) -> list[Coalesced]:
    """Merge runs of consecutive segments of one TCP flow into super-packets (rule 6).

    A merged packet gets the first segment's headers, the total length, PSH/FIN of the last,
    and fresh checksums: complete, or with ``partial`` the TCP field holds only the
    pseudo-header sum, as a TUN write with NEEDS_CSUM wants it (``build_gso_vnet_hdr``).
    Inlined on purpose: a run is extended with one masked integer compare and one unpack.
    """
    result: list[Coalesced] = []
    run: list[Buffer] = []  # the first packet's headers, then every member's payload
    head: Buffer = b""
    key = mask = next_seq = mss = hlen = room = open_flags = extra = 0
    fields = _TAIL[20]
    for pkt in packets:
        if run and len(pkt) > hlen and int.from_bytes(pkt[:hlen], "big") & mask == key:
            total, seq, flags = fields.unpack_from(pkt, 0)
            total += extra  # IPv6: the payload length field, plus the fixed header
            plen = total - hlen
            if (
                seq == next_seq
                and 0 < plen <= mss
                and plen <= room
                and total <= len(pkt)
                and flags & ~(PSH | FIN) == open_flags
            ):
                run.append(pkt[hlen:total])
                next_seq = (seq + plen) & 0xFFFFFFFF
                room -= plen
                if plen < mss or flags & (PSH | FIN):
                    result.append(_merge(head, run, mss, flags, partial))
                    run = []
                continue
        if run:
            result.append(_merge(head, run, mss, 0, partial))
            run = []
        start = _run_start(pkt)
        if start is None:
            result.append(Coalesced(pkt, 0))
            continue
        ihl, hlen, mss, seq, flags = start
        if flags & (PSH | FIN):
            result.append(Coalesced(pkt, 0))  # nothing may follow it in a run
            continue
        v6 = pkt[0] >> 4 == 6
        if v6:
            fields, extra = _TAIL6, IPV6_HLEN
        else:
            fields = _TAIL.get(ihl) or _TAIL.setdefault(ihl, struct.Struct(f"!2xH{ihl}xI5xB"))
            extra = 0
        mask = _key_mask(ihl, hlen, v6)
        key = int.from_bytes(pkt[:hlen], "big") & mask
        head = pkt
        run = [pkt[: hlen + mss]]
        next_seq = (seq + mss) & 0xFFFFFFFF
        room = IP_MAX - hlen - mss
        open_flags = flags & ~CWR
    if run:
        result.append(_merge(head, run, mss, 0, partial))
    return result


_TAIL: dict[int, struct.Struct] = {20: struct.Struct("!2xH20xI5xB")}  # total, seq, TCP flags
_TAIL6 = struct.Struct("!4xH38xI5xB")  # IPv6: payload length, seq, TCP flags
_MASKS: dict[tuple[int, int, bool], int] = {}


def _key_mask(ihl: int, hlen: int, v6: bool) -> int:
    """Bits of the first ``hlen`` bytes that must be equal across a run: all but IP total
    length, id and checksum (IPv6: the payload length), and TCP seq, flags and checksum."""
    mask = _MASKS.get((ihl, hlen, v6))
    if mask is None:
        keep = bytearray(b"\xff" * hlen)
        ip = ((4, 2),) if v6 else ((2, 4), (10, 2))
        for at, size in (*ip, (ihl + 4, 4), (ihl + 13, 1), (ihl + 16, 2)):
            keep[at : at + size] = bytes(size)
        mask = _MASKS[(ihl, hlen, v6)] = int.from_bytes(keep, "big")
    return mask


def _run_start(pkt: Buffer) -> tuple[int, int, int, int, int] | None:
    """(IP header length, header length, payload length, seq, flags) of a TCP segment that may
    start a run: IPv4, or IPv6 without extension headers."""
    if len(pkt) < 40:
        return None
    if pkt[0] >> 4 == 6:
        if len(pkt) < IPV6_HLEN + 20 or pkt[6] != TCP:
            return None
        ihl, total = IPV6_HLEN, IPV6_HLEN + (pkt[4] << 8 | pkt[5])
        if total > len(pkt):
            return None
    else:
        vihl, total, _id, frag, _ttl, proto, _ck, _src, _dst = _IP.unpack_from(pkt, 0)
        ihl = (vihl & 0x0F) << 2
        if vihl >> 4 != 4 or ihl < 20 or proto != TCP or frag & 0x3FFF or total > len(pkt):
            return None
    if total < ihl + 20:
        return None
    hlen = ihl + ((pkt[ihl + 12] >> 4) << 2)
    flags = pkt[ihl + 13]
    if not ihl + 20 <= hlen < total or flags & (SYN | RST | URG):
        return None
    return ihl, hlen, total - hlen, int.from_bytes(pkt[ihl + 4 : ihl + 8], "big"), flags


def _merge(head: Buffer, run: list[Buffer], mss: int, last_flags: int, partial: bool) -> Coalesced:
    """One packet from the run's pieces: the head's headers and payload, then the payloads."""
    if len(run) == 1:
        return Coalesced(head, 0)
    buf = bytearray().join(run)
    total = len(buf)
    v6 = buf[0] >> 4 == 6
    ihl = IPV6_HLEN if v6 else (buf[0] & 0x0F) << 2
    buf[ihl + 13] |= last_flags & (PSH | FIN)
    buf[ihl + 16 : ihl + 18] = b"\0\0"
    if v6:
        _U16.pack_into(buf, 4, total - IPV6_HLEN)
    else:
        _U16.pack_into(buf, 2, total)
        buf[10:12] = b"\0\0"
        _U16.pack_into(buf, 10, csum_field(ones_sum(buf, 0, ihl)))
    pseudo = _pseudo_base(buf) + total - ihl
    # partial: folded, not complemented, what a CHECKSUM_PARTIAL skb holds in the field
    ck = pseudo % _M or _M if partial else csum_field(pseudo + ones_sum(buf, ihl, total))
    _U16.pack_into(buf, ihl + 16, ck)
    return Coalesced(buf, mss)
