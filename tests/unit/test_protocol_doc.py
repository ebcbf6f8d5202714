"""docs/PROTOCOL.md against the code: every worked example of its §15 and every number in the
tables of its §3 and §10 is parsed out of the document and recomputed here, so the document
cannot silently go stale. A value added to those blocks or tables without a check here fails
too (``test_every_example_value_is_checked``)."""

from __future__ import annotations

import ast
import base64
import hashlib
import inspect
import ipaddress
import json
import operator
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

import tencrypt.core
from tencrypt import control, daemon
from tencrypt.core import gate, handshake, podconfig, psk, replay, wire
from tencrypt.core.handshake import HandshakeLimiter
from tencrypt.core.identity import ClaimPolicy
from tencrypt.core.keyring import KeyMismatches
from tencrypt.core.noise import HandshakeState, SymmetricState, public_bytes
from tencrypt.core.peer import Limits
from tencrypt.core.session import Tunnel
from tencrypt.core.stats import Stats

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text()
VECTORS = Path(__file__).parent / "data" / "noise" / "noise-cacophony.json"


# ---- reading the document -----------------------------------------------------------------


def section(number: int) -> str:
    """The text of ``## <number>. ...`` up to the next level-2 heading."""
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", DOC, re.M | re.S)
    assert match, f"PROTOCOL.md has no section {number}"
    return match.group(0)


def examples() -> dict[str, str]:
    """``name = value`` lines of the fenced blocks of §15; an indented line of hex continues
    the value above it."""
    values: dict[str, str] = {}
    last = None
    for block in re.findall(r"^```text\n(.*?)^```", section(15), re.M | re.S):
        for line in block.splitlines():
            cont = re.fullmatch(r"\s+([0-9a-f]+)\s*", line)
            if cont and last is not None:
                values[last] += cont.group(1)
                continue
            m = re.fullmatch(r"([A-Za-z0-9_.]+)\s*=\s*(\S+)\s*", line)
            assert m, f"unparsable example line: {line!r}"
            assert m.group(1) not in values, f"example {m.group(1)} given twice"
            last = m.group(1)
            values[last] = m.group(2)
    return values


def table_rows(text: str) -> list[list[str]]:
    """Rows of the markdown tables in ``text`` whose first cell is a `code` name."""
    rows = []
    for line in text.splitlines():
        if re.match(r"\| `[A-Za-z_][\w.]*` \|", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


_OPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Pow: operator.pow,
}


def number(cell: str) -> float:
    """``120 s``, ``2^60``, ``2^64 - 2^13 - 1``, ``86400 s``: the leading arithmetic."""
    m = re.match(r"[0-9][0-9^ +\-−*.]*", cell)
    assert m, f"no number in {cell!r}"
    expr = m.group(0).replace("^", "**").replace("−", "-").strip()

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise AssertionError(f"not plain arithmetic: {cell!r}")

    return ev(ast.parse(expr, mode="eval").body)


CODE: dict[str, Callable[[], object]] = {
    "core.TUNNEL_PORT": lambda: tencrypt.core.TUNNEL_PORT,
    "HandshakeLimiter.max_sources": lambda: (
        inspect.signature(HandshakeLimiter).parameters["max_sources"].default
    ),
    "KeyMismatches.limit": lambda: KeyMismatches().limit,
}
MODULES = {
    "wire": wire,
    "podconfig": podconfig,
    "replay": replay,
    "gate": gate,
    "psk": psk,
    "daemon": daemon,
    "control": control,
}


def code_value(name: str) -> object:
    if name in CODE:
        return CODE[name]()
    head, attr = name.split(".", 1)
    if head == "Limits":
        return getattr(Limits(), attr)
    assert head in MODULES, f"the test does not know where {name} lives"
    return getattr(MODULES[head], attr)


# ---- the tables -----------------------------------------------------------------------------


