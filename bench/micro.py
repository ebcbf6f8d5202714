"""Micro-benchmarks of the per-packet costs: ``python -m bench.micro [--runs N] [--packets N]``.

Not a test: it prints microseconds per operation (best of several runs, so that a noisy
shared machine shows what the code costs rather than what the neighbours cost):

1. seal and open of a 1400-byte IPv4 packet through the bare wire helpers (one AEAD call each);
2. the same through ``Tunnel.send`` / ``Tunnel.receive`` (lookup, counters, replay window,
   inner checks on top);
3. NAT rewrites of a 1400-byte TCP segment through ``core.nat.FlowTable`` (in: VIP -> pod IP,
   out: pod IP -> VIP), buffer copy included since a rewrite works in place;
4. µs per super-packet (SEGMENTS segments of 1440 bytes: 64 KiB of TCP at tenc0's MTU) sealed
   by ``Tunnel.send_batch`` and opened by ``Tunnel.receive_batch``, both given one
   ``core.batch.Rows`` as the proxy gives them (a split's segments, a GRO read), per backend: one AEAD call
   per packet (no backend), core/fastpath.py (pure Python) and tencrypt._fastpath (C) — and
   the bare ``seal_batch`` / ``open_batch`` calls of each backend, and the split of a 64 KiB
   TSO frame (core/batch.py: NumPy for python, the backend's ``segment`` for c) and the
   coalescing of its segments back into one TSO frame;
5. µs per small packet per hop through the whole proxy (``daemon.Proxy`` on the in-memory ports
   of tests/unit/fakes.py, so no system call is counted): a 53-byte TCP segment read from tenc0
   and sealed (out), and the datagram opened, NATed and written to tenc0 (in), per backend;
   once back to back (hot) and once after IDLE_S of sleep before each packet (cold: what a
   ping at idle meets, since caches and TLBs are cold after the CPU slept);
6. the same hops, hot, in cluster mode (a format-2 membership: the sender translates the
   Service per connection, the receiver gives the reply its cluster IP back), without and
   with a NetworkPolicy that isolates both pods both ways (issue 23: the policy flows' cost
   per packet of a known flow), for the best backend: a request out and in, a reply back.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import platform
import struct
import time
from collections.abc import Callable

import cryptography
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tencrypt import fastpath
from tencrypt.core import TUNNEL_PORT, wire
from tencrypt.core import fastpath as pure
from tencrypt.core.batch import Rows, split_tcp_batch
from tencrypt.core.fastpath import Backend
from tencrypt.core.replay import ReplayWindow
from tencrypt.core.session import Tunnel
from tencrypt.core.stats import Stats

A, B, VIP = "10.128.0.5", "10.128.0.6", "172.30.5.9"
PSK = bytes(range(1, 33))
SIZE = 1400
BATCH = 64  # tencrypt.daemon.BATCH
SEGMENTS = 45  # a 64 KiB TSO super-packet cut at MSS 1400 (tenc0 MTU 1440)


def ipv4(
    src: str, dst: str, size: int = SIZE, proto: int = 17, ports: tuple[int, int] = (40000, 80)
) -> bytes:
    body = bytes(size - 20)
    if proto == 6:  # a TCP header with ports and the ACK flag, then payload
        body = struct.pack("!HHIIBBHHH", *ports, 1, 1, 5 << 4, 0x10, 65535, 0, 0) + body[20:]
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            size,
            0,
            0x4000,
            64,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + body
    )


def best_us(fn: Callable[[int], None], runs: int, n: int) -> float:
    """Best per-item time in µs of ``fn(n)`` over ``runs`` runs."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def linked_tunnels(backend: Backend | None = None) -> tuple[Tunnel, Tunnel]:
    a, b = Tunnel(PSK, A, Stats(), fastpath=backend), Tunnel(PSK, B, Stats(), fastpath=backend)
    a.send(B, ipv4(A, B), 1.0, 1.7e9)
    for _ in range(3):  # initiation, response, first data
        for datagram, _addr in a.pop_transmits():
            b.receive(datagram, (A, TUNNEL_PORT), 1.0, 1.7e9)
        for datagram, _addr in b.pop_transmits():
            a.receive(datagram, (B, TUNNEL_PORT), 1.0, 1.7e9)
    assert a.session_count() == b.session_count() == 1
    return a, b


