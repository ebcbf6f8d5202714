"""IPv4 packet views, Internet checksums and in-place rewrites (pure).

Rules:
1. Views, not copies: ``parse_*`` reads fields with ``struct.unpack_from`` straight from the
   caller's bytes/bytearray/memoryview and returns one small ``IPv4`` tuple; ``rewrite_*``
   changes a writable buffer in place; ``build_*`` makes new bytes.
2. Bad input is not an exception: every ``parse_*`` returns ``None`` for truncated, non-IPv4 or
   inconsistent bytes (the caller counts ``DropReason.MALFORMED_PACKET``). ``rewrite_*`` only
   touch bytes inside a view that ``parse_*`` validated, so they cannot raise on packet content.
   Any exception escaping this module is a bug.
3. Checksums are the Internet checksum (RFC 1071): ``checksum`` sums a whole region,
   ``csum_adjust`` applies RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), for fields that changed.
   Eqn. 3 never yields the -0 that eqn. 2 can, so an updated checksum is bit-identical to a
   full recomputation of a packet whose checksum was right, and a wrong one stays wrong.
   TCP and UDP checksums cover the pseudo-header (RFC 793 §3.1, RFC 768), so an address
   change updates them too; ICMP's does not include one (RFC 792).
4. UDP checksum 0 means "none was computed" (RFC 768) and stays 0; a computed 0 is sent as
   0xFFFF.
5. Fragments (RFC 791): only the first fragment (offset 0) carries the transport header, so only
   it has ports and a transport checksum to update; later fragments get their addresses and
   IP header checksum rewritten only. A TCP fragment at offset 8 is dropped (RFC 1858 §4).
   A first fragment must hold the whole fixed transport header (20 bytes TCP, 8 UDP/ICMP).
6. IP options (IHL > 5) are skipped over, never interpreted. The IP header checksum is not
   verified on parse: the kernel re-fills it on ``IP_HDRINCL`` injection and checks it on
   receipt, and incremental updates keep a wrong one wrong.
7. ICMP errors (RFC 792) quote the offending packet's IP header and at least 8 bytes of its
   payload; ``parse_icmp_quote`` views that inner packet, whose length field describes the
   original packet, not the (shorter) quote.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

# IP protocol numbers (IANA, netinet/in.h)
ICMP = 1
TCP = 6
UDP = 17
SCTP = 132

# Offsets of the address fields in the IPv4 header (RFC 791 §3.1)
SRC = 12
DST = 16

# IPv4 flag bits as found in IPv4.flags (the top 3 bits of the flags/fragment word)
IP_DF = 0x2
IP_MF = 0x1

# TCP flag bits (RFC 793 §3.1)
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10
TCP_OPT_MSS = 2

# ICMP types (RFC 792)
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_PORT_UNREACH = 3  # code of ICMP_DEST_UNREACH (RFC 792): connect() fails ECONNREFUSED
ICMP_FRAG_NEEDED = 4  # code of ICMP_DEST_UNREACH (RFC 1191)
ICMP_ADMIN_PROHIBITED = 13  # code of ICMP_DEST_UNREACH: filtered (RFC 1812 §5.2.7.1)
ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})  # unreach, source quench, redirect, time exceeded, param
ICMP_QUERY_REPLY = {8: 0, 13: 14, 15: 16, 17: 18}  # request type -> reply type; these carry an id
ICMP_QUERIES = frozenset(ICMP_QUERY_REPLY) | frozenset(ICMP_QUERY_REPLY.values())

_IP = struct.Struct("!BxHxxHBBxxII")  # ver/ihl, total length, flags/frag, ttl, proto, src, dst
_PORTS = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_ICMP_HDR = struct.Struct("!BBHHH")


class IPv4(NamedTuple):
    """A parsed IPv4 packet inside a buffer. Offsets are absolute buffer offsets."""

    off: int  # where the IPv4 header starts (0, or the quote inside an ICMP error)
    hlen: int  # header length in bytes (IHL * 4)
    end: int  # end of this packet's bytes (off + total length, or the end of a quote)
    proto: int
    src: int  # addresses as 32-bit integers
    dst: int
    flags: int  # IP_DF | IP_MF bits
    frag: int  # fragment offset in bytes; the transport header exists only when 0
    sport: int  # TCP/UDP/SCTP source port, ICMP query id; -1 when not known
    dport: int  # TCP/UDP/SCTP destination port; 0 for an ICMP query; -1 when not known
    info: int  # TCP flags (0 if not in a quote), or ICMP type << 8 | code; else 0


_new_view = tuple.__new__


def ip_to_int(address: str) -> int:
    return int(ipaddress.IPv4Address(address))


def int_to_ip(address: int) -> str:
    return str(ipaddress.IPv4Address(address))


# --- checksums (RFC 1071, RFC 1624) ---------------------------------------------------------


def _fold(total: int) -> int:
    """Ones' complement value of a non-negative sum of 16-bit words, in 0..0xFFFF.

    2**16 == 1 (mod 0xFFFF), so end-around carry is reduction mod 0xFFFF; a non-zero sum that
    reduces to 0 is ones' complement -0, written 0xFFFF, as the carry loop would leave it.
    """
    s = total % 0xFFFF
    return 0xFFFF if s == 0 and total else s


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """Ones' complement sum of ``data`` read as big-endian 16-bit words (odd length zero-padded).

    The whole region is read as one integer: its residue mod 0xFFFF is the word sum (RFC 1071
    §2 (B)/(C)), computed in C instead of a Python loop over words.
    """
    total = int.from_bytes(data, "big")
    if len(data) & 1:
        total <<= 8
    return _fold(total)


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum field value of ``data`` (plus a partial sum, e.g. pseudo-header)."""
    return ~_fold(ones_sum(data) + initial) & 0xFFFF


