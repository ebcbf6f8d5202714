"""Tencrypt's wire format, version 1: every UDP datagram on port 1337, byte by byte.

This docstring is the specification; another implementation interoperates from it alone.
All integers are little-endian unless said otherwise. Every message starts with a 4-byte
word: the message type in byte 0 and three zero bytes. A receiver reads the word as a u32
(so non-zero reserved bytes make an unknown type) and drops anything but 1, 2 and 4.

Handshake: Noise ``Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`` (Noise spec rev 34, pattern
``-> psk, e`` / ``<- e, ee``), prologue ``b"tencrypt v1 NNpsk0"`` (18 ASCII bytes), psk = the
project's 32-byte key. Each Noise message is ``e`` (32 bytes) then the encrypted payload and
its tag (Noise ``EncryptAndHash``). The initiation's payload is keyed by the psk and ``e``
alone, so a responder authenticates it before doing any Diffie-Hellman.

Initiation, type 1, 72 bytes::

    0      1      4                36                                          72
    | 0x01 | 0 0 0 | ephemeral (32) | Noise-encrypted payload (20) + tag (16)   |
    payload: sender_index u32 | timestamp 12 | pod_ip 4
    - sender_index: random, non-zero, chosen by the initiator; the responder puts it in the
      ``receiver_index`` of the response and of every data message it sends on the session.
    - timestamp: TAI64N, big-endian: u64 (2**62 + Unix seconds) then u32 nanoseconds (below
      10**9). Strictly increasing per sender, even across retries within one clock tick; a
      responder refuses one not newer than the last it accepted from that pod_ip, or older
      than its wall clock minus 180 s, which makes a replayed initiation useless.
    - pod_ip: the initiator's own pod IPv4 address, network byte order.

Response, type 2, 64 bytes::

    0      1      4                8                40                            64
    | 0x02 | 0 0 0 | receiver_index | ephemeral (32) | encrypted payload (8) + tag (16) |
    payload: sender_index u32 | pod_ip 4   (the responder's index and pod IPv4 address)
    - receiver_index: the initiation's sender_index (in the clear: it selects the handshake;
      a tampered value selects no handshake or one whose Noise state rejects the message).
    - The response goes to the UDP source address of the initiation. It is shorter than the
      initiation, so the handshake cannot amplify traffic towards a spoofed source.

After the response both sides call Noise ``Split()``: the initiator sends with the first
CipherState's key and receives with the second; the responder the other way round. The
Noise CipherState counters are not used: data messages carry their own counter.

Data, type 4, 32 + n bytes::

    0      1      4                8                  16                              16+n+16
    | 0x04 | 0 0 0 | receiver_index | counter u64       | ChaCha20-Poly1305(packet) + tag |
    - receiver_index: the index the *receiver* chose for this session.
    - counter: 0, 1, 2 ... per session and direction, never repeated; the AEAD nonce is
      4 zero bytes || counter (8 bytes LE, i.e. bytes 8..16 of the message).
    - the 16-byte header is the AEAD associated data, so index and counter are authenticated.
    - the plaintext is exactly one IPv4 packet, no padding; n = 0 is a keepalive.

Overhead per packet: 32 bytes + outer IPv4 20 + UDP 8 = 60, so tenc0's MTU is the uplink MTU
minus 60 (1440 on a 1500-byte link).

Differences from WireGuard's format, and why: no MAC1/MAC2 fields (the psk-keyed AEAD of the
initiation already authenticates it before any DH; a per-source token bucket replaces the
cookie), no static keys (every pod of a project holds the same key: identity is the project),
and pod IPs in the payloads so that each side knows which inner source addresses the other may
use.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

TYPE_INITIATION = 1
TYPE_RESPONSE = 2
TYPE_DATA = 4

PROLOGUE = b"tencrypt v1 NNpsk0"
NOISE_PROTOCOL = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"

TAG_LEN = 16
DATA_HEADER_LEN = 16
DATA_OVERHEAD = DATA_HEADER_LEN + TAG_LEN  # 32: also the length of a keepalive
OUTER_OVERHEAD = 20 + 8 + DATA_OVERHEAD  # outer IPv4 + UDP + ours = 60
INITIATION_PAYLOAD_LEN = 20
RESPONSE_PAYLOAD_LEN = 8
INITIATION_LEN = 4 + 32 + INITIATION_PAYLOAD_LEN + TAG_LEN  # 72
RESPONSE_LEN = 8 + 32 + RESPONSE_PAYLOAD_LEN + TAG_LEN  # 64
TAI64_EPOCH = 2**62  # TAI64 label of 1970-01-01 (leap seconds ignored, as WireGuard does)

_WORD = struct.Struct("<I")
_DATA_HEADER = struct.Struct("<IIQ")
_RESPONSE_HEADER = struct.Struct("<II")
_INIT_PAYLOAD = struct.Struct("<I12s4s")
_RESP_PAYLOAD = struct.Struct("<I4s")
_TAI64N = struct.Struct(">QI")
_INITIATION_WORD = _WORD.pack(TYPE_INITIATION)
_NONCE_PAD = b"\x00\x00\x00\x00"

Buffer = bytes | bytearray | memoryview  # what the shell may hand us: read buffers are reused


def tunnel_mtu(link_mtu: int) -> int:
    """tenc0's MTU for an uplink MTU: what is left after our encapsulation."""
    return link_mtu - OUTER_OVERHEAD