def bench_wire(runs: int, n: int) -> dict[str, float]:
    aead = ChaCha20Poly1305(bytes(32))
    packet = ipv4(A, B)
    counter = iter(range(2**62))
    sealed = wire.seal(aead, 1, 0, packet)

    def seal(k: int) -> None:
        for _ in range(k):
            wire.seal(aead, 1, next(counter), packet)

    def open_(k: int) -> None:
        for _ in range(k):
            wire.open_datagram(aead, sealed)

    return {"wire.seal": best_us(seal, runs, n), "wire.open_datagram": best_us(open_, runs, n)}


def bench_tunnel(runs: int, n: int) -> dict[str, float]:
    a, b = linked_tunnels()
    packet = bytearray(ipv4(A, B))

    def send(k: int) -> None:
        # Pulled every BATCH packets, as the daemon does after each read batch: keeping
        # thousands of sealed datagrams alive would measure page faults, not sealing.
        for i in range(k):
            a.send(B, packet, 2.0, 1.7e9)
            if i % BATCH == BATCH - 1:
                a.pop_transmits()
        a.pop_transmits()

    # receive needs fresh counters every run: seal them beforehand, outside the timing.
    batches = []
    for _ in range(runs):
        for _ in range(n):
            a.send(B, packet, 2.0, 1.7e9)
        batches.append([d for d, _ in a.pop_transmits()])
    batch_iter = iter(batches)

    def receive(k: int) -> None:
        for datagram in next(batch_iter)[:k]:
            if b.receive(datagram, (A, TUNNEL_PORT), 2.0, 1.7e9) is None:
                raise AssertionError("a benchmark datagram was dropped")

    return {"Tunnel.send": best_us(send, runs, n), "Tunnel.receive": best_us(receive, runs, n)}


def bench_super_packets(runs: int, n: int) -> dict[str, float]:
    """µs per super-packet of SEGMENTS segments, sealed and opened, per backend."""
    backends: list[tuple[str, Backend | None]] = [
        ("one AEAD call per packet", None),
        ("python", pure),
    ]
    compiled = fastpath.compiled()
    if compiled is not None:
        backends.append(("c", compiled))
    segments = [bytearray(ipv4(A, B, size=1440, proto=6)) for _ in range(SEGMENTS)]
    # what the proxy passes: a split's segments and a GRO read's datagrams, one buffer each
    rows = Rows(bytearray(b"".join(segments)), 1440, 1440, SEGMENTS, 1440)
    results: dict[str, float] = {}
    for name, backend in backends:
        a, b = linked_tunnels(backend)

        def send(k: int, a: Tunnel = a) -> None:
            for _ in range(k):
                a.send_batch(B, rows, 2.0, 1.7e9)
                a.pop_transmits()

        batches = []
        for _ in range(runs * n):
            a.send_batch(B, rows, 2.0, 1.7e9)
            wire = [bytes(d) for d, _ in a.pop_transmits()]
            size = len(wire[0])
            batches.append(Rows(bytearray(b"".join(wire)), size, size, SEGMENTS, size))
        batch_iter = iter(batches)

        def receive(k: int, b: Tunnel = b, batch_iter=batch_iter) -> None:
            for _ in range(k):
                if len(b.receive_batch(next(batch_iter), (A, TUNNEL_PORT), 2.0, 1.7e9)) != SEGMENTS:
                    raise AssertionError("a benchmark datagram was dropped")

        results[f"send_batch x{SEGMENTS} [{name}]"] = best_us(send, runs, n)
        results[f"receive_batch x{SEGMENTS} [{name}]"] = best_us(receive, runs, n)
    key, source = bytes(32), ipaddress.IPv4Address(A).packed
    frame, out = _tso_frame(segments), bytearray(2 * 65536)
    for name, backend in backends[1:]:
        assert backend is not None
        sealed = backend.seal_batch(key, 1, 0, segments)
        datagrams = [sealed[i * 1472 : (i + 1) * 1472] for i in range(SEGMENTS)]

        def seal_only(k: int, backend: Backend = backend) -> None:
            for _ in range(k):
                backend.seal_batch(key, 1, 0, segments)

        def open_only(
            k: int, backend: Backend = backend, datagrams: list[bytes] = datagrams
        ) -> None:
            for _ in range(k):  # a fresh window each time: every datagram is opened
                backend.open_batch(key, 1, 2**64 - 1, ReplayWindow(), source, datagrams, 0)

        def split(k: int, backend: Backend = backend) -> None:
            for _ in range(k):
                split_tcp_batch(frame, Stats(), out, backend.segment)

        opened = [bytes(s) for s in split_tcp_batch(frame, Stats(), bytearray(2 * 65536))]

        def coalesce(k: int, backend: Backend = backend, opened: list[bytes] = opened) -> None:
            for _ in range(k):
                backend.coalesce(opened, True)

        results[f"split_tcp_batch 64 KiB [{name}]"] = best_us(split, runs, n)
        results[f"coalesce 64 KiB [{name}]"] = best_us(coalesce, runs, n)
        results[f"seal_batch x{SEGMENTS} [{name}]"] = best_us(seal_only, runs, n)
        results[f"open_batch x{SEGMENTS} [{name}]"] = best_us(open_only, runs, n)
    return results


