"""A dual-stack pod through the proxy's pipelines (tencrypt.daemon.Proxy on in-memory ports):
its IPv6 packets ride the IPv4 tunnel of the pod behind the destination — one peer, one
session for both families — and an IPv6 packet to a pod whose IPv4 address the membership
does not pair is refused (ICMPv6 administratively prohibited), never sent anywhere."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from scapy.layers.inet import TCP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6

from tencrypt.core.membership import Members
from tencrypt.core.stats import DropReason
from tests.unit.fakes import Pod, Wire, pod_config

A, B, C = "10.128.0.11", "10.128.0.12", "10.128.0.13"
A6, B6, C6 = "fd00:10:128::11", "fd00:10:128::12", "fd00:10:128::13"
PAYLOAD = b"tencrypt-dual-stack-marker"


def members() -> Members:
    return Members(
        "shop",
        1,
        frozenset({A, B, C, A6, B6, C6}),
        frozenset(),
        (),
        ("172.30.0.0/16", "fd00:30::/108"),
        ("10.128.0.0/14", "fd00:10:128::/56"),
        pod_ips=((A, A6), (B, B6)),  # C's pair unknown: its IPv6 cannot be tied to a tunnel
    )


def dual(ip: str, ip6: str) -> Pod:
    config = replace(
        pod_config(ip),
        pod_ip6=ip6,
        service_cidr6="fd00:30::/108",
        pod_cidrs=("10.128.0.0/14", "fd00:10:128::/56"),
    )
    return Pod(ip, members=members(), config=config)


def tcp6(src: str, dst: str, sport: int, dport: int, flags: str = "S") -> bytes:
    return bytes(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / PAYLOAD)


def delivered(pod: Pod) -> list[bytes]:
    injected = [bytes(p) for p in pod.inject.sent] + [bytes(p) for _, p in pod.tun.written]
    return [p for p in injected if PAYLOAD in p]


def test_ipv6_rides_the_ipv4_tunnel_one_session_both_ways():
    async def main():
        a, b = dual(A, A6), dual(B, B6)
        for pod in (a, b):
            await pod.proxy.prepare()
        wire = Wire(a, b)
        a.app_sends(tcp6(A6, B6, 40000, 8080))
        sent = list(a.udp.sent)
        wire.pump()
        for pod in (a, b):
            await pod.proxy.effects.round()
        assert sent and all(dst == (B, 1337) for _, dst in sent)  # the IPv4 tunnel
        [got] = delivered(b)
        assert IPv6(got).src == A6 and IPv6(got)[TCP].dport == 8080
        assert IPv6(got)[TCP].chksum == IPv6(bytes(IPv6(got)))[TCP].chksum
        b.app_sends(tcp6(B6, A6, 8080, 40000, "SA"))
        wire.pump()
        [reply] = delivered(a)
        assert IPv6(reply).src == B6 and IPv6(reply)[TCP].sport == 8080
        assert a.proxy.tunnel.session_count() == b.proxy.tunnel.session_count() == 1
        peer = a.proxy.tunnel.table.by_addr[B6]
        assert peer is a.proxy.tunnel.table.by_addr[B]  # one peer for both addresses
        assert a.udp.sent == [] and a.bypass.sent == []
        assert a.stats.dropped(DropReason.BAD_SOURCE) == b.stats.dropped(DropReason.BAD_SOURCE) == 0

    asyncio.run(main())


def test_ipv6_to_a_pod_without_a_paired_ipv4_address_is_refused_never_sent():
    async def main():
        a = dual(A, A6)
        await a.proxy.prepare()
        a.app_sends(tcp6(A6, C6, 40000, 8080))
        assert a.udp.sent == [] and a.bypass.sent == []  # neither sealed nor in the clear
        assert a.stats.dropped(DropReason.NO_TUNNEL_ADDRESS) == 1
        [icmp] = [IPv6(bytes(p)) for p in a.inject.sent]
        assert icmp.haslayer(ICMPv6DestUnreach) and icmp[ICMPv6DestUnreach].code == 1
        assert icmp.dst == A6

    asyncio.run(main())
