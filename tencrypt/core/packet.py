"""IPv4 and IPv6 packet views, Internet checksums and in-place rewrites (pure).

Rules:
1. Views, not copies: ``parse_*`` reads fields with ``struct.unpack_from`` straight from the
   caller's bytes/bytearray/memoryview and returns one small ``IPView`` tuple (``IPv4`` is
   the same class: the name predates IPv6); ``rewrite_*`` changes a writable buffer in place;
   ``build_*`` makes new bytes. ``parse_ip`` takes either family (the version nibble decides),
   ``parse_ipv4`` IPv4 only; the view's ``v6`` says which, and every other function here
   decides the family from the view or the packet bytes.
2. Bad input is not an exception: every ``parse_*`` returns ``None`` for truncated, unknown or
   inconsistent bytes (the caller counts ``DropReason.MALFORMED_PACKET``). ``rewrite_*`` only
   touch bytes inside a view that ``parse_*`` validated, so they cannot raise on packet content.
   Any exception escaping this module is a bug.
3. Checksums are the Internet checksum (RFC 1071): ``checksum`` sums a whole region,
   ``csum_adjust`` applies RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), for fields that changed.
   Eqn. 3 never yields the -0 that eqn. 2 can, so an updated checksum is bit-identical to a
   full recomputation of a packet whose checksum was right, and a wrong one stays wrong
   (core/checksum.py, re-exported here). TCP and UDP checksums cover the pseudo-header (RFC
   793 §3.1, RFC 768; IPv6's, RFC 8200 §8.1, holds the 128-bit addresses), so an address
   change updates them too. ICMP's does not
   include one (RFC 792); ICMPv6's does (RFC 4443 §2.3), so an IPv6 address change updates it
   as it does TCP's. IPv6 has no header checksum.
4. UDP checksum 0 means "none was computed" (RFC 768) and stays 0; a computed 0 is sent as
   0xFFFF. Over IPv6 a UDP checksum is mandatory (RFC 8200 §8.1): a received 0 is invalid and
   left as it is (the receiver drops it), never "fixed" into a valid-looking one.
5. Fragments (RFC 791, RFC 8200 §4.5): only the first fragment (offset 0) carries the transport
   header, so only it has ports and a transport checksum to update; later fragments get their
   addresses (and IPv4 header checksum) rewritten only. A TCP fragment at offset 8 is dropped
   (RFC 1858 §4). A first fragment must hold the whole fixed transport header (20 bytes TCP, 8
   UDP/ICMP/ICMPv6; RFC 7112 for IPv6). IPv6 fragment fields come from the Fragment header:
   ``frag`` its offset, ``flags`` its M bit as ``IP_MF``; ``parse_ident`` its 32-bit
   identification. A later IPv6 fragment's ``proto`` is the Fragment header's Next Header.
6. IPv4 options (IHL > 5) are skipped over, never interpreted. The IP header checksum is not
   verified on parse: the kernel re-fills it on ``IP_HDRINCL`` injection and checks it on
   receipt, and incremental updates keep a wrong one wrong.
7. IPv6 extension headers (RFC 8200 §4): hop-by-hop (0), routing (43), fragment (44) and
   destination options (60) are walked, at most ``MAX_EXT_HEADERS`` of them, each bounds-checked
   against the payload length, never interpreted (a routing header does not change which
   address is rewritten); ``hlen`` is 40 plus the headers walked and ``proto`` the upper-layer
   protocol after them. ESP (50), AH (51), No Next Header (59) and any other value end the walk
   and have no ports (``sport``/``dport`` -1). Payload length 0 (a jumbogram, RFC 2675) or
   beyond the bytes read: None. Bytes after the payload length are ignored, as IPv4's padding.
   IPv6 routers never fragment (RFC 8200 §5), so every IPv6 packet counts as "don't fragment".
8. ICMP errors (RFC 792) quote the offending packet's IP header and at least 8 bytes of its
   payload; an ICMPv6 error (RFC 4443 §2.4(c)) as much of it as fits in 1280 bytes.
   ``parse_icmp_quote`` views that inner packet (of the outer packet's family), whose length
   field describes the original packet, not the (shorter) quote.
9. Addresses are ints: 32-bit for IPv4, 128-bit for IPv6. A 128-bit ``::a.b.c.d`` equals an
   IPv4 int, so flow tables key addresses with ``addr_key`` (IPv6 offset by ``V6``, above
   every IPv4 one): an IPv4 and an IPv6 flow never share a key.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from tencrypt.core.checksum import checksum, csum_adjust, fold
from tencrypt.core.checksum import csum_replace as csum_replace  # re-exported, as before
from tencrypt.core.checksum import ones_sum as ones_sum
from tencrypt.core.checksum import pseudo_sum as pseudo_sum

# IP protocol numbers (IANA, netinet/in.h)
ICMP = 1
TCP = 6
UDP = 17
SCTP = 132
ICMPV6 = 58

# IPv6 extension headers (RFC 8200 §4; IANA protocol numbers, netinet/in.h)
HOPOPTS = 0
ROUTING = 43
FRAGMENT = 44
ESP = 50
AH = 51
NO_NEXT_HEADER = 59
DSTOPTS = 60
EXT_WALKED = frozenset({HOPOPTS, ROUTING, FRAGMENT, DSTOPTS})  # rule 7
MAX_EXT_HEADERS = 8  # a chain longer than this is not parsed (RFC 7045 sets no limit)

# Offsets of the address fields in the IPv4 header (RFC 791 §3.1); ``rewrite_addr`` maps
# them to IPv6's (RFC 8200 §3: source at 8, destination at 24) for an IPv6 view.
SRC = 12
DST = 16

# Flag bits as found in IPView.flags (IPv4: the top 3 bits of the flags/fragment word; IPv6:
# the Fragment header's M bit as IP_MF, never IP_DF)
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

# ICMPv6 types and codes (RFC 4443 §2.1, §3, §4)
ICMPV6_DEST_UNREACH = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_PARAM_PROBLEM = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ICMPV6_NO_ROUTE = 0  # codes of ICMPV6_DEST_UNREACH (RFC 4443 §3.1)
ICMPV6_ADMIN_PROHIBITED = 1  # Linux fails a connect with EACCES
ICMPV6_ADDR_UNREACH = 3
ICMPV6_PORT_UNREACH = 4  # connect() fails ECONNREFUSED, as ICMP_PORT_UNREACH
ICMPV6_INFO_MIN = 128  # types below are errors (RFC 4443 §2.1)
ICMPV6_ERRORS = frozenset({1, 2, 3, 4})  # the errors whose quote is read (rule 8)
ICMPV6_QUERY_REPLY = {128: 129}  # echo: the only query that carries an id
ICMPV6_QUERIES = frozenset({128, 129})
IPV6_MIN_MTU = 1280  # RFC 8200 §5: every link carries it; an ICMPv6 error fits in it

# The same, indexed by a view's ``v6`` (False: IPv4, True: IPv6), for code that serves both
ICMP_PROTO = (ICMP, ICMPV6)
ECHO_REQUEST = (ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST)
ECHO_REPLY = (ICMP_ECHO_REPLY, ICMPV6_ECHO_REPLY)
ERRORS = (ICMP_ERRORS, ICMPV6_ERRORS)
QUERY_REPLY = (ICMP_QUERY_REPLY, ICMPV6_QUERY_REPLY)

V6 = 1 << 128  # rule 9: an IPv6 address's key is V6 | address, above every IPv4 one
ADDR_MASK = V6 - 1  # key & ADDR_MASK: the address again

_IP = struct.Struct("!BxHxxHBBxxII")  # ver/ihl, total length, flags/frag, ttl, proto, src, dst
_IP6 = struct.Struct("!HB")  # payload length, next header (at offset 4 of the IPv6 header)
_PORTS = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_ICMP_HDR = struct.Struct("!BBHHH")
_ICMP6_HDR = struct.Struct("!BBHI")
_IP6_FIXED = struct.Struct("!IHBB")  # version/class/label, payload length, next, hop limit


class IPView(NamedTuple):
    """A parsed IPv4 or IPv6 packet inside a buffer. Offsets are absolute buffer offsets."""

    off: int  # where the IP header starts (0, or the quote inside an ICMP error)
    hlen: int  # header length in bytes (IHL * 4; IPv6: 40 + the extension headers walked)
    end: int  # end of this packet's bytes (off + total length, or the end of a quote)
    proto: int  # IPv6: the upper-layer protocol after the extension headers
    src: int  # addresses as 32-bit (IPv4) or 128-bit (IPv6) integers
    dst: int
    flags: int  # IP_DF | IP_MF bits
    frag: int  # fragment offset in bytes; the transport header exists only when 0
    sport: int  # TCP/UDP/SCTP source port, ICMP/ICMPv6 query id; -1 when not known
    dport: int  # TCP/UDP/SCTP destination port; 0 for an ICMP query; -1 when not known
    info: int  # TCP flags (0 if not in a quote), or ICMP(v6) type << 8 | code; else 0
    v6: bool = False  # an IPv6 packet


IPv4 = IPView  # the name every caller used before IPv6

_new_view = tuple.__new__


def ip_to_int(address: str) -> int:
    """An address of either family as text -> its int (ValueError if it is none)."""
    return int(ipaddress.ip_address(address))


def int_to_ip(address: int, v6: bool = False) -> str:
    """The text of an address int (IPv6 in its compressed form). A flow-table key at or above
    ``V6`` (``addr_key``) is an IPv6 address whatever ``v6`` says."""
    if address >= V6:
        return str(ipaddress.IPv6Address(address & ADDR_MASK))
    return str(ipaddress.IPv6Address(address) if v6 else ipaddress.IPv4Address(address))


def addr_key(address: int, v6: bool) -> int:
    """Rule 9: the flow-table key of an address int of family ``v6``."""
    return address | V6 if v6 else address


def ip_key(ip: int | str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """The key (rule 9) of an address given as text or an address object (either family), or
    as an int: an IPv4 address, or already a key (IPv6: ``V6 | address``). ValueError if it is
    not an address."""
    if isinstance(ip, int):
        if not (0 <= ip < 1 << 32 or V6 <= ip < V6 << 1):
            raise ValueError(f"not an IPv4 address or an address key: {ip}")
        return ip
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    return addr_key(int(addr), addr.version == 6)


# --- parsing ----------------------------------------------------------------------------------


def parse_ip(buf: bytes | bytearray | memoryview) -> IPView | None:
    """View the IPv4 or IPv6 packet at the start of ``buf`` (its version nibble decides); None
    if it is not a well-formed one of either."""
    if not buf:
        return None
    version = buf[0] >> 4
    if version == 4:
        return parse_ipv4(buf)
    if version == 6:
        return parse_ipv6(buf)
    return None


def parse_ipv4(buf: bytes | bytearray | memoryview) -> IPView | None:
    """View the IPv4 packet at the start of ``buf``; None if it is not a well-formed one.

    Bytes after the header's total length (padding) are ignored.
    """
    if len(buf) < 20:
        return None
    vihl, total, ff, _ttl, proto, src, dst = _IP.unpack_from(buf, 0)
    hlen = (vihl & 0x0F) << 2
    if vihl >> 4 != 4 or hlen < 20 or total < hlen or total > len(buf):
        return None
    return _parse_transport(buf, 0, hlen, total, proto, src, dst, ff >> 13, (ff & 0x1FFF) << 3)


def parse_ipv6(buf: bytes | bytearray | memoryview) -> IPView | None:
    """View the IPv6 packet at the start of ``buf``; None if it is not a well-formed one (rule
    7). Bytes after the payload length are ignored."""
    if len(buf) < 40 or buf[0] >> 4 != 6:
        return None
    plen, nxt = _IP6.unpack_from(buf, 4)
    end = 40 + plen
    if plen == 0 or end > len(buf):
        return None  # a jumbogram (RFC 2675), or cut short
    return _parse_v6(buf, 0, end, nxt, False)


def parse_icmp_quote(buf: bytes | bytearray | memoryview, outer: IPView) -> IPView | None:
    """View the packet quoted by the ICMP or ICMPv6 error ``outer``; None if the quote is
    malformed.

    The quote must hold the inner IP header (IPv6: and its extension headers) and 8 bytes of its
    payload (RFC 792; RFC 4443 §2.4(c) quotes more); its ``end`` is where the quote ends, as the
    inner length field describes the original packet.
    """
    start = outer.off + outer.hlen + 8
    end = outer.end
    if outer.v6:
        if outer.proto != ICMPV6 or end - start < 48 or buf[start] >> 4 != 6:
            return None
        plen, nxt = _IP6.unpack_from(buf, start + 4)
        if plen == 0:
            return None
        return _parse_v6(buf, start, min(end, start + 40 + plen), nxt, True)
    if outer.proto != ICMP or end - start < 28:
        return None
    vihl, total, ff, _ttl, proto, src, dst = _IP.unpack_from(buf, start)
    hlen = (vihl & 0x0F) << 2
    if vihl >> 4 != 4 or hlen < 20 or total < hlen or start + hlen > end:
        return None
    stop = min(end, start + total)
    return _parse_transport(
        buf, start, hlen, stop, proto, src, dst, ff >> 13, (ff & 0x1FFF) << 3, True
    )


def _ext_chain(
    buf: bytes | bytearray | memoryview, at: int, end: int, nxt: int
) -> tuple[int, int, int] | None:
    """Walk the IPv6 extension headers from ``at`` (rule 7): (where the upper-layer header
    starts, its protocol, the Fragment header's offset or -1); None if a header does not fit,
    the chain is too long or holds two Fragment headers. The walk stops after the Fragment
    header of a later fragment: what follows it is not a header."""
    frag_at = -1
    for _ in range(MAX_EXT_HEADERS):
        if nxt not in EXT_WALKED:
            return at, nxt, frag_at
        if at + 8 > end:
            return None
        if nxt == FRAGMENT:
            if frag_at >= 0:
                return None
            frag_at = at
            nxt = buf[at]
            at += 8
            if _U16.unpack_from(buf, frag_at + 2)[0] & 0xFFF8:
                return at, nxt, frag_at
            continue
        size = (buf[at + 1] + 1) << 3
        if at + size > end:
            return None
        nxt = buf[at]
        at += size
    return (at, nxt, frag_at) if nxt not in EXT_WALKED else None


def _parse_v6(
    buf: bytes | bytearray | memoryview, off: int, end: int, nxt: int, quote: bool
) -> IPView | None:
    chain = _ext_chain(buf, off + 40, end, nxt)
    if chain is None:
        return None
    at, proto, frag_at = chain
    flags = frag = 0
    if frag_at >= 0:
        word = _U16.unpack_from(buf, frag_at + 2)[0]
        frag, flags = word & 0xFFF8, word & IP_MF
    src = int.from_bytes(buf[off + 8 : off + 24], "big")
    dst = int.from_bytes(buf[off + 24 : off + 40], "big")
    return _parse_transport(buf, off, at - off, end, proto, src, dst, flags, frag, quote, True)


def _parse_transport(
    buf: bytes | bytearray | memoryview,
    off: int,
    hlen: int,
    end: int,
    proto: int,
    src: int,
    dst: int,
    flags: int,
    frag: int,
    quote: bool = False,
    v6: bool = False,
) -> IPView | None:
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
        elif proto in (UDP, SCTP):
            if room < 8:
                return None
            sport, dport = _PORTS.unpack_from(buf, l4)
        elif proto == (ICMPV6 if v6 else ICMP):
            if room < 8:
                return None
            kind = buf[l4]
            info = kind << 8 | buf[l4 + 1]
            if kind in (ICMPV6_QUERIES if v6 else ICMP_QUERIES):
                sport = _U16.unpack_from(buf, l4 + 4)[0]
                dport = 0
    elif frag == 8 and proto == TCP:
        return None  # overlaps the TCP flags of the first fragment (RFC 1858 §4)
    # tuple.__new__ skips the NamedTuple's Python-level __new__: a third of the parse time.
    return _new_view(IPView, (off, hlen, end, proto, src, dst, flags, frag, sport, dport, info, v6))


def parse_ident(buf: bytes | bytearray | memoryview, ip: IPView) -> int:
    """The identification that ties fragments of one datagram together: IPv4's 16-bit field,
    or the 32-bit one of the IPv6 Fragment header (0 when there is none)."""
    if not ip.v6:
        return int(_U16.unpack_from(buf, ip.off + 4)[0])
    chain = _ext_chain(buf, ip.off + 40, ip.end, buf[ip.off + 6])
    if chain is None or chain[2] < 0:
        return 0
    return int(_U32.unpack_from(buf, chain[2] + 4)[0])


def ip_version(buf: bytes | bytearray | memoryview) -> int:
    """4 or 6 when ``buf`` holds at least that family's fixed header, else 0."""
    if len(buf) >= 20 and buf[0] >> 4 == 4:
        return 4
    if len(buf) >= 40 and buf[0] >> 4 == 6:
        return 6
    return 0


def ip_proto(buf: bytes | bytearray | memoryview) -> int:
    """The IPv4 header's protocol field (byte 9); for IPv6 the upper-layer protocol after the
    extension headers (the Next Header byte 6 when there is none; -1 if they do not parse).
    ``buf`` holds at least a fixed header of its family (``ip_version``)."""
    if buf[0] >> 4 != 6:
        return buf[9]
    if buf[6] not in EXT_WALKED:
        return buf[6]
    ip = parse_ipv6(buf)
    return -1 if ip is None else ip.proto


def dont_fragment(buf: bytes | bytearray | memoryview) -> bool:
    """The IPv4 header's DF flag (RFC 791 §3.1, byte 6 bit 0x40); always for IPv6 (rule 7)."""
    return buf[0] >> 4 == 6 or bool(buf[6] & 0x40)


def is_icmp_error(ip: IPView) -> bool:
    """An ICMP error (RFC 792) or any ICMPv6 error type (below 128, RFC 4443 §2.1)."""
    if ip.v6:
        return ip.proto == ICMPV6 and ip.frag == 0 and (ip.info >> 8) < ICMPV6_INFO_MIN
    return ip.proto == ICMP and ip.frag == 0 and (ip.info >> 8) in ICMP_ERRORS


def is_too_big(ip: IPView, mtu: int) -> bool:
    """True when the packet cannot leave through ``mtu`` and must not be fragmented (IPv4 DF;
    every IPv6 packet, rule 7)."""
    return ip.end - ip.off > mtu and (ip.v6 or bool(ip.flags & IP_DF))


# --- rewriting --------------------------------------------------------------------------------


def rewrite_addr(buf: bytearray | memoryview, ip: IPView, field: int, new: int) -> int:
    """Set the source (``field=SRC``) or destination (``DST``) address of ``ip`` to ``new`` (an
    address of the view's family, not a key).

    Fixes the IPv4 header checksum and, on a first fragment, the TCP/UDP checksum (IPv6: and
    ICMPv6's) that covers the address through the pseudo-header. In a quote the TCP checksum
    is updated only when the whole fixed TCP header is there, as Linux NAT does
    (net/netfilter/nf_nat_proto.c).
    Returns the ones' complement sum of the changes (``~m + m'`` of every word written), which
    an enclosing ICMP checksum needs (see ``rewrite_icmp_quote``).
    """
    old = ip.src if field == SRC else ip.dst
    if old == new:
        return 0
    off = ip.off
    if ip.v6:
        at = off + (8 if field == SRC else 24)
        buf[at : at + 16] = new.to_bytes(16, "big")
        delta = (old ^ ADDR_MASK) + new
        return delta + _rewrite_l4_csum(buf, ip, delta)
    # Hot path: csum_adjust and fold inlined on purpose.
    delta = (old ^ 0xFFFFFFFF) + new
    _U32.pack_into(buf, off + field, new)
    hc: int = _U16.unpack_from(buf, off + 10)[0]
    total = (hc ^ 0xFFFF) + delta
    hc2 = 0xFFFF ^ (total % 0xFFFF or (0xFFFF if total else 0))
    _U16.pack_into(buf, off + 10, hc2)
    return delta + (hc ^ 0xFFFF) + hc2 + _rewrite_l4_csum(buf, ip, delta)


def _rewrite_l4_csum(buf: bytearray | memoryview, ip: IPView, delta: int) -> int:
    """Fold a pseudo-header change ``delta`` into the transport checksum of a first fragment
    (TCP only when its whole fixed header is there; UDP's 0 is left alone; ICMPv6's, which has
    a pseudo-header); returns the sum of the checksum's own change."""
    if ip.frag:
        return 0
    l4 = ip.off + ip.hlen
    proto = ip.proto
    if proto == TCP and l4 + 20 <= ip.end:
        at = l4 + 16
    elif proto == UDP:
        at = l4 + 6
    elif proto == ICMPV6 and ip.v6:
        at = l4 + 2
    else:
        return 0
    ck: int = _U16.unpack_from(buf, at)[0]
    if ck == 0 and proto == UDP:
        return 0  # none was sent (IPv4), or invalid (IPv6): stays 0 (rule 4)
    ck2 = csum_adjust(ck, delta)
    if ck2 == 0 and proto == UDP:
        ck2 = 0xFFFF
    _U16.pack_into(buf, at, ck2)
    return (ck ^ 0xFFFF) + ck2


def rewrite_port(buf: bytearray | memoryview, ip: IPView, field: int, new: int) -> int:
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
    outer: IPView,
    inner: IPView,
    field: int,
    new: int,
    port: int = -1,
) -> None:
    """Rewrite an address (and with ``port`` >= 0 the TCP/UDP port of the same side) of the
    packet quoted in ICMP or ICMPv6 error ``outer``, and the outer ICMP(v6) checksum.

    The ICMP checksum covers the quote (RFC 792, RFC 4443 §2.3), so every word changed inside it
    (the quoted IPv4 header checksum and transport checksums included) is folded in
    incrementally; the outer header is the caller's to rewrite with ``rewrite_addr`` (which
    updates an ICMPv6 checksum for its pseudo-header).
    """
    changes = rewrite_addr(buf, inner, field, new)
    if port >= 0:
        changes += rewrite_port(buf, inner, field, port)
    if changes:
        at = outer.off + outer.hlen + 2
        _U16.pack_into(buf, at, csum_adjust(_U16.unpack_from(buf, at)[0], changes))


