"""core/packet.py against scapy as the independent implementation.

Packets are built with scapy from drawn fields; after every rewrite the bytes must equal what
scapy builds from the rewritten fields (which recomputes every checksum from scratch).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, IPOption_NOP, TCPerror, fragment
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from tencrypt.core import packet
from tencrypt.core.packet import (
    DST,
    SRC,
    build_icmp_frag_needed,
    checksum,
    csum_replace,
    int_to_ip,
    ip_to_int,
    is_icmp_error,
    is_too_big,
    parse_icmp_quote,
    parse_ipv4,
    rewrite_addr,
    rewrite_icmp_quote,
    rewrite_tcp_mss,
)

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
addresses = st.integers(0x01000000, 0xDFFFFFFF).map(int_to_ip)  # unicast-looking
TCP_OPTIONS = [
    [],
    [("MSS", 1460)],
    [("NOP", None), ("MSS", 1380)],
    [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("NOP", None), ("WScale", 7)],
    [("NOP", None), ("NOP", None), ("Timestamp", (5, 6))],
]


@st.composite
def fields(draw, protos=("tcp", "udp", "icmp"), max_payload=1400):
    """Everything needed to build one IPv4 packet with scapy (see ``build``)."""
    proto = draw(st.sampled_from(protos))
    f = dict(
        proto=proto,
        src=draw(addresses),
        dst=draw(addresses),
        id=draw(u16),
        ttl=draw(st.integers(1, 255)),
        tos=draw(u8),
        df=draw(st.booleans()),
        nops=draw(st.integers(0, 10)),
        sport=draw(u16),
        dport=draw(u16),
        payload=draw(st.binary(max_size=max_payload)),
    )
    if proto == "tcp":
        f.update(
            seq=draw(u32),
            ack=draw(u32),
            flags=draw(u8),
            window=draw(u16),
            options=draw(st.sampled_from(range(len(TCP_OPTIONS)))),
        )
    elif proto == "udp":
        f.update(nocsum=draw(st.booleans()))
    else:
        f.update(type=draw(st.sampled_from([8, 0, 13, 14])), seq=draw(u16))
    return f


def build_scapy(f, **over):
    f = {**f, **over}
    ip = IP(
        src=f["src"],
        dst=f["dst"],
        id=f["id"],
        ttl=f["ttl"],
        tos=f["tos"],
        flags="DF" if f["df"] else 0,
        options=[IPOption_NOP()] * f["nops"],
    )
    if f["proto"] == "tcp":
        l4 = TCP(
            sport=f["sport"],
            dport=f["dport"],
            seq=f["seq"],
            ack=f["ack"],
            flags=f["flags"],
            window=f["window"],
            options=TCP_OPTIONS[f["options"]],
        )
    elif f["proto"] == "udp":
        l4 = UDP(sport=f["sport"], dport=f["dport"], chksum=0 if f["nocsum"] else None)
    else:
        l4 = ICMP(type=f["type"], id=f["sport"], seq=f["seq"])
    return ip / l4 / Raw(f["payload"])


def build(f, **over) -> bytes:
    return bytes(build_scapy(f, **over))


# --- checksums --------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=3000))
def test_checksum_equals_scapy(data):
    assert checksum(data) == scapy_checksum(data)
    assert checksum(memoryview(bytearray(data))) == scapy_checksum(data)


@SETTINGS
@given(st.binary(min_size=4, max_size=200), st.data())
def test_incremental_update_equals_full_recomputation(data, draw):
    """RFC 1624 eqn. 3 on a valid checksum gives exactly the recomputed one, 16 or 32 bits wide."""
    buf = bytearray(data)
    if len(buf) & 1:
        buf.append(draw.draw(u8))
    buf += b"\0\0"  # the checksum field, zero while summing
    struct.pack_into("!H", buf, len(buf) - 2, checksum(buf))  # now valid: sums to -0
    hc = struct.unpack_from("!H", buf, len(buf) - 2)[0]
    bits = draw.draw(st.sampled_from([16, 32]))
    width = bits // 8
    at = 2 * draw.draw(st.integers(0, (len(buf) - 2 - width) // 2))
    old = int.from_bytes(buf[at : at + width], "big")
    new = draw.draw(st.integers(0, (1 << bits) - 1))
    buf[at : at + width] = new.to_bytes(width, "big")
    struct.pack_into("!H", buf, len(buf) - 2, 0)
    # All-zero data sums to +0, not -0; no IP/TCP/UDP/ICMP header is all zero (RFC 1624 §3).
    assume(any(buf))
    assert csum_replace(hc, old, new, bits) == scapy_checksum(bytes(buf))


def test_checksum_rfc1071_example():
    # RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2, checksum 220d
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


# --- parsing ----------------------------------------------------------------------------------


@SETTINGS
@given(fields())
def test_parse_reads_what_scapy_built(f):
    raw = build(f)
    ip = parse_ipv4(raw)
    assert ip is not None
    assert (ip.off, ip.hlen, ip.end) == (0, 20 + 4 * ((f["nops"] + 3) // 4), len(raw))
    assert (int_to_ip(ip.src), int_to_ip(ip.dst)) == (f["src"], f["dst"])
    assert ip.frag == 0 and bool(ip.flags & packet.IP_DF) == f["df"]
    if f["proto"] == "icmp":
        assert (ip.proto, ip.sport, ip.dport, ip.info) == (1, f["sport"], 0, f["type"] << 8)
    else:
        assert (ip.sport, ip.dport) == (f["sport"], f["dport"])
    if f["proto"] == "tcp":
        assert ip.info == f["flags"]
    assert parse_ipv4(memoryview(bytearray(raw))) == ip


@SETTINGS
@given(fields(), st.data())
def test_truncated_packets_do_not_parse(f, data):
    raw = build(f)
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse_ipv4(raw[:cut]) is None


def exercise(buf: bytearray) -> None:
    """Every parse and rewrite on arbitrary bytes: views stay in bounds, nothing raises."""
    ip = parse_ipv4(buf)
    if ip is not None:
        assert 0 <= ip.off < ip.end <= len(buf)
        rewrite_addr(buf, ip, DST, 0x0A000001)
        inner = parse_icmp_quote(buf, ip)
        if inner is not None:
            assert ip.off + ip.hlen + 8 <= inner.off < inner.end <= ip.end
            rewrite_icmp_quote(buf, ip, inner, SRC, 0x0A000002)
    rewrite_tcp_mss(buf, 1200)
    build_icmp_frag_needed(buf, 1400, "10.0.0.1")


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data):
    exercise(bytearray(data))
    exercise(bytearray(b"\x45" + data))  # more of them look like IPv4 headers


@SETTINGS
@given(fields(), st.data())
def test_mutated_packets_never_raise(f, data):
    """Valid packets with random bytes overwritten: the parsers' bounds checks must hold."""
    buf = bytearray(build(f))
    for _ in range(data.draw(st.integers(1, 6))):
        buf[data.draw(st.integers(0, min(len(buf) - 1, 80)))] = data.draw(u8)
    exercise(buf)