def _tso_frame(segments: list[bytearray]) -> bytes:
    """One TSO frame (virtio-net header, TCPV4) holding the payload of ``segments``."""
    payload = b"".join(bytes(s[40:]) for s in segments)
    head = bytearray(segments[0][:40])
    struct.pack_into("!H", head, 2, 40 + len(payload))
    hdr = struct.pack("=BBHHHH", 1, 1, 40, len(segments[0]) - 40, 20, 16)
    return hdr + bytes(head) + payload


def bench_nat(runs: int, n: int) -> dict[str, float] | None:
    try:
        from tencrypt.core.nat import FlowTable
    except ImportError:
        return None
    table = FlowTable(B, "172.30.0.0/16", Stats())
    inbound = ipv4(A, VIP, proto=6)  # a peer's segment to the VIP, as opened from the tunnel
    outbound = ipv4(B, A, proto=6, ports=(80, 40000))  # this pod's reply, read from tenc0
    probe = bytearray(inbound)
    assert table.rewrite_inbound(probe, 1.0) and probe[16:20] == ipaddress.IPv4Address(B).packed
    probe = bytearray(outbound)
    assert table.rewrite_outbound(probe, 1.0) and probe[12:16] == ipaddress.IPv4Address(VIP).packed

    def copy_only(k: int) -> None:
        for _ in range(k):
            bytearray(inbound)

    def nat_in(k: int) -> None:
        for _ in range(k):
            table.rewrite_inbound(bytearray(inbound), 1.0)

    def nat_out(k: int) -> None:
        for _ in range(k):
            table.rewrite_outbound(bytearray(outbound), 1.0)

    return {
        "bytearray copy (baseline)": best_us(copy_only, runs, n),
        "FlowTable.rewrite_inbound": best_us(nat_in, runs, n),
        "FlowTable.rewrite_outbound": best_us(nat_out, runs, n),
    }


IDLE_S = 0.05  # the bench's ping interval
COLD_SAMPLES = 40


