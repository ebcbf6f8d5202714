"""core/packet.py on IPv6, against scapy as the independent implementation.

Packets are built with scapy from drawn fields; after every rewrite the bytes must equal what
scapy builds from the rewritten fields (it recomputes every checksum from scratch, the IPv6
pseudo-header included, RFC 8200 §8.1 and RFC 4443 §2.3).
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    TCPerror,
    fragment6,
)
from scapy.layers.ipsec import AH
from scapy.packet import Raw

from tencrypt.core import packet
from tencrypt.core.packet import (
    DST,
    SRC,
    V6,
    addr_key,
    build_icmp_admin_prohibited,
    build_icmp_frag_needed,
    build_icmp_port_unreachable,
    build_icmp_unreachable,
    dont_fragment,
    int_to_ip,
    ip_key,
    ip_proto,
    ip_to_int,
    ip_version,
    is_icmp_error,
    is_too_big,
    parse_icmp_quote,
    parse_ident,
    parse_ip,
    parse_ipv4,
    parse_ipv6,
    rewrite_addr,
    rewrite_icmp_quote,
    rewrite_port,
    rewrite_tcp_mss,
)

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
# unicast-looking: not ::, not ff00::/8
addresses = st.integers(1, (0xFE << 120) | ((1 << 120) - 1)).map(lambda a: int_to_ip(a, True))
EXTS = [
    (),
    ("hop",),
    ("dst",),
    ("hop", "dst"),
    ("hop", "rt", "dst"),
    ("frag0",),  # an atomic fragment (RFC 6946): offset 0, M clear, a whole packet
    ("hop", "frag0", "dst"),
]
A, B = "fd00:10:128::5", "fd00:10:129::7"


def ext_layers(names):
    made = {
        "hop": lambda: IPv6ExtHdrHopByHop(),
        "dst": lambda: IPv6ExtHdrDestOpt(),
        "rt": lambda: IPv6ExtHdrRouting(addresses=[], segleft=0),
        "frag0": lambda: IPv6ExtHdrFragment(offset=0, m=0, id=0x12345678),
    }
    out = None
    for name in names:
        layer = made[name]()
        out = layer if out is None else out / layer
    return out


@st.composite
def fields(draw, protos=("tcp", "udp", "icmp6"), max_payload=1400):
    """Everything needed to build one IPv6 packet with scapy (see ``build``)."""
    proto = draw(st.sampled_from(protos))
    f = dict(
        proto=proto,
        src=draw(addresses),
        dst=draw(addresses),
        tc=draw(u8),
        fl=draw(st.integers(0, 0xFFFFF)),
        hlim=draw(st.integers(1, 255)),
        exts=draw(st.sampled_from(range(len(EXTS)))),
        sport=draw(u16),
        dport=draw(u16),
        payload=draw(st.binary(max_size=max_payload)),
    )
    if proto == "tcp":
        f.update(seq=draw(u32), ack=draw(u32), flags=draw(u8), window=draw(u16))
    elif proto == "udp":
        f.update(zero=draw(st.booleans()))
    else:
        f.update(type=draw(st.sampled_from([128, 129])), seq=draw(u16))
    return f


def build_scapy(f, **over):
    f = {**f, **over}
    ip = IPv6(src=f["src"], dst=f["dst"], tc=f["tc"], fl=f["fl"], hlim=f["hlim"])
    if f["proto"] == "tcp":
        l4 = TCP(
            sport=f["sport"],
            dport=f["dport"],
            seq=f["seq"],
            ack=f["ack"],
            flags=f["flags"],
            window=f["window"],
        )
    elif f["proto"] == "udp":
        l4 = UDP(sport=f["sport"], dport=f["dport"], chksum=0 if f["zero"] else None)
    else:
        kind = ICMPv6EchoRequest if f["type"] == 128 else ICMPv6EchoReply
        l4 = kind(id=f["sport"], seq=f["seq"])
    exts = ext_layers(EXTS[f["exts"]])
    return (ip / exts / l4 if exts is not None else ip / l4) / Raw(f["payload"])


def build(f, **over) -> bytes:
    return bytes(build_scapy(f, **over))


def ext_len(f) -> int:
    sizes = {"hop": 8, "dst": 8, "rt": 8, "frag0": 8}
    return sum(sizes[n] for n in EXTS[f["exts"]])


# --- parsing ----------------------------------------------------------------------------------


@SETTINGS
@given(fields())
def test_parse_reads_what_scapy_built(f):
    raw = build(f)
    ip = parse_ip(raw)
    assert ip is not None and ip.v6 and ip == parse_ipv6(raw)
    assert parse_ipv4(raw) is None  # parse_ipv4 stays IPv4 only
    assert (ip.off, ip.hlen, ip.end) == (0, 40 + ext_len(f), len(raw))
    assert (int_to_ip(ip.src, True), int_to_ip(ip.dst, True)) == (f["src"], f["dst"])
    assert ip.frag == 0 and ip.flags == 0
    if f["proto"] == "icmp6":
        assert (ip.proto, ip.sport, ip.dport, ip.info) == (58, f["sport"], 0, f["type"] << 8)
    else:
        assert (ip.proto, ip.sport, ip.dport) == (
            {"tcp": 6, "udp": 17}[f["proto"]],
            f["sport"],
            f["dport"],
        )
    if f["proto"] == "tcp":
        assert ip.info == f["flags"]
    assert parse_ip(memoryview(bytearray(raw))) == ip
    assert ip_version(raw) == 6 and ip_proto(raw) == ip.proto


@SETTINGS
@given(fields(max_payload=60), st.data())
def test_truncated_packets_do_not_parse(f, data):
    raw = build(f)
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse_ip(raw[:cut]) is None


def test_every_truncation_of_a_packet_with_extension_headers_is_none():
    raw = bytes(
        IPv6(src=A, dst=B)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting(addresses=[], segleft=0)
        / IPv6ExtHdrDestOpt()
        / TCP(sport=1, dport=2, options=[("MSS", 1440)])
        / Raw(b"x")
    )
    assert parse_ip(raw) is not None
    for cut in range(len(raw)):
        assert parse_ip(raw[:cut]) is None, cut
        # the header's payload length shrunk with the cut: the chain or TCP no longer fits
        short = bytearray(raw[:cut])
        if cut >= 40:
            struct.pack_into("!H", short, 4, cut - 40)
            ip = parse_ip(short)
            assert ip is None or cut == len(raw) - 1 and ip.end == cut


def test_trailing_bytes_ignored():
    raw = bytes(IPv6(src=A, dst=B) / UDP(sport=1, dport=2) / b"hello")
    ip = parse_ip(raw + b"\0" * 7)
    assert ip is not None and ip.end == len(raw)


def with_next(raw: bytes, nxt: int) -> bytearray:
    buf = bytearray(raw)
    buf[6] = nxt
    return buf


@pytest.mark.parametrize("nxt", [50, 51, 59, 253, 6 + 200])
def test_esp_ah_no_next_and_unknown_end_the_walk_without_ports(nxt):
    buf = with_next(bytes(IPv6(src=A, dst=B) / Raw(b"\x06\x00" + b"x" * 30)), nxt)
    ip = parse_ip(buf)
    assert ip is not None
    assert (ip.proto, ip.hlen, ip.sport, ip.dport, ip.info) == (nxt, 40, -1, -1, 0)


def test_ah_behind_a_hop_by_hop_header_stops_there():
    raw = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrHopByHop() / AH(spi=1) / TCP())
    ip = parse_ip(raw)
    assert ip is not None and (ip.proto, ip.hlen, ip.sport) == (51, 48, -1)


def test_garbage_headers_rejected():
    good = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt() / TCP(sport=1, dport=2) / b"x")
    assert parse_ip(good) is not None

    def bad(offset, value):
        buf = bytearray(good)
        buf[offset : offset + len(value)] = value
        return buf

    cases = [
        bad(0, b"\x50"),  # version 5
        bad(4, struct.pack("!H", 0)),  # payload length 0: a jumbogram (RFC 2675)
        bad(4, struct.pack("!H", len(good) - 40 + 1)),  # beyond the bytes read
        bad(41, b"\x20"),  # destination options of 264 bytes
        bad(48 + 12, b"\x40"),  # TCP data offset 16 < 20
        bad(48 + 12, b"\xf0"),  # TCP data offset 60 > the segment
    ]
    for i, case in enumerate(cases):
        assert parse_ip(case) is None, i
    assert parse_ip(b"") is None and parse_ip(b"\x60" * 39) is None
    assert ip_version(b"\x60" * 39) == 0 and ip_version(b"\x45" * 19) == 0


def test_a_chain_longer_than_the_bound_is_not_parsed():
    def chain(n):
        p = IPv6(src=A, dst=B)
        for _ in range(n):
            p = p / IPv6ExtHdrDestOpt()
        return bytes(p / UDP(sport=1, dport=2))

    ip = parse_ip(chain(packet.MAX_EXT_HEADERS))
    assert ip is not None and ip.proto == 17 and ip.sport == 1
    assert parse_ip(chain(packet.MAX_EXT_HEADERS + 1)) is None


def test_two_fragment_headers_are_not_parsed():
    raw = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrFragment() / IPv6ExtHdrFragment() / UDP())
    assert parse_ip(raw) is None


def test_an_ext_header_cut_by_the_payload_length_is_not_parsed():
    raw = bytearray(bytes(IPv6(src=A, dst=B) / IPv6ExtHdrHopByHop() / UDP()))
    struct.pack_into("!H", raw, 4, 4)  # 4 bytes of payload: not even the 8-byte header
    assert parse_ip(raw) is None


# --- fuzz -------------------------------------------------------------------------------------


def exercise(buf: bytearray) -> None:
    """Every parse and rewrite on arbitrary bytes: views stay in bounds, nothing raises."""
    ip = parse_ip(buf)
    if ip is not None:
        assert 0 <= ip.off < ip.end <= len(buf) and ip.off + ip.hlen <= ip.end
        new = 0x20010DB8 << 96 | 1 if ip.v6 else 0x0A000001
        rewrite_addr(buf, ip, DST, new)
        rewrite_port(buf, ip, SRC, 1234)
        parse_ident(buf, ip)
        is_too_big(ip, 1280)
        inner = parse_icmp_quote(buf, ip)
        if inner is not None:
            assert ip.off + ip.hlen + 8 <= inner.off < inner.end <= ip.end
            assert inner.v6 == ip.v6
            rewrite_icmp_quote(buf, ip, inner, SRC, new, 80)
    if ip_version(buf):
        ip_proto(buf)
        dont_fragment(buf)
    rewrite_tcp_mss(buf, 1200)
    build_icmp_frag_needed(buf, 1280, "fd00::1")
    build_icmp_admin_prohibited(buf, None)
    build_icmp_port_unreachable(buf, "10.0.0.1")


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data):
    exercise(bytearray(data))
    exercise(bytearray(b"\x60" + data))
    # a fixed header whose payload length matches: the walk itself gets random bytes
    body = bytes(data[:200])
    head = struct.pack("!IHBB", 0x60000000, len(body), data[0] if data else 0, 64)
    exercise(bytearray(head + bytes(32) + body))


@st.composite
def valid_packets(draw):
    """(kind, fields, index): built in the test, since scapy's fragment6 draws randomness."""
    return draw(st.sampled_from(["plain", "error", "fragment"])), draw(fields(max_payload=200))