def test_garbage_headers_rejected():
    good = bytearray(build_scapy_simple("tcp"))
    cases = [
        (0, b"\x65"),  # IPv6 version nibble
        (0, b"\x44"),  # IHL 4 < 5
        (0, b"\x4f"),  # IHL 15: header longer than the packet
        (2, struct.pack("!H", 19)),  # total length < header length
        (2, struct.pack("!H", len(good) + 1)),  # total length > bytes read
        (2, struct.pack("!H", 30)),
    ]  # TCP header cut by the total length
    for offset, value in cases:
        bad = bytearray(good)
        bad[offset : offset + len(value)] = value
        assert parse_ipv4(bad) is None, (offset, value)
    bad = bytearray(good)
    bad[20 + 12] = 0x40  # TCP data offset 16 bytes < 20
    assert parse_ipv4(bad) is None
    assert parse_ipv4(b"") is None and parse_ipv4(b"\x45" * 19) is None


def build_scapy_simple(proto, payload=b"hello", **ip):
    l4 = {"tcp": TCP(sport=1234, dport=80), "udp": UDP(sport=1234, dport=53), "icmp": ICMP(id=7)}[
        proto
    ]
    return bytes(IP(**{"src": "10.0.0.1", "dst": "10.0.0.2", **ip}) / l4 / Raw(payload))