def bench_hops(runs: int, n: int) -> dict[str, float]:
    """Section 5: out and in hop of one small packet, hot (best of runs) and cold (median)."""
    import asyncio
    import statistics

    from tencrypt.core.classify import AddrClass
    from tests.unit.fakes import Pod, Wire, udp_packet

    a_ip, b_ip, vip = "10.128.0.11", "10.128.0.12", "172.30.0.12"
    packet = bytes(10) + ipv4(a_ip, vip, size=53, proto=6)  # a virtio-net header first
    backends: list[tuple[str, Backend | None]] = [("python", pure)]
    compiled = fastpath.compiled()
    if compiled is not None:
        backends.append(("c", compiled))
    results: dict[str, float] = {}
    for name, backend in backends:
        a, b = Pod(a_ip, ptr={vip: AddrClass.INTERNAL}, batch=True), Pod(b_ip, batch=True)
        for pod in (a, b):
            pod.proxy.tunnel.fastpath = backend

        async def link(a: Pod = a, b: Pod = b) -> None:
            wire = Wire(a, b, vips={vip: b_ip})
            await a.proxy.prepare()
            await b.proxy.prepare()
            a.app_sends(bytes(10) + udp_packet(a_ip, vip, b"hello"))
            for _ in range(5):
                await asyncio.sleep(0)
            wire.pump()
            await b.proxy.effects.round()
            wire.pump()
            b.tun.written.clear()

        asyncio.run(link())

        def out_hop(a: Pod = a) -> list[tuple[bytes, tuple[str, int]]]:
            a.tun.inbox.append(packet)
            a.proxy._on_tun()
            sent, a.udp.sent = a.udp.sent, []
            return sent

        def in_hop(sent: list[tuple[bytes, tuple[str, int]]], b: Pod = b) -> None:
            for datagram, (_dst, port) in sent:
                b.udp.inbox.append(([datagram], (a_ip, port)))
            b.proxy._on_udp()
            if len(b.tun.written) != 1:
                raise AssertionError("a benchmark packet was not delivered")
            b.tun.written.clear()

        def hops(k: int) -> tuple[float, float]:
            t_out = t_in = 0.0
            for _ in range(k):
                t0 = time.perf_counter()
                sent = out_hop()
                t1 = time.perf_counter()
                in_hop(sent)
                t_out, t_in = t_out + t1 - t0, t_in + time.perf_counter() - t1
            return t_out / k * 1e6, t_in / k * 1e6

        hot = [hops(n) for _ in range(runs)]
        cold = []
        for _ in range(COLD_SAMPLES):
            time.sleep(IDLE_S)
            cold.append(hops(1))
        results[f"out hop, hot [{name}]"] = min(h[0] for h in hot)
        results[f"in hop, hot [{name}]"] = min(h[1] for h in hot)
        results[f"out hop, after {IDLE_S * 1e3:g} ms idle [{name}]"] = statistics.median(
            c[0] for c in cold
        )
        results[f"in hop, after {IDLE_S * 1e3:g} ms idle [{name}]"] = statistics.median(
            c[1] for c in cold
        )
    return results


