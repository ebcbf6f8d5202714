"""The wire format: RFC 8439 through our sealing code, the byte layout, and tamper evidence."""

import ipaddress
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from tencrypt.core import wire
from tencrypt.core.podconfig import OVERHEAD, OVERHEAD6, tun_mtu

# RFC 8439 §2.8.2: AEAD_CHACHA20_POLY1305 test vector.
RFC_KEY = bytes.fromhex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
RFC_NONCE = bytes.fromhex("070000004041424344454647")
RFC_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
RFC_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
    b"for the future, sunscreen would be it."
)
RFC_CIPHERTEXT = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116"
)
RFC_TAG = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")

KEY = ChaCha20Poly1305(bytes(range(32)))


def test_rfc8439_vector_through_the_sealing_code():
    aead = ChaCha20Poly1305(RFC_KEY)
    sealed = wire.seal_with_header(aead, RFC_AAD, RFC_NONCE, RFC_PLAINTEXT)
    assert sealed == RFC_AAD + RFC_CIPHERTEXT + RFC_TAG
    assert wire.open_with_header(aead, sealed, len(RFC_AAD), RFC_NONCE) == RFC_PLAINTEXT
    forged = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert wire.open_with_header(aead, forged, len(RFC_AAD), RFC_NONCE) is None


def test_data_message_layout_byte_by_byte():
    sealed = wire.seal(KEY, 0x11223344, 0x0102030405060708, b"packet")
    assert sealed[:4] == b"\x04\x00\x00\x00"
    assert sealed[4:8] == bytes.fromhex("44332211")  # receiver index, little-endian
    assert sealed[8:16] == bytes.fromhex("0807060504030201")  # counter, little-endian
    assert len(sealed) == 16 + len(b"packet") + 16
    nonce = b"\x00" * 4 + sealed[8:16]
    assert KEY.decrypt(nonce, sealed[16:], sealed[:16]) == b"packet"  # header is the AD
    assert wire.parse_header(sealed) == (0x11223344, 0x0102030405060708)


def test_sizes_and_mtu():
    assert wire.DATA_OVERHEAD == 32 and OVERHEAD == 60 and OVERHEAD6 == 80
    assert tun_mtu(1500) == 1440 and tun_mtu(1450) == 1390
    assert len(wire.seal(KEY, 1, 0, b"")) == 32  # a keepalive
    # version 3: the payloads end with pod_ip4 (4) and pod_ip6 (16)
    assert (wire.INITIATION_PAYLOAD_LEN, wire.RESPONSE_PAYLOAD_LEN) == (36, 24)
    assert (wire.INITIATION_LEN, wire.RESPONSE_LEN) == (104, 96)
    assert wire.RESPONSE_LEN < wire.INITIATION_LEN  # no amplification towards a spoofed source


@given(
    st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=1500), st.booleans()
)
def test_seal_then_open_returns_the_packet(index, counter, packet, as_view):
    sealed = wire.seal(KEY, index, counter, memoryview(packet) if as_view else packet)
    datagram = memoryview(sealed) if as_view else sealed
    assert wire.parse_header(datagram) == (index, counter)
    assert wire.open_datagram(KEY, datagram) == packet


@given(st.binary(max_size=200), st.data())
def test_any_bit_flip_in_a_data_message_is_detected(packet, data):
    sealed = bytearray(wire.seal(KEY, 7, 42, packet))
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    # Either it no longer parses as data (type word changed) or the tag catches it.
    assert wire.parse_header(sealed) is None or wire.open_datagram(KEY, sealed) is None


@given(st.binary(max_size=31))
def test_too_short_for_a_tag_is_not_data(blob):
    assert wire.parse_header(blob) is None


@pytest.mark.parametrize(
    "blob, kind",
    [(b"", -1), (b"\x04\x00\x00", -1), (b"\x04\x00\x00\x00", 4), (b"\x01\x00\x01\x00", 0x10001)],
)
def test_message_type_is_the_leading_word(blob, kind):
    assert wire.message_type(blob) == kind


@given(st.integers(0, 2**62), st.integers(0, 2**62))
def test_tai64n_round_trips_and_orders_like_the_clock(a, b):
    assert wire.parse_tai64n(wire.build_tai64n(a)) == a
    assert (wire.build_tai64n(a) < wire.build_tai64n(b)) == (a < b)


def test_tai64n_layout_and_invalid_values():
    stamp = wire.build_tai64n(1_700_000_000 * 10**9 + 5)
    assert stamp == struct.pack(">QI", 2**62 + 1_700_000_000, 5)
    assert wire.parse_tai64n(struct.pack(">QI", 2**62, 10**9)) is None  # nanos out of range
    assert wire.parse_tai64n(struct.pack(">QI", 2**62 - 1, 0)) is None  # before 1970


IP4, IP6 = ipaddress.IPv4Address("10.0.0.1").packed, ipaddress.IPv6Address("fd00::1").packed


@pytest.mark.parametrize(
    "ips", [wire.PodIPs(IP4, None), wire.PodIPs(None, IP6), wire.PodIPs(IP4, IP6)]
)
def test_handshake_payloads_round_trip_each_combination_of_addresses(ips):
    payload = wire.build_initiation_payload(9, 123, ips)
    assert len(payload) == wire.INITIATION_PAYLOAD_LEN
    assert payload[:4] == b"\x09\x00\x00\x00"
    assert payload[16:20] == (ips.ip4 or bytes(4)) and payload[20:] == (ips.ip6 or bytes(16))
    assert wire.parse_initiation_payload(payload) == (9, 123, ips)
    resp = wire.build_response_payload(8, ips)
    assert len(resp) == wire.RESPONSE_PAYLOAD_LEN
    assert resp[4:8] == (ips.ip4 or bytes(4)) and resp[8:] == (ips.ip6 or bytes(16))
    assert wire.parse_response_payload(resp) == (8, ips)


