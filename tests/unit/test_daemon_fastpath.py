"""The daemon's batch path through each backend (one AEAD call per packet, core/fastpath.py,
tencrypt._fastpath), with in-memory ports: a TSO super-packet read from A's tenc0 arrives in
B's tenc0 as the same TCP stream, byte for byte the same frames whatever the backend."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit import test_batch as tb
from tests.unit.fakes import Pod, Wire
from tests.unit.test_fastpath_tunnel import MODES

A, B = "10.128.0.11", "10.128.0.12"
PAYLOAD = bytes(range(256)) * 80  # 20 KiB: 15 segments of 1400 bytes


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def through_two_proxies(backend) -> tuple[list[tuple[bytes, bytes]], Pod, Pod]:
    async def main():
        a, b = Pod(A, batch=True), Pod(B, batch=True)
        wire = Wire(a, b)
        for pod, peer in ((a, b), (b, a)):
            await pod.proxy.prepare()
            pod.proxy.tunnel.fastpath = backend
            pod.proxy._on_changes(pod.proxy.table.set_members(frozenset({peer.ip}), pod.clock.now))
            await pod.proxy.effects.round()
        pkt = tb.tcp_packet(PAYLOAD, src=A, dst=B, seq=7, flags="PA", options=tb.TS)
        a.app_sends(tb.tso_frame(pkt, 1400))
        await settle()
        wire.pump()
        return b.tun.written, a, b

    return asyncio.run(main())


@pytest.mark.parametrize("backend", MODES)
def test_a_super_packet_crosses_two_batch_proxies(backend):
    written, a, b = through_two_proxies(backend)
    segments = [packet for _hdr, packet in written]
    assert b"".join(s[52:] for s in segments) == PAYLOAD
    assert a.stats.get("super_packets_split") == 1
    assert b.stats.get("packets_opened") == len(segments) == 15
    assert not a.stats.drops and not b.stats.drops
    reference, _, _ = through_two_proxies(None)
    assert written == reference  # the same frames into B's tenc0 whatever the backend


def test_the_backend_is_selected_at_start(monkeypatch):
    """start() takes the backend the environment asks for (tencrypt/fastpath.py)."""
    from tencrypt import fastpath
    from tencrypt.core import fastpath as pure

    async def main():
        pod = Pod(A, batch=True)
        monkeypatch.setenv("TENCRYPT_FASTPATH", "0")
        monkeypatch.delenv("TENCRYPT_REQUIRE_FASTPATH", raising=False)
        pod.proxy.resolver.start = _noop  # the fakes serve no DNS socket
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "add_reader", lambda *a: None)
        await pod.proxy.start()
        chosen = pod.proxy.tunnel.fastpath
        pod.proxy.stopping.set()
        for task in list(pod.proxy._tasks):
            task.cancel()
        await asyncio.gather(*pod.proxy._tasks, return_exceptions=True)
        return chosen

    assert asyncio.run(main()) is pure
    assert fastpath.describe(pure).startswith("pure Python")


async def _noop() -> None:
    return None


class CountingBackend:
    """The C backend (or the pure one), counting the seal calls."""

    def __init__(self, inner) -> None:
        self.inner, self.seals = inner, 0
        self.NAME = inner.NAME

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def seal_batch(self, *args):
        self.seals += 1
        return self.inner.seal_batch(*args)


@pytest.mark.parametrize("backend", [m for m in MODES if m.values[0] is not None])
def test_small_packets_are_sealed_once_per_destination_in_order(backend):
    """Packets read in one batch to a peer with a session: one seal call for the small ones,
    flushed before a super-packet to keep each destination's order."""
    from tests.unit.fakes import udp_packet

    async def main():
        a, b = Pod(A, batch=True), Pod(B, batch=True)
        wire = Wire(a, b)
        counting = CountingBackend(backend)
        for pod, peer in ((a, b), (b, a)):
            await pod.proxy.prepare()
            pod.proxy.tunnel.fastpath = counting
            pod.proxy._on_changes(pod.proxy.table.set_members(frozenset({peer.ip}), pod.clock.now))
            await pod.proxy.effects.round()
        a.app_sends(bytes(10) + udp_packet(A, B, b"hello"))  # the handshake first
        await settle()
        wire.pump()
        counting.seals = 0
        b.tun.written.clear()
        small = [bytes(10) + udp_packet(A, B, b"small %d" % i) for i in range(5)]
        big = tb.tso_frame(tb.tcp_packet(PAYLOAD[:4200], src=A, dst=B, flags="PA"), 1400)
        a.tun.inbox.extend([*small[:3], big, *small[3:]])
        a.proxy._on_tun()
        seals = counting.seals
        wire.pump()
        return seals, [p for _h, p in b.tun.written]

    seals, delivered = asyncio.run(main())
    assert seals == 3  # three small ones, the super-packet, two small ones
    assert [p[28:] for p in delivered[:3]] == [b"small 0", b"small 1", b"small 2"]
    assert b"".join(p[40:] for p in delivered[3:6]) == PAYLOAD[:4200]
    assert [p[28:] for p in delivered[6:]] == [b"small 3", b"small 4"]