def build_valid(kind, f, index: int) -> bytearray:
    if kind == "plain":
        return bytearray(build(f))
    if kind == "error":
        quote = build(f)
        return bytearray(bytes(IPv6(src=B, dst=f["src"]) / ICMPv6DestUnreach(code=4) / quote))
    whole = IPv6(src=f["src"], dst=f["dst"]) / IPv6ExtHdrFragment(id=7) / UDP() / (b"y" * 1500)
    frags = fragment6(whole, 1280)
    return bytearray(bytes(frags[index % len(frags)]))


@SETTINGS
@given(valid_packets(), st.data())
def test_mutated_packets_never_raise(spec, data):
    """Valid packets with random bytes overwritten: the bounds checks must hold."""
    buf = build_valid(*spec, data.draw(st.integers(0, 1)))
    for _ in range(data.draw(st.integers(1, 6))):
        buf[data.draw(st.integers(0, min(len(buf) - 1, 140)))] = data.draw(u8)
    exercise(buf)


# --- rewrites against scapy's full recomputation ------------------------------------------------


@SETTINGS
@given(fields(), addresses, st.sampled_from([SRC, DST]))
def test_rewrite_addr_checksums_equal_scapy(f, new, field):
    """TCP, UDP and ICMPv6 checksums all cover the 128-bit addresses (pseudo-header)."""
    buf = bytearray(build(f))
    ip = parse_ip(buf)
    assert ip is not None
    rewrite_addr(buf, ip, field, ip_to_int(new))
    assert bytes(buf) == build(f, **{"src" if field == SRC else "dst": new})