def test_trailing_padding_ignored():
    raw = build_scapy_simple("udp") + b"\0" * 6
    ip = parse_ipv4(raw)
    assert ip is not None and ip.end == len(raw) - 6


# --- fragments --------------------------------------------------------------------------------


@SETTINGS
@given(
    fields(protos=("tcp", "udp"), max_payload=1400),
    addresses,
    st.sampled_from([SRC, DST]),
    st.sampled_from([64, 200, 512]),
)
def test_fragments_rewrite_like_scapy(f, new, field, size):
    """Only the first fragment has ports and the L4 checksum; all get their addresses changed."""
    f = {**f, "df": False}
    frags = [bytes(p) for p in fragment(build_scapy(f), fragsize=size)]
    key = "src" if field == SRC else "dst"
    expected = [bytes(p) for p in fragment(build_scapy(f, **{key: new}), fragsize=size)]
    assert len(frags) == len(expected)
    for raw, want in zip(frags, expected, strict=True):
        buf = bytearray(raw)
        ip = parse_ipv4(buf)
        assert ip is not None
        assert (ip.sport >= 0) == (ip.frag == 0)
        rewrite_addr(buf, ip, field, ip_to_int(new))
        assert bytes(buf) == want


def test_tiny_tcp_fragment_overlap_dropped():
    raw = bytearray(build_scapy_simple("tcp", payload=b"x" * 40))
    struct.pack_into("!H", raw, 6, 1)  # fragment offset 1 (8 bytes): RFC 1858
    assert parse_ipv4(raw) is None
    struct.pack_into("!H", raw, 6, 2)
    assert parse_ipv4(raw) is not None


# --- address rewrites -------------------------------------------------------------------------


@SETTINGS
@given(fields(), addresses, st.sampled_from([SRC, DST]))
def test_rewrite_addr_checksums_equal_scapy(f, new, field):
    buf = bytearray(build(f))
    ip = parse_ipv4(buf)
    assert ip is not None
    rewrite_addr(buf, ip, field, ip_to_int(new))
    assert bytes(buf) == build(f, **{"src" if field == SRC else "dst": new})


@SETTINGS
@given(fields(protos=("udp",)), addresses)
def test_udp_zero_checksum_stays_zero(f, new):
    buf = bytearray(build({**f, "nocsum": True}))
    rewrite_addr(buf, parse_ipv4(buf), DST, ip_to_int(new))
    assert buf[parse_ipv4(buf).hlen + 6 :][:2] == b"\0\0"


def test_udp_computed_zero_sent_as_ffff():
    """A payload word chosen so that the rewritten checksum is 0: it must go out as 0xFFFF."""
    f = dict(
        proto="udp",
        src="10.0.0.1",
        dst="172.30.0.1",
        id=0,
        ttl=64,
        tos=0,
        df=False,
        nops=0,
        sport=1,
        dport=2,
        payload=b"\0\0",
        nocsum=False,
    )
    partial = ~UDP(build(f, dst="10.0.0.2")[20:]).chksum & 0xFFFF  # ones' sum without payload
    f["payload"] = (0xFFFF - partial).to_bytes(2, "big")  # brings the sum to -0: checksum 0
    assert UDP(build(f, dst="10.0.0.2")[20:]).chksum == 0xFFFF  # scapy's rule too
    buf = bytearray(build(f))
    assert buf[26:28] != b"\xff\xff"
    rewrite_addr(buf, parse_ipv4(buf), DST, ip_to_int("10.0.0.2"))
    assert buf[26:28] == b"\xff\xff"
    assert bytes(buf) == build(f, dst="10.0.0.2")


