"""The compiled lane's leases (core/express.py rule 6): within one call of the lane, a flow's
later packets are admitted in C under its ``take``/``accept`` grant, and their state changes are
replayed by ``commit`` before Python runs again.

What is checked, on real descriptors (tests/unit/test_express.py's ``pump_rig``):
- packets of two connections of one session, out and in, in one pump: the same datagrams and
  frames as the pure twin, which asks ``take``/``accept`` for every packet, and the same state
  after (counter, window, peer figures and deadlines, stats, both flow tables and their order),
  with all but each flow's first packet leased;
- a lease ends at the re-key point (the next packet is ``take``'s, which refuses it) and with
  the call that granted it (a change Python makes between two calls is seen at once);
- the grant itself (pure): ``until`` and ``bound`` are exactly where ``take``/``accept`` start
  refusing, ``ttl`` is the flows' shortest idle timeout.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tencrypt.core.express import Express
from tests.unit.test_daemon_services import B2, VIP, A, tcp
from tests.unit.test_express import (
    COMPILED,
    Lab,
    counter_of,
    frame,
    pump_rig,
    restore,
    second_connection,
    state,
)

pytestmark = pytest.mark.skipif(
    COMPILED is None or not hasattr(COMPILED, "Lane"), reason="tencrypt._fastpath not built"
)


def drain(sock: Any, size: int = 70000) -> list[bytes]:
    """What is queued on ``sock``, without waiting."""
    sock.setblocking(False)
    got = []
    while True:
        try:
            got.append(sock.recv(size))
        except BlockingIOError:
            return got


def twin(lab: Lab) -> Express:
    e = lab.a.proxy.express
    assert e is not None
    return e


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_leased_packets_out_are_the_twins_datagrams_and_state(policy):
    lab = Lab(policy=policy)
    second_connection(lab)
    a = lab.a
    lane = lab.lane(a, "c")
    frames = [
        frame(tcp(A, VIP, sport, 80, "PA")) for sport in (40000, 40001, 40000, 40000, 40001, 40000)
    ]
    with pump_rig() as (tun_app, tun_proxy, udp, sink):
        peer = a.proxy.tunnel.table.by_addr[B2]
        peer.endpoint = sink.getsockname()
        saved = state(a, B2)
        want = [twin(lab).outbound(f, lab.now) for f in frames]  # take for every packet
        after = state(a, B2)
        restore(a, B2, saved)
        assert all(w is not None for w in want)
        for f in frames:
            tun_app.send(f)
        back, dropped = lane.pump_tun(tun_proxy.fileno(), udp.fileno(), lab.now, 64, 0)
        assert back == [] and dropped == 0
        got = drain(sink)
        assert got == [w[0] for w in want if w is not None]
        assert [counter_of(d) for d in got] == list(
            range(counter_of(got[0]), counter_of(got[0]) + 6)
        )
        assert state(a, B2) == after  # the owed commits were replayed before the pump returned
        assert lane.leased() == (4, 0)  # each connection's first packet asked take


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_leased_packets_in_are_the_twins_frames_and_state(policy):
    lab = Lab(policy=policy)
    second_connection(lab)
    a, b2 = lab.a, lab.b2
    lane = lab.lane(a, "c")
    datagrams = []
    for dport in (40000, 40001, 40000, 40001, 40000):
        b2.app_sends(frame(tcp(B2, A, 8080, dport, "PA")))
        [(datagram, _)] = b2.udp.sent
        b2.udp.sent = []
        datagrams.append(datagram)
    with pump_rig() as (tun_app, tun_proxy, udp, sink):
        peer = a.proxy.tunnel.table.by_addr[B2]
        peer.endpoint = udp.getsockname()  # B2's proxy sends from here
        saved = state(a, B2)
        want = [twin(lab).inbound(d, peer.endpoint, lab.now) for d in datagrams]
        after = state(a, B2)
        restore(a, B2, saved)
        assert all(w is not None for w in want)
        for d in datagrams:
            udp.sendto(d, sink.getsockname())
        back, errors = lane.pump_udp(sink.fileno(), tun_proxy.fileno(), lab.now, 64, 0)
        assert back == [] and errors == 0
        assert drain(tun_app) == want
        assert state(a, B2) == after
        assert lane.leased() == (0, 3)


def test_a_lease_ends_at_the_rekey_point():
    lab = Lab()
    a = lab.a
    lane = lab.lane(a, "c")
    data = frame(tcp(A, VIP, 40000, 80, "PA"))
    with pump_rig() as (tun_app, tun_proxy, udp, sink):
        peer = a.proxy.tunnel.table.by_addr[B2]
        peer.endpoint = sink.getsockname()
        s = peer.current
        rekey = a.proxy.tunnel.limits.rekey_after_messages
        s.send_counter = rekey - 3  # two packets below the re-key point
        for _ in range(4):
            tun_app.send(data)
        back, _ = lane.pump_tun(tun_proxy.fileno(), udp.fileno(), lab.now, 64, 0)
        assert back == [data]  # the third starts a re-key: the Python path's
        assert [counter_of(d) for d in drain(sink, 2048)] == [rekey - 3, rekey - 2]
        assert s.send_counter == rekey - 1 and lane.leased() == (1, 0)
        assert tun_proxy.recv(2048) == data  # the fourth was not read


def test_a_lease_does_not_outlive_the_call_that_granted_it():
    lab = Lab()
    a, b2 = lab.a, lab.b2
    lane = lab.lane(a, "c")
    data = frame(tcp(A, VIP, 40000, 80, "PA"))
    with pump_rig() as (tun_app, tun_proxy, udp, sink):
        table = a.proxy.tunnel.table
        peer = table.by_addr[B2]
        peer.endpoint = sink.getsockname()
        for _ in range(2):
            tun_app.send(data)
        assert lane.pump_tun(tun_proxy.fileno(), udp.fileno(), lab.now, 64, 0) == ([], 0)
        assert len(drain(sink, 2048)) == 2 and lane.leased() == (1, 0)
        del table.by_addr[B2]  # Python, between two calls: take now refuses the flow
        tun_app.send(data)
        back, _ = lane.pump_tun(tun_proxy.fileno(), udp.fileno(), lab.now, 64, 0)
        assert back == [data] and drain(sink, 2048) == [] and lane.leased() == (1, 0)
        table.by_addr[B2] = peer
        # in: the peer's endpoint moves between two calls; its old address is refused
        datagrams = []
        for _ in range(3):
            b2.app_sends(frame(tcp(B2, A, 8080, 40000, "PA")))
            [(datagram, _)] = b2.udp.sent
            b2.udp.sent = []
            datagrams.append(datagram)
        peer.endpoint = udp.getsockname()
        for d in datagrams[:2]:
            udp.sendto(d, sink.getsockname())
        assert lane.pump_udp(sink.fileno(), tun_proxy.fileno(), lab.now, 64, 0) == ([], 0)
        assert len(drain(tun_app)) == 2 and lane.leased() == (1, 1)
        peer.endpoint = ("127.0.0.1", 9)
        udp.sendto(datagrams[2], sink.getsockname())
        back, _ = lane.pump_udp(sink.fileno(), tun_proxy.fileno(), lab.now, 64, 0)
        assert back == [(datagrams[2], 0, False, udp.getsockname())]
        assert drain(tun_app) == [] and lane.leased() == (1, 1)


def test_the_grant_is_exactly_where_take_and_accept_start_refusing():
    """Pure: the lease ``take`` gives holds up to its limits and not one step beyond."""
    lab = Lab()
    a = lab.a
    e = twin(lab)
    peer = a.proxy.tunnel.table.by_addr[B2]
    s = peer.current
    [entry] = [v for v in e.out.values()]
    take = entry[4]
    saved = state(a, B2)
    got = take(100, lab.now)
    assert got is not None
    _, _, until, bound, ttl = got
    refs = take.__self__.refs
    assert refs and ttl == min(ref.ttl() for ref in refs)
    if s.initiator:
        assert until == min(s.expires_at, s.rekey_at)
    else:
        assert until == s.expires_at
    assert bound == min(
        a.proxy.tunnel.limits.reject_after_messages,
        a.proxy.tunnel.limits.rekey_after_messages - 1,
    )

    def takes(counter: int, now: float, segments: int = 0) -> bool:
        restore(a, B2, saved)
        s.send_counter = counter
        return take(100, now, segments) is not None

    assert takes(bound - 1, lab.now) and not takes(bound, lab.now)
    assert takes(bound - 3, lab.now, 3) and not takes(bound - 2, lab.now, 3)
    assert takes(saved["counter"], until - 1e-3) and not takes(saved["counter"], until)
    restore(a, B2, saved)
    # in: accept's grant, at A for B2's reply flow
    [(accept_key, slot)] = list(e.slots.items())
    accept = slot[3]
    [inn] = [v for v in e.inn.values()]
    refs_in = inn[2]
    source = socket.inet_aton(B2)
    grant = accept(source, 60, peer.endpoint, lab.now, refs_in)
    assert grant is not None
    until_in, ttl_in = grant
    renews = s.initiator and peer.pending is None and peer.current is s
    assert until_in == (min(s.expires_at, s.renew_at) if renews else s.expires_at)
    assert ttl_in == min(ref.ttl() for ref in refs_in[0])
    restore(a, B2, saved)
    assert accept(source, 60, peer.endpoint, until_in - 1e-3, refs_in) is not None
    restore(a, B2, saved)
    assert accept(source, 60, peer.endpoint, until_in, refs_in) is None
    assert accept_key == s.local_index
