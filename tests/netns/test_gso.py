"""UDP GSO/GRO (linux/gso.py) and TUN super-packets split by core/batch.py, in real namespaces.

    [ gaNNN ]  ga-NNN 10.231.0.1/24 --veth-- gb-NNN 10.231.0.2/24  [ gbNNN ]
               UdpBatch sender (GSO)                              UdpBatch receiver (GRO or not)

    [ gtNNN ]  tt-NNN (TUN, IFF_VNET_HDR + TSO) 10.232.0.1/24; 10.232.0.2 is routed into it
               client -> 10.232.0.2:5001 --tt--> this test: split, check, swap src<->dst,
               write back --tt--> server on 10.232.0.1:5001 (and the ACKs the same way back)
               The same over IPv6 (TSO6): fd00:232::1/64 on tt-NNN, fd00:232::2 routed into it.

Sockets and the TUN are opened with this thread inside the namespace (setns) and stay there.
"""

import hashlib
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time

import pytest
from scapy.all import IP, TCP, IPv6, raw

from tencrypt import fastpath
from tencrypt.core.batch import (
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR_LEN,
    parse_vnet_hdr,
    split_tcp_batch,
)
from tencrypt.core.stats import Stats
from tencrypt.linux import gso, netns
from tencrypt.linux.tun import Tun

SEG = 1472  # 1440-byte packet sealed (+32): a datagram that fills a 1500-byte link
PER_CALL = 44  # 44 x 1472 = 64768 <= 65507, the most one UDP_SEGMENT sendmsg can carry


@pytest.fixture
def veth_pair():
    sfx = netns.unique_suffix()
    a, b = f"ga{sfx}", f"gb{sfx}"
    try:
        netns.create(a)
        netns.create(b)
        netns.sh(
            [
                "ip",
                "link",
                "add",
                f"ga-{sfx}",
                "netns",
                a,
                "type",
                "veth",
                "peer",
                "name",
                f"gb-{sfx}",
                "netns",
                b,
            ]
        )
        for ns, dev, addr in ((a, f"ga-{sfx}", "10.231.0.1/24"), (b, f"gb-{sfx}", "10.231.0.2/24")):
            netns.run(ns, ["ip", "addr", "add", addr, "dev", dev])
            netns.run(ns, ["ip", "link", "set", dev, "up"])
        yield a, b, f"ga-{sfx}"
    finally:
        netns.delete(a)
        netns.delete(b)
        assert not netns.exists(a) and not netns.exists(b)


def udp_socket(ns, port):
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: nothing lost to overflow
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    return sock


@pytest.fixture
def sockets(veth_pair):
    """A sender in the first namespace and a receiver on :4789 in the second, closed after."""
    a, b, _dev = veth_pair
    tx_sock, rx_sock = udp_socket(a, 0), udp_socket(b, 4789)
    yield tx_sock, rx_sock
    tx_sock.close()
    rx_sock.close()


def datagrams(count, size, last=None):
    """Distinct datagrams: index and a seeded pseudo-random body, so order and content show."""
    rnd = random.Random(count * 7919 + size)
    out = [struct.pack("!I", i) + rnd.randbytes(size - 4) for i in range(count)]
    if last is not None:
        out[-1] = out[-1][:last]
    return out


def receive_all(rx, expected, what):
    got, calls = [], []

    def more():
        while (batch := rx.recv_batch()) is not None:
            views, _addr = batch
            calls.append(len(views))
            got.extend(bytes(v) for v in views)
        return len(got) >= expected

    netns.wait_for(more, timeout=20, what=what)
    assert rx.recv_batch() is None  # nothing beyond what was sent
    return got, calls