def rewrite_tcp_mss(buf: bytearray | memoryview, max_mss: int) -> bool:
    """Clamp the MSS option of a TCP SYN or SYN-ACK to ``max_mss``; True if it was changed.

    ``max_mss`` is the IPv4 figure, MTU - 40; an IPv6 SYN is clamped to ``max_mss - 20``
    (MTU - 60: its fixed header is 20 bytes longer, RFC 8200 §8.3), so one call serves both.
    Options are walked per RFC 793 §3.1 (kind 0 ends, kind 1 is one byte, others carry a
    length); a malformed option list is left alone. The MSS value may sit at an odd offset,
    so the checksum is adjusted over the aligned words that cover it.
    """
    version = buf[0] >> 4 if len(buf) >= 34 else 0
    if version == 4:
        if buf[9] != TCP or len(buf) < ((buf[0] & 0x0F) << 2) + 14:
            return False
        if not buf[((buf[0] & 0x0F) << 2) + 13] & TCP_SYN:
            return False  # cheap reject first: called on every TCP segment, only SYNs qualify
        ip = parse_ipv4(buf)
    elif version == 6:
        if len(buf) < 60 or (buf[6] == TCP and not buf[53] & TCP_SYN):
            return False  # the same cheap reject when no extension header is there
        ip = parse_ipv6(buf)
        max_mss -= 20
    else:
        return False
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
    IP header lengths are multiples of 4 (IPv6: 40 plus multiples of 8).
    """
    lo = pos & ~1
    hi = (pos + len(new) + 1) & ~1
    before = int.from_bytes(buf[lo:hi], "big")
    buf[pos : pos + len(new)] = new
    after = int.from_bytes(buf[lo:hi], "big")
    ck = _U16.unpack_from(buf, csum_at)[0]
    _U16.pack_into(buf, csum_at, csum_adjust(ck, 0xFFFF - fold(before) + after))


# --- building ---------------------------------------------------------------------------------


def _is_unicast(address: int) -> bool:
    # Not 0/8 ("this network"), 127/8 loopback, 224/4 multicast, 240/4 reserved or broadcast.
    top = address >> 24
    return top != 0 and top != 127 and top < 224


def _is_unicast6(address: int) -> bool:
    # Not the unspecified address :: or multicast ff00::/8 (RFC 4291 §2.7).
    return address != 0 and address >> 120 != 0xFF


def build_icmp_frag_needed(
    orig: bytes | bytearray | memoryview, mtu: int, src_ip: str | int | None
) -> bytes | None:
    """ICMP "fragmentation needed and DF set" (type 3 code 4) telling ``orig``'s sender ``mtu``
    (RFC 1191 §4 puts the next-hop MTU in the low 16 bits of the second header word); for an
    IPv6 ``orig`` an ICMPv6 Packet Too Big (type 2, the MTU in 32 bits, RFC 4443 §3.2).
    Whether the packet is too big is ``is_too_big``."""
    return build_icmp_unreachable(orig, ICMP_FRAG_NEEDED, src_ip, mtu)


def build_icmp_admin_prohibited(
    orig: bytes | bytearray | memoryview, src_ip: str | int | None
) -> bytes | None:
    """ICMP "communication administratively prohibited" (type 3 code 13, RFC 1812 §5.2.7.1;
    ICMPv6 type 1 code 1, RFC 4443 §3.1): the local sender of a refused packet learns at once
    (Linux fails a connect with EHOSTUNREACH, EACCES over IPv6) instead of retrying into
    silence."""
    return build_icmp_unreachable(orig, ICMP_ADMIN_PROHIBITED, src_ip)


def build_icmp_port_unreachable(
    orig: bytes | bytearray | memoryview, src_ip: str | int | None
) -> bytes | None:
    """ICMP "port unreachable" (type 3 code 3; ICMPv6 type 1 code 4) about ``orig``, from
    ``src_ip``: what kube-proxy's REJECT answers for a Service with no endpoint; a TCP connect
    fails at once with ECONNREFUSED and a connected UDP socket's next call with the same."""
    return build_icmp_unreachable(orig, ICMP_PORT_UNREACH, src_ip)


