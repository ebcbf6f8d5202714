"""The independent implementation of wire v3 in tests/netns/insider.py (written from
core/wire.py's docstring, importing nothing of tencrypt) against the real core, in memory:
the docstring is enough to interoperate. The netns test does the same against a real proxy."""

from __future__ import annotations

import time

from tencrypt.core.identity import ClaimPolicy
from tencrypt.core.session import PeerUp, Tunnel
from tencrypt.core.stats import DropReason, Stats
from tests.netns.insider import Initiator, echo_request, open_data, seal

PSK = bytes(range(1, 33))
PROXY, INSIDER, OTHER = "172.17.0.11", "172.17.0.14", "172.17.0.12"


def tunnel() -> Tunnel:
    policy = ClaimPolicy(("172.17.0.0/16",), "172.30.0.0/16", PROXY)
    return Tunnel(PSK, PROXY, Stats(), identity=policy)


def test_independent_initiator_completes_and_exchanges_data():
    t, me, wall = tunnel(), Initiator(PSK), time.time()
    t.receive(me.initiation(5, int(wall * 1e9), INSIDER), (INSIDER, 1337), 1.0, wall)
    ((response, to),) = t.pop_transmits()
    assert to == (INSIDER, 1337) and len(response) == 96
    session = me.response(response, 5)
    assert session is not None and session["pod_ip"] == PROXY
    ping = echo_request(INSIDER, PROXY, 1, 0)
    assert (
        t.receive(
            seal(session["send"], session["remote_index"], 0, ping), (INSIDER, 1337), 1.1, wall
        )
        == ping
    )
    assert t.pop_events() == [PeerUp(INSIDER, (INSIDER, 1337))]
    t.send(INSIDER, b"reply packet", 1.2, wall)
    ((sealed, _),) = t.pop_transmits()
    assert open_data(session["recv"], 5, sealed) == b"reply packet"


def test_independent_initiator_claiming_another_pod_gets_nothing():
    t, me, wall = tunnel(), Initiator(PSK), time.time()
    t.receive(me.initiation(5, int(wall * 1e9), OTHER), (INSIDER, 1337), 1.0, wall)
    assert t.pop_transmits() == [] and t.stats.dropped(DropReason.CLAIM_NOT_SOURCE) == 1


def test_wrong_key_fails_mac1_at_the_proxy():
    t, me, wall = tunnel(), Initiator(bytes(32)), time.time()
    t.receive(me.initiation(5, int(wall * 1e9), INSIDER), (INSIDER, 1337), 1.0, wall)
    assert t.pop_transmits() == [] and t.stats.dropped(DropReason.BAD_MAC) == 1