def test_gso_sends_44_segments_per_call_and_gro_receives_them_with_their_boundaries(sockets):
    tx_sock, rx_sock = sockets
    stats = Stats()
    tx, rx = gso.UdpBatch(tx_sock, stats), gso.UdpBatch(rx_sock)
    assert tx.gso and rx.gro
    assert gso.max_segments(SEG) == PER_CALL
    sent = []
    for round_ in range(20):
        batch = datagrams(PER_CALL, SEG, last=900 if round_ % 2 else None)
        assert tx.send_batch(b"".join(batch), SEG, ("10.231.0.2", 4789)) == PER_CALL
        sent += batch
    assert stats.get("udp_gso_sends") == 20  # one system call per 44 datagrams
    got, calls = receive_all(rx, len(sent), "GRO receiver")
    assert got == sent
    assert max(calls) > 1  # GRO handed several datagrams per call
    assert len(calls) < len(sent) // 4


def test_batches_larger_than_one_call_are_cut_and_send_many_groups_runs(sockets):
    tx_sock, rx_sock = sockets
    stats = Stats()
    tx, rx = gso.UdpBatch(tx_sock, stats), gso.UdpBatch(rx_sock)
    dst = ("10.231.0.2", 4789)
    big = datagrams(100, SEG, last=77)  # 3 calls: 44 + 44 + 12
    assert tx.send_batch(b"".join(big), SEG, dst) == 100
    mixed = datagrams(5, 600) + datagrams(3, 300, last=100) + [b"solo"]
    assert tx.send_many([(d, dst) for d in mixed]) == len(mixed)
    assert stats.get("udp_gso_sends") == 3 + 2  # the lone datagram went by sendto
    got, _calls = receive_all(rx, 100 + len(mixed), "receiver")
    assert got == big + mixed


def test_send_runs_sends_a_run_as_it_lies_and_groups_the_singles_between(sockets):
    """What the tunnel hands over (core.peer.Transmit): runs go out as GSO from their own
    buffer, single datagrams between them through send_many; order kept on the wire."""
    tx_sock, rx_sock = sockets
    stats = Stats()
    tx, rx = gso.UdpBatch(tx_sock, stats), gso.UdpBatch(rx_sock)
    dst = ("10.231.0.2", 4789)
    run1, run2 = datagrams(50, SEG, last=99), datagrams(3, 600)
    singles = datagrams(2, 300) + [b"solo"]
    runs = [
        (b"".join(run1), dst, SEG),
        *[(d, dst, 0) for d in singles],
        (memoryview(b"".join(run2)), dst, 600),
    ]
    assert tx.send_runs(runs) == 50 + 3 + 3
    assert stats.get("udp_gso_sends") == 2 + 1 + 1  # 44 + 6, the two 300s, run2
    got, _calls = receive_all(rx, 56, "receiver")
    assert got == run1 + singles + run2


def test_without_gro_the_receiver_says_so_and_still_gets_every_datagram(sockets):
    tx_sock, rx_sock = sockets
    tx, rx = gso.UdpBatch(tx_sock), gso.UdpBatch(rx_sock, gro=False)
    assert not rx.gro and rx_sock.getsockopt(gso.SOL_UDP, gso.UDP_GRO) == 0
    sent = []
    for _ in range(5):
        batch = datagrams(PER_CALL, SEG, last=333)
        assert tx.send_batch(b"".join(batch), SEG, ("10.231.0.2", 4789)) == PER_CALL
        sent += batch
    got, calls = receive_all(rx, len(sent), "non-GRO receiver")
    assert got == sent  # the kernel segments GSO packets for a socket without GRO
    assert set(calls) == {1}  # one datagram per call


def test_probes_report_what_the_socket_supports():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        assert gso.probe_gso(udp) and gso.enable_gro(udp)
        # no UDP options on a TCP socket: ENOPROTOOPT, the answer of a kernel without them
        assert not gso.probe_gso(tcp) and not gso.enable_gro(tcp)
        batch = gso.UdpBatch(tcp)
        assert not batch.gso and not batch.gro