def message_type(datagram: Buffer) -> int:
    """The leading u32 (type byte + 3 zero bytes), or -1 if the datagram is shorter than that."""
    if len(datagram) < 4:
        return -1
    return int(_WORD.unpack_from(datagram)[0])


# --- data messages: the hot path ----------------------------------------------------------

def seal_with_header(aead: ChaCha20Poly1305, header: bytes, nonce: bytes,
                     plaintext: Buffer) -> bytes:
    """``header || ChaCha20-Poly1305(nonce, plaintext, ad=header)``: the one sealing primitive.

    One concatenation of header and ciphertext is cheaper here than ``encrypt_into`` a fresh
    buffer (measured: bench/micro.py), and the plaintext is read in place (memoryview is fine).
    """
    return header + aead.encrypt(nonce, plaintext, header)


def open_with_header(aead: ChaCha20Poly1305, datagram: Buffer, header_len: int,
                     nonce: bytes) -> bytes | None:
    """Inverse of ``seal_with_header``: the plaintext, or ``None`` if the tag does not verify."""
    view = memoryview(datagram)
    try:
        return aead.decrypt(nonce, view[header_len:], view[:header_len])
    except InvalidTag:
        return None


def seal(key_obj: ChaCha20Poly1305, receiver_index: int, counter: int,
         plaintext: Buffer) -> bytes:
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


def build_initiation_payload(sender_index: int, unix_ns: int, pod_ip: bytes) -> bytes:
    return _INIT_PAYLOAD.pack(sender_index, build_tai64n(unix_ns), pod_ip)


def parse_initiation_payload(payload: bytes) -> tuple[int, int, bytes] | None:
    """``(sender_index, unix_ns, pod_ip)`` or None if malformed."""
    if len(payload) != INITIATION_PAYLOAD_LEN:
        return None
    sender_index, stamp, pod_ip = _INIT_PAYLOAD.unpack(payload)
    unix_ns = parse_tai64n(stamp)
    if sender_index == 0 or unix_ns is None:
        return None
    return sender_index, unix_ns, pod_ip


def build_response_payload(sender_index: int, pod_ip: bytes) -> bytes:
    return _RESP_PAYLOAD.pack(sender_index, pod_ip)


def parse_response_payload(payload: bytes) -> tuple[int, bytes] | None:
    if len(payload) != RESPONSE_PAYLOAD_LEN:
        return None
    sender_index, pod_ip = _RESP_PAYLOAD.unpack(payload)
    if sender_index == 0:
        return None
    return sender_index, pod_ip


def build_initiation(noise_message: bytes) -> bytes:
    return _INITIATION_WORD + noise_message


def parse_initiation(datagram: Buffer) -> bytes | None:
    """The Noise message inside an initiation of the right length, else None."""
    if len(datagram) != INITIATION_LEN:
        return None
    return bytes(datagram[4:])


def build_response(receiver_index: int, noise_message: bytes) -> bytes:
    return _RESPONSE_HEADER.pack(TYPE_RESPONSE, receiver_index) + noise_message


def parse_response(datagram: Buffer) -> tuple[int, bytes] | None:
    """``(receiver_index, noise_message)`` of a response of the right length, else None."""
    if len(datagram) != RESPONSE_LEN:
        return None
    _, receiver_index = _RESPONSE_HEADER.unpack_from(datagram)
    return receiver_index, bytes(datagram[8:])