def bench_cluster_hops(runs: int, n: int) -> dict[str, float]:
    """Section 6: µs per small packet per hop in cluster mode, request and reply, hot."""
    import asyncio

    from tencrypt.core.membership import Members
    from tencrypt.core.packet import TCP
    from tencrypt.core.services import Endpoint, Port, Service
    from tests.unit.fakes import Pod, Wire

    a_ip, b_ip, vip = "10.128.0.11", "10.128.0.12", "172.30.5.9"
    backend = fastpath.compiled() or pure

    def members(pod: str, netpol: bool) -> Members:
        web = Service(
            "web", (vip,), (Port("http", TCP, 80),), (Endpoint(b_ip, (Port("http", TCP, 8080),)),)
        )
        both_ways = {
            "isolated": True,
            "policies": ["p"],
            "rules": [
                {
                    "policy": "p",
                    "rule": 0,
                    "peers": {"ips": [a_ip, b_ip], "blocks": []},
                    "ports": "any",
                }
            ],
        }
        doc = {
            "format": "tencrypt-netpol/1",
            "project": "shop",
            "pod": pod,
            "generation": 0,
            "ips": [a_ip if pod == "a" else b_ip],
            "ingress": both_ways,
            "egress": both_ways,
        }
        return Members(
            "shop",
            1,
            frozenset({a_ip, b_ip}),
            frozenset({vip}),
            (web,),
            ("172.30.0.0/16",),
            ("10.128.0.0/14",),
            network_policy=json.dumps(doc, sort_keys=True, separators=(",", ":"))
            if netpol
            else None,
        )

    request = bytes(10) + ipv4(a_ip, vip, size=53, proto=6, ports=(40000, 80))
    reply = bytes(10) + ipv4(b_ip, a_ip, size=53, proto=6, ports=(8080, 40000))
    results: dict[str, float] = {}
    for label, netpol in (("cluster", False), ("cluster + NetworkPolicy", True)):
        a = Pod(a_ip, batch=True, members=members("a", netpol))
        b = Pod(b_ip, batch=True, members=members("b", netpol))
        for pod in (a, b):
            pod.proxy.tunnel.fastpath = backend

        async def link(a: Pod = a, b: Pod = b) -> Wire:
            wire = Wire(a, b)
            await a.proxy.prepare()
            await b.proxy.prepare()
            a.app_sends(request)
            for _ in range(5):
                wire.pump()
                await a.proxy.effects.round()
                await b.proxy.effects.round()
            a.tun.written.clear()
            b.tun.written.clear()
            return wire

        asyncio.run(link())
        enforced = [p.proxy.dispatch.netpol.policy is not None for p in (a, b)]
        if enforced != [netpol, netpol]:
            raise AssertionError(f"{label}: the policy is {'not ' if netpol else ''}loaded")

        def hop(src: Pod, dst: Pod, packet: bytes, label: str = label) -> tuple[float, float]:
            t0 = time.perf_counter()
            src.tun.inbox.append(packet)
            src.proxy._on_tun()
            sent, src.udp.sent = src.udp.sent, []
            t1 = time.perf_counter()
            for datagram, (_dst, port) in sent:
                dst.udp.inbox.append(([datagram], (src.ip, port)))
            dst.proxy._on_udp()
            if len(dst.tun.written) != 1:
                raise AssertionError(f"{label}: a benchmark packet was not delivered")
            dst.tun.written.clear()
            return t1 - t0, time.perf_counter() - t1

        def rounds(k: int, a: Pod = a, b: Pod = b) -> tuple[float, float]:
            total_out = total_in = 0.0
            for _ in range(k):
                for src, dst, packet in ((a, b, request), (b, a, reply)):
                    t_out, t_in = hop(src, dst, packet)
                    total_out, total_in = total_out + t_out, total_in + t_in
            return total_out / (2 * k) * 1e6, total_in / (2 * k) * 1e6

        best = [rounds(n) for _ in range(runs)]
        results[f"out hop, hot, {label}"] = min(r[0] for r in best)
        results[f"in hop, hot, {label}"] = min(r[1] for r in best)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per measurement (best wins)")
    parser.add_argument("--packets", type=int, default=20000, help="operations per run")
    args = parser.parse_args()
    print(
        f"python {platform.python_version()}, cryptography {cryptography.__version__}, "
        f"{SIZE}-byte packets, best of {args.runs} runs x {args.packets}"
    )
    results = {**bench_wire(args.runs, args.packets), **bench_tunnel(args.runs, args.packets)}
    nat = bench_nat(args.runs, args.packets)
    if nat is None:
        print("NAT: tencrypt.core.nat not importable; skipped")
    else:
        results.update(nat)
    for name, us in results.items():
        print(f"  {name:<28} {us:7.2f} µs")
    supers = max(1, args.packets // SEGMENTS // 4)
    print(
        f"per super-packet ({SEGMENTS} x 1440-byte segments), best of {args.runs} runs x {supers}"
    )
    for name, us in bench_super_packets(args.runs, supers).items():
        print(f"  {name:<48} {us:8.1f} µs  ({us / SEGMENTS:5.2f} µs/segment)")
    print(
        f"per small packet per hop through the proxy (fake ports: no system calls), hot: best "
        f"of {args.runs} runs x {args.packets // 4}; after idle: median of {COLD_SAMPLES}"
    )
    for name, us in bench_hops(args.runs, args.packets // 4).items():
        print(f"  {name:<48} {us:8.1f} µs")
    print(
        f"per small packet per hop in cluster mode (request and reply, the {backend_name()} "
        f"backend), hot: best of {args.runs} runs x {args.packets // 8} round trips"
    )
    for name, us in bench_cluster_hops(args.runs, args.packets // 8).items():
        print(f"  {name:<48} {us:8.1f} µs")


def backend_name() -> str:
    return "c" if fastpath.compiled() is not None else "python"


if __name__ == "__main__":
    main()