def test_with_gso_off_every_datagram_is_sent_by_itself(sockets):
    tx_sock, rx_sock = sockets
    stats = Stats()
    tx, rx = gso.UdpBatch(tx_sock, stats, gso=False), gso.UdpBatch(rx_sock)
    batch = datagrams(PER_CALL, SEG, last=10)
    assert tx.send_batch(b"".join(batch), SEG, ("10.231.0.2", 4789)) == PER_CALL
    assert stats.get("udp_gso_sends") == 0
    got, calls = receive_all(rx, len(batch), "receiver")
    assert got == batch and set(calls) == {1}  # nothing for GRO to merge either


def test_datagrams_above_the_route_mtu_fall_back_to_one_by_one(veth_pair, sockets):
    a, _b, dev = veth_pair
    netns.run(a, ["ip", "link", "set", dev, "mtu", "1280"])  # GSO never fragments: EINVAL
    tx_sock, rx_sock = sockets
    stats = Stats()
    tx, rx = gso.UdpBatch(tx_sock, stats), gso.UdpBatch(rx_sock)
    sent = []
    for _ in range(3):
        batch = datagrams(PER_CALL, SEG, last=1000)
        assert tx.send_batch(b"".join(batch), SEG, ("10.231.0.2", 4789)) == PER_CALL
        sent += batch
    assert stats.get("gso_oversize") == 3 and stats.get("udp_gso_sends") == 0
    assert tx.gso  # not given up for good: smaller datagrams still go by GSO
    got, _calls = receive_all(rx, len(sent), "receiver of fragments")
    assert got == sent
    small = datagrams(PER_CALL, 1000)
    assert tx.send_batch(b"".join(small), 1000, ("10.231.0.2", 4789)) == PER_CALL
    assert stats.get("udp_gso_sends") == 1
    got, _calls = receive_all(rx, PER_CALL, "receiver")
    assert got == small


# --- a real TUN with TSO ------------------------------------------------------------------------

SERVER = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while chunk := c.recv(1 << 20):
    h.update(chunk); n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""
CLIENT = """
import random, socket, sys
data = random.Random(int(sys.argv[1])).randbytes(int(sys.argv[2]))
c = socket.create_connection((sys.argv[3], 5001)); c.sendall(data); c.close()
"""
STREAM_SEED, STREAM_LEN = 1337, 6_000_000
# per family: the server's address on the TUN, the client's peer routed into it, the version,
# where the two addresses lie in the header, the TSO gso_type
FAMILIES = {
    "ipv4": ("10.232.0.1", "10.232.0.2", 4, (12, 16, 20), VIRTIO_NET_HDR_GSO_TCPV4),
    "ipv6": ("fd00:232::1", "fd00:232::2", 6, (8, 24, 40), VIRTIO_NET_HDR_GSO_TCPV6),
}


@pytest.fixture(params=sorted(FAMILIES))
def tun_ns(request):
    sfx = netns.unique_suffix()
    name, dev = f"gt{sfx}", f"tt-{sfx}"
    family = FAMILIES[request.param]
    tun = None
    try:
        netns.create(name)
        with netns.entered(name):
            tun = Tun(dev, vnet_hdr=True)
        if family[2] == 6:  # no duplicate address detection: usable at once
            netns.run(name, ["ip", "-6", "addr", "add", f"{family[0]}/64", "dev", dev, "nodad"])
        else:
            netns.run(name, ["ip", "addr", "add", f"{family[0]}/24", "dev", dev])
        netns.run(name, ["ip", "link", "set", dev, "up"])
        yield name, tun, family
    finally:
        if tun is not None:
            tun.close()
        netns.delete(name)
        assert not netns.exists(name)


