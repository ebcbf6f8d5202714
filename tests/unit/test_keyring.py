"""Key rotation in the tunnel (core/keyring.py, handshaking.py rule 10): two and three cores
linked in memory, with rings in every phase of a rotation.

    phase P0: current K1            P1: current K1, next K2
    phase P2: current K2, prev K1   P3: current K2

An initiation succeeds exactly when the initiator's current key is in the responder's ring;
sessions made before a ring change keep working until their re-key, which uses the new
current key; a wrong key costs no Noise work."""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tencrypt.core import handshake, wire
from tencrypt.core.keyring import RETIRED, KeyRing, describe_keys, render_key_metrics
from tencrypt.core.psk import KeySet, fingerprint
from tencrypt.core.stats import DropReason
from tests.unit.linked import FAST, A, B, C, Net, drops, ipv4
from tests.unit.test_gate import Work, counting_keygen, work  # noqa: F401 - the fixture

K1, K2, K3 = os.urandom(32), os.urandom(32), os.urandom(32)
PHASES = {
    "P0": KeySet(K1),
    "P1": KeySet(K1, next=K2),
    "P2": KeySet(K2, previous=K1),
    "P3": KeySet(K2),
    "other": KeySet(K3),
}


def ring(phase: str, reuse: KeyRing | None = None) -> KeyRing:
    return KeyRing.from_keys(PHASES[phase], X25519PrivateKey.generate, reuse)


def net_of(*phases: str, limits=FAST) -> Net:
    net = Net(limits)
    for ip, phase in zip((A, B, C), phases, strict=False):
        net.add(ip, keys=ring(phase))
    return net


def accepted(phase: str) -> set[bytes]:
    return {key for _, key in PHASES[phase].roles()}


def session_keys(net: Net, ip: str) -> set[str]:
    return {s.key for s in net.pods[ip].table.by_index.values() if s.recv_aead is not None}


# ---- which rings can talk --------------------------------------------------------------------


@pytest.mark.parametrize(("pa", "pb"), list(itertools.product(PHASES, repeat=2)))
def test_an_initiation_succeeds_exactly_when_the_responder_holds_the_initiators_key(pa, pb):
    net = net_of(pa, pb)
    a, b = net.pods[A], net.pods[B]
    net.send(A, B, ipv4(A, B, b"hello"))
    net.pump()
    if PHASES[pa].current in accepted(pb):
        assert net.delivered[B] == [ipv4(A, B, b"hello")]
        # the initiator's choice is its current key, and both sides name it
        fp = fingerprint(PHASES[pa].current)
        assert session_keys(net, A) == session_keys(net, B) == {fp}
        assert a.handshakes_by_key == b.handshakes_by_key == {fp: 1}
        assert drops(a) == drops(b) == 0
    else:
        assert net.delivered[B] == []
        assert b.stats.dropped(DropReason.BAD_MAC) == 1 and drops(b) == 1
        assert b.stats.get("handshakes_responded") == 0 and session_keys(net, B) == set()


@pytest.mark.parametrize(
    ("pa", "pb"),
    [("P0", "P1"), ("P1", "P2"), ("P2", "P3"), ("P1", "P0"), ("P2", "P1"), ("P3", "P2")],
)
def test_neighbouring_phases_handshake_both_ways(pa, pb):
    """The rotation's guarantee: pods one phase apart reach each other in either direction."""
    for first, second in ((A, B), (B, A)):
        net = net_of(pa, pb)
        net.send(first, second, ipv4(first, second, b"x"))
        net.pump()
        assert net.delivered[second] == [ipv4(first, second, b"x")]


def test_pods_two_phases_apart_share_no_key_and_are_refused_both_ways():
    net = net_of("P0", "P3")
    net.send(A, B, ipv4(A, B))
    net.send(B, A, ipv4(B, A))
    net.advance(FAST.handshake_give_up + 1)
    assert net.delivered[A] == net.delivered[B] == []
    for ip in (A, B):
        t = net.pods[ip]
        assert t.stats.dropped(DropReason.BAD_MAC) >= 1
        assert t.stats.dropped(DropReason.HANDSHAKE_TIMEOUT) == 1
        assert t.session_count() == 0 and t.handshakes_by_key == {}


# ---- sessions across a ring change -----------------------------------------------------------