def test_constants_and_limits_tables_match_the_code():
    rows = table_rows(section(3)) + table_rows(section(10))
    assert len(rows) > 30
    for name, value, *_ in rows:
        name = name.strip("`")
        actual = code_value(name)
        if value.startswith("`"):  # a string constant: exact bytes, and its stated length
            text = value.strip("`")
            assert actual in (text, text.encode("ascii")), name
            assert int(_[0]) == len(text), f"{name}: length"
        else:
            assert isinstance(actual, int | float)
            assert number(value) == actual, f"{name}: the document says {value}, code {actual}"


def test_every_limit_is_in_the_table():
    named = {row[0].strip("`") for row in table_rows(section(10))}
    fields = {f"Limits.{f}" for f in Limits.__dataclass_fields__}
    assert fields <= named, f"Limits missing from PROTOCOL.md §10: {sorted(fields - named)}"


# ---- the worked examples --------------------------------------------------------------------


EX = examples()


def hexval(name: str) -> bytes:
    return bytes.fromhex(EX[name])


def intval(name: str) -> int:
    return int(EX[name], 0)


def ip(name: str) -> bytes:
    return ipaddress.ip_address(EX[name]).packed


def ips(who: str) -> wire.PodIPs:
    """The example's addresses of ``who`` (initiator, responder): IPv4 and IPv6."""
    return wire.PodIPs(ip(f"{who}_pod_ip"), ip(f"{who}_pod_ip6"))


PSK = hexval("psk")
IE, RE = hexval("initiator_ephemeral_private"), hexval("responder_ephemeral_private")
I_INDEX, R_INDEX = intval("initiator_sender_index"), intval("responder_sender_index")
UNIX_NS = intval("initiator_unix_ns")


def templates(private: bytes) -> handshake.Templates:
    return handshake.Templates(PSK, lambda: X25519PrivateKey.from_private_bytes(private))


def run_handshake() -> dict[str, bytes]:
    """The example's handshake through the code, both sides."""
    i_state, initiation = handshake.build_initiation(
        templates(IE), I_INDEX, UNIX_NS, ips("initiator")
    )
    r_templates = templates(RE)
    got = handshake.read_initiation(r_templates, initiation)
    assert got is not None
    assert (got.sender_index, got.unix_ns, got.pod_ips) == (I_INDEX, UNIX_NS, ips("initiator"))
    reply = handshake.build_response(got, R_INDEX, ips("responder"), r_templates.mac_key)
    assert reply is not None
    response, r_keys = reply
    parsed = wire.parse_response(response)
    assert parsed is not None and parsed[0] == I_INDEX
    opened = handshake.read_response(i_state, parsed[1])
    assert opened is not None
    assert opened[:2] == (R_INDEX, ips("responder"))
    i_keys = opened[2]
    assert i_keys.send_key == r_keys.recv_key and i_keys.recv_key == r_keys.send_key
    assert i_state.handshake_hash == got.state.handshake_hash
    assert i_keys.send_key is not None and i_keys.recv_key is not None
    return {
        "initiation": initiation,
        "response": response,
        "handshake_hash": i_state.handshake_hash,
        "k_i2r": i_keys.send_key,
        "k_r2i": i_keys.recv_key,
    }


HS = run_handshake()
MAC_KEY = wire.derive_mac_key(PSK)


def _ping_is_a_valid_packet() -> bytes:
    ping = hexval("ping")
    header = ping[:20]
    words = sum(struct.unpack("!10H", header))
    while words >> 16:
        words = (words & 0xFFFF) + (words >> 16)
    assert words == 0xFFFF, "ping: bad IPv4 header checksum"
    assert (ping[2] << 8 | ping[3]) == len(ping) and ping[0] == 0x45
    assert ping[12:16] == ip("responder_pod_ip") and ping[16:20] == ip("initiator_pod_ip")
    return ping