# --- ICMP errors ------------------------------------------------------------------------------


@SETTINGS
@given(
    fields(),
    st.sampled_from([8, 18, 20, 28, 548]),
    addresses,
    addresses,
    st.sampled_from([SRC, DST]),
)
def test_icmp_quote_rewrite_consistent(f, extra, outer_src, new, field):
    """Quoted header, its checksums and the ICMP checksum all end up as scapy computes them.

    The quoted TCP checksum is only updated when the whole TCP header is quoted (Linux).
    """
    orig = build(f)
    hlen = parse_ipv4(orig).hlen
    quote = orig[: hlen + extra]
    err = IP(src=outer_src, dst=f["src"]) / ICMP(type=3, code=3) / Raw(quote)
    buf = bytearray(bytes(err))
    outer = parse_ipv4(buf)
    assert outer is not None and is_icmp_error(outer)
    inner = parse_icmp_quote(buf, outer)
    assert inner is not None
    assert (inner.src, inner.dst, inner.sport) == (
        ip_to_int(f["src"]),
        ip_to_int(f["dst"]),
        f["sport"],
    )
    rewrite_icmp_quote(buf, outer, inner, field, ip_to_int(new))
    want = bytearray(build(f, **{"src" if field == SRC else "dst": new})[: hlen + extra])
    if f["proto"] == "tcp" and extra < 20 and len(want) >= hlen + 18:
        want[hlen + 16 : hlen + 18] = orig[hlen + 16 : hlen + 18]  # not updated, as Linux
    assert bytes(buf) == bytes(
        IP(src=outer_src, dst=f["src"]) / ICMP(type=3, code=3) / Raw(bytes(want))
    )


def test_icmp_quote_too_short_is_malformed():
    orig = build_scapy_simple("udp")
    err = bytes(IP(src="10.0.0.9", dst="10.0.0.1") / ICMP(type=3, code=3) / Raw(orig[:27]))
    outer = parse_ipv4(err)
    assert outer is not None and parse_icmp_quote(err, outer) is None


# --- frag-needed ------------------------------------------------------------------------------


@SETTINGS
@given(fields(protos=("tcp", "udp")), st.integers(68, 9000))
def test_frag_needed_as_scapy_reads_it(f, mtu):
    assume(not f["src"].startswith("127.") and not f["dst"].startswith("127."))
    orig = build({**f, "df": True})
    reply = build_icmp_frag_needed(orig, mtu, "10.128.0.5")
    assert reply is not None
    p = IP(reply)
    assert (p.src, p.dst, p.proto) == ("10.128.0.5", f["src"], 1)
    assert (p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (3, 4, mtu)
    hlen = parse_ipv4(orig).hlen
    assert bytes(p[ICMP].payload) == orig[: hlen + 8]
    assert p[IPerror].src == f["src"] and p[IPerror].dst == f["dst"]
    # checksums equal scapy's recomputation
    q = IP(reply)
    del q.chksum
    del q[ICMP].chksum
    assert bytes(IP(bytes(q))) == reply


def test_frag_needed_quotes_options_and_tcp_ports():
    orig = bytes(
        IP(src="10.129.0.7", dst="172.30.5.9", flags="DF", options=[IPOption_NOP()] * 4)
        / TCP(sport=40000, dport=80)
        / Raw(b"x" * 1500)
    )
    p = IP(build_icmp_frag_needed(orig, 1440, ip_to_int("10.128.0.5")))
    assert p[ICMP].nexthopmtu == 1440 and p[IPerror].ihl == 6
    assert (p[TCPerror].sport, p[TCPerror].dport) == (40000, 80)
    assert is_too_big(parse_ipv4(orig), 1440) and not is_too_big(parse_ipv4(orig), 1600)


def test_frag_needed_never_for_errors_fragments_or_broadcast():
    orig = build_scapy_simple("udp", payload=b"x" * 100)
    err = bytes(IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=3, code=4) / Raw(orig[:28]))
    assert build_icmp_frag_needed(err, 1000, "10.0.0.3") is None
    later = bytearray(orig)
    struct.pack_into("!H", later, 6, 0x2000 | 4)  # MF, offset 32
    struct.pack_into("!H", later, 10, 0)
    assert build_icmp_frag_needed(later, 1000, "10.0.0.3") is None
    multicast = build_scapy_simple("udp", dst="224.0.0.5")
    assert build_icmp_frag_needed(multicast, 1000, "10.0.0.3") is None
    assert build_icmp_frag_needed(b"\x45garbage", 1000, "10.0.0.3") is None
    echo = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8) / Raw(b"x" * 64))
    assert build_icmp_frag_needed(echo, 60, "10.0.0.3") is not None  # queries are fine