def exchange(net: Net, pairs: list[tuple[str, str]], tag: bytes) -> int:
    """One packet each way per pair; the number sent."""
    for x, y in pairs:
        net.send(x, y, ipv4(x, y, tag))
        net.send(y, x, ipv4(y, x, tag))
    net.pump()
    return 2 * len(pairs)


def test_a_session_outlives_a_ring_change_until_its_rekey():
    net = net_of("P0", "P0")
    a, b = net.pods[A], net.pods[B]
    net.send(A, B, ipv4(A, B, b"hello"))  # one handshake (no crossing ones)
    net.pump()
    exchange(net, [(A, B)], b"before")
    (first,) = set(net.data_indices(A))
    for phase in ("P1", "P2"):  # add-next, then promote: the session is not touched
        a.set_ring(ring(phase, a.ring))
        b.set_ring(ring(phase, b.ring))
        exchange(net, [(A, B)], phase.encode())
        assert set(net.data_indices(A)) == {first} and a.stats.get("handshakes_initiated") == 1
    assert session_keys(net, A) == {fingerprint(K1)}
    assert [k["role"] for k in a.key_status()] == ["current", "previous"]
    assert a.key_status()[1] == {
        "role": "previous",
        "fingerprint": fingerprint(K1),
        "sessions": 1,
        "handshakes": 1,
    }
    net.advance(FAST.rekey_after_time)
    exchange(net, [(A, B)], b"rekeyed")  # sealed on K1, and the re-key runs under K2
    exchange(net, [(A, B)], b"on K2")
    assert a.stats.get("rekeys") == 1 and net.data_indices(A)[-1] != first
    assert a.table.by_addr[B].current.key == fingerprint(K2)
    net.advance(FAST.reject_after_time)  # the K1 session expires: only K2 is left
    exchange(net, [(A, B)], b"after")
    assert session_keys(net, A) == session_keys(net, B) == {fingerprint(K2)}
    for t in (a, b):
        t.set_ring(ring("P3", t.ring))
    exchange(net, [(A, B)], b"dropped previous")
    assert len(net.delivered[A]) == 7 and len(net.delivered[B]) == 8
    assert net.delivered[A][-1] == ipv4(B, A, b"dropped previous")
    assert drops(a) == drops(b) == 0


def test_three_pods_rotate_one_at_a_time_without_losing_a_packet():
    """The staggered rotation a cluster sees: each phase reaches the pods one by one, with
    traffic between every pair and re-keys happening throughout."""
    net = net_of("P0", "P0", "P0")
    pairs = [(A, B), (B, C), (C, A)]
    sent = exchange(net, pairs, b"start")
    for phase in ("P1", "P2", "P3"):
        for ip in (A, B, C):
            t = net.pods[ip]
            t.set_ring(ring(phase, t.ring))
            for _ in range(3):
                net.advance(FAST.rekey_after_time / 3)
                sent += exchange(net, pairs, phase.encode())
    net.advance(FAST.reject_after_time)
    sent += exchange(net, pairs, b"end")
    assert sum(len(v) for v in net.delivered.values()) == sent
    for ip in (A, B, C):
        t = net.pods[ip]
        assert drops(t) == 0 and session_keys(net, ip) == {fingerprint(K2)}
        assert set(t.handshakes_by_key) == {fingerprint(K1), fingerprint(K2)}
        assert [(k["role"], k["fingerprint"]) for k in t.key_status()] == [
            ("current", fingerprint(K2))
        ]
    # no counter twice under any session key: every (receiver, index, counter) is new
    headers = [
        (dst, *struct.unpack_from("<IQ", d, 4))
        for d, _, dst in net.wire
        if wire.message_type(d) == wire.TYPE_DATA
    ]
    assert len(headers) == len(set(headers)) > sent


def test_a_packet_of_the_old_session_does_not_open_under_the_new_one():
    """Sessions under different project keys have different keys: a counter value used on
    both never meets the same key twice."""
    net = net_of("P1", "P1")
    a, b = net.pods[A], net.pods[B]
    net.send(A, B, ipv4(A, B, b"hello"))
    net.pump()
    for _ in range(5):
        exchange(net, [(A, B)], b"on K1")
    old = [d for d, src, _ in net.wire if src == A and wire.message_type(d) == wire.TYPE_DATA][-1]
    assert struct.unpack_from("<Q", old, 8)[0] >= 5
    for t in (a, b):
        t.set_ring(ring("P2", t.ring))
    net.advance(FAST.reject_after_time)
    exchange(net, [(A, B)], b"on K2")
    new_index = b.table.by_addr[A].current.local_index
    assert b.table.by_addr[A].current.key == fingerprint(K2)
    moved = old[:4] + struct.pack("<I", new_index) + old[8:]
    assert b.receive(moved, (A, 1337), net.now, net.wall) is None
    assert b.stats.dropped(DropReason.BAD_TAG) == 1


