"""Cluster mode through the proxy's pipelines (tencrypt.daemon.Proxy on in-memory ports): the
sending proxy resolves a Service per connection, seals to the chosen pod's proxy at its pod IP,
and gives the replies the cluster IP and Service port back; the receiver needs no NAT."""

from __future__ import annotations

import asyncio
import ipaddress

from scapy.layers.inet import ICMP, IP, TCP

from tencrypt.core.classify import AddrClass
from tencrypt.core.membership import Members
from tencrypt.core.packet import TCP as TCP_PROTO
from tencrypt.core.packet import parse_ipv4
from tencrypt.core.services import Endpoint, Port, Service
from tencrypt.core.stats import DropReason
from tests.unit.fakes import Pod, Wire

A, B1, B2 = "10.128.0.11", "10.128.0.12", "10.129.0.13"
VIP = "172.30.5.9"
PAYLOAD = b"tencrypt-services-marker"


def members(*ready: str, generation: int = 1) -> Members:
    web = Service(
        "web",
        (VIP,),
        (Port("http", TCP_PROTO, 80),),
        tuple(Endpoint(ip, (Port("http", TCP_PROTO, 8080),)) for ip in ready),
    )
    return Members(
        "shop",
        generation,
        frozenset({A, B1, B2}),
        frozenset({VIP}),
        (web,),
        ("172.30.0.0/16",),
        ("10.128.0.0/14",),
    )


def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "S") -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / PAYLOAD)


def delivered(pod: Pod) -> list[bytes]:
    return [bytes(p) for p in pod.inject.sent if PAYLOAD in bytes(p)]


def fields(packet: bytes) -> tuple[str, int, str, int]:
    ip = parse_ipv4(packet)
    assert ip is not None
    return (
        str(ipaddress.IPv4Address(ip.src)),
        ip.sport,
        str(ipaddress.IPv4Address(ip.dst)),
        ip.dport,
    )


async def cluster(picks=None) -> tuple[Pod, Pod, Pod, Wire]:
    choice = iter(picks or [])
    rng = (lambda bound: next(choice) % bound) if picks else None
    a = Pod(A, members=members(B1, B2), rng=rng)
    b1, b2 = Pod(B1, members=members(B1, B2)), Pod(B2, members=members(B1, B2))
    for pod in (a, b1, b2):
        await pod.proxy.prepare()
    return a, b1, b2, Wire(a, b1, b2)


def test_a_connection_to_a_service_reaches_the_chosen_pod_at_its_target_port_and_back():
    async def main():
        a, b1, b2, wire = await cluster(picks=[1])
        assert a.proxy.dispatch.cluster
        a.app_sends(tcp(A, VIP, 40000, 80))
        wire.pump()
        for pod in (a, b1, b2):
            await pod.proxy.effects.round()
        [got] = delivered(b2)  # the second endpoint, at its target port, from A's pod IP
        assert fields(got) == (A, 40000, B2, 8080) and delivered(b1) == []
        assert IP(got)[TCP].chksum == IP(bytes(IP(got)))[TCP].chksum  # checksum intact
        b2.app_sends(tcp(B2, A, 8080, 40000, "SA"))  # B2's app answers A's pod IP
        wire.pump()
        [reply] = delivered(a)
        assert fields(reply) == (VIP, 80, A, 40000)  # what A's socket is connected to
        assert a.udp.sent == [] and a.bypass.sent == [] and b2.bypass.sent == []
        assert b2.proxy.flows.flows_of(A) == 0  # the receiver translated nothing

    asyncio.run(main())


