"""A second implementation of Tencrypt's wire format v3, written from core/wire.py's docstring
alone, and the tools the handshake-hardening tests run inside lab namespaces.

It imports nothing from tencrypt (only ``cryptography`` and ``hashlib``): if it completes a
handshake with a real proxy, the documented format is implementable from the docstring.

    python insider.py claim --psk-file F --target IP --claim IP [--ping] [--timeout S]
        An insider (holds the project key) sends an initiation to IP:1337 claiming pod IP
        ``--claim``. Prints one JSON line: whether a response came, whether its mac1 and Noise
        verified, and with ``--ping`` whether an ICMP echo sent through the new session was
        answered through it.
    python insider.py flood --target IP --rate N --seconds S
        Keyless initiations (100 random bytes after the type word) at about N a second for S
        seconds, 64 per system call with UDP GSO. Prints the number sent.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

NAME = b"Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"tencrypt v3 NNpsk0"
MAC_LABEL = b"tencrypt mac1 v3"
INITIATION_LEN, RESPONSE_LEN = 104, 96
PORT = 1337
UDP_SEGMENT = 103  # linux/udp.h
SOL_UDP = 17


# ---- Noise (spec rev 34, §4-§5, §9) as the docstring names it -----------------------------------


def blake2s(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def hkdf(ck: bytes, ikm: bytes, n: int) -> list[bytes]:
    temp = hmac.new(ck, ikm, hashlib.blake2s).digest()
    outs = [hmac.new(temp, b"\x01", hashlib.blake2s).digest()]
    for i in range(2, n + 1):
        outs.append(hmac.new(temp, outs[-1] + bytes([i]), hashlib.blake2s).digest())
    return outs


def nonce(n: int) -> bytes:
    return b"\x00" * 4 + struct.pack("<Q", n)


def mac(key: bytes, body: bytes) -> bytes:
    return hashlib.blake2s(body, key=key, digest_size=16).digest()


class Initiator:
    """Message 1 (``psk, e``) out, message 2 (``e, ee``) in, then Split()."""

    def __init__(self, psk: bytes) -> None:
        self.psk = psk
        self.mac_key = blake2s(MAC_LABEL + psk)
        self.h = blake2s(NAME)  # the name is longer than 32 bytes: hashed
        self.ck = self.h
        self.k = b""
        self.mix_hash(PROLOGUE)
        self.e = X25519PrivateKey.generate()

    def mix_hash(self, data: bytes) -> None:
        self.h = blake2s(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, k = hkdf(self.ck, ikm, 2)
        self.k = k

    def initiation(self, sender_index: int, unix_ns: int, pod_ip: str, pod_ip6: str = "") -> bytes:
        """Claims ``pod_ip`` (IPv4) and ``pod_ip6`` (IPv6, none if empty)."""
        self.ck, temp_h, self.k = hkdf(self.ck, self.psk, 3)  # psk: MixKeyAndHash
        self.mix_hash(temp_h)
        pub = self.e.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.mix_hash(pub)  # e
        self.mix_key(pub)  # psk modifier: MixKey(e) too
        secs, nanos = divmod(unix_ns, 10**9)
        payload = (
            struct.pack("<I", sender_index)
            + struct.pack(">QI", 2**62 + secs, nanos)
            + socket.inet_aton(pod_ip)
            + (socket.inet_pton(socket.AF_INET6, pod_ip6) if pod_ip6 else bytes(16))
        )
        c = ChaCha20Poly1305(self.k).encrypt(nonce(0), payload, self.h)
        self.mix_hash(c)
        body = struct.pack("<I", 1) + pub + c
        return body + mac(self.mac_key, body)

    def response(self, datagram: bytes, sender_index: int) -> dict[str, object] | None:
        """The session from a response, or None if it is not one for us."""
        if len(datagram) != RESPONSE_LEN or struct.unpack_from("<II", datagram) != (
            2,
            sender_index,
        ):
            return None
        if not hmac.compare_digest(mac(self.mac_key, datagram[:80]), datagram[80:]):
            return None
        re = datagram[8:40]
        self.mix_hash(re)
        self.mix_key(re)
        self.mix_key(self.e.exchange(X25519PublicKey.from_public_bytes(re)))  # ee
        try:
            payload = ChaCha20Poly1305(self.k).decrypt(nonce(0), datagram[40:80], self.h)
        except InvalidTag:
            return None
        send, recv = hkdf(self.ck, b"", 2)
        remote_index = struct.unpack_from("<I", payload)[0]
        return {
            "send": ChaCha20Poly1305(send),
            "recv": ChaCha20Poly1305(recv),
            "remote_index": remote_index,
            "pod_ip": socket.inet_ntoa(payload[4:8]),
            "pod_ip6": (
                socket.inet_ntop(socket.AF_INET6, payload[8:24]) if any(payload[8:24]) else ""
            ),
        }


def seal(key: ChaCha20Poly1305, receiver_index: int, counter: int, packet: bytes) -> bytes:
    header = struct.pack("<IIQ", 4, receiver_index, counter)
    return header + key.encrypt(nonce(counter), packet, header)


def open_data(key: ChaCha20Poly1305, local_index: int, datagram: bytes) -> bytes | None:
    if len(datagram) < 32 or struct.unpack_from("<II", datagram) != (4, local_index):
        return None
    try:
        return key.decrypt(b"\x00" * 4 + datagram[8:16], datagram[16:], datagram[:16])
    except InvalidTag:
        return None


# ---- inner packets ------------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(src: str, dst: str, ident: int, seq: int) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"tencrypt-insider"
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        seq,
        0,
        64,
        1,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


def is_echo_reply(packet: bytes, src: str, ident: int) -> bool:
    return (
        len(packet) >= 28
        and packet[9] == 1
        and packet[12:16] == socket.inet_aton(src)
        and packet[20] == 0
        and struct.unpack_from("!H", packet, 24)[0] == ident
    )


# ---- the commands -------------------------------------------------------------------------------


def claim(psk: bytes, target: str, claimed: str, ping: bool, timeout: float) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", PORT))
    sock.settimeout(0.2)
    local_index = int.from_bytes(os.urandom(4), "little") | 1
    me = Initiator(psk)
    sock.sendto(me.initiation(local_index, time.time_ns(), claimed), (target, PORT))
    result: dict[str, object] = {
        "response": False,
        "session": False,
        "echo_replies": 0,
        "datagrams": 0,
    }
    session = None
    deadline = time.monotonic() + timeout
    while session is None and time.monotonic() < deadline:
        try:
            datagram, _ = sock.recvfrom(2048)
        except TimeoutError:
            continue
        result["datagrams"] = int(result["datagrams"]) + 1  # type: ignore[call-overload]
        result["response"] = result["response"] or datagram[:1] == b"\x02"
        session = me.response(datagram, local_index)
    if session is None:
        return result
    result["session"] = True
    result["responder_pod_ip"] = session["pod_ip"]
    counter = 0
    while ping and time.monotonic() < deadline and not result["echo_replies"]:
        packet = echo_request(claimed, target, 0x7E57, counter)
        sock.sendto(
            seal(session["send"], session["remote_index"], counter, packet),  # type: ignore[arg-type]
            (target, PORT),
        )
        counter += 1
        stop = time.monotonic() + 0.5
        while time.monotonic() < stop:
            try:
                datagram, _ = sock.recvfrom(2048)
            except TimeoutError:
                continue
            inner = open_data(session["recv"], local_index, datagram)  # type: ignore[arg-type]
            if inner and is_echo_reply(inner, target, 0x7E57):
                result["echo_replies"] = 1
                break
    return result


def flood(target: str, rate: float, seconds: float) -> int:
    """Keyless initiations, 64 per sendmsg (UDP GSO), paced to ``rate`` a second."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((target, PORT))
    per_call = 64
    cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", INITIATION_LEN))]
    pool = [
        b"".join(b"\x01\x00\x00\x00" + os.urandom(INITIATION_LEN - 4) for _ in range(per_call))
        for _ in range(64)
    ]
    sent, start = 0, time.monotonic()
    end = start + seconds
    while (now := time.monotonic()) < end:
        due = int((now - start) * rate)
        while sent < due:
            try:
                sock.sendmsg([pool[(sent // per_call) % len(pool)]], cmsg)
            except OSError:  # a full socket buffer: the flood is best effort
                break
            sent += per_call
        time.sleep(0.002)
    return sent


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("claim")
    c.add_argument("--psk-file", required=True)
    c.add_argument("--target", required=True)
    c.add_argument("--claim", required=True)
    c.add_argument("--ping", action="store_true")
    c.add_argument("--timeout", type=float, default=5.0)
    f = sub.add_parser("flood")
    f.add_argument("--target", required=True)
    f.add_argument("--rate", type=float, default=100_000)
    f.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    if args.cmd == "claim":
        with open(args.psk_file) as fh:
            psk = base64.b64decode(fh.read().strip(), validate=True)
        print(json.dumps(claim(psk, args.target, args.claim, args.ping, args.timeout)))
    else:
        print(json.dumps({"sent": flood(args.target, args.rate, min(args.seconds, 30.0))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