def test_a_response_must_use_the_key_of_its_initiation():
    net = net_of("P1", "P1")
    a = net.pods[A]
    net.send(A, B, ipv4(A, B))
    for d, s, dst in net.pump(hold=True):
        net.deliver(d, s, dst)
    ((response, src, _),) = net.pump(hold=True)
    assert a.table.by_addr[B].pending.templates.fingerprint == fingerprint(K1)
    k2 = a.ring.next
    under_k2 = wire.add_mac(k2.mac_key, response[: -wire.MAC_LEN])  # a K2 key holder's remac
    assert a.receive(under_k2, (B, 1337), net.now, net.wall) is None
    assert a.stats.dropped(DropReason.BAD_MAC) == 1 and a.session_count() == 0
    a.receive(response, (B, 1337), net.now, net.wall)  # the genuine one still completes
    assert a.stats.get("handshakes_completed") == 1


def test_a_ring_change_keeps_an_initiation_in_flight_under_its_key():
    net = net_of("P1", "P1")
    a, b = net.pods[A], net.pods[B]
    net.send(A, B, ipv4(A, B, b"queued"))
    held = net.pump(hold=True)  # the K1 initiation is on the wire ...
    a.set_ring(ring("P2", a.ring))  # ... when A is promoted
    for d, s, dst in held:
        net.deliver(d, s, dst)
    net.pump()
    assert net.delivered[B] == [ipv4(A, B, b"queued")]
    assert session_keys(net, A) == {fingerprint(K1)} and b.handshakes_by_key == {fingerprint(K1): 1}


# ---- cost of a wrong key ---------------------------------------------------------------------


def test_a_wrong_key_costs_no_noise_work_with_a_full_ring(work):  # noqa: F811
    net = Net()
    full = KeyRing.from_keys(KeySet(K1, next=K2, previous=os.urandom(32)), counting_keygen(work))
    b = net.add(B, keys=full)
    stranger = ring("other").current
    initiations = [
        handshake.build_initiation(stranger, i + 1, int(net.wall * 1e9) + i, bytes([10, 0, 0, 1]))[
            1
        ]
        for i in range(50)
    ]
    work.calls.clear()
    for d in initiations:
        assert b.receive(d, (A, 1337), net.now, net.wall) is None
    assert b.stats.dropped(DropReason.BAD_MAC) == 50 and b.pop_transmits() == []
    assert work.calls == {}  # no Noise hashing, no AEAD, no keygen, no DH


def test_keyless_responses_are_refused_before_the_pending_lookup_costs_anything(work):  # noqa: F811
    net = net_of("P2")
    a = net.pods[A]
    net.send(A, B, ipv4(A, B))
    net.pump(hold=True)
    index = next(iter(a.table.pending))
    work.calls.clear()
    forged = struct.pack("<II", wire.TYPE_RESPONSE, index) + os.urandom(wire.RESPONSE_LEN - 8)
    a.receive(forged, (B, 1337), net.now, net.wall)
    assert a.stats.dropped(DropReason.BAD_MAC) == 1 and work.calls == {}
    assert a.table.pending  # the initiation is intact


# ---- the ring itself ---------------------------------------------------------------------------


def test_a_reload_keeps_the_templates_of_keys_that_stay():
    r1 = ring("P1")
    r2 = ring("P2", reuse=r1)
    assert r2.current is r1.next and r2.previous is r1.current
    assert ring("P2").current is not r1.next


