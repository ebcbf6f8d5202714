"""The proxy's pipelines (tencrypt.daemon.Proxy) driven through in-memory ports: no root, no
namespaces, milliseconds. Two proxies talk through ``fakes.Wire``; what the app would receive
is what a ``FakeRaw``/``FakeTun`` was handed; what left in the clear is ``bypass.sent``."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress

from tencrypt.core.classify import AddrClass, RouteAction
from tencrypt.core.nfqmsg import QueuedPacket
from tencrypt.core.packet import parse_ipv4
from tencrypt.core.session import Limits
from tencrypt.core.stats import DropReason
from tencrypt.linux import inbound
from tencrypt.linux.inbound import InboundGate
from tests.unit.fakes import FakeQueue, Pod, Wire, udp_packet

INTERNAL, EXTERNAL = AddrClass.INTERNAL, AddrClass.EXTERNAL
A, B, VIP_B = "10.128.0.11", "10.128.0.12", "172.30.0.12"
PAYLOAD = b"tencrypt-unit-marker"


def run(coro):
    return asyncio.run(coro)


async def settle() -> None:
    """Let the tasks the proxies spawned (reverse lookups) run."""
    for _ in range(5):
        await asyncio.sleep(0)


def dst_of(packet: bytes) -> str:
    return str(ipaddress.IPv4Address(packet[16:20]))


def in_clear(pod: Pod) -> list[bytes]:
    return [p for p in pod.bypass.sent if PAYLOAD in p]


def test_a_literal_vip_is_held_classified_sealed_and_delivered_natted():
    async def main():
        a, b = Pod(A, ptr={VIP_B: INTERNAL}), Pod(B)
        wire = Wire(a, b, vips={VIP_B: B})
        await a.proxy.prepare()
        await b.proxy.prepare()
        a.app_sends(udp_packet(A, VIP_B, PAYLOAD))
        assert list(a.proxy.dispatch.holds) == [VIP_B] and a.proxy.dispatch.holds.count(VIP_B) == 1
        await settle()  # the reverse lookup says: the project's
        assert a.resolver.asked == [VIP_B] and not a.proxy.dispatch.holds
        wire.pump()
        # B's session with A is bound to A's pod IP: its /32 into tenc0 comes first, so the
        # packet waits for the effects task (the app's reply must not take the uplink)
        assert b.inject.sent == [] and A in b.proxy.awaiting_route
        await b.proxy.effects.round()
        assert b.kernel.routes == {A: RouteAction.VIA_TUN} and A in b.kernel.fw
        [got] = b.inject.sent
        assert dst_of(got) == B and got.endswith(PAYLOAD)  # the VIP NATed to B's pod IP
        assert parse_ipv4(got) is not None
        assert in_clear(a) == [] and in_clear(b) == []
        assert a.stats.get("packets_sealed") == 1

    run(main())


def test_unknown_in_the_service_cidr_is_refused_with_icmp_never_clear():
    async def main():
        a = Pod(A, ptr={})
        await a.proxy.prepare()
        a.app_sends(udp_packet(A, "172.30.9.9", PAYLOAD))
        await settle()
        a.app_sends(udp_packet(A, "172.30.9.9", PAYLOAD))  # the unknown verdict is remembered
        assert a.resolver.asked == ["172.30.9.9"]
        assert a.stats.dropped(DropReason.UNCLASSIFIED) == 2
        icmp = [p for p in a.inject.sent if p[9] == 1]
        assert len(icmp) == 2 and icmp[0][20:22] == bytes([3, 13])  # admin prohibited
        assert dst_of(icmp[0]) == A  # to the app that sent it
        assert in_clear(a) == [] and a.udp.sent == []

    run(main())


def test_positively_external_and_outside_the_guarded_ranges_go_clear():
    async def main():
        a = Pod(A, ptr={"172.30.7.7": EXTERNAL})
        await a.proxy.prepare()
        a.app_sends(udp_packet(A, "172.30.7.7", PAYLOAD))
        await settle()
        a.app_sends(udp_packet(A, "192.0.2.1", PAYLOAD))  # not the Service CIDR nor pods
        assert [dst_of(p) for p in in_clear(a)] == ["172.30.7.7", "192.0.2.1"]
        assert a.resolver.asked == ["172.30.7.7"]

    run(main())


def test_a_tenants_alias_is_a_counted_conflict_and_changes_nothing():
    async def main():
        a = Pod(A)
        await a.proxy.prepare()
        a.proxy._on_changes(a.proxy.table.learn(VIP_B, INTERNAL, 300, a.clock.now))
        a.proxy._on_changes(a.proxy.table.learn(VIP_B, EXTERNAL, 300, a.clock.now))
        await a.proxy.effects.round()
        assert a.stats.get("classification_conflicts") == 1
        assert VIP_B not in a.kernel.routes and VIP_B in a.kernel.fw
        a.app_sends(udp_packet(A, VIP_B, PAYLOAD))
        assert in_clear(a) == [] and len(a.udp.sent) == 1  # a handshake, not the clear

    run(main())


def test_too_big_with_df_gets_frag_needed():
    async def main():
        a = Pod(A)
        await a.proxy.prepare()
        a.app_sends(udp_packet(A, VIP_B, b"x" * 1500, df=True))
        [icmp] = a.inject.sent
        assert icmp[20:22] == bytes([3, 4]) and int.from_bytes(icmp[26:28], "big") == 1440
        assert a.stats.dropped(DropReason.TOO_BIG) == 1

    run(main())


def test_tso_frames_refused_fall_back_to_the_raw_socket():
    async def main():
        a, b = Pod(A, ptr={VIP_B: INTERNAL}), Pod(B, batch=True)
        wire = Wire(a, b, vips={VIP_B: B})
        await a.proxy.prepare()
        await b.proxy.prepare()
        b.proxy._on_changes(b.proxy.table.set_members(frozenset({A}), b.clock.now))
        await b.proxy.effects.round()  # A's route in place before anything arrives
        b.tun.refuse_frames = True
        a.app_sends(udp_packet(A, VIP_B, PAYLOAD))
        await settle()
        wire.pump()
        assert b.stats.get("tun_inject_errors") == 1 and not b.proxy.inject_via_tun
        a.app_sends(udp_packet(A, VIP_B, PAYLOAD + b"2"))
        wire.pump()
        assert [p[-len(PAYLOAD) - 1 :] for p in b.inject.sent] == [PAYLOAD + b"2"]

    run(main())


LIMITS = dataclasses.replace(Limits(), handshake_give_up=3.0, rekey_timeout=1.0)


def unreachable_peer(strict: bool) -> Pod:
    async def main():
        a = Pod(A, strict=strict, limits=LIMITS)
        await a.proxy.prepare()
        a.proxy._on_changes(a.proxy.table.set_members(frozenset({VIP_B}), a.clock.now))
        a.app_sends(udp_packet(A, VIP_B, PAYLOAD))
        for _ in range(5):  # nobody answers: handshakes retried, then given up
            a.clock.now += 1.0
            a.proxy.tunnel.on_timer(a.clock.now, 1_700_000_000.0 + a.clock.now)
            a.proxy._flush()
        a.app_sends(udp_packet(A, VIP_B, PAYLOAD))
        return a

    return run(main())


def test_strict_an_unreachable_peer_is_never_reached_in_the_clear():
    a = unreachable_peer(strict=True)
    assert a.stats.get("peers_unreachable") == 1 and in_clear(a) == []
    assert a.stats.get("plaintext_fallback") == 0


def test_no_strict_falls_back_to_the_clear_counted_per_peer():
    a = unreachable_peer(strict=False)
    assert a.stats.get("plaintext_fallback") == 1
    assert len(in_clear(a)) == 1 and a.stats.get("packets_plaintext_fallback") == 1
    assert a.kernel.fw == set()  # --no-strict removed the firewall


def queued(packet_id: int, src: str) -> QueuedPacket:
    payload = udp_packet(src, A, b"hi")
    return QueuedPacket(
        queue=1337,
        family=2,
        packet_id=packet_id,
        hw_protocol=0x0800,
        hook=1,
        payload=payload,
        length=len(payload),
        indev=2,
        mark=0,
    )


def test_standalone_inbound_gate_refuses_the_projects_plaintext_only():
    async def main():
        a = Pod(A, ptr={"10.128.0.20": INTERNAL, "10.128.0.30": EXTERNAL})
        queue = FakeQueue()
        gate = InboundGate(
            queue, a.proxy.table, a.stats, a.resolver.classify_address, a.clock, a.proxy._spawn
        )
        queue.held = [
            queued(1, "10.128.0.20"),
            queued(2, "10.128.0.30"),
            queued(3, "10.128.0.40"),
            queued(4, "10.128.0.20"),
        ]
        gate.on_readable()
        assert queue.given == {}  # all three sources unknown: held while they are looked up
        await settle()
        assert queue.given == {1: False, 2: True, 3: True, 4: False}
        assert sorted(a.resolver.asked) == ["10.128.0.20", "10.128.0.30", "10.128.0.40"]
        queue.held = [queued(5, "10.128.0.20"), queued(6, "10.128.0.40")]
        gate.on_readable()  # known now: answered at once, no new lookup
        assert queue.given[5] is False and queue.given[6] is True and len(a.resolver.asked) == 3
        assert a.stats.dropped(DropReason.PLAINTEXT_FROM_PROJECT) == 3

    run(main())


def test_the_inbound_gate_holds_at_most_its_bounds_and_frees_them_after_the_lookups(monkeypatch):
    """HOLD_PER_SOURCE per source and HOLD_TOTAL in all wait for a lookup; past either bound
    a packet is refused at once (inbound_hold_full). Answered lookups free their room."""
    monkeypatch.setattr(inbound, "HOLD_PER_SOURCE", 3)
    monkeypatch.setattr(inbound, "HOLD_TOTAL", 5)

    async def main():
        sources = [f"10.128.0.{20 + i}" for i in range(3)]
        a = Pod(A, ptr=dict.fromkeys(sources, EXTERNAL))
        queue = FakeQueue()
        gate = InboundGate(
            queue, a.proxy.table, a.stats, a.resolver.classify_address, a.clock, a.proxy._spawn
        )
        ids = iter(range(1, 100))
        queue.held = [queued(next(ids), sources[0]) for _ in range(4)]  # one over per source
        queue.held += [queued(next(ids), sources[1]) for _ in range(3)]  # one over in total
        gate.on_readable()
        assert queue.given == {4: False, 7: False} and gate.held.total == 5
        assert a.stats.dropped(DropReason.INBOUND_HOLD_FULL) == 2
        await settle()
        assert gate.held.total == 0 and len(gate.held) == 0
        assert queue.given == {4: False, 7: False, 1: True, 2: True, 3: True, 5: True, 6: True}
        queue.held = [queued(next(ids), sources[2]) for _ in range(3)]  # room again
        gate.on_readable()
        assert gate.held.total == 3 and a.stats.dropped(DropReason.INBOUND_HOLD_FULL) == 2

    run(main())


def queued_out(packet_id: int, dst: str) -> QueuedPacket:
    """A new connection of this pod (A) to ``dst``, as the outbound queue holds it."""
    payload = udp_packet(A, dst, b"hi")
    return dataclasses.replace(queued(packet_id, A), payload=payload, length=len(payload))


def test_standalone_outbound_gate_holds_unknown_pod_ips_for_a_reverse_lookup():
    """#22 item 9: a project pod IP no answer named cannot leave on the on-link route in the
    clear: a new connection to the pod network waits in the outbound queue; another
    project's goes out, the project's is dropped (its /32 into tenc0 is wanted, the retry is
    sealed), an unknown one is refused with an ICMP to the app."""
    from tencrypt.linux.inbound import OutboundGate

    async def main():
        project, other, nobody = "10.128.0.20", "10.128.0.30", "10.128.0.40"
        a = Pod(A, ptr={project: INTERNAL, other: EXTERNAL})
        queue, icmps = FakeQueue(), []
        gate = OutboundGate(
            queue,
            a.proxy.table,
            a.stats,
            a.resolver.classify_address,
            a.clock,
            a.proxy._spawn,
            icmp=icmps.append,
        )
        queue.held = [queued_out(1, project), queued_out(2, other), queued_out(3, nobody)]
        gate.on_readable()
        assert queue.given == {}  # all three unknown: held while they are looked up
        await settle()
        assert queue.given == {1: False, 2: True, 3: False}
        assert [dst_of(p) for p in icmps] == [nobody]  # only the unclassified gets an ICMP
        assert a.stats.dropped(DropReason.UNCLASSIFIED) == 1
        assert a.stats.get("outbound_to_tunnel") == 1 and a.stats.get("outbound_accepted") == 1
        queue.held = [queued_out(4, other), queued_out(5, project)]
        gate.on_readable()  # known now: answered at once
        assert queue.given[4] is True and queue.given[5] is False and len(a.resolver.asked) == 3

    run(main())