# --- MSS clamp --------------------------------------------------------------------------------


def syn(options, flags="S", payload=b""):
    return bytearray(
        bytes(
            IP(src="10.0.0.1", dst="10.0.0.2")
            / TCP(sport=1, dport=2, flags=flags, options=options)
            / Raw(payload)
        )
    )


def recomputed(raw) -> bytes:
    p = IP(bytes(raw))
    del p.chksum
    del p[TCP].chksum
    return bytes(p)


def test_mss_clamped_with_valid_checksum():
    buf = syn([("MSS", 1460)])
    assert rewrite_tcp_mss(buf, 1400)
    assert IP(bytes(buf))[TCP].options == [("MSS", 1400)]
    assert bytes(buf) == recomputed(buf) == bytes(syn([("MSS", 1400)]))


@pytest.mark.parametrize(
    "options",
    [
        [("NOP", None), ("MSS", 1460)],  # MSS value at an odd offset
        [("WScale", 7), ("MSS", 1460), ("SAckOK", b"")],
        [("SAckOK", b""), ("Timestamp", (1, 2)), ("NOP", None), ("MSS", 9000)],
    ],
)
def test_mss_clamped_anywhere_in_options(options):
    for flags in ("S", "SA"):
        buf = syn(options, flags)
        assert rewrite_tcp_mss(buf, 1400)
        want = [("MSS", 1400) if k == "MSS" else (k, v) for k, v in options]
        assert bytes(buf) == bytes(syn(want, flags)) == recomputed(buf)


@pytest.mark.parametrize(
    "buf",
    [
        syn([]),  # no MSS option
        syn([("MSS", 1300)]),  # already small enough
        syn([("MSS", 1460)], flags="A"),  # not a SYN
        syn([("Timestamp", (1, 2))], payload=b"x"),  # other options only
        bytearray(build_scapy_simple("udp")),  # not TCP
    ],
)
def test_mss_untouched(buf):
    before = bytes(buf)
    assert not rewrite_tcp_mss(buf, 1400)
    assert bytes(buf) == before


def test_mss_malformed_option_list_left_alone():
    buf = syn([("NOP", None), ("NOP", None), ("NOP", None), ("NOP", None)])
    buf[40:44] = b"\x08\x00\x02\x04"  # option with length 0 before an MSS-looking byte pair
    before = bytes(buf)
    assert not rewrite_tcp_mss(buf, 1400) and bytes(buf) == before


def test_named_header_fields():
    from tencrypt.core.packet import dont_fragment, ip_proto, ip_version

    hdr = bytes([0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 6]) + bytes(10)
    assert ip_version(hdr) == 4 and ip_proto(hdr) == 6 and dont_fragment(hdr)
    assert ip_version(hdr[:19]) == 0 and ip_version(b"\x60" + hdr[1:]) == 0
    assert not dont_fragment(hdr[:6] + b"\x00" + hdr[7:])