# ICMP destination-unreachable code -> ICMPv6 (type, code), as RFC 7915 §4.2 translates them;
# the codes it does not map to a Destination Unreachable or Packet Too Big build nothing.
_V6_UNREACH = {
    0: (ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE),
    1: (ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE),
    ICMP_PORT_UNREACH: (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH),
    ICMP_FRAG_NEEDED: (ICMPV6_PACKET_TOO_BIG, 0),
    5: (ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE),
    6: (ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE),
    7: (ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE),
    8: (ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE),
    9: (ICMPV6_DEST_UNREACH, ICMPV6_ADMIN_PROHIBITED),
    10: (ICMPV6_DEST_UNREACH, ICMPV6_ADMIN_PROHIBITED),
    11: (ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE),
    12: (ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE),
    ICMP_ADMIN_PROHIBITED: (ICMPV6_DEST_UNREACH, ICMPV6_ADMIN_PROHIBITED),
    15: (ICMPV6_DEST_UNREACH, ICMPV6_ADMIN_PROHIBITED),
}


def build_icmp_unreachable(
    orig: bytes | bytearray | memoryview, code: int, src_ip: str | int | None, mtu: int = 0
) -> bytes | None:
    """ICMP destination unreachable (type 3) with ``code`` about ``orig``, from ``src_ip``; for
    an IPv6 ``orig`` the ICMPv6 error RFC 7915 §4.2 maps ``code`` to (see ``_icmp6_error``).

    The body quotes the original IP header and its first 8 data bytes (RFC 792). Returns None
    where RFC 1122 §3.2.2 forbids an error: for an unparseable packet, an ICMP error, a
    non-first fragment or a non-unicast source or destination. ``src_ip`` None: the packet's
    destination.
    """
    if orig and orig[0] >> 4 == 6:
        return _icmp6_error(orig, code, src_ip, mtu)
    ip = parse_ipv4(orig)
    if ip is None or ip.frag != 0 or is_icmp_error(ip):
        return None
    if not (_is_unicast(ip.src) and _is_unicast(ip.dst)):
        return None
    src = ip.dst if src_ip is None else src_ip if isinstance(src_ip, int) else ip_to_int(src_ip)
    if src >> 32:
        return None  # not an IPv4 address
    quote = bytes(orig[: min(ip.hlen + 8, ip.end)])
    body = _ICMP_HDR.pack(ICMP_DEST_UNREACH, code, 0, 0, mtu & 0xFFFF) + quote
    body = body[:2] + _U16.pack(checksum(body)) + body[4:]
    total = 20 + len(body)
    header = struct.pack("!BBHHHBBHII", 0x45, 0, total, 0, 0, 64, ICMP, 0, src, ip.src)
    header = header[:10] + _U16.pack(checksum(header)) + header[12:]
    return header + body