CHECKS: dict[str, Callable[[], object]] = {
    # inputs: checked for form (and against the cacophony vector below)
    "psk": lambda: PSK.hex(),
    "initiator_ephemeral_private": lambda: IE.hex(),
    "responder_ephemeral_private": lambda: RE.hex(),
    "initiator_sender_index": lambda: EX["initiator_sender_index"],
    "responder_sender_index": lambda: EX["responder_sender_index"],
    "initiator_unix_ns": lambda: EX["initiator_unix_ns"],
    "initiator_pod_ip": lambda: EX["initiator_pod_ip"],
    "initiator_pod_ip6": lambda: str(ipaddress.IPv6Address(EX["initiator_pod_ip6"])),
    "responder_pod_ip": lambda: EX["responder_pod_ip"],
    "responder_pod_ip6": lambda: str(ipaddress.IPv6Address(EX["responder_pod_ip6"])),
    "ping": lambda: _ping_is_a_valid_packet().hex(),
    # §15.1
    "psk_base64": lambda: base64.b64encode(PSK).decode("ascii"),
    "fingerprint": lambda: psk.fingerprint(PSK),
    "fingerprint_of_base64_text_wrong": lambda: psk.fingerprint(EX["psk_base64"].encode()),
    "mac_key": lambda: MAC_KEY.hex(),
    # §15.3
    "noise_h0": lambda: SymmetricState(wire.NOISE_PROTOCOL.encode(), hashlib.blake2s).h.hex(),
    "noise_h_after_prologue": lambda: HandshakeState(
        wire.NOISE_PROTOCOL, True, wire.PROLOGUE, psk=PSK
    ).handshake_hash.hex(),
    "initiator_ephemeral_public": lambda: public_bytes(
        X25519PrivateKey.from_private_bytes(IE)
    ).hex(),
    "responder_ephemeral_public": lambda: public_bytes(
        X25519PrivateKey.from_private_bytes(RE)
    ).hex(),
    "handshake_hash": lambda: HS["handshake_hash"].hex(),
    "key_initiator_to_responder": lambda: HS["k_i2r"].hex(),
    "key_responder_to_initiator": lambda: HS["k_r2i"].hex(),
    # §15.4
    "timestamp": lambda: wire.build_tai64n(UNIX_NS).hex(),
    "initiation_payload": lambda: wire.build_initiation_payload(
        I_INDEX, UNIX_NS, ips("initiator")
    ).hex(),
    "initiation": lambda: HS["initiation"].hex(),
    "initiation.type": lambda: HS["initiation"][0:4].hex(),
    "initiation.ephemeral": lambda: HS["initiation"][4:36].hex(),
    "initiation.encrypted_payload": lambda: HS["initiation"][36:88].hex(),
    "initiation.mac1": lambda: HS["initiation"][88:104].hex(),
    # §15.5
    "response_payload": lambda: wire.build_response_payload(R_INDEX, ips("responder")).hex(),
    "response": lambda: HS["response"].hex(),
    "response.type": lambda: HS["response"][0:4].hex(),
    "response.receiver_index": lambda: HS["response"][4:8].hex(),
    "response.ephemeral": lambda: HS["response"][8:40].hex(),
    "response.encrypted_payload": lambda: HS["response"][40:80].hex(),
    "response.mac1": lambda: HS["response"][80:96].hex(),
    # §15.6
    "keepalive": lambda: wire.seal(ChaCha20Poly1305(HS["k_i2r"]), R_INDEX, 0, b"").hex(),
    "data": lambda: wire.seal(
        ChaCha20Poly1305(HS["k_r2i"]), I_INDEX, 0, _ping_is_a_valid_packet()
    ).hex(),
}


def test_every_example_value_is_checked():
    assert set(EX) == set(CHECKS), (
        f"in PROTOCOL.md but not checked: {sorted(set(EX) - set(CHECKS))}; "
        f"checked but not in PROTOCOL.md: {sorted(set(CHECKS) - set(EX))}"
    )


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_worked_example(name):
    assert EX[name] == CHECKS[name](), f"PROTOCOL.md §15: {name} is stale"