def reflect(tun, procs, frames, segments, family):
    """Pump tenc0 until every process exited: split each frame, keep the TCP packets of the
    test's family (not the link's own chatter: IPv6 router and multicast listener messages),
    swap their addresses (the checksums stay right: the pseudo-header sum is symmetric) and
    write them back with an empty virtio-net header, so the kernel verifies every checksum we
    computed. The compiled ``segment``, when built, cuts every frame too: the same bytes."""
    version, (a, b, end) = family[2], family[3]
    proto_at = 6 if version == 6 else 9
    stats, out, empty = Stats(), bytearray(1 << 17), bytes(VNET_HDR_LEN)
    compiled, c_out = fastpath.compiled(), bytearray(1 << 17)
    deadline = time.monotonic() + 120  # a hang guard, not a performance threshold
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "transfer through the reflector hung"
        if not select.select([tun.fd], [], [], 0.1)[0]:
            continue
        while (frame := tun.read(65536 + VNET_HDR_LEN)) is not None:
            frames.append(parse_vnet_hdr(frame))
            if compiled is not None:
                by_c = split_tcp_batch(frame, Stats(), c_out, compiled.segment)
                c_segments = [bytes(s) for s in by_c]
            cut = split_tcp_batch(frame, stats, out)
            assert compiled is None or [bytes(s) for s in cut] == c_segments
            for seg in cut:
                if seg[0] >> 4 != version or seg[proto_at] != 6:
                    continue
                segments.append(bytes(seg))
                seg[a:b], seg[b:end] = seg[b:end].tobytes(), seg[a:b].tobytes()
                os.writev(tun.fd, [empty, seg])
    return stats


def test_tun_super_packets_split_into_valid_segments_that_carry_the_stream(tun_ns):
    ns, tun, family = tun_ns
    python = sys.executable
    client = None
    server = subprocess.Popen(
        netns.exec_argv(ns, [python, "-c", SERVER, family[0]]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout.readline().strip() == "listening"
        client = subprocess.Popen(
            netns.exec_argv(
                ns, [python, "-c", CLIENT, str(STREAM_SEED), str(STREAM_LEN), family[1]]
            )
        )
        frames, segments = [], []
        stats = reflect(tun, [client, server], frames, segments, family)
        assert client.returncode == 0
        length, digest = server.stdout.read().split()
    finally:
        for proc in (server, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
    stream = random.Random(STREAM_SEED).randbytes(STREAM_LEN)
    assert (int(length), digest) == (STREAM_LEN, hashlib.sha256(stream).hexdigest())
    tso = [f for f in frames if f and f.gso_type & 0x7F == family[4]]
    assert tso, "the TUN handed no TSO super-packets"
    assert max(f.gso_size for f in tso) >= 1000
    # every segment is a valid IPv4/TCP or IPv6/TCP packet, checked by scapy's recomputation
    rebuilt, seen, isn = bytearray(STREAM_LEN), bytearray(STREAM_LEN), None
    for seg in segments:
        if family[2] == 6:
            pkt = IPv6(seg)
            assert pkt.version == 6 and pkt.plen + 40 == len(seg) and pkt.nh == 6
            tcp_ck = pkt[TCP].chksum
            del pkt[TCP].chksum
            again = IPv6(raw(pkt))
            assert tcp_ck == again[TCP].chksum
        else:
            pkt = IP(seg)
            assert pkt.version == 4 and pkt.len == len(seg) and TCP in pkt
            ip_ck, tcp_ck = pkt.chksum, pkt[TCP].chksum
            del pkt.chksum, pkt[TCP].chksum
            again = IP(raw(pkt))
            assert (ip_ck, tcp_ck) == (again.chksum, again[TCP].chksum)
        tcp = again[TCP]
        if tcp.dport != 5001:
            continue
        if tcp.flags.S:
            isn = tcp.seq + 1
            continue
        payload = bytes(tcp.payload)
        if payload:
            at = (tcp.seq - isn) & 0xFFFFFFFF
            rebuilt[at : at + len(payload)] = payload  # a retransmission writes the same bytes
            seen[at : at + len(payload)] = b"\x01" * len(payload)
    assert isn is not None and seen.count(0) == 0
    assert bytes(rebuilt) == stream
    assert not stats.drops  # the link's IPv6 chatter is split too now, and left alone