@SETTINGS
@given(fields(protos=("tcp", "udp")), u16, st.sampled_from([SRC, DST]))
def test_rewrite_port_checksums_equal_scapy(f, new, field):
    assume(not (f["proto"] == "udp" and f["zero"]))
    buf = bytearray(build(f))
    ip = parse_ip(buf)
    assert ip is not None
    rewrite_port(buf, ip, field, new)
    assert bytes(buf) == build(f, **{"sport" if field == SRC else "dport": new})


@SETTINGS
@given(fields(protos=("udp",)), addresses)
def test_a_received_udp_zero_checksum_stays_zero(f, new):
    """Invalid over IPv6 (RFC 8200 §8.1): left for the receiver to drop, never made valid."""
    buf = bytearray(build({**f, "zero": True}))
    ip = parse_ip(buf)
    rewrite_addr(buf, ip, DST, ip_to_int(new))
    rewrite_port(buf, parse_ip(buf), DST, 4242)
    assert buf[ip.hlen + 6 : ip.hlen + 8] == b"\0\0"


def test_udp_computed_zero_sent_as_ffff():
    base = dict(
        proto="udp", src=A, dst="fd00:30::1", tc=0, fl=0, hlim=64, exts=0,
        sport=1, dport=2, payload=b"\0\0", zero=False,
    )  # fmt: skip
    partial = ~UDP(build(base, dst=B)[40:]).chksum & 0xFFFF  # ones' sum without the payload
    f = {**base, "payload": (0xFFFF - partial).to_bytes(2, "big")}  # sums to -0: checksum 0
    assert UDP(build(f, dst=B)[40:]).chksum == 0xFFFF  # scapy's rule too
    buf = bytearray(build(f))
    assert buf[46:48] != b"\xff\xff"
    rewrite_addr(buf, parse_ip(buf), DST, ip_to_int(B))
    assert buf[46:48] == b"\xff\xff" and bytes(buf) == build(f, dst=B)


