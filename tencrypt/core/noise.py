"""The Noise Protocol Framework (revision 34), the part Tencrypt uses.

Protocols: ``Noise_NN_25519_ChaChaPoly_{BLAKE2s,SHA256}`` and ``Noise_NNpsk0_...`` (the tunnel
uses ``Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s``). Section numbers below are the spec's.

Rules:
- Primitives come from ``cryptography`` (X25519, ChaCha20-Poly1305) and ``hashlib``/``hmac``
  (BLAKE2s, SHA-256, HMAC). The only construction written here is the spec's own glue: HKDF of
  §4.3 (``cryptography``'s HKDF has no BLAKE2s) and the state objects of §5.
- ``write_message`` / ``read_message`` follow §5.3 token by token; the psk modifier (§9) adds
  ``MixKey(e)`` after every ``e`` token and ``MixKeyAndHash(psk)`` for the ``psk`` token.
- ``read_message`` is all-or-nothing: a message that fails (short, low-order key, bad tag)
  returns ``None`` and leaves the state exactly as it was, so a forged message cannot spoil a
  handshake that a genuine message will later complete.
- Using the API out of turn (writing when it is the peer's turn, reading after the end) is a
  programming error and raises ``RuntimeError``; bad input from the network never raises.
- The ephemeral key and the prologue are injectable, which is what the test vectors need.
- ``premix_psk`` processes a message's leading ``psk`` token ahead of time (it depends on
  nothing in the message) and ``clone`` copies a state, so that a tunnel keeps one premixed
  template per role and starts every handshake from a copy (no psk mixing per message). The
  bytes on the wire are the same as without the template.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

HASHLEN = 32  # BLAKE2s and SHA-256 (§12.8, §12.9)
DHLEN = 32  # Curve25519 (§12.1)
TAGLEN = 16
MAX_NONCE = 2**64 - 1  # §5.1: reserved, never used to encrypt

HASHES: dict[str, Callable[..., Any]] = {"BLAKE2s": hashlib.blake2s, "SHA256": hashlib.sha256}
# §7: message patterns as token tuples, initiator first.
PATTERNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "NN": (("e",), ("e", "ee")),
    "NNpsk0": (("psk", "e"), ("e", "ee")),
}


def build_nonce(n: int) -> bytes:
    """§12.3 ChaChaPoly: 32 bits of zeros followed by the 64-bit little-endian counter."""
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


def hkdf(
    hash_fn: Callable[..., Any], chaining_key: bytes, ikm: bytes, num_outputs: int
) -> tuple[bytes, ...]:
    """§4.3 HKDF: HMAC-HASH extract, then 2 or 3 chained expand blocks."""
    temp_key = hmac.new(chaining_key, ikm, hash_fn).digest()
    out1 = hmac.new(temp_key, b"\x01", hash_fn).digest()
    out2 = hmac.new(temp_key, out1 + b"\x02", hash_fn).digest()
    if num_outputs == 2:
        return out1, out2
    return out1, out2, hmac.new(temp_key, out2 + b"\x03", hash_fn).digest()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key (``public_bytes_raw``: not the ``serialization`` package,
    which loads every key type's module into each proxy)."""
    return key.public_key().public_bytes_raw()