def test_malformed_payloads_are_refused():
    payload = wire.build_initiation_payload(9, 123, wire.PodIPs(IP4, IP6))
    assert wire.parse_initiation_payload(b"\x00" * 4 + payload[4:]) is None  # index 0
    assert wire.parse_initiation_payload(payload[:-1]) is None
    assert wire.parse_initiation_payload(payload + b"\x00") is None
    assert wire.parse_initiation_payload(payload[:16] + bytes(20)) is None  # no address at all
    assert wire.parse_response_payload(bytes(8) + bytes(16)) is None  # index 0, no address
    resp = wire.build_response_payload(8, wire.PodIPs(IP4, None))
    assert wire.parse_response_payload(resp[:4] + bytes(20)) is None  # no address at all
    assert wire.parse_response_payload(resp[:-1]) is None


@given(st.binary(min_size=36, max_size=36))
def test_any_initiation_payload_parses_or_is_none(payload):
    got = wire.parse_initiation_payload(payload)
    if got is not None:
        index, _, ips = got
        assert index and ips.present
        assert all(ip != bytes(len(ip)) for ip in ips.present)
        assert wire.build_initiation_payload(index, got[1], ips) == payload


def test_a_single_packed_address_is_taken_as_its_family():
    assert wire.as_pod_ips(IP4) == wire.PodIPs(IP4, None)
    assert wire.as_pod_ips(IP6) == wire.PodIPs(None, IP6)
    assert wire.pod_ips("fd00::1", "10.0.0.1", None) == wire.PodIPs(IP4, IP6)
    for bad in (("10.0.0.1", "10.0.0.2"), ("fd00::1", "fd00::2"), ("0.0.0.0",), ("::",)):
        with pytest.raises(ValueError):
            wire.pod_ips(*bad)


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("10.0.0.1", "10.0.0.1"),
        ("FD00:0:0::1", "fd00::1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("not an address", "not an address"),
        ("::zz", "::zz"),
    ],
)
def test_outer_ip_is_canonical_text(text, canonical):
    assert wire.outer_ip(text) == canonical


MAC_KEY = wire.derive_mac_key(bytes(range(1, 33)))


def test_handshake_envelopes():
    init = wire.build_initiation(bytes(84), MAC_KEY)
    assert init[:4] == b"\x01\x00\x00\x00" and len(init) == 104
    assert wire.parse_initiation(init) == bytes(84)
    assert wire.parse_initiation(init + b"\x00") is None
    resp = wire.build_response(0xAABBCCDD, bytes(72), MAC_KEY)
    assert resp[:8] == b"\x02\x00\x00\x00\xdd\xcc\xbb\xaa" and len(resp) == 96
    assert wire.parse_response(resp) == (0xAABBCCDD, bytes(72))
    assert wire.parse_response(resp[:-1]) is None


def test_mac1_as_the_docstring_specifies_it():
    """Computed here from the spec's words alone: BLAKE2s("tencrypt mac1 v3" || psk), then
    keyed BLAKE2s-128 over every byte before mac1."""
    import hashlib

    psk = bytes(range(1, 33))
    key = hashlib.blake2s(b"tencrypt mac1 v3" + psk).digest()
    assert wire.derive_mac_key(psk) == key and len(wire.MAC_LABEL) == 16
    assert wire.PROLOGUE == b"tencrypt v3 NNpsk0"
    init = wire.build_initiation(bytes(84), key)
    assert init[88:] == hashlib.blake2s(init[:88], key=key, digest_size=16).digest()
    assert wire.mac_valid(key, init) and wire.mac_valid(key, memoryview(init))
    resp = wire.build_response(7, bytes(72), key)
    assert resp[80:] == hashlib.blake2s(resp[:80], key=key, digest_size=16).digest()


@given(st.integers(0, 103), st.integers(1, 255))
def test_any_flipped_bit_fails_mac1(pos, flip):
    init = bytearray(wire.build_initiation(bytes(84), MAC_KEY))
    init[pos] ^= flip
    assert not wire.mac_valid(MAC_KEY, init)


def test_mac_key_index_tells_which_key_a_message_uses():
    keys = [wire.derive_mac_key(bytes([k]) * 32) for k in (1, 2, 3)]
    for i, key in enumerate(keys):
        assert wire.mac_key_index(keys, wire.build_initiation(bytes(84), key)) == i
    assert wire.mac_key_index(keys, wire.build_initiation(bytes(84), MAC_KEY)) is None
    assert wire.mac_key_index(keys, b"short") is None


def test_version_1_and_2_sizes_are_recognised():
    for n in (72, 88):  # v1, v2 initiations
        assert wire.is_old_version(b"\x01\x00\x00\x00" + bytes(n - 4))
        assert not wire.is_old_version(b"\x04\x00\x00\x00" + bytes(n - 4))  # data
        assert not wire.is_old_version(b"\x01\x00\x01\x00" + bytes(n - 4))  # unknown word
    for n in (64, 80):  # v1, v2 responses
        assert wire.is_old_version(b"\x02\x00\x00\x00" + bytes(n - 4))
    assert not wire.is_old_version(b"\x02\x00\x00\x00" + bytes(84))  # an initiation's size
    assert not wire.is_old_version(wire.build_initiation(bytes(84), MAC_KEY))
    assert not wire.is_old_version(wire.build_response(1, bytes(72), MAC_KEY))
    assert not wire.is_old_version(b"\x01")