def test_roles_and_retired_keys_in_status_and_metrics():
    r = ring("P3")
    rows = describe_keys(
        r,
        [fingerprint(K2), fingerprint(K1), fingerprint(K2)],
        {fingerprint(K1): 4, fingerprint(K2): 2},
    )
    assert rows == [
        {"role": "current", "fingerprint": fingerprint(K2), "sessions": 2, "handshakes": 2},
        {"role": RETIRED, "fingerprint": fingerprint(K1), "sessions": 1, "handshakes": 4},
    ]
    assert r.role_of(fingerprint(K1)) == RETIRED and r.role_of(fingerprint(K2)) == "current"
    text = render_key_metrics(rows)
    assert f'tencrypt_key{{fingerprint="{fingerprint(K2)}",role="current"}} 1' in text
    assert f'tencrypt_key{{fingerprint="{fingerprint(K1)}",role="retired"}} 0' in text
    assert f'tencrypt_key_sessions{{fingerprint="{fingerprint(K1)}",role="retired"}} 1' in text
    assert f'tencrypt_key_handshakes_total{{fingerprint="{fingerprint(K1)}"}} 4' in text
    assert K1.hex()[:8] not in text and "KeyRing(current=" in repr(r)


def test_status_shows_each_key_and_the_sessions_on_it():
    net = net_of("P1", "P1")
    net.send(A, B, ipv4(A, B, b"x"))
    net.pump()
    keys = net.pods[A].status(net.now)["keys"]
    assert keys == [
        {"role": "current", "fingerprint": fingerprint(K1), "sessions": 1, "handshakes": 1},
        {"role": "next", "fingerprint": fingerprint(K2), "sessions": 0, "handshakes": 0},
    ]
    peer = net.pods[A].status(net.now)["peers"][0]
    assert peer["sessions"][0]["key"] == fingerprint(K1)


# ---- a pod that missed a phase -----------------------------------------------------------------


def test_a_member_a_phase_behind_is_refused_counted_and_listed_until_it_catches_up():
    from tencrypt.core.identity import ClaimPolicy

    members = {A, B}
    net = Net()
    net.add(A, keys=ring("P0"))  # missed add-next and promote
    b = net.add(
        B,
        keys=ring("P3"),
        identity=ClaimPolicy(
            ("10.0.0.0/24",), "172.30.0.0/16", B, is_member=lambda ip: ip in members
        ),
    )
    net.send(A, B, ipv4(A, B, b"stale"))
    net.pump()
    assert net.delivered[B] == [] and b.stats.get("handshakes_wrong_key") == 1
    assert b.status(net.now)["key_mismatch"] == [{"source": A, "refused": 1}]
    forged = bytearray(net.wire[0][0])
    b.receive(bytes(forged), ("10.0.0.77", 1337), net.now, net.wall)  # not a member: only
    assert b.stats.get("handshakes_wrong_key") == 1  # a bad_mac drop
    assert b.stats.dropped(DropReason.BAD_MAC) == 2
    net.pods[A].set_ring(ring("P2", net.pods[A].ring))  # the agent catches it up
    net.advance(FAST.rekey_timeout)  # the retry goes out under the new current key
    assert net.delivered[B] == [ipv4(A, B, b"stale")]
    assert b.status(net.now)["key_mismatch"] == [] and len(b.key_mismatch) == 0


def test_the_mismatch_list_is_bounded():
    from tencrypt.core.keyring import KeyMismatches

    seen = KeyMismatches(limit=2)
    noted = [seen.note(src) for src in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1")]
    assert noted == [True, True, False, True]
    assert seen.describe() == [
        {"source": "10.0.0.1", "refused": 2},
        {"source": "10.0.0.2", "refused": 1},
    ]


def test_a_member_the_full_mismatch_list_leaves_out_is_counted():
    """Issue 22, item 4: the list is bounded (256 by default) and a source it cannot hold is
    a counter, not silence."""
    from tencrypt.core.identity import ClaimPolicy

    net = Net()
    b = net.add(
        B,
        keys=ring("P3"),
        identity=ClaimPolicy(("10.0.0.0/16",), "172.30.0.0/16", B, is_member=lambda ip: True),
    )
    b.key_mismatch.limit = 3
    other_key = handshake.Templates(os.urandom(32), X25519PrivateKey.generate)
    stale = handshake.build_initiation(other_key, 1, 1, bytes(4))[1]  # no key of the ring
    for i in range(5):
        b.receive(stale, (f"10.0.1.{i + 1}", 1337), net.now, net.wall)
    assert b.stats.get("handshakes_wrong_key") == 5 and len(b.key_mismatch) == 3
    assert b.stats.get("key_mismatches_unlisted") == 2