def test_the_same_pods_reach_each_other_by_pod_ip_on_the_same_session():
    async def main():
        a, b1, _, wire = await cluster(picks=[0])
        a.app_sends(tcp(A, VIP, 40000, 80))
        wire.pump()
        await b1.proxy.effects.round()
        await a.proxy.effects.round()
        sessions = b1.proxy.tunnel.session_count()
        b1.app_sends(tcp(B1, A, 5555, 9000))  # a call back to the client's pod IP
        a.app_sends(tcp(A, B1, 40001, 8080))  # and the client to the pod IP directly
        wire.pump()
        assert fields(delivered(a)[-1]) == (B1, 5555, A, 9000)
        assert fields(delivered(b1)[-1]) == (A, 40001, B1, 8080)
        assert b1.proxy.tunnel.session_count() == sessions  # no second session
        assert (
            a.stats.dropped(DropReason.BAD_SOURCE) == b1.stats.dropped(DropReason.BAD_SOURCE) == 0
        )

    asyncio.run(main())


def test_no_ready_endpoint_is_refused_at_once_with_port_unreachable_from_the_vip():
    async def main():
        a = Pod(A, members=members())
        await a.proxy.prepare()
        a.app_sends(tcp(A, VIP, 40000, 80))
        [icmp] = a.inject.sent
        parsed = IP(bytes(icmp))
        assert parsed.src == VIP and parsed.dst == A
        assert parsed[ICMP].type == 3 and parsed[ICMP].code == 3
        assert a.udp.sent == [] and a.bypass.sent == []
        assert a.stats.dropped(DropReason.SERVICE_NO_ENDPOINT) == 1

    asyncio.run(main())


def test_a_removed_endpoint_gets_no_new_connection_from_the_next_packet_on():
    async def main():
        a, b1, b2, wire = await cluster()  # always the first candidate
        a.app_sends(tcp(A, VIP, 40000, 80))
        wire.pump()
        for pod in (a, b1, b2):
            await pod.proxy.effects.round()
        assert len(delivered(b1)) == 1
        a.set_members(members(B2, generation=2))
        a.app_sends(tcp(A, VIP, 40001, 80))
        wire.pump()
        for pod in (a, b1, b2):
            await pod.proxy.effects.round()
        assert len(delivered(b1)) == 1 and fields(delivered(b2)[-1]) == (A, 40001, B2, 8080)

    asyncio.run(main())


def test_a_format_1_membership_keeps_the_vip_path():
    async def main():
        old = Members("shop", 1, frozenset({A, B1}), frozenset({VIP}))
        a = Pod(A, members=old)
        await a.proxy.prepare()
        assert not a.proxy.dispatch.cluster
        a.app_sends(tcp(A, VIP, 40000, 80))
        [(datagram, (dst, port))] = a.udp.sent  # a handshake to the VIP's tunnel port
        assert dst == VIP and port == 1337 and len(datagram) == 104  # wire v3

    asyncio.run(main())


def test_a_broken_membership_file_locks_strict_mode_until_a_good_one_comes():
    """#22 item 8: a file that is there but never loadable is not "no membership": strict mode
    refuses what it cannot classify in the guarded ranges (no reverse lookup that could open
    the clear), seals what is known, and unlocks when a good file comes."""

    async def main():
        a = Pod(A)
        (a.members_dir / "members.json").write_text('{"format": "tencrypt-members/2", "pro')
        await a.proxy.prepare()
        assert a.proxy.dispatch.locked and a.proxy.members.broken
        assert "tencrypt_membership_broken 1" in a.proxy.render_metrics()
        a.app_sends(tcp(A, "172.30.9.9", 40000, 80))  # unknown, in the Service CIDR
        a.app_sends(tcp(A, "10.129.7.7", 40000, 80))  # unknown, in the pod network
        assert a.resolver.asked == []  # refused at once, no lookup
        assert a.stats.dropped(DropReason.UNCLASSIFIED) == 2 and a.bypass.sent == []
        a.proxy.table.learn(B1, AddrClass.INTERNAL, 300, a.clock.now)
        a.app_sends(tcp(A, B1, 40000, 80))  # known to be the project's: sealed (a handshake)
        assert len(a.udp.sent) == 1 and a.bypass.sent == []
        a.set_members(members(B1))
        assert not a.proxy.dispatch.locked and a.proxy.dispatch.cluster

    asyncio.run(main())