@SETTINGS
@given(addresses, st.sampled_from([SRC, DST]), st.sampled_from([1280, 1500]), st.integers(1, 4000))
def test_fragments_rewrite_like_scapy(new, field, mtu, size):
    """Only the first fragment has ports and the UDP checksum; all get their address."""

    def frags(src, dst):
        whole = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=99) / UDP(sport=5, dport=6)
        return [bytes(p) for p in fragment6(whole / (b"z" * size), mtu)]

    got = frags(A, B)
    want = frags(new, B) if field == SRC else frags(A, new)
    assert len(got) == len(want)
    for raw, expected in zip(got, want, strict=True):
        buf = bytearray(raw)
        ip = parse_ip(buf)
        assert ip is not None and ip.proto == 17 and parse_ident(buf, ip) == 99
        assert (ip.sport >= 0) == (ip.frag == 0)
        assert bool(ip.flags & packet.IP_MF) == (raw is not got[-1])
        rewrite_addr(buf, ip, field, ip_to_int(new))
        assert bytes(buf) == expected


def test_a_tiny_tcp_fragment_overlap_is_dropped():
    raw = bytearray(bytes(IPv6(src=A, dst=B) / IPv6ExtHdrFragment(offset=1, id=3) / (b"x" * 40)))
    raw[40] = 6  # the fragment header's next header: TCP, at offset 8 (RFC 1858 §4)
    assert parse_ip(raw) is None
    struct.pack_into("!H", raw, 42, 2 << 3)
    ip = parse_ip(raw)
    assert ip is not None and (ip.frag, ip.sport) == (16, -1)


