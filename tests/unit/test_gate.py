"""The gate before any DH (core/gate.py): mac1 first, version 1 refused, replays, future
timestamps, the per-source and global budgets, and tables that shrink again.

Work is asserted by counting calls through the primitives the Noise layer uses (X25519 key
generation, X25519 public-key loading for the DH, ChaCha20-Poly1305 construction and use,
HKDF), never by timing."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import struct
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tencrypt.core import handshake, noise, wire
from tencrypt.core.gate import Gate
from tencrypt.core.handshake import HandshakeBudget, InitiationStamps, SeenMacs, table_bound
from tencrypt.core.noise import HandshakeState
from tencrypt.core.peer import Limits
from tencrypt.core.stats import DropReason
from tests.unit.linked import FAST, PSK, TEMPLATES, A, B, Net, fast, ipv4, new_net


@dataclass
class Work:
    """Calls into the expensive primitives, counted."""

    calls: dict[str, int] = field(default_factory=dict)

    def count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def work(monkeypatch) -> Work:
    counted = Work()

    class CountingAEAD:
        def __init__(self, key: bytes) -> None:
            counted.count("aead_key")
            self._aead = ChaCha20Poly1305(key)

        def encrypt(self, *args):
            counted.count("aead_encrypt")
            return self._aead.encrypt(*args)

        def decrypt(self, *args):
            counted.count("aead_decrypt")
            return self._aead.decrypt(*args)

    real_load = noise.X25519PublicKey.from_public_bytes
    real_hkdf = noise.hkdf

    class CountingX25519:
        @staticmethod
        def from_public_bytes(data: bytes):
            counted.count("dh")
            return real_load(data)

    def counting_hkdf(*args):
        counted.count("hkdf")
        return real_hkdf(*args)

    monkeypatch.setattr(noise, "ChaCha20Poly1305", CountingAEAD)
    monkeypatch.setattr(noise, "X25519PublicKey", CountingX25519)
    monkeypatch.setattr(noise, "hkdf", counting_hkdf)
    return counted


def counting_keygen(work: Work):
    def keygen() -> X25519PrivateKey:
        work.count("keygen")
        return X25519PrivateKey.generate()

    return keygen


def initiation(claim: str, wall: float, index: int = 7) -> bytes:
    return handshake.build_initiation(
        TEMPLATES, index, int(wall * 1e9), ipaddress.IPv4Address(claim).packed
    )[1]


# ---- mac1 first --------------------------------------------------------------------------------


def test_keyless_initiations_cost_no_noise_work(work):
    net = Net()
    b = net.add(B, keygen=counting_keygen(work))
    genuine = initiation(A, net.wall)
    work.calls.clear()
    for i in range(300):
        forged = bytearray(os.urandom(wire.INITIATION_LEN))
        forged[:4] = b"\x01\x00\x00\x00"
        if i % 3 == 0:  # a genuine initiation with one bit changed
            forged = bytearray(genuine)
            forged[4 + i % (wire.INITIATION_LEN - 4)] ^= 1 << (i % 8)
        assert b.receive(bytes(forged), ("192.0.2.9", 1337), net.now, net.wall) is None
    assert b.stats.dropped(DropReason.BAD_MAC) == 300
    assert work.calls == {} and b.pop_transmits() == []
    # the control: a genuine initiation does run the Noise work, so the counters can count
    b.receive(genuine, (A, 1337), net.now, net.wall)
    assert work.calls["aead_decrypt"] == 1 and work.calls["dh"] == 1
    assert work.calls["keygen"] == 1 and b.stats.get("handshakes_responded") == 1


def test_keyless_responses_cost_no_noise_work(work):
    net = new_net()
    a = net.pods[A]
    net.send(A, B, ipv4(A, B))
    for d, s, dst in net.pump(hold=True):
        net.deliver(d, s, dst)
    ((response, src, dst),) = net.pump(hold=True)
    work.calls.clear()
    for i in range(200):  # the right receiver index, anything else forged
        forged = bytearray(response[:8] + os.urandom(wire.RESPONSE_LEN - 8))
        if i % 2:
            forged = bytearray(response)
            forged[8 + i % (wire.RESPONSE_LEN - 8)] ^= 0x40
        net.deliver(bytes(forged), src, dst)
    assert a.stats.dropped(DropReason.BAD_MAC) == 200 and work.calls == {}
    net.deliver(response, src, dst)
    assert a.stats.get("handshakes_completed") == 1 and work.calls["dh"] == 1


def test_the_gate_needs_one_template_per_key_not_per_message(work):
    gate = Gate(PSK, X25519PrivateKey.generate, FAST)
    message = initiation(A, 1_700_000_000.0)
    work.calls.clear()
    got = gate.initiation(message, A, 1.0, 1_700_000_000.0)
    assert isinstance(got, handshake.Initiation)
    # reading message 1 from the premixed template: MixKey(e) is the only HKDF, no psk mixing
    assert work.calls["hkdf"] == 1 and work.calls["aead_decrypt"] == 1


def test_premixed_template_writes_the_same_bytes_as_a_fresh_state():
    e = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    fresh = HandshakeState(wire.NOISE_PROTOCOL, True, wire.PROLOGUE, psk=PSK, ephemeral=e)
    template = HandshakeState(wire.NOISE_PROTOCOL, True, wire.PROLOGUE, psk=PSK, ephemeral=e)
    template.premix_psk()
    clone = template.clone()
    assert clone.write_message(b"payload") == fresh.write_message(b"payload")
    assert clone.handshake_hash == fresh.handshake_hash
    again = template.clone()  # the template itself was not advanced by its clone
    assert again.write_message(b"payload") == fresh_message(e)


def fresh_message(e: X25519PrivateKey) -> bytes:
    state = HandshakeState(wire.NOISE_PROTOCOL, True, wire.PROLOGUE, psk=PSK, ephemeral=e)
    return state.write_message(b"payload")


# ---- versions 1 and 2 --------------------------------------------------------------------------


def old_initiation(version: int, wall: float) -> bytes:
    """An initiation exactly as version 1 (prologue v1, no mac1) or version 2 (prologue v2,
    one IPv4 address, mac1 keyed with the v2 label) built it."""
    prologue = f"tencrypt v{version} NNpsk0".encode()
    state = HandshakeState(wire.NOISE_PROTOCOL, True, prologue, psk=PSK)
    stamp = wire.build_tai64n(int(wall * 1e9))
    payload = struct.pack("<I12s4s", 5, stamp, ipaddress.IPv4Address(A).packed)
    body = struct.pack("<I", 1) + state.write_message(payload)
    if version == 1:
        return body
    return (
        body
        + hashlib.blake2s(
            body, key=hashlib.blake2s(b"tencrypt mac1 v2" + PSK).digest(), digest_size=16
        ).digest()
    )


@pytest.mark.parametrize("version, sizes", [(1, (72, 64)), (2, (88, 80))])
def test_old_version_messages_are_refused_and_counted(work, version, sizes):
    net = Net()
    b = net.add(B)
    old = old_initiation(version, net.wall)
    work.calls.clear()
    assert len(old) == sizes[0]
    assert b.receive(old, (A, 1337), net.now, net.wall) is None
    old_response = struct.pack("<II", 2, 1) + bytes(sizes[1] - 8)
    assert b.receive(old_response, (A, 1337), net.now, net.wall) is None
    assert b.stats.dropped(DropReason.OLD_VERSION) == 2
    assert b.pop_transmits() == [] and work.calls == {}
    assert sum(b.stats.drops.values()) == 2  # nothing else counted, nothing answered


@pytest.mark.parametrize("version", [1, 2])
def test_version_3_never_completes_with_an_old_prologue(version):
    """Even with a valid v3 mac1 and the v3 length, an old-prologue Noise message does not
    authenticate."""
    net = Net()
    b = net.add(B)
    body = old_initiation(1, net.wall)
    if version == 2:
        state = HandshakeState(wire.NOISE_PROTOCOL, True, b"tencrypt v2 NNpsk0", psk=PSK)
        payload = wire.build_initiation_payload(5, int(net.wall * 1e9), wire.pod_ips(A))
        body = struct.pack("<I", 1) + state.write_message(payload)
    else:
        body += bytes(wire.INITIATION_LEN - wire.MAC_LEN - len(body))  # padded to v3's length
    b.receive(wire.add_mac(TEMPLATES.mac_key, body), (A, 1337), net.now, net.wall)
    assert b.stats.dropped(DropReason.BAD_HANDSHAKE) == 1 and b.pop_transmits() == []


def test_other_lengths_are_short_or_bad():
    net = Net()
    b = net.add(B)
    for n in (4, 40, 87, 103):
        b.receive(b"\x01\x00\x00\x00" + bytes(n - 4), (A, 1337), net.now, net.wall)
    b.receive(b"\x01\x00\x00\x00" + bytes(101), (A, 1337), net.now, net.wall)
    for n in (8, 79, 95):
        b.receive(b"\x02\x00\x00\x00" + bytes(n - 4), (A, 1337), net.now, net.wall)
    b.receive(b"\x02\x00\x00\x00" + bytes(93), (A, 1337), net.now, net.wall)
    assert b.stats.dropped(DropReason.SHORT) == 7
    assert b.stats.dropped(DropReason.BAD_HANDSHAKE) == 2
    assert b.stats.dropped(DropReason.OLD_VERSION) == 0


# ---- timestamps --------------------------------------------------------------------------------


def test_future_timestamps_are_refused_and_do_not_block_the_pod():
    net = Net(fast(initiation_max_skew=30.0))
    b = net.add(B)
    b.receive(initiation(A, net.wall + 3600), (A, 1337), net.now, net.wall)
    b.receive(initiation(A, net.wall + 31, index=8), (A, 1337), net.now, net.wall)
    assert b.stats.dropped(DropReason.FUTURE_HANDSHAKE) == 2 and b.pop_transmits() == []
    net.add(A)
    net.send(A, B, ipv4(A, B, b"not blocked"))  # A's real clock: accepted at once
    net.pump()
    assert net.delivered[B] == [ipv4(A, B, b"not blocked")]


def test_small_skew_is_accepted():
    net = Net(fast(initiation_max_skew=30.0))
    b = net.add(B)
    b.receive(initiation(A, net.wall + 29), (A, 1337), net.now, net.wall)
    assert b.stats.get("handshakes_responded") == 1


def test_stamp_and_replay_tables_are_pruned():
    stamps, seen = InitiationStamps(), SeenMacs()
    for i in range(1000):
        stamps.accept(struct.pack("!I", i), i * 10**9)
        assert not seen.seen(struct.pack("!I", i))
        assert seen.record(struct.pack("!I", i), i * 10**9)
    assert seen.seen(struct.pack("!I", 5))
    stamps.prune(1180 * 10**9, 180 * 10**9)
    seen.prune(1180 * 10**9, 180 * 10**9)
    assert len(stamps) == len(seen) == 0
    for i in (998, 999):
        stamps.accept(struct.pack("!I", i), i * 10**9)
        seen.record(struct.pack("!I", i), i * 10**9)
    stamps.prune(1000 * 10**9, 180 * 10**9)
    seen.prune(1000 * 10**9, 180 * 10**9)
    assert len(stamps) == len(seen) == 2


def test_a_replay_after_the_seen_table_was_pruned_is_still_stale():
    """Stage 6 holds on its own: once stage 3 forgot an initiation (pruned after max_age from
    when it was first seen), a copy of it is refused because its timestamp is not newer than
    the last one accepted from that pod IP - and so is a different initiation with the same
    timestamp, which stage 3 never knew."""
    limits = fast(initiation_max_age=30.0, initiation_max_skew=30.0)
    gate = Gate(PSK, X25519PrivateKey.generate, limits)
    wall = 1_700_000_000.0
    first = initiation(A, wall + 29)  # 29 s ahead: within the skew
    got = gate.initiation(first, A, 1.0, wall)
    assert isinstance(got, handshake.Initiation)
    gate.stamps.accept(got.pod_ips.ip4, got.unix_ns)  # handshaking.py does this after its DH
    later = wall + 40  # first seen 40 s ago: pruned from stage 3; its stamp is 11 s old
    gate.prune(41.0, later)
    assert len(gate.seen) == 0 and len(gate.stamps) == 1
    assert gate.initiation(first, A, 41.0, later) is DropReason.STALE_HANDSHAKE
    same_stamp = initiation(A, wall + 29, index=8)  # other bytes, the same timestamp
    assert gate.initiation(same_stamp, A, 41.0, later) is DropReason.STALE_HANDSHAKE
    newer = initiation(A, wall + 30, index=9)
    assert isinstance(gate.initiation(newer, A, 41.0, later), handshake.Initiation)


def test_gate_prunes_at_most_once_per_second():
    gate = Gate(PSK, X25519PrivateKey.generate, fast(initiation_max_age=30.0))
    wall = 1_700_000_000.0
    assert isinstance(gate.initiation(initiation(A, wall), A, 1.0, wall), handshake.Initiation)
    gate.prune(1.0, wall)
    gate.prune(1.5, wall + 100)  # within PRUNE_EVERY of the last prune: nothing happens
    assert len(gate.seen) == 1
    gate.prune(2.0, wall + 100)
    assert len(gate.seen) == 0


# ---- bounded before budgeted (issue 22, item 4) -------------------------------------------------


def test_nothing_is_recorded_before_the_budget_admits_it(work):
    """One key holder, one source, no spoofing, 2,000 valid-mac1 initiations: the replay table
    grows by what its bucket admits (3), not by what it sends; each refusal is counted."""
    net = Net(fast(handshake_rate=1.0, handshake_burst=3))
    b = net.add(B)
    gate = b._gate  # noqa: SLF001 - the table's size is what this test is about
    work.calls.clear()
    for i in range(2000):
        claim = f"10.7.{i // 250}.{i % 250 + 1}"
        b.receive(initiation(claim, net.wall, index=i + 1), ("192.0.2.7", 1337), net.now, net.wall)
    assert len(gate.seen) == 3 and len(gate.limiter) == 1
    assert b.stats.dropped(DropReason.HANDSHAKE_RATELIMIT) == 1997
    assert work.calls["aead_decrypt"] == 3


def test_replay_table_full_refuses_and_counts():
    """A wall clock that stands still (or steps back) stops the pruning by age; the budget,
    on the monotonic clock, keeps admitting: the size bound is what stops the table."""
    limits = fast(
        handshake_budget_rate=0.1,
        handshake_budget_burst=2,
        initiation_max_age=30.0,
        initiation_max_skew=10.0,
    )
    gate = Gate(PSK, X25519PrivateKey.generate, limits)
    assert gate.seen.max_entries == gate.stamps.max_entries // 2 == int(0.1 * 40) + 2 == 6
    wall = 1_700_000_000.0
    got = []
    for i in range(8):  # 20 s of monotonic time apart: the budget has a token each time
        now = 1.0 + 20.0 * i
        gate.prune(now, wall)
        got.append(
            gate.initiation(initiation(f"10.4.0.{i + 1}", wall, i + 1), "10.9.0.1", now, wall)
        )
    assert all(isinstance(g, handshake.Initiation) for g in got[:6])
    assert got[6:] == [DropReason.HANDSHAKE_TABLE_FULL] * 2
    assert len(gate.seen) == 6


def test_timestamp_table_full_refuses_new_pods_only():
    gate = Gate(PSK, X25519PrivateKey.generate, fast(handshake_budget_rate=1000.0))
    wall = 1_700_000_000.0
    bound = gate.stamps.max_entries
    for i in range(bound - 1):
        assert gate.stamps.accept(struct.pack("!I", i), int(wall * 1e9))
    assert gate.stamps.accept(ipaddress.IPv4Address(A).packed, int(wall * 1e9))
    assert not gate.stamps.accept(ipaddress.IPv4Address(B).packed, int(wall * 1e9))
    assert len(gate.stamps) == bound
    from_b = gate.initiation(initiation(B, wall + 1), B, 1.0, wall + 1)
    assert from_b is DropReason.HANDSHAKE_TABLE_FULL
    from_a = gate.initiation(initiation(A, wall + 1), A, 1.0, wall + 1)  # has an entry
    assert isinstance(from_a, handshake.Initiation)


def test_bucket_table_full_of_busy_sources_refuses_a_new_one_and_counts():
    net = Net(fast(handshake_rate=0.001, handshake_burst=1))
    b = net.add(B)
    gate = b._gate  # noqa: SLF001
    gate.limiter.max_sources = 3
    for i in range(4):  # each source spends its only token: every bucket stays busy
        pod = f"10.5.0.{i + 1}"
        b.receive(initiation(pod, net.wall, index=i + 1), (pod, 1337), net.now, net.wall)
    assert len(gate.limiter) == 3
    assert b.stats.dropped(DropReason.HANDSHAKE_SOURCES_FULL) == 1
    assert b.stats.dropped(DropReason.HANDSHAKE_RATELIMIT) == 0


def test_table_bound_is_what_the_budget_admits_while_an_entry_lives():
    limits = Limits()
    bound = table_bound(
        limits.handshake_budget_rate,
        limits.handshake_budget_burst,
        limits.initiation_max_age,
        limits.initiation_max_skew,
    )
    assert bound == 500 * (180 + 30) + 100
    gate = Gate(PSK, X25519PrivateKey.generate, limits)
    assert gate.seen.max_entries == bound
    assert gate.stamps.max_entries == 2 * bound  # a dual-stack claim records two addresses


def test_tunnel_tables_shrink_after_max_age():
    net = Net(fast(initiation_max_age=30.0, handshake_rate=1000.0))
    b = net.add(B)
    for i in range(50):
        pod = f"10.2.0.{i + 1}"
        b.receive(initiation(pod, net.wall, index=i + 1), (pod, 1337), net.now, net.wall)
    gate = b._gate  # noqa: SLF001 - the tables' sizes are what this test is about
    assert len(gate.stamps) == 50 and len(gate.seen) == 50
    net.advance(FAST.handshake_give_up + 31.0)
    assert len(gate.stamps) == 0 and len(gate.seen) == 0 and len(gate.limiter) == 0


# ---- budgets -----------------------------------------------------------------------------------


def test_global_budget_bounds_handshakes_from_many_sources(work):
    net = Net(fast(handshake_budget_rate=5.0, handshake_budget_burst=5))
    b = net.add(B, keygen=counting_keygen(work))
    work.calls.clear()
    for i in range(40):  # forty key holders (or spoofed sources), one initiation each
        pod = f"10.3.0.{i + 1}"
        b.receive(initiation(pod, net.wall, index=i + 1), (pod, 1337), net.now, net.wall)
    assert b.stats.get("handshakes_responded") == 5 and work.calls["keygen"] == 5
    assert b.stats.dropped(DropReason.HANDSHAKE_BUDGET) == 35
    assert work.calls["aead_decrypt"] == 5  # refused ones did no Noise work either
    net.advance(1.0)  # five more tokens
    for i in range(40, 50):
        pod = f"10.3.0.{i + 1}"
        b.receive(initiation(pod, net.wall, index=i + 1), (pod, 1337), net.now, net.wall)
    assert b.stats.get("handshakes_responded") == 10


def test_budget_bucket():
    budget = HandshakeBudget(rate=10.0, burst=2)
    assert [budget.allow(0.0) for _ in range(3)] == [True, True, False]
    assert budget.allow(0.05) is False and budget.allow(0.1) is True
    assert [budget.allow(100.0) for _ in range(3)] == [True, True, False]  # burst caps savings


def test_replays_spend_no_tokens(work):
    net = Net(fast(handshake_rate=1.0, handshake_burst=1))
    b = net.add(B)
    genuine = initiation(A, net.wall)
    work.calls.clear()
    for i in range(100):  # a captured initiation replayed from many spoofed sources
        b.receive(genuine, (f"10.9.{i // 250}.{i % 250 + 1}", 1337), net.now, net.wall)
    assert b.stats.dropped(DropReason.HANDSHAKE_REPLAY) == 99
    assert work.calls["aead_decrypt"] == 1 and len(b._gate.limiter) == 1  # noqa: SLF001


def test_an_initiation_from_a_new_peer_when_every_peer_is_busy_is_counted_as_such():
    """The peer table (max_peers) on the responder's side: its own drop reason, not the
    per-source rate limit's."""
    net = Net(fast(max_peers=2))
    b = net.add(B)
    for i in range(3):
        pod = f"10.6.0.{i + 1}"
        b.receive(initiation(pod, net.wall, index=i + 1), (pod, 1337), net.now, net.wall)
    assert b.peer_count() == 2 and b.stats.get("handshakes_responded") == 2
    assert b.stats.dropped(DropReason.PEERS_FULL) == 1
    assert b.stats.dropped(DropReason.HANDSHAKE_RATELIMIT) == 0