def pseudo_sum(src: int, dst: int, proto: int, length: int) -> int:
    """Partial sum of the TCP/UDP pseudo-header (RFC 793 §3.1, RFC 768)."""
    return (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + proto + length


def csum_adjust(hc: int, delta: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + delta), where delta sums ``~m + m'`` of changed words.

    ``delta`` may be built from wider values: ``(old ^ 0xFFFFFFFF) + new`` for a 32-bit field is
    the same residue as its two 16-bit halves.
    """
    return ~_fold((hc ^ 0xFFFF) + delta) & 0xFFFF


def csum_replace(hc: int, old: int, new: int, bits: int = 16) -> int:
    """Checksum after one aligned ``bits``-wide field (16 or 32) changed from ``old`` to ``new``."""
    return csum_adjust(hc, (old ^ ((1 << bits) - 1)) + new)


# --- parsing ----------------------------------------------------------------------------------


def parse_ipv4(buf: bytes | bytearray | memoryview) -> IPv4 | None:
    """View the IPv4 packet at the start of ``buf``; None if it is not a well-formed one.

    Bytes after the header's total length (padding) are ignored.
    """
    if len(buf) < 20:
        return None
    vihl, total, ff, _ttl, proto, src, dst = _IP.unpack_from(buf, 0)
    hlen = (vihl & 0x0F) << 2
    if vihl >> 4 != 4 or hlen < 20 or total < hlen or total > len(buf):
        return None
    return _parse_transport(buf, 0, hlen, total, proto, src, dst, ff, False)


def parse_icmp_quote(buf: bytes | bytearray | memoryview, outer: IPv4) -> IPv4 | None:
    """View the packet quoted by the ICMP error ``outer``; None if the quote is malformed.

    The quote must hold the inner IP header and 8 bytes of its payload (RFC 792); its ``end``
    is where the quote ends, as the inner total length describes the original packet.
    """
    start = outer.off + outer.hlen + 8
    end = outer.end
    if outer.proto != ICMP or end - start < 28:
        return None
    vihl, total, ff, _ttl, proto, src, dst = _IP.unpack_from(buf, start)
    hlen = (vihl & 0x0F) << 2
    if vihl >> 4 != 4 or hlen < 20 or total < hlen or start + hlen > end:
        return None
    return _parse_transport(buf, start, hlen, min(end, start + total), proto, src, dst, ff, True)


def _parse_transport(
    buf: bytes | bytearray | memoryview,
    off: int,
    hlen: int,
    end: int,
    proto: int,
    src: int,
    dst: int,
    ff: int,
    quote: bool,
) -> IPv4 | None:
    frag = (ff & 0x1FFF) << 3
    sport = dport = -1
    info = 0
    if frag == 0:
        l4 = off + hlen
        room = end - l4
        if proto == TCP:
            if room < (8 if quote else 20):
                return None
            sport, dport = _PORTS.unpack_from(buf, l4)
            if room >= 14:
                info = buf[l4 + 13]
            if not quote and not 20 <= (buf[l4 + 12] >> 4) << 2 <= room:
                return None  # data offset outside the segment
        elif proto in (UDP, ICMP, SCTP):
            if room < 8:
                return None
            if proto == ICMP:
                kind = buf[l4]
                info = kind << 8 | buf[l4 + 1]
                if kind in ICMP_QUERIES:
                    sport = _U16.unpack_from(buf, l4 + 4)[0]
                    dport = 0
            else:
                sport, dport = _PORTS.unpack_from(buf, l4)
    elif frag == 8 and proto == TCP:
        return None  # overlaps the TCP flags of the first fragment (RFC 1858 §4)
    # tuple.__new__ skips the NamedTuple's Python-level __new__: a third of the parse time.
    return _new_view(IPv4, (off, hlen, end, proto, src, dst, ff >> 13, frag, sport, dport, info))


def parse_ident(buf: bytes | bytearray | memoryview, ip: IPv4) -> int:
    """The IP identification field, which ties fragments of one datagram together."""
    return int(_U16.unpack_from(buf, ip.off + 4)[0])


def is_ipv4(buf: bytes | bytearray | memoryview) -> bool:
    """At least a fixed IPv4 header (RFC 791 §3.1: version 4)."""
    return len(buf) >= 20 and buf[0] >> 4 == 4


def ip_proto(buf: bytes | bytearray | memoryview) -> int:
    """The IPv4 header's protocol field (byte 9)."""
    return buf[9]


def dont_fragment(buf: bytes | bytearray | memoryview) -> bool:
    """The IPv4 header's DF flag (RFC 791 §3.1, byte 6 bit 0x40)."""
    return bool(buf[6] & 0x40)


def is_icmp_error(ip: IPv4) -> bool:
    return ip.proto == ICMP and ip.frag == 0 and (ip.info >> 8) in ICMP_ERRORS


def is_too_big(ip: IPv4, mtu: int) -> bool:
    """True when the packet cannot leave through ``mtu`` and must not be fragmented (DF)."""
    return ip.end - ip.off > mtu and bool(ip.flags & IP_DF)


# --- rewriting --------------------------------------------------------------------------------


def rewrite_addr(buf: bytearray | memoryview, ip: IPv4, field: int, new: int) -> int:
    """Set the source (``field=SRC``) or destination (``DST``) address of ``ip`` to ``new``.

    Fixes the IP header checksum and, on a first fragment, the TCP/UDP checksum that covers the
    address through the pseudo-header. In a quote the TCP checksum is updated only when the
    whole fixed TCP header is there, as Linux NAT does (net/netfilter/nf_nat_proto.c).
    Returns the ones' complement sum of the changes (``~m + m'`` of every word written), which
    an enclosing ICMP checksum needs (see ``rewrite_icmp_quote``).
    """
    old = ip.src if field == SRC else ip.dst
    if old == new:
        return 0
    # Hot path: csum_adjust and _fold inlined on purpose.
    off = ip.off
    delta = (old ^ 0xFFFFFFFF) + new
    _U32.pack_into(buf, off + field, new)
    hc: int = _U16.unpack_from(buf, off + 10)[0]
    total = (hc ^ 0xFFFF) + delta
    hc2 = 0xFFFF ^ (total % 0xFFFF or (0xFFFF if total else 0))
    _U16.pack_into(buf, off + 10, hc2)
    changes = delta + (hc ^ 0xFFFF) + hc2
    if ip.frag == 0:
        l4 = off + ip.hlen
        if ip.proto == TCP and l4 + 20 <= ip.end:
            at = l4 + 16
        elif ip.proto == UDP:
            at = l4 + 6
        else:
            return changes
        ck: int = _U16.unpack_from(buf, at)[0]
        if ck == 0 and ip.proto == UDP:
            return changes  # no checksum was sent; stays 0
        ck2 = csum_adjust(ck, delta)
        if ck2 == 0 and ip.proto == UDP:
            ck2 = 0xFFFF
        _U16.pack_into(buf, at, ck2)
        changes += (ck ^ 0xFFFF) + ck2
    return changes


def rewrite_port(buf: bytearray | memoryview, ip: IPv4, field: int, new: int) -> int:
    """Set the TCP/UDP source (``field=SRC``) or destination (``DST``) port of ``ip``.

    ``ip`` must be a first fragment whose ports were parsed (``sport``/``dport`` >= 0) and of
    TCP or UDP; anything else is left alone (0). Fixes the transport checksum as
    ``rewrite_addr`` does (in a quote only when its whole TCP header is there, and never a UDP
    checksum of 0) and returns the ones' complement sum of the changes, for an enclosing ICMP
    checksum.
    """
    old = ip.sport if field == SRC else ip.dport
    if old == new or old < 0 or ip.frag or ip.proto not in (TCP, UDP):
        return 0
    l4 = ip.off + ip.hlen
    _U16.pack_into(buf, l4 if field == SRC else l4 + 2, new)
    changes = (old ^ 0xFFFF) + new
    if l4 + (20 if ip.proto == TCP else 8) > ip.end:
        return changes  # a quote without the whole header: as rewrite_addr, the port only
    at = l4 + 16 if ip.proto == TCP else l4 + 6
    ck: int = _U16.unpack_from(buf, at)[0]
    if ck == 0 and ip.proto == UDP:
        return changes
    ck2 = csum_adjust(ck, changes)
    if ck2 == 0 and ip.proto == UDP:
        ck2 = 0xFFFF
    _U16.pack_into(buf, at, ck2)
    return changes + (ck ^ 0xFFFF) + ck2


def rewrite_icmp_quote(
    buf: bytearray | memoryview,
    outer: IPv4,
    inner: IPv4,
    field: int,
    new: int,
    port: int = -1,
) -> None:
    """Rewrite an address (and with ``port`` >= 0 the TCP/UDP port of the same side) of the
    packet quoted in ICMP error ``outer``, and the ICMP checksum.

    The ICMP checksum covers the quote (RFC 792), so every word changed inside it is folded in
    incrementally; the outer header is the caller's to rewrite with ``rewrite_addr``.
    """
    changes = rewrite_addr(buf, inner, field, new)
    if port >= 0:
        changes += rewrite_port(buf, inner, field, port)
    if changes:
        at = outer.off + outer.hlen + 2
        _U16.pack_into(buf, at, csum_adjust(_U16.unpack_from(buf, at)[0], changes))


def rewrite_tcp_mss(buf: bytearray | memoryview, max_mss: int) -> bool:
    """Clamp the MSS option of a TCP SYN or SYN-ACK to ``max_mss``; True if it was changed.

    Options are walked per RFC 793 §3.1 (kind 0 ends, kind 1 is one byte, others carry a
    length); a malformed option list is left alone. The MSS value may sit at an odd offset,
    so the checksum is adjusted over the aligned words that cover it.
    """
    if len(buf) < 34 or buf[9] != TCP or len(buf) < ((buf[0] & 0x0F) << 2) + 14:
        return False
    if not buf[((buf[0] & 0x0F) << 2) + 13] & TCP_SYN:
        return False  # cheap reject first: called on every TCP segment, and only SYNs qualify
    ip = parse_ipv4(buf)
    if ip is None or ip.proto != TCP or ip.frag != 0 or not ip.info & TCP_SYN:
        return False
    l4 = ip.off + ip.hlen
    i = l4 + 20
    end = l4 + ((buf[l4 + 12] >> 4) << 2)
    while i < end:
        kind = buf[i]
        if kind == 0:
            return False
        if kind == 1:
            i += 1
            continue
        if i + 2 > end or buf[i + 1] < 2 or i + buf[i + 1] > end:
            return False
        if kind == TCP_OPT_MSS and buf[i + 1] == 4:
            if _U16.unpack_from(buf, i + 2)[0] <= max_mss:
                return False
            _rewrite_bytes(buf, l4 + 16, i + 2, _U16.pack(max_mss))
            return True
        i += buf[i + 1]
    return False


def _rewrite_bytes(buf: bytearray | memoryview, csum_at: int, pos: int, new: bytes) -> None:
    """Write ``new`` at ``pos`` and adjust the checksum at ``csum_at`` over the covering words.

    Word alignment is relative to the buffer start, which is that of the transport header since
    IP header lengths are multiples of 4.
    """
    lo = pos & ~1
    hi = (pos + len(new) + 1) & ~1
    before = int.from_bytes(buf[lo:hi], "big")
    buf[pos : pos + len(new)] = new
    after = int.from_bytes(buf[lo:hi], "big")
    ck = _U16.unpack_from(buf, csum_at)[0]
    _U16.pack_into(buf, csum_at, csum_adjust(ck, 0xFFFF - _fold(before) + after))


# --- building ---------------------------------------------------------------------------------


def _is_unicast(address: int) -> bool:
    # Not 0/8 ("this network"), 127/8 loopback, 224/4 multicast, 240/4 reserved or broadcast.
    top = address >> 24
    return top != 0 and top != 127 and top < 224


def build_icmp_frag_needed(
    orig: bytes | bytearray | memoryview, mtu: int, src_ip: str | int
) -> bytes | None:
    """ICMP "fragmentation needed and DF set" (type 3 code 4) telling ``orig``'s sender ``mtu``
    (RFC 1191 §4 puts the next-hop MTU in the low 16 bits of the second header word). Whether
    the packet is too big is ``is_too_big``."""
    return build_icmp_unreachable(orig, ICMP_FRAG_NEEDED, src_ip, mtu)


def build_icmp_admin_prohibited(
    orig: bytes | bytearray | memoryview, src_ip: str | int
) -> bytes | None:
    """ICMP "communication administratively prohibited" (type 3 code 13, RFC 1812 §5.2.7.1):
    the local sender of a refused packet learns at once (Linux fails a connect with
    EHOSTUNREACH) instead of retrying into silence."""
    return build_icmp_unreachable(orig, ICMP_ADMIN_PROHIBITED, src_ip)


def build_icmp_port_unreachable(
    orig: bytes | bytearray | memoryview, src_ip: str | int
) -> bytes | None:
    """ICMP "port unreachable" (type 3 code 3) about ``orig``, from ``src_ip``: what kube-proxy's
    REJECT answers for a Service with no endpoint; a TCP connect fails at once with
    ECONNREFUSED and a connected UDP socket's next call with the same."""
    return build_icmp_unreachable(orig, ICMP_PORT_UNREACH, src_ip)


def build_icmp_unreachable(
    orig: bytes | bytearray | memoryview, code: int, src_ip: str | int, mtu: int = 0
) -> bytes | None:
    """ICMP destination unreachable (type 3) with ``code`` about ``orig``, from ``src_ip``.

    The body quotes the original IP header and its first 8 data bytes (RFC 792). Returns None
    where RFC 1122 §3.2.2 forbids an error: for an unparseable packet, an ICMP error, a
    non-first fragment or a non-unicast source or destination.
    """
    ip = parse_ipv4(orig)
    if ip is None or ip.frag != 0 or is_icmp_error(ip):
        return None
    if not (_is_unicast(ip.src) and _is_unicast(ip.dst)):
        return None
    src = src_ip if isinstance(src_ip, int) else ip_to_int(src_ip)
    quote = bytes(orig[: min(ip.hlen + 8, ip.end)])
    body = _ICMP_HDR.pack(ICMP_DEST_UNREACH, code, 0, 0, mtu & 0xFFFF) + quote
    body = body[:2] + _U16.pack(checksum(body)) + body[4:]
    total = 20 + len(body)
    header = struct.pack("!BBHHHBBHII", 0x45, 0, total, 0, 0, 64, ICMP, 0, src, ip.src)
    header = header[:10] + _U16.pack(checksum(header)) + header[12:]
    return header + body