def test_parse_ident_without_a_fragment_header_is_zero():
    raw = bytes(IPv6(src=A, dst=B) / UDP())
    assert parse_ident(raw, parse_ip(raw)) == 0


# --- ICMPv6 errors ----------------------------------------------------------------------------


@SETTINGS
@given(
    fields(protos=("tcp", "udp", "icmp6")),
    st.sampled_from([8, 18, 20, 28, 2000]),
    addresses,
    addresses,
    st.sampled_from([SRC, DST]),
)
def test_icmp6_quote_rewrite_consistent(f, extra, outer_src, new, field):
    """Quoted addresses, the quoted TCP/UDP/ICMPv6 checksum and the outer ICMPv6 checksum
    (whose pseudo-header holds the outer addresses) end up as scapy computes them."""
    orig = build(f)
    hlen = parse_ip(orig).hlen
    quote = orig[: hlen + extra]
    outer_dst = f["src"]
    buf = bytearray(bytes(IPv6(src=outer_src, dst=outer_dst) / ICMPv6DestUnreach(code=4) / quote))
    outer = parse_ip(buf)
    assert outer is not None and is_icmp_error(outer)
    inner = parse_icmp_quote(buf, outer)
    assert inner is not None and inner.v6
    assert (inner.src, inner.dst, inner.sport) == (
        ip_to_int(f["src"]),
        ip_to_int(f["dst"]),
        f["sport"],
    )
    rewrite_icmp_quote(buf, outer, inner, field, ip_to_int(new))
    rewrite_addr(buf, outer, DST, ip_to_int(B))  # the outer header too, its pseudo-header
    want = bytearray(build(f, **{"src" if field == SRC else "dst": new})[: hlen + extra])
    if f["proto"] == "tcp" and extra < 20 and len(want) >= hlen + 18:
        want[hlen + 16 : hlen + 18] = orig[hlen + 16 : hlen + 18]  # not updated, as Linux
    assert bytes(buf) == bytes(
        IPv6(src=outer_src, dst=B) / ICMPv6DestUnreach(code=4) / Raw(bytes(want))
    )


def test_icmp6_quote_needs_a_whole_header_and_eight_bytes():
    orig = bytes(IPv6(src=A, dst=B) / UDP(sport=1, dport=2) / b"payload")
    for cut, ok in ((47, False), (48, True)):
        err = bytes(IPv6(src=B, dst=A) / ICMPv6DestUnreach() / Raw(orig[:cut]))
        outer = parse_ip(err)
        assert outer is not None and (parse_icmp_quote(err, outer) is not None) == ok
    v4_inside = bytes(IPv6(src=B, dst=A) / ICMPv6DestUnreach() / Raw(b"\x45" + bytes(60)))
    assert parse_icmp_quote(v4_inside, parse_ip(v4_inside)) is None
    jumbo = bytearray(orig)
    struct.pack_into("!H", jumbo, 4, 0)
    err = bytes(IPv6(src=B, dst=A) / ICMPv6DestUnreach() / Raw(bytes(jumbo)))
    assert parse_icmp_quote(err, parse_ip(err)) is None
    # ICMPv4 quoted in ICMPv6 (protocol 1 over IPv6) is not an ICMP error here
    odd = with_next(bytes(IPv6(src=B, dst=A) / Raw(bytes([3, 3, 0, 0]) + bytes(4) + orig)), 1)
    assert parse_icmp_quote(odd, parse_ip(odd)) is None


def recomputed6(raw: bytes) -> bytes:
    p = IPv6(raw)
    for layer in (ICMPv6DestUnreach, ICMPv6PacketTooBig):
        if layer in p:
            del p[layer].cksum
    return bytes(IPv6(bytes(p)))


@SETTINGS
@given(fields(protos=("tcp", "udp")), st.integers(1280, 9000))
def test_packet_too_big_as_scapy_reads_it(f, mtu):
    orig = build(f)
    reply = build_icmp_frag_needed(orig, mtu, "10.128.0.5")  # an IPv4 source: orig's dst
    assert reply is not None
    p = IPv6(reply)
    assert (ip_to_int(p.src), ip_to_int(p.dst)) == (ip_to_int(f["dst"]), ip_to_int(f["src"]))
    assert (p.nh, p.hlim) == (58, 64)
    assert (p[ICMPv6PacketTooBig].type, p[ICMPv6PacketTooBig].mtu) == (2, mtu)
    assert bytes(p[ICMPv6PacketTooBig].payload) == orig[:1232]
    assert len(reply) == min(len(orig) + 48, 1280)
    assert recomputed6(reply) == reply  # the checksum covers the pseudo-header


