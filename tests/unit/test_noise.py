"""Noise (rev 34) against the published cacophony vectors, and its failure behaviour."""

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.core.noise import (
    HASHES,
    HandshakeState,
    SymmetricState,
    build_nonce,
    hkdf,
    public_bytes,
)

# Vendored with its provenance in tests/unit/data/noise/README.md; found beside this file.
VECTORS = Path(__file__).parent / "data" / "noise" / "noise-cacophony.json"
SUPPORTED = [
    "Noise_NN_25519_ChaChaPoly_BLAKE2s",
    "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s",
    "Noise_NNpsk0_25519_ChaChaPoly_SHA256",
]
PSK = bytes(range(32))


def _vector(name):
    for v in json.loads(VECTORS.read_text())["vectors"]:
        if v["protocol_name"] == name:
            return v
    raise LookupError(name)


def _pair(v):
    def side(prefix, initiator):
        psks = v.get(prefix + "_psks")
        return HandshakeState(
            v["protocol_name"],
            initiator,
            bytes.fromhex(v[prefix + "_prologue"]),
            psk=bytes.fromhex(psks[0]) if psks else None,
            ephemeral=X25519PrivateKey.from_private_bytes(bytes.fromhex(v[prefix + "_ephemeral"])),
        )

    return side("init", True), side("resp", False)


@pytest.mark.parametrize("name", SUPPORTED)
def test_cacophony_vector(name):
    v = _vector(name)
    init, resp = _pair(v)
    messages = [
        (bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])) for m in v["messages"]
    ]
    for turn, (payload, expected) in enumerate(messages[:2]):
        writer, reader = (init, resp) if turn % 2 == 0 else (resp, init)
        assert writer.write_message(payload) == expected
        assert reader.read_message(expected) == payload
    assert init.finished and resp.finished
    assert init.handshake_hash.hex() == resp.handshake_hash.hex() == v["handshake_hash"]
    # After Split, transport messages alternate initiator -> responder -> initiator ...
    (i_send, i_recv), (r_recv, r_send) = init.result, resp.result
    for turn, (payload, expected) in enumerate(messages[2:]):
        sender, receiver = (i_send, r_recv) if turn % 2 == 0 else (r_send, i_recv)
        assert sender.encrypt_with_ad(b"", payload) == expected
        assert receiver.decrypt_with_ad(b"", expected) == payload


def test_the_vector_file_has_the_tunnel_protocol():
    assert _vector("Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s")["messages"]


def test_unsupported_patterns_are_refused():
    with pytest.raises(ValueError):
        HandshakeState("Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s", True)
    with pytest.raises(ValueError):  # psk pattern without a psk
        HandshakeState("Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s", True)


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=100))
def test_hkdf_is_rfc5869_with_empty_info(ck, ikm):
    """§4.3's HKDF equals RFC 5869 extract+expand (salt=ck, info="") - checked with SHA-256,
    where an independent implementation exists in `cryptography`."""
    reference = HKDF(hashes.SHA256(), length=96, salt=ck, info=b"").derive(ikm)
    out = hkdf(HASHES["SHA256"], ck, ikm, 3)
    assert b"".join(out) == reference
    assert hkdf(HASHES["SHA256"], ck, ikm, 2) == out[:2]


def test_nonce_is_four_zero_bytes_and_a_little_endian_counter():
    assert build_nonce(0x0102030405060708) == bytes.fromhex("000000000807060504030201")


def _fresh_pair(psk=PSK):
    name = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"
    return HandshakeState(name, True, b"p", psk=psk), HandshakeState(name, False, b"p", psk=psk)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_bit_flip_fails_and_leaves_the_state_usable(data):
    init, resp = _fresh_pair()
    msg1 = init.write_message(b"hello")
    bit = data.draw(st.integers(0, len(msg1) * 8 - 1))
    forged = bytearray(msg1)
    forged[bit // 8] ^= 1 << (bit % 8)
    assert resp.read_message(bytes(forged)) is None
    assert resp.read_message(msg1) == b"hello"  # a forgery does not spoil the real message
    msg2 = resp.write_message(b"world")
    bit = data.draw(st.integers(0, len(msg2) * 8 - 1))
    forged = bytearray(msg2)
    forged[bit // 8] ^= 1 << (bit % 8)
    assert init.read_message(bytes(forged)) is None
    assert init.read_message(msg2) == b"world"
    assert init.handshake_hash == resp.handshake_hash


def test_wrong_psk_fails_at_the_first_message():
    init, _ = _fresh_pair()
    _, other = _fresh_pair(psk=bytes(31) + b"\x01")
    assert other.read_message(init.write_message(b"")) is None


@pytest.mark.parametrize("cut", [0, 31, 32, 47])
def test_short_messages_fail(cut):
    init, resp = _fresh_pair()
    assert resp.read_message(init.write_message(b"")[:cut]) is None


def _initiation_with_ephemeral(pub: bytes, payload: bytes) -> bytes:
    """Message 1 as an initiator holding the psk would write it with any 32-byte ``e``."""
    ss = SymmetricState(b"Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s", HASHES["BLAKE2s"])
    ss.mix_hash(b"p")
    ss.mix_key_and_hash(PSK)
    ss.mix_hash(pub)
    ss.mix_key(pub)
    return pub + ss.encrypt_and_hash(payload)


def test_hand_built_initiation_matches_the_state_machine():
    init, resp = _fresh_pair()
    msg1 = init.write_message(b"abc")
    assert _initiation_with_ephemeral(msg1[:32], b"abc") == msg1
    assert resp.read_message(msg1) == b"abc"


def test_low_order_ephemeral_is_refused_both_ways():
    zero_e = bytes(32)
    # A responder reads an initiation carrying a low-order key (no DH yet) but cannot answer.
    _, resp = _fresh_pair()
    assert resp.read_message(_initiation_with_ephemeral(zero_e, b"")) == b""
    with pytest.raises(ValueError):
        resp.write_message(b"")
    # An initiator refuses a response carrying one, and its state stays intact.
    init, resp = _fresh_pair()
    resp.read_message(init.write_message(b""))
    msg2 = resp.write_message(b"")
    assert init.read_message(zero_e + msg2[32:]) is None
    assert init.read_message(msg2) == b""


def test_out_of_turn_use_is_a_programming_error():
    init, resp = _fresh_pair()
    with pytest.raises(RuntimeError):
        resp.write_message(b"")
    with pytest.raises(RuntimeError):
        init.read_message(b"")
    msg1 = init.write_message(b"")
    resp.read_message(msg1)
    init.read_message(resp.write_message(b""))
    with pytest.raises(RuntimeError):
        init.write_message(b"")


def test_every_handshake_gets_fresh_keys():
    keys = set()
    for _ in range(3):
        init, resp = _fresh_pair()
        resp.read_message(init.write_message(b""))
        init.read_message(resp.write_message(b""))
        send = init.result[0].encrypt_with_ad(b"", b"x")
        assert resp.result[0].decrypt_with_ad(b"", send) == b"x"
        keys.add(public_bytes(init.e))
        keys.add(send)
    assert len(keys) == 6
