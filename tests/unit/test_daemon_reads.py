"""daemon.py's read rule (READS in its docstring), with in-memory ports that count reads: idle,
a lone small packet costs exactly one read (no read that only finds EAGAIN); hot, or when the
first read brings a batch (a super-packet, a GRO run), the reader goes on until EAGAIN. Either
way every packet is delivered, in order. The clock is the fakes' settable one: "idle" is a
step of the clock past QUIET, never a measured time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tencrypt.daemon import QUIET
from tests.unit import test_batch as tb
from tests.unit.fakes import Pod, Wire, udp_packet

A, B = "10.128.0.11", "10.128.0.12"
VNET = bytes(10)  # a virtio-net header saying "no offload": the batch path's small frame


def counted(port: Any, name: str) -> list[object]:
    """Every result of ``port.name(...)`` from now on, in order (0 / None: EAGAIN)."""
    real, results = getattr(port, name), []

    def call(*args: Any) -> Any:
        got = real(*args)
        results.append(got)
        return got

    setattr(port, name, call)
    return results


def paired(batch: bool) -> tuple[Pod, Pod, Wire]:
    """A and B, members of each other, one packet exchanged (the handshake is done)."""

    async def main() -> tuple[Pod, Pod, Wire]:
        a, b = Pod(A, batch=batch), Pod(B, batch=batch)
        wire = Wire(a, b)
        for pod, peer in ((a, b), (b, a)):
            await pod.proxy.prepare()
            pod.proxy._on_changes(pod.proxy.table.set_members(frozenset({peer.ip}), pod.clock.now))
            await pod.proxy.effects.round()
        a.app_sends(frame(batch, b"hello"))
        for _ in range(5):
            await asyncio.sleep(0)
        wire.pump()
        return a, b, wire

    return asyncio.run(main())


def frame(batch: bool, payload: bytes) -> bytes:
    return (VNET if batch else b"") + udp_packet(A, B, payload)


def idle(*pods: Pod) -> None:
    for pod in pods:
        pod.clock.now += 2 * QUIET


def payloads(pod: Pod) -> list[bytes]:
    packets = [p for _h, p in pod.tun.written] + pod.inject.sent
    return [p[28:] for p in packets]


@pytest.mark.parametrize("batch", [True, False])
def test_idle_a_lone_packet_is_read_once(batch):
    a, b, wire = paired(batch)
    idle(a, b)
    tun_reads, udp_reads = counted(a.tun, "readinto"), counted(b.udp, "recv_batch")
    a.app_sends(frame(batch, b"ping"))
    wire.pump()
    assert len(tun_reads) == 1 and tun_reads[0]  # the packet, and no read that finds nothing
    assert len(udp_reads) == 1 and udp_reads[0] is not None
    assert payloads(b)[-1] == b"ping"


@pytest.mark.parametrize("batch", [True, False])
def test_idle_with_more_queued_the_next_callback_reads_on_hot(batch):
    """Level-triggered readiness calls the reader again at once: it is hot then."""
    a, _b, _wire = paired(batch)
    idle(a)
    reads = counted(a.tun, "readinto")
    a.tun.inbox.extend(frame(batch, b"p%d" % i) for i in range(4))
    a.proxy._on_tun()
    assert len(reads) == 1 and len(a.tun.inbox) == 3  # one read, three still queued
    a.proxy._on_tun()  # the loop's next callback: within QUIET of the last one
    assert len(reads) == 5 and reads[-1] == 0  # the rest, then EAGAIN
    assert not a.tun.inbox


@pytest.mark.parametrize("batch", [True, False])
def test_hot_a_burst_is_read_until_eagain(batch):
    a, b, wire = paired(batch)
    tun_reads, udp_reads = counted(a.tun, "readinto"), counted(b.udp, "recv_batch")
    a.tun.inbox.extend(frame(batch, b"p%d" % i) for i in range(5))
    a.proxy._on_tun()  # the clock has not moved since the handshake's callbacks: hot
    assert len(tun_reads) == 6 and tun_reads[-1] == 0
    sent, a.udp.sent = a.udp.sent, []
    b.udp.inbox.extend(([d], (A, port)) for d, (_ip, port) in sent)
    b.proxy._on_udp()
    assert len(udp_reads) == len(sent) + 1 and udp_reads[-1] is None
    assert payloads(b)[-5:] == [b"p%d" % i for i in range(5)]


def test_idle_a_super_packet_is_bulk_and_reads_on():
    a, _b, _wire = paired(True)
    idle(a)
    reads = counted(a.tun, "readinto")
    big = tb.tso_frame(tb.tcp_packet(bytes(4200), src=A, dst=B, flags="PA"), 1400)
    a.tun.inbox.extend([big, frame(True, b"after")])
    a.proxy._on_tun()
    assert len(reads) == 3 and reads[-1] == 0 and not a.tun.inbox


def test_idle_a_gro_run_is_bulk_and_reads_on():
    a, b, _wire = paired(True)
    a.tun.inbox.extend(frame(True, b"p%d" % i) for i in range(3))
    a.proxy._on_tun()
    sent, a.udp.sent = a.udp.sent, []
    assert len(sent) == 3
    idle(b)
    reads = counted(b.udp, "recv_batch")
    port = sent[0][1][1]
    b.udp.inbox.append(([d for d, _ in sent[:2]], (A, port)))  # one receive, two datagrams
    b.udp.inbox.append(([sent[2][0]], (A, port)))
    b.proxy._on_udp()
    assert len(reads) == 3 and reads[-1] is None and not b.udp.inbox
    assert payloads(b)[-3:] == [b"p0", b"p1", b"p2"]


def test_a_burst_the_other_way_makes_a_lone_packet_read_until_eagain():
    """While one direction is busy (a bulk transfer's data), the other's small packets (its
    ACKs) are read until EAGAIN, not one per loop turn behind it."""
    a, _b, _wire = paired(True)
    idle(a)
    a.udp.inbox.append(([b"not ours", b"nor this"], (B, 1337)))  # a GRO run: a burst
    a.proxy._on_udp()
    reads = counted(a.tun, "readinto")
    a.tun.inbox.append(frame(True, b"ack"))
    a.proxy._on_tun()
    assert len(reads) == 2 and reads[-1] == 0


def test_a_lone_packet_the_other_way_leaves_the_answer_lone():
    """A request in and its answer out a few µs later: one read each (the server's side of a
    sparse call), the other direction's lone packet makes nothing hot."""
    a, _b, _wire = paired(True)
    idle(a)
    udp_reads, tun_reads = counted(a.udp, "recv_batch"), counted(a.tun, "readinto")
    a.udp.inbox.append(([b"not a datagram of ours"], (B, 1337)))
    a.proxy._on_udp()
    a.tun.inbox.append(frame(True, b"answer"))
    a.proxy._on_tun()
    assert len(udp_reads) == 1 and len(tun_reads) == 1 and tun_reads[0]