@pytest.mark.parametrize(
    ("build_it", "kind", "code"),
    [
        (lambda o, s: build_icmp_admin_prohibited(o, s), ICMPv6DestUnreach, 1),
        (lambda o, s: build_icmp_port_unreachable(o, s), ICMPv6DestUnreach, 4),
        (lambda o, s: build_icmp_unreachable(o, 1, s), ICMPv6DestUnreach, 0),
        (lambda o, s: build_icmp_unreachable(o, 10, s), ICMPv6DestUnreach, 1),
    ],
)
def test_destination_unreachable_codes_and_sources(build_it, kind, code):
    orig = bytes(
        IPv6(src=A, dst="fd00:30::9") / TCP(sport=40000, dport=80, flags="S") / (b"x" * 20)
    )
    for src_ip, want in (
        ("10.128.0.5", "fd00:30::9"),  # IPv4 text (the pod's IPv4): the packet's destination
        (None, "fd00:30::9"),
        ("fd00:30::1", "fd00:30::1"),
        (ip_to_int("fd00:30::2"), "fd00:30::2"),
    ):
        reply = build_it(orig, src_ip)
        assert reply is not None
        p = IPv6(reply)
        assert (p.src, p.dst) == (want, A)
        assert (p[kind].type, p[kind].code) == (1, code)
        assert (p[TCPerror].sport, p[TCPerror].dport) == (40000, 80)
        assert p[IPerror6].dst == "fd00:30::9" and recomputed6(reply) == reply


def test_no_icmpv6_error_where_rfc_4443_forbids_one():
    def udp(src=A, dst=B):
        return bytes(IPv6(src=src, dst=dst) / UDP(sport=1, dport=2) / (b"x" * 100))

    err = bytes(IPv6(src=B, dst=A) / ICMPv6DestUnreach() / udp()[:60])
    assert build_icmp_admin_prohibited(err, None) is None  # about an error
    exceeded = bytes(IPv6(src=B, dst=A) / ICMPv6TimeExceeded() / udp()[:60])
    assert build_icmp_frag_needed(exceeded, 1280, None) is None
    unknown_error = with_next(bytes(IPv6(src=B, dst=A) / Raw(bytes([100, 0]) + bytes(6))), 58)
    assert build_icmp_port_unreachable(unknown_error, None) is None  # any type < 128
    assert build_icmp_admin_prohibited(udp(src="::"), None) is None  # unspecified source
    assert build_icmp_admin_prohibited(udp(src="ff02::1"), None) is None  # multicast source
    assert build_icmp_admin_prohibited(udp(dst="ff02::1"), None) is None  # multicast dst ...
    too_big = build_icmp_frag_needed(udp(dst="ff05::2"), 1280, "fd00::1")  # ... except PTB
    assert too_big is not None and IPv6(too_big).src == "fd00::1"
    assert build_icmp_frag_needed(udp(dst="ff05::2"), 1280, None) is None  # no unicast source
    later = [
        bytes(p)
        for p in fragment6(IPv6(src=A, dst=B) / IPv6ExtHdrFragment() / UDP() / (b"q" * 3000), 1280)
    ]
    assert build_icmp_admin_prohibited(later[0], None) is not None
    assert build_icmp_admin_prohibited(later[1], None) is None  # a later fragment
    assert build_icmp_unreachable(udp(), 2, None) is None  # protocol unreachable: no mapping
    assert build_icmp_admin_prohibited(b"\x60garbage", None) is None
    echo = bytes(IPv6(src=A, dst=B) / ICMPv6EchoRequest() / (b"x" * 64))
    assert build_icmp_frag_needed(echo, 1280, None) is not None  # queries are fine


