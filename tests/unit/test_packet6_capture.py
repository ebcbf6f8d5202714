"""core/packet.py against IPv6 packets Linux built: test vectors from a real capture.

Captured once with tcpdump on a veth pair between two throw-away namespaces (fd00:24::1 ->
fd00:24::2, transmit checksum offload off so every checksum on the wire is the kernel's):
an MLD report behind a hop-by-hop header, a ping, a UDP datagram, the kernel's own ICMPv6 port
unreachable about it, and a TCP SYN and SYN-ACK. Every checksum here is the kernel's, so it
checks our pseudo-header sums independently of scapy.
"""

from __future__ import annotations

import pytest

from tencrypt.core import packet as pk

MLD_REPORT = bytes.fromhex(
    "6000000000380001fe80000000000000c4c3a1fffed9643eff020000000000000000000000000016"
    "3a000502000001008f003ffb0000000204000000ff0200000000000000000001ffd9643e04000000"
    "ff0200000000000000000001ff000001"
)
ECHO_REQUEST = bytes.fromhex(
    "600725d600203a40fd000024000000000000000000000001fd000024000000000000000000000002"
    "8000958152e7000198e4156b00000000a14e0100000000001011121314151617"
)
UDP_DATAGRAM = bytes.fromhex(
    "60011174001a1140fd000024000000000000000000000001fd000024000000000000000000000002"
    "9c4114e9001ae19c74656e63727970742d76362d766563746f72"
)
PORT_UNREACHABLE = bytes.fromhex(  # the kernel's answer to UDP_DATAGRAM (nothing on 5353)
    "600d9c3e004a3a40fd000024000000000000000000000002fd000024000000000000000000000001"
    "010481860000000060011174001a1140fd000024000000000000000000000001fd00002400000000"
    "00000000000000029c4114e9001ae19c74656e63727970742d76362d766563746f72"
)
SYN = bytes.fromhex(
    "6000161d00280640fd000024000000000000000000000001fd000024000000000000000000000002"
    "9c421f909a7debfb00000000a002fd202f110000020405a00402080a1756c7f0000000000103030a"
)
SYN_ACK = bytes.fromhex(
    "6001248000280640fd000024000000000000000000000002fd000024000000000000000000000001"
    "1f909c426ccf82f89a7debfca012fb0466540000020405a00402080ad492066d1756c7f00103030a"
)
VECTORS = [MLD_REPORT, ECHO_REQUEST, UDP_DATAGRAM, PORT_UNREACHABLE, SYN, SYN_ACK]


def l4_sum_ok(raw: bytes) -> bool:
    """Does the transport checksum verify over the IPv6 pseudo-header (RFC 8200 §8.1)?"""
    ip = pk.parse_ip(raw)
    assert ip is not None
    l4 = raw[ip.off + ip.hlen : ip.end]
    return pk.checksum(l4, pk.pseudo_sum(ip.src, ip.dst, ip.proto, len(l4))) == 0


def test_the_captured_packets_parse_as_linux_sent_them():
    views = [pk.parse_ip(raw) for raw in VECTORS]
    assert all(v is not None and v.v6 for v in views)
    mld, echo, udp, unreach, syn, synack = views  # type: ignore[misc]
    assert (mld.hlen, mld.proto, mld.info >> 8, mld.sport) == (48, 58, 143, -1)
    assert (echo.proto, echo.sport, echo.dport, echo.info) == (58, 0x52E7, 0, 128 << 8)
    assert (udp.proto, udp.sport, udp.dport) == (17, 40001, 5353)
    assert pk.is_icmp_error(unreach) and unreach.info == 1 << 8 | 4
    assert (syn.sport, syn.dport, syn.info) == (40002, 8080, pk.TCP_SYN)
    assert synack.info == pk.TCP_SYN | pk.TCP_ACK
    quoted = pk.parse_icmp_quote(PORT_UNREACHABLE, unreach)
    assert quoted is not None and quoted[3:] == udp[3:] and quoted.off == 48
    assert (quoted.hlen, quoted.end - quoted.off) == (udp.hlen, udp.end)


@pytest.mark.parametrize("raw", VECTORS)
def test_the_kernels_checksums_verify_with_our_pseudo_header_sum(raw):
    assert l4_sum_ok(raw)


@pytest.mark.parametrize("raw", VECTORS)
@pytest.mark.parametrize("field", [pk.SRC, pk.DST])
def test_a_rewrite_stays_valid_and_rewriting_back_restores_the_kernels_bytes(raw, field):
    buf = bytearray(raw)
    ip = pk.parse_ip(buf)
    assert ip is not None
    old = ip.src if field == pk.SRC else ip.dst
    pk.rewrite_addr(buf, ip, field, pk.ip_to_int("fd00:30::5:9"))
    assert l4_sum_ok(bytes(buf)) and bytes(buf) != raw
    pk.rewrite_addr(buf, pk.parse_ip(buf), field, old)
    assert bytes(buf) == raw


def test_our_port_unreachable_is_the_kernels():
    """Type, code, checksum and quote equal what Linux sent (the headers' flow labels differ:
    Linux picks one per flow, we send 0)."""
    ours = pk.build_icmp_port_unreachable(UDP_DATAGRAM, None)
    assert ours is not None
    assert ours[8:40] == PORT_UNREACHABLE[8:40]  # from the address it was sent to, back
    assert ours[40:] == PORT_UNREACHABLE[40:]
    assert ours[4:8] == PORT_UNREACHABLE[4:8]  # payload length, next header, hop limit 64


def test_the_kernels_quoted_udp_checksum_follows_a_quote_rewrite():
    buf = bytearray(PORT_UNREACHABLE)
    outer = pk.parse_ip(buf)
    inner = pk.parse_icmp_quote(buf, outer)
    pk.rewrite_icmp_quote(buf, outer, inner, pk.DST, pk.ip_to_int("fd00:30::5:9"), 53)
    pk.rewrite_addr(buf, outer, pk.SRC, pk.ip_to_int("fd00:30::5:9"))
    assert l4_sum_ok(bytes(buf))  # the outer ICMPv6 checksum, over the new quote and source
    assert l4_sum_ok(bytes(buf[48:]))  # and the quoted UDP checksum (the whole datagram)


@pytest.mark.parametrize("raw", [SYN, SYN_ACK])
def test_the_kernels_syns_are_clamped_to_mtu_minus_60(raw):
    buf = bytearray(raw)
    assert pk.rewrite_tcp_mss(buf, 1400 - 40)  # MSS 1440 in the capture (MTU 1500)
    assert buf[60:64] == bytes([2, 4]) + (1400 - 60).to_bytes(2, "big")
    assert l4_sum_ok(bytes(buf))
