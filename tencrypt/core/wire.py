"""Tencrypt's wire format, version 3: every UDP datagram on port 1337, byte by byte.

This docstring summarises the format; the full specification is docs/PROTOCOL.md.
All integers are little-endian unless said otherwise. Every message starts with a 4-byte
word: the message type in byte 0 and three zero bytes. A receiver reads the word as a u32
(so non-zero reserved bytes make an unknown type) and drops anything but 1, 2 and 4.
Outer datagrams are UDP over IPv4 or over IPv6 (an IPv6-only cluster, or a peer reached at
its IPv6 address); the format is the same over both.

Notation: ``||`` concatenates; ``BLAKE2s(x)`` is the unkeyed 32-byte BLAKE2s digest (RFC 7693);
``MAC(k, x)`` is BLAKE2s keyed with the 32-byte ``k``, 16-byte digest (RFC 7693 with
``kk = 32``, ``nn = 16``; Python: ``hashlib.blake2s(x, key=k, digest_size=16).digest()``).

Keys. ``psk`` is the project's 32-byte key. ``mac_key = BLAKE2s(b"tencrypt mac1 v3" || psk)``
(the label is those 16 ASCII bytes), the way WireGuard derives its mac1 key from
``"mac1----" || Spub``. The MAC key is not the psk and reveals nothing about it.

Handshake: Noise ``Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`` (Noise spec rev 34, pattern
``-> psk, e`` / ``<- e, ee``), prologue ``b"tencrypt v3 NNpsk0"`` (18 ASCII bytes), psk = the
project key. Each Noise message is ``e`` (32 bytes) then the encrypted payload and its tag
(Noise ``EncryptAndHash``). Both handshake messages end with ``mac1 = MAC(mac_key, every byte
of the message before mac1)``. A receiver checks mac1 first, before any Noise hashing or
Diffie-Hellman, and drops the message silently if it does not verify: a party without the
project key costs it one BLAKE2s. A receiver that holds several project keys (a key ring)
tries each key's mac1 to learn which key the message uses.

Pod addresses. Both payloads end with the sender's own pod addresses, one per family, at fixed
offsets: ``pod_ip4`` (4 bytes) then ``pod_ip6`` (16 bytes), network byte order, as Kubernetes
lists them in the pod's ``status.podIPs``. All zeros means "no address of that family" (an
IPv6-only pod sends a zero ``pod_ip4``, an IPv4-only one a zero ``pod_ip6``); a payload with
neither is malformed (dropped as a bad handshake, never answered).

Initiation, type 1, 104 bytes::

    0      1      4                36                                      88          104
    | 0x01 | 0 0 0 | ephemeral (32) | Noise-encrypted payload (36) + tag (16) | mac1 (16) |
    payload: sender_index u32 | timestamp 12 | pod_ip4 4 | pod_ip6 16
    - sender_index: random, non-zero, chosen by the initiator; the responder puts it in the
      ``receiver_index`` of the response and of every data message it sends on the session.
    - timestamp: TAI64N, big-endian: u64 (2**62 + Unix seconds) then u32 nanoseconds (below
      10**9). Strictly increasing per sender, even across retries within one clock tick; a
      responder refuses one not newer than the last it accepted from either claimed pod
      address, older than its wall clock minus 180 s, or newer than its wall clock plus 30 s
      (clock skew), which makes a replayed initiation useless. A byte-identical copy of an
      initiation already seen is refused after the mac1 check alone.
    - pod_ip4, pod_ip6: the initiator's own pod addresses. The one of the outer datagram's
      family must equal its source address (pod-to-pod traffic is not SNATed in Kubernetes);
      the other one is believed only when the project's membership pairs it with that
      address (the same pod's status.podIPs). Each must lie in the pod network and be no
      Service IP, link-local, loopback, multicast, broadcast, IPv4-mapped, documentation,
      gateway, DNS server or responder address (core/identity.py).

Response, type 2, 96 bytes::

    0      1      4                8                40                              80          96
    | 0x02 | 0 0 0 | receiver_index | ephemeral (32) | encrypted payload (24) + tag (16) | mac1 (16) |
    payload: sender_index u32 | pod_ip4 4 | pod_ip6 16   (the responder's index and addresses)
    - receiver_index: the initiation's sender_index (in the clear: it selects the handshake;
      a tampered value fails mac1, or selects no handshake or one whose Noise state rejects it).
    - The response goes to the UDP source address of the initiation. It is 8 bytes shorter than
      the initiation, so the handshake cannot amplify traffic towards a spoofed source.
    - The responder's addresses follow the initiation's rules, with the response's source,
      unless the initiation was sent to a Service IP and the response comes back from that
      Service IP (conntrack undoes the DNAT): the initiator then cannot verify the claims and
      binds the session to the Service IP only, never to a claimed pod address.

After the response both sides call Noise ``Split()``: the initiator sends with the first
CipherState's key and receives with the second; the responder the other way round. The
Noise CipherState counters are not used: data messages carry their own counter.

Data, type 4, 32 + n bytes (unchanged since version 1)::

    0      1      4                8                  16                              16+n+16
    | 0x04 | 0 0 0 | receiver_index | counter u64       | ChaCha20-Poly1305(packet) + tag |
    - receiver_index: the index the *receiver* chose for this session.
    - counter: 0, 1, 2 ... per session and direction, never repeated; the AEAD nonce is
      4 zero bytes || counter (8 bytes LE, i.e. bytes 8..16 of the message). One session
      carries both inner families of a dual-stack pod: they share its one counter.
    - the 16-byte header is the AEAD associated data, so index and counter are authenticated.
    - the plaintext is exactly one IPv4 or IPv6 packet, no padding; n = 0 is a keepalive.

Overhead per packet: 32 bytes + UDP 8 + outer IPv4 20 = 60, or outer IPv6 40 = 80, so tenc0's
MTU is the uplink MTU minus 60 (1440 on a 1500-byte link) over IPv4, minus 80 (1420) over IPv6.

Versions 1 (prologue ``b"tencrypt v1 NNpsk0"``, no mac1: a 72-byte initiation, a 64-byte
response) and 2 (``b"tencrypt v2 NNpsk0"``, one IPv4 pod address: 88 and 80 bytes) are
refused: a version-3 receiver counts a type-1 datagram of 72 or 88 bytes and a type-2 datagram
of 64 or 80 bytes as OLD_VERSION and answers nothing. Versions never complete a handshake with
each other (different prologues and mac1 keys), so a mixed project fails closed.

Differences from WireGuard's format, and why: mac1 is keyed from the project key rather than a
static public key (every pod of a project holds the same key: identity is the project, bound
to the network by the pod IP rules above); no mac2/cookie (a per-source and a global budget of
handshakes per second bound the Diffie-Hellman work a key holder can cause); no static keys;
pod addresses in the payloads so that each side knows which inner source addresses the other
may use.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Sequence
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

TYPE_INITIATION = 1
TYPE_RESPONSE = 2
TYPE_DATA = 4

VERSION = 3
PROLOGUE = b"tencrypt v3 NNpsk0"
MAC_LABEL = b"tencrypt mac1 v3"
MAC_LEN = 16
NOISE_PROTOCOL = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"

TAG_LEN = 16
DATA_HEADER_LEN = 16
DATA_OVERHEAD = DATA_HEADER_LEN + TAG_LEN  # 32: also the length of a keepalive
ADDRESSES_LEN = 4 + 16  # pod_ip4 || pod_ip6, at the end of both payloads
INITIATION_PAYLOAD_LEN = 4 + 12 + ADDRESSES_LEN  # 36
RESPONSE_PAYLOAD_LEN = 4 + ADDRESSES_LEN  # 24
INITIATION_LEN = 4 + 32 + INITIATION_PAYLOAD_LEN + TAG_LEN + MAC_LEN  # 104
RESPONSE_LEN = 8 + 32 + RESPONSE_PAYLOAD_LEN + TAG_LEN + MAC_LEN  # 96
V1_INITIATION_LEN = 72  # version 1 sizes: refused as OLD_VERSION
V1_RESPONSE_LEN = 64
V2_INITIATION_LEN = 88  # version 2 sizes (one IPv4 address): refused as OLD_VERSION
V2_RESPONSE_LEN = 80
TAI64_EPOCH = 2**62  # TAI64 label of 1970-01-01 (leap seconds ignored, as WireGuard does)

_WORD = struct.Struct("<I")
_DATA_HEADER = struct.Struct("<IIQ")
_RESPONSE_HEADER = struct.Struct("<II")
_INIT_PAYLOAD = struct.Struct("<I12s4s16s")
_RESP_PAYLOAD = struct.Struct("<I4s16s")
_TAI64N = struct.Struct(">QI")
_INITIATION_WORD = _WORD.pack(TYPE_INITIATION)
_NONCE_PAD = b"\x00\x00\x00\x00"
_NO_IP4, _NO_IP6 = bytes(4), bytes(16)
_OLD_SIZES = {
    TYPE_INITIATION: (V1_INITIATION_LEN, V2_INITIATION_LEN),
    TYPE_RESPONSE: (V1_RESPONSE_LEN, V2_RESPONSE_LEN),
}

Buffer = bytes | bytearray | memoryview  # what the shell may hand us: read buffers are reused


class PodIPs(NamedTuple):
    """A handshake payload's pod addresses, packed (4 and 16 bytes); None: none of that family
    (all zeros on the wire). At least one is present in every valid payload."""

    ip4: bytes | None = None
    ip6: bytes | None = None

    @property
    def present(self) -> tuple[bytes, ...]:
        """The addresses that are there, IPv4 first."""
        return tuple(ip for ip in (self.ip4, self.ip6) if ip is not None)


def pod_ips(*addresses: str | None) -> PodIPs:
    """``PodIPs`` of up to one address per family given as text (None entries skipped).
    ValueError on a bad address or two of one family: a configuration error, not input."""
    ip4 = ip6 = None
    for text in addresses:
        if text is None:
            continue
        ip = ipaddress.ip_address(text)
        if ip.version == 4:
            if ip4 is not None:
                raise ValueError(f"two IPv4 pod addresses: {text}")
            ip4 = ip.packed
        else:
            if ip6 is not None:
                raise ValueError(f"two IPv6 pod addresses: {text}")
            ip6 = ip.packed
    if ip4 == _NO_IP4 or ip6 == _NO_IP6:
        raise ValueError("the unspecified address is no pod address")
    return PodIPs(ip4, ip6)


def as_pod_ips(ips: PodIPs | bytes) -> PodIPs:
    """``ips``, or one packed address (4 or 16 bytes) as the ``PodIPs`` of its family."""
    if isinstance(ips, PodIPs):
        return ips
    return PodIPs(ip4=ips) if len(ips) == 4 else PodIPs(ip6=ips)


def outer_ip(text: str) -> str:
    """The canonical text of an outer (UDP) source or destination address: IPv6 compressed
    (RFC 5952), an IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 datagram)
    as the IPv4 address it maps. Dotted IPv4 from the kernel is already canonical and is
    returned as it is, without parsing; text that is no address is returned unchanged."""
    if ":" not in text:
        return text
    try:
        ip = ipaddress.IPv6Address(text.split("%", 1)[0])  # a link-local's zone is not ours
    except ValueError:
        return text
    mapped = ip.ipv4_mapped
    return str(mapped if mapped is not None else ip)


def message_type(datagram: Buffer) -> int:
    """The leading u32 (type byte + 3 zero bytes), or -1 if the datagram is shorter than that."""
    if len(datagram) < 4:
        return -1
    return int(_WORD.unpack_from(datagram)[0])


# --- data messages: the hot path ----------------------------------------------------------


def seal_with_header(
    aead: ChaCha20Poly1305, header: bytes, nonce: bytes, plaintext: Buffer
) -> bytes:
    """``header || ChaCha20-Poly1305(nonce, plaintext, ad=header)``: the one sealing primitive.

    One concatenation of header and ciphertext is cheaper here than ``encrypt_into`` a fresh
    buffer (measured: bench/micro.py), and the plaintext is read in place (memoryview is fine).
    """
    return header + aead.encrypt(nonce, plaintext, header)


def open_with_header(
    aead: ChaCha20Poly1305, datagram: Buffer, header_len: int, nonce: bytes
) -> bytes | None:
    """Inverse of ``seal_with_header``: the plaintext, or ``None`` if the tag does not verify."""
    view = memoryview(datagram)
    try:
        return aead.decrypt(nonce, view[header_len:], view[:header_len])
    except InvalidTag:
        return None


def seal(key_obj: ChaCha20Poly1305, receiver_index: int, counter: int, plaintext: Buffer) -> bytes:
    """A complete data message (type 4) carrying ``plaintext``."""
    header = _DATA_HEADER.pack(TYPE_DATA, receiver_index, counter)
    return seal_with_header(key_obj, header, _NONCE_PAD + header[8:], plaintext)


def parse_header(datagram: Buffer) -> tuple[int, int] | None:
    """``(receiver_index, counter)`` of a data message long enough to hold a tag, else None."""
    if len(datagram) < DATA_OVERHEAD:
        return None
    word, receiver_index, counter = _DATA_HEADER.unpack_from(datagram)
    if word != TYPE_DATA:
        return None
    return receiver_index, counter


def open_datagram(key_obj: ChaCha20Poly1305, datagram: Buffer) -> bytes | None:
    """The plaintext of a data message whose header was parsed, or ``None`` on a bad tag."""
    # open_with_header's body, inlined: one call less per packet on the receive path.
    view = memoryview(datagram)
    try:
        return key_obj.decrypt(_NONCE_PAD + view[8:16], view[16:], view[:16])
    except InvalidTag:
        return None


# --- handshake messages --------------------------------------------------------------------


def build_tai64n(unix_ns: int) -> bytes:
    seconds, nanos = divmod(unix_ns, 1_000_000_000)
    return _TAI64N.pack(TAI64_EPOCH + seconds, nanos)


def parse_tai64n(stamp: bytes) -> int | None:
    """Unix nanoseconds, or None if the stamp is not a valid TAI64N value."""
    label, nanos = _TAI64N.unpack(stamp)
    if label < TAI64_EPOCH or nanos >= 1_000_000_000:
        return None
    return int(label - TAI64_EPOCH) * 1_000_000_000 + int(nanos)


def _packed_addresses(ips: PodIPs) -> tuple[bytes, bytes]:
    return (
        _NO_IP4 if ips.ip4 is None else ips.ip4,
        _NO_IP6 if ips.ip6 is None else ips.ip6,
    )


def _parsed_addresses(ip4: bytes, ip6: bytes) -> PodIPs | None:
    ips = PodIPs(None if ip4 == _NO_IP4 else ip4, None if ip6 == _NO_IP6 else ip6)
    return ips if ips.present else None


def build_initiation_payload(sender_index: int, unix_ns: int, ips: PodIPs | bytes) -> bytes:
    addresses = _packed_addresses(as_pod_ips(ips))
    return _INIT_PAYLOAD.pack(sender_index, build_tai64n(unix_ns), *addresses)


def parse_initiation_payload(payload: bytes) -> tuple[int, int, PodIPs] | None:
    """``(sender_index, unix_ns, pod addresses)`` or None if malformed (wrong length, index 0,
    invalid TAI64N, no address at all)."""
    if len(payload) != INITIATION_PAYLOAD_LEN:
        return None
    sender_index, stamp, ip4, ip6 = _INIT_PAYLOAD.unpack(payload)
    unix_ns = parse_tai64n(stamp)
    ips = _parsed_addresses(ip4, ip6)
    if sender_index == 0 or unix_ns is None or ips is None:
        return None
    return sender_index, unix_ns, ips


def build_response_payload(sender_index: int, ips: PodIPs | bytes) -> bytes:
    return _RESP_PAYLOAD.pack(sender_index, *_packed_addresses(as_pod_ips(ips)))


def parse_response_payload(payload: bytes) -> tuple[int, PodIPs] | None:
    """``(sender_index, pod addresses)`` or None if malformed (as for an initiation)."""
    if len(payload) != RESPONSE_PAYLOAD_LEN:
        return None
    sender_index, ip4, ip6 = _RESP_PAYLOAD.unpack(payload)
    ips = _parsed_addresses(ip4, ip6)
    if sender_index == 0 or ips is None:
        return None
    return sender_index, ips


def build_initiation(noise_message: bytes, mac_key: bytes) -> bytes:
    return add_mac(mac_key, _INITIATION_WORD + noise_message)


def parse_initiation(datagram: Buffer) -> bytes | None:
    """The Noise message inside an initiation of the right length, else None (mac1 is not
    checked here: ``mac_valid`` comes first)."""
    if len(datagram) != INITIATION_LEN:
        return None
    return bytes(datagram[4:-MAC_LEN])


def build_response(receiver_index: int, noise_message: bytes, mac_key: bytes) -> bytes:
    return add_mac(mac_key, _RESPONSE_HEADER.pack(TYPE_RESPONSE, receiver_index) + noise_message)


def parse_response(datagram: Buffer) -> tuple[int, bytes] | None:
    """``(receiver_index, noise_message)`` of a response of the right length, else None."""
    if len(datagram) != RESPONSE_LEN:
        return None
    _, receiver_index = _RESPONSE_HEADER.unpack_from(datagram)
    return receiver_index, bytes(datagram[8:-MAC_LEN])


def is_old_version(datagram: Buffer) -> bool:
    """A version-1 or version-2 handshake message (by type and size): refused, counted as
    OLD_VERSION."""
    return len(datagram) in _OLD_SIZES.get(message_type(datagram), ())


# --- mac1: the cheap check before any Noise work ----------------------------------------------


def derive_mac_key(psk: bytes) -> bytes:
    """``BLAKE2s(MAC_LABEL || psk)``: the key of mac1 for one project key."""
    return hashlib.blake2s(MAC_LABEL + psk).digest()


def build_mac(mac_key: bytes, body: Buffer) -> bytes:
    """``MAC(mac_key, body)``: keyed BLAKE2s, 16 bytes."""
    return hashlib.blake2s(body, key=mac_key, digest_size=MAC_LEN).digest()


def add_mac(mac_key: bytes, body: bytes) -> bytes:
    return body + build_mac(mac_key, body)


def mac_valid(mac_key: bytes, datagram: Buffer) -> bool:
    """Does the last 16 bytes' mac1 verify under ``mac_key``? (About a microsecond.)"""
    view = memoryview(datagram)
    if len(view) < MAC_LEN:
        return False
    return hmac.compare_digest(build_mac(mac_key, view[:-MAC_LEN]), view[-MAC_LEN:])


def mac_key_index(mac_keys: Sequence[bytes], datagram: Buffer) -> int | None:
    """The index of the first key in ``mac_keys`` under which mac1 verifies, or None: how a
    key ring tells which project key a handshake message uses without any Noise work."""
    for i, key in enumerate(mac_keys):
        if mac_valid(key, datagram):
            return i
    return None