def test_an_ipv4_packet_never_gets_an_ipv6_source():
    orig = bytes(IPv6(src=A, dst=B) / UDP())  # for the v6 path
    assert build_icmp_admin_prohibited(orig, "fd00::1") is not None
    from scapy.layers.inet import IP

    v4 = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))
    assert build_icmp_admin_prohibited(v4, "fd00::1") is None
    reply = build_icmp_admin_prohibited(v4, None)
    assert reply is not None and IP(reply).src == "10.0.0.2"


def test_icmp_errors_and_too_big_over_ipv6():
    big = bytes(IPv6(src=A, dst=B) / UDP() / (b"x" * 1500))
    ip = parse_ip(big)
    assert is_too_big(ip, 1280) and not is_too_big(ip, 1600)  # never fragmented: always "DF"
    assert dont_fragment(big) and not is_icmp_error(ip)
    reply = bytes(IPv6(src=B, dst=A) / ICMPv6EchoReply(id=9))
    assert not is_icmp_error(parse_ip(reply)) and parse_ip(reply).sport == 9


# --- MSS clamp --------------------------------------------------------------------------------


def syn6(options, flags="S", exts=()):
    p = IPv6(src=A, dst=B)
    layers = ext_layers(exts)
    if layers is not None:
        p = p / layers
    return bytearray(bytes(p / TCP(sport=1, dport=2, flags=flags, options=options)))


def recomputed_tcp(raw) -> bytes:
    p = IPv6(bytes(raw))
    del p[TCP].chksum
    return bytes(IPv6(bytes(p)))


@pytest.mark.parametrize("exts", [(), ("hop",), ("hop", "dst")])
@pytest.mark.parametrize("options", [[("MSS", 1460)], [("NOP", None), ("MSS", 9000)]])
def test_ipv6_mss_clamped_to_mtu_minus_60(exts, options):
    """One call serves both families: ``max_mss`` is MTU - 40, IPv6 gets MTU - 60."""
    mtu = 1440
    for flags in ("S", "SA"):
        buf = syn6(options, flags, exts)
        assert rewrite_tcp_mss(buf, mtu - 40)
        want = [("MSS", mtu - 60) if k == "MSS" else (k, v) for k, v in options]
        assert bytes(buf) == bytes(syn6(want, flags, exts)) == recomputed_tcp(buf)


def test_ipv6_mss_untouched():
    for buf in (
        syn6([("MSS", 1380)]),  # already MTU - 60 for 1440
        syn6([("MSS", 1460)], flags="A"),
        syn6([]),
        bytearray(bytes(IPv6(src=A, dst=B) / UDP() / (b"x" * 30))),
    ):
        before = bytes(buf)
        assert not rewrite_tcp_mss(buf, 1400)
        assert bytes(buf) == before


# --- addresses and keys -----------------------------------------------------------------------


def test_addresses_and_keys_of_both_families():
    assert ip_to_int("10.0.0.1") == 0x0A000001 and ip_to_int("::a00:1") == 0x0A000001
    assert int_to_ip(0x0A000001) == "10.0.0.1" and int_to_ip(0x0A000001, True) == "::a00:1"
    six = ip_to_int("fd00::1")
    assert int_to_ip(six, True) == "fd00::1" == int_to_ip(addr_key(six, True))
    assert addr_key(0x0A000001, False) == 0x0A000001 != addr_key(0x0A000001, True)
    assert ip_key("::a00:1") == addr_key(0x0A000001, True) == ip_key(V6 | 0x0A000001)
    assert ip_key(ipaddress.ip_address("10.0.0.1")) == 0x0A000001
    for bad in (-1, 1 << 32, V6 - 1, V6 << 1, "pod"):
        with pytest.raises(ValueError):
            ip_key(bad)


def test_named_header_fields_of_both_families():
    v6 = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrHopByHop() / TCP())
    assert ip_proto(v6) == 6 and v6[6] == 0
    assert ip_proto(bytearray(v6[:47])) == -1  # the chain does not parse
    assert ip_proto(bytes(IPv6(src=A, dst=B) / UDP())) == 17
    v4 = bytes([0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 6]) + bytes(10)
    assert ip_proto(v4) == 6 and ip_version(v4) == 4 and dont_fragment(v4)