def _icmp6_error(
    orig: bytes | bytearray | memoryview, code: int, src_ip: str | int | None, mtu: int
) -> bytes | None:
    """The ICMPv6 error (RFC 4443) for an IPv6 ``orig``: Destination Unreachable with the code
    ``_V6_UNREACH`` maps ``code`` to, or Packet Too Big carrying ``mtu`` (§3.2). It quotes as
    much of ``orig`` as fits in IPV6_MIN_MTU (§2.4(c)) and comes from ``src_ip`` when that is an
    IPv6 address (an int is taken as one), else from the address ``orig`` was sent to; hop
    limit 64; checksum over the IPv6 pseudo-header (§2.3). None (§2.4(e)): an unparseable
    packet, an ICMPv6 error, a later fragment, an unspecified or multicast source, a multicast
    destination (except for Packet Too Big), or a code with no ICMPv6 counterpart."""
    ip = parse_ipv6(orig)
    kind = _V6_UNREACH.get(code)
    if ip is None or kind is None or ip.frag != 0 or is_icmp_error(ip):
        return None
    if not _is_unicast6(ip.src) or (kind[0] != ICMPV6_PACKET_TOO_BIG and not _is_unicast6(ip.dst)):
        return None
    src = ip.dst
    if isinstance(src_ip, int):
        src = src_ip
    elif src_ip is not None:
        given = ipaddress.ip_address(src_ip)
        if given.version == 6:
            src = int(given)
    if not _is_unicast6(src) or src >> 128:
        return None
    quote = bytes(orig[: min(ip.end, IPV6_MIN_MTU - 48)])
    word = mtu & 0xFFFFFFFF if kind[0] == ICMPV6_PACKET_TOO_BIG else 0
    body = _ICMP6_HDR.pack(kind[0], kind[1], 0, word) + quote
    ck = checksum(body, pseudo_sum(src, ip.src, ICMPV6, len(body)))
    body = body[:2] + _U16.pack(ck) + body[4:]
    header = _IP6_FIXED.pack(0x60000000, len(body), ICMPV6, 64)
    return header + src.to_bytes(16, "big") + ip.src.to_bytes(16, "big") + body