class CipherState:
    """§5.1: a key (or none) and a 64-bit nonce counter."""

    __slots__ = ("aead", "key", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self.aead: ChaCha20Poly1305 | None = None if key is None else ChaCha20Poly1305(key)
        self.key = key  # the raw key too: the compiled data path (core/fastpath.py) takes it
        self.n = 0

    def initialize_key(self, key: bytes) -> None:
        self.aead = ChaCha20Poly1305(key)
        self.key = key
        self.n = 0

    def has_key(self) -> bool:
        return self.aead is not None

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise RuntimeError("Noise nonce exhausted")
        out = self.aead.encrypt(build_nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes | None:
        """Plaintext, or ``None`` if the tag does not verify (the nonce is then not consumed)."""
        if self.aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            return None
        try:
            out = self.aead.decrypt(build_nonce(self.n), ciphertext, ad)
        except InvalidTag:
            return None
        self.n += 1
        return out


class SymmetricState:
    """§5.2: chaining key ``ck``, handshake hash ``h`` and the current CipherState."""

    __slots__ = ("hash_fn", "ck", "h", "cipher")

    def __init__(self, protocol_name: bytes, hash_fn: Callable[..., Any]) -> None:
        self.hash_fn = hash_fn
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = hash_fn(protocol_name).digest()
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.hash_fn, self.ck, ikm, 2)
        self.cipher.initialize_key(temp_k[:32])

    def mix_hash(self, data: bytes) -> None:
        self.h = self.hash_fn(self.h + data).digest()

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = hkdf(self.hash_fn, self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher.initialize_key(temp_k[:32])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes | None:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        if plaintext is not None:
            self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = hkdf(self.hash_fn, self.ck, b"", 2)
        return CipherState(temp_k1[:32]), CipherState(temp_k2[:32])


def parse_protocol_name(name: str) -> tuple[str, Callable[..., Any]]:
    """``Noise_<pattern>_25519_ChaChaPoly_<hash>`` -> (pattern, hash function)."""
    parts = name.split("_")
    if (
        len(parts) != 5
        or parts[0] != "Noise"
        or parts[1] not in PATTERNS
        or parts[2:4] != ["25519", "ChaChaPoly"]
        or parts[4] not in HASHES
    ):
        raise ValueError(f"unsupported Noise protocol {name!r}")
    return parts[1], HASHES[parts[4]]


class HandshakeState:
    """§5.3 for the NN family: no static keys, so no pre-messages and no s/es/se/ss tokens."""

    __slots__ = (
        "initiator",
        "psk",
        "e",
        "re",
        "ss",
        "_patterns",
        "_turn",
        "_skip",
        "_keygen",
        "result",
    )

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        prologue: bytes = b"",
        psk: bytes | None = None,
        ephemeral: X25519PrivateKey | None = None,
        keygen: Callable[[], X25519PrivateKey] = X25519PrivateKey.generate,
    ) -> None:
        pattern, hash_fn = parse_protocol_name(protocol_name)
        self._patterns = PATTERNS[pattern]
        uses_psk = any("psk" in tokens for tokens in self._patterns)
        if uses_psk != (psk is not None) or (psk is not None and len(psk) != 32):
            raise ValueError("a psk pattern needs a 32-byte psk, other patterns none")
        self.initiator = initiator
        self.psk = psk
        self.e = ephemeral
        self.re: bytes | None = None
        self.ss = SymmetricState(protocol_name.encode("ascii"), hash_fn)
        self.ss.mix_hash(prologue)
        self._turn = 0
        self._skip = 0  # tokens of the current message already processed (premix_psk)
        self._keygen = keygen
        self.result: tuple[CipherState, CipherState] | None = None

    def premix_psk(self) -> None:
        """Process the current message's leading ``psk`` token now (§9: ``MixKeyAndHash(psk)``
        needs nothing from the message). No-op if the message does not start with one."""
        tokens = self._patterns[self._turn] if self._turn < len(self._patterns) else ()
        if self._skip == 0 and tokens and tokens[0] == "psk":
            self.ss.mix_key_and_hash(self.psk or b"")
            self._skip = 1

    def clone(self) -> HandshakeState:
        """An independent copy (keys are immutable bytes; a ChaCha20Poly1305 is stateless)."""
        new = object.__new__(HandshakeState)
        new.initiator, new.psk, new.e, new.re = self.initiator, self.psk, self.e, self.re
        new._patterns, new._turn, new._skip = self._patterns, self._turn, self._skip
        new._keygen, new.result = self._keygen, self.result
        ss = object.__new__(SymmetricState)
        ss.hash_fn, ss.ck, ss.h = self.ss.hash_fn, self.ss.ck, self.ss.h
        ss.cipher = CipherState()
        ss.cipher.aead, ss.cipher.n = self.ss.cipher.aead, self.ss.cipher.n
        new.ss = ss
        return new

    @property
    def handshake_hash(self) -> bytes:
        return self.ss.h

    @property
    def finished(self) -> bool:
        return self.result is not None

    def _my_turn(self) -> bool:
        return (self._turn % 2 == 0) == self.initiator

    def _advance(self) -> None:
        self._turn += 1
        self._skip = 0
        if self._turn == len(self._patterns):
            self.result = self.ss.split()

    def write_message(self, payload: bytes) -> bytes:
        """The next message; ``ValueError`` if the peer's ephemeral gives no shared secret."""
        if self.finished or not self._my_turn():
            raise RuntimeError("write_message out of turn")
        out: list[bytes] = []
        for token in self._patterns[self._turn][self._skip :]:
            if token == "e":
                if self.e is None:
                    self.e = self._keygen()
                pub = public_bytes(self.e)
                out.append(pub)
                self._mix_e(pub)
            elif token == "ee":
                if not self._mix_ee():
                    raise ValueError("peer's ephemeral key is a low-order point")
            else:  # "psk"
                self.ss.mix_key_and_hash(self.psk or b"")
        out.append(self.ss.encrypt_and_hash(payload))
        self._advance()
        return b"".join(out)

    def read_message(self, message: bytes | memoryview) -> bytes | None:
        """The payload, or ``None`` (state untouched) if the message does not authenticate."""
        if self.finished or self._my_turn():
            raise RuntimeError("read_message out of turn")
        saved = (self.ss.ck, self.ss.h, self.ss.cipher.aead, self.ss.cipher.n, self.re)
        payload = self._read_tokens(bytes(message))
        if payload is None:
            self.ss.ck, self.ss.h, self.ss.cipher.aead, self.ss.cipher.n, self.re = saved
            return None
        self._advance()
        return payload

    def _read_tokens(self, message: bytes) -> bytes | None:
        pos = 0
        for token in self._patterns[self._turn][self._skip :]:
            if token == "e":
                if len(message) < pos + DHLEN:
                    return None
                self.re = message[pos : pos + DHLEN]
                pos += DHLEN
                self._mix_e(self.re)
            elif token == "ee":
                if not self._mix_ee():
                    return None
            else:  # "psk"
                self.ss.mix_key_and_hash(self.psk or b"")
        if len(message) - pos < (TAGLEN if self.ss.cipher.has_key() else 0):
            return None
        return self.ss.decrypt_and_hash(message[pos:])

    def _mix_e(self, pub: bytes) -> None:
        self.ss.mix_hash(pub)
        if self.psk is not None:  # §9.2: with a psk, e also keys the cipher
            self.ss.mix_key(pub)

    def _mix_ee(self) -> bool:
        if self.e is None or self.re is None:
            raise RuntimeError("ee before both ephemerals are known")
        try:
            shared = self.e.exchange(X25519PublicKey.from_public_bytes(self.re))
        except ValueError:  # a low-order point gives the all-zero secret: refuse it
            return False
        self.ss.mix_key(shared)
        return True