def test_formulas_as_the_document_states_them():
    """§4.3, §4.4, §7.1, §7.2, §9.2 written out with hashlib and the AEAD alone."""
    assert (
        EX["fingerprint"] == hashlib.blake2s(b"tencrypt key fingerprint v1" + PSK).hexdigest()[:8]
    )
    assert hashlib.blake2s(b"tencrypt mac1 v3" + PSK).digest() == MAC_KEY
    assert hexval("noise_h0") == hashlib.blake2s(b"Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s").digest()
    assert (
        hexval("noise_h_after_prologue")
        == hashlib.blake2s(hexval("noise_h0") + b"tencrypt v3 NNpsk0").digest()
    )
    for message, n in (("initiation", 88), ("response", 80)):
        body = hexval(message)
        assert body[n:] == hashlib.blake2s(body[:n], key=MAC_KEY, digest_size=16).digest()
    data = hexval("data")
    nonce = b"\x00" * 4 + data[8:16]
    plain = ChaCha20Poly1305(hexval("key_responder_to_initiator")).decrypt(
        nonce, data[16:], data[:16]
    )
    assert plain == hexval("ping") and len(hexval("keepalive")) == wire.DATA_OVERHEAD


def test_example_keys_are_the_cacophony_vector():
    """§15: the psk and ephemeral keys are those of the NNpsk0/BLAKE2s vector, whose two
    handshake messages begin with the ephemeral public keys of §15.3."""
    vectors = json.loads(VECTORS.read_text())["vectors"]
    (v,) = [v for v in vectors if v["protocol_name"] == wire.NOISE_PROTOCOL]
    assert v["init_psks"] == [EX["psk"]] and v["resp_psks"] == [EX["psk"]]
    assert v["init_ephemeral"] == EX["initiator_ephemeral_private"]
    assert v["resp_ephemeral"] == EX["responder_ephemeral_private"]
    assert v["messages"][0]["ciphertext"][:64] == EX["initiator_ephemeral_public"]
    assert v["messages"][1]["ciphertext"][:64] == EX["responder_ephemeral_public"]


def test_the_example_through_a_responding_tunnel():
    """§15.5-15.6 and §9.5 with the state machine itself: a responder answers the example's
    initiation with the example's response; before the initiator's keepalive it does not use
    the session (it starts its own handshake, to port 1337); after it, its ping is ``data``."""
    responder, initiator = EX["responder_pod_ip"], EX["initiator_pod_ip"]
    responder6 = EX["responder_pod_ip6"]
    pods = {initiator: EX["initiator_pod_ip6"]}
    policy = ClaimPolicy(
        ("10.128.0.0/14", "fd00:10:128::/48"),
        "172.30.0.0/16",
        responder,
        frozenset({responder6}),
        paired=lambda a, b: pods.get(a) == b,
    )

    def tunnel() -> Tunnel:
        indexes = iter((R_INDEX, R_INDEX + 1))  # the response's, then its own initiation's
        return Tunnel(
            PSK,
            responder,
            Stats(),
            rng=lambda n: next(indexes).to_bytes(n, "little"),
            keygen=lambda: X25519PrivateKey.from_private_bytes(RE),
            identity=policy,
            secondary_ip=responder6,
        )

    wall = UNIX_NS / 1e9 + 0.5
    t = tunnel()
    t.receive(hexval("initiation"), (initiator, 40000), 1.0, wall)
    assert t.pop_transmits() == [(hexval("response"), (initiator, 40000))]
    t.receive(hexval("keepalive"), (initiator, 1337), 1.1, wall)
    t.send(initiator, hexval("ping"), 1.2, wall)
    assert t.pop_transmits() == [(hexval("data"), (initiator, 1337))]
    assert t.knows(EX["initiator_pod_ip6"])  # the paired IPv6 address: the same peer

    early = tunnel()
    early.receive(hexval("initiation"), (initiator, 40000), 1.0, wall)
    early.pop_transmits()
    early.send(initiator, hexval("ping"), 1.05, wall)
    ((initiation, to),) = early.pop_transmits()
    assert wire.message_type(initiation) == wire.TYPE_INITIATION and to == (initiator, 1337)


def test_the_code_points_here():
    assert "docs/PROTOCOL.md" in (wire.__doc__ or "")
    assert "docs/PROTOCOL.md" in (ROOT / "README.md").read_text()
