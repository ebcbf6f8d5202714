"""The batch path's costs: ``python -m bench.batch_micro [--runs N] [--seconds S] [--no-netns]``.

Not a test. Prints best-of-runs figures (a noisy shared machine shows what the code costs, not
what the neighbours cost):

1. pure: split of a 64 KB TSO super-packet (per super-packet and per segment), coalesce of its
   segments (full or partial checksum), the one-packet path's equivalent (completing the
   checksum of each MSS-sized packet), and sealing the segments with ``encrypt`` + join
   against ``encrypt_into`` one contiguous GSO buffer;
2. UDP send from a namespace over a veth: one ``sendto`` per datagram vs one UDP_SEGMENT
   ``sendmsg`` per 44 datagrams (µs per datagram);
3. re-injection (root): a real TCP connection (iperf3) runs through a TUN with TSO in one
   namespace; this process reads its super-packets, splits them, swaps source and destination
   and re-injects them, in four ways:
      raw-seg  one raw-socket sendto per segment            (the one-packet path)
      raw-gro  coalesce, one raw sendto per ~64 KB packet   (IP_HDRINCL to a local address)
      tun-seg  one TUN write per segment, empty virtio-net header
      tun-gso  coalesce, one TUN write per ~64 KB packet with a TSO virtio-net header
   and reports iperf3's Gbit/s, the injection system calls' own cost (µs per call, per
   segment, Gbit/s of the calls alone; wall time, so it includes the local delivery the
   kernel does in the caller's context) and the reflector's CPU use, in all and per segment
   (user + system: independent of how much of a shared machine the reflector got).

    [ bmNNN ]  bt-NNN (TUN, vnet_hdr, TSO) 10.233.0.1/24
               iperf3 -c 10.233.0.2 --(route into bt)--> reflector --> iperf3 -s on 10.233.0.1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tencrypt.core.batch import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR_LEN,
    VnetHdr,
    build_gso_vnet_hdr,
    build_vnet_hdr,
    coalesce_batch,
    split_tcp_batch,
)
from tencrypt.core.packet import pseudo_sum
from tencrypt.core.stats import Stats
from tencrypt.linux import gso, netns
from tencrypt.linux.tun import Tun

MSS = 1388  # tenc0 MTU 1440 minus 52 bytes of IPv4 + TCP headers with timestamps
MODES = ("raw-seg", "raw-gro", "tun-seg", "tun-gso")


# --- 1. pure ------------------------------------------------------------------------------------


def super_packet(payload_len: int = 65535 - 52, mss: int = MSS) -> bytes:
    """A TSO frame as tenc0 hands it: virtio-net header, IPv4, TCP with timestamps, partial csum."""
    total = 52 + payload_len
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        4242,
        0x4000,
        64,
        6,
        0,
        bytes([10, 233, 0, 1]),
        bytes([10, 233, 0, 2]),
    )
    src, dst = struct.unpack_from("!II", ip, 12)
    partial = pseudo_sum(src, dst, 6, total - 20) % 0xFFFF
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 8 << 4, 0x18, 502, partial, 0)
    tcp += b"\x01\x01\x08\x0a" + struct.pack("!II", 7, 9)
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 52, mss, 20, 16)
    return build_vnet_hdr(hdr) + ip + tcp + random.Random(1).randbytes(payload_len)


def best_us(fn: Callable[[], object], runs: int, n: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def bench_pure(runs: int) -> dict[str, float]:
    frame = bytearray(super_packet())
    stats, out = Stats(), bytearray(1 << 17)
    segs = split_tcp_batch(frame, stats, out)
    count = len(segs)
    singles = []  # the same segments as the one-packet path reads them: no TSO, partial csum
    for seg in segs:
        pkt = bytearray(seg)
        src, dst = struct.unpack_from("!II", pkt, 12)
        struct.pack_into("!H", pkt, 36, pseudo_sum(src, dst, 6, len(pkt) - 20) % 0xFFFF)
        hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 20, 16)
        singles.append(build_vnet_hdr(hdr) + bytes(pkt))
    copies = [bytes(s) for s in segs]
    aead = ChaCha20Poly1305(bytes(32))
    header = bytes(16)
    datagram = 16 + len(segs[0]) + 16
    gso_buf = bytearray(datagram * count)

    def seal_join() -> None:
        b"".join([header + aead.encrypt(bytes(12), s, header) for s in segs])

    def seal_into() -> None:
        view = memoryview(gso_buf)
        pos = 0
        for s in segs:
            view[pos : pos + 16] = header
            aead.encrypt_into(bytes(12), s, header, view[pos + 16 : pos + 32 + len(s)])
            pos += 32 + len(s)

    r = {"segments": float(count)}
    r["split_us"] = best_us(lambda: split_tcp_batch(frame, stats, out), runs, 200)
    r["split_us_per_segment"] = r["split_us"] / count
    r["one_packet_path_us"] = best_us(
        lambda: [split_tcp_batch(f, stats) for f in singles], runs, 50
    )
    r["coalesce_us"] = best_us(lambda: coalesce_batch(copies), runs, 200)
    r["coalesce_partial_us"] = best_us(lambda: coalesce_batch(copies, partial=True), runs, 200)
    r["seal_encrypt_join_us"] = best_us(seal_join, runs, 100)
    r["seal_encrypt_into_us"] = best_us(seal_into, runs, 100)
    return r


# --- namespaces ---------------------------------------------------------------------------------


def bench_udp_send(runs: int) -> dict[str, float]:
    sfx = netns.unique_suffix()
    a, b = f"bua{sfx}", f"bub{sfx}"
    try:
        for ns in (a, b):
            netns.create(ns)
        netns.sh(
            [
                "ip",
                "link",
                "add",
                f"ua-{sfx}",
                "netns",
                a,
                "type",
                "veth",
                "peer",
                "name",
                f"ub-{sfx}",
                "netns",
                b,
            ]
        )
        for ns, dev, addr in ((a, f"ua-{sfx}", "10.234.0.1/24"), (b, f"ub-{sfx}", "10.234.0.2/24")):
            netns.run(ns, ["ip", "addr", "add", addr, "dev", dev])
            netns.run(ns, ["ip", "link", "set", dev, "up"])
        with netns.entered(a):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with netns.entered(b):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("0.0.0.0", 4789))
        gso.enable_gro(rx)
        rx.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)
        rx.setblocking(False)
        batch = gso.UdpBatch(tx)
        data = bytes(1472 * 44)
        dst = ("10.234.0.2", 4789)

        def drain() -> None:
            with contextlib.suppress(BlockingIOError):
                while True:
                    rx.recv(1 << 16)

        def each() -> None:
            for i in range(44):
                tx.sendto(data[i * 1472 : (i + 1) * 1472], dst)
            drain()

        def one_call() -> None:
            batch.send_batch(data, 1472, dst)
            drain()

        r = {
            "sendto_us_per_datagram": best_us(each, runs, 50) / 44,
            "gso_us_per_datagram": best_us(one_call, runs, 50) / 44,
        }
        tx.close()
        rx.close()
        return r
    finally:
        netns.delete(a)
        netns.delete(b)


# --- 3. re-injection ----------------------------------------------------------------------------


def reflect(
    tun: Tun, raw: socket.socket, mode: str, iperf: subprocess.Popen[str]
) -> dict[str, float]:
    """Pump the TUN until iperf3 exits: split, swap addresses, re-inject the chosen way."""
    stats, out, empty = Stats(), bytearray(1 << 17), bytes(VNET_HDR_LEN)
    calls = segments = nbytes = 0
    spent = 0.0
    fd = tun.fd
    coalesce = mode in ("raw-gro", "tun-gso")
    use_raw = mode.startswith("raw")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    while iperf.poll() is None:
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        while (frame := tun.read(65536 + VNET_HDR_LEN)) is not None:
            segs = split_tcp_batch(frame, stats, out)
            for s in segs:
                s[12:16], s[16:20] = s[16:20].tobytes(), s[12:16].tobytes()
            items = (
                coalesce_batch(segs, partial=not use_raw) if coalesce else [(s, 0) for s in segs]
            )
            start = time.perf_counter()
            for pkt, size in items:
                if use_raw:
                    raw.sendto(pkt, ("10.233.0.1", 0))
                else:
                    os.writev(fd, [build_gso_vnet_hdr(pkt, size) if size else empty, pkt])
            spent += time.perf_counter() - start
            calls += len(items)
            segments += len(segs)
            nbytes += sum(len(s) for s in segs)
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "inject_calls": calls,
        "segments": segments,
        "us_per_call": spent / max(1, calls) * 1e6,
        "us_per_segment": spent / max(1, segments) * 1e6,
        "inject_gbit_s": nbytes * 8 / max(spent, 1e-9) / 1e9,
        "reflector_cpu_pct": cpu / wall * 100,
        "cpu_us_per_segment": cpu / max(1, segments) * 1e6,
    }


def bench_inject(seconds: int, rounds: int) -> dict[str, dict[str, float]]:
    sfx = netns.unique_suffix()
    ns, dev = f"bm{sfx}", f"bt-{sfx}"
    results: dict[str, dict[str, float]] = {}
    tun = None
    server = None
    try:
        netns.create(ns)
        with netns.entered(ns):
            tun = Tun(dev, vnet_hdr=True)
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        raw.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE
        netns.run(ns, ["ip", "addr", "add", "10.233.0.1/24", "dev", dev])
        netns.run(ns, ["ip", "link", "set", dev, "up"])
        server = netns.spawn(ns, ["iperf3", "-s", "-B", "10.233.0.1"])
        netns.wait_for(
            lambda: "10.233.0.1:5201" in netns.run(ns, ["ss", "-ltn"]).stdout, what="iperf3 server"
        )
        for round_ in range(rounds):  # modes interleaved: a busy neighbour hits them all
            for mode in MODES:
                iperf = subprocess.Popen(
                    netns.exec_argv(ns, ["iperf3", "-c", "10.233.0.2", "-t", str(seconds), "-J"]),
                    stdout=subprocess.PIPE,
                    text=True,
                )
                r = reflect(tun, raw, mode, iperf)
                report = json.loads(iperf.stdout.read() if iperf.stdout else "{}")
                end = report.get("end", {})
                r["iperf3_gbit_s"] = end.get("sum_received", {}).get("bits_per_second", 0.0) / 1e9
                r["retransmits"] = end.get("sum_sent", {}).get("retransmits", -1)
                results[f"{mode} #{round_ + 1}"] = r
        raw.close()
        return results
    finally:
        if server is not None:
            server.kill()
        if tun is not None:
            tun.close()
        netns.delete(ns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4, help="iperf3 time per mode")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the four modes")
    parser.add_argument("--no-netns", action="store_true", help="pure figures only")
    args = parser.parse_args()
    print(f"nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}, kernel {os.uname().release}")
    pure = bench_pure(args.runs)
    for k, v in pure.items():
        print(f"  {k:28s} {v:10.1f}")
    if args.no_netns or os.geteuid() != 0:
        return
    for k, v in bench_udp_send(args.runs).items():
        print(f"  {k:28s} {v:10.2f}")
    inject = bench_inject(args.seconds, args.rounds)
    cols = [
        "iperf3_gbit_s",
        "retransmits",
        "inject_calls",
        "segments",
        "us_per_call",
        "us_per_segment",
        "inject_gbit_s",
        "reflector_cpu_pct",
        "cpu_us_per_segment",
    ]
    widths = [max(len(c), 10) for c in cols]
    print("  mode        " + " ".join(f"{c:>{w}s}" for c, w in zip(cols, widths, strict=True)))
    for mode, r in inject.items():
        print(
            f"  {mode:11s} " + " ".join(f"{r[c]:{w}.2f}" for c, w in zip(cols, widths, strict=True))
        )


if __name__ == "__main__":
    main()
