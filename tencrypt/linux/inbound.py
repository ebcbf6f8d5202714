"""Standalone strict mode's inbound check: a plaintext connection from the pod network is
classified by its source before the kernel lets it in (DESIGN §1a, issue #11).

Without a membership file the proxy cannot know every pod of its project, so an unpatched pod
of the project could open plaintext connections to this one. The kernel holds the first packet
of every new TCP or UDP connection from the pod network (linux.nfqueue's rule); this gate:

1. reads the queued packets (``NfQueue.read_batch``) and takes each one's source address;
2. decides by ``core.policy.decide_inbound`` from the classification table: the project's ->
   refused (dropped, counted ``plaintext_from_project``); another project's -> accepted;
   unknown -> held while one reverse (PTR) lookup per source decides (a SYN retransmitted
   meanwhile joins the same wait), then decided again with the lookup's answer;
3. answers all verdicts it can in one ``verdicts`` call.

Once a source is known to be the project's it is in the firewall's sets, which drop its
packets before they ever reach the queue. Held packets are bounded per source and in total;
past the bound the packet is refused (``inbound_hold_full``): fail closed, the client retries.
A packet the gate cannot parse is refused too (counted by nfqueue as malformed).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from tencrypt.core.classify import AddrClass, ClassTable
from tencrypt.core.holdqueue import HoldQueue
from tencrypt.core.nfqmsg import Flow, parse_flow
from tencrypt.core.policy import Verdict, decide, decide_inbound
from tencrypt.core.stats import Counter, DropReason, Stats
from tencrypt.linux import nfqueue
from tencrypt.linux.nfqueue import NfQueue

if TYPE_CHECKING:
    from tencrypt.ports import Resolver
from tencrypt.logutil import RateLimitedLog

log = logging.getLogger("tencrypt.inbound")
QUEUE_NUM, OUT_QUEUE_NUM = nfqueue.QUEUE_NUM, nfqueue.OUT_QUEUE_NUM
HOLD_PER_SOURCE = 16
HOLD_TOTAL = 1024


class InboundGate:
    """New plaintext connections from the pod network, by their source (module stages)."""

    direction = "in"

    def __init__(
        self,
        queue: NfQueue,
        table: ClassTable,
        stats: Stats,
        classify: Callable[[str], Awaitable[AddrClass | None]],
        clock: Callable[[], float],
        spawn: Callable[[Awaitable[Any]], None],
        locked: Callable[[], bool] = lambda: False,
    ) -> None:
        self.queue, self.table, self.stats = queue, table, stats
        self.classify, self.clock, self.spawn = classify, clock, spawn
        self.locked = locked  # a broken membership feed (core/policy.decide_inbound)
        self.held: HoldQueue[str, int] = HoldQueue(HOLD_PER_SOURCE, HOLD_TOTAL)  # packet ids
        self.payloads: dict[int, bytes] = {}  # held packets' headers (OutboundGate's ICMP)
        self.ratelog = RateLimitedLog(log)

    def key(self, flow: Flow) -> str:
        """The address the decision is about: the source of an inbound connection."""
        return str(ipaddress.ip_address(flow.src))

    def verdict(self, ip: str, now: float, looked_up: bool) -> Verdict:
        return decide_inbound(self.table.lookup(ip, now), looked_up=looked_up, locked=self.locked())

    def on_readable(self) -> None:
        now = self.clock()
        decisions: list[tuple[int, bool]] = []
        for packet in self.queue.read_batch():
            flow = parse_flow(packet.payload)
            if flow is None:
                decisions.append((packet.packet_id, False))
                continue
            ip = self.key(flow)
            verdict = self.verdict(ip, now, self.table.known_unknown(ip, now))
            if verdict is Verdict.HOLD:
                self._hold(ip, packet.packet_id, packet.payload, decisions)
            else:
                accept = self._accept(ip, verdict)
                decisions.append((packet.packet_id, accept))
                if not accept:
                    self.refused(ip, [packet.payload])
        if decisions:
            self.queue.verdicts(decisions)

    def _hold(
        self, ip: str, packet_id: int, payload: bytes, decisions: list[tuple[int, bool]]
    ) -> None:
        new, refused = self.held.add(ip, [packet_id])
        if refused:
            self.stats.drop(DropReason.INBOUND_HOLD_FULL)
            decisions.append((packet_id, False))
            return
        self.payloads[packet_id] = bytes(payload)
        if new:
            self.spawn(self._lookup(ip))

    async def _lookup(self, ip: str) -> None:
        try:
            await self.classify(ip)
        except Exception:  # unknown after all: the verdict table says what that means
            log.exception("reverse lookup of %s failed", ip)
        now = self.clock()
        if self.table.lookup(ip, now) is None and not self.table.known_unknown(ip, now):
            self.table.note_unknown(ip, now)
        verdict = self.verdict(ip, now, True)
        ids = self.held.pop(ip)
        payloads = [self.payloads.pop(i, b"") for i in ids]
        if ids:
            accept = self._accept(ip, verdict, len(ids))
            self.queue.verdicts([(i, accept) for i in ids])
            if not accept:
                self.refused(ip, payloads)

    def _accept(self, ip: str, verdict: Verdict, packets: int = 1) -> bool:
        if verdict is Verdict.REFUSE:
            self.stats.drop(DropReason.PLAINTEXT_FROM_PROJECT, packets)
            self.ratelog.warn(
                "plaintext-from-project",  # a reason, never an address: logutil rule 1
                "refused a plaintext connection from %s: it is "
                "this project's (a pod without a tencrypt proxy?)",
                ip,
            )
            return False
        self.stats.inc(Counter.INBOUND_ACCEPTED, packets)
        return True

    def refused(self, ip: str, payloads: list[bytes]) -> None:
        """What a refused connection's sender learns: nothing inbound (a remote pod)."""

    def close(self) -> None:
        self.queue.close()  # the kernel drops whatever still waits: fail closed


class OutboundGate(InboundGate):
    """Standalone strict mode, the other way (DESIGN §1a "unknown means held, on every path"):
    a new connection from this pod to an address of the pod network that nothing routed into
    tenc0 (the on-link route would carry it in the clear) waits here while a reverse lookup
    decides. Positively another project's: accepted (in the clear, as cross-project traffic
    is). The project's: dropped (its /32 into tenc0 is wanted: the app's retransmission is
    sealed). Unknown after the lookup: refused (dropped, counted ``unclassified``, an ICMP
    "administratively prohibited" to the app), as the proxy refuses it from tenc0."""

    direction = "out"

    def __init__(self, *args: Any, icmp: Callable[[bytes], None] = lambda _p: None, **kw: Any):
        super().__init__(*args, **kw)
        self.icmp = icmp  # the proxy's: an ICMP admin-prohibited about this packet to the app

    def key(self, flow: Flow) -> str:
        return str(ipaddress.ip_address(flow.dst))

    def verdict(self, ip: str, now: float, looked_up: bool) -> Verdict:
        verdict = decide(self.table.lookup(ip, now), guarded=True, looked_up=looked_up, strict=True)
        return Verdict.REFUSE if verdict is Verdict.SEAL else verdict

    def _accept(self, ip: str, verdict: Verdict, packets: int = 1) -> bool:
        if verdict is not Verdict.REFUSE:
            self.stats.inc(Counter.OUTBOUND_ACCEPTED, packets)
            return True
        if self.table.lookup(ip, self.clock()) is AddrClass.INTERNAL:
            self.stats.inc(Counter.OUTBOUND_TO_TUNNEL, packets)  # retransmitted into tenc0
        else:
            self.stats.drop(DropReason.UNCLASSIFIED, packets)
        return False

    def refused(self, ip: str, payloads: list[bytes]) -> None:
        if self.table.lookup(ip, self.clock()) is AddrClass.INTERNAL:
            return  # its route into tenc0 is wanted: the app's next try is sealed
        for payload in payloads:
            if payload:
                self.icmp(payload)


class Queues(Protocol):  # linux.effects.Kernel
    def open_inbound_queue(self, stats: Stats) -> NfQueue: ...
    def open_outbound_queue(self, stats: Stats) -> NfQueue: ...


class GateOwner(Protocol):  # daemon.Proxy
    @property
    def kernel(self) -> Queues: ...

    table: ClassTable
    stats: Stats
    resolver: Resolver
    clock: Callable[[], float]

    def _spawn(self, coro: Awaitable[Any]) -> None: ...


def open_gates(
    proxy: GateOwner, locked: Callable[[], bool], icmp: Callable[[bytes], None]
) -> list[InboundGate]:
    """Standalone strict mode's two gates, their kernel rules installed first."""
    common = (proxy.table, proxy.stats, proxy.resolver.classify_address, proxy.clock)
    inbound = InboundGate(
        proxy.kernel.open_inbound_queue(proxy.stats), *common, proxy._spawn, locked
    )
    outbound = OutboundGate(
        proxy.kernel.open_outbound_queue(proxy.stats), *common, proxy._spawn, locked, icmp=icmp
    )
    return [inbound, outbound]
